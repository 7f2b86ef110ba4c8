"""Kubernetes Service behaviours for traffic from outside the node, one row each, real packets in the
multi-node sandbox (devkit/nodewire_dev/sandbox/multinode.py).

Two nodes, each a network namespace with its own agent (`--devices eth0`), pin dir and cgroup; pod
a1 on node 1, b1 on node 2; an external client on the LAN, with the load-balancer and external-IP
ranges routed via node 1. Every row is named after the behaviour it checks and builds its own
Service (its own node port / VIP), so rows do not interfere; the agents share one manifest dir.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodewire_dev.sandbox.multinode import MultiNodeSandbox
from tests.conftest import AgentProcess, wait_for
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root

TCP_PORT, UDP_PORT, ECHO_PORT = 8080, 5353, 7000


@dataclass
class Env:
    sb: MultiNodeSandbox
    agents: list[AgentProcess]
    manifests: Path

    @property
    def client(self):
        return self.sb.client

    @property
    def n1(self):
        return self.sb.nodes[0]

    @property
    def n2(self):
        return self.sb.nodes[1]

    def pod(self, name: str):
        return next(n.pods[name] for n in self.sb.nodes if name in n.pods)

    def apply(self, filename: str, *objs: dict) -> None:
        t = time.time()
        write(self.manifests / filename, *objs)
        for a in self.agents:
            wait_for(lambda a=a: a.synced_after(t), 15, what=f"agent {a.pin_dir} sync after {filename}")

    def replies(self, kind: str, host: str, port: int, count: int = 12) -> dict:
        r = self.client.probe(kind, host, port, count=count, timeout=1.0)
        return {**r["replies"], **{f"error:{k}": v for k, v in r["errors"].items()}}

    def client_py(self, code: str) -> str:
        return self.client.python(code, timeout=60).strip()


@contextlib.contextmanager
def two_nodes(d: Path, setup=None):
    """The sandbox of this module: pods a1 (node 1) and b1 (node 2) serving TCP, UDP and echo, an agent
    per node on its eth0. setup(sb), when given, runs before the agents start (other modules' extras)."""
    with MultiNodeSandbox(2) as sb:
        n1, n2 = sb.nodes
        for node, name in ((n1, "a1"), (n2, "b1")):
            sb.add_pod(node, name).serve(tcp_ports=[TCP_PORT], udp_ports=[UDP_PORT], echo_ports=[ECHO_PORT])
        if setup:
            setup(sb)
        agents = [AgentProcess(d, n.cgroup, n.pin_dir, prefix=n.nsenter([]),
                               extra=["--node-name", n.name, "--devices", "eth0", "--no-observe", "--no-rdma"])
                  for n in sb.nodes]
        try:
            for a in agents:
                a.start()
            yield Env(sb, agents, d)
        finally:
            for a in agents:
                a.cleanup()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with two_nodes(tmp_path_factory.mktemp("northsouth")) as e:
        yield e


# -- builders -------------------------------------------------------------------------------------
def svc(env: Env, name: str, vip: str, node_port: int = 0, protocol: str = "TCP", typ: str = "NodePort",
        members=("a1", "b1"), family: int = 4, **spec) -> tuple[dict, dict]:
    """A Service with one port (80 → 8080/TCP, or 53 → 5353/UDP) and its EndpointSlice."""
    port, target = (53, UDP_PORT) if protocol == "UDP" else (80, TCP_PORT)
    s = service(name, [vip], port=port, protocol=protocol, target_port=target)
    s["spec"]["type"] = typ
    if node_port:
        s["spec"]["ports"][0]["nodePort"] = node_port
    status = spec.pop("status", None)
    s["spec"].update(spec)
    if status:
        s["status"] = status
    pods = [env.pod(m) for m in members]
    sl = endpoint_slice(name, [getattr(p, f"ip{family}") for p in pods], port=target, protocol=protocol)
    owner = {p.name: n.name for n in env.sb.nodes for p in n.pods.values()}
    for e, p in zip(sl["endpoints"], pods):
        e["nodeName"] = owner[p.name]
    return s, sl


def addr(node, family: int) -> str:
    return node.addr4 if family == 4 else node.addr6


def connected_udp(host: str, port: int) -> str:
    """A connected UDP socket's outcome: the reply, or the errno an ICMP error turned into."""
    fam = "AF_INET6" if ":" in host else "AF_INET"
    return (f"import socket\ns=socket.socket(socket.{fam}, socket.SOCK_DGRAM); s.settimeout(2)\n"
            f"s.connect(({host!r}, {port}))\n"
            "try:\n s.send(b'x'); s.send(b'x'); print(s.recv(100).decode().strip())\n"
            "except OSError as e:\n print(type(e).__name__)\n")


# -- rows -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
def test_nodeport_answers_on_every_node_address(env, protocol, family):
    """A NodePort answers on every node's address; each node reaches local and remote endpoints."""
    node_port = {("TCP", 4): 30080, ("UDP", 4): 30081, ("TCP", 6): 30082, ("UDP", 6): 30083}[protocol, family]
    vip = "10.96.12.1" if family == 4 else "fd00:10:96::12:1"
    env.apply(f"np-{protocol}-{family}.json", *svc(env, f"np-{protocol.lower()}{family}", vip, node_port,
                                                  protocol=protocol, family=family,
                                                  ipFamilies=[f"IPv{family}"]))
    for node in env.sb.nodes:
        if protocol == "TCP":  # each connect is a new flow: both pods answer, local and remote
            got = env.replies("tcp", addr(node, family), node_port, count=16)
            assert set(got) == {"a1", "b1"}, (node.name, got)
        else:  # one socket is one flow: it sticks to one pod; fresh sockets reach both
            seen = set()
            for _ in range(12):
                got = env.replies("udp", addr(node, family), node_port, count=2)
                assert len(got) == 1 and set(got) <= {"a1", "b1"}, (node.name, got)
                seen |= set(got)
            assert seen == {"a1", "b1"}, (node.name, seen)


def test_external_ip(env):
    ip = "198.51.100.10"
    env.apply("extip.json", *svc(env, "extip", "10.96.12.2", typ="ClusterIP", externalIPs=[ip]))
    got = env.replies("tcp", ip, 80, count=16)
    assert set(got) == {"a1", "b1"}, got


def test_load_balancer_ip(env):
    ip = "203.0.113.10"
    env.apply("lb.json", *svc(env, "lb", "10.96.12.3", node_port=30084, typ="LoadBalancer",
                               status={"loadBalancer": {"ingress": [{"ip": ip}]}}))
    got = env.replies("tcp", ip, 80, count=16)
    assert set(got) == {"a1", "b1"}, got
    assert set(env.replies("tcp", env.n2.addr4, 30084)) <= {"a1", "b1"}  # its node port too


def test_etp_local_keeps_client_ip_and_drops_without_local_endpoint(env):
    """externalTrafficPolicy: Local: the pod sees the client's address; a node without a local
    endpoint drops (a timeout, not a refusal), a node with one answers from it only."""
    env.apply("local.json", *svc(env, "local", "10.96.12.4", node_port=30085, members=("a1",),
                                  externalTrafficPolicy="Local"))
    code = ("import socket\ns=socket.create_connection(({host!r}, 30085), timeout=2)\n"
            "s.sendall(b'peer?'); print(s.recv(200).decode().strip())")
    assert env.client_py(code.format(host=env.n1.addr4)) == f"a1 {env.client.ip4}"
    got = env.replies("tcp", env.n2.addr4, 30085, count=3)
    assert got == {"error:TimeoutError": 3} or got == {"error:timeout": 3}, got
    # the status file follows kernel counters at its next check (it is rewritten only when it changed)
    wait_for(lambda: env.agents[1].status().northsouth["counters"]["drop_no_local"] > 0, 15, what="drop_no_local counted")


def test_health_check_node_port_follows_local_endpoints(env):
    hc = 30100
    s, sl = svc(env, "hc", "10.96.12.5", node_port=30086, typ="LoadBalancer", members=("a1",),
                externalTrafficPolicy="Local", healthCheckNodePort=hc)
    env.apply("hc.json", s, sl)
    code = ("import urllib.request, urllib.error, json\n"
            "try:\n r=urllib.request.urlopen('http://{host}:{port}/', timeout=3); print(r.status, r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n print(e.code, e.read().decode())")

    def probe(node):
        code_, body = env.client_py(code.format(host=node.addr4, port=hc)).split(" ", 1)
        return int(code_), json.loads(body)
    c1, b1 = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(probe(env.n1)), 10, what="hc 200 on n1")
    assert b1["localEndpoints"] == 1 and b1["service"] == {"namespace": "default", "name": "hc"}
    assert probe(env.n2)[0] == 503
    sl["endpoints"] = []  # the endpoint goes away: node 1 turns unhealthy too
    env.apply("hc.json", s, sl)
    assert wait_for(lambda: probe(env.n1)[0] == 503, 10, what="hc 503 on n1 once the endpoint left")


def test_node_healthz_on_10256(env):
    code = ("import urllib.request, json\nr=urllib.request.urlopen('http://{host}:10256/healthz', timeout=3)\n"
            "print(r.status, json.loads(r.read())['nodeEligible'])")
    for node in env.sb.nodes:
        assert env.client_py(code.format(host=node.addr4)) == "200 True"


def test_load_balancer_source_ranges(env):
    ip_ok, ip_blocked = "203.0.113.20", "203.0.113.21"
    status = lambda ip: {"loadBalancer": {"ingress": [{"ip": ip}]}}  # noqa: E731
    env.apply("ranges.json",
              *svc(env, "ranges-ok", "10.96.12.6", typ="LoadBalancer", node_port=30087, status=status(ip_ok),
                   loadBalancerSourceRanges=["198.18.0.0/24"]),
              *svc(env, "ranges-no", "10.96.12.7", typ="LoadBalancer", node_port=30088, status=status(ip_blocked),
                   loadBalancerSourceRanges=["10.0.0.0/8"]))
    assert set(env.replies("tcp", ip_ok, 80)) <= {"a1", "b1"}
    got = env.replies("tcp", ip_blocked, 80, count=2)
    assert all(k.startswith("error:") and "Timeout" in k or k == "error:timeout" for k in got), got
    # the status file follows kernel counters at its next check (it is rewritten only when it changed)
    wait_for(lambda: env.agents[0].status().northsouth["counters"]["drop_source_range"] > 0, 15, what="drop_source_range counted")


def test_session_affinity_on_nodeport(env):
    env.apply("affinity.json", *svc(env, "affinity", "10.96.12.8", node_port=30089, sessionAffinity="ClientIP"))
    got = env.replies("tcp", env.n1.addr4, 30089, count=16)
    assert len(got) == 1 and list(got.values()) == [16], got


def test_type_change_releases_the_node_port(env):
    s, sl = svc(env, "retype", "10.96.12.9", node_port=30090)
    env.apply("retype.json", s, sl)
    assert set(env.replies("tcp", env.n1.addr4, 30090)) <= {"a1", "b1"}
    s["spec"]["type"] = "ClusterIP"
    del s["spec"]["ports"][0]["nodePort"]
    env.apply("retype.json", s, sl)
    # nothing listens on the node port any more: the node's own stack refuses
    assert env.replies("tcp", env.n1.addr4, 30090, count=3) == {"error:ECONNREFUSED": 3}


@pytest.mark.parametrize("family", [4, 6])
def test_no_endpoint_rejects(env, family):
    """No endpoint: TCP gets a RST (ECONNREFUSED), UDP an ICMP port-unreachable (ECONNREFUSED on a
    connected socket), on a NodePort and on an external IP (where no local stack would answer)."""
    vip = "10.96.12.10" if family == 4 else "fd00:10:96::12:10"
    ext = "198.51.100.11" if family == 4 else "2001:db8:6::11"
    tcp = svc(env, f"empty-tcp{family}", vip, node_port=30091 + family, members=(), family=family,
              externalIPs=[ext], ipFamilies=[f"IPv{family}"])
    udp = svc(env, f"empty-udp{family}", vip, node_port=30091 + family, protocol="UDP", members=(), family=family,
              externalIPs=[ext], ipFamilies=[f"IPv{family}"])
    env.apply(f"empty{family}.json", *tcp, *udp)
    for host in (addr(env.n2, family), ext):
        assert env.replies("tcp", host, 80 if host == ext else 30091 + family, count=3) == {"error:ECONNREFUSED": 3}
        assert env.client_py(connected_udp(host, 53 if host == ext else 30091 + family)) == "ConnectionRefusedError"


def test_sigkill_under_nodeport_load_keeps_established_flows(env):
    """SIGKILL node 1's agent while long-lived flows run through its NodePort (to local and remote
    pods): every established flow keeps answering, new flows work while it is down and after it
    restarts, and the restarted agent rewrites nothing (it adopts the pinned state)."""
    s_target = (env.n1.addr4, 30097)
    code = f"""
import socket, time, json, sys
conns = [socket.create_connection({s_target!r}, timeout=2) for _ in range(12)]
print("up", flush=True)
ok = fail = 0
deadline = time.time() + float(sys.argv[1])
while time.time() < deadline:
    for c in conns:
        try:
            c.sendall(b"x"); ok += len(c.recv(100)) > 0
        except OSError:
            fail += 1
    time.sleep(0.05)
print(json.dumps({{"ok": ok, "fail": fail}}))
"""
    s, _ = svc(env, "restart", "10.96.12.11", node_port=30097)
    s["spec"]["ports"][0]["targetPort"] = ECHO_PORT
    sl = endpoint_slice("restart", [env.pod("a1").ip4, env.pod("b1").ip4], port=ECHO_PORT)
    sl["endpoints"][0]["nodeName"], sl["endpoints"][1]["nodeName"] = env.n1.name, env.n2.name
    env.apply("restart.json", s, sl)
    load = env.client.popen([sys.executable, "-c", code, "8"])
    assert load.stdout.readline().strip() == "up", load.communicate(timeout=30)[1][-2000:]
    time.sleep(1)
    agent = env.agents[0]
    agent.kill(signal.SIGKILL)
    answered = lambda: {k.split()[0] for k in env.replies("tcp", env.n1.addr4, 30097, count=4)}  # noqa: E731
    assert answered() <= {"a1", "b1"}  # new flows while the agent is down (echo pods answer "name data")
    written_before = agent.status().counters.written
    agent.start()
    st = agent.status()
    assert st.northsouth["last_sync"]["written"] == 0, st.northsouth["last_sync"]
    # every pinned Maglev table already names the right backends: none is rebuilt
    assert st.northsouth["maglev_tables"] > 0 and st.northsouth["maglev_tables_built"] == 0, st.northsouth
    assert written_before is not None
    out, _ = load.communicate(timeout=30)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["fail"] == 0 and result["ok"] > 12 * 20, result
    assert answered() <= {"a1", "b1"}  # new flows after the restart


def test_reused_client_port_straight_to_a_backend_is_not_rewritten(env):
    """A client that reaches a pod through a NodePort, then dials the pod itself from the same source
    port, gets the pod's own replies (the first flow's reverse NAT must not apply to the second)."""
    env.apply("reuse.json", *svc(env, "reuse", "10.96.12.12", node_port=30098, members=("a1",)))
    env.sb.route_via(env.n1.pod_net4, env.n1)
    code = f"""
import socket
def ask(host, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.settimeout(3)
    s.bind(("0.0.0.0", 45678)); s.connect((host, port)); s.sendall(b"peer?")
    out = s.recv(100).decode().split()[0]; s.close(); return out
print(ask({env.n1.addr4!r}, 30098), ask({env.pod("a1").ip4!r}, {TCP_PORT}))
"""
    assert env.client_py(code) == "a1 a1"


def test_local_sockets_reach_node_ports_through_the_socket_path(env):
    """A node's own process dialling 127.0.0.1:nodePort or its node address:nodePort is balanced at
    connect() (socket path), not by the tc program: tc's new-flow counters do not move."""
    env.apply("localsock.json", *svc(env, "localsock", "10.96.12.13", node_port=30099))
    from agent.datapath import abi
    from agent.datapath.loader import open_loaded
    loaded = open_loaded("nodeport", env.n1.pin_dir)
    stats = loaded.maps[abi.NP_STATS_MAP]

    def tc_new_flows() -> int:  # NW_NP_LOCAL + NW_NP_REMOTE, read from the pinned map itself
        keys, values = stats.dump_summed()
        return int(sum(v for k, v in zip(keys.tolist(), values.tolist()) if k in (0, 1)))
    before = tc_new_flows()
    code = ("import socket\nout=[]\nfor host in ('127.0.0.1', {addr!r}):\n"
            " for _ in range(4):\n  s=socket.create_connection((host, 30099), timeout=3); s.sendall(b'x')\n"
            "  out.append(s.recv(100).decode().strip()); s.close()\nprint(' '.join(sorted(set(out))))")
    res = env.n1.run([sys.executable, "-c", code.format(addr=env.n1.addr4)])
    assert res.returncode == 0, res.stderr[-1000:]
    assert set(res.stdout.split()) <= {"a1", "b1"} and res.stdout.strip(), res.stdout
    # one connect from outside is one new tc flow: the count moves by exactly that one
    assert set(env.replies("tcp", env.n1.addr4, 30099, count=1)) <= {"a1", "b1"}
    assert tc_new_flows() == before + 1
    loaded.close()


def test_maglev_every_node_picks_the_same_backend_for_a_flow(env):
    """The same client flow (address, port) to a load-balancer IP gets the same pod whichever node the
    router sends it to (Maglev tables and the flow hash do not depend on the node)."""
    ip = "203.0.113.30"
    env.apply("maglev.json", *svc(env, "maglev", "10.96.12.14", typ="LoadBalancer", node_port=30096,
                                   status={"loadBalancer": {"ingress": [{"ip": ip}]}}))
    code = f"""
import socket
out = []
for port in range(46100, 46116):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.settimeout(3)
    s.bind(("0.0.0.0", port)); s.connect(({ip!r}, 80)); s.sendall(b"x")
    out.append(s.recv(100).decode().strip()); s.close()
print(" ".join(out))
"""
    try:
        via = {}
        for node in env.sb.nodes:
            env.sb.route_via(f"{ip}/32", node)
            via[node.name] = env.client_py(code).split()
        first, second = via.values()
        assert first == second, via
        assert set(first) == {"a1", "b1"}, first  # and the flows do spread over both pods
        assert all(a.status().northsouth["maglev_tables"] > 0 for a in env.agents)
    finally:
        env.sb.route_via(f"{ip}/32", env.n1)
