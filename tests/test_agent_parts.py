"""The agent as parts, without BPF: a manifest directory → ClusterState → the sync loop → the socket
reconciler over the maps double, with the telemetry and local API parts; parts start in order,
close in reverse, each gives its piece of the status and of /readyz."""
from __future__ import annotations

import secrets
import shutil
import threading

import pytest

from agent.api import call
from agent.components import Component, LocalApi, Manifests, Telemetry
from agent.components.datapath import LBDatapath
from agent.agent import Agent
from agent.config import AgentConfig
from agent.datapath.maps import addr_str
from agent.datapath.reconciler import Reconciler
from nodewire_dev.mapsdouble import MapsDouble
from tests.conftest import wait_for
from tests.manifests import endpoint_slice, service, write


class Recorder(Component):
    """A part that writes down what the agent asked of it, in order."""

    def __init__(self, name: str, journal: list, ready: tuple[bool, str] | None = None):
        self.name, self.journal, self._ready = name, journal, ready

    def start(self, ctx) -> None:
        self.journal.append(("start", self.name, ctx.get("manifests") is not None))

    def close(self) -> None:
        self.journal.append(("close", self.name))

    def after_sync(self, changes, res) -> None:
        self.journal.append(("after_sync", self.name, sorted(k.name for k in changes), res.services))

    def ready(self):
        return self._ready


@pytest.fixture
def agent_parts(tmp_path):
    pin = f"/sys/fs/bpf/nw-parts-{secrets.token_hex(4)}"  # nothing is pinned: no socket LB part
    cfg = AgentConfig(manifests=str(tmp_path), pin_dir=pin, metrics_addr="", observe=False, rdma=False,
                      check_interval=0, node_name="node-a")
    made = []

    def make(parts, double):
        a = Agent(cfg, parts=parts, datapath=LBDatapath(Reconciler(double.services, double.backends)))
        made.append(a)
        return a

    yield make, tmp_path
    for a in made:
        a.stop.set()
        a.state.changed.set()
        a.close()
    shutil.rmtree(cfg.state_dir, ignore_errors=True)


def test_parts_start_in_order_close_in_reverse_and_the_loop_writes_through_the_datapath(agent_parts):
    make, manifests = agent_parts
    write(manifests / "web.json", service("web", ["10.96.0.10"]), endpoint_slice("web", ["10.0.0.1"]))
    journal: list = []
    double = MapsDouble()
    agent = make([Manifests(), Telemetry(), Recorder("a", journal), Recorder("b", journal), LocalApi()], double)
    agent.start()
    assert journal == [("start", "a", True), ("start", "b", True)]
    loop = threading.Thread(target=agent.run, daemon=True)
    loop.start()
    wait_for(lambda: agent.first_sync, 20, what="the first full sync")
    served = {addr_str(k[0]) for k in double.frontends()}
    assert served == {"10.96.0.10"} and journal[2:] == [("after_sync", "a", ["web"], 1), ("after_sync", "b", ["web"], 1)]
    st = agent.status()
    assert st.services == 1 and st.sources["manifests"].synced and st.sources["manifests"].detail["files"] == 1
    assert agent.ready() == (True, "1 services synced")
    assert "services.names" not in call(agent.cfg.api_socket_path, "methods")  # no socket LB part here
    agent.stop.set()
    agent.state.changed.set()
    loop.join(10)
    agent.close()
    assert journal[-2:] == [("close", "b"), ("close", "a")]
    assert agent.part("telemetry").telemetry is not None and agent.part("local_api").server._sock is None


def test_a_part_that_is_not_ready_holds_readyz(agent_parts):
    make, manifests = agent_parts
    write(manifests / "web.json", service("web", ["10.96.0.10"]), endpoint_slice("web", ["10.0.0.1"]))
    agent = make([Manifests(), Recorder("stale", [], ready=(False, "stale since start"))], MapsDouble())
    agent.start()
    threading.Thread(target=agent.run, daemon=True).start()
    wait_for(lambda: agent.first_sync, 20, what="the first full sync")
    assert agent.ready() == (False, "stale since start")


def test_the_config_picks_the_parts_and_their_start_order(tmp_path):
    from agent.components import build

    lb_only = AgentConfig(manifests=str(tmp_path), observe=False, rdma=False, check_interval=0)
    assert [p.name for p in build(lb_only)] == ["manifests", "socket_lb", "privileges", "telemetry", "cni", "local_api"]
    full = AgentConfig(kube=True, devices=("auto",))
    assert [p.name for p in build(full)] == [
        "socket_lb", "privileges", "northsouth", "health", "conntrack", "kube", "telemetry", "drift_check",
        "observer", "cni", "rdma", "local_api"]
