/* ClusterIP load balancing at the socket: cgroup sock_addr hooks (connect, sendmsg, recvmsg,
 * getpeername; IPv4 and IPv6). The destination is rewritten to a backend once, at connect() or per
 * unconnected UDP sendmsg(), so no packet is ever NATed and no conntrack entry is made.
 * Return 1 = proceed, 0 = reject (with bpf_set_retval choosing the errno).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "lib/lb.h"

static __always_inline void key_from_v4(struct lb_service_key *k, struct bpf_sock_addr *ctx)
{
	k->address[0] = 0;
	k->address[1] = 0;
	k->address[2] = NW_V4MAPPED_WORD;
	k->address[3] = ctx->user_ip4;
	k->port = (__be16)ctx->user_port;
	k->proto = (__u8)ctx->protocol;
}

static __always_inline void key_from_v6(struct lb_service_key *k, struct bpf_sock_addr *ctx)
{
	k->address[0] = ctx->user_ip6[0];
	k->address[1] = ctx->user_ip6[1];
	k->address[2] = ctx->user_ip6[2];
	k->address[3] = ctx->user_ip6[3];
	k->port = (__be16)ctx->user_port;
	k->proto = (__u8)ctx->protocol;
}

static __always_inline int refuse(void)
{
	nw_set_retval(-NW_ECONNREFUSED);
	return 0;
}

static __always_inline int xlate4(struct bpf_sock_addr *ctx)
{
	struct lb_service_key key = {};
	struct lb_backend *be = NULL;
	key_from_v4(&key, ctx);
	int r = lb_select(ctx, &key, &be);
	if (r == NW_SELECT_MISS)
		return 1;
	if (r == NW_SELECT_REFUSE || !be)
		return refuse();
	lb_remember(bpf_get_socket_cookie(ctx), be, key.address, key.port);
	ctx->user_ip4 = be->address[3];
	ctx->user_port = (__u32)be->port;
	return 1;
}

static __always_inline int xlate6(struct bpf_sock_addr *ctx)
{
	struct lb_service_key key = {};
	struct lb_backend *be = NULL;
	key_from_v6(&key, ctx);
	int r = lb_select(ctx, &key, &be);
	if (r == NW_SELECT_MISS)
		return 1;
	if (r == NW_SELECT_REFUSE || !be)
		return refuse();
	lb_remember(bpf_get_socket_cookie(ctx), be, key.address, key.port);
	ctx->user_ip6[0] = be->address[0];
	ctx->user_ip6[1] = be->address[1];
	ctx->user_ip6[2] = be->address[2];
	ctx->user_ip6[3] = be->address[3];
	ctx->user_port = (__u32)be->port;
	return 1;
}

/* A reply or getpeername() from a backend this socket reached through a VIP: show the VIP. */
static __always_inline int revnat4(struct bpf_sock_addr *ctx)
{
	__u32 addr[4] = {0, 0, NW_V4MAPPED_WORD, ctx->user_ip4};
	struct lb_revnat_value *v = lb_recall(bpf_get_socket_cookie(ctx), addr, (__be16)ctx->user_port);
	if (v) {
		ctx->user_ip4 = v->address[3];
		ctx->user_port = (__u32)v->port;
	}
	return 1;
}

static __always_inline int revnat6(struct bpf_sock_addr *ctx)
{
	__u32 addr[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	struct lb_revnat_value *v = lb_recall(bpf_get_socket_cookie(ctx), addr, (__be16)ctx->user_port);
	if (v) {
		ctx->user_ip6[0] = v->address[0];
		ctx->user_ip6[1] = v->address[1];
		ctx->user_ip6[2] = v->address[2];
		ctx->user_ip6[3] = v->address[3];
		ctx->user_port = (__u32)v->port;
	}
	return 1;
}

int nw_connect4(struct bpf_sock_addr *ctx) { return xlate4(ctx); }
int nw_connect6(struct bpf_sock_addr *ctx) { return xlate6(ctx); }
int nw_sendmsg4(struct bpf_sock_addr *ctx) { return xlate4(ctx); }
int nw_sendmsg6(struct bpf_sock_addr *ctx) { return xlate6(ctx); }
int nw_recvmsg4(struct bpf_sock_addr *ctx) { return revnat4(ctx); }
int nw_recvmsg6(struct bpf_sock_addr *ctx) { return revnat6(ctx); }
int nw_getpeername4(struct bpf_sock_addr *ctx) { return revnat4(ctx); }
int nw_getpeername6(struct bpf_sock_addr *ctx) { return revnat6(ctx); }
