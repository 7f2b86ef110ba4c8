"""Read what the kernel really holds in the pinned service maps, for `nodewire services`."""
from __future__ import annotations

from .abi import PROTO_NAMES
from .loader import SockLB
from .maps import addr_str, port_host, unpack_rows


def _fmt(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def read_services(pin_dir: str, names: dict | None = None) -> list[dict]:
    """Frontend → backends as decoded from the pinned maps (names: service_id → agent's labels)."""
    lb = SockLB.open(pin_dir)  # FileNotFoundError when no agent loaded it there
    try:
        svc = lb.services.dump()
        bes = lb.backends.dump()
    finally:
        lb.close()
    kd, vd = lb.services.key_dtype, lb.services.value_dtype
    backends = {}
    for k, v in bes.items():
        row = unpack_rows(lb.backends.value_dtype, [v])[0]
        bid = int(unpack_rows(lb.backends.key_dtype, [k])[0])
        backends[bid] = {"id": bid, "ip": addr_str(row["address"].tobytes()), "port": port_host(row["port"])}
    frontends: dict[tuple, dict] = {}
    slots: dict[tuple, dict[int, int]] = {}
    for k, v in svc.items():
        key = unpack_rows(kd, [k])[0]
        val = unpack_rows(vd, [v])[0]
        ident = (key["address"].tobytes(), int(key["port"]), int(key["proto"]))
        if key["slot"] == 0:
            frontends[ident] = {"count": int(val["count"]), "service_id": int(val["service_id"]),
                                "affinity_timeout": int(val["affinity_timeout"])}
        else:
            slots.setdefault(ident, {})[int(key["slot"])] = int(val["backend_id"])
    out = []
    for ident, hdr in frontends.items():
        ip, port, proto = addr_str(ident[0]), port_host(ident[1]), PROTO_NAMES.get(ident[2], str(ident[2]))
        sl = slots.get(ident, {})
        bl = [backends.get(sl.get(i), {"id": sl.get(i), "ip": "?", "port": 0}) for i in range(1, hdr["count"] + 1)]
        label = (names or {}).get(str(hdr["service_id"]), {})
        out.append({
            "id": hdr["service_id"], "frontend": _fmt(ip, port), "ip": ip, "port": port, "protocol": proto,
            "service": label.get("service", ""), "port_name": label.get("port_name", ""),
            "backends": [{"id": b["id"], "address": _fmt(b["ip"], b["port"]), "ip": b["ip"], "port": b["port"]}
                         for b in bl],
            "refuses": hdr["count"] == 0,
            "session_affinity_timeout": hdr["affinity_timeout"],
        })
    out.sort(key=lambda r: r["id"])
    return out
