"""ICMP errors, path MTU and fragments through the north-south NAT, real packets in the multi-node
sandbox (devkit/nodewire_dev/sandbox/multinode.py), one row per behaviour kube-proxy's netfilter NAT has.

Two nodes with an agent each (`--devices eth0`); pod a1 on node 1 (a local backend for node 1), b1 on
node 2 (a remote one: SNATed). Node 1 reaches node 2's pods over a 1280-MTU hop (a veth pair of its
own, as a tunnel with a smaller MTU would be), while the client and the LAN stay at 1500; the client's
segmentation offload is off (gso_max_segs 1) so its packets really are 1500 bytes on the wire. Pods
answer ICMP errors without rate limit, and reject chosen TCP ports with ICMP (nft, in the pod).
"""
from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
import sys

import pytest

from nodewire_dev.sandbox.cluster import _ip_batch
from nodewire_dev.sandbox.multinode import MultiNodeSandbox
from tests.conformance.test_north_south import ECHO_PORT, UDP_PORT, Env, two_nodes  # what two_nodes' pods serve
from tests.conftest import wait_for
from tests.manifests import endpoint_slice, service

pytestmark = pytest.mark.root

CLOSED_UDP = 5999
REJECT_PORTS = {"port": 8091, "host": 8092}  # TCP ports the pods reject with ICMP port / host unreachable
HOP_MTU = 1280
POD_RULES = """table inet nwtest {
  chain input {
    type filter hook input priority 0;
    tcp dport 8091 reject with icmpx type port-unreachable
    tcp dport 8092 reject with icmpx type host-unreachable
  }
}
"""


def _hop(sb: MultiNodeSandbox) -> None:
    """Node 1 → node 2's pods over their own 1280-MTU link; node 2 answers over the LAN as before."""
    n1, n2 = sb.nodes
    _ip_batch(n1.netns, [f"link add hop0 mtu {HOP_MTU} type veth peer name hop0 netns {n2.netns} mtu {HOP_MTU}",
                         "addr add 198.19.0.1/24 dev hop0", "addr add fd00:19::1/64 dev hop0 nodad", "link set hop0 up",
                         f"route replace {n2.pod_net4} via 198.19.0.2 dev hop0",
                         f"route replace {n2.pod_net6} via fd00:19::2 dev hop0"])
    _ip_batch(n2.netns, ["addr add 198.19.0.2/24 dev hop0", "addr add fd00:19::2/64 dev hop0 nodad", "link set hop0 up"])
    sb._sysctl(n2.netns, ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.hop0.rp_filter=0"])
    subprocess.run(["ip", "-n", sb.client.netns, "link", "set", "eth0", "gso_max_segs", "1"], check=True)


def _pod_setup(sb: MultiNodeSandbox, pod) -> None:
    sb._sysctl(pod.netns, ["net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0"])
    subprocess.run(["ip", "netns", "exec", pod.netns, "nft", "-f", "-"], input=POD_RULES, text=True, check=True)


def _setup(sb: MultiNodeSandbox) -> None:
    for node in sb.nodes:
        for pod in node.pods.values():
            _pod_setup(sb, pod)
    _hop(sb)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with two_nodes(tmp_path_factory.mktemp("northsouth-icmp"), setup=_setup) as e:
        yield e


_ports = iter(range(31000, 31500))


def nodeport(env: Env, name: str, protocol: str, target: int, member: str, family: int) -> int:
    """A NodePort Service of one pod (a1: local to node 1, b1: remote); returns its node port."""
    port = next(_ports)
    n = port - 31000
    vip = f"10.96.13.{n + 1}" if family == 4 else f"fd00:10:96::13:{n + 1:x}"
    s = service(name, [vip], port=80, protocol=protocol, target_port=target)
    s["spec"].update(type="NodePort", ipFamilies=[f"IPv{family}"])
    s["spec"]["ports"][0]["nodePort"] = port
    pod = env.pod(member)
    sl = endpoint_slice(name, [getattr(pod, f"ip{family}")], port=target, protocol=protocol)
    sl["endpoints"][0]["nodeName"] = env.n1.name if member == "a1" else env.n2.name
    env.apply(f"{name}.json", s, sl)
    return port


def n1_addr(env: Env, family: int) -> str:
    return env.n1.addr4 if family == 4 else env.n1.addr6


def counters(env: Env) -> dict:
    """Node 1's north-south outcome counters, read from its pinned stats map."""
    from agent.datapath import abi
    from agent.datapath.loader import open_loaded

    loaded = open_loaded("nodeport", env.n1.pin_dir)
    try:
        keys, values = loaded.maps[abi.NP_STATS_MAP].dump_summed()
    finally:
        loaded.close()
    by = dict(zip(keys.tolist(), values.tolist()))
    return {name: int(by.get(i, 0)) for i, name in enumerate(abi.NP_OUTCOME_NAMES)}


def client(env: Env, code: str) -> dict:
    return json.loads(env.client_py(code).strip().splitlines()[-1])


PRELUDE = """
import errno, json, socket
def fam(h): return socket.AF_INET6 if ":" in h else socket.AF_INET
def err(e): return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
"""

# Snippet lines that catch the ICMP error a socket just got, for check_icmp: a raw socket opened
# before the send hands every ICMP message the namespace receives to the test too.
RAW_OPEN = """
raw = socket.socket(fam(HOST), socket.SOCK_RAW, socket.IPPROTO_ICMP if fam(HOST) == socket.AF_INET else 58)
raw.settimeout(1)
"""
RAW_READ = """
def icmp_seen():  # the first error (neighbour discovery and echo pass by on the same socket)
    for _ in range(20):
        try:
            data, src = raw.recvfrom(2000)
        except OSError:
            return None
        icmp = data[(data[0] & 15) * 4:] if raw.family == socket.AF_INET else data
        if icmp[0] in ((3, 11, 12) if raw.family == socket.AF_INET else (1, 2, 3, 4)):
            return {"src": src[0], "icmp": icmp.hex()}
"""


def udp_pmtu_probe(host: str, port: int, family: int) -> str:
    """Client code: a 1400-byte datagram with DF to host:port (its error or answer as "big"), the
    socket's path MTU, then a 1000-byte one ("small")."""
    # IP_MTU_DISCOVER=IP_PMTUDISC_DO / IPV6_MTU_DISCOVER=IPV6_PMTUDISC_DO, then IP_MTU / IPV6_MTU
    dont, mtu = (("socket.IPPROTO_IP, 10, 2", "socket.IPPROTO_IP, 14") if family == 4 else
                 ("socket.IPPROTO_IPV6, 23, 2", "socket.IPPROTO_IPV6, 24"))
    return PRELUDE + f"""
s = socket.socket(fam({host!r}), socket.SOCK_DGRAM); s.settimeout(3)
s.setsockopt({dont}); s.connect(({host!r}, {port}))
out = {{}}
try:
    s.send(b"y" * 1400); out["big"] = s.recv(100).decode().strip()
except OSError as e:
    out["big"] = err(e)
out["mtu"] = s.getsockopt({mtu})
s.send(b"y" * 1000); out["small"] = s.recv(100).decode().strip()
print(json.dumps(out))
"""


def _sum16(data: bytes) -> int:
    """The one's complement sum (RFC 1071): 0xffff over data that holds its own valid checksum."""
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def check_icmp(seen: dict, to: str) -> dict:
    """Every checksum of a received ICMP error that a receiver verifies: the ICMP one (ICMPv6: over its
    pseudo-header too, RFC 4443 2.3) and the quoted IPv4 header's. Returns the quoted tuple."""
    icmp = bytes.fromhex(seen["icmp"])
    inner = icmp[8:]
    if ":" not in to:
        assert _sum16(icmp) == 0xFFFF, f"ICMP checksum: {seen}"
        ihl = (inner[0] & 15) * 4
        assert _sum16(inner[:ihl]) == 0xFFFF, f"quoted IPv4 header checksum: {seen}"
        src, dst, l4 = inner[12:16], inner[16:20], inner[ihl:]
    else:
        pseudo = ipaddress.ip_address(seen["src"]).packed + ipaddress.ip_address(to).packed
        assert _sum16(pseudo + struct.pack("!I3xB", len(icmp), 58) + icmp) == 0xFFFF, f"ICMPv6 checksum: {seen}"
        src, dst, l4 = inner[8:24], inner[24:40], inner[40:]
    sport, dport = struct.unpack("!HH", l4[:4])
    return {"type": icmp[0], "src": str(ipaddress.ip_address(src)), "sport": sport,
            "dst": str(ipaddress.ip_address(dst)), "dport": dport}


MEMBERS = [pytest.param("a1", id="local"), pytest.param("b1", id="remote")]
FAMILIES = [pytest.param(4, id="v4"), pytest.param(6, id="v6")]


# -- ICMP errors of translated flows --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("member", MEMBERS)
def test_udp_to_a_closed_port_is_refused_at_once(env, member, family):
    """The backend answers a datagram to a port nobody listens on with ICMP port unreachable: it
    reaches the client translated, so the client's connected socket reports ECONNREFUSED."""
    port = nodeport(env, f"udp-closed-{member}{family}", "UDP", CLOSED_UDP, member, family)
    before = counters(env)["icmp_translated"]
    host = n1_addr(env, family)
    code = PRELUDE + f"HOST = {host!r}" + RAW_OPEN + RAW_READ + """
s = socket.socket(fam(HOST), socket.SOCK_DGRAM); s.settimeout(3)
s.connect((HOST, PORT))
try:
    s.send(b"x"); print(json.dumps({"got": s.recv(100).decode()}))
except OSError as e:
    print(json.dumps({"error": err(e), "sport": s.getsockname()[1], "icmp": icmp_seen()}))
""".replace("PORT", str(port))
    got = client(env, code)
    assert got["error"] == "ECONNREFUSED", got
    # the quote is the client's datagram as the client sent it, every checksum right
    client_ip = env.client.ip4 if family == 4 else env.client.ip6
    assert check_icmp(got["icmp"], client_ip) == {"type": 3 if family == 4 else 1, "src": client_ip,
                                                 "sport": got["sport"], "dst": host, "dport": port}
    assert counters(env)["icmp_translated"] > before


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["port", "host"])
@pytest.mark.parametrize("member", MEMBERS)
def test_tcp_connect_gets_the_backends_icmp_unreachable(env, member, kind, family):
    """A backend that rejects a TCP port with ICMP port / host unreachable: the client's connect()
    fails with ECONNREFUSED / EHOSTUNREACH straight away instead of retrying SYNs until it times out."""
    port = nodeport(env, f"tcp-{kind}-{member}{family}", "TCP", REJECT_PORTS[kind], member, family)
    code = PRELUDE + f"""
s = socket.socket(fam({n1_addr(env, family)!r}), socket.SOCK_STREAM); s.settimeout(3)
try:
    s.connect(({n1_addr(env, family)!r}, {port})); print(json.dumps({{"connected": True}}))
except OSError as e:
    print(json.dumps({{"error": err(e)}}))
"""
    want = "ECONNREFUSED" if kind == "port" else "EHOSTUNREACH"
    assert client(env, code) == {"error": want}


# -- path MTU -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_tcp_through_a_smaller_mtu_hop_learns_it_and_gets_through(env, family):
    """Full-size segments toward a backend behind the 1280-MTU hop: the client gets frag-needed /
    packet-too-big with 1280, lowers its segment size, and 20 kB go through and come back."""
    port = nodeport(env, f"pmtu-tcp{family}", "TCP", ECHO_PORT, "b1", family)
    before = counters(env)["pmtu_reply"]
    mtu_opt = "socket.IPPROTO_IP, 14" if family == 4 else "socket.IPPROTO_IPV6, 24"  # IP_MTU / IPV6_MTU
    code = PRELUDE + f"""
s = socket.create_connection(({n1_addr(env, family)!r}, {port}), timeout=5)
s.sendall(b"z" * 20000)
got = 0
try:
    while got < 20000:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk.count(b"z")
except OSError as e:
    print(json.dumps({{"error": err(e), "got": got}})); raise SystemExit
print(json.dumps({{"got": got, "mtu": s.getsockopt({mtu_opt})}}))
"""
    assert client(env, code) == {"got": 20000, "mtu": HOP_MTU}
    assert counters(env)["pmtu_reply"] > before


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_bigger_than_the_hop_gets_frag_needed(env, family):
    """A 1400-byte datagram with DF toward the backend behind the hop: the client learns 1280 (its
    connected socket reports EMSGSIZE), and a datagram that fits then gets the backend's answer."""
    port = nodeport(env, f"pmtu-udp{family}", "UDP", UDP_PORT, "b1", family)
    host = n1_addr(env, family)
    code = udp_pmtu_probe(host, port, family)
    assert client(env, code) == {"big": "EMSGSIZE", "mtu": HOP_MTU, "small": "b1"}


# -- fragments and IPv6 extension headers ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("member", MEMBERS)
def test_fragmented_udp_reaches_the_backend(env, member, family):
    """A 4000-byte datagram leaves the client in fragments; they reach the backend (local, or remote
    across the hop) and its answer comes back. Toward the hop the first try may only teach the
    client the hop's MTU (frag-needed for a 1500-byte fragment); it fragments smaller and retries."""
    port = nodeport(env, f"frag-{member}{family}", "UDP", UDP_PORT, member, family)
    before = counters(env)["fragment"]
    host = n1_addr(env, family)
    dont = "socket.IPPROTO_IP, 10, 0" if family == 4 else "socket.IPPROTO_IPV6, 23, 0"  # PMTUDISC_DONT: fragment
    code = PRELUDE + f"""
s = socket.socket(fam({host!r}), socket.SOCK_DGRAM); s.settimeout(1.5)
s.setsockopt({dont}); s.connect(({host!r}, {port}))
out = {{"tries": []}}
for _ in range(3):
    try:
        s.send(b"f" * 4000); out["got"] = s.recv(100).decode().strip(); break
    except OSError as e:
        out["tries"].append(err(e))
print(json.dumps(out))
"""
    got = client(env, code)
    assert got.get("got") == member, got
    assert len(got["tries"]) <= (1 if member == "b1" else 0), got
    assert counters(env)["fragment"] >= before + 3  # every fragment of the answered datagram at least


@pytest.mark.parametrize("option", [pytest.param(54, id="hop-by-hop"), pytest.param(59, id="destination")])
def test_ipv6_extension_headers_are_followed(env, option):
    """A datagram carrying an IPv6 hop-by-hop or destination-options header (IPV6_HOPOPTS /
    IPV6_DSTOPTS: an 8-byte header holding one PadN option) reaches the NodePort's backend."""
    port = nodeport(env, f"ext{option}", "UDP", UDP_PORT, "a1", 6)
    code = PRELUDE + f"""
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(2)
s.setsockopt(socket.IPPROTO_IPV6, {option}, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
s.connect(({env.n1.addr6!r}, {port}))
try:
    s.send(b"x"); print(json.dumps({{"got": s.recv(100).decode().strip()}}))
except OSError as e:
    print(json.dumps({{"error": err(e)}}))
"""
    assert client(env, code) == {"got": "a1"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("member", MEMBERS)
def test_client_side_icmp_reaches_the_backend(env, member, family):
    """The other direction: the client closed its socket, the backend sends once more, the client's
    ICMP port unreachable about that reply reaches the backend translated (back to the backend's own
    addresses: to its connected socket it looks as if its peer refused), local and SNATed alike."""
    port = nodeport(env, f"back-{member}{family}", "UDP", 6100, member, family)
    pod = env.pod(member)
    backend = pod.popen([sys.executable, "-c", PRELUDE + """
import time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 6100)); print("ready", flush=True)
data, peer = s.recvfrom(100); s.connect(peer); s.send(b"hello")
time.sleep(0.5); s.send(b"again"); s.settimeout(3)
try:
    s.recv(100); print(json.dumps({"backend": "answered"}))
except OSError as e:
    print(json.dumps({"backend": err(e)}))
"""])
    try:
        assert backend.stdout.readline().strip() == "ready"
        host = n1_addr(env, family)
        code = PRELUDE + f"""
s = socket.socket(fam({host!r}), socket.SOCK_DGRAM); s.settimeout(3); s.connect(({host!r}, {port}))
s.send(b"go"); print(json.dumps({{"got": s.recv(100).decode()}})); s.close()
"""
        assert client(env, code) == {"got": "hello"}
        out, errs = backend.communicate(timeout=10)
    finally:
        if backend.poll() is None:
            backend.kill()
    assert out.strip(), errs[-2000:]
    assert json.loads(out.strip().splitlines()[-1]) == {"backend": "ECONNREFUSED"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("member", MEMBERS)
def test_time_exceeded_on_the_way_reaches_the_client(env, member, family):
    """A datagram whose TTL / hop limit runs out at the router in front of the backend (node 1 for
    a1, node 2 for b1): that router's time exceeded reaches the client translated, so a socket that
    asked for errors (IP_RECVERR) sees EHOSTUNREACH from ICMP type 11 (v6: 3)."""
    port = nodeport(env, f"ttl-{member}{family}", "UDP", UDP_PORT, member, family)
    host = n1_addr(env, family)
    # IP_RECVERR / IPV6_RECVERR, IP_TTL / IPV6_UNICAST_HOPS; sock_extended_err: errno, origin, type, code
    level, recverr, ttl = ("socket.IPPROTO_IP", 11, 2) if family == 4 else ("socket.IPPROTO_IPV6", 25, 16)
    code = PRELUDE + f"""
import struct
s = socket.socket(fam({host!r}), socket.SOCK_DGRAM); s.settimeout(3)
s.setsockopt({level}, {recverr}, 1); s.setsockopt({level}, {ttl}, 1); s.connect(({host!r}, {port}))
out = {{}}
try:
    s.send(b"x"); out["got"] = s.recv(100).decode().strip()
except OSError as e:
    out["error"] = err(e)
    if out["error"] == "EHOSTUNREACH":  # the ICMP that said so, from the error queue
        _, anc, _, _ = s.recvmsg(100, 512, socket.MSG_ERRQUEUE)
        out["icmp_type"] = struct.unpack("IBBB", anc[0][2][:7])[2]
print(json.dumps(out))
"""
    assert client(env, code) == {"error": "EHOSTUNREACH", "icmp_type": 11 if family == 4 else 3}


@pytest.mark.parametrize("kind", ["later-fragment-v4", "later-fragment-v6", "routing-header-v6"])
def test_what_cannot_be_placed_is_left_to_the_stack_and_counted(env, kind):
    """A fragment whose first fragment never came (its ports are unknown), or an IPv6 packet with a
    routing header that still has segments left (its destination is not final): node 1 counts it
    `untranslatable` and hands it to its own stack untouched; it is not forwarded as a fragment."""
    family = 4 if kind.endswith("v4") else 6
    port = nodeport(env, f"unplaced-{kind}", "UDP", UDP_PORT, "a1", family)
    before = counters(env)
    src, dst = (env.client.ip4, env.n1.addr4) if family == 4 else (env.client.ip6, env.n1.addr6)
    udp = struct.pack("!HHHH", 40000, port, 16, 0) + b"u" * 8
    if family == 4:  # offset 16 bytes, last fragment; the kernel fills in the checksum (IP_HDRINCL)
        pkt = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 16, 0x4242, 2, 64, 17, 0,
                          ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + b"f" * 16
    else:
        if kind.startswith("later"):  # fragment header: UDP next, offset 16 bytes, id 0x4242
            ext, nh, body = struct.pack("!BBHI", 17, 0, 2 << 3, 0x4242), 44, b"f" * 16
        else:  # segment routing header (RFC 8754) with one segment left: the stack's, not ours
            ext = struct.pack("!BBBBBBH", 17, 2, 4, 1, 0, 0, 0) + ipaddress.ip_address(dst).packed
            nh, body = 43, udp
        payload = ext + body
        pkt = struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64, ipaddress.ip_address(src).packed,
                          ipaddress.ip_address(dst).packed) + payload
    code = f"""
import socket
s = socket.socket(socket.AF_INET{'' if family == 4 else '6'}, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(bytes.fromhex({pkt.hex()!r}), ({dst!r}, 0)); print("sent")
"""
    assert env.client_py(code).strip() == "sent"
    wait_for(lambda: counters(env)["untranslatable"] == before["untranslatable"] + 1, 5, what="untranslatable counted")
    after = counters(env)
    assert after["fragment"] == before["fragment"] and after["local"] == before["local"], (before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_local_backend_behind_a_smaller_mtu_the_nodes_frag_needed_reaches_the_client(env, family):
    """Node 1's own bridge to a1 shrinks to 1280: the kernel forwarding the DNATed datagram answers
    frag-needed / packet-too-big quoting the backend's address; translated on its way out, it
    teaches the client the MTU of its external-IP flow. (An external IP the client has no path MTU
    for yet: the node address already has 1280 from the rows above.)"""
    ext = "198.51.100.77" if family == 4 else "2001:db8:6::77"
    vip = "10.96.13.250" if family == 4 else "fd00:10:96::13:250"
    s = service(f"ext-mtu{family}", [vip], port=80, protocol="UDP", target_port=UDP_PORT)
    s["spec"].update(externalIPs=[ext], ipFamilies=[f"IPv{family}"])
    a1 = env.pod("a1")
    sl = endpoint_slice(f"ext-mtu{family}", [getattr(a1, f"ip{family}")], port=UDP_PORT, protocol="UDP")
    sl["endpoints"][0]["nodeName"] = env.n1.name
    env.apply(f"ext-mtu{family}.json", s, sl)
    code = udp_pmtu_probe(ext, 80, family)
    link = ["ip", "-n", env.n1.netns, "link", "set", a1.host_veth, "mtu"]
    subprocess.run([*link, str(HOP_MTU)], check=True)
    try:
        assert client(env, code) == {"big": "EMSGSIZE", "mtu": HOP_MTU, "small": "a1"}
    finally:
        subprocess.run([*link, "1500"], check=True)
