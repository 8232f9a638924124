#!/usr/bin/env bash
# C ABI checks (ffi/README.md): builds libdvl and the CLI, checks the generated header for
# drift, checks the exported symbols, compiles the C and C++ examples with strict warnings
# against include/dvl.h, links each statically and dynamically, runs them on the shipped
# tiny model and compares their token ids with the CLI's --json ids, runs the C API tests
# natively and under valgrind, and checks the install story (ffi/install.sh + pkg-config).
#
#   scripts/ffi-check.sh            # everything
#   DVL_FFI_SKIP_VALGRIND=1 scripts/ffi-check.sh
#
# Ends with "N passed, M failed" and exits non-zero when anything failed. Honours
# CARGO_TARGET_DIR. Needs cc, c++, nm, pkg-config and valgrind (.ci/run installs them).
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
rel="$target/release"
out="$target/ffi-check"
model=models/tiny-dvl
image=tests/fixtures/images/chelsea.png
prompt="Describe this image."
gen=32    # gen_length of the example runs compared with the CLI
vg_gen=16 # under valgrind (memcheck is ~100x slower): gen_length and steps per block
vg_steps=2
cc="${CC:-cc}"
cxx="${CXX:-c++}"
cflags=(-std=c99 -Wall -Wextra -Werror -Iinclude)
cxxflags=(-std=c++17 -Wall -Wextra -Werror -Iinclude -Iexamples/cpp)
# What a static libdvl.a needs from the system (rustc --print native-static-libs).
static_libs=(-lgcc_s -lutil -lrt -lpthread -lm -ldl)

passed=0
failed=0
rm -rf "$out"
mkdir -p "$out/bin" "$out/log"

ok() {
  echo "ok   $1"
  passed=$((passed + 1))
}
bad() {
  echo "FAIL $1"
  failed=$((failed + 1))
}
# check NAME CMD...: run CMD with its output in $out/log/NAME.log; show the log's tail
# on failure.
check() {
  local name=$1
  shift
  if "$@" >"$out/log/$name.log" 2>&1; then
    ok "$name"
  else
    bad "$name (exit $?; log $out/log/$name.log)"
    tail -n 25 "$out/log/$name.log" | sed 's/^/     | /'
  fi
}
finish() {
  echo "ffi-check: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
}

# ---- build --------------------------------------------------------------------------
# Built separately: with both in one command cargo unifies features and the library would
# also get the CLI's exact-jpeg (libjpeg's unprefixed symbols) that libdvl leaves out.
echo "== build (cargo build --release -p dvl-ffi; cargo build --release -p dvl)"
if ! cargo build --release -p dvl-ffi || ! cargo build --release -p dvl; then
  bad "cargo build --release -p dvl-ffi / -p dvl"
  finish
fi
ok "build libdvl.a, libdvl.so and the CLI"

# ---- header -------------------------------------------------------------------------
echo "== header"
check header-drift cargo test -p dvl-ffi --test header
check header-c99 "$cc" -std=c99 -Wall -Wextra -Werror -pedantic -Iinclude -x c -fsyntax-only include/dvl.h
check header-cxx "$cxx" -std=c++11 -Wall -Wextra -Werror -pedantic -Iinclude -x c++ -fsyntax-only include/dvl.h

# ---- exported symbols ---------------------------------------------------------------
# Rule, libdvl.so: every symbol in the dynamic symbol table that the library defines is
# dvl_-prefixed (the cdylib's version script exports nothing else).
# Rule, libdvl.a: a static library necessarily carries the Rust runtime and its
# dependencies. (1) In the objects of our crates (dvl-ffi and the engine, members named
# dvl.*), every global defined symbol is dvl_-prefixed, Rust-mangled (_ZN..., _R...) or
# an LLVM-internal name (anon.*, DW.ref.*). (2) In the whole archive, every global defined
# text symbol is dvl_-prefixed, mangled (_Z..., _R...), or a compiler-rt builtin (__*).
# (3) Every dvl_ function exported is declared in include/dvl.h, and vice versa.
echo "== exported symbols"
symbols_so() {
  local extra
  extra=$(nm -D --defined-only "$rel/libdvl.so" | awk 'NF>=3 {print $3}' | grep -v '^dvl_')
  if [ -n "$extra" ]; then
    echo "libdvl.so exports symbols without the dvl_ prefix:"
    echo "$extra" | head -50
    return 1
  fi
  echo "libdvl.so exports $(nm -D --defined-only "$rel/libdvl.so" | grep -c ' dvl_') dvl_ symbols and nothing else"
}
symbols_a() {
  local ours all
  ours=$(nm -A -g --defined-only "$rel/libdvl.a" 2>/dev/null |
    awk '{split($1, a, ":"); if (a[2] ~ /^dvl[.-]/ && NF >= 3) print a[2], $(NF-1), $NF}' |
    awk '$3 !~ /^(dvl_|_ZN|_R|anon\.|DW\.ref\.)/')
  all=$(nm -g --defined-only "$rel/libdvl.a" 2>/dev/null |
    awk 'NF == 3 && ($2 == "T" || $2 == "W") {print $3}' |
    grep -v -E '^(dvl_|_Z|_R|__)' | sort -u)
  if [ -n "$ours" ] || [ -n "$all" ]; then
    echo "unprefixed global symbols in libdvl.a:"
    echo "$ours" | head -30
    echo "$all" | head -30
    return 1
  fi
  echo "libdvl.a: our objects define only dvl_ / mangled globals; no unprefixed text symbols"
}
symbols_header() {
  local exported declared
  exported=$(nm -D --defined-only "$rel/libdvl.so" | awk '$2 == "T" {print $3}' | sort)
  declared=$(grep -o -E '\bdvl_[a-z0-9_]+\(' include/dvl.h | tr -d '(' | sort -u)
  if [ "$exported" != "$declared" ]; then
    echo "exported functions and include/dvl.h declarations differ:"
    diff <(echo "$exported") <(echo "$declared")
    return 1
  fi
  echo "$(echo "$exported" | wc -l) functions, all declared in include/dvl.h"
}
check symbols-libdvl.so symbols_so
check symbols-libdvl.a symbols_a
check symbols-match-header symbols_header

# ---- compile the examples and tests, static and dynamic -----------------------------
echo "== compile (C: ${cflags[*]}; C++: ${cxxflags[*]})"
dyn=(-L"$rel" -Wl,-rpath,"$rel" -ldvl -lpthread)
static=("$rel/libdvl.a" "${static_libs[@]}")
check cc-describe-dynamic "$cc" "${cflags[@]}" examples/c/describe.c "${dyn[@]}" -o "$out/bin/describe-dynamic"
check cc-describe-static "$cc" "${cflags[@]}" examples/c/describe.c "${static[@]}" -o "$out/bin/describe-static"
check cc-test_api-dynamic "$cc" "${cflags[@]}" examples/c/test_api.c "${dyn[@]}" -o "$out/bin/test_api-dynamic"
check cc-test_api-static "$cc" "${cflags[@]}" examples/c/test_api.c "${static[@]}" -o "$out/bin/test_api-static"
check cxx-describe-dynamic "$cxx" "${cxxflags[@]}" examples/cpp/describe.cpp "${dyn[@]}" -o "$out/bin/describe_cpp-dynamic"
check cxx-describe-static "$cxx" "${cxxflags[@]}" examples/cpp/describe.cpp "${static[@]}" -o "$out/bin/describe_cpp-static"
check static-binaries-do-not-need-libdvl.so bash -c \
  "! ldd '$out/bin/describe-static' '$out/bin/describe_cpp-static' '$out/bin/test_api-static' | grep -q libdvl"

# ---- token ids: examples vs the CLI -------------------------------------------------
echo "== token ids vs the CLI (dvl generate --json, gen_length $gen)"
json_ids() {
  if command -v jq >/dev/null; then
    jq -r '.ids | map(tostring) | join(" ")'
  else
    python3 -c 'import json, sys; print(" ".join(map(str, json.load(sys.stdin)["ids"])))'
  fi
}
cli="$rel/dvl"
"$cli" generate --model "$model" --prompt "$prompt" --gen-length "$gen" --json \
  >"$out/log/cli-text.json" 2>"$out/log/cli-text.err"
cli_text=$(json_ids <"$out/log/cli-text.json" 2>/dev/null)
if [ -n "$cli_text" ]; then ok "cli-text-only reference"; else bad "cli-text-only reference ($(cat "$out/log/cli-text.err"))"; fi
"$cli" generate --model "$model" --image "$image" --prompt "$prompt" --gen-length "$gen" --json \
  >"$out/log/cli-image.json" 2>"$out/log/cli-image.err"
cli_image=$(json_ids <"$out/log/cli-image.json" 2>/dev/null)
if [ -n "$cli_image" ]; then
  ok "cli-image reference"
else
  bad "cli-image reference: image decoding is unavailable in this build of the engine: $(tail -n 3 "$out/log/cli-image.err" | tr '\n' ' ')"
fi

# compare NAME WANT CMD...: CMD must exit 0 and print "ids: WANT" on stderr.
compare() {
  local name=$1 want=$2
  shift 2
  if [ -z "$want" ]; then
    bad "$name (no CLI reference to compare with)"
    return
  fi
  "$@" >"$out/log/$name.out" 2>"$out/log/$name.err"
  local rc=$? got
  got=$(sed -n 's/^ids: //p' "$out/log/$name.err" | tail -n 1)
  if [ "$rc" -eq 0 ] && [ "$got" = "$want" ]; then
    ok "$name"
  else
    bad "$name (exit $rc)"
    echo "     | want: $want"
    echo "     | got:  $got"
    tail -n 5 "$out/log/$name.err" | sed 's/^/     | /'
  fi
}
for exe in describe-dynamic describe-static describe_cpp-dynamic describe_cpp-static; do
  compare "ids-$exe-text" "$cli_text" "$out/bin/$exe" --gen-length "$gen" "$model" - "$prompt"
  compare "ids-$exe-image" "$cli_image" "$out/bin/$exe" --gen-length "$gen" "$model" "$image" "$prompt"
done
compare ids-describe-dynamic-cancel-then-regenerate "$cli_text" \
  "$out/bin/describe-dynamic" --gen-length "$gen" --cancel-after 5 "$model" - "$prompt"
if grep -q "cancelled after" "$out/log/ids-describe-dynamic-cancel-then-regenerate.err"; then
  ok "describe --cancel-after cancelled the first generation"
else
  bad "describe --cancel-after did not cancel the first generation"
fi

# ---- the C API tests ----------------------------------------------------------------
echo "== C API tests (examples/c/test_api.c)"
check test_api-dynamic "$out/bin/test_api-dynamic" "$model" "$image"
check test_api-static "$out/bin/test_api-static" "$model" "$image"
grep -h "passed, .* failed" "$out/log/test_api-dynamic.log" "$out/log/test_api-static.log" 2>/dev/null | sed 's/^/     /'

if [ -n "${DVL_FFI_SKIP_VALGRIND:-}" ]; then
  echo "== valgrind: skipped (DVL_FFI_SKIP_VALGRIND)"
elif ! command -v valgrind >/dev/null; then
  bad "valgrind is not installed"
else
  echo "== valgrind memcheck (test_api, gen_length $vg_gen, $vg_steps steps per block; a few minutes)"
  vg=(valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite
    --show-leak-kinds=definite --fair-sched=yes)
  check valgrind-test_api "${vg[@]}" "$out/bin/test_api-dynamic" --gen-length "$vg_gen" \
    --steps "$vg_steps" "$model"
  grep -h -E "ERROR SUMMARY|definitely lost|passed, .* failed" "$out/log/valgrind-test_api.log" |
    sed 's/^/     /'
fi

# ---- install story ------------------------------------------------------------------
echo "== install (ffi/install.sh) and pkg-config"
prefix="$out/prefix"
check install env CARGO_TARGET_DIR="$target" ffi/install.sh "$prefix"
pc() { PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config "$@"; }
check pkg-config-dynamic bash -c "$(declare -f pc); prefix='$prefix'; \
  $cc ${cflags[*]} examples/c/describe.c \$(pc --cflags --libs dvl) -Wl,-rpath,'$prefix/lib' -lpthread -o '$out/bin/describe-pc' \
  && ldd '$out/bin/describe-pc' | grep -q '$prefix/lib/libdvl.so'"
check pkg-config-static bash -c "$(declare -f pc); prefix='$prefix'; \
  $cxx ${cxxflags[*]} examples/cpp/describe.cpp \$(pc --cflags --libs dvl-static) -o '$out/bin/describe_cpp-pc' \
  && ! ldd '$out/bin/describe_cpp-pc' | grep -q libdvl"
compare ids-describe-pc-text "$cli_text" "$out/bin/describe-pc" --gen-length "$gen" "$model" - "$prompt"
compare ids-describe_cpp-pc-static-text "$cli_text" "$out/bin/describe_cpp-pc" --gen-length "$gen" "$model" - "$prompt"

finish
