/* Reject a packet to a Service with no endpoint, as kube-proxy's REJECT rules do (its
 * KUBE-EXTERNAL-SERVICES "has no endpoints" rules, proxier.go): TCP gets a RST, UDP an ICMP (v6)
 * port-unreachable. The reply is made in place from the offending packet and sent back out of the
 * device it came in on. Needs pkt.h.
 */
#ifndef NODEWIRE_REJECT_H
#define NODEWIRE_REJECT_H

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 c = (__u32)sum;
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)~c;
}

static __always_inline int swap_macs(struct __sk_buff *skb)
{
	__u8 mac[12];
	if (bpf_skb_load_bytes(skb, 0, mac, 12))
		return -1;
	if (bpf_skb_store_bytes(skb, 0, &mac[6], 6, 0) || bpf_skb_store_bytes(skb, 6, &mac[0], 6, 0))
		return -1;
	return 0;
}

struct pseudo6 {
	__u32 src[4];
	__u32 dst[4];
	__be32 len;
	__u8 zero[3];
	__u8 next;
};

/* A fresh outer IP header for a reply of l4len bytes of protocol proto; *sum gets the L4
 * pseudo-header sum (v6 always; v4 only for TCP, ICMP has none). Writes it at NW_ETH_LEN. */
static __always_inline int reply_ip(struct __sk_buff *skb, struct pkt *p, __u8 proto, __u16 l4len, __s64 *sum)
{
	if (p->family == 4) {
		struct iphdr ip = {};
		ip.version = 4;
		ip.ihl = 5;
		ip.tot_len = bpf_htons(sizeof(ip) + l4len);
		ip.ttl = 64;
		ip.protocol = proto;
		ip.saddr = p->dst[3];
		ip.daddr = p->src[3];
		ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0));
		__u32 pseudo[3] = {p->dst[3], p->src[3], bpf_htonl(((__u32)proto << 16) | l4len)};
		*sum = proto == IPPROTO_TCP ? bpf_csum_diff(0, 0, pseudo, sizeof(pseudo), 0) : 0;
		return bpf_skb_store_bytes(skb, NW_ETH_LEN, &ip, sizeof(ip), 0);
	}
	struct ipv6hdr ip6 = {};
	ip6.version = 6;
	ip6.payload_len = bpf_htons(l4len);
	ip6.nexthdr = proto;
	ip6.hop_limit = 64;
	__builtin_memcpy(&ip6.saddr, p->dst, 16);
	__builtin_memcpy(&ip6.daddr, p->src, 16);
	struct pseudo6 ph = {};
	__builtin_memcpy(ph.src, p->dst, 16);
	__builtin_memcpy(ph.dst, p->src, 16);
	ph.len = bpf_htonl(l4len);
	ph.next = proto;
	*sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	return bpf_skb_store_bytes(skb, NW_ETH_LEN, &ip6, sizeof(ip6), 0);
}

static __always_inline __u32 ip_len(struct pkt *p)
{
	return p->family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
}

static __always_inline int reject_tcp(struct __sk_buff *skb, struct pkt *p)
{
	struct tcphdr th;
	if (p->l4off != NW_ETH_LEN + ip_len(p) || bpf_skb_load_bytes(skb, p->l4off, &th, sizeof(th)))
		return TC_ACT_SHOT;
	if (th.rst)
		return TC_ACT_SHOT;
	__u32 seg = skb->len - p->l4off - th.doff * 4 + th.syn + th.fin;
	struct tcphdr rst = {};
	rst.source = th.dest;
	rst.dest = th.source;
	rst.doff = 5;
	rst.rst = 1;
	if (th.ack) {
		rst.seq = th.ack_seq;
	} else {
		rst.ack = 1;
		rst.ack_seq = bpf_htonl(bpf_ntohl(th.seq) + seg);
	}
	if (bpf_skb_change_tail(skb, p->l4off + sizeof(rst), 0))
		return TC_ACT_SHOT;
	__s64 sum = 0;
	if (reply_ip(skb, p, IPPROTO_TCP, sizeof(rst), &sum))
		return TC_ACT_SHOT;
	rst.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&rst, sizeof(rst), sum));
	if (bpf_skb_store_bytes(skb, p->l4off, &rst, sizeof(rst), 0) || swap_macs(skb))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* What an ICMP error quotes: the offending packet's IP header (with IPv4 options / IPv6 extension
 * headers) and the first 8 bytes after it, the minimum RFC 792 and RFC 4443 ask for; every stack
 * finds the flow's ports there (and TCP its sequence number). A TCP header is quoted whole (20
 * bytes): the kernel will not trim a packet whose checksum is still to be filled in
 * (CHECKSUM_PARTIAL, a local sender's) to before its checksum field. 128 bytes cover 60 + 20
 * (IPv4) and 40 + 60 of extension headers + 20 (IPv6). On a veth such a packet keeps
 * CHECKSUM_PARTIAL, which its receiver takes as verified; packets from a NIC never have it. */
#define NW_QUOTE_MAX 128

struct icmp_quote_buf {
	__u8 b[NW_QUOTE_MAX];
};
/* scratch for the quote: the tc programs' 512-byte stack is spoken for */
BPF_PERCPU_ARRAY(nodewire_np_quote, struct icmp_quote_buf, 1);

/* Turn the packet into an ICMP (v6) error of type/code back to its sender, from the address it
 * was sent to, out of the device it came in on. info: the 4 bytes after the checksum (big endian:
 * next-hop MTU for frag-needed, MTU for packet-too-big, else 0). */
static __always_inline int icmp_reply(struct __sk_buff *skb, struct pkt *p, __u8 type, __u8 code, __be32 info)
{
	__u32 zero = 0;
	struct icmp_quote_buf *buf = nodewire_np_quote.lookup(&zero);
	__u64 l4q = p->proto == IPPROTO_TCP && !(p->flags & NW_PKT_F_LATER) ? 20 : 8;
	__u64 qlen = (__u64)p->l4off - NW_ETH_LEN + l4q;  /* 64-bit: the verifier keeps its bounds */
	if (!buf || qlen > NW_QUOTE_MAX || qlen < 28 || skb->len < NW_ETH_LEN + qlen)
		return TC_ACT_SHOT;
	__u8 *quote = buf->b;
	if (bpf_skb_load_bytes(skb, NW_ETH_LEN, quote, qlen))
		return TC_ACT_SHOT;
	/* keep the quote, then open room for the new IP + ICMP headers in front of it */
	if (bpf_skb_change_tail(skb, NW_ETH_LEN + qlen, 0) ||
	    bpf_skb_adjust_room(skb, ip_len(p) + 8, BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;
	__u8 icmp_proto = p->family == 4 ? IPPROTO_ICMP : IPPROTO_ICMPV6;
	__s64 sum = 0;
	if (reply_ip(skb, p, icmp_proto, 8 + qlen, &sum))
		return TC_ACT_SHOT;
	__u8 icmp[8] = {type, code};
	__builtin_memcpy(&icmp[4], &info, 4);
	sum = bpf_csum_diff(0, 0, (__be32 *)icmp, 8, sum);
	sum = bpf_csum_diff(0, 0, (__be32 *)quote, qlen, sum);
	__u16 c = csum_fold(sum);
	__builtin_memcpy(&icmp[2], &c, 2);
	if (bpf_skb_store_bytes(skb, NW_ETH_LEN + ip_len(p), icmp, 8, 0) || swap_macs(skb))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* ICMP destination unreachable / port unreachable (v4: type 3 code 3; v6: type 1 code 4). */
static __always_inline int reject_udp(struct __sk_buff *skb, struct pkt *p)
{
	return p->family == 4 ? icmp_reply(skb, p, 3, 3, 0) : icmp_reply(skb, p, 1, 4, 0);
}

/* A later fragment is dropped: the first one is answered, and this one has no header to answer. */
static __always_inline int reject(struct __sk_buff *skb, struct pkt *p)
{
	if (p->flags & NW_PKT_F_LATER)
		return TC_ACT_SHOT;
	return p->proto == IPPROTO_TCP ? reject_tcp(skb, p) : reject_udp(skb, p);
}

#endif /* NODEWIRE_REJECT_H */
