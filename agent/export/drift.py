"""The agent's drift check (agent/datapath/check.py PeriodicCheck) as OTel instruments, read at scrape
time: any non-zero `nodewire.check.drift` means the kernel and the cluster state disagree."""
from __future__ import annotations

from opentelemetry.metrics import Observation

from ..datapath.check import KINDS
from ..instruments import COUNTER, GAUGE, register


def register_drift_metrics(meter, periodic) -> None:
    def last(value):
        return lambda _o: [Observation(value(periodic.last))] if periodic.last else []

    register(meter, [
        (GAUGE, "nodewire.check.drift", "1",
         "Differences between the kernel's maps and the desired state in the last sampled check, by kind",
         lambda _o: [Observation(n, {"kind": k}) for k, n in periodic.last.counts().items()] if periodic.last else []),
        (COUNTER, "nodewire.check.drift.found", "1", "Differences found by all sampled checks, by kind",
         lambda _o: [Observation(periodic.totals.get(k, 0), {"kind": k}) for k in KINDS]),
        (COUNTER, "nodewire.check.runs", "1", "Sampled drift checks run by the agent",
         lambda _o: [Observation(periodic.runs)]),
        (GAUGE, "nodewire.check.frontends", "1", "Frontends compared by the last sampled check",
         last(lambda r: r.frontends_checked)),
        (GAUGE, "nodewire.check.duration", "s", "Duration of the last sampled check", last(lambda r: r.seconds)),
    ])
