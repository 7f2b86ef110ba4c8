"""The `nodewire` command line."""
from __future__ import annotations

import logging

import click


@click.group()
@click.option("--debug", is_flag=True, help="Verbose, structured logs.")
def main(debug: bool) -> None:
    """nodewire: BPF socket load balancing and per-pod network telemetry for Kubernetes nodes."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")


from agent.rdma.cli import topo  # noqa: E402
main.add_command(topo)
