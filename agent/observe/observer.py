"""The observer: keeps the kernel's view (watched addresses, veth programs) in step with the cluster
state, and turns kernel counters and histograms into labelled OTel metrics when an exporter asks.

Used by agent.py: `Observer(state, telemetry, ObserveConfig(node_name=...), pin_dir, veth_netns, lb,
reconciler, cgroup).start()`, `sync()` after each state change, `close()` at exit. A pod's node-side
veth comes from `set_pod_interface(key, ifname)` (the CNI), the Pod's `nodewire.io/host-veth`
annotation (manifests, the demo), or the node's route to the pod address (routed CNIs); its bytes
and packets are that veth's own interface counters. Nothing here runs on a timer of its own:
collection happens inside the exporter's collect (Prometheus scrape, OTLP export), one netlink dump
and one batched read per map.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque

from opentelemetry.metrics import CallbackOptions, Observation

from ..datapath.abi import LB_OUTCOMES
from ..mapsizes import MapSizes
from ..datapath.maps import MapFull
from ..model.objects import ObjectKey
from ..state import ClusterState
from .drop_reasons import load_drop_reasons, reason_name
from ..histogram import Log2Histogram
from ..datapath.attach import detect_cgroup2_root
from ..cgroups import pod_cgroup
from .identity import Identity, ObserveConfig, PodRef, port_label
from .kernel import HIST_CONNECT, HIST_SRTT, HIST_SRTT_ACK, PodTraffic, TcpObserver
from .links import LinkStats
from .series import Reading, SeriesBook

log = logging.getLogger("nodewire.observe")

# Pod annotation naming the node-side veth (written by the CNI plugin, or by hand in manifests).
HOST_VETH_ANNOTATION = "nodewire.io/host-veth"
# Pod annotation naming its cgroup directory, for hostNetwork pods outside the kubelet's layout (tests, demo).
CGROUP_ANNOTATION = "nodewire.io/cgroup"
HIST_NAMES = {HIST_CONNECT: "connect", HIST_SRTT: "srtt", HIST_SRTT_ACK: "srtt_ack"}


class Observer:
    def __init__(self, state: ClusterState, telemetry, cfg: ObserveConfig, pin_dir: str,
                 veth_netns: str | None = None, lb=None, reconciler=None, cgroup: str | None = None):
        """veth_netns: the network namespace holding the pods' node-side veths (None: this one).
        lb / reconciler: the socket LB (its stats map) and the reconciler (id → Service/backend
        names), both optional. cgroup: where the sock_ops program goes (the socket LB's cgroup)."""
        self.state, self.telemetry, self.cfg = state, telemetry, cfg
        self.pin_dir, self.veth_netns = pin_dir, veth_netns
        self.lb, self.reconciler, self.cgroup = lb, reconciler, cgroup
        self.cgroup_root = detect_cgroup2_root()
        self._by_cgroup: dict[int, PodRef] = {}  # cgroup id → hostNetwork pod, as of the last sync
        self.identity = Identity(cfg)
        self._synced_revision = -1  # ClusterState.revision the last sync saw
        self.book = SeriesBook(cfg.max_series)
        self.interfaces: dict[ObjectKey, str] = {}  # pod → node-side veth name, as told by the CNI
        self._pod_ifnames: dict[ObjectKey, str] = {}  # observed pod → veth, as of the last sync
        self._observed: set[ObjectKey] = set()  # the local pods observed, as of the last sync
        self._lb_owner: dict[tuple, tuple] = {}  # lb_stats key → (what it counted for, base, last value)
        self.tcp: TcpObserver | None = None
        self.links: LinkStats | None = None
        self.traffic: PodTraffic | None = None   # opt-in (cfg.pod_tc)

        self.drop_reasons: dict[int, str] = {}
        self.errors: deque[str] = deque(maxlen=100)  # last errors, for status
        self._lock = threading.RLock()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Observer":
        self.drop_reasons = load_drop_reasons()
        if not self.drop_reasons:
            log.warning("drop reason names unavailable, exporting numbers path=skb/kfree_skb/format")
        self.links = LinkStats(self.veth_netns)  # netlink first: see PodTraffic._nl
        if self.cfg.pod_tc:
            self.traffic = PodTraffic(self.pin_dir, self.veth_netns)
        sizes = MapSizes(revnat=self.lb.revnat.capacity) if self.lb is not None else MapSizes()
        self.tcp = TcpObserver(self.pin_dir, self.cgroup, self.cfg.tcp_probe, sizes)
        if self.telemetry is not None:
            # Instruments live as long as the MeterProvider; a later Observer on the same telemetry
            # (bench rounds, restarts in tests) takes over the callbacks instead of re-creating them.
            holder = getattr(self.telemetry, "_nw_observer", None)
            if holder is None:
                holder = self.telemetry._nw_observer = {}
                meter = self.telemetry.meter("nodewire.observe")
                cb = lambda name: (lambda opts: getattr(holder["obs"], name)(opts) if holder.get("obs") else [])  # noqa: E731
                meter.create_observable_gauge("nodewire.observer.series", [cb("_gauge_series")], "{series}",
                                              "Series the observer exports (after the cap)")
                meter.create_observable_gauge("nodewire.observer.series.dropped", [cb("_gauge_dropped")],
                                              "{series}", "Series left out by the cap in the last collection")
                meter.create_observable_gauge("nodewire.observer.probe.status", [cb("_gauge_probes")], "1",
                                              "1 when a kernel probe is attached, 0 when it is missing")
            holder["obs"] = self
            self.telemetry.add_producer(self.metrics)
        self.sync()
        log.info("observer started probes=%s", ",".join(f"{k}={v}" for k, v in self.tcp.probes.items()))
        return self

    def close(self) -> None:
        with self._lock:
            if self.telemetry is not None:
                self.telemetry.remove_producer(self.metrics)
            if self.traffic is not None:
                self.traffic.close()
                self.traffic = None
            if self.links is not None:
                self.links.close()
                self.links = None
            if self.tcp is not None:
                self.tcp.close()
                self.tcp = None

    # -- control path ---------------------------------------------------------------------------
    def set_pod_interface(self, key: ObjectKey, ifname: str | None) -> None:
        """One pod's veth: the state's changes are taken in as at any sync, then only this pod's
        entry is redone, so N pods found at start (the CNI's netns scan) cost N small updates, not
        N rebuilds of every pod's identity and interface (issue 19 item 5)."""
        with self._lock:
            if ifname is None:
                self.interfaces.pop(key, None)
            else:
                self.interfaces[key] = ifname
            self.sync()
            if self.tcp is None or key not in self._observed:
                return
            self._pod_ifnames.pop(key, None)
            self._pod_ifnames.update(self._interfaces_of({key}))
            if self.traffic is not None:
                self._attach_tc(set(self._pod_ifnames.values()))

    def sync(self, force: bool = False) -> None:
        """Bring watched addresses and veth programs in line with the state (cheap when unchanged).
        Pod/Service identity is rebuilt only when Pods or Services changed (at 100k Services a rebuild
        costs seconds); endpoint churn only forgets the histograms of backends that left."""
        with self._lock:
            if not force and self.state.revision == self._synced_revision:
                return
            self._synced_revision = self.state.revision
            if force or self.state.identity_revision != self.identity.revision:
                self.identity = Identity.from_state(self.state, self.cfg)
                if self.tcp is None:
                    return
                self._watch_identity()
            if self.tcp is not None:
                self._forget_gone_services()

    def _watch_identity(self) -> None:
        self._by_cgroup = self._cgroups_of(self.identity.shared)
        try:
            self.tcp.set_watched(list(self.identity.local), self._by_cgroup)
        except (OSError, MapFull) as e:  # a full map: keep going with what is watched already
            self.errors.append(str(e))
            log.error("watching pod addresses failed err=%s", e)
        observed = self._observed = {ref.key for ref in self.identity.local.values()}
        self._pod_ifnames = self._interfaces_of(observed)
        if self.traffic is not None:
            self._attach_tc(set(self._pod_ifnames.values()))

    def _forget_gone_services(self) -> None:
        """Per-Service histograms of frontends and backends that are gone. The set of every backend
        (500k at 100k Services) is built only when the kernel holds such a histogram at all."""
        fronts, backends = self.identity.frontends, None

        def keep(fe, be) -> bool:
            nonlocal backends
            if fe not in fronts:
                return False
            if backends is None:
                backends = self._backends()
            return be in backends
        try:
            self.tcp.forget_services(keep)
        except OSError as e:
            self.errors.append(str(e))

    def _attach_tc(self, want: set[str]) -> None:
        for ifname in set(self.traffic.attached) - want:
            self.traffic.detach(ifname)
        for ifname in want - set(self.traffic.attached):
            try:
                self.traffic.attach(ifname)
            except (LookupError, OSError) as e:  # one bad pod never stops the others
                msg = f"pod interface {ifname}: tc attach failed: {e}"
                self.errors.append(msg)
                log.error("tc attach failed ifname=%s err=%s", ifname, e)

    def _cgroups_of(self, pods) -> dict[int, "PodRef"]:
        """cgroup id → hostNetwork pod, for its cgroup directory and every one below it (a process
        is in a container's cgroup under the pod's): the Pod's nodewire.io/cgroup annotation, else
        the kubelet's directory for its UID."""
        out = {}
        for ref in pods:
            pod = self.state.pods.get(ref.key)
            path = dict(pod.annotations).get(CGROUP_ANNOTATION) if pod else None
            path = path or (pod_cgroup(self.cgroup_root, pod.uid) if pod else None)
            if not path:
                continue
            for d, _subdirs, _files in os.walk(path):
                try:
                    out[os.stat(d).st_ino] = ref  # a cgroup v2 directory's inode number is its cgroup id
                except OSError:
                    pass  # went away while walking
        return out

    def _interfaces_of(self, observed: set[ObjectKey]) -> dict[ObjectKey, str]:
        """Pod → veth: set_pod_interface() wins, then the Pod's nodewire.io/host-veth annotation,
        then the node's route to the pod's address when it leads to a veth (routed CNIs)."""
        out = {}
        for key in observed:
            pod = self.state.pods.get(key)
            ifname = self.interfaces.get(key) or (dict(pod.annotations).get(HOST_VETH_ANNOTATION) if pod else None)
            if not ifname and pod is not None and self.links is not None:
                ifname = next(filter(None, (self.links.routed_veth(ip) for ip in pod.ips)), None)
            if ifname:
                out[key] = ifname
        return out

    # -- collect path ---------------------------------------------------------------------------
    def read(self) -> Reading:
        """Everything the kernel holds right now, labelled with pod / peer / Service identities."""
        with self._lock:
            self.sync()
            r = Reading()
            ident = self.identity
            self._read_traffic(r)
            if self.tcp is not None:
                for who, metric, counts, total in self.tcp.read_histograms():
                    ref = self._pod_of(who)
                    if ref is None:
                        continue
                    if metric in HIST_NAMES:
                        r.hist(HIST_NAMES[metric], ref.attributes()).add_counts(counts, total)
                self._read_service_latency(r)
                for local, remote, n in self.tcp.read_retransmits():
                    ref = self._pod_of(local)
                    if ref is not None:
                        r.count("retrans", {**ref.attributes(), **ident.peer(remote)}, n)
                node = self.cfg.node_name
                for reason, n in self.tcp.read_drops().items():
                    r.count("drops", {"k8s.node.name": node, "nodewire.drop.reason":
                                      reason_name(self.drop_reasons, reason)}, n)
            if self.lb is not None:
                self._read_lb(r)
            return r

    def _pod_of(self, who):
        """A kernel key's pod: by local address, or by cgroup id (an int) for hostNetwork pods."""
        return self._by_cgroup.get(who) if isinstance(who, int) else self.identity.pod_of(who)

    def _read_traffic(self, r: Reading) -> None:
        """Per-pod bytes and packets: the veth's interface counters (or, with --pod-tc, the tc
        program's per-segment counts)."""
        refs = {ref.key: ref for ref in self.identity.local.values()}
        if self.traffic is not None:
            by_index = {idx: name for name, idx in self.traffic.attached.items()}
            stats: dict[str, dict] = {}
            for (ifindex, direction), pb in self.traffic.read().items():
                if ifindex in by_index:
                    stats.setdefault(by_index[ifindex], {})[direction] = pb
        else:
            stats = self.links.read() if self.links is not None else {}
        for key, ifname in self._pod_ifnames.items():
            ref = refs.get(key)
            if ref is None or ifname not in stats:
                continue
            for direction, (packets, nbytes) in stats[ifname].items():
                attrs = {**ref.attributes(), "network.io.direction": direction, "network.interface.name": ifname}
                r.count("pod_bytes", attrs, nbytes)
                r.count("pod_packets", attrs, packets)

    def _read_service_latency(self, r: Reading) -> None:
        """Connect latency and srtt per Service and backend: the kernel keys them by (VIP, port,
        backend address, port), from the socket LB's record of what each socket dialled."""
        ident = self.identity
        for (vip, vport), (bip, bport), metric, counts, total in self.tcp.read_service_histograms():
            front = ident.frontends.get((vip, vport))
            name = {HIST_CONNECT: "svc_connect", HIST_SRTT: "svc_srtt"}.get(metric)
            if front is None or name is None:
                continue  # a frontend removed since: its series goes with it
            svc, port = front
            attrs = {"k8s.namespace.name": svc.namespace, "k8s.service.name": svc.name,
                     "nodewire.service.port": port, "k8s.node.name": self.cfg.node_name, **ident.backend(bip, bport)}
            r.hist(name, attrs).add_counts(counts, total)

    def _read_lb(self, r: Reading) -> None:
        snap = self.reconciler.snapshot() if self.reconciler is not None else None
        keys, vals = self.lb.lb_stats.dump_summed()
        for k, v in zip(keys, vals):
            sid, bid, outcome = int(k["service_id"]), int(k["backend_id"]), int(k["outcome"])
            info = snap.frontend(sid) if snap is not None else None
            if info is None:
                continue  # a frontend removed since: its series goes with it
            backend = snap.backend(bid)  # (ip, port, protocol) or None
            value = self._since_owner((sid, bid, outcome), (str(info.service), info.frontend, backend), int(v))
            attrs = {"k8s.namespace.name": info.service.namespace, "k8s.service.name": info.service.name,
                     "nodewire.service.port": port_label(info.port_name, info.port, info.protocol),
                     "k8s.node.name": self.cfg.node_name}
            if LB_OUTCOMES.get(outcome) == "forwarded":
                if backend is None:
                    continue  # the backend is gone: its series goes with it, like a deleted pod's
                r.count("svc_connects", {**attrs, **self.identity.backend(backend[0], backend[1])}, value)
            else:
                r.count("svc_refusals", {**attrs, "nodewire.refusal.reason": LB_OUTCOMES.get(outcome, str(outcome))},
                        value)

    def _since_owner(self, key: tuple, owner: tuple, value: int) -> int:
        """The kernel counts per (service id, backend id); the reconciler reuses ids. When an id
        pair now stands for another Service/backend than at the last read, the count up to that
        read belonged to the old owner (whose frontend is gone, so it stopped counting): it is the
        new owner's zero."""
        seen = self._lb_owner.get(key)  # (owner, base, value at the last read)
        if seen is None:
            base = 0
        elif value < seen[2]:  # the LRU entry was evicted and recreated: counting restarted
            base = 0
        elif seen[0] != owner:
            base = seen[2]
        else:
            base = seen[1]
        self._lb_owner[key] = (owner, base, value)
        return value - base

    def _backends(self) -> set[tuple[str, int]]:
        """(ip, port) of every backend the reconciler wrote (a snapshot of its id registry)."""
        if self.reconciler is None:
            return set()
        snap = self.reconciler.snapshot()
        return {snap.backend(bid)[:2] for bid in snap.backend_ids()}

    def metrics(self):
        """OTel Metric objects for the telemetry producer hook (one kernel read per call)."""
        try:
            reading = self.read()
        except Exception as e:  # an exporter must never die of a failed read
            log.error("observer read failed err=%s", e)
            return []
        with self._lock:
            out = self.book.to_metrics(reading)
        if self.book.dropped:
            log.warning("series cap reached cap=%d dropped=%d", self.cfg.max_series, self.book.dropped)
        return out

    # -- self-metrics ---------------------------------------------------------------------------
    def _gauge_series(self, _opts: CallbackOptions):
        return [Observation(self.book.exported, {"k8s.node.name": self.cfg.node_name})]

    def _gauge_dropped(self, _opts: CallbackOptions):
        return [Observation(self.book.dropped, {"k8s.node.name": self.cfg.node_name})]

    def _gauge_probes(self, _opts: CallbackOptions):
        probes = self.tcp.probes if self.tcp else {}
        return [Observation(1 if st == "attached" else 0, {"k8s.node.name": self.cfg.node_name,
                                                            "nodewire.probe": tp})
                for tp, st in probes.items()]

    def histograms(self) -> dict[str, dict[tuple, Log2Histogram]]:
        """The labelled kernel histograms (for the terminal views)."""
        return self.read().histograms

