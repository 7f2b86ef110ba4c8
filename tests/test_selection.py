"""kube-proxy's endpoint selection (agent/model/selection.py), pure: no root, no kernel."""
import pytest

from agent.model.frontends import Backend, service_frontends
from agent.model.objects import Endpoint
from agent.model.parse import InvalidObject, parse_endpoint_slice, parse_service
from agent.model.selection import Place, categorize, external_endpoints, internal_endpoints
from tests.manifests import endpoint_slice, service

HERE = Place("node-a", "zone-1")


def ep(ready=True, serving=None, terminating=False, node="node-b", zone="zone-2", zones=(), nodes=()):
    return Endpoint(("10.0.0.1",), ready=ready, serving=ready if serving is None else serving,
                    terminating=terminating, node_name=node, zone=zone, zone_hints=zones, node_hints=nodes)


def cluster(eps, place=HERE, td=""):
    return internal_endpoints(eps, place, "Cluster", td)


def local(eps, place=HERE):
    return internal_endpoints(eps, place, "Local")


def test_ready_endpoints_only_when_some_are_ready():
    eps = [ep(), ep(ready=False, serving=True, terminating=True), ep(ready=False, serving=False)]
    assert cluster(eps) == (0,)


def test_serving_terminating_endpoints_used_when_none_ready():
    eps = [ep(ready=False, serving=True, terminating=True), ep(ready=False, serving=False, terminating=True),
           ep(ready=False, serving=False)]
    assert cluster(eps) == (0,)
    assert categorize(eps, HERE).has_any


def test_nothing_serving_means_no_endpoint_and_nothing_anywhere():
    sel = categorize([ep(ready=False, serving=False, terminating=True)], HERE, uses_local=True)
    assert sel == type(sel)((), (), False)


def test_local_policy_keeps_this_nodes_ready_endpoints():
    eps = [ep(node="node-a"), ep(node="node-b"), ep(ready=False, serving=True, terminating=True, node="node-a")]
    assert local(eps) == (0,)


def test_local_policy_falls_back_to_local_terminating_even_with_remote_ready_ones():
    # The fall-back is decided per policy: remote ready endpoints do not help a Local policy.
    eps = [ep(node="node-b"), ep(ready=False, serving=True, terminating=True, node="node-a")]
    assert local(eps) == (1,)
    assert cluster(eps) == (0,)


def test_local_policy_without_local_endpoints_is_empty_but_has_any():
    sel = categorize([ep(node="node-b")], HERE, uses_cluster=False, uses_local=True)
    assert sel.local == () and sel.has_any


def test_zone_hints_keep_the_endpoints_hinted_for_this_zone():
    eps = [ep(zones=("zone-1",)), ep(zones=("zone-2",)), ep(zones=("zone-1", "zone-2"))]
    assert cluster(eps) == (0, 2)


def test_zone_hints_ignored_when_one_ready_endpoint_lacks_them():
    eps = [ep(zones=("zone-1",)), ep(zones=())]
    assert cluster(eps) == (0, 1)


def test_zone_hints_of_unready_endpoints_do_not_matter():
    eps = [ep(zones=("zone-1",)), ep(zones=("zone-2",)), ep(ready=False, serving=False)]
    assert cluster(eps) == (0,)


def test_zone_hints_ignored_when_none_is_for_this_zone_or_the_zone_is_unknown():
    eps = [ep(zones=("zone-2",)), ep(zones=("zone-3",))]
    assert cluster(eps) == (0, 1)
    assert cluster([ep(zones=("zone-1",)), ep(zones=("zone-2",))], Place("node-a", "")) == (0, 1)


def test_node_hints_prefer_this_node_then_fall_back_to_zone_hints():
    eps = [ep(zones=("zone-1",), nodes=("node-a",)), ep(zones=("zone-1",), nodes=("node-c",)),
           ep(zones=("zone-2",), nodes=("node-b",))]
    assert cluster(eps) == (0,)
    assert cluster(eps, Place("node-x", "zone-1")) == (0, 1)  # no node hint for node-x: zone hints


def test_topology_is_dropped_for_the_terminating_fall_back():
    eps = [ep(ready=False, serving=True, terminating=True, zones=("zone-2",)),
           ep(ready=False, serving=True, terminating=True, zones=("zone-1",))]
    assert cluster(eps) == (0, 1)


@pytest.mark.parametrize("td", ["PreferClose", "PreferSameZone"])
def test_prefer_close_without_hints_uses_the_controllers_zone_hints(td):
    eps = [ep(zone="zone-1"), ep(zone="zone-2"), ep(zone="zone-1", node="node-a")]
    assert cluster(eps, td=td) == (0, 2)
    assert cluster(eps, td="") == (0, 1, 2)
    assert cluster([ep(zone="zone-2"), ep(zone="")], td=td) == (0, 1)  # an endpoint without zone: no hints


def test_prefer_same_node_without_hints_prefers_this_node_then_the_zone():
    eps = [ep(zone="zone-1", node="node-a"), ep(zone="zone-1", node="node-b"), ep(zone="zone-2", node="node-c")]
    assert cluster(eps, td="PreferSameNode") == (0,)
    assert cluster(eps, Place("node-x", "zone-1"), td="PreferSameNode") == (0, 1)


def test_explicit_hints_win_over_traffic_distribution():
    eps = [ep(zone="zone-1", zones=("zone-2",)), ep(zone="zone-2", zones=("zone-1",))]
    assert cluster(eps, td="PreferClose") == (1,)


def test_external_traffic_policy_local_uses_local_endpoints():
    eps = [ep(node="node-a"), ep(node="node-b")]
    assert external_endpoints(eps, HERE, "Local") == (0,)
    assert external_endpoints(eps, HERE, "Cluster") == (0, 1)


# -- parsing and the frontend computation ----------------------------------------------------------
def test_hints_and_traffic_distribution_are_parsed():
    sl = endpoint_slice("w", ["10.0.0.1"])
    sl["endpoints"][0]["hints"] = {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]}
    [e] = parse_endpoint_slice(sl).endpoints
    assert (e.zone_hints, e.node_hints) == (("z1",), ("n1",))
    svc = service("w", ["10.96.0.1"])
    svc["spec"]["trafficDistribution"] = "PreferSameNode"
    assert parse_service(svc).traffic_distribution == "PreferSameNode"
    sl["endpoints"][0]["hints"] = {"forZones": [{"zone": "z1"}]}
    with pytest.raises(InvalidObject, match=r"endpoints\[0\]\.hints\.forZones\[0\]\.name: required"):
        parse_endpoint_slice(sl)


def test_unset_serving_means_serving_as_kube_proxy_reads_it():
    sl = endpoint_slice("t", ["10.0.0.1"])
    sl["endpoints"][0]["conditions"] = {"ready": False, "terminating": True}
    [e] = parse_endpoint_slice(sl).endpoints
    assert (e.ready, e.serving, e.terminating) == (False, True, True)


def test_frontend_uses_serving_terminating_endpoints_when_none_ready():
    sl = endpoint_slice("t", ["10.0.0.1", "10.0.0.2"])
    sl["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    sl["endpoints"][1]["conditions"] = {"ready": False, "serving": False, "terminating": True}
    [fe] = service_frontends(parse_service(service("t", ["10.96.0.3"])), [parse_endpoint_slice(sl)])
    assert fe.backends == (Backend("10.0.0.1", 8080, "TCP"),)


def test_frontend_follows_zone_hints_for_this_nodes_zone():
    sl = endpoint_slice("z", ["10.0.0.1", "10.0.0.2"])
    for e, z in zip(sl["endpoints"], ("zone-1", "zone-2")):
        e["zone"] = z
    svc = service("z", ["10.96.0.4"])
    svc["spec"]["trafficDistribution"] = "PreferClose"
    s, slices = parse_service(svc), [parse_endpoint_slice(sl)]
    assert service_frontends(s, slices, "node-a", "zone-2")[0].backends == (Backend("10.0.0.2", 8080, "TCP"),)
    assert len(service_frontends(s, slices, "node-a", "zone-9")[0].backends) == 2


def test_externalname_gets_no_frontend():
    svc = service("x", ["10.96.0.5"])
    svc["spec"] = {"type": "ExternalName", "externalName": "example.org", "ports": svc["spec"]["ports"]}
    assert service_frontends(parse_service(svc), []) == []


def _zone_state(zone_flag=""):
    from agent.model.objects import Objects
    from agent.model.parse import parse_node
    from agent.state import ClusterState

    st = ClusterState("node-a", zone_flag)
    svc = service("z", ["10.96.0.6"])
    svc["spec"]["trafficDistribution"] = "PreferClose"
    sl = endpoint_slice("z", ["10.0.0.1", "10.0.0.2"])
    for e, z in zip(sl["endpoints"], ("zone-1", "zone-2")):
        e["zone"] = z
    s, p = parse_service(svc), parse_endpoint_slice(sl)
    node = parse_node({"kind": "Node", "metadata": {"name": "node-a",
                                                    "labels": {"topology.kubernetes.io/zone": "zone-2"}}})
    st.replace(Objects(services={s.key: s}, slices={p.key: p}))
    return st, node


def test_this_nodes_node_object_sets_the_zone_and_recomputes_topology():
    from agent.model.objects import Objects

    st, node = _zone_state()
    [fe] = st.all_frontends()[next(iter(st.services))]
    assert len(fe.backends) == 2  # zone unknown: hints ignored
    objs = Objects(services=dict(st.services), slices=dict(st.slices), nodes={node.key: node})
    st.replace(objs)
    assert st.zone == "zone-2"
    [fe] = st.take_dirty()[next(iter(st.services))]
    assert fe.backends == (Backend("10.0.0.2", 8080, "TCP"),)


def test_zone_flag_wins_over_the_node_object():
    st, node = _zone_state("zone-1")
    st.apply_node(node.key, node)
    assert st.zone == "zone-1"
    [fe] = st.all_frontends()[next(iter(st.services))]
    assert fe.backends == (Backend("10.0.0.1", 8080, "TCP"),)
