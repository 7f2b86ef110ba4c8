"""Fixtures for the RDMA tests: sysfs trees with the kernel's real symlink structure."""
from __future__ import annotations

import os

import pytest


class SysfsTree:
    """Builds a fake /sys the way the kernel lays it out: device directories nested under their
    parent bridges below /devices/pciDDDD:BB, and relative symlinks from /bus/pci/devices,
    /class/net/NAME and /class/infiniband/NAME (whose `device` link points back up the tree)."""

    def __init__(self, root: str):
        self.root = root
        self.paths: dict[str, str] = {}        # pci address or root name → directory relative to root

    def _mk(self, rel: str, files: dict[str, str]) -> None:
        d = os.path.join(self.root, rel)
        os.makedirs(d, exist_ok=True)
        for name, text in files.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(text + "\n")

    def host_bridge(self, name: str) -> str:
        self.paths[name] = f"devices/{name}"
        self._mk(self.paths[name], {})
        return name

    def device(self, parent: str, addr: str, cls: int, vendor: int = 0x8086, numa: int = -1) -> str:
        rel = f"{self.paths[parent]}/{addr}"
        self.paths[addr] = rel
        self._mk(rel, {"class": f"0x{cls:06x}", "vendor": f"0x{vendor:04x}", "numa_node": str(numa)})
        link = os.path.join(self.root, "bus/pci/devices", addr)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(self.root, rel), os.path.dirname(link)), link)
        return addr

    def bridge(self, parent: str, addr: str, numa: int = -1) -> str:
        return self.device(parent, addr, 0x060400, 0x10B5, numa)

    def gpu(self, parent: str, addr: str, numa: int = -1, vendor: int = 0x10DE, cls: int = 0x030200) -> str:
        return self.device(parent, addr, cls, vendor, numa)

    def nic(self, parent: str, addr: str, netdev: str | None = None, rdma: str | None = None,
            numa: int = -1, sub: str | None = None) -> str:
        """A NIC function; `sub` puts the class devices below a child (virtio0) as virtio does."""
        self.device(parent, addr, 0x020000, 0x15B3, numa)
        dev_rel = self.paths[addr] + (f"/{sub}" if sub else "")
        if sub:
            self._mk(dev_rel, {})
        for kind, name in (("net", netdev), ("infiniband", rdma)):
            if name is None:
                continue
            own = f"{dev_rel}/{kind}/{name}"
            self._mk(own, {})
            # the kernel's own form: <dev>/<kind>/<name>/device -> ../../../<dev>
            os.symlink(f"../../../{os.path.basename(dev_rel)}", os.path.join(self.root, own, "device"))
            cls_link = os.path.join(self.root, "class", kind, name)
            os.makedirs(os.path.dirname(cls_link), exist_ok=True)
            os.symlink(os.path.relpath(os.path.join(self.root, own), os.path.dirname(cls_link)), cls_link)
        return addr

    def virtual_netdev(self, name: str) -> None:
        own = f"devices/virtual/net/{name}"
        self._mk(own, {})
        cls_link = os.path.join(self.root, "class", "net", name)
        os.makedirs(os.path.dirname(cls_link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(self.root, own), os.path.dirname(cls_link)), cls_link)


@pytest.fixture
def sysfs(tmp_path) -> SysfsTree:
    return SysfsTree(str(tmp_path / "sys"))
