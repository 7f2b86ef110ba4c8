"""The consistency checker: what the kernel's maps hold against what the cluster state wants.

The kernel side is decoded from the pinned maps themselves (not from the agent's registry), the
desired side is the model's frontends for the same ClusterState the agent would build. Services the
planner would refuse (map full, clash) are reported as refused, not as drift: their old entries are
kept on purpose. Every difference is one Drift naming the frontend, the Service and what is wrong.

`nodewire check` runs it over everything; the agent runs it on a random sample of Services every
period (PeriodicCheck), so at 100k Services a check costs a few thousand map lookups, not a dump.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from ..model.frontends import Frontend
from ..model.objects import ObjectKey
from . import codec
from .abi import PROTO_NAMES, PROTO_NUMBERS
from .codec import addr16, addr_str, host_port, port_host

MISSING_FRONTEND, EXTRA_FRONTEND = "missing-frontend", "extra-frontend"
MISSING_BACKEND, EXTRA_BACKEND = "missing-backend", "extra-backend"
SLOT_COUNT, DANGLING_SLOT, ORPHAN_BACKEND = "slot-count", "dangling-slot", "orphan-backend"
HEADER, NOT_ATTACHED, STALE_REVNAT = "header-mismatch", "not-attached", "stale-revnat"
KINDS = (MISSING_FRONTEND, EXTRA_FRONTEND, MISSING_BACKEND, EXTRA_BACKEND, SLOT_COUNT, DANGLING_SLOT,
         ORPHAN_BACKEND, HEADER, NOT_ATTACHED, STALE_REVNAT)
# A reverse-NAT entry belongs to a socket (the datapath writes it at connect, the LRU ages it out);
# one whose frontend is gone may still serve a live connection to a deleted Service, so it is a
# warning, not drift (no exit status, no alert).
WARNINGS = (STALE_REVNAT,)

Ident = tuple[bytes, int, int]  # (16-byte address, port, protocol number)


@dataclass(frozen=True)
class Drift:
    kind: str
    frontend: str = ""  # "10.96.0.1:80/TCP"
    service: str = ""  # "default/web" when known
    detail: str = ""

    def __str__(self) -> str:
        who = " ".join(x for x in (self.frontend, f"({self.service})" if self.service else "") if x)
        return f"{self.kind}: {who}: {self.detail}" if who else f"{self.kind}: {self.detail}"


@dataclass
class Report:
    drift: list[Drift] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # Services the planner refuses (not drift)
    frontends_checked: int = 0
    kernel_frontends: int = 0
    kernel_backends: int = 0
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not any(d.kind not in WARNINGS for d in self.drift)

    def counts(self) -> dict[str, int]:
        c = Counter(d.kind for d in self.drift)
        return {k: c.get(k, 0) for k in KINDS}

    def as_dict(self) -> dict:
        return {"clean": self.clean, "counts": self.counts(), "drift": [asdict(d) for d in self.drift],
                "refused": self.refused, "frontends_checked": self.frontends_checked,
                "kernel_frontends": self.kernel_frontends, "kernel_backends": self.kernel_backends,
                "seconds": round(self.seconds, 3)}


def ident_text(ident: Ident) -> str:
    return f"{host_port(addr_str(ident[0]), ident[1])}/{PROTO_NAMES.get(ident[2], ident[2])}"


def frontend_ident(fe: Frontend) -> Ident:
    return addr16(fe.ip), fe.port, PROTO_NUMBERS[fe.protocol]


@dataclass
class KernelView:
    """The service and backend maps, decoded: headers, slots and backends by their keys."""
    headers: dict[Ident, tuple[int, int, int, int]]  # → (count, flags, service_id, affinity_timeout)
    slots: dict[Ident, dict[int, int]]  # → slot → backend id
    backends: dict[int, tuple[bytes, int]]  # id → (16-byte address, port)

    @classmethod
    def from_arrays(cls, services: tuple, backends: tuple) -> "KernelView":
        rows = codec.decode_services(*services)
        headers: dict[Ident, tuple] = {}
        slots: dict[Ident, dict[int, int]] = {}
        addrs, ports, protos = codec.split_ident(rows.ident)
        nums = rows.slot.tolist()
        counts, flags, sids, affs, bids = (a.tolist() for a in (rows.count, rows.flags, rows.service_id,
                                                                 rows.affinity, rows.backend_id))
        for i, slot in enumerate(nums):
            ident = (addrs[i], ports[i], protos[i])
            if slot == 0:
                headers[ident] = (counts[i], flags[i], sids[i], affs[i])
            else:
                slots.setdefault(ident, {})[slot] = bids[i]
        ids, bidents = codec.decode_backends(*backends)
        b_addrs, b_ports, _ = codec.split_ident(bidents)
        return cls(headers, slots, dict(zip(ids.tolist(), zip(b_addrs, b_ports))))


def _check_frontend(ident: Ident, fe: Frontend | None, kv: KernelView, out: list[Drift]) -> None:
    name, svc = ident_text(ident), str(fe.service) if fe else ""
    hdr = kv.headers.get(ident)
    if hdr is None:
        out.append(Drift(MISSING_FRONTEND, name, svc, f"wanted with {len(fe.backends)} backends, not in the kernel"))
        return
    count, _flags, _sid, affinity = hdr
    present = kv.slots.get(ident, {})
    if set(present) != set(range(1, count + 1)):
        out.append(Drift(SLOT_COUNT, name, svc, f"slot 0 says {count} backends, slots present: {sorted(present)}"))
    have: Counter = Counter()
    for slot, bid in sorted(present.items()):
        be = kv.backends.get(bid)
        if be is None:
            out.append(Drift(DANGLING_SLOT, name, svc, f"slot {slot} points to backend id {bid}, which does not exist"))
        else:
            have[be] += 1
    if fe is None:
        return
    want = Counter((addr16(b.ip), b.port) for b in fe.backends)
    for be in sorted(want - have):
        out.append(Drift(MISSING_BACKEND, name, svc, f"backend {_be_text(be)} is wanted, not in the slots"))
    for be in sorted(have - want):
        out.append(Drift(EXTRA_BACKEND, name, svc, f"backend {_be_text(be)} is in the slots, not wanted"))
    if affinity != fe.affinity_timeout:
        out.append(Drift(HEADER, name, svc, f"affinity timeout {affinity}s in the kernel, {fe.affinity_timeout}s wanted"))


def _be_text(be: tuple[bytes, int]) -> str:
    return host_port(addr_str(be[0]), be[1])


def compare(desired: dict[ObjectKey, list[Frontend]], kv: KernelView, refused: set[ObjectKey] = frozenset(),
            full: bool = True) -> list[Drift]:
    """Drift between the desired frontends and the kernel. full=False (a sample): only the desired
    frontends are looked at (no extra-frontend / orphan-backend, which need the whole picture)."""
    out: list[Drift] = []
    wanted: dict[Ident, Frontend] = {}
    skip: set[Ident] = set()  # a refused Service's frontends: its old entries are kept on purpose
    for svc, fes in desired.items():
        for fe in fes:
            if svc in refused:
                skip.add(frontend_ident(fe))
            else:
                wanted[frontend_ident(fe)] = fe
    for ident, fe in wanted.items():
        _check_frontend(ident, fe, kv, out)
    if not full:
        return out
    for ident in kv.headers.keys() - wanted.keys() - skip:
        out.append(Drift(EXTRA_FRONTEND, ident_text(ident), "", "in the kernel, no Service wants it"))
        _check_frontend(ident, None, kv, out)
    for ident in kv.slots.keys() - kv.headers.keys():
        out.append(Drift(SLOT_COUNT, ident_text(ident), "", f"slots {sorted(kv.slots[ident])} without a slot 0"))
    used = {bid for sl in kv.slots.values() for bid in sl.values()}
    for bid in sorted(kv.backends.keys() - used):
        out.append(Drift(ORPHAN_BACKEND, "", "", f"backend id {bid} ({_be_text(kv.backends[bid])}) is in no slot"))
    return out


def stale_revnat(revnat_values, desired: dict[ObjectKey, list[Frontend]]) -> list[Drift]:
    """Reverse-NAT entries whose (VIP, port) is no frontend any more (warnings, see WARNINGS)."""
    vips = {(addr16(fe.ip), fe.port) for fes in desired.values() for fe in fes}
    out, seen = [], Counter()
    if len(revnat_values):
        for addr, port in zip(revnat_values["address"].tolist(), revnat_values["port"].tolist()):
            vip = (addr, port_host(port))
            if vip not in vips:
                seen[vip] += 1
    for vip, n in sorted(seen.items()):
        out.append(Drift(STALE_REVNAT, _be_text(vip), "", f"{n} reverse-NAT entries for a frontend that is gone"))
    return out


def not_attached(attached: list[dict], hooks) -> list[Drift]:
    """Each socket hook (function, attach type) must have our program attached on the cgroup."""
    have = {(p.get("name"), p.get("attach_type")) for p in attached}
    return [Drift(NOT_ATTACHED, "", "", f"{fn} is not attached to the cgroup as {at}")
            for fn, at in hooks if (fn[:15], at) not in have]  # the kernel keeps 15 characters of a name


def planner_refusals(desired, kv_arrays, capacities) -> list:
    """What a full sync would refuse (map full, clash), so that those Services are not called drift."""
    from .ids import IdRegistry
    from .plan import plan

    reg = IdRegistry.restore(*kv_arrays)
    return plan(desired, reg, capacities, full=True).refusals


def check(desired: dict[ObjectKey, list[Frontend]], services_map, backends_map, revnat_map=None,
          attached: list[dict] | None = None, hooks=()) -> Report:
    """The whole check against the live maps (anything with dump_arrays(), as RawMap)."""
    from .plan import Capacities, Limit

    t0 = time.perf_counter()
    arrays = (services_map.dump_arrays(), backends_map.dump_arrays())
    kv = KernelView.from_arrays(*arrays)
    caps = Capacities(Limit(services_map.name, services_map.capacity), Limit(backends_map.name, backends_map.capacity))
    refusals = planner_refusals(desired, arrays, caps)
    refused = {r.service for r in refusals}
    rep = Report(refused=[str(r) for r in refusals], kernel_frontends=len(kv.headers), kernel_backends=len(kv.backends))
    rep.drift = compare(desired, kv, refused)
    rep.frontends_checked = sum(len(f) for f in desired.values())
    if revnat_map is not None:
        rep.drift += stale_revnat(revnat_map.dump_arrays()[1], desired)
    if attached is not None:
        rep.drift += not_attached(attached, hooks)
    rep.seconds = time.perf_counter() - t0
    return rep


class PeriodicCheck:
    """The agent's own check: a random sample of Services each run, their frontends looked up key by
    key (slot 0..count and their backends), so the cost follows the sample, not the cluster."""

    def __init__(self, state, services_map, backends_map, sample: int = 512, rng: random.Random | None = None):
        self.state, self.services, self.backends = state, services_map, backends_map
        self.sample, self.rng = sample, rng or random.Random()
        self.runs = 0
        self.last: Report | None = None
        self.totals: Counter = Counter()  # kind → drift seen over all runs

    def run(self, refused: set[ObjectKey] = frozenset()) -> Report:
        t0 = time.perf_counter()
        keys = self.state.service_keys()
        picked = self.rng.sample(keys, min(self.sample, len(keys)))
        desired = self.state.frontends_of(picked)  # Services changed but not yet synced are left out
        kv = self._lookup([frontend_ident(fe) for svc, fes in desired.items() if svc not in refused for fe in fes])
        rep = Report(drift=compare(desired, kv, refused, full=False))
        rep.frontends_checked = sum(len(f) for s, f in desired.items() if s not in refused)
        rep.seconds = time.perf_counter() - t0
        self.runs += 1
        self.totals.update(d.kind for d in rep.drift)
        self.last = rep
        return rep

    def _lookup(self, idents: list[Ident]) -> KernelView:
        """The sampled frontends' entries, one BPF_MAP_LOOKUP_ELEM each (slot 0, its slots, backends)."""
        import numpy as np

        svc, bem = self.services, self.backends
        kv = KernelView({}, {}, {})
        for ident in idents:
            fid = codec.ident_of(*ident)
            raw = svc.lookup(codec.service_keys(svc.key_dtype, fid, 0).tobytes())
            if raw is None:
                continue
            h = np.frombuffer(raw, svc.value_dtype)[0]
            kv.headers[ident] = (int(h["count"]), int(h["flags"]), int(h["service_id"]), int(h["affinity_timeout"]))
            for slot in range(1, int(h["count"]) + 1):
                raw = svc.lookup(codec.service_keys(svc.key_dtype, fid, slot).tobytes())
                if raw is None:
                    continue
                bid = int(np.frombuffer(raw, svc.value_dtype)[0]["backend_id"])
                kv.slots.setdefault(ident, {})[slot] = bid
                if bid not in kv.backends:
                    braw = bem.lookup(np.array([bid], bem.key_dtype).tobytes())
                    if braw is not None:
                        b = np.frombuffer(braw, bem.value_dtype)[0]
                        kv.backends[bid] = (bytes(b["address"]), port_host(int(b["port"])))
        return kv
