"""Configuration: file < NODEWIRE_* < flags, one table for all three, errors naming the key and source."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from agent import config as c
from agent.cli import main

NO_ENV = {}


def write(tmp_path, text: str):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return str(p)


def test_precedence_file_then_env_then_flag(tmp_path):
    path = write(tmp_path, "max-series: 10\nmetrics-addr: ':1000'\nobserve: false\n")
    cfg = c.load(path, {}, NO_ENV)
    assert (cfg.max_series, cfg.metrics_addr, cfg.observe) == (10, ":1000", False)
    cfg = c.load(path, {}, {"NODEWIRE_MAX_SERIES": "20", "NODEWIRE_OBSERVE": "true"})
    assert (cfg.max_series, cfg.metrics_addr, cfg.observe) == (20, ":1000", True)
    cfg = c.load(path, {"max-series": 30}, {"NODEWIRE_MAX_SERIES": "20"})
    assert cfg.max_series == 30


def test_every_key_derives_flag_env_and_file_name():
    ks = c.keys()
    assert ks["max-series"].env == "NODEWIRE_MAX_SERIES" and ks["max-series"].attr == "max_series"
    assert ks["map-size"].attr == "sizes" and ks["peer-cidr"].attr == "peer_cidrs"
    # the documented default port is the code's, and it is not Hubble's
    assert c.AgentConfig().metrics_addr == ":9966" != ":9965"


def test_list_and_map_keys_from_each_layer(tmp_path):
    path = write(tmp_path, "map-size: {services: 4096}\npeer-cidr: [10.0.0.0/8]\n")
    cfg = c.load(path, {}, {"NODEWIRE_MAP_SIZE": "backends=2048"})
    assert (cfg.sizes.services, cfg.sizes.backends) == (1 << 20, 2048)  # env replaces the file's value
    cfg = c.load(path, {"map-size": ("services=8",), "peer-cidr": ("192.168.0.0/16", "fc00::/7")}, NO_ENV)
    assert cfg.sizes.services == 8 and cfg.peer_cidrs == ("192.168.0.0/16", "fc00::/7")
    assert c.load(None, {}, {"NODEWIRE_PEER_CIDR": "10.1.0.0/16, 10.2.0.0/16"}).peer_cidrs == ("10.1.0.0/16", "10.2.0.0/16")


@pytest.mark.parametrize("text, env, message", [
    ("metric-addr: ':1'\n", {}, "config key metric-addr (file {p}): unknown key (did you mean metrics-addr?)"),
    ("max-series: lots\n", {}, "config key max-series (file {p}): 'lots' is not a number (int)"),
    ("observe: maybe\n", {}, "config key observe (file {p}): 'maybe' is not a boolean (true/false)"),
    ("map-size: {servics: 3}\n", {}, "config key map-size (file {p}): unknown map 'servics'"),
    ("log-level: loud\n", {}, "config key log-level (file {p}): 'loud' is not one of debug, info, warning, error"),
    ("", {"NODEWIRE_MAX_SERIES": "x"}, "config key max-series (env NODEWIRE_MAX_SERIES): 'x' is not a number (int)"),
    ("", {"NODEWIRE_NODENAME": "x"}, "config key nodename (env NODEWIRE_NODENAME): unknown key (did you mean node-name?)"),
    ("- a\n", {}, "config key - (file {p}): the config file is a mapping of key: value"),
])
def test_bad_keys_and_values_name_the_key_and_where(tmp_path, text, env, message):
    path = write(tmp_path, text)
    with pytest.raises(c.ConfigError) as e:
        c.load(path, {}, env)
    assert str(e.value).startswith(message.format(p=path))


@pytest.mark.parametrize("text, message", [
    ("max-series: 0\n", "config key max-series (file {p}): 0 must be at least 1"),
    ("metrics-addr: 'nine'\n", "config key metrics-addr (file {p}): 'nine' is not HOST:PORT"),
    ("pin-dir: /tmp/x\n", "config key pin-dir (file {p}): /tmp/x must be under /sys/fs/bpf"),
    ("peer-cidr: [10.0.0.0/33]\n", "config key peer-cidr (file {p}): '10.0.0.0/33'"),
    ("api-server: 10.0.0.1:6443\n", "config key api-server (file {p}): '10.0.0.1:6443' is not an http(s) URL"),
    ("kube: true\nmanifests: /tmp\n", "config key manifests (file {p}): manifests and kube are two sources"),
])
def test_value_rules_name_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(c.ConfigError) as e:
        c.check_values(c.load(path, {}, NO_ENV))
    assert str(e.value).startswith(message.format(p=path))


def test_config_view_round_trips_through_the_file_reader(tmp_path):
    path = write(tmp_path, "max-series: 7\nmap-size: {services: 64}\napi-server: https://10.0.0.1:6443\n")
    r = CliRunner().invoke(main, ["config", "view", "--config", path, "-o", "yaml"], env={"NODEWIRE_RDMA": "false"})
    assert r.exit_code == 0, r.output
    again = write(tmp_path, r.output)
    cfg = c.load(again, {}, NO_ENV)
    assert (cfg.max_series, cfg.sizes.services, cfg.api_server, cfg.rdma) == (7, 64, "https://10.0.0.1:6443", False)
    assert json.loads(CliRunner().invoke(main, ["config", "view", "--config", path, "-o", "json"]).output)["max-series"] == 7


def test_explicit_config_file_must_exist_but_the_default_may_not(tmp_path):
    r = CliRunner().invoke(main, ["config", "view", "--config", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "does not exist" in r.output
    assert c.load(str(tmp_path / "nope.yaml"), {}, NO_ENV).max_series == 10000  # default path, absent: defaults


def test_run_refuses_a_bad_config_before_touching_the_datapath(tmp_path):
    path = write(tmp_path, "manifests: /tmp\nmax-series: -1\n")
    r = CliRunner().invoke(main, ["run", "--config", path], env={"KUBERNETES_SERVICE_HOST": None})
    assert r.exit_code == 2 and "config key max-series" in r.output
    r = CliRunner().invoke(main, ["run", "--config", path, "--max-series", "5", "--manifests", str(tmp_path / "no")],
                           env={"KUBERNETES_SERVICE_HOST": None})
    assert r.exit_code == 2 and f"config key manifests (flag --manifests): {tmp_path / 'no'} is not a directory" in r.output


def test_version_completion_and_yaml_output():
    assert CliRunner().invoke(main, ["version"]).output.startswith("nodewire 0.")
    assert CliRunner().invoke(main, ["--version"]).output.startswith("nodewire 0.")
    for shell in ("bash", "zsh", "fish"):
        out = CliRunner().invoke(main, ["completion", shell]).output
        assert "_NODEWIRE_COMPLETE" in out, shell
    # every command with -o json also has -o yaml
    import click

    def walk(cmd, path=()):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + (name,))
        else:
            yield path, cmd
    for path, cmd in walk(main):
        for p in cmd.params:
            if "--output" in getattr(p, "opts", ()) and isinstance(p.type, click.Choice) and "json" in p.type.choices:
                assert "yaml" in p.type.choices, " ".join(path)


def test_config_file_keys_documented_in_readme_exist():
    """README's config table lists real keys with the code's defaults."""
    from pathlib import Path
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:4] for line in section.splitlines() if line.startswith("| `")]
    assert rows
    ks = c.keys()
    listed = [name.strip().strip("`") for name, _e, _d in rows]
    assert [k for k in ks if k not in listed] == [], "README's Configuration table misses these keys"
    for name, _env, default in rows:
        name = name.strip().strip("`")
        assert name in ks, name
        shown = default.strip().strip("`")
        if shown.startswith("("):  # computed at start-up, described in words
            continue
        assert yaml.safe_load(shown or "null") == (list(ks[name].default) if isinstance(ks[name].default, tuple)
                                                   else ks[name].default), name
