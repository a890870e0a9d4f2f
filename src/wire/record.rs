//! Records on a lane (the data plane). Each ring record's `kind` says which of these it is; its
//! body starts with a fixed little-endian header, then the payload. A message larger than one
//! ring record is split into fragments: every fragment but the last has [`FRAG_MORE`] in the
//! record flags, every fragment but the first has [`FRAG_CONT`], and only the first carries
//! the fixed header. A record without `FRAG_CONT` always starts a new message, so a message
//! whose sender gave up part-way (its peer stopped reading) is dropped by the receiver, never
//! glued to the next one.
//!
//! | kind | body |
//! |---|---|
//! | `INVOKE` (1) | call id u64, method id u32, flags u32, timeout ms u32, reserved u32, payload |
//! | `RESULT` (2) | call id u64, status u32 (0 ok, 1 error), flags u32, payload |
//! | `CANCEL` (3) | call id u64 |
//!
//! Payload flags: [`PAYLOAD_RAW`] means the payload is raw bytes (a `Value::Bytes` sent without
//! encoding); otherwise it is an encoded [`Value`](super::Value). An error result's payload is an
//! encoded map `{message, context?}`.

use super::codec::{self, DecodeError, EncodeError};
use super::value::Value;
use thiserror::Error;

pub const KIND_INVOKE: u16 = 1;
pub const KIND_RESULT: u16 = 2;
pub const KIND_CANCEL: u16 = 3;
/// A bus message: topic, routing key, payload (layout in `client::bus`).
pub const KIND_BUS: u16 = 4;
/// Stream records (layouts in [`super::stream`]): a subscription request (subscriber → server),
/// its answer, one data item, a subscriber ending its subscription (subscriber → server) and a
/// server ending one (server → subscriber). The two ends are two kinds, not one: subscription
/// ids are the subscriber's, so between two peers that both serve and subscribe an id names a
/// subscription in each direction, and one kind for both would end both.
pub const KIND_SUB_REQUEST: u16 = 5;
pub const KIND_SUB_REPLY: u16 = 6;
pub const KIND_STREAM_DATA: u16 = 7;
pub const KIND_SUB_CLOSE: u16 = 8;
pub const KIND_SUB_DROP: u16 = 9;

/// Record flag: more fragments of this message follow.
pub const FRAG_MORE: u16 = 1;
/// Record flag: this fragment continues the message before it (set on every fragment but the
/// first).
pub const FRAG_CONT: u16 = 2;
/// Payload flag: raw bytes.
pub const PAYLOAD_RAW: u32 = 1;

pub const INVOKE_HEADER: usize = 24;
pub const RESULT_HEADER: usize = 16;

/// A record body that does not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    #[error("record kind {0} unknown")]
    UnknownKind(u16),
    #[error("record body shorter than its header")]
    Short,
    #[error("payload: {0}")]
    Payload(#[from] DecodeError),
    #[error("unknown result status {0}")]
    BadStatus(u32),
}

/// A parsed invoke record (payload still encoded).
#[derive(Debug)]
pub struct InvokeHead {
    pub call_id: u64,
    pub method_id: u32,
    pub flags: u32,
    pub timeout_ms: u32,
}

/// A parsed result record (payload still encoded).
#[derive(Debug)]
pub struct ResultHead {
    pub call_id: u64,
    pub ok: bool,
    pub flags: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The size of `v` as a payload ([`encode_payload`]'s bytes, without encoding it): what every
/// payload limit is compared with, on whichever side (client, gateway, bridge) it is checked.
pub fn payload_len(v: &Value) -> usize {
    match v {
        Value::Bytes(b) => b.len(),
        other => codec::encoded_len(other),
    }
}

/// `Err` with the message (a native library's words) when `v` is a payload larger than `max`:
/// the check the gateway and the bridge make of what a peer without a library of ours sends.
pub fn check_payload(v: &Value, max: u64) -> Result<(), String> {
    let size = payload_len(v);
    if size as u64 > max {
        return Err(format!(
            "payload of {size} bytes exceeds the limit of {max} bytes"
        ));
    }
    Ok(())
}

/// The message of a method result of `size` payload bytes over the limit `max` (`None` within
/// it): the same words whichever side finds it (the server's library, or the gateway for a
/// server behind it).
pub fn result_over_limit(size: usize, max: usize) -> Option<String> {
    (size > max).then(|| format!("result of {size} bytes exceeds the limit of {max} bytes"))
}

/// Encodes a payload: raw bytes stay raw, anything else is encoded. Returns the payload flags.
/// A value the codec refuses leaves `out` as it was.
pub fn encode_payload(v: &Value, out: &mut Vec<u8>) -> Result<u32, EncodeError> {
    match v {
        Value::Bytes(b) => {
            out.extend_from_slice(b);
            Ok(PAYLOAD_RAW)
        }
        other => codec::encode_into(other, out).map(|()| 0),
    }
}

/// Decodes a payload written by [`encode_payload`].
pub fn decode_payload(flags: u32, bytes: &[u8]) -> Result<Value, DecodeError> {
    if flags & PAYLOAD_RAW != 0 {
        Ok(Value::Bytes(bytes.to_vec()))
    } else {
        codec::decode(bytes)
    }
}

/// [`decode_payload`] into `slot`, reusing its allocations ([`codec::decode_into`]).
pub fn decode_payload_into(flags: u32, bytes: &[u8], slot: &mut Value) -> Result<(), DecodeError> {
    if flags & PAYLOAD_RAW == 0 {
        return codec::decode_into(bytes, slot);
    }
    match slot {
        Value::Bytes(v) => {
            v.clear();
            v.extend_from_slice(bytes);
        }
        _ => *slot = Value::Bytes(bytes.to_vec()),
    }
    Ok(())
}

/// Builds an invoke body into `out` (cleared first).
pub fn invoke(
    out: &mut Vec<u8>,
    call_id: u64,
    method_id: u32,
    timeout_ms: u32,
    args: &Value,
) -> Result<(), EncodeError> {
    out.clear();
    out.extend_from_slice(&call_id.to_le_bytes());
    out.extend_from_slice(&method_id.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&timeout_ms.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let flags = encode_payload(args, out)?;
    out[12..16].copy_from_slice(&flags.to_le_bytes());
    Ok(())
}

/// Builds a result body into `out` (cleared first). An error carries `{message, context?}`.
/// A value the codec refuses (the result, or an error's context) is an error.
pub fn result(
    out: &mut Vec<u8>,
    call_id: u64,
    outcome: &Result<Value, (String, Option<Value>)>,
) -> Result<(), EncodeError> {
    out.clear();
    out.extend_from_slice(&call_id.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    let (status, flags) = match outcome {
        Ok(v) => (0u32, encode_payload(v, out)?),
        Err((message, context)) => {
            let mut m = super::Map::new();
            m.insert("message".into(), Value::from(message.as_str()));
            if let Some(c) = context {
                m.insert("context".into(), c.clone());
            }
            codec::encode_into(&Value::Map(m), out)?;
            (1, 0)
        }
    };
    out[8..12].copy_from_slice(&status.to_le_bytes());
    out[12..16].copy_from_slice(&flags.to_le_bytes());
    Ok(())
}

/// Builds the result of an invocation the receiver's policy check refused: an error whose
/// `denied` flag tells the caller it is `PermissionDenied`, not the method failing.
pub fn result_denied(out: &mut Vec<u8>, call_id: u64, message: &str) {
    result_marked(out, call_id, message, "denied")
}

/// Builds the result of an invocation whose result was over the payload limit: an error whose
/// `too_large` flag tells the caller it is `PayloadTooLarge`, not the method failing.
pub fn result_too_large(out: &mut Vec<u8>, call_id: u64, message: &str) {
    result_marked(out, call_id, message, "too_large")
}

/// Builds the result of an invocation of a method the server no longer has (unregistered after
/// the caller chose it): an error whose `removed` flag tells the caller it is `NotFound` — the
/// method is gone from that server, perhaps registered again under another id — not the method
/// failing.
pub fn result_removed(out: &mut Vec<u8>, call_id: u64, message: &str) {
    result_marked(out, call_id, message, "removed")
}

/// An error result `{message, mark: true}`.
fn result_marked(out: &mut Vec<u8>, call_id: u64, message: &str, mark: &str) {
    out.clear();
    out.extend_from_slice(&call_id.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut m = super::Map::new();
    m.insert("message".into(), Value::from(message));
    m.insert(mark.into(), Value::Bool(true));
    // A two-key map of a string and a bool: never too deep to encode.
    let _ = codec::encode_into(&Value::Map(m), out);
}

/// Whether an error result is a policy refusal (see [`result_denied`]).
pub fn error_denied(bytes: &[u8]) -> bool {
    error_marked(bytes, "denied")
}

/// Whether an error result is a result over the payload limit (see [`result_too_large`]).
pub fn error_too_large(bytes: &[u8]) -> bool {
    error_marked(bytes, "too_large")
}

/// Whether an error result says the method is gone from the server (see [`result_removed`]).
pub fn error_removed(bytes: &[u8]) -> bool {
    error_marked(bytes, "removed")
}

fn error_marked(bytes: &[u8], mark: &str) -> bool {
    codec::decode(bytes)
        .ok()
        .and_then(|v| v.get(mark).and_then(Value::as_bool))
        .unwrap_or(false)
}

/// Builds a cancel body.
pub fn cancel(out: &mut Vec<u8>, call_id: u64) {
    out.clear();
    out.extend_from_slice(&call_id.to_le_bytes());
}

/// Parses an invoke body's header; the payload is `&body[INVOKE_HEADER..]`.
pub fn parse_invoke(body: &[u8]) -> Result<InvokeHead, RecordError> {
    if body.len() < INVOKE_HEADER {
        return Err(RecordError::Short);
    }
    Ok(InvokeHead {
        call_id: u64_at(body, 0),
        method_id: u32_at(body, 8),
        flags: u32_at(body, 12),
        timeout_ms: u32_at(body, 16),
    })
}

/// Parses a result body's header; the payload is `&body[RESULT_HEADER..]`.
pub fn parse_result(body: &[u8]) -> Result<ResultHead, RecordError> {
    if body.len() < RESULT_HEADER {
        return Err(RecordError::Short);
    }
    let ok = match u32_at(body, 8) {
        0 => true,
        1 => false,
        s => return Err(RecordError::BadStatus(s)),
    };
    Ok(ResultHead {
        call_id: u64_at(body, 0),
        ok,
        flags: u32_at(body, 12),
    })
}

/// Parses a cancel body.
pub fn parse_cancel(body: &[u8]) -> Result<u64, RecordError> {
    if body.len() < 8 {
        return Err(RecordError::Short);
    }
    Ok(u64_at(body, 0))
}

/// Splits an error payload into message and context.
pub fn decode_error(bytes: &[u8]) -> Result<(String, Option<Value>), DecodeError> {
    let v = codec::decode(bytes)?;
    let message = v
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("remote error")
        .to_string();
    let context = v.get("context").cloned();
    Ok((message, context))
}
