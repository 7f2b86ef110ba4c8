"""The pure model: parsing with named errors, and Services + EndpointSlices → frontends."""
import pytest

from agent.model.frontends import Backend, service_frontends
from agent.model.parse import InvalidObject, parse_endpoint_slice, parse_pod, parse_service
from agent.state import ClusterState
from tests.manifests import endpoint_slice, service


def fe_map(svc_obj, *slice_objs):
    svc = parse_service(svc_obj)
    return {(f.ip, f.port, f.protocol): f.backends
            for f in service_frontends(svc, [parse_endpoint_slice(s) for s in slice_objs])}


def test_numeric_target_port_and_ready_endpoints_only():
    got = fe_map(service("web", ["10.96.0.10"], target_port=8080),
                 endpoint_slice("web", ["10.0.0.1", "10.0.0.2", "10.0.0.3"], ready=[True, False, True]))
    assert got == {("10.96.0.10", 80, "TCP"): (Backend("10.0.0.1", 8080, "TCP"), Backend("10.0.0.3", 8080, "TCP"))}


def test_named_target_port_resolves_through_slice_port_names():
    svc = service("web", ["10.96.0.10"], target_port="http", port_name="web")
    # The slice names the port after the named targetPort, with the number the pod exposes.
    sl = endpoint_slice("web", ["10.0.0.1"], port=9376, port_name="http")
    assert fe_map(svc, sl) == {("10.96.0.10", 80, "TCP"): (Backend("10.0.0.1", 9376, "TCP"),)}
    # The Kubernetes controller's form: the slice port carries the Service port's name.
    sl2 = endpoint_slice("web", ["10.0.0.2"], port=9377, port_name="web")
    assert fe_map(svc, sl2) == {("10.96.0.10", 80, "TCP"): (Backend("10.0.0.2", 9377, "TCP"),)}
    # A named targetPort no slice port carries resolves to nothing (no guessing).
    sl3 = endpoint_slice("web", ["10.0.0.3"], port=9378, port_name="other")
    assert fe_map(svc, sl3) == {("10.96.0.10", 80, "TCP"): ()}


def test_multi_port_service_matches_ports_by_name():
    svc = service("db", ["10.96.0.5"])
    svc["spec"]["ports"] = [{"name": "sql", "port": 5432, "targetPort": 5432},
                            {"name": "metrics", "port": 9187, "targetPort": "prom"}]
    sl = endpoint_slice("db", ["10.0.0.9"])
    sl["ports"] = [{"name": "sql", "port": 15432, "protocol": "TCP"}, {"name": "metrics", "port": 19187, "protocol": "TCP"}]
    assert fe_map(svc, sl) == {("10.96.0.5", 5432, "TCP"): (Backend("10.0.0.9", 15432, "TCP"),),
                               ("10.96.0.5", 9187, "TCP"): (Backend("10.0.0.9", 19187, "TCP"),)}


def test_dual_stack_uses_the_slice_of_each_family():
    got = fe_map(service("web", ["10.96.0.10", "fd00::10"]),
                 endpoint_slice("web", ["10.0.0.1"]), endpoint_slice("web", ["fd00:1::1"]))
    assert got == {("10.96.0.10", 80, "TCP"): (Backend("10.0.0.1", 8080, "TCP"),),
                   ("fd00::10", 80, "TCP"): (Backend("fd00:1::1", 8080, "TCP"),)}


def test_headless_and_other_proxy_get_no_frontend():
    assert fe_map(service("h", []), endpoint_slice("h", ["10.0.0.1"])) == {}
    other = service("o", ["10.96.0.11"], labels={"service.kubernetes.io/service-proxy-name": "other"})
    assert fe_map(other, endpoint_slice("o", ["10.0.0.1"])) == {}


def test_no_ready_endpoint_gives_an_empty_frontend_which_refuses():
    got = fe_map(service("b", ["10.96.0.20"]), endpoint_slice("b", ["10.0.0.1"], ready=[False]))
    assert got == {("10.96.0.20", 80, "TCP"): ()}


def test_ready_nil_means_ready():
    sl = endpoint_slice("web", ["10.0.0.1"])
    del sl["endpoints"][0]["conditions"]
    assert parse_endpoint_slice(sl).endpoints[0].ready is True


@pytest.mark.parametrize("mutate, field, words", [
    (lambda s: s["spec"]["ports"][0].update(port=70000), "spec.ports[0].port", "70000 out of range"),
    (lambda s: s["spec"]["ports"][0].update(port=0), "spec.ports[0].port", "out of range"),
    (lambda s: s["spec"]["ports"][0].update(port="eighty"), "spec.ports[0].port", "expected int"),
    (lambda s: s["spec"]["ports"][0].update(protocol="QUIC"), "spec.ports[0].protocol", "unknown protocol 'QUIC'"),
    (lambda s: s["spec"].update(clusterIP="10.96.0.300", clusterIPs=["10.96.0.300"]), "spec.clusterIPs[0]",
     "not a valid IP"),
    (lambda s: s["spec"].update(ports=[{"name": "a", "port": 80}, {"port": 81}]), "spec.ports[1].name", "required"),
    (lambda s: s["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]), "spec.ports[1].name",
     "duplicate port name 'a'"),
    (lambda s: s["spec"]["ports"][0].update(targetPort=-1), "spec.ports[0].targetPort", "out of range"),
    (lambda s: s["metadata"].pop("name"), "metadata.name", "missing"),
])
def test_service_errors_name_the_field(mutate, field, words):
    obj = service("web", ["10.96.0.10"])
    mutate(obj)
    with pytest.raises(InvalidObject) as e:
        parse_service(obj)
    assert e.value.field == field
    assert words in e.value.message
    assert "Service" in str(e.value)


def test_slice_errors_name_the_field():
    sl = endpoint_slice("web", ["10.0.0.1"])
    sl["endpoints"][0]["addresses"] = ["fd00::1"]
    with pytest.raises(InvalidObject, match=r"default/web-ipv4: endpoints\[0\].addresses\[0\]: fd00::1 is not an IPv4"):
        parse_endpoint_slice(sl)
    sl = endpoint_slice("web", ["10.0.0.1"])
    del sl["metadata"]["labels"]
    with pytest.raises(InvalidObject, match="kubernetes.io/service-name"):
        parse_endpoint_slice(sl)


def test_pod_ips():
    pod = parse_pod({"kind": "Pod", "metadata": {"name": "p", "namespace": "ns", "labels": {"a": "b"}},
                     "spec": {"nodeName": "n1"}, "status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}})
    assert pod.ips == ("10.0.0.1", "fd00::1") and pod.node_name == "n1" and dict(pod.labels) == {"a": "b"}


def test_state_marks_only_the_changed_service_dirty():
    st = ClusterState()
    for name, vip in (("a", "10.96.0.1"), ("b", "10.96.0.2")):
        svc = parse_service(service(name, [vip]))
        st.apply_service(svc.key, svc)
        sl = parse_endpoint_slice(endpoint_slice(name, ["10.0.0.1"]))
        st.apply_slice(sl.key, sl)
    assert set(str(k) for k in st.take_dirty()) == {"default/a", "default/b"}
    sl = parse_endpoint_slice(endpoint_slice("b", ["10.0.0.2"]))
    st.apply_slice(sl.key, sl)
    dirty = st.take_dirty()
    assert [str(k) for k in dirty] == ["default/b"]
    assert dirty[sl.service_key][0].backends == (Backend("10.0.0.2", 8080, "TCP"),)
    st.apply_slice(sl.key, sl)  # the same object again changes nothing
    assert st.take_dirty() == {}


def test_session_affinity_timeout_reaches_the_frontend():
    svc = service("s", ["10.96.0.9"])
    svc["spec"]["sessionAffinity"] = "ClientIP"
    [fe] = service_frontends(parse_service(svc), [])
    assert fe.affinity_timeout == 10800  # Kubernetes' default timeoutSeconds
    svc["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 90000}}
    with pytest.raises(InvalidObject, match=r"timeoutSeconds: 90000 out of range"):
        parse_service(svc)


def test_internal_traffic_policy_local_keeps_only_this_nodes_endpoints():
    svc = service("l", ["10.96.0.8"])
    svc["spec"]["internalTrafficPolicy"] = "Local"
    sl = endpoint_slice("l", ["10.0.0.1", "10.0.0.2"])
    sl["endpoints"][0]["nodeName"] = "node-a"
    sl["endpoints"][1]["nodeName"] = "node-b"
    s, slices = parse_service(svc), [parse_endpoint_slice(sl)]
    assert service_frontends(s, slices, "node-b")[0].backends == (Backend("10.0.0.2", 8080, "TCP"),)
    assert service_frontends(s, slices, "node-c")[0].backends == ()  # none local: refused
    svc["spec"]["internalTrafficPolicy"] = "Cluster"
    assert len(service_frontends(parse_service(svc), slices, "node-c")[0].backends) == 2


@pytest.mark.parametrize("bad", [None, 0, 70000, "http"])
def test_a_slice_port_without_a_valid_port_drops_only_that_port(bad):
    """kube-proxy (pkg/proxy/endpointslicecache.go) ignores an invalid endpoint port, not the slice:
    the Service's other port keeps its endpoints from the same slice."""
    svc = service("db", ["10.96.0.5"])
    svc["spec"]["ports"] = [{"name": "sql", "port": 5432, "targetPort": 5432},
                            {"name": "metrics", "port": 9187, "targetPort": 9187}]
    sl = endpoint_slice("db", ["10.0.0.9"])
    sl["ports"] = [{"name": "sql", "port": 15432, "protocol": "TCP"}, {"name": "metrics", "protocol": "TCP"}]
    if bad is not None:
        sl["ports"][1]["port"] = bad
    parsed = parse_endpoint_slice(sl)
    [(field, message)] = parsed.errors
    assert field == "ports[1].port" and "this port of the slice is ignored" in message
    assert fe_map(svc, sl) == {("10.96.0.5", 5432, "TCP"): (Backend("10.0.0.9", 15432, "TCP"),),
                               ("10.96.0.5", 9187, "TCP"): ()}
