//! Stream records (kinds `SUB_REQUEST`, `SUB_REPLY`, `STREAM_DATA`, `SUB_CLOSE` in
//! [`super::record`]): what a stream subscriber and a stream server say to each other, over a
//! lane or relayed by the gateway. Native clients and the WebSocket bridge both speak them, so
//! the layouts are written once, here. All integers are little-endian.
//!
//! | kind | body |
//! |---|---|
//! | `SUB_REQUEST` | subscription id u64 (the subscriber's), method id u32, payload flags u32, arguments payload |
//! | `SUB_REPLY` | subscription id u64, status u32 (0 accepted, 1 rejected), encoded info map |
//! | `STREAM_DATA` | subscription id u64, data flags u32, gap u32, payload flags u32, [extra len u32, encoded extra], payload |
//! | `SUB_CLOSE` (subscriber → server), `SUB_DROP` (server → subscriber) | subscription id u64, reason (UTF-8) |
//!
//! Subscription ids are chosen by the subscriber and are unique per subscriber, so a server
//! keys subscriptions by (subscriber peer, id). Data flags: [`DATA_PRIVATE`] (sent to this
//! subscriber alone), [`DATA_EXTRA`] (an encoded map of extra fields follows the header — the
//! GW3 `sequence` and `snapshot` a web server may send — which native subscribers ignore). `gap`
//! counts items a slow-consumer policy dropped before this one.
//!
//! The reply's info map: `branch` (string), and from native servers `policy` and `queue` (their
//! slow-consumer settings); a rejection carries `reason`, and, when a web server rejected,
//! `reason_uri` and `gw3_reason` (its GW3 error as sent); a refusal under the access-control
//! policy also `denied: true` ([`denial`]).

use super::codec::{self, EncodeError};
use super::record::{decode_payload, decode_payload_into, encode_payload, RecordError};
use super::value::Value;

/// Bytes before a data record's payload (without extras).
pub const DATA_HEADER: usize = 20;
/// Data flag: the item went to this subscriber alone.
pub const DATA_PRIVATE: u32 = 1;
/// Data flag: an encoded map of extra fields follows the header.
pub const DATA_EXTRA: u32 = 2;

fn u32_at(b: &[u8], at: usize) -> Result<u32, RecordError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(RecordError::Short)
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, RecordError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(RecordError::Short)
}

/// The subscription id every stream record starts with.
pub fn sub_id(body: &[u8]) -> Result<u64, RecordError> {
    u64_at(body, 0)
}

/// A subscription request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub sub_id: u64,
    pub method_id: u32,
    pub args: Value,
}

/// Builds a subscription request into `out` (cleared first).
pub fn request(
    out: &mut Vec<u8>,
    sub_id: u64,
    method_id: u32,
    args: &Value,
) -> Result<(), EncodeError> {
    out.clear();
    out.extend_from_slice(&sub_id.to_le_bytes());
    out.extend_from_slice(&method_id.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let flags = encode_payload(args, out)?;
    out[12..16].copy_from_slice(&flags.to_le_bytes());
    Ok(())
}

/// Parses a subscription request.
pub fn parse_request(body: &[u8]) -> Result<Request, RecordError> {
    let sub_id = u64_at(body, 0)?;
    let method_id = u32_at(body, 8)?;
    let flags = u32_at(body, 12)?;
    let args = decode_payload(flags, &body[16..])?;
    Ok(Request {
        sub_id,
        method_id,
        args,
    })
}

/// A server's answer to a subscription request.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub sub_id: u64,
    pub accepted: bool,
    /// The info map (see the module docs); `Null` when it did not decode.
    pub info: Value,
}

/// Builds a reply into `out` (cleared first).
pub fn reply(
    out: &mut Vec<u8>,
    sub_id: u64,
    accepted: bool,
    info: &Value,
) -> Result<(), EncodeError> {
    out.clear();
    out.extend_from_slice(&sub_id.to_le_bytes());
    out.extend_from_slice(&(if accepted { 0u32 } else { 1 }).to_le_bytes());
    codec::encode_into(info, out)
}

/// Parses a reply. An info map that does not decode is `Null` (the answer itself still counts).
pub fn parse_reply(body: &[u8]) -> Result<Reply, RecordError> {
    let sub_id = u64_at(body, 0)?;
    let accepted = match u32_at(body, 8)? {
        0 => true,
        1 => false,
        s => return Err(RecordError::BadStatus(s)),
    };
    let info = codec::decode(&body[12..]).unwrap_or(Value::Null);
    Ok(Reply {
        sub_id,
        accepted,
        info,
    })
}

/// Builds a data record into `body` (cleared first) with subscription id 0 and gap 0: callers
/// that send one item to several subscribers encode it once and patch the id with
/// [`set_sub_id`] (and the gap with [`set_gap`]).
pub fn data_into(body: &mut Vec<u8>, private: bool, data: &Value) -> Result<(), EncodeError> {
    body.clear();
    data_append(body, private, data)
}

/// [`data_into`] appending to what `out` holds (records side by side for a batch; patch each
/// one's slice). On error `out` is left as it was.
pub fn data_append(out: &mut Vec<u8>, private: bool, data: &Value) -> Result<(), EncodeError> {
    let at = out.len();
    out.resize(at + DATA_HEADER, 0);
    let dflags = if private { DATA_PRIVATE } else { 0 };
    out[at + 8..at + 12].copy_from_slice(&dflags.to_le_bytes());
    match encode_payload(data, out) {
        Ok(flags) => {
            out[at + 16..at + 20].copy_from_slice(&flags.to_le_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(at);
            Err(e)
        }
    }
}

/// [`data_into`] with an extra-fields map (omitted when `extra` is `Null` or an empty map).
pub fn data_with_extra(
    body: &mut Vec<u8>,
    private: bool,
    extra: &Value,
    data: &Value,
) -> Result<(), EncodeError> {
    let has_extra = match extra {
        Value::Null => false,
        Value::Map(m) => !m.is_empty(),
        _ => true,
    };
    if !has_extra {
        return data_into(body, private, data);
    }
    body.clear();
    body.resize(DATA_HEADER + 4, 0);
    let dflags = DATA_EXTRA | if private { DATA_PRIVATE } else { 0 };
    body[8..12].copy_from_slice(&dflags.to_le_bytes());
    codec::encode_into(extra, body)?;
    let extra_len = (body.len() - DATA_HEADER - 4) as u32;
    body[DATA_HEADER..DATA_HEADER + 4].copy_from_slice(&extra_len.to_le_bytes());
    let flags = encode_payload(data, body)?;
    body[16..20].copy_from_slice(&flags.to_le_bytes());
    Ok(())
}

/// Sets the subscription id of a record built by [`data_into`].
pub fn set_sub_id(body: &mut [u8], sub_id: u64) {
    if let Some(s) = body.get_mut(0..8) {
        s.copy_from_slice(&sub_id.to_le_bytes());
    }
}

/// Sets the gap count of a record built by [`data_into`].
pub fn set_gap(body: &mut [u8], gap: u32) {
    if let Some(s) = body.get_mut(12..16) {
        s.copy_from_slice(&gap.to_le_bytes());
    }
}

/// One stream item.
#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    pub sub_id: u64,
    pub private: bool,
    pub gap: u32,
    /// Extra fields (GW3 `sequence`, `snapshot`), when the server sent any.
    pub extra: Option<Value>,
    pub data: Value,
}

/// Parses a data record.
pub fn parse_data(body: &[u8]) -> Result<Data, RecordError> {
    let mut data = Value::Null;
    let h = parse_data_into(body, &mut data)?;
    Ok(Data {
        sub_id: h.sub_id,
        private: h.private,
        gap: h.gap,
        extra: h.extra,
        data,
    })
}

/// A data record's fields other than the item.
#[derive(Debug, Clone, PartialEq)]
pub struct DataHead {
    pub sub_id: u64,
    pub private: bool,
    pub gap: u32,
    pub extra: Option<Value>,
}

/// [`parse_data`] decoding the item into `slot`, reusing its allocations
/// ([`codec::decode_into`]). On error `slot` holds part of a value: discard it.
pub fn parse_data_into(body: &[u8], slot: &mut Value) -> Result<DataHead, RecordError> {
    let sub_id = u64_at(body, 0)?;
    let dflags = u32_at(body, 8)?;
    let gap = u32_at(body, 12)?;
    let flags = u32_at(body, 16)?;
    let (extra, at) = if dflags & DATA_EXTRA != 0 {
        let n = u32_at(body, DATA_HEADER)? as usize;
        let from = DATA_HEADER + 4;
        let bytes = body.get(from..from + n).ok_or(RecordError::Short)?;
        (Some(codec::decode(bytes)?), from + n)
    } else {
        (None, DATA_HEADER)
    };
    decode_payload_into(flags, body.get(at..).ok_or(RecordError::Short)?, slot)?;
    Ok(DataHead {
        sub_id,
        private: dflags & DATA_PRIVATE != 0,
        gap,
        extra,
    })
}

/// The info of a reply refusing a subscription to stream `name` under the access-control
/// policy: `denied` makes the subscriber report `PERMISSION_DENIED`, not a rejection by the
/// server.
pub fn denial(name: &str) -> Value {
    Value::object([
        (
            "reason",
            Value::from(format!(
                "the gateway's policy does not allow subscribing to {name:?}"
            )),
        ),
        ("denied", Value::from(true)),
    ])
}

/// Builds a close record.
pub fn close(sub_id: u64, reason: &str) -> Vec<u8> {
    let mut body = sub_id.to_le_bytes().to_vec();
    body.extend_from_slice(reason.as_bytes());
    body
}

/// Parses a close record: (subscription id, reason). Invalid UTF-8 is replaced, not refused.
pub fn parse_close(body: &[u8]) -> Result<(u64, String), RecordError> {
    let sub_id = u64_at(body, 0)?;
    Ok((sub_id, String::from_utf8_lossy(&body[8..]).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stream_record_round_trips() {
        let args = Value::object([("symbol", Value::from("X"))]);
        let mut b = Vec::new();
        request(&mut b, 7, 3, &args).unwrap();
        assert_eq!(
            parse_request(&b).unwrap(),
            Request {
                sub_id: 7,
                method_id: 3,
                args: args.clone()
            }
        );
        let info = Value::object([("branch", Value::from("b1"))]);
        reply(&mut b, 9, true, &info).unwrap();
        let r = parse_reply(&b).unwrap();
        assert!(r.accepted && r.sub_id == 9 && r.info == info);
        reply(&mut b, 9, false, &Value::Null).unwrap();
        assert!(!parse_reply(&b).unwrap().accepted);
        b[8] = 5;
        assert_eq!(parse_reply(&b), Err(RecordError::BadStatus(5)));

        data_into(&mut b, true, &args).unwrap();
        set_sub_id(&mut b, 11);
        set_gap(&mut b, 2);
        let d = parse_data(&b).unwrap();
        assert_eq!((d.sub_id, d.private, d.gap, d.extra), (11, true, 2, None));
        assert_eq!(d.data, args);

        let extra = Value::object([
            ("sequence", Value::from(5)),
            ("snapshot", Value::from(true)),
        ]);
        data_with_extra(&mut b, false, &extra, &args).unwrap();
        set_sub_id(&mut b, 12);
        let d = parse_data(&b).unwrap();
        assert_eq!((d.sub_id, d.private), (12, false));
        assert_eq!(d.extra, Some(extra));
        assert_eq!(d.data, args);
        data_with_extra(&mut b, false, &Value::map(), &args).unwrap();
        assert_eq!(parse_data(&b).unwrap().extra, None);

        let c = close(4, "ClientInitiated");
        assert_eq!(parse_close(&c).unwrap(), (4, "ClientInitiated".to_string()));
    }

    #[test]
    fn truncated_and_hostile_records_are_errors_not_panics() {
        let args = Value::object([("a", Value::from(1))]);
        let mut full = Vec::new();
        data_with_extra(
            &mut full,
            false,
            &Value::object([("s", Value::from(1))]),
            &args,
        )
        .unwrap();
        for n in 0..full.len() {
            let _ = parse_data(&full[..n]);
        }
        let mut hostile = full.clone();
        hostile[DATA_HEADER..DATA_HEADER + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_data(&hostile).is_err());
        for n in 0..16 {
            assert!(parse_request(&vec![0u8; n]).is_err());
            let _ = parse_reply(&vec![0u8; n]);
            let _ = parse_close(&vec![0u8; n.min(7)]).unwrap_err();
        }
    }
}
