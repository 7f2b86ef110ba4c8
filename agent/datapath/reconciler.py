"""The only writer of the service maps: desired frontends → the minimal set of batched map writes.

Order of writes (so a concurrent connect never follows a slot to nothing):
  1. new backends  2. backend slots 1..n  3. slot-0 headers (count)  4. removed headers
  5. removed slots  6. backends no slot refers to any more.
Running it twice with the same input writes nothing. What the kernel holds is remembered per
frontend as (count, service id, backend ids), learned from the pinned maps at start-up, so a
restarted agent computes identical entries and rewrites nothing. A Service that would overflow a map
is refused as a whole (its old entries stay) with an error that names it; nothing is truncated.

Rows are packed with numpy in one pass per write phase, with dtypes derived from BCC's ctypes of the
C structs (see maps.py), so a full sync of 100k Services is a handful of batch syscalls.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..model.frontends import Backend, Frontend
from ..model.objects import ObjectKey
from .abi import PROTO_NAMES, PROTO_NUMBERS, SVC_F_AFFINITY
from .maps import RawMap, addr16, port_be, port_host

log = logging.getLogger("nodewire.reconciler")
MAX_BACKENDS_PER_FRONTEND = 65535  # the slot-0 count is a __u16


class Prefix(NamedTuple):
    """A frontend as the service map keys it (everything but the slot)."""
    address: bytes  # 16 bytes, IPv4-mapped for IPv4
    port: int       # network byte order, as stored
    proto: int


class FrontendState(NamedTuple):
    count: int
    service_id: int
    backend_ids: tuple[int, ...]
    affinity_timeout: int = 0  # seconds; 0 = no session affinity


@dataclass
class SyncResult:
    services: int = 0
    written: int = 0
    deleted: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _ip_str(address: bytes) -> str:
    if address[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, address[12:])
    return socket.inet_ntop(socket.AF_INET6, address)


class _Ids:
    """Small integer ids from 1, reused after release."""

    def __init__(self, used=()):
        used = set(used)
        self._next = max(used, default=0) + 1
        self._free = sorted(set(range(1, self._next)) - used, reverse=True)

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def release(self, i: int) -> None:
        self._free.append(i)


class _SlotWrites:
    """Backend slots to write, gathered per frontend and expanded with numpy in one pass."""

    def __init__(self):
        self.prefixes: list[Prefix] = []
        self.per_prefix: list[int] = []
        self.slots: list[int] = []
        self.backend_ids: list[int] = []

    @property
    def count(self) -> int:
        return len(self.slots)

    def add_all(self, p: Prefix, ids: tuple[int, ...]) -> None:
        if ids:
            self.prefixes.append(p)
            self.per_prefix.append(len(ids))
            self.slots.extend(range(1, len(ids) + 1))
            self.backend_ids.extend(ids)

    def add_some(self, p: Prefix, rows: list[tuple[int, int]]) -> None:
        if rows:
            self.prefixes.append(p)
            self.per_prefix.append(len(rows))
            self.slots.extend(i for i, _ in rows)
            self.backend_ids.extend(b for _, b in rows)

    def arrays(self, services: RawMap) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.slots)
        keys = np.zeros(n, dtype=services.key_dtype)
        values = np.zeros(n, dtype=services.value_dtype)
        if n:
            rep = np.array(self.per_prefix)
            keys["address"] = np.repeat(np.frombuffer(b"".join(p.address for p in self.prefixes), dtype="V16"), rep)
            keys["port"] = np.repeat(np.array([p.port for p in self.prefixes], dtype=np.uint16), rep)
            keys["proto"] = np.repeat(np.array([p.proto for p in self.prefixes], dtype=np.uint8), rep)
            keys["slot"] = np.array(self.slots, dtype=np.uint16)
            values["backend_id"] = np.array(self.backend_ids, dtype=np.uint32)
        return keys, values


class Reconciler:
    def __init__(self, services: RawMap, backends: RawMap):
        self.services, self.backends = services, backends
        self.fe_state: dict[Prefix, FrontendState] = {}
        self.backend_id: dict[Backend, int] = {}
        self.backend_at: list[Backend | None] = [None]  # index: backend id (the inverse of backend_id)
        self.refs = np.zeros(1024, dtype=np.int64)  # slot references per backend id
        self.fe_owner: dict[Prefix, ObjectKey] = {}
        self.svc_fes: dict[ObjectKey, list[Prefix]] = {}
        self.sid_info: dict[int, tuple[ObjectKey, str, int, str, str]] = {}
        self.svc_entries = 0  # entries in the service map
        self._released: list[int] = []  # backend ids that lost a slot reference in this apply
        self._gained: list[int] = []    # … and that gained one
        self._learn()

    # -- start-up: what the pinned maps already hold -------------------------------------------
    def _learn(self) -> None:
        bk, bv = self.backends.dump_arrays()
        for bid, a, p, pr in zip(bk.tolist(), bv["address"].tolist(), bv["port"].tolist(), bv["proto"].tolist()):
            b = Backend(_ip_str(a), port_host(p), PROTO_NAMES.get(pr, str(pr)))
            self._place(bid, b)
        self.backend_ids = _Ids(self.backend_id.values())
        sk, sv = self.services.dump_arrays()
        self.svc_entries = len(sk)
        headers, slots = {}, {}
        for a, p, pr, slot, bid, cnt, sid, aff in zip(
                sk["address"].tolist(), sk["port"].tolist(), sk["proto"].tolist(), sk["slot"].tolist(),
                sv["backend_id"].tolist(), sv["count"].tolist(), sv["service_id"].tolist(),
                sv["affinity_timeout"].tolist()):
            pre = Prefix(a, p, pr)
            if slot == 0:
                headers[pre] = (cnt, sid, aff)
            else:
                slots.setdefault(pre, {})[slot] = bid
        for pre, (cnt, sid, aff) in headers.items():
            s = slots.get(pre, {})
            self.fe_state[pre] = FrontendState(cnt, sid, tuple(s.get(i, 0) for i in range(1, cnt + 1)), aff)
        # Slots without a header (a crash mid-delete) are orphans: a header with count 0 removes them.
        for pre, s in slots.items():
            if pre not in headers:
                self.fe_state[pre] = FrontendState(0, 0, tuple(s.get(i, 0) for i in range(1, max(s) + 1)))
        self.service_ids = _Ids(st.service_id for st in self.fe_state.values() if st.service_id)
        for st in self.fe_state.values():
            self._ref(st.backend_ids, +1)
        self._apply_refs()

    def _place(self, bid: int, b: Backend) -> None:
        self.backend_id[b] = bid
        if bid >= len(self.backend_at):
            self.backend_at.extend([None] * (bid + 1 - len(self.backend_at)))
        self.backend_at[bid] = b

    def _ref(self, ids, delta: int) -> None:
        """Record slot references gained (+1) or lost (-1); applied in bulk by _apply_refs()."""
        (self._gained if delta > 0 else self._released).extend(ids)

    def _apply_refs(self) -> None:
        top = max(max(self._gained, default=0), max(self._released, default=0), len(self.backend_at) - 1)
        if top >= len(self.refs):
            grown = np.zeros(max(top + 1, 2 * len(self.refs)), dtype=np.int64)
            grown[:len(self.refs)] = self.refs
            self.refs = grown
        np.add.at(self.refs, np.array(self._gained, dtype=np.int64), 1)
        np.add.at(self.refs, np.array(self._released, dtype=np.int64), -1)
        self._gained.clear()

    # -- apply -----------------------------------------------------------------------------------
    def apply(self, changes: dict[ObjectKey, list[Frontend]], full: bool = False) -> SyncResult:
        """Make the maps match `changes` (Service → its frontends; [] removes it). With full=True,
        `changes` is the whole desired state and every entry not in it is removed."""
        t0 = time.perf_counter()
        res = SyncResult(services=len(changes))
        if full:
            changes = {**{gone: [] for gone in self.svc_fes if gone not in changes}, **changes}

        slot_w = _SlotWrites()
        head_w: list[tuple[Prefix, int, int, int]] = []  # prefix, count, service id, affinity timeout
        head_d: list[Prefix] = []
        slot_d: list[tuple[Prefix, int]] = []
        new_backends: list[tuple[int, Backend]] = []
        claimed: dict[Prefix, ObjectKey] = {}
        room = self.services.capacity - self.svc_entries
        be_room = self.backends.capacity - len(self.backend_id)

        for svc, frontends in changes.items():
            want: dict[Prefix, Frontend] = {}
            for fe in frontends:
                want[Prefix(addr16(fe.ip), port_be(fe.port), PROTO_NUMBERS[fe.protocol])] = fe
            other = None
            for p in want:
                holder = claimed.get(p) or self.fe_owner.get(p)
                if holder is not None and holder != svc and (p in claimed or holder not in changes):
                    other = holder
                    break
            if other is not None:
                res.errors.append(f"Service {svc}: frontend already served by Service {other}; not applied")
                continue
            # Capacity, conservatively: room freed by deletions in this batch is not counted.
            # Each backend is hashed once here (tuples do not cache their hash): known ids, or None.
            grow = 0
            fresh: set[Backend] = set()
            known: dict[Prefix, list[int | None]] = {}
            get_id = self.backend_id.get
            for p, fe in want.items():
                old = self.fe_state.get(p)
                bes = fe.backends[:MAX_BACKENDS_PER_FRONTEND]
                grow += max(0, len(bes) - old.count) if old else 1 + len(bes)
                known[p] = ids = [get_id(b) for b in bes]
                if None in ids:
                    fresh.update(b for b, i in zip(bes, ids) if i is None)
            if grow > room or len(fresh) > be_room:
                which = self.services if grow > room else self.backends
                res.errors.append(f"Service {svc}: map {which.name} is full ({which.capacity} entries); "
                                  "Service not applied")
                continue
            room -= grow
            be_room -= len(fresh)
            for b in fresh:
                bid = self.backend_ids.take()
                self._place(bid, b)
                new_backends.append((bid, b))

            # Frontends the Service no longer has.
            for p in self.svc_fes.get(svc, ()):
                if p not in want:
                    self._drop_frontend(p, head_d, slot_d)
            for p, fe in want.items():
                claimed[p] = svc
                old = self.fe_state.get(p)
                ids = known[p]
                if None in ids:  # backends allocated just above
                    ids = [i if i is not None else self.backend_id[b] for b, i in zip(fe.backends, ids)]
                ids = tuple(ids)
                sid = old.service_id if old and old.service_id else self.service_ids.take()
                new = FrontendState(len(ids), sid, ids, fe.affinity_timeout)
                self.sid_info[sid] = (svc, fe.ip, fe.port, fe.protocol, fe.port_name)
                self.fe_owner[p] = svc
                if old == new:
                    continue
                old_ids = old.backend_ids if old else ()
                if not old_ids:
                    slot_w.add_all(p, ids)
                else:
                    slot_w.add_some(p, [(i, bid) for i, bid in enumerate(ids, 1)
                                        if i > len(old_ids) or old_ids[i - 1] != bid])
                if old is None or (old.count, old.service_id, old.affinity_timeout) != (
                        new.count, new.service_id, new.affinity_timeout):
                    head_w.append((p, new.count, sid, new.affinity_timeout))
                slot_d.extend((p, i) for i in range(len(ids) + 1, len(old_ids) + 1))
                self._ref(old_ids, -1)
                self._ref(ids, +1)
                self.svc_entries += (1 + len(ids)) - ((1 + len(old_ids)) if old else 0)
                self.fe_state[p] = new
            if want:
                self.svc_fes[svc] = list(want)
            else:
                self.svc_fes.pop(svc, None)

        if full:  # frontends the kernel holds that no Service owns (e.g. deleted while we were down)
            for p in [p for p in self.fe_state if p not in self.fe_owner]:
                self._drop_frontend(p, head_d, slot_d)

        self._apply_refs()
        if full:  # every backend no slot refers to (also ones left from before a restart)
            ids = np.fromiter(self.backend_id.values(), dtype=np.int64, count=len(self.backend_id))
            dead = ids[self.refs[ids] <= 0].tolist()
        else:
            dead = [i for i in set(self._released) if self.refs[i] <= 0 and self.backend_at[i] is not None]
        self._released.clear()

        # Write, in the order that never exposes a half state.
        self.backends.update_arrays(*self._backend_rows(new_backends))
        self.services.update_arrays(*slot_w.arrays(self.services))
        self.services.update_arrays(*self._header_rows(head_w))
        self.services.delete_array(self._service_keys([(p, 0) for p in head_d]))
        self.services.delete_array(self._service_keys(slot_d))
        self.backends.delete_array(np.array(dead, dtype=self.backends.key_dtype))

        for bid in dead:
            del self.backend_id[self.backend_at[bid]]
            self.backend_at[bid] = None
            self.backend_ids.release(bid)
        res.written = len(new_backends) + slot_w.count + len(head_w)
        res.deleted = len(head_d) + len(slot_d) + len(dead)
        res.seconds = time.perf_counter() - t0
        for err in res.errors:
            log.error("%s", err)
        return res

    def _drop_frontend(self, p: Prefix, head_d: list, slot_d: list) -> None:
        st = self.fe_state.pop(p, None)
        owner = self.fe_owner.pop(p, None)
        if st is None:
            return
        head_d.append(p)
        slot_d.extend((p, i) for i in range(1, len(st.backend_ids) + 1))
        self._ref(st.backend_ids, -1)
        self.svc_entries -= 1 + len(st.backend_ids)
        if st.service_id:
            self.sid_info.pop(st.service_id, None)
            self.service_ids.release(st.service_id)
        if owner is not None and owner in self.svc_fes and p in self.svc_fes[owner]:
            self.svc_fes[owner] = [q for q in self.svc_fes[owner] if q != p]

    # -- packing ----------------------------------------------------------------------------------
    def _service_keys(self, rows: list[tuple[Prefix, int]]) -> np.ndarray:
        keys = np.zeros(len(rows), dtype=self.services.key_dtype)
        if rows:
            keys["address"] = np.frombuffer(b"".join(p.address for p, _ in rows), dtype="V16")
            keys["port"] = [p.port for p, _ in rows]
            keys["proto"] = [p.proto for p, _ in rows]
            keys["slot"] = [s for _, s in rows]
        return keys

    def _header_rows(self, rows: list[tuple[Prefix, int, int, int]]):
        keys = self._service_keys([(r[0], 0) for r in rows])
        values = np.zeros(len(rows), dtype=self.services.value_dtype)
        if rows:
            values["count"] = [r[1] for r in rows]
            values["service_id"] = [r[2] for r in rows]
            values["affinity_timeout"] = [r[3] for r in rows]
            values["flags"] = [SVC_F_AFFINITY if r[3] else 0 for r in rows]
        return keys, values

    def _backend_rows(self, rows: list[tuple[int, Backend]]):
        keys = np.array([i for i, _ in rows], dtype=self.backends.key_dtype)
        values = np.zeros(len(rows), dtype=self.backends.value_dtype)
        if rows:
            values["address"] = np.frombuffer(b"".join(addr16(b.ip) for _, b in rows), dtype="V16")
            values["port"] = [port_be(b.port) for _, b in rows]
            values["proto"] = [PROTO_NUMBERS[b.protocol] for _, b in rows]
        return keys, values

    # -- views ------------------------------------------------------------------------------------
    @property
    def owned(self) -> dict[ObjectKey, list[Prefix]]:
        return self.svc_fes

    def service_names(self, sid_info: dict | None = None) -> dict[int, dict]:
        """service_id → which Service and port it stands for (the kernel holds only ids).
        sid_info: a copy of self.sid_info, to format outside the lock that guards the reconciler."""
        return {sid: {"service": str(svc), "port_name": name, "frontend": f"{ip}:{port}/{proto}"}
                for sid, (svc, ip, port, proto, name) in (self.sid_info if sid_info is None else sid_info).items()}
