//! The bus: publish to a topic, subscribe to topics (patterns with `*` and `>`), routing keys,
//! target and source filters.

use crate::client::{client_of, knit_client_t};
use crate::gate::{Gate, UserData};
use crate::status::{guard, knit_status_t, Failure, FfiResult};
use crate::strings::{
    c_text, clear_out, items_arg, json_arg, opt_object, opt_string, options_arg, req_str,
};
use crate::subscription::{add, knit_subscription_t, Inner};
use knit_core::client::{PublishOptions, SubscribeOptions};
use knit_core::Value;
use std::ffi::{c_char, c_void};
use std::sync::Arc;

/// A bus subscriber: the `topic` the message was published on, its `data_json`, and its
/// publisher `source_json` (`{application, instance, pid, user, machine, peerId}`). Valid only
/// during the call.
pub type knit_message_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        topic: *const c_char,
        data_json: *const c_char,
        source_json: *const c_char,
    ),
>;

/// Publishes `data_json` (any JSON value; required) on `topic`. Fire-and-forget: every
/// subscription whose topic or pattern matches gets it, the publisher's own included; with no
/// subscriber nothing is sent.
///
/// # Safety
/// String arguments are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_publish(
    client: *mut knit_client_t,
    topic: *const c_char,
    data_json: *const c_char,
) -> knit_status_t {
    // SAFETY: same contract.
    unsafe { knit_publish_ex(client, topic, data_json, std::ptr::null()) }
}

/// `knit_publish` with options (NULL: none), a JSON object: `routingKey` (only subscribers
/// that used this key, or none, get it) and `target` (only subscribers whose identity has every
/// one of these values, e.g. `{"application": "blotter"}`).
///
/// # Safety
/// As for `knit_publish`.
#[no_mangle]
pub unsafe extern "C" fn knit_publish_ex(
    client: *mut knit_client_t,
    topic: *const c_char,
    data_json: *const c_char,
    options_json: *const c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let (topic, data, opts) = unsafe {
            let topic = req_str(topic, "topic")?;
            if data_json.is_null() {
                return Err(Failure::invalid("data_json is NULL"));
            }
            let data = json_arg(data_json, "data_json", Value::Null)?;
            (topic, data, publish_options(options_json)?)
        };
        let e = client_of(client)?;
        Ok(e.client.publish(topic, data, &opts)?)
    })
}

/// A publish's options (`{"routingKey", "target"}`; NULL: none).
///
/// # Safety
/// `options_json` is NULL or NUL-terminated.
unsafe fn publish_options(options_json: *const c_char) -> FfiResult<PublishOptions> {
    // SAFETY: caller's contract.
    let o = unsafe { options_arg(options_json, "options_json", &["routingKey", "target"]) }?;
    Ok(PublishOptions {
        routing_key: opt_string(&o, "routingKey", "option")?,
        target: opt_object(&o, "target", "option")?,
    })
}

/// Publishes every element of `items_json` (a JSON array; required) on `topic`, in order, each
/// delivered as if published on its own, for the synchronisation cost of one publish: one route
/// lookup, and one lock and one wake-up per subscriber lane. Every item is checked before any is
/// sent: one the gateway would refuse (over `max_payload`) refuses the whole batch. Options as
/// for `knit_publish_ex` (NULL: none).
///
/// # Safety
/// As for `knit_publish`.
#[no_mangle]
pub unsafe extern "C" fn knit_publish_batch(
    client: *mut knit_client_t,
    topic: *const c_char,
    items_json: *const c_char,
    options_json: *const c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let (topic, items, opts) = unsafe {
            let topic = req_str(topic, "topic")?;
            let items = items_arg(items_json, "items_json")?;
            (topic, items, publish_options(options_json)?)
        };
        let e = client_of(client)?;
        Ok(e.client.publish_batch(topic, &items, &opts)?)
    })
}

/// Subscribes to `topic`: an exact topic, or a pattern where `*` matches one dot-separated
/// segment and `>` the rest (`"prices.>"`). `fn` runs on the client's dispatcher thread (or
/// inside `knit_client_poll`) for each message, in each publisher's order. End it with
/// `knit_subscription_close`.
///
/// # Safety
/// `topic` is NULL or NUL-terminated; `fn` and `user_data` stay valid until
/// `knit_subscription_close` (or `knit_client_close`) returns; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_subscribe(
    client: *mut knit_client_t,
    topic: *const c_char,
    r#fn: knit_message_fn,
    user_data: *mut c_void,
    out: *mut *mut knit_subscription_t,
) -> knit_status_t {
    // SAFETY: same contract.
    unsafe { knit_subscribe_ex(client, topic, std::ptr::null(), r#fn, user_data, out) }
}

/// `knit_subscribe` with options (NULL: none), a JSON object: `routingKey` (only messages
/// published with this key, or with none) and `source` (only messages from publishers whose
/// identity has every one of these values, e.g. `{"application": "pricer"}`).
///
/// # Safety
/// As for `knit_subscribe`; `options_json` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_subscribe_ex(
    client: *mut knit_client_t,
    topic: *const c_char,
    options_json: *const c_char,
    r#fn: knit_message_fn,
    user_data: *mut c_void,
    out: *mut *mut knit_subscription_t,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let (topic, opts) = unsafe {
            clear_out(out, "out")?;
            let topic = req_str(topic, "topic")?;
            let o = options_arg(options_json, "options_json", &["routingKey", "source"])?;
            let opts = SubscribeOptions {
                routing_key: opt_string(&o, "routingKey", "option")?,
                source: opt_object(&o, "source", "option")?,
            };
            (topic, opts)
        };
        let f = r#fn.ok_or_else(|| Failure::invalid("fn is NULL"))?;
        let e = client_of(client)?;
        let gate = Arc::new(Gate::new());
        let g = gate.clone();
        let ud = UserData(user_data);
        let sub = e.client.subscribe(topic, opts, move |m| {
            let ud = ud;
            let Some(_inside) = g.enter() else { return };
            let topic = c_text(&m.topic);
            let data = c_text(&m.data.to_json_string());
            let source = c_text(&m.source.to_value().to_json_string());
            // SAFETY: the app subscribed `f` with this signature; the strings live for the
            // call, as the contract says.
            unsafe { f(ud.0, topic.as_ptr(), data.as_ptr(), source.as_ptr()) }
        })?;
        // SAFETY: `out` checked by `clear_out`.
        unsafe { add(&e, gate, Inner::Bus(sub), out) }
    })
}
