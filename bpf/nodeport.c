/* North-south load balancing on the node's devices (tc clsact, direct action): NodePort,
 * spec.externalIPs and status.loadBalancer.ingress[].ip for traffic that did not start in a local
 * socket (local sockets are balanced at connect() by sock_lb.c, with these frontends added there).
 *
 * ingress: 1. a reply from a remote backend to one of our SNAT ports -> back to the client
 *          2. a packet of a known flow -> its backend (conntrack, lib/ct.h)
 *          3. a new flow to a frontend -> source ranges, reject/drop when no endpoint,
 *             backend by session affinity, else Maglev, else flow hash; DNAT, plus SNAT to the
 *             node address when the backend is on another node
 * egress:  a local backend's reply to an external client -> the frontend's address as source
 * both:    ICMP errors about a flow's packets are translated back (lib/icmp.h); a packet too big for
 *          the route to its backend gets frag-needed / packet-too-big; fragments take the flow of
 *          their first fragment (lib/frag.h)
 *
 * Maps (pinned, family-neutral 16-byte addresses; the service and backend maps have the layout of
 * lib/lb.h's and are written by the same reconciler):
 *   nodewire_np_services_v1 / nodewire_np_backends_v1   frontend slots, backends
 *   nodewire_np_policy_v1   frontend -> group (one per Service port), flags
 *   nodewire_np_local_v1    addresses of this node's endpoints (no SNAT to them)
 *   nodewire_np_ranges_v1   (group, source prefix) for loadBalancerSourceRanges  [LPM]
 *   nodewire_np_affinity_v1 (client address, group) -> backend, last use          [LRU]
 *   nodewire_np_maglev_v1   group -> Maglev lookup table of backend ids           [hash of arrays]
 *   nodewire_np_snat_v2     the node's SNAT addresses per family (lib/ct.h)
 *   nodewire_np_stats_v2    packets per outcome (NW_NP_*; NW_NP_STATS_SLOTS slots)  [per-CPU]
 */
#include <uapi/linux/bpf.h>
#include "lib/lb.h"
#include "lib/pkt.h"
#include "lib/ct.h"
#include "lib/reject.h"
#include "lib/icmp.h"
#include "lib/frag.h"

/* Numbers shared with the agent come from agent/datapath/abi.py (np_defines()) as -D defines. */
#if !defined(NW_NP_POLICY_MAX) || !defined(NW_NP_GROUPS_MAX) || !defined(NW_MAGLEV_M) || \
    !defined(NP_F_DROP_EMPTY) || !defined(NP_F_SOURCE_RANGES) || !defined(NP_F_MAGLEV) || \
    !defined(NW_NP_LOCAL) || !defined(NW_NP_REMOTE) || !defined(NW_NP_REPLY) || !defined(NW_NP_ESTABLISHED) || \
    !defined(NW_NP_REJECT) || !defined(NW_NP_DROP_NO_LOCAL) || !defined(NW_NP_DROP_SOURCE) || \
    !defined(NW_NP_DROP_ERROR) || !defined(NW_NP_OUTCOMES) || !defined(NW_NP_ICMP_TRANSLATED) || \
    !defined(NW_NP_PMTU_REPLY) || !defined(NW_NP_FRAGMENT) || !defined(NW_NP_UNTRANSLATABLE) || \
    !defined(NW_NP_STATS_SLOTS)
#error "compile through agent/datapath/loader.py: it passes the defines of agent/datapath/abi.py (np_defines)"
#endif

/* np_policy.flags: NP_F_DROP_EMPTY (eTP=Local with endpoints only elsewhere: drop, as kube-proxy),
 * NP_F_SOURCE_RANGES (only sources in nodewire_np_ranges_v1 for this group), NP_F_MAGLEV (the group
 * has a Maglev table). Outcomes counted in nodewire_np_stats_v2: NW_NP_* (abi.NP_OUTCOMES). */

struct np_frontend {
	__u32 address[4];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct np_policy {
	__u32 group;
	__u32 flags;
};

struct np_addr {
	__u32 address[4];
};

struct np_range_key {
	__u32 prefixlen;  /* 32 (group) + the source prefix length in the 128-bit address */
	__u32 group;
	__u32 address[4];
};

struct np_affinity_key {
	__u32 client[4];
	__u32 group;
};

struct np_affinity_value {
	__u64 last_used_ns;
	__u32 backend_id;
	__u32 pad;
};

BPF_TABLE_PINNED("hash", struct lb_service_key, struct lb_service_value, nodewire_np_services_v1,
		 NW_SERVICES_MAX, NW_PIN_DIR "/nodewire_np_services_v1", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct lb_backend, nodewire_np_backends_v1,
		 NW_BACKENDS_MAX, NW_PIN_DIR "/nodewire_np_backends_v1", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct np_frontend, struct np_policy, nodewire_np_policy_v1,
		 NW_NP_POLICY_MAX, NW_PIN_DIR "/nodewire_np_policy_v1", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct np_addr, __u8, nodewire_np_local_v1,
		 NW_BACKENDS_MAX, NW_PIN_DIR "/nodewire_np_local_v1", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct np_range_key, __u8, nodewire_np_ranges_v1,
		 NW_NP_POLICY_MAX, NW_PIN_DIR "/nodewire_np_ranges_v1", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct np_affinity_key, struct np_affinity_value, nodewire_np_affinity_v1,
		 NW_AFFINITY_MAX, NW_PIN_DIR "/nodewire_np_affinity_v1");
BPF_TABLE_PINNED("percpu_array", __u32, __u64, nodewire_np_stats_v2, NW_NP_STATS_SLOTS,
		 NW_PIN_DIR "/nodewire_np_stats_v2");
BPF_ARRAY(nodewire_np_maglev_inner, __u32, NW_MAGLEV_M);
BPF_TABLE_PINNED("hash_of_maps$nodewire_np_maglev_inner", __u32, int, nodewire_np_maglev_v1,
		 NW_NP_GROUPS_MAX, NW_PIN_DIR "/nodewire_np_maglev_v1");

static __always_inline void np_count(__u32 outcome)
{
	__u64 *v = nodewire_np_stats_v2.lookup(&outcome);
	if (v)
		*v += 1;
}

/* The same flow hashes the same on every node (no per-node seed): with the same Maglev table,
 * every node picks the same backend for it. Murmur3's finaliser over the 5-tuple. */
static __always_inline __u32 flow_hash(struct pkt *p)
{
	__u32 h = 0x9747b28c;
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = (h ^ p->src[i]) * 0xcc9e2d51 + (h >> 15);
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = (h ^ p->dst[i]) * 0x1b873593 + (h >> 13);
	h ^= ((__u32)p->sport << 16) | p->dport;
	h ^= (__u32)p->proto << 8;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline int same_addr(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* DNAT to the backend, and SNAT when it lives on another node; then on its way. A packet too big
 * for the route to a remote backend goes back to the client as ICMP (the stack does that for the
 * packets it forwards to local pods), looked up before the rewrite so the ICMP quotes the original. */
static __always_inline int np_forward(struct __sk_buff *skb, struct pkt *p, const __u32 *backend, __be16 bport,
				      int snat, const __u32 *snat_addr, __be16 sport)
{
	struct bpf_fib_lookup *fib = 0;
	int route = 0;
	if (snat) {
		fib = pkt_fib_params();
		if (!fib)
			return TC_ACT_SHOT;
		route = pkt_fib(skb, p, snat_addr, backend, sport, bport, 1, fib);
		if (route == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
			np_count(NW_NP_PMTU_REPLY);
			return icmp_too_big(skb, p, fib->mtu_result);
		}
	}
	if (pkt_set_addr(skb, p, 1, backend) || pkt_set_port(skb, p, 1, bport))
		return TC_ACT_SHOT;
	if (!snat)
		return TC_ACT_OK;  /* a local pod: the stack routes it */
	if (pkt_set_addr(skb, p, 0, snat_addr) || pkt_set_port(skb, p, 0, sport))
		return TC_ACT_SHOT;
	return pkt_fib_out(skb, fib, route);
}

static __always_inline __u32 pick_backend(struct pkt *p, struct lb_service_key *key, struct lb_service_value *svc,
					  struct np_policy *pol, __u32 hash)
{
	__u32 group = pol ? pol->group : 0;
	if ((svc->flags & NW_SVC_F_AFFINITY) && group) {
		struct np_affinity_key ak = {};
		__builtin_memcpy(ak.client, p->src, 16);
		ak.group = group;
		struct np_affinity_value *av = nodewire_np_affinity_v1.lookup(&ak);
		__u64 now = bpf_ktime_get_ns();
		if (av && now - av->last_used_ns <= (__u64)svc->affinity_timeout * 1000000000ULL) {
			__u32 bid = av->backend_id;
			if (nodewire_np_backends_v1.lookup(&bid))
				return bid;
		}
	}
	if (pol && (pol->flags & NP_F_MAGLEV)) {
		void *table = nodewire_np_maglev_v1.lookup(&group);
		if (table) {
			__u32 idx = hash % NW_MAGLEV_M;
			__u32 *bid = bpf_map_lookup_elem(table, &idx);
			/* a table older than the backends (mid-update) falls back to the slots below */
			if (bid && *bid && nodewire_np_backends_v1.lookup(bid))
				return *bid;
		}
	}
	key->slot = (hash % svc->count) + 1;
	struct lb_service_value *slot = nodewire_np_services_v1.lookup(key);
	return slot ? slot->backend_id : 0;
}

static __always_inline void remember_affinity(struct pkt *p, struct np_policy *pol, __u32 bid)
{
	struct np_affinity_key ak = {};
	__builtin_memcpy(ak.client, p->src, 16);
	ak.group = pol->group;
	struct np_affinity_value av = {.last_used_ns = bpf_ktime_get_ns(), .backend_id = bid};
	nodewire_np_affinity_v1.update(&ak, &av);
}

static __always_inline int new_flow(struct __sk_buff *skb, struct pkt *p, __u64 now)
{
	struct lb_service_key key = {};
	__builtin_memcpy(key.address, p->dst, 16);
	key.port = p->dport;
	key.proto = p->proto;
	struct lb_service_value *svc = nodewire_np_services_v1.lookup(&key);
	if (!svc)
		return TC_ACT_UNSPEC;
	struct np_frontend fk = {};
	__builtin_memcpy(fk.address, p->dst, 16);
	fk.port = p->dport;
	fk.proto = p->proto;
	struct np_policy *pol = nodewire_np_policy_v1.lookup(&fk);
	if (pol && (pol->flags & NP_F_SOURCE_RANGES)) {
		struct np_range_key rk = {.prefixlen = 32 + 128, .group = pol->group};
		__builtin_memcpy(rk.address, p->src, 16);
		if (!nodewire_np_ranges_v1.lookup(&rk)) {
			np_count(NW_NP_DROP_SOURCE);
			return TC_ACT_SHOT;
		}
	}
	if (svc->count == 0) {
		if (pol && (pol->flags & NP_F_DROP_EMPTY)) {
			np_count(NW_NP_DROP_NO_LOCAL);
			return TC_ACT_SHOT;
		}
		np_count(NW_NP_REJECT);
		return reject(skb, p);
	}
	__u32 hash = flow_hash(p);
	__u32 bid = pick_backend(p, &key, svc, pol, hash);
	int affinity = (svc->flags & NW_SVC_F_AFFINITY) && pol;
	struct lb_backend *be = nodewire_np_backends_v1.lookup(&bid);
	if (!be) {
		np_count(NW_NP_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	if (affinity)
		remember_affinity(p, pol, bid);
	__u32 backend[4] = {be->address[0], be->address[1], be->address[2], be->address[3]};
	__be16 bport = be->port;
	struct np_addr local = {};
	__builtin_memcpy(local.address, backend, 16);
	int snat = !nodewire_np_local_v1.lookup(&local);
	__u32 snat_addr[4] = {};
	__be16 sport = 0;
	if (ct_create(p, backend, bport, bid, snat, hash, now, snat_addr, &sport)) {
		np_count(NW_NP_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	np_count(snat ? NW_NP_REMOTE : NW_NP_LOCAL);
	return np_forward(skb, p, backend, bport, snat, snat_addr, sport);
}

/* The packet's kind: NW_PKT_L4 (ports known, a fragment's from lib/frag.h), or anything else,
 * handled here (ICMP errors: lib/icmp.h) or left alone, with *verdict set and the outcome counted. */
static __always_inline int np_parse(struct __sk_buff *skb, struct pkt *p, int egress, int *verdict)
{
	int kind = pkt_parse(skb, p);
	*verdict = TC_ACT_UNSPEC;
	if (kind == NW_PKT_ICMP_ERR) {
		int r = egress ? icmp_egress(skb, p, verdict) : icmp_ingress(skb, p, verdict);
		if (r == NW_ICMP_TRANSLATED)
			np_count(NW_NP_ICMP_TRANSLATED);
		else if (r == NW_ICMP_UNTRANSLATABLE)
			np_count(NW_NP_UNTRANSLATABLE);
		else if (r == NW_ICMP_BROKEN)
			np_count(NW_NP_DROP_ERROR);
		return kind;
	}
	if (kind == NW_PKT_L4 && (p->flags & NW_PKT_F_FRAG)) {
		if (frag_ports(p))
			kind = NW_PKT_UNTRANSLATABLE;
		else
			np_count(NW_NP_FRAGMENT);
	}
	if (kind == NW_PKT_UNTRANSLATABLE)
		np_count(NW_NP_UNTRANSLATABLE);
	return kind;
}

int nw_np_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int verdict;
	if (np_parse(skb, &p, 0, &verdict) != NW_PKT_L4)
		return verdict;
	__u64 now = bpf_ktime_get_ns();
	struct ct_key k = {};
	int ho = 0;
	/* only a packet to a SNAT port can be a remote backend's reply: others skip the lookup */
	struct ct_entry *rev = bpf_ntohs(p.dport) >= NW_SNAT_PORT_MIN ? ct_lookup(&p, NW_CT_REVERSE, &k, &ho, now) : 0;
	if (rev && (rev->flags & NW_CT_F_SNAT)) {
		struct ct_nat r;
		ct_nat_of(&r, rev);
		ct_track(&k, rev, ho, p.tcp_flags, now);  /* a reply still goes back without its forward entry */
		if (pkt_set_addr(skb, &p, 0, r.x) || pkt_set_port(skb, &p, 0, r.xport) ||
		    pkt_set_addr(skb, &p, 1, r.y) || pkt_set_port(skb, &p, 1, r.yport))
			return TC_ACT_SHOT;
		np_count(NW_NP_REPLY);
		return pkt_route_out(skb, &p);
	}
	struct ct_entry *fwd = ct_lookup(&p, NW_CT_FORWARD, &k, &ho, now);
	int syn = p.proto == IPPROTO_TCP && (p.tcp_flags & (NW_TCP_SYN | NW_TCP_ACK)) == NW_TCP_SYN;
	/* a SYN on a reused tuple starts a new connection (balanced anew); on a half-open one it is a
	 * retransmission of the same */
	if (fwd && !(syn && fwd->state != NW_CT_S_SYN)) {
		struct ct_nat f;
		ct_nat_of(&f, fwd);
		int snat = fwd->flags & NW_CT_F_SNAT;
		struct lb_backend *be = nodewire_np_backends_v1.lookup(&fwd->backend_id);
		/* a flow whose backend left the Service is balanced anew */
		if (be && be->port == f.xport && same_addr(be->address, f.x) &&
		    ct_track(&k, fwd, ho, p.tcp_flags, now) == 0) {
			np_count(NW_NP_ESTABLISHED);
			return np_forward(skb, &p, f.x, f.xport, snat, f.y, f.yport);
		}
	}
	verdict = new_flow(skb, &p, now);
	if (verdict == TC_ACT_UNSPEC && (syn || p.proto == IPPROTO_UDP))
		ct_forget_reverse(&p);
	return verdict;
}

int nw_np_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int verdict;
	if (np_parse(skb, &p, 1, &verdict) != NW_PKT_L4)
		return verdict;
	__u64 now = bpf_ktime_get_ns();
	struct ct_key k = {};
	int ho = 0;
	struct ct_entry *rev = ct_lookup(&p, NW_CT_REVERSE, &k, &ho, now);
	if (!rev || (rev->flags & NW_CT_F_SNAT))
		return TC_ACT_UNSPEC;
	struct ct_nat r;
	ct_nat_of(&r, rev);
	ct_track(&k, rev, ho, p.tcp_flags, now);
	if (pkt_set_addr(skb, &p, 0, r.x) || pkt_set_port(skb, &p, 0, r.xport))
		return TC_ACT_SHOT;
	np_count(NW_NP_REPLY);
	return TC_ACT_OK;
}
