//! Writing a shared context: one function for every writer (native clients, the gateway when it
//! sets up channels, the WebSocket bridge for web peers), so the protocol exists once.

use super::{Store, StoreError, StoreMemory};
use crate::model::context::{apply_mut, update_in_place, ContextError as ModelError, ContextOp};
use crate::wire::{codec, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Log record kind of a context operation (payload: the normalized op, encoded).
pub const KIND_OP: u16 = 1;

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `expect` was not the current version.
    #[error("context is at version {current}, not {expected}")]
    Stale { expected: u64, current: u64 },
    /// The new value is larger than allowed.
    #[error("value of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// The snapshot does not decode.
    #[error("context corrupt: {0}")]
    Corrupt(String),
    /// The new value cannot be stored: readers could not decode it.
    #[error("invalid value: {0}")]
    Encode(#[from] codec::EncodeError),
    /// The context was destroyed ([`crate::store::StoreCtl::retire`]): nothing was written.
    #[error("context was destroyed")]
    Retired,
}

/// Decodes a snapshot (empty bytes: `{}`).
pub fn decode_snapshot(bytes: &[u8]) -> Result<crate::wire::Map, WriteError> {
    if bytes.is_empty() {
        return Ok(crate::wire::Map::new());
    }
    match codec::decode(bytes) {
        Ok(Value::Map(m)) => Ok(m),
        Ok(_) => Err(WriteError::Corrupt("snapshot is not an object".into())),
        Err(e) => Err(WriteError::Corrupt(format!(
            "snapshot does not decode: {e}"
        ))),
    }
}

/// Applies `op` under the writer lock as `token`. `cached` may hold the decoded value at some
/// version: when it is current it is updated in place (copied first only if someone else still
/// holds it), which saves decoding and copying. Returns the version after the call, whether
/// anything changed (nothing is written when nothing does), and the value now.
pub fn write<M: StoreMemory>(
    store: &Store<M>,
    token: u64,
    op: &ContextOp,
    expect: Option<u64>,
    max_size: usize,
    timeout: Duration,
    cached: Option<(u64, Arc<Value>)>,
) -> Result<(u64, bool, Arc<Value>), WriteError> {
    write_noted(store, token, op, expect, max_size, timeout, cached, None)
}

/// [`write`] with a note logged beside the op: `(key, value)` becomes one more entry of the
/// logged map (`{"update": …, key: value}`), which followers that do not know the key ignore.
/// The WebSocket bridge notes a web writer's GW3 delta there, so web subscribers get it
/// verbatim.
#[allow(clippy::too_many_arguments)]
pub fn write_noted<M: StoreMemory>(
    store: &Store<M>,
    token: u64,
    op: &ContextOp,
    expect: Option<u64>,
    max_size: usize,
    timeout: Duration,
    cached: Option<(u64, Arc<Value>)>,
    note: Option<(&str, Value)>,
) -> Result<(u64, bool, Arc<Value>), WriteError> {
    // The clock is read only when the lock is contended.
    let mut deadline: Option<Instant> = None;
    let guard = store.lock(token, || {
        let d = *deadline.get_or_insert_with(|| crate::wait::deadline(timeout));
        Instant::now() >= d
    })?;
    // A destroy that retired the segment before we took the lock is seen here. (One that
    // retires it just after this check races the write, which then goes with the context, as
    // if it had come first.)
    if store.ctl().is_retired() {
        return Err(WriteError::Retired);
    }
    let version = guard.version();
    if let Some(e) = expect {
        if e != version {
            return Err(WriteError::Stale {
                expected: e,
                current: version,
            });
        }
    }
    let exists = version != 0;
    let mut current: Arc<Value> = match cached.filter(|(v, _)| *v == version && exists) {
        Some((_, d)) => d,
        None if exists => {
            let mut buf = Vec::new();
            let decoded = guard
                .read(&mut buf)
                .map_err(WriteError::from)
                .and_then(|_| decode_snapshot(&buf));
            match decoded {
                Ok(m) => Arc::new(Value::Map(m)),
                // A `set` replaces everything, so it repairs a snapshot that was scribbled
                // over; every other op needs the current value and reports the corruption.
                Err(WriteError::Corrupt(_) | WriteError::Store(StoreError::Corrupt(_)))
                    if matches!(op, ContextOp::Set(_)) =>
                {
                    Arc::new(Value::map())
                }
                Err(e) => return Err(e),
            }
        }
        None => Arc::new(Value::map()),
    };
    let Value::Map(map) = Arc::make_mut(&mut current) else {
        return Err(WriteError::Corrupt("snapshot is not an object".into()));
    };
    // Scratch buffers of this thread: a write allocates nothing for its encodings.
    let (mut payload, mut bytes) = SCRATCH.with(|c| c.take());
    payload.clear();
    let r = encode_and_commit(
        &guard,
        op,
        note,
        map,
        exists,
        &mut payload,
        &mut bytes,
        max_size,
    );
    // Kept unless one huge write grew them.
    if payload.capacity() <= 1 << 20 && bytes.capacity() <= 1 << 20 {
        SCRATCH.with(|c| c.set((payload, bytes)));
    }
    match r? {
        Some(v) => Ok((v, true, current)),
        None => Ok((version, false, current)),
    }
}

thread_local! {
    static SCRATCH: std::cell::Cell<(Vec<u8>, Vec<u8>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Applies the op to `map`, encodes the logged op and the new value, commits. `Ok(None)`:
/// nothing changed, nothing written.
#[allow(clippy::too_many_arguments)]
fn encode_and_commit<M: StoreMemory>(
    guard: &super::WriteGuard<'_, M>,
    op: &ContextOp,
    note: Option<(&str, Value)>,
    map: &mut crate::wire::Map,
    exists: bool,
    payload: &mut Vec<u8>,
    bytes: &mut Vec<u8>,
    max_size: usize,
) -> Result<Option<u64>, WriteError> {
    // An op too deep to encode is committed without a logged payload (followers take the
    // snapshot); the snapshot itself must encode, or nothing is written.
    let mut logged = true;
    match (op, note) {
        // The hot path: no delta built, the logged op encoded while applying.
        (ContextOp::Update(new), None) if exists => match update_in_place(map, new, payload) {
            Ok(false) => return Ok(None),
            Ok(true) => {}
            Err(_) => logged = false,
        },
        (_, note) => {
            let Some(delta) = apply_mut(map, exists, op)? else {
                return Ok(None);
            };
            let mut op_value = op.normalized_delta(&delta, exists).to_value();
            if let (Value::Map(m), Some((k, v))) = (&mut op_value, note) {
                m.insert(k.to_string(), v);
            }
            logged = codec::encode_into(&op_value, payload).is_ok();
        }
    }
    bytes.clear();
    codec::encode_map_into(map, bytes)?;
    if bytes.len() > max_size {
        return Err(WriteError::TooLarge {
            size: bytes.len(),
            max: max_size,
        });
    }
    let v = guard.commit(bytes, KIND_OP, logged.then_some(payload.as_slice()))?;
    Ok(Some(v))
}
