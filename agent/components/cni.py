"""The agent's side of the chained CNI plugin (agent/cni/pods.py): pods told by nodewire-cni, their
records under <state dir>/cni, the cni.* API methods, and the observer told of each pod's veth."""
from __future__ import annotations

import os

from .base import Component, Context


class CniPods(Component):
    name = "cni"

    def __init__(self) -> None:
        self.pods = None

    def start(self, ctx: Context) -> None:
        from ..cni.pods import CniPods as Impl

        cfg = ctx.cfg
        self.pods = Impl(ctx.state, cfg.node_name, os.path.join(cfg.state_dir, "cni"), cfg.veth_netns, cfg.netns_dir)
        part = ctx.get("observer")
        obs = part.observer if part is not None else None
        if obs is not None:
            self.pods.subscribe(lambda key, veth: obs.set_pod_interface(key, veth),
                                lambda key: obs.set_pod_interface(key, None))
        self.pods.register(ctx.api)
        self.pods.start()

    def close(self) -> None:
        if self.pods is not None:
            self.pods.close()
