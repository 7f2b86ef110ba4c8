"""Shared by the fault tests: traffic running the whole time inside a client pod, counted."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

TRAFFIC = Path(__file__).with_name("traffic.py")


class Traffic:
    """`with Traffic(pod, ["10.96.0.1:80"]) as t: ...` then t.report: attempts/failed per target."""

    def __init__(self, pod, targets: list[str]):
        self.pod, self.targets = pod, targets
        self.report: dict | None = None

    def __enter__(self) -> "Traffic":
        self.proc = self.pod.popen([sys.executable, str(TRAFFIC), *self.targets])
        return self

    def stop(self) -> dict:
        if self.report is None:
            self.proc.send_signal(signal.SIGTERM)
            out, err = self.proc.communicate(timeout=30)
            self.pod.procs.remove(self.proc)
            self.report = json.loads(out) if out.strip() else {"error": err[-2000:]}
        return self.report

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        except (subprocess.TimeoutExpired, ValueError):
            self.proc.kill()

    @property
    def attempts(self) -> int:
        return sum(t["attempts"] for t in self.stop()["targets"].values())

    @property
    def failed(self) -> int:
        return sum(t["failed"] for t in self.stop()["targets"].values())
