#!/usr/bin/env bash
# Compile every CUDA kernel source (kernels/cuda/*.cu) for sm_80 and sm_90 with NVRTC, through
# the engine's own compile path (dvl::cuda::nvrtc, via engine/examples/nvrtc_check.rs). No GPU
# and no CUDA installation needed: NVRTC and the CUDA headers come from PyPI
# (nvidia-cuda-nvrtc, nvidia-cuda-runtime), installed with `pip install --target` into a cache
# directory (reused on later runs).
#
# Usage: scripts/nvrtc-check.sh [extra nvrtc_check arguments, e.g. --arch sm_86]
# Environment:
#   NVRTC_VERSION / CUDA_RUNTIME_VERSION  PyPI versions (default: 13.0.x, the CUDA version of
#                                         the GPU machines' driver, 580)
#   DVL_NVRTC_PIP_DIR                     install directory (default: $TMPDIR/dvl-nvrtc-<ver>)
#   PYTHON                                interpreter with pip (default: python3)
#   CARGO_TARGET_DIR                      honoured as usual
# Exit status: 0 when every file compiles for every architecture and contains every entry
# point the engine launches, and the CPU emulation of the kernels passes; non-zero otherwise.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

NVRTC_VERSION="${NVRTC_VERSION:-13.0.88}"
CUDA_RUNTIME_VERSION="${CUDA_RUNTIME_VERSION:-13.0.96}"
PYTHON="${PYTHON:-python3}"
dir="${DVL_NVRTC_PIP_DIR:-${TMPDIR:-/tmp}/dvl-nvrtc-$NVRTC_VERSION-$CUDA_RUNTIME_VERSION}"

if [ ! -e "$dir/.complete" ]; then
    echo "nvrtc-check: installing nvidia-cuda-nvrtc==$NVRTC_VERSION nvidia-cuda-runtime==$CUDA_RUNTIME_VERSION into $dir" >&2
    rm -rf "$dir"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --target "$dir" \
        "nvidia-cuda-nvrtc==$NVRTC_VERSION" "nvidia-cuda-runtime==$CUDA_RUNTIME_VERSION"
    touch "$dir/.complete"
fi

# The wheels put the libraries under nvidia/<cuXX or cuda_nvrtc>/lib and the headers under
# .../include (the layout changed between CUDA 12 and 13, so search).
lib="$(find "$dir/nvidia" -name 'libnvrtc.so.*' ! -name '*builtins*' ! -name '*.alt.*' | sort | tail -n 1)"
hdr="$(find "$dir/nvidia" -name cuda_bf16.h | head -n 1)"
if [ -z "$lib" ] || [ -z "$hdr" ]; then
    echo "nvrtc-check: FAILED: libnvrtc.so.* or cuda_bf16.h not found under $dir" >&2
    exit 1
fi

# The engine loads DVL_NVRTC (and the libnvrtc-builtins beside it) by path; LD_LIBRARY_PATH
# is deliberately not set, so this also checks that path. The kernels need no header, but the
# include directory is passed (-I) as the engine would pass it (DVL_CUDA_INCLUDE).
export DVL_NVRTC="$lib"
export DVL_CUDA_INCLUDE="$(dirname "$hdr")"
export DVL_KERNEL_CACHE=off

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo run --quiet -p dvl --features cuda --example nvrtc_check -- \
    --arch sm_80 --arch sm_90 --report "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 0 ] && ! grep -qF "from $lib " "$log"; then
    echo "nvrtc-check: FAILED: the engine did not load $lib" >&2
    status=1
fi

# The same sources run on the CPU under kernels/cuda/sim (fibers for CUDA threads, emulated
# shuffles and mma.sync) against f64 loops: indexing, reductions and barriers checked without a
# GPU, ~20 s. DVL_SKIP_SIM=1 skips it.
if [ "${DVL_SKIP_SIM:-0}" != 1 ]; then
    if command -v "${CXX:-g++}" >/dev/null; then
        echo "nvrtc-check: CPU emulation of the kernels (kernels/cuda/sim/run.sh)"
        if ! kernels/cuda/sim/run.sh; then
            echo "nvrtc-check: FAILED: kernel emulation" >&2
            status=1
        fi
    else
        echo "nvrtc-check: no ${CXX:-g++}: kernel emulation skipped" >&2
    fi
fi
exit "$status"
