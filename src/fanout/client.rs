//! One client as the scheduler sees it: where its bytes come from, how far it got, where it
//! sits between operations ([`Place`]), how far its life has gone ([`Life`]), the control
//! frames it is owed ([`Control`]) and what it sent us ([`Inbound`]).
//!
//! Its socket, pipe and in-flight operation belong to the driver; the scheduler refers to a
//! client by its slot only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use super::walker::Walker;
use crate::encoding::Encoding;
use crate::frame::{InboundDecoder, Opcode, encode_server_frame};
use crate::hub::ShapeClass;
use crate::log::{NONE, Stream};
use crate::shapes::Shape;
use crate::subscription::SubscriberOptions;
use crate::wire::KindSet;

/// Control bytes a client may be owed before it is closed (1008). Why 4 KiB: a client owes
/// that much only by sending pings faster than it reads their pongs (a ping flood); every
/// well-behaved client owes at most one pong at a time.
pub const CONTROL_OWED_CAP: usize = 4096;

/// `Client::caught_up_round` of a client that has not caught up in any round yet.
pub const NEVER: u64 = u64::MAX;

/// Where a client's bytes come from.
pub enum Source {
    /// Every frame of a stream, contiguously (no filter, or its shape's log).
    Contiguous,
    /// Frames of the base stream that pass a filter, found by walking the index.
    Filtered(Box<Walker>),
}

/// Where a client sits between operations. Exactly one at a time; the worker's lists (ready
/// queue, idle list, groups, routes) hold a client only while its place says so (stale
/// entries are recognized by the place and skipped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// In the ready queue: served in the current or the next batch.
    Ready,
    /// Served again in the next loop (its walk used up its budget, or its switch point is not
    /// known yet): in the deferred list.
    Deferred,
    /// An operation is in the driver's hands.
    InFlight,
    /// Its socket is full: the driver waits for it to become writable.
    Blocked,
    /// Caught up in the current round: in the idle list until the next one.
    Idle,
    /// Caught up and its log has nothing new: in wait group `0` until the log grows.
    Waiting(u64),
    /// A thin stream's send lingering in hold group `0`.
    Held(u64),
    /// A DID walker parked on its DIDs: only a routed event with one of them wakes it.
    Routed,
    /// `requireHello`: nothing is sent until its first `options_update`.
    Hello,
    /// Nothing more will be sent (its close is done or it is shut).
    Closed,
}

/// Where a caught-up client of a thin stream stands with lingering (its place is `Held`
/// while it waits in a hold).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linger {
    /// Its next send may linger (under load) if it would be small.
    Off,
    /// It held bytes back; `origin_us` is their latency origin.
    Holding { origin_us: u64 },
    /// Its hold was released: its next send goes out at once.
    Released { origin_us: u64 },
}

impl Linger {
    /// The latency origin of held bytes, if it lingered.
    pub fn origin_us(self) -> Option<u64> {
        match self {
            Linger::Off => None,
            Linger::Holding { origin_us } | Linger::Released { origin_us } => Some(origin_us),
        }
    }
}

/// Why a client is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseWhy {
    /// It asked (close frame) or went away.
    Peer,
    /// It fell behind retention (or too far behind live).
    Retention,
    /// It stopped answering pings.
    Dead,
    /// It broke the protocol, a limit, or sent invalid options.
    Protocol,
    /// The relay is shutting down.
    Shutdown,
}

/// How far a client's life has gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    /// Served normally.
    Open,
    /// Closing since `since`: its current range drains, then its close frame goes out.
    Closing { why: CloseWhy, since: Instant },
    /// Its close frame was handed over and our FIN sent at `fin_at`: waiting for the peer's
    /// EOF (or the grace period) before the socket is shut.
    FinSent {
        why: CloseWhy,
        since: Instant,
        fin_at: Instant,
    },
    /// Shut: the driver is cancelling its operations and reports when the slot can go.
    Shut { why: CloseWhy },
}

impl Life {
    /// Why it is closing, if it is.
    pub fn why(self) -> Option<CloseWhy> {
        match self {
            Life::Open => None,
            Life::Closing { why, .. } | Life::FinSent { why, .. } | Life::Shut { why } => Some(why),
        }
    }
}

/// Frames the relay composes for one client, besides its stream: control frames it is owed
/// (pong, ping, close), and on the v2 wire the `#info` frame that precedes its first event and
/// the error frame that precedes a close (`ConsumerTooSlow`). They go out only at a frame
/// boundary of its stream, one at a time; a partly sent one is finished before anything else.
#[derive(Default)]
pub struct Control {
    /// The frame being handed over, possibly in several sends.
    partial: Option<InProgress>,
    /// A v2 error frame, sent right before our close frame.
    error: Option<Vec<u8>>,
    /// A v2 `#info` frame, sent before anything of the stream.
    preamble: Option<Vec<u8>>,
    /// Our close frame, not started yet: once queued, nothing else is (a pong or ping would
    /// only delay it).
    close: Option<Vec<u8>>,
    /// The pong for the latest ping not answered yet (RFC 6455 §5.5.3 allows answering only
    /// the most recent one).
    pong: Option<Vec<u8>>,
    /// Our keepalive ping is due.
    ping: bool,
    /// Pong bytes owed since a pong was last handed over, coalesced ones included: how far a
    /// client's pings outrun its reading.
    owed: usize,
}

/// Which frame is in progress (what completing it means).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ControlKind {
    Error,
    Close,
    Preamble,
    Pong,
    Ping,
}

/// A control frame being handed over.
struct InProgress {
    /// What it is.
    kind: ControlKind,
    /// The whole frame.
    frame: Vec<u8>,
    /// Bytes handed over so far.
    sent: usize,
}

impl Control {
    /// Answers a ping with `payload` (replacing an unanswered older one); returns false when
    /// the client now owes more than [`CONTROL_OWED_CAP`].
    pub fn pong(&mut self, payload: &[u8]) -> bool {
        self.owed += payload.len() + 2;
        if !self.close_queued() {
            let f = self.pong.get_or_insert_with(Vec::new);
            f.clear();
            encode_server_frame(Opcode::Pong, payload, f);
        }
        self.owed <= CONTROL_OWED_CAP
    }

    /// Queues our keepalive ping.
    pub fn ping(&mut self) {
        if !self.close_queued() {
            self.ping = true;
        }
    }

    /// Queues the v2 `#info` frame that must precede the stream (set once, at attach).
    pub fn preamble(&mut self, frame: Vec<u8>) {
        self.preamble = Some(frame);
    }

    /// Queues a v2 error frame and the close frame after it.
    pub fn error_then_close(&mut self, frame: Vec<u8>, code: u16, reason: &str) {
        if self.close_queued() {
            return;
        }
        self.error = Some(frame);
        self.close(code, reason);
    }

    /// Queues the close frame (once); pongs, pings and a preamble still queued are dropped.
    pub fn close(&mut self, code: u16, reason: &str) {
        if self.close_queued() {
            return;
        }
        self.preamble = None;
        let mut f = Vec::with_capacity(4 + reason.len());
        crate::frame::encode_close(crate::frame::CloseCode(code), reason, &mut f);
        self.close = Some(f);
        self.pong = None;
        self.ping = false;
    }

    /// Whether our close frame is queued or being handed over.
    pub fn close_queued(&self) -> bool {
        self.close.is_some()
            || self
                .partial
                .as_ref()
                .is_some_and(|p| matches!(p.kind, ControlKind::Close | ControlKind::Error))
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.partial.is_none()
            && self.error.is_none()
            && self.close.is_none()
            && self.preamble.is_none()
            && self.pong.is_none()
            && !self.ping
    }

    /// The bytes to send next (the rest of the frame in progress, else the close frame, else
    /// the pong, else the ping), made the frame in progress.
    pub fn next_bytes(&mut self) -> Option<&[u8]> {
        if self.partial.is_none() {
            let next = if let Some(f) = self.error.take() {
                Some((ControlKind::Error, f))
            } else if let Some(f) = self.close.take() {
                Some((ControlKind::Close, f))
            } else if let Some(f) = self.preamble.take() {
                Some((ControlKind::Preamble, f))
            } else if let Some(f) = self.pong.take() {
                Some((ControlKind::Pong, f))
            } else if std::mem::take(&mut self.ping) {
                let mut f = Vec::with_capacity(2);
                encode_server_frame(Opcode::Ping, b"", &mut f);
                Some((ControlKind::Ping, f))
            } else {
                None
            };
            self.partial = next.map(|(kind, frame)| InProgress {
                kind,
                frame,
                sent: 0,
            });
        }
        self.partial.as_ref().map(|p| &p.frame[p.sent..])
    }

    /// `n` bytes of the frame in progress were handed over. Returns true when that completed
    /// our close frame.
    pub fn sent(&mut self, n: usize) -> bool {
        let Some(p) = self.partial.as_mut() else {
            return false;
        };
        p.sent += n;
        if p.sent < p.frame.len() {
            return false;
        }
        let kind = p.kind;
        self.partial = None;
        match kind {
            ControlKind::Close => true,
            ControlKind::Pong => {
                // The client is not owed anything older any more.
                self.owed = self.pong.as_ref().map_or(0, |f| f.len());
                false
            }
            ControlKind::Ping | ControlKind::Error | ControlKind::Preamble => false,
        }
    }

    /// Control bytes queued right now (frame in progress, close, pong, ping).
    pub fn queued_bytes(&self) -> usize {
        let control = |k: ControlKind| {
            matches!(
                k,
                ControlKind::Close | ControlKind::Pong | ControlKind::Ping
            )
        };
        self.partial
            .as_ref()
            .filter(|p| control(p.kind))
            .map_or(0, |p| p.frame.len() - p.sent)
            + self.close.as_ref().map_or(0, |f| f.len())
            + self.pong.as_ref().map_or(0, |f| f.len())
            + if self.ping { 2 } else { 0 }
    }
}

/// What a client sent us, and the limits on it.
pub struct Inbound {
    /// Frame decoder.
    pub decoder: InboundDecoder,
    /// Last time anything arrived (dead-peer detection).
    pub last_rx: Instant,
    /// Last time its socket took bytes: a peer whose TCP window keeps moving is alive even
    /// if our ping is still queued behind the data it is reading slowly.
    pub last_tx: Instant,
    /// A ping was sent and not answered yet.
    pub ping_outstanding: bool,
    /// Inbound bytes since the last housekeeping tick (the inbound rate cap).
    pub rx_bytes: u64,
    /// Tokens for `options_update` (refilled each tick; see
    /// [`super::ClientPolicy::options_update_rate`]).
    pub update_tokens: f64,
    /// A limit was violated: its input is no longer decoded.
    pub stopped: bool,
}

/// Bookkeeping of the range being handed over, for metrics only.
pub struct RangeAccount {
    /// Contiguous source: frames published in the stream when the range was last extended, in
    /// the stream's own numbering (see `attach::published_frames`), so the events in a range
    /// are a subtraction, not an index walk.
    pub ordinal: u64,
    /// Events in the scheduled range not yet handed over; counted when the range completes.
    pub pending_events: u64,
    /// Latency origin (unix µs) of the range: the oldest append it brought.
    pub origin_us: u64,
}

/// One client.
pub struct Client {
    /// Peer address, for logs.
    pub peer: SocketAddr,
    /// The address its per-IP limit slot is counted under (released when it leaves).
    pub counted_ip: Option<IpAddr>,
    /// Its newest filters' charge against the filter memory budget (released on drop).
    pub filter_reservation: crate::filter_budget::Reservation,
    /// The frames it receives (wire and compression).
    pub encoding: Encoding,
    /// The kinds it wants (`kinds` on v2; every v1 kind on v1).
    pub kinds: KindSet,
    /// Filter kind at connect, for the per-kind client gauge and logs.
    pub class: ShapeClass,
    /// The log it reads: a base log, or its shape's log.
    pub stream: Arc<Stream>,
    /// The shape it belongs to (reading it, or walking the base log towards it).
    pub shape: Option<Arc<Shape>>,
    /// Where the bytes come from.
    pub source: Source,
    /// Next log byte to hand to the socket.
    pub pos: u64,
    /// End of the current range; always a frame boundary. `pos == boundary` ⇒ between frames.
    pub boundary: u64,
    /// Where it sits between operations.
    pub place: Place,
    /// How far its life has gone.
    pub life: Life,
    /// Control frames owed.
    pub control: Control,
    /// Its input.
    pub inbound: Inbound,
    /// Nothing is sent until the first `options_update` (`requireHello`).
    pub awaiting_hello: bool,
    /// New options, applied at the next frame boundary.
    pub pending_options: Option<SubscriberOptions>,
    /// Metrics bookkeeping of the current range.
    pub range: RangeAccount,
    /// The round in which its range last reached the end of its log. Such a client waits for
    /// the next round instead of chasing every append on its own: that is what lets a busy
    /// worker batch several events into one send.
    pub caught_up_round: u64,
    /// Whether its next send lingers with its stream's hold.
    pub linger: Linger,
    /// Its registration in the worker's DID routes (0 = none; see [`crate::routes`]).
    pub route: u32,
    /// Bytes of the filter-state budget it holds (released when it leaves).
    pub filter_bytes: usize,
    /// A v2 client far behind the tip: since when, and the event position it was at then
    /// (the slow-consumer rule measures its progress from there).
    pub far_behind_since: Option<(Instant, u64)>,
}

impl Client {
    /// Lowest log offset this client may still read (retention must not punch below it).
    pub fn low_mark(&self) -> u64 {
        match self.life {
            Life::Shut { .. } | Life::FinSent { .. } => return NONE,
            Life::Closing { .. } if self.pos == self.boundary => return NONE,
            _ => {}
        }
        match &self.source {
            Source::Filtered(w) if self.pos == self.boundary => w.next.offset(self.encoding),
            _ => self.pos,
        }
    }

    /// Whether it is between two frames of its stream.
    pub fn at_boundary(&self) -> bool {
        self.pos == self.boundary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_latest_ping_is_answered_and_a_flood_trips_the_cap() {
        let mut c = Control::default();
        assert!(c.pong(b"a"));
        assert!(c.pong(b"bb"));
        assert_eq!(c.next_bytes(), Some(&[0x8A, 2, b'b', b'b'][..]));
        assert!(!c.sent(4));
        assert_eq!(c.next_bytes(), None, "the older ping is not answered");
        assert!(c.is_empty());
        // A client that pings faster than it reads owes more and more.
        let mut flood = Control::default();
        let within = (0..CONTROL_OWED_CAP / 2).all(|_| flood.pong(b""));
        assert!(within);
        assert!(!flood.pong(b""), "beyond the cap");
        assert!(flood.queued_bytes() <= 2, "yet only one pong is queued");
    }

    #[test]
    fn close_preempts_pongs_and_pings_and_a_partial_frame_finishes_first() {
        let mut c = Control::default();
        c.pong(b"xyz");
        let first = c.next_bytes().map(|b| b.to_vec());
        assert_eq!(first.as_deref(), Some(&[0x8A, 3, b'x', b'y', b'z'][..]));
        c.sent(2);
        c.ping();
        c.close(1008, "bye");
        assert_eq!(
            c.next_bytes(),
            Some(&[b'x', b'y', b'z'][..]),
            "the pong in progress completes"
        );
        assert!(!c.sent(3));
        let close = c.next_bytes().map(|b| b.to_vec()).unwrap_or_default();
        assert_eq!(&close[..2], &[0x88, 5]);
        assert!(c.close_queued());
        assert!(c.sent(close.len()), "the close frame completed");
        assert!(c.is_empty(), "the ping queued before the close is dropped");
        assert!(!c.close_queued());
    }
}
