"""The conntrack collector's pure parts: its interval and the lifetimes' bounds (no kernel)."""
from __future__ import annotations

import pytest

from agent.datapath.conntrack import ConntrackCollector, Lifetimes, halfopen_evicted


def test_interval_shortens_as_the_maps_fill_and_never_costs_more_than_a_percent_of_a_core():
    c = ConntrackCollector(maps=None, max_interval=30.0, min_interval=1.0)
    assert c.next_interval(0.0, 0.001) == 30.0
    assert c.next_interval(0.5, 0.001) == 15.0
    assert c.next_interval(1.0, 0.001) == 1.0           # a full map: as often as allowed
    assert c.next_interval(1.0, 0.5) == 50.0            # a 0.5 s pass: at most every 50 s (1 %)
    assert c.next_interval(0.0, 2.0) == 200.0


def test_lifetimes_out_of_range_are_refused():
    with pytest.raises(ValueError, match="close"):
        Lifetimes(close=0)
    assert Lifetimes().established == 6 * 3600


def test_half_open_evictions_are_what_no_one_else_removed():
    counters = {"halfopen_inserted": 1000, "halfopen_deleted": 100, "collected_halfopen": 50}
    assert halfopen_evicted(counters, present=200) == 650
    assert halfopen_evicted(counters, present=2000) == 0


def test_pins_of_the_v1_layout_are_removed_and_nothing_else(tmp_path):
    from agent.datapath.conntrack import remove_obsolete_pins

    for name in ("nodewire_ct_v1", "nodewire_np_snat_v1", "nodewire_np_stats_v1", "nodewire_ct_v2",
                 "nodewire_np_services_v1", "nodewire_np_stats_v2"):
        (tmp_path / name).write_text("")
    assert sorted(remove_obsolete_pins(str(tmp_path))) == ["nodewire_ct_v1", "nodewire_np_snat_v1", "nodewire_np_stats_v1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodewire_ct_v2", "nodewire_np_services_v1",
                                                          "nodewire_np_stats_v2"]
    assert remove_obsolete_pins(str(tmp_path)) == []
