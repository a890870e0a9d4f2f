//! The binary encoding of [`Value`]: one tag byte, then the body. Little-endian, LEB128 varints.
//!
//! | tag | value | body |
//! |---|---|---|
//! | 0 | null | — |
//! | 1 / 2 | false / true | — |
//! | 3 | i64 | zig-zag varint |
//! | 4 | u64 (> i64::MAX) | varint |
//! | 5 | f64 | 8 bytes |
//! | 6 | string | varint length, UTF-8 bytes |
//! | 7 | bytes | varint length, bytes |
//! | 8 | array | varint count, values |
//! | 9 | map | varint count, (varint key length, key bytes, value)* |
//!
//! Decoding checks every length against what is left, refuses nesting deeper than
//! [`MAX_DEPTH`](super::value::MAX_DEPTH), invalid UTF-8 and trailing bytes, and never
//! pre-allocates more than the input could hold. Encoding refuses exactly what decoding would
//! refuse ([`EncodeError`]), so nothing a writer stores can lock readers out.

use super::value::{Map, Value, MAX_DEPTH};
use thiserror::Error;

/// Why bytes are not a valid encoded [`Value`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended inside a value.
    #[error("truncated value")]
    Truncated,
    /// An unknown tag byte.
    #[error("unknown value tag {0}")]
    BadTag(u8),
    /// A varint longer than 10 bytes or overflowing 64 bits.
    #[error("malformed varint")]
    BadVarint,
    /// Text that is not UTF-8.
    #[error("string is not UTF-8")]
    BadUtf8,
    /// Deeper than the limit.
    #[error("value nested deeper than {0} levels")]
    TooDeep(usize),
    /// Bytes left over after the value.
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
}

/// Why a [`Value`] cannot be encoded: it would not decode.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// Arrays and maps nested deeper than the decoder accepts.
    #[error("value nested deeper than {0} levels")]
    TooDeep(usize),
}

const T_NULL: u8 = 0;
const T_FALSE: u8 = 1;
const T_TRUE: u8 = 2;
const T_I64: u8 = 3;
const T_U64: u8 = 4;
const T_F64: u8 = 5;
const T_STR: u8 = 6;
const T_BYTES: u8 = 7;
const T_ARRAY: u8 = 8;
const T_MAP: u8 = 9;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Appends the encoding of `v` to `out`. A value the decoder would refuse (arrays and maps
/// nested deeper than [`MAX_DEPTH`]) is an error, and `out` is left as it was.
pub fn encode_into(v: &Value, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    encode_nested_into(v, out, 0)
}

/// Appends the encoding of a map (what [`encode_into`] writes for `Value::Map(m)`).
pub fn encode_map_into(m: &Map, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    encode_map_header(out, m.len());
    for (k, v) in m {
        encode_key(out, k);
        if let Err(e) = encode_at(v, out, 1) {
            out.truncate(start);
            return Err(e);
        }
    }
    Ok(())
}

/// [`encode_into`] for a value that will sit inside `depth` arrays or maps written around it
/// by hand (with [`encode_map_header`]): the limit applies to the whole.
pub fn encode_nested_into(v: &Value, out: &mut Vec<u8>, depth: usize) -> Result<(), EncodeError> {
    let start = out.len();
    let r = encode_at(v, out, depth);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// Checks that `v` can be encoded (its nesting is within [`MAX_DEPTH`]) without encoding it.
pub fn check(v: &Value) -> Result<(), EncodeError> {
    fn at(v: &Value, depth: usize) -> Result<(), EncodeError> {
        match v {
            Value::Array(_) | Value::Map(_) if depth >= MAX_DEPTH => {
                Err(EncodeError::TooDeep(MAX_DEPTH))
            }
            Value::Array(a) => a.iter().try_for_each(|x| at(x, depth + 1)),
            Value::Map(m) => m.values().try_for_each(|x| at(x, depth + 1)),
            _ => Ok(()),
        }
    }
    at(v, 0)
}

/// `depth` counts the arrays and maps around `v`, as the decoder does: recursion is bounded by
/// [`MAX_DEPTH`] whatever the value.
fn encode_at(v: &Value, out: &mut Vec<u8>, depth: usize) -> Result<(), EncodeError> {
    match v {
        Value::Null => out.push(T_NULL),
        Value::Bool(false) => out.push(T_FALSE),
        Value::Bool(true) => out.push(T_TRUE),
        Value::I64(i) => {
            out.push(T_I64);
            put_varint(out, ((i << 1) ^ (i >> 63)) as u64);
        }
        Value::U64(u) => {
            if *u <= i64::MAX as u64 {
                out.push(T_I64);
                put_varint(out, (*u as i64 as u64) << 1);
            } else {
                out.push(T_U64);
                put_varint(out, *u);
            }
        }
        Value::F64(f) => {
            out.push(T_F64);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::String(s) => {
            out.push(T_STR);
            put_varint(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Bytes(b) => {
            out.push(T_BYTES);
            put_varint(out, b.len() as u64);
            out.extend_from_slice(b);
        }
        Value::Array(_) | Value::Map(_) if depth >= MAX_DEPTH => {
            return Err(EncodeError::TooDeep(MAX_DEPTH));
        }
        Value::Array(a) => {
            out.push(T_ARRAY);
            put_varint(out, a.len() as u64);
            for x in a {
                encode_at(x, out, depth + 1)?;
            }
        }
        Value::Map(m) => {
            out.push(T_MAP);
            put_varint(out, m.len() as u64);
            for (k, x) in m {
                put_varint(out, k.len() as u64);
                out.extend_from_slice(k.as_bytes());
                encode_at(x, out, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Appends the header of a map of `n` entries (then write `n` keys and values).
pub fn encode_map_header(out: &mut Vec<u8>, n: usize) {
    out.push(T_MAP);
    put_varint(out, n as u64);
}

/// Appends a map key.
pub fn encode_key(out: &mut Vec<u8>, k: &str) {
    put_varint(out, k.len() as u64);
    out.extend_from_slice(k.as_bytes());
}

/// The encoding of `v` (see [`encode_into`]).
pub fn encode(v: &Value) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(encoded_len(v));
    encode_into(v, &mut out)?;
    Ok(out)
}

/// Exactly how many bytes [`encode`] produces (for a value it accepts; the size of a value
/// nested too deeply is not computed past [`MAX_DEPTH`], so this never recurses deeper).
pub fn encoded_len(v: &Value) -> usize {
    len_at(v, 0)
}

fn len_at(v: &Value, depth: usize) -> usize {
    match v {
        Value::Null | Value::Bool(_) => 1,
        Value::I64(i) => 1 + varint_len(((i << 1) ^ (i >> 63)) as u64),
        Value::U64(u) if *u <= i64::MAX as u64 => 1 + varint_len(*u << 1),
        Value::U64(u) => 1 + varint_len(*u),
        Value::F64(_) => 9,
        Value::String(s) => 1 + varint_len(s.len() as u64) + s.len(),
        Value::Bytes(b) => 1 + varint_len(b.len() as u64) + b.len(),
        Value::Array(_) | Value::Map(_) if depth >= MAX_DEPTH => 1,
        Value::Array(a) => {
            1 + varint_len(a.len() as u64) + a.iter().map(|x| len_at(x, depth + 1)).sum::<usize>()
        }
        Value::Map(m) => {
            1 + varint_len(m.len() as u64)
                + m.iter()
                    .map(|(k, x)| varint_len(k.len() as u64) + k.len() + len_at(x, depth + 1))
                    .sum::<usize>()
        }
    }
}

/// Decodes one value that must span all of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut r = Reader { b: bytes, pos: 0 };
    let v = r.value(0)?;
    match bytes.len() - r.pos {
        0 => Ok(v),
        n => Err(DecodeError::Trailing(n)),
    }
}

/// [`decode`] into `slot`, reusing its allocations where the shapes agree (a reader of a feed
/// of like-shaped values decodes without allocating). On error `slot` holds part of a value:
/// discard it.
pub fn decode_into(bytes: &[u8], slot: &mut Value) -> Result<(), DecodeError> {
    let mut r = Reader { b: bytes, pos: 0 };
    r.value_into(slot, 0)?;
    match bytes.len() - r.pos {
        0 => Ok(()),
        n => Err(DecodeError::Trailing(n)),
    }
}

/// Decodes `{key: value}` (a map of exactly one entry, spanning all of `bytes`) to `value`
/// without building the outer map. `Ok(None)` when `bytes` hold some other value (decode those
/// with [`decode`]). A reader's fast path for records of one known shape.
pub fn decode_single_entry(bytes: &[u8], key: &str) -> Result<Option<Value>, DecodeError> {
    let mut r = Reader { b: bytes, pos: 0 };
    if r.byte()? != T_MAP || r.varint()? != 1 {
        return Ok(None);
    }
    let n = r.varint()?;
    if r.take(n)? != key.as_bytes() {
        return Ok(None);
    }
    // Inside the outer map, as `decode` would see it.
    let v = r.value(1)?;
    match bytes.len() - r.pos {
        0 => Ok(Some(v)),
        n => Err(DecodeError::Trailing(n)),
    }
}

/// Reads `{key: {k1: v1, …}}` (an outer map of exactly one entry, spanning all of `bytes`) and
/// hands each inner entry to `f` in order, its key borrowed: no map is built. `Ok(false)` when
/// `bytes` hold another shape (then nothing was handed over). An error may come after some
/// entries were handed over: callers that must not act on half a value collect first.
pub fn visit_single_entry_map<'a>(
    bytes: &'a [u8],
    key: &str,
    mut f: impl FnMut(&'a str, Value),
) -> Result<bool, DecodeError> {
    let mut r = Reader { b: bytes, pos: 0 };
    if r.byte()? != T_MAP || r.varint()? != 1 {
        return Ok(false);
    }
    let n = r.varint()?;
    if r.take(n)? != key.as_bytes() || r.byte()? != T_MAP {
        return Ok(false);
    }
    let n = r.count()?;
    for _ in 0..n {
        let k = r.str()?;
        // Two maps deep, as `decode` would see it.
        let v = r.value(2)?;
        f(k, v);
    }
    match bytes.len() - r.pos {
        0 => Ok(true),
        n => Err(DecodeError::Trailing(n)),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.b.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            let part = (b & 0x7f) as u64;
            if i == 9 && part > 1 {
                return Err(DecodeError::BadVarint);
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::BadVarint)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let left = (self.b.len() - self.pos) as u64;
        if n > left {
            return Err(DecodeError::Truncated);
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.varint()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::BadUtf8)
    }

    /// A count of items, each at least one byte: never more than what is left.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > (self.b.len() - self.pos) as u64 {
            return Err(DecodeError::Truncated);
        }
        Ok(n as usize)
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        let mut v = Value::Null;
        self.value_into(&mut v, depth)?;
        Ok(v)
    }

    /// Decodes into `slot`, reusing what it holds where the shapes agree: a string's or bytes'
    /// buffer, an array's elements, a map's entries while its keys come in the same order (no
    /// key is allocated or hashed again). On error `slot` holds part of a value: discard it.
    fn value_into(&mut self, slot: &mut Value, depth: usize) -> Result<(), DecodeError> {
        match self.byte()? {
            T_NULL => *slot = Value::Null,
            T_FALSE => *slot = Value::Bool(false),
            T_TRUE => *slot = Value::Bool(true),
            T_I64 => {
                let z = self.varint()?;
                *slot = Value::I64(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
            T_U64 => *slot = Value::from(self.varint()?),
            T_F64 => {
                let s = self.take(8)?;
                *slot = Value::F64(f64::from_le_bytes(
                    s.try_into().map_err(|_| DecodeError::Truncated)?,
                ));
            }
            T_STR => {
                let s = self.str()?;
                match slot {
                    Value::String(t) => {
                        t.clear();
                        t.push_str(s);
                    }
                    _ => *slot = Value::String(s.to_string()),
                }
            }
            T_BYTES => {
                let n = self.varint()?;
                let b = self.take(n)?;
                match slot {
                    Value::Bytes(v) => {
                        v.clear();
                        v.extend_from_slice(b);
                    }
                    _ => *slot = Value::Bytes(b.to_vec()),
                }
            }
            T_ARRAY => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep(MAX_DEPTH));
                }
                let n = self.count()?;
                if !matches!(slot, Value::Array(_)) {
                    *slot = Value::Array(Vec::with_capacity(n));
                }
                if let Value::Array(a) = slot {
                    a.truncate(n);
                    for i in 0..n {
                        match a.get_mut(i) {
                            Some(e) => self.value_into(e, depth + 1)?,
                            None => a.push(self.value(depth + 1)?),
                        }
                    }
                }
            }
            T_MAP => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep(MAX_DEPTH));
                }
                let n = self.count()?;
                if !matches!(slot, Value::Map(_)) {
                    *slot = Value::Map(Map::with_capacity(n / 2));
                }
                if let Value::Map(m) = slot {
                    // Entries `..kept` were matched in order and decoded in place; at the first
                    // key out of order the rest is dropped and built as `decode` builds it
                    // (a repeated key keeps its first place and takes the last value).
                    let mut kept = 0;
                    let mut in_order = true;
                    for _ in 0..n {
                        let k = self.str()?;
                        if in_order {
                            if let Some((_, v)) =
                                m.get_index_mut(kept).filter(|(key, _)| key.as_str() == k)
                            {
                                self.value_into(v, depth + 1)?;
                                kept += 1;
                                continue;
                            }
                            m.truncate(kept);
                            in_order = false;
                        }
                        let v = self.value(depth + 1)?;
                        m.insert(k.to_string(), v);
                    }
                    if in_order {
                        m.truncate(kept);
                    }
                }
            }
            t => return Err(DecodeError::BadTag(t)),
        }
        Ok(())
    }
}
