"""The Kubernetes source, in the order data flows through it:

  config.py     where the API server is and which credentials (kubeconfig or service account)
  client.py     plain HTTP to it: lists, watch streams, errors by status code
  reflector.py  one resource's list → watch → re-list loop, back-off, health
  source.py     KubeSource: four reflectors into ClusterState.apply, bad objects skipped and named
  annotate.py   this node's DSR annotation (nodewire.io/dsr), set or removed with a merge PATCH
  metrics.py    its health as OTel instruments

Callers import from here (agent.sources.kube); the names below are the package's interface.
"""
from __future__ import annotations

from .client import ApiClient, BadLine
from .config import KubeConfig, in_cluster_config, kubeconfig_config, load_config, node_name
from .errors import AuthError, ContinueExpired, Gone, KubeError, RetryAfter
from .reflector import Backoff, Reflector, RelistLimiter, ResourceHealth, WatchSpec
from .source import KubeSource

__all__ = ["ApiClient", "AuthError", "Backoff", "BadLine", "ContinueExpired", "Gone", "KubeConfig", "KubeError",
           "KubeSource", "Reflector", "RelistLimiter", "ResourceHealth", "RetryAfter", "WatchSpec",
           "in_cluster_config", "kubeconfig_config", "load_config", "node_name"]
