//! Pub/sub matching (features.md §7, PROTOCOL.md §7): which subscriptions a published message
//! reaches.

use crate::wire::{Map, Value};

/// Whether a subscription's topic (possibly a pattern) matches a published topic. Patterns:
/// `*` stands for one segment of `[A-Za-z0-9_]+`, `>` for one or more remaining segments;
/// anything else must match exactly.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    if !pattern.contains(['*', '>']) {
        return pattern == topic;
    }
    let mut p = pattern.split('.');
    let mut t = topic.split('.');
    loop {
        match (p.next(), t.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(seg)) => {
                if seg.is_empty() || !seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Routing keys match when either side has none, or both are equal.
pub fn routing_matches(subscribed: Option<&str>, published: Option<&str>) -> bool {
    match (subscribed, published) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// Whether `identity` (an object) has every key of `filter` with an equal value (exact,
/// case-sensitive, as the io.Connect client checks).
pub fn identity_matches(filter: &Map, identity: &Value) -> bool {
    let Some(id) = identity.as_map() else {
        return filter.is_empty();
    };
    filter.iter().all(|(k, v)| id.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_match_exactly_or_by_pattern() {
        assert!(topic_matches("a.b", "a.b"));
        assert!(!topic_matches("a.b", "a.b.c"));
        assert!(topic_matches("harness.*", "harness.other"));
        assert!(!topic_matches("harness.*", "harness.a.b"));
        assert!(!topic_matches("harness.*", "harness."));
        assert!(!topic_matches("harness.*", "harness.a-b"));
        assert!(topic_matches(">", "anything.at.all"));
        assert!(topic_matches("a.>", "a.b.c"));
        assert!(!topic_matches("a.>", "a"));
        assert!(topic_matches("*.x", "q.x"));
    }

    #[test]
    fn routing_keys_match_when_either_is_missing_or_both_equal() {
        assert!(routing_matches(None, None));
        assert!(routing_matches(Some("k"), None));
        assert!(routing_matches(None, Some("k")));
        assert!(routing_matches(Some("k"), Some("k")));
        assert!(!routing_matches(Some("k"), Some("j")));
    }

    #[test]
    fn identity_filters_need_every_key_equal() {
        let id = Value::from_json_str(r#"{"application":"B","pid":7}"#).unwrap();
        let f = |s: &str| Value::from_json_str(s).unwrap().as_map().unwrap().clone();
        assert!(identity_matches(&f(r#"{"application":"B"}"#), &id));
        assert!(identity_matches(&f(r#"{}"#), &id));
        assert!(!identity_matches(&f(r#"{"application":"b"}"#), &id));
        assert!(!identity_matches(
            &f(r#"{"application":"B","user":"x"}"#),
            &id
        ));
    }
}
