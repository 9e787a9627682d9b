//! The upstream v2 (`subscribeEvents`) decode path and the conversions between the wires:
//! `wire::parse_v2_frame`, the follower's `upstream::decode::Decoder` (text frames, and zstd
//! frames made with the v2 dictionary), `sync_key`, `EventParts::from_v1` / `render_v1` /
//! `render_v2`, `v1_to_v2`, `with_cursor` and `json_scan::object_members`.
//!
//! Input: `[mode][bytes]`. Oracles:
//! - mode 0, `bytes` a v2 frame: never a panic, errors are `WireError`s with a message, the
//!   decoder skips exactly what the parser refuses; an event re-rendered parses back to the same
//!   parts (and renders byte-identically again), its v1 form converts back to the same v2
//!   frame, the decoder's v1 JSON is that form, and a `#sync`'s key is the same from the
//!   upstream's frame and from the relay's re-rendering; `object_members` agrees with
//!   `serde_json` on every valid object.
//! - mode 1, `bytes` a v1 event: v1 → v2 → v1 gives the same parts and, from the v1 the relay
//!   renders, the same bytes; a `cursor` added by `with_cursor` changes neither the v2 frame
//!   nor (removed again by the decoder) the v1 JSON.
//! - mode 2: `bytes` compressed with the v2 dictionary decode exactly as the text frame.
//! - mode 3: `bytes` as a compressed frame: never a panic, an event only from valid JSON.
#![no_main]

use jetrelay::compress::{Dictionary, EventCompressor};
use jetrelay::event::{parse_event, parse_v1_event};
use jetrelay::upstream::SkipReason;
use jetrelay::upstream::decode::{Decoded, Decoder, FrameEncoding, UpstreamWire, sync_key};
use jetrelay::wire::json_scan::object_members;
use jetrelay::wire::{
    Body, EventParts, MAX_V2_FRAME_BYTES, V2Frame, WireError, parse_v2_frame, v1_to_v2, with_cursor,
};
use jetrelay_fuzz::reference;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tungstenite::Message;

/// The relay's witness time in the re-renderings (any valid time).
const WITNESSED: i64 = 1_783_175_889_000_001;
/// The relay's own seq in the re-renderings (another instance numbers differently).
const RELAY_SEQ: u64 = 4_242;

fn is_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A clean refusal: a `WireError` that explains itself.
fn check_error(e: &WireError) {
    assert!(!e.to_string().is_empty(), "{e:?}");
}

/// `object_members` against `serde_json` on a valid object without repeated keys.
fn check_scan(bytes: &[u8]) {
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    if reference::has_duplicate_keys(bytes) {
        return;
    }
    let scan = match object_members(bytes) {
        Ok(scan) => scan,
        // The scan bounds nesting as serde_json does, counted from the outer object.
        Err(_) if depth(&Value::Object(object.clone())) >= 127 => return,
        Err(e) => panic!("a valid object refused by the scan: {e}"),
    };
    assert_eq!(scan.members.len(), object.len());
    assert_eq!(bytes[scan.open], b'{');
    assert_eq!(bytes[scan.close], b'}');
    for m in &scan.members {
        let quoted = &bytes[m.key.start - 1..m.key.end + 1];
        let key: String = serde_json::from_slice(quoted).expect("a key is a string");
        let value: Value = serde_json::from_slice(&bytes[m.value.clone()]).expect("a value");
        assert_eq!(object.get(&key), Some(&value), "member {key:?}");
    }
}

/// Whether the object `json` is written without whitespace between its members and has exactly
/// the keys `keys` in that order (`optional` ones may be absent, but not null).
fn tight_with_keys(json: &[u8], keys: &[&str], optional: &[&str]) -> bool {
    let Ok(scan) = object_members(json) else {
        return false;
    };
    let mut at = scan.open + 1;
    let mut names = Vec::new();
    for m in &scan.members {
        let value = &json[m.value.clone()];
        if m.key.start != at + 1 || m.value.start != m.key.end + 2 || value == b"null" {
            return false;
        }
        names.push(&json[m.key.clone()]);
        at = m.value.end + 1;
    }
    let close = scan.members.last().map_or(scan.open + 1, |m| m.value.end);
    let mut wanted = keys.iter();
    let in_order = names
        .iter()
        .all(|name| wanted.by_ref().any(|k| k.as_bytes() == *name));
    let required = keys
        .iter()
        .filter(|k| !optional.contains(k))
        .all(|k| names.contains(&k.as_bytes()));
    scan.open == 0 && scan.close == json.len() - 1 && scan.close == close && in_order && required
}

/// Whether a v1 event has the official server's shape (its members in its order, no
/// whitespace between them, a canonical `time_us`): the shape `render_v1` claims to reproduce
/// byte for byte.
fn official_v1_shape(json: &[u8], parts: &EventParts) -> bool {
    let kind = parts.kind().as_str();
    if !tight_with_keys(json, &["did", "time_us", "kind", kind], &[]) {
        return false;
    }
    let Ok(scan) = object_members(json) else {
        return false;
    };
    if scan.get(json, "time_us") != Some(parts.time_us.to_string().as_bytes()) {
        return false;
    }
    match &parts.body {
        Body::Commit(_) => scan.get(json, "commit").is_some_and(|c| {
            tight_with_keys(
                c,
                &["rev", "operation", "collection", "rkey", "record", "cid"],
                &["record", "cid"],
            )
        }),
        _ => true,
    }
}

/// The decoder on one message of a v2 session.
fn decode_v2(decoder: &mut Decoder, message: &Message) -> String {
    let encoding = if message.is_binary() {
        FrameEncoding::Zstd
    } else {
        FrameEncoding::Text
    };
    format!("{:?}", decoder.decode(UpstreamWire::V2, encoding, message))
}

/// Mode 0: one v2 frame.
fn v2_frame(bytes: &[u8]) {
    check_scan(bytes);
    let parsed = parse_v2_frame(bytes);
    assert_eq!(parse_v2_frame(bytes), parsed, "deterministic");
    let text = std::str::from_utf8(bytes).ok();
    let mut decoder = Decoder::default();
    let message = text.map(|t| Message::text(t.to_owned()));
    let decoded = message
        .as_ref()
        .map(|m| decoder.decode(UpstreamWire::V2, FrameEncoding::Text, m));
    let (seq, witnessed_us, event) = match parsed {
        Err(e) => {
            check_error(&e);
            if bytes.len() > MAX_V2_FRAME_BYTES {
                assert!(matches!(e, WireError::TooLarge(_)));
            }
            assert!(sync_key(bytes).is_none());
            if let Some(d) = decoded {
                assert!(
                    matches!(&d, Decoded::Skip { detail, .. } if !detail.is_empty()),
                    "a refused frame decoded to {d:?}"
                );
            }
            return;
        }
        Ok(V2Frame::Info { name, message }) => {
            if let Some(d) = decoded {
                assert!(
                    matches!(&d, Decoded::Info { name: n, message: m } if *n == name && *m == message),
                    "{d:?}"
                );
            }
            return;
        }
        Ok(V2Frame::Error { error, message }) => {
            if let Some(d) = decoded {
                assert!(
                    matches!(&d, Decoded::Error { error: e, message: m } if *e == error && *m == message),
                    "{d:?}"
                );
            }
            return;
        }
        Ok(V2Frame::Event {
            seq,
            witnessed_us,
            event,
        }) => (seq, witnessed_us, event),
    };
    assert!(is_json(bytes));
    let strict = serde_json::from_slice::<Value>(bytes).is_ok();
    if strict && !reference::has_duplicate_keys(bytes) {
        // The reference reading of the envelope.
        let v: Value = serde_json::from_slice(bytes).expect("strict");
        assert_eq!(v["$type"], "message");
        assert_eq!(v["payload"]["seq"].as_u64(), Some(seq));
        assert_eq!(
            v["payload"]["$type"],
            format!(
                "network.bsky.jetstream.subscribeEvents#{}",
                event.kind().as_str()
            )
        );
    }
    // Re-rendered (the relay's own seq and witness time): parses back to the same parts, and
    // renders byte-identically again.
    let mut relay_v2 = Vec::new();
    event
        .render_v2(RELAY_SEQ, WITNESSED, &mut relay_v2)
        .expect("a parsed time renders");
    assert!(is_json(&relay_v2), "rendered v2 is JSON");
    if strict {
        serde_json::from_slice::<Value>(&relay_v2).expect("rendered v2 is strict JSON");
    }
    let mut own = Vec::new();
    event
        .render_v2(seq, witnessed_us.unwrap_or(WITNESSED), &mut own)
        .expect("a parsed time renders");
    if own.len() <= MAX_V2_FRAME_BYTES {
        match parse_v2_frame(&own) {
            Ok(V2Frame::Event {
                seq: s,
                witnessed_us: w,
                event: again,
            }) => {
                assert_eq!((s, w), (seq, Some(witnessed_us.unwrap_or(WITNESSED))));
                assert_eq!(again, event, "parse → render → parse");
                let mut twice = Vec::new();
                again
                    .render_v2(seq, witnessed_us.unwrap_or(WITNESSED), &mut twice)
                    .expect("renders");
                assert_eq!(twice, own, "render is a fixed point");
            }
            other => panic!("the rendered frame parsed to {other:?}"),
        }
    }
    // The v1 form, and back.
    let mut v1 = Vec::new();
    let v1_form = event.render_v1(&mut v1);
    match (&event.body, &v1_form) {
        (Body::Sync(_), Err(WireError::NoV1Form)) => assert!(v1.is_empty()),
        (Body::Sync(_), other) => panic!("#sync rendered to v1: {other:?}"),
        (_, Err(e)) => panic!("no v1 form: {e:?}"),
        (_, Ok(())) => {
            assert!(is_json(&v1), "v1 form is JSON");
            let parts = EventParts::from_v1(&v1).expect("the v1 form reads back");
            assert_eq!(parts, event, "v2 → v1 → parts");
            let mut v2_again = Vec::new();
            v1_to_v2(&v1, RELAY_SEQ, WITNESSED, &mut v2_again).expect("converts");
            assert_eq!(v2_again, relay_v2, "v2 → v1 → v2 byte-identical");
        }
    }
    // The follower's decode of the same frame.
    let Some(decoded) = decoded else {
        return;
    };
    match (&event.body, decoded) {
        (Body::Sync(_), Decoded::Event(e)) => {
            assert_eq!(e.sync.as_ref(), Some(&event));
            assert!(e.v1_json.is_empty());
            assert_eq!((e.upstream_seq, e.witnessed_us), (Some(seq), witnessed_us));
            assert_eq!(e.meta.time_us, event.time_us);
            let key = Some((e.meta.time_us, e.meta.dedup_key));
            assert_eq!(sync_key(bytes), key, "sync key of the upstream frame");
            assert_eq!(
                sync_key(&relay_v2),
                key,
                "sync key of the relay's rendering"
            );
        }
        (Body::Sync(_), Decoded::Skip { detail, .. }) => {
            assert!(!detail.is_empty());
            assert_eq!(sync_key(bytes), None);
            assert_eq!(sync_key(&relay_v2), None);
        }
        (_, Decoded::Event(e)) => {
            assert_eq!(e.v1_json, &v1[..], "the decoder stores the v1 form");
            assert!(e.sync.is_none());
            assert_eq!((e.upstream_seq, e.witnessed_us), (Some(seq), witnessed_us));
            let meta = parse_event(&v1).expect("decoded");
            assert_eq!(e.meta, meta);
            assert_eq!(meta.time_us, event.time_us);
            assert_eq!(sync_key(bytes), None);
        }
        (_, Decoded::Skip { detail, .. }) => {
            // Only the relay's event rules (parse_event) may refuse a well-formed event.
            assert!(parse_event(&v1).is_err(), "skipped: {detail}");
        }
        (_, d) => panic!("an event decoded to {d:?}"),
    }
}

/// Mode 1: one v1 event.
fn v1_event(bytes: &[u8]) {
    check_scan(bytes);
    let parts = match EventParts::from_v1(bytes) {
        Ok(parts) => parts,
        Err(e) => {
            check_error(&e);
            let mut out = Vec::new();
            assert_eq!(v1_to_v2(bytes, RELAY_SEQ, WITNESSED, &mut out), Err(e));
            return;
        }
    };
    assert_eq!(
        EventParts::from_v1(bytes),
        Ok(parts.clone()),
        "deterministic"
    );
    let mut v1 = Vec::new();
    parts.render_v1(&mut v1).expect("a v1 event has a v1 form");
    let again = EventParts::from_v1(&v1).expect("the rendered v1 reads back");
    assert_eq!(again, parts);
    let mut v1_twice = Vec::new();
    again.render_v1(&mut v1_twice).expect("renders");
    assert_eq!(v1_twice, v1, "render_v1 is a fixed point");
    let mut v2 = Vec::new();
    let converted = v1_to_v2(bytes, RELAY_SEQ, WITNESSED, &mut v2);
    let mut v2_from_rendered = Vec::new();
    assert_eq!(
        v1_to_v2(&v1, RELAY_SEQ, WITNESSED, &mut v2_from_rendered),
        converted
    );
    assert_eq!(v2_from_rendered, v2, "same parts, same v2 frame");
    if let Err(e) = converted {
        // Only a time RFC 3339 cannot express, and nothing appended.
        assert!(matches!(e, WireError::Time(_)), "{e:?}");
        assert!(v2.is_empty());
        return;
    }
    // The converter only moves validated values: from valid JSON, valid JSON, which reads back
    // as the same event; and v1 → v2 → v1 gives back the relay's v1 bytes.
    if is_json(bytes) && v2.len() <= MAX_V2_FRAME_BYTES {
        match parse_v2_frame(&v2) {
            Ok(V2Frame::Event {
                seq,
                witnessed_us,
                event,
            }) => {
                assert_eq!((seq, witnessed_us), (RELAY_SEQ, Some(WITNESSED)));
                assert_eq!(event, parts, "v1 → v2 → parts");
                let mut back = Vec::new();
                event.render_v1(&mut back).expect("renders");
                assert_eq!(back, v1, "v1 → v2 → v1 byte-identical");
                if official_v1_shape(bytes, &parts) {
                    assert_eq!(back, bytes, "an official v1 event survives v1 → v2 → v1");
                }
            }
            other => panic!("the converted frame parsed to {other:?}"),
        }
    }
    // A relay seq added as `cursor` reaches neither the v2 frame nor the stored v1 JSON.
    let Ok(meta) = parse_event(bytes) else {
        return;
    };
    let mut with = Vec::new();
    with_cursor(bytes, RELAY_SEQ, &mut with).expect("a parsed event takes a cursor");
    let mut v2_with = Vec::new();
    v1_to_v2(&with, RELAY_SEQ, WITNESSED, &mut v2_with).expect("converts");
    assert_eq!(v2_with, v2, "a cursor never reaches v2");
    let Ok(text) = std::str::from_utf8(&with) else {
        return;
    };
    if !matches!(parse_v1_event(bytes), Ok((_, None))) {
        return;
    }
    let message = Message::text(text.to_owned());
    let mut decoder = Decoder::default();
    match decoder.decode(UpstreamWire::V1, FrameEncoding::Text, &message) {
        Decoded::Event(e) => {
            assert_eq!(
                e.v1_json, bytes,
                "with_cursor → decode gives back the event"
            );
            assert_eq!(e.upstream_seq, Some(RELAY_SEQ));
            assert_eq!(e.meta, meta);
        }
        d => panic!("an event with a cursor decoded to {d:?}"),
    }
}

thread_local! {
    static COMPRESSOR: std::cell::RefCell<EventCompressor> = std::cell::RefCell::new(
        EventCompressor::with_dictionary(Dictionary::V2).expect("the v2 dictionary"),
    );
}

/// Mode 2: a compressed session decodes as a text one.
fn compressed(bytes: &[u8]) {
    let mut zstd = Vec::new();
    COMPRESSOR.with(|c| {
        c.borrow_mut()
            .compress(bytes, &mut zstd)
            .expect("compresses")
    });
    let mut decoder = Decoder::default();
    let binary = Message::binary(zstd.clone());
    let got = decoder.decode(UpstreamWire::V2, FrameEncoding::Zstd, &binary);
    let got = match std::str::from_utf8(bytes) {
        Ok(text) => {
            let got = format!("{got:?}");
            let mut text_decoder = Decoder::default();
            let expected = decode_v2(&mut text_decoder, &Message::text(text.to_owned()));
            if bytes.len() <= MAX_V2_FRAME_BYTES {
                assert_eq!(got, expected, "zstd and text frames decode alike");
            }
            got
        }
        Err(_) => {
            assert!(
                matches!(
                    got,
                    Decoded::Skip {
                        reason: SkipReason::InvalidJson,
                        ..
                    }
                ),
                "{got:?}"
            );
            String::new()
        }
    };
    drop(got);
    let stats = decoder.take_stats();
    assert_eq!(stats.messages, 1);
    assert_eq!(stats.wire_bytes, zstd.len() as u64);
    if bytes.len() <= MAX_V2_FRAME_BYTES {
        assert_eq!(stats.frame_bytes, bytes.len() as u64);
    }
    // A v1 session never decompresses.
    let mut v1_decoder = Decoder::default();
    assert!(matches!(
        v1_decoder.decode(UpstreamWire::V1, FrameEncoding::Text, &binary),
        Decoded::Skip {
            reason: SkipReason::Binary,
            ..
        }
    ));
}

/// Mode 3: anything as a compressed frame.
fn raw_binary(bytes: &[u8]) {
    let mut decoder = Decoder::default();
    let message = Message::binary(bytes.to_vec());
    match decoder.decode(UpstreamWire::V2, FrameEncoding::Zstd, &message) {
        Decoded::Event(e) => {
            if e.sync.is_none() {
                assert!(is_json(e.v1_json));
                assert_eq!(parse_event(e.v1_json).ok(), Some(e.meta));
            }
        }
        Decoded::Skip { detail, .. } => assert!(!detail.is_empty()),
        Decoded::Info { .. } | Decoded::Error { .. } => {}
        Decoded::Control => panic!("a binary message is data"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => v2_frame(bytes),
        1 => v1_event(bytes),
        2 => compressed(bytes),
        _ => raw_binary(bytes),
    }
});
