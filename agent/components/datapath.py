"""The datapath the sync loop drives (the seam: /work/team/cp-seam.txt, agent/sync_loop.py Datapath):
the one writer of agent/datapath/datapath.py over the socket LB's maps and, when north-south is on,
nodeport.c's maps, plus the map fill the loop's status reads."""
from __future__ import annotations

from ..datapath.datapath import Datapath
from ..status import MapFill


class LBDatapath(Datapath):
    def fill(self) -> dict[str, MapFill]:
        rec = self.socket
        s, b = rec.maps.services, rec.maps.backends
        return {s.name: MapFill(rec.svc_entries, s.capacity), b.name: MapFill(rec.backend_entries, b.capacity)}


def build_datapath(ctx) -> LBDatapath:
    """The datapath over the started parts: the socket LB's reconciler (+ nodeport.c's maps when on)."""
    ns = ctx.get("northsouth")
    svc = ns.service if ns is not None else None
    return LBDatapath(ctx.get("socket_lb").reconciler, svc.maps if svc else None, svc.node_info if svc else None)
