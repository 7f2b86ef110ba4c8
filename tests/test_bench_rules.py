"""The kube-proxy-style rule generators of `nodewire bench`, and a smoke run of the benchmark.

Figures are never asserted: the root tests check that the generated iptables-restore / nft files
load into a real network namespace and that connects through them reach the backends.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from click.testing import CliRunner

from nodewire_dev.bench import iptables_rules, nftables_rules
from agent.cli import main as nodewire
from nodewire_dev.bench.harness import PROBE
from nodewire_dev.bench.services import Endpoint, make_services, with_endpoints
from nodewire_dev.sandbox import Sandbox

BACKENDS = ["10.244.0.3", "10.244.0.4", "10.244.0.5"]


# -- pure -------------------------------------------------------------------------------------------
def test_chain_names_are_kube_proxys():
    # Chain names seen on every real cluster: the API server Service and kube-dns.
    from nodewire_dev.bench.services import BenchService
    api = BenchService("default", "kubernetes", "10.96.0.1", 443, "TCP", (Endpoint("10.0.0.1", 6443),), "https")
    dns = BenchService("kube-system", "kube-dns", "10.96.0.10", 53, "UDP", (Endpoint("10.0.0.2", 53),), "dns")
    assert iptables_rules.svc_chain(api) == "KUBE-SVC-NPX46M4PTMTKRN6Y"
    assert iptables_rules.svc_chain(dns) == "KUBE-SVC-TCOU7JCQXEZGVUNU"


def test_iptables_probabilities_make_a_uniform_choice():
    svc = make_services(1, BACKENDS, 3)[0]
    rules = [r for r in iptables_rules.full_sync([svc]).splitlines()
             if r.startswith(f"-A {iptables_rules.svc_chain(svc)}") and "KUBE-SEP-" in r]
    assert [r.split("--probability ")[1].split()[0] if "--probability" in r else None for r in rules] == \
        ["0.3333333333", "0.5000000000", None]  # 1/3, then 1/2 of the rest, then the rest


def test_comments_dropped_above_1000_endpoints():
    small = iptables_rules.full_sync(make_services(10, BACKENDS, 1))
    large = iptables_rules.full_sync(make_services(1001, BACKENDS, 1))
    assert '" -> ' not in "".join(l for l in large.splitlines() if "KUBE-SEP-" in l and "-A KUBE-SVC" in l)
    assert any(" -> 10.244.0." in l for l in small.splitlines())


def test_nft_dispatch_is_one_vmap_lookup():
    text = nftables_rules.full_sync(make_services(5, BACKENDS, 2))
    assert text.count("vmap @service-ips") == 1
    assert text.count("add element ip kube-proxy service-ips") == 5
    assert text.count("numgen random mod 2 vmap") == 5


def test_make_services_rejects_bad_input():
    with pytest.raises(ValueError, match="endpoints_per_service=0"):
        make_services(1, BACKENDS, 0)
    with pytest.raises(ValueError, match="backend"):
        make_services(1, [], 1)


# -- root: real rules in a real netns ---------------------------------------------------------------
def _who(client, vip: str) -> str:
    out = client.run([sys.executable, str(PROBE), "whoami", "--target", f"{vip}:80"], timeout=30).stdout
    return json.loads(out)["reply"]


def _load(netns: str, argv: list[str], text: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", netns, *argv], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def cluster():
    with Sandbox() as sb:
        client = sb.add_pod("client")
        backends = [sb.add_pod(f"be{i}") for i in range(3)]
        for b in backends:
            b.serve(tcp_ports=[8080])
        yield sb, client, backends


LOADERS = {
    "iptables": (["iptables-legacy-restore", "-w", "--noflush"], iptables_rules),
    "nftables": (["nft", "-f", "-"], nftables_rules),
}


@pytest.mark.root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", sorted(LOADERS))
def test_rules_load_and_reach_the_backends(cluster, mode):
    sb, client, backends = cluster
    argv, gen = LOADERS[mode]
    svcs = make_services(50, [b.ip4 for b in backends[:2]], 2)
    _load(client.netns, argv, gen.full_sync(svcs, str(sb.net4)))
    # The last Service (the end of KUBE-SERVICES) balances over both of its endpoints.
    seen = Counter(_who(client, svcs[-1].cluster_ip) for _ in range(40))
    assert set(seen) == {backends[0].name, backends[1].name}, seen
    assert _who(client, svcs[0].cluster_ip) in (backends[0].name, backends[1].name)

    # One endpoint change: the last Service now has only the third backend.
    before = svcs[-1]
    after = with_endpoints(before, (Endpoint(backends[2].ip4, 8080),))
    svcs[-1] = after
    text = (gen.endpoint_change(svcs, before, after, str(sb.net4)) if mode == "iptables"
            else gen.endpoint_change(before, after, str(sb.net4)))
    _load(client.netns, argv, text)
    assert {_who(client, after.cluster_ip) for _ in range(10)} == {backends[2].name}
    assert _who(client, svcs[1].cluster_ip) in (backends[0].name, backends[1].name)  # others untouched


@pytest.mark.root
@pytest.mark.timeout(120)
def test_bench_compare_smoke(tmp_path):
    res = CliRunner().invoke(nodewire, ["bench", "compare", "--services", "100", "--endpoints", "1", "--quick",
                                     "--out", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by_mode = {r["mode"]: r for r in rows if r["mode"] != "direct"}
    assert set(by_mode) == {"iptables", "nftables", "nodewire"}
    for mode, r in by_mode.items():
        assert r["status"] == "ok", (mode, r)
        assert r["change_verified"] is True, (mode, r)  # the changed endpoint answered through the VIP
        assert r["lat_last_errors"] == 0 and r["rps_errors"] == 0, (mode, r)
    assert "| nodewire | 100 | 1 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 0
