"""The kernel side of observability: compile, attach and read bpf/tcp_latency.c and bpf/pod_tc.c.

bpf/tcp_latency.c's sock_ops program goes on the cgroup the socket LB is attached to (the node's
cgroup root on a real node, the sandbox's cgroup in tests): it sees the connects, state changes and
retransmits of every socket made below it. skb:kfree_skb is probed before compiling; when missing it
is compiled out (-DNW_WITHOUT_KFREE_SKB), logged and reported in `probes` (exported as
nodewire.observer.probe.status) — never a crash. tcp:tcp_probe (per ACK) only with tcp_probe=True.
bpf/pod_tc.c (opt-in, PodTraffic) goes on the node side of each pod's veth. Maps are read with
BPF_MAP_LOOKUP_BATCH (per-CPU ones through PercpuMap).

compile_programs() is the one place that builds these programs, so moving it to the out-of-process
loader is a change of that function only.
"""
from __future__ import annotations

import errno
import logging
import os
import threading

import numpy as np

from ..datapath.loader import MapSizes, compile_program
from ..datapath.maps import MapFull, RawMap, addr16, addr_str, pack_rows, port_host, unpack_rows
from .histogram import hist_cflags
from .percpu import PercpuMap

log = logging.getLogger("nodewire.observe")

HIST_CONNECT, HIST_SRTT, HIST_SRTT_ACK = 0, 1, 2   # hist_key.metric in bpf/tcp_latency.c
SOCK_OPS = "sock_ops"
DIR_NAMES = {0: "transmit", 1: "receive"}  # pod_traffic_key.direction in bpf/pod_tc.c
TC_PRIO = 0xc0de & 0x7fff               # our filters' priority, so we delete only our own
TC_INGRESS, TC_EGRESS = "ffff:fff2", "ffff:fff3"


def compile_tcp(pin_dir: str, tcp_probe: bool, sizes: MapSizes = MapSizes()):
    """BCC-compile bpf/tcp_latency.c; returns (module, probes status)."""
    from bcc import BPF

    probes, flags = {SOCK_OPS: "attached"}, list(hist_cflags())
    if BPF.tracepoint_exists("skb", "kfree_skb"):
        probes["skb:kfree_skb"] = "attached"
    else:
        probes["skb:kfree_skb"] = "missing"
        flags.append("-DNW_WITHOUT_KFREE_SKB")
        log.warning("tracepoint missing, its metrics are off tracepoint=skb:kfree_skb")
    if tcp_probe:
        if BPF.tracepoint_exists("tcp", "tcp_probe"):
            probes["tcp:tcp_probe"] = "attached"
            flags.append("-DNW_TCP_PROBE")
        else:
            probes["tcp:tcp_probe"] = "missing"
            log.warning("tracepoint missing, per-ACK srtt is off tracepoint=tcp:tcp_probe")
    return compile_program("tcp_latency.c", pin_dir, sizes, extra_cflags=flags), probes


class TcpObserver:
    """bpf/tcp_latency.c: connect latency and srtt histograms per pod and per Service backend,
    retransmits, drops."""

    def __init__(self, pin_dir: str, cgroup: str | None, tcp_probe: bool = False,
                 sizes: MapSizes = MapSizes()):
        from bcc import BPF, BPFAttachType

        self.bpf, self.probes = compile_tcp(pin_dir, tcp_probe, sizes)
        self.metrics = (HIST_CONNECT, HIST_SRTT) + ((HIST_SRTT_ACK,) if self.probes.get("tcp:tcp_probe") == "attached" else ())
        self.watch = RawMap(self.bpf["nodewire_obs_watch_v1"], "nodewire_obs_watch_v1")
        self.hist = PercpuMap(self.bpf["nodewire_obs_hist_v1"], "nodewire_obs_hist_v1")
        self.svc_hist = PercpuMap(self.bpf["nodewire_obs_svc_hist_v1"], "nodewire_obs_svc_hist_v1")
        self.retrans = RawMap(self.bpf["nodewire_obs_retrans_v1"], "nodewire_obs_retrans_v1")
        self.drops = RawMap(self.bpf["nodewire_obs_drops_v1"], "nodewire_obs_drops_v1")
        self._watched: dict[bytes, int] = {}
        self.cgroup_fd = None
        self._attach_type = BPFAttachType.CGROUP_SOCK_OPS
        self.fn = self.bpf.load_func("nw_sockops", BPF.SOCK_OPS)
        if cgroup is None:
            self.probes[SOCK_OPS] = "detached"
            return
        self.cgroup_fd = os.open(cgroup, os.O_RDONLY)
        try:
            self.bpf.attach_func(self.fn, self.cgroup_fd, self._attach_type)
        except Exception as e:
            self.probes[SOCK_OPS] = "missing"
            log.error("sock_ops attach failed, TCP telemetry is off cgroup=%s err=%s", cgroup, e)

    def set_watched(self, ips: list[str]) -> None:
        """Make the kernel's set of observed local addresses equal to ips: their watch entries and
        (zeroed) histograms are created, those of addresses no longer watched deleted, so a re-used
        IP starts from zero."""
        want = {addr16(ip): i for i, ip in enumerate(sorted(set(ips)))}
        gone = [k for k in self._watched if k not in want]
        new = [k for k in want if k not in self._watched]
        kdt = self.hist.key_dtype
        if gone:
            self.watch.delete(gone)
            gone_set = set(gone)
            self.hist.delete(pack_rows(kdt, [(a, m) for a in gone for m in self.metrics]))
            self.retrans.delete([k for k in self.retrans.dump() if k[:16] in gone_set])
        if new:
            self.hist.create_zeroed(pack_rows(kdt, [(a, m) for a in new for m in self.metrics]))
            self.watch.update([(k, np.array([want[k]], dtype=np.uint32).tobytes()) for k in new])
        self._watched = want

    def read_histograms(self) -> list[tuple[str, int, np.ndarray, int]]:
        """(local ip, metric, per-slot counts, sum) per histogram with at least one sample, summed
        over CPUs. (Every watched pod has its histograms created up front; the empty ones of idle
        pods are not worth a series.)"""
        keys, v = self.hist.read()
        slots, sums = v["slots"], v["sum"]
        return [(addr_str(k["address"]), int(k["metric"]), slots[i], int(sums[i]))
                for i, k in enumerate(keys) if slots[i].any()]

    def read_service_histograms(self) -> list[tuple[tuple[str, int], tuple[str, int], int, np.ndarray, int]]:
        """((vip, port), (backend ip, port), metric, per-slot counts, sum) per Service backend."""
        keys, v = self.svc_hist.read()
        return [((addr_str(k["vip"]), port_host(k["vport"])), (addr_str(k["backend"]), port_host(k["bport"])),
                 int(k["metric"]), v["slots"][i], int(v["sum"][i])) for i, k in enumerate(keys)]

    def forget_services(self, keep) -> None:
        """Delete the per-Service histograms whose (vip, port, backend, port) keep() rejects
        (a removed frontend or backend), at sync time: a scrape never changes kernel state."""
        keys, _ = self.svc_hist.read()
        gone = [k.tobytes() for k in keys
                if not keep((addr_str(k["vip"]), port_host(k["vport"])), (addr_str(k["backend"]), port_host(k["bport"])))]
        self.svc_hist.delete(gone)

    def read_retransmits(self) -> list[tuple[str, str, int]]:
        raw = self.retrans.dump()
        rows = unpack_rows(self.retrans.key_dtype, list(raw))
        vals = np.frombuffer(b"".join(raw.values()), dtype=np.uint64) if raw else []
        return [(addr_str(r["local"]), addr_str(r["remote"]), int(v)) for r, v in zip(rows, vals)]

    def read_drops(self) -> dict[int, int]:
        raw = self.drops.dump()
        return {int(np.frombuffer(k, dtype=np.uint32)[0]): int(np.frombuffer(v, dtype=np.uint64)[0])
                for k, v in raw.items()}

    def close(self) -> None:
        if self.cgroup_fd is not None:
            try:
                self.bpf.detach_func(self.fn, self.cgroup_fd, self._attach_type)
            except Exception as e:  # already replaced or the cgroup is gone
                log.info("sock_ops detach err=%s", e)
            os.close(self.cgroup_fd)
            self.cgroup_fd = None
        self.bpf.cleanup()


class PodTraffic:
    """bpf/pod_tc.c on the node-side veths, all in one network namespace (None = this one). Opt-in
    (--pod-tc): it adds per-segment packet counts of GSO frames, which interface counters count as
    one packet each; bytes are the same as the interface counters'."""

    def __init__(self, pin_dir: str, netns: str | None = None):
        from bcc import BPF

        self.bpf = compile_program("pod_tc.c", pin_dir)
        self.fn_tx = self.bpf.load_func("nw_pod_tx", BPF.SCHED_CLS)
        self.fn_rx = self.bpf.load_func("nw_pod_rx", BPF.SCHED_CLS)
        self.table = self.bpf["nodewire_pod_traffic_v1"]
        self.counts = PercpuMap(self.table, "nodewire_pod_traffic_v1")
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
        from pyroute2.netlink.exceptions import NetlinkError

        with self._lock:
            ipr = self._nl()
            links = ipr.link_lookup(ifname=ifname)
            if not links:
                raise LookupError(f"interface {ifname!r} not found in netns {self.netns or '(host)'}")
            idx = links[0]
            try:
                ipr.tc("add", "clsact", idx)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            for fn, parent in ((self.fn_tx, TC_INGRESS), (self.fn_rx, TC_EGRESS)):
                ipr.tc("replace-filter", "bpf", idx, ":1", fd=fn.fd, name=fn.name, parent=parent,
                       prio=TC_PRIO, classid=1, direct_action=True)
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
        for d in DIR_NAMES:
            key = self.table.Key(ifindex, d)
            try:
                del self.table[key]
            except KeyError:
                pass

    def read(self) -> dict[tuple[int, str], tuple[int, int]]:
        """(ifindex, direction) -> (packets, bytes)."""
        keys, v = self.counts.read()
        return {(int(k["ifindex"]), DIR_NAMES.get(int(k["direction"]), "?")): (int(v["packets"][i]), int(v["bytes"][i]))
                for i, k in enumerate(keys)}

    def close(self) -> None:
        for ifname in list(self.attached):
            self.detach(ifname)
        if self._ipr is not None:
            self._ipr.close()
        self.bpf.cleanup()
