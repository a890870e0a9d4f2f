//! Discovery events: peers and methods coming and going.

use crate::client::{client_of, knit_client_t};
use crate::gate::{Gate, UserData};
use crate::status::{guard, knit_status_t, Failure};
use crate::strings::{c_text, clear_out};
use crate::subscription::{add, knit_subscription_t, Inner};
use knit_core::client::{InteropEvent, MethodInfo};
use knit_core::wire::frame::MethodDef;
use knit_core::Value;
use std::ffi::{c_char, c_void};
use std::sync::Arc;

/// A discovery-event callback: `event_json` is `{"type": …, …}` (see
/// `knit_events_subscribe`), valid only during the call.
pub type knit_event_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, event_json: *const c_char)>;

/// A method definition as `knit_methods` shows it, without `servers`.
fn def_value(def: &MethodDef) -> Value {
    let mut v = MethodInfo {
        def: def.clone(),
        servers: Vec::new(),
    }
    .to_value();
    if let Some(m) = v.as_map_mut() {
        m.shift_remove("servers");
    }
    v
}

pub(crate) fn event_value(e: &InteropEvent) -> Value {
    let kind = |t: &str| ("type", Value::from(t));
    match e {
        InteropEvent::ServerAdded(s) => {
            Value::object([kind("serverAdded"), ("server", s.to_value())])
        }
        InteropEvent::ServerRemoved { server, reason } => Value::object([
            kind("serverRemoved"),
            ("server", server.to_value()),
            ("reason", Value::from(reason.as_str())),
        ]),
        InteropEvent::MethodAdded(d) => {
            Value::object([kind("methodAdded"), ("method", def_value(d))])
        }
        InteropEvent::MethodRemoved(d) => {
            Value::object([kind("methodRemoved"), ("method", def_value(d))])
        }
        InteropEvent::ServerMethodAdded { server, method } => Value::object([
            kind("serverMethodAdded"),
            ("server", server.to_value()),
            ("method", def_value(method)),
        ]),
        InteropEvent::ServerMethodRemoved { server, method } => Value::object([
            kind("serverMethodRemoved"),
            ("server", server.to_value()),
            ("method", def_value(method)),
        ]),
        InteropEvent::Disconnected {
            reason,
            gateway_stopped,
        } => Value::object([
            kind("disconnected"),
            ("reason", Value::from(reason.as_str())),
            ("gatewayStopped", Value::from(*gateway_stopped)),
        ]),
        InteropEvent::Reconnected(me) => {
            Value::object([kind("reconnected"), ("instance", me.to_value())])
        }
    }
}

/// Calls `fn` for every discovery event, on the client's dispatcher thread (or inside
/// `knit_client_poll`): first what exists now (`serverAdded` for every peer, ourselves
/// included, `methodAdded` and `serverMethodAdded` for every method), then each change.
/// `event_json` is one of
/// `{"type":"serverAdded","server":{application,instance,pid,user,machine,peerId}}`,
/// `{"type":"serverRemoved","server":{…},"reason":"…"}`,
/// `{"type":"methodAdded","method":{name,displayName,…,supportsStreaming}}` (the first server
/// of a method appeared), `{"type":"methodRemoved","method":{…}}` (its last server left),
/// `{"type":"serverMethodAdded","server":{…},"method":{…}}` and `serverMethodRemoved`; and for
/// the gateway connection `{"type":"disconnected","reason":"…","gatewayStopped":false}` and
/// `{"type":"reconnected","instance":{…}}` (the client reconnects by itself; every remote
/// peer is first removed with reason `"reset"`, then announced again). End it with
/// `knit_subscription_close`.
///
/// # Safety
/// `fn` and `user_data` stay valid until `knit_subscription_close` (or `knit_client_close`)
/// returns; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_events_subscribe(
    client: *mut knit_client_t,
    r#fn: knit_event_fn,
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
        let sub = e.client.on_event(move |ev| {
            let ud = ud;
            let Some(_inside) = g.enter() else { return };
            let text = c_text(&event_value(ev).to_json_string());
            // SAFETY: the app subscribed `f` with this signature; the text lives for the call.
            unsafe { f(ud.0, text.as_ptr()) }
        });
        // SAFETY: `out` checked by `clear_out`.
        unsafe { add(&e, gate, Inner::Events(sub), out) }
    })
}
