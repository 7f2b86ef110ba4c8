"""North-south in the agent loop: devices and node addresses (followed live over netlink) and the tc
datapath. Its health servers and conntrack collector are parts of their own (agent/components/health.py,
conntrack.py).

The sync loop asks node_info() for the node's addresses when it takes the Services' views (the views
carry the node's own sockets' frontends for the socket path: NodePorts / external IPs at connect(),
without tc); the one writer (datapath/datapath.py) writes nodeport.c's maps (`maps`) with the socket
path's; after_sync() keeps the views' errors for the status.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from .datapath.addresses import DeviceWatcher, follow_devices
from .datapath.conntrack import Lifetimes
from .datapath.devices import NodeDevices, read_node_devices
from .datapath.loader import MapSizes
from .datapath.reconciler import SyncResult
from .model.northsouth import NodeInfo
from .model.objects import ObjectKey
from .model.view import ServiceView
from .state import ClusterState

log = logging.getLogger("nodewire.northsouth")


class NorthSouthService:
    def __init__(self, state: ClusterState, node_name: str, devices: tuple[str, ...], pin_dir: str,
                 sizes: MapSizes, nodeport_range: tuple[int, int], maglev_size: int,
                 lifetimes: Lifetimes = Lifetimes()):
        from pyroute2 import IPRoute

        from .datapath.nodeport import NodePortDatapath

        self.state = state
        with IPRoute() as ipr:
            found = read_node_devices(ipr, tuple(devices), strict=True)
        if not found.devices:
            raise ValueError("--devices auto: no interface with a node address or a default route")
        devs, addresses = found.names, list(found.addresses)
        self.node = NodeInfo(node_name, found.addresses, nodeport_range=nodeport_range)
        self.datapath = NodePortDatapath(pin_dir, sizes, maglev_size, lifetimes)
        self.datapath.attach(devs)
        self.snat = self.datapath.set_snat_addresses(addresses)
        self.watcher = DeviceWatcher(tuple(devices), found, self._follow).start()
        self.errors: list[str] = []
        self.last: SyncResult | None = None
        log.info("north-south ready devices=%s addresses=%s snat=%s", devs, addresses, self.snat)

    def _follow(self, old: NodeDevices, new: NodeDevices) -> None:
        """On the device watcher's thread: tc onto devices that appeared, the SNAT addresses, and the
        Services with a node port marked for the loop (node_info() hands the new addresses to the views)."""
        attached, forgotten = follow_devices(self.datapath, new)
        if new.addresses != old.addresses:
            self.snat = self.datapath.set_snat_addresses(list(new.addresses))
            marked = self.state.node_addresses_changed()
        else:
            marked = 0
        log.info("node devices changed devices=%s addresses=%s attached=%s forgotten=%s snat=%s services=%d",
                 new.names, list(new.addresses), attached, forgotten, self.snat, marked)

    @property
    def maps(self):
        """nodeport.c's maps for the one writer (datapath.NorthSouthMaps)."""
        return self.datapath.maps

    def node_info(self) -> NodeInfo:
        """This node for the views: its addresses as followed live (datapath/addresses.py)."""
        addresses = self.watcher.current.addresses
        if self.node.addresses != addresses:
            self.node = replace(self.node, addresses=addresses)
        return self.node

    def after_sync(self, views: dict[ObjectKey, ServiceView | None], res: SyncResult) -> None:
        """After the datapath wrote these views: their errors (logged by the datapath) kept for the status."""
        for view in views.values():
            if view is not None and view.errors:
                self.errors = (self.errors + list(view.errors))[-20:]
        self.last = res

    def status(self) -> dict:
        dp = self.datapath
        return {
            "devices": dict(dp.devices), "addresses": list(self.watcher.current.addresses), "snat": self.snat,
            "nodeport_range": list(self.node.nodeport_range), "maglev_table_size": dp.maglev_size,
            "maglev_tables": len(dp.maglev_groups), "maglev_tables_built": dp.tables_built,
            "frontends": dp.reconciler.svc_entries, "services": len(dp.reconciler.owned),
            "counters": dp.counters(), "errors": self.errors,
            "device_watch": self.watcher.status(),
            "last_sync": None if self.last is None else {"seconds": self.last.seconds, "written": self.last.written,
                                                          "deleted": self.last.deleted, "errors": [str(e) for e in self.last.errors],
                                                          "time": time.time()},
        }

    # -- what export/northsouth.py reads at scrape time (any thread) -------------------------------
    def metrics(self, meter) -> None:
        from .export.northsouth import register_northsouth_metrics

        register_northsouth_metrics(meter, self)

    def packet_counters(self) -> dict[str, int]:
        return self.datapath.counters()

    def node_addresses(self) -> tuple[str, ...]:
        return self.watcher.current.addresses

    def device_names(self) -> list[str]:
        return list(self.datapath.devices)

    def address_changes(self) -> int:
        return self.watcher.changes

    def close(self) -> None:
        self.watcher.close()
