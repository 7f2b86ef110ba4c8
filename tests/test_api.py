"""The agent's unix-socket API: JSON lines, a method registry, root-only peers (SO_PEERCRED)."""
from __future__ import annotations

import json
import os
import socket

import pytest

from agent.api import ApiError, ApiServer, call


@pytest.fixture
def server(tmp_path):
    srv = ApiServer(str(tmp_path / "run" / "api.sock"), allowed_uids=(os.getuid(),)).start()
    yield srv
    srv.close()


def test_registered_method_answers_and_errors_carry_codes(server):
    server.register("echo", lambda p: {"got": p})

    def boom(_p):
        raise ApiError("not_found", "pod default/x is not known")
    server.register("boom", boom)
    assert call(server.path, "echo", {"a": 1}) == {"got": {"a": 1}}
    assert "echo" in call(server.path, "methods")
    with pytest.raises(ApiError) as e:
        call(server.path, "boom")
    assert (e.value.code, e.value.message) == ("not_found", "pod default/x is not known")
    with pytest.raises(ApiError) as e:
        call(server.path, "nope")
    assert e.value.code == "unknown_method" and "'nope'" in e.value.message


def test_registering_a_name_twice_is_refused(server):
    server.register("services", lambda p: [])
    with pytest.raises(ValueError, match="'services' is already registered"):
        server.register("services", lambda p: [])


def test_many_requests_on_one_connection_and_bad_lines(server):
    server.register("add", lambda p: p["a"] + p["b"])
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.path)
        s.sendall(b'{"method":"add","params":{"a":1,"b":2}}\nnot json\n[1]\n{"method":"add","params":{"a":1}}\n')
        f = s.makefile("rb")
        answers = [json.loads(f.readline()) for _ in range(4)]
    assert answers[0] == {"result": 3}
    assert answers[1]["error"]["code"] == "bad_request" and "not JSON" in answers[1]["error"]["message"]
    assert answers[2]["error"]["code"] == "bad_request"
    # a method raising a plain exception is an "internal" answer, and the server keeps serving
    assert answers[3]["error"]["code"] == "internal" and "KeyError" in answers[3]["error"]["message"]
    assert call(server.path, "add", {"a": 2, "b": 2}) == 4


def test_socket_file_is_owner_only_and_a_live_socket_is_not_taken_over(server, tmp_path):
    assert os.stat(server.path).st_mode & 0o777 == 0o600
    with pytest.raises(OSError, match="in use by a running agent"):
        ApiServer(server.path).start()


def test_stale_socket_of_a_dead_agent_is_replaced(tmp_path):
    path = str(tmp_path / "api.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    srv = ApiServer(path, allowed_uids=(os.getuid(),)).start()
    try:
        assert call(path, "ping")["pid"] == os.getpid()
    finally:
        srv.close()
    assert not os.path.exists(path)


def _connect_as(uid: int, path: str) -> str:
    """Connect from a child process running as uid; return what it saw."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgid(uid)
            os.setuid(uid)
            try:
                out = json.dumps(call(path, "ping"))
            except ApiError as e:
                out = f"ApiError {e.code}"
            except OSError as e:
                out = f"OSError {e.errno}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


@pytest.mark.root
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch to another uid")
def test_only_allowed_uids_are_served():
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="nw-api-", dir="/tmp")  # pytest's tmp_path is under a 0700 dir
    os.chmod(d, 0o755)
    srv = ApiServer(os.path.join(d, "api.sock")).start()  # default: root only
    try:
        import errno
        # the file mode stops another user at connect()
        assert _connect_as(65534, srv.path) == f"OSError {errno.EACCES}"
        # with the file opened up, the peer-credential check still refuses the request
        os.chmod(srv.path, 0o666)
        assert _connect_as(65534, srv.path) == "ApiError forbidden"
        assert call(srv.path, "ping")["pid"] == os.getpid()
    finally:
        srv.close()
        shutil.rmtree(d)


@pytest.mark.root
def test_running_agent_serves_its_api_in_the_state_dir(agent_factory):
    from agent.config import state_dir_for
    agent = agent_factory(pin_suffix="-api").start()
    path = os.path.join(state_dir_for(agent.pin_dir), "api.sock")
    assert call(path, "ping")["pid"] == agent.proc.pid
    agent.cleanup()
    assert not os.path.exists(path)  # removed at a clean stop


def test_an_answer_too_deep_to_encode_is_an_internal_error_and_the_connection_goes_on(server):
    """json.loads takes nesting that json.dumps refuses (its C encoder recurses twice per level): the
    echoed answer must still be one line, and the connection must keep serving."""
    server.register("deep", lambda p: p["v"])
    depth = 700
    line = b'{"method":"deep","params":{"v":' + b"[" * depth + b"]" * depth + b"}}\n"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(server.path)
        s.sendall(line + b'{"method":"ping"}\n')
        f = s.makefile("rb")
        first, second = json.loads(f.readline()), json.loads(f.readline())
    assert first.get("result") is not None or first["error"]["code"] in ("internal", "bad_request")
    assert second == {"result": {"pid": os.getpid()}}


def test_peers_holding_every_ready_thread_do_not_keep_the_next_one_waiting(server):
    """More open connections than ready threads: the next peer gets a thread of its own and its answer;
    once the holders go, their threads serve again; a Reply's after-work runs too."""
    from agent.api import READY_THREADS, Reply
    order = []
    server.register("later", lambda p: Reply({"n": p["n"]}, lambda: order.append(("after", p["n"]))))
    holders = []
    for _ in range(READY_THREADS + 2):
        s = socket.socket(socket.AF_UNIX)
        s.connect(server.path)
        s.sendall(b'{"method": "ping"}\n')
        assert b'"pid"' in s.makefile("rb").readline()  # served, and the connection stays open
        holders.append(s)
    for n in range(3):
        assert call(server.path, "later", {"n": n}, timeout=5) == {"n": n}
    for s in holders:
        s.close()
    for n in range(READY_THREADS + 2):
        assert call(server.path, "ping", timeout=5)["pid"] == os.getpid()
    from tests.conftest import wait_for
    wait_for(lambda: sorted(order) == [("after", 0), ("after", 1), ("after", 2)], 10, what="the after-work")
