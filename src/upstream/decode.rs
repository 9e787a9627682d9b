//! Upstream WebSocket messages → events, from either wire.
//!
//! - `/subscribe` (v1): each text message is one event, validated by
//!   [`crate::event::parse_v1_event`]. Whether it carries the upstream's seq as a top-level
//!   `cursor` (official Jetstream since 2026, another jetrelay) is detected per event; the
//!   field is removed from what the relay stores ([`crate::wire::without_cursor`]), so an
//!   instance-local seq never reaches a client.
//! - `subscribeEvents` (v2): each message is one `xrpc.v1.json` frame, as text or, when the
//!   session asked for `zstdDictionary`, as one zstd frame made with the v2 dictionary
//!   (decompressed here, once). Events are converted to the v1 JSON once
//!   ([`crate::wire::EventParts::render_v1`], byte-identical to the upstream's `/subscribe`
//!   JSON of the same event); `#sync` has no v1 form and passes through as its parts; `#info`
//!   and error frames are returned for the follower to act on.

use std::borrow::Cow;

use tungstenite::Message;

use super::SkipReason;
use crate::compress::{Dictionary, EventDecompressor};
use crate::event::{EventMeta, parse_event, parse_v1_event, sync_event_meta};
use crate::wire::event_parts::MAX_V2_FRAME_BYTES;
use crate::wire::json_scan::object_members;
use crate::wire::{Body, EventParts, SUBSCRIBE_EVENTS_PATH, V2Frame, WireError, parse_v2_frame};

/// Which wire an upstream URL speaks, from its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamWire {
    /// `/subscribe` (any path but the v2 one): v1 JSON events, each with or without the
    /// upstream's seq as `cursor`.
    V1,
    /// `/xrpc/network.bsky.jetstream.subscribeEvents`: v2 message frames.
    V2,
}

impl UpstreamWire {
    /// The wire of `url`: v2 when its path is the `subscribeEvents` path.
    pub fn of_url(url: &str) -> UpstreamWire {
        let without_fragment = url.split('#').next().unwrap_or(url);
        let path = without_fragment
            .split('?')
            .next()
            .unwrap_or(without_fragment);
        if path.ends_with(SUBSCRIBE_EVENTS_PATH) {
            UpstreamWire::V2
        } else {
            UpstreamWire::V1
        }
    }
}

/// How a session's v2 frames arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameEncoding {
    /// Text frames (every v1 session; a v2 session without `zstdDictionary`).
    Text,
    /// Binary frames, each one zstd frame made with the v2 dictionary.
    Zstd,
}

/// One upstream event, decoded.
#[derive(Debug)]
pub struct Event<'a> {
    /// What the relay indexes; `time_us` is still the upstream's (the follower bounds it).
    pub meta: EventMeta<'a>,
    /// The legacy v1 JSON without any `cursor` (empty for `#sync`).
    pub v1_json: &'a [u8],
    /// `#sync` only: its parts.
    pub sync: Option<EventParts<'a>>,
    /// The upstream's seq, when its wire carries one.
    pub upstream_seq: Option<u64>,
    /// v2 `witnessedAt` (unix µs), when sent.
    pub witnessed_us: Option<i64>,
}

/// What one upstream message is.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// An event.
    Event(Event<'a>),
    /// A v2 `#info` advisory.
    Info {
        /// `OutdatedCursor`, `FutureCursor`, or a name this build does not know.
        name: String,
        /// Free text, when present.
        message: Option<String>,
    },
    /// A v2 error frame: the upstream closes the connection after it.
    Error {
        /// The XRPC error name (`ConsumerTooSlow`, …).
        error: String,
        /// Free text, when present.
        message: Option<String>,
    },
    /// Not usable: counted and logged, never stored.
    Skip {
        /// Why.
        reason: SkipReason,
        /// For the log.
        detail: String,
    },
    /// A control frame (ping, pong, close) or a raw frame: nothing to decode.
    Control,
}

/// Bytes a session received and what they decoded to (the ingest saving of compression).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Data messages received.
    pub messages: u64,
    /// Their payload bytes as received.
    pub wire_bytes: u64,
    /// Their payload bytes after decompression (= `wire_bytes` on text sessions).
    pub frame_bytes: u64,
}

/// Decodes upstream messages; holds the scratch buffers and the decompressor it reuses. Public
/// (with [`Decoded`]) for the `v2_frame` fuzz target, which drives it as the follower does.
#[derive(Default)]
pub struct Decoder {
    /// The current event's v1 JSON when it differs from the bytes received (an upstream
    /// `cursor` removed, or rendered from v2).
    v1: Vec<u8>,
    /// The current v2 frame, decompressed.
    frame: Vec<u8>,
    /// The v2 dictionary's decompressor, created with the first compressed frame.
    decompressor: Option<EventDecompressor>,
    /// Counted since the last [`Decoder::take_stats`].
    stats: TrafficStats,
}

impl Decoder {
    /// The traffic since the last call, and starts counting again.
    pub fn take_stats(&mut self) -> TrafficStats {
        std::mem::take(&mut self.stats)
    }

    /// Decodes one message of a session on `wire` whose frames arrive as `encoding`.
    pub fn decode<'a>(
        &'a mut self,
        wire: UpstreamWire,
        encoding: FrameEncoding,
        message: &'a Message,
    ) -> Decoded<'a> {
        let (bytes, binary): (&[u8], bool) = match message {
            Message::Text(text) => (text.as_bytes(), false),
            Message::Binary(bytes) => (bytes, true),
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {
                return Decoded::Control;
            }
        };
        self.stats.messages += 1;
        self.stats.wire_bytes += bytes.len() as u64;
        match (wire, binary, encoding) {
            (UpstreamWire::V2, true, FrameEncoding::Zstd) => {
                let decompressor = match &mut self.decompressor {
                    Some(d) => d,
                    None => match EventDecompressor::with_dictionary(Dictionary::V2) {
                        Ok(d) => self.decompressor.insert(d),
                        Err(e) => return skip(SkipReason::Undecodable, e.to_string()),
                    },
                };
                self.frame = match decompressor.decompress(bytes, MAX_V2_FRAME_BYTES) {
                    Ok(frame) => frame,
                    Err(e) => {
                        let detail = format!("{} byte binary frame: {e}", bytes.len());
                        return skip(SkipReason::Undecodable, detail);
                    }
                };
                self.stats.frame_bytes += self.frame.len() as u64;
                // Text frames are UTF-8 by the WebSocket layer; decompressed bytes are not.
                if let Err(e) = std::str::from_utf8(&self.frame) {
                    return skip(SkipReason::InvalidJson, format!("invalid UTF-8: {e}"));
                }
                decode_v2(&self.frame, &mut self.v1)
            }
            (_, true, _) => {
                self.stats.frame_bytes += bytes.len() as u64;
                skip(
                    SkipReason::Binary,
                    format!("{} byte binary message", bytes.len()),
                )
            }
            (UpstreamWire::V2, false, _) => {
                self.stats.frame_bytes += bytes.len() as u64;
                decode_v2(bytes, &mut self.v1)
            }
            (UpstreamWire::V1, false, _) => {
                self.stats.frame_bytes += bytes.len() as u64;
                decode_v1(bytes, &mut self.v1)
            }
        }
    }
}

fn skip<'a>(reason: SkipReason, detail: String) -> Decoded<'a> {
    Decoded::Skip { reason, detail }
}

/// A `/subscribe` event, with or without the upstream's `cursor`.
fn decode_v1<'a>(json: &'a [u8], scratch: &'a mut Vec<u8>) -> Decoded<'a> {
    let (meta, upstream_seq) = match parse_v1_event(json) {
        Ok(parsed) => parsed,
        Err(e) => return skip(SkipReason::from(&e), e.to_string()),
    };
    let v1_json: &'a [u8] = match upstream_seq {
        None => json,
        Some(_) => {
            scratch.clear();
            if let Err(e) = crate::wire::without_cursor(json, scratch) {
                return skip(wire_skip_reason(&e), e.to_string());
            }
            scratch
        }
    };
    if let Err(e) = crate::wire::check_v1_convertible(v1_json, None) {
        return unconvertible(&e);
    }
    Decoded::Event(Event {
        meta,
        v1_json,
        sync: None,
        upstream_seq,
        witnessed_us: None,
    })
}

/// An event the writer could not encode: skipped here, before the writer's append (which
/// retries until it succeeds) could be stuck on it; the upstream re-delivers it after every
/// restart, so it would stop ingestion for good.
fn unconvertible<'a>(e: &WireError) -> Decoded<'a> {
    skip(SkipReason::Unconvertible, format!("cannot re-encode: {e}"))
}

/// A `subscribeEvents` frame (text, or decompressed).
fn decode_v2<'a>(frame: &'a [u8], scratch: &'a mut Vec<u8>) -> Decoded<'a> {
    let (seq, witnessed_us, event) = match parse_v2_frame(frame) {
        Ok(V2Frame::Event {
            seq,
            witnessed_us,
            event,
        }) => (seq, witnessed_us, event),
        Ok(V2Frame::Info { name, message }) => return Decoded::Info { name, message },
        Ok(V2Frame::Error { error, message }) => return Decoded::Error { error, message },
        Err(e) => return skip(wire_skip_reason(&e), e.to_string()),
    };
    if let Body::Sync(object) = event.body {
        let meta = match sync_meta(&event, object) {
            Ok(meta) => meta,
            Err((reason, detail)) => return skip(reason, detail),
        };
        if let Err(e) = event.check_times(witnessed_us) {
            return unconvertible(&e);
        }
        return Decoded::Event(Event {
            meta,
            v1_json: b"",
            sync: Some(event),
            upstream_seq: Some(seq),
            witnessed_us,
        });
    }
    scratch.clear();
    if let Err(e) = event.render_v1(scratch) {
        return skip(wire_skip_reason(&e), e.to_string());
    }
    let v1_json: &'a [u8] = scratch;
    let meta = match parse_event(v1_json) {
        Ok(meta) => meta,
        Err(e) => return skip(SkipReason::from(&e), e.to_string()),
    };
    if let Err(e) = crate::wire::check_v1_convertible(v1_json, witnessed_us) {
        return unconvertible(&e);
    }
    Decoded::Event(Event {
        meta,
        v1_json,
        sync: None,
        upstream_seq: Some(seq),
        witnessed_us,
    })
}

/// The `(time_us, dedup key)` of a `#sync` from its v2 message (as the relay stores it): what
/// a restarted follower must remember to drop the upstream's replayed copy, which has no v1
/// JSON to key. `None` when the message is not a well-formed `#sync`.
pub fn sync_key(v2_message: &[u8]) -> Option<(i64, u64)> {
    let Ok(V2Frame::Event { event, .. }) = parse_v2_frame(v2_message) else {
        return None;
    };
    let Body::Sync(object) = event.body else {
        return None;
    };
    let meta = sync_meta(&event, object).ok()?;
    Some((meta.time_us, meta.dedup_key))
}

/// The metadata of a `#sync`: its DID, its time, and the repo revision its dedup key needs.
fn sync_meta<'a>(
    event: &EventParts<'a>,
    object: &'a [u8],
) -> Result<EventMeta<'a>, (SkipReason, String)> {
    let did =
        json_string(event.did).ok_or((SkipReason::MissingField, "invalid field did".to_owned()))?;
    let scan = object_members(object).map_err(|e| (SkipReason::InvalidJson, e.to_string()))?;
    let rev = scan.get(object, "rev").and_then(json_string).ok_or((
        SkipReason::MissingField,
        "missing field sync.rev".to_owned(),
    ))?;
    sync_event_meta(did, event.time_us, &rev).map_err(|e| (SkipReason::from(&e), e.to_string()))
}

/// A JSON string token's value, borrowed when it has no escapes.
fn json_string(token: &[u8]) -> Option<Cow<'_, str>> {
    let inner = token.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if !inner.contains(&b'\\') {
        return std::str::from_utf8(inner).ok().map(Cow::Borrowed);
    }
    serde_json::from_slice::<String>(token).ok().map(Cow::Owned)
}

/// The skip reason of a v2 frame or v1 rewrite that failed.
fn wire_skip_reason(e: &WireError) -> SkipReason {
    match e {
        WireError::TooLarge(_) => SkipReason::TooLarge,
        WireError::Malformed(_) | WireError::InvalidJson(_) => SkipReason::InvalidJson,
        WireError::MissingField(_) | WireError::InvalidField(_) | WireError::Time(_) => {
            SkipReason::MissingField
        }
        WireError::UnknownType(_) | WireError::NoV1Form => SkipReason::UnknownKind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::EventCompressor;
    use crate::event::EventKind;

    const SAMPLE: &str = include_str!("../../assets/jetstream-v1-sample.jsonl");
    const WITNESSED: i64 = 1_783_175_889_000_001;

    fn lines() -> Vec<&'static str> {
        SAMPLE.lines().filter(|l| !l.is_empty()).collect()
    }

    fn v2(line: &str, seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        crate::wire::v1_to_v2(line.as_bytes(), seq, WITNESSED, &mut out).unwrap();
        out
    }

    fn text(bytes: Vec<u8>) -> Message {
        Message::Text(tungstenite::Utf8Bytes::try_from(bytes).unwrap())
    }

    fn event(d: Decoded<'_>) -> Event<'_> {
        match d {
            Decoded::Event(e) => e,
            other => panic!("not an event: {other:?}"),
        }
    }

    #[test]
    fn the_wire_is_the_urls_path() {
        for (url, wire) in [
            ("wss://h/subscribe", UpstreamWire::V1),
            ("ws://h:1/subscribe?cursor=5", UpstreamWire::V1),
            ("ws://h:1/", UpstreamWire::V1),
            (
                "wss://jetstream.us-east.bsky.network/xrpc/network.bsky.jetstream.subscribeEvents",
                UpstreamWire::V2,
            ),
            (
                "ws://h/xrpc/network.bsky.jetstream.subscribeEvents?kinds=commit#x",
                UpstreamWire::V2,
            ),
            (
                "ws://h/xrpc/network.bsky.jetstream.getZstdDictionary",
                UpstreamWire::V1,
            ),
        ] {
            assert_eq!(UpstreamWire::of_url(url), wire, "{url}");
        }
    }

    /// Every sample event arrives the same through the three encodings a v1 upstream can
    /// send it in: the v1 JSON stored is the legacy bytes, the metadata the same.
    #[test]
    fn every_sample_event_decodes_to_its_legacy_bytes_from_every_wire() {
        let mut d = Decoder::default();
        let mut compressor = EventCompressor::with_dictionary(Dictionary::V2).unwrap();
        for (i, line) in lines().into_iter().enumerate() {
            let seq = 500 + i as u64;
            let want = parse_event(line.as_bytes()).unwrap().into_owned();

            let legacy = text(line.as_bytes().to_vec());
            let e = event(d.decode(UpstreamWire::V1, FrameEncoding::Text, &legacy));
            assert_eq!((e.v1_json, e.upstream_seq), (line.as_bytes(), None));
            assert_eq!(e.meta, want);

            let mut with = Vec::new();
            crate::wire::with_cursor(line.as_bytes(), seq, &mut with).unwrap();
            let cursor = text(with);
            let e = event(d.decode(UpstreamWire::V1, FrameEncoding::Text, &cursor));
            assert_eq!((e.v1_json, e.upstream_seq), (line.as_bytes(), Some(seq)));
            assert_eq!(e.meta, want);

            let frame = v2(line, seq);
            let mut packed = Vec::new();
            compressor.compress(&frame, &mut packed).unwrap();
            for (message, encoding) in [
                (text(frame), FrameEncoding::Text),
                (Message::Binary(packed.into()), FrameEncoding::Zstd),
            ] {
                let e = event(d.decode(UpstreamWire::V2, encoding, &message));
                assert_eq!(e.v1_json, line.as_bytes(), "{encoding:?}");
                assert_eq!(e.meta, want);
                assert_eq!(e.upstream_seq, Some(seq));
                assert_eq!(e.witnessed_us, Some(WITNESSED));
                assert!(e.sync.is_none());
            }
        }
        let stats = d.take_stats();
        assert_eq!(stats.messages, 4 * lines().len() as u64);
        assert!(stats.frame_bytes > stats.wire_bytes, "{stats:?}");
        assert_eq!(d.take_stats(), TrafficStats::default());
    }

    /// The ingest bandwidth of the v2 wire with and without the dictionary, on the sample
    /// events (what the follower saves by asking for `zstdDictionary`).
    #[test]
    fn v2_dictionary_compression_saves_most_of_the_ingest_bandwidth() {
        let mut compressor = EventCompressor::with_dictionary(Dictionary::V2).unwrap();
        let (mut plain, mut packed) = (0usize, 0usize);
        for (i, line) in lines().into_iter().enumerate() {
            let frame = v2(line, 40_000_000 + i as u64);
            let mut out = Vec::new();
            compressor.compress(&frame, &mut out).unwrap();
            plain += frame.len();
            packed += out.len();
        }
        let ratio = plain as f64 / packed as f64;
        println!(
            "v2 frames of the {} sample events: {plain} bytes as text, {packed} compressed \
             with the v2 dictionary: {ratio:.2}x less ingest",
            lines().len()
        );
        assert!(ratio > 2.0, "{ratio:.2}");
    }

    /// What each wire costs the follower per event (decode only: parse, strip or convert,
    /// decompress), on the sample events.
    #[test]
    #[ignore = "throughput report: cargo test --release --lib -- --ignored --nocapture decode_throughput"]
    fn decode_throughput() {
        let mut compressor = EventCompressor::with_dictionary(Dictionary::V2).unwrap();
        let mut legacy = Vec::new();
        let mut cursor = Vec::new();
        let mut v2_text = Vec::new();
        let mut v2_zstd = Vec::new();
        for (i, line) in lines().into_iter().enumerate() {
            legacy.push(text(line.as_bytes().to_vec()));
            let mut with = Vec::new();
            crate::wire::with_cursor(line.as_bytes(), 1_000 + i as u64, &mut with).unwrap();
            cursor.push(text(with));
            let frame = v2(line, 1_000 + i as u64);
            let mut packed = Vec::new();
            compressor.compress(&frame, &mut packed).unwrap();
            v2_text.push(text(frame));
            v2_zstd.push(Message::Binary(packed.into()));
        }
        let rounds = 1_000;
        for (name, wire, encoding, messages) in [
            (
                "legacy /subscribe",
                UpstreamWire::V1,
                FrameEncoding::Text,
                &legacy,
            ),
            (
                "/subscribe with cursor",
                UpstreamWire::V1,
                FrameEncoding::Text,
                &cursor,
            ),
            (
                "subscribeEvents text",
                UpstreamWire::V2,
                FrameEncoding::Text,
                &v2_text,
            ),
            (
                "subscribeEvents zstd",
                UpstreamWire::V2,
                FrameEncoding::Zstd,
                &v2_zstd,
            ),
        ] {
            let mut d = Decoder::default();
            let started = std::time::Instant::now();
            let mut keys = 0u64;
            for _ in 0..rounds {
                for m in messages.iter() {
                    keys = keys.wrapping_add(event(d.decode(wire, encoding, m)).meta.dedup_key);
                }
            }
            let per_event =
                started.elapsed().as_secs_f64() * 1e6 / (rounds * messages.len()) as f64;
            println!("{name}: {per_event:.2} µs/event [{keys:x}]");
        }
    }

    #[test]
    fn sync_passes_through_as_parts_with_a_did_and_rev_key() {
        let object = br#"{"blocks":{"$bytes":"OqJl"},"did":"did:plc:abc","rev":"3mptbypluud2a","seq":9,"time":"2026-07-04T14:38:07.877Z"}"#;
        let parts = EventParts {
            did: b"\"did:plc:abc\"",
            time_us: 1_783_175_888_000_000,
            body: Body::Sync(object),
        };
        let mut frame = Vec::new();
        parts.render_v2(77, WITNESSED, &mut frame).unwrap();
        let message = text(frame);
        let mut d = Decoder::default();
        let e = event(d.decode(UpstreamWire::V2, FrameEncoding::Text, &message));
        assert_eq!(e.meta.kind, EventKind::Sync);
        assert_eq!(e.meta.did, "did:plc:abc");
        assert_eq!(e.meta.time_us, 1_783_175_888_000_000);
        assert_eq!(e.v1_json, b"");
        assert_eq!(e.sync, Some(parts));
        assert_eq!(
            (e.upstream_seq, e.witnessed_us),
            (Some(77), Some(WITNESSED))
        );
        let key = sync_event_meta(Cow::Borrowed("did:plc:abc"), 0, "3mptbypluud2a")
            .unwrap()
            .dedup_key;
        assert_eq!(e.meta.dedup_key, key);
        // Without a rev it cannot be de-duplicated: skipped, saying why.
        let bad = String::from_utf8(message.into_data().to_vec())
            .unwrap()
            .replace("\"rev\":", "\"xrev\":");
        let bad = text(bad.into_bytes());
        match d.decode(UpstreamWire::V2, FrameEncoding::Text, &bad) {
            Decoded::Skip { reason, detail } => {
                assert_eq!(reason, SkipReason::MissingField);
                assert!(detail.contains("sync.rev"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A commit event with `record` and `cid` tokens as given (to build the bad shapes).
    fn commit_with(record: &str, cid: &str) -> String {
        format!(
            r#"{{"did":"did:plc:abc","time_us":1783175888085434,"kind":"commit","commit":{{"rev":"3mptbypluud2a","operation":"create","collection":"app.bsky.feed.like","rkey":"3mptbyplj5d2a","record":{record},"cid":{cid}}}}}"#
        )
    }

    fn skip_reason(d: Decoded<'_>) -> Option<SkipReason> {
        match d {
            Decoded::Skip { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// Events the v1 validation accepts but the writer cannot encode (with its `cursor`, or
    /// as v2) are skipped as `unconvertible` here: handed to the writer, whose append retries
    /// until it succeeds, one of them used to stop ingestion for good.
    #[test]
    fn unconvertible_v1_events_are_skipped_before_the_writer() {
        let good = commit_with(r#"{"$type":"app.bsky.feed.like"}"#, r#""bafy""#);
        let line = lines()[0];
        let time = "1783175888085434";
        assert!(line.contains(time));
        let poison = [
            line.replace(time, "300000000000000000"),
            line.replace(time, "-300000000000000000"),
            commit_with(r#""x""#, r#""bafy""#),
            commit_with(r#"{"$type":"app.bsky.feed.like"}"#, "5"),
            line.replace(r#""time_us":"#, r#""\u0074ime_us":"#),
            line.replace(r#""kind":"#, r#""\u006bind":"#),
            // With an upstream `cursor`: what is checked is what the relay stores.
            line.replace(r#""kind":"#, r#""cursor":9,"\u006bind":"#),
        ];
        let mut d = Decoder::default();
        let good = text(good.into_bytes());
        assert!(matches!(
            d.decode(UpstreamWire::V1, FrameEncoding::Text, &good),
            Decoded::Event(_)
        ));
        for json in poison {
            assert!(
                crate::event::parse_v1_event(json.as_bytes()).is_ok(),
                "the v1 validation accepts {json}"
            );
            let message = text(json.clone().into_bytes());
            let reason = skip_reason(d.decode(UpstreamWire::V1, FrameEncoding::Text, &message));
            assert_eq!(reason, Some(SkipReason::Unconvertible), "{json}");
        }
    }

    /// A v2 event whose `time` or `witnessedAt` (a numeric offset pushing it past year 9999 or
    /// before year 0000) cannot be rendered back is skipped the same way, `#sync` included.
    #[test]
    fn unconvertible_v2_events_are_skipped_before_the_writer() {
        let frame = String::from_utf8(v2(lines()[0], 1)).unwrap();
        let time = crate::wire::rfc3339::format_micros_string(1_783_175_888_085_434).unwrap();
        let witnessed = crate::wire::rfc3339::format_micros_string(WITNESSED).unwrap();
        assert!(
            frame.contains(&time) && frame.contains(&witnessed),
            "{frame}"
        );
        let late = "9999-12-31T23:59:59.999999-01:00";
        let early = "0000-01-01T00:00:00.000000+01:00";
        let object = r#"{"blocks":{"$bytes":"OqJl"},"did":"did:plc:abc","rev":"3mptbypluud2a","seq":9,"time":"2026-07-04T14:38:07.877Z"}"#;
        let sync = EventParts {
            did: b"\"did:plc:abc\"",
            time_us: 1_783_175_888_000_000,
            body: Body::Sync(object.as_bytes()),
        };
        let mut sync_frame = Vec::new();
        sync.render_v2(77, WITNESSED, &mut sync_frame).unwrap();
        let sync_frame = String::from_utf8(sync_frame).unwrap();
        let sync_time = crate::wire::rfc3339::format_micros_string(sync.time_us).unwrap();
        let poison = [
            frame.replace(&time, late),
            frame.replace(&time, early),
            frame.replace(&witnessed, late),
            frame.replace(&witnessed, early),
            sync_frame.replace(&sync_time, late),
            sync_frame.replace(&witnessed, early),
        ];
        let mut d = Decoder::default();
        for good in [frame.clone(), sync_frame.clone()] {
            let message = text(good.into_bytes());
            assert!(matches!(
                d.decode(UpstreamWire::V2, FrameEncoding::Text, &message),
                Decoded::Event(_)
            ));
        }
        for json in poison {
            assert_ne!(json, frame);
            let message = text(json.clone().into_bytes());
            let reason = skip_reason(d.decode(UpstreamWire::V2, FrameEncoding::Text, &message));
            assert_eq!(reason, Some(SkipReason::Unconvertible), "{json}");
        }
    }

    #[test]
    fn info_and_error_frames_are_returned_and_bad_input_skipped_with_a_reason() {
        let mut d = Decoder::default();
        let mut info = Vec::new();
        crate::wire::future_cursor_frame(900, 10, &mut info);
        let info = text(info);
        assert!(matches!(
            d.decode(UpstreamWire::V2, FrameEncoding::Text, &info),
            Decoded::Info { name, .. } if name == "FutureCursor"
        ));
        let mut error = Vec::new();
        crate::wire::consumer_too_slow_frame(5, 6, &mut error);
        let error = text(error);
        assert!(matches!(
            d.decode(UpstreamWire::V2, FrameEncoding::Text, &error),
            Decoded::Error { error, .. } if error == "ConsumerTooSlow"
        ));
        let frame = v2(lines()[0], 1);
        let cases: Vec<(UpstreamWire, FrameEncoding, Message, SkipReason)> = vec![
            (UpstreamWire::V2, FrameEncoding::Text, text(b"{not json".to_vec()), SkipReason::InvalidJson),
            (
                UpstreamWire::V2,
                FrameEncoding::Text,
                text(
                    String::from_utf8(frame.clone())
                        .unwrap()
                        .replace("#commit", "#poll")
                        .into_bytes(),
                ),
                SkipReason::UnknownKind,
            ),
            (
                UpstreamWire::V2,
                FrameEncoding::Text,
                text(
                    String::from_utf8(frame.clone())
                        .unwrap()
                        .replace("\"seq\":1,", "")
                        .into_bytes(),
                ),
                SkipReason::MissingField,
            ),
            (
                UpstreamWire::V2,
                FrameEncoding::Text,
                text(
                    String::from_utf8(frame.clone())
                        .unwrap()
                        .replace("\"did\":\"did:", "\"did\":\"xid:")
                        .into_bytes(),
                ),
                SkipReason::MissingField,
            ),
            // A text session does not decompress; garbage does not decompress.
            (UpstreamWire::V2, FrameEncoding::Text, Message::Binary(frame.clone().into()), SkipReason::Binary),
            (UpstreamWire::V2, FrameEncoding::Zstd, Message::Binary(frame.clone().into()), SkipReason::Undecodable),
            (UpstreamWire::V1, FrameEncoding::Text, Message::Binary(vec![1, 2].into()), SkipReason::Binary),
            (UpstreamWire::V1, FrameEncoding::Text, text(frame.clone()), SkipReason::MissingField),
            (
                UpstreamWire::V1,
                FrameEncoding::Text,
                text(br#"{"did":"did:a","time_us":1,"cursor":"x","kind":"identity","identity":{"seq":1}}"#.to_vec()),
                SkipReason::MissingField,
            ),
        ];
        for (wire, encoding, message, want) in cases {
            match d.decode(wire, encoding, &message) {
                Decoded::Skip { reason, .. } => assert_eq!(reason, want, "{message:?}"),
                other => panic!("{message:?}: {other:?}"),
            }
        }
        // Compressed bytes that are not UTF-8 JSON once decompressed.
        let mut compressor = EventCompressor::with_dictionary(Dictionary::V2).unwrap();
        let mut packed = Vec::new();
        compressor
            .compress(&[0xff, 0xfe, b'{'], &mut packed)
            .unwrap();
        let message = Message::Binary(packed.into());
        assert!(matches!(
            d.decode(UpstreamWire::V2, FrameEncoding::Zstd, &message),
            Decoded::Skip {
                reason: SkipReason::InvalidJson,
                ..
            }
        ));
        let ping = Message::Ping(Default::default());
        assert!(matches!(
            d.decode(UpstreamWire::V2, FrameEncoding::Zstd, &ping),
            Decoded::Control
        ));
    }
}
