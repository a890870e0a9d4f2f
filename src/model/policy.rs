//! Access control: which applications (and users, and executables) may register or invoke which
//! methods, read or write which contexts and channels, publish or subscribe to which topics.
//!
//! A [`Policy`] is an ordered list of rules and a default; the first rule that matches the peer,
//! the action and the resource decides. The gateway narrows it to each peer ([`PeerRules`]: the
//! rules whose subject matches that peer, in order) when the peer joins. What passes through the
//! gateway (registrations, subscriptions, context mappings, relayed calls and messages) the
//! gateway checks itself; what travels peer to peer over a lane (invocations, stream requests,
//! bus messages) the *receiving* peer checks against the sender's rules, which the gateway hands
//! out with the sender's identity — so a sender's own library cannot bypass them.
//!
//! ```json
//! {"default": "allow",
//!  "rules": [
//!    {"effect": "deny",  "actions": ["register"], "resource": "Price*", "app": "viewer"},
//!    {"effect": "allow", "actions": "*", "resource": "*", "app": "pricer", "exe": "/opt/pricer/*"},
//!    {"effect": "deny",  "actions": ["channel.write"], "resource": "Red", "user": "guest"}]}
//! ```

use serde::{Deserialize, Serialize};

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

/// What a peer wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Register a method or stream (resource: the method name).
    Register,
    /// Invoke a method or subscribe to a stream (resource: the method name).
    Invoke,
    /// Publish on the bus (resource: the topic).
    Publish,
    /// Subscribe on the bus (resource: the topic pattern as subscribed).
    Subscribe,
    /// Map a context (resource: the context name; channels are `___channel___<name>`).
    ContextRead,
    /// Write a context (same resources).
    ContextWrite,
}

impl Action {
    fn bit(self) -> u8 {
        match self {
            Action::Register => 1,
            Action::Invoke => 2,
            Action::Publish => 4,
            Action::Subscribe => 8,
            Action::ContextRead => 16,
            Action::ContextWrite => 32,
        }
    }

    /// The name used in policy files and logs.
    pub fn name(self) -> &'static str {
        match self {
            Action::Register => "register",
            Action::Invoke => "invoke",
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::ContextRead => "context.read",
            Action::ContextWrite => "context.write",
        }
    }

    /// The action of a name used in logs and reports ([`Action::name`]); `None` for any other.
    pub fn from_name(name: &str) -> Option<Action> {
        [
            Action::Register,
            Action::Invoke,
            Action::Publish,
            Action::Subscribe,
            Action::ContextRead,
            Action::ContextWrite,
        ]
        .into_iter()
        .find(|a| a.name() == name)
    }

    /// Method names match case-insensitively (as io.Connect matches them); topics and
    /// contexts exactly.
    fn case_insensitive(self) -> bool {
        matches!(self, Action::Register | Action::Invoke)
    }
}

/// The prefix under which channels live as contexts.
const CHANNEL_PREFIX: &str = "___channel___";

/// Why a policy does not load.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy rule {rule}: unknown action {action:?} (register, invoke, publish, subscribe, context.read, context.write, channel.read, channel.write or *)")]
    UnknownAction { rule: usize, action: String },
    #[error("policy rule {rule}: {what}")]
    Invalid { rule: usize, what: String },
    #[error("policy: {0}")]
    Json(String),
}

/// One rule as written in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    effect: Effect,
    #[serde(default = "any_actions")]
    actions: OneOrMany,
    #[serde(default = "any")]
    resource: String,
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    exe: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn any_actions() -> OneOrMany {
    OneOrMany::One("*".into())
}

fn any() -> String {
    "*".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default = "allow")]
    default: Effect,
    #[serde(default)]
    rules: Vec<Object<RuleFile>>,
}

/// What a JSON object stands for, named when something else stands in its place.
trait Named {
    const WHAT: &'static str;
}

impl Named for PolicyFile {
    const WHAT: &'static str = r#"a policy object {"default": "allow" or "deny", "rules": [...]}"#;
}

impl Named for RuleFile {
    const WHAT: &'static str = r#"a rule object {"effect": "allow" or "deny", ...}"#;
}

/// A `T` read from a JSON object only: serde's derived structs also take an array of their
/// fields in order, so `[]` loaded as an allow-all policy and `["deny"]` as deny-all.
#[derive(Debug, Clone)]
struct Object<T>(T);

impl<'de, T: Deserialize<'de> + Named> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Named> serde::de::Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(T::WHAT)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData)).map(Object)
    }
}

fn allow() -> Effect {
    Effect::Allow
}

/// Who a rule is about (unset: anyone). Glob patterns (`*`, `?`); applications match
/// case-insensitively, users and executables exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Subject {
    app: Option<String>,
    user: Option<String>,
    exe: Option<String>,
}

/// One rule, narrowed to a peer: effect, action bits, resource pattern, and whether the
/// pattern is a channel name (matched against `___channel___<name>` contexts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRule {
    pub effect: Effect,
    actions: u8,
    resource: String,
}

/// A loaded policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    default: Effect,
    rules: Vec<(Subject, PeerRule)>,
}

impl Default for Policy {
    /// Everything allowed (no policy configured).
    fn default() -> Self {
        Policy {
            default: Effect::Allow,
            rules: Vec::new(),
        }
    }
}

/// The identity a peer's rules are chosen by.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub app: &'a str,
    pub user: &'a str,
    /// The peer's executable (from its kernel-verified pid), when known.
    pub exe: Option<&'a str>,
}

impl Policy {
    /// Loads a policy from its JSON form. (A key given twice in an object is lost when the
    /// text is parsed into a `Value`; [`Policy::from_json_str`] refuses it.)
    pub fn from_json(v: &serde_json::Value) -> Result<Policy, PolicyError> {
        let f =
            Object::<PolicyFile>::deserialize(v).map_err(|e| PolicyError::Json(e.to_string()))?;
        Policy::from_file(f.0)
    }

    /// Loads a policy from JSON text: an object, each key at most once.
    pub fn from_json_str(text: &str) -> Result<Policy, PolicyError> {
        let f: Object<PolicyFile> =
            serde_json::from_str(text).map_err(|e| PolicyError::Json(e.to_string()))?;
        Policy::from_file(f.0)
    }

    fn from_file(f: PolicyFile) -> Result<Policy, PolicyError> {
        let mut rules = Vec::with_capacity(f.rules.len());
        for (i, Object(r)) in f.rules.into_iter().enumerate() {
            let names = match r.actions {
                OneOrMany::One(a) => vec![a],
                OneOrMany::Many(v) => v,
            };
            if names.is_empty() {
                return Err(PolicyError::Invalid {
                    rule: i,
                    what: "no actions".into(),
                });
            }
            if r.resource.is_empty() {
                return Err(PolicyError::Invalid {
                    rule: i,
                    what: "empty resource".into(),
                });
            }
            // An empty pattern matches no name at all: surely not what was meant (leaving the
            // field out matches anyone).
            for (field, v) in [("app", &r.app), ("user", &r.user), ("exe", &r.exe)] {
                if v.as_deref() == Some("") {
                    return Err(PolicyError::Invalid {
                        rule: i,
                        what: format!("empty {field} (leave it out to match any)"),
                    });
                }
            }
            let subject = Subject {
                app: r.app,
                user: r.user,
                exe: r.exe,
            };
            // Channel actions become context actions on the channel's context, as a rule of
            // their own (the resource differs).
            let mut plain = 0u8;
            let mut channel = 0u8;
            for n in names {
                match n.as_str() {
                    "*" => plain |= 0x3f,
                    "register" => plain |= Action::Register.bit(),
                    "invoke" => plain |= Action::Invoke.bit(),
                    "publish" => plain |= Action::Publish.bit(),
                    "subscribe" => plain |= Action::Subscribe.bit(),
                    "context.read" => plain |= Action::ContextRead.bit(),
                    "context.write" => plain |= Action::ContextWrite.bit(),
                    "channel.read" => channel |= Action::ContextRead.bit(),
                    "channel.write" => channel |= Action::ContextWrite.bit(),
                    _ => return Err(PolicyError::UnknownAction { rule: i, action: n }),
                }
            }
            if plain != 0 {
                let rule = PeerRule {
                    effect: r.effect,
                    actions: plain,
                    resource: r.resource.clone(),
                };
                rules.push((subject.clone(), rule));
            }
            if channel != 0 {
                let rule = PeerRule {
                    effect: r.effect,
                    actions: channel,
                    resource: format!("{CHANNEL_PREFIX}{}", r.resource),
                };
                rules.push((subject, rule));
            }
        }
        Ok(Policy {
            default: f.default,
            rules,
        })
    }

    /// Whether this policy allows everything (then nobody needs to check anything).
    pub fn is_open(&self) -> bool {
        self.default == Effect::Allow && self.rules.is_empty()
    }

    /// The rules that concern `who`, in order.
    pub fn for_peer(&self, who: Who<'_>) -> PeerRules {
        let rules = self
            .rules
            .iter()
            .filter(|(s, _)| {
                s.app.as_deref().is_none_or(|p| glob(p, who.app, true))
                    && s.user.as_deref().is_none_or(|p| glob(p, who.user, false))
                    && s.exe
                        .as_deref()
                        .is_none_or(|p| who.exe.is_some_and(|e| glob(p, e, false)))
            })
            .map(|(_, r)| r.clone())
            .collect();
        PeerRules {
            default: self.default,
            rules,
        }
    }
}

impl<'de> Deserialize<'de> for Policy {
    /// As [`Policy::from_json_str`] (a policy inside a configuration file).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = Object::<PolicyFile>::deserialize(d)?;
        Policy::from_file(f.0).map_err(serde::de::Error::custom)
    }
}

/// One peer's rules: what the gateway and the peers that receive from it check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRules {
    pub default: Effect,
    pub rules: Vec<PeerRule>,
}

impl Default for PeerRules {
    fn default() -> Self {
        PeerRules {
            default: Effect::Allow,
            rules: Vec::new(),
        }
    }
}

impl PeerRules {
    /// Whether these rules allow everything.
    pub fn is_open(&self) -> bool {
        self.default == Effect::Allow && self.rules.iter().all(|r| r.effect == Effect::Allow)
    }

    /// Whether `action` on `resource` is allowed: the first matching rule decides, else the
    /// default.
    pub fn allows(&self, action: Action, resource: &str) -> bool {
        let bit = action.bit();
        for r in &self.rules {
            if r.actions & bit != 0 && glob(&r.resource, resource, action.case_insensitive()) {
                return r.effect == Effect::Allow;
            }
        }
        self.default == Effect::Allow
    }
}

/// Glob match: `*` any run of characters (also empty), `?` exactly one; everything else
/// literally. Iterative with one backtrack point, so linear-ish and never recursive; it walks
/// both strings in place (byte offsets at character boundaries), allocating nothing: it runs
/// for every rule on every relayed bus message and route.
pub fn glob(pattern: &str, text: &str, case_insensitive: bool) -> bool {
    let eq = |a: char, b: char| {
        if case_insensitive {
            a.to_lowercase().eq(b.to_lowercase())
        } else {
            a == b
        }
    };
    let at = |s: &str, i: usize| s[i..].chars().next();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while let Some(tc) = at(text, ti) {
        match at(pattern, pi) {
            Some(pc) if pc == '?' || (pc != '*' && eq(pc, tc)) => {
                pi += pc.len_utf8();
                ti += tc.len_utf8();
            }
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    // `st` is before `ti`, inside the text: one more character for the star.
                    let st = st + at(text, st).map_or(1, char::len_utf8);
                    pi = sp + 1;
                    ti = st;
                    star = Some((sp, st));
                }
                None => return false,
            },
        }
    }
    pattern[pi..].bytes().all(|b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn who<'a>(app: &'a str, user: &'a str) -> Who<'a> {
        Who {
            app,
            user,
            exe: None,
        }
    }

    /// The reading `glob` had before it walked the strings in place (char vectors): the oracle.
    /// Glob match: `*` any run of characters (also empty), `?` exactly one; everything else
    /// literally. Iterative with one backtrack point, so linear-ish and never recursive.
    fn glob_by_chars(pattern: &str, text: &str, case_insensitive: bool) -> bool {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        let eq = |a: char, b: char| {
            if case_insensitive {
                a.to_lowercase().eq(b.to_lowercase())
            } else {
                a == b
            }
        };
        let (mut pi, mut ti) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && eq(p[pi], t[ti]))) {
                pi += 1;
                ti += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, ti));
                pi += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        while pi < p.len() && p[pi] == '*' {
            pi += 1;
        }
        pi == p.len()
    }

    #[test]
    fn glob_reads_as_it_did_with_character_vectors() {
        let alphabet = ['a', 'b', 'Ä', 'ä', 'é', '.', '*', '?'];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut pick = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..20_000 {
            let mut word = |stars: bool| -> String {
                let len = pick(7);
                (0..len)
                    .map(|_| alphabet[pick(if stars { 8 } else { 6 })])
                    .collect()
            };
            let (p, t) = (word(true), word(false));
            for ci in [false, true] {
                assert_eq!(
                    glob(&p, &t, ci),
                    glob_by_chars(&p, &t, ci),
                    "{p:?} {t:?} {ci}"
                );
            }
        }
    }

    #[test]
    fn globs_match_stars_and_question_marks() {
        assert!(glob("*", "", false));
        assert!(glob("Price*", "Price.Bid", false));
        assert!(!glob("Price*", "price.Bid", false));
        assert!(glob("Price*", "price.Bid", true));
        assert!(glob("a?c", "abc", false));
        assert!(!glob("a?c", "ac", false));
        assert!(glob("*.L", "VOD.L", false));
        assert!(glob("a*b*c", "a--b--b--c", false));
        assert!(!glob("a*b*c", "a--b--b--", false));
        assert!(glob("/opt/*/bin", "/opt/x/bin", false));
    }

    #[test]
    fn the_first_matching_rule_decides_else_the_default() {
        let p = Policy::from_json(&json!({
            "default": "deny",
            "rules": [
                {"effect": "deny", "actions": ["register"], "resource": "Admin*"},
                {"effect": "allow", "actions": ["register", "invoke"], "app": "pricer"},
                {"effect": "allow", "actions": "invoke", "resource": "Price*"}
            ]
        }))
        .unwrap();
        let pricer = p.for_peer(who("Pricer", "alice"));
        assert!(pricer.allows(Action::Register, "Price"));
        assert!(
            !pricer.allows(Action::Register, "AdminReset"),
            "the earlier deny wins"
        );
        assert!(pricer.allows(Action::Invoke, "anything"));
        assert!(!pricer.allows(Action::Publish, "t"), "default deny");
        let viewer = p.for_peer(who("viewer", "bob"));
        assert!(
            viewer.allows(Action::Invoke, "price.bid"),
            "method names ignore case"
        );
        assert!(!viewer.allows(Action::Invoke, "Orders"));
        assert!(!viewer.allows(Action::Register, "Price"));
    }

    #[test]
    fn channel_actions_are_context_actions_on_the_channel_context() {
        let p = Policy::from_json(&json!({
            "rules": [{"effect": "deny", "actions": ["channel.write"], "resource": "Red", "user": "guest"}]
        }))
        .unwrap();
        let guest = p.for_peer(who("app", "guest"));
        assert!(!guest.allows(Action::ContextWrite, "___channel___Red"));
        assert!(guest.allows(Action::ContextRead, "___channel___Red"));
        assert!(
            guest.allows(Action::ContextWrite, "Red"),
            "a context named Red is not the channel"
        );
        assert!(p.for_peer(who("app", "alice")).is_open());
    }

    #[test]
    fn executables_must_match_when_a_rule_names_one() {
        let p = Policy::from_json(&json!({
            "default": "deny",
            "rules": [{"effect": "allow", "app": "pricer", "exe": "/opt/pricer/*"}]
        }))
        .unwrap();
        let real = p.for_peer(Who {
            app: "pricer",
            user: "u",
            exe: Some("/opt/pricer/bin/pricer"),
        });
        assert!(real.allows(Action::Register, "Price"));
        let impostor = p.for_peer(Who {
            app: "pricer",
            user: "u",
            exe: Some("/tmp/evil"),
        });
        assert!(!impostor.allows(Action::Register, "Price"));
        let unknown = p.for_peer(who("pricer", "u"));
        assert!(!unknown.allows(Action::Register, "Price"));
    }

    #[test]
    fn bad_policies_are_refused_with_the_rule_number() {
        let e = Policy::from_json(
            &json!({"rules": [{"effect": "allow"}, {"effect": "deny", "actions": ["frobnicate"]}]}),
        )
        .unwrap_err();
        assert_eq!(
            e,
            PolicyError::UnknownAction {
                rule: 1,
                action: "frobnicate".into()
            }
        );
        assert!(matches!(
            Policy::from_json(&json!({"rules": [{"effect": "maybe"}]})),
            Err(PolicyError::Json(_))
        ));
        assert!(matches!(
            Policy::from_json(&json!({"rules": [{"effect": "deny", "resource": ""}]})),
            Err(PolicyError::Invalid { rule: 0, .. })
        ));
        assert!(matches!(
            Policy::from_json(&json!({"rulez": []})),
            Err(PolicyError::Json(_))
        ));
        assert!(Policy::default().is_open());
    }

    #[test]
    fn malformed_policy_files_are_refused_not_read_as_something_else() {
        let refused = |text: &str| match Policy::from_json_str(text) {
            Err(e) => e.to_string(),
            Ok(p) => panic!("{text} loaded as {p:?}"),
        };
        // Arrays in place of objects (serde would read a struct's fields from them in order).
        for text in [
            "[]",
            r#"["deny"]"#,
            r#"[{"effect": "deny", "actions": "*"}]"#,
        ] {
            let e = refused(text);
            assert!(e.contains("expected a policy object"), "{text}: {e}");
        }
        let e = refused(r#"{"rules": [["deny"]]}"#);
        assert!(e.contains("expected a rule object"), "{e}");
        // A key given twice.
        let e = refused(r#"{"default": "deny", "default": "allow"}"#);
        assert!(e.contains("duplicate field `default`"), "{e}");
        let e = refused(r#"{"rules": [{"effect": "deny", "effect": "allow"}]}"#);
        assert!(e.contains("duplicate field `effect`"), "{e}");
        // Empty subject patterns, as an empty resource is.
        for field in ["app", "user", "exe"] {
            let text = format!(r#"{{"rules": [{{"effect": "deny", "{field}": ""}}]}}"#);
            assert_eq!(
                Policy::from_json_str(&text).unwrap_err(),
                PolicyError::Invalid {
                    rule: 0,
                    what: format!("empty {field} (leave it out to match any)")
                }
            );
        }
        // The same checks on a value and inside a configuration file.
        assert!(Policy::from_json(&json!([])).is_err());
        assert!(serde_json::from_str::<Policy>(r#"{"default":"deny","default":"allow"}"#).is_err());
        assert!(serde_json::from_str::<Policy>(r#"["deny"]"#).is_err());
        // What is well formed still loads.
        let p = Policy::from_json_str(r#"{"default": "deny", "rules": [{"effect": "allow"}]}"#);
        assert!(p
            .unwrap()
            .for_peer(who("a", "u"))
            .allows(Action::Invoke, "x"));
    }
}
