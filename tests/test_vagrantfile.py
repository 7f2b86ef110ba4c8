"""The Vagrantfile cannot run here (no hypervisor): check its Ruby syntax and that every project
command, path and flag it uses exists."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "Vagrantfile").read_text()


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed (scripts/install.sh test installs it)")
def test_ruby_syntax():
    out = subprocess.run(["ruby", "-c", str(ROOT / "Vagrantfile")], capture_output=True, text=True)
    assert out.returncode == 0 and "Syntax OK" in out.stdout, out.stderr


def test_make_targets_it_runs_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    used = re.findall(r"make -C /vagrant ([\w-]+)", TEXT)
    assert used and set(used) <= targets


def test_paths_under_the_synced_folder_exist():
    paths = set(re.findall(r"/vagrant/([\w./-]+)", TEXT))
    assert "deploy/kube-proxy-replacement" in paths
    for p in paths:
        assert (ROOT / p).exists(), p


def test_nodewire_commands_it_runs_parse():
    for cmd in re.findall(r"-- nodewire ([^\n;&|]+)", TEXT):
        argv = shlex.split(cmd.replace("\\", ""))
        r = CliRunner().invoke(main, [*argv, "--help"])
        assert r.exit_code == 0, f"nodewire {cmd}: {r.output}"


def test_cluster_shape():
    assert 'K8S_MINOR = "v1.34"' in TEXT
    assert "--skip-phases=addon/kube-proxy" in TEXT                      # kube-proxy disabled
    assert re.search(r'FLANNEL_VERSION = "v\d+\.\d+\.\d+"', TEXT)          # primary CNI pinned
    assert "releases/download/#{FLANNEL_VERSION}/" in TEXT and "/master/" not in TEXT
    assert "--node-ip=" in TEXT and "--apiserver-advertise-address=#{CP_IP}" in TEXT
    assert "kubeadm token create --print-join-command" in TEXT             # join over ssh, not a one-way folder
    control_plane = re.search(r"CONTROL_PLANE = <<~SHELL\n(.*?)\nSHELL", TEXT, re.S).group(1)
    assert "sed " not in control_plane and "kubectl apply -k /vagrant/deploy/" in control_plane  # no sed-editing
    for what in ("ClusterIP", "NodePort"):
        assert f"<- {what}" in TEXT                                          # the smoke check tries both
