"""`nodewire check` against a real agent's pinned maps and hooks, and the agent's own sampled check
exported as metrics: clean after a sync; a slot deleted behind the agent's back, a program detached,
are named with a non-zero exit (and seen by the agent's check)."""
from __future__ import annotations

import json
import socket
import subprocess
import urllib.request

import numpy as np
import pytest

from agent.datapath.attach import detach_cgroup
from agent.datapath.loader import SockLB
from agent.datapath.maps import addr16, port_be
from tests.conftest import NODEWIRE, wait_for
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nodewire_check(agent, *extra) -> tuple[int, dict]:
    out = subprocess.run([NODEWIRE, "check", "--manifests", str(agent.manifests), "--pin-dir", agent.pin_dir,
                          "--cgroup", agent.cgroup, "-o", "json", *extra], capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_check_is_clean_then_names_a_deleted_slot_and_a_detached_hook(sandbox, agent_factory, tmp_path):
    b = [sandbox.add_pod(f"ck-b{i}") for i in range(3)]
    write(tmp_path / "svc.json", service("ck", ["10.96.50.1"]), endpoint_slice("ck", [p.ip4 for p in b]),
          service("ck2", ["10.96.50.2"]), endpoint_slice("ck2", [b[0].ip4]))
    port = free_port()
    agent = agent_factory(tmp_path, pin_suffix="-check",
                          extra=["--check-interval", "0.5", "--metrics-addr", f"127.0.0.1:{port}", "--no-observe",
                                 "--no-rdma"]).start()
    code, rep = nodewire_check(agent)
    assert (code, rep["clean"], rep["frontends_checked"], rep["kernel_frontends"]) == (0, True, 2, 2), rep
    wait_for(lambda: (agent.status().check or {}).get("runs", 0) >= 1, 20, what="the agent's own check")
    assert agent.status().check["last"]["clean"]

    lb = SockLB.open(agent.pin_dir)
    try:  # slot 2 of 10.96.50.1:80 disappears behind the agent's back
        key = np.zeros(1, lb.services.key_dtype)
        key["address"], key["port"], key["proto"], key["slot"] = addr16("10.96.50.1"), port_be(80), 6, 2
        lb.services.delete_array(key)
    finally:
        lb.close()
    code, rep = nodewire_check(agent)
    assert code == 1 and not rep["clean"]
    assert {d["kind"] for d in rep["drift"]} == {"slot-count", "missing-backend", "orphan-backend"}, rep["drift"]
    assert all(d["frontend"] == "10.96.50.1:80/TCP" and d["service"] == "default/ck"
               for d in rep["drift"] if d["kind"] != "orphan-backend")
    table = subprocess.run([NODEWIRE, "check", "--manifests", str(agent.manifests), "--pin-dir", agent.pin_dir,
                            "--cgroup", agent.cgroup], capture_output=True, text=True)
    assert table.returncode == 1 and "slot-count: 10.96.50.1:80/TCP (default/ck): slot 0 says 3 backends" in table.stdout

    # The agent's sampled check sees it too, and exports it.
    wait_for(lambda: ((agent.status().check or {"totals": {}})["totals"].get("slot-count", 0) >= 1), 20, what="agent check drift")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert 'nodewire_check_drift{kind="slot-count"} 1' in metrics

    fd = SockLB.open(agent.pin_dir)
    try:
        prog = dict((fn, pfd) for fn, pfd, _at in fd.programs())["nw_getpeername4"]
        assert detach_cgroup(agent.cgroup, "CGROUP_INET4_GETPEERNAME", prog)
    finally:
        fd.close()
    code, rep = nodewire_check(agent)
    assert code == 1 and any(d["kind"] == "not-attached" and "nw_getpeername4" in d["detail"] for d in rep["drift"])


def test_check_without_pins_is_an_error_not_clean(tmp_path):
    out = subprocess.run([NODEWIRE, "check", "--manifests", str(tmp_path), "--pin-dir", "/sys/fs/bpf/nw-no-such-pins"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "cannot check" in out.stderr
