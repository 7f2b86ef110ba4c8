"""The sync loop: dirty Services → the datapath, one thread, counted and timed.

kube-proxy keeps change tracking apart from syncing (EndpointSliceUpdate records, the sync only
consumes); so does this loop: ClusterState records which Services changed, `take(full)` hands them
over, and `datapath.apply(changes, full)` makes the kernel match. The loop owns nothing of the kernel:
the datapath is anything with the Datapath protocol below, the real one (agent/components/datapath.py)
or one over the maps double (tests/test_sync_loop.py), so the loop is tested without root.

The first sync after start is a full one, against what the pinned maps already hold: a restart
rewrites nothing that is right.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Protocol

from . import memory
from .errorlog import ErrorLog
from .state import ClusterState
from .status import AgentStatus, Counters, MapFill, SyncInfo

log = logging.getLogger("nodewire.agent")
HEARTBEAT_SECONDS = 5.0  # the loop turns at least this often when idle (/healthz)


class Datapath(Protocol):
    """What the loop writes through (the agreed seam, /work/team/cp-seam.txt)."""

    def take(self, state: ClusterState, full: bool) -> dict:
        """The views of the Services changed since the last take (full: every Service; None: deleted)."""

    def apply(self, changes: dict, full: bool) -> Any:
        """Make the kernel match `changes` (Service key → its view, model/view.py; None removes it);
        full: `changes` is everything and the rest goes. Returns a SyncResult (datapath/reconciler.py)."""

    def fill(self) -> dict[str, MapFill]:
        """Map name → entries and capacity, after the last apply."""

    def service_count(self) -> int:
        """Services with entries in the maps."""


class SyncLoop:
    """Owns the counters and sync records of the status and of `nodewire.sync.*`; `lock` is held
    while the datapath is written, so readers on other threads (API, drift check) take it too."""

    def __init__(self, state: ClusterState, datapath: Datapath,
                 take: Callable[[ClusterState, bool], dict] | None = None,
                 lock: threading.Lock | None = None, started: float | None = None,
                 on_synced: Callable[[], None] = lambda: None, counters: Counters | None = None):
        # take(state, full): the changed Services' views (model/view.py); default: the datapath's own,
        # which knows whether north-south is on and this node's addresses (datapath/datapath.py)
        self.state, self.datapath, self.take = state, datapath, take or datapath.take
        self.after_sync: list[Callable[[dict, Any], None]] = []  # parts' hooks: (changes, result) after each apply
        self.lock = lock or threading.Lock()
        self.started = time.time() if started is None else started
        self.on_synced = on_synced  # e.g. the status writer's "something changed"
        self.counters = counters or Counters()
        self.sync_errors = ErrorLog(log, "sync refused")
        self.first_sync: SyncInfo | None = None
        self.last_sync: SyncInfo | None = None
        self.last_change = 0.0  # wall clock: a source change was last taken in (and applied)
        self.heartbeat: float | None = None  # monotonic time the loop last turned
        self.refused: set = set()  # Services the datapath refuses now (kept out of the drift check)
        self.proxy_metrics = None  # export.kubeproxy.ProxyMetrics, once metrics() ran
        self._fill: dict[str, MapFill] = {}
        self._services = 0
        self.note_fill()

    # -- one sync --------------------------------------------------------------------------------
    def sync_once(self, full: bool = False):
        """Take the changes, apply them; None when there was nothing to do."""
        changes = self.take(self.state, full)
        if not changes and not full:
            return None
        with self.lock:
            if self.proxy_metrics is not None:
                with self.proxy_metrics.sync(changes, self.state):
                    res = self.datapath.apply(changes, full)
            else:
                res = self.datapath.apply(changes, full)
            self.note_fill()
        for hook in self.after_sync:  # before the records: a status showing this sync shows its effects
            hook(changes, res)
        self.refused = (set() if full else self.refused - set(changes)) | {r.service for r in res.refusals}
        self._record(res, full)
        return res

    def _record(self, res, full: bool) -> None:
        now = time.time()
        c = self.counters
        c.syncs += 1
        c.written += res.written
        c.deleted += res.deleted
        c.sync_errors += len(res.errors)
        self.sync_errors.add(res.errors, logged=False)  # the datapath logs them, summarized
        self.last_sync = SyncInfo(now, res.seconds, res.services, res.written, res.deleted, full)
        self.last_change = now
        if full and self.first_sync is None:
            memory.settle()  # the long-lived state is never rescanned from here on
            self.first_sync = replace(self.last_sync, since_start=time.time() - self.started)
            log.info("full sync done services=%d written=%d deleted=%d seconds=%.3f", self._services,
                     res.written, res.deleted, res.seconds)
        else:
            log.debug("sync services=%d written=%d deleted=%d seconds=%.4f", res.services, res.written,
                      res.deleted, res.seconds)
        self.on_synced()

    def note_fill(self) -> None:
        """Map fill and Service count, taken on the loop thread (readers use these copies)."""
        self._fill = self.datapath.fill()
        self._services = self.datapath.service_count()

    # -- the loop --------------------------------------------------------------------------------
    def run(self, stop: threading.Event, tick: Iterable[Callable[[], None]] = (),
            turned: Callable[[], None] = lambda: None) -> None:
        """One full sync, then a sync per change (or heartbeat) until `stop`; after each turn the
        tick hooks, then `turned`."""
        tick = list(tick)
        with memory.bulk():
            self.sync_once(full=True)
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            self.state.changed.wait(HEARTBEAT_SECONDS)
            if stop.is_set():
                break
            try:
                self.sync_once()
                for hook in tick:
                    hook()
            except Exception:  # one bad cycle must not end the agent; the next one retries
                log.exception("sync failed; keeping the datapath as it is")
            turned()

    # -- readers (status, metrics: agent/export/agent_metrics.AgentView) --------------------------
    def map_fill(self) -> dict[str, MapFill]:
        return self._fill

    def service_count(self) -> int:
        return self._services

    def metrics(self, telemetry) -> None:
        """`nodewire.sync.*`, `nodewire.map.*`, `nodewire.services` and kube-proxy's sync metrics."""
        from .export.agent_metrics import register_agent_metrics
        from .export.kubeproxy import ProxyMetrics

        register_agent_metrics(telemetry.meter(), self)
        self.proxy_metrics = ProxyMetrics(telemetry.meter("kubeproxy"), self.state.pending)

    def status(self, st: AgentStatus) -> None:
        st.maps, st.services = dict(self._fill), self._services
        st.first_sync, st.last_sync, st.last_change = self.first_sync, self.last_sync, self.last_change
        st.counters = replace(self.counters)
        st.sync_errors = list(self.sync_errors.recent)[-20:]
