"""The sources of cluster state as parts: the manifest directory and the Kubernetes API. Each pushes
objects into ClusterState from its own threads; the first full sync waits for their first complete
read (wait_synced), and the API source's health is in /readyz and the status."""
from __future__ import annotations


from ..status import SourceStatus
from .base import Component, Context


class Manifests(Component):
    name = "manifests"

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.manifests is not None

    def __init__(self) -> None:
        self.source = None  # sources.manifests.ManifestSource
        self._seen = 0.0
        self._ctx: Context | None = None

    def start(self, ctx: Context) -> None:
        from ..sources.manifests import ManifestSource

        self._ctx = ctx
        self.source = ManifestSource(ctx.cfg.manifests, ctx.state, on_errors=ctx.report_errors,
                                     poll_interval=ctx.cfg.poll_interval).start()

    def wait_synced(self, timeout: float) -> bool:
        return self.source.wait_synced(timeout)

    def tick(self) -> None:
        if self.source.last_change != self._seen:  # files changed, maybe only their errors
            self._seen = self.source.last_change
            self._ctx.note_change(self._seen)

    def status(self, st) -> None:
        src = self.source
        st.sources["manifests"] = SourceStatus(
            "manifests", healthy=True, synced=src.synced.is_set(),
            detail={"path": str(src.directory), "files": len(src.files), "watcher": src.watcher,
                    "errors": len(src.errors)})

    def close(self) -> None:
        if self.source is not None:
            self.source.stop()


class Kube(Component):
    name = "kube"
    enabled_by = "kube"

    def __init__(self) -> None:
        self.source = None  # sources.kube.KubeSource
        self.config = None

    def prepare(self, ctx: Context) -> None:
        """A credentials/config error stops start-up before the datapath is touched."""
        from ..sources.kube import load_config

        self.config = load_config(ctx.cfg.kubeconfig, ctx.cfg.api_server)

    def start(self, ctx: Context) -> None:
        from ..sources.kube import KubeSource

        self.source = KubeSource(self.config, ctx.state, node=ctx.cfg.node_name,
                                 on_error=lambda e: ctx.report_errors([e]),
                                 lb_mode=getattr(ctx.cfg, "lb_mode", "snat"),  # issue 21's key (dsr-data)
                                 northsouth=bool(ctx.cfg.device_list)).start()

    def wait_synced(self, timeout: float) -> bool:
        return self.source.wait_synced(timeout)

    def ready(self) -> tuple[bool, str] | None:
        st = self.source.status()
        if not st["healthy"]:
            return False, (f"kube source stale since {st['stale_since'] or 'start'}"
                           f" (last error: {st['last_error']}); serving the last synced state")
        return None

    def metrics(self, telemetry) -> None:
        self.source.register_metrics(telemetry.meter())

    def status(self, st) -> None:
        k = self.source.status()
        st.sources["kube"] = SourceStatus("kube", k["healthy"], k["synced"], k["stale_since"], k["last_error"],
                                          detail={n: v for n, v in k.items() if n not in (
                                              "kind", "healthy", "synced", "stale_since", "last_error")})

    def close(self) -> None:
        if self.source is not None:
            self.source.stop()


