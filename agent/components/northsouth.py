"""North-south: NodePort, externalIPs and LoadBalancer IPs served by tc on the node devices, the node's
addresses followed live (agent/northsouth.py). On when --devices is given; the health servers
(health.py) and the conntrack collector (conntrack.py) are parts of their own beside it."""
from __future__ import annotations

from .base import Component, Context


class NorthSouth(Component):
    name = "northsouth"
    enabled_by = "devices"

    def __init__(self) -> None:
        self.service = None  # agent.northsouth.NorthSouthService

    def start(self, ctx: Context) -> None:
        from ..datapath.conntrack import Lifetimes
        from ..northsouth import NorthSouthService

        cfg = ctx.cfg
        lifetimes = Lifetimes(cfg.ct_timeout_syn, cfg.ct_timeout_established, cfg.ct_timeout_close,
                              cfg.ct_timeout_other)
        self.service = NorthSouthService(ctx.state, cfg.node_name, cfg.device_list, cfg.pin_dir, cfg.sizes,
                                         cfg.nodeport_bounds, cfg.maglev_table_size, lifetimes)

    def after_sync(self, changes, res) -> None:
        """The views' errors, kept for the status."""
        if self.service is not None:
            self.service.after_sync(changes, res)

    def status(self, st) -> None:
        if self.service is not None:
            st.northsouth = self.service.status()

    def metrics(self, telemetry) -> None:
        if self.service is not None:  # packets per outcome, node addresses (export/northsouth.py)
            self.service.metrics(telemetry.meter())

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
