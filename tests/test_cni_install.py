"""`nodewire cni install|uninstall` on a conf dir (no root): nodewire last in the primary's list, the
original kept and restored, idempotent, a single-plugin .conf converted; and the plugin installed is
one static executable that runs with nothing else on the node."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

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
    assert os.access(plugin, os.X_OK) and elf_program_headers(plugin) and not ({PT_INTERP, PT_DYNAMIC}
                                                                              & elf_program_headers(plugin))
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


PT_DYNAMIC, PT_INTERP = 2, 3  # ELF program header types (the System V ABI's gABI, "Program Header")


def elf_program_headers(path: Path) -> set[int]:
    """The p_type of each program header of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a 64-bit LE ELF file"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return {struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)}


def test_an_upgrade_from_the_python_plugin_replaces_its_launcher_and_module(tmp_path):
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-a.conflist").write_text(json.dumps(FLANNEL))
    legacy = tmp_path / "bin" / ".nodewire-cni"
    legacy.mkdir(parents=True)
    (legacy / "nodewire_cni.py").write_text("print('old')\n")
    (tmp_path / "bin" / "nodewire-cni").write_text("#!/usr/bin/python3 -IS\n")
    r = cli("cni", "install", "--cni-bin-dir", str(tmp_path / "bin"), "--cni-conf-dir", str(tmp_path / "net.d"),
            "--python", "/usr/bin/python3")  # the old flag still parses (ignored)
    assert r.exit_code == 0, r.output
    assert not legacy.exists() and (tmp_path / "bin" / "nodewire-cni").read_bytes()[:4] == b"\x7fELF"


@pytest.mark.root
def test_the_plugin_runs_alone_in_an_empty_root(tmp_path):
    """No interpreter, no shared library, no file of the node: the binary by itself in a chroot answers
    VERSION, and a fail-open ADD with no agent there prints prevResult."""
    from agent.cni.build import ensure
    shutil.copy(ensure(), tmp_path / "nodewire-cni")
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    env = {"CNI_COMMAND": "VERSION"}
    out = subprocess.run([chroot, str(tmp_path), "/nodewire-cni"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["cniVersion"] == "1.1.0", out
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.2.3/24"}]}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/1/ns/net"}
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "nodewire-cni", "prevResult": prev}
    out = subprocess.run([chroot, str(tmp_path), "/nodewire-cni"], env=env, input=json.dumps(conf),
                         capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout) == prev, out
    assert "No such file or directory; passing through (failOpen)" in out.stderr


def test_the_venv_entry_point_and_the_wrapper_run_the_static_plugin():
    """.venv/bin/nodewire-cni, the path users' scripts call, is the binary (scripts/install.sh links it);
    pip's wrapper of the entry point, as a plain `pip install` makes it, execs the same binary."""
    from agent.cni.build import BINARY
    entry = Path(sys.executable).with_name("nodewire-cni")
    assert entry.resolve() == BINARY.resolve()
    wrapper = [sys.executable, "-c", "from agent.cni.launcher import main; main()"]
    for argv in ([str(entry)], wrapper):
        out = subprocess.run(argv, env={"CNI_COMMAND": "bogus"}, capture_output=True, text=True)
        assert out.returncode == 1 and json.loads(out.stdout)["msg"].startswith("CNI_COMMAND 'bogus' is not one of")


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


def test_the_chain_keeper_touches_only_a_dir_install_set_up(tmp_path):
    """No `*.nodewire-orig` (install never ran, or uninstall did): the agent leaves the dir alone; after
    install, a primary that rewrote its single-plugin .conf is chained again as install would."""
    from agent.cni.chain import ChainKeeper
    ptp = {"cniVersion": "1.0.0", "name": "n", "type": "ptp"}
    (tmp_path / "10-ptp.conf").write_text(json.dumps(ptp))
    keeper = ChainKeeper(str(tmp_path), PluginSettings(socket="/s"))
    assert keeper.check() is False and sorted(p.name for p in tmp_path.iterdir()) == ["10-ptp.conf"]
    install_conf(str(tmp_path), PluginSettings(socket="/from-install"))
    keeper._remember_entry()  # what start() does: the entry install wrote is the one written back
    (tmp_path / "10-ptp.conf").write_text(json.dumps(dict(ptp, mtu=1400)))  # the primary's new .conf sorts first
    assert keeper.check() is True and keeper.restored == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10-ptp.conf.nodewire-orig", "10-ptp.conflist"]
    plugins = json.loads((tmp_path / "10-ptp.conflist").read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["ptp", "nodewire-cni"] and plugins[0]["mtu"] == 1400
    assert plugins[-1]["socket"] == "/from-install" and keeper.check() is False  # chained: nothing to do
