"""ClusterState and the compact records: one apply path for every kind, frontends from packed columns."""
from __future__ import annotations

import sys

from agent.model.objects import READY, SERVING, TERMINATING, ObjectKey
from agent.model.parse import parse_endpoint_slice, parse_pod, parse_service
from agent.state import ClusterState
from tests.manifests import endpoint_slice, service

WEB = ObjectKey("default", "web")


def _slice(name="web", addrs=("10.0.0.1", "10.0.0.2"), ready=None, suffix="", **kw):
    return parse_endpoint_slice(endpoint_slice(name, list(addrs), ready=ready, suffix=suffix, **kw))


def test_a_slice_is_columns_not_one_object_per_endpoint():
    raw = endpoint_slice("web", [f"10.0.0.{i}" for i in range(1, 101)])
    raw["endpoints"][1]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    raw["endpoints"][2]["nodeName"] = "node-a"
    raw["endpoints"][2]["zone"] = "z1"
    sl = parse_endpoint_slice(raw)
    assert len(sl) == 100 and len(sl.addresses) == 400 and len(sl.conditions) == 100
    assert sl.conditions[0] == READY | SERVING and sl.conditions[1] == SERVING | TERMINATING
    assert sl.node_name(2) == "node-a" and sl.zone(2) == "z1" and sl.node_name(0) == ""
    e = sl.endpoints[1]  # a view made on demand
    assert (e.addresses, e.ready, e.serving, e.terminating) == (("10.0.0.2",), False, True, True)


def test_identical_port_tuples_and_names_are_shared():
    a, b = parse_service(service("a", ["10.96.0.1"])), parse_service(service("b", ["10.96.0.2"]))
    assert a.ports is b.ports
    sa, sb = _slice("a"), _slice("b")
    assert sa.ports is sb.ports
    assert sa.service is sys.intern("a")


def test_ipv6_and_fqdn_slices():
    sl = _slice(addrs=("fd00::1", "FD00:0::2"))
    assert [sl.address(i) for i in range(2)] == ["fd00::1", "fd00::2"] and len(sl.addresses) == 32
    raw = endpoint_slice("web", ["10.0.0.1"])
    raw["addressType"] = "FQDN"
    raw["endpoints"] = [{"addresses": ["a.example"]}, {"addresses": ["b.example"]}]
    fq = parse_endpoint_slice(raw)
    assert [fq.address(i) for i in range(2)] == ["a.example", "b.example"]


def test_one_apply_path_dirties_only_the_owning_service():
    st = ClusterState()
    assert st.apply("Service", WEB, parse_service(service("web", ["10.96.0.1"])))
    assert st.apply("EndpointSlice", ObjectKey("default", "web-ipv4"), _slice())
    st.apply("Service", ObjectKey("default", "db"), parse_service(service("db", ["10.96.0.2"])))
    assert set(st.take_dirty()) == {WEB, ObjectKey("default", "db")}
    assert not st.apply("EndpointSlice", ObjectKey("default", "web-ipv4"), _slice())  # equal: no change
    assert st.take_dirty() == {}
    st.apply("EndpointSlice", ObjectKey("default", "web-ipv4"), _slice(ready=[True, False]))
    [(key, [fe])] = st.take_dirty().items()
    assert key == WEB and [b.ip for b in fe.backends] == ["10.0.0.1"]


def test_node_address_change_dirties_only_services_with_a_node_port():
    st = ClusterState()
    np = service("np", ["10.96.0.3"])
    np["spec"]["type"] = "NodePort"
    np["spec"]["ports"][0]["nodePort"] = 30001
    st.apply("Service", ObjectKey("default", "np"), parse_service(np))
    st.apply("Service", WEB, parse_service(service("web", ["10.96.0.1"])))
    st.take_dirty()
    st.changed.clear()
    assert st.node_addresses_changed() == 1 and st.changed.is_set()
    assert set(st.take_dirty()) == {ObjectKey("default", "np")}


def test_several_slices_per_service_and_their_removal():
    st = ClusterState()
    st.apply("Service", WEB, parse_service(service("web", ["10.96.0.1"])))
    k1, k2 = ObjectKey("default", "web-ipv4"), ObjectKey("default", "web-ipv4-2")
    st.apply_all([("EndpointSlice", k1, _slice(addrs=("10.0.0.1",))),
                  ("EndpointSlice", k2, _slice(addrs=("10.0.0.2",), suffix="-2"))])
    [fe] = st.take_dirty()[WEB]
    assert [b.ip for b in fe.backends] == ["10.0.0.1", "10.0.0.2"]
    st.apply("EndpointSlice", k1, None)
    [fe] = st.take_dirty()[WEB]
    assert [b.ip for b in fe.backends] == ["10.0.0.2"]
    st.apply("EndpointSlice", k2, None)
    [fe] = st.take_dirty()[WEB]
    assert fe.backends == ()
    st.apply("Service", WEB, None)
    assert st.take_dirty() == {WEB: []}


def test_a_slice_that_moves_to_another_service_dirties_both():
    st = ClusterState()
    for name in ("web", "api"):
        st.apply("Service", ObjectKey("default", name), parse_service(service(name, ["10.96.0.1" if name == "web" else "10.96.0.2"])))
    k = ObjectKey("default", "s")
    raw = endpoint_slice("web", ["10.0.0.1"])
    raw["metadata"]["name"] = "s"
    st.apply("EndpointSlice", k, parse_endpoint_slice(raw))
    st.take_dirty()
    raw["metadata"]["labels"]["kubernetes.io/service-name"] = "api"
    st.apply("EndpointSlice", k, parse_endpoint_slice(raw))
    d = st.take_dirty()
    assert d[WEB][0].backends == () and [b.ip for b in d[ObjectKey("default", "api")][0].backends] == ["10.0.0.1"]


def test_identity_revision_moves_on_pods_and_services_not_on_endpoints():
    st = ClusterState()
    st.apply("Service", WEB, parse_service(service("web", ["10.96.0.1"])))
    r = st.identity_revision
    st.apply("EndpointSlice", ObjectKey("default", "web-ipv4"), _slice())
    assert st.identity_revision == r and st.revision > r
    pod = parse_pod({"kind": "Pod", "metadata": {"name": "p"}, "status": {"podIP": "10.0.0.1"}})
    st.apply_pod(pod.key, pod)
    assert st.identity_revision == r + 1 and st.pods[pod.key].ips == ("10.0.0.1",)


def test_internal_traffic_policy_local_reads_the_node_column():
    st = ClusterState(node_name="node-a")
    svc = service("web", ["10.96.0.1"])
    svc["spec"]["internalTrafficPolicy"] = "Local"
    st.apply("Service", WEB, parse_service(svc))
    raw = endpoint_slice("web", ["10.0.0.1", "10.0.0.2"])
    raw["endpoints"][0]["nodeName"] = "node-a"
    raw["endpoints"][1]["nodeName"] = "node-b"
    st.apply("EndpointSlice", ObjectKey("default", "web-ipv4"), parse_endpoint_slice(raw))
    [fe] = st.take_dirty()[WEB]
    assert [b.ip for b in fe.backends] == ["10.0.0.1"]


def test_column_selection_equals_selection_py_without_topology():
    """service_frontends reads slices without hints from their columns; selection.py is the rule.
    On random endpoints (readiness, serving, terminating, nodes) and both traffic policies, the two agree."""
    from hypothesis import given, settings, strategies as hs

    from agent.model import frontends
    from agent.model.frontends import _by_selection, _by_slice_columns

    endpoint = hs.fixed_dictionaries({"ready": hs.booleans(), "serving": hs.booleans(), "terminating": hs.booleans(),
                                      "node": hs.sampled_from(["", "node-a", "node-b"])})

    @settings(max_examples=300, deadline=None)
    @given(hs.lists(hs.lists(endpoint, max_size=4), min_size=1, max_size=3), hs.sampled_from(["Cluster", "Local"]),
           hs.sampled_from([None, "", "node-a"]))
    def agree(slices, itp, node):
        parsed = []
        for n, eps in enumerate(slices):
            raw = endpoint_slice("web", [f"10.0.{n}.{i + 1}" for i in range(len(eps))], suffix=f"-{n}")
            for e, spec in zip(raw["endpoints"], eps):
                e["conditions"] = {k: spec[k] for k in ("ready", "serving", "terminating")}
                if spec["node"]:
                    e["nodeName"] = spec["node"]
            parsed.append((parse_endpoint_slice(raw), 8080))
        svc = parse_service(service("web", ["10.96.0.1"]))
        policy = itp if node is not None else "Cluster"
        assert sorted(_by_slice_columns(parsed, svc, policy, node, "")) == \
            sorted(_by_selection(parsed, svc, policy, node, ""))

    assert frontends.CLOSE_DISTRIBUTIONS
    agree()


def test_a_status_file_of_another_version_reads_as_none(tmp_path, monkeypatch):
    """`nodewire cleanup` after an older agent: its status.json has other shapes; read as no status."""
    import json

    from agent import status

    monkeypatch.setattr(status, "status_path", lambda pin: str(tmp_path / "status.json"))
    (tmp_path / "status.json").write_text(json.dumps({"pid": 1, "started": 0, "cgroup": "/x", "pin_dir": "/p",
                                                      "sources": {"manifests": {"path": "/m", "healthy": True}}}))
    assert status.read_status("/p") is None
    st = status.AgentStatus(pid=1, started=0.0, cgroup="/x", pin_dir="/p")
    status.write_status(str(tmp_path / "status.json"), st)
    assert status.read_status("/p") == st
