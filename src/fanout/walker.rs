//! A filtered client's walk over the event index: finds the next run of consecutive frames
//! of its base log that pass its filter (DID filters, and collection filters that have no
//! shape).
//!
//! The index holds what a filter needs to reject almost every event without reading it (DID
//! hash, collection id, frame lengths); a DID hash hit, or a collection the index could not
//! intern, is confirmed on the event's JSON. Why in two phases: the index lock is shared by
//! the writer and every worker, so it is held only while copying a batch of records
//! ([`LOCKED_BATCH`]); reading and parsing candidates happens after it is released. Retention
//! cannot punch the frames meanwhile: the walker's position is below them and it is published
//! as this worker's low mark, which retention waits for.

use crate::encoding::Encoding;
use crate::event::EventKind;
use crate::hub::{Hub, stored_header_len, stored_payload_len};
use crate::index::{COLLECTION_NONE, COLLECTION_UNKNOWN, EventEntry, EventPos};
use crate::subscription::SubscriberOptions;
use crate::wire::KindSet;

/// Events a filtered client may examine per serve before yielding to other clients. Why 8192:
/// a replay of a sparse filter over a long log must not monopolize the worker, yet each serve
/// should cover many chunks' worth of records.
pub const WALK_BUDGET: usize = 8192;
/// Index records copied per hold of the index lock. Why 512: a couple of microseconds of
/// copying, so the writer and other workers never wait behind a walk.
const LOCKED_BATCH: usize = 512;
/// Longest run handed over as one operation (the driver's send cap).
const MAX_RUN_BYTES: u64 = 256 * 1024;

/// What the cheap index-only check says about one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Reject,
    Accept,
    /// The index cannot decide: confirm on the JSON.
    ReadJson,
}

/// The result of one step of a walk.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Frames `[from, to)` of the base log, `events` of them, all passing the filter.
    Run { from: u64, to: u64, events: u64 },
    /// The budget was used up or the end reached without a match.
    Nothing,
    /// Retention dropped the walker's next event: it must be kicked.
    BehindRetention,
}

/// A filtered client's position and filter.
pub struct Walker {
    /// The next event to examine.
    pub next: EventPos,
    /// The frames it reads (the size limit is measured on the uncompressed message for v2).
    pub encoding: Encoding,
    /// The kinds it wants (every kind of its wire on v1).
    pub kinds: KindSet,
    /// The filter.
    pub options: SubscriberOptions,
    /// `did_hash` of each wanted DID, sorted and unique (a hash match is confirmed on the JSON).
    pub did_hashes: Vec<u32>,
    /// Per collection id: 0 = not yet evaluated, 1 = allowed, 2 = refused.
    collection_verdicts: Vec<u8>,
}

impl Walker {
    /// A walk from `next` with `options`, for a client of `encoding` wanting `kinds`.
    pub fn new(
        next: EventPos,
        encoding: Encoding,
        kinds: KindSet,
        options: SubscriberOptions,
    ) -> Walker {
        let mut did_hashes: Vec<u32> = options
            .wanted_dids
            .iter()
            .map(|d| crate::event::did_hash(d))
            .collect();
        did_hashes.sort_unstable();
        did_hashes.dedup();
        Walker {
            next,
            encoding,
            kinds,
            options,
            did_hashes,
            collection_verdicts: Vec::new(),
        }
    }

    /// Heap bytes this walker's filter state holds (for the filter-state budget).
    pub fn state_bytes(&self) -> usize {
        self.did_hashes.capacity() * 4 + self.collection_verdicts.capacity()
    }

    /// Finds the next run of consecutive matching frames from `self.next`, examining at most
    /// [`WALK_BUDGET`] events and stopping before event `stop_at` (a shape's start, where the
    /// client switches logs). Advances past everything it examined. `scratch` is a reusable
    /// buffer (the worker's), so a walk allocates nothing.
    pub fn step(
        &mut self,
        hub: &Hub,
        stop_at: Option<u64>,
        scratch: &mut Vec<(EventPos, EventEntry, u8)>,
    ) -> Step {
        let mut run: Option<(u64, u64, u64)> = None;
        let mut examined = 0usize;
        while examined < WALK_BUDGET {
            scratch.clear();
            {
                let index = hub.index();
                if self.next.seq < index.start_pos().seq {
                    return Step::BehindRetention;
                }
                let want = LOCKED_BATCH.min(WALK_BUDGET - examined);
                let next = self.next;
                index.walk(next, want, |pos, e| {
                    if stop_at.is_some_and(|s| pos.seq >= s) {
                        return false;
                    }
                    let v = self.index_verdict(&index, e);
                    scratch.push((pos, *e, v as u8));
                    true
                });
            }
            if scratch.is_empty() {
                break;
            }
            for &(pos, e, v) in scratch.iter() {
                examined += 1;
                let ok = match v {
                    x if x == Verdict::Accept as u8 => true,
                    x if x == Verdict::ReadJson as u8 => self.json_verdict(hub, pos, &e),
                    _ => false,
                };
                let after = pos.after(&e);
                let start = pos.offset(self.encoding);
                let end = after.offset(self.encoding);
                match (&mut run, ok) {
                    (None, true) => run = Some((start, end, 1)),
                    (Some(r), true) if end - r.0 <= MAX_RUN_BYTES => {
                        r.1 = end;
                        r.2 += 1;
                    }
                    // A full run: this event starts the next one, so it is not consumed.
                    (Some(r), true) => {
                        return Step::Run {
                            from: r.0,
                            to: r.1,
                            events: r.2,
                        };
                    }
                    // The run ends at a refused event, which is consumed (it never matches).
                    (Some(r), false) => {
                        self.next = after;
                        return Step::Run {
                            from: r.0,
                            to: r.1,
                            events: r.2,
                        };
                    }
                    (None, false) => {}
                }
                self.next = after;
            }
            if scratch.len() < LOCKED_BATCH.min(WALK_BUDGET) {
                break; // the end of the index, or `stop_at`
            }
        }
        match run {
            Some((from, to, events)) => Step::Run { from, to, events },
            None => Step::Nothing,
        }
    }

    /// The index-only verdict (called under the index lock: no I/O).
    fn index_verdict(&mut self, index: &crate::index::EventIndex, e: &EventEntry) -> Verdict {
        let o = &self.options;
        // The kinds it wants; no frame in its log (a `#sync` event on v1) is no event for it.
        if !self.kinds.contains_kind(e.kind()) || e.frame_len(self.encoding) == 0 {
            return Verdict::Reject;
        }
        // v1 limits what is sent; v2 the uncompressed message, also for compressed clients.
        let sized = if self.encoding.v2() {
            Encoding::V2Json
        } else {
            self.encoding
        };
        if let Some(max) = o.max_message_size
            && stored_payload_len(e.frame_len(sized)) > max as u64
        {
            return Verdict::Reject;
        }
        let mut verdict = Verdict::Accept;
        if !o.wanted_collections.is_empty() {
            match e.collection {
                COLLECTION_NONE => {}
                COLLECTION_UNKNOWN => verdict = Verdict::ReadJson,
                id => {
                    let i = id as usize;
                    if self.collection_verdicts.len() <= i {
                        self.collection_verdicts.resize(i + 1, 0);
                    }
                    if self.collection_verdicts[i] == 0 {
                        let allowed = o.collection_allowed(e.kind(), index.collections.name(id));
                        self.collection_verdicts[i] = if allowed { 1 } else { 2 };
                    }
                    if self.collection_verdicts[i] != 1 {
                        return Verdict::Reject;
                    }
                }
            }
        }
        if !o.wanted_dids.is_empty() {
            if self.did_hashes.binary_search(&e.did_hash).is_err() {
                return Verdict::Reject;
            }
            // A 32-bit hash can collide: confirm on the JSON.
            verdict = Verdict::ReadJson;
        }
        verdict
    }

    /// The verdict on the event's JSON (read without any lock held): the v1 JSON, or the v2
    /// message for a `#sync` event (which has no v1 form, and no collection).
    fn json_verdict(&self, hub: &Hub, pos: EventPos, e: &EventEntry) -> bool {
        let o = &self.options;
        if e.kind() == EventKind::Sync {
            let v2 = Encoding::V2Json;
            let Some(frame) =
                read_payload(hub.base(v2).file(), pos.offset(v2), e.frame_len(v2) as u32)
            else {
                return false;
            };
            let Ok(crate::wire::V2Frame::Event { event, .. }) = crate::wire::parse_v2_frame(&frame)
            else {
                return false;
            };
            let did: Result<String, _> = serde_json::from_slice(event.did);
            return did.is_ok_and(|d| o.wanted_dids.is_empty() || o.did_allowed(&d));
        }
        let v1 = Encoding::V1Json;
        let Some(json) = read_payload(hub.plain().file(), pos.offset(v1), e.frame_len(v1) as u32)
        else {
            return false;
        };
        let Ok(meta) = crate::event::parse_event(&json) else {
            return false;
        };
        o.collection_allowed(meta.kind, meta.collection.as_deref())
            && (o.wanted_dids.is_empty() || o.did_allowed(&meta.did))
    }
}

/// The payload of the stored frame at `off` (`len` bytes including its header).
fn read_payload(plain: &std::fs::File, off: u64, len: u32) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(plain, &mut buf, off).ok()?;
    let h = stored_header_len(&buf);
    Some(buf.split_off(h.min(buf.len())))
}
