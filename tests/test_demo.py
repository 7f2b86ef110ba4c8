"""`nodewire demo` end to end: traffic through ClusterIPs in a sandbox, then nothing left behind."""
import json
import os
import re
import subprocess

import pytest

from agent.datapath.attach import detect_cgroup2_root
from tests.conftest import NODEWIRE


pytestmark = pytest.mark.root


def test_demo_balances_refuses_and_cleans_up():
    out = subprocess.run([NODEWIRE, "demo", "--duration", "8", "-o", "json"], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["replies"]["web (IPv4)"]) == {"web-1", "web-2", "web-3"}
    assert set(result["replies"]["web (IPv6)"]) == {"web-1", "web-2", "web-3"}
    assert set(result["replies"]["dns (UDP)"]) == {"dns-1", "dns-2"}
    assert result["errors"]["web (IPv4)"] == {} and result["errors"]["dns (UDP)"] == {}
    billing = result["errors"]["billing (no ready endpoint)"]
    assert list(billing) == ["ECONNREFUSED"] and billing["ECONNREFUSED"] > 0
    assert result["replies"]["billing (no ready endpoint)"] == {}
    # the telemetry half, on by default: /metrics on a local port, printed at start, read by the live view
    assert f"metrics: http://{result['metrics_addr']}/metrics" in out.stdout
    web = result["connect_seconds"]["default/web"]
    assert web["p50"] is not None and set(web["backends"]) == {"default/web-1", "default/web-2", "default/web-3"}
    assert result["pod_bytes"]["client"]["transmitted"] > 0 and result["pod_bytes"]["web-1"]["received"] > 0
    # workload identity as a user's cluster has it: the pods' ReplicaSet ownerReferences name their Deployment
    assert result["deployments"] == {"web-1": "web", "web-2": "web", "web-3": "web", "dns-1": "dns", "dns-2": "dns"}
    # north-south: an external client is answered through both nodes' NodePort and the LoadBalancer IP
    ns = result["north_south"]
    assert len(ns) == 3 and all(set(v) <= {"shop-1", "shop-2"} and v for v in ns.values()), ns
    prefix = re.search(r"removed sandbox (\S+) ", out.stdout).group(1)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in netns
    assert not os.path.exists(f"/sys/fs/bpf/nodewire-demo-{prefix}")
    assert not [d for d in os.listdir(detect_cgroup2_root()) if prefix in d]
