"""Optional parts failing for real (no injection in the agent): one tracepoint missing, and one optional
BPF program (the observer's tcp_latency.c) failing to compile. The agent runs in a mount namespace of
its own where the tracepoint's tracefs directory is hidden, or where a broken copy of the C file is
bind-mounted over the real one; traffic to a Service runs the whole time and must never fail once the
agent has synced, and the log must name what is missing."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from agent.datapath.loader import BPF_DIR
from tests.conftest import NODEWIRE, wait_for
from tests.fault_helpers import Traffic
from tests.manifests import endpoint_slice, service, write
from tests.test_faults import FAULTS, UnmountedAgent, pods, report_faults  # noqa: F401 (fixtures)

pytestmark = pytest.mark.root


class MountNsAgent(UnmountedAgent):
    """UnmountedAgent with other preparations of its private mount namespace (`boot`: Python code)."""

    def __init__(self, manifests: Path, cgroup: str, pin_dir: str, boot: str):
        super().__init__(manifests, cgroup, pin_dir)
        self.boot = boot

    def start(self) -> "MountNsAgent":
        import subprocess

        code = "import os, subprocess, sys\n" + self.boot + "os.execv(sys.argv[1], sys.argv[1:])\n"
        self._logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", code,
             NODEWIRE, "--debug", "run", "--manifests", str(self.manifests), "--cgroup", self.cgroup,
             "--pin-dir", self.pin_dir, "--metrics-addr", "", "--no-rdma", "--check-interval", "0"],
            stdout=self._logf, stderr=subprocess.STDOUT)
        wait_for(lambda: self.status().get("first_sync") or self.proc.poll() is not None, 120, what="first sync")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self


def _run(pods, sandbox, tmp_path, name: str, vip: str, boot: str) -> tuple[MountNsAgent, Traffic, float]:
    client, bes = pods
    write(tmp_path / "a.json", service(name, [vip]), endpoint_slice(name, [bes[1].ip4]))
    agent = MountNsAgent(tmp_path, sandbox.cgroup, f"/sys/fs/bpf/{sandbox.prefix}-{name}", boot)
    traffic = Traffic(client, [f"{vip}:80"]).__enter__()
    agent.start()
    synced = time.time()
    time.sleep(2)
    traffic.stop()
    assert client.probe("tcp", vip, 80, count=5)["replies"] == {bes[1].name: 5}
    return agent, traffic, synced


def _failures_after(traffic: Traffic, t: float) -> int:
    return sum(1 for when, _target, _err in traffic.report["failures"] if when > t)


def test_one_tracepoint_missing_the_agent_runs_without_its_metrics(pods, sandbox, tmp_path):
    boot = ("subprocess.run(['mount', '-t', 'tmpfs', 'none', '/sys/kernel/tracing/events/skb/kfree_skb'],"
            " check=True)\n")
    agent, traffic, synced = _run(pods, sandbox, tmp_path, "tpmiss", "10.96.65.1", boot)
    try:
        log = agent.log.read_text()
        assert "tracepoint missing, its metrics are off tracepoint=skb:kfree_skb" in log, log[-3000:]
        assert _failures_after(traffic, synced) == 0, traffic.report
        FAULTS["one tracepoint missing (skb:kfree_skb)"] = (traffic.attempts, traffic.failed,
                                                           "failures only before the first sync")
    finally:
        agent.stop()


def test_one_optional_program_failing_to_compile_leaves_the_load_balancer(pods, sandbox, tmp_path):
    broken = tmp_path / "tcp_latency_broken.c"
    broken.write_text((BPF_DIR / "tcp_latency.c").read_text() + "\nthis is not C;\n")
    target = os.path.realpath(BPF_DIR / "tcp_latency.c")
    boot = f"subprocess.run(['mount', '--bind', {str(broken)!r}, {target!r}], check=True)\n"
    agent, traffic, synced = _run(pods, sandbox, tmp_path, "progfail", "10.96.65.2", boot)
    try:
        log = agent.log.read_text()
        assert "observer failed to start, running without observability" in log and "tcp_latency" in log, log[-3000:]
        assert _failures_after(traffic, synced) == 0, traffic.report
        FAULTS["optional program fails to compile (tcp_latency.c)"] = (traffic.attempts, traffic.failed,
                                                                      "failures only before the first sync")
    finally:
        agent.stop()
    assert "this is not C" not in (BPF_DIR / "tcp_latency.c").read_text()  # outside its namespace: untouched
