"""The agent's side of the chained CNI plugin: pods told by nodewire-cni (agent/cni/pods.py), their
records under <state dir>/cni, the cni.* API methods, the observer told of each pod's veth; and the
chain kept in the node's primary conflist when `nodewire cni install` set it up (agent/cni/chain.py)."""
from __future__ import annotations

import os

from .base import Component, Context


class CniPods(Component):
    name = "cni"

    def __init__(self) -> None:
        self.pods = None
        self.chain = None

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
        from ..cni.chain import ChainKeeper
        from ..cni.install import PluginSettings

        fallback = PluginSettings(socket=cfg.api_socket_path, fail_open=cfg.cni_fail_open, log_file=cfg.cni_log_file)
        self.chain = ChainKeeper(cfg.cni_conf_dir, fallback).start()

    def status(self, st) -> None:
        if self.pods is not None:
            st.cni = dict(self.pods.status(), chain=self.chain.status() if self.chain is not None else None)

    def close(self) -> None:
        if self.chain is not None:
            self.chain.close()
        if self.pods is not None:
            self.pods.close()
