"""`nodewire run` source selection and Kubernetes config errors (no root: they stop before the datapath)."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from agent.cli import main


def run(args, env):
    return CliRunner().invoke(main, ["run", *args], env=env)


def test_no_source_is_a_usage_error():
    r = run([], {"KUBERNETES_SERVICE_HOST": None, "KUBECONFIG": None})
    assert r.exit_code == 2 and "no source: pass --manifests DIR or --kube" in r.output


def test_in_a_pod_kube_is_the_default_and_names_the_missing_token(tmp_path):
    # KUBERNETES_SERVICE_HOST set, no --manifests: the kube source is chosen; this machine has no
    # service-account token, so start-up stops with an error naming the file.
    if os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"):
        pytest.skip("this machine is a pod with a real service account")
    r = run(["--pin-dir", "/sys/fs/bpf/nodewire-clitest"], {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBECONFIG": None})
    assert r.exit_code == 1
    assert "service account token /var/run/secrets/kubernetes.io/serviceaccount/token does not exist" in r.output


def test_kubeconfig_error_names_file_and_field(tmp_path):
    kc = tmp_path / "kc"
    kc.write_text("apiVersion: v1\nkind: Config\ncurrent-context: a\ncontexts:\n- name: a\n  context: {cluster: c, user: u}\n"
                  "clusters:\n- name: c\n  cluster: {}\nusers:\n- name: u\n  user: {token: x}\n")
    r = run(["--kubeconfig", str(kc), "--pin-dir", "/sys/fs/bpf/nodewire-clitest"], {"KUBERNETES_SERVICE_HOST": None})
    assert r.exit_code == 1 and f"kubeconfig {kc}: clusters[c].server is not set" in r.output


def test_manifests_and_kube_together_are_refused(tmp_path):
    r = run(["--manifests", str(tmp_path), "--kube"], {})
    assert r.exit_code == 2 and "manifests and kube are two sources" in r.output
