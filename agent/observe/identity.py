"""Who an address is: local pods (namespace, name, node) and remote peers (Service, pod or CIDR).

Kernel events carry addresses; the observer turns them into the OTel attributes
`k8s.namespace.name`, `k8s.pod.name`, `k8s.node.name`. Remote peers are named by Service or pod when
the cluster state knows them, else by the first configured CIDR bucket that contains them — never by
the raw remote IP unless `raw_peer_ips` is set, so cardinality stays bounded.

Built as an immutable snapshot from ClusterState; the observer rebuilds it when a Pod or Service
changes (ClusterState.identity_revision), so lookups on the collect path are plain dict reads.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..model.objects import ObjectKey, Pod
from ..state import ClusterState

# Pod annotation: "false" opts a pod out of observation; with ObserveConfig.opt_in, only "true" pods.
OBSERVE_ANNOTATION = "nodewire.io/observe"


# ownerReferences kind → the OTel attribute naming the workload (semantic conventions, k8s.*)
WORKLOAD_ATTRIBUTES = {"Deployment": "k8s.deployment.name", "ReplicaSet": "k8s.replicaset.name",
                       "StatefulSet": "k8s.statefulset.name", "DaemonSet": "k8s.daemonset.name",
                       "Job": "k8s.job.name", "CronJob": "k8s.cronjob.name"}
POD_TEMPLATE_HASH = "pod-template-hash"  # label the Deployment controller puts on its ReplicaSets' pods


def workload_of(pod: Pod) -> dict[str, str]:
    """The pod's workload as OTel attributes, from its controller ownerReference: a ReplicaSet named
    "<deployment>-<pod-template-hash>" (the Deployment controller's naming) stands for that
    Deployment, a Job named "<cronjob>-<n>" whose pod carries no hash stays a Job. Empty for bare pods."""
    if not pod.owners:
        return {}
    kind, name = pod.owners[0]
    out = {}
    if kind == "ReplicaSet":
        h = dict(pod.labels).get(POD_TEMPLATE_HASH)
        if h and name.endswith("-" + h):
            out["k8s.deployment.name"] = name[:-len(h) - 1]
    attr = WORKLOAD_ATTRIBUTES.get(kind)
    if attr:
        out[attr] = name
    return out


def workload_name(pod: Pod) -> str | None:
    """"Kind/name" of the pod's top workload (Deployment over ReplicaSet), for aggregation."""
    w = workload_of(pod)
    for kind, attr in WORKLOAD_ATTRIBUTES.items():  # Deployment first, then the pod's own owner
        if attr in w:
            return f"{kind}/{w[attr]}"
    return None


@dataclass(frozen=True)
class PodRef:
    key: ObjectKey
    node: str
    ips: tuple[str, ...]
    workload: tuple[tuple[str, str], ...] = ()   # workload attributes (workload_of)

    def attributes(self) -> dict[str, str]:
        return {"k8s.namespace.name": self.key.namespace, "k8s.pod.name": self.key.name,
                "k8s.node.name": self.node, **dict(self.workload)}


@dataclass(frozen=True)
class ObserveConfig:
    """What to observe and how to label it; independent of where pods come from (sandbox or CNI)."""

    node_name: str = ""
    # Remote peers not known as a Service or pod are bucketed by the first CIDR containing them.
    peer_cidrs: tuple[str, ...] = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
    raw_peer_ips: bool = False
    opt_in: bool = False                # observe only pods annotated nodewire.io/observe=true
    max_series: int = 10000             # cap on exported series across all kernel-derived metrics
    aggregate_by: str = "pod"           # "workload": name peers and backends by workload, not pod
    pod_tc: bool = False                # count pod traffic with bpf/pod_tc.c instead of veth counters
    tcp_probe: bool = False             # per-ACK srtt from tcp:tcp_probe (costs a program per ACK)
    pods_without_node_are_local: bool = True   # manifests without spec.nodeName (make demo)


def canonical_ip(ip: str) -> str:
    """One spelling per address (IPv4-mapped IPv6 → IPv4), as maps.addr_str gives them."""
    a = ipaddress.ip_address(ip)
    if a.version == 6 and a.ipv4_mapped:
        return str(a.ipv4_mapped)
    return str(a)


def port_label(name: str, port: int, protocol: str) -> str:
    """nodewire.service.port: the port's name, or "<port>/<protocol>" when it has none — the same
    value on every metric (connects, refusals, latency), whatever the frontend address."""
    return name or f"{port}/{protocol}"


def observed(pod: Pod, cfg: ObserveConfig) -> bool:
    value = dict(pod.annotations).get(OBSERVE_ANNOTATION, "").strip().lower()
    if cfg.opt_in:
        return value == "true"
    return value != "false"


@dataclass
class Identity:
    """Address → local pod, and address → peer label, for one identity revision (Pods and Services)."""

    cfg: ObserveConfig
    local: dict[str, PodRef] = field(default_factory=dict)        # ip → observed local pod
    pods: dict[str, ObjectKey] = field(default_factory=dict)      # ip → any known pod
    services: dict[str, ObjectKey] = field(default_factory=dict)  # cluster/external IP → Service
    frontends: dict[tuple[str, int], tuple[ObjectKey, str]] = field(default_factory=dict)  # (VIP, port) → Service, port
    shared: list[PodRef] = field(default_factory=list)    # observed local hostNetwork pods: named by cgroup
    workloads: dict[ObjectKey, str] = field(default_factory=dict)  # pod → "Kind/name" of its workload
    revision: int = -1
    _nets: list = field(default_factory=list)

    @classmethod
    def from_state(cls, state: ClusterState, cfg: ObserveConfig) -> "Identity":
        ident = cls(cfg=cfg, revision=state.identity_revision)
        ident._nets = [ipaddress.ip_network(c, strict=False) for c in cfg.peer_cidrs]
        for key, pod in list(state.pods.items()):
            for ip in () if pod.host_network else pod.ips:  # a node address names no one pod
                ident.pods[canonical_ip(ip)] = key
            wl = workload_name(pod)
            if wl:
                ident.workloads[key] = wl
            local = pod.node_name == cfg.node_name or (not pod.node_name and cfg.pods_without_node_are_local)
            if local and observed(pod, cfg):
                ref = PodRef(key, pod.node_name or cfg.node_name, tuple(canonical_ip(i) for i in pod.ips),
                             tuple(sorted(workload_of(pod).items())))
                if pod.host_network:  # its address is the node's: the kernel names it by its cgroup
                    ident.shared.append(ref)
                    continue
                for ip in ref.ips:
                    ident.local[ip] = ref
        for key, svc in list(state.services.items()):
            for ip in (*svc.cluster_ips, *svc.external_ips):
                ident.services[canonical_ip(ip)] = key
                for p in svc.ports:
                    ident.frontends[(canonical_ip(ip), p.port)] = (key, port_label(p.name, p.port, p.protocol))
        return ident

    def pod_of(self, ip: str) -> PodRef | None:
        return self.local.get(ip)

    def pod_name(self, key: ObjectKey) -> tuple[str, str]:
        """(kind, name) of a pod as a peer or backend: the pod, or its workload when aggregating
        by workload (bounded under IP churn: a Deployment keeps its name, its pods do not)."""
        if self.cfg.aggregate_by == "workload" and key in self.workloads:
            return "workload", f"{key.namespace}/{self.workloads[key]}"
        return "pod", str(key)

    def backend(self, ip: str, port: int) -> dict[str, str]:
        """Attributes naming a Service backend: its address, and its pod (or workload) when known."""
        out = {"nodewire.backend.address": (f"[{ip}]" if ":" in ip else ip) + f":{port}"}
        if ip in self.pods:
            kind, name = self.pod_name(self.pods[ip])
            out["nodewire.backend.pod" if kind == "pod" else "nodewire.backend.workload"] = name
            if kind == "workload":
                del out["nodewire.backend.address"]  # the point of aggregating: no per-pod series
        return out

    def peer(self, ip: str) -> dict[str, str]:
        """Attributes naming a remote address: nodewire.peer.kind and nodewire.peer.name."""
        if ip in self.services:
            return {"nodewire.peer.kind": "service", "nodewire.peer.name": str(self.services[ip])}
        if ip in self.pods:
            kind, name = self.pod_name(self.pods[ip])
            return {"nodewire.peer.kind": kind, "nodewire.peer.name": name}
        if self.cfg.raw_peer_ips:
            return {"nodewire.peer.kind": "ip", "nodewire.peer.name": ip}
        a = ipaddress.ip_address(ip)
        for net in self._nets:
            if a.version == net.version and a in net:
                return {"nodewire.peer.kind": "cidr", "nodewire.peer.name": str(net)}
        return {"nodewire.peer.kind": "other", "nodewire.peer.name": "other"}
