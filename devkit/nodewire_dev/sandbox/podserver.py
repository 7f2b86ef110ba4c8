"""A tiny pod workload: answers TCP (HTTP/1.0-style) and UDP with the pod's name.

Run inside a sandbox pod; binds [::] dual-stack so IPv4 and IPv6 clients both reach it. Prints
"ready" once every socket is bound. Standard library only: it starts fast in every pod.
"""
import argparse
import selectors
import socket
import sys


def _bound(kind: int, port: int) -> socket.socket:
    """A non-blocking dual-stack socket bound to [::]:port (listening, for TCP)."""
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        s.listen(1024)
    s.setblocking(False)
    return s


def _read_some(s: socket.socket) -> bytes:
    """What a readable connection holds; b"" when the peer closed or reset it."""
    try:
        return s.recv(4096)
    except (BlockingIOError, ConnectionError):
        return b""


def _unmapped(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") else ip


def _peer_ip(s: socket.socket) -> str:
    try:
        return _unmapped(s.getpeername()[0])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--tcp", type=int, action="append", default=[])
    ap.add_argument("--udp", type=int, action="append", default=[])
    ap.add_argument("--echo", type=int, action="append", default=[],
                    help="TCP port whose connections stay open and echo each read back, prefixed by the name")
    a = ap.parse_args()
    body = (a.name + "\n").encode()
    sel = selectors.DefaultSelector()
    for ports, kind, role in ((a.tcp, socket.SOCK_STREAM, "accept"), (a.echo, socket.SOCK_STREAM, "accept-echo"),
                              (a.udp, socket.SOCK_DGRAM, "udp")):
        for port in ports:
            sel.register(_bound(kind, port), selectors.EVENT_READ, role)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if key.data in ("accept", "accept-echo"):
                try:
                    c, _ = s.accept()
                except BlockingIOError:
                    continue
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, "conn" if key.data == "accept" else "echo")
            elif key.data == "echo":
                data = _read_some(s)
                if data:
                    s.sendall(a.name.encode() + b" " + data)
                else:
                    sel.unregister(s)
                    s.close()
            elif key.data == "conn":
                data = _read_some(s)
                if data:
                    try:
                        if data.startswith(b"peer?"):  # who the pod saw: for source-address checks
                            s.sendall(a.name.encode() + b" " + _peer_ip(s).encode() + b"\n")
                        elif data.startswith((b"GET", b"HEAD", b"POST")):
                            s.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                        else:
                            s.sendall(body)
                    except OSError:
                        pass
                sel.unregister(s)
                s.close()
            else:
                try:
                    data, peer = s.recvfrom(65535)
                except BlockingIOError:
                    continue
                s.sendto(a.name.encode() + b" " + _unmapped(peer[0]).encode() + b"\n"
                         if data.startswith(b"peer?") else body, peer)


if __name__ == "__main__":
    sys.exit(main())
