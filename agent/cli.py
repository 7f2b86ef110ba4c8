"""The `nodewire` command line."""
from __future__ import annotations

import logging
import os
import sys

import click

from . import config as configuration
from .cli_options import config_file_option, config_options, given_flags, load_config, pin_dir_option
from .config import LOG_LEVELS, state_dir_for
from .output import emit, output_option

LOG_FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nodewire")
    except PackageNotFoundError:
        return "unknown"


@click.group()
@click.version_option(_version(), "--version", prog_name="nodewire", message="%(prog)s %(version)s")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default=None, envvar="NODEWIRE_LOG_LEVEL",
              help="Log level [default: info, or the config file's log-level].")
@click.option("--debug", is_flag=True, help="Verbose, structured logs (--log-level debug).")
@click.pass_context
def main(ctx: click.Context, log_level: str | None, debug: bool) -> None:
    """nodewire: BPF socket load balancing and per-pod network telemetry for Kubernetes nodes."""
    level = "debug" if debug else log_level
    ctx.obj = {"log_level": level}
    logging.basicConfig(level=(level or "info").upper(), stream=sys.stderr, format=LOG_FORMAT)


@main.command()
def version() -> None:
    """Print nodewire's version."""
    click.echo(f"nodewire {_version()}")


@main.command()
@config_file_option
@config_options("run")
@click.pass_context
def run(ctx, config_path, **kwargs) -> None:
    """Run the agent: keep the BPF service maps equal to the cluster state.

    Settings come from the config file, then NODEWIRE_* variables, then these flags."""
    from .agent import Agent

    cfg = load_config(ctx, config_path, given_flags("run", kwargs))
    if not cfg.kube and (cfg.kubeconfig or cfg.api_server or
                         (cfg.manifests is None and "KUBERNETES_SERVICE_HOST" in os.environ)):
        cfg.kube = True
    if cfg.manifests is None and not cfg.kube:
        raise click.UsageError("no source: pass --manifests DIR or --kube")
    from .datapath.loader import LoadError
    from .sources.kube import KubeError

    try:
        agent = Agent(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None
    agent.install_signal_handlers()
    try:
        agent.start()
    except (KubeError, LoadError) as e:  # one line naming the cause and the fix, exit 1: no traceback
        agent.close()
        raise click.ClickException(str(e)) from None
    try:
        agent.run()
    finally:
        agent.close()


@main.group("config")
def config_group() -> None:
    """The configuration: check a file, show the effective settings."""


@config_group.command("view")
@config_file_option
@output_option(default="yaml")
@click.pass_context
def config_view(ctx, config_path, output) -> None:
    """Print the effective configuration (file < NODEWIRE_* ), checked, as config-file keys."""
    cfg = load_config(ctx, config_path, {})
    try:
        configuration.check_values(cfg)
    except configuration.ConfigError as e:
        raise click.UsageError(str(e)) from None
    emit(configuration.as_file(cfg), output)


SHELLS = ("bash", "zsh", "fish")


@main.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell) -> None:
    """Print the shell completion script: `source <(nodewire completion bash)`, or save it to
    /etc/bash_completion.d/nodewire (zsh: a file in $fpath named _nodewire; fish: ~/.config/fish/completions)."""
    from click.shell_completion import get_completion_class

    comp = get_completion_class(shell)(main, {}, "nodewire", "_NODEWIRE_COMPLETE")
    click.echo(comp.source())


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
@output_option()
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
    modes = _frontend_modes(pin_dir)
    for r in rows:
        label = (names or {}).get(str(r["id"]), {})
        r["service"], r["port_name"] = label.get("service", ""), label.get("port_name", "")
        r["mode"] = modes(r["ip"], r["port"], r["protocol"])
    if output != "table":
        emit(rows, output)
        return
    click.echo(f"{'ID':>5}  {'FRONTEND':<30} {'PROTO':<5} {'MODE':<5} {'SERVICE':<30} BACKENDS")
    for r in rows:
        name = f"{r['service']}:{r['port_name']}" if r["port_name"] else r["service"]
        bes = ", ".join(b["address"] for b in r["backends"]) or "(none: connects refused)"
        click.echo(f"{r['id']:>5}  {r['frontend']:<30} {r['protocol']:<5} {r['mode'] or '-':<5} {name:<30} {bes}")


def _frontend_modes(pin_dir: str):
    """(ip, port, protocol) → how external traffic to that frontend reaches remote backends: "snat" or
    "dsr" (lb-mode, with hybrid = DSR for TCP only), None for a frontend tc does not serve (a ClusterIP:
    the socket path, no NAT on the wire)."""
    from .datapath.inspect import external_frontends
    from .export.northsouth import frontend_mode
    from .status import read_status

    external = external_frontends(pin_dir) or set()
    st = read_status(pin_dir)
    lb_mode = (((st.northsouth if st else None) or {}).get("dsr") or {}).get("lb_mode", "snat")
    return lambda ip, port, proto: frontend_mode(lb_mode, proto) if (ip, port, proto) in external else None


@main.command()
@config_file_option
@config_options("run")
@output_option()
@click.option("--timeout", "list_timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the API source's first complete list.")
@click.pass_context
def check(ctx, config_path, output, list_timeout, **kwargs) -> None:
    """Compare the kernel's service maps and hooks with the desired state computed from the same
    sources and settings as `nodewire run`. Exit status: 0 clean, 1 drift, 2 cannot check."""
    from .cli_check import check_node
    from .sources.kube import KubeError

    cfg = load_config(ctx, config_path, given_flags("run", kwargs))
    if not cfg.kube and (cfg.kubeconfig or cfg.api_server):
        cfg.kube = True
    if cfg.manifests is None and not cfg.kube:
        raise click.UsageError("no source: pass --manifests DIR or --kube (the same as for `nodewire run`)")
    from .status import read_status

    st = read_status(cfg.pin_dir)
    try:
        rep = check_node(cfg, list_timeout, st.cgroup if st else None)
    except (FileNotFoundError, KubeError, OSError, ValueError) as e:
        click.echo(f"Error: cannot check: {e}", err=True)
        ctx.exit(2)
    if output != "table":
        emit(rep.as_dict(), output)
    else:
        for d in rep.drift:
            click.echo(str(d))
        for r in rep.refused:
            click.echo(f"refused (not drift): {r}")
        counts = ", ".join(f"{n} {k}" for k, n in rep.counts().items() if n) or "no drift"
        click.echo(f"{'clean' if rep.clean else 'DRIFT'}: {rep.frontends_checked} frontends wanted, "
                   f"{rep.kernel_frontends} in the kernel, {rep.kernel_backends} backends; {counts} "
                   f"({rep.seconds:.2f}s)")
    ctx.exit(0 if rep.clean else 1)


@main.command()
@pin_dir_option
@output_option()
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
    if output != "table":
        emit(dict(asdict(st), agent_running=running, attached=attached), output)
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
    if st.northsouth:
        from .status import northsouth_lines

        for line in northsouth_lines(st.northsouth):
            click.echo(line)


@main.command()
@pin_dir_option
@click.option("--cgroup", type=click.Path(file_okay=False), help="cgroup to detach from [default: the one in the agent's status].")
@click.option("--kube-proxy", "kube_proxy", is_flag=True,
              help="Instead: remove kube-proxy's leftovers (KUBE-* chains and jumps, iptables legacy and nft, "
                   "IPv4 and IPv6; the kube-proxy nftables tables), as `kube-proxy --cleanup` does.")
def cleanup(pin_dir, cgroup, kube_proxy) -> None:
    """Detach nodewire's programs and unpin its maps (or, with --kube-proxy, remove kube-proxy's rules)."""
    import shutil

    if kube_proxy:
        _cleanup_kube_proxy()
        return

    from .datapath.attach import detach_loaded, detect_cgroup2_root
    from .datapath.loader import remove_pins

    from .status import read_status

    st = read_status(pin_dir)
    cg = cgroup or (st.cgroup if st else None) or detect_cgroup2_root()
    n = detach_loaded(cg, pin_dir) if os.path.isdir(cg) else 0
    devices = list(((st.northsouth if st else None) or {}).get("devices") or {})
    if devices:  # tc filters on the node devices (in this network namespace); the pins go regardless
        from .datapath.nodeport import detach
        try:
            n += detach(devices)
        except Exception as e:  # noqa: BLE001 - a device gone with its namespace must not keep the pins
            click.echo(f"could not detach the tc programs from {', '.join(devices)}: {e}", err=True)
    removed = remove_pins(pin_dir)
    shutil.rmtree(state_dir_for(pin_dir), ignore_errors=True)
    click.echo(f"detached {n} programs from {cg}; unpinned {removed} maps, programs and links from {pin_dir}")


def _cleanup_kube_proxy() -> None:
    from .kube_proxy_cleanup import cleanup_kube_proxy

    try:
        rep = cleanup_kube_proxy()
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    for where, chains in rep.removed_chains.items():
        click.echo(f"{where}: removed {len(chains)} chains, {rep.removed_jumps.get(where, 0)} jumps")
    for where, n in rep.removed_jumps.items():
        if where not in rep.removed_chains:
            click.echo(f"{where}: removed {n} jumps")
    for t in rep.removed_nft_tables:
        click.echo(f"nft: removed table {t}")
    for where, chains in rep.kept_referenced.items():
        click.echo(f"{where}: kept {', '.join(chains)} (a chain that is not kube-proxy's jumps to it)")
    if rep.skipped:
        click.echo(f"not available here: {'; '.join(rep.skipped)}")
    if not rep.changed:
        click.echo("no kube-proxy rules found")


# Commands that live next to their feature, registered here so `nodewire --help` lists them all.
from .observe.cli import latency, top  # noqa: E402
from .rdma.cli import rdma as rdma_command, topo  # noqa: E402
from .cni.cli import cni as cni_command  # noqa: E402

for _command in (top, latency, topo, rdma_command, cni_command):
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
