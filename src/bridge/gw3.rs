//! GW3 message shapes: ids, envelopes, errors, and the conversions between GW3's JSON and
//! knit's own types (method definitions, identities, argument and result conventions).
//!
//! Everything here is pure; the connection state machine in `session.rs` decides when to send
//! what.

use crate::wire::frame::{Instance, MethodDef, PeerId};
use crate::wire::Value;
use serde_json::{json, Map, Value as J};
use std::sync::atomic::{AtomicU64, Ordering};

/// A JSON object.
pub(crate) type Obj = Map<String, J>;

/// The domains this bridge announces in `welcome`. `context` must be version 2 or the client
/// refuses `setPath` (PROTOCOL.md §4.1).
pub(crate) fn available_domains() -> J {
    json!([
        {"uri": "agm", "description": "", "version": 1},
        {"uri": "activity", "description": "", "version": 2},
        {"uri": "global", "description": "", "version": 1},
        {"uri": "bus", "description": "", "version": 1},
        {"uri": "context", "description": "", "version": 2},
        {"uri": "metrics", "description": "", "version": 1},
    ])
}

/// Makes and parses the gateway's GW3 ids. They have the reference gateway's shape,
/// `<kind>-<node>-<n>` with a random 32-hex-digit node, so tools that normalise transcripts
/// recognise them; clients treat them as opaque strings. Peer ids embed the registry's
/// [`PeerId`], so every peer — native or web — has one GW3 id.
#[derive(Debug)]
pub(crate) struct Ids {
    node: String,
    next: AtomicU64,
}

impl Ids {
    pub(crate) fn new(node: String) -> Self {
        Self {
            node,
            next: AtomicU64::new(1),
        }
    }

    /// The GW3 id of a registry peer.
    pub(crate) fn peer(&self, p: PeerId) -> String {
        self.with('p', p.0)
    }

    /// The registry peer a GW3 peer id names, if it is one of ours.
    pub(crate) fn parse_peer(&self, s: &str) -> Option<PeerId> {
        parse_numbered(s, 'p', &self.node).map(PeerId)
    }

    /// A fresh id of `kind` (`i` instance, `r` invocation/subscription, `c` context).
    pub(crate) fn fresh(&self, kind: char) -> String {
        self.with(kind, self.number())
    }

    /// A fresh number (ids made with [`Ids::with`] from it are unique).
    pub(crate) fn number(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The id of `kind` with number `n` (one is made for every call: sized once, and only the
    /// number goes through the formatter).
    pub(crate) fn with(&self, kind: char, n: u64) -> String {
        use std::fmt::Write;
        let mut id = String::with_capacity(self.node.len() + 24);
        id.push(kind);
        id.push('-');
        id.push_str(&self.node);
        id.push('-');
        // Writing to a `String` cannot fail.
        let _ = write!(id, "{n}");
        id
    }

    /// The number of an id of `kind` made with [`Ids::with`], if it is one of ours.
    pub(crate) fn parse_numbered(&self, s: &str, kind: char) -> Option<u64> {
        parse_numbered(s, kind, &self.node)
    }

    /// The registry context a GW3 context id names, if it is one of ours.
    pub(crate) fn parse_ctx(&self, s: &str) -> Option<u64> {
        parse_numbered(s, 'c', &self.node)
    }

    /// The GW3 id of a registry context.
    pub(crate) fn ctx(&self, id: u64) -> String {
        super::contexts::gw3_id(&self.node, id)
    }
}

/// `<kind>-<node>-<n>` → `n`.
fn parse_numbered(s: &str, kind: char, node: &str) -> Option<u64> {
    let n = s
        .strip_prefix(kind)?
        .strip_prefix('-')?
        .strip_prefix(node)?
        .strip_prefix('-')?;
    // Only the digits `with` writes: no leading zero, so one number has one id (`-08` is not
    // the peer `-8` is; the reference knows neither).
    if n.is_empty()
        || n.len() > 20
        || (n.len() > 1 && n.starts_with('0'))
        || !n.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    n.parse().ok()
}

/// The error shape every domain uses (PROTOCOL.md §3).
pub(crate) fn error(
    domain: &str,
    request_id: &J,
    peer_id: &J,
    reason_uri: &str,
    reason: &str,
) -> J {
    json!({"domain": domain, "type": "error", "request_id": request_id, "peer_id": peer_id,
           "reason_uri": reason_uri, "reason": reason})
}

/// One GW3 text frame that has the envelope every message needs: a JSON object with a string
/// `type` and a string (or absent, meaning `global`) `domain`.
#[derive(Debug)]
pub(crate) struct Envelope {
    pub domain: String,
    pub ty: String,
    pub msg: Obj,
}

/// Why a text frame is not a GW3 message. Each says how to answer (`session.rs`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnvelopeError {
    /// Not JSON, or JSON but not an object: answered with a plain-text frame (there is no
    /// request id to answer to).
    #[error("GW3 message must be a JSON object{0}")]
    NotObject(String),
    /// A JSON object whose envelope could be read, but not the rest (a number out of range,
    /// nesting too deep): answered with an error in its domain, for its request.
    #[error("invalid GW3 message: {error}")]
    Invalid { error: String, head: Box<Obj> },
    /// `domain` is not a string: answered with a `global` error.
    #[error("domain must be a string, not {}", clip(&domain.to_string()))]
    BadDomain { domain: J, msg: Box<Obj> },
    /// No string `type`: answered with an `unhandled_message` error in the domain.
    #[error("a GW3 message needs a string \"type\"")]
    NoType { domain: String, msg: Box<Obj> },
}

/// The envelope fields of a frame that does not parse as a whole; the other fields are skipped
/// without being decoded.
#[derive(serde::Deserialize)]
struct Head {
    domain: Option<J>,
    #[serde(rename = "type")]
    ty: Option<J>,
    request_id: Option<J>,
    peer_id: Option<J>,
    invocation_id: Option<J>,
}

/// Checks one text frame's envelope. Pure: the session decides what to do with it.
///
/// A string escape that is half of a UTF-16 surrogate pair (`"\ud83d"`, which JavaScript's
/// `JSON.stringify` writes for an emoji cut in half, and parses back) stands for U+FFFD, the
/// replacement character, as a WHATWG `TextDecoder` makes of it: such frames are accepted.
pub(crate) fn parse_envelope(text: &str) -> Result<Envelope, EnvelopeError> {
    let mut fixed = None;
    let parsed = match serde_json::from_str::<J>(text) {
        Err(e) => {
            fixed = replace_lone_surrogates(text);
            match &fixed {
                Some(f) => serde_json::from_str::<J>(f),
                None => Err(e),
            }
        }
        ok => ok,
    };
    let msg = match parsed {
        Ok(J::Object(o)) => o,
        Ok(_) => return Err(EnvelopeError::NotObject(String::new())),
        Err(e) => {
            let head = serde_json::from_str::<Head>(fixed.as_deref().unwrap_or(text));
            let Ok(h) = head else {
                return Err(EnvelopeError::NotObject(format!(": {e}")));
            };
            let mut head = Obj::new();
            for (k, v) in [
                ("domain", h.domain),
                ("type", h.ty),
                ("request_id", h.request_id),
                ("peer_id", h.peer_id),
                ("invocation_id", h.invocation_id),
            ] {
                if let Some(v) = v {
                    head.insert(k.into(), v);
                }
            }
            let error = e.to_string();
            let head = Box::new(head);
            return Err(EnvelopeError::Invalid { error, head });
        }
    };
    let domain = match msg.get("domain") {
        None | Some(J::Null) => "global".to_string(),
        Some(J::String(d)) => d.clone(),
        Some(other) => {
            let domain = other.clone();
            let msg = Box::new(msg);
            return Err(EnvelopeError::BadDomain { domain, msg });
        }
    };
    let ty = match msg.get("type") {
        Some(J::String(t)) => t.clone(),
        _ => {
            let msg = Box::new(msg);
            return Err(EnvelopeError::NoType { domain, msg });
        }
    };
    Ok(Envelope { domain, ty, msg })
}

/// An `agm` `call` or `yield`, the two frames of every invocation's round trip, read straight
/// into the fields the gateway uses: no tree of the whole frame is built and dropped, and the
/// arguments or result become knit values directly (docs/benchmarks.md §6.3, stop 16).
///
/// [`hot`] gives one only for a well-formed frame of those two types. Anything else, or
/// anything unusual (a duplicate key, an escaped `type`, an unpaired surrogate, a field of
/// another type, a field it does not know), goes through [`parse_envelope`] and the general
/// handlers as before, so every frame is answered as it was. Unknown fields are refused rather
/// than skipped because skipping is laxer than parsing: serde_json skips a number out of range,
/// or nesting past its depth limit, that the general reading refuses (the fuzzer found the
/// first: `tests/fuzz_regressions/gw3_json/`). The clients send no other fields.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Hot<'a> {
    #[serde(rename = "type")]
    pub ty: &'a str,
    // Absent `Option` fields read as `None`; a borrowed `&str` inside one needs `borrow`.
    #[serde(borrow)]
    pub domain: Option<&'a str>,
    pub peer_id: Option<J>,
    pub request_id: Option<J>,
    pub server_id: Option<J>,
    pub method_id: Option<J>,
    pub arguments: Option<Value>,
    pub arguments_kv: Option<Value>,
    #[serde(borrow)]
    pub invocation_id: Option<&'a str>,
    pub result: Option<Value>,
}

/// `text` as a [`Hot`] frame, if it is one.
pub(crate) fn hot(text: &str) -> Option<Hot<'_>> {
    // Other frames skip the attempt; a false match only costs it.
    if !(text.contains("\"call\"") || text.contains("\"yield\"")) {
        return None;
    }
    let h: Hot = serde_json::from_str(text).ok()?;
    (h.domain == Some("agm") && matches!(h.ty, "call" | "yield")).then_some(h)
}

/// What a `call` asks, from either reading of its frame (null fields count as absent).
#[derive(Debug, PartialEq)]
pub(crate) struct CallReq {
    pub request_id: J,
    pub server_id: Option<J>,
    pub method_id: J,
    pub arguments: Option<Value>,
    pub arguments_kv: Option<Value>,
}

impl CallReq {
    /// From the general reading.
    pub(crate) fn of(msg: &Obj) -> CallReq {
        let value = |k: &str| msg.get(k).filter(|v| !v.is_null()).cloned();
        CallReq {
            request_id: rid(msg),
            server_id: value("server_id"),
            method_id: msg.get("method_id").cloned().unwrap_or(J::Null),
            arguments: value("arguments").map(Value::from),
            arguments_kv: value("arguments_kv").map(Value::from),
        }
    }

    /// From the fast reading.
    pub(crate) fn of_hot(h: Hot<'_>) -> CallReq {
        CallReq {
            request_id: h.request_id.unwrap_or(J::Null),
            server_id: h.server_id,
            method_id: h.method_id.unwrap_or(J::Null),
            arguments: h.arguments,
            arguments_kv: h.arguments_kv,
        }
    }
}

/// The invocation a general `yield` answers (none unless its id is a string).
pub(crate) fn yield_invocation(msg: &Obj) -> Option<&str> {
    msg.get("invocation_id").and_then(J::as_str)
}

/// The result a general `yield` carries (null when it has none).
pub(crate) fn yield_result(msg: &Obj) -> Value {
    Value::from(msg.get("result").cloned().unwrap_or(J::Null))
}

/// A request's `request_id` (null when it has none).
pub(crate) fn rid(msg: &Obj) -> J {
    rid_ref(msg).clone()
}

/// The same, borrowed.
pub(crate) fn rid_ref(msg: &Obj) -> &J {
    msg.get("request_id").unwrap_or(&J::Null)
}

/// `text` with every `\uXXXX` escape that is an unpaired UTF-16 surrogate replaced by
/// `\ufffd`; `None` if there is none. Escapes occur only inside JSON strings, and a `\\`
/// escape is skipped as a whole, so `"\\ud800"` (a backslash, then text) is left alone.
fn replace_lone_surrogates(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let hex = |at: usize| -> Option<u16> {
        let h = b.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    let unicode = |at: usize| -> Option<u16> {
        if b.get(at) == Some(&b'\\') && b.get(at + 1) == Some(&b'u') {
            hex(at + 2)
        } else {
            None
        }
    };
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        let Some(u) = unicode(i) else {
            i += 2; // any other escape, `\\` included
            continue;
        };
        let paired = match u {
            0xD800..=0xDBFF => matches!(unicode(i + 6), Some(0xDC00..=0xDFFF)),
            0xDC00..=0xDFFF => false,
            _ => {
                i += 6;
                continue;
            }
        };
        if paired {
            i += 12;
            continue;
        }
        let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
        o.push_str(&text[copied..i]);
        o.push_str("\\ufffd");
        i += 6;
        copied = i;
    }
    let mut o = out?;
    o.push_str(&text[copied..]);
    Some(o)
}

/// Most characters of client input an error message repeats.
const CLIP: usize = 200;

/// Client input as an error message repeats it: at most [`CLIP`] characters, then "…".
pub(crate) fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(CLIP) {
        None => s.into(),
        Some((end, _)) => format!("{}…", &s[..end]).into(),
    }
}

/// A method id as a map key: its canonical JSON text, so `"7"` and `7` stay distinct.
pub(crate) fn id_key(id: &J) -> String {
    id.to_string()
}

/// Why a GW3 method definition was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum MethodError {
    #[error("a method definition must be an object")]
    NotObject,
    #[error("a method definition needs an id")]
    NoId,
    #[error("a method definition needs a non-empty string name")]
    NoName,
    #[error("method field {0:?} has the wrong type")]
    BadField(&'static str),
}

/// Reads a GW3 method object (`register`) into knit's definition. Unknown fields are kept only
/// in the verbatim copy the bridge forwards to web peers.
pub(crate) fn method_def_from_gw3(m: &J) -> Result<MethodDef, MethodError> {
    let o = m.as_object().ok_or(MethodError::NotObject)?;
    match o.get("id") {
        None | Some(J::Null) => return Err(MethodError::NoId),
        Some(_) => {}
    }
    let name = match o.get("name") {
        Some(J::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(MethodError::NoName),
    };
    let opt_str = |k: &'static str| -> Result<Option<String>, MethodError> {
        match o.get(k) {
            None | Some(J::Null) => Ok(None),
            Some(J::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(MethodError::BadField(k)),
        }
    };
    let object_types = match o.get("object_types") {
        None | Some(J::Null) => Vec::new(),
        Some(J::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or(MethodError::BadField("object_types"))?,
        Some(_) => return Err(MethodError::BadField("object_types")),
    };
    let (flags, streaming) = match o.get("flags") {
        None | Some(J::Null) => (Value::map(), false),
        Some(J::Object(f)) => {
            let meta = match f.get("metadata") {
                None | Some(J::Null) => Value::map(),
                Some(v) => Value::from(v.clone()),
            };
            let streaming = match f.get("streaming") {
                None | Some(J::Null) => false,
                Some(J::Bool(b)) => *b,
                Some(_) => return Err(MethodError::BadField("flags.streaming")),
            };
            (meta, streaming)
        }
        Some(_) => return Err(MethodError::BadField("flags")),
    };
    let version = match o.get("version") {
        None | Some(J::Null) => None,
        Some(J::Number(n)) => n.as_u64().and_then(|v| u32::try_from(v).ok()),
        Some(_) => return Err(MethodError::BadField("version")),
    };
    Ok(MethodDef {
        name,
        display_name: opt_str("display_name")?,
        description: opt_str("description")?,
        object_types,
        accepts: opt_str("input_signature")?,
        returns: opt_str("result_signature")?,
        version,
        flags,
        streaming,
    })
}

/// A native method as GW3 announces it. Native method ids are the registry's numbers, sent as
/// strings as `@interopio/core` does for its own.
pub(crate) fn method_to_gw3(id: u32, d: &MethodDef) -> J {
    let mut o = Obj::new();
    o.insert("id".into(), J::String(id.to_string()));
    o.insert("name".into(), J::String(d.name.clone()));
    if let Some(s) = &d.display_name {
        o.insert("display_name".into(), J::String(s.clone()));
    }
    if let Some(s) = &d.description {
        o.insert("description".into(), J::String(s.clone()));
    }
    if let Some(v) = d.version {
        o.insert("version".into(), J::from(v));
    }
    if !d.object_types.is_empty() {
        o.insert("object_types".into(), json!(d.object_types));
    }
    if let Some(s) = &d.accepts {
        o.insert("input_signature".into(), J::String(s.clone()));
    }
    if let Some(s) = &d.returns {
        o.insert("result_signature".into(), J::String(s.clone()));
    }
    let meta = match &d.flags {
        Value::Null => J::Object(Obj::new()),
        v => v.to_json(),
    };
    o.insert(
        "flags".into(),
        json!({"metadata": meta, "streaming": d.streaming}),
    );
    J::Object(o)
}

/// A native peer's identity as GW3 shows it (`peer-added`, `caller` instances).
pub(crate) fn native_identity(i: &Instance) -> J {
    json!({
        "machine": i.machine,
        "application": i.application,
        "applicationName": i.application,
        "process": i.pid,
        "user": i.user,
        "instance": i.instance,
    })
}

/// What a web method receives as `arguments_kv` for a knit value: objects as they are, `null`
/// as `{}`, anything else wrapped as `{_value: v}` (io.Connect handlers take an object). As a
/// tree, for the frames still built as trees; the convention itself is written once, in [`Kv`].
pub(crate) fn to_kv(v: &Value) -> J {
    // The only error, a map key that is not a string, cannot happen with knit values.
    serde_json::to_value(Kv::Kv(v)).unwrap_or(J::Null)
}

/// A knit value in a GW3 frame, serialised straight from the value instead of through a
/// `serde_json::Value` tree (building and dropping that tree cost more than writing the text):
/// `AsIs` as [`Value::to_json`] makes it, `Kv` as [`to_kv`] shapes it: that is also what a web
/// caller receives as `result`, the io.Connect convention (features.md §3.2).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kv<'a> {
    AsIs(&'a Value),
    Kv(&'a Value),
}

impl serde::Serialize for Kv<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match *self {
            Kv::AsIs(v) | Kv::Kv(v @ Value::Map(_)) => v.serialize(s),
            Kv::Kv(Value::Null) => s.serialize_map(Some(0))?.end(),
            Kv::Kv(v) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("_value", v)?;
                m.end()
            }
        }
    }
}

/// About how long `v` is as JSON text (strings without escapes; a number counts 24 bytes),
/// without serialising it: for splitting large announcements and for the bytes of request ids
/// a connection may keep waiting.
pub(crate) fn approx_len(v: &J) -> usize {
    match v {
        J::Null => 4,
        J::Bool(_) => 5,
        J::Number(_) => 24,
        J::String(s) => s.len() + 2,
        J::Array(a) => 2 + a.iter().map(|x| approx_len(x) + 1).sum::<usize>(),
        J::Object(o) => {
            2 + o
                .iter()
                .map(|(k, x)| k.len() + 4 + approx_len(x))
                .sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_round_trip_and_foreign_ones_are_refused() {
        let ids = Ids::new("0123456789abcdef0123456789abcdef".into());
        let s = ids.peer(PeerId(42));
        assert_eq!(s, "p-0123456789abcdef0123456789abcdef-42");
        assert_eq!(ids.parse_peer(&s), Some(PeerId(42)));
        for bad in [
            "p-nobody",
            "p-0123456789abcdef0123456789abcdef-",
            "p-0123456789abcdef0123456789abcdef-+4",
            "p-0123456789abcdef0123456789abcdef-04",
            "p-0123456789abcdef0123456789abcdef-00",
            "p-0123456789abcdef0123456789abcdef-99999999999999999999999",
            "p-ffff456789abcdef0123456789abcdef-4",
            "r-0123456789abcdef0123456789abcdef-4",
        ] {
            assert_eq!(ids.parse_peer(bad), None, "{bad}");
        }
        assert_ne!(ids.fresh('i'), ids.fresh('i'));
        assert_eq!(ids.parse_ctx(&ids.ctx(7)), Some(7));
        assert_eq!(ids.parse_ctx("c-nope"), None);
        assert_eq!(ids.parse_ctx("c-0123456789abcdef0123456789abcdef-07"), None);
        assert_eq!(ids.parse_ctx(&ids.ctx(0)), Some(0));
        assert_eq!(ids.parse_ctx(&ids.peer(PeerId(7))), None);
    }

    #[test]
    fn gw3_methods_become_definitions() {
        let m = json!({"id": "1", "name": "Harness.OnlyA", "description": "only on A",
            "flags": {"metadata": {"kind": "test"}, "streaming": false},
            "input_signature": "Int x", "result_signature": "Int y", "version": 2,
            "object_types": ["T"]});
        let d = method_def_from_gw3(&m).unwrap();
        assert_eq!(d.name, "Harness.OnlyA");
        assert_eq!(d.accepts.as_deref(), Some("Int x"));
        assert_eq!(d.returns.as_deref(), Some("Int y"));
        assert_eq!(d.version, Some(2));
        assert_eq!(d.flags, Value::object([("kind", Value::from("test"))]));
        assert_eq!(d.object_types, vec!["T".to_string()]);
        assert_eq!(
            method_def_from_gw3(&json!({"id": 7, "name": "E", "flags": {}}))
                .unwrap()
                .flags,
            Value::map()
        );
        assert_eq!(method_def_from_gw3(&json!(3)), Err(MethodError::NotObject));
        assert_eq!(
            method_def_from_gw3(&json!({"name": "x"})),
            Err(MethodError::NoId)
        );
        assert_eq!(
            method_def_from_gw3(&json!({"id": 1, "name": ""})),
            Err(MethodError::NoName)
        );
        assert_eq!(
            method_def_from_gw3(&json!({"id": 1, "name": "x", "flags": {"streaming": "yes"}})),
            Err(MethodError::BadField("flags.streaming"))
        );
        assert_eq!(
            method_def_from_gw3(&json!({"id": 1, "name": "x", "object_types": [1]})),
            Err(MethodError::BadField("object_types"))
        );
    }

    #[test]
    fn native_methods_are_announced_in_gw3_shape() {
        let mut d = MethodDef::new("Sum");
        d.accepts = Some("Int a".into());
        let j = method_to_gw3(3, &d);
        assert_eq!(
            j,
            json!({"id": "3", "name": "Sum", "input_signature": "Int a",
                   "flags": {"metadata": {}, "streaming": false}})
        );
        // And they read back to the same definition.
        let back = method_def_from_gw3(&j).unwrap();
        assert_eq!(back.name, "Sum");
        assert_eq!(back.accepts, d.accepts);
    }

    #[test]
    fn lone_surrogate_escapes_read_as_replacement_characters() {
        let parse = |t: &str| parse_envelope(t).map(|e| e.msg);
        let m = parse(r#"{"type":"x","s":"cut \ud83d","t":"\udE00!","u":"\ud83d\ud83d\ude00"}"#)
            .unwrap();
        assert_eq!(m["s"], "cut \u{fffd}");
        assert_eq!(m["t"], "\u{fffd}!");
        assert_eq!(m["u"], "\u{fffd}\u{1f600}");
        // Escaped backslashes and valid pairs are left alone; nothing else changes.
        let m = parse(r#"{"type":"x","s":"\\ud800","p":"\ud83d\ude00\n"}"#).unwrap();
        assert_eq!(m["s"], "\\ud800");
        assert_eq!(m["p"], "\u{1f600}\n");
        assert_eq!(replace_lone_surrogates(r#"{"a":"\\ud800\u0041"}"#), None);
    }

    #[test]
    fn objects_that_do_not_parse_keep_their_envelope() {
        match parse_envelope(
            r#"{"type":"call","domain":"agm","request_id":"c1","arguments_kv":{"n":1e400}}"#,
        ) {
            Err(e @ EnvelopeError::Invalid { .. }) => {
                assert!(!e.to_string().contains("JSON object"), "{e}");
                assert!(e.to_string().contains("out of range"), "{e}");
                let EnvelopeError::Invalid { head, .. } = e else {
                    unreachable!()
                };
                assert_eq!(head["request_id"], "c1");
                assert_eq!(head["domain"], "agm");
            }
            other => panic!("{other:?}"),
        }
        for t in ["[1e400]", "{\"a\":", "nope"] {
            assert!(
                matches!(parse_envelope(t), Err(EnvelopeError::NotObject(_))),
                "{t}"
            );
        }
    }

    #[test]
    fn echoed_input_is_clipped() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(5000);
        let c = clip(&long);
        assert_eq!(c.chars().count(), CLIP + 1);
        assert!(c.ends_with('…'));
    }

    #[test]
    fn ids_read_as_format_writes_them_and_parse_back() {
        let ids = Ids::new("0a1b".into());
        for n in [0, 1, 9, 10, 99, 100, 12_345, u64::MAX / 10, u64::MAX] {
            let id = ids.with('r', n);
            assert_eq!(id, format!("r-0a1b-{n}"));
            assert_eq!(ids.parse_numbered(&id, 'r'), Some(n));
        }
        assert_eq!(ids.peer(PeerId(7)), "p-0a1b-7");
        assert_eq!(ids.parse_peer("p-0a1b-7"), Some(PeerId(7)));
    }

    #[test]
    fn non_object_values_travel_as_value_objects() {
        assert_eq!(to_kv(&Value::from(42)), json!({"_value": 42}));
        assert_eq!(to_kv(&Value::Null), json!({}));
        assert_eq!(
            to_kv(&Value::Array(vec![Value::from(1)])),
            json!({"_value": [1]})
        );
        let obj = Value::object([("a", Value::from(1))]);
        assert_eq!(to_kv(&obj), json!({"a": 1}));
    }

    /// The frames serialised straight from knit values carry the same text as the JSON trees
    /// they replaced, for every kind of value (key order included).
    #[test]
    fn kv_writes_the_text_of_the_tree_it_replaced() {
        let values = [
            Value::Null,
            Value::Bool(true),
            Value::from(-7i64),
            Value::U64(u64::MAX),
            Value::F64(2.5),
            Value::F64(f64::NAN),
            Value::F64(f64::INFINITY),
            Value::String("é \"q\" \n".into()),
            Value::Bytes(vec![0, 7, 255]),
            Value::Array(vec![Value::Null, Value::from(1), Value::Bytes(vec![1])]),
            Value::Map(Default::default()),
            Value::object([
                ("z", Value::from(1)),
                ("a", Value::Array(vec![Value::F64(f64::NAN)])),
                (
                    "m",
                    Value::object([("y", Value::Null), ("b", Value::from("s"))]),
                ),
            ]),
        ];
        for v in &values {
            let as_is = serde_json::to_string(&Kv::AsIs(v)).unwrap();
            assert_eq!(as_is, v.to_json().to_string(), "{v:?}");
            let kv = serde_json::to_string(&Kv::Kv(v)).unwrap();
            assert_eq!(kv, to_kv(v).to_string(), "{v:?}");
        }
    }

    fn general(text: &str) -> Obj {
        parse_envelope(text).expect("a valid frame").msg
    }

    /// The fast reading of `call` and `yield` gives the handlers what the general one gives
    /// them, for every shape the fields can take; and frames it must not take fall through.
    #[test]
    fn hot_frames_read_as_the_general_path_reads_them() {
        let calls = [
            r#"{"type":"call","server_id":"p-1","method_id":"0","arguments_kv":{"n":1,"s":"x\u00e9","f":1.5,"b":18446744073709551615,"a":[null,{"k":-0}]},"request_id":"r","domain":"agm","peer_id":"p-2"}"#,
            r#"{"domain":"agm","type":"call","server_id":"p-1","method_id":{"odd":[1]},"arguments":[1,"two",[3]],"request_id":7}"#,
            r#"{"domain":"agm","type":"call","server_id":null,"method_id":null,"arguments":null,"arguments_kv":null,"request_id":null}"#,
            r#"{"domain":"agm","type":"call","server_id":5,"arguments":{"not":"an array"},"arguments_kv":[1]}"#,
            r#"{"domain":"agm","type":"call","arguments_kv":{"dup":1,"dup":2}}"#,
        ];
        for text in calls {
            let h = hot(text).unwrap_or_else(|| panic!("not read fast: {text}"));
            assert_eq!(CallReq::of_hot(h), CallReq::of(&general(text)), "{text}");
        }
        let yields = [
            r#"{"type":"yield","invocation_id":"r-1","peer_id":"p-1","result":{"server":"B","args":{"n":1}},"request_id":"x","domain":"agm"}"#,
            r#"{"domain":"agm","type":"yield","invocation_id":"r-1","result":null}"#,
            r#"{"domain":"agm","type":"yield","invocation_id":"r-1"}"#,
            r#"{"domain":"agm","type":"yield","result":[1,2.25,"x"]}"#,
        ];
        for text in yields {
            let h = hot(text).unwrap_or_else(|| panic!("not read fast: {text}"));
            let msg = general(text);
            assert_eq!(h.invocation_id, yield_invocation(&msg), "{text}");
            assert_eq!(
                h.result.unwrap_or(Value::Null),
                yield_result(&msg),
                "{text}"
            );
        }
        // Left to the general path, which answers them as before.
        for text in [
            r#"{"domain":"agm","type":"call","request_id":"a","request_id":"b"}"#, // duplicate field
            r#"{"domain":"agm","type":"yield","invocation_id":7,"result":1}"#, // id not a string
            r#"{"domain":"agm","type":"c\u0061ll"}"#,                          // escaped type
            r#"{"domain":"agm","type":"call","request_id":"\ud800"}"#,         // lone surrogate
            r#"{"domain":"agm","type":"call","arguments_kv":{"n":1e400}}"#,    // out of range
            r#"{"domain":"agm","type":"call","x":[1e400]}"#,                   // unknown field
            r#"{"domain":"global","type":"call"}"#,                            // another domain
            r#"{"type":"call"}"#,                                              // no domain: global
            r#"{"domain":"agm","type":"register","methods":[{"name":"call"}]}"#,
            r#"{"domain":"agm","type":"call","#, // not JSON
            r#"["call","yield"]"#,
        ] {
            assert!(hot(text).is_none(), "read fast: {text}");
        }
    }
}
