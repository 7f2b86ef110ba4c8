"""`nodewire check` wiring: the same sources and settings as `nodewire run` give the desired state,
the maps and hooks the agent pinned give the kernel's; agent/datapath/check.py compares the two.
The CLI's side, so the datapath never imports a source."""
from __future__ import annotations

from .datapath.check import Report, check
from .model.frontends import Frontend
from .model.objects import ObjectKey


def desired_from_sources(cfg, timeout: float = 60.0) -> dict[ObjectKey, list[Frontend]]:
    """The frontends the agent computes from cfg's source (a manifest directory, or the API's first
    complete list), for this node (name and zone: traffic policies and topology hints)."""
    from .state import ClusterState

    state = ClusterState(cfg.node_name, cfg.zone)
    if cfg.manifests is not None:
        from .sources.manifests import ManifestSource

        ManifestSource(cfg.manifests, state, on_errors=lambda errs: None).poll()
    else:
        from .sources.kube import KubeError, KubeSource, load_config

        kube = KubeSource(load_config(cfg.kubeconfig, cfg.api_server), state, node=cfg.node_name).start()
        try:
            if not kube.wait_synced(timeout):
                raise KubeError(f"the API source did not finish its first list in {timeout:g}s: "
                                f"{kube.status().get('last_error')}")
        finally:
            kube.stop()
    return state.all_frontends()


def check_node(cfg, timeout: float = 60.0, cgroup: str | None = None) -> Report:
    """Everything `nodewire check` reports for the agent configured by cfg."""
    from .datapath.attach import cgroup_programs, detect_cgroup2_root
    from .datapath.loader import SockLB

    desired = desired_from_sources(cfg, timeout)
    lb = SockLB.open(cfg.pin_dir)  # FileNotFoundError: no agent pinned its maps there
    try:
        cg = cgroup or cfg.cgroup or detect_cgroup2_root()
        attached = cgroup_programs(cg, [at for _fn, at in SockLB.HOOKS])
        return check(desired, lb.services, lb.backends, lb.revnat, attached, SockLB.HOOKS)
    finally:
        lb.close()
