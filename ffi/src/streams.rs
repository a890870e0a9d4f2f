//! Streams: serving one (requests accepted on branches or rejected, pushes to everyone, to
//! branches or to one subscriber, closes) and subscribing to one.

use crate::client::{client_of, handle_failure, knit_client_t};
use crate::gate::{Gate, UserData};
use crate::handle::{Table, KIND_REQUEST, KIND_STREAM, KIND_SUBSCRIBER};
use crate::interop::{method_def, parse_target, timeout};
use crate::status::{guard, knit_status_t, Failure, FfiResult};
use crate::strings::{
    c_text, clear_out, items_arg, json_arg, opt_str, opt_string, options_arg, put_json, req_str,
};
use crate::subscription::{add, knit_subscription_t, Inner};
use knit_core::client::{
    SlowConsumerPolicy, Stream, StreamEvent, StreamOptions, StreamParams, StreamSubscription,
    SubscriptionRequest,
};
use knit_core::{Status, Value};
use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// A stream this client serves (opaque). Made by `knit_stream_create`, ended by
/// `knit_stream_close` (or `knit_client_close`).
#[derive(Debug)]
pub struct knit_stream {
    _opaque: [u8; 0],
}

/// See `knit_stream`.
pub type knit_stream_t = knit_stream;

/// A subscription request waiting for the server's decision (opaque), given to the stream's
/// request callback. Decide exactly once, now or later, from any thread:
/// `knit_stream_accept` or `knit_stream_reject`. Afterwards the handle is closed.
#[derive(Debug)]
pub struct knit_stream_request {
    _opaque: [u8; 0],
}

/// See `knit_stream_request`.
pub type knit_stream_request_t = knit_stream_request;

/// One accepted subscriber of a stream we serve (opaque), from `knit_stream_accept`: push to
/// it alone, or close its subscription. Freed by `knit_stream_subscriber_close` or
/// `knit_stream_subscriber_free`, or when its stream or client closes.
#[derive(Debug)]
pub struct knit_stream_subscriber {
    _opaque: [u8; 0],
}

/// See `knit_stream_subscriber`.
pub type knit_stream_subscriber_t = knit_stream_subscriber;

/// A stream's request callback: someone asks to subscribe with `args_json`; `caller_json` is
/// who (`{application, instance, pid, user, machine, peerId}`). The strings are valid only
/// during the call; `request` until decided.
pub type knit_stream_request_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        request: *mut knit_stream_request_t,
        args_json: *const c_char,
        caller_json: *const c_char,
    ),
>;

/// A stream subscriber's data callback: one item `data_json` from server `server_json`.
/// `flags`: `KNIT_STREAM_PRIVATE` when it was pushed to this subscriber alone. `gap`: how many
/// items the stream's slow-consumer policy dropped before this one (0 normally). Valid only
/// during the call.
pub type knit_stream_data_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        data_json: *const c_char,
        server_json: *const c_char,
        flags: u32,
        gap: u64,
    ),
>;

/// A stream subscriber's end callback: the subscription ended because every server dropped it
/// or left (`flags` has `KNIT_STREAM_SERVER_INITIATED`), with the `reason`. Not called for
/// `knit_subscription_close`.
pub type knit_stream_closed_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, reason: *const c_char, flags: u32)>;

/// Data flag: the item was pushed to this subscriber alone (`knit_stream_subscriber_push`).
pub const KNIT_STREAM_PRIVATE: u32 = 0x1;
/// Closed flag: the server side ended the subscription.
pub const KNIT_STREAM_SERVER_INITIATED: u32 = 0x2;

struct StreamEntry {
    owner: u64,
    /// Unique per stream: marks its requests and subscribers.
    id: u64,
    stream: Stream,
    gate: Arc<Gate>,
}

struct RequestEntry {
    owner: u64,
    stream: u64,
    req: SubscriptionRequest,
}

struct SubscriberEntry {
    owner: u64,
    stream: u64,
    sub: StreamSubscription,
}

static STREAMS: Mutex<Table<Arc<StreamEntry>>> = Mutex::new(Table::new(KIND_STREAM));
static REQUESTS: Mutex<Table<RequestEntry>> = Mutex::new(Table::new(KIND_REQUEST));
static SUBSCRIBERS: Mutex<Table<SubscriberEntry>> = Mutex::new(Table::new(KIND_SUBSCRIBER));

fn lock<T>(m: &'static Mutex<Table<T>>) -> MutexGuard<'static, Table<T>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn stream_of(h: *mut knit_stream_t) -> FfiResult<Arc<StreamEntry>> {
    lock(&STREAMS)
        .get(h.addr())
        .cloned()
        .map_err(|e| handle_failure(e, "stream"))
}

fn subscriber_of(h: *mut knit_stream_subscriber_t) -> FfiResult<StreamSubscription> {
    lock(&SUBSCRIBERS)
        .get(h.addr())
        .map(|e| e.sub.clone())
        .map_err(|e| handle_failure(e, "subscriber"))
}

/// Forgets a stream's pending requests (answering them "Stream closed") and subscriber
/// handles.
fn release_of(pred: impl Fn(u64, u64) -> bool) {
    let requests = lock(&REQUESTS).remove_where(|e| pred(e.owner, e.stream));
    for r in requests {
        r.req.reject("Stream closed");
    }
    // Dropped after the lock is released.
    let subscribers = lock(&SUBSCRIBERS).remove_where(|e| pred(e.owner, e.stream));
    drop(subscribers);
}

/// Ends every stream of client `owner` (its client is closing).
pub(crate) fn release_streams(owner: u64) {
    let streams = lock(&STREAMS).remove_where(|e| e.owner == owner);
    for s in &streams {
        s.gate.close_and_wait();
    }
    release_of(|o, _| o == owner);
}

/// A data item: a JSON object (streams carry objects, as in io.Connect).
///
/// # Safety
/// `p` is NULL or NUL-terminated.
unsafe fn item_arg(p: *const c_char) -> FfiResult<Value> {
    if p.is_null() {
        return Err(Failure::invalid("data_json is NULL"));
    }
    // SAFETY: caller's contract.
    let v = unsafe { json_arg(p, "data_json", Value::Null) }?;
    object_item(&v, "data_json must be a JSON object")?;
    Ok(v)
}

/// Streams carry objects, as in io.Connect: anything else is bad input.
fn object_item(v: &Value, why: &str) -> FfiResult {
    match v.as_map() {
        Some(_) => Ok(()),
        None => Err(Failure::new(Status::BadInput, why)),
    }
}

fn policy_of(o: &knit_core::wire::Map) -> FfiResult<(SlowConsumerPolicy, usize)> {
    let uint = |k: &str| -> FfiResult<Option<u64>> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .and_then(|n| u64::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| Failure::invalid(format!("option {k} must be a number >= 0"))),
        }
    };
    let policy = match opt_string(o, "policy", "option")?.as_deref() {
        None | Some("block") => {
            SlowConsumerPolicy::Block(Duration::from_millis(uint("blockMs")?.unwrap_or(5000)))
        }
        Some("drop-oldest") => SlowConsumerPolicy::DropOldest,
        Some("conflate") => SlowConsumerPolicy::Conflate(
            opt_string(o, "conflateKey", "option")?
                .ok_or_else(|| Failure::invalid("policy \"conflate\" needs conflateKey"))?,
        ),
        Some(p) => {
            return Err(Failure::invalid(format!(
                "unknown policy {p:?} (known: block, drop-oldest, conflate)"
            )))
        }
    };
    let queue = match uint("queue")? {
        None => 1024,
        Some(0) => return Err(Failure::invalid("option queue must be at least 1")),
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };
    Ok((policy, queue))
}

thread_local! {
    /// Set by `knit_stream_accept` while it accepts: the stream's `on_added` (called by the
    /// accept, on this thread) leaves the new subscription here.
    static ACCEPTED: RefCell<Option<Option<StreamSubscription>>> = const { RefCell::new(None) };
}

/// Serves a stream named `name`. `options_json` (NULL: defaults) is a JSON object:
/// `policy` — what a subscriber's full queue does: `"block"` (default: the pusher waits up to
/// `blockMs`, default 5000, then that subscription is closed as a slow consumer),
/// `"drop-oldest"` (the oldest item goes; the subscriber is told the gap) or `"conflate"` (an
/// item replaces a queued one with the same `conflateKey` field value); `queue` — items queued
/// per subscriber before the policy applies (default 1024); `definition` — more of the method
/// definition, as for `knit_register_ex` (without `name`). `on_request` (NULL: accept every
/// request on the default branch) decides each subscription request, on the client's
/// dispatcher thread (or inside `knit_client_poll`); it must decide each request exactly once,
/// now or later. `*out` is the stream, ended with `knit_stream_close`.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; `on_request` and `user_data` stay valid until
/// `knit_stream_close` (or `knit_client_close`) returns; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_create(
    client: *mut knit_client_t,
    name: *const c_char,
    options_json: *const c_char,
    on_request: knit_stream_request_fn,
    user_data: *mut c_void,
    out: *mut *mut knit_stream_t,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let (name, o) = unsafe {
            clear_out(out, "out")?;
            (
                req_str(name, "name")?,
                options_arg(
                    options_json,
                    "options_json",
                    &["policy", "blockMs", "conflateKey", "queue", "definition"],
                )?,
            )
        };
        let (policy, queue) = policy_of(&o)?;
        let mut def = match o.get("definition") {
            None | Some(Value::Null) => knit_core::wire::frame::MethodDef::default(),
            Some(d) => method_def(d)?,
        };
        def.name = name.to_string();
        let e = client_of(client)?;
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        // Relaxed: only uniqueness matters.
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let owner = e.id;
        let gate = Arc::new(Gate::new());
        let g = gate.clone();
        let ud = UserData(user_data);
        let on_request: Option<Box<dyn Fn(SubscriptionRequest) + Send + Sync>> =
            on_request.map(|f| {
                Box::new(move |req: SubscriptionRequest| {
                    let ud = ud;
                    let Some(_inside) = g.enter() else {
                        return req.reject("Stream closed");
                    };
                    let args = c_text(&req.arguments.to_json_string());
                    let caller = c_text(&req.instance.to_value().to_json_string());
                    let inserted = lock(&REQUESTS).insert(RequestEntry {
                        owner,
                        stream: id,
                        req,
                    });
                    let h = match inserted {
                        Ok(h) => h,
                        Err((_, e)) => return e.req.reject("too many pending requests"),
                    };
                    // SAFETY: the app gave `f` with this signature; the strings live for the
                    // call and the request until decided, as the contract says.
                    unsafe {
                        f(
                            ud.0,
                            std::ptr::without_provenance_mut(h),
                            args.as_ptr(),
                            caller.as_ptr(),
                        )
                    }
                }) as Box<dyn Fn(SubscriptionRequest) + Send + Sync>
            });
        let options = StreamOptions {
            on_request,
            on_added: Some(Box::new(|s: &StreamSubscription| {
                let _ = ACCEPTED.try_with(|a| {
                    if let Some(slot) = a.borrow_mut().as_mut() {
                        *slot = Some(s.clone());
                    }
                });
            })),
            on_removed: None,
            policy,
            queue,
        };
        let stream = e.client.create_stream(def, options)?;
        let entry = Arc::new(StreamEntry {
            owner,
            id,
            stream,
            gate,
        });
        let inserted = lock(&STREAMS).insert(entry.clone());
        let h = match inserted {
            Ok(h) => h,
            Err((err, _)) => {
                let _ = entry.stream.close();
                return Err(handle_failure(err, "stream"));
            }
        };
        // SYNC(client-closed): see `subscription::add`.
        if e.closed.load(Ordering::SeqCst) {
            // The lock is released before waiting (see `subscription::add`).
            let removed = lock(&STREAMS).remove(h);
            if let Ok(s) = removed {
                s.gate.close_and_wait();
            }
            return Err(Failure::new(Status::Closed, "client is closed"));
        }
        // SAFETY: checked by `clear_out`.
        unsafe { out.write(std::ptr::without_provenance_mut(h)) };
        Ok(())
    })
}

/// Pushes `data_json` (a JSON object) to every subscriber of the stream. With a blocking policy
/// this may wait for a slow subscriber (up to its `blockMs`).
///
/// # Safety
/// `data_json` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_push(
    stream: *mut knit_stream_t,
    data_json: *const c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let data = unsafe { item_arg(data_json) }?;
        Ok(stream_of(stream)?.stream.push(data)?)
    })
}

/// Pushes every element of `items_json` (a JSON array of objects; required) to every
/// subscriber, in order, each delivered as if pushed on its own, for the synchronisation cost
/// of one push. Every item is checked before any is sent: one that is not an object, or one
/// over `max_payload`, refuses the whole batch.
///
/// # Safety
/// `items_json` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_push_batch(
    stream: *mut knit_stream_t,
    items_json: *const c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let items = unsafe { items_arg(items_json, "items_json") }?;
        for v in &items {
            object_item(v, "every item of items_json must be a JSON object")?;
        }
        Ok(stream_of(stream)?.stream.push_batch(&items)?)
    })
}

/// Pushes `data_json` to the subscribers of the branches in `branches_json`, a JSON array of
/// branch names (`[""]` is the default branch). Branches without subscribers are skipped.
///
/// # Safety
/// String arguments are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_push_branches(
    stream: *mut knit_stream_t,
    branches_json: *const c_char,
    data_json: *const c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let (branches, data) = unsafe {
            if branches_json.is_null() {
                return Err(Failure::invalid("branches_json is NULL"));
            }
            (
                json_arg(branches_json, "branches_json", Value::Null)?,
                item_arg(data_json)?,
            )
        };
        let names: Vec<&str> = match &branches {
            Value::Array(a) => a
                .iter()
                .map(Value::as_str)
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Failure::new(
                        Status::BadInput,
                        "branches_json must be an array of strings",
                    )
                })?,
            _ => {
                return Err(Failure::new(
                    Status::BadInput,
                    "branches_json must be an array of strings",
                ))
            }
        };
        Ok(stream_of(stream)?.stream.push_to_branches(&names, data)?)
    })
}

/// Ends every subscription on `branch` (NULL: the default branch `""`); their subscribers'
/// closed callbacks run with the reason "Server dropping a branch".
///
/// # Safety
/// `branch` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_close_branch(
    stream: *mut knit_stream_t,
    branch: *const c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let branch = unsafe { opt_str(branch, "branch") }?.unwrap_or("");
        stream_of(stream)?.stream.close_branch(branch);
        Ok(())
    })
}

/// The branches that have subscribers, as a sorted JSON array of strings. Free with
/// `knit_string_free`.
///
/// # Safety
/// `json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_branches(
    stream: *mut knit_stream_t,
    json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(json_out, "json_out") }?;
        let s = stream_of(stream)?;
        let v = Value::Array(s.stream.branches().into_iter().map(Value::from).collect());
        // SAFETY: checked by `clear_out`.
        unsafe { put_json(json_out, &v) }
    })
}

/// Every current subscription, as a JSON array of `{branch, instance: {application, …},
/// arguments}`. Free with `knit_string_free`.
///
/// # Safety
/// `json_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_subscriptions(
    stream: *mut knit_stream_t,
    json_out: *mut *mut c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        unsafe { clear_out(json_out, "json_out") }?;
        let s = stream_of(stream)?;
        let v = Value::Array(
            s.stream
                .subscriptions()
                .iter()
                .map(|x| {
                    Value::object([
                        ("branch", Value::from(x.branch())),
                        ("instance", x.instance().to_value()),
                        ("arguments", x.arguments().clone()),
                    ])
                })
                .collect(),
        );
        // SAFETY: checked by `clear_out`.
        unsafe { put_json(json_out, &v) }
    })
}

/// Ends every subscription ("Stream closed"), answers undecided requests with a rejection,
/// unregisters the stream and frees the handle, with its request and subscriber handles. When
/// it returns, the request callback is not running (unless this is called from inside it) and
/// will not run again.
#[no_mangle]
pub extern "C" fn knit_stream_close(stream: *mut knit_stream_t) -> knit_status_t {
    guard(|| {
        let s = lock(&STREAMS)
            .remove(stream.addr())
            .map_err(|e| handle_failure(e, "stream"))?;
        s.gate.close_and_wait();
        release_of(|_, id| id == s.id);
        Ok(s.stream.close()?)
    })
}

fn take_request(request: *mut knit_stream_request_t) -> FfiResult<RequestEntry> {
    lock(&REQUESTS).remove(request.addr()).map_err(|e| {
        let mut f = handle_failure(e, "request");
        if f.status == Status::Closed {
            f.message =
                "request is closed (already decided, or its stream or client was closed)".into();
        }
        f
    })
}

/// Accepts a subscription request on `branch` (NULL or "": the default branch). If
/// `subscriber_out` is not NULL it gets a handle on the new subscriber (to push to it alone or
/// close it), which the app frees with `knit_stream_subscriber_close` or
/// `knit_stream_subscriber_free`. A decided request gives `KNIT_CLOSED`.
///
/// # Safety
/// `branch` is NULL or NUL-terminated; `subscriber_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_accept(
    request: *mut knit_stream_request_t,
    branch: *const c_char,
    subscriber_out: *mut *mut knit_stream_subscriber_t,
) -> knit_status_t {
    guard(|| {
        if !subscriber_out.is_null() {
            // SAFETY: non-NULL and writable (caller's contract).
            unsafe { subscriber_out.write(std::ptr::null_mut()) };
        }
        // SAFETY: caller's contract.
        let branch = unsafe { opt_str(branch, "branch") }?.unwrap_or("");
        let r = take_request(request)?;
        let _ = ACCEPTED.try_with(|a| *a.borrow_mut() = Some(None));
        r.req.accept_on_branch(branch);
        let added = ACCEPTED
            .try_with(|a| a.borrow_mut().take())
            .ok()
            .flatten()
            .flatten();
        let Some(sub) = added else {
            return Err(Failure::new(Status::Closed, "the stream is closed"));
        };
        if subscriber_out.is_null() {
            return Ok(());
        }
        let inserted = lock(&SUBSCRIBERS).insert(SubscriberEntry {
            owner: r.owner,
            stream: r.stream,
            sub,
        });
        let h = inserted.map_err(|(e, _)| handle_failure(e, "subscriber"))?;
        // The stream may have closed meanwhile: then the handle must not outlive it.
        if lock(&STREAMS).get_where(|s| s.id == r.stream).is_none() {
            drop(lock(&SUBSCRIBERS).remove(h));
            return Err(Failure::new(Status::Closed, "the stream is closed"));
        }
        // SAFETY: checked above.
        unsafe { subscriber_out.write(std::ptr::without_provenance_mut(h)) };
        Ok(())
    })
}

/// Rejects a subscription request; the subscriber's `knit_stream_subscribe` fails with
/// `KNIT_METHOD_FAILED` and "Subscription rejected by user. <reason>" (`reason` NULL: "").
///
/// # Safety
/// `reason` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_reject(
    request: *mut knit_stream_request_t,
    reason: *const c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let reason = unsafe { opt_str(reason, "reason") }?.unwrap_or("");
        take_request(request)?.req.reject(reason);
        Ok(())
    })
}

/// Pushes `data_json` (a JSON object) to this subscriber alone (it sees
/// `KNIT_STREAM_PRIVATE`). A subscription that has ended ignores it.
///
/// # Safety
/// `data_json` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_subscriber_push(
    subscriber: *mut knit_stream_subscriber_t,
    data_json: *const c_char,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let data = unsafe { item_arg(data_json) }?;
        Ok(subscriber_of(subscriber)?.push(data)?)
    })
}

/// Ends this one subscription (the subscriber hears "Server dropping a single subscription")
/// and frees the handle.
#[no_mangle]
pub extern "C" fn knit_stream_subscriber_close(
    subscriber: *mut knit_stream_subscriber_t,
) -> knit_status_t {
    guard(|| {
        let e = lock(&SUBSCRIBERS)
            .remove(subscriber.addr())
            .map_err(|e| handle_failure(e, "subscriber"))?;
        e.sub.close();
        Ok(())
    })
}

/// Frees a subscriber handle; the subscription goes on.
#[no_mangle]
pub extern "C" fn knit_stream_subscriber_free(
    subscriber: *mut knit_stream_subscriber_t,
) -> knit_status_t {
    guard(|| {
        drop(
            lock(&SUBSCRIBERS)
                .remove(subscriber.addr())
                .map_err(|e| handle_failure(e, "subscriber"))?,
        );
        Ok(())
    })
}

/// Subscribes to the stream `name` with `args_json` (NULL: `{}`) on `target` (NULL or "best",
/// "all", an application name, or JSON as for `knit_invoke_ex`; "skip-mine" is refused),
/// waiting up to `wait_ms` for a server to appear (0: fail at once with `KNIT_NO_SERVER`) and
/// `timeout_ms` (0: `KNIT_DEFAULT_TIMEOUT_MS`) for one to accept. Returns once a server
/// accepted; every server rejecting gives `KNIT_METHOD_FAILED` with the reason. `on_data`
/// (required) gets each item and `on_closed` (NULL: not wanted) the end, on the client's
/// dispatcher thread (or inside `knit_client_poll`; a poll-mode client cannot subscribe to its
/// own stream, as it cannot decide the request while it waits). End it with
/// `knit_subscription_close`.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; the callbacks and `user_data` stay valid until
/// `knit_subscription_close` (or `knit_client_close`) returns; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn knit_stream_subscribe(
    client: *mut knit_client_t,
    name: *const c_char,
    args_json: *const c_char,
    target: *const c_char,
    wait_ms: u32,
    timeout_ms: u32,
    on_data: knit_stream_data_fn,
    on_closed: knit_stream_closed_fn,
    user_data: *mut c_void,
    out: *mut *mut knit_subscription_t,
) -> knit_status_t {
    guard(|| {
        // SAFETY: caller's contract.
        let (name, args, target) = unsafe {
            clear_out(out, "out")?;
            (
                req_str(name, "name")?,
                json_arg(args_json, "args_json", Value::map())?,
                opt_str(target, "target")?,
            )
        };
        let on_data = on_data.ok_or_else(|| Failure::invalid("on_data is NULL"))?;
        let params = StreamParams {
            arguments: args,
            target: parse_target(target)?,
            wait: Duration::from_millis(u64::from(wait_ms)),
            timeout: timeout(timeout_ms),
        };
        let e = client_of(client)?;
        let gate = Arc::new(Gate::new());
        let g = gate.clone();
        let ud = UserData(user_data);
        let sub = e.client.subscribe_stream(name, params, move |ev| {
            let ud = ud;
            let Some(_inside) = g.enter() else { return };
            match ev {
                StreamEvent::Data {
                    data,
                    server,
                    private,
                    gap,
                } => {
                    let data = c_text(&data.to_json_string());
                    let server = c_text(&server.to_value().to_json_string());
                    let flags = if *private { KNIT_STREAM_PRIVATE } else { 0 };
                    // SAFETY: the app gave `on_data` with this signature; the strings live
                    // for the call, as the contract says.
                    unsafe { on_data(ud.0, data.as_ptr(), server.as_ptr(), flags, *gap) }
                }
                StreamEvent::Closed {
                    reason,
                    server_initiated,
                } => {
                    if let Some(f) = on_closed {
                        let reason = c_text(reason);
                        let flags = if *server_initiated {
                            KNIT_STREAM_SERVER_INITIATED
                        } else {
                            0
                        };
                        // SAFETY: as above.
                        unsafe { f(ud.0, reason.as_ptr(), flags) }
                    }
                }
            }
        });
        // A failed subscribe calls back no more (its `user_data` is the app's again): a
        // callback queued meanwhile finds the gate closed.
        let sub = sub.inspect_err(|_| gate.close_and_wait())?;
        // SAFETY: `out` checked by `clear_out`.
        unsafe { add(&e, gate, Inner::Stream(sub), out) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> knit_core::wire::Map {
        match Value::from_json_str(s).unwrap() {
            Value::Map(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn policies_parse_with_their_parameters() {
        let (p, q) = policy_of(&opts("{}")).unwrap();
        assert_eq!(p, SlowConsumerPolicy::Block(Duration::from_secs(5)));
        assert_eq!(q, 1024);
        let (p, q) = policy_of(&opts(r#"{"policy":"block","blockMs":20,"queue":3}"#)).unwrap();
        assert_eq!(p, SlowConsumerPolicy::Block(Duration::from_millis(20)));
        assert_eq!(q, 3);
        assert_eq!(
            policy_of(&opts(r#"{"policy":"drop-oldest"}"#)).unwrap().0,
            SlowConsumerPolicy::DropOldest
        );
        assert_eq!(
            policy_of(&opts(r#"{"policy":"conflate","conflateKey":"sym"}"#))
                .unwrap()
                .0,
            SlowConsumerPolicy::Conflate("sym".into())
        );
        for bad in [
            r#"{"policy":"conflate"}"#,
            r#"{"policy":"lossy"}"#,
            r#"{"queue":0}"#,
            r#"{"queue":-1}"#,
            r#"{"blockMs":"x"}"#,
        ] {
            assert_eq!(
                policy_of(&opts(bad)).unwrap_err().status,
                Status::InvalidArgument,
                "{bad}"
            );
        }
    }
}
