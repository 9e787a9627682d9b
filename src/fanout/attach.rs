//! Where a client reads from: the attach point of a new client, the switch of a walker onto
//! its shape's log, and the switch to new options (`options_update`).
//!
//! Locks: these read the index and a shape's table, never one while holding the other (see
//! the lock order in [`crate::lock_order`]).

use std::sync::Arc;

use super::client::{Client, Source};
use super::walker::Walker;
use crate::encoding::Encoding;
use crate::hub::Hub;
use crate::index::EventPos;
use crate::log::Stream;
use crate::shapes::Shape;
use crate::subscription::{Serving, SubscriberOptions};
use crate::wire::KindSet;

/// How often attaching retries when the shape it found was retired at that moment. Why 4: a
/// retirement needs the shape idle for a minute, so two in a row cannot happen; the bound only
/// makes the loop finite.
const RETIRED_SHAPE_RETRIES: usize = 4;

/// Where a client with given options starts reading.
pub struct AttachPoint {
    /// The log it reads.
    pub stream: Arc<Stream>,
    /// Its shape (reading it, or walking the base log towards it), with a client counted.
    pub shape: Option<Arc<Shape>>,
    /// Where its bytes come from.
    pub source: Source,
    /// First byte to read.
    pub pos: u64,
    /// Frames before `pos` in `stream`'s numbering (see [`published_frames`]).
    pub ordinal: u64,
}

/// The attach point for a client of `encoding` with `options` and `kinds` from event position
/// `start`, for a client at `peer` (the address a new shape's creation is charged to).
pub fn attach_point(
    hub: &Hub,
    peer: std::net::IpAddr,
    encoding: Encoding,
    kinds: KindSet,
    options: SubscriberOptions,
    start: EventPos,
) -> AttachPoint {
    let base = hub.base(encoding).clone();
    let shape = match options.serving(encoding, kinds) {
        Serving::Base => {
            return AttachPoint {
                stream: base,
                shape: None,
                source: Source::Contiguous,
                pos: start.offset(encoding),
                ordinal: start.seq,
            };
        }
        Serving::Walk => None,
        Serving::Shape(key) => counted_shape(hub, &key, peer),
    };
    if let Some(shape) = &shape
        && start.seq >= shape.start_seq()
    {
        let end = shape.stream.end();
        let table = shape.table.read();
        let pos = table.offset_from_seq(start.seq, end);
        let ordinal = table.ordinal_at_offset(pos);
        drop(table);
        return AttachPoint {
            stream: shape.stream.clone(),
            shape: Some(shape.clone()),
            source: Source::Contiguous,
            pos,
            ordinal,
        };
    }
    AttachPoint {
        stream: base,
        source: Source::Filtered(Box::new(Walker::new(start, encoding, kinds, options))),
        shape,
        pos: start.offset(encoding),
        // Unused while walking: a walker counts the events of each run it finds.
        ordinal: start.seq,
    }
}

/// The shape for `key` with this client counted in it, or None (no room, or `peer` may not
/// create one now: the client walks). A shape retired between being found and being counted
/// is not used: the writer no longer feeds it, so its clients would starve silently.
fn counted_shape(
    hub: &Hub,
    key: &crate::subscription::ShapeKey,
    peer: std::net::IpAddr,
) -> Option<Arc<Shape>> {
    for _ in 0..RETIRED_SHAPE_RETRIES {
        let shape = hub
            .shapes
            .get_or_create(key, peer, || hub.index().next_seq())?;
        if shape.try_add_client() {
            return Some(shape);
        }
    }
    None
}

/// Moves a walking client onto its shape's log once its walk reaches the shape's start.
/// Returns false if that position is already being punched (the client must be kicked).
pub fn switch_to_shape(worker: usize, c: &mut Client) -> bool {
    let Source::Filtered(w) = &c.source else {
        return true;
    };
    let Some(shape) = &c.shape else { return true };
    if w.next.seq < shape.start_seq() {
        return true;
    }
    let end = shape.stream.end();
    let table = shape.table.read();
    let pos = table.offset_from_seq(w.next.seq, end);
    c.range.ordinal = table.ordinal_at_offset(pos);
    drop(table);
    c.stream = shape.stream.clone();
    c.source = Source::Contiguous;
    c.pos = pos;
    c.boundary = pos;
    c.stream.register_reader(worker, pos)
}

/// Where a client switching filters continues.
pub enum Switch {
    /// At this event: the first one it has not been sent.
    At(EventPos),
    /// Not known yet: the writer publishes an event's frames (base logs, then shape logs)
    /// before indexing it, so a live client may already have sent a frame whose event the
    /// index does not have; falling back to the index's end would send that event again. The
    /// window is the writer's append of one event (microseconds); the caller retries.
    Later,
    /// Its next event was dropped by retention: it must be kicked (continuing at the oldest
    /// retained event would skip events silently).
    BehindRetention,
}

/// Where a client switching filters continues (see [`Switch`]).
pub fn switch_point(hub: &Hub, c: &Client) -> Switch {
    // The index's end first, then the shape's table: every event below `next_seq` that the
    // shape carries is already in its table (the writer appends there before indexing).
    let next_seq = hub.index().next_seq();
    let seq = match (&c.source, &c.shape) {
        (Source::Filtered(w), _) => w.next.seq,
        (Source::Contiguous, Some(shape)) => {
            let table = shape.table.read();
            if table.last_seq_before(c.pos).is_some_and(|s| s >= next_seq) {
                return Switch::Later;
            }
            table.seq_at_offset(c.pos, next_seq)
        }
        (Source::Contiguous, None) => {
            let index = hub.index();
            match index.seq_at_offset(c.pos, c.encoding) {
                Some(seq) => seq,
                None if c.pos > index.end_pos().offset(c.encoding) => return Switch::Later,
                None if c.pos < index.start_pos().offset(c.encoding) => {
                    return Switch::BehindRetention;
                }
                None => index.next_seq(),
            }
        }
    };
    let index = hub.index();
    if seq < index.first_seq() {
        return Switch::BehindRetention;
    }
    Switch::At(index.pos_of(seq))
}

/// Applies new options from event position `next` (from [`switch_point`]). Returns false if
/// the new position is already being punched: the client fell behind retention.
pub fn apply_options(
    hub: &Hub,
    worker: usize,
    c: &mut Client,
    opts: SubscriberOptions,
    next: EventPos,
) -> bool {
    c.awaiting_hello = false;
    c.linger = super::client::Linger::Off;
    if let Some(old) = c.shape.take() {
        old.remove_client();
    }
    let point = attach_point(hub, c.peer.ip(), c.encoding, c.kinds, opts, next);
    c.stream = point.stream;
    c.shape = point.shape;
    c.source = point.source;
    c.pos = point.pos;
    c.boundary = point.pos;
    c.range.ordinal = point.ordinal;
    c.stream.register_reader(worker, c.pos)
}

/// Frames published so far in the stream a contiguous client reads, in that stream's own
/// numbering: the event sequence for a base log, the shape's frame count for a shape log.
/// Lock-free: one atomic load.
pub fn published_frames(hub: &Hub, c: &Client) -> u64 {
    match (&c.source, &c.shape) {
        (Source::Contiguous, Some(shape)) => shape.frames_appended(),
        _ => hub.appended_seq(),
    }
}
