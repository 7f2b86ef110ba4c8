"""One resource's loop (client-go's Reflector is the model): list → watch from the list's
resourceVersion → ADDED/MODIFIED/DELETED/BOOKMARK → on 410 re-list and diff against what it knew;
back off with jitter on errors, rate-limit re-lists, and keep the last state while disconnected."""
from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ... import memory
from ...model.objects import ObjectKey
from .client import ApiClient, BadLine, _status_message
from .errors import ContinueExpired, Gone, KubeError, RetryAfter

log = logging.getLogger("nodewire.kube")
PAGE_SIZE = 500  # client-go's reflector pages initial lists by 500 items
# A healthy watch that allowed bookmarks hears from kube-apiserver at least once a minute
# (bookmarkFrequency in staging/src/k8s.io/apiserver/pkg/storage/cacher/cacher.go); a stream silent for
# 2.5 times that is taken as stalled and watched again from the last resourceVersion.
WATCH_STALL_SECONDS = 150.0


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
