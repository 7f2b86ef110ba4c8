"""A TCP relay from a loopback port of the test process's namespace to a port on the loopback of a
sandbox network namespace, so a reader outside (Prometheus, urllib) reaches an agent that runs inside
a sandbox node (its /metrics on 127.0.0.1 there). One thread: it enters the namespace with setns()
(the network namespace is per thread, so the rest of the process stays where it was), connects
there, and copies bytes both ways with select(); close() ends it.
"""
from __future__ import annotations

import ctypes
import os
import select
import socket
import threading

CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h


class NetnsRelay:
    def __init__(self, netns: str, port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))  # in our namespace: made before the switch
        self.port = self.listener.getsockname()[1]
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, args=(netns, port), daemon=True, name="netns-relay")
        self._thread.start()

    def _run(self, netns: str, port: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {netns}")
        finally:
            os.close(fd)
        peers: dict[socket.socket, socket.socket] = {}
        while True:
            ready, _, _ = select.select([self.listener, self._stop_r, *peers], [], [])
            if self._stop_r in ready:
                break
            for s in ready:
                if s is self.listener:
                    outside, _ = self.listener.accept()
                    try:
                        inside = socket.create_connection(("127.0.0.1", port), timeout=5)
                    except OSError:
                        outside.close()
                        continue
                    peers[outside], peers[inside] = inside, outside
                elif s in peers:
                    try:
                        data = s.recv(65536)
                        if data:
                            peers[s].sendall(data)
                            continue
                    except OSError:
                        pass
                    other = peers.pop(s)
                    peers.pop(other, None)
                    s.close()
                    other.close()
        for s in peers:
            s.close()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        self.listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
