"""deploy/: every kustomization renders with kubectl, validates strictly against the Kubernetes 1.34
schemas, and runs only commands, flags and config keys nodewire has; the ConfigMap's config file goes
through the agent's own validator."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from agent import config as c
from agent.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
KUBECTL = shutil.which("kubectl")
VALIDATE = Path(sys.executable).with_name("kubernetes-validate")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")


def render(d: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(d)], capture_output=True, text=True)
    assert out.returncode == 0, f"{d}: {out.stderr}"
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def test_there_is_a_base_and_a_kube_proxy_replacement_overlay():
    assert {d.name for d in KUSTOMIZATIONS} >= {"daemonset", "kube-proxy-replacement"}


@pytest.mark.parametrize("d", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_renders_and_validates_strictly_against_1_34(d, tmp_path):
    objs = render(d)
    f = tmp_path / "all.yaml"
    f.write_text(yaml.safe_dump_all(objs))
    out = subprocess.run([str(VALIDATE), "-k", "1.34", "--strict", str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed for resource") == len(objs)


def _daemonset(objs):
    return next(o for o in objs if o["kind"] == "DaemonSet")


def _configmap(objs, ds):
    name = next(v["configMap"]["name"] for v in ds["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    return next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name)


@pytest.mark.parametrize("d", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_daemonset_shape(d):
    objs = render(d)
    ds = _daemonset(objs)
    spec = ds["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["dnsPolicy"] == "Default"  # not the cluster DNS ClusterIP nodewire serves
    agent = next(x for x in spec["containers"] if x["name"] == "agent")
    assert agent["startupProbe"]["httpGet"]["path"] == "/healthz"
    port = c.DEFAULT_METRICS_PORT
    assert agent["ports"][0]["containerPort"] == port
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert [x["command"][:3] for x in spec["initContainers"]] == [["nodewire", "cni", "install"]]
    role = next(o for o in objs if o["kind"] == "ClusterRole")
    # what the kube source does: list and watch; one write, the merge patch of its Node's DSR annotation
    reads = [r for r in role["rules"] if set(r["verbs"]) == {"list", "watch"}]
    writes = [r for r in role["rules"] if r not in reads]
    assert [(w["apiGroups"], w["resources"], w["verbs"]) for w in writes] == [([""], ["nodes"], ["patch"])]
    # exactly the resources agent/sources/kube/ lists and watches, no more
    import re
    src = "".join(p.read_text() for p in sorted((ROOT / "agent" / "sources" / "kube").glob("*.py")))
    watched = {(g or "", r) for r, g in re.findall(r'WatchSpec\("(\w+)", "/apis?/(?:([\w.]+)/)?v1/', src)}
    granted = {(g, r) for rule in reads for g in rule["apiGroups"] for r in rule["resources"]}
    assert watched and granted == watched
    assert re.findall(r'client\.patch\(f"/api/v1/(\w+)/', src) == ["nodes"]


@pytest.mark.parametrize("d", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_commands_use_only_flags_that_exist_and_the_config_is_valid(d, tmp_path):
    objs = render(d)
    ds = _daemonset(objs)
    spec = ds["spec"]["template"]["spec"]
    for ctr in spec["initContainers"] + spec["containers"]:
        argv = ctr["command"][1:] + ctr.get("args", [])
        assert ctr["command"][0] == "nodewire"
        # click parses every option before acting on --help: an unknown flag is exit code 2
        r = CliRunner().invoke(main, [*argv, "--help"])
        assert r.exit_code == 0, f"{ctr['name']}: {argv}: {r.output}"
    text = _configmap(objs, ds)["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = c.load(str(path), {}, {})
    c.check_values(cfg)
    assert cfg.kube and cfg.metrics_addr == f":{c.DEFAULT_METRICS_PORT}"
    if d.name == "kube-proxy-replacement":
        assert cfg.api_server and cfg.api_server.startswith("https://")
        assert cfg.devices  # no kube-proxy: nodewire serves the NodePorts


def test_config_keys_of_the_kube_proxy_replacement_match_the_vagrant_control_plane():
    cfg = yaml.safe_load((DEPLOY / "kube-proxy-replacement" / "config.yaml").read_text())
    vagrantfile = (ROOT / "Vagrantfile").read_text()
    assert f'CP_IP = "{cfg["api-server"].split("//")[1].split(":")[0]}"' in vagrantfile
