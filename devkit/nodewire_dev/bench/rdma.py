"""What verbs tracing costs: the mock driver (nodewire_dev/mockverbs) run untraced, traced, and traced
with a duty cycle, side by side in one run. Numbers are ratios and differences of those runs."""
from __future__ import annotations

import re
import subprocess
import tempfile
import time

import json

import click

from agent.rdma.cli import parse_duty

from ..mockverbs import build

_KV = re.compile(r"(\w+)=(\d+)")


def _run(driver: str, script: list[str], tracer=None) -> dict[str, dict[str, int]]:
    """Run the driver; with a tracer, wait at its first `ready` until the probes are on."""
    p = subprocess.Popen([driver, "qps:1", "ready", *script], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    pid = int(p.stdout.readline().split()[1])
    if tracer is not None:
        deadline = time.monotonic() + 20
        while not tracer.is_attached(pid):
            if time.monotonic() > deadline:
                p.kill()
                raise RuntimeError("bench: the tracer never attached to the driver")
            time.sleep(0.05)
    p.stdin.write("\n")
    p.stdin.close()
    out = {}
    for line in p.stdout:
        word = line.split()[0]
        out[word if word not in out else word + "2"] = {k: int(v) for k, v in _KV.findall(line)}
    p.wait()
    return out


def run(wrs: int = 200_000, rate: int = 100_000, rate_ms: int = 5000,
        duties: tuple[tuple[float, float], ...] = ((0.05, 5.0), (0.05, 20.0))) -> dict:
    from agent.rdma.verbs import VerbsTracer

    with tempfile.TemporaryDirectory(prefix="nw-rdma-bench-") as d:
        m = build(d)
        script = [f"bench:0:{wrs}:1", f"bench:0:{wrs // 8}:8", f"rate:0:{rate}:{rate_ms}"]
        off = _run(m.driver, script)
        with VerbsTracer(libibverbs=[m.libibverbs]) as tr:
            tr.start()
            on = _run(m.driver, script, tr)
            stats_on = tr.snapshot().stats
        sampled = []
        for on_s, period in duties:
            ms = max(rate_ms, int(2 * period * 1000))
            with VerbsTracer(libibverbs=[m.libibverbs], duty=(on_s, period)) as tr:
                tr.start()
                t0, on0 = time.monotonic(), tr.traced_seconds
                r = _run(m.driver, [f"rate:0:{rate}:{ms}"], tr)
                seen = (tr.traced_seconds - on0) / (time.monotonic() - t0)
            sampled.append({"on_s": on_s, "period_s": period, "run_ms": ms, "duty_measured": seen,
                            "rate_cpu": r["rate"]["cpu_ns"] / r["rate"]["ns"]})

    def per_wr(r, key):
        return r[key]["ns"] / r[key]["wrs"]

    def cpu_share(r):
        return r["rate"]["cpu_ns"] / r["rate"]["ns"]

    res = {
        "wrs": wrs,
        "off_ns_per_wr_chain1": per_wr(off, "bench"), "on_ns_per_wr_chain1": per_wr(on, "bench"),
        "off_ns_per_wr_chain8": per_wr(off, "bench2"), "on_ns_per_wr_chain8": per_wr(on, "bench2"),
        "rate_target_wr_s": rate,
        "rate_cpu_off": cpu_share(off), "rate_cpu_on": cpu_share(on),
        "rate_achieved_on_wr_s": on["rate"]["wrs"] / on["rate"]["ns"] * 1e9,
        "stats_on": stats_on,
    }
    # chain of 1: each WR is one post_send (uprobe) + one poll_cq (uprobe + uretprobe) = 3 probe hits
    res["overhead_ns_per_wr_chain1"] = res["on_ns_per_wr_chain1"] - res["off_ns_per_wr_chain1"]
    res["overhead_ns_per_probe_hit"] = res["overhead_ns_per_wr_chain1"] / 3
    res["throughput_ratio_on_off_chain1"] = res["off_ns_per_wr_chain1"] / res["on_ns_per_wr_chain1"]
    res["throughput_ratio_on_off_chain8"] = res["off_ns_per_wr_chain8"] / res["on_ns_per_wr_chain8"]
    res["rate_cost_on"] = res["rate_cpu_on"] - res["rate_cpu_off"]
    for d in sampled:
        d["cost"] = d["rate_cpu"] - res["rate_cpu_off"]
        # time per window spent at full trap cost beyond the window itself (probe removal tail)
        if res["rate_cost_on"] > 0:
            d["tail_s_per_window"] = d["cost"] * d["period_s"] / res["rate_cost_on"] - d["on_s"]
    res["duty_cycles"] = sampled
    # the duty fraction that would bring always-on cost down to 2% of a core at this rate
    res["duty_for_2pct"] = min(1.0, 0.02 / res["rate_cost_on"]) if res["rate_cost_on"] > 0 else 1.0
    return res


@click.command("rdma")
@click.option("--wrs", default=200_000, show_default=True, help="Work requests per unpaced run.")
@click.option("--rate", default=100_000, show_default=True, help="Paced run: work requests per second.")
@click.option("--rate-ms", default=5000, show_default=True, help="Paced run length (ms).")
@click.option("--duty", "duties", multiple=True, default=("0.05/5", "0.05/20"), show_default=True,
              help="Duty cycles ON/PERIOD to measure under the paced load.")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def rdma_bench(wrs, rate, rate_ms, duties, output) -> None:
    """Cost of verbs tracing on the mock verbs stack: per-probe overhead, throughput on/off, duty cycles."""
    res = run(wrs, rate, rate_ms, tuple(parse_duty(d) for d in duties))
    if output != "table":
        from agent.output import emit
        emit(res, output)
        return
    click.echo(f"unpaced, chain 1: {res['off_ns_per_wr_chain1']:.0f} ns/WR off, "
               f"{res['on_ns_per_wr_chain1']:.0f} ns/WR traced → throughput ×{res['throughput_ratio_on_off_chain1']:.4f}; "
               f"overhead {res['overhead_ns_per_wr_chain1']:.0f} ns/WR ≈ {res['overhead_ns_per_probe_hit']:.0f} ns per probe hit")
    click.echo(f"unpaced, chain 8: {res['off_ns_per_wr_chain8']:.0f} ns/WR off, "
               f"{res['on_ns_per_wr_chain8']:.0f} ns/WR traced → ×{res['throughput_ratio_on_off_chain8']:.4f}")
    click.echo(f"paced {rate} WR/s: CPU {res['rate_cpu_off']:.1%} off, {res['rate_cpu_on']:.1%} traced "
               f"(cost {res['rate_cost_on']:.1%} of a core; achieved {res['rate_achieved_on_wr_s']:.0f} WR/s)")
    for d in res["duty_cycles"]:
        click.echo(f"  duty {d['on_s']}/{d['period_s']} s (measured on-time {d['duty_measured']:.1%}): "
                   f"cost {d['cost']:.1%} of a core (≈{d.get('tail_s_per_window', 0):.2f} s of trapping "
                   f"per window beyond it)")
