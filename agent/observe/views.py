"""Terminal views over the agent's own /metrics: `nodewire top` and `nodewire latency`.

The views are clients of the exporter, like Prometheus: two scrapes a few seconds apart give rates
and the histogram buckets gained in between. Parsing and arithmetic are pure (tested without root);
rendering uses rich.
"""
from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table
from rich.text import Text

from ..histogram import bucket_quantile

PodId = tuple[str, str]  # (namespace, pod)


@dataclass
class Scrape:
    """The per-pod parts of one /metrics scrape."""

    bytes: dict[tuple[PodId, str], float] = field(default_factory=dict)    # (pod, direction) → bytes
    packets: dict[tuple[PodId, str], float] = field(default_factory=dict)
    retrans: dict[PodId, float] = field(default_factory=lambda: defaultdict(float))
    drops: dict[str, float] = field(default_factory=dict)                  # reason → packets
    # histogram → pod → {upper bound: cumulative count}
    buckets: dict[str, dict[PodId, dict[float, float]]] = field(default_factory=lambda: defaultdict(dict))
    # Service connect latency: (namespace, service) → backend → {upper bound: cumulative count}
    svc_buckets: dict[PodId, dict[str, dict[float, float]]] = field(default_factory=lambda: defaultdict(dict))
    svc_connects: dict[PodId, float] = field(default_factory=lambda: defaultdict(float))


HISTOGRAMS = {"connect": "nodewire_tcp_connect_duration_seconds", "srtt": "nodewire_tcp_srtt_seconds"}
SVC_CONNECT = "nodewire_service_connect_duration_seconds_bucket"


def _backend(lb: dict) -> str:
    return lb.get("nodewire_backend_pod") or lb.get("nodewire_backend_workload") or lb.get("nodewire_backend_address", "?")


def parse(text: str) -> Scrape:
    s = Scrape()
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            lb = smp.labels
            pod = (lb.get("k8s_namespace_name", ""), lb.get("k8s_pod_name", ""))
            if smp.name == "k8s_pod_network_io_bytes_total":
                s.bytes[(pod, lb["network_io_direction"])] = smp.value
            elif smp.name == "nodewire_pod_network_packets_total":
                s.packets[(pod, lb["network_io_direction"])] = smp.value
            elif smp.name == "nodewire_tcp_retransmits_total":
                s.retrans[pod] += smp.value
            elif smp.name == SVC_CONNECT:
                svc = (lb.get("k8s_namespace_name", ""), lb.get("k8s_service_name", ""))
                s.svc_buckets[svc].setdefault(_backend(lb), {})[float(lb["le"])] = smp.value
            elif smp.name == "nodewire_service_connects_total":
                s.svc_connects[(lb.get("k8s_namespace_name", ""), lb.get("k8s_service_name", ""))] += smp.value
            elif smp.name == "nodewire_skb_drops_total":
                s.drops[lb["nodewire_drop_reason"]] = smp.value
            else:
                for key, base in HISTOGRAMS.items():
                    if smp.name == base + "_bucket":
                        s.buckets[key].setdefault(pod, {})[float(lb["le"])] = smp.value
    return s


def bucket_delta(cur: dict[float, float], prev: dict[float, float] | None) -> list[tuple[float, float]]:
    """(upper bound, count in this bucket only) gained since prev (all of cur when prev is None)."""
    out, below = [], 0.0
    for le in sorted(cur):
        cum = cur[le] - (prev or {}).get(le, 0.0)
        out.append((le, cum - below))
        below = cum
    return out


quantile = bucket_quantile  # exact to the kernel's bucket (agent/histogram.py)


def fmt_seconds(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "+Inf"
    if v >= 1:
        return f"{v:.3g} s"
    return f"{v * 1e3:.3g} ms" if v >= 1e-3 else f"{v * 1e6:.3g} µs"


def fmt_rate(v: float, unit: str = "B/s") -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.1f} {prefix}{unit}"
    return f"{v:.0f} {unit}"


@dataclass
class PodRow:
    pod: PodId
    rx: float
    tx: float
    pps: float
    p50: float | None
    p99: float | None
    retrans: float


def top_rows(prev: Scrape, cur: Scrape, dt: float) -> list[PodRow]:
    pods = {p for p, _ in cur.bytes} | set(cur.buckets.get("connect", {}))
    rows = []
    def rate(c: dict, p: dict, key) -> float:
        return (c.get(key, 0.0) - p.get(key, 0.0)) / dt

    for pod in pods:
        conn = bucket_delta(cur.buckets.get("connect", {}).get(pod, {}), prev.buckets.get("connect", {}).get(pod))
        rows.append(PodRow(pod, rate(cur.bytes, prev.bytes, (pod, "receive")),
                           rate(cur.bytes, prev.bytes, (pod, "transmit")),
                           rate(cur.packets, prev.packets, (pod, "receive")) + rate(cur.packets, prev.packets, (pod, "transmit")),
                           quantile(conn, 0.5), quantile(conn, 0.99), rate(cur.retrans, prev.retrans, pod)))
    return sorted(rows, key=lambda r: -(r.rx + r.tx))


def top_table(rows: list[PodRow], prev: Scrape, cur: Scrape, dt: float) -> Table:
    t = Table(title=f"nodewire top — per pod, last {dt:.1f} s", expand=False)
    for col in ("namespace/pod", "rx", "tx", "packets", "connect p50", "connect p99", "retrans/s"):
        t.add_column(col, justify="left" if col == "namespace/pod" else "right")
    for r in rows:
        t.add_row(f"{r.pod[0]}/{r.pod[1]}", fmt_rate(r.rx), fmt_rate(r.tx), fmt_rate(r.pps, "p/s"),
                  fmt_seconds(r.p50), fmt_seconds(r.p99), f"{r.retrans:.1f}")
    drops = sorted(((reason, (v - prev.drops.get(reason, 0.0)) / dt) for reason, v in cur.drops.items()),
                   key=lambda x: -x[1])
    t.caption = "drops/s: " + (", ".join(f"{r} {v:.1f}" for r, v in drops[:5] if v > 0) or "none")
    return t


@dataclass
class ServiceRow:
    service: PodId
    cps: float                               # connections per second through the socket LB
    p50: float | None                        # connect latency, all backends together
    p99: float | None
    backends: dict[str, float | None]        # backend → its connect p99 (the spread across backends)


def service_rows(prev: Scrape, cur: Scrape, dt: float) -> list[ServiceRow]:
    rows = []
    for svc, per_backend in cur.svc_buckets.items():
        gained = {be: bucket_delta(b, prev.svc_buckets.get(svc, {}).get(be)) for be, b in per_backend.items()}
        total: dict[float, float] = defaultdict(float)
        for buckets in gained.values():
            for le, n in buckets:
                total[le] += n
        merged = sorted(total.items())
        rows.append(ServiceRow(svc, (cur.svc_connects.get(svc, 0.0) - prev.svc_connects.get(svc, 0.0)) / dt,
                               quantile(merged, 0.5), quantile(merged, 0.99),
                               {be: quantile(b, 0.99) for be, b in gained.items()}))
    return sorted(rows, key=lambda r: -r.cps)


def services_table(rows: list[ServiceRow], dt: float) -> Table:
    t = Table(title=f"per Service, last {dt:.1f} s", expand=False)
    for col in ("namespace/service", "connects/s", "backends", "connect p50", "connect p99", "backend p99 spread"):
        t.add_column(col, justify="left" if col == "namespace/service" else "right")
    for r in rows:
        active = sorted(((v, be) for be, v in r.backends.items() if v is not None), key=lambda x: x[0])
        spread = f"{fmt_seconds(active[0][0])} – {fmt_seconds(active[-1][0])} ({active[-1][1]})" if active else "-"
        t.add_row(f"{r.service[0]}/{r.service[1]}", f"{r.cps:.1f}", str(len(r.backends)), fmt_seconds(r.p50),
                  fmt_seconds(r.p99), spread)
    return t


def latency_table(cur: Scrape, prev: Scrape | None, metric: str, pod_filter: str | None, width: int = 40) -> Table:
    t = Table(title=f"nodewire latency — {metric} " + ("(cumulative)" if prev is None else "(last interval)"))
    t.add_column("namespace/pod")
    t.add_column("≤ bucket", justify="right")
    t.add_column("count", justify="right")
    t.add_column("")
    for pod, cum in sorted(cur.buckets.get(metric, {}).items()):
        if pod_filter and pod_filter not in (pod[1], f"{pod[0]}/{pod[1]}"):
            continue
        buckets = [(le, n) for le, n in bucket_delta(cum, prev.buckets.get(metric, {}).get(pod) if prev else None)]
        used = [i for i, (_, n) in enumerate(buckets) if n > 0]
        if not used:
            continue
        peak = max(n for _, n in buckets)
        for i in range(used[0], used[-1] + 1):
            le, n = buckets[i]
            bar = Text("█" * max(1 if n else 0, round(width * n / peak)), style="cyan")
            t.add_row(f"{pod[0]}/{pod[1]}" if i == used[0] else "", fmt_seconds(le), f"{n:.0f}", bar)
        t.add_section()
    return t


def fetch(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse(r.read().decode())
