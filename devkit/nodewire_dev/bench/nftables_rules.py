"""kube-proxy's nftables-mode layout, as an `nft -f` file, from a BenchService list.

The layout follows kubernetes/kubernetes pkg/proxy/nftables/proxier.go (setupNFTables and
syncProxyRules) and its README.md:
  * one table, `ip kube-proxy`; base chains named <type>-<hook>: nat-prerouting / nat-output at
    priority dstnat, nat-postrouting at srcnat, filter-* at dstnat-10 (nftablesBaseChains), with the
    jumps of nftablesJumpChains (services from both nat chains, masquerading from postrouting,
    endpoints-check and firewall-check from the filter chains on `ct state new`).
  * dispatch: the `services` chain does one lookup, `ip daddr . meta l4proto . th dport vmap
    @service-ips`, into a verdict map of type `ipv4_addr . inet_proto . inet_service : verdict` whose
    elements `goto` the per-service chain; so the cost per packet does not grow with the number of
    Services (a hash/rbtree lookup instead of iptables' linear walk).
  * per service port, chain `service-<HASH>-ns/name/proto/port` (hashAndTruncate: 8 base32 chars of
    sha256 of the name): a mark-for-masquerade rule for non-pod sources (IfNotLocalNFT), then
    `numgen random mod N vmap { 0 : goto endpoint-…, … }` (writeServiceToEndpointRules).
  * per endpoint, chain `endpoint-<HASH>-ns/name/proto/port__ip/port`: `ip saddr <ip> jump
    mark-for-masquerade` (hairpin) then `meta l4proto tcp dnat to ip:port`.
  * mark-for-masquerade ORs the mark; masquerading returns unmarked packets, clears the bit and
    does `masquerade fully-random`.
  * knftables feeds nft one command per object (`add chain`, `add rule`, `add element`), which is
    what we write, so `nft -f` parses the same amount of text kube-proxy's sync does.
Our own code; only the layout is kube-proxy's.
"""
from __future__ import annotations

import base64
import hashlib

from .services import BenchService, Endpoint

TABLE = "ip kube-proxy"
MASQ_MARK = "0x00004000"
_VMAP_TYPE = "ipv4_addr . inet_proto . inet_service : verdict"


def _hash8(name: str) -> str:
    return base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8] + "-" + name


def service_chain(svc: BenchService) -> str:
    return "service-" + _hash8(f"{svc.namespace}/{svc.name}/{svc.protocol.lower()}/{svc.port_name}")


def endpoint_chain(svc: BenchService, ep: Endpoint) -> str:
    return "endpoint-" + _hash8(f"{svc.namespace}/{svc.name}/{svc.protocol.lower()}/{svc.port_name}"
                                f"__{ep.ip}/{ep.port}")


def _setup(pod_cidr: str) -> list[str]:
    t = TABLE
    out = [f'add table {t} {{ comment "rules for kube-proxy" ; }}']
    # Priorities as numbers: dstnat is -100 and srcnat 100; nft 1.0.6 (Debian 12) accepts the name
    # "dstnat" only on the prerouting/output hooks, so dstnat-10 is written as -110.
    for name, typ, hook, prio in (
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ):
        out.append(f"add chain {t} {name} {{ type {typ} hook {hook} priority {prio} ; }}")
    for chain in ("endpoints-check", "firewall-check", "services", "masquerading", "mark-for-masquerade",
                  "reject-chain"):
        out.append(f"add chain {t} {chain}")
    for dst, src, extra in (
        ("endpoints-check", "filter-input", "ct state new "),
        ("endpoints-check", "filter-forward", "ct state new "),
        ("endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
    ):
        out.append(f"add rule {t} {src} {extra}jump {dst}")
    out += [
        f"add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}",
        f"add rule {t} masquerading mark and {MASQ_MARK} == 0 return",
        f"add rule {t} masquerading mark set mark xor {MASQ_MARK}",
        f"add rule {t} masquerading masquerade fully-random",
        f"add rule {t} reject-chain reject",
        f'add map {t} no-endpoint-services {{ type {_VMAP_TYPE} ; comment "vmap to drop or reject packets '
        'to services with no endpoints" ; }',
        f"add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; }}",
        f"add map {t} firewall-ips {{ type {_VMAP_TYPE} ; }}",
        f'add map {t} service-ips {{ type {_VMAP_TYPE} ; comment "ClusterIP, ExternalIP and LoadBalancer IP '
        'traffic" ; }',
        f"add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; }}",
        f"add rule {t} endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        f"add rule {t} endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 "
        "meta l4proto . th dport vmap @no-endpoint-nodeports",
        f"add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 "
        "meta l4proto . th dport vmap @service-nodeports",
    ]
    return out


def _service_rules(svc: BenchService, pod_cidr: str) -> list[str]:
    t, p, chain = TABLE, svc.protocol.lower(), service_chain(svc)
    vmap = ", ".join(f"{i} : goto {endpoint_chain(svc, ep)}" for i, ep in enumerate(svc.endpoints))
    return [f"add rule {t} {chain} ip daddr {svc.cluster_ip} {p} dport {svc.port} ip saddr != {pod_cidr} "
            "jump mark-for-masquerade",
            f"add rule {t} {chain} numgen random mod {len(svc.endpoints)} vmap {{ {vmap} }}"]


def _endpoint_rules(svc: BenchService, ep: Endpoint) -> list[str]:
    t, ec = TABLE, endpoint_chain(svc, ep)
    return [f"add rule {t} {ec} ip saddr {ep.ip} jump mark-for-masquerade",
            f"add rule {t} {ec} meta l4proto {svc.protocol.lower()} dnat to {ep}"]


def _service(svc: BenchService, pod_cidr: str) -> list[str]:
    # Endpoint chains exist before the vmap that jumps to them (syncProxyRules ensures them first).
    out = [f"add chain {TABLE} {endpoint_chain(svc, ep)}" for ep in svc.endpoints]
    out += [f"add chain {TABLE} {service_chain(svc)}", *_service_rules(svc, pod_cidr)]
    for ep in svc.endpoints:
        out += _endpoint_rules(svc, ep)
    return out


def _element(svc: BenchService) -> str:
    return (f"add element {TABLE} service-ips {{ {svc.cluster_ip} . {svc.protocol.lower()} . {svc.port} : "
            f"goto {service_chain(svc)} }}")


def full_sync(services: list[BenchService], pod_cidr: str = "10.244.0.0/16") -> str:
    """Everything, written from nothing: chains first, then the map elements that point at them."""
    lines = _setup(pod_cidr)
    for svc in services:
        lines += _service(svc, pod_cidr)
    lines += [_element(s) for s in services]
    return "\n".join(lines) + "\n"


def endpoint_change(before: BenchService, after: BenchService, pod_cidr: str = "10.244.0.0/16") -> str:
    """The minimal transaction for one Service whose endpoints changed (what a partial sync writes):
    the service chain is flushed and rewritten, new endpoint chains are added, and endpoint chains
    no longer used are flushed (kube-proxy deletes them a second later; see staleChains)."""
    t = TABLE
    lines = []
    for ep in after.endpoints:  # ensureChain: add, then flush
        ec = endpoint_chain(after, ep)
        lines += [f"add chain {t} {ec}", f"flush chain {t} {ec}"]
    lines += [f"flush chain {t} {service_chain(after)}", *_service_rules(after, pod_cidr)]
    for ep in after.endpoints:
        lines += _endpoint_rules(after, ep)
    keep = set(after.endpoints)
    for ep in before.endpoints:
        if ep not in keep:
            lines.append(f"flush chain {t} {endpoint_chain(before, ep)}")
    return "\n".join(lines) + "\n"


def rule_count(text: str) -> tuple[int, int]:
    """(rules, map elements) in a file this module wrote."""
    rules = sum(1 for ln in text.splitlines() if ln.startswith("add rule "))
    elems = sum(1 for ln in text.splitlines() if ln.startswith("add element "))
    return rules, elems
