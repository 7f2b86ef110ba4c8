"""sock_diag over netlink (NETLINK_SOCK_DIAG): list a network namespace's sockets, destroy one.

SOCK_DESTROY needs CONFIG_INET_DIAG_DESTROY (on here) and CAP_NET_ADMIN. A destroyed UDP socket is
disconnected and gets ECONNABORTED as its pending error (the kernel's udp_abort); a destroyed TCP
socket sends a RST and gets ECONNABORTED (tcp_abort). sock_diag sees only the namespace the netlink
socket was made in, so one is made per pod namespace (setns in a short-lived thread: namespaces are
per thread, and the agent's own threads stay where they are).

Layouts are the uapi's (linux/netlink.h, linux/inet_diag.h, linux/sock_diag.h); the kernel keeps them
stable, so they are written here rather than derived from a C compile.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from typing import Iterator, NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY, SOCK_DESTROY = 20, 21
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
CLONE_NEWNET = 0x40000000
TCP_ESTABLISHED, TCP_LISTEN, TCP_TIME_WAIT = 1, 10, 6
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")            # len, type, flags, seq, pid
_REQ_HEAD = struct.Struct("=BBBBI")            # family, protocol, ext, pad, states
_SOCKID_NET = struct.Struct("!HH16s16s")       # sport, dport (big-endian), src, dst
_SOCKID_HOST = struct.Struct("=III")           # ifindex, cookie[0], cookie[1]
_MSG_HEAD = struct.Struct("=BBBB")             # family, state, timer, retrans (then the sockid)
SOCKID_SIZE = _SOCKID_NET.size + _SOCKID_HOST.size  # 48


class SockId(NamedTuple):
    """One socket as sock_diag names it; addresses are 16 bytes (IPv4 in the first 4)."""
    family: int
    protocol: int
    state: int
    src: bytes
    sport: int
    dst: bytes
    dport: int
    ifindex: int
    cookie: int

    @property
    def dst_ip(self) -> str:
        if self.family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, self.dst[:4])
        return socket.inet_ntop(socket.AF_INET6, self.dst)


def _sockid(sid: SockId) -> bytes:
    return (_SOCKID_NET.pack(sid.sport, sid.dport, sid.src, sid.dst)
            + _SOCKID_HOST.pack(sid.ifindex, sid.cookie & 0xFFFFFFFF, sid.cookie >> 32))


def _request(family: int, protocol: int, states: int, sockid: bytes | None = None) -> bytes:
    sockid = sockid or (_SOCKID_NET.pack(0, 0, bytes(16), bytes(16))
                        + _SOCKID_HOST.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    return _REQ_HEAD.pack(family, protocol, 0, 0, states) + sockid


class DiagSocket:
    """A NETLINK_SOCK_DIAG socket bound to one network namespace."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.seq = 0

    @classmethod
    def current(cls) -> "DiagSocket":
        return cls(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG))

    def close(self) -> None:
        self.sock.close()

    def _send(self, msg_type: int, flags: int, payload: bytes) -> int:
        self.seq += 1
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, flags, self.seq, 0) + payload)
        return self.seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, payload) of each message answering seq, up to DONE or an ACK/error."""
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                payload = data[off + _NLMSGHDR.size: off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return
                yield mtype, payload
                if mtype == NLMSG_ERROR:
                    return

    def sockets(self, family: int, protocol: int, states: int) -> list[SockId]:
        seq = self._send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, _request(family, protocol, states))
        out = []
        for mtype, p in self._replies(seq):
            if mtype == NLMSG_ERROR:
                code = -struct.unpack_from("=i", p)[0]
                if code:
                    raise OSError(code, f"sock_diag dump: {os.strerror(code)}")
                continue
            fam, state, _t, _r = _MSG_HEAD.unpack_from(p)
            sport, dport, src, dst = _SOCKID_NET.unpack_from(p, _MSG_HEAD.size)
            ifindex, c0, c1 = _SOCKID_HOST.unpack_from(p, _MSG_HEAD.size + _SOCKID_NET.size)
            out.append(SockId(fam, protocol, state, src, sport, dst, dport, ifindex, c0 | (c1 << 32)))
        return out

    def destroy(self, sid: SockId) -> bool:
        """SOCK_DESTROY one socket; False when it is already gone (ENOENT)."""
        seq = self._send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK,
                         _request(sid.family, sid.protocol, 0xFFFFFFFF, _sockid(sid)))
        for mtype, p in self._replies(seq):
            if mtype == NLMSG_ERROR:
                code = -struct.unpack_from("=i", p)[0]
                if code == errno.ENOENT:
                    return False
                if code:
                    raise OSError(code, f"SOCK_DESTROY: {os.strerror(code)}")
        return True


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def diag_sockets_in(netns_paths: list[str]) -> dict[str, DiagSocket]:
    """One DiagSocket per network namespace (by /proc/PID/ns/net or /var/run/netns path), made in a
    thread that enters each namespace in turn. Namespaces that vanished meanwhile are skipped."""
    out: dict[str, DiagSocket] = {}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        except OSError as e:
            errors.append(e)
            return
        try:
            for path in netns_paths:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    _setns(fd)
                    out[path] = DiagSocket.current()
                except OSError:
                    continue
                finally:
                    os.close(fd)
        finally:
            try:
                _setns(home)  # a thread left in a pod's namespace must not be reused: it ends here anyway
            finally:
                os.close(home)

    t = threading.Thread(target=work, name="sockdiag-netns", daemon=True)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out
