/* BPF conntrack for north-south traffic: TCP state, lifetimes, and two maps so that a flood of new
 * flows never pushes out a live one.
 *
 * Two entries per flow, both in the same map:
 *   forward  (client, client port, frontend, frontend port, proto, dir 0)
 *            -> backend, backend port, SNAT address/port (zero: none), backend id
 *   reverse  (backend, backend port, peer, peer port, proto, dir 1)
 *            -> frontend, frontend port, client, client port
 * The peer of the reverse entry is the client (no SNAT: the reply's destination) or the node's SNAT
 * address and port, so a SNAT port is unique per (SNAT address, port, backend, backend port, proto),
 * as netfilter's NAT tuples are: every backend has the whole port range.
 *
 * Maps (pinned, so flows keep their backend across an agent restart):
 *   nodewire_ct_halfopen_v2  flows not yet confirmed both ways (TCP: SYN seen, handshake not done;
 *                            UDP: no reply yet) [LRU]
 *   nodewire_ct_v2           confirmed flows [LRU]
 * A flow moves from the first to the second when the client's ACK follows the backend's SYN-ACK
 * (netfilter marks a TCP flow ASSURED there, nf_conntrack_proto_tcp.c), or, for UDP and TCP picked
 * up mid-stream, on its first reply. Only the half-open map takes new flows, so a spoofed SYN flood
 * (which never completes a handshake) evicts half-open entries only: as netfilter's early_drop drops
 * only unassured entries.
 *
 * Every entry has a state (NW_CT_S_*), the time it was last seen (bpf_ktime_get_ns, the clock
 * CLOCK_MONOTONIC reads in user space; refreshed at most every NW_CT_TOUCH_NS) and the time it expires:
 * last seen plus the lifetime of its state and protocol (NW_CT_LIFETIME_*_NS, from the agent's config;
 * a changed lifetime applies from an entry's next refresh, as Cilium's). An expired entry is absent for
 * the datapath; agent/datapath/conntrack.py removes expired entries in batches.
 *
 * API for other headers (ICMP errors, see /work/team notes): ct_key_set + ct_find look up one entry
 * by tuple without changing it; ct_lookup does it for a parsed packet.
 */
#ifndef NODEWIRE_CT_H
#define NODEWIRE_CT_H

#if !defined(NW_CT_MAX) || !defined(NW_CT_HALFOPEN_MAX) || !defined(NW_CT_LIFETIME_SYN_NS) || \
	!defined(NW_CT_LIFETIME_ESTABLISHED_NS) || !defined(NW_CT_LIFETIME_CLOSE_NS) || \
	!defined(NW_CT_LIFETIME_OTHER_NS) || !defined(NW_CT_TOUCH_NS) || !defined(NW_CT_SYN_REUSE_NS) || \
	!defined(NW_SNAT_PORT_MIN) || !defined(NW_SNAT_PORT_MAX) || !defined(NW_SNAT_ADDRS) || \
	!defined(NW_SNAT_TRIES) || !defined(NW_CT_S_SYN) || !defined(NW_CT_S_ESTABLISHED) || \
	!defined(NW_CT_S_CLOSING) || !defined(NW_CT_S_CLOSED) || !defined(NW_CT_F_SNAT) || \
	!defined(NW_CT_F_REPLIED) || !defined(NW_CT_F_SYN) || !defined(NW_CT_F_FIN_ORIG) || \
	!defined(NW_CT_F_FIN_REPLY) || !defined(NW_CT_STATS)
#error "conntrack numbers come from agent/datapath/abi.py (ct_defines)"
#endif

#define NW_CT_FORWARD 0
#define NW_CT_REVERSE 1

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
	__u64 last_seen; /* bpf_ktime_get_ns() */
	__u64 expires;   /* last_seen + the lifetime of its state then (one comparison on the hot path) */
	__u8 state;      /* NW_CT_S_* */
	__u8 flags;      /* NW_CT_F_* */
	__u16 pad;
	__u32 pad2;
};

/* The translation part of an entry, copied out before the entry may change or move. */
struct ct_nat {
	__u32 x[4];
	__u32 y[4];
	__be16 xport;
	__be16 yport;
};

static __always_inline void ct_nat_of(struct ct_nat *n, const struct ct_entry *e)
{
	__builtin_memcpy(n, e, sizeof(*n));
}

/* A node address remote-backend traffic may leave with: slots [0, NW_SNAT_ADDRS) IPv4, then IPv6;
 * the agent fills a family's slots in turn with its addresses (a zero slot: none). */
struct ct_addr {
	__u32 address[4];
};

BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry, nodewire_ct_v2, NW_CT_MAX,
		 NW_PIN_DIR "/nodewire_ct_v2");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry, nodewire_ct_halfopen_v2, NW_CT_HALFOPEN_MAX,
		 NW_PIN_DIR "/nodewire_ct_halfopen_v2");
BPF_TABLE_PINNED("array", __u32, struct ct_addr, nodewire_np_snat_v2, 2 * NW_SNAT_ADDRS,
		 NW_PIN_DIR "/nodewire_np_snat_v2");
/* counters (NW_CT_STAT_*, abi.CT_STATS); the collector adds its own into CPU 0's slots */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, nodewire_ct_stats_v2, NW_CT_STATS,
		 NW_PIN_DIR "/nodewire_ct_stats_v2");

BPF_PERCPU_ARRAY(nodewire_ct_scratch, __u32, 1);

static __always_inline void ct_count(__u32 what, __u64 n)
{
	__u64 *v = nodewire_ct_stats_v2.lookup(&what);
	if (v)
		*v += n;
}

static __always_inline __u64 ct_lifetime(__u8 state, __u8 proto)
{
	if (state == NW_CT_S_CLOSING || state == NW_CT_S_CLOSED)
		return NW_CT_LIFETIME_CLOSE_NS;
	if (proto != IPPROTO_TCP)
		return NW_CT_LIFETIME_OTHER_NS;
	return state == NW_CT_S_ESTABLISHED ? NW_CT_LIFETIME_ESTABLISHED_NS : NW_CT_LIFETIME_SYN_NS;
}

static __always_inline int ct_expired(const struct ct_entry *e, __u64 now)
{
	return now > e->expires;
}

static __always_inline void ct_key_set(struct ct_key *k, const __u32 *a, __be16 aport, const __u32 *b, __be16 bport,
				       __u8 proto, __u8 dir)
{
	__builtin_memcpy(k->a, a, 16);
	__builtin_memcpy(k->b, b, 16);
	k->aport = aport;
	k->bport = bport;
	k->proto = proto;
	k->dir = dir;
	k->pad = 0;
}

/* The live entry of k (the confirmed map first), or NULL when there is none or it expired.
 * *halfopen (may be NULL) says which map it is in. Nothing is changed: ICMP errors look up the
 * flow of their embedded packet with this. */
static __always_inline struct ct_entry *ct_find(struct ct_key *k, int *halfopen, __u64 now)
{
	int ho = 0;
	struct ct_entry *e = nodewire_ct_v2.lookup(k);
	if (!e) {
		e = nodewire_ct_halfopen_v2.lookup(k);
		ho = 1;
	}
	if (halfopen)
		*halfopen = ho;
	if (e && ct_expired(e, now))
		return 0;
	return e;
}

/* The entry of a packet's own tuple in direction dir (forward: the client's packets; reverse: a
 * backend's replies), as ct_find. */
static __always_inline struct ct_entry *ct_lookup(struct pkt *p, __u8 dir, struct ct_key *k, int *halfopen,
						  __u64 now)
{
	ct_key_set(k, p->src, p->sport, p->dst, p->dport, p->proto, dir);
	return ct_find(k, halfopen, now);
}

/* The key of the other entry of a flow (reverse from forward, forward from reverse). */
static __always_inline void ct_partner_key(struct ct_key *out, const struct ct_key *k, const struct ct_entry *e)
{
	if (k->dir == NW_CT_FORWARD) {
		if (e->flags & NW_CT_F_SNAT)
			ct_key_set(out, e->x, e->xport, e->y, e->yport, k->proto, NW_CT_REVERSE);
		else
			ct_key_set(out, e->x, e->xport, k->a, k->aport, k->proto, NW_CT_REVERSE);
	} else {
		ct_key_set(out, e->y, e->yport, e->x, e->xport, k->proto, NW_CT_FORWARD);
	}
}

static __always_inline int ct_same(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void ct_delete(struct ct_key *k, int halfopen)
{
	if (!halfopen) {
		nodewire_ct_v2.delete(k);
	} else if (nodewire_ct_halfopen_v2.delete(k) == 0) {
		ct_count(NW_CT_STAT_HALFOPEN_DELETED, 1);
	}
}

/* The state after a packet with TCP flags `tcp` (0: not TCP) in direction dir; *flags gains what
 * the packet showed. Follows netfilter's TCP states at the granularity the lifetimes need. */
static __always_inline __u8 ct_next_state(__u8 state, __u8 *flags, __u8 proto, __u8 tcp, __u8 dir)
{
	if (dir == NW_CT_REVERSE)
		*flags |= NW_CT_F_REPLIED;
	if (proto != IPPROTO_TCP)
		return state;
	if (tcp & NW_TCP_RST)
		return NW_CT_S_CLOSED;
	if (tcp & NW_TCP_FIN)
		*flags |= dir == NW_CT_FORWARD ? NW_CT_F_FIN_ORIG : NW_CT_F_FIN_REPLY;
	if ((*flags & (NW_CT_F_FIN_ORIG | NW_CT_F_FIN_REPLY)) == (NW_CT_F_FIN_ORIG | NW_CT_F_FIN_REPLY))
		return NW_CT_S_CLOSED;
	if (*flags & (NW_CT_F_FIN_ORIG | NW_CT_F_FIN_REPLY))
		return NW_CT_S_CLOSING;
	return state;
}

/* A half-open flow is confirmed: TCP begun with a SYN when the client's ACK follows a reply (the
 * handshake's third packet); UDP, or TCP picked up mid-stream, on its first reply. */
static __always_inline int ct_confirmed(__u8 flags, __u8 proto, __u8 tcp, __u8 dir)
{
	if (!(flags & NW_CT_F_REPLIED))
		return 0;
	if (proto == IPPROTO_TCP && (flags & NW_CT_F_SYN))
		return dir == NW_CT_FORWARD && (tcp & (NW_TCP_ACK | NW_TCP_SYN | NW_TCP_RST)) == NW_TCP_ACK;
	return 1;
}

/* Move a flow's two entries (keys fk and rk, entries f and r in the half-open map) to the
 * confirmed map. */
static __always_inline void ct_promote(struct ct_key *fk, struct ct_entry *f, struct ct_key *rk, struct ct_entry *r)
{
	if (nodewire_ct_v2.update(rk, r) || nodewire_ct_v2.update(fk, f))
		return;  /* stays half-open; the next packet tries again */
	ct_delete(fk, 1);
	ct_delete(rk, 1);
	ct_count(NW_CT_STAT_PROMOTED, 1);
}

/* A packet of a known flow: e is its live entry under key k (in direction k->dir), halfopen says
 * where. Checks that the flow's other entry is there and belongs to it, then moves the state on,
 * refreshes both entries' last-seen time, and confirms the flow when its time has come.
 * Returns 0, or -1 when the other entry is gone or owned by another flow (the flow is then absent:
 * balanced anew, its SNAT port perhaps taken by a newer flow). */
static __always_inline int ct_track(struct ct_key *k, struct ct_entry *e, int halfopen, __u8 tcp, __u64 now)
{
	struct ct_key pk = {};
	ct_partner_key(&pk, k, e);
	struct ct_entry *pe = halfopen ? nodewire_ct_halfopen_v2.lookup(&pk) : nodewire_ct_v2.lookup(&pk);
	if (!pe)
		return -1;
	if (k->dir == NW_CT_FORWARD) {
		if (!ct_same(pe->y, k->a) || pe->yport != k->aport)
			return -1;
	} else if (!ct_same(pe->x, k->a) || pe->xport != k->aport) {
		return -1;
	}
	__u8 flags = e->flags;
	__u8 state = ct_next_state(e->state, &flags, k->proto, tcp, k->dir);
	int promote = halfopen && state == NW_CT_S_SYN && ct_confirmed(flags, k->proto, tcp, k->dir);
	if (state == e->state && flags == e->flags && !promote && now - e->last_seen < NW_CT_TOUCH_NS)
		return 0;  /* nothing to write: most packets of a flow */
	state = promote ? NW_CT_S_ESTABLISHED : state;
	e->state = pe->state = state;
	e->flags = pe->flags = flags;
	e->last_seen = pe->last_seen = now;
	e->expires = pe->expires = now + ct_lifetime(state, k->proto);
	if (promote) {
		if (k->dir == NW_CT_FORWARD)
			ct_promote(k, e, &pk, pe);
		else
			ct_promote(&pk, pe, k, e);
	}
	return 0;
}

/* Who holds the reverse key *rk (a SNAT address and port toward a backend): 0 nobody (an expired
 * holder is deleted, counted as a port taken back), 1 a half-open flow idle for NW_CT_SYN_REUSE_NS
 * (a flood's SYN holds no port a live flow needs: taken only when no port tried is free), -1 a live
 * flow. Kept short: the verifier walks it once per try. */
static __always_inline int ct_port_holder(struct ct_key *rk, __u64 now)
{
	struct ct_entry *e = nodewire_ct_v2.lookup(rk);
	if (e) {
		if (now <= e->expires)
			return -1;
		nodewire_ct_v2.delete(rk);
		ct_count(NW_CT_STAT_SNAT_REUSED, 1);
	}
	e = nodewire_ct_halfopen_v2.lookup(rk);
	if (!e)
		return 0;
	if (now > e->expires) {
		ct_delete(rk, 1);
		ct_count(NW_CT_STAT_SNAT_REUSED, 1);
		return 0;
	}
	return e->state == NW_CT_S_SYN && now - e->last_seen > NW_CT_SYN_REUSE_NS ? 1 : -1;
}

/* Take a SNAT port of one of the node's addresses of this family toward rk's backend: rk->b/bport
 * are set to it and the reverse entry rv inserted (BPF_NOEXIST, so two flows never share one). The
 * first half of the NW_SNAT_TRIES ports tried (from hash) are of the first address, the rest spread
 * over the family's NW_SNAT_ADDRS slots (the agent fills them all, repeating its addresses). When
 * none of them is free, the first one held by an idle half-open flow is taken from it (netfilter
 * early-drops unassured entries only when its table is full).
 * 0; -1 when every port tried was held (counted); -2 when the node has no address of this family. */
static __always_inline int ct_snat_take(struct ct_key *rk, struct ct_entry *rv, __u8 family, __u32 hash, __u64 now)
{
	__u32 span = NW_SNAT_PORT_MAX - NW_SNAT_PORT_MIN + 1;
	__u32 base = family == 4 ? 0 : NW_SNAT_ADDRS;
	struct ct_addr *sa = nodewire_np_snat_v2.lookup(&base);
	if (!sa || !(sa->address[0] | sa->address[1] | sa->address[2] | sa->address[3]))
		return -2;
	/* the first try whose port an idle half-open flow holds, kept in map memory: a stack variable
	 * would make the verifier walk the loop once per value it could have */
	__u32 zero = 0;
	__u32 *idle = nodewire_ct_scratch.lookup(&zero);
	if (!idle)
		return -1;
	*idle = NW_SNAT_TRIES;
	for (__u32 i = 0; i < NW_SNAT_TRIES; i++) {
		__u32 slot = base + (i < NW_SNAT_TRIES / 2 ? 0 : i % NW_SNAT_ADDRS);
		sa = nodewire_np_snat_v2.lookup(&slot);
		if (!sa)
			break;
		__builtin_memcpy(rk->b, sa->address, 16);
		rk->bport = bpf_htons(NW_SNAT_PORT_MIN + (hash + i * 7919) % span);
		int h = ct_port_holder(rk, now);
		if (h == 0 && nodewire_ct_halfopen_v2.insert(rk, rv) == 0) {
			ct_count(NW_CT_STAT_HALFOPEN_INSERTED, 1);
			return 0;
		}
		if (h == 1 && *idle == NW_SNAT_TRIES)
			*idle = i;
	}
	__u32 j = *idle;
	if (j < NW_SNAT_TRIES) {
		__u32 slot = base + (j < NW_SNAT_TRIES / 2 ? 0 : j % NW_SNAT_ADDRS);
		sa = nodewire_np_snat_v2.lookup(&slot);
		if (sa) {
			__builtin_memcpy(rk->b, sa->address, 16);
			rk->bport = bpf_htons(NW_SNAT_PORT_MIN + (hash + j * 7919) % span);
			if (nodewire_ct_halfopen_v2.update(rk, rv) == 0) {
				ct_count(NW_CT_STAT_HALFOPEN_DELETED, 1);  /* the idle flow's entry, replaced */
				ct_count(NW_CT_STAT_HALFOPEN_INSERTED, 1);
				ct_count(NW_CT_STAT_SNAT_REUSED, 1);
				return 0;
			}
		}
	}
	ct_count(NW_CT_STAT_SNAT_EXHAUSTED, 1);
	return -1;
}

/* Delete the other entry of an old flow (forward key fk, entry old), if it still belongs to it (a
 * newer flow may have taken its SNAT port). */
static __always_inline void ct_drop_partner(struct ct_key *fk, struct ct_entry *old, int halfopen)
{
	struct ct_key rk = {};
	ct_partner_key(&rk, fk, old);
	struct ct_entry *r = halfopen ? nodewire_ct_halfopen_v2.lookup(&rk) : nodewire_ct_v2.lookup(&rk);
	if (r && ct_same(r->y, fk->a) && r->yport == fk->aport)
		ct_delete(&rk, halfopen);
}

/* Record a new flow (half-open) from packet p to backend:bport, replacing an older flow on the same
 * client tuple (its other entry goes, and with it its SNAT port). With snat, the reply path is a SNAT
 * port of a node address (ct_snat_take); snat_addr and sport get it. Returns 0, or -1 (no port free,
 * or the map refused), -2 (no node address of the family to SNAT to). */
static __always_inline int ct_create(struct pkt *p, const __u32 *backend, __be16 bport, __u32 backend_id, int snat,
				     __u32 hash, __u64 now, __u32 *snat_addr, __be16 *sport)
{
	struct ct_key fk = {};
	int old_ho = 0;
	ct_key_set(&fk, p->src, p->sport, p->dst, p->dport, p->proto, NW_CT_FORWARD);
	struct ct_entry *old = nodewire_ct_v2.lookup(&fk);
	if (!old) {
		old = nodewire_ct_halfopen_v2.lookup(&fk);
		old_ho = 1;
	}
	if (old) {
		ct_drop_partner(&fk, old, old_ho);
		if (!old_ho)
			nodewire_ct_v2.delete(&fk);
	}
	struct ct_key rk = {};
	__u8 flags = (p->proto == IPPROTO_TCP && (p->tcp_flags & NW_TCP_SYN)) ? NW_CT_F_SYN : 0;
	struct ct_entry rv = {.state = NW_CT_S_SYN, .flags = flags | (snat ? NW_CT_F_SNAT : 0), .last_seen = now,
			      .expires = now + ct_lifetime(NW_CT_S_SYN, p->proto),
			      .backend_id = backend_id, .xport = p->dport, .yport = p->sport};
	__builtin_memcpy(rv.x, p->dst, 16);
	__builtin_memcpy(rv.y, p->src, 16);
	ct_key_set(&rk, backend, bport, p->src, p->sport, p->proto, NW_CT_REVERSE);
	if (snat) {
		int r = ct_snat_take(&rk, &rv, p->family, hash, now);
		if (r)
			return r;
	} else {
		ct_delete(&rk, 1);  /* an older flow's reverse entry under this tuple */
		nodewire_ct_v2.delete(&rk);
		if (nodewire_ct_halfopen_v2.insert(&rk, &rv))
			return -1;
		ct_count(NW_CT_STAT_HALFOPEN_INSERTED, 1);
	}
	/* the forward entry, in the same stack slot (the stack is 512 bytes) */
	rv.xport = bport;
	rv.yport = 0;
	__builtin_memcpy(rv.x, backend, 16);
	__builtin_memset(rv.y, 0, 16);
	if (snat) {
		__builtin_memcpy(rv.y, rk.b, 16);
		rv.yport = rk.bport;
		__builtin_memcpy(snat_addr, rk.b, 16);
		*sport = rk.bport;
	}
	int r = old_ho ? nodewire_ct_halfopen_v2.update(&fk, &rv) : nodewire_ct_halfopen_v2.insert(&fk, &rv);
	if (r) {
		ct_delete(&rk, 1);
		return -1;
	}
	if (!old_ho || !old)
		ct_count(NW_CT_STAT_HALFOPEN_INSERTED, 1);
	return 0;
}

/* A new flow from a client straight to an address:port that once was a backend of one of our flows
 * with the same client tuple (the client reused its source port): the old reverse entry is stale and
 * would rewrite this flow's replies, so it goes. */
static __always_inline void ct_forget_reverse(struct pkt *p)
{
	struct ct_key k = {};
	ct_key_set(&k, p->dst, p->dport, p->src, p->sport, p->proto, NW_CT_REVERSE);
	nodewire_ct_v2.delete(&k);
	ct_delete(&k, 1);
}

#endif /* NODEWIRE_CT_H */
