"""The `nodewire` command line."""
from __future__ import annotations

import json
import logging
import os
import sys

import click

from .config import DEFAULT_PIN_DIR, AgentConfig, state_dir_for

pin_dir_option = click.option("--pin-dir", default=DEFAULT_PIN_DIR, show_default=True,
                              help="bpffs directory where nodewire pins its maps.")
output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
                             show_default=True)


@click.group()
@click.option("--debug", is_flag=True, help="Verbose, structured logs.")
def main(debug: bool) -> None:
    """nodewire: BPF socket load balancing and per-pod network telemetry for Kubernetes nodes."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")


@main.command()
@click.option("--manifests", type=click.Path(file_okay=False), help="Directory of Service/EndpointSlice/Pod manifests (watched).")
@click.option("--cgroup", type=click.Path(file_okay=False), help="cgroup v2 directory to attach to [default: the node's cgroup v2 root].")
@click.option("--kube", is_flag=True, help="List+watch the Kubernetes API [default when in a pod and no --manifests].")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig file for --kube [default: $KUBECONFIG, else in-cluster].")
@click.option("--api-server", help="API server URL for --kube, e.g. https://10.0.0.1:6443 (when the kubernetes ClusterIP is not served yet).")
@pin_dir_option
@click.option("--metrics-addr", default=None, help="HOST:PORT for the Prometheus /metrics endpoint (e.g. :9965).")
@click.option("--map-size", "map_sizes", multiple=True, metavar="MAP=N",
              help="Map capacity override, e.g. services=2097152 (maps: services, backends, revnat, lb_stats).")
@click.option("--node-name", default=None, help="This node's name [default: $NODE_NAME or the hostname].")
@click.option("--observe/--no-observe", default=True, show_default=True, help="Per-pod network observability.")
@click.option("--veth-netns", default=None, help="Network namespace holding the pods' node-side veths [default: the agent's].")
@click.option("--max-series", default=10000, show_default=True, help="Cap on per-pod/peer series the observer exports.")
@click.option("--rdma/--no-rdma", default=True, show_default=True,
              help="RDMA port counters and GPU↔NIC topology metrics (sysfs, read at scrape time).")
@click.option("--rdma-trace", is_flag=True,
              help="Verbs latency tracing (uprobes) for pods annotated nodewire.io/rdma-trace=\"true\".")
@click.option("--peer-cidr", "peer_cidrs", multiple=True, metavar="CIDR",
              help="Label unknown remote peers by these CIDRs (repeatable) [default: the private ranges].")
def run(manifests, kube, kubeconfig, api_server, cgroup, pin_dir, metrics_addr, map_sizes, node_name,
        observe, veth_netns, max_series, peer_cidrs, rdma, rdma_trace) -> None:
    """Run the agent: keep the BPF service maps equal to the cluster state."""
    from dataclasses import replace

    from .agent import Agent
    from .datapath.loader import MapSizes

    sizes = MapSizes()
    for item in map_sizes:
        name, _, value = item.partition("=")
        if name not in MapSizes.__dataclass_fields__ or not value.isdigit():
            raise click.BadParameter(f"{item!r}: expected MAP=N with MAP one of services, backends, revnat, lb_stats",
                                     param_hint="--map-size")
        sizes = replace(sizes, **{name: int(value)})
    kube = kube or bool(kubeconfig or api_server) or (manifests is None and "KUBERNETES_SERVICE_HOST" in os.environ)
    if manifests is None and not kube:
        raise click.UsageError("no source: pass --manifests DIR or --kube")
    cfg = AgentConfig(manifests=manifests, kube=kube, kubeconfig=kubeconfig, api_server=api_server, cgroup=cgroup,
                      pin_dir=pin_dir, metrics_addr=metrics_addr, sizes=sizes,
                      observe=observe, veth_netns=veth_netns, max_series=max_series, peer_cidrs=tuple(peer_cidrs),
                      rdma=rdma, rdma_trace=rdma_trace)
    if node_name:
        cfg.node_name = node_name
    from .sources.kube import KubeError

    try:
        agent = Agent(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None
    agent.install_signal_handlers()
    try:
        agent.start()
    except KubeError as e:
        raise click.ClickException(str(e)) from None
    try:
        agent.run()
    finally:
        agent.close()


def _service_names(pin_dir: str, ids: list[int]) -> dict | None:
    """id → Service name, asked from the running agent (None when it does not answer)."""
    from .api import ApiError, call
    from .config import AgentConfig

    path = AgentConfig(pin_dir=pin_dir).api_socket_path
    names: dict = {}
    try:
        for i in range(0, len(ids), 5000):
            names.update(call(path, "services.names", {"ids": ids[i:i + 5000]}, timeout=30))
    except (OSError, ApiError):
        return None
    return names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@main.command()
@pin_dir_option
@output_option
def services(pin_dir, output) -> None:
    """List what the kernel holds: frontend → backends (read from the pinned maps)."""
    from .datapath.inspect import read_services

    try:
        rows = read_services(pin_dir)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    names = _service_names(pin_dir, [r["id"] for r in rows])
    if names is None:
        click.echo("(the agent does not answer: Service names unknown; the kernel holds ids only)", err=True)
    for r in rows:
        label = (names or {}).get(str(r["id"]), {})
        r["service"], r["port_name"] = label.get("service", ""), label.get("port_name", "")
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'ID':>5}  {'FRONTEND':<30} {'PROTO':<5} {'SERVICE':<30} BACKENDS")
    for r in rows:
        name = f"{r['service']}:{r['port_name']}" if r["port_name"] else r["service"]
        bes = ", ".join(b["address"] for b in r["backends"]) or "(none: connects refused)"
        click.echo(f"{r['id']:>5}  {r['frontend']:<30} {r['protocol']:<5} {name:<30} {bes}")


@main.command()
@pin_dir_option
@output_option
def status(pin_dir, output) -> None:
    """Agent status: programs attached, map fill, last sync, errors."""
    from dataclasses import asdict

    from .datapath.attach import attached_programs
    from .status import read_status

    st = read_status(pin_dir)
    if st is None:
        raise click.ClickException(f"no agent status for --pin-dir {pin_dir} (the agent has not run with it)")
    running = _alive(st.pid)
    attached = [p.get("name") for p in attached_programs(st.cgroup)]
    if output == "json":
        click.echo(json.dumps(dict(asdict(st), agent_running=running, attached=attached), indent=2))
        return
    import time

    last = st.last_sync
    click.echo(f"agent:     {'running' if running else 'NOT running'} (pid {st.pid})")
    click.echo(f"cgroup:    {st.cgroup}")
    click.echo(f"programs:  {len(attached)} attached ({', '.join(attached)})")
    for name, m in st.maps.items():
        click.echo(f"map:       {name} {m.entries}/{m.capacity} ({100 * m.entries / m.capacity:.1f}%)")
    click.echo(f"services:  {st.services}")
    if last:
        click.echo(f"last sync: {time.time() - last.time:.1f}s ago, {last.seconds * 1000:.1f} ms, "
                   f"{last.written} written, {last.deleted} deleted")
    c = st.counters
    click.echo(f"errors:    {c.object_errors} bad objects, {c.sync_errors} refused services")
    for e in st.object_errors[-5:] + st.sync_errors[-5:]:
        click.echo(f"  - {e}")
    for name, src in st.sources.items():
        state = "healthy" if src.healthy else f"STALE since {src.stale_since or 'start'}"
        err = f" (last error: {src.last_error})" if src.last_error and not src.healthy else ""
        click.echo(f"source:    {name} {state}{err}")


@main.command()
@pin_dir_option
@click.option("--cgroup", type=click.Path(file_okay=False), help="cgroup to detach from [default: the one in the agent's status].")
def cleanup(pin_dir, cgroup) -> None:
    """Detach nodewire's programs and unpin its maps."""
    import shutil

    from .datapath.attach import detach_sock_lb, detect_cgroup2_root

    from .status import read_status

    st = read_status(pin_dir)
    cg = cgroup or (st.cgroup if st else None) or detect_cgroup2_root()
    n = detach_sock_lb(cg) if os.path.isdir(cg) else 0
    removed = 0
    if os.path.isdir(pin_dir):
        for name in os.listdir(pin_dir):
            os.unlink(os.path.join(pin_dir, name))
            removed += 1
        os.rmdir(pin_dir)
    shutil.rmtree(state_dir_for(pin_dir), ignore_errors=True)
    click.echo(f"detached {n} programs from {cg}; unpinned {removed} maps from {pin_dir}")


# Commands that live next to their feature, registered here so `nodewire --help` lists them all.
from .observe.cli import latency, top  # noqa: E402
from .rdma.cli import rdma as rdma_command, topo  # noqa: E402

for _command in (top, latency, topo, rdma_command):
    main.add_command(_command)


def _register_plugins() -> None:
    """Commands of installed add-ons (the development kit's `demo` and `bench`), found by entry point,
    so the shipped agent never imports them and works without them."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="nodewire.commands"):
        try:
            main.add_command(ep.load(), ep.name)
        except Exception as e:  # a broken add-on must not take the agent's own commands down
            logging.getLogger("nodewire.cli").warning("command %s not loaded: %s", ep.name, e)


_register_plugins()
