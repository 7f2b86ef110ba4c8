"""The agent image from deploy/Containerfile (`make image`): it runs `nodewire version`, imports BCC,
has the CNI plugin, carries runtime dependencies only, and its agent serves a ClusterIP on a node
without kernel headers (with the set the image brings). Building takes minutes, so this module is
not part of `make test`: `make test-image` builds the image and runs it (NODEWIRE_IMAGE_TEST=1)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import AgentProcess
from tests.manifests import endpoint_slice, service, write

ROOT = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
IMAGE = os.environ.get("IMAGE", f"localhost/nodewire:{VERSION}")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.environ.get("NODEWIRE_IMAGE_TEST") != "1", reason="make test-image (builds for minutes)"),
    pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah not installed"),
]


@pytest.fixture(scope="module")
def ctr():
    name = subprocess.run(["buildah", "from", IMAGE], capture_output=True, text=True, check=True).stdout.strip()
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True)


def run(ctr, *argv, env=()) -> str:
    extra = [x for e in env for x in ("--env", e)]
    out = subprocess.run(["buildah", "run", "--isolation", "chroot", *extra, ctr, "--", *argv],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_prints_its_version(ctr):
    assert run(ctr, "nodewire", "version").strip() == f"nodewire {VERSION}"


def test_imports_bcc_and_the_agent(ctr):
    out = run(ctr, "/opt/nodewire/venv/bin/python", "-c",
              "import bcc, agent.agent, agent.datapath.loader as l; print(bcc.__file__); print(l.BPF_DIR / 'sock_lb.c')")
    bcc_file, sock_lb = out.split()
    assert bcc_file.startswith("/usr/lib/python3/dist-packages/bcc/")
    assert run(ctr, "test", "-f", sock_lb) == ""  # the C programs ship inside the package


def test_cni_plugin_is_in_the_image(ctr):
    assert '"cniVersion": "1.1.0"' in run(ctr, "nodewire-cni", env=["CNI_COMMAND=VERSION"])


def test_runtime_dependencies_only(ctr):
    out = run(ctr, "/opt/nodewire/venv/bin/python", "-c",
              "import importlib.util as u; print([m for m in ('matplotlib', 'nodewire_dev', 'pytest', 'psutil', "
              "'kubernetes_validate') if u.find_spec(m)])")
    assert out.strip() == "[]"
    assert run(ctr, "sh", "-c", "ls /src /opt/nodewire/tests 2>/dev/null; which gcc clang || true").strip() == ""


def in_image(root: str, manifests: str) -> list[str]:
    """argv prefix: the image's own nodewire, chrooted into the image's root in a private mount
    namespace, as a privileged hostNetwork pod sees the node: /sys (bpffs, cgroups, tracefs), /proc,
    /dev and /run/nodewire from the host, and no node headers (empty /lib/modules and /usr/src, as the
    DaemonSet mounts neither). AgentProcess appends the host's nodewire path (dropped) and the args;
    NODEWIRE_IMAGE_TEST (make test-image's switch) is no agent setting and stays outside."""
    script = ('unset NODEWIRE_IMAGE_TEST; R=$1; M=$2; shift 3; mkdir -p "$R/lib/modules" "$R/usr/src" "$R/run/nodewire" "$R$M" && '
              'mount --rbind /sys "$R/sys" && mount -t proc proc "$R/proc" && mount --rbind /dev "$R/dev" && '
              'mount --bind /run/nodewire "$R/run/nodewire" && mount --bind "$M" "$R$M" && '
              'mount -t tmpfs nodewire-test-empty "$R/lib/modules" && mount -t tmpfs nodewire-test-empty "$R/usr/src" && '
              'exec chroot "$R" nodewire "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", root, manifests]


@pytest.fixture(scope="module")
def image_root(ctr):
    root = subprocess.run(["buildah", "mount", ctr], capture_output=True, text=True, check=True).stdout.strip()
    yield root
    subprocess.run(["buildah", "umount", ctr], capture_output=True)


def test_the_images_agent_on_a_node_without_headers_compiles_with_its_own_and_serves_a_clusterip(
        image_root, sandbox, tmp_path):
    client, backend = sandbox.add_pod("img-client"), sandbox.add_pod("img-b1")
    backend.serve(tcp_ports=[8080])
    write(tmp_path / "svc.json", service("img", ["10.96.42.1"]), endpoint_slice("img", [backend.ip4]))
    agent = AgentProcess(tmp_path, sandbox.cgroup, f"/sys/fs/bpf/{sandbox.prefix}-img",
                         extra=["--no-observe", "--no-rdma"], prefix=in_image(image_root, str(tmp_path)))
    try:
        agent.start(timeout=300)
        assert "headers=bundled:/opt/nodewire/venv/share/nodewire/kernel-headers" in agent.log.read_text()
        assert client.probe("tcp", "10.96.42.1", 80, count=3)["replies"] == {"img-b1": 3}
    finally:
        agent.cleanup()
