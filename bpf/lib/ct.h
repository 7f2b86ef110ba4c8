/* BPF conntrack for north-south traffic: one LRU map, two entries per flow.
 *
 *   forward  (client, client port, frontend, frontend port, proto, dir 0)
 *            -> backend, backend port, SNAT address/port (zero: none), backend id
 *   reverse  (backend, backend port, peer, peer port, proto, dir 1)
 *            -> frontend, frontend port, client, client port
 * The peer of the reverse entry is the client (no SNAT: the reply's destination) or the node's
 * SNAT address and allocated port. LRU eviction ages flows out; the map is pinned, so flows keep
 * their backend across an agent restart (Cilium's cilium_ct4_global / ct6 play the same part).
 */
#ifndef NODEWIRE_CT_H
#define NODEWIRE_CT_H

#ifndef NW_CT_MAX
#define NW_CT_MAX 262144
#endif
/* SNAT source ports: above Linux's default ip_local_port_range (32768-60999,
 * Documentation/networking/ip-sysctl.rst), so node sockets' ephemeral ports never meet them. */
#ifndef NW_SNAT_PORT_MIN
#define NW_SNAT_PORT_MIN 61000
#endif
#ifndef NW_SNAT_PORT_MAX
#define NW_SNAT_PORT_MAX 65535
#endif
#define NW_SNAT_TRIES 32

#define NW_CT_FORWARD 0
#define NW_CT_REVERSE 1
#define NW_CT_F_SNAT 1

struct ct_key {
	__u32 a[4];
	__u32 b[4];
	__be16 aport;
	__be16 bport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

struct ct_entry {
	__u32 x[4];      /* forward: backend;        reverse: frontend */
	__u32 y[4];      /* forward: SNAT address;   reverse: client */
	__be16 xport;
	__be16 yport;
	__u32 backend_id;
	__u32 flags;
	__u32 pad;
};

BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry, nodewire_ct_v1, NW_CT_MAX,
		 NW_PIN_DIR "/nodewire_ct_v1");

static __always_inline void ct_key_of(struct ct_key *k, struct pkt *p, __u8 dir)
{
	__builtin_memcpy(k->a, p->src, 16);
	__builtin_memcpy(k->b, p->dst, 16);
	k->aport = p->sport;
	k->bport = p->dport;
	k->proto = p->proto;
	k->dir = dir;
	k->pad = 0;
}

static __always_inline struct ct_entry *ct_lookup(struct pkt *p, __u8 dir)
{
	struct ct_key k = {};
	ct_key_of(&k, p, dir);
	return nodewire_ct_v1.lookup(&k);
}

/* Record a new flow. With snat, picks a source port of snat_addr nobody uses toward this backend:
 * the reverse entry is inserted with BPF_NOEXIST, so two flows can never share it. Returns the
 * port (network order), or 0 when no port was free / the map refused. */
static __always_inline __be16 ct_create(struct pkt *p, const __u32 *backend, __be16 bport, __u32 backend_id,
					int snat, const __u32 *snat_addr, __u32 hash)
{
	struct ct_key rk = {};
	struct ct_entry rv = {};
	__builtin_memcpy(rk.a, backend, 16);
	rk.aport = bport;
	rk.proto = p->proto;
	rk.dir = NW_CT_REVERSE;
	__builtin_memcpy(rv.x, p->dst, 16);
	rv.xport = p->dport;
	__builtin_memcpy(rv.y, p->src, 16);
	rv.yport = p->sport;
	rv.backend_id = backend_id;
	__be16 port = p->sport;
	if (snat) {
		rv.flags = NW_CT_F_SNAT;
		__builtin_memcpy(rk.b, snat_addr, 16);
		__u32 span = NW_SNAT_PORT_MAX - NW_SNAT_PORT_MIN + 1;
		port = 0;
		for (int i = 0; i < NW_SNAT_TRIES; i++) {
			__be16 cand = bpf_htons(NW_SNAT_PORT_MIN + (hash + i * 7919) % span);
			rk.bport = cand;
			if (nodewire_ct_v1.insert(&rk, &rv) == 0) {
				port = cand;
				break;
			}
		}
		if (!port)
			return 0;
	} else {
		__builtin_memcpy(rk.b, p->src, 16);
		rk.bport = p->sport;
		if (nodewire_ct_v1.update(&rk, &rv))
			return 0;
	}
	struct ct_key fk = {};
	struct ct_entry fv = {};
	ct_key_of(&fk, p, NW_CT_FORWARD);
	__builtin_memcpy(fv.x, backend, 16);
	fv.xport = bport;
	if (snat) {
		__builtin_memcpy(fv.y, snat_addr, 16);
		fv.yport = port;
		fv.flags = NW_CT_F_SNAT;
	}
	fv.backend_id = backend_id;
	if (nodewire_ct_v1.update(&fk, &fv)) {
		nodewire_ct_v1.delete(&rk);
		return 0;
	}
	return port;
}

/* A new flow from a client straight to an address:port that once was a backend of one of our flows
 * with the same client tuple (the client reused its source port): the old reverse entry is stale and
 * would rewrite this flow's replies, so it goes. Entries otherwise age out of the LRU. */
static __always_inline void ct_forget_reverse(struct pkt *p)
{
	struct ct_key k = {};
	__builtin_memcpy(k.a, p->dst, 16);
	__builtin_memcpy(k.b, p->src, 16);
	k.aport = p->dport;
	k.bport = p->sport;
	k.proto = p->proto;
	k.dir = NW_CT_REVERSE;
	nodewire_ct_v1.delete(&k);
}

#endif /* NODEWIRE_CT_H */
