"""A spoofed SYN flood and the flows it must not break, inside a sandbox (tests and `bench flood`).

HeldFlows keeps N TCP connections to an echo port open and talks on each every 50 ms (or, idle, only
before and after the flood), counting answers and failures per connection; syn_flood() sends a bounded number of SYNs from random
(spoofed) sources with Debian's hping3; connects_work() tells whether fresh connections get through.
Everything runs in the sandbox's own network namespaces: nothing leaves them.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

_HELD = r"""
import json, socket, sys, time
host, port, n, seconds, idle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
conns, names = [], []
for _ in range(n):
    c = socket.create_connection((host, port), timeout=5)
    c.sendall(b"x"); names.append(c.recv(100).decode().split()[0])
    conns.append(c)
print(json.dumps({"up": names}), flush=True)
if idle:  # silent until told (a line on stdin): idle flows are the first an LRU table drops
    sys.stdin.readline()
ok = [0] * n; fail = [0] * n
deadline = time.time() + seconds
while time.time() < deadline:
    for i, c in enumerate(conns):
        if fail[i] and ok[i] < 0:
            continue
        try:
            c.sendall(b"x"); ok[i] += len(c.recv(100)) > 0
        except OSError:
            fail[i] += 1; ok[i] = -1  # a broken connection stays broken
    time.sleep(0.05)
print(json.dumps({"ok": ok, "fail": fail, "names": names}), flush=True)
"""


class HeldFlows:
    """N echo connections from a pod, held for `seconds`; names: the pod that answered each. With
    idle, they stay silent after their first exchange until resume()."""

    def __init__(self, pod, host: str, port: int, n: int, seconds: float, idle: bool = False):
        self.proc = pod.popen([sys.executable, "-c", _HELD, host, str(port), str(n), str(seconds), "1" if idle else "0"],
                              stdin=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if not line.startswith("{"):
            raise RuntimeError(f"held flows did not come up: {self.proc.communicate(timeout=30)[1][-2000:]}")
        self.names: list[str] = json.loads(line)["up"]

    def resume(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 120) -> dict:
        """{"ok": [...], "fail": [...], "names": [...]} once the holding time is over."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()  # an idle holder not resumed yet goes on now
        out, err = self.proc.stdout.read(), self.proc.stderr.read()
        self.proc.wait(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines or "fail" not in lines[-1]:
            raise RuntimeError(f"held flows ended without a result: {err[-2000:]}")
        return json.loads(lines[-1])

    def broken(self, res: dict) -> list[str]:
        """The pods of the connections that failed at least once."""
        return [name for name, f in zip(res["names"], res["fail"]) if f]


def syn_flood(pod, host: str, port: int, count: int, interval_us: int = 20, timeout: float = 60) -> dict:
    """`count` SYNs to host:port from random source addresses (hping3 --rand-source), one every
    interval_us at most; returns {"sent", "seconds"}. Bounded by count and by timeout."""
    t0 = time.monotonic()
    res = pod.run(["timeout", str(int(timeout)), "hping3", "-q", "-S", "--rand-source", "-p", str(port), "-c",
                   str(count), "-i", f"u{interval_us}", host], timeout=timeout + 10, check=False)
    m = re.search(r"(\d+) packets transmitted", res.stdout + res.stderr)
    if m is None:
        raise RuntimeError(f"hping3 failed ({res.returncode}): {(res.stdout + res.stderr)[-1000:]}")
    return {"sent": int(m.group(1)), "seconds": round(time.monotonic() - t0, 2)}


_CONNECTS = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    try:
        c = socket.create_connection((host, port), timeout=1); c.sendall(b"x")
        out.append(c.recv(100).decode().split()[0] or "empty"); c.close()
    except OSError as e:
        out.append("error:" + type(e).__name__)
print(" ".join(out))
"""


def connects(pod, host: str, port: int, n: int = 8) -> list[str]:
    """n fresh connections in a row (1 s timeout each): the pod that answered, or error:<kind>."""
    return pod.run([sys.executable, "-c", _CONNECTS, host, str(port), str(n)], timeout=30 + 2 * n).stdout.split()


def seconds_until_connects_work(pod, host: str, port: int, since: float, limit: float = 75.0,
                                n: int = 8) -> float | None:
    """Seconds from `since` (monotonic) until a batch of n fresh connections all got an answer;
    None when that did not happen within limit."""
    while time.monotonic() - since < limit:
        got = connects(pod, host, port, n)
        if all(not g.startswith("error:") for g in got):
            return round(time.monotonic() - since, 2)
    return None
