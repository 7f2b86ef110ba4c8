"""OTel metrics: the MeterProvider every part registers its instruments on, the Prometheus endpoint
(--metrics-addr) with the agent's /healthz and /readyz, and OTLP export when configured."""
from __future__ import annotations

from .base import Component, Context


class Telemetry(Component):
    name = "telemetry"

    def __init__(self) -> None:
        self.telemetry = None

    def start(self, ctx: Context) -> None:
        from ..export.telemetry import start_telemetry

        cfg = ctx.cfg
        self.telemetry = start_telemetry(cfg.metrics_addr, cfg.node_name, max_series=cfg.max_series)
        self.telemetry.add_check("/healthz", ctx.healthy)
        self.telemetry.add_check("/readyz", ctx.ready)
        ctx.telemetry = self.telemetry

    def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.shutdown()
