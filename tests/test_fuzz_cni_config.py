"""Fuzzed CNI plugin input (stdin network configuration and CNI_* environment) and config files /
NODEWIRE_* variables (hypothesis). The plugin (the static binary, run as a runtime runs it) always
answers with a CNI result or a CNI error object (code + msg), never a crash, and passes prevResult
through as JSON reads it; the config loader raises only ConfigError, naming the key."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import yaml
from hypothesis import given, strategies as st

from agent import config as configuration
from agent.cni.build import ensure
from tests.fuzz_strategies import JSON

PLUGIN = str(ensure())
SUPPORTED_VERSIONS = json.loads(subprocess.run([PLUGIN], env={"CNI_COMMAND": "VERSION"}, capture_output=True,
                                               check=True).stdout)["supportedVersions"]
KEYS = sorted(configuration.keys())
CNI_ENV = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]
TEXT = st.text(max_size=60) | st.sampled_from(["", "ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "/proc/1/ns/net",
                                              "/nonexistent", "eth0", "K8S_POD_NAME=p;K8S_POD_NAMESPACE=n;;=;x"])
CONF = st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    JSON.map(json.dumps),
    st.fixed_dictionaries({"cniVersion": st.sampled_from(SUPPORTED_VERSIONS) | JSON},
                          optional={"name": JSON, "type": JSON, "failOpen": JSON, "socket": JSON, "timeout": JSON,
                                    "logFile": JSON, "prevResult": JSON, "runtimeConfig": JSON}).map(json.dumps),
)


def run_plugin(command: str, stdin: bytes, env: dict) -> tuple[int, dict | None]:
    r = subprocess.run([PLUGIN], input=stdin, capture_output=True, env={**env, "CNI_COMMAND": command}, timeout=30)
    assert r.returncode in (0, 1), r  # never a signal (a crash) or another code
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None  # what the runtime reads is JSON


@given(env=st.fixed_dictionaries({}, optional={k: TEXT for k in CNI_ENV}), stdin=CONF,
       command=st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "bogus", ""]))
def test_cni_plugin_answers_every_input_with_a_result_or_a_cni_error(env, stdin, command):
    with tempfile.TemporaryDirectory() as d:
        env = {k: v for k, v in env.items() if "\0" not in v}
        if stdin.startswith("{") and '"socket"' not in stdin:  # never the real agent's socket
            try:
                conf = json.loads(stdin)
                if isinstance(conf, dict):
                    conf["socket"], conf["logFile"] = os.path.join(d, "none.sock"), os.path.join(d, "log")
                    stdin = json.dumps(conf)
            except ValueError:
                pass
        code, out = run_plugin(command, stdin.encode("utf-8", "surrogateescape"), env)
        if code == 1:
            assert isinstance(out["code"], int) and isinstance(out["msg"], str) and out["msg"], out
        elif command == "ADD":
            assert out == dict(json.loads(stdin)["prevResult"], cniVersion=json.loads(stdin)["cniVersion"])


@given(stdin=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
       command=st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "GC"]))
def test_any_bytes_on_stdin_get_a_cni_answer(stdin, command):
    """Not UTF-8, lone surrogates written raw, truncated escapes: a CNI error (or a result), never a crash."""
    code, out = run_plugin(command, stdin, {"CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "/nonexistent"})
    if code == 0:  # only a configuration it can read gets a result
        assert json.loads(stdin)["cniVersion"] in SUPPORTED_VERSIONS
    else:
        assert isinstance(out["code"], int) and out["msg"], out


@given(prev=st.dictionaries(st.text(max_size=10), JSON, max_size=6), version=st.sampled_from(SUPPORTED_VERSIONS),
       spaced=st.booleans())
def test_any_prevresult_passes_through_add_as_json_reads_it(prev, version, spaced):
    """The reader and writer agree with json: whatever the primary plugin printed reaches the runtime
    unchanged (bar cniVersion), with the agent down and failOpen."""
    with tempfile.TemporaryDirectory() as d:
        conf = {"cniVersion": version, "name": "n", "socket": os.path.join(d, "none.sock"),
                "logFile": os.path.join(d, "log"), "prevResult": prev}
        text = json.dumps(conf, indent=2 if spaced else None, ensure_ascii=spaced)
        code, out = run_plugin("ADD", text.encode("utf-8", "surrogatepass"),
                               {"CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net"})
        if not spaced and any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
            assert code == 1 and out["code"] == 6  # a lone surrogate written raw is not UTF-8: refused
            return
        assert code == 0 and out == dict(prev, cniVersion=version), out


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


ADDRESS = st.sampled_from(["10.1.0.5/24", "fd00::5/64", "10.1.0.5", "not-an-ip", ""]) | JSON
IPS = st.lists(st.fixed_dictionaries({}, optional={"address": ADDRESS, "interface": st.integers(-3, 3) | JSON,
                                                   "gateway": JSON}) | JSON, max_size=3) | JSON
IFACES = st.lists(st.fixed_dictionaries({}, optional={"name": st.sampled_from(["eth0", "veth1", ""]) | JSON,
                                                      "sandbox": JSON}) | JSON, max_size=3) | JSON


@given(ips=IPS, ifaces=IFACES, name=JSON, command=st.sampled_from(["ADD", "CHECK", "DEL", "GC"]),
       args=st.text(max_size=40).filter(lambda a: "\0" not in a))
def test_the_agent_answers_whatever_the_plugin_forwards(ips, ifaces, name, command, args):
    """Through the binary to the agent's real API server and CNI side: whatever the primary plugin put
    in prevResult, the agent answers (a named bad_request is code 100), never drops the call (11)."""
    from agent.api import ApiServer
    from agent.cni.pods import CniPods
    from agent.state import ClusterState
    with tempfile.TemporaryDirectory() as d:
        pods = CniPods(ClusterState("n"), "n", os.path.join(d, "rec"), netns_dir=os.path.join(d, "ns"))
        os.makedirs(pods.record_dir)
        api = ApiServer(os.path.join(d, "api.sock"), allowed_uids=(os.getuid(),)).start()
        pods.register(api)
        try:
            conf = {"cniVersion": "1.0.0", "name": name, "socket": api.path, "failOpen": False,
                    "logFile": os.path.join(d, "log"),
                    "prevResult": {"ips": ips, "interfaces": ifaces}, "cni.dev/valid-attachments": ips}
            env = {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/nonexistent", "CNI_ARGS": args}
            code, out = run_plugin(command, json.dumps(conf).encode(), env)
            if command == "GC":  # GC always succeeds; what the agent said is in the plugin's log
                log = os.path.join(d, "log")
                logged = open(log).read() if os.path.exists(log) else ""
                assert not re.search(r"cni\.gc: [A-Z]\w*(Error|Exception): ", logged), logged
            if code == 1:  # a named refusal: code 3, or 100 with the agent's bad_request (never "internal")
                assert out["code"] in (3, 100), out
                assert out["code"] == 3 or out.get("details") == "bad_request" or (  # ADD's message has no details
                    command == "ADD" and not re.search(r"cni\.add: [A-Z]\w*(Error|Exception): ", out["msg"])), out
        finally:
            api.close()
