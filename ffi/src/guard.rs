//! The boundary: every entry point runs inside [`run`], which catches panics, turns
//! failures into a [`dvl_status`], records the message for `dvl_last_error` and logs it.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::log::log;
use crate::{dvl_log_level, dvl_status};

/// A failed call: its status and the message `dvl_last_error` returns.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: dvl_status,
    pub message: String,
}

pub(crate) type Res<T = ()> = Result<T, Failure>;

impl Failure {
    pub fn new(status: dvl_status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new(dvl_status::DVL_ERR_INVALID_ARGUMENT, message)
    }

    /// A required pointer argument was NULL.
    pub fn null(what: &str) -> Self {
        Failure::invalid(format!("{what} is NULL"))
    }
}

/// The status of each engine error.
pub(crate) fn status_of(e: &dvl::Error) -> dvl_status {
    use dvl::Error as E;
    use dvl_status::*;
    match e {
        E::Config(_) => DVL_ERR_CONFIG,
        E::UnsupportedModel { .. } => DVL_ERR_UNSUPPORTED_MODEL,
        E::Truncated { .. } => DVL_ERR_TRUNCATED,
        E::BadHeader { .. } => DVL_ERR_BAD_HEADER,
        E::BadOffsets { .. } => DVL_ERR_BAD_OFFSETS,
        E::MissingTensor { .. } => DVL_ERR_MISSING_TENSOR,
        E::WrongShape { .. } => DVL_ERR_WRONG_SHAPE,
        E::WrongDtype { .. } => DVL_ERR_WRONG_DTYPE,
        E::Index(_) => DVL_ERR_INDEX,
        E::Io { .. } => DVL_ERR_IO,
        E::Tokenizer(_) => DVL_ERR_TOKENIZER,
        E::Image(_) => DVL_ERR_IMAGE,
        E::InvalidArgument(_) => DVL_ERR_INVALID_ARGUMENT,
        E::Cancelled => DVL_ERR_CANCELLED,
    }
}

impl From<dvl::Error> for Failure {
    fn from(e: dvl::Error) -> Self {
        Failure::new(status_of(&e), e.to_string())
    }
}

/// A C string for a message: interior NULs (never expected) become spaces.
pub(crate) fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

thread_local! {
    /// Message of the most recent failed call on this thread.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_thread_error(msg: &str) {
    let c = c_string(msg);
    // try_with: during thread teardown the slot may already be gone; the status still
    // reaches the caller.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// Pointer to this thread's last error message ("" if none). Valid until the next failing
/// call on this thread.
pub(crate) fn thread_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Run `body`, turning a panic into a `DVL_ERR_INTERNAL` failure.
pub(crate) fn catch<T>(body: impl FnOnce() -> Res<T>) -> Res<T> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(p) => Err(Failure::new(
            dvl_status::DVL_ERR_INTERNAL,
            format!("internal error (panic): {}", panic_message(&*p)),
        )),
    }
}

/// Run the body of entry point `func`: panics become `DVL_ERR_INTERNAL`, failures are
/// recorded for `dvl_last_error` and logged.
pub(crate) fn run(func: &'static str, body: impl FnOnce() -> Res) -> dvl_status {
    match catch(body) {
        Ok(()) => dvl_status::DVL_OK,
        Err(f) => {
            let msg = format!("{func}: {}", f.message);
            let level = match f.status {
                dvl_status::DVL_ERR_CANCELLED => dvl_log_level::DVL_LOG_INFO,
                _ => dvl_log_level::DVL_LOG_ERROR,
            };
            log(level, || msg.clone());
            set_thread_error(&msg);
            f.status
        }
    }
}

/// Run an entry point that returns a value and cannot fail; a panic yields `fallback`.
pub(crate) fn run_infallible<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_internal_and_sets_the_message() {
        let st = run("dvl_test", || panic!("boom {}", 42));
        assert_eq!(st, dvl_status::DVL_ERR_INTERNAL);
        let msg = unsafe { std::ffi::CStr::from_ptr(thread_error_ptr()) };
        let msg = msg.to_str().unwrap();
        assert!(msg.contains("dvl_test") && msg.contains("boom 42"), "{msg}");
    }

    #[test]
    fn every_engine_error_has_its_own_status() {
        use dvl::Error as E;
        let errs = [
            E::Config(String::new()),
            E::UnsupportedModel {
                model_type: String::new(),
                supported: &[],
            },
            E::Truncated {
                file: String::new(),
                needed: 0,
                actual: 0,
            },
            E::BadHeader {
                file: String::new(),
                detail: String::new(),
            },
            E::BadOffsets {
                file: String::new(),
                tensor: String::new(),
                detail: String::new(),
            },
            E::MissingTensor {
                tensor: String::new(),
            },
            E::WrongShape {
                tensor: String::new(),
                expected: vec![],
                found: vec![],
            },
            E::WrongDtype {
                tensor: String::new(),
                found: String::new(),
            },
            E::Index(String::new()),
            E::Io {
                path: String::new(),
                detail: String::new(),
            },
            E::Tokenizer(String::new()),
            E::Image(String::new()),
            E::InvalidArgument(String::new()),
            E::Cancelled,
        ];
        let mut seen: Vec<dvl_status> = errs.iter().map(status_of).collect();
        assert!(!seen.contains(&dvl_status::DVL_OK));
        seen.sort_by_key(|s| *s as i32);
        seen.dedup();
        assert_eq!(seen.len(), errs.len());
    }
}
