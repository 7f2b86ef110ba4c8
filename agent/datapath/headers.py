"""Which kernel headers the compile child hands to BCC: the node's, the kernel's own, or ours.

BCC compiles every bpf/ program against a kernel header tree. It looks for one at
`/lib/modules/<release>/build` (with `…/source` beside it when a distribution splits the tree, as
Debian does), else at the `BCC_KERNEL_SOURCE` directory, which must then be one whole tree: BCC runs
clang inside it with relative include paths (`include`, `arch/<arch>/include`, their `generated/`)
and `-include ./include/linux/kconfig.h` (BCC 0.26 `src/cc/frontends/clang/loader.cc` and
`kbuild_helper.cc`). Many nodes have no such tree (Container-Optimized OS, Bottlerocket, Talos, node
images without a headers package), so the agent looks, in this order, for:

1. the node's own tree at `/lib/modules/<release>/build` (BCC's default: nothing to set);
2. the kernel's own headers, `/sys/kernel/kheaders.tar.xz` (CONFIG_IKHEADERS), extracted once into
   `<state dir>/kheaders/<release>` (one whole tree, as the kernel packs it);
3. the bundled set at `<sys.prefix>/share/nodewire/kernel-headers`: Debian's linux-headers merged into
   one tree, carried by the image (`/opt/nodewire/venv/...`) and made by scripts/install.sh for a
   venv install (hard links to the Debian headers under /usr/src).

Headers of another release are fine here: the programs use only uapi types, tracepoint arguments and
helpers (ENVIRONMENT.md: Debian's 6.1 headers serve the 6.18 kernel).
"""
from __future__ import annotations

import lzma
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

KHEADERS = "/sys/kernel/kheaders.tar.xz"
MODULES = "/lib/modules"
BUNDLED = Path(sys.prefix, "share", "nodewire", "kernel-headers")
_KCONFIG = "include/linux/kconfig.h"      # BCC's own test for a usable tree (loader.cc)
_AUTOCONF = "include/generated/autoconf.h"  # kconfig.h includes it; a tree without it cannot compile


class HeadersNotFound(RuntimeError):
    """No kernel header tree BCC can compile against; the message says what was looked for and the fix."""


@dataclass(frozen=True)
class KernelHeaders:
    kind: str   # "node", "kheaders" or "bundled"
    path: str

    def env(self) -> dict[str, str]:
        """What the compile child's environment needs so BCC uses this tree."""
        return {} if self.kind == "node" else {"BCC_KERNEL_SOURCE": self.path}

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def whole_tree(path: Path) -> bool:
    """A tree BCC can use as BCC_KERNEL_SOURCE: kconfig.h and the generated autoconf.h in one place."""
    return (path / _KCONFIG).is_file() and (path / _AUTOCONF).is_file()


def node_tree(kdir: Path) -> bool:
    """BCC's own rule for /lib/modules/<release>: build/ and source/ both present → the sources are in
    source/ (and the generated files in build/), else everything is in build/."""
    build, source = kdir / "build", kdir / "source"
    top = source if build.is_dir() and source.is_dir() else build
    return (top / _KCONFIG).is_file()


def find(state_dir: str, release: str | None = None, modules: str = MODULES, kheaders: str = KHEADERS,
         bundled: Path = BUNDLED) -> KernelHeaders:
    """The first usable tree in the documented order; HeadersNotFound naming every place looked at."""
    release = release or os.uname().release
    kdir = Path(modules, release)
    if node_tree(kdir):
        return KernelHeaders("node", str(kdir / "build"))
    looked = [f"{kdir}/build (the node's headers): {_absent(kdir / 'build')}"]
    if os.path.isfile(kheaders):
        try:
            return KernelHeaders("kheaders", str(extract_kheaders(kheaders, Path(state_dir, "kheaders", release))))
        except (OSError, tarfile.TarError, lzma.LZMAError, ValueError) as e:
            looked.append(f"{kheaders}: cannot extract it ({e})")
    else:
        looked.append(f"{kheaders} (CONFIG_IKHEADERS): absent")
    if whole_tree(bundled):
        return KernelHeaders("bundled", str(bundled))
    looked.append(f"{bundled} (the headers nodewire brings): {_absent(bundled, whole=True)}")
    raise HeadersNotFound(
        f"no kernel headers to compile the BPF programs against (kernel {release}). Looked for: "
        + "; ".join(looked)
        + ". Fix one of: install the node's kernel headers (e.g. linux-headers-$(uname -r)) so "
        f"{kdir}/build exists; or load the kernel's own (`modprobe kheaders`, kernels built with "
        "CONFIG_IKHEADERS); or run the nodewire image, which carries them; or, for a venv install, "
        "run scripts/install.sh, which puts Debian's linux-headers there.")


def _absent(path: Path, whole: bool = False) -> str:
    if not path.exists():
        return "absent"
    return f"has no {_AUTOCONF}" if whole and (path / _KCONFIG).is_file() else f"has no {_KCONFIG}"


def extract_kheaders(archive: str, dest: Path) -> Path:
    """The kernel's header archive unpacked at dest, once: a later start (same release) reuses it.
    Unpacked beside dest and renamed into place, so a half-written tree is never used. Only plain
    files and directories with relative paths inside the tree are taken (the archive holds nothing else)."""
    if whole_tree(dest):
        return dest
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:xz") as tar:
            members = [m for m in tar.getmembers() if _safe(m)]
            tar.extractall(tmp, members=members)
        if not whole_tree(tmp):
            raise ValueError(f"it holds no {_KCONFIG} and {_AUTOCONF}")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _safe(m: tarfile.TarInfo) -> bool:
    parts = Path(m.name).parts
    return (m.isfile() or m.isdir()) and not Path(m.name).is_absolute() and ".." not in parts
