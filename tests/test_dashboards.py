"""Every query of every Grafana dashboard in deploy/grafana/, evaluated by a real Prometheus that
scrapes the real agent (`nodewire run`) while sandbox pods make traffic through a ClusterIP Service.
North-south panels (nodewire_northsouth_*, nodewire_conntrack_*) are evaluated against a second
agent, inside a node of the multi-node sandbox with `--devices eth0`, while its external client
connects to NodePorts (one with endpoints, one without: rejects); Prometheus reaches that agent's
/metrics through a relay into the node's namespace (tests/netns_relay.py).

A panel "has data" when its query returns at least one series with a number (not NaN) in it; a
template variable has data when its label_values() query lists at least one value.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nodewire_dev.sandbox.multinode import MultiNodeSandbox
from tests.conftest import AgentProcess, wait_for
from tests.manifests import endpoint_slice, service, write
from tests.netns_relay import NetnsRelay
from tests.observe_helpers import PrometheusServer, free_port, sh

pytestmark = pytest.mark.root

# The dashboards fed by this module's sandbox traffic; rdma.json needs the mock verbs stack and is
# checked panel by panel in tests/rdma/test_rdma_verbs.py.
DASHBOARDS = [Path(__file__).resolve().parents[1] / "deploy" / "grafana" / f"{name}.json"
              for name in ("node", "pod-network", "services")]
NODE = "dash-node"
RATE_INTERVAL = "20s"
NORTHSOUTH_METRICS = ("nodewire_northsouth_", "nodewire_conntrack_")  # served by the --devices agent


def pod_manifest(p, veth: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "annotations": {"nodewire.io/host-veth": veth}},
            "spec": {"nodeName": NODE}, "status": {"podIPs": [{"ip": p.ip4}, {"ip": p.ip6}]}}


@pytest.fixture(scope="module")
def live(sandbox, agent_factory, tmp_path_factory):
    client, web = sandbox.add_pod("dclient"), sandbox.add_pod("dweb")
    web.serve(tcp_ports=[8080])
    port = free_port()
    agent = agent_factory(tmp_path_factory.mktemp("dash-manifests"), extra=(
        "--metrics-addr", f"127.0.0.1:{port}", "--node-name", NODE, "--veth-netns", sandbox.node_netns))
    write(agent.manifests / "pods.json", pod_manifest(client, client.host_veth), pod_manifest(web, web.host_veth))
    write(agent.manifests / "svc.json", service("dweb", ["10.96.44.1"], port_name="http"),
          endpoint_slice("dweb", [web.ip4], port_name="http"),
          service("dnone", ["10.96.44.2"]), endpoint_slice("dnone", []))
    agent.start()
    # one retransmit, so the retransmit series exists: the web pod drops the first data segment once
    sh(web.netns, "nft", "-f", "-", input="""
table inet dash {
  chain input { type filter hook input priority 0;
    tcp dport 8080 ip length > 52 quota until 100 bytes drop
  }
}
""")
    load = client.popen([sys.executable, "-c", """
import socket, time
while True:
    for vip in ("10.96.44.1", "10.96.44.2"):
        try:
            s = socket.create_connection((vip, 80), timeout=3); s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n"); s.recv(100); s.close()
        except OSError:
            pass
    time.sleep(0.05)
"""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # an EndpointSlice change every second, so kube-proxy's programming-latency rates have data
    stop = threading.Event()

    def tick():
        n = 0
        while not stop.wait(1.0):
            n += 1
            write(agent.manifests / "tick.json", service("dtick", ["10.96.44.3"]),
                  endpoint_slice("dtick", [f"10.244.99.{1 + n % 2}"]))

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    prom = PrometheusServer(f"127.0.0.1:{port}", tmp_path_factory.mktemp("dash-prom"))
    try:
        for metric in ("nodewire_tcp_connect_duration_seconds", "nodewire_service_connect_duration_seconds",
                       "nodewire_service_srtt_seconds", "kubeproxy_network_programming_duration_seconds"):
            wait_for(lambda: prom.query(f'count(rate({metric}_bucket[{RATE_INTERVAL}]) > 0)'),
                     30, 0.5, f"{metric} rates in prometheus")
        prom.agent_url = f"http://127.0.0.1:{port}/metrics"
        yield prom
    finally:
        stop.set()
        ticker.join()
        load.kill()
        load.wait()
        prom.close()


@pytest.fixture(scope="module")
def ns_live(tmp_path_factory):
    """Prometheus scraping an agent with --devices inside a sandbox node, with NodePort traffic."""
    d = tmp_path_factory.mktemp("dash-northsouth")
    with MultiNodeSandbox(1) as sb:
        node = sb.nodes[0]
        pod = sb.add_pod(node, "dnp")
        pod.serve(tcp_ports=[8080])
        objs = []
        for name, port, members in (("dnp", 30300, [pod.ip4]), ("dnp-empty", 30301, [])):
            s = service(name, [f"10.96.45.{port - 30299}"])
            s["spec"]["type"] = "NodePort"
            s["spec"]["ports"][0]["nodePort"] = port
            objs += [s, endpoint_slice(name, members)]
        write(d / "np.json", *objs)
        agent = AgentProcess(d, node.cgroup, node.pin_dir, prefix=node.nsenter([]),
                             extra=["--node-name", NODE, "--devices", "eth0", "--no-observe", "--no-rdma",
                                    "--metrics-addr", "127.0.0.1:9966"])
        relay = NetnsRelay(node.netns, 9966)
        load = prom = None
        try:
            agent.start()
            load = sb.client.popen([sys.executable, "-c", f"""
import socket, time
while True:
    for port in (30300, 30301):
        try:
            s = socket.create_connection(({node.addr4!r}, port), timeout=1); s.sendall(b"x"); s.recv(100); s.close()
        except OSError:
            pass
    time.sleep(0.05)
"""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            prom = PrometheusServer(f"127.0.0.1:{relay.port}", tmp_path_factory.mktemp("dash-ns-prom"))
            wait_for(lambda: prom.query(f'sum(rate(nodewire_northsouth_packets_total[{RATE_INTERVAL}])) > 0'),
                     30, 0.5, "north-south packet rates in prometheus")
            yield prom
        finally:
            if load is not None:
                load.kill()
                load.wait()
            if prom is not None:
                prom.close()
            relay.close()
            agent.cleanup()


def variables(dash: dict) -> list[dict]:
    return [v for v in dash["templating"]["list"] if v["type"] == "query"]


def substitute(expr: str) -> str:
    """What Grafana sends with every variable at "All" (allValue .*)."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", "5s")
    return re.sub(r"\$\{?(cluster|node|namespace|pod|service)\}?", ".*", expr)


def panel_queries(northsouth: bool = False):
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for t in panel["targets"]:
                if any(m in t["expr"] for m in NORTHSOUTH_METRICS) == northsouth:
                    yield pytest.param(t["expr"], id=f"{path.stem}:{panel['title']}:{t['refId']}")


def variable_queries():
    for path in DASHBOARDS:
        for v in variables(json.loads(path.read_text())):
            yield pytest.param(v["query"]["query"], id=f"{path.stem}:${v['name']}")


def test_dashboards_are_importable_grafana_json():
    assert all(p.is_file() for p in DASHBOARDS)
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["schemaVersion"] >= 39 and d["uid"].startswith("nodewire-") and d["panels"]
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        names = [v["name"] for v in d["templating"]["list"]]
        assert names[:3] == ["datasource", "cluster", "node"], f"{path.name}: variables {names}"
        for p in d["panels"]:
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], f"{path.name}: {p['title']}"


@pytest.mark.parametrize("expr", list(panel_queries()))
def test_every_panel_query_returns_data(live, expr):
    q = substitute(expr)
    res = live.query(q)
    values = [float(r["value"][1]) for r in res]
    assert any(not math.isnan(v) for v in values), f"no data for {q!r}: {res}"


@pytest.mark.parametrize("expr", list(panel_queries(northsouth=True)))
def test_every_northsouth_panel_query_returns_data(ns_live, expr):
    q = substitute(expr)
    res = ns_live.query(q)
    values = [float(r["value"][1]) for r in res]
    assert any(not math.isnan(v) for v in values), f"no data for {q!r}: {res}"


@pytest.mark.parametrize("query", list(variable_queries()))
def test_every_variable_lists_values(live, query):
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
    assert m, f"unexpected variable query {query!r}"
    selector, label = substitute(m.group(1)), m.group(2)
    vals = live.api(f"label/{label}/values", **{"match[]": selector})["data"]
    assert vals, f"no values for {query!r}"
    if label == "k8s_node_name":
        assert NODE in vals


def test_promtool_accepts_the_whole_agent_exposition(live):
    """The real agent's endpoint (datapath gauges, process metrics and the observer's series)."""
    import urllib.request

    text = urllib.request.urlopen(live.agent_url, timeout=10).read().decode()
    assert "nodewire_tcp_connect_duration_seconds_bucket" in text and "nodewire_map_entries" in text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
