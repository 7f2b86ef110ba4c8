"""Attach and detach cgroup socket programs, idempotently.

Programs are attached without flags: the kernel keeps them after the agent exits (the datapath
outlives the agent), and attaching again atomically replaces the previous program.
"""
from __future__ import annotations

import json
import os
import subprocess

from .loader import SockLB

# bpftool's names for the attach types of SockLB.HOOKS
BPFTOOL_ATTACH_NAMES = {
    "CGROUP_INET4_CONNECT": "connect4", "CGROUP_INET6_CONNECT": "connect6",
    "CGROUP_UDP4_SENDMSG": "sendmsg4", "CGROUP_UDP6_SENDMSG": "sendmsg6",
    "CGROUP_UDP4_RECVMSG": "recvmsg4", "CGROUP_UDP6_RECVMSG": "recvmsg6",
    "CGROUP_INET4_GETPEERNAME": "getpeername4", "CGROUP_INET6_GETPEERNAME": "getpeername6",
}


def detect_cgroup2_root() -> str:
    """The cgroup v2 mount: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    for m in mounts:
        if m[2] == "cgroup2":
            return m[1]
    raise RuntimeError("no cgroup v2 mount found (need cgroup2 for socket load balancing)")


def attach_sock_lb(lb: SockLB, cgroup_path: str) -> list[str]:
    from bcc import BPF

    fd = os.open(cgroup_path, os.O_RDONLY)
    try:
        done = []
        for fn, at in lb.programs():
            BPF.attach_func(fn, fd, at)
            done.append(fn.name.decode() if isinstance(fn.name, bytes) else fn.name)
        return done
    finally:
        os.close(fd)


def detach_sock_lb(cgroup_path: str) -> int:
    """Detach whatever nodewire-style (no-flags) programs sit on our hooks. Returns how many."""
    from bcc import BPFAttachType
    from bcc.libbcc import lib

    fd = os.open(cgroup_path, os.O_RDONLY)
    n = 0
    try:
        for _fname, atype in SockLB.HOOKS:
            # In the kernel's single-program mode an invalid program fd detaches the attached one.
            if lib.bpf_prog_detach2(-1, fd, getattr(BPFAttachType, atype)) == 0:
                n += 1
    finally:
        os.close(fd)
    return n


def attached_programs(cgroup_path: str) -> list[dict]:
    """What the kernel has attached on this cgroup (via bpftool), for `nodewire status`."""
    try:
        out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup_path],
                             capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return []
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return json.loads(out.stdout)
