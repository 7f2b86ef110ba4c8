"""nodewire-cni driven by a real container runtime: Debian's containerd 1.6 (CRI plugin, runc) runs pod
sandboxes over CRI gRPC, as the kubelet asks it to, and its CNI half runs the chain bridge + host-local
+ portmap + nodewire-cni that `nodewire cni install` wrote. containerd and the agent share the
sandbox's node network namespace (a hostNetwork DaemonSet shares the runtime's), so bridges, veths
and iptables rules never touch the host; containerd's root, state, sockets and the pods' netns live
under this module's tmp dir (nodewire_dev/containerd.py), and all of it goes at the end, also after
a failure. What containerd 1.6 never calls (CHECK, STATUS, GC) is covered by tests/test_cni_chain.py
with the runtime double."""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodewire_dev.containerd import Containerd
from tests.conftest import NODEWIRE, AgentProcess, wait_for
from tests.manifests import write
from tests.observe_helpers import free_port, samples

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

DEBIAN_CNI = "/usr/lib/cni"
NODE = "ctd-node"
ICMP_FRAME = 14 + 20 + 8 + 56  # ethernet + IPv4 + ICMP header + ping's default 56 data bytes

if shutil.which("containerd") is None or not Path(DEBIAN_CNI, "bridge").exists():
    pytest.skip("containerd or containernetworking-plugins not installed", allow_module_level=True)


class Node:
    """The node: containerd with the chained conflist, and an agent, in the sandbox's node netns."""

    def __init__(self, sandbox, tmp: Path):
        self.sandbox, self.tmp = sandbox, tmp
        self.net = f"10.{random.randrange(100, 200)}.{random.randrange(0, 256)}"
        self.bin, self.confdir, self.manifests = tmp / "bin", tmp / "net.d", tmp / "manifests"
        for d in (self.bin, self.confdir, self.manifests):
            d.mkdir()
        self.node_netns = f"/var/run/netns/{sandbox.node_netns}"
        self.containerd = Containerd(tmp / "containerd", sandbox.node_netns, str(self.bin), str(self.confdir),
                                     sandbox.prefix)
        self.metrics = f"127.0.0.1:{free_port()}"  # inside the node netns
        self.agent = AgentProcess(self.manifests, sandbox.cgroup, f"/sys/fs/bpf/{sandbox.prefix}-ctd", extra=[
            "--node-name", NODE, "--netns-dir", self.containerd.netns_dir, "--metrics-addr", self.metrics,
            "--no-rdma"], prefix=["nsenter", f"--net={self.node_netns}"])
        primary = {"cniVersion": "1.0.0", "name": "podnet", "plugins": [
            {"type": "bridge", "bridge": f"{sandbox.prefix}k0", "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{self.net}.0/24"}]],
                      "dataDir": str(tmp / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}
        (self.confdir / "10-podnet.conflist").write_text(json.dumps(primary))
        for plugin in ("bridge", "host-local", "portmap", "loopback"):
            os.symlink(f"{DEBIAN_CNI}/{plugin}", self.bin / plugin)
        out = subprocess.run([NODEWIRE, "cni", "install", "--cni-bin-dir", str(self.bin), "--cni-conf-dir",
                              str(self.confdir), "--pin-dir", self.agent.pin_dir], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr

    def run_pod(self, name: str):
        """RunPodSandbox, then its status (READY, with the address the chain gave it)."""
        cri = self.containerd.cri
        sid = cri.run_pod_sandbox(name, "default", secrets.token_hex(8), cgroup_parent=self.containerd.cgroup_parent)
        st = cri.status(sid)
        assert st.state == "SANDBOX_READY" and st.ip.startswith(self.net + ".") and st.netns, st
        return st

    def pods(self) -> dict[str, dict]:
        out = subprocess.run([NODEWIRE, "cni", "list", "-o", "json", "--pin-dir", self.agent.pin_dir],
                             capture_output=True, text=True)
        return {p["pod"]: p for p in json.loads(out.stdout)} if out.returncode == 0 else {}

    def known(self, name: str) -> dict:
        return wait_for(lambda: (self.pods().get(f"default/{name}") or {}).get("host_veth") and
                        self.pods()[f"default/{name}"], 20, what=f"the agent to know {name} with its veth")

    def node_links(self) -> set[str]:
        out = subprocess.run(["ip", "-n", self.sandbox.node_netns, "-j", "link"], capture_output=True, text=True,
                             check=True).stdout
        return {link["ifname"] for link in json.loads(out)}

    def ping(self, netns: str, ip: str, count: int = 2) -> bool:
        return subprocess.run(["nsenter", f"--net={netns}", "ping", "-q", "-c", str(count), "-i", "0.2", "-W", "2",
                               ip], capture_output=True).returncode == 0

    def transmitted(self, pod: str) -> float | None:
        """The pod's k8s.pod.network.io transmit series, scraped from inside the node netns."""
        code = f"import urllib.request; print(urllib.request.urlopen('http://{self.metrics}/metrics').read().decode())"
        out = subprocess.run(["nsenter", f"--net={self.node_netns}", sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=30)
        found = samples(out.stdout, "k8s_pod_network_io_bytes_total", k8s_pod_name=pod, network_io_direction="transmit")
        return next(iter(found.values()), None)


@pytest.fixture(scope="module")
def node(sandbox, tmp_path_factory):
    n = Node(sandbox, tmp_path_factory.mktemp("ctd"))
    try:
        n.containerd.start()
        n.agent.start()
        yield n
    finally:
        n.containerd.close()  # stops and removes every sandbox (DEL through the chain), kills, unmounts
        n.agent.cleanup()


def test_pods_containerd_runs_are_known_with_veth_and_ip_reach_each_other_and_are_counted(node):
    a, b = node.run_pod("ctd-a"), node.run_pod("ctd-b")
    ka, kb = node.known("ctd-a"), node.known("ctd-b")
    assert ka["ips"] == [a.ip] and kb["ips"] == [b.ip]
    assert ka["uid"] == a.uid and ka["source"] == "cni"
    assert {ka["host_veth"], kb["host_veth"]} <= node.node_links()  # the node-side ends, in the node netns
    assert node.ping(a.netns, b.ip) and node.ping(b.netns, a.ip)
    before = wait_for(lambda: node.transmitted("ctd-a"), 20, what="ctd-a's first series")
    assert node.ping(a.netns, b.ip, count=5)
    wait_for(lambda: (node.transmitted("ctd-a") or 0) - before >= 5 * ICMP_FRAME, 20, what="ctd-a's bytes to move")


def test_stop_forgets_the_pod_and_remove_after_it_succeeds(node):
    st = node.run_pod("ctd-stop")
    veth = node.known("ctd-stop")["host_veth"]
    node.containerd.cri.stop(st.id)  # DEL through the chain
    assert "default/ctd-stop" not in node.pods()
    assert veth not in node.node_links()
    node.containerd.cri.remove(st.id)  # containerd runs DEL once more: it succeeds for a forgotten pod
    assert st.id not in node.containerd.cri.list_ids()
    assert not Path(st.netns).exists()


def test_a_restarted_agent_recovers_its_pods_and_adopts_one_created_while_it_was_down(node):
    before = node.run_pod("ctd-before")
    veth_before = node.known("ctd-before")["host_veth"]
    node.agent.kill(15)
    # the ADD while the agent is down passes through (failOpen): the pod runs, with its address
    during = node.run_pod("ctd-during")
    # what the API source would report for it (its status.podIPs)
    write(node.manifests / "pods.json", {"apiVersion": "v1", "kind": "Pod",
                                         "metadata": {"name": "ctd-during", "namespace": "default"},
                                         "spec": {"nodeName": NODE}, "status": {"podIPs": [{"ip": during.ip}]}})
    node.agent.start()
    assert node.known("ctd-before") == {**node.pods()["default/ctd-before"], "host_veth": veth_before}
    adopted = node.known("ctd-during")
    assert adopted["source"] == "netns-scan" and adopted["host_veth"] in node.node_links()
    assert node.ping(during.netns, before.ip)
    node.containerd.cri.stop(before.id)
    assert "default/ctd-before" not in node.pods()
