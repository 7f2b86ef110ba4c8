"""The only writer of the service maps: desired frontends → plan → batched writes → registry.

Three parts (after Cilium's BPFOps/LBMaps): the id registry (ids.py: service and backend ids,
refcounts, restored from the pinned maps), the pure planner (plan.py: clashes, capacity, slot diff)
and the writer (writer.py: the plan's phases in the order of bpf/lib/lb.h). This module composes them
and keeps the agent's call: `Reconciler(services_map, backends_map).apply(changes, full)`.

Running it twice with the same input writes nothing; a restarted agent rewrites nothing that is
right. Refused Services are logged as one summary line per kind, never one line per Service.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..model.frontends import Frontend
from ..model.objects import ObjectKey
from .ids import IdRegistry, Snapshot
from .plan import CLASH, Capacities, Limit, Refusal, WritePlan, plan, summarize
from .smallplan import plan_small
from .writer import BatchMap, write

log = logging.getLogger("nodewire.reconciler")
# Services per plan in a large full sync: bounds its transient memory; at least 1/8 of the sync, as
# every part costs a pass over the registry's arrays
FULL_SYNC_CHUNK = 20_000


@dataclass
class SyncResult:
    services: int = 0
    written: int = 0
    deleted: int = 0
    refusals: list[Refusal] = field(default_factory=list)
    write_error: str | None = None
    seconds: float = 0.0
    plan_seconds: float = 0.0   # of which: planning (pure Python/numpy)
    write_seconds: float = 0.0  # … and the batch syscalls (with packing the rows)

    @property
    def errors(self) -> "Messages":
        """One message per refused Service (and the write error, if any), formatted when read: a
        caller keeping the last 200 of 475k formats 200."""
        return Messages(self.refusals + ([self.write_error] if self.write_error else []))

    def add(self, other: "SyncResult") -> None:
        """Fold the result of one part of a sync into this one."""
        self.written += other.written
        self.deleted += other.deleted
        self.refusals += other.refusals
        self.write_error = self.write_error or other.write_error
        self.plan_seconds += other.plan_seconds
        self.write_seconds += other.write_seconds

    def summary(self) -> list[str]:
        """The refusals as one line per kind (count and first names), then the write error."""
        out = summarize(self.refusals)
        return out + [self.write_error] if self.write_error else out


class Messages(Sequence):
    """Refusals (and strings) read as their messages, each formatted on access."""

    def __init__(self, items: list):
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [str(r) for r in self._items[i]]
        return str(self._items[i])

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, tuple, Sequence)) else NotImplemented

    def __repr__(self) -> str:
        return repr(self[:3]) + (f" (+{len(self) - 3})" if len(self) > 3 else "")


@dataclass
class LBMaps:
    """A service map and its backend map (lb.h's layout), found by name by the writer."""
    services: BatchMap
    backends: BatchMap

    def __getitem__(self, name: str) -> BatchMap:
        return self.services if name == self.services.name else self.backends

    def by_name(self) -> dict[str, BatchMap]:
        return {self.services.name: self.services, self.backends.name: self.backends}


class Reconciler:
    """One pair of service and backend maps (the socket path's, or nodeport.c's) and their registry."""

    def __init__(self, services: BatchMap, backends: BatchMap):
        self.services, self.backends = services, backends
        self.maps = LBMaps(services, backends)
        self.registry = self._restore()
        self._retry: dict[ObjectKey, list[Frontend]] = {}  # desired state of a write that failed

    def _restore(self) -> IdRegistry:
        return IdRegistry.restore(self.services.dump_arrays(), self.backends.dump_arrays())

    @property
    def capacities(self) -> Capacities:
        s, b = self.services, self.backends
        return Capacities(Limit(s.name, s.capacity), Limit(b.name, b.capacity))

    def apply(self, changes: dict[ObjectKey, list[Frontend]], full: bool = False) -> SyncResult:
        """Make the maps match `changes` (Service → its frontends; [] removes it). With full=True,
        `changes` is the whole desired state and every entry not in it is removed."""
        t0 = time.perf_counter()
        changes = self.with_retry(changes)
        if full and len(changes) > FULL_SYNC_CHUNK:
            res = self.apply_in_chunks(changes)
        else:
            res = self._apply(changes, full=full)
        res.seconds = time.perf_counter() - t0
        for line in res.summary():
            log.error("%s", line)
        return res

    def with_retry(self, changes):
        """changes, plus the Services of an earlier write that failed (the changes win)."""
        return {**self._retry, **changes} if self._retry else changes

    def plan(self, changes, full: bool = False, sweep: bool | None = None) -> WritePlan:
        """The plan of `changes`: a small incremental one row by row (smallplan.py), else by vector steps."""
        if not full and not sweep:
            small = plan_small(changes, self.registry, self.capacities)
            if small is not None:
                return small
        return plan(changes, self.registry, self.capacities, full=full, sweep=sweep)

    def committed(self, p: WritePlan, changes) -> None:
        """The plan is in the maps: record it."""
        self.registry.commit(p)
        if self._retry:
            for svc in (changes if isinstance(changes, dict) else dict(changes)):
                self._retry.pop(svc, None)

    def failed(self, changes, retry: bool = True) -> None:
        """A write failed part-way: the kernel holds part of the plan; learn it back (and retry these
        changes next time, unless the caller keeps them itself)."""
        fresh = self._restore()
        fresh.adopt_owners(self.registry)
        self.registry = fresh
        if retry:
            self._retry.update(changes)  # a dict or (Service, frontends) pairs

    def _apply(self, changes: dict[ObjectKey, list[Frontend]], full: bool = False,
               sweep: bool | None = None) -> SyncResult:
        t0 = time.perf_counter()
        p = self.plan(changes, full=full, sweep=sweep)
        res = SyncResult(services=len(changes), refusals=p.refusals, plan_seconds=time.perf_counter() - t0)
        try:
            write(p.phases(), self.maps)
        except Exception as e:
            res.write_error = f"writing the service maps failed ({e}); re-read them, retrying those Services"
            self.failed(changes)
        else:
            self.committed(p, changes)
            res.written, res.deleted = p.written_count, p.deleted_count
        res.write_seconds = time.perf_counter() - t0 - res.plan_seconds  # with the registry commit
        return res

    def apply_in_chunks(self, changes: dict[ObjectKey, list[Frontend]]) -> SyncResult:
        """A large full sync as a row of smaller ones, so its transient arrays stay small: removals
        first (they make room), then the Services FULL_SYNC_CHUNK at a time, then once more those
        refused for a clash with a Service of a later chunk (which may have moved), then the sweep."""
        gone = [s for s in self.registry.owned_services() if s not in changes]
        items = [(s, []) for s in gone] + list(changes.items())
        total = SyncResult(services=len(changes))
        step = max(FULL_SYNC_CHUNK, len(items) // 8)
        for lo in range(0, len(items), step):
            total.add(self._apply(items[lo:lo + step]))  # pairs: no dict to hash them into
        clashed = {r.service: changes[r.service] for r in total.refusals if r.kind == CLASH}
        if clashed:
            total.refusals = [r for r in total.refusals if r.kind != CLASH]
            total.add(self._apply(clashed))
        total.add(self._apply({}, sweep=True))
        return total

    # -- views (for the agent's gauges and status) ------------------------------------------------
    @property
    def svc_entries(self) -> int:
        return self.registry.svc_entries

    @property
    def backend_entries(self) -> int:
        return self.registry.backends.count

    @property
    def owned(self):
        """The Services that have frontends in the maps (a live view: len() is O(1); iterate it only
        on the agent thread, or take snapshot())."""
        return self.registry.service_index.keys()

    def snapshot(self) -> Snapshot:
        return self.registry.snapshot()

    def service_names(self, snap: Snapshot | None = None) -> dict[int, dict]:
        """service_id → which Service and port it stands for (the kernel holds only ids)."""
        snap = snap or self.snapshot()
        out = {}
        for sid in snap.service_ids():
            info = snap.frontend(sid)
            out[sid] = {"service": str(info.service), "port_name": info.port_name, "frontend": info.frontend}
        return out
