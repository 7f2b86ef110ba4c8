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

import numpy as np

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
        self._kept: set[bytes] = set()  # reverse-NAT keys of sockets checked and left alone (TCP)

    def _behind(self, vip: bytes, vport: int, proto: int, cache: dict) -> set[tuple[bytes, int]] | None:
        """(address, port) of every backend in the frontend's slots now; None: no such frontend."""
        k = (vip, vport, proto)
        if k in cache:
            return cache[k]
        dt = self.services.m.key_dtype
        head = self.services.get(pack_rows(dt, [(vip, vport, proto, 0, 0)])[0])
        out = None if head is None else set()
        for slot in range(1, int(head["count"]) + 1 if head is not None else 1):
            v = self.services.get(pack_rows(dt, [(vip, vport, proto, 0, slot)])[0])
            be = self.backends.get(pack_rows(self.backends.m.key_dtype, [(int(v["backend_id"]),)])[0]) \
                if v is not None else None
            if be is not None:
                out.add((bytes(be["address"]), int(be["port"])))
        cache[k] = out
        return out

    def _stale_keys(self, cache: dict) -> dict[bytes, bytes]:
        """Reverse-NAT entries (key → value bytes) whose backend is behind no frontend at their VIP:port
        any more. The map is read in one batch and grouped with numpy, so a busy node's hundred thousand
        entries cost one pass; the service map is asked once per (VIP:port, backend) pair. The entry has
        no protocol: a backend still behind the TCP or the UDP frontend of the port counts as there."""
        keys, vals = self.revnat.dump_arrays()
        if not len(keys):
            return {}
        pair = np.zeros(len(keys), dtype=[("va", "V16"), ("vp", "u2"), ("ba", "V16"), ("bp", "u2")])
        pair["va"], pair["vp"], pair["ba"], pair["bp"] = vals["address"], vals["port"], keys["address"], keys["port"]
        uniq, inverse = np.unique(pair.view("V36"), return_inverse=True)
        gone = np.zeros(len(uniq), dtype=bool)
        for i, u in enumerate(uniq.view(pair.dtype)):
            be = (bytes(u["ba"]), int(u["bp"]))
            fronts = [self._behind(bytes(u["va"]), int(u["vp"]), p, cache) for p in PROTO]
            gone[i] = not any(f is not None and be in f for f in fronts)
        rows = np.flatnonzero(gone[inverse.ravel()])
        ks, vs = self.revnat.key_size, self.revnat.value_size
        kb, vb = keys[rows].tobytes(), vals[rows].tobytes()
        stale = {kb[j * ks:(j + 1) * ks]: vb[j * vs:(j + 1) * vs] for j in range(len(rows))}
        self._kept &= stale.keys()  # a kept entry that is no longer stale (or gone) is forgotten
        return {k: v for k, v in stale.items() if k not in self._kept}

    def sweep(self) -> SweepResult:
        """Visit the pods' namespaces only when some reverse-NAT entry names a backend that left."""
        t0 = time.perf_counter()
        res = SweepResult()
        cache: dict = {}
        stale = self._stale_keys(cache)
        if not stale:
            return res
        rdt = self.revnat.key_dtype
        listed: set[str] | None = None
        diag = diag_sockets_in(netns_paths(self.cgroup))
        res.namespaces = len(diag)
        try:
            for ds in diag.values():
                for proto, states in ((socket.IPPROTO_UDP, UDP_CONNECTED), (socket.IPPROTO_TCP, TCP_LIVE)):
                    for sid in ds.sockets(socket.AF_INET, proto, states) + ds.sockets(socket.AF_INET6, proto, states):
                        if not sid.dport:
                            continue
                        key = pack_rows(rdt, [(sid.cookie, addr16(sid.dst_ip), port_be(sid.dport))])[0]
                        if key not in stale:
                            continue
                        res.checked += 1
                        v = unpack_rows(self.revnat.value_dtype, [stale[key]])[0]
                        vip, vport = bytes(v["address"]), int(v["port"])
                        if proto == socket.IPPROTO_TCP:
                            listed = self.listed() if listed is None else listed
                            if sid.dst_ip in listed:
                                del stale[key]  # kube-proxy leaves TCP to an endpoint that still exists
                                self._kept.add(key)
                                continue
                        if ds.destroy(sid):
                            res.destroyed.append(_describe(sid, vip, vport))
        finally:
            for ds in diag.values():
                ds.close()
        # Destroyed sockets, closed ones and unconnected UDP ones (which re-learn their entry at the
        # next sendmsg) lose the entries that named the departed backend.
        self.revnat.delete(sorted(stale))
        self.destroyed_total += len(res.destroyed)
        res.seconds = time.perf_counter() - t0
        for d in res.destroyed:
            log.info("socket destroyed: backend left the service %s", d)
        return res


def _describe(sid: SockId, vip: bytes, vport: int) -> str:
    from .maps import addr_str, port_host

    return f"{PROTO.get(sid.protocol, sid.protocol)} {sid.dst_ip}:{sid.dport} via {addr_str(vip)}:{port_host(vport)}"
