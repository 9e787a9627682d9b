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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::Generator;

    const T: i64 = 1_783_175_888_000_000;
    /// A witness time 3 ms after `T`.
    const W: i64 = T + 3_000;

    fn v2_frame(g: &Generator, n: u64, wire_seq: u64, witnessed: i64) -> Vec<u8> {
        let mut v1 = Vec::new();
        g.event(n, T + n as i64, &mut v1);
        let mut out = Vec::new();
        crate::wire::v1_to_v2(&v1, wire_seq, witnessed, &mut out).unwrap();
        out
    }

    fn checker() -> (Verifier, V2Checker) {
        (
            Verifier::new(Some(Generator::new(3, 100))),
            V2Checker::default(),
        )
    }

    fn event_of(d: Delivered) -> super::super::verify::Verified {
        match d {
            Delivered::Event(v) => v,
            other => panic!("not an event: {other:?}"),
        }
    }

    #[test]
    fn tail_seq_reads_the_canonical_tail_only() {
        let g = Generator::new(3, 100);
        for (n, seq) in [
            (0u64, 1u64),
            (5, 99),
            (151, 123_456_789),
            (152, u64::MAX / 2),
        ] {
            assert_eq!(tail_seq(&v2_frame(&g, n, seq, W)), Some(seq));
        }
        assert_eq!(tail_seq(b"{}"), None);
        let info = br#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#info","name":"FutureCursor"}}"#;
        assert_eq!(tail_seq(info), None);
    }

    #[test]
    fn events_are_checked_against_the_generator_and_cached() {
        let g = Generator::new(3, 100);
        let (mut v1, mut c) = checker();
        for n in [0u64, 1, 2, 40, 151, 152] {
            let frame = v2_frame(&g, n, n + 7, W);
            let v = event_of(c.verify_text(&mut v1, 0, &frame).unwrap());
            assert_eq!(
                (v.seq, v.time_us, v.wire_seq, v.latency_from_us),
                (Some(n), Some(T + n as i64), Some(n + 7), Some(W))
            );
            assert_eq!(
                v.measured_len,
                frame.len(),
                "size counts the uncompressed frame"
            );
        }
        // A second client's copy is a cache hit: nothing regenerated.
        let generated = v1.generated;
        let frame = v2_frame(&g, 40, 47, W);
        event_of(c.verify_text(&mut v1, 0, &frame).unwrap());
        assert_eq!(v1.generated, generated);
        // Another target has its own cache (its seqs are another server's).
        event_of(c.verify_text(&mut v1, 3, &v2_frame(&g, 41, 47, W)).unwrap());
        // The same server sending other bytes for a seq it already sent is reported.
        assert!(matches!(
            c.verify_text(&mut v1, 0, &v2_frame(&g, 40, 47, W + 1)),
            Err(VerifyError::SeqChanged { seq: 47, .. })
        ));
    }

    #[test]
    fn every_byte_outside_the_free_fields_is_checked() {
        let g = Generator::new(3, 100);
        for n in [0u64, 3, 140] {
            let good = v2_frame(&g, n, 123, W);
            let text = String::from_utf8(good.clone()).unwrap();
            // seq, time and witnessedAt are free values: a flip there is another valid frame
            // (a different seq, time or witness time), which the order checks judge.
            let free: Vec<std::ops::Range<usize>> =
                ["\"seq\":", "\"time\":\"", "\"witnessedAt\":\""]
                    .iter()
                    .map(|k| {
                        let at = text.rfind(k).unwrap() + k.len();
                        at..at + if k.starts_with("\"seq") { 3 } else { 26 }
                    })
                    .collect();
            for i in 0..good.len() {
                let mut bad = good.clone();
                bad[i] ^= 0x01;
                let (mut v1, mut c) = checker();
                match c.verify_text(&mut v1, 0, &bad) {
                    Ok(_) if free.iter().any(|r| r.contains(&i)) => {}
                    Ok(d) => panic!("event {n}: flip at {i} accepted as {d:?}"),
                    Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn non_canonical_frames_and_missing_witness_time_fail() {
        let g = Generator::new(3, 100);
        let (mut v1, mut c) = checker();
        let good = String::from_utf8(v2_frame(&g, 0, 9, W)).unwrap();
        // Same JSON value, other bytes: a space, keys in another order.
        let spaced = good.replacen("\"seq\":9", "\"seq\": 9", 1);
        assert!(matches!(
            c.verify_text(&mut v1, 0, spaced.as_bytes()),
            Err(VerifyError::NotCanonical { seq: 9, .. })
        ));
        let reordered = good.replacen("{\"$type\":\"message\",\"payload\":", "{\"payload\":", 1);
        let reordered = format!(
            "{},\"$type\":\"message\"}}",
            &reordered[..reordered.len() - 1]
        );
        assert!(c.verify_text(&mut v1, 0, reordered.as_bytes()).is_err());
        let at = good.find(",\"witnessedAt\"").unwrap();
        let unwitnessed = format!("{}}}}}", &good[..at]);
        assert_eq!(
            c.verify_text(&mut v1, 0, unwitnessed.as_bytes()),
            Err(VerifyError::NoWitnessedAt(9))
        );
        assert!(matches!(
            c.verify_text(&mut v1, 0, b"{\"kind\":\"commit\"}"),
            Err(VerifyError::V2Frame(_))
        ));
        // Another seed's event in a perfect envelope: the content check catches it.
        let other = v2_frame(&Generator::new(4, 100), 0, 10, W);
        assert!(matches!(
            c.verify_text(&mut v1, 0, &other),
            Err(VerifyError::Mismatch { .. })
        ));
    }

    #[test]
    fn sync_info_and_error_frames() {
        let (mut v1, mut c) = checker();
        let sync = br#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#sync","did":"did:plc:a","seq":4,"sync":{"blocks":{"$bytes":"AA"},"did":"did:plc:a","rev":"r","seq":1,"time":"2026-07-04T14:38:07.877Z"},"time":"2026-07-04T14:38:08.000000Z","witnessedAt":"2026-07-04T14:38:08.000000Z"}}"#;
        assert_eq!(
            c.verify_text(&mut v1, 0, sync).unwrap(),
            Delivered::Sync {
                wire_seq: 4,
                did: "did:plc:a".into()
            }
        );
        let mut info = Vec::new();
        crate::wire::future_cursor_frame(900, 10, &mut info);
        assert!(matches!(
            c.verify_text(&mut v1, 0, &info).unwrap(),
            Delivered::Info { name, .. } if name == "FutureCursor"
        ));
        let mut error = Vec::new();
        crate::wire::consumer_too_slow_frame(100_001, 17, &mut error);
        assert!(matches!(
            c.verify_text(&mut v1, 0, &error).unwrap(),
            Delivered::Error { error, message: Some(m) } if error == "ConsumerTooSlow" && m.contains("cursor=17")
        ));
    }

    #[test]
    fn compressed_frames_use_the_v2_dictionary_and_the_successor_hint() {
        let g = Generator::new(3, 100);
        let (mut v1, mut c) = checker();
        let mut z = zstd::bulk::Compressor::with_dictionary(3, DICTIONARY_V2).unwrap();
        let frames: Vec<Vec<u8>> = (0..4u64)
            .map(|n| z.compress(&v2_frame(&g, n, 100 + n, W)).unwrap())
            .collect();
        // First client: every frame decompressed; it links each seq to the next.
        for (n, f) in frames.iter().enumerate() {
            let v = event_of(c.verify_compressed(&mut v1, 0, f, None).unwrap());
            assert_eq!(v.wire_seq, Some(100 + n as u64));
            assert_eq!(
                v.measured_len,
                v2_frame(&g, n as u64, 100 + n as u64, W).len()
            );
            if n > 0 {
                c.link(0, 99 + n as u64, 100 + n as u64);
            }
        }
        assert_eq!(c.decompressed, 4);
        // Second client: from the hint on, nothing is decompressed.
        for (n, f) in frames.iter().enumerate().skip(1) {
            let hint = c.successor(0, 99 + n as u64);
            assert_eq!(hint, Some(100 + n as u64));
            c.verify_compressed(&mut v1, 0, f, hint).unwrap();
        }
        assert_eq!(c.decompressed, 4);
        // A right hint does not excuse a corrupted frame.
        let mut bad = frames[2].clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x20;
        assert!(c.verify_compressed(&mut v1, 0, &bad, Some(102)).is_err());
        // A frame compressed with the v1 dictionary is refused.
        let mut legacy = zstd::bulk::Compressor::with_dictionary(
            3,
            include_bytes!("../../assets/zstd_dictionary"),
        )
        .unwrap();
        let wrong = legacy.compress(&v2_frame(&g, 9, 109, W)).unwrap();
        assert!(matches!(
            c.verify_compressed(&mut v1, 0, &wrong, None),
            Err(VerifyError::Decompress(_))
        ));
    }
}
