"""Kubernetes Service behaviours on the socket path, one row each, real packets in the sandbox.

Every row is named after the Kubernetes behaviour it checks and builds its own Service (own VIP) on
one shared sandbox (a client pod, backend pods b1-b3 and "solo") and one agent running as node "node-a" in zone
"zone-a". A row is either a declarative case (objects, one probe, the expected answer) or a scenario
with steps (edits between probes). A failing row's id names the broken behaviour.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

from tests.conftest import wait_for
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root

NODE, ZONE = "node-a", "zone-a"
NO_ROUTE4, NO_ROUTE6 = "10.96.11.0/24", "fd00:10:96::11:0/112"
TCP_PORT, UDP_PORT, ECHO_PORT = 8080, 5353, 7000


@dataclass
class Env:
    client: object
    pods: dict  # name → sandbox Pod (b1, b2, b3)
    agent: object

    def ip(self, name: str, family: int = 4) -> str:
        return getattr(self.pods[name], f"ip{family}")

    def apply(self, filename: str, *objs: dict) -> None:
        t = time.time()
        write(self.agent.manifests / filename, *objs)
        wait_for(lambda: self.agent.synced_after(t), 15, what=f"agent sync after writing {filename}")

    def replies(self, kind: str, vip: str, port: int, count: int = 20, pod=None) -> dict:
        r = (pod or self.client).probe(kind, vip, port, count=count, timeout=1.0)
        return {**r["replies"], **{f"error:{k}": v for k, v in r["errors"].items()}}


@pytest.fixture(scope="module")
def env(sandbox, agent_factory, tmp_path_factory):
    client = sandbox.add_pod("client")
    # The rows' VIPs are unroutable from the client: an address no frontend holds fails at once
    # (EHOSTUNREACH) instead of timing out, and is told apart from a refused one (ECONNREFUSED).
    for net in (NO_ROUTE4, NO_ROUTE6):
        subprocess.run(["ip", "-n", client.netns, "route", "add", "unreachable", net], check=True)
    pods = {n: sandbox.add_pod(n) for n in ("b1", "b2", "b3", "solo")}  # solo: one row's alone
    for p in pods.values():
        p.serve(tcp_ports=[TCP_PORT], udp_ports=[UDP_PORT], echo_ports=[ECHO_PORT])
    agent = agent_factory(tmp_path_factory.mktemp("conformance"), extra=[
        "--node-name", NODE, "--zone", ZONE, "--no-observe", "--no-rdma"]).start()
    return Env(client, pods, agent)


# -- object builders ----------------------------------------------------------------------------------
def svc(name: str, vips: list[str], protocol: str = "TCP", **spec) -> dict:
    port, target = (53, UDP_PORT) if protocol == "UDP" else (80, TCP_PORT)
    s = service(name, vips, port=port, protocol=protocol, target_port=target)
    s["spec"].update(spec)
    return s


def eps(name: str, env: Env, members: list[dict], family: int = 4, protocol: str = "TCP") -> dict:
    """An EndpointSlice from [{"pod": "b1", "ready": .., "serving": .., "terminating": .., "node": ..,
    "zone": .., "zones": [hints], "nodes": [hints]}]."""
    port = UDP_PORT if protocol == "UDP" else TCP_PORT
    sl = endpoint_slice(name, [env.ip(m["pod"], family) for m in members], port=port, protocol=protocol)
    for e, m in zip(sl["endpoints"], members):
        e["conditions"] = {k: m[k] for k in ("ready", "serving", "terminating") if k in m}
        for key, field_ in (("node", "nodeName"), ("zone", "zone")):
            if key in m:
                e[field_] = m[key]
        hints = {h: [{"name": n} for n in m[k]] for k, h in (("zones", "forZones"), ("nodes", "forNodes")) if k in m}
        if hints:
            e["hints"] = hints
    return sl


TERMINATING = {"ready": False, "serving": True, "terminating": True}
GONE = {"ready": False, "serving": False, "terminating": True}


@dataclass
class Case:
    """Objects (from a builder taking the Env), one probe, and the set of answers expected."""
    behaviour: str
    objects: Callable[[Env], list[dict]]
    vip: str
    expect: set[str]  # pod names, or {"error:ECONNREFUSED"}
    kind: str = "tcp"

    def run(self, env: Env) -> None:
        env.apply(f"{self.behaviour}.json", *self.objects(env))
        port = 53 if self.kind == "udp" else 80
        got = env.replies(self.kind, self.vip, port)
        assert set(got) == self.expect, f"{self.behaviour}: {got}"


@dataclass
class Scenario:
    behaviour: str
    steps: Callable[[Env], None]

    def run(self, env: Env) -> None:
        self.steps(env)


def _v(n: int) -> str:
    return f"10.96.11.{n}"


CASES = [
    Case("ready_endpoints_used_and_terminating_ones_not_while_some_are_ready",
         lambda e: [svc("rdy", [_v(1)]), eps("rdy", e, [{"pod": "b1"}, {"pod": "b2", **TERMINATING}])],
         _v(1), {"b1"}),
    Case("serving_terminating_endpoints_used_when_none_ready",
         lambda e: [svc("term", [_v(2)]), eps("term", e, [{"pod": "b1", **TERMINATING}, {"pod": "b2", **GONE},
                                                         {"pod": "b3", "ready": False}])],
         _v(2), {"b1"}),
    Case("no_serving_endpoint_refuses_tcp_connect",
         lambda e: [svc("none", [_v(3)]), eps("none", e, [{"pod": "b1", **GONE}])],
         _v(3), {"error:ECONNREFUSED"}),
    Case("no_endpoint_refuses_udp_sendmsg",
         lambda e: [svc("noneu", [_v(4)], "UDP"), eps("noneu", e, [{"pod": "b1", "ready": False}], protocol="UDP")],
         _v(4), {"error:ECONNREFUSED"}, kind="udp"),
    Case("internal_traffic_policy_local_uses_only_this_nodes_endpoints",
         lambda e: [svc("itp", [_v(5)], internalTrafficPolicy="Local"),
                    eps("itp", e, [{"pod": "b1", "node": NODE}, {"pod": "b2", "node": "node-b"}])],
         _v(5), {"b1"}),
    Case("internal_traffic_policy_local_falls_back_to_local_serving_terminating",
         lambda e: [svc("itpt", [_v(6)], internalTrafficPolicy="Local"),
                    eps("itpt", e, [{"pod": "b1", "node": NODE, **TERMINATING}, {"pod": "b2", "node": "node-b"}])],
         _v(6), {"b1"}),
    Case("internal_traffic_policy_local_without_local_endpoints_refuses",
         lambda e: [svc("itpn", [_v(7)], internalTrafficPolicy="Local"),
                    eps("itpn", e, [{"pod": "b2", "node": "node-b"}])],
         _v(7), {"error:ECONNREFUSED"}),
    Case("prefer_close_uses_zone_endpoints",
         lambda e: [svc("close", [_v(8)], trafficDistribution="PreferClose"),
                    eps("close", e, [{"pod": "b1", "zone": ZONE}, {"pod": "b2", "zone": "zone-b"},
                                     {"pod": "b3", "zone": ZONE}])],
         _v(8), {"b1", "b3"}),
    Case("prefer_same_node_uses_node_endpoints",
         lambda e: [svc("snode", [_v(9)], trafficDistribution="PreferSameNode"),
                    eps("snode", e, [{"pod": "b1", "zone": ZONE, "node": NODE},
                                     {"pod": "b2", "zone": ZONE, "node": "node-b"}])],
         _v(9), {"b1"}),
    Case("topology_hints_for_this_zone_are_followed",
         lambda e: [svc("hint", [_v(10)]),
                    eps("hint", e, [{"pod": "b1", "zone": ZONE, "zones": ["zone-b"]},
                                    {"pod": "b2", "zone": "zone-b", "zones": [ZONE]}])],
         _v(10), {"b2"}),
    Case("topology_hints_ignored_when_an_endpoint_lacks_them",
         lambda e: [svc("hintm", [_v(11)]),
                    eps("hintm", e, [{"pod": "b1", "zones": [ZONE]}, {"pod": "b2"}])],
         _v(11), {"b1", "b2"}),
    Case("topology_hints_ignored_when_none_is_for_this_zone",
         lambda e: [svc("hintz", [_v(12)]),
                    eps("hintz", e, [{"pod": "b1", "zones": ["zone-b"]}, {"pod": "b2", "zones": ["zone-c"]}])],
         _v(12), {"b1", "b2"}),
    Case("headless_service_gets_no_frontend",
         lambda e: [svc("hless", []), eps("hless", e, [{"pod": "b1"}])],
         _v(13), {"error:EHOSTUNREACH"}),  # the VIP-looking address is not a frontend
]


# -- scenarios ------------------------------------------------------------------------------------------
def externalname_removes_frontend(env: Env) -> None:
    vip = _v(20)
    env.apply("extname.json", svc("extname", [vip]), eps("extname", env, [{"pod": "b1"}]))
    assert env.replies("tcp", vip, 80, 3) == {"b1": 3}
    ext = svc("extname", [])
    ext["spec"] = {"type": "ExternalName", "externalName": "db.example.org"}
    env.apply("extname.json", ext, eps("extname", env, [{"pod": "b1"}]))
    assert not [r for r in env.agent.services() if r["frontend"].startswith(vip)]
    assert env.replies("tcp", vip, 80, 3) == {"error:EHOSTUNREACH": 3}


def type_changes_keep_the_cluster_ip_frontend(env: Env) -> None:
    vip = _v(21)
    for typ in ("ClusterIP", "NodePort", "LoadBalancer", "ClusterIP"):
        s = svc("types", [vip], type=typ)
        if typ != "ClusterIP":
            s["spec"]["ports"][0]["nodePort"] = 30080
        env.apply("types.json", s, eps("types", env, [{"pod": "b2"}]))
        assert env.replies("tcp", vip, 80, 3) == {"b2": 3}, typ


def same_port_tcp_udp_remove_one_protocol(env: Env) -> None:
    vip = _v(22)
    both = svc("dual", [vip])
    both["spec"]["ports"] = [{"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": TCP_PORT},
                             {"name": "dns-udp", "port": 53, "protocol": "UDP", "targetPort": UDP_PORT}]
    sl = eps("dual", env, [{"pod": "b3"}])
    sl["ports"] = [{"name": "dns-tcp", "port": TCP_PORT, "protocol": "TCP"},
                   {"name": "dns-udp", "port": UDP_PORT, "protocol": "UDP"}]
    env.apply("dual.json", both, sl)
    assert env.replies("tcp", vip, 53, 3) == {"b3": 3}
    assert env.replies("udp", vip, 53, 3) == {"b3": 3}
    both["spec"]["ports"] = both["spec"]["ports"][:1]
    env.apply("dual.json", both, sl)
    assert env.replies("tcp", vip, 53, 3) == {"b3": 3}
    assert env.replies("udp", vip, 53, 3) == {"error:EHOSTUNREACH": 3}


def service_port_edit_moves_the_frontend(env: Env) -> None:
    vip = _v(23)
    s = svc("pedit", [vip])
    env.apply("pedit.json", s, eps("pedit", env, [{"pod": "b1"}]))
    assert env.replies("tcp", vip, 80, 3) == {"b1": 3}
    s["spec"]["ports"][0]["port"] = 81
    env.apply("pedit.json", s, eps("pedit", env, [{"pod": "b1"}]))
    assert env.replies("tcp", vip, 81, 3) == {"b1": 3}
    assert env.replies("tcp", vip, 80, 3) == {"error:EHOSTUNREACH": 3}


def udp_connect_without_endpoints_refused(env: Env) -> None:
    vip = _v(24)
    env.apply("udpc.json", svc("udpc", [vip], "UDP"), eps("udpc", env, [{"pod": "b1", **GONE}], protocol="UDP"))
    out = env.client.python(
        "import socket, errno\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"try:\n    s.connect(({vip!r}, 53)); print('connected')\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])\n")
    assert out.strip() == "ECONNREFUSED"


def dual_stack_service_serves_both_families(env: Env) -> None:
    v4, v6 = _v(25), "fd00:10:96::11:25"
    env.apply("ds.json", svc("ds", [v4, v6]), eps("ds", env, [{"pod": "b1"}]),
              eps("ds", env, [{"pod": "b2"}], family=6))
    assert env.replies("tcp", v4, 80, 3) == {"b1": 3}
    assert env.replies("tcp", v6, 80, 3) == {"b2": 3}


def hairpin_pod_reaches_itself_through_its_service(env: Env) -> None:
    vip = _v(26)
    env.apply("hair.json", svc("hair", [vip]), eps("hair", env, [{"pod": "b3"}]))
    assert env.replies("tcp", vip, 80, 3, pod=env.pods["b3"]) == {"b3": 3}


# A client holding one connected socket through a VIP: it prints the backend that answered, then on
# each line of stdin sends again and prints the outcome (reply or errno name); after an error it
# reconnects through the VIP once, as a DNS resolver or any retrying client does, and tries again.
HOLDER = """
import errno, json, socket, sys
kind, vip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def dial():
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect((vip, port))
    return s
def ask(s):
    s.send(b"q")
    return s.recv(256).decode().split()[0]
s = dial()
print(json.dumps([ask(s)]), flush=True)
for _ in sys.stdin:
    out = []
    try:
        out.append(ask(s))
    except OSError as e:
        out.append("error:" + errno.errorcode.get(e.errno, str(e)))
        try:
            s.close()
            s = dial()
            out.append(ask(s))
        except OSError as e:
            out.append("error:" + errno.errorcode.get(e.errno, str(e)))
    print(json.dumps(out), flush=True)
"""


class Holder:
    def __init__(self, env: Env, kind: str, vip: str, port: int):
        import sys
        self.p = env.client.popen([sys.executable, "-c", HOLDER, kind, vip, str(port)], stdin=subprocess.PIPE)
        self.first = self.read()[0]

    def read(self) -> list[str]:
        import json
        line = self.p.stdout.readline()
        assert line, f"holder exited: {self.p.stderr.read()[-500:]}"
        return json.loads(line)

    def again(self) -> list[str]:
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


def _connected(env: Env, name: str, vip: str, kind: str, members: list[str]) -> tuple[Holder, str]:
    proto, port = ("UDP", 53) if kind == "udp" else ("TCP", 80)
    family = 6 if ":" in vip else 4
    objs = [svc(name, [vip], proto), eps(name, env, [{"pod": m} for m in members], family, proto)]
    if kind == "tcp":  # the echo port keeps its connections open
        objs[0]["spec"]["ports"][0]["targetPort"] = ECHO_PORT
        objs[1]["ports"][0]["port"] = ECHO_PORT
    env.apply(f"{name}.json", *objs)
    h = Holder(env, kind, vip, port)
    assert h.first in members
    return h, h.first


def connected_udp_moves_off_removed_backend(env: Env, vip: str = _v(27), name: str = "cudp") -> None:
    family = 6 if ":" in vip else 4
    h, first = _connected(env, name, vip, "udp", ["b1", "b2"])
    try:
        other = "b2" if first == "b1" else "b1"
        env.apply(f"{name}.json", svc(name, [vip], "UDP"), eps(name, env, [{"pod": other}], family, "UDP"))
        got = h.again()
        # The old backend still runs: only destroying the socket keeps the client off it.
        assert got[-1] == other and first not in got, got
        assert got[0] in (other, "error:ECONNABORTED", "error:EDESTADDRREQ"), got
        assert h.again() == [other]
    finally:
        h.close()


def connected_udp_moves_off_removed_backend_ipv6(env: Env) -> None:
    connected_udp_moves_off_removed_backend(env, "fd00:10:96::11:31", "cudp6")


def connected_udp_refused_when_the_last_backend_leaves(env: Env) -> None:
    vip = _v(28)
    h, first = _connected(env, "cudpn", vip, "udp", ["b3"])
    try:
        env.apply("cudpn.json", svc("cudpn", [vip], "UDP"), eps("cudpn", env, [{"pod": "b3", "ready": False}],
                                                                protocol="UDP"))
        got = h.again()
        assert got[0] in ("error:ECONNABORTED", "error:EDESTADDRREQ") and got[-1] == "error:ECONNREFUSED", got
    finally:
        h.close()


def tcp_to_removed_backend_kept_while_it_exists(env: Env) -> None:
    vip = _v(29)
    h, first = _connected(env, "ctcp", vip, "tcp", ["b1"])
    try:
        env.apply("ctcp.json", svc("ctcp", [vip]), eps("ctcp", env, [{"pod": "b1", **TERMINATING}, {"pod": "b2"}]))
        assert h.again() == ["b1"]  # the established connection keeps its (terminating) backend
    finally:
        h.close()


def tcp_to_backend_gone_from_the_cluster_is_reset(env: Env) -> None:
    vip = _v(30)
    h, first = _connected(env, "ctcpg", vip, "tcp", ["solo"])  # no other Service lists solo
    try:
        env.apply("ctcpg.json", svc("ctcpg", [vip]), eps("ctcpg", env, [{"pod": "b3"}]))
        got = h.again()
        assert got == ["error:ECONNABORTED", "b3"], got
    finally:
        h.close()


SCENARIOS = [Scenario(f.__name__, f) for f in (
    connected_udp_moves_off_removed_backend, connected_udp_moves_off_removed_backend_ipv6,
    connected_udp_refused_when_the_last_backend_leaves,
    tcp_to_removed_backend_kept_while_it_exists, tcp_to_backend_gone_from_the_cluster_is_reset,
    externalname_removes_frontend, type_changes_keep_the_cluster_ip_frontend,
    same_port_tcp_udp_remove_one_protocol, service_port_edit_moves_the_frontend,
    udp_connect_without_endpoints_refused, dual_stack_service_serves_both_families,
    hairpin_pod_reaches_itself_through_its_service,
)]
ROWS = CASES + SCENARIOS


@pytest.mark.parametrize("row", ROWS, ids=[r.behaviour for r in ROWS])
def test_behaviour(env, row):
    row.run(env)
