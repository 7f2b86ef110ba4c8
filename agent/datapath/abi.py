"""What the socket load balancer's C (bpf/lib/lb.h, bpf/sock_lb.c) and its Python share, defined once.

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
