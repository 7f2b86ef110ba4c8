"""One call that puts the RDMA/GPU-NIC readings on the agent's MeterProvider.

- port counters (agent/rdma/counters.py), read from sysfs at every collection;
- GPU↔NIC topology as a gauge: one series per (GPU, NIC) pair whose value is the class rank
  (0 PIX, 1 PXB, 2 PHB, 3 NODE, 4 SYS) and whose attributes carry the class, NUMA nodes, PCIe roots
  and whether the NIC is among the GPU's closest — the same facts the DRA attributes publish;
- the verbs tracer's completion and error counters when a tracer runs.
"""
from __future__ import annotations

import logging

from .counters import RdmaPortCounters
from .topology import CLASSES, TopologyError, build_topology

log = logging.getLogger("nodewire.rdma.metrics")


def topology_observations(sysfs_root: str = "/sys") -> list[tuple[int, dict]]:
    try:
        topo = build_topology(sysfs_root)
    except TopologyError as e:
        log.warning("rdma topology unreadable err=%s", e)
        return []
    nics = {n.name: n for n in topo.nics}
    out = []
    for g in topo.gpus:
        closest = set(topo.closest_nics(g.pci_address))
        for nic_name, cls in topo.matrix[g.pci_address].items():
            n = nics[nic_name]
            out.append((CLASSES.index(cls), {
                "gpu.pci_address": g.pci_address, "gpu.vendor": g.vendor, "gpu.numa_node": g.numa_node,
                "gpu.pcie_root": g.path.root, "nic.name": nic_name, "nic.pci_address": n.pci_address,
                "nic.numa_node": n.numa_node, "nic.pcie_root": n.path.root, "nic.rdma": bool(n.rdma_devices),
                "pcie.path_class": cls, "nic.closest": nic_name in closest}))
    return out


def register_rdma_metrics(telemetry, sysfs_root: str = "/sys", tracer=None) -> None:
    """Instruments on telemetry's meter (port counters and topology: bounded by the hardware); the
    tracer's per-QP series go through the telemetry producer hook, under its series cap."""
    from opentelemetry.metrics import Observation

    meter = telemetry.meter("nodewire.rdma")
    RdmaPortCounters(sysfs_root).register(meter)
    meter.create_observable_gauge(
        "nodewire.gpu.nic.pcie_distance",
        [lambda _o: [Observation(v, a) for v, a in topology_observations(sysfs_root)]],
        unit="1", description="PCIe path class between a GPU and a NIC: 0 PIX, 1 PXB, 2 PHB, 3 NODE, 4 SYS")
    if tracer is not None:  # histograms and per-QP counters: producer series, under the series cap
        telemetry.add_producer(tracer.metrics)
