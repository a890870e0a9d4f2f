//! Text and bytes across the boundary: borrowing C strings, handing out knit-owned strings and
//! byte buffers, and freeing them.

use crate::status::{Failure, FfiResult};
use knit_core::{Status, Value};
use std::ffi::{c_char, CStr, CString};

/// Borrows a required C string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and unchanged for `'a`.
pub(crate) unsafe fn req_str<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    // SAFETY: forwarded to the caller's contract.
    unsafe { opt_str(p, what) }?.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// Borrows an optional C string argument (NULL gives `None`).
///
/// # Safety
/// As for [`req_str`].
pub(crate) unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> FfiResult<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL, and the caller promises a valid NUL-terminated string.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map(Some)
        .map_err(|_| Failure::invalid(format!("{what} is not valid UTF-8")))
}

/// Borrows a byte buffer argument: NULL is allowed only with length 0.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes that stay valid for `'a`.
pub(crate) unsafe fn bytes_arg<'a>(p: *const u8, len: usize, what: &str) -> FfiResult<&'a [u8]> {
    if p.is_null() {
        if len == 0 {
            return Ok(&[]);
        }
        return Err(Failure::invalid(format!(
            "{what} is NULL with a length of {len}"
        )));
    }
    if len > isize::MAX as usize {
        return Err(Failure::invalid(format!("{what} length is too large")));
    }
    // SAFETY: non-NULL, in bounds by the caller's contract, and `len` fits an allocation.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Parses a JSON argument (`BAD_INPUT` when invalid).
pub(crate) fn parse_json(text: &str, what: &str) -> FfiResult<Value> {
    Value::from_json_str(text)
        .map_err(|e| Failure::new(Status::BadInput, format!("{what} is not valid JSON: {e}")))
}

/// Parses an optional JSON text argument; NULL gives `default`.
///
/// # Safety
/// As for [`opt_str`].
pub(crate) unsafe fn json_arg(p: *const c_char, what: &str, default: Value) -> FfiResult<Value> {
    // SAFETY: forwarded to the caller's contract.
    match unsafe { opt_str(p, what) } {
        Ok(Some(t)) => parse_json(t, what),
        Ok(None) => Ok(default),
        Err(_) => Err(Failure::new(
            Status::BadInput,
            format!("{what} is not valid UTF-8"),
        )),
    }
}

/// A required JSON array argument (the items of a batch), as its elements.
///
/// # Safety
/// As for [`opt_str`].
pub(crate) unsafe fn items_arg(p: *const c_char, what: &str) -> FfiResult<Vec<Value>> {
    if p.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: forwarded to the caller's contract.
    match unsafe { json_arg(p, what, Value::Null) }? {
        Value::Array(items) => Ok(items),
        _ => Err(Failure::new(
            Status::BadInput,
            format!("{what} must be a JSON array"),
        )),
    }
}

/// Checks an out-pointer and clears what it points to, so that the caller finds NULL there
/// whenever the call fails.
///
/// # Safety
/// `out` is NULL or valid for a write of one `T`.
pub(crate) unsafe fn clear_out<T>(out: *mut *mut T, what: &str) -> FfiResult {
    if out.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and writable by the caller's contract.
    unsafe { out.write(std::ptr::null_mut()) };
    Ok(())
}

/// A knit-owned C string, to be freed with `knit_string_free`.
pub(crate) fn into_c_string(s: String) -> FfiResult<*mut c_char> {
    CString::new(s)
        .map(CString::into_raw)
        .map_err(|_| Failure::new(Status::Internal, "text contains a NUL byte"))
}

/// Stores `v` as JSON text in `*out`.
///
/// # Safety
/// `out` was checked with [`clear_out`].
pub(crate) unsafe fn put_json(out: *mut *mut c_char, v: &Value) -> FfiResult {
    let p = into_c_string(v.to_json_string())?;
    // SAFETY: checked by `clear_out`.
    unsafe { out.write(p) };
    Ok(())
}

/// Text for a callback argument: a C string (an interior NUL, which JSON text never has but a
/// name from another peer might, becomes a space).
pub(crate) fn c_text(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// Writes `v` to an optional out-pointer (NULL: not wanted).
///
/// # Safety
/// `out` is NULL or valid for a write of one `T`.
pub(crate) unsafe fn put_opt<T>(out: *mut T, v: T) {
    if !out.is_null() {
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(v) };
    }
}

/// Parses an optional options object (NULL: empty) and refuses keys not in `known`.
///
/// # Safety
/// As for [`opt_str`].
pub(crate) unsafe fn options_arg(
    p: *const c_char,
    what: &str,
    known: &[&str],
) -> FfiResult<knit_core::wire::Map> {
    // SAFETY: forwarded to the caller's contract.
    let v = unsafe { json_arg(p, what, Value::map()) }?;
    let Value::Map(m) = v else {
        return Err(Failure::invalid(format!("{what} must be a JSON object")));
    };
    if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(Failure::invalid(format!(
            "unknown {what} key {k:?} (known: {})",
            known.join(", ")
        )));
    }
    Ok(m)
}

/// An optional string option.
pub(crate) fn opt_string(
    m: &knit_core::wire::Map,
    key: &str,
    what: &str,
) -> FfiResult<Option<String>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Failure::invalid(format!("{what} {key} must be a string"))),
    }
}

/// An optional object option.
pub(crate) fn opt_object(
    m: &knit_core::wire::Map,
    key: &str,
    what: &str,
) -> FfiResult<Option<knit_core::wire::Map>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Map(o)) => Ok(Some(o.clone())),
        Some(_) => Err(Failure::invalid(format!("{what} {key} must be an object"))),
    }
}

/// Knit-owned byte buffers carry their length in the 8 bytes before the data, so that
/// `knit_bytes_free` needs only the pointer.
const BYTES_HEADER: usize = 8;

/// A knit-owned copy of `data`, to be freed with `knit_bytes_free`.
pub(crate) fn into_c_bytes(data: &[u8]) -> *mut u8 {
    let mut v = Vec::with_capacity(BYTES_HEADER + data.len());
    v.extend_from_slice(&(data.len() as u64).to_le_bytes());
    v.extend_from_slice(data);
    let b: Box<[u8]> = v.into_boxed_slice();
    let base = Box::into_raw(b) as *mut u8;
    // SAFETY: the allocation is BYTES_HEADER + len bytes long.
    unsafe { base.add(BYTES_HEADER) }
}

/// Frees a string knit returned (`result_json_out` and the like). NULL is ignored. Passing
/// anything else — a string knit did not return, or one already freed — is undefined behaviour,
/// as with `free`.
///
/// # Safety
/// `s` is NULL or a string returned by knit and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn knit_string_free(s: *mut c_char) {
    if s.is_null() {
        return;
    }
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: `s` came from `CString::into_raw` in `into_c_string` (caller's contract).
        drop(unsafe { CString::from_raw(s) });
    });
}

/// Frees a byte buffer knit returned (`knit_invoke_bytes`). NULL is ignored; anything else not
/// returned by knit, or already freed, is undefined behaviour.
///
/// # Safety
/// `data` is NULL or a buffer returned by knit and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn knit_bytes_free(data: *mut u8) {
    if data.is_null() {
        return;
    }
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: `data` is BYTES_HEADER bytes into an allocation made by `into_c_bytes`,
        // whose first 8 bytes hold the data length (caller's contract).
        unsafe {
            let base = data.sub(BYTES_HEADER);
            let mut len = [0u8; BYTES_HEADER];
            std::ptr::copy_nonoverlapping(base, len.as_mut_ptr(), BYTES_HEADER);
            let total = BYTES_HEADER + u64::from_le_bytes(len) as usize;
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                base, total,
            )));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_buffers_round_trip_and_free() {
        for data in [&b""[..], b"x", &[7u8; 1000][..]] {
            let p = into_c_bytes(data);
            // SAFETY: `p` holds `data.len()` bytes.
            assert_eq!(unsafe { std::slice::from_raw_parts(p, data.len()) }, data);
            // SAFETY: returned by `into_c_bytes`, freed once.
            unsafe { knit_bytes_free(p) };
        }
        // SAFETY: NULL is allowed.
        unsafe {
            knit_bytes_free(std::ptr::null_mut());
            knit_string_free(std::ptr::null_mut());
        }
    }

    #[test]
    fn null_and_bad_arguments_are_typed_failures() {
        // SAFETY: NULL and a valid literal.
        unsafe {
            assert_eq!(
                req_str(std::ptr::null(), "method").unwrap_err().status,
                Status::InvalidArgument
            );
            assert_eq!(opt_str(std::ptr::null(), "t").unwrap(), None);
            assert_eq!(req_str(c"m".as_ptr(), "method").unwrap(), "m");
            let bad = [0xffu8, 0];
            assert_eq!(
                req_str(bad.as_ptr().cast(), "method").unwrap_err().status,
                Status::InvalidArgument
            );
            assert_eq!(
                json_arg(c"{oops".as_ptr(), "args", Value::Null)
                    .unwrap_err()
                    .status,
                Status::BadInput
            );
            assert_eq!(
                json_arg(std::ptr::null(), "args", Value::map()).unwrap(),
                Value::map()
            );
            assert!(bytes_arg(std::ptr::null(), 0, "d").unwrap().is_empty());
            assert!(bytes_arg(std::ptr::null(), 3, "d").is_err());
        }
    }
}
