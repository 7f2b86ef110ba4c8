/* Shared pieces of the observability programs: address helpers (histogram slots: lib/hist.h). */
#ifndef NODEWIRE_OBS_H
#define NODEWIRE_OBS_H

#include "lib/hist.h"

#define NW_AF_INET 2
#define NW_AF_INET6 10

/* Addresses are 16 bytes everywhere: IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d), as in lb.h.
 * The source is tracepoint args (the ctx): copied with bpf_probe_read_kernel, because clang may
 * turn a plain memcpy into loads through a modified ctx pointer, which the verifier rejects. */
static __always_inline void nw_addr_v4(__u32 *dst, const __u8 *v4)
{
	dst[0] = 0;
	dst[1] = 0;
	dst[2] = __builtin_bswap32(0x0000ffff);
	bpf_probe_read_kernel(&dst[3], 4, v4);
}

static __always_inline void nw_addr_v6(__u32 *dst, const __u8 *v6)
{
	bpf_probe_read_kernel(dst, 16, v6);
}

#endif /* NODEWIRE_OBS_H */
