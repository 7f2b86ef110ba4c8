"""Attach and detach programs by fd (cgroup hooks, tracepoint links), idempotently, without BCC.

Cgroup programs are attached without flags: the kernel keeps them after the agent exits (the
datapath outlives the agent), and attaching again atomically replaces the previous program.
Tracepoint programs are attached through a BPF link on a perf event; pinning the link keeps it
alive after the process exits, and removing the pin detaches it (ENVIRONMENT.md). tc programs are
attached by fd with pyroute2 (`tc("replace-filter", "bpf", ..., fd=prog_fd, direct_action=True)`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

from . import bpfsys

TRACEFS = "/sys/kernel/tracing"


def detect_cgroup2_root() -> str:
    """The cgroup v2 mount: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    for m in mounts:
        if m[2] == "cgroup2":
            return m[1]
    raise RuntimeError("no cgroup v2 mount found (need cgroup2 for socket load balancing)")


@contextmanager
def _opened(path: str):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _attach_type(name: str) -> int:
    try:
        return bpfsys.ATTACH_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown cgroup attach type {name!r} (known: {', '.join(bpfsys.ATTACH_TYPES)})") from None


def attach_cgroup(prog_fd: int, cgroup_path: str, attach_type: str) -> None:
    """Attach (or atomically replace) the program at this cgroup hook."""
    with _opened(cgroup_path) as cg:
        bpfsys.prog_attach(prog_fd, cg, _attach_type(attach_type), f"{cgroup_path} {attach_type}")


def detach_cgroup(cgroup_path: str, attach_type: str, prog_fd: int = -1) -> bool:
    """Detach prog_fd (or, with -1, the single program attached without flags). False if none was."""
    with _opened(cgroup_path) as cg:
        return bpfsys.prog_detach(prog_fd, cg, _attach_type(attach_type), f"{cgroup_path} {attach_type}")


def cgroup_programs(cgroup_path: str, attach_types=None) -> list[dict]:
    """What is attached directly to this cgroup: [{id, name, attach_type}] per hook (BPF_PROG_QUERY)."""
    out = []
    with _opened(cgroup_path) as cg:
        for at in attach_types or bpfsys.ATTACH_TYPES:
            try:
                ids = bpfsys.prog_query(cg, _attach_type(at), f"{cgroup_path} {at}")
            except OSError:
                continue  # a hook this kernel does not know
            for pid in ids:
                out.append({"id": pid, "name": _prog_name(pid), "attach_type": at})
    return out


def _prog_name(prog_id: int) -> str:
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except OSError:
        return ""  # detached and freed between the query and now
    try:
        return bpfsys.prog_info(fd).name.decode()
    finally:
        os.close(fd)


def _detach_id(cgroup_path: str, attach_type: str, prog_id: int) -> bool:
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except OSError:
        return False  # gone since the query
    try:
        return detach_cgroup(cgroup_path, attach_type, fd)
    finally:
        os.close(fd)


def detach_named(cgroup_path: str, hooks) -> int:
    """Detach from each (function name, attach type) hook the program of that name. Programs of other
    names are left alone. Returns how many were detached."""
    names = {at: fn[:bpfsys.BPF_OBJ_NAME_LEN - 1] for fn, at in hooks}
    return sum(_detach_id(cgroup_path, p["attach_type"], p["id"])
               for p in cgroup_programs(cgroup_path, list(names)) if p["name"] == names[p["attach_type"]])


def tracepoint_id(tracepoint: str, tracefs: str = TRACEFS) -> int:
    """The perf event id of "category:name" (FileNotFoundError when this kernel lacks it)."""
    cat, _, name = tracepoint.partition(":")
    with open(os.path.join(tracefs, "events", cat, name, "id")) as f:
        return int(f.read())


def attach_tracepoint(prog_fd: int, tracepoint: str, pin: str | None = None) -> int:
    """Link a TRACEPOINT program to "category:name" on every CPU. Returns the link fd; with pin, the
    link is also pinned there, so it outlives this process until the pin is removed. A pin that
    already holds a link is replaced; the old link detaches when its pin goes, which the kernel
    completes from a work queue, so for a moment both programs may run."""
    perf = bpfsys.perf_event_open_tracepoint(tracepoint_id(tracepoint), tracepoint)
    try:
        link = bpfsys.link_create_perf_event(prog_fd, perf, tracepoint)
    finally:
        os.close(perf)  # the link holds the perf event
    if pin is not None:
        try:
            tmp = f"{pin}__new"  # bpffs refuses dots in names
            if os.path.exists(tmp):
                os.unlink(tmp)
            bpfsys.obj_pin(link, tmp)
            os.rename(tmp, pin)
        except OSError:
            os.close(link)
            raise
    return link


# -- tc (clsact) ----------------------------------------------------------------------------------
TC_INGRESS, TC_EGRESS = "ffff:fff2", "ffff:fff3"  # clsact's ingress/egress parents


def attach_tc(ipr, ifname: str, filters, prio: int, where: str = "this network namespace") -> int:
    """clsact on ifname plus our direct-action bpf filters [(name, prog_fd, parent)], each replacing
    the one of the same priority (ours) atomically. ipr: a pyroute2 IPRoute/NetNS. Returns the ifindex."""
    import errno

    from pyroute2.netlink.exceptions import NetlinkError

    links = ipr.link_lookup(ifname=ifname)
    if not links:
        raise LookupError(f"no interface {ifname!r} in {where}")
    idx = links[0]
    try:
        ipr.tc("add", "clsact", idx)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
    for name, fd, parent in filters:
        ipr.tc("replace-filter", "bpf", idx, ":1", fd=fd, name=name, parent=parent, prio=prio, classid=1,
               direct_action=True)
    return idx


def attach_sock_lb(lb, cgroup_path: str) -> list[str]:
    """Every socket-LB hook onto the cgroup (replacing what our hooks held). Returns the functions."""
    done = []
    for fn, fd, at in lb.programs():
        attach_cgroup(fd, cgroup_path, at)
        done.append(fn)
    return done


def detach_sock_lb(cgroup_path: str) -> int:
    """Detach the socket-LB programs (found by name) from the cgroup. Returns how many."""
    from .loader import SockLB

    return detach_named(cgroup_path, SockLB.HOOKS)


def pinned_program_ids(pin_dir: str) -> set[int]:
    """Ids of the programs pinned under <pin dir>/progs (every spec the loader loaded there)."""
    ids = set()
    for root, _dirs, files in os.walk(os.path.join(pin_dir, "progs")):
        for name in files:
            try:
                fd = bpfsys.obj_get(os.path.join(root, name))
            except OSError:
                continue
            try:
                ids.add(bpfsys.prog_info(fd).id)
            finally:
                os.close(fd)
    return ids


def detach_loaded(cgroup_path: str, pin_dir: str) -> int:
    """Detach from the cgroup every program loaded under pin_dir (by the ids of its pins), and the
    socket LB's by name when its pins are already gone. Returns how many."""
    ids = pinned_program_ids(pin_dir)
    n = sum(_detach_id(cgroup_path, p["attach_type"], p["id"]) for p in cgroup_programs(cgroup_path) if p["id"] in ids)
    return n + detach_sock_lb(cgroup_path)


def attached_programs(cgroup_path: str) -> list[dict]:
    """What the kernel has attached on this cgroup, for `nodewire status`."""
    try:
        return cgroup_programs(cgroup_path)
    except OSError:
        return []
