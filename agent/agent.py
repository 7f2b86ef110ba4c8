"""The agent loop: sources → ClusterState → model → reconciler → BPF maps, plus status and metrics.

One thread owns the reconciler. Sources either are polled here (manifests) or push into ClusterState
from their own thread and wake this loop through ClusterState.changed. The first sync after start is
a full sync against what the pinned maps already hold, so a restart rewrites nothing that is right.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import signal
import threading
import time
from collections import deque

from .api import ApiServer
from .config import AgentConfig
from .datapath.attach import attach_sock_lb, detect_cgroup2_root
from .datapath.loader import SockLB
from .datapath.check import PeriodicCheck
from .datapath.reconciler import Reconciler, SyncResult
from .datapath.stale_sockets import StaleSockets, listed_addresses
from .export.drift import register_drift_metrics
from .export.kubeproxy import ProxyMetrics
from .export.telemetry import start_telemetry
from .model.objects import ObjectError
from .privileges import drop as drop_capabilities
from .sources.manifests import ManifestSource
from .state import ClusterState

log = logging.getLogger("nodewire.agent")


def _return_free_memory() -> None:
    """Give the heap freed after the initial parse (JSON text, decoded dicts) back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Agent:
    def __init__(self, cfg: AgentConfig):
        cfg.validate()
        self.cfg = cfg
        self.state = ClusterState(cfg.node_name, cfg.zone)
        self.stop = threading.Event()
        self.started = time.time()
        self.object_errors: deque[str] = deque(maxlen=200)
        self.sync_errors: deque[str] = deque(maxlen=200)
        self.counters = {"syncs": 0, "object_errors": 0, "sync_errors": 0, "written": 0, "deleted": 0,
                         "sockets_destroyed": 0}
        self.last_sync: dict | None = None
        self.last_change = 0.0  # when a source change was last taken in (and applied)
        self.first_sync: dict | None = None
        self.sources: dict[str, dict] = {}
        self.source: ManifestSource | None = None
        self.kube = None  # KubeSource: pushes into self.state from its own threads
        self.heartbeat: float | None = None  # monotonic time the agent loop last turned
        # status.json is written by its own thread so that a change never waits behind it (at 10k
        # Services one write took ~25 ms); _lock keeps it from reading the reconciler mid-sync.
        self._lock = threading.Lock()
        self._status_due = threading.Event()
        self._status_thread: threading.Thread | None = None
        self.lb: SockLB | None = None
        self.reconciler: Reconciler | None = None
        self.stale_sockets: StaleSockets | None = None
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
        self._pods_seen = -1  # ClusterState.revision the RDMA opt-ins were last computed at
        self.northsouth = None  # NorthSouthService: NodePort/ExternalIP/LB on the node devices (--devices)

    # -- start-up ------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
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
        if cfg.manifests is not None:
            self.source = ManifestSource(cfg.manifests, on_error=self._object_error)
            self.sources["manifests"] = {"path": cfg.manifests, "healthy": True}
        if kube_cfg is not None:
            from .sources.kube import KubeSource

            self.kube = KubeSource(kube_cfg, self.state, node=cfg.node_name, on_error=self._object_error).start()
        self.telemetry = start_telemetry(cfg.metrics_addr, cfg.node_name, max_series=cfg.max_series)
        self.telemetry.add_check("/healthz", self.healthy)
        self.telemetry.add_check("/readyz", self.ready)
        self._instruments()
        if self.drift_check is not None:
            register_drift_metrics(self.telemetry.meter(), self.drift_check)
        self.proxy_metrics = ProxyMetrics(self.telemetry.meter("kubeproxy"), self.state.pending)
        if self.kube is not None:
            self.kube.register_metrics(self.telemetry.meter())
        if cfg.observe:
            from dataclasses import replace

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

    def _object_error(self, err: ObjectError) -> None:
        self.counters["object_errors"] += 1
        self.object_errors.append(str(err))
        log.error("bad object: %s", err)

    def _instruments(self) -> None:
        from opentelemetry.metrics import Observation

        m = self.telemetry.meter()
        maps = lambda: {self.lb.services.name: self.lb.services, self.lb.backends.name: self.lb.backends}  # noqa: E731
        m.create_observable_gauge(
            "nodewire.map.entries", unit="1", description="Entries in each service-datapath map",
            callbacks=[lambda _o: [Observation(self._entries(n), {"map": n}) for n in maps()]])
        m.create_observable_gauge(
            "nodewire.map.capacity", unit="1", description="Capacity (max_entries) of each map",
            callbacks=[lambda _o: [Observation(mp.capacity, {"map": n}) for n, mp in maps().items()]])
        m.create_observable_counter(
            "nodewire.sync.runs", unit="1", description="Reconciler runs",
            callbacks=[lambda _o: [Observation(self.counters["syncs"])]])
        m.create_observable_counter(
            "nodewire.sync.errors", unit="1", description="Services refused by the reconciler (full map, clash)",
            callbacks=[lambda _o: [Observation(self.counters["sync_errors"])]])
        m.create_observable_counter(
            "nodewire.object.errors", unit="1", description="Objects rejected by validation",
            callbacks=[lambda _o: [Observation(self.counters["object_errors"])]])
        m.create_observable_gauge(
            "nodewire.sync.last_duration", unit="s", description="Duration of the last reconciler run",
            callbacks=[lambda _o: [Observation(self.last_sync["seconds"] if self.last_sync else 0.0)]])
        m.create_observable_gauge(
            "nodewire.services", unit="1", description="Services in the datapath",
            callbacks=[lambda _o: [Observation(len(self.reconciler.owned))]])

    def _entries(self, name: str) -> int:
        rec = self.reconciler
        return rec.svc_entries if name == self.lb.services.name else rec.backend_entries

    # -- loop ----------------------------------------------------------------------------------
    def sync_once(self, full: bool = False) -> SyncResult | None:
        # Bulk parsing and map packing make millions of short-lived, acyclic objects: the cyclic GC
        # would rescan the whole heap many times over (about 1.7 s of a 100k-Service sync).
        gc.disable()
        try:
            return self._sync(full)
        finally:
            gc.enable()

    def _sync(self, full: bool) -> SyncResult | None:
        polled = self.source is not None and self.source.poll()
        if polled:
            self.state.replace(self.source.objects())
            self.last_change = time.time()
        changes = self.state.all_frontends() if full else self.state.take_dirty()
        if not changes and not full:
            if polled:  # files changed but no frontend did (e.g. only errors): still show it
                self._status_changed()
            return None
        with self._lock, self.proxy_metrics.sync(changes, self.state):
            if self.northsouth is not None:
                self.northsouth.extend(changes)
            res = self.reconciler.apply(changes, full=full)
            if self.northsouth is not None:
                ns = self.northsouth.apply(full=full)
                res.refusals.extend(ns.refusals)
        self._sweep_sockets()
        self._refused = (set() if full else self._refused - set(changes)) | {r.service for r in res.refusals}
        if changes and not full:
            self.last_change = time.time()
        self.counters["syncs"] += 1
        self.counters["written"] += res.written
        self.counters["deleted"] += res.deleted
        self.counters["sync_errors"] += len(res.errors)
        self.sync_errors.extend(res.errors)
        self.last_sync = {"time": time.time(), "seconds": res.seconds, "services": res.services,
                          "written": res.written, "deleted": res.deleted, "full": full}
        if full and self.first_sync is None:
            gc.collect()
            gc.freeze()  # the long-lived cluster state is never rescanned from here on
            _return_free_memory()
            self.first_sync = dict(self.last_sync, since_start=time.time() - self.started)
            log.info("full sync done services=%d written=%d deleted=%d seconds=%.3f", len(self.reconciler.owned),
                     res.written, res.deleted, res.seconds)
        else:
            log.debug("sync services=%d written=%d deleted=%d seconds=%.4f", res.services, res.written,
                      res.deleted, res.seconds)
        self._status_changed()
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
        self.counters["sockets_destroyed"] = self.stale_sockets.destroyed_total
        if res.destroyed:
            log.debug("socket sweep namespaces=%d checked=%d destroyed=%d seconds=%.4f",
                      res.namespaces, res.checked, len(res.destroyed), res.seconds)

    def _status_changed(self) -> None:
        if self._status_thread is not None:
            self._status_due.set()
        else:
            self.write_status()

    def _status_loop(self) -> None:
        """At most one write a second (each takes the reconciler lock and the GIL for ~10-25 ms at 10k
        Services), and at least one: source health changes without a sync."""
        last = 0.0
        while not self.stop.is_set():
            self._status_due.wait(1.0)
            self.stop.wait(max(0.0, last + 1.0 - time.monotonic()))
            self._status_due.clear()
            last = time.monotonic()
            try:
                self.write_status()
            except OSError as e:
                log.error("cannot write status: %s", e)

    def run(self) -> None:
        # A full sync from an empty state would delete what the pinned maps hold: with the API source,
        # wait for its first complete list (the datapath keeps serving what it had meanwhile).
        while self.kube is not None and not self.kube.wait_synced(1.0) and not self.stop.is_set():
            self.write_status()
        self.sync_once(full=True)
        self._status_thread = threading.Thread(target=self._status_loop, name="status-writer", daemon=True)
        self._status_thread.start()
        while not self.stop.is_set():
            self.heartbeat = time.monotonic()
            self.state.changed.wait(self.cfg.poll_interval)
            if self.stop.is_set():
                break
            try:
                self.sync_once()
                self._maybe_check()
                if self.observer is not None:
                    self.observer.sync()
                if self.rdma is not None and self.state.revision != self._pods_seen:
                    self._pods_seen = self.state.revision
                    self.rdma.update_pods(list(self.state.pods.values()))
            except Exception:  # one bad cycle must not end the agent; the next one retries
                log.exception("sync failed; keeping the datapath as it is")
        self._status_thread.join(5)
        self._status_thread = None
        self.write_status()
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
        return True, f"{len(self.reconciler.owned)} services synced"

    def install_signal_handlers(self) -> None:
        def handler(_sig, _frame):
            self.stop.set()
            self.state.changed.set()
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        if self.api is not None:
            self.api.close()
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

    # -- status --------------------------------------------------------------------------------
    def status(self, names: bool = True) -> dict:
        lb, rec = self.lb, self.reconciler
        return {
            "pid": os.getpid(),
            "started": self.started,
            "cgroup": self.cgroup,
            "pin_dir": self.cfg.pin_dir,
            "node": {"name": self.cfg.node_name, "zone": self.state.zone},
            "programs": self.programs,
            "privileges": self.privileges,
            "maps": {m.name: {"entries": self._entries(m.name), "capacity": m.capacity}
                     for m in (lb.services, lb.backends)},
            "services": len(rec.owned),
            "first_sync": self.first_sync,
            "last_sync": self.last_sync,
            "last_change": self.last_change,
            "counters": self.counters,
            "sources": dict(self.sources, **({"kube": self.kube.status()} if self.kube else {})),
            "object_errors": list(self.object_errors)[-20:],
            "sync_errors": list(self.sync_errors)[-20:],
            "check": ({"runs": self.drift_check.runs, "totals": dict(self.drift_check.totals),
                       "last": self.drift_check.last.as_dict() if self.drift_check.last else None}
                      if self.drift_check else None),
            **({"service_names": {str(k): v for k, v in rec.service_names().items()}} if names else {}),
            **({"northsouth": self.northsouth.status()} if self.northsouth is not None else {}),
        }

    def write_status(self) -> None:
        path = os.path.join(self.cfg.state_dir, "status.json")
        tmp = path + ".tmp"
        with self._lock:  # the names come from a snapshot taken under the registry's own lock
            st = self.status(names=False)
        st["service_names"] = {str(k): v for k, v in self.reconciler.service_names().items()}
        with open(tmp, "w") as f:
            json.dump(st, f)
        os.replace(tmp, path)
