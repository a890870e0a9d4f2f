//! Colour channels (features.md §6) on the gateway: their definitions (from the config, or a
//! default set), the contexts `___channel___<name>` that hold them, and read/write restrictions
//! per application or user, enforced by what the gateway hands out: a peer that may not read a
//! channel gets no segment, one that may not write gets a read-only descriptor (its mapping
//! cannot be written, whatever its client library does).

use super::registry::Registry;
use crate::model::context::ContextOp;
use crate::wire::frame::PeerId;
use crate::wire::{Map, Value};
use serde::Deserialize;
use std::time::Duration;

/// Prefix of the contexts that hold channels.
pub const CHANNEL_PREFIX: &str = "___channel___";

/// A channel: a name and metadata (`meta.color` at least).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChannelDef {
    pub name: String,
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// Who may read or write a channel. `application`/`user` unset match everyone; the most
/// specific matching rule (by count of fields set, then the last in the list) wins.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChannelRestriction {
    #[serde(default)]
    pub application: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Channel name, or `*` for every channel.
    pub channel: String,
    #[serde(default = "yes")]
    pub read: bool,
    #[serde(default = "yes")]
    pub write: bool,
}

fn yes() -> bool {
    true
}

/// The channel part of the gateway's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelConfig {
    pub channels: Vec<ChannelDef>,
    pub restrictions: Vec<ChannelRestriction>,
}

impl Default for ChannelConfig {
    /// Eight colours, each also an FDC3 user channel (`fdc3.channel.1` … `fdc3.channel.8`).
    fn default() -> Self {
        let colours = [
            ("Red", "#F44336"),
            ("Orange", "#FF9800"),
            ("Yellow", "#FFEB3B"),
            ("Green", "#4CAF50"),
            ("Cyan", "#00BCD4"),
            ("Blue", "#2196F3"),
            ("Magenta", "#E91E63"),
            ("Purple", "#9C27B0"),
        ];
        let channels = colours
            .iter()
            .enumerate()
            .map(|(i, (name, color))| ChannelDef {
                name: (*name).to_string(),
                meta: serde_json::json!({
                    "color": color,
                    "fdc3": {
                        "id": format!("fdc3.channel.{}", i + 1),
                        "displayMetadata": {"name": format!("Channel {}", i + 1), "color": color, "glyph": format!("{}", i + 1)}
                    }
                }),
            })
            .collect();
        Self {
            channels,
            restrictions: Vec::new(),
        }
    }
}

impl ChannelConfig {
    /// What `application` of `user` may do with channel `channel`: (read, write).
    pub fn access(&self, application: &str, user: &str, channel: &str) -> (bool, bool) {
        let mut best: Option<(usize, &ChannelRestriction)> = None;
        for r in &self.restrictions {
            let app_ok = r
                .application
                .as_deref()
                .is_none_or(|a| a.eq_ignore_ascii_case(application));
            let user_ok = r.user.as_deref().is_none_or(|u| u == user);
            let chan_ok = r.channel == "*" || r.channel == channel;
            if app_ok && user_ok && chan_ok {
                let score = r.application.is_some() as usize
                    + r.user.is_some() as usize
                    + (r.channel != "*") as usize;
                if best.is_none_or(|(s, _)| score >= s) {
                    best = Some((score, r));
                }
            }
        }
        best.map_or((true, true), |(_, r)| (r.read, r.write))
    }
}

/// The channel name behind a context name, if it is a channel's context.
pub fn channel_of(context: &str) -> Option<&str> {
    context.strip_prefix(CHANNEL_PREFIX)
}

/// The gateway's writer token (peers' tokens are their peer ids, which start at 1).
pub(crate) const GATEWAY_TOKEN: u64 = u64::MAX;

impl Registry {
    /// Creates the channel contexts of `user` that do not exist yet, each holding
    /// `{name, meta, data: {}}`.
    pub(crate) fn ensure_channels(&mut self, user: &str) {
        let defs = self.channels.channels.clone();
        for def in defs {
            let name = format!("{CHANNEL_PREFIX}{}", def.name);
            if self.contexts.find(user, &name).is_some() {
                continue;
            }
            let id = match self.new_context(
                user,
                &name,
                crate::wire::frame::ContextLifetime::Retained,
                None,
            ) {
                Ok(id) => id,
                Err((_, m)) => {
                    crate::log::warn(format_args!("cannot create channel {}: {m}", def.name));
                    continue;
                }
            };
            let mut value = Map::new();
            value.insert("name".into(), Value::from(def.name.as_str()));
            value.insert("meta".into(), Value::from(def.meta.clone()));
            value.insert("data".into(), Value::map());
            if let Some(c) = self.contexts.get(id) {
                let max = self.limits.max_payload as usize;
                if let Err(e) = crate::store::context::write(
                    &c.store,
                    GATEWAY_TOKEN,
                    &ContextOp::Set(value),
                    None,
                    max,
                    Duration::from_secs(1),
                    None,
                ) {
                    crate::log::warn(format_args!("cannot initialise channel {}: {e}", def.name));
                }
            }
            self.announce_context(id);
        }
    }

    /// What `peer` may do with context `name`: (read, write).
    pub(crate) fn context_access(&self, peer: PeerId, name: &str) -> (bool, bool) {
        let Some(p) = self.peers.get(&peer) else {
            return (false, false);
        };
        // The channel restrictions (io.Connect's feature) and the gateway's policy must both
        // allow it.
        let (read, write) = match channel_of(name) {
            Some(ch) => self
                .channels
                .access(&p.identity.application, &p.identity.user, ch),
            None => (true, true),
        };
        let read = read
            && p.rules
                .allows(crate::model::policy::Action::ContextRead, name);
        let write = write
            && p.rules
                .allows(crate::model::policy::Action::ContextWrite, name);
        (read, write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(app: Option<&str>, channel: &str, read: bool, write: bool) -> ChannelRestriction {
        ChannelRestriction {
            application: app.map(str::to_string),
            user: None,
            channel: channel.into(),
            read,
            write,
        }
    }

    #[test]
    fn the_most_specific_restriction_wins() {
        let cfg = ChannelConfig {
            channels: Vec::new(),
            restrictions: vec![
                r(None, "*", true, false),
                r(Some("Editor"), "*", true, true),
                r(Some("Editor"), "Red", false, false),
            ],
        };
        assert_eq!(cfg.access("Viewer", "u", "Red"), (true, false));
        assert_eq!(cfg.access("editor", "u", "Blue"), (true, true));
        assert_eq!(cfg.access("Editor", "u", "Red"), (false, false));
        assert_eq!(
            ChannelConfig::default().access("x", "u", "Red"),
            (true, true)
        );
    }

    #[test]
    fn default_channels_have_colours_and_fdc3_ids() {
        let d = ChannelConfig::default();
        assert_eq!(d.channels.len(), 8);
        assert!(d.channels.iter().all(|c| c.meta["color"].is_string()));
        assert_eq!(d.channels[0].meta["fdc3"]["id"], "fdc3.channel.1");
        assert_eq!(channel_of("___channel___Red"), Some("Red"));
        assert_eq!(channel_of("Red"), None);
    }
}
