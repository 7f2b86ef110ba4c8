/* Per-pod traffic counters: tc clsact (direct-action) on the node side of every pod's veth.
 *
 * Why tc on the veth rather than cgroup_skb on the pod cgroup: the veth sees every frame the pod
 * exchanges (kernel-made replies such as RSTs and ICMP errors, ARP/ND, traffic of processes outside
 * the pod cgroup), which is what "pod network I/O" means to a person reading a dashboard; cgroup_skb
 * only sees packets of the pod's own sockets. It also needs no cgroup id, only the ifindex the CNI
 * gives us.
 *
 * On the node side, tc ingress is what the pod transmits, tc egress is what it receives.
 * skb->len at tc includes the Ethernet header (cls_bpf pushes the MAC header on ingress too).
 * A GSO super-packet counts as gso_segs packets and skb->len bytes (veth never segments it).
 * Never drops or changes anything: always TC_ACT_OK.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#ifndef NW_POD_IFACES_MAX
#define NW_POD_IFACES_MAX 16384
#endif

#define NW_DIR_TRANSMIT 0   /* pod -> network */
#define NW_DIR_RECEIVE 1    /* network -> pod */

struct pod_traffic_key {
	__u32 ifindex;
	__u32 direction;
};

struct pod_traffic_value {
	__u64 packets;
	__u64 bytes;
};

BPF_TABLE("percpu_hash", struct pod_traffic_key, struct pod_traffic_value, nodewire_pod_traffic_v1,
	  NW_POD_IFACES_MAX);

static __always_inline int count(struct __sk_buff *skb, __u32 direction)
{
	struct pod_traffic_key k = {.ifindex = skb->ifindex, .direction = direction};
	struct pod_traffic_value zero = {};
	struct pod_traffic_value *v = nodewire_pod_traffic_v1.lookup_or_try_init(&k, &zero);
	if (v) {
		__u32 segs = skb->gso_segs;
		v->packets += segs ? segs : 1;   /* per-CPU value: no atomics needed */
		v->bytes += skb->len;
	}
	return TC_ACT_OK;
}

int nw_pod_tx(struct __sk_buff *skb)   /* attach: tc ingress of the node-side veth */
{
	return count(skb, NW_DIR_TRANSMIT);
}

int nw_pod_rx(struct __sk_buff *skb)   /* attach: tc egress of the node-side veth */
{
	return count(skb, NW_DIR_RECEIVE);
}
