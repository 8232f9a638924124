#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls it).
# Everything here runs without a GPU and without network access beyond crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== formatting"
cargo fmt --all -- --check

echo "== no_std: the engine core builds without std, and nothing in its graph links std"
cargo build -p dvl-kernels -p dvl --no-default-features
cargo build --manifest-path tests/nostd-check/Cargo.toml

if [ -x scripts/ffi-check.sh ]; then
  echo "== C ABI: header drift, exported symbols, C/C++ examples, valgrind"
  scripts/ffi-check.sh
fi

echo "== unit, golden-fixture, CLI and kernel tests"
cargo test --workspace
