/* A stand-in for rdma-core's libibverbs.so.1: the same exported entry points and the same public
 * structs (taken from the real <infiniband/verbs.h>), one fake device, and a provider loaded with
 * dlopen whose data-path functions are reachable only through context->ops — as with mlx5. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mockverbs.h"

static struct ibv_device mock_dev = {
	.node_type = IBV_NODE_CA,
	.transport_type = IBV_TRANSPORT_IB,
	.name = "mockx_0",
	.dev_name = "uverbs0",
};
static struct ibv_device *dev_list[2] = { &mock_dev, NULL };

struct ibv_device **ibv_get_device_list(int *num_devices)
{
	if (num_devices)
		*num_devices = 1;
	return dev_list;
}

void ibv_free_device_list(struct ibv_device **list) { (void)list; }

const char *ibv_get_device_name(struct ibv_device *device) { return device->name; }

struct ibv_context *ibv_open_device(struct ibv_device *device)
{
	Dl_info info;
	char here[PATH_MAX], path[PATH_MAX];
	if (!dladdr((void *)ibv_open_device, &info))
		return NULL;
	snprintf(here, sizeof(here), "%s", info.dli_fname);
	snprintf(path, sizeof(path), "%s/%s", dirname(here), MOCKPROV_FILE);
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		fprintf(stderr, "mock libibverbs: %s\n", dlerror());
		return NULL;
	}
	mockprov_alloc_fn alloc = (mockprov_alloc_fn)dlsym(h, MOCKPROV_ALLOC);
	struct mock_context *mc = alloc ? alloc(device) : NULL;
	return mc ? &mc->ibv : NULL;
}

int ibv_close_device(struct ibv_context *context) { free(context); return 0; }

struct ibv_pd *ibv_alloc_pd(struct ibv_context *context)
{
	struct ibv_pd *pd = calloc(1, sizeof(*pd));
	if (pd)
		pd->context = context;
	return pd;
}

struct ibv_cq *ibv_create_cq(struct ibv_context *context, int cqe, void *cq_context,
			     struct ibv_comp_channel *channel, int comp_vector)
{
	(void)channel; (void)comp_vector;
	struct ibv_cq *cq = ((struct mock_context *)context)->create_cq(context, cqe);
	if (cq)
		cq->cq_context = cq_context;
	return cq;
}

struct ibv_qp *ibv_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *attr)
{
	return ((struct mock_context *)pd->context)->create_qp(pd, attr);
}
