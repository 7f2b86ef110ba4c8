"""The short-lived compile child: `python -m agent.datapath.compile` < spec JSON > result JSON.

The only place BCC (and with it LLVM/clang, ~150 MiB once a program is compiled) is imported on the
agent's default path. It compiles one bpf/ program, loads its functions, pins every program and every
map the spec names under the pin dir, reports each map's key/value layout as numpy dtypes derived
from BCC's ctypes of the C structs, and exits: the pins keep the kernel objects alive for the agent,
which opens them with the raw bpf() syscall (loader.py, bpfsys.py).

Input (stdin): {"source", "cflags", "programs": [[function, prog type, attach type or null]],
"maps": [name], "pin_dir", "prog_dir"}. Output (the last line of stdout): {"maps": {name: {"key", "value"}},
"programs": {function: pin path}, "seconds", "peak_rss_kib"}. A failure exits 1 with the reason
(BCC's compiler messages included) on stderr.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np

from . import bpfsys
from .maps import dtype_to_json


def _table_names(bpf) -> list[str]:
    import ctypes as ct

    from bcc.libbcc import lib

    lib.bpf_table_name.restype = ct.c_char_p  # BCC 0.26 leaves it as int
    return [lib.bpf_table_name(bpf.module, i).decode() for i in range(lib.bpf_num_tables(bpf.module))]


def _pin_map(fd: int, path: str) -> None:
    """Pin the map at path unless that pin already is this map (BPF_TABLE_PINNED reused it)."""
    if os.path.exists(path):
        old = bpfsys.obj_get(path)
        try:
            if bpfsys.map_info(old, path).id == bpfsys.map_info(fd, path).id:
                return
        finally:
            os.close(old)
        os.unlink(path)
    bpfsys.obj_pin(fd, path)


def _pin_prog(fd: int, path: str) -> None:
    """Pin under a temporary name, then rename over the old pin: the path always names a program."""
    tmp = f"{path}__new"  # bpffs refuses dots in names
    if os.path.exists(tmp):
        os.unlink(tmp)
    bpfsys.obj_pin(fd, tmp)
    os.rename(tmp, path)


def compile_and_pin(spec: dict) -> dict:
    from bcc import BPF, BPFAttachType

    from .loader import BPF_DIR, program_text

    t0 = time.perf_counter()
    pin_dir, prog_dir = spec["pin_dir"], spec["prog_dir"]
    os.makedirs(pin_dir, exist_ok=True)
    os.makedirs(prog_dir, exist_ok=True)
    cflags = [f"-I{BPF_DIR}", f'-DNW_PIN_DIR="{pin_dir}"', "-Wno-unused-function", *spec["cflags"]]
    bpf = BPF(text=program_text(spec["source"]).encode(), cflags=cflags)
    declared = _table_names(bpf)
    maps = {}
    for name in spec["maps"]:
        if name not in declared:
            raise LookupError(f"bpf/{spec['source']} declares no map {name} (it has: {', '.join(declared)})")
        table = bpf.get_table(name)
        leaf = getattr(table, "sLeaf", table.Leaf)  # a per-CPU table's Leaf is the array of all CPUs
        _pin_map(table.map_fd, os.path.join(pin_dir, name))
        maps[name] = {"key": dtype_to_json(np.dtype(table.Key)), "value": dtype_to_json(np.dtype(leaf))}
    programs = {}
    for fn, prog_type, attach_type in spec["programs"]:
        at = getattr(BPFAttachType, attach_type) if attach_type else -1
        func = bpf.load_func(fn, getattr(BPF, prog_type), attach_type=at)
        path = os.path.join(prog_dir, fn)
        _pin_prog(func.fd, path)
        programs[fn] = path
    return {"maps": maps, "programs": programs, "seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def main() -> int:
    try:
        result = compile_and_pin(json.load(sys.stdin))
    except Exception as e:  # the parent turns this into a LoadError naming the program
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))  # one line, the last: anything BCC prints comes before it
    return 0


if __name__ == "__main__":
    sys.exit(main())
