//! Per-event verification: byte-exact content (by regenerating the event) and per-client order.
//!
//! [`Verifier`] is shared by all clients of a process. It caches the expected rendering of
//! recent seqs in a small ring (keyed by `seq % CACHE_SLOTS`), rendered *without* `time_us`, so
//! thousands of clients receiving the same event cost one generation and two `memcmp`s each. The
//! received `time_us` digits must be the canonical rendering of a number, which makes the check
//! equivalent to "regenerate with the received time_us and compare the whole frame". A v1
//! frame's `cursor` field (the server's seq) is taken out first ([`super::v1_cursor`]): the rest
//! must be the generator's event. v2 frames are checked by [`super::v2`] on top of this.
//!
//! For compressed clients the ring also remembers the last compressed frame verified for a seq:
//! a byte-identical frame decompresses identically, so it is accepted without decompressing
//! again (the relay compresses each event once, so this is the common case).
//!
//! [`Order`] is the per-client sequence state machine: it decides whether a verified event is
//! the one the client must receive next, given its filter, and whether the server's seqs
//! (v1 `cursor`, v2 `seq`) still increase.

use super::filter::{Filter, Verdict};
use super::v2::V2Checker;
use crate::mock::Generator;

/// Expected renderings kept: covers clients spread over this many consecutive seqs without
/// regenerating (a few seconds of stream at typical rates).
const CACHE_SLOTS: usize = 8192;

/// Largest decompressed event accepted: real events are < 100 KiB, Jetstream caps messages at
/// a few MB; anything bigger is a bug worth reporting rather than an allocation to make.
pub const MAX_EVENT_LEN: usize = 4 * 1024 * 1024;

/// Longest gap (in seqs) a filtered client's gap check will scan; a relay that jumps further
/// than this is reported instead of stalling the swarm.
const MAX_GAP_SCAN: u64 = 20_000_000;

/// Verification options shared by all clients.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// Contiguity check on.
    pub in_order: bool,
    /// Required first seq.
    pub first_seq: Option<u64>,
    /// Whether compressed (binary) frames are expected instead of text.
    pub compressed: bool,
    /// Which stream the client reads.
    pub wire: super::Wire,
    /// Index of the client's target URL (v2 frames are cached per server).
    pub target: usize,
}

/// Why a received frame failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The payload is not shaped like a generated event.
    #[error("cannot decode a seq from the event ({0})")]
    Undecodable(String),
    /// The bytes differ from the regenerated event.
    #[error(
        "seq {seq}: bytes differ from the expected event at offset {offset} (got {got:?}, want {want:?})"
    )]
    Mismatch {
        /// Decoded seq.
        seq: u64,
        /// First differing byte offset.
        offset: usize,
        /// A few received bytes around the difference.
        got: String,
        /// The corresponding expected bytes.
        want: String,
    },
    /// zstd decoding failed.
    #[error("cannot decompress the frame: {0}")]
    Decompress(String),
    /// The frame type does not match the subscription (text vs binary).
    #[error("{0}")]
    WrongFrameType(&'static str),
    /// A v2 frame that is not a `subscribeEvents` message, info or error frame.
    #[error("not a subscribeEvents frame: {0}")]
    V2Frame(String),
    /// A v2 event without `witnessedAt` (the relay always sends it).
    #[error("seq {0}: v2 event without witnessedAt")]
    NoWitnessedAt(u64),
    /// A v2 frame whose content is the generator's event but whose bytes are not the canonical
    /// v2 rendering (key order, spacing, time format).
    #[error(
        "seq {seq}: not the canonical v2 frame from offset {offset} (got {got:?}, want {want:?})"
    )]
    NotCanonical {
        /// The wire seq.
        seq: u64,
        /// First differing byte offset.
        offset: usize,
        /// A few received bytes around the difference.
        got: String,
        /// The canonical bytes there.
        want: String,
    },
    /// One server sent two different frames for one seq: it stores each event once.
    #[error("seq {seq}: differs from an earlier copy of the same seq from offset {offset}")]
    SeqChanged {
        /// The wire seq.
        seq: u64,
        /// First differing byte offset.
        offset: usize,
    },
    /// The same event reached clients with different `time_us` values: a relay stores each
    /// event once, so every copy (live or replayed) must be identical.
    #[error("seq {seq} delivered with time_us {got}, but earlier with {first}")]
    TimeChanged {
        /// The event.
        seq: u64,
        /// `time_us` in this copy.
        got: i64,
        /// `time_us` in the first copy seen.
        first: i64,
    },
}

/// Why a verified event is out of place in the client's stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// An event the client must have received before this one is missing.
    #[error("gap: expected seq {expected}, got {got}")]
    Gap {
        /// The first missing seq.
        expected: u64,
        /// The seq received.
        got: u64,
    },
    /// A seq at or before the last one (outside a reconnect's replay window).
    #[error("out of order: seq {got} after {last}")]
    Backwards {
        /// Last accepted seq.
        last: u64,
        /// The seq received.
        got: u64,
    },
    /// The event does not pass the client's filter.
    #[error("seq {0} does not match the subscription filter (or exceeds maxMessageSizeBytes)")]
    Unwanted(u64),
    /// The client's first event is not the one required.
    #[error("first event is seq {got}, expected {expected}")]
    FirstSeq {
        /// Required first seq.
        expected: u64,
        /// The seq received.
        got: u64,
    },
    /// The server's seq (v1 `cursor`, v2 `seq`) did not increase.
    #[error("seq {got} from the server after seq {last}: not increasing")]
    SeqNotIncreasing {
        /// Last server seq accepted.
        last: u64,
        /// The seq received.
        got: u64,
    },
    /// A `#sync` the filter model has no place for: no sync event after the client's last
    /// event that it may receive has this DID.
    #[error("unexpected #sync of {did} after event {after}")]
    UnexpectedSync {
        /// Its DID.
        did: String,
        /// The client's last generator number.
        after: u64,
    },
    /// The gap is too long to check event by event.
    #[error("gap from seq {from} to {to} too long to check")]
    GapTooLong {
        /// Last accepted seq.
        from: u64,
        /// The seq received.
        to: u64,
    },
}

/// One cached expected event.
#[derive(Debug, Default)]
struct Slot {
    /// Which seq this slot holds (`None` = empty).
    seq: Option<u64>,
    /// The event rendered without its `time_us` digits.
    bytes: Vec<u8>,
    /// Where the `time_us` digits go in `bytes`.
    time_at: usize,
    /// Last compressed frame verified for this seq (empty = none).
    compressed: Vec<u8>,
    /// `time_us` inside `compressed`.
    compressed_time: i64,
    /// The `cursor` field inside `compressed`, if it had one.
    compressed_cursor: Option<u64>,
    /// `time_us` of the first copy of this seq received (all copies must agree).
    time_us: Option<i64>,
}

/// The result of verifying one event frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The generator's number of the event (`None` when the swarm runs without a seed and the
    /// event is foreign).
    pub seq: Option<u64>,
    /// The event's `time_us` (`None` if it has none, e.g. no seed and a foreign event shape).
    pub time_us: Option<i64>,
    /// The server's seq for it: the v1 `cursor` field or the v2 `seq` (`None`: not sent).
    pub wire_seq: Option<u64>,
    /// Where latency counts from: v1 `time_us`, v2 `witnessedAt` (see [`super::v2`]).
    pub latency_from_us: Option<i64>,
    /// Its size as `maxMessageSizeBytes` measures it: v1 the payload as sent, v2 the
    /// uncompressed frame.
    pub measured_len: usize,
}

/// What one data frame turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// An event: a v1 frame, or a v2 `#commit` / `#identity` / `#account`.
    Event(Verified),
    /// A v2 `#sync` message: well-formed and canonical, but its wrapped object is the
    /// upstream's, so its place in the generator's stream is found by the client's order state
    /// (from its DID).
    Sync {
        /// The server's seq.
        wire_seq: u64,
        /// Its top-level DID (decoded).
        did: String,
    },
    /// A v2 `#info` advisory (no seq).
    Info {
        /// `OutdatedCursor`, `FutureCursor`, …
        name: String,
        /// Free text.
        message: Option<String>,
    },
    /// A v2 error frame: terminal, the server closes next.
    Error {
        /// The XRPC error name (`ConsumerTooSlow`, …).
        error: String,
        /// Free text.
        message: Option<String>,
    },
}

/// Process-wide verification state.
pub struct Verifier {
    /// The generator, when a seed was given (byte verification on).
    generator: Option<Generator>,
    /// Expected-event cache.
    cache: Vec<Slot>,
    /// zstd decompression context with the Jetstream dictionary.
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// Reused decompression output.
    plain: Vec<u8>,
    /// Reused copy of a v1 frame without its `cursor` field.
    uncursored: Vec<u8>,
    /// The v2 side (its own caches and dictionary).
    v2: V2Checker,
    /// Events rendered (cache misses), for the report.
    pub generated: u64,
    /// Frames decompressed (compressed-cache misses), for the report.
    pub decompressed: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("seeded", &self.generator.is_some())
            .field("generated", &self.generated)
            .finish()
    }
}

/// The official zstd dictionary, loaded here independently of the relay's compress module.
const DICTIONARY: &[u8] = include_bytes!("../../assets/zstd_dictionary");

impl Verifier {
    /// A verifier; `generator` = `None` disables byte verification (foreign upstreams).
    pub fn new(generator: Option<Generator>) -> Verifier {
        Verifier {
            generator,
            cache: (0..CACHE_SLOTS).map(|_| Slot::default()).collect(),
            decompressor: None,
            plain: Vec::new(),
            uncursored: Vec::new(),
            v2: V2Checker::default(),
            generated: 0,
            decompressed: 0,
        }
    }

    /// The generator, if verification is on.
    pub fn generator(&self) -> Option<&Generator> {
        self.generator.as_ref()
    }

    /// Verifies a plain (text-frame) v1 event, with or without the server's `cursor` field.
    pub fn verify_plain(&mut self, payload: &[u8]) -> Result<Verified, VerifyError> {
        let Some(field) = super::v1_cursor::split(payload) else {
            return self.verify_event(payload);
        };
        let mut event = std::mem::take(&mut self.uncursored);
        event.clear();
        event.extend_from_slice(&payload[..field.range.start]);
        event.extend_from_slice(&payload[field.range.end..]);
        let verified = self.verify_event(&event);
        self.uncursored = event;
        let mut v = verified?;
        v.wire_seq = Some(field.seq);
        v.measured_len = payload.len();
        Ok(v)
    }

    /// Verifies a v1 event without a `cursor` field against the generator.
    pub fn verify_event(&mut self, payload: &[u8]) -> Result<Verified, VerifyError> {
        let Some(generator) = &self.generator else {
            let time_us = Generator::time_us_of(payload);
            return Ok(Verified {
                seq: Generator::seq_of(payload),
                time_us,
                wire_seq: None,
                latency_from_us: time_us,
                measured_len: payload.len(),
            });
        };
        let head = Generator::head_of(payload)
            .ok_or_else(|| VerifyError::Undecodable(snippet(payload, 0)))?;
        let seq = head.seq;
        let slot = &mut self.cache[(seq % CACHE_SLOTS as u64) as usize];
        if slot.seq != Some(seq) {
            slot.bytes.clear();
            slot.time_at = generator.event_without_time(seq, &mut slot.bytes);
            slot.seq = Some(seq);
            slot.compressed.clear();
            slot.time_us = None;
            self.generated += 1;
        }
        let want = &slot.bytes;
        let at = slot.time_at;
        let mismatch = |offset: usize| VerifyError::Mismatch {
            seq,
            offset,
            got: snippet(payload, offset),
            want: snippet(want, offset.min(want.len())),
        };
        // The head parser found canonical time digits at `time_start..time_end`; equal bytes
        // around them are equivalent to comparing with the event regenerated at that time.
        if head.time_start != at || payload[..at] != want[..at] {
            return Err(mismatch(first_difference(payload, want)));
        }
        if payload[head.time_end..] != want[at..] {
            let d = first_difference(&payload[head.time_end..], &want[at..]);
            return Err(mismatch(head.time_end + d));
        }
        let time_us = head.time_us;
        match slot.time_us {
            None => slot.time_us = Some(time_us),
            Some(first) if first != time_us => {
                return Err(VerifyError::TimeChanged {
                    seq,
                    got: time_us,
                    first,
                });
            }
            Some(_) => {}
        }
        Ok(Verified {
            seq: Some(seq),
            time_us: Some(time_us),
            wire_seq: None,
            latency_from_us: Some(time_us),
            measured_len: payload.len(),
        })
    }

    /// Verifies a compressed (binary-frame) event; `predicted` is the seq the client most likely
    /// receives next (a cache hint only).
    pub fn verify_compressed(
        &mut self,
        frame: &[u8],
        predicted: Option<u64>,
    ) -> Result<Verified, VerifyError> {
        if let Some(p) = predicted.filter(|_| self.generator.is_some()) {
            let slot = &self.cache[(p % CACHE_SLOTS as u64) as usize];
            if slot.seq == Some(p) && !slot.compressed.is_empty() && slot.compressed == frame {
                return Ok(Verified {
                    seq: Some(p),
                    time_us: Some(slot.compressed_time),
                    wire_seq: slot.compressed_cursor,
                    latency_from_us: Some(slot.compressed_time),
                    measured_len: frame.len(),
                });
            }
        }
        if self.decompressor.is_none() {
            let d = zstd::bulk::Decompressor::with_dictionary(DICTIONARY)
                .map_err(|e| VerifyError::Decompress(e.to_string()))?;
            self.decompressor = Some(d);
            self.plain = Vec::with_capacity(MAX_EVENT_LEN);
        }
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        let result = match self.decompressor.as_mut() {
            Some(d) => d
                .decompress_to_buffer(frame, &mut plain)
                .map_err(|e| VerifyError::Decompress(e.to_string())),
            None => Err(VerifyError::Decompress("no decompressor".into())),
        };
        self.decompressed += 1;
        let verified = result.and_then(|_| self.verify_plain(&plain));
        self.plain = plain;
        let mut v = verified?;
        // Compressed v1 clients' size limit counts the compressed bytes.
        v.measured_len = frame.len();
        if let (Some(seq), Some(t)) = (v.seq, v.time_us) {
            let slot = &mut self.cache[(seq % CACHE_SLOTS as u64) as usize];
            if slot.seq == Some(seq) && self.generator.is_some() {
                slot.compressed.clear();
                slot.compressed.extend_from_slice(frame);
                slot.compressed_time = t;
                slot.compressed_cursor = v.wire_seq;
            }
        }
        Ok(v)
    }

    /// Verifies one data frame of a client reading `checks.wire`; `predicted` is what it most
    /// likely receives next (a cache hint only): v1 the generator's number, v2 the server's seq.
    pub fn verify_frame(
        &mut self,
        checks: &Checks,
        binary: bool,
        payload: &[u8],
        predicted: Option<u64>,
    ) -> Result<Delivered, VerifyError> {
        match (binary, checks.compressed) {
            (false, true) => {
                return Err(VerifyError::WrongFrameType(
                    "text frame on a compressed subscription",
                ));
            }
            (true, false) => {
                return Err(VerifyError::WrongFrameType(
                    "binary frame on an uncompressed subscription",
                ));
            }
            _ => {}
        }
        match (checks.wire, binary) {
            (super::Wire::V1, false) => self.verify_plain(payload).map(Delivered::Event),
            (super::Wire::V1, true) => self
                .verify_compressed(payload, predicted)
                .map(Delivered::Event),
            (super::Wire::V2, false) => {
                let mut v2 = std::mem::take(&mut self.v2);
                let r = v2.verify_text(self, checks.target, payload);
                self.v2 = v2;
                r
            }
            (super::Wire::V2, true) => {
                let mut v2 = std::mem::take(&mut self.v2);
                let r = v2.verify_compressed(self, checks.target, payload, predicted);
                self.v2 = v2;
                r
            }
        }
    }

    /// The v2 hint: the seq that followed `wire_seq` on another client of `target`.
    pub fn v2_successor(&self, target: usize, wire_seq: u64) -> Option<u64> {
        self.v2.successor(target, wire_seq)
    }

    /// Remembers that `next` followed `prev` on a client of `target` (v2 compressed hints).
    pub fn v2_link(&mut self, target: usize, prev: u64, next: u64) {
        self.v2.link(target, prev, next);
    }

    /// Whether byte verification is on (a seed was given).
    pub fn seeded(&self) -> bool {
        self.generator.is_some()
    }

    /// The uncompressed length of the v2 frame with `wire_seq` of `target`, if cached.
    pub fn v2_frame_len(&self, target: usize, wire_seq: u64) -> Option<usize> {
        self.v2.frame_len(target, wire_seq)
    }

    /// Frames decompressed by the v2 side (compressed-cache misses).
    pub fn v2_decompressed(&self) -> u64 {
        self.v2.decompressed
    }
}

/// Offset of the first differing byte (or the shorter length).
pub(super) fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// Up to 40 bytes from `offset`, lossily as text, for failure messages.
pub(super) fn snippet(b: &[u8], offset: usize) -> String {
    let start = offset.min(b.len());
    let end = (start + 40).min(b.len());
    String::from_utf8_lossy(&b[start..end]).into_owned()
}

/// What [`Order::accept`] decided about a verified event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A new event for this client.
    New,
    /// A replayed event already received before a reconnect: skip silently.
    Duplicate,
}

/// A verified event as the order check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The generator's number of the event.
    pub seq: u64,
    /// Its `time_us`.
    pub time_us: i64,
    /// Its size as the size limit measures it ([`Verified::measured_len`]).
    pub measured_len: usize,
    /// The server's seq, when the stream carries seqs.
    pub wire_seq: Option<u64>,
}

/// What a new server seq says about a client's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WireStep {
    /// At or before the last one during a replay: a duplicate to skip.
    Replayed,
    /// After the last one; events skipped since then had seqs in `skipped` (inclusive).
    New {
        /// The seq range of the events in between (`None`: no earlier seq).
        skipped: Option<(u64, u64)>,
    },
}

/// Per-client ordering state.
#[derive(Debug, Clone, Default)]
pub struct Order {
    /// Last accepted generator number.
    pub last: Option<u64>,
    /// First accepted generator number.
    pub first: Option<u64>,
    /// Last server seq received (v1 `cursor`, v2 `seq`): the exact resume position.
    pub last_wire: Option<u64>,
    /// Set on reconnect: replayed events (by server seq when the stream has one, else by
    /// generator number) up to the last one are skipped until a newer one arrives.
    pub replaying: bool,
}

impl Order {
    /// Decides about verified event `r`. `checks.in_order` enables the contiguity check;
    /// `checks.first_seq` requires a specific first event.
    pub fn accept(
        &mut self,
        generator: &Generator,
        filter: &Filter,
        r: &Received,
        checks: &Checks,
    ) -> Result<Accepted, OrderError> {
        let (in_order, first_seq) = (checks.in_order, checks.first_seq);
        let seq = r.seq;
        // The server's seq decides replays exactly; any new one is judged in full below.
        let mut wire_range = None;
        if let Some(ws) = r.wire_seq {
            match self.step_wire_seq(ws)? {
                WireStep::Replayed => return Ok(Accepted::Duplicate),
                WireStep::New { skipped } => wire_range = skipped,
            }
        }
        let Some(last) = self.last else {
            // Recorded even if a check below fails: the client did receive this event first.
            self.first = Some(seq);
            self.replaying = false;
            if let Some(expected) = first_seq.filter(|&e| e != seq) {
                self.last = Some(seq);
                return Err(OrderError::FirstSeq { expected, got: seq });
            }
            if !filter.admits_received(generator, seq, r.measured_len) {
                self.last = Some(seq);
                return Err(OrderError::Unwanted(seq));
            }
            self.last = Some(seq);
            return Ok(Accepted::New);
        };
        if seq <= last {
            if self.replaying {
                return Ok(Accepted::Duplicate);
            }
            if in_order {
                return Err(OrderError::Backwards { last, got: seq });
            }
        }
        self.replaying = false;
        if !filter.admits_received(generator, seq, r.measured_len) {
            return Err(OrderError::Unwanted(seq));
        }
        if in_order && seq > last {
            if filter.is_everything() {
                if seq != last + 1 {
                    return Err(OrderError::Gap {
                        expected: last + 1,
                        got: seq,
                    });
                }
            } else if let Some(expected) =
                first_required(generator, filter, last, seq, r.time_us, wire_range)?
            {
                return Err(OrderError::Gap { expected, got: seq });
            }
        }
        self.last = Some(self.last.map_or(seq, |l| l.max(seq)));
        Ok(Accepted::New)
    }

    /// Decides about a message known only by its server seq (a `#sync` the swarm cannot place
    /// in the generator's stream): a replayed duplicate, new, or out of order.
    pub fn accept_wire_seq(&mut self, wire_seq: u64) -> Result<Accepted, OrderError> {
        Ok(match self.step_wire_seq(wire_seq)? {
            WireStep::Replayed => Accepted::Duplicate,
            WireStep::New { .. } => Accepted::New,
        })
    }

    /// Whether `wire_seq` is a replayed duplicate right now (nothing changes).
    pub fn is_replayed(&self, wire_seq: u64) -> bool {
        self.replaying && self.last_wire.is_some_and(|last| wire_seq <= last)
    }

    /// The server-seq part of accepting an event: it must increase, except during a replay.
    fn step_wire_seq(&mut self, ws: u64) -> Result<WireStep, OrderError> {
        let skipped = match self.last_wire {
            Some(last) if ws <= last => {
                if self.replaying {
                    return Ok(WireStep::Replayed);
                }
                return Err(OrderError::SeqNotIncreasing { last, got: ws });
            }
            Some(last) => Some((last + 1, ws.saturating_sub(1).max(last + 1))),
            None => None,
        };
        self.last_wire = Some(ws);
        self.replaying = false;
        Ok(WireStep::New { skipped })
    }
}

/// The first seq strictly between `from` and `to` that the filter requires, if any; the
/// events in between had server seqs in `wire_seqs` (inclusive) when the stream has them.
fn first_required(
    generator: &Generator,
    filter: &Filter,
    from: u64,
    to: u64,
    time_us: i64,
    wire_seqs: Option<(u64, u64)>,
) -> Result<Option<u64>, OrderError> {
    if to - from > MAX_GAP_SCAN {
        return Err(OrderError::GapTooLong { from, to });
    }
    Ok((from + 1..to)
        .find(|&s| filter.verdict_with_seqs(generator, s, time_us, wire_seqs) == Verdict::Deliver))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(g: &Generator, seq: u64, t: i64) -> Vec<u8> {
        let mut v = Vec::new();
        g.event(seq, t, &mut v);
        v
    }

    #[test]
    fn accepts_exact_events_and_reads_time() {
        let g = Generator::new(3, 100);
        let mut v = Verifier::new(Some(g.clone()));
        for seq in [0u64, 1, 2, 151, 152, 9000, 9000 + CACHE_SLOTS as u64] {
            let t = 1_783_175_888_000_000 + seq as i64 * 7;
            let got = v.verify_plain(&event(&g, seq, t)).unwrap();
            assert_eq!(
                got,
                Verified {
                    seq: Some(seq),
                    time_us: Some(t),
                    wire_seq: None,
                    latency_from_us: Some(t),
                    measured_len: event(&g, seq, t).len(),
                }
            );
        }
        // Second pass hits the cache.
        let before = v.generated;
        v.verify_plain(&event(&g, 151, 1_783_175_888_000_000 + 151 * 7))
            .unwrap();
        assert_eq!(v.generated, before);
    }

    #[test]
    fn rejects_every_single_byte_corruption() {
        let g = Generator::new(3, 100);
        let mut v = Verifier::new(Some(g.clone()));
        for seq in [5u64, 140, 141] {
            let good = event(&g, seq, 1_783_175_888_123_456);
            let time_at = good.windows(10).position(|w| w == b"\"time_us\":").unwrap() + 10;
            let time_digits = time_at..time_at + 16;
            for i in 0..good.len() {
                let mut bad = good.clone();
                bad[i] ^= 0x01;
                match v.verify_plain(&bad) {
                    // time_us is the one free field: a digit flip there is a different,
                    // equally valid time, and it must show up as such.
                    Ok(r) if time_digits.contains(&i) => {
                        assert_ne!(r.time_us, Some(1_783_175_888_123_456), "flip at {i}");
                    }
                    Ok(_) => panic!("seq {seq}: flip at {i} accepted"),
                    Err(_) => {}
                }
            }
            // Truncation and extension.
            assert!(v.verify_plain(&good[..good.len() - 1]).is_err());
            let mut longer = good.clone();
            longer.push(b' ');
            assert!(v.verify_plain(&longer).is_err());
        }
    }

    #[test]
    fn every_copy_of_an_event_must_carry_the_same_time() {
        let g = Generator::new(3, 100);
        let mut v = Verifier::new(Some(g.clone()));
        v.verify_plain(&event(&g, 77, 1_000)).unwrap();
        v.verify_plain(&event(&g, 77, 1_000)).unwrap();
        assert_eq!(
            v.verify_plain(&event(&g, 77, 1_001)),
            Err(VerifyError::TimeChanged {
                seq: 77,
                got: 1_001,
                first: 1_000
            })
        );
    }

    #[test]
    fn rejects_wrong_seed_non_canonical_time_and_foreign_events() {
        let g = Generator::new(3, 100);
        let other = Generator::new(4, 100);
        let mut v = Verifier::new(Some(g.clone()));
        assert!(matches!(
            v.verify_plain(&event(&other, 10, 1)),
            Err(VerifyError::Mismatch { .. })
        ));
        let good = String::from_utf8(event(&g, 10, 123)).unwrap();
        let padded = good.replace("\"time_us\":123", "\"time_us\":0123");
        assert!(v.verify_plain(padded.as_bytes()).is_err());
        let sample = include_str!("../../assets/jetstream-v1-sample.jsonl");
        let first = sample.lines().next().unwrap();
        assert!(v.verify_plain(first.as_bytes()).is_err());
        // Without a seed, nothing is compared but seq/time are still read.
        let mut lax = Verifier::new(None);
        let r = lax.verify_plain(first.as_bytes()).unwrap();
        assert_eq!(r.time_us, Some(1_783_175_888_085_434));
    }

    #[test]
    fn compressed_frames_and_the_compressed_cache() {
        let g = Generator::new(3, 100);
        let mut v = Verifier::new(Some(g.clone()));
        let mut c = zstd::bulk::Compressor::with_dictionary(3, DICTIONARY).unwrap();
        let ev = event(&g, 42, 1_783_175_888_000_042);
        let frame = c.compress(&ev).unwrap();
        let r = v.verify_compressed(&frame, None).unwrap();
        assert_eq!(r.seq, Some(42));
        assert_eq!(v.decompressed, 1);
        // Same bytes, predicted seq: served from the cache.
        let r = v.verify_compressed(&frame, Some(42)).unwrap();
        assert_eq!(r.time_us, Some(1_783_175_888_000_042));
        assert_eq!(v.decompressed, 1);
        // A corrupted compressed frame must fail even when the prediction is right.
        let mut bad = frame.clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x20;
        assert!(v.verify_compressed(&bad, Some(42)).is_err());
        // Compressed wrong content fails.
        let wrong = c.compress(&event(&Generator::new(9, 100), 43, 1)).unwrap();
        assert!(v.verify_compressed(&wrong, Some(43)).is_err());
        assert!(matches!(
            v.verify_compressed(b"garbage", None),
            Err(VerifyError::Decompress(_))
        ));
    }

    fn accept(o: &mut Order, g: &Generator, f: &Filter, seq: u64) -> Result<Accepted, OrderError> {
        let checks = Checks {
            in_order: true,
            ..Default::default()
        };
        o.accept(g, f, &received(seq, None), &checks)
    }

    fn received(seq: u64, wire_seq: Option<u64>) -> Received {
        Received {
            seq,
            time_us: 1_783_175_888_000_000,
            measured_len: 100,
            wire_seq,
        }
    }

    #[test]
    fn order_full_stream() {
        let g = Generator::new(1, 10);
        let f = Filter::from_query("");
        let mut o = Order::default();
        assert_eq!(
            accept(&mut o, &g, &f, 500),
            Ok(Accepted::New),
            "any first seq"
        );
        assert_eq!(accept(&mut o, &g, &f, 501), Ok(Accepted::New));
        assert_eq!(
            accept(&mut o, &g, &f, 503),
            Err(OrderError::Gap {
                expected: 502,
                got: 503
            })
        );
        let mut o = Order::default();
        accept(&mut o, &g, &f, 10).unwrap();
        assert_eq!(
            accept(&mut o, &g, &f, 10),
            Err(OrderError::Backwards { last: 10, got: 10 })
        );
        assert_eq!(
            accept(&mut o, &g, &f, 9),
            Err(OrderError::Backwards { last: 10, got: 9 })
        );
        // Reconnect: replayed duplicates are skipped until new events arrive; a gap still fails.
        o.replaying = true;
        assert_eq!(accept(&mut o, &g, &f, 7), Ok(Accepted::Duplicate));
        assert_eq!(accept(&mut o, &g, &f, 10), Ok(Accepted::Duplicate));
        assert_eq!(accept(&mut o, &g, &f, 11), Ok(Accepted::New));
        assert!(accept(&mut o, &g, &f, 11).is_err(), "replay window closed");
        o.replaying = true;
        assert_eq!(
            accept(&mut o, &g, &f, 13),
            Err(OrderError::Gap {
                expected: 12,
                got: 13
            })
        );
        let mut o = Order::default();
        assert_eq!(
            o.accept(
                &g,
                &f,
                &received(4, None),
                &Checks {
                    in_order: true,
                    first_seq: Some(3),
                    ..Default::default()
                }
            ),
            Err(OrderError::FirstSeq {
                expected: 3,
                got: 4
            })
        );
    }

    #[test]
    fn order_by_the_servers_seq() {
        let g = Generator::new(1, 10);
        let f = Filter::from_query("");
        let checks = Checks {
            in_order: true,
            ..Default::default()
        };
        let mut o = Order::default();
        let take =
            |o: &mut Order, n: u64, ws: u64| o.accept(&g, &f, &received(n, Some(ws)), &checks);
        assert_eq!(take(&mut o, 0, 1), Ok(Accepted::New));
        // Gaps in the server's seqs are legal; in the events they are not.
        assert_eq!(take(&mut o, 1, 5), Ok(Accepted::New));
        assert_eq!(
            take(&mut o, 3, 6),
            Err(OrderError::Gap {
                expected: 2,
                got: 3
            })
        );
        assert_eq!(o.last_wire, Some(6));
        o.last = Some(3); // as the client resynchronises after a failure
        // A seq that does not increase fails, whatever the event.
        assert_eq!(
            take(&mut o, 4, 6),
            Err(OrderError::SeqNotIncreasing { last: 6, got: 6 })
        );
        assert_eq!(
            take(&mut o, 4, 2),
            Err(OrderError::SeqNotIncreasing { last: 6, got: 2 })
        );
        // A resume by seq replays from the last one inclusive: skipped by seq while replaying.
        o.replaying = true;
        assert!(o.is_replayed(6) && !o.is_replayed(7));
        assert_eq!(take(&mut o, 3, 6), Ok(Accepted::Duplicate));
        assert_eq!(take(&mut o, 4, 7), Ok(Accepted::New));
        assert!(!o.replaying, "the first new seq ends the replay");
        // An event the client already has under a new seq is a real duplicate (appended twice).
        assert_eq!(
            take(&mut o, 4, 8),
            Err(OrderError::Backwards { last: 4, got: 4 })
        );
        // A message known only by its seq (an unplaced #sync) follows the same rule.
        assert_eq!(o.accept_wire_seq(9), Ok(Accepted::New));
        assert_eq!(
            o.accept_wire_seq(9),
            Err(OrderError::SeqNotIncreasing { last: 9, got: 9 })
        );
        o.replaying = true;
        assert_eq!(o.accept_wire_seq(9), Ok(Accepted::Duplicate));
    }

    #[test]
    fn v1_frames_with_the_cursor_field() {
        let g = Generator::new(3, 100);
        let mut v = Verifier::new(Some(g.clone()));
        let plain = event(&g, 12, 1_783_175_888_000_012);
        let mut with = Vec::new();
        crate::wire::with_cursor(&plain, 4_321, &mut with).unwrap();
        let r = v.verify_plain(&with).unwrap();
        assert_eq!((r.seq, r.wire_seq), (Some(12), Some(4_321)));
        assert_eq!(
            r.measured_len,
            with.len(),
            "the size limit counts the field as sent"
        );
        assert_eq!(v.verify_plain(&plain).unwrap().wire_seq, None);
        // The field anywhere else is not taken out: the bytes then differ from the event.
        let text = String::from_utf8(plain.clone()).unwrap();
        let misplaced = format!("{},\"cursor\":4321}}", &text[..text.len() - 1]);
        assert!(v.verify_plain(misplaced.as_bytes()).is_err());
        // Compressed with the field: the cache remembers the field with the frame.
        let mut c = zstd::bulk::Compressor::with_dictionary(3, DICTIONARY).unwrap();
        let frame = c.compress(&with).unwrap();
        assert_eq!(
            v.verify_compressed(&frame, None).unwrap().wire_seq,
            Some(4_321)
        );
        let hit = v.verify_compressed(&frame, Some(12)).unwrap();
        assert_eq!((hit.wire_seq, hit.measured_len), (Some(4_321), frame.len()));
        assert_eq!(v.decompressed, 1);
    }

    #[test]
    fn order_filtered_stream_computes_the_expected_set() {
        let g = Generator::new(1, 10);
        let f = Filter::from_query("wantedCollections=app.bsky.graph.follow");
        let wanted: Vec<u64> = (0..2000)
            .filter(|&s| f.verdict(&g, s, 1) == Verdict::Deliver)
            .collect();
        assert!(wanted.len() > 20);
        let mut o = Order::default();
        for &s in &wanted {
            assert_eq!(accept(&mut o, &g, &f, s), Ok(Accepted::New), "seq {s}");
        }
        // Skipping one wanted event is a gap naming it.
        let mut o = Order::default();
        accept(&mut o, &g, &f, wanted[0]).unwrap();
        assert_eq!(
            accept(&mut o, &g, &f, wanted[2]),
            Err(OrderError::Gap {
                expected: wanted[1],
                got: wanted[2]
            })
        );
        // Receiving an unwanted event fails.
        let unwanted = (0..2000).find(|s| !wanted.contains(s)).unwrap();
        let mut o = Order::default();
        assert_eq!(
            accept(&mut o, &g, &f, unwanted),
            Err(OrderError::Unwanted(unwanted))
        );
    }

    /// `cargo test --release --lib -- --ignored verify_throughput --nocapture`: the verifier's
    /// per-event CPU cost on every wire with a warm cache (what one swarm core can check when
    /// many clients receive the same recent events within milliseconds of each other), plus
    /// the cost of a miss (the first client to see an event).
    #[test]
    #[ignore]
    fn verify_throughput() {
        let g = Generator::new(3, 100_000);
        let t0 = 1_783_175_888_000_000;
        let n_events = 64u64;
        let v1: Vec<Vec<u8>> = (0..n_events).map(|s| event(&g, s, t0 + s as i64)).collect();
        let cursor: Vec<Vec<u8>> = v1
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut out = Vec::new();
                crate::wire::with_cursor(e, 1_000_000 + i as u64, &mut out).unwrap();
                out
            })
            .collect();
        let v2: Vec<Vec<u8>> = v1
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut out = Vec::new();
                crate::wire::v1_to_v2(e, 1_000_000 + i as u64, t0 + 900, &mut out).unwrap();
                out
            })
            .collect();
        let mut z1 = zstd::bulk::Compressor::with_dictionary(3, DICTIONARY).unwrap();
        let mut z2 = zstd::bulk::Compressor::with_dictionary(
            3,
            include_bytes!("../../assets/zstd_dictionary_v2"),
        )
        .unwrap();
        let v1z: Vec<Vec<u8>> = v1.iter().map(|e| z1.compress(e).unwrap()).collect();
        let v2z: Vec<Vec<u8>> = v2.iter().map(|e| z2.compress(e).unwrap()).collect();
        let rounds = 10_000;
        let report = |name: &str, f: &mut dyn FnMut(usize)| {
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                for i in 0..n_events as usize {
                    f(i);
                }
            }
            let ns = start.elapsed().as_nanos() as f64 / (rounds * n_events as usize) as f64;
            eprintln!("{name}: {ns:.0} ns/event ({:.2} M events/s)", 1e3 / ns);
        };
        let plain = |wire, compressed| Checks {
            wire,
            compressed,
            ..Default::default()
        };
        let mut v = Verifier::new(Some(g.clone()));
        let c = plain(super::super::Wire::V1, false);
        report("v1 text", &mut |i| {
            v.verify_frame(&c, false, &v1[i], None).unwrap();
        });
        report("v1 text + cursor field", &mut |i| {
            v.verify_frame(&c, false, &cursor[i], None).unwrap();
        });
        let c = plain(super::super::Wire::V1, true);
        report("v1 zstd (predicted)", &mut |i| {
            v.verify_frame(&c, true, &v1z[i], Some(i as u64)).unwrap();
        });
        let c = plain(super::super::Wire::V2, false);
        report("v2 text", &mut |i| {
            v.verify_frame(&c, false, &v2[i], None).unwrap();
        });
        let c = plain(super::super::Wire::V2, true);
        report("v2 zstd (predicted)", &mut |i| {
            v.verify_frame(&c, true, &v2z[i], Some(1_000_000 + i as u64))
                .unwrap();
        });
        // Misses: a fresh verifier per round, so every frame is verified in full.
        let fresh = || Verifier::new(Some(g.clone()));
        let round = |name: &str, wire, compressed, frames: &[Vec<u8>]| {
            let c = plain(wire, compressed);
            let start = std::time::Instant::now();
            let rounds = 200;
            for _ in 0..rounds {
                let mut v = fresh();
                for f in frames {
                    v.verify_frame(&c, compressed, f, None).unwrap();
                }
            }
            let us = start.elapsed().as_secs_f64() * 1e6 / (rounds * frames.len()) as f64;
            eprintln!("{name} (miss): {us:.2} µs/event");
        };
        round("v1 text", super::super::Wire::V1, false, &v1);
        round("v2 text", super::super::Wire::V2, false, &v2);
        round("v2 zstd", super::super::Wire::V2, true, &v2z);
    }
}
