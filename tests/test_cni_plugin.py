"""The static nodewire-cni against the agent's real API server and CNI side (no root: the pods' netns
are never entered here; tests/test_cni_chain.py runs the plugin in the real chain): what each command
forwards, what it prints, the CNI error codes, and its JSON reader and writer on odd input."""
from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from agent.api import ApiServer, MAX_LINE, call
from agent.cni.build import ensure
from agent.cni.pods import CniPods
from agent.state import ClusterState

PLUGIN = str(ensure())
CID = "c0ffee" * 8


def run(command: str, stdin: bytes | str | dict = b"", env: dict | None = None) -> tuple[int, dict | None, str]:
    import subprocess
    data = json.dumps(stdin).encode() if isinstance(stdin, dict) else stdin.encode() if isinstance(stdin, str) else stdin
    r = subprocess.run([PLUGIN], input=data, capture_output=True, env={"CNI_COMMAND": command, **(env or {})},
                       timeout=30)
    assert r.returncode in (0, 1), r  # never a signal or a crash code
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None, r.stderr.decode()


@pytest.fixture
def agent(tmp_path):
    """The agent's API server and CNI side (records under tmp_path), on a socket of this test."""
    state = ClusterState("node-a")
    pods = CniPods(state, "node-a", str(tmp_path / "records"), netns_dir=str(tmp_path / "netns")).start()
    api = ApiServer(str(tmp_path / "api.sock"), allowed_uids=(os.getuid(),)).start()
    pods.register(api)
    yield api, pods, state
    api.close()
    pods.close()


PREV = {"cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:00:00:01"}, {"name": "veth1", "mac": "aa:bb:cc:00:00:02"},
                       {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/var/run/netns/p"}],
        "ips": [{"address": "10.9.0.1/24", "interface": 0}, {"address": "10.9.0.7/24", "gateway": "10.9.0.1",
                                                             "interface": 2}],
        "dns": {"nameservers": ["10.96.0.10"]}, "note": "caf\u00e9 \U0001F600 \udc80 \"q\" \\ \n"}


def conf(sock: str, **kw) -> dict:
    return {"cniVersion": "1.0.0", "name": "podnet", "type": "nodewire-cni", "socket": sock, **kw}


def pod_env(netns: str = "/proc/self/ns/net", cid: str = CID) -> dict:
    return {"CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_NETNS": netns,
            "CNI_ARGS": "IgnoreUnknown=1; K8S_POD_NAMESPACE = shop ;K8S_POD_NAME=web-0;K8S_POD_UID=u-1;K8S_POD_NAME=web-1"}


def test_add_tells_the_agent_who_the_pod_is_and_prints_prevresult(agent, tmp_path):
    api, pods, state = agent
    code, out, _ = run("ADD", conf(api.path, cniVersion="1.1.0", prevResult=PREV), pod_env())
    assert code == 0 and out == dict(PREV, cniVersion="1.1.0")  # prevResult, in the configuration's version
    rows = {r["pod"]: r for r in call(api.path, "cni.list")}
    row = rows["shop/web-1"]  # CNI_ARGS: spaces trimmed, the last K8S_POD_NAME wins
    assert row["ips"] == ["10.9.0.7"] and row["uid"] == "u-1" and row["container_id"] == CID
    assert row["network"] == "podnet" and row["netns"] == "/proc/self/ns/net" and row["candidates"] == ["cni0", "veth1"]
    # CHECK carries the same and passes; DEL forgets; a second DEL (the runtime retries) succeeds
    assert run("CHECK", conf(api.path, prevResult=PREV), pod_env())[0] == 0
    assert run("DEL", conf(api.path, prevResult=PREV), pod_env()) == (0, None, "")
    assert "shop/web-1" not in {r["pod"] for r in call(api.path, "cni.list")}
    assert run("DEL", conf(api.path), {k: v for k, v in pod_env().items() if k != "CNI_NETNS"})[0] == 0
    code, out, _ = run("CHECK", conf(api.path, prevResult=PREV), pod_env())
    assert code == 1 and out["code"] == 3 and "was never added" in out["msg"] and out["cniVersion"] == "1.0.0"


def test_an_agent_refusal_is_code_100_with_the_agents_code_as_details(agent):
    api, _, _ = agent
    bad = dict(PREV, ips=[{"gateway": "10.9.0.1"}])
    code, out, _ = run("ADD", conf(api.path, failOpen=False, prevResult=bad), pod_env())
    assert code == 1 and out["code"] == 100 and out["msg"].startswith("ADD not recorded: nodewire agent: cni.add: ips[0]")
    code, out, err = run("ADD", conf(api.path, prevResult=bad), pod_env())  # failOpen: logged, passed through
    assert code == 0 and out == bad and "level=warning" in err and "passing through (failOpen)" in err


def test_status_and_gc(agent, tmp_path):
    api, _, _ = agent
    assert run("STATUS", conf(api.path, cniVersion="1.1.0"))[0] == 0
    down = conf(str(tmp_path / "nobody.sock"), cniVersion="1.1.0", failOpen=False)
    code, out, _ = run("STATUS", down)
    assert code == 1 and out["code"] == 50 and "nobody.sock: No such file or directory" in out["msg"]
    assert run("STATUS", dict(down, failOpen=True))[0] == 0
    for cid in ("a" * 64, "b" * 64):
        assert run("ADD", conf(api.path, prevResult=PREV), pod_env(cid=cid))[0] == 0
    gc = conf(api.path, cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "b" * 64, "ifname": "eth0"}]})
    assert run("GC", gc) == (0, None, "")
    assert [r["container_id"] for r in call(api.path, "cni.list")] == ["b" * 64]
    assert run("GC", dict(gc, socket=str(tmp_path / "nobody.sock")))[0] == 0  # agent down: GC succeeds


def test_an_agent_that_does_not_answer_is_timed_out(tmp_path):
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(mute.accept()), daemon=True).start()
    try:
        code, out, _ = run("ADD", conf(str(tmp_path / "mute.sock"), timeout=0.2, failOpen=False, prevResult=PREV),
                           pod_env())
        assert code == 1 and out["code"] == 11 and out["msg"].endswith("mute.sock: timed out")
    finally:
        mute.close()


@pytest.mark.parametrize("text", ['{"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}]}',
                                  '{"a": [1, -2.5e3, 1E+2, 0.5, true, false, null, "\\u00e9\\n\\ud83d\\ude00\\udc80", {"": {}}]}',
                                  '{"big": 123456789012345678901234567890, "tiny": 1e-400, "dup": 1, "dup": 2}'])
def test_prevresult_is_echoed_as_json_reads_it(text, tmp_path):
    stdin = '{"cniVersion":"0.4.0","name":"n","socket":"%s","prevResult":%s}' % (tmp_path / "x.sock", text)
    code, out, _ = run("ADD", stdin, pod_env())
    assert code == 0 and out == dict(json.loads(text), cniVersion="0.4.0")


@pytest.mark.parametrize("bad, detail", [
    (b"", "Expecting value"), (b"{", "Expecting property name"), (b'{"cniVersion":"1.0.0"} x', "Extra data"),
    (b'{"a":}', "Expecting value"), (b'{"a": NaN}', "Expecting value"), (b'{"a": 01}', "Expecting ','"),
    (b'{"a": "\x01"}', "Invalid control character"), (b'{"a": "\\x"}', "Invalid \\escape"),
    (b'{"a": "\xff"}', "Invalid UTF-8"), (b'{"a": "\xed\xa0\x80"}', "Invalid UTF-8"),  # a surrogate in UTF-8
    (b"[" * 65 + b"]" * 65, "Nested deeper than 64"), (b"[" * 100000, "Nested deeper than 64"),
])
def test_bad_json_is_code_6_with_where(bad, detail):
    code, out, _ = run("ADD", bad, pod_env())
    assert code == 1 and out["code"] == 6 and out["msg"] == "network configuration on stdin is not JSON"
    assert out["details"].startswith(detail) and "(char " in out["details"], out


def test_limits_and_types_of_the_configuration():
    huge = json.dumps({"cniVersion": "1.0.0", "pad": "x" * MAX_LINE})
    code, out, _ = run("ADD", huge, pod_env())
    assert code == 1 and out["code"] == 6 and "larger than" in out["msg"]
    assert run("DEL", "[1]", pod_env())[1]["msg"] == "network configuration on stdin is not a JSON object"
    code, out, _ = run("DEL", {"cniVersion": "0.2.0"}, pod_env())
    assert out == {"cniVersion": "1.1.0", "code": 1, "msg": "cniVersion '0.2.0' is not supported",
                   "details": "supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"}
    escaped_key = run("DEL", '{"cni\\u0056ersion": "1.0.0", "socket": "/nonexistent"}', pod_env())
    assert escaped_key[0] == 0  # keys compare decoded, as json.loads does
    for key, value in (("failOpen", "yes"), ("socket", 5), ("logFile", []), ("timeout", "5"), ("timeout", -1)):
        code, out, _ = run("DEL", {"cniVersion": "1.0.0", key: value}, pod_env())
        assert code == 1 and out["code"] == 7 and key in out["msg"], (key, out)
    code, out, _ = run("ADD", {"cniVersion": "1.0.0"}, pod_env())
    assert out["code"] == 7 and "chained plugin: no prevResult" in out["msg"]
    code, out, _ = run("ADD", {"cniVersion": "1.0.0", "prevResult": {}}, {"CNI_NETNS": "/x", "CNI_IFNAME": "eth0"})
    assert out == {"cniVersion": "1.0.0", "code": 4, "msg": "CNI_CONTAINERID is not set"}
    code, out, _ = run("", b"")
    assert out["code"] == 4 and out["msg"].startswith("CNI_COMMAND '' is not one of ADD, DEL")
