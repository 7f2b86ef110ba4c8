"""The health endpoints kube-proxy serves for cloud load balancers.

- node: GET /healthz (and /livez) on port 10256: 200 while the agent loop turns and the datapath
  is synced, else 503 (kube-proxy's healthz server, pkg/proxy/healthcheck/proxier_health.go);
- per Service with externalTrafficPolicy: Local, on its spec.healthCheckNodePort: 200 with the
  number of local endpoints as JSON when there is one, else 503, so a load balancer sends only to
  nodes that can serve (service_health.go). Bodies carry kube-proxy's field names.
Both listen on every address of the node ([::] dual-stack).
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from ..model.objects import ObjectKey

log = logging.getLogger("nodewire.lbhealth")
NODE_HEALTHZ_PORT = 10256  # kube-proxy's --healthz-bind-address default port


class _DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _handler(answer: Callable[[str], tuple[int, dict]]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            code, body = answer(self.path.split("?", 1)[0])
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args):
            pass

    return Handler


def _serve(port: int, answer) -> ThreadingHTTPServer:
    srv = _DualStackServer(("::", port), _handler(answer))
    threading.Thread(target=srv.serve_forever, name=f"lbhealth-{port}", daemon=True).start()
    return srv


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class LBHealth:
    """The node server and one server per healthCheckNodePort, following the agent's state."""

    def __init__(self, healthy: Callable[[], tuple[bool, str]], node_port: int = NODE_HEALTHZ_PORT):
        self.healthy = healthy
        self.node_port = node_port
        self.node_server: ThreadingHTTPServer | None = None
        self.last_updated = time.time()
        self.services: dict[ObjectKey, tuple[int, int]] = {}  # Service -> (health port, local endpoints)
        self.servers: dict[int, ThreadingHTTPServer] = {}
        self.errors: dict[str, str] = {}

    def start(self) -> "LBHealth":
        if self.node_port:
            try:
                self.node_server = _serve(self.node_port, self._node_answer)
            except OSError as e:  # another proxy holds the port: report it, keep the datapath
                self.errors["node"] = f"port {self.node_port}: {e}"
                log.error("node healthz server not started port=%d err=%s", self.node_port, e)
        return self

    def _node_answer(self, path: str) -> tuple[int, dict]:
        if path not in ("/healthz", "/livez"):
            return 404, {"error": f"no such path {path}"}
        ok, why = self.healthy()
        body = {"lastUpdated": datetime.fromtimestamp(self.last_updated, timezone.utc).isoformat(),
                "currentTime": _now(), "nodeEligible": True, "detail": why}
        return (200 if ok else 503), body

    def synced(self) -> None:
        self.last_updated = time.time()

    def update(self, service: ObjectKey, port: int, local_endpoints: int) -> None:
        """Set (port > 0) or drop (port 0) a Service's health check."""
        old = self.services.get(service)
        if port:
            self.services[service] = (port, local_endpoints)
        else:
            self.services.pop(service, None)
        if old and old[0] != port:
            self._stop(old[0])
        if port and port not in self.servers:
            try:
                self.servers[port] = _serve(port, lambda path, p=port: self._service_answer(p))
                self.errors.pop(str(service), None)
            except OSError as e:
                self.errors[str(service)] = f"healthCheckNodePort {port}: {e}"
                log.error("Service %s: healthCheckNodePort %d not served: %s", service, port, e)

    def _service_answer(self, port: int) -> tuple[int, dict]:
        for svc, (p, n) in list(self.services.items()):
            if p == port:
                body = {"service": {"namespace": svc.namespace, "name": svc.name}, "localEndpoints": n,
                        "serviceProxyHealthy": self.healthy()[0]}
                return (200 if n > 0 else 503), body
        return 503, {"localEndpoints": 0}

    def _stop(self, port: int) -> None:
        srv = self.servers.pop(port, None)
        if srv is not None:
            srv.shutdown()
            srv.server_close()

    def status(self) -> dict:
        return {"node_port": self.node_port if self.node_server else 0,
                "services": {str(k): {"port": p, "local_endpoints": n} for k, (p, n) in self.services.items()},
                "errors": dict(self.errors)}

    def close(self) -> None:
        for port in list(self.servers):
            self._stop(port)
        if self.node_server is not None:
            self.node_server.shutdown()
            self.node_server.server_close()
