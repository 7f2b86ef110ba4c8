"""The node's devices and addresses, followed live over netlink.

A netlink socket bound to the kernel's link, address and route groups (RTMGRP_*; the same events
`ip monitor` prints) is read on its own thread, which sleeps in select() while nothing changes: no
polling. An event that can change the selection (an address of global scope anywhere, a default
route, a link we hold or name) starts a short settle window that gathers the rest of the burst (an
address add brings its local and prefix routes along), then one re-read (devices.read_node_devices);
only a real difference reaches on_change(old, new), on this thread. A lost event (the socket's
buffer overran: ENOBUFS) is treated as "anything may have changed": re-read.

follow_devices() then puts the tc programs on what appeared and forgets what left (kube-proxy's
--nodeport-addresses follow the node's addresses the same way, re-read on every sync).
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Callable

from .devices import AUTO, RT_SCOPE_UNIVERSE, RT_TABLE_MAIN, NodeDevices, read_node_devices

log = logging.getLogger("nodewire.addresses")

SETTLE_SECONDS = 0.05  # gather one burst of events (address + its routes) into one re-read
SETTLE_MAX_SECONDS = 0.3  # ... but never wait longer than this for a burst to end

# include/uapi/linux/rtnetlink.h: multicast groups (bit masks for the legacy bind())
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE


class DeviceWatcher:
    """Follows what `spec` ("auto" or device names) selects; `current` is the last snapshot read."""

    def __init__(self, spec: tuple[str, ...], current: NodeDevices,
                 on_change: Callable[[NodeDevices, NodeDevices], None]):
        self.spec = tuple(spec)
        self.current = current
        self.on_change = on_change
        self.events = 0    # netlink messages seen
        self.rereads = 0   # snapshots read because a message could matter
        self.changes = 0   # snapshots that differed from the one before
        self.last_change: float | None = None  # wall clock of the last difference
        self.errors = 0
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._events_sock = self._query = None

    def start(self) -> "DeviceWatcher":
        from pyroute2 import IPRoute

        self._events_sock = IPRoute()
        self._events_sock.bind(groups=GROUPS)
        self._query = IPRoute()  # dumps go on their own socket, never interleaved with the events
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="device-watcher", daemon=True)
        self._thread.start()
        return self

    # -- the thread (the only user of both sockets) -------------------------------------------------
    def _run(self) -> None:
        self._reread()  # a change between the caller's first read and bind() would be missed otherwise
        socks = [self._events_sock, self._wake_r]
        while True:
            ready, _, _ = select.select(socks, [], [])
            if self._wake_r in ready:
                return
            relevant = self._drain()
            end = time.monotonic() + SETTLE_MAX_SECONDS
            while (left := end - time.monotonic()) > 0:
                ready, _, _ = select.select(socks, [], [], min(SETTLE_SECONDS, left))
                if not ready:
                    break
                if self._wake_r in ready:
                    return
                relevant |= self._drain()
            if relevant:
                self._reread()

    def _drain(self) -> bool:
        """Read what the socket holds; whether any of it could change the selection."""
        try:
            msgs = self._events_sock.get()
        except Exception as e:  # ENOBUFS (events lost) or a message pyroute2 cannot parse: re-read
            log.debug("netlink events unreadable, re-reading err=%s", e)
            return True
        self.events += len(msgs)
        return any(self._relevant(m) for m in msgs)

    def _relevant(self, m) -> bool:
        event = m.get("event", "")
        held = {idx for _, idx in self.current.devices}
        if event in ("RTM_NEWADDR", "RTM_DELADDR"):
            return m["index"] in held or (self.spec == AUTO and m["scope"] == RT_SCOPE_UNIVERSE)
        if event in ("RTM_NEWLINK", "RTM_DELLINK"):
            return m["index"] in held or (self.spec != AUTO and m.get_attr("IFLA_IFNAME") in self.spec)
        if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):  # only default routes select devices (auto)
            table = m.get_attr("RTA_TABLE") or m["table"]
            return self.spec == AUTO and m["dst_len"] == 0 and table == RT_TABLE_MAIN
        return False

    def _reread(self) -> None:
        self.rereads += 1
        try:
            now = read_node_devices(self._query, self.spec)
        except Exception as e:  # never ends the thread: the next event re-reads
            self.errors += 1
            log.error("cannot read the node's devices err=%s", e)
            return
        old = self.current
        if now == old:
            return
        self.current = now
        self.changes += 1
        self.last_change = time.time()
        try:
            self.on_change(old, now)
        except Exception:
            self.errors += 1
            log.exception("following the node's devices failed")

    # -- readers ----------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"events": self.events, "rereads": self.rereads, "changes": self.changes,
                "last_change": self.last_change, "errors": self.errors}

    def close(self) -> None:
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(5)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        for s in (self._events_sock, self._query):
            if s is not None:
                s.close()
        self._events_sock = self._query = None


def follow_devices(datapath, new: NodeDevices) -> tuple[list[str], list[str]]:
    """Attach the tc programs to the devices that appeared (or came back with a new ifindex); forget
    the ones that left, taking our filters off one that still exists but is no longer selected.
    datapath: NodePortDatapath (its attach() and `devices`). Returns (attached, forgotten)."""
    from .nodeport import detach

    want = dict(new.devices)
    gone = [n for n, idx in datapath.devices.items() if want.get(n) != idx]
    for name in gone:
        del datapath.devices[name]
    if unselected := [n for n in gone if n not in want]:
        detach(unselected)  # a device that was deleted has no filters left: detach skips it
    added = [n for n in want if n not in datapath.devices]
    attached = []
    for name in added:
        try:
            datapath.attach([name])
            attached.append(name)
        except Exception as e:  # gone again already (LookupError, NetlinkError): the next event re-reads
            log.error("cannot attach to device=%s err=%s", name, e)
    return attached, gone

