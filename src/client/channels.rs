//! Colour channels on the client (features.md §6): named contexts `___channel___<name>`
//! holding `{name, meta, data}`, joined one at a time (single mode) or several (multi mode).
//! Publishing replaces top-level keys of `data`; subscribers follow whatever channels this
//! client is on; FDC3 contexts are stored one latest value per type. Restrictions are enforced
//! by the gateway (a read-only segment for peers that may not write).

use super::contexts::{self as ctx, ContextError, ContextSubscription, ContextUpdate};
use super::engine::Shared;
use crate::gateway::channels::CHANNEL_PREFIX;
use crate::status::Status;
use crate::wire::frame::Instance;
use crate::wire::{Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A channel as stored: name, metadata, data.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelContext {
    pub name: String,
    pub meta: Value,
    /// The channel's data; the most recent FDC3 context (if any) decoded as `data.fdc3`.
    pub data: Value,
}

/// What a channel subscriber receives.
#[derive(Debug, Clone)]
pub struct ChannelUpdate {
    /// The channel.
    pub channel: String,
    /// Its data (with `fdc3` decoded), as in [`ChannelContext::data`].
    pub data: Value,
    /// The whole channel context.
    pub context: ChannelContext,
    /// Who wrote it.
    pub updater: Option<Arc<Instance>>,
    /// The context version.
    pub version: u64,
}

/// One channel at a time, or several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelMode {
    #[default]
    Single,
    Multi,
}

type ChannelCallback = Arc<dyn Fn(&ChannelUpdate) + Send + Sync>;
type ChangedCallback = Arc<dyn Fn(&[String]) + Send + Sync>;

struct Follower {
    id: u64,
    cb: ChannelCallback,
    /// Context subscriptions for the channels currently joined (by channel name).
    current: Mutex<Vec<(String, ContextSubscription)>>,
    /// Cleared when the subscription is dropped (`SYNC(follower-active)`): no more callbacks.
    active: AtomicBool,
}

#[derive(Default)]
pub(crate) struct ChannelState {
    mode: ChannelMode,
    joined: Vec<String>,
    followers: Vec<Arc<Follower>>,
    on_changed: Vec<(u64, ChangedCallback)>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn context_name(channel: &str) -> String {
    format!("{CHANNEL_PREFIX}{channel}")
}

/// `fdc3.instrument` → `fdc3_fdc3&instrument` (the io.Connect storage key).
fn fdc3_key(ty: &str) -> String {
    format!("fdc3_{}", ty.replace('.', "&"))
}

/// Reads a channel context value into a [`ChannelContext`], decoding the latest FDC3 payload.
fn channel_context(v: &Value) -> ChannelContext {
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let meta = v.get("meta").cloned().unwrap_or(Value::map());
    let mut data = v.get("data").cloned().unwrap_or(Value::map());
    if let Some(latest) = v.get("latest_fdc3_type").and_then(Value::as_str) {
        let stored_key = format!("fdc3_{latest}");
        if let Some(Value::Map(rest)) = data.get(&stored_key).cloned() {
            let mut fdc3 = Map::new();
            fdc3.insert("type".into(), Value::from(latest.replace('&', ".")));
            fdc3.extend(rest);
            if let Some(m) = data.as_map_mut() {
                m.insert("fdc3".into(), Value::Map(fdc3));
            }
        }
    }
    ChannelContext { name, meta, data }
}

pub(crate) fn all(shared: &Shared) -> Vec<String> {
    ctx::all(shared)
        .into_iter()
        .filter_map(|n| n.strip_prefix(CHANNEL_PREFIX).map(str::to_string))
        .collect()
}

pub(crate) fn get(shared: &Arc<Shared>, name: &str) -> Result<ChannelContext, ContextError> {
    let snap = ctx::get(shared, &context_name(name))?;
    if snap.version == 0 {
        // Shown as "context with channel NAME does not exist".
        return Err(ContextError::NotFound(format!("channel {name}")));
    }
    Ok(channel_context(&snap.data))
}

/// The contexts of the channels this client may read. One it may not read, or one removed
/// since [`all`] listed it, is left out: the list is of what `get` would give, and one
/// unreadable channel does not hide the others (`all` still names every channel).
pub(crate) fn list(shared: &Arc<Shared>) -> Result<Vec<ChannelContext>, ContextError> {
    let mut out = Vec::new();
    for n in all(shared) {
        match get(shared, &n) {
            Ok(c) => out.push(c),
            Err(e) if matches!(e.status(), Status::PermissionDenied | Status::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn notify_changed(shared: &Arc<Shared>, joined: Vec<String>, cbs: Vec<ChangedCallback>) {
    if cbs.is_empty() {
        return;
    }
    shared.push_task(super::engine::Task::Call(Box::new(move || {
        for cb in &cbs {
            super::engine::isolated("a channel callback", || cb(&joined));
        }
    })));
}

pub(crate) fn set_mode(shared: &Arc<Shared>, mode: ChannelMode) {
    shared
        .channels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .mode = mode;
}

pub(crate) fn join(shared: &Arc<Shared>, name: &str) -> Result<(), ContextError> {
    // Exists, and we may read it (the gateway refuses otherwise).
    get(shared, name)?;
    let (joined, followers, cbs, left) = {
        let mut st = shared.channels.lock().unwrap_or_else(|e| e.into_inner());
        if st.joined.iter().any(|j| j == name) {
            return Ok(());
        }
        let left = if st.mode == ChannelMode::Single {
            std::mem::take(&mut st.joined)
        } else {
            Vec::new()
        };
        st.joined.push(name.to_string());
        (
            st.joined.clone(),
            st.followers.clone(),
            st.on_changed
                .iter()
                .map(|(_, c)| c.clone())
                .collect::<Vec<_>>(),
            left,
        )
    };
    for f in &followers {
        f.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(c, _)| !left.contains(c));
        follow(shared, f, name)?;
    }
    notify_changed(shared, joined, cbs);
    Ok(())
}

pub(crate) fn leave(shared: &Arc<Shared>, name: Option<&str>) {
    let (joined, followers, cbs, left) = {
        let mut st = shared.channels.lock().unwrap_or_else(|e| e.into_inner());
        let left: Vec<String> = match name {
            Some(n) => st.joined.iter().filter(|j| *j == n).cloned().collect(),
            None => st.joined.clone(),
        };
        if left.is_empty() {
            return;
        }
        st.joined.retain(|j| !left.contains(j));
        (
            st.joined.clone(),
            st.followers.clone(),
            st.on_changed
                .iter()
                .map(|(_, c)| c.clone())
                .collect::<Vec<_>>(),
            left,
        )
    };
    // Leaving invokes no data callback (io.Connect): just stop following.
    for f in &followers {
        f.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(c, _)| !left.contains(c));
    }
    notify_changed(shared, joined, cbs);
}

pub(crate) fn my_channels(shared: &Shared) -> Vec<String> {
    shared
        .channels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .joined
        .clone()
}

/// Replaces the given top-level keys of the channel's data (each key wholesale, others kept).
pub(crate) fn publish(
    shared: &Arc<Shared>,
    data: Value,
    name: Option<&str>,
) -> Result<u64, ContextError> {
    let Value::Map(data) = data else {
        return Err(ContextError::InvalidArgument(
            "Please provide the data as an object!".into(),
        ));
    };
    let targets: Vec<String> = match name {
        Some(n) => vec![n.to_string()],
        None => {
            let joined = my_channels(shared);
            if joined.is_empty() {
                return Err(ContextError::InvalidArgument(
                    "Cannot publish to channel, because not joined to a channel!".into(),
                ));
            }
            joined
        }
    };
    let paths: Vec<(String, Value)> = data
        .into_iter()
        .map(|(k, v)| (format!("data.{k}"), v))
        .collect();
    let mut last = 0;
    for t in targets {
        get(shared, &t)?;
        last = ctx::set_paths(shared, &context_name(&t), paths.clone())?;
    }
    Ok(last)
}

/// Stores an FDC3 context (`{type, ...}`) as the channel's latest value of its type.
pub(crate) fn publish_fdc3(
    shared: &Arc<Shared>,
    context: Value,
    name: Option<&str>,
) -> Result<u64, ContextError> {
    let ty = context
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_string);
    let (Some(ty), Value::Map(mut rest)) = (ty, context) else {
        return Err(ContextError::InvalidArgument(
            "Expected a valid FDC3 Context with compulsory 'type' field".into(),
        ));
    };
    rest.shift_remove("type");
    let targets: Vec<String> = match name {
        Some(n) => vec![n.to_string()],
        None => my_channels(shared),
    };
    if targets.is_empty() {
        return Err(ContextError::InvalidArgument(
            "Cannot publish to channel, because not joined to a channel!".into(),
        ));
    }
    let key = fdc3_key(&ty);
    let paths = vec![
        (format!("data.{key}"), Value::Map(rest)),
        (
            "latest_fdc3_type".to_string(),
            Value::from(key.strip_prefix("fdc3_").unwrap_or(&key)),
        ),
    ];
    let mut last = 0;
    for t in targets {
        get(shared, &t)?;
        last = ctx::set_paths(shared, &context_name(&t), paths.clone())?;
    }
    Ok(last)
}

fn follow(shared: &Arc<Shared>, f: &Arc<Follower>, channel: &str) -> Result<(), ContextError> {
    let cb = f.cb.clone();
    let ch = channel.to_string();
    let weak = Arc::downgrade(f);
    let sub = ctx::subscribe(
        shared,
        &context_name(channel),
        Arc::new(move |u: &ContextUpdate| {
            // SYNC(follower-active): pairs with the Release in `ChannelSubscription::drop`; only
            // the flag is read.
            if weak
                .upgrade()
                .is_some_and(|f| f.active.load(Ordering::Acquire))
            {
                let context = channel_context(&u.data);
                let update = ChannelUpdate {
                    channel: ch.clone(),
                    data: context.data.clone(),
                    context,
                    updater: u.updater.clone(),
                    version: u.version,
                };
                cb(&update);
            }
        }),
    )?;
    f.current
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((channel.to_string(), sub));
    Ok(())
}

/// Follows this client's channel membership.
pub(crate) fn subscribe(
    shared: &Arc<Shared>,
    cb: ChannelCallback,
) -> Result<ChannelSubscription, ContextError> {
    let f = Arc::new(Follower {
        // Relaxed: a counter for ids; nothing is published through it.
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        cb,
        current: Mutex::new(Vec::new()),
        active: AtomicBool::new(true),
    });
    let joined = {
        let mut st = shared.channels.lock().unwrap_or_else(|e| e.into_inner());
        st.followers.push(f.clone());
        st.joined.clone()
    };
    for j in joined {
        follow(shared, &f, &j)?;
    }
    Ok(ChannelSubscription {
        shared: Arc::downgrade(shared),
        follower: Some(f),
        fixed: None,
    })
}

/// Follows one named channel, without joining it.
pub(crate) fn subscribe_for(
    shared: &Arc<Shared>,
    name: &str,
    cb: ChannelCallback,
) -> Result<ChannelSubscription, ContextError> {
    // Exists, and we may read it: refused as `get` and `join` are (`NOT_FOUND`,
    // `PERMISSION_DENIED`, or why the gateway could not be asked).
    get(shared, name)?;
    let f = Arc::new(Follower {
        // Relaxed: a counter for ids; nothing is published through it.
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        cb,
        current: Mutex::new(Vec::new()),
        active: AtomicBool::new(true),
    });
    follow(shared, &f, name)?;
    Ok(ChannelSubscription {
        shared: Arc::downgrade(shared),
        follower: None,
        fixed: Some(f),
    })
}

pub(crate) fn on_changed(shared: &Arc<Shared>, cb: ChangedCallback) -> u64 {
    // Relaxed: a counter for ids; nothing is published through it.
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut st = shared.channels.lock().unwrap_or_else(|e| e.into_inner());
    // The current membership first, as io.Connect replays it.
    let joined = st.joined.clone();
    let c = cb.clone();
    shared.push_task(super::engine::Task::Call(Box::new(move || c(&joined))));
    st.on_changed.push((id, cb));
    id
}

/// A channel subscription; dropping it (or `unsubscribe`) stops the callbacks.
pub struct ChannelSubscription {
    shared: std::sync::Weak<Shared>,
    follower: Option<Arc<Follower>>,
    fixed: Option<Arc<Follower>>,
}

impl std::fmt::Debug for ChannelSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelSubscription")
    }
}

impl ChannelSubscription {
    /// Stops the callbacks.
    pub fn unsubscribe(self) {}
}

impl Drop for ChannelSubscription {
    fn drop(&mut self) {
        for f in self.follower.iter().chain(self.fixed.iter()) {
            // SYNC(follower-active): pairs with the Acquire in the callback set up by `follow`;
            // the flag is the whole message (no more callbacks), nothing else rides on it.
            f.active.store(false, Ordering::Release);
            f.current.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        if let (Some(shared), Some(f)) = (self.shared.upgrade(), &self.follower) {
            shared
                .channels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .followers
                .retain(|x| x.id != f.id);
        }
    }
}
