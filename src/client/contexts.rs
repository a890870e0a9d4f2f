//! Shared contexts on the client: reads straight from the context's shared snapshot (no
//! message, no syscall; decoded once per version and cached), writes under the context's writer
//! lock directly into shared memory, and subscriptions fed by following the context's delta log
//! on the pumping thread.

use super::conn::Reply;
use super::cow::{with_kept, CowList, Kept};
use super::engine::{Shared, Task};
use super::ClientError;
use crate::model::context::{apply_owned, Change, ContextError as ModelError, ContextOp};
use crate::model::policy::Action as PolicyAction;
use crate::shm::ContextSegment;
use crate::status::Status;
use crate::store::context::{WriteError, KIND_OP};
use crate::store::{Follower, LogEvent, Store, StoreError};
use crate::wire::frame::{Instance, ToGateway};
use crate::wire::{codec, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a writer waits for another writer's lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Events queued per context before the pumper stops reading its log (then a writer that laps
/// us makes us resynchronise: memory stays bounded, state is never lost).
const MAX_QUEUED: usize = 256;
/// How long a follower waits to learn who a brand-new writer is (see `updater_of`).
const UPDATER_WAIT: Duration = Duration::from_millis(50);

/// Why a context operation failed.
#[derive(Debug, Error)]
pub enum ContextError {
    /// A bad path or value.
    #[error("{0}")]
    InvalidArgument(String),
    /// A context name that is empty or longer than the gateway allows (`BAD_INPUT`, as an
    /// empty name has always been, and as the gateway answers it).
    #[error("{0}")]
    InvalidName(String),
    /// `destroy` of a context that does not exist.
    #[error("context with {0} does not exist")]
    NotFound(String),
    /// `update_if` with a version that is no longer current.
    #[error("context {name} is at version {current}, not {expected}")]
    Stale {
        name: String,
        expected: u64,
        current: u64,
    },
    /// The value is larger than the gateway allows.
    #[error("value of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// This peer may not write (or read) the context.
    #[error("not authorized to {0} context")]
    PermissionDenied(&'static str),
    /// Another writer held the lock too long.
    #[error("context busy")]
    Busy,
    /// The context's shared memory does not validate.
    #[error("context corrupt: {0}")]
    Corrupt(String),
    /// The client or its connection.
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl ContextError {
    /// The status code for this error.
    pub fn status(&self) -> Status {
        match self {
            ContextError::InvalidArgument(_) => Status::BadInput,
            ContextError::InvalidName(_) => Status::BadInput,
            ContextError::NotFound(_) => Status::NotFound,
            ContextError::Stale { .. } => Status::AlreadyExists,
            ContextError::TooLarge { .. } => Status::PayloadTooLarge,
            ContextError::PermissionDenied(_) => Status::PermissionDenied,
            ContextError::Busy => Status::Busy,
            ContextError::Corrupt(_) => Status::Protocol,
            ContextError::Client(e) => e.status(),
        }
    }
}

impl From<ModelError> for ContextError {
    fn from(e: ModelError) -> Self {
        ContextError::InvalidArgument(e.to_string())
    }
}

impl From<StoreError> for ContextError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TooLarge { size, max } => ContextError::TooLarge { size, max },
            StoreError::Busy => ContextError::Busy,
            StoreError::Corrupt(w) => ContextError::Corrupt(w.to_string()),
        }
    }
}

/// A context's value at one version.
#[derive(Debug, Clone)]
pub struct ContextSnapshot {
    pub name: String,
    /// 0 when the context does not exist (then `data` is `{}`).
    pub version: u64,
    /// Always an object.
    pub data: Arc<Value>,
}

/// One change, as a subscriber sees it.
#[derive(Debug, Clone)]
pub struct ContextUpdate {
    pub name: Arc<str>,
    pub version: u64,
    /// The whole new value.
    pub data: Arc<Value>,
    /// What changed (features.md §5.4); the whole value for the first callback and for `set`.
    pub delta: Value,
    /// Top-level keys removed.
    pub removed: Vec<String>,
    /// Who wrote it (`None` when unknown: the writer left, or the update is a resynchronisation).
    pub updater: Option<Arc<Instance>>,
    /// True for the first callback of a subscription (the current value).
    pub first: bool,
    /// True when intermediate versions were skipped (this subscriber fell behind, or a writer
    /// died mid-publication): `data` is current, `delta` is the difference from what this
    /// subscriber saw last.
    pub conflated: bool,
}

pub(crate) type ContextCallback = Arc<dyn Fn(&ContextUpdate) + Send + Sync>;

/// A subscription; dropping it (or `unsubscribe`) stops the callbacks.
pub struct ContextSubscription {
    shared: std::sync::Weak<Shared>,
    sub: Arc<Sub>,
}

impl std::fmt::Debug for ContextSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextSubscription")
            .field("name", &self.sub.name)
            .finish()
    }
}

impl ContextSubscription {
    /// Stops the callbacks.
    pub fn unsubscribe(self) {}
}

impl Drop for ContextSubscription {
    fn drop(&mut self) {
        // SYNC(sub-active): pairs with the Acquire loads that skip inactive subs; the flag is
        // the whole message (no more callbacks), nothing else is published through it.
        self.sub.active.store(false, Ordering::Release);
        if let Some(shared) = self.shared.upgrade() {
            detach(&shared, &self.sub);
        }
    }
}

const NEEDS_SNAPSHOT: u64 = u64::MAX;

pub(crate) struct Sub {
    id: u64,
    name: String,
    cb: ContextCallback,
    /// Versions up to this one were already delivered (by the first callback);
    /// `NEEDS_SNAPSHOT` until then.
    start: AtomicU64,
    /// Cleared when the subscription is dropped (`SYNC(sub-active)`): no more callbacks.
    active: AtomicBool,
    /// What the subscription had when `migrate` moved it, after its first callback, to a
    /// context's new segment (its `start` is `NEEDS_SNAPSHOT` again): the first-callback pass
    /// gives it one conflated update from this instead of a first callback. Set while the sub
    /// is in no list, taken under the list's lock (`pump_follow`), cleared by `destroyed`.
    carry: Mutex<Option<Arc<Value>>>,
    /// The subscription waited for its context to be created (subscribed before it existed,
    /// or its context was destroyed): the value it gets when the context comes is the
    /// creation, a change by its writer (`first` false, `updater` the creator), not a state
    /// shown on subscribing. Set before the sub goes into `waiting`, taken under the list's
    /// lock by the first-callback pass (`SYNC(sub-waited)`: the list's lock orders both).
    waited: AtomicBool,
}

/// A mapped context.
pub(crate) struct CtxEntry {
    pub id: u64,
    pub name: Arc<str>,
    pub store: Store<ContextSegment>,
    pub writable: bool,
    /// The segment's (device, inode): tells whether the segment a new gateway connection
    /// hands out is this one.
    file: Option<(u64, u64)>,
    /// The last decoded snapshot.
    cache: Mutex<Option<(u64, Arc<Value>)>>,
    /// The dispatcher keeps the list it took while it is current (see `deliver`).
    subs: CowList<Arc<Sub>>,
    /// Events queued for the dispatcher.
    queued: AtomicUsize,
    /// Which follow of its log the pumper keeps: the claim (`NEXT_CLAIM`) of the follow made
    /// when the context was last taken up, 0 while nobody follows it. A follow of an earlier
    /// claim is stale even when the context is followed again: the pumper drops it.
    followed: AtomicU64,
    /// A subscription was added that still needs its first callback.
    new_subs: AtomicBool,
    /// Set when the entry is replaced, destroyed or unreadable (`SYNC(ctx-closed)`).
    closed: AtomicBool,
    /// The mapping, for [`CtxEntry::prefault`].
    seg: ContextSegment,
    /// Whether this process has faulted in the pages the hot path touches.
    prefaulted: AtomicBool,
}

impl CtxEntry {
    /// Faults in the hot pages (the log and the start of both buffers, ~96 KiB) once, when the
    /// context is used for delivery: by a subscriber when it starts following, by a writer once
    /// the context has subscribers. Not when a context is merely opened: 10 000 contexts
    /// nobody follows would otherwise hold ~1 GiB of shared memory (docs/load.md).
    fn prefault(&self) {
        // Relaxed: only whether the (idempotent) populate call is still owed.
        if !self.prefaulted.load(Ordering::Relaxed)
            && !self.prefaulted.swap(true, Ordering::Relaxed)
        {
            self.seg.prefault(self.writable);
        }
    }
}

/// The client's view of contexts.
#[derive(Default)]
pub(crate) struct CtxState {
    /// Names the gateway announced, with their ids.
    pub known: BTreeMap<String, u64>,
    pub open: HashMap<String, Arc<CtxEntry>>,
    /// Subscriptions to contexts that do not exist yet.
    pub waiting: HashMap<String, Vec<Arc<Sub>>>,
    /// Tests only: while `Some`, the gateway's context notices (`true`: added, `false`:
    /// destroyed) are kept here instead of being applied (a connection thread that has not read
    /// them yet), until [`release_notices`].
    #[cfg(test)]
    pub held: Option<Vec<(bool, u64, String)>>,
}

/// What the pumper keeps per followed context.
pub(crate) struct CtxFollow {
    entry: Arc<CtxEntry>,
    /// The `followed` claim this follow was made for.
    claim: u64,
    f: Follower,
    /// Our copy of the data at `version` (an object; None until the first snapshot).
    data: Option<Arc<Value>>,
    /// The last writer seen, resolved (saves a peer-table lookup per update).
    last_updater: Option<(u64, Option<Arc<Instance>>)>,
    /// Who wrote `version` (its token; 0: unknown, as after a conflated catch-up).
    writer: u64,
    version: u64,
    buf: Vec<u8>,
    /// The shared memory failed validation and our copy could not be refreshed from the
    /// snapshot: logged records are not applied to it, each one retries the snapshot instead.
    /// Set once per episode, which is when the error is reported.
    broken: bool,
}

impl CtxFollow {
    /// A follow of `entry` from its start, for `claim`.
    fn new(entry: &Arc<CtxEntry>, claim: u64) -> CtxFollow {
        CtxFollow {
            f: entry.store.follower(),
            entry: entry.clone(),
            claim,
            data: None,
            last_updater: None,
            writer: 0,
            version: 0,
            buf: Vec::new(),
            broken: false,
        }
    }

    pub(crate) fn has_data(&self) -> bool {
        self.data.is_none() || self.f.has_more(&self.entry.store) || self.needs_snapshot()
    }

    fn needs_snapshot(&self) -> bool {
        // SYNC(new_subs): pairs with the Release stores in `attach_sub_inner` and `migrate`:
        // the subs pushed before them are in the list `pump_follow` then takes.
        self.entry.new_subs.load(Ordering::Acquire)
    }

    pub(crate) fn is_closed(&self) -> bool {
        // SYNC(ctx-closed), SYNC(followed): pair with the Release stores that close the entry and
        // the RMWs that let go of it or take it up again; only the values are read (the pumper
        // then drops this follow).
        self.entry.closed.load(Ordering::Acquire)
            || self.entry.followed.load(Ordering::Acquire) != self.claim
    }
}

fn invalid(msg: &str) -> ContextError {
    ContextError::InvalidArgument(msg.to_string())
}

/// The gateway's check of a context name ([`crate::model::check_context_name`]), made before
/// asking it: a name no context can have is refused at once, whatever the operation.
fn check_name(name: &str) -> Result<(), ContextError> {
    crate::model::check_context_name(name, crate::model::MAX_NAME_LEN)
        .map_err(ContextError::InvalidName)
}

fn decode_map(bytes: &[u8]) -> Result<Map, ContextError> {
    if bytes.is_empty() {
        return Ok(Map::new());
    }
    match codec::decode(bytes) {
        Ok(Value::Map(m)) => Ok(m),
        Ok(_) => Err(ContextError::Corrupt("snapshot is not an object".into())),
        Err(e) => Err(ContextError::Corrupt(format!(
            "snapshot does not decode: {e}"
        ))),
    }
}

/// Maps the context (asking the gateway the first time). `Ok(None)` when it does not exist.
pub(crate) fn open(
    shared: &Arc<Shared>,
    name: &str,
) -> Result<Option<Arc<CtxEntry>>, ContextError> {
    let found = shared
        .ctx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .open
        .get(name)
        .cloned();
    match found {
        // Destroyed, and our connection has not read the notice yet (another client's destroy
        // may have returned long before): forgotten as the notice will have it, and asked for
        // as a name we do not know. A mark the gateway denies is read through.
        Some(e) if e.store.ctl().is_retired() => Ok(gone_for_good(shared, &e)?.unwrap_or(Some(e))),
        Some(e) => Ok(Some(e)),
        // Not known here does not mean it does not exist: its announcement may still be on
        // its way, so ask the gateway (a miss costs one round trip; hits are local).
        None => ask_gateway(shared, name),
    }
}

/// The gateway's entry for context `name`; `None` if there is none.
fn ask_gateway(shared: &Arc<Shared>, name: &str) -> Result<Option<Arc<CtxEntry>>, ContextError> {
    let name = name.to_string();
    match shared
        .conn
        .request(|req| ToGateway::OpenContext { req, name }, CONTROL_TIMEOUT)?
    {
        Reply::Context(e) => Ok(Some(e)),
        Reply::Fail(Status::NotFound, _) => Ok(None),
        Reply::Fail(status, message) => Err(ContextError::Client(ClientError::Gateway {
            status,
            message,
        })),
        _ => Err(ContextError::Client(ClientError::Protocol(
            "unexpected reply to open-context".into(),
        ))),
    }
}

/// Builds the entry for a segment the gateway sent (control thread).
pub(crate) fn attach(
    shared: &Arc<Shared>,
    id: u64,
    name: String,
    writable: bool,
    fd: &std::os::fd::OwnedFd,
) -> Result<Arc<CtxEntry>, String> {
    let file = crate::sys::memfd::file_id(fd).ok();
    let mut st = shared.ctx.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = st.open.get(&name) {
        // The same segment (a context opened twice, or kept across a gateway restart).
        if e.id == id && e.writable == writable && e.file == file && file.is_some() {
            return Ok(e.clone());
        }
    }
    let seg = if writable {
        ContextSegment::open(fd)
    } else {
        ContextSegment::open_readonly(fd)
    }
    .map_err(|e| e.to_string())?;
    let store = Store::new(seg.clone()).map_err(|e| e.to_string())?;
    let entry = Arc::new(CtxEntry {
        id,
        name: Arc::from(name.as_str()),
        store,
        writable,
        file,
        cache: Mutex::new(None),
        subs: CowList::default(),
        queued: AtomicUsize::new(0),
        followed: AtomicU64::new(0),
        new_subs: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        seg,
        prefaulted: AtomicBool::new(false),
    });
    st.known.insert(name.clone(), id);
    if let Some(old) = st.open.insert(name, entry.clone()) {
        // SYNC(ctx-closed): pairs with `last_written` (which then looks the name up again and
        // finds the new entry) and `CtxFollow::is_closed` (the pumper drops the old follow).
        old.closed.store(true, Ordering::Release);
    }
    Ok(entry)
}

/// A context was announced (control thread): subscriptions waiting for it attach.
pub(crate) fn announced(shared: &Arc<Shared>, id: u64, name: String) {
    #[cfg(test)]
    if held_back(shared, true, id, &name) {
        return;
    }
    announce(shared, id, name)
}

fn announce(shared: &Arc<Shared>, id: u64, name: String) {
    let waiting = {
        let mut st = shared.ctx.lock().unwrap_or_else(|e| e.into_inner());
        st.known.insert(name.clone(), id);
        st.waiting.remove(&name).unwrap_or_default()
    };
    if waiting.is_empty() {
        return;
    }
    // Attaching needs control round trips; the control thread must not wait for its own replies.
    let shared = shared.clone();
    let _ = std::thread::Builder::new()
        .name("knit-ctx-attach".into())
        .spawn(move || {
            // Under the gate: a reconnection's restore comes after, and finds a sub that lost
            // its connection back among the waiting ones.
            let _gate = shared.conn.gate.enter();
            for sub in waiting {
                // SYNC(sub-active): pairs with `ContextSubscription::drop`; a dropped sub is
                // not attached.
                if sub.active.load(Ordering::Acquire) {
                    if let Err(e) = attach_sub_inner(&shared, sub.clone()) {
                        attach_failed(&shared, sub, &e);
                    }
                }
            }
        });
}

/// Puts `sub` among the subscriptions waiting for their context to be announced.
fn wait_for_context(shared: &Shared, sub: Arc<Sub>) {
    shared
        .ctx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .waiting
        .entry(sub.name.clone())
        .or_default()
        .push(sub);
}

/// `sub` could not attach to its context (`e`). Without the gateway it waits again, for the
/// reconnection's restore to attach it (it was in no entry and no list, so it was lost: a
/// context created just as the gateway stopped was never delivered to it); otherwise the
/// failure is logged.
fn attach_failed(shared: &Shared, sub: Arc<Sub>, e: &ContextError) {
    // The connection, not the context, failed it (it may be back already: the restore that
    // follows waits for the gate this runs under).
    let lost = matches!(
        e.status(),
        Status::Disconnected | Status::GatewayUnreachable
    ) || !shared.conn.is_connected();
    if lost && !shared.is_closed() {
        crate::log::debug(format_args!(
            "context {:?}: subscribing again once the gateway is back ({e})",
            sub.name
        ));
        wait_for_context(shared, sub);
        return;
    }
    crate::log::warn(format_args!(
        "cannot subscribe to context {:?}: {e}",
        sub.name
    ));
}

/// The gateway's notice that context `id` is destroyed (control thread).
pub(crate) fn destroy_notice(shared: &Arc<Shared>, id: u64, name: &str) {
    #[cfg(test)]
    if held_back(shared, false, id, name) {
        return;
    }
    destroyed(shared, id, name)
}

/// Tests only: keeps a context notice (`added`, else destroyed) for [`release_notices`] while
/// a test holds them back; whether it did.
#[cfg(test)]
fn held_back(shared: &Arc<Shared>, added: bool, id: u64, name: &str) -> bool {
    let mut st = shared.ctx.lock().unwrap_or_else(|e| e.into_inner());
    let Some(held) = st.held.as_mut() else {
        return false;
    };
    held.push((added, id, name.to_string()));
    true
}

/// Tests only: from now on the gateway's context notices wait for [`release_notices`].
#[cfg(test)]
fn hold_notices(shared: &Arc<Shared>) {
    shared.ctx.lock().unwrap().held = Some(Vec::new());
}

/// Tests only: applies the context notices held since [`hold_notices`], in order, and stops
/// holding them.
#[cfg(test)]
fn release_notices(shared: &Arc<Shared>) {
    let held = shared.ctx.lock().unwrap().held.take().unwrap_or_default();
    for (added, id, name) in held {
        if added {
            announce(shared, id, name);
        } else {
            destroyed(shared, id, &name);
        }
    }
}

/// A context was destroyed: forget it; its subscribers wait for it to come back, as io.Connect
/// subscriptions (by name) do.
pub(crate) fn destroyed(shared: &Arc<Shared>, id: u64, name: &str) {
    let mut st = shared.ctx.lock().unwrap_or_else(|e| e.into_inner());
    if st.known.get(name) == Some(&id) {
        st.known.remove(name);
    }
    if let Some(e) = st.open.get(name).filter(|e| e.id == id).cloned() {
        st.open.remove(name);
        // SYNC(ctx-closed): pairs with `last_written` and `CtxFollow::is_closed`: writers stop
        // using the entry and the pumper drops its follow.
        e.closed.store(true, Ordering::Release);
        let subs = e.subs.change(std::mem::take);
        for s in &subs {
            // Not an update from what it had before a move: the context it gets next is a new
            // one, and what it gets first is that context's creation.
            *s.carry.lock().unwrap_or_else(|e| e.into_inner()) = None;
            // SYNC(sub-waited): as in `subscribe`.
            s.waited.store(true, Ordering::Relaxed);
            // SYNC(sub-start): pairs with the Acquire loads in `pump_follow`, `settle` and
            // `deliver_to`: the sub needs a first callback again once it is re-attached. It was
            // taken out of the list first, so a first-callback pass (which stores under the
            // list's lock) that gave it this entry's version stored before this.
            s.start.store(NEEDS_SNAPSHOT, Ordering::Release);
        }
        let live: Vec<Arc<Sub>> = subs
            .into_iter()
            // SYNC(sub-active): pairs with `ContextSubscription::drop`; only the flag is read.
            .filter(|s| s.active.load(Ordering::Acquire))
            .collect();
        // Nothing waits when nobody subscribed: no entry (a process that creates and destroys
        // contexts all day would otherwise keep one per name).
        if !live.is_empty() {
            st.waiting.entry(name.to_string()).or_default().extend(live);
        }
    }
}

/// Every context name we know of.
pub(crate) fn all(shared: &Shared) -> Vec<String> {
    shared
        .ctx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .known
        .keys()
        .cloned()
        .collect()
}

/// The current value: from our cache when the version has not moved, else from the snapshot.
pub(crate) fn get(shared: &Arc<Shared>, name: &str) -> Result<ContextSnapshot, ContextError> {
    check_name(name)?;
    let mut retired = 0;
    let entry = loop {
        let Some(entry) = open(shared, name)? else {
            return Ok(ContextSnapshot {
                name: name.to_string(),
                version: 0,
                data: Arc::new(Value::map()),
            });
        };
        #[cfg(test)]
        super::hook::at("get: entry found, not read yet");
        // Destroyed since `open` looked, and our connection has not read the notice yet:
        // forgotten as the notice will have it, and looked up again (as in `write`). After that
        // many, what the gateway hands out is what there is. A mark the gateway denies is read
        // through.
        if retired < MAX_RETIRED
            && entry.store.ctl().is_retired()
            && gone_for_good(shared, &entry)?.is_some()
        {
            retired += 1;
            continue;
        }
        break entry;
    };
    let (version, data) = snapshot(&entry)?;
    Ok(ContextSnapshot {
        name: name.to_string(),
        version,
        data,
    })
}

fn snapshot(entry: &CtxEntry) -> Result<(u64, Arc<Value>), ContextError> {
    let v = entry.store.ctl().version();
    if let Some((cv, data)) = entry
        .cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        if *cv == v {
            return Ok((v, data.clone()));
        }
    }
    let mut buf = Vec::new();
    let info = entry.store.read(&mut buf)?;
    let data = Arc::new(Value::Map(decode_map(&buf)?));
    remember(entry, info.version, &data);
    Ok((info.version, data))
}

fn remember(entry: &CtxEntry, version: u64, data: &Arc<Value>) {
    let mut c = entry.cache.lock().unwrap_or_else(|e| e.into_inner());
    if c.as_ref().is_none_or(|(v, _)| *v < version) {
        *c = Some((version, data.clone()));
    }
}

fn as_object(data: Value) -> Result<Map, ContextError> {
    match data {
        Value::Map(m) => Ok(m),
        _ => Err(invalid("Please provide the data as an object!")),
    }
}

/// Applies `op` under the context's writer lock. Returns the version after the call (unchanged
/// when the op changed nothing).
pub(crate) fn write(
    shared: &Arc<Shared>,
    name: &str,
    op: ContextOp,
    expect: Option<u64>,
) -> Result<u64, ContextError> {
    check_name(name)?;
    if shared.is_closed() {
        return Err(ClientError::Closed.into());
    }
    let mut retired = 0;
    loop {
        let entry = match entry_to_write(shared, name, &op, expect)? {
            ToWrite::Open(entry) => entry,
            // The gateway made the context holding what the write gives it: done.
            ToWrite::Made { entry, version } => {
                remember_written(shared, &entry);
                return Ok(version);
            }
        };
        #[cfg(test)]
        super::hook::at("write: entry found, not written yet");
        // Take the cached value out, so that (if nobody else holds it) the write updates it in
        // place.
        let cached = entry.cache.lock().unwrap_or_else(|e| e.into_inner()).take();
        let token = shared.my_id().0;
        let r = crate::store::context::write(
            &entry.store,
            token,
            &op,
            expect,
            shared.max_payload(),
            LOCK_TIMEOUT,
            cached,
        );
        let (v, changed, data) = match r {
            // Destroyed, and our connection has not read the notice yet (another client's
            // destroy may have returned long before): nothing was written. The entry is
            // forgotten as the notice will have it, and the name looked up again, which creates
            // the context anew (or finds the one created since).
            Err(WriteError::Retired) if retired < MAX_RETIRED => {
                retired += 1;
                if gone_for_good(shared, &entry)?.is_none() {
                    return Err(ContextError::Corrupt(
                        "the context's segment is marked destroyed, but the gateway still has it"
                            .into(),
                    ));
                }
                continue;
            }
            r => r.map_err(|e| match e {
                WriteError::Model(m) => m.into(),
                WriteError::Store(s) => s.into(),
                WriteError::Stale { expected, current } => ContextError::Stale {
                    name: name.to_string(),
                    expected,
                    current,
                },
                WriteError::TooLarge { size, max } => ContextError::TooLarge { size, max },
                WriteError::Corrupt(m) => ContextError::Corrupt(m),
                WriteError::Encode(e) => ContextError::InvalidArgument(e.to_string()),
                WriteError::Retired => {
                    ContextError::Corrupt("every segment handed out for it is destroyed".into())
                }
            })?,
        };
        remember(&entry, v, &data);
        remember_written(shared, &entry);
        if changed {
            ring_subscribers(shared, &entry);
        }
        return Ok(v);
    }
}

/// Whether `entry`, whose segment is marked destroyed ([`crate::store::StoreCtl::retire`]), is
/// gone at the gateway too; if so it is forgotten here, as the gateway's notice will have it.
/// The mark lives in memory every writer of the context maps, so a broken or hostile peer can
/// set it on a live context: taken on trust, it would detach this client's subscriptions from a
/// context that goes on, for good. So the gateway is asked (one round trip, only on this path).
///
/// `None`: the gateway still has it (a mark it denies). `Some`: what the gateway has under the
/// name now, if anything (the answer that told us).
fn gone_for_good(
    shared: &Arc<Shared>,
    entry: &Arc<CtxEntry>,
) -> Result<Option<Option<Arc<CtxEntry>>>, ContextError> {
    let now = ask_gateway(shared, &entry.name)?;
    if now.as_ref().is_some_and(|e| e.id == entry.id) {
        return Ok(None);
    }
    destroyed(shared, entry.id, &entry.name);
    Ok(Some(now))
}

/// How many destroyed segments one write looks past (each one a destroy that raced it; only a
/// broken segment is found destroyed every time).
const MAX_RETIRED: usize = 3;

/// Where a write goes.
enum ToWrite {
    /// An existing context's entry, to write the op to.
    Open(Arc<CtxEntry>),
    /// A context the gateway made for the write, holding what the op gives a new context (at
    /// `version`): nothing is left to write.
    Made { entry: Arc<CtxEntry>, version: u64 },
}

/// The entry a write of `op` goes to: the one this thread wrote last, the open one, or the
/// context the gateway makes for it.
fn entry_to_write(
    shared: &Arc<Shared>,
    name: &str,
    op: &ContextOp,
    expect: Option<u64>,
) -> Result<ToWrite, ContextError> {
    let entry = match last_written(shared, name)
        .map_or_else(|| open(shared, name), |e| Ok(Some(e)))?
    {
        Some(e) => e,
        None => {
            // Creating it: refuse what would fail anyway before anything exists, so a failed
            // write leaves no empty context behind.
            if let Some(expected) = expect.filter(|e| *e != 0) {
                return Err(ContextError::Stale {
                    name: name.to_string(),
                    expected,
                    current: 0,
                });
            }
            let data = crate::model::context::apply(None, op)?.map_or_else(Map::new, |c| c.data);
            let mut bytes = Vec::new();
            crate::wire::codec::encode_map_into(&data, &mut bytes)
                .map_err(|e| ContextError::InvalidArgument(e.to_string()))?;
            let max = shared.max_payload();
            if bytes.len() > max {
                return Err(ContextError::TooLarge {
                    size: bytes.len(),
                    max,
                });
            }
            // The gateway writes it before it announces the context (a context created empty
            // and written after would show subscribers waiting for the name an empty first
            // value), unless somebody made the context meanwhile: then the op is written to it.
            let (entry, made) = open_or_create(shared, name, data)?;
            if !entry.writable {
                // The gateway logged it: it handed a read-only mapping to a write.
                return Err(ContextError::PermissionDenied("update"));
            }
            return Ok(match made {
                Some(version) => ToWrite::Made { entry, version },
                None => ToWrite::Open(entry),
            });
        }
    };
    if !entry.writable {
        // Mapped read-only for reading before: the gateway does not know of this write, so
        // tell it (it checks the claim against its policy and logs the denial).
        let report = ToGateway::denied(shared.my_id(), PolicyAction::ContextWrite, name);
        let _ = shared.conn.send(&report);
        return Err(ContextError::PermissionDenied("update"));
    }
    Ok(ToWrite::Open(entry))
}

/// Context `name` from the gateway, made holding `data` if it did not exist (then with the
/// version the data was written at).
fn open_or_create(
    shared: &Arc<Shared>,
    name: &str,
    data: Map,
) -> Result<(Arc<CtxEntry>, Option<u64>), ContextError> {
    let name = name.to_string();
    match shared.conn.request(
        |req| ToGateway::OpenOrCreate {
            req,
            name,
            data: Value::Map(data),
        },
        CONTROL_TIMEOUT,
    )? {
        Reply::Created {
            entry,
            created,
            version,
        } => Ok((entry, created.then_some(version))),
        Reply::Fail(status, message) => Err(ContextError::Client(ClientError::Gateway {
            status,
            message,
        })),
        _ => Err(ContextError::Client(ClientError::Protocol(
            "unexpected reply to open-or-create".into(),
        ))),
    }
}

thread_local! {
    /// The context this thread wrote last: a writer that updates one context in a loop finds
    /// it without the client's context table (a lock and a hash of the name per write).
    #[allow(clippy::type_complexity)]
    static LAST_WRITTEN: std::cell::RefCell<Option<(std::sync::Weak<Shared>, String, std::sync::Weak<CtxEntry>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The entry this thread wrote last, if it is `name`'s for this client and still open.
fn last_written(shared: &Arc<Shared>, name: &str) -> Option<Arc<CtxEntry>> {
    LAST_WRITTEN.with(|c| {
        let c = c.borrow();
        let (s, n, e) = c.as_ref()?;
        if !std::ptr::eq(s.as_ptr(), Arc::as_ptr(shared)) || n != name {
            return None;
        }
        // SYNC(ctx-closed): pairs with the Release stores in `attach`, `destroyed` and
        // `pump_follow`; a closed entry is looked up again (under the table's lock).
        e.upgrade().filter(|e| !e.closed.load(Ordering::Acquire))
    })
}

fn remember_written(shared: &Arc<Shared>, entry: &Arc<CtxEntry>) {
    LAST_WRITTEN.with(|c| {
        let mut c = c.borrow_mut();
        let hit = c.as_ref().is_some_and(|(s, _, e)| {
            std::ptr::eq(s.as_ptr(), Arc::as_ptr(shared))
                && std::ptr::eq(e.as_ptr(), Arc::as_ptr(entry))
        });
        if !hit {
            *c = Some((
                Arc::downgrade(shared),
                entry.name.to_string(),
                Arc::downgrade(entry),
            ));
        }
    });
}

fn ring_subscribers(shared: &Shared, entry: &CtxEntry) {
    let bells = shared.bells();
    let mut any = false;
    entry.store.ctl().for_each_subscriber(|i| {
        any = true;
        if let Some(d) = bells.doorbell(i) {
            d.notify();
        }
    });
    if any {
        entry.prefault();
    }
}

pub(crate) fn set(shared: &Arc<Shared>, name: &str, data: Value) -> Result<u64, ContextError> {
    write(shared, name, ContextOp::Set(as_object(data)?), None)
}

pub(crate) fn update(
    shared: &Arc<Shared>,
    name: &str,
    data: Value,
    expect: Option<u64>,
) -> Result<u64, ContextError> {
    write(shared, name, ContextOp::Update(as_object(data)?), expect)
}

pub(crate) fn set_paths(
    shared: &Arc<Shared>,
    name: &str,
    paths: Vec<(String, Value)>,
) -> Result<u64, ContextError> {
    write(shared, name, ContextOp::Paths(paths), None)
}

pub(crate) fn destroy(shared: &Arc<Shared>, name: &str) -> Result<(), ContextError> {
    check_name(name)?;
    let id = shared
        .ctx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .known
        .get(name)
        .copied();
    // Not known here, or known by an id the gateway no longer has, does not mean there is no
    // such context: its announcement (or that of its creation anew) may still be on its way.
    // So the gateway is asked which one the name stands for (as `open` does), once.
    let mut asked = id.is_none();
    let mut id = match id {
        Some(id) => id,
        None => current_id(shared, name)?,
    };
    loop {
        match shared
            .conn
            .request(|req| ToGateway::DestroyContext { req, id }, CONTROL_TIMEOUT)?
        {
            Reply::Ack => {
                destroyed(shared, id, name);
                return Ok(());
            }
            Reply::Fail(Status::NotFound, _) if !asked => {
                asked = true;
                destroyed(shared, id, name);
                id = current_id(shared, name)?;
            }
            Reply::Fail(Status::NotFound, _) => {
                return Err(ContextError::NotFound(name.to_string()))
            }
            Reply::Fail(status, message) => {
                return Err(ClientError::Gateway { status, message }.into())
            }
            _ => {
                return Err(
                    ClientError::Protocol("unexpected reply to destroy-context".into()).into(),
                )
            }
        }
    }
}

/// The id of the context the gateway has under `name` ([`ContextError::NotFound`] if none).
fn current_id(shared: &Arc<Shared>, name: &str) -> Result<u64, ContextError> {
    ask_gateway(shared, name)?
        .map(|e| e.id)
        .ok_or_else(|| ContextError::NotFound(name.to_string()))
}

static NEXT_SUB: AtomicU64 = AtomicU64::new(1);
/// Claims of `CtxEntry::followed` (never 0).
static NEXT_CLAIM: AtomicU64 = AtomicU64::new(1);

pub(crate) fn subscribe(
    shared: &Arc<Shared>,
    name: &str,
    cb: ContextCallback,
) -> Result<ContextSubscription, ContextError> {
    check_name(name)?;
    let sub = Arc::new(Sub {
        // Relaxed: a counter for ids; nothing is published through it.
        id: NEXT_SUB.fetch_add(1, Ordering::Relaxed),
        name: name.to_string(),
        cb,
        start: AtomicU64::new(NEEDS_SNAPSHOT),
        active: AtomicBool::new(true),
        carry: Mutex::new(None),
        waited: AtomicBool::new(false),
    });
    let _gate = shared.conn.gate.enter();
    match open(shared, name)? {
        Some(_) => {
            let joined = attach_sub_inner(shared, sub.clone())?;
            settle(shared, &sub, joined);
        }
        None => {
            let mut st = shared.ctx.lock().unwrap_or_else(|e| e.into_inner());
            if st.known.contains_key(name) {
                drop(st);
                let joined = attach_sub_inner(shared, sub.clone())?;
                settle(shared, &sub, joined);
            } else {
                // SYNC(sub-waited): read under the list's lock once the sub is attached, which
                // happens after it is taken from `waiting` under this mutex: Relaxed is enough.
                sub.waited.store(true, Ordering::Relaxed);
                st.waiting
                    .entry(name.to_string())
                    .or_default()
                    .push(sub.clone());
            }
        }
    }
    Ok(ContextSubscription {
        shared: Arc::downgrade(shared),
        sub,
    })
}

/// Returns once the subscription has its starting point (the snapshot its first callback
/// shows), so every write after `subscribe` returns reaches it as a change of its own and none
/// is folded into the first value. `joined`: the entry it was added to (`None`: it waits for
/// its context to be created, and passes at once). A subscription whose entry is closed
/// meanwhile passes too: the entry gives no first callback (its context was destroyed, and the
/// subscription waits for it to be created again; or its segment was replaced, and the
/// subscription gets its first callback from the new one).
fn settle(shared: &Arc<Shared>, sub: &Arc<Sub>, joined: Option<Arc<CtxEntry>>) {
    let Some(entry) = joined else { return };
    let s = sub.clone();
    #[cfg(test)]
    super::hook::at("settle: no first callback yet");
    shared.wait_for(
        move || {
            // SYNC(sub-start): pairs with the Release store in `pump_follow`: what it read at
            // version `start` happens before our caller's next write, which gets a later
            // version.
            s.start.load(Ordering::Acquire) != NEEDS_SNAPSHOT
                // SYNC(ctx-closed): pairs with the Release stores that close the entry
                // (`destroyed`, `attach`, `pump_follow`); only the flag is read: nothing is
                // waited for once it is set.
                || entry.closed.load(Ordering::Acquire)
        },
        Instant::now() + CONTROL_TIMEOUT,
    );
}

/// [`attach_sub_inner`] under the gate (tests).
#[cfg(test)]
fn attach_sub(shared: &Arc<Shared>, sub: Arc<Sub>) -> Result<(), ContextError> {
    let _gate = shared.conn.gate.enter();
    attach_sub_inner(shared, sub).map(drop)
}

/// Adds a subscription to its (existing) context and makes sure the pumper follows the log,
/// for a caller that holds the gate or restores. Returns the entry the
/// subscription was added to (`None`: it waits for its context to be created).
fn attach_sub_inner(
    shared: &Arc<Shared>,
    sub: Arc<Sub>,
) -> Result<Option<Arc<CtxEntry>>, ContextError> {
    // The entry last found closed: found again, it is one that could not be read (it stays
    // open under its name), and the sub is added to it as to any unreadable context.
    let mut refused: Option<Arc<CtxEntry>> = None;
    let (entry, claim, taken_up) = loop {
        let Some(entry) = open(shared, &sub.name)? else {
            // SYNC(sub-waited): as in `subscribe`.
            sub.waited.store(true, Ordering::Relaxed);
            wait_for_context(shared, sub);
            return Ok(None);
        };
        #[cfg(test)]
        super::hook::at("attach_sub_inner: entry found, subscription not added yet");
        let again = refused.as_ref().is_some_and(|r| Arc::ptr_eq(r, &entry));
        // Relaxed: a claim only needs to be unique.
        let claim = NEXT_CLAIM.fetch_add(1, Ordering::Relaxed);
        // The sub is added, and the context taken up if nobody follows it, under the list's
        // lock, which `detach` holds to take its sub out and let go of the context when that
        // leaves the list empty: a detach before us has let go (we take the context up again,
        // and ask the gateway after its unsubscription went), one after us finds our sub there.
        // (Taken up before the sub was added, the context could be let go of by a detach that
        // found the list empty, leaving this follow stale and the subs added meanwhile with
        // none.)
        let joined = entry.subs.change(|v| {
            // SYNC(ctx-closed): read under the list's lock, which `destroyed` takes after
            // closing the entry, to take its subs out: either it takes ours with them (to wait
            // for the context), or the mutex orders its store before this load and we see it.
            if !again && entry.closed.load(Ordering::Acquire) {
                return None;
            }
            // Destroyed since `open` looked (by another client, whose destroy may have
            // returned: the gateway marks the segment before it answers): `open` finds out
            // whether for good, as for a context found destroyed.
            if !again && entry.store.ctl().is_retired() {
                return None;
            }
            v.push(sub.clone());
            // SYNC(followed): an RMW, so exactly one caller finds it unfollowed and subscribes;
            // AcqRel (Acquire when it fails): acquire side of the RMWs and stores that clear
            // it, release side for `is_closed`, `pump_follow` and `restore`.
            Some(
                entry
                    .followed
                    .compare_exchange(0, claim, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok(),
            )
        });
        match joined {
            Some(taken_up) => break (entry, claim, taken_up),
            // Closed since `open` found it: destroyed (`open` now asks the gateway, and the sub
            // waits for the context to be created again) or replaced (`open` finds the new
            // entry). Added to it, the sub would be in a list nobody follows or moves on.
            None => refused = Some(entry),
        }
    };
    // SYNC(new_subs): the sub pushed above is in the list the pumper takes once it sees the
    // flag (Acquire in `needs_snapshot`).
    entry.new_subs.store(true, Ordering::Release);
    if !taken_up {
        shared.wake_all();
        return Ok(Some(entry));
    }
    entry.prefault();
    let id = entry.id;
    let r = shared.conn.request(
        |req| ToGateway::SubscribeContext { req, id },
        CONTROL_TIMEOUT,
    );
    if let Err(e) = Reply::ack(r, "subscribe-context") {
        let ours = entry.subs.change(|v| {
            let before = v.len();
            v.retain(|s| !Arc::ptr_eq(s, &sub));
            // SYNC(followed): undoes our claim (unless a detach already did); pairs with the
            // compare-exchange above (the next attacher subscribes) and the loads in
            // `is_closed` and `restore`.
            let _ = entry
                .followed
                .compare_exchange(claim, 0, Ordering::Release, Ordering::Relaxed);
            v.len() < before
        });
        // Not there any more: the context was destroyed meanwhile, and the sub waits for it
        // to come back with the others (`destroyed` took it); or the sub was dropped.
        return if ours { Err(e.into()) } else { Ok(None) };
    }
    shared.add_ctx_follow(CtxFollow::new(&entry, claim));
    Ok(Some(entry))
}

fn detach(shared: &Arc<Shared>, sub: &Arc<Sub>) {
    let _gate = shared.conn.gate.enter();
    let entry = {
        let mut st = shared.ctx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = st.waiting.get_mut(&sub.name) {
            w.retain(|s| s.id != sub.id);
            if w.is_empty() {
                st.waiting.remove(&sub.name);
            }
        }
        st.open.get(&sub.name).cloned()
    };
    let Some(entry) = entry else { return };
    // The context is let go of, and the gateway told, under the list's lock, which
    // `attach_sub_inner` holds to add a sub (see there): a sub added before keeps the list from
    // being empty here, one added after takes the context up again and subscribes after this
    // unsubscription.
    let let_go = entry.subs.change(|v| {
        v.retain(|s| s.id != sub.id);
        // SYNC(followed): an RMW, so only one racing detach unsubscribes; release side for
        // `is_closed` (the pumper drops the follow), acquire side of the RMW that set it.
        if !v.is_empty() || entry.followed.swap(0, Ordering::AcqRel) == 0 {
            return false;
        }
        // Fire and forget: nobody waits for the answer (request id 0 is never used).
        let _ = shared.conn.send(&ToGateway::UnsubscribeContext {
            req: 0,
            id: entry.id,
        });
        true
    });
    #[cfg(test)]
    super::hook::at("detach: subscription taken out of the list");
    if let_go {
        shared.wake_all();
    }
}

/// Work for the pumper: deliver first callbacks, follow the log. Returns events queued.
pub(crate) fn pump_follow(
    shared: &Shared,
    cf: &mut CtxFollow,
    mut sink: Option<&mut Vec<Task>>,
) -> usize {
    // The common case while polling: nothing new. Decided without touching the entry's
    // reference count (a locked instruction per poll lengthened every poll round).
    if cf.data.is_some() && !cf.needs_snapshot() && !cf.f.has_more(&cf.entry.store) {
        return 0;
    }
    let mut n = 0;
    let entry = cf.entry.clone();
    if cf.data.is_none() || cf.needs_snapshot() {
        // SYNC(new_subs): cleared before the list is taken below, under its lock: a sub pushed
        // after that sets it again, so none is missed (the list's lock orders the two).
        entry.new_subs.store(false, Ordering::Release);
        if cf.data.is_none() {
            match read_snapshot(&entry, &mut cf.buf) {
                Ok((v, writer, m)) => {
                    cf.f.resync(v);
                    cf.version = v;
                    cf.writer = writer;
                    let data = Arc::new(Value::Map((*m).clone()));
                    // The cache holds what subscribers were given (as after each update):
                    // `migrate` takes it as what they had.
                    remember(&entry, v, &data);
                    cf.data = Some(data);
                }
                Err(e) => {
                    crate::log::warn(format_args!("context {:?}: {e}", entry.name));
                    // SYNC(ctx-closed): pairs with `CtxFollow::is_closed` (the pumper drops
                    // this follow) and `last_written`; only the flag is read.
                    entry.closed.store(true, Ordering::Release);
                    return 0;
                }
            }
        }
        #[cfg(test)]
        super::hook::at("pump_follow: before the first callbacks");
        // Under the list's lock: `destroyed` and `migrate` take a sub out of the list (under
        // it) before they reset its `start`, so a sub they took is not given this entry's
        // version after they reset it, and one they take later is reset after our store. (A
        // compare-exchange would not do: the value they store, NEEDS_SNAPSHOT, is the one we
        // expect.)
        let started: Vec<(u64, Option<Arc<Value>>, bool)> = entry.subs.with_current(|subs| {
            // A stale follow (the context was let go of and taken up again since this round
            // began) gives no first callback: the new follow gives it, from a snapshot it reads
            // afterwards, so no update between the two is lost. SYNC(followed): pairs with the
            // RMW that took the context up again, made under this lock with that claim's first
            // sub pushed (`attach_sub_inner`), so a sub of the new claim seen here comes with
            // its claim. (`migrate` takes up a new entry, which has no stale follow.)
            if entry.followed.load(Ordering::Acquire) != cf.claim {
                return Vec::new();
            }
            subs.iter()
                // SYNC(sub-start): pairs with the Release stores in `destroyed` and `migrate`.
                .filter(|s| s.start.load(Ordering::Acquire) == NEEDS_SNAPSHOT)
                .map(|s| {
                    // SYNC(sub-start): our copy at `cf.version` was read before this; `settle`
                    // pairs with it (see there).
                    s.start.store(cf.version, Ordering::Release);
                    let carry = s.carry.lock().unwrap_or_else(|e| e.into_inner()).take();
                    // SYNC(sub-waited): see `Sub::waited`.
                    (s.id, carry, s.waited.swap(false, Ordering::Relaxed))
                })
                .collect()
        });
        // Nothing to show for a context that was never written.
        if cf.version > 0 {
            for (id, carry, waited) in started {
                // Moved here after its first callback: the difference from what it had, if any.
                if let Some(had) = carry {
                    if let Some(ev) = carried_over(cf, &had) {
                        queue(shared, &entry, ev, Some(id), sink.as_deref_mut());
                        n += 1;
                    }
                    continue;
                }
                let data = cf.data.clone().unwrap_or_else(|| Arc::new(Value::map()));
                // A subscription that waited for the context gets its creation as a change by
                // its writer (the creating write is version 1; later writes it did not see make
                // it a conflated one, whose writer is not one peer); any other gets the current
                // value as a state, with no writer.
                let created = waited && cf.version == 1 && cf.writer != 0;
                let updater = if created {
                    let w = cf.writer;
                    updater_of(shared, cf, w)
                } else {
                    None
                };
                let ev = ContextUpdate {
                    name: entry.name.clone(),
                    version: cf.version,
                    delta: (*data).clone(),
                    data,
                    removed: Vec::new(),
                    updater,
                    first: !waited,
                    conflated: waited && !created,
                };
                queue(shared, &entry, ev, Some(id), sink.as_deref_mut());
                n += 1;
            }
        }
    }
    // Events for the dispatch thread's own list are not in `queued`; they count here.
    let own = sink.is_some();
    // queued: a back-pressure count only; the events travel through the task queue, which
    // orders them, so nothing is published through this counter.
    while entry.queued.load(Ordering::Acquire) + if own { n } else { 0 } < MAX_QUEUED {
        let ev = match cf.f.next(&entry.store, &mut cf.buf) {
            Ok(None) => break,
            // Our copy may be behind: take the snapshot instead.
            Ok(Some(_)) if cf.broken => resync(shared, cf),
            Ok(Some(LogEvent::Record {
                kind: KIND_OP,
                version,
                updater,
                payload_logged: true,
            })) => {
                match apply_logged(shared, cf, version, updater) {
                    Some(Ok(Some(ev))) => Some(ev),
                    // A record that changes nothing for us: keep our copy, move on.
                    Some(Ok(None)) => continue,
                    Some(Err(())) | None => resync(shared, cf),
                }
            }
            // A delta too large for the log: the data comes from the snapshot. Nothing was
            // skipped when the snapshot is still at that version.
            Ok(Some(LogEvent::Record {
                kind: KIND_OP,
                version,
                updater,
                payload_logged: false,
            })) => resync_at(shared, cf, Some((version, updater))),
            Ok(Some(_)) => resync(shared, cf),
            // The follower has moved past the corrupt part (`Follower::next`), so this ends.
            Err(e) => {
                if !cf.broken {
                    crate::log::warn(format_args!("context {:?} log: {e}", entry.name));
                }
                resync(shared, cf)
            }
        };
        if let Some(ev) = ev {
            queue(shared, &entry, ev, None, sink.as_deref_mut());
            n += 1;
        }
    }
    n
}

/// The snapshot: its version, its writer's token and its data.
fn read_snapshot(
    entry: &CtxEntry,
    buf: &mut Vec<u8>,
) -> Result<(u64, u64, Arc<Map>), ContextError> {
    let info = entry.store.read(buf)?;
    Ok((info.version, info.updater, Arc::new(decode_map(buf)?)))
}

/// Applies the logged op in `cf.buf` to our copy: a small update straight from its encoding,
/// anything else decoded first. `None`: it does not decode.
fn apply_logged(
    shared: &Shared,
    cf: &mut CtxFollow,
    version: u64,
    updater: u64,
) -> Option<Result<Option<ContextUpdate>, ()>> {
    if cf.version != 0 {
        let buf = std::mem::take(&mut cf.buf);
        let r = apply_record(shared, cf, version, updater, |map| {
            crate::model::context::apply_logged_update(map, &buf)
        });
        cf.buf = buf;
        if let Some(r) = r {
            return Some(r);
        }
    }
    let op = ContextOp::decode(&cf.buf)?;
    let exists = cf.version != 0;
    apply_record(shared, cf, version, updater, |map| {
        Some(apply_owned(map, exists, op).map_err(|_| ()))
    })
}

/// Applies a logged op to our copy, in place when nobody else holds it. `apply` changes the
/// map (or says `None`: it cannot, and then nothing changed).
fn apply_record(
    shared: &Shared,
    cf: &mut CtxFollow,
    version: u64,
    updater: u64,
    apply: impl FnOnce(&mut Map) -> Option<Result<Option<crate::model::context::Delta>, ()>>,
) -> Option<Result<Option<ContextUpdate>, ()>> {
    let mut data = cf.data.take().unwrap_or_else(|| Arc::new(Value::map()));
    // One lock of the cache for the whole update: it usually holds this very value, which is
    // let go of so the update needs no copy, and gets the new value back.
    let mut cache = cf.entry.cache.lock().unwrap_or_else(|e| e.into_inner());
    if cache.as_ref().is_some_and(|(_, d)| Arc::ptr_eq(d, &data)) {
        *cache = None;
    }
    let Value::Map(map) = Arc::make_mut(&mut data) else {
        drop(cache);
        cf.data = Some(data);
        return Some(Err(()));
    };
    let d = match apply(map) {
        Some(Ok(Some(d))) => d,
        Some(Ok(None)) => {
            drop(cache);
            cf.data = Some(data);
            cf.version = version;
            cf.writer = updater;
            return Some(Ok(None));
        }
        other => {
            // Nothing changed: the cache gets back what it had.
            if cache.is_none() && cf.version != 0 {
                *cache = Some((cf.version, data.clone()));
            }
            drop(cache);
            cf.data = Some(data);
            return other.map(|_| Err(()));
        }
    };
    if cache.as_ref().is_none_or(|(v, _)| *v < version) {
        *cache = Some((version, data.clone()));
    }
    drop(cache);
    cf.data = Some(data.clone());
    cf.version = version;
    cf.writer = updater;
    let updater = updater_of(shared, cf, updater);
    Some(Ok(Some(ContextUpdate {
        name: cf.entry.name.clone(),
        version,
        data,
        delta: Value::Map(d.delta),
        removed: d.removed,
        updater,
        first: false,
        conflated: false,
    })))
}

/// The writer of a record, resolved once per run of records by the same writer. A writer
/// newer than every peer we know of has been announced by the gateway, but our connection
/// thread may not have read that yet (the writer can be quicker through shared memory): then
/// we wait for it a little, so that every follower names the same updater.
fn updater_of(shared: &Shared, cf: &mut CtxFollow, token: u64) -> Option<Arc<Instance>> {
    if let Some((t, who)) = &cf.last_updater {
        if *t == token {
            return who.clone();
        }
    }
    let who = shared.identity_of_soon(token, UPDATER_WAIT);
    cf.last_updater = Some((token, who.clone()));
    who
}

fn make_update(
    shared: &Shared,
    cf: &mut CtxFollow,
    version: u64,
    updater: u64,
    change: Change,
    conflated: bool,
) -> Option<ContextUpdate> {
    let data = Arc::new(Value::Map(change.data));
    remember(&cf.entry, version, &data);
    cf.data = Some(data.clone());
    cf.version = version;
    cf.writer = updater;
    let updater = updater_of(shared, cf, updater);
    Some(ContextUpdate {
        name: cf.entry.name.clone(),
        version,
        data,
        delta: Value::Map(change.delta),
        removed: change.removed,
        updater,
        first: false,
        conflated,
    })
}

/// Catches up from the snapshot: the update says what differs from what we had.
fn resync(shared: &Shared, cf: &mut CtxFollow) -> Option<ContextUpdate> {
    resync_at(shared, cf, None)
}

/// Brings our copy to the snapshot. With `exact` = (version, updater) of a record whose data
/// was not logged: when the snapshot is at that version the update is reported as that
/// writer's, not conflated.
fn resync_at(
    shared: &Shared,
    cf: &mut CtxFollow,
    exact: Option<(u64, u64)>,
) -> Option<ContextUpdate> {
    let (v, _, now) = match read_snapshot(&cf.entry, &mut cf.buf) {
        Ok(x) => x,
        Err(e) => {
            if !std::mem::replace(&mut cf.broken, true) {
                crate::log::warn(format_args!(
                    "context {:?}: {e}; its subscribers wait for a sound snapshot",
                    cf.entry.name
                ));
            }
            return None;
        }
    };
    cf.broken = false;
    cf.f.resync(v);
    let before = cf
        .data
        .as_deref()
        .and_then(Value::as_map)
        .cloned()
        .unwrap_or_default();
    if v == cf.version && before == *now {
        return None;
    }
    let d = crate::model::context::difference(&before, &now);
    let change = Change {
        data: (*now).clone(),
        delta: d.delta,
        removed: d.removed,
    };
    match exact {
        Some((ver, updater)) if ver == v => make_update(shared, cf, v, updater, change, false),
        _ => make_update(shared, cf, v, 0, change, true),
    }
}

fn queue(
    shared: &Shared,
    entry: &Arc<CtxEntry>,
    ev: ContextUpdate,
    only: Option<u64>,
    sink: Option<&mut Vec<Task>>,
) {
    // Counted only when it goes through the shared queue: what the dispatch thread collects
    // for itself runs right after this pump round (which bounds it, see `pump_follow`).
    let counted = sink.is_none();
    if counted {
        // queued: a back-pressure count only (see `pump_follow`); no pairing needed.
        entry.queued.fetch_add(1, Ordering::AcqRel);
    }
    let t = Task::Context {
        entry: entry.clone(),
        ev: Box::new(ev),
        only,
        counted,
    };
    match sink {
        // On the dispatch thread: run right after this pump round, no queue, no wake-up.
        Some(ready) => ready.push(t),
        None => shared.push_task(t),
    }
}

/// Runs one queued event (dispatch thread).
pub(crate) fn deliver(entry: &Arc<CtxEntry>, ev: &ContextUpdate, only: Option<u64>, counted: bool) {
    if counted {
        // queued: a back-pressure count only (see `pump_follow`); no pairing needed.
        entry.queued.fetch_sub(1, Ordering::AcqRel);
    }
    // The list as of the last change, kept by this (dispatch) thread: no lock per event.
    with_kept(
        &SUBS_SEEN,
        entry,
        |e| &e.subs,
        |subs| deliver_to(subs, ev, only),
    );
}

thread_local! {
    /// The subscriptions of the context `deliver` last delivered to.
    static SUBS_SEEN: Kept<CtxEntry, Arc<Sub>> = const { std::cell::Cell::new(None) };
}

fn deliver_to(subs: &[Arc<Sub>], ev: &ContextUpdate, only: Option<u64>) {
    for s in subs.iter() {
        // SYNC(sub-active): pairs with `ContextSubscription::drop`; only the flag is read.
        if !s.active.load(Ordering::Acquire) {
            continue;
        }
        let wanted = match only {
            Some(id) => s.id == id,
            None => {
                // SYNC(sub-start): pairs with the Release stores of `start`; only the value is
                // used (the task queue already orders the pumper's store before later events).
                let start = s.start.load(Ordering::Acquire);
                start != NEEDS_SNAPSHOT && ev.version > start
            }
        };
        if wanted {
            super::engine::isolated("a context callback", || (s.cb)(ev));
        }
    }
}

/// The update owed to a subscription moved to a context's new segment after its first callback
/// (`Sub::carry`): the difference between what it had and our copy, or nothing when they are
/// equal.
fn carried_over(cf: &CtxFollow, before: &Value) -> Option<ContextUpdate> {
    let now = cf.data.clone()?;
    let (before, after) = (before.as_map()?, now.as_map()?);
    if before == after {
        return None;
    }
    let d = crate::model::context::difference(before, after);
    Some(ContextUpdate {
        name: cf.entry.name.clone(),
        version: cf.version,
        data: now,
        delta: Value::Map(d.delta),
        removed: d.removed,
        updater: None,
        first: false,
        conflated: true,
    })
}

/// A new gateway connection (control thread): the contexts that exist are the ones its
/// welcome lists.
pub(crate) fn connection_reset(shared: &Shared, contexts: Vec<(u64, String)>) {
    shared.ctx.lock().unwrap_or_else(|e| e.into_inner()).known =
        contexts.into_iter().map(|(id, name)| (name, id)).collect();
}

/// After a reconnection (restore thread): every mapped context is opened again. The same
/// segment (kept across a gateway restart) stays mapped and its followers subscribe again; a
/// different one (the gateway lost it) replaces it and its subscribers get one conflated update
/// if the value differs from what they had; one that is gone is treated as destroyed.
/// Subscriptions waiting for a context that now exists attach.
pub(crate) fn restore(shared: &Arc<Shared>) {
    let entries: Vec<Arc<CtxEntry>> = shared
        .ctx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .open
        .values()
        .cloned()
        .collect();
    let pending: Vec<_> = entries
        .iter()
        .map(|e| {
            shared.conn.start(|req| ToGateway::OpenContext {
                req,
                name: e.name.to_string(),
            })
        })
        .collect();
    let mut resubscribe = Vec::new();
    for (old, p) in entries.iter().zip(pending) {
        match p.and_then(|p| p.wait(&shared.conn, CONTROL_TIMEOUT)) {
            Ok(Reply::Context(new)) if Arc::ptr_eq(&new, old) => {
                // SYNC(followed): pairs with the RMWs in `attach_sub_inner` and `detach`; only
                // the value is read (a followed context is followed again).
                if old.followed.load(Ordering::Acquire) != 0 {
                    resubscribe.push(old.clone());
                }
            }
            Ok(Reply::Context(new)) => migrate(shared, old, &new),
            Ok(Reply::Fail(status, message)) => {
                if status != Status::NotFound {
                    crate::log::warn(format_args!(
                        "after reconnecting, context {:?} is not available: {message}",
                        old.name
                    ));
                }
                // Its subscribers wait for it to exist again.
                // SYNC(followed): pairs with `is_closed` (the pumper drops the follow) and the
                // compare-exchange in `attach_sub_inner` (a re-attach subscribes again).
                old.followed.store(0, Ordering::Release);
                destroyed(shared, old.id, &old.name);
            }
            Ok(_) => {}
            Err(e) => crate::log::warn(format_args!(
                "after reconnecting, context {:?}: {e}",
                old.name
            )),
        }
    }
    let pending: Vec<_> = resubscribe
        .iter()
        .map(|e| {
            let id = e.id;
            shared
                .conn
                .start(|req| ToGateway::SubscribeContext { req, id })
        })
        .collect();
    for (e, p) in resubscribe.iter().zip(pending) {
        let r = p.and_then(|p| p.wait(&shared.conn, CONTROL_TIMEOUT));
        super::reconnect::expect_ack(&format!("following context {:?}", e.name), r);
    }
    // Subscriptions to contexts that did not exist before and do now.
    let waiting: Vec<Arc<Sub>> = {
        let mut st = shared.ctx.lock().unwrap_or_else(|e| e.into_inner());
        let names: Vec<String> = st
            .waiting
            .keys()
            .filter(|n| st.known.contains_key(*n))
            .cloned()
            .collect();
        names
            .into_iter()
            .flat_map(|n| st.waiting.remove(&n).unwrap_or_default())
            .collect()
    };
    for sub in waiting {
        // SYNC(sub-active): pairs with `ContextSubscription::drop`; a dropped sub is not
        // attached.
        if sub.active.load(Ordering::Acquire) {
            if let Err(e) = attach_sub_inner(shared, sub.clone()) {
                attach_failed(shared, sub, &e);
            }
        }
    }
    shared.wake_all();
}

/// Moves the subscribers of a context whose segment was replaced to the new segment
/// (restore thread; `attach` already closed the old entry).
fn migrate(shared: &Arc<Shared>, old: &Arc<CtxEntry>, new: &Arc<CtxEntry>) {
    let subs = old.subs.change(std::mem::take);
    let subs: Vec<Arc<Sub>> = subs
        .into_iter()
        // SYNC(sub-active): pairs with `ContextSubscription::drop`; only the flag is read.
        .filter(|s| s.active.load(Ordering::Acquire))
        .collect();
    if subs.is_empty() {
        return;
    }
    // What the subscribers had: the cache holds the value they were given last (`pump_follow`
    // keeps it there, from the first snapshot on); `{}` if the context was never written.
    let before = old
        .cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or_else(|| Arc::new(Value::map()), |(_, d)| d.clone());
    for s in &subs {
        // Versions start again in the new segment. A sub that had its first callback gets,
        // from the first-callback pass of whichever follow gives first callbacks here, one
        // conflated update from what it had to the new segment's value, at the version that
        // pass starts it from (`carry`); one that had none still gets its first callback.
        // A load then a store is enough: the sub is in no list now (taken from `old` above,
        // added to `new` below), and only a first-callback pass over a list that holds it
        // (under the list's lock, `pump_follow`) or `destroyed` of such a list stores to it.
        // SYNC(sub-start): pairs with the Release store in `pump_follow` (first callback done).
        if s.start.load(Ordering::Acquire) != NEEDS_SNAPSHOT {
            // Before the store below and the push into `new`'s list under its lock, which the
            // pass takes before it takes the carry.
            *s.carry.lock().unwrap_or_else(|e| e.into_inner()) = Some(before.clone());
            // SYNC(sub-start): pairs with the Acquire loads in `deliver_to` and `pump_follow`.
            s.start.store(NEEDS_SNAPSHOT, Ordering::Release);
        }
    }
    new.subs.change(|v| v.extend(subs));
    // SYNC(new_subs): the subs moved in above are in the list the pumper takes once it sees
    // the flag (Acquire in `needs_snapshot`). Set whoever follows the context: when it is
    // followed already (an attach that got past the gate took it up), that follow gives them
    // their first callbacks (or carried-over updates).
    new.new_subs.store(true, Ordering::Release);
    // Relaxed: a claim only needs to be unique.
    let claim = NEXT_CLAIM.fetch_add(1, Ordering::Relaxed);
    // SYNC(followed): an RMW, so exactly one caller finds it unfollowed and subscribes; orderings
    // as in `attach_sub_inner`.
    if new
        .followed
        .compare_exchange(0, claim, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        shared.wake_all();
        return;
    }
    let id = new.id;
    let r = shared.conn.request(
        |req| ToGateway::SubscribeContext { req, id },
        CONTROL_TIMEOUT,
    );
    super::reconnect::expect_ack(&format!("following context {:?}", new.name), r);
    shared.add_ctx_follow(CtxFollow::new(new, claim));
}

#[cfg(test)]
mod tests {
    use super::super::hook::{self, elsewhere};
    use super::*;
    use crate::client::Client;
    use std::sync::mpsc::{channel, Receiver};

    /// Runs `step` at the next first-callback pass of `r`'s pumper (this thread, polling).
    fn at_next_first_callbacks(r: &Client, step: impl FnOnce() + 'static) {
        let point = "pump_follow: before the first callbacks";
        hook::set(point, step);
        let deadline = Instant::now() + Duration::from_secs(5);
        while hook::is_set(point) {
            assert!(
                Instant::now() < deadline,
                "no first-callback pass within 5 s"
            );
            r.poll(Duration::from_millis(100));
        }
    }

    /// A gateway, a writer `w` and a polled reader `r`, whose contexts' logs are read on the
    /// test's thread only, inside `poll` (or while it waits).
    struct Setup {
        w: Client,
        r: Client,
        /// Dropped after the clients are closed (fields drop after `Drop::drop`).
        _gw: crate::client::testing::TestGateway,
    }

    impl Setup {
        fn new(tag: &str) -> Setup {
            let gw = crate::client::testing::TestGateway::new(&format!("ctx-{tag}"));
            let w = Client::builder("w").socket(gw.socket()).connect().unwrap();
            let r = Client::builder("r")
                .socket(gw.socket())
                .poll_mode(true)
                .connect()
                .unwrap();
            Setup { w, r, _gw: gw }
        }
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            self.r.close();
            self.w.close();
        }
    }

    fn obj(n: i64) -> Value {
        Value::object([("n", Value::from(n))])
    }

    /// A subscription to `name` whose updates go to the receiver.
    fn new_sub(name: &str) -> (Arc<Sub>, Receiver<ContextUpdate>) {
        let (tx, rx) = channel();
        let sub = Arc::new(Sub {
            // Relaxed: ids only need to be unique.
            id: NEXT_SUB.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            cb: Arc::new(move |u: &ContextUpdate| {
                let _ = tx.send(u.clone());
            }),
            start: AtomicU64::new(NEEDS_SNAPSHOT),
            active: AtomicBool::new(true),
            carry: Mutex::new(None),
            waited: AtomicBool::new(false),
        });
        (sub, rx)
    }

    /// `subscribe`, with the updates going to the receiver.
    fn watch(c: &Client, name: &str) -> (ContextSubscription, Receiver<ContextUpdate>) {
        let (tx, rx) = channel();
        let cb = Arc::new(move |u: &ContextUpdate| {
            let _ = tx.send(u.clone());
        });
        (subscribe(c.shared(), name, cb).unwrap(), rx)
    }

    /// The next update (polling the client for it). The deadline is a hang guard, not a
    /// measure: every update a test waits for is owed at once. (It was 30 s for a while, when
    /// the re-created context's first callbacks seemed to come late under load; they never
    /// came: `w`'s write went to the destroyed segment, see
    /// `a_write_after_another_client_destroyed_the_context_creates_it_again`.)
    fn poll_next(c: &Client, rx: &Receiver<ContextUpdate>) -> ContextUpdate {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(u) = rx.try_recv() {
                return u;
            }
            assert!(Instant::now() < deadline, "no context update within 5 s");
            c.poll(Duration::from_millis(100));
        }
    }

    /// `name` written (`{n: 1}`) by `t.w` and watched by `c`, its first callback taken.
    fn watched(
        t: &Setup,
        c: &Client,
        name: &str,
    ) -> (ContextSubscription, Receiver<ContextUpdate>) {
        t.w.contexts().set(name, obj(1)).unwrap();
        let (sub, rx) = watch(c, name);
        assert!(poll_next(c, &rx).first);
        (sub, rx)
    }

    /// The next update is a first callback showing `data` at `version`.
    fn expect_first(c: &Client, rx: &Receiver<ContextUpdate>, version: u64, data: &Value) {
        let u = poll_next(c, rx);
        assert!(u.first, "{u:?}");
        assert_eq!((u.version, &*u.data), (version, data));
    }

    /// The next update is the creation of the context a subscription waited for: a change (not
    /// a first callback) to `data` at `version`, by the application `by`.
    fn expect_created(u: &ContextUpdate, version: u64, data: &Value, by: &str) {
        assert!(!u.first && !u.conflated, "not a creation: {u:?}");
        assert_eq!((u.version, &*u.data, &u.delta), (version, data, data));
        assert_eq!(
            u.updater.as_ref().map(|i| i.application.as_str()),
            Some(by),
            "{u:?}"
        );
    }

    /// How many doorbells the gateway rings when `name` changes (it lists a follower's once
    /// it has subscribed it).
    fn rung(c: &Client, name: &str) -> usize {
        let entry = open(c.shared(), name).unwrap().unwrap();
        let mut n = 0;
        entry.store.ctl().for_each_subscriber(|_| n += 1);
        n
    }

    #[test]
    fn a_subscription_added_while_the_last_one_goes_is_followed() {
        let t = Setup::new("strand");
        let (a, _rx_a) = watched(&t, &t.r, "last");
        assert_eq!(rung(&t.r, "last"), 1);
        // `a`, the last subscription, goes; once it is out of the list, another thread adds `b`
        // (start to end).
        let (b, rx_b) = new_sub("last");
        let shared = t.r.shared().clone();
        let point = "detach: subscription taken out of the list";
        hook::set(point, move || {
            elsewhere(move || attach_sub(&shared, b).unwrap());
        });
        drop(a);
        assert!(!hook::is_set(point), "the detach never reached the point");
        // `b` is followed: it gets its first callback, then the changes.
        let u = poll_next(&t.r, &rx_b);
        assert!(u.first, "{u:?}");
        assert_eq!(*u.data, obj(1));
        let v = t.w.contexts().update("last", obj(2)).unwrap();
        let u = poll_next(&t.r, &rx_b);
        assert_eq!((u.version, u.first), (v, false));
        // And the gateway knows it: its last word from us is the subscription, not the
        // unsubscription (a request of ours after both tells they were handled).
        t.r.contexts().set("sync", obj(0)).unwrap();
        assert_eq!(
            rung(&t.r, "last"),
            1,
            "the gateway has us unsubscribed while we follow the context"
        );
    }

    #[test]
    fn subscribe_does_not_wait_for_a_first_callback_from_a_context_destroyed_meanwhile() {
        let t = Setup::new("settle");
        t.w.contexts().set("brief", obj(1)).unwrap();
        // `subscribe` has added the subscription and waits for its first callback (which comes
        // from its own pumping: the client is polled); first, another thread destroys the
        // context, start to end.
        let shared = t.r.shared().clone();
        let point = "settle: no first callback yet";
        hook::set(point, move || {
            elsewhere(move || destroy(&shared, "brief").unwrap());
        });
        let began = Instant::now();
        let (_sub, rx) = watch(&t.r, "brief");
        let took = began.elapsed();
        assert!(!hook::is_set(point), "subscribe never reached the point");
        // A guard against the hang, not a measure: it waited for nothing (10 s) before.
        assert!(
            took < Duration::from_secs(5),
            "subscribe waited {took:?} for the first callback of a destroyed context"
        );
        // The subscription waits for the context to come back, and gets it.
        let v = t.w.contexts().set("brief", obj(2)).unwrap();
        expect_created(&poll_next(&t.r, &rx), v, &obj(2), "w");
    }

    #[test]
    fn subscriptions_moved_to_a_context_followed_already_get_their_first_callback() {
        let t = Setup::new("migrate");
        t.w.contexts().set("before", obj(1)).unwrap();
        t.w.contexts().set("after", obj(2)).unwrap();
        // The context's new segment ("after") is followed already: a subscription got past the
        // gate while the restore ran (the gate's waits are bounded), and has its first callback.
        let (_a, rx_a) = watch(&t.r, "after");
        assert!(poll_next(&t.r, &rx_a).first);
        // The replaced entry ("before") holds a subscription that still waits for its first
        // callback; the restore moves it to the new segment.
        let old = open(t.r.shared(), "before").unwrap().unwrap();
        let new = open(t.r.shared(), "after").unwrap().unwrap();
        let (b, rx_b) = new_sub("after");
        old.subs.change(|v| v.push(b));
        migrate(t.r.shared(), &old, &new);
        let u = poll_next(&t.r, &rx_b);
        assert!(u.first, "{u:?}");
        assert_eq!(*u.data, obj(2));
    }

    /// `b`, subscribed to `before` and given its first callback, is moved to `after`'s entry as
    /// a restore moves the subscriptions of a context whose segment was replaced (`after`
    /// followed already or not). `b` gets one conflated update from what it had to `after`'s
    /// value, then `after`'s changes.
    fn moved_after_its_first_callback(tag: &str, followed: bool) {
        let t = Setup::new(tag);
        let had = Value::object([("n", Value::from(1)), ("k", Value::from(1))]);
        t.w.contexts().set("before", had.clone()).unwrap();
        t.w.contexts().set("after", obj(2)).unwrap();
        let _a = followed.then(|| {
            let (a, rx_a) = watch(&t.r, "after");
            assert!(poll_next(&t.r, &rx_a).first);
            a
        });
        let (_b, rx_b) = watch(&t.r, "before");
        let u = poll_next(&t.r, &rx_b);
        assert!(u.first, "{u:?}");
        assert_eq!(*u.data, had);
        let old = open(t.r.shared(), "before").unwrap().unwrap();
        let new = open(t.r.shared(), "after").unwrap().unwrap();
        // SYNC(ctx-closed): as `attach` closes the entry a new segment replaces.
        old.closed.store(true, Ordering::Release);
        migrate(t.r.shared(), &old, &new);
        let u = poll_next(&t.r, &rx_b);
        assert!(
            u.conflated && !u.first,
            "b's first update after the move is not the one covering it: {u:?}"
        );
        assert_eq!(*u.data, obj(2));
        assert_eq!(
            u.delta,
            Value::object([("n", Value::from(2)), ("k", Value::Null)])
        );
        assert_eq!(u.removed, vec!["k".to_string()]);
        let v = t.w.contexts().update("after", obj(3)).unwrap();
        let u = poll_next(&t.r, &rx_b);
        assert_eq!((u.version, u.first, &*u.data), (v, false, &obj(3)));
    }

    #[test]
    fn a_subscription_moved_after_its_first_callback_gets_the_update_covering_the_move() {
        moved_after_its_first_callback("moved", false);
    }

    #[test]
    fn a_subscription_moved_after_its_first_callback_to_a_context_followed_already_gets_the_update_covering_the_move(
    ) {
        moved_after_its_first_callback("moved-followed", true);
    }

    #[test]
    fn a_subscription_whose_context_is_destroyed_while_it_attaches_waits_for_it() {
        let t = Setup::new("attach");
        let (_a, rx_a) = watched(&t, &t.r, "mid");
        // `b` finds the context open; before it is added, another thread destroys the context,
        // start to end.
        let shared = t.r.shared().clone();
        let point = "attach_sub_inner: entry found, subscription not added yet";
        hook::set(point, move || {
            elsewhere(move || destroy(&shared, "mid").unwrap());
        });
        let (_b, rx_b) = watch(&t.r, "mid");
        assert!(!hook::is_set(point), "the attach never reached the point");
        // Both wait for the context, and get it when it is created again.
        let v = t.w.contexts().set("mid", obj(2)).unwrap();
        for rx in [&rx_a, &rx_b] {
            expect_created(&poll_next(&t.r, rx), v, &obj(2), "w");
        }
    }

    #[test]
    fn a_write_after_another_client_destroyed_the_context_creates_it_again() {
        let t = Setup::new("retired");
        t.w.contexts().set("anew", obj(1)).unwrap();
        // `r` knows of it (it asks the gateway: no announcement to wait for).
        assert_eq!(t.r.contexts().get("anew").unwrap().version, 1);
        // `w`'s write has found its entry for the context (the one this thread wrote last) when
        // `r` destroys the context, start to end: what a write that begins after the destroy
        // returned finds while `w`'s connection has not read the notice yet.
        let shared = t.r.shared().clone();
        let point = "write: entry found, not written yet";
        hook::set(point, move || {
            elsewhere(move || destroy(&shared, "anew").unwrap());
        });
        let v = t.w.contexts().set("anew", obj(2)).unwrap();
        assert!(!hook::is_set(point), "the write never reached the point");
        // The write created the context again; it did not go to the destroyed one's segment,
        // where nobody would ever see it.
        let s = t.r.contexts().get("anew").unwrap();
        assert_eq!(
            (s.version, &*s.data),
            (v, &obj(2)),
            "the write (version {v}) is not in the context"
        );
        // And subscribers to the re-created context get it.
        let (_sub, rx) = watch(&t.r, "anew");
        expect_first(&t.r, &rx, v, &obj(2));
    }

    #[test]
    fn a_destroyed_mark_the_gateway_denies_detaches_nothing() {
        let t = Setup::new("bogus-mark");
        let (_sub, _rx) = watched(&t, &t.w, "live");
        // A broken or hostile peer that maps the context writable marks the live context
        // destroyed (here through `w`'s own mapping of it: the same memory).
        let e = open(t.w.shared(), "live").unwrap().unwrap();
        e.store.ctl().retire();
        // Nobody can write it now: a typed error, not a write gone where nobody looks.
        let err = t.w.contexts().set("live", obj(2)).unwrap_err();
        assert!(matches!(err, ContextError::Corrupt(_)), "{err:?}");
        // The subscription is still on the context, not waiting for it to be created again
        // (which would never happen: the gateway still has it).
        {
            let st = t.w.shared().ctx.lock().unwrap();
            assert!(st.open.contains_key("live"), "the context was forgotten");
            assert!(
                !st.waiting.contains_key("live"),
                "the subscription was detached"
            );
        }
        // Reads go on.
        let s = t.w.contexts().get("live").unwrap();
        assert_eq!((s.version, &*s.data), (1, &obj(1)));
    }

    #[test]
    fn a_read_after_another_client_destroyed_the_context_finds_nothing() {
        let t = Setup::new("retired-get");
        t.w.contexts().set("went", obj(1)).unwrap();
        assert_eq!(t.w.contexts().get("went").unwrap().version, 1);
        // `r` knows of it (it asks the gateway: no announcement to wait for).
        assert_eq!(t.r.contexts().get("went").unwrap().version, 1);
        // `w`'s read has found its entry for the context when `r` destroys it, start to end
        // (as in the test above).
        let shared = t.r.shared().clone();
        let point = "get: entry found, not read yet";
        hook::set(point, move || {
            elsewhere(move || destroy(&shared, "went").unwrap());
        });
        let s = t.w.contexts().get("went").unwrap();
        assert!(!hook::is_set(point), "the read never reached the point");
        assert_eq!(
            (s.version, &*s.data),
            (0, &Value::map()),
            "the read shows the destroyed context's value"
        );
    }

    /// `c` follows `name`; another client destroys it while `c`'s connection has not read the
    /// notice (held back), before `c` subscribes again (`at_join`: after the new subscription
    /// has found the context, before it joins it). The new subscription gets no first callback
    /// from the destroyed context: it waits, with the old one, for the context to be created
    /// again.
    fn subscribed_after_another_client_destroyed(tag: &str, at_join: bool) {
        let t = Setup::new(tag);
        let name = "went";
        let (_a, rx_a) = watched(&t, &t.w, name);
        hold_notices(t.w.shared());
        let shared = t.r.shared().clone();
        let gone = move || destroy(&shared, name).unwrap();
        let point = "attach_sub_inner: entry found, subscription not added yet";
        if at_join {
            hook::set(point, move || elsewhere(gone));
        } else {
            gone();
        }
        let (_b, rx_b) = watch(&t.w, name);
        assert!(
            !hook::is_set(point),
            "the subscription never reached the point"
        );
        // Whatever the connection reads now is stale.
        release_notices(t.w.shared());
        let v = t.r.contexts().set(name, obj(2)).unwrap();
        for rx in [&rx_a, &rx_b] {
            // Not the destroyed context's value: the creation of the new one.
            expect_created(&poll_next(&t.w, rx), v, &obj(2), "r");
        }
    }

    #[test]
    fn a_subscription_to_a_context_another_client_destroyed_waits_for_it() {
        subscribed_after_another_client_destroyed("retired-sub", false);
    }

    #[test]
    fn a_subscription_joining_a_context_another_client_destroys_waits_for_it() {
        subscribed_after_another_client_destroyed("retired-join", true);
    }

    #[test]
    fn destroy_finds_a_context_whose_announcement_has_not_been_read() {
        let t = Setup::new("destroy-unread");
        hold_notices(t.w.shared());
        t.r.contexts().set("fresh", obj(1)).unwrap();
        // `w` has not heard of it, but it exists: destroying it works.
        destroy_unheard(&t, "fresh");
        // And a name that is nowhere is still not found.
        let err = destroy(t.w.shared(), "nowhere").unwrap_err();
        assert!(matches!(err, ContextError::NotFound(_)), "{err:?}");
    }

    #[test]
    fn destroy_finds_a_context_created_anew_since_it_was_announced() {
        let t = Setup::new("destroy-anew");
        t.r.contexts().set("again", obj(1)).unwrap();
        // `w` knows the first one.
        assert_eq!(t.w.contexts().get("again").unwrap().version, 1);
        hold_notices(t.w.shared());
        destroy(t.r.shared(), "again").unwrap();
        t.r.contexts().set("again", obj(2)).unwrap();
        // `w` still has the first one's id; the name stands for the second one now.
        destroy_unheard(&t, "again");
    }

    /// `t.w`, its context notices held, destroys `name`; then it is gone for everyone.
    fn destroy_unheard(t: &Setup, name: &str) {
        destroy(t.w.shared(), name).unwrap();
        release_notices(t.w.shared());
        assert_eq!(
            t.r.contexts().get(name).unwrap().version,
            0,
            "{name} is still there"
        );
    }

    #[test]
    fn a_context_destroyed_while_its_first_callbacks_are_given_owes_them_again() {
        let t = Setup::new("start");
        // Subscribed before the context exists: it attaches when the context is created, and
        // its first callback comes from the next `poll`.
        let (sub, rx) = watch(&t.r, "gone");
        t.w.contexts().set("gone", obj(1)).unwrap();
        let old = t.w.contexts().update("gone", obj(2)).unwrap();
        // The context is destroyed (by this client: `destroyed` runs before `destroy` returns)
        // after the pass giving the first callback has begun, before it records the start.
        let shared = t.r.shared().clone();
        at_next_first_callbacks(&t.r, move || destroy(&shared, "gone").unwrap());
        // SYNC(sub-start): a test's look at the value; this thread stored it, if anyone did.
        let start = sub.sub.start.load(Ordering::Acquire);
        assert_eq!(
            start, NEEDS_SNAPSHOT,
            "the subscription waits for the context again, so it needs a first callback \
             (it was given version {start} of the destroyed context, which was at {old})"
        );
        // Created again: the subscription gets its first callback.
        let v = t.w.contexts().set("gone", obj(3)).unwrap();
        expect_created(&poll_next(&t.r, &rx), v, &obj(3), "w");
    }

    #[test]
    fn a_follow_made_stale_during_its_first_callback_pass_leaves_the_first_callback_to_the_new_one()
    {
        let t = Setup::new("stale");
        let (a, _rx_a) = watched(&t, &t.r, "again");
        // `b` joins the followed context: the next poll gives it its first callback.
        let (b, _rx_b) = new_sub("again");
        attach_sub_inner(t.r.shared(), b.clone()).unwrap();
        // Right then every subscription goes (the context is let go of) and `c` comes: the
        // context is taken up again, with a new follow, while the old one is in its pass.
        let (c, rx_c) = new_sub("again");
        let shared = t.r.shared().clone();
        at_next_first_callbacks(&t.r, move || {
            drop(a);
            // SYNC(sub-active): as `ContextSubscription::drop`.
            b.active.store(false, Ordering::Release);
            detach(&shared, &b);
            attach_sub_inner(&shared, c).unwrap();
        });
        let v = t.w.contexts().update("again", obj(2)).unwrap();
        // `c` gets the current value, whichever follow gives it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while seen.last() != Some(&v) {
            assert!(
                Instant::now() < deadline,
                "c never saw version {v}: it saw {seen:?} (a first callback from the stale \
                 follow, then nothing from the new one)"
            );
            t.r.poll(Duration::from_millis(100));
            seen.extend(rx_c.try_iter().map(|u| u.version));
        }
    }
}
