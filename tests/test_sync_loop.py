"""The sync loop without root: ClusterState → SyncLoop → the datapath (the socket reconciler over the
maps double), checked by reading the double back as the kernel's programs would."""
from __future__ import annotations

import threading

from agent.components.datapath import LBDatapath
from agent.datapath.maps import addr_str, port_host
from agent.datapath.reconciler import Reconciler
from agent.model.objects import ObjectKey
from agent.model.parse import parse_endpoint_slice, parse_service
from agent.state import ClusterState
from agent.sync_loop import SyncLoop
from nodewire_dev.mapsdouble import MapsDouble
from tests.conftest import wait_for
from tests.manifests import endpoint_slice, service

WEB, API = ObjectKey("default", "web"), ObjectKey("default", "api")
TCP = 6


def put(state: ClusterState, name: str, vip: str, backends: list[str]) -> None:
    state.apply("Service", ObjectKey("default", name), parse_service(service(name, [vip])))
    sl = parse_endpoint_slice(endpoint_slice(name, backends))
    state.apply("EndpointSlice", sl.key, sl)


def served(double: MapsDouble) -> dict[str, list[str]]:
    """VIP → backend addresses, as a connect() would find them (AssertionError on a dangling entry)."""
    out = {}
    for (addr, port, proto, _scope), (_count, _flags, _sid, _aff, bes) in double.frontends().items():
        assert (port_host(port), proto) == (80, TCP)
        out[addr_str(addr)] = sorted(addr_str(a) for a, p, _ in bes if port_host(p) == 8080)
    return out


def loop_over(double: MapsDouble, state: ClusterState | None = None) -> SyncLoop:
    state = state or ClusterState("node-a")
    return SyncLoop(state, LBDatapath(Reconciler(double.services, double.backends)))


def test_full_sync_writes_every_service_and_counts_it():
    double = MapsDouble()
    loop = loop_over(double)
    put(loop.state, "web", "10.96.0.10", ["10.0.0.1", "10.0.0.2"])
    put(loop.state, "api", "10.96.0.11", ["10.0.0.3"])
    res = loop.sync_once(full=True)
    assert served(double) == {"10.96.0.10": ["10.0.0.1", "10.0.0.2"], "10.96.0.11": ["10.0.0.3"]}
    assert res.services == 2 and loop.counters.syncs == 1 and loop.counters.written == res.written > 0
    assert loop.first_sync is not None and loop.first_sync.full and loop.service_count() == 2
    assert loop.map_fill()["nodewire_services_v1"].entries == 2 + 3  # a header and a slot per backend


def test_a_change_syncs_only_its_service_and_nothing_when_idle():
    double = MapsDouble()
    loop = loop_over(double)
    put(loop.state, "web", "10.96.0.10", ["10.0.0.1"])
    put(loop.state, "api", "10.96.0.11", ["10.0.0.3"])
    loop.sync_once(full=True)
    assert loop.sync_once() is None  # nothing dirty: no datapath call at all
    put(loop.state, "web", "10.96.0.10", ["10.0.0.1", "10.0.0.9"])
    res = loop.sync_once()
    assert res.services == 1 and served(double)["10.96.0.10"] == ["10.0.0.1", "10.0.0.9"]
    assert loop.counters.syncs == 2 and not loop.last_sync.full
    loop.state.apply("Service", WEB, None)
    loop.sync_once()
    assert served(double) == {"10.96.0.11": ["10.0.0.3"]} and loop.service_count() == 1


def test_a_restarted_loop_over_the_same_maps_rewrites_nothing():
    double = MapsDouble()
    first = loop_over(double)
    put(first.state, "web", "10.96.0.10", ["10.0.0.1", "10.0.0.2"])
    first.sync_once(full=True)
    before = dict(double.services.entries), dict(double.backends.entries)
    calls = double.services.syscalls + double.backends.syscalls
    again = loop_over(double, first.state)  # a new agent process: ids re-learned from the maps
    res = again.sync_once(full=True)
    assert (res.written, res.deleted) == (0, 0)
    assert (dict(double.services.entries), dict(double.backends.entries)) == before
    assert double.services.syscalls + double.backends.syscalls == calls


def test_refused_services_are_remembered_until_they_fit():
    double = MapsDouble(services=4)  # room for one header and three slots
    loop = loop_over(double)
    put(loop.state, "web", "10.96.0.10", ["10.0.0.1"])
    put(loop.state, "api", "10.96.0.11", ["10.0.0.2", "10.0.0.3", "10.0.0.4"])
    res = loop.sync_once(full=True)
    assert [r.service for r in res.refusals] == list(loop.refused) and len(loop.refused) == 1
    assert loop.counters.sync_errors == 1 and loop.sync_errors.recent
    refused = next(iter(loop.refused))
    loop.state.apply("Service", refused, None)  # the refused one leaves: nothing is refused any more
    loop.sync_once()
    assert loop.refused == set() and len(served(double)) == 1


def test_hooks_run_after_each_sync_and_every_turn():
    double = MapsDouble()
    loop = loop_over(double)
    put(loop.state, "web", "10.96.0.10", ["10.0.0.1"])
    synced, ticks = [], []
    loop.after_sync.append(lambda changes, res: synced.append((sorted(k.name for k in changes), dict(served(double)))))
    stop = threading.Event()
    t = threading.Thread(target=loop.run, args=(stop, [lambda: ticks.append(1)]), daemon=True)
    t.start()
    try:
        wait_for(lambda: synced, 10, what="the full sync")
        put(loop.state, "api", "10.96.0.11", ["10.0.0.3"])
        wait_for(lambda: len(synced) == 2, 10, what="the change synced")
        wait_for(lambda: ticks, 10, what="a tick after the change")
    finally:
        stop.set()
        loop.state.changed.set()
        t.join(10)
    assert not t.is_alive()
    # the hook saw the maps already written: it runs after the datapath, before the records
    assert synced[0] == (["web"], {"10.96.0.10": ["10.0.0.1"]})
    assert synced[1] == (["api"], {"10.96.0.10": ["10.0.0.1"], "10.96.0.11": ["10.0.0.3"]})
    assert loop.counters.syncs == 2


def test_a_failing_datapath_write_is_retried_at_the_next_sync():
    double = MapsDouble()
    loop = loop_over(double)
    put(loop.state, "web", "10.96.0.10", ["10.0.0.1"])
    loop.sync_once(full=True)
    double.services.fail_after = double.services.syscalls  # the next service-map syscall fails
    put(loop.state, "web", "10.96.0.10", ["10.0.0.2"])
    res = loop.sync_once()
    assert res.write_error and loop.counters.sync_errors == 1
    double.services.fail_after = None
    put(loop.state, "api", "10.96.0.11", ["10.0.0.3"])  # any later change: the failed one goes with it
    loop.sync_once()
    assert served(double) == {"10.96.0.10": ["10.0.0.2"], "10.96.0.11": ["10.0.0.3"]}
