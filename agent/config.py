"""One typed configuration for the agent, validated at start-up."""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from .datapath.loader import MapSizes

DEFAULT_PIN_DIR = "/sys/fs/bpf/nodewire"


def state_dir_for(pin_dir: str) -> str:
    """Where the agent writes status.json for a given pin dir (bpffs holds only pins, not files).
    Every command that takes --pin-dir finds the agent's status this way."""
    return os.path.join("/run/nodewire", re.sub(r"[^A-Za-z0-9_.-]", "_", pin_dir.strip("/")) or "root")


@dataclass
class AgentConfig:
    manifests: str | None = None
    kube: bool = False  # list+watch the Kubernetes API (in-cluster config, or kubeconfig/api_server)
    kubeconfig: str | None = None
    api_server: str | None = None
    cgroup: str | None = None  # None: the node's cgroup v2 root, detected
    pin_dir: str = DEFAULT_PIN_DIR
    metrics_addr: str | None = None
    sizes: MapSizes = field(default_factory=MapSizes)
    poll_interval: float = 0.2
    node_name: str = field(default_factory=lambda: os.environ.get("NODE_NAME") or os.uname().nodename)
    observe: bool = True              # per-pod network observability (agent/observe)
    veth_netns: str | None = None     # netns holding the pods' node-side veths (None: the agent's own)
    max_series: int = 10000           # cap on the observer's exported series
    peer_cidrs: tuple[str, ...] = ()  # buckets for unknown remote peers (empty: the private ranges)
    rdma: bool = True                 # RDMA port counters and GPU↔NIC topology (sysfs, read at scrape)
    rdma_trace: bool = False          # verbs latency tracer, for pods annotated nodewire.io/rdma-trace
    devices: tuple[str, ...] = ()     # north-south (NodePort/ExternalIP/LB) on these devices; ("auto",) detects
    nodeport_range: tuple[int, int] = (30000, 32767)
    maglev_table_size: int = 16381    # a prime (Cilium's default)
    healthz_port: int = 10256         # kube-proxy's node /healthz; 0: off (only with devices)

    @property
    def state_dir(self) -> str:
        return state_dir_for(self.pin_dir)

    def validate(self) -> None:
        if self.kube and self.manifests is not None:
            raise ValueError("--manifests and --kube are two sources of the same objects: pass one")
        if self.manifests is not None and not os.path.isdir(self.manifests):
            raise ValueError(f"--manifests: {self.manifests} is not a directory")
        if self.cgroup is not None and not os.path.isfile(os.path.join(self.cgroup, "cgroup.procs")):
            raise ValueError(f"--cgroup: {self.cgroup} is not a cgroup v2 directory")
        if self.veth_netns is not None and not os.path.exists(
                self.veth_netns if "/" in self.veth_netns else f"/var/run/netns/{self.veth_netns}"):
            raise ValueError(f"--veth-netns: network namespace {self.veth_netns} not found")
        if self.max_series < 1:
            raise ValueError(f"--max-series: {self.max_series} must be at least 1")
        for c in self.peer_cidrs:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError as e:
                raise ValueError(f"--peer-cidr: {c!r}: {e}") from None
        if not self.pin_dir.startswith("/sys/fs/bpf"):
            raise ValueError(f"--pin-dir: {self.pin_dir} must be under /sys/fs/bpf (a bpffs mount)")
        lo, hi = self.nodeport_range
        if not 1 <= lo <= hi <= 65535 or hi >= 61000:
            raise ValueError(f"--nodeport-range: {lo}-{hi} must lie within 1-60999 "
                             "(61000-65535 are the north-south SNAT ports)")
        from .model.maglev import check_table_size
        check_table_size(self.maglev_table_size)
        if not 0 <= self.healthz_port <= 65535:
            raise ValueError(f"--healthz-port: {self.healthz_port} out of range (0-65535)")
        for name in ("services", "backends", "revnat", "lb_stats"):
            v = getattr(self.sizes, name)
            if not 1 <= v <= 1 << 26:
                raise ValueError(f"map size {name}: {v} out of range (1..{1 << 26})")
