"""An agent with deliberately small maps: a Service that does not fit is refused by name and
counted, the others keep working; `nodewire cleanup` then leaves nothing attached or pinned."""
import json
import os
import subprocess
import time

import pytest

from tests.conftest import NODEWIRE, wait_for
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root


def test_full_map_is_named_and_counted_then_cleanup_removes_everything(sandbox, agent_factory, tmp_path):
    client, b1 = sandbox.add_pod("client"), sandbox.add_pod("b1")
    b1.serve(tcp_ports=[8080])
    write(tmp_path / "small.json", service("small", ["10.96.2.1"]), endpoint_slice("small", [b1.ip4]))
    agent = agent_factory(tmp_path, extra=["--map-size", "services=8", "--map-size", "backends=8"]).start()
    assert client.probe("tcp", "10.96.2.1", 80)["replies"] == {"b1": 1}

    t = time.time()
    big = [f"10.0.9.{i}" for i in range(1, 10)]  # 1 header + 9 slots: cannot fit next to "small"
    write(tmp_path / "big.json", service("big", ["10.96.2.2"]), endpoint_slice("big", big))
    wait_for(lambda: agent.synced_after(t), 10, what="agent took in big.json")
    st = agent.status()
    assert st.counters.sync_errors == 1
    assert st.sync_errors[0].startswith("Service default/big: map nodewire_services_v1 is full")
    assert client.probe("tcp", "10.96.2.1", 80)["replies"] == {"b1": 1}
    assert {s["frontend"] for s in agent.services()} == {"10.96.2.1:80"}

    agent.kill()
    attached = subprocess.run(["bpftool", "-j", "cgroup", "show", sandbox.cgroup], capture_output=True, text=True)
    n = len(json.loads(attached.stdout))  # the 8 socket-LB hooks, and the observer's sock_ops when on
    assert n >= 8
    out = subprocess.run([NODEWIRE, "cleanup", "--pin-dir", agent.pin_dir, "--cgroup", sandbox.cgroup],
                         capture_output=True, text=True, check=True)
    assert f"detached {n} programs" in out.stdout
    shown = subprocess.run(["bpftool", "-j", "cgroup", "show", sandbox.cgroup], capture_output=True, text=True)
    assert json.loads(shown.stdout.strip() or "[]") == []
    assert not os.path.exists(agent.pin_dir)
    # The datapath is gone: the ClusterIP is an ordinary (unrouted) address again.
    assert client.probe("tcp", "10.96.2.1", 80, timeout=0.5)["replies"] == {}
