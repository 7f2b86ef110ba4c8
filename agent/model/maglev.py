"""Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
Balancer", NSDI 2016, section 3.4): a lookup table of M slots, each naming a backend.

Every node builds the same table from the same backends (the permutation depends only on the
backend, hashed with BLAKE2b, never on the node), so a flow hashed to slot i reaches the same
backend whichever node it enters; removing one of N backends moves about 1/N of the slots.

Tables are built in numpy for many Services at once: the fill is sequential per Service, but the
same step of every Service in a batch is one array operation. That still costs ~15 ms per Service
(27 ms in plain Python), so the loop also exists in C (maglev_fill.c, ~0.3 ms per Service), built
with the system compiler on first use and cached; the numpy path is used when there is none.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("nodewire.maglev")
_C_SOURCE = Path(__file__).with_name("maglev_fill.c")

# Cilium's default --bpf-lb-maglev-table-size (a prime; the paper uses 65537).
DEFAULT_TABLE_SIZE = 16381
# Primes Cilium accepts for the table size (its documented list); any other prime works too.
SUGGESTED_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def check_table_size(m: int) -> None:
    if not is_prime(m) or m < 3:
        raise ValueError(f"--maglev-table-size: {m} is not a prime >= 3 (e.g. {', '.join(map(str, SUGGESTED_SIZES))})")
    if m > 1 << 20:
        raise ValueError(f"--maglev-table-size: {m} is larger than {1 << 20}")


def _offset_skip(name: str, m: int) -> tuple[int, int]:
    d = hashlib.blake2b(name.encode(), digest_size=16).digest()
    h1, h2 = int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")
    return h1 % m, h2 % (m - 1) + 1


def build_tables(backend_sets: Sequence[Sequence[str]], m: int = DEFAULT_TABLE_SIZE) -> list[np.ndarray]:
    """One table per backend set: an int32 array of m indexes into sorted(that set) (-1 for an
    empty set). Backends are names (e.g. "10.0.0.1:80/TCP"); the table depends on the set only."""
    out: list[np.ndarray | None] = [None] * len(backend_sets)
    by_size: dict[int, list[int]] = {}
    for i, names in enumerate(backend_sets):
        if not names:
            out[i] = np.full(m, -1, dtype=np.int32)
        else:
            by_size.setdefault(len(names), []).append(i)
    for n, idxs in by_size.items():
        for start in range(0, len(idxs), 4096):  # bounded memory: 4096 x m x 2 bytes per batch
            chunk = idxs[start:start + 4096]
            tables = _fill_any([sorted(backend_sets[i]) for i in chunk], n, m)
            for j, i in enumerate(chunk):
                out[i] = tables[j]
    return out  # type: ignore[return-value]


def build_table(backends: Sequence[str], m: int = DEFAULT_TABLE_SIZE) -> np.ndarray:
    return build_tables([backends], m)[0]


def _offsets_skips(sets: list[list[str]], n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    offset = np.empty((len(sets), n), dtype=np.int64)
    skip = np.empty((len(sets), n), dtype=np.int64)
    for i, names in enumerate(sets):
        for j, name in enumerate(names):
            offset[i, j], skip[i, j] = _offset_skip(name, m)
    return offset, skip


_lib: ctypes.CDLL | None | bool = None


def _c_fill():
    """The compiled fill function, or None (no compiler, or it failed: logged once)."""
    global _lib
    if _lib is None:
        _lib = False
        cc = shutil.which("cc") or shutil.which("gcc")
        cache = Path(os.environ.get("XDG_CACHE_HOME", "/var/cache")) / "nodewire"
        so = cache / f"maglev_fill-{int(_C_SOURCE.stat().st_mtime)}.so"
        try:
            if not so.exists() and cc:
                cache.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
                    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp.name, str(_C_SOURCE)],
                                   check=True, capture_output=True, timeout=60)
                os.replace(tmp.name, so)
            if so.exists():
                _lib = ctypes.CDLL(str(so))
                _lib.maglev_fill.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("maglev: no compiled fill (%s); using numpy", e)
            _lib = False
    return _lib.maglev_fill if _lib else None


def _fill_any(sets: list[list[str]], n: int, m: int) -> np.ndarray:
    fill = _c_fill()
    if fill is None:
        return _fill(sets, n, m)
    offset, skip = _offsets_skips(sets, n, m)
    entry = np.empty((len(sets), m), dtype=np.int32)
    if fill(len(sets), n, m, offset.ctypes.data, skip.ctypes.data, entry.ctypes.data) != 0:
        raise MemoryError("maglev_fill: out of memory")
    return entry


def _fill(sets: list[list[str]], n: int, m: int) -> np.ndarray:
    """The paper's population loop (its Pseudocode 1) for len(sets) Services of n backends each.

    With the same n, every Service fills one slot per step and all finish after m steps, so each
    step is one array operation over the batch. A backend whose preferred slot is taken looks at
    its next candidates at once; for the last TAIL slots, where probing would take ~m/free tries,
    the next free slot of a backend is found exactly from each free slot's position in that
    backend's permutation (m is prime, so position = (slot - offset) * skip^-1 mod m)."""
    s = len(sets)
    offset, skip = _offsets_skips(sets, n, m)
    nxt = np.zeros((s, n), dtype=np.int64)
    entry = np.full(s * m, -1, dtype=np.int16 if n < 32767 else np.int32)
    base = np.arange(s, dtype=np.int64) * m
    tail = min(TAIL, m)
    for step in range(m - tail):
        j = step % n
        off, sk, nx = offset[:, j], skip[:, j], nxt[:, j]
        c = (off + nx * sk) % m
        busy = np.flatnonzero(entry[base + c] >= 0)
        width = int(min(max(2 * m // (m - step), 16), 256))
        probe = np.arange(1, width + 1, dtype=np.int64)
        while len(busy):
            cand = (off[busy, None] + (nx[busy, None] + probe) * sk[busy, None]) % m
            free = entry[base[busy, None] + cand] < 0
            first = free.argmax(axis=1)
            found = free[np.arange(len(busy)), first]
            hit = busy[found]
            c[hit] = cand[found, first[found]]
            nx[hit] += first[found] + 1
            nx[busy[~found]] += width
            busy = busy[~found]
        entry[base + c] = j
        nx += 1
    entry = entry.reshape(s, m)
    free = np.nonzero(entry < 0)[1].reshape(s, tail)
    inv = np.array([[pow(int(k), m - 2, m) for k in row] for row in skip], dtype=np.int64).reshape(s, n)
    rows = np.arange(s)
    for step in range(m - tail, m):
        j = step % n
        pos = ((free - offset[:, j, None]) * inv[:, j, None]) % m
        pick = (pos - nxt[:, j, None]).argmin(axis=1)  # every free slot lies ahead of nxt
        entry[rows, free[rows, pick]] = j
        nxt[:, j] = pos[rows, pick] + 1
        free[rows, pick] = free[:, -1]
        free = free[:, :-1]
    return entry.astype(np.int32)


TAIL = 128
