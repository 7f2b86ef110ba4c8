"""The writer: executes a plan's phases, in the plan's order, against the maps, every row encoded by
the codec. The order is the plan's (bpf/lib/lb.h): a concurrent reader never follows a header to a
missing slot, a slot to a missing backend, nor meets a north-south frontend without its policy,
source ranges and Maglev table (plan.DatapathPlan).

The maps are anything with the small protocol below (agent/datapath/maps.py RawMap in the agent, the
dict-backed double of devkit in tests), by name.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Protocol

import numpy as np

from . import codec
from .plan import Phase

CHUNK = 65536  # rows per batch syscall: bounds the packed buffers of a full sync


class BatchMap(Protocol):
    name: str
    capacity: int
    key_dtype: np.dtype
    value_dtype: np.dtype

    def update_arrays(self, keys: np.ndarray, values: np.ndarray) -> None: ...
    def delete_array(self, keys: np.ndarray) -> None: ...
    def dump_arrays(self) -> tuple[np.ndarray, np.ndarray]: ...


def encode(m: BatchMap, phase: Phase, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows lo:hi of a phase as the map's (keys, values); values None for a delete."""
    r = {k: v[lo:hi] for k, v in phase.rows.items()}
    kind = phase.kind
    if kind == "backend":
        return r["id"].astype(m.key_dtype), codec.backend_values(m.value_dtype, r["ident"])
    if kind == "backend-id":
        return r["id"].astype(m.key_dtype), None
    if kind == "slot":
        return (codec.service_keys(m.key_dtype, r["ident"], r["slot"]),
                codec.slot_values(m.value_dtype, r["backend_id"]))
    if kind == "header":
        return (codec.service_keys(m.key_dtype, r["ident"], 0),
                codec.header_values(m.value_dtype, r["count"], r["flags"], r["service_id"], r["affinity"]))
    if kind == "frontend":
        return codec.service_keys(m.key_dtype, r["ident"], r.get("slot", 0)), None
    return r["keys"], r.get("values")


def write(phases: Iterable[Phase], maps: Mapping[str, BatchMap], chunk: int = CHUNK) -> None:
    """Every phase, in order, in batches of `chunk` rows. Raises what the maps raise; the caller then
    commits nothing (the registries are re-read from the maps)."""
    for phase in phases:
        m = maps[phase.map]
        if phase.op == "tables":
            m.set_tables(phase.rows["group"], phase.rows["table"])
        for lo in range(0, len(phase) if phase.op != "tables" else 0, chunk):
            keys, values = encode(m, phase, lo, min(lo + chunk, len(phase)))
            if phase.op == "update":
                m.update_arrays(keys, values)
            else:
                m.delete_array(keys)
