"""Which pods opted in to verbs tracing, and where their cgroups are.

Tracing costs the traced process several µs per verbs call (a uprobe trap), so it is per pod and
explicit: the annotation `nodewire.io/rdma-trace: "true"` opts a pod in. The tracer filters by cgroup
v2 id, so each opted-in pod is turned into its cgroup directory (agent/cgroups.py pod_cgroup).
"""
from __future__ import annotations

import logging

from ..cgroups import pod_cgroup

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
