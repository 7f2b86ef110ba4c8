"""The socket load balancer in the real kernel: a sandbox of netns pods, the real agent, real packets."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import wait_for
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def cluster(sandbox, agent_factory, tmp_path_factory):
    """client + three backend pods (TCP 8080, UDP 5353, echo 7000) and one running agent."""
    client = sandbox.add_pod("client")
    backends = [sandbox.add_pod(f"b{i}") for i in range(1, 4)]
    for b in backends:
        b.serve(tcp_ports=[8080], udp_ports=[5353], echo_ports=[7000])
    agent = agent_factory(tmp_path_factory.mktemp("manifests")).start()
    return client, backends, agent


def apply(agent, filename, *objs):
    """Write a manifest file and wait until the agent has synced after the write."""
    t = time.time()
    write(agent.manifests / filename, *objs)
    wait_for(lambda: agent.synced_after(t), 10, what=f"agent sync after writing {filename}")


def test_tcp_v4_vip_reaches_a_backend_and_getpeername_shows_the_vip(cluster):
    client, backends, agent = cluster
    apply(agent, "tcp4.json", service("tcp4", ["10.96.1.1"]), endpoint_slice("tcp4", [backends[0].ip4]))
    r = client.probe("tcp", "10.96.1.1", 80, count=5)
    assert r["replies"] == {"b1": 5}
    assert r["peers"] == [["10.96.1.1", 80]]


def test_tcp_v6_vip_reaches_a_backend(cluster):
    client, backends, agent = cluster
    apply(agent, "tcp6.json", service("tcp6", ["fd00:10:96::1:1"]), endpoint_slice("tcp6", [backends[1].ip6]))
    r = client.probe("tcp", "fd00:10:96::1:1", 80, count=5)
    assert r["replies"] == {"b2": 5}
    assert r["peers"] == [["fd00:10:96::1:1", 80]]


@pytest.mark.parametrize("vip, family", [("10.96.1.2", "ip4"), ("fd00:10:96::1:2", "ip6")])
def test_udp_reaches_a_backend_and_the_reply_comes_from_the_vip(cluster, vip, family):
    client, backends, agent = cluster
    name = f"udp{family[-1]}"
    apply(agent, f"{name}.json", service(name, [vip], port=53, protocol="UDP", target_port=5353),
          endpoint_slice(name, [getattr(backends[2], family)], port=5353, protocol="UDP"))
    r = client.probe("udp", vip, 53, count=5)
    assert r["replies"] == {"b3": 5}
    assert r["sources"] == [[vip, 53]]


def test_spread_over_three_backends_is_roughly_even(cluster):
    client, backends, agent = cluster
    apply(agent, "spread.json", service("spread", ["10.96.1.3"]), endpoint_slice("spread", [b.ip4 for b in backends]))
    r = client.probe("tcp", "10.96.1.3", 80, count=300)
    assert sum(r["replies"].values()) == 300, r
    # Uniform choice: each count ~ Binomial(300, 1/3), mean 100, sd 8.2. [60, 140] is ±4.9 sd, so a fair
    # selector fails this about once in a million runs, and one that favours a backend fails it always.
    assert set(r["replies"]) == {"b1", "b2", "b3"}
    assert all(60 <= n <= 140 for n in r["replies"].values()), r


def test_removing_an_endpoint_means_no_new_connect_goes_to_it(cluster):
    client, backends, agent = cluster
    apply(agent, "shrink.json", service("shrink", ["10.96.1.4"]), endpoint_slice("shrink", [b.ip4 for b in backends]))
    assert set(client.probe("tcp", "10.96.1.4", 80, count=60)["replies"]) == {"b1", "b2", "b3"}
    apply(agent, "shrink.json", service("shrink", ["10.96.1.4"]),
          endpoint_slice("shrink", [b.ip4 for b in backends], ready=[True, False, True]))
    r = client.probe("tcp", "10.96.1.4", 80, count=100)
    assert sum(r["replies"].values()) == 100 and "b2" not in r["replies"], r
    [row] = [s for s in agent.services() if s["frontend"] == "10.96.1.4:80"]
    assert sorted(b["ip"] for b in row["backends"]) == [backends[0].ip4, backends[2].ip4]


def test_a_service_without_ready_endpoints_refuses_connects(cluster):
    client, backends, agent = cluster
    apply(agent, "empty.json", service("empty", ["10.96.1.5"]),
          endpoint_slice("empty", [backends[0].ip4], ready=[False]))
    r = client.probe("tcp", "10.96.1.5", 80, count=3)
    assert r == {"replies": {}, "errors": {"ECONNREFUSED": 3}, "peers": []}


def test_a_non_service_address_is_untouched(cluster):
    client, backends, agent = cluster
    apply(agent, "direct.json", service("direct", ["10.96.1.6"]), endpoint_slice("direct", [backends[0].ip4]))
    # A pod address (even one that is a backend elsewhere) goes where it was dialled.
    r = client.probe("tcp", backends[1].ip4, 8080, count=3)
    assert r["replies"] == {"b2": 3} and r["peers"] == [[backends[1].ip4, 8080]]
    # The VIP on a port the Service does not expose is not rewritten (nothing listens there: no reply).
    r = client.probe("tcp", "10.96.1.6", 81, count=1, timeout=0.5)
    assert r["replies"] == {} and r["errors"]


def test_bad_manifests_are_named_and_other_services_keep_working(cluster):
    client, backends, agent = cluster
    apply(agent, "ok.json", service("ok", ["10.96.1.7"]), endpoint_slice("ok", [backends[0].ip4]))
    cases = {
        "type.json": (service("badtype", ["10.96.1.8"], port="eighty"), "spec.ports[0].port"),
        "range.json": (service("badrange", ["10.96.1.9"], port=70000), "spec.ports[0].port"),
        "proto.json": (service("badproto", ["10.96.1.10"], protocol="SCTPX"), "spec.ports[0].protocol"),
    }
    for fname, (obj, _field) in cases.items():
        apply(agent, fname, obj)
    t = time.time()
    (agent.manifests / "broken.yaml").write_text("kind: Service\nmetadata: {name: x\n  spec: [\n")
    wait_for(lambda: agent.synced_after(t), 10, what="broken yaml taken in")
    errors = agent.status().object_errors
    for fname, (obj, field) in cases.items():
        name = obj["metadata"]["name"]
        assert any(fname in e and f"default/{name}" in e and field in e for e in errors), (fname, errors)
    assert any("broken.yaml" in e and "cannot parse" in e for e in errors), errors
    assert client.probe("tcp", "10.96.1.7", 80, count=3)["replies"] == {"b1": 3}
    frontends = {s["frontend"] for s in agent.services()}
    assert "10.96.1.7:80" in frontends and "10.96.1.9:80" not in frontends


ECHO_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("connected", flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(s.recv(256).decode().strip(), flush=True)
"""


def test_restart_keeps_connections_and_maps(cluster, agent_factory):
    client, backends, agent = cluster
    apply(agent, "echo.json", service("echo", ["10.96.1.11"], port=7000, target_port=7000),
          endpoint_slice("echo", [backends[0].ip4], port=7000))
    conn = client.popen([sys.executable, "-c", ECHO_CLIENT, "10.96.1.11", "7000"], stdin=subprocess.PIPE)
    try:
        assert conn.stdout.readline().strip() == "connected"

        def say(word):
            conn.stdin.write(word + "\n")
            conn.stdin.flush()
            return conn.stdout.readline().strip()

        assert say("before") == "b1 before"
        before = agent.services()
        agent.kill(signal.SIGKILL)
        # Agent gone: the established connection and new connects still work; the maps are still there.
        assert say("while-down") == "b1 while-down"
        assert client.probe("tcp", "10.96.1.3", 80, count=10)["errors"] == {}
        # The kernel holds ids only; Service names come from the running agent, so they are unknown now.
        unnamed = [dict(r, service="", port_name="") for r in before]
        assert agent.services() == unnamed
        agent.start()
        first = agent.status().first_sync
        assert (first.written, first.deleted) == (0, 0), first  # nothing flushed, nothing rewritten
        assert agent.services() == before
        assert say("after") == "b1 after"
    finally:
        conn.kill()
        conn.wait()


def test_removing_a_manifest_file_removes_its_frontends(cluster):
    client, backends, agent = cluster
    apply(agent, "gone.json", service("gone", ["10.96.1.12"]), endpoint_slice("gone", [backends[0].ip4]))
    assert client.probe("tcp", "10.96.1.12", 80)["replies"] == {"b1": 1}
    t = time.time()
    (agent.manifests / "gone.json").unlink()
    wait_for(lambda: agent.synced_after(t), 10, what="agent took in the removal")
    assert "10.96.1.12:80" not in {s["frontend"] for s in agent.services()}
    # No longer a Service address: the connect goes where it was dialled (nowhere), no backend answers.
    assert client.probe("tcp", "10.96.1.12", 80, timeout=0.5)["replies"] == {}


def test_status_reports_programs_maps_and_sync(cluster):
    client, backends, agent = cluster
    out = subprocess.run([sys.executable.replace("python", "nodewire"), "status", "-o", "json", "--pin-dir",
                          agent.pin_dir], capture_output=True, text=True, check=True)
    st = __import__("json").loads(out.stdout)
    assert st["agent_running"] is True
    lb_hooks = {"nw_connect4", "nw_connect6", "nw_sendmsg4", "nw_sendmsg6",
                "nw_recvmsg4", "nw_recvmsg6", "nw_getpeername4", "nw_getpeername6"}
    loaded = {fn for _root, _dirs, files in os.walk(os.path.join(agent.pin_dir, "progs")) for fn in files}
    assert lb_hooks <= set(st["attached"])  # and the observer's sock_ops, with observe on (the default)
    assert set(st["attached"]) <= loaded, "something not loaded by this agent is listed as attached"
    services_map = st["maps"]["nodewire_services_v1"]
    assert services_map["entries"] == sum(1 + len(s["backends"]) for s in agent.services())
    assert st["last_sync"]["seconds"] > 0


def test_session_affinity_keeps_a_client_on_one_backend(cluster):
    client, backends, agent = cluster
    svc = service("sticky", ["10.96.1.13"])
    svc["spec"]["sessionAffinity"] = "ClientIP"
    svc["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 300}}
    apply(agent, "sticky.json", svc, endpoint_slice("sticky", [b.ip4 for b in backends]))
    r = client.probe("tcp", "10.96.1.13", 80, count=30)
    assert len(r["replies"]) == 1 and sum(r["replies"].values()) == 30, r
    [row] = [s for s in agent.services() if s["frontend"] == "10.96.1.13:80"]
    assert row["session_affinity_timeout"] == 300
    # The chosen backend leaves the Service: the client moves to another one and stays there.
    chosen = next(iter(r["replies"]))
    keep = [b.ip4 for b in backends if b.name != chosen]
    apply(agent, "sticky.json", svc, endpoint_slice("sticky", keep))
    r2 = client.probe("tcp", "10.96.1.13", 80, count=20)
    assert len(r2["replies"]) == 1 and chosen not in r2["replies"], r2
