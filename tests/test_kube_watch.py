"""Watch semantics of the Kubernetes source against the fake API server (real HTTP(S), no root).

Waits are convergence waits (poll until a condition holds, fail after a generous bound), never
assertions about how fast something happened.
"""
from __future__ import annotations

import base64
import json
import random
import ssl
import urllib.error
import urllib.request

import pytest

from agent.model.objects import ObjectKey
from agent.sources.kube import (
    Backoff, KubeConfig, KubeError, KubeSource, in_cluster_config, kubeconfig_config, load_config,
)
from agent.state import ClusterState
from nodewire_dev.fake_apiserver import (
    FakeApiServer, SchemaError, endpoint_slice, node, pod, service,
)

NODE = "node-a"
from tests.conftest import wait_for

TOKEN = "tok-nodewire"


def eventually(cond, timeout: float = 15.0, what: str = "condition"):
    return wait_for(cond, timeout, 0.02, what)


@pytest.fixture
def api(tmp_path):
    srv = FakeApiServer(tls=True, tokens={TOKEN: "system:serviceaccount:kube-system:nodewire"},
                        bookmark_interval=3600, workdir=tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def token_file(tmp_path):
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return p


def make_source(api, token_file, state=None, **kw):
    cfg = KubeConfig(server=api.url, credential_source=f"service account token {token_file}",
                     ca_file=api.cert_file, token_file=str(token_file))
    errors = []
    src = KubeSource(cfg, state or ClusterState(), node=NODE, on_error=errors.append,
                     backoff=lambda: Backoff(initial=0.02, maximum=0.2), **kw)
    src.errors = errors
    return src


@pytest.fixture
def source(api, token_file):
    srcs = []

    def start(**kw):
        s = make_source(api, token_file, **kw).start()
        srcs.append(s)
        assert s.wait_synced(15)
        eventually(lambda: s.status()["healthy"], what="every watch open")
        return s

    yield start
    for s in srcs:
        s.stop()


def backends(state: ClusterState, name: str, namespace: str = "default") -> set[tuple[str, int]]:
    fes = state.all_frontends().get(ObjectKey(namespace, name), [])
    return {(b.ip, b.port) for fe in fes for b in fe.backends}


# -- the fake server itself --------------------------------------------------------------------------
def test_fake_server_refuses_shapes_a_real_server_refuses(api):
    bad = service("web", "10.96.0.10")
    bad["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(SchemaError, match=r"default/web: spec\.ports\[0\]\.port: 'eighty' is not of type 'integer'"):
        api.create(bad)
    typo = endpoint_slice("web-1", "web", ["10.244.0.5"])
    typo["endpoints"][0]["adresses"] = typo["endpoints"][0].pop("addresses")
    with pytest.raises(SchemaError, match=r"endpoints\[0\]: 'addresses' is a required property"):
        api.create(typo)
    typo["endpoints"][0]["addresses"] = ["10.244.0.5"]
    with pytest.raises(SchemaError, match=r"'adresses' was unexpected"):
        api.create(typo)
    assert api.names("Service") == set() and api.names("EndpointSlice") == set()


def _get(api, path, token=TOKEN):
    ctx = ssl.create_default_context(cafile=api.cert_file)
    req = urllib.request.Request(api.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, context=ctx) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_fake_server_protocol_list_pages_status_objects(api):
    for i in range(7):
        api.create(service(f"s{i}", f"10.96.0.{i + 1}"))
    code, page = _get(api, "/api/v1/namespaces/default/services?limit=3")
    assert code == 200 and page["kind"] == "ServiceList" and len(page["items"]) == 3
    assert "kind" not in page["items"][0]  # list items carry no kind/apiVersion, as from a real server
    assert page["metadata"]["remainingItemCount"] == 4
    api.create(service("late", "10.96.1.1"))  # the pages stay a consistent snapshot
    names = [i["metadata"]["name"] for i in page["items"]]
    cont = page["metadata"]["continue"]
    while cont:
        code, page = _get(api, f"/api/v1/namespaces/default/services?limit=3&continue={cont}")
        names += [i["metadata"]["name"] for i in page["items"]]
        cont = page["metadata"].get("continue")
    assert names == [f"s{i}" for i in range(7)]
    code, body = _get(api, "/api/v1/namespaces/default/services?limit=3")
    api.compact()
    code, gone = _get(api, f"/api/v1/services?limit=3&continue={body['metadata']['continue']}")
    assert code == 410 and gone["kind"] == "Status" and gone["reason"] == "Expired"
    assert _get(api, "/api/v1/services", token=None) == (401, {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "Unauthorized", "reason": "Unauthorized", "code": 401})


# -- configuration ----------------------------------------------------------------------------------
def test_in_cluster_config_reads_service_account(tmp_path, api):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(TOKEN)
    (sa / "ca.crt").write_text(open(api.cert_file).read())
    cfg = in_cluster_config(sa_dir=str(sa), env={"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                                 "KUBERNETES_SERVICE_PORT": str(api.port)})
    assert cfg.server == f"https://127.0.0.1:{api.port}" and cfg.ca_file == str(sa / "ca.crt")
    assert str(sa / "token") in cfg.credential_source
    override = in_cluster_config("https://10.0.0.1:6443", sa_dir=str(sa), env={})
    assert override.server == "https://10.0.0.1:6443"
    with pytest.raises(KubeError, match="KUBERNETES_SERVICE_HOST is not set"):
        in_cluster_config(sa_dir=str(sa), env={})
    with pytest.raises(KubeError, match="token .*does not exist"):
        in_cluster_config("https://x:1", sa_dir=str(tmp_path / "nope"), env={})


def test_kubeconfig_with_embedded_ca_and_token_lists_objects(tmp_path, api):
    api.create(service("web", "10.96.0.10"))
    ca = base64.b64encode(open(api.cert_file, "rb").read()).decode()
    kc = tmp_path / "config"
    kc.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "c", "cluster": {"server": api.url, "certificate-authority-data": ca}}],
        "users": [{"name": "u", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "c", "user": "u"}}],
    }))
    cfg = load_config(env={"KUBECONFIG": f"{kc}:/elsewhere"})
    assert cfg.server == api.url and f"kubeconfig {kc}" in cfg.credential_source
    state = ClusterState()
    src = KubeSource(cfg, state, node=NODE).start()
    try:
        assert src.wait_synced(15)
        assert ObjectKey("default", "web") in state.services
    finally:
        src.stop()
    bad = tmp_path / "bad"
    bad.write_text(json.dumps({"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "gone"}}]}))
    with pytest.raises(KubeError, match="clusters has no entry named 'gone'"):
        kubeconfig_config(str(bad))


def test_tls_is_verified(api, token_file, tmp_path):
    other = FakeApiServer(tls=True, workdir=tmp_path / "other")  # a different self-signed CA
    cfg = KubeConfig(server=api.url, credential_source="t", ca_file=other.cert_file, token_file=str(token_file))
    src = KubeSource(cfg, ClusterState(), node=NODE, backoff=lambda: Backoff(initial=0.02, maximum=0.2)).start()
    try:
        err = eventually(lambda: src.status()["last_error"], what="TLS error reported")
        assert err.startswith(f"TLS verification of {api.url} failed") and "self-signed" in err
        assert not src.ready()
    finally:
        src.stop()


# -- list + watch -----------------------------------------------------------------------------------
def test_pagination_of_5000_services_converges(api, source):
    n = api.load(service(f"svc-{i:04d}", f"10.96.{i // 250}.{i % 250 + 1}") for i in range(5000))
    assert n == 5000
    src = source()
    state = src.state
    assert len(state.services) == 5000
    assert state.services[ObjectKey("default", "svc-4999")].cluster_ips == ("10.96.19.250",)
    pages = [p for m, p in api.requests if p.startswith("/api/v1/services?") and "watch" not in p]
    assert len(pages) == 10 and all("limit=500" in p for p in pages)
    assert sum("continue=" in p for p in pages) == 9
    assert src.status()["resources"]["services"]["resource_version"] == str(api.resource_version)


def test_create_update_delete_follow_through_watch(api, source):
    src = source()
    state = src.state
    api.create(service("web", "10.96.0.10", [("http", 80, 8080)]))
    api.create(endpoint_slice("web-abc", "web", ["10.244.0.5", "10.244.0.6"]))
    eventually(lambda: backends(state, "web") == {("10.244.0.5", 8080), ("10.244.0.6", 8080)}, what="added")
    api.update(endpoint_slice("web-abc", "web", ["10.244.0.7"]))
    eventually(lambda: backends(state, "web") == {("10.244.0.7", 8080)}, what="slice modified")
    api.update(service("web", "10.96.0.10", [("http", 81, 8080)]))
    eventually(lambda: {fe.port for fe in state.all_frontends()[ObjectKey("default", "web")]} == {81},
               what="service modified")
    api.delete("EndpointSlice", "default", "web-abc")
    eventually(lambda: backends(state, "web") == set(), what="slice deleted")
    api.delete("Service", "default", "web")
    eventually(lambda: ObjectKey("default", "web") not in state.services, what="service deleted")
    h = src.status()["resources"]
    assert h["services"]["events"] == 3 and h["endpointslices"]["events"] == 3
    assert src.status()["healthy"] and src.errors == []


def test_only_this_nodes_pods_and_node(api, source):
    api.create(node(NODE, zone="zone-1", internal_ip="192.168.1.10"))
    api.create(node("node-b", zone="zone-2"))
    api.create(pod("here", "10.244.0.5", NODE))
    api.create(pod("there", "10.244.1.5", "node-b"))
    src = source()
    assert set(src.state.pods) == {ObjectKey("default", "here")}
    assert src.node.zone == "zone-1" and ("InternalIP", "192.168.1.10") in src.node.addresses
    api.update(node(NODE, zone="zone-3"))
    eventually(lambda: src.node.zone == "zone-3", what="node zone change")
    api.delete("Pod", "default", "here")
    api.create(pod("new", "10.244.0.9", NODE))
    eventually(lambda: set(src.state.pods) == {ObjectKey("default", "new")}, what="pods follow")


def test_server_down_keeps_state_then_converges(api, source):
    api.create(service("web", "10.96.0.10"))
    api.create(endpoint_slice("web-abc", "web", ["10.244.0.5"]))
    api.create(service("old", "10.96.0.11"))
    src = source()
    state = src.state
    api.stop()
    eventually(lambda: src.status()["stale_since"], what="disconnect seen")
    st = src.status()
    assert st["stale_since"] is not None and not st["healthy"] and st["last_error"]
    assert src.ready()  # stale but serving
    # Changes while the agent cannot see them; the state it holds stays as it was.
    api.update(endpoint_slice("web-abc", "web", ["10.244.0.8"]))
    api.delete("Service", "default", "old")
    api.create(service("new", "10.96.0.12"))
    assert backends(state, "web") == {("10.244.0.5", 8080)} and ObjectKey("default", "old") in state.services
    api.start()
    eventually(lambda: backends(state, "web") == {("10.244.0.8", 8080)}, what="re-watch converges")
    eventually(lambda: set(state.services) == {ObjectKey("default", "web"), ObjectKey("default", "new")},
               what="deleted service gone")
    eventually(lambda: src.status()["healthy"], what="healthy again")
    assert src.status()["stale_since"] is None
    # History was retained, so the watch resumed without a re-list.
    assert src.status()["resources"]["services"]["relists_gone"] == 0


@pytest.mark.parametrize("expired_as", ["event", "http"])
def test_expired_history_relists_and_removes_deleted(api, source, expired_as):
    api.watch_expired_as = expired_as
    for i in range(3):
        api.create(service(f"s{i}", f"10.96.0.{i + 1}"))
        api.create(endpoint_slice(f"s{i}-x", f"s{i}", [f"10.244.0.{i + 1}"]))
    src = source()
    state = src.state
    api.stop()
    api.delete("Service", "default", "s1")
    api.delete("EndpointSlice", "default", "s1-x")
    api.update(endpoint_slice("s2-x", "s2", ["10.244.9.9"]))
    api.compact()
    api.start()
    eventually(lambda: src.status()["resources"]["services"]["relists_gone"] >= 1, what="410 seen")
    eventually(lambda: set(state.services) == {ObjectKey("default", "s0"), ObjectKey("default", "s2")},
               what="deleted during the gap removed")
    eventually(lambda: backends(state, "s2") == {("10.244.9.9", 8080)}, what="changed during the gap")
    assert ObjectKey("default", "s1-x") not in state.slices
    assert backends(state, "s0") == {("10.244.0.1", 8080)}  # untouched objects kept
    assert src.status()["resources"]["services"]["lists"] == 2


@pytest.mark.parametrize("bookmarks", [True, False])
def test_bookmarks_advance_resource_version(api, source, bookmarks):
    api.create(service("web", "10.96.0.10"))
    src = source()
    svc = src.reflectors["services"]
    rv_before = int(svc.rv)
    for i in range(20):  # unrelated writes move the server's resourceVersion past the Services'
        api.create(pod(f"elsewhere-{i}", f"10.244.1.{i + 1}", "node-b"))
    if bookmarks:
        api.send_bookmarks()
        eventually(lambda: int(svc.rv) == api.resource_version, what="bookmark advanced rv")
        assert svc.health.bookmarks >= 1
    else:
        assert int(svc.rv) == rv_before
    api.compact()  # history before now is gone
    api.drop_watches()
    eventually(lambda: svc.health.watches >= 2 or svc.health.relists_gone >= 1, what="reconnected")
    eventually(lambda: svc.health.connected, what="watching again")
    # With the bookmark's resourceVersion the reconnect is inside the retained history: no 410.
    assert svc.health.relists_gone == (0 if bookmarks else 1)
    assert ObjectKey("default", "web") in src.state.services


def test_wrong_token_names_credential_source_and_keeps_state(api, source, token_file):
    api.create(service("web", "10.96.0.10"))
    api.create(endpoint_slice("web-abc", "web", ["10.244.0.5"]))
    src = source()
    state = src.state
    token_file.write_text("wrong-token")
    api.drop_watches()
    err = eventually(lambda: src.status()["last_error"], what="auth error reported")
    assert err.startswith("401 Unauthorized") and str(token_file) in err
    api.delete("EndpointSlice", "default", "web-abc")
    assert backends(state, "web") == {("10.244.0.5", 8080)}  # datapath input kept while refused
    token_file.write_text(TOKEN)  # the kubelet rotates the projected token: picked up without restart
    eventually(lambda: backends(state, "web") == set(), what="recovered after token rotation")
    eventually(lambda: src.status()["healthy"], what="healthy")


def test_forbidden_names_the_resource(api, source, token_file):
    api.forbidden.add(("system:serviceaccount:kube-system:nodewire", "endpointslices"))
    src = make_source(api, token_file).start()
    try:
        err = eventually(lambda: src.reflectors["endpointslices"].health.last_error, what="403 reported")
        assert err.startswith("403 Forbidden") and 'cannot list resource "endpointslices"' in err
        assert str(token_file) in err
        assert not src.ready() and src.reflectors["services"].health.synced
    finally:
        src.stop()


def test_malformed_objects_skipped_named_and_counted(api, source):
    api.create(service("good", "10.96.0.10"))
    dup = service("dup", "10.96.0.11", [("http", 80, 8080), ("http", 81, 8081)])
    api.create(dup)
    src = source()
    state = src.state
    assert set(state.services) == {ObjectKey("default", "good")}
    assert src.invalid_objects["Service"] == 1
    assert [str(e) for e in src.errors] == ["api: Service default/dup: spec.ports[1].name: duplicate port name 'http'"]
    api.create(endpoint_slice("good-1", "good", ["10.244.0.5"]))
    # A slice port with a bad port drops only that port (kube-proxy's endpointslicecache.go): the slice is
    # applied, not counted as skipped, and the port's error is named.
    api.create(endpoint_slice("good-2", "good", ["10.244.0.6"], ports=[("http", 0)], namespace="default"))
    eventually(lambda: len(src.errors) == 2, what="bad slice port named")
    assert str(src.errors[-1]) == ("api: EndpointSlice default/good-2: ports[0].port: 0 out of range (1-65535); "
                                   "this port of the slice is ignored")
    eventually(lambda: ObjectKey("default", "good-2") in state.slices, what="the slice applied")
    eventually(lambda: backends(state, "good") == {("10.244.0.5", 8080)}, what="only the good slice's port serves")
    # A good object that turns bad keeps its last good version; fixing it applies the fix.
    bad_update = service("good", "10.96.0.10", [("http", 0, 8080)])
    api.update(bad_update)
    eventually(lambda: src.invalid_objects["Service"] == 2, what="bad update counted")
    assert state.services[ObjectKey("default", "good")].ports[0].port == 80
    api.update(service("dup", "10.96.0.11", [("http", 80, 8080), ("metrics", 81, 8081)]))
    eventually(lambda: ObjectKey("default", "dup") in state.services, what="fixed object applied")
    assert src.status()["invalid_objects"] == {"Service": 2}


def test_backoff_grows_with_jitter_and_is_capped():
    b = Backoff(initial=0.5, maximum=4.0, jitter=0.5, rng=random.Random(7))
    delays = [b.next() for _ in range(7)]
    bases = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert all(base <= d <= base * 1.5 for d, base in zip(delays, bases))
    assert len({round(d / base, 6) for d, base in zip(delays, bases)}) > 1  # jittered, not lock-step
    b.reset()
    assert 0.5 <= b.next() <= 0.75


def test_server_errors_are_retried_with_backoff_then_sync(api, token_file):
    api.create(service("web", "10.96.0.10"))
    api.fail_next.extend([503, 500, 503])  # the first three requests fail, whichever reflector sends them
    src = make_source(api, token_file).start()
    try:
        assert src.wait_synced(15)
        assert ObjectKey("default", "web") in src.state.services
        errors = [r.health.last_error for r in src.reflectors.values() if r.health.last_error]
        assert len(errors) >= 1 and all("HTTP 50" in e and "injected failure" in e for e in errors)
        assert api.fail_next == []
    finally:
        src.stop()


def test_health_and_invalid_objects_exported_as_metrics(api, source):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    api.create(service("bad", "10.96.0.10", [("http", 0, 8080)]))
    src = source()
    reader = InMemoryMetricReader()
    src.register_metrics(MeterProvider(metric_readers=[reader]).get_meter("test"))

    def points():
        out = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        out[(m.name, tuple(sorted(p.attributes.items())))] = p.value
        return out

    pts = points()
    assert pts[("nodewire.kube.watch.connected", (("resource", "services"),))] == 1
    assert pts[("nodewire.kube.stale.duration", (("resource", "services"),))] == 0.0
    assert pts[("nodewire.kube.invalid_objects", (("kind", "Service"),))] == 1
    api.stop()
    eventually(lambda: not src.reflectors["services"].health.connected, what="disconnected")
    pts = points()
    assert pts[("nodewire.kube.watch.connected", (("resource", "services"),))] == 0
    assert pts[("nodewire.kube.stale.duration", (("resource", "services"),))] > 0


def test_expired_continue_token_falls_back_to_one_unpaginated_list(api, source):
    api.load(service(f"svc-{i:04d}", f"10.96.{i // 250}.{i % 250 + 1}") for i in range(1200))
    api.expire_continue = True
    src = source()
    assert len(src.state.services) == 1200
    lists = [p for m, p in api.requests if p.split("?")[0] == "/api/v1/services" and "watch" not in p]
    assert len(lists) == 3  # page 1, its continue (410), then one list without limit
    assert "continue=" in lists[1] and "limit" not in lists[2]


def test_a_watch_that_ends_at_once_is_backed_off(api, token_file):
    """A server that accepts watches and closes them at once must not be hammered in a tight loop."""

    class CountingBackoff(Backoff):
        calls = 0

        def next(self) -> float:
            CountingBackoff.calls += 1
            return super().next()

    api.create(service("web", "10.96.0.10"))
    src = make_source(api, token_file)
    svc = src.reflectors["services"]
    svc.backoff = CountingBackoff(initial=0.01, maximum=0.01)
    svc.short_watch = 3600.0  # every dropped watch counts as "ended at once"
    src.start()
    try:
        assert src.wait_synced(15)
        for n in range(1, 4):
            eventually(lambda: svc.health.watches == n and svc.health.connected, what=f"watch {n} open")
            api.drop_watches()
            eventually(lambda: CountingBackoff.calls == n, what=f"back-off after dropped watch {n}")
        assert svc.health.last_error is None  # backing off is not an error
    finally:
        src.stop()


def test_standalone_fake_server_follows_a_manifest_directory(tmp_path, api, source):
    from nodewire_dev.fake_apiserver import _sync_directory

    d = tmp_path / "manifests"
    d.mkdir()
    (d / "web.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        service("web", "10.96.0.10"), endpoint_slice("web-1", "web", ["10.244.0.5"])]}))
    held = _sync_directory(api, d, {})
    src = source()
    assert backends(src.state, "web") == {("10.244.0.5", 8080)}
    (d / "web.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        service("web", "10.96.0.10"), endpoint_slice("web-1", "web", ["10.244.0.6"])]}))
    held = _sync_directory(api, d, held)
    eventually(lambda: backends(src.state, "web") == {("10.244.0.6", 8080)}, what="file edit became a watch event")
    (d / "web.json").unlink()
    _sync_directory(api, d, held)
    eventually(lambda: not src.state.services, what="file removal deleted the objects")


def test_undecodable_watch_lines_are_skipped_and_the_watch_goes_on(api, source):
    """One bad line (not JSON, too deep, not an event, an object of the wrong shape) never stops the
    reflector: each is named and counted, and the next good event still applies."""
    api.create(service("web", "10.96.0.10"))
    src = source()
    watches = src.status()["resources"]["services"]["watches"]
    for line in (b"{not json", b"[" * 200_000, b"\xff\xfe", b"5", b'{"type": "ADDED", "object": 7}',
                 b'{"type": "ADDED", "object": {"metadata": {"name": ["x"]}}}',
                 b'{"type": "MODIFIED", "object": {"kind": "Service", "metadata": {"name": "web", "namespace": "default",'
                 b' "resourceVersion": "1"}, "spec": {"ports": {"a": 1}, "clusterIP": 5}}}'):
        api.inject_watch_line("services", line)
    api.create(service("after", "10.96.0.11"))
    eventually(lambda: ObjectKey("default", "after") in src.state.services, what="event after bad lines applied")
    assert src.status()["resources"]["services"]["bad_lines"] == 6
    assert src.status()["resources"]["services"]["watches"] == watches  # same stream, never re-opened
    assert src.invalid_objects["Service"] == 7
    assert any("default/web: spec.clusterIP: expected str" in str(e) for e in src.errors), src.errors
    assert src.state.services[ObjectKey("default", "web")].cluster_ips == ("10.96.0.10",)  # last good kept
