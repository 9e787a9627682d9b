//! Jetstream v1 subscriber options: what a client asks for and which events it gets.
//!
//! A client states its filters in the `/subscribe` query string and may replace them later with
//! an `options_update` text message. Both paths end in a validated, canonical
//! [`SubscriberOptions`] whose predicates decide, per event, whether the client receives it.
//! Behaviour follows the official Go server (`pkg/server/{server,subscriber}.go`), except where
//! the project is deliberately stricter or fixes an official bug; each such place says so.
//!
//! The relay keeps one shared log per distinct *shape* (collections filter, size limit,
//! compression): [`ShapeKey`] is the canonical key of that log. `wantedDids` is not part of the
//! shape; it is applied per client. Which clients get a shape at all is decided by
//! [`SubscriberOptions::serving`]: shape keys are clients' to choose, so only canonical ones
//! get a log of their own (see there).

use std::cmp::Ordering;
use std::fmt;

use serde_json::Value;

use crate::encoding::Encoding;
use crate::event::{EventKind, MAX_EVENT_BYTES};
use crate::wire::KindSet;

/// Why: bounds per-client filter size and matching work; the official server's limit.
pub const MAX_WANTED_COLLECTIONS: usize = 100;

/// Why: bounds per-client memory and lookup cost; the official server's limit.
pub const MAX_WANTED_DIDS: usize = 10_000;

/// Why: bounds per-client memory and parsing work; 10,000 DIDs ≈ 400 KB of JSON fits comfortably.
pub const MAX_OPTIONS_UPDATE_BYTES: usize = 1 << 20;

/// Why: a close frame carries at most 125 payload bytes, 2 of them the status code; a reason
/// longer than that makes the close frame itself invalid (the official server then sends none).
pub const MAX_CLOSE_REASON_BYTES: usize = 120;

/// Why: a metrics label must stay short for dashboards and cardinality tooling.
pub const MAX_SHAPE_LABEL_BYTES: usize = 80;

/// Why: atproto NSID syntax limit (253-byte authority + `.` + 63-byte name).
const MAX_NSID_BYTES: usize = 317;
/// Why: atproto NSID syntax limit on the domain authority (a DNS name).
const MAX_AUTHORITY_BYTES: usize = 253;
/// Why: atproto NSID syntax limit on one segment (a DNS label).
const MAX_SEGMENT_BYTES: usize = 63;
/// Why: atproto DID syntax limit.
const MAX_DID_BYTES: usize = 2048;

/// One entry of `wantedCollections`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CollectionPattern {
    /// A full collection NSID, matched exactly (case-sensitive, like the official server).
    Exact(String),
    /// A namespace: the value before `.*`, stored with its trailing `.` (e.g. `app.bsky.graph.`)
    /// so that matching is a plain byte-prefix test that cannot match `app.bsky.graphx`.
    Prefix(String),
}

impl CollectionPattern {
    /// Parses a `wantedCollections` value: a full NSID, or a namespace prefix ending in `.*`.
    ///
    /// The part before `.*` must be a complete domain authority in NSID syntax: at least two
    /// segments (the atproto NSID spec's minimum for an authority), each a valid authority
    /// segment (letters, digits, hyphens; not starting or ending with a hyphen; the first not
    /// starting with a digit; 1–63 bytes), 253 bytes at most. So `app.bsky.*` and
    /// `app.bsky.graph.*` are accepted; `*`, `.*`, `app.*`, `app.bsky.graph.fo*` and
    /// `app..bsky.*` are not. The official server accepts any value ending in `.*` unchecked.
    pub fn parse(value: &str) -> Option<Self> {
        if let Some(authority) = value.strip_suffix(".*") {
            return is_valid_nsid_prefix(authority)
                .then(|| CollectionPattern::Prefix(format!("{authority}.")));
        }
        is_valid_nsid(value).then(|| CollectionPattern::Exact(value.to_owned()))
    }

    /// Whether a commit to `collection` matches this pattern.
    pub fn matches(&self, collection: &str) -> bool {
        match self {
            CollectionPattern::Exact(c) => c == collection,
            CollectionPattern::Prefix(p) => collection.starts_with(p.as_str()),
        }
    }

    /// Whether every collection this pattern matches is also matched by `other`.
    fn covered_by(&self, other: &CollectionPattern) -> bool {
        match (self, other) {
            (_, CollectionPattern::Exact(_)) => self == other,
            (CollectionPattern::Exact(c), CollectionPattern::Prefix(p))
            | (CollectionPattern::Prefix(c), CollectionPattern::Prefix(p)) => {
                c.starts_with(p.as_str())
            }
        }
    }
}

impl fmt::Display for CollectionPattern {
    /// The form a client writes: `app.bsky.feed.post` or `app.bsky.*`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CollectionPattern::Exact(c) => f.write_str(c),
            CollectionPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// First byte of a segment allowed by `first_may_be_digit`, rest letters/digits/hyphens, no
/// trailing hyphen, 1–63 bytes: a DNS label as the NSID spec restricts it.
fn is_authority_segment(segment: &str, first_may_be_digit: bool) -> bool {
    let b = segment.as_bytes();
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
        return false;
    };
    b.len() <= MAX_SEGMENT_BYTES
        && (first.is_ascii_alphabetic() || (first_may_be_digit && first.is_ascii_digit()))
        && last != b'-'
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
}

/// The NSID name segment: a letter, then letters and digits, 1–63 bytes.
fn is_name_segment(segment: &str) -> bool {
    let b = segment.as_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_alphabetic())
        && b.len() <= MAX_SEGMENT_BYTES
        && b.iter().all(u8::is_ascii_alphanumeric)
}

/// A complete NSID domain authority (reversed domain), at least two segments.
fn is_valid_nsid_prefix(authority: &str) -> bool {
    authority.len() <= MAX_AUTHORITY_BYTES
        && authority.split('.').count() >= 2
        && authority
            .split('.')
            .enumerate()
            .all(|(i, s)| is_authority_segment(s, i > 0))
}

/// A full NSID per the current atproto spec (authority + name; the name may contain digits, a
/// superset of what the official server's older validator accepted).
fn is_valid_nsid(value: &str) -> bool {
    if value.len() > MAX_NSID_BYTES {
        return false;
    }
    match value.rsplit_once('.') {
        Some((authority, name)) => is_valid_nsid_prefix(authority) && is_name_segment(name),
        None => false,
    }
}

/// atproto DID syntax: `did:<method>:<id>`, method lowercase letters, id of
/// `[A-Za-z0-9._:%-]` not ending in `:` or `%`, 2,048 bytes at most (the official validator).
pub fn is_valid_did(did: &str) -> bool {
    if did.len() > MAX_DID_BYTES {
        return false;
    }
    let Some(rest) = did.strip_prefix("did:") else {
        return false;
    };
    let Some((method, id)) = rest.split_once(':') else {
        return false;
    };
    !method.is_empty()
        && method.bytes().all(|c| c.is_ascii_lowercase())
        && matches!(id.as_bytes().last(), Some(c) if c.is_ascii_alphanumeric() || b"._-".contains(c))
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._:%-".contains(&c))
}

/// A client's filters, validated and in canonical form (equal filters compare equal).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriberOptions {
    /// Commits outside these collections are not sent; empty = all collections. Sorted,
    /// deduplicated, and without patterns another pattern already covers.
    pub wanted_collections: Vec<CollectionPattern>,
    /// Events of other repositories are not sent; empty = all. Sorted and deduplicated.
    pub wanted_dids: Vec<String>,
    /// Events whose sent form (compressed if the client asked for it) is longer are skipped;
    /// `None` = no limit.
    pub max_message_size: Option<u32>,
}

impl SubscriberOptions {
    /// Validates raw option values in the official server's order: each collection, then each
    /// DID, then the DID count, then the collection count (counted after deduplication).
    pub fn new<C, D>(
        wanted_collections: &[C],
        wanted_dids: &[D],
        max_message_size: Option<u32>,
    ) -> Result<Self, OptionsError>
    where
        C: AsRef<str>,
        D: AsRef<str>,
    {
        let mut collections = Vec::with_capacity(wanted_collections.len());
        for raw in wanted_collections {
            let raw = raw.as_ref();
            let pattern = CollectionPattern::parse(raw)
                .ok_or_else(|| OptionsError::InvalidCollection(raw.to_owned()))?;
            collections.push(pattern);
        }
        let mut dids = Vec::with_capacity(wanted_dids.len());
        for raw in wanted_dids {
            let raw = raw.as_ref();
            if !is_valid_did(raw) {
                return Err(OptionsError::InvalidDid(raw.to_owned()));
            }
            dids.push(raw.to_owned());
        }
        dids.sort_unstable();
        dids.dedup();
        if dids.len() > MAX_WANTED_DIDS {
            return Err(OptionsError::TooManyDids(dids.len()));
        }
        collections.sort_unstable();
        collections.dedup();
        if collections.len() > MAX_WANTED_COLLECTIONS {
            return Err(OptionsError::TooManyCollections(collections.len()));
        }
        Ok(Self {
            wanted_collections: minimize(collections),
            wanted_dids: dids,
            max_message_size: max_message_size.filter(|&m| m > 0),
        })
    }

    /// Whether an event of `kind` (with `collection` for commits) passes `wantedCollections`.
    /// Identity and account events always pass; so does a commit without a collection, like
    /// the official server's empty-collection case.
    pub fn collection_allowed(&self, kind: EventKind, collection: Option<&str>) -> bool {
        collections_allow(&self.wanted_collections, kind, collection)
    }

    /// Whether an event of repository `did` passes `wantedDids` (applies to every kind).
    pub fn did_allowed(&self, did: &str) -> bool {
        self.wanted_dids.is_empty()
            || self
                .wanted_dids
                .binary_search_by(|d| d.as_str().cmp(did))
                .is_ok()
    }

    /// Whether a message of `sent_len` bytes (as sent: compressed for compressed clients) is
    /// within `maxMessageSizeBytes`.
    pub fn size_allowed(&self, sent_len: usize) -> bool {
        size_allows(self.max_message_size, sent_len)
    }

    /// How a client of `encoding` with these options and `kinds` is served. Shapes cost the
    /// relay a log (disk writes, a ring) per distinct key, and keys are clients' to choose, so
    /// only *canonical* keys get one, and a client never receives anything but exactly what it
    /// asked for:
    /// - no filter (after dropping a size limit no frame can exceed): the base log;
    /// - `wantedDids`: the per-client walk (DIDs are not part of a shape);
    /// - a size limit without collections: the walk. Nearly every event passes such a
    ///   filter, so the walk sends long runs straight from the base log, and a shape would be
    ///   a near-copy of the whole feed (one per distinct limit: the shape-exhaustion attack);
    /// - collections with a size limit that is not a power of two: the walk. Near-identical
    ///   limits (1048575, 1048574, …) cannot share a log exactly — a larger one would carry
    ///   events a smaller one must skip — so they share none;
    /// - anything else (collections, optionally a power-of-two limit; or only a v2 kind
    ///   subset, of which there are few): the shape of its key.
    pub fn serving(&self, encoding: Encoding, kinds: KindSet) -> Serving {
        if !self.wanted_dids.is_empty() {
            return Serving::Walk;
        }
        let key = self.shape_key(encoding, kinds);
        if key.is_unfiltered() {
            return Serving::Base;
        }
        match (key.collections.is_empty(), key.max_message_size) {
            (true, Some(_)) => Serving::Walk,
            (false, Some(max)) if !max.is_power_of_two() => Serving::Walk,
            _ => Serving::Shape(key),
        }
    }

    /// The key of the shared log a client of `encoding` with these options and `kinds` can
    /// read from (everything but `wantedDids`). v1 clients pass [`KindSet::V1`].
    pub fn shape_key(&self, encoding: Encoding, kinds: KindSet) -> ShapeKey {
        // A limit no frame can exceed filters nothing; dropping it merges equivalent shapes.
        let largest_frame = match encoding {
            Encoding::V1Json => MAX_EVENT_BYTES,
            Encoding::V1Zstd => crate::compress::compressed_len_bound(MAX_EVENT_BYTES),
            Encoding::V2Json | Encoding::V2Zstd => crate::wire::MAX_V2_FRAME_BYTES,
        };
        ShapeKey {
            encoding,
            kinds,
            collections: self.wanted_collections.clone(),
            max_message_size: self
                .max_message_size
                .filter(|&m| usize::try_from(m).is_ok_and(|m| m < largest_frame)),
        }
    }
}

/// Drops patterns covered by another one (`app.bsky.feed.post` or `app.bsky.feed.*` under
/// `app.bsky.*`) from a sorted, deduplicated list. At most 100 entries: quadratic is fine.
fn minimize(patterns: Vec<CollectionPattern>) -> Vec<CollectionPattern> {
    let keep: Vec<bool> = patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            !patterns
                .iter()
                .enumerate()
                .any(|(j, q)| i != j && p.covered_by(q))
        })
        .collect();
    patterns
        .into_iter()
        .zip(keep)
        .filter_map(|(p, keep)| keep.then_some(p))
        .collect()
}

fn collections_allow(
    patterns: &[CollectionPattern],
    kind: EventKind,
    collection: Option<&str>,
) -> bool {
    let Some(collection) = collection else {
        return true;
    };
    if patterns.is_empty() || kind != EventKind::Commit {
        return true;
    }
    // Canonical order puts every Exact before every Prefix, each sorted.
    let prefixes_start = patterns.partition_point(|p| matches!(p, CollectionPattern::Exact(_)));
    let (exact, prefixes) = patterns.split_at(prefixes_start);
    exact
        .binary_search_by(|p| match p {
            CollectionPattern::Exact(c) => c.as_str().cmp(collection),
            CollectionPattern::Prefix(_) => Ordering::Greater,
        })
        .is_ok()
        || prefixes.iter().any(|p| p.matches(collection))
}

fn size_allows(max: Option<u32>, sent_len: usize) -> bool {
    max.is_none_or(|m| u64::try_from(sent_len).is_ok_and(|len| len <= u64::from(m)))
}

/// How a client is served (see [`SubscriberOptions::serving`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serving {
    /// Unfiltered: the base log of its encoding, contiguously.
    Base,
    /// Its shape's shared log (created on first use if the relay allows; if not, the walk).
    Shape(ShapeKey),
    /// Filtered per client over the base log (the index walk).
    Walk,
}

/// Canonical key of a shared per-shape log: two clients with equal keys receive exactly the
/// same frames (before per-client `wantedDids` filtering).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShapeKey {
    /// The frames it carries (wire and compression).
    pub encoding: Encoding,
    /// The kinds it carries (`kinds` on v2; every v1 kind on v1).
    pub kinds: KindSet,
    /// The canonical `wantedCollections` (empty = all).
    pub collections: Vec<CollectionPattern>,
    /// The size limit, `None` when absent or too large to ever apply: on the frame as sent
    /// for v1 (compressed for compressed clients), on the uncompressed message for v2.
    pub max_message_size: Option<u32>,
}

impl ShapeKey {
    /// Whether this key filters nothing: its clients read the base log of its encoding.
    pub fn is_unfiltered(&self) -> bool {
        self.collections.is_empty()
            && self.max_message_size.is_none()
            && self.kinds == KindSet::all_for(self.encoding)
    }

    /// Whether the shape's log carries an event of `kind` (`collection` for commits) whose
    /// payloads are `payload_lens` bytes (by [`Encoding::index`]).
    pub fn wants(
        &self,
        kind: EventKind,
        collection: Option<&str>,
        payload_lens: &[usize; crate::encoding::ENCODINGS],
    ) -> bool {
        let sized = if self.encoding.v2() {
            Encoding::V2Json
        } else {
            self.encoding
        };
        self.kinds.contains_kind(kind)
            && self.collection_allowed(kind, collection)
            && self.size_allowed(payload_lens[sized.index()])
    }

    /// Whether the shape's log carries this event (see [`SubscriberOptions::collection_allowed`]).
    pub fn collection_allowed(&self, kind: EventKind, collection: Option<&str>) -> bool {
        collections_allow(&self.collections, kind, collection)
    }

    /// Whether a frame of `sent_len` bytes fits the shape's size limit.
    pub fn size_allowed(&self, sent_len: usize) -> bool {
        size_allows(self.max_message_size, sent_len)
    }

    /// A short, stable label for metrics and logs: `full`, `zstd`, `c:app.bsky.feed.post`,
    /// `c:app.bsky.*+max:1000+zstd`. Labels longer than [`MAX_SHAPE_LABEL_BYTES`] are cut and
    /// end in `~` and a hash of the full label, so distinct shapes keep distinct labels.
    pub fn label(&self) -> String {
        let mut parts = Vec::with_capacity(4);
        if !self.kinds.is_all() && self.kinds != KindSet::V1 {
            parts.push(format!("k:{}", self.kinds.names()));
        }
        if !self.collections.is_empty() {
            let list: Vec<String> = self.collections.iter().map(ToString::to_string).collect();
            parts.push(format!("c:{}", list.join(",")));
        }
        if let Some(max) = self.max_message_size {
            parts.push(format!("max:{max}"));
        }
        if self.encoding.compressed() {
            parts.push("zstd".to_owned());
        }
        if parts.is_empty() {
            parts.push("full".to_owned());
        }
        let inner = parts.join("+");
        let label = if self.encoding.v2() {
            format!("v2:{inner}")
        } else {
            inner
        };
        if label.len() <= MAX_SHAPE_LABEL_BYTES {
            return label;
        }
        // Any fixed hash will do; FNV-1a is already at hand.
        let hash = crate::event::did_hash(&label);
        // "~" + 8 hex digits.
        let mut cut = MAX_SHAPE_LABEL_BYTES - 9;
        while !label.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}~{hash:08x}", &label[..cut])
    }
}

impl fmt::Display for ShapeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// Invalid filter values. Display texts are the official server's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// A `wantedCollections` value is neither an NSID nor a valid `<authority>.*` prefix.
    #[error("invalid subscriber options: invalid collection: {0}")]
    InvalidCollection(String),
    /// A `wantedDids` value is not a DID. The official text names no value; the value is kept
    /// here for logs.
    #[error("invalid subscriber options")]
    InvalidDid(String),
    /// More than [`MAX_WANTED_DIDS`] distinct DIDs; carries the count.
    #[error("invalid subscriber options: too many wanted DIDs")]
    TooManyDids(usize),
    /// More than [`MAX_WANTED_COLLECTIONS`] distinct collections; carries the count.
    #[error("invalid subscriber options: too many wanted collections")]
    TooManyCollections(usize),
}

/// What a `/subscribe` request asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeParams {
    /// Replay from this `time_us` (inclusive); `None` = live. Any i64 is accepted; one in the
    /// future means live (the official server compares with its clock; the relay does that).
    pub cursor: Option<i64>,
    /// Send zstd binary frames instead of JSON text frames.
    pub compress: bool,
    /// Send nothing until the first `options_update`, whose filters then apply.
    pub require_hello: bool,
    /// The query-string filters.
    pub options: SubscriberOptions,
}

/// Why a `/subscribe` request is refused; Display is the one-line HTTP 400 body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// `cursor` is not a decimal i64 (the official text).
    #[error("invalid cursor: {0}")]
    InvalidCursor(String),
    /// A filter value is invalid.
    #[error(transparent)]
    Options(#[from] OptionsError),
}

/// The first value of query parameter `key`, as Go's `url.Values.Get` returns it.
fn first<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `maxMessageSizeBytes` as the official server reads it: Go's `Atoi`; unparsable, zero or
/// negative = no limit. Values above `u32::MAX` are clamped (Go truncates them modulo 2³²,
/// which can turn a huge limit into a tiny one).
fn parse_max_message_size(value: &str) -> Option<u32> {
    let n: i64 = value.parse().ok()?;
    (n > 0).then(|| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Parses `/subscribe` query parameters. `pairs`: decoded query pairs in order;
/// `socket_encoding`: the values of the `Socket-Encoding` header(s).
///
/// Like the official server: single-valued parameters use their first occurrence; `compress`
/// and `requireHello` are on only for the exact value `true` (Go compares strings: `1`, `TRUE`
/// are off); an empty `cursor` is absent; unknown parameters are ignored; the cursor is
/// checked before the filters.
pub fn parse_subscribe(
    pairs: &[(String, String)],
    socket_encoding: &[&str],
) -> Result<SubscribeParams, SubscribeError> {
    let cursor = match first(pairs, "cursor") {
        None | Some("") => None,
        Some(raw) => Some(
            raw.parse::<i64>()
                .map_err(|_| SubscribeError::InvalidCursor(raw.to_owned()))?,
        ),
    };
    let values = |key: &str| -> Vec<&str> {
        pairs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let options = SubscriberOptions::new(
        &values("wantedCollections"),
        &values("wantedDids"),
        first(pairs, "maxMessageSizeBytes").and_then(parse_max_message_size),
    )?;
    // Go reads only the first header line; every line is honoured here (equivalent to the
    // comma-joined form HTTP defines for repeated headers).
    let compress = first(pairs, "compress") == Some("true")
        || socket_encoding.iter().any(|v| v.contains("zstd"));
    Ok(SubscribeParams {
        cursor,
        compress,
        require_hello: first(pairs, "requireHello") == Some("true"),
        options,
    })
}

/// Formats a close-frame reason, cut at a character boundary to [`MAX_CLOSE_REASON_BYTES`].
fn close_reason(prefix: &str, detail: &dyn fmt::Display) -> String {
    let mut reason = format!("{prefix}{detail}");
    if reason.len() > MAX_CLOSE_REASON_BYTES {
        let mut cut = MAX_CLOSE_REASON_BYTES;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

/// Why an `options_update` is refused; Display is the close-frame reason (≤ 120 bytes), worded
/// like the official server's.
#[derive(Debug, thiserror::Error)]
pub enum OptionsUpdateError {
    /// Longer than [`MAX_OPTIONS_UPDATE_BYTES`]; carries the length.
    #[error("{}", close_reason("subscriber sourced message too large: ", &format_args!("{} bytes", .0)))]
    TooLarge(usize),
    /// Not a JSON object, or `type` is not a string.
    #[error("{}", close_reason("failed to unmarshal subscriber sourced message: ", .0))]
    InvalidMessage(String),
    /// `type` is not `options_update` (the official server ignores such messages).
    #[error("{}", close_reason("unsupported subscriber sourced message type: ", .0))]
    UnknownType(String),
    /// `payload` is missing or its fields have the wrong JSON types.
    #[error("{}", close_reason("failed to unmarshal subscriber options update: ", .0))]
    InvalidPayload(String),
    /// A filter value is invalid.
    #[error("{}", close_reason("failed to parse subscriber options: ", .0))]
    Options(OptionsError),
}

/// The value of `key` in a JSON object, with the key matched like Go's `encoding/json` does
/// (case-insensitively, an exact match preferred).
fn go_field<'a>(object: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).or_else(|| {
        object
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
            .next_back()
    })
}

/// A `[]string` field as Go decodes it: absent or null = empty.
fn string_list(
    object: &serde_json::Map<String, Value>,
    key: &'static str,
) -> Result<Vec<String>, OptionsUpdateError> {
    let invalid =
        |what: &str| OptionsUpdateError::InvalidPayload(format!("{key}: expected {what}"));
    match go_field(object, key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid("strings"))
            })
            .collect(),
        Some(_) => Err(invalid("an array of strings")),
    }
}

/// Parses a subscriber-sourced text message `{"type":"options_update","payload":{...}}`.
///
/// The payload replaces all filters, as the official server does: a missing or null list
/// disables that filter, a missing `maxMessageSizeBytes` removes the limit. Unlike the official
/// server, `maxMessageSizeBytes` takes effect (its README documents it; its code drops it).
pub fn parse_options_update(msg: &[u8]) -> Result<SubscriberOptions, OptionsUpdateError> {
    if msg.len() > MAX_OPTIONS_UPDATE_BYTES {
        return Err(OptionsUpdateError::TooLarge(msg.len()));
    }
    let value: Value = serde_json::from_slice(msg)
        .map_err(|e| OptionsUpdateError::InvalidMessage(e.to_string()))?;
    let Value::Object(message) = value else {
        return Err(OptionsUpdateError::InvalidMessage(
            "expected a JSON object".to_owned(),
        ));
    };
    let kind = match go_field(&message, "type") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(OptionsUpdateError::InvalidMessage(
                "type: expected a string".to_owned(),
            ));
        }
    };
    if kind != "options_update" {
        return Err(OptionsUpdateError::UnknownType(format!("{kind:?}")));
    }
    let payload = match go_field(&message, "payload") {
        None => {
            return Err(OptionsUpdateError::InvalidPayload(
                "missing payload".to_owned(),
            ));
        }
        Some(Value::Null) => return Ok(SubscriberOptions::default()),
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Err(OptionsUpdateError::InvalidPayload(
                "expected an object".to_owned(),
            ));
        }
    };
    let collections = string_list(payload, "wantedCollections")?;
    let dids = string_list(payload, "wantedDids")?;
    let max_message_size = match go_field(payload, "maxMessageSizeBytes") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(n) => (n > 0).then(|| u32::try_from(n).unwrap_or(u32::MAX)),
            None => {
                return Err(OptionsUpdateError::InvalidPayload(
                    "maxMessageSizeBytes: expected an integer".to_owned(),
                ));
            }
        },
        Some(_) => {
            return Err(OptionsUpdateError::InvalidPayload(
                "maxMessageSizeBytes: expected an integer".to_owned(),
            ));
        }
    };
    SubscriberOptions::new(&collections, &dids, max_message_size)
        .map_err(OptionsUpdateError::Options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_event;

    const SAMPLE: &str = include_str!("../assets/jetstream-v1-sample.jsonl");

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn sub(pairs: &[(&str, &str)]) -> Result<SubscribeParams, SubscribeError> {
        parse_subscribe(&q(pairs), &[])
    }

    fn exact(s: &str) -> CollectionPattern {
        CollectionPattern::Exact(s.to_owned())
    }

    fn prefix(s: &str) -> CollectionPattern {
        CollectionPattern::Prefix(s.to_owned())
    }

    /// How many sample events pass the options' collection and DID filters.
    fn passing(options: &SubscriberOptions) -> usize {
        SAMPLE
            .lines()
            .filter(|l| !l.is_empty())
            .filter(|l| {
                let m = parse_event(l.as_bytes()).unwrap();
                options.collection_allowed(m.kind, m.collection.as_deref())
                    && options.did_allowed(&m.did)
            })
            .count()
    }

    #[test]
    fn empty_query_is_a_live_unfiltered_plain_stream() {
        let p = sub(&[]).unwrap();
        assert_eq!(
            p,
            SubscribeParams {
                cursor: None,
                compress: false,
                require_hello: false,
                options: SubscriberOptions::default(),
            }
        );
        assert_eq!(passing(&p.options), 152);
        assert!(p.options.size_allowed(usize::MAX));
        assert_eq!(
            p.options.shape_key(Encoding::V1Json, KindSet::V1).label(),
            "full"
        );
    }

    #[test]
    fn cursor_values() {
        assert_eq!(
            sub(&[("cursor", "1783175888085434")]).unwrap().cursor,
            Some(1_783_175_888_085_434)
        );
        assert_eq!(sub(&[("cursor", "-5")]).unwrap().cursor, Some(-5));
        assert_eq!(sub(&[("cursor", "+5")]).unwrap().cursor, Some(5));
        assert_eq!(sub(&[("cursor", "0")]).unwrap().cursor, Some(0));
        assert_eq!(sub(&[("cursor", "")]).unwrap().cursor, None);
        // First occurrence wins, like Go's Values.Get.
        assert_eq!(
            sub(&[("cursor", "7"), ("cursor", "x")]).unwrap().cursor,
            Some(7)
        );
        for bad in ["abc", "1.5", " 1", "1e6", "99999999999999999999", "0x10"] {
            let err = sub(&[("cursor", bad)]).unwrap_err();
            assert_eq!(err, SubscribeError::InvalidCursor(bad.to_owned()));
            assert_eq!(err.to_string(), format!("invalid cursor: {bad}"));
        }
    }

    #[test]
    fn cursor_is_checked_before_filters() {
        let err = sub(&[("wantedCollections", "bad"), ("cursor", "x")]).unwrap_err();
        assert_eq!(err.to_string(), "invalid cursor: x");
    }

    #[test]
    fn compress_and_require_hello_need_exactly_true() {
        assert!(sub(&[("compress", "true")]).unwrap().compress);
        for off in ["1", "TRUE", "True", "yes", ""] {
            assert!(!sub(&[("compress", off)]).unwrap().compress, "{off}");
            assert!(
                !sub(&[("requireHello", off)]).unwrap().require_hello,
                "{off}"
            );
        }
        assert!(
            !sub(&[("compress", "false"), ("compress", "true")])
                .unwrap()
                .compress
        );
        assert!(sub(&[("requireHello", "true")]).unwrap().require_hello);
    }

    #[test]
    fn socket_encoding_header_enables_compression() {
        let p = parse_subscribe(&[], &["zstd"]).unwrap();
        assert!(p.compress);
        assert!(parse_subscribe(&[], &["gzip, zstd"]).unwrap().compress);
        assert!(parse_subscribe(&[], &["gzip", "zstd"]).unwrap().compress);
        assert!(!parse_subscribe(&[], &["gzip"]).unwrap().compress);
        assert_eq!(
            p.options
                .shape_key(Encoding::of(false, p.compress), KindSet::V1)
                .label(),
            "zstd"
        );
    }

    #[test]
    fn max_message_size_parsing() {
        let max = |v: &str| {
            sub(&[("maxMessageSizeBytes", v)])
                .unwrap()
                .options
                .max_message_size
        };
        assert_eq!(max("1000"), Some(1000));
        assert_eq!(max("+1000"), Some(1000));
        assert_eq!(max("0"), None);
        assert_eq!(max("-1"), None);
        assert_eq!(max("abc"), None);
        assert_eq!(max(""), None);
        assert_eq!(max("1.5"), None);
        assert_eq!(max("99999999999999999999"), None);
        assert_eq!(max("4294967296"), Some(u32::MAX));
        let o = sub(&[("maxMessageSizeBytes", "600")]).unwrap().options;
        assert!(o.size_allowed(600));
        assert!(!o.size_allowed(601));
        assert!(o.size_allowed(0));
    }

    #[test]
    fn unknown_parameters_are_ignored() {
        let p = sub(&[
            ("foo", "bar"),
            ("wantedcollections", "garbage"),
            ("Cursor", "x"),
        ])
        .unwrap();
        assert_eq!(p.options, SubscriberOptions::default());
        assert_eq!(p.cursor, None);
    }

    #[test]
    fn collection_patterns() {
        let ok = [
            ("app.bsky.feed.post", exact("app.bsky.feed.post")),
            ("com.example.fooBar", exact("com.example.fooBar")),
            ("com.example.postV2", exact("com.example.postV2")),
            (
                "fm.teal.alpha.actor.status",
                exact("fm.teal.alpha.actor.status"),
            ),
            ("a-b.c-d.e", exact("a-b.c-d.e")),
            ("com.3com.thing", exact("com.3com.thing")),
            ("app.bsky.*", prefix("app.bsky.")),
            ("app.bsky.graph.*", prefix("app.bsky.graph.")),
            ("com.x-y.*", prefix("com.x-y.")),
        ];
        for (raw, want) in ok {
            assert_eq!(CollectionPattern::parse(raw), Some(want.clone()), "{raw}");
            assert_eq!(want.to_string(), raw);
        }
        let bad = [
            "",
            "*",
            ".*",
            "app.*",
            "app",
            "app.bsky",
            "app.bsky.graph.fo*",
            "app.bsky.*.post",
            "app..bsky.*",
            "app.bsky..*",
            "app.bsky.feed.",
            ".app.bsky.feed",
            "1app.bsky.feed",
            "app.bsky.feed.2post",
            "app.bsky.feed.po-st",
            "app.-bsky.feed",
            "app.bsky-.feed",
            "app.bsky.feed.post ",
            "app.bsky.feed.pöst",
            "app/bsky/feed",
            "app.bsky.feed.post,x.y.z",
        ];
        for raw in bad {
            assert_eq!(CollectionPattern::parse(raw), None, "{raw:?}");
        }
        let long_segment = format!("app.{}.post", "a".repeat(64));
        assert_eq!(CollectionPattern::parse(&long_segment), None);
        let ok_segment = format!("app.{}.post", "a".repeat(63));
        assert!(CollectionPattern::parse(&ok_segment).is_some());
        let long_authority = format!("com.{}x", "abcdefghi.".repeat(25));
        assert!(long_authority.len() > MAX_AUTHORITY_BYTES);
        assert_eq!(
            CollectionPattern::parse(&format!("{long_authority}.name")),
            None
        );
        assert_eq!(
            CollectionPattern::parse(&format!("{long_authority}.*")),
            None
        );
    }

    #[test]
    fn prefixes_match_whole_segments_only() {
        let p = prefix("app.bsky.graph.");
        assert!(p.matches("app.bsky.graph.follow"));
        assert!(!p.matches("app.bsky.graphx.follow"));
        assert!(!p.matches("app.bsky.graph"));
        assert!(exact("app.bsky.feed.post").matches("app.bsky.feed.post"));
        assert!(!exact("app.bsky.feed.post").matches("app.bsky.feed.posts"));
        assert!(!exact("app.bsky.feed.post").matches("App.bsky.feed.post"));
    }

    #[test]
    fn wanted_collections_against_the_sample() {
        let count = |cols: &[&str]| {
            let pairs: Vec<(&str, &str)> = cols.iter().map(|c| ("wantedCollections", *c)).collect();
            passing(&sub(&pairs).unwrap().options)
        };
        // Commits of the collection plus the identity and account events, which always pass.
        assert_eq!(count(&["app.bsky.feed.like"]), 105 + 2);
        assert_eq!(count(&["app.bsky.feed.post"]), 18 + 2);
        assert_eq!(
            count(&["app.bsky.feed.like", "app.bsky.feed.post"]),
            123 + 2
        );
        assert_eq!(count(&["app.bsky.graph.*"]), 9 + 1 + 2);
        assert_eq!(count(&["app.bsky.feed.*"]), 105 + 18 + 15 + 2);
        // Every commit but the fm.teal one.
        assert_eq!(count(&["app.bsky.*"]), 149 + 2);
        assert_eq!(count(&["fm.teal.*"]), 1 + 2);
        assert_eq!(count(&["com.example.nothing"]), 2);
        assert_eq!(count(&["app.bsky.feed.like", "app.bsky.feed.*"]), 138 + 2);
    }

    #[test]
    fn wanted_dids_against_the_sample() {
        // The identity/account DID also has no commit in the sample.
        let ident = "did:plc:hqvhxrowqbemo5e4wjnj6zao";
        let liker = "did:plc:wq4aajammjtxdomz3e23667t";
        let o = sub(&[("wantedDids", ident)]).unwrap().options;
        assert_eq!(
            passing(&o),
            2,
            "identity and account events obey wantedDids"
        );
        let o = sub(&[("wantedDids", liker)]).unwrap().options;
        let by_liker = SAMPLE
            .lines()
            .filter(|l| l.contains(&format!("\"did\":\"{liker}\"")))
            .count();
        assert!(by_liker >= 1);
        assert_eq!(passing(&o), by_liker);
        let o = sub(&[("wantedDids", liker), ("wantedDids", ident)])
            .unwrap()
            .options;
        assert_eq!(passing(&o), by_liker + 2);
        // Combined with a collection filter the identity/account events still need the DID.
        let o = sub(&[
            ("wantedDids", ident),
            ("wantedCollections", "app.bsky.feed.like"),
        ])
        .unwrap()
        .options;
        assert_eq!(passing(&o), 2);
        assert!(o.did_allowed(ident));
        assert!(!o.did_allowed(liker));
    }

    #[test]
    fn all_options_combined() {
        let p = parse_subscribe(
            &q(&[
                ("wantedCollections", "app.bsky.graph.*"),
                ("wantedCollections", "app.bsky.feed.post"),
                ("wantedCollections", "app.bsky.graph.follow"),
                ("wantedCollections", "app.bsky.feed.post"),
                ("wantedDids", "did:web:example.com"),
                ("wantedDids", "did:plc:b"),
                ("wantedDids", "did:plc:b"),
                ("maxMessageSizeBytes", "1000"),
                ("cursor", "123"),
                ("requireHello", "true"),
                ("compress", "true"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(p.cursor, Some(123));
        assert!(p.compress && p.require_hello);
        // Sorted, deduplicated, covered patterns dropped.
        assert_eq!(
            p.options.wanted_collections,
            vec![exact("app.bsky.feed.post"), prefix("app.bsky.graph.")]
        );
        assert_eq!(
            p.options.wanted_dids,
            vec!["did:plc:b", "did:web:example.com"]
        );
        assert_eq!(p.options.max_message_size, Some(1000));
        let key = p.options.shape_key(Encoding::V1Zstd, KindSet::V1);
        assert_eq!(
            key.label(),
            "c:app.bsky.feed.post,app.bsky.graph.*+max:1000+zstd"
        );
        assert!(key.collection_allowed(EventKind::Commit, Some("app.bsky.graph.block")));
        assert!(!key.collection_allowed(EventKind::Commit, Some("app.bsky.feed.like")));
        assert!(key.collection_allowed(EventKind::Identity, None));
        assert!(key.size_allowed(1000) && !key.size_allowed(1001));
    }

    #[test]
    fn canonical_form_makes_equivalent_filters_equal() {
        let a = SubscriberOptions::new(
            &["app.bsky.feed.post", "app.bsky.*", "app.bsky.feed.*"],
            &["did:plc:z", "did:plc:a"],
            Some(0),
        )
        .unwrap();
        let b = SubscriberOptions::new(
            &["app.bsky.*"],
            &["did:plc:a", "did:plc:z", "did:plc:a"],
            None,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.wanted_collections, vec![prefix("app.bsky.")]);
        assert_eq!(
            a.shape_key(Encoding::V1Json, KindSet::V1),
            b.shape_key(Encoding::V1Json, KindSet::V1)
        );
        assert_ne!(
            a.shape_key(Encoding::V1Json, KindSet::V1),
            a.shape_key(Encoding::V1Zstd, KindSet::V1)
        );
    }

    #[test]
    fn limits_that_cannot_apply_leave_the_shape() {
        let o = |m| SubscriberOptions::new::<&str, &str>(&[], &[], Some(m)).unwrap();
        assert_eq!(
            o(1_048_575)
                .shape_key(Encoding::V1Json, KindSet::V1)
                .max_message_size,
            Some(1_048_575)
        );
        assert_eq!(
            o(1 << 20)
                .shape_key(Encoding::V1Json, KindSet::V1)
                .max_message_size,
            None
        );
        assert_eq!(
            o(1 << 20).shape_key(Encoding::V1Json, KindSet::V1).label(),
            "full"
        );
        // A compressed frame may exceed the plain size slightly; the limit still matters there.
        assert_eq!(
            o(1 << 20)
                .shape_key(Encoding::V1Zstd, KindSet::V1)
                .max_message_size,
            Some(1 << 20)
        );
        assert_eq!(
            o(u32::MAX)
                .shape_key(Encoding::V1Zstd, KindSet::V1)
                .max_message_size,
            None
        );
        // The client's own options keep the limit: it is harmless and visible.
        assert_eq!(o(u32::MAX).max_message_size, Some(u32::MAX));
    }

    /// Only canonical keys get a shape: near-identical size limits (the shape-exhaustion
    /// attack) and size-only filters walk the base log; a client's own limit is never
    /// replaced by another (it must get exactly what it asked for).
    #[test]
    fn only_canonical_keys_are_served_from_a_shape() {
        let o = |c: &[&str], d: &[&str], m: Option<u32>| SubscriberOptions::new(c, d, m).unwrap();
        let post = ["app.bsky.feed.post"];
        assert_eq!(
            o(&[], &[], None).serving(Encoding::V1Json, KindSet::V1),
            Serving::Base
        );
        assert_eq!(
            o(&[], &[], Some(u32::MAX)).serving(Encoding::V1Json, KindSet::V1),
            Serving::Base
        );
        assert_eq!(
            o(&[], &["did:plc:a"], None).serving(Encoding::V1Json, KindSet::V1),
            Serving::Walk
        );
        assert_eq!(
            o(&post, &["did:plc:a"], None).serving(Encoding::V1Json, KindSet::V1),
            Serving::Walk
        );
        for m in [1_048_575, 1_048_574, 1 << 19, 4096, 600] {
            assert_eq!(
                o(&[], &[], Some(m)).serving(Encoding::V1Json, KindSet::V1),
                Serving::Walk,
                "{m}"
            );
            assert_eq!(
                o(&[], &[], Some(m)).serving(Encoding::V1Zstd, KindSet::V1),
                Serving::Walk,
                "{m}"
            );
        }
        for m in [1_048_575, 1_048_574, 1000, 600, 3] {
            assert_eq!(
                o(&post, &[], Some(m)).serving(Encoding::V1Json, KindSet::V1),
                Serving::Walk,
                "{m}"
            );
        }
        let Serving::Shape(k) = o(&post, &[], Some(512)).serving(Encoding::V1Zstd, KindSet::V1)
        else {
            panic!("a power-of-two limit with collections has a shape");
        };
        assert_eq!(k.max_message_size, Some(512));
        assert_eq!(k.label(), "c:app.bsky.feed.post+max:512+zstd");
        assert_eq!(
            o(&post, &[], None).serving(Encoding::V1Json, KindSet::V1),
            Serving::Shape(o(&post, &[], None).shape_key(Encoding::V1Json, KindSet::V1))
        );
        // A limit no frame can exceed is dropped first: the shape without a limit.
        assert_eq!(
            o(&post, &[], Some(u32::MAX)).serving(Encoding::V1Json, KindSet::V1),
            o(&post, &[], None).serving(Encoding::V1Json, KindSet::V1)
        );
        // Distinct canonical keys from collections × limits are bounded: at most 21 limits
        // (2^0..2^20) per collection set and encoding.
        let keys: std::collections::HashSet<_> = (1..=(1u32 << 20))
            .step_by(997)
            .chain((0..=20).map(|k| 1u32 << k))
            .filter_map(
                |m| match o(&post, &[], Some(m)).serving(Encoding::V1Json, KindSet::V1) {
                    Serving::Shape(k) => Some(k),
                    _ => None,
                },
            )
            .collect();
        assert!(keys.len() <= 21, "{}", keys.len());
        // v2: every kind is the base log; a kind subset (few exist) has a shape, but a
        // size-only filter on it walks like on v1.
        let v2 = Encoding::V2Json;
        assert_eq!(o(&[], &[], None).serving(v2, KindSet::ALL), Serving::Base);
        let identity = KindSet::of(&[crate::wire::MessageKind::Identity]);
        assert!(matches!(
            o(&[], &[], None).serving(v2, identity),
            Serving::Shape(_)
        ));
        assert_eq!(o(&[], &[], Some(600)).serving(v2, identity), Serving::Walk);
        assert_eq!(
            o(&[], &[], Some(600)).serving(v2, KindSet::ALL),
            Serving::Walk
        );
    }

    #[test]
    fn long_labels_are_cut_with_a_distinguishing_hash() {
        let many: Vec<String> = (0..20)
            .map(|i| format!("com.example.collection{i}"))
            .collect();
        let a = SubscriberOptions::new::<_, &str>(&many, &[], None)
            .unwrap()
            .shape_key(Encoding::V1Json, KindSet::V1);
        let b = SubscriberOptions::new::<_, &str>(&many[1..], &[], None)
            .unwrap()
            .shape_key(Encoding::V1Json, KindSet::V1);
        let (la, lb) = (a.label(), b.label());
        assert!(la.len() <= MAX_SHAPE_LABEL_BYTES, "{la}");
        assert!(la.starts_with("c:com.example.collection0,"));
        assert_ne!(la, lb);
        assert_eq!(la, a.label(), "stable");
        assert_eq!(la.as_bytes()[la.len() - 9], b'~');
    }

    #[test]
    fn invalid_filters_have_the_official_messages() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("wantedCollections", "app.bsky.graph.fo*")],
                "invalid subscriber options: invalid collection: app.bsky.graph.fo*",
            ),
            (
                &[("wantedCollections", "*")],
                "invalid subscriber options: invalid collection: *",
            ),
            (
                &[("wantedCollections", "app.*")],
                "invalid subscriber options: invalid collection: app.*",
            ),
            (
                &[("wantedCollections", "")],
                "invalid subscriber options: invalid collection: ",
            ),
            (
                &[("wantedDids", "bob.bsky.social")],
                "invalid subscriber options",
            ),
            (&[("wantedDids", "")], "invalid subscriber options"),
            // Collections are checked before DIDs.
            (
                &[("wantedDids", "nope"), ("wantedCollections", "nope")],
                "invalid subscriber options: invalid collection: nope",
            ),
        ];
        for (pairs, message) in cases {
            let err = sub(pairs).unwrap_err();
            assert_eq!(err.to_string(), *message, "{pairs:?}");
        }
        match sub(&[("wantedDids", "did:PLC:x")]).unwrap_err() {
            SubscribeError::Options(OptionsError::InvalidDid(d)) => assert_eq!(d, "did:PLC:x"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn too_many_filters() {
        let cols: Vec<String> = (0..=MAX_WANTED_COLLECTIONS)
            .map(|i| format!("com.example.c{i}"))
            .collect();
        let mut pairs: Vec<(String, String)> = cols
            .iter()
            .map(|c| ("wantedCollections".to_owned(), c.clone()))
            .collect();
        let err = parse_subscribe(&pairs, &[]).unwrap_err();
        assert_eq!(
            err,
            SubscribeError::Options(OptionsError::TooManyCollections(101))
        );
        assert_eq!(
            err.to_string(),
            "invalid subscriber options: too many wanted collections"
        );
        pairs.pop();
        // Exactly 100, plus duplicates, is fine.
        pairs.push(("wantedCollections".to_owned(), "com.example.c0".to_owned()));
        assert_eq!(
            parse_subscribe(&pairs, &[])
                .unwrap()
                .options
                .wanted_collections
                .len(),
            100
        );

        let dids: Vec<(String, String)> = (0..=MAX_WANTED_DIDS)
            .map(|i| ("wantedDids".to_owned(), format!("did:plc:{i:024}")))
            .collect();
        let err = parse_subscribe(&dids, &[]).unwrap_err();
        assert_eq!(
            err,
            SubscribeError::Options(OptionsError::TooManyDids(10_001))
        );
        assert_eq!(
            err.to_string(),
            "invalid subscriber options: too many wanted DIDs"
        );
        let ok = parse_subscribe(&dids[1..], &[]).unwrap();
        assert_eq!(ok.options.wanted_dids.len(), MAX_WANTED_DIDS);
        assert!(ok.options.did_allowed("did:plc:000000000000000000005000"));
        assert!(!ok.options.did_allowed("did:plc:000000000000000000000000"));
    }

    #[test]
    fn did_syntax() {
        for ok in [
            "did:plc:z72i7hdynmk6r22z27h6tvur",
            "did:web:example.com",
            "did:web:localhost%3A1234",
            "did:method:val:two",
            "did:m:v",
            "did:example:a-b_c.d",
        ] {
            assert!(is_valid_did(ok), "{ok}");
        }
        for bad in [
            "",
            "did",
            "did:",
            "did:plc",
            "did:plc:",
            "did::x",
            "did:PLC:x",
            "did:pl2:x",
            "did:plc:x:",
            "did:plc:x%",
            "did:plc:a b",
            "DID:plc:x",
            "did:plc:é",
            "did:plc:x/y",
        ] {
            assert!(!is_valid_did(bad), "{bad}");
        }
        let long = format!("did:plc:{}", "a".repeat(MAX_DID_BYTES - 8));
        assert!(is_valid_did(&long));
        assert!(!is_valid_did(&format!("{long}a")));
    }

    #[test]
    fn options_update_full_and_partial_payloads() {
        let o = parse_options_update(
            br#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.post","app.bsky.graph.*"],"wantedDids":["did:plc:b","did:plc:a"],"maxMessageSizeBytes":5000}}"#,
        )
        .unwrap();
        assert_eq!(
            o.wanted_collections,
            vec![exact("app.bsky.feed.post"), prefix("app.bsky.graph.")]
        );
        assert_eq!(o.wanted_dids, vec!["did:plc:a", "did:plc:b"]);
        assert_eq!(
            o.max_message_size,
            Some(5000),
            "applied, unlike the official server"
        );

        // Missing fields mean "no filter": the whole option set is replaced.
        let o = parse_options_update(
            br#"{"type":"options_update","payload":{"wantedDids":["did:plc:a"]}}"#,
        )
        .unwrap();
        assert_eq!(o.wanted_collections, vec![]);
        assert_eq!(o.wanted_dids, vec!["did:plc:a"]);
        assert_eq!(o.max_message_size, None);
        for empty in [
            &br#"{"type":"options_update","payload":{}}"#[..],
            br#"{"type":"options_update","payload":null}"#,
            br#"{"payload":{"wantedCollections":null,"wantedDids":[],"maxMessageSizeBytes":null},"type":"options_update","extra":1}"#,
            br#"{"type":"options_update","payload":{"maxMessageSizeBytes":-3}}"#,
            br#"{"type":"options_update","payload":{"maxMessageSizeBytes":0}}"#,
        ] {
            assert_eq!(parse_options_update(empty).unwrap(), SubscriberOptions::default());
        }
        let o = parse_options_update(
            br#"{"type":"options_update","payload":{"maxMessageSizeBytes":99999999999}}"#,
        )
        .unwrap();
        assert_eq!(o.max_message_size, Some(u32::MAX));
    }

    #[test]
    fn options_update_keys_match_case_insensitively_like_go() {
        let o = parse_options_update(
            br#"{"Type":"options_update","PAYLOAD":{"WantedCollections":["app.bsky.feed.like"],"wanteddids":["did:plc:a"]}}"#,
        )
        .unwrap();
        assert_eq!(o.wanted_collections, vec![exact("app.bsky.feed.like")]);
        assert_eq!(o.wanted_dids, vec!["did:plc:a"]);
        assert_eq!(passing(&o), 0, "no sample event is by did:plc:a");
    }

    #[test]
    fn options_update_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "failed to unmarshal subscriber sourced message: expected ident at line 1 column 2"),
            (b"[1]", "failed to unmarshal subscriber sourced message: expected a JSON object"),
            (br#"{"type":5}"#, "failed to unmarshal subscriber sourced message: type: expected a string"),
            (br#"{"type":"hello"}"#, "unsupported subscriber sourced message type: \"hello\""),
            (br#"{"payload":{}}"#, "unsupported subscriber sourced message type: \"\""),
            (br#"{"type":"options_update"}"#, "failed to unmarshal subscriber options update: missing payload"),
            (br#"{"type":"options_update","payload":[]}"#, "failed to unmarshal subscriber options update: expected an object"),
            (
                br#"{"type":"options_update","payload":{"wantedCollections":"app.bsky.feed.post"}}"#,
                "failed to unmarshal subscriber options update: wantedCollections: expected an array of strings",
            ),
            (
                br#"{"type":"options_update","payload":{"wantedDids":[1]}}"#,
                "failed to unmarshal subscriber options update: wantedDids: expected strings",
            ),
            (
                br#"{"type":"options_update","payload":{"maxMessageSizeBytes":"100"}}"#,
                "failed to unmarshal subscriber options update: maxMessageSizeBytes: expected an integer",
            ),
            (
                br#"{"type":"options_update","payload":{"maxMessageSizeBytes":1.5}}"#,
                "failed to unmarshal subscriber options update: maxMessageSizeBytes: expected an integer",
            ),
            (
                br#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.graph.fo*"]}}"#,
                "failed to parse subscriber options: invalid subscriber options: invalid collection: app.bsky.graph.fo*",
            ),
            (
                br#"{"type":"options_update","payload":{"wantedDids":["alice"]}}"#,
                "failed to parse subscriber options: invalid subscriber options",
            ),
        ];
        for (msg, reason) in cases {
            let err = parse_options_update(msg).unwrap_err();
            assert_eq!(err.to_string(), *reason, "{}", String::from_utf8_lossy(msg));
            assert!(err.to_string().len() <= MAX_CLOSE_REASON_BYTES);
        }
    }

    #[test]
    fn options_update_reasons_fit_a_close_frame() {
        let long_collection = format!("app.bsky.{}.x*", "é".repeat(100));
        let msg = format!(
            r#"{{"type":"options_update","payload":{{"wantedCollections":["{long_collection}"]}}}}"#
        );
        let reason = parse_options_update(msg.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(reason.len() <= MAX_CLOSE_REASON_BYTES, "{}", reason.len());
        assert!(reason.starts_with("failed to parse subscriber options: invalid subscriber options: invalid collection: app.bsky.é"));

        let too_many: Vec<String> = (0..=MAX_WANTED_DIDS)
            .map(|i| format!("\"did:plc:{i}\""))
            .collect();
        let msg = format!(
            r#"{{"type":"options_update","payload":{{"wantedDids":[{}]}}}}"#,
            too_many.join(",")
        );
        assert!(msg.len() < MAX_OPTIONS_UPDATE_BYTES);
        let err = parse_options_update(msg.as_bytes()).unwrap_err();
        assert!(matches!(
            err,
            OptionsUpdateError::Options(OptionsError::TooManyDids(10_001))
        ));
        assert_eq!(
            err.to_string(),
            "failed to parse subscriber options: invalid subscriber options: too many wanted DIDs"
        );
    }

    #[test]
    fn options_update_size_limit() {
        let mut msg = br#"{"type":"options_update","payload":{}}"#.to_vec();
        msg.resize(MAX_OPTIONS_UPDATE_BYTES, b' ');
        assert!(
            parse_options_update(&msg).is_ok(),
            "whitespace-padded to exactly the limit"
        );
        msg.push(b' ');
        let err = parse_options_update(&msg).unwrap_err();
        assert!(
            matches!(err, OptionsUpdateError::TooLarge(n) if n == MAX_OPTIONS_UPDATE_BYTES + 1)
        );
        assert_eq!(
            err.to_string(),
            "subscriber sourced message too large: 1048577 bytes"
        );
    }

    #[test]
    fn size_limit_compares_sent_bytes() {
        let o = SubscriberOptions::new::<&str, &str>(&[], &[], Some(245)).unwrap();
        let lines: Vec<&str> = SAMPLE.lines().collect();
        let small = lines.iter().filter(|l| o.size_allowed(l.len())).count();
        let expected = lines.iter().filter(|l| l.len() <= 245).count();
        assert_eq!(small, expected);
        assert!(small > 0 && small < lines.len());
    }
}
