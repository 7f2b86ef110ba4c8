"""nodewire-cni in the real chain, run as a container runtime runs it: Debian's bridge + host-local +
portmap (containernetworking-plugins 1.1.1, which speaks CNI up to 1.0.0) followed by nodewire-cni as
`nodewire cni install` put it in the conflist, on real network namespaces, with a running agent whose
observer counts the pod's traffic on its node-side veth.

The "node" is the sandbox's node netns (the bridge and veths live there, never on the host), each pod
a netns bind-mounted under this module's netns dir, traffic only between a pod and the bridge address.
"""
from __future__ import annotations

import json
import random
import secrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from agent.api import call
from agent.cni.install import BACKUP_SUFFIX
from agent.config import state_dir_for
from nodewire_dev.cni_runtime import Runtime, invoke, pod_env
from tests.conftest import wait_for
from tests.manifests import write
from tests.observe_helpers import free_port, samples

pytestmark = pytest.mark.root

NODEWIRE = str(Path(sys.executable).with_name("nodewire"))
DEBIAN_CNI = "/usr/lib/cni"
NODE = "cni-node"
ICMP_FRAME = 14 + 20 + 8 + 56  # ethernet + IPv4 + ICMP header + ping's default 56 data bytes

if not Path(DEBIAN_CNI, "bridge").exists():
    pytest.skip("containernetworking-plugins not installed", allow_module_level=True)


class Env:
    def __init__(self, sandbox, agent_factory, tmp: Path):
        self.sandbox, self.tmp = sandbox, tmp
        self.net = f"10.{random.randrange(100, 200)}.{random.randrange(0, 256)}"
        self.gateway = f"{self.net}.1"
        self.netns_dir = tmp / "netns"
        self.netns_dir.mkdir()
        self.port = free_port()
        self.manifests = tmp / "manifests"
        self.manifests.mkdir()
        self.bin, self.confdir = tmp / "bin", tmp / "net.d"
        self.confdir.mkdir()
        (tmp / "config.yaml").write_text(f"cni-conf-dir: {self.confdir}\n")  # as the DaemonSet's config says
        self.agent = agent_factory(self.manifests, pin_suffix="-cni", extra=[
            "--config", str(tmp / "config.yaml"),
            "--node-name", NODE, "--veth-netns", sandbox.node_netns, "--netns-dir", str(self.netns_dir),
            "--metrics-addr", f"127.0.0.1:{self.port}", "--no-rdma"])
        self.socket = str(Path(state_dir_for(self.agent.pin_dir), "api.sock"))
        self.primary = {
            "cniVersion": "1.0.0", "name": "podnet",
            "plugins": [
                {"type": "bridge", "bridge": f"{sandbox.prefix}c0", "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{self.net}.0/24"}]],
                          "dataDir": str(tmp / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}
        (self.confdir / "10-podnet.conflist").write_text(json.dumps(self.primary))
        out = subprocess.run([NODEWIRE, "cni", "install", "--cni-bin-dir", str(self.bin), "--cni-conf-dir",
                              str(self.confdir), "--pin-dir", self.agent.pin_dir], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        self.conflist = json.loads((self.confdir / "10-podnet.conflist").read_text())
        self.node = f"/var/run/netns/{sandbox.node_netns}"
        self.runtime = Runtime(self.conflist, [str(self.bin), DEBIAN_CNI], self.node)
        self.mounts: list[Path] = []

    def netns(self, name: str) -> str:
        """A pod's network namespace, bind-mounted at netns_dir/name (as a runtime mounts them)."""
        path = self.netns_dir / name
        path.touch()
        subprocess.run(["unshare", f"--net={path}", "true"], check=True)
        self.mounts.append(path)
        ns = str(path)
        subprocess.run(["nsenter", f"--net={ns}", "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        return ns

    def remove_netns(self, ns: str) -> None:
        subprocess.run(["umount", ns], check=False)
        Path(ns).unlink(missing_ok=True)

    def ping(self, ns: str, count: int = 5) -> None:
        subprocess.run(["nsenter", f"--net={ns}", "ping", "-q", "-c", str(count), "-i", "0.05", "-W", "2",
                        self.gateway], check=True, capture_output=True)

    def pods(self) -> dict[str, dict]:
        return {r["pod"]: r for r in call(self.socket, "cni.list")}

    def series(self, pod: str, direction: str) -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            found = samples(r.read().decode(), "k8s_pod_network_io_bytes_total", k8s_pod_name=pod,
                            network_io_direction=direction)
        return next(iter(found.values()), None)

    def close(self):
        for m in self.mounts:
            subprocess.run(["umount", str(m)], check=False, capture_output=True)


@pytest.fixture(scope="module")
def env(sandbox, agent_factory, tmp_path_factory):
    e = Env(sandbox, agent_factory, tmp_path_factory.mktemp("cni"))
    subprocess.run(["ip", "netns", "exec", sandbox.node_netns, "sysctl", "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], check=True)
    e.agent.start()
    yield e
    e.close()


def new_pod(env, name):
    return f"{secrets.token_hex(32)}", env.netns(name), ("default", name, secrets.token_hex(8))


def test_install_chained_nodewire_last_and_kept_the_original(env):
    types = [p["type"] for p in env.conflist["plugins"]]
    assert types == ["bridge", "portmap", "nodewire-cni"]
    assert env.conflist["plugins"][-1]["socket"] == env.socket
    assert json.loads((env.confdir / f"10-podnet.conflist{BACKUP_SUFFIX}").read_text()) == env.primary


def test_add_gives_an_address_the_agent_reports_the_pod_and_its_counters_move(env):
    cid, ns, pod = new_pod(env, "web-1")
    r = env.runtime.add(cid, ns, pod, runtime_config={"portMappings": [
        {"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]})
    assert r.code == 0, r
    ip = r.out["ips"][0]["address"].split("/")[0]
    assert ip.startswith(env.net + ".") and r.out["cniVersion"] == "1.0.0"
    inside = subprocess.run(["nsenter", f"--net={ns}", "ip", "-j", "addr", "show", "eth0"],
                            capture_output=True, text=True, check=True).stdout
    assert ip in inside
    known = wait_for(lambda: env.pods().get("default/web-1", {}).get("host_veth") and env.pods()["default/web-1"],
                     20, what="the agent to resolve web-1's veth")
    host_side = [i["name"] for i in r.out["interfaces"] if not i.get("sandbox") and i["name"].startswith("veth")]
    assert known["ips"] == [ip] and known["host_veth"] == host_side[0] and known["uid"] == pod[2]
    env.ping(ns, 1)
    before = wait_for(lambda: env.series("web-1", "transmit"), 20, what="web-1's first series")
    env.ping(ns, 5)
    moved = wait_for(lambda: (env.series("web-1", "transmit") or 0) - before >= 5 * ICMP_FRAME and
                     env.series("web-1", "transmit") - before, 10, what="web-1's counter to move")
    assert 5 * ICMP_FRAME <= moved <= 5 * ICMP_FRAME + 2 * 42  # the pings, and at most an ARP exchange
    assert env.runtime.delete(cid).code == 0


def test_del_cleans_up_and_a_second_del_succeeds(env):
    cid, ns, pod = new_pod(env, "web-2")
    r = env.runtime.add(cid, ns, pod)
    assert r.code == 0, r
    ip = r.out["ips"][0]["address"].split("/")[0]
    wait_for(lambda: env.pods().get("default/web-2", {}).get("host_veth"), 20, what="web-2 resolved")
    veth = env.pods()["default/web-2"]["host_veth"]
    # CHECK passes along the whole chain (a pod without port mappings: portmap 1.1.1's CHECK of an
    # IPv4-only pod with mappings fails looking for its IPv6 DNAT chain, a bug of that plugin)
    assert env.runtime.check(cid).code == 0
    assert env.runtime.delete(cid).code == 0
    assert "default/web-2" not in env.pods()
    assert not (env.tmp / "ipam" / "podnet" / ip).exists()  # host-local released the address
    links = subprocess.run(["ip", "-n", env.sandbox.node_netns, "-j", "link"], capture_output=True, text=True).stdout
    assert veth not in links
    # the runtime retries DEL (and may do so after the netns is gone): still success
    env.remove_netns(ns)
    env.runtime.cache[(cid, "eth0")] = (r.out, ns, pod, {})
    assert env.runtime.delete(cid).code == 0
    # CHECK of a deleted container: the agent does not know it (spec code 3)
    conf = dict(env.conflist["plugins"][-1], cniVersion="1.0.0", name="podnet", prevResult=r.out)
    env.netns("web-2b")
    chk = invoke(str(env.bin / "nodewire-cni"), "CHECK", conf, pod_env(cid, str(env.netns_dir / "web-2b"), pod))
    assert chk.code == 1 and chk.out["code"] == 3 and "never added" in chk.out["msg"]


def _conflist_without_agent(env, fail_open: bool) -> Runtime:
    conf = json.loads(json.dumps(env.conflist))
    conf["plugins"][-1].update(socket=str(env.tmp / "nobody.sock"), failOpen=fail_open)
    return Runtime(conf, [str(env.bin), DEBIAN_CNI], env.node)


def test_add_with_the_agent_down_passes_through_or_fails_as_configured(env):
    rt = _conflist_without_agent(env, fail_open=True)
    cid, ns, pod = new_pod(env, "lonely-1")
    r = rt.add(cid, ns, pod)
    assert r.code == 0 and r.out["ips"][0]["address"].startswith(env.net)
    assert rt.delete(cid).code == 0  # DEL with the agent down: success too

    rt = _conflist_without_agent(env, fail_open=False)
    cid, ns, pod = new_pod(env, "lonely-2")
    r = rt.add(cid, ns, pod)
    assert r.code == 1 and r.out["code"] == 11 and "nobody.sock" in r.out["msg"], r
    assert r.out["cniVersion"] == "1.0.0"
    # the runtime cleans a failed ADD up with DEL, which succeeds (bridge and host-local release)
    rt.cache[(cid, "eth0")] = (None, ns, pod, {})
    assert rt.delete(cid).code == 0


def test_bad_input_is_cni_error_json_with_the_specs_code(env):
    plugin = str(env.bin / "nodewire-cni")
    base = pod_env("c" * 64, "", ("default", "x", "u"))
    garbage = invoke(plugin, "ADD", "{not json", base)
    assert garbage.code == 1 and garbage.out["code"] == 6
    conf = dict(env.conflist["plugins"][-1], cniVersion="1.0.0", name="podnet", prevResult={"ips": []})
    no_netns = invoke(plugin, "ADD", conf, base)
    assert no_netns.code == 1 and no_netns.out == {"cniVersion": "1.0.0", "code": 4, "msg": "CNI_NETNS is not set"}
    old = invoke(plugin, "ADD", dict(conf, cniVersion="0.2.0"), base)
    assert old.code == 1 and old.out["code"] == 1
    unchained = invoke(plugin, "ADD", {k: v for k, v in conf.items() if k != "prevResult"},
                       dict(base, CNI_NETNS="/proc/self/ns/net"))
    assert unchained.code == 1 and unchained.out["code"] == 7 and "chained" in unchained.out["msg"]
    ver = invoke(plugin, "VERSION", "", {})
    assert ver.code == 0 and ver.out["cniVersion"] == "1.1.0" and {"0.4.0", "1.0.0", "1.1.0"} <= set(ver.out["supportedVersions"])


def test_status_and_gc_of_cni_1_1(env):
    plugin = str(env.bin / "nodewire-cni")
    conf = dict(env.conflist["plugins"][-1], cniVersion="1.1.0", name="podnet")
    assert invoke(plugin, "STATUS", conf, {"CNI_PATH": str(env.bin)}).code == 0
    down = dict(conf, socket=str(env.tmp / "nobody.sock"), failOpen=False)
    st = invoke(plugin, "STATUS", down, {"CNI_PATH": str(env.bin)})
    assert st.code == 1 and st.out["code"] == 50
    cid, ns, pod = new_pod(env, "gc-1")
    keep, ns2, pod2 = new_pod(env, "gc-2")
    assert env.runtime.add(cid, ns, pod).code == 0 and env.runtime.add(keep, ns2, pod2).code == 0
    gc = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": keep, "ifname": "eth0"}]})
    assert invoke(plugin, "GC", gc, {"CNI_PATH": str(env.bin)}).code == 0
    pods = env.pods()
    assert "default/gc-1" not in pods and "default/gc-2" in pods
    for c in (cid, keep):
        env.runtime.delete(c)


def test_restarted_agent_recovers_cni_pods_and_pods_that_predate_it(env):
    cid, ns, pod = new_pod(env, "before-restart")
    r = env.runtime.add(cid, ns, pod)
    assert r.code == 0
    wait_for(lambda: env.pods().get("default/before-restart", {}).get("host_veth"), 20, what="resolved")
    env.agent.kill(15)
    # added while the agent is down (failOpen): only the API source (here a manifest) will know it
    cid2, ns2, pod2 = new_pod(env, "while-down")
    r2 = env.runtime.add(cid2, ns2, pod2)
    assert r2.code == 0
    ip2 = r2.out["ips"][0]["address"].split("/")[0]
    write(env.manifests / "pods.json", {"apiVersion": "v1", "kind": "Pod",
                                        "metadata": {"name": "while-down", "namespace": "default"},
                                        "spec": {"nodeName": NODE}, "status": {"podIPs": [{"ip": ip2}]}})
    env.agent.start()
    veth2 = [i["name"] for i in r2.out["interfaces"] if not i.get("sandbox") and i["name"].startswith("veth")][0]
    pods = wait_for(lambda: (lambda p: "default/while-down" in p and "default/before-restart" in p and p)(env.pods()),
                    20, what="both pods recovered")
    assert pods["default/before-restart"]["source"] == "cni" and pods["default/before-restart"]["host_veth"]
    assert pods["default/while-down"] == {"pod": "default/while-down", "host_veth": veth2, "source": "netns-scan"}
    env.ping(ns2, 3)
    wait_for(lambda: (env.series("while-down", "transmit") or 0) >= 3 * ICMP_FRAME, 20,
             what="counters of the pod that predates the agent")
    for c in (cid, cid2):
        assert env.runtime.delete(c).code == 0


def test_check_adopts_a_pod_added_while_the_agent_was_down(env):
    """Added while the agent is down (failOpen), found by the restarted agent's netns scan: CHECK
    carries what ADD does, so the agent takes the pod in as a CNI pod and CHECK passes."""
    env.agent.kill(15)
    cid, ns, pod = new_pod(env, "adopt-me")
    r = env.runtime.add(cid, ns, pod)
    assert r.code == 0
    ip = r.out["ips"][0]["address"].split("/")[0]
    veth = [i["name"] for i in r.out["interfaces"] if not i.get("sandbox") and i["name"].startswith("veth")][0]
    write(env.manifests / "adopt.json", {"apiVersion": "v1", "kind": "Pod",
                                         "metadata": {"name": "adopt-me", "namespace": "default"},
                                         "spec": {"nodeName": NODE}, "status": {"podIPs": [{"ip": ip}]}})
    env.agent.start()
    wait_for(lambda: env.pods().get("default/adopt-me", {}).get("source") == "netns-scan", 20, what="scan finds it")
    assert env.runtime.check(cid).code == 0  # the whole chain; nodewire answered code 3 before
    row = wait_for(lambda: (lambda r: r.get("host_veth") and r)(env.pods().get("default/adopt-me", {})), 20,
                   what="the adopted pod's veth")
    assert row["source"] == "cni" and row["host_veth"] == veth and row["uid"] == pod[2] and row["ips"] == [ip]
    assert [r["source"] for r in call(env.socket, "cni.list") if r["pod"] == "default/adopt-me"] == ["cni"]
    assert wait_for(lambda: (env.agent.status().cni or {}).get("adopted"), 20, what="status: adopted") == 1
    assert env.runtime.check(cid).code == 0  # and again, now known
    assert env.runtime.delete(cid).code == 0
    assert "default/adopt-me" not in env.pods() or env.pods()["default/adopt-me"]["source"] == "netns-scan"
    (env.manifests / "adopt.json").unlink()


def _flannel_rewrites(path: Path, conf: dict) -> None:
    """What flannel's install step does on restart: its own conflist copied over the file."""
    tmp = path.with_name(".flannel-tmp")
    tmp.write_text(json.dumps(conf))
    tmp.rename(path)


def test_the_agent_chains_nodewire_again_when_the_primary_rewrites_its_conflist(env):
    path = env.confdir / "10-podnet.conflist"
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    newer = json.loads(json.dumps(env.primary))
    newer["plugins"][0]["mtu"] = 1400
    _flannel_rewrites(path, newer)
    now = wait_for(lambda: (lambda c: c["plugins"][-1]["type"] == "nodewire-cni" and c)(json.loads(path.read_text())),
                   10, what="nodewire chained again")
    assert [p["type"] for p in now["plugins"]] == ["bridge", "portmap", "nodewire-cni"]
    assert now["plugins"][0]["mtu"] == 1400 and now["plugins"][-1] == env.conflist["plugins"][-1]  # entry as installed
    assert json.loads(backup.read_text()) == newer  # the primary's newest own file is the kept original
    # a partial write (the primary mid-write) is left alone; the complete file that follows is chained
    path.write_text('{"cniVersion": "1.0.0", "name": "podnet", "plu')
    _flannel_rewrites(path, env.primary)
    wait_for(lambda: json.loads(path.read_text())["plugins"][-1]["type"] == "nodewire-cni", 10,
             what="nodewire chained after the partial write")
    assert json.loads(backup.read_text()) == env.primary
    # uninstall ends the keeping, with the agent running: a rewrite after it stays as the primary wrote it
    looked = env.agent.status().cni["chain"]["looked"]
    out = subprocess.run([NODEWIRE, "cni", "uninstall", "--cni-bin-dir", str(env.tmp / "no-bin"), "--cni-conf-dir",
                          str(env.confdir)], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(path.read_text()) == env.primary, out
    looked = wait_for(lambda: (lambda n: n > looked and n)(env.agent.status().cni["chain"]["looked"]), 20,
                      what="the agent to see the uninstall")
    _flannel_rewrites(path, newer)
    chain = wait_for(lambda: (lambda c: c["looked"] > looked and c)(env.agent.status().cni["chain"]), 20,
                     what="the agent to look at the rewritten dir")
    assert json.loads(path.read_text()) == newer and not backup.exists() and not chain["managed"]
    assert chain["restored"] >= 2 and chain["watched"] and chain["errors"] == []
    out = subprocess.run([NODEWIRE, "cni", "install", "--cni-bin-dir", str(env.bin), "--cni-conf-dir",
                          str(env.confdir), "--pin-dir", env.agent.pin_dir], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
