"""Where a pod's processes live in the cgroup v2 tree: the kubelet names the pod-level cgroup after the
pod UID, with either cgroup driver:
  systemd:  kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, - → _>.slice
  cgroupfs: kubepods/burstable/pod<uid>
(Guaranteed pods sit directly below kubepods[.slice].) Used by the observer (hostNetwork pods named by
cgroup) and the RDMA tracer (opted-in pods), neither of which owns it.
"""
from __future__ import annotations

import os


def pod_cgroup(cgroup_root: str, uid: str) -> str | None:
    """The pod-level cgroup directory for a pod UID under the kubelet's hierarchy, or None."""
    if not uid:
        return None
    names = {f"pod{uid}", f"pod{uid.replace('-', '_')}"}
    for top in ("kubepods.slice", "kubepods"):
        base = os.path.join(cgroup_root, top)
        if not os.path.isdir(base):
            continue
        for qos in ("", "burstable", "besteffort"):
            d = base
            if qos:
                d = os.path.join(base, f"kubepods-{qos}.slice" if top.endswith(".slice") else qos)
            try:
                entries = os.listdir(d)
            except OSError:
                continue
            for e in entries:
                stem = e[:-len(".slice")] if e.endswith(".slice") else e
                if any(stem == n or stem.endswith("-" + n) for n in names):
                    return os.path.join(d, e)
    return None
