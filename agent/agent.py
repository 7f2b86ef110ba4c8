"""The agent loop: sources → ClusterState → model → reconciler → BPF maps, then hooks and status.

Each source runs on its own thread and pushes objects into ClusterState (the manifest directory
through inotify or polling, the Kubernetes API through one reflector per resource). The loop, on one
thread that alone owns the reconciler, is: wait for a change → take the dirty Services' frontends →
Reconciler.apply → hooks (observer, RDMA opt-ins) → status, rewritten only when something in it
changed. The first sync after start is a full sync against what the pinned maps already hold, so a
restart rewrites nothing that is right.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace

from . import memory
from .api import ApiError, ApiServer
from .config import AgentConfig
from .datapath.attach import attach_sock_lb, detect_cgroup2_root
from .datapath.loader import SockLB
from .datapath.check import PeriodicCheck
from .datapath.datapath import Datapath
from .datapath.reconciler import Reconciler, SyncResult
from .datapath.stale_sockets import StaleSockets, listed_addresses
from .errorlog import ErrorLog
from .export.agent_metrics import register_agent_metrics
from .export.drift import register_drift_metrics
from .export.kubeproxy import ProxyMetrics
from .export.telemetry import start_telemetry
from .model.objects import ObjectError
from .privileges import drop as drop_capabilities
from .sources.manifests import ManifestSource
from .state import ClusterState
from .status import AgentStatus, Counters, MapFill, SourceStatus, SyncInfo, status_path, write_status

log = logging.getLogger("nodewire.agent")
HEARTBEAT_SECONDS = 5.0  # the loop turns at least this often when idle (/healthz)
STATUS_CHECK_SECONDS = 5.0  # how often source health is looked at for the status, when nothing else woke it
NAMES_PAGE = 5000  # `services.names`: at most this many ids per answer (the API's line limit is 1 MiB)


class Agent:
    def __init__(self, cfg: AgentConfig):
        cfg.validate()
        self.cfg = cfg
        self.state = ClusterState(cfg.node_name, cfg.zone)
        self.stop = threading.Event()
        self.started = time.time()
        self.object_errors = ErrorLog(log, "bad object")
        self.sync_errors = ErrorLog(log, "sync refused")
        self.counters = Counters()
        self.first_sync: SyncInfo | None = None
        self.last_sync: SyncInfo | None = None
        self.last_change = 0.0  # when a source change was last taken in (and applied)
        self.source: ManifestSource | None = None
        self.kube = None  # KubeSource: pushes into self.state from its own threads
        self.heartbeat: float | None = None  # monotonic time the agent loop last turned
        self.cgroup = ""
        # The reconciler is used by the loop thread; _lock keeps the API's name lookups and the
        # status thread from reading it mid-apply.
        self._lock = threading.Lock()
        self._fill: dict[str, MapFill] = {}
        self._services = 0
        self._names: tuple[int, dict[int, dict]] | None = None  # (syncs when built, id → name)
        self._status_due = threading.Event()
        self._status_thread: threading.Thread | None = None
        self._written: AgentStatus | None = None  # what status.json holds
        self.lb: SockLB | None = None
        self.reconciler: Reconciler | None = None
        self.datapath: Datapath | None = None  # the one writer: socket maps (+ nodeport.c's with --devices)
        self.stale_sockets: StaleSockets | None = None
        self.proxy_metrics: ProxyMetrics | None = None
        self.programs: list[str] = []
        self.telemetry = None
        self.api: ApiServer | None = None  # local API; features add methods with self.api.register
        self.observer = None
        self.cni = None  # CniPods: pods told by nodewire-cni (agent/cni/pods.py)
        self.privileges: dict = {}  # what privileges.drop() did
        self.drift_check: PeriodicCheck | None = None  # the sampled kernel-vs-desired check
        self._refused: set = set()  # Services the reconciler refuses now (kept out of the drift check)
        self._next_check = 0.0
        self.rdma = None  # RdmaService: counters, topology, and (opt-in) the verbs tracer
        self._pods_seen = -1  # ClusterState.identity_revision the RDMA opt-ins were last computed at
        self.northsouth = None  # NorthSouthService: NodePort/ExternalIP/LB on the node devices (--devices)

    # -- start-up ------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        memory.configure()
        os.umask(0o022)  # pins, status files and sockets never world-writable, whatever umask we inherit
        kube_cfg = None
        if cfg.kube:  # a credentials/config error stops start-up before the datapath is touched
            from .sources.kube import load_config

            kube_cfg = load_config(cfg.kubeconfig, cfg.api_server)
        self.cgroup = cfg.cgroup or detect_cgroup2_root()
        os.makedirs(cfg.state_dir, exist_ok=True)
        t0 = time.perf_counter()
        self.lb = SockLB(cfg.pin_dir, cfg.sizes)
        self.programs = attach_sock_lb(self.lb, self.cgroup)
        self.reconciler = Reconciler(self.lb.services, self.lb.backends)
        if cfg.check_interval > 0:
            self.drift_check = PeriodicCheck(self.state, self.lb.services, self.lb.backends, cfg.check_sample)
        self.stale_sockets = StaleSockets(self.cgroup, self.lb.services, self.lb.backends,
                                          self.lb.revnat,
                                          lambda: listed_addresses(list(self.state.slices.values())))
        self.privileges = drop_capabilities()  # before any thread of ours starts (capabilities are per thread)
        self.api = ApiServer(cfg.api_socket_path).start()  # its threads start with the reduced set
        log.info("datapath ready cgroup=%s pin_dir=%s programs=%d load_seconds=%.3f compiled=%s "
                 "preexisting_entries=%d", self.cgroup, cfg.pin_dir, len(self.programs), time.perf_counter() - t0,
                 self.lb.loaded.compiled, self.reconciler.svc_entries)
        if cfg.devices:
            from .northsouth import NorthSouthService

            self.northsouth = NorthSouthService(self.state, cfg.node_name, cfg.device_list, cfg.pin_dir, cfg.sizes,
                                                cfg.nodeport_bounds, cfg.maglev_table_size, cfg.healthz_port,
                                                self.ready)
        self._note_fill()
        if cfg.manifests is not None:
            self.source = ManifestSource(cfg.manifests, self.state, on_errors=self._object_errors,
                                         poll_interval=cfg.poll_interval).start()
        if kube_cfg is not None:
            from .sources.kube import KubeSource

            self.kube = KubeSource(kube_cfg, self.state, node=cfg.node_name,
                                   on_error=lambda e: self._object_errors([e])).start()
        self.api.register("services.names", self._service_names)
        self.telemetry = start_telemetry(cfg.metrics_addr, cfg.node_name, max_series=cfg.max_series)
        self.telemetry.add_check("/healthz", self.healthy)
        self.telemetry.add_check("/readyz", self.ready)
        register_agent_metrics(self.telemetry.meter(), self)
        if self.drift_check is not None:
            register_drift_metrics(self.telemetry.meter(), self.drift_check)
        self.proxy_metrics = ProxyMetrics(self.telemetry.meter("kubeproxy"), self.state.pending)
        if self.kube is not None:
            self.kube.register_metrics(self.telemetry.meter())
        if cfg.observe:
            from .observe.identity import ObserveConfig
            from .observe.observer import Observer
            try:  # observability is not worth losing the datapath over: run without it
                ocfg = ObserveConfig(node_name=cfg.node_name, max_series=cfg.max_series, aggregate_by=cfg.aggregate_by,
                                     pod_tc=cfg.pod_tc, tcp_probe=cfg.tcp_probe)
                if cfg.peer_cidrs:
                    ocfg = replace(ocfg, peer_cidrs=tuple(cfg.peer_cidrs))
                self.observer = Observer(self.state, self.telemetry, ocfg, cfg.pin_dir, cfg.veth_netns,
                                         self.lb, self.reconciler, self.cgroup).start()
            except Exception as e:
                log.error("observer failed to start, running without observability err=%s", e)
        from .cni.pods import start_for_agent
        self.cni = start_for_agent(self)
        if cfg.rdma:
            from .rdma.service import RdmaService
            try:  # like the observer: optional, never at the datapath's expense
                self.rdma = RdmaService(self.telemetry, cgroup_root=self.cgroup, trace=cfg.rdma_trace).start()
            except Exception as e:
                log.error("rdma failed to start, running without it err=%s", e)

    def _object_errors(self, errors: list[ObjectError]) -> None:
        """From a source's thread: a batch (one file) or one object (the API)."""
        self.counters.object_errors += len(errors)
        self.object_errors.add([str(e) for e in errors])
        self._status_due.set()

    # -- views of the datapath (agent_metrics.AgentView) ----------------------------------------
    def map_fill(self) -> dict[str, MapFill]:
        return self._fill

    def service_count(self) -> int:
        return self._services

    def _note_fill(self) -> None:
        """Map fill and Service count, taken on the loop thread after each sync (readers use these)."""
        rec, lb = self.reconciler, self.lb
        self._fill = {lb.services.name: MapFill(rec.svc_entries, lb.services.capacity),
                      lb.backends.name: MapFill(rec.backend_entries, lb.backends.capacity)}
        self._services = len(rec.owned)

    def _service_names(self, params: dict) -> dict:
        """API `services.names`: {"ids": [...]} → {id: {service, port_name, frontend}}, at most
        NAMES_PAGE ids an answer (`nodewire services` pages through them). Built once per sync."""
        ids = params.get("ids")
        if not isinstance(ids, list) or len(ids) > NAMES_PAGE or not all(isinstance(i, int) for i in ids):
            raise ApiError("bad_request", f"params.ids: a list of at most {NAMES_PAGE} service ids")
        with self._lock:
            if self._names is None or self._names[0] != self.counters.syncs:
                self._names = (self.counters.syncs, self.reconciler.service_names())
            names = self._names[1]
        return {str(i): names[i] for i in ids if i in names}

    # -- loop ----------------------------------------------------------------------------------
    def sync_once(self, full: bool = False) -> SyncResult | None:
        ns = self.northsouth
        if self.datapath is None:
            self.datapath = Datapath(self.reconciler, ns.maps if ns else None, ns.node_info if ns else None)
        changes = self.datapath.take(self.state, full)  # the changed Services' views (model/view.py)
        if not changes and not full:
            return None
        with self._lock, self.proxy_metrics.sync(changes, self.state):
            res = self.datapath.apply(changes, full=full)
            if ns is not None:
                ns.after_sync(changes, res)
        self._sweep_sockets()
        self._refused = (set() if full else self._refused - set(changes)) | {r.service for r in res.refusals}
        now = time.time()
        c = self.counters
        c.syncs += 1
        c.written += res.written
        c.deleted += res.deleted
        c.sync_errors += len(res.errors)
        self.sync_errors.add(res.errors, logged=False)  # the reconciler logs them, summarized
        self.last_sync = SyncInfo(now, res.seconds, res.services, res.written, res.deleted, full)
        self.last_change = now
        self._note_fill()
        if full and self.first_sync is None:
            memory.settle()  # the long-lived state is never rescanned from here on
            self.first_sync = replace(self.last_sync, since_start=time.time() - self.started)
            log.info("full sync done services=%d written=%d deleted=%d seconds=%.3f", self._services,
                     res.written, res.deleted, res.seconds)
        else:
            log.debug("sync services=%d written=%d deleted=%d seconds=%.4f", res.services, res.written,
                      res.deleted, res.seconds)
        self._status_due.set()
        return res

    def _sweep_sockets(self) -> None:
        """Destroy sockets connected through a Service to a backend that left it (stale_sockets.py)."""
        if self.stale_sockets is None:
            return
        try:
            res = self.stale_sockets.sweep()
        except OSError as e:  # the datapath is written; a failed sweep is retried after the next change
            log.error("socket sweep failed err=%s", e)
            return
        self.counters.sockets_destroyed = self.stale_sockets.destroyed_total
        if res.destroyed:
            log.debug("socket sweep namespaces=%d checked=%d destroyed=%d seconds=%.4f",
                      res.namespaces, res.checked, len(res.destroyed), res.seconds)

    def _wait_synced(self) -> None:
        """A full sync from an empty state would delete what the pinned maps hold: wait for each
        source's first complete read (the datapath keeps serving what it had meanwhile)."""
        for src in filter(None, (self.source, self.kube)):
            while not src.wait_synced(1.0) and not self.stop.is_set():
                self._write_status_if_changed()

    def run(self) -> None:
        self._wait_synced()
        if self.stop.is_set():
            return
        with memory.bulk():
            self.sync_once(full=True)
        self._status_thread = threading.Thread(target=self._status_loop, name="status-writer", daemon=True)
        self._status_thread.start()
        source_seen = self.source.last_change if self.source else 0.0
        while not self.stop.is_set():
            self.heartbeat = time.monotonic()
            self.state.changed.wait(HEARTBEAT_SECONDS)
            if self.stop.is_set():
                break
            try:
                self.sync_once()
                if self.source is not None and self.source.last_change != source_seen:
                    source_seen = self.source.last_change  # files changed, maybe only their errors
                    self.last_change = max(self.last_change, time.time())
                    self._status_due.set()
                self._maybe_check()
                self._hooks()
            except Exception:  # one bad cycle must not end the agent; the next one retries
                log.exception("sync failed; keeping the datapath as it is")
            self.object_errors.flush()
        self._status_due.set()
        self._status_thread.join(5)
        self._status_thread = None
        self._write_status_if_changed()
        log.info("agent stopping; the datapath stays attached and pinned")

    def _maybe_check(self) -> None:
        """The sampled drift check, on the loop's thread (the only writer), between two syncs."""
        if self.drift_check is None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self.cfg.check_interval
        with self._lock:
            rep = self.drift_check.run(self._refused)
        for d in rep.drift[:10]:
            log.error("drift between the kernel and the cluster state: %s", d)

    def _hooks(self) -> None:
        """What follows a change: the observer's pod identity, the RDMA opt-ins (when pods changed)."""
        if self.observer is not None:
            self.observer.sync()
        if self.rdma is not None and self.state.identity_revision != self._pods_seen:
            self._pods_seen = self.state.identity_revision
            self.rdma.update_pods(list(self.state.pods.values()))

    # -- status --------------------------------------------------------------------------------
    def status(self) -> AgentStatus:
        sources = {}
        if self.source is not None:
            src = self.source
            sources["manifests"] = SourceStatus(
                "manifests", healthy=True, synced=src.synced.is_set(),
                detail={"path": str(src.directory), "files": len(src.files), "watcher": src.watcher,
                        "errors": len(src.errors)})
        if self.kube is not None:
            k = self.kube.status()
            sources["kube"] = SourceStatus("kube", k["healthy"], k["synced"], k["stale_since"], k["last_error"],
                                           detail={n: v for n, v in k.items() if n not in (
                                               "kind", "healthy", "synced", "stale_since", "last_error")})
        return AgentStatus(
            pid=os.getpid(), started=self.started, cgroup=self.cgroup, pin_dir=self.cfg.pin_dir,
            node={"name": self.cfg.node_name, "zone": self.state.zone},
            programs=list(self.programs), privileges=self.privileges, maps=dict(self._fill),
            services=self._services, first_sync=self.first_sync, last_sync=self.last_sync,
            last_change=self.last_change, counters=replace(self.counters), sources=sources,
            object_errors=list(self.object_errors.recent)[-20:], sync_errors=list(self.sync_errors.recent)[-20:],
            northsouth=self.northsouth.status() if self.northsouth is not None else None,
            check=({"runs": self.drift_check.runs, "totals": dict(self.drift_check.totals),
                    "last": self.drift_check.last.as_dict() if self.drift_check.last else None}
                   if self.drift_check else None))

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
        if self.heartbeat is None:
            return True, "starting"
        stalled = time.monotonic() - self.heartbeat
        return stalled < self.LOOP_STALL_SECONDS, f"loop last turned {stalled:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        """Ready: the datapath was synced once, and no source is stale (the datapath is then serving
        stale but working state, which status and this probe say)."""
        if self.first_sync is None:
            return False, "waiting for the first full sync"
        if self.kube is not None:
            st = self.kube.status()
            if not st["healthy"]:
                return False, (f"kube source stale since {st['stale_since'] or 'start'}"
                               f" (last error: {st['last_error']}); serving the last synced state")
        return True, f"{self._services} services synced"

    def install_signal_handlers(self) -> None:
        def handler(_sig, _frame):
            self.stop.set()
            self.state.changed.set()
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        if self.api is not None:
            self.api.close()
        if self.source is not None:
            self.source.stop()
        if self.cni is not None:
            self.cni.close()
        if self.kube is not None:
            self.kube.stop()
        if self.observer is not None:
            self.observer.close()
        if self.rdma is not None:
            self.rdma.close()
        if self.northsouth is not None:
            self.northsouth.close()
        if self.telemetry is not None:
            self.telemetry.shutdown()
