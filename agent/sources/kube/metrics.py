"""The Kubernetes source's health as OTel observable instruments, read at scrape time: per resource,
whether its watch is open, how long it has been stale, re-lists after 410 and events applied; per
kind, the objects skipped as malformed."""
from __future__ import annotations

import time

from ...instruments import COUNTER, GAUGE, register


def register_kube_metrics(meter, source) -> None:
    from opentelemetry.metrics import Observation

    def per_resource(value):
        return lambda _o: [Observation(value(r.health), {"resource": name}) for name, r in source.reflectors.items()]

    register(meter, [
        (GAUGE, "nodewire.kube.watch.connected", "1", "1 while the resource's watch stream is open",
         per_resource(lambda h: int(h.connected))),
        (GAUGE, "nodewire.kube.stale.duration", "s",
         "How long the resource has been disconnected (0 when watching); the datapath is kept",
         per_resource(lambda h: time.time() - h.stale_since if h.stale_since else 0.0)),
        (COUNTER, "nodewire.kube.relists", "1", "Re-lists after 410 Gone (history expired)",
         per_resource(lambda h: h.relists_gone)),
        (COUNTER, "nodewire.kube.events", "1", "Watch events applied (ADDED/MODIFIED/DELETED)",
         per_resource(lambda h: h.events)),
        (COUNTER, "nodewire.kube.invalid_objects", "1", "API objects skipped as malformed, by kind",
         lambda _o: [Observation(n, {"kind": k}) for k, n in source.invalid_objects.items()]),
    ])
