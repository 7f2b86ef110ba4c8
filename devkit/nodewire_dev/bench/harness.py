"""`nodewire bench compare`: for each (N Services, E endpoints) and each mode, side by side with
"direct" measured in the same sandbox right before the mode is loaded."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..sandbox import Pod, Sandbox
from .measure import LoadResult
from .modes import RulesMode, Unavailable
from .probe import summarize
from .services import SERVICE_PORT, TARGET_PORT, VIP_BASE, BenchService, make_services, with_endpoints

log = logging.getLogger("nodewire.bench")
PROBE = Path(__file__).with_name("probe.py")
MODES = ("iptables", "nftables", "nodewire")


@dataclass
class Settings:
    services: list[int]
    endpoints: list[int]
    modes: list[str] = field(default_factory=lambda: list(MODES))
    latency_count: int = 2000  # per target, split over `rounds` alternating with direct
    latency_max_s: float = 10.0
    rps_seconds: float = 2.0
    rounds: int = 5
    sync_cap_s: float = 120.0
    change_cap_s: float = 60.0
    iptables_backend: str = "legacy"

    @classmethod
    def quick(cls, services: list[int], endpoints: list[int], modes: list[str] | None = None) -> "Settings":
        return cls(services, endpoints, modes or list(MODES), latency_count=200, latency_max_s=3.0,
                   rps_seconds=0.5, rounds=2, sync_cap_s=30.0, change_cap_s=15.0)


def _probe(pod: Pod, *args: str, timeout: float = 120) -> dict:
    return json.loads(pod.run([sys.executable, str(PROBE), *args], timeout=timeout).stdout)


def _pool_latency(parts: list[dict]) -> dict:
    samples = [v for p in parts for v in p["samples_ns"]]
    out = summarize(samples)
    out["errors"] = sum(p["errors"] for p in parts)
    return out


def _pool_rps(parts: list[dict]) -> dict:
    done, secs = sum(p["requests"] for p in parts), sum(p["seconds"] for p in parts)
    return {"rps": round(done / secs, 1) if secs else None, "errors": sum(p["errors"] for p in parts)}


def interleaved(client: Pod, floor: Pod, backends: list[Pod], s: Settings, *target: str) -> dict:
    """The mode (from the client pod) and direct (from the floor pod: its own netns without rules,
    outside the cgroup nodewire attaches to) measured in alternating short rounds, so a noisy
    neighbour on this shared machine hits both alike. Returns pooled latency and req/s for both."""
    # Direct dials the same backends the Services use, a random one per connect.
    direct = ("--target", ",".join(f"{b.ip4}:{TARGET_PORT}" for b in backends))
    count = max(50, s.latency_count // s.rounds)
    lat_args = ("--raw", "--count", str(count), "--warmup", "20", "--max-seconds", str(s.latency_max_s / s.rounds))
    rps_args = ("--seconds", str(s.rps_seconds / s.rounds))
    lat = {"mode": [], "direct": []}
    rps = {"mode": [], "direct": []}
    timeout = s.latency_max_s + 60
    for _ in range(s.rounds):
        lat["direct"].append(_probe(floor, "latency", *direct, *lat_args, timeout=timeout))
        lat["mode"].append(_probe(client, "latency", *target, *lat_args, timeout=timeout))
        rps["direct"].append(_probe(floor, "rps", *direct, *rps_args))
        rps["mode"].append(_probe(client, "rps", *target, *rps_args))
    return {k: {"lat": _pool_latency(lat[k]), "rps": _pool_rps(rps[k])} for k in ("mode", "direct")}


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


def run_one(sb: Sandbox, client: Pod, floor: Pod, backends: list[Pod], mode_name: str, n: int, e: int,
            s: Settings, caps: _CapTracker) -> list[dict]:
    services = make_services(n, [b.ip4 for b in backends[:e]], e)
    spare = backends[e]
    row: dict = {"mode": mode_name, "services": n, "endpoints": e}
    skip = caps.verdict(mode_name, e, n, s.sync_cap_s)
    if skip:
        row.update(status=f"> cap ({skip})", sync_s=f"> {s.sync_cap_s:g}")
        log.info("mode=%s services=%d endpoints=%d status=skipped reason=%r", mode_name, n, e, skip)
        return [row]
    try:
        mode = _make_mode(mode_name, sb, client, s)
    except Unavailable as err:
        row.update(status=f"unavailable: {err}")
        return [row]
    try:
        res: LoadResult = mode.load(services, s.sync_cap_s)
        row.update(sync_s=round(res.seconds, 3), sync_cpu_s=round(res.cpu_seconds, 3))
        if res.timed_out:
            caps.record(mode_name, e, n, None)
            row.update(status="> cap", sync_s=f"> {s.sync_cap_s:g}", sync_cpu_s=None)
            return [row]
        if res.error:
            row.update(status=f"error: {res.error}")
            return [row]
        caps.record(mode_name, e, n, res.seconds)
        row.update(mode.memory())
        last = interleaved(client, floor, backends[:e], s, "--vips", _vips(n))
        rand = interleaved(client, floor, backends[:e], s, "--vips", _vips(n), "--random")
        m, d = last["mode"], last["direct"]
        row.update(lat_last_p50_us=m["lat"]["p50_us"], lat_last_p99_us=m["lat"]["p99_us"],
                   lat_last_errors=m["lat"]["errors"], direct_last_p50_us=d["lat"]["p50_us"],
                   direct_last_p99_us=d["lat"]["p99_us"], rps_last=m["rps"]["rps"], direct_rps_last=d["rps"]["rps"])
        m, d = rand["mode"], rand["direct"]
        row.update(lat_rand_p50_us=m["lat"]["p50_us"], lat_rand_p99_us=m["lat"]["p99_us"],
                   lat_rand_errors=m["lat"]["errors"], direct_rand_p50_us=d["lat"]["p50_us"],
                   rps=m["rps"]["rps"], rps_errors=m["rps"]["errors"], direct_rps=d["rps"]["rps"])
        direct_row = {"mode": "direct", "services": n, "endpoints": e, "alongside": mode_name, "status": "ok",
                      "lat_last_p50_us": d["lat"]["p50_us"], "lat_last_p99_us": d["lat"]["p99_us"],
                      "lat_rand_p50_us": d["lat"]["p50_us"], "lat_rand_p99_us": d["lat"]["p99_us"],
                      "rps": d["rps"]["rps"]}
        # One endpoint change on the last-added Service.
        before = services[-1]
        after = _changed(before, spare)
        services[-1] = after
        if hasattr(mode, "observe"):
            mode.observe = (client, spare.name)
        ch = mode.change(services, before, after, s.change_cap_s)
        row["change_ms"] = f"> {s.change_cap_s * 1000:g}" if ch.timed_out else round(ch.seconds * 1000, 2)
        if ch.error:
            row["change_error"] = ch.error
        row.update({k: v for k, v in getattr(mode, "stats", {}).items() if k.startswith("change")})
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
    """Each figure over direct's, measured in the same interleaved rounds."""
    out = {}
    for k, d in (("lat_last_p50_us", "direct_last_p50_us"), ("lat_rand_p50_us", "direct_rand_p50_us"),
                 ("rps", "direct_rps")):
        if isinstance(row.get(k), (int, float)) and row.get(d):
            out[k.replace("_us", "") + "_x"] = round(row[k] / row[d], 2)
    return out


def _floor_pod(sb: Sandbox) -> Pod:
    """A second client whose cgroup is a sibling of the sandbox's, not a child: nodewire's programs
    (attached to the sandbox cgroup) do not see its connects, and its netns holds no rules. The
    sandbox removes it like any pod (it kills and removes pod.cgroup, wherever that is)."""
    pod = sb.add_pod("floor")
    os.rmdir(pod.cgroup)
    pod.cgroup = f"{sb.cgroup}-floor"
    os.makedirs(pod.cgroup, exist_ok=True)
    return pod


def run_compare(s: Settings) -> list[dict]:
    rows: list[dict] = []
    caps = _CapTracker()
    for e in s.endpoints:
        for n in sorted(s.services):
            with Sandbox() as sb:
                client = sb.add_pod("client")
                floor = _floor_pod(sb)
                backends = [sb.add_pod(f"be{i}") for i in range(e + 1)]  # one spare for the change
                for b in backends:
                    b.serve(tcp_ports=[TARGET_PORT])
                for mode_name in s.modes:
                    log.info("mode=%s services=%d endpoints=%d status=start", mode_name, n, e)
                    try:
                        rows += run_one(sb, client, floor, backends, mode_name, n, e, s, caps)
                    except Exception as err:  # one broken mode must not lose the other rows
                        log.exception("mode=%s services=%d endpoints=%d status=error", mode_name, n, e)
                        rows.append({"mode": mode_name, "services": n, "endpoints": e,
                                     "status": f"error: {err}"[:300]})
                    log.info("row=%s", json.dumps(rows[-1]))
    return rows
