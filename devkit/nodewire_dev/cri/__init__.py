"""A CRI v1 client (the kubelet's half of the runtime API), enough to run pod sandboxes on a real
containerd: RunPodSandbox, PodSandboxStatus, StopPodSandbox, RemovePodSandbox, ListPodSandbox.

api.proto is Kubernetes' own (k8s.io/cri-api v0.34.0, pkg/apis/runtime/v1/api.proto, Apache-2.0),
compiled with grpcio-tools at first use into `_gen/` beside it (regenerated when the proto or the
grpcio-tools version changes), so no generated code is checked in.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "api.proto"
GEN = HERE / "_gen"


def _stamp() -> str:
    import grpc_tools

    return f"{grpc_tools.__file__}:{PROTO.stat().st_size}:{PROTO.stat().st_mtime_ns}"


def _compile() -> None:
    """api_pb2.py and api_pb2_grpc.py in GEN, written beside it and renamed into place."""
    from grpc_tools import protoc

    if (GEN / "stamp").is_file() and (GEN / "stamp").read_text() == _stamp():
        return
    tmp = Path(tempfile.mkdtemp(prefix="_gen.", dir=HERE))
    try:
        include = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main(["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                          str(PROTO)])
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {PROTO} (exit {rc})")
        # the generated service module imports `api_pb2` as a top-level module: make it package-relative
        grpc_mod = tmp / "api_pb2_grpc.py"
        grpc_mod.write_text(grpc_mod.read_text().replace("import api_pb2 as", "from . import api_pb2 as"))
        (tmp / "__init__.py").write_text("")
        (tmp / "stamp").write_text(_stamp())
        shutil.rmtree(GEN, ignore_errors=True)
        os.replace(tmp, GEN)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def modules():
    """(api_pb2, api_pb2_grpc), compiled first if needed."""
    _compile()
    pb2 = importlib.import_module(f"{__name__}._gen.api_pb2")
    grpc_mod = importlib.import_module(f"{__name__}._gen.api_pb2_grpc")
    return pb2, grpc_mod


@dataclass
class SandboxStatus:
    id: str
    state: str          # SANDBOX_READY / SANDBOX_NOTREADY
    ip: str
    netns: str          # the pod's network namespace path (from the verbose info's runtime spec)
    name: str
    namespace: str
    uid: str


class CriClient:
    """The RuntimeService of a runtime listening on a unix socket."""

    def __init__(self, socket: str, timeout: float = 60.0):
        import grpc

        self.pb, grpc_mod = modules()
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.rt = grpc_mod.RuntimeServiceStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def version(self) -> str:
        r = self.rt.Version(self.pb.VersionRequest(version="v1"), timeout=self.timeout)
        return f"{r.runtime_name} {r.runtime_version} (CRI {r.runtime_api_version})"

    def run_pod_sandbox(self, name: str, namespace: str, uid: str, cgroup_parent: str = "",
                        log_directory: str = "", labels: dict | None = None) -> str:
        pb = self.pb
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=0),
            hostname=name, log_directory=log_directory, labels=labels or {},
            linux=pb.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent))
        return self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=self.timeout).pod_sandbox_id

    def status(self, sandbox_id: str) -> SandboxStatus:
        r = self.rt.PodSandboxStatus(self.pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True),
                                     timeout=self.timeout)
        s = r.status
        return SandboxStatus(s.id, self.pb.PodSandboxState.Name(s.state), s.network.ip, _netns_path(r.info),
                             s.metadata.name, s.metadata.namespace, s.metadata.uid)

    def stop(self, sandbox_id: str) -> None:
        self.rt.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=self.timeout)

    def remove(self, sandbox_id: str) -> None:
        self.rt.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=self.timeout)

    def list_ids(self) -> list[str]:
        return [s.id for s in self.rt.ListPodSandbox(self.pb.ListPodSandboxRequest(), timeout=self.timeout).items]


def _netns_path(info: dict) -> str:
    """containerd's verbose status carries the sandbox's OCI spec; its network namespace has the path."""
    try:
        spec = json.loads(info["info"])["runtimeSpec"]
    except (KeyError, ValueError):
        return ""
    for ns in spec.get("linux", {}).get("namespaces", []):
        if ns.get("type") == "network":
            return ns.get("path", "")
    return ""


if __name__ == "__main__":  # `python -m nodewire_dev.cri SOCKET`: the runtime's version
    print(CriClient(sys.argv[1]).version())
