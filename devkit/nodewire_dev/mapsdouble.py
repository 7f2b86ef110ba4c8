"""A dict-backed double of the service and backend BPF maps, for testing the planner and writer
without root.

It keeps what the kernel's hash maps do with batches (BPF_MAP_UPDATE_BATCH / DELETE_BATCH as
agent/datapath/maps.py RawMap issues them): elements are applied in order; a new key past
max_entries stops the batch with E2BIG, the elements before it staying written (RawMap raises
MapFull); a missing key stops a delete batch with ENOENT, after which RawMap deletes the rest one by
one. Every element applied is reported to `on_change`, so a test can check what a concurrent reader
could have seen between any two kernel operations, and `states` keeps the maps after each syscall.

The dtypes are the codec's (agent/datapath/codec.py LAYOUTS); a root test (tests/test_writer.py)
checks they equal the ones BCC derives, so the C stays the one source.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from agent.datapath.codec import BACKEND_KEY, BACKEND_VALUE, SERVICE_KEY, SERVICE_VALUE  # noqa: F401 (tests use them)
from agent.datapath.maps import MapFull


class DictMap:
    """One hash map: {key bytes: value bytes}, with the batch protocol of RawMap."""

    def __init__(self, name: str, key_dtype: np.dtype, value_dtype: np.dtype, capacity: int,
                 on_change: Callable[[], None] = lambda: None):
        self.name, self.key_dtype, self.value_dtype, self.capacity = name, key_dtype, value_dtype, capacity
        self.entries: dict[bytes, bytes] = {}
        self.on_change = on_change
        self.syscalls = 0
        self.fail_after: int | None = None  # inject: raise OSError on the syscall after this many

    def _syscall(self) -> None:
        if self.fail_after is not None and self.syscalls >= self.fail_after:
            raise OSError(5, f"{self.name}: injected failure")
        self.syscalls += 1

    def update_arrays(self, keys: np.ndarray, values: np.ndarray) -> None:
        if not len(keys):
            return
        self._syscall()
        ks, vs = keys.astype(self.key_dtype).tobytes(), values.astype(self.value_dtype).tobytes()
        ksz, vsz = self.key_dtype.itemsize, self.value_dtype.itemsize
        for i in range(len(keys)):
            k = ks[i * ksz:(i + 1) * ksz]
            if k not in self.entries and len(self.entries) >= self.capacity:
                raise MapFull(f"{self.name}: full ({self.capacity} entries)")
            self.entries[k] = vs[i * vsz:(i + 1) * vsz]
            self.on_change()

    def delete_array(self, keys: np.ndarray) -> None:
        if not len(keys):
            return
        self._syscall()
        ks, ksz = keys.astype(self.key_dtype).tobytes(), self.key_dtype.itemsize
        rest = [ks[i * ksz:(i + 1) * ksz] for i in range(len(keys))]
        for i, k in enumerate(rest):
            if k not in self.entries:  # ENOENT: RawMap then deletes every key of the batch one by one
                for k2 in rest[i + 1:]:
                    self.syscalls += 1
                    if self.entries.pop(k2, None) is not None:
                        self.on_change()
                return
            del self.entries[k]
            self.on_change()

    def lookup(self, key: bytes) -> bytes | None:
        return self.entries.get(key)

    def dump_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        keys = b"".join(self.entries)
        values = b"".join(self.entries.values())
        return np.frombuffer(keys, self.key_dtype).copy(), np.frombuffer(values, self.value_dtype).copy()


class MapsDouble:
    """The service and backend maps together, recording the state after every kernel operation."""

    def __init__(self, services: int = 1 << 16, backends: int = 1 << 16, check: Callable | None = None):
        self.check = check
        self.services = DictMap("nodewire_services_v1", SERVICE_KEY, SERVICE_VALUE, services, self._changed)
        self.backends = DictMap("nodewire_backends_v1", BACKEND_KEY, BACKEND_VALUE, backends, self._changed)
        self.changes = 0

    def _changed(self) -> None:
        self.changes += 1
        if self.check is not None:
            self.check(self)

    # -- reading it back, as the datapath would --------------------------------------------------
    def frontends(self) -> dict[tuple, tuple]:
        """(address, port, proto, scope) → (count, flags, service_id, affinity, backends as
        (address, port, proto) in slot order); raises AssertionError on a dangling header or slot."""
        out = {}
        for (ident, count, flags, sid, aff), bes in self._walk():
            out[ident] = (count, flags, sid, aff, tuple(bes))
        return out

    def dangling(self) -> list[str]:
        """What a reader could trip on now: a header whose count points at a missing slot, a slot
        (within a header's count) pointing at a missing backend."""
        try:
            list(self._walk())
        except AssertionError as e:
            return [str(e)]
        return []

    def _walk(self):
        svc = self.services.entries
        be = self.backends.entries
        ksz = SERVICE_KEY.itemsize
        for k, v in list(svc.items()):
            key = np.frombuffer(k, SERVICE_KEY)[0]
            if key["slot"] != 0:
                continue
            val = np.frombuffer(v, SERVICE_VALUE)[0]
            ident = (key["address"].tobytes(), int(key["port"]), int(key["proto"]), int(key["scope"]))
            bes = []
            for i in range(1, int(val["count"]) + 1):
                sk = np.zeros(1, SERVICE_KEY)
                sk[0] = key
                sk["slot"] = i
                raw = svc.get(sk.tobytes()[:ksz])
                assert raw is not None, f"header {ident} count {int(val['count'])}: slot {i} missing"
                bid = int(np.frombuffer(raw, SERVICE_VALUE)[0]["backend_id"])
                b = be.get(np.array(bid, BACKEND_KEY).tobytes())
                assert b is not None, f"frontend {ident} slot {i}: backend {bid} missing"
                bv = np.frombuffer(b, BACKEND_VALUE)[0]
                bes.append((bv["address"].tobytes(), int(bv["port"]), int(bv["proto"])))
            yield (ident, int(val["count"]), int(val["flags"]), int(val["service_id"]),
                   int(val["affinity_timeout"])), bes
