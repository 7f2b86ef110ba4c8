"""Which pods opted in to verbs tracing, and where their cgroups are.

Tracing costs the traced process several µs per verbs call (a uprobe trap), so it is per pod and
explicit: the annotation `nodewire.io/rdma-trace: "true"` opts a pod in. The tracer filters by cgroup
v2 id, so each opted-in pod is turned into its cgroup directory. The kubelet names it after the pod
UID, with either cgroup driver:
  systemd:  kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, - → _>.slice
  cgroupfs: kubepods/burstable/pod<uid>
(Guaranteed pods sit directly below kubepods[.slice].)
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("nodewire.rdma.optin")

ANNOTATION = "nodewire.io/rdma-trace"
TRUE_VALUES = {"true", "1", "yes", "on"}


def opted_in(pods, annotation: str = ANNOTATION) -> list:
    """Pods (agent.model Pod) whose annotation says true; a malformed value is logged, not traced."""
    out = []
    for pod in pods:
        value = dict(pod.annotations).get(annotation)
        if value is None:
            continue
        if value.strip().lower() in TRUE_VALUES:
            out.append(pod)
        elif value.strip().lower() not in {"false", "0", "no", "off", ""}:
            log.warning("pod %s: metadata.annotations[%s]: %r is not a boolean; not tracing",
                        pod.key, annotation, value)
    return out


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


def opted_in_cgroups(pods, cgroup_root: str, annotation: str = ANNOTATION) -> list[str]:
    """Cgroup directories of the opted-in pods found on this node (for VerbsTracer.set_cgroups)."""
    out = []
    for pod in opted_in(pods, annotation):
        path = pod_cgroup(cgroup_root, pod.uid)
        if path is None:
            log.info("rdma opt-in pod=%s uid=%s: no cgroup yet", pod.key, pod.uid)
            continue
        out.append(path)
    return out
