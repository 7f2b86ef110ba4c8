"""kube-proxy's operational metrics, under kube-proxy's names and buckets, so alerts and dashboards
written for kube-proxy carry over (pkg/proxy/metrics/metrics.go in kubernetes/kubernetes):

  kubeproxy_network_programming_duration_seconds   histogram: from a change's trigger time to the
        map write that programmed it. The trigger is the EndpointSlice's
        endpoints.kubernetes.io/last-change-trigger-time annotation (when the endpoints controller
        saw the Pod/Service change) for a slice that changed since the last sync; without it, the
        time the agent loop took the change in (kube-proxy records nothing then).
  kubeproxy_sync_proxy_rules_duration_seconds       histogram: one reconciler apply
  kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge: end of the last successful sync
  kubeproxy_sync_proxy_rules_service_changes_pending gauge: Services changed (Service or slice), not
        yet programmed (nodewire tracks changes per Service, so there is no separate endpoint count)

The agent loop calls it at one place:  with metrics.sync(changes, state): reconciler.apply(...)
"""
from __future__ import annotations

import time
from contextlib import contextmanager

# kube-proxy's buckets (metrics.go): programming latency 0.25 s .. 5 min, sync 1 ms .. 16 s
PROGRAMMING_BUCKETS = (0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30))
SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))


def views():
    """The buckets above, as SDK views (given to the MeterProvider by start_telemetry)."""
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    return [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation([float(b) for b in buckets]))
            for name, buckets in (("kubeproxy_network_programming_duration", PROGRAMMING_BUCKETS),
                                  ("kubeproxy_sync_proxy_rules_duration", SYNC_BUCKETS))]


class ProxyMetrics:
    def __init__(self, meter, pending=lambda: 0, clock=time.time):
        """pending: () → Services with unprogrammed changes. clock: wall time (trigger times are)."""
        from opentelemetry.metrics import Observation

        self.clock = clock
        self.last_success = 0.0
        self._seen: dict[tuple, float] = {}   # slice key → trigger time already programmed
        self.programming = meter.create_histogram(
            "kubeproxy_network_programming_duration", unit="s",
            description="In-cluster network programming latency: change trigger time to map write")
        self.sync_duration = meter.create_histogram(
            "kubeproxy_sync_proxy_rules_duration", unit="s", description="One sync of the service maps")
        meter.create_observable_gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp", unit="s",
            description="The last time the service maps were successfully synced",
            callbacks=[lambda _o: [Observation(self.last_success)] if self.last_success else []])
        meter.create_observable_gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending", unit="",
            description="Services with changes (Service or EndpointSlice) not yet programmed",
            callbacks=[lambda _o: [Observation(pending())]])

    def triggers(self, changes, state, took_at: float) -> list[float]:
        """One trigger time per changed Service: the earliest new slice annotation, else took_at."""
        out = []
        for svc_key in changes:
            new = []
            for sl_key, sl in state.slices_of(svc_key):
                t = sl.trigger_time
                if t is not None and self._seen.get(sl_key) != t:
                    new.append(t)
                    self._seen[sl_key] = t
            out.append(min(new) if new else took_at)
        return out

    @contextmanager
    def sync(self, changes, state):
        """Around one reconciler apply of `changes` (Service key → frontends)."""
        took_at = self.clock()
        triggers = self.triggers(changes, state, took_at) if changes else []
        t0 = time.perf_counter()
        yield
        self.sync_duration.record(time.perf_counter() - t0)
        done = self.clock()
        self.last_success = done
        for t in triggers:
            self.programming.record(max(0.0, done - t))
