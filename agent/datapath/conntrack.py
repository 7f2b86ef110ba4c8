"""North-south conntrack from user space: lifetimes, the SNAT address slots, and the collector that
removes expired entries (bpf/lib/ct.h keeps the state; this module only reads and deletes).

The datapath already treats an expired entry as absent; the collector frees the slot, so a
confirmed flow's LRU map never fills with the dead, and counts what is there (entries by state,
SNAT ports in use). It reads each map a chunk at a time (BPF_MAP_LOOKUP_BATCH) and deletes the
expired keys of each chunk in one BPF_MAP_DELETE_BATCH, as Cilium's CT GC walks its maps. Its
interval shortens as the maps fill and is never less than 100 times its own last run (≤ 1 % of a
core whatever the size). Its totals are added into the pinned stats map, so they survive restarts.
A key read as expired and rewritten by the datapath for a new flow before the chunk's delete lands
is deleted with it (as in Cilium's GC): that flow's next packet finds no entry and is balanced anew.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..instruments import COUNTER, GAUGE, register
from . import abi, bpfsys
from .maps import RawMap, addr16

log = logging.getLogger("nodewire.conntrack")
TCP = 6
COST_FACTOR = 100  # interval ≥ 100 × the last run: the collector's share of a core stays ≤ 1 %


@dataclass(frozen=True)
class Lifetimes:
    """Seconds an entry lives after it was last seen, by state (compiled into bpf/lib/ct.h, which
    writes each entry's expiry time when it refreshes it). Defaults are Cilium's
    (bpf/lib/conntrack.h: CT_SYN_TIMEOUT 60 s, CT_CONNECTION_LIFETIME_TCP 6 h, CT_CLOSE_TIMEOUT 10 s,
    CT_CONNECTION_LIFETIME_NONTCP 60 s); netfilter's are SYN_RECV 60 s, ESTABLISHED 5 days, CLOSE
    10 s / TIME_WAIT 120 s (nf_conntrack_proto_tcp.c) and UDP 30 s / 120 s once replied
    (nf_conntrack_proto_udp.c)."""
    syn: float = 60.0            # TCP: SYN seen, handshake not complete
    established: float = 21600.0  # TCP: confirmed both ways
    close: float = 10.0          # TCP: FIN or RST seen
    other: float = 60.0          # UDP, either state

    def __post_init__(self):
        for name in ("syn", "established", "close", "other"):
            v = getattr(self, name)
            if not 0 < v <= 30 * 86400:
                raise ValueError(f"conntrack lifetime {name}: {v} s out of range (0, {30 * 86400}]")


def set_snat_addresses(snat: RawMap, addresses: list[str]) -> dict[str, str]:
    """Fill each family's SNAT_ADDRS slots with the node's addresses of it, repeated in turn so every
    slot holds one (lib/ct.h tries the first slot's, then spreads over all); zero: none of the family.
    Returns the first of each family (the one every flow tries first)."""
    chosen = {}
    for fam, base in ((4, 0), (6, abi.SNAT_ADDRS)):
        mine = [a for a in addresses if (":" in a) == (fam == 6)][:abi.SNAT_ADDRS]
        if mine:
            chosen[f"ipv{fam}"] = mine[0]
        for i in range(abi.SNAT_ADDRS):
            value = addr16(mine[i % len(mine)]) if mine else bytes(16)
            bpfsys.update_elem(snat.fd, (base + i).to_bytes(4, "little"), value, snat.name)
    return chosen


def remove_obsolete_pins(pin_dir: str) -> list[str]:
    """Unpin the maps an older agent pinned whose layout v2 replaced (their memory is the kernel's
    until unpinned; no program of this version uses them). Returns the names removed."""
    gone = []
    for name in abi.NP_OBSOLETE_MAPS:
        path = os.path.join(pin_dir, name)
        if os.path.exists(path):
            os.unlink(path)
            gone.append(name)
    if gone:
        log.info("removed obsolete conntrack pins maps=%s", gone)
    return gone


@dataclass
class Census:
    """What one pass over a map found."""
    entries: int = 0
    states: dict[str, int] = field(default_factory=lambda: {n: 0 for n in abi.CT_STATES.values()})
    expired: int = 0
    removed: int = 0
    snat_ports: int = 0  # live reverse entries holding a SNAT port

    def add(self, other: "Census") -> None:
        self.entries += other.entries
        self.expired += other.expired
        self.removed += other.removed
        self.snat_ports += other.snat_ports
        for k, v in other.states.items():
            self.states[k] += v


class ConntrackMaps:
    """The two conntrack maps, their counters, and one pass over them."""

    def __init__(self, confirmed: RawMap, halfopen: RawMap, stats: RawMap, lifetimes: Lifetimes):
        self.confirmed, self.halfopen, self.stats, self.lifetimes = confirmed, halfopen, stats, lifetimes

    def maps(self) -> dict[str, RawMap]:
        return {"confirmed": self.confirmed, "halfopen": self.halfopen}

    def scan(self, m: RawMap, remove: bool, now_ns: int | None = None, chunk: int = 16384) -> Census:
        """Count one map's entries; with remove, delete the expired ones chunk by chunk."""
        now = np.int64(time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns)
        c = Census()
        for kraw, vraw in bpfsys.lookup_batches(m.fd, m.key_size, m.value_size, m.name, chunk):
            keys = np.frombuffer(kraw, dtype=m.key_dtype)
            values = np.frombuffer(vraw, dtype=m.value_dtype)
            state = values["state"]
            expired = values["expires"].astype(np.int64) < now
            live = ~expired
            c.entries += len(keys)
            c.expired += int(expired.sum())
            for num, name in abi.CT_STATES.items():
                c.states[name] += int(((state == num) & live).sum())
            c.snat_ports += int(((keys["dir"] == abi.CT_REVERSE) & ((values["flags"] & abi.CT_F_SNAT) != 0)
                                 & live).sum())
            if remove and expired.any():
                m.delete_array(np.ascontiguousarray(keys[expired]))
                c.removed += int(expired.sum())
        return c

    def counters(self) -> dict[str, int]:
        """The datapath's and the collector's totals (NW_CT_STAT_*), summed over CPUs."""
        keys, values = self.stats.dump_summed()
        by_index = dict(zip(keys.tolist(), values.tolist()))
        return {name: int(by_index.get(i, 0)) for i, name in enumerate(abi.CT_STATS)}

    def add_counters(self, deltas: dict[str, int]) -> None:
        """Add the collector's totals into CPU 0's slots (the datapath never writes these indices)."""
        idx = np.array([abi.CT_STATS.index(n) for n in deltas], dtype=np.uint32)
        keys, values = self.stats.dump_arrays()
        cur = {int(k): values[i] for i, k in enumerate(keys.tolist())}
        new = np.array([cur[int(i)] for i in idx], dtype=np.uint64).reshape(len(idx), self.stats.ncpu)
        new[:, 0] += np.array(list(deltas.values()), dtype=np.uint64)
        self.stats.update_arrays(idx, new)


class ConntrackCollector:
    """Removes expired entries on its own thread; start / close / status / register_metrics."""

    def __init__(self, maps: ConntrackMaps, max_interval: float = 30.0, min_interval: float = 1.0):
        self.maps = maps
        self.max_interval, self.min_interval = max_interval, min(min_interval, max_interval)
        self.census: dict[str, Census] = {}
        self.last_seconds = 0.0  # wall
        self.last_cpu = 0.0      # the collector thread's CPU time
        self.last_time = 0.0
        self.interval = max_interval
        self.runs = 0  # by this process (the totals in counters() include earlier agents')
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> "ConntrackCollector":
        self._thread = threading.Thread(target=self._loop, name="conntrack-collector", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def next_interval(self, fill: float, last_cpu: float) -> float:
        """Shorter as the fuller map fills (an LRU map at capacity evicts; expired entries should go
        first), never below COST_FACTOR × the CPU time of the last run (its thread's)."""
        by_fill = self.max_interval * (1.0 - min(max(fill, 0.0), 1.0))
        return max(min(self.max_interval, max(self.min_interval, by_fill)), COST_FACTOR * last_cpu)

    def run_once(self, now_ns: int | None = None) -> dict[str, Census]:
        t0, c0 = time.perf_counter(), time.thread_time()
        census = {name: self.maps.scan(m, remove=True, now_ns=now_ns) for name, m in self.maps.maps().items()}
        seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
        self.maps.add_counters({"collections": 1, "collected_halfopen": census["halfopen"].removed,
                                "collected": census["confirmed"].removed, "collect_ns": int(seconds * 1e9)})
        fill = max(c.entries / m.capacity for c, m in zip(census.values(), self.maps.maps().values()))
        with self._lock:
            self.census, self.last_seconds, self.last_cpu, self.last_time = census, seconds, cpu, time.time()
            self.runs += 1
            self.interval = self.next_interval(fill, cpu)
        removed = sum(c.removed for c in census.values())
        if removed:
            log.debug("conntrack collected removed=%d seconds=%.4f next=%.1fs", removed, seconds, self.interval)
        return census

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except OSError as e:  # the maps are the datapath's; a failed pass is retried next time
                log.error("conntrack collection failed err=%s", e)
            self._stop.wait(self.interval)

    def status(self) -> dict:
        with self._lock:
            census, last_seconds, last_cpu, last_time, interval, runs = (
                self.census, self.last_seconds, self.last_cpu, self.last_time, self.interval, self.runs)
        counters = self.maps.counters()
        entries = {name: c.entries - c.removed for name, c in census.items()}
        states = {n: sum(c.states[n] for c in census.values()) for n in abi.CT_STATES.values()}
        return {
            "entries": entries,
            "capacity": {name: m.capacity for name, m in self.maps.maps().items()},
            "states": states,
            "snat_ports_in_use": sum(c.snat_ports for c in census.values()),
            "counters": counters,
            "halfopen_evicted": halfopen_evicted(counters, entries.get("halfopen", 0)),
            "lifetimes": {k: getattr(self.maps.lifetimes, k) for k in ("syn", "established", "close", "other")},
            "collector": {"runs": runs, "last_seconds": round(last_seconds, 6), "last_cpu_seconds": round(last_cpu, 6),
                          "last_time": last_time, "interval": round(interval, 3)},
        }

    def register_metrics(self, meter) -> None:
        """nodewire.conntrack.* (names listed in /work/team/ns-ct-metrics.txt for the dashboard)."""
        register_conntrack_metrics(meter, self)


def halfopen_evicted(counters: dict[str, int], present: int) -> int:
    """Half-open entries the LRU pushed out: every entry inserted is deleted by the datapath
    (promotion, replacement), removed by the collector, still there, or evicted."""
    gone = counters["halfopen_deleted"] + counters["collected_halfopen"] + present
    return max(0, counters["halfopen_inserted"] - gone)


# Collector and datapath counters exported as they are: metric name → (status key, description).
COUNTERS = {
    "nodewire.conntrack.collections": ("collections", "Collector passes over the conntrack maps"),
    "nodewire.conntrack.collected": ("collected", "Expired confirmed entries the collector removed"),
    "nodewire.conntrack.halfopen.collected": ("collected_halfopen", "Expired half-open entries removed"),
    "nodewire.conntrack.halfopen.inserted": ("halfopen_inserted", "Entries of new flows (half-open)"),
    "nodewire.conntrack.promoted": ("promoted", "Flows confirmed both ways (moved out of half-open)"),
    "nodewire.conntrack.snat.exhausted": ("snat_exhausted", "New flows dropped: no SNAT port free"),
    "nodewire.conntrack.snat.reused": ("snat_reused", "SNAT ports taken back from expired or idle half-open flows"),
}


def register_conntrack_metrics(meter, collector: ConntrackCollector) -> None:
    from opentelemetry.metrics import Observation

    cache: list = [0.0, None]

    def current() -> dict:  # one read of the maps' counters per scrape, not one per instrument
        if cache[1] is None or time.monotonic() - cache[0] > 1.0:
            cache[:] = [time.monotonic(), collector.status()]
        return cache[1]

    def from_status(fn):
        return lambda _o: fn(current())

    def labelled(field: str, label: str):
        return from_status(lambda st: [Observation(n, {label: k}) for k, n in st[field].items()])

    def count(key: str):
        return from_status(lambda st: [Observation(st["counters"][key])])

    register(meter, [
        (GAUGE, "nodewire.conntrack.entries", "1", "North-south conntrack entries by map and state",
         labelled("entries", "map")),
        (GAUGE, "nodewire.conntrack.states", "1", "Live north-south conntrack entries by TCP state",
         labelled("states", "state")),
        (GAUGE, "nodewire.conntrack.capacity", "1", "Capacity of each conntrack map", labelled("capacity", "map")),
        *((COUNTER, name, "1", desc, count(key)) for name, (key, desc) in COUNTERS.items()),
        (COUNTER, "nodewire.conntrack.halfopen.evicted", "1", "Half-open entries pushed out by new ones",
         from_status(lambda st: [Observation(st["halfopen_evicted"])])),
        (COUNTER, "nodewire.conntrack.collection.time", "s", "Time spent collecting, in total",
         from_status(lambda st: [Observation(st["counters"]["collect_ns"] / 1e9)])),
        (GAUGE, "nodewire.conntrack.collection.last_duration", "s", "Duration of the last collection",
         from_status(lambda st: [Observation(st["collector"]["last_seconds"])])),
        (GAUGE, "nodewire.conntrack.snat.ports_in_use", "1", "SNAT ports held by live flows",
         from_status(lambda st: [Observation(st["snat_ports_in_use"])])),
    ])
