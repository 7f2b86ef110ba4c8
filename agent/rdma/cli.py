"""`nodewire topo` and `nodewire rdma`: the RDMA/GPU-NIC commands."""
from __future__ import annotations

import json
import os
import sys

import click

from ..histogram import slot_quantile
from .topology import TopologyError, build_topology, render_table


@click.command()
@click.option("--sysfs-root", default="/sys", show_default=True, type=click.Path(file_okay=False),
              help="Read sysfs from here (a fixture tree in tests).")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml", "resourceslice"]), default="table",
              show_default=True, help="resourceslice: the devices as a resource.k8s.io/v1 ResourceSlice (JSON).")
@click.option("--node-name", default=None, help="Node name for -o resourceslice [default: hostname].")
def topo(sysfs_root: str, output: str, node_name: str | None) -> None:
    """GPU↔NIC PCIe distance (PIX/PXB/PHB/NODE/SYS, as nvidia-smi topo -m) and each GPU's closest NIC."""
    try:
        t = build_topology(sysfs_root)
    except TopologyError as e:
        raise click.ClickException(str(e)) from None
    if output == "resourceslice":
        import socket

        from .topology import resource_slice
        click.echo(json.dumps(resource_slice(t, node_name or socket.gethostname()), indent=2))
    elif output == "json":
        json.dump(t.to_json(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    elif output == "yaml":
        from ..output import emit
        emit(t.to_json(), "yaml")
    else:
        click.echo(render_table(t))


def parse_duty(text: str | None):
    if not text:
        return None
    try:
        on, period = (float(x) for x in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected ON/PERIOD seconds, e.g. 0.05/5", param_hint="--duty")
    if not 0 < on <= period:
        raise click.BadParameter(f"{text!r}: need 0 < ON <= PERIOD", param_hint="--duty")
    return on, period


def snapshot_json(snap, ports, kernel_tracepoints=None) -> dict:
    return {
        "kernel_tracepoints": kernel_tracepoints or {},
        "qps": [{"pid": h.pid, "comm": h.comm, "device": h.device, "qp_num": h.qp_num,
                 "direction": h.direction, "count": h.count, "sum_us": h.sum_us,
                 "p50_us_le": slot_quantile(h.slots, 0.5), "p99_us_le": slot_quantile(h.slots, 0.99),
                 "slots": {str(s): c for s, c in enumerate(h.slots) if c}} for h in snap.latency],
        "errors": [{"pid": e.pid, "comm": e.comm, "device": e.device, "qp_num": e.qp_num,
                    "status": e.status, "count": e.count} for e in snap.errors],
        "stats": snap.stats,
        "ports": [{"device": c.device, "port": c.port, "source": c.source, "counter": c.name,
                   "value": c.value} for c in ports],
    }


def render(snap, ports):
    from rich.console import Group
    from rich.table import Table

    qps = Table(title="verbs work requests (latency: post → completion polled; bucket upper bounds)")
    for col in ("pid", "comm", "device", "qp", "dir", "count", "p50 ≤µs", "p99 ≤µs", "errors"):
        qps.add_column(col, justify="right" if col in ("pid", "count", "p50 ≤µs", "p99 ≤µs") else "left")
    errs: dict[tuple, list[str]] = {}
    for e in snap.errors:
        errs.setdefault((e.pid, e.qp_num), []).append(f"{e.status}={e.count}")
    for h in snap.latency:
        qps.add_row(str(h.pid), h.comm, h.device, f"0x{h.qp_num:x}", h.direction, str(h.count),
                    str(slot_quantile(h.slots, 0.5)), str(slot_quantile(h.slots, 0.99)),
                    " ".join(errs.get((h.pid, h.qp_num), [])) if h.direction == "send" else "")
    port_tbl = Table(title="RDMA port counters")
    for col in ("device", "port", "counter", "value"):
        port_tbl.add_column(col)
    for c in ports:
        if c.value:
            port_tbl.add_row(c.device, c.port, c.name, str(c.value))
    return Group(qps, port_tbl)


@click.command()
@click.option("--libibverbs", "libs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="libibverbs file(s) to watch from the start (more are found in traced processes' maps).")
@click.option("--cgroup", "cgroups", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Only trace processes in these cgroup v2 directories (opted-in pods). Default: all.")
@click.option("--duty", default=None, help="Trace ON seconds out of every PERIOD, e.g. 0.05/5 (cost bound).")
@click.option("--time-box", type=float, default=None, help="Detach all probes after N seconds (keep showing data).")
@click.option("--sysfs-root", default="/sys", show_default=True, type=click.Path(file_okay=False))
@click.option("--interval", default=1.0, show_default=True, help="Refresh every N seconds.")
@click.option("--duration", type=float, default=None, help="Stop after N seconds and print once.")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def rdma(libs, cgroups, duty, time_box, sysfs_root, interval, duration, output) -> None:
    """Live per-QP verbs latency and errors, and RDMA port counters."""
    import time

    from .counters import RdmaPortCounters
    from .layout import LayoutError
    from .verbs import VerbsTracer, kernel_rdma_tracepoints

    kernel_tp = kernel_rdma_tracepoints()
    try:
        from .layout import CACHE_DIR
        tracer = VerbsTracer(libibverbs=libs, cgroups=list(cgroups) or None, duty=parse_duty(duty),
                             time_box=time_box, provider_cache=os.path.join(CACHE_DIR, "rdma-providers.json"))
    except LayoutError as e:
        raise click.ClickException(str(e)) from None
    ports = RdmaPortCounters(sysfs_root)
    with tracer:
        tracer.start()
        end = time.monotonic() + duration if duration is not None else None
        if output != "table" or end is not None or not sys.stdout.isatty():
            time.sleep(max(0.0, end - time.monotonic()) if end else interval)
            snap, pc = tracer.snapshot(), ports.read()
            if output != "table":
                from ..output import emit
                emit(snapshot_json(snap, pc, kernel_tp), output)
            else:
                from rich.console import Console
                Console().print(render(snap, pc))
            return
        from rich.live import Live
        with Live(render(tracer.snapshot(), ports.read()), refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(interval)
                    live.update(render(tracer.snapshot(), ports.read()))
            except KeyboardInterrupt:
                pass
