//! The v2 `subscribeEvents` query (`wire::parse_subscribe_events_query`). Oracles, for any
//! query string and `Socket-Encoding` header:
//! - it is accepted exactly when a reference written from the documented rules accepts it
//!   (kinds known and at most four, collections only when kinds include commit, no v1
//!   parameter names, no v1 compression opt-in, `zstdDictionary` the current id, values valid
//!   by the reference NSID/DID validators, one u32 `maxMessageSizeBytes`, a non-negative
//!   cursor), and a refusal is a 400 with an XRPC error name and a JSON body;
//! - what it accepts filters exactly as the raw values say (kinds, DIDs, collections, through
//!   `wants` and the shape key), is canonical, and is deterministic: the accepted options
//!   rendered back to a query (in another order) parse to the same params and shape key.
#![no_main]

use jetrelay::compress::Dictionary;
use jetrelay::handshake::query_pairs;
use jetrelay::subscription::{MAX_SHAPE_LABEL_BYTES, MAX_WANTED_COLLECTIONS, MAX_WANTED_DIDS};
use jetrelay::wire::{
    Cursor, KindSet, MessageKind, SubscribeEventsParams, parse_subscribe_events_query,
};
use jetrelay_fuzz::reference;
use libfuzzer_sys::fuzz_target;

/// Go's `strconv.ParseUint(s, 10, 64)`, from its documentation.
fn go_uint(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Whether the documented rules accept the query (`pairs` decoded by the reference decoder).
fn reference_accepts(pairs: &[(String, String)], socket_encoding: &[&str]) -> bool {
    let values = |key: &str| jetrelay_fuzz::values(pairs, key);
    let first = |key: &str| values(key).first().copied();
    if first("compress") == Some("true") || socket_encoding.iter().any(|e| e.contains("zstd")) {
        return false;
    }
    match first("zstdDictionary") {
        None | Some("") => {}
        Some(id) => {
            if go_uint(id) != Some(u64::from(Dictionary::V2.id())) {
                return false;
            }
        }
    }
    if ["wantedDids", "wantedCollections", "requireHello"]
        .iter()
        .any(|k| !values(k).is_empty())
    {
        return false;
    }
    let kinds = values("kinds");
    if kinds.len() > 4
        || !kinds
            .iter()
            .all(|k| ["commit", "identity", "account", "sync"].contains(k))
    {
        return false;
    }
    let (dids, collections) = (values("dids"), values("collections"));
    if dids.len() > MAX_WANTED_DIDS
        || collections.len() > MAX_WANTED_COLLECTIONS
        || !dids.iter().all(|d| reference::did(d))
        || !collections.iter().all(|c| reference::collection_value(c))
    {
        return false;
    }
    if !collections.is_empty() && !kinds.is_empty() && !kinds.contains(&"commit") {
        return false;
    }
    match values("maxMessageSizeBytes").as_slice() {
        [] => {}
        [one] if go_uint(one).is_some_and(|n| n <= u64::from(u32::MAX)) => {}
        _ => return false,
    }
    match first("cursor") {
        None | Some("") => true,
        Some(c) => c.parse::<i64>().is_ok_and(|c| c >= 0),
    }
}

/// The accepted params as a query, in the reverse of the documented order and with the kinds
/// reversed (the parse must not depend on order).
fn render(p: &SubscribeEventsParams) -> String {
    let mut parts = Vec::new();
    if let Some(cursor) = p.cursor {
        parts.push(match cursor {
            Cursor::Seq(seq) => format!("cursor={seq}"),
            Cursor::TimeUs(us) => format!("cursor={us}"),
        });
    }
    if let Some(max) = p.options.max_message_size {
        parts.push(format!("maxMessageSizeBytes={max}"));
    }
    for d in &p.options.wanted_dids {
        // `%` is a DID character and the query's escape.
        parts.push(format!("dids={}", d.replace('%', "%25")));
    }
    for c in &p.options.wanted_collections {
        parts.push(format!("collections={c}"));
    }
    if !p.kinds.is_all() {
        for k in MessageKind::ALL
            .iter()
            .rev()
            .filter(|k| p.kinds.contains(**k))
        {
            parts.push(format!("kinds={}", k.as_str()));
        }
    }
    if p.compress {
        parts.push(format!("zstdDictionary={}", Dictionary::V2.id()));
    }
    parts.join("&")
}

fuzz_target!(|data: &[u8]| {
    let Some((&encoding_sel, query)) = data.split_first() else {
        return;
    };
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let encodings: &[&str] = match encoding_sel % 4 {
        0 => &[],
        1 => &["zstd"],
        2 => &["gzip", "br"],
        _ => &["x-zstd-dict"],
    };
    let result = parse_subscribe_events_query(query, encodings);
    assert_eq!(
        parse_subscribe_events_query(query, encodings),
        result,
        "deterministic"
    );
    let Some(pairs) = reference::query_pairs(query) else {
        let e = result.expect_err("a query the reference cannot decode");
        assert_eq!((e.status, e.error), (400, "InvalidRequest"));
        return;
    };
    assert_eq!(query_pairs(query).ok().as_ref(), Some(&pairs));
    let expected = reference_accepts(&pairs, encodings);
    let params = match result {
        Err(e) => {
            assert!(!expected, "valid query refused: {e:?}");
            assert_eq!(e.status, 400);
            assert!(
                ["InvalidRequest", "UnknownZstdDictionary"].contains(&e.error),
                "{e:?}"
            );
            assert!(!e.message.is_empty());
            let body: serde_json::Value =
                serde_json::from_slice(&e.body()).expect("the error body is JSON");
            assert_eq!(body["error"], e.error);
            assert_eq!(body["message"], e.message.as_str());
            return;
        }
        Ok(params) => params,
    };
    assert!(expected, "invalid query accepted: {params:?}");

    let values = |key: &str| jetrelay_fuzz::values(&pairs, key);
    let raw_kinds = values("kinds");
    let (dids, collections) = (values("dids"), values("collections"));
    // kinds: the named set, every kind without the parameter.
    for kind in MessageKind::ALL {
        assert_eq!(
            params.kinds.contains(kind),
            raw_kinds.is_empty() || raw_kinds.contains(&kind.as_str()),
            "kind {kind:?}"
        );
    }
    assert_eq!(
        params.compress,
        values("zstdDictionary")
            .first()
            .is_some_and(|v| !v.is_empty())
    );
    // Canonical options, which rebuild themselves.
    let options = &params.options;
    assert!(options.wanted_dids.windows(2).all(|w| w[0] < w[1]));
    assert!(options.wanted_collections.windows(2).all(|w| w[0] < w[1]));
    jetrelay_fuzz::assert_options_rebuild(options);
    // Filtering agrees with the raw values, through `wants` and the shape key.
    let key = params.shape_key();
    assert!(key.label().len() <= MAX_SHAPE_LABEL_BYTES);
    assert_eq!(key.kinds, params.kinds);
    let probes = jetrelay_fuzz::COLLECTION_PROBES
        .iter()
        .copied()
        .chain(collections.iter().map(|c| c.trim_end_matches('*')))
        .chain(collections.iter().map(|c| c.trim_end_matches(".*")));
    let did_probes: Vec<&str> = dids.iter().copied().chain(["did:plc:notwanted"]).collect();
    for probe in probes {
        let collection_ok = collections.is_empty()
            || collections
                .iter()
                .any(|c| reference::collection_matches(c, probe));
        for kind in MessageKind::ALL {
            let kind_ok = raw_kinds.is_empty() || raw_kinds.contains(&kind.as_str());
            let passes = kind_ok && (kind != MessageKind::Commit || collection_ok);
            let collection = (kind == MessageKind::Commit).then_some(probe);
            assert_eq!(
                key.wants(kind.event_kind(), collection, &[0; 4]),
                passes,
                "shape key: {kind:?} {probe:?}"
            );
            for did in &did_probes {
                let did_ok = dids.is_empty() || dids.contains(did);
                assert_eq!(
                    params.wants(kind, did, collection),
                    passes && did_ok,
                    "wants: {kind:?} {did:?} {probe:?}"
                );
            }
        }
    }
    // Rendered back (in another order), the params parse to themselves and the same shape.
    let again = parse_subscribe_events_query(&render(&params), &[])
        .unwrap_or_else(|e| panic!("re-rendered query {:?} refused: {e:?}", render(&params)));
    assert_eq!(again, params);
    assert_eq!(again.shape_key(), key);
    assert_eq!(again.shape_key().label(), key.label());
    // The kinds name themselves.
    if !params.kinds.is_all() {
        let names: Vec<MessageKind> = params
            .kinds
            .names()
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|n| MessageKind::from_name(n).expect("a kind's name"))
            .collect();
        assert_eq!(KindSet::of(&names), params.kinds);
    }
});
