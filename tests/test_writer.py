"""The writer and the whole reconciler: write order, failures, and random sequences of desired states
against the maps double (no root), checked after every kernel operation; plus real pinned maps (root)."""
from __future__ import annotations

import secrets
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.datapath.maps import addr16, port_be
from agent.datapath.plan import CLASH, MAP_FULL
from agent.datapath import reconciler as reconciler_mod
from agent.datapath.reconciler import Reconciler
from agent.datapath import abi, codec
from agent.model.frontends import Backend, Frontend
from agent.model.northsouth import ExternalFrontend, GroupKey
from agent.model.objects import ObjectKey
from agent.model.view import ServiceView
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


# -- the same with nodeport.c's maps: views through the one writer ------------------------------
EXT_IPS = ["198.18.0.11", "203.0.113.1", "fd00:18::11"]
RANGES = ["198.18.0.0/24", "192.0.2.0/28", "2001:db8::/32"]

ext_st = st.tuples(st.sampled_from(EXT_IPS), st.sampled_from([30080, 80]),
                   st.lists(st.sampled_from(POOL), max_size=3, unique=True), st.booleans(),
                   st.one_of(st.none(), st.lists(st.sampled_from(RANGES), max_size=2, unique=True)))
view_st = st.tuples(st.just([]), st.lists(ext_st, max_size=2))  # (socket frontends: the property above)
views_st = st.dictionaries(st.sampled_from(SERVICES), view_st, max_size=4)
ns_step_st = st.one_of(st.tuples(st.just("full"), views_st), st.tuples(st.just("partial"), views_st),
                       st.tuples(st.just("restart"), st.just({})), st.tuples(st.just("crash"), st.integers(0, 3)),
                       st.tuples(st.just("fail"), st.tuples(st.integers(0, 3), views_st)))


def view_of(svc: ObjectKey, spec) -> ServiceView:
    sock, ext = spec
    externals, shared = {}, {}
    for ip, port, bes, drop, ranges in ext:
        fam = 6 if ":" in ip else 4
        bes = shared.setdefault((port, fam), bes)  # a group's frontends share its backends, as in the model
        ranges = ranges if ranges is None else shared.setdefault((port, fam, "ranges"), ranges)  # … and ranges
        fe = Frontend(ip, port, "TCP", svc, f"p{port}", tuple(sorted(bes)))
        externals[(ip, port)] = ExternalFrontend(fe, "LoadBalancer", GroupKey(svc, f"p{port}", "TCP", fam),
                                                 drop and not bes, None if ranges is None else tuple(ranges))
    local = frozenset(b.ip for e in externals.values() for b in e.frontend.backends if b.ip.endswith(".1"))
    return ServiceView(svc, tuple(frontends_of(svc, sock)), tuple(externals.values()), local)


def ns_ranges(d: MapsDouble) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for k in d.ranges.entries:
        g, cidr = codec.range_text(k)
        out.setdefault(g, set()).add(cidr)
    return out


def ns_reader_check(d: MapsDouble, model_sets: list) -> list[str]:
    """After every element: no dangling entry, and a frontend the tc program can see has the source
    ranges the state before or after this sync gives it (never a window with fewer)."""
    bad = d.dangling()
    ranges = ns_ranges(d)
    for (ident, *_), _ in d._walk(d.np_services, d.np_backends):
        key = codec.np_frontend_keys(codec.ident_of(ident[0], codec.port_host(ident[1]), ident[2])).tobytes()
        raw = d.policy.entries.get(key)
        if raw is None:  # (dangling() names it)
            continue
        row = np.frombuffer(raw, codec.NP_POLICY)[0]
        if not row["flags"] & abi.NP_F_SOURCE_RANGES:
            continue
        have = ranges.get(int(row["group"]), set())
        if not any(have >= (want.get(key) or set()) for want in model_sets):
            bad.append(f"{codec.ident_text(key)}: ranges {sorted(have)} in the window")
    return bad


def ns_expected(model: dict[ObjectKey, ServiceView]):
    """(np frontends as the double reads them, each frontend's ranges by policy key, local addresses)."""
    fes, ranges, local = {}, {}, set()
    for v in model.values():
        local |= v.local_addresses
        for e in v.external:
            f = e.frontend
            fes[ident(f)] = (len(f.backends), 0, 0, tuple((addr16(b.ip), port_be(b.port), 6) for b in f.backends))
            key = codec.np_frontend_keys(codec.idents([f.ip], [f.port], [f.protocol])).tobytes()
            if key in ranges:  # claimed twice: which Service keeps it shows only after the apply
                ranges[key] = set()
            else:
                ranges[key] = None if e.source_ranges is None else set(e.source_ranges)
    return fes, ranges, local


def ns_admit(model, views, res, full):
    refused = {r.service for r in res.refusals}
    new = {s: v for s, v in model.items() if not full or s in refused}
    new.update({s: v for s, v in views.items() if s not in refused})
    return {s: v for s, v in new.items() if v is not None and (v.socket or v.external)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(ns_step_st, min_size=1, max_size=6), cap=st.sampled_from([8, 64]))
def test_random_views_reach_every_map_and_no_packet_meets_a_frontend_without_its_policy(steps, cap):
    """The property above over nodeport.c's maps too: every element applied is checked (no dangling
    slot or backend, no frontend without its policy row, no Maglev flag without a table, no source
    range missing from a visible frontend); each step ends with the maps equal to the model."""
    sets: list = [{}]
    d = MapsDouble(cap, cap, check=lambda m: gaps.extend(ns_reader_check(m, sets)), northsouth=True)
    gaps: list = []
    dp = d.datapath()
    model: dict[ObjectKey, ServiceView] = {}
    for kind, arg in steps:
        if kind == "restart":
            dp = d.datapath()
            res = dp.apply(dict(model), full=True)
            assert (res.written, res.deleted) == (0, 0), "a restarted agent rewrote what was right"
            continue
        if kind == "crash":  # a write fails part-way; the agent restarts and syncs fully
            d.policy.fail_after = d.policy.syscalls + arg
            d.np_services.fail_after = d.np_services.syscalls + arg
            sets[:] = [ns_expected(model)[1], {}]
            dp.apply({s: None for s in model})
            d.policy.fail_after = d.np_services.fail_after = None
            dp = d.datapath()
            views, kind = dict(model), "full"
            sets[:] = [{}, ns_expected(model)[1]]
        elif kind == "fail":  # a write fails part-way; the same agent retries those views on its next apply
            n, arg = arg
            views = {s: view_of(s, spec) for s, spec in arg.items()}
            sets[:] = [ns_expected(model)[1], ns_expected({**model, **views})[1]]
            d.policy.fail_after = d.policy.syscalls + n
            failed = dp.apply(views)
            d.policy.fail_after = None
            if failed.write_error is None:
                model = ns_admit(model, views, failed, False)
            retried, views, kind = (views if failed.write_error else {}), {}, "retry"
        else:
            views = {s: view_of(s, spec) for s, spec in arg.items()}
            if kind == "partial" and model:
                views.setdefault(next(iter(model)), None)
            after = {**model, **{k: v for k, v in views.items() if v}}
            sets[:] = [ns_expected(model)[1], ns_expected(after if kind != "full" else views)[1]]
        res = dp.apply(views, full=(kind == "full"))
        assert res.write_error is None
        model = ns_admit(model, {**retried, **views} if kind == "retry" else views, res, kind == "full")
        assert gaps == []
        fes, ranges, local = ns_expected(model)
        got = {k: v[:2] + v[3:] for k, v in d.frontends_of(d.np_services, d.np_backends).items()}
        assert {k: (c, aff, bes) for k, (c, _f, aff, bes) in got.items()} == {k: (c, a, b) for k, (c, _f, a, b) in fes.items()}
        assert {k for k in d.policy.entries} == set(ranges)
        have = ns_ranges(d)
        for k, want in ranges.items():
            row = np.frombuffer(d.policy.entries[k], codec.NP_POLICY)[0]
            assert bool(row["flags"] & abi.NP_F_SOURCE_RANGES) == (want is not None)
            if want is not None:
                assert have.get(int(row["group"]), set()) == want
        assert {codec.addr_str(a) for a in d.local.entries} == local
        groups = {int(np.frombuffer(v, codec.NP_POLICY)[0]["group"]) for v in d.policy.entries.values()}
        assert set(d.maglev.dump_tables()) <= groups and set(have) <= groups


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


@pytest.fixture
def np_maps():
    from agent.datapath.loader import MapSizes
    from agent.datapath.nodeport import NodePortDatapath

    pin = f"/sys/fs/bpf/nwtest-{secrets.token_hex(3)}"
    sizes = MapSizes(services=64, backends=32, revnat=64, lb_stats=64)
    try:
        yield lambda: NodePortDatapath(pin, sizes, maglev_size=251)
    finally:
        shutil.rmtree(pin, ignore_errors=True)


@pytest.mark.root
def test_the_codec_layouts_are_the_ones_bcc_derives_for_every_map_the_agent_writes(lb, np_maps):
    dp = np_maps()
    loaded = {**dp.loaded.maps, abi.SERVICES_MAP: lb.services, abi.BACKENDS_MAP: lb.backends}
    for name, (key, value) in codec.LAYOUTS.items():
        assert (loaded[name].key_dtype, loaded[name].value_dtype) == (key, value), name


@pytest.mark.root
def test_real_northsouth_maps_take_one_plan_and_a_restart_rewrites_nothing(lb, np_maps):
    """The one writer on the kernel's LPM trie, hash of arrays and hashes: written, re-learned, removed."""
    from agent.datapath.datapath import Datapath

    svc = SERVICES[0]
    view = view_of(svc, ([], [("203.0.113.1", 80, POOL[:3], False, ["198.18.0.0/24", "192.0.2.0/28"]),
                              ("198.18.0.11", 30080, POOL[:3], False, None)]))
    dp = np_maps()
    r = Datapath(Reconciler(lb.services, lb.backends), dp.maps).apply({svc: view}, full=True)
    assert r.errors == [] and len(dp.maps.side.tables) == 2 and len(list(dp.maps.ranges.keys())) == 2
    again = np_maps()  # a restarted agent
    assert set(again.maps.side.tables) == set(dp.maps.side.tables) and again.maps.side.ranges == dp.maps.side.ranges
    r = Datapath(Reconciler(lb.services, lb.backends), again.maps).apply({svc: view}, full=True)
    assert (r.written, r.deleted, r.errors) == (0, 0, [])
    r = Datapath(Reconciler(lb.services, lb.backends), again.maps).apply({}, full=True)
    assert r.errors == [] and not list(again.maps.ranges.keys()) and not again.maps.policy.dump()
    assert not again.maps.maglev.dump_tables() and not again.maps.lb.services.dump()


def test_the_doubles_lpm_trie_and_lru_behave_as_the_kernels():
    """What nodeport.c asks of nodewire_np_ranges_v1 (a /32+128 lookup of (group, client)) and an LRU."""
    d = MapsDouble(northsouth=True)
    keys = [codec.range_key(1, "198.18.0.0/24"), codec.range_key(2, "2001:db8::/32")]
    d.ranges.update_arrays(np.frombuffer(b"".join(keys), codec.NP_RANGE_KEY), np.ones(2, codec.U8))

    def probe(group, ip):
        return d.ranges.lookup(codec.range_key(group, ip + ("/128" if ":" in ip else "/32"))) is not None

    assert probe(1, "198.18.0.77") and not probe(1, "198.18.1.1") and not probe(2, "198.18.0.77")
    assert probe(2, "2001:db8:5::1") and not probe(1, "2001:db8:5::1")
    from nodewire_dev.mapsdouble import LruMap

    lru = LruMap("lru", codec.U32, codec.U32, 2)
    for k in (1, 2, 1, 3):  # 2 is the least recently used when 3 comes
        lru.update_arrays(np.array([k], codec.U32), np.array([k], codec.U32))
    assert sorted(int.from_bytes(k, "little") for k in lru.entries) == [1, 3]


def test_after_a_restart_two_groups_never_share_an_id():
    """A frontend whose policy row names group 1 moves to another Service while the agent is down: the
    group that claims id 1 first keeps it, the other gets a fresh id (ranges and tables stay apart)."""
    d = MapsDouble(northsouth=True)
    a, b = SERVICES[0], SERVICES[1]
    ext = [("198.18.0.11", 30080, POOL[:1], False, None), ("203.0.113.1", 30080, POOL[:1], False, ["198.18.0.0/24"])]
    assert d.datapath().apply({a: view_of(a, ([], ext))}, full=True).errors == []
    moved = {a: view_of(a, ([], ext[:1])), b: view_of(b, ([], [("203.0.113.1", 30080, POOL[1:2], False,
                                                                    ["192.0.2.0/28"])]))}
    assert d.datapath().apply(moved, full=True).errors == []  # a restart, then the full sync
    groups = {codec.ident_text(k): int(np.frombuffer(v, codec.NP_POLICY)[0]["group"]) for k, v in d.policy.entries.items()}
    assert len(set(groups.values())) == 2, groups
    assert ns_ranges(d) == {groups[("203.0.113.1", 30080, "TCP")]: {"192.0.2.0/28"}}
