"""RDMA and GPU↔NIC observability.

topology.py   PCIe tree from sysfs → GPU↔NIC classes (PIX/PXB/PHB/NODE/SYS), DRA attributes (pure)
counters.py   per-port sysfs counters and hw_counters as OTel observable counters
layout.py     libibverbs struct offsets, from compiling against the real <infiniband/verbs.h>
elf.py        ELF load segments and build-id (file offset → uprobe address; provider identity)
verbs.py      the verbs latency tracer (bpf/rdma.c): ibv_open_device → ops table → provider uprobes
optin.py      pods annotated nodewire.io/rdma-trace=true → their kubelet cgroups (the tracer filter)
service.py    what the agent starts: metrics always, the tracer with per-pod opt-in and pod identity
metrics.py    one call that registers all of the above on the agent's telemetry
bench.py      tracing cost on the mock verbs stack (`nodewire bench rdma`)
mockverbs/    the verbs test double: mock libibverbs, stripped provider, scripted driver (C)
cli.py        `nodewire topo`, `nodewire rdma`, `nodewire bench rdma`
"""
