"""The only writer of the service maps: desired frontends → the minimal set of batched map writes.

Order of writes (so a concurrent connect never follows a slot to nothing):
  1. new backends  2. backend slots 1..n  3. slot-0 headers (count)  4. removed headers
  5. removed slots  6. backends no slot refers to any more.
Running it twice with the same input writes nothing. Backend and service ids are re-learned from the
pinned maps at start-up, so a restarted agent computes byte-identical entries and rewrites nothing.
A Service that would overflow a map is refused as a whole (its old entries stay) with an error that
names it; entries are never silently truncated.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..model.frontends import Backend, Frontend
from ..model.objects import ObjectKey
from .maps import MapFull, RawMap, addr16, pack_rows, port_be, unpack_rows

log = logging.getLogger("nodewire.reconciler")
PROTO_NUMBERS = {"TCP": 6, "UDP": 17}
MAX_BACKENDS_PER_FRONTEND = 65535  # the slot-0 count is a __u16


@dataclass
class SyncResult:
    services: int = 0
    written: int = 0
    deleted: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


class IdAllocator:
    """Small integer ids (from 1), reused after release, seeded from ids already in a pinned map."""

    def __init__(self, used: dict[bytes, int] | None = None):
        self.by_value: dict[bytes, int] = dict(used or {})
        self._free: list[int] = []
        self._next = max(self.by_value.values(), default=0) + 1

    def get(self, value: bytes) -> int:
        i = self.by_value.get(value)
        if i is None:
            i = self._free.pop() if self._free else self._next
            if i == self._next:
                self._next += 1
            self.by_value[value] = i
        return i

    def release(self, value: bytes) -> None:
        i = self.by_value.pop(value, None)
        if i is not None:
            self._free.append(i)


@dataclass
class _Owned:
    keys: set[bytes]
    backends: set[bytes]  # backend values (address/port/proto bytes)
    service_ids: dict[int, tuple[str, int, str, str]]  # id -> (vip, port, proto, port name)


class Reconciler:
    def __init__(self, services: RawMap, backends: RawMap):
        self.services, self.backends = services, backends
        self.svc_actual: dict[bytes, bytes] = services.dump()
        self.be_actual: dict[bytes, bytes] = backends.dump()  # id bytes -> backend bytes
        kdt, vdt = services.key_dtype, services.value_dtype
        # Re-learn ids from what the kernel holds (restart without flush).
        be_ids = {v: int(np.frombuffer(k, dtype=backends.key_dtype)[0]) for k, v in self.be_actual.items()}
        self.backend_ids = IdAllocator(be_ids)
        self._slot_off = kdt.fields["slot"][1]
        headers = {k: v for k, v in self.svc_actual.items() if self._is_header(k)}
        svc_ids = {self._frontend_ident(k): int(unpack_rows(vdt, [v])["service_id"][0]) for k, v in headers.items()}
        self.service_ids = IdAllocator(svc_ids)
        self.owned: dict[ObjectKey, _Owned] = {}
        self.key_owner: dict[bytes, ObjectKey] = {}
        self.backend_refs: Counter[bytes] = Counter()

    @staticmethod
    def _frontend_ident(header_key: bytes) -> bytes:
        return header_key  # slot is 0 in a header key, so the key itself names the frontend

    # ------------------------------------------------------------------------------------------
    def _rows(self, frontends: list[Frontend]):
        """Desired entries for one Service: ({key: value}, backend values, service ids)."""
        header_keys, header_vals, slot_keys, slot_vals = [], [], [], []
        backends: set[bytes] = set()
        ids = {}
        for fe in frontends:
            addr, port, proto = addr16(fe.ip), port_be(fe.port), PROTO_NUMBERS[fe.protocol]
            hk = (addr, port, proto, 0, 0)
            header_keys.append(hk)
            bes = fe.backends[:MAX_BACKENDS_PER_FRONTEND]
            for i, be in enumerate(bes, start=1):
                bval = pack_rows(self.backends.value_dtype,
                                 [(addr16(be.ip), port_be(be.port), PROTO_NUMBERS[be.protocol])])[0]
                backends.add(bval)
                slot_keys.append((addr, port, proto, 0, i))
                slot_vals.append((self.backend_ids.get(bval),))
            hk_raw = pack_rows(self.services.key_dtype, [hk])[0]
            sid = self.service_ids.get(self._frontend_ident(hk_raw))
            ids[sid] = (fe.ip, fe.port, fe.protocol, fe.port_name)
            header_vals.append((0, len(bes), 0, sid))
        kd, vd = self.services.key_dtype, self.services.value_dtype
        entries = dict(zip(pack_rows(kd, slot_keys), pack_rows(vd, slot_vals)))
        entries.update(zip(pack_rows(kd, header_keys), pack_rows(vd, header_vals)))
        return entries, backends, ids

    def apply(self, changes: dict[ObjectKey, list[Frontend]], full: bool = False) -> SyncResult:
        """Make the maps match `changes` (Service → its frontends; [] removes it). With full=True,
        `changes` is the whole desired state and every entry not in it is removed."""
        t0 = time.perf_counter()
        res = SyncResult(services=len(changes))
        if full:
            changes = {**{gone: [] for gone in set(self.owned) - set(changes)}, **changes}

        # 1. Desired entries per Service; refuse a Service that clashes or does not fit, as a whole.
        new_owned: dict[ObjectKey, _Owned] = {}
        entries_of: dict[ObjectKey, dict[bytes, bytes]] = {}
        claimed: dict[bytes, ObjectKey] = {}
        svc_room = self.services.capacity - len(self.svc_actual)
        be_room = self.backends.capacity - len(self.be_actual)
        have_be = set(self.be_actual.values())
        adding_be: set[bytes] = set()
        for svc, frontends in changes.items():
            entries, backends, ids = self._rows(frontends)
            other = next((claimed.get(k) or self.key_owner[k] for k in entries
                          if claimed.get(k, svc) != svc
                          or (self.key_owner.get(k, svc) != svc and self.key_owner[k] not in changes)), None)
            if other is not None:
                res.errors.append(f"Service {svc}: frontend already served by Service {other}; not applied")
                continue
            # Conservative: room freed by deletions in this same batch is not counted (writes go first).
            grow_s = sum(1 for k in entries if k not in self.svc_actual)
            new_be = backends - have_be - adding_be
            if grow_s > svc_room or len(new_be) > be_room:
                which = self.services if grow_s > svc_room else self.backends
                res.errors.append(f"Service {svc}: map {which.name} is full ({which.capacity} entries); "
                                  "Service not applied")
                continue
            svc_room -= grow_s
            be_room -= len(new_be)
            adding_be |= new_be
            claimed.update(dict.fromkeys(entries, svc))
            new_owned[svc] = _Owned(set(entries), backends, ids)
            entries_of[svc] = entries

        # 2. Diff against what the kernel holds.
        desired = {k: v for e in entries_of.values() for k, v in e.items()}
        kept = [o for s, o in self.owned.items() if s not in new_owned]  # unchanged or refused
        if full:
            old_keys = set(self.svc_actual).difference(*(o.keys for o in kept))
        else:
            old_keys = set().union(*(self.owned[s].keys for s in new_owned if s in self.owned))
        writes = [(k, v) for k, v in desired.items() if self.svc_actual.get(k) != v]
        deletes = [k for k in old_keys if k not in desired]

        refs = self.backend_refs.copy()
        for svc, o in new_owned.items():
            if svc in self.owned:
                refs.subtract(self.owned[svc].backends)
            refs.update(o.backends)
        refs = +refs  # drop zero/negative counts
        be_writes = [(self._id_bytes(self.backend_ids.get(b)), b) for b in set(refs) - have_be]
        unused = have_be - set(refs)
        be_deletes = [self._id_bytes(self.backend_ids.by_value[b]) for b in unused]

        slot_w = [(k, v) for k, v in writes if not self._is_header(k)]
        head_w = [(k, v) for k, v in writes if self._is_header(k)]
        head_d = [k for k in deletes if self._is_header(k)]
        slot_d = [k for k in deletes if not self._is_header(k)]

        # 3. Write, in the order that never exposes a half state.
        try:
            self.backends.update(be_writes)
            self.services.update(slot_w)
            self.services.update(head_w)
            self.services.delete(head_d)
            self.services.delete(slot_d)
            self.backends.delete(be_deletes)
        except MapFull as e:  # capacity was checked above: the map was changed behind our back
            res.errors.append(str(e))
            self.svc_actual, self.be_actual = self.services.dump(), self.backends.dump()
            raise

        # 4. Remember what the kernel now holds.
        for k, v in writes:
            self.svc_actual[k] = v
        for k in deletes:
            self.svc_actual.pop(k, None)
        for k, v in be_writes:
            self.be_actual[k] = v
        for k in be_deletes:
            self.be_actual.pop(k, None)
        for b in unused:
            self.backend_ids.release(b)
        for k in head_d:
            self.service_ids.release(self._frontend_ident(k))
        for svc, o in new_owned.items():
            old = self.owned.pop(svc, None)
            for k in old.keys if old else ():
                if self.key_owner.get(k) == svc:
                    del self.key_owner[k]
            if o.keys:
                self.owned[svc] = o
                self.key_owner.update(dict.fromkeys(o.keys, svc))
        self.backend_refs = refs
        res.written = len(be_writes) + len(writes)
        res.deleted = len(deletes) + len(be_deletes)
        res.seconds = time.perf_counter() - t0
        for err in res.errors:
            log.error("%s", err)
        return res

    def _is_header(self, key: bytes) -> bool:
        return key[self._slot_off:self._slot_off + 2] == b"\0\0"

    def _id_bytes(self, i: int) -> bytes:
        return np.array([i], dtype=self.backends.key_dtype).tobytes()

    def service_names(self) -> dict[int, dict]:
        """service_id → which Service and port it stands for (the kernel holds only ids)."""
        out = {}
        for svc, o in self.owned.items():
            for sid, (ip, port, proto, name) in o.service_ids.items():
                out[sid] = {"service": str(svc), "port_name": name, "frontend": f"{ip}:{port}/{proto}"}
        return out
