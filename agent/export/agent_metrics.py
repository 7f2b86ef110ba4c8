"""The agent's own metrics (map fill, reconciler runs and errors, object errors), read at scrape time.

Observable instruments: the exporter asks, the callbacks read the agent's current numbers; nothing
is pushed from the agent loop.
"""
from __future__ import annotations

from typing import Callable, Protocol

from ..instruments import COUNTER, GAUGE, register
from ..status import Counters, MapFill, SyncInfo


class AgentView(Protocol):
    """What the metrics read from the agent."""

    def map_fill(self) -> dict[str, MapFill]: ...
    def service_count(self) -> int: ...
    counters: Counters
    last_sync: SyncInfo | None


def register_agent_metrics(meter, agent: AgentView) -> None:
    from opentelemetry.metrics import Observation

    def per_map(value: Callable[[MapFill], int]):
        return lambda _o: [Observation(value(m), {"map": name}) for name, m in agent.map_fill().items()]

    def one(value: Callable[[], float]):
        return lambda _o: [Observation(value())]

    register(meter, [
        (GAUGE, "nodewire.map.entries", "1", "Entries in each service-datapath map", per_map(lambda m: m.entries)),
        (GAUGE, "nodewire.map.capacity", "1", "Capacity (max_entries) of each map", per_map(lambda m: m.capacity)),
        (COUNTER, "nodewire.sync.runs", "1", "Reconciler runs", one(lambda: agent.counters.syncs)),
        (COUNTER, "nodewire.sync.errors", "1", "Services refused by the reconciler (full map, clash)",
         one(lambda: agent.counters.sync_errors)),
        (COUNTER, "nodewire.object.errors", "1", "Objects rejected by validation",
         one(lambda: agent.counters.object_errors)),
        (GAUGE, "nodewire.sync.last_duration", "s", "Duration of the last reconciler run",
         one(lambda: agent.last_sync.seconds if agent.last_sync else 0.0)),
        (GAUGE, "nodewire.services", "1", "Services in the datapath", one(agent.service_count)),
    ])
