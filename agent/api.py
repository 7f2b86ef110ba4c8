"""The agent's local API: JSON lines over a root-only unix socket.

One request per line, one answer per line, any number of requests per connection:

    → {"method": "cni.add", "params": {...}}
    ← {"result": ...}                      or   ← {"error": {"code": "unknown_method", "message": "..."}}

Who may talk to it is checked twice, as Cilium's and containerd's local sockets do: the socket file is
mode 0600 (only root can connect), and every peer's credentials (SO_PEERCRED) are checked against the
allowed uids before a request is read. Features add their own methods with `register(name, fn)`;
fn(params) returns something JSON can encode, or raises ApiError for an answer with a code.

The client half (`call`) is the stdlib-only helper the CLI and tests use; the CNI plugin, a static C
executable (agent/cni/csrc), speaks the same protocol (MAX_LINE reaches it as -D).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import struct
import threading
from typing import Any, Callable

log = logging.getLogger("nodewire.api")

MAX_LINE = 1 << 20  # a request larger than this is refused (a CNI result is a few KiB)
# Connections are served by threads started with the server; one more thread per connection only while
# all of these are busy (a peer holding its connection open never keeps others waiting). Starting a
# thread per connection cost the CNI plugin's ADD ~1-1.5 ms of its ~3.5 ms on a loaded node (measured).
READY_THREADS = 4
Method = Callable[[dict], Any]


class Reply:
    """A method's result and work to do once it is sent, so the caller is answered first (the CNI
    plugin's ADD is on a pod's start-up path; what the agent does with it can follow)."""

    __slots__ = ("result", "after")

    def __init__(self, result: Any, after: Callable[[], None]):
        self.result, self.after = result, after


class ApiError(Exception):
    """An answer with a code: `unknown_method`, `bad_request`, `forbidden`, `not_found`, or a
    method's own."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


class ApiServer:
    def __init__(self, path: str, allowed_uids: tuple[int, ...] = (0,)):
        self.path, self.allowed_uids = path, tuple(allowed_uids)
        self._methods: dict[str, Method] = {}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # connections for the ready threads
        self._idle = 0                                         # ready threads waiting for one
        self._idle_lock = threading.Lock()
        self.register("ping", lambda _p: {"pid": os.getpid()})
        self.register("methods", lambda _p: sorted(self._methods))

    # -- registry --------------------------------------------------------------------------------
    def register(self, name: str, fn: Method) -> None:
        """Add a method. A name registered twice is a programming error, not a silent override."""
        with self._lock:
            if name in self._methods:
                raise ValueError(f"api method {name!r} is already registered")
            self._methods[name] = fn

    def unregister(self, name: str) -> None:
        with self._lock:
            self._methods.pop(name, None)

    def dispatch(self, request: Any) -> dict:
        """One decoded request → one answer (also the seam unit tests drive without a socket)."""
        answer, after = self._dispatch(request)
        if after is not None:
            after()
        return answer

    def _dispatch(self, request: Any) -> tuple[dict, Callable[[], None] | None]:
        """The answer, and what to run once it is sent (a method's Reply.after)."""
        answer = self._call(request)
        if isinstance(answer.get("result"), Reply):
            reply = answer["result"]
            return {"result": reply.result}, reply.after
        return answer, None

    def _call(self, request: Any) -> dict:
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            return _error("bad_request", 'a request is a JSON object with a string "method"')
        params = request.get("params") or {}
        if not isinstance(params, dict):
            return _error("bad_request", f"{request['method']}: params must be an object")
        with self._lock:
            fn = self._methods.get(request["method"])
        if fn is None:
            return _error("unknown_method", f"no method {request['method']!r} (see method 'methods')")
        try:
            return {"result": fn(params)}
        except ApiError as e:
            return _error(e.code, e.message)
        except Exception as e:  # one failing call never takes the server down
            log.exception("api method failed method=%s", request["method"])
            return _error("internal", f"{request['method']}: {type(e).__name__}: {e}")

    # -- server ----------------------------------------------------------------------------------
    def start(self) -> "ApiServer":
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        _remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the file is 0600 from the moment it exists
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(64)
        self._sock = sock
        for _ in range(READY_THREADS):
            threading.Thread(target=self._ready_thread, name="api-conn", daemon=True).start()
        self._idle = READY_THREADS
        self._thread = threading.Thread(target=self._accept_loop, name="api", daemon=True)
        self._thread.start()
        log.info("api listening path=%s allowed_uids=%s", self.path, ",".join(map(str, self.allowed_uids)))
        return self

    def close(self) -> None:
        self._closing.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(5)
        for _ in range(READY_THREADS):
            self._ready.put(None)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._idle_lock:
                ready = self._idle > 0
                self._idle -= ready
            if ready:
                self._ready.put(conn)
            else:
                threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()

    def _ready_thread(self) -> None:
        while (conn := self._ready.get()) is not None:
            self._serve(conn)
            with self._idle_lock:
                self._idle += 1

    def _serve(self, conn: socket.socket) -> None:
        """One connection: check the peer, then answer line by line until it closes. The socket and
        its file are closed however this ends, so a peer never waits on a connection nobody reads."""
        try:
            pid, uid, _gid = peer_credentials(conn)
            if uid not in self.allowed_uids:
                log.warning("api peer refused pid=%d uid=%d", pid, uid)
                _send(conn, _error("forbidden", f"uid {uid} may not use the nodewire API"))
                return
            conn.settimeout(60)
            with conn.makefile("rb") as f:  # the file holds the socket open: it is closed too
                while True:
                    answer, after = self._answer(f, conn)
                    sent = _send(conn, answer)
                    if after is not None:
                        after()
                    if not sent:
                        break
        except _Done:
            pass
        except Exception:
            log.exception("api connection failed")
        finally:
            conn.close()

    def _answer(self, f, conn: socket.socket) -> tuple[dict, Callable[[], None] | None]:
        """The answer to the next line; _Done when the peer is gone or the line is over the limit."""
        try:
            line = f.readline(MAX_LINE + 1)
        except OSError:
            raise _Done from None
        if not line:
            raise _Done
        if len(line) > MAX_LINE:
            _send(conn, _error("bad_request", f"request longer than {MAX_LINE} bytes"))
            raise _Done
        try:
            request = json.loads(line)
        except ValueError as e:
            return _error("bad_request", f"not JSON: {e}"), None
        except RecursionError:  # not a ValueError: it would end this thread without an answer
            return _error("bad_request", "not JSON: nested too deeply"), None
        return self._dispatch(request)


class _Done(Exception):
    """The connection is finished (peer closed, or a line over the limit was refused)."""


def _error(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _send(conn: socket.socket, answer: dict) -> bool:
    try:
        data = json.dumps(answer, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as e:  # e.g. a result nested deeper than the encoder goes
        data = json.dumps(_error("internal", f"the answer is not encodable as JSON: {type(e).__name__}: {e}")).encode()
    try:
        conn.sendall(data + b"\n")
        return True
    except OSError:
        return False


def _remove_stale(path: str) -> None:
    """A socket file left by a dead agent is removed; one a live agent answers on is not."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"api socket {path} is in use by a running agent")


def call(path: str, method: str, params: dict | None = None, timeout: float = 5.0) -> Any:
    """Call one method; raises ApiError for an error answer, OSError when no agent listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(json.dumps({"method": method, "params": params or {}}).encode() + b"\n")
        except BrokenPipeError:
            pass  # the agent answered before reading (a refused peer) and closed: its answer is still readable
        answer = json.loads(s.makefile("rb").readline(MAX_LINE + 1) or b"null")
    if not isinstance(answer, dict):
        raise ApiError("bad_answer", f"{method}: the agent closed the connection without an answer")
    if "error" in answer:
        raise ApiError(answer["error"].get("code", "?"), answer["error"].get("message", ""))
    return answer.get("result")
