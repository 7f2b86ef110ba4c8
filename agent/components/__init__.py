"""The parts of the agent, in start order (closed in reverse). Each is a Component (base.py); the
agent builds those whose enabled(cfg) is true. See /work/team/components.txt to add one.

Order matters where a part uses another or a shared resource:
  socket_lb     first: loads and attaches the datapath (the privileged step)
  privileges    drops capabilities before any part starts a thread of its own
  northsouth    tc on the node devices (after socket_lb: shares its pins)
  health, conntrack  kube-proxy's health servers and the conntrack collector, beside north-south
  manifests/kube sources: start pushing into ClusterState
  telemetry     the MeterProvider and /metrics; parts after it may use ctx.telemetry in start()
  drift_check, observer, cni, rdma   read the datapath or the state; optional ones never stop the agent
  local_api     last: serves once every part registered its methods (and is closed first)
"""
from __future__ import annotations

from .base import Component, Context, OptionalComponent
from .cni import CniPods
from .conntrack import Conntrack
from .drift import DriftCheck
from .health import HealthServers
from .local_api import LocalApi
from .northsouth import NorthSouth
from .observer import Observer
from .privileges import Privileges
from .rdma import Rdma
from .socket_lb import SocketLB
from .sources import Kube, Manifests
from .telemetry import Telemetry

# Manifests first: its thread reads the files while SocketLB waits for the BPF compile child (issue 19:
# start-up overlaps the two; nothing reads the state before the sync loop, which starts after every part).
ORDER: list[type[Component]] = [Manifests, SocketLB, Privileges, NorthSouth, HealthServers, Conntrack, Kube,
                                Telemetry, DriftCheck, Observer, CniPods, Rdma, LocalApi]


def build(cfg, order: list[type[Component]] | None = None) -> list[Component]:
    """One instance of each part the config enables, in start order."""
    return [cls() for cls in (ORDER if order is None else order) if cls.enabled(cfg)]


__all__ = ["Component", "Context", "OptionalComponent", "ORDER", "build"]
