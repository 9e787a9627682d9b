//! Per-event verification: byte-exact content (by regenerating the event) and per-client order.
//!
//! [`Verifier`] is shared by all clients of a process. It caches the expected rendering of
//! recent seqs in a small ring (keyed by `seq % CACHE_SLOTS`), rendered *without* `time_us`, so
//! thousands of clients receiving the same event cost one generation and two `memcmp`s each. The
//! received `time_us` digits must be the canonical rendering of a number, which makes the check
//! equivalent to "regenerate with the received time_us and compare the whole frame".
//!
//! For compressed clients the ring also remembers the last compressed frame verified for a seq:
//! a byte-identical frame decompresses identically, so it is accepted without decompressing
//! again (the relay compresses each event once, so this is the common case).
//!
//! [`Order`] is the per-client sequence state machine: it decides whether a verified seq is the
//! one the client must receive next, given its filter.

use super::filter::{Filter, Verdict};
use crate::mock::{Generator, parse_canonical_i64};

/// Expected renderings kept: covers clients spread over this many consecutive seqs without
/// regenerating (a few seconds of stream at typical rates).
const CACHE_SLOTS: usize = 8192;

/// Largest decompressed event accepted: real events are < 100 KiB, Jetstream caps messages at
/// a few MB; anything bigger is a bug worth reporting rather than an allocation to make.
pub const MAX_EVENT_LEN: usize = 4 * 1024 * 1024;

/// Longest gap (in seqs) a filtered client's gap check will scan; a relay that jumps further
/// than this is reported instead of stalling the swarm.
const MAX_GAP_SCAN: u64 = 20_000_000;

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
}

/// The result of verifying one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Decoded seq (`None` when the swarm runs without a seed and the event is foreign).
    pub seq: Option<u64>,
    /// The event's `time_us` (`None` if it has none, e.g. no seed and a foreign event shape).
    pub time_us: Option<i64>,
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
            generated: 0,
            decompressed: 0,
        }
    }

    /// The generator, if verification is on.
    pub fn generator(&self) -> Option<&Generator> {
        self.generator.as_ref()
    }

    /// Verifies a plain (text-frame) event.
    pub fn verify_plain(&mut self, payload: &[u8]) -> Result<Verified, VerifyError> {
        let Some(generator) = &self.generator else {
            return Ok(Verified {
                seq: Generator::seq_of(payload),
                time_us: Generator::time_us_of(payload),
            });
        };
        let seq = Generator::seq_of(payload)
            .ok_or_else(|| VerifyError::Undecodable(snippet(payload, 0)))?;
        let slot = &mut self.cache[(seq % CACHE_SLOTS as u64) as usize];
        if slot.seq != Some(seq) {
            slot.bytes.clear();
            slot.time_at = generator.event_without_time(seq, &mut slot.bytes);
            slot.seq = Some(seq);
            slot.compressed.clear();
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
        if payload.len() < at || payload[..at] != want[..at] {
            return Err(mismatch(first_difference(payload, want)));
        }
        let (time_us, digits) = parse_canonical_i64(&payload[at..]).ok_or_else(|| mismatch(at))?;
        if payload[at + digits..] != want[at..] {
            let d = first_difference(&payload[at + digits..], &want[at..]);
            return Err(mismatch(at + digits + d));
        }
        Ok(Verified {
            seq: Some(seq),
            time_us: Some(time_us),
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
        let v = verified?;
        if let (Some(seq), Some(t)) = (v.seq, v.time_us) {
            let slot = &mut self.cache[(seq % CACHE_SLOTS as u64) as usize];
            if slot.seq == Some(seq) && self.generator.is_some() {
                slot.compressed.clear();
                slot.compressed.extend_from_slice(frame);
                slot.compressed_time = t;
            }
        }
        Ok(v)
    }
}

/// Offset of the first differing byte (or the shorter length).
fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// Up to 40 bytes from `offset`, lossily as text, for failure messages.
fn snippet(b: &[u8], offset: usize) -> String {
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

/// Per-client ordering state.
#[derive(Debug, Clone, Default)]
pub struct Order {
    /// Last accepted seq.
    pub last: Option<u64>,
    /// First accepted seq.
    pub first: Option<u64>,
    /// Set on reconnect: replayed seqs ≤ `last` are skipped until a newer one arrives.
    pub replaying: bool,
}

impl Order {
    /// Decides about verified event `seq` (arriving with `time_us`, `sent_len` payload bytes).
    /// `in_order` enables the contiguity check; `first_seq` requires a specific first event.
    pub fn accept(
        &mut self,
        generator: &Generator,
        filter: &Filter,
        seq: u64,
        time_us: i64,
        sent_len: usize,
        in_order: bool,
        first_seq: Option<u64>,
    ) -> Result<Accepted, OrderError> {
        let Some(last) = self.last else {
            if let Some(expected) = first_seq.filter(|&e| e != seq) {
                return Err(OrderError::FirstSeq { expected, got: seq });
            }
            if !filter.admits_received(generator, seq, sent_len) {
                return Err(OrderError::Unwanted(seq));
            }
            self.last = Some(seq);
            self.first = Some(seq);
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
        if !filter.admits_received(generator, seq, sent_len) {
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
            } else if let Some(expected) = first_required(generator, filter, last, seq, time_us)? {
                return Err(OrderError::Gap { expected, got: seq });
            }
        }
        self.last = Some(self.last.map_or(seq, |l| l.max(seq)));
        Ok(Accepted::New)
    }
}

/// The first seq strictly between `from` and `to` that the filter requires, if any.
fn first_required(
    generator: &Generator,
    filter: &Filter,
    from: u64,
    to: u64,
    time_us: i64,
) -> Result<Option<u64>, OrderError> {
    if to - from > MAX_GAP_SCAN {
        return Err(OrderError::GapTooLong { from, to });
    }
    Ok((from + 1..to).find(|&s| filter.verdict(generator, s, time_us) == Verdict::Deliver))
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
                    time_us: Some(t)
                }
            );
        }
        // Second pass hits the cache.
        let before = v.generated;
        v.verify_plain(&event(&g, 151, 5)).unwrap();
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
        o.accept(g, f, seq, 1_783_175_888_000_000, 100, true, None)
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
            o.accept(&g, &f, 4, 1, 100, true, Some(3)),
            Err(OrderError::FirstSeq {
                expected: 3,
                got: 4
            })
        );
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
}
