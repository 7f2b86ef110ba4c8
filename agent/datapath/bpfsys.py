"""The bpf() and perf_event_open() system calls through ctypes, so the agent uses pinned maps and
programs without importing BCC (whose LLVM/clang libraries cost ~63 MiB of RSS just to load).

Only the commands the agent needs: open a pin, pin an object, map element and batch operations,
object info, cgroup attach/detach/query, and BPF links on perf events. Every failure is an OSError
with the errno and a message naming the object. Numbers are the kernel's uapi (include/uapi/linux/
bpf.h, perf_event.h): stable ABI, checked against BCC's own tables in tests/test_bpfsys.py.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
import platform

# syscall numbers (arch/*/entry/syscalls, include/uapi/asm-generic/unistd.h)
_SYSCALLS = {"x86_64": (321, 298), "aarch64": (280, 241)}
SYS_BPF, SYS_PERF_EVENT_OPEN = _SYSCALLS.get(platform.machine(), (321, 298))

# enum bpf_cmd
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_PIN, OBJ_GET, PROG_ATTACH, PROG_DETACH = 6, 7, 8, 9
PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, PROG_QUERY = 13, 14, 15, 16
MAP_LOOKUP_BATCH, MAP_UPDATE_BATCH, MAP_DELETE_BATCH, LINK_CREATE = 24, 26, 27, 28
PROG_TEST_RUN = 10

# enum bpf_map_type: the per-CPU kinds, whose values are one (8-byte rounded) slot per possible CPU
PERCPU_MAP_TYPES = {5: "percpu_hash", 6: "percpu_array", 10: "lru_percpu_hash", 21: "percpu_cgroup_storage"}

# enum bpf_attach_type, by the names BCC's BPFAttachType uses
ATTACH_TYPES = {
    "CGROUP_INET_INGRESS": 0, "CGROUP_INET_EGRESS": 1, "CGROUP_INET_SOCK_CREATE": 2, "CGROUP_SOCK_OPS": 3,
    "CGROUP_INET4_BIND": 8, "CGROUP_INET6_BIND": 9,
    "CGROUP_INET4_CONNECT": 10, "CGROUP_INET6_CONNECT": 11,
    "CGROUP_INET4_POST_BIND": 12, "CGROUP_INET6_POST_BIND": 13,
    "CGROUP_UDP4_SENDMSG": 14, "CGROUP_UDP6_SENDMSG": 15,
    "CGROUP_UDP4_RECVMSG": 19, "CGROUP_UDP6_RECVMSG": 20,
    "CGROUP_INET4_GETPEERNAME": 29, "CGROUP_INET6_GETPEERNAME": 30,
    "CGROUP_INET4_GETSOCKNAME": 31, "CGROUP_INET6_GETSOCKNAME": 32,
    "CGROUP_INET_SOCK_RELEASE": 34,
}
BPF_PERF_EVENT = 41  # enum bpf_attach_type: a link from a program to a perf event
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
BPF_OBJ_NAME_LEN = 16

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class _Elem(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _Batch(ct.Structure):
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


class _Obj(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)]


class _Attach(ct.Structure):
    _fields_ = [("target_fd", ct.c_uint32), ("attach_bpf_fd", ct.c_uint32), ("attach_type", ct.c_uint32),
                ("attach_flags", ct.c_uint32), ("replace_bpf_fd", ct.c_uint32)]


class _TestRun(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32), ("data_size_in", ct.c_uint32),
                ("data_size_out", ct.c_uint32), ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32), ("ctx_size_in", ct.c_uint32),
                ("ctx_size_out", ct.c_uint32), ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32)]


class _Info(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _Query(ct.Structure):
    _fields_ = [("target_fd", ct.c_uint32), ("attach_type", ct.c_uint32), ("query_flags", ct.c_uint32),
                ("attach_flags", ct.c_uint32), ("prog_ids", ct.c_uint64), ("prog_cnt", ct.c_uint32)]


class _ById(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


class _LinkCreate(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("target_fd", ct.c_uint32), ("attach_type", ct.c_uint32),
                ("flags", ct.c_uint32), ("bpf_cookie", ct.c_uint64)]


class MapInfo(ct.Structure):
    """The head of struct bpf_map_info (the kernel fills as much as we pass)."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * BPF_OBJ_NAME_LEN)]


class ProgInfo(ct.Structure):
    """The head of struct bpf_prog_info, up to its name."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
                ("map_ids", ct.c_uint64), ("name", ct.c_char * BPF_OBJ_NAME_LEN)]


class _PerfEventAttr(ct.Structure):
    """struct perf_event_attr up to PERF_ATTR_SIZE_VER0 (64 bytes) and the flag word."""
    _fields_ = [("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
                ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64), ("read_format", ct.c_uint64),
                ("flags", ct.c_uint64), ("wakeup_events", ct.c_uint32), ("bp_type", ct.c_uint32),
                ("config1", ct.c_uint64)]


def _addr(buf) -> int:
    return ct.addressof(buf) if buf is not None else 0


def bpf(cmd: int, attr: ct.Structure, what: str, ok_errnos=()) -> int:
    """One bpf() call; raises OSError naming `what` unless the errno is in ok_errnos (then -errno)."""
    res = _libc.syscall(SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    if res < 0:
        err = ct.get_errno()
        if err in ok_errnos:
            return -err
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return res


# -- objects ------------------------------------------------------------------------------------
def obj_get(path: str) -> int:
    """An fd for the map, program or link pinned at path."""
    p = ct.create_string_buffer(os.fsencode(path))
    return bpf(OBJ_GET, _Obj(pathname=_addr(p)), f"{path}: BPF_OBJ_GET")


def obj_pin(fd: int, path: str) -> None:
    p = ct.create_string_buffer(os.fsencode(path))
    bpf(OBJ_PIN, _Obj(pathname=_addr(p), bpf_fd=fd), f"{path}: BPF_OBJ_PIN")


def _info(fd: int, info: ct.Structure, what: str):
    bpf(OBJ_GET_INFO_BY_FD, _Info(bpf_fd=fd, info_len=ct.sizeof(info), info=_addr(info)),
        f"{what}: BPF_OBJ_GET_INFO_BY_FD")
    return info


def map_info(fd: int, what: str = "map") -> MapInfo:
    return _info(fd, MapInfo(), what)


def prog_info(fd: int, what: str = "program") -> ProgInfo:
    return _info(fd, ProgInfo(), what)


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(PROG_GET_FD_BY_ID, _ById(id=prog_id), f"program id {prog_id}: BPF_PROG_GET_FD_BY_ID")


# -- map elements -------------------------------------------------------------------------------
def lookup_elem(fd: int, key: bytes, value_size: int, what: str) -> bytes | None:
    k = ct.create_string_buffer(key, len(key))
    v = ct.create_string_buffer(value_size)
    r = bpf(MAP_LOOKUP_ELEM, _Elem(map_fd=fd, key=_addr(k), value=_addr(v)), f"{what}: BPF_MAP_LOOKUP_ELEM",
            (errno.ENOENT,))
    return None if r < 0 else v.raw


def update_elem(fd: int, key: bytes, value: bytes, what: str, flags: int = 0) -> None:
    k = ct.create_string_buffer(key, len(key))
    v = ct.create_string_buffer(value, len(value))
    bpf(MAP_UPDATE_ELEM, _Elem(map_fd=fd, key=_addr(k), value=_addr(v), flags=flags),
        f"{what}: BPF_MAP_UPDATE_ELEM")


def delete_elem(fd: int, key: bytes, what: str) -> bool:
    """False when the key was not there."""
    k = ct.create_string_buffer(key, len(key))
    return bpf(MAP_DELETE_ELEM, _Elem(map_fd=fd, key=_addr(k)), f"{what}: BPF_MAP_DELETE_ELEM",
               (errno.ENOENT,)) == 0


def next_key(fd: int, key: bytes | None, key_size: int, what: str) -> bytes | None:
    """The key after `key` (the first with None); None at the end."""
    k = ct.create_string_buffer(key, key_size) if key is not None else None
    nk = ct.create_string_buffer(key_size)
    r = bpf(MAP_GET_NEXT_KEY, _Elem(map_fd=fd, key=_addr(k), value=_addr(nk)), f"{what}: BPF_MAP_GET_NEXT_KEY",
            (errno.ENOENT,))
    return None if r < 0 else nk.raw


def lookup_batch(fd: int, key_size: int, value_size: int, what: str, chunk: int = 16384) -> tuple[bytes, bytes]:
    """All keys and values as two byte strings (BPF_MAP_LOOKUP_BATCH). value_size is per element as
    the kernel returns it (for per-CPU maps: the 8-byte rounded value times the possible CPUs)."""
    kparts, vparts = [], []
    for keys, values in lookup_batches(fd, key_size, value_size, what, chunk):
        kparts.append(keys)
        vparts.append(values)
    return b"".join(kparts), b"".join(vparts)


def lookup_batches(fd: int, key_size: int, value_size: int, what: str, chunk: int = 16384):
    """(keys, values) byte strings of up to `chunk` entries at a time, so a reader of a big map holds
    one chunk, not the map (a hash map's batches go bucket by bucket: deleting entries already
    yielded does not disturb the rest)."""
    keys = ct.create_string_buffer(key_size * chunk)
    values = ct.create_string_buffer(value_size * chunk)
    in_batch, out_batch = ct.c_uint64(0), ct.c_uint64(0)
    first = True
    while True:
        attr = _Batch(in_batch=0 if first else _addr(in_batch), out_batch=_addr(out_batch),
                      keys=_addr(keys), values=_addr(values), count=chunk, map_fd=fd)
        r = bpf(MAP_LOOKUP_BATCH, attr, f"{what}: BPF_MAP_LOOKUP_BATCH", (errno.ENOENT,))
        if attr.count:
            yield keys.raw[:attr.count * key_size], values.raw[:attr.count * value_size]
        if r < 0:  # ENOENT: that was the last batch
            return
        in_batch.value = out_batch.value
        first = False


def update_batch(fd: int, keys: bytes, values: bytes, n: int, what: str) -> int:
    """0, or -errno for a full map (E2BIG, ENOSPC, ENOMEM), which the caller names."""
    k, v = ct.create_string_buffer(keys, len(keys)), ct.create_string_buffer(values, len(values))
    return bpf(MAP_UPDATE_BATCH, _Batch(keys=_addr(k), values=_addr(v), count=n, map_fd=fd),
               f"{what}: BPF_MAP_UPDATE_BATCH", (errno.E2BIG, errno.ENOSPC, errno.ENOMEM))


def delete_batch(fd: int, keys: bytes, n: int, what: str) -> int:
    """0, or -ENOENT when some key was missing (the kernel stops there)."""
    k = ct.create_string_buffer(keys, len(keys))
    return bpf(MAP_DELETE_BATCH, _Batch(keys=_addr(k), count=n, map_fd=fd), f"{what}: BPF_MAP_DELETE_BATCH",
               (errno.ENOENT,))


def prog_test_run(prog_fd: int, data: bytes, what: str) -> tuple[int, bytes]:
    """Run a program once on a packet (BPF_PROG_TEST_RUN; for tc programs an Ethernet frame):
    (its return value, the packet as it left the program)."""
    din = ct.create_string_buffer(data, len(data))
    dout = ct.create_string_buffer(len(data) + 256)
    attr = _TestRun(prog_fd=prog_fd, data_size_in=len(data), data_size_out=len(dout), data_in=_addr(din),
                    data_out=_addr(dout), repeat=1)
    bpf(PROG_TEST_RUN, attr, f"{what}: BPF_PROG_TEST_RUN")
    return attr.retval, dout.raw[:attr.data_size_out]


# -- cgroups ------------------------------------------------------------------------------------
def prog_attach(prog_fd: int, target_fd: int, attach_type: int, what: str, flags: int = 0) -> None:
    """Without flags the cgroup holds one program per hook and attaching replaces it atomically."""
    bpf(PROG_ATTACH, _Attach(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type,
                             attach_flags=flags), f"{what}: BPF_PROG_ATTACH")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int, what: str) -> bool:
    """False when nothing was attached there."""
    return bpf(PROG_DETACH, _Attach(target_fd=target_fd, attach_bpf_fd=prog_fd & 0xffffffff,
                                    attach_type=attach_type), f"{what}: BPF_PROG_DETACH",
               (errno.ENOENT,)) == 0


def prog_query(target_fd: int, attach_type: int, what: str, max_progs: int = 64) -> list[int]:
    """Ids of the programs attached directly to the target at this hook."""
    ids = (ct.c_uint32 * max_progs)()
    q = _Query(target_fd=target_fd, attach_type=attach_type, prog_ids=_addr(ids), prog_cnt=max_progs)
    bpf(PROG_QUERY, q, f"{what}: BPF_PROG_QUERY")
    return list(ids[:q.prog_cnt])


# -- links on perf events -----------------------------------------------------------------------
def perf_event_open_tracepoint(tp_id: int, what: str) -> int:
    """A perf event on one tracepoint (all processes; a BPF program attached to it sees every CPU)."""
    attr = _PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=64, config=tp_id, sample_period=1, wakeup_events=1)
    fd = _libc.syscall(SYS_PERF_EVENT_OPEN, ct.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, f"{what}: perf_event_open: {os.strerror(err)}")
    return fd


def link_create_perf_event(prog_fd: int, perf_fd: int, what: str) -> int:
    return bpf(LINK_CREATE, _LinkCreate(prog_fd=prog_fd, target_fd=perf_fd, attach_type=BPF_PERF_EVENT),
               f"{what}: BPF_LINK_CREATE")


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs per-CPU map values have a slot for ("0-3,5" → 6)."""
    n = 0
    with open(path) as f:
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
    return n
