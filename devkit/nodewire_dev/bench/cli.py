"""`nodewire bench …`: benchmarks in the sandbox; figures are printed, never asserted."""
from __future__ import annotations

import json

import click

from agent.output import render


@click.group()
def bench() -> None:
    """Reproducible benchmarks in the sandbox (ratios measured side by side in one run)."""


@bench.command("udp-recovery")
@click.option("--runs", default=100, show_default=True, help="Backend removals to time.")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def udp_recovery(runs, output) -> None:
    """Connected-UDP recovery after a backend removal (socket destroyed → client on a live backend)."""
    from .udp_recovery import run

    row = run(runs)
    click.echo(render(row, output) if output != "table" else "\n".join(f"{k}: {v}" for k, v in row.items()))


@bench.command()
@click.option("--services", default="1000,10000,100000", show_default=True,
              help="Comma-separated Service counts (N Services × --endpoints each).")
@click.option("--endpoints", default=5, show_default=True, help="Endpoints per Service.")
@click.option("--files", default="1", show_default=True, help="Comma-separated: the Services split into this many files.")
@click.option("--flags", "flag_sets", default="default,lb", show_default=True,
              help="Comma-separated agent flag sets: default (observe and rdma on), lb (--no-observe --no-rdma), nocheck (default with --check-interval 0).")
@click.option("--connects", default=2000, show_default=True, help="Connects per series per N.")
@click.option("--idle-seconds", default=30.0, show_default=True, help="Idle time after the first sync for the CPU figure.")
@click.option("--map-size", "map_sizes", multiple=True, metavar="MAP=N", help="Passed to the agent (after the automatic sizes).")
@click.option("--against", metavar="COMMIT", help="Also run the agent as it was at this commit, side by side.")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def connect(services, endpoints, files, flag_sets, connects, idle_seconds, map_sizes, against, output) -> None:
    """Connect latency through a ClusterIP vs directly, start → first sync, full sync, RSS, idle CPU."""
    from .connect import FLAGS, run, table

    try:
        counts = [int(x) for x in services.split(",") if x]
        file_counts = [int(x) for x in files.split(",") if x]
    except ValueError:
        raise click.BadParameter(f"{services!r} / {files!r}: expected numbers like 1000,10000") from None
    sets = [f for f in flag_sets.split(",") if f]
    if not sets or any(f not in FLAGS for f in sets):
        raise click.BadParameter(f"{flag_sets!r}: expected some of {', '.join(FLAGS)}", param_hint="--flags")

    def progress(row):
        if output == "table":
            click.echo(f"{row['tree']} {row['flags']} N={row['services']:,} files={row['files']} done", err=True)

    rows = run(counts, connects, endpoints, file_counts, sets, against, idle_seconds, tuple(map_sizes), progress)
    click.echo(render(rows, output) if output != "table" else table(rows))


@bench.command()
@click.option("--services", default="0,10000", show_default=True, help="Comma-separated Service counts (1 endpoint each).")
@click.option("--against", metavar="COMMIT", help="Also run the agent as it was at this commit (e.g. one that compiled in-process).")
@click.option("--rounds", default=2, show_default=True, help="Interleaved rounds per Service count.")
@click.option("--default-flags", is_flag=True, help="Observe and rdma on (default: the load balancer alone).")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def loader(services, against, rounds, default_flags, output) -> None:
    """Agent RSS and start-up with the load balancer alone: cold (compile child) vs restart (pins reused)."""
    from .loader import run, table

    try:
        counts = [int(x) for x in services.split(",") if x]
    except ValueError:
        raise click.BadParameter(f"{services!r}: expected numbers like 0,10000", param_hint="--services")
    rows = run(counts, against, rounds, default_flags)
    click.echo(render(rows, output) if output != "table" else table(rows))


@bench.command()
@click.option("--services", default=10000, show_default=True, help="Services, 1-4 endpoints each.")
@click.option("--rate", default=200.0, show_default=True, help="Endpoint updates per second.")
@click.option("--seconds", default=300.0, show_default=True, help="How long the churn lasts.")
@click.option("--source", "sources", type=click.Choice(["manifests", "kube"]), multiple=True,
              default=("manifests", "kube"), show_default=True, help="Which source(s) the updates go through.")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def churn(services, rate, seconds, sources, output) -> None:
    """Endpoint churn through each source: agent RSS over time, and `nodewire check` at the end
    (every update applied, no leaked map entries)."""
    import tempfile
    from pathlib import Path

    from .churn import run_churn

    rows = []
    for source in sources:
        with tempfile.TemporaryDirectory(prefix="nw-churn-") as d:
            rows.append(run_churn(source, services, rate, seconds, Path(d)))
        if output == "table":
            click.echo(f"{source} done", err=True)
    click.echo(render(rows, output) if output != "table" else "\n\n".join(
        "\n".join(f"{k}: {v}" for k, v in r.items()) for r in rows))


@bench.command("scrape")
@click.option("--pods", default=1000, show_default=True, help="Pods, each with a real veth pair and synthetic histograms.")
@click.option("--peers", default=2, show_default=True, help="Retransmit series per pod (one per remote peer).")
@click.option("--scrapes", default=5, show_default=True, help="Scrapes measured per tree (median reported).")
@click.option("--against", metavar="COMMIT", help="Also run the agent as it was at this commit, side by side.")
@click.option("--profile-dir", type=click.Path(file_okay=False), help="Write a cProfile of the scrapes per tree here.")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def scrape(pods, peers, scrapes, against, profile_dir, output) -> None:
    """One /metrics scrape as Prometheus asks (OpenMetrics, gzip): agent CPU, wall time, bytes."""
    from .scrape import run

    rows = run(pods, peers, scrapes, against, profile_dir)
    click.echo(render(rows, output) if output != "table" else
               "\n".join("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                   if k != "tree") for r in rows))
