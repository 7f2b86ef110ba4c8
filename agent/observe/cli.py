"""Observability commands: `nodewire top`, `nodewire latency` (views over the agent's /metrics)."""
from __future__ import annotations

import time

import click

__all__ = ["top", "latency"]

metrics_addr_option = click.option("--metrics-addr", default="127.0.0.1:9966", show_default=True,
                                   help="The agent's metrics endpoint (as given to `nodewire run`).")


def _url(addr: str) -> str:
    from ..export.telemetry import parse_addr

    host, port = parse_addr(addr)
    host = "127.0.0.1" if host == "0.0.0.0" else host
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"


@click.command()
@metrics_addr_option
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="One interval, print the table, exit (no live screen).")
def top(metrics_addr, interval, once) -> None:
    """Live per-pod throughput, connect latency p50/p99, retransmits and drops; per-Service connect
    latency p50/p99 and its spread across backends."""
    from rich.console import Console, Group
    from rich.live import Live

    from .views import fetch, service_rows, services_table, top_rows, top_table

    url = _url(metrics_addr)
    try:
        prev, t0 = fetch(url), time.monotonic()
    except OSError as e:
        raise click.ClickException(f"cannot read {url}: {e} (is `nodewire run --metrics-addr` running?)")
    console = Console()

    def step():
        nonlocal prev, t0
        time.sleep(interval)
        cur, t1 = fetch(url), time.monotonic()
        dt = t1 - t0
        table = Group(top_table(top_rows(prev, cur, dt), prev, cur, dt), services_table(service_rows(prev, cur, dt), dt))
        prev, t0 = cur, t1
        return table

    if once:
        console.print(step())
        return
    with Live(console=console, refresh_per_second=2) as live:
        try:
            while True:
                live.update(step())
        except KeyboardInterrupt:
            pass


@click.command()
@metrics_addr_option
@click.option("--metric", type=click.Choice(["connect", "srtt"]), default="connect", show_default=True)
@click.option("--pod", default=None, help="Only this pod (NAME or NAMESPACE/NAME).")
@click.option("--interval", default=0.0, help="Show the buckets gained over this many seconds "
                                               "[default: 0, the cumulative histogram].")
def latency(metrics_addr, metric, pod, interval) -> None:
    """Histogram bars per pod: TCP connect latency or smoothed RTT, in the kernel's own buckets."""
    from rich.console import Console

    from .views import fetch, latency_table

    url = _url(metrics_addr)
    try:
        prev = fetch(url) if interval > 0 else None
        if interval > 0:
            time.sleep(interval)
        cur = fetch(url)
    except OSError as e:
        raise click.ClickException(f"cannot read {url}: {e} (is `nodewire run --metrics-addr` running?)")
    Console().print(latency_table(cur, prev, metric, pod))
