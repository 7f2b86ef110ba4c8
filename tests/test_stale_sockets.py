"""Which reverse-NAT entries the socket sweep treats as stale (no root: maps are dict doubles with the
layouts of bpf/lib/lb.h; the real sweep is exercised by tests/conformance)."""
from __future__ import annotations

import socket

import numpy as np

from agent.datapath.maps import addr16, pack_rows, port_be, unpack_rows
from agent.datapath.stale_sockets import StaleSockets
from nodewire_dev.mapsdouble import BACKEND_KEY as BE_KEY, BACKEND_VALUE as BE_VAL
from nodewire_dev.mapsdouble import SERVICE_KEY as SVC_KEY, SERVICE_VALUE as SVC_VAL

# struct lb_revnat_key / lb_revnat_value of bpf/lib/lb.h (the agent reads the loader's recorded layout)
RN_KEY = np.dtype([("cookie", "<u8"), ("address", "V16"), ("port", "<u2"), ("pad", "<u2"), ("pad2", "<u4")])
RN_VAL = np.dtype([("address", "V16"), ("port", "<u2"), ("pad", "<u2"), ("pad2", "<u4")])


class DictMap:
    def __init__(self, key_dtype, value_dtype):
        self.key_dtype, self.value_dtype = key_dtype, value_dtype
        self.key_size, self.value_size = key_dtype.itemsize, value_dtype.itemsize
        self.d: dict[bytes, bytes] = {}

    def put(self, key: tuple, value: tuple) -> None:
        self.d[pack_rows(self.key_dtype, [key])[0]] = pack_rows(self.value_dtype, [value])[0]

    def lookup(self, key: bytes):
        return self.d.get(key)

    def dump_arrays(self):
        return unpack_rows(self.key_dtype, list(self.d)), unpack_rows(self.value_dtype, list(self.d.values()))

    def delete(self, keys):
        for k in keys:
            self.d.pop(k, None)


def frontend(services, backends, vip, port, proto, backend_ips):
    services.put((addr16(vip), port_be(port), proto, 0, 0), (0, len(backend_ips), 0, 1, 0))
    for slot, ip in enumerate(backend_ips, 1):
        bid = abs(hash(ip)) % 100000 + 1
        backends.put((bid,), (addr16(ip), port_be(8080), proto))
        services.put((addr16(vip), port_be(port), proto, 0, slot), (bid, 0, 0, 0, 0))


def revnat_entry(revnat, cookie, backend_ip, vip, port):
    revnat.put((cookie, addr16(backend_ip), port_be(8080)), (addr16(vip), port_be(port)))


def make():
    services, backends, revnat = DictMap(SVC_KEY, SVC_VAL), DictMap(BE_KEY, BE_VAL), DictMap(RN_KEY, RN_VAL)
    return services, backends, revnat, StaleSockets("/nonexistent", services, backends, revnat, set)


def cookies(stale: dict) -> set[int]:
    return {int(unpack_rows(RN_KEY, [k])[0]["cookie"]) for k in stale}


def test_only_entries_whose_backend_left_their_frontend_are_stale():
    services, backends, revnat, sweep = make()
    frontend(services, backends, "10.96.0.10", 53, socket.IPPROTO_UDP, ["10.244.0.2"])
    revnat_entry(revnat, 1, "10.244.0.2", "10.96.0.10", 53)   # still behind its VIP
    revnat_entry(revnat, 2, "10.244.0.3", "10.96.0.10", 53)   # left the Service
    revnat_entry(revnat, 3, "10.244.0.2", "10.96.0.99", 53)   # its Service was deleted
    assert cookies(sweep._stale_keys({})) == {2, 3}


def test_a_backend_still_behind_the_other_protocol_of_the_port_is_not_stale():
    services, backends, revnat, sweep = make()
    frontend(services, backends, "10.96.0.11", 53, socket.IPPROTO_TCP, ["10.244.0.4"])
    frontend(services, backends, "10.96.0.11", 53, socket.IPPROTO_UDP, ["10.244.0.5"])
    revnat_entry(revnat, 4, "10.244.0.4", "10.96.0.11", 53)
    assert sweep._stale_keys({}) == {}


def test_kept_entries_are_skipped_until_they_stop_being_stale():
    services, backends, revnat, sweep = make()
    frontend(services, backends, "10.96.0.12", 80, socket.IPPROTO_TCP, ["10.244.0.6"])
    revnat_entry(revnat, 5, "10.244.0.7", "10.96.0.12", 80)
    [key] = sweep._stale_keys({})
    sweep._kept.add(key)  # as the sweep does for TCP to an endpoint that still exists
    assert sweep._stale_keys({}) == {}
    frontend(services, backends, "10.96.0.12", 80, socket.IPPROTO_TCP, ["10.244.0.6", "10.244.0.7"])
    assert sweep._stale_keys({}) == {} and not sweep._kept  # back behind the VIP: forgotten


def test_an_empty_reverse_nat_map_means_no_sweep():
    *_, sweep = make()
    assert sweep.sweep().namespaces == 0
