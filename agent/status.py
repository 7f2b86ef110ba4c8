"""The agent's status: one typed object, written by the agent, read by the CLI, demo, benchmarks and tests.

Its size does not grow with the number of Services (no per-Service names: those are served on demand
by the agent's API method `services.names`), and the agent rewrites it only when something in it
changed, so an idle agent writes nothing. Readers get an AgentStatus back, never a dict of string keys.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields

from .paths import state_dir_for

STATUS_FILE = "status.json"


@dataclass
class SyncInfo:
    """One reconciler run."""
    time: float          # wall clock, when it finished
    seconds: float       # duration of the map writes
    services: int        # Services in the change set
    written: int         # map entries written
    deleted: int         # map entries deleted
    full: bool
    since_start: float | None = None  # agent start → this sync done (the first full sync only)


@dataclass
class MapFill:
    entries: int
    capacity: int


@dataclass
class Counters:
    syncs: int = 0
    object_errors: int = 0
    sync_errors: int = 0
    written: int = 0
    deleted: int = 0
    sockets_destroyed: int = 0  # connected sockets closed because their backend left the Service


@dataclass
class SourceStatus:
    """A source of cluster state; `detail` carries what only that kind of source has."""
    kind: str  # manifests | kube
    healthy: bool
    synced: bool
    stale_since: str | None = None  # UTC ISO time the source went stale, None while healthy
    last_error: str | None = None
    detail: dict = field(default_factory=dict)


@dataclass
class AgentStatus:
    pid: int
    started: float
    cgroup: str
    pin_dir: str
    node: dict = field(default_factory=dict)  # {"name", "zone"}
    programs: list[str] = field(default_factory=list)
    privileges: dict = field(default_factory=dict)
    maps: dict[str, MapFill] = field(default_factory=dict)
    services: int = 0
    first_sync: SyncInfo | None = None
    last_sync: SyncInfo | None = None
    last_change: float = 0.0  # wall clock: a source change was last taken in (and applied)
    counters: Counters = field(default_factory=Counters)
    sources: dict[str, SourceStatus] = field(default_factory=dict)
    object_errors: list[str] = field(default_factory=list)  # the most recent, newest last
    sync_errors: list[str] = field(default_factory=list)
    northsouth: dict | None = None  # NodePort/ExternalIP/LB on the node devices, when --devices is given
    check: dict | None = None  # the sampled kernel-vs-desired drift check: runs, totals, last report
    cni: dict | None = None  # CNI pods (told, adopted on CHECK, found by the scan) and the chain kept in cni-conf-dir
    written_at: float = 0.0

    def to_json(self) -> str:
        # default=str: a feature's status field that is not JSON (a netlink message, a path) is
        # written as text rather than costing the whole status
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_dict(cls, d: dict) -> "AgentStatus":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["maps"] = {k: MapFill(**v) for k, v in d.get("maps", {}).items()}
        d["counters"] = Counters(**d.get("counters", {}))
        d["sources"] = {k: SourceStatus(**v) for k, v in d.get("sources", {}).items()}
        for k in ("first_sync", "last_sync"):
            d[k] = SyncInfo(**d[k]) if d.get(k) else None
        return cls(**d)


def status_path(pin_dir: str) -> str:
    return os.path.join(state_dir_for(pin_dir), STATUS_FILE)


def read_status(pin_dir: str) -> AgentStatus | None:
    """The status the agent running with this pin dir last wrote; None when there is none (yet), or
    when it is not one this version reads (an older agent's: `cleanup` must still work)."""
    try:
        with open(status_path(pin_dir)) as f:
            return AgentStatus.from_dict(json.load(f))
    except (FileNotFoundError, json.JSONDecodeError, TypeError, AttributeError):
        return None


def write_status(path: str, st: AgentStatus) -> None:
    """Atomically: a reader never sees half a file."""
    st.written_at = time.time()
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(st.to_json())
    os.replace(tmp, path)


def northsouth_lines(ns: dict, now: float | None = None) -> list[str]:
    """`nodewire status`'s human lines for the north-south part (-o json prints the whole dict): the
    devices and addresses, packets per outcome (drops by reason apart), conntrack when it reports."""
    now = time.time() if now is None else now
    addrs = ns.get("addresses") or []
    snat = ", ".join(f"{fam} {ip}" for fam, ip in (ns.get("snat") or {}).items()) or "none"
    out = [f"north-south: devices {', '.join(ns.get('devices') or {}) or 'none'}; {len(addrs)} node addresses "
           f"({', '.join(addrs)}); SNAT {snat}; {ns.get('frontends', 0)} frontends"]
    counters = ns.get("counters") or {}
    kept = {k: v for k, v in counters.items() if not k.startswith("drop_") and not k.endswith("_bytes")}
    drops = {k[len("drop_"):]: v for k, v in counters.items() if k.startswith("drop_")}
    out.append("  packets: " + ", ".join(f"{k} {v}" for k, v in kept.items()))
    out.append("  drops:   " + (", ".join(f"{k} {v}" for k, v in drops.items()) or "none"))
    dsr = ns.get("dsr")
    if isinstance(dsr, dict):  # issue 21: direct server return (export/northsouth.py dsr_summary)
        flows = ", ".join(f"{k} {v}" for k, v in (dsr.get("flows") or {}).items())
        enc = dsr.get("encapsulated") or {}
        out.append(f"  lb-mode {dsr.get('lb_mode')}: new flows {flows}; encapsulated {enc.get('packets', 0)} packets "
                   f"({enc.get('bytes', 0)} bytes); decapsulated {dsr.get('decapsulated', 0)}; fallbacks to SNAT "
                   f"{dsr.get('fallbacks', 0)}; MSS clamped {dsr.get('mss_clamped', 0)}")
    ct = ns.get("conntrack")
    if isinstance(ct, dict):
        def pairs(d) -> str:
            return ", ".join(f"{k} {v}" for k, v in (d or {}).items())
        out.append(f"  conntrack: entries {pairs(ct.get('entries'))}; states {pairs(ct.get('states'))}; "
                   f"SNAT ports in use {ct.get('snat_ports_in_use', 0)}; half-open evicted {ct.get('halfopen_evicted', 0)}")
        out.append(f"  conntrack counters: {pairs(ct.get('counters'))}")
    watch = ns.get("device_watch") or {}
    if watch:
        last = watch.get("last_change")
        ago = f", last {now - last:.1f}s ago" if last else ""
        out.append(f"  device watch: {watch.get('changes', 0)} changes{ago}, {watch.get('errors', 0)} errors")
    return out
