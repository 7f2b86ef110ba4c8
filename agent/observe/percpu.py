"""Per-CPU BPF hash maps read and written in batches, with layouts from BCC's ctypes of the C structs.

The kernel hands a per-CPU value as one copy per possible CPU, each rounded up to 8 bytes. The
value's numpy dtype is derived from the map's Leaf class (the C struct), padded to that size, so a
field is read by name (`slots`, `sum`, `packets`) and summed over CPUs here — no offsets by hand.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os

import numpy as np

from ..datapath.maps import MapFull, lookup_batch_raw, packing_dtype


def possible_cpus() -> int:
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def leaf_dtype(leaf) -> np.dtype:
    """The C value's dtype, padded to the 8-byte multiple the kernel uses per CPU."""
    base = np.dtype(leaf)
    elem = (base.itemsize + 7) // 8 * 8
    if base.names is None:
        return np.dtype({"names": ["value"], "formats": [base], "offsets": [0], "itemsize": elem})
    return np.dtype({"names": list(base.names), "formats": [base.fields[n][0] for n in base.names],
                     "offsets": [base.fields[n][1] for n in base.names], "itemsize": elem})


class PercpuMap:
    """One per-CPU hash (or LRU per-CPU hash) map of a BCC module."""

    def __init__(self, table, name: str):
        self.table, self.name = table, name
        self.fd = table.map_fd
        self.ncpu = possible_cpus()
        self.key_dtype = packing_dtype(table.Key)
        self.value_dtype = leaf_dtype(getattr(table, "sLeaf", table.Leaf))
        self.key_size = ct.sizeof(table.Key)
        self.capacity = table.max_entries

    def read(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(keys, {value field: values summed over CPUs}) of every entry, in one batched read."""
        kraw, vraw = lookup_batch_raw(self.fd, self.key_size, self.value_dtype.itemsize * self.ncpu,
                                      self.name, chunk=4096)
        keys = np.frombuffer(kraw, dtype=self.key_dtype)
        vals = np.frombuffer(vraw, dtype=self.value_dtype).reshape(len(keys), self.ncpu)
        return keys, {f: vals[f].sum(axis=1, dtype=np.uint64) for f in self.value_dtype.names}

    def create_zeroed(self, keys: list[bytes]) -> None:
        """Entries with an all-zero value on every CPU (BPF_MAP_UPDATE_BATCH)."""
        from bcc.libbcc import lib

        if not keys:
            return
        count = ct.c_uint32(len(keys))
        zero = bytes(self.value_dtype.itemsize * self.ncpu * len(keys))
        if lib.bpf_update_batch(self.fd, b"".join(keys), zero, ct.byref(count)) != 0:
            err = ct.get_errno()
            if err in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                raise MapFull(f"{self.name}: full ({self.capacity} entries)")
            raise OSError(err, f"{self.name}: BPF_MAP_UPDATE_BATCH: {os.strerror(err)}")

    def delete(self, keys: list[bytes]) -> None:
        from bcc.libbcc import lib

        for k in keys:  # per key: some may be gone already (LRU eviction), which is fine
            lib.bpf_delete_elem(self.fd, ct.create_string_buffer(k, self.key_size))
