"""The client side of the benchmark, run inside the client pod (standard library only, so it starts
fast and measures nothing but sockets).

    probe.py latency --target IP:PORT[,IP:PORT...] | --vips BASE_INT:N:PORT [--random] --count K [--max-seconds T]
    probe.py rps     (same targets) --seconds S
    probe.py whoami  --target IP:PORT
    probe.py await   --target IP:PORT --expect NAME --max-seconds T

Prints one JSON object. Latency is the time of connect() on a blocking socket (SYN → SYN-ACK, plus
whatever the connect path costs: netfilter NAT lookups, or the cgroup connect4 program); each socket
is closed with SO_LINGER 0 (RST) so thousands of connects leave no TIME_WAIT behind.
"""
import argparse
import json
import random
import socket
import struct
import sys
import time

LINGER_RST = struct.pack("ii", 1, 0)
REQUEST = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"


def _targets(a):
    """A function returning the next (ip, port) to dial."""
    if a.target:
        ts = [(ip, int(port)) for ip, port in (t.rsplit(":", 1) for t in a.target.split(","))]
        if len(ts) == 1:
            return lambda: ts[0]
        rnd = random.Random(7)  # several backends: a random one per connect, as the Service picks
        return lambda: ts[rnd.randrange(len(ts))]
    base, n, port = (int(x) for x in a.vips.split(":"))
    if not a.random:
        t = (socket.inet_ntoa(struct.pack("!I", base + n)), port)  # the last-added Service
        return lambda: t
    rnd = random.Random(42)
    return lambda: (socket.inet_ntoa(struct.pack("!I", base + 1 + rnd.randrange(n))), port)


def _pct(sorted_vals, q):
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def latency(a):
    nxt = _targets(a)
    samples, errors = [], 0
    deadline = time.perf_counter() + a.max_seconds
    for i in range(a.warmup + a.count):
        if i > a.warmup + 50 and time.perf_counter() > deadline:
            break  # slow paths (iptables at 100k) get fewer samples, not an endless run
        dst = nxt()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(a.timeout)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        t0 = time.perf_counter_ns()
        try:
            s.connect(dst)
            dt = time.perf_counter_ns() - t0
            if i >= a.warmup:
                samples.append(dt)
        except OSError:
            if i >= a.warmup:
                errors += 1
        finally:
            s.close()
    out = summarize(samples)
    out["errors"] = errors
    if a.raw:
        out["samples_ns"] = samples
    return out


def summarize(samples):
    """count, p50, p99, mean in µs of connect times in ns (also used to pool several rounds)."""
    samples = sorted(samples)
    us = lambda v: None if v is None else round(v / 1000, 2)  # noqa: E731
    return {"count": len(samples), "p50_us": us(_pct(samples, 0.50)), "p99_us": us(_pct(samples, 0.99)),
            "mean_us": us(sum(samples) / len(samples) if samples else None)}


def rps(a):
    nxt = _targets(a)
    done, errors = 0, 0
    t_end = time.perf_counter() + a.seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(a.timeout)
        # RST on close: the server closes first, and without this it would keep a TIME_WAIT for the
        # pod-side 4-tuple; a later connect through a VIP that reuses the source port (the client only
        # sees its VIP-side tuple) then meets that TIME_WAIT and its SYN is answered with an ACK,
        # costing a SYN retransmit: a benchmark artifact, not a property of the mode under test.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        try:
            s.connect(nxt())
            s.sendall(REQUEST)
            while s.recv(4096):
                pass
            done += 1
        except OSError:
            errors += 1
        finally:
            s.close()
    elapsed = time.perf_counter() - t0
    return {"requests": done, "errors": errors, "seconds": round(elapsed, 6), "rps": round(done / elapsed, 1)}


def _read_to_end(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def whoami(a):
    ip, port = a.target.rsplit(":", 1)
    with socket.create_connection((ip, int(port)), timeout=a.timeout) as s:
        s.sendall(b"who\n")
        return {"reply": _read_to_end(s).decode().strip()}


def await_reply(a):
    """Connect to the target over and over until it answers `--expect`; report when (wall clock, so
    the caller can subtract the moment it made the change). Prints "ready" first, once looping."""
    ip, port = a.target.rsplit(":", 1)
    deadline = time.time() + a.max_seconds
    print("ready", flush=True)
    tries = 0
    while time.time() < deadline:
        tries += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(a.timeout)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        try:
            s.connect((ip, int(port)))
            s.sendall(b"who\n")
            if _read_to_end(s).decode().strip() == a.expect:
                return {"seen_at": time.time(), "tries": tries}
        except OSError:
            pass
        finally:
            s.close()
        time.sleep(0.0005)  # leave the CPU to the agent being measured
    return {"seen_at": None, "tries": tries}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["latency", "rps", "whoami", "await"])
    ap.add_argument("--target")
    ap.add_argument("--vips")
    ap.add_argument("--expect", help="await: the reply that ends the wait")
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--max-seconds", type=float, default=15.0)
    ap.add_argument("--raw", action="store_true", help="include every sample (ns) in the output")
    a = ap.parse_args()
    if not (a.target or a.vips):
        ap.error("--target or --vips is required")
    print(json.dumps({"latency": latency, "rps": rps, "whoami": whoami, "await": await_reply}[a.what](a)))


if __name__ == "__main__":
    sys.exit(main())
