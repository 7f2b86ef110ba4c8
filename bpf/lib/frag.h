/* Fragments of north-south flows: the ports of a fragmented datagram are only in its first
 * fragment, so the first one's ports are remembered under (source, destination, protocol, IP ID)
 * and the later ones take them from there (Cilium's IPv4 fragment map, cilium_ipv4_frag_datagrams,
 * does the same; here IPv6's fragment header identification too). With the ports known, a fragment
 * takes its flow's path: addresses rewritten in every fragment, ports and the L4 checksum (which
 * covers the whole datagram) in the first only (pkt.h). A later fragment whose first one was not
 * seen (reordered, lost) cannot be placed: counted and left to the stack, never guessed at.
 *
 * Map (per program, not pinned: a datagram's fragments arrive within milliseconds and a reload
 * losing them costs one datagram):
 *   nodewire_np_frag_v1   (src, dst, proto, id) -> first fragment's ports   [LRU]
 * Needs pkt.h.
 */
#ifndef NODEWIRE_FRAG_H
#define NODEWIRE_FRAG_H

#ifndef NW_FRAG_MAX
#define NW_FRAG_MAX 8192
#endif

struct frag_key {
	__u32 src[4];
	__u32 dst[4];
	__u32 id;
	__u8 proto;
	__u8 pad[3];
};

struct frag_ports {
	__be16 sport;
	__be16 dport;
};

BPF_TABLE("lru_hash", struct frag_key, struct frag_ports, nodewire_np_frag_v1, NW_FRAG_MAX);

/* For a fragment (p->flags & NW_PKT_F_FRAG): remember the first one's ports, or fill a later
 * one's. 0: p->sport/dport are the datagram's; -1: a later fragment of a datagram not seen. */
static __always_inline int frag_ports(struct pkt *p)
{
	struct frag_key k = {};
	__builtin_memcpy(k.src, p->src, 16);
	__builtin_memcpy(k.dst, p->dst, 16);
	k.id = p->frag_id;
	k.proto = p->proto;
	if (!(p->flags & NW_PKT_F_LATER)) {
		struct frag_ports v = {.sport = p->sport, .dport = p->dport};
		nodewire_np_frag_v1.update(&k, &v);
		return 0;
	}
	struct frag_ports *v = nodewire_np_frag_v1.lookup(&k);
	if (!v)
		return -1;
	p->sport = v->sport;
	p->dport = v->dport;
	return 0;
}

#endif /* NODEWIRE_FRAG_H */
