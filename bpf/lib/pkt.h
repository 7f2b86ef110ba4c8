/* Packet parsing and in-place rewriting for the tc programs (IPv4 and IPv6 over Ethernet).
 *
 * Headers are copied to the stack with bpf_skb_load_bytes and written back with
 * bpf_skb_store_bytes: no packet pointers survive a rewrite, which keeps the verifier simple.
 * Addresses are 16 bytes, IPv4 stored as IPv4-mapped IPv6, like the service maps (lib/lb.h).
 * Only uapi structs are used.
 */
#ifndef NODEWIRE_PKT_H
#define NODEWIRE_PKT_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/pkt_cls.h>

#define NW_ETH_LEN 14
#define NW_AF_INET 2
#define NW_AF_INET6 10
#define NW_IP_DF 0x4000
#define NW_IP_MF 0x2000
#define NW_IP_OFFMASK 0x1fff
/* IPv6 extension headers followed before giving a packet up (RFC 8200 section 4.1 lists the order;
 * hop-by-hop, routing, fragment, destination options and AH cover what a NodePort flow may carry). */
#define NW_IPV6_EXT_MAX 4

/* pkt_parse's answers */
#define NW_PKT_L4 0              /* TCP or UDP, ports known: ours to look up */
#define NW_PKT_ICMP_ERR 1        /* an ICMP / ICMPv6 error (lib/icmp.h): p->l4off is its header */
#define NW_PKT_OTHER (-1)        /* anything else: left alone */
#define NW_PKT_UNTRANSLATABLE (-2) /* TCP/UDP we cannot rewrite safely: counted, left to the stack */

/* struct pkt.flags */
#define NW_PKT_F_FRAG 1   /* one fragment of a datagram (IPv4 MF or offset, IPv6 fragment header) */
#define NW_PKT_F_LATER 2  /* a fragment after the first: no L4 header here, ports from lib/frag.h */

struct pkt {
	__u32 src[4];
	__u32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;   /* 4 or 6 */
	__u8 tcp_flags;
	__u8 flags;    /* NW_PKT_F_* */
	__u32 l4off;
	__u32 frag_id; /* IPv4 identification or IPv6 fragment header identification (NW_PKT_F_FRAG) */
};

#define NW_TCP_FIN 0x01
#define NW_TCP_SYN 0x02
#define NW_TCP_RST 0x04
#define NW_TCP_ACK 0x10

static __always_inline int pkt_is_icmp(__u8 proto)
{
	return proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
}

/* Walk the IPv6 extension headers from *off (just past the fixed header, nexthdr *nh) to the
 * upper-layer header. Fragment header: flags and id into p. A routing header with segments left
 * means the destination is not final: not translatable (Cilium and netfilter leave it too).
 * 0: *nh is the upper-layer protocol at *off; NW_PKT_UNTRANSLATABLE otherwise. */
static __always_inline int pkt_ipv6_ext(struct __sk_buff *skb, struct pkt *p, __u32 *off, __u8 *nh)
{
#pragma unroll
	for (int i = 0; i < NW_IPV6_EXT_MAX; i++) {
		__u8 h[8];
		if (*nh != IPPROTO_HOPOPTS && *nh != IPPROTO_ROUTING && *nh != IPPROTO_FRAGMENT &&
		    *nh != IPPROTO_DSTOPTS && *nh != IPPROTO_AH)
			return 0;
		if (bpf_skb_load_bytes(skb, *off, h, 8))
			return NW_PKT_UNTRANSLATABLE;
		if (*nh == IPPROTO_FRAGMENT) {  /* RFC 8200 4.5: offset in 8-byte units, M flag, 32-bit id */
			__u16 fo = ((__u16)h[2] << 8) | h[3];
			if (fo & 0xfff9) {  /* offset or M: a real fragment (not an atomic one) */
				p->flags |= NW_PKT_F_FRAG | ((fo & 0xfff8) ? NW_PKT_F_LATER : 0);
				__builtin_memcpy(&p->frag_id, &h[4], 4);
			}
			*off += 8;
		} else if (*nh == IPPROTO_AH) {
			*off += ((__u32)h[1] + 2) * 4;  /* RFC 4302: length in 4-byte units, minus 2 */
		} else {
			if (*nh == IPPROTO_ROUTING && h[3])
				return NW_PKT_UNTRANSLATABLE;
			*off += ((__u32)h[1] + 1) * 8;
		}
		*nh = h[0];
	}
	return NW_PKT_UNTRANSLATABLE;  /* more headers than we follow */
}

/* The IP header(s) at off: family, addresses, protocol, L4 offset, fragment state. */
static __always_inline int pkt_parse_ip(struct __sk_buff *skb, struct pkt *p, __u32 off, int v6)
{
	if (!v6) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) || ip.ihl < 5 || ip.version != 4)
			return NW_PKT_OTHER;
		p->family = 4;
		p->proto = ip.protocol;
		p->src[0] = p->src[1] = p->dst[0] = p->dst[1] = 0;
		p->src[2] = p->dst[2] = __builtin_bswap32(0x0000ffff);
		p->src[3] = ip.saddr;
		p->dst[3] = ip.daddr;
		p->l4off = off + ip.ihl * 4;
		if (ip.frag_off & bpf_htons(NW_IP_MF | NW_IP_OFFMASK)) {
			p->flags |= NW_PKT_F_FRAG | ((ip.frag_off & bpf_htons(NW_IP_OFFMASK)) ? NW_PKT_F_LATER : 0);
			p->frag_id = ip.id;
		}
		return 0;
	}
	struct ipv6hdr ip6;
	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) || ip6.version != 6)
		return NW_PKT_OTHER;
	p->family = 6;
	__builtin_memcpy(p->src, &ip6.saddr, 16);
	__builtin_memcpy(p->dst, &ip6.daddr, 16);
	__u32 l4 = off + sizeof(struct ipv6hdr);
	__u8 nh = ip6.nexthdr;
	int r = pkt_ipv6_ext(skb, p, &l4, &nh);
	p->l4off = l4;
	p->proto = nh;
	return r;
}

/* The ports (and TCP flags) at p->l4off, unless this is a later fragment (no L4 header). */
static __always_inline int pkt_parse_ports(struct __sk_buff *skb, struct pkt *p)
{
	__u8 l4[4];
	p->tcp_flags = 0;
	if (p->flags & NW_PKT_F_LATER)
		return 0;
	if (bpf_skb_load_bytes(skb, p->l4off, l4, 4))  /* a short UDP datagram has only 8 + n bytes */
		return -1;
	__builtin_memcpy(&p->sport, &l4[0], 2);
	__builtin_memcpy(&p->dport, &l4[2], 2);
	if (p->proto == IPPROTO_TCP && bpf_skb_load_bytes(skb, p->l4off + 13, &p->tcp_flags, 1))
		return -1;
	return 0;
}

/* NW_PKT_L4 with *p filled in (a later fragment's ports are still 0: lib/frag.h fills them),
 * NW_PKT_ICMP_ERR, NW_PKT_OTHER or NW_PKT_UNTRANSLATABLE. */
static __always_inline int pkt_parse(struct __sk_buff *skb, struct pkt *p)
{
	int v6 = skb->protocol == bpf_htons(ETH_P_IPV6);
	if (!v6 && skb->protocol != bpf_htons(ETH_P_IP))
		return NW_PKT_OTHER;
	int r = pkt_parse_ip(skb, p, NW_ETH_LEN, v6);
	if (r)
		return r;  /* not IP, or IPv6 headers we do not follow (to the stack, counted) */
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP) {
		if (p->proto == (v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP) && !(p->flags & NW_PKT_F_FRAG))
			return NW_PKT_ICMP_ERR;  /* lib/icmp.h tells errors from the rest */
		return NW_PKT_OTHER;
	}
	if (pkt_parse_ports(skb, p))
		return NW_PKT_OTHER;
	return NW_PKT_L4;
}

static __always_inline __u32 pkt_csum_off(struct pkt *p)
{
	if (pkt_is_icmp(p->proto))
		return p->l4off + 2;
	return p->l4off + (p->proto == IPPROTO_TCP ? 16 : 6);
}

/* Rewrite the source (is_dst = 0) or destination address, fixing the L3 and L4 checksums. The L4
 * checksum covers the addresses through the pseudo-header (TCP, UDP, ICMPv6; not ICMP) and is
 * only in the first fragment, where it stands for the whole datagram. */
static __always_inline int pkt_set_addr(struct __sk_buff *skb, struct pkt *p, int is_dst, const __u32 *addr)
{
	__u32 *cur = is_dst ? p->dst : p->src;
	__u64 l4f = BPF_F_PSEUDO_HDR | (p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
	if (p->family == 4) {
		__be32 old = cur[3], new = addr[3];
		__u32 off = NW_ETH_LEN + (is_dst ? 16 : 12);
		int l4 = !(p->flags & NW_PKT_F_LATER) && p->proto != IPPROTO_ICMP;
		if ((l4 && bpf_l4_csum_replace(skb, pkt_csum_off(p), old, new, l4f | 4)) ||
		    bpf_l3_csum_replace(skb, NW_ETH_LEN + 10, old, new, 4) ||
		    bpf_skb_store_bytes(skb, off, &new, 4, 0))
			return -1;
	} else {
		__u32 new[4] = {addr[0], addr[1], addr[2], addr[3]};
		__u32 old[4] = {cur[0], cur[1], cur[2], cur[3]};
		__u32 off = NW_ETH_LEN + (is_dst ? 24 : 8);
		__s64 diff = bpf_csum_diff(old, 16, new, 16, 0);
		if ((!(p->flags & NW_PKT_F_LATER) && bpf_l4_csum_replace(skb, pkt_csum_off(p), 0, diff, l4f)) ||
		    bpf_skb_store_bytes(skb, off, new, 16, 0))
			return -1;
	}
	cur[0] = addr[0]; cur[1] = addr[1]; cur[2] = addr[2]; cur[3] = addr[3];
	return 0;
}

static __always_inline int pkt_set_port(struct __sk_buff *skb, struct pkt *p, int is_dst, __be16 port)
{
	__be16 *cur = is_dst ? &p->dport : &p->sport;
	__u64 l4f = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	if (*cur == port || (p->flags & NW_PKT_F_LATER)) {  /* a later fragment carries no ports */
		*cur = port;
		return 0;
	}
	if (bpf_l4_csum_replace(skb, pkt_csum_off(p), *cur, port, l4f | 2) ||
	    bpf_skb_store_bytes(skb, p->l4off + (is_dst ? 2 : 0), &port, 2, 0))
		return -1;
	*cur = port;
	return 0;
}

/* BCC 0.26's helpers.h may predate bpf_redirect_neigh (5.10): the id comes from the uapi enum. */
static long (*nw_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

/* The length the route's MTU is checked against: the IP packet, or one segment of it when the
 * packet is a GSO aggregate (what the kernel's forwarding path checks, skb_gso_validate_network_len). */
static __always_inline __u16 pkt_l3_len(struct __sk_buff *skb, struct pkt *p)
{
	__u32 len = skb->len - NW_ETH_LEN;
	if (skb->gso_size && !(p->flags & NW_PKT_F_LATER)) {
		__u32 l4hdr = 8;
		if (p->proto == IPPROTO_TCP) {
			__u8 doff = 0;
			bpf_skb_load_bytes(skb, p->l4off + 12, &doff, 1);
			l4hdr = (doff >> 4) * 4;
		}
		__u32 seg = p->l4off - NW_ETH_LEN + l4hdr + skb->gso_size;
		if (seg < len)
			len = seg;
	}
	return len > 0xffff ? 0xffff : len;
}

/* bpf_fib_lookup's 64-byte parameters live here, not on the tc programs' 512-byte stack (softirq
 * context: one program at a time per CPU, so one slot per CPU is enough). Zeroed for each use. */
BPF_PERCPU_ARRAY(nodewire_np_fib, struct bpf_fib_lookup, 1);

static __always_inline struct bpf_fib_lookup *pkt_fib_params(void)
{
	__u32 zero = 0;
	struct bpf_fib_lookup *fib = nodewire_np_fib.lookup(&zero);
	if (fib)
		__builtin_memset(fib, 0, sizeof(*fib));
	return fib;
}

/* Look up the route for the packet as it will be once rewritten (source src:sport, destination
 * dst:dport). With check_mtu its length is checked against the route's MTU (a route `mtu` or the
 * device's); without, the kernel checks it against the device's only. Returns the bpf_fib_lookup
 * result: BPF_FIB_LKUP_RET_FRAG_NEEDED leaves the MTU in mtu_result (include/uapi/linux/bpf.h). */
static __always_inline int pkt_fib(struct __sk_buff *skb, struct pkt *p, const __u32 *src, const __u32 *dst,
				   __be16 sport, __be16 dport, int check_mtu, struct bpf_fib_lookup *fib)
{
	fib->ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	fib->l4_protocol = p->proto;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = check_mtu ? pkt_l3_len(skb, p) : 0;
	if (p->family == 4) {
		fib->family = NW_AF_INET;
		fib->ipv4_src = src[3];
		fib->ipv4_dst = dst[3];
	} else {
		fib->family = NW_AF_INET6;
		__builtin_memcpy(fib->ipv6_src, src, 16);
		__builtin_memcpy(fib->ipv6_dst, dst, 16);
	}
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

/* Send the (rewritten) packet out of the device pkt_fib found: the kernel would drop it as a
 * martian (its source is now a local address) if it went up the stack. */
static __always_inline int pkt_fib_out(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int r)
{
	if (r == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib->dmac, 6, 0) || bpf_skb_store_bytes(skb, 6, fib->smac, 6, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(fib->ifindex, 0);
	}
	if (r == BPF_FIB_LKUP_RET_NO_NEIGH)
		return nw_redirect_neigh(fib->ifindex, 0, 0, 0);
	return TC_ACT_SHOT;
}

/* Route an already rewritten packet out. Callers that can answer a too-big packet call pkt_fib
 * with check_mtu before rewriting instead, so the ICMP quotes the packet as its sender sent it. */
static __always_inline int pkt_route_out(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_fib_lookup *fib = pkt_fib_params();
	if (!fib)
		return TC_ACT_SHOT;
	return pkt_fib_out(skb, fib, pkt_fib(skb, p, p->src, p->dst, p->sport, p->dport, 0, fib));
}

#endif /* NODEWIRE_PKT_H */
