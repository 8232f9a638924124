//! The stable C ABI of dvl: `libdvl.a` / `libdvl.so`, declared by `include/dvl.h`.
//!
//! `include/dvl.h` is generated from this crate by cbindgen (`ffi/cbindgen.toml`): the doc
//! comments here are the header's documentation, and `tests/header.rs` fails when the
//! committed header drifts from the source. See `ffi/README.md` for the install story and
//! the lifetime and threading rules.
//!
//! Rules every entry point follows:
//! * it runs inside [`guard::run`]: no panic crosses the boundary (it becomes
//!   `DVL_ERR_INTERNAL`), and a failure's message is kept for `dvl_last_error`;
//! * pointers are checked for NULL, handles for their magic number, versioned structs for
//!   their `struct_size`, before anything is read through them;
//! * only `dvl_`-prefixed symbols are exported (checked by `scripts/ffi-check.sh`).
//!
//! The Safety contract of each `unsafe extern "C"` function is the C documentation above it
//! (valid, live pointers of the documented sizes), so the per-function `# Safety` sections
//! clippy asks for would only repeat it.
#![allow(non_camel_case_types, clippy::missing_safety_doc)]

mod guard;
mod log;

use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dvl::{
    CpuBackend, Engine, GenerateParams, ImageInput, LoadOptions, Request, Strategy, WeightLayout,
};

use guard::{run, run_infallible, Failure, Res};

// ---------------------------------------------------------------------------------------
// Versions and constants
// ---------------------------------------------------------------------------------------

/// ABI version of this header. It changes only on an incompatible change; appending fields
/// to a params struct or adding functions or status codes is compatible and keeps it.
/// Compare it with dvl_abi_version() at run time to detect a mismatched library.
pub const DVL_ABI_VERSION: u32 = 1;

/// The MASK token id: positions of the generated window that were never generated hold it
/// (dvl_context_get_ids).
pub const DVL_MASK_ID: u32 = 151_671;

/// The end-of-answer token id (`<|im_end|>`). The answer ends at its first occurrence.
pub const DVL_EOS_ID: u32 = 151_645;

/// The library's DVL_ABI_VERSION; equal to the header's when they match.
#[no_mangle]
pub extern "C" fn dvl_abi_version() -> u32 {
    run_infallible(DVL_ABI_VERSION, || DVL_ABI_VERSION)
}

/// The library's version, e.g. "0.1.0" (static storage; never NULL).
#[no_mangle]
pub extern "C" fn dvl_version_string() -> *const c_char {
    static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    run_infallible(VERSION.as_ptr().cast(), || VERSION.as_ptr().cast())
}

// ---------------------------------------------------------------------------------------
// Status codes and errors
// ---------------------------------------------------------------------------------------

/// Result of every fallible call. DVL_OK is 0; new codes may be added at the end, so treat
/// unknown non-zero values as errors. dvl_status_string() names a code, dvl_last_error()
/// gives the message of the failure.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum dvl_status {
    /// Success.
    DVL_OK = 0,
    /// A required pointer was NULL, a string was not UTF-8, or a value is out of range
    /// (gen_length, steps, threshold, strategy, n_threads...).
    DVL_ERR_INVALID_ARGUMENT = 1,
    /// A params or output struct's size is not one this library knows (struct_size not set
    /// with dvl_*_default_params(&p, sizeof p), or a header newer than the library).
    DVL_ERR_STRUCT_SIZE = 2,
    /// The caller's buffer is too small; the needed size was written to the length output.
    DVL_ERR_BUFFER_TOO_SMALL = 3,
    /// The handle is not a live handle of the expected kind (already freed, or another
    /// kind of handle).
    DVL_ERR_INVALID_HANDLE = 4,
    /// The context is generating (a concurrent or re-entrant call on the same context).
    DVL_ERR_BUSY = 5,
    /// No finished generation on this context (none yet, or the last one failed or was
    /// cancelled).
    DVL_ERR_NO_RESULT = 6,
    /// The generation was cancelled with dvl_context_cancel(); the context stays usable.
    DVL_ERR_CANCELLED = 7,
    /// A file or directory could not be read (message names the path).
    DVL_ERR_IO = 8,
    /// config.json is malformed or lacks a field.
    DVL_ERR_CONFIG = 9,
    /// config.json names a model type this library does not run.
    DVL_ERR_UNSUPPORTED_MODEL = 10,
    /// A safetensors shard is shorter than its header says.
    DVL_ERR_TRUNCATED = 11,
    /// A safetensors header is malformed.
    DVL_ERR_BAD_HEADER = 12,
    /// A tensor's data offsets are inconsistent.
    DVL_ERR_BAD_OFFSETS = 13,
    /// A tensor the config implies is missing.
    DVL_ERR_MISSING_TENSOR = 14,
    /// A tensor has the wrong shape for the config.
    DVL_ERR_WRONG_SHAPE = 15,
    /// A tensor is stored in an unsupported dtype (BF16, F16 and F32 are read).
    DVL_ERR_WRONG_DTYPE = 16,
    /// The shard index is inconsistent (or a tensor is in two shards).
    DVL_ERR_INDEX = 17,
    /// The tokenizer is missing, malformed or failed.
    DVL_ERR_TOKENIZER = 18,
    /// An image could not be decoded or is unusable.
    DVL_ERR_IMAGE = 19,
    /// A bug in dvl (an internal panic, caught at the boundary). Please report it.
    DVL_ERR_INTERNAL = 20,
}

/// A static, human-readable name of a status, e.g. "DVL_ERR_IO"; "DVL_ERR_UNKNOWN" for a
/// value that is no dvl_status. Never NULL.
#[no_mangle]
pub extern "C" fn dvl_status_string(status: i32) -> *const c_char {
    run_infallible(c"DVL_ERR_UNKNOWN".as_ptr(), || status_name(status).as_ptr())
}

fn status_name(status: i32) -> &'static CStr {
    use dvl_status::*;
    const ALL: [(dvl_status, &CStr); 21] = [
        (DVL_OK, c"DVL_OK"),
        (DVL_ERR_INVALID_ARGUMENT, c"DVL_ERR_INVALID_ARGUMENT"),
        (DVL_ERR_STRUCT_SIZE, c"DVL_ERR_STRUCT_SIZE"),
        (DVL_ERR_BUFFER_TOO_SMALL, c"DVL_ERR_BUFFER_TOO_SMALL"),
        (DVL_ERR_INVALID_HANDLE, c"DVL_ERR_INVALID_HANDLE"),
        (DVL_ERR_BUSY, c"DVL_ERR_BUSY"),
        (DVL_ERR_NO_RESULT, c"DVL_ERR_NO_RESULT"),
        (DVL_ERR_CANCELLED, c"DVL_ERR_CANCELLED"),
        (DVL_ERR_IO, c"DVL_ERR_IO"),
        (DVL_ERR_CONFIG, c"DVL_ERR_CONFIG"),
        (DVL_ERR_UNSUPPORTED_MODEL, c"DVL_ERR_UNSUPPORTED_MODEL"),
        (DVL_ERR_TRUNCATED, c"DVL_ERR_TRUNCATED"),
        (DVL_ERR_BAD_HEADER, c"DVL_ERR_BAD_HEADER"),
        (DVL_ERR_BAD_OFFSETS, c"DVL_ERR_BAD_OFFSETS"),
        (DVL_ERR_MISSING_TENSOR, c"DVL_ERR_MISSING_TENSOR"),
        (DVL_ERR_WRONG_SHAPE, c"DVL_ERR_WRONG_SHAPE"),
        (DVL_ERR_WRONG_DTYPE, c"DVL_ERR_WRONG_DTYPE"),
        (DVL_ERR_INDEX, c"DVL_ERR_INDEX"),
        (DVL_ERR_TOKENIZER, c"DVL_ERR_TOKENIZER"),
        (DVL_ERR_IMAGE, c"DVL_ERR_IMAGE"),
        (DVL_ERR_INTERNAL, c"DVL_ERR_INTERNAL"),
    ];
    ALL.iter()
        .find(|(s, _)| *s as i32 == status)
        .map_or(c"DVL_ERR_UNKNOWN", |(_, n)| n)
}

/// The message of the most recent failed call: with ctx non-NULL, the last failure of a
/// call on that context; with ctx NULL (or not a live context), the last failure of any
/// call on the calling thread. "" when there was none. Never NULL. The string stays valid
/// until the next failing call on the same context (or thread), or until the context is
/// freed.
#[no_mangle]
pub unsafe extern "C" fn dvl_last_error(ctx: *const dvl_context) -> *const c_char {
    run_infallible(guard::thread_error_ptr(), || {
        match unsafe { handle(ctx, "ctx") } {
            Ok(c) => lock(&c.0.error).as_ptr(),
            Err(_) => guard::thread_error_ptr(),
        }
    })
}

// ---------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------

/// Severity of a log message.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum dvl_log_level {
    DVL_LOG_DEBUG = 0,
    DVL_LOG_INFO = 1,
    DVL_LOG_WARN = 2,
    DVL_LOG_ERROR = 3,
}

/// Receives log messages: the level, a NUL-terminated UTF-8 message valid only during the
/// call, and the user_data given to dvl_log_set(). It may be called from any thread that
/// calls into dvl, concurrently; it must not unwind (C++ exceptions, longjmp).
pub type dvl_log_callback = Option<
    unsafe extern "C" fn(level: dvl_log_level, message: *const c_char, user_data: *mut c_void),
>;

/// Install the log callback, or remove it with NULL (the default: dvl logs nothing, and
/// never writes to stdout or stderr). Messages below min_level (a dvl_log_level) are not
/// built. Failures are logged at DVL_LOG_ERROR (cancellation at DVL_LOG_INFO) in addition to
/// their status. Loading reports its steps (each shard mapped, the panel copy) at
/// DVL_LOG_INFO for checkpoints over a GiB and DVL_LOG_DEBUG otherwise, and a panel copy
/// refused for lack of memory at DVL_LOG_WARN.
///
/// This is the library's only process-wide state: it may be called before any other call,
/// and from any thread. A message already being delivered on another thread may still
/// reach the previous callback after this returns.
#[no_mangle]
pub unsafe extern "C" fn dvl_log_set(
    callback: dvl_log_callback,
    min_level: u32,
    user_data: *mut c_void,
) -> dvl_status {
    run("dvl_log_set", || {
        if min_level > dvl_log_level::DVL_LOG_ERROR as u32 {
            return Err(Failure::invalid(format!(
                "min_level {min_level} is not a dvl_log_level (0..=3)"
            )));
        }
        log::set(callback, min_level, user_data);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Versioned structs
// ---------------------------------------------------------------------------------------

/// A struct that starts with `uint32_t struct_size` and only grows at the end.
trait Versioned: Sized {
    const NAME: &'static str;
    /// Size of the first published version: the smallest struct_size accepted.
    const MIN_SIZE: usize;
    fn defaults() -> Self;
    fn set_struct_size(&mut self, size: u32);
}

fn check_size<T: Versioned>(size: usize) -> Res<usize> {
    if size < T::MIN_SIZE || size > size_of::<T>() {
        return Err(Failure::new(
            dvl_status::DVL_ERR_STRUCT_SIZE,
            format!(
                "{} struct_size is {size}; this library accepts {}..={} (use sizeof and dvl_*_default_params)",
                T::NAME,
                T::MIN_SIZE,
                size_of::<T>()
            ),
        ));
    }
    Ok(size)
}

/// Read a caller's struct: NULL means the defaults; otherwise its first struct_size bytes
/// over the defaults (fields a older caller does not know keep their default).
unsafe fn read_versioned<T: Versioned>(p: *const T) -> Res<T> {
    let mut out = T::defaults();
    if p.is_null() {
        return Ok(out);
    }
    let size = check_size::<T>(unsafe { std::ptr::read_unaligned(p.cast::<u32>()) } as usize)?;
    // SAFETY: the caller's struct has struct_size readable bytes; every field of these
    // structs is an integer, a float, a pointer or an Option<fn>, valid for any bits.
    unsafe {
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&mut out as *mut T).cast::<u8>(), size)
    };
    Ok(out)
}

/// Write `value` to a caller's struct of `struct_size` bytes (its first struct_size bytes).
unsafe fn write_versioned<T: Versioned>(out: *mut T, struct_size: usize, mut value: T) -> Res {
    if out.is_null() {
        return Err(Failure::null("out"));
    }
    let size = check_size::<T>(struct_size)?;
    value.set_struct_size(size as u32);
    // SAFETY: the caller provides struct_size writable bytes at out.
    unsafe {
        std::ptr::copy_nonoverlapping((&value as *const T).cast::<u8>(), out.cast::<u8>(), size)
    };
    Ok(())
}

macro_rules! versioned {
    ($t:ty, $min:expr) => {
        impl Versioned for $t {
            const NAME: &'static str = stringify!($t);
            const MIN_SIZE: usize = $min;
            fn defaults() -> Self {
                <$t>::defaults_impl()
            }
            fn set_struct_size(&mut self, size: u32) {
                self.struct_size = size;
            }
        }
        const _: () = assert!(size_of::<$t>() >= $min);
    };
}

// ---------------------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------------------

/// Handles start with a magic number (at offset 0 of every handle kind, so that checking a
/// handle of the wrong kind reads inside its allocation); freeing clears it.
trait Handle {
    const MAGIC: u64;
    const KIND: &'static str;
}

const DEAD: u64 = 0;

unsafe fn handle<'a, T: Handle>(p: *const T, what: &str) -> Res<&'a T> {
    if p.is_null() {
        return Err(Failure::null(what));
    }
    if (p as usize) % std::mem::align_of::<u64>() != 0 {
        return Err(Failure::new(
            dvl_status::DVL_ERR_INVALID_HANDLE,
            format!("{what} is not a {} handle (misaligned pointer)", T::KIND),
        ));
    }
    // SAFETY: the caller passes a pointer to a live handle; every handle kind has its magic
    // at offset 0 (asserted below), so a handle of another kind is also read in bounds.
    let magic = unsafe { std::ptr::read_volatile(p.cast::<u64>()) };
    if magic != T::MAGIC {
        return Err(Failure::new(
            dvl_status::DVL_ERR_INVALID_HANDLE,
            format!(
                "{what} is not a live {} (freed, or another kind of handle)",
                T::KIND
            ),
        ));
    }
    Ok(unsafe { &*p })
}

/// Free a handle through the caller's variable, then set the variable to NULL. A NULL
/// variable is a no-op (so a second free through the same variable is harmless).
unsafe fn free_handle<T: Handle>(
    pp: *mut *mut T,
    what: &str,
    check: impl FnOnce(&T) -> Res,
) -> Res {
    if pp.is_null() {
        return Err(Failure::null(what));
    }
    let p = unsafe { *pp };
    if p.is_null() {
        return Ok(());
    }
    let h = unsafe { handle(p.cast_const(), "the handle") }?;
    check(h)?;
    unsafe {
        std::ptr::write_volatile(p.cast::<u64>(), DEAD);
        drop(Box::from_raw(p));
        *pp = std::ptr::null_mut();
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

unsafe fn out_ptr<T>(out: *mut *mut T, what: &str) -> Res<&'static mut *mut T> {
    if out.is_null() {
        return Err(Failure::null(what));
    }
    let o = unsafe { &mut *out };
    *o = std::ptr::null_mut();
    Ok(o)
}

// ---------------------------------------------------------------------------------------
// Strings and buffers
// ---------------------------------------------------------------------------------------

unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Res<&'a CStr> {
    if p.is_null() {
        return Err(Failure::null(what));
    }
    Ok(unsafe { CStr::from_ptr(p) })
}

unsafe fn utf8<'a>(p: *const c_char, what: &str) -> Res<&'a str> {
    unsafe { c_str(p, what) }?
        .to_str()
        .map_err(|e| Failure::invalid(format!("{what} is not valid UTF-8: {e}")))
}

unsafe fn path(p: *const c_char, what: &str) -> Res<PathBuf> {
    let s = unsafe { c_str(p, what) }?;
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        let _ = s;
        Ok(PathBuf::from(unsafe { utf8(p, what) }?))
    }
}

/// `size` bytes at `data` as a slice; NULL is allowed only for size 0.
unsafe fn bytes<'a>(data: *const c_void, size: usize, what: &str) -> Res<&'a [u8]> {
    if size == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(Failure::null(what));
    }
    if size > isize::MAX as usize {
        return Err(Failure::invalid(format!(
            "{what}: size {size} is too large"
        )));
    }
    Ok(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size) })
}

/// Copy `src` into a caller buffer of `cap` elements, writing the needed count to
/// `out_len` (if non-NULL) first. `terminate` adds a 0 element (C strings).
unsafe fn write_out<T: Copy + Default>(
    src: &[T],
    terminate: bool,
    buf: *mut T,
    cap: usize,
    out_len: *mut usize,
    what: &str,
) -> Res {
    if !out_len.is_null() {
        unsafe { *out_len = src.len() };
    }
    let need = src.len() + usize::from(terminate);
    if cap < need {
        return Err(Failure::new(
            dvl_status::DVL_ERR_BUFFER_TOO_SMALL,
            format!("{what}: buffer holds {cap} but {need} are needed"),
        ));
    }
    if buf.is_null() {
        return Err(Failure::null(what));
    }
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), buf, src.len());
        if terminate {
            *buf.add(src.len()) = T::default();
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------------------

/// Loaded weights and tokenizer. Read-only after loading: one model may be used by any
/// number of contexts on any threads at once. Contexts keep the weights alive, so the
/// model may be freed before its contexts.
pub struct dvl_model(ModelInner);

#[repr(C)]
struct ModelInner {
    magic: u64,
    engine: Arc<Engine>,
}

impl Handle for dvl_model {
    const MAGIC: u64 = u64::from_le_bytes(*b"dvlMODEL");
    const KIND: &'static str = "dvl_model";
}

/// Model loading options. Fill with dvl_model_default_params().
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct dvl_model_params {
    /// sizeof(dvl_model_params) of the caller's header; set by dvl_model_default_params().
    pub struct_size: u32,
    /// Reserved, must be 0 (keeps the 64-bit fields aligned).
    pub reserved: u32,
    /// Largest decoded image, in pixels (width * height), accepted from image files and
    /// encoded buffers; 0, the default, keeps the library's limit.
    pub max_image_pixels: u64,
    /// Largest image file or encoded buffer, in bytes; 0, the default, keeps the library's
    /// limit.
    pub max_image_bytes: u64,
    /// A dvl_weight_layout: how the text decoder's weights are held (default
    /// DVL_WEIGHTS_AUTO).
    pub weight_layout: u32,
    /// Reserved, must be 0.
    pub reserved2: u32,
    /// A directory for the on-disk panel cache (dvl_model_load() only), or NULL: where the
    /// text decoder's weights go into panels, a file per checkpoint there is mapped instead
    /// of repacking them, and written (the panels' size on disk) when missing or stale.
    /// NULL, the default, leaves it to the environment variable DVL_PANEL_CACHE (no cache
    /// when unset). Read during the call only.
    pub panel_cache_dir: *const c_char,
}

/// How a load holds the text decoder's bf16 weights (dvl_model_params.weight_layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum dvl_weight_layout {
    /// Repacked into 16-output panels where AVX2 is the CPU's best ISA and the copy fits in
    /// the memory available (the denoising step's kernels run faster on them), else as
    /// stored. The environment variable DVL_PACK=0 or DVL_PACK=1 overrides.
    DVL_WEIGHTS_AUTO = 0,
    /// Always repacked into panels: a copy of the text decoder's weights, about their size
    /// in the checkpoint (dvl_model_panel_bytes() tells).
    DVL_WEIGHTS_PANELS = 1,
    /// Read as stored, in the mapped files or the caller's buffers: nothing copied.
    DVL_WEIGHTS_AS_STORED = 2,
}

impl dvl_model_params {
    fn defaults_impl() -> Self {
        dvl_model_params {
            struct_size: size_of::<Self>() as u32,
            reserved: 0,
            max_image_pixels: 0,
            max_image_bytes: 0,
            weight_layout: dvl_weight_layout::DVL_WEIGHTS_AUTO as u32,
            reserved2: 0,
            panel_cache_dir: std::ptr::null(),
        }
    }

    /// The checked options: the weight layout to load with.
    fn validate(&self) -> Res<WeightLayout> {
        if self.reserved != 0 || self.reserved2 != 0 {
            return Err(Failure::invalid(
                "dvl_model_params.reserved and reserved2 must be 0",
            ));
        }
        match self.weight_layout {
            0 => Ok(WeightLayout::Auto),
            1 => Ok(WeightLayout::Panels),
            2 => Ok(WeightLayout::AsStored),
            l => Err(Failure::invalid(format!(
                "weight_layout {l} is not a dvl_weight_layout (0 auto, 1 panels, 2 as stored)"
            ))),
        }
    }

    /// Apply the options to a loaded engine.
    fn apply(&self, engine: &mut Engine) {
        if self.max_image_pixels != 0 {
            engine.decode_limits.max_pixels = self.max_image_pixels;
        }
        if self.max_image_bytes != 0 {
            engine.decode_limits.max_bytes = self.max_image_bytes;
        }
    }
}
versioned!(dvl_model_params, 24);

/// A caller-owned memory region.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct dvl_buffer {
    /// First byte (may be NULL only when size is 0).
    pub data: *const c_void,
    /// Length in bytes.
    pub size: usize,
}

/// Fill *out (of struct_size bytes, normally sizeof *out) with the default model params.
#[no_mangle]
pub unsafe extern "C" fn dvl_model_default_params(
    out: *mut dvl_model_params,
    struct_size: usize,
) -> dvl_status {
    run("dvl_model_default_params", || unsafe {
        write_versioned(out, struct_size, dvl_model_params::defaults())
    })
}

fn new_model(engine: Engine) -> *mut dvl_model {
    Box::into_raw(Box::new(dvl_model(ModelInner {
        magic: dvl_model::MAGIC,
        engine: Arc::new(engine),
    })))
}

/// Load a checkpoint directory as published: config.json, model.safetensors (or shards and
/// model.safetensors.index.json) and tokenizer.json. The weights are memory-mapped: the
/// files must not be modified while the model (or a context using it) is alive.
/// params may be NULL for the defaults. On success *out is a new model to free with
/// dvl_model_free(); on failure *out is NULL.
#[no_mangle]
pub unsafe extern "C" fn dvl_model_load(
    model_dir: *const c_char,
    params: *const dvl_model_params,
    out: *mut *mut dvl_model,
) -> dvl_status {
    run("dvl_model_load", || {
        let out = unsafe { out_ptr(out, "out") }?;
        let dir = unsafe { path(model_dir, "model_dir") }?;
        let p = unsafe { read_versioned::<dvl_model_params>(params) }?;
        let layout = p.validate()?;
        let panel_cache = if p.panel_cache_dir.is_null() {
            None
        } else {
            Some(unsafe { path(p.panel_cache_dir, "params->panel_cache_dir") }?)
        };
        let options = LoadOptions {
            layout,
            panel_cache,
            ..LoadOptions::default()
        };
        let mut engine = Engine::open_with(&dir, &options)?;
        p.apply(&mut engine);
        log::log(dvl_log_level::DVL_LOG_INFO, || {
            format!(
                "loaded {} ({} text layers, {})",
                dir.display(),
                engine.model.config.text.num_layers,
                layout_note(&engine)
            )
        });
        *out = new_model(engine);
        Ok(())
    })
}

/// Load a model from caller-owned memory: config_json (the bytes of config.json), n_shards
/// safetensors files (each a whole file's bytes) and, optionally, tokenizer_json (NULL for
/// none). The shards are read in place: they must stay valid and unchanged until the model
/// and every context created from it are freed. (Where AVX2 is the CPU's best ISA, the text
/// decoder's bf16 matrices are also repacked into an internal copy at load, for the AVX2
/// kernels; weight_layout = DVL_WEIGHTS_AS_STORED in params keeps them in place only.)
/// config_json and tokenizer_json are only read during the call. params may be NULL.
#[no_mangle]
pub unsafe extern "C" fn dvl_model_load_from_memory(
    config_json: *const dvl_buffer,
    shards: *const dvl_buffer,
    n_shards: usize,
    tokenizer_json: *const dvl_buffer,
    params: *const dvl_model_params,
    out: *mut *mut dvl_model,
) -> dvl_status {
    run("dvl_model_load_from_memory", || {
        let out = unsafe { out_ptr(out, "out") }?;
        if config_json.is_null() {
            return Err(Failure::null("config_json"));
        }
        let cfg = unsafe { *config_json };
        let cfg = unsafe { bytes(cfg.data, cfg.size, "config_json.data") }?;
        if shards.is_null() && n_shards > 0 {
            return Err(Failure::null("shards"));
        }
        if n_shards == 0 {
            return Err(Failure::invalid(
                "n_shards is 0: at least one shard is needed",
            ));
        }
        let list = unsafe { std::slice::from_raw_parts(shards, n_shards) };
        let mut named: Vec<(String, dvl::ShardBytes<'static>)> = Vec::with_capacity(n_shards);
        for (i, b) in list.iter().enumerate() {
            // SAFETY: the caller promises the shard outlives the model (documented above);
            // the engine needs 'static because the model may be shared freely.
            let s: &'static [u8] = unsafe { bytes(b.data, b.size, &format!("shards[{i}].data")) }?;
            named.push((format!("shard {i}"), Box::new(s)));
        }
        let p = unsafe { read_versioned::<dvl_model_params>(params) }?;
        let layout = p.validate()?;
        let tok = if tokenizer_json.is_null() {
            None
        } else {
            let t = unsafe { *tokenizer_json };
            Some(unsafe { bytes(t.data, t.size, "tokenizer_json.data") }?)
        };
        let mut engine = Engine::from_parts_with_layout(cfg, named, tok, layout)?;
        p.apply(&mut engine);
        log::log(dvl_log_level::DVL_LOG_INFO, || {
            format!(
                "loaded a model from {n_shards} memory buffer(s) ({})",
                layout_note(&engine)
            )
        });
        *out = new_model(engine);
        Ok(())
    })
}

/// Free a model: *model is released and set to NULL. Contexts created from it stay usable
/// (they keep the weights alive). NULL *model is a no-op (DVL_OK), so freeing twice through
/// the same variable is harmless; model itself must not be NULL.
#[no_mangle]
pub unsafe extern "C" fn dvl_model_free(model: *mut *mut dvl_model) -> dvl_status {
    run("dvl_model_free", || unsafe {
        free_handle(model, "model", |_| Ok(()))
    })
}

/// The text of one token (special tokens and MASK give ""), written NUL-terminated to buf
/// of buf_size bytes. *out_len (if out_len is non-NULL) receives the text's length in bytes
/// without the NUL, also on DVL_ERR_BUFFER_TOO_SMALL, so a call with buf = NULL, buf_size =
/// 0 asks for the size.
#[no_mangle]
pub unsafe extern "C" fn dvl_model_token_text(
    model: *const dvl_model,
    token: u32,
    buf: *mut c_char,
    buf_size: usize,
    out_len: *mut usize,
) -> dvl_status {
    run("dvl_model_token_text", || {
        let m = unsafe { handle(model, "model") }?;
        let text = m.0.engine.tokenizer()?.token_text(token);
        let src: &[c_char] =
            unsafe { std::slice::from_raw_parts(text.as_ptr().cast(), text.len()) };
        unsafe { write_out(src, true, buf, buf_size, out_len, "buf") }
    })
}

/// The bytes of model's panel copy of the text decoder's weights (memory on top of the
/// checkpoint; see dvl_weight_layout) in *out: 0 where the weights are read as stored.
#[no_mangle]
pub unsafe extern "C" fn dvl_model_panel_bytes(
    model: *const dvl_model,
    out: *mut u64,
) -> dvl_status {
    run("dvl_model_panel_bytes", || {
        let m = unsafe { handle(model, "model") }?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        unsafe { *out = m.0.engine.panel_cost().map_or(0, |c| c.bytes) };
        Ok(())
    })
}

/// The load log's words on the weight layout.
fn layout_note(engine: &Engine) -> String {
    match engine.panel_cost() {
        Some(c) => format!("text weights in panels: {c}"),
        None => "text weights read as stored".to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Contexts
// ---------------------------------------------------------------------------------------

/// The state of one generation at a time on one model: its worker threads, scratch and
/// KV cache, the last result and the last error. Use a context from one thread at a time
/// (a concurrent dvl_generate() returns DVL_ERR_BUSY); only dvl_context_cancel() may be
/// called from other threads while it generates.
pub struct dvl_context(ContextInner);

#[repr(C)]
struct ContextInner {
    magic: u64,
    engine: Arc<Engine>,
    backend: CpuBackend,
    n_threads: usize,
    cancel: AtomicBool,
    busy: AtomicBool,
    result: Mutex<Option<Finished>>,
    error: Mutex<CString>,
}

impl Handle for dvl_context {
    const MAGIC: u64 = u64::from_le_bytes(*b"dvlCTXT_");
    const KIND: &'static str = "dvl_context";
}

impl dvl_context {
    /// Keep a failure's message as this context's last error.
    fn record<T>(&self, r: Res<T>) -> Res<T> {
        if let Err(f) = &r {
            *lock(&self.0.error) = guard::c_string(&f.message);
        }
        r
    }
}

/// A finished generation.
struct Finished {
    ids: Vec<u32>,
    text: String,
    stats: dvl_generation_stats,
}

/// Context options. Fill with dvl_context_default_params().
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct dvl_context_params {
    /// sizeof(dvl_context_params) of the caller's header; set by
    /// dvl_context_default_params().
    pub struct_size: u32,
    /// Worker threads of this context (its own pool; 0, the default, = one per core).
    /// Results do not depend on it.
    pub n_threads: u32,
    /// 1: round matmul inputs to bf16 and run the matmuls on AMX tiles, or with AVX512_BF16
    /// dot products, where the CPU has them (the CLI's --bf16): faster, hidden states move by
    /// ~1e-3 and the golden traces stay identical. 0 (the default): f32 activations, within
    /// 1e-7 of the float64 references. Other values are rejected. Added after the first
    /// release: callers with an older header (smaller struct_size) get 0.
    pub bf16_matmul: u32,
}

impl dvl_context_params {
    fn defaults_impl() -> Self {
        dvl_context_params {
            struct_size: size_of::<Self>() as u32,
            n_threads: 0,
            bf16_matmul: 0,
        }
    }
}
versioned!(dvl_context_params, 8);

/// Most worker threads a context accepts.
const MAX_THREADS: u32 = 1024;

/// Fill *out (of struct_size bytes, normally sizeof *out) with the default context params.
#[no_mangle]
pub unsafe extern "C" fn dvl_context_default_params(
    out: *mut dvl_context_params,
    struct_size: usize,
) -> dvl_status {
    run("dvl_context_default_params", || unsafe {
        write_versioned(out, struct_size, dvl_context_params::defaults())
    })
}

/// Create a context on a model (params may be NULL for the defaults). On success *out is a
/// new context to free with dvl_context_free(); on failure *out is NULL.
#[no_mangle]
pub unsafe extern "C" fn dvl_context_new(
    model: *const dvl_model,
    params: *const dvl_context_params,
    out: *mut *mut dvl_context,
) -> dvl_status {
    run("dvl_context_new", || {
        let out = unsafe { out_ptr(out, "out") }?;
        let m = unsafe { handle(model, "model") }?;
        let p = unsafe { read_versioned(params) }?;
        if p.n_threads > MAX_THREADS {
            return Err(Failure::invalid(format!(
                "n_threads {} exceeds {MAX_THREADS}",
                p.n_threads
            )));
        }
        if p.bf16_matmul > 1 {
            return Err(Failure::invalid(format!(
                "bf16_matmul {} is neither 0 nor 1",
                p.bf16_matmul
            )));
        }
        let backend = CpuBackend::with_threads(p.n_threads as usize)?.with_bf16(p.bf16_matmul == 1);
        let n_threads = backend.threads();
        let kernels = backend.describe();
        log::log(dvl_log_level::DVL_LOG_DEBUG, || {
            format!("context created with {n_threads} thread(s), kernels {kernels}")
        });
        *out = Box::into_raw(Box::new(dvl_context(ContextInner {
            magic: dvl_context::MAGIC,
            engine: Arc::clone(&m.0.engine),
            backend,
            n_threads,
            cancel: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            result: Mutex::new(None),
            error: Mutex::new(CString::default()),
        })));
        Ok(())
    })
}

/// Free a context: *ctx is released and set to NULL. NULL *ctx is a no-op (DVL_OK);
/// a context that is generating is not freed (DVL_ERR_BUSY).
#[no_mangle]
pub unsafe extern "C" fn dvl_context_free(ctx: *mut *mut dvl_context) -> dvl_status {
    run("dvl_context_free", || unsafe {
        free_handle(ctx, "ctx", |c: &dvl_context| {
            if c.0.busy.load(Ordering::SeqCst) {
                return Err(Failure::new(
                    dvl_status::DVL_ERR_BUSY,
                    "the context is generating; cancel it and wait for dvl_generate to return",
                ));
            }
            Ok(())
        })
    })
}

/// Ask the generation running on ctx to stop. Thread-safe: call it from any thread, or from
/// the token callback. The generation stops before its next denoising step and
/// dvl_generate() returns DVL_ERR_CANCELLED; the context stays usable. A request made while
/// no generation runs has no effect (each dvl_generate() starts uncancelled).
#[no_mangle]
pub unsafe extern "C" fn dvl_context_cancel(ctx: *const dvl_context) -> dvl_status {
    run("dvl_context_cancel", || {
        let c = unsafe { handle(ctx, "ctx") }?;
        c.0.cancel.store(true, Ordering::SeqCst);
        Ok(())
    })
}

/// The number of worker threads ctx runs (n_threads resolved), in *out.
#[no_mangle]
pub unsafe extern "C" fn dvl_context_n_threads(
    ctx: *const dvl_context,
    out: *mut u32,
) -> dvl_status {
    run("dvl_context_n_threads", || {
        let c = unsafe { handle(ctx, "ctx") }?;
        if out.is_null() {
            return c.record(Err(Failure::null("out")));
        }
        unsafe { *out = c.0.n_threads as u32 };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------------------

/// A question and the images it is about. Build it with dvl_prompt_new() and the
/// dvl_prompt_add_image_* calls (images are in prompt order); it can be used by any number
/// of generations, also concurrently, while it is not modified or freed.
pub struct dvl_prompt(PromptInner);

#[repr(C)]
struct PromptInner {
    magic: u64,
    request: Request,
}

impl Handle for dvl_prompt {
    const MAGIC: u64 = u64::from_le_bytes(*b"dvlPRMPT");
    const KIND: &'static str = "dvl_prompt";
}

unsafe fn prompt_mut<'a>(p: *mut dvl_prompt) -> Res<&'a mut dvl_prompt> {
    unsafe { handle(p.cast_const(), "prompt") }?;
    Ok(unsafe { &mut *p })
}

/// Create a prompt from a UTF-8 question (copied). The chat template is applied at
/// generation, with one image tag per added image. On success *out is a new prompt to free
/// with dvl_prompt_free(); on failure *out is NULL.
#[no_mangle]
pub unsafe extern "C" fn dvl_prompt_new(
    text: *const c_char,
    out: *mut *mut dvl_prompt,
) -> dvl_status {
    run("dvl_prompt_new", || {
        let out = unsafe { out_ptr(out, "out") }?;
        let text = unsafe { utf8(text, "text") }?;
        *out = Box::into_raw(Box::new(dvl_prompt(PromptInner {
            magic: dvl_prompt::MAGIC,
            request: Request::new(text),
        })));
        Ok(())
    })
}

/// With raw non-zero the text is used as the complete prompt (template already applied,
/// `<image>` where each image goes) instead of a question; 0 (the default) restores that.
#[no_mangle]
pub unsafe extern "C" fn dvl_prompt_set_raw(prompt: *mut dvl_prompt, raw: u32) -> dvl_status {
    run("dvl_prompt_set_raw", || {
        let p = unsafe { prompt_mut(prompt) }?;
        p.0.request.raw_prompt = raw != 0;
        Ok(())
    })
}

/// Add a JPEG or PNG file (the path is copied; the file is read by dvl_generate(), whose
/// status reports a missing or undecodable file: DVL_ERR_IO or DVL_ERR_IMAGE).
#[no_mangle]
pub unsafe extern "C" fn dvl_prompt_add_image_file(
    prompt: *mut dvl_prompt,
    file_path: *const c_char,
) -> dvl_status {
    run("dvl_prompt_add_image_file", || {
        let p = unsafe { prompt_mut(prompt) }?;
        let f = unsafe { path(file_path, "file_path") }?;
        p.0.request.images.push(ImageInput::Path(f));
        Ok(())
    })
}

/// Add JPEG or PNG bytes (copied during the call; decoded by dvl_generate()).
#[no_mangle]
pub unsafe extern "C" fn dvl_prompt_add_image_encoded(
    prompt: *mut dvl_prompt,
    data: *const u8,
    size: usize,
) -> dvl_status {
    run("dvl_prompt_add_image_encoded", || {
        let p = unsafe { prompt_mut(prompt) }?;
        let b = unsafe { bytes(data.cast(), size, "data") }?;
        if b.is_empty() {
            return Err(Failure::invalid("size is 0: no image bytes"));
        }
        p.0.request.images.push(ImageInput::Encoded(b.to_vec()));
        Ok(())
    })
}

/// Add decoded pixels: height rows of width RGB8 pixels (3 bytes each, R first), row r
/// starting at pixels + r * stride (stride >= 3 * width; 0 means 3 * width). The pixels
/// are copied during the call. The readable size is stride * (height - 1) + 3 * width.
/// A zero side or a too small stride gives DVL_ERR_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn dvl_prompt_add_image_rgb8(
    prompt: *mut dvl_prompt,
    pixels: *const u8,
    width: u32,
    height: u32,
    stride: usize,
) -> dvl_status {
    run("dvl_prompt_add_image_rgb8", || {
        let p = unsafe { prompt_mut(prompt) }?;
        let (w, h) = (width as usize, height as usize);
        let row = 3 * w;
        let stride = if stride == 0 { row } else { stride };
        // The bytes the caller promised; for a geometry RgbImage::from_rgb8 rejects (a zero
        // side, stride < 3 * width) nothing is read and it reports the error.
        let len = if w == 0 || h == 0 || stride < row {
            0
        } else {
            stride
                .checked_mul(h - 1)
                .and_then(|n| n.checked_add(row))
                .ok_or_else(|| Failure::invalid("stride * height overflows"))?
        };
        let data = unsafe { bytes(pixels.cast(), len, "pixels") }?;
        let img = dvl::images::RgbImage::from_rgb8(w, h, stride, data)?;
        p.0.request.images.push(ImageInput::Rgb(img));
        Ok(())
    })
}

/// Free a prompt: *prompt is released and set to NULL; NULL *prompt is a no-op (DVL_OK).
#[no_mangle]
pub unsafe extern "C" fn dvl_prompt_free(prompt: *mut *mut dvl_prompt) -> dvl_status {
    run("dvl_prompt_free", || unsafe {
        free_handle(prompt, "prompt", |_| Ok(()))
    })
}

// ---------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------

/// Which masked positions a denoising step commits (the CLI's --strategy).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum dvl_strategy {
    /// The most confident positions, as many as the step's schedule says ("static").
    DVL_STRATEGY_LOW_CONFIDENCE_STATIC = 0,
    /// Every position above threshold if at least that many, else as static ("dynamic").
    DVL_STRATEGY_LOW_CONFIDENCE_DYNAMIC = 1,
}

/// Called as each position of the answer window is committed, in commit order (which is
/// not left to right: a UI can reveal tokens out of order). position is the index in the
/// generated window (0 .. gen_length-1), token the id, piece its text (NUL-terminated UTF-8,
/// "" for special tokens; valid only during the call; a character split across tokens may
/// show as U+FFFD: the final text from dvl_context_get_text() is authoritative). Positions
/// after the first DVL_EOS_ID are not part of the answer. Called on the thread that runs
/// dvl_generate(); it may call dvl_context_cancel() and must not unwind.
pub type dvl_token_callback = Option<
    unsafe extern "C" fn(position: u32, token: u32, piece: *const c_char, user_data: *mut c_void),
>;

/// Decoding parameters, mirroring the CLI's flags. Fill with dvl_generate_default_params()
/// (the reference evaluation's settings) and change what you need.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct dvl_generate_params {
    /// sizeof(dvl_generate_params) of the caller's header; set by
    /// dvl_generate_default_params().
    pub struct_size: u32,
    /// Answer window length in tokens (--gen-length, default 128, at most 8192).
    pub gen_length: u32,
    /// Denoising steps per block (--steps, default 8).
    pub steps: u32,
    /// Block size (--block-size); 0, the default, uses the checkpoint's.
    pub block_size: u32,
    /// A dvl_strategy (--strategy, default DVL_STRATEGY_LOW_CONFIDENCE_STATIC).
    pub strategy: u32,
    /// Confidence threshold of the dynamic strategy (--threshold, default 0.85).
    pub threshold: f32,
    /// Sampling temperature; 0, the default, is greedy (--temperature).
    pub temperature: f32,
    /// Top-k sampling cut-off; 0 = off (--top-k).
    pub top_k: u32,
    /// Nucleus sampling mass in (0, 1] (--top-p, default 1).
    pub top_p: f32,
    /// Non-zero (the default) fuses each block's commit pass with the next block's first
    /// step: same tokens, one forward fewer per block (0 is the CLI's --no-fuse-commit).
    pub fuse_commit: u32,
    /// Seed of the sampling stream (--seed).
    pub seed: u64,
    /// Streaming callback, or NULL.
    pub on_token: dvl_token_callback,
    /// Passed to on_token.
    pub user_data: *mut c_void,
}

impl dvl_generate_params {
    fn defaults_impl() -> Self {
        let d = GenerateParams::default();
        dvl_generate_params {
            struct_size: size_of::<Self>() as u32,
            gen_length: d.gen_length as u32,
            steps: d.steps as u32,
            block_size: d.block_size.unwrap_or(0) as u32,
            strategy: strategy_code(d.strategy) as u32,
            threshold: d.threshold,
            temperature: d.temperature,
            top_k: d.top_k as u32,
            top_p: d.top_p,
            fuse_commit: u32::from(d.fuse_commit),
            seed: d.seed,
            on_token: None,
            user_data: std::ptr::null_mut(),
        }
    }

    fn to_engine(self) -> Res<GenerateParams> {
        let strategy = match self.strategy {
            0 => Strategy::LowConfidenceStatic,
            1 => Strategy::LowConfidenceDynamic,
            s => {
                return Err(Failure::invalid(format!(
                    "strategy {s} is not a dvl_strategy (0 static, 1 dynamic)"
                )))
            }
        };
        let p = GenerateParams {
            gen_length: self.gen_length as usize,
            steps: self.steps as usize,
            block_size: (self.block_size != 0).then_some(self.block_size as usize),
            strategy,
            threshold: self.threshold,
            temperature: self.temperature,
            top_k: self.top_k as usize,
            top_p: self.top_p,
            seed: self.seed,
            fuse_commit: self.fuse_commit != 0,
        };
        p.validate()?;
        Ok(p)
    }
}
versioned!(dvl_generate_params, 64);

fn strategy_code(s: Strategy) -> dvl_strategy {
    match s {
        Strategy::LowConfidenceStatic => dvl_strategy::DVL_STRATEGY_LOW_CONFIDENCE_STATIC,
        Strategy::LowConfidenceDynamic => dvl_strategy::DVL_STRATEGY_LOW_CONFIDENCE_DYNAMIC,
    }
}

/// Fill *out (of struct_size bytes, normally sizeof *out) with the default generation
/// params: the reference evaluation's settings, as the CLI's defaults.
#[no_mangle]
pub unsafe extern "C" fn dvl_generate_default_params(
    out: *mut dvl_generate_params,
    struct_size: usize,
) -> dvl_status {
    run("dvl_generate_default_params", || unsafe {
        write_versioned(out, struct_size, dvl_generate_params::defaults())
    })
}

/// Statistics of the last finished generation (dvl_context_get_stats()).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct dvl_generation_stats {
    /// Bytes of this struct that were written.
    pub struct_size: u32,
    /// Prompt rows (text and image tokens).
    pub prompt_rows: u32,
    /// Prompt token ids, image placeholders included.
    pub n_prompt_ids: u32,
    /// Rows of image features spliced into the prompt.
    pub n_image_tokens: u32,
    /// Length of the generated window (gen_length); see dvl_context_get_ids().
    pub n_ids: u32,
    /// Forward passes of the reference schedule.
    pub forward_passes: u32,
    /// Model invocations actually run (fewer with fuse_commit).
    pub forward_calls: u32,
    /// Non-zero when decoding stopped at a block holding DVL_EOS_ID.
    pub stopped_at_eos: u32,
    /// Image decoding and preprocessing, in milliseconds.
    pub preprocess_ms: f64,
    /// Vision encoder.
    pub vision_ms: f64,
    /// Prompt prefill.
    pub prefill_ms: f64,
    /// Denoising.
    pub decode_ms: f64,
    /// The whole call.
    pub total_ms: f64,
}

impl dvl_generation_stats {
    fn defaults_impl() -> Self {
        dvl_generation_stats {
            struct_size: size_of::<Self>() as u32,
            ..Default::default()
        }
    }
}
versioned!(dvl_generation_stats, 72);

/// Clears the context's busy flag however the generation ends (panics included).
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Streams commits to the C callback and answers the decoder's cancellation polls.
struct Streamer<'a> {
    cancel: &'a AtomicBool,
    tokenizer: Option<&'a dvl::tokenizer::Tokenizer>,
    on_token: dvl_token_callback,
    user_data: *mut c_void,
    gen_length: usize,
}

impl dvl::Observer for Streamer<'_> {
    fn on_commit(&mut self, _pos: usize, gen_index: usize, token: u32) {
        // Rows past gen_length only pad the last block; they are not part of the window.
        if gen_index >= self.gen_length {
            return;
        }
        if let Some(cb) = self.on_token {
            let piece = self
                .tokenizer
                .map(|t| t.token_text(token))
                .unwrap_or_default();
            let piece = guard::c_string(&piece);
            // SAFETY: the caller's callback and user_data, called as documented.
            unsafe { cb(gen_index as u32, token, piece.as_ptr(), self.user_data) };
        }
    }

    fn cancelled(&mut self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// Answer prompt on ctx with params (NULL for the defaults): blocks until the answer is
/// complete, streaming committed tokens to params->on_token. Afterwards the answer is read
/// with dvl_context_get_text(), dvl_context_get_ids() and dvl_context_get_stats(). Returns
/// DVL_ERR_CANCELLED if dvl_context_cancel() stopped it, DVL_ERR_BUSY if ctx is already
/// generating. Any other failure clears the previous result (the getters return
/// DVL_ERR_NO_RESULT until the next success).
#[no_mangle]
pub unsafe extern "C" fn dvl_generate(
    ctx: *mut dvl_context,
    prompt: *const dvl_prompt,
    params: *const dvl_generate_params,
) -> dvl_status {
    run("dvl_generate", || {
        let c = unsafe { handle(ctx.cast_const(), "ctx") }?;
        // Catch here too, so that even a panic is kept as this context's last error.
        c.record(guard::catch(|| unsafe { generate(c, prompt, params) }))
    })
}

unsafe fn generate(
    c: &dvl_context,
    prompt: *const dvl_prompt,
    params: *const dvl_generate_params,
) -> Res {
    let c = &c.0;
    if c.busy
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(Failure::new(
            dvl_status::DVL_ERR_BUSY,
            "the context is already generating (use one context per concurrent generation)",
        ));
    }
    let _busy = Busy(&c.busy);
    *lock(&c.result) = None;
    let prompt = unsafe { handle(prompt, "prompt") }?;
    let raw = unsafe { read_versioned(params) }?;
    let gp = raw.to_engine()?;
    c.cancel.store(false, Ordering::SeqCst);
    let mut streamer = Streamer {
        cancel: &c.cancel,
        tokenizer: c.engine.tokenizer().ok(),
        on_token: raw.on_token,
        user_data: raw.user_data,
        gen_length: gp.gen_length,
    };
    let r = c
        .engine
        .generate(&c.backend, &prompt.0.request, &gp, &mut streamer);
    c.cancel.store(false, Ordering::SeqCst);
    let g = r?;
    let o = &g.output;
    let t = &g.timings;
    let stats = dvl_generation_stats {
        struct_size: size_of::<dvl_generation_stats>() as u32,
        prompt_rows: o.prompt_rows as u32,
        n_prompt_ids: g.prompt_ids.len() as u32,
        n_image_tokens: g.image_tokens as u32,
        n_ids: o.ids.len() as u32,
        forward_passes: o.forward_passes as u32,
        forward_calls: o.forward_calls as u32,
        stopped_at_eos: u32::from(o.stopped_at_eos),
        preprocess_ms: t.preprocess_ms,
        vision_ms: t.vision_ms,
        prefill_ms: t.prefill_ms,
        decode_ms: t.decode_ms,
        total_ms: t.total_ms,
    };
    log::log(dvl_log_level::DVL_LOG_INFO, || {
        format!(
            "generated {} positions: {} prompt rows, {} forward passes, {:.1} ms",
            o.ids.len(),
            o.prompt_rows,
            o.forward_passes,
            t.total_ms
        )
    });
    *lock(&c.result) = Some(Finished {
        ids: g.output.ids,
        text: g.text,
        stats,
    });
    Ok(())
}

/// Run `f` on the context's last finished generation.
unsafe fn with_result(
    ctx: *const dvl_context,
    f: impl FnOnce(&dvl_context, &Finished) -> Res,
) -> Res {
    let c = unsafe { handle(ctx, "ctx") }?;
    let r = {
        let res = lock(&c.0.result);
        match res.as_ref() {
            Some(fin) => f(c, fin),
            None => Err(Failure::new(
                dvl_status::DVL_ERR_NO_RESULT,
                "no finished generation on this context",
            )),
        }
    };
    c.record(r)
}

/// The answer text of the last finished generation (cut at EOS, special tokens dropped),
/// NUL-terminated UTF-8 in buf of buf_size bytes. *out_len (if non-NULL) receives its
/// length in bytes without the NUL, also on DVL_ERR_BUFFER_TOO_SMALL (call with buf = NULL,
/// buf_size = 0 to ask for the size).
#[no_mangle]
pub unsafe extern "C" fn dvl_context_get_text(
    ctx: *const dvl_context,
    buf: *mut c_char,
    buf_size: usize,
    out_len: *mut usize,
) -> dvl_status {
    run("dvl_context_get_text", || unsafe {
        with_result(ctx, |_, fin| {
            let src: &[c_char] =
                std::slice::from_raw_parts(fin.text.as_ptr().cast(), fin.text.len());
            write_out(src, true, buf, buf_size, out_len, "buf")
        })
    })
}

/// The generated window of the last finished generation: gen_length ids exactly as the
/// CLI's --json "ids" (DVL_MASK_ID where never generated; the answer ends at the first
/// DVL_EOS_ID). Written to ids (capacity elements); *out_n (if non-NULL) receives the
/// count, also on DVL_ERR_BUFFER_TOO_SMALL.
#[no_mangle]
pub unsafe extern "C" fn dvl_context_get_ids(
    ctx: *const dvl_context,
    ids: *mut u32,
    capacity: usize,
    out_n: *mut usize,
) -> dvl_status {
    run("dvl_context_get_ids", || unsafe {
        with_result(ctx, |_, fin| {
            write_out(&fin.ids, false, ids, capacity, out_n, "ids")
        })
    })
}

/// Statistics of the last finished generation, written to *out (of struct_size bytes,
/// normally sizeof *out).
#[no_mangle]
pub unsafe extern "C" fn dvl_context_get_stats(
    ctx: *const dvl_context,
    out: *mut dvl_generation_stats,
    struct_size: usize,
) -> dvl_status {
    run("dvl_context_get_stats", || unsafe {
        with_result(ctx, |_, fin| write_versioned(out, struct_size, fin.stats))
    })
}

// ---------------------------------------------------------------------------------------
// Compile-time checks
// ---------------------------------------------------------------------------------------

// Every handle kind has its magic at offset 0 (see `handle`).
const _: () = {
    assert!(offset_of!(dvl_model, 0) == 0 && offset_of!(ModelInner, magic) == 0);
    assert!(offset_of!(dvl_context, 0) == 0 && offset_of!(ContextInner, magic) == 0);
    assert!(offset_of!(dvl_prompt, 0) == 0 && offset_of!(PromptInner, magic) == 0);
};

// A model is shared across threads; a context is cancelled from other threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Engine>();
    send_sync::<CpuBackend>();
    send_sync::<ContextInner>();
    send_sync::<Request>();
};
