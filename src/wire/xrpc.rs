//! XRPC error envelopes: what the v2 endpoints answer instead of a plain-text 400.
//!
//! Pre-upgrade rejections of `subscribeEvents` and errors of `getZstdDictionary` are JSON
//! `{"error":"<Name>","message":"…"}` with `Content-Type: application/json`, as the official
//! server writes them (Go's `encoding/json`, so `<`, `>` and `&` in the message are `\u003c`…).
//! Clients match on the error name (`atproto` raises `JetstreamCursorTooOldError` for
//! `CursorTooOld`, refetches the dictionary on `UnknownZstdDictionary`).

use crate::handshake;

/// One XRPC error: HTTP status, error name, message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("HTTP {status} {error}: {message}")]
pub struct XrpcError {
    /// HTTP status (400, 404).
    pub status: u16,
    /// The lexicon error name clients match on.
    pub error: &'static str,
    /// Human-readable detail (the official server's wording where it has one).
    pub message: String,
}

impl XrpcError {
    /// 400 `InvalidRequest`.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        XrpcError {
            status: 400,
            error: "InvalidRequest",
            message: message.into(),
        }
    }

    /// 400 `CursorTooOld`: a seq cursor below the oldest retained seq (`floor`) on
    /// `subscribeEvents` (`/subscribe` clamps instead).
    pub fn cursor_too_old(requested: u64, floor: u64) -> Self {
        XrpcError {
            status: 400,
            error: "CursorTooOld",
            message: format!(
                "subscribe: cursor too old: cursor {requested} below lookback floor {floor}; re-backfill from your last seq"
            ),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        let mut body = br#"{"error":"#.to_vec();
        push_json_string(self.error, &mut body);
        if !self.message.is_empty() {
            body.extend_from_slice(br#","message":"#);
            push_json_string(&self.message, &mut body);
        }
        body.push(b'}');
        body
    }

    /// The complete HTTP response (`Connection: close`).
    pub fn to_response(&self) -> Vec<u8> {
        handshake::simple_response(self.status, "application/json", &self.body())
    }
}

/// Appends `s` as a JSON string the way Go's `encoding/json` writes it (HTML-safe escapes).
pub(crate) fn push_json_string(s: &str, out: &mut Vec<u8>) {
    let quoted = serde_json::Value::from(s).to_string();
    for c in quoted.chars() {
        match c {
            '<' => out.extend_from_slice(b"\\u003c"),
            '>' => out.extend_from_slice(b"\\u003e"),
            '&' => out.extend_from_slice(b"\\u0026"),
            '\u{2028}' => out.extend_from_slice(b"\\u2028"),
            '\u{2029}' => out.extend_from_slice(b"\\u2029"),
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_and_responses() {
        let e = XrpcError::cursor_too_old(5, 120);
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"error":"CursorTooOld","message":"subscribe: cursor too old: cursor 5 below lookback floor 120; re-backfill from your last seq"}"#
        );
        let response = String::from_utf8(e.to_response()).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{response}"
        );
        assert!(response.contains("\r\nContent-Type: application/json\r\n"));
        assert!(response.ends_with(&String::from_utf8(e.body()).unwrap()));
        let odd = XrpcError::invalid_request("a<b>&\"c\"\n\u{2028}");
        assert_eq!(
            String::from_utf8(odd.body()).unwrap(),
            r#"{"error":"InvalidRequest","message":"a\u003cb\u003e\u0026\"c\"\n\u2028"}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&odd.body()).unwrap();
        assert_eq!(v["message"], "a<b>&\"c\"\n\u{2028}");
        let bare = XrpcError::invalid_request("");
        assert_eq!(bare.body(), br#"{"error":"InvalidRequest"}"#);
    }
}
