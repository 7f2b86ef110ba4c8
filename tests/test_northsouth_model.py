"""The pure north-south model (Service → its view: external and socket-path frontends) and Maglev tables."""
from __future__ import annotations

import numpy as np
import pytest

from agent.model import maglev
from agent.model.frontends import service_frontends
from agent.model.northsouth import NodeInfo
from agent.model.view import service_view
from agent.model.parse import InvalidObject, parse_endpoint_slice, parse_service
from tests.manifests import endpoint_slice, service

NODE = NodeInfo("n1", ("198.18.0.11", "fd00:18::11", "192.0.2.7"))


def service_northsouth(svc, slices, node):
    return service_view(svc, slices, node, northsouth=True)


def objs(typ="NodePort", node_port=30080, members=(("10.244.1.2", "n1"), ("10.244.2.2", "n2")), **spec):
    s = service("web", ["10.96.0.10"], port=80, target_port=8080)
    s["spec"]["type"] = typ
    if node_port:
        s["spec"]["ports"][0]["nodePort"] = node_port
    status = spec.pop("status", None)
    s["spec"].update(spec)
    if status:
        s["status"] = status
    sl = endpoint_slice("web", [ip for ip, _ in members])
    for e, (_, node) in zip(sl["endpoints"], members):
        e["nodeName"] = node
    return parse_service(s), [parse_endpoint_slice(sl)]


def test_nodeport_on_every_node_address_of_the_service_family():
    ns = service_northsouth(*objs(), NODE)
    ext = {(e.frontend.ip, e.frontend.port, e.kind) for e in ns.external}
    assert ext == {("198.18.0.11", 30080, "NodePort"), ("192.0.2.7", 30080, "NodePort")}  # v4 Service: no v6
    assert {b.ip for b in ns.external[0].frontend.backends} == {"10.244.1.2", "10.244.2.2"}
    sock = {(f.ip, f.port) for f in ns.socket}
    assert ("127.0.0.1", 30080) in sock and ("198.18.0.11", 30080) in sock
    assert ns.local_addresses == {"10.244.1.2"}


def test_etp_local_only_local_endpoints_drop_flag_and_health():
    svc, sl = objs(typ="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=30100,
                   status={"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}, {"hostname": "lb.example"}]}})
    here = service_northsouth(svc, sl, NODE)
    assert all({b.ip for b in e.frontend.backends} == {"10.244.1.2"} for e in here.external)
    assert ("203.0.113.1", 80, "LoadBalancer") in {(e.frontend.ip, e.frontend.port, e.kind) for e in here.external}
    assert (here.health_check_node_port, here.local_endpoints) == (30100, 1)
    elsewhere = service_northsouth(svc, sl, NodeInfo("n3", NODE.addresses))
    assert all(e.drop_empty and not e.frontend.backends for e in elsewhere.external)
    assert elsewhere.local_endpoints == 0
    # local sockets are short-circuited to every endpoint whatever the policy (as kube-proxy)
    assert all(len(f.backends) == 2 for f in elsewhere.socket)


def test_no_endpoint_at_all_rejects_rather_than_drops():
    ns = service_northsouth(*objs(externalTrafficPolicy="Local", members=()), NODE)
    assert ns.external and all(not e.drop_empty and not e.frontend.backends for e in ns.external)


def test_source_ranges_only_on_load_balancer_ips():
    svc, sl = objs(typ="LoadBalancer", loadBalancerSourceRanges=["198.18.0.0/24", "2001:db8::/32"],
                   status={"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}, externalIPs=["198.51.100.1"])
    by_kind = {e.kind: e.source_ranges for e in service_northsouth(svc, sl, NODE).external}
    assert by_kind == {"NodePort": None, "ExternalIP": None, "LoadBalancer": ("198.18.0.0/24",)}


def test_type_clusterip_has_no_nodeport_and_range_is_enforced():
    assert not service_northsouth(*objs(typ="ClusterIP"), NODE).external
    ns = service_northsouth(*objs(node_port=40000), NODE)
    assert not ns.external and "nodePort: 40000 outside the node-port range" in ns.errors[0]


def test_bad_source_range_names_the_field():
    s = service("web", ["10.96.0.10"])
    s["spec"]["loadBalancerSourceRanges"] = ["not-a-cidr"]
    with pytest.raises(InvalidObject, match=r"spec.loadBalancerSourceRanges\[0\]"):
        parse_service(s)


def test_maglev_spreads_evenly_and_moves_few_flows():
    backends = [f"10.0.0.{i}:80/TCP" for i in range(10)]
    t = maglev.build_table(backends)
    counts = np.bincount(t, minlength=10)
    assert counts.min() >= 1638 and counts.max() <= 1639  # M=16381 over 10 backends
    s1, s2 = sorted(backends), sorted(backends[:3] + backends[4:])
    t2 = maglev.build_table(s2)
    moved = np.mean(np.array(s1)[t] != np.array(s2)[t2])
    assert 0.09 < moved <= 0.12  # 1 of 10 removed: ~10% of flows move (the paper's figure)


def test_maglev_is_the_same_on_every_node_and_both_builds_agree():
    sets = [[f"10.1.{k}.{i}:80/TCP" for i in range(3)] for k in range(4)]
    a = maglev.build_tables(sets, 251)
    b = maglev.build_tables([list(reversed(s)) for s in sets], 251)  # order of the set does not matter
    c = maglev._fill([sorted(s) for s in sets], 3, 251)               # the numpy build
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(a, b, c))


def test_maglev_table_size_must_be_prime():
    with pytest.raises(ValueError, match="maglev-table-size: 16380 is not a prime"):
        maglev.check_table_size(16380)


@pytest.mark.parametrize("itp", ["Cluster", "Local"])
@pytest.mark.parametrize("node", ["n1", "n3"])
def test_cluster_ip_frontends_are_the_same_whether_the_service_has_external_ones(itp, node):
    """Endpoints categorized once per port and family give the ClusterIP frontends the column path gives."""
    svc, sl = objs(typ="LoadBalancer", internalTrafficPolicy=itp, externalIPs=["198.51.100.1"],
                   members=(("10.244.1.2", "n1"), ("10.244.2.2", "n2"), ("10.244.1.3", "n1")))
    here = NodeInfo(node, NODE.addresses)
    view = service_view(svc, sl, here, northsouth=True)
    plain = service_frontends(svc, sl, node)
    assert [f for f in view.socket if f.ip in svc.cluster_ips] == plain
    assert service_view(svc, sl, here).socket == tuple(plain) and not service_view(svc, sl, here).external


def test_a_bad_slice_port_is_reported_on_the_view():
    svc, _ = objs()
    sl = endpoint_slice("web", ["10.244.1.2"])
    del sl["ports"][0]["port"]
    view = service_northsouth(svc, [parse_endpoint_slice(sl)], NODE)
    assert any("ports[0].port" in e for e in view.errors) and all(not e.frontend.backends for e in view.external)
