"""Verbs latency tracer against the mock verbs stack (libibverbs + stripped provider + driver, built
with gcc from nodewire_dev/mockverbs against the real <infiniband/verbs.h>), in sandbox pods."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from agent.rdma.elf import read_elf
from agent.rdma.layout import derive_layout
from nodewire_dev.mockverbs import build
from tests.conftest import wait_for

QP0, QP1, QP2, QP3, QP4 = 0x100, 0x101, 0x102, 0x103, 0x104

# Every timed WR waits at least a known sleep between post and poll; the assertions are on the
# log2 slot that sleep falls in: slot 14 holds (8.192, 16.384] ms, slot 16 (32.768, 65.536] ms, so
# a 9 ms sleep may overrun by 7 ms and a 49 ms one by 16 ms before a slot changes.
SCRIPT = [
    "qps:4", "ready",
    "chain:0:1,2,3,4", "sleep:9", "poll:0:send:1",               # 4 WRs, only wr 4 signaled
    "recv:1:100", "sleep:40", "send:0:7", "sleep:9",              # QP1's receive waits ~49 ms
    "poll:0:send:1", "poll:1:recv:1",
    "bad:2:8", "write:2:9", "sleep:9", "poll:2:send:2",           # rkey 0 → error, then flush
    "send:3:10", "sleep:9", "poll:3:send:1",                      # no receive posted → RNR
    "qpsall:1", "unsig:4:11", "sleep:9", "poll:4:send:1",          # sq_sig_all: unsignaled completes
    "ready",
]
EXPECTED_WC = [
    "wc qp=0x100 wr_id=4 status=0 opcode=1", "wc qp=0x100 wr_id=7 status=0 opcode=0",
    "wc qp=0x101 wr_id=100 status=0 opcode=128", "wc qp=0x102 wr_id=8 status=10 opcode=1",
    "wc qp=0x102 wr_id=9 status=5 opcode=1", "wc qp=0x103 wr_id=10 status=13 opcode=0",
    "wc qp=0x104 wr_id=11 status=0 opcode=1",
]


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("mockverbs")))


def test_provider_is_stripped_and_has_build_id(mock):
    """The double is faithful where it matters: no symbol names the data-path functions."""
    syms = subprocess.run(["nm", "-D", "--defined-only", mock.provider], capture_output=True,
                          text=True, check=True).stdout.split()
    assert "mockprov_alloc_context" in syms
    assert not any("post" in s or "poll" in s for s in syms)
    assert "no symbols" in subprocess.run(["nm", mock.provider], capture_output=True, text=True).stderr
    info = read_elf(mock.provider)
    notes = subprocess.run(["readelf", "-n", mock.provider], capture_output=True, text=True).stdout
    assert info.build_id and f"Build ID: {info.build_id}" in notes


@pytest.mark.parametrize("base", [None, "0x200000"])
def test_resolve_runtime_address_to_elf_vaddr(mock, tmp_path, base):
    """An address in a loaded library → the ELF virtual address the symbol table (and BCC) use,
    also for a library linked at a non-zero base where file offsets and vaddrs differ."""
    import ctypes

    from nodewire_dev.mockverbs import SRC
    from agent.rdma.verbs import resolve

    lib = mock.provider
    if base:
        lib = str(tmp_path / "libshifted.so")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", f"-I{SRC}", f"-Wl,-Ttext-segment={base}", "-o", lib,
                        str(SRC / "mockprov.c"), "-lpthread"], check=True)
    nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    want = int(next(line.split()[0] for line in nm.splitlines() if line.endswith(" mockprov_alloc_context")), 16)
    fn = ctypes.CDLL(lib).mockprov_alloc_context
    addr = ctypes.cast(fn, ctypes.c_void_p).value
    path, vaddr, build_id = resolve(os.getpid(), addr)
    assert os.path.samefile(path, lib) and vaddr == want and build_id == read_elf(lib).build_id
    if base:
        assert want >= int(base, 16)


def test_layout_matches_header():
    lay = derive_layout()
    # post_send/post_recv are adjacent function pointers, poll_cq comes before them in the ops table
    assert lay.offsets["CTX_POST_RECV"] == lay.offsets["CTX_POST_SEND"] + 8
    assert lay.offsets["CTX_POLL_CQ"] < lay.offsets["CTX_POST_SEND"]
    assert lay.status_name(10) == "REM_ACCESS_ERR" and lay.status_name(99) == "STATUS_99"


def test_layout_cache_and_missing_header(tmp_path):
    from agent.rdma.layout import LayoutError, load_layout

    first = load_layout(cache_dir=str(tmp_path))
    [cached] = list(tmp_path.glob("verbs-layout-*.json"))
    assert load_layout(cache_dir=str(tmp_path)).offsets == first.offsets == derive_layout().offsets
    with pytest.raises(LayoutError, match=r"nowhere/infiniband/verbs.h: not found \(install libibverbs-dev"):
        load_layout(include_dir=str(tmp_path / "nowhere"), cache_dir=str(tmp_path))
    assert cached.exists()




def read_until_ready(p) -> tuple[int, list[str]]:
    lines = []
    for line in p.stdout:
        if line.startswith("ready "):
            return int(line.split()[1]), lines
        lines.append(line.strip())
    raise AssertionError(f"driver ended early: {lines} {p.stderr.read()}")


@pytest.fixture
def pods():
    from nodewire_dev.sandbox import Sandbox
    with Sandbox(subnet4="10.244.70.0/24", subnet6="fd00:10:244:70::/64") as sb:
        yield sb, sb.add_pod("rdma-in"), sb.add_pod("rdma-out")


@pytest.mark.root
def test_latency_histograms_errors_and_exit(mock, pods):
    from agent.rdma.verbs import VerbsTracer, slot_of

    sb, pod_in, pod_out = pods
    from agent.datapath.attach import detect_cgroup2_root
    pods_by_cgroup = {pod_in.cgroup: pod_in.name}

    def identity(pid):   # the agent's pod lookup, by the process's cgroup v2 path
        with open(f"/proc/{pid}/cgroup") as f:
            rel = [line.split("::", 1)[1] for line in f.read().splitlines() if line.startswith("0::")][0]
        return {"k8s.pod.name": pods_by_cgroup.get(detect_cgroup2_root() + rel, "?")}

    with VerbsTracer(libibverbs=[mock.libibverbs], cgroups=[pod_in.cgroup], scan_interval=0.2,
                     identity=identity) as tr:
        tr.start()
        # both processes start after the tracer; only the opted-in pod's is traced
        p = pod_in.popen([mock.driver, *SCRIPT], stdin=subprocess.PIPE)
        q = pod_out.popen([mock.driver, "qps:1", "write:0:1", "poll:0:send:1", "ready"], stdin=subprocess.PIPE)
        pid, _ = read_until_ready(p)
        other, _ = read_until_ready(q)
        wait_for(lambda: tr.is_attached(pid), 20, what="probes on the driver")
        assert len(tr.procs[pid].events) == 4       # post_send, post_recv, poll_cq entry + return
        p.stdin.write("\n")
        p.stdin.flush()
        _, wcs = read_until_ready(p)
        assert wcs == EXPECTED_WC

        snap = tr.snapshot()
        hist = {(h.qp_num, h.direction): {s: c for s, c in enumerate(h.slots) if c} for h in snap.latency
                if h.pid == pid}
        nine, fortynine = slot_of(9_000), slot_of(49_000)
        assert (nine, fortynine) == (14, 16)
        # a wait of 9 ms (49 ms) can never land below its slot; under load it may land above it, so the
        # counts per queue pair are exact and the slots are lower bounds
        assert {k: sum(v.values()) for k, v in hist.items()} == {(QP0, "send"): 2, (QP1, "recv"): 1,
                                                                  (QP2, "send"): 2, (QP3, "send"): 1, (QP4, "send"): 1}
        floor = {(QP1, "recv"): fortynine}
        assert all(min(v) >= floor.get(k, nine) for k, v in hist.items()), hist
        assert {h.device for h in snap.latency} == {"mockx_0"}
        errs = {(e.qp_num, e.status): e.count for e in snap.errors if e.pid == pid}
        assert errs == {(QP2, "REM_ACCESS_ERR"): 1, (QP2, "WR_FLUSH_ERR"): 1, (QP3, "RNR_RETRY_EXC_ERR"): 1}
        assert snap.stats["posted"] == 7 and snap.stats["matched"] == 7 and snap.stats["completed"] == 7
        assert other not in snap.traced and all(h.pid == pid for h in snap.latency)

        # the same histograms as an OTel metric, bucket for bucket, labelled with the pod
        [metric] = tr.latency_metrics(snap)
        pts = {(p.attributes["rdma.qp_num"], p.attributes["rdma.direction"]): p for p in metric.data.data_points}
        p0 = pts[(QP0, "send")]
        assert p0.attributes["k8s.pod.name"] == "rdma-in" and p0.attributes["rdma.device"] == "mockx_0"
        assert p0.count == 2 and sum(p0.bucket_counts) == 2
        assert {s: c for s, c in enumerate(p0.bucket_counts) if c} == hist[(QP0, "send")]
        assert p0.explicit_bounds[nine - 1] < 0.009 <= p0.explicit_bounds[nine] == 16384e-6
        assert 0.018 <= p0.sum

        # exit: probes detached, series dropped, kernel maps emptied for that pid
        p.stdin.write("\n")
        p.stdin.close()
        assert p.wait(timeout=10) == 0
        wait_for(lambda: pid not in tr.procs, 20, what="detach after exit")
        assert not [e for e in tr.bpf.uprobe_fds if e.endswith(b"_%d" % pid)]
        assert tr.snapshot().latency == [] and tr.snapshot().errors == []
        assert not [k for k in tr.bpf["nw_rdma_lat_v1"].keys() if k.tgid == pid]
        q.stdin.close()
        q.wait(timeout=10)


@pytest.mark.root
def test_running_process_adopted_by_build_id(mock, pods, tmp_path):
    """A process that opened its device before the tracer ran is attached from its maps once another
    process has taught the tracer where this provider's functions are."""
    from agent.rdma.verbs import VerbsTracer, slot_of

    sb, pod_in, _ = pods
    early = pod_in.popen([mock.driver, "qps:1", "ready", "write:0:5", "sleep:9", "poll:0:send:1", "ready"],
                         stdin=subprocess.PIPE)
    early_pid, _ = read_until_ready(early)
    cache = str(tmp_path / "providers.json")
    with VerbsTracer(libibverbs=[mock.libibverbs], cgroups=[pod_in.cgroup], scan_interval=0.2,
                     provider_cache=cache) as tr:
        tr.start()
        time.sleep(0.5)   # a few scans: nothing to learn from yet
        assert early_pid not in tr.procs and not tr.providers
        late = pod_in.popen([mock.driver, "qps:1", "ready"], stdin=subprocess.PIPE)
        late_pid, _ = read_until_ready(late)
        wait_for(lambda: tr.is_attached(early_pid), 20, what="adoption by build-id")
        assert late_pid in tr.procs and read_elf(mock.provider).build_id in tr.providers
        early.stdin.write("\n")
        early.stdin.flush()
        _, wcs = read_until_ready(early)
        assert wcs == ["wc qp=0x100 wr_id=5 status=0 opcode=1"]
        snap = tr.snapshot()
        mine = [h for h in snap.latency if h.pid == early_pid]
        assert [(h.qp_num, {s: c for s, c in enumerate(h.slots) if c}) for h in mine] == \
            [(QP0, {slot_of(9_000): 1})]
        assert mine[0].device == "?"      # its ibv_open_device happened before we watched
    # a restarted tracer knows the provider from its cache file: it adopts both at once
    with VerbsTracer(libibverbs=[mock.libibverbs], cgroups=[pod_in.cgroup], scan_interval=0.2,
                     provider_cache=cache) as tr2:
        tr2.start()
        wait_for(lambda: tr2.is_attached(early_pid) and tr2.is_attached(late_pid), 20, what="adoption from the cache")
        # the pod opts out: both are detached at once and nothing new is picked up from it
        tr2.set_cgroups([])
        assert tr2.procs == {}
        assert not [e for e in tr2.bpf.uprobe_fds if e.endswith((b"_%d" % early_pid, b"_%d" % late_pid))]
        assert len(tr2.bpf["nw_rdma_cgroups_v1"]) == 0
    for proc in (early, late):
        proc.stdin.close()
        proc.wait(timeout=10)


@pytest.mark.root
def test_cli_rdma_json_reports_ports(mock, tmp_path):
    import json

    from click.testing import CliRunner

    from agent.cli import main
    from test_rdma_counters import COUNTERS, HW_COUNTERS, write_port

    root = str(tmp_path / "sys")
    write_port(root, "mlx5_3", 1, COUNTERS, HW_COUNTERS)
    res = CliRunner().invoke(main, ["rdma", "--libibverbs", mock.libibverbs, "--sysfs-root", root,
                                    "--duration", "0.2", "-o", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output[res.output.index("{"):])
    assert doc["qps"] == [] and doc["errors"] == []
    # this kernel has no RDMA core: the probe says so instead of failing
    assert doc["kernel_tracepoints"]["rdma_core"] == os.path.isdir("/sys/kernel/tracing/events/rdma_core")
    ports = {(p["device"], p["counter"]): p["value"] for p in doc["ports"]}
    assert ports[("mlx5_3", "np_cnp_sent")] == 5 and ports[("mlx5_3", "port_xmit_data")] == 1000


def test_cli_rdma_rejects_bad_duty():
    from click.testing import CliRunner

    from agent.cli import main
    res = CliRunner().invoke(main, ["rdma", "--duty", "5/1"])
    assert res.exit_code != 0 and "--duty" in res.output and "0 < ON <= PERIOD" in res.output


@pytest.mark.root
def test_poller_thread_is_traced(mock, pods):
    """NCCL posts from one thread and busy-polls from its proxy thread: the probes are per process
    (every thread of the traced pid), and poll entry/return pair up per thread."""
    from agent.rdma.verbs import VerbsTracer

    sb, pod_in, _ = pods
    with VerbsTracer(libibverbs=[mock.libibverbs], cgroups=[pod_in.cgroup]) as tr:
        tr.start()
        p = pod_in.popen([mock.driver, "qps:1", "ready", "mt:0:50", "ready"], stdin=subprocess.PIPE)
        pid, _ = read_until_ready(p)
        wait_for(lambda: tr.is_attached(pid), 20, what="probes on the driver")
        p.stdin.write("\n")
        p.stdin.flush()
        _, out = read_until_ready(p)
        polls = int(out[-1].split("polls=")[1])
        snap = tr.snapshot()
        [h] = snap.latency
        assert (h.qp_num, h.direction, h.count) == (QP0, "send", 50)
        # every WR matched, though most of the proxy thread's polls came back empty
        assert snap.stats["matched"] == snap.stats["completed"] == 50 and polls > 50
        p.stdin.close()
        p.wait(timeout=10)


@pytest.mark.root
def test_window_start_and_time_box(mock, pods):
    """A WR posted before a sampling window began is not timed when it completes inside it (its
    latency would include the off time); once the time box runs out, nothing is attached but the
    data stays."""
    from agent.rdma.verbs import VerbsTracer

    sb, pod_in, _ = pods
    with VerbsTracer(libibverbs=[mock.libibverbs], cgroups=[pod_in.cgroup], time_box=3600) as tr:
        tr.start()
        p = pod_in.popen([mock.driver, "qps:1", "ready", "write:0:1", "ready", "poll:0:send:1",
                          "write:0:2", "sleep:1", "poll:0:send:1", "ready",
                          "write:0:3", "sleep:1", "poll:0:send:1", "ready"], stdin=subprocess.PIPE)
        pid, _ = read_until_ready(p)
        wait_for(lambda: tr.is_attached(pid), 20, what="probes on the driver")

        def go():
            p.stdin.write("\n")
            p.stdin.flush()
            read_until_ready(p)
        go()                    # wr 1 posted
        tr._set_window_start()  # a new window begins between its post and its completion
        go()                    # wr 1 completes (stale), wr 2 is posted and completes in the window
        snap = tr.snapshot()
        assert snap.stats["stale"] == 1 and snap.stats["matched"] == 1 and snap.stats["completed"] == 2
        assert [(h.qp_num, h.count) for h in snap.latency] == [(QP0, 1)]

        tr._t0 -= 3600          # the box runs out now (instead of in an hour)
        wait_for(lambda: tr.boxed, 20, what="time box over")
        assert not tr.is_attached(pid) and not [e for e in tr.bpf.uprobe_fds if e.endswith(b"_%d" % pid)]
        go()                    # wr 3 runs untraced
        [h] = tr.snapshot().latency
        assert (h.pid, h.qp_num, h.count) == (pid, QP0, 1) and tr.snapshot().stats["completed"] == 2
        p.stdin.close()
        p.wait(timeout=10)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A real Prometheus scraping one target every second, queried over its HTTP API."""

    def __init__(self, workdir, target: str):
        self.port = _free_port()
        cfg = workdir / "prometheus.yml"
        cfg.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                       f"scrape_configs:\n  - job_name: nodewire\n    static_configs: [{{targets: ['{target}']}}]\n")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(self, expr: str) -> dict:
        import json
        import urllib.parse
        import urllib.request
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.load(r)
        except OSError as e:
            return {"status": "down", "error": str(e)}

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.mark.root
def test_dashboard_panels_against_real_prometheus(mock, pods, tmp_path, sysfs):
    """Every panel of deploy/grafana/rdma.json is valid PromQL on what the agent exports, and the
    panels for which this run produces data (all but the histogram ones when the telemetry module
    has no producer hook yet) return the series we expect."""
    import json
    from pathlib import Path

    from agent.export.telemetry import start_telemetry
    from agent.rdma.metrics import register_rdma_metrics
    from agent.rdma.verbs import VerbsTracer
    from test_rdma_counters import COUNTERS, HW_COUNTERS, write_port
    from test_rdma_topology import dgx_like

    sb, pod_in, _ = pods
    dgx_like(sysfs)
    write_port(sysfs.root, "mlx5_0", 1, COUNTERS, HW_COUNTERS)
    dash = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/rdma.json").read_text())
    tel = start_telemetry("127.0.0.1:0", node_name="test-node")
    prom = None
    try:
        with VerbsTracer(libibverbs=[mock.libibverbs], cgroups=[pod_in.cgroup], scan_interval=0.2,
                         identity=lambda pid: {"k8s.pod.name": pod_in.name}) as tr:
            tr.start()
            register_rdma_metrics(tel, sysfs.root, tr)
            p = pod_in.popen([mock.driver, *SCRIPT[:-1], "ready"], stdin=subprocess.PIPE)
            pid, _ = read_until_ready(p)
            wait_for(lambda: tr.is_attached(pid), 20, what="probes on the driver")
            p.stdin.write("\n")
            p.stdin.flush()
            read_until_ready(p)
            prom = Prometheus(tmp_path, f"127.0.0.1:{tel.port}")
            wait_for(lambda: prom.query("nodewire_rdma_port_events_total").get("data", {}).get("result"),
                     timeout=30, what="first scrape")
            write_port(sysfs.root, "mlx5_0", 1, {**COUNTERS, "port_xmit_data": 5000},
                       {**HW_COUNTERS, "np_cnp_sent": 50})
            wait_for(lambda: prom.query("count_over_time(nodewire_rdma_port_events_total[30s]) > 2")
                     .get("data", {}).get("result"), timeout=30, what="three scrapes")
            has_hist = hasattr(tel, "add_producer")
            results = {}
            for panel in dash["panels"]:
                for t in panel["targets"]:
                    expr = (t["expr"].replace("$__rate_interval", "30s").replace("$pod", ".*")
                            .replace("$device", ".*"))
                    r = prom.query(expr)
                    assert r["status"] == "success", f"panel {panel['title']!r}: {r}"
                    results[panel["id"]] = r["data"]["result"]
                    if has_hist or "latency_seconds_bucket" not in expr:
                        assert r["data"]["result"], f"panel {panel['title']!r} returned no series: {expr}"
            errs = {(s["metric"]["rdma_qp_num"], s["metric"]["rdma_wc_status"]) for s in results[3]}
            assert errs == {("258", "REM_ACCESS_ERR"), ("258", "WR_FLUSH_ERR"), ("259", "RNR_RETRY_EXC_ERR")}
            assert all(s["metric"]["k8s_pod_name"] == "rdma-in" for s in results[3])
            cnp = {s["metric"]["counter"]: float(s["value"][1]) for s in results[5]}
            assert cnp["np_cnp_sent"] > 0 and cnp["rp_cnp_handled"] == 0
            assert len(results[8]) == 64
            p.stdin.close()
            p.wait(timeout=10)
    finally:
        if prom:
            prom.close()
        tel.shutdown()


@pytest.mark.root
def test_service_traces_annotated_pod_in_container_cgroup(mock, pods):
    """The agent's path: a pod annotated for tracing, its process in a container cgroup below the
    kubelet pod cgroup; an unannotated pod's process beside it is not traced; removing the
    annotation stops tracing."""
    from agent.export.telemetry import start_telemetry
    from agent.model.objects import ObjectKey, Pod
    from agent.rdma.optin import ANNOTATION
    from agent.rdma.service import RdmaService

    sb, _, _ = pods
    uid_on, uid_off = "6d1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b", "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"
    kubelet_root = sb.cgroup     # stands for the node's cgroup root: kubepods/... lives below it
    scopes = []
    for uid in (uid_on, uid_off):
        scope = os.path.join(kubelet_root, "kubepods", "burstable", f"pod{uid}", "cri-containerd-0123.scope")
        os.makedirs(scope)
        scopes.append(scope)

    def in_container(scope, argv):
        def enter():
            with open(os.path.join(scope, "cgroup.procs"), "w") as f:
                f.write("0")
        return subprocess.Popen(argv, preexec_fn=enter, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def mkpod(name, uid, ann):
        return Pod(ObjectKey("train", name), ("10.244.70.9",), "node-a", (), ann, uid)

    tel = start_telemetry(None, node_name="test-node")
    svc = RdmaService(tel, cgroup_root=kubelet_root, trace=True, libibverbs=[mock.libibverbs]).start()
    procs = []
    try:
        on = mkpod("worker-0", uid_on, ((ANNOTATION, "true"),))
        off = mkpod("worker-1", uid_off, ())
        assert svc.update_pods([on, off]) == [os.path.dirname(scopes[0])]
        script = ["qps:1", "ready", "write:0:1", "sleep:9", "poll:0:send:1", "ready"]
        procs = [in_container(scopes[0], [mock.driver, *script]), in_container(scopes[1], [mock.driver, *script])]
        pid_on, _ = read_until_ready(procs[0])
        pid_off, _ = read_until_ready(procs[1])
        wait_for(lambda: svc.tracer.is_attached(pid_on), 20, what="probes on the annotated pod's process")
        for p in procs:
            p.stdin.write("\n")
            p.stdin.flush()
            read_until_ready(p)
        assert pid_off not in svc.tracer.procs
        [metric] = svc.tracer.latency_metrics()
        [pt] = metric.data.data_points
        assert (pt.attributes["k8s.pod.name"], pt.attributes["k8s.namespace.name"], pt.count) == ("worker-0", "train", 1)
        assert pt.attributes["process.pid"] == pid_on
        # the annotation goes away: the process is detached and its series dropped
        svc.update_pods([mkpod("worker-0", uid_on, ()), off])
        assert svc.tracer.procs == {} and svc.tracer.latency_metrics() == []
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=10)
        svc.close()
        tel.shutdown()
