//! Shared contexts: read, write (set, update, compare-and-set, paths), destroy, list, follow.

use crate::client::{client_of, knit_client_t};
use crate::gate::{Gate, UserData};
use crate::status::{guard, knit_status_t, Failure, FfiResult};
use crate::strings::{c_text, clear_out, json_arg, put_json, put_opt, req_str};
use crate::subscription::{add, knit_subscription_t, Inner};
use knit_core::client::ContextUpdate;
use knit_core::{Status, Value};
use std::ffi::{c_char, c_void};
use std::sync::Arc;

/// A context subscriber: the context's `name`, its whole value `data_json`, what changed
/// `delta_json` (the whole value on the first call and after `set`; a key set to `null` was
/// removed) and the `version` now. The strings are valid only during the call.
pub type knit_context_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        name: *const c_char,
        data_json: *const c_char,
        delta_json: *const c_char,
        version: u64,
    ),
>;

/// A context subscriber that gets each change as one JSON object, as `knit ctx watch` prints
/// it plus two flags: `{name, data, delta, removed: [keys], version, updater: {application,
/// instance, pid, user, machine, peerId} or null, first, conflated}`. `first` marks the
/// current value delivered on subscribing; `conflated` that versions were skipped (`delta` is
/// then the difference from what this subscriber saw last). Valid only during the call.
pub type knit_context_update_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, update_json: *const c_char)>;

/// Reads a required JSON object argument (the context's data or delta).
///
/// # Safety
/// `p` is NULL or NUL-terminated.
unsafe fn data_arg(p: *const c_char, what: &str) -> FfiResult<Value> {
    if p.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: caller's contract.
    let v = unsafe { json_arg(p, what, Value::Null) }?;
    if v.as_map().is_none() {
        return Err(Failure::new(
            Status::BadInput,
            format!("{what} must be a JSON object"),
        ));
    }
    Ok(v)
}

/// The context's data as JSON (`{}` when it does not exist). Free `*data_json_out` with
/// `knit_string_free`. Reads shared memory directly: no message to the gateway once the
/// context is known.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `data_json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_context_get(
    client: *mut knit_client_t,
    name: *const c_char,
    data_json_out: *mut *mut c_char,
) -> knit_status_t {
    // SAFETY: same contract.
    unsafe { knit_context_get_ex(client, name, data_json_out, std::ptr::null_mut()) }
}

/// `knit_context_get` that also gives the version read (`*version_out`, if not NULL; 0 when
/// the context does not exist).
///
/// # Safety
/// As for `knit_context_get`; `version_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_context_get_ex(
    client: *mut knit_client_t,
    name: *const c_char,
    data_json_out: *mut *mut c_char,
    version_out: *mut u64,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe {
            put_opt(version_out, 0);
            clear_out(data_json_out, "data_json_out")?;
        }
        let e = client_of(client)?;
        // SAFETY: caller's contract.
        let name = unsafe { req_str(name, "name") }?;
        let snap = e.client.contexts().get(name)?;
        // SAFETY: checked by `clear_out` / the caller's contract.
        unsafe {
            put_json(data_json_out, &snap.data)?;
            put_opt(version_out, snap.version);
        }
        Ok(())
    })
}

/// Runs a context write and reports the version after it.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `version_out` is NULL or writable.
unsafe fn write(
    client: *mut knit_client_t,
    name: *const c_char,
    version_out: *mut u64,
    f: impl FnOnce(&knit_core::client::Contexts<'_>, &str) -> FfiResult<u64>,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { put_opt(version_out, 0) };
        let e = client_of(client)?;
        // SAFETY: caller's contract.
        let name = unsafe { req_str(name, "name") }?;
        let v = f(&e.client.contexts(), name)?;
        // SAFETY: caller's contract.
        unsafe { put_opt(version_out, v) };
        Ok(())
    })
}

/// Replaces the context's whole value with `data_json` (a JSON object), creating the context
/// if needed. Invalid JSON or a non-object is `KNIT_BAD_INPUT`, a value over the gateway's
/// limit `KNIT_PAYLOAD_TOO_LARGE`.
///
/// # Safety
/// String arguments are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_context_set(
    client: *mut knit_client_t,
    name: *const c_char,
    data_json: *const c_char,
) -> knit_status_t {
    // SAFETY: same contract.
    unsafe { knit_context_set_ex(client, name, data_json, std::ptr::null_mut()) }
}

/// `knit_context_set` that gives the context's version after the write in `*version_out` (if
/// not NULL).
///
/// # Safety
/// As for `knit_context_set`; `version_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_context_set_ex(
    client: *mut knit_client_t,
    name: *const c_char,
    data_json: *const c_char,
    version_out: *mut u64,
) -> knit_status_t {
    // SAFETY: caller's contract.
    unsafe {
        write(client, name, version_out, |c, name| {
            let data = data_arg(data_json, "data_json")?;
            Ok(c.set(name, data)?)
        })
    }
}

/// Merges `delta_json` (a JSON object) into the context: its top-level keys replace the
/// context's, a key set to `null` is removed, other keys stay. A delta that changes nothing
/// writes nothing (the version stays). Creates the context, storing the delta as given, when
/// it does not exist.
///
/// # Safety
/// String arguments are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_context_update(
    client: *mut knit_client_t,
    name: *const c_char,
    delta_json: *const c_char,
) -> knit_status_t {
    // SAFETY: same contract.
    unsafe { knit_context_update_ex(client, name, delta_json, std::ptr::null_mut()) }
}

/// `knit_context_update` that gives the version after the write in `*version_out` (if not
/// NULL).
///
/// # Safety
/// As for `knit_context_update`; `version_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_context_update_ex(
    client: *mut knit_client_t,
    name: *const c_char,
    delta_json: *const c_char,
    version_out: *mut u64,
) -> knit_status_t {
    // SAFETY: caller's contract.
    unsafe {
        write(client, name, version_out, |c, name| {
            let delta = data_arg(delta_json, "delta_json")?;
            Ok(c.update(name, delta)?)
        })
    }
}

/// Compare-and-set: `knit_context_update`, but only while the context is still at
/// `expected_version` (0: it does not exist yet). Otherwise nothing is written and the status
/// is `KNIT_ALREADY_EXISTS` ("context … is at version N, not M"): read it again and retry.
///
/// # Safety
/// As for `knit_context_update_ex`.
#[no_mangle]
pub unsafe extern "C" fn knit_context_update_if(
    client: *mut knit_client_t,
    name: *const c_char,
    expected_version: u64,
    delta_json: *const c_char,
    version_out: *mut u64,
) -> knit_status_t {
    // SAFETY: caller's contract.
    unsafe {
        write(client, name, version_out, |c, name| {
            let delta = data_arg(delta_json, "delta_json")?;
            Ok(c.update_if(name, expected_version, delta)?)
        })
    }
}

/// Sets one dotted path (`"a.b.c"`) to `value_json` (any JSON value; `null` removes the leaf),
/// creating intermediate objects. `*version_out` (if not NULL) gets the version after it.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; `version_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_context_set_path(
    client: *mut knit_client_t,
    name: *const c_char,
    path: *const c_char,
    value_json: *const c_char,
    version_out: *mut u64,
) -> knit_status_t {
    // SAFETY: caller's contract.
    unsafe {
        write(client, name, version_out, |c, name| {
            let path = req_str(path, "path")?;
            if value_json.is_null() {
                return Err(Failure::invalid("value_json is NULL"));
            }
            let value = json_arg(value_json, "value_json", Value::Null)?;
            Ok(c.set_path(name, path, value)?)
        })
    }
}

/// Sets several dotted paths in one version, in order: `paths_json` is a JSON object
/// `{"a.b": 1, "c": null}` (its keys are paths, applied in the order written) or an array of
/// `[path, value]` pairs.
///
/// # Safety
/// As for `knit_context_set_path`.
#[no_mangle]
pub unsafe extern "C" fn knit_context_set_paths(
    client: *mut knit_client_t,
    name: *const c_char,
    paths_json: *const c_char,
    version_out: *mut u64,
) -> knit_status_t {
    // SAFETY: caller's contract.
    unsafe {
        write(client, name, version_out, |c, name| {
            if paths_json.is_null() {
                return Err(Failure::invalid("paths_json is NULL"));
            }
            let paths = paths_of(json_arg(paths_json, "paths_json", Value::Null)?)?;
            Ok(c.set_paths(name, paths)?)
        })
    }
}

fn paths_of(v: Value) -> FfiResult<Vec<(String, Value)>> {
    let bad = || {
        Failure::new(
            Status::BadInput,
            "paths_json must be an object {path: value} or an array of [path, value] pairs",
        )
    };
    match v {
        Value::Map(m) => Ok(m.into_iter().collect()),
        Value::Array(a) => a
            .into_iter()
            .map(|p| match p {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let value = pair.pop().unwrap_or_default();
                    match pair.pop() {
                        Some(Value::String(path)) => Ok((path, value)),
                        _ => Err(bad()),
                    }
                }
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

/// Destroys the context for everyone (`KNIT_NOT_FOUND` if it does not exist). Its subscribers
/// stay subscribed and hear from it again if it is created anew.
///
/// # Safety
/// `name` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_context_destroy(
    client: *mut knit_client_t,
    name: *const c_char,
) -> knit_status_t {
    guard(|| {
        let e = client_of(client)?;
        // SAFETY: caller's contract.
        let name = unsafe { req_str(name, "name") }?;
        Ok(e.client.contexts().destroy(name)?)
    })
}

/// The names of every context, as a JSON array of strings (sorted). Free with
/// `knit_string_free`.
///
/// # Safety
/// `names_json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_context_list(
    client: *mut knit_client_t,
    names_json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(names_json_out, "names_json_out") }?;
        let e = client_of(client)?;
        let names = Value::Array(
            e.client
                .contexts()
                .all()
                .into_iter()
                .map(Value::from)
                .collect(),
        );
        // SAFETY: checked by `clear_out`.
        unsafe { put_json(names_json_out, &names) }
    })
}

fn update_value(u: &ContextUpdate) -> Value {
    Value::object([
        ("name", Value::from(&*u.name)),
        ("data", (*u.data).clone()),
        ("delta", u.delta.clone()),
        (
            "removed",
            Value::Array(u.removed.iter().map(|s| Value::from(s.as_str())).collect()),
        ),
        ("version", Value::from(u.version)),
        (
            "updater",
            u.updater
                .as_ref()
                .map(|i| i.to_value())
                .unwrap_or(Value::Null),
        ),
        ("first", Value::from(u.first)),
        ("conflated", Value::from(u.conflated)),
    ])
}

#[derive(Clone, Copy)]
enum Callback {
    Plain(unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char, *const c_char, u64)),
    Update(unsafe extern "C" fn(*mut c_void, *const c_char)),
}

/// # Safety
/// `name` is NULL or NUL-terminated; `out` is NULL or writable.
unsafe fn subscribe(
    client: *mut knit_client_t,
    name: *const c_char,
    cb: Option<Callback>,
    user_data: *mut c_void,
    out: *mut *mut knit_subscription_t,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(out, "out") }?;
        let e = client_of(client)?;
        // SAFETY: caller's contract.
        let name = unsafe { req_str(name, "name") }?;
        let cb = cb.ok_or_else(|| Failure::invalid("fn is NULL"))?;
        let gate = Arc::new(Gate::new());
        let g = gate.clone();
        let ud = UserData(user_data);
        let sub = e.client.contexts().subscribe(name, move |u| {
            let ud = ud;
            let Some(_inside) = g.enter() else { return };
            match cb {
                Callback::Plain(f) => {
                    let name = c_text(&u.name);
                    let data = c_text(&u.data.to_json_string());
                    let delta = c_text(&u.delta.to_json_string());
                    // SAFETY: the app subscribed `f` with this signature; the strings live
                    // for the call, as the contract says.
                    unsafe {
                        f(
                            ud.0,
                            name.as_ptr(),
                            data.as_ptr(),
                            delta.as_ptr(),
                            u.version,
                        )
                    }
                }
                Callback::Update(f) => {
                    let text = c_text(&update_value(u).to_json_string());
                    // SAFETY: as above.
                    unsafe { f(ud.0, text.as_ptr()) }
                }
            }
        })?;
        // SAFETY: `out` checked by `clear_out`.
        unsafe { add(&e, gate, Inner::Context(sub), out) }
    })
}

/// Follows a context: `fn` gets its current value first (if it exists), then every change, in
/// version order, on the client's dispatcher thread (or inside `knit_client_poll`).
/// Subscribing to a context that does not exist yet is fine: the first call comes when it is
/// created. End it with `knit_subscription_close`.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `fn` and `user_data` stay valid until
/// `knit_subscription_close` (or `knit_client_close`) returns; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_context_subscribe(
    client: *mut knit_client_t,
    name: *const c_char,
    r#fn: knit_context_fn,
    user_data: *mut c_void,
    out: *mut *mut knit_subscription_t,
) -> knit_status_t {
    // SAFETY: same contract.
    unsafe { subscribe(client, name, r#fn.map(Callback::Plain), user_data, out) }
}

/// `knit_context_subscribe` with the whole update as JSON (see `knit_context_update_fn`): who
/// wrote it, which keys were removed, whether it is the first call or a conflated one.
///
/// # Safety
/// As for `knit_context_subscribe`.
#[no_mangle]
pub unsafe extern "C" fn knit_context_subscribe_ex(
    client: *mut knit_client_t,
    name: *const c_char,
    r#fn: knit_context_update_fn,
    user_data: *mut c_void,
    out: *mut *mut knit_subscription_t,
) -> knit_status_t {
    // SAFETY: same contract.
    unsafe { subscribe(client, name, r#fn.map(Callback::Update), user_data, out) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_come_as_an_object_or_as_pairs_in_order() {
        let o = paths_of(Value::from_json_str(r#"{"b.c":1,"a":null}"#).unwrap()).unwrap();
        assert_eq!(o[0], ("b.c".to_string(), Value::from(1)));
        assert_eq!(o[1], ("a".to_string(), Value::Null));
        let p = paths_of(Value::from_json_str(r#"[["x",[1]],["y.z","s"]]"#).unwrap()).unwrap();
        assert_eq!(p[1], ("y.z".to_string(), Value::from("s")));
        for bad in [r#"[["x"]]"#, r#"[[1,2]]"#, "3", r#"["a"]"#] {
            assert_eq!(
                paths_of(Value::from_json_str(bad).unwrap())
                    .unwrap_err()
                    .status,
                Status::BadInput,
                "{bad}"
            );
        }
    }
}
