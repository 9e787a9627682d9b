//! The non-event frames of `subscribeEvents`: `#info` advisories, the terminal error frame,
//! and the rules of the connection itself (subprotocol, client data frames).
//!
//! Formats from the official encoder (`EncodeV2Info`, `EncodeV2Error`): an info frame is a
//! message whose payload is `{"$type":"…#info","message":"…","name":"…"}` (keys alphabetical
//! after `$type`, `message` omitted when empty); an error frame is
//! `{"$type":"error","error":"…","message":"…"}` and the server closes right after it. On a
//! compressed connection both are compressed like events (every frame is one zstd frame).

use super::event_parts::SUBSCRIBE_EVENTS_NSID;
use super::xrpc::push_json_string;
use crate::handshake::Request;

/// The one subprotocol of the v2 wire (atproto proposal 0015); also its default, so a client
/// that does not offer it gets the same framing.
pub const SUBPROTOCOL: &str = "xrpc.v1.json";

/// The v2 endpoint is server-push only: a client data frame closes the connection with 1008
/// (policy violation), as the official server's read side does.
pub const CLIENT_DATA_CLOSE_CODE: u16 = 1008;
/// Close reason sent with [`CLIENT_DATA_CLOSE_CODE`].
pub const CLIENT_DATA_CLOSE_REASON: &str = "unexpected data message";

/// The `#info` advisories a server sends as the first frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InfoName {
    /// A µs cursor older than the retained window was clamped to the oldest event.
    OutdatedCursor,
    /// A seq cursor beyond the next seq to be assigned: the stream starts live.
    FutureCursor,
}

impl InfoName {
    /// The `name` field.
    pub fn as_str(self) -> &'static str {
        match self {
            InfoName::OutdatedCursor => "OutdatedCursor",
            InfoName::FutureCursor => "FutureCursor",
        }
    }
}

/// Appends an `#info` message frame.
pub fn info_frame(name: InfoName, message: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"$type\":\"message\",\"payload\":{\"$type\":\"");
    out.extend_from_slice(SUBSCRIBE_EVENTS_NSID.as_bytes());
    out.extend_from_slice(b"#info\"");
    if !message.is_empty() {
        out.extend_from_slice(b",\"message\":");
        push_json_string(message, out);
    }
    out.extend_from_slice(b",\"name\":\"");
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b"\"}}");
}

/// `#info OutdatedCursor`, in the official wording: the stream starts at `start_seq`.
pub fn outdated_cursor_frame(start_seq: u64, out: &mut Vec<u8>) {
    let message =
        format!("requested timestamp cursor below retention floor; starting at seq {start_seq}");
    info_frame(InfoName::OutdatedCursor, &message, out);
}

/// `#info FutureCursor`: `requested` is at or beyond `next_seq`, the stream starts live.
/// (The August 2026 server source has no such frame yet; the wording is ours.)
pub fn future_cursor_frame(requested: u64, next_seq: u64, out: &mut Vec<u8>) {
    let message = format!(
        "requested cursor {requested} is beyond the next seq {next_seq}; starting at the live tip"
    );
    info_frame(InfoName::FutureCursor, &message, out);
}

/// Appends a terminal error frame; the connection closes right after it.
pub fn error_frame(error: &str, message: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"$type\":\"error\",\"error\":");
    push_json_string(error, out);
    if !message.is_empty() {
        out.extend_from_slice(b",\"message\":");
        push_json_string(message, out);
    }
    out.push(b'}');
}

/// `ConsumerTooSlow`, in the official wording: `lag` events behind, resume at `cursor`.
pub fn consumer_too_slow_frame(lag: u64, cursor: u64, out: &mut Vec<u8>) {
    let message = format!(
        "reading below the floor rate {lag} events behind the tip; reconnect with cursor={cursor}"
    );
    error_frame("ConsumerTooSlow", &message, out);
}

/// The `Sec-WebSocket-Protocol` value to answer with: [`SUBPROTOCOL`] when the client offered
/// it (exact, case-sensitive token match, as the official server), else none.
pub fn negotiate_subprotocol(req: &Request<'_>) -> Option<&'static str> {
    req.header_values("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .any(|token| token.trim() == SUBPROTOCOL)
        .then_some(SUBPROTOCOL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{ParseStatus, parse_request};
    use crate::wire::{V2Frame, parse_v2_frame};

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn golden_info_and_error_frames() {
        assert_eq!(
            text(|o| outdated_cursor_frame(42, o)),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#info","message":"requested timestamp cursor below retention floor; starting at seq 42","name":"OutdatedCursor"}}"#
        );
        assert_eq!(
            text(|o| info_frame(InfoName::FutureCursor, "", o)),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#info","name":"FutureCursor"}}"#
        );
        assert_eq!(
            text(|o| consumer_too_slow_frame(100_001, 17, o)),
            r#"{"$type":"error","error":"ConsumerTooSlow","message":"reading below the floor rate 100001 events behind the tip; reconnect with cursor=17"}"#
        );
        // The upstream parser reads them back.
        let future = text(|o| future_cursor_frame(900, 10, o));
        assert_eq!(
            parse_v2_frame(future.as_bytes()).unwrap(),
            V2Frame::Info {
                name: "FutureCursor".into(),
                message: Some(
                    "requested cursor 900 is beyond the next seq 10; starting at the live tip"
                        .into()
                ),
            }
        );
    }

    #[test]
    fn subprotocol_is_echoed_only_when_offered_exactly() {
        let offer = |header: &str| {
            let raw = format!("GET / HTTP/1.1\r\n{header}\r\n");
            let ParseStatus::Complete { request, .. } = parse_request(raw.as_bytes()).unwrap()
            else {
                panic!("incomplete");
            };
            negotiate_subprotocol(&request)
        };
        assert_eq!(
            offer("Sec-WebSocket-Protocol: xrpc.v1.json\r\n"),
            Some(SUBPROTOCOL)
        );
        assert_eq!(
            offer("Sec-WebSocket-Protocol: chat, xrpc.v1.json\r\n"),
            Some(SUBPROTOCOL)
        );
        assert_eq!(offer("Sec-WebSocket-Protocol: XRPC.V1.JSON\r\n"), None);
        assert_eq!(offer(""), None);
    }
}
