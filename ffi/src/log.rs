//! The log sink: the one piece of process-wide state (it must be installable before any
//! model or context exists). A lock-protected slot; the callback is called without the
//! lock held, so it may itself call into dvl.
//!
//! The engine crate never prints; its notices (shard mapping progress, the panel copy,
//! memory refusals) are `log` records of `dvl::…` targets, which [`Bridge`] hands to the
//! same callback. Without a callback nothing is written anywhere.

use std::ffi::c_void;
use std::sync::RwLock;

use crate::guard::c_string;
use crate::{dvl_log_callback, dvl_log_level};

#[derive(Clone, Copy)]
struct Sink {
    callback: unsafe extern "C" fn(dvl_log_level, *const std::ffi::c_char, *mut c_void),
    /// The caller's pointer, stored as an address: dvl never dereferences it.
    user_data: usize,
    min_level: u32,
}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Install (or with `None` remove) the log callback.
pub(crate) fn set(callback: dvl_log_callback, min_level: u32, user_data: *mut c_void) {
    let sink = callback.map(|callback| Sink {
        callback,
        user_data: user_data as usize,
        min_level,
    });
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = sink;
    // The bridge is installed once per process, with the first callback; where the host
    // program (a Rust one) installed its own `log` logger first, the engine's records go to
    // that logger instead and its level is left alone.
    static BRIDGE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ours = match sink {
        Some(_) => *BRIDGE.get_or_init(|| ::log::set_logger(&Bridge).is_ok()),
        None => BRIDGE.get().copied().unwrap_or(false),
    };
    if ours {
        // Records below what the callback wants are not even built (dependencies' trace
        // records included).
        ::log::set_max_level(sink.map_or(::log::LevelFilter::Off, |s| match s.min_level {
            0 => ::log::LevelFilter::Debug,
            1 => ::log::LevelFilter::Info,
            2 => ::log::LevelFilter::Warn,
            _ => ::log::LevelFilter::Error,
        }));
    }
}

/// The engine's `log` records to the callback, at the matching dvl_log_level.
struct Bridge;

fn level_of(level: ::log::Level) -> dvl_log_level {
    match level {
        ::log::Level::Error => dvl_log_level::DVL_LOG_ERROR,
        ::log::Level::Warn => dvl_log_level::DVL_LOG_WARN,
        ::log::Level::Info => dvl_log_level::DVL_LOG_INFO,
        ::log::Level::Debug | ::log::Level::Trace => dvl_log_level::DVL_LOG_DEBUG,
    }
}

impl ::log::Log for Bridge {
    fn enabled(&self, m: &::log::Metadata<'_>) -> bool {
        let sink = *SINK.read().unwrap_or_else(|e| e.into_inner());
        m.target().starts_with("dvl")
            && sink.is_some_and(|s| level_of(m.level()) as u32 >= s.min_level)
    }

    fn log(&self, r: &::log::Record<'_>) {
        // The slot is read once, by `log` below, which also checks the level: a second read
        // through `enabled` could see another callback than the one called.
        if r.target().starts_with("dvl") {
            log(level_of(r.level()), || r.args().to_string());
        }
    }

    fn flush(&self) {}
}

/// Send a message (built only if a sink wants it) to the installed callback.
pub(crate) fn log(level: dvl_log_level, message: impl FnOnce() -> String) {
    let sink = *SINK.read().unwrap_or_else(|e| e.into_inner());
    let Some(sink) = sink else {
        return;
    };
    if (level as u32) < sink.min_level {
        return;
    }
    let msg = c_string(&message());
    // SAFETY: the caller installed this callback and promised it may be called from any
    // thread with the user_data it gave, until it is replaced.
    unsafe { (sink.callback)(level, msg.as_ptr(), sink.user_data as *mut c_void) };
}
