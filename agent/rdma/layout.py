"""Struct offsets of libibverbs' public ABI, derived by compiling against the real header.

`ibv_post_send`/`ibv_poll_cq` are inline calls through `context->ops`, so the tracer reads the ops
table and the work-request/completion structs from user memory. Their layout is rdma-core's ABI;
rather than trusting numbers copied from a changelog we compile a tiny program against
`infiniband/verbs.h` (Debian: libibverbs-dev) with gcc and let `offsetof` say where things are.
The result is cached per header content, so an agent pays the ~0.1 s compile once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass

log = logging.getLogger("nodewire.rdma.layout")

DEFAULT_INCLUDE = "/usr/include"
CACHE_DIR = os.environ.get("NODEWIRE_CACHE_DIR", "/var/cache/nodewire")

# (macro name for bpf/rdma.c, C expression) — every offset the tracer and its tests need.
FIELDS = [
    ("CTX_DEVICE", "offsetof(struct ibv_context, device)"),
    ("CTX_POLL_CQ", "offsetof(struct ibv_context, ops.poll_cq)"),
    ("CTX_POST_SEND", "offsetof(struct ibv_context, ops.post_send)"),
    ("CTX_POST_RECV", "offsetof(struct ibv_context, ops.post_recv)"),
    ("DEV_NAME", "offsetof(struct ibv_device, name)"),
    ("DEV_NAME_LEN", "sizeof(((struct ibv_device *)0)->name)"),
    ("QP_CONTEXT", "offsetof(struct ibv_qp, context)"),
    ("QP_NUM", "offsetof(struct ibv_qp, qp_num)"),
    ("QPIA_SQ_SIG_ALL", "offsetof(struct ibv_qp_init_attr, sq_sig_all)"),
    ("SWR_WR_ID", "offsetof(struct ibv_send_wr, wr_id)"),
    ("SWR_NEXT", "offsetof(struct ibv_send_wr, next)"),
    ("SWR_OPCODE", "offsetof(struct ibv_send_wr, opcode)"),
    ("SWR_SEND_FLAGS", "offsetof(struct ibv_send_wr, send_flags)"),
    ("RWR_WR_ID", "offsetof(struct ibv_recv_wr, wr_id)"),
    ("RWR_NEXT", "offsetof(struct ibv_recv_wr, next)"),
    ("WC_SIZE", "sizeof(struct ibv_wc)"),
    ("WC_WR_ID", "offsetof(struct ibv_wc, wr_id)"),
    ("WC_STATUS", "offsetof(struct ibv_wc, status)"),
    ("WC_OPCODE", "offsetof(struct ibv_wc, opcode)"),
    ("WC_QP_NUM", "offsetof(struct ibv_wc, qp_num)"),
    ("SEND_SIGNALED", "IBV_SEND_SIGNALED"),
    ("WC_RECV", "IBV_WC_RECV"),
]

# Completion status names, in enum order; values are taken from the compiler, not from this list.
WC_STATUS_NAMES = [
    "SUCCESS", "LOC_LEN_ERR", "LOC_QP_OP_ERR", "LOC_EEC_OP_ERR", "LOC_PROT_ERR", "WR_FLUSH_ERR",
    "MW_BIND_ERR", "BAD_RESP_ERR", "LOC_ACCESS_ERR", "REM_INV_REQ_ERR", "REM_ACCESS_ERR",
    "REM_OP_ERR", "RETRY_EXC_ERR", "RNR_RETRY_EXC_ERR", "LOC_RDD_VIOL_ERR", "REM_INV_RD_REQ_ERR",
    "REM_ABORT_ERR", "INV_EECN_ERR", "INV_EEC_STATE_ERR", "FATAL_ERR", "RESP_TIMEOUT_ERR",
    "GENERAL_ERR",
]


class LayoutError(RuntimeError):
    pass


@dataclass(frozen=True)
class VerbsLayout:
    offsets: dict[str, int]
    wc_status: dict[int, str]          # enum value → name
    header_sha: str

    def cflags(self) -> list[str]:
        return [f"-DNW_{k}={v}" for k, v in sorted(self.offsets.items())]

    def status_name(self, value: int) -> str:
        return self.wc_status.get(value, f"STATUS_{value}")


def _program() -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <infiniband/verbs.h>",
             "int main(void) {"]
    for name, expr in FIELDS:
        lines.append(f'  printf("O {name} %lu\\n", (unsigned long)({expr}));')
    for name in WC_STATUS_NAMES:
        lines.append(f'  printf("S {name} %d\\n", (int)IBV_WC_{name});')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def derive_layout(include_dir: str = DEFAULT_INCLUDE, cc: str = "gcc") -> VerbsLayout:
    header = os.path.join(include_dir, "infiniband", "verbs.h")
    try:
        with open(header, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()[:16]
    except FileNotFoundError:
        raise LayoutError(f"{header}: not found (install libibverbs-dev, or pass the include dir "
                          f"of the rdma-core the workloads use)") from None
    with tempfile.TemporaryDirectory(prefix="nw-verbs-layout-") as d:
        src, exe = os.path.join(d, "layout.c"), os.path.join(d, "layout")
        with open(src, "w") as f:
            f.write(_program())
        res = subprocess.run([cc, f"-I{include_dir}", "-o", exe, src], capture_output=True, text=True)
        if res.returncode != 0:
            raise LayoutError(f"{header}: compiling the layout probe failed: {res.stderr.strip()[:400]}")
        out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    offsets, status = {}, {}
    for line in out.splitlines():
        kind, name, value = line.split()
        if kind == "O":
            offsets[name] = int(value)
        else:
            status[int(value)] = name
    return VerbsLayout(offsets, status, sha)


def load_layout(include_dir: str = DEFAULT_INCLUDE, cache_dir: str = CACHE_DIR) -> VerbsLayout:
    """derive_layout, cached in cache_dir by the header's hash."""
    header = os.path.join(include_dir, "infiniband", "verbs.h")
    try:
        with open(header, "rb") as f:   # keyed by the header and by what we ask of it
            sha = hashlib.sha256(f.read() + _program().encode()).hexdigest()[:16]
    except FileNotFoundError:
        sha = None
    path = os.path.join(cache_dir, f"verbs-layout-{sha}.json") if sha else None
    if path and os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
        return VerbsLayout(doc["offsets"], {int(k): v for k, v in doc["wc_status"].items()}, sha)
    layout = derive_layout(include_dir)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"offsets": layout.offsets, "wc_status": layout.wc_status}, f)
    except OSError as e:
        log.info("verbs layout not cached dir=%s err=%s", cache_dir, e.strerror)
    log.info("verbs layout header=%s sha=%s post_send=%d post_recv=%d poll_cq=%d", header, sha,
             layout.offsets["CTX_POST_SEND"], layout.offsets["CTX_POST_RECV"], layout.offsets["CTX_POLL_CQ"])
    return layout
