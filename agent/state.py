"""ClusterState: the typed objects every source feeds, and which Services changed since the last sync.

Sources call apply() with whole objects (or None for a deletion); the agent asks take_dirty() for the
Services whose frontends must be recomputed. An EndpointSlice change dirties only its own Service.
"""
from __future__ import annotations

import threading
from collections import defaultdict

from .model.frontends import Frontend, service_frontends
from .model.objects import EndpointSlice, Node, ObjectKey, Objects, Pod, Service


class ClusterState:
    def __init__(self, node_name: str | None = None, zone: str = "") -> None:
        self.node_name = node_name  # for internalTrafficPolicy: Local and node hints
        # This node's topology.kubernetes.io/zone, for zone hints: --zone when given, else its Node object's.
        self.zone = zone
        self._zone_fixed = bool(zone)
        self.nodes: dict[ObjectKey, Node] = {}
        self.services: dict[ObjectKey, Service] = {}
        self.slices: dict[ObjectKey, EndpointSlice] = {}
        self.pods: dict[ObjectKey, Pod] = {}
        # Service → its slices; a list, not a set: a Service has a few slices, and 100k sets cost ~20 MiB.
        self._slices_by_service: dict[ObjectKey, list[ObjectKey]] = defaultdict(list)
        self._dirty: set[ObjectKey] = set()
        self._lock = threading.Lock()
        self.changed = threading.Event()
        self.revision = 0

    # -- writes (from sources) -------------------------------------------------------------------
    def apply_service(self, key: ObjectKey, svc: Service | None) -> None:
        with self._lock:
            if self.services.get(key) == svc:
                return
            if svc is None:
                self.services.pop(key, None)
            else:
                self.services[key] = svc
            self._mark(key)

    def apply_slice(self, key: ObjectKey, sl: EndpointSlice | None) -> None:
        with self._lock:
            old = self.slices.get(key)
            if old == sl:
                return
            if old is not None:
                owned = self._slices_by_service[old.service_key]
                if key in owned:
                    owned.remove(key)
                self._mark(old.service_key)
            if sl is None:
                self.slices.pop(key, None)
            else:
                self.slices[key] = sl
                owned = self._slices_by_service[sl.service_key]
                if key not in owned:
                    owned.append(key)
                self._mark(sl.service_key)

    def apply_pod(self, key: ObjectKey, pod: Pod | None) -> None:
        with self._lock:
            if self.pods.get(key) == pod:
                return
            if pod is None:
                self.pods.pop(key, None)
            else:
                self.pods[key] = pod
            self.revision += 1
            self.changed.set()

    def apply_node(self, key: ObjectKey, node: Node | None) -> None:
        """A Node object; this node's own sets the zone (unless --zone fixed it)."""
        with self._lock:
            if node is None:
                self.nodes.pop(key, None)
            else:
                self.nodes[key] = node
            if key.name == self.node_name and not self._zone_fixed:
                self._set_zone(node.zone if node else "")

    def _set_zone(self, zone: str) -> None:
        if zone != self.zone:  # topology changes for every Service
            self.zone = zone
            for key in self.services:
                self._mark(key)

    def replace(self, objs: Objects) -> None:
        """Make the state equal to objs (a full list), applying only the differences."""
        for key in set(self.services) - set(objs.services):
            self.apply_service(key, None)
        for key in set(self.slices) - set(objs.slices):
            self.apply_slice(key, None)
        for key in set(self.pods) - set(objs.pods):
            self.apply_pod(key, None)
        for key in set(self.nodes) - set(objs.nodes):
            self.apply_node(key, None)
        for key, node in objs.nodes.items():
            self.apply_node(key, node)
        for key, svc in objs.services.items():
            self.apply_service(key, svc)
        for key, sl in objs.slices.items():
            self.apply_slice(key, sl)
        for key, pod in objs.pods.items():
            self.apply_pod(key, pod)

    def _mark(self, svc_key: ObjectKey) -> None:
        self._dirty.add(svc_key)
        self.revision += 1
        self.changed.set()

    # -- reads (from the agent loop) -------------------------------------------------------------
    def take_dirty(self) -> dict[ObjectKey, list[Frontend]]:
        """Frontends of every Service changed since the last call ([] for a deleted Service)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            self.changed.clear()
            return {key: self._frontends(key) for key in dirty}

    def pending(self) -> int:
        """Services changed since the last take_dirty() (kube-proxy's pending changes)."""
        with self._lock:
            return len(self._dirty)

    def slices_of(self, svc_key: ObjectKey) -> list[tuple[ObjectKey, EndpointSlice]]:
        with self._lock:
            return [(k, self.slices[k]) for k in self._slices_by_service.get(svc_key, ()) if k in self.slices]

    def all_frontends(self) -> dict[ObjectKey, list[Frontend]]:
        with self._lock:
            self._dirty.clear()
            return {key: self._frontends(key) for key in self.services}

    def service_keys(self) -> list[ObjectKey]:
        with self._lock:
            return list(self.services)

    def frontends_of(self, keys) -> dict[ObjectKey, list[Frontend]]:
        """Current frontends of some Services, the dirty set untouched; Services changed since the
        last take_dirty() are left out (not synced yet: the drift check would call them drift)."""
        with self._lock:
            return {k: self._frontends(k) for k in keys if k not in self._dirty}

    def service_inputs(self, key: ObjectKey) -> tuple[Service | None, list[EndpointSlice]]:
        """A Service and its slices, for models beside the socket path's (north-south)."""
        with self._lock:
            return self.services.get(key), [self.slices[k] for k in self._slices_by_service.get(key, ())]

    def _frontends(self, key: ObjectKey) -> list[Frontend]:
        svc = self.services.get(key)
        if svc is None:
            return []
        return service_frontends(svc, (self.slices[k] for k in self._slices_by_service.get(key, ())), self.node_name,
                                 self.zone)
