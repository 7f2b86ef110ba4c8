"""`nodewire run --kube` end to end: fake API server (HTTPS, real protocol) → agent → kernel maps → connects.

The agent is the real `nodewire run` process, talking to the fake API server on loopback with a
kubeconfig (CA + tokenFile); pods are sandbox network namespaces whose connects the agent's cgroup
programs balance. Maps are read back with `nodewire services -o json`.
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.status import status_path
from nodewire_dev.fake_apiserver import FakeApiServer, endpoint_slice, service
from tests.conftest import NODEWIRE, AgentProcess, wait_for
from tests.observe_helpers import free_port

pytestmark = pytest.mark.root
TOKEN = "kube-e2e-token"


class KubeAgent(AgentProcess):
    """`nodewire run --kube --kubeconfig …` (AgentProcess runs the manifest source)."""

    def __init__(self, kubeconfig: Path, cgroup: str, pin_dir: str, log_dir: Path):
        super().__init__(log_dir, cgroup, pin_dir)
        self.kubeconfig = kubeconfig
        self.metrics_port = free_port()

    def start(self, wait: bool = True) -> "KubeAgent":
        Path(status_path(self.pin_dir)).unlink(missing_ok=True)
        self._logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [NODEWIRE, "--debug", "run", "--kube", "--kubeconfig", str(self.kubeconfig), "--cgroup", self.cgroup,
             "--pin-dir", self.pin_dir, "--metrics-addr", f"127.0.0.1:{self.metrics_port}"],
            stdout=self._logf, stderr=subprocess.STDOUT,
            env=dict(os.environ, NODE_NAME="node-a"))
        if wait:
            wait_for(lambda: self.status().first_sync or self._died(), 60, what="agent first sync")
        return self

    def probe(self, path: str) -> tuple[int, str]:
        """GET a health endpoint on the metrics port: (HTTP status, body)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def kube(self) -> dict:
        src = self.status().sources.get("kube")
        return {} if src is None else {**src.detail, "healthy": src.healthy, "synced": src.synced,
                                       "stale_since": src.stale_since, "last_error": src.last_error}

    def backends(self, vip: str, port: int = 80) -> set[str] | None:
        for row in self.services():
            if row["ip"] == vip and row["port"] == port:
                return {b["ip"] for b in row["backends"]}
        return None


@pytest.fixture(scope="module")
def env(sandbox, tmp_path_factory):
    d = tmp_path_factory.mktemp("kube")
    client = sandbox.add_pod("kclient")
    pods = [sandbox.add_pod(f"k{i}") for i in range(1, 4)]
    for p in pods:
        p.serve(tcp_ports=[8080])
    api = FakeApiServer(tls=True, tokens={TOKEN: "system:serviceaccount:kube-system:nodewire"},
                        bookmark_interval=1.0, workdir=d)
    api.start()
    token = d / "token"
    token.write_text(TOKEN)
    kubeconfig = d / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url, "certificate-authority": api.cert_file}}],
        "users": [{"name": "nodewire", "user": {"tokenFile": str(token)}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "nodewire"}}],
    }))
    agent = KubeAgent(kubeconfig, sandbox.cgroup, f"/sys/fs/bpf/{sandbox.prefix}k", d)
    try:
        agent.start()
        wait_for(lambda: agent.kube().get("healthy"), 20, what="kube source healthy")
        yield api, agent, client, {p.name: p.ip4 for p in pods}, token
    finally:
        agent.cleanup()
        api.stop()


def replies(client, vip: str, count: int = 10) -> dict:
    r = client.probe("tcp", vip, 80, count=count)
    return dict(r["replies"], **{f"error:{k}": v for k, v in r["errors"].items()})


def test_create_update_delete_follow_in_maps_and_connects(env):
    api, agent, client, ip, _token = env
    vip = "10.96.7.1"
    api.create(service("web", vip, [("http", 80, 8080)]))
    api.create(endpoint_slice("web-x1", "web", [ip["k1"]]))
    wait_for(lambda: agent.backends(vip) == {ip["k1"]}, what="created")
    assert replies(client, vip) == {"k1": 10}
    api.update(endpoint_slice("web-x1", "web", [ip["k2"], ip["k3"]]))
    wait_for(lambda: agent.backends(vip) == {ip["k2"], ip["k3"]}, what="updated")
    assert set(replies(client, vip, 30)) == {"k2", "k3"}
    api.delete("EndpointSlice", "default", "web-x1")
    wait_for(lambda: agent.backends(vip) == set(), what="endpoints removed")
    assert replies(client, vip, 3) == {"error:ECONNREFUSED": 3}
    api.delete("Service", "default", "web")
    wait_for(lambda: agent.backends(vip) is None, what="service removed")


def test_server_killed_mid_watch_datapath_kept_then_converges(env):
    api, agent, client, ip, _token = env
    api.create(service("keep", "10.96.7.2"))
    api.create(endpoint_slice("keep-x1", "keep", [ip["k1"]]))
    api.create(service("doomed", "10.96.7.3"))
    api.create(endpoint_slice("doomed-x1", "doomed", [ip["k2"]]))
    wait_for(lambda: agent.backends("10.96.7.2") == {ip["k1"]} and agent.backends("10.96.7.3") == {ip["k2"]},
             what="both services in the maps")
    api.stop()
    wait_for(lambda: agent.kube().get("stale_since"), 20, what="status says stale")
    api.update(endpoint_slice("keep-x1", "keep", [ip["k3"]]))
    api.delete("Service", "default", "doomed")
    api.delete("EndpointSlice", "default", "doomed-x1")
    # While the API is away the datapath keeps what it had: connects still work.
    assert replies(client, "10.96.7.2") == {"k1": 10}
    assert replies(client, "10.96.7.3") == {"k2": 10}
    st = agent.kube()
    assert not st["healthy"] and st["synced"] and "Connection refused" in (st["last_error"] or "")
    code, body = agent.probe("/readyz")
    assert code == 503 and "stale since" in body and "Connection refused" in body, (code, body)
    assert agent.probe("/healthz")[0] == 200  # the loop still turns: no reason to restart the agent
    api.start()
    wait_for(lambda: agent.backends("10.96.7.2") == {ip["k3"]}, 20, what="change made while down applied")
    wait_for(lambda: agent.backends("10.96.7.3") is None, what="service deleted while down removed")
    assert replies(client, "10.96.7.2") == {"k3": 10}
    wait_for(lambda: agent.kube().get("healthy"), 20, what="healthy again")
    code, body = agent.probe("/readyz")
    assert code == 200 and "services synced" in body, (code, body)


def test_expired_history_relists_and_deleted_objects_disappear(env):
    api, agent, client, ip, _token = env
    for n, vip in (("gone1", "10.96.7.4"), ("stays1", "10.96.7.5")):
        api.create(service(n, vip))
        api.create(endpoint_slice(f"{n}-x1", n, [ip["k1"]]))
    wait_for(lambda: agent.backends("10.96.7.4") == {ip["k1"]} and agent.backends("10.96.7.5") == {ip["k1"]},
             what="in maps")
    relists = agent.kube()["resources"]["services"]["relists_gone"]
    api.stop()
    api.delete("Service", "default", "gone1")
    api.delete("EndpointSlice", "default", "gone1-x1")
    api.compact()
    api.start()
    wait_for(lambda: agent.kube()["resources"]["services"]["relists_gone"] > relists, 20, what="410 → re-list")
    wait_for(lambda: agent.backends("10.96.7.4") is None, what="deleted during the gap removed from the maps")
    assert agent.backends("10.96.7.5") == {ip["k1"]}
    assert replies(client, "10.96.7.5") == {"k1": 10}


def test_wrong_token_clear_error_and_datapath_kept(env):
    api, agent, client, ip, token = env
    api.create(service("authz", "10.96.7.6"))
    api.create(endpoint_slice("authz-x1", "authz", [ip["k2"]]))
    wait_for(lambda: agent.backends("10.96.7.6") == {ip["k2"]}, what="in maps")
    try:
        token.write_text("not-the-token")
        api.drop_watches()
        err = wait_for(lambda: (agent.kube().get("last_error") or "").startswith("401") and agent.kube()["last_error"],
                       20, what="401 reported")
        assert f"kubeconfig {agent.kubeconfig}" in err and "Unauthorized" in err
        api.delete("EndpointSlice", "default", "authz-x1")  # invisible to the refused agent
        assert replies(client, "10.96.7.6") == {"k2": 10}
        assert agent.backends("10.96.7.6") == {ip["k2"]}
        out = subprocess.run([NODEWIRE, "status", "--pin-dir", agent.pin_dir], capture_output=True, text=True,
                             check=True).stdout
        assert "source:    kube STALE since" in out and "401 Unauthorized" in out
    finally:
        token.write_text(TOKEN)
    wait_for(lambda: agent.backends("10.96.7.6") == set(), 20, what="recovers after the token is fixed")


def test_malformed_objects_skipped_counted_others_apply(env):
    api, agent, client, ip, _token = env
    before = agent.status().counters.object_errors
    api.create(service("dupnames", "10.96.7.7", [("http", 80, 8080), ("http", 81, 8081)]))
    api.create(service("fine", "10.96.7.8"))
    api.create(endpoint_slice("fine-x1", "fine", [ip["k3"]]))
    api.create(endpoint_slice("fine-x2", "fine", [ip["k1"]], ports=[("http", 0)]))  # its one port is bad
    wait_for(lambda: agent.backends("10.96.7.8") == {ip["k3"]}, what="good objects applied")
    wait_for(lambda: agent.status().counters.object_errors == before + 2, what="two bad objects named")
    errs = agent.status().object_errors
    assert "api: Service default/dupnames: spec.ports[1].name: duplicate port name 'http'" in errs
    assert ("api: EndpointSlice default/fine-x2: ports[0].port: 0 out of range (1-65535); "
            "this port of the slice is ignored") in errs
    assert agent.backends("10.96.7.7") is None
    assert agent.kube()["invalid_objects"] == {"Service": 1}  # the slice was applied, only its port left out
    assert replies(client, "10.96.7.8") == {"k3": 10}


def test_internal_traffic_policy_local_uses_node_name_from_env(env):
    api, agent, client, ip, _token = env
    api.create(service("local", "10.96.7.9", internalTrafficPolicy="Local"))
    sl = endpoint_slice("local-x1", "local", [ip["k1"], ip["k2"]])
    sl["endpoints"][0]["nodeName"] = "node-a"  # the agent runs with NODE_NAME=node-a
    sl["endpoints"][1]["nodeName"] = "node-b"
    api.create(sl)
    wait_for(lambda: agent.backends("10.96.7.9") == {ip["k1"]}, what="only this node's endpoint")
    assert agent.kube()["node"]["name"] == "node-a"
    assert replies(client, "10.96.7.9") == {"k1": 10}


def test_restart_while_api_down_keeps_pinned_maps_until_first_list(env):
    api, agent, client, ip, _token = env
    api.create(service("restart", "10.96.7.10"))
    api.create(endpoint_slice("restart-x1", "restart", [ip["k1"]]))
    wait_for(lambda: agent.backends("10.96.7.10") == {ip["k1"]}, what="in maps")
    agent.kill()  # SIGKILL: programs and pinned maps stay
    api.stop()
    try:
        agent.start(wait=False)
        wait_for(lambda: agent.kube().get("last_error") or agent._died(), 30, what="new agent cannot reach the API")
        assert agent.status().first_sync is None  # it waits for a list instead of syncing from nothing
        assert agent.backends("10.96.7.10") == {ip["k1"]}
        assert replies(client, "10.96.7.10") == {"k1": 10}
        api.update(endpoint_slice("restart-x1", "restart", [ip["k2"]]))
    finally:
        api.start()
    wait_for(lambda: agent.status().first_sync, 30, what="first sync once the API is back")
    wait_for(lambda: agent.backends("10.96.7.10") == {ip["k2"]}, what="converged")
    assert replies(client, "10.96.7.10") == {"k2": 10}
