"""The agent's drift check (agent/datapath/check.py PeriodicCheck) as OTel instruments, read at scrape
time: any non-zero `nodewire.check.drift` means the kernel and the cluster state disagree."""
from __future__ import annotations

from opentelemetry.metrics import Observation

from ..datapath.check import KINDS


def register_drift_metrics(meter, periodic) -> None:
    def last(value):
        return lambda _o: [Observation(value(periodic.last))] if periodic.last else []

    meter.create_observable_gauge(
        "nodewire.check.drift", unit="1",
        description="Differences between the kernel's maps and the desired state in the last sampled check, by kind",
        callbacks=[lambda _o: [Observation(n, {"kind": k}) for k, n in periodic.last.counts().items()]
                   if periodic.last else []])
    meter.create_observable_counter(
        "nodewire.check.drift.found", unit="1", description="Differences found by all sampled checks, by kind",
        callbacks=[lambda _o: [Observation(periodic.totals.get(k, 0), {"kind": k}) for k in KINDS]])
    meter.create_observable_counter(
        "nodewire.check.runs", unit="1", description="Sampled drift checks run by the agent",
        callbacks=[lambda _o: [Observation(periodic.runs)]])
    meter.create_observable_gauge(
        "nodewire.check.frontends", unit="1", description="Frontends compared by the last sampled check",
        callbacks=[last(lambda r: r.frontends_checked)])
    meter.create_observable_gauge(
        "nodewire.check.duration", unit="s", description="Duration of the last sampled check",
        callbacks=[last(lambda r: r.seconds)])
