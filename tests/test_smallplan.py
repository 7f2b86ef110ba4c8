"""The planner's scalar fast path (smallplan.py) against the vector planner (plan.py), without root:
for random small changes over registries built by random histories (restarts and failed writes
included), both give the same WritePlan — every array equal, with the same dtype, in the same order."""
from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.datapath.codec import KEY
from agent.datapath.keyindex import key_hash
from agent.datapath.maps import addr16, port_be
from agent.datapath.plan import plan
from agent.datapath.reconciler import Reconciler
from agent.datapath.smallplan import plan_small
from agent.model.frontends import Backend, Frontend
from agent.model.objects import ObjectKey
from nodewire_dev.mapsdouble import MapsDouble

VIPS = ["10.96.0.1", "10.96.0.2", "10.96.0.3", "fd00::1"]
POOL = [Backend(ip, port, "TCP") for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "fd01::5") for port in (8080, 9090)]
SERVICES = [ObjectKey("default", f"s{i}") for i in range(4)]

frontend_st = st.tuples(st.sampled_from(VIPS), st.sampled_from([80, 443]), st.sampled_from(["TCP", "UDP"]),
                        st.lists(st.sampled_from(POOL), max_size=4, unique=True), st.sampled_from([0, 0, 30]))
changes_st = st.dictionaries(st.sampled_from(SERVICES), st.lists(frontend_st, max_size=3), max_size=3)


def frontends(changes) -> dict[ObjectKey, list[Frontend]]:
    return {s: [Frontend(vip, port, proto, s, f"p{port}", tuple(sorted(bes)), aff) for vip, port, proto, bes, aff in fes]
            for s, fes in changes.items()}


def same_plan(a, b) -> list[str]:
    """Fields where two WritePlans differ (arrays by value and dtype, nested dicts and records too)."""
    out = []

    def cmp(name, x, y):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                    and x.shape == y.shape and np.array_equal(x, y)):
                out.append(f"{name}: {x!r} != {y!r}")
        elif isinstance(x, dict):
            if x.keys() != y.keys():
                out.append(f"{name}: keys {list(x)} != {list(y)}")
            for k in x.keys() & y.keys():
                cmp(f"{name}.{k}", x[k], y[k])
        elif isinstance(x, (tuple, list)) and x and isinstance(x[0], np.ndarray):
            for i, (xi, yi) in enumerate(zip(x, y)):
                cmp(f"{name}[{i}]", xi, yi)
        elif dataclasses.is_dataclass(x):
            for f in dataclasses.fields(x):
                cmp(f"{name}.{f.name}", getattr(x, f.name), getattr(y, f.name))
        elif x != y:
            out.append(f"{name}: {x!r} != {y!r}")

    cmp("plan", a, b)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=st.lists(st.tuples(st.sampled_from(["apply", "full", "restart", "crash"]), changes_st), max_size=5),
       change=changes_st, cap=st.sampled_from([6, 64]))
def test_the_fast_path_plans_exactly_what_the_vector_planner_plans(history, change, cap):
    d = MapsDouble(cap, cap)
    rec = Reconciler(d.services, d.backends)
    for kind, ch in history:
        if kind == "crash":  # a write fails part-way: the next registry is restored from half a plan
            d.services.fail_after = d.services.syscalls + 1
        rec.apply(frontends(ch), full=(kind == "full"))
        d.services.fail_after = None
        if kind in ("restart", "crash"):
            rec = Reconciler(d.services, d.backends)
    changes = frontends(change)
    fast = plan_small(changes, rec.registry, rec.capacities)
    if fast is not None:
        assert same_plan(fast, plan(changes, rec.registry, rec.capacities)) == []


def test_one_endpoint_change_takes_the_fast_path_and_reaches_the_maps():
    d = MapsDouble()
    rec = Reconciler(d.services, d.backends)
    a, b = SERVICES[:2]
    rec.apply(frontends({a: [("10.96.0.1", 80, "TCP", POOL[:3], 0)], b: [("10.96.0.2", 80, "TCP", POOL[:2], 0)]}),
              full=True)
    moved = frontends({a: [("10.96.0.1", 80, "TCP", POOL[1:4], 0)]})
    p = plan_small(moved, rec.registry, rec.capacities)
    assert p is not None and len(p.new_backends["id"]) == 1 and len(p.backend_deletes["id"]) == 0
    assert rec.apply(moved).errors == []
    held = {ident[0]: v[4] for ident, v in d.frontends().items()}
    assert held[addr16("10.96.0.1")] == tuple((addr16(x.ip), port_be(x.port), 6) for x in POOL[1:4])
    assert len(d.backends.entries) == 4  # the one a dropped is gone: b still uses POOL[:2]


def test_a_clash_or_a_full_map_is_left_to_the_vector_planner():
    d = MapsDouble(4, 8)
    rec = Reconciler(d.services, d.backends)
    a, b = SERVICES[:2]
    rec.apply(frontends({a: [("10.96.0.1", 80, "TCP", POOL[:2], 0)]}))
    clash = frontends({b: [("10.96.0.1", 80, "TCP", POOL[:1], 0)]})
    assert plan_small(clash, rec.registry, rec.capacities) is None
    too_big = frontends({b: [("10.96.0.2", 80, "TCP", POOL[:3], 0)]})  # 4 entries where 1 is free
    assert plan_small(too_big, rec.registry, rec.capacities) is None
    assert [r.kind for r in rec.apply(too_big).refusals] == ["map-full"]


@settings(max_examples=50, deadline=None)
@given(raw=st.lists(st.binary(min_size=20, max_size=20), min_size=1, max_size=8))
def test_the_scalar_key_hash_is_the_vector_one(raw):
    """key_hash takes the scalar path for up to 8 keys: the same 64-bit values as the vector path."""
    keys = np.frombuffer(b"".join(raw), KEY)
    padded = np.concatenate([keys, np.zeros(16, KEY)])  # > 8 keys: the vector path
    assert key_hash(keys).tolist() == key_hash(padded)[:len(keys)].tolist()
    assert key_hash(keys).dtype == np.uint64
