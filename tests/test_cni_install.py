"""`nodewire cni install|uninstall` on a conf dir (no root): nodewire last in the primary's list, the
original kept and restored, idempotent, a single-plugin .conf converted; and the plugin's start-up
imports (no agent, no BCC)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.cni.install import BACKUP_SUFFIX, InstallError, PluginSettings, install_conf, primary_conf, uninstall

FLANNEL = {"cniVersion": "0.3.1", "name": "cbr0", "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
    {"type": "portmap", "capabilities": {"portMappings": True}}]}


def cli(*args):
    return CliRunner().invoke(main, list(args), env={"NODEWIRE_CONFIG": None})


def test_install_appends_once_and_uninstall_restores_byte_for_byte(tmp_path):
    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    original = json.dumps(FLANNEL, indent=4)
    (conf / "10-flannel.conflist").write_text(original)
    (conf / "99-loopback.conf").write_text(json.dumps({"cniVersion": "0.3.1", "name": "lo", "type": "loopback"}))
    for _ in range(2):  # a second install (an agent restart) replaces nodewire's entry, never doubles it
        r = cli("cni", "install", "--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf), "--no-cni-fail-open",
                "--socket", "/run/x.sock")
        assert r.exit_code == 0, r.output
    now = json.loads((conf / "10-flannel.conflist").read_text())
    assert [p["type"] for p in now["plugins"]] == ["flannel", "portmap", "nodewire-cni"]
    assert now["plugins"][-1] == {"type": "nodewire-cni", "socket": "/run/x.sock", "failOpen": False, "timeout": 5.0}
    assert (conf / f"10-flannel.conflist{BACKUP_SUFFIX}").read_text() == original
    assert json.loads((conf / "99-loopback.conf").read_text())["type"] == "loopback"  # not the primary: untouched
    plugin = bin_dir / "nodewire-cni"
    assert os.access(plugin, os.X_OK) and plugin.read_text().startswith("#!/usr/bin/python3 -IS\n")
    assert list((bin_dir / ".nodewire-cni" / "__pycache__").glob("nodewire_cni.*.pyc"))  # compiled at install
    out = subprocess.run([str(plugin)], env={"CNI_COMMAND": "VERSION"}, capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["cniVersion"] == "1.1.0"
    assert sorted(p.name for p in conf.iterdir()) == ["10-flannel.conflist", f"10-flannel.conflist{BACKUP_SUFFIX}",
                                                      "99-loopback.conf"]  # no temp file left behind
    r = cli("cni", "uninstall", "--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf))
    assert r.exit_code == 0, r.output
    assert (conf / "10-flannel.conflist").read_text() == original and not plugin.exists()
    assert not (bin_dir / ".nodewire-cni").exists()
    assert sorted(p.name for p in conf.iterdir()) == ["10-flannel.conflist", "99-loopback.conf"]


def test_a_single_plugin_conf_becomes_a_list_and_comes_back(tmp_path):
    (tmp_path / "10-ptp.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "ptp",
                                                      "ipam": {"type": "host-local"}}))
    out = install_conf(str(tmp_path), PluginSettings(socket="/s"))
    assert out.name == "10-ptp.conflist" and not (tmp_path / "10-ptp.conf").exists()
    assert [p["type"] for p in json.loads(out.read_text())["plugins"]] == ["ptp", "nodewire-cni"]
    assert primary_conf(str(tmp_path)) == out
    uninstall(str(tmp_path), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10-ptp.conf"]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(InstallError, match="no CNI network configuration"):
        install_conf(str(tmp_path), PluginSettings(socket="/s"))
    (tmp_path / "10-bad.conflist").write_text("{")
    with pytest.raises(InstallError, match="10-bad.conflist: not JSON"):
        install_conf(str(tmp_path), PluginSettings(socket="/s"))
    r = cli("cni", "install", "--cni-bin-dir", str(tmp_path / "b"), "--cni-conf-dir", str(tmp_path / "none"))
    assert r.exit_code == 1 and "no CNI network configuration in" in r.output


def test_the_plugin_imports_nothing_of_the_agent_or_bcc():
    """The plugin file runs with -I -S: only the standard library, never agent/ or bcc."""
    from agent.cni import plugin
    code = (f"import runpy, sys; sys.argv=['x']; runpy.run_path({plugin.__file__!r}, run_name='probe'); "
            "print(sorted(m for m in sys.modules if m.startswith(('agent', 'bcc', 'yaml', 'click', 'numpy'))))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_install_reads_the_socket_path_from_the_config_file(tmp_path):
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-a.conflist").write_text(json.dumps(FLANNEL))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"pin-dir: /sys/fs/bpf/other\ncni-bin-dir: {tmp_path / 'bin'}\ncni-conf-dir: {tmp_path / 'net.d'}\n"
                   f"cni-log-file: /var/log/nw-cni.log\n")
    r = cli("cni", "install", "--config", str(cfg))
    assert r.exit_code == 0, r.output
    entry = json.loads((tmp_path / "net.d" / "10-a.conflist").read_text())["plugins"][-1]
    assert entry["socket"] == "/run/nodewire/sys_fs_bpf_other/api.sock" and entry["logFile"] == "/var/log/nw-cni.log"


@pytest.mark.parametrize("text", ['{"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}]}',
                                  ' [1, -2.5e3, true, false, null, "\\u00e9\\n", {"": {}}] ', "0", '"x"'])
def test_the_plugins_json_helpers_agree_with_json(text):
    from agent.cni import plugin
    assert plugin.json_loads(text) == json.loads(text)
    assert json.loads(plugin.json_dumps(json.loads(text))) == json.loads(text)


@pytest.mark.parametrize("bad", ["", "{", "[1] x", '{"a":}', "NaN x"])
def test_the_plugins_json_errors_are_value_errors(bad):
    from agent.cni import plugin
    with pytest.raises(ValueError):
        plugin.json_loads(bad)
