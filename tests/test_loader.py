"""The out-of-process loader: programs compiled by a child that exits, opened by pin with raw bpf()
syscalls; reuse when nothing changed, replacement when the program did; the agent without BCC."""
import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.datapath import bpfsys
from agent.datapath.attach import (attach_cgroup, attach_sock_lb, attach_tracepoint, cgroup_programs,
                                   detach_loaded, detach_sock_lb, detect_cgroup2_root, pinned_program_ids)
from agent.datapath.loader import LoadError, MapSizes, ProgramSpec, SockLB, load, remove_pins
from tests.conftest import wait_for
from tests.manifests import endpoint_slice, service, write

COUNTER = str(Path(__file__).with_name("bpf") / "count_getppid.c")
TRACEPOINT = "syscalls:sys_enter_getppid"


def counter_spec(step: int) -> ProgramSpec:
    return ProgramSpec(source=COUNTER, cflags=(f"-DNW_TEST_STEP={step}",), name="nwtest_counter",
                       programs=(("nwtest_count", "TRACEPOINT", None),),
                       maps=("nwtest_config_v1", "nwtest_calls_v1"))


@pytest.fixture
def pin_dir(tmp_path):
    pin = f"/sys/fs/bpf/nwtest-{secrets.token_hex(3)}"
    try:
        yield pin, str(tmp_path / "state")
    finally:
        remove_pins(pin)


def prog_id(loaded, fn: str) -> int:
    return bpfsys.prog_info(loaded.prog_fd(fn)).id


def calls_after(loaded, n: int) -> int:
    """Make n getppid() calls from this process; return the kernel's count (summed over CPUs)."""
    for _ in range(n):
        os.getppid()
    _, values = loaded.maps["nwtest_calls_v1"].dump_summed()
    return int(values[0])


def settled_step(loaded, step: int) -> bool:
    """True once one getppid() call adds exactly `step`: a link dropped by its pin is freed by the
    kernel from a work queue, so for a moment after the pin goes the old program still runs."""
    before = calls_after(loaded, 0)
    return calls_after(loaded, 1) - before == step


def count_this_process(loaded) -> None:
    cfg = loaded.maps["nwtest_config_v1"]
    cfg.update_arrays(np.zeros(1, dtype=cfg.key_dtype), np.array([os.getpid()], dtype=cfg.value_dtype))


def test_kernel_abi_numbers_are_bccs():
    from bcc import BPFAttachType, table

    for name, number in bpfsys.ATTACH_TYPES.items():
        assert getattr(BPFAttachType, name) == number, name
    assert bpfsys.PERCPU_MAP_TYPES.keys() == {table.BPF_MAP_TYPE_PERCPU_HASH, table.BPF_MAP_TYPE_PERCPU_ARRAY,
                                              table.BPF_MAP_TYPE_LRU_PERCPU_HASH,
                                              table.BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE}


@pytest.mark.root
def test_a_pinned_link_keeps_counting_after_its_loader_exited_and_goes_with_its_pin(pin_dir):
    pin, state = pin_dir
    link = f"{pin}/nwtest_link"
    child = subprocess.run([sys.executable, "-c", f"""
import sys
from agent.datapath.attach import attach_tracepoint
from agent.datapath.loader import load
from tests.test_loader import counter_spec
loaded = load(counter_spec(1), {pin!r}, {state!r})
attach_tracepoint(loaded.prog_fd("nwtest_count"), {TRACEPOINT!r}, pin={link!r})
print(loaded.compiled, "bcc" in sys.modules)
"""], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["True", "False"]  # it compiled, in a child of its own: no BCC here

    loaded = load(counter_spec(1), pin, state)
    assert not loaded.compiled  # same source and cflags, every pin present: nothing compiled
    count_this_process(loaded)
    assert calls_after(loaded, 100) == 100  # every CPU's slot, summed: exactly this process's calls
    os.unlink(link)
    wait_for(lambda: settled_step(loaded, 0), 10, what="the link detached once its pin was removed")
    stopped = calls_after(loaded, 0)
    assert calls_after(loaded, 50) == stopped  # the pin was the link's last holder: detached


@pytest.mark.root
def test_per_cpu_values_are_one_slot_per_possible_cpu_in_the_c_layout(pin_dir):
    pin, state = pin_dir
    calls = load(counter_spec(1), pin, state).maps["nwtest_calls_v1"]
    ncpu = bpfsys.possible_cpus()
    assert (calls.percpu, calls.ncpu, calls.value_stride, calls.elem_size) == (True, ncpu, 8, 8 * ncpu)
    key = np.zeros(1, dtype=calls.key_dtype)
    calls.update_arrays(key, np.array([7], dtype=np.uint64))  # one value: every CPU's slot
    _, per_cpu = calls.dump_arrays()
    assert per_cpu.shape == (1, ncpu) and per_cpu.tolist() == [[7] * ncpu]
    calls.update_arrays(key, np.arange(1, ncpu + 1, dtype=np.uint64).reshape(1, ncpu))  # one per CPU
    assert int(calls.dump_summed()[1][0]) == ncpu * (ncpu + 1) // 2
    assert np.frombuffer(calls.lookup(key.tobytes()), dtype=np.uint64).tolist() == list(range(1, ncpu + 1))
    assert list(calls.keys()) == [key.tobytes()]  # an array of one entry


@pytest.mark.root
def test_a_changed_program_is_recompiled_and_replaces_the_old_keeping_map_contents(pin_dir):
    pin, state = pin_dir
    link = f"{pin}/nwtest_link"
    first = load(counter_spec(1), pin, state)
    old_prog = prog_id(first, "nwtest_count")
    old_map = first.maps["nwtest_calls_v1"]
    os.close(attach_tracepoint(first.prog_fd("nwtest_count"), TRACEPOINT, pin=link))
    count_this_process(first)
    assert calls_after(first, 10) == 10

    second = load(counter_spec(2), pin, state)  # cflags changed: a new program
    assert second.compiled
    assert prog_id(second, "nwtest_count") != old_prog
    new_map = second.maps["nwtest_calls_v1"]
    assert bpfsys.map_info(new_map.fd).id == bpfsys.map_info(old_map.fd).id  # BPF_TABLE_PINNED: reused
    os.close(attach_tracepoint(second.prog_fd("nwtest_count"), TRACEPOINT, pin=link))  # replaces the link
    wait_for(lambda: settled_step(second, 2), 10, what="only the new program counting")
    kept = calls_after(second, 0)
    assert kept >= 10  # the count went on from the kept value, not from a new map's zero
    assert calls_after(second, 10) == kept + 2 * 10


@pytest.mark.root
def test_a_spec_naming_a_map_the_c_lacks_or_missing_a_define_is_an_error_naming_it(pin_dir):
    pin, state = pin_dir
    bad_map = ProgramSpec(source=COUNTER, cflags=("-DNW_TEST_STEP=1",), name="nwtest_bad",
                          maps=("nwtest_config_v1", "nwtest_nothere_v1"))
    with pytest.raises(LoadError, match="declares no map nwtest_nothere_v1 .*nwtest_calls_v1"):
        load(bad_map, pin, state)
    with pytest.raises(LoadError, match="NW_TEST_STEP comes from the test's ProgramSpec cflags"):
        load(ProgramSpec(source=COUNTER, name="nwtest_bad2"), pin, state)


@pytest.fixture
def child_cgroup():
    path = os.path.join(detect_cgroup2_root(), f"nwtest-{secrets.token_hex(3)}")
    os.mkdir(path)
    try:
        yield path
    finally:
        detach_sock_lb(path)
        os.rmdir(path)


@pytest.mark.root
def test_socket_lb_attaches_by_fd_replaces_on_reattach_and_detaches_by_name(pin_dir, child_cgroup):
    pin, state = pin_dir
    lb = SockLB(pin, MapSizes(services=16, backends=8, revnat=64, lb_stats=64), state_dir=state)
    names = sorted(fn for fn, _ in SockLB.HOOKS)
    assert sorted(attach_sock_lb(lb, child_cgroup)) == names
    first = {p["attach_type"]: p["id"] for p in cgroup_programs(child_cgroup)}
    assert sorted(p["name"] for p in cgroup_programs(child_cgroup)) == names
    attach_cgroup(lb.loaded.prog_fd("nw_connect4"), child_cgroup, "CGROUP_INET4_CONNECT")  # again: replace
    again = cgroup_programs(child_cgroup)
    assert len(again) == len(names) and {p["attach_type"]: p["id"] for p in again} == first
    assert detach_sock_lb(child_cgroup) == len(names)
    assert cgroup_programs(child_cgroup) == []


@pytest.mark.root
def test_cleanup_detaches_what_the_pins_name_and_the_lb_by_name_once_pins_are_gone(pin_dir, child_cgroup):
    pin, state = pin_dir
    lb = SockLB(pin, MapSizes(services=16, backends=8, revnat=64, lb_stats=64), state_dir=state)
    attach_sock_lb(lb, child_cgroup)
    assert {p["id"] for p in cgroup_programs(child_cgroup)} == pinned_program_ids(pin)
    assert detach_loaded(child_cgroup, pin) == len(SockLB.HOOKS)
    assert cgroup_programs(child_cgroup) == []
    attach_sock_lb(lb, child_cgroup)
    lb.close()
    remove_pins(pin)  # attached programs outlive their pins
    assert len(cgroup_programs(child_cgroup)) == len(SockLB.HOOKS)
    assert detach_loaded(child_cgroup, pin) == len(SockLB.HOOKS)
    assert cgroup_programs(child_cgroup) == []


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.root
def test_the_agent_with_default_flags_never_maps_bcc_or_llvm_and_keeps_no_compile_child(sandbox, agent_factory, tmp_path):
    write(tmp_path / "one.json", service("one", ["10.96.7.1"]), endpoint_slice("one", ["10.244.7.7"]))
    agent = agent_factory(tmp_path, pin_suffix="-nobcc").start()  # default flags: observe and rdma on
    wait_for(lambda: agent.services(), 10, what="the Service in the maps")
    attached = {p["name"] for p in cgroup_programs(sandbox.cgroup)}
    assert {"nw_connect4", "nw_sockops"} <= attached  # the LB and the observer really run in this agent
    with open(f"/proc/{agent.proc.pid}/maps") as f:
        mapped = {line.split()[-1] for line in f if "/" in line}
    assert not [m for m in mapped if "libbcc" in m or "LLVM" in m or "clang" in m], sorted(mapped)
    assert _children(agent.proc.pid) == []  # the compile child is gone
