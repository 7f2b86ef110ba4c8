"""Small measuring helpers: a capped, rusage-accounted run of a loader in a network namespace, and
kernel memory readings."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass


@dataclass
class LoadResult:
    seconds: float
    cpu_seconds: float  # user + system time of the loader process (kernel work it caused included)
    timed_out: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.timed_out and not self.error


def run_capped(argv: list[str], text: str | None, cap_s: float, netns: str | None = None,
               cgroup_procs: str | None = None) -> LoadResult:
    """Run `argv [file]` (the text written to a temp file first, so generating it is not timed) inside
    `netns`; kill it after `cap_s`. Wall time covers process start to exit, as kube-proxy's exec does."""
    path = None
    if text is not None:
        fd, path = tempfile.mkstemp(prefix="nodewire-bench-", suffix=".rules")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        argv = [*argv, path]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        t0 = time.perf_counter()
        def enter_cgroup():
            if cgroup_procs:
                with open(cgroup_procs, "w") as f:
                    f.write("0")

        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=enter_cgroup)
        timed_out = False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > cap_s:
                timed_out = True
                p.send_signal(signal.SIGKILL)
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        p.stderr.close()
        error = "" if timed_out or p.returncode == 0 else f"exit {p.returncode}: {err.strip()[:500]}"
        return LoadResult(elapsed, ru.ru_utime + ru.ru_stime, timed_out, error)
    finally:
        if path:
            os.unlink(path)


class KmemCgroup:
    """A memory cgroup to run a rule loader in: the kernel charges the rules, chains and set elements
    it allocates for that process (netfilter allocates them GFP_KERNEL_ACCOUNT) to the cgroup, and
    the charge stays while they live. So its kernel-memory usage after the loader exits is the
    memory of the rules themselves, unlike a machine-wide /proc/meminfo delta on a shared machine.
    Uses cgroup v1's memory.kmem.usage_in_bytes (this machine's hybrid layout) or cgroup v2's
    memory.stat `kernel`; None where neither exists."""

    def __init__(self, name: str):
        self.path = None
        for root, probe in (("/sys/fs/cgroup/memory", "memory.kmem.usage_in_bytes"),
                            ("/sys/fs/cgroup", "memory.stat")):
            if os.path.isfile(os.path.join(root, probe)):
                self.path = os.path.join(root, name)
                os.makedirs(self.path, exist_ok=True)
                break

    @property
    def procs(self) -> str | None:
        return os.path.join(self.path, "cgroup.procs") if self.path else None

    def kernel_bytes(self) -> int | None:
        if not self.path:
            return None
        v1 = os.path.join(self.path, "memory.kmem.usage_in_bytes")
        if os.path.isfile(v1):
            with open(v1) as f:
                return int(f.read())
        with open(os.path.join(self.path, "memory.stat")) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == "kernel":
                    return int(v)
        return None

    def remove(self) -> None:
        if self.path:
            try:
                os.rmdir(self.path)
            except OSError:
                pass
