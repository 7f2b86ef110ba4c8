"""bpf/lib/ct.h through the real nodeport.c programs, packet by packet (BPF_PROG_TEST_RUN): TCP states,
half-open flows kept apart from confirmed ones, lifetimes, SNAT ports held and returned, and the
collector (agent/datapath/conntrack.py) removing what expired.

Each test loads nodeport.c with its own pin dir and small maps, writes one NodePort frontend with one
backend (local or on another node) straight into the maps, and runs crafted Ethernet frames through
nw_np_ingress (client → node) and nw_np_egress (a local backend's replies). The programs' packet
rewrites come back in the output frame; the conntrack maps are read from their pins.
"""
from __future__ import annotations

import secrets
import shutil
import socket
import struct
import time

import numpy as np
import pytest

from agent.datapath import abi, bpfsys
from agent.datapath.conntrack import ConntrackCollector, Lifetimes
from agent.datapath.loader import MapSizes, ensure_mounts, remove_pins
from agent.datapath.maps import addr16, addr_str, pack_rows, port_be
from agent.datapath.nodeport import NodePortDatapath
from agent.paths import state_dir_for

pytestmark = pytest.mark.root

CLIENT, FRONTEND, NODE = "198.18.0.100", "198.18.0.11", "198.18.0.11"
LOCAL_POD, REMOTE_POD = "10.244.1.2", "10.244.2.2"
NODE_PORT, TARGET = 30080, 8080
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
TC_ACT_OK, TC_ACT_SHOT = 0, 2


def frame(src: str, sport: int, dst: str, dport: int, flags: int = 0, proto: int = socket.IPPROTO_TCP) -> bytes:
    """Ethernet + IPv4 + TCP (with flags) or UDP; checksums are rewritten incrementally, never checked."""
    l4 = (struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) if proto == socket.IPPROTO_TCP
          else struct.pack("!HHHH", sport, dport, 8 + 4, 0) + b"data")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + l4


def tuple_of(out: bytes) -> tuple[str, int, str, int]:
    ip = out[14:34]
    sport, dport = struct.unpack("!HH", out[34:38])
    return socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport


SIZES = MapSizes(ct=8192, ct_halfopen=8192)  # room for every SNAT port of an address, in either map
_LOADED: dict[Lifetimes, NodePortDatapath] = {}


@pytest.fixture(scope="module", autouse=True)
def _programs():
    """nodeport.c compiled once per set of lifetimes (they are compile-time constants) for the module."""
    ensure_mounts()
    yield
    for dp in _LOADED.values():
        pin = dp.loaded.pin_dir
        dp.close()
        remove_pins(pin)
        shutil.rmtree(state_dir_for(pin), ignore_errors=True)
    _LOADED.clear()


def _reset(dp: NodePortDatapath) -> None:
    """Empty every map a test writes or the program fills, and zero the counters."""
    m = dp.loaded.maps
    for name in (abi.CT_MAP, abi.CT_HALFOPEN_MAP, abi.NP_SERVICES_MAP, abi.NP_BACKENDS_MAP, abi.NP_LOCAL_MAP):
        keys, _ = m[name].dump_arrays()
        m[name].delete_array(keys)
    for name in (abi.CT_STATS_MAP, abi.NP_STATS_MAP):
        keys, values = m[name].dump_arrays()
        m[name].update_arrays(keys, np.zeros_like(values))


class Node:
    """nodeport.c with one NodePort frontend → one backend (local: no SNAT; remote: SNAT to NODE)."""

    def __init__(self, backend: str, lifetimes: Lifetimes, proto: int = socket.IPPROTO_TCP):
        if lifetimes not in _LOADED:
            _LOADED[lifetimes] = NodePortDatapath(f"/sys/fs/bpf/nwtest-ct-{secrets.token_hex(3)}", SIZES,
                                                  lifetimes=lifetimes)
        self.dp = _LOADED[lifetimes]
        _reset(self.dp)
        self.ct = self.dp.conntrack
        self.proto = proto
        self.dp.set_snat_addresses([NODE])
        m = self.dp.loaded.maps  # written straight, as the writer would (lib/lb.h's layouts)
        svc, backends, local = m[abi.NP_SERVICES_MAP], m[abi.NP_BACKENDS_MAP], m[abi.NP_LOCAL_MAP]
        rows = [(addr16(FRONTEND), port_be(NODE_PORT), proto, 0, 0), (addr16(FRONTEND), port_be(NODE_PORT), proto, 0, 1)]
        keys = pack_rows(svc.key_dtype, rows)
        values = pack_rows(svc.value_dtype, [(0, 1, 0, 1, 0), (1, 0, 0, 0, 0)])
        be = pack_rows(backends.value_dtype, [(addr16(backend), port_be(TARGET), proto)])[0]
        backends.update([((1).to_bytes(4, "little"), be)])
        svc.update(list(zip(keys, values)))
        if backend == LOCAL_POD:
            local.update([(addr16(LOCAL_POD), b"\1")])

    def ingress(self, pkt: bytes) -> tuple[int, bytes]:
        return bpfsys.prog_test_run(self.dp.loaded.prog_fd("nw_np_ingress"), pkt, "nw_np_ingress")

    def egress(self, pkt: bytes) -> tuple[int, bytes]:
        return bpfsys.prog_test_run(self.dp.loaded.prog_fd("nw_np_egress"), pkt, "nw_np_egress")

    def entries(self, which: str) -> list[dict]:
        m = self.ct.confirmed if which == "confirmed" else self.ct.halfopen
        keys, values = m.dump_arrays()
        return [{"a": addr_str(k["a"].tobytes()), "aport": socket.ntohs(int(k["aport"])), "b": addr_str(k["b"].tobytes()),
                 "bport": socket.ntohs(int(k["bport"])), "dir": int(k["dir"]), "state": abi.CT_STATES.get(int(v["state"])),
                 "flags": int(v["flags"]), "last_seen": int(v["last_seen"])} for k, v in zip(keys, values)]


@pytest.fixture
def make_node():
    return lambda backend=LOCAL_POD, lifetimes=Lifetimes(), **kw: Node(backend, lifetimes, **kw)


def connect(node: Node, cport: int, backend: str) -> None:
    """A whole handshake through the programs, the backend's SYN-ACK on its real path (egress for a
    local pod, ingress to the SNAT port for a remote one); the flow ends up confirmed."""
    rc, out = node.ingress(frame(CLIENT, cport, FRONTEND, NODE_PORT, SYN))
    src, sport, dst, dport = tuple_of(out)
    assert (dst, dport) == (backend, TARGET), tuple_of(out)
    if backend == LOCAL_POD:
        rc, out = node.egress(frame(LOCAL_POD, TARGET, CLIENT, cport, SYN | ACK))
    else:
        rc, out = node.ingress(frame(REMOTE_POD, TARGET, src, sport, SYN | ACK))
    assert tuple_of(out) == (FRONTEND, NODE_PORT, CLIENT, cport)
    node.ingress(frame(CLIENT, cport, FRONTEND, NODE_PORT, ACK))
    mine = [e for e in node.entries("confirmed") if e["dir"] == abi.CT_FORWARD and e["aport"] == cport]
    assert [e["state"] for e in mine] == ["established"], node.entries("confirmed")


def test_tcp_states_and_the_move_from_half_open_to_confirmed(make_node):
    node = make_node()
    rc, out = node.ingress(frame(CLIENT, 40000, FRONTEND, NODE_PORT, SYN))
    assert rc == TC_ACT_OK and tuple_of(out) == (CLIENT, 40000, LOCAL_POD, TARGET)
    assert {e["state"] for e in node.entries("halfopen")} == {"syn"} and len(node.entries("halfopen")) == 2
    assert node.entries("confirmed") == []
    node.egress(frame(LOCAL_POD, TARGET, CLIENT, 40000, SYN | ACK))
    assert all(e["flags"] & abi.CT_F_REPLIED for e in node.entries("halfopen"))  # still half-open: no ACK yet
    assert node.entries("confirmed") == []
    node.ingress(frame(CLIENT, 40000, FRONTEND, NODE_PORT, ACK))
    assert node.entries("halfopen") == []
    assert [e["state"] for e in node.entries("confirmed")] == ["established"] * 2
    node.ingress(frame(CLIENT, 40000, FRONTEND, NODE_PORT, FIN | ACK))
    assert [e["state"] for e in node.entries("confirmed")] == ["closing"] * 2
    node.egress(frame(LOCAL_POD, TARGET, CLIENT, 40000, FIN | ACK))
    assert [e["state"] for e in node.entries("confirmed")] == ["closed"] * 2
    c = node.ct.counters()
    assert c["promoted"] == 1 and c["halfopen_inserted"] == 2 and c["halfopen_deleted"] == 2, c


@pytest.mark.parametrize("backend", [LOCAL_POD, REMOTE_POD])
def test_a_syn_flood_evicts_only_half_open_flows(make_node, backend):
    """Spoofed SYNs 3 × the half-open map's size leave a confirmed flow (SNATed too) as it was, and
    it goes through both ways after; a new connection is confirmed after the flood (for a remote
    backend once the flood's half-open flows have been idle for a second: they hold every SNAT port)."""
    node = make_node(backend)
    connect(node, 40001, backend)
    before = node.entries("confirmed")
    cap = node.ct.halfopen.capacity
    for i in range(3 * cap):
        src = socket.inet_ntoa(struct.pack("!I", 0x0A000000 + i))
        node.ingress(frame(src, 1024 + i % 60000, FRONTEND, NODE_PORT, SYN))
    assert node.entries("confirmed") == before  # untouched
    c = node.ct.counters()
    # every SYN got a half-open flow (two entries) or, to a remote backend, found no SNAT port free
    assert c["halfopen_inserted"] + 2 * c["snat_exhausted"] >= 6 * cap - 2, c
    if backend == LOCAL_POD:
        assert ConntrackCollector(node.ct).status()["halfopen_evicted"] >= 4 * cap
    rc, out = node.ingress(frame(CLIENT, 40001, FRONTEND, NODE_PORT, ACK))
    src, sport, dst, dport = tuple_of(out)
    assert (dst, dport) == (backend, TARGET)
    reply = (frame(LOCAL_POD, TARGET, CLIENT, 40001, ACK) if backend == LOCAL_POD
             else frame(REMOTE_POD, TARGET, src, sport, ACK))
    rc, out = (node.egress if backend == LOCAL_POD else node.ingress)(reply)
    assert tuple_of(out) == (FRONTEND, NODE_PORT, CLIENT, 40001)
    if backend == REMOTE_POD:
        time.sleep(1.1)
    connect(node, 40002, backend)


def test_expired_entries_are_absent_and_the_collector_removes_them(make_node):
    node = make_node(lifetimes=Lifetimes(syn=0.3, close=0.3, other=0.3))
    connect(node, 40010, LOCAL_POD)
    node.ingress(frame(CLIENT, 40011, FRONTEND, NODE_PORT, SYN))  # a half-open flow
    node.ingress(frame(CLIENT, 40010, FRONTEND, NODE_PORT, RST | ACK))  # the first one ends
    assert sorted(e["state"] for e in node.entries("confirmed")) == ["closed"] * 2
    coll = ConntrackCollector(node.ct, max_interval=1.0)
    census = coll.run_once()
    assert census["confirmed"].removed == 0 and census["halfopen"].removed == 0  # not yet expired
    time.sleep(0.5)
    # expired: the local backend's late reply is not translated any more (no entry for it)
    rc, out = node.egress(frame(LOCAL_POD, TARGET, CLIENT, 40010, ACK))
    assert tuple_of(out)[0] == LOCAL_POD
    census = coll.run_once()
    assert census["confirmed"].removed == 2 and census["halfopen"].removed == 2, census
    assert node.entries("confirmed") == [] and node.entries("halfopen") == []
    c = node.ct.counters()
    assert c["collected"] == 2 and c["collected_halfopen"] == 2 and c["collections"] == 2, c


def _hold_every_port(node: Node, last_seen: int, lifetime: int, halfopen: bool = False) -> None:
    """Reverse entries (live or not, by last_seen) holding every SNAT port of NODE toward the backend:
    confirmed flows, or half-open ones (SYN seen, no reply)."""
    m = node.ct.halfopen if halfopen else node.ct.confirmed
    ports = np.arange(abi.SNAT_PORT_MIN, abi.SNAT_PORT_MAX + 1)
    keys = np.zeros(len(ports), dtype=m.key_dtype)
    keys["a"] = np.frombuffer(addr16(REMOTE_POD), dtype="V16")[0]
    keys["b"] = np.frombuffer(addr16(NODE), dtype="V16")[0]
    keys["aport"] = port_be(TARGET)
    keys["bport"] = [port_be(int(p)) for p in ports]
    keys["proto"] = node.proto
    keys["dir"] = abi.CT_REVERSE
    values = np.zeros(len(ports), dtype=m.value_dtype)
    values["x"] = np.frombuffer(addr16(FRONTEND), dtype="V16")[0]
    values["y"] = np.frombuffer(addr16("192.0.2.1"), dtype="V16")[0]
    values["state"] = abi.CT_S_SYN if halfopen else abi.CT_S_ESTABLISHED
    values["flags"] = abi.CT_F_SNAT | (0 if halfopen else abi.CT_F_REPLIED)
    values["last_seen"] = last_seen
    values["expires"] = last_seen + lifetime
    m.update_arrays(keys, values)


def test_snat_port_held_while_its_flow_lives_and_returned_when_it_expires(make_node):
    node = make_node(REMOTE_POD, proto=socket.IPPROTO_UDP)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    _hold_every_port(node, now, 1_000_000_000)  # live UDP flows hold every port toward this backend
    rc, _ = node.ingress(frame(CLIENT, 41000, FRONTEND, NODE_PORT, proto=socket.IPPROTO_UDP))
    assert rc == TC_ACT_SHOT and node.dp.counters()["drop_error"] == 1
    assert node.ct.counters()["snat_exhausted"] == 1 and node.entries("halfopen") == []
    _hold_every_port(node, now - 2_000_000_000, 1_000_000_000)  # the same flows, idle past their lifetime
    rc, out = node.ingress(frame(CLIENT, 41000, FRONTEND, NODE_PORT, proto=socket.IPPROTO_UDP))
    src, sport, dst, dport = tuple_of(out)
    assert (src, dst, dport) == (NODE, REMOTE_POD, TARGET) and abi.SNAT_PORT_MIN <= sport <= abi.SNAT_PORT_MAX
    assert node.ct.counters()["snat_reused"] == 1 and node.dp.counters()["remote"] == 1
    # the port now belongs to the new flow: its reply comes back to the client
    rc, out = node.ingress(frame(REMOTE_POD, TARGET, NODE, sport, proto=socket.IPPROTO_UDP))
    assert tuple_of(out) == (FRONTEND, NODE_PORT, CLIENT, 41000)
    # the collector frees the rest; the census counts the one port in use
    census = ConntrackCollector(node.ct).run_once()
    assert census["confirmed"].removed == abi.SNAT_PORT_MAX - abi.SNAT_PORT_MIN  # all but the one reused
    assert census["confirmed"].snat_ports + census["halfopen"].snat_ports == 1


def test_idle_half_open_flows_give_up_their_snat_port_only_when_none_is_free(make_node):
    """Every port held by half-open flows (a SYN flood's): while they are fresh a new flow finds
    none (exhaustion); once idle for 1 s one of them gives its port to the new flow."""
    node = make_node(REMOTE_POD)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    _hold_every_port(node, now, 60_000_000_000, halfopen=True)
    node.ingress(frame(CLIENT, 41100, FRONTEND, NODE_PORT, SYN))
    assert node.ct.counters()["snat_exhausted"] == 1 and node.ct.counters()["snat_reused"] == 0
    _hold_every_port(node, now - 2_000_000_000, 60_000_000_000, halfopen=True)  # idle 2 s, not expired
    rc, out = node.ingress(frame(CLIENT, 41100, FRONTEND, NODE_PORT, SYN))
    src, sport, dst, _ = tuple_of(out)
    assert (src, dst) == (NODE, REMOTE_POD) and node.ct.counters()["snat_reused"] == 1
    rc, out = node.ingress(frame(REMOTE_POD, TARGET, NODE, sport, SYN | ACK))
    assert tuple_of(out) == (FRONTEND, NODE_PORT, CLIENT, 41100)
    assert len(node.entries("halfopen")) == abi.SNAT_PORT_MAX - abi.SNAT_PORT_MIN + 1 + 1  # replaced, + forward


def test_a_second_node_address_takes_over_when_the_first_has_no_port_free(make_node):
    node = make_node(REMOTE_POD, proto=socket.IPPROTO_UDP)
    second = "198.18.1.11"
    assert node.dp.set_snat_addresses([NODE, second, "fd00:18::11"]) == {"ipv4": NODE, "ipv6": "fd00:18::11"}
    _hold_every_port(node, time.clock_gettime_ns(time.CLOCK_MONOTONIC), 60_000_000_000)  # NODE's, all live
    rc, out = node.ingress(frame(CLIENT, 41200, FRONTEND, NODE_PORT, proto=socket.IPPROTO_UDP))
    src, sport, dst, _ = tuple_of(out)
    assert (src, dst) == (second, REMOTE_POD) and node.ct.counters()["snat_exhausted"] == 0
    rc, out = node.ingress(frame(REMOTE_POD, TARGET, second, sport, proto=socket.IPPROTO_UDP))
    assert tuple_of(out) == (FRONTEND, NODE_PORT, CLIENT, 41200)
