"""`nodewire bench observe`: what per-pod observability costs, measured side by side in one run.

- Request/response rate between two sandbox pods (one continuous sockperf TCP ping-pong, 64-byte
  messages) in short windows with the default observability on (the sock_ops program on the pods'
  cgroup, skb:kfree_skb, veth interface counters read at each scrape) and off, alternating (off/on, on/off, ...): programs are attached and detached between windows
  without recompiling, so slow swings of the shared machine's load hit both sides of each pair.
  Transactions are counted from the client veth's own packet counter (one frame per request).
  Reported: the ratio of the medians and the median of the per-pair ratios, with their range.
- CPU time of the two pods' cgroups per transaction, on vs off: where the programs' cost lands
  (the traffic's own syscalls and softirqs).
- In-kernel cost: in one extra window with BPF run-time statistics on (BPF_ENABLE_STATS, only while
  the bench holds the fd; not during the on/off windows, as the accounting costs time itself), each
  program's run_time_ns / run_cnt, and the BPF nanoseconds per transaction of the programs that run
  on every message, as a share of a transaction's time.
- Agent CPU per 10k connections/s: this process's CPU time while a client pod opens and closes
  short TCP connections as fast as it can, scraped twice a second (far more often than any
  Prometheus); the kernel aggregates, so the agent's share is the scrapes'. Also the sock_ops
  program's ns per run in that window (BPF run-time statistics).
- RSS: before the observer, with it, and with N (default 1,000) pods, each with real kernel
  histograms, plus the scrape time and size then.
"""
from __future__ import annotations

import ctypes as ct
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

import click

def _cpu_us(pods) -> int:
    """CPU time used by the pods' cgroups (both ends of the traffic, incl. the softirq work that runs
    in their context): unlike throughput, hardly moved by other tenants of the machine."""
    total = 0
    for p in pods:
        with open(f"{p.cgroup}/cpu.stat") as f:
            total += int(next(line for line in f if line.startswith("usage_usec")).split()[1])
    return total


SYS_BPF_X86_64, BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 321, 32, 0  # uapi linux/bpf.h enum bpf_cmd


def enable_bpf_stats() -> int:
    """An fd that keeps the kernel's per-program run-time accounting on until it is closed."""
    libc = ct.CDLL(None, use_errno=True)
    attr = (ct.c_uint32 * 4)(BPF_STATS_RUN_TIME, 0, 0, 0)
    fd = libc.syscall(SYS_BPF_X86_64, BPF_ENABLE_STATS, ct.byref(attr), ct.sizeof(attr))
    if fd < 0:
        raise OSError(ct.get_errno(), "BPF_ENABLE_STATS")
    return fd


def _prog_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise LookupError(f"fd {fd} is not a BPF program")


def prog_stats(obs) -> dict[str, tuple[int, int]]:
    """program name → (run_time_ns, run_cnt) for the observer's programs."""
    fds = obs.tcp.program_fds()
    if obs.traffic is not None:
        fds.update(obs.traffic.progs)
    out = {}
    for name, fd in fds.items():
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(_prog_id(fd))],
                                         capture_output=True, text=True, check=True).stdout)
        out[name] = (int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0)))
    return out


def _set_active(obs, pods, on: bool) -> None:
    """Attach or detach all of the observer's programs without recompiling (a few ms), so the
    on and off windows can alternate quickly inside one continuous traffic run."""
    if getattr(obs, "bench_on", True) != on:  # attached by the observer at start
        obs.tcp.set_active(on)
        obs.bench_on = on
    for p in pods if obs.traffic is not None else ():
        if on:
            obs.traffic.attach(p.host_veth)
        else:
            obs.traffic.detach(p.host_veth)


def _connection_window(obs, client, server, url: str, seconds: float) -> dict:
    """Short connections client → server for `seconds`, scraped twice a second: connections/s,
    this process's CPU share, and the sock_ops program's ns per run (statistics on)."""
    import psutil

    proc = psutil.Process()
    loop = client.popen([sys.executable, "-c", f"""
import socket, time
end, n = time.monotonic() + {seconds}, 0
while time.monotonic() < end:
    s = socket.create_connection(("{server.ip4}", 11112)); s.close(); n += 1
print(n, flush=True)
"""], stdout=subprocess.PIPE, text=True)
    stats_fd = enable_bpf_stats()
    try:
        s0, c0, t0 = prog_stats(obs), sum(proc.cpu_times()[:2]), time.monotonic()
        while loop.poll() is None:
            urllib.request.urlopen(url, timeout=10).read()
            time.sleep(0.5)
        s1, c1, t1 = prog_stats(obs), sum(proc.cpu_times()[:2]), time.monotonic()
    finally:
        os.close(stats_fd)
    n = int(loop.stdout.read().split()[0])
    ns, runs = (s1["nw_sockops"][i] - s0["nw_sockops"][i] for i in (0, 1))
    cps = n / (t1 - t0)
    cpu = 100 * (c1 - c0) / (t1 - t0)
    return {"connections_per_s": cps, "agent_cpu_percent": cpu, "sock_ops_runs_per_connection": runs / max(n, 1),
            "sock_ops_ns_per_run": ns / runs if runs else None,
            "agent_cpu_percent_per_10k_connections_s": cpu / (cps / 1e4) if cps else None}


def run_bench(rounds: int, seconds: float, pods: int, pod_tc: bool = False, tcp_probe: bool = False) -> dict:
    import psutil

    from agent.export.telemetry import start_telemetry
    from agent.model.objects import ObjectKey, Pod
    from ..sandbox import Sandbox
    from agent.state import ClusterState
    from agent.observe.identity import ObserveConfig
    from agent.observe.observer import Observer

    if not shutil.which("sockperf"):
        raise click.ClickException("sockperf not found (apt-get install sockperf; scripts/install.sh does it)")
    proc = psutil.Process()
    net = f"10.{random.randrange(100, 200)}.{random.randrange(256)}"
    result: dict = {"rounds": rounds, "seconds_per_round": seconds, "pod_tc": pod_tc, "tcp_probe": tcp_probe}
    with Sandbox(subnet4=f"{net}.0/24") as sb:
        pin = f"/sys/fs/bpf/{sb.prefix}"
        client, server = sb.add_pod("client"), sb.add_pod("server")
        server.popen(["sockperf", "sr", "--tcp", "-i", server.ip4, "-p", "11111"])
        server.serve(tcp_ports=[11112])  # accepts and closes: the connection-rate window
        time.sleep(0.5)
        state = ClusterState()
        for p in (client, server):
            k = ObjectKey(p.namespace, p.name)
            state.apply_pod(k, Pod(k, (p.ip4, p.ip6), "bench"))
        tel = start_telemetry("127.0.0.1:0", "bench")
        url = f"http://127.0.0.1:{tel.port}/metrics"
        rss_before = proc.memory_info().rss
        rates = {"off": [], "on": []}       # transactions/s per window
        cpu_per_tx = {"off": [], "on": []}  # µs of pod CPU per transaction, per window
        cpu_s = events = on_time = 0.0
        bpf_ns: dict[str, list[int]] = {}
        transactions = 0
        pods_ = (client, server)
        try:
            from pyroute2 import NetNS
            nl = NetNS(sb.node_netns)  # before the observer: its helper process must not hold BPF fds
            obs = Observer(state, tel, ObserveConfig(node_name="bench", pod_tc=pod_tc, tcp_probe=tcp_probe), pin,
                           sb.node_netns, cgroup=sb.cgroup).start()
            runner = None
            try:
                for p in pods_:
                    obs.set_pod_interface(ObjectKey(p.namespace, p.name), p.host_veth)
                rss_on = proc.memory_info().rss
                veth = nl.link_lookup(ifname=client.host_veth)[0]

                def client_packets() -> int:  # frames the client sent = transactions
                    return nl.get_links(veth)[0].get_attr("IFLA_STATS64")["rx_packets"]

                runner = client.popen(["sockperf", "pp", "--tcp", "-i", server.ip4, "-p", "11111", "-t",
                                       str(int(rounds * 2 * (seconds + 0.3) + 10)), "-m", "64"])
                time.sleep(1.5)  # sockperf's warm-up; then wait until its requests flow
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and runner.poll() is None:
                    p0 = client_packets()
                    time.sleep(0.2)
                    if client_packets() - p0 > 100:
                        break
                for i in range(rounds):
                    for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                        _set_active(obs, pods_, mode == "on")
                        time.sleep(0.05)
                        p0, u0, t0 = client_packets(), _cpu_us(pods_), time.monotonic()
                        time.sleep(seconds)
                        p1, u1, t1 = client_packets(), _cpu_us(pods_), time.monotonic()
                        rates[mode].append((p1 - p0) / (t1 - t0))
                        cpu_per_tx[mode].append((u1 - u0) / max(p1 - p0, 1))
                        if mode == "on":
                            transactions += p1 - p0
                            on_time += t1 - t0
                            c0 = sum(proc.cpu_times()[:2])  # one scrape per "on" window
                            urllib.request.urlopen(url, timeout=10).read()
                            cpu_s += sum(proc.cpu_times()[:2]) - c0
                # BPF run-time statistics cost a clock read or two per program run themselves, so they
                # are on only for this separate window, not for the on/off comparison above
                _set_active(obs, pods_, True)
                stats_fd = enable_bpf_stats()
                try:
                    s0, p0 = prog_stats(obs), client_packets()
                    time.sleep(2 * seconds)
                    s1, p1 = prog_stats(obs), client_packets()
                finally:
                    os.close(stats_fd)
                stats_tx = max(p1 - p0, 1)
                for name in s1:
                    bpf_ns[name] = [s1[name][0] - s0[name][0], s1[name][1] - s0[name][1]]
                events = transactions * sum(cnt for _, cnt in bpf_ns.values()) / stats_tx
                if runner.poll() is not None:
                    raise RuntimeError(f"sockperf stopped early: {runner.communicate()[1][-500:]}")
                runner.terminate()
                runner.communicate()
                result["connections"] = _connection_window(obs, client, server, url, 4 * seconds + 2)
            finally:
                if runner is not None and runner.poll() is None:
                    runner.terminate()
                    runner.communicate()
                nl.close()
                obs.close()
            # RSS and collect cost with many pods, each with real kernel histograms: every pod's IP
            # is an address on the client pod's loopback and makes one TCP connect (connect + srtt)
            obs = Observer(state, tel, ObserveConfig(node_name="bench", max_series=100000), pin, sb.node_netns,
                           cgroup=sb.cgroup).start()
            try:
                base = f"10.{(int(net.split('.')[1]) + 50) % 256}"
                ips = [f"{base}.{i >> 8}.{i & 255}" for i in range(1, pods + 1)]
                for i, ip in enumerate(ips):
                    k = ObjectKey("bench", f"p{i}")
                    state.apply_pod(k, Pod(k, (ip,), "bench"))
                obs.sync()
                subprocess.run(["ip", "-n", client.netns, "-batch", "-"], check=True, capture_output=True, text=True,
                               input="".join(f"addr add {ip}/32 dev lo\n" for ip in ips))
                client.python(f"""
import socket
srv = socket.socket(); srv.bind(("0.0.0.0", 0)); srv.listen(4096); port = srv.getsockname()[1]
for ip in {ips!r}:
    c = socket.socket(); c.bind((ip, 0)); c.connect((ip, port)); c.close()
""", timeout=120)
                urllib.request.urlopen(url, timeout=30).read()
                t0 = time.perf_counter()
                text = urllib.request.urlopen(url, timeout=30).read()
                scrape_s = time.perf_counter() - t0
                rss_pods = proc.memory_info().rss
                result[f"series_with_{pods}_pods"] = obs.book.exported
                result[f"scrape_bytes_with_{pods}_pods"] = len(text)
            finally:
                obs.close()
        finally:
            tel.shutdown()
            shutil.rmtree(pin, ignore_errors=True)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    pairs = sorted(n / f for n, f in zip(rates["on"], rates["off"]))  # round i's on vs its own off
    ev_rate = events / on_time if on_time else 0.0
    # Per transaction: the programs this traffic runs on (sock_ops only on connection events,
    # retransmits and state changes; tc and tcp_probe only when opted in); kfree_skb fires for the
    # whole machine's drops and is reported per run only. Measured with statistics on, which adds
    # their own clock reads.
    per_msg = ("nw_sockops", "nw_pod_tx", "nw_pod_rx", "nw_tcp_probe")
    bpf_total_ns = sum(ns for n, (ns, _) in bpf_ns.items() if n in per_msg)
    result.update({
        "bpf_ns_per_run": {n: (ns / cnt if cnt else None) for n, (ns, cnt) in bpf_ns.items()},
        "bpf_runs": {n: cnt for n, (_, cnt) in bpf_ns.items()},
        "bpf_ns_per_transaction": bpf_total_ns / stats_tx,
        "bpf_share_of_transaction_time": (bpf_total_ns / stats_tx) / (1e9 / off),
        "pod_cpu_us_per_transaction_off": cpu_per_tx["off"],
        "pod_cpu_us_per_transaction_on": cpu_per_tx["on"],
        "pod_cpu_ratio_on_off": statistics.median(cpu_per_tx["on"]) / statistics.median(cpu_per_tx["off"]),
        "rr_per_s_off": rates["off"], "rr_per_s_on": rates["on"],
        "rr_ratio_on_off": on / off,
        "rr_ratio_pairs_median": statistics.median(pairs),
        "rr_ratio_pairs_min_max": [pairs[0], pairs[-1]],
        "events_per_s": ev_rate,
        "agent_cpu_percent": 100 * cpu_s / on_time if on_time else 0.0,
        "rss_mib_before_observer": rss_before / 2**20,
        "rss_mib_observer_on": rss_on / 2**20,
        f"rss_mib_with_{pods}_pods": rss_pods / 2**20,
        f"scrape_seconds_with_{pods}_pods": scrape_s,
    })
    return result


@click.command("observe")
@click.option("--rounds", default=20, show_default=True, help="Pairs of off/on windows (order alternates).")
@click.option("--seconds", default=0.5, show_default=True, help="Seconds per window.")
@click.option("--pods", default=1000, show_default=True, help="Pods in the state for the RSS measurement.")
@click.option("--pod-tc", is_flag=True, help="Also the opt-in tc program on the pods' veths.")
@click.option("--tcp-probe", is_flag=True, help="Also the opt-in per-ACK tcp:tcp_probe program.")
@click.option("-o", "--output", type=click.Choice(["text", "json", "yaml"]), default="text")
def bench_observe(rounds, seconds, pods, pod_tc, tcp_probe, output) -> None:
    """Cost of per-pod observability: request/response rate on vs off (ratio), agent CPU, RSS."""
    res = run_bench(rounds, seconds, pods, pod_tc, tcp_probe)
    if output != "text":
        from agent.output import emit
        emit(res, output)
        return
    click.echo(f"TCP request/response (sockperf pp, 64 B): off {statistics.median(res['rr_per_s_off']):,.0f}/s  "
               f"on {statistics.median(res['rr_per_s_on']):,.0f}/s  ratio on/off {res['rr_ratio_on_off']:.3f} "
               f"(per-round pairs: median {res['rr_ratio_pairs_median']:.3f}, "
               f"range {res['rr_ratio_pairs_min_max'][0]:.2f}-{res['rr_ratio_pairs_min_max'][1]:.2f})")
    click.echo(f"pod CPU per transaction (both ends): off {statistics.median(res['pod_cpu_us_per_transaction_off']):.2f} µs"
               f"  on {statistics.median(res['pod_cpu_us_per_transaction_on']):.2f} µs  ratio on/off "
               f"{res['pod_cpu_ratio_on_off']:.3f} (throughput-equivalent {1 / res['pod_cpu_ratio_on_off']:.3f})")
    click.echo("BPF ns per run: " + ", ".join(f"{n} {v:.0f}" for n, v in res["bpf_ns_per_run"].items() if v)
               + f"; per transaction {res['bpf_ns_per_transaction'] or 0:.0f} ns = "
               f"{100 * (res['bpf_share_of_transaction_time'] or 0):.2f}% of a transaction at the 'off' rate")
    c = res["connections"]
    click.echo(f"short connections {c['connections_per_s']:,.0f}/s: sock_ops {c['sock_ops_runs_per_connection']:.1f} "
               f"runs/connection, {c['sock_ops_ns_per_run'] or 0:.0f} ns/run; agent CPU {c['agent_cpu_percent']:.2f}% "
               f"= {c['agent_cpu_percent_per_10k_connections_s'] or 0:.3f}% of a core per 10k connections/s "
               f"(scraped twice a second)")
    click.echo(f"RSS MiB: before observer {res['rss_mib_before_observer']:.0f}, with observer "
               f"{res['rss_mib_observer_on']:.0f}, with {pods} pods {res[f'rss_mib_with_{pods}_pods']:.0f} "
               f"(each with connect + srtt histograms: {res[f'series_with_{pods}_pods']} series, scrape "
               f"{res[f'scrape_seconds_with_{pods}_pods'] * 1000:.0f} ms, {res[f'scrape_bytes_with_{pods}_pods'] >> 10} KiB)")
