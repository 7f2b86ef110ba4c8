"""Per-pod network observability (agent/observe/): kernel histograms and counters read into OTel,
named by pod. Optional: a failed start is logged and the agent runs without it."""
from __future__ import annotations

from dataclasses import replace

from .base import Context, OptionalComponent


class Observer(OptionalComponent):
    name = "observer"
    enabled_by = "observe"
    without = "running without observability"

    def __init__(self) -> None:
        self.observer = None

    def start_part(self, ctx: Context) -> None:
        from ..observe.identity import ObserveConfig
        from ..observe.observer import Observer as Impl

        cfg = ctx.cfg
        ocfg = ObserveConfig(node_name=cfg.node_name, max_series=cfg.max_series, aggregate_by=cfg.aggregate_by,
                             pod_tc=cfg.pod_tc, tcp_probe=cfg.tcp_probe)
        if cfg.peer_cidrs:
            ocfg = replace(ocfg, peer_cidrs=tuple(cfg.peer_cidrs))
        lb = ctx.get("socket_lb")
        self.observer = Impl(ctx.state, ctx.telemetry, ocfg, cfg.pin_dir, cfg.veth_netns,
                             lb.lb, lb.reconciler, ctx.cgroup).start()

    def tick(self) -> None:
        if self.observer is not None:
            self.observer.sync()

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()
