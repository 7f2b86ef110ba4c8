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
        self._lb_mode = "snat"

    def start(self, ctx: Context) -> None:
        from ..datapath.conntrack import Lifetimes
        from ..northsouth import NorthSouthService

        cfg = ctx.cfg
        self._lb_mode = getattr(cfg, "lb_mode", "snat")  # issue 21's key (dsr-data's config)
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
            from ..export.northsouth import dsr_summary

            st.northsouth = self.service.status()
            st.northsouth["dsr"] = dsr_summary(st.northsouth.get("counters") or {}, self._lb_mode)

    def metrics(self, telemetry) -> None:
        if self.service is not None:  # packets per outcome, node addresses, DSR (export/northsouth.py)
            from ..export.northsouth import register_dsr_metrics

            self.service.metrics(telemetry.meter())
            register_dsr_metrics(telemetry.meter(), self.service, self._lb_mode)

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
