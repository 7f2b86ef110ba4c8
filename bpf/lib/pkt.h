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
#include <uapi/linux/pkt_cls.h>

#define NW_ETH_LEN 14
#define NW_AF_INET 2
#define NW_AF_INET6 10
#define NW_IP_MF 0x2000
#define NW_IP_OFFMASK 0x1fff

struct pkt {
	__u32 src[4];
	__u32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;   /* 4 or 6 */
	__u8 tcp_flags;
	__u8 pad;
	__u32 l4off;
};

#define NW_TCP_FIN 0x01
#define NW_TCP_SYN 0x02
#define NW_TCP_RST 0x04
#define NW_TCP_ACK 0x10

/* 0: a TCP or UDP packet we may handle, *p filled in; -1: anything else (left alone). */
static __always_inline int pkt_parse(struct __sk_buff *skb, struct pkt *p)
{
	__u8 l4[4];
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, NW_ETH_LEN, &ip, sizeof(ip)))
			return -1;
		if (ip.ihl < 5 || (ip.frag_off & bpf_htons(NW_IP_MF | NW_IP_OFFMASK)))
			return -1;  /* fragments go to the stack untouched */
		p->family = 4;
		p->proto = ip.protocol;
		p->src[0] = p->src[1] = p->dst[0] = p->dst[1] = 0;
		p->src[2] = p->dst[2] = __builtin_bswap32(0x0000ffff);
		p->src[3] = ip.saddr;
		p->dst[3] = ip.daddr;
		p->l4off = NW_ETH_LEN + ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, NW_ETH_LEN, &ip6, sizeof(ip6)))
			return -1;
		p->family = 6;
		p->proto = ip6.nexthdr;  /* extension headers are not followed */
		__builtin_memcpy(p->src, &ip6.saddr, 16);
		__builtin_memcpy(p->dst, &ip6.daddr, 16);
		p->l4off = NW_ETH_LEN + sizeof(struct ipv6hdr);
	} else {
		return -1;
	}
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return -1;
	if (bpf_skb_load_bytes(skb, p->l4off, l4, 4))  /* a short UDP datagram has only 8 + n bytes */
		return -1;
	__builtin_memcpy(&p->sport, &l4[0], 2);
	__builtin_memcpy(&p->dport, &l4[2], 2);
	p->tcp_flags = 0;
	if (p->proto == IPPROTO_TCP && bpf_skb_load_bytes(skb, p->l4off + 13, &p->tcp_flags, 1))
		return -1;
	return 0;
}

static __always_inline __u32 pkt_csum_off(struct pkt *p)
{
	return p->l4off + (p->proto == IPPROTO_TCP ? 16 : 6);
}

/* Rewrite the source (is_dst = 0) or destination address, fixing the L3 and L4 checksums. */
static __always_inline int pkt_set_addr(struct __sk_buff *skb, struct pkt *p, int is_dst, const __u32 *addr)
{
	__u32 *cur = is_dst ? p->dst : p->src;
	__u64 l4f = BPF_F_PSEUDO_HDR | (p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
	if (p->family == 4) {
		__be32 old = cur[3], new = addr[3];
		__u32 off = NW_ETH_LEN + (is_dst ? 16 : 12);
		if (bpf_l4_csum_replace(skb, pkt_csum_off(p), old, new, l4f | 4) ||
		    bpf_l3_csum_replace(skb, NW_ETH_LEN + 10, old, new, 4) ||
		    bpf_skb_store_bytes(skb, off, &new, 4, 0))
			return -1;
	} else {
		__u32 new[4] = {addr[0], addr[1], addr[2], addr[3]};
		__u32 old[4] = {cur[0], cur[1], cur[2], cur[3]};
		__u32 off = NW_ETH_LEN + (is_dst ? 24 : 8);
		__s64 diff = bpf_csum_diff(old, 16, new, 16, 0);
		if (bpf_l4_csum_replace(skb, pkt_csum_off(p), 0, diff, l4f) ||
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
	if (*cur == port)
		return 0;
	if (bpf_l4_csum_replace(skb, pkt_csum_off(p), *cur, port, l4f | 2) ||
	    bpf_skb_store_bytes(skb, p->l4off + (is_dst ? 2 : 0), &port, 2, 0))
		return -1;
	*cur = port;
	return 0;
}

/* BCC 0.26's helpers.h may predate bpf_redirect_neigh (5.10): the id comes from the uapi enum. */
static long (*nw_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

/* Send a rewritten packet out of the device the node routes its new destination through: the
 * kernel would drop it as a martian (its source is now a local address) if it went up the stack. */
static __always_inline int pkt_route_out(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_fib_lookup fib = {};
	fib.ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	fib.l4_protocol = p->proto;
	fib.sport = p->sport;
	fib.dport = p->dport;
	if (p->family == 4) {
		fib.family = NW_AF_INET;
		fib.ipv4_src = p->src[3];
		fib.ipv4_dst = p->dst[3];
	} else {
		fib.family = NW_AF_INET6;
		__builtin_memcpy(fib.ipv6_src, p->src, 16);
		__builtin_memcpy(fib.ipv6_dst, p->dst, 16);
	}
	int r = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (r == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) || bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(fib.ifindex, 0);
	}
	if (r == BPF_FIB_LKUP_RET_NO_NEIGH)
		return nw_redirect_neigh(fib.ifindex, 0, 0, 0);
	return TC_ACT_SHOT;
}

#endif /* NODEWIRE_PKT_H */
