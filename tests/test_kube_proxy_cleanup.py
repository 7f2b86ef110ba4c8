"""`nodewire cleanup --kube-proxy` in a network namespace loaded with kube-proxy's rule sets (the ones
`nodewire bench compare` generates: iptables legacy and nft backends, IPv4 and IPv6, nftables) and
with foreign rules that must survive, byte for byte."""
from __future__ import annotations

import secrets
import subprocess

import pytest

from agent.kube_proxy_cleanup import parse_save, restore_text
from nodewire_dev.bench import iptables_rules, nftables_rules
from nodewire_dev.bench.services import make_services
from tests.conftest import NODEWIRE

pytestmark = pytest.mark.root

KUBE_FILTER = """*filter
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
*mangle
:KUBE-PROXY-CANARY - [0:0]
COMMIT
"""
FOREIGN = """*filter
:FOREIGN-IN - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -j FOREIGN-IN
-A FOREIGN-IN -s {net} -j ACCEPT
COMMIT
*nat
:FOREIGN-NAT - [0:0]
-A OUTPUT -j FOREIGN-NAT
-A FOREIGN-NAT -p tcp -m tcp --dport 8443 -j REDIRECT --to-ports 443
COMMIT
"""
KUBE_NAT6 = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -d fd00:10:96::1/128 -p tcp -m tcp --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB
-A KUBE-SEP-BBBBBBBBBBBBBBBB -p tcp -m tcp -j DNAT --to-destination [fd00:10:244::3]:8080
COMMIT
"""
FOREIGN_NFT = "table inet foreign {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n" \
              "\t\ttcp dport 22 accept\n\t}\n}\n"
KUBE_NFT6 = "table ip6 kube-proxy {\n\tchain services {\n\t}\n}\n"


def _ns(netns, *argv, stdin=None):
    return subprocess.run(["ip", "netns", "exec", netns, *argv], input=stdin, capture_output=True, text=True,
                          check=True).stdout


def _saves(netns) -> dict[str, str]:
    out = {t: "\n".join(ln for ln in _ns(netns, f"{t}-save").splitlines() if not ln.startswith("#"))
           for t in ("iptables-legacy", "iptables-nft", "ip6tables-legacy", "ip6tables-nft")}  # no timestamps
    out["nft"] = _ns(netns, "nft", "list", "ruleset")
    return out


def _rule_lines(text: str, keep) -> list[str]:
    """Rules and chain names (without policy and counters) of a save, in order."""
    return [ln.split()[0] if ln.startswith(":") else ln for ln in text.splitlines()
            if ln.startswith(("-A", ":")) and keep(ln)]


@pytest.fixture
def netns():
    name = f"nwkp{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name])


def test_cleanup_removes_kube_proxy_rules_everywhere_and_nothing_else(netns):
    services = make_services(40, ["10.244.0.3", "10.244.0.4"], 2)
    for tool, nat, net in (("iptables", iptables_rules.full_sync(services), "192.0.2.0/24"),
                           ("ip6tables", KUBE_NAT6, "2001:db8::/32")):
        for backend in ("legacy", "nft"):
            restore = f"{tool}-{backend}-restore"
            _ns(netns, restore, "--noflush", stdin=FOREIGN.format(net=net))
            _ns(netns, restore, "--noflush", stdin=nat)
            _ns(netns, restore, "--noflush", stdin=KUBE_FILTER)
    # One foreign chain uses a kube-proxy chain: that chain must stay (editing FOREIGN-NAT is not ours).
    _ns(netns, "iptables-legacy", "-t", "nat", "-A", "FOREIGN-NAT", "-j", "KUBE-MARK-MASQ")
    _ns(netns, "nft", "-f", "-", stdin=nftables_rules.full_sync(services) + KUBE_NFT6 + FOREIGN_NFT)
    before = _saves(netns)
    assert sum(ln.count("KUBE-SVC-") for ln in before["iptables-nft"].splitlines()) > 40
    assert "table ip kube-proxy" in before["nft"] and "table ip6 kube-proxy" in before["nft"]

    out = _ns(netns, NODEWIRE, "cleanup", "--kube-proxy")
    after = _saves(netns)
    assert "iptables-legacy nat: kept KUBE-MARK-MASQ" in out, out
    for tool, text in after.items():
        if tool == "nft":
            continue
        kube = _rule_lines(text, lambda ln: "KUBE-" in ln)
        allowed = {":KUBE-KUBELET-CANARY"}
        if tool == "iptables-legacy":
            allowed |= {":KUBE-MARK-MASQ", "-A FOREIGN-NAT -j KUBE-MARK-MASQ",
                        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"}
        assert set(kube) <= allowed and ":KUBE-KUBELET-CANARY" in kube, (tool, kube)
        foreign = lambda ln: "KUBE-" not in ln  # noqa: E731
        assert _rule_lines(text, foreign) == _rule_lines(before[tool], foreign), tool
    assert "kube-proxy" not in after["nft"]
    assert "table inet foreign" in after["nft"] and "tcp dport 22 accept" in after["nft"]

    again = _ns(netns, NODEWIRE, "cleanup", "--kube-proxy")  # idempotent: nothing left to do
    assert "no kube-proxy rules found" in again and _saves(netns) == after


# -- pure -------------------------------------------------------------------------------------------
def test_restore_text_deletes_jumps_then_flushes_then_deletes_chains():
    [nat] = parse_save(iptables_rules.full_sync(make_services(1, ["10.244.0.3"], 1)))
    text, gone, jumps, kept = restore_text(nat)
    lines = text.splitlines()
    assert jumps == 3 and not kept and "KUBE-SERVICES" in gone
    first_flush = next(i for i, ln in enumerate(lines) if ln.startswith(":"))
    assert all(ln.startswith("-D ") for ln in lines[1:first_flush])
    assert lines[first_flush - 1].startswith("-D POSTROUTING")
    assert all(ln.startswith("-X ") for ln in lines[first_flush + len(gone):-1])
