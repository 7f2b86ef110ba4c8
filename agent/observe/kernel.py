"""The kernel side of observability: load, attach and read bpf/tcp_latency.c and bpf/pod_tc.c.

Both go through the loader (agent/datapath/loader.py): compiled in a short-lived child, pinned under
the pin dir, opened here with raw bpf() calls — the agent never imports BCC for observability.
bpf/tcp_latency.c's sock_ops program goes on the cgroup the socket LB is attached to (the node's
cgroup root on a real node, the sandbox's cgroup in tests): it sees the connects, state changes and
retransmits of every socket made below it. skb:kfree_skb is probed in tracefs before linking; when
missing it is left out, logged and reported in `probes` (exported as nodewire.observer.probe.status)
— never a crash. tcp:tcp_probe (per ACK) only with tcp_probe=True. bpf/pod_tc.c (opt-in,
PodTraffic) goes on the node side of each pod's veth. Maps are read with BPF_MAP_LOOKUP_BATCH, per-CPU
ones summed field by field (RawMap.dump_summed), layouts from BCC's ctypes of the C structs.
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np

from ..datapath import abi
from ..datapath.attach import (
    TC_EGRESS, TC_INGRESS, TRACEFS, attach_cgroup, attach_tc, attach_tracepoint, detach_cgroup,
)
from ..datapath.loader import ProgramSpec, load
from ..mapsizes import MapSizes
from ..datapath.maps import addr16, addr_str, pack_rows, port_host
from ..histogram import hist_cflags

log = logging.getLogger("nodewire.observe")

HIST_CONNECT, HIST_SRTT, HIST_SRTT_ACK = 0, 1, 2   # hist_key.metric in bpf/tcp_latency.c
SOCK_OPS = "sock_ops"
TCP_MAPS = ("nodewire_obs_watch_v1", "nodewire_obs_cgroups_v1", "nodewire_obs_hist_v2", "nodewire_obs_svc_hist_v1",
            "nodewire_obs_retrans_v2", "nodewire_obs_drops_v1")
NO_ADDRESS = bytes(16)
TRACEPOINT_PROGRAMS = {"skb:kfree_skb": "nw_kfree_skb", "tcp:tcp_probe": "nw_tcp_probe"}
DIR_NAMES = {0: "transmit", 1: "receive"}  # pod_traffic_key.direction in bpf/pod_tc.c
TC_PRIO = 0xc0de & 0x7fff               # our filters' priority, so we delete only our own


def tracepoint_exists(tp: str, tracefs: str = TRACEFS) -> bool:
    """Its format file must be there: BCC builds the args struct from it, and a tracepoint directory
    without one (seen in the fault tests) made the whole program fail to compile."""
    cat, _, name = tp.partition(":")
    return os.path.isfile(os.path.join(tracefs, "events", cat, name, "format"))


def tcp_spec(tracepoints: tuple[str, ...], sizes: MapSizes = MapSizes()) -> ProgramSpec:
    """bpf/tcp_latency.c with the tracepoint programs asked for (each compiled in by its -D).
    The one place that says how it is built. lb_defines: it reads the socket LB's revnat map."""
    flags = [*hist_cflags(), *abi.lb_defines(sizes)]
    flags += [f"-DNW_WITH_{TRACEPOINT_PROGRAMS[tp][3:].upper()}" for tp in tracepoints]
    programs = [("nw_sockops", "SOCK_OPS", "CGROUP_SOCK_OPS")]
    programs += [(TRACEPOINT_PROGRAMS[tp], "TRACEPOINT", None) for tp in tracepoints]
    return ProgramSpec(source="tcp_latency.c", cflags=tuple(flags), programs=tuple(programs), maps=TCP_MAPS)


class TcpObserver:
    """bpf/tcp_latency.c: connect latency and srtt histograms per pod and per Service backend,
    retransmits, drops."""

    def __init__(self, pin_dir: str, cgroup: str | None, tcp_probe: bool = False,
                 sizes: MapSizes = MapSizes(), state_dir: str | None = None):
        self.probes: dict[str, str] = {SOCK_OPS: "attached"}
        wanted = ["skb:kfree_skb"] + (["tcp:tcp_probe"] if tcp_probe else [])
        present = []
        for tp in wanted:
            if tracepoint_exists(tp):
                present.append(tp)
            else:
                self.probes[tp] = "missing"
                log.warning("tracepoint missing, its metrics are off tracepoint=%s", tp)
        self.loaded = load(tcp_spec(tuple(present), sizes), pin_dir, state_dir)
        m = self.loaded.maps
        self.watch, self.cgroups = m["nodewire_obs_watch_v1"], m["nodewire_obs_cgroups_v1"]
        self.hist, self.svc_hist = m["nodewire_obs_hist_v2"], m["nodewire_obs_svc_hist_v1"]
        self.retrans, self.drops = m["nodewire_obs_retrans_v2"], m["nodewire_obs_drops_v1"]
        self.metrics = (HIST_CONNECT, HIST_SRTT) + ((HIST_SRTT_ACK,) if "tcp:tcp_probe" in present else ())
        # pinned maps outlive a restart: what is watched already keeps its histograms
        self._watched: dict[bytes, int] = {k: 0 for k in self.watch.dump()}
        self._cgroups: set[int] = {int(k) for k in self.cgroups.dump_arrays()[0]}
        self.links: dict[str, int] = {}
        for tp in present:
            self.links[tp] = attach_tracepoint(self.loaded.prog_fd(TRACEPOINT_PROGRAMS[tp]), tp)
            self.probes[tp] = "attached"
        self.cgroup = cgroup
        self.sock_ops_fd = self.loaded.prog_fd("nw_sockops")
        if cgroup is None:
            self.probes[SOCK_OPS] = "detached"
            return
        try:
            attach_cgroup(self.sock_ops_fd, cgroup, "CGROUP_SOCK_OPS")
        except OSError as e:
            self.probes[SOCK_OPS] = "missing"
            log.error("sock_ops attach failed, TCP telemetry is off cgroup=%s err=%s", cgroup, e)

    def set_watched(self, ips: list[str], cgroups=()) -> None:
        """Make the kernel's set of observed pods equal to these local addresses and cgroup ids
        (pods whose address is shared): their watch entries and (zeroed) histograms are created,
        those no longer watched deleted, so a re-used IP or cgroup id starts from zero."""
        want = {addr16(ip): i for i, ip in enumerate(sorted(set(ips)))}
        gone = [k for k in self._watched if k not in want]
        new = [k for k in want if k not in self._watched]
        kdt = self.hist.key_dtype
        rows = lambda addrs, cgs: [(a, m, 0, 0) for a in addrs for m in self.metrics] + \
            [(NO_ADDRESS, m, 0, cg) for cg in cgs for m in self.metrics]  # noqa: E731
        want_cg = set(cgroups)
        gone_cg, new_cg = self._cgroups - want_cg, want_cg - self._cgroups
        if gone or gone_cg:
            self.watch.delete(gone)
            self.cgroups.delete(pack_rows(self.cgroups.key_dtype, [(cg,) for cg in gone_cg]))
            self.hist.delete(pack_rows(kdt, rows(gone, gone_cg)))
            keys, _ = self.retrans.dump_arrays()
            gone_set = set(gone)
            self.retrans.delete([k.tobytes() for k in keys if bytes(k["local"]) in gone_set or int(k["cgroup_id"]) in gone_cg])
        if new or new_cg:
            hk = pack_rows(kdt, rows(new, new_cg))
            self.hist.update_arrays(np.frombuffer(b"".join(hk), dtype=kdt), np.zeros(len(hk), dtype=self.hist.value_dtype))
            self.watch.update([(k, np.array([want[k]], dtype=np.uint32).tobytes()) for k in new])
            self.cgroups.update([(np.uint64(cg).tobytes(), np.uint32(0).tobytes()) for cg in new_cg])
        self._watched, self._cgroups = want, want_cg

    def read_histograms(self) -> list[tuple[str | int, int, np.ndarray, int]]:
        """(local ip, or cgroup id for a pod named by its cgroup; metric; per-slot counts; sum) per
        histogram with at least one sample, summed over CPUs. (Every watched pod has its histograms
        created up front; the empty ones of idle pods are not worth a series.)"""
        keys, v = self.hist.dump_summed()
        slots, sums = v["slots"], v["sum"]
        return [(int(k["cgroup_id"]) or addr_str(k["address"]), int(k["metric"]), slots[i], int(sums[i]))
                for i, k in enumerate(keys) if slots[i].any()]

    def read_service_histograms(self) -> list[tuple[tuple[str, int], tuple[str, int], int, np.ndarray, int]]:
        """((vip, port), (backend ip, port), metric, per-slot counts, sum) per Service backend."""
        keys, v = self.svc_hist.dump_summed()
        return [((addr_str(k["vip"]), port_host(k["vport"])), (addr_str(k["backend"]), port_host(k["bport"])),
                 int(k["metric"]), v["slots"][i], int(v["sum"][i])) for i, k in enumerate(keys)]

    def forget_services(self, keep) -> None:
        """Delete the per-Service histograms whose (vip, port, backend, port) keep() rejects
        (a removed frontend or backend), at sync time: a scrape never changes kernel state."""
        keys, _ = self.svc_hist.dump_arrays()
        gone = [k.tobytes() for k in keys
                if not keep((addr_str(k["vip"]), port_host(k["vport"])), (addr_str(k["backend"]), port_host(k["bport"])))]
        self.svc_hist.delete(gone)

    def read_retransmits(self) -> list[tuple[str | int, str, int]]:
        """(local ip or cgroup id, remote ip, retransmitted segments)."""
        keys, vals = self.retrans.dump_arrays()
        return [(int(k["cgroup_id"]) or addr_str(k["local"]), addr_str(k["remote"]), int(v)) for k, v in zip(keys, vals)]

    def read_drops(self) -> dict[int, int]:
        keys, vals = self.drops.dump_arrays()
        return {int(k): int(v) for k, v in zip(keys, vals)}

    def program_fds(self) -> dict[str, int]:
        """function name → program fd, for run-time statistics (bench)."""
        return {fn: self.loaded.prog_fd(fn) for fn in self.loaded.program_pins}

    def set_active(self, on: bool) -> None:
        """Attach or detach every program without reloading (bench on/off windows)."""
        if self.cgroup is not None and self.probes[SOCK_OPS] == "attached":
            if on:
                attach_cgroup(self.sock_ops_fd, self.cgroup, "CGROUP_SOCK_OPS")
            else:
                detach_cgroup(self.cgroup, "CGROUP_SOCK_OPS", self.sock_ops_fd)
        for tp in [tp for tp, st in self.probes.items() if ":" in tp and st == "attached"]:
            if on and tp not in self.links:
                self.links[tp] = attach_tracepoint(self.loaded.prog_fd(TRACEPOINT_PROGRAMS[tp]), tp)
            elif not on and tp in self.links:
                os.close(self.links.pop(tp))

    def close(self) -> None:
        """Detach (the programs and maps stay pinned: a restart reuses them and their counts)."""
        if self.cgroup is not None and self.probes[SOCK_OPS] == "attached":
            try:
                detach_cgroup(self.cgroup, "CGROUP_SOCK_OPS", self.sock_ops_fd)
            except OSError as e:  # the cgroup is gone, or another agent replaced us
                log.info("sock_ops detach err=%s", e)
        for fd in self.links.values():
            os.close(fd)
        self.links.clear()
        self.loaded.close()


class PodTraffic:
    """bpf/pod_tc.c on the node-side veths, all in one network namespace (None = this one). Opt-in
    (--pod-tc): it adds per-segment packet counts of GSO frames, which interface counters count as
    one packet each; bytes are the same as the interface counters'."""

    SPEC = ProgramSpec(source="pod_tc.c", programs=(("nw_pod_tx", "SCHED_CLS", None), ("nw_pod_rx", "SCHED_CLS", None)),
                       maps=("nodewire_pod_traffic_v1",))

    def __init__(self, pin_dir: str, netns: str | None = None, state_dir: str | None = None):
        self.loaded = load(self.SPEC, pin_dir, state_dir)
        self.progs = {fn: self.loaded.prog_fd(fn) for fn in ("nw_pod_tx", "nw_pod_rx")}
        self.counts = self.loaded.maps["nodewire_pod_traffic_v1"]
        self.netns = netns
        self._ipr = None
        self._lock = threading.Lock()
        self.attached: dict[str, int] = {}  # ifname -> ifindex
        self._nl()

    def _nl(self):
        # pyroute2's NetNS forks a helper that does the netlink calls with our fd numbers: it must
        # start after the tc programs are loaded (it needs their fds) and before any other BPF
        # object is made (it would hold, say, tracepoint perf events open after we close them).
        if self._ipr is None:
            if self.netns:
                from pyroute2 import NetNS
                self._ipr = NetNS(self.netns)
            else:
                from pyroute2 import IPRoute
                self._ipr = IPRoute()
        return self._ipr

    def attach(self, ifname: str) -> int:
        """Idempotent: (re)place our filters on ifname's clsact. Returns the ifindex."""
        with self._lock:
            filters = [(fn, self.progs[fn], parent) for fn, parent in (("nw_pod_tx", TC_INGRESS), ("nw_pod_rx", TC_EGRESS))]
            idx = attach_tc(self._nl(), ifname, filters, TC_PRIO, f"netns {self.netns or '(host)'}")
            self.attached[ifname] = idx
            return idx

    def detach(self, ifname: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        with self._lock:
            idx = self.attached.pop(ifname, None)
            if idx is None:
                return
            for parent in (TC_INGRESS, TC_EGRESS):
                try:
                    self._nl().tc("del-filter", "bpf", idx, ":1", parent=parent, prio=TC_PRIO)
                except NetlinkError:
                    pass  # the veth went away with its pod: the kernel removed the filter already
            self._forget(idx)

    def _forget(self, ifindex: int) -> None:
        self.counts.delete(pack_rows(self.counts.key_dtype, [(ifindex, d) for d in DIR_NAMES]))

    def read(self) -> dict[tuple[int, str], tuple[int, int]]:
        """(ifindex, direction) -> (packets, bytes)."""
        keys, v = self.counts.dump_summed()
        return {(int(k["ifindex"]), DIR_NAMES.get(int(k["direction"]), "?")): (int(v["packets"][i]), int(v["bytes"][i]))
                for i, k in enumerate(keys)}

    def close(self) -> None:
        for ifname in list(self.attached):
            self.detach(ifname)
        if self._ipr is not None:
            self._ipr.close()
        self.loaded.close()
