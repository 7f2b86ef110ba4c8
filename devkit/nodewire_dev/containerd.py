"""A private containerd for tests: Debian's containerd 1.6 with its CRI plugin and runc, run inside a
node network namespace the caller made, with every directory it writes (root, state, sockets, runc
root, CNI netns mounts) under one work dir, so it never meets the machine's own containerd, and
`close()` leaves nothing behind: sandboxes stopped and removed, containerd and its shims killed (by
pid), mounts under the work dir unmounted, the pods' cgroups removed.

Settings these machines need (ENVIRONMENT.md, "Verified 2026-12-07"): `restrict_oom_score_adj`
(root lacks CAP_SYS_RESOURCE: runc fails writing the sandbox's oom_score_adj otherwise), cgroupfs
(`SystemdCgroup = false`; no systemd here) and `netns_mounts_under_state_dir` (pod netns stay out of
/var/run/netns). No registry is reachable, so the sandbox image is `pause.c` built with `gcc -static`
and packed by hand as an OCI archive, then imported with `ctr -n k8s.io images import`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from .cri import HERE as CRI_DIR
from .cri import CriClient
from .lifecycle import SetUp

PAUSE_IMAGE = "localhost/nodewire-pause:1"
NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace


class Containerd(SetUp):
    """containerd in `node_netns` (a name under /var/run/netns), CNI from bin_dir/conf_dir."""

    def __init__(self, work: Path, node_netns: str, cni_bin_dir: str, cni_conf_dir: str, prefix: str):
        self.work, self.node_netns, self.prefix = Path(work), node_netns, prefix
        self.cni_bin_dir, self.cni_conf_dir = cni_bin_dir, cni_conf_dir
        self.root, self.state = self.work / "root", self.work / "state"
        self.socket = str(self.work / "containerd.sock")
        self.cgroup_parent = f"/{prefix}-pods"  # cgroupfs: one directory per controller, removed in close()
        self.log = self.work / "containerd.log"
        self.proc: subprocess.Popen | None = None
        self.cri: CriClient | None = None

    @property
    def netns_dir(self) -> str:
        """Where the CRI plugin mounts pods' network namespaces (netns_mounts_under_state_dir)."""
        return str(self.state / "io.containerd.grpc.v1.cri" / "netns")

    # -- lifecycle -----------------------------------------------------------------------------
    def up(self) -> "Containerd":
        return self.start()

    def start(self, timeout: float = 60) -> "Containerd":
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.work / "config.toml"
        config.write_text(self._config())
        self._logf = open(self.log, "a")
        self.proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{self.node_netns}", "containerd",
                                      "--config", str(config)], stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not come up: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        self.ctr("images", "import", str(build_pause_image(self.work / "pause")))
        self.cri = CriClient(self.socket)
        return self

    def ctr(self, *argv: str) -> str:
        out = subprocess.run(["ctr", "--address", self.socket, "-n", NAMESPACE, *argv],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(argv)}: {out.stderr.strip()}")
        return out.stdout

    def close(self) -> None:
        if self.cri is not None:
            for sid in self._sandboxes():
                for call in (self.cri.stop, self.cri.remove):
                    try:
                        call(sid)
                    except Exception:  # best effort: whatever is left is killed and unmounted below
                        pass
            self.cri.close()
            self.cri = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self._logf.close()
            self.proc = None
        for pid in self._shims():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._unmount_all()
        _remove_cgroups(self.cgroup_parent)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)

    def _sandboxes(self) -> list[str]:
        try:
            return self.cri.list_ids()
        except Exception:
            return []

    def _shims(self) -> list[int]:
        """Our shims (and the pause processes under them), found by the socket path in their argv."""
        mine = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.socket.encode() in argv and int(pid) != os.getpid():
                mine.append(int(pid))
        return mine

    def _unmount_all(self) -> None:
        """Every mount under the work dir (rootfs overlays, shm, netns bind mounts), deepest first."""
        work = str(self.work) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted({p for p in points if p.startswith(work)}, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)

    def _config(self) -> str:
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        return f"""version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.work / 'opt'}"
{cri}
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{self.cni_bin_dir}"
    conf_dir = "{self.cni_conf_dir}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{self.work / 'runc'}"
"""


def _remove_cgroups(parent: str) -> None:
    """The pods' cgroups under parent in every hierarchy (cgroup v1 controllers and the v2 tree)."""
    base = Path("/sys/fs/cgroup")
    for hierarchy in [base, *[p for p in base.iterdir() if p.is_dir() and not p.is_symlink()]]:
        top = hierarchy / parent.strip("/")
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, top]:
            _kill_procs(d)
            _rmdir(d)


def _kill_procs(d: Path) -> None:
    """A pod process left behind (containerd killed mid-sandbox) would keep its cgroup busy."""
    try:
        pids = (d / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    if pids:
        time.sleep(0.1)


def _rmdir(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


# -- the pause image ---------------------------------------------------------------------------
def build_pause_image(work: Path) -> Path:
    """An OCI image archive of one static binary, /pause, named PAUSE_IMAGE."""
    work.mkdir(parents=True, exist_ok=True)
    binary = work / "pause"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(CRI_DIR / "pause.c")], check=True)
    layer = _tar({"pause": (binary.read_bytes(), 0o755)})
    config = json.dumps({
        "architecture": _goarch(), "os": "linux",
        "config": {"Entrypoint": ["/pause"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
    }).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [dict(
        _descriptor("application/vnd.oci.image.manifest.v1+json", manifest),
        annotations={"io.containerd.image.name": PAUSE_IMAGE, "org.opencontainers.image.ref.name": "1"})]}).encode()
    files = {"oci-layout": (b'{"imageLayoutVersion": "1.0.0"}', 0o644), "index.json": (index, 0o644)}
    for blob in (layer, config, manifest):
        files[f"blobs/sha256/{_digest(blob).split(':')[1]}"] = (blob, 0o644)
    archive = work / "pause.oci.tar"
    archive.write_bytes(_tar(files))
    return archive


def _tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data)}


def _goarch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
