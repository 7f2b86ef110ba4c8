"""kube-proxy's iptables-mode nat layout, as an `iptables-restore` file, from a BenchService list.

The layout follows kubernetes/kubernetes pkg/proxy/iptables/proxier.go (syncProxyRules):
  * OUTPUT and PREROUTING jump to KUBE-SERVICES ("kubernetes service portals"); POSTROUTING jumps to
    KUBE-POSTROUTING. A client in this node's network namespace is local, so its first packet walks
    nat OUTPUT → KUBE-SERVICES, the chain kube-proxy writes one rule per service port into: a linear
    list matched top to bottom, which is why the last Service costs the most.
  * KUBE-SERVICES: `-d VIP --dport P -j KUBE-SVC-<hash>` per service port, then the KUBE-NODEPORTS
    jump as the final rule.
  * KUBE-SVC-<hash>: a KUBE-MARK-MASQ rule for traffic from outside the pod CIDR (the local-traffic
    detector), then one rule per endpoint with `-m statistic --mode random --probability 1/(n-i)`
    (computeProbability formats it with %0.10f); the last endpoint's rule has no probability.
  * KUBE-SEP-<hash>: `-s <endpoint IP> -j KUBE-MARK-MASQ` (hairpin) then `-j DNAT --to-destination`.
  * KUBE-MARK-MASQ ORs mark 0x4000; KUBE-POSTROUTING returns unmarked packets, clears the bit and
    MASQUERADEs --random-fully.
  * Chain names are the first 16 characters of base32(sha256(servicePortName + protocol)) (KUBE-SVC)
    and base32(sha256(servicePortName + protocol + endpoint)) (KUBE-SEP), as portProtoHash and
    servicePortEndpointChainName compute them.
  * With more than 1000 endpoints in total kube-proxy stops writing `-m comment` on per-endpoint
    rules (largeClusterEndpointsThreshold); we do the same so the files are the size kube-proxy's are.
  * A partial sync (MinimizeIPTablesRestore, default since 1.27) rewrites the top-level chains,
    KUBE-SERVICES included, in full, plus only the chains of Services that changed; stale KUBE-SEP
    chains are deleted with -X. `endpoint_change()` writes exactly that.
The text and code here are our own; only the layout is kube-proxy's.
"""
from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable

from .services import BenchService, Endpoint

MASQ_MARK = "0x4000"
LARGE_CLUSTER_ENDPOINTS = 1000  # kube-proxy's largeClusterEndpointsThreshold
TOP_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def svc_chain(svc: BenchService) -> str:
    return "KUBE-SVC-" + _hash16(svc.port_key + svc.protocol.lower())


def sep_chain(svc: BenchService, ep: Endpoint) -> str:
    return "KUBE-SEP-" + _hash16(svc.port_key + svc.protocol.lower() + str(ep))


def probability(n: int) -> str:
    return f"{1.0 / n:0.10f}"


class _Writer:
    def __init__(self, services: list[BenchService], pod_cidr: str):
        self.pod_cidr = pod_cidr
        self.comments = sum(len(s.endpoints) for s in services) <= LARGE_CLUSTER_ENDPOINTS

    def services_rule(self, svc: BenchService) -> str:
        p = svc.protocol.lower()
        return (f'-A KUBE-SERVICES -m comment --comment "{svc.port_key} cluster IP" -m {p} -p {p} '
                f"-d {svc.cluster_ip}/32 --dport {svc.port} -j {svc_chain(svc)}")

    def service_chain_rules(self, svc: BenchService) -> list[str]:
        p, chain, n = svc.protocol.lower(), svc_chain(svc), len(svc.endpoints)
        out = [f'-A {chain} -m comment --comment "{svc.port_key} cluster IP" -m {p} -p {p} '
               f"-d {svc.cluster_ip}/32 --dport {svc.port} ! -s {self.pod_cidr} -j KUBE-MARK-MASQ"]
        for i, ep in enumerate(svc.endpoints):
            c = f'-m comment --comment "{svc.port_key} -> {ep}" ' if self.comments else ""
            stat = f"-m statistic --mode random --probability {probability(n - i)} " if i < n - 1 else ""
            out.append(f"-A {chain} {c}{stat}-j {sep_chain(svc, ep)}")
        return out

    def endpoint_chain_rules(self, svc: BenchService, ep: Endpoint) -> list[str]:
        p, chain = svc.protocol.lower(), sep_chain(svc, ep)
        c = f"-m comment --comment {svc.port_key} " if self.comments else ""
        return [f"-A {chain} {c}-s {ep.ip}/32 -j KUBE-MARK-MASQ",
                f"-A {chain} {c}-m {p} -p {p} -j DNAT --to-destination {ep}"]

    def top_rules(self) -> list[str]:
        return [
            f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
            f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
            f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
            "-j MASQUERADE --random-fully",
        ]

    @staticmethod
    def nodeports_last() -> str:
        return ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be '
                'the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')


def _chain_decls(names: Iterable[str]) -> list[str]:
    return [f":{n} - [0:0]" for n in names]


def full_sync(services: list[BenchService], pod_cidr: str = "10.244.0.0/16") -> str:
    """The whole nat table content for `iptables-restore --noflush`, written from nothing (the base
    chains' jumps included, which kube-proxy ensures separately before its first restore)."""
    w = _Writer(services, pod_cidr)
    chains = list(TOP_CHAINS)
    rules = [
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        *w.top_rules(),
    ]
    svc_rules: list[str] = []
    for svc in services:
        rules.append(w.services_rule(svc))
        chains.append(svc_chain(svc))
        svc_rules += w.service_chain_rules(svc)
        for ep in svc.endpoints:
            chains.append(sep_chain(svc, ep))
            svc_rules += w.endpoint_chain_rules(svc, ep)
    rules.append(w.nodeports_last())
    return "\n".join(["*nat", *_chain_decls(chains), *rules, *svc_rules, "COMMIT", ""])


def endpoint_change(services: list[BenchService], before: BenchService, after: BenchService,
                    pod_cidr: str = "10.244.0.0/16") -> str:
    """A partial sync after one Service's endpoints changed (`services` already holds `after`)."""
    w = _Writer(services, pod_cidr)
    new_eps = set(after.endpoints)
    gone = [sep_chain(before, ep) for ep in before.endpoints if ep not in new_eps]
    # Stale chains are declared (which flushes them) before -X, as kube-proxy does: -X needs an
    # empty chain that nothing refers to any more.
    chains = [*TOP_CHAINS, svc_chain(after), *(sep_chain(after, ep) for ep in after.endpoints), *gone]
    rules = [*w.top_rules(), *(w.services_rule(s) for s in services), w.nodeports_last(),
             *w.service_chain_rules(after)]
    for ep in after.endpoints:
        rules += w.endpoint_chain_rules(after, ep)
    rules += [f"-X {c}" for c in gone]
    return "\n".join(["*nat", *_chain_decls(chains), *rules, "COMMIT", ""])


def rule_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-A "))
