"""Read what the kernel really holds in the pinned service maps, for `nodewire services`."""
from __future__ import annotations

from . import codec
from .abi import PROTO_NAMES
from .codec import addr_str, host_port
from .loader import SockLB, open_loaded


def read_services(pin_dir: str, names: dict | None = None) -> list[dict]:
    """Frontend → backends as decoded from the pinned maps (names: service_id → agent's labels)."""
    lb = SockLB.open(pin_dir)  # FileNotFoundError when no agent loaded it there
    try:
        rows = codec.decode_services(*lb.services.dump_arrays())
        ids, bidents = codec.decode_backends(*lb.backends.dump_arrays())
    finally:
        lb.close()
    b_addrs, b_ports, _ = codec.split_ident(bidents)
    backends = {bid: {"id": bid, "ip": addr_str(a), "port": p} for bid, a, p in zip(ids.tolist(), b_addrs, b_ports)}
    addrs, ports, protos = codec.split_ident(rows.ident)
    frontends: dict[tuple, dict] = {}
    slots: dict[tuple, dict[int, int]] = {}
    for i, slot in enumerate(rows.slot.tolist()):
        ident = (addrs[i], ports[i], protos[i])
        if slot == 0:
            frontends[ident] = {"count": int(rows.count[i]), "service_id": int(rows.service_id[i]),
                                "affinity_timeout": int(rows.affinity[i])}
        else:
            slots.setdefault(ident, {})[slot] = int(rows.backend_id[i])
    out = []
    for ident, hdr in frontends.items():
        ip, port, proto = addr_str(ident[0]), ident[1], PROTO_NAMES.get(ident[2], str(ident[2]))
        sl = slots.get(ident, {})
        bl = [backends.get(sl.get(i), {"id": sl.get(i), "ip": "?", "port": 0}) for i in range(1, hdr["count"] + 1)]
        label = (names or {}).get(str(hdr["service_id"]), {})
        out.append({
            "id": hdr["service_id"], "frontend": host_port(ip, port), "ip": ip, "port": port, "protocol": proto,
            "service": label.get("service", ""), "port_name": label.get("port_name", ""),
            "backends": [{"id": b["id"], "address": host_port(b["ip"], b["port"]), "ip": b["ip"], "port": b["port"]}
                         for b in bl],
            "refuses": hdr["count"] == 0,
            "session_affinity_timeout": hdr["affinity_timeout"],
        })
    out.sort(key=lambda r: r["id"])
    return out


def external_frontends(pin_dir: str) -> set[tuple[str, int, str]] | None:
    """(address, port, protocol name) of every frontend nodeport.c serves on the node devices (its pinned
    frontend map); None when north-south never ran with this pin dir."""
    from .abi import NP_SERVICES_MAP

    try:
        loaded = open_loaded("nodeport", pin_dir)
    except FileNotFoundError:
        return None
    try:
        rows = codec.decode_services(*loaded.maps[NP_SERVICES_MAP].dump_arrays())
    finally:
        loaded.close()
    addrs, ports, protos = codec.split_ident(rows.ident)
    return {(addr_str(addrs[i]), ports[i], PROTO_NAMES.get(protos[i], str(protos[i])))
            for i, slot in enumerate(rows.slot.tolist()) if slot == 0}
