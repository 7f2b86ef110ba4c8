"""The datapath the sync loop drives: Service views in, the kernel's maps made to match, one result out.

The seam (agent/sync_loop.py's Datapath protocol): `apply(views, full)` with the views of the changed
Services (model/view.py; None: deleted; full: every Service) and `take(state, full)`, which asks the
state for those views (with this node's north-south addresses when north-south is on). Nothing here
re-reads the state mid-sync or edits another part's input: each view carries its socket frontends
(ClusterIPs, and the node's own sockets' NodePorts / externalIPs / LB IPs) and its external ones.
"""
from __future__ import annotations

import logging

from ..model.objects import ObjectKey
from ..model.view import ServiceView
from .reconciler import Reconciler, SyncResult

log = logging.getLogger("nodewire.datapath")


class Datapath:
    """The socket maps (a Reconciler) and, when north-south is on, the tc side (agent/northsouth.py)."""

    def __init__(self, socket: Reconciler, northsouth=None):
        self.socket, self.northsouth = socket, northsouth

    def take(self, state, full: bool) -> dict[ObjectKey, ServiceView | None]:
        """The views to apply: of the Services changed since the last take (full: of every Service)."""
        ns = self.northsouth
        return state.take_views(full, ns.node_info() if ns is not None else None)

    def apply(self, views: dict[ObjectKey, ServiceView | None], full: bool = False) -> SyncResult:
        for view in views.values():  # bad input the model left out (a slice port, a nodePort): logged, not fatal
            if view is not None and view.errors:
                for err in view.errors:
                    log.error("%s", err)
        changes = {k: (v.socket if v is not None else ()) for k, v in views.items()}
        res = self.socket.apply(changes, full=full)
        if self.northsouth is not None:
            res.refusals.extend(self.northsouth.apply(views, full=full).refusals)
        return res

    def service_count(self) -> int:
        return len(self.socket.owned)

    def service_names(self) -> dict[int, dict]:
        return self.socket.service_names()
