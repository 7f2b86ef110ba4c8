"""Machine-readable output of every command that has one: `-o json` and `-o yaml`, same data."""
from __future__ import annotations

import json

import click


def output_option(*extra: str, default: str = "table", human: str | None = "table"):
    """-o/--output with json and yaml next to the command's human format(s)."""
    choices = [c for c in (human, *extra) if c] + ["json", "yaml"]
    return click.option("-o", "--output", type=click.Choice(choices), default=default, show_default=True)


def render(data, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2)
    if fmt == "yaml":
        import yaml
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")
    raise ValueError(f"output format {fmt!r}")


def emit(data, fmt: str) -> None:
    click.echo(render(data, fmt))
