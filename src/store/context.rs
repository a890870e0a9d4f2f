//! Writing a shared context: one function for every writer (native clients, the gateway when it
//! sets up channels, the WebSocket bridge for web peers), so the protocol exists once.

use super::{Store, StoreError, StoreMemory};
use crate::model::context::{apply, ContextError as ModelError, ContextOp};
use crate::wire::{codec, Value};
use std::sync::Arc;
use std::time::Instant;

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
/// version, to skip decoding when it is current. Returns the version after the call and, when
/// something changed, the new value (nothing is written when nothing changes).
pub fn write<M: StoreMemory>(
    store: &Store<M>,
    token: u64,
    op: &ContextOp,
    expect: Option<u64>,
    max_size: usize,
    deadline: Instant,
    cached: Option<(u64, Arc<Value>)>,
) -> Result<(u64, Option<Arc<Value>>), WriteError> {
    let guard = store.lock(token, || Instant::now() >= deadline)?;
    let version = guard.version();
    if let Some(e) = expect {
        if e != version {
            return Err(WriteError::Stale {
                expected: e,
                current: version,
            });
        }
    }
    let current: Option<Arc<Value>> = if version == 0 {
        None
    } else {
        match cached.filter(|(v, _)| *v == version) {
            Some((_, d)) => Some(d),
            None => {
                let mut buf = Vec::new();
                guard.read(&mut buf)?;
                Some(Arc::new(Value::Map(decode_snapshot(&buf)?)))
            }
        }
    };
    let cur_map = current.as_deref().and_then(Value::as_map);
    let Some(change) = apply(cur_map, op)? else {
        return Ok((version, None));
    };
    let norm = op.normalized(&change, cur_map.is_some());
    let data = Value::Map(change.data);
    let bytes = codec::encode(&data);
    if bytes.len() > max_size {
        return Err(WriteError::TooLarge {
            size: bytes.len(),
            max: max_size,
        });
    }
    let payload = codec::encode(&norm.to_value());
    let v = guard.commit(&bytes, KIND_OP, Some(&payload))?;
    Ok((v, Some(Arc::new(data))))
}
