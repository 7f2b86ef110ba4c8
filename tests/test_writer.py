"""The writer and the whole reconciler: write order, failures, and random sequences of desired states
against the maps double (no root), checked after every kernel operation; plus real pinned maps (root)."""
from __future__ import annotations

import secrets
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.datapath.maps import addr16, port_be
from agent.datapath.plan import CLASH, MAP_FULL
from agent.datapath import reconciler as reconciler_mod
from agent.datapath.reconciler import Reconciler
from agent.model.frontends import Backend, Frontend
from agent.model.objects import ObjectKey
from nodewire_dev.mapsdouble import BACKEND_KEY, BACKEND_VALUE, SERVICE_KEY, SERVICE_VALUE, MapsDouble


class Log:
    """Wraps a map and records the order of its batch operations."""

    def __init__(self, m, log, tag):
        self.m, self.log, self.tag = m, log, tag

    def __getattr__(self, name):
        return getattr(self.m, name)

    def update_arrays(self, keys, values):
        if len(keys):
            self.log.append((self.tag, "update", len(keys)))
        self.m.update_arrays(keys, values)

    def delete_array(self, keys):
        if len(keys):
            self.log.append((self.tag, "delete", len(keys)))
        self.m.delete_array(keys)


def fe(svc: str, vip: str, *backend_ips: str) -> tuple[ObjectKey, list[Frontend]]:
    key = ObjectKey("default", svc)
    return key, [Frontend(vip, 80, "TCP", key, "", tuple(Backend(ip, 8080, "TCP") for ip in backend_ips))]


def order_of_writes(services, backends):
    log: list = []
    rec = Reconciler(Log(services, log, "services"), Log(backends, log, "backends"))
    rec.apply(dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3")]), full=True)
    first = list(log)
    log.clear()
    # Shrink to a new single backend: new backend, slot 1, header (count 1), then stale slots, old backends.
    rec.apply(dict([fe("a", "10.96.0.1", "10.0.0.9")]))
    second = list(log)
    log.clear()
    rec.apply({ObjectKey("default", "a"): []})
    return first, second, list(log)


EXPECTED_ORDER = (
    [("backends", "update", 3), ("services", "update", 3), ("services", "update", 1)],
    [("backends", "update", 1), ("services", "update", 1), ("services", "update", 1),
     ("services", "delete", 2), ("backends", "delete", 3)],
    # header first (lookups miss from then on), then the slot, then the backend
    [("services", "delete", 1), ("services", "delete", 1), ("backends", "delete", 1)],
)


def test_writes_go_backends_slots_headers_then_deletes_in_reverse():
    d = MapsDouble()
    assert order_of_writes(d.services, d.backends) == EXPECTED_ORDER
    assert d.services.entries == {} and d.backends.entries == {}


def test_a_failed_write_commits_nothing_and_the_next_apply_retries_from_what_the_maps_hold():
    bad: list = []
    d = MapsDouble(check=lambda m: bad.extend(m.dangling()))
    rec = Reconciler(d.services, d.backends)
    rec.apply(dict([fe("a", "10.96.0.1", "10.0.0.1")]))
    d.services.fail_after = d.services.syscalls + 1  # slots go in, the header write fails
    res = rec.apply(dict([fe("b", "10.96.0.2", "10.0.0.2", "10.0.0.3")]))
    assert res.write_error and "injected failure" in res.write_error
    d.services.fail_after = None
    assert rec.apply({}).errors == []  # b retried, without being asked again
    assert sorted(v["service"] for v in rec.service_names().values()) == ["default/a", "default/b"]
    assert len(d.services.entries) == 2 + 3 and bad == []


# -- random sequences of desired states --------------------------------------------------------
VIPS = ["10.96.0.1", "10.96.0.2", "10.96.0.3", "fd00::1"]
PORTS = [80, 443]
POOL = [Backend(ip, port, "TCP") for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "fd01::5")
        for port in (8080, 9090)]
SERVICES = [ObjectKey("default", f"s{i}") for i in range(5)]

frontend_st = st.tuples(st.sampled_from(VIPS), st.sampled_from(PORTS),
                        st.lists(st.sampled_from(POOL), max_size=4, unique=True), st.sampled_from([0, 0, 30]))
service_st = st.lists(frontend_st, max_size=2)
state_st = st.dictionaries(st.sampled_from(SERVICES), service_st, max_size=5)
step_st = st.one_of(
    st.tuples(st.just("full"), state_st),
    st.tuples(st.just("partial"), state_st),
    st.tuples(st.just("restart"), st.just({})),
    st.tuples(st.just("crash"), st.integers(0, 4)),
)


def frontends_of(svc: ObjectKey, spec) -> list[Frontend]:
    """A Service's frontends; one listed twice counts once, the last one (as the planner reads them)."""
    fes = {(vip, port): Frontend(vip, port, "TCP", svc, f"p{port}", tuple(sorted(bes)), aff)
           for vip, port, bes, aff in spec}
    return list(fes.values())


def ident(f: Frontend) -> tuple:
    return (addr16(f.ip), port_be(f.port), 6, 0)


def expected_maps(model: dict[ObjectKey, list[Frontend]]) -> dict[tuple, tuple]:
    return {ident(f): (len(f.backends), 1 if f.affinity_timeout else 0, f.affinity_timeout,
                       tuple((addr16(b.ip), port_be(b.port), 6) for b in f.backends))
            for fes in model.values() for f in fes}


def admit(model, changes, res, full):
    """The model after an apply: refused Services keep what they had."""
    refused = {r.service for r in res.refusals}
    new = {} if full else dict(model)
    if full:
        new.update({s: fes for s, fes in model.items() if s in refused})
    for s, fes in changes.items():
        if s not in refused:
            new[s] = fes
    return {s: fes for s, fes in new.items() if fes}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step_st, min_size=1, max_size=6), services_cap=st.sampled_from([6, 12, 64]),
       backends_cap=st.sampled_from([4, 10, 64]), chunk=st.sampled_from([2, 20_000]))
def test_random_desired_states_reach_the_maps_and_no_reader_ever_sees_a_gap(steps, services_cap, backends_cap,
                                                                          chunk):
    """chunk: Services per plan of a full sync (2: every full sync runs in parts)."""
    reconciler_mod.FULL_SYNC_CHUNK = chunk
    try:
        _random_states(steps, services_cap, backends_cap)
    finally:
        reconciler_mod.FULL_SYNC_CHUNK = 20_000


def _random_states(steps, services_cap, backends_cap):
    gaps: list = []
    d = MapsDouble(services_cap, backends_cap, check=lambda m: gaps.extend(m.dangling()))
    rec = Reconciler(d.services, d.backends)
    model: dict[ObjectKey, list[Frontend]] = {}
    for kind, arg in steps:
        if kind == "restart":
            rec = Reconciler(d.services, d.backends)
            res = rec.apply(dict(model), full=True)
            assert (res.written, res.deleted) == (0, 0), "a restarted agent rewrote what was right"
            continue
        if kind == "crash":  # a write fails part-way; the agent restarts and syncs fully
            d.services.fail_after = d.services.syscalls + arg
            d.backends.fail_after = d.backends.syscalls + arg
            first = {SERVICES[0]: frontends_of(SERVICES[0], [(VIPS[0], 80, POOL[:2], 0)])}
            rec.apply({s: [] for s in model} if model else first)
            d.services.fail_after = d.backends.fail_after = None
            rec = Reconciler(d.services, d.backends)
            res = rec.apply(dict(model), full=True)
            model = admit(model, dict(model), res, True)
        else:
            changes = {s: frontends_of(s, spec) for s, spec in arg.items()}
            if kind == "partial" and model:  # also remove a Service that is there
                changes.setdefault(next(iter(model)), [])
            res = rec.apply(changes, full=(kind == "full"))
            assert res.write_error is None, "the planner let a write overflow a map"
            for r in res.refusals:
                assert r.kind in (CLASH, MAP_FULL) and r.service in changes
                if r.kind == MAP_FULL:
                    assert r.limit.name in (d.services.name, d.backends.name)
            model = admit(model, changes, res, kind == "full")
        assert gaps == []
        got = {k: v[:2] + v[3:] for k, v in d.frontends().items()}
        assert got == expected_maps(model)
        sids = [v[2] for v in d.frontends().values()]
        assert len(set(sids)) == len(sids) and 0 not in sids
        # nothing left behind: every slot belongs to a header, every backend to a slot
        assert len(d.services.entries) == sum(1 + len(f.backends) for fes in model.values() for f in fes)
        assert len(d.backends.entries) == len({b for fes in model.values() for f in fes for b in f.backends})
        assert rec.svc_entries == len(d.services.entries)
        names = rec.service_names()
        assert sorted(v["service"] for v in names.values()) == sorted(
            str(s) for s, fes in model.items() for _ in fes)


# -- real pinned maps (root) ------------------------------------------------------------------
@pytest.fixture
def lb():
    from agent.datapath.loader import MapSizes, SockLB

    pin = f"/sys/fs/bpf/nwtest-{secrets.token_hex(3)}"
    sock_lb = SockLB(pin, MapSizes(services=16, backends=8, revnat=64, lb_stats=64))
    try:
        yield sock_lb
    finally:
        shutil.rmtree(pin, ignore_errors=True)


@pytest.mark.root
def test_the_doubles_layouts_are_the_ones_bcc_derives_from_lb_h(lb):
    assert lb.services.key_dtype == SERVICE_KEY and lb.services.value_dtype == SERVICE_VALUE
    assert lb.backends.key_dtype == BACKEND_KEY and lb.backends.value_dtype == BACKEND_VALUE


@pytest.mark.root
def test_real_maps_take_the_writes_in_order_and_a_restart_rewrites_nothing(lb):
    from agent.datapath.loader import MapSizes, SockLB

    assert order_of_writes(lb.services, lb.backends) == EXPECTED_ORDER
    changes = dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2"), fe("b", "10.96.0.2", "10.0.0.3")])
    r = Reconciler(lb.services, lb.backends).apply(changes, full=True)
    assert (r.written, r.deleted, r.errors) == (3 + 3 + 2, 0, [])
    again = SockLB(lb.pin_dir, MapSizes(services=16, backends=8, revnat=64, lb_stats=64))  # a "restarted agent"
    r = Reconciler(again.services, again.backends).apply(changes, full=True)
    assert (r.written, r.deleted) == (0, 0)
    # a Service that vanished while the agent was down goes with the first full sync
    r = Reconciler(again.services, again.backends).apply(dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2")]),
                                                         full=True)
    assert r.deleted == 2 + 1 and len(again.backends.dump()) == 2
    # and a full map refuses a Service whole, by name, on the real maps too
    big = Reconciler(again.services, again.backends).apply(
        dict([fe("big", "10.96.0.5", *[f"10.0.1.{i}" for i in range(1, 14)])]))
    assert "Service default/big" in big.errors[0] and "full" in big.errors[0]
