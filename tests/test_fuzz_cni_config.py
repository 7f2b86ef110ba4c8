"""Fuzzed CNI plugin input (stdin network configuration and CNI_* environment) and config files /
NODEWIRE_* variables (hypothesis). The plugin always answers with a CNI result or a CNI error object
(code + msg), never a traceback; the config loader raises only ConfigError, naming the key."""
from __future__ import annotations

import json
import os
import tempfile

import yaml
from hypothesis import given, strategies as st

from agent import config as configuration
from agent.cni import plugin
from tests.fuzz_strategies import JSON

KEYS = sorted(configuration.keys())
CNI_ENV = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]
TEXT = st.text(max_size=60) | st.sampled_from(["", "ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "/proc/1/ns/net",
                                              "/nonexistent", "eth0", "K8S_POD_NAME=p;K8S_POD_NAMESPACE=n;;=;x"])
CONF = st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    JSON.map(json.dumps),
    st.fixed_dictionaries({"cniVersion": st.sampled_from(list(plugin.SUPPORTED_VERSIONS)) | JSON},
                          optional={"name": JSON, "type": JSON, "failOpen": JSON, "socket": JSON, "timeout": JSON,
                                    "logFile": JSON, "prevResult": JSON, "runtimeConfig": JSON}).map(json.dumps),
)


@given(env=st.fixed_dictionaries({}, optional={k: TEXT for k in CNI_ENV}), stdin=CONF,
       command=st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "bogus", ""]))
def test_cni_plugin_answers_every_input_with_a_result_or_a_cni_error(env, stdin, command, monkeypatch):
    with tempfile.TemporaryDirectory() as d:
        for k in CNI_ENV:
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            if "\0" not in v:
                monkeypatch.setenv(k, v)
        if stdin.startswith("{") and '"socket"' not in stdin:  # never the real agent's socket
            try:
                conf = json.loads(stdin)
                if isinstance(conf, dict):
                    conf["socket"], conf["logFile"] = os.path.join(d, "none.sock"), os.path.join(d, "log")
                    stdin = json.dumps(conf)
            except ValueError:
                pass
        code, out = plugin.run(command, stdin)
        assert code in (0, 1)
        if code == 1:
            assert isinstance(out["code"], int) and isinstance(out["msg"], str) and out["msg"], out
        json.dumps(out)  # what the runtime reads is JSON


@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), JSON | st.text(max_size=20), max_size=6)
       | JSON)
def test_config_file_of_any_content_is_loaded_or_refused_by_key(doc):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.yaml")
        with open(path, "w") as f:
            f.write(yaml.safe_dump(doc))
        try:
            cfg = configuration.load(path, {}, {}, path_required=True)
            configuration.check_values(cfg)
        except configuration.ConfigError as e:
            assert e.message and (path in str(e) or e.key == "config"), e
            assert str(e).startswith(f"config key {e.key} (") or str(e).startswith(f"config key {e.key!r} ("), e


def test_regression_an_empty_or_spaced_key_is_shown_quoted(tmp_path):
    """Found by the fuzzer: `'': 1` in the file said "config key  (file …): unknown key"."""
    p = tmp_path / "c.yaml"
    p.write_text("'': 1\n")
    try:
        configuration.load(str(p), {}, {}, path_required=True)
    except configuration.ConfigError as e:
        assert str(e).startswith("config key '' (file "), e
    else:
        raise AssertionError("an empty key was accepted")


@given(st.dictionaries(st.sampled_from(KEYS), st.text(max_size=30).filter(lambda s: "\0" not in s), max_size=4))
def test_nodewire_variables_of_any_value_are_loaded_or_refused_by_key(values):
    env = {configuration.keys()[k].env: v for k, v in values.items()}
    try:
        cfg = configuration.load(None, {}, env)
        configuration.check_values(cfg)
    except configuration.ConfigError as e:
        assert e.key in values and e.message, e


def test_regression_null_and_non_finite_numbers_are_refused_by_key(tmp_path):
    """Found by the fuzzer: `healthz-port:` (null) passed loading and crashed the range check with a
    TypeError; `poll-interval: .nan` was accepted."""
    for text, key in (("healthz-port:\n", "healthz-port"), ("poll-interval: .nan\n", "poll-interval"),
                      ("max-series: .inf\n", "max-series")):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        try:
            configuration.check_values(configuration.load(str(p), {}, {}, path_required=True))
        except configuration.ConfigError as e:
            assert e.key == key, e
        else:
            raise AssertionError(f"{text!r} was accepted")
