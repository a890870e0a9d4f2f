//! Subscription handles: one type, `knit_subscription_t`, for everything that calls the app
//! back until it is closed — context, bus and stream subscriptions and discovery-event
//! callbacks — and one way to end them, `knit_subscription_close`.

use crate::client::{handle_failure, ClientEntry};
use crate::gate::Gate;
use crate::handle::{Table, KIND_SUBSCRIPTION};
use crate::status::{guard, knit_status_t, Failure, FfiResult};
use knit_core::client::{
    BusSubscription, ChannelSubscription, ClientSubscription, ContextSubscription,
    EventSubscription,
};
use knit_core::Status;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

/// A subscription (opaque): to a context (`knit_context_subscribe`), a bus topic
/// (`knit_subscribe`), a stream (`knit_stream_subscribe`), discovery events
/// (`knit_events_subscribe`) or channels (`knit_channel_subscribe`, `_subscribe_for`,
/// `_on_changed`). Ended by `knit_subscription_close`, or by closing its client.
/// A checked token like every knit handle.
#[derive(Debug)]
pub struct knit_subscription {
    _opaque: [u8; 0],
}

/// See `knit_subscription`.
pub type knit_subscription_t = knit_subscription;

/// The Rust subscription a handle keeps alive; dropping it ends the subscription (never read:
/// it is held for its `Drop`).
#[allow(dead_code)]
pub(crate) enum Inner {
    Context(ContextSubscription),
    Bus(BusSubscription),
    Stream(ClientSubscription),
    Events(EventSubscription),
    Channel(ChannelSubscription),
    /// Nothing to drop: the gate alone silences the callback (the Rust API keeps it).
    Gate,
}

struct SubEntry {
    /// The client (`ClientEntry::id`) it belongs to.
    owner: u64,
    gate: Arc<Gate>,
    inner: Inner,
}

static SUBS: Mutex<Table<SubEntry>> = Mutex::new(Table::new(KIND_SUBSCRIPTION));

fn subs() -> std::sync::MutexGuard<'static, Table<SubEntry>> {
    SUBS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ends a subscription: its gate closes (waiting for a running callback on another thread),
/// then the Rust subscription is dropped.
fn end(e: SubEntry) {
    e.gate.close_and_wait();
    drop(e.inner);
}

/// Stores a new subscription of `client` and writes its handle to `*out` (checked by the
/// caller with `clear_out`).
///
/// # Safety
/// `out` is valid for a write.
pub(crate) unsafe fn add(
    client: &ClientEntry,
    gate: Arc<Gate>,
    inner: Inner,
    out: *mut *mut knit_subscription_t,
) -> FfiResult {
    let inserted = subs().insert(SubEntry {
        owner: client.id,
        gate,
        inner,
    });
    let h = match inserted {
        Ok(h) => h,
        Err((e, entry)) => {
            end(entry);
            return Err(handle_failure(e, "subscription"));
        }
    };
    // SYNC(client-closed): SeqCst with `knit_client_close`, which sets the flag before it
    // sweeps this table: either the sweep sees our entry, or we see the flag.
    if client.closed.load(Ordering::SeqCst) {
        // Not `if let Ok(e) = subs().remove(h)`: that holds the table's lock through `end`,
        // which waits for a callback of this subscription — and one running already (it may
        // run before this returns) that closes the client waits for the lock in
        // `release_subscriptions`: a deadlock.
        let removed = subs().remove(h);
        if let Ok(e) = removed {
            end(e);
        }
        return Err(Failure::new(Status::Closed, "client is closed"));
    }
    // SAFETY: the caller's contract.
    unsafe { out.write(std::ptr::without_provenance_mut(h)) };
    Ok(())
}

/// Ends every subscription of client `owner` (its client is closing).
pub(crate) fn release_subscriptions(owner: u64) {
    let gone = subs().remove_where(|e| e.owner == owner);
    for e in gone {
        end(e);
    }
}

/// Ends a subscription. When it returns, its callback is not running and will not be called
/// again — unless it is called from inside that very callback, which then finishes after it
/// returns and is not called again; `user_data` may be freed once that callback has returned.
/// A stream subscription tells its servers ("ClientInitiated"); its `on_closed` is not called
/// for a close the app asked for. A second close, or a close after the subscription's client
/// was closed, gives `KNIT_CLOSED`.
#[no_mangle]
pub extern "C" fn knit_subscription_close(subscription: *mut knit_subscription_t) -> knit_status_t {
    guard(|| {
        let e = subs()
            .remove(subscription.addr())
            .map_err(|e| handle_failure(e, "subscription"))?;
        end(e);
        Ok(())
    })
}
