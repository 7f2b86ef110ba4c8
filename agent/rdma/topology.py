"""GPU ↔ NIC distance on the PCIe tree, read from sysfs.

A collective's speed depends on whether a GPU reaches its RDMA NIC through its own PCIe switch or
across the CPU. sysfs already holds the tree: every PCI device's directory sits under its parent
bridge's, below one `pciDDDD:BB` directory per host bridge (root complex). We walk realpaths, so the
same code reads `/sys` and a fixture tree a test builds (`sysfs_root`).

Classes follow `nvidia-smi topo -m`'s legend:
  PIX  the path crosses at most one PCIe switch
  PXB  the path crosses several PCIe switches but no host bridge
  PHB  the path crosses a PCIe host bridge (the two meet at a root complex)
  NODE the two sit under different host bridges of one NUMA node
  SYS  the two sit on different NUMA nodes (crosses the inter-socket link)

Bridge roles come from depth, because PCIe is point to point: below a root complex the first bridge
is a root port; under a root port the next bridge is a switch's upstream port; its child bridges are
that switch's downstream ports; below those either an endpoint or the next switch's upstream port.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

PCI_ADDR = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
PCI_ROOT = re.compile(r"^pci[0-9a-f]{4}:[0-9a-f]{2}$")

GPU_VENDORS = {0x10DE: "nvidia", 0x1002: "amd"}
CLASS_DISPLAY = 0x03            # PCI base class: display controller (VGA 0x0300, 3D 0x0302: A100/H100)
CLASS_ACCEL = 0x12              # processing accelerator: AMD Instinct MI300X enumerates as 0x1200
CLASS_BRIDGE_PCI = 0x0604       # PCI-to-PCI bridge (root ports and switch ports)

# Closest first: the order nvidia-smi's legend gives, best to worst.
CLASSES = ("PIX", "PXB", "PHB", "NODE", "SYS")

# DRA attribute names: the Kubernetes-standard PCIe root key, and DraNet's (dra.net) own keys.
ATTR_PCIE_ROOT = "resource.kubernetes.io/pcieRoot"
ATTR_RDMA = "dra.net/rdma"
ATTR_NUMA = "dra.net/numaNode"


class TopologyError(ValueError):
    """A sysfs entry that cannot be placed on the PCI tree; names the path."""


@dataclass(frozen=True)
class PciPath:
    """Where a device sits: its root complex and the chain of PCI devices down to it."""
    root: str                      # "pci0000:00"
    chain: tuple[str, ...]         # ("0000:00:01.0", "0000:01:00.0", ..., the device itself)

    @property
    def address(self) -> str:
        return self.chain[-1]


@dataclass
class Gpu:
    pci_address: str
    vendor: str
    pci_class: int
    numa_node: int
    path: PciPath = field(repr=False)

    def attributes(self) -> dict:
        return {ATTR_PCIE_ROOT: self.path.root, ATTR_NUMA: self.numa_node}


@dataclass
class Nic:
    name: str                      # the RDMA device name when there is one (mlx5_0), else the netdev
    pci_address: str
    numa_node: int
    netdevs: list[str]
    rdma_devices: list[str]
    path: PciPath = field(repr=False)

    def attributes(self) -> dict:
        return {ATTR_PCIE_ROOT: self.path.root, ATTR_RDMA: bool(self.rdma_devices),
                ATTR_NUMA: self.numa_node}


@dataclass
class Topology:
    gpus: list[Gpu]
    nics: list[Nic]
    matrix: dict[str, dict[str, str]]      # gpu pci address → nic name → class

    def closest_nics(self, gpu_address: str) -> list[str]:
        """The NIC(s) of the best class for this GPU (several when they tie)."""
        row = self.matrix.get(gpu_address, {})
        if not row:
            return []
        best = min(CLASSES.index(c) for c in row.values())
        return sorted(n for n, c in row.items() if CLASSES.index(c) == best)

    def to_json(self) -> dict:
        return {
            "gpus": [{"pci_address": g.pci_address, "vendor": g.vendor, "class": f"0x{g.pci_class:06x}",
                      "numa_node": g.numa_node, "pcie_root": g.path.root,
                      "closest_nics": self.closest_nics(g.pci_address), "attributes": g.attributes()}
                     for g in self.gpus],
            "nics": [{"name": n.name, "pci_address": n.pci_address, "numa_node": n.numa_node,
                      "netdevs": n.netdevs, "rdma_devices": n.rdma_devices, "pcie_root": n.path.root,
                      "attributes": n.attributes()}
                     for n in self.nics],
            "matrix": self.matrix,
        }


def dra_typed(attrs: dict) -> dict:
    """Attribute values in the DRA DeviceAttribute form ({"bool": …} / {"int": …} / {"string": …})."""
    def one(v):
        if isinstance(v, bool):
            return {"bool": v}
        if isinstance(v, int):
            return {"int": v}
        return {"string": str(v)}
    return {k: one(v) for k, v in attrs.items()}


def _dns_label(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63]


def resource_slice(topo: "Topology", node_name: str, driver: str = "nodewire.io") -> dict:
    """A resource.k8s.io/v1 ResourceSlice listing this node's NICs and GPUs with their PCIe root and
    NUMA node, so a claim can ask for a GPU and a NIC that share `resource.kubernetes.io/pcieRoot`
    (matchAttribute) — the attributes DraNet and the GPU DRA drivers publish, computed from sysfs."""
    devices = []
    for n in topo.nics:
        attrs = {**n.attributes(), "dra.net/ifName": n.netdevs[0] if n.netdevs else "",
                 "dra.net/pciAddress": n.pci_address}
        devices.append({"name": _dns_label(f"nic-{n.name}"), "attributes": dra_typed(attrs)})
    for g in topo.gpus:
        attrs = {**g.attributes(), "nodewire.io/pciAddress": g.pci_address, "nodewire.io/vendor": g.vendor,
                 "nodewire.io/closestNics": ",".join(topo.closest_nics(g.pci_address))}
        devices.append({"name": _dns_label(f"gpu-{g.pci_address}"), "attributes": dra_typed(attrs)})
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": _dns_label(f"{node_name}-{driver}-pcie")},
            "spec": {"driver": driver, "nodeName": node_name,
                     "pool": {"name": node_name, "generation": 1, "resourceSliceCount": 1},
                     "devices": devices}}


def _read(path: str, default: str | None = None) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _hex(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text, 16)
    except ValueError:
        raise TopologyError(f"{path}: {text!r} is not a hex number") from None


def pci_path(device_dir: str) -> PciPath | None:
    """The PCI placement of a sysfs device directory (after resolving symlinks), or None if it is
    not on a PCI bus (virtual netdevs). A netdev on a virtio or auxiliary device sits below its PCI
    function: the deepest PCI address on the way is the device."""
    parts = os.path.realpath(device_dir).split(os.sep)
    roots = [i for i, p in enumerate(parts) if PCI_ROOT.match(p)]
    if not roots:
        return None
    i = roots[-1]
    chain = []
    for p in parts[i + 1:]:
        if not PCI_ADDR.match(p):
            break
        chain.append(p)
    if not chain:
        return None
    return PciPath(parts[i], tuple(chain))


def _numa(device_dir: str) -> int:
    text = _read(os.path.join(device_dir, "numa_node"), "-1")
    try:
        return int(text)
    except ValueError:
        raise TopologyError(f"{device_dir}/numa_node: {text!r} is not a number") from None


def _switch_of(path: PciPath, depth: int) -> str | None:
    """The switch a bridge at `depth` in the chain belongs to (named by its upstream port), or None
    for a root port (depth 0). Upstream ports are at odd depths, downstream ports at even ones."""
    if depth == 0:
        return None
    return path.chain[depth] if depth % 2 == 1 else path.chain[depth - 1]


def classify(a: PciPath, numa_a: int, b: PciPath, numa_b: int) -> str:
    """The nvidia-smi class of the PCIe path between two devices."""
    if a.root != b.root:
        return "NODE" if numa_a == numa_b else "SYS"
    common = 0
    while common < min(len(a.chain), len(b.chain)) - 1 and a.chain[common] == b.chain[common]:
        common += 1
    if common == 0:
        return "PHB"            # they meet at the root complex: different root ports
    # Bridges on the path: the deepest shared ancestor, and each side's ancestors below it.
    depths = [(a, d) for d in range(common - 1, len(a.chain) - 1)]
    depths += [(b, d) for d in range(common, len(b.chain) - 1)]
    if any(d == 0 for _, d in depths):
        return "PHB"            # the path includes a root port: it is part of the host bridge
    switches = {_switch_of(p, d) for p, d in depths}
    return "PIX" if len(switches) <= 1 else "PXB"


def _pci_devices(sysfs_root: str) -> list[str]:
    base = os.path.join(sysfs_root, "bus", "pci", "devices")
    try:
        return [os.path.join(base, n) for n in sorted(os.listdir(base))]
    except FileNotFoundError:
        return []


def find_gpus(sysfs_root: str = "/sys") -> list[Gpu]:
    gpus = []
    for dev in _pci_devices(sysfs_root):
        cls = _hex(os.path.join(dev, "class"))
        vendor = _hex(os.path.join(dev, "vendor"))
        if cls is None or vendor is None or cls >> 16 not in (CLASS_DISPLAY, CLASS_ACCEL) \
                or vendor not in GPU_VENDORS:
            continue
        path = pci_path(dev)
        if path is None:
            raise TopologyError(f"{dev}: not below a pciDDDD:BB root complex")
        gpus.append(Gpu(path.address, GPU_VENDORS[vendor], cls, _numa(dev), path))
    return sorted(gpus, key=lambda g: g.pci_address)


def find_nics(sysfs_root: str = "/sys") -> list[Nic]:
    """PCI network functions, seen through /sys/class/net and /sys/class/infiniband, one per PCI
    function (a ConnectX port shows up as both `ens1f0np0` and `mlx5_0`)."""
    by_addr: dict[str, Nic] = {}
    for kind in ("infiniband", "net"):
        base = os.path.join(sysfs_root, "class", kind)
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            continue
        for name in names:
            dev = os.path.join(base, name, "device")
            if not os.path.exists(dev):
                continue                     # virtual interfaces (lo, veth, bridges) have no device
            path = pci_path(dev)
            if path is None:
                continue
            nic = by_addr.get(path.address)
            if nic is None:
                pci_dir = _device_dir(dev, path)
                nic = by_addr[path.address] = Nic(name, path.address, _numa(pci_dir), [], [], path)
            (nic.rdma_devices if kind == "infiniband" else nic.netdevs).append(name)
    return sorted(by_addr.values(), key=lambda n: (n.pci_address, n.name))


def _device_dir(dev_link: str, path: PciPath) -> str:
    """The PCI function's own directory (the link may point at a child such as virtio0)."""
    real = os.path.realpath(dev_link)
    while os.path.basename(real) != path.address:
        real = os.path.dirname(real)
    return real


def build_topology(sysfs_root: str = "/sys") -> Topology:
    gpus, nics = find_gpus(sysfs_root), find_nics(sysfs_root)
    names = [n.name for n in nics]
    if len(set(names)) != len(names):
        raise TopologyError(f"{sysfs_root}: two NICs share a name: {sorted(names)}")
    matrix = {g.pci_address: {n.name: classify(g.path, g.numa_node, n.path, n.numa_node) for n in nics}
              for g in gpus}
    return Topology(gpus, nics, matrix)


def render_table(topo: Topology) -> str:
    """A matrix like `nvidia-smi topo -m`: one row per GPU, one column per NIC, then the legend."""
    if not topo.gpus:
        return "no GPUs found" + (f" (NICs: {', '.join(n.name for n in topo.nics)})" if topo.nics else "")
    nic_names = [n.name for n in topo.nics]
    head = ["GPU", "NUMA"] + nic_names + ["closest"]
    rows = [[g.pci_address, str(g.numa_node)] + [topo.matrix[g.pci_address][n] for n in nic_names]
            + [",".join(topo.closest_nics(g.pci_address)) or "-"] for g in topo.gpus]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    lines.append("")
    lines.append("PIX ≤1 PCIe switch · PXB several switches · PHB via host bridge · "
                 "NODE across host bridges in a NUMA node · SYS across NUMA nodes")
    return "\n".join(lines)
