"""OpenMetrics text of the producers' metrics (kernel counters and histograms), written directly.

Through the SDK path every data point becomes a prometheus_client Sample per bucket (a pod's
histogram is 30 of them) before one line per Sample is formatted; at 1,000 pods that conversion and
its formatting were most of a scrape. This writes the same lines from the OTel `Metric` objects in
one pass: the names, units, label sanitizing, family grouping and number formatting are those of
opentelemetry-exporter-prometheus (_translate_to_prometheus) and prometheus_client's OpenMetrics
writer, reusing their helpers, so the exposition is the same text (tests compare the two, sample by
sample). Only the producers' metrics go this way; the SDK instruments keep the library path.
"""
from __future__ import annotations

from functools import lru_cache
from json import dumps
from typing import Iterable

from opentelemetry.exporter.prometheus._mapping import map_unit, sanitize_attribute, sanitize_full_name
from opentelemetry.sdk.metrics.export import AggregationTemporality, Gauge, Histogram, Metric, Sum
from prometheus_client.utils import floatToGoString as _go_float

# Bucket counts repeat (zeros, a full histogram's tail): formatting each once saves most of the cost.
floatToGoString = lru_cache(maxsize=1 << 16)(_go_float)


def _escape(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _value(v) -> str:
    """A label value as the exporter writes it (_check_value): strings as is, the rest as JSON."""
    return v if isinstance(v, str) else dumps(v, default=str)


@lru_cache(maxsize=1 << 16, typed=True)  # typed: True, 1 and 1.0 are written differently
def _label_cached(v) -> str:
    return _escape(_value(v))


def _label(v) -> str:
    """A label value escaped for the text (namespaces, nodes, pod names repeat across series)."""
    try:
        return _label_cached(v)
    except TypeError:  # unhashable (a list attribute)
        return _escape(_value(v))


def _kind(metric: Metric) -> str | None:
    data = metric.data
    if isinstance(data, Sum):
        gauge = data.is_monotonic is False and data.aggregation_temporality == AggregationTemporality.CUMULATIVE
        return "gauge" if gauge else "counter"
    if isinstance(data, Gauge):
        return "gauge"
    return "histogram" if isinstance(data, Histogram) else None


def _family_name(metric: Metric, kind: str, unit: str) -> str:
    name = sanitize_full_name(metric.name)
    if kind == "counter" and name.endswith("_total"):
        name = name[:-6]
    return name + "_" + unit if unit and not name.endswith("_" + unit) else name


def _bounds(explicit: Iterable[float]) -> list[str]:
    """The le label values: the exporter formats bounds with str(), not the Go float format."""
    return [f"{b}" for b in explicit] + ["+Inf"]


def render(metrics: Iterable[Metric]) -> str:
    """The OpenMetrics lines of these metrics (no `# EOF`): one family per name, description, label
    keys, unit and type, in order of first appearance, as the exporter groups them."""
    families: dict[tuple, tuple[str, str, list[str]]] = {}  # id → (header, family name, lines)
    keys_cache: dict[tuple, tuple[tuple[str, ...], tuple]] = {}
    bounds_cache: dict[tuple, list[str]] = {}
    for metric in metrics:
        kind = _kind(metric)
        if kind is None:
            continue
        unit = map_unit(metric.unit)
        name = _family_name(metric, kind, unit)
        doc = metric.description or ""
        for p in metric.data.data_points:
            items = sorted(p.attributes.items())
            raw = tuple(k for k, _ in items)
            known = keys_cache.get(raw)
            if known is None:
                keys = tuple(sanitize_attribute(k) for k in raw)
                # the sample's labels are a dict (a repeated sanitized key keeps its last value),
                # written sorted by label name
                order = {k: i for i, k in enumerate(keys)}
                known = keys_cache[raw] = (keys, tuple(sorted(order.items())))
            keys, order = known
            fid = (name, doc, keys, unit, kind)
            fam = families.get(fid)
            if fam is None:
                header = f"# HELP {name} {_escape(doc)}\n# TYPE {name} {kind}\n" + (f"# UNIT {name} {unit}\n" if unit else "")
                fam = families[fid] = (header, name, [])
            lines = fam[2]
            vals = [_label(v) for _, v in items]
            labels = ",".join(f'{k}="{vals[i]}"' for k, i in order)
            if kind != "histogram":
                lines.append(f"{name}{'_total' if kind == 'counter' else ''}{{{labels}}} {floatToGoString(p.value)}\n"
                             if labels else f"{name}{'_total' if kind == 'counter' else ''} {floatToGoString(p.value)}\n")
                continue
            _histogram_lines(lines, name, order, vals, p, bounds_cache)
    return "".join(h + "".join(lines) for h, _n, lines in families.values())


def _histogram_lines(lines: list[str], name: str, order, vals, p, bounds_cache) -> None:
    """_bucket lines (le sorted among the labels, as the writer sorts them), then _count and _sum."""
    eb = tuple(p.explicit_bounds)
    les = bounds_cache.get(eb)
    if les is None:
        les = bounds_cache[eb] = _bounds(eb)
    before = ",".join(f'{k}="{vals[i]}"' for k, i in order if k < "le")
    after = ",".join(f'{k}="{vals[i]}"' for k, i in order if k > "le")
    pre = f"{name}_bucket{{{before + ',' if before else ''}le=\""
    post = f"\"{',' + after if after else ''}}} "
    total = 0
    for le, n in zip(les, p.bucket_counts):
        total += n
        lines.append(f"{pre}{le}{post}{floatToGoString(total)}\n")
    if p.sum is not None and float(les[0]) >= 0:
        labels = ",".join(f'{k}="{vals[i]}"' for k, i in order)
        lb = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_count{lb} {floatToGoString(total)}\n")
        lines.append(f"{name}_sum{lb} {floatToGoString(p.sum)}\n")
