"""`nodewire bench maglev`: how many flows change backend when one of N backends goes, and how long
building the tables of many Services takes (agent/model/maglev.py, the tables the tc path uses)."""
from __future__ import annotations

import json
import time

import click
import numpy as np

from agent.model import maglev


@click.command("maglev")
@click.option("--table-size", default=maglev.DEFAULT_TABLE_SIZE, show_default=True, help="M, a prime.")
@click.option("--backends", default=10, show_default=True, help="Backends per Service.")
@click.option("--services", default=10000, show_default=True, help="Services whose tables are built at once.")
@click.option("--trials", default=20, show_default=True, help="Backend sets tried for the disruption figure.")
def maglev_bench(table_size, backends, services, trials) -> None:
    """Disruption (1 of N backends removed) and table build time."""
    maglev.check_table_size(table_size)
    moved = []
    for t in range(trials):
        names = sorted(f"10.{t}.{i // 250}.{i % 250}:8080/TCP" for i in range(backends))
        gone = names[t % backends]
        rest = [n for n in names if n != gone]
        a, b = maglev.build_table(names, table_size), maglev.build_table(rest, table_size)
        moved.append(float(np.mean(np.array(names)[a] != np.array(rest)[b])))
    sets = [[f"10.{k // 250 % 250}.{k % 250}.{i}:8080/TCP" for i in range(5)] for k in range(services)]
    t0 = time.perf_counter()
    maglev.build_tables(sets, table_size)
    build = time.perf_counter() - t0
    compiled = maglev._c_fill() is not None
    click.echo(json.dumps({
        "table_size": table_size, "backends": backends, "ideal_moved": round(1 / backends, 4),
        "moved_mean": round(float(np.mean(moved)), 4), "moved_max": round(max(moved), 4),
        "build_services": services, "build_backends_each": 5, "build_seconds": round(build, 2),
        "build_ms_per_service": round(build / services * 1000, 3), "compiled_fill": compiled}))
