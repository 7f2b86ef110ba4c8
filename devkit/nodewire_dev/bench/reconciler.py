"""`nodewire bench reconciler`: the reconciler alone against real pinned maps (root), side by side.

For each implementation (this checkout's, and optionally another file such as main's old
reconciler.py) a child process builds N Services × E endpoints as Frontends, then measures into a
scratch pin dir under /sys/fs/bpf/nw-planner-*: the first full sync into empty maps, a second full
sync with nothing changed, a restart (registry restored from the maps + full sync), and one endpoint
change at a time (p50/p99), wall and CPU seconds (CPU time is steadier on a shared machine). Memory:
the child's RSS before the first sync, its peak during it, and after it (heap trimmed, as the agent does);
what a reconciler keeps (tracemalloc over a restart: restore + a full sync changing nothing; the
desired state excluded) and the peak of that restart.
Figures are printed, never asserted.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import click

from agent.model.frontends import Backend, Frontend
from agent.model.objects import ObjectKey


def _ip(prefix: int, i: int) -> str:
    return f"{prefix}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def desired(n: int, endpoints: int) -> dict[ObjectKey, list[Frontend]]:
    """N Services, one TCP port each, `endpoints` distinct backends each (N × E backends)."""
    out = {}
    for s in range(n):
        key = ObjectKey("bench", f"svc-{s}")
        bes = tuple(sorted(Backend(_ip(10, s * endpoints + e + 1), 8080, "TCP") for e in range(endpoints)))
        out[key] = [Frontend(_ip(172, s + 1), 80, "TCP", key, "http", bes)]
    return out


def _trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _load(impl: str):
    if impl == "new":
        from agent.datapath.reconciler import Reconciler
        return Reconciler
    spec = importlib.util.spec_from_file_location("agent.datapath._bench_other", impl)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.Reconciler


def _timed(rec, changes, full=False):
    """(result, wall seconds, CPU seconds) of one apply, the cyclic GC off as the agent has it
    around a sync."""
    gc.disable()
    try:
        t, cpu = time.perf_counter(), time.process_time()
        r = rec.apply(changes, full=full)
        return r, time.perf_counter() - t, time.process_time() - cpu
    finally:
        gc.enable()


def measure(impl: str, n: int, endpoints: int, changes: int) -> dict:
    from agent.datapath.loader import MapSizes, SockLB, remove_pins

    Reconciler = _load(impl)
    want = desired(n, endpoints)
    pin = f"/sys/fs/bpf/nw-planner-{secrets.token_hex(3)}"
    state = tempfile.mkdtemp(prefix="nw-planner-")
    lb = SockLB(pin, MapSizes(services=1 << 20, backends=1 << 20), state_dir=state)
    try:
        gc.collect()
        gc.disable()  # as the agent does around a sync (agent.py)
        rss0 = _rss_mib()
        rec = Reconciler(lb.services, lb.backends)
        t, cpu, ru = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        r1 = rec.apply(want, full=True)
        first, first_cpu = time.perf_counter() - t, time.process_time() - cpu
        ru2 = resource.getrusage(resource.RUSAGE_SELF)
        first_user, first_sys = ru2.ru_utime - ru.ru_utime, ru2.ru_stime - ru.ru_stime  # Python / kernel
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        gc.enable()
        gc.collect()
        _trim()  # as the agent does after its first sync: free heap goes back to the system
        rss1 = _rss_mib()
        r2, again, again_cpu = _timed(rec, want, full=True)
        del rec
        gc.collect()
        gc.disable()
        t = time.perf_counter()
        r3 = Reconciler(lb.services, lb.backends).apply(want, full=True)
        restart = time.perf_counter() - t
        gc.enable()
        # what a reconciler keeps: one restored from the maps, after a full sync that changes nothing
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        rec2 = Reconciler(lb.services, lb.backends)
        rec2.apply(want, full=True)
        gc.collect()
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        lat, lat_cpu = [], []
        keys = list(want)
        for i in range(changes):  # replace one endpoint of one Service, then put it back
            key = keys[(i * 7919) % n]
            fe = want[key][0]
            moved = fe._replace(backends=tuple(sorted(fe.backends[1:] + (Backend(_ip(11, i + 1), 8080, "TCP"),))))
            for version in (moved, fe):
                _, wall, cpu = _timed(rec2, {key: [version]})
                lat.append(wall)
                lat_cpu.append(cpu)
        lat.sort()
        lat_cpu.sort()
        return {
            "impl": impl, "services": n, "endpoints": endpoints,
            "first_sync_s": round(first, 3), "first_sync_cpu_s": round(first_cpu, 3),
            "first_sync_user_s": round(first_user, 3), "first_sync_sys_s": round(first_sys, 3),
            "written": r1.written, "errors": len(r1.errors),
            **({"first_plan_s": round(r1.plan_seconds, 3), "first_write_s": round(r1.write_seconds, 3)}
               if hasattr(r1, "plan_seconds") else {}),
            "resync_s": round(again, 3), "resync_cpu_s": round(again_cpu, 3), "resync_written": r2.written,
            "restart_s": round(restart, 3), "restart_written": r3.written + r3.deleted,
            "change_p50_ms": round(statistics.median(lat) * 1000, 3),
            "change_p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 3),
            "change_cpu_p50_ms": round(statistics.median(lat_cpu) * 1000, 3),
            "change_cpu_p99_ms": round(lat_cpu[int(len(lat_cpu) * 0.99) - 1] * 1000, 3),
            "kept_mib": round((kept - base) / 2**20, 1), "restart_peak_mib": round((peak - base) / 2**20, 1),
            "rss_before_mib": round(rss0, 1), "rss_after_mib": round(rss1, 1),
            "first_sync_peak_rss_mib": round(peak_rss, 1),
        }
    finally:
        lb.close()
        remove_pins(pin)
        shutil.rmtree(state, ignore_errors=True)


COLUMNS = ["impl", "first_sync_s", "first_sync_cpu_s", "first_sync_user_s", "first_sync_sys_s", "resync_s", "resync_cpu_s", "restart_s", "restart_written",
           "change_p50_ms", "change_p99_ms", "change_cpu_p50_ms", "change_cpu_p99_ms", "kept_mib", "restart_peak_mib", "rss_before_mib",
           "first_sync_peak_rss_mib", "rss_after_mib", "errors"]


@click.command()
@click.option("--services", default=100_000, show_default=True)
@click.option("--endpoints", default=5, show_default=True)
@click.option("--changes", default=200, show_default=True, help="Single-endpoint changes timed (×2: out and back).")
@click.option("--compare", "others", multiple=True,
              help="Another reconciler.py, or another checkout's directory, to run side by side "
                   "(e.g. from `git show 56679d1:agent/datapath/reconciler.py`, or `git worktree add DIR main`).")
@click.option("--child", hidden=True, default=None)
def reconciler(services, endpoints, changes, others, child) -> None:
    """Reconciler alone into real pinned maps: sync time, change latency, memory kept."""
    if child:
        click.echo(json.dumps(measure(child, services, endpoints, changes)))
        return
    rows = []
    for impl in (*others, "new"):
        # a directory: another checkout (e.g. `git worktree add DIR main`), its agent/ first on the path
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([impl, os.environ.get("PYTHONPATH", "")])) \
            if os.path.isdir(impl) else None
        out = subprocess.run([sys.executable, "-m", "nodewire_dev.bench.reconciler", "--services", str(services),
                              "--endpoints", str(endpoints), "--changes", str(changes),
                              "--child", "new" if env else impl], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise click.ClickException(out.stderr[-2000:])
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), **({"impl": impl} if env else {})})
    click.echo(" | ".join(COLUMNS))
    for r in rows:
        click.echo(" | ".join(str(r[c]) for c in COLUMNS))
    click.echo(json.dumps(rows))


if __name__ == "__main__":
    reconciler()
