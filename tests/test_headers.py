"""The kernel headers the agent compiles against (agent/datapath/headers.py): the node's first, then
the kernel's own archive, then the set nodewire brings; nothing usable is one clear error.

The root tests start the real agent in a mount namespace where the node's /lib/modules and /usr/src
are empty tmpfs (as on a node image without a headers package) and connect through a ClusterIP."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from agent.datapath import headers
from agent.datapath.headers import HeadersNotFound, KernelHeaders, extract_kheaders, find
from agent.paths import state_dir_for
from tests.conftest import NODEWIRE, AgentProcess
from tests.manifests import endpoint_slice, service, write

KCONFIG, AUTOCONF = "include/linux/kconfig.h", "include/generated/autoconf.h"


def tree(root: Path, *files: str) -> Path:
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(f"/* {f} */\n")
    return root


def archive(path: Path, entries: dict[str, str | None]) -> str:
    """A .tar.xz with the given files (None: a symlink to /etc/passwd)."""
    with tarfile.open(path, "w:xz") as tar:
        for name, text in entries.items():
            info = tarfile.TarInfo(name)
            if text is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                data = text.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def places(tmp_path: Path) -> dict:
    return {"release": "6.18.0-test", "modules": str(tmp_path / "modules"),
            "kheaders": str(tmp_path / "kheaders.tar.xz"), "bundled": tmp_path / "bundled"}


def test_the_nodes_own_tree_comes_first_and_bcc_finds_it_itself(tmp_path):
    p = places(tmp_path)
    tree(tmp_path / "bundled", KCONFIG, AUTOCONF)
    tree(tmp_path / "modules/6.18.0-test/build", KCONFIG)
    got = find(str(tmp_path / "state"), **p)
    assert got == KernelHeaders("node", str(tmp_path / "modules/6.18.0-test/build"))
    assert got.env() == {}


def test_a_debian_split_node_tree_counts_by_its_source_half(tmp_path):
    p = places(tmp_path)
    tree(tmp_path / "modules/6.18.0-test/build", AUTOCONF)
    tree(tmp_path / "modules/6.18.0-test/source", KCONFIG)
    assert find(str(tmp_path / "state"), **p).kind == "node"


def test_the_kernels_archive_is_unpacked_once_into_the_state_dir_and_named_to_bcc(tmp_path):
    p = places(tmp_path)
    tree(tmp_path / "modules/6.18.0-test/build")  # a leftover build dir without headers does not count
    tree(tmp_path / "bundled", KCONFIG, AUTOCONF)
    archive(Path(p["kheaders"]), {KCONFIG: "k", AUTOCONF: "a", "arch/x86/include/asm/x.h": "x",
                                  "../escape.h": "no", "/abs.h": "no", "include/link.h": None})
    got = find(str(tmp_path / "state"), **p)
    dest = tmp_path / "state/kheaders/6.18.0-test"
    assert got == KernelHeaders("kheaders", str(dest))
    assert got.env() == {"BCC_KERNEL_SOURCE": str(dest)}
    assert (dest / "arch/x86/include/asm/x.h").read_text() == "x"
    assert not (tmp_path / "state/kheaders/escape.h").exists() and not (dest / "include/link.h").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["6.18.0-test"]  # no temporary left
    Path(p["kheaders"]).unlink()
    assert extract_kheaders(p["kheaders"], dest) == dest  # unpacked already: the archive is not read


def test_an_unusable_archive_falls_through_to_the_bundled_set(tmp_path):
    p = places(tmp_path)
    archive(Path(p["kheaders"]), {"README": "no headers here"})
    tree(tmp_path / "bundled", KCONFIG, AUTOCONF)
    assert find(str(tmp_path / "state"), **p) == KernelHeaders("bundled", str(tmp_path / "bundled"))
    assert not (tmp_path / "state/kheaders/6.18.0-test").exists()


def test_nothing_usable_is_one_error_naming_each_place_and_the_fixes(tmp_path):
    p = places(tmp_path)
    tree(tmp_path / "bundled", KCONFIG)  # half a tree: no generated autoconf.h
    with pytest.raises(HeadersNotFound) as e:
        find(str(tmp_path / "state"), **p)
    msg = str(e.value)
    assert "kernel 6.18.0-test" in msg
    assert f"{tmp_path}/modules/6.18.0-test/build (the node's headers): absent" in msg
    assert f"{p['kheaders']} (CONFIG_IKHEADERS): absent" in msg
    assert f"{tmp_path}/bundled (the headers nodewire brings): has no {AUTOCONF}" in msg
    assert "linux-headers-$(uname -r)" in msg and "modprobe kheaders" in msg and "nodewire image" in msg


def test_the_bundled_set_install_sh_made_is_a_whole_tree():
    assert headers.whole_tree(headers.BUNDLED), f"run scripts/install.sh: {headers.BUNDLED} is missing"
    assert headers.BUNDLED == Path(sys.prefix, "share/nodewire/kernel-headers")


# -- the real agent on a node without headers ---------------------------------------------------------

def without(*dirs: str, then: str = "true") -> list[str]:
    """argv prefix: a private mount namespace with an empty tmpfs over each dir (the host keeps its own),
    then the shell command `then`, then the command."""
    mounts = " && ".join(f"mount -t tmpfs nodewire-test-empty {d}" for d in dirs)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", f'{mounts} && {then} && exec "$@"', "sh"]


@pytest.mark.root
def test_an_agent_on_a_node_without_headers_compiles_with_its_own_and_serves_a_clusterip(sandbox, tmp_path):
    client, backend = sandbox.add_pod("hdr-client"), sandbox.add_pod("hdr-b1")
    backend.serve(tcp_ports=[8080])
    write(tmp_path / "svc.json", service("hdr", ["10.96.41.1"]), endpoint_slice("hdr", [backend.ip4]))
    agent = AgentProcess(tmp_path, sandbox.cgroup, f"/sys/fs/bpf/{sandbox.prefix}-hdr",
                         extra=["--no-observe", "--no-rdma"], prefix=without("/lib/modules", "/usr/src"))
    try:
        agent.start(timeout=240)
        record = json.loads(Path(state_dir_for(agent.pin_dir), "programs/sock_lb.json").read_text())
        assert record["headers"] == f"bundled:{headers.BUNDLED}"  # compiled here, with the bundled set
        r = client.probe("tcp", "10.96.41.1", 80, count=3)
        assert r["replies"] == {"hdr-b1": 3}
    finally:
        agent.cleanup()


@pytest.mark.root
def test_an_agent_whose_kernel_offers_only_kheaders_compiles_from_them(sandbox, tmp_path):
    """CONFIG_IKHEADERS: the kernel's archive (here the bundled tree packed as the kernel packs it,
    at /sys/kernel/kheaders.tar.xz on a tmpfs over /sys/kernel), unpacked under the state dir."""
    archive = tmp_path / "kheaders.tar.xz"
    subprocess.run(["tar", "-C", str(headers.BUNDLED), "-c", "-I", "xz -0 -T2", "-f", str(archive), "include", "arch"],
                   check=True)
    write(tmp_path / "svc.json", service("kh", ["10.96.41.3"]))
    prefix = without("/lib/modules", "/usr/src", str(headers.BUNDLED.parent), "/sys/kernel",
                     then=f"cp {archive} {headers.KHEADERS}")
    agent = AgentProcess(tmp_path, sandbox.cgroup, f"/sys/fs/bpf/{sandbox.prefix}-kh",
                         extra=["--no-observe", "--no-rdma"], prefix=prefix)
    try:
        agent.start(timeout=240)
        state = Path(state_dir_for(agent.pin_dir))
        record = json.loads((state / "programs/sock_lb.json").read_text())
        release = os.uname().release
        assert record["headers"] == f"kheaders:{state}/kheaders/{release}"
        assert headers.whole_tree(state / "kheaders" / release)
    finally:
        agent.cleanup()


@pytest.mark.root
def test_with_no_headers_anywhere_the_agent_exits_1_with_one_message_and_no_traceback(sandbox, tmp_path):
    write(tmp_path / "svc.json", service("nohdr", ["10.96.41.2"]))
    pin_dir = f"/sys/fs/bpf/{sandbox.prefix}-nohdr"
    prefix = without("/lib/modules", "/usr/src", str(headers.BUNDLED.parent))
    try:
        out = subprocess.run([*prefix, NODEWIRE, "run", "--manifests", str(tmp_path), "--cgroup", sandbox.cgroup,
                              "--pin-dir", pin_dir, "--metrics-addr", "", "--no-observe", "--no-rdma"],
                             capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run([NODEWIRE, "cleanup", "--pin-dir", pin_dir, "--cgroup", sandbox.cgroup], capture_output=True)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out.stderr
    assert "Error: bpf/sock_lb.c: no kernel headers to compile the BPF programs against" in errors[0]
    assert f"{headers.BUNDLED} (the headers nodewire brings): absent" in errors[0]
