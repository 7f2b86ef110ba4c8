"""`nodewire cni install|uninstall|list`: the node side of the chained plugin."""
from __future__ import annotations

import click

from ..output import emit, output_option


@click.group("cni")
def cni() -> None:
    """The chained CNI plugin: install it on the node, list the pods it told the agent about."""


def _cfg(ctx, config_path, flags):
    from ..cli_options import load_config
    return load_config(ctx, config_path, flags)


def _options(fn):
    from ..cli_options import config_file_option, config_options
    pin_dir = click.option("--pin-dir", default=None,
                           help="The agent's pin dir, which names its API socket [default: the config's pin-dir].")
    return config_file_option(pin_dir(config_options("cni")(fn)))


@cni.command()
@_options
@click.option("--python", "python", default=None, hidden=True,
              help="Ignored: nodewire-cni is a static executable now (kept so existing scripts still run).")
@click.option("--socket", "socket_path", default=None, help="The agent API socket the plugin calls [default: the agent's].")
@click.pass_context
def install(ctx, config_path, pin_dir, python, socket_path, **kwargs) -> None:
    """Copy nodewire-cni into the CNI bin dir and chain it last in the node's primary .conflist."""
    from ..cli_options import given_flags
    from .install import InstallError, PluginSettings, install_binary, install_conf

    flags = dict(given_flags("cni", kwargs), **({"pin-dir": pin_dir} if pin_dir else {}))
    cfg = _cfg(ctx, config_path, flags)
    settings = PluginSettings(socket=socket_path or cfg.api_socket_path, fail_open=cfg.cni_fail_open,
                              log_file=cfg.cni_log_file)
    try:
        binary = install_binary(cfg.cni_bin_dir)
        conf = install_conf(cfg.cni_conf_dir, settings)
    except (InstallError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"installed {binary}; chained nodewire-cni last in {conf} (original kept as {conf.name}.nodewire-orig)")


@cni.command()
@_options
@click.pass_context
def uninstall(ctx, config_path, pin_dir, **kwargs) -> None:
    """Restore the node's original network configuration and remove nodewire-cni."""
    from ..cli_options import given_flags
    from .install import InstallError, uninstall as do_uninstall

    cfg = _cfg(ctx, config_path, dict(given_flags("cni", kwargs), **({"pin-dir": pin_dir} if pin_dir else {})))
    try:
        done = do_uninstall(cfg.cni_conf_dir, cfg.cni_bin_dir)
    except (InstallError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo("\n".join(done) or "nothing to uninstall")


@cni.command("list")
@click.option("--socket", "socket_path", default=None, help="The agent API socket [default: from --pin-dir].")
@click.option("--pin-dir", default=None, help="The agent's pin dir (finds its socket).")
@output_option()
def list_pods(socket_path, pin_dir, output) -> None:
    """Pods the running agent knows from CNI calls and from its start-up netns scan."""
    from ..api import ApiError, call
    from ..config import DEFAULT_PIN_DIR, AgentConfig

    path = socket_path or AgentConfig(pin_dir=pin_dir or DEFAULT_PIN_DIR).api_socket_path
    try:
        rows = call(path, "cni.list")
    except (OSError, ApiError) as e:
        raise click.ClickException(f"agent API {path}: {e}") from None
    if output != "table":
        emit(rows, output)
        return
    click.echo(f"{'POD':<40} {'SOURCE':<10} {'HOST VETH':<16} {'IPS':<30} CONTAINER")
    for r in rows:
        click.echo(f"{r['pod']:<40} {r['source']:<10} {r.get('host_veth') or '-':<16} "
                   f"{','.join(r.get('ips', ())) or '-':<30} {r.get('container_id', '-')[:12]}")
