#!/usr/bin/env bash
# Builds the local Debian bookworm base image for the CPU variant of the sdserve
# image without any image registry: `debootstrap --variant=minbase` into a
# temporary folder, then `docker import`. The NVIDIA (CUDA) variant uses an
# nvidia/cuda runtime image instead, pulled from a registry (see deploy/README.md).
#
#   deploy/build-base-image.sh                    # builds sdserve-base:bookworm unless it exists
#   deploy/build-base-image.sh --tag my/base:1 --force
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian),
# DEBIAN_SECURITY_MIRROR (default http://deb.debian.org/debian-security).
# Needs root (or sudo) for debootstrap; installs debootstrap with apt-get if missing.
set -euo pipefail

tag=sdserve-base:bookworm
force=0
while (($#)); do
  case "$1" in
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --tag=*) tag=${1#--tag=}; shift ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if ! docker info >/dev/null 2>&1; then
  echo "error: no Docker engine answers (docker info failed)" >&2
  exit 1
fi
if ((force == 0)) && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag exists; skipping (--force rebuilds it)"
  exit 0
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v debootstrap >/dev/null && ! [ -x /usr/sbin/debootstrap ]; then
  echo "installing debootstrap"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/sdserve-rootfs.XXXXXX")
cleanup() { as_root rm -rf --one-file-system "$root"; }
trap cleanup EXIT

start=$SECONDS
echo "debootstrap --variant=minbase bookworm from $mirror (a few minutes)"
as_root env PATH="/usr/sbin:/sbin:$PATH" debootstrap --variant=minbase bookworm "$root" "$mirror" \
  >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# Security and point-release updates for the image's own `apt-get install`;
# then drop what only the build needed: downloaded packages, package lists, logs.
as_root tee "$root/etc/apt/sources.list" >/dev/null <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
as_root sh -c "rm -rf '$root'/var/cache/apt/archives/*.deb '$root'/var/cache/apt/*.bin '$root'/var/lib/apt/lists/* \
  '$root'/var/log/*.log '$root'/var/log/apt/* '$root'/tmp/* '$root'/root/.cache"

as_root tar --numeric-owner --xattrs -C "$root" -c . |
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase bookworm ($mirror)" \
    - "$tag" >/dev/null
echo "built $tag in $((SECONDS - start)) s: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
