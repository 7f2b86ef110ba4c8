"""A sandbox cluster on one machine: pods are network namespaces with veths on a bridge.

The bridge lives in a dedicated "node" namespace, so nothing is added to the host's network
namespace; every pod's processes run in a child cgroup of the sandbox's own cgroup, which is where
the agent attaches its socket programs. Everything is named with a per-run prefix and removed by
close(), also after a failure.
"""
from .cluster import Pod, Sandbox

__all__ = ["Pod", "Sandbox"]
