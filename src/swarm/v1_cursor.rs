//! The `cursor` field of a `/subscribe` (v1) frame: the serving instance's seq of the event.
//!
//! Official Jetstream (2026) and jetrelay put it right after `time_us`:
//! `{"did":"…","time_us":T,"cursor":S,"kind":…}`. Everything else is the upstream event, byte
//! for byte. [`split`] finds the field exactly there and nowhere else — a `cursor` elsewhere, or
//! with a non-canonical number, is left in place so that the byte comparison that follows fails
//! and names the spot — and [`strip`] returns the event without it, which is what the mock's
//! generator produces.
//!
//! Written from the documented layout, not with the relay's `wire::with_cursor`, so it can judge
//! that code.

use std::borrow::Cow;
use std::ops::Range;

/// The member text that introduces the field.
pub(crate) const FIELD: &[u8] = b",\"cursor\":";

/// Longest DID scanned for its closing quote: real DIDs are < 100 bytes; a frame without one
/// in reach is not shaped like an event and costs bounded time.
const MAX_DID_SCAN: usize = 2048;

/// Where the `cursor` member sits in a frame, and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorField {
    /// The bytes `,"cursor":<digits>` (removing them gives the event without the field).
    pub range: Range<usize>,
    /// The seq.
    pub seq: u64,
}

/// Finds `,"cursor":<seq>` right after the `time_us` number of `{"did":"…","time_us":<int>`.
/// `None` when the frame has no such member there (or one whose value is not a canonical
/// unsigned integer).
pub fn split(frame: &[u8]) -> Option<CursorField> {
    let rest = frame.strip_prefix(b"{\"did\":\"")?;
    let quote = rest[..rest.len().min(MAX_DID_SCAN)]
        .iter()
        .position(|&c| c == b'"' || c == b'\\')?;
    if rest[quote] != b'"' {
        return None;
    }
    let after_did = 8 + quote + 1;
    let time = frame.get(after_did..)?.strip_prefix(b",\"time_us\":")?;
    let time_start = after_did + b",\"time_us\":".len();
    let sign = usize::from(time.first() == Some(&b'-'));
    let digits = time[sign..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count();
    if digits == 0 {
        return None;
    }
    let field_start = time_start + sign + digits;
    let value = frame.get(field_start..)?.strip_prefix(FIELD)?;
    let n = value.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || (n > 1 && value[0] == b'0') {
        return None;
    }
    let seq = std::str::from_utf8(&value[..n]).ok()?.parse().ok()?;
    Some(CursorField {
        range: field_start..field_start + FIELD.len() + n,
        seq,
    })
}

/// The frame without its `cursor` field, and the field's value (`None`: no field, the frame
/// as it is).
pub fn strip(frame: &[u8]) -> (Cow<'_, [u8]>, Option<u64>) {
    match split(frame) {
        Some(f) => {
            let mut out = Vec::with_capacity(frame.len() - f.range.len());
            out.extend_from_slice(&frame[..f.range.start]);
            out.extend_from_slice(&frame[f.range.end..]);
            (Cow::Owned(out), Some(f.seq))
        }
        None => (Cow::Borrowed(frame), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../assets/jetstream-v1-sample.jsonl");

    #[test]
    fn strips_exactly_what_the_wire_inserts() {
        for (i, line) in SAMPLE.lines().enumerate() {
            let seq = [1, 9, 10, 999_999, u64::MAX][i % 5];
            let mut with = Vec::new();
            crate::wire::with_cursor(line.as_bytes(), seq, &mut with).unwrap();
            let (plain, got) = strip(&with);
            assert_eq!(got, Some(seq), "{line}");
            assert_eq!(&plain[..], line.as_bytes());
            // Without the field: nothing to strip, the same bytes back.
            let (same, none) = strip(line.as_bytes());
            assert_eq!(none, None);
            assert!(matches!(same, Cow::Borrowed(_)));
        }
    }

    #[test]
    fn only_a_canonical_field_right_after_time_us_counts() {
        let ok = br#"{"did":"did:plc:a","time_us":-5,"cursor":0,"kind":"identity","identity":{}}"#;
        assert_eq!(split(ok).map(|f| f.seq), Some(0));
        for bad in [
            // Elsewhere (the upstream's own, or misplaced): left for the comparison to catch.
            &br#"{"did":"did:plc:a","time_us":5,"kind":"identity","cursor":7}"#[..],
            br#"{"cursor":7,"did":"did:plc:a","time_us":5}"#,
            // Not a canonical unsigned integer.
            br#"{"did":"did:plc:a","time_us":5,"cursor":07}"#,
            br#"{"did":"did:plc:a","time_us":5,"cursor":-7}"#,
            br#"{"did":"did:plc:a","time_us":5,"cursor":"7"}"#,
            br#"{"did":"did:plc:a","time_us":5,"cursor":99999999999999999999}"#,
            // Not shaped like an event.
            br#"{"did":"did:pl\"c","time_us":5,"cursor":7}"#,
            br#"{"did":"d","time_us":,"cursor":7}"#,
            b"",
            b"{\"did\":\"",
        ] {
            assert_eq!(split(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
