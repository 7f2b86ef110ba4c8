"""The Kubernetes source: list+watch Services, EndpointSlices, this node's Node and Pods into ClusterState.

Plain HTTP (http.client + ssl from the standard library), not a client library, on purpose:
  - none of lightkube, kubernetes_asyncio or the official client ships an informer: their watch helpers
    stream events and raise on `410 Gone`, leaving list → watch-from-RV → re-list-and-diff, bookmarks and
    back-off to the caller, so that loop is ours either way (client-go's Reflector is the model);
  - they decode every item into generated model classes before we could read it; nodewire already has
    strict parsers from raw dicts (agent/model/parse.py), and the 100k-Service list budget (5 s
    including decoding) leaves no room for a second object model.
What the wire protocol needs is small: bearer token (re-read when the file rotates), verified TLS,
chunked JSON lines. One thread per resource ("reflector") runs the loop; each applies objects to
ClusterState as they arrive, and the agent loop coalesces them through the one reconciler.

While the API is unreachable nothing is removed: the datapath stays as it was (stale but working), and
status()/ready() say which resource is stale and since when.
"""
from __future__ import annotations

import atexit
import base64
import http.client
import json
import logging
import os
import random
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple
from urllib.parse import urlencode, urlsplit

import yaml

from .. import memory
from ..model.objects import ObjectError, ObjectKey
from ..model.parse import PARSERS, InvalidObject, parse_node
from ..state import ClusterState

log = logging.getLogger("nodewire.kube")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
ZONE_LABEL = "topology.kubernetes.io/zone"
PAGE_SIZE = 500  # client-go's reflector pages initial lists by 500 items
# One watch line is one object: etcd refuses values over 1.5 MiB (its default --max-request-bytes),
# so 16 MiB is far above any real event and still bounds what a broken server can make us buffer.
MAX_WATCH_LINE = 16 << 20
# A healthy watch that allowed bookmarks hears from kube-apiserver at least once a minute
# (bookmarkFrequency in staging/src/k8s.io/apiserver/pkg/storage/cacher/cacher.go); a stream silent for
# 2.5 times that is taken as stalled and watched again from the last resourceVersion.
WATCH_STALL_SECONDS = 150.0
RETRY_AFTER_MAX = 120.0  # seconds; a larger Retry-After is capped (a stale source is kept meanwhile)


class KubeError(Exception):
    """A configuration or API error, with a message that names its source."""


class Gone(KubeError):
    """410: the resourceVersion (or continue token) is older than the server's history: re-list."""


class ContinueExpired(Gone):
    """410 on a list's continue token: the snapshot the pages were read from is gone."""


class RetryAfter(KubeError):
    """429 (API Priority and Fairness) or a 5xx with Retry-After: wait at least `seconds` before retrying."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


class AuthError(KubeError):
    """401/403: the credentials were refused; the message names where they came from."""


# -- configuration -----------------------------------------------------------------------------------
@dataclass
class KubeConfig:
    server: str  # https://host:port
    credential_source: str  # human-readable origin of the credentials, for error messages
    ca_file: str | None = None
    ca_data: str | None = None
    token: str | None = None
    token_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.server.startswith("https://"):
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.insecure:
            log.warning("TLS verification disabled by kubeconfig insecure-skip-tls-verify server=%s", self.server)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def in_cluster_config(api_server: str | None = None, sa_dir: str = SERVICE_ACCOUNT_DIR,
                      env: dict | None = None) -> KubeConfig:
    """The pod's service account: token + CA files, KUBERNETES_SERVICE_HOST/PORT (or --api-server)."""
    env = os.environ if env is None else env
    if api_server is None:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeError("in-cluster config: KUBERNETES_SERVICE_HOST is not set (not in a pod?); "
                            "use --kubeconfig or --api-server")
        api_server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    token_file = os.path.join(sa_dir, "token")
    if not os.path.exists(token_file):
        raise KubeError(f"in-cluster config: service account token {token_file} does not exist")
    ca = os.path.join(sa_dir, "ca.crt")
    return KubeConfig(server=api_server.rstrip("/"), credential_source=f"service account token {token_file}",
                      ca_file=ca if os.path.exists(ca) else None, token_file=token_file)


def kubeconfig_config(path: str, context: str | None = None, api_server: str | None = None) -> KubeConfig:
    """The current (or named) context of a kubeconfig file: token, tokenFile or client certificate."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise KubeError(f"kubeconfig {path}: cannot read: {e}") from None

    def named(section: str, name: str) -> dict:
        for item in doc.get(section) or []:
            if isinstance(item, dict) and item.get("name") == name:
                return item.get(section[:-1]) or {}
        raise KubeError(f"kubeconfig {path}: {section} has no entry named {name!r}")

    ctx_name = context or doc.get("current-context")
    if not ctx_name:
        raise KubeError(f"kubeconfig {path}: current-context is not set")
    ctx = named("contexts", ctx_name)
    cluster = named("clusters", ctx.get("cluster", ""))
    user_name = ctx.get("user", "")
    user = named("users", user_name) if user_name else {}
    server = api_server or cluster.get("server")
    if not server:
        raise KubeError(f"kubeconfig {path}: clusters[{ctx.get('cluster')}].server is not set")
    if "exec" in user or "auth-provider" in user:
        raise KubeError(f"kubeconfig {path}: users[{user_name}]: exec/auth-provider credentials are not supported; "
                        "use a token, tokenFile or client certificate")
    base = os.path.dirname(os.path.abspath(path))
    rel = lambda p: p if p is None or os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    cfg = KubeConfig(server=server.rstrip("/"), credential_source=f"kubeconfig {path} (user {user_name!r})",
                     ca_file=rel(cluster.get("certificate-authority")),
                     insecure=bool(cluster.get("insecure-skip-tls-verify")),
                     token=user.get("token"), token_file=rel(user.get("tokenFile")),
                     cert_file=rel(user.get("client-certificate")), key_file=rel(user.get("client-key")))
    if cluster.get("certificate-authority-data"):
        cfg.ca_data = base64.b64decode(cluster["certificate-authority-data"]).decode()
    if user.get("client-certificate-data"):
        d = tempfile.mkdtemp(prefix="nodewire-kubeconfig-")  # ssl loads client keys from files only
        atexit.register(shutil.rmtree, d, True)
        for fname, key, attr in (("client.crt", "client-certificate-data", "cert_file"),
                                 ("client.key", "client-key-data", "key_file")):
            p = os.path.join(d, fname)
            with open(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(base64.b64decode(user.get(key) or ""))
            setattr(cfg, attr, p)
    return cfg


def load_config(kubeconfig: str | None = None, api_server: str | None = None, env: dict | None = None,
                sa_dir: str = SERVICE_ACCOUNT_DIR) -> KubeConfig:
    """--kubeconfig, else $KUBECONFIG (first file), else the in-cluster service account."""
    env = os.environ if env is None else env
    path = kubeconfig or (env.get("KUBECONFIG") or "").split(os.pathsep)[0] or None
    if path:
        return kubeconfig_config(path, api_server=api_server)
    return in_cluster_config(api_server, sa_dir, env)


def node_name(env: dict | None = None) -> str:
    """NODE_NAME (the downward API sets it in the DaemonSet) or the hostname."""
    env = os.environ if env is None else env
    return env.get("NODE_NAME") or socket.gethostname()


# -- HTTP --------------------------------------------------------------------------------------------
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

    def _request(self, conn, path: str, params: dict, retry_auth: bool = True) -> http.client.HTTPResponse:
        url = self.base_path + path + ("?" + urlencode(params) if params else "")
        headers = {"Accept": "application/json", "User-Agent": "nodewire"}
        token = self._token.get()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("GET", url, headers=headers)
        resp = conn.getresponse()
        if resp.status in (401, 403):
            body = _status_message(resp.read())
            if resp.status == 401 and retry_auth and self.cfg.token_file:
                self._token.get(force=True)  # the file may have rotated since the last stat
                return self._request(conn, path, params, retry_auth=False)
            what = "Unauthorized" if resp.status == 401 else "Forbidden"
            raise AuthError(f"{resp.status} {what} from {self.cfg.server} with the credentials of "
                            f"{self.cfg.credential_source}: {body}")
        return resp

    def get(self, path: str, params: dict) -> dict:
        conn = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = self._local.conn = self._connect(self.timeout)
            resp = self._request(conn, path, params)
            data = resp.read()
        except (OSError, http.client.HTTPException):
            if conn is not None:
                self._forget(conn)
            self._local.conn = None
            raise
        _check_response(resp, data, f"GET {path}")
        page = json.loads(data)
        if not isinstance(page, dict):
            raise KubeError(f"GET {path}: the body is a JSON {type(page).__name__}, not an object")
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


# -- per-resource loop -------------------------------------------------------------------------------
@dataclass
class Backoff:
    """Exponential back-off with jitter (client-go style: delay grows by factor, randomised upwards)."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    _next: float = 0.0

    def next(self) -> float:
        base = self._next or self.initial
        self._next = min(base * self.factor, self.maximum)
        return base * (1 + self.jitter * self.rng.random())

    def reset(self) -> None:
        self._next = 0.0


class RelistLimiter:
    """A token bucket for re-lists (client-side rate limiting, as client-go's flowcontrol buckets):
    a few re-lists at once (a genuine 410 is answered at once), then at most one per `every` seconds,
    so a server that expires every watch is not hammered with full lists."""

    def __init__(self, burst: int = 3, every: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.burst, self.every, self.clock = burst, every, clock
        self.tokens, self.stamp = float(burst), clock()

    def delay(self) -> float:
        """Take a token; return how long to wait first (0 when one was available)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) / self.every)
        self.stamp = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens * self.every


@dataclass
class ResourceHealth:
    resource: str
    synced: bool = False  # the first full list has been applied
    connected: bool = False  # a watch stream is open
    stale_since: float | None = None  # wall-clock time the last good stream broke
    last_error: str | None = None
    last_error_at: float | None = None
    resource_version: str | None = None
    lists: int = 0
    relists_gone: int = 0  # re-lists caused by 410 Gone
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    bad_lines: int = 0  # watch lines skipped as undecodable or not an event
    relists_delayed: int = 0  # re-lists held back by the client-side rate limit
    retry_after: int = 0  # 429/5xx answers whose Retry-After was waited out

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("stale_since", "last_error_at"):
            if d[k] is not None:
                d[k] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d[k]))
        return d


@dataclass(frozen=True)
class WatchSpec:
    resource: str  # "services"
    path: str  # collection path
    kind: str
    params: dict = field(default_factory=dict)  # fieldSelector / labelSelector


class Reflector:
    """list → watch from the list's resourceVersion → on 410 re-list and diff; back off on errors."""

    def __init__(self, client: ApiClient, spec: WatchSpec, apply: Callable[[str, ObjectKey, dict | None, float], None],
                 stop: threading.Event, backoff: Backoff, watch_timeout: tuple[int, int] = (300, 600),
                 bad: Callable[..., None] = lambda kind, msg, field="-": log.error("kube %s: %s: %s", kind, field, msg)):
        self.client, self.spec, self.apply, self.stop = client, spec, apply, stop
        self.bad = bad  # (kind, message, field) of a line or list item that is skipped
        self.backoff = backoff
        self.watch_timeout = watch_timeout
        self.short_watch = 1.0  # seconds: a stream that ends sooner with no event is backed off
        self.stall_timeout = WATCH_STALL_SECONDS  # no byte for this long: the watch is stalled
        self.relists = RelistLimiter()
        self.health = ResourceHealth(spec.resource)
        self.known: dict[ObjectKey, str] = {}  # every object the API holds → its resourceVersion
        self.rv: str | None = None
        self.synced = threading.Event()
        self.synced_at = 0.0  # monotonic time of the first complete list

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.rv is None:
                    self._wait_relist()
                    self.list()
                started, seen = time.monotonic(), self.health.events + self.health.bookmarks
                self.watch()
                if time.monotonic() - started < self.short_watch and self.health.events + self.health.bookmarks == seen:
                    # A stream that ends at once with nothing in it: back off rather than hammer the
                    # server (client-go treats such a "very short watch" the same way).
                    self.stop.wait(self.backoff.next())
                else:
                    self.backoff.reset()
            except Gone as e:
                log.info("resourceVersion expired, re-listing resource=%s rv=%s detail=%r",
                         self.spec.resource, self.rv, str(e))
                self.health.relists_gone += 1
                self.rv = None
            except RetryAfter as e:  # the server said when: never sooner (and never sooner than back-off)
                self._broken(e)
                self.health.retry_after += 1
                self.stop.wait(max(e.seconds, self.backoff.next()))
            except (KubeError, OSError, http.client.HTTPException, ValueError) as e:
                if self.stop.is_set():
                    break
                self._broken(e)
                self.stop.wait(self.backoff.next())
            except Exception as e:  # a bug or a shape nobody foresaw: back off and go on, never end the thread
                log.exception("kube reflector error resource=%s", self.spec.resource)
                self._broken(e)
                self.stop.wait(self.backoff.next())
        self.health.connected = False

    def _wait_relist(self) -> None:
        delay = self.relists.delay()
        if delay > 0:
            self.health.relists_delayed += 1
            log.info("re-list rate-limited resource=%s wait_seconds=%.1f", self.spec.resource, delay)
            self.stop.wait(delay)

    def _broken(self, e: Exception) -> None:
        h = self.health
        msg = str(e) or type(e).__name__
        if h.connected or h.stale_since is None:
            h.stale_since = time.time()
        h.connected = False
        h.last_error, h.last_error_at = msg, time.time()
        log.warning("kube source error resource=%s error=%r (datapath kept as it was)", self.spec.resource, msg)

    def list(self) -> None:
        """Full paginated list; applies every object, then deletes those the API no longer has."""
        try:
            with memory.bulk():
                try:
                    self._list(PAGE_SIZE)
                except ContinueExpired as e:
                    # As client-go's pager: the pages' snapshot expired mid-list; read it all at once.
                    log.info("continue token expired, listing without pages resource=%s detail=%r",
                             self.spec.resource, str(e))
                    self._list(None)
        finally:
            self.client.release()

    def _list(self, limit: int | None) -> None:
        seen: dict[ObjectKey, str] = {}
        params = dict(self.spec.params, **({"limit": limit} if limit else {}))
        cont = None
        while True:
            try:
                page = self.client.get(self.spec.path, dict(params, **({"continue": cont} if cont else {})))
            except Gone as e:
                if cont:
                    raise ContinueExpired(str(e)) from None
                raise
            t = time.monotonic()
            page_meta = _list_metadata(page, self.spec.resource)
            items = page.get("items") or []
            if not isinstance(items, list):
                raise KubeError(f"list {self.spec.resource}: items is a {type(items).__name__}, not a list")
            for i, item in enumerate(items):
                meta = item.get("metadata") if isinstance(item, dict) else None
                if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
                    self.bad(self.spec.kind, f"list item {i} has no metadata.name; skipped", f"items[{i}].metadata.name")
                    continue
                key = ObjectKey(meta.get("namespace", ""), meta.get("name", ""))
                rv = meta.get("resourceVersion", "")
                seen[key] = rv
                if self.known.get(key) != rv:
                    item.setdefault("kind", self.spec.kind)
                    self.apply(self.spec.kind, key, item, t)
            cont = page_meta.get("continue")
            if not cont:
                break
        t = time.monotonic()
        for key in set(self.known) - set(seen):
            self.apply(self.spec.kind, key, None, t)
        self.known = seen
        self.rv = page_meta["resourceVersion"]
        self.health.lists += 1
        self.health.synced = True
        self.health.resource_version = self.rv
        if not self.synced.is_set():
            self.synced_at = time.monotonic()
            self.synced.set()

    def watch(self) -> None:
        params = dict(self.spec.params, watch="1", resourceVersion=self.rv, allowWatchBookmarks="true",
                      timeoutSeconds=str(random.randint(*self.watch_timeout)))
        h = self.health
        for t, ev in self.client.watch(self.spec.path, params,
                                       read_timeout=min(int(params["timeoutSeconds"]) + 30, self.stall_timeout)):
            if ev is None:  # the server accepted the watch: the source is live again
                h.connected, h.stale_since = True, None
                h.watches += 1
                continue
            if isinstance(ev, BadLine):  # skipped; the next good event carries a later resourceVersion
                h.bad_lines += 1
                self.bad(self.spec.kind, ev.message, ev.field)
                continue
            typ, obj = ev["type"], ev["object"]
            if typ == "ERROR":
                detail = _status_message(json.dumps(obj).encode())
                if obj.get("code") == 410:
                    raise Gone(detail)
                raise KubeError(f"watch {self.spec.resource}: {detail}")
            meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
            rv = meta.get("resourceVersion") if isinstance(meta.get("resourceVersion"), str) else None
            if typ == "BOOKMARK":
                h.bookmarks += 1
            elif typ in ("ADDED", "MODIFIED", "DELETED"):
                if not isinstance(meta.get("name"), str) or not isinstance(meta.get("namespace", ""), str):
                    h.bad_lines += 1
                    self.bad(self.spec.kind, f"{typ} event without a metadata.name; skipped", "object.metadata.name")
                    continue
                key = ObjectKey(meta.get("namespace", ""), meta["name"])
                if typ == "DELETED":
                    self.known.pop(key, None)
                    self.apply(self.spec.kind, key, None, t)
                else:
                    self.known[key] = rv
                    self.apply(self.spec.kind, key, obj, t)
                h.events += 1
            else:
                raise KubeError(f"watch {self.spec.resource}: unknown event type {typ!r}")
            if rv:
                self.rv = h.resource_version = rv
        # The stream ended (server-side timeout or a dropped connection): watch again from self.rv.


def _list_metadata(page: dict, resource: str) -> dict:
    """A list page's metadata, checked before any of its items is used (names the bad field)."""
    meta = page.get("metadata")
    if not isinstance(meta, dict):
        raise KubeError(f"list {resource}: metadata is a {type(meta).__name__}, not an object")
    if not isinstance(meta.get("resourceVersion"), str) or not meta["resourceVersion"]:
        raise KubeError(f"list {resource}: metadata.resourceVersion is missing or not a string")
    if not isinstance(meta.get("continue", ""), str):
        raise KubeError(f"list {resource}: metadata.continue is not a string")
    return meta


# -- the source --------------------------------------------------------------------------------------
@dataclass
class NodeInfo:
    name: str
    zone: str = ""
    addresses: tuple[tuple[str, str], ...] = ()  # (type, address)
    labels: dict = field(default_factory=dict)


class KubeSource:
    """Four reflectors feeding one ClusterState; invalid objects are skipped, logged and counted."""

    def __init__(self, cfg: KubeConfig, state: ClusterState, node: str | None = None,
                 on_error: Callable[[ObjectError], None] | None = None,
                 on_applied: Callable[[str, ObjectKey, float], None] | None = None,
                 backoff: Callable[[], Backoff] = Backoff, watch_timeout: tuple[int, int] = (300, 600),
                 client_timeout: float = 30.0):
        self.cfg, self.state = cfg, state
        self.node_name = node or node_name()
        self.node = NodeInfo(self.node_name)
        self.client = ApiClient(cfg, timeout=client_timeout)
        self.on_error = on_error
        self.on_applied = on_applied  # (kind, key, arrival time) after the object reached ClusterState
        self.invalid_objects: Counter[str] = Counter()  # kind → objects skipped as malformed
        self.invalid: dict[tuple[str, ObjectKey], ObjectError] = {}  # currently malformed objects
        self._stop = threading.Event()
        self._started = 0.0
        self.synced_seconds: float | None = None  # start → every first list applied
        self.synced_cpu_seconds: float | None = None  # process CPU time spent meanwhile (all threads)
        self._threads: list[threading.Thread] = []
        specs = [
            WatchSpec("services", "/api/v1/services", "Service"),
            WatchSpec("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice",
                      {"labelSelector": "kubernetes.io/service-name"}),
            WatchSpec("nodes", "/api/v1/nodes", "Node", {"fieldSelector": f"metadata.name={self.node_name}"}),
            WatchSpec("pods", "/api/v1/pods", "Pod", {"fieldSelector": f"spec.nodeName={self.node_name}"}),
        ]
        self.reflectors = {s.resource: Reflector(self.client, s, self._apply, self._stop, backoff(), watch_timeout,
                                                 bad=self._bad)
                           for s in specs}

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "KubeSource":
        self._started, self._started_cpu = time.monotonic(), time.process_time()
        log.info("kube source starting server=%s credentials=%r node=%s",
                 self.cfg.server, self.cfg.credential_source, self.node_name)
        for name, r in self.reflectors.items():
            t = threading.Thread(target=r.run, name=f"kube-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.client.close_all()
        for t in self._threads:
            t.join(timeout=5)

    def wait_synced(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in self.reflectors.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not r.synced.wait(left):
                return False
        return self.ready()

    # -- applying objects -----------------------------------------------------------------------
    def _apply(self, kind: str, key: ObjectKey, obj: dict | None, arrived: float) -> None:
        if kind == "Node":
            try:
                self._apply_node(obj)
            except (AttributeError, TypeError) as e:  # a Node of an unforeseen shape: keep the last one
                self._bad(kind, f"cannot decode: {type(e).__name__}: {e}")
        else:
            parse = PARSERS[kind]
            if obj is None:
                self.invalid.pop((kind, key), None)
                self.state.apply(kind, key, None)
            else:
                try:
                    parsed = parse(obj)
                except Exception as e:  # InvalidObject, or a shape the parser did not foresee
                    # Skip it; a previously good version stays (same rule as the manifest source).
                    if not isinstance(e, InvalidObject):
                        e = InvalidObject(kind, str(key), "-", f"cannot decode: {type(e).__name__}: {e}")
                    err = e.as_error("api")
                    self.invalid_objects[kind] += 1
                    self.invalid[(kind, key)] = err
                    self._report(err)
                    return
                self.invalid.pop((kind, key), None)
                self.state.apply(kind, parsed.key, parsed)
        if self.on_applied:
            self.on_applied(kind, key, arrived)

    def _bad(self, kind: str, message: str, field: str = "-") -> None:
        """A watch line or list item that could not be read as an object: skipped, counted, named."""
        err = ObjectError("api", kind, "?", field, message)
        self.invalid_objects[kind] += 1
        self._report(err)

    def _report(self, err: ObjectError) -> None:
        """To on_error (the agent logs them, summarized when they repeat), else to the log."""
        if self.on_error:
            self.on_error(err)
        else:
            log.error("invalid object skipped: %s", err)

    def _apply_node(self, obj: dict | None) -> None:
        key = ObjectKey("", self.node_name)
        if obj is None:
            self.node = NodeInfo(self.node_name)
            self.state.apply_node(key, None)
            return
        try:
            self.state.apply_node(key, parse_node(obj))  # its zone drives topology hints
        except InvalidObject as e:
            log.error("invalid object skipped: %s", e.as_error("api"))
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        labels = meta.get("labels") or {}
        addrs = tuple((a.get("type", ""), a.get("address", "")) for a in status.get("addresses") or []
                      if isinstance(a, dict))
        self.node = NodeInfo(self.node_name, labels.get(ZONE_LABEL, ""), addrs, dict(labels))

    # -- health ---------------------------------------------------------------------------------
    def register_metrics(self, meter) -> None:
        """Per-resource watch health and counts as OTel observable instruments (read at scrape time)."""
        from opentelemetry.metrics import Observation

        def per_resource(value):
            return lambda _o: [Observation(value(r.health), {"resource": name}) for name, r in self.reflectors.items()]

        meter.create_observable_gauge(
            "nodewire.kube.watch.connected", unit="1", description="1 while the resource's watch stream is open",
            callbacks=[per_resource(lambda h: int(h.connected))])
        meter.create_observable_gauge(
            "nodewire.kube.stale.duration", unit="s",
            description="How long the resource has been disconnected (0 when watching); the datapath is kept",
            callbacks=[per_resource(lambda h: time.time() - h.stale_since if h.stale_since else 0.0)])
        meter.create_observable_counter(
            "nodewire.kube.relists", unit="1", description="Re-lists after 410 Gone (history expired)",
            callbacks=[per_resource(lambda h: h.relists_gone)])
        meter.create_observable_counter(
            "nodewire.kube.events", unit="1", description="Watch events applied (ADDED/MODIFIED/DELETED)",
            callbacks=[per_resource(lambda h: h.events)])
        meter.create_observable_counter(
            "nodewire.kube.invalid_objects", unit="1", description="API objects skipped as malformed, by kind",
            callbacks=[lambda _o: [Observation(n, {"kind": k}) for k, n in self.invalid_objects.items()]])

    def ready(self) -> bool:
        """Every resource listed once (a stale watch still serves: the datapath is kept)."""
        ok = all(r.health.synced for r in self.reflectors.values())
        if ok and self.synced_seconds is None:
            self.synced_seconds = max(r.synced_at for r in self.reflectors.values()) - self._started
            self.synced_cpu_seconds = time.process_time() - self._started_cpu
        return ok

    def status(self) -> dict:
        hs = [r.health for r in self.reflectors.values()]
        stale = [h.stale_since for h in hs if h.stale_since is not None]
        errors = [h.last_error for h in hs if h.last_error and not h.connected]
        return {
            "kind": "kube", "server": self.cfg.server, "credentials": self.cfg.credential_source,
            "node": {"name": self.node.name, "zone": self.node.zone, "addresses": [list(a) for a in self.node.addresses]},
            "healthy": all(h.synced and h.connected for h in hs),
            "synced": self.ready(),
            "synced_seconds": self.synced_seconds,
            "synced_cpu_seconds": self.synced_cpu_seconds,
            "stale_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(min(stale))) if stale else None,
            "last_error": errors[0] if errors else None,
            "invalid_objects": dict(self.invalid_objects),
            "invalid_now": [str(e) for e in self.invalid.values()],
            "resources": {h.resource: h.as_dict() for h in hs},
        }
