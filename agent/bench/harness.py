"""`nodewire bench compare`: for each (N Services, E endpoints) and each mode, side by side with
"direct" measured in the same sandbox right before the mode is loaded."""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..sandbox import Pod, Sandbox
from .measure import LoadResult
from .modes import RulesMode, Unavailable
from .services import SERVICE_PORT, TARGET_PORT, VIP_BASE, BenchService, make_services, with_endpoints

log = logging.getLogger("nodewire.bench")
PROBE = Path(__file__).with_name("probe.py")
MODES = ("iptables", "nftables", "nodewire")


@dataclass
class Settings:
    services: list[int]
    endpoints: list[int]
    modes: list[str] = field(default_factory=lambda: list(MODES))
    latency_count: int = 2000
    latency_max_s: float = 10.0
    rps_seconds: float = 2.0
    sync_cap_s: float = 120.0
    change_cap_s: float = 60.0
    iptables_backend: str = "legacy"

    @classmethod
    def quick(cls, services: list[int], endpoints: list[int], modes: list[str] | None = None) -> "Settings":
        return cls(services, endpoints, modes or list(MODES), latency_count=200, latency_max_s=3.0,
                   rps_seconds=0.5, sync_cap_s=30.0, change_cap_s=15.0)


def _probe(client: Pod, *args: str, timeout: float = 120) -> dict:
    return json.loads(client.run([sys.executable, str(PROBE), *args], timeout=timeout).stdout)


def _latency(client: Pod, s: Settings, *target: str) -> dict:
    return _probe(client, "latency", *target, "--count", str(s.latency_count),
                  "--max-seconds", str(s.latency_max_s), timeout=s.latency_max_s + 60)


def _direct(client: Pod, backend: Pod, s: Settings) -> dict:
    target = ("--target", f"{backend.ip4}:{TARGET_PORT}")
    lat = _latency(client, s, *target)
    rps = _probe(client, "rps", *target, "--seconds", str(s.rps_seconds))
    return {"p50_us": lat["p50_us"], "p99_us": lat["p99_us"], "rps": rps["rps"]}


def _vips(n: int) -> str:
    return f"{VIP_BASE}:{n}:{SERVICE_PORT}"


class _CapTracker:
    """Skips a size that cannot finish: when a smaller N already passed the cap, or when even a
    linear extrapolation from the last size does (loads here grow at least linearly)."""

    def __init__(self):
        self.last: dict[tuple[str, int], tuple[int, float | None]] = {}

    def verdict(self, mode: str, e: int, n: int, cap: float) -> str | None:
        prev = self.last.get((mode, e))
        if prev is None:
            return None
        pn, secs = prev
        if secs is None:
            return f"skipped: N={pn} already exceeded the {cap:g} s cap"
        est = secs * n / pn
        if est > cap:
            return f"skipped: N={pn} took {secs:.1f} s, so N={n} needs > {est:.0f} s"
        return None

    def record(self, mode: str, e: int, n: int, secs: float | None) -> None:
        self.last[(mode, e)] = (n, secs)


def _make_mode(name: str, sb: Sandbox, client: Pod, s: Settings):
    if name in ("iptables", "nftables"):
        return RulesMode(name, client.netns, str(sb.net4), s.iptables_backend)
    if name == "nodewire":
        from .nodewire_mode import NodewireMode
        return NodewireMode(sb)
    raise ValueError(f"--modes: unknown mode {name!r} (expected one of {', '.join(MODES)})")


def _changed(svc: BenchService, spare: Pod) -> BenchService:
    """The Service with its first endpoint moved to the spare backend."""
    eps = list(svc.endpoints)
    eps[0] = type(eps[0])(spare.ip4, eps[0].port)
    return with_endpoints(svc, tuple(eps))


def run_one(sb: Sandbox, client: Pod, backends: list[Pod], mode_name: str, n: int, e: int,
            s: Settings, caps: _CapTracker) -> list[dict]:
    services = make_services(n, [b.ip4 for b in backends[:e]], e)
    spare = backends[e]
    row: dict = {"mode": mode_name, "services": n, "endpoints": e}
    direct = _direct(client, backends[0], s)
    direct_row = {"mode": "direct", "services": n, "endpoints": e, "before": mode_name, "status": "ok",
                  "lat_last_p50_us": direct["p50_us"], "lat_last_p99_us": direct["p99_us"],
                  "lat_rand_p50_us": direct["p50_us"], "lat_rand_p99_us": direct["p99_us"], "rps": direct["rps"]}
    row.update(direct_p50_us=direct["p50_us"], direct_rps=direct["rps"])
    skip = caps.verdict(mode_name, e, n, s.sync_cap_s)
    if skip:
        row.update(status=f"> cap ({skip})", sync_s=f"> {s.sync_cap_s:g}")
        log.info("mode=%s services=%d endpoints=%d status=skipped reason=%r", mode_name, n, e, skip)
        return [direct_row, row]
    try:
        mode = _make_mode(mode_name, sb, client, s)
    except Unavailable as err:
        row.update(status=f"unavailable: {err}")
        return [direct_row, row]
    try:
        res: LoadResult = mode.load(services, s.sync_cap_s)
        row.update(sync_s=round(res.seconds, 3), sync_cpu_s=round(res.cpu_seconds, 3))
        if res.timed_out:
            caps.record(mode_name, e, n, None)
            row.update(status="> cap", sync_s=f"> {s.sync_cap_s:g}")
            return [direct_row, row]
        if res.error:
            row.update(status=f"error: {res.error}")
            return [direct_row, row]
        caps.record(mode_name, e, n, res.seconds)
        row.update(mode.memory())
        last = _latency(client, s, "--vips", _vips(n))
        rand = _latency(client, s, "--vips", _vips(n), "--random")
        rps = _probe(client, "rps", "--vips", _vips(n), "--random", "--seconds", str(s.rps_seconds))
        row.update(lat_last_p50_us=last["p50_us"], lat_last_p99_us=last["p99_us"], lat_last_errors=last["errors"],
                   lat_rand_p50_us=rand["p50_us"], lat_rand_p99_us=rand["p99_us"], lat_rand_errors=rand["errors"],
                   rps=rps["rps"], rps_errors=rps["errors"])
        # One endpoint change on the last-added Service.
        before = services[-1]
        after = _changed(before, spare)
        services[-1] = after
        ch = mode.change(services, before, after, s.change_cap_s)
        row["change_ms"] = f"> {s.change_cap_s * 1000:g}" if ch.timed_out else round(ch.seconds * 1000, 2)
        if ch.error:
            row["change_error"] = ch.error
        if e == 1 and ch.ok:  # with one endpoint the change is observable: the spare must answer
            who = _probe(client, "whoami", "--target", f"{after.cluster_ip}:{SERVICE_PORT}")["reply"]
            row["change_verified"] = who == spare.name
        row["status"] = "ok"
        row.update(_ratios(row))
    finally:
        t0 = time.perf_counter()
        mode.unload()
        log.info("mode=%s services=%d endpoints=%d unload_s=%.2f", mode_name, n, e, time.perf_counter() - t0)
    return [direct_row, row]


def _ratios(row: dict) -> dict:
    out = {}
    d = row.get("direct_p50_us")
    for k in ("lat_last_p50_us", "lat_rand_p50_us"):
        if d and isinstance(row.get(k), (int, float)):
            out[k.replace("_us", "_x")] = round(row[k] / d, 2)
    if row.get("direct_rps") and isinstance(row.get("rps"), (int, float)):
        out["rps_x"] = round(row["rps"] / row["direct_rps"], 2)
    return out


def run_compare(s: Settings) -> list[dict]:
    rows: list[dict] = []
    caps = _CapTracker()
    for e in s.endpoints:
        for n in sorted(s.services):
            with Sandbox() as sb:
                client = sb.add_pod("client")
                backends = [sb.add_pod(f"be{i}") for i in range(e + 1)]  # one spare for the change
                for b in backends:
                    b.serve(tcp_ports=[TARGET_PORT])
                for mode_name in s.modes:
                    log.info("mode=%s services=%d endpoints=%d status=start", mode_name, n, e)
                    try:
                        rows += run_one(sb, client, backends, mode_name, n, e, s, caps)
                    except Exception as err:  # one broken mode must not lose the other rows
                        log.exception("mode=%s services=%d endpoints=%d status=error", mode_name, n, e)
                        rows.append({"mode": mode_name, "services": n, "endpoints": e,
                                     "status": f"error: {err}"[:300]})
                    log.info("row=%s", json.dumps(rows[-1]))
    return rows
