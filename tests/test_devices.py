"""Which devices `--devices` selects and the node addresses on them (agent/datapath/devices.py), read
over netlink from a network namespace the test makes (pyroute2 NetNS); no packet is sent."""
from __future__ import annotations

import secrets
import subprocess

import pytest

from agent.datapath.devices import AUTO, read_node_devices

pytestmark = pytest.mark.root


@pytest.fixture
def netns():
    name = f"nwdev{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


def read(netns: str, spec, strict: bool = False):
    from pyroute2 import NetNS

    with NetNS(netns) as ipr:
        return read_node_devices(ipr, spec, strict)


def test_auto_takes_global_addresses_and_default_routes_but_not_pod_plumbing(netns):
    ip(netns, "link", "set", "lo", "up")
    ip(netns, "link", "add", "vx0", "type", "vxlan", "id", "7", "dstport", "4789", "remote", "192.0.2.1")
    ip(netns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ip(netns, "link", "add", "br0", "type", "bridge")
    for dev, cidr in (("vx0", "192.0.2.10/24"), ("v0", "198.51.100.10/24"), ("br0", "203.0.113.1/24")):
        ip(netns, "addr", "add", cidr, "dev", dev)
        ip(netns, "link", "set", dev, "up")
    ip(netns, "addr", "add", "2001:db8::10/64", "dev", "vx0", "nodad")
    got = read(netns, AUTO)  # lo (host scope), the veth and the bridge (pod plumbing) are left out
    assert got.names == ["vx0"] and got.addresses == ("192.0.2.10", "2001:db8::10"), got
    ip(netns, "route", "add", "default", "via", "198.51.100.1", "dev", "v0")
    got = read(netns, AUTO)  # the default route's device is the uplink, whatever its kind
    assert got.names == ["v0", "vx0"] and got.addresses == ("198.51.100.10", "192.0.2.10", "2001:db8::10"), got


def test_named_devices_keep_their_order_and_a_missing_one_is_an_error_only_when_strict(netns):
    ip(netns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ip(netns, "addr", "add", "198.51.100.10/24", "dev", "v0")
    ip(netns, "addr", "add", "198.51.100.11/24", "dev", "v1")
    got = read(netns, ("v1", "v0"))
    assert got.names == ["v1", "v0"] and got.addresses == ("198.51.100.11", "198.51.100.10"), got
    assert read(netns, ("v0", "eth9")).names == ["v0"]  # after start: left out until it appears
    with pytest.raises(LookupError, match="no interface 'eth9'"):
        read(netns, ("v0", "eth9"), strict=True)
