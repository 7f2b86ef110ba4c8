"""A faithful test double of the verbs protocol, for tests and `bench` (this machine has no RDMA).

`build(dest)` compiles, with gcc against the real <infiniband/verbs.h>:
  libibverbs.so.1            exports ibv_get_device_list/ibv_open_device/ibv_alloc_pd/ibv_create_cq/
                             ibv_create_qp like rdma-core's, and dlopens the provider next to it
  libmockprov-rdmav34.so     the provider: post_send/post_recv/poll_cq are static and the file is
                             stripped, so only the ops table in the context leads to them (as mlx5)
  driver                     an application using the header's inline ibv_post_send/ibv_poll_cq; see
                             driver.c for its script commands
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent


@dataclass(frozen=True)
class MockVerbs:
    dir: str
    libibverbs: str
    provider: str
    driver: str


def _cc(*args: str) -> None:
    res = subprocess.run(["gcc", "-O2", "-Wall", "-Werror", f"-I{SRC}", *args],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"mockverbs: gcc {' '.join(args)} failed:\n{res.stderr}")


def build(dest: str) -> MockVerbs:
    os.makedirs(dest, exist_ok=True)
    lib = os.path.join(dest, "libibverbs.so.1")
    prov = os.path.join(dest, "libmockprov-rdmav34.so")
    drv = os.path.join(dest, "driver")
    _cc("-shared", "-fPIC", "-o", prov, str(SRC / "mockprov.c"), "-lpthread")
    subprocess.run(["strip", "--strip-all", prov], check=True)
    _cc("-shared", "-fPIC", "-Wl,-soname,libibverbs.so.1", "-o", lib, str(SRC / "libibverbs.c"), "-ldl")
    # link by file name; rpath $ORIGIN so the driver finds this libibverbs, not a system one
    _cc("-o", drv, str(SRC / "driver.c"), lib, "-Wl,-rpath,$ORIGIN", "-lpthread")
    return MockVerbs(dest, lib, prov, drv)
