"""GPU↔NIC classification on fixture sysfs trees shaped like real machines (no root needed)."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from agent.rdma.topology import (ATTR_NUMA, ATTR_PCIE_ROOT, ATTR_RDMA, TopologyError,
                                 build_topology)


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


def dgx_like(t):
    """Two sockets, two root complexes each; every root port feeds a top PCIe switch with two leaf
    switches, each leaf holding one GPU and one ConnectX NIC (as on DGX H100-class boards).
    Also a BMC VGA and an NVMe drive that must not show up."""
    gpus, nics = [], []
    for r, (root, numa) in enumerate((("pci0000:10", 0), ("pci0000:30", 0),
                                      ("pci0000:90", 1), ("pci0000:b0", 1))):
        bus = int(root[-2:], 16)
        t.host_bridge(root)
        rp = t.bridge(root, f"0000:{bus:02x}:01.0", numa)
        top = t.bridge(rp, f"0000:{bus + 1:02x}:00.0", numa)
        for leaf in range(2):
            dsp = t.bridge(top, f"0000:{bus + 2:02x}:{leaf:02x}.0", numa)
            lusp = t.bridge(dsp, f"0000:{bus + 3 + 4 * leaf:02x}:00.0", numa)
            gdsp = t.bridge(lusp, f"0000:{bus + 4 + 4 * leaf:02x}:00.0", numa)
            ndsp = t.bridge(lusp, f"0000:{bus + 4 + 4 * leaf:02x}:01.0", numa)
            gpus.append(t.gpu(gdsp, f"0000:{bus + 5 + 4 * leaf:02x}:00.0", numa))
            i = 2 * r + leaf
            nics.append(t.nic(ndsp, f"0000:{bus + 6 + 4 * leaf:02x}:00.0",
                              netdev=f"ibp{bus + 6 + 4 * leaf}s0", rdma=f"mlx5_{i}", numa=numa))
    # distractors on socket 0's first root complex: BMC VGA (ASPEED) and NVMe
    t.device("pci0000:10", "0000:10:02.0", 0x030000, 0x1A03, 0)
    t.device("pci0000:10", "0000:10:03.0", 0x010802, 0x144D, 0)
    t.virtual_netdev("lo")
    return gpus, nics


def test_dgx_like_full_matrix(sysfs):
    gpus, nics = dgx_like(sysfs)
    topo = build_topology(sysfs.root)
    assert [g.pci_address for g in topo.gpus] == sorted(gpus)
    assert [n.name for n in topo.nics] == [f"mlx5_{i}" for i in range(8)]
    expected = rows("""
        PIX  PXB  NODE NODE SYS  SYS  SYS  SYS
        PXB  PIX  NODE NODE SYS  SYS  SYS  SYS
        NODE NODE PIX  PXB  SYS  SYS  SYS  SYS
        NODE NODE PXB  PIX  SYS  SYS  SYS  SYS
        SYS  SYS  SYS  SYS  PIX  PXB  NODE NODE
        SYS  SYS  SYS  SYS  PXB  PIX  NODE NODE
        SYS  SYS  SYS  SYS  NODE NODE PIX  PXB
        SYS  SYS  SYS  SYS  NODE NODE PXB  PIX
    """)
    got = [[topo.matrix[g][f"mlx5_{i}"] for i in range(8)] for g in gpus]
    assert got == expected
    for i, g in enumerate(gpus):
        assert topo.closest_nics(g) == [f"mlx5_{i}"]
    nic0 = topo.nics[0]
    assert nic0.netdevs == ["ibp22s0"] and nic0.rdma_devices == ["mlx5_0"]
    assert nic0.attributes() == {ATTR_PCIE_ROOT: "pci0000:10", ATTR_RDMA: True, ATTR_NUMA: 0}
    assert topo.gpus[7].attributes() == {ATTR_PCIE_ROOT: "pci0000:b0", ATTR_NUMA: 1}


def test_single_root_workstation(sysfs):
    """One root complex: an AMD GPU on one root port, a NIC on another, an onboard NIC integrated in
    the root complex, an Intel iGPU (not a GPU we count), and a virtio NIC whose netdev hangs below
    virtio0."""
    t = sysfs
    t.host_bridge("pci0000:00")
    t.device("pci0000:00", "0000:00:02.0", 0x030000, 0x8086)              # Intel iGPU
    rp1 = t.bridge("pci0000:00", "0000:00:01.0")
    gpu = t.gpu(rp1, "0000:01:00.0", vendor=0x1002, cls=0x030000)
    rp2 = t.bridge("pci0000:00", "0000:00:1c.0")
    t.nic(rp2, "0000:02:00.0", netdev="enp2s0f0np0", rdma="rocep2s0f0")
    t.nic(rp2, "0000:02:00.1", netdev="enp2s0f1np1")                       # no RDMA on this port
    t.nic("pci0000:00", "0000:00:1f.6", netdev="eno1")
    t.nic("pci0000:00", "0000:00:03.0", netdev="eth0", sub="virtio0")
    topo = build_topology(t.root)
    assert [(g.pci_address, g.vendor) for g in topo.gpus] == [(gpu, "amd")]
    assert topo.matrix == {gpu: {"eno1": "PHB", "eth0": "PHB", "rocep2s0f0": "PHB",
                                 "enp2s0f1np1": "PHB"}}
    by = {n.name: n for n in topo.nics}
    assert by["rocep2s0f0"].netdevs == ["enp2s0f0np0"]
    assert by["enp2s0f1np1"].attributes()[ATTR_RDMA] is False
    assert by["eth0"].pci_address == "0000:00:03.0"
    assert topo.closest_nics(gpu) == ["eno1", "enp2s0f1np1", "eth0", "rocep2s0f0"]


def test_nested_switches(sysfs):
    """Switch A under a root port; below it a NIC directly, and switch B holding a GPU and a NIC, and
    switch C below B holding another GPU. A second root port of the same root complex has a NIC, and
    a second root complex on the same NUMA node another."""
    t = sysfs
    t.host_bridge("pci0000:00")
    t.host_bridge("pci0000:40")
    rp = t.bridge("pci0000:00", "0000:00:01.0", 0)
    a = t.bridge(rp, "0000:01:00.0", 0)
    a0, a1 = t.bridge(a, "0000:02:00.0", 0), t.bridge(a, "0000:02:01.0", 0)
    t.nic(a0, "0000:03:00.0", rdma="nicA", numa=0)
    b = t.bridge(a1, "0000:04:00.0", 0)
    b0, b1, b2 = (t.bridge(b, f"0000:05:0{i}.0", 0) for i in range(3))
    g1 = t.gpu(b0, "0000:06:00.0", 0)
    t.nic(b1, "0000:07:00.0", rdma="nicB", numa=0)
    c = t.bridge(b2, "0000:08:00.0", 0)
    c0 = t.bridge(c, "0000:09:00.0", 0)
    g2 = t.gpu(c0, "0000:0a:00.0", 0, vendor=0x1002, cls=0x120000)   # an MI300X-style accelerator
    rp2 = t.bridge("pci0000:00", "0000:00:02.0", 0)
    t.nic(rp2, "0000:0b:00.0", rdma="nicRP", numa=0)
    rp3 = t.bridge("pci0000:40", "0000:40:01.0", 0)
    t.nic(rp3, "0000:41:00.0", rdma="nicOther", numa=0)
    topo = build_topology(t.root)
    assert topo.matrix == {
        g1: {"nicA": "PXB", "nicB": "PIX", "nicRP": "PHB", "nicOther": "NODE"},
        g2: {"nicA": "PXB", "nicB": "PXB", "nicRP": "PHB", "nicOther": "NODE"},
    }
    assert topo.closest_nics(g2) == ["nicA", "nicB"]
    assert [g.vendor for g in topo.gpus] == ["nvidia", "amd"]


def test_bad_class_file_names_path(sysfs):
    t = sysfs
    t.host_bridge("pci0000:00")
    t.gpu("pci0000:00", "0000:00:01.0")
    with open(f"{t.root}/devices/pci0000:00/0000:00:01.0/class", "w") as f:
        f.write("display\n")
    with pytest.raises(TopologyError, match=r"0000:00:01.0/class: 'display' is not a hex number"):
        build_topology(t.root)


def test_cli_json_and_table(sysfs):
    from agent.cli import main
    gpus, _ = dgx_like(sysfs)
    res = CliRunner().invoke(main, ["topo", "--sysfs-root", sysfs.root, "-o", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert set(doc) >= {"gpus", "nics", "matrix"}
    assert doc["matrix"][gpus[2]]["mlx5_3"] == "PXB"
    assert doc["gpus"][0]["closest_nics"] == ["mlx5_0"]
    res = CliRunner().invoke(main, ["topo", "--sysfs-root", sysfs.root])
    assert res.exit_code == 0, res.output
    first = res.output.splitlines()[1].split()
    assert first[:4] == [gpus[0], "0", "PIX", "PXB"] and first[-1] == "mlx5_0"


def test_resource_slice(sysfs):
    from agent.cli import main
    gpus, _ = dgx_like(sysfs)
    res = CliRunner().invoke(main, ["topo", "--sysfs-root", sysfs.root, "-o", "resourceslice",
                                    "--node-name", "gpu-node-1"])
    assert res.exit_code == 0, res.output
    rs = json.loads(res.output)
    assert rs["apiVersion"] == "resource.k8s.io/v1" and rs["spec"]["nodeName"] == "gpu-node-1"
    devs = {d["name"]: d["attributes"] for d in rs["spec"]["devices"]}
    assert len(devs) == 16
    nic0, gpu0 = devs["nic-mlx5-0"], devs["gpu-0000-15-00-0"]
    assert nic0[ATTR_RDMA] == {"bool": True} and nic0[ATTR_NUMA] == {"int": 0}
    assert nic0["dra.net/ifName"] == {"string": "ibp22s0"}
    # a claim with matchAttribute pcieRoot pairs GPU 0 with the NICs of its root complex
    same_root = sorted(n for n, a in devs.items() if n.startswith("nic-")
                       and a[ATTR_PCIE_ROOT] == gpu0[ATTR_PCIE_ROOT])
    assert same_root == ["nic-mlx5-0", "nic-mlx5-1"]
    assert gpu0["nodewire.io/closestNics"] == {"string": "mlx5_0"}
    assert all(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) for n in devs)
