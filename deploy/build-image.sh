#!/usr/bin/env bash
# Builds the sdserve image (deploy/Dockerfile) from a binary built beforehand.
#
#   deploy/build-image.sh --binary target/release/sdserve --variant cpu --tag sdserve:cpu
#   deploy/build-image.sh --binary target/cuda12/release/sdserve --variant cuda --tag sdserve:cuda
#
#   --binary PATH   the sdserve executable (required): `cargo build --release` for cpu,
#                   deploy/build-cuda.sh for cuda (deploy/README.md)
#   --variant V     cpu: base sdserve-base:bookworm, built by deploy/build-base-image.sh
#                   when missing; cuda (default): base nvidia/cuda:12.9.1-runtime-ubuntu22.04
#   --tag TAG       image tag (default sdserve:VARIANT)
#   --base IMAGE    another base image (must match the binary: glibc, CUDA version)
#   --model DIR     bake a diffusers folder into /opt/ml/model (symlinks followed);
#                   default: none, the model comes from SageMaker's model.tar.gz or
#                   a volume mounted at /opt/ml/model
#
# Extra arguments after `--` go to `docker build` (e.g. -- --label x=y --no-cache).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

binary='' variant=cuda tag='' base='' model=''
while (($#)); do
  case "$1" in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --variant) variant=${2:?--variant needs cpu or cuda}; shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --base) base=${2:?--base needs an image}; shift 2 ;;
    --model) model=${2:?--model needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "error: $*" >&2; exit 2; }
[ -n "$binary" ] || die "--binary is required (e.g. target/release/sdserve)"
if ! [ -f "$binary" ] || ! [ -x "$binary" ]; then die "--binary $binary: not an executable file"; fi
case "$variant" in
  cpu) device=cpu; base=${base:-sdserve-base:bookworm} ;;
  cuda) device=cuda; base=${base:-nvidia/cuda:12.9.1-runtime-ubuntu22.04} ;;
  *) die "--variant must be cpu or cuda, not $variant" ;;
esac
tag=${tag:-sdserve:$variant}
if [ -n "$model" ] && ! [ -f "$model/model_index.json" ]; then
  die "--model $model: no model_index.json (a diffusers folder is expected)"
fi

# A CUDA build links cuBLAS; a CPU build must not (it would not start without it).
if command -v readelf >/dev/null; then
  if readelf -d "$binary" | grep -q 'NEEDED.*libcublas'; then linked=cuda; else linked=cpu; fi
  [ "$linked" = "$variant" ] ||
    die "$binary is a $linked build but --variant is $variant (a cuda binary comes from deploy/build-cuda.sh)"
fi

if [ "$variant" = cpu ] && [ "$base" = sdserve-base:bookworm ]; then
  "$here/build-base-image.sh" --tag "$base"
fi

ctx=$(mktemp -d "${TMPDIR:-/tmp}/sdserve-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
install -m 0755 "$binary" "$ctx/sdserve"
cp "$here/Dockerfile" "$ctx/Dockerfile"
mkdir "$ctx/model"
if [ -n "$model" ]; then
  cp -rL "$model/." "$ctx/model/"
  rm -rf "$ctx/model/.git" "$ctx/model/.cache"
fi

docker build \
  --build-arg "BASE_IMAGE=$base" \
  --build-arg "SDSERVE_DEVICE=$device" \
  --label "org.opencontainers.image.version=$("$ctx/sdserve" --version 2>/dev/null | awk '{print $2}')" \
  --tag "$tag" "$@" "$ctx"
echo "built $tag ($variant, base $base): $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
