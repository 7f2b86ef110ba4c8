"""The agent: its parts, built from the config, around one sync loop.

sources → ClusterState → sync loop → datapath → BPF maps, then each part's hooks, then the status.
Each feature is a part (agent/components/: socket LB, north-south, sources, telemetry, drift check,
observer, CNI pods, RDMA, local API) with start / close / status / metrics; the agent starts the
enabled ones in order, closes them in reverse, and asks each for its piece of the one status
(agent/status.py). The loop itself (agent/sync_loop.py) takes the dirty Services and applies them
through the datapath; it knows no part.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace

from . import memory
from .api import ApiServer
from .components import Component, Context, build
from .components.datapath import build_datapath
from .config import AgentConfig
from .errorlog import ErrorLog
from .model.objects import ObjectError
from .state import ClusterState
from .status import AgentStatus, Counters, status_path, write_status
from .sync_loop import SyncLoop

log = logging.getLogger("nodewire.agent")
STATUS_CHECK_SECONDS = 5.0  # how often source health is looked at for the status, when nothing else woke it


class Agent:
    def __init__(self, cfg: AgentConfig, parts: list[Component] | None = None, datapath=None):
        """parts: default, those the config enables (components.build); datapath: default, the one
        over the started socket LB and north-south parts (tests give one over the maps double)."""
        cfg.validate()
        self._datapath = datapath
        self.cfg = cfg
        self.state = ClusterState(cfg.node_name, cfg.zone)
        self.stop = threading.Event()
        self.started = time.time()
        self.object_errors = ErrorLog(log, "bad object")
        self.counters = Counters()  # the loop's records and the sources' error count, one status block
        self.parts = build(cfg) if parts is None else parts
        self.ctx = Context(cfg, self.state, self.stop, api=ApiServer(cfg.api_socket_path), healthy=self.healthy,
                           ready=self.ready, report_errors=self._object_errors, note_change=self._note_change,
                           refused=lambda: self.loop.refused if self.loop else set())
        self.loop: SyncLoop | None = None
        self._started: list[Component] = []
        self._status_due = threading.Event()
        self._status_thread: threading.Thread | None = None
        self._written: AgentStatus | None = None  # what status.json holds

    def part(self, name: str) -> Component | None:
        """A part by name (None when the config does not enable it)."""
        return self.ctx.get(name)

    @property
    def first_sync(self):
        return self.loop.first_sync if self.loop else None

    # -- start-up ------------------------------------------------------------------------------
    def start(self) -> None:
        memory.configure()
        os.umask(0o022)  # pins, status files and sockets never world-writable, whatever umask we inherit
        ctx = self.ctx
        ctx.parts = {p.name: p for p in self.parts}
        for p in self.parts:
            p.prepare(ctx)
        from .datapath.attach import detect_cgroup2_root

        ctx.cgroup = self.cfg.cgroup or detect_cgroup2_root()
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        for p in self.parts:
            p.start(ctx)
            self._started.append(p)
        self.loop = SyncLoop(self.state, self._datapath or build_datapath(ctx), lock=ctx.lock, started=self.started,
                             on_synced=self._status_due.set, counters=self.counters)
        self.loop.after_sync = [p.after_sync for p in self.parts]
        if ctx.telemetry is not None:
            self.loop.metrics(ctx.telemetry)
            for p in self.parts:
                p.metrics(ctx.telemetry)

    def _object_errors(self, errors: list[ObjectError]) -> None:
        """From a source's thread: a batch (one file) or one object (the API)."""
        self.counters.object_errors += len(errors)
        self.object_errors.add([str(e) for e in errors])
        self._status_due.set()

    def _note_change(self, at: float) -> None:
        """A source changed something that is not a Service (its errors): the status says when. `at` is
        the source's own time, so a change the loop already applied later (the first read) moves nothing."""
        self.loop.last_change = max(self.loop.last_change, at)
        self._status_due.set()

    # -- loop ----------------------------------------------------------------------------------
    def _wait_synced(self) -> None:
        """A full sync from an empty state would delete what the pinned maps hold: wait for each
        source's first complete read (the datapath keeps serving what it had meanwhile)."""
        for p in self.parts:
            while not p.wait_synced(1.0) and not self.stop.is_set():
                self._write_status_if_changed()

    def run(self) -> None:
        self._wait_synced()
        if self.stop.is_set():
            return
        self._status_thread = threading.Thread(target=self._status_loop, name="status-writer", daemon=True)
        self._status_thread.start()
        self.loop.run(self.stop, tick=[p.tick for p in self.parts], turned=self.object_errors.flush)
        self._status_due.set()
        self._status_thread.join(5)
        self._status_thread = None
        self._write_status_if_changed()
        log.info("agent stopping; the datapath stays attached and pinned")

    # -- status --------------------------------------------------------------------------------
    def status(self) -> AgentStatus:
        st = AgentStatus(pid=os.getpid(), started=self.started, cgroup=self.ctx.cgroup, pin_dir=self.cfg.pin_dir,
                         node={"name": self.cfg.node_name, "zone": self.state.zone},
                         object_errors=list(self.object_errors.recent)[-20:])
        if self.loop is not None:
            self.loop.status(st)
        for p in self._started:
            p.status(st)
        return st

    def _status_loop(self) -> None:
        """Writes status.json when something in it changed: at most once a second, and never when idle
        (source health is looked at every STATUS_CHECK_SECONDS, a comparison of a few fields)."""
        last = 0.0
        while not self.stop.is_set():
            self._status_due.wait(STATUS_CHECK_SECONDS)
            self.stop.wait(max(0.0, last + 1.0 - time.monotonic()))
            self._status_due.clear()
            last = time.monotonic()
            self._write_status_if_changed()

    def _write_status_if_changed(self) -> None:
        try:  # the status never stops the agent: a failure is logged and retried at the next change
            st = self.status()
            if self._written is not None and replace(st, written_at=self._written.written_at) == self._written:
                return
            write_status(status_path(self.cfg.pin_dir), st)
            self._written = st
        except Exception as e:
            log.error("cannot write status: %s: %s", type(e).__name__, e)

    # -- probes (served on --metrics-addr) ---------------------------------------------------------
    LOOP_STALL_SECONDS = 30.0

    def healthy(self) -> tuple[bool, str]:
        """Live: the agent loop keeps turning (a stuck loop is worth a restart; a stale source is not)."""
        beat = self.loop.heartbeat if self.loop else None
        if beat is None:
            return True, "starting"
        stalled = time.monotonic() - beat
        return stalled < self.LOOP_STALL_SECONDS, f"loop last turned {stalled:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        """Ready: the datapath was synced once, and no part says otherwise (a stale source: the
        datapath is then serving stale but working state, which status and this probe say)."""
        if self.first_sync is None:
            return False, "waiting for the first full sync"
        for p in self._started:
            said = p.ready()
            if said is not None and not said[0]:
                return said
        return True, f"{self.loop.service_count()} services synced"

    def install_signal_handlers(self) -> None:
        def handler(_sig, _frame):
            self.stop.set()
            self.state.changed.set()
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        """Every started part, in reverse order; one failing close does not skip the others."""
        while self._started:
            p = self._started.pop()
            try:
                p.close()
            except Exception:
                log.exception("closing %s failed", p.name)
