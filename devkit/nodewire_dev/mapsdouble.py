"""A dict-backed double of every BPF map the agent writes (hash, LRU hash, LPM trie, array, hash of
arrays), for testing the planner and writer without root.

It keeps what the kernel's hash maps do with batches (BPF_MAP_UPDATE_BATCH / DELETE_BATCH as
agent/datapath/maps.py RawMap issues them): elements are applied in order; a new key past
max_entries stops the batch with E2BIG, the elements before it staying written (RawMap raises
MapFull); a missing key stops a delete batch with ENOENT, after which RawMap deletes the rest one by
one. Every element applied is reported to `on_change`, so a test can check what a concurrent reader
could have seen between any two kernel operations, and `states` keeps the maps after each syscall.

Map kinds as the kernel has them: an LRU hash evicts its least recently used entry instead of
failing when full; an LPM trie answers lookups with the longest matching prefix and has no batch
operations; an array has every index from the start and refuses deletes; the Maglev map's values
are whole tables (set_tables swaps one in, as an outer-map update swaps an inner map's fd).

The dtypes are the codec's (agent/datapath/codec.py LAYOUTS); a root test (tests/test_writer.py)
checks they equal the ones BCC derives, so the C stays the one source.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from agent.datapath import abi
from agent.datapath.codec import BACKEND_KEY, BACKEND_VALUE, LAYOUTS, SERVICE_KEY, SERVICE_VALUE, u32  # noqa: F401
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
            self._put(ks[i * ksz:(i + 1) * ksz], vs[i * vsz:(i + 1) * vsz])
            self.on_change()

    def _put(self, k: bytes, v: bytes) -> None:
        if k not in self.entries and len(self.entries) >= self.capacity:
            raise MapFull(f"{self.name}: full ({self.capacity} entries)")
        self.entries[k] = v

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

    def dump(self) -> dict[bytes, bytes]:
        return dict(self.entries)

    def keys(self):
        return iter(list(self.entries))


class LruMap(DictMap):
    """BPF_MAP_TYPE_LRU_HASH: a full map evicts its least recently used entry (lookups refresh one)."""

    def _put(self, k: bytes, v: bytes) -> None:
        self.entries.pop(k, None)
        if len(self.entries) >= self.capacity:
            del self.entries[next(iter(self.entries))]
        self.entries[k] = v

    def lookup(self, key: bytes) -> bytes | None:
        v = self.entries.pop(key, None)
        if v is not None:
            self.entries[key] = v
        return v


class LpmMap(DictMap):
    """BPF_MAP_TYPE_LPM_TRIE: keys start with a __u32 prefix length in bits over the bytes after it
    (here np_range_key: the group, then the address); a lookup finds the longest stored prefix
    covering the key. No batch operations: RawMap writes element by element (one syscall each)."""

    def update_arrays(self, keys: np.ndarray, values: np.ndarray) -> None:
        for i in range(len(keys)):
            super().update_arrays(keys[i:i + 1], values[i:i + 1])

    def delete_array(self, keys: np.ndarray) -> None:
        for i in range(len(keys)):
            k = keys[i:i + 1].astype(self.key_dtype).tobytes()
            if k in self.entries:
                super().delete_array(keys[i:i + 1])

    def lookup(self, key: bytes) -> bytes | None:
        want = int.from_bytes(key[:4], "little")
        best, hit = -1, None
        for k, v in self.entries.items():
            plen = int.from_bytes(k[:4], "little")
            if best < plen <= want and _prefix_eq(k[4:], key[4:], plen):
                best, hit = plen, v
        return hit


def _prefix_eq(a: bytes, b: bytes, bits: int) -> bool:
    full, rest = divmod(bits, 8)
    if a[:full] != b[:full]:
        return False
    mask = (0xFF << (8 - rest)) & 0xFF
    return not rest or (a[full] & mask) == (b[full] & mask)


class ArrayMap(DictMap):
    """BPF_MAP_TYPE_ARRAY: every index 0..capacity-1 exists from the start (zeroed); no deletes."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        zero = bytes(self.value_dtype.itemsize)
        self.entries = {np.array(i, self.key_dtype).tobytes(): zero for i in range(self.capacity)}

    def delete_array(self, keys: np.ndarray) -> None:
        if len(keys):
            raise OSError(22, f"{self.name}: an array has no deletes")


class TablesMap(DictMap):
    """BPF_MAP_TYPE_HASH_OF_MAPS of arrays (the Maglev map): group → a whole table, swapped in at once."""

    def __init__(self, *args, table_size: int = 251, **kw):
        super().__init__(*args, **kw)
        self.table_size = table_size
        self.tables: dict[int, np.ndarray] = {}

    def set_tables(self, groups, tables) -> None:
        for gid, values in zip(np.asarray(groups).tolist(), tables):
            self._syscall()
            k = u32(gid)
            if k not in self.entries and len(self.entries) >= self.capacity:
                raise MapFull(f"{self.name}: full ({self.capacity} entries)")
            table = np.asarray(values, np.uint32).copy()
            assert len(table) == self.table_size, f"{self.name}: a table of {len(table)}, not {self.table_size}"
            self.tables[gid] = table
            self.entries[k] = u32(len(self.tables))  # an inner map id, as the kernel reads it
            self.on_change()

    def delete_array(self, keys: np.ndarray) -> None:
        super().delete_array(keys)
        for gid in np.asarray(keys, np.uint32).reshape(-1).tolist():
            if u32(gid) not in self.entries:
                self.tables.pop(gid, None)

    def dump_tables(self) -> dict[int, np.ndarray]:
        return {g: t.copy() for g, t in self.tables.items() if u32(g) in self.entries}


class MapsDouble:
    """The service and backend maps together (and, with northsouth=True, nodeport.c's maps), calling
    `check` after every element applied."""

    def __init__(self, services: int = 1 << 16, backends: int = 1 << 16, check: Callable | None = None,
                 northsouth: bool = False, maglev_size: int = 251):
        self.check = check
        self.services = self._map(DictMap, abi.SERVICES_MAP, services)
        self.backends = self._map(DictMap, abi.BACKENDS_MAP, backends)
        self.changes = 0
        self.maglev_size = maglev_size
        if northsouth:
            self.np_services = self._map(DictMap, abi.NP_SERVICES_MAP, services)
            self.np_backends = self._map(DictMap, abi.NP_BACKENDS_MAP, backends)
            self.policy = self._map(DictMap, abi.NP_POLICY_MAP, abi.NP_POLICY_MAX)
            self.ranges = self._map(LpmMap, abi.NP_RANGES_MAP, abi.NP_POLICY_MAX)
            self.local = self._map(DictMap, abi.NP_LOCAL_MAP, backends)
            self.maglev = TablesMap(abi.NP_MAGLEV_MAP, *LAYOUTS[abi.NP_MAGLEV_MAP], abi.NP_GROUPS_MAX, self._changed,
                                    table_size=maglev_size)
            self.snat = self._map(ArrayMap, abi.NP_SNAT_MAP, 2)

    def _map(self, kind, name: str, capacity: int):
        key, value = LAYOUTS[name]
        return kind(name, key, value, capacity, self._changed)

    def _changed(self) -> None:
        self.changes += 1
        if self.check is not None:
            self.check(self)

    # -- reading it back, as the datapath would --------------------------------------------------
    def frontends(self) -> dict[tuple, tuple]:
        """(address, port, proto, scope) → (count, flags, service_id, affinity, backends as
        (address, port, proto) in slot order); raises AssertionError on a dangling header or slot."""
        return self.frontends_of(self.services, self.backends)

    def frontends_of(self, services, backends) -> dict[tuple, tuple]:
        """frontends() of another pair of service and backend maps (nodeport.c's)."""
        out = {}
        for (ident, count, flags, sid, aff), bes in self._walk(services, backends):
            out[ident] = (count, flags, sid, aff, tuple(bes))
        return out

    def dangling(self) -> list[str]:
        """What a reader could trip on now: a header whose count points at a missing slot, a slot
        (within a header's count) pointing at a missing backend; with north-south, the same in
        nodeport.c's maps, a frontend without its policy row, a Maglev flag without its table."""
        try:
            list(self._walk())
            if hasattr(self, "policy"):
                self._walk_northsouth()
        except AssertionError as e:
            return [str(e)]
        return []

    def _walk_northsouth(self) -> None:
        from agent.datapath import codec

        for (ident, *_), _bes in self._walk(self.np_services, self.np_backends):
            key = codec.np_frontend_keys(codec.ident_of(ident[0], codec.port_host(ident[1]), ident[2])).tobytes()
            pol = self.policy.entries.get(key)
            assert pol is not None, f"np frontend {codec.ident_text(key)}: no policy row"
            row = np.frombuffer(pol, codec.NP_POLICY)[0]
            if row["flags"] & abi.NP_F_MAGLEV:
                assert int(row["group"]) in self.maglev.dump_tables(), \
                    f"np frontend {codec.ident_text(key)}: Maglev flag, no table for group {int(row['group'])}"

    def datapath(self):
        """The one writer over these maps (agent/datapath/datapath.py), as the agent builds it."""
        from agent.datapath.datapath import Datapath, NorthSouthMaps
        from agent.datapath.reconciler import Reconciler

        ns = None
        if hasattr(self, "policy"):
            ns = NorthSouthMaps(Reconciler(self.np_services, self.np_backends), self.policy, self.ranges,
                                self.local, self.maglev, self.maglev_size)
        return Datapath(Reconciler(self.services, self.backends), ns)

    def _walk(self, services=None, backends=None):
        svc = (services or self.services).entries
        be = (backends or self.backends).entries
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


# -- a readable dump of every map (tests/golden) -------------------------------------------------
def _np_flags(flags: int) -> str:
    names = [n for bit, n in ((abi.NP_F_DROP_EMPTY, "drop-empty"), (abi.NP_F_SOURCE_RANGES, "source-ranges"),
                              (abi.NP_F_MAGLEV, "maglev")) if flags & bit]
    return "|".join(names) or "-"


def _ident_text(key: bytes) -> str:
    from agent.datapath import codec

    ip, port, proto = codec.ident_text(key)
    return f"{codec.host_port(ip, port)}/{proto}"


def _services_text(m: DictMap) -> list[str]:
    from agent.datapath import codec

    if not m.entries:
        return []
    rows = codec.decode_services(*m.dump_arrays())
    out = []
    for i in range(len(rows.slot)):
        fe = _ident_text(rows.ident[i].tobytes())
        slot = int(rows.slot[i])
        if slot == 0:
            aff = f" affinity={int(rows.affinity[i])}s" if rows.flags[i] & abi.SVC_F_AFFINITY else ""
            out.append(f"{fe} #0 count={int(rows.count[i])} id={int(rows.service_id[i])}{aff}")
        else:
            out.append(f"{fe} #{slot} backend={int(rows.backend_id[i])}")
    return out


def _backends_text(m: DictMap) -> list[str]:
    from agent.datapath import codec

    if not m.entries:
        return []
    ids, idents = codec.decode_backends(*m.dump_arrays())
    return [f"{bid} {_ident_text(k.tobytes())}" for bid, k in zip(ids.tolist(), idents)]


def dump_text(d: MapsDouble) -> str:
    """Every map, one line per entry, sorted: what a golden file expects (tests/test_golden.py)."""
    from agent.datapath import codec

    sections = [(d.services.name, _services_text(d.services)), (d.backends.name, _backends_text(d.backends))]
    if hasattr(d, "policy"):
        policy = []
        for k, v in d.policy.entries.items():
            row = np.frombuffer(v, codec.NP_POLICY)[0]
            fe = _ident_text(k)
            policy.append(f"{fe} group={int(row['group'])} {_np_flags(int(row['flags']))}")
        tables = []
        for gid, t in d.maglev.dump_tables().items():
            ids, n = np.unique(t, return_counts=True)
            tables.append(f"group={gid} {len(t)} slots: " + " ".join(f"{b}×{c}" for b, c in zip(ids.tolist(), n.tolist())))
        sections += [(d.np_services.name, _services_text(d.np_services)),
                     (d.np_backends.name, _backends_text(d.np_backends)), (d.policy.name, policy),
                     (d.ranges.name, ["group={} {}".format(*codec.range_text(k)) for k in d.ranges.entries]),
                     (d.local.name, [codec.addr_str(k) for k in d.local.entries]), (d.maglev.name, tables)]
    return "".join(f"-- {name} --\n" + "".join(f"{line}\n" for line in sorted(lines)) for name, lines in sections)
