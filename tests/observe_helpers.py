"""Test doubles and real-tool wrappers for the observability tests: a real Prometheus server on a
loopback port, an OTLP/HTTP receiver (a faithful double of the collector's receiving end)."""
from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(netns: str, *argv: str, input: str | None = None) -> str:
    r = subprocess.run(["ip", "netns", "exec", netns, *argv], input=input, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{argv}: {r.stderr}")
    return r.stdout


class OtlpReceiver:
    """A minimal OTLP/HTTP metrics receiver: POST /v1/metrics, protobuf body, decoded with the
    opentelemetry-proto classes (a faithful double of the collector's receiving end)."""

    def __init__(self):
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest, ExportMetricsServiceResponse)

        self.requests: list = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportMetricsServiceRequest()
                req.ParseFromString(body)
                outer.requests.append((self.path, self.headers.get("Content-Type"), req))
                out = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class PrometheusServer:
    """Debian's prometheus on a loopback port with a temp config and storage, scraping `target`."""

    def __init__(self, target: str, workdir: Path, cluster: str = "sandbox"):
        self.port = free_port()
        cfg = workdir / "prometheus.yml"
        cfg.write_text(json.dumps({  # JSON is YAML; the cluster label is set per target, as usual
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "nodewire", "static_configs": [
                {"targets": [target], "labels": {"cluster": cluster}}]}],
        }))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._up, 30, 0.2, "prometheus scraping the agent")

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list:
        out = self.api("query", query=expr)
        assert out["status"] == "success", out
        return out["data"]["result"]

    def _up(self):
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited: {(Path(self.log.name)).read_text()[-2000:]}")
        try:
            return any(float(r["value"][1]) == 1 for r in self.query('up{job="nodewire"}'))
        except OSError:
            return False

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def samples(text: str, name: str, **labels) -> dict[tuple, float]:
    """{sorted label items: value} of every sample called `name` whose labels include `labels`."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


