"""A short endpoint churn through each source (`nodewire bench churn` is the long one): every update
applied (`nodewire check` clean at the end) and no leaked map entries (kernel = desired)."""
from __future__ import annotations

import pytest

from nodewire_dev.bench.churn import run_churn

pytestmark = pytest.mark.root


@pytest.mark.parametrize("source", ["manifests", "kube"])
def test_short_churn_leaves_the_maps_equal_to_the_desired_state(source, tmp_path):
    r = run_churn(source, services=300, rate=200, seconds=10, workdir=tmp_path)
    assert r["updates"] >= 1000, r
    assert r["check_clean"] and r["drift"] == {}, r
    assert r["kernel_frontends"] == r["desired_frontends"] and r["kernel_backends"] == r["desired_backends"], r
    assert r["map_entries"]["nodewire_services_v1"] == r["desired_service_entries"], r
