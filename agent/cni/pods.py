"""The agent side of nodewire-cni: pods' identity from CNI calls into ClusterState, per-pod observation
start/stop hooks, CHECK, GC, and recovery of pods that existed before the agent started.

The plugin's ADD is answered as soon as the attachment is recorded (in memory and as a file under the
state dir); putting the pod into ClusterState, finding its node-side veth and starting observation
happen on this module's worker thread, so neither a netns read nor the agent's other threads (which
the state change wakes) delay a pod's creation. Records live in /run
(tmpfs), as the netns they describe do: after a reboot both are gone.

Recovery at start: (1) the records written by the previous agent, kept while their netns exists;
(2) for pods the API source reports with no record (the agent was installed after them), the netns
under `netns_dir` are read once and a pod whose address sits in one of them gets that netns's veth.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

from ..api import ApiError, Reply
from ..model.objects import ObjectKey, Pod
from ..state import ClusterState
from . import netns as nsread

log = logging.getLogger("nodewire.cni")

StartHook = Callable[[ObjectKey, str], None]  # pod, node-side veth
StopHook = Callable[[ObjectKey], None]


@dataclass(frozen=True)
class Attachment:
    """One ADD: a pod's interface in its netns, as the runtime and the primary plugin described it."""

    container_id: str
    ifname: str
    netns: str
    namespace: str
    name: str
    uid: str = ""
    ips: tuple[str, ...] = ()
    network: str = ""
    host_veth: str | None = None
    candidates: tuple[str, ...] = ()  # prevResult's interfaces outside the sandbox
    added: float = 0.0

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)

    @property
    def id(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)


def attachment_from_params(p: dict, method: str) -> Attachment:
    """The plugin's params → Attachment; a missing field is a bad_request naming it."""
    for f in ("containerID", "ifName"):
        if not isinstance(p.get(f), str) or not p[f]:
            raise ApiError("bad_request", f"{method}: {f} is missing")
    for f, kind, name in (("ips", list, "a list"), ("interfaces", list, "a list"), ("netns", str, "a string"),
                          ("network", str, "a string"), ("podNamespace", str, "a string"),
                          ("podName", str, "a string"), ("podUID", str, "a string")):
        if p.get(f) is not None and not isinstance(p[f], kind):
            raise ApiError("bad_request", f"{method}: {f} is not {name}")  # prevResult's, or the conf's name
    cid = p["containerID"]
    ifaces = p.get("interfaces") or []
    ips = []
    for i, entry in enumerate(p.get("ips") or []):
        try:
            idx = entry.get("interface")
            if idx is not None and ifaces and ifaces[idx].get("name") != p["ifName"]:
                continue  # an address of another interface (e.g. the bridge's gateway)
            ips.append(str(ipaddress.ip_interface(entry["address"]).ip))
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
            raise ApiError("bad_request", f"{method}: ips[{i}]: {e!r}") from None
    candidates = tuple(x["name"] for x in ifaces if isinstance(x, dict) and x.get("name") and not x.get("sandbox"))
    return Attachment(
        container_id=cid, ifname=p["ifName"], netns=p.get("netns") or "",
        namespace=p.get("podNamespace") or "cni", name=p.get("podName") or f"container-{cid[:12]}",
        uid=p.get("podUID") or "", ips=tuple(ips), network=p.get("network") or "",
        candidates=candidates, added=time.time())


class CniPods:
    def __init__(self, state: ClusterState, node_name: str, record_dir: str,
                 veth_netns: str | None = None, netns_dir: str = "/var/run/netns"):
        self.state, self.node_name, self.record_dir = state, node_name, record_dir
        self.veth_netns, self.netns_dir = veth_netns, netns_dir
        self.attachments: dict[tuple[str, str], Attachment] = {}
        self.recovered: dict[ObjectKey, str] = {}  # API pods given a veth by the netns scan
        self._scanned: dict[str, str] = {}         # address → node-side veth, from the start-up scan
        self._applied: dict[ObjectKey, Pod] = {}   # the Pod objects this module put in the state
        self._starts: list[StartHook] = []
        self._stops: list[StopHook] = []
        self._lock = threading.RLock()
        self._work: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.adopted = 0  # attachments taken in on CHECK

    # -- wiring ----------------------------------------------------------------------------------
    def subscribe(self, start: StartHook, stop: StopHook) -> None:
        """Called with (pod, veth) when a pod's veth is known, and (pod) when it goes."""
        self._starts.append(start)
        self._stops.append(stop)

    def register(self, api) -> None:
        for name, fn in (("cni.add", self.add), ("cni.del", self.delete), ("cni.check", self.check),
                         ("cni.gc", self.gc), ("cni.list", self.list)):
            api.register(name, fn)

    def start(self) -> "CniPods":
        os.makedirs(self.record_dir, exist_ok=True)
        self.recover()
        for target, name in ((self._worker, "cni-veth"), (self._match_loop, "cni-recover")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        self._stop.set()
        self._work.put(None)
        for t in self._threads:
            t.join(5)

    # -- API methods -----------------------------------------------------------------------------
    def add(self, params: dict) -> Reply:
        att = attachment_from_params(params, "cni.add")
        if not att.netns:
            raise ApiError("bad_request", "cni.add: netns is missing")
        with self._lock:
            old = self.attachments.get(att.id)
            if old is not None and old.key != att.key:
                self._forget(old)
            self.attachments[att.id] = att
        # The record, the log line and the worker (state, veth, hooks) follow the answer: done before,
        # they kept the plugin's ADD waiting (p50 4.4 → 2.5 ms in `nodewire bench cni`, measured).
        return Reply({"pod": str(att.key)}, lambda: self._added(att))

    def _added(self, att: Attachment) -> None:
        with self._lock:
            if self.attachments.get(att.id) is not att:
                return  # deleted or added again meanwhile
            self._save(att)
        log.info("cni add pod=%s container=%s ips=%s", att.key, att.container_id[:12], ",".join(att.ips))
        self._work.put(att.id)

    def delete(self, params: dict) -> dict:
        if not params.get("containerID") or not params.get("ifName"):
            raise ApiError("bad_request", "cni.del: containerID and ifName are required")
        with self._lock:
            att = self.attachments.get((params["containerID"], params["ifName"]))
            if att is not None:
                self._forget(att)
        log.info("cni del container=%s known=%s", params["containerID"][:12], att is not None)
        return {"pod": str(att.key) if att else None}

    def check(self, params: dict) -> dict | Reply:
        att = self.attachments.get((params.get("containerID"), params.get("ifName")))
        if att is None:
            return self._adopt(params)
        if not os.path.exists(att.netns):
            raise ApiError("not_found", f"pod {att.key}: netns {att.netns} no longer exists")
        return {"pod": str(att.key), "hostVeth": att.host_veth}

    def _adopt(self, params: dict) -> Reply:
        """CHECK of an attachment this agent never saw (ADDed while it was down, failOpen). CHECK
        carries everything ADD does, so the pod is taken in as its ADD would have been, once its
        netns holds the interface with prevResult's addresses (a deleted container's does not)."""
        never = ApiError("not_found", f"container {params.get('containerID')} interface "
                         f"{params.get('ifName')} was never added (or was deleted)")
        try:
            att = attachment_from_params(params, "cni.check")
            present = {name: set(ips) for name, _peer, ips in nsread.addresses(att.netns)} if att.netns else {}
        except (ApiError, OSError, ValueError):
            raise never from None
        if att.ifname not in present or not set(att.ips) <= present[att.ifname]:
            raise never
        with self._lock:
            if att.id not in self.attachments:  # else an ADD came meanwhile: that one stands
                self.attachments[att.id] = att
                self.recovered.pop(att.key, None)  # a netns-scan find becomes a CNI pod
                self.adopted += 1
        log.info("cni check adopted pod=%s container=%s", att.key, att.container_id[:12])
        return Reply({"pod": str(att.key), "hostVeth": None, "adopted": True}, lambda: self._added(att))

    def gc(self, params: dict) -> dict:
        """Forget every attachment of `network` not in validAttachments (CNI 1.1.0 GC)."""
        for f, kind, name in (("validAttachments", list, "a list"), ("network", str, "a string")):
            if params.get(f) is not None and not isinstance(params[f], kind):
                raise ApiError("bad_request", f"cni.gc: {f} is not {name}")
        valid = {(v.get("containerID"), v.get("ifname")) for v in params.get("validAttachments") or []
                 if isinstance(v, dict) and isinstance(v.get("containerID"), str) and isinstance(v.get("ifname"), str)}
        network = params.get("network") or ""
        with self._lock:
            stale = [a for a in self.attachments.values()
                     if a.id not in valid and (not network or not a.network or a.network == network)]
            for a in stale:
                self._forget(a)
        return {"removed": [a.container_id for a in stale]}

    def status(self) -> dict:
        with self._lock:
            return {"pods": len(self.attachments), "recovered": len(self.recovered), "adopted": self.adopted,
                    "errors": self.errors[-5:]}

    def list(self, _params: dict | None = None) -> list[dict]:
        with self._lock:
            rows = [dict(asdict(a), pod=str(a.key), source="cni") for a in self.attachments.values()]
            rows += [{"pod": str(k), "host_veth": v, "source": "netns-scan"} for k, v in self.recovered.items()]
        return rows

    # -- state ----------------------------------------------------------------------------------
    def _apply_pod(self, att: Attachment) -> None:
        """Put the pod in the state. An API-source pod with addresses is the better record (it has
        labels): it is kept, only an empty address list is filled in."""
        current = self.state.pods.get(att.key)
        if current is not None and current.ips and current is not self._applied.get(att.key):
            return
        base = current or Pod(att.key, (), node_name=self.node_name, uid=att.uid)
        pod = replace(base, ips=att.ips or base.ips, node_name=base.node_name or self.node_name)
        self._applied[att.key] = pod
        self.state.apply("Pod", att.key, pod)

    def _forget(self, att: Attachment) -> None:
        self.attachments.pop(att.id, None)
        try:
            os.unlink(self._record_path(att))
        except FileNotFoundError:
            pass
        mine = self._applied.pop(att.key, None)
        if mine is not None and self.state.pods.get(att.key) == mine:
            self.state.apply("Pod", att.key, None)
        self._hook_stop(att.key)

    def _record_path(self, att: Attachment) -> str:
        return os.path.join(self.record_dir, f"{att.container_id}-{att.ifname}.json")

    def _save(self, att: Attachment) -> None:
        path = self._record_path(att)
        with open(path + ".tmp", "w") as f:
            json.dump(asdict(att), f)
        os.replace(path + ".tmp", path)

    # -- veth resolution and hooks (worker thread) ------------------------------------------------
    def _worker(self) -> None:
        while not self._stop.is_set():
            item = self._work.get()
            if item is None:
                return
            with self._lock:
                att = self.attachments.get(item)
                if att is None:
                    continue
                self._apply_pod(att)
            try:
                veth = att.host_veth or nsread.host_veth(att.netns, att.ifname, self.veth_netns, att.candidates)
            except (OSError, ValueError) as e:
                self._error(f"pod {att.key}: node-side veth not found: {e}")
                continue
            if veth is None:
                self._error(f"pod {att.key}: no veth peer of {att.ifname} in netns {self.veth_netns or '(agent)'}")
                continue
            with self._lock:
                if self.attachments.get(item) is not att:
                    continue  # deleted or re-added meanwhile
                att = self.attachments[item] = replace(att, host_veth=veth)
                self._save(att)
            self._hook_start(att.key, veth)

    def _hook_start(self, key: ObjectKey, veth: str) -> None:
        for fn in self._starts:
            try:
                fn(key, veth)
            except Exception as e:  # an observer error never loses the pod's record
                self._error(f"pod {key}: start hook failed: {e}")

    def _hook_stop(self, key: ObjectKey) -> None:
        for fn in self._stops:
            try:
                fn(key)
            except Exception as e:
                self._error(f"pod {key}: stop hook failed: {e}")

    def _error(self, msg: str) -> None:
        self.errors = (self.errors + [msg])[-50:]
        log.error("cni: %s", msg)

    # -- recovery ------------------------------------------------------------------------------
    def recover(self) -> None:
        """Records of the previous agent whose netns still exists, then one scan of netns_dir."""
        for name in sorted(os.listdir(self.record_dir)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.record_dir, name)
            try:
                with open(path) as f:
                    raw = json.load(f)
                att = Attachment(**{**raw, "ips": tuple(raw["ips"]), "candidates": tuple(raw.get("candidates", ()))})
            except (OSError, ValueError, TypeError, KeyError) as e:
                self._error(f"record {path} unreadable, removed: {e}")
                os.unlink(path)
                continue
            if not os.path.exists(att.netns):
                log.info("cni record of a gone netns removed pod=%s netns=%s", att.key, att.netns)
                os.unlink(path)
                continue
            with self._lock:
                self.attachments[att.id] = att
            self._work.put(att.id)
        self._scanned = self._scan()
        log.info("cni recovery records=%d scanned_addresses=%d", len(self.attachments), len(self._scanned))

    def _scan(self) -> dict[str, str]:
        if not os.path.isdir(self.netns_dir):
            return {}
        try:
            node_veths = nsread.veths(self.veth_netns)
        except OSError as e:
            self._error(f"netns scan: {e}")
            return {}
        found: dict[str, str] = {}
        for name in sorted(os.listdir(self.netns_dir)):
            try:
                for _ifname, peer, ips in nsread.addresses(os.path.join(self.netns_dir, name)):
                    if peer in node_veths:
                        found.update((ip, node_veths[peer]) for ip in ips)
            except (OSError, ValueError) as e:
                log.debug("netns scan skipped netns=%s err=%s", name, e)
        return found

    def _match_loop(self) -> None:
        """Give API-source pods found in the scan their veth (and take it back when they go)."""
        seen = -1
        while not self._stop.wait(0.5):
            if self.state.identity_revision == seen:
                continue
            seen = self.state.identity_revision
            with self._lock:
                # a source that replaced the whole pod list (a manifest edit) took CNI pods out: put back
                for att in list(self.attachments.values()):
                    if att.key not in self.state.pods:
                        self._apply_pod(att)
                known = {a.key for a in self.attachments.values()}
                pods = dict(self.state.pods)
                for key in [k for k in self.recovered if k not in pods]:
                    del self.recovered[key]
                    self._hook_stop(key)
                for key, pod in pods.items():
                    veth = next((self._scanned[ip] for ip in pod.ips if ip in self._scanned), None)
                    if veth and key not in known and self.recovered.get(key) != veth:
                        self.recovered[key] = veth
                        self._hook_start(key, veth)
