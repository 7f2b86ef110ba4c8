"""RDMA in the agent: what `nodewire run` starts, in one object with three calls.

    rdma = RdmaService(telemetry, cgroup_root=..., trace=True)   # trace: the verbs tracer
    rdma.start()
    rdma.update_pods(pods)      # after each state change: annotation opt-ins → tracer filter
    rdma.close()

Port counters and the GPU↔NIC topology gauge are always registered (they only read sysfs at
collection time). The verbs tracer starts with nothing opted in; pods annotated
`nodewire.io/rdma-trace: "true"` are added by their kubelet cgroup, and its metrics carry the pod's
namespace/name, found from the traced process's cgroup path.
"""
from __future__ import annotations

import logging
import os

from ..cgroups import pod_cgroup
from .metrics import register_rdma_metrics
from .optin import ANNOTATION, opted_in

log = logging.getLogger("nodewire.rdma.service")


class RdmaService:
    def __init__(self, telemetry, sysfs_root: str = "/sys", cgroup_root: str = "/sys/fs/cgroup",
                 trace: bool = False, libibverbs=(), duty=None, provider_cache: str | None = None,
                 annotation: str = ANNOTATION):
        self.telemetry = telemetry
        self.sysfs_root = sysfs_root
        self.cgroup_root = cgroup_root.rstrip("/")   # where kubepods[.slice] is
        from ..datapath.attach import detect_cgroup2_root
        self.cgroup_mount = detect_cgroup2_root()     # what /proc/PID/cgroup paths are relative to
        self.trace = trace
        self.libibverbs = tuple(libibverbs)
        self.duty = duty
        self.provider_cache = provider_cache
        self.annotation = annotation
        self.tracer = None
        self.pod_cgroups: dict[str, object] = {}     # pod cgroup dir → Pod

    def start(self) -> "RdmaService":
        if self.trace:
            from .verbs import VerbsTracer, kernel_rdma_tracepoints

            kernel_rdma_tracepoints()
            self.tracer = VerbsTracer(libibverbs=self.libibverbs, cgroups=[], duty=self.duty,
                                      identity=self.identity, provider_cache=self.provider_cache).start()
        register_rdma_metrics(self.telemetry, self.sysfs_root, self.tracer)
        return self

    def update_pods(self, pods) -> list[str]:
        """Opt-in set from the pods' annotations; returns the cgroup dirs now traced."""
        found = {}
        for pod in opted_in(pods, self.annotation):
            path = pod_cgroup(self.cgroup_root, pod.uid)
            if path is None:
                log.info("rdma opt-in pod=%s uid=%s: no cgroup yet", pod.key, pod.uid)
                continue
            found[path] = pod
        if set(found) != set(self.pod_cgroups):
            log.info("rdma opted-in pods=%s", ",".join(sorted(str(p.key) for p in found.values())) or "-")
        self.pod_cgroups = found
        if self.tracer is not None:
            self.tracer.set_cgroups(list(found))
        return sorted(found)

    def identity(self, pid: int) -> dict:
        """The pod a traced process belongs to, by its cgroup v2 path (containers are below pods)."""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                rel = next(line.split("::", 1)[1].strip() for line in f if line.startswith("0::"))
        except (OSError, StopIteration):
            return {}
        path = os.path.normpath(self.cgroup_mount + rel)
        for cg, pod in self.pod_cgroups.items():
            if path == cg or path.startswith(cg + os.sep):
                return {"k8s.namespace.name": pod.key.namespace, "k8s.pod.name": pod.key.name,
                        "k8s.pod.uid": pod.uid}
        return {}

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None
