"""The Kubernetes source's health as OTel observable instruments, read at scrape time: per resource,
whether its watch is open, how long it has been stale, re-lists after 410 and events applied; per
kind, the objects skipped as malformed."""
from __future__ import annotations

import time


def register_kube_metrics(meter, source) -> None:
    from opentelemetry.metrics import Observation

    def per_resource(value):
        return lambda _o: [Observation(value(r.health), {"resource": name}) for name, r in source.reflectors.items()]

    meter.create_observable_gauge(
        "nodewire.kube.watch.connected", unit="1", description="1 while the resource's watch stream is open",
        callbacks=[per_resource(lambda h: int(h.connected))])
    meter.create_observable_gauge(
        "nodewire.kube.stale.duration", unit="s",
        description="How long the resource has been disconnected (0 when watching); the datapath is kept",
        callbacks=[per_resource(lambda h: time.time() - h.stale_since if h.stale_since else 0.0)])
    meter.create_observable_counter(
        "nodewire.kube.relists", unit="1", description="Re-lists after 410 Gone (history expired)",
        callbacks=[per_resource(lambda h: h.relists_gone)])
    meter.create_observable_counter(
        "nodewire.kube.events", unit="1", description="Watch events applied (ADDED/MODIFIED/DELETED)",
        callbacks=[per_resource(lambda h: h.events)])
    meter.create_observable_counter(
        "nodewire.kube.invalid_objects", unit="1", description="API objects skipped as malformed, by kind",
        callbacks=[lambda _o: [Observation(n, {"kind": k}) for k, n in source.invalid_objects.items()]])
