"""Sandbox: network-namespace pods, a bridge, child cgroups; see the package docstring."""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.datapath.attach import detect_cgroup2_root

from ..lifecycle import SetUp

PODSERVER = Path(__file__).with_name("podserver.py")
PROBE = Path(__file__).with_name("probe.py")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _ip_batch(netns: str, lines: list[str]) -> None:
    """Several `ip` commands in one namespace, in one process."""
    r = subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(lines) + "\n",
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip -batch failed: {r.stderr.strip()}")


@dataclass
class Pod:
    name: str
    namespace: str  # the Kubernetes namespace it stands for
    netns: str
    ip4: str
    ip6: str
    cgroup: str
    host_veth: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start a process inside this pod: in its cgroup first, then in its network namespace
        (`ip netns exec` remounts /sys, so the cgroup move must come before it)."""
        procs_file = os.path.join(self.cgroup, "cgroup.procs")

        def enter_cgroup():
            with open(procs_file, "w") as f:
                f.write("0")

        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        p = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], preexec_fn=enter_cgroup, **kw)
        self.procs.append(p)
        return p

    def run(self, argv: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        p = self.popen(argv)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise RuntimeError(f"pod {self.name}: {argv[:3]} timed out after {timeout}s: {err[-500:]}")
        finally:
            self.procs.remove(p)
        if check and p.returncode != 0:
            raise RuntimeError(f"pod {self.name}: {argv[:3]} exited {p.returncode}: {err[-2000:]}")
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    def python(self, code: str, timeout: float = 60) -> str:
        """Run a Python snippet inside the pod and return its stdout."""
        return self.run([sys.executable, "-c", code], timeout=timeout).stdout

    def probe(self, kind: str, host: str, port: int, count: int = 1, timeout: float = 2.0) -> dict:
        """Connect (tcp) or send (udp) `count` times from this pod; see probe.py for the report."""
        out = self.run([sys.executable, str(PROBE), kind, host, str(port), "--count", str(count),
                        "--timeout", str(timeout)], timeout=30 + count * timeout)
        return json.loads(out.stdout)

    def serve(self, tcp_ports=(), udp_ports=(), echo_ports=(), reply: str | None = None) -> subprocess.Popen:
        """Start the small TCP(HTTP)/UDP server that answers with the pod's name."""
        args = [sys.executable, str(PODSERVER), "--name", reply or self.name]
        for p in echo_ports:
            args += ["--echo", str(p)]
        for p in tcp_ports:
            args += ["--tcp", str(p)]
        for p in udp_ports:
            args += ["--udp", str(p)]
        proc = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = proc.stdout.readline()  # "ready" once every socket is bound
        if "ready" not in line:
            raise RuntimeError(f"pod {self.name}: server failed: {proc.stderr.read()[-1000:]}")
        return proc


class Sandbox(SetUp):
    """A bridge in a node namespace, plus pods. Use as a context manager."""

    def __init__(self, prefix: str | None = None, subnet4: str = "10.244.0.0/24",
                 subnet6: str = "fd00:10:244::/64", cgroup_parent: str | None = None):
        self.prefix = prefix or f"nw{secrets.token_hex(3)}"
        self.net4 = ipaddress.ip_network(subnet4)
        self.net6 = ipaddress.ip_network(subnet6)
        self.node_netns = f"{self.prefix}-node"
        root = cgroup_parent or detect_cgroup2_root()
        self.cgroup = os.path.join(root, f"nodewire-{self.prefix}")
        self.pods: dict[str, Pod] = {}
        self._next_host = 2
        self._up = False

    # -- lifecycle -----------------------------------------------------------------------------
    def up(self) -> None:
        os.makedirs(self.cgroup, exist_ok=True)
        gw4, gw6 = self.gateway4, self.gateway6
        _ip("netns", "add", self.node_netns)
        self._up = True
        _ip_batch(self.node_netns, [
            "link set lo up",
            "link add br0 type bridge",
            f"addr add {gw4}/{self.net4.prefixlen} dev br0",
            f"addr add {gw6}/{self.net6.prefixlen} dev br0 nodad",
            "link set br0 up",
        ])

    @property
    def gateway4(self) -> str:
        return str(self.net4[1])

    @property
    def gateway6(self) -> str:
        return str(self.net6[1])

    def add_pod(self, name: str, namespace: str = "default") -> Pod:
        n = self._next_host
        self._next_host += 1
        idx = len(self.pods)
        pod = Pod(
            name=name, namespace=namespace, netns=f"{self.prefix}-{name}",
            ip4=str(self.net4[n]), ip6=str(self.net6[n]),
            cgroup=os.path.join(self.cgroup, f"pod-{name}"), host_veth=f"veth{idx}",
        )
        os.makedirs(pod.cgroup, exist_ok=True)
        _ip("netns", "add", pod.netns)
        self.pods[name] = pod
        _ip_batch(self.node_netns, [
            f"link add {pod.host_veth} type veth peer name eth0 netns {pod.netns}",
            f"link set {pod.host_veth} master br0 up",
        ])
        _ip_batch(pod.netns, [
            "link set lo up",
            f"addr add {pod.ip4}/{self.net4.prefixlen} dev eth0",
            f"addr add {pod.ip6}/{self.net6.prefixlen} dev eth0 nodad",
            "link set eth0 up",
            f"route add default via {self.gateway4}",
            f"route add default via {self.gateway6}",
        ])
        return pod

    def remove_pod(self, name: str) -> None:
        pod = self.pods.pop(name)
        self._kill_pod(pod)
        _ip("netns", "del", pod.netns, check=False)
        _rmdir(pod.cgroup)

    def _kill_pod(self, pod: Pod) -> None:
        for p in pod.procs:
            if p.poll() is None:
                p.kill()
        _kill_cgroup(pod.cgroup)
        for p in pod.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (p.stdout, p.stderr, p.stdin):
                if stream:
                    stream.close()
        pod.procs.clear()

    def close(self) -> None:
        for pod in list(self.pods.values()):
            try:
                self.remove_pod(pod.name)
            except Exception:  # keep cleaning
                pass
        if self._up:
            _ip("netns", "del", self.node_netns, check=False)
            self._up = False
        _kill_cgroup_tree(self.cgroup)


def _rmdir(path: str) -> None:
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def _kill_cgroup(path: str) -> None:
    """SIGKILL every process in a cgroup and its descendants (cgroup v2's cgroup.kill)."""
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        pass


def _kill_cgroup_tree(path: str) -> None:
    if not os.path.isdir(path):
        return
    _kill_cgroup(path)
    for root, dirs, _files in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        for d in dirs:
            _rmdir(os.path.join(root, d))
    _rmdir(path)
