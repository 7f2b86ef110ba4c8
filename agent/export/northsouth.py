"""North-south metrics, read at scrape time (observable instruments; a scrape only reads the maps).

Packets per outcome of the tc datapath come from the per-CPU outcome array, one series per name of
abi.NP_OUTCOME_NAMES (NodePortDatapath.counters() walks that list), so an outcome added there is
exported without more code here: new flows to a local or a remote backend, replies, established
packets, rejects, the drops by reason (drop_*), and whatever the conntrack/ICMP work adds. The
node's devices and addresses are the device watcher's last snapshot. Conntrack metrics
(nodewire.conntrack.*) are registered by the conntrack collector's own module.
"""
from __future__ import annotations

from typing import Protocol

from ..instruments import COUNTER, GAUGE, register


class NorthSouthView(Protocol):
    """What these metrics read (agent/northsouth.py NorthSouthService)."""

    def packet_counters(self) -> dict[str, int]: ...   # outcome name → packets since the maps were made
    def node_addresses(self) -> tuple[str, ...]: ...
    def device_names(self) -> list[str]: ...
    def address_changes(self) -> int: ...


def register_northsouth_metrics(meter, ns: NorthSouthView) -> None:
    from opentelemetry.metrics import Observation

    def families(_o):
        addrs = ns.node_addresses()
        v6 = sum(":" in a for a in addrs)
        return [Observation(len(addrs) - v6, {"family": "ipv4"}), Observation(v6, {"family": "ipv6"})]

    register(meter, [
        (COUNTER, "nodewire.northsouth.packets", "{packet}",
         "Packets on the node devices by what the tc datapath did with them (outcome: local/remote "
         "= new flow to a backend on this node / elsewhere, reply, established, reject, drop_* by reason)",
         lambda _o: [Observation(n, {"outcome": k}) for k, n in ns.packet_counters().items()]),
        (GAUGE, "nodewire.northsouth.devices", "1", "Node devices the tc programs are attached to",
         lambda _o: [Observation(len(ns.device_names()))]),
        (GAUGE, "nodewire.northsouth.node_addresses", "1",
         "Node addresses on those devices (NodePort frontends: each × every node port)", families),
        (COUNTER, "nodewire.northsouth.address_changes", "1",
         "Changes of the node's devices or addresses followed over netlink",
         lambda _o: [Observation(ns.address_changes())]),
    ])
