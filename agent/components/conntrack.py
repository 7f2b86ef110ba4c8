"""The north-south conntrack collector (datapath/conntrack.py): removes expired entries of nodeport.c's
conntrack maps in batches, more often as they fill. On with north-south, whose maps it collects."""
from __future__ import annotations

from .base import Component, Context


class Conntrack(Component):
    name = "conntrack"
    enabled_by = "devices"

    def __init__(self) -> None:
        self.collector = None  # datapath.conntrack.ConntrackCollector

    def start(self, ctx: Context) -> None:
        from ..datapath.conntrack import ConntrackCollector

        ns = ctx.get("northsouth").service
        self.collector = ConntrackCollector(ns.datapath.conntrack, ctx.cfg.ct_gc_interval).start()

    def metrics(self, telemetry) -> None:
        self.collector.register_metrics(telemetry.meter())

    def status(self, st) -> None:
        if st.northsouth is not None:  # where it always was: northsouth.conntrack
            st.northsouth["conntrack"] = self.collector.status()

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()
