"""What the load balancers' C (bpf/lib/lb.h, bpf/sock_lb.c, bpf/nodeport.c) and their Python share, defined once.

Numbers are defined here and reach the C as -D defines (lb_defines()); the C has no defaults of its
own and stops compiling (#error) when one is missing. Map names are C identifiers, which BCC does not
accept through a macro ("cannot use map function inside a macro"), so they are declared in C and
named here once; the loader checks that the compiled program really has every map a spec names.
Struct layouts are never repeated: they come from the C through BCC's ctypes (see maps.py).
"""
from __future__ import annotations

import errno
import socket

# maps of bpf/lib/lb.h
SERVICES_MAP = "nodewire_services_v1"
BACKENDS_MAP = "nodewire_backends_v1"
REVNAT_MAP = "nodewire_revnat_v1"
LB_STATS_MAP = "nodewire_lb_stats_v1"
AFFINITY_MAP = "nodewire_affinity_v1"
LB_MAPS = (SERVICES_MAP, BACKENDS_MAP, REVNAT_MAP, LB_STATS_MAP, AFFINITY_MAP)

# lb_service_value.flags (slot 0)
SVC_F_AFFINITY = 1  # sessionAffinity: ClientIP

# lb_stats_key.outcome: what a connect to a Service address came to
LB_OUTCOMES = {0: "forwarded", 1: "no_backend", 2: "bad_slot"}
LB_FORWARDED, LB_NO_BACKEND, LB_BAD_SLOT = 0, 1, 2

# lb_service_key.proto / lb_backend.proto: the socket's IP protocol number
PROTO_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}


# maps of bpf/nodeport.c (north-south: NodePort, externalIPs, LoadBalancer IPs on the node's devices)
NP_SERVICES_MAP = "nodewire_np_services_v1"
NP_BACKENDS_MAP = "nodewire_np_backends_v1"
NP_POLICY_MAP = "nodewire_np_policy_v1"
NP_LOCAL_MAP = "nodewire_np_local_v1"
NP_RANGES_MAP = "nodewire_np_ranges_v1"
NP_AFFINITY_MAP = "nodewire_np_affinity_v1"
NP_SNAT_MAP = "nodewire_np_snat_v2"  # the node's SNAT addresses, NW_SNAT_ADDRS slots per family (lib/ct.h)
NP_STATS_MAP = "nodewire_np_stats_v2"
NP_MAGLEV_MAP = "nodewire_np_maglev_v1"
CT_MAP = "nodewire_ct_v2"                    # conntrack of confirmed flows (lib/ct.h)
CT_HALFOPEN_MAP = "nodewire_ct_halfopen_v2"  # flows not yet confirmed both ways (a flood lands here)
CT_STATS_MAP = "nodewire_ct_stats_v2"
NP_OBSOLETE_MAPS = ("nodewire_ct_v1", "nodewire_np_snat_v1",  # replaced by the v2 layouts: unpinned at start
                    "nodewire_np_stats_v1")
NP_MAPS = (NP_SERVICES_MAP, NP_BACKENDS_MAP, NP_POLICY_MAP, NP_LOCAL_MAP, NP_RANGES_MAP, NP_AFFINITY_MAP,
           NP_SNAT_MAP, NP_STATS_MAP, NP_MAGLEV_MAP, CT_MAP, CT_HALFOPEN_MAP, CT_STATS_MAP)

# np_policy.flags
NP_F_DROP_EMPTY = 1     # eTP=Local with endpoints only elsewhere: drop (kube-proxy's KUBE-MARK-DROP)
NP_F_SOURCE_RANGES = 2  # only sources in nodewire_np_ranges_v1 for this group (loadBalancerSourceRanges)
NP_F_MAGLEV = 4         # the group has a Maglev table in nodewire_np_maglev_v1

# nodewire_np_stats_v2's index: what a packet on a node device came to (C name -> exported name). The map
# has NP_STATS_SLOTS slots, more than there are outcomes, so a new outcome fits the pinned map an
# upgraded agent adopts (v1 had exactly 8: a pinned v1 map is reused as it is, and a 9th never counted).
NP_OUTCOMES = {"NW_NP_LOCAL": "local", "NW_NP_REMOTE": "remote", "NW_NP_REPLY": "reply",
               "NW_NP_ESTABLISHED": "established", "NW_NP_REJECT": "reject",
               "NW_NP_DROP_NO_LOCAL": "drop_no_local", "NW_NP_DROP_SOURCE": "drop_source_range",
               "NW_NP_DROP_ERROR": "drop_error",
               # ICMP errors, path MTU, fragments (bpf/lib/icmp.h, frag.h; issue 18 items 4-6)
               "NW_NP_ICMP_TRANSLATED": "icmp_translated",  # an ICMP error of a flow rewritten for its receiver
               "NW_NP_PMTU_REPLY": "pmtu_reply",   # frag-needed / packet-too-big for a packet too big for its route
               "NW_NP_FRAGMENT": "fragment",       # a TCP/UDP fragment given its datagram's ports (lib/frag.h)
               "NW_NP_UNTRANSLATABLE": "untranslatable"}  # not translatable safely: left to the stack
NP_OUTCOME_NAMES = tuple(NP_OUTCOMES.values())  # index = the C number
NP_STATS_SLOTS = 32
assert len(NP_OUTCOMES) <= NP_STATS_SLOTS, "nodewire_np_stats_v2 is full: a new map version is due"

NP_POLICY_MAX = 65536   # frontends with a policy row, and source-range prefixes
NP_GROUPS_MAX = 16384   # Service ports × families with external frontends (Maglev tables)


def lb_defines(sizes) -> list[str]:
    """-D flags for bpf/sock_lb.c: the shared numbers above and the map capacities (MapSizes)."""
    values = {
        "NW_SVC_F_AFFINITY": SVC_F_AFFINITY,
        "NW_LB_FORWARDED": LB_FORWARDED, "NW_LB_NO_BACKEND": LB_NO_BACKEND, "NW_LB_BAD_SLOT": LB_BAD_SLOT,
        "NW_ECONNREFUSED": errno.ECONNREFUSED,  # a Service without endpoints refuses, as kube-proxy's REJECT
        "NW_SERVICES_MAX": sizes.services, "NW_BACKENDS_MAX": sizes.backends, "NW_REVNAT_MAX": sizes.revnat,
        "NW_STATS_MAX": sizes.lb_stats, "NW_AFFINITY_MAX": sizes.affinity,
    }
    return [f"-D{k}={v}" for k, v in values.items()]


def np_defines(sizes, maglev_size: int) -> list[str]:
    """-D flags for bpf/nodeport.c: lb_defines() plus the north-south flags, outcomes and sizes; the
    Maglev table size (NW_MAGLEV_M) is config (--maglev-table-size, default model.maglev.DEFAULT_TABLE_SIZE)."""
    values = {
        "NP_F_DROP_EMPTY": NP_F_DROP_EMPTY, "NP_F_SOURCE_RANGES": NP_F_SOURCE_RANGES, "NP_F_MAGLEV": NP_F_MAGLEV,
        **{c: i for i, c in enumerate(NP_OUTCOMES)}, "NW_NP_OUTCOMES": len(NP_OUTCOMES),
        "NW_NP_STATS_SLOTS": NP_STATS_SLOTS,
        "NW_NP_POLICY_MAX": NP_POLICY_MAX, "NW_NP_GROUPS_MAX": NP_GROUPS_MAX, "NW_MAGLEV_M": maglev_size,
    }
    return lb_defines(sizes) + [f"-D{k}={v}" for k, v in values.items()]


# -- north-south conntrack (bpf/lib/ct.h) ---------------------------------------------------------
CT_FORWARD, CT_REVERSE = 0, 1              # ct_key.dir

# ct_entry.state: netfilter's TCP states (nf_conntrack_proto_tcp.c) as far as lifetimes differ
CT_S_SYN, CT_S_ESTABLISHED, CT_S_CLOSING, CT_S_CLOSED = 1, 2, 3, 4
CT_STATES = {CT_S_SYN: "syn", CT_S_ESTABLISHED: "established", CT_S_CLOSING: "closing", CT_S_CLOSED: "closed"}
# ct_entry.flags
CT_F_SNAT, CT_F_REPLIED, CT_F_SYN, CT_F_FIN_ORIG, CT_F_FIN_REPLY = 1, 2, 4, 8, 16

# nodewire_ct_stats_v2 indices: the datapath's, then the collector's (added into CPU 0's slots)
CT_STATS = ("halfopen_inserted", "halfopen_deleted", "promoted", "snat_exhausted", "snat_reused",
            "collections", "collected_halfopen", "collected", "collect_ns")

# SNAT source ports: above Linux's default ip_local_port_range (32768-60999,
# Documentation/networking/ip-sysctl.rst), so node sockets' ephemeral ports never meet them.
SNAT_PORT_MIN, SNAT_PORT_MAX = 61000, 65535
SNAT_ADDRS = 4    # node addresses per family a remote-backend flow may leave with (slots of NP_SNAT_MAP)
SNAT_TRIES = 32   # ports tried per address before the next one (then: exhaustion, counted)
CT_TOUCH_NS = 1_000_000_000      # an entry's last-seen time is rewritten at most once a second
CT_SYN_REUSE_NS = 1_000_000_000  # a half-open flow idle this long gives its SNAT port to a new flow


def ct_defines(sizes, lifetimes) -> list[str]:
    """-D flags for bpf/lib/ct.h: map capacities (MapSizes.ct / ct_halfopen) and the lifetimes per
    state in seconds (conntrack.Lifetimes)."""
    ns = lambda s: int(s * 1_000_000_000)  # noqa: E731
    values = {
        "NW_CT_MAX": sizes.ct, "NW_CT_HALFOPEN_MAX": sizes.ct_halfopen,
        "NW_CT_LIFETIME_SYN_NS": ns(lifetimes.syn), "NW_CT_LIFETIME_ESTABLISHED_NS": ns(lifetimes.established),
        "NW_CT_LIFETIME_CLOSE_NS": ns(lifetimes.close), "NW_CT_LIFETIME_OTHER_NS": ns(lifetimes.other),
        "NW_CT_TOUCH_NS": CT_TOUCH_NS, "NW_CT_SYN_REUSE_NS": CT_SYN_REUSE_NS,
        "NW_SNAT_PORT_MIN": SNAT_PORT_MIN, "NW_SNAT_PORT_MAX": SNAT_PORT_MAX, "NW_SNAT_ADDRS": SNAT_ADDRS,
        "NW_SNAT_TRIES": SNAT_TRIES,
        "NW_CT_S_SYN": CT_S_SYN, "NW_CT_S_ESTABLISHED": CT_S_ESTABLISHED, "NW_CT_S_CLOSING": CT_S_CLOSING,
        "NW_CT_S_CLOSED": CT_S_CLOSED,
        "NW_CT_F_SNAT": CT_F_SNAT, "NW_CT_F_REPLIED": CT_F_REPLIED, "NW_CT_F_SYN": CT_F_SYN,
        "NW_CT_F_FIN_ORIG": CT_F_FIN_ORIG, "NW_CT_F_FIN_REPLY": CT_F_FIN_REPLY,
        "NW_CT_STATS": len(CT_STATS),
        **{f"NW_CT_STAT_{name.upper()}": i for i, name in enumerate(CT_STATS)},
    }
    return [f"-D{k}={v}" for k, v in values.items()]
