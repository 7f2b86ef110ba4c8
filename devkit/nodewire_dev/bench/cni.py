"""`nodewire bench cni`: what nodewire-cni adds to a pod's start-up.

- ADD latency of nodewire-cni alone (the static binary `nodewire cni install` puts in the bin dir),
  against a running agent, with the real prevResult of Debian's bridge + host-local; side by side,
  interleaved, with the Python plugin it replaced (agent/cni/plugin.py of the commit before its
  removal, read from git and installed as that commit did: a `python3 -IS` launcher and its compiled
  module; or --python-plugin FILE), the venv's entry point (.venv/bin/nodewire-cni: a link to the
  binary after scripts/install.sh, else pip's wrapper that execs it), the bare interpreter start
  (`python3 -IS -c pass`), `/bin/cat` run exactly as the plugin is (the floor of any plugin: a
  process started, its stdin written, its stdout read and decoded) and the agent API's round trip from an in-process client. DEL after each ADD is not timed;
  `--gap` spaces the ADDs (default 0.2 s; 0 is back to back, the agent still busy with the previous pod).
- ADD → first exported per-pod series: real chain ADD of a fresh pod, then one ping a round from the
  pod and a scrape of /metrics until `k8s_pod_network_io_bytes_total` for the pod is there.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import click

from agent.api import call
from agent.cni.install import PluginSettings, install_binary, install_conf
from agent.config import state_dir_for

from ..cni_runtime import Runtime, invoke, pod_env
from ..sandbox import Sandbox

DEBIAN_CNI = "/usr/lib/cni"
NODEWIRE = str(Path(sys.executable).with_name("nodewire"))


def _spawn(argv: list[str], stdin: bytes, env: dict) -> tuple[int, bytes]:
    """Run a plugin as a runtime does (posix_spawn, its config on stdin, its result read from stdout),
    with as little of Python's subprocess machinery as possible in the time measured (under load
    subprocess.run added ~0.5 ms of its own, measured), the same way for every variant."""
    r0, w0 = os.pipe()
    r1, w1 = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    fa = [(os.POSIX_SPAWN_DUP2, r0, 0), (os.POSIX_SPAWN_DUP2, w1, 1), (os.POSIX_SPAWN_DUP2, null, 2)]
    fa += [(os.POSIX_SPAWN_CLOSE, fd) for fd in (r0, w0, r1, w1, null)]
    pid = os.posix_spawn(argv[0], argv, env, file_actions=fa)
    for fd in (r0, w1, null):
        os.close(fd)
    try:
        os.write(w0, stdin)
    except BrokenPipeError:  # it exited without reading its config
        pass
    os.close(w0)
    out = b""
    while chunk := os.read(r1, 65536):
        out += chunk
    os.close(r1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _summary(ms: list[float]) -> dict:
    return {"p50_ms": round(_pct(ms, 0.5), 2), "p99_ms": round(_pct(ms, 0.99), 2), "runs": len(ms)}


def _netns(d: Path, name: str) -> str:
    p = d / name
    p.touch()
    subprocess.run(["unshare", f"--net={p}", "true"], check=True)
    return str(p)


def _series(port: int, pod: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return f'k8s_pod_name="{pod}"' in r.read().decode() and True


def python_plugin(bin_dir: Path, source: str | None) -> Path | None:
    """The Python plugin nodewire-cni was before the static one, installed as it was (launcher + .pyc)."""
    import py_compile

    if source:
        text = Path(source).read_text()
    else:
        repo = Path(__file__).resolve().parents[3]
        git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True)  # noqa: E731
        gone = git("rev-list", "-1", "HEAD", "--", "agent/cni/plugin.py").stdout.strip()
        shown = git("show", f"{gone}^:agent/cni/plugin.py") if gone else None
        if not shown or shown.returncode != 0:
            return None
        text = shown.stdout
    lib = bin_dir / ".python-plugin"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "nodewire_cni.py").write_text(text)
    py_compile.compile(str(lib / "nodewire_cni.py"), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    launcher = bin_dir / "nodewire-cni-python"
    launcher.write_text(f"#!/usr/bin/python3 -IS\nimport sys\nsys.path.insert(0, {str(lib)!r})\n"
                        "from nodewire_cni import main\nmain()\n")
    launcher.chmod(0o755)
    return launcher


def run_bench(runs: int, series_pods: int, gap: float = 0.2, python_source: str | None = None) -> dict:
    net = f"10.{random.randrange(100, 200)}.{random.randrange(0, 256)}"
    with Sandbox(subnet4=f"{net}.0/24") as sb, tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        (tmp / "netns").mkdir()
        (tmp / "net.d").mkdir()
        (tmp / "m").mkdir()
        pin = f"/sys/fs/bpf/{sb.prefix}-cnib"
        port = _free_port()
        log = open(tmp / "agent.log", "w")
        agent = subprocess.Popen([NODEWIRE, "run", "--manifests", str(tmp / "m"), "--cgroup", sb.cgroup, "--pin-dir", pin,
                                  "--veth-netns", sb.node_netns, "--netns-dir", str(tmp / "netns"), "--node-name", "bench-cni",
                                  "--metrics-addr", f"127.0.0.1:{port}", "--no-rdma"], stdout=log, stderr=subprocess.STDOUT)
        mounts = []
        try:
            _wait_synced(pin, agent)
            sock = str(Path(state_dir_for(pin), "api.sock"))
            (tmp / "net.d" / "10-b.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "b", "plugins": [
                {"type": "bridge", "bridge": f"{sb.prefix}c0", "isGateway": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{net}.0/24"}]], "dataDir": str(tmp / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}}]}))
            binary = install_binary(str(tmp / "bin"))
            conflist = json.loads(install_conf(str(tmp / "net.d"), PluginSettings(socket=sock)).read_text())
            rt = Runtime(conflist, [str(tmp / "bin"), DEBIAN_CNI], f"/var/run/netns/{sb.node_netns}")
            old = python_plugin(tmp / "bin", python_source)
            add_ms = _add_latency(rt, conflist, binary, old, tmp, mounts, runs, gap, sock)
            first = _first_series(rt, tmp, mounts, port, net, series_pods)
        finally:
            agent.terminate()
            agent.wait(20)
            subprocess.run([NODEWIRE, "cleanup", "--pin-dir", pin, "--cgroup", sb.cgroup], capture_output=True)
            for m in mounts:
                subprocess.run(["umount", m], capture_output=True)
        return {"add": add_ms, "add_to_first_series_s": first, "gap_s": gap}


def _add_latency(rt, conflist, binary, old, tmp, mounts, runs, gap, sock) -> dict:
    ns = _netns(tmp / "netns", "lat")
    mounts.append(ns)
    pod = ("bench", "lat", "u")
    prev = rt.add("lat" * 8, ns, pod).out  # the real prevResult nodewire-cni gets
    conf = dict(conflist["plugins"][-1], cniVersion="1.0.0", name="b", prevResult=prev)
    venv_plugin = str(Path(sys.executable).with_name("nodewire-cni"))
    variants = {"static (installed binary)": [str(binary)]}
    if old is not None:
        variants["python (before: python3 -IS)"] = [str(old)]
    variants["venv entry (.venv/bin)"] = [venv_plugin]
    times: dict[str, list[float]] = {k: [] for k in variants}
    stdin, path = json.dumps(conf).encode(), os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    floor, api, spawn = [], [], []
    for i in range(runs):
        time.sleep(gap)  # pods arrive at most 1/gap per second: the agent is done with the last one
        t0 = time.perf_counter()
        call(sock, "ping")
        api.append((time.perf_counter() - t0) * 1000)
        for name, argv in variants.items():
            cid = secrets.token_hex(32)
            env = pod_env(cid, ns, ("bench", f"p{i}", "u"))
            t0 = time.perf_counter()
            code, out = _spawn(argv, stdin, dict(env, CNI_COMMAND="ADD", PATH=path))
            times[name].append((time.perf_counter() - t0) * 1000)
            if code != 0 or json.loads(out) != dict(prev, cniVersion="1.0.0"):
                raise click.ClickException(f"{name}: ADD failed: {code} {out[:300]!r}")
            invoke(argv[0], "DEL", conf, env)
        t0 = time.perf_counter()
        _spawn(["/usr/bin/python3", "-IS", "-c", "pass"], b"", {"PATH": path})
        floor.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        _spawn(["/bin/cat"], stdin, dict(env, CNI_COMMAND="ADD", PATH=path))  # prints its stdin: the floor
        spawn.append((time.perf_counter() - t0) * 1000)
    out = {k: _summary(v) for k, v in times.items()}
    out["python3 -IS -c pass (Python floor)"] = _summary(floor)
    out["/bin/cat (floor: start, stdin, stdout)"] = _summary(spawn)
    out["agent API round trip (in-process client)"] = _summary(api)
    if old is not None:
        new, before = out["static (installed binary)"], out["python (before: python3 -IS)"]
        out["ratio python/static"] = {k: round(before[k] / max(new[k], 1e-3), 1) for k in ("p50_ms", "p99_ms")}
    return out


def _first_series(rt, tmp, mounts, port, net, pods) -> dict:
    got = []
    for i in range(pods):
        name = f"first{i}"
        ns = _netns(tmp / "netns", name)
        mounts.append(ns)
        t0 = time.monotonic()
        r = rt.add(secrets.token_hex(32), ns, ("bench", name, "u"))
        if r.code != 0:
            raise click.ClickException(f"chain ADD failed: {r}")
        while not _series(port, name):
            subprocess.run(["nsenter", f"--net={ns}", "ping", "-c", "1", "-W", "0.1", f"{net}.1"], capture_output=True)
            if time.monotonic() - t0 > 30:
                raise click.ClickException(f"no series for {name} after 30 s")
        got.append(time.monotonic() - t0)
    return {"median": round(statistics.median(got), 3), "max": round(max(got), 3), "pods": pods,
            "note": "includes the whole chain ADD (bridge, host-local, portmap, nodewire-cni) and the first ping"}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_synced(pin: str, proc) -> None:
    status = Path(state_dir_for(pin), "status.json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"agent exited {proc.returncode}")
        try:
            if json.loads(status.read_text()).get("first_sync"):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise click.ClickException("agent did not sync in 120 s")


@click.command("cni")
@click.option("--runs", default=200, show_default=True, help="ADD invocations per variant.")
@click.option("--series-pods", default=5, show_default=True, help="Pods timed from ADD to their first series.")
@click.option("--gap", default=0.2, show_default=True, help="Seconds between ADDs (0: back to back).")
@click.option("--python-plugin", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The Python plugin to compare with [default: agent/cni/plugin.py from git, before its removal].")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def bench_cni(runs, series_pods, gap, python_plugin, output) -> None:
    """nodewire-cni ADD latency (p50/p99, static vs the Python plugin) and ADD → first per-pod series."""
    res = run_bench(runs, series_pods, gap, python_plugin)
    if output != "table":
        from agent.output import emit
        emit(res, output)
        return
    for name, s in res["add"].items():
        if "runs" not in s:
            click.echo(f"ADD {name:<30} p50 ×{s['p50_ms']:<5} p99 ×{s['p99_ms']}")
            continue
        click.echo(f"ADD {name:<30} p50 {s['p50_ms']:6.2f} ms  p99 {s['p99_ms']:6.2f} ms  ({s['runs']} runs)")
    f = res["add_to_first_series_s"]
    click.echo(f"ADD → first per-pod series: median {f['median']:.3f} s, max {f['max']:.3f} s over {f['pods']} pods ({f['note']})")
