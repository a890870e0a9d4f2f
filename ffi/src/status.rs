//! Status codes, their descriptions, and the per-thread detail of the last failure.
//!
//! The constants are the rows of [`knit_core::status::STATUS_TABLE`], spelled out so that
//! cbindgen can emit them as `#define`s; the test at the bottom fails if a row is added,
//! removed or renumbered without updating this list. The strings come from the table itself.

use knit_core::status::{StatusInfo, STATUS_TABLE};
use knit_core::Status;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::sync::OnceLock;

/// A knit status code: `KNIT_OK` (0) or an error (> 0). Codes are stable.
pub type knit_status_t = i32;

/// success
pub const KNIT_OK: knit_status_t = 0;
/// invalid argument (NULL handle, empty name, bad option)
pub const KNIT_INVALID_ARGUMENT: knit_status_t = 1;
/// no server offers the method within the wait
pub const KNIT_NO_SERVER: knit_status_t = 3;
/// no reply within the timeout
pub const KNIT_TIMEOUT: knit_status_t = 4;
/// the remote method failed
pub const KNIT_METHOD_FAILED: knit_status_t = 5;
/// the gateway cannot be reached
pub const KNIT_GATEWAY_UNREACHABLE: knit_status_t = 6;
/// permission denied
pub const KNIT_PERMISSION_DENIED: knit_status_t = 7;
/// bad input (invalid JSON or value)
pub const KNIT_BAD_INPUT: knit_status_t = 8;
/// payload larger than the gateway allows
pub const KNIT_PAYLOAD_TOO_LARGE: knit_status_t = 9;
/// peer has left while waiting for result
pub const KNIT_PEER_LEFT: knit_status_t = 10;
/// the connection to the gateway is closed
pub const KNIT_DISCONNECTED: knit_status_t = 11;
/// already exists (e.g. a method name registered twice)
pub const KNIT_ALREADY_EXISTS: knit_status_t = 12;
/// no such item (method, peer, context, subscription)
pub const KNIT_NOT_FOUND: knit_status_t = 13;
/// the handle is closed
pub const KNIT_CLOSED: knit_status_t = 14;
/// protocol violation or corrupt shared memory from a peer
pub const KNIT_PROTOCOL: knit_status_t = 15;
/// internal error (a bug in knit)
pub const KNIT_INTERNAL: knit_status_t = 16;
/// another gateway already answers on this socket
pub const KNIT_ALREADY_RUNNING: knit_status_t = 17;
/// resource exhausted or peer not keeping up
pub const KNIT_BUSY: knit_status_t = 18;

/// Every exported constant with its table name, for the consistency test.
#[cfg(test)]
const EXPORTED: &[(&str, knit_status_t)] = &[
    ("OK", KNIT_OK),
    ("INVALID_ARGUMENT", KNIT_INVALID_ARGUMENT),
    ("NO_SERVER", KNIT_NO_SERVER),
    ("TIMEOUT", KNIT_TIMEOUT),
    ("METHOD_FAILED", KNIT_METHOD_FAILED),
    ("GATEWAY_UNREACHABLE", KNIT_GATEWAY_UNREACHABLE),
    ("PERMISSION_DENIED", KNIT_PERMISSION_DENIED),
    ("BAD_INPUT", KNIT_BAD_INPUT),
    ("PAYLOAD_TOO_LARGE", KNIT_PAYLOAD_TOO_LARGE),
    ("PEER_LEFT", KNIT_PEER_LEFT),
    ("DISCONNECTED", KNIT_DISCONNECTED),
    ("ALREADY_EXISTS", KNIT_ALREADY_EXISTS),
    ("NOT_FOUND", KNIT_NOT_FOUND),
    ("CLOSED", KNIT_CLOSED),
    ("PROTOCOL", KNIT_PROTOCOL),
    ("INTERNAL", KNIT_INTERNAL),
    ("ALREADY_RUNNING", KNIT_ALREADY_RUNNING),
    ("BUSY", KNIT_BUSY),
];

/// NUL-terminated copies of each row's strings, made once.
struct CRow {
    code: i32,
    message: CString,
    name: CString,
    family: CString,
}

fn c_rows() -> &'static [CRow] {
    static ROWS: OnceLock<Vec<CRow>> = OnceLock::new();
    ROWS.get_or_init(|| {
        let c = |s: &str| CString::new(s).unwrap_or_default();
        STATUS_TABLE
            .iter()
            .map(|r: &StatusInfo| CRow {
                code: r.code,
                message: c(r.message),
                name: c(r.name),
                family: c(r.family),
            })
            .collect()
    })
}

const UNKNOWN: &CStr = c"unknown status";
const UNKNOWN_NAME: &CStr = c"UNKNOWN";
const UNKNOWN_FAMILY: &CStr = c"unknown";

fn row_field(
    status: knit_status_t,
    pick: impl Fn(&CRow) -> &CString,
    or: &'static CStr,
) -> *const c_char {
    // Nothing here can panic in practice; the guard keeps even a broken table from unwinding
    // into C.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c_rows()
            .iter()
            .find(|r| r.code == status)
            .map(|r| pick(r).as_ptr())
            .unwrap_or(or.as_ptr())
    }))
    .unwrap_or(or.as_ptr())
}

/// A one-line description of `status` (e.g. "no reply within the timeout"). Never NULL: an
/// unknown code gives "unknown status". The string is static; do not free it.
#[no_mangle]
pub extern "C" fn knit_status_string(status: knit_status_t) -> *const c_char {
    row_field(status, |r| &r.message, UNKNOWN)
}

/// The constant's name without the `KNIT_` prefix (e.g. "TIMEOUT"); "UNKNOWN" for an unknown
/// code. Static; do not free.
#[no_mangle]
pub extern "C" fn knit_status_name(status: knit_status_t) -> *const c_char {
    row_field(status, |r| &r.name, UNKNOWN_NAME)
}

/// The status's family, from which bindings derive their exception classes: "ok", "usage",
/// "not_found", "timeout", "remote", "connection", "permission", "input", "internal";
/// "unknown" for an unknown code. Static; do not free.
#[no_mangle]
pub extern "C" fn knit_status_family(status: knit_status_t) -> *const c_char {
    row_field(status, |r| &r.family, UNKNOWN_FAMILY)
}

/// knit's version ("0.1.0"). Static; do not free.
#[no_mangle]
pub extern "C" fn knit_version() -> *const c_char {
    const V: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    V.as_ptr()
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records the detail of a failure for [`knit_last_error_message`].
pub(crate) fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut e) = e.try_borrow_mut() {
            *e = c;
        }
    });
}

/// Detail text of the most recent call on this thread that returned an error (e.g. the remote
/// method's message, or which argument was invalid); an empty string when no call on this
/// thread has failed yet. Owned by knit and valid until the next knit call on this thread; do
/// not free it. Successful calls leave it unchanged.
#[no_mangle]
pub extern "C" fn knit_last_error_message() -> *const c_char {
    LAST_ERROR
        .try_with(|e| match e.try_borrow() {
            Ok(e) => e.as_ptr(),
            Err(_) => c"".as_ptr(),
        })
        .unwrap_or(c"".as_ptr())
}

/// A failure on its way to C: a status and its detail text.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: Status,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(status: Status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(Status::InvalidArgument, message)
    }
}

impl From<knit_core::client::ClientError> for Failure {
    fn from(e: knit_core::client::ClientError) -> Self {
        Failure::new(e.status(), e.to_string())
    }
}

impl From<knit_core::client::ContextError> for Failure {
    fn from(e: knit_core::client::ContextError) -> Self {
        Failure::new(e.status(), e.to_string())
    }
}

impl From<knit_core::client::StreamError> for Failure {
    fn from(e: knit_core::client::StreamError) -> Self {
        Failure::new(e.status(), e.to_string())
    }
}

pub(crate) type FfiResult<T = ()> = Result<T, Failure>;

/// Runs the body of an exported function: panics are caught (reported as `KNIT_INTERNAL`),
/// failures recorded for [`knit_last_error_message`] and turned into their code.
pub(crate) fn guard(f: impl FnOnce() -> FfiResult) -> knit_status_t {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => KNIT_OK,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status as knit_status_t
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (a bug in knit): {what}"));
            KNIT_INTERNAL
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_constants_match_the_status_table() {
        assert_eq!(
            EXPORTED.len(),
            STATUS_TABLE.len(),
            "a status row was added or removed: update ffi/src/status.rs and regenerate knit.h"
        );
        for row in STATUS_TABLE {
            let exported = EXPORTED.iter().find(|(n, _)| *n == row.name);
            assert_eq!(
                exported.map(|(_, c)| *c),
                Some(row.code),
                "KNIT_{} must be {}",
                row.name,
                row.code
            );
        }
    }

    fn s(p: *const c_char) -> String {
        // SAFETY: the status functions return static NUL-terminated strings.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    #[test]
    fn status_strings_come_from_the_table() {
        for row in STATUS_TABLE {
            assert_eq!(s(knit_status_string(row.code)), row.message);
            assert_eq!(s(knit_status_name(row.code)), row.name);
            assert_eq!(s(knit_status_family(row.code)), row.family);
        }
        assert_eq!(s(knit_status_string(2)), "unknown status");
        assert_eq!(s(knit_status_name(-1)), "UNKNOWN");
        assert_eq!(s(knit_status_family(9999)), "unknown");
        assert_eq!(s(knit_version()), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn guard_turns_panics_and_failures_into_codes() {
        assert_eq!(guard(|| Ok(())), KNIT_OK);
        assert_eq!(
            guard(|| Err(Failure::new(Status::Timeout, "slow"))),
            KNIT_TIMEOUT
        );
        assert_eq!(s(knit_last_error_message()), "slow");
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let code = guard(|| panic!("boom"));
        std::panic::set_hook(prev);
        assert_eq!(code, KNIT_INTERNAL);
        assert!(s(knit_last_error_message()).contains("boom"));
    }
}
