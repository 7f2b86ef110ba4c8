"""Every row of every pinned map the agent writes or reads, encoded and decoded in one place.

The planner, the writer, the id registry's restore, `nodewire check`, `nodewire services` and the maps
double (devkit) all go through these functions, so a key is spelled once. Addresses are 16 bytes
in every map, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d, bpf/lib/lb.h); ports are __be16.

Layouts: the live maps carry the dtypes BCC derives from the C structs (maps.py, compile.py); LAYOUTS
below writes the same structs out for the maps double and for packing, and tests/test_writer.py
(root) checks that every one equals BCC's, so the C stays the source of each layout.
"""
from __future__ import annotations

import functools
import ipaddress
import socket
from array import array
from typing import NamedTuple

import numpy as np

from . import abi

# -- addresses and ports ------------------------------------------------------------------------
V4MAPPED = b"\0" * 10 + b"\xff\xff"
_PTON4 = functools.partial(socket.inet_pton, socket.AF_INET)


def addr16(ip: str) -> bytes:
    """16-byte map address: IPv6 as is, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d)."""
    return socket.inet_pton(socket.AF_INET6, ip) if ":" in ip else V4MAPPED + _PTON4(ip)


def addr_str(raw: bytes) -> str:
    """A 16-byte map address as text (IPv4-mapped ones as IPv4)."""
    raw = bytes(raw)
    if raw[:12] == V4MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def port_be(port: int) -> int:
    """A port as the integer whose in-memory bytes are network order (for __be16 fields)."""
    return socket.htons(port)


def port_host(be: int) -> int:
    return socket.ntohs(int(be))


def host_port(ip: str, port: int) -> str:
    """"10.0.0.1:80" / "[fd00::1]:80"."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# -- 20-byte identities: a frontend (service key but the slot), a backend (its value but padding) --
KEY = np.dtype([("a", "<u8"), ("b", "<u8"), ("c", "<u4")])  # the same 20 bytes as integers, for hashing
FRONTEND_IDENT = np.dtype({"names": ["address", "port", "proto", "scope"],
                           "formats": ["V16", "<u2", "u1", "u1"], "offsets": [0, 16, 18, 19], "itemsize": 20})
BACKEND_IDENT = np.dtype({"names": ["address", "port", "proto", "flags"],
                          "formats": ["V16", "<u2", "u1", "u1"], "offsets": [0, 16, 18, 19], "itemsize": 20})


def idents(ips, ports, protos, extra=None) -> np.ndarray:
    """20-byte identities (address, port in network order, protocol number, scope/flags) as KEY rows,
    from columns of text addresses, host-order ports and protocol names (C-level loops only)."""
    n = len(ips)
    out = np.zeros(n, FRONTEND_IDENT)
    if not n:
        return out.view(KEY)
    if ":" not in "".join(ips):  # all IPv4: IPv4-mapped IPv6, ::ffff:a.b.c.d
        raw = np.zeros((n, 16), np.uint8)
        raw[:, 10:12] = 0xFF
        raw[:, 12:] = np.frombuffer(b"".join(map(_PTON4, ips)), np.uint8).reshape(n, 4)
    else:
        raw = np.frombuffer(b"".join(map(addr16, ips)), np.uint8).reshape(n, 16)
    out["address"] = raw.view("V16").ravel()
    out["port"] = np.frombuffer(array("H", ports), np.uint16).byteswap()  # __be16: bytes in network order
    kinds = set(protos)
    if len(kinds) == 1:
        out["proto"] = abi.PROTO_NUMBERS[kinds.pop()]
    else:
        out["proto"] = np.fromiter(map(abi.PROTO_NUMBERS.__getitem__, protos), np.uint8, n)
    if extra is not None:
        out["scope"] = np.array(extra, np.uint8)
    return out.view(KEY)


def ident_of(address: bytes, port: int, proto: int) -> np.ndarray:
    """One identity (16-byte address, host-order port, protocol number) as a KEY row array."""
    row = np.zeros(1, FRONTEND_IDENT)
    row["address"], row["port"], row["proto"] = address, port_be(port), proto
    return row.view(KEY)


def as_keys(rows: np.ndarray) -> np.ndarray:
    """FRONTEND_IDENT / BACKEND_IDENT rows (or 20-byte strings) as KEY rows."""
    return np.ascontiguousarray(rows).view(KEY)


def copy_fields(rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The fields of dtype taken by name from rows of a wider struct (a map key or value)."""
    out = np.zeros(len(rows), dtype)
    for name in dtype.names:
        if name in rows.dtype.names:  # the rest (padding) stays zero
            out[name] = rows[name]
    return out


def ident_text(key: bytes) -> tuple[str, int, str]:
    """(ip, port, protocol) of a 20-byte frontend or backend identity."""
    return addr_str(key[:16]), int.from_bytes(key[16:18], "big"), abi.PROTO_NAMES.get(key[18], str(key[18]))


# -- layouts: the C structs (bpf/lib/lb.h, bpf/nodeport.c) ----------------------------------------
def _struct(fields: list[tuple[str, str, int]], size: int) -> np.dtype:
    return np.dtype({"names": [f[0] for f in fields], "formats": [f[1] for f in fields],
                     "offsets": [f[2] for f in fields], "itemsize": size})


SERVICE_KEY = _struct([("address", "V16", 0), ("port", "<u2", 16), ("proto", "u1", 18), ("scope", "u1", 19),
                       ("slot", "<u2", 20), ("pad", "<u2", 22)], 24)                       # lb_service_key
SERVICE_VALUE = _struct([("backend_id", "<u4", 0), ("count", "<u2", 4), ("flags", "<u2", 6),
                         ("service_id", "<u4", 8), ("affinity_timeout", "<u4", 12)], 16)   # lb_service_value
BACKEND_KEY = np.dtype("<u4")
BACKEND_VALUE = _struct([("address", "V16", 0), ("port", "<u2", 16), ("proto", "u1", 18), ("flags", "u1", 19),
                         ("pad", "<u4", 20)], 24)                                           # lb_backend
NP_FRONTEND = _struct([("address", "V16", 0), ("port", "<u2", 16), ("proto", "u1", 18), ("pad", "u1", 19)], 20)
NP_POLICY = _struct([("group", "<u4", 0), ("flags", "<u4", 4)], 8)
NP_ADDR = _struct([("address", "V16", 0)], 16)
NP_RANGE_KEY = _struct([("prefixlen", "<u4", 0), ("group", "<u4", 4), ("address", "V16", 8)], 24)
U8, U32, I32 = np.dtype("u1"), np.dtype("<u4"), np.dtype("<i4")

# the maps the agent writes: name → (key, value); the Maglev map's value is an inner map (an fd in, an id out)
LAYOUTS: dict[str, tuple[np.dtype, np.dtype]] = {
    abi.SERVICES_MAP: (SERVICE_KEY, SERVICE_VALUE), abi.BACKENDS_MAP: (BACKEND_KEY, BACKEND_VALUE),
    abi.NP_SERVICES_MAP: (SERVICE_KEY, SERVICE_VALUE), abi.NP_BACKENDS_MAP: (BACKEND_KEY, BACKEND_VALUE),
    abi.NP_POLICY_MAP: (NP_FRONTEND, NP_POLICY), abi.NP_LOCAL_MAP: (NP_ADDR, U8),
    abi.NP_RANGES_MAP: (NP_RANGE_KEY, U8), abi.NP_MAGLEV_MAP: (U32, I32), abi.NP_SNAT_MAP: (U32, NP_ADDR),
}


# -- service and backend maps (lb.h: slot 0 header, slots 1..count, backends by id) ---------------
def service_keys(key_dtype: np.dtype, ident: np.ndarray, slot) -> np.ndarray:
    """lb_service_key rows for frontends (KEY rows) at slots (an array, or one number for all)."""
    keys = np.zeros(len(ident), key_dtype)
    fid = ident.view(FRONTEND_IDENT)
    for name in FRONTEND_IDENT.names:
        keys[name] = fid[name]
    keys["slot"] = slot
    return keys


def header_values(value_dtype: np.dtype, count, flags, service_id, affinity) -> np.ndarray:
    """lb_service_value rows of slot 0."""
    values = np.zeros(len(count), value_dtype)
    values["count"], values["flags"], values["service_id"], values["affinity_timeout"] = (
        count, flags, service_id, affinity)
    return values


def slot_values(value_dtype: np.dtype, backend_id: np.ndarray) -> np.ndarray:
    values = np.zeros(len(backend_id), value_dtype)
    values["backend_id"] = backend_id
    return values


def backend_values(value_dtype: np.dtype, ident: np.ndarray) -> np.ndarray:
    """lb_backend rows from backend identities (KEY rows)."""
    values = np.zeros(len(ident), value_dtype)
    bid = ident.view(BACKEND_IDENT)
    for name in BACKEND_IDENT.names:
        values[name] = bid[name]
    return values


class ServiceRows(NamedTuple):
    """A service map dump, decoded: per row its frontend identity and slot, and the value's fields."""
    ident: np.ndarray      # KEY rows
    slot: np.ndarray
    count: np.ndarray
    flags: np.ndarray
    service_id: np.ndarray
    affinity: np.ndarray
    backend_id: np.ndarray


def decode_services(keys: np.ndarray, values: np.ndarray) -> ServiceRows:
    return ServiceRows(as_keys(copy_fields(keys, FRONTEND_IDENT)), keys["slot"], values["count"], values["flags"],
                       values["service_id"], values["affinity_timeout"], values["backend_id"])


def decode_backends(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(backend ids, identities as KEY rows) of a backend map dump."""
    return np.asarray(keys, np.uint32).reshape(-1), as_keys(copy_fields(values, BACKEND_IDENT))


def split_ident(ident: np.ndarray) -> tuple[list[bytes], list[int], list[int]]:
    """KEY rows as (16-byte addresses, host-order ports, protocol numbers) lists."""
    f = ident.view(FRONTEND_IDENT)
    return f["address"].tolist(), [port_host(p) for p in f["port"].tolist()], f["proto"].tolist()


# -- north-south side maps (bpf/nodeport.c) ------------------------------------------------------
def np_frontend_keys(ident: np.ndarray) -> np.ndarray:
    """np_frontend rows (policy map keys) of frontend identities (KEY rows)."""
    return copy_fields(ident.view(FRONTEND_IDENT), NP_FRONTEND)


def policy_values(group, flags) -> np.ndarray:
    values = np.zeros(len(group), NP_POLICY)
    values["group"], values["flags"] = group, flags
    return values


def range_key(group: int, cidr: str) -> bytes:
    """np_range_key of one source range: the prefix length covers the group (32 bits, always matched)
    and the source prefix within the 128-bit address (IPv4 after the 96-bit mapped prefix)."""
    net = ipaddress.ip_network(cidr, strict=False)
    row = np.zeros(1, NP_RANGE_KEY)
    row["prefixlen"] = 32 + net.prefixlen + (96 if net.version == 4 else 0)
    row["group"] = group
    row["address"] = addr16(str(net.network_address))
    return row.tobytes()


def range_text(key: bytes) -> tuple[int, str]:
    """(group, CIDR) of an np_range_key."""
    row = np.frombuffer(key, NP_RANGE_KEY)[0]
    ip, plen = addr_str(row["address"].tobytes()), int(row["prefixlen"]) - 32
    return int(row["group"]), f"{ip}/{plen - 96 if ':' not in ip else plen}"


def addr_keys(ips) -> list[bytes]:
    """np_addr rows (the local-endpoint set, SNAT addresses) as bytes."""
    return [addr16(ip) for ip in ips]


def u32(n: int) -> bytes:
    """A __u32 key or value (group ids, array indexes, inner map ids)."""
    return int(n).to_bytes(4, "little")


# -- generic rows (small maps: observers, stale sockets, tests) ---------------------------------
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
