"""The planner: desired frontends + the id registry → a WritePlan. Pure: no I/O, no root, no logging.

It holds the three decisions of a sync (after Cilium's BPFOps):
  - clashes: two Services claiming one frontend; the later claimant is refused, naming both;
  - capacity: a Service whose new entries would not fit a map (counted before any delete, because
    deletes run after writes) is refused whole, its old entries kept; nothing is truncated;
  - the slot diff: only entries that differ from what the kernel holds are written.
Refusals are data (kind, Service, map), so a caller can log one summary line for thousands of them.

Work is columnar: the desired frontends are flattened into numpy arrays of 20-byte identities once,
ids are resolved by vector lookups in the registry, and the common case (no clash, everything fits)
admits every Service in one vector step; only contested or overflowing Services are looked at one
by one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..model.frontends import Frontend
from ..model.objects import ObjectKey
from . import abi
from .codec import KEY
from .desired import Desired, flatten, run_starts, unique_keys
from .ids import IdRegistry
from .keyindex import INVALID, NO_SLOT, SLOT_DTYPE

MAX_BACKENDS_PER_FRONTEND = 65535  # the slot-0 count is a __u16

CLASH, MAP_FULL, TOO_MANY_BACKENDS = "clash", "map-full", "too-many-backends"


@dataclass(frozen=True)
class Limit:
    name: str
    capacity: int


@dataclass(frozen=True)
class Capacities:
    services: Limit
    backends: Limit


class Refusal(NamedTuple):
    """A Service not applied (its old entries stay). kind: CLASH (other: the holder), MAP_FULL
    (limit: the map), TOO_MANY_BACKENDS."""
    kind: str
    service: ObjectKey
    other: ObjectKey | None = None
    limit: Limit | None = None

    def __str__(self) -> str:
        if self.kind == CLASH:
            return f"Service {self.service}: frontend already served by Service {self.other}; not applied"
        if self.kind == MAP_FULL:
            return (f"Service {self.service}: map {self.limit.name} is full ({self.limit.capacity} entries); "
                    "Service not applied")
        return (f"Service {self.service}: a port has more than {MAX_BACKENDS_PER_FRONTEND} endpoints; "
                "Service not applied")


def summarize(refusals: list[Refusal], first: int = 3) -> list[str]:
    """One line per kind of refusal (and map): the count and the first few Services."""
    groups: dict[tuple, list[Refusal]] = {}
    for r in refusals:
        groups.setdefault((r.kind, r.limit), []).append(r)
    lines = []
    for (kind, limit), rs in groups.items():
        names = ", ".join(str(r.service) for r in rs[:first]) + (", …" if len(rs) > first else "")
        what = {CLASH: "frontend already served by another Service",
                MAP_FULL: f"map {limit.name if limit else ''} full ({limit.capacity if limit else 0} entries)",
                TOO_MANY_BACKENDS: f"more than {MAX_BACKENDS_PER_FRONTEND} endpoints on a port"}[kind]
        lines.append(f"{len(rs)} Service{'s' if len(rs) != 1 else ''} not applied: {what}: {names}"
                     + (f" (first: {rs[0]})" if kind == CLASH else ""))
    return lines


# -- the plan ------------------------------------------------------------------------------------
@dataclass
class Phase:
    """One batch of map operations. rows: the planner's columns, turned into map rows by the writer
    through the codec according to `kind` (writer.encode)."""
    name: str
    map: str   # the map's name (abi.*_MAP)
    op: str    # "update" | "delete" | "tables" (Maglev: inner arrays swapped in)
    rows: dict
    kind: str = "raw"  # backend | slot | header | frontend | backend-id | raw (rows["keys"], rows["values"])

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))


@dataclass
class FrontendWrite:
    """The registry's new record of frontends written (header and slots as now in the kernel)."""
    sids: np.ndarray
    count: np.ndarray
    flags: np.ndarray
    affinity: np.ndarray
    slots: list[bytes]


@dataclass
class WritePlan:
    """What one sync writes, in order, and how the registry changes once it is written.

    The order (bpf/lib/lb.h): new backends → slots → headers; removed headers → removed slots →
    backends no slot refers to. A reader following header → slot → backend never finds a gap."""
    new_backends: dict       # id, ident
    slot_writes: dict        # ident (frontend), slot, backend_id
    header_writes: dict      # ident, count, flags, service_id, affinity
    header_deletes: dict     # ident
    slot_deletes: dict       # ident, slot
    backend_deletes: dict    # id
    refusals: list[Refusal] = field(default_factory=list)
    # registry changes, committed only after the writes succeeded
    new_frontends: tuple = (np.zeros(0, np.uint32), np.zeros(0, KEY))
    written: FrontendWrite | None = None
    owners: "Owners | None" = None  # which Service owns each applied frontend
    removed_frontends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    refs_gained: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    refs_lost: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    entry_delta: int = 0     # change in the number of service-map entries
    services: int = 0
    maps: tuple[str, str] = (abi.SERVICES_MAP, abi.BACKENDS_MAP)  # (service map, backend map) it writes

    def phases(self) -> list[Phase]:
        svc, be = self.maps
        return [
            Phase("new backends", be, "update", self.new_backends, "backend"),
            Phase("slots", svc, "update", self.slot_writes, "slot"),
            Phase("headers", svc, "update", self.header_writes, "header"),
            Phase("removed headers", svc, "delete", self.header_deletes, "frontend"),
            Phase("removed slots", svc, "delete", self.slot_deletes, "frontend"),
            Phase("unreferenced backends", be, "delete", self.backend_deletes, "backend-id"),
        ]

    @property
    def written_count(self) -> int:  # the "update" phases' rows (phases() would build six Phase records)
        return len(self.new_backends["id"]) + len(self.slot_writes["slot"]) + len(self.header_writes["count"])

    @property
    def deleted_count(self) -> int:
        return len(self.header_deletes["ident"]) + len(self.slot_deletes["slot"]) + len(self.backend_deletes["id"])



# -- admission: clashes, capacity --------------------------------------------------------------
def _svc_of_fe(d: Desired) -> np.ndarray:
    return np.repeat(np.arange(len(d.services)), np.diff(d.fe_start))


def _clashes(d: Desired, fe_sid: np.ndarray, reg: IdRegistry, refused: np.ndarray) -> list[Refusal]:
    """Refuse Services claiming a frontend another Service holds. The holder keeps it: a Service
    outside this batch, or a refused one (its old entries stay); among claimants in the batch,
    the current owner, then the first listed."""
    fe_svc = _svc_of_fe(d)
    owner = np.where(fe_sid > 0, reg.frontends.owner[fe_sid], -1)
    my_idx = d.svc_idx
    foreign = (owner >= 0) & (owner != my_idx[fe_svc])
    first, inverse = unique_keys(d.fe_keys) if len(d.fe_keys) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if not foreign.any() and len(first) == len(d.fe_keys):
        return []
    out: list[Refusal] = []
    in_batch = {idx: s for s, idx in enumerate(my_idx.tolist()) if idx >= 0}
    while True:  # refusing a Service keeps its old frontends, which may refuse another: repeat
        holder: dict[int, int] = {}  # distinct desired key → batch Service holding it
        stuck: dict[int, ObjectKey] = {}  # … held by a Service outside the batch or refused
        for f in np.nonzero(foreign)[0].tolist():
            o = int(owner[f])
            s = in_batch.get(o)
            if s is None or refused[s]:
                stuck[int(inverse[f])] = reg.services[o]
        for f in range(len(d.fe_keys)):
            s = fe_svc[f]
            if refused[s]:
                continue
            k = int(inverse[f])
            if k in stuck:
                continue
            o = int(owner[f])
            prefer_owner = o >= 0 and in_batch.get(o) is not None and not refused[in_batch[o]]
            if k not in holder or (prefer_owner and in_batch[o] == s):
                holder[k] = s
        new = []
        for f in range(len(d.fe_keys)):
            s = int(fe_svc[f])
            if refused[s]:
                continue
            k = int(inverse[f])
            other = stuck.get(k)
            if other is None and holder.get(k, s) != s:
                other = d.services[holder[k]]
            if other is not None:
                refused[s] = True
                new.append(Refusal(CLASH, d.services[s], other=other))
        if not new:
            return out
        out.extend(new)


def _capacity(d: Desired, fe_sid: np.ndarray, fresh: "_Fresh", reg: IdRegistry, caps: Capacities,
              refused: np.ndarray) -> list[Refusal]:
    """Refuse Services whose new entries would not fit (first come, first served)."""
    fe = reg.frontends
    # new service-map keys per frontend: a header where none is, slots beyond what the kernel holds
    old_m = np.fromiter(map(len, map(fe.slots.__getitem__, fe_sid.tolist())), np.int64, len(fe_sid)) // 4
    known = fe_sid > 0
    grow = np.where(known, np.maximum(0, d.fe_count.astype(np.int64) - old_m) + ~fe.has_header[fe_sid], 1 + d.fe_count)
    svc_grow = np.diff(run_starts(grow)[d.fe_start])
    fresh_idx, first, inverse = fresh.rows, fresh.first, fresh.inverse
    room = caps.services.capacity - reg.svc_entries
    be_room = caps.backends.capacity - reg.backends.count
    ok = ~refused
    be_svc = np.repeat(_svc_of_fe(d), np.diff(d.be_start))[fresh_idx] if len(fresh_idx) else np.zeros(0, np.int64)
    # fresh backends a Service brings, each counted for the first admissible Service using it
    rows_ok = ok[be_svc]
    _, first_ok = np.unique(inverse[rows_ok], return_index=True)
    brings = np.bincount(be_svc[rows_ok][first_ok], minlength=len(d.services))
    g, b = np.where(ok, svc_grow, 0), np.where(ok, brings, 0)
    over = (np.cumsum(g) > room) | (np.cumsum(b) > be_room)
    if not over.any():
        return []
    # Services before the first that does not fit all go in; from there, one by one
    k = int(np.argmax(over))
    room -= int(g[:k].sum())
    be_room -= int(b[:k].sum())
    counted = np.zeros(len(first), bool)
    counted[inverse[rows_ok & (be_svc < k)]] = True
    bounds = np.searchsorted(be_svc, np.arange(len(d.services) + 1))
    out = []
    grows, refused_l = svc_grow.tolist(), refused.tolist()
    for s in range(k, len(d.services)):
        if refused_l[s]:
            continue
        if grows[s] > room:
            limit = caps.services
        else:
            mine = inverse[bounds[s]:bounds[s + 1]]
            new_be = np.unique(mine[~counted[mine]]) if len(mine) else mine
            if len(new_be) <= be_room:
                room -= grows[s]
                be_room -= len(new_be)
                counted[new_be] = True
                continue
            limit = caps.backends
        refused[s] = True
        out.append(Refusal(MAP_FULL, d.services[s], limit=limit))
    return out


# -- the plan -----------------------------------------------------------------------------------
def plan(changes: dict[ObjectKey, list[Frontend]], reg: IdRegistry, caps: Capacities,
         full: bool = False, sweep: bool | None = None) -> WritePlan:
    """The writes that make the maps hold `changes` (Service → its frontends; [] removes it).
    full=True: `changes` is the whole desired state; everything else the registry knows goes.
    sweep (default: full): also remove frontends no Service owns (found in the maps at start-up)
    and backends no slot refers to."""
    sweep = full if sweep is None else sweep
    d = flatten(changes)
    get = reg.service_index.get
    d.svc_idx = np.fromiter((get(s, -1) for s in d.services), np.int64, len(d.services))
    if full:  # Services the registry knows that are not asked for any more
        fe = reg.frontends
        owned = np.zeros(len(reg.services) + 1, bool)
        owned[fe.owner[fe.live & (fe.owner >= 0)]] = True
        owned[d.svc_idx[d.svc_idx >= 0]] = False
        gone = np.nonzero(owned)[0]
        d.add_removals([reg.services[i] for i in gone.tolist()], gone)
    fe_sid = reg.frontends.lookup(d.fe_keys)
    be_id = reg.backends.lookup(d.be_keys)
    fresh = _Fresh(d, be_id)
    refused = np.zeros(len(d.services), bool)
    too_many = np.unique(_svc_of_fe(d)[d.fe_count > MAX_BACKENDS_PER_FRONTEND])
    refused[too_many] = True
    refusals = [Refusal(TOO_MANY_BACKENDS, d.services[s]) for s in too_many.tolist()]
    while True:  # a refused Service keeps its old frontends, which may now clash: until nothing moves
        refusals += _clashes(d, fe_sid, reg, refused)
        full_maps = _capacity(d, fe_sid, fresh, reg, caps, refused)
        refusals += full_maps
        if not full_maps:
            break
    p = _diff(d, fe_sid, be_id, fresh, reg, refused, refusals, sweep)
    p.maps = (caps.services.name, caps.backends.name)
    return p


class _Fresh:
    """The desired backends the registry has no id for: their rows, the distinct ones among them
    (first row of each) and, per row, which distinct one it is."""

    def __init__(self, d: Desired, be_id: np.ndarray):
        self.rows = np.nonzero(be_id == 0)[0]
        if len(self.rows):
            self.first, self.inverse = unique_keys(d.be_keys[self.rows])
        else:
            self.first, self.inverse = np.zeros(0, np.int64), np.zeros(0, np.int64)


def _diff(d: Desired, fe_sid, be_id, fresh: _Fresh, reg: IdRegistry, refused, refusals, sweep) -> WritePlan:
    """The WritePlan of the admitted Services: ids for new frontends and backends, the header and slot
    diff per frontend, what goes, and the registry's changes. One pass over shared columns (split up,
    it would pass a dozen arrays from function to function)."""
    fe = reg.frontends
    fe_svc = _svc_of_fe(d)
    take = ~refused[fe_svc]                      # frontends applied
    be_id, new_bids, new_idents = _new_backend_ids(d, be_id, fresh, reg, take)
    new_fe = np.nonzero(take & (fe_sid == 0))[0]  # new frontends get fresh service ids
    new_sids = reg.frontends.reserve(len(new_fe))
    sid = fe_sid.astype(np.uint32)
    sid[new_fe] = new_sids

    applied = np.nonzero(take)[0]
    a_sid = sid[applied]
    a_old = fe_sid[applied]   # 0 (nothing held) for new frontends: index 0 is an empty record
    count = d.fe_count[applied].astype(np.int64)
    old_slots = [fe.slots[s] for s in a_old.tolist()]
    old_len = np.array([len(b) for b in old_slots], np.int64) // SLOT_DTYPE.itemsize
    head_same = (fe.has_header[a_old] & (fe.header_count[a_old] == count)
                 & (fe.flags[a_old] == d.fe_flags[applied]) & (fe.affinity[a_old] == d.fe_affinity[applied]))
    slots_same = _same_slots(old_slots, old_len, count, applied, d, be_id)
    changed = np.nonzero(~(slots_same & head_same))[0]
    rows = _SlotRows()
    entry_delta = int((~fe.has_header[a_old[~head_same]]).sum())  # headers written where none was
    grown = ~slots_same & (old_len == 0)
    if grown.any():  # nothing held yet: every slot, in one vector step
        entry_delta += rows.expand(applied[grown], d, be_id)
    for i in np.nonzero(~slots_same & (old_len > 0))[0].tolist():
        f = int(applied[i])
        entry_delta += rows.diff(f, int(a_sid[i]), np.frombuffer(old_slots[i], SLOT_DTYPE),
                                 be_id[d.be_start[f]:d.be_start[f + 1]].astype(SLOT_DTYPE))
    removed = _unclaimed(reg, d, fe_svc[applied], a_old, refused, sweep)
    rm_head = removed[fe.has_header[removed]]
    entry_delta -= len(rm_head)
    for s in removed.tolist():
        entry_delta -= rows.drop(s, fe.slot_ids(s))

    ch, hw = applied[changed], applied[~head_same]
    ids_buf = be_id.astype(SLOT_DTYPE).tobytes()
    starts = (d.be_start * SLOT_DTYPE.itemsize).tolist()
    gained = _valid(np.concatenate(rows.gained)) if rows.gained else np.zeros(0, np.uint32)
    lost = _valid(np.concatenate(rows.lost)) if rows.lost else np.zeros(0, np.uint32)
    slot_f = rows.array(rows.fe, np.int64)
    sdel = rows.array(rows.del_sid, np.uint32)
    return WritePlan(
        new_backends={"id": new_bids, "ident": new_idents},
        slot_writes={"ident": d.fe_keys[slot_f], "slot": rows.array(rows.slot, np.uint16),
                     "backend_id": rows.array(rows.bid, np.uint32)},
        header_writes={"ident": d.fe_keys[hw], "count": d.fe_count[hw].astype(np.uint16),
                       "flags": d.fe_flags[hw], "service_id": sid[hw], "affinity": d.fe_affinity[hw]},
        header_deletes={"ident": fe.keys[rm_head]},
        slot_deletes={"ident": fe.keys[sdel], "slot": rows.array(rows.del_slot, np.uint16)},
        backend_deletes={"id": _unreferenced(reg, gained, lost, sweep)},
        refusals=refusals,
        new_frontends=(new_sids, d.fe_keys[new_fe]),
        written=FrontendWrite(sid[ch], d.fe_count[ch].astype(np.uint16), d.fe_flags[ch],
                              d.fe_affinity[ch], [ids_buf[starts[f]:starts[f + 1]] for f in ch.tolist()]),
        owners=Owners(a_sid, fe_svc[applied], d.services, d.svc_idx, [d.port_names[f] for f in applied.tolist()],
                      np.nonzero(~refused)[0]),
        removed_frontends=removed,
        refs_gained=gained, refs_lost=lost,
        entry_delta=entry_delta,
        services=len(d.services),
    )


def _new_backend_ids(d: Desired, be_id, fresh: _Fresh, reg: IdRegistry, take) -> tuple:
    """Ids for the distinct fresh backends of applied frontends (in reserve order): the desired
    rows' ids filled in, the new ids and their identities."""
    be_svc_ok = np.repeat(take, np.diff(d.be_start))[fresh.rows]
    used, where = np.unique(fresh.inverse[be_svc_ok], return_index=True)
    new_bids = reg.backends.reserve(len(used))
    be_id = be_id.copy()
    id_of = np.zeros(len(fresh.first), np.uint32)
    id_of[used] = new_bids
    be_id[fresh.rows] = id_of[fresh.inverse]   # (0 for rows of refused Services: never written)
    return be_id, new_bids, d.be_keys[fresh.rows[be_svc_ok][where]]


def _unclaimed(reg: IdRegistry, d: Desired, a_svc: np.ndarray, kept: np.ndarray, refused,
               sweep: bool) -> np.ndarray:
    """Frontends of the applied Services they no longer list (sweep: also those owned by none).
    a_svc / kept: the Service (position) and held service id (0: new) of each applied frontend."""
    fe = reg.frontends
    idx = d.svc_idx[~refused]
    idx = idx[idx >= 0]
    if not sweep:  # nothing to look for when each Service still lists every frontend it owns
        owner = fe.owner[kept]  # (-1: restored, owned by none: not "mine" for a Service new to the registry)
        mine = kept[(kept > 0) & (owner >= 0) & (owner == d.svc_idx[a_svc])]
        if (idx < len(reg.owned_count)).all() and int(reg.owned_count[idx].sum()) == len(mine):
            return np.zeros(0, np.uint32)
    candidates = fe.live & np.isin(fe.owner, idx)
    if sweep:
        candidates |= fe.live & (fe.owner < 0)
    candidates[kept] = False
    return np.nonzero(candidates)[0].astype(np.uint32)


def _same_slots(old_slots: list[bytes], old_len, count, applied, d: Desired, be_id) -> np.ndarray:
    """Per applied frontend: does the kernel already hold exactly its backend ids in slots 1..n?"""
    same = old_len == count
    cand = np.nonzero(same & (count > 0))[0]
    if len(cand):
        held = np.frombuffer(b"".join([old_slots[i] for i in cand.tolist()]), SLOT_DTYPE)
        n = count[cand]
        at = run_starts(n)
        src = np.repeat(d.be_start[applied[cand]] - at[:-1], n) + np.arange(at[-1])
        differs = np.add.reduceat((held != be_id[src]).astype(np.int64), at[:-1])
        same[cand] = differs == 0
    return same


@dataclass
class Owners:
    """Which Service owns each applied frontend (for the registry), by position in the plan's list."""
    sids: np.ndarray
    service_of: np.ndarray      # per frontend: position in services
    services: list[ObjectKey]
    known_index: np.ndarray     # per Service: the registry's index, -1 if new
    port_names: list[str]
    applied: np.ndarray         # positions of the Services applied


class _SlotRows:
    """Slot writes and deletes gathered per frontend; references gained and lost."""

    def __init__(self):
        self.fe, self.slot, self.bid = [], [], []          # arrays per frontend, joined at the end
        self.del_sid, self.del_slot = [], []
        self.gained, self.lost = [], []

    @staticmethod
    def array(parts: list, dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    def diff(self, f: int, sid: int, old: np.ndarray, new: np.ndarray) -> int:
        """Slots of one frontend that change; returns the change in entries."""
        m = min(len(old), len(new))
        at = np.nonzero(old[:m] != new[:m])[0]
        if len(new) > m:
            at = np.concatenate([at, np.arange(m, len(new))])
        self.fe.append(np.full(len(at), f, np.int64))
        self.slot.append(at + 1)
        self.bid.append(new[at])
        gone = np.nonzero(old[len(new):] != NO_SLOT)[0] + len(new)
        self.del_sid.append(np.full(len(gone), sid, np.uint32))
        self.del_slot.append(gone + 1)
        self.gained.append(new)
        self.lost.append(old)
        within = at[at < len(old)]
        return int((old[within] == NO_SLOT).sum()) + len(at) - len(within) - len(gone)

    def expand(self, fes: np.ndarray, d: Desired, be_id: np.ndarray) -> int:
        """Every slot of frontends the kernel holds none of yet (one vector step)."""
        counts = d.fe_count[fes].astype(np.int64)
        total = int(counts.sum())
        starts = d.be_start[fes]
        offset = np.repeat(starts - run_starts(counts)[:-1], counts)
        src = np.arange(total) + offset
        self.fe.append(np.repeat(fes, counts))
        self.slot.append(src - np.repeat(starts, counts) + 1)
        ids = be_id[src]
        self.bid.append(ids)
        self.gained.append(ids)
        return total

    def drop(self, sid: int, old: np.ndarray) -> int:
        present = np.nonzero(old != NO_SLOT)[0]
        self.del_sid.append(np.full(len(present), sid, np.uint32))
        self.del_slot.append(present + 1)
        self.lost.append(old)
        return len(present)


def _valid(ids: np.ndarray) -> np.ndarray:
    return ids[(ids != NO_SLOT) & (ids != INVALID)]


def _unreferenced(reg: IdRegistry, gained: np.ndarray, lost: np.ndarray, full: bool) -> np.ndarray:
    """Backend ids no slot refers to once the plan is written (full: also ones left from before)."""
    be = reg.backends
    if full:
        n = be.size
        after = be.refs[:n].astype(np.int64) + np.bincount(gained, minlength=n)[:n] - np.bincount(lost, minlength=n)[:n]
        return np.nonzero(be.live[:n] & (after <= 0))[0].astype(np.uint32)
    touched, lost_n = np.unique(lost, return_counts=True)
    gained_n = np.zeros(len(touched), np.int64)
    if len(gained) and len(touched):
        g, gn = np.unique(gained, return_counts=True)
        at = np.searchsorted(g, touched)
        hit = (at < len(g)) & (g[np.minimum(at, len(g) - 1)] == touched)
        gained_n[hit] = gn[at[hit]]
    after = be.refs[touched].astype(np.int64) + gained_n - lost_n
    return touched[be.live[touched] & (after <= 0)].astype(np.uint32)
