"""Per-pod observability in the real kernel: sandbox pods, the real sock_ops program on the sandbox
cgroup, veth interface counters (and the opt-in tc program), the real socket LB, a real Prometheus scraping the agent's endpoint and a test OTLP/HTTP receiver decoding the
real OTLP protobufs.

The module's sandbox runs IPv4 only (IPv6 disabled on the bridge and pod links) so that no router
solicitation / MLD / ND frame lands on a pod veth during a measurement: the byte counters are then
checked for exact equality with the frames the test sends.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from agent.datapath.attach import attach_sock_lb, detach_sock_lb
from agent.datapath.loader import SockLB, remove_pins
from agent.datapath.reconciler import Reconciler
from agent.export.telemetry import start_telemetry
from agent.model.objects import ObjectKey, Pod
from agent.model.parse import parse_endpoint_slice, parse_service
from agent.histogram import HIST_SLOTS, slot_of
from agent.observe.identity import OBSERVE_ANNOTATION, ObserveConfig
from agent.observe.observer import Observer
from nodewire_dev.sandbox import Sandbox
from agent.state import ClusterState
from tests.conftest import wait_for
from tests.observe_helpers import OtlpReceiver, PrometheusServer, samples, sh
from tests.manifests import endpoint_slice, service

pytestmark = pytest.mark.root

NODE = "node-obs"
ETH, IP4, UDP, ICMP = 14, 20, 8, 8  # header sizes (bytes) of the frames the tests send
DASHBOARDS = Path(__file__).resolve().parents[1] / "deploy" / "grafana"


def pod_object(p, annotations=()) -> Pod:
    return Pod(ObjectKey(p.namespace, p.name), (p.ip4,), NODE, annotations=tuple(annotations))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Sandbox (IPv4 only) with pods a, b, c; socket LB on the sandbox cgroup; the observer; the
    metrics endpoint with an OTLP exporter pointed at the test receiver; a real Prometheus."""
    work = tmp_path_factory.mktemp("observe")
    receiver = OtlpReceiver()
    stack = []
    # Tracepoints see every namespace: other sandboxes on this machine (default 10.244.0.0/24) must
    # not share our pod addresses, so this module uses its own random /24 (unique on a real node).
    net = f"10.{random.randrange(100, 200)}.{random.randrange(0, 256)}"
    with Sandbox(subnet4=f"{net}.0/24") as sb:
        pin = f"/sys/fs/bpf/{sb.prefix}"
        try:
            sh(sb.node_netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.br0.disable_ipv6=1")
            pods = {}
            for name in ("a", "b", "c"):
                p = pods[name] = sb.add_pod(name)
                sh(p.netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.eth0.disable_ipv6=1")
            state = ClusterState()
            for p in pods.values():
                state.apply_pod(ObjectKey(p.namespace, p.name), pod_object(p))
            lb = SockLB(pin)
            stack.append(lambda: detach_sock_lb(sb.cgroup))
            attach_sock_lb(lb, sb.cgroup)
            rec = Reconciler(lb.services, lb.backends)
            tel = start_telemetry("127.0.0.1:0", NODE, env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                "OTEL_METRIC_EXPORT_INTERVAL": "3600000"})  # exports happen on force_flush()
            stack.append(tel.shutdown)
            obs = Observer(state, tel, ObserveConfig(node_name=NODE, max_series=2000), pin,
                           veth_netns=sb.node_netns, lb=lb, reconciler=rec, cgroup=sb.cgroup).start()
            stack.append(obs.close)
            for p in pods.values():
                obs.set_pod_interface(ObjectKey(p.namespace, p.name), p.host_veth)
            prom = PrometheusServer(f"127.0.0.1:{tel.port}", work)
            stack.append(prom.close)
            yield {"net": net, "sb": sb, "pods": pods, "state": state, "obs": obs, "tel": tel, "lb": lb, "rec": rec,
                   "prom": prom, "receiver": receiver, "work": work}
        finally:
            for undo in reversed(stack):
                try:
                    undo()
                except Exception as e:  # keep cleaning up
                    print(f"cleanup: {e}", file=sys.stderr)
            receiver.close()
            shutil.rmtree(pin, ignore_errors=True)


def scrape(env) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{env['tel'].port}/metrics", timeout=10) as r:
        return r.read().decode()


def counter(env, metric: str, **attrs) -> int:
    """Sum of a labelled counter in the observer's reading, over the series matching attrs."""
    r = env["obs"].read()
    return sum(v for k, v in r.counters.get(metric, {}).items() if all(dict(k).get(a) == b for a, b in attrs.items()))


def traffic(env, pod: str, direction: str) -> tuple[int, int]:
    r = env["obs"].read()
    pk = [v for k, v in r.counters.get("pod_packets", {}).items()
          if dict(k)["k8s.pod.name"] == pod and dict(k)["network.io.direction"] == direction]
    by = [v for k, v in r.counters.get("pod_bytes", {}).items()
          if dict(k)["k8s.pod.name"] == pod and dict(k)["network.io.direction"] == direction]
    return (sum(pk), sum(by))


def hist(env, metric: str, pod: str):
    for attrs, h in env["obs"].read().histograms.get(metric, {}).items():
        if dict(attrs)["k8s.pod.name"] == pod:
            return list(h.counts), h.total
    return [0] * HIST_SLOTS, 0


def snapshot(env):
    return {(p, d): traffic(env, p, d) for p in env["pods"] for d in ("transmit", "receive")}


def delta(before, after):
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}


# -- kernel probes -------------------------------------------------------------------------------
def test_sock_ops_and_drop_tracepoint_attached_and_exported_as_status(env):
    assert env["obs"].tcp.probes == {"sock_ops": "attached", "skb:kfree_skb": "attached"}
    s = samples(scrape(env), "nodewire_observer_probe_status")
    assert len(s) == 2 and set(s.values()) == {1.0}
    # no per-ACK program by default: tcp_probe is opt-in
    assert set(env["obs"].tcp.links) == {"skb:kfree_skb"}


def test_a_missing_tracepoint_is_left_out_and_reported(monkeypatch, tmp_path):
    import agent.observe.kernel as kernel

    real = kernel.tracepoint_exists
    monkeypatch.setattr(kernel, "tracepoint_exists", lambda tp: False if tp == "skb:kfree_skb" else real(tp))
    pin = f"/sys/fs/bpf/nwobs-probe-{os.getpid()}"
    t = kernel.TcpObserver(pin, None, tcp_probe=True, state_dir=str(tmp_path))
    try:
        assert t.probes["skb:kfree_skb"] == "missing"
        assert t.probes["tcp:tcp_probe"] == "attached"  # opt-in, asked for here
        assert set(t.links) == {"tcp:tcp_probe"}
        assert set(t.loaded.program_pins) == {"nw_sockops", "nw_tcp_probe"}  # kfree_skb not even compiled
    finally:
        t.close()
        remove_pins(pin)


# -- per-pod bytes and packets -------------------------------------------------------------------
def test_ping_counts_exact_frames_both_ways(env):
    a, b = env["pods"]["a"], env["pods"]["b"]
    a.run(["ping", "-c", "1", "-W", "2", b.ip4])  # resolve ARP first: only ICMP in the window
    before = snapshot(env)
    a.run(["ping", "-c", "3", "-i", "0.2", "-s", "56", "-W", "2", b.ip4])
    d = delta(before, snapshot(env))
    frame = ETH + IP4 + ICMP + 56  # 98 bytes: echo request and echo reply are the same size
    assert d[("a", "transmit")] == (3, 3 * frame)
    assert d[("b", "receive")] == (3, 3 * frame)
    assert d[("b", "transmit")] == (3, 3 * frame)  # replies made by b's kernel, no process involved
    assert d[("a", "receive")] == (3, 3 * frame)
    assert d[("c", "transmit")] == (0, 0) and d[("c", "receive")] == (0, 0)


def test_udp_datagrams_count_exact_bytes(env):
    a, b = env["pods"]["a"], env["pods"]["b"]
    n, size, port = 200, 1000, 9100
    sink = b.popen([sys.executable, "-c", f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", {port})); s.settimeout(10)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: room for the whole burst
print("ready", flush=True)
got = 0
while got < {n}:
    got += len(s.recv(65535)) == {size}
print(got, flush=True)
"""])
    assert sink.stdout.readline().strip() == "ready"
    a.run(["ping", "-c", "1", "-W", "2", b.ip4])
    before = snapshot(env)
    a.python(f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range({n}):
    s.sendto(b"x" * {size}, ("{b.ip4}", {port}))
""")
    assert sink.stdout.readline().strip() == str(n), sink.stderr.read()
    sink.wait(5)
    d = delta(before, snapshot(env))
    frame = ETH + IP4 + UDP + size
    assert d[("a", "transmit")] == (n, n * frame)
    assert d[("b", "receive")] == (n, n * frame)
    assert d[("a", "receive")] == (0, 0) and d[("b", "transmit")] == (0, 0)


# -- TCP -----------------------------------------------------------------------------------------
def nft(netns: str, script: str) -> None:
    sh(netns, "nft", "-f", "-", input=script)


def test_connect_delayed_by_one_dropped_syn_lands_in_the_1s_bucket(env):
    """The server pod drops the first SYN (nft quota: the first 60-byte SYN is under 100 bytes, the
    retransmitted one brings the total over it); the client's SYN retransmission timer (initial RTO
    1 s, RFC 6298 §2.1) makes the connect take 1 s + a little, i.e. bucket (2^19, 2^20] µs."""
    a, b = env["pods"]["a"], env["pods"]["b"]
    b.serve(tcp_ports=[9000])
    nft(b.netns, """
table inet nwtest {
  chain input { type filter hook input priority 0;
    tcp dport 9000 tcp flags & (syn | ack) == syn quota until 100 bytes counter drop
  }
}
""")
    try:
        counts0, _ = hist(env, "connect", "a")
        took = float(a.python(f"""
import socket, time
t = time.monotonic(); s = socket.create_connection(("{b.ip4}", 9000), timeout=5); print(time.monotonic() - t)
"""))
        counts1, total1 = hist(env, "connect", "a")
    finally:
        nft(b.netns, "delete table inet nwtest")
    new = [c1 - c0 for c0, c1 in zip(counts0, counts1)]
    # took >= 1 s: the first SYN was dropped and the 1 s initial RTO resent it (the behaviour under test;
    # no upper bound on time, a loaded machine may add some). The kernel times SYN_SENT→ESTABLISHED, a
    # little less than the connect() call timed here (less by up to tens of ms on a loaded machine, where
    # the process may wait for a CPU around the call), so its one sample is in took's slot, or the one
    # below when took is within that margin above a slot boundary.
    assert took >= 1.0, f"connect took {took}s: the SYN drop did not behave as designed"
    assert sum(new) == 1, new
    slot = new.index(1)
    assert slot_of(int((took - 0.05) * 1e6)) <= slot <= slot_of(int(took * 1e6)), (slot, took)
    assert slot >= 20  # (0.524288 s, 1.048576 s] or above: a delay of at least 1 s
    # the same sample in the Prometheus exposition: the bucket bounding that slot gained it, the one below did not
    text = scrape(env)
    le = lambda v: samples(text, "nodewire_tcp_connect_duration_seconds_bucket", k8s_pod_name="a", le=v)  # noqa: E731
    upper, lower = str(2 ** slot / 1e6), str(2 ** (slot - 1) / 1e6)  # slot s holds (2^(s-1), 2^s] µs
    assert list(le(upper).values())[0] - list(le(lower).values())[0] >= 1


def test_retransmit_of_a_dropped_segment_is_counted_against_the_peer_pod(env):
    a, b = env["pods"]["a"], env["pods"]["b"]
    b.serve(tcp_ports=[9001])
    # The first segment carrying data (IP length > 52: 20 IP + 32 TCP with timestamps) is dropped once.
    nft(b.netns, """
table inet nwtest {
  chain input { type filter hook input priority 0;
    tcp dport 9001 ip length > 52 quota until 100 bytes counter drop
  }
}
""")
    peer = {"nodewire.peer.kind": "pod", "nodewire.peer.name": "default/b"}
    try:
        before = counter(env, "retrans", **{"k8s.pod.name": "a"}, **peer)
        reply = a.python(f"""
import socket
s = socket.create_connection(("{b.ip4}", 9001), timeout=5); s.sendall(b"G"); print(s.recv(100).decode().strip())
""")
        dropped = sh(b.netns, "nft", "list", "table", "inet", "nwtest")
    finally:
        nft(b.netns, "delete table inet nwtest")
    assert reply.strip() == "b"
    assert "packets 1 " in dropped  # exactly one segment was dropped
    assert counter(env, "retrans", **{"k8s.pod.name": "a"}, **peer) - before == 1


def test_drop_reason_udp_csum_counted_exactly(env):
    a, c = env["pods"]["a"], env["pods"]["c"]
    before = counter(env, "drops", **{"nodewire.drop.reason": "UDP_CSUM"})
    a.python(f"""
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
pkt = struct.pack("!HHHH", 40000, 9999, 12, 0xdead) + b"abcd"   # checksum 0xdead is wrong
for _ in range(7):
    s.sendto(pkt, ("{c.ip4}", 0))
""")
    wait_for(lambda: counter(env, "drops", **{"nodewire.drop.reason": "UDP_CSUM"}) - before >= 7, 5,
             what="7 UDP_CSUM drops")
    assert counter(env, "drops", **{"nodewire.drop.reason": "UDP_CSUM"}) - before == 7


def svc_hist(env, metric: str, service: str) -> dict[str, tuple[list[int], int]]:
    """backend pod → (slot counts, sum) of a per-Service histogram."""
    out = {}
    for attrs, h in env["obs"].read().histograms.get(metric, {}).items():
        a = dict(attrs)
        if a["k8s.service.name"] == service:
            out[a.get("nodewire.backend.pod", a.get("nodewire.backend.address"))] = (list(h.counts), h.total)
    return out


def apply_service(env, name: str, vip: str, backends: list[str], port_name: str = "", target_port: int = 8080):
    key = ObjectKey("default", name)
    env["state"].apply_service(key, parse_service(service(name, [vip], port_name=port_name, target_port=target_port)))
    sl = endpoint_slice(name, backends, port=target_port, port_name=port_name)
    env["state"].apply_slice(ObjectKey("default", sl["metadata"]["name"]), parse_endpoint_slice(sl))
    assert not env["rec"].apply(env["state"].take_dirty()).errors


def test_connect_latency_per_service_backend_lands_in_the_delayed_backends_bucket(env):
    """Service "slow" has backends b and c; b drops the first SYN it gets (1 s RTO on the client).
    The one delayed connect is in b's histogram in the slot of its measured time; every connect to
    c, and b's others, are fast; the per-backend sample counts equal the connects each one served."""
    a, b, c = (env["pods"][n] for n in "abc")
    b.serve(tcp_ports=[9005])
    c.serve(tcp_ports=[9005])
    apply_service(env, "slow", "10.96.7.9", [b.ip4, c.ip4], port_name="web", target_port=9005)
    nft(b.netns, """
table inet nwtest {
  chain input { type filter hook input priority 0;
    tcp dport 9005 tcp flags & (syn | ack) == syn quota until 100 bytes counter drop
  }
}
""")
    try:
        out = a.python("""
import socket, time
seen = {"b": [], "c": []}
while not (seen["b"] and seen["c"]) and len(seen["b"]) + len(seen["c"]) < 200:
    t = time.monotonic(); s = socket.create_connection(("10.96.7.9", 80), timeout=5); took = time.monotonic() - t
    s.sendall(b"x"); seen[s.recv(100).decode().strip()].append(took); s.close()
print(repr(seen))
""")
    finally:
        nft(b.netns, "delete table inet nwtest")
    seen = eval(out)
    h = svc_hist(env, "svc_connect", "slow")
    assert set(h) == {"default/b", "default/c"}
    (bc, _), (cc, _) = h["default/b"], h["default/c"]
    assert sum(bc) == len(seen["b"]) and sum(cc) == len(seen["c"])
    took = seen["b"][0]
    assert took >= 1.0, f"first connect to b took {took}s: the SYN drop did not behave as designed"
    slow = [s for s, n in enumerate(bc) if n and s >= 20]
    assert slow in ([slot_of(int(took * 1e6))], [slot_of(int((took - 0.005) * 1e6))]), (bc, took)
    assert bc[slow[0]] == 1 and not any(cc[20:])   # c never saw a delay
    text = scrape(env)  # and the Prometheus series carry Service, port name and backend pod
    got = samples(text, "nodewire_service_connect_duration_seconds_count", k8s_service_name="slow",
                  nodewire_service_port="web", nodewire_backend_pod="default/b")
    assert list(got.values()) == [len(seen["b"])]


def test_srtt_of_a_connection_is_its_tcp_info_rtt_just_before_close(env):
    a, b = env["pods"]["a"], env["pods"]["b"]
    b.serve(tcp_ports=[9006])
    s0, t0 = hist(env, "srtt", "a")
    rtt = int(a.python(f"""
import socket, struct
s = socket.create_connection(("{b.ip4}", 9006), timeout=5); s.sendall(b"x" * 100); s.recv(100)
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
print(struct.unpack_from("I", info, 68)[0])   # tcpi_rtt (µs): srtt_us >> 3
s.close()
"""))
    s1, t1 = hist(env, "srtt", "a")
    assert sum(s1) - sum(s0) == 1 and t1 - t0 == rtt
    assert [n1 - n0 for n0, n1 in zip(s0, s1)].index(1) == slot_of(rtt)


def test_pod_tc_opt_in_counts_the_same_frames_as_the_interface_counters(env, tmp_path):
    """--pod-tc: the tc program on the veth, for what interface counters cannot give (segments of
    GSO frames). For non-GSO traffic (ping) both count exactly the same frames."""
    from agent.observe.kernel import PodTraffic

    a, b = env["pods"]["a"], env["pods"]["b"]
    tc = PodTraffic(f"/sys/fs/bpf/{env['sb'].prefix}", env["sb"].node_netns)
    try:
        idx = tc.attach(a.host_veth)
        a.run(["ping", "-c", "1", "-W", "2", b.ip4])
        before, tc0 = traffic(env, "a", "transmit"), tc.read().get((idx, "transmit"), (0, 0))
        a.run(["ping", "-c", "4", "-i", "0.2", "-s", "100", "-W", "2", b.ip4])
        after, tc1 = traffic(env, "a", "transmit"), tc.read()[(idx, "transmit")]
    finally:
        tc.close()
    frame = ETH + IP4 + ICMP + 100
    assert (after[0] - before[0], after[1] - before[1]) == (4, 4 * frame)
    assert (tc1[0] - tc0[0], tc1[1] - tc0[1]) == (4, 4 * frame)


# -- service datapath counters -------------------------------------------------------------------
def test_service_connects_per_backend_and_refusals(env):
    a, b, c = (env["pods"][n] for n in "abc")
    c.serve(tcp_ports=[8080])
    objs = {ObjectKey("default", "web"): (service("web", ["10.96.7.1"], port_name="http"),
                                          endpoint_slice("web", [c.ip4], port_name="http")),
            ObjectKey("default", "empty"): (service("empty", ["10.96.7.2"]), endpoint_slice("empty", []))}
    for key, (svc, sl) in objs.items():
        env["state"].apply_service(key, parse_service(svc))
        env["state"].apply_slice(ObjectKey("default", sl["metadata"]["name"]), parse_endpoint_slice(sl))
    res = env["rec"].apply(env["state"].take_dirty())
    assert not res.errors
    a.python("""
import socket
for _ in range(4):
    s = socket.create_connection(("10.96.7.1", 80), timeout=5); s.sendall(b"x"); s.recv(10); s.close()
for _ in range(3):
    try:
        socket.create_connection(("10.96.7.2", 80), timeout=5)
    except ConnectionRefusedError:
        pass
""")
    text = scrape(env)
    got = samples(text, "nodewire_service_connects_total", k8s_service_name="web")
    assert list(got.values()) == [4.0]
    assert dict(list(got)[0])["nodewire_backend_address"] == f"{c.ip4}:8080"
    refused = samples(text, "nodewire_service_refusals_total", k8s_service_name="empty")
    assert list(refused.values()) == [3.0]
    assert dict(list(refused)[0])["nodewire_refusal_reason"] == "no_backend"
    # one spelling of the port everywhere: the name, or "<port>/<protocol>" for an unnamed port
    assert dict(list(got)[0])["nodewire_service_port"] == "http"
    assert dict(list(refused)[0])["nodewire_service_port"] == "80/TCP"
    assert dict(list(got)[0])["nodewire_backend_pod"] == "default/c"

    # "web" goes away and "api" comes with the same backend: the reconciler may hand "api" web's
    # service id, so the kernel's counter for that id already holds 4; api's series must start at 0
    sid = lambda svc: {i for i, n in env["rec"].service_names().items() if n["service"] == svc}  # noqa: E731
    web_ids = sid("default/web")
    env["state"].apply_service(ObjectKey("default", "web"), None)
    env["state"].apply_slice(ObjectKey("default", "web-ipv4"), None)
    assert not env["rec"].apply(env["state"].take_dirty()).errors
    assert not samples(scrape(env), "nodewire_service_connects_total", k8s_service_name="web")
    env["state"].apply_service(ObjectKey("default", "api"), parse_service(service("api", ["10.96.7.3"], port_name="http")))
    env["state"].apply_slice(ObjectKey("default", "api-ipv4"),
                             parse_endpoint_slice(endpoint_slice("api", [c.ip4], port_name="http")))
    assert not env["rec"].apply(env["state"].take_dirty()).errors
    assert sid("default/api") == web_ids  # the case this checks: the id was handed on
    a.python("""
import socket
for _ in range(2):
    s = socket.create_connection(("10.96.7.3", 80), timeout=5); s.sendall(b"x"); s.recv(10); s.close()
""")
    assert list(samples(scrape(env), "nodewire_service_connects_total", k8s_service_name="api").values()) == [2.0]


# -- exporters -----------------------------------------------------------------------------------
def test_prometheus_scrapes_and_promtool_accepts_the_exposition(env):
    text = scrape(env)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    prom = env["prom"]
    wait_for(lambda: prom.query('nodewire_tcp_connect_duration_seconds_bucket{k8s_pod_name="a"}'), 10,
             what="histogram in prometheus")
    rate = prom.query('sum by (k8s_pod_name) (k8s_pod_network_io_bytes_total{network_io_direction="transmit"})')
    assert {r["metric"]["k8s_pod_name"] for r in rate} >= {"a", "b"}
    meta = prom.api("metadata", metric="nodewire_tcp_connect_duration_seconds")["data"]
    assert meta["nodewire_tcp_connect_duration_seconds"][0]["type"] == "histogram"


def test_a_scrape_as_prometheus_asks_is_gzip_at_the_fast_level_and_the_same_text(env):
    """OpenMetrics + gzip, as Prometheus sends it: the body is gzip compressed at level 1 (header
    XFL = 4, RFC 1952 2.3.1; level 9 writes 2) and decodes to the exposition a plain scrape gives."""
    import gzip
    req = urllib.request.Request(f"http://127.0.0.1:{env['tel'].port}/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body, headers = r.read(), r.headers
    assert headers["Content-Encoding"] == "gzip" and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body[:2] == b"\x1f\x8b" and body[8] == 4
    text = gzip.decompress(body).decode()
    assert text.endswith("# EOF\n") and 'k8s_pod_network_io_bytes_total{' in text


def test_veth_counters_from_the_raw_dump_are_the_kernels(env):
    """The observer's own netlink dump (agent/observe/linkdump.py) gives every veth of the node
    namespace, and only veths, with the counters `ip -s link` reads just before and just after."""
    import json
    ns = env["sb"].node_netns

    def ip_stats() -> dict:
        out = json.loads(sh(ns, "ip", "-j", "-s", "link", "show", "type", "veth"))
        return {link["ifname"]: {"transmit": (link["stats64"]["rx"]["packets"], link["stats64"]["rx"]["bytes"]),
                                 "receive": (link["stats64"]["tx"]["packets"], link["stats64"]["tx"]["bytes"])}
                for link in out}
    before = ip_stats()
    ours = env["obs"].links.read()
    after = ip_stats()
    assert set(ours) == set(before) == set(after)
    for ifname, dirs in ours.items():  # a stray ARP probe may move a counter between the reads
        for d, (packets, nbytes) in dirs.items():
            assert before[ifname][d][0] <= packets <= after[ifname][d][0], (ifname, d)
            assert before[ifname][d][1] <= nbytes <= after[ifname][d][1], (ifname, d)
    assert {p.host_veth for p in env["pods"].values()} <= set(ours) and "br0" not in ours


def test_otlp_receiver_gets_the_same_histogram_buckets(env):
    env["tel"].provider.force_flush()
    counts, total = hist(env, "connect", "a")  # no traffic in between: the kernel map is unchanged
    path, ctype, req = env["receiver"].requests[-1]
    assert path == "/v1/metrics" and ctype == "application/x-protobuf"
    rm = req.resource_metrics[0]
    res = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
    assert res["service.name"] == "nodewire" and res["k8s.node.name"] == NODE
    points = [dp for sm in rm.scope_metrics for m in sm.metrics if m.name == "nodewire.tcp.connect.duration"
              for dp in m.histogram.data_points
              if {kv.key: kv.value.string_value for kv in dp.attributes}.get("k8s.pod.name") == "a"]
    assert len(points) == 1
    dp = points[0]
    assert list(dp.bucket_counts) == counts
    assert dp.count == sum(counts) and dp.sum == pytest.approx(total * 1e-6)
    assert list(dp.explicit_bounds)[19:21] == [0.524288, 1.048576]
    assert not dp.HasField("min") and not dp.HasField("max")  # unknown below bucket precision: unset


# -- lifecycle and cardinality -------------------------------------------------------------------
def test_deleting_a_pod_removes_its_series_at_the_next_collection(env):
    c = env["pods"]["c"]
    key = ObjectKey(c.namespace, c.name)
    assert samples(scrape(env), "k8s_pod_network_io_bytes_total", k8s_pod_name="c")
    env["state"].apply_pod(key, None)
    try:
        text = scrape(env)
        assert not [l for l in text.splitlines() if 'k8s_pod_name="c"' in l]
        assert key not in env["obs"]._pod_ifnames  # its veth is no longer read
        assert samples(text, "k8s_pod_network_io_bytes_total", k8s_pod_name="a")
    finally:
        env["state"].apply_pod(key, pod_object(c))


def test_opt_out_annotation_removes_a_pod(env):
    b = env["pods"]["b"]
    key = ObjectKey(b.namespace, b.name)
    env["state"].apply_pod(key, pod_object(b, [(OBSERVE_ANNOTATION, "false")]))
    try:
        text = scrape(env)
        assert not [l for l in text.splitlines() if 'k8s_pod_name="b"' in l]
        assert key not in env["obs"]._pod_ifnames
    finally:
        env["state"].apply_pod(key, pod_object(b))
    env["obs"].sync()
    assert env["obs"]._pod_ifnames[key] == b.host_veth


def test_series_cap_holds_under_1000_short_lived_pods(env):
    """1,000 pods come and go (pod objects, with real kernel entries: each pod's IP is an address on
    a's loopback and one TCP connect is made from it, so connect and srtt histograms exist for it).
    A series here is one OTel data point (a histogram is one series however many buckets it has).
    The cap holds at every collection and the kernel's histogram map does not keep dead pods."""
    a = env["pods"]["a"]
    obs, state = env["obs"], env["state"]
    cap = 150
    churn_net = f"10.{int(env['net'].split('.')[1]) - 50}"  # a /16 of its own (10.50-149.x.x)
    obs.book.max_series = cap
    try:
        for batch in range(10):
            ips = [f"{churn_net}.{batch}.{i}" for i in range(1, 101)]
            sh(a.netns, "ip", "-batch", "-", input="".join(f"addr add {ip}/32 dev lo\n" for ip in ips))
            keys = [ObjectKey("churn", f"p{batch}-{i}") for i in range(100)]
            for k, ip in zip(keys, ips):
                state.apply_pod(k, Pod(k, (ip,), NODE))
            obs.sync()
            a.python(f"""
import socket
srv = socket.socket(); srv.bind(("0.0.0.0", 0)); srv.listen(200); port = srv.getsockname()[1]
for ip in {ips!r}:
    c = socket.socket(); c.bind((ip, 0)); c.connect((ip, port)); c.close()
""")
            text = scrape(env)
            series = [l for l in text.splitlines() if l and not l.startswith("#") and "churn" in l]
            churn_pods = {l.split('k8s_pod_name="')[1].split('"')[0] for l in series}
            assert churn_pods, "the churn pods produced no series"
            assert obs.book.exported <= cap and obs.book.dropped > 0  # 100 pods x 2 histograms > cap
            for k in keys:  # the pods die
                state.apply_pod(k, None)
            sh(a.netns, "ip", "-batch", "-", input="".join(f"addr del {ip}/32 dev lo\n" for ip in ips))
            obs.sync()
            text = scrape(env)
            assert "churn" not in text
        assert obs.book.dropped == 0  # after the churn, the survivors fit again
        kernel_ips = {ip for ip, _m, _c, _t in obs.tcp.read_histograms()}
        assert not any(ip.startswith(churn_net + ".") for ip in kernel_ips)
    finally:
        obs.book.max_series = obs.cfg.max_series


# -- terminal views ------------------------------------------------------------------------------
def test_top_and_latency_views_read_the_endpoint(env):
    from click.testing import CliRunner

    from agent.cli import main

    a, b = env["pods"]["a"], env["pods"]["b"]
    b.serve(tcp_ports=[9002])
    addr = f"127.0.0.1:{env['tel'].port}"
    load = a.popen([sys.executable, "-c", f"""
import socket, time
for _ in range(40):
    s = socket.create_connection(("{b.ip4}", 9002), timeout=5); s.sendall(b"x" * 1000); s.recv(100); s.close()
    time.sleep(0.02)
"""])
    try:
        out = CliRunner().invoke(main, ["top", "--metrics-addr", addr, "--interval", "1", "--once"],
                                 terminal_width=160)
    finally:
        load.wait(30)
    assert out.exit_code == 0, out.output
    row = [line for line in out.output.splitlines() if "default/a " in line]
    assert row and ("µs" in row[0] or "ms" in row[0]), out.output  # a's connect p50 in the interval
    assert "per Service" in out.output and "connect p99" in out.output  # the Services table
    lat = CliRunner().invoke(main, ["latency", "--metrics-addr", addr, "--pod", "a"], terminal_width=160)
    assert lat.exit_code == 0, lat.output
    assert "default/a" in lat.output and "█" in lat.output
    assert "default/b" not in lat.output  # --pod filters


def test_ipv6_connects_and_srtt_are_keyed_by_the_pod_v6_address(env):
    """Last in the module: turns IPv6 back on (its link chatter no longer matters here)."""
    sb, a, b = env["sb"], env["pods"]["a"], env["pods"]["b"]
    sh(sb.node_netns, "sysctl", "-qw", "net.ipv6.conf.br0.disable_ipv6=0")
    sh(sb.node_netns, "ip", "addr", "add", f"{sb.gateway6}/{sb.net6.prefixlen}", "dev", "br0", "nodad")
    for p in (a, b):
        sh(p.netns, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0")
        sh(p.netns, "ip", "addr", "add", f"{p.ip6}/{sb.net6.prefixlen}", "dev", "eth0", "nodad")
        key = ObjectKey(p.namespace, p.name)
        env["state"].apply_pod(key, Pod(key, (p.ip4, p.ip6), NODE))
    env["obs"].sync()
    b.serve(tcp_ports=[9003])
    c0, _ = hist(env, "connect", "a")
    s0, _ = hist(env, "srtt", "a")
    a.python(f"""
import socket
s = socket.create_connection(("{b.ip6}", 9003), timeout=5); s.sendall(b"x" * 100); s.recv(100); s.close()
""")
    c1, _ = hist(env, "connect", "a")
    s1, _ = hist(env, "srtt", "a")
    assert sum(c1) - sum(c0) == 1   # the one v6 connect, attributed to pod a through its v6 address
    assert sum(s1) - sum(s0) == 1   # its srtt, recorded when a's close() left ESTABLISHED


def test_a_routed_pod_veth_is_found_from_the_node_route(env):
    """A pod the way routed CNIs (Calico, the ptp plugin) wire it: its own veth in the node
    namespace, a /32 route to it, proxy ARP. No annotation, no CNI call: the observer finds the veth
    from the node's route and counts the pod's traffic."""
    sb, a = env["sb"], env["pods"]["a"]
    ns, node_if = f"{sb.prefix}-routed", f"{sb.prefix[:6]}rp0"
    x, y = env["net"].split(".")[1:]
    ip = f"10.{x}.{(int(y) + 1) % 256}.200"  # off the bridge's /24: reached through the node's routes
    key = ObjectKey("default", "routed")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        sh(sb.node_netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh(sb.node_netns, "ip", "-batch", "-", input=f"""link add {node_if} type veth peer name eth0 netns {ns}
link set {node_if} up
route add {ip}/32 dev {node_if}
""")
        sh(sb.node_netns, "sysctl", "-qw", f"net.ipv4.conf.{node_if}.proxy_arp=1")
        sh(ns, "ip", "-batch", "-", input=f"""link set lo up
link set eth0 up
addr add {ip}/32 dev eth0
route add default dev eth0
""")
        env["state"].apply_pod(key, Pod(key, (ip,), NODE))
        env["obs"].sync()
        assert env["obs"]._pod_ifnames.get(key) == node_if
        assert "a" not in [k.name for k, v in env["obs"]._pod_ifnames.items() if v == node_if]
        a.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", ip])
        received = counter(env, "pod_packets", **{"k8s.pod.name": "routed", "network.io.direction": "receive"})
        sent = counter(env, "pod_packets", **{"k8s.pod.name": "routed", "network.io.direction": "transmit"})
        assert received >= 3 and sent >= 3  # 3 echo requests in, 3 replies out (plus ARP)
    finally:
        env["state"].apply_pod(key, None)
        env["obs"].sync()
        subprocess.run(["ip", "netns", "del", ns])
    assert key not in env["obs"]._pod_ifnames


def test_host_network_pods_sharing_the_node_address_are_told_apart_by_cgroup(env):
    """Two hostNetwork pods share the (sandbox) node's address; each one's processes run in its own
    cgroup. Their connects are counted per pod, from the cgroup of the process that connected."""
    sb, b = env["sb"], env["pods"]["b"]
    b.serve(tcp_ports=[9007])
    node_ip = sb.gateway4
    made = []
    try:
        for name in ("h1", "h2"):
            cg = os.path.join(sb.cgroup, f"pod-{name}")
            os.makedirs(os.path.join(cg, "container"), exist_ok=True)  # processes sit in a container's cgroup
            made.append(cg)
            key = ObjectKey("default", name)
            env["state"].apply_pod(key, Pod(key, (node_ip,), NODE, annotations=(("nodewire.io/cgroup", cg),),
                                            host_network=True))
        env["obs"].sync()
        before = {n: sum(hist(env, "connect", n)[0]) for n in ("h1", "h2")}
        for name, n in (("h1", 2), ("h2", 3)):
            procs = os.path.join(sb.cgroup, f"pod-{name}", "container", "cgroup.procs")
            subprocess.run(["ip", "netns", "exec", sb.node_netns, sys.executable, "-c", f"""
import socket
for _ in range({n}):
    s = socket.create_connection(("{b.ip4}", 9007), timeout=5); s.close()
"""], check=True, preexec_fn=lambda p=procs: open(p, "w").write(str(os.getpid())))
        after = {n: sum(hist(env, "connect", n)[0]) for n in ("h1", "h2")}
        assert (after["h1"] - before["h1"], after["h2"] - before["h2"]) == (2, 3)
    finally:
        for name in ("h1", "h2"):
            env["state"].apply_pod(ObjectKey("default", name), None)
        env["obs"].sync()
        for cg in made:
            for d in (os.path.join(cg, "container"), cg):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
