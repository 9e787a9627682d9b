//! The swarm's own model of Jetstream's subscriber filters, written from the documented
//! semantics (not from the relay's code) so it can judge the relay.
//!
//! Semantics (official Jetstream v1): `wantedCollections` matches a commit's collection exactly,
//! or by prefix for values ending in `.*` (the prefix keeps the dot); identity and account events
//! always pass it. `wantedDids` applies to every kind. `maxMessageSizeBytes` (≤ 0 or unparsable =
//! no limit) skips events whose bytes *as sent* exceed it — for compressed clients that is the
//! compressed size, which the swarm cannot predict exactly, so there the verdict for events whose
//! plain size exceeds the limit is [`Verdict::Either`]. An empty list disables that filter.

use crate::mock::Generator;
use std::collections::HashSet;

/// Whether an event must, must not, or may be delivered to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It matches: it must be delivered.
    Deliver,
    /// It does not match: delivering it is a bug.
    Skip,
    /// Depends on the compressed size: both outcomes are correct.
    Either,
}

/// A subscriber's filter options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Exact collection names wanted (empty with no prefixes = all).
    collections: HashSet<String>,
    /// Collection prefixes (from `foo.bar.*`, stored as `foo.bar.`).
    prefixes: Vec<String>,
    /// DIDs wanted (empty = all).
    dids: HashSet<String>,
    /// Size limit in bytes (`None` = unlimited).
    max_size: Option<u64>,
    /// Whether the client receives zstd-compressed frames (changes what "size" means).
    compressed: bool,
}

impl Filter {
    /// The filter a URL query string asks for.
    pub fn from_query(query: &str) -> Filter {
        let mut f = Filter::default();
        for (k, v) in crate::mock::url_query_pairs(query) {
            match k.as_str() {
                "wantedCollections" => f.add_collection(&v),
                "wantedDids" => {
                    f.dids.insert(v);
                }
                "maxMessageSizeBytes" => f.max_size = parse_size(&v),
                "compress" => f.compressed = v == "true",
                _ => {}
            }
        }
        f
    }

    /// Applies an `options_update` message the client sends, if `text` is one. Returns whether it
    /// was. Like the official server, the update replaces all three filters (absent = disabled).
    pub fn apply_options_update(&mut self, text: &str) -> bool {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return false;
        };
        if v.get("type").and_then(|t| t.as_str()) != Some("options_update") {
            return false;
        }
        let p = &v["payload"];
        self.collections.clear();
        self.prefixes.clear();
        self.dids.clear();
        let strings = |key: &str| -> Vec<String> {
            p[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        for c in strings("wantedCollections") {
            self.add_collection(&c);
        }
        self.dids.extend(strings("wantedDids"));
        self.max_size = p["maxMessageSizeBytes"]
            .as_i64()
            .and_then(|n| if n > 0 { Some(n as u64) } else { None });
        true
    }

    /// Adds one `wantedCollections` value.
    fn add_collection(&mut self, c: &str) {
        match c.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('.') => self.prefixes.push(prefix.to_string()),
            _ => {
                self.collections.insert(c.to_string());
            }
        }
    }

    /// True when every event passes (the full stream).
    pub fn is_everything(&self) -> bool {
        self.collections.is_empty()
            && self.prefixes.is_empty()
            && self.dids.is_empty()
            && self.max_size.is_none()
    }

    /// Whether the client receives compressed frames.
    pub fn compressed(&self) -> bool {
        self.compressed
    }

    /// Whether `collection` passes the wantedCollections filter.
    fn collection_ok(&self, collection: &str) -> bool {
        (self.collections.is_empty() && self.prefixes.is_empty())
            || self.collections.contains(collection)
            || self.prefixes.iter().any(|p| collection.starts_with(p))
    }

    /// Verdict on event `seq` ignoring its size; `sized` then decides the size part.
    fn content_ok(&self, generator: &Generator, seq: u64) -> bool {
        let (kind, collection) =
            Generator::template_kind_and_collection(Generator::template_index(seq));
        if kind == "commit" {
            if let Some(c) = collection {
                if !self.collection_ok(c) {
                    return false;
                }
            }
        }
        self.dids.is_empty() || self.dids.contains(&generator.did_for(seq))
    }

    /// Verdict on event `seq`, assuming its `time_us` has as many digits as `time_us`.
    pub fn verdict(&self, generator: &Generator, seq: u64, time_us: i64) -> Verdict {
        if !self.content_ok(generator, seq) {
            return Verdict::Skip;
        }
        let Some(max) = self.max_size else {
            return Verdict::Deliver;
        };
        let plain = generator.event_len(seq, time_us) as u64;
        match (plain <= max, self.compressed) {
            (true, _) => Verdict::Deliver,
            (false, false) => Verdict::Skip,
            // Compression only ever shrinks JSON events, so a plain size within the limit means
            // the compressed one is too; above it, only the relay's compressor knows.
            (false, true) => Verdict::Either,
        }
    }

    /// Checks a received event against the filter: its content must match, and its size as
    /// sent (`sent_len`: payload bytes of the frame) must respect the limit.
    pub fn admits_received(&self, generator: &Generator, seq: u64, sent_len: usize) -> bool {
        self.content_ok(generator, seq) && self.max_size.is_none_or(|m| sent_len as u64 <= m)
    }
}

/// `maxMessageSizeBytes` like Go's `Atoi` followed by `> 0`: anything else means no limit.
fn parse_size(v: &str) -> Option<u64> {
    match v.parse::<i64>() {
        Ok(n) if n > 0 => Some(n as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::TEMPLATE_COUNT;

    /// First seq (from `from`) whose template has this kind/collection.
    fn seq_with(kind: &str, collection: Option<&str>) -> u64 {
        (0..TEMPLATE_COUNT as u64)
            .find(|&s| {
                Generator::template_kind_and_collection(Generator::template_index(s))
                    == (kind, collection)
            })
            .unwrap()
    }

    #[test]
    fn full_stream_passes_everything() {
        let g = Generator::new(1, 10);
        let f = Filter::from_query("cursor=5");
        assert!(f.is_everything());
        for s in 0..500 {
            assert_eq!(f.verdict(&g, s, 1), Verdict::Deliver);
        }
    }

    #[test]
    fn collections_exact_prefix_and_non_commits() {
        let g = Generator::new(1, 10);
        let like = seq_with("commit", Some("app.bsky.feed.like"));
        let post = seq_with("commit", Some("app.bsky.feed.post"));
        let follow = seq_with("commit", Some("app.bsky.graph.follow"));
        let teal = seq_with("commit", Some("fm.teal.alpha.actor.status"));
        let identity = seq_with("identity", None);
        let account = seq_with("account", None);

        let f = Filter::from_query("wantedCollections=app.bsky.feed.like");
        assert_eq!(f.verdict(&g, like, 1), Verdict::Deliver);
        assert_eq!(f.verdict(&g, post, 1), Verdict::Skip);
        assert_eq!(f.verdict(&g, identity, 1), Verdict::Deliver);
        assert_eq!(f.verdict(&g, account, 1), Verdict::Deliver);

        let f = Filter::from_query(
            "wantedCollections=app.bsky.feed.*&wantedCollections=fm.teal.alpha.actor.status",
        );
        assert_eq!(f.verdict(&g, like, 1), Verdict::Deliver);
        assert_eq!(f.verdict(&g, post, 1), Verdict::Deliver);
        assert_eq!(f.verdict(&g, follow, 1), Verdict::Skip);
        assert_eq!(f.verdict(&g, teal, 1), Verdict::Deliver);

        // "app.bsky.feed" (no .*) is an exact name that matches nothing; a prefix keeps its dot
        // so "app.bsky.f.*" must not match "app.bsky.feed.like".
        let f =
            Filter::from_query("wantedCollections=app.bsky.feed&wantedCollections=app.bsky.f.*");
        assert_eq!(f.verdict(&g, like, 1), Verdict::Skip);
        assert_eq!(f.verdict(&g, identity, 1), Verdict::Deliver);
    }

    #[test]
    fn dids_apply_to_every_kind() {
        let g = Generator::new(5, 1000);
        let identity = seq_with("identity", None);
        let target = g.did_for(identity);
        let q = format!("wantedDids={}", target.replace(':', "%3A"));
        let f = Filter::from_query(&q);
        assert_eq!(f.verdict(&g, identity, 1), Verdict::Deliver);
        let mut delivered = 0;
        for s in 0..200_000u64 {
            let v = f.verdict(&g, s, 1);
            assert_eq!(v == Verdict::Deliver, g.did_for(s) == target, "seq {s}");
            delivered += usize::from(v == Verdict::Deliver);
        }
        assert!((100..400).contains(&delivered), "{delivered}");
        // An identity event of another DID is skipped even though it has no collection.
        let other = (identity..)
            .step_by(TEMPLATE_COUNT)
            .find(|&s| g.did_for(s) != target)
            .unwrap();
        assert_eq!(f.verdict(&g, other, 1), Verdict::Skip);
    }

    #[test]
    fn size_limit_plain_and_compressed() {
        let g = Generator::new(1, 10);
        let t = 1_783_175_888_000_000;
        let len = g.event_len(0, t) as u64;
        let f = Filter::from_query(&format!("maxMessageSizeBytes={len}"));
        assert_eq!(f.verdict(&g, 0, t), Verdict::Deliver, "equal size passes");
        let f = Filter::from_query(&format!("maxMessageSizeBytes={}", len - 1));
        assert_eq!(f.verdict(&g, 0, t), Verdict::Skip);
        assert!(!f.admits_received(&g, 0, len as usize));
        assert!(f.admits_received(&g, 0, len as usize - 1));
        let f = Filter::from_query(&format!("maxMessageSizeBytes={}&compress=true", len - 1));
        assert_eq!(f.verdict(&g, 0, t), Verdict::Either);
        for junk in ["0", "-5", "abc", ""] {
            let f = Filter::from_query(&format!("maxMessageSizeBytes={junk}"));
            assert!(f.is_everything(), "{junk}");
        }
    }

    #[test]
    fn options_update_replaces_filters() {
        let g = Generator::new(1, 10);
        let like = seq_with("commit", Some("app.bsky.feed.like"));
        let post = seq_with("commit", Some("app.bsky.feed.post"));
        let mut f = Filter::from_query("wantedCollections=app.bsky.feed.like&compress=true");
        assert!(!f.apply_options_update("{\"type\":\"hello\"}"));
        assert!(!f.apply_options_update("not json"));
        assert!(f.apply_options_update(
            r#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.post"],"wantedDids":[],"maxMessageSizeBytes":0}}"#
        ));
        assert_eq!(f.verdict(&g, like, 1), Verdict::Skip);
        assert_eq!(f.verdict(&g, post, 1), Verdict::Deliver);
        assert!(f.compressed(), "compression is fixed for the connection");
        assert!(f.apply_options_update(r#"{"type":"options_update","payload":{}}"#));
        assert!(f.is_everything());
    }
}
