"""Fuzzed requests to the agent's unix-socket API (hypothesis): random bytes, JSON of any shape, very
deep and very long lines. Every line gets one answer (a result, or an error with a code and a message
that says what was wrong), the server keeps serving, and a good request afterwards works."""
from __future__ import annotations

import json
import os
import socket

import pytest
from hypothesis import given, strategies as st

from agent.api import MAX_LINE, ApiServer, call
from tests.fuzz_strategies import JSON

REQUESTS = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={"method": st.sampled_from(["ping", "methods", "echo", "boom"]) | JSON,
                                        "params": JSON, "id": JSON}).map(lambda d: json.dumps(d).encode()),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),  # deeper than the JSON decoder recurses
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api") / "api.sock")
    srv = ApiServer(path, allowed_uids=(os.getuid(),))
    srv.register("echo", lambda p: p)
    srv.register("boom", lambda p: 1 / 0)
    srv.start()
    yield srv
    srv.close()


def _exchange(path: str, lines: list[bytes]) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"".join(line + b"\n" for line in lines))
        s.shutdown(socket.SHUT_WR)
        f = s.makefile("rb")
        return [json.loads(line) for line in f]


@given(st.lists(REQUESTS, min_size=1, max_size=5))
def test_any_request_gets_one_named_answer_and_the_server_goes_on(server, lines):
    answers = _exchange(server.path, lines)
    assert len(answers) == len(lines)
    for a in answers:
        assert set(a) in ({"result"}, {"error"}), a
        if "error" in a:
            assert a["error"]["code"] in ("bad_request", "unknown_method", "internal") and a["error"]["message"]
    assert call(server.path, "ping")["pid"] == os.getpid()


def test_a_line_over_the_limit_is_refused_by_name(server):
    answers = _exchange(server.path, [b'{"method":"echo","params":{"x":"' + b"a" * MAX_LINE + b'"}}'])
    assert answers == [{"error": {"code": "bad_request", "message": f"request longer than {MAX_LINE} bytes"}}]
    assert call(server.path, "ping")["pid"] == os.getpid()


def test_regression_too_deep_json_is_answered(server):
    """Found by the fuzzer: json.loads raised RecursionError (not a ValueError) on a deeply nested
    line, which ended the connection's thread without an answer."""
    assert _exchange(server.path, [b"[" * 100_000 + b"]" * 100_000, b'{"method":"ping"}']) == [
        {"error": {"code": "bad_request", "message": "not JSON: nested too deeply"}},
        {"result": {"pid": os.getpid()}}]
