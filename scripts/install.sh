#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine, run as root.
# Installs the apt packages BCC and the tests need, links the Debian kernel headers where BCC looks
# for them, mounts tracefs/bpffs, and builds the venv at .venv (with Debian's BCC visible).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-bpfcc bpfcc-tools linux-headers-amd64 bpftool
  iproute2 iputils-ping iptables nftables conntrack
  python3-venv python3-dev gcc make
  prometheus containernetworking-plugins
  libibverbs-dev openssl sockperf
)

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
# Debian's prometheus package starts a service on :9090; the tests run their own instance.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
pkill -x prometheus-node-exporter >/dev/null 2>&1 || true

# BCC looks for kernel headers under /lib/modules/$(uname -r); link the Debian 6.1 headers there.
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
# The agent, the test tools, and the development kit (sandbox, API server double, benchmarks, demo),
# which is a distribution of its own so the shipped agent never depends on it.
stamp=.venv/.installed-$(cat pyproject.toml devkit/pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]' -e ./devkit
  rm -f .venv/.installed-*; touch "$stamp"
fi
echo "install: ready"
