"""Keeping nodewire in the node's CNI chain: the agent watches the CNI conf dir (inotify, through
watchfiles) and appends nodewire-cni again when the primary plugin rewrites its conflist, as
flannel's install step does each time it restarts (nodewire would otherwise drop out of the chain
until `nodewire cni install` ran again).

Only a chain that `nodewire cni install` set up is kept: the mark is the original it kept beside
the primary (`*.nodewire-orig`), so a node where nodewire was never installed is never touched, and
`nodewire cni uninstall` (which puts the originals back) ends the keeping at once, even with the
agent running. The rewritten file is the primary's newest own configuration: it becomes the kept
original (install_conf), so an uninstall restores what the primary wrote last.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from .install import BACKUP_SUFFIX, PLUGIN_TYPE, InstallError, PluginSettings, install_conf, load_conf, primary_conf

log = logging.getLogger("nodewire.cni")

SAFETY_SCAN_MS = 30_000  # a look at the dir even without events (a missed event, a dir recreated)


def managed(conf_dir: str) -> bool:
    """`nodewire cni install` ran against this dir (and no uninstall since)."""
    d = Path(conf_dir)
    return d.is_dir() and any(d.glob(f"*{BACKUP_SUFFIX}"))


def settings_of(entry: dict, fallback: PluginSettings) -> PluginSettings:
    """The plugin entry install wrote (its socket, failOpen, log file, timeout), to write it back as it was."""
    return PluginSettings(socket=entry.get("socket") or fallback.socket,
                          fail_open=entry.get("failOpen", fallback.fail_open),
                          log_file=entry.get("logFile", fallback.log_file),
                          timeout=entry.get("timeout", fallback.timeout))


class ChainKeeper:
    def __init__(self, conf_dir: str, fallback: PluginSettings):
        self.conf_dir, self.settings = conf_dir, fallback
        self.restored = 0   # times nodewire was appended again
        self.looked = 0     # looks at the dir (one per batch of events, and at start)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "ChainKeeper":
        if not Path(self.conf_dir).is_dir():
            log.info("cni conf dir %s does not exist: the chain is not watched", self.conf_dir)
            return self
        self._remember_entry()
        self.check()  # the primary may have rewritten its file while the agent was down
        self._thread = threading.Thread(target=self._run, name="cni-chain", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _remember_entry(self) -> None:
        path = primary_conf(self.conf_dir)
        try:
            plugins = load_conf(path)["plugins"] if path else []
        except (InstallError, OSError):
            return
        mine = [p for p in plugins if isinstance(p, dict) and p.get("type") == PLUGIN_TYPE]
        if mine:
            self.settings = settings_of(mine[-1], self.settings)

    def check(self) -> bool:
        """Append nodewire to the primary conflist when it is missing there (True when it did)."""
        self.looked += 1
        if not managed(self.conf_dir):
            return False
        path = primary_conf(self.conf_dir)
        if path is None:
            return False
        try:
            plugins = load_conf(path)["plugins"]
        except (InstallError, OSError) as e:  # mid-write or renamed: the next event looks again
            log.debug("cni conf not read path=%s err=%s", path, e)
            return False
        if path.suffix == ".conflist" and isinstance(plugins[-1], dict) and plugins[-1].get("type") == PLUGIN_TYPE:
            return False
        try:
            target = install_conf(self.conf_dir, self.settings)
        except (InstallError, OSError) as e:
            self._error(f"nodewire not chained again into {path}: {e}")
            return False
        self.restored += 1
        log.info("cni chain restored conf=%s (the primary plugin rewrote it; original kept as %s%s)",
                 target, path.name, BACKUP_SUFFIX)
        return True

    def status(self) -> dict:
        return {"conf_dir": self.conf_dir, "watched": self._thread is not None, "managed": managed(self.conf_dir),
                "looked": self.looked, "restored": self.restored, "errors": self.errors[-5:]}

    def _run(self) -> None:
        from watchfiles import watch

        while not self._stop.is_set():
            try:
                for _changes in watch(self.conf_dir, watch_filter=None, debounce=200, step=20, stop_event=self._stop,
                                      rust_timeout=SAFETY_SCAN_MS, yield_on_timeout=True, raise_interrupt=False):
                    self.check()
            except Exception as e:  # the dir went away, inotify limits: look again in a while
                self._error(f"watching {self.conf_dir}: {e}")
                self._stop.wait(5)

    def _error(self, msg: str) -> None:
        self.errors = (self.errors + [msg])[-20:]
        log.error("cni: %s", msg)
