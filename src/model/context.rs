//! Shared-context semantics (features.md §5.3–5.4) as pure functions: what `set`, `update` and
//! `set_paths` do to a context's data, and the `(delta, removed)` a subscriber is told.

use crate::wire::{Map, Value};
use thiserror::Error;

/// An operation on a context's data.
#[derive(Debug, Clone, PartialEq)]
pub enum ContextOp {
    /// Replace the whole value.
    Set(Map),
    /// Replace top-level keys wholesale; `null` deletes a key.
    Update(Map),
    /// Set dotted paths in order (intermediates created, non-objects overwritten with `{}`);
    /// `null` deletes the leaf; the empty path means `Set` (its value must be an object).
    Paths(Vec<(String, Value)>),
}

/// What an operation changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The new data.
    pub data: Map,
    /// For `update`: the changed keys with their new values, removed keys `null` (an
    /// io.Connect `update` travels as top-level path commands, features.md §5.3–5.4). For `set`
    /// (and creation): the whole value. For paths: an object mirroring the touched paths,
    /// deleted leaves `null`.
    pub delta: Map,
    /// Top-level keys the change removed (empty for `set`, as io.Connect reports it).
    pub removed: Vec<String>,
}

/// A bad operation.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ContextError {
    /// A path with an empty segment or a forbidden one (`__proto__`, `constructor`,
    /// `prototype`).
    #[error("Please provide the path as a dot delimited string! ({0:?})")]
    BadPath(String),
    /// The empty path with a value that is not an object.
    #[error("Please provide the data as an object!")]
    NotAnObject,
}

/// Path segments io.Connect refuses (they would reach a JavaScript object's prototype).
pub(crate) const FORBIDDEN: [&str; 3] = ["__proto__", "constructor", "prototype"];

fn segments(path: &str) -> Result<Vec<&str>, ContextError> {
    let segs: Vec<&str> = path.split('.').collect();
    if segs.iter().any(|s| s.is_empty() || FORBIDDEN.contains(s)) {
        return Err(ContextError::BadPath(path.to_string()));
    }
    Ok(segs)
}

/// What an in-place application changed (the data itself was changed in place).
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub delta: Map,
    pub removed: Vec<String>,
}

/// Like [`apply`], but changes `data` in place (`exists`: whether the context existed; when it
/// did not, `data` must be empty). Cheaper: nothing is copied but what changed. `Ok(None)`
/// when nothing changed (then `data` is untouched).
pub fn apply_mut(
    data: &mut Map,
    exists: bool,
    op: &ContextOp,
) -> Result<Option<Delta>, ContextError> {
    match op {
        ContextOp::Set(new) => {
            if exists && data == new {
                return Ok(None);
            }
            *data = new.clone();
            Ok(Some(Delta {
                delta: new.clone(),
                removed: Vec::new(),
            }))
        }
        ContextOp::Update(new) if !exists => {
            *data = new.clone();
            Ok(Some(Delta {
                delta: new.clone(),
                removed: Vec::new(),
            }))
        }
        ContextOp::Update(new) => {
            let mut delta = Map::new();
            let mut removed = Vec::new();
            for (k, v) in new {
                if v.is_null() {
                    if data.shift_remove(k).is_some() {
                        delta.insert(k.clone(), Value::Null);
                        removed.push(k.clone());
                    }
                } else if data.get(k) != Some(v) {
                    set_key(data, k, v);
                    delta.insert(k.clone(), v.clone());
                }
            }
            if delta.is_empty() && removed.is_empty() {
                return Ok(None);
            }
            Ok(Some(Delta { delta, removed }))
        }
        ContextOp::Paths(_) => {
            // Paths may cancel each other out: compare whole values (paths are not the hot path).
            let cur = if exists { Some(&*data) } else { None };
            match apply(cur, op)? {
                Some(ch) => {
                    *data = ch.data;
                    Ok(Some(Delta {
                        delta: ch.delta,
                        removed: ch.removed,
                    }))
                }
                None => Ok(None),
            }
        }
    }
}

/// Replaces `k`'s value, allocating a key only when it is new.
fn set_key(data: &mut Map, k: &str, v: &Value) {
    match data.get_mut(k) {
        Some(slot) => *slot = v.clone(),
        None => {
            data.insert(k.to_string(), v.clone());
        }
    }
}

/// Sets `k` to `v` unless it already holds an equal value (one lookup). Returns whether it
/// changed.
fn set_if_changed(data: &mut Map, k: &str, v: &Value) -> bool {
    match data.get_mut(k) {
        Some(slot) if *slot == *v => false,
        Some(slot) => {
            *slot = v.clone();
            true
        }
        None => {
            data.insert(k.to_string(), v.clone());
            true
        }
    }
}

/// [`apply_mut`] for an op the caller owns: an update's keys and values move into the delta
/// instead of being copied for it.
pub fn apply_owned(
    data: &mut Map,
    exists: bool,
    op: ContextOp,
) -> Result<Option<Delta>, ContextError> {
    match op {
        ContextOp::Update(new) if exists => {
            let mut delta = Map::with_capacity(new.len());
            let mut removed = Vec::new();
            for (k, v) in new {
                if v.is_null() {
                    if data.shift_remove(&k).is_some() {
                        delta.insert(k.clone(), Value::Null);
                        removed.push(k);
                    }
                } else if set_if_changed(data, &k, &v) {
                    delta.insert(k, v);
                }
            }
            if delta.is_empty() && removed.is_empty() {
                return Ok(None);
            }
            Ok(Some(Delta { delta, removed }))
        }
        op => apply_mut(data, exists, &op),
    }
}

/// What taking `before` to `after` changed, told as an `update` would tell it: the keys whose
/// value differs with their new value, removed keys `null` and listed in `removed`. For a
/// follower that lost track of the log and compares snapshots.
pub fn difference(before: &Map, after: &Map) -> Delta {
    let mut delta = Map::new();
    for (k, v) in after {
        if before.get(k) != Some(v) {
            delta.insert(k.clone(), v.clone());
        }
    }
    let mut removed = Vec::new();
    for k in before.keys() {
        if !after.contains_key(k) {
            delta.insert(k.clone(), Value::Null);
            removed.push(k.clone());
        }
    }
    Delta { delta, removed }
}

/// A follower's fast path: applies a logged `{"update": {…}}` of at most eight keys to the
/// data of an existing context straight from its encoding, without building the op's map.
/// `None` when the record has another shape, more keys or a key twice (decode those with
/// [`ContextOp::decode`]); `Some(Err(()))` when it does not decode (nothing was applied).
pub fn apply_logged_update(data: &mut Map, bytes: &[u8]) -> Option<Result<Option<Delta>, ()>> {
    const MAX: usize = 8;
    let mut items: [Option<(&str, Value)>; MAX] = std::array::from_fn(|_| None);
    let mut n = 0;
    let mut over = false;
    // Collected first: a record that fails to decode half-way changes nothing.
    match crate::wire::codec::visit_single_entry_map(bytes, "update", |k, v| {
        if n < MAX {
            items[n] = Some((k, v));
            n += 1;
        } else {
            over = true;
        }
    }) {
        Ok(true) if !over => {}
        Ok(_) => return None,
        Err(_) => return Some(Err(())),
    }
    let items = &mut items[..n];
    for i in 1..items.len() {
        let k = items[i].as_ref().map(|(k, _)| *k);
        if items[..i]
            .iter()
            .any(|e| e.as_ref().map(|(k2, _)| *k2) == k)
        {
            return None;
        }
    }
    let mut delta = Map::with_capacity(n);
    let mut removed = Vec::new();
    for (k, v) in items.iter_mut().filter_map(Option::take) {
        if v.is_null() {
            if data.shift_remove(k).is_some() {
                delta.insert(k.to_string(), Value::Null);
                removed.push(k.to_string());
            }
        } else if set_if_changed(data, k, &v) {
            delta.insert(k.to_string(), v);
        }
    }
    if delta.is_empty() && removed.is_empty() {
        return Some(Ok(None));
    }
    Some(Ok(Some(Delta { delta, removed })))
}

/// The writer's fast path for `update` on an existing context: changes `data` in place and
/// appends the encoded normalized op (what [`ContextOp::to_value`] of
/// [`ContextOp::normalized`] encodes to) to `out`, without building a delta. Returns whether
/// anything changed. `data` is changed even when the op cannot be encoded (a value nested too
/// deeply for the codec); then the error says so and `out` holds no complete op.
pub fn update_in_place(
    data: &mut Map,
    new: &Map,
    out: &mut Vec<u8>,
) -> Result<bool, crate::wire::codec::EncodeError> {
    // Which of `new`'s entries change something (the others drop out of the logged op).
    // Which of `new`'s entries change something (the others drop out of the logged op): a
    // bit each, on the stack for up to 64 entries.
    let mut small = [false; 64];
    let mut large = Vec::new();
    let effective: &mut [bool] = if new.len() <= small.len() {
        &mut small[..new.len()]
    } else {
        large.resize(new.len(), false);
        &mut large
    };
    for ((k, v), slot) in new.iter().zip(effective.iter_mut()) {
        let changes = if v.is_null() {
            data.shift_remove(k).is_some()
        } else {
            set_if_changed(data, k, v)
        };
        *slot = changes;
    }
    let n = effective.iter().filter(|e| **e).count();
    if n == 0 {
        return Ok(false);
    }
    crate::wire::codec::encode_map_header(out, 1);
    crate::wire::codec::encode_key(out, "update");
    crate::wire::codec::encode_map_header(out, n);
    for ((k, v), e) in new.iter().zip(effective.iter()) {
        if *e {
            crate::wire::codec::encode_key(out, k);
            // Inside `{"update": {k: v}}`.
            crate::wire::codec::encode_nested_into(v, out, 2)?;
        }
    }
    Ok(true)
}

/// Applies `op` to the current data (`None`: the context does not exist yet). `Ok(None)` when
/// nothing changes (then nothing is written and no subscriber is told).
pub fn apply(current: Option<&Map>, op: &ContextOp) -> Result<Option<Change>, ContextError> {
    match op {
        ContextOp::Set(data) => {
            if current == Some(data) {
                return Ok(None);
            }
            Ok(Some(Change {
                data: data.clone(),
                delta: data.clone(),
                removed: Vec::new(),
            }))
        }
        ContextOp::Update(data) => {
            let Some(cur) = current else {
                // Creating: stored as given, null values included (as io.Connect does).
                return Ok(Some(Change {
                    data: data.clone(),
                    delta: data.clone(),
                    removed: Vec::new(),
                }));
            };
            let mut next = cur.clone();
            let mut delta = Map::new();
            let mut removed = Vec::new();
            for (k, v) in data {
                if v.is_null() {
                    if next.shift_remove(k).is_some() {
                        delta.insert(k.clone(), Value::Null);
                        removed.push(k.clone());
                    }
                } else if cur.get(k) != Some(v) {
                    next.insert(k.clone(), v.clone());
                    delta.insert(k.clone(), v.clone());
                }
            }
            if delta.is_empty() && removed.is_empty() {
                return Ok(None);
            }
            Ok(Some(Change {
                data: next,
                delta,
                removed,
            }))
        }
        ContextOp::Paths(cmds) => {
            let mut next = current.cloned().unwrap_or_default();
            let mut delta = Map::new();
            let mut removed = Vec::new();
            for (path, value) in cmds {
                if path.is_empty() {
                    let Value::Map(m) = value else {
                        return Err(ContextError::NotAnObject);
                    };
                    next = m.clone();
                    delta = m.clone();
                    continue;
                }
                let segs = segments(path)?;
                if value.is_null() {
                    remove_path(&mut next, &segs);
                } else {
                    set_path(&mut next, &segs, value);
                }
                set_path(&mut delta, &segs, value);
                if segs.len() == 1
                    && value.is_null()
                    && current.is_some_and(|c| c.contains_key(segs[0]))
                {
                    removed.push(segs[0].to_string());
                }
            }
            if current == Some(&next) {
                return Ok(None);
            }
            Ok(Some(Change {
                data: next,
                delta,
                removed,
            }))
        }
    }
}

/// Deletes the leaf at `segs` if every intermediate exists.
fn remove_path(m: &mut Map, segs: &[&str]) {
    let Some((last, init)) = segs.split_last() else {
        return;
    };
    let mut cur = m;
    for s in init {
        match cur.get_mut(*s) {
            Some(Value::Map(inner)) => cur = inner,
            _ => return,
        }
    }
    cur.shift_remove(*last);
}

/// Sets `segs` in `m` to `value`, creating intermediates and replacing non-object
/// intermediates with `{}` (in a delta map, deletes are recorded this way as `null`).
fn set_path(m: &mut Map, segs: &[&str], value: &Value) {
    let (last, init) = match segs.split_last() {
        Some(x) => x,
        None => return,
    };
    let mut cur = m;
    for s in init {
        let slot = cur.entry((*s).to_string()).or_insert_with(Value::map);
        if !matches!(slot, Value::Map(_)) {
            *slot = Value::map();
        }
        let Value::Map(inner) = slot else { return };
        cur = inner;
    }
    cur.insert((*last).to_string(), value.clone());
}

impl ContextOp {
    /// [`ContextOp::normalized`] for an in-place change.
    pub fn normalized_delta(&self, d: &Delta, existed: bool) -> ContextOp {
        match self {
            ContextOp::Update(_) if existed => {
                let mut m = d.delta.clone();
                for k in &d.removed {
                    m.insert(k.clone(), Value::Null);
                }
                ContextOp::Update(m)
            }
            other => other.clone(),
        }
    }

    /// The smallest op that has the same effect given the same starting data: followers of
    /// the context log re-apply it to their copy to get the same data, delta and removed.
    pub fn normalized(&self, change: &Change, existed: bool) -> ContextOp {
        match self {
            ContextOp::Update(_) if existed => {
                let mut m = change.delta.clone();
                for k in &change.removed {
                    m.insert(k.clone(), Value::Null);
                }
                ContextOp::Update(m)
            }
            other => other.clone(),
        }
    }

    /// Encodes for the context log: `{"set": {...}}`, `{"update": {...}}` or
    /// `{"paths": [[path, value], ...]}`.
    pub fn to_value(&self) -> Value {
        match self {
            ContextOp::Set(m) => Value::object([("set", Value::Map(m.clone()))]),
            ContextOp::Update(m) => Value::object([("update", Value::Map(m.clone()))]),
            ContextOp::Paths(p) => Value::object([(
                "paths",
                Value::Array(
                    p.iter()
                        .map(|(k, v)| Value::Array(vec![Value::from(k.as_str()), v.clone()]))
                        .collect(),
                ),
            )]),
        }
    }

    /// Decodes [`ContextOp::to_value`]'s form, taking the value apart instead of copying it.
    pub fn from_value_owned(v: Value) -> Option<ContextOp> {
        let Value::Map(mut m) = v else { return None };
        match (
            m.shift_remove("set"),
            m.shift_remove("update"),
            m.shift_remove("paths"),
        ) {
            (Some(Value::Map(d)), _, _) => Some(ContextOp::Set(d)),
            (_, Some(Value::Map(d)), _) => Some(ContextOp::Update(d)),
            (_, _, Some(p)) => ContextOp::from_value(&Value::object([("paths", p)])),
            _ => None,
        }
    }

    /// Decodes an encoded op (what the store logs). The common `{"update": {…}}` is read
    /// straight into its map, without the outer map and its lookups.
    pub fn decode(bytes: &[u8]) -> Option<ContextOp> {
        match crate::wire::codec::decode_single_entry(bytes, "update") {
            Ok(Some(Value::Map(d))) => Some(ContextOp::Update(d)),
            Ok(Some(_)) | Err(_) => None,
            Ok(None) => crate::wire::codec::decode(bytes)
                .ok()
                .and_then(ContextOp::from_value_owned),
        }
    }

    /// Decodes [`ContextOp::to_value`]'s form.
    pub fn from_value(v: &Value) -> Option<ContextOp> {
        let m = v.as_map()?;
        if let Some(Value::Map(d)) = m.get("set") {
            return Some(ContextOp::Set(d.clone()));
        }
        if let Some(Value::Map(d)) = m.get("update") {
            return Some(ContextOp::Update(d.clone()));
        }
        if let Some(Value::Array(a)) = m.get("paths") {
            let mut out = Vec::with_capacity(a.len());
            for item in a {
                match item {
                    Value::Array(pair) if pair.len() == 2 => {
                        out.push((pair[0].as_str()?.to_string(), pair[1].clone()))
                    }
                    _ => return None,
                }
            }
            return Some(ContextOp::Paths(out));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(json: &str) -> Map {
        match Value::from_json_str(json).unwrap() {
            Value::Map(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn update_replaces_top_level_keys_whole_and_null_deletes() {
        let cur = m(r#"{"a":{"y":2},"b":1,"c":3}"#);
        let ch = apply(
            Some(&cur),
            &ContextOp::Update(m(r#"{"a":{"x":1},"b":1,"c":null}"#)),
        )
        .unwrap()
        .unwrap();
        assert_eq!(ch.data, m(r#"{"a":{"x":1},"b":1}"#), "not a deep merge");
        assert_eq!(
            ch.delta,
            m(r#"{"a":{"x":1},"c":null}"#),
            "unchanged keys are not in the delta; removed ones are null"
        );
        assert_eq!(ch.removed, vec!["c".to_string()]);
    }

    /// What the follower's fast path must agree with: decode the op, then apply it.
    fn slow_path(data: &Map, bytes: &[u8]) -> (Map, Option<Delta>) {
        let mut d = data.clone();
        let op = ContextOp::decode(bytes).expect("decodes");
        let delta = apply_owned(&mut d, true, op).unwrap();
        (d, delta)
    }

    fn logged_update(json: &str) -> Vec<u8> {
        crate::wire::codec::encode(&ContextOp::Update(m(json)).to_value()).unwrap()
    }

    #[test]
    fn logged_update_applied_from_its_encoding_matches_decode_then_apply() {
        let cur = m(r#"{"a":{"y":2},"b":1,"c":3,"d":"x"}"#);
        for op in [
            r#"{"a":{"x":1},"b":1,"c":null}"#,
            r#"{"b":1}"#,
            r#"{"z":null}"#,
            r#"{"e":[1,2,{"f":null}],"d":"y","a":{"y":2}}"#,
            r#"{"c":null,"d":null,"b":2}"#,
            r#"{}"#,
        ] {
            let bytes = logged_update(op);
            let (want_data, want_delta) = slow_path(&cur, &bytes);
            let mut data = cur.clone();
            let got = apply_logged_update(&mut data, &bytes)
                .expect("handled")
                .unwrap();
            assert_eq!(data, want_data, "{op}");
            assert_eq!(got, want_delta, "{op}");
        }
    }

    #[test]
    fn logged_update_fast_path_declines_what_it_does_not_handle() {
        let cur = m(r#"{"a":1}"#);
        // Other shapes, and more keys than it collects: the caller decodes them instead.
        let set = crate::wire::codec::encode(&ContextOp::Set(m(r#"{"a":2}"#)).to_value()).unwrap();
        let mut data = cur.clone();
        assert!(apply_logged_update(&mut data, &set).is_none());
        let many: String = (0..9)
            .map(|i| format!(r#""k{i}":{i}"#))
            .collect::<Vec<_>>()
            .join(",");
        assert!(apply_logged_update(&mut data, &logged_update(&format!("{{{many}}}"))).is_none());
        assert_eq!(data, cur, "nothing applied");
        // A key twice (only a hand-made record has that): the decoded map keeps the last.
        let mut twice = Vec::new();
        crate::wire::codec::encode_map_header(&mut twice, 1);
        crate::wire::codec::encode_key(&mut twice, "update");
        crate::wire::codec::encode_map_header(&mut twice, 2);
        for v in [1, 5] {
            crate::wire::codec::encode_key(&mut twice, "a");
            crate::wire::codec::encode_into(&Value::from(v), &mut twice).unwrap();
        }
        assert!(apply_logged_update(&mut data, &twice).is_none());
        assert_eq!(slow_path(&cur, &twice).0, m(r#"{"a":5}"#));
        // Cut short: an error, and nothing applied (not the first key of two).
        let bytes = logged_update(r#"{"a":2,"b":"long enough to cut"}"#);
        let r = apply_logged_update(&mut data, &bytes[..bytes.len() - 3]);
        assert_eq!(r, Some(Err(())));
        assert_eq!(data, cur, "a record that does not decode changes nothing");
        // Trailing bytes are an error too.
        let mut long = logged_update(r#"{"a":2}"#);
        long.push(0);
        assert_eq!(apply_logged_update(&mut data, &long), Some(Err(())));
        assert_eq!(data, cur);
    }

    #[test]
    fn update_that_changes_nothing_is_none() {
        let cur = m(r#"{"a":1,"b":{"c":[1,2]}}"#);
        assert_eq!(
            apply(
                Some(&cur),
                &ContextOp::Update(m(r#"{"a":1,"b":{"c":[1,2]},"z":null}"#))
            )
            .unwrap(),
            None
        );
        assert_eq!(
            apply(Some(&cur), &ContextOp::Set(cur.clone())).unwrap(),
            None
        );
    }

    #[test]
    fn update_that_creates_stores_data_as_given() {
        let ch = apply(None, &ContextOp::Update(m(r#"{"a":null,"b":2}"#)))
            .unwrap()
            .unwrap();
        assert_eq!(ch.data, m(r#"{"a":null,"b":2}"#));
        assert!(ch.removed.is_empty());
    }

    #[test]
    fn set_replaces_everything_and_reports_no_removed_keys() {
        let cur = m(r#"{"a":1,"b":2}"#);
        let ch = apply(Some(&cur), &ContextOp::Set(m(r#"{"c":3}"#)))
            .unwrap()
            .unwrap();
        assert_eq!(ch.data, m(r#"{"c":3}"#));
        assert_eq!(ch.delta, m(r#"{"c":3}"#));
        assert!(ch.removed.is_empty());
    }

    #[test]
    fn paths_create_intermediates_overwrite_scalars_and_delete_leaves() {
        let cur = m(r#"{"a":{"b":1,"keep":true},"s":5,"gone":1}"#);
        let op = ContextOp::Paths(vec![
            ("a.b".into(), Value::from(2)),
            ("s.t.u".into(), Value::from("x")),
            ("a.keep".into(), Value::Null),
            ("gone".into(), Value::Null),
            ("new.deep".into(), Value::from(1)),
        ]);
        let ch = apply(Some(&cur), &op).unwrap().unwrap();
        assert_eq!(
            ch.data,
            m(r#"{"a":{"b":2},"s":{"t":{"u":"x"}},"new":{"deep":1}}"#)
        );
        assert_eq!(
            ch.delta,
            m(r#"{"a":{"b":2,"keep":null},"s":{"t":{"u":"x"}},"gone":null,"new":{"deep":1}}"#)
        );
        assert_eq!(ch.removed, vec!["gone".to_string()]);
    }

    #[test]
    fn paths_on_a_missing_context_create_it_and_the_empty_path_sets() {
        let ch = apply(
            None,
            &ContextOp::Paths(vec![("x.y".into(), Value::from(1))]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(ch.data, m(r#"{"x":{"y":1}}"#));
        let ch = apply(
            Some(&ch.data),
            &ContextOp::Paths(vec![("".into(), Value::Map(m(r#"{"z":0}"#)))]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(ch.data, m(r#"{"z":0}"#));
        assert_eq!(
            apply(None, &ContextOp::Paths(vec![("".into(), Value::from(1))])),
            Err(ContextError::NotAnObject)
        );
    }

    #[test]
    fn in_place_application_agrees_with_apply() {
        let cur = m(r#"{"a":1,"b":{"c":2},"d":[1]}"#);
        let ops = [
            ContextOp::Update(m(r#"{"a":1,"b":5,"d":null,"e":"x"}"#)),
            ContextOp::Update(m(r#"{"a":1,"zz":null}"#)),
            ContextOp::Set(m(r#"{"q":1}"#)),
            ContextOp::Set(cur.clone()),
            ContextOp::Paths(vec![
                ("b.c".into(), Value::Null),
                ("f.g".into(), Value::from(1)),
            ]),
            ContextOp::Paths(vec![
                ("a".into(), Value::from(2)),
                ("a".into(), Value::from(1)),
            ]),
        ];
        for op in &ops {
            for exists in [true, false] {
                let start = if exists { cur.clone() } else { Map::new() };
                let expect = apply(if exists { Some(&start) } else { None }, op).unwrap();
                let mut data = start.clone();
                let got = apply_mut(&mut data, exists, op).unwrap();
                match (expect, got) {
                    (None, None) => assert_eq!(data, start, "{op:?}"),
                    (Some(e), Some(g)) => {
                        assert_eq!(data, e.data, "{op:?}");
                        assert_eq!((g.delta, g.removed), (e.delta, e.removed), "{op:?}");
                    }
                    (e, g) => panic!("{op:?} exists={exists}: {e:?} vs {g:?}"),
                }
            }
        }
    }

    #[test]
    fn the_writers_fast_path_logs_the_normalized_op() {
        let cur = m(r#"{"a":1,"b":2,"c":3}"#);
        for new in [
            r#"{"a":1,"b":5,"c":null,"d":4}"#,
            r#"{"a":1}"#,
            r#"{"x":null}"#,
            r#"{"b":9}"#,
        ] {
            let op = ContextOp::Update(m(new));
            let expect = apply(Some(&cur), &op).unwrap();
            let mut data = cur.clone();
            let mut out = Vec::new();
            let changed = update_in_place(&mut data, &m(new), &mut out).unwrap();
            match expect {
                None => assert!(!changed && out.is_empty() && data == cur, "{new}"),
                Some(ch) => {
                    assert!(changed);
                    assert_eq!(data, ch.data, "{new}");
                    let logged = crate::wire::codec::decode(&out).unwrap();
                    assert_eq!(logged, op.normalized(&ch, true).to_value(), "{new}");
                }
            }
        }
    }

    #[test]
    fn bad_paths_are_rejected() {
        for p in [
            "a..b",
            ".a",
            "a.",
            "__proto__",
            "a.constructor",
            "prototype.x",
        ] {
            assert!(
                matches!(
                    apply(None, &ContextOp::Paths(vec![(p.into(), Value::from(1))])),
                    Err(ContextError::BadPath(_))
                ),
                "{p}"
            );
        }
    }

    #[test]
    fn a_follower_reapplying_the_normalized_op_gets_the_same_change() {
        let cur = m(r#"{"a":1,"b":2,"c":{"d":3}}"#);
        for op in [
            ContextOp::Update(m(r#"{"a":1,"b":5,"c":null,"e":[1]}"#)),
            ContextOp::Set(m(r#"{"q":1}"#)),
            ContextOp::Paths(vec![
                ("c.d".into(), Value::Null),
                ("f".into(), Value::from(true)),
            ]),
        ] {
            let ch = apply(Some(&cur), &op).unwrap().unwrap();
            let norm = op.normalized(&ch, true);
            let back = ContextOp::from_value(&norm.to_value()).unwrap();
            assert_eq!(apply(Some(&cur), &back).unwrap().unwrap(), ch);
        }
    }
}
