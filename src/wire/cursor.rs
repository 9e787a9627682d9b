//! The one `?cursor=` parameter of both endpoints, split into two namespaces by magnitude.
//!
//! Official Jetstream (docs §5.1): a value below 10^15 is a sequence number of the instance
//! (exact, instance-local); 10^15 and above is unix microseconds (the v1 meaning). Any real
//! µs timestamp since 2001 is above 10^15 and no sequence approaches it, so the ranges never
//! collide. Negative values are refused by the official server on both endpoints
//! (`invalid cursor: negative value -5`).

use std::fmt;

/// Why 10^15: the official split point (`CursorSeqMaxThreshold`); `>=` is a µs timestamp.
pub const SEQ_CURSOR_LIMIT: i64 = 1_000_000_000_000_000;

/// What a cursor value names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cursor {
    /// Replay from the event with this seq (inclusive), exact on this instance.
    Seq(u64),
    /// Replay from the first event witnessed at or after this unix µs.
    TimeUs(i64),
}

/// Why a raw `cursor` value is refused (HTTP 400); Display is the official message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Not a decimal i64.
    #[error("subscribe: invalid cursor: {}", go_quote(.0))]
    NotAnInteger(String),
    /// Below zero: neither a seq nor a plausible time.
    #[error("subscribe: invalid cursor: negative value {0}")]
    Negative(i64),
}

impl Cursor {
    /// Classifies a cursor value: `< 10^15` is a seq, `>= 10^15` unix µs; negative is refused.
    pub fn from_value(value: i64) -> Result<Cursor, CursorError> {
        match u64::try_from(value) {
            Err(_) => Err(CursorError::Negative(value)),
            Ok(seq) if value < SEQ_CURSOR_LIMIT => Ok(Cursor::Seq(seq)),
            Ok(_) => Ok(Cursor::TimeUs(value)),
        }
    }

    /// Parses the raw query value like the official server (`strconv.ParseInt(raw, 10, 64)`:
    /// an optional sign, decimal digits only). An empty value means "no cursor" (`Ok(None)`).
    pub fn parse(raw: &str) -> Result<Option<Cursor>, CursorError> {
        if raw.is_empty() {
            return Ok(None);
        }
        let value: i64 = raw
            .parse()
            .map_err(|_| CursorError::NotAnInteger(raw.to_owned()))?;
        Cursor::from_value(value).map(Some)
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cursor::Seq(seq) => write!(f, "seq {seq}"),
            Cursor::TimeUs(us) => write!(f, "time_us {us}"),
        }
    }
}

/// Quotes like Go's `%q` for the printable ASCII the official messages echo: `"` and `\`
/// escaped, control and non-ASCII characters as `\u`/`\x` escapes (close to, not exactly, Go's
/// rules for non-ASCII, which keep printable Unicode as is; only the message text differs).
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_ascii() => out.push(c),
            c if !c.is_control() => out.push(c),
            c => out.push_str(&format!("\\u{:04x}", c as u32)),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_split_is_at_ten_to_the_fifteen() {
        assert_eq!(Cursor::from_value(0), Ok(Cursor::Seq(0)));
        assert_eq!(Cursor::from_value(12_345), Ok(Cursor::Seq(12_345)));
        assert_eq!(
            Cursor::from_value(SEQ_CURSOR_LIMIT - 1),
            Ok(Cursor::Seq(999_999_999_999_999))
        );
        assert_eq!(
            Cursor::from_value(SEQ_CURSOR_LIMIT),
            Ok(Cursor::TimeUs(SEQ_CURSOR_LIMIT))
        );
        assert_eq!(
            Cursor::from_value(1_783_175_888_085_434),
            Ok(Cursor::TimeUs(1_783_175_888_085_434))
        );
        assert_eq!(Cursor::from_value(i64::MAX), Ok(Cursor::TimeUs(i64::MAX)));
        assert_eq!(Cursor::from_value(-1), Err(CursorError::Negative(-1)));
    }

    #[test]
    fn raw_values_parse_like_go_parse_int() {
        assert_eq!(Cursor::parse(""), Ok(None));
        assert_eq!(Cursor::parse("7"), Ok(Some(Cursor::Seq(7))));
        assert_eq!(Cursor::parse("+7"), Ok(Some(Cursor::Seq(7))));
        assert_eq!(Cursor::parse("007"), Ok(Some(Cursor::Seq(7))));
        for bad in ["x", "1.5", " 1", "1e6", "99999999999999999999", "0x10"] {
            assert_eq!(
                Cursor::parse(bad),
                Err(CursorError::NotAnInteger(bad.into()))
            );
        }
        assert_eq!(
            Cursor::parse("abc").unwrap_err().to_string(),
            "subscribe: invalid cursor: \"abc\""
        );
        assert_eq!(
            Cursor::parse("-5").unwrap_err().to_string(),
            "subscribe: invalid cursor: negative value -5"
        );
    }

    #[test]
    fn go_quoting() {
        assert_eq!(go_quote("abc"), "\"abc\"");
        assert_eq!(go_quote("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\x01\"");
        assert_eq!(go_quote("é"), "\"é\"");
    }
}
