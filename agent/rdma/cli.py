"""`nodewire topo` and `nodewire rdma`: the RDMA/GPU-NIC commands."""
from __future__ import annotations

import json
import sys

import click

from .topology import TopologyError, build_topology, render_table


@click.command()
@click.option("--sysfs-root", default="/sys", show_default=True, type=click.Path(file_okay=False),
              help="Read sysfs from here (a fixture tree in tests).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def topo(sysfs_root: str, output: str) -> None:
    """GPU↔NIC PCIe distance (PIX/PXB/PHB/NODE/SYS, as nvidia-smi topo -m) and each GPU's closest NIC."""
    try:
        t = build_topology(sysfs_root)
    except TopologyError as e:
        raise click.ClickException(str(e)) from None
    if output == "json":
        json.dump(t.to_json(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        click.echo(render_table(t))
