"""RDMA / GPU-NIC: port counters, PCIe topology, and the opt-in verbs tracer (agent/rdma/), told
which pods opted in whenever Pods change. Optional, like the observer."""
from __future__ import annotations

from .base import Context, OptionalComponent


class Rdma(OptionalComponent):
    name = "rdma"
    enabled_by = "rdma"

    def __init__(self) -> None:
        self.service = None
        self._pods_seen = -1  # ClusterState.identity_revision the opt-ins were last computed at
        self._state = None

    def start_part(self, ctx: Context) -> None:
        from ..rdma.service import RdmaService

        self._state = ctx.state
        self.service = RdmaService(ctx.telemetry, cgroup_root=ctx.cgroup, trace=ctx.cfg.rdma_trace).start()

    def tick(self) -> None:
        if self.service is not None and self._state.identity_revision != self._pods_seen:
            self._pods_seen = self._state.identity_revision
            self.service.update_pods(list(self._state.pods.values()))

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
