//! Run-time compilation of the CUDA kernels with NVRTC (through cudarc, loaded dynamically),
//! with an on-disk cache.
//!
//! Which NVRTC: `DVL_NVRTC` (a path to `libnvrtc.so*`) if set; else one found in the directory
//! of the loaded CUDA driver (`libcuda.so.1`), so the compiler matches the driver where the
//! system ships them together; else cudarc's search (`libnvrtc.so`, `.so.13`, `.so.12`, ... on
//! the loader's path, e.g. `LD_LIBRARY_PATH`). A chosen file is loaded (with the
//! `libnvrtc-builtins` beside it) before cudarc's first use; cudarc's by-name load then resolves
//! to it. [`Nvrtc::library`] reports the file actually in use.
//!
//! Cache: `DVL_KERNEL_CACHE` (a directory; `off` disables), else `$XDG_CACHE_HOME/dvl/kernels`,
//! else `~/.cache/dvl/kernels`. Entries are keyed by a 128-bit hash of the full source, the
//! options, the target architecture and the NVRTC version; a broken cache only costs a compile.

use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::sync::OnceLock;
use std::vec::Vec;
use std::{format, vec};

use cudarc::nvrtc::{result, sys};

use super::cuda_error;
use crate::Result;

/// The loaded NVRTC library.
#[derive(Debug)]
pub struct Nvrtc {
    /// (major, minor), e.g. (13, 0).
    pub version: (i32, i32),
    /// Architectures it can target (e.g. 75, 80, 90), empty if it cannot say.
    pub archs: Vec<i32>,
    /// The file in use, where the platform can tell.
    pub library: Option<PathBuf>,
    /// Files loaded by path before cudarc's by-name load (kept open for the process).
    #[cfg(unix)]
    _pinned: Vec<libloading::os::unix::Library>,
}

static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();

/// Load NVRTC once per process (no panic when it is missing: a clear error instead).
pub fn nvrtc() -> Result<&'static Nvrtc> {
    NVRTC
        .get_or_init(load)
        .as_ref()
        .map_err(|e| cuda_error("NVRTC", e))
}

/// Whether some NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    nvrtc().is_ok()
}

fn guard<T>(what: &str, f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{what} failed inside cudarc: {msg}")
    })
}

/// NVRTC files to prefer, best first.
fn preferred_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("DVL_NVRTC").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(dir) =
        loaded_library_path("libcuda.so").and_then(|p| p.parent().map(Path::to_path_buf))
    {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnvrtc.so"))
            })
            .collect();
        // libnvrtc.so.13 before libnvrtc.so.12 before libnvrtc.so (newest first).
        found.sort();
        found.reverse();
        out.extend(found);
    }
    out
}

/// Loaded shared objects whose file name starts with `prefix` (Linux: from /proc/self/maps;
/// empty elsewhere), in load-address order, without duplicates.
pub fn loaded_libraries(prefix: &str) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut out: Vec<PathBuf> = Vec::new();
    for p in maps
        .lines()
        .filter_map(|l| l.find('/').map(|i| Path::new(&l[i..])))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && !n.contains("builtins"))
        })
    {
        if !out.iter().any(|q| q == p) {
            out.push(p.to_path_buf());
        }
    }
    out
}

/// The first loaded shared object whose file name starts with `prefix`.
pub fn loaded_library_path(prefix: &str) -> Option<PathBuf> {
    loaded_libraries(prefix).into_iter().next()
}

#[cfg(unix)]
fn pin(file: &Path, notes: &mut Vec<String>) -> Vec<libloading::os::unix::Library> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    let mut libs = Vec::new();
    // NVRTC dlopens libnvrtc-builtins by name; load the one beside the chosen file first so
    // that name resolves to it.
    if let Some(dir) = file.parent() {
        let mut builtins: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
            })
            .collect();
        builtins.sort();
        for b in builtins {
            // SAFETY: loading a shared library runs its initialisers; NVRTC's are benign.
            if let Ok(l) = unsafe { Library::open(Some(&b), RTLD_NOW | RTLD_GLOBAL) } {
                libs.push(l);
            }
        }
    }
    // SAFETY: as above.
    match unsafe { Library::open(Some(file), RTLD_NOW | RTLD_GLOBAL) } {
        Ok(l) => libs.push(l),
        Err(e) => {
            notes.push(format!("{}: {e:?}", file.display()));
            libs.clear();
        }
    }
    libs
}

fn load() -> std::result::Result<Nvrtc, String> {
    let mut notes = Vec::new();
    let explicit = std::env::var_os("DVL_NVRTC").is_some_and(|p| !p.is_empty());
    #[cfg(unix)]
    let mut pinned = Vec::new();
    #[cfg(unix)]
    let mut pinned_file = None;
    #[cfg(unix)]
    for f in preferred_files() {
        pinned = pin(&f, &mut notes);
        if !pinned.is_empty() {
            pinned_file = Some(f);
            break;
        }
        if explicit {
            return Err(format!("DVL_NVRTC: cannot load {}", notes.join("; ")));
        }
    }
    #[cfg(not(unix))]
    let _ = preferred_files();
    // SAFETY: only probes whether the library can be opened.
    let present = guard("probe", || unsafe { sys::is_culib_present() }).unwrap_or(false);
    #[cfg(unix)]
    if present {
        if let (Some(ours), Some(f)) = (pinned.last(), &pinned_file) {
            // cudarc loads by name; check its handle resolved to the file loaded above (an
            // unversioned libnvrtc.so elsewhere on the search path could win).
            type F = unsafe extern "C" fn();
            // SAFETY: symbol lookups only; the addresses are compared, never called.
            let a = unsafe { ours.get::<F>(b"nvrtcVersion\0") }
                .map(|s| *s as usize)
                .ok();
            let b = guard("symbol lookup", || unsafe {
                sys::culib()
                    .get::<F>(b"nvrtcVersion\0")
                    .map(|s| *s as usize)
                    .ok()
            })
            .ok()
            .flatten();
            if a.is_none() || a != b {
                let msg = format!(
                    "{} was loaded, but cudarc's by-name load picked another libnvrtc (loaded: \
                     {}); put the wanted directory first on LD_LIBRARY_PATH instead",
                    f.display(),
                    loaded_libraries("libnvrtc")
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if explicit {
                    return Err(format!("DVL_NVRTC: {msg}"));
                }
                notes.push(msg);
                pinned_file = None;
            }
        }
    }
    if !present {
        let mut msg = String::from(
            "libnvrtc not found: install the CUDA toolkit's NVRTC (or `pip install \
             nvidia-cuda-nvrtc`) and put its lib directory on LD_LIBRARY_PATH, or set DVL_NVRTC \
             to the libnvrtc.so file",
        );
        for n in notes {
            msg.push_str("; ");
            msg.push_str(&n);
        }
        return Err(msg);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: out-pointers to live locals.
    let r = guard("nvrtcVersion", || unsafe {
        sys::nvrtcVersion(&mut major, &mut minor)
    })?;
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    let archs = guard("nvrtcGetSupportedArchs", || {
        let mut n = 0;
        // SAFETY: out-pointer; then a buffer of exactly n entries.
        unsafe {
            if sys::nvrtcGetNumSupportedArchs(&mut n) != sys::nvrtcResult::NVRTC_SUCCESS || n <= 0 {
                return Vec::new();
            }
            let mut v = vec![0i32; n as usize];
            if sys::nvrtcGetSupportedArchs(v.as_mut_ptr()) != sys::nvrtcResult::NVRTC_SUCCESS {
                return Vec::new();
            }
            v
        }
    })
    .unwrap_or_default();
    #[cfg(unix)]
    let library = pinned_file.or_else(|| loaded_library_path("libnvrtc"));
    #[cfg(not(unix))]
    let library = loaded_library_path("libnvrtc");
    Ok(Nvrtc {
        version: (major, minor),
        archs,
        library,
        #[cfg(unix)]
        _pinned: pinned,
    })
}

/// What NVRTC produced: a CUBIN (machine code for one `sm_XY`) or PTX (`compute_XY`, compiled
/// by the driver at load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Cubin,
    Ptx,
}

#[derive(Clone, Debug)]
pub struct Compiled {
    /// The image as cuModuleLoadData takes it (PTX is NUL-terminated).
    pub image: Vec<u8>,
    pub kind: ImageKind,
    /// NVRTC's log (warnings; ptxas statistics when `-Xptxas=-v` is among the options).
    /// Empty when the image came from the cache.
    pub log: String,
    /// Whether the image came from the disk cache.
    pub cached: bool,
}

/// `sm_XY` (CUBIN) or `compute_XY` (PTX), optional `a`/`f` suffix.
pub fn parse_arch(arch: &str) -> Result<(ImageKind, i32)> {
    let (kind, rest) = if let Some(r) = arch.strip_prefix("sm_") {
        (ImageKind::Cubin, r)
    } else if let Some(r) = arch.strip_prefix("compute_") {
        (ImageKind::Ptx, r)
    } else {
        return Err(cuda_error(
            "NVRTC",
            format!("bad architecture {arch:?}: expected sm_XY or compute_XY"),
        ));
    };
    let digits = rest.trim_end_matches(['a', 'f']);
    digits
        .parse::<i32>()
        .ok()
        .filter(|&n| n >= 10)
        .map(|n| (kind, n))
        .ok_or_else(|| cuda_error("NVRTC", format!("bad architecture {arch:?}")))
}

/// Options every kernel is compiled with (plus `-I` for each directory in
/// `DVL_CUDA_INCLUDE`, `:`-separated, and the space-separated words of `DVL_NVRTC_OPTS`).
pub fn options(arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "-DDVL_NVRTC=1".to_string(),
    ];
    if let Some(dirs) = std::env::var_os("DVL_CUDA_INCLUDE") {
        for d in std::env::split_paths(&dirs).filter(|d| !d.as_os_str().is_empty()) {
            o.push(format!("-I{}", d.display()));
        }
    }
    if let Ok(extra) = std::env::var("DVL_NVRTC_OPTS") {
        o.extend(extra.split_whitespace().map(String::from));
    }
    o
}

/// FNV-1a, 128-bit: a cache key, not a security boundary.
fn fnv128(parts: &[&[u8]]) -> u128 {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= b as u128;
            h = h.wrapping_mul(0x0000000001000000000000000000013B);
        }
    }
    h
}

/// The kernel cache directory, or None when disabled or no home directory is known.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("DVL_KERNEL_CACHE") {
        Some(v) if v == "off" || v == "0" => return None,
        Some(v) if !v.is_empty() => return Some(PathBuf::from(v)),
        _ => {}
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("dvl").join("kernels"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("dvl").join("kernels"))
}

fn c_chars_to_string(v: &[core::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compile `source` (a complete translation unit; `name` is used in messages) for `arch`
/// with [`options`] plus `extra`, through the cache in `cache` (normally [`cache_dir`]; None:
/// no cache).
pub fn compile(
    name: &str,
    source: &str,
    arch: &str,
    extra: &[String],
    cache: Option<&Path>,
) -> Result<Compiled> {
    let nv = nvrtc()?;
    let (kind, num) = parse_arch(arch)?;
    if !nv.archs.is_empty() && !nv.archs.contains(&num) {
        return Err(cuda_error(
            "NVRTC",
            format!(
                "NVRTC {}.{} cannot target {arch} (it supports {:?})",
                nv.version.0, nv.version.1, nv.archs
            ),
        ));
    }
    let mut opts = options(arch);
    opts.extend(extra.iter().cloned());
    let version = format!("{}.{}", nv.version.0, nv.version.1);
    let key = fnv128(&[
        source.as_bytes(),
        opts.join("\u{1}").as_bytes(),
        arch.as_bytes(),
        version.as_bytes(),
    ]);
    let stem = name.trim_end_matches(".cu");
    let ext = if kind == ImageKind::Cubin {
        "cubin"
    } else {
        "ptx"
    };
    let cache_file =
        cache.map(|d| d.join(format!("{stem}-{arch}-nvrtc{version}-{key:032x}.{ext}")));
    if let Some(f) = &cache_file {
        if let Ok(image) = std::fs::read(f) {
            if !image.is_empty() {
                return Ok(Compiled {
                    image,
                    kind,
                    log: String::new(),
                    cached: true,
                });
            }
        }
    }

    let src_c =
        CString::new(source).map_err(|_| cuda_error(name, "kernel source contains a NUL byte"))?;
    let name_c = CString::new(name).map_err(|_| cuda_error(name, "bad kernel file name"))?;
    let compiled = guard(
        "NVRTC compile",
        || -> std::result::Result<Compiled, String> {
            let prog = result::create_program(&src_c, Some(&name_c))
                .map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?;
            // SAFETY: `prog` is a live program until destroyed below; buffers are sized by the
            // matching *Size calls.
            let out = unsafe {
                let status = result::compile_program(prog, &opts);
                let log = result::get_program_log(prog)
                    .map(|l| c_chars_to_string(&l))
                    .unwrap_or_default();
                match status {
                    Err(e) => Err(format!("compilation failed ({e:?}) with {opts:?}:\n{log}")),
                    Ok(()) => {
                        let image = match kind {
                            ImageKind::Ptx => result::get_ptx(prog)
                                .map(|p| {
                                    let mut b: Vec<u8> = p.iter().map(|&c| c as u8).collect();
                                    if b.last() != Some(&0) {
                                        b.push(0);
                                    }
                                    b
                                })
                                .map_err(|e| format!("nvrtcGetPTX: {e:?}")),
                            ImageKind::Cubin => {
                                let mut n = 0usize;
                                let r = sys::nvrtcGetCUBINSize(prog, &mut n);
                                if r != sys::nvrtcResult::NVRTC_SUCCESS {
                                    Err(format!("nvrtcGetCUBINSize: {r:?}"))
                                } else {
                                    let mut b = vec![0u8; n];
                                    let r = sys::nvrtcGetCUBIN(prog, b.as_mut_ptr().cast());
                                    if r != sys::nvrtcResult::NVRTC_SUCCESS {
                                        Err(format!("nvrtcGetCUBIN: {r:?}"))
                                    } else {
                                        Ok(b)
                                    }
                                }
                            }
                        };
                        image.map(|image| Compiled {
                            image,
                            kind,
                            log,
                            cached: false,
                        })
                    }
                }
            };
            // SAFETY: destroyed exactly once.
            let _ = unsafe { result::destroy_program(prog) };
            out
        },
    )
    .and_then(|r| r)
    .map_err(|e| cuda_error(name, e))?;

    if let Some(f) = &cache_file {
        // Write-then-rename so a concurrent reader never sees a partial file.
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = f.with_extension(format!("{ext}.tmp{}", std::process::id()));
        if std::fs::write(&tmp, &compiled.image).is_ok() && std::fs::rename(&tmp, f).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(compiled)
}
