"""`nodewire bench conntrack`: what the conntrack collector costs at 100k and 1M entries.

nodeport.c is loaded into a pin dir of its own with a confirmed-flow map sized so N entries fill it
to --fill; the map is filled with N reverse/forward-shaped entries of which --expired are past their
expiry time, then the collector (agent/datapath/conntrack.py) runs: one pass that removes the expired
ones, then one steady pass that finds nothing to remove. Reported: wall and CPU seconds per pass, the
interval the collector picks after it, and the share of one core that makes (CPU seconds / interval).
"""
from __future__ import annotations

import secrets
import shutil
import time

import click
import numpy as np

from agent.output import render
from agent.paths import state_dir_for

CHUNK = 1 << 16


def _fill(m, n: int, expired: float, now: int) -> None:
    """n entries, keys made unique by (a, aport); a fraction `expired` of them already expired."""
    from agent.datapath import abi

    for start in range(0, n, CHUNK):
        idx = np.arange(start, min(n, start + CHUNK), dtype=np.uint64)
        keys = np.zeros(len(idx), dtype=m.key_dtype)
        a = np.zeros((len(idx), 16), dtype=np.uint8)
        a[:, 10:12] = 0xff
        a[:, 12:16] = np.frombuffer((idx.astype(">u4")).tobytes(), dtype=np.uint8).reshape(-1, 4)
        keys["a"] = a.view("V16").ravel()
        keys["aport"] = 80
        keys["proto"] = 6
        keys["dir"] = (idx % 2).astype(np.uint8)
        values = np.zeros(len(idx), dtype=m.value_dtype)
        values["state"] = abi.CT_S_ESTABLISHED
        values["flags"] = abi.CT_F_SNAT
        values["last_seen"] = now
        dead = (idx % 1000) < int(expired * 1000)
        values["expires"] = np.where(dead, now - 1, now + 3600 * 10**9)
        m.update_arrays(keys, values)


def run_one(n: int, expired: float, fill: float) -> dict:
    from agent.datapath.conntrack import ConntrackCollector, Lifetimes
    from agent.datapath.loader import MapSizes, ensure_mounts, remove_pins
    from agent.datapath.nodeport import NodePortDatapath

    ensure_mounts()
    pin = f"/sys/fs/bpf/nwbench-ct-{secrets.token_hex(3)}"
    dp = NodePortDatapath(pin, MapSizes(ct=max(1024, int(n / fill)), ct_halfopen=1024), lifetimes=Lifetimes())
    try:
        coll = ConntrackCollector(dp.conntrack, max_interval=30.0)
        _fill(dp.conntrack.confirmed, n, expired, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        row = {"entries": n, "capacity": dp.conntrack.confirmed.capacity, "expired": int(n * expired)}
        for label in ("collect", "steady"):
            c0, t0 = time.thread_time(), time.perf_counter()
            census = coll.run_once()
            cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
            row[f"{label}_wall_s"] = round(wall, 3)
            row[f"{label}_cpu_s"] = round(cpu, 3)
            row[f"{label}_removed"] = census["confirmed"].removed
            row[f"{label}_interval_s"] = round(coll.interval, 1)
            row[f"{label}_core_share_pct"] = round(100 * cpu / coll.interval, 3)
        return row
    finally:
        dp.close()
        remove_pins(pin)
        shutil.rmtree(state_dir_for(pin), ignore_errors=True)


def table(rows: list[dict]) -> str:
    lines = ["| entries | expired | pass | wall s | CPU s | removed | next interval s | core share |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for label in ("collect", "steady"):
            lines.append(f"| {r['entries']:,} | {r['expired']:,} | {label} | {r[f'{label}_wall_s']} | "
                         f"{r[f'{label}_cpu_s']} | {r[f'{label}_removed']:,} | {r[f'{label}_interval_s']} | "
                         f"{r[f'{label}_core_share_pct']} % |")
    return "\n".join(lines)


@click.command("conntrack")
@click.option("--entries", default="100000,1000000", show_default=True, help="Comma-separated map fills.")
@click.option("--expired", default=0.1, show_default=True, help="Fraction of the entries already expired.")
@click.option("--fill", default=0.8, show_default=True, help="Entries / map capacity.")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def conntrack_bench(entries, expired, fill, output) -> None:
    """Conntrack collector cost: one pass removing the expired entries, one steady pass."""
    try:
        counts = [int(x) for x in entries.split(",") if x]
    except ValueError:
        raise click.BadParameter(f"{entries!r}: expected numbers like 100000,1000000") from None
    rows = [run_one(n, expired, fill) for n in counts]
    click.echo(render(rows, output) if output != "table" else table(rows))
