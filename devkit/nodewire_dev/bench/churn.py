"""`nodewire bench churn`: N Services whose endpoints change at a steady rate for a while, through one
source (a manifest directory, or the API server double): agent RSS over time, and at the end
`nodewire check` (every update applied: no drift; no leaked map entries: the kernel's frontends and
backends equal the desired ones)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

from agent.config import state_dir_for
from agent.datapath.abi import SERVICES_MAP

from ..sandbox import Sandbox

NODEWIRE = str(Path(sys.executable).with_name("nodewire"))
AGENT_FLAGS = ["--no-observe", "--no-rdma", "--check-interval", "0", "--metrics-addr", ""]
POOL = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(2000)]  # endpoint addresses (never dialled)


def _vip(i: int) -> str:
    return f"10.{96 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def _objects(i: int, eps: list[str]) -> tuple[dict, dict]:
    name = f"c{i}"
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": _vip(i + 1), "clusterIPs": [_vip(i + 1)], "ipFamilies": ["IPv4"],
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": f"{name}-1", "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
          "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
          "endpoints": [{"addresses": [a], "conditions": {"ready": True, "serving": True, "terminating": False}}
                        for a in eps]}
    return svc, sl


class _Manifests:
    """One file per Service; an update rewrites that file atomically."""

    def __init__(self, d: Path):
        self.d = d
        d.mkdir(parents=True, exist_ok=True)

    def put(self, i: int, eps: list[str]) -> None:
        tmp = self.d / f".c{i}.tmp"
        tmp.write_text(json.dumps({"kind": "List", "apiVersion": "v1", "items": list(_objects(i, eps))}))
        tmp.rename(self.d / f"c{i}.json")

    def args(self) -> list[str]:
        return ["--manifests", str(self.d)]

    def close(self) -> None:
        pass


class _Api:
    """The API server double in this process; an update is one EndpointSlice update (a watch event)."""

    def __init__(self, d: Path):
        from ..fake_apiserver import FakeApiServer

        d.mkdir(parents=True, exist_ok=True)
        self.api = FakeApiServer(tls=True, tokens={"churn": "nodewire"}, bookmark_interval=30, workdir=d).start()
        (d / "token").write_text("churn")
        self.kubeconfig = d / "kubeconfig"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": self.api.url, "certificate-authority": self.api.cert_file}}],
            "users": [{"name": "u", "user": {"tokenFile": str(d / "token")}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        self.known: set[int] = set()

    def put(self, i: int, eps: list[str]) -> None:
        svc, sl = _objects(i, eps)
        if i not in self.known:
            self.api.apply(svc)
            self.known.add(i)
        self.api.apply(sl)

    def args(self) -> list[str]:
        return ["--kubeconfig", str(self.kubeconfig)]

    def close(self) -> None:
        self.api.stop()


def _status(pin_dir: str) -> dict:
    try:
        return json.loads(Path(state_dir_for(pin_dir), "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _check(src_args: list[str], pin_dir: str, cgroup: str) -> dict:
    out = subprocess.run([NODEWIRE, "check", *src_args, "--pin-dir", pin_dir, "--cgroup", cgroup, "-o", "json"],
                         capture_output=True, text=True, env=dict(os.environ, NODE_NAME="churn-node"))
    if out.returncode not in (0, 1):
        raise RuntimeError(f"nodewire check failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def run_churn(source: str, services: int, rate: float, seconds: float, workdir: Path, seed: int = 1) -> dict:
    """One run; returns the figures (nothing is asserted here)."""
    rng = random.Random(seed)
    desired = {i: rng.sample(POOL, rng.randint(1, 4)) for i in range(services)}
    src = _Manifests(workdir / "manifests") if source == "manifests" else _Api(workdir / "api")
    for i, eps in desired.items():
        src.put(i, eps)
    with Sandbox() as sb:
        pin = f"/sys/fs/bpf/{sb.prefix}-churn"
        log = open(workdir / f"agent-{source}.log", "w")
        proc = subprocess.Popen([NODEWIRE, "run", *src.args(), "--cgroup", sb.cgroup, "--pin-dir", pin, *AGENT_FLAGS],
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, NODE_NAME="churn-node"))
        try:
            deadline = time.monotonic() + 120
            while not _status(pin).get("first_sync"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent did not sync: {(workdir / f'agent-{source}.log').read_text()[-2000:]}")
                time.sleep(0.2)
            agent = psutil.Process(proc.pid)
            rss: list[tuple[float, int]] = []
            t0 = next_sample = time.monotonic()
            updates = 0
            while (now := time.monotonic()) - t0 < seconds:
                due = int((now - t0) * rate) - updates
                for _ in range(max(0, due)):
                    i = rng.randrange(services)
                    desired[i] = rng.sample(POOL, rng.randint(1, 4))
                    src.put(i, desired[i])
                    updates += 1
                if now >= next_sample:
                    rss.append((now - t0, agent.memory_info().rss))
                    next_sample = now + 1.0
                time.sleep(0.002)
            achieved = updates / (time.monotonic() - t0)
            rep = {}
            for _ in range(60):  # the agent catches up with the last updates
                time.sleep(0.5)
                rep = _check(src.args(), pin, sb.cgroup)
                if rep["clean"]:
                    break
            rss.append((time.monotonic() - t0, agent.memory_info().rss))
            want_entries = sum(1 + len(e) for e in desired.values())
            for _ in range(24):  # the status file follows the last sync within a few seconds (written on change)
                st = _status(pin)
                if st.get("maps", {}).get(SERVICES_MAP, {}).get("entries") == want_entries:
                    break
                time.sleep(0.5)
        finally:
            proc.kill()
            proc.wait(10)
            log.close()
            subprocess.run([NODEWIRE, "cleanup", "--pin-dir", pin, "--cgroup", sb.cgroup], capture_output=True)
            src.close()
    warm = [r for t, r in rss if t >= seconds * 0.2] or [rss[-1][1]]
    want_backends = len({(a, 8080) for eps in desired.values() for a in eps})
    return {
        "source": source, "services": services, "rate_target": rate, "rate_achieved": round(achieved, 1),
        "seconds": seconds, "updates": updates,
        "rss_mib_after_warmup": round(warm[0] / 2**20, 1), "rss_mib_max": round(max(warm) / 2**20, 1),
        "rss_mib_end": round(warm[-1] / 2**20, 1), "rss_growth_pct": round(100 * (max(warm) / warm[0] - 1), 1),
        "check_clean": rep.get("clean"), "drift": {k: n for k, n in rep.get("counts", {}).items() if n},
        "kernel_frontends": rep.get("kernel_frontends"), "desired_frontends": services,
        "kernel_backends": rep.get("kernel_backends"), "desired_backends": want_backends,
        "map_entries": {k: v["entries"] for k, v in st.get("maps", {}).items()},
        "desired_service_entries": want_entries,
    }
