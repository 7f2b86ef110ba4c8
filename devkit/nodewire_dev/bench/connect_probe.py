"""Runs inside the client pod: times connect() to a VIP and directly to backends, interleaved.

Interleaving (VIP, direct, VIP, direct, …) makes both series see the same machine noise, so their
ratio is meaningful on a shared, noisy host. Standard library only.
"""
import json
import random
import socket
import sys
import time


def connect_ns(host: str, port: int) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t0 = time.perf_counter_ns()
    s.connect((host, port))
    t1 = time.perf_counter_ns()
    s.close()
    return t1 - t0


def main() -> None:
    vip, vport, direct, dport, count = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5])
    for _ in range(50):  # warm up caches, ARP, the listen queues
        connect_ns(vip, vport)
        connect_ns(random.choice(direct), dport)
    via_vip, via_direct = [], []
    for _ in range(count):
        via_vip.append(connect_ns(vip, vport))
        via_direct.append(connect_ns(random.choice(direct), dport))
    json.dump({"vip": via_vip, "direct": via_direct}, sys.stdout)


if __name__ == "__main__":
    main()
