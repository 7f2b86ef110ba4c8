"""The planner without root: clashes, capacity, the slot diff, refusal summaries, restoring ids."""
from __future__ import annotations

import socket

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.datapath import keyindex as ids_mod
from agent.datapath import desired as desired_mod
from agent.datapath import plan as plan_mod
from agent.datapath.codec import KEY
from agent.datapath.ids import IdRegistry
from agent.datapath.keyindex import KeyIndex
from agent.datapath.plan import CLASH, MAP_FULL, TOO_MANY_BACKENDS, Capacities, Limit, plan, summarize
from agent.datapath.reconciler import Reconciler
from agent.model.frontends import Backend, Frontend
from agent.model.objects import ObjectKey
from nodewire_dev.mapsdouble import MapsDouble

CAPS = Capacities(Limit("nodewire_services_v1", 64), Limit("nodewire_backends_v1", 32))


def fe(svc: str, vip: str, *backend_ips: str, port: int = 80, affinity: int = 0):
    key = ObjectKey("default", svc)
    return key, [Frontend(vip, port, "TCP", key, "http", tuple(Backend(ip, 8080, "TCP") for ip in backend_ips),
                          affinity)]


def applied(double: MapsDouble, *services, full=False) -> Reconciler:
    rec = Reconciler(double.services, double.backends)
    res = rec.apply(dict(services), full=full)
    assert res.errors == []
    return rec


def test_a_new_service_is_planned_backends_slots_header_and_planning_changes_nothing():
    reg = IdRegistry()
    p = plan(dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2")]), reg, CAPS)
    assert [(ph.name, len(ph)) for ph in p.phases()] == [
        ("new backends", 2), ("slots", 2), ("headers", 1),
        ("removed headers", 0), ("removed slots", 0), ("unreferenced backends", 0)]
    assert p.header_writes["count"].tolist() == [2] and p.slot_writes["slot"].tolist() == [1, 2]
    assert set(p.slot_writes["backend_id"].tolist()) == set(p.new_backends["id"].tolist())
    assert reg.backends.count == 0 and reg.frontends.count == 0 and reg.svc_entries == 0  # pure


def test_two_services_claiming_one_frontend_is_a_refusal_naming_both():
    d = MapsDouble(64, 32)
    rec = applied(d, fe("a", "10.96.0.1", "10.0.0.1"))
    res = rec.apply(dict([fe("b", "10.96.0.1", "10.0.0.2")]))
    assert res.errors == ["Service default/b: frontend already served by Service default/a; not applied"]
    assert [(r.kind, r.service, r.other) for r in res.refusals] == [(CLASH, ObjectKey("default", "b"),
                                                                     ObjectKey("default", "a"))]
    # Two new claimants in one batch: the first listed wins.
    res = rec.apply(dict([fe("c", "10.96.0.9", "10.0.0.3"), fe("d", "10.96.0.9", "10.0.0.4")]))
    assert [str(r) for r in res.refusals] == [
        "Service default/d: frontend already served by Service default/c; not applied"]


def test_a_frontend_handed_from_one_service_to_another_in_one_batch_moves():
    d = MapsDouble(64, 32)
    rec = applied(d, fe("a", "10.96.0.1", "10.0.0.1"))
    sid = next(iter(d.frontends().values()))[2]
    # b is listed first and takes a's VIP while a moves to another one.
    res = rec.apply(dict([fe("b", "10.96.0.1", "10.0.0.2"), fe("a", "10.96.0.7", "10.0.0.1")]))
    assert res.errors == []
    names = {v["frontend"]: v["service"] for v in rec.service_names().values()}
    assert names == {"10.96.0.1:80/TCP": "default/b", "10.96.0.7:80/TCP": "default/a"}
    assert {v[2] for k, v in d.frontends().items()} >= {sid}  # the frontend kept its service id


def test_a_refused_service_keeps_its_old_frontends_and_so_blocks_who_wanted_them():
    d = MapsDouble(64, 32)
    rec = applied(d, fe("a", "10.96.0.1", "10.0.0.1"), fe("x", "10.96.0.5", "10.0.0.5"))
    # a wants x's VIP (refused: x keeps it); b wants a's old VIP, which a keeps since it was refused.
    res = rec.apply(dict([fe("a", "10.96.0.5", "10.0.0.1"), fe("b", "10.96.0.1", "10.0.0.2")]))
    assert sorted(str(r.service) for r in res.refusals) == ["default/a", "default/b"]
    names = {v["frontend"]: v["service"] for v in rec.service_names().values()}
    assert names == {"10.96.0.1:80/TCP": "default/a", "10.96.0.5:80/TCP": "default/x"}


def test_a_service_that_would_overflow_a_map_is_refused_whole_naming_it_and_the_map():
    d = MapsDouble(16, 8)
    rec = applied(d, fe("a", "10.96.0.1", *[f"10.0.0.{i}" for i in range(1, 6)]))
    before = dict(d.services.entries)
    res = rec.apply(dict([fe("big", "10.96.0.2", *[f"10.0.1.{i}" for i in range(1, 13)]),
                          fe("small", "10.96.0.3", "10.0.0.1")]))
    assert [(r.kind, str(r.service), r.limit.name) for r in res.refusals] == [
        (MAP_FULL, "default/big", "nodewire_services_v1")]
    assert "Service default/big" in res.errors[0] and "nodewire_services_v1 is full (16 entries)" in res.errors[0]
    assert all(d.services.entries[k] == v for k, v in before.items())  # a's entries untouched
    assert len(d.services.entries) == len(before) + 2  # small went in
    # the backend map: 8 ids, 5 used; 4 new backends do not fit, 3 do
    res = rec.apply(dict([fe("c", "10.96.0.4", *[f"10.0.2.{i}" for i in range(4)])]))
    assert [(r.kind, r.limit.name) for r in res.refusals] == [(MAP_FULL, "nodewire_backends_v1")]
    assert rec.apply(dict([fe("c", "10.96.0.4", *[f"10.0.2.{i}" for i in range(3)])])).errors == []


def test_room_freed_by_deletes_in_the_same_batch_is_not_counted():
    """Deletes run after writes: the map holds old and new entries at once in between."""
    d = MapsDouble(8, 8)
    rec = applied(d, fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"))  # 4 entries
    res = rec.apply({ObjectKey("default", "a"): [], **dict([fe("b", "10.96.0.2", "10.0.0.4", "10.0.0.5",
                                                                  "10.0.0.6", "10.0.0.7", "10.0.0.8")])})
    assert [str(r.service) for r in res.refusals] == ["default/b"]
    assert d.services.entries == {}  # a's removal went through


def test_a_port_with_more_endpoints_than_a_header_can_count_is_refused():
    ips = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(65536)]
    p = plan(dict([fe("huge", "10.96.0.1", *ips)]), IdRegistry(),
             Capacities(Limit("s", 1 << 20), Limit("b", 1 << 20)))
    assert [(r.kind, str(r.service)) for r in p.refusals] == [(TOO_MANY_BACKENDS, "default/huge")]
    assert p.written_count == 0


def test_thousands_of_refusals_summarize_to_one_line_with_a_count_and_the_first_names():
    d = MapsDouble(4, 4)
    rec = Reconciler(d.services, d.backends)
    res = rec.apply(dict(fe(f"s{i:04d}", f"10.96.{i // 256}.{i % 256}", f"10.0.{i // 256}.{i % 256}")
                         for i in range(2000)))
    assert len(res.refusals) == 1998  # two fit (header + slot each)
    assert res.summary() == ["1998 Services not applied: map nodewire_services_v1 full (4 entries): "
                             "default/s0002, default/s0003, default/s0004, …"]
    assert summarize([]) == []


def test_the_slot_diff_writes_only_what_changed():
    d = MapsDouble(64, 32)
    rec = applied(d, fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"))
    p = plan(dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.4", "10.0.0.3")]), rec.registry, CAPS)
    assert p.slot_writes["slot"].tolist() == [2] and len(p.new_backends["id"]) == 1
    assert len(p.header_writes["count"]) == 0          # count and flags unchanged
    assert len(p.backend_deletes["id"]) == 1           # 10.0.0.2 lost its only slot
    p = plan(dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3", affinity=30)]), rec.registry, CAPS)
    assert p.written_count == 1 and p.header_writes["flags"].tolist() == [1]  # NW_SVC_F_AFFINITY
    assert p.header_writes["affinity"].tolist() == [30]


def test_a_restarted_registry_keeps_ids_and_rewrites_nothing_that_is_right():
    d = MapsDouble(64, 32)
    want = dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2"), fe("b", "10.96.0.2", "10.0.0.2")])
    rec = applied(d, *want.items(), full=True)
    ids = rec.service_names()
    again = Reconciler(d.services, d.backends)
    snap, refs = again.snapshot(), again.registry.backends.refs
    # refcounts learnt from the slots
    assert {snap.backend(b)[0]: int(refs[b]) for b in snap.backend_ids()} == {"10.0.0.1": 1, "10.0.0.2": 2}
    res = again.apply(want, full=True)
    assert (res.written, res.deleted) == (0, 0)
    assert again.service_names() == ids


def test_slots_orphaned_by_a_crash_mid_delete_are_removed_by_the_next_full_sync():
    d = MapsDouble(64, 32)
    applied(d, fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2"), fe("b", "10.96.0.2", "10.0.0.3"))
    # the crash: b's header deleted, its slot and backend not yet
    keys, _ = d.services.dump_arrays()
    sids = {k["address"].tobytes()[-1]: k for k in keys if k["slot"] == 0}
    d.services.delete_array(np.array([sids[2]]))
    rec = Reconciler(d.services, d.backends)
    res = rec.apply(dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2")]), full=True)
    assert (res.written, res.deleted) == (0, 2)  # b's slot, then its backend
    assert len(d.services.entries) == 3 and len(d.backends.entries) == 2


def test_a_slot_missing_under_a_header_is_rewritten_alone():
    d = MapsDouble(64, 32)
    want = dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3")])
    applied(d, *want.items())
    keys, _ = d.services.dump_arrays()
    d.services.entries.pop(keys[keys["slot"] == 2].tobytes())
    res = Reconciler(d.services, d.backends).apply(want, full=True)
    assert (res.written, res.deleted) == (1, 0) and list(d.frontends().values())[0][0] == 3


def test_an_orphaned_frontend_claimed_again_gets_a_header_and_only_the_slots_that_differ():
    d = MapsDouble(64, 32)
    applied(d, fe("b", "10.96.0.2", "10.0.0.3", "10.0.0.4"))
    keys, _ = d.services.dump_arrays()
    d.services.delete_array(keys[keys["slot"] == 0])
    rec = Reconciler(d.services, d.backends)
    res = rec.apply(dict([fe("b", "10.96.0.2", "10.0.0.3", "10.0.0.4")]))
    assert (res.written, res.deleted) == (1, 0)  # the header only
    assert list(d.frontends().values())[0][0] == 2


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 40), max_size=6)), max_size=25),
       collide=st.booleans())
def test_the_key_index_finds_every_live_key_through_merges_removals_and_equal_hashes(ops, collide):
    """KeyIndex against a dict: additions go to the overlay, merged past MERGE_AT; removals leave
    tombstones; with `collide`, every key hashes alike, so runs of equal hashes are walked."""
    index = KeyIndex()
    index.MERGE_AT = 3
    model: dict[int, int] = {}  # key number → id
    orig = ids_mod.key_hash
    if collide:
        ids_mod.key_hash = lambda keys: np.zeros(len(keys), np.uint64)
    try:
        for add, numbers in ops:
            numbers = sorted(set(numbers))
            if add:
                new = [n for n in numbers if n not in model]
                got = index.reserve(len(new))
                index.add(got, _keys(new))
                model.update(zip(new, got.tolist()))
            else:
                gone = [n for n in numbers if n in model]
                index.remove(np.array([model.pop(n) for n in gone], np.uint32))
            probe = list(range(41))
            assert index.lookup(_keys(probe)).tolist() == [model.get(n, 0) for n in probe]
            assert index.count == len(model) and sorted(index.live_ids().tolist()) == sorted(model.values())
    finally:
        ids_mod.key_hash = orig
    assert len(set(model.values())) == len(model)


def _keys(numbers) -> np.ndarray:
    k = np.zeros(len(numbers), KEY)
    k["b"] = np.array(numbers, np.uint64) + 1
    k["c"] = 6
    return k


def test_distinct_keys_are_found_exactly_even_when_hashes_collide(monkeypatch):
    monkeypatch.setattr(desired_mod, "key_hash", lambda keys: np.zeros(len(keys), np.uint64))
    first, inverse = desired_mod.unique_keys(_keys([5, 3, 5, 7, 3]))
    assert inverse.tolist() == [0, 1, 0, 2, 1] and first.tolist() == [0, 1, 3]


def test_a_service_new_to_the_registry_claiming_an_unowned_frontend_does_not_hide_anothers_removal():
    """After a failed write the registry holds b's half-written frontend owned by none; when b comes
    again beside a (which drops one of its frontends), a's dropped frontend still goes (a new Service's
    claim on an unowned frontend was counted as a's own, so nothing was looked for)."""
    d = MapsDouble(64, 32)
    a, b, c = (ObjectKey("default", n) for n in "abc")
    fe = lambda svc, vip, ip: Frontend(vip, 80, "TCP", svc, "", (Backend(ip, 8080, "TCP"),))  # noqa: E731
    rec = Reconciler(d.services, d.backends)
    rec.apply({a: [fe(a, "10.96.0.1", "10.0.0.1"), fe(a, "10.96.0.2", "10.0.0.1")], c: [fe(c, "10.96.0.4", "10.0.0.4")]})
    d.backends.fail_after = d.backends.syscalls + 1  # b goes in, c's frontend goes, its backend's delete fails
    assert rec.apply({b: [fe(b, "10.96.0.3", "10.0.0.3")], c: []}).write_error
    d.backends.fail_after = None
    res = rec.apply({a: [fe(a, "10.96.0.1", "10.0.0.1")], b: [fe(b, "10.96.0.3", "10.0.0.3")]})
    assert res.errors == []
    vips = sorted(socket.inet_ntop(socket.AF_INET6, k[0]) for k in d.frontends())
    assert vips == ["::ffff:10.96.0.1", "::ffff:10.96.0.3"]
