"""The API client against a misbehaving server (the fake API server injects each fault over real HTTPS):
429 + Retry-After, 5xx and HTML pages, a stalled watch, a stream cut mid-chunk, very long lines,
a server that expires every watch (re-lists are rate-limited). In every case nothing is removed
from ClusterState while the source is broken, and updates made afterwards are applied."""
from __future__ import annotations

import pytest

from agent.sources import kube
from agent.sources.kube import RelistLimiter
from nodewire_dev.fake_apiserver import CUT, STALL, Fault, FakeApiServer, endpoint_slice, service
from tests.test_kube_watch import TOKEN, backends, eventually, make_source, token_file  # noqa: F401 (fixture)

HTML_502 = b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body><h1>502 Bad Gateway</h1></body>\n</html>\n"


@pytest.fixture
def api(tmp_path):
    # Bookmarks every 0.3 s: a healthy watch is never silent for as long as the tests' stall timeout.
    srv = FakeApiServer(tls=True, tokens={TOKEN: "nodewire"}, bookmark_interval=0.3, workdir=tmp_path).start()
    srv.create(service("web", "10.96.0.10"))
    srv.create(endpoint_slice("web-1", "web", ["10.244.0.5"]))
    yield srv
    srv.stop()


@pytest.fixture
def started(api, token_file):  # noqa: F811
    srcs = []

    def start(stall: float | None = None, relists: RelistLimiter | None = None):
        src = make_source(api, token_file)
        for r in src.reflectors.values():
            r.stall_timeout = stall or r.stall_timeout
            r.relists = relists or r.relists
        srcs.append(src.start())
        assert src.wait_synced(15)
        eventually(lambda: src.status()["healthy"], what="every watch open")
        assert backends(src.state, "web") == {("10.244.0.5", 8080)}
        return src

    yield start
    for s in srcs:
        s.stop()


def converges_after_fault(api, src, error_part: str):
    """The fault was seen (named in the status), nothing was removed, and a later update is applied."""
    eventually(lambda: any(error_part in (r["last_error"] or "") for r in src.status()["resources"].values()),
               what=f"an error naming {error_part!r}")
    assert backends(src.state, "web") == {("10.244.0.5", 8080)}  # stale but working: nothing removed
    api.update(endpoint_slice("web-1", "web", ["10.244.0.6"]))
    eventually(lambda: backends(src.state, "web") == {("10.244.0.6", 8080)}, what="the update after the fault")
    eventually(lambda: src.status()["healthy"], what="healthy again")


def test_429_retry_after_is_waited_out(api, started):
    src = started()
    fault = Fault(429, headers={"Retry-After": "2"})
    api.fail_next.append(fault)
    api.drop_watches()
    converges_after_fault(api, src, "HTTP 429")
    # The request answered 429, then the next request for the same resource: at least 2 s apart,
    # although the test's back-off is 0.02-0.2 s.
    hit = fault.served
    path = api.requests[hit][1].split("?")[0]
    retry = next(k for k in range(hit + 1, len(api.requests)) if api.requests[k][1].split("?")[0] == path)
    assert api.request_times[retry] - api.request_times[hit] >= 2.0
    assert sum(r["retry_after"] for r in src.status()["resources"].values()) == 1


@pytest.mark.parametrize("fault, named", [
    (Fault(502, HTML_502, "text/html"), "HTTP 502: <html> <head><title>502 Bad Gateway"),
    (Fault(503, b'{"kind":"Status","code":503,"reason":"ServiceUnavailable","message":"etcd down"}',
           headers={"Retry-After": "1"}), "HTTP 503: ServiceUnavailable: etcd down"),
    (Fault(200, b"<html><body>Please log in</body></html>", "text/html", match="/services?limit"),
     "Content-Type text/html, not JSON"),
    (Fault(200, b"[1, 2, 3]", match="/services?limit"), "not an object"),
    (Fault(200, b'{"kind":"ServiceList","metadata":{},"items":[]}', match="/services?limit"), "metadata.resourceVersion"),
])
def test_5xx_and_html_pages_on_a_re_list_keep_the_state(api, started, fault, named):
    src = started()
    api.create(service("other", "10.96.0.11"))
    api.compact()  # history before "other" is gone: the next watch is 410, the re-list gets the fault
    api.fail_next.append(fault)
    api.drop_watches()
    converges_after_fault(api, src, named)


def test_stalled_watch_times_out_and_watches_again(api, started):
    src = started(stall=1.0)
    watches = sum(r["watches"] for r in src.status()["resources"].values())
    api.watch_faults.append(STALL)  # accepted with headers, then not one byte
    api.drop_watches()
    converges_after_fault(api, src, "timed out")
    assert sum(r["watches"] for r in src.status()["resources"].values()) >= watches + 5


def test_stream_cut_mid_chunk_is_watched_again(api, started):
    src = started()
    api.watch_faults.append(CUT)
    api.drop_watches()
    converges_after_fault(api, src, "IncompleteRead")


def test_line_longer_than_the_limit_is_not_buffered_whole(api, started, monkeypatch):
    monkeypatch.setattr(kube.client, "MAX_WATCH_LINE", 4096)
    src = started()
    api.inject_watch_line("services", b'{"type":"ADDED","object":{"x":"' + b"a" * 20000 + b'"}}')
    converges_after_fault(api, src, "longer than 4096 bytes")


def test_relists_are_rate_limited_when_every_watch_expires(api, started):
    src = started(relists=RelistLimiter(burst=2, every=0.5))
    r = src.reflectors["services"]
    lists = lambda: sum(1 for _m, p in api.requests if p.startswith("/api/v1/services?") and "watch" not in p)  # noqa: E731
    n0, t0 = lists(), api.request_times[-1]
    api.expire_watches = True
    api.drop_watches()
    eventually(lambda: r.health.relists_delayed >= 4, what="re-lists held back by the limiter")
    elapsed = api.request_times[-1] - t0
    # A token bucket of 2, one token per 0.5 s: never more lists than that allows in the time taken.
    assert lists() - n0 <= 2 + elapsed / 0.5 + 1
    assert backends(src.state, "web") == {("10.244.0.5", 8080)}
    api.expire_watches = False
    api.update(endpoint_slice("web-1", "web", ["10.244.0.7"]))
    eventually(lambda: backends(src.state, "web") == {("10.244.0.7", 8080)}, what="the update after the storm")


def test_relist_limiter_is_a_token_bucket():
    now = [0.0]
    lim = RelistLimiter(burst=3, every=10.0, clock=lambda: now[0])
    assert [lim.delay() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.delay() == pytest.approx(10.0)  # the 4th waits for the next token
    now[0] = 15.0  # 1.5 tokens back, one of them owed to the 4th
    assert lim.delay() == pytest.approx(5.0)
    now[0] = 100.0
    assert [lim.delay() for _ in range(3)] == [0.0, 0.0, 0.0]  # refilled up to the burst, not beyond
    assert lim.delay() > 0


def test_retry_after_parsing():
    assert kube.client._retry_after("3") == 3.0
    assert kube.client._retry_after("100000") == kube.client.RETRY_AFTER_MAX
    assert kube.client._retry_after("-5") == 0.0
    assert kube.client._retry_after("nonsense") is None and kube.client._retry_after(None) is None
    assert kube.client._retry_after("nan") is None
    assert 0 <= kube.client._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 1  # a date in the past: now
