"""bpf/nodeport.c on the node's devices, and the writer of its maps.

The frontend slots and backends go through the same Reconciler as the socket path (its own pair
of maps, nodewire_np_services_v1 / nodewire_np_backends_v1); this module adds what only external
traffic needs: per-frontend policy (group, drop-when-no-local-endpoint, source ranges), the
addresses of this node's endpoints (no SNAT to them), source-range prefixes, Maglev tables.
Order, so a packet never sees a frontend without its policy: policy, ranges and local addresses
first; then the reconciler; then Maglev tables (they need the backend ids), the Maglev flag, and
last the removals. Everything is pinned: a restarted agent re-learns it and rewrites only what
differs (Maglev tables are rebuilt once and swapped in atomically; their content is the same).
"""
from __future__ import annotations

import ctypes as ct
import ipaddress
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from ..model.maglev import DEFAULT_TABLE_SIZE, build_tables
from ..model.northsouth import GroupKey
from ..model.objects import ObjectKey
from ..model.view import ServiceView
from . import abi, bpfsys
from .attach import TC_EGRESS, TC_INGRESS, attach_tc
from .codec import BACKEND_IDENT, as_keys
from .loader import MapSizes, ProgramSpec, load
from .maps import addr16, pack_rows, port_be
from .reconciler import Reconciler, SyncResult

log = logging.getLogger("nodewire.nodeport")

TC_PRIO = 0x4e50  # "NP": our filters' priority on the node devices, so we replace/delete only ours
F_DROP_EMPTY, F_SOURCE_RANGES, F_MAGLEV = abi.NP_F_DROP_EMPTY, abi.NP_F_SOURCE_RANGES, abi.NP_F_MAGLEV
OUTCOMES = abi.NP_OUTCOME_NAMES
PROGRAMS = ("nw_np_ingress", "nw_np_egress")
MAPS = abi.NP_MAPS
BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY = 0, 2


class _MapCreate(ct.Structure):
    """The head of union bpf_attr for BPF_MAP_CREATE (include/uapi/linux/bpf.h)."""
    _fields_ = [("map_type", ct.c_uint32), ("key_size", ct.c_uint32), ("value_size", ct.c_uint32),
                ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                ("numa_node", ct.c_uint32), ("map_name", ct.c_char * 16)]


class _Ids:
    """Small integer ids from 1, lowest released first."""

    def __init__(self, used=()):
        self.used = set(used)

    def take(self) -> int:
        i = 1
        while i in self.used:
            i += 1
        self.used.add(i)
        return i

    def release(self, i: int) -> None:
        self.used.discard(i)


@dataclass
class _Owned:
    """What one Service put in the side maps."""
    policy: set[bytes] = field(default_factory=set)
    ranges: set[bytes] = field(default_factory=set)
    local: frozenset[str] = frozenset()
    groups: set[int] = field(default_factory=set)


def spec(sizes: MapSizes, maglev_size: int) -> ProgramSpec:
    return ProgramSpec(source="nodeport.c", cflags=tuple(abi.np_defines(sizes, maglev_size)),
                       programs=tuple((fn, "SCHED_CLS", None) for fn in PROGRAMS), maps=MAPS, name="nodeport")


class NodePortDatapath:
    def __init__(self, pin_dir: str, sizes: MapSizes = MapSizes(), maglev_size: int = DEFAULT_TABLE_SIZE):
        self.maglev_size = maglev_size
        self.loaded = load(spec(sizes, maglev_size), pin_dir)
        m = self.loaded.maps
        self.services, self.backends = m["nodewire_np_services_v1"], m["nodewire_np_backends_v1"]
        self.policy, self.local = m["nodewire_np_policy_v1"], m["nodewire_np_local_v1"]
        self.ranges, self.snat = m["nodewire_np_ranges_v1"], m["nodewire_np_snat_v1"]
        self.maglev, self.stats = m["nodewire_np_maglev_v1"], m["nodewire_np_stats_v1"]
        self.conntrack = m["nodewire_ct_v1"]
        self.reconciler = Reconciler(self.services, self.backends)
        self.devices: dict[str, int] = {}
        self.tables_built = 0  # Maglev tables built and swapped in by this process
        self._learn()

    # -- start-up ---------------------------------------------------------------------------------
    def _learn(self) -> None:
        self.pol: dict[bytes, bytes] = self.policy.dump()
        vdt = self.policy.value_dtype
        self.kernel_group: dict[bytes, int] = {
            k: int(np.frombuffer(v, dtype=vdt)["group"][0]) for k, v in self.pol.items()}
        self.groups = _Ids(self.kernel_group.values())
        self.group_id: dict[GroupKey, int] = {}
        self.local_have: set[bytes] = set(self.local.dump())
        self.local_refs: dict[str, int] = {}
        self.ranges_have: set[bytes] = set(self.ranges.keys())
        self.maglev_groups = {int.from_bytes(k, "little") for k in self.maglev.keys()}
        # group -> the backend ids its table names. A table depends only on its backend set, so a
        # pinned table naming exactly the wanted ids is already right: a restart rebuilds none of those.
        self.maglev_have: dict[int, tuple[int, ...]] = {g: self._table_ids(g) for g in self.maglev_groups}
        self.owned: dict[ObjectKey, _Owned] = {}

    def _table_ids(self, gid: int) -> tuple[int, ...]:
        """The sorted distinct backend ids in the pinned Maglev table of a group (() if unreadable)."""
        raw = bpfsys.lookup_elem(self.maglev.fd, gid.to_bytes(4, "little"), 4, self.maglev.name)
        if raw is None:
            return ()
        map_id = int.from_bytes(raw, "little")  # from user space, a map-in-map value reads as the inner map's id
        try:
            fd = bpfsys.bpf(bpfsys.MAP_GET_FD_BY_ID, bpfsys._ById(id=map_id), f"maglev table {map_id}")
        except OSError:
            return ()
        try:
            _, values = bpfsys.lookup_batch(fd, 4, 4, f"maglev table of group {gid}")
        finally:
            os.close(fd)
        return tuple(np.unique(np.frombuffer(values, dtype=np.uint32)).tolist())

    def attach(self, devices: list[str]) -> None:
        """clsact ingress+egress on each device, replacing an earlier agent's filters atomically."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for dev in devices:
                filters = [(fn, self.loaded.prog_fd(fn), parent) for fn, parent in zip(PROGRAMS, (TC_INGRESS, TC_EGRESS))]
                try:
                    idx = attach_tc(ipr, dev, filters, TC_PRIO)
                except LookupError:
                    raise LookupError(f"--devices: no interface {dev!r} in this network namespace") from None
                self.devices[dev] = idx

    def set_snat_addresses(self, addresses: list[str]) -> dict[str, str]:
        """The node address remote-backend traffic leaves with: the first of each family."""
        chosen = {}
        for fam, slot in ((4, 0), (6, 1)):
            ip = next((a for a in addresses if (":" in a) == (fam == 6)), None)
            if ip:
                chosen[f"ipv{fam}"] = ip
            bpfsys.update_elem(self.snat.fd, slot.to_bytes(4, "little"), addr16(ip) if ip else bytes(16),
                               self.snat.name)
        return chosen

    # -- apply ------------------------------------------------------------------------------------
    def apply(self, views: dict[ObjectKey, ServiceView | None], full: bool = False) -> SyncResult:
        changes = {k: v if v is not None else ServiceView(k) for k, v in views.items()}
        if full:
            changes = {**{gone: ServiceView(gone) for gone in self.owned if gone not in changes}, **changes}
        want: dict[ObjectKey, _Owned] = {}
        final_pol: dict[bytes, bytes] = {}
        pre_pol: dict[bytes, bytes] = {}
        group_backends: dict[int, tuple] = {}
        for svc, ns in changes.items():
            o = want[svc] = _Owned(local=ns.local_addresses)
            for ef in ns.external:
                fe = ef.frontend
                key = pack_rows(self.policy.key_dtype, [(addr16(fe.ip), port_be(fe.port), abi.PROTO_NUMBERS[fe.protocol])])[0]
                gid = self._group(ef.group, key)
                flags = (F_DROP_EMPTY if ef.drop_empty else 0) | (F_SOURCE_RANGES if ef.source_ranges is not None else 0)
                maglev = F_MAGLEV if fe.backends else 0
                final_pol[key] = pack_rows(self.policy.value_dtype, [(gid, flags | maglev)])[0]
                # until its table exists, a group's frontends balance by flow hash over the slots
                ready = gid in self.maglev_have or gid in self.maglev_groups
                pre_pol[key] = pack_rows(self.policy.value_dtype, [(gid, flags | (maglev if ready else 0))])[0]
                o.policy.add(key)
                o.groups.add(gid)
                group_backends[gid] = fe.backends
                for cidr in ef.source_ranges or ():
                    o.ranges.add(self._range_key(gid, cidr))

        self._write_side(pre_pol, want, changes)
        fe_changes = {svc: [ef.frontend for ef in ns.external] for svc, ns in changes.items()}
        res = self.reconciler.apply(fe_changes, full=full)
        for r in res.refusals:  # a refused Service keeps its old entries; keep its side entries too
            want.pop(r.service, None)
        self._write_maglev(group_backends)
        self._update_policy({k: v for k, v in final_pol.items() if self.pol.get(k) != v})
        self._remove_stale(want)
        if full:
            self._sweep()
        return res

    def _group(self, gk: GroupKey, key: bytes) -> int:
        gid = self.group_id.get(gk)
        if gid is None:
            gid = self.kernel_group.pop(key, None) or self.groups.take()
            self.group_id[gk] = gid
        return gid

    @staticmethod
    def _range_key(gid: int, cidr: str) -> bytes:
        """struct np_range_key: prefix length over (group, address), the group always matched."""
        net = ipaddress.ip_network(cidr)
        plen = net.prefixlen + (96 if net.version == 4 else 0)
        return (32 + plen).to_bytes(4, "little") + gid.to_bytes(4, "little") + addr16(str(net.network_address))

    def _del(self, m, key: bytes) -> None:
        bpfsys.delete_elem(m.fd, key, m.name)

    def _write_side(self, pre_pol: dict[bytes, bytes], want: dict[ObjectKey, _Owned], changes) -> None:
        self._update_policy({k: v for k, v in pre_pol.items() if self.pol.get(k) != v})
        for o in want.values():
            for rk in o.ranges - self.ranges_have:
                bpfsys.update_elem(self.ranges.fd, rk, b"\1", self.ranges.name)
                self.ranges_have.add(rk)
        add = []
        for svc, o in want.items():
            old = self.owned.get(svc, _Owned()).local
            for ip in o.local - old:
                self.local_refs[ip] = self.local_refs.get(ip, 0) + 1
                if addr16(ip) not in self.local_have:
                    add.append(addr16(ip))
        if add:
            self.local.update([(a, b"\1") for a in add])
            self.local_have.update(add)

    def _update_policy(self, items: dict[bytes, bytes]) -> None:
        if items:
            self.policy.update(list(items.items()))
            self.pol.update(items)

    def _write_maglev(self, group_backends: dict[int, tuple]) -> None:
        """Build and swap in the Maglev table of every group whose backends changed."""
        rec = self.reconciler
        todo = []
        for gid, backends in group_backends.items():
            if not backends:
                continue
            ordered = sorted(backends, key=_name)
            rows = np.zeros(len(ordered), BACKEND_IDENT)
            rows["address"] = np.frombuffer(b"".join(addr16(b.ip) for b in ordered), dtype="V16")
            rows["port"] = [port_be(b.port) for b in ordered]
            rows["proto"] = [abi.PROTO_NUMBERS[b.protocol] for b in ordered]
            ids = tuple(rec.registry.backends.lookup(as_keys(rows)).tolist())
            if 0 in ids:  # a backend the reconciler refused (a full map): no table for it yet
                continue
            if self.maglev_have.get(gid) != tuple(sorted(ids)):
                todo.append((gid, ids, [_name(b) for b in ordered]))
        if not todo:
            return
        tables = build_tables([names for _, _, names in todo], self.maglev_size)
        for (gid, ids, _names), table in zip(todo, tables):
            values = np.asarray(ids, dtype=np.uint32)[table]
            self._swap_table(gid, values)
            self.tables_built += 1
            self.maglev_have[gid] = tuple(sorted(ids))
            self.maglev_groups.add(gid)

    def _swap_table(self, gid: int, values: np.ndarray) -> None:
        attr = _MapCreate(BPF_MAP_TYPE_ARRAY, 4, 4, self.maglev_size, 0, 0, 0, b"nw_np_maglev")
        fd = bpfsys.bpf(BPF_MAP_CREATE, attr, f"nodewire_np_maglev_v1: table of group {gid}")
        try:
            keys = np.arange(len(values), dtype=np.uint32)
            bpfsys.update_batch(fd, keys.tobytes(), values.astype(np.uint32).tobytes(), len(values),
                                f"nodewire_np_maglev_v1: table of group {gid}")
            bpfsys.update_elem(self.maglev.fd, gid.to_bytes(4, "little"), fd.to_bytes(4, "little"), self.maglev.name)
        finally:
            os.close(fd)  # the outer map holds the table now

    def _remove_stale(self, want: dict[ObjectKey, _Owned]) -> None:
        dead_pol, dead_local = [], []
        for svc, o in want.items():
            old = self.owned.get(svc, _Owned())
            dead_pol += [k for k in old.policy - o.policy if not self._still_used(k, svc, want)]
            for rk in old.ranges - o.ranges:
                self._del(self.ranges, rk)
                self.ranges_have.discard(rk)
            for ip in old.local - o.local:
                self.local_refs[ip] -= 1
                if self.local_refs[ip] <= 0:
                    del self.local_refs[ip]
                    dead_local.append(addr16(ip))
            for gid in old.groups - o.groups:
                self._del(self.maglev, gid.to_bytes(4, "little"))
                self.maglev_have.pop(gid, None)
                self.maglev_groups.discard(gid)
                self.groups.release(gid)
                self.group_id = {k: v for k, v in self.group_id.items() if v != gid}
            if o.policy or o.local or o.groups:
                self.owned[svc] = o
            else:
                self.owned.pop(svc, None)
        self.policy.delete(dead_pol)
        for k in dead_pol:
            self.pol.pop(k, None)
        self.local.delete(dead_local)
        self.local_have.difference_update(dead_local)

    def _sweep(self) -> None:
        """After a full sync: what the pinned maps hold that no Service wants (left by Services
        deleted while the agent was down)."""
        pol = set().union(*(o.policy for o in self.owned.values()))
        ranges = set().union(*(o.ranges for o in self.owned.values()))
        local = {addr16(ip) for o in self.owned.values() for ip in o.local}
        groups = set().union(*(o.groups for o in self.owned.values()))
        dead = [k for k in self.pol if k not in pol]
        self.policy.delete(dead)
        for k in dead:
            del self.pol[k]
        for rk in self.ranges_have - ranges:
            self._del(self.ranges, rk)
        self.ranges_have &= ranges
        self.local.delete(list(self.local_have - local))
        self.local_have &= local
        for gid in self.maglev_groups - groups:
            self._del(self.maglev, gid.to_bytes(4, "little"))
        self.maglev_groups &= groups
        self.kernel_group.clear()
        self.groups = _Ids(groups)

    def _still_used(self, key: bytes, svc: ObjectKey, want: dict[ObjectKey, _Owned]) -> bool:
        return any(key in o.policy for s, o in want.items() if s != svc)

    # -- views ------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Packets per outcome since the maps were created (summed over CPUs)."""
        keys, values = self.stats.dump_summed()
        by_index = dict(zip(keys.tolist(), values.tolist()))
        return {name: int(by_index.get(i, 0)) for i, name in enumerate(OUTCOMES)}

    def close(self) -> None:
        self.loaded.close()


def _name(b) -> str:
    return f"{b.ip}:{b.port}/{b.protocol}"


def detach(devices: list[str]) -> int:
    """Remove our filters from these devices (in this network namespace). Returns how many."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    n = 0
    with IPRoute() as ipr:
        for dev in devices:
            links = ipr.link_lookup(ifname=dev)
            for parent in (TC_INGRESS, TC_EGRESS):
                try:
                    if links:
                        ipr.tc("del-filter", "bpf", links[0], ":1", parent=parent, prio=TC_PRIO)
                        n += 1
                except NetlinkError:
                    pass
    return n
