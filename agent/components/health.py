"""kube-proxy's health servers (export/lbhealth.py): the node's /healthz on --healthz-port and, per
LoadBalancer Service with externalTrafficPolicy Local, its healthCheckNodePort answering how many
endpoints are local. They follow the views the datapath just wrote. On with north-south (--devices)."""
from __future__ import annotations

from .base import Component, Context


class HealthServers(Component):
    name = "health"
    enabled_by = "devices"

    def __init__(self) -> None:
        self.health = None  # export.lbhealth.LBHealth

    def start(self, ctx: Context) -> None:
        from ..export.lbhealth import LBHealth

        self.health = LBHealth(ctx.ready, ctx.cfg.healthz_port).start()

    def after_sync(self, changes, res) -> None:
        for key, view in changes.items():  # view None: the Service is gone
            if view is None:
                self.health.update(key, 0, 0)
            else:
                self.health.update(key, view.health_check_node_port, view.local_endpoints)
        self.health.synced()

    def status(self, st) -> None:
        if st.northsouth is not None:  # where it always was: northsouth.health
            st.northsouth["health"] = self.health.status()

    def close(self) -> None:
        if self.health is not None:
            self.health.close()
