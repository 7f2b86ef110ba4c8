"""The id registry: service ids and backend ids, what each stands for, and backend refcounts.

The kernel maps hold only small integers (a frontend's service id, a slot's backend id); this module
remembers what each one means, learned back from the pinned maps at start-up so a restarted agent
computes the same entries and rewrites nothing that is right (after Cilium's BPFOps, which restores
its id allocators and backend refcounts from the maps).

It is compact on purpose (100k Services × 5 endpoints = 100k frontends, 500k backends): the id
tables are keyindex.py's numpy arrays. Tables that can be derived (a Service's frontends: the ids
whose owner is that Service) are derived, not kept twice.

One thread (the agent loop) plans and commits; readers on other threads take `snapshot()`, a copy
made under the registry's lock.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..model.objects import ObjectKey
from .codec import KEY, ServiceRows, as_keys, decode_backends, decode_services, ident_text  # noqa: F401
from .keyindex import (INVALID, NO_SLOT, SLOT_DTYPE, BackendTable, FrontendTable, KeyIndex, _set_slots,  # noqa: F401
                       be_live, key_hash)

@dataclass(frozen=True)
class FrontendInfo:
    service: ObjectKey | None
    ip: str
    port: int
    protocol: str
    port_name: str

    @property
    def frontend(self) -> str:
        return f"{self.ip}:{self.port}/{self.protocol}"


class Snapshot:
    """A consistent copy of what the ids stand for, for readers on other threads (observer, status)."""

    def __init__(self, reg: "IdRegistry"):
        fe, be = reg.frontends, reg.backends
        self._sids = fe.live_ids()
        self._fe_keys = fe.keys.copy()
        self._owner = fe.owner.copy()
        self._port_name = list(fe.port_name)
        self._services = list(reg.services)
        self._be_keys = be.keys.copy()
        self._be_live = be.live.copy()

    def service_ids(self) -> list[int]:
        """Service ids of the frontends some Service owns."""
        return self._sids[self._owner[self._sids] >= 0].tolist()

    def frontend(self, sid: int) -> FrontendInfo | None:
        """What a service id stands for, or None (unknown, or restored and owned by no Service)."""
        if not 0 < sid < len(self._owner) or self._owner[sid] < 0:
            return None
        ip, port, proto = ident_text(self._fe_keys[sid].tobytes())
        return FrontendInfo(self._services[self._owner[sid]], ip, port, proto, self._port_name[sid])

    def backend(self, bid: int) -> tuple[str, int, str] | None:
        """(ip, port, protocol) of a backend id, or None."""
        if not 0 < bid < len(self._be_live) or not self._be_live[bid]:
            return None
        return ident_text(self._be_keys[bid].tobytes())

    def backend_ids(self) -> list[int]:
        return np.nonzero(self._be_live)[0].tolist()


class IdRegistry:
    """Service ids (one per frontend), backend ids and refcounts, and which Service owns what."""

    def __init__(self):
        self.frontends = FrontendTable()
        self.backends = BackendTable()
        self.services: list[ObjectKey | None] = []   # service index → key (owner values)
        self.service_index: dict[ObjectKey, int] = {}
        self.owned_count = np.zeros(0, np.int32)     # service index → frontends it owns
        self._free_services: list[int] = []
        self.svc_entries = 0                           # entries in the service map
        self.lock = threading.Lock()

    # -- queries (planner, agent thread) -------------------------------------------------------
    def owned_services(self) -> list[ObjectKey]:
        """The Services owning at least one frontend."""
        return [self.services[i] for i in np.nonzero(self.owned_count > 0)[0].tolist()]

    def snapshot(self) -> Snapshot:
        with self.lock:
            return Snapshot(self)

    # -- changes (agent thread) ----------------------------------------------------------------
    def commit(self, p) -> None:
        """Record a WritePlan (agent/datapath/plan.py) as written: called once the writes succeeded."""
        fe, be = self.frontends, self.backends
        with self.lock:
            be.add(p.new_backends["id"], p.new_backends["ident"])
            fe.add(*p.new_frontends)
            w = p.written
            fe.header_count[w.sids] = w.count
            fe.flags[w.sids] = w.flags
            fe.affinity[w.sids] = w.affinity
            fe.has_header[w.sids] = True
            for s, b in zip(w.sids.tolist(), w.slots):
                fe.slots[s] = b
            o = p.owners
            idx = o.known_index.copy()
            new = idx[o.service_of] < 0
            for s in np.unique(o.service_of[new]).tolist() if new.any() else ():  # new owners
                idx[s] = self.intern_service(o.services[s])
            self._set_owners(o.sids, idx[o.service_of])
            for s, n in zip(o.sids.tolist(), o.port_names):
                fe.port_name[s] = n
            be.count_refs(p.refs_gained, +1)
            be.count_refs(p.refs_lost, -1)
            self._set_owners(p.removed_frontends, np.full(len(p.removed_frontends), -1))
            fe.remove(p.removed_frontends)
            be.remove(p.backend_deletes["id"])
            self.svc_entries += p.entry_delta
            idxs = o.known_index[o.applied]
            for idx in idxs[(idxs >= 0)].tolist():  # Services that may have lost their last frontend
                if not self.owned_count[idx]:
                    svc = self.services[idx]
                    del self.service_index[svc]
                    self.services[idx] = None
                    self._free_services.append(idx)

    def _restore_headers(self, rows: ServiceRows) -> None:
        keys = rows.ident
        fe = self.frontends
        head = np.nonzero(rows.slot == 0)[0]
        sids = rows.service_id[head].astype(np.uint32)
        _, first = np.unique(sids, return_index=True)
        good = np.zeros(len(head), bool)
        good[first] = True
        good &= sids > 0
        fe.add(sids[good], keys[head[good]])
        odd = head[~good]  # a header with id 0 or a duplicate id: a fresh id, and rewritten when claimed
        odd_sids = fe.reserve(len(odd))
        fe.add(odd_sids, keys[odd])
        hs = np.concatenate([sids[good], odd_sids])
        at = np.concatenate([head[good], odd])
        fe.header_count[hs] = rows.count[at]
        fe.flags[hs] = rows.flags[at]
        fe.flags[odd_sids] = 0xFFFF  # never a wanted value: forces a header write
        fe.affinity[hs] = rows.affinity[at]
        fe.has_header[hs] = True

    def _restore_slots(self, rows: ServiceRows) -> None:
        """Slot lists and backend refcounts; slots under no header get a frontend of their own."""
        keys = rows.ident
        fe = self.frontends
        slot_rows = np.nonzero(rows.slot != 0)[0]
        owner_sid = fe.lookup(keys[slot_rows])
        orphan = slot_rows[owner_sid == 0]
        if len(orphan):
            o_keys = keys[orphan]
            _, first = np.unique(key_hash(o_keys), return_index=True)
            fe.add(fe.reserve(len(first)), o_keys[first])
            owner_sid = fe.lookup(keys[slot_rows])
        bids = rows.backend_id[slot_rows].astype(np.uint32)
        bids = np.where(be_live(self.backends, bids), bids, INVALID).astype(np.uint32)
        slot_no = rows.slot[slot_rows].astype(np.int64)
        order = np.lexsort((slot_no, owner_sid))
        _set_slots(fe, owner_sid[order], slot_no[order], bids[order])
        valid = bids[bids != INVALID]
        n = self.backends.size
        self.backends.refs[:n] += np.bincount(valid, minlength=n)[:n].astype(np.int32)

    def _set_owners(self, sids: np.ndarray, idx: np.ndarray) -> None:
        """Frontends sids now owned by Services idx (-1: none), keeping owned_count in step."""
        fe = self.frontends
        if len(self.owned_count) < len(self.services):
            self.owned_count = np.concatenate([self.owned_count,
                                               np.zeros(len(self.services) - len(self.owned_count), np.int32)])
        if not len(sids):
            return
        before = fe.owner[sids]
        idx = np.asarray(idx, np.int32)
        if len(sids) <= 8:  # one change: item by item beats two ufunc.at calls
            oc = self.owned_count
            for b, i in zip(before.tolist(), idx.tolist()):
                if b >= 0:
                    oc[b] -= 1
                if i >= 0:
                    oc[i] += 1
        else:
            np.subtract.at(self.owned_count, before[before >= 0], 1)
            np.add.at(self.owned_count, idx[idx >= 0], 1)
        fe.owner[sids] = idx

    def adopt_owners(self, old: "IdRegistry") -> None:
        """Take the Service owners of frontends `old` knew (after re-reading the maps on a failed write)."""
        sids = self.frontends.live_ids()
        was = old.frontends.lookup(self.frontends.keys[sids])
        for sid, o in zip(sids.tolist(), was.tolist()):
            idx = int(old.frontends.owner[o]) if o else -1
            if idx >= 0:
                self._set_owners(np.array([sid]), np.array([self.intern_service(old.services[idx])]))
                self.frontends.port_name[sid] = old.frontends.port_name[o]

    # -- start-up: what the pinned maps already hold -------------------------------------------
    @classmethod
    def restore(cls, services: tuple[np.ndarray, np.ndarray], backends: tuple[np.ndarray, np.ndarray]) -> "IdRegistry":
        """The registry of maps already holding `services` and `backends` ((keys, values) rows as
        dump_arrays() returns them). Headers keep their service ids; slots with no header (a crash
        mid-delete) become frontends owned by no Service, removed by the next full sync unless claimed."""
        reg = cls()
        reg.backends.add(*decode_backends(*backends))
        rows = decode_services(*services)
        reg.svc_entries = len(rows.slot)
        reg._restore_headers(rows)
        reg._restore_slots(rows)
        return reg

    # -- service keys --------------------------------------------------------------------------
    def intern_service(self, svc: ObjectKey) -> int:
        """The Service's index (owner values), given one if it has none."""
        new = self._free_services[-1] if self._free_services else len(self.services)
        idx = self.service_index.setdefault(svc, new)  # one hash of the key
        if idx == new:
            if self._free_services:
                self._free_services.pop()
                self.services[idx] = svc
            else:
                self.services.append(svc)
        return idx


# -- north-south side maps (bpf/nodeport.c) ------------------------------------------------------
class GroupIds:
    """Group ids (one per Service port and family with external frontends: model GroupKey), from 1,
    lowest free first. After a restart a group takes the id its frontends' policy rows carry."""

    def __init__(self, kernel: dict[bytes, int] | None = None):
        self.of: dict = {}                         # GroupKey → id
        self.kernel = dict(kernel or {})           # policy key → id, until a GroupKey claims it
        self.used: set[int] = set(self.kernel.values())
        self._claimed: set[int] = set()            # ids some GroupKey holds

    def get(self, group, policy_key: bytes) -> int:
        gid = self.of.get(group)
        if gid is None:
            gid = self.kernel.pop(policy_key, None)
            if gid is None or gid in self._claimed:  # the frontend's old group is another group's now
                gid = self._take()
            self.of[group] = gid
            self._claimed.add(gid)
            self.used.add(gid)
        return gid

    def _take(self) -> int:
        i = 1
        while i in self.used:
            i += 1
        return i

    def release(self, gids) -> None:
        gone = set(gids)
        self.used -= gone
        self._claimed -= gone
        self.of = {k: v for k, v in self.of.items() if v not in gone}

    def adopt(self, old: "GroupIds") -> None:
        """Keep the groups `old` had given ids (after re-reading the maps on a failed write)."""
        self.of = dict(old.of)
        self._claimed = set(old._claimed)
        self.used |= old.used

    def settle(self, live: set[int]) -> None:
        """After a full sync: only the groups some Service owns stay taken."""
        self.kernel.clear()
        self.used = set(live)
        self.of = {k: v for k, v in self.of.items() if v in live}
        self._claimed = set(self.of.values())


@dataclass(frozen=True)
class Owned:
    """What one Service put in the north-south side maps."""
    policy: frozenset[bytes] = frozenset()
    ranges: frozenset[bytes] = frozenset()
    local: frozenset[str] = frozenset()
    groups: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.policy or self.local or self.groups)


class SideRegistry:
    """What the north-south side maps hold (policy rows, source-range prefixes, the local-endpoint set
    with its references, each group's Maglev table as the backend ids it names) and which Service put
    what there; restored from the pinned maps, so a restart rewrites nothing that is right."""

    def __init__(self):
        self.policy: dict[bytes, bytes] = {}       # np_frontend → np_policy, as the kernel holds them
        self.ranges: set[bytes] = set()
        self.local: set[bytes] = set()             # 16-byte addresses in the kernel
        self.local_refs: dict[str, int] = {}       # address → Services listing it
        self.tables: dict[int, tuple[int, ...]] = {}  # group → sorted distinct backend ids of its table
        self.groups = GroupIds()
        self.owned: dict[ObjectKey, Owned] = {}
        self.tables_built = 0                      # tables built and swapped in by this process

    @classmethod
    def restore(cls, policy: dict[bytes, bytes], ranges, local, tables: dict[int, np.ndarray]) -> "SideRegistry":
        """From the maps: policy rows, range keys, local keys, and group → table (empty if unreadable).
        A table depends only on its backend set: one naming exactly the wanted ids is kept as is."""
        from .codec import NP_POLICY

        reg = cls()
        reg.policy = dict(policy)
        reg.groups = GroupIds({k: int(np.frombuffer(v, NP_POLICY)["group"][0]) for k, v in policy.items()})
        reg.ranges, reg.local = set(ranges), set(local)
        reg.tables = {g: tuple(np.unique(t).tolist()) for g, t in tables.items()}
        return reg

    def commit(self, sp) -> None:
        """Record a SidePlan (agent/datapath/nsplan.py) as written."""
        self.policy.update(sp.policy_set)
        for k in sp.policy_del:
            self.policy.pop(k, None)
        self.ranges = (self.ranges | sp.ranges_add) - sp.ranges_del
        self.local = (self.local | set(sp.local_add)) - set(sp.local_del)
        for ip, n in sp.local_refs.items():
            if n > 0:
                self.local_refs[ip] = n
            else:
                self.local_refs.pop(ip, None)
        for gid, ids in sp.tables.items():
            self.tables[gid] = ids
        self.tables_built += len(sp.tables)
        for gid in sp.groups_del:
            self.tables.pop(gid, None)
        self.groups.release(sp.groups_released)
        for svc, o in sp.owned.items():
            if o:
                self.owned[svc] = o
            else:
                self.owned.pop(svc, None)
        if sp.full:
            self.groups.settle(set().union(*(o.groups for o in self.owned.values())))
