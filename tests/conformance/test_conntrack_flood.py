"""North-south conntrack under a spoofed SYN flood and over time, real packets in the multi-node sandbox.

Two nodes (agents with `--devices eth0`, small conntrack maps so a bounded flood fills the half-open
one many times over, a 2 s close lifetime and a 1 s collector interval), pod a1 on node 1 and b1 on
node 2, an external client. A NodePort on node 1 reaches a1 directly and b1 through SNAT to node 1's
address. The flood comes from the client's namespace (hping3 --rand-source), bounded in count.
"""
from __future__ import annotations

import signal
import socket
import time

import pytest

from agent.datapath import abi
from agent.datapath.loader import open_loaded
from agent.datapath.maps import addr_str
from nodewire_dev.sandbox.flood import HeldFlows, connects, seconds_until_connects_work, syn_flood
from nodewire_dev.sandbox.multinode import MultiNodeSandbox
from tests.conftest import AgentProcess, wait_for
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root

ECHO_PORT, TCP_PORT = 7000, 8080
HALFOPEN = 2048           # entries: 1024 flows
FLOOD = 24 * HALFOPEN     # SYNs: the half-open map is filled 24 times over
FLOWS = 40


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("conntrack")
    with MultiNodeSandbox(2) as sb:
        n1, n2 = sb.nodes
        for node, name in ((n1, "a1"), (n2, "b1")):
            sb.add_pod(node, name).serve(tcp_ports=[TCP_PORT], echo_ports=[ECHO_PORT])
        agents = [AgentProcess(d, n.cgroup, n.pin_dir, prefix=n.nsenter([]),
                               extra=["--node-name", n.name, "--devices", "eth0", "--no-observe", "--no-rdma",
                                      "--map-size", "ct=8192", "--map-size", f"ct_halfopen={HALFOPEN}",
                                      "--ct-timeout-close", "2", "--ct-gc-interval", "1"])
                  for n in sb.nodes]
        try:
            for a in agents:
                a.start()
            for name, port, target in (("held", 30180, ECHO_PORT), ("short", 30181, TCP_PORT)):
                s = service(name, [f"10.96.18.{port - 30170}"], port=80, target_port=target)
                s["spec"]["type"] = "NodePort"
                s["spec"]["ports"][0]["nodePort"] = port
                sl = endpoint_slice(name, [n1.pods["a1"].ip4, n2.pods["b1"].ip4], port=target)
                sl["endpoints"][0]["nodeName"], sl["endpoints"][1]["nodeName"] = n1.name, n2.name
                t = time.time()
                write(d / f"{name}.json", s, sl)
                for a in agents:
                    wait_for(lambda a=a: a.synced_after(t), 15, what=f"agent sync of {name}")
            yield sb, agents
        finally:
            for a in agents:
                a.cleanup()


def _conntrack(agent: AgentProcess) -> dict:
    return (agent.status().northsouth or {}).get("conntrack") or {}


def _flood_keeps_flows(env, kill_agent: bool) -> None:
    sb, agents = env
    n1 = sb.nodes[0]
    # idle through the flood: the flows an LRU table would drop first
    held = HeldFlows(sb.client, n1.addr4, 30180, FLOWS, seconds=3, idle=True)
    assert set(held.names) == {"a1", "b1"}, held.names  # local and SNATed remote flows
    before = _conntrack(agents[0]).get("counters", {}).get("halfopen_inserted", 0)
    if kill_agent:
        agents[0].kill(signal.SIGKILL)
    flood = syn_flood(sb.client, n1.addr4, 30180, FLOOD)
    flood_end = time.monotonic()
    assert flood["sent"] == FLOOD, flood
    held.resume()
    until = seconds_until_connects_work(sb.client, n1.addr4, 30180, flood_end, limit=5.0)
    res = held.result()
    assert held.broken(res) == [], res
    assert min(res["ok"]) > 5, res  # every flow talks again after the flood
    assert until is not None, f"new connections still fail 5 s after the flood: {connects(sb.client, n1.addr4, 30180)}"
    if kill_agent:
        agents[0].start()
    # the flood did fill the half-open map many times over
    ct = wait_for(lambda: (lambda c: c if c.get("counters", {}).get("halfopen_inserted", 0) - before >= FLOOD else None)(
        _conntrack(agents[0])), 15, what="conntrack counters after the flood")
    assert ct["halfopen_evicted"] > 10 * HALFOPEN, ct
    got = connects(sb.client, n1.addr4, 30180, 16)
    assert set(got) == {"a1", "b1"}, got


def test_established_flows_survive_a_spoofed_syn_flood(env):
    """40 established NodePort flows (half SNATed to node 2's pod), idle during a flood of spoofed
    SYNs 24 times the half-open map's size, all work after it; new connections work within 5 s."""
    _flood_keeps_flows(env, kill_agent=False)


def test_agent_sigkill_mid_flood_keeps_established_flows(env):
    """The same with node 1's agent SIGKILLed as the flood starts and restarted after it: the
    datapath alone keeps every established flow."""
    _flood_keeps_flows(env, kill_agent=True)


def _entries_of(agent: AgentProcess, client: str, frontend_port: int) -> list[tuple[str, str]]:
    """(map, state) of the forward conntrack entries of this client to this frontend port."""
    loaded = open_loaded("nodeport", agent.pin_dir)
    out = []
    try:
        for name in (abi.CT_MAP, abi.CT_HALFOPEN_MAP):
            keys, values = loaded.maps[name].dump_arrays()
            for k, v in zip(keys, values):
                if (k["dir"] == abi.CT_FORWARD and addr_str(k["a"].tobytes()) == client
                        and socket.ntohs(int(k["bport"])) == frontend_port):
                    out.append((name, abi.CT_STATES.get(int(v["state"]), "?")))
    finally:
        loaded.close()
    return out


def test_finished_flows_leave_the_table_after_their_close_lifetime(env):
    """50 finished connections (to a local and a remote pod) are in the table as closed flows, and
    gone once their close lifetime (2 s here) has passed and the collector ran."""
    sb, agents = env
    n1 = sb.nodes[0]
    collected = _conntrack(agents[0]).get("counters", {}).get("collected", 0)
    got = connects(sb.client, n1.addr4, 30181, 50)
    assert set(got) == {"a1", "b1"}, got
    entries = _entries_of(agents[0], sb.client.ip4, 30181)
    assert len(entries) >= 40 and {s for _, s in entries} <= {"closing", "closed"}, entries
    wait_for(lambda: _entries_of(agents[0], sb.client.ip4, 30181) == [], 2 + 1 + 8, interval=0.5,
             what="finished flows removed after their lifetime")
    wait_for(lambda: _conntrack(agents[0]).get("counters", {}).get("collected", 0) >= collected + 2 * 40, 10,
             what="the collector counted them")


def test_status_shows_conntrack(env):
    """`nodewire status -o json` carries the conntrack figures (entries by state, collector runs)."""
    sb, agents = env
    ct = wait_for(lambda: _conntrack(agents[0]) or None, 10, what="conntrack in status")
    assert set(ct["states"]) == {"syn", "established", "closing", "closed"}
    assert ct["collector"]["runs"] > 0 and ct["lifetimes"]["close"] == 2.0, ct
