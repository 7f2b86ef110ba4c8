"""Client side of the sandbox: connect (TCP) or send (UDP) to an address N times, report as JSON.

Reports which pod answered each time (the pod servers reply with their name), the errors by kind
(errno name), the peer address getpeername() showed and the source addresses UDP replies came from.
Standard library only, so it starts fast inside a pod.
"""
import argparse
import collections
import errno
import json
import socket
import sys


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__


def tcp(host: str, port: int, count: int, timeout: float) -> dict:
    replies, errors, peers = collections.Counter(), collections.Counter(), set()
    for _ in range(count):
        s = socket.socket(_family(host), socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            peers.add(tuple(s.getpeername()[:2]))
            s.sendall(b"probe\n")
            data = s.recv(256).decode().strip()
            replies[data or "(empty)"] += 1
        except OSError as e:
            errors[_err(e)] += 1
        finally:
            s.close()
    return {"replies": dict(replies), "errors": dict(errors), "peers": sorted(peers)}


def udp(host: str, port: int, count: int, timeout: float) -> dict:
    replies, errors, sources = collections.Counter(), collections.Counter(), set()
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    for _ in range(count):
        try:
            s.sendto(b"probe", (host, port))
            data, src = s.recvfrom(256)
            replies[data.decode().strip()] += 1
            sources.add(tuple(src[:2]))
        except OSError as e:
            errors[_err(e)] += 1
    s.close()
    return {"replies": dict(replies), "errors": dict(errors), "sources": sorted(sources)}


def stream(targets: list[str], interval: float, timeout: float) -> None:
    """Forever: one request to each NAME=tcp|udp:HOST:PORT target, one JSON line per outcome."""
    import time
    parsed = []
    for t in targets:
        name, _, rest = t.partition("=")
        kind, _, hostport = rest.partition(":")
        host, _, port = hostport.rpartition(":")
        parsed.append((name, tcp if kind == "tcp" else udp, host.strip("[]"), int(port)))
    while True:
        for name, fn, host, port in parsed:
            r = fn(host, port, 1, timeout)
            line = {"target": name, "reply": next(iter(r["replies"]), None), "error": next(iter(r["errors"]), None)}
            print(json.dumps(line), flush=True)
        time.sleep(interval)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "stream":
        ap = argparse.ArgumentParser()
        ap.add_argument("mode")
        ap.add_argument("targets", nargs="+")
        ap.add_argument("--interval", type=float, default=0.1)
        ap.add_argument("--timeout", type=float, default=1.0)
        a = ap.parse_args()
        return stream(a.targets, a.interval, a.timeout)
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["tcp", "udp"])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=2.0)
    a = ap.parse_args()
    fn = tcp if a.kind == "tcp" else udp
    json.dump(fn(a.host, a.port, a.count, a.timeout), sys.stdout)


if __name__ == "__main__":
    main()
