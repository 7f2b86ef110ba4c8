"""The agent's own drift check: every --check-interval seconds a sample of Services is looked up in
the kernel's maps and compared with the desired state (datapath/check.py PeriodicCheck), on the loop's
thread between two syncs, under the loop's lock."""
from __future__ import annotations

import logging
import time

from .base import Component, Context

log = logging.getLogger("nodewire.agent")


class DriftCheck(Component):
    name = "drift_check"

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.check_interval > 0  # 0 (or below) turns it off

    def __init__(self) -> None:
        self.check = None  # datapath.check.PeriodicCheck
        self._next = 0.0
        self._ctx: Context | None = None

    def start(self, ctx: Context) -> None:
        from ..datapath.check import PeriodicCheck

        lb = ctx.get("socket_lb").lb
        self._ctx = ctx
        self.check = PeriodicCheck(ctx.state, lb.services, lb.backends, ctx.cfg.check_sample)

    def tick(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self._ctx.cfg.check_interval
        with self._ctx.lock:
            rep = self.check.run(self._ctx.refused())
        for d in rep.drift[:10]:
            log.error("drift between the kernel and the cluster state: %s", d)

    def metrics(self, telemetry) -> None:
        from ..export.drift import register_drift_metrics

        register_drift_metrics(telemetry.meter(), self.check)

    def status(self, st) -> None:
        c = self.check
        st.check = {"runs": c.runs, "totals": dict(c.totals), "last": c.last.as_dict() if c.last else None}
