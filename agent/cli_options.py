"""Click options made from the one config table (agent/config.py), shared by every command that
takes config keys (`run`, `check`, `cni install`, …): flags, the config file option, precedence."""
from __future__ import annotations

import logging
import os

import click

from . import config as configuration
from .config import DEFAULT_CONFIG_FILE, DEFAULT_PIN_DIR

pin_dir_option = click.option("--pin-dir", default=DEFAULT_PIN_DIR, show_default=True,
                              help="bpffs directory where nodewire pins its maps.")
config_file_option = click.option(
    "--config", "config_path", envvar="NODEWIRE_CONFIG", default=DEFAULT_CONFIG_FILE, show_default=True,
    type=click.Path(dir_okay=False), help="YAML config file; keys are the flags without -- (see `nodewire config view`).")


def config_options(command: str):
    """The flags of every config key of `command`, from the one table in config.py. Defaults are not
    set here (None): a flag only wins when given, so the file and NODEWIRE_* show through."""
    def decorate(fn):
        for k in reversed(list(configuration.keys().values())):
            if k.command != command:
                continue
            hint = f" [default: {k.default!r}; env {k.env}]" if k.default not in (None, ()) else f" [env {k.env}]"
            param = k.name.replace("-", "_")
            if k.kind == "bool":
                opt = click.option(f"--{k.name}/--no-{k.name}", param, default=None, help=k.help + hint)
            elif k.kind in ("list", "mapsizes"):
                opt = click.option(f"--{k.name}", param, multiple=True, help=k.help + hint + " (repeatable)",
                                   metavar="MAP=N" if k.kind == "mapsizes" else "VALUE")
            else:
                t = {"int": int, "float": float}.get(k.kind, click.Choice(k.choices) if k.choices else str)
                opt = click.option(f"--{k.name}", param, type=t, default=None, help=k.help + hint)
            fn = opt(fn)
        return fn
    return decorate


def given_flags(command: str, kwargs: dict) -> dict:
    """The config flags actually given on the command line, by key name."""
    out = {}
    for k in configuration.keys().values():
        v = kwargs.get(k.name.replace("-", "_"))
        if k.command == command and v is not None and v != ():
            out[k.name] = v
    return out


def load_config(ctx: click.Context, config_path: str, flags: dict) -> configuration.AgentConfig:
    """File < NODEWIRE_* < flags; a bad value is a usage error naming the key."""
    from click.core import ParameterSource

    explicit = ctx.get_parameter_source("config_path") in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    log_flag = (ctx.obj or {}).get("log_level")
    if log_flag:
        flags = dict(flags, **{"log-level": log_flag})
    try:
        cfg = configuration.load(config_path, flags, os.environ, path_required=explicit)
    except configuration.ConfigError as e:
        raise click.UsageError(str(e)) from None
    logging.getLogger().setLevel(cfg.log_level.upper())
    return cfg
