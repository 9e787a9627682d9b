//! Jetstream as it is today, as pure functions: the sequence cursor on `/subscribe`, the v2
//! `subscribeEvents` wire, and the conversions between them. No I/O; the relay (writer,
//! listener, follower) and the mock call these.
//!
//! - [`cursor`]: the `?cursor=` namespace rule (`< 10^15` seq, `>= 10^15` unix µs).
//! - [`v1_cursor`]: an upstream v1 event + the relay's seq → the `/subscribe` frame with
//!   `"cursor":seq` right after `time_us` ([`with_cursor`]).
//! - [`event_parts`]: one event read from either wire and rendered to either ([`v1_to_v2`],
//!   [`parse_v2_frame`], [`EventParts::render_v1`]).
//! - [`v2_control`]: `#info` and error frames, subprotocol, the client-data-frame rule.
//! - [`v2_query`]: the `subscribeEvents` query with its pre-upgrade 400s, mapped onto
//!   [`crate::subscription::SubscriberOptions`] and shapes.
//! - [`dictionary`]: `getZstdDictionary`. Compression itself: [`crate::compress`] with
//!   [`crate::compress::Dictionary::V2`].
//! - [`xrpc`]: XRPC error envelopes. [`rfc3339`]: the wire's timestamps.
//!
//! Where the bytes come from: bluesky-social/jetstream at its August 2026 head (the encoder,
//! handler, filters, cursor resolution, the lexicons) and the PyPI `atproto` 0.0.73 models;
//! each module says which part it follows.

pub mod cursor;
pub mod dictionary;
pub mod event_parts;
pub mod json_scan;
pub mod rfc3339;
pub mod v1_cursor;
pub mod v2_control;
pub mod v2_query;
pub mod xrpc;

pub use cursor::{Cursor, CursorError, SEQ_CURSOR_LIMIT};
pub use dictionary::{
    DictionaryResponse, GET_ZSTD_DICTIONARY_PATH, SUBSCRIBE_EVENTS_PATH, get_zstd_dictionary,
    get_zstd_dictionary_response,
};
pub use event_parts::{
    Body, CommitParts, EventParts, MAX_V2_FRAME_BYTES, MessageKind, V2Frame, check_v1_convertible,
    parse_v2_frame, v1_to_v2,
};
pub use v1_cursor::{with_cursor, without_cursor};
pub use v2_control::{
    CLIENT_DATA_CLOSE_CODE, CLIENT_DATA_CLOSE_REASON, InfoName, SUBPROTOCOL,
    consumer_too_slow_frame, error_frame, future_cursor_frame, info_frame, negotiate_subprotocol,
    outdated_cursor_frame,
};
pub use v2_query::{
    KindSet, SubscribeEventsParams, parse_subscribe_events, parse_subscribe_events_query,
};
pub use xrpc::XrpcError;

/// Why an event or frame could not be converted; the caller logs it and skips the event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not a well-formed JSON object.
    #[error(transparent)]
    Malformed(#[from] json_scan::ScanError),
    /// Not valid JSON (untrusted v2 input is validated in full first).
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// Larger than [`event_parts::MAX_V2_FRAME_BYTES`].
    #[error("frame of {0} bytes is too large")]
    TooLarge(usize),
    /// A required field is absent.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field has the wrong JSON type or an impossible value.
    #[error("invalid field {0}")]
    InvalidField(&'static str),
    /// A v2 message `$type` this build does not know.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// `#sync` exists on the v2 wire only.
    #[error("#sync events have no v1 form")]
    NoV1Form,
    /// A time outside what RFC 3339 can express.
    #[error(transparent)]
    Time(#[from] rfc3339::TimeError),
}
