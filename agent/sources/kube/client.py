"""Plain HTTP to one API server (http.client + ssl from the standard library): a bearer token re-read
when its file rotates, verified TLS, lists as JSON objects and watches as chunked JSON lines, every
non-200 answer turned into the error it means (410 Gone, 429/5xx Retry-After, 401/403)."""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
from typing import NamedTuple
from urllib.parse import urlencode, urlsplit

from .config import KubeConfig
from .errors import AuthError, Gone, KubeError, RetryAfter

log = logging.getLogger("nodewire.kube")
# One watch line is one object: etcd refuses values over 1.5 MiB (its default --max-request-bytes),
# so 16 MiB is far above any real event and still bounds what a broken server can make us buffer.
MAX_WATCH_LINE = 16 << 20
MERGE_PATCH = "application/merge-patch+json"  # RFC 7386; what the API server calls a JSON merge patch
RETRY_AFTER_MAX = 120.0  # seconds; a larger Retry-After is capped (a stale source is kept meanwhile)


class _Token:
    """The bearer token; a token file is re-read when it changes (kubelet rotates projected tokens)."""

    def __init__(self, cfg: KubeConfig):
        self.cfg = cfg
        self._stamp: tuple | None = None
        self._value = cfg.token

    def get(self, force: bool = False) -> str | None:
        path = self.cfg.token_file
        if path:
            try:
                st = os.stat(path)
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if force or stamp != self._stamp:
                    with open(path) as f:
                        value = f.read().strip()
                    if self._stamp is not None and value != self._value:
                        log.info("token file changed, using the new token path=%s", path)
                    self._value, self._stamp = value, stamp
            except OSError as e:
                raise AuthError(f"cannot read token file {path}: {e}") from None
        return self._value


class ApiClient:
    """Requests to one API server; thread-safe (each call opens or reuses a per-thread connection)."""

    def __init__(self, cfg: KubeConfig, timeout: float = 30.0):
        self.cfg = cfg
        self.timeout = timeout
        u = urlsplit(cfg.server)
        self.host, self.port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
        self.base_path = u.path.rstrip("/")
        self._ssl = cfg.ssl_context()
        self._token = _Token(cfg)
        self._local = threading.local()
        self._open: set[http.client.HTTPConnection] = set()
        self._open_lock = threading.RLock()
        self.closed = False

    def _connect(self, read_timeout: float) -> http.client.HTTPConnection:
        """Connect (TLS handshake bounded by self.timeout), then allow read_timeout between reads."""
        if self._ssl is not None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as e:
            conn.close()
            raise KubeError(f"TLS verification of {self.cfg.server} failed: {e.verify_message}") from None
        conn.sock.settimeout(read_timeout)
        _keepalive(conn.sock)
        # http.client drops conn.sock when a response takes the connection over; keep our own handle
        # so that close_all() can always cut a blocked read.
        conn._nodewire_sock = conn.sock
        with self._open_lock:
            self._open.add(conn)
            if self.closed:
                self._forget(conn)
                raise KubeError("client closed")
        return conn

    def _forget(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        with self._open_lock:
            self._open.discard(conn)

    def close_all(self) -> None:
        """Cut every connection (unblocks reflector threads on shutdown)."""
        with self._open_lock:
            self.closed = True
            socks = [c._nodewire_sock for c in self._open]
        for s in socks:
            try:
                socket.socket.shutdown(s, socket.SHUT_RDWR)  # the fd itself, also under a TLS socket
            except OSError:
                pass

    def _request(self, conn, path: str, params: dict, retry_auth: bool = True, method: str = "GET",
                 body: bytes | None = None, content_type: str = "") -> http.client.HTTPResponse:
        url = self.base_path + path + ("?" + urlencode(params) if params else "")
        headers = {"Accept": "application/json", "User-Agent": "nodewire"}
        if content_type:
            headers["Content-Type"] = content_type
        token = self._token.get()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, url, body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status in (401, 403):
            body_text = _status_message(resp.read())
            if resp.status == 401 and retry_auth and self.cfg.token_file:
                self._token.get(force=True)  # the file may have rotated since the last stat
                return self._request(conn, path, params, False, method, body, content_type)
            what = "Unauthorized" if resp.status == 401 else "Forbidden"
            raise AuthError(f"{resp.status} {what} from {self.cfg.server} with the credentials of "
                            f"{self.cfg.credential_source}: {body_text}")
        return resp

    def get(self, path: str, params: dict) -> dict:
        return self._call("GET", path, params)

    def patch(self, path: str, patch: dict, content_type: str = MERGE_PATCH) -> dict:
        """PATCH one object (a JSON merge patch, RFC 7386, by default); returns the object as stored."""
        return self._call("PATCH", path, {}, json.dumps(patch).encode(), content_type)

    def _call(self, method: str, path: str, params: dict, body: bytes | None = None, content_type: str = "") -> dict:
        conn = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = self._local.conn = self._connect(self.timeout)
            resp = self._request(conn, path, params, method=method, body=body, content_type=content_type)
            data = resp.read()
        except (OSError, http.client.HTTPException):
            if conn is not None:
                self._forget(conn)
            self._local.conn = None
            raise
        _check_response(resp, data, f"{method} {path}")
        page = json.loads(data)
        if not isinstance(page, dict):
            raise KubeError(f"{method} {path}: the body is a JSON {type(page).__name__}, not an object")
        return page

    def release(self) -> None:
        """Close this thread's list connection: lists are rare, and an idle keep-alive connection the
        server has since closed would turn the next re-list into a spurious error."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._forget(conn)
            self._local.conn = None

    def watch(self, path: str, params: dict, read_timeout: float):
        """Yield (arrival time, decoded event) per line until the stream ends; first (t, None) once accepted."""
        conn = self._connect(read_timeout)
        try:
            resp = self._request(conn, path, params)
            _check_response(resp, None if resp.status == 200 else resp.read(), f"watch {path}")
            yield time.monotonic(), None  # accepted
            while True:
                line = resp.readline(MAX_WATCH_LINE + 1)
                if not line:
                    return
                if not line.endswith(b"\n"):  # never decode a fragment as if it were a whole event
                    what = "is longer than %d bytes" % MAX_WATCH_LINE if len(line) > MAX_WATCH_LINE else "ended mid-line"
                    raise KubeError(f"watch {path}: the stream {what}; watching again")
                t = time.monotonic()
                if line.strip():
                    yield t, _decode_event(line)
        finally:
            self._forget(conn)


class BadLine(NamedTuple):
    """A watch line that is not a decodable event; the stream goes on with the next line."""
    message: str
    field: str = "line"  # what was wrong: the line itself, its "type" or its "object"


def _decode_event(line: bytes) -> dict | BadLine:
    try:
        ev = json.loads(line)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        return BadLine(f"undecodable watch line ({len(line)} bytes): {type(e).__name__}: {str(e)[:120]}")
    if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
        return BadLine(f"watch line is not an event (no string type): {line[:80]!r}", "type")
    if not isinstance(ev.get("object"), dict):
        return BadLine(f"{ev['type']!r} event without an object: {line[:80]!r}", "object")
    return ev


def _keepalive(sock: socket.socket) -> None:
    """TCP keepalive: a peer that vanished (no RST) is noticed in ~1 min, as client-go's HTTP/2 ping
    health check (ReadIdleTimeout 30 s + PingTimeout 15 s) would; a live but silent server is the
    read timeout's job."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def _check_response(resp: http.client.HTTPResponse, data: bytes | None, what: str) -> None:
    """Raise the error a non-200 answer (or a 200 that is not JSON, e.g. a proxy's HTML page) means."""
    ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if resp.status == 200:
        if ctype and "json" not in ctype:
            raise KubeError(f"{what}: HTTP 200 with Content-Type {ctype}, not JSON"
                            + (f": {_status_message(data)}" if data else ""))
        return
    detail = _status_message(data or b"")
    if resp.status == 410:
        raise Gone(detail)
    retry = _retry_after(resp.getheader("Retry-After"))
    if resp.status == 429 or (resp.status >= 500 and retry is not None):
        raise RetryAfter(f"{what}: HTTP {resp.status}: {detail} (retry after {retry or 1:g}s)", retry or 1.0)
    raise KubeError(f"{what}: HTTP {resp.status}: {detail}")


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (RFC 9110: delay-seconds or an HTTP-date), capped; None when absent."""
    if not value:
        return None
    try:
        secs = float(value.strip())
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            secs = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return min(max(secs, 0.0), RETRY_AFTER_MAX) if secs == secs else None  # NaN → None


def _status_message(data: bytes) -> str:
    try:
        st = json.loads(data)
        reason, message = st.get("reason", ""), st.get("message", "")
        return str(message) if not reason or reason == message else f"{reason}: {message}"
    except (ValueError, AttributeError, RecursionError):
        text = data[:200].decode(errors="replace")
        return " ".join(text.split())  # an HTML page on one line
