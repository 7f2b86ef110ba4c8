"""The ways a Service can be implemented, each behind the same small interface: load N Services
from nothing, apply one endpoint change, report memory, unload."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

from . import iptables_rules, nftables_rules
from .measure import KmemCgroup, LoadResult, run_capped
from .services import BenchService

IPTABLES_BACKENDS = {
    # kube-proxy runs whichever iptables the node uses; both are here. The nft-backed one cannot load
    # 10k Services with 5 endpoints within minutes on this kernel, so legacy is the default.
    "legacy": ("iptables-legacy-restore", "iptables-legacy"),
    "nft": ("iptables-nft-restore", "iptables-nft"),
}


class Unavailable(Exception):
    """The mode cannot run on this machine or checkout (the reason goes into the results)."""


@dataclass
class RulesMode:
    """iptables or nftables rules, in the client pod's network namespace (its nat OUTPUT hook sees
    the client's connects, as a node's own nat OUTPUT sees a host-network client)."""

    name: str
    netns: str
    pod_cidr: str
    iptables_backend: str = "legacy"
    _memcg: KmemCgroup | None = None
    stats: dict = field(default_factory=dict)

    def _cmd(self) -> list[str]:
        if self.name == "iptables":
            return [IPTABLES_BACKENDS[self.iptables_backend][0], "-w", "--noflush"]
        return ["nft", "-f"]

    def load(self, services: list[BenchService], cap_s: float) -> LoadResult:
        if self.name == "iptables":
            text = iptables_rules.full_sync(services, self.pod_cidr)
            self.stats["rules"] = iptables_rules.rule_count(text)
        else:
            text = nftables_rules.full_sync(services, self.pod_cidr)
            rules, elems = nftables_rules.rule_count(text)
            self.stats["rules"] = rules + elems
        self._memcg = KmemCgroup(f"nodewire-bench-{os.path.basename(self.netns)}-{self.name}")
        res = run_capped(self._cmd(), text, cap_s, self.netns, self._memcg.procs)
        kb = self._memcg.kernel_bytes()
        self.stats["kernel_mem_mib"] = None if kb is None else round(kb / 2**20, 1)
        return res

    def change(self, services: list[BenchService], before: BenchService, after: BenchService,
               cap_s: float) -> LoadResult:
        if self.name == "iptables":
            text = iptables_rules.endpoint_change(services, before, after, self.pod_cidr)
        else:
            text = nftables_rules.endpoint_change(before, after, self.pod_cidr)
        return run_capped(self._cmd(), text, cap_s, self.netns)

    def memory(self) -> dict:
        return {"kernel_mem_mib": self.stats.get("kernel_mem_mib"), "rules": self.stats.get("rules")}

    def unload(self) -> None:
        ns = ["ip", "netns", "exec", self.netns]
        if self.name == "iptables":
            tool = IPTABLES_BACKENDS[self.iptables_backend][1]
            for flag in ("-F", "-X"):
                subprocess.run([*ns, tool, "-t", "nat", flag], capture_output=True, timeout=600)
        else:
            subprocess.run([*ns, "nft", "delete", "table", "ip", "kube-proxy"], capture_output=True, timeout=600)
        if self._memcg:
            self._memcg.remove()
