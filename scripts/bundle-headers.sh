#!/usr/bin/env bash
# The kernel headers nodewire brings: Debian's linux-headers (split into linux-headers-<v>-<flavour>
# with the generated files and linux-headers-<v>-common with the sources) merged into one tree that
# BCC can be pointed at with BCC_KERNEL_SOURCE (agent/datapath/headers.py: the bundled set, used when
# the node has no headers of its own). Only what BCC compiles against: include/ and arch/<arch>/include
# with their generated/ parts (~45 MB); hard links to the Debian files where the file system allows.
#   usage: bundle-headers.sh DEST [DIR holding the linux-headers-* dirs, default /usr/src]
# Used by scripts/install.sh (DEST = .venv/share/nodewire/kernel-headers) and deploy/Containerfile.
set -euo pipefail
DEST=$1
SRC=${2:-/usr/src}
case "$(dpkg --print-architecture)" in
  amd64) FLAVOUR=amd64 KARCH=x86 ;;
  arm64) FLAVOUR=arm64 KARCH=arm64 ;;
  *) echo "bundle-headers: no Debian kernel flavour known for $(dpkg --print-architecture)" >&2; exit 2 ;;
esac
H=$(ls -d "$SRC"/linux-headers-*-"$FLAVOUR" 2>/dev/null | sort -V | tail -1 || true)
[ -n "$H" ] || { echo "bundle-headers: no $SRC/linux-headers-*-$FLAVOUR (apt-get install linux-headers-$FLAVOUR)" >&2; exit 1; }
C=${H%-"$FLAVOUR"}-common
if [ "$(cat "$DEST/.from" 2>/dev/null || true)" = "$(basename "$H")" ] && [ -f "$DEST/include/linux/kconfig.h" ]; then
  exit 0  # already made from these headers
fi
link() { cp -al "$1" "$2" 2>/dev/null || { rm -rf "$2"; cp -a "$1" "$2"; }; }
tmp=$DEST.tmp.$$
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/arch/$KARCH"
link "$C/include" "$tmp/include"
link "$C/arch/$KARCH/include" "$tmp/arch/$KARCH/include"
link "$H/include/generated" "$tmp/include/generated"
link "$H/arch/$KARCH/include/generated" "$tmp/arch/$KARCH/include/generated"
basename "$H" > "$tmp/.from"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$tmp" "$DEST"
echo "bundle-headers: $DEST from $(basename "$H") ($(du -sh --apparent-size "$DEST" | cut -f1))"
