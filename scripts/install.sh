#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine, run as root.
# Installs the apt packages BCC and the tests need, links the Debian kernel headers where BCC looks
# for them, mounts tracefs/bpffs, and builds the venv at .venv (with Debian's BCC visible).
set -euo pipefail
cd "$(dirname "$0")/.."

# What to install: `agent` (run the agent), `demo` (+ the development kit's sandbox demo),
# `test` (+ the tools only the tests and benchmarks use), `image` (only what `make image` needs),
# `all` (the default: demo + test). This script only installs: it never stops a service or a process
# (the tests start their own Prometheus on a free loopback port, beside any the machine runs).
PROFILE=${1:-all}
AGENT_APT=(python3-bpfcc bpfcc-tools linux-headers-amd64 bpftool iproute2 util-linux python3-venv python3-dev gcc libc6-dev make)
DEMO_APT=()          # the demo needs nothing beyond the agent's packages (sandbox: iproute2, netns, cgroups)
TEST_APT=(           # tests and benchmarks only
  iputils-ping       # pings in the datapath/observer/CNI tests
  iptables nftables conntrack   # kube-proxy rule layouts (bench compare, tests/test_bench_rules.py)
  prometheus         # a real Prometheus checks the dashboards' queries (started by the tests on a free port)
  containernetworking-plugins   # Debian's bridge/host-local/portmap: the CNI chain test
  containerd runc    # a real container runtime drives the CNI chain over CRI (tests/test_containerd.py)
  libibverbs-dev     # the mock verbs stack (devkit/nodewire_dev/mockverbs) is built against the real header
  openssl            # TLS certificates of the API server double
  sockperf           # bench observe
  ruby               # `ruby -c Vagrantfile`
  hping3             # spoofed SYN floods inside the sandbox (tests/conformance/test_conntrack_flood.py, bench flood)
)
IMAGE_APT=(buildah debootstrap)  # make image
case "$PROFILE" in
  agent) APT_PACKAGES=("${AGENT_APT[@]}") ;;
  demo)  APT_PACKAGES=("${AGENT_APT[@]}" "${DEMO_APT[@]}") ;;
  test)  APT_PACKAGES=("${AGENT_APT[@]}" "${TEST_APT[@]}") ;;
  image) APT_PACKAGES=("${IMAGE_APT[@]}") ;;
  all)   APT_PACKAGES=("${AGENT_APT[@]}" "${DEMO_APT[@]}" "${TEST_APT[@]}") ;;
  *) echo "install: unknown profile $PROFILE (agent, demo, test, image, all)" >&2; exit 2 ;;
esac

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install: apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "$PROFILE" = image ]; then echo "install: ready (image)"; exit 0; fi

# BCC looks for kernel headers under /lib/modules/$(uname -r); link the Debian 6.1 headers there, so
# this machine is a node that has headers (tests that compile in-process use them). The agent itself
# does not need the link: it falls back to the bundled set made below (agent/datapath/headers.py).
K=$(uname -r)
if [ ! -e "/lib/modules/$K/build/include" ]; then
  H=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1)
  C=${H%-amd64}-common
  mkdir -p "/lib/modules/$K"
  ln -sfn "$H" "/lib/modules/$K/build"
  ln -sfn "$C" "/lib/modules/$K/source"
fi

mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# The venv sees Debian's BCC (python3-bpfcc) through --system-site-packages.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# The kernel headers the agent brings (for nodes without their own): Debian's, merged into one tree.
bash scripts/bundle-headers.sh .venv/share/nodewire/kernel-headers
# The agent, the test tools, and the development kit (sandbox, API server double, benchmarks, demo),
# which is a distribution of its own so the shipped agent never depends on it.
# (`agent`: the agent alone.)
if [ "$PROFILE" = agent ]; then PIP_TARGETS=(-e .); else PIP_TARGETS=(-e '.[test]' -e ./devkit); fi
stamp=.venv/.installed-$( (cat pyproject.toml devkit/pyproject.toml; echo "${PIP_TARGETS[*]}") | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q "${PIP_TARGETS[@]}"
  rm -f .venv/.installed-*; touch "$stamp"
fi
# nodewire-cni: one static executable (gcc -static against libc6-dev's libc.a), rebuilt when its C changed;
# .venv/bin/nodewire-cni (pip's wrapper that runs it) becomes a link to it, so it starts no interpreter.
CNI_BIN=$(.venv/bin/python -m agent.cni.build)
ln -sfn "$CNI_BIN" .venv/bin/nodewire-cni
echo "install: ready"
