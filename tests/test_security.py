"""SECURITY.md's guarantees, each checked: no shell commands, dropped capabilities, no world-writable
pins or state files, no secrets on the metrics port."""
from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from agent.privileges import KEEP, keep_mask
from tests.conftest import wait_for
from tests.manifests import endpoint_slice, service, write

AGENT = Path(__file__).resolve().parents[1] / "agent"
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}


def _shell_uses(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
        if owner == "os" and (name in ("system", "popen") or name.startswith(("exec", "spawn"))):
            found.append((node.lineno, f"os.{name}"))
        if owner == "subprocess" and name in SUBPROCESS_CALLS:
            if name in ("getoutput", "getstatusoutput"):
                found.append((node.lineno, f"subprocess.{name} runs a shell"))
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append((node.lineno, "shell=True"))
            if node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                found.append((node.lineno, "command given as a string, not an argv list"))
    return found


def test_auditor_flags_shell_commands():
    bad = ast.parse("import os, subprocess\nos.system('x')\nsubprocess.run(f'ip {a}', shell=True)\n"
                    "subprocess.run(['ip', a])\n")
    assert _shell_uses(bad) == [(2, "os.system"), (3, "shell=True"), (3, "command given as a string, not an argv list")]


def test_no_shell_commands_in_the_agent():
    found = {}
    for path in AGENT.rglob("*.py"):
        uses = _shell_uses(ast.parse(path.read_text(), str(path)))
        if uses:
            found[str(path.relative_to(AGENT))] = uses
    assert found == {}


def test_metrics_endpoint_binds_where_configured_and_shows_no_token(tmp_path):
    from agent.export.telemetry import start_telemetry
    from agent.sources.kube import Backoff, KubeConfig, KubeSource
    from agent.state import ClusterState
    from nodewire_dev.fake_apiserver import FakeApiServer

    secret = "tok-" + os.urandom(8).hex()
    (tmp_path / "token").write_text(secret)
    assert start_telemetry(None).server is None  # no --metrics-addr: nothing listens
    api = FakeApiServer(tokens={"someone-else": "x"}).start()  # our token is refused: 401 in the status
    tel = start_telemetry("127.0.0.1:0")
    src = KubeSource(KubeConfig(api.url, f"token file {tmp_path / 'token'}", token_file=str(tmp_path / "token")),
                     ClusterState(), node="n1", backoff=lambda: Backoff(initial=0.02, maximum=0.1))
    try:
        assert tel.server.server_address[0] == "127.0.0.1"
        src.register_metrics(tel.meter())
        src.start()
        wait_for(lambda: src.status()["last_error"], what="the 401 in the source's status")
        body = urllib.request.urlopen(f"http://127.0.0.1:{tel.port}/metrics").read().decode()
        status = json.dumps(src.status())
        assert "nodewire_kube_watch_connected" in body and "401" in status
        assert secret not in body and secret not in status
    finally:
        src.stop()
        tel.shutdown()
        api.stop()


@pytest.mark.root
def test_capability_drop_keeps_only_what_the_agent_needs(tmp_path):
    code = ("import json, os; from agent.privileges import drop; r = drop(); "
            f"open({str(tmp_path / 'f')!r}, 'w').close()\n"
            "try:\n    os.chown(%r, 1, 1); chown = 'ok'\nexcept PermissionError:\n    chown = 'EPERM'\n"
            "st = dict(l.split(':\\t') for l in open('/proc/self/status').read().splitlines() if l.startswith('Cap'))\n"
            "print(json.dumps({'r': r, 'chown': chown, 'st': st}))") % str(tmp_path / "f")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=AGENT.parent).stdout)
    assert out["r"]["error"] is None
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(out["st"][field], 16) & ~keep_mask() == 0, field
    assert int(out["st"]["CapEff"], 16) & (1 << 39)  # CAP_BPF is still there
    assert out["chown"] == "EPERM"  # CAP_CHOWN is gone


@pytest.mark.root
def test_running_agent_has_dropped_capabilities_and_writes_nothing_world_writable(sandbox, agent_factory, tmp_path):
    client, b1 = sandbox.add_pod("sec-client"), sandbox.add_pod("sec-b1")
    b1.serve(tcp_ports=[8080])
    write(tmp_path / "svc.json", service("sec", ["10.96.40.1"]), endpoint_slice("sec", [b1.ip4]))
    old = os.umask(0)  # the agent must not rely on the umask it is given
    try:
        agent = agent_factory(tmp_path, pin_suffix="-sec").start()
    finally:
        os.umask(old)
    assert client.probe("tcp", "10.96.40.1", 80)["replies"] == {"sec-b1": 1}  # works without the dropped ones
    caps = dict(l.split(":\t") for l in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines()
                if l.startswith("Cap"))
    assert int(caps["CapEff"], 16) & ~keep_mask() == 0 and int(caps["CapBnd"], 16) & ~keep_mask() == 0
    assert agent.status().privileges["error"] is None and len(agent.status().privileges["kept"]) == len(KEEP)
    from agent.config import state_dir_for
    paths = [agent.pin_dir, *(os.path.join(agent.pin_dir, n) for n in os.listdir(agent.pin_dir))]
    sd = state_dir_for(agent.pin_dir)
    paths += [sd, *(os.path.join(sd, n) for n in os.listdir(sd))]
    writable = {p: oct(os.stat(p).st_mode) for p in paths if os.stat(p).st_mode & stat.S_IWOTH}
    assert len(paths) > 4 and writable == {}
