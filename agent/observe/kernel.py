"""The kernel side of observability: compile, probe, attach and read bpf/tcp_latency.c and bpf/pod_tc.c.

Tracepoints are probed before compiling; a missing one is compiled out (-DNW_WITHOUT_…), logged,
and reported in `probes` (exported as nodewire.observer.probe.status) — never a crash. tc programs go
on the node side of each pod's veth, in whatever network namespace holds those veths (the host on a
real node, the sandbox's node namespace in tests). Maps are read with BPF_MAP_LOOKUP_BATCH; per-CPU
maps are summed over CPUs here.
"""
from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import threading

import numpy as np

from ..datapath.loader import compile_program
from ..datapath.maps import (MapFull, RawMap, addr16, addr_str, lookup_batch_raw, pack_rows, packing_dtype,
                             unpack_rows)
from .histogram import HIST_SLOTS

log = logging.getLogger("nodewire.observe")

TRACEPOINTS = {  # tracepoint -> the macro that compiles its probe out
    "sock:inet_sock_set_state": "NW_WITHOUT_INET_SOCK_SET_STATE",
    "tcp:tcp_probe": "NW_WITHOUT_TCP_PROBE",
    "tcp:tcp_retransmit_skb": "NW_WITHOUT_TCP_RETRANSMIT_SKB",
    "skb:kfree_skb": "NW_WITHOUT_KFREE_SKB",
}
HIST_CONNECT, HIST_SRTT = 0, 1          # hist_key.metric in bpf/tcp_latency.c
DIR_NAMES = {0: "transmit", 1: "receive"}  # pod_traffic_key.direction in bpf/pod_tc.c
TC_PRIO = 0xc0de & 0x7fff               # our filters' priority, so we delete only our own
TC_INGRESS, TC_EGRESS = "ffff:fff2", "ffff:fff3"


def dump_percpu(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys as the key dtype, values summed over CPUs as uint64 [n, words]) of a per-CPU hash."""
    from bcc.utils import get_possible_cpus

    ncpu = len(get_possible_cpus())
    leaf = getattr(table, "sLeaf", table.Leaf)
    elem = (ct.sizeof(leaf) + 7) // 8 * 8  # the kernel rounds each CPU's value up to 8 bytes
    ksize = ct.sizeof(table.Key)
    kraw, vraw = lookup_batch_raw(table.map_fd, ksize, elem * ncpu, name, chunk=4096)
    kdt = packing_dtype(table.Key)
    n = len(kraw) // ksize
    k = np.frombuffer(kraw, dtype=kdt) if n else np.zeros(0, dtype=kdt)
    v = np.frombuffer(vraw, dtype=np.uint64).reshape(n, ncpu, elem // 8).sum(axis=1) if n else \
        np.zeros((0, elem // 8), dtype=np.uint64)
    return k, v


def update_percpu_zeroed(table, keys: list[bytes], name: str) -> None:
    """Create per-CPU entries with an all-zero value on every CPU (BPF_MAP_UPDATE_BATCH)."""
    from bcc.libbcc import lib
    from bcc.utils import get_possible_cpus

    if not keys:
        return
    leaf = getattr(table, "sLeaf", table.Leaf)
    size = (ct.sizeof(leaf) + 7) // 8 * 8 * len(get_possible_cpus())
    count = ct.c_uint32(len(keys))
    if lib.bpf_update_batch(table.map_fd, b"".join(keys), bytes(size * len(keys)), ct.byref(count)) != 0:
        err = ct.get_errno()
        if err in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
            raise MapFull(f"{name}: full ({table.max_entries} entries)")
        raise OSError(err, f"{name}: BPF_MAP_UPDATE_BATCH: {os.strerror(err)}")


class TcpObserver:
    """bpf/tcp_latency.c: connect latency and srtt histograms, retransmits, drops."""

    def __init__(self, pin_dir: str):
        from bcc import BPF

        self.probes: dict[str, str] = {}
        missing = []
        for tp, macro in TRACEPOINTS.items():
            cat, event = tp.split(":")
            if BPF.tracepoint_exists(cat, event):
                self.probes[tp] = "attached"
            else:
                self.probes[tp] = "missing"
                missing.append(f"-D{macro}")
                log.warning("tracepoint missing, its metrics are off tracepoint=%s", tp)
        self.bpf = compile_program("tcp_latency.c", pin_dir, extra_cflags=missing)
        self.watch = RawMap.from_bcc(self.bpf["nodewire_obs_watch_v1"], "nodewire_obs_watch_v1")
        self.hist_table = self.bpf["nodewire_obs_hist_v1"]  # per-CPU: read with dump_percpu
        self.hist = RawMap.from_bcc(self.hist_table, "nodewire_obs_hist_v1")
        self.retrans = RawMap.from_bcc(self.bpf["nodewire_obs_retrans_v1"], "nodewire_obs_retrans_v1")
        self.drops = RawMap.from_bcc(self.bpf["nodewire_obs_drops_v1"], "nodewire_obs_drops_v1")
        self._watched: dict[bytes, int] = {}

    def set_watched(self, ips: list[str]) -> None:
        """Make the kernel's set of observed local addresses equal to ips: their watch entries and
        (zeroed) histograms are created, those of addresses no longer watched deleted, so a re-used
        IP starts from zero."""
        want = {addr16(ip): i for i, ip in enumerate(sorted(set(ips)))}
        gone = [k for k in self._watched if k not in want]
        new = [k for k in want if k not in self._watched]
        hist = self.hist
        kdt = hist.key_dtype
        if gone:
            self.watch.delete(gone)
            gone_set = set(gone)
            hist.delete([pack_rows(kdt, [(a, m)])[0] for a in gone for m in (HIST_CONNECT, HIST_SRTT)])
            self.retrans.delete([k for k in self.retrans.dump() if k[:16] in gone_set])
        if new:
            keys = pack_rows(kdt, [(a, m) for a in new for m in (HIST_CONNECT, HIST_SRTT)])
            update_percpu_zeroed(self.hist_table, keys, "nodewire_obs_hist_v1")
            self.watch.update([(k, np.array([want[k]], dtype=np.uint32).tobytes()) for k in new])
        self._watched = want

    def read_histograms(self) -> list[tuple[str, int, np.ndarray, int]]:
        """(local ip, metric, per-slot counts, sum) per histogram with at least one sample, summed
        over CPUs. (Every watched pod has its histograms created up front; the empty ones of idle
        pods are not worth a series.)"""
        keys, vals = dump_percpu(self.hist_table, "nodewire_obs_hist_v1")
        used = vals[:, :HIST_SLOTS].any(axis=1) if len(vals) else []
        return [(addr_str(k["address"]), int(k["metric"]), v[:HIST_SLOTS], int(v[HIST_SLOTS]))
                for k, v, u in zip(keys, vals, used) if u]

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
        self.bpf.cleanup()


class PodTraffic:
    """bpf/pod_tc.c on the node-side veths, all in one network namespace (None = this one)."""

    def __init__(self, pin_dir: str, netns: str | None = None):
        from bcc import BPF

        self.bpf = compile_program("pod_tc.c", pin_dir)
        self.fn_tx = self.bpf.load_func("nw_pod_tx", BPF.SCHED_CLS)
        self.fn_rx = self.bpf.load_func("nw_pod_rx", BPF.SCHED_CLS)
        self.table = self.bpf["nodewire_pod_traffic_v1"]
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

    def routed_veth(self, ip: str) -> str | None:
        """The veth a routed CNI (Calico, Cilium, the ptp plugin) sends this pod address to: the
        output device of the node's route to it, when that device is a veth. None for bridged
        pods (the route goes to the bridge) and unknown addresses."""
        from pyroute2.netlink.exceptions import NetlinkError

        with self._lock:
            ipr = self._nl()
            try:
                routes = ipr.route("get", dst=ip)
            except NetlinkError:
                return None
            oif = routes[0].get_attr("RTA_OIF") if routes else None
            if not oif:
                return None
            links = ipr.get_links(oif)
            if not links:
                return None
            info = links[0].get_attr("IFLA_LINKINFO")
            if info is None or info.get_attr("IFLA_INFO_KIND") != "veth":
                return None
            return links[0].get_attr("IFLA_IFNAME")

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
        keys, vals = dump_percpu(self.table, "nodewire_pod_traffic_v1")
        return {(int(k["ifindex"]), DIR_NAMES.get(int(k["direction"]), "?")): (int(v[0]), int(v[1]))
                for k, v in zip(keys, vals)}

    def close(self) -> None:
        for ifname in list(self.attached):
            self.detach(ifname)
        if self._ipr is not None:
            self._ipr.close()
        self.bpf.cleanup()
