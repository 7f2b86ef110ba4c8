"""The socket load balancer: the cgroup programs (connect/sendmsg/recvmsg/getpeername), their pinned
maps and the reconciler that writes them, and the sweep of sockets left connected to a backend that
left its Service (datapath/stale_sockets.py). Always on: it is what nodewire is for."""
from __future__ import annotations

import logging
import time

from ..api import ApiError
from .base import Component, Context

log = logging.getLogger("nodewire.agent")
NAMES_PAGE = 5000  # `services.names`: at most this many ids per answer (the API's line limit is 1 MiB)


class SocketLB(Component):
    name = "socket_lb"

    def __init__(self) -> None:
        self.lb = None           # datapath.loader.SockLB: programs and pinned maps
        self.reconciler = None   # datapath.reconciler.Reconciler: the one writer of the service maps
        self.stale_sockets = None
        self.programs: list[str] = []
        self._syncs = 0
        self._names: tuple[int, dict[int, dict]] | None = None  # (syncs when built, id → name)
        self._ctx: Context | None = None

    def start(self, ctx: Context) -> None:
        from ..datapath.attach import attach_sock_lb
        from ..datapath.loader import SockLB as Loaded
        from ..datapath.reconciler import Reconciler
        from ..datapath.stale_sockets import StaleSockets, listed_addresses

        cfg, state, self._ctx = ctx.cfg, ctx.state, ctx
        t0 = time.perf_counter()
        self.lb = Loaded(cfg.pin_dir, cfg.sizes)
        self.programs = attach_sock_lb(self.lb, ctx.cgroup)
        self.reconciler = Reconciler(self.lb.services, self.lb.backends)
        self.stale_sockets = StaleSockets(ctx.cgroup, self.lb.services, self.lb.backends, self.lb.revnat,
                                          lambda: listed_addresses(list(state.slices.values())))
        ctx.api.register("services.names", self.service_names)
        log.info("datapath ready cgroup=%s pin_dir=%s programs=%d load_seconds=%.3f compiled=%s "
                 "preexisting_entries=%d", ctx.cgroup, cfg.pin_dir, len(self.programs), time.perf_counter() - t0,
                 self.lb.loaded.compiled, self.reconciler.svc_entries)

    def after_sync(self, changes, res) -> None:
        """Destroy sockets connected through a Service to a backend that left it (stale_sockets.py)."""
        self._syncs += 1
        try:
            swept = self.stale_sockets.sweep()
        except OSError as e:  # the datapath is written; a failed sweep is retried after the next change
            log.error("socket sweep failed err=%s", e)
            return
        if swept.destroyed:
            log.debug("socket sweep namespaces=%d checked=%d destroyed=%d seconds=%.4f",
                      swept.namespaces, swept.checked, len(swept.destroyed), swept.seconds)

    def service_names(self, params: dict) -> dict:
        """API `services.names`: {"ids": [...]} → {id: {service, port_name, frontend}}, at most
        NAMES_PAGE ids an answer (`nodewire services` pages through them). Built once per sync."""
        ids = params.get("ids")
        if not isinstance(ids, list) or len(ids) > NAMES_PAGE or not all(isinstance(i, int) for i in ids):
            raise ApiError("bad_request", f"params.ids: a list of at most {NAMES_PAGE} service ids")
        with self._ctx.lock:
            if self._names is None or self._names[0] != self._syncs:
                self._names = (self._syncs, self.reconciler.service_names())
            names = self._names[1]
        return {str(i): names[i] for i in ids if i in names}

    def status(self, st) -> None:
        st.programs = list(self.programs)
        if self.stale_sockets is not None:
            st.counters.sockets_destroyed = self.stale_sockets.destroyed_total
