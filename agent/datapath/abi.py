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
NP_SNAT_MAP = "nodewire_np_snat_v1"
NP_STATS_MAP = "nodewire_np_stats_v1"
NP_MAGLEV_MAP = "nodewire_np_maglev_v1"
CT_MAP = "nodewire_ct_v1"
NP_MAPS = (NP_SERVICES_MAP, NP_BACKENDS_MAP, NP_POLICY_MAP, NP_LOCAL_MAP, NP_RANGES_MAP, NP_AFFINITY_MAP,
           NP_SNAT_MAP, NP_STATS_MAP, NP_MAGLEV_MAP, CT_MAP)

# np_policy.flags
NP_F_DROP_EMPTY = 1     # eTP=Local with endpoints only elsewhere: drop (kube-proxy's KUBE-MARK-DROP)
NP_F_SOURCE_RANGES = 2  # only sources in nodewire_np_ranges_v1 for this group (loadBalancerSourceRanges)
NP_F_MAGLEV = 4         # the group has a Maglev table in nodewire_np_maglev_v1

# nodewire_np_stats_v1's index: what a packet on a node device came to (C name -> exported name)
NP_OUTCOMES = {"NW_NP_LOCAL": "local", "NW_NP_REMOTE": "remote", "NW_NP_REPLY": "reply",
               "NW_NP_ESTABLISHED": "established", "NW_NP_REJECT": "reject",
               "NW_NP_DROP_NO_LOCAL": "drop_no_local", "NW_NP_DROP_SOURCE": "drop_source_range",
               "NW_NP_DROP_ERROR": "drop_error"}
NP_OUTCOME_NAMES = tuple(NP_OUTCOMES.values())  # index = the C number

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
        "NW_NP_POLICY_MAX": NP_POLICY_MAX, "NW_NP_GROUPS_MAX": NP_GROUPS_MAX, "NW_MAGLEV_M": maglev_size,
    }
    return lb_defines(sizes) + [f"-D{k}={v}" for k, v in values.items()]
