"""bpf/nodeport.c on the node's devices: load, attach, the SNAT addresses and the packet counters.

The maps the sync writes (frontend slots and backends, per-frontend policy, source ranges, the local
endpoint set, Maglev tables) are planned and written with the socket path's in one plan by the one
writer (datapath.py: NorthSouthMaps, nsplan.py); everything is pinned, so a restarted agent re-learns
it and rewrites only what differs.
"""
from __future__ import annotations

import logging

from ..model.maglev import DEFAULT_TABLE_SIZE
from . import abi
from .attach import TC_EGRESS, TC_INGRESS, attach_tc
from .conntrack import ConntrackMaps, Lifetimes, remove_obsolete_pins, set_snat_addresses
from .datapath import NorthSouthMaps
from .loader import MapSizes, ProgramSpec, load
from .maps import MaglevMap
from .reconciler import Reconciler

log = logging.getLogger("nodewire.nodeport")

TC_PRIO = 0x4e50  # "NP": our filters' priority on the node devices, so we replace/delete only ours
PROGRAMS = ("nw_np_ingress", "nw_np_egress")


def spec(sizes: MapSizes, maglev_size: int, lifetimes: Lifetimes = Lifetimes()) -> ProgramSpec:
    return ProgramSpec(source="nodeport.c", cflags=(*abi.np_defines(sizes, maglev_size),
                                                    *abi.ct_defines(sizes, lifetimes)),
                       programs=tuple((fn, "SCHED_CLS", None) for fn in PROGRAMS), maps=abi.NP_MAPS, name="nodeport")


class NodePortDatapath:
    def __init__(self, pin_dir: str, sizes: MapSizes = MapSizes(), maglev_size: int = DEFAULT_TABLE_SIZE,
                 lifetimes: Lifetimes = Lifetimes()):
        self.maglev_size = maglev_size
        self.loaded = load(spec(sizes, maglev_size, lifetimes), pin_dir)
        remove_obsolete_pins(pin_dir)
        m = self.loaded.maps
        self.snat, self.stats = m[abi.NP_SNAT_MAP], m[abi.NP_STATS_MAP]
        self.conntrack = ConntrackMaps(m[abi.CT_MAP], m[abi.CT_HALFOPEN_MAP], m[abi.CT_STATS_MAP], lifetimes)
        self.maps = NorthSouthMaps(Reconciler(m[abi.NP_SERVICES_MAP], m[abi.NP_BACKENDS_MAP]), m[abi.NP_POLICY_MAP],
                                   m[abi.NP_RANGES_MAP], m[abi.NP_LOCAL_MAP],
                                   MaglevMap(m[abi.NP_MAGLEV_MAP], maglev_size), maglev_size)
        self.devices: dict[str, int] = {}

    def attach(self, devices: list[str]) -> None:
        """clsact ingress+egress on each device, replacing an earlier agent's filters atomically."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for dev in devices:
                filters = [(fn, self.loaded.prog_fd(fn), parent) for fn, parent in zip(PROGRAMS, (TC_INGRESS, TC_EGRESS))]
                try:
                    idx = attach_tc(ipr, dev, filters, TC_PRIO)
                except LookupError:
                    raise LookupError(f"--devices: no interface {dev!r} in this network namespace") from None
                self.devices[dev] = idx

    def set_snat_addresses(self, addresses: list[str]) -> dict[str, str]:
        """The node addresses remote-backend traffic leaves with (lib/ct.h takes a port of the first,
        the next when its ports toward a backend are all taken). Returns the first of each family."""
        return set_snat_addresses(self.snat, addresses)

    # -- views ------------------------------------------------------------------------------------
    @property
    def maglev_groups(self) -> dict[int, tuple[int, ...]]:
        return self.maps.side.tables

    @property
    def tables_built(self) -> int:
        return self.maps.side.tables_built

    @property
    def reconciler(self) -> Reconciler:
        return self.maps.lb

    def counters(self) -> dict[str, int]:
        """Packets per outcome since the maps were created (summed over CPUs)."""
        keys, values = self.stats.dump_summed()
        by_index = dict(zip(keys.tolist(), values.tolist()))
        return {name: int(by_index.get(i, 0)) for i, name in enumerate(abi.NP_OUTCOME_NAMES)}

    def close(self) -> None:
        self.loaded.close()


def detach(devices: list[str]) -> int:
    """Remove our filters from these devices (in this network namespace). Returns how many."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    n = 0
    with IPRoute() as ipr:
        for dev in devices:
            links = ipr.link_lookup(ifname=dev)
            for parent in (TC_INGRESS, TC_EGRESS):
                try:
                    if links:
                        ipr.tc("del-filter", "bpf", links[0], ":1", parent=parent, prio=TC_PRIO)
                        n += 1
                except NetlinkError:
                    pass
    return n
