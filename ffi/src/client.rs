//! Client handles: connect, close, poll, and what the client knows (identity, methods, peers).

use crate::gate::Gate;
use crate::handle::{HandleError, Table, KIND_CLIENT};
use crate::status::{guard, knit_status_t, Failure, FfiResult};
use crate::strings::{clear_out, opt_str, put_json, req_str};
use knit_core::client::{Client, ClientBuilder};
use knit_core::wait::WaitStrategy;
use knit_core::{Status, Value};
use std::collections::HashMap;
use std::ffi::c_char;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

/// A connection to the gateway (opaque). Made by `knit_client_connect`, ended by
/// `knit_client_close`. The handle is a checked token, never dereferenced: a closed, NULL or
/// garbage handle gives a status code.
#[derive(Debug)]
pub struct knit_client {
    _opaque: [u8; 0],
}

/// See `knit_client`.
pub type knit_client_t = knit_client;

/// No dispatcher thread: callbacks run inside `knit_client_poll`, on the thread that calls it.
pub const KNIT_CONNECT_POLL: u32 = 0x1;
/// The client's threads busy-spin while waiting (lowest latency, one core per waiting thread).
pub const KNIT_CONNECT_SPIN: u32 = 0x2;
/// The client's threads sleep at once while waiting (lowest CPU, a futex wake-up per message).
/// Without SPIN or PARK: spin for 50 µs, then sleep (the default).
pub const KNIT_CONNECT_PARK: u32 = 0x4;

const KNOWN_FLAGS: u32 = KNIT_CONNECT_POLL | KNIT_CONNECT_SPIN | KNIT_CONNECT_PARK;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client handle names.
pub(crate) struct ClientEntry {
    pub client: Client,
    /// Unique per connection: marks the reply handles this client's calls created.
    pub id: u64,
    pub poll: bool,
    /// Our registered methods' gates, by name.
    pub methods: Mutex<HashMap<String, Arc<Gate>>>,
    /// Set (SeqCst) by `knit_client_close` before it sweeps the handle tables, so that a
    /// handle made concurrently is not left behind.
    pub closed: AtomicBool,
}

static CLIENTS: RwLock<Table<Arc<ClientEntry>>> = RwLock::new(Table::new(KIND_CLIENT));

pub(crate) fn handle_failure(e: HandleError, what: &str) -> Failure {
    let message = match e {
        HandleError::Null => format!("{what} is NULL"),
        HandleError::Invalid => format!("{what} is not a valid knit handle"),
        HandleError::Stale => format!("{what} is closed"),
        HandleError::Full => format!("too many open {what} handles"),
    };
    Failure::new(e.status(), message)
}

/// The client a handle names.
pub(crate) fn client_of(h: *mut knit_client_t) -> FfiResult<Arc<ClientEntry>> {
    CLIENTS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(h.addr())
        .cloned()
        .map_err(|e| handle_failure(e, "client"))
}

fn millis(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms))
}

/// Connects to the gateway at `gateway` (NULL: `$KNIT_GATEWAY`, else the per-user default
/// path) as `application`. `flags`: `KNIT_CONNECT_POLL`, and at most one of
/// `KNIT_CONNECT_SPIN` / `KNIT_CONNECT_PARK`; unknown bits are `KNIT_INVALID_ARGUMENT`. On
/// success `*out` is the new handle; on failure it is NULL.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_client_connect(
    gateway: *const c_char,
    application: *const c_char,
    flags: u32,
    out: *mut *mut knit_client_t,
) -> knit_status_t {
    // SAFETY: same contract.
    unsafe { knit_client_connect_ex(gateway, application, std::ptr::null(), flags, 0, out) }
}

/// `knit_client_connect` with an instance id to ask for (NULL: the gateway makes one up; it
/// must be unique among connected peers) and a handshake timeout (0: 5000 ms).
///
/// # Safety
/// As for `knit_client_connect`.
#[no_mangle]
pub unsafe extern "C" fn knit_client_connect_ex(
    gateway: *const c_char,
    application: *const c_char,
    instance: *const c_char,
    flags: u32,
    connect_timeout_ms: u32,
    out: *mut *mut knit_client_t,
) -> knit_status_t {
    guard(|| {
        // SAFETY: `out` is NULL or writable (caller's contract).
        unsafe { clear_out(out, "out") }?;
        // SAFETY: NULL or NUL-terminated (caller's contract).
        let (gateway, application, instance) = unsafe {
            (
                opt_str(gateway, "gateway")?,
                req_str(application, "application")?,
                opt_str(instance, "instance")?,
            )
        };
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Failure::invalid(format!(
                "unknown connect flags {:#x}",
                flags & !KNOWN_FLAGS
            )));
        }
        let wait = match (
            flags & KNIT_CONNECT_SPIN != 0,
            flags & KNIT_CONNECT_PARK != 0,
        ) {
            (true, true) => {
                return Err(Failure::invalid(
                    "KNIT_CONNECT_SPIN and KNIT_CONNECT_PARK exclude each other",
                ))
            }
            (true, false) => WaitStrategy::BusySpin,
            (false, true) => WaitStrategy::Park,
            (false, false) => WaitStrategy::default(),
        };
        let poll = flags & KNIT_CONNECT_POLL != 0;
        let mut b = ClientBuilder::new(application)
            .poll_mode(poll)
            .wait_strategy(wait)
            .connect_timeout(match connect_timeout_ms {
                0 => DEFAULT_CONNECT_TIMEOUT,
                ms => millis(ms),
            });
        if let Some(g) = gateway {
            b = b.socket(g);
        }
        if let Some(i) = instance {
            b = b.instance(i);
        }
        let client = b.connect()?;
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let entry = Arc::new(ClientEntry {
            client,
            // Relaxed: only uniqueness matters.
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            poll,
            methods: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        let inserted = CLIENTS
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(entry);
        let h = match inserted {
            Ok(h) => h,
            Err((e, entry)) => {
                entry.client.close();
                return Err(handle_failure(e, "client"));
            }
        };
        // SAFETY: checked by `clear_out`.
        unsafe { out.write(std::ptr::without_provenance_mut(h)) };
        Ok(())
    })
}

/// Closes the connection: unregisters the client's methods and streams, ends its
/// subscriptions, says goodbye, fails its pending calls (`KNIT_CLOSED`), stops its dispatcher
/// and frees the handle. When it returns, none of the client's callbacks is running or will
/// run again (except the one that called it, if it was called from a callback). Unanswered
/// reply handles of this client are answered with an error and become closed; its
/// subscription, stream, request and subscriber handles become closed. A second close, or any
/// later use of the handle, gives `KNIT_CLOSED`.
#[no_mangle]
pub extern "C" fn knit_client_close(client: *mut knit_client_t) -> knit_status_t {
    guard(|| {
        let entry = CLIENTS
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(client.addr())
            .map_err(|e| handle_failure(e, "client"))?;
        // SYNC(client-closed): see `subscription::add`.
        entry.closed.store(true, Ordering::SeqCst);
        entry.client.close();
        let gates: Vec<Arc<Gate>> = entry
            .methods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, g)| g)
            .collect();
        for g in gates {
            g.close_and_wait();
        }
        crate::interop::release_replies(entry.id);
        crate::subscription::release_subscriptions(entry.id);
        crate::streams::release_streams(entry.id);
        Ok(())
    })
}

/// Poll mode (`KNIT_CONNECT_POLL`): runs pending callbacks on this thread, waiting up to
/// `timeout_ms` for one; `*handled_out` (if not NULL) gets how many ran. Returns
/// `KNIT_DISCONNECTED` when nothing ran and the gateway connection is down (the client
/// reconnects by itself: keep polling to ride out a gateway restart), `KNIT_CLOSED` once
/// the client is closed (by another thread, or by a callback this poll ran: `*handled_out`
/// still counts it), and `KNIT_INVALID_ARGUMENT` on a client with a dispatcher thread.
///
/// # Safety
/// `handled_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_client_poll(
    client: *mut knit_client_t,
    timeout_ms: u32,
    handled_out: *mut u32,
) -> knit_status_t {
    guard(|| {
        if !handled_out.is_null() {
            // SAFETY: non-NULL and writable (caller's contract).
            unsafe { handled_out.write(0) };
        }
        let e = client_of(client)?;
        if !e.poll {
            return Err(Failure::invalid(
                "knit_client_poll needs a client connected with KNIT_CONNECT_POLL",
            ));
        }
        let n = e.client.poll(millis(timeout_ms));
        if !handled_out.is_null() {
            // SAFETY: as above.
            unsafe { handled_out.write(u32::try_from(n).unwrap_or(u32::MAX)) };
        }
        // Closed while polling (from another thread, or by a callback): a closed handle, not
        // a connection to wait for.
        if e.client.is_closed() {
            return Err(Failure::new(Status::Closed, "client is closed"));
        }
        if n == 0 && !e.client.is_connected() {
            return Err(Failure::new(
                Status::Disconnected,
                "the connection to the gateway is closed",
            ));
        }
        Ok(())
    })
}

/// `KNIT_OK` while the connection to the gateway is up, `KNIT_DISCONNECTED` while it is down
/// (the gateway stopped or died; the client reconnects by itself and restores its methods and
/// subscriptions), `KNIT_CLOSED` for a closed handle.
#[no_mangle]
pub extern "C" fn knit_client_connected(client: *mut knit_client_t) -> knit_status_t {
    guard(|| {
        if client_of(client)?.client.is_connected() {
            Ok(())
        } else {
            Err(Failure::new(
                Status::Disconnected,
                "the connection to the gateway is closed",
            ))
        }
    })
}

/// Our identity as the gateway resolved it, as JSON
/// `{application, instance, pid, user, machine, peerId}`. Free `*json_out` with
/// `knit_string_free`.
///
/// # Safety
/// `json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_client_instance(
    client: *mut knit_client_t,
    json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(json_out, "json_out") }?;
        let e = client_of(client)?;
        // SAFETY: checked by `clear_out`.
        unsafe { put_json(json_out, &e.client.instance().to_value()) }
    })
}

/// The largest payload (arguments or result, encoded) the gateway allows, in bytes.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_client_max_payload(
    client: *mut knit_client_t,
    out: *mut u64,
) -> knit_status_t {
    guard(|| {
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        let e = client_of(client)?;
        // SAFETY: non-NULL and writable (caller's contract).
        unsafe { out.write(e.client.max_payload() as u64) };
        Ok(())
    })
}

/// Every method known (ours included), sorted by name, as the JSON array `knit methods --json`
/// prints: `[{name, displayName, description, objectTypes, accepts, returns, version, flags,
/// supportsStreaming, servers: [{application, instance, pid, peerId}]}]`. Free with
/// `knit_string_free`.
///
/// # Safety
/// `json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_methods(
    client: *mut knit_client_t,
    json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(json_out, "json_out") }?;
        let e = client_of(client)?;
        let mut ms = e.client.methods();
        ms.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        let v = Value::Array(ms.iter().map(|m| m.to_value()).collect());
        // SAFETY: checked by `clear_out`.
        unsafe { put_json(json_out, &v) }
    })
}

/// Every peer known, ourselves first, as a JSON array of
/// `{application, instance, pid, user, machine, peerId}`. Free with `knit_string_free`.
///
/// # Safety
/// `json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_servers(
    client: *mut knit_client_t,
    json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(json_out, "json_out") }?;
        let e = client_of(client)?;
        let v = Value::Array(e.client.servers().iter().map(|i| i.to_value()).collect());
        // SAFETY: checked by `clear_out`.
        unsafe { put_json(json_out, &v) }
    })
}

/// Waits up to `timeout_ms` until a method named `method` (exact name) has a server.
/// `KNIT_OK` and, if `json_out` is not NULL, the method as one element of `knit_methods`;
/// `KNIT_NO_SERVER` after the timeout.
///
/// # Safety
/// `method` is NULL or NUL-terminated; `json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_wait_for_method(
    client: *mut knit_client_t,
    method: *const c_char,
    timeout_ms: u32,
    json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        if !json_out.is_null() {
            // SAFETY: non-NULL and writable (caller's contract).
            unsafe { json_out.write(std::ptr::null_mut()) };
        }
        let e = client_of(client)?;
        // SAFETY: caller's contract.
        let method = unsafe { req_str(method, "method") }?;
        // As `knit_invoke` refuses it: a name no method can have is not waited for.
        knit_core::model::check_method_name(method)
            .map_err(|m| Failure::new(Status::InvalidArgument, m))?;
        match e.client.wait_for_method(method, millis(timeout_ms)) {
            Some(m) if !json_out.is_null() => {
                // SAFETY: non-NULL and writable.
                unsafe { put_json(json_out, &m.to_value()) }
            }
            Some(_) => Ok(()),
            // Closed by another thread while it waited: that, not "no server".
            None if e.client.is_closed() => Err(Failure::new(
                Status::Closed,
                "the client is closed".to_string(),
            )),
            None => Err(Failure::new(
                Status::NoServer,
                format!(
                    "no server offers {:?} after {timeout_ms} ms",
                    knit_core::model::clip_name(method)
                ),
            )),
        }
    })
}
