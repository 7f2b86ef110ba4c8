/* Shared pieces of the observability programs: the log2 histogram slot and address helpers.
 *
 * Histogram slots are upper-inclusive powers of two, the same convention as an OpenTelemetry
 * explicit-bucket histogram: slot s counts values v with 2^(s-1) < v <= 2^s (slot 0: v <= 1).
 * User space exports slot s as the bucket with upper bound 2^s, so bucket counts pass through
 * unchanged. (bcc's bpf_log2l() numbers slots from floor(log2 v)+1, lower-inclusive; we need the
 * upper-inclusive form, hence our own.)
 */
#ifndef NODEWIRE_OBS_H
#define NODEWIRE_OBS_H

#define NW_HIST_SLOTS 28          /* bounds up to 2^26 us = 67 s (connect gives up after ~127 s), then +Inf */

#define NW_AF_INET 2
#define NW_AF_INET6 10

static __always_inline __u32 nw_floor_log2(__u64 v)
{
	__u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r;
}

static __always_inline __u32 nw_hist_slot(__u64 v)
{
	if (v <= 1)
		return 0;
	__u32 s = nw_floor_log2(v - 1) + 1;
	return s < NW_HIST_SLOTS ? s : NW_HIST_SLOTS - 1;
}

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
