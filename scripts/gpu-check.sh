#!/usr/bin/env bash
# GPU check for the CUDA kernels: one script for a machine with an NVIDIA GPU (x86-64, no
# network, no crates registry; a CUDA toolkit or PyTorch's NVRTC wheel present).
#
# Two steps:
#   1. Here, on a machine with cargo (no GPU needed):
#        scripts/gpu-check.sh --prepare
#      builds `cargo test -p dvl --features cuda --release --no-run` (which also builds the
#      examples) and copies the CUDA test executable and the benchmark, stripped of debug info,
#      into .gpu-bin/ (added to .git/info/exclude). Carry `.gpu-bin` to the GPU machine (the
#      device tool: carry [".gpu-bin"]).
#   2. On the GPU machine, from the repository root:
#        scripts/gpu-check.sh
#      runs engine/tests/cuda.rs (every kernel against the CPU references) and the kernel
#      micro-benchmarks (engine/examples/cuda_bench.rs), printing one JSON line per figure, then
#      a final `N passed, M failed` line. Logs go to $OUT when it is set. Under 8 minutes (the
#      tests and benchmarks take about a minute; each step has its own timeout).
#      Without .gpu-bin it tries to build with cargo --offline (needs a populated registry).
#
# NVRTC: DVL_NVRTC if set; else whatever the loader finds (LD_LIBRARY_PATH, ldconfig); else
# /usr/local/cuda's or a pip wheel's (nvidia/*/lib) visible to python3, by path. A test that skips (no device, no NVRTC) counts as
# failed here: on a GPU machine nothing may skip.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bin="${DVL_GPU_BIN:-$root/.gpu-bin}"

if [ "${1:-}" = "--prepare" ]; then
    set -e
    target="${CARGO_TARGET_DIR:-$root/target}"
    cargo test -p dvl --features cuda --release --no-run
    test_exe="$(ls -t "$target"/release/deps/cuda-* 2>/dev/null | grep -v '\.d$' | head -n 1)"
    [ -n "$test_exe" ] || { echo "gpu-check: no test executable under $target/release/deps" >&2; exit 1; }
    mkdir -p "$bin"
    cp "$test_exe" "$bin/cuda-tests"
    cp "$target/release/examples/cuda_bench" "$bin/cuda_bench"
    strip --strip-debug "$bin/cuda-tests" "$bin/cuda_bench" 2>/dev/null || true
    exclude="$root/.git/info/exclude"
    if [ -d "$root/.git" ] && ! grep -qx '/.gpu-bin/' "$exclude" 2>/dev/null; then
        echo '/.gpu-bin/' >> "$exclude"
    fi
    ls -la "$bin"
    echo "gpu-check: prepared; carry .gpu-bin and run scripts/gpu-check.sh on the GPU machine"
    exit 0
fi

t_start=$(date +%s)
passed=0
failed=0
out="${OUT:-}"
logdir="$(mktemp -d)"
json() { printf '%s\n' "$1"; }

# --- executables
if [ ! -x "$bin/cuda-tests" ] || [ ! -x "$bin/cuda_bench" ]; then
    echo "gpu-check: $bin has no prebuilt executables; trying cargo --offline" >&2
    target="${CARGO_TARGET_DIR:-$root/target}"
    if command -v cargo >/dev/null && timeout 120 cargo test -p dvl --features cuda --release --no-run --offline >&2; then
        mkdir -p "$bin"
        cp "$(ls -t "$target"/release/deps/cuda-* | grep -v '\.d$' | head -n 1)" "$bin/cuda-tests"
        cp "$target/release/examples/cuda_bench" "$bin/cuda_bench"
    else
        json '{"figure":"gpu_check","error":"no executables: run scripts/gpu-check.sh --prepare where cargo works and carry .gpu-bin"}'
        echo "0 passed, 1 failed"
        exit 1
    fi
fi

# --- NVRTC: left to the engine's search when the loader can find one (LD_LIBRARY_PATH,
# ldconfig), else the CUDA toolkit's or a pip wheel's, by path.
if [ -z "${DVL_NVRTC:-}" ]; then
    found=""
    for d in $(printf '%s' "${LD_LIBRARY_PATH:-}" | tr ':' ' '); do
        ls "$d"/libnvrtc.so* >/dev/null 2>&1 && found="$d" && break
    done
    [ -z "$found" ] && ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so' && found="ldconfig"
    if [ -z "$found" ]; then
        cands="$(ls /usr/local/cuda/lib64/libnvrtc.so.* /usr/local/cuda/targets/*/lib/libnvrtc.so.* 2>/dev/null)"
        cands="$cands $(python3 -c 'import glob, sys; print("\n".join(p for d in sys.path for p in sorted(glob.glob(d + "/nvidia/*/lib/libnvrtc.so.*"))))' 2>/dev/null)"
        for c in $cands; do
            case "$c" in *builtins*|*.alt.*) continue ;; esac
            if [ -e "$c" ]; then export DVL_NVRTC="$c"; break; fi
        done
    fi
fi
export DVL_KERNEL_CACHE="${DVL_KERNEL_CACHE:-$logdir/kernel-cache}"
gpu_name="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
json "{\"figure\":\"gpu_check_env\",\"gpu\":\"${gpu_name}\",\"nvrtc\":\"${DVL_NVRTC:-search path}\",\"kernel_cache\":\"$DVL_KERNEL_CACHE\"}"

# --- tests: every kernel against the CPU references (JSON lines come from the tests)
tlog="$logdir/cuda-tests.log"
timeout 240 "$bin/cuda-tests" --test-threads=1 --nocapture > "$tlog" 2>&1
trc=$?
grep '^{' "$tlog"
t_pass="$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\1/p' "$tlog" | tail -n 1)"
t_fail="$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\2/p' "$tlog" | tail -n 1)"
skips="$(grep -c ': skipped: ' "$tlog")"
if [ -z "$t_pass" ]; then
    # Crashed or timed out before libtest's summary.
    grep -v '^{' "$tlog" | tail -n 40 >&2
    json "{\"figure\":\"cuda_tests\",\"exit\":$trc,\"error\":\"no libtest summary (crash or timeout)\"}"
    failed=$((failed + 1))
else
    passed=$((passed + t_pass - skips))
    failed=$((failed + t_fail + skips))
    if [ "$t_fail" -gt 0 ] || [ "$skips" -gt 0 ]; then
        grep -E 'panicked|skipped|FAILED|assert' "$tlog" | head -n 40 >&2
    fi
    json "{\"figure\":\"cuda_tests\",\"exit\":$trc,\"passed\":$((t_pass - skips)),\"failed\":$t_fail,\"skipped\":$skips}"
fi

# --- benchmarks
blog="$logdir/cuda-bench.log"
timeout 180 "$bin/cuda_bench" > "$blog" 2>&1
brc=$?
grep '^{' "$blog"
if [ $brc -eq 0 ] && grep -q '"figure":"gemv_bandwidth"' "$blog"; then
    passed=$((passed + 1))
else
    grep -v '^{' "$blog" | tail -n 20 >&2
    json "{\"figure\":\"cuda_bench\",\"exit\":$brc,\"error\":\"benchmark failed or skipped\"}"
    failed=$((failed + 1))
fi

if [ -n "$out" ]; then
    cp "$tlog" "$blog" "$out/" 2>/dev/null
fi
json "{\"figure\":\"gpu_check_seconds\",\"value\":$(( $(date +%s) - t_start ))}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
