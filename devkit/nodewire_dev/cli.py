"""The development kit's commands, added to `nodewire` through the `nodewire.commands` entry points:
`nodewire demo` and `nodewire bench …`."""
from __future__ import annotations

import json

import click

from .bench.cli import bench
from .bench.cni import bench_cni
from .bench.compare import compare as bench_compare
from .bench.conntrack import conntrack_bench
from .bench.flood import flood_bench
from .bench.maglev import maglev_bench
from .bench.observe import bench_observe
from .bench.rdma import rdma_bench
from .bench.reconciler import reconciler as bench_reconciler
from .bench.watch import watch as bench_watch

bench.add_command(bench_compare)
bench.add_command(maglev_bench)
bench.add_command(bench_watch)
bench.add_command(bench_observe, "observe")
bench.add_command(rdma_bench)
bench.add_command(bench_reconciler)
bench.add_command(bench_cni)
bench.add_command(conntrack_bench)
bench.add_command(flood_bench)


@click.command()
@click.option("--duration", type=float, default=None, help="Seconds to run [default: until Ctrl-C].")
@click.option("--metrics-addr", default=None, help="Serve the agent's /metrics here while the demo runs "
                                                   "[default: 127.0.0.1:9966 when free, else a free local port; \"\": off].")
@click.option("-o", "--output", type=click.Choice(["live", "json", "yaml"]), default="live",
              help="json/yaml: print the final per-Service tally after the run.")
def demo(duration, metrics_addr, output) -> None:
    """A sandbox cluster (netns pods) with the agent load-balancing ClusterIP traffic, shown live."""
    from .demo import run_demo

    result = run_demo(duration, metrics_addr)
    if output != "live":
        from agent.output import render
        click.echo(json.dumps(result) if output == "json" else render(result, "yaml"))


__all__ = ["bench", "demo"]
