"""Raw, batched access to pinned BPF maps, with layouts taken from BCC's ctypes of the C structs.

Entries travel as bytes (a key's exact bytes → a value's exact bytes) or as numpy structured arrays,
so that the reconciler can diff hundreds of thousands of entries with plain dict operations and pack
them in one pass. The numpy dtypes come from BCC's generated ctypes classes (table.Key / table.Leaf)
in the compile child (agent/datapath/compile.py), which passes them here as JSON (dtype_to_json):
the C header stays the only source of every layout, and the agent never imports BCC. The map
itself is opened from its pin with the raw bpf() syscall (bpfsys.py); its kind, sizes and capacity
come from the kernel (BPF_OBJ_GET_INFO_BY_FD) and are checked against the layout.
"""
from __future__ import annotations

import ctypes as ct
import os

import numpy as np

from . import bpfsys
from .codec import addr16, addr_str, pack_rows, port_be, port_host, u32, unpack_rows  # noqa: F401 (the codec's, for readers of small maps)


def packing_dtype(ctype) -> np.dtype:
    """The numpy dtype of a ctypes struct (or of a dtype), with array fields (addresses) as opaque byte strings,
    so rows can be built from tuples like (address_bytes16, port, ...)."""
    base = np.dtype(ctype)
    if base.names is None:  # a scalar key such as __u32
        return base
    names, formats, offsets = [], [], []
    for name in base.names:
        fdt, off = base.fields[name][:2]
        names.append(name)
        formats.append(np.dtype(f"V{fdt.itemsize}") if fdt.subdtype else fdt)
        offsets.append(off)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": base.itemsize})


def dtype_to_json(dt: np.dtype):
    """A dtype as JSON (the compile child's report): a type string, [element, shape] for an array,
    or a struct with offsets."""
    if dt.subdtype is not None:
        return [dtype_to_json(dt.subdtype[0]), list(dt.subdtype[1])]
    if dt.names is None:
        return dt.str
    return {"names": list(dt.names), "formats": [dtype_to_json(dt.fields[n][0]) for n in dt.names],
            "offsets": [dt.fields[n][1] for n in dt.names], "itemsize": dt.itemsize}


def dtype_from_json(js) -> np.dtype:
    if isinstance(js, str):
        return np.dtype(js)
    if isinstance(js, list):
        return np.dtype((dtype_from_json(js[0]), tuple(js[1])))
    return np.dtype({"names": js["names"], "formats": [dtype_from_json(f) for f in js["formats"]],
                     "offsets": js["offsets"], "itemsize": js["itemsize"]})


class MapFull(Exception):
    pass


class RawMap:
    """Batched byte-level operations on one BPF map (by fd), in its C layout.

    For a per-CPU map every value is `ncpu` slots of `value_stride` bytes (the C value rounded up to
    8): dump_arrays() gives values shaped (n, ncpu), update_arrays() takes the same (or (n,), then
    every CPU's slot is set to that value), dump_summed() adds the CPUs up field by field.
    """

    def __init__(self, fd: int, name: str, key_layout: np.dtype, value_layout: np.dtype):
        """key_layout / value_layout: the C structs as numpy dtypes (arrays as subarrays; for a
        per-CPU map, one CPU's value). key_dtype / value_dtype pack array fields as opaque bytes."""
        info = bpfsys.map_info(fd, name)
        self.fd, self.name = fd, name
        self.map_type = info.type
        self.capacity = info.max_entries
        self.percpu = info.type in bpfsys.PERCPU_MAP_TYPES
        self.value_layout = value_layout
        self.key_dtype, self.value_dtype = packing_dtype(key_layout), packing_dtype(value_layout)
        self.key_size = self.key_dtype.itemsize
        self.value_size = self.value_dtype.itemsize  # one CPU's value, as the C declares it
        if (info.key_size, info.value_size) != (self.key_size, self.value_size):
            raise ValueError(f"{name}: the pinned map has key/value sizes {info.key_size}/{info.value_size}, "
                             f"the program's layout {self.key_size}/{self.value_size}: a layout change needs "
                             f"a new map version (run `nodewire cleanup` to drop the old maps)")
        self.batch = info.type not in NO_BATCH_MAP_TYPES
        self.ncpu = bpfsys.possible_cpus() if self.percpu else 1
        self.value_stride = (self.value_size + 7) // 8 * 8 if self.percpu else self.value_size
        self._slot_dtype = _padded(self.value_dtype, self.value_stride) if self.percpu else self.value_dtype

    @classmethod
    def open_pinned(cls, path: str, key_layout: np.dtype, value_layout: np.dtype, name: str | None = None) -> "RawMap":
        fd = bpfsys.obj_get(path)
        try:
            return cls(fd, name or os.path.basename(path), key_layout, value_layout)
        except Exception:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def elem_size(self) -> int:
        """Bytes per value as the kernel exchanges it (all CPUs for a per-CPU map)."""
        return self.value_stride * self.ncpu

    def dump_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every entry as (keys, values) numpy arrays, read with BPF_MAP_LOOKUP_BATCH."""
        kraw, vraw = bpfsys.lookup_batch(self.fd, self.key_size, self.elem_size, self.name,
                                         chunk=4096 if self.percpu else 16384)
        keys = np.frombuffer(kraw, dtype=self.key_dtype)
        if not self.percpu:
            return keys, np.frombuffer(vraw, dtype=self.value_dtype)
        slots = np.frombuffer(vraw, dtype=self._slot_dtype).reshape(len(keys), self.ncpu)
        return keys, (slots["v"] if self.value_dtype.names is None else slots)

    def dump_summed(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values in value_layout, arrays included) with every field summed over the CPUs of
        a per-CPU map; a plain map's values as they are."""
        keys, values = self.dump_arrays()
        layout = self.value_layout
        if not self.percpu:
            return keys, values.view(layout)
        if layout.names is None:
            return keys, values.sum(axis=1, dtype=layout)
        natural = values.view(_padded(layout, self.value_stride))
        out = np.zeros(len(keys), dtype=layout)
        for f in layout.names:
            out[f] = natural[f].sum(axis=1)
        return keys, out

    def dump(self) -> dict[bytes, bytes]:
        """Every entry as {key bytes: value bytes} (for inspection and tests; small maps)."""
        k, v = self.dump_arrays()
        ks, vs = self.key_size, self.elem_size
        kb, vb = k.tobytes(), v.tobytes()
        return {kb[i * ks:(i + 1) * ks]: vb[i * vs:(i + 1) * vs] for i in range(len(k))}

    def lookup(self, key: bytes) -> bytes | None:
        return bpfsys.lookup_elem(self.fd, key, self.elem_size, self.name)

    def keys(self):
        """Every key (BPF_MAP_GET_NEXT_KEY): for map kinds without batch operations."""
        k = bpfsys.next_key(self.fd, None, self.key_size, self.name)
        while k is not None:
            yield k
            k = bpfsys.next_key(self.fd, k, self.key_size, self.name)

    def update_arrays(self, keys: np.ndarray, values: np.ndarray) -> None:
        if len(keys):
            self._update(keys.tobytes(), self._values_bytes(values), len(keys))

    def _values_bytes(self, values: np.ndarray) -> bytes:
        if not self.percpu:
            return np.ascontiguousarray(values, dtype=self.value_dtype).tobytes()
        v = np.asarray(values, dtype=self.value_dtype)
        if v.ndim == 1:  # one value for every CPU
            v = np.repeat(v[:, None], self.ncpu, axis=1)
        slots = np.zeros(v.shape, dtype=self._slot_dtype)
        for f in self.value_dtype.names or ("v",):
            slots[f] = v if self.value_dtype.names is None else v[f]
        return slots.tobytes()

    def delete_array(self, keys: np.ndarray) -> None:
        if len(keys):
            self._delete(keys.tobytes(), len(keys))

    def update(self, items: list[tuple[bytes, bytes]]) -> None:
        """(key bytes, value bytes) pairs; a per-CPU value's bytes are all its CPUs' slots."""
        if items:
            self._update(b"".join(k for k, _ in items), b"".join(v for _, v in items), len(items))

    def delete(self, keys: list[bytes]) -> None:
        if keys:
            self._delete(b"".join(keys), len(keys))

    def _update(self, keys: bytes, values: bytes, n: int) -> None:
        if not self.batch:  # an LPM trie has no batch operations: element by element
            ks, vs = self.key_size, len(values) // n
            for i in range(n):
                bpfsys.update_elem(self.fd, keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs], self.name)
            return
        if bpfsys.update_batch(self.fd, keys, values, n, self.name) < 0:
            raise MapFull(f"{self.name}: full ({self.capacity} entries)")

    def _delete(self, keys: bytes, n: int) -> None:
        if not self.batch or bpfsys.delete_batch(self.fd, keys, n, self.name) < 0:
            # a key was already gone: the kernel stopped there, so delete the rest one by one
            ks = self.key_size
            for i in range(n):
                bpfsys.delete_elem(self.fd, keys[i * ks:(i + 1) * ks], self.name)


NO_BATCH_MAP_TYPES = (11, 12, 13)  # BPF_MAP_TYPE_LPM_TRIE, ARRAY_OF_MAPS, HASH_OF_MAPS
BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY = 0, 2


class _MapCreate(ct.Structure):
    """The head of union bpf_attr for BPF_MAP_CREATE (include/uapi/linux/bpf.h)."""
    _fields_ = [("map_type", ct.c_uint32), ("key_size", ct.c_uint32), ("value_size", ct.c_uint32),
                ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                ("numa_node", ct.c_uint32), ("map_name", ct.c_char * 16)]


class MaglevMap:
    """A hash of arrays (a RawMap): group → a Maglev lookup table of backend ids (bpf/nodeport.c). A
    table is built whole in a new array map and swapped in with one update of the outer map, so a
    packet sees the old table or the new one, never a half-written one."""

    def __init__(self, m: RawMap, table_size: int):
        self.m, self.table_size = m, table_size
        self.fd, self.name, self.capacity = m.fd, m.name, m.capacity
        self.key_dtype, self.value_dtype = m.key_dtype, m.value_dtype

    def keys(self):
        return self.m.keys()

    def delete_array(self, keys: np.ndarray) -> None:
        self.m.delete_array(keys)

    def set_tables(self, groups, tables) -> None:
        for gid, values in zip(np.asarray(groups).tolist(), tables):
            what = f"{self.name}: table of group {gid}"
            attr = _MapCreate(BPF_MAP_TYPE_ARRAY, 4, 4, self.table_size, 0, 0, 0, b"nw_np_maglev")
            fd = bpfsys.bpf(BPF_MAP_CREATE, attr, what)
            try:
                keys = np.arange(len(values), dtype=np.uint32)
                bpfsys.update_batch(fd, keys.tobytes(), np.asarray(values, np.uint32).tobytes(), len(values), what)
                bpfsys.update_elem(self.fd, u32(gid), u32(fd), self.name)
            finally:
                os.close(fd)  # the outer map holds the table now

    def dump_tables(self) -> dict[int, np.ndarray]:
        """group → its table (backend ids); empty for a table that cannot be read."""
        out = {}
        for k in list(self.keys()):
            gid = int(np.frombuffer(k, "<u4")[0])
            out[gid] = np.zeros(0, np.uint32)
            raw = bpfsys.lookup_elem(self.fd, k, 4, self.name)
            if raw is None:
                continue
            map_id = int.from_bytes(raw, "little")  # from user space, a map-in-map value reads as the inner map's id
            try:
                fd = bpfsys.bpf(bpfsys.MAP_GET_FD_BY_ID, bpfsys._ById(id=map_id), f"maglev table {map_id}")
            except OSError:
                continue
            try:
                _, values = bpfsys.lookup_batch(fd, 4, 4, f"maglev table of group {gid}")
            finally:
                os.close(fd)
            out[gid] = np.frombuffer(values, np.uint32)
        return out


def _padded(dt: np.dtype, itemsize: int) -> np.dtype:
    """dt as a struct padded to itemsize (one per-CPU slot); a scalar value becomes field "v"."""
    if dt.names is None:
        return np.dtype({"names": ["v"], "formats": [dt], "offsets": [0], "itemsize": itemsize})
    return np.dtype({"names": list(dt.names), "formats": [dt.fields[n][0] for n in dt.names],
                     "offsets": [dt.fields[n][1] for n in dt.names], "itemsize": itemsize})
