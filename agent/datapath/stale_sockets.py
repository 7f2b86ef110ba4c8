"""Sockets connected through a Service to a backend that is no longer behind it: destroyed.

The socket path rewrites a connected socket's destination once, at connect(); a connected UDP socket
(a DNS client, say) would keep sending to a removed backend forever. kube-proxy avoids that by
clearing the UDP conntrack entries of endpoints that left a Service (pkg/proxy/conntrack/cleanup.go);
the socket-level equivalent is destroying the socket, so the application's next call fails with an
error it can retry (recv: ECONNABORTED, send: EDESTADDRREQ) and its reconnect picks a live backend,
or is refused when none is left. TCP connections are left alone, as kube-proxy leaves them, unless
the backend is gone from the cluster (no EndpointSlice lists its address any more).

Mechanism: SOCK_DESTROY over NETLINK_SOCK_DIAG (sockdiag.py), not a BPF socket iterator with
bpf_sock_destroy: BCC 0.26 cannot load iterator programs or call kfuncs. A sweep is stateless: in
every network namespace of a process under the agent's cgroup, each connected socket whose reverse-NAT
entry says "reached VIP:port through backend B" is checked against the service map; if B is no longer
in that frontend's slots, the socket is destroyed and its reverse-NAT entry removed. So deletions,
restarts and missed events are all covered by the next sweep.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .maps import RawMap, addr16, pack_rows, port_be, unpack_rows
from .sockdiag import TCP_ESTABLISHED, SockId, diag_sockets_in

log = logging.getLogger("nodewire.sockets")
PROTO = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP"}
UDP_CONNECTED = 1 << TCP_ESTABLISHED  # a connected UDP socket is in the ESTABLISHED state
TCP_LIVE = 0xFFF & ~(1 << 10) & ~(1 << 6) & ~(1 << 7)  # every state but LISTEN, TIME_WAIT, CLOSE


@dataclass
class SweepResult:
    namespaces: int = 0
    checked: int = 0
    destroyed: list[str] = field(default_factory=list)  # "UDP 10.244.0.5:5353 via 10.96.0.10:53"
    seconds: float = 0.0


def netns_paths(cgroup: str) -> list[str]:
    """/proc/PID/ns/net of one process per network namespace among the processes under cgroup."""
    seen: dict[tuple[int, int], str] = {}
    for root, _dirs, _files in os.walk(cgroup):
        try:
            with open(os.path.join(root, "cgroup.procs")) as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            path = f"/proc/{pid}/ns/net"
            try:
                st = os.stat(path)
            except OSError:
                continue
            seen.setdefault((st.st_dev, st.st_ino), path)
    return list(seen.values())


def listed_addresses(slices: Iterable) -> set[str]:
    """Every endpoint address any EndpointSlice lists, in any condition ("still in the cluster")."""
    return {ep.addresses[0] for sl in slices for ep in sl.endpoints if ep.addresses}


class _Lookup:
    """Single-key lookups on a map, keys and values in the map's own dtypes."""

    def __init__(self, m: RawMap):
        self.m = m

    def get(self, key: bytes):
        raw = self.m.lookup(key)
        return None if raw is None else unpack_rows(self.m.value_dtype, [raw])[0]


class StaleSockets:
    def __init__(self, cgroup: str, services: RawMap, backends: RawMap, revnat: RawMap,
                 listed: Callable[[], set[str]]):
        self.cgroup = cgroup
        self.services, self.backends, self.revnat = _Lookup(services), _Lookup(backends), revnat
        self.listed = listed  # the addresses still in the cluster; called only when a TCP socket is stale
        self.destroyed_total = 0

    def _behind(self, vip: bytes, vport: int, proto: int, cache: dict) -> set[tuple[bytes, int]]:
        """(address, port) of every backend in the frontend's slots now."""
        k = (vip, vport, proto)
        if k in cache:
            return cache[k]
        dt = self.services.m.key_dtype
        head = self.services.get(pack_rows(dt, [(vip, vport, proto, 0, 0)])[0])
        out = set()
        for slot in range(1, int(head["count"]) + 1 if head is not None else 1):
            v = self.services.get(pack_rows(dt, [(vip, vport, proto, 0, slot)])[0])
            be = self.backends.get(pack_rows(self.backends.m.key_dtype, [(int(v["backend_id"]),)])[0]) \
                if v is not None else None
            if be is not None:
                out.add((bytes(be["address"]), int(be["port"])))
        cache[k] = out
        return out

    def sweep(self) -> SweepResult:
        t0 = time.perf_counter()
        res = SweepResult()
        revnat = self.revnat.dump()
        if not revnat:
            return res
        rdt = self.revnat.key_dtype
        cache: dict = {}
        listed: set[str] | None = None
        diag = diag_sockets_in(netns_paths(self.cgroup))
        res.namespaces = len(diag)
        doomed_keys = []
        try:
            for ds in diag.values():
                for proto, states in ((socket.IPPROTO_UDP, UDP_CONNECTED), (socket.IPPROTO_TCP, TCP_LIVE)):
                    for sid in ds.sockets(socket.AF_INET, proto, states) + ds.sockets(socket.AF_INET6, proto, states):
                        if not sid.dport:
                            continue
                        dst = addr16(sid.dst_ip)
                        key = pack_rows(rdt, [(sid.cookie, dst, port_be(sid.dport))])[0]
                        via = revnat.get(key)
                        if via is None:
                            continue  # not a socket the load balancer translated
                        res.checked += 1
                        v = unpack_rows(self.revnat.value_dtype, [via])[0]
                        vip, vport = bytes(v["address"]), int(v["port"])
                        if (dst, port_be(sid.dport)) in self._behind(vip, vport, proto, cache):
                            continue
                        if proto == socket.IPPROTO_TCP:
                            listed = self.listed() if listed is None else listed
                            if sid.dst_ip in listed:
                                continue  # kube-proxy leaves TCP to a removed but existing endpoint alone
                        if ds.destroy(sid):
                            res.destroyed.append(_describe(sid, vip, vport))
                        doomed_keys.append(key)
        finally:
            for ds in diag.values():
                ds.close()
        self.revnat.delete(doomed_keys)
        self.destroyed_total += len(res.destroyed)
        res.seconds = time.perf_counter() - t0
        for d in res.destroyed:
            log.info("socket destroyed: backend left the service %s", d)
        return res


def _describe(sid: SockId, vip: bytes, vport: int) -> str:
    from .maps import addr_str, port_host

    return f"{PROTO.get(sid.protocol, sid.protocol)} {sid.dst_ip}:{sid.dport} via {addr_str(vip)}:{port_host(vport)}"
