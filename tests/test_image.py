"""The agent image from deploy/Containerfile (`make image`): it runs `nodewire version`, imports BCC,
has the CNI plugin, and carries runtime dependencies only. Building takes minutes, so this module is
not part of `make test`: `make test-image` builds the image and runs it (NODEWIRE_IMAGE_TEST=1)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

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
