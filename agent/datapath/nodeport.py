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
import errno
import ipaddress
import logging
from dataclasses import dataclass, field

import numpy as np

from ..model.maglev import build_tables
from ..model.northsouth import GroupKey, NorthSouth
from ..model.objects import ObjectKey
from .loader import MapSizes, compile_program
from .maps import RawMap, addr16, pack_rows, port_be
from .reconciler import PROTO_NUMBERS, Reconciler, SyncResult, _Ids

log = logging.getLogger("nodewire.nodeport")

TC_PRIO = 0x4e50  # "NP": our filters' priority on the node devices, so we replace/delete only ours
TC_INGRESS, TC_EGRESS = "ffff:fff2", "ffff:fff3"
F_DROP_EMPTY, F_SOURCE_RANGES, F_MAGLEV = 1, 2, 4  # NP_F_* in bpf/nodeport.c
OUTCOMES = ("local", "remote", "reply", "established", "reject", "drop_no_local", "drop_source_range",
            "drop_error")  # NW_NP_* in bpf/nodeport.c
BPF_MAP_TYPE_ARRAY = 2


@dataclass
class _Owned:
    """What one Service put in the side maps."""
    policy: set[bytes] = field(default_factory=set)
    ranges: set[tuple[int, int, bytes]] = field(default_factory=set)
    local: frozenset[str] = frozenset()
    groups: set[int] = field(default_factory=set)


class NodePortDatapath:
    def __init__(self, pin_dir: str, sizes: MapSizes = MapSizes(), maglev_size: int = 16381):
        from bcc import BPF

        self.maglev_size = maglev_size
        self.bpf = compile_program("nodeport.c", pin_dir, sizes, extra_cflags=(f"-DNW_MAGLEV_M={maglev_size}",))
        self.fn_ingress = self.bpf.load_func("nw_np_ingress", BPF.SCHED_CLS)
        self.fn_egress = self.bpf.load_func("nw_np_egress", BPF.SCHED_CLS)
        t = lambda n: self.bpf[n.encode()]  # noqa: E731
        self.services = RawMap(t("nodewire_np_services_v1"), "nodewire_np_services_v1")
        self.backends = RawMap(t("nodewire_np_backends_v1"), "nodewire_np_backends_v1")
        self.policy = RawMap(t("nodewire_np_policy_v1"), "nodewire_np_policy_v1")
        self.local = RawMap(t("nodewire_np_local_v1"), "nodewire_np_local_v1")
        self.ranges = t("nodewire_np_ranges_v1")
        self.snat = t("nodewire_np_snat_v1")
        self.maglev = t("nodewire_np_maglev_v1")
        self.stats = t("nodewire_np_stats_v1")
        self.reconciler = Reconciler(self.services, self.backends)
        self.devices: dict[str, int] = {}
        self._learn()

    # -- start-up ---------------------------------------------------------------------------------
    def _learn(self) -> None:
        self.pol: dict[bytes, bytes] = self.policy.dump()
        vdt = self.policy.value_dtype
        self.kernel_group: dict[bytes, int] = {
            k: int(np.frombuffer(v, dtype=vdt)["group"][0]) for k, v in self.pol.items()}
        self.groups = _Ids(set(self.kernel_group.values()))
        self.group_id: dict[GroupKey, int] = {}
        self.local_have: set[bytes] = set(self.local.dump())
        self.local_refs: dict[str, int] = {}
        self.ranges_have = {(k.prefixlen, k.group, bytes(k.address)) for k in self.ranges.keys()}
        self.maglev_have: dict[int, tuple[int, ...]] = {}  # group -> backend ids it was built from
        self.maglev_groups = {k.value for k in self.maglev.keys()}
        self.owned: dict[ObjectKey, _Owned] = {}

    def attach(self, devices: list[str]) -> None:
        """clsact ingress+egress on each device, replacing an earlier agent's filters atomically."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            for dev in devices:
                links = ipr.link_lookup(ifname=dev)
                if not links:
                    raise LookupError(f"--devices: no interface {dev!r} in this network namespace")
                idx = links[0]
                try:
                    ipr.tc("add", "clsact", idx)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
                for fn, parent in ((self.fn_ingress, TC_INGRESS), (self.fn_egress, TC_EGRESS)):
                    ipr.tc("replace-filter", "bpf", idx, ":1", fd=fn.fd, name=fn.name, parent=parent,
                           prio=TC_PRIO, classid=1, direct_action=True)
                self.devices[dev] = idx

    def set_snat_addresses(self, addresses: list[str]) -> dict[str, str]:
        """The node address remote-backend traffic leaves with: the first of each family."""
        chosen = {}
        for fam, slot in ((4, 0), (6, 1)):
            ip = next((a for a in addresses if (":" in a) == (fam == 6)), None)
            leaf = self.snat.Leaf()
            if ip:
                ct.memmove(ct.addressof(leaf), addr16(ip), 16)
                chosen[f"ipv{fam}"] = ip
            self.snat[ct.c_uint32(slot)] = leaf
        return chosen

    # -- apply ------------------------------------------------------------------------------------
    def apply(self, changes: dict[ObjectKey, NorthSouth], full: bool = False) -> SyncResult:
        if full:
            changes = {**{gone: NorthSouth() for gone in self.owned if gone not in changes}, **changes}
        want: dict[ObjectKey, _Owned] = {}
        final_pol: dict[bytes, bytes] = {}
        pre_pol: dict[bytes, bytes] = {}
        group_backends: dict[int, tuple] = {}
        for svc, ns in changes.items():
            o = want[svc] = _Owned(local=ns.local_addresses)
            for ef in ns.external:
                fe = ef.frontend
                key = pack_rows(self.policy.key_dtype, [(addr16(fe.ip), port_be(fe.port), PROTO_NUMBERS[fe.protocol])])[0]
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
        for err in res.errors:  # a refused Service keeps its old entries; keep its side entries too
            svc_name = err.split(" ", 2)[1].rstrip(":")
            for svc in [s for s in want if str(s) == svc_name]:
                want.pop(svc)
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
    def _range_key(gid: int, cidr: str) -> tuple[int, int, bytes]:
        net = ipaddress.ip_network(cidr)
        plen = net.prefixlen + (96 if net.version == 4 else 0)
        return 32 + plen, gid, addr16(str(net.network_address))

    def _write_side(self, pre_pol: dict[bytes, bytes], want: dict[ObjectKey, _Owned], changes) -> None:
        self._update_policy({k: v for k, v in pre_pol.items() if self.pol.get(k) != v})
        for o in want.values():
            for rk in o.ranges - self.ranges_have:
                k = self.ranges.Key(rk[0], rk[1])
                ct.memmove(ct.addressof(k) + 8, rk[2], 16)
                self.ranges[k] = ct.c_uint8(1)
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
            ids = tuple(rec.backend_id[b] for b in sorted(backends, key=_name))
            if self.maglev_have.get(gid) != ids:
                todo.append((gid, ids, [_name(b) for b in backends]))
        if not todo:
            return
        tables = build_tables([names for _, _, names in todo], self.maglev_size)
        for (gid, ids, _names), table in zip(todo, tables):
            values = np.asarray(ids, dtype=np.uint32)[table]
            self._swap_table(gid, values)
            self.maglev_have[gid] = ids
            self.maglev_groups.add(gid)

    def _swap_table(self, gid: int, values: np.ndarray) -> None:
        from bcc.libbcc import lib

        create = lib.bcc_create_map
        create.restype, create.argtypes = ct.c_int, [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int]
        fd = create(BPF_MAP_TYPE_ARRAY, b"nw_np_maglev", 4, 4, self.maglev_size, 0)
        if fd < 0:
            raise OSError(ct.get_errno(), f"nodewire_np_maglev_v1: cannot create a table for group {gid}")
        try:
            keys = np.arange(len(values), dtype=np.uint32)
            count = ct.c_uint32(len(values))
            if lib.bpf_update_batch(fd, keys.ctypes.data, values.ctypes.data, ct.byref(count)) != 0:
                raise OSError(ct.get_errno(), f"nodewire_np_maglev_v1: cannot fill the table of group {gid}")
            self.maglev[ct.c_uint32(gid)] = ct.c_int(fd)
        finally:
            import os
            os.close(fd)  # the outer map holds the table now

    def _remove_stale(self, want: dict[ObjectKey, _Owned]) -> None:
        dead_pol, dead_local = [], []
        for svc, o in want.items():
            old = self.owned.get(svc, _Owned())
            dead_pol += [k for k in old.policy - o.policy if not self._still_used(k, svc, want)]
            for rk in old.ranges - o.ranges:
                k = self.ranges.Key(rk[0], rk[1])
                ct.memmove(ct.addressof(k) + 8, rk[2], 16)
                try:
                    del self.ranges[k]
                except KeyError:
                    pass
                self.ranges_have.discard(rk)
            for ip in old.local - o.local:
                self.local_refs[ip] -= 1
                if self.local_refs[ip] <= 0:
                    del self.local_refs[ip]
                    dead_local.append(addr16(ip))
            for gid in old.groups - o.groups:
                try:
                    del self.maglev[ct.c_uint32(gid)]
                except KeyError:
                    pass
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
            k = self.ranges.Key(rk[0], rk[1])
            ct.memmove(ct.addressof(k) + 8, rk[2], 16)
            try:
                del self.ranges[k]
            except KeyError:
                pass
        self.ranges_have &= ranges
        self.local.delete(list(self.local_have - local))
        self.local_have &= local
        for gid in self.maglev_groups - groups:
            try:
                del self.maglev[ct.c_uint32(gid)]
            except KeyError:
                pass
        self.maglev_groups &= groups
        self.kernel_group.clear()
        self.groups = _Ids(groups)

    def _still_used(self, key: bytes, svc: ObjectKey, want: dict[ObjectKey, _Owned]) -> bool:
        return any(key in o.policy for s, o in want.items() if s != svc)

    # -- views ------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Packets per outcome since the maps were created (summed over CPUs)."""
        out = {}
        for i, name in enumerate(OUTCOMES):
            out[name] = int(sum(v.value for v in self.stats[ct.c_uint32(i)]))
        return out


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
