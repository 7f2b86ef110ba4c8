"""RDMA port counters from sysfs, as OTel observable counters read at collection time.

Each RDMA port has two counter directories: `counters/` (the InfiniBand PortCounters the kernel
reads through MADs or the driver) and `hw_counters/` (driver-specific: for mlx5 the RoCE congestion
counters `np_cnp_sent`, `rp_cnp_handled`, `np_ecn_marked_roce_packets`, and transport errors like
`out_of_sequence`, `packet_seq_err`). Bytes and packets get their own instruments; every other file
is exported under one `nodewire.rdma.port.events` instrument with the file name as the `counter`
attribute, so a new driver counter shows up without a code change.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("nodewire.rdma.counters")

# port_xmit_data / port_rcv_data count octets divided by 4 (IBA PortCounters PortXmitData, "in units
# of 32-bit words"; Linux Documentation/ABI/stable/sysfs-class-infiniband says the same).
DATA_WORD_BYTES = 4
IO_FILES = {"port_xmit_data": "transmit", "port_rcv_data": "receive"}
PACKET_FILES = {"port_xmit_packets": "transmit", "port_rcv_packets": "receive"}
# Files in hw_counters that are settings, not counters.
NOT_COUNTERS = {"lifespan"}


@dataclass(frozen=True)
class PortCounter:
    device: str        # mlx5_0
    port: str          # "1"
    source: str        # "counters" or "hw_counters"
    name: str          # port_rcv_errors
    value: int


class RdmaPortCounters:
    """Reads every port's counter files under <sysfs_root>/class/infiniband on each call."""

    def __init__(self, sysfs_root: str = "/sys"):
        self.base = os.path.join(sysfs_root, "class", "infiniband")
        self._warned: set[str] = set()

    def available(self) -> bool:
        return os.path.isdir(self.base)

    def read(self) -> list[PortCounter]:
        out: list[PortCounter] = []
        for dev in _listdir(self.base):
            ports = os.path.join(self.base, dev, "ports")
            for port in _listdir(ports):
                for source in ("counters", "hw_counters"):
                    d = os.path.join(ports, port, source)
                    for name in _listdir(d):
                        if name in NOT_COUNTERS:
                            continue
                        value = self._value(os.path.join(d, name))
                        if value is not None:
                            out.append(PortCounter(dev, port, source, name, value))
        return out

    def _value(self, path: str) -> int | None:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError as e:       # some counters return EINVAL/EOPNOTSUPP on ports that lack them
            self._warn_once(path, f"unreadable err={e.strerror}")
            return None
        try:
            return int(text, 0)
        except ValueError:
            self._warn_once(path, f"not a number value={text[:40]!r}")
            return None

    def _warn_once(self, path: str, what: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            log.warning("rdma counter skipped file=%s %s", path, what)

    def register(self, meter) -> None:
        """Create the observable counters on `meter` (from Telemetry.meter())."""
        from opentelemetry.metrics import Observation

        def attrs(c: PortCounter) -> dict:
            return {"rdma.device": c.device, "rdma.port": c.port}

        def io(_options):
            return [Observation(c.value * DATA_WORD_BYTES,
                                {**attrs(c), "network.io.direction": IO_FILES[c.name]})
                    for c in self.read() if c.source == "counters" and c.name in IO_FILES]

        def packets(_options):
            return [Observation(c.value, {**attrs(c), "network.io.direction": PACKET_FILES[c.name]})
                    for c in self.read() if c.source == "counters" and c.name in PACKET_FILES]

        def events(_options):
            return [Observation(c.value, {**attrs(c), "counter": c.name, "source": c.source})
                    for c in self.read()
                    if not (c.source == "counters" and (c.name in IO_FILES or c.name in PACKET_FILES))]

        meter.create_observable_counter("nodewire.rdma.port.io", [io], unit="By",
                                        description="Bytes through an RDMA port (port_xmit_data/port_rcv_data × 4)")
        meter.create_observable_counter("nodewire.rdma.port.packets", [packets], unit="{packet}",
                                        description="Packets through an RDMA port")
        meter.create_observable_counter("nodewire.rdma.port.events", [events], unit="{event}",
                                        description="Every other RDMA port counter (errors, CNP/ECN, "
                                                    "sequence errors), by sysfs file name")


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
