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


def run_capped(argv: list[str], text: str | None, cap_s: float, netns: str | None = None) -> LoadResult:
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
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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


def kernel_memory_kib() -> int:
    """Slab plus vmalloc in use, from /proc/meminfo: where netfilter rules, chains and set elements
    live. Machine-wide, so a delta around a load is approximate on a shared machine."""
    want = {"Slab", "VmallocUsed"}
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in want:
                total += int(rest.split()[0])
    return total
