//! Byte positions of an object's members, for splicing JSON without re-serializing it.
//!
//! The relay forwards upstream JSON byte-for-byte; converting between wires only moves whole
//! values around. [`object_members`] finds where each member of one object starts and ends,
//! skipping nested values without decoding them. It checks structure (balanced brackets,
//! terminated strings, `:` and `,` in place), not JSON grammar in full: callers that take
//! untrusted input validate it with a real parser first (see `event_parts`).

use std::ops::Range;

/// Why: a JSON value nested deeper than this is abuse, not an event (the official records are a
/// few levels deep); bounds the scan's work the way serde_json's own recursion limit (128) does.
pub const MAX_DEPTH: usize = 128;

/// One `"key": value` member of an object, as byte ranges into the scanned input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The key between its quotes, still escaped.
    pub key: Range<usize>,
    /// The value, from its first to its last byte.
    pub value: Range<usize>,
}

/// The members of the object that starts at the first non-space byte of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectScan {
    /// Members in order.
    pub members: Vec<Member>,
    /// Offset of the opening `{`.
    pub open: usize,
    /// Offset of the closing `}`.
    pub close: usize,
}

/// The input is not a well-formed JSON object (at the byte offset given).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed JSON object at byte {0}")]
pub struct ScanError(pub usize);

fn skip_space(s: &[u8], mut at: usize) -> usize {
    while matches!(s.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// Offset just past the string whose opening quote is at `at`.
fn skip_string(s: &[u8], at: usize) -> Result<usize, ScanError> {
    let mut i = at + 1;
    loop {
        // Jump to the next quote or backslash (a tight search; strings are most of an event).
        let rest = s.get(i..).ok_or(ScanError(at))?;
        match rest.iter().position(|&c| c == b'"' || c == b'\\') {
            None => return Err(ScanError(at)),
            Some(p) if rest[p] == b'"' => return Ok(i + p + 1),
            Some(p) => i += p + 2,
        }
    }
}

/// Offset just past the value starting at `at` (which must not be whitespace).
fn skip_value(s: &[u8], at: usize) -> Result<usize, ScanError> {
    match s.get(at) {
        None => Err(ScanError(at)),
        Some(b'"') => skip_string(s, at),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut i = at;
            while let Some(&c) = s.get(i) {
                match c {
                    b'"' => {
                        i = skip_string(s, i)?;
                        continue;
                    }
                    b'{' | b'[' => {
                        depth += 1;
                        if depth > MAX_DEPTH {
                            return Err(ScanError(i));
                        }
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            Err(ScanError(at))
        }
        Some(b',' | b'}' | b']' | b':') => Err(ScanError(at)),
        Some(_) => {
            // A number, true, false or null: up to the next delimiter.
            let len = s[at..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(s.len() - at);
            Ok(at + len)
        }
    }
}

/// Scans the object that `json` holds (surrounding whitespace allowed, nothing else after it).
pub fn object_members(json: &[u8]) -> Result<ObjectScan, ScanError> {
    let open = skip_space(json, 0);
    if json.get(open) != Some(&b'{') {
        return Err(ScanError(open));
    }
    let mut members = Vec::with_capacity(8);
    let mut at = skip_space(json, open + 1);
    if json.get(at) == Some(&b'}') {
        return finish(json, members, open, at);
    }
    loop {
        if json.get(at) != Some(&b'"') {
            return Err(ScanError(at));
        }
        let key_end = skip_string(json, at)?;
        let colon = skip_space(json, key_end);
        if json.get(colon) != Some(&b':') {
            return Err(ScanError(colon));
        }
        let value_start = skip_space(json, colon + 1);
        let value_end = skip_value(json, value_start)?;
        members.push(Member {
            key: at + 1..key_end - 1,
            value: value_start..value_end,
        });
        at = skip_space(json, value_end);
        match json.get(at) {
            Some(b',') => at = skip_space(json, at + 1),
            Some(b'}') => return finish(json, members, open, at),
            _ => return Err(ScanError(at)),
        }
    }
}

fn finish(
    json: &[u8],
    members: Vec<Member>,
    open: usize,
    close: usize,
) -> Result<ObjectScan, ScanError> {
    let rest = skip_space(json, close + 1);
    if rest != json.len() {
        return Err(ScanError(rest));
    }
    Ok(ObjectScan {
        members,
        open,
        close,
    })
}

impl ObjectScan {
    /// The first member whose raw key is `key`.
    pub fn get<'j>(&self, json: &'j [u8], key: &str) -> Option<&'j [u8]> {
        self.members
            .iter()
            .find(|m| &json[m.key.clone()] == key.as_bytes())
            .map(|m| &json[m.value.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_values(json: &str) -> Vec<(String, String)> {
        let scan = object_members(json.as_bytes()).unwrap();
        scan.members
            .iter()
            .map(|m| {
                (
                    json[m.key.clone()].to_owned(),
                    json[m.value.clone()].to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn members_of_nested_and_spaced_objects() {
        assert_eq!(keys_values("{}"), vec![]);
        assert_eq!(keys_values(" { } "), vec![]);
        let got = keys_values(
            r#" { "a" : 1 , "b\"c":"x}\"]," ,"d":{"e":[1,{"f":"}"}]},"g":[],"h":null,"i":-1.5e3} "#,
        );
        let want = [
            ("a", "1"),
            ("b\\\"c", "\"x}\\\"],\""),
            ("d", r#"{"e":[1,{"f":"}"}]}"#),
            ("g", "[]"),
            ("h", "null"),
            ("i", "-1.5e3"),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn every_sample_event_scans_like_serde() {
        for line in include_str!("../../assets/jetstream-v1-sample.jsonl").lines() {
            let scan = object_members(line.as_bytes()).unwrap();
            let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
            assert_eq!(scan.members.len(), v.len());
            for m in &scan.members {
                let key = &line[m.key.clone()];
                let value: serde_json::Value =
                    serde_json::from_str(&line[m.value.clone()]).unwrap();
                assert_eq!(v[key], value, "{key}");
            }
            assert_eq!((scan.open, scan.close), (0, line.len() - 1));
        }
    }

    #[test]
    fn malformed_objects_are_rejected() {
        for bad in [
            "",
            "[]",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1 \"b\":2}",
            "{\"a\":\"unterminated}",
            "{\"a\":{\"b\":1}",
            "{\"a\":1} x",
            "{a:1}",
            "{\"a\":1}}",
        ] {
            assert!(object_members(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let deep = format!(
            "{{\"a\":{}{}}}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(object_members(deep.as_bytes()).is_err());
        let ok = format!(
            "{{\"a\":{}{}}}",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert!(object_members(ok.as_bytes()).is_ok());
    }
}
