"""Pure parts of observability (no root): histogram slots, drop-reason parsing, identities, series cap."""
from __future__ import annotations

from opentelemetry.sdk.metrics.export import Histogram, MetricsData, ResourceMetrics, Sum
from opentelemetry.sdk.resources import Resource

from agent.export.telemetry import Producers, otlp_endpoint_from_env
from agent.model.objects import ObjectKey, Pod, Service, ServicePort
from agent.observe.drop_reasons import parse_drop_reasons, reason_name
from agent.histogram import HIST_SLOTS, Log2Histogram, bounds, slot_of
from agent.observe.identity import OBSERVE_ANNOTATION, Identity, ObserveConfig
from agent.observe.series import Reading, SeriesBook
from agent.state import ClusterState


def test_slots_are_upper_inclusive_powers_of_two():
    assert [slot_of(v) for v in (0, 1, 2, 3, 4, 5, 8, 9)] == [0, 0, 1, 2, 2, 3, 3, 4]
    assert slot_of(1 << 20) == 20 and slot_of((1 << 20) + 1) == 21
    assert slot_of(1 << 60) == HIST_SLOTS - 1  # the catch-all slot
    b = bounds(1e-6)
    assert len(b) == HIST_SLOTS - 1 and b[0] == 1e-6 and b[20] == 1.048576
    for v in (1, 7, 1000, 1_000_000):  # v lies in (bound[s-1], bound[s]] of its slot
        s = slot_of(v)
        assert v <= (1 << s) and (s == 0 or v > (1 << (s - 1)))


def test_quantile_is_the_upper_bound_of_the_bucket_holding_it():
    h = Log2Histogram()
    for v, n in ((100, 90), (5000, 10)):
        h.add_slot(slot_of(v), n)
    h.total += 100 * 90 + 5000 * 10
    assert h.count == 100 and h.total == 59000
    assert h.quantile(0.5) == 128 and h.quantile(0.99) == 8192
    assert Log2Histogram().quantile(0.5) == 0


FORMAT = '''name: kfree_skb
format:
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;

print fmt: "skbaddr=%p reason: %s", REC->skbaddr, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 11, "UDP_CSUM" }, { 0x10, "HEX_IS_NOT_EXPECTED" })
'''


def test_drop_reasons_come_from_the_format_file():
    r = parse_drop_reasons(FORMAT)
    assert r == {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 11: "UDP_CSUM"}
    assert reason_name(r, 11) == "UDP_CSUM" and reason_name(r, 99) == "REASON_99"
    assert parse_drop_reasons("no symbolic table here") == {}


def _state() -> ClusterState:
    st = ClusterState()
    pods = {
        ObjectKey("shop", "web-1"): Pod(ObjectKey("shop", "web-1"), ("10.244.0.5", "fd00::5"), "n1"),
        ObjectKey("shop", "quiet"): Pod(ObjectKey("shop", "quiet"), ("10.244.0.6",), "n1",
                                        annotations=((OBSERVE_ANNOTATION, "false"),)),
        ObjectKey("shop", "remote"): Pod(ObjectKey("shop", "remote"), ("10.244.1.9",), "n2"),
    }
    for k, p in pods.items():
        st.apply_pod(k, p)
    st.apply_service(ObjectKey("shop", "api"), Service(ObjectKey("shop", "api"), ("10.96.0.10",),
                                                       (ServicePort("http", "TCP", 80, 8080),)))
    return st


def test_identity_local_pods_peers_and_opt_out():
    ident = Identity.from_state(_state(), ObserveConfig(node_name="n1", peer_cidrs=("10.0.0.0/8",)))
    assert ident.pod_of("10.244.0.5").attributes() == {
        "k8s.namespace.name": "shop", "k8s.pod.name": "web-1", "k8s.node.name": "n1"}
    assert ident.pod_of("fd00::5").key.name == "web-1"
    assert ident.pod_of("10.244.0.6") is None          # opted out
    assert ident.pod_of("10.244.1.9") is None          # another node's pod
    assert ident.peer("10.96.0.10") == {"nodewire.peer.kind": "service", "nodewire.peer.name": "shop/api"}
    assert ident.peer("10.244.1.9") == {"nodewire.peer.kind": "pod", "nodewire.peer.name": "shop/remote"}
    assert ident.peer("10.1.2.3") == {"nodewire.peer.kind": "cidr", "nodewire.peer.name": "10.0.0.0/8"}
    assert ident.peer("8.8.8.8") == {"nodewire.peer.kind": "other", "nodewire.peer.name": "other"}
    raw = Identity.from_state(_state(), ObserveConfig(node_name="n1", raw_peer_ips=True))
    assert raw.peer("8.8.8.8")["nodewire.peer.name"] == "8.8.8.8"


def test_opt_in_mode_observes_only_annotated_pods():
    st = _state()
    st.apply_pod(ObjectKey("shop", "loud"), Pod(ObjectKey("shop", "loud"), ("10.244.0.7",), "n1",
                                                annotations=((OBSERVE_ANNOTATION, "true"),)))
    ident = Identity.from_state(st, ObserveConfig(node_name="n1", opt_in=True))
    assert {r.key.name for r in ident.local.values()} == {"loud"}


def _reading(pods: range) -> Reading:
    r = Reading()
    for i in pods:
        attrs = {"k8s.namespace.name": "ns", "k8s.pod.name": f"p{i}", "k8s.node.name": "n1"}
        r.count("pod_bytes", {**attrs, "network.io.direction": "transmit"}, 100 + i)
        r.hist("connect", attrs).add_slot(slot_of(1500), 1)
    r.count("drops", {"k8s.node.name": "n1", "nodewire.drop.reason": "NO_SOCKET"}, 3)
    return r


def test_series_cap_holds_and_node_series_come_first():
    book = SeriesBook(max_series=50)
    metrics = book.to_metrics(_reading(range(1000)))
    assert book.exported == 50 and book.dropped == 2001 - 50
    assert sum(len(m.data.data_points) for m in metrics) == 50
    names = {m.name for m in metrics}
    assert "nodewire.skb.drops" in names and "k8s.pod.network.io" in names


def test_removed_series_disappear_and_surviving_ones_keep_their_start_time():
    book = SeriesBook(max_series=10000)
    first = book.to_metrics(_reading(range(3)), now_ns=1000)
    second = book.to_metrics(_reading(range(1, 3)), now_ns=2000)
    pods = lambda ms: {dp.attributes["k8s.pod.name"] for m in ms for dp in m.data.data_points  # noqa: E731
                       if "k8s.pod.name" in dp.attributes}
    assert pods(first) == {"p0", "p1", "p2"} and pods(second) == {"p1", "p2"}
    by_name = {m.name: m for m in second}
    sums = by_name["k8s.pod.network.io"].data
    assert isinstance(sums, Sum) and sums.is_monotonic
    assert {dp.start_time_unix_nano for dp in sums.data_points} == {1000}
    hist = by_name["nodewire.tcp.connect.duration"].data
    assert isinstance(hist, Histogram)
    dp = hist.data_points[0]
    assert dp.bucket_counts[slot_of(1500)] == 1 and dp.count == 1 and len(dp.explicit_bounds) == HIST_SLOTS - 1


def test_producers_merge_into_the_collection_and_survive_a_failing_one():
    book = SeriesBook(100)
    producers = Producers()
    producers.add(lambda: book.to_metrics(_reading(range(2))))
    producers.add(lambda: 1 / 0)
    data = MetricsData([ResourceMetrics(Resource.create({"service.name": "nodewire"}), [], "")])
    merged = producers.merge(data)
    names = {m.name for sm in merged.resource_metrics[0].scope_metrics for m in sm.metrics}
    assert {"k8s.pod.network.io", "nodewire.tcp.connect.duration", "nodewire.skb.drops"} <= names


def test_otlp_endpoint_follows_the_spec():
    assert otlp_endpoint_from_env({}) is None
    assert otlp_endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/metrics"
    assert otlp_endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                   "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m/x"}) == "http://m/x"


SCRAPE = '''# TYPE nodewire_tcp_connect_duration_seconds histogram
nodewire_tcp_connect_duration_seconds_bucket{k8s_namespace_name="ns",k8s_pod_name="p",le="1e-06"} 0
nodewire_tcp_connect_duration_seconds_bucket{k8s_namespace_name="ns",k8s_pod_name="p",le="2e-06"} 4
nodewire_tcp_connect_duration_seconds_bucket{k8s_namespace_name="ns",k8s_pod_name="p",le="4e-06"} 10
nodewire_tcp_connect_duration_seconds_bucket{k8s_namespace_name="ns",k8s_pod_name="p",le="+Inf"} 10
nodewire_tcp_connect_duration_seconds_count{k8s_namespace_name="ns",k8s_pod_name="p"} 10
nodewire_tcp_connect_duration_seconds_sum{k8s_namespace_name="ns",k8s_pod_name="p"} 0.00003
# TYPE k8s_pod_network_io_bytes counter
k8s_pod_network_io_bytes_total{k8s_namespace_name="ns",k8s_pod_name="p",network_io_direction="receive"} %d
'''


def test_views_compute_rates_and_bucket_quantiles_from_two_scrapes():
    from agent.observe.views import bucket_delta, parse, quantile, top_rows

    prev, cur = parse(SCRAPE % 1000), parse(SCRAPE % 3000)
    b = cur.buckets["connect"][("ns", "p")]
    assert b == {1e-06: 0, 2e-06: 4, 4e-06: 10, float("inf"): 10}
    per_bucket = bucket_delta(b, None)
    assert per_bucket == [(1e-06, 0), (2e-06, 4), (4e-06, 6), (float("inf"), 0)]
    assert quantile(per_bucket, 0.4) == 2e-06 and quantile(per_bucket, 0.99) == 4e-06
    assert quantile(bucket_delta(b, b), 0.5) is None  # nothing new in the interval
    (row,) = top_rows(prev, cur, 2.0)
    assert row.pod == ("ns", "p") and row.rx == 1000.0 and row.tx == 0.0


def test_workload_labels_from_owner_references_and_pod_template_hash():
    from agent.model.parse import parse_pod

    def pod(name, owners, labels=None):
        return parse_pod({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": name, "namespace": "shop", "labels": labels or {},
                                       "ownerReferences": owners},
                          "spec": {"nodeName": "n1"}, "status": {"podIP": "10.1.0.%d" % len(name)}})

    rs = pod("web-5d8f9-abcde", [{"apiVersion": "v1", "kind": "Node", "name": "n1"},  # not the controller
                                 {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f9", "controller": True}],
             {"pod-template-hash": "5d8f9"})
    assert rs.owners[0] == ("ReplicaSet", "web-5d8f9")
    sts = pod("db-0", [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "controller": True}])
    bare_rs = pod("x-1", [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "controller": True}])
    bare = pod("lonely", [])
    st = ClusterState()
    for p in (rs, sts, bare_rs, bare):
        st.apply_pod(p.key, p)
    ident = Identity.from_state(st, ObserveConfig(node_name="n1"))
    attrs = lambda p: ident.pod_of(p.ips[0]).attributes()  # noqa: E731
    assert attrs(rs)["k8s.deployment.name"] == "web" and attrs(rs)["k8s.replicaset.name"] == "web-5d8f9"
    assert attrs(sts)["k8s.statefulset.name"] == "db" and "k8s.deployment.name" not in attrs(sts)
    assert "k8s.deployment.name" not in attrs(bare_rs)  # no pod-template-hash: a ReplicaSet of its own
    assert not {k for k in attrs(bare) if k.startswith("k8s.") and k.endswith(("set.name", "ment.name"))}
    # peers and backends: by pod, or by workload to bound cardinality under IP churn
    assert ident.peer(rs.ips[0]) == {"nodewire.peer.kind": "pod", "nodewire.peer.name": "shop/web-5d8f9-abcde"}
    by_wl = Identity.from_state(st, ObserveConfig(node_name="n1", aggregate_by="workload"))
    assert by_wl.peer(rs.ips[0]) == {"nodewire.peer.kind": "workload", "nodewire.peer.name": "shop/Deployment/web"}
    assert by_wl.backend(sts.ips[0], 5432) == {"nodewire.backend.workload": "shop/StatefulSet/db"}
    assert by_wl.backend(bare.ips[0], 80) == {"nodewire.backend.address": f"{bare.ips[0]}:80",
                                              "nodewire.backend.pod": "shop/lonely"}


def test_series_of_owned_and_bare_pods_keep_their_own_labels_in_the_prometheus_exposition():
    """A Deployment's pod carries two attributes more than a bare pod on the same metric; the
    exposition must give every sample its own labels (opentelemetry-exporter-prometheus < 0.52b0
    labelled all samples with the last data point's keys, so owned pods' values landed under the
    wrong names: k8s_pod_name="sandbox", network_io_direction="web-5d4f8c7b9")."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from agent.export.telemetry import start_telemetry

    tel = start_telemetry("127.0.0.1:0", "n1")
    try:
        counter = tel.meter("test-workload-labels").create_counter("nodewire.test.workload.labels")
        base = {"k8s.namespace.name": "default", "k8s.node.name": "n1"}
        owned = {**base, "k8s.pod.name": "web-1", "k8s.deployment.name": "web", "k8s.replicaset.name": "web-5d4f8c7b9"}
        counter.add(5, owned)
        counter.add(7, {**base, "k8s.pod.name": "client"})
        counter.add(9, {"k8s.replicaset.name": "web-5d4f8c7b9", **base, "k8s.pod.name": "web-2",
                        "k8s.deployment.name": "web"})  # another order of the same keys
        text = urllib.request.urlopen(f"http://127.0.0.1:{tel.port}/metrics", timeout=10).read().decode()
    finally:
        tel.shutdown()
    got = {s.labels["k8s_pod_name"]: (s.labels, s.value) for f in text_string_to_metric_families(text)
           for s in f.samples if s.name == "nodewire_test_workload_labels_total"}
    assert got == {
        "web-1": ({"k8s_namespace_name": "default", "k8s_node_name": "n1", "k8s_pod_name": "web-1",
                   "k8s_deployment_name": "web", "k8s_replicaset_name": "web-5d4f8c7b9"}, 5.0),
        "client": ({"k8s_namespace_name": "default", "k8s_node_name": "n1", "k8s_pod_name": "client"}, 7.0),
        "web-2": ({"k8s_namespace_name": "default", "k8s_node_name": "n1", "k8s_pod_name": "web-2",
                   "k8s_deployment_name": "web", "k8s_replicaset_name": "web-5d4f8c7b9"}, 9.0)}


def test_one_quantile_function_and_the_scale_0_exponential_form():
    from agent.histogram import bucket_quantile, slot_quantile

    assert bucket_quantile([(1.0, 0), (2.0, 3), (4.0, 1)], 0.5) == 2.0
    assert bucket_quantile([(1.0, 0)], 0.5) is None
    assert slot_quantile([0, 0, 5, 0, 5], 0.99) == 16 and slot_quantile([0] * HIST_SLOTS, 0.5) == 0
    h = Log2Histogram()
    for v in (3, 4, 1000):
        h.add_slot(slot_of(v), 1)
    offset, counts, zero = h.exponential()
    # scale 0: index i covers (2^i, 2^(i+1)]; 3 and 4 are in (2, 4] = index 1, 1000 in (512, 1024] = 9
    assert offset == 1 and counts[0] == 2 and counts[9 - offset] == 1 and sum(counts) == 3 and zero == 0


def test_otlp_gets_scale_0_exponential_histograms_when_asked_and_one_cap_covers_all_producers():
    """With OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=base2_exponential_bucket_histogram
    the real OTLP exporter sends the kernel histograms as exponential histograms of scale 0 in µs, bucket
    for bucket; Prometheus keeps the explicit buckets. The series cap counts every producer's points
    together, in the order they were added (the RDMA tracer's come after the observer's)."""
    from opentelemetry.sdk.metrics.export import AggregationTemporality, Metric, NumberDataPoint

    from agent.export.telemetry import start_telemetry
    from tests.observe_helpers import OtlpReceiver

    receiver = OtlpReceiver()
    tel = start_telemetry(None, "n1", env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                                           "OTEL_METRIC_EXPORT_INTERVAL": "3600000",
                                           "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION":
                                               "base2_exponential_bucket_histogram"}, max_series=2)
    try:
        r = Reading()
        h = r.hist("connect", {"k8s.pod.name": "a"})
        for us in (3, 4, 1000, 1_100_000):
            h.add_slot(slot_of(us), 1)
        h.total = 3 + 4 + 1000 + 1_100_000
        book = SeriesBook(10)
        rdma_point = NumberDataPoint(attributes={"rdma.qp_num": 7}, start_time_unix_nano=1, time_unix_nano=2, value=5)
        rdma = Metric(name="nodewire.rdma.wr.completions", unit="1", description="", data=Sum(
            data_points=[rdma_point] * 2, aggregation_temporality=AggregationTemporality.CUMULATIVE, is_monotonic=True))
        tel.add_producer(lambda: book.to_metrics(r))   # the observer: 1 series
        tel.add_producer(lambda: [rdma])               # the RDMA tracer: 2 series, 1 fits under the cap of 2
        from opentelemetry.metrics import Observation
        tel.meter("t").create_observable_gauge("t.up", [lambda _o: [Observation(1)]])  # a non-empty collection
        tel.provider.force_flush()
        _, _, req = receiver.requests[-1]
        metrics = {m.name: m for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        m = metrics["nodewire.tcp.connect.duration"]
        assert m.unit == "us" and m.HasField("exponential_histogram")
        [dp] = m.exponential_histogram.data_points
        assert dp.scale == 0 and dp.count == 4 and dp.sum == h.total and dp.zero_count == 0
        # index i covers (2^i, 2^(i+1)] µs: 3, 4 → 1; 1000 → 9; 1.1 s → 20
        got = {dp.positive.offset + i: n for i, n in enumerate(dp.positive.bucket_counts) if n}
        assert got == {1: 2, 9: 1, 20: 1}
        assert len(metrics["nodewire.rdma.wr.completions"].sum.data_points) == 1 and tel.producers.dropped == 1
    finally:
        tel.shutdown()
        receiver.close()


def test_kube_proxy_programming_latency_moves_by_the_measured_amount_for_a_known_trigger_time():
    """A slice whose endpoints.kubernetes.io/last-change-trigger-time is 7 s before the sync ends
    adds exactly one 7 s sample (kube-proxy's bucket le=7); an unchanged slice adds none the next
    time; a change without the annotation counts from when the loop took it in."""
    import urllib.request

    from agent.export.kubeproxy import ProxyMetrics
    from agent.export.telemetry import start_telemetry
    from agent.model.parse import parse_endpoint_slice, parse_service
    from tests.manifests import endpoint_slice, service
    from tests.observe_helpers import samples

    now = [1_800_000_000.0]
    st = ClusterState()
    tel = start_telemetry("127.0.0.1:0", "n1")
    try:
        pm = ProxyMetrics(tel.meter("kubeproxy"), st.pending, clock=lambda: now[0])
        sl = endpoint_slice("web", ["10.1.0.5"])
        # 1_800_000_000 is 2027-01-15T08:00:00Z: the trigger is 7 s before the sync ends
        sl["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": "2027-01-15T07:59:53Z"}
        st.apply_service(ObjectKey("default", "web"), parse_service(service("web", ["10.96.0.9"])))
        st.apply_slice(ObjectKey("default", "web-ipv4"), parse_endpoint_slice(sl))
        assert st.pending() == 1

        def scrape():
            with urllib.request.urlopen(f"http://127.0.0.1:{tel.port}/metrics", timeout=10) as r:
                return r.read().decode()

        with pm.sync(st.take_dirty(), st):
            pass
        text = scrape()
        one = lambda name, **kw: list(samples(text, name, **kw).values())[0]  # noqa: E731
        assert one("kubeproxy_network_programming_duration_seconds_count") == 1
        assert one("kubeproxy_network_programming_duration_seconds_sum") == 7.0
        assert one("kubeproxy_network_programming_duration_seconds_bucket", le="6.0") == 0
        assert one("kubeproxy_network_programming_duration_seconds_bucket", le="7.0") == 1
        assert one("kubeproxy_sync_proxy_rules_duration_seconds_count") == 1
        assert one("kubeproxy_sync_proxy_rules_last_timestamp_seconds") == now[0]
        assert one("kubeproxy_sync_proxy_rules_service_changes_pending") == 0
        # the Service changes again, its slice (and annotation) does not: counted from the loop's take
        st.apply_service(ObjectKey("default", "web"), parse_service(service("web", ["10.96.0.9"], port=81)))
        changes = st.take_dirty()
        now[0] += 0.5
        with pm.sync(changes, st):
            now[0] += 0.25   # the map write ends 0.25 s after the loop took the change in
        text = scrape()
        assert one("kubeproxy_network_programming_duration_seconds_count") == 2
        assert one("kubeproxy_network_programming_duration_seconds_sum") == 7.25
        assert one("kubeproxy_network_programming_duration_seconds_bucket", le="0.25") == 1
    finally:
        tel.shutdown()


SVC_SCRAPE = """# TYPE nodewire_service_connect_duration_seconds histogram
nodewire_service_connect_duration_seconds_bucket{k8s_namespace_name="ns",k8s_service_name="web",nodewire_backend_pod="ns/a",le="0.001"} %(a1)d
nodewire_service_connect_duration_seconds_bucket{k8s_namespace_name="ns",k8s_service_name="web",nodewire_backend_pod="ns/a",le="1.048576"} %(a1)d
nodewire_service_connect_duration_seconds_bucket{k8s_namespace_name="ns",k8s_service_name="web",nodewire_backend_pod="ns/a",le="+Inf"} %(a1)d
nodewire_service_connect_duration_seconds_bucket{k8s_namespace_name="ns",k8s_service_name="web",nodewire_backend_pod="ns/b",le="0.001"} %(b1)d
nodewire_service_connect_duration_seconds_bucket{k8s_namespace_name="ns",k8s_service_name="web",nodewire_backend_pod="ns/b",le="1.048576"} %(b2)d
nodewire_service_connect_duration_seconds_bucket{k8s_namespace_name="ns",k8s_service_name="web",nodewire_backend_pod="ns/b",le="+Inf"} %(b2)d
# TYPE nodewire_service_connects_total counter
nodewire_service_connects_total{k8s_namespace_name="ns",k8s_service_name="web",nodewire_backend_pod="ns/a"} %(a1)d
nodewire_service_connects_total{k8s_namespace_name="ns",k8s_service_name="web",nodewire_backend_pod="ns/b"} %(b2)d
"""


def test_top_shows_per_service_connect_quantiles_and_the_backend_spread():
    from agent.observe.views import parse, service_rows, services_table

    prev = parse(SVC_SCRAPE % {"a1": 0, "b1": 0, "b2": 0})
    cur = parse(SVC_SCRAPE % {"a1": 98, "b1": 0, "b2": 2})  # 98 fast connects to a, 2 slow ones to b
    (row,) = service_rows(prev, cur, 2.0)
    assert row.service == ("ns", "web") and row.cps == 50.0
    assert row.p50 == 0.001 and row.p99 == 1.048576
    assert row.backends == {"ns/a": 0.001, "ns/b": 1.048576}
    from rich.console import Console
    console = Console(width=160, record=True)
    console.print(services_table([row], 2.0))
    out = console.export_text()
    assert "ns/web" in out and "1 ms – 1.05 s (ns/b)" in out


def test_openmetrics_written_directly_is_the_exporters_text():
    """exposition.render gives, byte for byte, the OpenMetrics text the OTel Prometheus exporter and
    prometheus_client write for the same metrics: counters, histograms, a non-monotonic sum (gauge),
    families split by label keys (workload labels), escaped and non-string label values, big values."""
    from opentelemetry.exporter.prometheus import _CustomCollector
    from opentelemetry.sdk.metrics.export import AggregationTemporality, Gauge, Metric, NumberDataPoint, ScopeMetrics
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from prometheus_client import CollectorRegistry
    from prometheus_client.openmetrics.exposition import generate_latest

    from agent.export.exposition import render

    r = _reading(range(5))
    r.count("pod_bytes", {"k8s.namespace.name": "ns", "k8s.pod.name": 'we"ird\\pod\nx', "k8s.node.name": "n1",
                          "k8s.deployment.name": "web", "network.io.direction": "receive"}, 12345678901)
    r.count("retrans", {"k8s.namespace.name": "ns", "k8s.pod.name": "p1", "nodewire.peer.kind": "cidr",
                        "nodewire.peer.name": "10.0.0.0/8"}, 7)
    h = r.hist("srtt", {"k8s.namespace.name": "ns", "k8s.pod.name": "p2", "k8s.node.name": "n1"})
    h.add_counts([0, 3, 0, 9] + [0] * (HIST_SLOTS - 5) + [2], 123456789)
    metrics = SeriesBook(10000).to_metrics(r, now_ns=1000)
    metrics.append(Metric("rdma.port.up", "port state", "1", Gauge([NumberDataPoint(
        {"port": 1, "dev": "mlx5_0", "rate": 2.5}, 0, 1000, 1), NumberDataPoint({"port": 2, "dev": "mlx5_0"}, 0, 1000, 0.5)])))
    metrics.append(Metric("rdma.qp", "", "{qp}", Sum([NumberDataPoint({"dev": "x"}, 0, 1000, -3)],
                                                     AggregationTemporality.CUMULATIVE, False)))
    collector = _CustomCollector(disable_target_info=True)
    collector.add_metrics_data(MetricsData([ResourceMetrics(Resource.create({}), [
        ScopeMetrics(InstrumentationScope("t"), metrics, "")], "")]))
    registry = CollectorRegistry()
    registry.register(collector)
    expected = generate_latest(registry).decode()
    assert expected.count("# TYPE k8s_pod_network_io_bytes counter") == 2  # split by the workload label
    assert render(metrics) + "# EOF\n" == expected


def test_an_openmetrics_scrape_has_the_same_samples_as_a_plain_text_one():
    """The endpoint writes the producers' series directly in OpenMetrics (what Prometheus asks for)
    and through prometheus_client otherwise: both give the same samples."""
    import urllib.request

    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
    from prometheus_client.parser import text_string_to_metric_families as parse_text

    from agent.export.telemetry import start_telemetry

    tel = start_telemetry("127.0.0.1:0", "n1")
    try:
        book = SeriesBook(100)
        tel.add_producer(lambda: book.to_metrics(_reading(range(3)), now_ns=1000))
        tel.meter("t").create_counter("t.c").add(1)

        def get(accept: str) -> str:
            req = urllib.request.Request(f"http://127.0.0.1:{tel.port}/metrics", headers={"Accept": accept})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.read().decode()

        om = get("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        plain = get("text/plain;version=0.0.4")

        def samples(fams) -> set:
            return {(s.name.removesuffix("_total"), tuple(sorted(s.labels.items())), s.value)
                    for f in fams for s in f.samples
                    if not s.name.endswith("_created") and not s.name.startswith(("process_", "python_"))}
        got, want = samples(parse_om(om)), samples(parse_text(plain))
        assert got == want and any(n == "nodewire_tcp_connect_duration_seconds_bucket" for n, _, _ in got)
    finally:
        tel.shutdown()
