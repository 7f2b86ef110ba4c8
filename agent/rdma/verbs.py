"""Verbs latency tracer: per-QP work-request latency and completion errors, with no change to the
workload.

`ibv_post_send`/`ibv_post_recv`/`ibv_poll_cq` are inline in <infiniband/verbs.h>; they jump through
`context->ops` into the provider (mlx5's functions are static in a stripped library). So:

1. a uretprobe on the exported `ibv_open_device` of each libibverbs file (global; the BPF side keeps
   only opted-in cgroups) reports the new context's post_send/post_recv/poll_cq addresses;
2. each address is mapped through /proc/PID/maps to (file, file offset) and then to the ELF virtual
   address BCC's attach_uprobe(addr=) wants; uprobes go on those addresses for that pid only;
3. the provider's addresses are cached per build-id, so a process that opened its device before we
   looked (or while we were off) is attached from its maps alone;
4. exited processes are detached and their series deleted; a duty cycle (on/period) bounds cost,
   because a uprobe's cost is the trap itself — filtering inside BPF cannot make it cheaper.

Blind spots (the calls never pass through these functions): the extended verbs API (`ibv_wr_*` on
`ibv_qp_ex`), UCX's own mlx5 transport, DPDK, GPU-initiated traffic (IBGDA); QPs created with
sq_sig_all are recognised only when created through the exported ibv_create_qp of a watched
libibverbs (ibv_create_qp_ex is inline: such QPs' unsignaled WRs are not timed, only their errors).
"""
from __future__ import annotations

import ctypes as ct
import json
import logging
import os
import re
import threading
import time

from ..histogram import HIST_SLOTS, hist_cflags, slot_of  # noqa: F401 (slot_of: tests)
from .elf import ElfError, read_elf
from .layout import VerbsLayout, load_layout
from .procmaps import ProbeTarget, TracedProcess, comm_of, proc_start_time, read_maps, resolve, symbol_name
from .verbs_export import QpErrors, QpLatency, Snapshot, counter_metrics, latency_metrics

log = logging.getLogger("nodewire.rdma.verbs")

HIST_SUM_SLOT = 255      # NW_HIST_SUM_SLOT
STATS = ("posted", "completed", "matched", "stale", "chain_truncated", "wc_truncated")
ROLES = ("post_recv", "post_send", "poll_cq")
PROBES = {  # role → [(bcc function, return probe?)]
    "post_send": [("nw_post_send", False)],
    "post_recv": [("nw_post_recv", False)],
    "poll_cq": [("nw_poll_enter", False), ("nw_poll_ret", True)],
}
LIBIBVERBS = re.compile(r"/libibverbs\.so[.\d]*$")


class VerbsTracer:
    """Owns the BPF program, the probes and the set of traced processes.

    libibverbs: library files to watch for ibv_open_device from the start (more are found by scanning
        the opted-in processes' maps).
    cgroups: cgroup v2 directories whose processes (also in child cgroups) are opted in (a pod's
        cgroup); None = all processes.
    duty: (on_seconds, period_seconds) to trace only part of the time, or None for always.
    time_box: stop tracing (detach everything, keep the data) this many seconds after start().
    identity: pid → extra metric attributes (the agent's pod identity: k8s.namespace.name,
        k8s.pod.name), looked up once per traced process.
    """

    def __init__(self, libibverbs=(), cgroups=None, duty=None, layout: VerbsLayout | None = None,
                 chain_max: int = 16, wc_max: int = 16, scan_interval: float = 2.0, identity=None,
                 provider_cache: str | None = None, time_box: float | None = None):
        self.layout = layout or load_layout()
        self.cgroups = list(cgroups) if cgroups is not None else None
        self.duty = duty
        self.time_box = time_box
        self.boxed = False               # the time box has run out: nothing is attached any more
        self.scan_interval = scan_interval
        cflags = self.layout.cflags() + [f"-DNW_CHAIN_MAX={chain_max}", f"-DNW_WC_MAX={wc_max}"]
        if self.cgroups is not None:
            cflags.append("-DNW_CGROUP_FILTER")
        self.bpf = _compile(cflags)
        self.procs: dict[int, TracedProcess] = {}
        self.provider_cache = provider_cache                # JSON file; survives agent restarts
        self.providers: dict[str, dict[str, int]] = self._load_providers()   # build-id → role → vaddr
        self.lib_probes: dict[tuple, str] = {}              # (st_dev, st_ino) → path attached
        self._elf_cache: dict = {}
        self._lock = threading.RLock()
        self._active = duty is None
        self._on_since = time.monotonic()
        self.traced_seconds = 0.0        # time spent with probes attached, under a duty cycle
        self._series_start: dict[tuple, int] = {}
        self.identity = identity
        self._t0 = time.monotonic()
        self._last_scan = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._duty_thread: threading.Thread | None = None
        if self.cgroups is not None:
            self.set_cgroups(self.cgroups)
        self._set_window_start()
        # load (verify) the probe programs now, not inside the first sampling window
        from bcc import BPF
        for fns in PROBES.values():
            for fn, _ret in fns:
                self.bpf.load_func(fn.encode(), BPF.KPROBE)
        self.bpf["nw_rdma_events"].open_perf_buffer(self._on_open, page_cnt=16)
        for path in libibverbs:
            self.watch_library(path)

    # --- discovery -------------------------------------------------------------------------
    def watch_library(self, path: str) -> bool:
        """uretprobe on ibv_open_device in this libibverbs file (once per inode)."""
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in self.lib_probes:
            return False
        self.bpf.attach_uretprobe(name=path.encode(), sym=b"ibv_open_device", fn_name=b"nw_open_ret")
        try:
            self.bpf.attach_uprobe(name=path.encode(), sym=b"ibv_create_qp", fn_name=b"nw_create_qp_enter")
            self.bpf.attach_uretprobe(name=path.encode(), sym=b"ibv_create_qp", fn_name=b"nw_create_qp_ret")
        except Exception as e:  # noqa: BLE001  (BCC raises bare Exception)
            log.warning("rdma no ibv_create_qp probe path=%s err=%s (sq_sig_all QPs: errors only)", path, e)
        self.lib_probes[key] = path
        log.info("rdma watching libibverbs path=%s", path)
        return True

    def _on_open(self, _cpu, data, _size):
        ev = self.bpf["nw_rdma_events"].event(data)
        addrs = {"post_send": ev.post_send, "post_recv": ev.post_recv, "poll_cq": ev.poll_cq}
        dev = ev.dev_name.decode(errors="replace")
        with self._lock:
            try:
                self._track(ev.tgid, addrs, ev.ctx, dev)
            except (OSError, ElfError) as e:
                log.warning("rdma cannot trace pid=%d device=%s err=%s", ev.tgid, dev, e)

    def _track(self, pid: int, addrs: dict[str, int], ctx: int, dev: str) -> None:
        maps = read_maps(pid)
        targets = []
        learned = False
        for role in ROLES:
            if not addrs[role]:
                continue
            path, vaddr, build_id = resolve(pid, addrs[role], maps, self._elf_cache)
            targets.append(ProbeTarget(role, path, vaddr, build_id))
            if log.isEnabledFor(logging.DEBUG):   # symbolising loads every module's symbols: debug only
                log.debug("rdma provider pid=%d device=%s role=%s file=%s vaddr=0x%x symbol=%s build_id=%s",
                          pid, dev, role, path, vaddr, symbol_name(addrs[role], pid), build_id)
            if build_id and self.providers.get(build_id, {}).get(role) != vaddr:
                self.providers.setdefault(build_id, {})[role] = vaddr
                learned = True
        if learned:
            self._save_providers()
        self._adopt(pid, targets, ctx, dev)

    def _load_providers(self) -> dict:
        if not self.provider_cache or not os.path.exists(self.provider_cache):
            return {}
        try:
            with open(self.provider_cache) as f:
                doc = json.load(f)
            return {str(b): {r: int(v) for r, v in roles.items() if r in ROLES} for b, roles in doc.items()}
        except (OSError, ValueError, AttributeError) as e:
            log.warning("rdma provider cache unreadable path=%s err=%s", self.provider_cache, e)
            return {}

    def _save_providers(self) -> None:
        if not self.provider_cache:
            return
        try:
            os.makedirs(os.path.dirname(self.provider_cache) or ".", exist_ok=True)
            tmp = self.provider_cache + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.providers, f)
            os.replace(tmp, self.provider_cache)
        except OSError as e:
            log.warning("rdma provider cache not saved path=%s err=%s", self.provider_cache, e.strerror)

    def _adopt(self, pid: int, targets: list[ProbeTarget], ctx: int | None, dev: str | None) -> None:
        p = self.procs.get(pid)
        if p is None:
            p = self.procs[pid] = TracedProcess(pid, proc_start_time(pid), comm_of(pid), [])
            if self.identity is not None:
                try:
                    p.attrs = dict(self.identity(pid) or {})
                except Exception as e:  # noqa: BLE001  (identity is the agent's; keep tracing)
                    log.warning("rdma identity lookup failed pid=%d err=%s", pid, e)
            self.bpf["nw_rdma_procs_v1"][ct.c_uint(pid)] = ct.c_uint(1)
            log.info("rdma tracing pid=%d comm=%s", pid, p.comm)
        if ctx is not None:
            p.devices[ctx] = dev or "?"
        new = [t for t in targets if (t.role, t.path, t.vaddr) not in
               {(o.role, o.path, o.vaddr) for o in p.targets}]
        p.targets.extend(new)
        if self._active:
            self._attach(p, new)

    def _attach(self, p: TracedProcess, targets: list[ProbeTarget]) -> None:
        for t in targets:
            for fn, ret in PROBES[t.role]:
                before = set(self.bpf.uprobe_fds)
                attach = self.bpf.attach_uretprobe if ret else self.bpf.attach_uprobe
                try:
                    attach(name=t.path.encode(), addr=t.vaddr, fn_name=fn.encode(), pid=p.pid)
                except Exception as e:  # noqa: BLE001  (BCC raises bare Exception; the pid may be gone)
                    log.warning("rdma attach failed pid=%d role=%s path=%s vaddr=0x%x err=%s",
                                p.pid, t.role, t.path, t.vaddr, e)
                p.events.extend(set(self.bpf.uprobe_fds) - before)
        p.attached = len(p.events) == sum(len(PROBES[t.role]) for t in p.targets)

    def is_attached(self, pid: int) -> bool:
        p = self.procs.get(pid)
        return bool(p and p.attached)

    def _detach(self, p: TracedProcess) -> None:
        """Close all probes at once, one thread each. Closing a uprobe removes its breakpoint and
        then waits out an RCU grace period (~0.1 s here) that the kernel serialises; closed one after
        another, the last probe would keep trapping for ~0.3 s after the window ended. In parallel
        every BPF program stopped within ~35 ms (measured with the paced mock driver), but traps go
        on until each breakpoint is removed: ~0.3 s per window, the dominant cost of short windows.
        Measured alternative, not adopted: tracefs uprobe events kept registered by an anchor perf
        event on our own pid skip that grace period (tail ~0.05–0.1 s), at the price of global
        tracefs state to clean up after a crash."""
        def one(ev):
            try:
                self.bpf.detach_uprobe_event(ev)
            except Exception as e:  # noqa: BLE001  (BCC raises bare Exception)
                log.debug("rdma detach event=%s err=%s", ev, e)
        threads = [threading.Thread(target=one, args=(ev,)) for ev in p.events]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        p.events.clear()
        p.attached = False

    def scan(self) -> None:
        """Find opted-in processes that map libibverbs (watch it) or a provider we know (attach)."""
        for pid in self._candidate_pids():
            if pid in self.procs:
                continue
            try:
                maps = read_maps(pid)
            except OSError:
                continue
            targets = []
            for m in maps:
                if LIBIBVERBS.search(m.path):
                    try:
                        self.watch_library(f"/proc/{pid}/root{m.path}")
                    except Exception as e:  # noqa: BLE001
                        log.warning("rdma cannot watch pid=%d path=%s err=%s", pid, m.path, e)
                if m.offset != 0 or not self.providers:
                    continue
                try:
                    host = f"/proc/{pid}/root{m.path}"
                    info = self._elf_cache.get((m.dev, m.inode)) or read_elf(host)
                    self._elf_cache[(m.dev, m.inode)] = info
                except (OSError, ElfError):
                    continue
                for role, vaddr in self.providers.get(info.build_id, {}).items():
                    targets.append(ProbeTarget(role, host, vaddr, info.build_id))
            if targets:
                with self._lock:
                    log.info("rdma provider known by build-id pid=%d", pid)
                    self._adopt(pid, targets, None, None)

    def set_cgroups(self, paths) -> None:
        """Replace the opted-in cgroups (pods come and go); processes outside them are dropped."""
        if self.cgroups is None:
            raise ValueError("this tracer was built for all processes (cgroups=None); it has no filter")
        ids = {}
        for path in paths:
            try:
                ids[os.stat(path).st_ino] = path
            except OSError as e:
                log.warning("rdma opt-in cgroup skipped path=%s err=%s", path, e.strerror)
        tbl = self.bpf["nw_rdma_cgroups_v1"]
        with self._lock:
            for k in list(tbl.keys()):
                if k.value not in ids:
                    del tbl[k]
            for cg_id in ids:
                tbl[ct.c_ulonglong(cg_id)] = ct.c_uint(1)
            self.cgroups = list(ids.values())
            members = set(self._candidate_pids())
            dropped = [pid for pid in self.procs if pid not in members]
            for pid in dropped:
                self._detach(self.procs.pop(pid))
                log.info("rdma stopped tracing pid=%d reason=opt-out", pid)
            if dropped:
                self._drop_series(set(dropped))

    def _candidate_pids(self) -> list[int]:
        if self.cgroups is None:
            return [int(d) for d in os.listdir("/proc") if d.isdigit()]
        pids = []
        for cg in self.cgroups:      # the pod's cgroup and every container cgroup below it
            for d, _subdirs, _files in os.walk(cg):
                try:
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        pids += [int(x) for x in f.read().split()]
                except OSError:
                    continue
        return pids

    # --- lifecycle -------------------------------------------------------------------------
    def reap(self) -> list[int]:
        """Detach processes that exited (or whose pid now names another process); drop their series."""
        gone = []
        with self._lock:
            for pid, p in list(self.procs.items()):
                if proc_start_time(pid) == p.start_time and p.start_time is not None:
                    continue
                self._detach(p)
                del self.procs[pid]
                gone.append(pid)
                log.info("rdma detached exited pid=%d comm=%s", pid, p.comm)
            if gone:
                self._drop_series(set(gone))
        return gone

    def _drop_series(self, pids: set[int]) -> None:
        for name in ("nw_rdma_lat_v1", "nw_rdma_err_v1", "nw_rdma_qp_ctx_v1", "nw_rdma_posts_v1",
                     "nw_rdma_sig_all_v1"):
            tbl = self.bpf[name]
            for k in [k for k in tbl.keys() if k.tgid in pids]:
                try:
                    del tbl[k]
                except KeyError:
                    pass
        procs = self.bpf["nw_rdma_procs_v1"]
        for pid in pids:
            try:
                del procs[ct.c_uint(pid)]
            except KeyError:
                pass

    def _set_window_start(self) -> None:
        self.bpf["nw_rdma_cfg_v1"][ct.c_int(0)] = ct.c_ulonglong(time.monotonic_ns())

    def _duty_tick(self) -> None:
        if self.time_box is not None and not self.boxed and time.monotonic() - self._t0 >= self.time_box:
            with self._lock:
                if self._active:
                    self.traced_seconds += time.monotonic() - self._on_since
                self._active = False
                for p in self.procs.values():
                    self._detach(p)
                self.boxed = True
            log.info("rdma time box over seconds=%s: probes detached, data kept", self.time_box)
        if self.duty is None or self.boxed:
            return
        on, period = self.duty
        want = (time.monotonic() - self._t0) % period < on
        with self._lock:
            if want and not self._active:
                self._set_window_start()
                self._active = True
                self._on_since = time.monotonic()
                for p in self.procs.values():
                    self._attach(p, p.targets)
            elif not want and self._active:
                self._active = False
                self.traced_seconds += time.monotonic() - self._on_since
                for p in self.procs.values():
                    self._detach(p)

    def _duty_loop(self) -> None:
        """Its own thread, so a slow maps scan never stretches a sampling window: sleeps to the
        next window edge (or 50 ms while a time box runs) and flips the probes there."""
        while not self._stop.is_set():
            try:
                self._duty_tick()
            except Exception:  # noqa: BLE001  (keep the cycle going; say why)
                log.exception("rdma duty cycle tick failed")
            wait = 0.05
            if self.duty is not None and not self.boxed:
                on, period = self.duty
                phase = (time.monotonic() - self._t0) % period
                if phase < on:
                    wait = on - phase
                else:       # past the window's end: detach now if a slow attach overran it
                    wait = 0.0 if self._active else period - phase
                if self.time_box is not None:
                    wait = min(wait, 0.05)
            elif self.boxed or self.time_box is None:
                return
            if wait > 0:
                self._stop.wait(wait)

    def poll(self, timeout_ms: int = 100) -> None:
        """One round: open events, exits, and (every scan_interval) the maps scan."""
        self.bpf.perf_buffer_poll(timeout=timeout_ms)
        self.reap()
        now = time.monotonic()
        if now - self._last_scan >= self.scan_interval:
            self._last_scan = now
            self.scan()

    def start(self) -> "VerbsTracer":
        self._t0 = time.monotonic()

        def loop():
            while not self._stop.is_set():
                try:
                    self.poll(100)
                except Exception:  # noqa: BLE001  (keep tracing; say why)
                    log.exception("rdma tracer round failed")
        self._thread = threading.Thread(target=loop, name="nw-rdma-verbs", daemon=True)
        self._thread.start()
        if self.duty is not None or self.time_box is not None:
            self._duty_thread = threading.Thread(target=self._duty_loop, name="nw-rdma-duty", daemon=True)
            self._duty_thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        for t in (self._thread, self._duty_thread):
            if t:
                t.join(timeout=5)
        with self._lock:
            for p in self.procs.values():
                self._detach(p)
            self.procs.clear()
        self.bpf.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- reading ---------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._lock:
            procs = {pid: p for pid, p in self.procs.items()}
            qp_dev = {(k.tgid, k.qp_num): procs[k.tgid].devices.get(v.value, "?")
                      for k, v in self.bpf["nw_rdma_qp_ctx_v1"].items() if k.tgid in procs}
            hists: dict[tuple, list[int]] = {}
            for k, v in self.bpf["nw_rdma_lat_v1"].items():
                if k.tgid not in procs:
                    continue
                h = hists.setdefault((k.tgid, k.qp_num, k.recv), [0] * (HIST_SLOTS + 1))
                h[HIST_SLOTS if k.slot == HIST_SUM_SLOT else min(k.slot, HIST_SLOTS - 1)] += v.value
            latency = [QpLatency(pid, procs[pid].comm, qp_dev.get((pid, qp), "?"), qp,
                                 "recv" if recv else "send", tuple(h[:HIST_SLOTS]), h[HIST_SLOTS])
                       for (pid, qp, recv), h in sorted(hists.items())]
            errors = sorted(
                (QpErrors(k.tgid, procs[k.tgid].comm, qp_dev.get((k.tgid, k.qp_num), "?"), k.qp_num,
                          self.layout.status_name(k.status), v.value)
                 for k, v in self.bpf["nw_rdma_err_v1"].items() if k.tgid in procs),
                key=lambda e: (e.pid, e.qp_num, e.status))
            st = self.bpf["nw_rdma_stats_v1"]
            stats = {name: st[ct.c_int(i)].value for i, name in enumerate(STATS)}
            return Snapshot(latency, errors, stats, {pid: p.comm for pid, p in procs.items()})

    def _attrs(self, pid: int, comm: str, dev: str, qp: int) -> dict:
        p = self.procs.get(pid)
        return {**(p.attrs if p else {}), "process.pid": pid, "process.command": comm,
                "rdma.device": dev, "rdma.qp_num": qp}

    def latency_metrics(self, snap: Snapshot | None = None, now_ns: int | None = None) -> list:
        """The latency histograms as OTel metrics (verbs_export.py)."""
        return latency_metrics(snap or self.snapshot(), self._attrs, self._series_start, now_ns or time.time_ns())

    def counter_metrics(self, snap: Snapshot | None = None, now_ns: int | None = None) -> list:
        """Completion and error counters as OTel metrics (verbs_export.py)."""
        return counter_metrics(snap or self.snapshot(), self._attrs, self._series_start, now_ns or time.time_ns())

    def metrics(self) -> list:
        """Every tracer series (histograms and counters) from one snapshot: the telemetry producer."""
        snap = self.snapshot()
        now = time.time_ns()
        return self.latency_metrics(snap, now) + self.counter_metrics(snap, now)


# Kernel RDMA tracepoint groups (drivers/infiniband): where a node has them, kernel-side verbs
# (NVMe-oF, NFS/RDMA, rds) and connection setup are visible too. Probed, never assumed.
KERNEL_RDMA_GROUPS = ("rdma_core", "rdma_cma", "ib_mad", "ib_umad", "ib_cma")


def kernel_rdma_tracepoints(tracefs: str = "/sys/kernel/tracing") -> dict[str, bool]:
    """Which kernel RDMA tracepoint groups exist here (all absent on a kernel without RDMA)."""
    events = os.path.join(tracefs, "events")
    present = {g: os.path.isdir(os.path.join(events, g)) for g in KERNEL_RDMA_GROUPS}
    if not any(present.values()):
        log.info("rdma kernel tracepoints absent groups=%s (no kernel RDMA here; verbs uprobes only)",
                 ",".join(KERNEL_RDMA_GROUPS))
    return present


def _compile(cflags: list[str]):
    from bcc import BPF

    from ..datapath.loader import ensure_mounts, program_text

    ensure_mounts()
    return BPF(text=program_text("rdma.c"), cflags=cflags + hist_cflags() + ["-Wno-unused-function"])
