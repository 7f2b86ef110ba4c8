"""agent/instruments.py: rows become observable instruments that read their value at collection time."""
from __future__ import annotations

import pytest
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from agent.instruments import COUNTER, GAUGE, register


def test_rows_become_gauges_and_counters_read_at_collection():
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    value = {"n": 3}
    register(meter, [(GAUGE, "t.level", "1", "a level", lambda _o: [Observation(value["n"], {"k": "a"})]),
                     (COUNTER, "t.total", "s", "a total", lambda _o: [Observation(value["n"] * 2)])])
    value["n"] = 5  # read when collected, not when registered
    metrics = {m.name: m for rm in reader.get_metrics_data().resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics}
    level, total = metrics["t.level"], metrics["t.total"]
    assert [(p.value, dict(p.attributes)) for p in level.data.data_points] == [(5, {"k": "a"})]
    assert [p.value for p in total.data.data_points] == [10] and total.data.is_monotonic and total.unit == "s"


def test_an_unknown_kind_names_the_instrument():
    meter = MeterProvider().get_meter("t")
    with pytest.raises(ValueError, match="instrument t.x: kind 'histogram'"):
        register(meter, [("histogram", "t.x", "1", "", lambda _o: [])])
