#!/usr/bin/env bash
# `make image`: build deploy/Containerfile with Debian's buildah (chroot isolation: podman build fails
# on this machine's hybrid cgroups) on a Debian base made here with debootstrap, as no container
# registry is reachable. The host's CA bundle, pip config and apt validity settings are mounted into
# the build's RUN steps, so pip and apt inside go the way the host's do.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/nodewire:$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
BASE=localhost/nodewire-base:bookworm

mirror() {  # the Debian mirror this machine's apt uses (deb822 sources, else the one-line format)
  local m
  m=$(awk '/^URIs:/{u=$2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$m" ] || m=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  echo "${m:-http://deb.debian.org/debian}"
}

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  dir=$(mktemp -d /var/tmp/nodewire-base.XXXXXX)
  trap 'rm -rf "$dir" "$dir.tar"' EXIT
  echo "image: debootstrap --variant=minbase bookworm from $(mirror)"
  debootstrap --variant=minbase bookworm "$dir" "$(mirror)" >/dev/null
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -cf "$dir.tar" .
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$dir.tar" / >/dev/null
  buildah commit --rm "$ctr" "$BASE" >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy) ' > "$work/host-apt.conf" || true
volumes=(-v "$work/host-apt.conf:/etc/apt/apt.conf.d/99host:ro")
ca=$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().cafile or "")')
[ -n "$ca" ] && [ -f "$ca" ] && volumes+=(-v "$ca:/run/host-ca.crt:ro")  # not over the image's own bundle
for f in /etc/pip.conf /etc/xdg/pip; do [ -e "$f" ] && volumes+=(-v "$f:$f:ro"); done
buildah build --isolation chroot --layers -f deploy/Containerfile -t "$IMAGE" --build-arg BASE="$BASE" \
  "${volumes[@]}" .
echo "image: built $IMAGE ($(buildah images --format '{{.Size}}' "$IMAGE" | head -1))"
