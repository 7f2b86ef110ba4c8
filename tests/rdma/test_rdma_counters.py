"""RDMA port counters: fixture counter files change between two scrapes, exported values follow."""
from __future__ import annotations

import os

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.export.telemetry import start_telemetry
from agent.rdma.counters import RdmaPortCounters

COUNTERS = {"port_xmit_data": 1000, "port_rcv_data": 2000, "port_xmit_packets": 10,
            "port_rcv_packets": 20, "port_rcv_errors": 0, "symbol_error": 3}
HW_COUNTERS = {"out_of_sequence": 1, "packet_seq_err": 0, "np_cnp_sent": 5, "rp_cnp_handled": 7,
               "np_ecn_marked_roce_packets": 9, "lifespan": 12}


def write_port(root, dev, port, counters, hw):
    for sub, values in (("counters", counters), ("hw_counters", hw)):
        d = os.path.join(root, "class", "infiniband", dev, "ports", str(port), sub)
        os.makedirs(d, exist_ok=True)
        for name, v in values.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(f"{v}\n")


def scrape() -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in fam.samples:
            if s.name.startswith("nodewire_rdma_port_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def telemetry():
    tel = start_telemetry(None, node_name="test-node")
    yield tel
    tel.shutdown()


def test_counters_move_by_file_deltas(tmp_path, telemetry):
    root = str(tmp_path / "sys")
    write_port(root, "mlx5_0", 1, COUNTERS, HW_COUNTERS)
    write_port(root, "mlx5_1", 1, COUNTERS, {})
    RdmaPortCounters(root).register(telemetry.meter("test"))
    before = scrape()
    write_port(root, "mlx5_0", 1,
               {**COUNTERS, "port_xmit_data": 1250, "port_rcv_packets": 27, "port_rcv_errors": 2},
               {**HW_COUNTERS, "np_cnp_sent": 105, "np_ecn_marked_roce_packets": 10, "lifespan": 99})
    after = scrape()
    delta = {k: after[k] - before[k] for k in after if after[k] != before.get(k)}

    def key(name, dev, **labels):
        return (name, tuple(sorted({"rdma_device": dev, "rdma_port": "1", **labels}.items())))

    assert delta == {
        key("nodewire_rdma_port_io_bytes_total", "mlx5_0", network_io_direction="transmit"): 250 * 4,
        key("nodewire_rdma_port_packets_total", "mlx5_0", network_io_direction="receive"): 7,
        key("nodewire_rdma_port_events_total", "mlx5_0", counter="port_rcv_errors", source="counters"): 2,
        key("nodewire_rdma_port_events_total", "mlx5_0", counter="np_cnp_sent", source="hw_counters"): 100,
        key("nodewire_rdma_port_events_total", "mlx5_0", counter="np_ecn_marked_roce_packets",
            source="hw_counters"): 1,
    }
    assert after[key("nodewire_rdma_port_io_bytes_total", "mlx5_1", network_io_direction="receive")] == 8000
    assert not any("lifespan" in str(k) for k in after)


def test_bad_counter_file_is_skipped_and_named(tmp_path, caplog):
    root = str(tmp_path / "sys")
    write_port(root, "mlx5_0", 1, {**COUNTERS, "port_rcv_errors": "N/A"}, {})
    got = {c.name: c.value for c in RdmaPortCounters(root).read()}
    assert "port_rcv_errors" not in got and got["symbol_error"] == 3
    assert "mlx5_0/ports/1/counters/port_rcv_errors" in caplog.text and "not a number" in caplog.text


def test_no_rdma_is_empty(tmp_path):
    c = RdmaPortCounters(str(tmp_path))
    assert not c.available() and c.read() == []


def test_topology_gauge(tmp_path, telemetry, sysfs):
    from agent.rdma.metrics import register_rdma_metrics
    from test_rdma_topology import dgx_like

    gpus, _ = dgx_like(sysfs)
    register_rdma_metrics(telemetry, sysfs.root)
    got = {}
    for fam in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in fam.samples:
            if s.name == "nodewire_gpu_nic_pcie_distance":
                got[(s.labels["gpu_pci_address"], s.labels["nic_name"])] = (
                    s.value, s.labels["pcie_path_class"], s.labels["nic_closest"])
    assert len(got) == 64
    assert got[(gpus[0], "mlx5_0")] == (0.0, "PIX", "true")
    assert got[(gpus[0], "mlx5_1")] == (1.0, "PXB", "false")
    assert got[(gpus[0], "mlx5_2")] == (3.0, "NODE", "false")
    assert got[(gpus[7], "mlx5_0")] == (4.0, "SYS", "false")
