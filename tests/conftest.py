"""Shared fixtures: a sandbox cluster (netns pods, child cgroup) and a real agent process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from agent.status import AgentStatus, read_status, status_path
from nodewire_dev.sandbox import Sandbox

NODEWIRE = str(Path(sys.executable).with_name("nodewire"))

# Fuzzing (tests/test_fuzz_*.py): bounded in CI; `make fuzz` (or --hypothesis-profile=long, or
# NW_FUZZ=long) runs the long profile. No deadline: the machine is shared and noisy.
settings.register_profile("ci", max_examples=int(os.environ.get("NW_FUZZ_EXAMPLES", "40")), deadline=None,
                          database=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck),
                          print_blob=True)
settings.load_profile(os.environ.get("NW_FUZZ", "ci"))


def wait_for(cond, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll cond() until it returns a truthy value; fail the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class AgentProcess:
    """`nodewire run` as a subprocess, attached to a sandbox's cgroup, with its own pin dir."""

    def __init__(self, manifests: Path, cgroup: str, pin_dir: str, extra=(), prefix=()):
        """prefix: argv the agent runs under, e.g. nsenter into a sandbox node's network namespace."""
        self.manifests, self.cgroup, self.pin_dir, self.extra = manifests, cgroup, pin_dir, list(extra)
        self.prefix = list(prefix)
        self.proc: subprocess.Popen | None = None
        self.log = manifests.parent / f"agent-{os.path.basename(pin_dir)}.log"

    def start(self, timeout: float = 60) -> "AgentProcess":
        Path(status_path(self.pin_dir)).unlink(missing_ok=True)
        self._logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [*self.prefix, NODEWIRE, "--debug", "run", "--manifests", str(self.manifests), "--cgroup", self.cgroup,
             "--pin-dir", self.pin_dir, *self.metrics_off(), *self.extra],
            stdout=self._logf, stderr=subprocess.STDOUT)
        wait_for(lambda: self.status().first_sync or self._died(), timeout, what="agent first sync")
        return self

    def metrics_off(self) -> list[str]:
        """The agent serves metrics on :9966 by default; parallel test agents turn it off unless
        a test asks for an address."""
        return [] if any(str(a).startswith("--metrics-addr") for a in self.extra) else ["--metrics-addr", ""]

    def _died(self):
        if self.proc.poll() is not None:
            pytest.fail(f"agent exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")

    def status(self) -> AgentStatus:
        """What the agent last wrote (an empty status before it wrote one)."""
        return read_status(self.pin_dir) or AgentStatus(pid=0, started=0.0, cgroup="", pin_dir=self.pin_dir)

    def synced_after(self, t: float) -> bool:
        """True once the agent has taken in (and applied) a source change made after time t."""
        return self.status().last_change > t

    def services(self) -> list[dict]:
        out = subprocess.run([NODEWIRE, "services", "-o", "json", "--pin-dir", self.pin_dir],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)

    def cleanup(self) -> None:
        self.kill(signal.SIGTERM)
        subprocess.run([*self.prefix, NODEWIRE, "cleanup", "--pin-dir", self.pin_dir, "--cgroup", self.cgroup],
                       capture_output=True, text=True)
        if getattr(self, "_logf", None):
            self._logf.close()


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox() as sb:
        yield sb


@pytest.fixture(scope="module")
def agent_factory(sandbox, tmp_path_factory):
    """Start agents on the module's sandbox; all of them are stopped and cleaned up at the end."""
    made: list[AgentProcess] = []

    def make(manifests: Path | None = None, pin_suffix: str = "", extra=(), prefix=()) -> AgentProcess:
        d = manifests or tmp_path_factory.mktemp("manifests")
        a = AgentProcess(d, sandbox.cgroup, f"/sys/fs/bpf/{sandbox.prefix}{pin_suffix}", extra, prefix)
        made.append(a)
        return a

    yield make
    for a in made:
        a.cleanup()
