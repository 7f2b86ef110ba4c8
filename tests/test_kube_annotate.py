"""This node's DSR annotation (issue 21 item 3) and the fake API server's PATCH, over real HTTP(S), no root.

The agent sets `nodewire.io/dsr: "geneve"` on its own Node with a JSON merge patch when north-south
runs with lb-mode dsr|hybrid, removes it with lb-mode snat, keeps it through a clean shutdown, and
watches every Node when lb-mode is not snat. Waits are convergence waits, never speed assertions.
"""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import pytest

from agent.model.objects import ObjectKey
from agent.sources.kube import ApiClient, KubeConfig
from agent.sources.kube.annotate import DSR_ANNOTATION
from nodewire_dev.fake_apiserver import node
from tests.test_kube_watch import NODE, TOKEN, api, eventually, make_source, token_file  # noqa: F401

USER = "system:serviceaccount:kube-system:nodewire"
OTHER = "node-b"


def annotation(api, name: str = NODE) -> str | None:
    return (api.get("Node", "", name)["metadata"].get("annotations") or {}).get(DSR_ANNOTATION)


def patches(api) -> int:
    return sum(1 for method, _path in api.requests if method == "PATCH")


def http_patch(api, name: str, body, ctype: str = "application/merge-patch+json") -> tuple[int, dict]:
    req = urllib.request.Request(f"{api.url}/api/v1/nodes/{name}", method="PATCH", data=json.dumps(body).encode(),
                                 headers={"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"})
    ctx = ssl.create_default_context(cafile=api.cert_file)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def started(api, token_file):  # noqa: F811
    srcs = []

    def start(**kw):
        s = make_source(api, token_file, **kw).start()
        srcs.append(s)
        assert s.wait_synced(15)
        return s

    yield start
    for s in srcs:
        s.stop()


def test_merge_patch_bumps_the_version_and_is_seen_by_a_watch(api, token_file):  # noqa: F811
    api.create(node(NODE, internal_ip="10.0.0.1"))
    before = api.get("Node", "", NODE)
    client = ApiClient(KubeConfig(api.url, "test", ca_file=api.cert_file, token=TOKEN))
    stream = client.watch("/api/v1/nodes", {"watch": "1", "resourceVersion": before["metadata"]["resourceVersion"]}, 10)
    try:
        assert next(stream)[1] is None  # accepted
        code, obj = http_patch(api, NODE, {"metadata": {"annotations": {DSR_ANNOTATION: "geneve"}},
                                           "status": {"addresses": []}})
        assert code == 200 and obj["kind"] == "Node"
        assert obj["metadata"]["annotations"] == {DSR_ANNOTATION: "geneve"}
        assert int(obj["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
        assert obj["status"] == before["status"], "status is a subresource: the main resource's patch leaves it"
        assert obj["metadata"]["uid"] == before["metadata"]["uid"]
        _t, ev = next(stream)
        assert ev["type"] == "MODIFIED" and ev["object"]["metadata"]["annotations"] == {DSR_ANNOTATION: "geneve"}
        assert ev["object"]["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]

        rv = api.resource_version
        assert http_patch(api, NODE, {"metadata": {"annotations": {DSR_ANNOTATION: "geneve"}}})[0] == 200
        assert api.resource_version == rv, "a patch that changes nothing gets no new resourceVersion"

        code, obj = http_patch(api, NODE, {"metadata": {"annotations": {DSR_ANNOTATION: None}}})
        assert code == 200 and "annotations" not in obj["metadata"], "null removes the key; an empty map is not kept"
        _t, ev = next(stream)
        assert ev["type"] == "MODIFIED" and "annotations" not in ev["object"]["metadata"]
    finally:
        stream.close()
        client.close_all()


@pytest.mark.parametrize("body,ctype,code,reason", [
    ({"metadata": {"annotations": {"a": "b"}}}, "application/json", 415, "UnsupportedMediaType"),
    ({"metadata": {"annotations": {"a": "b"}}}, "application/strategic-merge-patch+json", 415, "UnsupportedMediaType"),
    ({"metadata": {"resourceVersion": "1", "annotations": {"a": "b"}}}, None, 409, "Conflict"),
    ({"metadata": {"name": "renamed"}}, None, 400, "BadRequest"),
    ({"metadata": {"annotations": {"a": 5}}}, None, 422, "Invalid"),
])
def test_patch_refusals_are_the_servers(api, body, ctype, code, reason):  # noqa: F811
    api.create(node(NODE))
    rv = api.resource_version
    got, status = http_patch(api, NODE, body, ctype or "application/merge-patch+json")
    assert (got, status["kind"], status["reason"]) == (code, "Status", reason)
    assert api.resource_version == rv and "annotations" not in api.get("Node", "", NODE)["metadata"]


def test_patch_of_a_missing_node_or_a_collection(api):  # noqa: F811
    assert http_patch(api, "nowhere", {"metadata": {}})[0] == 404
    req = urllib.request.Request(f"{api.url}/api/v1/nodes", method="PATCH", data=b"{}",
                                 headers={"Content-Type": "application/merge-patch+json",
                                          "Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, context=ssl.create_default_context(cafile=api.cert_file), timeout=10)
    assert e.value.code == 405


def test_dsr_agent_annotates_its_own_node_and_watches_every_node(api, started):  # noqa: F811
    api.create(node(NODE, internal_ip="10.0.0.1"))
    api.create(node(OTHER, internal_ip="10.0.0.2"))
    src = started(lb_mode="dsr", northsouth=True)
    eventually(lambda: annotation(api) == "geneve", what="own Node annotated")
    assert annotation(api, OTHER) is None, "only its own Node"
    eventually(lambda: set(src.state.nodes) == {ObjectKey("", NODE), ObjectKey("", OTHER)}, what="every Node")
    api.create(node("node-c", internal_ip="10.0.0.3"))
    eventually(lambda: ObjectKey("", "node-c") in src.state.nodes, what="a Node added later")
    assert src.node.key.name == NODE and src.node.addresses == (("InternalIP", "10.0.0.1"), ("Hostname", NODE))

    # Level-triggered: someone strips it (kubectl annotate node-a nodewire.io/dsr-): it comes back.
    api.patch("Node", "", NODE, {"metadata": {"annotations": {DSR_ANNOTATION: None}}})
    eventually(lambda: annotation(api) == "geneve", what="annotation restored")
    st = src.status()["dsr_annotation"]
    assert st["want"] == st["have"] == "geneve" and st["patches"] >= 2 and st["errors"] == 0

    # A clean shutdown leaves it: the tc programs (and decapsulation) stay attached without the agent.
    src.stop()
    assert annotation(api) == "geneve"


def test_hybrid_annotates(api, started):  # noqa: F811
    """hybrid = DSR for TCP: this node takes Geneve flows, so it says so."""
    api.create(node(NODE))
    src = started(lb_mode="hybrid", northsouth=True)
    eventually(lambda: annotation(api) == "geneve", what="hybrid annotates")
    assert src.status()["lb_mode"] == "hybrid"


def test_snat_removes_the_annotation_and_watches_only_its_own_node(api, started):  # noqa: F811
    api.create(node(NODE, internal_ip="10.0.0.1"))
    api.create(node(OTHER, internal_ip="10.0.0.2"))
    api.patch("Node", "", NODE, {"metadata": {"annotations": {DSR_ANNOTATION: "geneve", "keep": "me"}}})
    src = started(lb_mode="snat", northsouth=True)
    eventually(lambda: annotation(api) is None, what="annotation removed (the way back from DSR)")
    assert api.get("Node", "", NODE)["metadata"]["annotations"] == {"keep": "me"}, "only our key is touched"
    assert set(src.state.nodes) == {ObjectKey("", NODE)}, "with SNAT only this node's Node is watched"
    assert patches(api) == 1


def test_snat_on_a_node_never_annotated_writes_nothing(api, started):  # noqa: F811
    api.create(node(NODE))
    src = started(lb_mode="snat", northsouth=True)
    api.create(node(OTHER))  # an event after the first list: the annotator has seen its Node by now
    api.patch("Node", "", NODE, {"metadata": {"labels": {"x": "y"}}})
    eventually(lambda: (src.node is not None and src.reflectors["nodes"].health.events >= 1), what="Node event")
    assert patches(api) == 0
    assert src.status()["dsr_annotation"]["want"] is None


def test_dsr_without_northsouth_removes_it(api, started):  # noqa: F811
    """lb-mode dsr but no --devices: this node does not decapsulate, so it must not attract DSR."""
    api.create(node(NODE))
    api.patch("Node", "", NODE, {"metadata": {"annotations": {DSR_ANNOTATION: "geneve"}}})
    api.create(node(OTHER))
    src = started(lb_mode="dsr", northsouth=False)
    eventually(lambda: annotation(api) is None, what="annotation removed")
    eventually(lambda: ObjectKey("", OTHER) in src.state.nodes, what="still every Node (lb-mode dsr)")


def test_forbidden_patch_is_reported_and_retried(api, started):  # noqa: F811
    api.create(node(NODE))
    api.forbidden.add((USER, "nodes", "patch"))  # a ClusterRole without nodes: patch
    src = started(lb_mode="dsr", northsouth=True)
    eventually(lambda: src.status()["dsr_annotation"]["errors"] >= 1, what="403 counted")
    st = src.status()["dsr_annotation"]
    assert "403" in st["last_error"] and "patch" in st["last_error"] and st["have"] is None
    assert src.status()["healthy"], "the watches are not affected"
    api.forbidden.discard((USER, "nodes", "patch"))  # RBAC fixed: the retry succeeds
    eventually(lambda: annotation(api) == "geneve", what="annotation set after the retry")
    eventually(lambda: src.status()["dsr_annotation"]["last_error"] is None, what="error cleared")


def test_node_created_after_the_agent_gets_the_annotation(api, started):  # noqa: F811
    """The agent starts before its Node is registered (kubelet not up yet): it patches once it appears."""
    started(lb_mode="dsr", northsouth=True)
    assert patches(api) == 0
    api.create(node(NODE))
    eventually(lambda: annotation(api) == "geneve", what="annotated once it exists")
