"""The planner's scalar fast path: the WritePlan of a change of a few rows, in plain Python.

The vector planner (plan.py) costs ~200 small numpy calls whatever the plan's size: ~1.3-2 ms for
one endpoint change, 20× the pre-split reconciler. Most syncs after the first are one Service and a
handful of rows, so this module plans those row by row with ints and bytes and builds the same
WritePlan — the same arrays, in the same order, with the same dtypes (tests/test_smallplan.py checks
it against plan.plan on random small changes) — so the writer and the registry's commit are shared.

It covers the common case only: no full sync or sweep, no clash (a frontend another Service holds,
or listed twice in the batch), everything fits, no frontend over the slot-0 count limit, no 64-bit
hash shared by two keys it looks up. Anything else returns None and the vector planner decides.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from ..model.frontends import Frontend
from .abi import PROTO_NUMBERS, SVC_F_AFFINITY
from .codec import KEY, addr16
from .keyindex import INVALID, NO_SLOT, SLOT_DTYPE, KeyIndex, key_hash_one
from .plan import MAX_BACKENDS_PER_FRONTEND, Capacities, FrontendWrite, Owners, WritePlan

MAX_ROWS = 64  # frontends + backends of a plan this path takes; beyond, numpy's vector steps win


def _ident(ip: str, port: int, proto: str) -> bytes:
    """codec.idents of one address (scope/flags 0), as its 20 bytes."""
    return addr16(ip) + port.to_bytes(2, "big") + bytes((PROTO_NUMBERS[proto], 0))


def _lookup(table: KeyIndex, k: bytes, h: int) -> int:
    """KeyIndex.lookup of one key (0: unknown)."""
    keys = table.keys
    for hs, hid in ((table._h, table._hid), (table._oh, table._ohid)):
        if not len(hs):
            continue
        j = int(hs.searchsorted(np.uint64(h)))
        while j < len(hs) and int(hs[j]) == h:
            i = int(hid[j])
            if i and keys[i].tobytes() == k:
                return i
            j += 1
    return 0


class _Fe:
    """One requested frontend, as plan.Desired has it."""
    __slots__ = ("svc", "key", "count", "flags", "affinity", "port_name", "bkeys", "sid", "new_sid", "bids")

    def __init__(self, svc: int, f: Frontend):
        self.svc, self.port_name = svc, f.port_name
        self.key = _ident(f.ip, f.port, f.protocol)
        self.count = len(f.backends)
        self.affinity = f.affinity_timeout
        self.flags = SVC_F_AFFINITY if f.affinity_timeout > 0 else 0
        self.bkeys = [_ident(b.ip, b.port, b.protocol) for b in f.backends]


def _frontends(changes) -> list[_Fe] | None:
    out = []
    for s, fes in enumerate(changes.values()):
        if len(fes) > 1:  # one entry per frontend: the last one listed wins (as desired.flatten)
            fes = list({(f.ip, f.port, f.protocol, getattr(f, "scope", 0)): f for f in fes}.values())
        for f in fes:
            if type(f) is not Frontend:
                return None
            out.append(_Fe(s, f))
    return out


def plan_small(changes: dict, reg, caps: Capacities) -> WritePlan | None:
    """plan.plan(changes, reg, caps) for a small incremental change, or None (not the common case)."""
    if not isinstance(changes, dict) or len(changes) > MAX_ROWS:
        return None
    fes = _frontends(changes)
    if fes is None or len(fes) + sum(f.count for f in fes) > MAX_ROWS:
        return None
    services = list(changes)
    get = reg.service_index.get
    svc_idx = [get(s, -1) for s in services]
    fe, be = reg.frontends, reg.backends
    hashes: set[int] = set()
    for f in fes:
        h = key_hash_one(f.key)
        if h in hashes or f.count > MAX_BACKENDS_PER_FRONTEND:
            return None  # a frontend listed twice (a clash in the batch), a hash shared, too many slots
        hashes.add(h)
        f.sid = _lookup(fe, f.key, h)
        if f.sid and fe.owner[f.sid] >= 0 and int(fe.owner[f.sid]) != svc_idx[f.svc]:
            return None  # held by another Service
    fresh: dict[bytes, int] = {}  # backend identities with no id yet → their hash
    bhash: dict[int, bytes] = {}
    for f in fes:
        f.bids = []
        for k in f.bkeys:
            h = key_hash_one(k)
            if bhash.setdefault(h, k) != k:
                return None
            i = _lookup(be, k, h)
            if not i:
                fresh[k] = h
            f.bids.append(i)
    return _build(services, svc_idx, fes, fresh, reg, caps)


def _grow(f: _Fe, fe) -> int:
    """New service-map keys of one frontend: a header where none is, slots beyond what the kernel holds."""
    if not f.sid:
        return 1 + f.count
    return max(0, f.count - len(fe.slots[f.sid]) // 4) + (not fe.has_header[f.sid])


def _compare(fes: list[_Fe], fe) -> tuple[list, list, list, list, int]:
    """Per frontend against what the kernel holds: headers to write, frontends whose record changes,
    those whose slots are all new or differ (with the slots held), and the header entries gained."""
    heads, changed, grown, diffed, entry_delta = [], [], [], [], 0
    for f in fes:
        old = f.sid
        sid = old or f.new_sid
        held = np.frombuffer(fe.slots[old], SLOT_DTYPE).tolist() if old else []
        head_same = bool(old and fe.has_header[old] and fe.header_count[old] == f.count
                         and fe.flags[old] == f.flags and fe.affinity[old] == f.affinity)
        slots_same = held == f.bids
        if not head_same:
            heads.append((f, sid))
            entry_delta += not (old and fe.has_header[old])
        if not (slots_same and head_same):
            changed.append((f, sid))
        if not slots_same:
            (grown if not held else diffed).append((f, sid, held))
    return heads, changed, grown, diffed, entry_delta


def _build(services, svc_idx, fes: list[_Fe], fresh: dict, reg, caps: Capacities) -> WritePlan | None:
    fe, be = reg.frontends, reg.backends
    if (sum(_grow(f, fe) for f in fes) > caps.services.capacity - reg.svc_entries
            or len(fresh) > caps.backends.capacity - be.count):
        return None  # the vector planner refuses what does not fit
    order = sorted(fresh, key=fresh.__getitem__)  # new ids in hash order, as desired.unique_keys gives
    new_bids = be.reserve(len(order))
    id_of = dict(zip(order, new_bids.tolist()))
    new_fe = [f for f in fes if not f.sid]
    new_sids = fe.reserve(len(new_fe))
    for f, s in zip(new_fe, new_sids.tolist()):
        f.new_sid = s
    for f in fes:
        f.bids = [i or id_of[k] for i, k in zip(f.bids, f.bkeys)]
    heads, changed, grown, diffed, entry_delta = _compare(fes, fe)
    rows = _Rows()
    for f, sid, _ in grown:  # every slot of frontends the kernel holds none of yet, first
        entry_delta += rows.write(f, range(len(f.bids)))
        rows.gained += f.bids
    for f, sid, held in diffed:
        entry_delta += rows.diff(f, sid, held)
    removed = _unclaimed(reg, svc_idx, fes)
    rm_head = [s for s in removed if fe.has_header[s]]
    entry_delta -= len(rm_head)
    for s in removed:
        entry_delta -= rows.drop(s, np.frombuffer(fe.slots[s], SLOT_DTYPE).tolist())
    gained = [i for i in rows.gained if i != NO_SLOT and i != INVALID]
    lost = [i for i in rows.lost if i != NO_SLOT and i != INVALID]
    u16, u32 = np.uint16, np.uint32
    return WritePlan(
        new_backends={"id": new_bids, "ident": _keys(order)},
        slot_writes={"ident": _keys([f.key for f in rows.fe]), "slot": np.array(rows.slot, u16),
                     "backend_id": np.array(rows.bid, u32)},
        header_writes={"ident": _keys([f.key for f, _ in heads]), "count": np.array([f.count for f, _ in heads], u16),
                       "flags": np.array([f.flags for f, _ in heads], u16),
                       "service_id": np.array([s for _, s in heads], u32),
                       "affinity": np.array([f.affinity for f, _ in heads], u32)},
        header_deletes={"ident": _rows_of(fe.keys, rm_head)},
        slot_deletes={"ident": _rows_of(fe.keys, rows.del_sid), "slot": np.array(rows.del_slot, u16)},
        backend_deletes={"id": _unreferenced(be, gained, lost)},
        refusals=[],
        new_frontends=(new_sids, _keys([f.key for f in new_fe])),
        written=FrontendWrite(np.array([s for _, s in changed], u32), np.array([f.count for f, _ in changed], u16),
                              np.array([f.flags for f, _ in changed], u16),
                              np.array([f.affinity for f, _ in changed], u32),
                              [np.array(f.bids, SLOT_DTYPE).tobytes() for f, _ in changed]),
        owners=Owners(np.array([f.sid or f.new_sid for f in fes], u32), np.array([f.svc for f in fes], np.int64),
                      services, np.array(svc_idx, np.int64), [f.port_name for f in fes],
                      np.arange(len(services))),
        removed_frontends=np.array(removed, u32),
        refs_gained=np.array(gained, u32), refs_lost=np.array(lost, u32),
        entry_delta=entry_delta, services=len(services), maps=(caps.services.name, caps.backends.name))


def _rows_of(keys: np.ndarray, sids: list[int]) -> np.ndarray:
    """keys[sids] (a structured array: fancy indexing costs µs even for none)."""
    return keys[np.array(sids, np.int64)] if sids else np.zeros(0, keys.dtype)


def _keys(raw: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(raw), KEY).copy() if raw else np.zeros(0, KEY)


class _Rows:
    """Slot writes and deletes, references gained and lost (plan._SlotRows, as lists)."""

    def __init__(self):
        self.fe, self.slot, self.bid, self.del_sid, self.del_slot = [], [], [], [], []
        self.gained, self.lost = [], []

    def write(self, f: _Fe, at) -> int:
        for i in at:
            self.fe.append(f)
            self.slot.append(i + 1)
            self.bid.append(f.bids[i])
        return len(at)

    def diff(self, f: _Fe, sid: int, old: list[int]) -> int:
        new = f.bids
        m = min(len(old), len(new))
        at = [i for i in range(m) if old[i] != new[i]] + list(range(m, len(new)))
        self.write(f, at)
        gone = [i for i in range(len(new), len(old)) if old[i] != NO_SLOT]
        self.del_sid += [sid] * len(gone)
        self.del_slot += [i + 1 for i in gone]
        self.gained += new
        self.lost += old
        return sum(1 for i in at if i < len(old) and old[i] == NO_SLOT) + len(new) - m - len(gone)

    def drop(self, sid: int, old: list[int]) -> int:
        present = [i for i, b in enumerate(old) if b != NO_SLOT]
        self.del_sid += [sid] * len(present)
        self.del_slot += [i + 1 for i in present]
        self.lost += old
        return len(present)


def _unclaimed(reg, svc_idx: list[int], fes: list[_Fe]) -> list[int]:
    """plan._unclaimed without a sweep: frontends of these Services they no longer list, ascending."""
    fe = reg.frontends
    idx = [i for i in svc_idx if i >= 0]
    mine = sum(1 for f in fes if f.sid and int(fe.owner[f.sid]) == svc_idx[f.svc] >= 0)
    if all(i < len(reg.owned_count) for i in idx) and sum(int(reg.owned_count[i]) for i in idx) == mine:
        return []
    kept = {f.sid for f in fes}
    out: set[int] = set()
    for i in set(idx):
        out.update(np.flatnonzero(fe.live & (fe.owner == i)).tolist())
    return sorted(out - kept)


def _unreferenced(be, gained: list[int], lost: list[int]) -> np.ndarray:
    """plan._unreferenced without a sweep: backend ids whose last reference this plan drops."""
    g, lo = Counter(gained), Counter(lost)
    n = len(be.live)
    out = [b for b in sorted(lo) if b < n and be.live[b] and int(be.refs[b]) + g[b] - lo[b] <= 0]
    return np.array(out, np.uint32)

