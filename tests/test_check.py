"""The consistency checker against the maps double (no root): clean after a sync, and each kind of
drift made by hand in the "kernel" is found and named; the agent's sampled check finds the same."""
from __future__ import annotations

import random

import numpy as np
import pytest

from agent.datapath import check as chk
from agent.datapath.check import PeriodicCheck, check
from agent.datapath.maps import addr16, port_be
from agent.datapath.reconciler import Reconciler
from agent.model.frontends import Backend, Frontend
from agent.model.objects import ObjectKey
from nodewire_dev.mapsdouble import BACKEND_KEY, BACKEND_VALUE, SERVICE_KEY, SERVICE_VALUE, MapsDouble

HOOKS = (("nw_connect4", "CGROUP_INET4_CONNECT"), ("nw_getpeername4", "CGROUP_INET4_GETPEERNAME"))


def frontends(name: str, vip: str, *ips: str, affinity: int = 0) -> tuple[ObjectKey, list[Frontend]]:
    key = ObjectKey("default", name)
    return key, [Frontend(vip, 80, "TCP", key, "", tuple(Backend(ip, 8080, "TCP") for ip in ips), affinity)]


DESIRED = dict([frontends("a", "10.96.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"),
                frontends("b", "fd00:10:96::2", "fd00::5"), frontends("c", "10.96.0.3", "10.0.0.7")])


@pytest.fixture
def synced():
    maps = MapsDouble()
    Reconciler(maps.services, maps.backends).apply(DESIRED, full=True)
    return maps


def skey(vip: str, slot: int) -> bytes:
    k = np.zeros(1, SERVICE_KEY)
    k["address"], k["port"], k["proto"], k["slot"] = addr16(vip), port_be(80), 6, slot
    return k.tobytes()


def run(maps, desired=DESIRED, **kw):
    return check(desired, maps.services, maps.backends, **kw)


def kinds(rep) -> dict[str, int]:
    return {k: n for k, n in rep.counts().items() if n}


def test_clean_after_a_sync(synced):
    rep = run(synced, attached=[{"name": fn, "attach_type": at} for fn, at in HOOKS], hooks=HOOKS)
    assert rep.clean and kinds(rep) == {} and rep.frontends_checked == 3 and rep.kernel_frontends == 3


def _backend_id(maps, vip: str, slot: int) -> int:
    return int(np.frombuffer(maps.services.entries[skey(vip, slot)], SERVICE_VALUE)[0]["backend_id"])


def test_each_kind_of_drift_is_found_and_named(synced):
    sv = synced.services.entries
    # a: slot 3 gone (slot count), slot 2 re-pointed at c's backend (missing + extra backend)
    del sv[skey("10.96.0.1", 3)]
    v = np.frombuffer(sv[skey("10.96.0.1", 2)], SERVICE_VALUE).copy()
    v["backend_id"] = _backend_id(synced, "10.96.0.3", 1)
    sv[skey("10.96.0.1", 2)] = v.tobytes()
    # c: its backend removed from the backend map (dangling slot)
    del synced.backends.entries[np.array(_backend_id(synced, "10.96.0.3", 1), BACKEND_KEY).tobytes()]
    # an orphan backend, an extra frontend, b's header gone, and a header with the wrong affinity
    synced.backends.entries[np.array(999, BACKEND_KEY).tobytes()] = np.zeros(1, BACKEND_VALUE).tobytes()
    extra = np.zeros(1, SERVICE_VALUE)
    sv[skey("10.96.9.9", 0)] = extra.tobytes()
    del sv[skey("fd00:10:96::2", 0)]
    rep = run(synced, desired={**DESIRED, **dict([frontends("a", "10.96.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3",
                                                            affinity=30)])},
              attached=[{"name": "nw_connect4", "attach_type": "CGROUP_INET4_CONNECT"}], hooks=HOOKS)
    text = "\n".join(map(str, rep.drift))
    assert not rep.clean
    # a's slot 2 now points at c's deleted backend (dangling too); a's two old backends are orphans
    assert kinds(rep) == {"missing-frontend": 1, "extra-frontend": 1, "missing-backend": 3, "slot-count": 2,
                          "dangling-slot": 2, "orphan-backend": 3, "header-mismatch": 1, "not-attached": 1}, text
    assert "slot-count: 10.96.0.1:80/TCP (default/a): slot 0 says 3 backends, slots present: [1, 2]" in text
    assert "missing-frontend: [fd00:10:96::2]:80/TCP (default/b)" in text
    assert "slot-count: [fd00:10:96::2]:80/TCP: slots [1] without a slot 0" in text
    assert "extra-frontend: 10.96.9.9:80/TCP" in text
    assert "dangling-slot: 10.96.0.3:80/TCP (default/c): slot 1 points to backend id" in text
    assert "header-mismatch: 10.96.0.1:80/TCP (default/a): affinity timeout 0s in the kernel, 30s wanted" in text
    assert "not-attached: nw_getpeername4 is not attached to the cgroup as CGROUP_INET4_GETPEERNAME" in text


def test_a_backend_no_longer_wanted_is_extra_and_the_new_one_missing(synced):
    rep = run(synced, desired={**DESIRED, **dict([frontends("c", "10.96.0.3", "10.0.0.8")])})
    assert [str(d) for d in rep.drift] == [
        "missing-backend: 10.96.0.3:80/TCP (default/c): backend 10.0.0.8:8080 is wanted, not in the slots",
        "extra-backend: 10.96.0.3:80/TCP (default/c): backend 10.0.0.7:8080 is in the slots, not wanted"]


def test_refused_services_are_reported_not_drift():
    maps = MapsDouble(services=6)  # a (4 entries) fits, b (2) fits, the third does not
    desired = dict(list(DESIRED.items()) + [frontends("d", "10.96.0.4", "10.0.0.8")])
    Reconciler(maps.services, maps.backends).apply(desired, full=True)
    rep = run(maps, desired)
    assert rep.clean, rep.drift
    assert len(rep.refused) == 2 and all("is full" in r for r in rep.refused)


def test_stale_reverse_nat_is_a_warning():
    rv = np.zeros(2, [("address", "V16"), ("port", "<u2")])
    rv["address"] = [addr16("10.96.0.1"), addr16("10.96.5.5")]
    rv["port"] = port_be(80)
    drift = chk.stale_revnat(rv, DESIRED)
    assert [str(d) for d in drift] == ["stale-revnat: 10.96.5.5:80: 1 reverse-NAT entries for a frontend that is gone"]
    assert chk.Report(drift=drift).clean


class FakeState:
    def __init__(self, desired, dirty=()):
        self.desired, self.dirty = desired, set(dirty)

    def service_keys(self):
        return list(self.desired)

    def frontends_of(self, keys):
        return {k: self.desired[k] for k in keys if k not in self.dirty}


def test_periodic_sampled_check_finds_drift_in_what_it_samples(synced):
    pc = PeriodicCheck(FakeState(DESIRED), synced.services, synced.backends, sample=10, rng=random.Random(1))
    assert pc.run().clean and pc.last.frontends_checked == 3
    del synced.services.entries[skey("10.96.0.1", 3)]
    rep = pc.run()
    assert kinds(rep) == {"slot-count": 1, "missing-backend": 1}
    # a Service changed but not synced yet is not sampled (it would look like drift)
    pc.state = FakeState(DESIRED, dirty=[ObjectKey("default", "a")])
    assert pc.run().clean and pc.runs == 3 and pc.totals["slot-count"] == 1
