//! GW3 context deltas and knit's context operations, both ways (features.md §5.3, PROTOCOL.md
//! §6.2). Pure functions; the connection decides when to use them.
//!
//! A GW3 delta is an object whose parts apply **in key order**: `reset` (replace everything),
//! `added` (assign top-level keys), `updated` (assign, but merge one level when old and new are
//! both objects), `removed` (delete top-level keys) and `commands` (`set`/`remove` dotted
//! paths). What `@interopio/core` sends maps onto one knit op exactly: `reset` alone is a
//! `Set`, `commands` alone (what `update`, `setPath` and `setPaths` send) are `Paths`, and
//! `added`/`removed` are an `Update`. Anything else (legacy `updated` merges, mixtures) needs
//! the current data: the writer computes the result with GW3's rules and writes the top-level
//! difference as an `Update` (or a `Set`), compare-and-set on the version it read.
//!
//! The other way, a knit op becomes the delta a GW3 client applies to the same effect and
//! reports with the same (data, delta, removed) a native subscriber gets: `Set` → `reset`,
//! `Update` → `added` + `removed` (whole top-level values, no path parsing of keys), `Paths` →
//! `commands`.

use crate::model::context::ContextOp;
use crate::wire::{Map, Value};
use serde_json::{json, Value as J};

/// One part of a GW3 delta.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Part {
    Reset(Map),
    Added(Map),
    Updated(Map),
    Removed(Vec<String>),
    Commands(Vec<Command>),
}

/// A path command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    Set(String, Value),
    Remove(String),
}

/// A delta that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DeltaError {
    #[error("a context delta must be an object")]
    NotObject,
    #[error("delta.{0} must be {1}")]
    BadPart(&'static str, &'static str),
    #[error("delta command {0} must be {{type: \"set\"|\"remove\", path: string, value}}")]
    BadCommand(usize),
    #[error("path {0:?} has a forbidden segment")]
    BadPath(String),
    #[error("setting the whole context needs an object")]
    NotAnObject,
}

const FORBIDDEN: [&str; 3] = ["__proto__", "constructor", "prototype"];

fn check_path(p: &str) -> Result<(), DeltaError> {
    if p.split('.').any(|s| FORBIDDEN.contains(&s)) {
        return Err(DeltaError::BadPath(p.to_string()));
    }
    Ok(())
}

fn object(v: &J, name: &'static str) -> Result<Map, DeltaError> {
    match Value::from(v.clone()) {
        Value::Map(m) => Ok(m),
        _ => Err(DeltaError::BadPart(name, "an object")),
    }
}

/// Reads a GW3 delta into its parts, in key order. Parts that are `null`, and `added`,
/// `updated`, `removed` and `commands` that are empty, are absent (`@interopio/core` sends
/// every update as `{added: {}, updated: {}, removed: [], commands: [...]}`); unknown keys are
/// ignored (as the reference gateway does). An empty `reset` is kept: it clears the data.
pub(crate) fn parse(delta: &J) -> Result<Vec<Part>, DeltaError> {
    let J::Object(o) = delta else {
        return Err(DeltaError::NotObject);
    };
    let mut parts = Vec::with_capacity(o.len());
    for (k, v) in o {
        if v.is_null() {
            continue;
        }
        let part = match k.as_str() {
            "reset" => Part::Reset(object(v, "reset")?),
            "added" => Part::Added(object(v, "added")?),
            "updated" => Part::Updated(object(v, "updated")?),
            "removed" => {
                let J::Array(a) = v else {
                    return Err(DeltaError::BadPart("removed", "an array of keys"));
                };
                let keys = a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or(DeltaError::BadPart("removed", "an array of keys"))?;
                Part::Removed(keys)
            }
            "commands" => {
                let J::Array(a) = v else {
                    return Err(DeltaError::BadPart("commands", "an array"));
                };
                let mut cmds = Vec::with_capacity(a.len());
                for (i, c) in a.iter().enumerate() {
                    let path = c
                        .get("path")
                        .and_then(J::as_str)
                        .ok_or(DeltaError::BadCommand(i))?;
                    check_path(path)?;
                    match c.get("type").and_then(J::as_str) {
                        Some("set") => cmds.push(Command::Set(
                            path.to_string(),
                            Value::from(c.get("value").cloned().unwrap_or(J::Null)),
                        )),
                        Some("remove") => cmds.push(Command::Remove(path.to_string())),
                        _ => return Err(DeltaError::BadCommand(i)),
                    }
                }
                Part::Commands(cmds)
            }
            _ => continue,
        };
        let empty = match &part {
            Part::Added(m) | Part::Updated(m) => m.is_empty(),
            Part::Removed(k) => k.is_empty(),
            Part::Commands(c) => c.is_empty(),
            Part::Reset(_) => false,
        };
        if !empty {
            parts.push(part);
        }
    }
    Ok(parts)
}

/// How a delta is written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Plan {
    /// As this op, whatever the current data.
    Op(ContextOp),
    /// It depends on the current data: [`apply`] the parts to it and write [`diff`].
    Compute,
}

/// Decides how to write a delta (see the module docs).
pub(crate) fn plan(parts: &[Part]) -> Result<Plan, DeltaError> {
    if let Some(last) = parts.iter().rposition(|p| matches!(p, Part::Reset(_))) {
        // Everything before the last reset is overwritten by it.
        let mut data = Map::new();
        apply(&mut data, &parts[last..])?;
        return Ok(Plan::Op(ContextOp::Set(data)));
    }
    if parts.iter().all(|p| matches!(p, Part::Commands(_))) {
        let mut paths = Vec::new();
        for p in parts {
            let Part::Commands(cmds) = p else { continue };
            for c in cmds {
                match c {
                    // knit's paths take null as "delete" and refuse empty segments; GW3 stores
                    // a null and makes "" keys. Those rare deltas are computed instead.
                    Command::Set(path, v)
                        if !v.is_null() && path.split('.').all(|s| !s.is_empty()) =>
                    {
                        paths.push((path.clone(), v.clone()))
                    }
                    Command::Remove(path) if path.split('.').all(|s| !s.is_empty()) => {
                        paths.push((path.clone(), Value::Null))
                    }
                    _ => return Ok(Plan::Compute),
                }
            }
        }
        return Ok(Plan::Op(ContextOp::Paths(paths)));
    }
    if parts
        .iter()
        .all(|p| matches!(p, Part::Added(_) | Part::Removed(_)))
    {
        let mut m = Map::new();
        for p in parts {
            match p {
                Part::Added(a) => {
                    for (k, v) in a {
                        if v.is_null() {
                            return Ok(Plan::Compute);
                        }
                        m.insert(k.clone(), v.clone());
                    }
                }
                Part::Removed(keys) => {
                    for k in keys {
                        m.insert(k.clone(), Value::Null);
                    }
                }
                _ => {}
            }
        }
        return Ok(Plan::Op(ContextOp::Update(m)));
    }
    Ok(Plan::Compute)
}

fn set_path(data: &mut Map, path: &str, value: Value) -> Result<(), DeltaError> {
    if path.is_empty() {
        let Value::Map(m) = value else {
            return Err(DeltaError::NotAnObject);
        };
        *data = m;
        return Ok(());
    }
    let segs: Vec<&str> = path.split('.').collect();
    let Some((last, init)) = segs.split_last() else {
        return Ok(());
    };
    let mut cur = data;
    for s in init {
        let slot = cur.entry((*s).to_string()).or_insert_with(Value::map);
        if !matches!(slot, Value::Map(_)) {
            *slot = Value::map();
        }
        let Value::Map(inner) = slot else {
            return Ok(());
        };
        cur = inner;
    }
    cur.insert((*last).to_string(), value);
    Ok(())
}

fn remove_path(data: &mut Map, path: &str) {
    if path.is_empty() {
        data.clear();
        return;
    }
    let segs: Vec<&str> = path.split('.').collect();
    let Some((last, init)) = segs.split_last() else {
        return;
    };
    let mut cur = data;
    for s in init {
        match cur.get_mut(*s) {
            Some(Value::Map(inner)) => cur = inner,
            _ => return,
        }
    }
    cur.shift_remove(*last);
}

/// Applies parts to `data` with GW3's rules (the reference gateway's, PROTOCOL.md §6.2).
pub(crate) fn apply(data: &mut Map, parts: &[Part]) -> Result<(), DeltaError> {
    for p in parts {
        match p {
            Part::Reset(m) => *data = m.clone(),
            Part::Added(m) => {
                for (k, v) in m {
                    data.insert(k.clone(), v.clone());
                }
            }
            Part::Updated(m) => {
                for (k, v) in m {
                    match (data.get_mut(k), v) {
                        (Some(Value::Map(old)), Value::Map(new)) => {
                            for (k2, v2) in new {
                                old.insert(k2.clone(), v2.clone());
                            }
                        }
                        _ => {
                            data.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            Part::Removed(keys) => {
                for k in keys {
                    data.shift_remove(k);
                }
            }
            Part::Commands(cmds) => {
                for c in cmds {
                    match c {
                        Command::Set(path, v) => set_path(data, path, v.clone())?,
                        Command::Remove(path) => remove_path(data, path),
                    }
                }
            }
        }
    }
    Ok(())
}

/// The op that takes `old` to `new`: the changed top-level keys as an `Update` (removed keys as
/// `null`), or a `Set` when a key must hold `null` (which an update would delete).
pub(crate) fn diff(old: &Map, new: &Map) -> ContextOp {
    if new
        .iter()
        .any(|(k, v)| v.is_null() && old.get(k) != Some(v))
    {
        return ContextOp::Set(new.clone());
    }
    ContextOp::Update(crate::model::context::difference(old, new).delta)
}

/// The GW3 delta for a knit op (`first`: it created the context). `None` when a path op sets
/// the whole value mid-way: the caller sends the snapshot as a `reset` instead.
pub(crate) fn to_gw3(op: &ContextOp, first: bool) -> Option<J> {
    match op {
        ContextOp::Set(m) => Some(json!({"reset": Value::Map(m.clone()).to_json()})),
        // An update that creates a context stores the data as given (nulls included).
        ContextOp::Update(m) if first => Some(json!({"reset": Value::Map(m.clone()).to_json()})),
        // What an io.Connect client sends for `update` (features.md §5.3): top-level path
        // commands, so a web subscriber is told a native update exactly as a web one (removed
        // keys `null` in its callback's delta). A key a path would misread (dotted, empty or
        // forbidden) makes the update travel as `added`/`removed` instead.
        ContextOp::Update(m) if m.keys().all(|k| plain_key(k)) => {
            let cmds: Vec<J> = m
                .iter()
                .map(|(k, v)| {
                    if v.is_null() {
                        json!({"type": "remove", "path": k})
                    } else {
                        json!({"type": "set", "path": k, "value": v.to_json()})
                    }
                })
                .collect();
            Some(json!({ "commands": cmds }))
        }
        ContextOp::Update(m) => {
            let mut added = serde_json::Map::new();
            let mut removed = Vec::new();
            for (k, v) in m {
                if v.is_null() {
                    removed.push(J::String(k.clone()));
                } else {
                    added.insert(k.clone(), v.to_json());
                }
            }
            Some(json!({"added": added, "removed": removed}))
        }
        ContextOp::Paths(p) => {
            let mut cmds = Vec::with_capacity(p.len());
            for (path, v) in p {
                if path.is_empty() {
                    return None;
                }
                cmds.push(if v.is_null() {
                    json!({"type": "remove", "path": path})
                } else {
                    json!({"type": "set", "path": path, "value": v.to_json()})
                });
            }
            Some(json!({"commands": cmds}))
        }
    }
}

/// A top-level key a GW3 path command names as it is.
fn plain_key(k: &str) -> bool {
    !k.is_empty() && !k.contains('.') && !crate::model::context::FORBIDDEN.contains(&k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::context::apply as knit_apply;

    fn m(j: J) -> Map {
        match Value::from(j) {
            Value::Map(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn gw3_apply(data: J, delta: J) -> J {
        let mut d = m(data);
        apply(&mut d, &parse(&delta).unwrap()).unwrap();
        Value::Map(d).to_json()
    }

    #[test]
    fn parts_apply_in_key_order_with_the_reference_gateways_rules() {
        // The reference gateway's own results (golden `edges`).
        let start = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        let s1 = gw3_apply(start, json!({"updated": {"a": {"d": 3}}}));
        assert_eq!(s1, json!({"a": {"b": 1, "c": 2, "d": 3}, "l": [1, 2]}));
        let s2 = gw3_apply(s1, json!({"added": {"n": 1}, "removed": ["l"]}));
        assert_eq!(s2, json!({"a": {"b": 1, "c": 2, "d": 3}, "n": 1}));
        let s3 = gw3_apply(s2, json!({"reset": {"r": 1}, "added": {"s": 2}}));
        assert_eq!(s3, json!({"r": 1, "s": 2}));
        let s4 = gw3_apply(s3, json!({"added": {"t": 3}, "reset": {"r": 2}}));
        assert_eq!(s4, json!({"r": 2}));
        let s5 = gw3_apply(
            s4,
            json!({"commands": [{"type": "set", "path": "x.y.z", "value": 1}, {"type": "remove", "path": "r"}]}),
        );
        assert_eq!(s5, json!({"x": {"y": {"z": 1}}}));
        assert_eq!(
            gw3_apply(s5, json!({"commands": [{"type": "remove", "path": ""}]})),
            json!({})
        );
    }

    #[test]
    fn what_the_client_library_sends_maps_onto_one_op() {
        let update = json!({"added": {}, "updated": {}, "removed": [],
            "commands": [{"type": "set", "path": "b", "value": {"d": 3}}, {"type": "remove", "path": "a"}]});
        // `added: {}` and the other empty parts are no parts at all.
        let parts = parse(&update).unwrap();
        assert_eq!(
            plan(&parts).unwrap(),
            Plan::Op(ContextOp::Paths(vec![
                ("b".into(), Value::from(json!({"d": 3}))),
                ("a".into(), Value::Null)
            ]))
        );
        assert_eq!(
            plan(
                &parse(&json!({"added": {"a": 1}, "commands": [{"type": "remove", "path": "b"}]}))
                    .unwrap()
            )
            .unwrap(),
            Plan::Compute,
            "mixed parts need the data"
        );
        assert_eq!(
            parse(&json!({"reset": {}})).unwrap(),
            vec![Part::Reset(Map::new())]
        );
        let commands = json!({"commands": [{"type": "set", "path": "x.z", "value": 5},
            {"type": "remove", "path": "x.y"}]});
        assert_eq!(
            plan(&parse(&commands).unwrap()).unwrap(),
            Plan::Op(ContextOp::Paths(vec![
                ("x.z".into(), Value::from(5)),
                ("x.y".into(), Value::Null)
            ]))
        );
        assert_eq!(
            plan(&parse(&json!({"reset": {"x": 1}})).unwrap()).unwrap(),
            Plan::Op(ContextOp::Set(m(json!({"x": 1}))))
        );
        assert_eq!(
            plan(&parse(&json!({"added": {"n": 1}, "removed": ["l"]})).unwrap()).unwrap(),
            Plan::Op(ContextOp::Update(m(json!({"n": 1, "l": null}))))
        );
        assert_eq!(
            plan(&parse(&json!({"added": {"t": 3}, "reset": {"r": 2}, "added2": 1})).unwrap())
                .unwrap(),
            Plan::Op(ContextOp::Set(m(json!({"r": 2}))))
        );
        for computed in [
            json!({"updated": {"a": {"d": 3}}}),
            json!({"added": {"n": null}}),
            json!({"commands": [{"type": "set", "path": "a", "value": null}]}),
            json!({"commands": [{"type": "remove", "path": ""}]}),
        ] {
            assert_eq!(
                plan(&parse(&computed).unwrap()).unwrap(),
                Plan::Compute,
                "{computed}"
            );
        }
    }

    #[test]
    fn the_planned_op_and_the_gw3_rules_agree() {
        let start = m(json!({"a": {"b": 1}, "l": [1], "x": {"y": 2}}));
        for delta in [
            json!({"commands": [{"type": "set", "path": "x.z", "value": 5}, {"type": "remove", "path": "x.y"}]}),
            json!({"commands": [{"type": "set", "path": "a", "value": {"d": 3}}, {"type": "remove", "path": "l"}]}),
            json!({"reset": {"q": 1}, "added": {"s": 2}}),
            json!({"added": {"n": 1}, "removed": ["l"]}),
            json!({"removed": ["n"], "added": {"n": 1}}),
        ] {
            let parts = parse(&delta).unwrap();
            let mut expect = start.clone();
            apply(&mut expect, &parts).unwrap();
            let Plan::Op(op) = plan(&parts).unwrap() else {
                panic!("{delta}")
            };
            let got = knit_apply(Some(&start), &op).unwrap().map(|c| c.data);
            assert_eq!(got.unwrap_or(start.clone()), expect, "{delta}");
        }
    }

    #[test]
    fn removing_under_a_missing_or_scalar_parent_changes_nothing_for_anyone() {
        // The reference gateway stores `{"q": null}` (or `{"q": {"y": null}}`) for the first two
        // while its subscribers' libraries do not, and fails the next two with a ClojureScript
        // type error; knit leaves the data alone, the same for its store, its web subscribers
        // (the delta as sent) and its native subscribers (docs/gw3-conformance.md).
        let start = m(json!({"c": 1, "t": true, "s": "str", "l": [1], "n": null, "q0": {}}));
        for path in ["q.y", "q0.y.z", "c.x", "t.x", "s.x", "l.0", "n.x", "q.y.z"] {
            let delta = json!({"commands": [{"type": "remove", "path": path}]});
            let parts = parse(&delta).unwrap();
            let mut gw3 = start.clone();
            apply(&mut gw3, &parts).unwrap();
            assert_eq!(gw3, start, "{path}");
            let Plan::Op(op) = plan(&parts).unwrap() else {
                panic!("{path}")
            };
            let native = knit_apply(Some(&start), &op).unwrap().map(|c| c.data);
            assert_eq!(native.unwrap_or(start.clone()), start, "{path}");
        }
    }

    #[test]
    fn computed_writes_are_the_top_level_difference() {
        let old = m(json!({"a": {"b": 1}, "k": 1, "gone": 2}));
        let mut new = old.clone();
        apply(
            &mut new,
            &parse(&json!({"updated": {"a": {"c": 2}}, "removed": ["gone"]})).unwrap(),
        )
        .unwrap();
        let op = diff(&old, &new);
        assert_eq!(
            op,
            ContextOp::Update(m(json!({"a": {"b": 1, "c": 2}, "gone": null})))
        );
        assert_eq!(knit_apply(Some(&old), &op).unwrap().unwrap().data, new);
        let with_null = m(json!({"a": null}));
        assert_eq!(diff(&old, &with_null), ContextOp::Set(with_null.clone()));
    }

    #[test]
    fn knit_ops_become_deltas_the_client_applies_to_the_same_effect() {
        assert_eq!(
            to_gw3(&ContextOp::Set(m(json!({"x": 1}))), false),
            Some(json!({"reset": {"x": 1}}))
        );
        assert_eq!(
            to_gw3(&ContextOp::Update(m(json!({"a.b": 1, "c": null}))), false),
            Some(json!({"added": {"a.b": 1}, "removed": ["c"]}))
        );
        assert_eq!(
            to_gw3(
                &ContextOp::Update(m(json!({"a": {"b": 1}, "c": null}))),
                false
            ),
            Some(json!({"commands": [
                {"type": "set", "path": "a", "value": {"b": 1}},
                {"type": "remove", "path": "c"}
            ]}))
        );
        assert_eq!(
            to_gw3(&ContextOp::Update(m(json!({"constructor": 1}))), false),
            Some(json!({"added": {"constructor": 1}, "removed": []}))
        );
        assert_eq!(
            to_gw3(&ContextOp::Update(m(json!({"a": 1, "c": null}))), true),
            Some(json!({"reset": {"a": 1, "c": null}}))
        );
        assert_eq!(
            to_gw3(
                &ContextOp::Paths(vec![
                    ("p.q".into(), Value::from(1)),
                    ("x".into(), Value::Null)
                ]),
                false
            ),
            Some(
                json!({"commands": [{"type": "set", "path": "p.q", "value": 1},
                {"type": "remove", "path": "x"}]})
            )
        );
        assert_eq!(
            to_gw3(&ContextOp::Paths(vec![("".into(), Value::map())]), false),
            None
        );
    }

    #[test]
    fn bad_deltas_are_refused() {
        for bad in [
            json!(1),
            json!({"reset": 1}),
            json!({"removed": "a"}),
            json!({"removed": [1]}),
            json!({"commands": {}}),
            json!({"commands": [{"type": "frob", "path": "a"}]}),
            json!({"commands": [{"type": "set"}]}),
            json!({"commands": [{"type": "set", "path": "a.__proto__.b", "value": 1}]}),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
        let mut d = Map::new();
        assert_eq!(
            apply(
                &mut d,
                &parse(&json!({"commands": [{"type": "set", "path": "", "value": 1}]})).unwrap()
            ),
            Err(DeltaError::NotAnObject)
        );
    }
}
