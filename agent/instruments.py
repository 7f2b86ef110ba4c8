"""Observable OTel instruments declared as rows, so a module lists what it exports instead of repeating
the registration call per instrument.

A row is (kind, name, unit, description, read): `read(options)` returns the current observations when
the exporter asks (the collector protocol: nothing is pushed, no thread per metric). Neutral on purpose:
sources, datapath, export and rdma all declare their instruments through it.
"""
from __future__ import annotations

from typing import Callable, Iterable

GAUGE, COUNTER = "gauge", "counter"
Row = tuple[str, str, str, str, Callable]


def register(meter, rows: Iterable[Row]) -> None:
    """Create one observable gauge or counter per row on `meter`."""
    for kind, name, unit, description, read in rows:
        if kind not in (GAUGE, COUNTER):
            raise ValueError(f"instrument {name}: kind {kind!r} is neither {GAUGE!r} nor {COUNTER!r}")
        create = meter.create_observable_gauge if kind == GAUGE else meter.create_observable_counter
        create(name, unit=unit, description=description, callbacks=[read])
