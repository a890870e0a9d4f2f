//! Methods: registering C handlers, answering through reply handles, invoking.

use crate::client::{client_of, handle_failure, knit_client_t};
use crate::gate::{Gate, UserData};
use crate::handle::{Table, KIND_REPLY};
use crate::status::{guard, knit_status_t, Failure, FfiResult};
use crate::strings::{
    bytes_arg, clear_out, into_c_bytes, json_arg, opt_str, parse_json, put_json, req_str,
};
use knit_core::client::{InvokeError, InvokeOptions, MethodError, Responder};
use knit_core::model::{InstanceFilter, InvocationResult, Target};
use knit_core::wire::frame::{Instance, MethodDef};
use knit_core::wire::{codec, Value};
use knit_core::Status;
use std::cell::Cell;
use std::ffi::{c_char, c_void, CString};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// One incoming call's answer (opaque). The handler that receives it must answer exactly once,
/// with `knit_reply_ok`, `knit_reply_bytes`, `knit_reply_error` or `knit_reply_error_ex`, now or
/// later, from any thread. After the answer the handle is closed (`KNIT_CLOSED`).
#[derive(Debug)]
pub struct knit_reply {
    _opaque: [u8; 0],
}

/// See `knit_reply`.
pub type knit_reply_t = knit_reply;

/// A method handler. `args_json` and `caller_json` (`{application, instance, pid, user,
/// machine, peerId}`) are valid only during the call; `reply` until answered.
pub type knit_method_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        args_json: *const c_char,
        caller_json: *const c_char,
        reply: *mut knit_reply_t,
    ),
>;

/// A method handler for raw bytes: `args` are the caller's bytes when it sent bytes
/// (`knit_invoke_bytes`), else the UTF-8 JSON text of its arguments (not NUL-terminated).
/// Pointers are valid only during the call; `reply` until answered.
pub type knit_bytes_method_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        args: *const u8,
        args_len: usize,
        caller_json: *const c_char,
        reply: *mut knit_reply_t,
    ),
>;

/// How long `knit_invoke` waits for a server to appear, and the reply timeout used when
/// `timeout_ms` is 0 (the Rust API's and io.Connect's defaults).
pub const KNIT_DEFAULT_WAIT_MS: u32 = 30_000;
/// See `KNIT_DEFAULT_WAIT_MS`.
pub const KNIT_DEFAULT_TIMEOUT_MS: u32 = 30_000;

// ----- reply handles -------------------------------------------------------------------------

struct ReplyEntry {
    responder: Responder,
    /// The client (`ClientEntry::id`) whose method was called.
    owner: u64,
    max_payload: usize,
}

static REPLIES: Mutex<Table<ReplyEntry>> = Mutex::new(Table::new(KIND_REPLY));

/// Answers every unanswered reply of client `owner` with an error (its client is closing).
pub(crate) fn release_replies(owner: u64) {
    let gone = REPLIES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove_where(|e| e.owner == owner);
    // Dropped outside the lock: a dropped responder answers "did not reply".
    drop(gone);
}

/// Takes the responder out of a reply handle after `check` accepted the entry.
fn take_reply(
    reply: *mut knit_reply_t,
    check: impl FnOnce(&ReplyEntry) -> FfiResult,
) -> FfiResult<Responder> {
    let mut t = REPLIES.lock().unwrap_or_else(PoisonError::into_inner);
    let h = reply.addr();
    let fail = |e| {
        let mut f = handle_failure(e, "reply");
        if f.status == Status::Closed {
            f.message = "reply is closed (already answered, or its client was closed)".into();
        }
        f
    };
    check(t.get(h).map_err(fail)?)?;
    Ok(t.remove(h).map_err(fail)?.responder)
}

fn payload_len(v: &Value) -> usize {
    match v {
        Value::Bytes(b) => b.len(),
        v => codec::encoded_len(v),
    }
}

fn reply_with(reply: *mut knit_reply_t, v: Value) -> FfiResult {
    let size = payload_len(&v);
    let responder = take_reply(reply, |e| {
        if size > e.max_payload {
            return Err(Failure::new(
                Status::PayloadTooLarge,
                format!(
                    "result of {size} bytes exceeds the limit of {} bytes",
                    e.max_payload
                ),
            ));
        }
        Ok(())
    })?;
    responder.ok(v);
    Ok(())
}

/// Answers a call with a result (JSON; NULL means `null`). Invalid JSON gives
/// `KNIT_BAD_INPUT` and a result larger than the gateway allows `KNIT_PAYLOAD_TOO_LARGE`; in
/// both cases nothing was sent and the handle stays open for a valid answer. An answered or
/// closed handle gives `KNIT_CLOSED`.
///
/// # Safety
/// `result_json` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_reply_ok(
    reply: *mut knit_reply_t,
    result_json: *const c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let v = unsafe { json_arg(result_json, "result_json", Value::Null) }?;
        reply_with(reply, v)
    })
}

/// Answers a call with raw bytes (the caller's `knit_invoke_bytes` gets them as they are;
/// `knit_invoke` shows them as a JSON array of numbers). `data` may be NULL when `len` is 0.
///
/// # Safety
/// `data` is NULL or points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn knit_reply_bytes(
    reply: *mut knit_reply_t,
    data: *const u8,
    len: usize,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let b = unsafe { bytes_arg(data, len, "data") }?;
        reply_with(reply, Value::Bytes(b.to_vec()))
    })
}

/// Answers a call with an error message (required); the caller's invoke fails with
/// `KNIT_METHOD_FAILED` and the message.
///
/// # Safety
/// `message` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_reply_error(
    reply: *mut knit_reply_t,
    message: *const c_char,
) -> knit_status_t {
    // SAFETY: same contract.
    unsafe { knit_reply_error_ex(reply, message, std::ptr::null()) }
}

/// `knit_reply_error` with error context (JSON, NULL for none), which the caller finds as
/// `returned` in its result, as io.Connect does.
///
/// # Safety
/// `message` and `context_json` are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_reply_error_ex(
    reply: *mut knit_reply_t,
    message: *const c_char,
    context_json: *const c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let (message, context) = unsafe {
            (
                req_str(message, "message")?,
                match opt_str(context_json, "context_json") {
                    Ok(Some(t)) => Some(parse_json(t, "context_json")?),
                    Ok(None) => None,
                    Err(e) => return Err(Failure::new(Status::BadInput, e.message)),
                },
            )
        };
        let mut err = MethodError::new(message);
        if let Some(c) = context {
            err = err.with_context(c);
        }
        take_reply(reply, |_| Ok(()))?.error(err);
        Ok(())
    })
}

// ----- registering ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum CHandler {
    Json(unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char, *mut knit_reply_t)),
    Bytes(unsafe extern "C" fn(*mut c_void, *const u8, usize, *const c_char, *mut knit_reply_t)),
}

thread_local! {
    /// Scratch for the arguments' JSON text (NUL-terminated), reused across calls.
    static ARGS_TEXT: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    /// The last caller's identity as JSON: callers repeat, serialising them does not need to.
    static CALLER: Cell<Option<(Arc<Instance>, CString)>> = const { Cell::new(None) };
}

/// Runs `f` with `v` as NUL-terminated JSON text (and its length without the NUL).
fn with_json_text<R>(v: &Value, f: impl FnOnce(*const c_char, usize) -> R) -> R {
    // Taken, not borrowed: a nested call on this thread (a handler invoking one of our own
    // methods) finds the cell empty and uses a fresh buffer.
    let mut buf = ARGS_TEXT.try_with(Cell::take).unwrap_or_default();
    buf.clear();
    if serde_json::to_writer(&mut buf, v).is_err() {
        buf.clear();
        buf.extend_from_slice(b"null");
    }
    let len = buf.len();
    buf.push(0);
    let r = f(buf.as_ptr().cast(), len);
    let _ = ARGS_TEXT.try_with(|c| c.set(buf));
    r
}

fn with_caller_json<R>(caller: &Arc<Instance>, f: impl FnOnce(*const c_char) -> R) -> R {
    let cached = CALLER.try_with(Cell::take).ok().flatten();
    let (who, text) = match cached {
        Some((who, text)) if Arc::ptr_eq(&who, caller) || *who == **caller => (who, text),
        _ => (
            caller.clone(),
            CString::new(caller.to_value().to_json_string()).unwrap_or_default(),
        ),
    };
    let r = f(text.as_ptr());
    let _ = CALLER.try_with(|c| c.set(Some((who, text))));
    r
}

fn register_with(
    client: *mut knit_client_t,
    def: MethodDef,
    handler: CHandler,
    user_data: *mut c_void,
) -> FfiResult {
    let entry = client_of(client)?;
    let name = def.name.clone();
    let gate = Arc::new(Gate::new());
    let g = gate.clone();
    let owner = entry.id;
    let max_payload = entry.client.max_payload();
    let ud = UserData(user_data);
    entry.client.register_async(def, move |inv, responder| {
        let Some(_inside) = g.enter() else {
            return responder.error(MethodError::new("Method has been removed"));
        };
        let inserted = REPLIES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ReplyEntry {
                responder,
                owner,
                max_payload,
            });
        let reply: *mut knit_reply_t = match inserted {
            Ok(h) => std::ptr::without_provenance_mut(h),
            Err((_, e)) => {
                return e
                    .responder
                    .error(MethodError::new("too many unanswered calls"))
            }
        };
        let ud = ud;
        with_caller_json(&inv.caller, |caller| match handler {
            CHandler::Json(f) => with_json_text(&inv.args, |args, _| {
                // SAFETY: the app registered `f` with this signature; the pointers are valid
                // for the duration of the call, as the contract says.
                unsafe { f(ud.0, args, caller, reply) }
            }),
            CHandler::Bytes(f) => match &inv.args {
                // SAFETY: as above.
                Value::Bytes(b) => unsafe { f(ud.0, b.as_ptr(), b.len(), caller, reply) },
                other => with_json_text(other, |args, len| {
                    // SAFETY: as above.
                    unsafe { f(ud.0, args.cast(), len, caller, reply) }
                }),
            },
        });
    })?;
    entry
        .methods
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(name, gate);
    Ok(())
}

/// Registers `method` (its name; unique among this client's methods: else
/// `KNIT_ALREADY_EXISTS`) with a handler that gets the arguments as JSON. The handler runs on
/// the client's dispatcher thread (or inside `knit_client_poll`), one call at a time, and must
/// not unwind (no C++ exceptions or longjmp out of it). `user_data` is passed back untouched.
///
/// # Safety
/// `method` is NULL or NUL-terminated; `handler` is NULL or a function of this signature that
/// stays callable, with `user_data`, until `knit_unregister` or `knit_client_close` returns.
#[no_mangle]
pub unsafe extern "C" fn knit_register(
    client: *mut knit_client_t,
    method: *const c_char,
    handler: knit_method_fn,
    user_data: *mut c_void,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let name = unsafe { req_str(method, "method") }?;
        let f = handler.ok_or_else(|| Failure::invalid("handler is NULL"))?;
        register_with(client, MethodDef::new(name), CHandler::Json(f), user_data)
    })
}

/// `knit_register` with a full io.Connect method definition as JSON: `{"name": …,
/// "displayName", "description", "objectTypes": [..], "accepts", "returns", "version",
/// "flags": {..}}` (only `name` is required).
///
/// # Safety
/// As for `knit_register`, with `definition_json` in place of `method`.
#[no_mangle]
pub unsafe extern "C" fn knit_register_ex(
    client: *mut knit_client_t,
    definition_json: *const c_char,
    handler: knit_method_fn,
    user_data: *mut c_void,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let text = unsafe { req_str(definition_json, "definition_json") }?;
        let def = method_def(&parse_json(text, "definition_json")?)?;
        let f = handler.ok_or_else(|| Failure::invalid("handler is NULL"))?;
        register_with(client, def, CHandler::Json(f), user_data)
    })
}

/// `knit_register` with a raw-bytes handler (see `knit_bytes_method_fn`).
///
/// # Safety
/// As for `knit_register`.
#[no_mangle]
pub unsafe extern "C" fn knit_register_bytes(
    client: *mut knit_client_t,
    method: *const c_char,
    handler: knit_bytes_method_fn,
    user_data: *mut c_void,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let name = unsafe { req_str(method, "method") }?;
        let f = handler.ok_or_else(|| Failure::invalid("handler is NULL"))?;
        register_with(client, MethodDef::new(name), CHandler::Bytes(f), user_data)
    })
}

pub(crate) fn method_def(v: &Value) -> FfiResult<MethodDef> {
    let m = v
        .as_map()
        .ok_or_else(|| Failure::invalid("definition_json must be an object"))?;
    let text = |k: &str| -> FfiResult<Option<String>> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Failure::invalid(format!("definition {k} must be a string"))),
        }
    };
    let mut def = MethodDef::new(text("name")?.unwrap_or_default());
    def.display_name = text("displayName")?;
    def.description = text("description")?;
    def.accepts = text("accepts")?;
    def.returns = text("returns")?;
    def.version = match m.get("version") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| Failure::invalid("definition version must be a u32"))?,
        ),
    };
    if let Some(t) = m.get("objectTypes") {
        def.object_types = match t {
            Value::Array(a) => a
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Failure::invalid("definition objectTypes must be strings"))?,
            _ => return Err(Failure::invalid("definition objectTypes must be an array")),
        };
    }
    if let Some(f) = m.get("flags") {
        def.flags = f.clone();
    }
    for k in m.keys() {
        if ![
            "name",
            "displayName",
            "description",
            "objectTypes",
            "accepts",
            "returns",
            "version",
            "flags",
        ]
        .contains(&k.as_str())
        {
            return Err(Failure::invalid(format!("unknown definition key {k:?}")));
        }
    }
    Ok(def)
}

/// Removes one of our methods (exact name; `KNIT_NOT_FOUND` if we do not serve it). When it
/// returns, its handler is not running and will not be called again (unless called from that
/// very handler, which then is not called again once it returns); its `user_data` may be freed.
/// Calls that arrive later fail for the caller.
///
/// # Safety
/// `method` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_unregister(
    client: *mut knit_client_t,
    method: *const c_char,
) -> knit_status_t {
    guard(|| {
        let e = client_of(client)?;
        // SAFETY: caller's contract.
        let name = unsafe { req_str(method, "method") }?;
        e.client.unregister(name)?;
        let gate = e
            .methods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        if let Some(g) = gate {
            g.close_and_wait();
        }
        Ok(())
    })
}

// ----- invoking ------------------------------------------------------------------------------

fn filter_of(v: &Value) -> FfiResult<InstanceFilter> {
    let m = v
        .as_map()
        .ok_or_else(|| Failure::invalid("a target filter must be a JSON object"))?;
    let mut f = InstanceFilter::default();
    for (k, v) in m {
        let text = || {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| Failure::invalid(format!("target {k} must be a string")))
        };
        match k.as_str() {
            "application" => f.application = Some(text()?),
            "instance" => f.instance = Some(text()?),
            "user" => f.user = Some(text()?),
            "machine" => f.machine = Some(text()?),
            "pid" => {
                f.pid = Some(
                    v.as_i64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| Failure::invalid("target pid must be a number"))?,
                )
            }
            "peerId" => {
                f.peer_id = Some(
                    text()?
                        .parse()
                        .map_err(|_| Failure::invalid("target peerId must look like \"p-7\""))?,
                )
            }
            other => return Err(Failure::invalid(format!("unknown target key {other:?}"))),
        }
    }
    Ok(f)
}

/// NULL / "best", "all", "skip-mine", an application name, or JSON: an instance filter object
/// `{application, instance, pid, user, machine, peerId}` or an array of them.
pub(crate) fn parse_target(t: Option<&str>) -> FfiResult<Target> {
    let Some(t) = t else { return Ok(Target::Best) };
    let trimmed = t.trim_start();
    if trimmed.starts_with('{') {
        return Ok(Target::Instance(filter_of(&parse_json(t, "target")?)?));
    }
    if trimmed.starts_with('[') {
        return match parse_json(t, "target")? {
            Value::Array(a) => Ok(Target::List(
                a.iter().map(filter_of).collect::<FfiResult<_>>()?,
            )),
            _ => Err(Failure::invalid("target must be a JSON array")),
        };
    }
    if t.trim().is_empty() {
        return Err(Failure::invalid("target is empty"));
    }
    Ok(Target::parse_cli(t))
}

pub(crate) fn timeout(ms: u32) -> Duration {
    Duration::from_millis(u64::from(match ms {
        0 => KNIT_DEFAULT_TIMEOUT_MS,
        ms => ms,
    }))
}

/// Invokes and maps the outcome: the result, or a failure plus the result-shaped failure when
/// every server failed.
fn invoke_value(
    client: *mut knit_client_t,
    method: &str,
    args: Value,
    target: Option<&str>,
    wait_ms: u32,
    timeout_ms: u32,
) -> Result<InvocationResult, (Failure, Option<Box<InvocationResult>>)> {
    let e = client_of(client).map_err(|f| (f, None))?;
    let opts = InvokeOptions {
        target: parse_target(target).map_err(|f| (f, None))?,
        wait: Duration::from_millis(u64::from(wait_ms)),
        timeout: timeout(timeout_ms),
    };
    e.client
        .invoke(method, args, &opts)
        .map_err(|err| match err {
            InvokeError::Failed(r) => {
                (Failure::new(r.failure_status(), r.message.clone()), Some(r))
            }
            other => (Failure::new(other.status(), other.to_string()), None),
        })
}

/// Invokes `method` with `args_json` (NULL: `{}`) on `target` (NULL or "best", "all",
/// "skip-mine", or an application name), waiting up to `KNIT_DEFAULT_WAIT_MS` for a server
/// and `timeout_ms` (0: `KNIT_DEFAULT_TIMEOUT_MS`) for each reply. On `KNIT_OK`,
/// `*result_json_out` is the io.Connect-shaped result (`knit invoke`'s output: `{method,
/// called_with, returned, executed_by, status, message}`, plus `all_return_values` and
/// `all_errors` when several servers were called). When every server failed the status says
/// why (`KNIT_METHOD_FAILED`, `KNIT_TIMEOUT`, `KNIT_PEER_LEFT`, …) and the result JSON is still
/// filled (with `status` 1 and the error `message`); on other failures it is NULL. Free it
/// with `knit_string_free`.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; `result_json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_invoke(
    client: *mut knit_client_t,
    method: *const c_char,
    args_json: *const c_char,
    target: *const c_char,
    timeout_ms: u32,
    result_json_out: *mut *mut c_char,
) -> knit_status_t {
    // SAFETY: same contract.
    unsafe {
        knit_invoke_ex(
            client,
            method,
            args_json,
            target,
            KNIT_DEFAULT_WAIT_MS,
            timeout_ms,
            result_json_out,
        )
    }
}

/// `knit_invoke` with an explicit wait for a server to appear (`wait_ms`, 0: fail at once with
/// `KNIT_NO_SERVER`) and a target that may also be JSON: an instance filter
/// `{"application", "instance", "pid", "user", "machine", "peerId"}` or an array of them.
///
/// # Safety
/// As for `knit_invoke`.
#[no_mangle]
pub unsafe extern "C" fn knit_invoke_ex(
    client: *mut knit_client_t,
    method: *const c_char,
    args_json: *const c_char,
    target: *const c_char,
    wait_ms: u32,
    timeout_ms: u32,
    result_json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let (method, args, target) = unsafe {
            clear_out(result_json_out, "result_json_out")?;
            (
                req_str(method, "method")?,
                json_arg(args_json, "args_json", Value::map())?,
                opt_str(target, "target")?,
            )
        };
        match invoke_value(client, method, args, target, wait_ms, timeout_ms) {
            // SAFETY: checked by `clear_out`.
            Ok(r) => unsafe { put_json(result_json_out, &r.to_value()) },
            Err((f, r)) => {
                if let Some(r) = r {
                    // SAFETY: as above.
                    unsafe { put_json(result_json_out, &r.to_value()) }?;
                }
                Err(f)
            }
        }
    })
}

/// The hot-path invoke: sends `data` as raw bytes (no JSON on either side; a JSON handler sees
/// a JSON array of numbers) and returns the server's `returned` value in `*out` / `*out_len`:
/// its bytes when it answered with bytes, else its JSON text. Free `*out` with
/// `knit_bytes_free`. `wait_ms` and `timeout_ms` as for `knit_invoke_ex`. On failure `*out` is
/// NULL, `*out_len` 0, and `knit_last_error_message` has the error message.
///
/// # Safety
/// `data` is NULL (with `len` 0) or points to `len` readable bytes; strings are NULL or
/// NUL-terminated; `out` and `out_len` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_invoke_bytes(
    client: *mut knit_client_t,
    method: *const c_char,
    data: *const u8,
    len: usize,
    target: *const c_char,
    wait_ms: u32,
    timeout_ms: u32,
    out: *mut *mut u8,
    out_len: *mut usize,
) -> knit_status_t {
    guard(|| {
        if out_len.is_null() {
            return Err(Failure::invalid("out_len is NULL"));
        }
        // SAFETY: caller's contract.
        let (method, data, target) = unsafe {
            out_len.write(0);
            clear_out(out, "out")?;
            (
                req_str(method, "method")?,
                bytes_arg(data, len, "data")?,
                opt_str(target, "target")?,
            )
        };
        let r = invoke_value(
            client,
            method,
            Value::Bytes(data.to_vec()),
            target,
            wait_ms,
            timeout_ms,
        )
        .map_err(|(f, _)| f)?;
        let p = match &r.returned {
            Value::Bytes(b) => (into_c_bytes(b), b.len()),
            v => {
                let t = v.to_json_string();
                (into_c_bytes(t.as_bytes()), t.len())
            }
        };
        // SAFETY: both checked above.
        unsafe {
            out.write(p.0);
            out_len.write(p.1);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_names_and_json() {
        assert_eq!(parse_target(None).unwrap(), Target::Best);
        assert_eq!(parse_target(Some("all")).unwrap(), Target::All);
        assert_eq!(parse_target(Some("skip-mine")).unwrap(), Target::SkipMine);
        assert_eq!(
            parse_target(Some("Pricer")).unwrap(),
            Target::Instance(InstanceFilter::application("Pricer"))
        );
        let t = parse_target(Some(r#"{"application":"a","pid":7,"peerId":"p-3"}"#)).unwrap();
        let Target::Instance(f) = t else {
            panic!("not an instance target")
        };
        assert_eq!(f.application.as_deref(), Some("a"));
        assert_eq!(f.pid, Some(7));
        assert_eq!(f.peer_id.map(|p| p.0), Some(3));
        assert!(matches!(
            parse_target(Some(r#"[{"application":"a"},{"instance":"i"}]"#)).unwrap(),
            Target::List(l) if l.len() == 2
        ));
        assert_eq!(
            parse_target(Some("")).unwrap_err().status,
            Status::InvalidArgument
        );
        assert_eq!(
            parse_target(Some("{bad")).unwrap_err().status,
            Status::BadInput
        );
        assert_eq!(
            parse_target(Some(r#"{"colour":"red"}"#))
                .unwrap_err()
                .status,
            Status::InvalidArgument
        );
    }

    #[test]
    fn method_definitions_parse_and_reject_unknown_keys() {
        let d = method_def(
            &Value::from_json_str(
                r#"{"name":"m","displayName":"M","objectTypes":["x"],"version":2,"flags":{"a":1}}"#,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(d.name, "m");
        assert_eq!(d.display_name.as_deref(), Some("M"));
        assert_eq!(d.object_types, vec!["x".to_string()]);
        assert_eq!(d.version, Some(2));
        assert!(method_def(&Value::from_json_str(r#"{"name":"m","nme":1}"#).unwrap()).is_err());
        assert!(method_def(&Value::from(3)).is_err());
    }
}
