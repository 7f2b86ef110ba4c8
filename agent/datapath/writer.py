"""The writer: executes a WritePlan against the service and backend maps, phase by phase, in the
plan's order (bpf/lib/lb.h: new backends → slots → headers; removed headers → removed slots →
unreferenced backends), so a concurrent connect never follows a header to a missing slot or a slot
to a missing backend.

The maps are anything with the small protocol below (agent/datapath/maps.py RawMap in the agent, a
dict-backed double in tests). Rows are packed by field name into the map's own dtypes, which RawMap
derives from BCC's ctypes of the C structs: the C header stays the one source of every layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .ids import BACKEND_IDENT, FRONTEND_IDENT
from .plan import Phase, WritePlan

CHUNK = 65536  # rows per batch syscall: bounds the packed buffers of a full sync


class BatchMap(Protocol):
    name: str
    capacity: int
    key_dtype: np.dtype
    value_dtype: np.dtype

    def update_arrays(self, keys: np.ndarray, values: np.ndarray) -> None: ...
    def delete_array(self, keys: np.ndarray) -> None: ...
    def dump_arrays(self) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class LBMaps:
    """The two maps the load balancer's user space writes."""
    services: BatchMap
    backends: BatchMap


def service_keys(m: BatchMap, ident: np.ndarray, slot: np.ndarray) -> np.ndarray:
    keys = np.zeros(len(ident), m.key_dtype)
    fid = ident.view(FRONTEND_IDENT)
    for name in FRONTEND_IDENT.names:
        keys[name] = fid[name]
    keys["slot"] = slot
    return keys


def _rows(m: BatchMap, phase: Phase, lo: int, hi: int):
    r = {k: v[lo:hi] for k, v in phase.rows.items()}
    n = hi - lo
    if phase.map == "backends":
        keys = r["id"].astype(m.key_dtype)
        if phase.op == "delete":
            return keys, None
        values = np.zeros(n, m.value_dtype)
        bid = r["ident"].view(BACKEND_IDENT)
        for name in BACKEND_IDENT.names:
            values[name] = bid[name]
        return keys, values
    if phase.op == "delete":
        slot = r["slot"] if "slot" in r else np.zeros(n, np.uint16)
        return service_keys(m, r["ident"], slot), None
    values = np.zeros(n, m.value_dtype)
    if "backend_id" in r:  # slots 1..count
        return service_keys(m, r["ident"], r["slot"]), _set(values, backend_id=r["backend_id"])
    return service_keys(m, r["ident"], np.zeros(n, np.uint16)), _set(
        values, count=r["count"], flags=r["flags"], service_id=r["service_id"], affinity_timeout=r["affinity"])


def _set(values: np.ndarray, **fields) -> np.ndarray:
    for name, v in fields.items():
        values[name] = v
    return values


def write(p: WritePlan, maps: LBMaps, chunk: int = CHUNK) -> None:
    """Every phase of p, in order, in batches of `chunk` rows. Raises what the maps raise; the caller
    then commits nothing (the registry is re-read from the maps)."""
    for phase in p.phases():
        m = getattr(maps, phase.map)
        for lo in range(0, len(phase), chunk):
            keys, values = _rows(m, phase, lo, min(lo + chunk, len(phase)))
            if phase.op == "update":
                m.update_arrays(keys, values)
            else:
                m.delete_array(keys)
