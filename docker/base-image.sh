#!/usr/bin/env bash
# docker/base-image.sh: make a Python 3.11 base image from Debian packages, for a host that cannot pull
# python:3.11-slim (no registry reachable, an air-gapped cluster with a Debian mirror).
#
#   sudo docker/base-image.sh [NAME]          # default NAME: dtrain-base:bookworm
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE=dtrain-base:bookworm -t dtrain .
#
# debootstrap (--variant=minbase) installs Debian bookworm with python3 (3.11), python3-venv, python3-pip,
# iproute2 (tc), libcap2-bin (setcap) and ca-certificates into a temporary directory, which is then
# imported as an image (`docker import`). About 80 s and 200 MB. Needs root and debootstrap
# (apt-get install debootstrap), and a Debian mirror: DEBIAN_MIRROR (default http://deb.debian.org/debian).
#
#   DOCKER=docker     the docker command
#   REBUILD=1         make it again even when NAME exists (default: an existing NAME is kept: exit 0)
#
# Exit status: 0 the image exists; 1 it could not be made (one line on stderr says why).
set -euo pipefail

PROG=base-image.sh
NAME=${1:-dtrain-base:bookworm}
DOCKER=${DOCKER:-docker}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,python3-pip,iproute2,libcap2-bin,ca-certificates
die() { echo "$PROG: error: $*" >&2; exit 1; }

if [[ ${REBUILD:-0} != 1 ]] && "$DOCKER" image inspect "$NAME" >/dev/null 2>&1; then
  echo "$PROG: $NAME exists (REBUILD=1 makes it again)"
  exit 0
fi
[[ $(id -u) == 0 ]] || die "debootstrap needs root (run it with sudo)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dtrain-base.XXXXXX")
cleanup() {
  # a debootstrap stopped half-way may leave /proc and /sys mounted inside the tree
  for m in proc sys dev/pts dev; do
    if mountpoint -q "$WORK/root/$m" 2>/dev/null; then umount -l "$WORK/root/$m" || true; fi
  done
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "$PROG: debootstrap $SUITE ($PACKAGES) from $MIRROR"
START=$SECONDS
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$WORK/root" "$MIRROR" >"$WORK/log" 2>&1; then
  tail -n 20 "$WORK/log" >&2
  die "debootstrap failed (log above); is $MIRROR reachable? (DEBIAN_MIRROR=...)"
fi
# what an image does not need: the package caches and lists, documentation
rm -rf "$WORK/root/var/cache/apt/archives/"*.deb "$WORK/root/var/lib/apt/lists/"* \
  "$WORK/root/usr/share/doc/"* "$WORK/root/usr/share/man/"* "$WORK/root/var/log/"*
# the mirror debootstrap used, so that apt-get works in the image as it did here
echo "deb $MIRROR $SUITE main" >"$WORK/root/etc/apt/sources.list"
python=$("$WORK/root/usr/bin/python3" --version 2>/dev/null || chroot "$WORK/root" python3 --version)
tar -C "$WORK/root" --numeric-owner -c . | "$DOCKER" import \
  -c 'ENV LANG=C.UTF-8' \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["python3"]' \
  -m "debootstrap --variant=minbase $SUITE: $PACKAGES" - "$NAME" >/dev/null
echo "$PROG: $NAME made in $((SECONDS - START)) s ($python)"
