"""`nodewire bench compare`: side by side against kube-proxy's iptables and nftables rule layouts."""
from __future__ import annotations

import dataclasses
import tempfile

import click

from .harness import MODES, Settings, run_compare
from .report import write


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers") from None
    if not vals or any(v < 1 for v in vals):
        raise click.BadParameter(f"{text!r}: expected integers >= 1")
    return vals


@click.command("compare")
@click.option("--services", default="1000,10000,100000", show_default=True, help="Service counts N.")
@click.option("--endpoints", default="1,5", show_default=True, help="Endpoints per Service.")
@click.option("--modes", default=",".join(MODES), show_default=True, help="Modes besides direct.")
@click.option("--quick", is_flag=True, help="Few samples and short caps (a smoke run).")
@click.option("--sync-cap", type=float, default=None, help="Seconds a full sync may take before '> cap'.")
@click.option("--iptables-backend", type=click.Choice(["legacy", "nft"]), default="legacy", show_default=True)
@click.option("--nodeport", is_flag=True,
              help="NodePort mode: an external client dials a NodePort through kube-proxy's iptables/nftables "
                   "NodePort rules or nodewire's tc programs, beside direct (multi-node sandbox).")
@click.option("--out", default=None,
              help="Directory for .md/.json/.png [default: a new temporary directory; pass bench/results to "
                   "update the committed results].")
def compare(services, endpoints, modes, quick, sync_cap, iptables_backend, nodeport, out):
    """Connect latency, req/s, sync time, change time and memory: direct vs iptables vs nftables vs
    nodewire, side by side in one sandbox run."""
    n, e = _ints(services), _ints(endpoints)
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in mode_list if m not in MODES]
    if bad:
        raise click.BadParameter(f"unknown mode(s) {', '.join(bad)} (expected {', '.join(MODES)})",
                                 param_hint="--modes")
    s = Settings.quick(n, e, mode_list) if quick else Settings(n, e, mode_list)
    s.iptables_backend = iptables_backend
    if sync_cap:
        s.sync_cap_s = sync_cap
    if nodeport:
        from .nodeport import run_nodeport

        click.echo(run_nodeport(s, out))
        return
    rows = run_compare(s)
    out = out or tempfile.mkdtemp(prefix="nodewire-bench-")
    paths = write(rows, out, {k: v for k, v in dataclasses.asdict(s).items()})
    click.echo(paths["md"].read_text())
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")
