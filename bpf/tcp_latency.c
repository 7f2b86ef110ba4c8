/* TCP and drop observability from tracepoints only (this kernel has no kprobes, see ENVIRONMENT.md).
 *
 *   sock:inet_sock_set_state  SYN_SENT -> ESTABLISHED: connect latency (us), per local address
 *   tcp:tcp_probe             smoothed RTT (us) on every ACK received, per local address
 *   tcp:tcp_retransmit_skb    retransmitted segments, per (local, remote) address
 *   skb:kfree_skb             dropped skbs, per kernel drop reason (numbers vary by kernel: user
 *                             space names them from the tracepoint's format file)
 *
 * Latencies are aggregated here into log2 histograms (lib/obs.h), never shipped per event. Only
 * the local addresses of this node's pods are recorded (user space creates their histograms and
 * lists them in nodewire_obs_watch_v1), so host traffic costs one hash lookup and leaves nothing. Each probe is its own program, so
 * user space can leave out (-DNW_WITHOUT_<TRACEPOINT>) those whose tracepoint this kernel lacks: BCC
 * attaches every TRACEPOINT_PROBE it compiles.
 */
#include <uapi/linux/bpf.h>
#include "lib/obs.h"

#ifndef NW_OBS_WATCH_MAX
#define NW_OBS_WATCH_MAX 65536
#endif
#ifndef NW_OBS_HIST_MAX
#define NW_OBS_HIST_MAX 262144
#endif
#ifndef NW_OBS_FLOWS_MAX
#define NW_OBS_FLOWS_MAX 65536
#endif

#define NW_TCP_ESTABLISHED 1
#define NW_TCP_SYN_SENT 2
#define NW_IPPROTO_TCP 6

/* which histogram (hist_key.metric) */
#define NW_HIST_CONNECT 0   /* connect latency, us */
#define NW_HIST_SRTT 1      /* smoothed RTT, us */

struct obs_addr {
	__u32 address[4];
};

struct hist_key {
	__u32 address[4];
	__u32 metric;
};

/* One whole histogram per (address, metric) and CPU: an event is one lookup and two plain adds. */
struct hist_value {
	__u64 slots[NW_HIST_SLOTS];
	__u64 sum;
};

struct flow_key {
	__u32 local[4];
	__u32 remote[4];
};

struct connect_start {
	__u64 ts_ns;
	struct obs_addr local;
};

/* user space: local addresses to observe -> pod index (unused by the kernel, handy for debugging) */
BPF_HASH(nodewire_obs_watch_v1, struct obs_addr, __u32, NW_OBS_WATCH_MAX);
BPF_TABLE("percpu_hash", struct hist_key, struct hist_value, nodewire_obs_hist_v1, NW_OBS_HIST_MAX);
BPF_TABLE("lru_hash", struct flow_key, __u64, nodewire_obs_retrans_v1, NW_OBS_FLOWS_MAX);
BPF_HASH(nodewire_obs_drops_v1, __u32, __u64, 1024);
BPF_TABLE("lru_hash", __u64, struct connect_start, nodewire_obs_connecting_v1, NW_OBS_FLOWS_MAX);

static __always_inline void add(__u64 *v, __u64 n)
{
	__sync_fetch_and_add(v, n);
}

/* User space creates the (address, metric) histograms of the pods it watches, so the lookup is
 * the filter too: any other address (host traffic) costs this one lookup and leaves nothing. */
static __always_inline void hist_record(const struct obs_addr *a, __u32 metric, __u64 value)
{
	struct hist_key k = {.metric = metric};
	__builtin_memcpy(k.address, a->address, 16);
	struct hist_value *h = nodewire_obs_hist_v1.lookup(&k);
	if (!h)
		return;
	__u32 slot = nw_hist_slot(value);
	if (slot < NW_HIST_SLOTS)   /* always true; keeps the verifier sure of the bound */
		h->slots[slot] += 1;  /* per-CPU value: no atomics needed */
	h->sum += value;
}

#ifndef NW_WITHOUT_INET_SOCK_SET_STATE
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != NW_IPPROTO_TCP)
		return 0;
	__u64 sk = (__u64)args->skaddr;
	if (args->newstate == NW_TCP_SYN_SENT) {
		struct connect_start st = {};
		if (args->family == NW_AF_INET)
			nw_addr_v4(st.local.address, args->saddr);
		else
			nw_addr_v6(st.local.address, args->saddr_v6);
		/* saddr may still be 0 when the socket was not bound: then it is set by the time of
		 * ESTABLISHED, so the address is taken again there. */
		st.ts_ns = bpf_ktime_get_ns();
		nodewire_obs_connecting_v1.update(&sk, &st);
		return 0;
	}
	if (args->oldstate != NW_TCP_SYN_SENT)
		return 0;
	struct connect_start *st = nodewire_obs_connecting_v1.lookup(&sk);
	if (!st)
		return 0;
	__u64 ts = st->ts_ns;
	nodewire_obs_connecting_v1.delete(&sk);
	if (args->newstate != NW_TCP_ESTABLISHED)
		return 0;   /* refused / timed out: not a latency sample */
	struct obs_addr local = {};
	if (args->family == NW_AF_INET)
		nw_addr_v4(local.address, args->saddr);
	else
		nw_addr_v6(local.address, args->saddr_v6);
	hist_record(&local, NW_HIST_CONNECT, (bpf_ktime_get_ns() - ts) / 1000);
	return 0;
}
#endif

#ifndef NW_WITHOUT_TCP_PROBE
TRACEPOINT_PROBE(tcp, tcp_probe)
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
	hist_record(&local, NW_HIST_SRTT, args->srtt);
	return 0;
}
#endif

#ifndef NW_WITHOUT_TCP_RETRANSMIT_SKB
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
	struct flow_key k = {};
	if (args->family == NW_AF_INET) {
		nw_addr_v4(k.local, args->saddr);
		nw_addr_v4(k.remote, args->daddr);
	} else {
		nw_addr_v6(k.local, args->saddr_v6);
		nw_addr_v6(k.remote, args->daddr_v6);
	}
	if (!nodewire_obs_watch_v1.lookup((struct obs_addr *)k.local))
		return 0;
	__u64 zero = 0;
	__u64 *c = nodewire_obs_retrans_v1.lookup_or_try_init(&k, &zero);
	if (c)
		add(c, 1);
	return 0;
}
#endif

#ifndef NW_WITHOUT_KFREE_SKB
/* BCC declares the args struct from the format file, which types `reason` as the kernel's enum; the
 * uapi headers we compile against do not define it, so give it a body (only its size, 4, matters;
 * the names come from the format file at start-up). */
enum skb_drop_reason { NW_SKB_DROP_REASON_ANY = 0 };

TRACEPOINT_PROBE(skb, kfree_skb)
{
	__u32 reason = (__u32)args->reason;
	__u64 zero = 0;
	__u64 *c = nodewire_obs_drops_v1.lookup_or_try_init(&reason, &zero);
	if (c)
		add(c, 1);
	return 0;
}
#endif
