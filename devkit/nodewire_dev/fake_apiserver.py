"""A fake Kubernetes API server speaking the real REST protocol over HTTP(S), for tests and the demo.

No kube-apiserver binary can be had on these machines, so the Kubernetes source is tested against this
double of the *protocol*, not a mock of our client. What it implements, as the API concepts page of the
Kubernetes documentation describes it:
  - collections of Services, EndpointSlices (discovery.k8s.io/v1), Nodes and Pods, cluster-wide and
    namespaced paths, `fieldSelector` (metadata.name, metadata.namespace, spec.nodeName) and
    equality/existence `labelSelector`s;
  - list with a collection resourceVersion, items without kind/apiVersion (as the real server sends
    them), pagination with `limit`/`continue` read from a consistent snapshot, and `410 Expired` once the
    snapshot's resourceVersion has been compacted away;
  - `watch=1`: chunked, newline-delimited JSON watch events ADDED/MODIFIED/DELETED/BOOKMARK/ERROR; an
    object that stops (starts) matching a selector is sent as DELETED (ADDED); `allowWatchBookmarks`
    sends BOOKMARKs periodically and on demand; a resourceVersion older than the retained history gets an
    ERROR event carrying a `Status` with code 410 (or an HTTP 410, selectable, as some servers answer);
  - PATCH of one object with a JSON merge patch (merge_patch.py: resourceVersion bumped, MODIFIED sent to
    watchers, a no-op patch changes nothing, a resourceVersion precondition is honoured);
  - bearer-token authentication (401) and per-user, per-resource(, per-verb) authorization (403), with `Status`
    bodies; dropping every watch connection, or stopping and restarting the whole server, on demand;
    injected answers (`fail_next`: a status code, or a `Fault` with any body, Content-Type and headers,
    e.g. 429 + Retry-After or a proxy's HTML 502 page), expired continue tokens (`expire_continue`),
    and watch faults (`watch_faults`): a stream that stalls without a byte, one cut in the middle of a
    chunk, every watch expired at once (`expire_watches`).
Objects are validated against the real Kubernetes 1.34 OpenAPI schemas (kubernetes-validate, strict:
unknown fields are errors) when they are stored, so a test cannot feed a shape a real server never sends.
"""
from __future__ import annotations

import base64
import bisect
import copy
import json
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs, urlsplit

from .merge_patch import PatchError, check_content_type, patched, spec_changed

log = logging.getLogger("nodewire.fake_apiserver")
KUBERNETES_VERSION = "1.34"


@dataclass(frozen=True)
class ResourceType:
    plural: str
    group_version: str  # apiVersion of the objects: "v1", "discovery.k8s.io/v1"
    kind: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"


RESOURCES = {
    r.plural: r for r in (
        ResourceType("services", "v1", "Service", True),
        ResourceType("endpointslices", "discovery.k8s.io/v1", "EndpointSlice", True),
        ResourceType("nodes", "v1", "Node", False),
        ResourceType("pods", "v1", "Pod", True),
    )
}
BY_KIND = {r.kind: r for r in RESOURCES.values()}


@dataclass
class Fault:
    """One injected HTTP answer."""
    code: int
    body: bytes | None = None  # None: a Status object for the code
    content_type: str = "application/json"
    headers: dict | None = None
    match: str = ""  # only for a request whose path?query contains this (e.g. "/services?limit")
    served: int | None = None  # index in FakeApiServer.requests of the request it answered


STALL, CUT = "stall", "cut"  # watch faults


class SchemaError(ValueError):
    """An object a real API server would refuse: it does not match the Kubernetes OpenAPI schema."""


class SchemaValidator:
    """Strict JSON-schema validation with the schemas kubernetes-validate ships, compiled once per kind.

    kubernetes_validate.validate() re-reads the (large) definitions file on every call; compiling one
    validator per kind makes a Service check take ~0.1 ms instead of tens of ms.
    """

    def __init__(self, version: str = KUBERNETES_VERSION):
        import jsonschema
        from kubernetes_validate import utils
        from referencing import Registry, Resource

        self._jsonschema, self._utils = jsonschema, utils
        self._Registry, self._Resource = Registry, Resource
        self.version = version
        self.schema_dir = f"v{version}.0-local-strict"
        self._defs = None
        self._validators: dict[tuple[str, str], Any] = {}

    def _validator(self, api_version: str, kind: str):
        v = self._validators.get((api_version, kind))
        if v is None:
            u = self._utils
            if self._defs is None:
                self._defs = u.schema_contents(f"kubernetes-json-schema/{self.schema_dir}/_definitions.json",
                                               self.version)
            group = api_version.split("/")[0].split(".")[0] + "-" if "/" in api_version else ""
            ver = api_version.split("/")[-1]
            schema = u.schema_contents(f"kubernetes-json-schema/{self.schema_dir}/{kind.lower()}-{group}{ver}.json",
                                       self.version)
            registry = self._Resource.from_contents(self._defs) @ (self._Resource.from_contents(schema) @ self._Registry())
            v = self._jsonschema.validators.Draft202012Validator(schema, registry=registry)
            self._validators[(api_version, kind)] = v
        return v

    def validate(self, obj: dict) -> None:
        try:
            self._validator(obj["apiVersion"], obj["kind"]).validate(obj)
        except self._jsonschema.ValidationError as e:
            meta = obj.get("metadata") or {}
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".")
            raise SchemaError(f"{obj.get('kind')} {meta.get('namespace', '')}/{meta.get('name')}: "
                              f"{where or '(object)'}: {e.message}") from None


def status_object(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


# -- selectors ---------------------------------------------------------------------------------------
def _parse_selector(text: str, what: str) -> list[tuple[str, str, str | None]]:
    """'a=b,c!=d,e,!f' → [(op, key, value)]. Only what the Kubernetes source uses (no set syntax)."""
    terms = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        for op in ("!=", "==", "="):
            if op in raw:
                k, v = raw.split(op, 1)
                terms.append(("!=" if op == "!=" else "=", k.strip(), v.strip()))
                break
        else:
            if what == "field":
                raise ValueError(f"invalid field selector term {raw!r}")
            terms.append(("!", raw[1:].strip(), None) if raw.startswith("!") else ("exists", raw, None))
    return terms


FIELD_GETTERS = {
    "metadata.name": lambda o: o["metadata"].get("name", ""),
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
    "spec.nodeName": lambda o: (o.get("spec") or {}).get("nodeName", ""),
}


class Selector:
    def __init__(self, namespace: str | None, field: str = "", label: str = "", resource: str = ""):
        self.namespace = namespace
        self.fields = _parse_selector(field, "field")
        self.labels = _parse_selector(label, "label")
        for _op, k, _v in self.fields:
            if k not in FIELD_GETTERS or (k == "spec.nodeName" and resource != "pods"):
                raise ValueError(f'field label not supported: {k}')

    def matches(self, obj: dict) -> bool:
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        for op, k, v in self.fields:
            if (FIELD_GETTERS[k](obj) == v) != (op == "="):
                return False
        labels = meta.get("labels") or {}
        for op, k, v in self.labels:
            if op == "=":
                ok = labels.get(k) == v
            elif op == "!=":
                ok = labels.get(k) != v
            else:
                ok = (k in labels) == (op == "exists")
            if not ok:
                return False
        return True


# -- the store ---------------------------------------------------------------------------------------
@dataclass
class _Event:
    rv: int
    resource: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict
    old: dict | None


def _encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _key(obj: dict) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


def _with_kind(rt: ResourceType, obj: dict) -> dict:
    return {"kind": rt.kind, "apiVersion": rt.group_version, **obj}


class FakeApiServer:
    """The server and its object store (the store survives stop()/start(), as etcd would)."""

    def __init__(self, *, tls: bool = False, tokens: dict[str, str] | None = None, history_window: int = 10_000,
                 bookmark_interval: float = 60.0, validate: bool = True, watch_expired_as: str = "event",
                 host: str = "127.0.0.1", port: int = 0, workdir: str | os.PathLike | None = None):
        self.tokens = tokens  # token → user name; None: no authentication
        self.forbidden: set[tuple[str, ...]] = set()  # (user, plural) or (user, plural, verb): 403
        self.history_window = history_window
        self.bookmark_interval = bookmark_interval
        self.validator = SchemaValidator() if validate else None
        self.watch_expired_as = watch_expired_as  # "event" (ERROR event with a 410 Status) or "http"
        self.host, self.port = host, port
        self.tls = tls
        self.cert_file = self.key_file = None
        if tls:
            workdir = Path(workdir or Path.cwd())
            self.cert_file, self.key_file = make_self_signed_cert(workdir, host)
        self._lock = threading.Condition()
        self._rv = 1000
        self._objects: dict[str, dict[tuple[str, str], dict]] = {p: {} for p in RESOURCES}
        self._encoded: dict[str, dict[tuple[str, str], bytes]] = {p: {} for p in RESOURCES}  # list-item JSON
        self._history: list[_Event] = []
        self._history_rvs: list[int] = []
        self._history_base = 0  # absolute index of _history[0]
        self._compacted_rv = self._rv  # watching from an older resourceVersion is 410 Gone
        self._snapshots: dict[tuple[str, int], list[tuple[tuple[str, str], dict, bytes]]] = {}
        self._bookmark_gen = 0
        self._drop_gen = 0
        self._watch_sockets: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[tuple[str, str]] = []  # (method, path?query) of every request, for assertions
        self.request_times: list[float] = []  # time.monotonic() of each entry of `requests`
        self.fail_next: list[int | Fault] = []  # answers for the next requests (500, 503, Fault(429, …))
        self.watch_faults: list[str] = []  # for the next watches, one each: STALL or CUT
        self.expire_watches = False  # answer every watch with an ERROR 410 event at once
        self.expire_continue = False  # answer every continue token with 410, as after a compaction

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> "FakeApiServer":
        handler = type("Handler", (_Handler,), {"api": self})
        httpd = ThreadingHTTPServer((self.host, self.port), handler)
        httpd.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cert_file, self.key_file)
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (the store is kept)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        self.drop_watches()

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def drop_watches(self) -> int:
        """Cut every open watch connection, as a restarting or overloaded API server does."""
        with self._lock:
            self._drop_gen += 1
            socks = list(self._watch_sockets)
            self._lock.notify_all()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(socks)

    def watch_count(self) -> int:
        with self._lock:
            return len(self._watch_sockets)

    def send_bookmarks(self) -> None:
        """Make every watch that allowed bookmarks send one now."""
        with self._lock:
            self._bookmark_gen += 1
            self._lock.notify_all()

    def compact(self) -> int:
        """Forget all history (like etcd compaction): watches from any older resourceVersion get 410."""
        with self._lock:
            self._history_base += len(self._history)
            self._history.clear()
            self._history_rvs.clear()
            self._compacted_rv = self._rv
            self._snapshots.clear()
            self._lock.notify_all()
            return self._rv

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    # -- writes ---------------------------------------------------------------------------------
    def create(self, obj: dict) -> dict:
        return self._write(obj, "ADDED")

    def update(self, obj: dict) -> dict:
        return self._write(obj, "MODIFIED")

    def apply(self, obj: dict) -> dict:
        """Create or update."""
        rt = BY_KIND[obj["kind"]]
        with self._lock:
            exists = _key(self._normalize(rt, obj)) in self._objects[rt.plural]
        return self._write(obj, "MODIFIED" if exists else "ADDED")

    def delete(self, kind: str, namespace: str, name: str) -> dict:
        rt = BY_KIND[kind]
        key = (namespace if rt.namespaced else "", name)
        with self._lock:
            old = self._objects[rt.plural].pop(key, None)
            self._encoded[rt.plural].pop(key, None)
            if old is None:
                raise KeyError(f"{kind} {namespace}/{name} not found")
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record(_Event(self._rv, rt.plural, "DELETED", gone, old))
            return gone

    def patch(self, kind: str, namespace: str, name: str, patch) -> dict:
        """A JSON merge patch of one stored object, with the API server's rules (merge_patch.patched);
        raises PatchError (404, 409, 400, 422) as the server would answer."""
        rt = BY_KIND[kind]
        key = (namespace if rt.namespaced else "", name)
        with self._lock:
            old = self._objects[rt.plural].get(key)
            if old is None:
                raise PatchError(404, "NotFound", f'{rt.plural} "{name}" not found')
            new = patched(kind, old, patch)
            if new == old:  # nothing changed: no new resourceVersion, no watch event
                return copy.deepcopy(_with_kind(rt, old))
            if self.validator:
                try:
                    self.validator.validate(_with_kind(rt, new))
                except SchemaError as e:
                    raise PatchError(422, "Invalid", str(e)) from None
            self._rv += 1
            new["metadata"]["resourceVersion"] = str(self._rv)
            if "generation" in old["metadata"] and spec_changed(old, new):
                new["metadata"]["generation"] = old["metadata"]["generation"] + 1
            self._objects[rt.plural][key] = new
            self._encoded[rt.plural][key] = _encode(new)
            self._record(_Event(self._rv, rt.plural, "MODIFIED", new, old))
            return copy.deepcopy(_with_kind(rt, new))

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        rt = BY_KIND[kind]
        with self._lock:
            obj = self._objects[rt.plural].get((namespace if rt.namespaced else "", name))
            return copy.deepcopy(_with_kind(rt, obj)) if obj else None

    def names(self, kind: str) -> set[tuple[str, str]]:
        with self._lock:
            return set(self._objects[BY_KIND[kind].plural])

    def load(self, objs: Iterable[dict], validate_every: int = 1) -> int:
        """Create many objects fast (benchmarks): validate one in `validate_every`, record no history."""
        n = 0
        with self._lock:
            for i, obj in enumerate(objs):
                rt = BY_KIND[obj["kind"]]
                obj = self._normalize(rt, obj)
                if self.validator and i % validate_every == 0:
                    self.validator.validate(_with_kind(rt, obj))
                self._rv += 1
                self._stamp(obj, new=True)
                self._objects[rt.plural][_key(obj)] = obj
                self._encoded[rt.plural][_key(obj)] = _encode(obj)
                n += 1
            self._history_base += len(self._history)
            self._history.clear()
            self._history_rvs.clear()
            self._compacted_rv = self._rv
            self._lock.notify_all()
        return n

    def _normalize(self, rt: ResourceType, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        obj.pop("kind", None)
        obj.pop("apiVersion", None)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        return obj

    def _stamp(self, obj: dict, new: bool, old: dict | None = None) -> None:
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        if new:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            meta["generation"] = 1
        elif old is not None:
            for f in ("uid", "creationTimestamp"):
                meta[f] = old["metadata"][f]
            meta["generation"] = old["metadata"].get("generation", 1) + 1

    def _write(self, obj: dict, kind_of_write: str) -> dict:
        rt = BY_KIND[obj["kind"]]
        obj = self._normalize(rt, obj)
        key = _key(obj)
        with self._lock:
            old = self._objects[rt.plural].get(key)
            if kind_of_write == "ADDED" and old is not None:
                raise KeyError(f"{rt.kind} {key[0]}/{key[1]} already exists")
            if kind_of_write == "MODIFIED" and old is None:
                raise KeyError(f"{rt.kind} {key[0]}/{key[1]} not found")
            self._rv += 1
            self._stamp(obj, new=old is None, old=old)
            if self.validator:
                try:
                    self.validator.validate(_with_kind(rt, obj))
                except SchemaError:
                    self._rv -= 1
                    raise
            self._objects[rt.plural][key] = obj
            self._encoded[rt.plural][key] = _encode(obj)
            self._record(_Event(self._rv, rt.plural, kind_of_write, obj, old))
            return copy.deepcopy(_with_kind(rt, obj))

    def inject_watch_line(self, plural: str, line: bytes) -> None:
        """Send `line` as-is to every watcher of `plural` (a broken server or proxy: a line that is
        not JSON, or JSON that is not an event). Changes no object and no resourceVersion."""
        with self._lock:
            self._record(_Event(self._rv, plural, "RAW", {"raw": line}, None))

    def _record(self, ev: _Event) -> None:
        self._history.append(ev)
        self._history_rvs.append(ev.rv)
        excess = len(self._history) - self.history_window
        if excess > 0:
            self._compacted_rv = self._history_rvs[excess - 1]
            del self._history[:excess]
            del self._history_rvs[:excess]
            self._history_base += excess
            for snap in [s for s in self._snapshots if s[1] < self._compacted_rv]:
                del self._snapshots[snap]
        self._lock.notify_all()

    # -- reads (called by the handler) ----------------------------------------------------------
    def list_page(self, rt: ResourceType, sel: Selector, limit: int, cont: str | None,
                  rv: str | None, rv_match: str | None) -> tuple[int, dict]:
        with self._lock:
            if cont:
                try:
                    tok = json.loads(base64.urlsafe_b64decode(cont.encode()))
                    snap_rv, start = int(tok["rv"]), int(tok["start"])
                except (ValueError, KeyError, TypeError):
                    return 400, status_object(400, "BadRequest", "continue key is not valid")
                snap = self._snapshots.get((rt.plural, snap_rv))
                if snap is None or snap_rv < self._compacted_rv or self.expire_continue:
                    return 410, status_object(
                        410, "Expired",
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter.")
            else:
                if rv and rv != "0" and rv_match == "Exact" and int(rv) != self._rv:
                    return 410, status_object(410, "Expired", f"too old resource version: {rv} ({self._rv})")
                if rv and rv != "0" and int(rv) > self._rv:
                    return 504, status_object(504, "Timeout", f"Too large resource version: {rv}, current: {self._rv}")
                snap_rv, start = self._rv, 0
                snap = self._snapshots.get((rt.plural, snap_rv))
                if snap is None:
                    enc = self._encoded[rt.plural]
                    snap = sorted(((k, o, enc[k]) for k, o in self._objects[rt.plural].items()), key=lambda t: t[0])
                    if limit:
                        self._snapshots[(rt.plural, snap_rv)] = snap
                        while len(self._snapshots) > 16:
                            del self._snapshots[next(iter(self._snapshots))]
        items: list[bytes] = []
        i = start
        while i < len(snap) and (not limit or len(items) < limit):
            if sel.matches(snap[i][1]):
                items.append(snap[i][2])
            i += 1
        meta: dict[str, Any] = {"resourceVersion": str(snap_rv)}
        if limit and i < len(snap):
            meta["continue"] = base64.urlsafe_b64encode(json.dumps({"rv": snap_rv, "start": i}).encode()).decode()
            if not sel.fields and not sel.labels:  # as the real server: not counted under a selector
                meta["remainingItemCount"] = len(snap) - i
        head = {"kind": f"{rt.kind}List", "apiVersion": rt.group_version, "metadata": meta}
        return 200, _encode(head)[:-1] + b',"items":[' + b",".join(items) + b"]}"

    def authenticate(self, header: str | None, plural: str, verb: str) -> tuple[int, dict] | None:
        if self.tokens is None:
            return None
        token = header[7:].strip() if header and header.startswith("Bearer ") else None
        user = self.tokens.get(token) if token else None
        if user is None:
            return 401, status_object(401, "Unauthorized", "Unauthorized")
        if (user, plural) in self.forbidden or (user, plural, verb) in self.forbidden:
            rt = RESOURCES[plural]
            group = "" if rt.group_version == "v1" else rt.group_version.split("/")[0]
            return 403, status_object(403, "Forbidden", f'{plural} is forbidden: User "{user}" cannot {verb} '
                                      f'resource "{plural}" in API group "{group}" at the cluster scope')
        return None


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TLS writes a body as several records; Nagle would hold the last one
    server_version = "fake-kube-apiserver/" + KUBERNETES_VERSION

    def log_message(self, fmt, *args) -> None:  # quiet; the request list is kept on the server
        log.debug("request %s", fmt % args)

    def _send_json(self, code: int, body: dict | bytes) -> None:
        data = body if isinstance(body, bytes) else _encode(body)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _injected(self, method: str) -> bool:
        """Record the request; answer it with the next matching `fail_next` fault, if any."""
        api = self.api
        api.requests.append((method, self.path))
        api.request_times.append(time.monotonic())
        f = next((f for f in api.fail_next if not isinstance(f, Fault) or f.match in self.path), None)
        if f is None:
            return False
        api.fail_next.remove(f)
        f = f if isinstance(f, Fault) else Fault(f)
        f.served = len(api.requests) - 1
        body = f.body if f.body is not None else _encode(status_object(f.code, "InternalError", "injected failure"))
        self.send_response(f.code)
        self.send_header("Content-Type", f.content_type)
        for k, v in (f.headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True

    def do_PATCH(self) -> None:
        api = self.api
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self._injected("PATCH"):
            return
        route = _route(urlsplit(self.path).path)
        if route is None:
            return self._send_json(404, status_object(404, "NotFound", f"the server could not find {self.path}"))
        rt, namespace, name = route
        if name is None:
            return self._send_json(405, status_object(405, "MethodNotAllowed", "PATCH needs one object's path"))
        denied = api.authenticate(self.headers.get("Authorization"), rt.plural, "patch")
        if denied:
            return self._send_json(*denied)
        try:
            check_content_type(self.headers.get("Content-Type"))
            try:
                patch = json.loads(body)
            except ValueError as e:
                raise PatchError(400, "BadRequest", f"the patch is not JSON: {e}") from None
            obj = api.patch(rt.kind, namespace or "", name, patch)
        except PatchError as e:
            return self._send_json(e.code, status_object(e.code, e.reason, e.message))
        self._send_json(200, obj)

    def do_GET(self) -> None:
        api = self.api
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if self._injected("GET"):
            return
        if url.path == "/version":
            return self._send_json(200, {"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake"})
        route = _route(url.path)
        if route is None:
            return self._send_json(404, status_object(404, "NotFound", f"the server could not find {url.path}"))
        rt, namespace, name = route
        denied = api.authenticate(self.headers.get("Authorization"), rt.plural, "watch" if q.get("watch") else "list")
        if denied:
            return self._send_json(*denied)
        if name is not None:
            obj = api.get(rt.kind, namespace or "", name)
            if obj is None:
                return self._send_json(404, status_object(404, "NotFound", f'{rt.plural} "{name}" not found'))
            return self._send_json(200, obj)
        try:
            sel = Selector(namespace, q.get("fieldSelector", ""), q.get("labelSelector", ""), rt.plural)
        except ValueError as e:
            return self._send_json(400, status_object(400, "BadRequest", str(e)))
        if q.get("watch") in ("1", "true"):
            return self._watch(rt, sel, q)
        try:
            limit = int(q.get("limit", "0"))
        except ValueError:
            return self._send_json(400, status_object(400, "BadRequest", "limit: not a number"))
        code, body = api.list_page(rt, sel, limit, q.get("continue"), q.get("resourceVersion"),
                                   q.get("resourceVersionMatch"))
        self._send_json(code, body)

    # -- watch ----------------------------------------------------------------------------------
    def _chunk(self, line: dict) -> None:
        self._raw_chunk(json.dumps(line, separators=(",", ":")).encode())

    def _raw_chunk(self, line: bytes) -> None:
        data = line + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _fault(self, fault: str, drop_gen: int) -> None:
        """Play one injected watch fault; the stream is over afterwards."""
        api = self.api
        if fault == STALL:  # headers sent, then silence until the watch is dropped or the server stops
            with api._lock:
                while api._drop_gen == drop_gen and api._httpd is not None:
                    api._lock.wait(0.2)
        elif fault == CUT:  # a chunk that announces a whole event, half of it, then the connection goes
            data = _encode({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "1"}}}) + b"\n"
            self.wfile.write(b"%x\r\n%s" % (len(data), data[: len(data) // 2]))
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            raise ValueError(f"unknown watch fault {fault!r}")

    def _watch(self, rt: ResourceType, sel: Selector, q: dict) -> None:
        api = self.api
        bookmarks = q.get("allowWatchBookmarks") in ("1", "true")
        timeout = float(q.get("timeoutSeconds", "1800"))
        rv = q.get("resourceVersion")
        initial: list[dict] = []
        with api._lock:
            if rv and rv != "0":
                try:
                    start_rv = int(rv)
                except ValueError:
                    return self._send_json(400, status_object(400, "BadRequest", f"invalid resourceVersion {rv!r}"))
                if start_rv < api._compacted_rv:
                    gone = status_object(410, "Expired", f"too old resource version: {rv} ({api._compacted_rv})")
                    if api.watch_expired_as == "http":
                        return self._send_json(410, gone)
                    initial_error = gone
                else:
                    initial_error = None
                pos = api._history_base + bisect.bisect_right(api._history_rvs, start_rv)
            else:  # "start at most recent": synthetic ADDED events for the current state first
                initial_error = None
                initial = [o for _k, o in sorted(api._objects[rt.plural].items()) if sel.matches(o)]
                pos = api._history_base + len(api._history)
            drop_gen, bm_gen = api._drop_gen, api._bookmark_gen
            sock = self.connection
            api._watch_sockets.add(sock)
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if api.expire_watches:
                initial_error = status_object(410, "Expired", "too old resource version (injected)")
            if initial_error:
                self._chunk({"type": "ERROR", "object": initial_error})
                return self._end()
            with api._lock:
                fault = api.watch_faults.pop(0) if api.watch_faults else None
            if fault is not None:
                return self._fault(fault, drop_gen)
            for o in initial:
                self._chunk({"type": "ADDED", "object": _with_kind(rt, o)})
            deadline = time.monotonic() + timeout
            next_bookmark = time.monotonic() + api.bookmark_interval
            while True:
                bookmark_rv = None
                with api._lock:
                    while True:
                        now = time.monotonic()
                        new = api._history_base + len(api._history) > pos
                        if (new or api._drop_gen != drop_gen or now >= deadline or api._bookmark_gen != bm_gen
                                or (bookmarks and now >= next_bookmark)):
                            break
                        api._lock.wait(min(deadline, next_bookmark if bookmarks else deadline) - now)
                    if api._drop_gen != drop_gen:
                        return
                    if pos < api._history_base:  # fell behind compaction: the watch cannot continue
                        gone = status_object(410, "Expired", f"too old resource version ({api._compacted_rv})")
                        events, expired = [], gone
                    else:
                        events = api._history[pos - api._history_base:]
                        pos = api._history_base + len(api._history)
                        expired = None
                    if bookmarks and (api._bookmark_gen != bm_gen or time.monotonic() >= next_bookmark):
                        bookmark_rv = api._rv
                        next_bookmark = time.monotonic() + api.bookmark_interval
                    bm_gen = api._bookmark_gen
                if expired:
                    self._chunk({"type": "ERROR", "object": expired})
                    return self._end()
                for ev in events:
                    if ev.type == "RAW":
                        if ev.resource == rt.plural:
                            self._raw_chunk(ev.obj["raw"])
                        continue
                    out = _translate(ev, rt, sel)
                    if out:
                        self._chunk({"type": out, "object": _with_kind(rt, ev.obj)})
                if bookmark_rv is not None:
                    self._chunk({"type": "BOOKMARK", "object": {
                        "kind": rt.kind, "apiVersion": rt.group_version,
                        "metadata": {"resourceVersion": str(bookmark_rv)}}})
                if time.monotonic() >= deadline:
                    return self._end()
        except OSError:
            return
        finally:
            with api._lock:
                api._watch_sockets.discard(sock)

    def _end(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass


def _translate(ev: _Event, rt: ResourceType, sel: Selector) -> str | None:
    """The event type a watcher with this selector sees (None: not at all)."""
    if ev.resource != rt.plural:
        return None
    if ev.type == "MODIFIED":
        was, now = sel.matches(ev.old), sel.matches(ev.obj)
        return "MODIFIED" if was and now else "ADDED" if now else "DELETED" if was else None
    return ev.type if sel.matches(ev.obj) else None


def _route(path: str) -> tuple[ResourceType, str | None, str | None] | None:
    """/api/v1[/namespaces/NS]/PLURAL[/NAME] → (type, namespace, name)."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        prefix = "v1"
        rest = parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        prefix = f"{parts[1]}/{parts[2]}"
        rest = parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 2:
        return None
    rt = RESOURCES.get(rest[0])
    if rt is None or rt.group_version != prefix or (namespace is not None and not rt.namespaced):
        return None
    return rt, namespace, rest[1] if len(rest) == 2 else None


def make_self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[str, str]:
    """A throw-away CA-less self-signed server certificate (openssl CLI), valid for host and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "apiserver.crt", directory / "apiserver.key"
    san = f"IP:{host},DNS:localhost" if host[0].isdigit() else f"DNS:{host},DNS:localhost"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=fake-kube-apiserver", "-addext", f"subjectAltName={san}",
                    "-days", "2", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


# -- object builders for tests, the demo and benchmarks (schema-valid shapes) ------------------------
def service(name: str, cluster_ip: str, ports: list[tuple[str, int, int | str]] | None = None,
            namespace: str = "default", protocol: str = "TCP", **spec: Any) -> dict:
    ports = ports or [("http", 80, 8080)]
    family = "IPv6" if ":" in cluster_ip else "IPv4"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ipFamilies": [family],
                     "ports": [{"name": n, "port": p, "targetPort": t, "protocol": protocol} for n, p, t in ports],
                     **spec}}


def endpoint_slice(name: str, service_name: str, addresses: list[str], ports: list[tuple[str, int]] | None = None,
                   namespace: str = "default", ready: bool = True, node: str = "", protocol: str = "TCP") -> dict:
    ports = ports or [("http", 8080)]
    family = "IPv6" if addresses and ":" in addresses[0] else "IPv4"
    eps = []
    for a in addresses:
        ep: dict[str, Any] = {"addresses": [a], "conditions": {"ready": ready, "serving": ready, "terminating": False}}
        if node:
            ep["nodeName"] = node
        eps.append(ep)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": family, "endpoints": eps,
            "ports": [{"name": n, "port": p, "protocol": protocol} for n, p in ports]}


def node(name: str, zone: str = "", internal_ip: str = "") -> dict:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
                           "spec": {}}
    if internal_ip:
        obj["status"] = {"addresses": [{"type": "InternalIP", "address": internal_ip},
                                       {"type": "Hostname", "address": name}]}
    return obj


def pod(name: str, ip: str, node_name: str, namespace: str = "default", labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": node_name, "containers": [{"name": "app", "image": "registry.example/app:1"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


# -- standalone: `python -m nodewire_dev.fake_apiserver --manifests DIR` ----------------------------
def _manifest_objects(directory: Path) -> dict[tuple[str, str, str], dict]:
    """(kind, namespace, name) → object for every Service/EndpointSlice/Node/Pod in DIR's files."""
    import yaml

    out = {}
    for path in sorted(directory.rglob("*")):
        if path.suffix not in (".yaml", ".yml", ".json") or path.name.startswith("."):
            continue
        docs = [json.loads(path.read_text())] if path.suffix == ".json" else list(yaml.safe_load_all(path.read_text()))
        stack = [d for d in docs if isinstance(d, dict)]
        while stack:
            d = stack.pop()
            if str(d.get("kind", "")).endswith("List"):
                stack.extend(i for i in d.get("items") or [] if isinstance(i, dict))
            elif d.get("kind") in BY_KIND:
                meta = d.get("metadata") or {}
                ns = meta.get("namespace", "default") if BY_KIND[d["kind"]].namespaced else ""
                out[(d["kind"], ns, meta.get("name", ""))] = d
    return out


def _sync_directory(api: FakeApiServer, directory: Path, previous: dict) -> dict:
    """Make the server hold what the files hold: create, update (when changed) and delete."""
    import yaml

    try:
        now = _manifest_objects(directory)
    except (OSError, ValueError, yaml.YAMLError) as e:  # keep serving the last good set
        log.error("cannot read manifests: %s", e)
        return previous
    for ident in set(previous) - set(now):
        try:
            api.delete(*ident)
        except KeyError:  # it had been refused
            pass
    for ident, obj in now.items():
        if previous.get(ident) != obj:
            try:
                api.apply(obj)
            except SchemaError as e:  # reported once; retried when the file changes
                log.error("refused (schema): %s", e)
    return now


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="A fake Kubernetes API server serving the manifests of a directory; "
                                             "file edits become watch events.")
    ap.add_argument("--manifests", required=True, type=Path)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nodewire-fake-apiserver"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="ts=%(asctime)s level=%(levelname)s msg=%(message)s")
    token = uuid.uuid4().hex
    api = FakeApiServer(tls=True, tokens={token: "nodewire"}, port=args.port, workdir=args.workdir,
                        bookmark_interval=30.0).start()
    kubeconfig = args.workdir / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url, "certificate-authority": api.cert_file}}],
        "users": [{"name": "nodewire", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "nodewire"}}]}))
    print(f"serving {api.url}; run: nodewire run --kubeconfig {kubeconfig}", flush=True)
    held: dict = {}
    try:
        while True:
            held = _sync_directory(api, args.manifests, held)
            time.sleep(0.5)
    except KeyboardInterrupt:
        api.stop()


if __name__ == "__main__":
    main()
