//! The `/subscribe` query string: `handshake::query_pairs` against a reference decoder, then
//! `subscription::parse_subscribe`, whose result must be canonical, must filter exactly as the
//! raw values say (reference validators and matchers), and must agree with the same filters
//! sent as an `options_update` (both paths end in one validated type).
#![no_main]

use jetrelay::event::EventKind;
use jetrelay::handshake::query_pairs;
use jetrelay::subscription::{
    MAX_SHAPE_LABEL_BYTES, MAX_WANTED_COLLECTIONS, MAX_WANTED_DIDS, SubscribeError,
    parse_options_update, parse_subscribe,
};
use jetrelay_fuzz::reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&encoding_sel, query)) = data.split_first() else {
        return;
    };
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let pairs = match (query_pairs(query), reference::query_pairs(query)) {
        (Ok(pairs), Some(expected)) => {
            assert_eq!(pairs, expected);
            pairs
        }
        (Err(e), None) => {
            assert_eq!(e.status, 400);
            return;
        }
        (got, expected) => panic!("query {query:?}: got {got:?}, reference {expected:?}"),
    };
    let encodings: &[&str] = match encoding_sel % 3 {
        0 => &[],
        1 => &["zstd"],
        _ => &["gzip", "br"],
    };
    let values = |key: &str| -> Vec<&str> {
        pairs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let collections = values("wantedCollections");
    let dids = values("wantedDids");
    let result = parse_subscribe(&pairs, encodings);
    let cursor = values("cursor").first().copied();
    let cursor_ok =
        matches!(cursor, None | Some("")) || cursor.is_some_and(|c| c.parse::<i64>().is_ok());
    if !cursor_ok {
        assert!(matches!(result, Err(SubscribeError::InvalidCursor(_))));
        return;
    }
    let params = match result {
        Ok(params) => params,
        Err(SubscribeError::InvalidCursor(c)) => panic!("valid cursor {c:?} refused"),
        Err(SubscribeError::Options(e)) => {
            let valid_values = collections.iter().all(|c| reference::collection_value(c))
                && dids.iter().all(|d| reference::did(d));
            let mut distinct_dids = dids.clone();
            distinct_dids.sort_unstable();
            distinct_dids.dedup();
            assert!(
                !valid_values
                    || distinct_dids.len() > MAX_WANTED_DIDS
                    || collections.len() > MAX_WANTED_COLLECTIONS,
                "valid options refused: {e}"
            );
            return;
        }
    };
    assert_eq!(
        params.compress,
        values("compress").first() == Some(&"true") || encoding_sel % 3 == 1
    );
    assert_eq!(
        params.require_hello,
        values("requireHello").first() == Some(&"true")
    );
    let options = &params.options;
    for c in &collections {
        assert!(
            reference::collection_value(c),
            "invalid collection {c:?} accepted"
        );
    }
    for d in &dids {
        assert!(reference::did(d), "invalid DID {d:?} accepted");
    }
    // Canonical: sorted, distinct; patterns no other pattern covers.
    assert!(options.wanted_dids.windows(2).all(|w| w[0] < w[1]));
    assert!(options.wanted_collections.windows(2).all(|w| w[0] < w[1]));
    // Filtering agrees with the raw values, for real collections and for the values themselves.
    let probes = jetrelay_fuzz::COLLECTION_PROBES
        .iter()
        .copied()
        .chain(collections.iter().map(|c| c.trim_end_matches('*')))
        .chain(collections.iter().map(|c| c.trim_end_matches(".*")));
    for probe in probes {
        let expected = collections.is_empty()
            || collections
                .iter()
                .any(|c| reference::collection_matches(c, probe));
        assert_eq!(
            options.collection_allowed(EventKind::Commit, Some(probe)),
            expected,
            "collection {probe:?} under {collections:?}"
        );
        assert!(options.collection_allowed(EventKind::Identity, Some(probe)));
        let key = options.shape_key(
            jetrelay::encoding::Encoding::of(false, params.compress),
            jetrelay::wire::KindSet::V1,
        );
        assert_eq!(
            key.collection_allowed(EventKind::Commit, Some(probe)),
            expected
        );
        assert!(key.label().len() <= MAX_SHAPE_LABEL_BYTES);
    }
    for probe in dids.iter().copied().chain(["did:plc:notwanted"]) {
        assert_eq!(
            options.did_allowed(probe),
            dids.is_empty() || dids.contains(&probe)
        );
    }
    // The same filters as an options_update give the same options.
    let max = values("maxMessageSizeBytes")
        .first()
        .and_then(|v| v.parse::<i64>().ok());
    let mut payload = serde_json::json!({
        "wantedCollections": collections,
        "wantedDids": dids,
    });
    if let Some(max) = max {
        payload["maxMessageSizeBytes"] = max.into();
    }
    let update = serde_json::json!({"type": "options_update", "payload": payload});
    let via_update = parse_options_update(update.to_string().as_bytes()).expect("same filters");
    assert_eq!(&via_update, options);
    // And canonical options rebuild themselves.
    jetrelay_fuzz::assert_options_rebuild(options);
});
