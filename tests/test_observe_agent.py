"""`nodewire run` with its default telemetry: kube-proxy's programming-latency metric for a change
with a known trigger time, and the observer running without BCC in the agent process."""
from __future__ import annotations

import time
import urllib.request
from datetime import datetime, timezone

import pytest

from tests.conftest import wait_for
from tests.manifests import endpoint_slice, service, write
from tests.observe_helpers import free_port, samples

pytestmark = pytest.mark.root


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_programming_latency_counts_from_the_slice_trigger_time_and_observe_needs_no_bcc(agent_factory, tmp_path):
    port = free_port()
    agent = agent_factory(tmp_path, pin_suffix="-obsagent", extra=["--metrics-addr", f"127.0.0.1:{port}"]).start()
    name = "kubeproxy_network_programming_duration_seconds"
    before = samples(scrape(port), name + "_count")
    n0 = sum(before.values())
    trigger = int(time.time()) - 3   # the annotation has second precision (metav1.Time)
    sl = endpoint_slice("lat", ["10.244.9.9"])
    sl["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time":
                                     datetime.fromtimestamp(trigger, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    s0 = sum(samples(scrape(port), name + "_sum").values())
    written = time.time()
    write(tmp_path / "lat.json", service("lat", ["10.96.9.9"]), sl)
    wait_for(lambda: sum(samples(scrape(port), name + "_count").values()) > n0, 30, what="the change programmed")
    seen = time.time()
    text = scrape(port)
    assert sum(samples(text, name + "_count").values()) == n0 + 1
    got = sum(samples(text, name + "_sum").values()) - s0
    assert written - trigger <= got <= seen - trigger, (got, written - trigger, seen - trigger)
    assert samples(text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds")
    assert list(samples(text, "nodewire_observer_probe_status", nodewire_probe="sock_ops").values()) == [1.0]
    with open(f"/proc/{agent.proc.pid}/maps") as f:  # observability loaded through the compile child
        mapped = {line.split()[-1] for line in f if "/" in line}
    assert not [m for m in mapped if "libbcc" in m or "LLVM" in m or "clang" in m], sorted(mapped)
