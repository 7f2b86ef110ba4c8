"""Fuzzed API decoding (hypothesis): list pages and watch event lines of any shape — garbage JSON,
unknown event types, ERROR objects of every shape, objects with one wrong field, very long lines.

Two drivers: the Service reflector of a real KubeSource fed by a scripted client (no HTTP, so many
examples run), and the whole client over real HTTPS against the fake API server (line framing,
chunking and the line-length bound included). Properties: the reflector never stops (a later good
Service is applied), no error reaches the catch-all "bug" path, every rejection names its field."""
from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from agent.model.objects import ObjectKey
from agent.sources import kube
from agent.sources.kube import Backoff, KubeConfig, KubeError, KubeSource
from agent.state import ClusterState
from nodewire_dev.fake_apiserver import FakeApiServer, endpoint_slice, node, pod, service
from tests.fuzz_strategies import JSON, one_wrong_field, valid_objects

SENTINEL = ObjectKey("default", "sentinel")
EVENT_TYPES = st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]) | st.text(max_size=12)
STATUS = st.fixed_dictionaries({}, optional={
    "kind": st.just("Status") | JSON, "code": st.sampled_from([410, 500, 403, "410", None, 410.0]) | JSON,
    "reason": st.just("Expired") | JSON, "message": JSON, "metadata": JSON, "status": JSON})
OBJECTS = (JSON | STATUS | one_wrong_field().map(lambda c: c[0]) | st.sampled_from(valid_objects())
           | st.just({"metadata": {"name": "x", "resourceVersion": 7}}))
EVENTS = st.fixed_dictionaries({}, optional={"type": EVENT_TYPES | JSON, "object": OBJECTS})
LINES = st.lists(st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")),
    JSON.map(lambda v: json.dumps(v).encode()),
    EVENTS.map(lambda e: json.dumps(e).encode()),
    st.integers(1, 300_000).map(lambda n: b'{"type":"ADDED","object":{"metadata":{"name":"' + b"x" * n + b'"}}}'),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
), max_size=8)
PAGES = st.fixed_dictionaries({}, optional={
    "metadata": JSON | st.fixed_dictionaries({"resourceVersion": st.just("5") | JSON}, optional={"continue": JSON}),
    "items": JSON | st.lists(OBJECTS, max_size=6), "kind": JSON})


SENTINELS = {  # resource → (a good object the fuzzed input is followed by, where it lands in ClusterState)
    "services": (lambda: service("sentinel", "10.96.9.9"), "services", SENTINEL),
    "endpointslices": (lambda: endpoint_slice("sentinel", "sentinel", ["10.244.9.9"]), "slices", SENTINEL),
    "pods": (lambda: pod("sentinel", "10.244.9.9", "n1"), "pods", SENTINEL),
    "nodes": (lambda: node("n1", zone="z9"), "nodes", ObjectKey("", "n1")),
}


def _sentinel(resource: str = "services", rv: str = "100") -> dict:
    obj = SENTINELS[resource][0]()
    obj["metadata"].setdefault("namespace", "default") if resource != "nodes" else None
    obj["metadata"]["resourceVersion"] = rv
    return obj


class ScriptedClient:
    """The part of ApiClient a Reflector uses, answering from a script instead of a server.

    The first list answers `first_page`, later lists a good page holding the sentinel; the first
    watch sends `lines` (decoded by the real kube.client._decode_event) and then the sentinel, later ones
    only the sentinel: whatever the fuzzed input does, a reflector that keeps going applies it."""

    def __init__(self, first_page: object, lines: list[bytes], resource: str = "services"):
        self.first_page, self.lines, self.resource = first_page, lines, resource
        self.gets = self.watches = 0

    def get(self, path: str, params: dict) -> dict:
        self.gets += 1
        if self.gets == 1:
            if not isinstance(self.first_page, dict):  # ApiClient.get refuses these the same way
                raise KubeError(f"GET {path}: the body is a JSON {type(self.first_page).__name__}, not an object")
            return self.first_page
        return {"metadata": {"resourceVersion": "50"}, "items": [_sentinel(self.resource)]}

    def release(self) -> None:
        pass

    def watch(self, path: str, params: dict, read_timeout: float):
        self.watches += 1
        yield time.monotonic(), None
        for line in self.lines if self.watches == 1 else []:
            if line.strip():
                yield time.monotonic(), kube.client._decode_event(line)
        yield time.monotonic(), {"type": "ADDED", "object": _sentinel(self.resource)}
        time.sleep(0.01)


def _run_reflector(page, lines, caplog, resource: str = "services") -> tuple[KubeSource, list]:
    errors = []
    src = KubeSource(KubeConfig("http://127.0.0.1:1", "fuzz"), ClusterState(), node="n1", on_error=errors.append,
                     backoff=lambda: Backoff(initial=0.001, maximum=0.005))
    r = src.reflectors[resource]
    r.client = ScriptedClient(page, lines, resource)
    _make, where, want = SENTINELS[resource]
    r.relists = kube.RelistLimiter(burst=1000, every=0.001)
    done = threading.Event()
    src.on_applied = lambda kind, key, t: (key == want and getattr(src.state, where).get(want) is not None
                                           and (done.set(), src._stop.set()))
    caplog.clear()
    t = threading.Thread(target=r.run, daemon=True)
    t.start()
    finished = done.wait(20)
    src._stop.set()
    t.join(5)
    assert finished, f"the sentinel never arrived (gets={r.client.gets}, watches={r.client.watches})"
    assert want in getattr(src.state, where)
    bugs = [rec.getMessage() for rec in caplog.records if rec.exc_info]
    assert bugs == [], bugs  # nothing reached the reflector's catch-all
    for e in errors:  # every rejection names its field (or, for a line, says what the line was)
        assert "cannot decode:" not in e.message, e
        assert e.field not in ("", "-"), e
    return src, errors


@pytest.fixture
def quiet(caplog):
    caplog.set_level(logging.ERROR, logger="nodewire.kube")
    return caplog


RESOURCES = pytest.mark.parametrize("resource", sorted(SENTINELS))


@RESOURCES
@given(lines=LINES)
def test_watch_lines_of_any_shape_never_stop_the_reflector(lines, quiet, resource):
    _run_reflector({"metadata": {"resourceVersion": "10"}, "items": []}, lines, quiet, resource)


@RESOURCES
@given(page=PAGES | JSON)
def test_list_pages_of_any_shape_never_stop_the_reflector(page, quiet, resource):
    _run_reflector(page, [], quiet, resource)


def test_error_events_of_every_shape_are_named():
    """Deterministic companion: the ERROR statuses a proxy or an old server may send."""
    for obj in [{}, {"code": 410}, {"code": "410"}, {"code": None, "message": 5}, {"reason": [1], "message": {}},
                {"kind": "Status", "code": 500, "message": "etcd"}]:
        ev = kube.client._decode_event(json.dumps({"type": "ERROR", "object": obj}).encode())
        assert isinstance(ev, dict)
        detail = kube.client._status_message(json.dumps(ev["object"]).encode())
        assert isinstance(detail, str)


# -- over real HTTPS --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    api = FakeApiServer(tls=True, tokens={"t": "u"}, bookmark_interval=3600,
                        workdir=tmp_path_factory.mktemp("api")).start()
    api.create(service("sentinel", "10.96.9.9"))
    tok = tmp_path_factory.mktemp("tok") / "token"
    tok.write_text("t")
    errors = []
    src = KubeSource(KubeConfig(api.url, "fuzz", ca_file=api.cert_file, token_file=str(tok)), ClusterState(),
                     node="n1", on_error=errors.append, backoff=lambda: Backoff(initial=0.01, maximum=0.05))
    for r in src.reflectors.values():
        r.relists = kube.RelistLimiter(burst=1000, every=0.001)
    src.start()
    assert src.wait_synced(15)
    yield api, src, errors
    src.stop()
    api.stop()


@settings(max_examples=max(5, settings().max_examples // 4))  # each example is a few HTTPS round trips
@given(lines=LINES)
def test_watch_lines_over_https_never_stop_the_source(live, lines):
    api, src, errors = live
    port = src.state.services[SENTINEL].ports[0].port if SENTINEL in src.state.services else 80
    for line in lines:
        api.inject_watch_line("services", line)
    new = 1 + port % 60000
    obj = service("sentinel", "10.96.9.9", ports=[("http", new, 8080)])
    api.update(obj)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        svc = src.state.services.get(SENTINEL)
        if svc is not None and svc.ports[0].port == new:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"the update after the fuzzed lines was not applied: {src.status()['resources']['services']}")
    assert all("cannot decode:" not in e.message for e in errors), errors
