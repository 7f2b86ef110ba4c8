"""Drop the Linux capabilities the agent no longer needs once its datapath is loaded and attached.

The agent starts privileged (a DaemonSet pod with the capabilities deploy/ grants). After start-up it
still loads programs (observer, RDMA tracer), attaches tc/cgroup programs as pods come and go, enters
pod network namespaces and reads other processes' /proc entries, so it keeps exactly what those need
(KEEP, each with its reason; SECURITY.md lists the same). Everything else is removed from the
bounding, permitted and effective sets, so neither the agent nor anything it executes can regain it.

Capabilities are per thread in Linux: drop() must run before the agent starts its own threads (the
agent calls it right after attaching the socket load balancer). Threads that already exist (e.g.
OpenBLAS workers started by importing numpy) keep theirs; they never run agent code.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("nodewire.privileges")

# linux/capability.h numbers
KEEP = {
    12: "CAP_NET_ADMIN: attach tc and cgroup programs to new pods, netlink, sock_diag socket destroy",
    19: "CAP_SYS_PTRACE: read /proc/PID/{maps,root,ns} of workload processes (RDMA uprobes, pod identity)",
    21: "CAP_SYS_ADMIN: setns() into pod network namespaces; re-mount bpffs/tracefs; bpf() on kernels "
        "without CAP_BPF",
    24: "CAP_SYS_RESOURCE: BCC raises RLIMIT_MEMLOCK for maps on kernels without memcg accounting",
    38: "CAP_PERFMON: tracepoints and uprobes (observer, RDMA tracer) attached after start",
    39: "CAP_BPF: load programs and create/update maps (the reconciler writes maps for the agent's life)",
}
LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
SYS_CAPGET, SYS_CAPSET = 125, 126  # x86_64


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _last_cap() -> int:
    try:
        with open(LAST_CAP_FILE) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def _get(libc) -> int:
    """(effective | permitted) as one mask is enough for us: we read back what we set."""
    hdr, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if libc.syscall(SYS_CAPGET, ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    return data[0].permitted | (data[1].permitted << 32)


def _set(libc, mask: int) -> None:
    hdr, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    for i in (0, 1):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    if libc.syscall(SYS_CAPSET, ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def keep_mask() -> int:
    return sum(1 << c for c in KEEP)


def drop(keep: int | None = None) -> dict:
    """Drop every capability outside `keep` (default KEEP); return what was done, for the status.

    Never raises: an agent that cannot drop (not root, no CAP_SETPCAP, a non-x86_64 machine) keeps
    running with what it has and says so."""
    keep = keep_mask() if keep is None else keep
    out = {"dropped": [], "kept": sorted(KEEP.values()) if keep == keep_mask() else [], "error": None}
    if os.uname().machine != "x86_64":
        out["error"] = f"capability drop not implemented on {os.uname().machine}"
        return out
    libc = _libc()
    try:
        before = _get(libc)
        for cap in range(_last_cap() + 1):
            if not keep & (1 << cap) and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                if err != 22:  # EINVAL: the running kernel does not know this capability
                    raise OSError(err, f"PR_CAPBSET_DROP {cap}")
        _set(libc, before & keep)  # CAP_SETPCAP goes last: it was needed for the bounding set
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        out["dropped"] = [c for c in range(_last_cap() + 1) if before & (1 << c) and not keep & (1 << c)]
    except OSError as e:
        out["error"] = f"{e.strerror or e} (errno {e.errno})"
        log.warning("could not drop capabilities, running with those it has err=%s", out["error"])
        return out
    log.info("capabilities dropped count=%d kept=%s", len(out["dropped"]),
             ",".join(v.split(":")[0] for v in KEEP.values()))
    return out
