/* RDMA verbs latency: uprobes on a provider's post_send/post_recv/poll_cq, found through the ops
 * table of the ibv_context that ibv_open_device returns (see agent/rdma/verbs.py).
 *
 * Only pt_regs, helpers and user memory: every struct offset (NW_CTX_*, NW_QP_*, NW_SWR_*, NW_WC_*)
 * comes from agent/rdma/layout.py, which compiles against the real <infiniband/verbs.h>.
 *
 * post side: each posted WR that will produce a completion (signaled, or on a QP created with
 *            sq_sig_all — seen by probes on ibv_create_qp; receives always) is stamped
 *            in an LRU map under (tgid, qp_num, wr_id, direction). NCCL reuses wr_ids and signals
 *            only the last WR of a chain, so the key is per QP and unsignaled WRs are not stamped.
 * poll side: poll_cq's entry remembers the wc array; its return reads the `ret` completions and
 *            turns (now - stamp) into a log2 histogram slot per (tgid, qp, direction); completions
 *            with a non-zero status are counted per (tgid, qp, status) whether or not they match.
 * Histogram slots: lib/hist.h (slot s holds 2^(s-1) < v <= 2^s µs), shared with the observability
 * programs, so slots export bucket for bucket.
 * Maps are not pinned: the uprobes die with the agent's perf fds, so their state goes too.
 */
#include <uapi/linux/ptrace.h>
/* NW_HIST_SLOTS comes from agent/histogram.py (-D) */
#include "lib/hist.h"

#ifndef NW_CHAIN_MAX
#define NW_CHAIN_MAX 16          /* WRs of one chain walked per post (bounded loop) */
#endif
#ifndef NW_WC_MAX
#define NW_WC_MAX 16             /* completions read per poll return */
#endif
#ifndef NW_POSTS_MAX
#define NW_POSTS_MAX 65536
#endif
#define NW_HIST_SUM_SLOT 255     /* the slot that holds the sum of the values (µs) */

struct nw_post_key { u32 tgid; u32 qp_num; u64 wr_id; u32 recv; u32 pad; };
struct nw_lat_key { u32 tgid; u32 qp_num; u32 recv; u32 slot; };
struct nw_err_key { u32 tgid; u32 qp_num; u32 status; u32 pad; };
struct nw_qp_key { u32 tgid; u32 qp_num; };
struct nw_poll_args { u64 wc; s32 n; u32 pad; };
struct nw_open_event {
	u32 tgid; u32 pad;
	u64 ctx, post_send, post_recv, poll_cq;
	char dev_name[64];
};

enum nw_stat {
	NW_STAT_POSTED = 0,      /* WRs stamped */
	NW_STAT_COMPLETED,       /* completions read */
	NW_STAT_MATCHED,         /* completions that found their stamp */
	NW_STAT_STALE,           /* stamps from before the current sampling window, discarded */
	NW_STAT_CHAIN_TRUNC,     /* chains longer than NW_CHAIN_MAX (tail not stamped) */
	NW_STAT_WC_TRUNC,        /* polls returning more than NW_WC_MAX (rest not read) */
	NW_STAT_MAX,
};
enum nw_cfg { NW_CFG_WINDOW_START = 0, NW_CFG_MAX };

BPF_TABLE("lru_hash", struct nw_post_key, u64, nw_rdma_posts_v1, NW_POSTS_MAX);
BPF_HASH(nw_rdma_lat_v1, struct nw_lat_key, u64, 65536);
BPF_HASH(nw_rdma_err_v1, struct nw_err_key, u64, 16384);
BPF_HASH(nw_rdma_qp_ctx_v1, struct nw_qp_key, u64, 65536);
BPF_HASH(nw_rdma_polls_v1, u64, struct nw_poll_args, 4096);
BPF_HASH(nw_rdma_create_qp_v1, u64, u64, 4096);              /* thread → ibv_qp_init_attr * */
BPF_HASH(nw_rdma_sig_all_v1, struct nw_qp_key, u32, 65536);  /* QPs created with sq_sig_all */
BPF_HASH(nw_rdma_procs_v1, u32, u32, 4096);
BPF_HASH(nw_rdma_cgroups_v1, u64, u32, 4096);
BPF_ARRAY(nw_rdma_stats_v1, u64, NW_STAT_MAX);
BPF_ARRAY(nw_rdma_cfg_v1, u64, NW_CFG_MAX);
BPF_PERF_OUTPUT(nw_rdma_events);

static __always_inline void nw_stat(u32 i, u64 n)
{
	u64 *v = nw_rdma_stats_v1.lookup(&i);
	if (v)
		__sync_fetch_and_add(v, n);
}

#ifndef NW_CGROUP_LEVELS
#define NW_CGROUP_LEVELS 12      /* cgroup v2 depth searched for an opted-in ancestor */
#endif

/* the process's cgroup, or one of its ancestors, is opted in (a pod's cgroup id in
 * nw_rdma_cgroups_v1: container processes sit in child cgroups of their pod's), or no filter */
static __always_inline int nw_opted_in(void)
{
#ifdef NW_CGROUP_FILTER
#pragma unroll
	for (int level = 1; level <= NW_CGROUP_LEVELS; level++) {
		u64 id = bpf_get_current_ancestor_cgroup_id(level);
		if (!id)
			break;
		if (nw_rdma_cgroups_v1.lookup(&id))
			return 1;
	}
	return 0;
#else
	return 1;
#endif
}

/* uretprobe on ibv_open_device: hand the new context's ops table to user space */
int nw_open_ret(struct pt_regs *ctx)
{
	if (!nw_opted_in())
		return 0;
	u64 vctx = PT_REGS_RC(ctx);
	if (!vctx)
		return 0;
	struct nw_open_event ev = {};
	ev.tgid = bpf_get_current_pid_tgid() >> 32;
	ev.ctx = vctx;
	bpf_probe_read_user(&ev.post_send, 8, (void *)(vctx + NW_CTX_POST_SEND));
	bpf_probe_read_user(&ev.post_recv, 8, (void *)(vctx + NW_CTX_POST_RECV));
	bpf_probe_read_user(&ev.poll_cq, 8, (void *)(vctx + NW_CTX_POLL_CQ));
	u64 dev = 0;
	bpf_probe_read_user(&dev, 8, (void *)(vctx + NW_CTX_DEVICE));
	if (dev)
		bpf_probe_read_user_str(ev.dev_name, sizeof(ev.dev_name), (void *)(dev + NW_DEV_NAME));
	nw_rdma_events.perf_submit(ctx, &ev, sizeof(ev));
	return 0;
}

/* ibv_create_qp (exported): a QP created with sq_sig_all completes every send WR, signaled or not */
int nw_create_qp_enter(struct pt_regs *ctx)
{
	if (!nw_opted_in())
		return 0;
	u64 id = bpf_get_current_pid_tgid(), attr = PT_REGS_PARM2(ctx);
	nw_rdma_create_qp_v1.update(&id, &attr);
	return 0;
}

int nw_create_qp_ret(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u64 *attr = nw_rdma_create_qp_v1.lookup(&id);
	if (!attr)
		return 0;
	u64 a = *attr;
	nw_rdma_create_qp_v1.delete(&id);
	u64 qp = PT_REGS_RC(ctx);
	int sig_all = 0;
	if (!qp || !a)
		return 0;
	bpf_probe_read_user(&sig_all, 4, (void *)(a + NW_QPIA_SQ_SIG_ALL));
	if (!sig_all)
		return 0;
	struct nw_qp_key qk = { .tgid = id >> 32 };
	u32 one = 1;
	bpf_probe_read_user(&qk.qp_num, 4, (void *)(qp + NW_QP_NUM));
	nw_rdma_sig_all_v1.update(&qk, &one);
	return 0;
}

static __always_inline int nw_record_posts(struct pt_regs *ctx, u32 recv)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!nw_rdma_procs_v1.lookup(&tgid))
		return 0;
	u64 qp = PT_REGS_PARM1(ctx), wr = PT_REGS_PARM2(ctx);
	struct nw_post_key k = {};
	k.tgid = tgid;
	k.recv = recv;
	bpf_probe_read_user(&k.qp_num, 4, (void *)(qp + NW_QP_NUM));
	struct nw_qp_key qk = { .tgid = tgid, .qp_num = k.qp_num };
	u32 sig_all = !recv && nw_rdma_sig_all_v1.lookup(&qk) ? NW_SEND_SIGNALED : 0;
	if (!nw_rdma_qp_ctx_v1.lookup(&qk)) {
		u64 qctx = 0;
		bpf_probe_read_user(&qctx, 8, (void *)(qp + NW_QP_CONTEXT));
		nw_rdma_qp_ctx_v1.update(&qk, &qctx);
	}
	u64 now = bpf_ktime_get_ns();
	u64 stamped = 0;
	/* a bounded loop (kernel >= 5.3 verifies it without unrolling) */
	for (int i = 0; i < NW_CHAIN_MAX; i++) {
		if (!wr)
			break;
		u32 flags = 0;
		if (recv) {
			bpf_probe_read_user(&k.wr_id, 8, (void *)(wr + NW_RWR_WR_ID));
			flags = NW_SEND_SIGNALED;
			bpf_probe_read_user(&wr, 8, (void *)(wr + NW_RWR_NEXT));
		} else {
			bpf_probe_read_user(&k.wr_id, 8, (void *)(wr + NW_SWR_WR_ID));
			bpf_probe_read_user(&flags, 4, (void *)(wr + NW_SWR_SEND_FLAGS));
			bpf_probe_read_user(&wr, 8, (void *)(wr + NW_SWR_NEXT));
		}
		if ((flags | sig_all) & NW_SEND_SIGNALED) {
			nw_rdma_posts_v1.update(&k, &now);
			stamped++;
		}
	}
	nw_stat(NW_STAT_POSTED, stamped);
	if (wr)
		nw_stat(NW_STAT_CHAIN_TRUNC, 1);
	return 0;
}

int nw_post_send(struct pt_regs *ctx) { return nw_record_posts(ctx, 0); }
int nw_post_recv(struct pt_regs *ctx) { return nw_record_posts(ctx, 1); }

int nw_poll_enter(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	if (!nw_rdma_procs_v1.lookup(&tgid))
		return 0;
	struct nw_poll_args a = { .wc = PT_REGS_PARM3(ctx), .n = (s32)PT_REGS_PARM2(ctx) };
	nw_rdma_polls_v1.update(&id, &a);
	return 0;
}

int nw_poll_ret(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	struct nw_poll_args *ap = nw_rdma_polls_v1.lookup(&id);
	if (!ap)
		return 0;
	struct nw_poll_args a = *ap;
	nw_rdma_polls_v1.delete(&id);
	int ret = (int)PT_REGS_RC(ctx);
	if (ret <= 0)
		return 0;
	u32 tgid = id >> 32;
	u64 now = bpf_ktime_get_ns();
	u32 wkey = NW_CFG_WINDOW_START;
	u64 *window = nw_rdma_cfg_v1.lookup(&wkey);
	u64 window_start = window ? *window : 0;
	u64 matched = 0, stale = 0;
	int n = 0;
#pragma unroll
	for (int i = 0; i < NW_WC_MAX; i++) {
		if (i >= ret || i >= a.n)
			break;
		n++;
		u64 w = a.wc + (u64)i * NW_WC_SIZE;
		struct nw_post_key k = {};
		u32 status = 0, opcode = 0;
		k.tgid = tgid;
		bpf_probe_read_user(&k.wr_id, 8, (void *)(w + NW_WC_WR_ID));
		bpf_probe_read_user(&status, 4, (void *)(w + NW_WC_STATUS));
		bpf_probe_read_user(&opcode, 4, (void *)(w + NW_WC_OPCODE));
		bpf_probe_read_user(&k.qp_num, 4, (void *)(w + NW_WC_QP_NUM));
		k.recv = (opcode & NW_WC_RECV) ? 1 : 0;
		if (status) {
			struct nw_err_key ek = { .tgid = tgid, .qp_num = k.qp_num, .status = status };
			nw_rdma_err_v1.increment(ek);
		}
		u64 *ts = nw_rdma_posts_v1.lookup(&k);
		if (!ts)
			continue;
		u64 t = *ts;
		nw_rdma_posts_v1.delete(&k);
		if (t < window_start) {
			stale++;
			continue;
		}
		u64 us = (now - t) / 1000;
		u32 slot = nw_hist_slot(us);
		struct nw_lat_key lk = { .tgid = tgid, .qp_num = k.qp_num, .recv = k.recv, .slot = slot };
		nw_rdma_lat_v1.increment(lk);
		lk.slot = NW_HIST_SUM_SLOT;
		nw_rdma_lat_v1.increment(lk, us);
		matched++;
	}
	nw_stat(NW_STAT_COMPLETED, n);
	nw_stat(NW_STAT_MATCHED, matched);
	if (stale)
		nw_stat(NW_STAT_STALE, stale);
	if (ret > NW_WC_MAX && a.n > NW_WC_MAX)
		nw_stat(NW_STAT_WC_TRUNC, 1);
	return 0;
}
