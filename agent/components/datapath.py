"""The datapath the sync loop drives today: the socket-path reconciler, and the north-south side
when it is on (the seam: /work/team/cp-seam.txt, agent/sync_loop.py Datapath).

Exactly the sequence the agent ran before it was made of parts: north-south adds its socket-path
frontends to the changes, the reconciler writes the socket maps, north-south writes its tc maps, and
the refusals of both are one result. The one writer of cp-core's issue 20 items 1-3 replaces this
class behind the same protocol.
"""
from __future__ import annotations

from ..status import MapFill


class LBDatapath:
    def __init__(self, reconciler, northsouth=None):
        self.reconciler, self.northsouth = reconciler, northsouth

    def apply(self, changes: dict, full: bool = False):
        if self.northsouth is not None:
            self.northsouth.extend(changes)
        res = self.reconciler.apply(changes, full=full)
        if self.northsouth is not None:
            res.refusals.extend(self.northsouth.apply(full=full).refusals)
        return res

    def fill(self) -> dict[str, MapFill]:
        rec = self.reconciler
        s, b = rec.maps.services, rec.maps.backends
        return {s.name: MapFill(rec.svc_entries, s.capacity), b.name: MapFill(rec.backend_entries, b.capacity)}

    def service_count(self) -> int:
        return len(self.reconciler.owned)

    def service_names(self) -> dict[int, dict]:
        return self.reconciler.service_names()


def build_datapath(ctx) -> LBDatapath:
    """The datapath over the started parts: the socket LB's reconciler (+ north-south when on)."""
    ns = ctx.get("northsouth")
    return LBDatapath(ctx.get("socket_lb").reconciler, ns.service if ns is not None else None)
