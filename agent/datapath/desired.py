"""The desired state as columns: the requested Services' frontends and backends flattened into numpy
arrays of 20-byte identities once (codec.idents), so the planner works by vector steps, not a Python
statement per backend (at 100k Services × 5 endpoints that is most of a sync's Python time).
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import numpy as np

from ..model.frontends import Backend, Frontend
from ..model.objects import ObjectKey
from .abi import SVC_F_AFFINITY
from .codec import idents
from .keyindex import key_hash


def frontend_flags(col: dict[str, tuple]) -> np.ndarray:
    """The slot-0 flags of each frontend (NW_SVC_F_* in bpf/lib/lb.h) from the Frontend columns:
    the one place new flags go."""
    affinity = np.array(col["affinity_timeout"], np.uint32)
    return np.where(affinity > 0, SVC_F_AFFINITY, 0).astype(np.uint16)


@dataclass
class Desired:
    """The requested Services as columns: Service s has frontends fe_start[s]:fe_start[s+1], frontend
    f has backends be_start[f]:be_start[f+1]."""
    services: list[ObjectKey]
    fe_start: np.ndarray
    fe_keys: np.ndarray
    fe_count: np.ndarray
    fe_flags: np.ndarray
    fe_affinity: np.ndarray
    port_names: list[str]
    be_start: np.ndarray
    be_keys: np.ndarray
    svc_idx: np.ndarray | None = None  # the registry's index of each Service, -1 if it has none

    def add_removals(self, services: list[ObjectKey], idx: np.ndarray) -> None:
        """Append Services with no frontends (removed)."""
        self.services = self.services + services
        self.fe_start = np.concatenate([self.fe_start, np.full(len(services), self.fe_start[-1])])
        self.svc_idx = np.concatenate([self.svc_idx, idx])


def flatten(changes) -> Desired:
    """The requested Services (a dict, or (Service, frontends) pairs) as columns. Per-frontend and
    per-backend work is done by C-level loops (zip, map, chain, bytes.join) and numpy, never by a
    Python statement per backend: at 100k Services × 5 endpoints that is most of a sync's Python time."""
    services, lists = (list(changes), list(changes.values())) if isinstance(changes, dict) else (
        [s for s, _ in changes], [f for _, f in changes])
    for i in np.nonzero(np.fromiter(map(len, lists), np.int64, len(lists)) > 1)[0].tolist():
        # one entry per frontend: the last one listed wins
        lists[i] = list({(f.ip, f.port, f.protocol, getattr(f, "scope", 0)): f for f in lists[i]}.values())
    per_svc = np.fromiter(map(len, lists), np.int64, len(lists))
    fes = list(itertools.chain.from_iterable(lists))
    col = _columns(fes, Frontend._fields)
    counts = np.fromiter(map(len, col["backends"]), np.uint32, len(fes))
    backends = list(itertools.chain.from_iterable(col["backends"]))
    be = _columns(backends, Backend._fields)
    return Desired(
        services=services, fe_start=run_starts(per_svc),
        fe_keys=idents(col["ip"], col["port"], col["protocol"], col.get("scope")),
        fe_count=counts, fe_flags=frontend_flags(col),
        fe_affinity=np.array(col["affinity_timeout"], np.uint32), port_names=col["port_name"],
        be_start=run_starts(counts), be_keys=idents(be["ip"], be["port"], be["protocol"], None))


def _columns(rows: list, fields: tuple[str, ...]) -> dict[str, list]:
    """NamedTuple rows as one list per field (map with itemgetter: a C loop per field)."""
    return {name: list(map(operator.itemgetter(i), rows)) for i, name in enumerate(fields)}


def run_starts(lengths: np.ndarray) -> np.ndarray:
    """[0, l0, l0+l1, …]: where each run starts in the flat array (and the total at the end)."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def unique_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of each distinct key's first occurrence, and for each key which distinct one it is),
    by hash, checked exactly; two keys sharing a hash (rare) take the exact, slower path."""
    _, first, inverse = np.unique(key_hash(keys), return_index=True, return_inverse=True)
    if (keys[first[inverse]] == keys).all():
        return first, inverse
    seen: dict[bytes, int] = {}
    inverse = np.array([seen.setdefault(k.tobytes(), len(seen)) for k in keys], np.int64)
    _, first = np.unique(inverse, return_index=True)
    return first, inverse
