"""Build nodewire-cni (the C in agent/cni/csrc) into one static executable, agent/cni/bin/nodewire-cni.

The plugin runs on nodes that may have no Python and no shared libraries the runtime can count on
(Container-Optimized OS, Bottlerocket, Talos, Flatcar), so it is linked statically against glibc
(`gcc -static`; Debian's libc6-dev ships libc.a). Static glibc is safe here because the plugin calls
nothing that loads code at run time (no NSS lookups, no iconv, no dlopen): only read/write, a unix
socket, getenv and time. The numbers it shares with the agent come from the agent's own modules, as -D.

Run by scripts/install.sh (make demo / make test) and the image build (`python -m agent.cni.build`);
`nodewire cni install` builds it when the package came without one and a compiler is there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).with_name("csrc")
BINARY = Path(__file__).with_name("bin") / "nodewire-cni"
CFLAGS = ("-static", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-s")


class BuildError(Exception):
    pass


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.c")) + sorted(SOURCE_DIR.glob("*.h"))


def defines() -> list[str]:
    from ..api import MAX_LINE
    from ..config import DEFAULT_PIN_DIR, state_dir_for

    socket = os.path.join(state_dir_for(DEFAULT_PIN_DIR), "api.sock")
    return [f'-DNW_DEFAULT_SOCKET="{socket}"', f"-DNW_MAX_LINE={MAX_LINE}"]


def stale(out: Path = BINARY) -> bool:
    """True when the binary is missing or older than a source (or than this file's flags)."""
    try:
        built = out.stat().st_mtime
    except FileNotFoundError:
        return True
    return any(p.stat().st_mtime > built for p in [*sources(), Path(__file__)])


def build(out: Path = BINARY, cc: str | None = None) -> Path:
    """Compile into `out` (atomically: a runtime exec'ing it never sees half a file)."""
    cc = cc or os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BuildError("nodewire-cni: no C compiler (gcc) to build it with; run scripts/install.sh, "
                         "or install gcc and libc6-dev")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.build")
    cmd = [cc, *CFLAGS, *defines(), "-o", str(tmp), *map(str, sorted(SOURCE_DIR.glob("*.c"))), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"building nodewire-cni failed ({' '.join(cmd)}):\n{r.stderr.strip()}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    return out


def ensure(out: Path = BINARY) -> Path:
    """The binary, built first when missing or stale (stale and no compiler: the one there is)."""
    if not stale(out):
        return out
    try:
        return build(out)
    except BuildError:
        if out.exists():
            return out
        raise


def main() -> None:
    try:
        path = build() if "--force" in sys.argv[1:] else ensure()
    except BuildError as e:
        sys.exit(str(e))
    print(path)


if __name__ == "__main__":
    main()
