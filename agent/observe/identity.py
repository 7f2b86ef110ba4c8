"""Who an address is: local pods (namespace, name, node) and remote peers (Service, pod or CIDR).

Kernel events carry addresses; the observer turns them into the OTel attributes
`k8s.namespace.name`, `k8s.pod.name`, `k8s.node.name`. Remote peers are named by Service or pod when
the cluster state knows them, else by the first configured CIDR bucket that contains them — never by
the raw remote IP unless `raw_peer_ips` is set, so cardinality stays bounded.

Built as an immutable snapshot from ClusterState; the observer rebuilds it when the state revision
moves, so lookups on the collect path are plain dict reads.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..model.objects import ObjectKey, Pod
from ..state import ClusterState

# Pod annotation: "false" opts a pod out of observation; with ObserveConfig.opt_in, only "true" pods.
OBSERVE_ANNOTATION = "nodewire.io/observe"


@dataclass(frozen=True)
class PodRef:
    key: ObjectKey
    node: str
    ips: tuple[str, ...]

    def attributes(self) -> dict[str, str]:
        return {"k8s.namespace.name": self.key.namespace, "k8s.pod.name": self.key.name,
                "k8s.node.name": self.node}


@dataclass(frozen=True)
class ObserveConfig:
    """What to observe and how to label it; independent of where pods come from (sandbox or CNI)."""

    node_name: str = ""
    # Remote peers not known as a Service or pod are bucketed by the first CIDR containing them.
    peer_cidrs: tuple[str, ...] = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
    raw_peer_ips: bool = False
    opt_in: bool = False                # observe only pods annotated nodewire.io/observe=true
    max_series: int = 10000             # cap on exported series across all kernel-derived metrics
    pods_without_node_are_local: bool = True   # manifests without spec.nodeName (make demo)


def canonical_ip(ip: str) -> str:
    """One spelling per address (IPv4-mapped IPv6 → IPv4), as maps.addr_str gives them."""
    a = ipaddress.ip_address(ip)
    if a.version == 6 and a.ipv4_mapped:
        return str(a.ipv4_mapped)
    return str(a)


def observed(pod: Pod, cfg: ObserveConfig) -> bool:
    value = dict(pod.annotations).get(OBSERVE_ANNOTATION, "").strip().lower()
    if cfg.opt_in:
        return value == "true"
    return value != "false"


@dataclass
class Identity:
    """Address → local pod, and address → peer label, for one state revision."""

    cfg: ObserveConfig
    local: dict[str, PodRef] = field(default_factory=dict)        # ip → observed local pod
    pods: dict[str, ObjectKey] = field(default_factory=dict)      # ip → any known pod
    services: dict[str, ObjectKey] = field(default_factory=dict)  # cluster/external IP → Service
    revision: int = -1
    _nets: list = field(default_factory=list)

    @classmethod
    def from_state(cls, state: ClusterState, cfg: ObserveConfig) -> "Identity":
        ident = cls(cfg=cfg, revision=state.revision)
        ident._nets = [ipaddress.ip_network(c, strict=False) for c in cfg.peer_cidrs]
        for key, pod in list(state.pods.items()):
            for ip in pod.ips:
                ident.pods[canonical_ip(ip)] = key
            local = pod.node_name == cfg.node_name or (not pod.node_name and cfg.pods_without_node_are_local)
            if local and observed(pod, cfg):
                ref = PodRef(key, pod.node_name or cfg.node_name, tuple(canonical_ip(i) for i in pod.ips))
                for ip in ref.ips:
                    ident.local[ip] = ref
        for key, svc in list(state.services.items()):
            for ip in (*svc.cluster_ips, *svc.external_ips):
                ident.services[canonical_ip(ip)] = key
        return ident

    def pod_of(self, ip: str) -> PodRef | None:
        return self.local.get(ip)

    def peer(self, ip: str) -> dict[str, str]:
        """Attributes naming a remote address: nodewire.peer.kind and nodewire.peer.name."""
        if ip in self.services:
            return {"nodewire.peer.kind": "service", "nodewire.peer.name": str(self.services[ip])}
        if ip in self.pods:
            return {"nodewire.peer.kind": "pod", "nodewire.peer.name": str(self.pods[ip])}
        if self.cfg.raw_peer_ips:
            return {"nodewire.peer.kind": "ip", "nodewire.peer.name": ip}
        a = ipaddress.ip_address(ip)
        for net in self._nets:
            if a.version == net.version and a in net:
                return {"nodewire.peer.kind": "cidr", "nodewire.peer.name": str(net)}
        return {"nodewire.peer.kind": "other", "nodewire.peer.name": "other"}
