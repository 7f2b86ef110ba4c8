"""The datapath the sync loop drives: Service views in, every map the agent writes made to match, one
result out.

The seam (agent/sync_loop.py's Datapath protocol): `take(state, full)` asks the state for the views of
the changed Services (model/view.py; None: deleted; full: every Service), with this node's addresses
when north-south is on, and `apply(views, full)` writes them. Nothing re-reads the state mid-sync or
edits another part's input: each view carries its socket frontends (ClusterIPs, and the node's own
sockets' NodePorts / externalIPs / LB IPs) and its external ones.

One plan, one writer: the socket maps' plan, nodeport.c's frontend plan (plan.py, each with its id
registry) and the north-south side maps' plan (nsplan.py) are executed as one row of phases in the
order nsplan.ordered() gives; the registries record it only once it is written. A failed write re-reads
every registry from the maps and retries those Services on the next apply.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..model.northsouth import NodeInfo
from ..model.objects import ObjectKey
from ..model.view import ServiceView
from . import abi
from .ids import SideRegistry
from .nsplan import SidePlan, ordered, plan_side
from .plan import WritePlan
from .reconciler import FULL_SYNC_CHUNK, Reconciler, SyncResult
from .writer import BatchMap, write

log = logging.getLogger("nodewire.datapath")


@dataclass
class NorthSouthMaps:
    """nodeport.c's maps the sync writes: frontend slots and backends (a Reconciler of their own) and
    the side maps; the Maglev map also has set_tables() / dump_tables() (maps.MaglevMap)."""
    lb: Reconciler
    policy: BatchMap
    ranges: BatchMap
    local: BatchMap
    maglev: BatchMap
    maglev_size: int

    def __post_init__(self):
        self.side = self.restore()

    def restore(self) -> SideRegistry:
        return SideRegistry.restore(self.policy.dump(), list(self.ranges.keys()), self.local.dump(),
                                    self.maglev.dump_tables())

    def relearn(self) -> None:
        """After a failed write: what the maps hold now, keeping who owns what (as adopt_owners)."""
        old, self.side = self.side, self.restore()
        self.side.owned, self.side.local_refs = old.owned, old.local_refs
        self.side.groups.adopt(old.groups)

    def by_name(self) -> dict[str, BatchMap]:
        return {abi.NP_SERVICES_MAP: self.lb.services, abi.NP_BACKENDS_MAP: self.lb.backends,
                abi.NP_POLICY_MAP: self.policy, abi.NP_RANGES_MAP: self.ranges, abi.NP_LOCAL_MAP: self.local,
                abi.NP_MAGLEV_MAP: self.maglev}


class Datapath:
    """The socket maps and, when north-south is on, nodeport.c's maps."""

    def __init__(self, socket: Reconciler, northsouth: NorthSouthMaps | None = None,
                 node: Callable[[], NodeInfo] | None = None):
        self.socket, self.northsouth, self.node = socket, northsouth, node
        self.maps = dict(socket.maps.by_name())
        if northsouth is not None:
            self.maps.update(northsouth.by_name())
        self._retry: dict[ObjectKey, ServiceView | None] = {}  # views of a write that failed

    def take(self, state, full: bool) -> dict[ObjectKey, ServiceView | None]:
        """The views to apply: of the Services changed since the last take (full: of every Service)."""
        return state.take_views(full, self.node() if self.northsouth is not None and self.node else None)

    def apply(self, views: dict[ObjectKey, ServiceView | None], full: bool = False) -> SyncResult:
        """Make every map match these views (None: the Service is gone; full: the views are every
        Service and the rest goes). A refused Service keeps its old entries, named in the result."""
        t0 = time.perf_counter()
        for view in views.values():  # bad input the model left out (a slice port, a nodePort): logged, not fatal
            for err in view.errors if view is not None else ():
                log.error("%s", err)
        if self._retry:
            views = {**self._retry, **views}
        socket = {k: (v.socket if v is not None else ()) for k, v in views.items()}
        if full and len(socket) > FULL_SYNC_CHUNK:  # a large full sync: the socket maps part by part
            res, plans = self.socket.apply_in_chunks(self.socket.with_retry(socket)), []
        else:
            res, plans = SyncResult(services=len(views)), [self.socket.plan(socket, full=full)]
        side = self._plan_northsouth(views, full, plans)
        res.plan_seconds += time.perf_counter() - t0
        self._write(views, plans, side, res)
        res.seconds = time.perf_counter() - t0
        for line in res.summary():
            log.error("%s", line)
        return res

    def _plan_northsouth(self, views, full: bool, plans: list[WritePlan]) -> SidePlan | None:
        ns = self.northsouth
        if ns is None:
            return None
        external = {k: [ef.frontend for ef in v.external] if v is not None else [] for k, v in views.items()}
        p = ns.lb.plan(external, full=full)
        plans.append(p)
        return plan_side(views, ns.side, p, ns.lb.registry, ns.maglev_size, full=full)

    def _write(self, views, plans: list[WritePlan], side: SidePlan | None, res: SyncResult) -> None:
        t0 = time.perf_counter()
        for p in plans:
            res.refusals += p.refusals
        try:
            write(ordered(plans, side), self.maps)
        except Exception as e:  # the kernel holds part of the plan: learn it back, retry next time
            res.write_error = f"writing the service maps failed ({e}); re-read them, retrying those Services"
            self.socket.failed({}, retry=False)
            if self.northsouth is not None:
                self.northsouth.lb.failed({}, retry=False)
                self.northsouth.relearn()
            self._retry.update(views)
        else:
            lbs = [self.socket] + ([self.northsouth.lb] if self.northsouth is not None else [])
            for rec, p in zip(lbs[-len(plans):], plans):
                rec.committed(p, {})
                res.written += p.written_count
                res.deleted += p.deleted_count
            if side is not None:
                self.northsouth.side.commit(side)
                res.written += side.written_count
                res.deleted += side.deleted_count
            for k in views:
                self._retry.pop(k, None)
        res.write_seconds += time.perf_counter() - t0

    # -- views (for the loop's status and the API) ------------------------------------------------
    def service_count(self) -> int:
        return len(self.socket.owned)

    def service_names(self) -> dict[int, dict]:
        return self.socket.service_names()
