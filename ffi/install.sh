#!/usr/bin/env bash
# Install libdvl (static and shared), include/dvl.h and a pkg-config file.
#
#   cargo build --release -p dvl-ffi
#   ffi/install.sh [PREFIX]            # default /usr/local; honours DESTDIR
#
# Installs PREFIX/lib/libdvl.a, PREFIX/lib/libdvl.so, PREFIX/include/dvl.h and two
# pkg-config files in PREFIX/lib/pkgconfig: dvl.pc links libdvl.so, dvl-static.pc links
# libdvl.a (through PREFIX/lib/dvl-static/libdvl.a, a symlink) and the system libraries it
# needs. Paths are written for PREFIX, so DESTDIR
# staging works.
# CARGO_TARGET_DIR selects where the built libraries are (default target/).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${1:-/usr/local}"
case "$prefix" in
  /*) ;;
  *) echo "ffi/install.sh: PREFIX must be an absolute path, got $prefix" >&2; exit 2 ;;
esac
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in
  /*) ;;
  *) target="$root/$target" ;;
esac
rel="$target/release"
for f in "$rel/libdvl.a" "$rel/libdvl.so"; do
  if [ ! -f "$f" ]; then
    echo "ffi/install.sh: $f not found; run: cargo build --release -p dvl-ffi" >&2
    exit 1
  fi
done
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
# The system libraries a static libdvl.a needs (rustc --print native-static-libs on
# x86_64-linux-gnu, without libc which every C link adds).
libs_private="-lgcc_s -lutil -lrt -lpthread -lm -ldl"

dest="${DESTDIR:-}"
install -d "$dest$prefix/lib/pkgconfig" "$dest$prefix/include"
install -m 0644 "$rel/libdvl.a" "$dest$prefix/lib/libdvl.a"
install -m 0755 "$rel/libdvl.so" "$dest$prefix/lib/libdvl.so"
install -m 0644 "$root/include/dvl.h" "$dest$prefix/include/dvl.h"
# dvl-static.pc links with -L PREFIX/lib/dvl-static -ldvl: a directory holding only the
# static library, so that plain pkg-config users and CMake's pkg_check_modules (which
# resolves -l names with find_library) both get libdvl.a.
install -d "$dest$prefix/lib/dvl-static"
ln -sf ../libdvl.a "$dest$prefix/lib/dvl-static/libdvl.a"
cat > "$dest$prefix/lib/pkgconfig/dvl.pc" <<PC
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: dvl
Description: Inference engine for DiffusionVL block-diffusion vision-language models (C ABI)
Version: $version
Libs: -L\${libdir} -ldvl
Libs.private: $libs_private
Cflags: -I\${includedir}
PC
cat > "$dest$prefix/lib/pkgconfig/dvl-static.pc" <<PC
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: dvl-static
Description: Inference engine for DiffusionVL block-diffusion vision-language models (C ABI, static)
Version: $version
Libs: -L\${libdir}/dvl-static -ldvl $libs_private
Cflags: -I\${includedir}
PC
echo "installed libdvl $version to $dest$prefix (pkg-config: $dest$prefix/lib/pkgconfig/dvl.pc)"
