//! The `/subscribe` frame with the relay's seq as its top-level `"cursor"` field.
//!
//! Official Jetstream (2026) puts each event's seq on the v1 wire right after `time_us`:
//! `{"did":…,"time_us":…,"cursor":12345,"kind":"commit",…}` (docs §5.1 example; its encoder
//! marshals a struct whose fields are in that order). [`with_cursor`] produces exactly that from
//! the upstream's bytes: it inserts `,"cursor":<seq>` after the `time_us` value, removes any
//! top-level `cursor` the upstream sent (an upstream's seq is instance-local and must never reach
//! a client as if it were ours), and leaves every other byte as it was. [`without_cursor`] is the
//! follower's side: an upstream event without the upstream's `cursor`.

use super::WireError;
use super::json_scan::object_members;

/// Appends `v1_json` with `"cursor":seq` right after its `time_us` and any upstream `cursor`
/// member removed. `v1_json` must be one JSON object with a top-level integer `time_us` (as
/// every event the follower stored is); otherwise nothing is appended and the error says why.
pub fn with_cursor(v1_json: &[u8], seq: u64, out: &mut Vec<u8>) -> Result<(), WireError> {
    let scan = object_members(v1_json)?;
    let members = &scan.members;
    let is = |i: usize, key: &str| &v1_json[members[i].key.clone()] == key.as_bytes();
    let time_at = (0..members.len())
        .find(|&i| is(i, "time_us"))
        .ok_or(WireError::MissingField("time_us"))?;
    let time_value = &v1_json[members[time_at].value.clone()];
    if !is_integer(time_value) {
        return Err(WireError::InvalidField("time_us"));
    }
    let skip = cursor_members(v1_json, &scan);
    let insert_at = members[time_at].value.end;
    out.reserve(v1_json.len() + 32);
    let mut copied = 0;
    let mut inserted = false;
    for range in skip {
        if !inserted && insert_at <= range.start {
            out.extend_from_slice(&v1_json[copied..insert_at]);
            push_cursor(seq, out);
            copied = insert_at;
            inserted = true;
        }
        out.extend_from_slice(&v1_json[copied..range.start]);
        copied = range.end;
    }
    if !inserted {
        out.extend_from_slice(&v1_json[copied..insert_at]);
        push_cursor(seq, out);
        copied = insert_at;
    }
    out.extend_from_slice(&v1_json[copied..]);
    Ok(())
}

/// Byte ranges of each top-level `cursor` member with the comma that joins it to its
/// neighbour: what leaves a well-formed object when cut out.
fn cursor_members(json: &[u8], scan: &super::json_scan::ObjectScan) -> Vec<std::ops::Range<usize>> {
    let members = &scan.members;
    let mut skip = Vec::new();
    for i in (0..members.len()).filter(|&i| &json[members[i].key.clone()] == b"cursor") {
        let range = if i > 0 {
            members[i - 1].value.end..members[i].value.end
        } else if members.len() > 1 {
            members[0].key.start - 1..members[1].key.start - 1
        } else {
            members[0].key.start - 1..members[0].value.end
        };
        skip.push(range);
    }
    skip
}

/// Appends `v1_json` without its top-level `cursor` member(s): an upstream's event as the
/// legacy wire has it, every other byte unchanged (the inverse of [`with_cursor`] for frames
/// it produced). The follower stores this, so that the upstream's instance-local seq never
/// reaches a client. Nothing is appended when `v1_json` is not one JSON object.
pub fn without_cursor(v1_json: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
    let scan = object_members(v1_json)?;
    let mut copied = 0;
    out.reserve(v1_json.len());
    for range in cursor_members(v1_json, &scan) {
        out.extend_from_slice(&v1_json[copied..range.start]);
        copied = range.end;
    }
    out.extend_from_slice(&v1_json[copied..]);
    Ok(())
}

fn push_cursor(seq: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"cursor\":");
    out.extend_from_slice(seq.to_string().as_bytes());
}

/// A JSON integer token: optional `-`, digits, no leading zero.
pub(crate) fn is_integer(token: &[u8]) -> bool {
    let digits = token.strip_prefix(b"-").unwrap_or(token);
    !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && (digits.len() == 1 || digits[0] != b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../assets/jetstream-v1-sample.jsonl");

    fn cursor(json: &str, seq: u64) -> Result<String, WireError> {
        let mut out = b"prefix".to_vec();
        with_cursor(json.as_bytes(), seq, &mut out)?;
        assert!(out.starts_with(b"prefix"));
        Ok(String::from_utf8(out[6..].to_vec()).unwrap())
    }

    /// Golden: the first sample event (a like), byte for byte.
    #[test]
    fn golden_first_sample_event() {
        let line = SAMPLE.lines().next().unwrap();
        let got = cursor(line, 12_345).unwrap();
        assert_eq!(
            got,
            r#"{"did":"did:plc:wq4aajammjtxdomz3e23667t","time_us":1783175888085434,"cursor":12345,"kind":"commit","commit":{"rev":"3mptbypluud2a","operation":"create","collection":"app.bsky.feed.like","rkey":"3mptbyplj5d2a","record":{"$type":"app.bsky.feed.like","createdAt":"2026-07-04T14:38:08.999Z","subject":{"cid":"bafyreiftot7eltsc3f6g4qktykmbv6jcmdmhcx5osscan6jpdxkpqcmcza","uri":"at://did:plc:r2zybk6op3ymzpz6jhqpkoy5/app.bsky.feed.post/3mpsjbtci2c2o"}},"cid":"bafyreiguce4jh7kcbmof3pmcvasifqtw24b6isakj5ve5ga2b4z4alpc4i"}}"#
        );
    }

    #[test]
    fn every_sample_event_gains_only_the_cursor() {
        for (i, line) in SAMPLE.lines().enumerate() {
            let seq = 1_000_000 + i as u64;
            let got = cursor(line, seq).unwrap();
            // Removing the inserted text gives back the upstream bytes exactly.
            let inserted = format!(",\"cursor\":{seq}");
            let at = got.find(&inserted).unwrap();
            assert_eq!(
                format!("{}{}", &got[..at], &got[at + inserted.len()..]),
                line
            );
            // It sits right after time_us, and the result parses with the cursor as a number.
            assert!(got[..at].ends_with(&format!(
                "\"time_us\":{}",
                serde_json::from_str::<serde_json::Value>(line).unwrap()["time_us"]
            )));
            let v: serde_json::Value = serde_json::from_str(&got).unwrap();
            assert_eq!(v["cursor"], seq);
            assert!(crate::event::parse_event(got.as_bytes()).is_ok());
        }
    }

    #[test]
    fn an_upstream_cursor_is_replaced_wherever_it_is() {
        let ours = r#"{"did":"d","time_us":5,"cursor":9,"kind":"identity","identity":{}}"#;
        for upstream in [
            r#"{"did":"d","time_us":5,"cursor":777,"kind":"identity","identity":{}}"#,
            r#"{"cursor":777,"did":"d","time_us":5,"kind":"identity","identity":{}}"#,
            r#"{"did":"d","time_us":5,"kind":"identity","identity":{},"cursor":777}"#,
            r#"{"did":"d","cursor":1,"time_us":5,"kind":"identity","identity":{},"cursor":2}"#,
        ] {
            assert_eq!(cursor(upstream, 9).unwrap(), ours, "{upstream}");
        }
        // Nested `cursor` keys are data, not the wire field.
        let nested = r#"{"did":"d","time_us":5,"kind":"identity","identity":{"cursor":1}}"#;
        assert_eq!(
            cursor(nested, 2).unwrap(),
            r#"{"did":"d","time_us":5,"cursor":2,"kind":"identity","identity":{"cursor":1}}"#
        );
        // Only members: time_us first, cursor first.
        assert_eq!(
            cursor(r#"{"time_us":1}"#, 3).unwrap(),
            r#"{"time_us":1,"cursor":3}"#
        );
        assert_eq!(
            cursor(r#"{"cursor":8,"time_us":1}"#, 3).unwrap(),
            r#"{"time_us":1,"cursor":3}"#
        );
        assert_eq!(
            cursor(r#"{"time_us":-1,"cursor":8}"#, u64::MAX).unwrap(),
            format!(r#"{{"time_us":-1,"cursor":{}}}"#, u64::MAX)
        );
    }

    #[test]
    fn without_cursor_inverts_with_cursor_on_every_sample_event() {
        for (i, line) in SAMPLE.lines().enumerate() {
            let mut with = Vec::new();
            with_cursor(line.as_bytes(), 77 + i as u64, &mut with).unwrap();
            let mut out = b"prefix".to_vec();
            without_cursor(&with, &mut out).unwrap();
            assert_eq!(&out[6..], line.as_bytes());
            let mut unchanged = Vec::new();
            without_cursor(line.as_bytes(), &mut unchanged).unwrap();
            assert_eq!(unchanged, line.as_bytes(), "nothing to remove");
        }
        for (input, want) in [
            (
                r#"{"cursor":1,"did":"d","time_us":5}"#,
                r#"{"did":"d","time_us":5}"#,
            ),
            (
                r#"{"did":"d","cursor":1,"time_us":5,"cursor":2}"#,
                r#"{"did":"d","time_us":5}"#,
            ),
            (r#"{"cursor":1}"#, r#"{}"#),
            (r#"{"a":{"cursor":1},"cursor":2}"#, r#"{"a":{"cursor":1}}"#),
        ] {
            let mut out = Vec::new();
            without_cursor(input.as_bytes(), &mut out).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), want, "{input}");
        }
        let mut out = Vec::new();
        assert!(without_cursor(b"{\"cursor\":1", &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn inputs_without_an_integer_time_us_are_refused_and_append_nothing() {
        for (bad, want) in [
            (r#"{"did":"d"}"#, WireError::MissingField("time_us")),
            (r#"{"time_us":"5"}"#, WireError::InvalidField("time_us")),
            (r#"{"time_us":1.5}"#, WireError::InvalidField("time_us")),
            (r#"{"time_us":01}"#, WireError::InvalidField("time_us")),
        ] {
            let mut out = Vec::new();
            assert_eq!(with_cursor(bad.as_bytes(), 1, &mut out), Err(want), "{bad}");
            assert!(out.is_empty());
        }
        let mut out = Vec::new();
        assert!(matches!(
            with_cursor(b"{\"time_us\":1", 1, &mut out),
            Err(WireError::Malformed(_))
        ));
        assert!(out.is_empty());
    }
}
