"""Where a function of a traced process lives: /proc/PID/maps turns a runtime address into (file,
file offset), the file's ELF headers into the virtual address BCC's attach_uprobe(addr=) wants; plus
the little else the tracer reads of a process (start time, command, symbol)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .elf import ElfError, read_elf


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    dev: str
    inode: int
    path: str


def read_maps(pid: int) -> list[Mapping]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            lo, hi = parts[0].split("-")
            out.append(Mapping(int(lo, 16), int(hi, 16), int(parts[2], 16), parts[3], int(parts[4]),
                               parts[5].rstrip("\n").removesuffix(" (deleted)")))
    return out


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: tells a pid apart from a later process that reuses it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ProbeTarget:
    role: str
    path: str            # as seen from this (host) mount namespace: /proc/PID/root/<path>
    vaddr: int
    build_id: str | None


def resolve(pid: int, addr: int, maps: list[Mapping] | None = None, elf_cache: dict | None = None):
    """Runtime address in `pid` → (host path of the file, ELF vaddr, build-id)."""
    maps = maps if maps is not None else read_maps(pid)
    for m in maps:
        if m.start <= addr < m.end:
            host = f"/proc/{pid}/root{m.path}"
            key = (m.dev, m.inode)
            info = elf_cache.get(key) if elf_cache is not None else None
            if info is None:
                info = read_elf(host)
                if elf_cache is not None:
                    elf_cache[key] = info
            return host, info.vaddr_of_offset(addr - m.start + m.offset), info.build_id
    raise ElfError(f"pid {pid}: address 0x{addr:x} is in no file mapping")


def symbol_name(addr: int, pid: int) -> str:
    """The function's name where the provider has a symbol table or debug info; else '-'."""
    try:
        from bcc import BPF
        name = BPF.sym(addr, pid).decode(errors="replace")
    except Exception:  # noqa: BLE001
        return "-"
    return "-" if name == "[unknown]" else name


def comm_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


@dataclass
class TracedProcess:
    pid: int
    start_time: int | None
    comm: str
    targets: list[ProbeTarget]
    devices: dict[int, str] = field(default_factory=dict)      # ibv_context address → device name
    events: list[bytes] = field(default_factory=list)           # BCC uprobe event names attached
    attrs: dict = field(default_factory=dict)                   # identity attributes (pod)
    attached: bool = False                                      # every target's probes are on
