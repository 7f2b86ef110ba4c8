/* TCP telemetry per connection event, not per packet: one sock_ops program on the cgroup the socket
 * LB is attached to, and drop counting from skb:kfree_skb (drops only; a freed, delivered skb takes
 * consume_skb instead).
 *
 *   TCP_CONNECT_CB            connect() starts: stamp the socket (socket storage) with the time and,
 *                             when its address is not a pod's own, the connecting process's pod
 *                             cgroup (hostNetwork pods); ask for STATE and RETRANS callbacks
 *   ACTIVE_ESTABLISHED_CB     connect latency (us), per local pod address and, when the connect went
 *                             through a ClusterIP, per (VIP, port, backend, port) from the socket LB's
 *                             revnat entry for this cookie (lib/lb.h)
 *   PASSIVE_ESTABLISHED_CB    accepted sockets: ask for the same callbacks
 *   STATE_CB  ESTABLISHED ->  the connection's smoothed RTT (srtt_us >> 3, as TCP_INFO's tcpi_rtt)
 *                             once, when it leaves ESTABLISHED (close, FIN received, reset)
 *   RETRANS_CB                a retransmitted segment, as it happens, per (local, remote) address
 *
 * No program runs per ACK. tcp:tcp_probe (srtt at every ACK) is compiled in only with
 * -DNW_WITH_TCP_PROBE (opt-in), into its own histogram; skb:kfree_skb with -DNW_WITH_KFREE_SKB (when
 * the kernel has it). Histograms are aggregated here (lib/hist.h), never shipped per
 * event. Only local addresses of this node's pods are recorded per pod (user space creates their
 * histograms and lists them in nodewire_obs_watch_v1); per-Service histograms are made on first use.
 */
#include <uapi/linux/bpf.h>
#define NW_LB_REVNAT_ONLY
#include "lib/lb.h"
#include "lib/obs.h"

#ifndef NW_OBS_WATCH_MAX
#define NW_OBS_WATCH_MAX 65536
#endif
#ifndef NW_OBS_HIST_MAX
#define NW_OBS_HIST_MAX 262144
#endif
#ifndef NW_OBS_SVC_HIST_MAX
#define NW_OBS_SVC_HIST_MAX 65536
#endif
#ifndef NW_OBS_FLOWS_MAX
#define NW_OBS_FLOWS_MAX 65536
#endif

#define NW_TCP_ESTABLISHED 1
#define NW_TCP_CLOSE 7
#define NW_IPPROTO_TCP 6

/* which histogram (hist_key.metric, svc_hist_key.metric) */
#define NW_HIST_CONNECT 0   /* connect latency, us */
#define NW_HIST_SRTT 1      /* smoothed RTT when the connection leaves ESTABLISHED, us */
#define NW_HIST_SRTT_ACK 2  /* smoothed RTT at every ACK (tcp_probe, opt-in), us */

struct obs_addr {
	__u32 address[4];
};

/* A pod is its local address, or, where the address is shared (hostNetwork pods: the node's
 * address), the cgroup of the process that connected (address zero, cgroup_id set). */
struct hist_key {
	__u32 address[4];
	__u32 metric;
	__u32 pad;
	__u64 cgroup_id;
};

/* A Service frontend (VIP, port) and the backend a connect was sent to. */
struct svc_hist_key {
	__u32 vip[4];
	__u32 backend[4];
	__be16 vport;
	__be16 bport;
	__u32 metric;
};

/* One whole histogram per key and CPU: an event is one lookup and two plain adds. */
struct hist_value {
	__u64 slots[NW_HIST_SLOTS];
	__u64 sum;
};

struct flow_key {
	__u32 local[4];
	__u32 remote[4];
	__u64 cgroup_id;   /* 0, or the pod's cgroup as in hist_key */
};

/* Per socket, from connect() on (it dies with the socket). */
struct sock_info {
	__u64 start_ns;    /* connect() start; 0 once established */
	__u64 cgroup_id;   /* the connecting process's cgroup when it is a watched pod's, else 0 */
};

/* user space: local addresses to observe -> pod index (unused by the kernel, handy for debugging) */
BPF_HASH(nodewire_obs_watch_v1, struct obs_addr, __u32, NW_OBS_WATCH_MAX);
/* user space: cgroup ids (the pod's cgroup and every one below it) of pods whose address is shared */
BPF_HASH(nodewire_obs_cgroups_v1, __u64, __u32, NW_OBS_WATCH_MAX);
BPF_TABLE("percpu_hash", struct hist_key, struct hist_value, nodewire_obs_hist_v2, NW_OBS_HIST_MAX);
BPF_TABLE("lru_percpu_hash", struct svc_hist_key, struct hist_value, nodewire_obs_svc_hist_v1,
	  NW_OBS_SVC_HIST_MAX);
BPF_TABLE("lru_hash", struct flow_key, __u64, nodewire_obs_retrans_v2, NW_OBS_FLOWS_MAX);
BPF_HASH(nodewire_obs_drops_v1, __u32, __u64, 1024);
BPF_SK_STORAGE(nodewire_obs_sock_v1, struct sock_info);

static __always_inline void add(__u64 *v, __u64 n)
{
	__sync_fetch_and_add(v, n);
}

static __always_inline void hist_add(struct hist_value *h, __u64 value)
{
	__u32 slot = nw_hist_slot(value);
	if (slot < NW_HIST_SLOTS)   /* always true; keeps the verifier sure of the bound */
		h->slots[slot] += 1;  /* per-CPU value: no atomics needed */
	h->sum += value;
}

/* User space creates the (address, metric) histograms of the pods it watches, so the lookup is
 * the filter too: any other address (host traffic) costs this one lookup and leaves nothing. */
static __always_inline void hist_record(const __u32 *addr, __u64 cgroup_id, __u32 metric, __u64 value)
{
	struct hist_key k = {.metric = metric, .cgroup_id = cgroup_id};
	if (!cgroup_id)
		__builtin_memcpy(k.address, addr, 16);
	struct hist_value *h = nodewire_obs_hist_v2.lookup(&k);
	if (h)
		hist_add(h, value);
}

/* Context fields are read whole and unconditionally (volatile): clang would otherwise merge the
 * v4 and v6 loads into one load through a computed ctx pointer, which the verifier rejects. */
#define NW_CTX(f) (*(volatile __u32 *)&skops->f)

static __always_inline void sockops_addr(__u32 family, __u32 v4, __u32 w0, __u32 w1, __u32 w2, __u32 w3,
					 __u32 *a)
{
	if (family == NW_AF_INET) {
		a[0] = 0;
		a[1] = 0;
		a[2] = NW_V4MAPPED_WORD;
		a[3] = v4;
	} else {
		a[0] = w0;
		a[1] = w1;
		a[2] = w2;
		a[3] = w3;
	}
}

static __always_inline void sockops_local(struct bpf_sock_ops *skops, __u32 *a)
{
	sockops_addr(NW_CTX(family), NW_CTX(local_ip4), NW_CTX(local_ip6[0]), NW_CTX(local_ip6[1]),
		     NW_CTX(local_ip6[2]), NW_CTX(local_ip6[3]), a);
}

static __always_inline void sockops_remote(struct bpf_sock_ops *skops, __u32 *a)
{
	sockops_addr(NW_CTX(family), NW_CTX(remote_ip4), NW_CTX(remote_ip6[0]), NW_CTX(remote_ip6[1]),
		     NW_CTX(remote_ip6[2]), NW_CTX(remote_ip6[3]), a);
}

/* The socket LB's record for this socket: which VIP the backend it talks to stands for. */
static __always_inline void svc_record(struct bpf_sock_ops *skops, __u32 metric, __u64 value)
{
	struct svc_hist_key k = {.metric = metric};
	sockops_remote(skops, k.backend);
	/* remote_port is network order in the upper 16 bits on little-endian kernels */
	__u32 rp = NW_CTX(remote_port);
	k.bport = (__be16)(rp >> 16 ? rp >> 16 : rp);
	struct lb_revnat_value *v = lb_recall(bpf_get_socket_cookie(skops), k.backend, k.bport);
	if (!v)
		return;   /* not dialled through a Service */
	__builtin_memcpy(k.vip, v->address, 16);
	k.vport = v->port;
	struct hist_value *h = nodewire_obs_svc_hist_v1.lookup(&k);
	if (!h) {
		struct hist_value zero = {};
		nodewire_obs_svc_hist_v1.update(&k, &zero);
		h = nodewire_obs_svc_hist_v1.lookup(&k);
		if (!h)
			return;
	}
	hist_add(h, value);
}

static __always_inline void watch_events(struct bpf_sock_ops *skops)
{
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG |
				  BPF_SOCK_OPS_RETRANS_CB_FLAG);
}

static __always_inline struct sock_info *sock_info(struct bpf_sock_ops *skops, __u64 flags)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return NULL;
	return nodewire_obs_sock_v1.sk_storage_get(sk, 0, flags);
}

/* connect(): in the connecting process's context, so its cgroup names a pod whose address does not */
static __always_inline void connecting(struct bpf_sock_ops *skops)
{
	struct sock_info *info = sock_info(skops, BPF_SK_STORAGE_GET_F_CREATE);
	if (!info)
		return;
	info->start_ns = bpf_ktime_get_ns();
	info->cgroup_id = 0;
	__u32 local[4];
	sockops_local(skops, local);
	if (!nodewire_obs_watch_v1.lookup((struct obs_addr *)local)) {
		__u64 cg = bpf_get_current_cgroup_id();
		if (nodewire_obs_cgroups_v1.lookup(&cg))
			info->cgroup_id = cg;
	}
}

static __always_inline void connected(struct bpf_sock_ops *skops)
{
	struct sock_info *info = sock_info(skops, 0);
	if (!info || !info->start_ns)
		return;
	__u64 us = (bpf_ktime_get_ns() - info->start_ns) / 1000;
	info->start_ns = 0;
	__u32 local[4];
	sockops_local(skops, local);
	hist_record(local, info->cgroup_id, NW_HIST_CONNECT, us);
	svc_record(skops, NW_HIST_CONNECT, us);
}

static __always_inline void state_changed(struct bpf_sock_ops *skops)
{
	if (NW_CTX(args[0]) != NW_TCP_ESTABLISHED)
		return;
	struct sock_info *info = sock_info(skops, 0);
	__u64 srtt = NW_CTX(srtt_us) >> 3;
	__u32 local[4];
	sockops_local(skops, local);
	hist_record(local, info ? info->cgroup_id : 0, NW_HIST_SRTT, srtt);
	svc_record(skops, NW_HIST_SRTT, srtt);
	/* recorded once: the later state changes (FIN_WAIT2, TIME_WAIT, CLOSE...) need no program run */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void retransmitted(struct bpf_sock_ops *skops)
{
	if (NW_CTX(args[2]) != 0)   /* the retransmission failed to go out */
		return;
	struct flow_key k = {};
	sockops_local(skops, k.local);
	sockops_remote(skops, k.remote);
	struct sock_info *info = sock_info(skops, 0);
	if (info && info->cgroup_id) {
		k.cgroup_id = info->cgroup_id;
		__builtin_memset(k.local, 0, sizeof(k.local));
	} else if (!nodewire_obs_watch_v1.lookup((struct obs_addr *)k.local)) {
		return;
	}
	__u64 zero = 0;
	__u64 *c = nodewire_obs_retrans_v2.lookup_or_try_init(&k, &zero);
	if (c)
		add(c, 1);
}

int nw_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		connecting(skops);
		watch_events(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		connected(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		watch_events(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		state_changed(skops);
		break;
	case BPF_SOCK_OPS_RETRANS_CB:
		retransmitted(skops);
		break;
	}
	return 1;
}

/* Tracepoint programs are linked by the agent (agent/datapath/attach.py), not by BCC: they are named
 * nw_* (BCC would attach tracepoint__* functions itself, in the compile child that then exits) and
 * take BCC's args struct, which it builds from the running kernel's format file. */
#ifdef NW_WITH_TCP_PROBE
int nw_tcp_probe(struct tracepoint__tcp__tcp_probe *args)
{
	/* saddr is a struct sockaddr_in / sockaddr_in6 image: family(2) port(2) then the address
	 * (v4 at offset 4; v6 at offset 8, after flowinfo). */
	struct obs_addr local = {};
	if (args->family == NW_AF_INET)
		nw_addr_v4(local.address, &args->saddr[4]);
	else if (args->family == NW_AF_INET6)
		nw_addr_v6(local.address, &args->saddr[8]);
	else
		return 0;
	hist_record(local.address, 0, NW_HIST_SRTT_ACK, args->srtt);
	return 0;
}
#endif

#ifdef NW_WITH_KFREE_SKB
/* BCC declares the args struct from the format file, which types `reason` as the kernel's enum; the
 * uapi headers we compile against do not define it, so give it a body (only its size, 4, matters;
 * the names come from the format file at start-up). */
enum skb_drop_reason { NW_SKB_DROP_REASON_ANY = 0 };

int nw_kfree_skb(struct tracepoint__skb__kfree_skb *args)
{
	__u32 reason = (__u32)args->reason;
	__u64 zero = 0;
	__u64 *c = nodewire_obs_drops_v1.lookup_or_try_init(&reason, &zero);
	if (c)
		add(c, 1);
	return 0;
}
#endif
