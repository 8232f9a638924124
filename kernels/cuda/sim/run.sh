#!/usr/bin/env bash
# Build and run the CPU emulation of the CUDA kernels (no GPU, no CUDA needed: only g++ >= 11).
# Usage: kernels/cuda/sim/run.sh [gemv|gemv_tc|gemm|attention|norm|ew|unmask]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${TMPDIR:-/tmp}/dvl-cuda-sim"
g++ -std=c++20 -O2 -pthread -Wall -Wno-unknown-pragmas -Wno-unused-function \
    -fno-strict-aliasing -o "$out" "$here/sim_test.cpp"
exec "$out" "$@"
