"""ClusterState: the parsed objects every source feeds, and which Services changed since the last sync.

Every source, on its own thread, calls apply(kind, key, obj) (obj None for a deletion), or apply_all()
for a batch under one lock; that is the one write path for every kind. The sync loop waits on
`changed`, then asks take_views() for the views (model/view.py) of the Services that must be
recomputed (take_dirty(): their socket frontends only). An EndpointSlice change dirties only its own
Service. The objects are the compact records of agent/model/objects.py; views are computed from them
per dirty Service, on demand, under the state's lock: nothing reads the state again mid-sync.

A Node object sets this node's zone (topology hints), unless the configuration fixed it.

Readers on other threads (the observer's pod identity, the RDMA opt-ins) read `pods` and `services`
(plain dicts; copy them with list(d.items()), which is atomic under the GIL) and compare
`identity_revision`, which moves only when a Pod or a Service changes (not on endpoint churn).
"""
from __future__ import annotations

import threading
from typing import Any, Iterable

from dataclasses import replace

from .model.frontends import Frontend, service_frontends
from .model.northsouth import NodeInfo
from .model.objects import EndpointSlice, Node, ObjectKey, Objects, Pod, Service
from .model.view import ServiceView, service_view

KINDS = ("Service", "EndpointSlice", "Pod", "Node")


class ClusterState:
    def __init__(self, node_name: str | None = None, zone: str = "") -> None:
        self.node_name = node_name  # for internalTrafficPolicy: Local and node hints
        # This node's topology.kubernetes.io/zone, for zone hints: --zone when given, else its Node object's.
        self.zone = zone
        self._zone_fixed = bool(zone)
        self.services: dict[ObjectKey, Service] = {}
        self.slices: dict[ObjectKey, EndpointSlice] = {}
        self.pods: dict[ObjectKey, Pod] = {}
        self.nodes: dict[ObjectKey, Node] = {}
        self.tables: dict[str, dict[ObjectKey, Any]] = {
            "Service": self.services, "EndpointSlice": self.slices, "Pod": self.pods, "Node": self.nodes}
        # Service → its slice key, or a tuple of them when it has several (most have one; a container
        # per Service costs ~60 bytes, 6 MiB at 100k).
        self._slices_of: dict[ObjectKey, ObjectKey | tuple[ObjectKey, ...]] = {}
        self._dirty: set[ObjectKey] = set()
        self._lock = threading.Lock()
        self.changed = threading.Event()
        self.revision = 0  # every change
        self.identity_revision = 0  # changes of Pods and Services only

    # -- writes (from sources) -------------------------------------------------------------------
    def apply(self, kind: str, key: ObjectKey, obj: Any | None) -> bool:
        """Make `key` of `kind` equal to obj (None: deleted). True when something changed."""
        with self._lock:
            changed = self._apply(kind, key, obj)
        if changed:
            self.changed.set()
        return changed

    def apply_all(self, changes: Iterable[tuple[str, ObjectKey, Any | None]]) -> int:
        """Several apply()s under one lock (a manifest file, a page of a list); the number that changed."""
        with self._lock:
            n = sum(self._apply(kind, key, obj) for kind, key, obj in changes)
        if n:
            self.changed.set()
        return n

    def wake(self) -> None:
        """Wake the agent loop without a change to the objects (a source's errors changed)."""
        self.changed.set()

    # Shorthands of apply() for one kind (the CNI pod source, benchmarks, tests).
    def apply_service(self, key: ObjectKey, svc: Service | None) -> bool:
        return self.apply("Service", key, svc)

    def apply_slice(self, key: ObjectKey, sl: EndpointSlice | None) -> bool:
        return self.apply("EndpointSlice", key, sl)

    def apply_pod(self, key: ObjectKey, pod: Pod | None) -> bool:
        return self.apply("Pod", key, pod)

    def apply_node(self, key: ObjectKey, node: Node | None) -> bool:
        return self.apply("Node", key, node)

    def node_addresses_changed(self) -> int:
        """This node's own addresses changed (north-south's device watcher): every Service with a node
        port is recomputed, its NodePort frontends being node address × port. Returns how many."""
        with self._lock:
            keys = [k for k, svc in self.services.items() if any(p.node_port for p in svc.ports)]
            self._dirty.update(keys)
        if keys:
            self.changed.set()
        return len(keys)

    def replace(self, objs: Objects) -> None:
        """Make the state equal to a full set of objects (tests, one-shot loads): the differences only."""
        want = {"Service": objs.services, "EndpointSlice": objs.slices, "Pod": objs.pods, "Node": objs.nodes}
        self.apply_all([(kind, key, None) for kind, table in self.tables.items() for key in table
                        if key not in want[kind]]
                       + [(kind, key, obj) for kind in ("Node", "Service", "EndpointSlice", "Pod")
                          for key, obj in want[kind].items()])

    def _apply(self, kind: str, key: ObjectKey, obj: Any | None) -> bool:
        table = self.tables[kind]
        old = table.get(key)
        if old == obj:
            return False
        if obj is None:
            del table[key]
        else:
            table[key] = obj
        if kind == "EndpointSlice":
            self._move_slice(key, old, obj)
        elif kind == "Node":
            if key.name == self.node_name and not self._zone_fixed:
                self._set_zone(obj.zone if obj else "")
        else:
            if kind == "Service":
                self._dirty.add(key)
            self.identity_revision += 1
        self.revision += 1
        return True

    def _set_zone(self, zone: str) -> None:
        if zone != self.zone:  # topology changes for every Service
            self.zone = zone
            self._dirty.update(self.services)

    def _move_slice(self, key: ObjectKey, old: EndpointSlice | None, new: EndpointSlice | None) -> None:
        if old is not None:
            svc = self._service_key(old)
            held = self._slices_of.get(svc)
            if held == key:
                del self._slices_of[svc]
            elif isinstance(held, tuple):
                rest = tuple(k for k in held if k != key)
                self._slices_of[svc] = rest[0] if len(rest) == 1 else rest
            self._dirty.add(svc)
        if new is not None:
            svc = self._service_key(new)
            held = self._slices_of.get(svc)
            if held is None:
                self._slices_of[svc] = key
            elif isinstance(held, tuple):
                if key not in held:
                    self._slices_of[svc] = held + (key,)
            elif held != key:
                self._slices_of[svc] = (held, key)
            self._dirty.add(svc)

    def _service_key(self, sl: EndpointSlice) -> ObjectKey:
        """The owning Service's key; the Service's own key object when it exists (one copy, not two)."""
        k = sl.service_key
        svc = self.services.get(k)
        return svc.key if svc is not None else k

    # -- reads (from the agent loop) -------------------------------------------------------------
    def take_dirty(self) -> dict[ObjectKey, list[Frontend]]:
        """Frontends of every Service changed since the last call ([] for a deleted Service)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            self.changed.clear()
            return {key: self._frontends(key) for key in dirty}

    def take_views(self, full: bool = False, northsouth: NodeInfo | None = None) -> dict[ObjectKey, ServiceView | None]:
        """The view of every Service changed since the last take (None: deleted); full: of every Service.
        northsouth: this node's addresses and node-port range when north-south is on (name and zone
        are the state's own); None: the socket frontends of the ClusterIPs only."""
        node = NodeInfo(self.node_name, zone=self.zone) if northsouth is None else replace(
            northsouth, name=self.node_name, zone=self.zone)
        ns = northsouth is not None
        view, slices = service_view, self._slices
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            self.changed.clear()
            if full:
                return {k: view(svc, slices(k), node, ns) for k, svc in self.services.items()}
            get = self.services.get
            return {k: None if (svc := get(k)) is None else view(svc, slices(k), node, ns) for k in dirty}

    def pending(self) -> int:
        """Services changed since the last take_dirty() (kube-proxy's pending changes)."""
        with self._lock:
            return len(self._dirty)

    def all_frontends(self) -> dict[ObjectKey, list[Frontend]]:
        with self._lock:
            self._dirty.clear()
            self.changed.clear()
            return {key: self._frontends(key) for key in self.services}

    def slices_of(self, svc_key: ObjectKey) -> list[tuple[ObjectKey, EndpointSlice]]:
        """(key, slice) of each EndpointSlice of a Service."""
        with self._lock:
            return [(k, self.slices[k]) for k in self._slice_keys(svc_key)]

    def _slice_keys(self, key: ObjectKey) -> tuple[ObjectKey, ...]:
        held = self._slices_of.get(key)
        return () if held is None else held if isinstance(held, tuple) else (held,)

    def _slices(self, key: ObjectKey) -> list[EndpointSlice]:
        return [self.slices[k] for k in self._slice_keys(key)]

    def service_keys(self) -> list[ObjectKey]:
        with self._lock:
            return list(self.services)

    def frontends_of(self, keys) -> dict[ObjectKey, list[Frontend]]:
        """Current frontends of some Services, the dirty set untouched; Services changed since the
        last take_dirty() are left out (not synced yet: the drift check would call them drift)."""
        with self._lock:
            return {k: self._frontends(k) for k in keys if k not in self._dirty}

    def _frontends(self, key: ObjectKey) -> list[Frontend]:
        svc = self.services.get(key)
        if svc is None:
            return []
        return service_frontends(svc, self._slices(key), self.node_name, self.zone)
