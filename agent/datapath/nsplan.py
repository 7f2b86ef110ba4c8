"""The north-south side of a plan: what only external traffic needs beside nodeport.c's frontend slots
and backends (which plan.py plans like the socket path's). Pure: no I/O.

Per external frontend a policy row (its group: one per Service port and family, its flags); per group
its source-range prefixes (LPM) and its Maglev table (a hash of arrays, tables built from the backend
ids the frontend plan gives); the addresses of this node's endpoints (no SNAT to them).

The order (ordered()), so no packet meets a frontend before its policy, ranges and table exist, nor
after they are gone: new ranges and local addresses, then policy rows (a row may move a frontend to a
group whose ranges must already be there; the Maglev flag only where a table exists already); then the frontend plans' writes (new backends, slots, headers); then the new Maglev
tables and the Maglev flags; then the frontend plans' deletes (headers, slots, backends); last the
policy rows, ranges, local addresses and tables no frontend needs any more.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..model.maglev import build_tables
from ..model.objects import ObjectKey
from ..model.view import ServiceView
from . import abi, codec
from .ids import IdRegistry, Owned, SideRegistry
from .plan import Phase, WritePlan


@dataclass
class SidePlan:
    before: list[Phase]
    middle: list[Phase]
    after: list[Phase]
    # the registry's changes, committed once written (SideRegistry.commit)
    policy_set: dict[bytes, bytes] = field(default_factory=dict)
    policy_del: list[bytes] = field(default_factory=list)
    ranges_add: set[bytes] = field(default_factory=set)
    ranges_del: set[bytes] = field(default_factory=set)
    local_add: list[bytes] = field(default_factory=list)
    local_del: list[bytes] = field(default_factory=list)
    local_refs: dict[str, int] = field(default_factory=dict)   # new reference counts of the addresses touched
    tables: dict[int, tuple[int, ...]] = field(default_factory=dict)
    groups_del: list[int] = field(default_factory=list)
    groups_released: list[int] = field(default_factory=list)
    owned: dict[ObjectKey, Owned] = field(default_factory=dict)
    full: bool = False

    @property
    def written_count(self) -> int:
        return sum(len(p) for p in self.before + self.middle)

    @property
    def deleted_count(self) -> int:
        return sum(len(p) for p in self.after)


def ordered(lb_plans: list[WritePlan], side: SidePlan | None) -> list[Phase]:
    """Every phase of one sync in the order of this module's docstring (and bpf/lib/lb.h's)."""
    lb = [p.phases() for p in lb_plans]
    out = list(side.before) if side else []
    out += [ph[i] for i in range(3) for ph in lb]          # new backends, slots, headers
    out += side.middle if side else []
    out += [ph[i] for i in range(3, 6) for ph in lb]       # removed headers, slots, backends
    return out + (side.after if side else [])


@dataclass
class _Want:
    """The side entries the views ask for."""
    owned: dict[ObjectKey, Owned] = field(default_factory=dict)
    final: dict[bytes, bytes] = field(default_factory=dict)   # policy rows with their Maglev flag
    first: dict[bytes, bytes] = field(default_factory=dict)   # … without it where no table exists yet
    group_backends: dict[int, tuple] = field(default_factory=dict)


def plan_side(views: dict[ObjectKey, ServiceView | None], reg: SideRegistry, lb: WritePlan, lb_reg: IdRegistry,
              maglev_size: int, full: bool = False) -> SidePlan:
    """The side maps' writes for these views (full: every Service; the rest is removed), given the
    plan of nodeport.c's frontends (`lb`, against `lb_reg`): a Service it refuses keeps its old side
    entries, as it keeps its old frontends."""
    changes = {k: v if v is not None else ServiceView(k) for k, v in views.items()}
    if full:
        changes = {**{gone: ServiceView(gone) for gone in reg.owned if gone not in changes}, **changes}
    refused = {r.service for r in lb.refusals}
    want = _wanted({k: v for k, v in changes.items() if k not in refused}, reg)
    sp = SidePlan([], [], [], full=full)
    sp.owned = want.owned
    first = {k: v for k, v in want.first.items() if reg.policy.get(k) != v}
    sp.ranges_add = set().union(*(o.ranges for o in want.owned.values())) - reg.ranges
    _local(sp, want.owned, reg)
    tables = _tables(want.group_backends, reg, lb, lb_reg, maglev_size)
    sp.tables = {gid: ids for gid, (ids, _) in tables.items()}
    after_first = {**reg.policy, **first}
    final = {k: v for k, v in want.final.items() if after_first.get(k) != v}
    sp.policy_set = {**first, **final}
    _removals(sp, want.owned, reg)
    if full:
        _sweep(sp, reg)
    sp.before = [_keys("source ranges", abi.NP_RANGES_MAP, sorted(sp.ranges_add), codec.NP_RANGE_KEY, "update"),
                 _keys("local endpoints", abi.NP_LOCAL_MAP, sp.local_add, codec.NP_ADDR, "update"),
                 _rows("policy", abi.NP_POLICY_MAP, first, codec.NP_FRONTEND, codec.NP_POLICY)]
    groups = np.array(sorted(tables), np.uint32)
    sp.middle = [Phase("maglev tables", abi.NP_MAGLEV_MAP, "tables",
                       {"group": groups, "table": [tables[g][1] for g in groups.tolist()]}),
                 _rows("policy maglev flags", abi.NP_POLICY_MAP, final, codec.NP_FRONTEND, codec.NP_POLICY)]
    sp.after = [_keys("removed policy", abi.NP_POLICY_MAP, sp.policy_del, codec.NP_FRONTEND, "delete"),
                _keys("removed source ranges", abi.NP_RANGES_MAP, sorted(sp.ranges_del), codec.NP_RANGE_KEY, "delete"),
                _keys("removed local endpoints", abi.NP_LOCAL_MAP, sp.local_del, codec.NP_ADDR, "delete"),
                _keys("removed maglev tables", abi.NP_MAGLEV_MAP, [codec.u32(g) for g in sp.groups_del],
                      codec.U32, "delete")]
    return sp


def _wanted(changes: dict[ObjectKey, ServiceView], reg: SideRegistry) -> _Want:
    """Policy rows, ranges, groups and local addresses per Service (group ids taken as needed)."""
    w = _Want()
    for svc, view in changes.items():
        ext = view.external
        fes = [ef.frontend for ef in ext]
        keys = codec.np_frontend_keys(codec.idents([f.ip for f in fes], [f.port for f in fes],
                                                   [f.protocol for f in fes])).tobytes()
        size = codec.NP_FRONTEND.itemsize
        policy, ranges, groups = set(), set(), set()
        for i, ef in enumerate(ext):
            key = keys[i * size:(i + 1) * size]
            gid = reg.groups.get(ef.group, key)
            flags = ((abi.NP_F_DROP_EMPTY if ef.drop_empty else 0)
                     | (abi.NP_F_SOURCE_RANGES if ef.source_ranges is not None else 0))
            maglev = abi.NP_F_MAGLEV if ef.frontend.backends else 0
            w.final[key] = codec.policy_values([gid], [flags | maglev]).tobytes()
            # until its table exists, a group's frontends balance by flow hash over the slots
            w.first[key] = codec.policy_values([gid], [flags | (maglev if gid in reg.tables else 0)]).tobytes()
            policy.add(key)
            groups.add(gid)
            if ef.frontend.backends:  # (a group's frontends share their backends: model/northsouth.py)
                w.group_backends[gid] = ef.frontend.backends
            ranges.update(codec.range_key(gid, c) for c in ef.source_ranges or ())
        w.owned[svc] = Owned(frozenset(policy), frozenset(ranges), frozenset(view.local_addresses), frozenset(groups))
    return w


def _local(sp: SidePlan, want: dict[ObjectKey, Owned], reg: SideRegistry) -> None:
    """The local-endpoint set: an address is in it while some Service lists it."""
    delta: Counter = Counter()
    for svc, o in want.items():
        old = reg.owned.get(svc, Owned()).local
        delta.update(o.local - old)
        delta.subtract(old - o.local)
    for ip, d in delta.items():
        n = reg.local_refs.get(ip, 0) + d
        sp.local_refs[ip] = n
        a = codec.addr16(ip)
        if n > 0 and a not in reg.local:
            sp.local_add.append(a)
        elif n <= 0 and a in reg.local:
            sp.local_del.append(a)


def _tables(group_backends: dict[int, tuple], reg: SideRegistry, lb: WritePlan, lb_reg: IdRegistry,
            size: int) -> dict[int, tuple[tuple[int, ...], np.ndarray]]:
    """group → (its backend ids, sorted; the Maglev table of backend ids) for each group whose backend
    set changed. A backend the frontend plan refused (a full map) has no id yet: no table for it."""
    nb = lb.new_backends
    new = {nb["ident"][i].tobytes(): int(nb["id"][i]) for i in range(len(nb["id"]))}
    todo = []
    for gid, backends in group_backends.items():
        if not backends:
            continue
        ordered_be = sorted(backends, key=_name)
        keys = codec.idents([b.ip for b in ordered_be], [b.port for b in ordered_be], [b.protocol for b in ordered_be])
        ids = lb_reg.backends.lookup(keys)
        for i in np.nonzero(ids == 0)[0].tolist():
            ids[i] = new.get(keys[i].tobytes(), 0)
        ids_t = tuple(ids.tolist())
        if 0 in ids_t or reg.tables.get(gid) == tuple(sorted(set(ids_t))):
            continue
        todo.append((gid, ids, [_name(b) for b in ordered_be]))
    built = build_tables([names for _, _, names in todo], size) if todo else []
    return {gid: (tuple(sorted(set(ids.tolist()))), ids.astype(np.uint32)[table])
            for (gid, ids, _), table in zip(todo, built)}


def _removals(sp: SidePlan, want: dict[ObjectKey, Owned], reg: SideRegistry) -> None:
    """What the Services in the plan no longer need: their old policy rows (unless another Service
    of the plan claims one), ranges and groups."""
    claimed = set().union(*(o.policy for o in want.values())) if want else set()
    for svc, o in want.items():
        old = reg.owned.get(svc, Owned())
        sp.policy_del += [k for k in old.policy - o.policy if k not in claimed]
        sp.ranges_del |= old.ranges - o.ranges
        gone = old.groups - o.groups
        sp.groups_del += [g for g in gone if g in reg.tables]
        sp.groups_released += list(gone)


def _sweep(sp: SidePlan, reg: SideRegistry) -> None:
    """After a full sync: what the pinned maps hold that no Service owns (left by Services deleted
    while the agent was down)."""
    owned = {**reg.owned, **sp.owned}
    owned = {k: o for k, o in owned.items() if o}
    live_pol = set().union(*(o.policy for o in owned.values())) if owned else set()
    live_ranges = set().union(*(o.ranges for o in owned.values())) if owned else set()
    live_local = {codec.addr16(ip) for o in owned.values() for ip in o.local}
    live_groups = set().union(*(o.groups for o in owned.values())) if owned else set()
    dead = set(sp.policy_del)
    sp.policy_del += [k for k in set(reg.policy) | set(sp.policy_set) if k not in live_pol and k not in dead]
    for k in sp.policy_del:
        sp.policy_set.pop(k, None)
    sp.ranges_del |= (reg.ranges | sp.ranges_add) - live_ranges
    sp.ranges_add &= live_ranges
    gone_local = (reg.local | set(sp.local_add)) - live_local - set(sp.local_del)
    sp.local_del += sorted(gone_local)
    sp.local_add = [a for a in sp.local_add if a in live_local]
    sp.groups_del += [g for g in reg.tables if g not in live_groups and g not in sp.groups_del]


def _rows(name: str, map_name: str, items: dict[bytes, bytes], kdt: np.dtype, vdt: np.dtype) -> Phase:
    keys = np.frombuffer(b"".join(items), kdt) if items else np.zeros(0, kdt)
    values = np.frombuffer(b"".join(items.values()), vdt) if items else np.zeros(0, vdt)
    return Phase(name, map_name, "update", {"keys": keys, "values": values})


def _keys(name: str, map_name: str, keys: list[bytes], kdt: np.dtype, op: str) -> Phase:
    k = np.frombuffer(b"".join(keys), kdt) if keys else np.zeros(0, kdt)
    rows = {"keys": k} if op == "delete" else {"keys": k, "values": np.ones(len(k), codec.U8)}
    return Phase(name, map_name, op, rows)


def _name(b) -> str:
    """A backend as Maglev hashes it: the same on every node."""
    return f"{b.ip}:{b.port}/{b.protocol}"
