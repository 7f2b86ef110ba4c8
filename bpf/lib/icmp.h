/* ICMP errors of north-south flows: translated through the NAT, and made for too-big packets.
 *
 * An ICMP / ICMPv6 error (destination unreachable incl. fragmentation needed, packet too big, time
 * exceeded, parameter problem) quotes the packet that caused it as its sender sent it. When that
 * quoted packet belongs to one of our flows, the error is rewritten the way netfilter's
 * nf_nat_icmp_reply_translation does: the quoted packet gets the addresses and ports the receiver
 * of the error used, the outer header is addressed to that receiver (and comes from the frontend
 * when the backend sent it). Checksums are updated incrementally: the quoted IPv4 header's, the
 * quoted TCP/UDP checksum when it is in the quote, and the ICMP checksum over all of it (the
 * ICMPv6 one also over the outer addresses, its pseudo-header: RFC 4443 2.3).
 *
 *   ingress, quote = SNAT address -> remote backend   (error from the backend's side, SNATed flow)
 *            -> to the client, quote = client -> frontend
 *   ingress, quote = frontend -> client               (error from the client's side, about a reply)
 *            -> to the backend, quote = backend -> client (or -> SNAT address:port)
 *   egress,  quote = client -> local backend          (error from a local backend or this node)
 *            -> quote = client -> frontend, from the frontend when the backend sent it
 * In every case the reversed quote is the key of a conntrack entry (lib/ct.h). Needs pkt.h, ct.h,
 * reject.h.
 */
#ifndef NODEWIRE_ICMP_H
#define NODEWIRE_ICMP_H

/* icmp_* answers */
#define NW_ICMP_NOT_OURS 0
#define NW_ICMP_TRANSLATED 1
#define NW_ICMP_UNTRANSLATABLE (-1)  /* ours perhaps, but the quote has no ports: left to the stack */
#define NW_ICMP_BROKEN (-2)          /* a rewrite failed half-way: dropped, never sent on half-translated */

/* RFC 792 / RFC 4443 error types whose body quotes the offending packet */
static __always_inline int icmp_is_error(__u8 family, __u8 type)
{
	if (family == 4)
		return type == 3 || type == 11 || type == 12;  /* unreachable, time exceeded, parameter problem */
	return type >= 1 && type <= 4;  /* unreachable, packet too big, time exceeded, parameter problem */
}

/* The quoted packet, parsed: its tuple in q (q.l4off absolute), where its IP header is, and where
 * its L4 checksum is when the quote holds it (0: not there, or a UDP datagram without one). */
struct icmp_quote {
	struct pkt q;
	__u32 l3off;
	__u32 l4csum;
	__u32 icsum;  /* the ICMP checksum's offset */
};

/* the parsed quote lives here, not on the stack (as pkt.h's nodewire_np_fib) */
BPF_PERCPU_ARRAY(nodewire_np_icmp, struct icmp_quote, 1);

static __always_inline int icmp_parse_quote(struct __sk_buff *skb, struct pkt *p, struct icmp_quote *iq)
{
	__u8 h[2];
	if (bpf_skb_load_bytes(skb, p->l4off, h, 2) || !icmp_is_error(p->family, h[0]))
		return NW_ICMP_NOT_OURS;
	iq->icsum = p->l4off + 2;
	iq->l3off = p->l4off + 8;
	struct pkt *q = &iq->q;
	if (pkt_parse_ip(skb, q, iq->l3off, p->family == 6) || q->family != p->family)
		return NW_ICMP_NOT_OURS;
	if (q->proto != IPPROTO_TCP && q->proto != IPPROTO_UDP)
		return NW_ICMP_NOT_OURS;
	if ((q->flags & NW_PKT_F_LATER) || pkt_parse_ports(skb, q))
		return NW_ICMP_UNTRANSLATABLE;  /* a quote without ports (a later fragment, truncated) */
	__u32 off = q->l4off + (q->proto == IPPROTO_TCP ? 16 : 6);
	__u16 c = 0;
	iq->l4csum = 0;
	if (!bpf_skb_load_bytes(skb, off, &c, 2) && (c || q->proto == IPPROTO_TCP))
		iq->l4csum = off;
	return NW_ICMP_TRANSLATED;
}

/* A checksum field inside the quote changes by (from, to, size) as bpf_l3_csum_replace takes them
 * (size 0: to is a bpf_csum_diff); the ICMP checksum, which covers the field, follows its change. */
static __always_inline int icmp_csum_inner(struct __sk_buff *skb, struct icmp_quote *iq, __u32 off,
					   __u64 from, __u64 to, __u64 size)
{
	__u16 before, after;
	if (bpf_skb_load_bytes(skb, off, &before, 2) || bpf_l3_csum_replace(skb, off, from, to, size) ||
	    bpf_skb_load_bytes(skb, off, &after, 2))
		return -1;
	return bpf_l3_csum_replace(skb, iq->icsum, before, after, 2);
}

/* Rewrite the quoted packet's source (is_dst 0) or destination address and port. */
static __always_inline int icmp_set_quoted(struct __sk_buff *skb, struct icmp_quote *iq, int is_dst,
					   const __u32 *addr, __be16 port)
{
	struct pkt *q = &iq->q;
	__u32 *cur = is_dst ? q->dst : q->src;
	__u32 old[4] = {cur[0], cur[1], cur[2], cur[3]};
	__u32 new[4] = {addr[0], addr[1], addr[2], addr[3]};
	__s64 diff;
	if (q->family == 4) {
		diff = bpf_csum_diff(&old[3], 4, &new[3], 4, 0);
		if (bpf_skb_store_bytes(skb, iq->l3off + (is_dst ? 16 : 12), &new[3], 4, 0) ||
		    icmp_csum_inner(skb, iq, iq->l3off + 10, 0, diff, 0))
			return -1;
	} else {
		diff = bpf_csum_diff(old, 16, new, 16, 0);
		if (bpf_skb_store_bytes(skb, iq->l3off + (is_dst ? 24 : 8), new, 16, 0))
			return -1;
	}
	if (bpf_l3_csum_replace(skb, iq->icsum, 0, diff, 0) ||
	    (iq->l4csum && icmp_csum_inner(skb, iq, iq->l4csum, 0, diff, 0)))
		return -1;
	__be16 *cport = is_dst ? &q->dport : &q->sport;
	if (*cport != port) {
		if (bpf_skb_store_bytes(skb, q->l4off + (is_dst ? 2 : 0), &port, 2, 0) ||
		    bpf_l3_csum_replace(skb, iq->icsum, *cport, port, 2) ||
		    (iq->l4csum && icmp_csum_inner(skb, iq, iq->l4csum, *cport, port, 2)))
			return -1;
	}
	cur[0] = addr[0]; cur[1] = addr[1]; cur[2] = addr[2]; cur[3] = addr[3];
	*cport = port;
	return 0;
}

/* The conntrack entry the quote belongs to: its reversed tuple is the key (see the header). */
/* The conntrack entry the quote belongs to, looked at only: an error is a related packet, it
 * neither refreshes nor moves its flow (lib/ct.h ct_find). Its translation is copied to *nat and
 * its flags returned; -1: none (or expired). */
static __always_inline int icmp_ct(struct icmp_quote *iq, __u8 dir, struct ct_nat *nat)
{
	struct ct_key k = {};
	ct_key_set(&k, iq->q.dst, iq->q.dport, iq->q.src, iq->q.sport, iq->q.proto, dir);
	struct ct_entry *e = ct_find(&k, 0, bpf_ktime_get_ns());
	if (!e)
		return -1;
	ct_nat_of(nat, e);
	return e->flags;
}

/* The outer source becomes the frontend when the error came from the backend itself; an error
 * from a router on the way keeps its address (traceroute through a NodePort still names hops). */
static __always_inline int icmp_outer_src(struct __sk_buff *skb, struct pkt *p, const __u32 *was, const __u32 *now)
{
	if (p->src[0] != was[0] || p->src[1] != was[1] || p->src[2] != was[2] || p->src[3] != was[3])
		return 0;
	return pkt_set_addr(skb, p, 0, now);
}

/* The scratch slot with the error's quote parsed into it; NULL when the error is not one whose quote
 * we can place (*r says why: NW_ICMP_NOT_OURS or NW_ICMP_UNTRANSLATABLE). */
static __always_inline struct icmp_quote *icmp_quote_of(struct __sk_buff *skb, struct pkt *p, int *r)
{
	__u32 zero = 0;
	struct icmp_quote *iq = nodewire_np_icmp.lookup(&zero);
	*r = NW_ICMP_NOT_OURS;
	if (!iq)
		return 0;
	__builtin_memset(iq, 0, sizeof(*iq));
	*r = icmp_parse_quote(skb, p, iq);
	return *r == NW_ICMP_TRANSLATED ? iq : 0;
}

/* An ICMP error coming in on a node device. *verdict: what to do with the packet. */
static __always_inline int icmp_ingress(struct __sk_buff *skb, struct pkt *p, int *verdict)
{
	int r;
	*verdict = TC_ACT_UNSPEC;
	struct icmp_quote *iq = icmp_quote_of(skb, p, &r);
	if (!iq)
		return r;
	__u32 backend[4];
	__builtin_memcpy(backend, iq->q.dst, 16);
	struct ct_nat n;
	int flags = icmp_ct(iq, NW_CT_REVERSE, &n);
	*verdict = TC_ACT_SHOT;  /* from here on a failed rewrite drops: never half-translated */
	if (flags >= 0 && (flags & NW_CT_F_SNAT)) {  /* about our SNATed packet to a remote backend */
		if (icmp_set_quoted(skb, iq, 0, n.y, n.yport) || icmp_set_quoted(skb, iq, 1, n.x, n.xport) ||
		    pkt_set_addr(skb, p, 1, n.y) || icmp_outer_src(skb, p, backend, n.x))
			return NW_ICMP_BROKEN;
		*verdict = pkt_route_out(skb, p);
		return NW_ICMP_TRANSLATED;
	}
	flags = icmp_ct(iq, NW_CT_FORWARD, &n);  /* about a reply we sent the client: to the backend */
	if (flags < 0) {
		*verdict = TC_ACT_UNSPEC;
		return NW_ICMP_NOT_OURS;
	}
	if (icmp_set_quoted(skb, iq, 0, n.x, n.xport) || pkt_set_addr(skb, p, 1, n.x))
		return NW_ICMP_BROKEN;
	if (!(flags & NW_CT_F_SNAT)) {
		*verdict = TC_ACT_OK;  /* a local pod: the stack routes it */
		return NW_ICMP_TRANSLATED;
	}
	if (icmp_set_quoted(skb, iq, 1, n.y, n.yport) || pkt_set_addr(skb, p, 0, n.y))
		return NW_ICMP_BROKEN;
	*verdict = pkt_route_out(skb, p);
	return NW_ICMP_TRANSLATED;
}

/* An ICMP error leaving through a node device: from a local backend (or this node on its behalf)
 * about a client's packet, to the client. */
static __always_inline int icmp_egress(struct __sk_buff *skb, struct pkt *p, int *verdict)
{
	int r;
	*verdict = TC_ACT_UNSPEC;
	struct icmp_quote *iq = icmp_quote_of(skb, p, &r);
	if (!iq)
		return r;
	struct ct_nat n;
	int flags = icmp_ct(iq, NW_CT_REVERSE, &n);
	if (flags < 0 || (flags & NW_CT_F_SNAT))
		return NW_ICMP_NOT_OURS;
	__u32 backend[4];
	__builtin_memcpy(backend, iq->q.dst, 16);
	*verdict = TC_ACT_SHOT;
	if (icmp_set_quoted(skb, iq, 1, n.x, n.xport) || icmp_outer_src(skb, p, backend, n.x))
		return NW_ICMP_BROKEN;
	*verdict = TC_ACT_OK;
	return NW_ICMP_TRANSLATED;
}

/* Path MTU (RFC 1191 / RFC 8201): the packet is bigger than the route it has to take (mtu, from
 * bpf_fib_lookup's mtu_result); its sender gets fragmentation needed (ICMP 3/4, next-hop MTU) or
 * packet too big (ICMPv6 2/0), quoting the packet as it sent it. A router would fragment an IPv4
 * packet without DF instead; tc has no helper to fragment, so it gets the same answer (Linux then
 * fragments to the new MTU itself) rather than vanish. */
static __always_inline int icmp_too_big(struct __sk_buff *skb, struct pkt *p, __u32 mtu)
{
	if (p->family == 4)
		return icmp_reply(skb, p, 3, 4, bpf_htonl(mtu < 68 ? 68 : mtu));  /* RFC 791: 68 is every link's minimum */
	return icmp_reply(skb, p, 2, 0, bpf_htonl(mtu < 1280 ? 1280 : mtu));  /* RFC 8200: 1280 minimum */
}

#endif /* NODEWIRE_ICMP_H */
