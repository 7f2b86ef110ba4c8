/* A mock RDMA provider (like libmlx5): post_send/post_recv/poll_cq are static and the library is
 * stripped, so they have no symbol; libibverbs' inline ibv_post_send()/ibv_poll_cq() reach them
 * through context->ops only.
 *
 * It models what a tracer must get right, not a network: work requests complete at once into the
 * QP's CQ, in order, with the semantics of real queues —
 *  - a send WR produces a completion only if signaled (IBV_SEND_SIGNALED or sq_sig_all), but a WR
 *    that fails always produces one;
 *  - RDMA write/read with rkey 0 fails with IBV_WC_REM_ACCESS_ERR;
 *  - a SEND consumes a receive posted on the peer QP (qp_num ^ 1) and completes it there with
 *    IBV_WC_RECV; with none posted it fails with IBV_WC_RNR_RETRY_EXC_ERR;
 *  - after an error the QP is in the error state: every later WR (send or receive) is flushed with
 *    IBV_WC_WR_FLUSH_ERR.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "mockverbs.h"

#define RING 4096
#define QP_BASE 0x100
#define QP_MAX 1024

struct mock_cq {
	struct ibv_cq ibv;
	pthread_spinlock_t lock;
	unsigned head, tail;               /* tail - head = entries waiting */
	struct ibv_wc ring[RING];
};

struct mock_qp {
	struct ibv_qp ibv;
	int sig_all;
	pthread_spinlock_t lock;
	unsigned rq_head, rq_tail;
	uint64_t rq[RING];
};

static struct mock_qp *qps[QP_MAX];
static unsigned next_qp;

static void push_wc(struct ibv_cq *ibcq, uint64_t wr_id, enum ibv_wc_status status,
		    enum ibv_wc_opcode opcode, uint32_t qp_num)
{
	struct mock_cq *cq = (struct mock_cq *)ibcq;
	pthread_spin_lock(&cq->lock);
	if (cq->tail - cq->head < RING) {
		struct ibv_wc *wc = &cq->ring[cq->tail++ % RING];
		memset(wc, 0, sizeof(*wc));
		wc->wr_id = wr_id;
		wc->status = status;
		wc->opcode = opcode;
		wc->qp_num = qp_num;
	}
	pthread_spin_unlock(&cq->lock);
}

static int pop_recv(struct mock_qp *qp, uint64_t *wr_id)
{
	int ok = 0;
	pthread_spin_lock(&qp->lock);
	if (qp->rq_tail != qp->rq_head) {
		*wr_id = qp->rq[qp->rq_head++ % RING];
		ok = 1;
	}
	pthread_spin_unlock(&qp->lock);
	return ok;
}

static enum ibv_wc_opcode wc_opcode(enum ibv_wr_opcode op)
{
	switch (op) {
	case IBV_WR_RDMA_WRITE:
	case IBV_WR_RDMA_WRITE_WITH_IMM: return IBV_WC_RDMA_WRITE;
	case IBV_WR_RDMA_READ: return IBV_WC_RDMA_READ;
	default: return IBV_WC_SEND;
	}
}

static int mock_post_send(struct ibv_qp *ibqp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr)
{
	struct mock_qp *qp = (struct mock_qp *)ibqp;
	(void)bad_wr;
	for (; wr; wr = wr->next) {
		enum ibv_wc_status st = IBV_WC_SUCCESS;
		if (ibqp->state == IBV_QPS_ERR) {
			st = IBV_WC_WR_FLUSH_ERR;
		} else if (wr->opcode == IBV_WR_RDMA_WRITE || wr->opcode == IBV_WR_RDMA_WRITE_WITH_IMM ||
			   wr->opcode == IBV_WR_RDMA_READ) {
			if (wr->wr.rdma.rkey == 0)
				st = IBV_WC_REM_ACCESS_ERR;
		} else {
			unsigned peer = (ibqp->qp_num ^ 1) - QP_BASE;
			uint64_t rid;
			if (peer < QP_MAX && qps[peer] && qps[peer]->ibv.state != IBV_QPS_ERR &&
			    pop_recv(qps[peer], &rid))
				push_wc(qps[peer]->ibv.recv_cq, rid, IBV_WC_SUCCESS, IBV_WC_RECV,
					qps[peer]->ibv.qp_num);
			else
				st = IBV_WC_RNR_RETRY_EXC_ERR;
		}
		if (st != IBV_WC_SUCCESS)
			ibqp->state = IBV_QPS_ERR;
		if (st != IBV_WC_SUCCESS || (wr->send_flags & IBV_SEND_SIGNALED) || qp->sig_all)
			push_wc(ibqp->send_cq, wr->wr_id, st, wc_opcode(wr->opcode), ibqp->qp_num);
	}
	return 0;
}

static int mock_post_recv(struct ibv_qp *ibqp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr)
{
	struct mock_qp *qp = (struct mock_qp *)ibqp;
	(void)bad_wr;
	for (; wr; wr = wr->next) {
		if (ibqp->state == IBV_QPS_ERR) {
			push_wc(ibqp->recv_cq, wr->wr_id, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, ibqp->qp_num);
			continue;
		}
		pthread_spin_lock(&qp->lock);
		qp->rq[qp->rq_tail++ % RING] = wr->wr_id;
		pthread_spin_unlock(&qp->lock);
	}
	return 0;
}

static int mock_poll_cq(struct ibv_cq *ibcq, int num_entries, struct ibv_wc *wc)
{
	struct mock_cq *cq = (struct mock_cq *)ibcq;
	int n = 0;
	pthread_spin_lock(&cq->lock);
	while (n < num_entries && cq->head != cq->tail)
		wc[n++] = cq->ring[cq->head++ % RING];
	pthread_spin_unlock(&cq->lock);
	return n;
}

static struct ibv_cq *mock_create_cq(struct ibv_context *ctx, int cqe)
{
	struct mock_cq *cq = calloc(1, sizeof(*cq));
	if (!cq)
		return NULL;
	pthread_spin_init(&cq->lock, PTHREAD_PROCESS_PRIVATE);
	cq->ibv.context = ctx;
	cq->ibv.cqe = cqe;
	return &cq->ibv;
}

static struct ibv_qp *mock_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *attr)
{
	unsigned i = __atomic_fetch_add(&next_qp, 1, __ATOMIC_SEQ_CST);
	if (i >= QP_MAX)
		return NULL;
	struct mock_qp *qp = calloc(1, sizeof(*qp));
	if (!qp)
		return NULL;
	pthread_spin_init(&qp->lock, PTHREAD_PROCESS_PRIVATE);
	qp->ibv.context = pd->context;
	qp->ibv.pd = pd;
	qp->ibv.send_cq = attr->send_cq;
	qp->ibv.recv_cq = attr->recv_cq;
	qp->ibv.qp_num = QP_BASE + i;
	qp->ibv.qp_type = attr->qp_type;
	qp->ibv.state = IBV_QPS_RTS;       /* connected: this mock has no modify_qp state machine */
	qp->sig_all = attr->sq_sig_all;
	qps[i] = qp;
	return &qp->ibv;
}

struct mock_context *mockprov_alloc_context(struct ibv_device *dev)
{
	struct mock_context *mc = calloc(1, sizeof(*mc));
	if (!mc)
		return NULL;
	mc->ibv.device = dev;
	mc->ibv.num_comp_vectors = 1;
	mc->ibv.ops.post_send = mock_post_send;
	mc->ibv.ops.post_recv = mock_post_recv;
	mc->ibv.ops.poll_cq = mock_poll_cq;
	mc->create_cq = mock_create_cq;
	mc->create_qp = mock_create_qp;
	return mc;
}
