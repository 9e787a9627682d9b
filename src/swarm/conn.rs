//! The client side of one WebSocket connection as a socket-free state machine: building the
//! upgrade request, judging the response, and consuming server frames (events, pings, close).
//!
//! The epoll driver only moves bytes: it hands received bytes to [`Session::feed`] and writes
//! whatever the session queued in its output buffer. Tests drive the same code with hand-made
//! byte streams, including corrupted, reordered and gapped ones.

use super::Wire;
use super::filter::Filter;
use super::histogram::Histogram;
pub use super::verify::Checks;
use super::verify::{
    Accepted, Delivered, Order, OrderError, Received, Verified, Verifier, VerifyError,
};
use crate::frame::{self, FrameHeader, Opcode};
use std::collections::BTreeMap;

/// Longest upgrade response accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Failures whose details are kept (the rest are only counted).
pub const MAX_FAILURE_EXAMPLES: usize = 20;

/// Close codes (and v2 `#info` / error names) remembered per client (a reconnecting client
/// sees one per connection).
const MAX_CLOSES_PER_CLIENT: usize = 8;

/// Distinct `#info` / error names counted in the report: a server inventing a new name per
/// frame must not grow the report without bound.
const MAX_NAMES: usize = 32;

/// Builds the HTTP upgrade request.
pub fn upgrade_request(host: &str, path_and_query: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: jetrelay-swarm\r\n\r\n"
    )
    .into_bytes()
}

/// What the server answered to the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// 101 with a correct `Sec-WebSocket-Accept`; frames start after `head_len` bytes.
    Accepted {
        /// Length of the response head.
        head_len: usize,
    },
    /// Any other status.
    Refused {
        /// The HTTP status.
        status: u16,
    },
}

/// An unacceptable upgrade response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// Not parseable as HTTP.
    #[error("malformed HTTP response")]
    Malformed,
    /// The head exceeds [`MAX_RESPONSE_HEAD`].
    #[error("HTTP response head too long")]
    TooLong,
    /// 101 without `Upgrade: websocket` / `Connection: upgrade`.
    #[error("101 response without Upgrade: websocket and Connection: Upgrade")]
    NotUpgrade,
    /// `Sec-WebSocket-Accept` missing or wrong.
    #[error("wrong Sec-WebSocket-Accept (got {got:?}, want {want:?})")]
    BadAccept {
        /// What the server sent.
        got: String,
        /// What RFC 6455 requires for our key.
        want: String,
    },
}

/// Parses the upgrade response in `buf`; `Ok(None)` = incomplete.
pub fn parse_upgrade_response(buf: &[u8], key: &str) -> Result<Option<Upgrade>, UpgradeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(UpgradeError::TooLong);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(UpgradeError::Malformed),
    };
    let status = resp.code.ok_or(UpgradeError::Malformed)?;
    if status != 101 {
        return Ok(Some(Upgrade::Refused { status }));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let upgrade_ok = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection_ok = header("connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    });
    if !upgrade_ok || !connection_ok {
        return Err(UpgradeError::NotUpgrade);
    }
    let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let got = header("sec-websocket-accept").unwrap_or_default();
    if got != want {
        return Err(UpgradeError::BadAccept { got, want });
    }
    Ok(Some(Upgrade::Accepted { head_len }))
}

/// A failure worth reporting, with enough context to find it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    /// Client id (global across processes).
    pub client: u64,
    /// The seq involved, when known.
    pub seq: Option<u64>,
    /// What went wrong.
    pub reason: String,
}

/// Process-wide counters and samples, shared by all sessions.
#[derive(Debug, Default)]
pub struct Totals {
    /// Receive-time minus `time_us`, in µs.
    pub latency: Histogram,
    /// Events whose `time_us` lies in the future (clock skew or bogus time).
    pub negative_latency: u64,
    /// Verification failures (all, including those without kept details).
    pub failures: u64,
    /// The first [`MAX_FAILURE_EXAMPLES`] failures.
    pub examples: Vec<Failure>,
    /// New events accepted.
    pub events: u64,
    /// Replayed duplicates skipped after reconnects.
    pub duplicates: u64,
    /// Bytes of all frames received (headers included).
    pub frame_bytes: u64,
    /// The first close reason seen per close code.
    pub close_reasons: BTreeMap<u16, String>,
    /// v2 `#sync` messages received (replayed duplicates excluded).
    pub syncs: u64,
    /// v2 `#info` frames by name, with the first message of each.
    pub infos: BTreeMap<String, (u64, String)>,
    /// v2 error frames by error name, with the first message of each.
    pub errors: BTreeMap<String, (u64, String)>,
    /// v1 events that carried the server's `cursor` field.
    pub events_with_cursor: u64,
}

/// Counts one named frame (`#info`, error) and keeps its first message.
fn count_name(map: &mut BTreeMap<String, (u64, String)>, name: &str, message: Option<&str>) {
    if let Some(entry) = map.get_mut(name) {
        entry.0 += 1;
    } else if map.len() < MAX_NAMES {
        map.insert(
            name.to_string(),
            (1, message.unwrap_or_default().to_string()),
        );
    }
}

impl Totals {
    /// Counts a failure and keeps its details if there is room.
    pub fn fail(&mut self, client: u64, seq: Option<u64>, reason: String) {
        self.failures += 1;
        if self.examples.len() < MAX_FAILURE_EXAMPLES {
            self.examples.push(Failure {
                client,
                seq,
                reason,
            });
        }
    }
}

/// Per-client state that survives reconnects.
#[derive(Debug, Clone, Default)]
pub struct ClientState {
    /// Global client id.
    pub id: u64,
    /// Sequence state.
    pub order: Order,
    /// New events accepted.
    pub events: u64,
    /// Newest `time_us` received (for the "behind" computation and reconnect cursors).
    pub max_time_us: Option<i64>,
    /// Close codes received (1005 = close frame without a code), oldest first, capped.
    pub closes: Vec<u16>,
    /// Verification failures of this client.
    pub failures: u64,
    /// Successful upgrades.
    pub upgrades: u64,
    /// HTTP statuses of refused upgrades.
    pub refused: Vec<u16>,
    /// v2 `#sync` messages accepted.
    pub syncs: u64,
    /// v2 `#info` names received, oldest first, capped.
    pub infos: Vec<String>,
    /// v2 error frame names received, oldest first, capped.
    pub errors: Vec<String>,
    /// v1 events with the server's `cursor` field.
    pub with_cursor: u64,
    /// v1 events without it.
    pub without_cursor: u64,
}

/// What the connection should do after feeding bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep reading.
    Continue,
    /// The server sent a close frame (we queued our reply): close after flushing.
    Closed,
    /// A protocol violation: drop the connection.
    Abort,
}

/// Where one open connection stands (frames after a close or an error frame are violations).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Frames flow.
    #[default]
    Streaming,
    /// A v2 error frame was received: only the close may follow.
    Errored,
    /// A close frame was received.
    Closed,
}

/// The frame-level state of one open connection.
#[derive(Debug, Default)]
pub struct Session {
    /// Where the connection stands.
    stage: Stage,
    /// Whether this connection's v1 events carry the `cursor` field (set by the first one: a
    /// server adds it to every event or to none).
    cursor_field: Option<bool>,
}

impl Session {
    /// A fresh session right after a successful upgrade.
    pub fn new() -> Session {
        Session::default()
    }

    /// Consumes complete frames from `buf`, returning how many bytes were used (the rest is a
    /// partial frame to present again with more bytes) and what to do next. Replies (pongs,
    /// close) are appended to `out`, masked.
    #[allow(clippy::too_many_arguments)]
    pub fn feed(
        &mut self,
        buf: &[u8],
        client: &mut ClientState,
        filter: &Filter,
        verifier: &mut Verifier,
        checks: &Checks,
        totals: &mut Totals,
        now_us: i64,
        out: &mut Vec<u8>,
    ) -> (usize, Next) {
        let mut at = 0;
        loop {
            let (header, payload) = match frame::split_frame(&buf[at..]) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    // A partial frame must still be one we can hold.
                    if let Ok(Some(h)) = frame::parse_header(&buf[at..])
                        && h.payload_len > super::verify::MAX_EVENT_LEN as u64
                    {
                        totals.fail(
                            client.id,
                            None,
                            format!("frame of {} bytes exceeds the limit", h.payload_len),
                        );
                        client.failures += 1;
                        return (at, Next::Abort);
                    }
                    return (at, Next::Continue);
                }
                Err(e) => {
                    totals.fail(client.id, None, format!("invalid frame header: {e}"));
                    client.failures += 1;
                    return (at, Next::Abort);
                }
            };
            let frame_len = header.header_len + payload.len();
            at += frame_len;
            totals.frame_bytes += frame_len as u64;
            match self.on_frame(
                header, payload, client, filter, verifier, checks, totals, now_us, out,
            ) {
                Next::Continue => {}
                other => return (at, other),
            }
        }
    }

    /// Handles one complete frame.
    #[allow(clippy::too_many_arguments)]
    fn on_frame(
        &mut self,
        header: FrameHeader,
        payload: &[u8],
        client: &mut ClientState,
        filter: &Filter,
        verifier: &mut Verifier,
        checks: &Checks,
        totals: &mut Totals,
        now_us: i64,
        out: &mut Vec<u8>,
    ) -> Next {
        let mut fail = |totals: &mut Totals, seq, reason: String| {
            client.failures += 1;
            totals.fail(client.id, seq, reason);
        };
        if header.mask.is_some() {
            fail(totals, None, "server sent a masked frame".into());
            return Next::Abort;
        }
        match (self.stage, header.opcode) {
            (Stage::Closed, _) => {
                fail(totals, None, "frame after the close frame".into());
                return Next::Abort;
            }
            (Stage::Errored, Opcode::Text | Opcode::Binary) => {
                fail(
                    totals,
                    None,
                    "data frame after a terminal error frame".into(),
                );
                return Next::Abort;
            }
            _ => {}
        }
        if !header.fin || header.opcode == Opcode::Continuation {
            fail(
                totals,
                None,
                "fragmented message (Jetstream sends one frame per event)".into(),
            );
            return Next::Abort;
        }
        let mask = || fastrand::u32(..).to_ne_bytes();
        let binary = match header.opcode {
            Opcode::Ping => {
                frame::encode_client_frame(Opcode::Pong, payload, mask(), out);
                return Next::Continue;
            }
            Opcode::Pong => return Next::Continue,
            Opcode::Close => {
                self.stage = Stage::Closed;
                let code = match frame::parse_close(payload) {
                    Ok((code, reason)) => {
                        let code = code.unwrap_or(1005);
                        totals
                            .close_reasons
                            .entry(code)
                            .or_insert_with(|| reason.to_string());
                        code
                    }
                    Err(e) => {
                        fail(totals, None, format!("invalid close frame: {e:?}"));
                        payload
                            .first_chunk::<2>()
                            .map(|c| u16::from_be_bytes(*c))
                            .unwrap_or(1005)
                    }
                };
                if client.closes.len() < MAX_CLOSES_PER_CLIENT {
                    client.closes.push(code);
                }
                let reply = if (1000..=4999).contains(&code) && code != 1005 {
                    code
                } else {
                    1000
                };
                frame::encode_client_close(frame::CloseCode(reply), "", mask(), out);
                return Next::Closed;
            }
            Opcode::Text => false,
            Opcode::Binary => true,
            Opcode::Continuation => return Next::Abort,
        };
        // The cache hint: v1 the generator's next number, v2 the seq that followed this
        // client's last one on another client of the same URL.
        let predicted = match checks.wire {
            Wire::V1 => client.order.last.map(|l| l + 1),
            Wire::V2 => client
                .order
                .last_wire
                .and_then(|w| verifier.v2_successor(checks.target, w)),
        };
        match verifier.verify_frame(checks, binary, payload, predicted) {
            Ok(Delivered::Event(v)) => {
                self.on_event(v, client, filter, verifier, checks, totals, now_us)
            }
            Ok(Delivered::Sync { wire_seq, did }) => {
                let frame_len = if binary {
                    // The size limit counts the uncompressed frame; the compressed cache
                    // holds it.
                    verifier
                        .v2_frame_len(checks.target, wire_seq)
                        .unwrap_or(payload.len())
                } else {
                    payload.len()
                };
                on_sync(
                    wire_seq, &did, frame_len, client, filter, verifier, checks, totals,
                );
            }
            Ok(Delivered::Info { name, message }) => {
                count_name(&mut totals.infos, &name, message.as_deref());
                if client.infos.len() < MAX_CLOSES_PER_CLIENT {
                    client.infos.push(name);
                }
            }
            Ok(Delivered::Error { error, message }) => {
                self.stage = Stage::Errored;
                count_name(&mut totals.errors, &error, message.as_deref());
                if client.errors.len() < MAX_CLOSES_PER_CLIENT {
                    client.errors.push(error);
                }
            }
            Err(e) => {
                let seq = match &e {
                    VerifyError::Mismatch { seq, .. } => Some(*seq),
                    _ => None,
                };
                fail(totals, seq, e.to_string());
                if let Some(seq) = seq {
                    // The seq is known: count the event as received (wrongly) so that one
                    // corrupted event is one failure, not also a gap.
                    client.order.last = Some(client.order.last.map_or(seq, |l| l.max(seq)));
                }
            }
        }
        Next::Continue
    }

    /// Accounts for one verified event: the cursor-field rule, order, counts, latency.
    #[allow(clippy::too_many_arguments)]
    fn on_event(
        &mut self,
        v: Verified,
        client: &mut ClientState,
        filter: &Filter,
        verifier: &mut Verifier,
        checks: &Checks,
        totals: &mut Totals,
        now_us: i64,
    ) {
        if checks.wire == Wire::V1 {
            let has = v.wire_seq.is_some();
            match self.cursor_field {
                None => self.cursor_field = Some(has),
                Some(first) if first != has => {
                    client.failures += 1;
                    totals.fail(
                        client.id,
                        v.seq,
                        format!(
                            "cursor field {} on this connection's first event but {} here",
                            if first { "present" } else { "absent" },
                            if has { "present" } else { "absent" },
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        let last_wire = client.order.last_wire;
        let accepted = match (verifier.generator(), v.seq) {
            (Some(g), Some(seq)) => {
                let received = Received {
                    seq,
                    time_us: v.time_us.unwrap_or(0),
                    measured_len: v.measured_len,
                    wire_seq: v.wire_seq,
                };
                match client.order.accept(g, filter, &received, checks) {
                    Ok(a) => a,
                    Err(e) => {
                        client.failures += 1;
                        totals.fail(client.id, Some(seq), e.to_string());
                        // Resynchronise so one gap is one failure, not one per later event.
                        client.order.last = Some(client.order.last.map_or(seq, |l| l.max(seq)));
                        Accepted::New
                    }
                }
            }
            _ => Accepted::New,
        };
        if accepted == Accepted::Duplicate {
            totals.duplicates += 1;
            return;
        }
        if checks.wire == Wire::V2
            && let (Some(prev), Some(next)) = (last_wire, v.wire_seq)
        {
            verifier.v2_link(checks.target, prev, next);
        }
        if checks.wire == Wire::V1 {
            if v.wire_seq.is_some() {
                client.with_cursor += 1;
                totals.events_with_cursor += 1;
            } else {
                client.without_cursor += 1;
            }
        }
        client.events += 1;
        totals.events += 1;
        if let Some(t) = v.time_us {
            client.max_time_us = Some(client.max_time_us.map_or(t, |m| m.max(t)));
        }
        if let Some(t) = v.latency_from_us {
            let lat = now_us.saturating_sub(t);
            if lat < 0 {
                totals.negative_latency += 1;
            }
            totals.latency.record(lat.max(0) as u64);
        }
    }
}

/// Accounts for one v2 `#sync`: placed in the generator's stream by its DID when the swarm
/// knows which events are syncs (`--sync-every`) and where the client is, else checked by its
/// seq alone.
#[allow(clippy::too_many_arguments)]
fn on_sync(
    wire_seq: u64,
    did: &str,
    frame_len: usize,
    client: &mut ClientState,
    filter: &Filter,
    verifier: &mut Verifier,
    checks: &Checks,
    totals: &mut Totals,
) {
    let last_wire = client.order.last_wire;
    let mut placed = None;
    let accepted = if client.order.is_replayed(wire_seq) {
        Ok(Accepted::Duplicate)
    } else {
        match (verifier.generator(), client.order.last) {
            (Some(g), Some(last)) if filter.knows_syncs() => {
                match filter.sync_position(g, last, did) {
                    Some(seq) => {
                        placed = Some(seq);
                        let received = Received {
                            seq,
                            time_us: 0,
                            measured_len: frame_len,
                            wire_seq: Some(wire_seq),
                        };
                        client.order.accept(g, filter, &received, checks)
                    }
                    None => client.order.accept_wire_seq(wire_seq).and_then(|_| {
                        Err(OrderError::UnexpectedSync {
                            did: did.to_string(),
                            after: last,
                        })
                    }),
                }
            }
            _ => client.order.accept_wire_seq(wire_seq),
        }
    };
    match accepted {
        Ok(Accepted::Duplicate) => totals.duplicates += 1,
        Ok(Accepted::New) => {
            client.syncs += 1;
            totals.syncs += 1;
            if let Some(prev) = last_wire {
                verifier.v2_link(checks.target, prev, wire_seq);
            }
        }
        Err(e) => {
            client.failures += 1;
            totals.fail(client.id, placed, e.to_string());
            if let Some(seq) = placed {
                client.order.last = Some(client.order.last.map_or(seq, |l| l.max(seq)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::Generator;

    const T0: i64 = 1_783_175_888_000_000;

    struct Harness {
        g: Generator,
        client: ClientState,
        filter: Filter,
        verifier: Verifier,
        checks: Checks,
        totals: Totals,
        session: Session,
        out: Vec<u8>,
    }

    impl Harness {
        fn new(query: &str) -> Harness {
            let g = Generator::new(11, 50);
            Harness {
                client: ClientState {
                    id: 7,
                    ..Default::default()
                },
                filter: Filter::from_query(query),
                verifier: Verifier::new(Some(g.clone())),
                g,
                checks: Checks {
                    in_order: true,
                    ..Default::default()
                },
                totals: Totals::default(),
                session: Session::new(),
                out: Vec::new(),
            }
        }

        /// A client of a v2 URL with `query`, against a mock with `--sync-every`.
        fn v2(query: &str, sync_every: Option<u64>) -> Harness {
            let mut h = Harness::new("");
            h.filter = Filter::for_target(Wire::V2, query, sync_every);
            h.checks.wire = Wire::V2;
            h
        }

        /// Event `seq` as the v2 frame with server seq `wire_seq`.
        fn v2_frame(&self, seq: u64, wire_seq: u64, out: &mut Vec<u8>) {
            let mut ev = Vec::new();
            self.g.event(seq, T0 + seq as i64, &mut ev);
            let mut v2 = Vec::new();
            crate::wire::v1_to_v2(&ev, wire_seq, T0 + seq as i64 + 500, &mut v2).unwrap();
            frame::encode_server_frame(Opcode::Text, &v2, out);
        }

        /// Event `seq` as a v1 frame with the server's `cursor` field.
        fn cursor_frame(&self, seq: u64, cursor: u64, out: &mut Vec<u8>) {
            let mut ev = Vec::new();
            self.g.event(seq, T0 + seq as i64, &mut ev);
            let mut with = Vec::new();
            crate::wire::with_cursor(&ev, cursor, &mut with).unwrap();
            frame::encode_server_frame(Opcode::Text, &with, out);
        }

        fn event_frame(&self, seq: u64, out: &mut Vec<u8>) {
            let mut ev = Vec::new();
            self.g.event(seq, T0 + seq as i64, &mut ev);
            frame::encode_server_frame(Opcode::Text, &ev, out);
        }

        /// Feeds `bytes` in chunks of `chunk` bytes, carrying partial frames like the driver.
        fn feed(&mut self, bytes: &[u8], chunk: usize) -> Next {
            let mut carry: Vec<u8> = Vec::new();
            for piece in bytes.chunks(chunk) {
                carry.extend_from_slice(piece);
                let (used, next) = self.session.feed(
                    &carry,
                    &mut self.client,
                    &self.filter,
                    &mut self.verifier,
                    &self.checks,
                    &mut self.totals,
                    T0 + 1_000_000,
                    &mut self.out,
                );
                carry.drain(..used);
                if next != Next::Continue {
                    return next;
                }
            }
            Next::Continue
        }
    }

    #[test]
    fn handshake_response_checks() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(
            parse_upgrade_response(ok, key),
            Ok(Some(Upgrade::Accepted {
                head_len: ok.len() - 2
            }))
        );
        assert_eq!(parse_upgrade_response(&ok[..20], key), Ok(None));
        let bad = String::from_utf8_lossy(ok).replace("s3pPL", "xxxxx");
        assert!(matches!(
            parse_upgrade_response(bad.as_bytes(), key),
            Err(UpgradeError::BadAccept { .. })
        ));
        let no_upgrade = String::from_utf8_lossy(ok).replace("Upgrade: websocket\r\n", "");
        assert_eq!(
            parse_upgrade_response(no_upgrade.as_bytes(), key),
            Err(UpgradeError::NotUpgrade)
        );
        assert_eq!(
            parse_upgrade_response(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
                key
            ),
            Ok(Some(Upgrade::Refused { status: 400 }))
        );
        assert_eq!(
            parse_upgrade_response(b"SSH-2.0-OpenSSH\r\n\r\n", key),
            Err(UpgradeError::Malformed)
        );
        let req = String::from_utf8(upgrade_request("h:1", "/subscribe?x=1", key)).unwrap();
        assert!(req.starts_with("GET /subscribe?x=1 HTTP/1.1\r\nHost: h:1\r\n"));
    }

    #[test]
    fn contiguous_stream_in_any_chunking_passes() {
        for chunk in [1, 7, 100, 100_000] {
            let mut h = Harness::new("");
            let mut bytes = Vec::new();
            for seq in 1000..1040 {
                h.event_frame(seq, &mut bytes);
            }
            assert_eq!(h.feed(&bytes, chunk), Next::Continue);
            assert_eq!(h.totals.failures, 0, "{:?}", h.totals.examples);
            assert_eq!(h.client.events, 40);
            assert_eq!(h.totals.events, 40);
            assert_eq!(h.totals.latency.count(), 40);
            assert_eq!(h.totals.frame_bytes, bytes.len() as u64);
            assert_eq!(h.client.order.last, Some(1039));
        }
    }

    #[test]
    fn gapped_duplicated_reordered_and_corrupted_streams_fail() {
        // Gap.
        let mut h = Harness::new("");
        let mut b = Vec::new();
        for seq in [1u64, 2, 4, 5] {
            h.event_frame(seq, &mut b);
        }
        h.feed(&b, 50);
        assert_eq!(h.totals.failures, 1);
        assert_eq!(h.totals.examples[0].seq, Some(4));
        assert!(
            h.totals.examples[0].reason.contains("expected seq 3"),
            "{:?}",
            h.totals.examples
        );
        // Duplicate and reorder.
        let mut h = Harness::new("");
        let mut b = Vec::new();
        for seq in [1u64, 2, 2, 4, 3] {
            h.event_frame(seq, &mut b);
        }
        h.feed(&b, 50);
        assert_eq!(h.totals.failures, 3, "{:?}", h.totals.examples);
        // One corrupted byte inside the middle event's record: one failure naming its seq.
        let mut h = Harness::new("");
        let mut b = Vec::new();
        h.event_frame(1, &mut b);
        h.event_frame(2, &mut b);
        let end_of_second = b.len();
        h.event_frame(3, &mut b);
        b[end_of_second - 10] ^= 0x04;
        h.feed(&b, 50);
        assert_eq!(h.totals.failures, 1, "{:?}", h.totals.examples);
        assert_eq!(h.totals.examples[0].seq, Some(2));
        assert!(h.totals.examples[0].reason.contains("bytes differ"));
        assert_eq!(h.client.events, 2);
        // A corrupted prefix makes the seq unreadable: that event fails and is then missing.
        let mut h = Harness::new("");
        let mut b = Vec::new();
        h.event_frame(1, &mut b);
        let second = b.len();
        h.event_frame(2, &mut b);
        h.event_frame(3, &mut b);
        b[second + 4 + 3] = b'X';
        h.feed(&b, 50);
        assert_eq!(h.totals.failures, 2, "{:?}", h.totals.examples);
        assert!(h.totals.examples[0].reason.contains("cannot decode"));
        assert!(h.totals.examples[1].reason.contains("gap: expected seq 2"));
        // A foreign event.
        let mut h = Harness::new("");
        let mut b = Vec::new();
        frame::encode_server_frame(Opcode::Text, b"{\"hello\":1}", &mut b);
        h.feed(&b, 50);
        assert_eq!(h.totals.failures, 1);
        assert_eq!(h.client.events, 0);
    }

    #[test]
    fn filtered_stream_must_skip_exactly_the_unwanted_events() {
        let q = "wantedCollections=app.bsky.feed.post&wantedCollections=app.bsky.graph.*";
        let h0 = Harness::new(q);
        let wanted: Vec<u64> = (0..1000)
            .filter(|&s| h0.filter.verdict(&h0.g, s, T0) == super::super::filter::Verdict::Deliver)
            .collect();
        let mut h = Harness::new(q);
        let mut b = Vec::new();
        for &s in &wanted {
            h.event_frame(s, &mut b);
        }
        h.feed(&b, 1000);
        assert_eq!(h.totals.failures, 0, "{:?}", h.totals.examples);
        assert_eq!(h.client.events, wanted.len() as u64);
        // The unfiltered stream delivered to this client fails on the first unwanted event.
        let mut h = Harness::new(q);
        let mut b = Vec::new();
        for s in 0..200 {
            h.event_frame(s, &mut b);
        }
        h.feed(&b, 1000);
        assert!(h.totals.failures > 0);
    }

    #[test]
    fn control_frames() {
        let mut h = Harness::new("");
        let mut b = Vec::new();
        frame::encode_server_frame(Opcode::Ping, b"abc", &mut b);
        h.event_frame(5, &mut b);
        frame::encode_close(frame::CloseCode(1001), "bye", &mut b);
        assert_eq!(h.feed(&b, 3), Next::Closed);
        assert_eq!(h.client.closes, vec![1001]);
        assert_eq!(
            h.totals.close_reasons.get(&1001).map(String::as_str),
            Some("bye")
        );
        assert_eq!(h.client.events, 1);
        // Replies: a masked pong echoing the payload, then a masked close 1001.
        let (ph, pp) = frame::split_frame(&h.out).unwrap().unwrap();
        assert_eq!(ph.opcode, Opcode::Pong);
        let mask = ph.mask.expect("client frames are masked");
        let mut pong = pp.to_vec();
        frame::apply_mask(&mut pong, mask, 0);
        assert_eq!(pong, b"abc");
        let rest = &h.out[ph.frame_len() as usize..];
        let (ch, cp) = frame::split_frame(rest).unwrap().unwrap();
        assert_eq!(ch.opcode, Opcode::Close);
        let mut close = cp.to_vec();
        frame::apply_mask(&mut close, ch.mask.unwrap(), 0);
        assert_eq!(&close[..2], &1001u16.to_be_bytes());
    }

    #[test]
    fn protocol_violations_abort() {
        // Masked server frame.
        let mut h = Harness::new("");
        let mut b = Vec::new();
        frame::encode_client_frame(Opcode::Text, b"{}", [1, 2, 3, 4], &mut b);
        assert_eq!(h.feed(&b, 100), Next::Abort);
        // Reserved bits.
        let mut h = Harness::new("");
        assert_eq!(h.feed(&[0xF1, 0x00], 100), Next::Abort);
        // Binary on a plain subscription is a verification failure, not an abort.
        let mut h = Harness::new("");
        let mut b = Vec::new();
        frame::encode_server_frame(Opcode::Binary, b"x", &mut b);
        assert_eq!(h.feed(&b, 100), Next::Continue);
        assert_eq!(h.totals.failures, 1);
        // Fragmented text.
        let mut h = Harness::new("");
        assert_eq!(h.feed(&[0x01, 0x01, b'{'], 100), Next::Abort);
        // Absurd length.
        let mut h = Harness::new("");
        let mut b = vec![0x81, 127];
        b.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(h.feed(&b, 100), Next::Abort);
    }

    #[test]
    fn zero_bytes_frames_are_caught() {
        // A stalled relay that sends zeros instead of data must fail loudly.
        let mut h = Harness::new("");
        let mut b = Vec::new();
        h.event_frame(1, &mut b);
        b.extend_from_slice(&[0u8; 64]);
        let next = h.feed(&b, 1000);
        assert!(next == Next::Abort || h.totals.failures > 0);
        assert!(h.totals.failures > 0);
    }

    #[test]
    fn v1_cursor_field_must_be_on_every_event_and_increase() {
        let mut h = Harness::new("");
        let mut b = Vec::new();
        for (seq, cursor) in [(1u64, 10u64), (2, 11), (3, 15)] {
            h.cursor_frame(seq, cursor, &mut b);
        }
        assert_eq!(h.feed(&b, 33), Next::Continue);
        assert_eq!(h.totals.failures, 0, "{:?}", h.totals.examples);
        assert_eq!(
            (h.client.order.last_wire, h.client.with_cursor),
            (Some(15), 3)
        );
        assert_eq!(h.totals.events_with_cursor, 3);
        // One event without the field on the same connection, then a cursor going back.
        let mut b = Vec::new();
        h.event_frame(4, &mut b);
        h.cursor_frame(5, 14, &mut b);
        h.feed(&b, 1000);
        assert_eq!(h.totals.failures, 2, "{:?}", h.totals.examples);
        assert!(
            h.totals.examples[0]
                .reason
                .contains("cursor field present on this connection's first event but absent here")
        );
        assert!(
            h.totals.examples[1]
                .reason
                .contains("seq 14 from the server after seq 15")
        );
        // A new connection may differ (another relay configuration after a restart).
        h.session = Session::new();
        let mut b = Vec::new();
        h.event_frame(6, &mut b);
        h.feed(&b, 1000);
        assert_eq!(h.totals.failures, 2, "{:?}", h.totals.examples);
    }

    #[test]
    fn v2_events_syncs_infos_and_the_terminal_error_frame() {
        // Events 0..30 with every 10th (9, 19, 29) a #sync, served as the mock does.
        let mut h = Harness::v2("", Some(10));
        let mut b = Vec::new();
        let mut info = Vec::new();
        crate::wire::future_cursor_frame(900, 10, &mut info);
        frame::encode_server_frame(Opcode::Text, &info, &mut b);
        for seq in 0..30u64 {
            if seq % 10 == 9 {
                let did = h.g.did_for(seq);
                let sync = format!(
                    r#"{{"$type":"message","payload":{{"$type":"network.bsky.jetstream.subscribeEvents#sync","did":"{did}","seq":{},"sync":{{"did":"{did}"}},"time":"2026-07-04T14:38:08.000000Z","witnessedAt":"2026-07-04T14:38:08.000000Z"}}}}"#,
                    seq + 1
                );
                frame::encode_server_frame(Opcode::Text, sync.as_bytes(), &mut b);
            } else {
                h.v2_frame(seq, seq + 1, &mut b);
            }
        }
        assert_eq!(h.feed(&b, 77), Next::Continue);
        assert_eq!(h.totals.failures, 0, "{:?}", h.totals.examples);
        assert_eq!((h.client.events, h.client.syncs), (27, 3));
        assert_eq!(h.client.order.last, Some(29), "the last #sync is event 29");
        assert_eq!(h.client.infos, vec!["FutureCursor".to_string()]);
        assert_eq!(h.totals.infos["FutureCursor"].0, 1);
        // A missing #sync is a gap like a missing event.
        let mut b = Vec::new();
        for seq in [30u64, 31, 32, 33, 34, 35, 36, 37, 38, 40] {
            h.v2_frame(seq, seq + 1, &mut b);
        }
        h.feed(&b, 1000);
        assert_eq!(h.totals.failures, 1, "{:?}", h.totals.examples);
        assert!(
            h.totals.examples[0]
                .reason
                .contains("expected seq 39, got 40")
        );
        // The terminal error frame: counted, and data after it is a violation.
        let mut b = Vec::new();
        let mut error = Vec::new();
        crate::wire::consumer_too_slow_frame(100_001, 41, &mut error);
        frame::encode_server_frame(Opcode::Text, &error, &mut b);
        h.v2_frame(41, 42, &mut b);
        assert_eq!(h.feed(&b, 1000), Next::Abort);
        assert_eq!(h.client.errors, vec!["ConsumerTooSlow".to_string()]);
        assert!(
            h.totals.examples[1]
                .reason
                .contains("after a terminal error frame")
        );
    }

    #[test]
    fn v2_filters_and_sizes_judge_the_stream() {
        // Posts only, within 700 bytes of uncompressed frame.
        let q = "kinds=commit&collections=app.bsky.feed.post&maxMessageSizeBytes=700";
        let h0 = Harness::v2(q, None);
        let wanted: Vec<u64> = (0..2000u64)
            .filter(|&s| {
                h0.filter
                    .verdict_with_seqs(&h0.g, s, T0, Some((s + 1, s + 1)))
                    == super::super::filter::Verdict::Deliver
            })
            .collect();
        assert!(wanted.len() > 5, "{wanted:?}");
        let mut h = Harness::v2(q, None);
        let mut b = Vec::new();
        for &s in &wanted {
            h.v2_frame(s, s + 1, &mut b);
        }
        h.feed(&b, 1000);
        assert_eq!(h.totals.failures, 0, "{:?}", h.totals.examples);
        assert_eq!(h.client.events, wanted.len() as u64);
        // A post over the limit is a failure; leaving out a wanted one is a gap.
        let big = (0..2000u64)
            .find(|&s| {
                h0.filter
                    .verdict_with_seqs(&h0.g, s, T0, Some((s + 1, s + 1)))
                    == super::super::filter::Verdict::Skip
                    && Generator::template_kind_and_collection(Generator::template_index(s))
                        == ("commit", Some("app.bsky.feed.post"))
            })
            .expect("a post over 700 bytes");
        let mut h = Harness::v2(q, None);
        let mut b = Vec::new();
        h.v2_frame(big, big + 1, &mut b);
        h.feed(&b, 1000);
        assert_eq!(h.totals.failures, 1, "{:?}", h.totals.examples);
        let mut h = Harness::v2(q, None);
        let mut b = Vec::new();
        h.v2_frame(wanted[0], wanted[0] + 1, &mut b);
        h.v2_frame(wanted[2], wanted[2] + 1, &mut b);
        h.feed(&b, 1000);
        assert!(
            h.totals.examples[0]
                .reason
                .contains(&format!("expected seq {}", wanted[1]))
        );
    }
}
