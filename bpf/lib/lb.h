/* Service load-balancing maps and the backend selection shared by the socket hooks.
 *
 * Layout (after Cilium's lb{4,6}_services / lb{4,6}_backends split and Katran's small headers, one
 * family-neutral map here): addresses are 16 bytes, IPv4 stored as IPv4-mapped IPv6 (::ffff:a.b.c.d),
 * so one lookup path serves connect4 and connect6 (and dual-stack sockets dialling a mapped v4 VIP).
 *
 *   nodewire_services_v1  (vip, port, proto, slot) -> slot 0: {count, flags, service_id}
 *                                                     slot i: {backend_id}, 1 <= i <= count
 *   nodewire_backends_v1  backend_id -> (address, port, proto)
 *   nodewire_revnat_v1    (socket cookie, backend address, port) -> (vip, port)  [LRU, datapath-written]
 *   nodewire_lb_stats_v1  (service_id, backend_id, outcome) -> connects         [per-CPU LRU]
 *   nodewire_affinity_v1  (client netns cookie, service_id) -> backend, slot, last use  [LRU]
 *
 * User space writes backends first, then slots 1..n, then slot 0; deletes go the other way, so a
 * reader never follows a slot to a missing backend. bpf/nodeport.c's maps join this order in the
 * same plan (agent/datapath/nsplan.py): its source ranges and local addresses, then its policy rows,
 * go before any frontend write; its Maglev tables (then the policy's Maglev flag) after the headers;
 * what no frontend needs any more goes after the frontends' deletes. Only uapi types are used (the kernel is newer
 * than the headers BCC compiles against).
 */
#ifndef NODEWIRE_LB_H
#define NODEWIRE_LB_H

/* Numbers shared with the agent come from agent/datapath/abi.py as -D defines (lb_defines()):
 * capacities, flags, outcomes, errno. None has a default here, so the two sides cannot drift. */
#if !defined(NW_PIN_DIR) || !defined(NW_SERVICES_MAX) || !defined(NW_BACKENDS_MAX) || \
    !defined(NW_REVNAT_MAX) || !defined(NW_STATS_MAX) || !defined(NW_AFFINITY_MAX) || \
    !defined(NW_SVC_F_AFFINITY) || !defined(NW_LB_FORWARDED) || !defined(NW_LB_NO_BACKEND) || \
    !defined(NW_LB_BAD_SLOT) || !defined(NW_ECONNREFUSED)
#error "compile through agent/datapath/loader.py: it passes the defines of agent/datapath/abi.py"
#endif

/* BCC 0.26's helpers.h predates bpf_set_retval (kernel 5.18); the helper id comes from the uapi enum. */
static long (*nw_set_retval)(int retval) = (void *)BPF_FUNC_set_retval;

/* The second-to-last 32-bit word of an IPv4-mapped IPv6 address (::ffff:0:0/96), in network order. */
#define NW_V4MAPPED_WORD __builtin_bswap32(0x0000ffff)

/* outcome in nodewire_lb_stats_v1: NW_LB_FORWARDED, NW_LB_NO_BACKEND (the Service has no ready
 * endpoint: connect refused), NW_LB_BAD_SLOT (a slot or backend was missing, never expected: refused) */

struct lb_service_key {
	__u32 address[4];
	__be16 port;
	__u8 proto;
	__u8 scope;   /* reserved for external scope (nodeport/LB); 0 for ClusterIP */
	__u16 slot;
	__u16 pad;
};

struct lb_service_value {
	__u32 backend_id;        /* slots 1..count */
	__u16 count;             /* slot 0 */
	__u16 flags;             /* slot 0: NW_SVC_F_* */
	__u32 service_id;        /* slot 0: id for counters, stable per frontend */
	__u32 affinity_timeout;  /* slot 0: seconds, with NW_SVC_F_AFFINITY */
};

/* lb_service_value.flags: NW_SVC_F_AFFINITY = sessionAffinity: ClientIP */

struct lb_backend {
	__u32 address[4];
	__be16 port;
	__u8 proto;
	__u8 flags;
	__u32 pad;
};

struct lb_revnat_key {
	__u64 cookie;
	__u32 address[4];
	__be16 port;
	__u16 pad;
	__u32 pad2;
};

struct lb_revnat_value {
	__u32 address[4];
	__be16 port;
	__u16 pad;
	__u32 pad2;
};

/* Session affinity at the socket: the client is its network namespace (one per pod), the socket-LB
 * equivalent of kube-proxy's client IP. The slot is kept so a reused entry is checked against the
 * Service's current slot table: a backend that left the Service is never chosen again. */
struct lb_affinity_key {
	__u64 netns_cookie;
	__u32 service_id;
	__u32 pad;
};

struct lb_affinity_value {
	__u64 last_used_ns;
	__u32 backend_id;
	__u16 slot;
	__u16 pad;
};

struct lb_stats_key {
	__u32 service_id;
	__u32 backend_id;
	__u32 outcome;
};

/* NW_LB_REVNAT_ONLY: only the structs, the revnat map and its helpers (bpf/tcp_latency.c reads
 * which VIP a socket dialled, keyed by its cookie, to attribute connect latency to the Service). */
#ifndef NW_LB_REVNAT_ONLY
/* Not preallocated (as Cilium's default, --preallocate-bpf-maps=false): kernel memory follows the
 * number of Services instead of the capacity (1M slots preallocated cost ~260 MiB of memlock). */
BPF_TABLE_PINNED("hash", struct lb_service_key, struct lb_service_value, nodewire_services_v1,
		 NW_SERVICES_MAX, NW_PIN_DIR "/nodewire_services_v1", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct lb_backend, nodewire_backends_v1,
		 NW_BACKENDS_MAX, NW_PIN_DIR "/nodewire_backends_v1", BPF_F_NO_PREALLOC);
#endif
BPF_TABLE_PINNED("lru_hash", struct lb_revnat_key, struct lb_revnat_value, nodewire_revnat_v1,
		 NW_REVNAT_MAX, NW_PIN_DIR "/nodewire_revnat_v1");
#ifndef NW_LB_REVNAT_ONLY
BPF_TABLE_PINNED("lru_percpu_hash", struct lb_stats_key, __u64, nodewire_lb_stats_v1,
		 NW_STATS_MAX, NW_PIN_DIR "/nodewire_lb_stats_v1");
BPF_TABLE_PINNED("lru_hash", struct lb_affinity_key, struct lb_affinity_value, nodewire_affinity_v1,
		 NW_AFFINITY_MAX, NW_PIN_DIR "/nodewire_affinity_v1");

/* BCC 0.26 declares no bpf_get_netns_cookie (kernel 5.7); the id comes from the uapi enum. */
static __u64 (*nw_get_netns_cookie)(void *ctx) = (void *)BPF_FUNC_get_netns_cookie;

static __always_inline void lb_count(__u32 service_id, __u32 backend_id, __u32 outcome)
{
	struct lb_stats_key k = {.service_id = service_id, .backend_id = backend_id, .outcome = outcome};
	__u64 zero = 0;
	__u64 *v = nodewire_lb_stats_v1.lookup_or_try_init(&k, &zero);
	if (v)
		*v += 1;  /* per-CPU value: no atomic needed */
}

/* Result of lb_select(). */
#define NW_SELECT_MISS 0      /* not a service address: leave the socket alone */
#define NW_SELECT_OK 1        /* *out holds the chosen backend */
#define NW_SELECT_REFUSE 2    /* a service with no usable backend: refuse like kube-proxy's REJECT */

/* An earlier choice of this client for this Service, if still within the timeout and still in the
 * Service's slot table; 0 otherwise. */
static __always_inline __u16 lb_affinity_slot(struct lb_service_key *key, struct lb_affinity_key *ak,
					      __u32 timeout_s, __u64 now)
{
	struct lb_affinity_value *av = nodewire_affinity_v1.lookup(ak);
	if (!av || now - av->last_used_ns > (__u64)timeout_s * 1000000000ULL)
		return 0;
	key->slot = av->slot;
	struct lb_service_value *slot = nodewire_services_v1.lookup(key);
	if (!slot || slot->backend_id != av->backend_id)
		return 0;
	return av->slot;
}

/* key: address/port/proto filled in by the caller. Picks a backend uniformly at random, or the
 * client's previous one for a Service with session affinity. */
static __always_inline int lb_select(void *ctx, struct lb_service_key *key, struct lb_backend **out)
{
	key->slot = 0;
	struct lb_service_value *svc = nodewire_services_v1.lookup(key);
	if (!svc)
		return NW_SELECT_MISS;
	__u32 service_id = svc->service_id;
	__u16 count = svc->count;
	if (count == 0) {
		lb_count(service_id, 0, NW_LB_NO_BACKEND);
		return NW_SELECT_REFUSE;
	}
	struct lb_affinity_key ak = {};
	__u64 now = 0;
	__u16 chosen = 0;
	int affinity = svc->flags & NW_SVC_F_AFFINITY;
	if (affinity) {
		ak.netns_cookie = nw_get_netns_cookie(ctx);
		ak.service_id = service_id;
		now = bpf_ktime_get_ns();
		chosen = lb_affinity_slot(key, &ak, svc->affinity_timeout, now);
	}
	if (chosen == 0 || chosen > count)
		chosen = (bpf_get_prandom_u32() % count) + 1;
	key->slot = chosen;
	struct lb_service_value *slot = nodewire_services_v1.lookup(key);
	if (!slot) {
		lb_count(service_id, 0, NW_LB_BAD_SLOT);
		return NW_SELECT_REFUSE;
	}
	__u32 backend_id = slot->backend_id;
	struct lb_backend *be = nodewire_backends_v1.lookup(&backend_id);
	if (!be) {
		lb_count(service_id, backend_id, NW_LB_BAD_SLOT);
		return NW_SELECT_REFUSE;
	}
	if (affinity) {
		struct lb_affinity_value av = {.last_used_ns = now, .backend_id = backend_id, .slot = chosen};
		nodewire_affinity_v1.update(&ak, &av);
	}
	lb_count(service_id, backend_id, NW_LB_FORWARDED);
	*out = be;
	return NW_SELECT_OK;
}

#endif /* NW_LB_REVNAT_ONLY */

/* Remember, per socket, which VIP a backend stands for, so replies and getpeername show the VIP. */
static __always_inline void lb_remember(__u64 cookie, const struct lb_backend *be,
					const __u32 *vip, __be16 vport)
{
	struct lb_revnat_key k = {.cookie = cookie, .port = be->port};
	struct lb_revnat_value v = {.port = vport};
	__builtin_memcpy(k.address, be->address, sizeof(k.address));
	__builtin_memcpy(v.address, vip, sizeof(v.address));
	nodewire_revnat_v1.update(&k, &v);
}

static __always_inline struct lb_revnat_value *lb_recall(__u64 cookie, const __u32 *addr, __be16 port)
{
	struct lb_revnat_key k = {.cookie = cookie, .port = port};
	__builtin_memcpy(k.address, addr, sizeof(k.address));
	return nodewire_revnat_v1.lookup(&k);
}

#endif /* NODEWIRE_LB_H */
