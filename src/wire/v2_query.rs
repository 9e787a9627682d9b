//! The `subscribeEvents` query: `kinds`, `dids`, `collections`, `maxMessageSizeBytes`,
//! `cursor`, `zstdDictionary`, with every pre-upgrade 400 of the official server
//! (`internal/subscribe/handler.go`, `filterv2.go`, `cursor.go`), in its order and words.
//!
//! The filters map onto the relay's v1 machinery: `collections` and `dids` become a
//! [`SubscriberOptions`] (validated by the same helpers as `wantedCollections`/`wantedDids`;
//! the semantics agree — collections constrain commits only, DIDs every kind), and the shape a
//! v2 client reads is a [`ShapeKey`] of a v2 encoding with its `kinds` set, whose size limit
//! is measured on the uncompressed v2 frame (the official rule for v2, also for compressed
//! clients; v1 measures what is sent).

use super::cursor::{Cursor, go_quote};
use super::event_parts::MessageKind;
use super::xrpc::XrpcError;
use crate::compress::Dictionary;
use crate::encoding::Encoding;
use crate::handshake;
use crate::subscription::{
    CollectionPattern, MAX_WANTED_COLLECTIONS, MAX_WANTED_DIDS, ShapeKey, SubscriberOptions,
    is_valid_did,
};

/// Why 4: the `kinds` enum has four values (the lexicon's `maxLength`).
pub const MAX_KINDS: usize = 4;

/// The prefix of every filter error message (the official `ErrInvalidOptions`).
const INVALID_OPTIONS: &str = "subscribe: invalid options";

/// A set of [`MessageKind`]s (`kinds`); [`KindSet::ALL`] when the parameter is absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KindSet(u8);

impl KindSet {
    /// Every kind (no `kinds` parameter).
    pub const ALL: KindSet = KindSet(0b1111);

    /// The kinds of the v1 wire (`#sync` has no v1 form).
    pub const V1: KindSet = KindSet(0b0111);

    /// Every kind a client of `encoding` can receive.
    pub fn all_for(encoding: crate::encoding::Encoding) -> KindSet {
        if encoding.v2() {
            KindSet::ALL
        } else {
            KindSet::V1
        }
    }

    /// Whether an event of this (relay) kind passes.
    pub fn contains_kind(self, kind: crate::event::EventKind) -> bool {
        self.contains(MessageKind::from(kind))
    }

    fn bit(kind: MessageKind) -> u8 {
        match kind {
            MessageKind::Commit => 1,
            MessageKind::Identity => 2,
            MessageKind::Account => 4,
            MessageKind::Sync => 8,
        }
    }

    /// The set holding exactly `kinds`.
    pub fn of(kinds: &[MessageKind]) -> KindSet {
        KindSet(kinds.iter().fold(0, |m, &k| m | Self::bit(k)))
    }

    /// Whether events of `kind` pass.
    pub fn contains(self, kind: MessageKind) -> bool {
        self.0 & Self::bit(kind) != 0
    }

    /// Whether every kind passes.
    pub fn is_all(self) -> bool {
        self == KindSet::ALL
    }

    /// `commit,identity` etc., in enum order.
    pub fn names(self) -> String {
        MessageKind::ALL
            .into_iter()
            .filter(|&k| self.contains(k))
            .map(MessageKind::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What a `subscribeEvents` request asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeEventsParams {
    /// Where to start; `None` = live. The relay resolves it (and answers `CursorTooOld` with
    /// [`XrpcError::cursor_too_old`], `#info` with [`super::outdated_cursor_frame`] /
    /// [`super::future_cursor_frame`]).
    pub cursor: Option<Cursor>,
    /// `kinds`.
    pub kinds: KindSet,
    /// `collections` (as `wanted_collections`), `dids` (as `wanted_dids`) and
    /// `maxMessageSizeBytes` (on the uncompressed v2 frame).
    pub options: SubscriberOptions,
    /// `zstdDictionary=<the current id>`: binary frames compressed with the v2 dictionary.
    pub compress: bool,
}

impl SubscribeEventsParams {
    /// Whether an event passes this client's filters (kinds, DIDs, collections; not the size).
    pub fn wants(&self, kind: MessageKind, did: &str, collection: Option<&str>) -> bool {
        self.kinds.contains(kind)
            && self.options.did_allowed(did)
            && self
                .options
                .collection_allowed(collection_kind(kind), collection)
    }

    /// The shared log this client reads (everything but `dids`); its size limit is measured
    /// on the uncompressed v2 frame, as officially (also for compressed clients).
    pub fn shape_key(&self) -> ShapeKey {
        self.options
            .shape_key(Encoding::of(true, self.compress), self.kinds)
    }
}

/// The v1 kind whose `collections` rule applies: commits are filtered, every other kind
/// (`#sync` included, which has no v1 kind) passes, as identity does.
fn collection_kind(kind: MessageKind) -> crate::event::EventKind {
    kind.v1_kind().unwrap_or(crate::event::EventKind::Identity)
}

fn invalid(detail: impl std::fmt::Display) -> XrpcError {
    XrpcError::invalid_request(format!("{INVALID_OPTIONS}: {detail}"))
}

/// Parses a raw `subscribeEvents` query (`Request::query`) and the request's
/// `Socket-Encoding` header values.
pub fn parse_subscribe_events_query(
    query: &str,
    socket_encoding: &[&str],
) -> Result<SubscribeEventsParams, XrpcError> {
    let pairs = handshake::query_pairs(query).map_err(|e| invalid(e.reason))?;
    parse_subscribe_events(&pairs, socket_encoding)
}

/// Parses decoded query pairs (see [`handshake::query_pairs`]). Checks in the official order:
/// compression opt-ins, `zstdDictionary`, the legacy parameter names, `kinds`, the raw counts
/// of `dids` and `collections`, each DID, each collection, `collections` vs `kinds`,
/// `maxMessageSizeBytes`, then `cursor`. Unknown parameters are ignored (XRPC convention).
pub fn parse_subscribe_events(
    pairs: &[(String, String)],
    socket_encoding: &[&str],
) -> Result<SubscribeEventsParams, XrpcError> {
    let values = |key: &str| -> Vec<&str> {
        pairs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let has = |key: &str| pairs.iter().any(|(k, _)| k == key);
    let first = |key: &str| values(key).first().copied();

    if first("compress") == Some("true") || socket_encoding.iter().any(|v| v.contains("zstd")) {
        return Err(XrpcError::invalid_request(
            "compress=true / Socket-Encoding: zstd is the /subscribe (v1) opt-in; this endpoint uses zstdDictionary=<id> with the dictionary from getZstdDictionary",
        ));
    }
    let compress = match first("zstdDictionary") {
        None | Some("") => false,
        Some(raw) => {
            let id = parse_go_uint(raw)
                .filter(|&id| id > 0 && id <= u64::from(u32::MAX))
                .ok_or_else(|| {
                    XrpcError::invalid_request(
                        "zstdDictionary must be a positive integer zstd dictionary ID",
                    )
                })?;
            let current = Dictionary::V2.id();
            if id != u64::from(current) {
                return Err(XrpcError {
                    status: 400,
                    error: "UnknownZstdDictionary",
                    message: format!(
                        "unknown zstd dictionary id {id}; current dictionary id is {current} (fetch it via getZstdDictionary and reconnect)"
                    ),
                });
            }
            true
        }
    };

    if has("wantedDids") {
        return Err(invalid(
            "wantedDids is the legacy /subscribe parameter; use dids",
        ));
    }
    if has("wantedCollections") {
        return Err(invalid(
            "wantedCollections is the legacy /subscribe parameter; use collections",
        ));
    }
    if has("requireHello") {
        return Err(invalid(
            "requireHello is not supported on this endpoint; it is server-push only (subscriber-sourced messages were removed)",
        ));
    }

    let raw_kinds = values("kinds");
    if raw_kinds.len() > MAX_KINDS {
        return Err(invalid(format!(
            "too many kinds values: {} > {MAX_KINDS}",
            raw_kinds.len()
        )));
    }
    let mut kind_list = Vec::with_capacity(raw_kinds.len());
    for raw in &raw_kinds {
        let kind = MessageKind::from_name(raw).ok_or_else(|| {
            invalid(format!(
                "unknown kind {} (valid: commit, identity, account, sync)",
                go_quote(raw)
            ))
        })?;
        kind_list.push(kind);
    }
    let kinds = if raw_kinds.is_empty() {
        KindSet::ALL
    } else {
        KindSet::of(&kind_list)
    };

    let dids = values("dids");
    if dids.len() > MAX_WANTED_DIDS {
        return Err(invalid(format!(
            "too many dids values: {} > {MAX_WANTED_DIDS}",
            dids.len()
        )));
    }
    let collections = values("collections");
    if collections.len() > MAX_WANTED_COLLECTIONS {
        return Err(invalid(format!(
            "too many collections values: {} > {MAX_WANTED_COLLECTIONS}",
            collections.len()
        )));
    }
    if let Some(bad) = dids.iter().find(|d| !is_valid_did(d)) {
        return Err(invalid(format!("invalid DID: {bad}")));
    }
    if let Some(bad) = collections
        .iter()
        .find(|c| c.ends_with(".*") && CollectionPattern::parse(c).is_none())
    {
        return Err(invalid(format!("invalid collection wildcard: {bad}")));
    }
    if let Some(bad) = collections
        .iter()
        .find(|c| CollectionPattern::parse(c).is_none())
    {
        return Err(invalid(format!("invalid collection: {bad}")));
    }
    if !collections.is_empty() && !kinds.contains(MessageKind::Commit) {
        return Err(invalid(
            "collections filter can never apply: kinds excludes commit",
        ));
    }
    let max_message_size = match values("maxMessageSizeBytes").as_slice() {
        [] => None,
        [one] if !one.is_empty() => {
            let n = parse_go_uint(one)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| invalid(format!("invalid maxMessageSizeBytes {}", go_quote(one))))?;
            Some(n)
        }
        _ => {
            return Err(invalid(
                "maxMessageSizeBytes must be one unsigned 32-bit integer",
            ));
        }
    };
    // Every value was validated above; the counts fit; this only canonicalizes.
    let options = SubscriberOptions::new(&collections, &dids, max_message_size)
        .map_err(|e| invalid(e.to_string()))?;

    let cursor = Cursor::parse(first("cursor").unwrap_or(""))
        .map_err(|e| XrpcError::invalid_request(e.to_string()))?;
    Ok(SubscribeEventsParams {
        cursor,
        kinds,
        options,
        compress,
    })
}

/// Go's `strconv.ParseUint(s, 10, 64)`: decimal digits only (no sign), no overflow.
fn parse_go_uint(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscription::MAX_SHAPE_LABEL_BYTES;

    fn parse(query: &str) -> Result<SubscribeEventsParams, XrpcError> {
        parse_subscribe_events_query(query, &[])
    }

    fn err(query: &str) -> XrpcError {
        parse(query).expect_err(query)
    }

    const DICT: u32 = 20_260_811;

    #[test]
    fn no_parameters_is_the_full_live_plain_stream() {
        let p = parse("").unwrap();
        assert_eq!(
            p,
            SubscribeEventsParams {
                cursor: None,
                kinds: KindSet::ALL,
                options: SubscriberOptions::default(),
                compress: false,
            }
        );
        assert_eq!(p.shape_key().label(), "v2:full");
        // Unknown parameters are ignored.
        assert_eq!(parse("foo=bar&extended=true").unwrap(), p);
    }

    #[test]
    fn filters_map_onto_subscriber_options_and_shapes() {
        let p = parse(&format!(
            "kinds=commit&kinds=identity&collections=app.bsky.feed.post&collections=app.bsky.graph.*\
             &dids=did:plc:bbb&dids=did:plc:aaa&dids=did:plc:aaa&maxMessageSizeBytes=4096\
             &zstdDictionary={DICT}&cursor=17"
        ))
        .unwrap();
        assert_eq!(p.cursor, Some(Cursor::Seq(17)));
        assert!(p.compress);
        assert_eq!(
            p.kinds,
            KindSet::of(&[MessageKind::Commit, MessageKind::Identity])
        );
        assert_eq!(
            p.options,
            SubscriberOptions::new(
                &["app.bsky.feed.post", "app.bsky.graph.*"],
                &["did:plc:aaa", "did:plc:bbb"],
                Some(4096)
            )
            .unwrap()
        );
        let shape = p.shape_key();
        assert_eq!(
            shape.label(),
            "v2:k:commit,identity+c:app.bsky.feed.post,app.bsky.graph.*+max:4096+zstd"
        );
        let admits = |kind: MessageKind, c: Option<&str>, len: usize| {
            shape.wants(kind.event_kind(), c, &[0, 0, len, len / 3])
        };
        assert!(admits(
            MessageKind::Commit,
            Some("app.bsky.graph.follow"),
            4096
        ));
        assert!(!admits(
            MessageKind::Commit,
            Some("app.bsky.graph.follow"),
            4097
        ));
        assert!(!admits(MessageKind::Commit, Some("app.bsky.feed.like"), 10));
        assert!(admits(MessageKind::Identity, None, 10));
        assert!(!admits(MessageKind::Account, None, 10));
        assert!(p.wants(MessageKind::Identity, "did:plc:aaa", None));
        assert!(!p.wants(MessageKind::Identity, "did:plc:ccc", None));
        assert!(!p.wants(MessageKind::Sync, "did:plc:aaa", None));
        // collections alone: other kinds pass (commits only are constrained), sync too.
        let c = parse("collections=app.bsky.feed.post").unwrap();
        assert!(c.wants(MessageKind::Sync, "did:plc:x", None));
        assert!(c.wants(MessageKind::Account, "did:plc:x", None));
        assert!(!c.wants(MessageKind::Commit, "did:plc:x", Some("app.bsky.feed.like")));
        // Equivalent filters share a shape; a limit no frame can reach is dropped.
        assert_eq!(
            parse("kinds=identity&kinds=commit&maxMessageSizeBytes=4294967295")
                .unwrap()
                .shape_key(),
            parse("kinds=commit&kinds=identity&kinds=commit")
                .unwrap()
                .shape_key()
        );
        assert_eq!(
            parse("maxMessageSizeBytes=0")
                .unwrap()
                .options
                .max_message_size,
            None
        );
        assert_eq!(
            parse("kinds=sync").unwrap().shape_key().label(),
            "v2:k:sync"
        );
    }

    /// Every pre-upgrade 400: name and message.
    #[test]
    fn pre_upgrade_errors_name_the_fix() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "compress=true",
                "InvalidRequest",
                "compress=true / Socket-Encoding: zstd is the /subscribe (v1) opt-in; this endpoint uses zstdDictionary=<id> with the dictionary from getZstdDictionary",
            ),
            (
                "zstdDictionary=abc",
                "InvalidRequest",
                "zstdDictionary must be a positive integer zstd dictionary ID",
            ),
            (
                "zstdDictionary=0",
                "InvalidRequest",
                "zstdDictionary must be a positive integer zstd dictionary ID",
            ),
            (
                "zstdDictionary=-1",
                "InvalidRequest",
                "zstdDictionary must be a positive integer zstd dictionary ID",
            ),
            (
                "zstdDictionary=4294967296",
                "InvalidRequest",
                "zstdDictionary must be a positive integer zstd dictionary ID",
            ),
            (
                "zstdDictionary=1612007021",
                "UnknownZstdDictionary",
                "unknown zstd dictionary id 1612007021; current dictionary id is 20260811 (fetch it via getZstdDictionary and reconnect)",
            ),
            (
                "wantedDids=did:plc:a",
                "InvalidRequest",
                "subscribe: invalid options: wantedDids is the legacy /subscribe parameter; use dids",
            ),
            (
                "wantedCollections=app.bsky.feed.post",
                "InvalidRequest",
                "subscribe: invalid options: wantedCollections is the legacy /subscribe parameter; use collections",
            ),
            (
                "requireHello=true",
                "InvalidRequest",
                "subscribe: invalid options: requireHello is not supported on this endpoint; it is server-push only (subscriber-sourced messages were removed)",
            ),
            (
                "kinds=commit&kinds=commit&kinds=commit&kinds=commit&kinds=commit",
                "InvalidRequest",
                "subscribe: invalid options: too many kinds values: 5 > 4",
            ),
            (
                "kinds=label",
                "InvalidRequest",
                "subscribe: invalid options: unknown kind \"label\" (valid: commit, identity, account, sync)",
            ),
            (
                "kinds=Commit",
                "InvalidRequest",
                "subscribe: invalid options: unknown kind \"Commit\" (valid: commit, identity, account, sync)",
            ),
            (
                "dids=nope",
                "InvalidRequest",
                "subscribe: invalid options: invalid DID: nope",
            ),
            (
                "collections=app.*",
                "InvalidRequest",
                "subscribe: invalid options: invalid collection wildcard: app.*",
            ),
            (
                "collections=not_an_nsid",
                "InvalidRequest",
                "subscribe: invalid options: invalid collection: not_an_nsid",
            ),
            (
                "kinds=identity&collections=app.bsky.feed.post",
                "InvalidRequest",
                "subscribe: invalid options: collections filter can never apply: kinds excludes commit",
            ),
            (
                "maxMessageSizeBytes=x",
                "InvalidRequest",
                "subscribe: invalid options: invalid maxMessageSizeBytes \"x\"",
            ),
            (
                "maxMessageSizeBytes=-1",
                "InvalidRequest",
                "subscribe: invalid options: invalid maxMessageSizeBytes \"-1\"",
            ),
            (
                "maxMessageSizeBytes=4294967296",
                "InvalidRequest",
                "subscribe: invalid options: invalid maxMessageSizeBytes \"4294967296\"",
            ),
            (
                "maxMessageSizeBytes=",
                "InvalidRequest",
                "subscribe: invalid options: maxMessageSizeBytes must be one unsigned 32-bit integer",
            ),
            (
                "maxMessageSizeBytes=1&maxMessageSizeBytes=2",
                "InvalidRequest",
                "subscribe: invalid options: maxMessageSizeBytes must be one unsigned 32-bit integer",
            ),
            (
                "cursor=abc",
                "InvalidRequest",
                "subscribe: invalid cursor: \"abc\"",
            ),
            (
                "cursor=-5",
                "InvalidRequest",
                "subscribe: invalid cursor: negative value -5",
            ),
            (
                "a=%zz",
                "InvalidRequest",
                "subscribe: invalid options: invalid query: bad encoding in parameter \"a\"",
            ),
        ];
        for (query, name, message) in cases {
            let e = err(query);
            assert_eq!(
                (e.status, e.error, e.message.as_str()),
                (400, *name, *message),
                "{query}"
            );
        }
        let header = parse_subscribe_events_query("", &["zstd"]).unwrap_err();
        assert_eq!(header.error, "InvalidRequest");
        assert!(
            header
                .message
                .starts_with("compress=true / Socket-Encoding: zstd")
        );
        // compress=false or other values are not the opt-in.
        assert!(parse("compress=false").is_ok());
    }

    #[test]
    fn list_limits_count_raw_values() {
        let many_dids: String = (0..=MAX_WANTED_DIDS)
            .map(|i| format!("dids=did:plc:{i:024}&"))
            .collect();
        assert_eq!(
            err(&many_dids).message,
            "subscribe: invalid options: too many dids values: 10001 > 10000"
        );
        // Duplicates count too (v2 has no legacy leniency).
        let dup_collections = "collections=app.bsky.feed.post&".repeat(MAX_WANTED_COLLECTIONS + 1);
        assert_eq!(
            err(&dup_collections).message,
            "subscribe: invalid options: too many collections values: 101 > 100"
        );
        let at_limit = "collections=app.bsky.feed.post&".repeat(MAX_WANTED_COLLECTIONS);
        assert!(parse(&at_limit).is_ok());
    }

    #[test]
    fn checks_run_in_the_official_order() {
        // Compression before filters, filters before the cursor, DIDs before collections.
        assert_eq!(
            err("cursor=x&compress=true").message.split(' ').next(),
            Some("compress=true")
        );
        assert_eq!(
            err("cursor=x&zstdDictionary=5&wantedDids=a").error,
            "UnknownZstdDictionary"
        );
        assert!(err("cursor=x&kinds=nope").message.contains("unknown kind"));
        assert!(
            err("collections=bad&dids=bad")
                .message
                .contains("invalid DID")
        );
        assert!(
            err("wantedCollections=a&wantedDids=b")
                .message
                .contains("wantedDids")
        );
    }

    #[test]
    fn cursors_split_by_magnitude() {
        assert_eq!(parse("cursor=0").unwrap().cursor, Some(Cursor::Seq(0)));
        assert_eq!(
            parse("cursor=999999999999999").unwrap().cursor,
            Some(Cursor::Seq(999_999_999_999_999))
        );
        assert_eq!(
            parse("cursor=1000000000000000").unwrap().cursor,
            Some(Cursor::TimeUs(1_000_000_000_000_000))
        );
        assert_eq!(parse("cursor=").unwrap().cursor, None);
    }

    #[test]
    fn long_labels_are_cut_and_stay_distinct() {
        let a: String = (0..20)
            .map(|i| format!("collections=app.bsky.c{i}.x&"))
            .collect();
        let b = format!("{a}collections=app.bsky.zzz.y");
        let (la, lb) = (
            parse(&a).unwrap().shape_key().label(),
            parse(&b).unwrap().shape_key().label(),
        );
        assert!(la.len() <= MAX_SHAPE_LABEL_BYTES && lb.len() <= MAX_SHAPE_LABEL_BYTES);
        assert_ne!(la, lb);
    }
}
