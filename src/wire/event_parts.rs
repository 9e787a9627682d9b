//! One event, two wires: the parts of a Jetstream event as raw JSON values, read from either
//! wire and rendered to either.
//!
//! v1 (`/subscribe`): `{"did":D,"time_us":T,"kind":"commit","commit":{"rev":…,"operation":…,
//! "collection":…,"rkey":…,"record":…,"cid":…}}` (identity/account: `"kind":"identity",
//! "identity":{…}`), the order the official v1 server emits (and the sample events show).
//!
//! v2 (`subscribeEvents`, `xrpc.v1.json` framing): `{"$type":"message","payload":{…}}` whose
//! payload is the lexicon object with `$type` first and the other keys in alphabetical order —
//! the official server renders it with lexgen's generated `AppendJSON`, which writes `$type` and
//! then the struct's fields, sorted by name (api/jetstream/jetstreamsubscribeevents.go):
//! commit `cid, collection, did, operation, record, rev, rkey, seq, time, witnessedAt`,
//! identity `did, identity, seq, time, witnessedAt`, account `account, did, seq, time,
//! witnessedAt`, sync `did, seq, sync, time, witnessedAt`. `witnessedAt` (the instance's own
//! witness time) is in the lexicon the 2026 clients are generated from (PyPI `atproto` 0.0.73:
//! optional, on every event kind); the server source of August 2026 predates it, so its place
//! after `time` is the generator's alphabetical rule applied to it.
//!
//! Every value (DID, rev, record, the wrapped identity/account/sync object…) is copied as the
//! exact bytes the input had; only the envelope, `seq`, `time`/`time_us` and `witnessedAt` are
//! written here. So v1 → v2 → v1 gives back the original bytes (tested on every sample event).

use super::json_scan::{ObjectScan, object_members};
use super::v1_cursor::is_integer;
use super::{WireError, rfc3339};

/// Why: an upstream v2 frame is one event plus a small envelope; anything larger than the
/// largest event the relay stores (1 MiB) plus headroom is refused before parsing.
pub const MAX_V2_FRAME_BYTES: usize = crate::event::MAX_EVENT_BYTES + 4096;

/// The NSID every v2 message `$type` starts with.
pub const SUBSCRIBE_EVENTS_NSID: &str = "network.bsky.jetstream.subscribeEvents";

/// The four event kinds of the v2 wire (`#sync` has no v1 form).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A record create, update or delete.
    Commit,
    /// A handle or DID document change.
    Identity,
    /// An account status change.
    Account,
    /// A broken commit chain: consumers should resync the repo. v2 only.
    Sync,
}

impl MessageKind {
    /// The `kinds` value and the `$type` fragment (`commit` for `#commit`).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Commit => "commit",
            MessageKind::Identity => "identity",
            MessageKind::Account => "account",
            MessageKind::Sync => "sync",
        }
    }

    /// Every kind, in `kinds` enum order.
    pub const ALL: [MessageKind; 4] = [
        MessageKind::Commit,
        MessageKind::Identity,
        MessageKind::Account,
        MessageKind::Sync,
    ];

    /// The kind named `name` (`commit`, …), if any.
    pub fn from_name(name: &str) -> Option<MessageKind> {
        MessageKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The v1 kind of the same event; `None` for `#sync`.
    pub fn v1_kind(self) -> Option<crate::event::EventKind> {
        match self {
            MessageKind::Commit => Some(crate::event::EventKind::Commit),
            MessageKind::Identity => Some(crate::event::EventKind::Identity),
            MessageKind::Account => Some(crate::event::EventKind::Account),
            MessageKind::Sync => None,
        }
    }

    /// The relay's kind of the same event.
    pub fn event_kind(self) -> crate::event::EventKind {
        match self {
            MessageKind::Commit => crate::event::EventKind::Commit,
            MessageKind::Identity => crate::event::EventKind::Identity,
            MessageKind::Account => crate::event::EventKind::Account,
            MessageKind::Sync => crate::event::EventKind::Sync,
        }
    }
}

impl From<crate::event::EventKind> for MessageKind {
    fn from(kind: crate::event::EventKind) -> Self {
        match kind {
            crate::event::EventKind::Commit => MessageKind::Commit,
            crate::event::EventKind::Identity => MessageKind::Identity,
            crate::event::EventKind::Account => MessageKind::Account,
            crate::event::EventKind::Sync => MessageKind::Sync,
        }
    }
}

/// A commit's fields, each the raw JSON value from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitParts<'a> {
    /// `rev` (a string token).
    pub rev: &'a [u8],
    /// `operation` (a string token: create, update or delete).
    pub operation: &'a [u8],
    /// `collection` (a string token).
    pub collection: &'a [u8],
    /// `rkey` (a string token).
    pub rkey: &'a [u8],
    /// `record` (an object); absent on deletes.
    pub record: Option<&'a [u8]>,
    /// `cid` (a string token); absent on deletes.
    pub cid: Option<&'a [u8]>,
}

/// What follows the common fields: a commit's fields or the wrapped upstream object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body<'a> {
    /// A record mutation.
    Commit(CommitParts<'a>),
    /// The upstream `com.atproto.sync.subscribeRepos#identity` object, verbatim.
    Identity(&'a [u8]),
    /// The upstream `#account` object, verbatim.
    Account(&'a [u8]),
    /// The upstream `#sync` object, verbatim (v2 only).
    Sync(&'a [u8]),
}

/// One event, independent of the wire it came on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventParts<'a> {
    /// The repository DID (a string token, as the input escaped it).
    pub did: &'a [u8],
    /// The display time in unix µs: v1 `time_us`, v2 `time`.
    pub time_us: i64,
    /// Kind-specific fields.
    pub body: Body<'a>,
}

/// A parsed `subscribeEvents` frame (what a v2 upstream sends).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum V2Frame<'a> {
    /// An event message.
    Event {
        /// The upstream's seq (instance-local; its resume position).
        seq: u64,
        /// The upstream's witness time in unix µs, when it sent one.
        witnessed_us: Option<i64>,
        /// The event.
        event: EventParts<'a>,
    },
    /// An `#info` advisory (no seq; does not advance the cursor).
    Info {
        /// `OutdatedCursor`, `FutureCursor`, or a name this build does not know.
        name: String,
        /// Free text, when present.
        message: Option<String>,
    },
    /// A terminal error frame; the upstream closes the connection after it.
    Error {
        /// The XRPC error name (`ConsumerTooSlow`, …).
        error: String,
        /// Free text, when present.
        message: Option<String>,
    },
}

fn string_token<'a>(
    json: &'a [u8],
    scan: &ObjectScan,
    key: &'static str,
) -> Result<&'a [u8], WireError> {
    let value = scan.get(json, key).ok_or(WireError::MissingField(key))?;
    if value.first() == Some(&b'"') {
        Ok(value)
    } else {
        Err(WireError::InvalidField(key))
    }
}

fn object_token<'a>(
    json: &'a [u8],
    scan: &ObjectScan,
    key: &'static str,
) -> Result<&'a [u8], WireError> {
    let value = scan.get(json, key).ok_or(WireError::MissingField(key))?;
    if value.first() == Some(&b'{') {
        Ok(value)
    } else {
        Err(WireError::InvalidField(key))
    }
}

fn optional<'a>(
    json: &'a [u8],
    scan: &ObjectScan,
    key: &'static str,
    first_byte: u8,
) -> Result<Option<&'a [u8]>, WireError> {
    match scan.get(json, key) {
        None | Some(b"null") => Ok(None),
        Some(v) if v.first() == Some(&first_byte) => Ok(Some(v)),
        Some(_) => Err(WireError::InvalidField(key)),
    }
}

fn integer<T: std::str::FromStr>(token: &[u8], key: &'static str) -> Result<T, WireError> {
    if !is_integer(token) {
        return Err(WireError::InvalidField(key));
    }
    std::str::from_utf8(token)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(WireError::InvalidField(key))
}

/// Decodes a string token (escapes resolved).
fn decode_string(token: &[u8], key: &'static str) -> Result<String, WireError> {
    serde_json::from_slice(token).map_err(|_| WireError::InvalidField(key))
}

/// The commit fields of `commit` (the v1 `commit` object, or a v2 `#commit` payload).
fn commit_parts(commit: &[u8]) -> Result<CommitParts<'_>, WireError> {
    let scan = object_members(commit)?;
    Ok(CommitParts {
        rev: string_token(commit, &scan, "rev")?,
        operation: string_token(commit, &scan, "operation")?,
        collection: string_token(commit, &scan, "collection")?,
        rkey: string_token(commit, &scan, "rkey")?,
        record: optional(commit, &scan, "record", b'{')?,
        cid: optional(commit, &scan, "cid", b'"')?,
    })
}

impl<'a> EventParts<'a> {
    /// Reads a v1 event (`/subscribe` JSON, with or without a `cursor` field). Meant for events
    /// that passed [`crate::event::parse_event`] (which validates the JSON); this reads the
    /// structure and the fields it moves, and refuses anything it cannot place.
    pub fn from_v1(json: &'a [u8]) -> Result<Self, WireError> {
        let scan = object_members(json)?;
        let did = string_token(json, &scan, "did")?;
        let time_us = integer(
            scan.get(json, "time_us")
                .ok_or(WireError::MissingField("time_us"))?,
            "time_us",
        )?;
        let kind = string_token(json, &scan, "kind")?;
        let body = match kind {
            b"\"commit\"" => Body::Commit(commit_parts(object_token(json, &scan, "commit")?)?),
            b"\"identity\"" => Body::Identity(object_token(json, &scan, "identity")?),
            b"\"account\"" => Body::Account(object_token(json, &scan, "account")?),
            _ => return Err(WireError::InvalidField("kind")),
        };
        Ok(EventParts { did, time_us, body })
    }

    /// The event's kind.
    pub fn kind(&self) -> MessageKind {
        match self.body {
            Body::Commit(_) => MessageKind::Commit,
            Body::Identity(_) => MessageKind::Identity,
            Body::Account(_) => MessageKind::Account,
            Body::Sync(_) => MessageKind::Sync,
        }
    }

    /// Appends the v1 form (no `cursor`; see [`super::with_cursor`]). `#sync` has none.
    pub fn render_v1(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let (kind, object): (&[u8], &[u8]) = match &self.body {
            Body::Commit(_) => (b"commit", b""),
            Body::Identity(o) => (b"identity", o),
            Body::Account(o) => (b"account", o),
            Body::Sync(_) => return Err(WireError::NoV1Form),
        };
        out.extend_from_slice(b"{\"did\":");
        out.extend_from_slice(self.did);
        out.extend_from_slice(b",\"time_us\":");
        out.extend_from_slice(self.time_us.to_string().as_bytes());
        out.extend_from_slice(b",\"kind\":\"");
        out.extend_from_slice(kind);
        out.extend_from_slice(b"\",\"");
        out.extend_from_slice(kind);
        out.extend_from_slice(b"\":");
        match &self.body {
            Body::Commit(c) => {
                out.extend_from_slice(b"{\"rev\":");
                out.extend_from_slice(c.rev);
                out.extend_from_slice(b",\"operation\":");
                out.extend_from_slice(c.operation);
                out.extend_from_slice(b",\"collection\":");
                out.extend_from_slice(c.collection);
                out.extend_from_slice(b",\"rkey\":");
                out.extend_from_slice(c.rkey);
                if let Some(record) = c.record {
                    out.extend_from_slice(b",\"record\":");
                    out.extend_from_slice(record);
                }
                if let Some(cid) = c.cid {
                    out.extend_from_slice(b",\"cid\":");
                    out.extend_from_slice(cid);
                }
                out.push(b'}');
            }
            _ => out.extend_from_slice(object),
        }
        out.push(b'}');
        Ok(())
    }

    /// Appends the v2 message frame with `seq` and the witness time `witnessed_us` (unix µs).
    /// Fails (appending nothing) only when a time is outside RFC 3339's years 0000–9999.
    pub fn render_v2(
        &self,
        seq: u64,
        witnessed_us: i64,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        let mut time = Vec::with_capacity(27);
        rfc3339::format_micros(self.time_us, &mut time)?;
        let mut witnessed = Vec::with_capacity(27);
        rfc3339::format_micros(witnessed_us, &mut witnessed)?;
        let seq_text = seq.to_string();
        let field = |out: &mut Vec<u8>, key: &[u8], value: &[u8]| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key);
            out.extend_from_slice(b"\":");
            out.extend_from_slice(value);
        };
        // `seq`, then (after `sync` for #sync) `time` and `witnessedAt`: alphabetical places.
        let seq_field = |out: &mut Vec<u8>| field(out, b"seq", seq_text.as_bytes());
        let times = |out: &mut Vec<u8>| {
            out.extend_from_slice(b",\"time\":\"");
            out.extend_from_slice(&time);
            out.extend_from_slice(b"\",\"witnessedAt\":\"");
            out.extend_from_slice(&witnessed);
            out.push(b'"');
        };
        out.extend_from_slice(b"{\"$type\":\"message\",\"payload\":{\"$type\":\"");
        out.extend_from_slice(SUBSCRIBE_EVENTS_NSID.as_bytes());
        out.push(b'#');
        out.extend_from_slice(self.kind().as_str().as_bytes());
        out.push(b'"');
        match &self.body {
            Body::Commit(c) => {
                if let Some(cid) = c.cid {
                    field(out, b"cid", cid);
                }
                field(out, b"collection", c.collection);
                field(out, b"did", self.did);
                field(out, b"operation", c.operation);
                if let Some(record) = c.record {
                    field(out, b"record", record);
                }
                field(out, b"rev", c.rev);
                field(out, b"rkey", c.rkey);
                seq_field(out);
            }
            Body::Identity(o) => {
                field(out, b"did", self.did);
                field(out, b"identity", o);
                seq_field(out);
            }
            Body::Account(o) => {
                field(out, b"account", o);
                field(out, b"did", self.did);
                seq_field(out);
            }
            Body::Sync(o) => {
                field(out, b"did", self.did);
                seq_field(out);
                field(out, b"sync", o);
            }
        }
        times(out);
        out.extend_from_slice(b"}}");
        Ok(())
    }
}

/// Reads one `subscribeEvents` frame (the text frame, or a compressed frame's decompressed
/// bytes). The whole frame is validated as JSON first: this is what a v2 upstream sends, and
/// nothing malformed may reach the log.
pub fn parse_v2_frame(frame: &[u8]) -> Result<V2Frame<'_>, WireError> {
    if frame.len() > MAX_V2_FRAME_BYTES {
        return Err(WireError::TooLarge(frame.len()));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(frame)
        .map_err(|e| WireError::InvalidJson(e.to_string()))?;
    let scan = object_members(frame)?;
    let frame_type = string_token(frame, &scan, "$type")?;
    match frame_type {
        b"\"error\"" => {
            let error = decode_string(string_token(frame, &scan, "error")?, "error")?;
            let message = optional(frame, &scan, "message", b'"')?
                .map(|m| decode_string(m, "message"))
                .transpose()?;
            return Ok(V2Frame::Error { error, message });
        }
        b"\"message\"" => {}
        _ => return Err(WireError::InvalidField("$type")),
    }
    let payload = object_token(frame, &scan, "payload")?;
    let scan = object_members(payload)?;
    let payload_type = decode_string(string_token(payload, &scan, "$type")?, "payload.$type")?;
    let fragment = payload_type
        .strip_prefix(SUBSCRIBE_EVENTS_NSID)
        .and_then(|rest| rest.strip_prefix('#'))
        .ok_or(WireError::UnknownType(payload_type.clone()))?;
    if fragment == "info" {
        let name = decode_string(string_token(payload, &scan, "name")?, "name")?;
        let message = optional(payload, &scan, "message", b'"')?
            .map(|m| decode_string(m, "message"))
            .transpose()?;
        return Ok(V2Frame::Info { name, message });
    }
    let kind = MessageKind::from_name(fragment).ok_or(WireError::UnknownType(payload_type))?;
    let seq = integer(
        scan.get(payload, "seq")
            .ok_or(WireError::MissingField("seq"))?,
        "seq",
    )?;
    let did = string_token(payload, &scan, "did")?;
    let time = decode_string(string_token(payload, &scan, "time")?, "time")?;
    let time_us = rfc3339::parse_micros(&time).map_err(|_| WireError::InvalidField("time"))?;
    let witnessed_us = optional(payload, &scan, "witnessedAt", b'"')?
        .map(|w| {
            let text = decode_string(w, "witnessedAt")?;
            rfc3339::parse_micros(&text).map_err(|_| WireError::InvalidField("witnessedAt"))
        })
        .transpose()?;
    let body = match kind {
        MessageKind::Commit => Body::Commit(commit_parts(payload)?),
        MessageKind::Identity => Body::Identity(object_token(payload, &scan, "identity")?),
        MessageKind::Account => Body::Account(object_token(payload, &scan, "account")?),
        MessageKind::Sync => Body::Sync(object_token(payload, &scan, "sync")?),
    };
    Ok(V2Frame::Event {
        seq,
        witnessed_us,
        event: EventParts { did, time_us, body },
    })
}

/// Checks, without rendering anything, that the writer can encode the v1 event `v1_json`
/// witnessed at `witnessed_us` (when the upstream says): [`super::with_cursor`] and
/// [`v1_to_v2`] accept it. The follower runs it on every event before appending: an event
/// [`crate::event::parse_v1_event`] accepts may still be unconvertible (a `time_us` outside
/// years 0000–9999, a non-object `record`, a non-string `cid`, an escaped top-level key), and
/// the writer must never be handed one.
pub fn check_v1_convertible(v1_json: &[u8], witnessed_us: Option<i64>) -> Result<(), WireError> {
    // `from_v1` finds `time_us` by its raw key and checks it is an integer, as `with_cursor` does.
    EventParts::from_v1(v1_json)?.check_times(witnessed_us)
}

impl EventParts<'_> {
    /// Whether [`EventParts::render_v2`] can render the event's time and `witnessed_us` (when
    /// known): both within years 0000–9999.
    pub fn check_times(&self, witnessed_us: Option<i64>) -> Result<(), WireError> {
        rfc3339::check_range(self.time_us)?;
        if let Some(w) = witnessed_us {
            rfc3339::check_range(w)?;
        }
        Ok(())
    }
}

/// v1 event JSON + the relay's seq + its witness time → the v2 message frame.
pub fn v1_to_v2(
    v1_json: &[u8],
    seq: u64,
    witnessed_us: i64,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    EventParts::from_v1(v1_json)?.render_v2(seq, witnessed_us, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::with_cursor;

    const SAMPLE: &str = include_str!("../../assets/jetstream-v1-sample.jsonl");
    /// A witness time a little after the sample's time_us values.
    const WITNESSED: i64 = 1_783_175_889_000_001;

    fn lines() -> Vec<&'static str> {
        SAMPLE.lines().filter(|l| !l.is_empty()).collect()
    }

    fn v2(line: &str, seq: u64) -> String {
        let mut out = Vec::new();
        v1_to_v2(line.as_bytes(), seq, WITNESSED, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn line_with(needle: &str) -> &'static str {
        lines().into_iter().find(|l| l.contains(needle)).unwrap()
    }

    #[test]
    fn golden_v2_commit_create() {
        let line = lines()[0];
        assert_eq!(
            v2(line, 12_345),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#commit","cid":"bafyreiguce4jh7kcbmof3pmcvasifqtw24b6isakj5ve5ga2b4z4alpc4i","collection":"app.bsky.feed.like","did":"did:plc:wq4aajammjtxdomz3e23667t","operation":"create","record":{"$type":"app.bsky.feed.like","createdAt":"2026-07-04T14:38:08.999Z","subject":{"cid":"bafyreiftot7eltsc3f6g4qktykmbv6jcmdmhcx5osscan6jpdxkpqcmcza","uri":"at://did:plc:r2zybk6op3ymzpz6jhqpkoy5/app.bsky.feed.post/3mpsjbtci2c2o"}},"rev":"3mptbypluud2a","rkey":"3mptbyplj5d2a","seq":12345,"time":"2026-07-04T14:38:08.085434Z","witnessedAt":"2026-07-04T14:38:09.000001Z"}}"#
        );
    }

    #[test]
    fn golden_v2_delete_identity_account() {
        assert_eq!(
            v2(line_with("\"3m3q3ut7jsm2m\""), 7),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#commit","collection":"app.bsky.graph.follow","did":"did:plc:ux2eeflheratfrvp3xfbp4zi","operation":"delete","rev":"3mptbyp63ih2m","rkey":"3m3q3ut7jsm2m","seq":7,"time":"2026-07-04T14:38:08.112407Z","witnessedAt":"2026-07-04T14:38:09.000001Z"}}"#
        );
        assert_eq!(
            v2(line_with("\"kind\":\"identity\""), 8),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#identity","did":"did:plc:hqvhxrowqbemo5e4wjnj6zao","identity":{"did":"did:plc:hqvhxrowqbemo5e4wjnj6zao","seq":31527015470,"time":"2026-07-04T14:38:07.877Z"},"seq":8,"time":"2026-07-04T14:38:08.384849Z","witnessedAt":"2026-07-04T14:38:09.000001Z"}}"#
        );
        assert_eq!(
            v2(line_with("\"kind\":\"account\""), 9),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#account","account":{"active":true,"did":"did:plc:hqvhxrowqbemo5e4wjnj6zao","seq":31527015471,"time":"2026-07-04T14:38:07.877Z"},"did":"did:plc:hqvhxrowqbemo5e4wjnj6zao","seq":9,"time":"2026-07-04T14:38:08.390226Z","witnessedAt":"2026-07-04T14:38:09.000001Z"}}"#
        );
    }

    /// Every sample event: v2 payload keys are `$type` then alphabetical, values equal the v1
    /// event's, and v2 → v1 gives back the exact upstream bytes.
    #[test]
    fn every_sample_event_round_trips_v1_v2_v1() {
        for (i, line) in lines().into_iter().enumerate() {
            let seq = 40_000 + i as u64;
            let text = v2(line, seq);
            let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
            let v1: serde_json::Value = serde_json::from_str(line).unwrap();
            let payload = frame["payload"].as_object().unwrap();
            assert_eq!(frame["$type"], "message");
            // Byte order of the payload's keys: `$type`, then alphabetical.
            let outer = object_members(text.as_bytes()).unwrap();
            let raw_payload = outer.get(text.as_bytes(), "payload").unwrap();
            let inner = object_members(raw_payload).unwrap();
            let keys: Vec<&[u8]> = inner
                .members
                .iter()
                .map(|m| &raw_payload[m.key.clone()])
                .collect();
            assert_eq!(keys[0], b"$type");
            assert!(keys[1..].windows(2).all(|w| w[0] < w[1]), "{text}");
            assert_eq!(keys.len(), payload.len());
            assert_eq!(payload["seq"], seq);
            assert_eq!(payload["did"], v1["did"]);
            let kind = v1["kind"].as_str().unwrap();
            assert_eq!(
                payload["$type"],
                format!("network.bsky.jetstream.subscribeEvents#{kind}")
            );
            if kind == "commit" {
                for key in ["rev", "operation", "collection", "rkey", "record", "cid"] {
                    assert_eq!(payload.get(key), v1["commit"].get(key), "{key}");
                }
            } else {
                assert_eq!(payload[kind], v1[kind]);
            }
            let time = payload["time"].as_str().unwrap();
            assert_eq!(time.len(), 27);
            assert_eq!(
                rfc3339::parse_micros(time),
                Ok(v1["time_us"].as_i64().unwrap())
            );
            match parse_v2_frame(text.as_bytes()).unwrap() {
                V2Frame::Event {
                    seq: got_seq,
                    witnessed_us,
                    event,
                } => {
                    assert_eq!((got_seq, witnessed_us), (seq, Some(WITNESSED)));
                    let mut back = Vec::new();
                    event.render_v1(&mut back).unwrap();
                    assert_eq!(String::from_utf8(back).unwrap(), line, "event {i}");
                    // And v2 → v2 is the identity too.
                    let mut again = Vec::new();
                    event.render_v2(seq, WITNESSED, &mut again).unwrap();
                    assert_eq!(String::from_utf8(again).unwrap(), text);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_v1_cursor_never_reaches_v2_and_v1_with_cursor_converts() {
        let line = lines()[3];
        let mut with = Vec::new();
        with_cursor(line.as_bytes(), 99, &mut with).unwrap();
        let mut a = Vec::new();
        v1_to_v2(&with, 5, WITNESSED, &mut a).unwrap();
        assert_eq!(String::from_utf8(a).unwrap(), v2(line, 5));
    }

    #[test]
    fn sync_has_no_v1_form_and_keeps_its_object() {
        let frame = r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#sync","did":"did:plc:a","seq":3,"sync":{"blocks":{"$bytes":"AA"},"did":"did:plc:a","rev":"r","seq":1,"time":"2026-07-04T14:38:07.877Z"},"time":"2026-07-04T14:38:08.000000Z"}}"#;
        let V2Frame::Event {
            seq,
            witnessed_us,
            event,
        } = parse_v2_frame(frame.as_bytes()).unwrap()
        else {
            panic!("not an event");
        };
        assert_eq!((seq, witnessed_us), (3, None));
        assert_eq!(event.kind(), MessageKind::Sync);
        assert_eq!(event.render_v1(&mut Vec::new()), Err(WireError::NoV1Form));
        let mut out = Vec::new();
        event.render_v2(4, 1_783_175_888_000_000, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#sync","did":"did:plc:a","seq":4,"sync":{"blocks":{"$bytes":"AA"},"did":"did:plc:a","rev":"r","seq":1,"time":"2026-07-04T14:38:07.877Z"},"time":"2026-07-04T14:38:08.000000Z","witnessedAt":"2026-07-04T14:38:08.000000Z"}}"#
        );
    }

    #[test]
    fn info_and_error_frames_parse() {
        assert_eq!(
            parse_v2_frame(br#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#info","message":"m","name":"OutdatedCursor"}}"#).unwrap(),
            V2Frame::Info { name: "OutdatedCursor".into(), message: Some("m".into()) }
        );
        assert_eq!(
            parse_v2_frame(br#"{"$type":"error","error":"ConsumerTooSlow"}"#).unwrap(),
            V2Frame::Error {
                error: "ConsumerTooSlow".into(),
                message: None
            }
        );
    }

    #[test]
    fn malformed_upstream_frames_are_refused_with_a_reason() {
        let ok = v2(lines()[0], 1);
        let cases: Vec<(String, &str)> = vec![
            (ok[..ok.len() - 1].to_owned(), "InvalidJson"),
            ("[]".into(), "Malformed"),
            (r#"{"$type":"other"}"#.into(), "InvalidField(\"$type\")"),
            (r#"{"$type":"message"}"#.into(), "MissingField(\"payload\")"),
            (
                r#"{"$type":"message","payload":{"$type":"app.bsky.feed.post"}}"#.into(),
                "UnknownType",
            ),
            (
                r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#label"}}"#.into(),
                "UnknownType",
            ),
            (ok.replace("\"seq\":1,", "\"seq\":-1,"), "InvalidField(\"seq\")"),
            (ok.replace("\"seq\":1,", "\"seq\":\"1\","), "InvalidField(\"seq\")"),
            (ok.replace("\"seq\":1,", ""), "MissingField(\"seq\")"),
            (ok.replace("2026-07-04T14:38:08.085434Z", "yesterday"), "InvalidField(\"time\")"),
            (ok.replace("\"rkey\":", "\"rkeyx\":"), "MissingField(\"rkey\")"),
            (ok.replace("\"did\":\"did:plc:wq4", "\"did\":{\"x\":\"did:plc:wq4").replace("67t\",\"operation", "67t\"},\"operation"), "InvalidField(\"did\")"),
        ];
        for (input, want) in cases {
            let got = format!("{:?}", parse_v2_frame(input.as_bytes()).unwrap_err());
            assert!(got.starts_with(want), "{input}: got {got}, want {want}");
        }
        let big = vec![b' '; MAX_V2_FRAME_BYTES + 1];
        assert!(matches!(parse_v2_frame(&big), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn v1_inputs_it_cannot_place_are_refused() {
        for (bad, want) in [
            (
                r#"{"time_us":1,"kind":"commit"}"#,
                WireError::MissingField("did"),
            ),
            (
                r#"{"did":"d","kind":"identity","identity":{}}"#,
                WireError::MissingField("time_us"),
            ),
            (
                r#"{"did":"d","time_us":1,"kind":"sync","sync":{}}"#,
                WireError::InvalidField("kind"),
            ),
            (
                r#"{"did":"d","time_us":1,"kind":"identity","identity":[]}"#,
                WireError::InvalidField("identity"),
            ),
            (
                r#"{"did":"d","time_us":1,"kind":"commit","commit":{"rev":"r","operation":"create","collection":"c"}}"#,
                WireError::MissingField("rkey"),
            ),
            (
                r#"{"did":"d","time_us":1,"kind":"commit","commit":{"rev":"r","operation":"create","collection":"c","rkey":"k","record":"x"}}"#,
                WireError::InvalidField("record"),
            ),
        ] {
            assert_eq!(EventParts::from_v1(bad.as_bytes()), Err(want), "{bad}");
        }
        // A time RFC 3339 cannot express: refused, nothing appended.
        let far = r#"{"did":"d","time_us":253402300800000000,"kind":"identity","identity":{}}"#;
        let mut out = Vec::new();
        assert!(matches!(
            v1_to_v2(far.as_bytes(), 1, 0, &mut out),
            Err(WireError::Time(_))
        ));
        assert!(out.is_empty());
    }

    /// Seeded mutations of real frames (byte flips, cuts, splices): the parsers never panic,
    /// and whatever they accept renders to valid JSON on both wires.
    #[test]
    fn mutated_frames_never_panic_and_accepted_ones_render_valid_json() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let bytes = b"{}[]\",:\\0123456789-aez";
        let seeds: Vec<Vec<u8>> = lines().iter().map(|l| v2(l, 9).into_bytes()).collect();
        let (mut accepted, mut v1_accepted) = (0, 0);
        for round in 0..15_000 {
            let base = &seeds[round % seeds.len()];
            let mut m = base.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % m.len().max(1);
                match next() % 4 {
                    0 => m[at] = bytes[(next() as usize) % bytes.len()],
                    1 => m.truncate(at),
                    2 => m.insert(at, bytes[(next() as usize) % bytes.len()]),
                    _ => {
                        m.remove(at.min(m.len().saturating_sub(1)));
                    }
                }
                if m.is_empty() {
                    break;
                }
            }
            // Output must be as valid as the input: JSON by the relay's own validator always
            // (serde_json's IgnoredAny, which lets lone `\uD800` escapes through), and strict
            // JSON (serde_json::Value) whenever the input was.
            let check = |out: &[u8], strict: bool| {
                serde_json::from_slice::<serde::de::IgnoredAny>(out).expect("output is JSON");
                if strict {
                    serde_json::from_slice::<serde_json::Value>(out).expect("strict JSON");
                }
            };
            let strict = serde_json::from_slice::<serde_json::Value>(&m).is_ok();
            if let Ok(V2Frame::Event { seq, event, .. }) = parse_v2_frame(&m) {
                accepted += 1;
                let mut out = Vec::new();
                if event.render_v1(&mut out).is_ok() {
                    check(&out, strict);
                    let mut with = Vec::new();
                    with_cursor(&out, seq, &mut with).expect("v1 output takes a cursor");
                    check(&with, strict);
                }
                out.clear();
                if event.render_v2(seq, WITNESSED, &mut out).is_ok() {
                    check(&out, strict);
                }
            }
            // The v1 side: whatever parse_event accepts converts to valid JSON or is refused.
            let mut v1 = lines()[round % lines().len()].as_bytes().to_vec();
            let at = (next() as usize) % v1.len();
            v1[at] = bytes[(next() as usize) % bytes.len()];
            if crate::event::parse_event(&v1).is_ok() {
                let strict = serde_json::from_slice::<serde_json::Value>(&v1).is_ok();
                let mut out = Vec::new();
                if v1_to_v2(&v1, 1, WITNESSED, &mut out).is_ok() {
                    v1_accepted += 1;
                    check(&out, strict);
                }
                out.clear();
                with_cursor(&v1, 1, &mut out).expect("a parsed event takes a cursor");
                check(&out, strict);
            }
        }
        // The mutations must exercise the accepting paths too, not only refusals.
        assert!(
            accepted > 500 && v1_accepted > 500,
            "{accepted} {v1_accepted}"
        );
    }

    #[test]
    #[ignore = "throughput report: cargo test --release --lib -- --ignored --nocapture wire::"]
    fn conversion_throughput() {
        let lines = lines();
        let rounds = 2_000;
        let mut out = Vec::with_capacity(4096);
        let mut c =
            crate::compress::EventCompressor::with_dictionary(crate::compress::Dictionary::V2)
                .unwrap();
        let mut sink = 0usize;
        let mut time = |name: &str, f: &mut dyn FnMut(&str, &mut Vec<u8>)| {
            let started = std::time::Instant::now();
            for _ in 0..rounds {
                for l in &lines {
                    out.clear();
                    f(l, &mut out);
                    sink += out.len();
                }
            }
            let per = started.elapsed().as_secs_f64() * 1e6 / (rounds * lines.len()) as f64;
            println!("{name}: {per:.2} µs/event");
        };
        time("with_cursor", &mut |l, o| {
            with_cursor(l.as_bytes(), 123_456_789, o).unwrap()
        });
        time("v1_to_v2", &mut |l, o| {
            v1_to_v2(l.as_bytes(), 123_456_789, WITNESSED, o).unwrap()
        });
        let mut text = Vec::new();
        time("v1_to_v2 + v2 zstd", &mut |l, o| {
            text.clear();
            v1_to_v2(l.as_bytes(), 123_456_789, WITNESSED, &mut text).unwrap();
            c.compress(&text, o).unwrap();
        });
        println!("[{sink}]");
    }
}
