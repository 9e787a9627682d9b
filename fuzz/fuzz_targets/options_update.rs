//! `subscription::parse_options_update` on arbitrary messages. Oracles: every refusal fits a
//! close frame; accepted options are canonical, made only of values the reference validators
//! accept, and survive being re-encoded and parsed again; a message that is a well-formed
//! update of valid values is never refused.
#![no_main]

use jetrelay::subscription::{
    MAX_CLOSE_REASON_BYTES, MAX_OPTIONS_UPDATE_BYTES, MAX_WANTED_COLLECTIONS, MAX_WANTED_DIDS,
    OptionsUpdateError, parse_options_update,
};
use jetrelay_fuzz::reference;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The string list under `key` of a payload, if the payload is plain (exact-case keys only).
fn strings(payload: &serde_json::Map<String, Value>, key: &str) -> Option<Vec<String>> {
    match payload.get(key) {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    match parse_options_update(data) {
        Err(e) => {
            let reason = e.to_string();
            assert!(
                reason.len() <= MAX_CLOSE_REASON_BYTES,
                "close reason {}",
                reason.len()
            );
            if matches!(e, OptionsUpdateError::TooLarge(_)) {
                assert!(data.len() > MAX_OPTIONS_UPDATE_BYTES);
                return;
            }
            // A plain, well-formed update of valid values must not be refused.
            let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(data) else {
                return;
            };
            let keys_plain = message.keys().all(|k| {
                k == "type"
                    || k == "payload"
                    || !k.eq_ignore_ascii_case("type") && !k.eq_ignore_ascii_case("payload")
            });
            let Some(Value::Object(payload)) = message.get("payload") else {
                return;
            };
            let odd_keys = payload.keys().any(|k| {
                ["wantedcollections", "wanteddids", "maxmessagesizebytes"]
                    .contains(&k.to_ascii_lowercase().as_str())
                    && !["wantedCollections", "wantedDids", "maxMessageSizeBytes"]
                        .contains(&k.as_str())
            });
            let max_ok = match payload.get("maxMessageSizeBytes") {
                None | Some(Value::Null) => true,
                Some(v) => v.as_i64().is_some(),
            };
            if message.get("type") != Some(&Value::from("options_update"))
                || !keys_plain
                || odd_keys
                || !max_ok
            {
                return;
            }
            let (Some(collections), Some(dids)) = (
                strings(payload, "wantedCollections"),
                strings(payload, "wantedDids"),
            ) else {
                return;
            };
            let mut distinct = dids.clone();
            distinct.sort_unstable();
            distinct.dedup();
            let mut distinct_c = collections.clone();
            distinct_c.sort_unstable();
            distinct_c.dedup();
            let valid = collections.iter().all(|c| reference::collection_value(c))
                && dids.iter().all(|d| reference::did(d))
                && distinct.len() <= MAX_WANTED_DIDS
                && distinct_c.len() <= MAX_WANTED_COLLECTIONS;
            assert!(!valid, "valid update refused: {e}");
        }
        Ok(options) => {
            assert!(data.len() <= MAX_OPTIONS_UPDATE_BYTES);
            assert!(options.wanted_dids.windows(2).all(|w| w[0] < w[1]));
            assert!(options.wanted_collections.windows(2).all(|w| w[0] < w[1]));
            assert!(options.wanted_collections.len() <= MAX_WANTED_COLLECTIONS);
            assert!(options.wanted_dids.len() <= MAX_WANTED_DIDS);
            assert!(options.max_message_size != Some(0));
            for d in &options.wanted_dids {
                assert!(reference::did(d), "invalid DID {d:?} accepted");
            }
            let collections: Vec<String> = options
                .wanted_collections
                .iter()
                .map(ToString::to_string)
                .collect();
            for c in &collections {
                assert!(
                    reference::collection_value(c),
                    "invalid collection {c:?} accepted"
                );
            }
            // Re-encoded canonical options parse to themselves.
            let mut payload = serde_json::json!({
                "wantedCollections": collections,
                "wantedDids": options.wanted_dids,
            });
            if let Some(max) = options.max_message_size {
                payload["maxMessageSizeBytes"] = max.into();
            }
            let again = serde_json::json!({"type": "options_update", "payload": payload});
            assert_eq!(
                parse_options_update(again.to_string().as_bytes()).expect("canonical update"),
                options
            );
        }
    }
});
