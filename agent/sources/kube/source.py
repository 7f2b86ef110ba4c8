"""The Kubernetes source: list+watch Services, EndpointSlices, Nodes (this node's; every node's with
lb-mode dsr|hybrid, whose DSR annotations and addresses the views need) and this node's Pods into
ClusterState; and this node's DSR annotation kept as the config wants it (annotate.py).

Plain HTTP (http.client + ssl from the standard library), not a client library, on purpose:
  - none of lightkube, kubernetes_asyncio or the official client ships an informer: their watch helpers
    stream events and raise on `410 Gone`, leaving list → watch-from-RV → re-list-and-diff, bookmarks and
    back-off to the caller, so that loop is ours either way (client-go's Reflector is the model);
  - they decode every item into generated model classes before we could read it; nodewire already has
    strict parsers from raw dicts (agent/model/parse.py), and the 100k-Service list budget (5 s
    including decoding) leaves no room for a second object model.
What the wire protocol needs is small: bearer token (re-read when the file rotates), verified TLS,
chunked JSON lines. One thread per resource ("reflector") runs the loop; each applies objects to
ClusterState as they arrive, and the agent loop coalesces them through the one reconciler.

While the API is unreachable nothing is removed: the datapath stays as it was (stale but working), and
status()/ready() say which resource is stale and since when.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable

from ...model.objects import Node, ObjectError, ObjectKey
from ...model.parse import PARSERS, InvalidObject
from ...state import ClusterState
from .client import ApiClient
from .config import KubeConfig, node_name
from .annotate import NodeAnnotator, wanted_annotation
from .reflector import Backoff, Reflector, WatchSpec

log = logging.getLogger("nodewire.kube")


class KubeSource:
    """Four reflectors feeding one ClusterState; invalid objects are skipped, logged and counted."""

    def __init__(self, cfg: KubeConfig, state: ClusterState, node: str | None = None,
                 on_error: Callable[[ObjectError], None] | None = None,
                 on_applied: Callable[[str, ObjectKey, float], None] | None = None,
                 backoff: Callable[[], Backoff] = Backoff, watch_timeout: tuple[int, int] = (300, 600),
                 client_timeout: float = 30.0, lb_mode: str = "snat", northsouth: bool = False):
        self.cfg, self.state = cfg, state
        self.node_name = node or node_name()
        self.node: Node | None = None  # this node's Node object, as last applied (its zone and addresses)
        self.client = ApiClient(cfg, timeout=client_timeout)
        self.on_error = on_error
        self.on_applied = on_applied  # (kind, key, arrival time) after the object reached ClusterState
        self.invalid_objects: Counter[str] = Counter()  # kind → objects skipped as malformed
        self.invalid: dict[tuple[str, ObjectKey], ObjectError] = {}  # currently malformed objects
        self._stop = threading.Event()
        self._started = 0.0
        self.synced_seconds: float | None = None  # start → every first list applied
        self.synced_cpu_seconds: float | None = None  # process CPU time spent meanwhile (all threads)
        self._threads: list[threading.Thread] = []
        self.lb_mode = lb_mode
        # With DSR the views need every Node (its annotation says whether it takes DSR, its addresses
        # where to send it); with SNAT only this node's (zone, addresses), as a field selector.
        nodes = {} if lb_mode != "snat" else {"fieldSelector": f"metadata.name={self.node_name}"}
        specs = [
            WatchSpec("services", "/api/v1/services", "Service"),
            WatchSpec("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice",
                      {"labelSelector": "kubernetes.io/service-name"}),
            WatchSpec("nodes", "/api/v1/nodes", "Node", nodes),
            WatchSpec("pods", "/api/v1/pods", "Pod", {"fieldSelector": f"spec.nodeName={self.node_name}"}),
        ]
        self.reflectors = {s.resource: Reflector(self.client, s, self._apply, self._stop, backoff(), watch_timeout,
                                                 bad=self._bad)
                           for s in specs}
        self.annotator = NodeAnnotator(self.client, self.node_name, wanted_annotation(lb_mode, northsouth),
                                       self._stop, backoff())

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "KubeSource":
        self._started, self._started_cpu = time.monotonic(), time.process_time()
        log.info("kube source starting server=%s credentials=%r node=%s",
                 self.cfg.server, self.cfg.credential_source, self.node_name)
        for name, r in self.reflectors.items():
            t = threading.Thread(target=r.run, name=f"kube-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.annotator.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.client.close_all()
        for t in self._threads:
            t.join(timeout=5)
        self.annotator.join(timeout=5)

    def wait_synced(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in self.reflectors.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not r.synced.wait(left):
                return False
        return self.ready()

    # -- applying objects -----------------------------------------------------------------------
    def _apply(self, kind: str, key: ObjectKey, obj: dict | None, arrived: float) -> None:
        own = kind == "Node" and key.name == self.node_name
        if own:
            self.annotator.observe(obj)  # before parsing: a Node we cannot parse is still ours to annotate
        if obj is None:
            self.invalid.pop((kind, key), None)
            self.state.apply(kind, key, None)
            if own:
                self.node = None
        else:
            try:
                parsed = PARSERS[kind](obj)
            except Exception as e:  # InvalidObject, or a shape the parser did not foresee
                # Skip it; a previously good version stays (same rule as the manifest source).
                if not isinstance(e, InvalidObject):
                    e = InvalidObject(kind, str(key), "-", f"cannot decode: {type(e).__name__}: {e}")
                err = e.as_error("api")
                self.invalid_objects[kind] += 1
                self.invalid[(kind, key)] = err
                self._report(err)
                return
            self.invalid.pop((kind, key), None)
            for field, msg in getattr(parsed, "errors", ()):  # a part left out (a slice's bad port): named
                self._report(ObjectError("api", kind, str(key), field, msg))
            self.state.apply(kind, parsed.key, parsed)  # a Node's zone drives topology hints
            if own:
                self.node = parsed
        if self.on_applied:
            self.on_applied(kind, key, arrived)

    def _bad(self, kind: str, message: str, field: str = "-") -> None:
        """A watch line or list item that could not be read as an object: skipped, counted, named."""
        err = ObjectError("api", kind, "?", field, message)
        self.invalid_objects[kind] += 1
        self._report(err)

    def _report(self, err: ObjectError) -> None:
        """To on_error (the agent logs them, summarized when they repeat), else to the log."""
        if self.on_error:
            self.on_error(err)
        else:
            log.error("invalid object skipped: %s", err)

    # -- health ---------------------------------------------------------------------------------
    def register_metrics(self, meter) -> None:
        """Per-resource watch health and counts as OTel observable instruments (metrics.py)."""
        from .metrics import register_kube_metrics

        register_kube_metrics(meter, self)

    def ready(self) -> bool:
        """Every resource listed once (a stale watch still serves: the datapath is kept)."""
        ok = all(r.health.synced for r in self.reflectors.values())
        if ok and self.synced_seconds is None:
            self.synced_seconds = max(r.synced_at for r in self.reflectors.values()) - self._started
            self.synced_cpu_seconds = time.process_time() - self._started_cpu
        return ok

    def status(self) -> dict:
        hs = [r.health for r in self.reflectors.values()]
        stale = [h.stale_since for h in hs if h.stale_since is not None]
        errors = [h.last_error for h in hs if h.last_error and not h.connected]
        return {
            "kind": "kube", "server": self.cfg.server, "credentials": self.cfg.credential_source,
            "node": {"name": self.node_name, "zone": self.node.zone if self.node else "",
                     "addresses": [list(a) for a in self.node.addresses] if self.node else []},
            "healthy": all(h.synced and h.connected for h in hs),
            "synced": self.ready(),
            "synced_seconds": self.synced_seconds,
            "synced_cpu_seconds": self.synced_cpu_seconds,
            "stale_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(min(stale))) if stale else None,
            "last_error": errors[0] if errors else None,
            "invalid_objects": dict(self.invalid_objects),
            "invalid_now": [str(e) for e in self.invalid.values()],
            "resources": {h.resource: h.as_dict() for h in hs},
            "lb_mode": self.lb_mode, "dsr_annotation": self.annotator.status(),
        }
