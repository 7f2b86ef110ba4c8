"""The reconciler against real (pinned) BPF maps: minimal writes, safe order, capacity errors."""
from __future__ import annotations

import shutil
import secrets

import pytest

from agent.datapath.loader import MapSizes, SockLB
from agent.datapath.reconciler import Reconciler
from agent.model.frontends import Backend, Frontend
from agent.model.objects import ObjectKey

pytestmark = pytest.mark.root


class Recorder:
    """Wraps a real map and records the order of operations on it."""

    def __init__(self, raw, log, tag):
        self.raw, self.log, self.tag = raw, log, tag

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def update_arrays(self, keys, values):
        if len(keys):
            self.log.append((self.tag, "update", len(keys)))
        self.raw.update_arrays(keys, values)

    def delete_array(self, keys):
        if len(keys):
            self.log.append((self.tag, "delete", len(keys)))
        self.raw.delete_array(keys)


@pytest.fixture
def lb():
    pin = f"/sys/fs/bpf/nwtest-{secrets.token_hex(3)}"
    sock_lb = SockLB(pin, MapSizes(services=16, backends=8, revnat=64, lb_stats=64))
    try:
        yield sock_lb
    finally:
        shutil.rmtree(pin, ignore_errors=True)


def fe(svc: str, vip: str, *backend_ips: str) -> tuple[ObjectKey, list[Frontend]]:
    key = ObjectKey("default", svc)
    return key, [Frontend(vip, 80, "TCP", key, "", tuple(Backend(ip, 8080, "TCP") for ip in backend_ips))]


def test_apply_twice_writes_nothing_the_second_time(lb):
    rec = Reconciler(lb.services, lb.backends)
    changes = dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2"), fe("b", "10.96.0.2", "10.0.0.2")])
    r1 = rec.apply(changes, full=True)
    assert (r1.written, r1.deleted, r1.errors) == (2 + 3 + 2, 0, [])  # 2 backends, 3 slots, 2 headers
    r2 = rec.apply(changes, full=True)
    assert (r2.written, r2.deleted) == (0, 0)
    assert len(lb.services.dump()) == 5 and len(lb.backends.dump()) == 2


def test_writes_go_backends_slots_headers_then_deletes_in_reverse(lb):
    log: list = []
    rec = Reconciler(Recorder(lb.services, log, "services"), Recorder(lb.backends, log, "backends"))
    rec.apply(dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3")]), full=True)
    assert log == [("backends", "update", 3), ("services", "update", 3), ("services", "update", 1)]
    log.clear()
    # Shrink to a new single backend: new backend, slot 1, header (count 1), then stale slots, old backends.
    rec.apply(dict([fe("a", "10.96.0.1", "10.0.0.9")]))
    assert log == [("backends", "update", 1), ("services", "update", 1), ("services", "update", 1),
                   ("services", "delete", 2), ("backends", "delete", 3)]
    log.clear()
    rec.apply({ObjectKey("default", "a"): []})
    # Header first (lookups miss from then on), then the slot, then the backend.
    assert log == [("services", "delete", 1), ("services", "delete", 1), ("backends", "delete", 1)]
    assert lb.services.dump() == {} and lb.backends.dump() == {}


def test_a_full_map_refuses_the_whole_service_by_name_and_keeps_the_others(lb):
    rec = Reconciler(lb.services, lb.backends)
    ok = rec.apply(dict([fe("a", "10.96.0.1", *[f"10.0.0.{i}" for i in range(1, 6)])]), full=True)
    assert ok.errors == []
    before = lb.services.dump()
    # 16 service slots: 6 used; "big" needs 1 + 12 > 10 left.
    res = rec.apply(dict([fe("big", "10.96.0.2", *[f"10.0.1.{i}" for i in range(1, 13)])]))
    assert len(res.errors) == 1
    assert "Service default/big" in res.errors[0] and "full" in res.errors[0]
    assert lb.services.dump() == before  # nothing half-written
    # A Service that fits still goes in.
    assert rec.apply(dict([fe("small", "10.96.0.3", "10.0.0.1")])).errors == []


def test_a_new_reconciler_relearns_ids_from_the_pinned_maps(lb):
    changes = dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2"), fe("b", "10.96.0.2", "10.0.0.3")])
    Reconciler(lb.services, lb.backends).apply(changes, full=True)
    again = SockLB(lb.pin_dir, MapSizes(services=16, backends=8, revnat=64, lb_stats=64))  # a "restarted agent"
    rec2 = Reconciler(again.services, again.backends)
    r = rec2.apply(changes, full=True)
    assert (r.written, r.deleted) == (0, 0)
    # And a Service that vanished while the agent was down is removed by the first full sync.
    r = Reconciler(again.services, again.backends).apply(dict([fe("a", "10.96.0.1", "10.0.0.1", "10.0.0.2")]), full=True)
    assert r.deleted == 2 + 1  # b's header and slot, and its backend
    assert len(again.backends.dump()) == 2


def test_two_services_claiming_one_frontend_is_an_error_naming_both(lb):
    rec = Reconciler(lb.services, lb.backends)
    rec.apply(dict([fe("a", "10.96.0.1", "10.0.0.1")]), full=True)
    res = rec.apply(dict([fe("b", "10.96.0.1", "10.0.0.2")]))
    assert res.errors == ["Service default/b: frontend already served by Service default/a; not applied"]
