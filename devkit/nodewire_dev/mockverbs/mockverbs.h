/* Shared between the mock libibverbs and the mock provider only (applications never see it), as
 * rdma-core's verbs_context is shared between libibverbs and its providers. */
#ifndef NW_MOCKVERBS_H
#define NW_MOCKVERBS_H
#include <infiniband/verbs.h>

struct mock_context {
	struct ibv_context ibv;            /* first: applications get &ibv, ops included */
	struct ibv_cq *(*create_cq)(struct ibv_context *ctx, int cqe);
	struct ibv_qp *(*create_qp)(struct ibv_pd *pd, struct ibv_qp_init_attr *attr);
};

/* the provider's one exported entry point (real providers register through a constructor) */
typedef struct mock_context *(*mockprov_alloc_fn)(struct ibv_device *dev);
#define MOCKPROV_ALLOC "mockprov_alloc_context"
#define MOCKPROV_FILE "libmockprov-rdmav34.so"
#endif
