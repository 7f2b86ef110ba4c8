"""Id tables: 20-byte identities ↔ small integer ids, compact and vectorised (used by ids.IdRegistry).

KeyIndex maps keys to ids from 1 (0 is "none"), lowest free id first; BackendTable adds refcounts,
FrontendTable what the kernel holds per frontend (its slot-0 header and slot list). Identities are
fixed-size 20-byte keys (codec.KEY) in one numpy array indexed by id, found through a sorted array of
their 64-bit hashes: no dict and no Python object per backend (100k Services × 5 endpoints).
"""
from __future__ import annotations

import numpy as np

from .codec import KEY

NO_SLOT = 0             # in a frontend's slot list: the kernel holds no entry at this slot
INVALID = 0xFFFFFFFF    # … holds one pointing at a backend id the backend map does not have
SLOT_DTYPE = np.dtype("<u4")


_M64 = (1 << 64) - 1


def key_hash_one(k: bytes) -> int:
    """key_hash of one 20-byte key with Python ints: the same 64-bit value, without ~10 numpy calls."""
    a, b, c = int.from_bytes(k[:8], "little"), int.from_bytes(k[8:16], "little"), int.from_bytes(k[16:], "little")
    h = (a * 0x9E3779B97F4A7C15) & _M64
    h ^= (b * 0xC2B2AE3D27D4EB4F) & _M64
    h ^= (c * 0x165667B19E3779F9) & _M64
    h ^= h >> 31
    h = (h * 0xBF58476D1CE4E5B9) & _M64
    return h ^ (h >> 29)


def key_hash(keys: np.ndarray) -> np.ndarray:
    """64-bit mix of each key (multiply-xorshift, as in splitmix64); equal keys, equal hashes."""
    if len(keys) <= 8:  # a few keys (one change): scalar, the same values
        raw, w = keys.tobytes(), keys.dtype.itemsize
        return np.array([key_hash_one(raw[i:i + w]) for i in range(0, len(raw), w)], np.uint64)
    with np.errstate(over="ignore"):
        h = keys["a"] * np.uint64(0x9E3779B97F4A7C15)
        h ^= keys["b"] * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= keys["c"].astype(np.uint64) * np.uint64(0x165667B19E3779F9)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return h


def be_live(table: "KeyIndex", ids: np.ndarray) -> np.ndarray:
    inside = ids < len(table.live)
    return inside & table.live[np.where(inside, ids, 0)]


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
            self._free = self._unfree(ids)
        keys = keys.view(KEY) if keys.dtype != KEY else keys
        self.count += len(ids)
        if len(ids) == 1:  # one change: scalar steps (each numpy call on an array costs µs)
            i = int(ids[0])
            self.keys[i], self.live[i] = keys[0], True
            h = key_hash(keys[:1])
        else:
            self.keys[ids] = keys
            self.live[ids] = True
            h = key_hash(self.keys[ids])
            order = np.argsort(h, kind="stable")
            h, ids = h[order], ids[order]
        at = np.searchsorted(self._oh, h)
        self._oh = np.insert(self._oh, at, h)
        self._ohid = np.insert(self._ohid, at, ids)
        if len(self._oh) > self.MERGE_AT:
            self._merge()

    def _unfree(self, ids: np.ndarray) -> np.ndarray:
        """The free stack without ids; ids reserve() gave are its top: a slice, no set operation."""
        f, n = self._free, len(ids)
        if n <= len(f) and (f[len(f) - n:][::-1] == ids).all() and (n == len(f) or f[-n - 1] > f[-n]):
            return f[:len(f) - n]
        return f[~np.isin(f, ids)]

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
        ids = np.unique(np.asarray(ids, np.uint32)) if len(ids) > 1 else np.asarray(ids, np.uint32)
        h = key_hash(self.keys[ids])
        if len(ids) <= 16:  # a few: one comparison matrix, not two set operations
            eq = ids[:, None] == self._ohid[None, :]
            in_overlay, keep = eq.any(1), ~eq.any(0)
        else:
            in_overlay = np.isin(ids, self._ohid)
            keep = ~np.isin(self._ohid, ids)
        if in_overlay.any():
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
        asc = self._free[::-1]  # descending: smallest on top; ids go in at their places
        self._free = np.insert(asc, np.searchsorted(asc, ids), ids)[::-1].copy()
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
        elif len(ids) > 8:
            np.add.at(self.refs, ids, delta)
        else:  # a few (one change): item by item beats a ufunc.at call
            for i in ids.tolist():
                self.refs[i] += delta


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
        if not len(ids):
            return
        super().remove(ids)
        self.owner[ids] = -1
        self.has_header[ids] = False
        self.header_count[ids] = 0
        for i in ids.tolist():
            self.slots[i] = b""
            self.port_name[i] = ""

    def slot_ids(self, sid: int) -> np.ndarray:
        return np.frombuffer(self.slots[sid], SLOT_DTYPE)
