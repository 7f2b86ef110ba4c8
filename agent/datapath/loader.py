"""Compile bpf/ programs out of the long-lived process, pin them, and open the pins without BCC.

    spec = ProgramSpec(source="sock_lb.c", cflags=("-DNW_X=1",),
                       programs=(("nw_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),),
                       maps=("nodewire_services_v1",))
    loaded = load(spec, pin_dir)          # compiles in a child only when source or cflags changed
    loaded.maps["nodewire_services_v1"]   # a RawMap (maps.py): batch ops, layout from the C
    loaded.prog_fd("nw_connect4")         # an fd of the pinned program, for attach.py:
    attach_cgroup(fd, cgroup, "CGROUP_INET4_CONNECT") / attach_tracepoint(fd, "sock:inet_sock_set_state",
    pin=...) / pyroute2 `tc(..., "bpf", fd=fd, name=fn, direct_action=True)` for SCHED_CLS.

Program types and attach types are BCC's names (`BPF.<prog type>`, `BPFAttachType.<attach type>`).
`load` runs `python -m agent.datapath.compile` (compile.py), the only process that imports BCC: it
compiles, loads, pins every map the spec names at `<pin dir>/<map>` (the C declares them
BPF_TABLE_PINNED, so a recompile reuses the maps and their entries) and every program at
`<pin dir>/progs/<spec name>/<function>`, reports the maps' layouts, and exits. The report and a
digest of (program text with its headers, cflags, programs, maps, pin dir, compile.py) are kept in
`<state dir>/programs/<spec name>.json`: a restart with the same digest and all pins present opens the
pins and compiles nothing. A changed program is pinned over the old one; attaching it replaces the
old attachment atomically (cgroup hooks without flags). `open_loaded` opens what an agent loaded,
for readers such as `nodewire services`, without ever compiling.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..mapsizes import MapSizes  # noqa: F401 (also imported from here by the datapath's users)
from . import abi, bpfsys, headers
from .maps import RawMap, dtype_from_json

log = logging.getLogger("nodewire.loader")

# agent/bpf is the top-level bpf/ (a link in the checkout, package data in a wheel)
BPF_DIR = Path(os.environ.get("NODEWIRE_BPF_DIR", Path(__file__).resolve().parents[1] / "bpf"))


class LoadError(RuntimeError):
    """A program could not be compiled, loaded or pinned; the message names it and says why."""


@dataclass(frozen=True)
class ProgramSpec:
    source: str                                  # a file in bpf/
    cflags: tuple[str, ...] = ()
    programs: tuple[tuple[str, str, str | None], ...] = ()  # (function, BCC prog type, attach type)
    maps: tuple[str, ...] = ()
    name: str = ""                               # pins and record; default: the source's stem

    @property
    def key(self) -> str:
        return self.name or Path(self.source).stem

    def digest(self, pin_dir: str) -> str:
        """Changes with the program text (headers inlined), the flags, what is loaded and pinned, and
        the compile child itself, so an agent upgrade that changes how programs load recompiles."""
        h = hashlib.sha256(program_text(self.source).encode())
        h.update(Path(__file__).with_name("compile.py").read_bytes())
        h.update(json.dumps([list(self.cflags), [list(p) for p in self.programs], list(self.maps), pin_dir]).encode())
        return h.hexdigest()


@dataclass
class Loaded:
    """One program's maps (opened) and pinned programs (opened on demand)."""
    spec_name: str
    pin_dir: str
    maps: dict[str, RawMap]
    program_pins: dict[str, str]
    compiled: bool = False        # True when this load ran the compile child
    child: dict = field(default_factory=dict)  # the child's seconds and peak_rss_kib
    _prog_fds: dict[str, int] = field(default_factory=dict)

    def prog_fd(self, function: str) -> int:
        if function not in self._prog_fds:
            if function not in self.program_pins:
                raise KeyError(f"{self.spec_name}: no program {function} (has: {', '.join(self.program_pins)})")
            self._prog_fds[function] = bpfsys.obj_get(self.program_pins[function])
        return self._prog_fds[function]

    def close(self) -> None:
        for fd in self._prog_fds.values():
            os.close(fd)
        self._prog_fds.clear()
        for m in self.maps.values():
            m.close()


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


def _record_path(spec_name: str, state_dir: str) -> Path:
    return Path(state_dir, "programs", f"{spec_name}.json")


def _default_state_dir(pin_dir: str) -> str:
    from ..paths import state_dir_for

    return state_dir_for(pin_dir)


def _pins_present(rec: dict) -> bool:
    return all(os.path.exists(p) for p in [*rec["programs"].values(), *rec["map_pins"].values()])


def load(spec: ProgramSpec, pin_dir: str, state_dir: str | None = None) -> Loaded:
    """The spec's programs and maps, pinned under pin_dir: reused as they are when nothing changed,
    else compiled and pinned by the compile child. Raises LoadError naming the program."""
    ensure_mounts()
    state_dir = state_dir or _default_state_dir(pin_dir)
    path = _record_path(spec.key, state_dir)
    digest = spec.digest(pin_dir)
    rec = _read_record(path)
    compiled = not (rec and rec.get("digest") == digest and _pins_present(rec))
    if compiled:
        rec = _run_child(spec, pin_dir, state_dir)
        rec["digest"] = digest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)
    loaded = _open(spec.key, pin_dir, rec)
    loaded.compiled = compiled
    return loaded


def open_loaded(spec_name: str, pin_dir: str, state_dir: str | None = None) -> Loaded:
    """What an agent loaded under pin_dir, opened from its pins; never compiles.
    FileNotFoundError when nothing was loaded there."""
    path = _record_path(spec_name, state_dir or _default_state_dir(pin_dir))
    rec = _read_record(path)
    if rec is None or not _pins_present(rec):
        raise FileNotFoundError(f"no nodewire {spec_name} programs pinned under {pin_dir} "
                                f"(is the agent running with --pin-dir {pin_dir}?)")
    return _open(spec_name, pin_dir, rec)


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _run_child(spec: ProgramSpec, pin_dir: str, state_dir: str) -> dict:
    prog_dir = os.path.join(pin_dir, "progs", spec.key)
    request = {"source": spec.source, "cflags": list(spec.cflags), "programs": [list(p) for p in spec.programs],
               "maps": list(spec.maps), "pin_dir": pin_dir, "prog_dir": prog_dir}
    try:
        kernel_headers = headers.find(state_dir)
    except headers.HeadersNotFound as e:
        raise LoadError(f"bpf/{spec.source}: {e}") from None
    env = dict(os.environ, NODEWIRE_BPF_DIR=str(BPF_DIR), **kernel_headers.env())
    try:
        out = subprocess.run([sys.executable, "-m", "agent.datapath.compile"], input=json.dumps(request),
                             capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        raise LoadError(f"bpf/{spec.source}: the compile child did not finish in 600 s") from None
    if out.returncode != 0:
        raise LoadError(f"bpf/{spec.source}: compile/load failed: {out.stderr.strip()[-4000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])  # the report is the last line
    rec["map_pins"] = {name: os.path.join(pin_dir, name) for name in rec["maps"]}
    rec["headers"] = str(kernel_headers)
    log.info("compiled bpf/%s seconds=%s headers=%s", spec.source, rec.get("seconds"), kernel_headers)
    return rec


def _open(spec_name: str, pin_dir: str, rec: dict) -> Loaded:
    maps: dict[str, RawMap] = {}
    try:
        for name, layout in rec["maps"].items():
            maps[name] = RawMap.open_pinned(rec["map_pins"][name], dtype_from_json(layout["key"]),
                                            dtype_from_json(layout["value"]), name)
    except Exception:
        for m in maps.values():
            m.close()
        raise
    return Loaded(spec_name, pin_dir, maps, dict(rec["programs"]),
                  child={k: rec[k] for k in ("seconds", "peak_rss_kib", "headers") if k in rec})


class SockLB:
    """The socket load balancer: its pinned hook programs and map views (bpf/sock_lb.c)."""

    SPEC_NAME = "sock_lb"
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

    def __init__(self, pin_dir: str, sizes: MapSizes = MapSizes(), state_dir: str | None = None,
                 loaded: Loaded | None = None):
        self.pin_dir = pin_dir
        self.loaded = loaded or load(self.spec(sizes), pin_dir, state_dir)
        m = self.loaded.maps
        self.services, self.backends = m[abi.SERVICES_MAP], m[abi.BACKENDS_MAP]
        self.revnat, self.lb_stats, self.affinity = m[abi.REVNAT_MAP], m[abi.LB_STATS_MAP], m[abi.AFFINITY_MAP]

    @classmethod
    def spec(cls, sizes: MapSizes = MapSizes()) -> ProgramSpec:
        return ProgramSpec(source="sock_lb.c", cflags=tuple(abi.lb_defines(sizes)), maps=abi.LB_MAPS,
                           programs=tuple((fn, "CGROUP_SOCK_ADDR", at) for fn, at in cls.HOOKS),
                           name=cls.SPEC_NAME)

    @classmethod
    def open(cls, pin_dir: str, state_dir: str | None = None) -> "SockLB":
        """The maps and programs a running (or killed) agent pinned, without compiling."""
        return cls(pin_dir, loaded=open_loaded(cls.SPEC_NAME, pin_dir, state_dir))

    def programs(self) -> list[tuple[str, int, str]]:
        """(function, program fd, attach type) for every hook."""
        return [(fn, self.loaded.prog_fd(fn), at) for fn, at in self.HOOKS]

    def close(self) -> None:
        self.loaded.close()


def remove_pins(pin_dir: str) -> int:
    """Unpin everything under pin_dir (maps, programs, links) and remove it. Returns how many pins.
    A pinned object goes away once nothing else holds it (an attached program stays attached)."""
    if not os.path.isdir(pin_dir):
        return 0
    n = 0
    for root, dirs, files in os.walk(pin_dir, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
            n += 1
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    os.rmdir(pin_dir)
    return n
