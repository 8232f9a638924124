#!/usr/bin/env bash
# Build and run the CPU emulation of the CUDA kernels (sim.hpp): every kernel of kernels/cuda/
# on odd shapes against f64 loops. No GPU and no CUDA needed: a C++17 compiler and glibc
# (ucontext fibers). About 20 s.
# Usage: kernels/cuda/sim/run.sh [gemv|gemv_tc|gemm|attention|norm|ew|unmask]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exe="$(mktemp "${TMPDIR:-/tmp}/dvl-cuda-sim.XXXXXX")"
trap 'rm -f "$exe"' EXIT
"${CXX:-g++}" -std=c++17 -O2 -Wall -Wno-unknown-pragmas -Wno-unused-function \
    -fno-strict-aliasing -o "$exe" "$here/sim_test.cpp"
"$exe" "$@"
