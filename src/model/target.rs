//! Target selection (features.md §3.3): from the servers offering a method, in discovery order
//! with ourselves first, pick the ones a target names.

use crate::wire::frame::{Instance, MethodDef, PeerId};

/// Properties an instance must have; unset fields match anything. Strings compare
/// case-insensitively. When both `peer_id` and `instance` are set, `peer_id` is ignored
/// (as io.Connect does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFilter {
    pub application: Option<String>,
    pub instance: Option<String>,
    pub pid: Option<u32>,
    pub user: Option<String>,
    pub machine: Option<String>,
    pub peer_id: Option<PeerId>,
}

impl InstanceFilter {
    /// A filter on the application name.
    pub fn application(name: impl Into<String>) -> Self {
        Self {
            application: Some(name.into()),
            ..Default::default()
        }
    }

    /// A filter on the peer id.
    pub fn peer(id: PeerId) -> Self {
        Self {
            peer_id: Some(id),
            ..Default::default()
        }
    }

    /// Whether `i` has every property set here.
    pub fn matches(&self, i: &Instance) -> bool {
        // Strings compare as io.Connect's `toLowerCase` compares them, in every script.
        let eq =
            |want: &Option<String>, have: &str| want.as_ref().is_none_or(|w| eq_lower(w, have));
        eq(&self.application, &i.application)
            && eq(&self.instance, &i.instance)
            && eq(&self.user, &i.user)
            && eq(&self.machine, &i.machine)
            && self.pid.is_none_or(|p| p == i.pid)
            && (self.instance.is_some() || self.peer_id.is_none_or(|p| p == i.peer_id))
    }
}

/// Which servers an invocation goes to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Target {
    /// Ourselves if we serve the method, else the earliest-joined server.
    #[default]
    Best,
    /// Every server, ourselves included.
    All,
    /// Every server but ourselves.
    SkipMine,
    /// Every server matching the filter.
    Instance(InstanceFilter),
    /// The union of each filter's matches, in list order (duplicates kept, as io.Connect does).
    List(Vec<InstanceFilter>),
}

impl Target {
    /// The CLI's spelling: `best`, `all`, `skip-mine`, or an application name.
    pub fn parse_cli(s: &str) -> Target {
        match s {
            "best" => Target::Best,
            "all" => Target::All,
            "skip-mine" | "skipMine" => Target::SkipMine,
            app => Target::Instance(InstanceFilter::application(app)),
        }
    }
}

impl InstanceFilter {
    /// The filter as io.Connect's clients write it: a JSON object with the set properties.
    fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        let mut text = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                o.insert(k.into(), v.as_str().into());
            }
        };
        text("application", &self.application);
        text("instance", &self.instance);
        text("user", &self.user);
        text("machine", &self.machine);
        if let Some(pid) = self.pid {
            o.insert("pid".into(), pid.into());
        }
        if let Some(p) = self.peer_id {
            o.insert("peerId".into(), p.to_string().into());
        }
        serde_json::Value::Object(o)
    }
}

/// As io.Connect's `JSON.stringify(target)` shows it in "with server filter …": `"best"`,
/// `"all"`, `"skipMine"`, `{"application":"pricer"}`, or an array of such objects.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = match self {
            Target::Best => "best".into(),
            Target::All => "all".into(),
            Target::SkipMine => "skipMine".into(),
            Target::Instance(i) => i.to_json(),
            Target::List(l) => l.iter().map(InstanceFilter::to_json).collect(),
        };
        write!(f, "{v}")
    }
}

/// Whether a method definition answers to `name`: case-insensitive as io.Connect's
/// `toLowerCase` comparison, for every script (`Ärger` is `ärger`), as discovery groups
/// methods, so a name listed with several servers reaches them all. ASCII names (the usual
/// case) compare without lowering anything.
pub fn method_matches(name: &str, def: &MethodDef) -> bool {
    eq_lower(&def.name, name)
}

/// Whether `a` and `b` are equal lowercased, in every script (ASCII keeps its fast path).
fn eq_lower(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    a.chars()
        .flat_map(char::to_lowercase)
        .eq(b.chars().flat_map(char::to_lowercase))
}

/// Applies `target` to `candidates` (servers of the method, ourselves first if we serve it,
/// then in the order they joined). `me` is our own peer id.
pub fn select<'a>(target: &Target, me: PeerId, candidates: &[&'a Instance]) -> Vec<&'a Instance> {
    match target {
        // Every native peer is local to its gateway, so "first local" is simply "first".
        Target::Best => candidates.first().copied().into_iter().collect(),
        Target::All => candidates.to_vec(),
        Target::SkipMine => candidates
            .iter()
            .copied()
            .filter(|i| i.peer_id != me)
            .collect(),
        Target::Instance(f) => candidates
            .iter()
            .copied()
            .filter(|i| f.matches(i))
            .collect(),
        Target::List(fs) => fs
            .iter()
            .flat_map(|f| candidates.iter().copied().filter(move |i| f.matches(i)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(app: &str, id: u64) -> Instance {
        Instance {
            application: app.into(),
            instance: format!("i-{id}"),
            pid: 100 + id as u32,
            user: "u".into(),
            machine: "m".into(),
            peer_id: PeerId(id),
        }
    }

    #[test]
    fn best_is_the_first_candidate() {
        let (a, b) = (inst("A", 1), inst("B", 2));
        assert_eq!(select(&Target::Best, PeerId(9), &[&a, &b]), vec![&a]);
        assert!(select(&Target::Best, PeerId(9), &[]).is_empty());
    }

    #[test]
    fn all_skip_mine_and_filters() {
        let (me, a, b) = (inst("Me", 1), inst("Pricer", 2), inst("pricer", 3));
        let c = [&me, &a, &b];
        assert_eq!(select(&Target::All, PeerId(1), &c).len(), 3);
        assert_eq!(select(&Target::SkipMine, PeerId(1), &c), vec![&a, &b]);
        assert_eq!(
            select(&Target::parse_cli("PRICER"), PeerId(1), &c),
            vec![&a, &b]
        );
        let by_pid = Target::Instance(InstanceFilter {
            pid: Some(103),
            ..Default::default()
        });
        assert_eq!(select(&by_pid, PeerId(1), &c), vec![&b]);
        let list = Target::List(vec![
            InstanceFilter::peer(PeerId(3)),
            InstanceFilter::application("me"),
        ]);
        assert_eq!(select(&list, PeerId(1), &c), vec![&b, &me]);
    }

    #[test]
    fn instance_wins_over_peer_id() {
        let a = inst("A", 1);
        let f = InstanceFilter {
            instance: Some("I-1".into()),
            peer_id: Some(PeerId(77)),
            ..Default::default()
        };
        assert!(f.matches(&a));
    }

    #[test]
    fn method_names_match_case_insensitively() {
        assert!(method_matches("sum", &MethodDef::new("Sum")));
        assert!(!method_matches("sum", &MethodDef::new("Summ")));
        // Every script, as discovery groups them.
        assert!(method_matches("ärger", &MethodDef::new("Ärger")));
        assert!(method_matches("ΣΟΦΊΑ", &MethodDef::new("σοφία")));
        assert!(!method_matches("ärger", &MethodDef::new("Arger")));
    }

    #[test]
    fn filter_strings_match_case_insensitively_in_every_script() {
        let a = inst("Ünï", 1);
        for want in ["ünï", "ÜNÏ", "Ünï"] {
            assert!(InstanceFilter::application(want).matches(&a), "{want}");
        }
        assert!(!InstanceFilter::application("uni").matches(&a));
    }
}
