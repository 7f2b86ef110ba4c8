"""Where the API server is and how to authenticate: a kubeconfig file (token, tokenFile or client
certificate) or the pod's service account, as kubectl and client-go find them."""
from __future__ import annotations

import atexit
import base64
import logging
import os
import shutil
import socket
import ssl
import tempfile
from dataclasses import dataclass

import yaml

from .errors import KubeError

log = logging.getLogger("nodewire.kube")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass
class KubeConfig:
    server: str  # https://host:port
    credential_source: str  # human-readable origin of the credentials, for error messages
    ca_file: str | None = None
    ca_data: str | None = None
    token: str | None = None
    token_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.server.startswith("https://"):
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.insecure:
            log.warning("TLS verification disabled by kubeconfig insecure-skip-tls-verify server=%s", self.server)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def in_cluster_config(api_server: str | None = None, sa_dir: str = SERVICE_ACCOUNT_DIR,
                      env: dict | None = None) -> KubeConfig:
    """The pod's service account: token + CA files, KUBERNETES_SERVICE_HOST/PORT (or --api-server)."""
    env = os.environ if env is None else env
    if api_server is None:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeError("in-cluster config: KUBERNETES_SERVICE_HOST is not set (not in a pod?); "
                            "use --kubeconfig or --api-server")
        api_server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    token_file = os.path.join(sa_dir, "token")
    if not os.path.exists(token_file):
        raise KubeError(f"in-cluster config: service account token {token_file} does not exist")
    ca = os.path.join(sa_dir, "ca.crt")
    return KubeConfig(server=api_server.rstrip("/"), credential_source=f"service account token {token_file}",
                      ca_file=ca if os.path.exists(ca) else None, token_file=token_file)


def kubeconfig_config(path: str, context: str | None = None, api_server: str | None = None) -> KubeConfig:
    """The current (or named) context of a kubeconfig file: token, tokenFile or client certificate."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise KubeError(f"kubeconfig {path}: cannot read: {e}") from None

    def named(section: str, name: str) -> dict:
        for item in doc.get(section) or []:
            if isinstance(item, dict) and item.get("name") == name:
                return item.get(section[:-1]) or {}
        raise KubeError(f"kubeconfig {path}: {section} has no entry named {name!r}")

    ctx_name = context or doc.get("current-context")
    if not ctx_name:
        raise KubeError(f"kubeconfig {path}: current-context is not set")
    ctx = named("contexts", ctx_name)
    cluster = named("clusters", ctx.get("cluster", ""))
    user_name = ctx.get("user", "")
    user = named("users", user_name) if user_name else {}
    server = api_server or cluster.get("server")
    if not server:
        raise KubeError(f"kubeconfig {path}: clusters[{ctx.get('cluster')}].server is not set")
    if "exec" in user or "auth-provider" in user:
        raise KubeError(f"kubeconfig {path}: users[{user_name}]: exec/auth-provider credentials are not supported; "
                        "use a token, tokenFile or client certificate")
    base = os.path.dirname(os.path.abspath(path))
    rel = lambda p: p if p is None or os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    cfg = KubeConfig(server=server.rstrip("/"), credential_source=f"kubeconfig {path} (user {user_name!r})",
                     ca_file=rel(cluster.get("certificate-authority")),
                     insecure=bool(cluster.get("insecure-skip-tls-verify")),
                     token=user.get("token"), token_file=rel(user.get("tokenFile")),
                     cert_file=rel(user.get("client-certificate")), key_file=rel(user.get("client-key")))
    if cluster.get("certificate-authority-data"):
        cfg.ca_data = base64.b64decode(cluster["certificate-authority-data"]).decode()
    if user.get("client-certificate-data"):
        d = tempfile.mkdtemp(prefix="nodewire-kubeconfig-")  # ssl loads client keys from files only
        atexit.register(shutil.rmtree, d, True)
        for fname, key, attr in (("client.crt", "client-certificate-data", "cert_file"),
                                 ("client.key", "client-key-data", "key_file")):
            p = os.path.join(d, fname)
            with open(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(base64.b64decode(user.get(key) or ""))
            setattr(cfg, attr, p)
    return cfg


def load_config(kubeconfig: str | None = None, api_server: str | None = None, env: dict | None = None,
                sa_dir: str = SERVICE_ACCOUNT_DIR) -> KubeConfig:
    """--kubeconfig, else $KUBECONFIG (first file), else the in-cluster service account."""
    env = os.environ if env is None else env
    path = kubeconfig or (env.get("KUBECONFIG") or "").split(os.pathsep)[0] or None
    if path:
        return kubeconfig_config(path, api_server=api_server)
    return in_cluster_config(api_server, sa_dir, env)


def node_name(env: dict | None = None) -> str:
    """NODE_NAME (the downward API sets it in the DaemonSet) or the hostname."""
    env = os.environ if env is None else env
    return env.get("NODE_NAME") or socket.gethostname()
