"""Raw, batched access to BPF hash maps, with layouts taken from BCC's ctypes of the C structs.

Entries travel as bytes (a key's exact bytes → a value's exact bytes) so that the reconciler can diff
hundreds of thousands of entries with plain dict operations, and pack them with numpy in one pass.
The numpy dtypes are derived from BCC's generated ctypes classes (table.Key / table.Leaf): the C
header stays the only source of truth for every layout.
"""
from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import os
import socket

import numpy as np

try:  # BCC comes from Debian's python3-bpfcc, not PyPI
    from bcc.libbcc import lib
except ImportError:  # pragma: no cover - only the pure parts of the package work without BCC
    lib = None


def packing_dtype(ctype) -> np.dtype:
    """The numpy dtype of a ctypes struct, with array fields (addresses) as opaque byte strings,
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


def pack_rows(dtype: np.dtype, rows: list[tuple]) -> list[bytes]:
    """Rows of field values (in the struct's field order; unlisted trailing fields are zero) → bytes."""
    if not rows:
        return []
    if dtype.names is None:
        buf = np.array(rows, dtype=dtype).tobytes()
    else:
        n = len(dtype.names)
        full = [r + (0,) * (n - len(r)) if len(r) < n else r for r in rows]
        buf = np.array(full, dtype=dtype).tobytes()
    size = dtype.itemsize
    return [buf[i:i + size] for i in range(0, len(buf), size)]


def unpack_rows(dtype: np.dtype, raw: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(raw), dtype=dtype) if raw else np.zeros(0, dtype=dtype)


_V4MAPPED = b"\0" * 10 + b"\xff\xff"


def addr16(ip: str) -> bytes:
    """16-byte map address: IPv6 as is, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d)."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip)
    return _V4MAPPED + socket.inet_pton(socket.AF_INET, ip)


def addr_str(raw: bytes) -> str:
    a = ipaddress.IPv6Address(bytes(raw))
    return str(a.ipv4_mapped) if a.ipv4_mapped else str(a)


def port_be(port: int) -> int:
    """A port as the integer whose in-memory bytes are network order (for __be16 fields)."""
    return socket.htons(port)


def port_host(be: int) -> int:
    return socket.ntohs(int(be))


def lookup_batch_raw(fd: int, key_size: int, value_size: int, name: str, chunk: int = 16384) -> tuple[bytes, bytes]:
    """All keys and values of a hash map as two byte strings, read with BPF_MAP_LOOKUP_BATCH.
    value_size is per element as the kernel returns it (for per-CPU maps: rounded size × CPUs)."""
    keys = ct.create_string_buffer(key_size * chunk)
    values = ct.create_string_buffer(value_size * chunk)
    kparts, vparts = [], []
    in_batch, out_batch = ct.c_uint32(0), ct.c_uint32(0)
    first = True
    while True:
        count = ct.c_uint32(chunk)
        res = lib.bpf_lookup_batch(fd, None if first else ct.byref(in_batch), ct.byref(out_batch),
                                   keys, values, ct.byref(count))
        err = ct.get_errno()
        if res != 0 and err != errno.ENOENT:
            raise OSError(err, f"{name}: BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        kparts.append(keys.raw[:count.value * key_size])
        vparts.append(values.raw[:count.value * value_size])
        if res != 0:  # ENOENT: that was the last batch
            return b"".join(kparts), b"".join(vparts)
        in_batch.value = out_batch.value
        first = False


class MapFull(Exception):
    pass


class RawMap:
    """Batched byte-level operations on one BPF hash map (by fd)."""

    def __init__(self, table, name: str):
        self.table = table
        self.name = name
        self.fd = table.map_fd
        self.key_dtype = packing_dtype(table.Key)
        self.value_dtype = packing_dtype(table.Leaf)
        self.key_size = ct.sizeof(table.Key)
        self.value_size = ct.sizeof(table.Leaf)
        self.capacity = table.max_entries

    def dump_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every entry as (keys, values) numpy arrays, read with BPF_MAP_LOOKUP_BATCH."""
        kraw, vraw = lookup_batch_raw(self.fd, self.key_size, self.value_size, self.name)
        return np.frombuffer(kraw, dtype=self.key_dtype), np.frombuffer(vraw, dtype=self.value_dtype)

    def dump(self) -> dict[bytes, bytes]:
        """Every entry as {key bytes: value bytes} (for inspection and tests; small maps)."""
        k, v = self.dump_arrays()
        ks, vs = self.key_size, self.value_size
        kb, vb = k.tobytes(), v.tobytes()
        return {kb[i * ks:(i + 1) * ks]: vb[i * vs:(i + 1) * vs] for i in range(len(k))}

    def update_arrays(self, keys: np.ndarray, values: np.ndarray) -> None:
        if len(keys):
            self._update(keys.tobytes(), values.tobytes(), len(keys))

    def delete_array(self, keys: np.ndarray) -> None:
        if len(keys):
            self._delete(keys.tobytes(), len(keys))

    def update(self, items: list[tuple[bytes, bytes]]) -> None:
        if items:
            self._update(b"".join(k for k, _ in items), b"".join(v for _, v in items), len(items))

    def delete(self, keys: list[bytes]) -> None:
        if keys:
            self._delete(b"".join(keys), len(keys))

    def _update(self, keys: bytes, values: bytes, n: int) -> None:
        count = ct.c_uint32(n)
        res = lib.bpf_update_batch(self.fd, keys, values, ct.byref(count))
        if res != 0:
            err = ct.get_errno()
            if err in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                raise MapFull(f"{self.name}: full ({self.capacity} entries)")
            raise OSError(err, f"{self.name}: BPF_MAP_UPDATE_BATCH: {os.strerror(err)}")

    def _delete(self, keys: bytes, n: int) -> None:
        count = ct.c_uint32(n)
        res = lib.bpf_delete_batch(self.fd, keys, ct.byref(count))
        if res != 0:
            err = ct.get_errno()
            if err != errno.ENOENT:
                raise OSError(err, f"{self.name}: BPF_MAP_DELETE_BATCH: {os.strerror(err)}")
            # a key was already gone: delete the rest one by one
            ks = self.key_size
            for i in range(n):
                lib.bpf_delete_elem(self.fd, ct.create_string_buffer(keys[i * ks:(i + 1) * ks], ks))
