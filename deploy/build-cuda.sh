#!/usr/bin/env bash
# Builds the CUDA sdserve binary against the CUDA libraries of a chosen major version,
# whatever CUDA toolkit compiles the kernels.
#
#   deploy/build-cuda.sh                       # CUDA 12 libraries, kernels for sm_80+
#   deploy/build-cuda.sh --cuda 13 --compute-cap 90
#
#   --cuda 12|13       CUDA major version the binary links (default 12): libcublas.so.12
#                      (which loads libcublasLt.so.12), libcurand.so.10, libcudart.so.12
#                      (13: .so.13; cudart is linked by candle-kernels' static kernels).
#                      Run it where those libraries are: the nvidia/cuda:12.x runtime
#                      images (deploy/Dockerfile's default base), or PyTorch's nvidia-*
#                      packages (LD_LIBRARY_PATH). The driver must support that version
#                      (CUDA 12: driver >= 525; 13: >= 580).
#   --compute-cap N    GPU architecture candle's kernels are compiled for (default 80):
#                      they are PTX, which the driver compiles for newer GPUs too, so 80
#                      covers A100, A10G (86), L4 (89) and H100 (90); candle's bf16
#                      kernels need >= 80.
#   --target-dir DIR   cargo's target folder (default target/cuda12 or target/cuda13);
#                      the binary is DIR/release/sdserve.
#
# What it needs: nvcc on PATH (any CUDA >= 11.8 toolkit: it only compiles candle's
# kernels; on Debian 12, `nvidia-cuda-toolkit` from the non-free component), pip (the
# CUDA libraries to link against are NVIDIA's wheels from PyPI, pinned below and cached
# under target/cuda-libs/), and the driver library libcuda.so.1 to link against (on a
# machine without a GPU: Debian's libcuda1, which nvidia-cuda-toolkit installs).
# No GPU is needed to build. About 10 minutes on 2 cores, plus ~1 GB of wheels the first time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

cuda=12 cap=80 target_dir=''
while (($#)); do
  case "$1" in
    --cuda) cuda=${2:?--cuda needs 12 or 13}; shift 2 ;;
    --compute-cap) cap=${2:?--compute-cap needs a number, e.g. 90}; shift 2 ;;
    --target-dir) target_dir=${2:?--target-dir needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "error: $*" >&2; exit 2; }

# Pinned wheels (name==version) and the sonames the binary must end up needing.
case "$cuda" in
  12)
    cudarc_version=12090
    wheels=(nvidia-cublas-cu12==12.9.1.4 nvidia-curand-cu12==10.3.10.19 nvidia-cuda-runtime-cu12==12.9.79)
    sonames=(libcublas.so.12 libcurand.so.10 libcudart.so.12)
    ;;
  13)
    cudarc_version=13000
    wheels=(nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35 nvidia-cuda-runtime==13.0.48)
    sonames=(libcublas.so.13 libcurand.so.10 libcudart.so.13)
    ;;
  *) die "--cuda must be 12 or 13, not $cuda" ;;
esac
[[ "$cap" =~ ^[1-9][0-9]*$ ]] && ((cap >= 80)) || die "--compute-cap must be a number >= 80 (candle's kernels need bf16), not $cap"
target_dir=$(realpath -m "${target_dir:-$root/target/cuda$cuda}")

command -v nvcc >/dev/null || die "nvcc not found: install a CUDA toolkit (Debian 12: add the non-free component, then apt-get install nvidia-cuda-toolkit; deploy/README.md)"
# ldconfig is in /sbin, often not on a user's PATH; awk reads all of its output
# (exiting early would SIGPIPE ldconfig and, under pipefail, end the script).
driver=$(PATH=$PATH:/sbin:/usr/sbin ldconfig -p | awk '/libcuda\.so\.1 .*x86-64/ && !p {p = $NF} END {print p}')
[ -n "$driver" ] || die "libcuda.so.1 not found (the NVIDIA driver library; on a machine without a GPU install Debian's libcuda1)"

# The libraries to link against, from NVIDIA's wheels (zip files: the .so files are
# under nvidia/<component>/lib/, with versioned names only).
# The cache is keyed by the pins: changing a version re-downloads.
libs=$root/target/cuda-libs/cu$cuda
if [ "$(cat "$libs/.complete" 2>/dev/null)" != "${wheels[*]}" ]; then
  rm -rf "$libs" && mkdir -p "$libs/wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$libs/wheels" \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --python-version 3.11 "${wheels[@]}"
  for w in "$libs"/wheels/*.whl; do
    python3 - "$w" "$libs" <<'EOF'
import sys, zipfile, pathlib
wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        p = pathlib.PurePosixPath(name)
        if p.parent.name == "lib" and ".so" in p.name:
            (out / p.name).write_bytes(z.read(name))
EOF
  done
  rm -rf "$libs/wheels"
  echo "${wheels[*]}" > "$libs/.complete"
fi
# Unversioned names for the linker (-lcublas ...), and the driver.
for so in "${sonames[@]}"; do
  [ -f "$libs/$so" ] || die "$so missing from the wheels in $libs"
  ln -sfn "$so" "$libs/${so%%.so.*}.so"
done
ln -sfn "$driver" "$libs/libcuda.so"

echo "building sdserve (features cuda) against CUDA $cuda libraries in $libs, kernels for sm_$cap, nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
cd "$root"
# Always relink: cargo can't see the library folder change, and a binary linked
# against other libraries (e.g. the toolkit's own cudart) would otherwise be kept.
rm -f "$target_dir"/release/deps/sdserve-*
CUDARC_CUDA_VERSION=$cudarc_version CUDA_COMPUTE_CAP=$cap \
  RUSTFLAGS="${RUSTFLAGS:-} -L native=$libs" \
  cargo build --release --locked --features cuda --target-dir "$target_dir" --bin sdserve

# The binary must need exactly this major version's libraries.
bin=$target_dir/release/sdserve
needed=$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
for so in "${sonames[@]}" libcuda.so.1; do
  grep -qxF "$so" <<<"$needed" || die "$bin does not link $so; it needs: $(tr '\n' ' ' <<<"$needed")"
done
if grep -E '^lib(cublas|cublasLt|curand|cudart|nvrtc)\.so\.' <<<"$needed" | grep -vxF -f <(printf '%s\n' "${sonames[@]}") >/dev/null; then
  die "$bin links other CUDA versions too: $(tr '\n' ' ' <<<"$needed")"
fi
echo "built $bin ($(du -m "$bin" | cut -f1) MB); needs: $(tr '\n' ' ' <<<"$needed")"
