"""Per-pod opt-in: annotation → pod → its kubelet cgroup directory (both cgroup drivers)."""
from __future__ import annotations

import logging

from agent.model.objects import ObjectKey, Pod
from agent.rdma.optin import ANNOTATION, opted_in, opted_in_cgroups, pod_cgroup

UID_A = "0f3c6a2e-8d1b-4c55-9a0e-2b7f1d9c4e11"
UID_B = "7a1e9c30-55aa-4d2c-b6f1-0c9e2d4b8a77"
UID_C = "c2d4e6f8-1a3b-4c5d-8e9f-0a1b2c3d4e5f"


def pod(name, uid, value=None):
    ann = ((ANNOTATION, value),) if value is not None else ()
    return Pod(ObjectKey("ml", name), ("10.244.1.5",), "node-a", (), ann, uid)


def test_annotation_values(caplog):
    pods = [pod("a", UID_A, "true"), pod("b", UID_B, "False"), pod("c", UID_C), pod("d", "x", "maybe"),
            pod("e", "y", " Yes ")]
    assert [p.key.name for p in opted_in(pods)] == ["a", "e"]
    assert f"pod ml/d: metadata.annotations[{ANNOTATION}]: 'maybe' is not a boolean" in caplog.text


def test_cgroup_dirs_systemd_and_cgroupfs(tmp_path):
    sysd = tmp_path / "systemd"
    a = sysd / "kubepods.slice/kubepods-burstable.slice" / f"kubepods-burstable-pod{UID_A.replace('-', '_')}.slice"
    b = sysd / "kubepods.slice" / f"kubepods-pod{UID_B.replace('-', '_')}.slice"           # Guaranteed
    cfs = tmp_path / "cgroupfs"
    c = cfs / "kubepods/besteffort" / f"pod{UID_C}"
    for d in (a, b, c, a / "cri-containerd-abc.scope"):
        d.mkdir(parents=True)
    assert pod_cgroup(str(sysd), UID_A) == str(a)
    assert pod_cgroup(str(sysd), UID_B) == str(b)
    assert pod_cgroup(str(cfs), UID_C) == str(c)
    assert pod_cgroup(str(cfs), UID_A) is None and pod_cgroup(str(sysd), "") is None
    pods = [pod("a", UID_A, "true"), pod("b", UID_B, "true"), pod("c", UID_C, "true"), pod("n", UID_A)]
    assert opted_in_cgroups(pods, str(sysd)) == [str(a), str(b)]


def test_no_kubelet_hierarchy(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert opted_in_cgroups([pod("a", UID_A, "true")], str(tmp_path)) == []
    assert f"pod=ml/a uid={UID_A}: no cgroup yet" in caplog.text
