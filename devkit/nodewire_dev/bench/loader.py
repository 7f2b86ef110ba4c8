"""`nodewire bench loader`: what compiling out of the agent buys. The agent with the load balancer
alone (`--no-observe --no-rdma`; `--default-flags`: observe and rdma on) from this checkout, and optionally from another commit (`--against`,
e.g. one that still compiled with BCC in-process), started cold (no pins) and restarted (pins kept),
interleaved round by round: RSS after the first sync (the agent's, and its child processes' if it
keeps any), datapath load time, start → first sync, the compile child's peak RSS and time."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.config import state_dir_for
from agent.datapath.attach import detect_cgroup2_root

from .nodewire_mode import _service_doc, _slice_doc, _write_json
from .services import make_services

RUN = "import sys; from agent.cli import main; sys.exit(main())"
CHECKOUT = Path(__file__).resolve().parents[3]


def _tree(commit: str, into: Path) -> Path:
    """The agent as it was at a commit (git archive of this checkout)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(CHECKOUT), "archive", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


class _Agent:
    def __init__(self, tree: Path, manifests: Path, cgroup: str, pin_dir: str, log: Path, flags: list[str]):
        self.tree, self.manifests, self.cgroup, self.pin_dir, self.log = tree, manifests, cgroup, pin_dir, log
        self.flags = flags
        self.env = dict(os.environ, PYTHONPATH=str(tree))

    def cli(self, *args: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", RUN, *args], cwd=self.tree, env=self.env,
                              capture_output=True, text=True, **kw)

    def start_until_synced(self, timeout: float = 600) -> dict:
        status = Path(state_dir_for(self.pin_dir), "status.json")
        status.unlink(missing_ok=True)
        t0 = time.monotonic()
        with open(self.log, "a") as logf:
            proc = subprocess.Popen([sys.executable, "-c", RUN, "run", "--manifests", str(self.manifests),
                                     "--cgroup", self.cgroup, "--pin-dir", self.pin_dir, *self.flags],
                                    cwd=self.tree, env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        try:
            while time.monotonic() - t0 < timeout:
                try:
                    first = json.loads(status.read_text()).get("first_sync")
                except (FileNotFoundError, json.JSONDecodeError):
                    first = None
                if first:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"agent exited {proc.returncode}: {self.log.read_text()[-2000:]}")
                time.sleep(0.02)
            synced = time.monotonic() - t0
            time.sleep(2)  # let the start-up heap settle (malloc_trim after the first sync)
            loads = re.findall(r"load_seconds=([0-9.]+)", self.log.read_text())
            return {"start_to_synced_s": round(synced, 2), "load_s": float(loads[-1]) if loads else None,
                    "agent_rss_mib": round(_rss_mib(proc.pid), 1), "written": first["written"],
                    "helpers_rss_mib": round(sum(_rss_mib(c) for c in _children(proc.pid)), 1)}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def _child(pin_dir: str) -> dict:
    rec = Path(state_dir_for(pin_dir), "programs", "sock_lb.json")
    if not rec.exists():
        return {}
    r = json.loads(rec.read_text())
    return {"child_s": r.get("seconds"), "child_peak_rss_mib": round(r.get("peak_rss_kib", 0) / 1024, 1)}


def run(services: list[int], against: str | None = None, rounds: int = 2, default_flags: bool = False) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="nodewire-bench-loader-"))
    try:
        return _run(work, services, against, rounds, default_flags)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, services: list[int], against: str | None, rounds: int, default_flags: bool) -> list[dict]:
    flags = ["--metrics-addr", "127.0.0.1:0", *([] if default_flags else ["--no-observe", "--no-rdma"])]
    trees = {"this": CHECKOUT}
    if against:
        trees[against] = _tree(against, work / "against")
    root, rows = detect_cgroup2_root(), []
    for n in services:
        manifests = work / f"manifests-{n}"
        manifests.mkdir()
        svcs = make_services(n, ["10.244.0.2"], 1) if n else []
        _write_json(manifests / "services.json", [d for s in svcs for d in (_service_doc(s), _slice_doc(s))])
        for rnd in range(rounds):
            for label, tree in trees.items():
                tag = f"nwbench-loader-{secrets.token_hex(3)}"
                cgroup, pin = os.path.join(root, tag), f"/sys/fs/bpf/{tag}"
                os.mkdir(cgroup)
                agent = _Agent(tree, manifests, cgroup, pin, work / f"{tag}.log", flags)
                try:
                    for phase in ("cold", "restart"):
                        row = {"tree": label, "services": n, "round": rnd, "phase": phase,
                               **agent.start_until_synced()}
                        if phase == "cold":
                            row.update(_child(pin))
                        rows.append(row)
                finally:
                    agent.cli("cleanup", "--pin-dir", pin, "--cgroup", cgroup)
                    os.rmdir(cgroup)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| tree | Services | round | phase | agent RSS MiB | helpers RSS MiB | load s | start→synced s "
            "| child peak MiB | child s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['tree']} | {r['services']} | {r['round']} | {r['phase']} | {r['agent_rss_mib']} | {r['helpers_rss_mib']} | "
                     f"{r['load_s']} | {r['start_to_synced_s']} | {r.get('child_peak_rss_mib', '–')} | "
                     f"{r.get('child_s', '–')} |")
    return "\n".join(lines)
