"""North-south metrics, read at scrape time (observable instruments; a scrape only reads the maps).

Packets per outcome of the tc datapath come from the per-CPU outcome array, one series per name of
abi.NP_OUTCOME_NAMES (NodePortDatapath.counters() walks that list), so an outcome added there is
exported without more code here: new flows to a local or a remote backend, replies, established
packets, rejects, the drops by reason (drop_*), and whatever the conntrack/ICMP work adds. The
node's devices and addresses are the device watcher's last snapshot. Conntrack metrics
(nodewire.conntrack.*) are registered by the conntrack collector's own module.

Direct server return (issue 21, DSR.md): the datapath's DSR outcomes (DSR_OUTCOMES: names dsr-data's
abi.NP_OUTCOMES gives them) become metrics of their own beside the packets: new flows per mode (local
backend, SNAT, DSR), packets and bytes encapsulated toward backends' nodes, packets decapsulated here,
fallbacks to SNAT, SYNs whose MSS was clamped. A byte count shares the outcome array (its name ends in
`_bytes`) but is never exported as packets. dsr_summary() is the same reading for `nodewire status`.
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


# What each DSR figure is read from (abi.NP_OUTCOME_NAMES); an outcome the datapath does not have reads 0.
DSR_OUTCOMES = {"dsr_flows": "dsr_new", "encapsulated": "dsr_encap", "encapsulated_bytes": "dsr_encap_bytes",
                "decapsulated": "dsr_decap", "fallbacks": "dsr_fallback", "mss_clamped": "mss_clamped"}
FLOW_MODES = (("local", "local"), ("snat", "remote"), ("dsr", "dsr_new"))  # mode → outcome of a new flow
LB_MODES = ("snat", "dsr", "hybrid")


def is_bytes(outcome: str) -> bool:
    return outcome.endswith("_bytes")


def frontend_mode(lb_mode: str, protocol: str) -> str:
    """How new flows of an external frontend of this protocol reach remote backends: hybrid is DSR for
    TCP and SNAT for UDP (Cilium's meaning); a backend's node without DSR still gets SNAT (a fallback)."""
    if lb_mode == "dsr" or (lb_mode == "hybrid" and protocol.upper() == "TCP"):
        return "dsr"
    return "snat"


def dsr_summary(counters: dict[str, int], lb_mode: str) -> dict:
    """The DSR figures from the outcome counters, for the status (and the metrics below)."""
    get = lambda key: int(counters.get(DSR_OUTCOMES[key], 0))  # noqa: E731
    return {"lb_mode": lb_mode,
            "flows": {mode: int(counters.get(outcome, 0)) for mode, outcome in FLOW_MODES},
            "encapsulated": {"packets": get("encapsulated"), "bytes": get("encapsulated_bytes")},
            "decapsulated": get("decapsulated"), "fallbacks": get("fallbacks"), "mss_clamped": get("mss_clamped")}


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
         lambda _o: [Observation(n, {"outcome": k}) for k, n in ns.packet_counters().items() if not is_bytes(k)]),
        (GAUGE, "nodewire.northsouth.devices", "1", "Node devices the tc programs are attached to",
         lambda _o: [Observation(len(ns.device_names()))]),
        (GAUGE, "nodewire.northsouth.node_addresses", "1",
         "Node addresses on those devices (NodePort frontends: each × every node port)", families),
        (COUNTER, "nodewire.northsouth.address_changes", "1",
         "Changes of the node's devices or addresses followed over netlink",
         lambda _o: [Observation(ns.address_changes())]),
    ])


def register_dsr_metrics(meter, ns: NorthSouthView, lb_mode: str) -> None:
    """nodewire.northsouth.{flows, lb_mode, dsr.*, mss_clamped}: direct server return on this node, both
    as the receiving node (flows per mode, encapsulated, fallbacks, MSS clamps) and as a backend's node
    (decapsulated). Each scrape reads the outcome array once per row (NP_STATS_SLOTS per CPU: small)."""
    from opentelemetry.metrics import Observation

    def one(key: str):
        return lambda _o: [Observation(int(ns.packet_counters().get(DSR_OUTCOMES[key], 0)))]

    register(meter, [
        (COUNTER, "nodewire.northsouth.flows", "{flow}",
         "New north-south flows by how they reach their backend (mode: local = a backend on this node, "
         "snat = a remote backend through this node, dsr = a remote backend replying to the client directly)",
         lambda _o: [Observation(n, {"mode": m}) for m, n in dsr_summary(ns.packet_counters(), lb_mode)["flows"].items()]),
        (GAUGE, "nodewire.northsouth.lb_mode", "1", "This node's configured lb-mode (1 for the mode in use)",
         lambda _o: [Observation(int(m == lb_mode), {"mode": m}) for m in LB_MODES]),
        (COUNTER, "nodewire.northsouth.dsr.encapsulated", "{packet}",
         "Packets of DSR flows sent Geneve-encapsulated to the backend's node", one("encapsulated")),
        (COUNTER, "nodewire.northsouth.dsr.encapsulated.io", "By",
         "Bytes of those packets, encapsulation included", one("encapsulated_bytes")),
        (COUNTER, "nodewire.northsouth.dsr.decapsulated", "{packet}",
         "Geneve packets of DSR flows decapsulated here for a local backend", one("decapsulated")),
        (COUNTER, "nodewire.northsouth.dsr.fallbacks", "{flow}",
         "New flows to a remote backend sent with SNAT although lb-mode asks for DSR (the backend's node "
         "does not announce DSR, or not for this protocol)", one("fallbacks")),
        (COUNTER, "nodewire.northsouth.mss_clamped", "{packet}",
         "SYNs whose TCP MSS was lowered to fit the encapsulation overhead", one("mss_clamped")),
    ])
