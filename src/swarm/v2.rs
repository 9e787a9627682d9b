//! Verification of `subscribeEvents` (v2) frames.
//!
//! A v2 event frame must be *exactly* the canonical v2 rendering of the generator's event: it is
//! parsed ([`crate::wire::parse_v2_frame`], which validates the whole JSON), its event rendered
//! back to v1 ([`crate::wire::EventParts::render_v1`]) and checked byte-exact against the
//! generator like any v1 event, and the parts rendered to v2 again with the frame's own `seq`
//! and `witnessedAt` must give the frame's bytes (key order, spacing, time format). Together:
//! every byte is the generator's event in the documented envelope. `#sync` messages carry the
//! upstream's wrapped object, not a generator event: they are checked for canonical form and
//! handed to the client's order state, which places them by DID. `#info` and error frames are
//! returned by name.
//!
//! Every client of one server receives the same bytes for a seq, so a verified frame is cached
//! per target URL in a ring keyed by `seq % SLOTS`: a later copy costs reading its seq from the
//! frame's fixed-width tail and one `memcmp`. One server must always send the same bytes for a
//! seq; a second, different copy is reported. Compressed frames (one zstd frame each, v2
//! dictionary) are matched against the last compressed copy of the seq the client most likely
//! gets next — the seq that followed its last one on another client of the same URL
//! ([`V2Checker::successor`]) — and decompressed only on a miss.
//!
//! Latency counts from `witnessedAt`, not `time`. `time` is the event's display time (the v1
//! `time_us`: upstream-stamped, not monotonic, jittered backwards by the mock's
//! `--time-jitter-ms`); `witnessedAt` is when the serving instance took the event in. Receive
//! time minus `witnessedAt` is therefore the instance's own delivery delay (append → client)
//! when it stamps its ingest time, and the upstream's witness → client when it passes the
//! upstream's through; either way no upstream clock jitter is counted as delay.

use super::verify::{Delivered, MAX_EVENT_LEN, Verifier, VerifyError, first_difference, snippet};
use crate::wire::{MessageKind, V2Frame, parse_v2_frame};

/// Frames cached per target: covers clients spread over this many consecutive seqs (a few
/// seconds of stream at typical rates), as the v1 cache does.
const SLOTS: usize = 8192;

/// The canonical tail of an event frame after its `seq` digits:
/// `,"time":"<27>","witnessedAt":"<27>"}}`.
const TAIL_LEN: usize = TIME_KEY.len() + 27 + WITNESSED_KEY.len() + 27 + 3;
/// What starts the tail.
const TIME_KEY: &[u8] = b",\"time\":\"";
/// Between the two timestamps.
const WITNESSED_KEY: &[u8] = b"\",\"witnessedAt\":\"";

/// The v2 dictionary, loaded here independently of the relay's compress module.
const DICTIONARY_V2: &[u8] = include_bytes!("../../assets/zstd_dictionary_v2");

/// One verified frame of one server.
#[derive(Debug, Default)]
struct Slot {
    /// The seq this slot holds (`None` = empty).
    wire_seq: Option<u64>,
    /// The verified text frame.
    frame: Vec<u8>,
    /// The last compressed frame that decompressed to `frame` (empty = none yet).
    compressed: Vec<u8>,
    /// What `frame` is (an event or a `#sync`), as verification found it.
    result: Option<Delivered>,
    /// The seq a client received right after this one (the compressed-cache hint).
    next: Option<u64>,
}

/// The v2 side of the process-wide verifier.
#[derive(Default)]
pub struct V2Checker {
    /// Per target URL, its ring of verified frames (allocated on first use).
    caches: Vec<Vec<Slot>>,
    /// zstd decompression context with the v2 dictionary.
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// Reused decompression output.
    plain: Vec<u8>,
    /// Reused v1 rendering of the event under check.
    v1: Vec<u8>,
    /// Reused canonical v2 rendering of the frame under check.
    canonical: Vec<u8>,
    /// Frames decompressed (compressed-cache misses), for the report.
    pub decompressed: u64,
}

impl std::fmt::Debug for V2Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V2Checker")
            .field("targets", &self.caches.len())
            .field("decompressed", &self.decompressed)
            .finish()
    }
}

/// The `seq` of an event frame in canonical form, read from its fixed-width tail without
/// parsing. Only a cache key: a hit is confirmed by comparing the whole frame.
pub fn tail_seq(frame: &[u8]) -> Option<u64> {
    let end = frame.len().checked_sub(TAIL_LEN)?;
    if !frame[end..].starts_with(TIME_KEY) {
        return None;
    }
    let head = &frame[..end];
    let digits = head.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 19 || !head[..end - digits].ends_with(b",\"seq\":") {
        return None;
    }
    std::str::from_utf8(&head[end - digits..])
        .ok()?
        .parse()
        .ok()
}

impl V2Checker {
    /// The slot of `wire_seq` in `target`'s ring, allocating the ring on first use.
    fn slot(&mut self, target: usize, wire_seq: u64) -> &mut Slot {
        if self.caches.len() <= target {
            self.caches.resize_with(target + 1, Vec::new);
        }
        let ring = &mut self.caches[target];
        if ring.is_empty() {
            ring.resize_with(SLOTS, Slot::default);
        }
        &mut ring[(wire_seq % SLOTS as u64) as usize]
    }

    /// The slot of `wire_seq` if it holds that seq.
    fn held(&self, target: usize, wire_seq: u64) -> Option<&Slot> {
        self.caches
            .get(target)?
            .get((wire_seq % SLOTS as u64) as usize)
            .filter(|s| s.wire_seq == Some(wire_seq))
    }

    /// The seq that followed `wire_seq` on some client of `target`.
    pub fn successor(&self, target: usize, wire_seq: u64) -> Option<u64> {
        self.held(target, wire_seq)?.next
    }

    /// The uncompressed length of the frame with `wire_seq` of `target`, if cached.
    pub fn frame_len(&self, target: usize, wire_seq: u64) -> Option<usize> {
        self.held(target, wire_seq).map(|s| s.frame.len())
    }

    /// Remembers that `next` followed `prev` on a client of `target`.
    pub fn link(&mut self, target: usize, prev: u64, next: u64) {
        if self.held(target, prev).is_some() {
            self.slot(target, prev).next = Some(next);
        }
    }

    /// Verifies a text frame of `target`.
    pub fn verify_text(
        &mut self,
        v1: &mut Verifier,
        target: usize,
        frame: &[u8],
    ) -> Result<Delivered, VerifyError> {
        if let Some(seq) = tail_seq(frame)
            && let Some(slot) = self.held(target, seq)
            && slot.frame == frame
            && let Some(result) = &slot.result
        {
            return Ok(result.clone());
        }
        self.verify_fresh(v1, target, frame)
    }

    /// Verifies a compressed frame of `target`; `predicted` is the seq the client most likely
    /// receives next.
    pub fn verify_compressed(
        &mut self,
        v1: &mut Verifier,
        target: usize,
        frame: &[u8],
        predicted: Option<u64>,
    ) -> Result<Delivered, VerifyError> {
        if let Some(p) = predicted
            && let Some(slot) = self.held(target, p)
            && !slot.compressed.is_empty()
            && slot.compressed == frame
            && let Some(result) = &slot.result
        {
            return Ok(result.clone());
        }
        if self.decompressor.is_none() {
            let d = zstd::bulk::Decompressor::with_dictionary(DICTIONARY_V2)
                .map_err(|e| VerifyError::Decompress(e.to_string()))?;
            self.decompressor = Some(d);
            self.plain = Vec::with_capacity(MAX_EVENT_LEN);
        }
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        let decompressed = match self.decompressor.as_mut() {
            Some(d) => d
                .decompress_to_buffer(frame, &mut plain)
                .map_err(|e| VerifyError::Decompress(e.to_string())),
            None => Err(VerifyError::Decompress("no decompressor".into())),
        };
        self.decompressed += 1;
        let result = decompressed.and_then(|_| self.verify_text(v1, target, &plain));
        self.plain = plain;
        let result = result?;
        let wire_seq = match &result {
            Delivered::Event(v) => v.wire_seq,
            Delivered::Sync { wire_seq, .. } => Some(*wire_seq),
            Delivered::Info { .. } | Delivered::Error { .. } => None,
        };
        if let Some(seq) = wire_seq
            && self.held(target, seq).is_some()
        {
            let slot = self.slot(target, seq);
            slot.compressed.clear();
            slot.compressed.extend_from_slice(frame);
        }
        Ok(result)
    }

    /// Full verification of a text frame (cache miss).
    fn verify_fresh(
        &mut self,
        v1: &mut Verifier,
        target: usize,
        frame: &[u8],
    ) -> Result<Delivered, VerifyError> {
        let (seq, witnessed_us, event) =
            match parse_v2_frame(frame).map_err(|e| VerifyError::V2Frame(e.to_string()))? {
                V2Frame::Info { name, message } => return Ok(Delivered::Info { name, message }),
                V2Frame::Error { error, message } => {
                    return Ok(Delivered::Error { error, message });
                }
                V2Frame::Event {
                    seq,
                    witnessed_us,
                    event,
                } => (seq, witnessed_us, event),
            };
        let witnessed_us = witnessed_us.ok_or(VerifyError::NoWitnessedAt(seq))?;
        self.canonical.clear();
        event
            .render_v2(seq, witnessed_us, &mut self.canonical)
            .map_err(|e| VerifyError::V2Frame(e.to_string()))?;
        if self.canonical != frame {
            let offset = first_difference(frame, &self.canonical);
            return Err(VerifyError::NotCanonical {
                seq,
                offset,
                got: snippet(frame, offset),
                want: snippet(&self.canonical, offset),
            });
        }
        let result = if event.kind() == MessageKind::Sync {
            let did = serde_json::from_slice(event.did)
                .map_err(|e| VerifyError::V2Frame(format!("seq {seq}: did: {e}")))?;
            Delivered::Sync { wire_seq: seq, did }
        } else {
            self.v1.clear();
            event
                .render_v1(&mut self.v1)
                .map_err(|e| VerifyError::V2Frame(e.to_string()))?;
            let mut v = v1.verify_event(&self.v1)?;
            v.wire_seq = Some(seq);
            v.latency_from_us = Some(witnessed_us);
            v.measured_len = frame.len();
            Delivered::Event(v)
        };
        let slot = self.slot(target, seq);
        if slot.wire_seq == Some(seq) {
            if slot.frame != frame {
                return Err(VerifyError::SeqChanged {
                    seq,
                    offset: first_difference(frame, &slot.frame),
                });
            }
        } else {
            slot.wire_seq = Some(seq);
            slot.frame.clear();
            slot.frame.extend_from_slice(frame);
            slot.compressed.clear();
            slot.result = Some(result.clone());
            slot.next = None;
        }
        Ok(result)
    }
}
