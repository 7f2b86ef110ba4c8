"""Remove what kube-proxy left on a node, as `kube-proxy --cleanup` does, and nothing else.

kube-proxy's own cleanup (pkg/proxy/iptables/proxier.go CleanupLeftovers; pkg/proxy/nftables
CleanupLeftovers) deletes the jumps it put in the built-in chains, then flushes and deletes its
chains, and drops its `kube-proxy` nftables tables. Here the same, for every place a node can hold
them: the iptables legacy and nft backends, IPv4 and IPv6, tables nat, filter and mangle.

  * kube-proxy's chains: every chain named KUBE-* but kubelet's own (KUBE-KUBELET-CANARY, kubelet's
    KUBE-FIREWALL), which kubelet watches and would recreate.
  * jumps: rules of the built-in chains whose target (-j/-g) is one of those chains.
  * nftables: the tables `ip kube-proxy` and `ip6 kube-proxy`.
Rules are read with `*-save` (which lists only tables that exist, so nothing is created) and removed in
one `*-restore --noflush` per table: jumps deleted (-D, the saved rule text), chains flushed (declared)
and then deleted (-X). A KUBE-* chain that a foreign chain still jumps to is left in place and reported:
removing it would mean editing someone else's chain. Running it again finds nothing and changes nothing.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field

TABLES = ("nat", "filter", "mangle")
BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
KUBELET_CHAINS = {"KUBE-KUBELET-CANARY", "KUBE-FIREWALL"}
NFT_TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"))
IPTABLES = ("iptables-legacy", "iptables-nft", "ip6tables-legacy", "ip6tables-nft")


@dataclass
class Report:
    removed_chains: dict[str, list[str]] = field(default_factory=dict)  # "iptables-nft nat" → chains
    removed_jumps: dict[str, int] = field(default_factory=dict)
    kept_referenced: dict[str, list[str]] = field(default_factory=dict)  # chains a foreign chain jumps to
    removed_nft_tables: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # tools this node does not have

    @property
    def changed(self) -> bool:
        return bool(self.removed_chains or self.removed_jumps or self.removed_nft_tables)


def is_kube_proxy_chain(name: str) -> bool:
    return name.startswith("KUBE-") and name not in KUBELET_CHAINS


def _target(rule: list[str]) -> str | None:
    for flag in ("-j", "-g", "--jump", "--goto"):
        if flag in rule:
            i = rule.index(flag)
            return rule[i + 1] if i + 1 < len(rule) else None
    return None


@dataclass
class _Table:
    name: str
    chains: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # "-A CHAIN …" lines as saved


def parse_save(text: str) -> list[_Table]:
    """The tables of an `iptables-save` dump: chain names and rule lines."""
    tables, cur = [], None
    for line in text.splitlines():
        if line.startswith("*"):
            cur = _Table(line[1:].strip())
            tables.append(cur)
        elif cur is not None and line.startswith(":"):
            cur.chains.append(line[1:].split()[0])
        elif cur is not None and line.startswith("-A "):
            cur.rules.append(line)
    return tables


def restore_text(table: _Table) -> tuple[str, list[str], int, list[str]]:
    """(restore input, chains removed, jumps removed, chains kept because a foreign chain uses them)."""
    import shlex

    ours = [c for c in table.chains if is_kube_proxy_chain(c)]
    jumps, referenced = [], set()
    for line in table.rules:
        words = shlex.split(line)
        chain, target = words[1], _target(words)
        if target is None or not is_kube_proxy_chain(target) or is_kube_proxy_chain(chain):
            continue
        if chain in BUILTIN_CHAINS:
            jumps.append("-D" + line[2:])
        else:
            referenced.add(target)
    # A chain reached (directly or not) from a foreign chain stays, with the chains it jumps to.
    keep = set(referenced)
    edges = {}
    for line in table.rules:
        words = shlex.split(line)
        if is_kube_proxy_chain(words[1]) and (t := _target(words)) and is_kube_proxy_chain(t):
            edges.setdefault(words[1], set()).add(t)
    todo = list(keep)
    while todo:
        for t in edges.get(todo.pop(), ()):
            if t not in keep:
                keep.add(t)
                todo.append(t)
    gone = [c for c in ours if c not in keep]
    if not gone and not jumps:
        return "", [], 0, sorted(keep)
    lines = [f"*{table.name}", *jumps, *(f":{c} - [0:0]" for c in gone), *(f"-X {c}" for c in gone), "COMMIT", ""]
    return "\n".join(lines), gone, len(jumps), sorted(keep)


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True)


def clean_iptables(tool: str, report: Report) -> None:
    save, restore = shutil.which(f"{tool}-save"), shutil.which(f"{tool}-restore")
    if not save or not restore:
        report.skipped.append(tool)
        return
    out = _run([save])
    if out.returncode != 0:  # e.g. no such backend in this kernel: nothing of kube-proxy's there either
        report.skipped.append(f"{tool}: {out.stderr.strip()[:200]}")
        return
    for table in parse_save(out.stdout):
        if table.name not in TABLES:
            continue
        text, gone, jumps, kept = restore_text(table)
        where = f"{tool} {table.name}"
        if kept:
            report.kept_referenced[where] = kept
        if not text:
            continue
        r = _run([restore, "--noflush"], text)
        if r.returncode != 0:
            raise RuntimeError(f"{where}: {restore} failed: {r.stderr.strip()[:500]}")
        if gone:
            report.removed_chains[where] = gone
        if jumps:
            report.removed_jumps[where] = jumps


def clean_nftables(report: Report) -> None:
    nft = shutil.which("nft")
    if not nft:
        report.skipped.append("nft")
        return
    out = _run([nft, "list", "tables"])
    if out.returncode != 0:
        report.skipped.append(f"nft: {out.stderr.strip()[:200]}")
        return
    present = {tuple(line.split()[1:3]) for line in out.stdout.splitlines() if line.startswith("table ")}
    for family, name in NFT_TABLES:
        if (family, name) in present:
            r = _run([nft, "delete", "table", family, name])
            if r.returncode != 0:
                raise RuntimeError(f"nft delete table {family} {name}: {r.stderr.strip()[:500]}")
            report.removed_nft_tables.append(f"{family} {name}")


def cleanup_kube_proxy() -> Report:
    report = Report()
    for tool in IPTABLES:
        clean_iptables(tool, report)
    clean_nftables(report)
    return report
