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

import socket
import struct
from array import array
from dataclasses import dataclass, field

import numpy as np

from ..model.frontends import Frontend
from ..model.objects import ObjectKey
from .abi import PROTO_NUMBERS, SVC_F_AFFINITY
from .ids import INVALID, KEY, NO_SLOT, SLOT_DTYPE, IdRegistry, _hash, as_keys

MAX_BACKENDS_PER_FRONTEND = 65535  # the slot-0 count is a __u16

CLASH, MAP_FULL, TOO_MANY_BACKENDS = "clash", "map-full", "too-many-backends"


def frontend_flags(fe: Frontend) -> int:
    """The slot-0 flags of a frontend (NW_SVC_F_* in bpf/lib/lb.h); the one place new flags go."""
    return SVC_F_AFFINITY if fe.affinity_timeout else 0


@dataclass(frozen=True)
class Limit:
    name: str
    capacity: int


@dataclass(frozen=True)
class Capacities:
    services: Limit
    backends: Limit


@dataclass(frozen=True)
class Refusal:
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
    """One batch of map operations. rows: the planner's own columns (see WritePlan)."""
    name: str
    map: str   # "services" | "backends"
    op: str    # "update" | "delete"
    rows: dict

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
    owners: tuple = ()       # (sids, Service per sid, port name per sid) of every applied frontend
    removed_frontends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    refs_gained: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    refs_lost: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    entry_delta: int = 0     # change in the number of service-map entries
    services: int = 0
    applied_services: list[ObjectKey] = field(default_factory=list)

    def phases(self) -> list[Phase]:
        return [
            Phase("new backends", "backends", "update", self.new_backends),
            Phase("slots", "services", "update", self.slot_writes),
            Phase("headers", "services", "update", self.header_writes),
            Phase("removed headers", "services", "delete", self.header_deletes),
            Phase("removed slots", "services", "delete", self.slot_deletes),
            Phase("unreferenced backends", "backends", "delete", self.backend_deletes),
        ]

    @property
    def written_count(self) -> int:
        return sum(len(p) for p in self.phases() if p.op == "update")

    @property
    def deleted_count(self) -> int:
        return sum(len(p) for p in self.phases() if p.op == "delete")



# -- flattening the desired state ---------------------------------------------------------------
_V4MAPPED = b"\0" * 10 + b"\xff\xff"
_PP: dict[tuple, bytes] = {}


def _tail(port: int, proto: str, extra: int) -> bytes:
    """Bytes 16..19 of an identity: port (network order), protocol number, scope/flags."""
    t = _PP.get((port, proto, extra))
    if t is None:
        t = _PP[(port, proto, extra)] = struct.pack("!HBB", port, PROTO_NUMBERS[proto], extra)
    return t


@dataclass
class Desired:
    """The requested Services as columns: Service s has frontends fe_start[s]:fe_start[s+1], frontend
    f has backends be_start[f]:be_start[f+1]."""
    services: list[ObjectKey]
    fe_start: np.ndarray
    fe_keys: np.ndarray
    fe_count: np.ndarray
    fe_flags: np.ndarray
    fe_affinity: np.ndarray
    port_names: list[str]
    be_start: np.ndarray
    be_keys: np.ndarray


def flatten(changes: dict[ObjectKey, list[Frontend]]) -> Desired:
    fe_buf, be_buf = bytearray(), bytearray()
    per_svc, nb, flags, aff, names = array("I"), array("I"), array("H"), array("I"), []
    pton, v4, v6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6
    for svc, fes in changes.items():
        if len(fes) > 1:  # one entry per frontend: the last one listed wins
            fes = list({(f.ip, f.port, f.protocol, getattr(f, "scope", 0)): f for f in fes}.values())
        per_svc.append(len(fes))
        for fe in fes:
            fe_buf += _V4MAPPED + pton(v4, fe.ip) if ":" not in fe.ip else pton(v6, fe.ip)
            fe_buf += _tail(fe.port, fe.protocol, getattr(fe, "scope", 0))
            bes = fe.backends
            nb.append(len(bes))
            flags.append(frontend_flags(fe))
            aff.append(fe.affinity_timeout)
            names.append(fe.port_name)
            for b in bes:
                ip = b.ip
                if ":" in ip:
                    be_buf += pton(v6, ip)
                else:
                    be_buf += _V4MAPPED
                    be_buf += pton(v4, ip)
                be_buf += _tail(b.port, b.protocol, 0)
    n_svc = np.frombuffer(per_svc, np.uint32) if per_svc else np.zeros(0, np.uint32)
    counts = np.frombuffer(nb, np.uint32) if nb else np.zeros(0, np.uint32)
    return Desired(
        services=list(changes), fe_start=_starts(n_svc), fe_keys=np.frombuffer(bytes(fe_buf), KEY),
        fe_count=counts, fe_flags=np.frombuffer(flags, np.uint16) if flags else np.zeros(0, np.uint16),
        fe_affinity=np.frombuffer(aff, np.uint32) if aff else np.zeros(0, np.uint32),
        port_names=names, be_start=_starts(counts), be_keys=np.frombuffer(bytes(be_buf), KEY))


def _starts(lengths: np.ndarray) -> np.ndarray:
    """[0, l0, l0+l1, …]: where each run starts in the flat array (and the total at the end)."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _unique_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of each distinct key's first occurrence, inverse) — by hash, checked exactly."""
    h = _hash(keys)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    if not (keys[first[inverse]] == keys).all():  # two keys share a hash: exact, slow path
        seen: dict[bytes, int] = {}
        inv = [seen.setdefault(k.tobytes(), len(seen)) for k in keys]
        inverse = np.array(inv, np.int64)
        first = np.array(list({v: i for i, v in reversed(list(enumerate(inv)))}.values()), np.int64)
        first = np.sort(first)
        inverse = np.unique(inverse, return_inverse=True)[1]  # renumber in key order of first
    return first, inverse


# -- admission: clashes, capacity --------------------------------------------------------------
def _svc_of_fe(d: Desired) -> np.ndarray:
    return np.repeat(np.arange(len(d.services)), np.diff(d.fe_start))


def _clashes(d: Desired, fe_sid: np.ndarray, reg: IdRegistry, refused: np.ndarray) -> list[Refusal]:
    """Refuse Services claiming a frontend another Service holds. The holder keeps it: a Service
    outside this batch, or a refused one (its old entries stay); among claimants in the batch,
    the current owner, then the first listed."""
    fe_svc = _svc_of_fe(d)
    owner = np.where(fe_sid > 0, reg.frontends.owner[fe_sid], -1)
    my_idx = np.array([reg.index_of(s) for s in d.services], np.int64)
    foreign = (owner >= 0) & (owner != my_idx[fe_svc])
    first, inverse = _unique_keys(d.fe_keys) if len(d.fe_keys) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
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


def _capacity(d: Desired, fe_sid: np.ndarray, be_id: np.ndarray, reg: IdRegistry, caps: Capacities,
              refused: np.ndarray) -> list[Refusal]:
    """Refuse Services whose new entries would not fit (first come, first served)."""
    fe = reg.frontends
    # new service-map keys per frontend: a header where none is, slots beyond what the kernel holds
    old_m = np.array([len(fe.slots[s]) // 4 for s in fe_sid.tolist()], np.int64) if len(fe_sid) else np.zeros(0, np.int64)
    known = fe_sid > 0
    grow = np.where(known, np.maximum(0, d.fe_count.astype(np.int64) - old_m) + ~fe.has_header[fe_sid], 1 + d.fe_count)
    svc_grow = np.diff(_starts(grow)[d.fe_start])
    fresh = be_id == 0
    fresh_idx = np.nonzero(fresh)[0]
    first, inverse = _unique_keys(d.be_keys[fresh_idx]) if len(fresh_idx) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    room = caps.services.capacity - reg.svc_entries
    be_room = caps.backends.capacity - reg.backends.count
    ok = ~refused
    if svc_grow[ok].sum() <= room and len(first) <= be_room:
        return []
    # one by one: Service s's fresh backends are those in its range not counted yet
    be_svc = np.repeat(_svc_of_fe(d), np.diff(d.be_start))[fresh_idx] if len(fresh_idx) else np.zeros(0, np.int64)
    bounds = np.searchsorted(be_svc, np.arange(len(d.services) + 1))
    counted = np.zeros(len(first), bool)
    out = []
    grows = svc_grow.tolist()
    for s in range(len(d.services)):
        if refused[s]:
            continue
        mine = inverse[bounds[s]:bounds[s + 1]]
        new_be = np.unique(mine[~counted[mine]]) if len(mine) else mine
        if grows[s] > room or len(new_be) > be_room:
            refused[s] = True
            out.append(Refusal(MAP_FULL, d.services[s],
                               limit=caps.services if grows[s] > room else caps.backends))
            continue
        room -= grows[s]
        be_room -= len(new_be)
        counted[new_be] = True
    return out


# -- the plan -----------------------------------------------------------------------------------
def plan(changes: dict[ObjectKey, list[Frontend]], reg: IdRegistry, caps: Capacities,
         full: bool = False) -> WritePlan:
    """The writes that make the maps hold `changes` (Service → its frontends; [] removes it).
    full=True: `changes` is the whole desired state; everything else the registry knows goes."""
    if full:
        gone = [s for s in reg.owned_services() if s not in changes]
        changes = {**{s: [] for s in gone}, **changes}
    d = flatten(changes)
    fe_sid = reg.frontends.lookup(d.fe_keys)
    be_id = reg.backends.lookup(d.be_keys)
    refused = np.zeros(len(d.services), bool)
    refusals = [Refusal(TOO_MANY_BACKENDS, d.services[s]) for s in
                np.unique(_svc_of_fe(d)[d.fe_count > MAX_BACKENDS_PER_FRONTEND]).tolist()]
    refused[[d.services.index(r.service) for r in refusals]] = True
    while True:  # a refused Service keeps its old frontends, which may now clash: until nothing moves
        refusals += _clashes(d, fe_sid, reg, refused)
        full_maps = _capacity(d, fe_sid, be_id, reg, caps, refused)
        refusals += full_maps
        if not full_maps:
            break
    return _diff(d, fe_sid, be_id, reg, refused, refusals, full)


def _diff(d: Desired, fe_sid, be_id, reg: IdRegistry, refused, refusals, full) -> WritePlan:
    fe = reg.frontends
    fe_svc = _svc_of_fe(d)
    take = ~refused[fe_svc]                      # frontends applied
    be_take = np.repeat(take, np.diff(d.be_start).astype(np.int64))
    # new backends: distinct fresh identities used by an applied frontend, ids in reserve order
    fresh_idx = np.nonzero((be_id == 0) & be_take)[0]
    new_bids = np.zeros(0, np.uint32)
    new_idents = np.zeros(0, KEY)
    if len(fresh_idx):
        first, inverse = _unique_keys(d.be_keys[fresh_idx])
        new_bids = reg.backends.reserve(len(first))
        be_id = be_id.copy()
        be_id[fresh_idx] = new_bids[inverse]
        new_idents = d.be_keys[fresh_idx[first]]
    # new frontends get fresh service ids
    new_fe = np.nonzero(take & (fe_sid == 0))[0]
    new_sids = reg.frontends.reserve(len(new_fe))
    sid = fe_sid.astype(np.uint32)
    sid[new_fe] = new_sids

    applied = np.nonzero(take)[0]
    a_sid = sid[applied]
    a_old = fe_sid[applied]   # 0 (nothing held) for new frontends: index 0 is an empty record
    ids_buf = be_id.astype(SLOT_DTYPE).tobytes()
    starts = (d.be_start * SLOT_DTYPE.itemsize).tolist()
    new_slots = [ids_buf[starts[f]:starts[f + 1]] for f in applied.tolist()]
    old_slots = [fe.slots[s] for s in a_old.tolist()]
    head_same = (fe.has_header[a_old] & (fe.count_[a_old] == d.fe_count[applied])
                 & (fe.flags[a_old] == d.fe_flags[applied]) & (fe.affinity[a_old] == d.fe_affinity[applied]))
    rows = _SlotRows()
    changed, head_w, fresh = [], [], []
    entry_delta = 0
    for i, hs in enumerate(head_same.tolist()):
        old, new = old_slots[i], new_slots[i]
        if old == new and hs:
            continue
        changed.append(i)
        if not hs:
            head_w.append(i)
        if old == new:
            continue
        if not old:
            fresh.append(i)  # nothing held yet: expanded in one vector step below
            continue
        entry_delta += rows.diff(int(applied[i]), int(a_sid[i]), np.frombuffer(old, SLOT_DTYPE),
                                 np.frombuffer(new, SLOT_DTYPE))
    if fresh:
        f = applied[fresh]
        entry_delta += rows.expand(f, d, be_id)
    # frontends no applied Service claims any more
    idx = np.array([reg.index_of(d.services[s]) for s in np.nonzero(~refused)[0].tolist()], np.int64)
    idx = idx[idx >= 0]
    candidates = fe.live & np.isin(fe.owner, idx)
    if full:
        candidates |= fe.live & (fe.owner < 0)
    candidates[a_old] = False
    removed = np.nonzero(candidates)[0].astype(np.uint32)
    rm_head = removed[fe.has_header[removed]]
    entry_delta -= len(rm_head)
    for s in removed.tolist():
        entry_delta -= rows.drop(s, fe.slot_ids(s))

    ch = applied[changed] if changed else np.zeros(0, np.int64)
    hw = applied[head_w] if head_w else np.zeros(0, np.int64)
    entry_delta += int((~fe.has_header[fe_sid[hw]]).sum()) if len(hw) else 0
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
        backend_deletes={"id": _unreferenced(reg, gained, lost, full)},
        refusals=refusals,
        new_frontends=(new_sids, d.fe_keys[new_fe]),
        written=FrontendWrite(sid[ch], d.fe_count[ch].astype(np.uint16), d.fe_flags[ch],
                              d.fe_affinity[ch], [new_slots[i] for i in changed]),
        owners=(a_sid, [d.services[s] for s in fe_svc[applied].tolist()],
                [d.port_names[f] for f in applied.tolist()]),
        removed_frontends=removed,
        refs_gained=gained, refs_lost=lost,
        entry_delta=entry_delta,
        services=len(d.services),
        applied_services=[d.services[s] for s in np.nonzero(~refused)[0].tolist()],
    )


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
        offset = np.repeat(starts - _starts(counts)[:-1], counts)
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


def _u16(a: array) -> np.ndarray:
    return np.array(a, np.uint16) if a else np.zeros(0, np.uint16)


def _u32(a: array) -> np.ndarray:
    return np.array(a, np.uint32) if a else np.zeros(0, np.uint32)


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
