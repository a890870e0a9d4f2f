//! Pub/sub matching (features.md §7, PROTOCOL.md §7): which subscriptions a published message
//! reaches.

use crate::wire::{Map, Value};

/// Whether a subscription's topic (possibly a pattern) matches a published topic, as the
/// reference gateway matches them: the pattern is read as an anchored regular expression in
/// which `*` stands for `[A-Za-z0-9_]+` and `>` for `.*` (so `a.*` matches one more segment,
/// `a.>` anything after `a.`, `t*` matches `ta`, and `a.>.c` needs a `.c` at the end);
/// everything else matches itself.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    if !pattern.contains(['*', '>']) {
        return pattern == topic;
    }
    match by_segments(pattern, topic) {
        Some(m) => m,
        None => by_bytes(pattern.as_bytes(), topic.as_bytes()),
    }
}

fn word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The usual patterns, whose wildcards are whole segments and `>` only the last, matched segment
/// by segment without allocating. `None`: another kind of pattern. (Before a `>`, every `.` of
/// the pattern must meet a `.` of the topic, in order, whatever the pattern: so a mismatch
/// found here is final even when a later segment is of another kind.)
fn by_segments(pattern: &str, topic: &str) -> Option<bool> {
    let mut rest = Some(topic);
    let mut segs = pattern.split('.').peekable();
    while let Some(p) = segs.next() {
        if p == ">" {
            if segs.peek().is_some() {
                return None;
            }
            return Some(rest.is_some());
        }
        if p != "*" && p.contains(['*', '>']) {
            return None;
        }
        let Some(r) = rest else {
            return Some(false);
        };
        let (seg, next) = match r.find('.') {
            Some(i) => (&r[..i], Some(&r[i + 1..])),
            None => (r, None),
        };
        let ok = if p == "*" {
            !seg.is_empty() && seg.bytes().all(word)
        } else {
            p == seg
        };
        if !ok {
            return Some(false);
        }
        rest = next;
    }
    Some(rest.is_none())
}

/// Any pattern: the set of topic positions the pattern read so far can reach, one pattern byte
/// at a time (time: pattern × topic; no backtracking).
fn by_bytes(p: &[u8], t: &[u8]) -> bool {
    let n = t.len();
    let mut reach = vec![false; n + 1];
    let mut next = vec![false; n + 1];
    reach[0] = true;
    for &c in p {
        next[0] = false;
        match c {
            b'*' => {
                let mut open = false;
                for j in 1..=n {
                    open = (open || reach[j - 1]) && word(t[j - 1]);
                    next[j] = open;
                }
            }
            b'>' => {
                let first = reach.iter().position(|&r| r).unwrap_or(n + 1);
                for (j, slot) in next.iter_mut().enumerate() {
                    *slot = j >= first;
                }
            }
            _ => {
                for j in 1..=n {
                    next[j] = reach[j - 1] && t[j - 1] == c;
                }
            }
        }
        std::mem::swap(&mut reach, &mut next);
        if !reach.contains(&true) {
            return false;
        }
    }
    reach[n]
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
        assert!(topic_matches("a.>", "a."), "> may match nothing");
    }

    #[test]
    fn wildcards_inside_segments_and_in_the_middle_match_as_the_reference_gateway() {
        // What the reference gateway delivered for these (a web probe against it).
        assert!(topic_matches("t*", "ta"));
        assert!(!topic_matches("t*", "t"));
        assert!(!topic_matches("t*", "ta.b"));
        assert!(topic_matches("t.a*", "t.ab"));
        assert!(!topic_matches("t.a*", "t.a"));
        assert!(topic_matches("t.>.c", "t.a.c"));
        assert!(topic_matches("t.>.c", "t.a.b.c"));
        assert!(!topic_matches("t.>.c", "t.a"));
        assert!(!topic_matches("t.>.c", "t.a-b"));
        assert!(topic_matches("t.>.c", "t..c"), "> may match nothing");
        assert!(topic_matches("t.>", "t."));
        assert!(topic_matches("*.>", "a.b"));
        assert!(topic_matches("a*b.*", "axyb.c"));
        assert!(!topic_matches("a*b.*", "ab.c"));
        // Both ways agree on the usual patterns.
        for (p, t) in [
            ("a.*", "a.b"),
            ("a.*", "a.b.c"),
            ("a.>", "a.b.c"),
            ("a.>", "a."),
            ("*.x", "q.x"),
            ("*", "a-b"),
            (">", "x"),
            ("a.*.c", "a.b.c"),
        ] {
            assert_eq!(
                by_segments(p, t),
                Some(by_bytes(p.as_bytes(), t.as_bytes())),
                "{p} {t}"
            );
        }
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
