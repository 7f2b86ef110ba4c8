"""The agent's own metrics (map fill, reconciler runs and errors, object errors), read at scrape time.

Observable instruments: the exporter asks, the callbacks read the agent's current numbers; nothing
is pushed from the agent loop.
"""
from __future__ import annotations

from typing import Callable, Protocol

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

    meter.create_observable_gauge(
        "nodewire.map.entries", unit="1", description="Entries in each service-datapath map",
        callbacks=[per_map(lambda m: m.entries)])
    meter.create_observable_gauge(
        "nodewire.map.capacity", unit="1", description="Capacity (max_entries) of each map",
        callbacks=[per_map(lambda m: m.capacity)])
    meter.create_observable_counter(
        "nodewire.sync.runs", unit="1", description="Reconciler runs",
        callbacks=[one(lambda: agent.counters.syncs)])
    meter.create_observable_counter(
        "nodewire.sync.errors", unit="1", description="Services refused by the reconciler (full map, clash)",
        callbacks=[one(lambda: agent.counters.sync_errors)])
    meter.create_observable_counter(
        "nodewire.object.errors", unit="1", description="Objects rejected by validation",
        callbacks=[one(lambda: agent.counters.object_errors)])
    meter.create_observable_gauge(
        "nodewire.sync.last_duration", unit="s", description="Duration of the last reconciler run",
        callbacks=[one(lambda: agent.last_sync.seconds if agent.last_sync else 0.0)])
    meter.create_observable_gauge(
        "nodewire.services", unit="1", description="Services in the datapath",
        callbacks=[one(agent.service_count)])
