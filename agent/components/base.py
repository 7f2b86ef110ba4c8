"""What every part of the agent is: a Component with start / close / status / metrics.

The agent builds the enabled components from the config (agent/components/__init__.py, in start
order), starts them in that order, turns its sync loop, and closes them in reverse order. A component
never reaches into another's fields: it asks the Context for what it needs (the state, the local
API, the telemetry, another component by name), and it gives back its part of the one typed status
(agent/status.py) through status(st).

Hooks of the loop, all optional and all on the loop's thread:
  after_sync(changes, res)  after each apply: what the loop took (Service key → its view) and the
                   datapath's result (the socket sweep, the north-south health servers)
  tick()           every turn of the loop, changed or idle (observer identity, drift check, RDMA opt-ins)
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..config import AgentConfig
    from ..state import ClusterState
    from ..status import AgentStatus

log = logging.getLogger("nodewire.agent")

class Component:
    """A part of the agent. Subclasses override what they need; every hook has a no-op default."""

    name = ""

    enabled_by = ""  # the config key whose truth turns this part on ("": always on)

    @classmethod
    def enabled(cls, cfg: "AgentConfig") -> bool:
        """Whether the config asks for this part (checked once, when the agent is built); override it
        when one key's truth is not the rule."""
        return bool(getattr(cfg, cls.enabled_by)) if cls.enabled_by else True

    def prepare(self, ctx: "Context") -> None:
        """Checks that must fail before the datapath is touched (credentials, files)."""

    def start(self, ctx: "Context") -> None:
        """Acquire what the part needs (threads, sockets, programs); raise to stop the agent's start."""

    def close(self) -> None:
        """Release what start() acquired; the datapath it wrote stays pinned."""

    def status(self, st: "AgentStatus") -> None:
        """Fill this part's fields of the agent's status (called from the status thread)."""

    def metrics(self, telemetry) -> None:
        """Register this part's OTel instruments (observable: read at scrape time) on
        telemetry.meter(name); called once every part started, when the telemetry part is on."""

    def after_sync(self, changes: dict, res) -> None:
        """After a sync that ran: changes as the datapath got them, res its SyncResult."""

    def tick(self) -> None:
        """Every turn of the loop, after the sync (cheap when nothing changed)."""

    def ready(self) -> tuple[bool, str] | None:
        """This part's say in /readyz: None when it has none, else (ready, why)."""
        return None

    def wait_synced(self, timeout: float) -> bool:
        """Sources: True once their first complete read is in the state (the first full sync waits)."""
        return True


class OptionalComponent(Component):
    """A feature not worth losing the datapath over: a failed start is logged and the agent runs
    without it (the observer, RDMA). start_part() does the real start."""

    started = False
    without = "running without it"  # the log line's end when it failed

    def start(self, ctx: "Context") -> None:
        try:
            self.start_part(ctx)
            self.started = True
        except Exception as e:
            log.error("%s failed to start, %s err=%s", self.name, self.without, e)

    def start_part(self, ctx: "Context") -> None:
        raise NotImplementedError


@dataclass
class Context:
    """What the agent hands its parts. `lock` is held by the sync loop while it writes the datapath:
    a part reading the datapath's tables from another thread takes it."""

    cfg: "AgentConfig"
    state: "ClusterState"
    stop: threading.Event
    lock: threading.Lock = field(default_factory=threading.Lock)
    cgroup: str = ""
    telemetry: object | None = None        # export.telemetry.Telemetry, once the telemetry part started
    api: object | None = None              # api.ApiServer, once the local API part started
    healthy: Callable[[], tuple[bool, str]] = lambda: (True, "")
    ready: Callable[[], tuple[bool, str]] = lambda: (True, "")
    report_errors: Callable[[list], None] = lambda errors: None   # ObjectErrors from a source
    note_change: Callable[[float], None] = lambda at: None        # a source changed at wall time `at` (maybe only its errors)
    refused: Callable[[], set] = set                              # Services the datapath refuses now
    parts: dict[str, Component] = field(default_factory=dict)

    def get(self, name: str) -> Component | None:
        """Another (started) part by name, or None when it is not enabled."""
        return self.parts.get(name)
