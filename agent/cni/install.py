"""`nodewire cni install|uninstall`: the plugin into the CNI bin dir, nodewire chained into the node's
network configuration.

The runtime (containerd, CRI-O) uses the first file of the conf dir, in lexical order, that ends in
.conflist/.conf/.json (libcni's ConfFiles + containerd's "lowest name wins"). That file is the primary
CNI's; nodewire is appended as the last plugin of its list, so the primary still runs first and
nodewire sees its prevResult. The original is kept beside it as `<file>.nodewire-orig` (an extension
runtimes ignore) and put back by uninstall. Every write is a temp file renamed over the target, so a
runtime reading the dir mid-install sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

PLUGIN_TYPE = "nodewire-cni"
BACKUP_SUFFIX = ".nodewire-orig"
CONF_EXTENSIONS = (".conflist", ".conf", ".json")
LEGACY_DIR = f".{PLUGIN_TYPE}"  # where the Python plugin (before the static one) kept its module


class InstallError(Exception):
    pass


@dataclass(frozen=True)
class PluginSettings:
    socket: str
    fail_open: bool = True
    log_file: str | None = None
    timeout: float = 5.0

    def entry(self) -> dict:
        e = {"type": PLUGIN_TYPE, "socket": self.socket, "failOpen": self.fail_open, "timeout": self.timeout}
        if self.log_file:
            e["logFile"] = self.log_file
        return e


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.nodewire-tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install_binary(bin_dir: str) -> Path:
    """The static plugin (agent/cni/build.py; built now when the package came without it) copied to
    `<bin>/nodewire-cni`. A node needs nothing else to run it: no interpreter, no shared library."""
    from .build import BuildError, ensure

    try:
        binary = ensure()
    except BuildError as e:
        raise InstallError(str(e)) from None
    target = Path(bin_dir, PLUGIN_TYPE)
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(target, binary.read_bytes(), 0o755)
    import shutil

    shutil.rmtree(Path(bin_dir, LEGACY_DIR), ignore_errors=True)  # the module of the Python plugin
    return target


def primary_conf(conf_dir: str) -> Path | None:
    d = Path(conf_dir)
    if not d.is_dir():
        return None
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in CONF_EXTENSIONS)
    return files[0] if files else None


def load_conf(path: Path) -> dict:
    """A network configuration file as a conflist (a single-plugin .conf becomes a list of one)."""
    try:
        conf = json.loads(path.read_text())
    except ValueError as e:
        raise InstallError(f"{path}: not JSON: {e}") from None
    if not isinstance(conf, dict):
        raise InstallError(f"{path}: not a JSON object")
    if "plugins" not in conf:  # a single-plugin .conf becomes a list of one
        if "type" not in conf:
            raise InstallError(f"{path}: neither plugins nor type: not a CNI network configuration")
        conf = {"cniVersion": conf.get("cniVersion", "0.4.0"), "name": conf.get("name", "default"),
                "plugins": [{k: v for k, v in conf.items() if k not in ("cniVersion", "name")}]}
    if not isinstance(conf["plugins"], list) or not conf["plugins"]:
        raise InstallError(f"{path}: plugins must be a non-empty list")
    return conf


def _has_nodewire(conf: dict) -> bool:
    return any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE for p in conf["plugins"])


def chained(conf: dict, settings: PluginSettings) -> dict:
    """conf with nodewire as its last plugin (an existing nodewire entry is replaced, not doubled)."""
    plugins = [p for p in conf["plugins"] if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    if not plugins:
        raise InstallError("the configuration has no primary plugin to chain after")
    return dict(conf, plugins=plugins + [settings.entry()])


def install_conf(conf_dir: str, settings: PluginSettings) -> Path:
    path = primary_conf(conf_dir)
    if path is None:
        raise InstallError(f"no CNI network configuration in {conf_dir} yet (the primary CNI writes it)")
    conf = load_conf(path)
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if not backup.exists() or not _has_nodewire(conf):  # without nodewire it is the primary's own, newest
        _write_atomic(backup, path.read_bytes(), 0o644)
    target = path if path.suffix == ".conflist" else path.with_suffix(".conflist")
    _write_atomic(target, (json.dumps(chained(conf, settings), indent=2) + "\n").encode(), 0o644)
    if target != path:  # a .conf turned into a .conflist of the same name: one of them may remain
        path.unlink()
    return target


def uninstall(conf_dir: str, bin_dir: str | None) -> list[str]:
    """Put every original back (or take nodewire out of a list with no original); remove the binary."""
    done = []
    d = Path(conf_dir)
    for backup in sorted(d.glob(f"*{BACKUP_SUFFIX}")) if d.is_dir() else []:
        original = backup.with_name(backup.name[: -len(BACKUP_SUFFIX)])
        converted = original.with_suffix(".conflist")
        if converted != original and converted.exists():
            converted.unlink()
        os.replace(backup, original)
        done.append(f"restored {original}")
    for path in sorted(d.glob("*.conflist")) if d.is_dir() else []:
        conf = load_conf(path)
        plugins = [p for p in conf["plugins"] if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
        if len(plugins) != len(conf["plugins"]):
            _write_atomic(path, (json.dumps(dict(conf, plugins=plugins), indent=2) + "\n").encode(), 0o644)
            done.append(f"removed nodewire from {path}")
    if bin_dir:
        import shutil

        try:
            Path(bin_dir, PLUGIN_TYPE).unlink()
            done.append(f"removed {Path(bin_dir, PLUGIN_TYPE)}")
        except FileNotFoundError:
            pass
        shutil.rmtree(Path(bin_dir, LEGACY_DIR), ignore_errors=True)
    return done
