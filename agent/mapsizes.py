"""The capacities (max_entries) of the pinned maps: a config key (`map-size`) that the loader turns
into the -D flags of the C programs. Here, apart from both, so the configuration imports nothing of
the datapath and the datapath nothing of the configuration."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MapSizes:
    services: int = 1 << 20   # slots: one header + one per backend, per frontend
    backends: int = 1 << 20
    revnat: int = 1 << 18
    lb_stats: int = 1 << 16
    affinity: int = 1 << 16   # (client pod, Service) pairs with session affinity
    ct: int = 1 << 18         # north-south conntrack entries of confirmed flows (two per flow)
    ct_halfopen: int = 1 << 16  # north-south conntrack entries of flows not yet confirmed (a flood's)
