/* A verbs application for tests and benchmarks: it uses only the public API of <infiniband/verbs.h>
 * (so ibv_post_send/ibv_poll_cq are the header's inline calls through context->ops, exactly as in
 * NCCL) and runs a script given as arguments, one command per argument:
 *
 *   qps:N               create N RC QPs (qp_num 0x100, 0x101, ...), each with its own send/recv CQ
 *   qpsall:N            the same with sq_sig_all = 1 (every send WR completes)
 *   ready               print "ready <pid>" and wait for a line on stdin
 *   chain:Q:ID,ID,...   post one chain of RDMA writes on QP index Q; only the last is signaled
 *   write:Q:ID          one signaled RDMA write      unsig:Q:ID  one unsignaled RDMA write
 *   bad:Q:ID            one signaled RDMA write with rkey 0 (fails: REM_ACCESS_ERR)
 *   send:Q:ID           one signaled SEND             recv:Q:ID   post one receive
 *   sleep:MS            sleep MS milliseconds
 *   poll:Q:send|recv:N  poll that CQ until N completions arrived; print each
 *   bench:Q:N:CHAIN     N times: post a chain of CHAIN writes (last signaled), poll until it completes;
 *                       print "bench wrs=<N*CHAIN> ns=<elapsed> polls=<poll calls>"
 *   mt:Q:N              like NCCL's proxy: a second thread busy-polls QP Q's send CQ until N
 *                       completions arrived, while this thread posts N signaled writes, 1 ms apart
 *   rate:Q:R:MS         paced load: for MS milliseconds, every 1 ms post R/1000 single signaled writes,
 *                       each polled to completion, then sleep to the next tick; print
 *                       "rate wrs=<posted> ns=<elapsed> cpu_ns=<user+system CPU of this process>"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>
#include <pthread.h>
#include <infiniband/verbs.h>

#define MAXQ 64
static struct ibv_qp *qp[MAXQ];
static int nq;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what) { fprintf(stderr, "driver: %s\n", what); exit(2); }

static void post_write(int q, uint64_t id, int signaled, uint32_t rkey)
{
	struct ibv_sge sge = { .addr = 0, .length = 64, .lkey = 1 };
	struct ibv_send_wr wr = { .wr_id = id, .sg_list = &sge, .num_sge = 1,
				  .opcode = IBV_WR_RDMA_WRITE,
				  .send_flags = signaled ? IBV_SEND_SIGNALED : 0 };
	struct ibv_send_wr *bad;
	wr.wr.rdma.rkey = rkey;
	if (ibv_post_send(qp[q], &wr, &bad))
		die("post_send");
}

static void post_chain(int q, uint64_t *ids, int n)
{
	struct ibv_sge sge = { .addr = 0, .length = 64, .lkey = 1 };
	struct ibv_send_wr wr[64], *bad;
	memset(wr, 0, sizeof(wr));
	for (int i = 0; i < n; i++) {
		wr[i].wr_id = ids[i];
		wr[i].sg_list = &sge;
		wr[i].num_sge = 1;
		wr[i].opcode = IBV_WR_RDMA_WRITE;
		wr[i].wr.rdma.rkey = 1;
		wr[i].send_flags = i == n - 1 ? IBV_SEND_SIGNALED : 0;
		wr[i].next = i == n - 1 ? NULL : &wr[i + 1];
	}
	if (ibv_post_send(qp[q], wr, &bad))
		die("post_send chain");
}

static uint64_t polls;

static void poll_n(struct ibv_cq *cq, int n, int print)
{
	struct ibv_wc wc[16];
	while (n > 0) {
		int got = ibv_poll_cq(cq, n < 16 ? n : 16, wc);
		polls++;
		if (got < 0)
			die("poll_cq");
		for (int i = 0; i < got; i++)
			if (print)
				printf("wc qp=0x%x wr_id=%llu status=%d opcode=%d\n", wc[i].qp_num,
				       (unsigned long long)wc[i].wr_id, wc[i].status, wc[i].opcode);
		n -= got;
	}
}

struct poller { struct ibv_cq *cq; int n; };

static void *poller_main(void *arg)
{
	struct poller *p = arg;
	poll_n(p->cq, p->n, 0);
	return NULL;
}

int main(int argc, char **argv)
{
	int ndev;
	struct ibv_device **devs = ibv_get_device_list(&ndev);
	if (!devs || ndev < 1)
		die("no device");
	struct ibv_context *ctx = ibv_open_device(devs[0]);
	if (!ctx)
		die("open_device");
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int a = 1; a < argc; a++) {
		char cmd[32] = "";
		int q = 0;
		unsigned long long x = 0, y = 0;
		char *arg = argv[a], *c = strchr(arg, ':');
		snprintf(cmd, sizeof(cmd), "%.*s", c ? (int)(c - arg) : (int)strlen(arg), arg);
		if (!strcmp(cmd, "qps") || !strcmp(cmd, "qpsall")) {
			int n = atoi(c + 1), all = !strcmp(cmd, "qpsall");
			for (int i = 0; i < n && nq < MAXQ; i++) {
				struct ibv_qp_init_attr attr = { .qp_type = IBV_QPT_RC,
					.send_cq = ibv_create_cq(ctx, 4096, NULL, NULL, 0),
					.recv_cq = ibv_create_cq(ctx, 4096, NULL, NULL, 0),
					.cap = { .max_send_wr = 4096, .max_recv_wr = 4096 },
					.sq_sig_all = all };
				if (!(qp[nq++] = ibv_create_qp(pd, &attr)))
					die("create_qp");
			}
		} else if (!strcmp(cmd, "ready")) {
			char line[64];
			printf("ready %d\n", getpid());
			if (!fgets(line, sizeof(line), stdin))
				return 0;
		} else if (!strcmp(cmd, "chain")) {
			uint64_t ids[64];
			int n = 0;
			char *p = strchr(c + 1, ':') + 1;
			q = atoi(c + 1);
			for (char *t = strtok(p, ","); t && n < 64; t = strtok(NULL, ","))
				ids[n++] = strtoull(t, NULL, 0);
			post_chain(q, ids, n);
		} else if (!strcmp(cmd, "write") || !strcmp(cmd, "unsig") || !strcmp(cmd, "bad")) {
			sscanf(c + 1, "%d:%llu", &q, &x);
			post_write(q, x, strcmp(cmd, "unsig") != 0, strcmp(cmd, "bad") ? 1 : 0);
		} else if (!strcmp(cmd, "send")) {
			struct ibv_send_wr wr = { .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED }, *bad;
			sscanf(c + 1, "%d:%llu", &q, &x);
			wr.wr_id = x;
			if (ibv_post_send(qp[q], &wr, &bad))
				die("post_send");
		} else if (!strcmp(cmd, "recv")) {
			struct ibv_recv_wr wr = { 0 }, *bad;
			sscanf(c + 1, "%d:%llu", &q, &x);
			wr.wr_id = x;
			if (ibv_post_recv(qp[q], &wr, &bad))
				die("post_recv");
		} else if (!strcmp(cmd, "sleep")) {
			unsigned long ms = strtoul(c + 1, NULL, 0);
			struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
			while (nanosleep(&ts, &ts))
				;
		} else if (!strcmp(cmd, "poll")) {
			char which[8] = "";
			int n = 0;
			sscanf(c + 1, "%d:%7[a-z]:%d", &q, which, &n);
			poll_n(strcmp(which, "recv") ? qp[q]->send_cq : qp[q]->recv_cq, n, 1);
		} else if (!strcmp(cmd, "bench")) {
			uint64_t ids[64];
			sscanf(c + 1, "%d:%llu:%llu", &q, &x, &y);
			if (y < 1 || y > 64)
				die("bench chain length must be 1..64");
			polls = 0;
			uint64_t t0 = now_ns();
			for (unsigned long long i = 0; i < x; i++) {
				for (unsigned long long j = 0; j < y; j++)
					ids[j] = i * y + j;
				post_chain(q, ids, (int)y);
				poll_n(qp[q]->send_cq, 1, 0);
			}
			printf("bench wrs=%llu ns=%llu polls=%llu\n", x * y,
			       (unsigned long long)(now_ns() - t0), (unsigned long long)polls);
		} else if (!strcmp(cmd, "mt")) {
			pthread_t th;
			struct poller pl;
			sscanf(c + 1, "%d:%llu", &q, &x);
			pl.cq = qp[q]->send_cq;
			pl.n = (int)x;
			pthread_create(&th, NULL, poller_main, &pl);
			for (unsigned long long i = 0; i < x; i++) {
				struct timespec ts = { 0, 1000000L };
				post_write(q, 1000 + i, 1, 1);
				nanosleep(&ts, NULL);
			}
			pthread_join(th, NULL);
			printf("mt done n=%llu polls=%llu\n", x, (unsigned long long)polls);
		} else if (!strcmp(cmd, "rate")) {
			struct rusage r0, r1;
			struct timespec tick;
			unsigned long long done = 0, id = 0;
			sscanf(c + 1, "%d:%llu:%llu", &q, &x, &y);
			getrusage(RUSAGE_SELF, &r0);
			clock_gettime(CLOCK_MONOTONIC, &tick);
			uint64_t t0 = now_ns();
			for (unsigned long long t = 0; t < y; t++) {
				for (unsigned long long i = 0; i < x / 1000; i++) {
					post_write(q, id++, 1, 1);
					poll_n(qp[q]->send_cq, 1, 0);
					done++;
				}
				tick.tv_nsec += 1000000;
				if (tick.tv_nsec >= 1000000000) {
					tick.tv_nsec -= 1000000000;
					tick.tv_sec++;
				}
				clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &tick, NULL);
			}
			uint64_t el = now_ns() - t0;
			getrusage(RUSAGE_SELF, &r1);
			uint64_t cpu = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec + r1.ru_stime.tv_sec - r0.ru_stime.tv_sec)
				* 1000000000ull + (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec +
				r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) * 1000ll;
			printf("rate wrs=%llu ns=%llu cpu_ns=%llu\n", done, (unsigned long long)el,
			       (unsigned long long)cpu);
		} else {
			fprintf(stderr, "driver: unknown command %s\n", arg);
			return 2;
		}
	}
	return 0;
}
