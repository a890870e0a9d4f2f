//! Colour channels: list, join and leave (single or multi mode), publish (data and FDC3
//! contexts), follow the joined channels or one named channel, hear membership changes.

use crate::client::{client_of, knit_client_t};
use crate::gate::{Gate, UserData};
use crate::status::{guard, knit_status_t, Failure, FfiResult};
use crate::strings::{c_text, clear_out, json_arg, opt_str, put_json, put_opt, req_str};
use crate::subscription::{add, knit_subscription_t, Inner};
use knit_core::client::{ChannelContext, ChannelMode, ChannelUpdate};
use knit_core::{Status, Value};
use std::ffi::{c_char, c_void};
use std::sync::Arc;

/// `knit_channel_set_mode`: joining a channel leaves the one joined before (the default).
pub const KNIT_CHANNEL_SINGLE: u32 = 0;
/// `knit_channel_set_mode`: joining a channel adds it to those joined.
pub const KNIT_CHANNEL_MULTI: u32 = 1;

/// A channel follower: the `channel` that changed, its `data_json` (with the latest FDC3
/// context decoded as `data.fdc3`), the whole channel context `context_json` (`{name, meta,
/// data}`) and the context `version`. Valid only during the call.
pub type knit_channel_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        channel: *const c_char,
        data_json: *const c_char,
        context_json: *const c_char,
        version: u64,
    ),
>;

/// A membership callback: `channels_json` is the JSON array of the channels joined now.
pub type knit_channels_changed_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, channels_json: *const c_char)>;

fn context_value(c: &ChannelContext) -> Value {
    Value::object([
        ("name", Value::from(c.name.as_str())),
        ("meta", c.meta.clone()),
        ("data", c.data.clone()),
    ])
}

fn names(v: Vec<String>) -> Value {
    Value::Array(v.into_iter().map(Value::from).collect())
}

/// Every channel as a JSON array of `{name, meta: {color, …}, data}`. Free with
/// `knit_string_free`.
///
/// # Safety
/// `json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_channel_list(
    client: *mut knit_client_t,
    json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(json_out, "json_out") }?;
        let e = client_of(client)?;
        let all = e.client.channels().list()?;
        let v = Value::Array(all.iter().map(context_value).collect());
        // SAFETY: checked by `clear_out`.
        unsafe { put_json(json_out, &v) }
    })
}

/// One channel as JSON `{name, meta, data}` (`KNIT_NOT_FOUND` when there is no such channel).
///
/// # Safety
/// `name` is NULL or NUL-terminated; `json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_channel_get(
    client: *mut knit_client_t,
    name: *const c_char,
    json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(json_out, "json_out") }?;
        let e = client_of(client)?;
        // SAFETY: caller's contract.
        let name = unsafe { req_str(name, "name") }?;
        let c = e.client.channels().get(name)?;
        // SAFETY: checked by `clear_out`.
        unsafe { put_json(json_out, &context_value(&c)) }
    })
}

/// `KNIT_CHANNEL_SINGLE` (joining replaces) or `KNIT_CHANNEL_MULTI` (joining adds).
#[no_mangle]
pub extern "C" fn knit_channel_set_mode(client: *mut knit_client_t, mode: u32) -> knit_status_t {
    guard(|| {
        let mode = match mode {
            KNIT_CHANNEL_SINGLE => ChannelMode::Single,
            KNIT_CHANNEL_MULTI => ChannelMode::Multi,
            m => return Err(Failure::invalid(format!("unknown channel mode {m}"))),
        };
        client_of(client)?.client.channels().set_mode(mode);
        Ok(())
    })
}

/// Joins a channel (`KNIT_NOT_FOUND` if it does not exist); in single mode this leaves the one
/// joined before. Followers (`knit_channel_subscribe`) get its current data at once.
///
/// # Safety
/// `name` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_channel_join(
    client: *mut knit_client_t,
    name: *const c_char,
) -> knit_status_t {
    guard(|| {
        let e = client_of(client)?;
        // SAFETY: caller's contract.
        let name = unsafe { req_str(name, "name") }?;
        Ok(e.client.channels().join(name)?)
    })
}

/// Leaves one channel (`name`), or every joined channel (NULL). Not joined: nothing happens.
///
/// # Safety
/// `name` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_channel_leave(
    client: *mut knit_client_t,
    name: *const c_char,
) -> knit_status_t {
    guard(|| {
        let e = client_of(client)?;
        // SAFETY: caller's contract.
        let name = unsafe { opt_str(name, "name") }?;
        e.client.channels().leave(name);
        Ok(())
    })
}

/// The channels joined, as a JSON array of names (the current one first). Free with
/// `knit_string_free`.
///
/// # Safety
/// `names_json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_channel_joined(
    client: *mut knit_client_t,
    names_json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(names_json_out, "names_json_out") }?;
        let e = client_of(client)?;
        let v = names(e.client.channels().my_channels());
        // SAFETY: checked by `clear_out`.
        unsafe { put_json(names_json_out, &v) }
    })
}

/// Replaces the given top-level keys of the channel's data (`data_json`, an object): of the
/// channel `name`, or of every joined channel (`name` NULL; none joined: `KNIT_BAD_INPUT`).
/// `*version_out` (if not NULL) gets the context version after it.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; `version_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_channel_publish(
    client: *mut knit_client_t,
    data_json: *const c_char,
    name: *const c_char,
    version_out: *mut u64,
) -> knit_status_t {
    // SAFETY: caller's contract.
    unsafe {
        publish(
            client,
            data_json,
            name,
            version_out,
            "data_json",
            |c, d, n| Ok(c.channels().publish(d, n)?),
        )
    }
}

/// Stores an FDC3 context (`context_json`, an object with a `type`) as the channel's latest
/// value of its type (followers see it as `data.fdc3`); `name` and `version_out` as for
/// `knit_channel_publish`.
///
/// # Safety
/// As for `knit_channel_publish`.
#[no_mangle]
pub unsafe extern "C" fn knit_channel_publish_fdc3(
    client: *mut knit_client_t,
    context_json: *const c_char,
    name: *const c_char,
    version_out: *mut u64,
) -> knit_status_t {
    // SAFETY: caller's contract.
    unsafe {
        publish(
            client,
            context_json,
            name,
            version_out,
            "context_json",
            |c, d, n| Ok(c.channels().publish_fdc3(d, n)?),
        )
    }
}

/// # Safety
/// String arguments are NULL or NUL-terminated; `version_out` is NULL or writable.
unsafe fn publish(
    client: *mut knit_client_t,
    data: *const c_char,
    name: *const c_char,
    version_out: *mut u64,
    what: &str,
    f: impl FnOnce(&knit_core::client::Client, Value, Option<&str>) -> FfiResult<u64>,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { put_opt(version_out, 0) };
        if data.is_null() {
            return Err(Failure::invalid(format!("{what} is NULL")));
        }
        // SAFETY: caller's contract.
        let (v, name) = unsafe { (json_arg(data, what, Value::Null)?, opt_str(name, "name")?) };
        if v.as_map().is_none() {
            return Err(Failure::new(
                Status::BadInput,
                format!("{what} must be a JSON object"),
            ));
        }
        let e = client_of(client)?;
        let version = f(&e.client, v, name)?;
        // SAFETY: caller's contract.
        unsafe { put_opt(version_out, version) };
        Ok(())
    })
}

fn channel_callback(
    f: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char, *const c_char, u64),
    user_data: *mut c_void,
    gate: Arc<Gate>,
) -> impl Fn(&ChannelUpdate) + Send + Sync + 'static {
    let ud = UserData(user_data);
    move |u: &ChannelUpdate| {
        let ud = ud;
        let Some(_inside) = gate.enter() else { return };
        let channel = c_text(&u.channel);
        let data = c_text(&u.data.to_json_string());
        let context = c_text(&context_value(&u.context).to_json_string());
        // SAFETY: the app subscribed `f` with this signature; the strings live for the call.
        unsafe {
            f(
                ud.0,
                channel.as_ptr(),
                data.as_ptr(),
                context.as_ptr(),
                u.version,
            )
        }
    }
}

/// Follows the channels this client is on, as membership changes: `fn` gets a joined
/// channel's current data when it is joined, then each change, on the client's dispatcher
/// thread (or inside `knit_client_poll`). End it with `knit_subscription_close`.
///
/// # Safety
/// `fn` and `user_data` stay valid until `knit_subscription_close` (or `knit_client_close`)
/// returns; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_channel_subscribe(
    client: *mut knit_client_t,
    r#fn: knit_channel_fn,
    user_data: *mut c_void,
    out: *mut *mut knit_subscription_t,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(out, "out") }?;
        let f = r#fn.ok_or_else(|| Failure::invalid("fn is NULL"))?;
        let e = client_of(client)?;
        let gate = Arc::new(Gate::new());
        let sub = e
            .client
            .channels()
            .subscribe(channel_callback(f, user_data, gate.clone()))?;
        // SAFETY: `out` checked by `clear_out`.
        unsafe { add(&e, gate, Inner::Channel(sub), out) }
    })
}

/// Follows one channel without joining it (`KNIT_NOT_FOUND` when it does not exist).
///
/// # Safety
/// As for `knit_channel_subscribe`; `name` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_channel_subscribe_for(
    client: *mut knit_client_t,
    name: *const c_char,
    r#fn: knit_channel_fn,
    user_data: *mut c_void,
    out: *mut *mut knit_subscription_t,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: caller's contract.
        let name = unsafe { req_str(name, "name") }?;
        let f = r#fn.ok_or_else(|| Failure::invalid("fn is NULL"))?;
        let e = client_of(client)?;
        let gate = Arc::new(Gate::new());
        let sub = e
            .client
            .channels()
            .subscribe_for(name, channel_callback(f, user_data, gate.clone()))?;
        // SAFETY: `out` checked by `clear_out`.
        unsafe { add(&e, gate, Inner::Channel(sub), out) }
    })
}

/// Calls `fn` with the channels joined now, then after every join or leave. End it with
/// `knit_subscription_close`.
///
/// # Safety
/// As for `knit_channel_subscribe`.
#[no_mangle]
pub unsafe extern "C" fn knit_channel_on_changed(
    client: *mut knit_client_t,
    r#fn: knit_channels_changed_fn,
    user_data: *mut c_void,
    out: *mut *mut knit_subscription_t,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(out, "out") }?;
        let f = r#fn.ok_or_else(|| Failure::invalid("fn is NULL"))?;
        let e = client_of(client)?;
        let gate = Arc::new(Gate::new());
        let g = gate.clone();
        let ud = UserData(user_data);
        // The Rust API keeps this callback for the client's life; once the subscription is
        // closed its gate makes it do nothing.
        e.client.channels().on_changed(move |joined| {
            let ud = ud;
            let Some(_inside) = g.enter() else { return };
            let text = c_text(&names(joined.to_vec()).to_json_string());
            // SAFETY: the app subscribed `f` with this signature; the text lives for the call.
            unsafe { f(ud.0, text.as_ptr()) }
        });
        // SAFETY: `out` checked by `clear_out`.
        unsafe { add(&e, gate, Inner::Gate, out) }
    })
}
