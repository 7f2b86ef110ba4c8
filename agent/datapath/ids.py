"""The id registry: service ids and backend ids, what each stands for, and backend refcounts.

The kernel maps hold only small integers (a frontend's service id, a slot's backend id); this module
remembers what each one means, learned back from the pinned maps at start-up so a restarted agent
computes the same entries and rewrites nothing that is right (after Cilium's BPFOps, which restores
its id allocators and backend refcounts from the maps).

It is compact on purpose (100k Services × 5 endpoints = 100k frontends, 500k backends): identities
are fixed-size 20-byte keys in one numpy array indexed by id, found through a sorted array of their
64-bit hashes, so there is no dict and no Python object per backend. Tables that can be derived
(a Service's frontends: the ids whose owner is that Service) are derived, not kept twice.

One thread (the agent loop) plans and commits; readers on other threads take `snapshot()`, a copy
made under the registry's lock.
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

import numpy as np

from ..model.objects import ObjectKey
from .abi import PROTO_NAMES

# A 20-byte identity, viewed as three integers for hashing and exact comparison.
KEY = np.dtype([("a", "<u8"), ("b", "<u8"), ("c", "<u4")])
# What a frontend is to the service map (every lb_service_key field but the slot) and what a backend
# is to the backend map (every lb_backend field but the padding): 16 + 2 + 1 + 1 bytes, the fields
# named as in bpf/lib/lb.h, so they are copied by name from BCC-derived rows.
FRONTEND_IDENT = np.dtype({"names": ["address", "port", "proto", "scope"],
                           "formats": ["V16", "<u2", "u1", "u1"], "offsets": [0, 16, 18, 19], "itemsize": 20})
BACKEND_IDENT = np.dtype({"names": ["address", "port", "proto", "flags"],
                          "formats": ["V16", "<u2", "u1", "u1"], "offsets": [0, 16, 18, 19], "itemsize": 20})
NO_SLOT = 0             # in a frontend's slot list: the kernel holds no entry at this slot
INVALID = 0xFFFFFFFF    # … holds one pointing at a backend id the backend map does not have
SLOT_DTYPE = np.dtype("<u4")
_V4MAPPED = b"\0" * 10 + b"\xff\xff"


def key_hash(keys: np.ndarray) -> np.ndarray:
    """64-bit mix of each key (multiply-xorshift, as in splitmix64); equal keys, equal hashes."""
    with np.errstate(over="ignore"):
        h = keys["a"] * np.uint64(0x9E3779B97F4A7C15)
        h ^= keys["b"] * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= keys["c"].astype(np.uint64) * np.uint64(0x165667B19E3779F9)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return h


def _copy_fields(rows: np.ndarray, ident: np.ndarray) -> np.ndarray:
    out = np.zeros(len(rows), ident)
    for name in ident.names:
        out[name] = rows[name]
    return out


def be_live(table: "KeyIndex", ids: np.ndarray) -> np.ndarray:
    inside = ids < len(table.live)
    return inside & table.live[np.where(inside, ids, 0)]


def as_keys(idents: np.ndarray) -> np.ndarray:
    """FRONTEND_IDENT / BACKEND_IDENT rows (or 20-byte strings) as KEY rows."""
    return np.ascontiguousarray(idents).view(KEY)


def ip_str(address: bytes) -> str:
    if address[:12] == _V4MAPPED:
        return socket.inet_ntop(socket.AF_INET, address[12:])
    return socket.inet_ntop(socket.AF_INET6, address)


def ident_text(key: bytes) -> tuple[str, int, str]:
    """(ip, port, protocol) of a 20-byte frontend or backend identity."""
    return ip_str(key[:16]), int.from_bytes(key[16:18], "big"), PROTO_NAMES.get(key[18], str(key[18]))


class KeyIndex:
    """20-byte keys ↔ ids from 1 (0 is "none"), lowest free id reused first.

    keys[id] holds each live key. They are found by hash: a large sorted array (`_h`, `_hid`; a
    removed entry's id set to 0) plus a small sorted overlay taking additions, merged into the large
    one when it grows past MERGE_AT, so one change costs a few small-array operations, not a copy of
    the whole index. All operations take numpy arrays: a full sync is a few vector passes."""

    MERGE_AT = 4096

    def __init__(self):
        self.keys = np.zeros(1, KEY)
        self.live = np.zeros(1, bool)
        self._h = np.zeros(0, np.uint64)
        self._hid = np.zeros(0, np.uint32)
        self._oh = np.zeros(0, np.uint64)   # the overlay
        self._ohid = np.zeros(0, np.uint32)
        self._dead = 0                      # removed entries still in _h
        self._free = np.zeros(0, np.uint32)   # released ids, as a stack: smallest on top
        self._next = 1
        self.count = 0

    @property
    def size(self) -> int:
        """One past the largest id ever handed out (the length id-indexed arrays need)."""
        return self._next

    def _grow(self, top: int) -> None:
        if top < len(self.keys):
            return
        n = max(top + 1, len(self.keys) + len(self.keys) // 4 + 16)
        keys = np.zeros(n, KEY)
        keys[:len(self.keys)] = self.keys
        self.keys = keys
        live = np.zeros(n, bool)
        live[:len(self.live)] = self.live
        self.live = live
        self.on_grow(n)

    def on_grow(self, n: int) -> None:
        """Subclasses grow their own id-indexed arrays to n."""

    # -- lookups -------------------------------------------------------------------------------
    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The id of each key (0: unknown)."""
        keys = keys.view(KEY) if keys.dtype != KEY else keys
        out = np.zeros(len(keys), np.uint32)
        if not len(keys) or not self.count:
            return out
        h = key_hash(keys)
        self._find(self._h, self._hid, keys, h, out)
        if len(self._oh):
            miss = np.nonzero(out == 0)[0]
            sub = np.zeros(len(miss), np.uint32)
            self._find(self._oh, self._ohid, keys[miss], h[miss], sub)
            out[miss] = sub
        return out

    def _find(self, hs: np.ndarray, hid: np.ndarray, keys: np.ndarray, h: np.ndarray, out: np.ndarray) -> None:
        if not len(hs):
            return
        if len(h) > 4096:  # many queries: search them in order (cache-friendly), then put back
            order = np.argsort(h)
            pos = np.empty(len(h), np.int64)
            pos[order] = np.searchsorted(hs, h[order])
        else:
            pos = np.searchsorted(hs, h)
        inside = pos < len(hs)
        pos = np.where(inside, pos, 0)
        hit = inside & (hs[pos] == h)
        cand = hid[pos]
        same = hit & (self.keys[cand] == keys)  # keys[0] is all zeros, never a real identity
        out[same] = cand[same]
        for i in np.nonzero(hit & ~same)[0]:  # another key (or a removed one) with the same hash first
            j = pos[i]
            while j < len(hs) and hs[j] == h[i]:
                if hid[j] and self.keys[hid[j]] == keys[i]:
                    out[i] = hid[j]
                    break
                j += 1

    # -- allocation ----------------------------------------------------------------------------
    def reserve(self, n: int) -> np.ndarray:
        """The n ids that add() of new keys should use next (the planner's view; nothing changes)."""
        from_free = self._free[::-1][:n]
        rest = np.arange(self._next, self._next + n - len(from_free), dtype=np.uint32)
        return np.concatenate([from_free, rest]).astype(np.uint32)

    def add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """Make keys[i] live under ids[i] (ids from reserve(), or read back from a map)."""
        if not len(ids):
            return
        ids = np.asarray(ids, np.uint32)
        top = int(ids.max())
        self._grow(top)
        self._next = max(self._next, top + 1)
        if len(self._free):
            self._free = self._free[~np.isin(self._free, ids)]
        self.keys[ids] = keys.view(KEY) if keys.dtype != KEY else keys
        self.live[ids] = True
        self.count += len(ids)
        h = key_hash(self.keys[ids])
        order = np.argsort(h, kind="stable")
        h, ids = h[order], ids[order]
        at = np.searchsorted(self._oh, h)
        self._oh = np.insert(self._oh, at, h)
        self._ohid = np.insert(self._ohid, at, ids)
        if len(self._oh) > self.MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        """The overlay into the large arrays, dropping removed entries (both sorted: linear)."""
        keep = self._hid != 0
        h, hid = self._h[keep], self._hid[keep]
        at = np.searchsorted(h, self._oh)
        self._h, self._hid = np.insert(h, at, self._oh), np.insert(hid, at, self._ohid)
        self._oh, self._ohid = np.zeros(0, np.uint64), np.zeros(0, np.uint32)
        self._dead = 0

    def remove(self, ids: np.ndarray) -> None:
        """Release ids (for reuse, smallest first)."""
        if not len(ids):
            return
        ids = np.unique(np.asarray(ids, np.uint32))
        h = key_hash(self.keys[ids])
        in_overlay = np.isin(ids, self._ohid)
        if in_overlay.any():
            keep = ~np.isin(self._ohid, ids)
            self._oh, self._ohid = self._oh[keep], self._ohid[keep]
        rest, hr = ids[~in_overlay], h[~in_overlay]
        at = np.searchsorted(self._h, hr)
        for k in np.nonzero(self._hid[np.minimum(at, len(self._hid) - 1)] != rest)[0]:
            j = at[k]  # equal hashes: find this id in its run
            while self._hid[j] != rest[k]:
                j += 1
            at[k] = j
        self._hid[at] = 0
        self._dead += len(rest)
        self.keys[ids] = 0
        self.live[ids] = False
        self.count -= len(ids)
        self._free = np.sort(np.concatenate([self._free, ids]))[::-1].copy()
        if self._dead > max(self.MERGE_AT, len(self._h) // 4):
            self._merge()

    def live_ids(self) -> np.ndarray:
        return np.nonzero(self.live)[0].astype(np.uint32)


class BackendTable(KeyIndex):
    """Backend identities by backend id, with how many slots refer to each."""

    def __init__(self):
        super().__init__()
        self.refs = np.zeros(1, np.int32)

    def on_grow(self, n: int) -> None:
        self.refs = np.concatenate([self.refs, np.zeros(n - len(self.refs), np.int32)])

    def count_refs(self, ids: np.ndarray, delta: int) -> None:
        if len(ids) > 4096:
            n = self.size
            self.refs[:n] += (delta * np.bincount(ids, minlength=n)[:n]).astype(np.int32)
        elif len(ids):
            np.add.at(self.refs, ids, delta)


def _set_slots(fe: "FrontendTable", sids: np.ndarray, slot_no: np.ndarray, bids: np.ndarray) -> None:
    """Each frontend's slot list from rows sorted by (service id, slot): one slice of one buffer per
    frontend when its slots are 1..m without a gap (the rule), a gap-filled list otherwise."""
    if not len(sids):
        return
    starts = np.concatenate([[0], np.nonzero(np.diff(sids))[0] + 1])
    ends = np.append(starts[1:], len(sids))
    expected = np.arange(len(sids)) - np.repeat(starts, ends - starts) + 1
    gappy = np.zeros(len(starts), bool)
    bad = np.nonzero(slot_no != expected)[0]
    gappy[np.searchsorted(starts, bad, side="right") - 1] = True
    buf = bids.astype(SLOT_DTYPE).tobytes()
    w = SLOT_DTYPE.itemsize
    for sid, lo, hi, gap in zip(sids[starts].tolist(), starts.tolist(), ends.tolist(), gappy.tolist()):
        if not gap:
            fe.slots[sid] = buf[lo * w:hi * w]
        else:
            dense = np.zeros(int(slot_no[hi - 1]), SLOT_DTYPE)
            dense[slot_no[lo:hi] - 1] = bids[lo:hi]
            fe.slots[sid] = dense.tobytes()


class FrontendTable(KeyIndex):
    """Frontends by service id: the slot-0 header the kernel holds, the backend id at each slot,
    the Service owning it (-1: none, e.g. restored and not yet claimed) and its port name."""

    def __init__(self):
        super().__init__()
        self.header_count = np.zeros(1, np.uint16)
        self.flags = np.zeros(1, np.uint16)
        self.affinity = np.zeros(1, np.uint32)
        self.owner = np.full(1, -1, np.int32)
        self.has_header = np.zeros(1, bool)
        self.slots: list[bytes] = [b""]      # SLOT_DTYPE backend ids of slots 1..m, as the kernel holds them
        self.port_name: list[str] = [""]

    def on_grow(self, n: int) -> None:
        grow = n - len(self.header_count)
        self.header_count = np.concatenate([self.header_count, np.zeros(grow, np.uint16)])
        self.flags = np.concatenate([self.flags, np.zeros(grow, np.uint16)])
        self.affinity = np.concatenate([self.affinity, np.zeros(grow, np.uint32)])
        self.owner = np.concatenate([self.owner, np.full(grow, -1, np.int32)])
        self.has_header = np.concatenate([self.has_header, np.zeros(grow, bool)])
        self.slots.extend([b""] * grow)
        self.port_name.extend([""] * grow)

    def remove(self, ids: np.ndarray) -> None:
        super().remove(ids)
        self.owner[ids] = -1
        self.has_header[ids] = False
        self.header_count[ids] = 0
        for i in ids.tolist():
            self.slots[i] = b""
            self.port_name[i] = ""

    def slot_ids(self, sid: int) -> np.ndarray:
        return np.frombuffer(self.slots[sid], SLOT_DTYPE)


@dataclass(frozen=True)
class FrontendInfo:
    service: ObjectKey | None
    ip: str
    port: int
    protocol: str
    port_name: str

    @property
    def frontend(self) -> str:
        return f"{self.ip}:{self.port}/{self.protocol}"


class Snapshot:
    """A consistent copy of what the ids stand for, for readers on other threads (observer, status)."""

    def __init__(self, reg: "IdRegistry"):
        fe, be = reg.frontends, reg.backends
        self._sids = fe.live_ids()
        self._fe_keys = fe.keys.copy()
        self._owner = fe.owner.copy()
        self._port_name = list(fe.port_name)
        self._services = list(reg.services)
        self._be_keys = be.keys.copy()
        self._be_live = be.live.copy()

    def service_ids(self) -> list[int]:
        """Service ids of the frontends some Service owns."""
        return self._sids[self._owner[self._sids] >= 0].tolist()

    def frontend(self, sid: int) -> FrontendInfo | None:
        """What a service id stands for, or None (unknown, or restored and owned by no Service)."""
        if not 0 < sid < len(self._owner) or self._owner[sid] < 0:
            return None
        ip, port, proto = ident_text(self._fe_keys[sid].tobytes())
        return FrontendInfo(self._services[self._owner[sid]], ip, port, proto, self._port_name[sid])

    def backend(self, bid: int) -> tuple[str, int, str] | None:
        """(ip, port, protocol) of a backend id, or None."""
        if not 0 < bid < len(self._be_live) or not self._be_live[bid]:
            return None
        return ident_text(self._be_keys[bid].tobytes())

    def backend_ids(self) -> list[int]:
        return np.nonzero(self._be_live)[0].tolist()


class IdRegistry:
    """Service ids (one per frontend), backend ids and refcounts, and which Service owns what."""

    def __init__(self):
        self.frontends = FrontendTable()
        self.backends = BackendTable()
        self.services: list[ObjectKey | None] = []   # service index → key (owner values)
        self.service_index: dict[ObjectKey, int] = {}
        self.owned_count = np.zeros(0, np.int32)     # service index → frontends it owns
        self._free_services: list[int] = []
        self.svc_entries = 0                           # entries in the service map
        self.lock = threading.Lock()

    # -- queries (planner, agent thread) -------------------------------------------------------
    def owned_services(self) -> list[ObjectKey]:
        """The Services owning at least one frontend."""
        return [self.services[i] for i in np.nonzero(self.owned_count > 0)[0].tolist()]

    def snapshot(self) -> Snapshot:
        with self.lock:
            return Snapshot(self)

    # -- changes (agent thread) ----------------------------------------------------------------
    def commit(self, p) -> None:
        """Record a WritePlan (agent/datapath/plan.py) as written: called once the writes succeeded."""
        fe, be = self.frontends, self.backends
        with self.lock:
            be.add(p.new_backends["id"], p.new_backends["ident"])
            fe.add(*p.new_frontends)
            w = p.written
            fe.header_count[w.sids] = w.count
            fe.flags[w.sids] = w.flags
            fe.affinity[w.sids] = w.affinity
            fe.has_header[w.sids] = True
            for s, b in zip(w.sids.tolist(), w.slots):
                fe.slots[s] = b
            o = p.owners
            idx = o.known_index.copy()
            for s in np.unique(o.service_of[idx[o.service_of] < 0]).tolist():  # new owners
                idx[s] = self.intern_service(o.services[s])
            self._set_owners(o.sids, idx[o.service_of])
            for s, n in zip(o.sids.tolist(), o.port_names):
                fe.port_name[s] = n
            be.count_refs(p.refs_gained, +1)
            be.count_refs(p.refs_lost, -1)
            self._set_owners(p.removed_frontends, np.full(len(p.removed_frontends), -1))
            fe.remove(p.removed_frontends)
            be.remove(p.backend_deletes["id"])
            self.svc_entries += p.entry_delta
            idxs = o.known_index[o.applied]
            for idx in idxs[(idxs >= 0)].tolist():  # Services that may have lost their last frontend
                if not self.owned_count[idx]:
                    svc = self.services[idx]
                    del self.service_index[svc]
                    self.services[idx] = None
                    self._free_services.append(idx)

    def _restore_headers(self, keys: np.ndarray, sk: np.ndarray, sv: np.ndarray) -> None:
        fe = self.frontends
        head = np.nonzero(sk["slot"] == 0)[0]
        sids = sv["service_id"][head].astype(np.uint32)
        _, first = np.unique(sids, return_index=True)
        good = np.zeros(len(head), bool)
        good[first] = True
        good &= sids > 0
        fe.add(sids[good], keys[head[good]])
        odd = head[~good]  # a header with id 0 or a duplicate id: a fresh id, and rewritten when claimed
        odd_sids = fe.reserve(len(odd))
        fe.add(odd_sids, keys[odd])
        hs = np.concatenate([sids[good], odd_sids])
        rows = np.concatenate([head[good], odd])
        fe.header_count[hs] = sv["count"][rows]
        fe.flags[hs] = sv["flags"][rows]
        fe.flags[odd_sids] = 0xFFFF  # never a wanted value: forces a header write
        fe.affinity[hs] = sv["affinity_timeout"][rows]
        fe.has_header[hs] = True

    def _restore_slots(self, keys: np.ndarray, sk: np.ndarray, sv: np.ndarray) -> None:
        """Slot lists and backend refcounts; slots under no header get a frontend of their own."""
        fe = self.frontends
        slot_rows = np.nonzero(sk["slot"] != 0)[0]
        owner_sid = fe.lookup(keys[slot_rows])
        orphan = slot_rows[owner_sid == 0]
        if len(orphan):
            o_keys = keys[orphan]
            _, first = np.unique(key_hash(o_keys), return_index=True)
            fe.add(fe.reserve(len(first)), o_keys[first])
            owner_sid = fe.lookup(keys[slot_rows])
        bids = sv["backend_id"][slot_rows].astype(np.uint32)
        bids = np.where(be_live(self.backends, bids), bids, INVALID).astype(np.uint32)
        slot_no = sk["slot"][slot_rows].astype(np.int64)
        order = np.lexsort((slot_no, owner_sid))
        _set_slots(fe, owner_sid[order], slot_no[order], bids[order])
        valid = bids[bids != INVALID]
        n = self.backends.size
        self.backends.refs[:n] += np.bincount(valid, minlength=n)[:n].astype(np.int32)

    def _set_owners(self, sids: np.ndarray, idx: np.ndarray) -> None:
        """Frontends sids now owned by Services idx (-1: none), keeping owned_count in step."""
        fe = self.frontends
        if len(self.owned_count) < len(self.services):
            self.owned_count = np.concatenate([self.owned_count,
                                               np.zeros(len(self.services) - len(self.owned_count), np.int32)])
        before = fe.owner[sids]
        np.subtract.at(self.owned_count, before[before >= 0], 1)
        idx = np.asarray(idx, np.int32)
        np.add.at(self.owned_count, idx[idx >= 0], 1)
        fe.owner[sids] = idx

    def adopt_owners(self, old: "IdRegistry") -> None:
        """Take the Service owners of frontends `old` knew (after re-reading the maps on a failed write)."""
        sids = self.frontends.live_ids()
        was = old.frontends.lookup(self.frontends.keys[sids])
        for sid, o in zip(sids.tolist(), was.tolist()):
            idx = int(old.frontends.owner[o]) if o else -1
            if idx >= 0:
                self._set_owners(np.array([sid]), np.array([self.intern_service(old.services[idx])]))
                self.frontends.port_name[sid] = old.frontends.port_name[o]

    # -- start-up: what the pinned maps already hold -------------------------------------------
    @classmethod
    def restore(cls, services: tuple[np.ndarray, np.ndarray], backends: tuple[np.ndarray, np.ndarray]) -> "IdRegistry":
        """The registry of maps already holding `services` and `backends` ((keys, values) rows as
        dump_arrays() returns them). Headers keep their service ids; slots with no header (a crash
        mid-delete) become frontends owned by no Service, removed by the next full sync unless claimed."""
        reg = cls()
        bk, bv = backends
        reg.backends.add(np.asarray(bk, np.uint32), as_keys(_copy_fields(bv, BACKEND_IDENT)))
        sk, sv = services
        reg.svc_entries = len(sk)
        keys = as_keys(_copy_fields(sk, FRONTEND_IDENT))
        reg._restore_headers(keys, sk, sv)
        reg._restore_slots(keys, sk, sv)
        return reg

    # -- service keys --------------------------------------------------------------------------
    def intern_service(self, svc: ObjectKey) -> int:
        """The Service's index (owner values), given one if it has none."""
        new = self._free_services[-1] if self._free_services else len(self.services)
        idx = self.service_index.setdefault(svc, new)  # one hash of the key
        if idx == new:
            if self._free_services:
                self._free_services.pop()
                self.services[idx] = svc
            else:
                self.services.append(svc)
        return idx
