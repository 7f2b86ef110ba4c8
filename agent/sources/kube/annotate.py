"""This node's DSR annotation (issue 21): the agent tells the other agents that its node takes Geneve-
encapsulated north-south flows by setting `nodewire.io/dsr: "geneve"` on its own Node; the other nodes'
views send DSR only to backends on nodes that carry it (a node without an agent, or with lb-mode snat,
is reached with SNAT as before: mixed clusters and rollouts keep working).

Level-triggered, as a controller: every time this node's Node arrives from the watch, its annotation is
compared with what this agent wants, and a JSON merge patch (RFC 7386; `null` removes a key) is sent
from this module's own thread when they differ; a failed patch is retried with back-off, and the next
Node event re-checks. A patch that changes nothing is never sent, so an agent with lb-mode snat on a
node that never had the annotation writes nothing to the API.

On a clean shutdown the annotation is left in place, on purpose: the tc programs (and their Geneve
decapsulation, always on while north-south runs) stay attached when the agent stops, so flows the other
nodes already dispatched here keep working and new ones still arrive correctly through a restart or a
rolling update. It is removed only by an agent that runs with lb-mode snat (or without north-south):
that is the way back, and `nodewire cleanup`, which detaches tc, is run after the DaemonSet is gone.
"""
from __future__ import annotations

import logging
import threading
import time
from urllib.parse import quote

from .client import ApiClient
from .reflector import Backoff

log = logging.getLogger("nodewire.kube")
DSR_ANNOTATION = "nodewire.io/dsr"  # DSR.md; the value names the dispatch: Geneve (RFC 8926) over UDP 6081
DSR_GENEVE = "geneve"
DSR_MODES = ("dsr", "hybrid")  # lb-mode values that dispatch TCP (and, with dsr, UDP) by DSR


def wanted_annotation(lb_mode: str, northsouth: bool) -> str | None:
    """What this node's Node should carry: "geneve" when north-south runs here with lb-mode dsr|hybrid
    (this node then decapsulates), else nothing."""
    return DSR_GENEVE if northsouth and lb_mode in DSR_MODES else None


def annotation_of(obj: dict) -> str | None:
    """The DSR annotation of a raw Node object (None: absent or unreadable)."""
    meta = obj.get("metadata")
    notes = meta.get("annotations") if isinstance(meta, dict) else None
    value = notes.get(DSR_ANNOTATION) if isinstance(notes, dict) else None
    return value if isinstance(value, str) else None


class NodeAnnotator:
    """Keeps this node's DSR annotation at `want` (None: absent) with merge PATCHes from its own thread."""

    def __init__(self, client: ApiClient, node_name: str, want: str | None, stop: threading.Event,
                 backoff: Backoff):
        self.client, self.node_name, self.want, self.stop = client, node_name, want, stop
        self.backoff = backoff
        self.have: str | None = None  # as last seen on the Node (watch) or returned by a PATCH
        self.seen = False  # the Node has been seen at least once
        self.patches = 0
        self.errors = 0
        self.last_error: str | None = None
        self._due = threading.Event()
        self._thread: threading.Thread | None = None

    def observe(self, obj: dict | None) -> None:
        """This node's Node as the watch delivered it (None: deleted): patch when it differs."""
        if obj is None:
            self.seen = False  # nothing to patch until it exists again
            return
        self.have, self.seen = annotation_of(obj), True
        if self.have != self.want:
            self._due.set()

    def start(self) -> "NodeAnnotator":
        self._thread = threading.Thread(target=self._run, name="kube-annotate", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._due.set()  # wakes the thread so it sees `stop`
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self.stop.is_set():
            self._due.wait()
            if self.stop.is_set():
                return
            self._due.clear()
            if not self.seen or self.have == self.want:
                continue
            try:
                self._patch()
                self.backoff.reset()
            except Exception as e:  # KubeError, AuthError (403: RBAC lacks nodes/patch), OSError
                self.errors += 1
                self.last_error = str(e) or type(e).__name__
                delay = self.backoff.next()
                log.warning("cannot set the DSR annotation node=%s want=%r error=%r retry_in=%.1fs",
                            self.node_name, self.want, self.last_error, delay)
                if self.stop.wait(delay):
                    return
                self._due.set()

    def _patch(self) -> None:
        body = {"metadata": {"annotations": {DSR_ANNOTATION: self.want}}}  # None → null → removed
        t = time.monotonic()
        stored = self.client.patch(f"/api/v1/nodes/{quote(self.node_name, safe='')}", body)
        self.patches += 1
        self.have, self.last_error = annotation_of(stored), None
        log.info("node annotation %s node=%s %s=%r seconds=%.3f", "set" if self.want else "removed",
                 self.node_name, DSR_ANNOTATION, self.want, time.monotonic() - t)

    def status(self) -> dict:
        return {"annotation": DSR_ANNOTATION, "want": self.want, "have": self.have, "patches": self.patches,
                "errors": self.errors, "last_error": self.last_error}
