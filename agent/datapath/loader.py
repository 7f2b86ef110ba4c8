"""Compile bpf/sock_lb.c with BCC once, with map sizes and the pin directory from config.

Maps are declared BPF_TABLE_PINNED, so a second agent process (after a restart or crash) opens the
maps the first one pinned instead of creating empty ones: the datapath keeps its state.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .maps import RawMap

# agent/bpf is the top-level bpf/ (a link in the checkout, package data in a wheel)
BPF_DIR = Path(os.environ.get("NODEWIRE_BPF_DIR", Path(__file__).resolve().parents[1] / "bpf"))

MAP_NAMES = {
    "services": "nodewire_services_v1",
    "backends": "nodewire_backends_v1",
    "revnat": "nodewire_revnat_v1",
    "lb_stats": "nodewire_lb_stats_v1",
    "affinity": "nodewire_affinity_v1",
}


@dataclass(frozen=True)
class MapSizes:
    services: int = 1 << 20   # slots: one header + one per backend, per frontend
    backends: int = 1 << 20
    revnat: int = 1 << 18
    lb_stats: int = 1 << 16


def ensure_mounts() -> None:
    """bpffs and tracefs, mounted idempotently (this machine boots without them)."""
    for target, fstype in (("/sys/fs/bpf", "bpf"), ("/sys/kernel/tracing", "tracefs")):
        if not os.path.ismount(target):
            os.makedirs(target, exist_ok=True)
            # An argv list, never a shell string (SECURITY.md: no shell is built from any input).
            res = subprocess.run(["mount", "-t", fstype, fstype, target], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"cannot mount {fstype} at {target}: {res.stderr.strip()}")


_LOCAL_INCLUDE = re.compile(r'^#include "(lib/[^"]+)"\s*$', re.M)


def program_text(source: str) -> str:
    """The program with our own `#include "lib/…"` headers inlined.

    BCC rewrites map calls (`map.lookup(k)`) only in the main source text, not in included files, so
    helpers in bpf/lib/*.h that touch maps must reach BCC as part of the main text.
    """
    seen: set[str] = set()

    def expand(text: str) -> str:
        def sub(m: re.Match) -> str:
            name = m.group(1)
            if name in seen:
                return ""
            seen.add(name)
            return f"/* --- {name} --- */\n" + expand((BPF_DIR / name).read_text())
        return _LOCAL_INCLUDE.sub(sub, text)

    return expand((BPF_DIR / source).read_text())


def compile_program(source: str, pin_dir: str, sizes: MapSizes = MapSizes(), extra_cflags=()):
    """BCC-compile one bpf/ program with its maps pinned under pin_dir."""
    from bcc import BPF

    ensure_mounts()
    os.makedirs(pin_dir, exist_ok=True)
    cflags = [
        f"-I{BPF_DIR}",
        f'-DNW_PIN_DIR="{pin_dir}"',
        f"-DNW_SERVICES_MAX={sizes.services}",
        f"-DNW_BACKENDS_MAX={sizes.backends}",
        f"-DNW_REVNAT_MAX={sizes.revnat}",
        f"-DNW_STATS_MAX={sizes.lb_stats}",
        "-Wno-unused-function",
        *extra_cflags,
    ]
    return BPF(text=program_text(source).encode(), cflags=cflags)


class SockLB:
    """The socket load balancer: its BCC module, map views and hook programs."""

    HOOKS = (
        ("nw_connect4", "CGROUP_INET4_CONNECT"),
        ("nw_connect6", "CGROUP_INET6_CONNECT"),
        ("nw_sendmsg4", "CGROUP_UDP4_SENDMSG"),
        ("nw_sendmsg6", "CGROUP_UDP6_SENDMSG"),
        ("nw_recvmsg4", "CGROUP_UDP4_RECVMSG"),
        ("nw_recvmsg6", "CGROUP_UDP6_RECVMSG"),
        ("nw_getpeername4", "CGROUP_INET4_GETPEERNAME"),
        ("nw_getpeername6", "CGROUP_INET6_GETPEERNAME"),
    )

    def __init__(self, pin_dir: str, sizes: MapSizes = MapSizes()):
        self.pin_dir = pin_dir
        self.bpf = compile_program("sock_lb.c", pin_dir, sizes)
        self.services = RawMap(self.bpf[MAP_NAMES["services"].encode()], MAP_NAMES["services"])
        self.backends = RawMap(self.bpf[MAP_NAMES["backends"].encode()], MAP_NAMES["backends"])
        self.lb_stats = self.bpf[MAP_NAMES["lb_stats"].encode()]
        self.revnat = self.bpf[MAP_NAMES["revnat"].encode()]

    def programs(self):
        """(function, attach type) for every hook, loaded into the kernel."""
        from bcc import BPF, BPFAttachType

        out = []
        for fname, atype in self.HOOKS:
            at = getattr(BPFAttachType, atype)
            out.append((self.bpf.load_func(fname, BPF.CGROUP_SOCK_ADDR, attach_type=at), at))
        return out
