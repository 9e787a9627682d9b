//! The event writer and retention.
//!
//! The writer is the upstream follower's sink: for every accepted event it builds the two
//! frames clients will receive (the JSON as a text frame; the JSON compressed once with the
//! official dictionary as a binary frame), appends them to the two base logs, publishes them,
//! records the event in the index and wakes the fan-out workers. Nothing else ever touches a
//! payload.
//!
//! Retention runs on its own thread: once a second it drops whole index chunks that are older
//! than the retention age or that push the logs over the disk cap, after the readers still
//! positioned there have been kicked (with a close frame) by their workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::compress::EventCompressor;
use crate::event::{EventMeta, did_hash};
use crate::fanout::Waker;
use crate::frame::{MAX_HEADER_LEN, Opcode, write_server_header};
use crate::hub::{Counters, Hub};
use crate::index::{COLLECTION_NONE, EventEntry, kind_code, now_us};
use crate::upstream::{ConnectionState, EventSink, SkipReason};

/// Appends upstream events to the logs.
pub struct LogWriter {
    /// Shared state.
    hub: Arc<Hub>,
    /// zstd compressor with the dictionary loaded once.
    compressor: EventCompressor,
    /// Scratch for the plain frame.
    plain_frame: Vec<u8>,
    /// Scratch for the compressed payload.
    zstd_payload: Vec<u8>,
    /// Scratch for the compressed frame.
    zstd_frame: Vec<u8>,
    /// Workers to wake after each publish.
    wakers: Vec<Arc<Waker>>,
}

impl LogWriter {
    /// A writer appending at the hub's current end.
    pub fn new(hub: Arc<Hub>, wakers: Vec<Arc<Waker>>) -> anyhow::Result<LogWriter> {
        Ok(LogWriter {
            hub,
            compressor: EventCompressor::new()?,
            plain_frame: Vec::with_capacity(64 * 1024),
            zstd_payload: Vec::with_capacity(64 * 1024),
            zstd_frame: Vec::with_capacity(64 * 1024),
            wakers,
        })
    }

    /// Appends one validated event: frames, logs, publish, index, wake.
    pub fn append_event(&mut self, json: &[u8], meta: &EventMeta<'_>) -> anyhow::Result<()> {
        frame_into(Opcode::Text, json, &mut self.plain_frame);
        self.zstd_payload.clear();
        self.compressor.compress(json, &mut self.zstd_payload)?;
        frame_into(Opcode::Binary, &self.zstd_payload, &mut self.zstd_frame);

        let hub = &self.hub;
        let mut plain_end = hub.plain.end();
        let mut zstd_end = hub.zstd.end();
        hub.plain.append(&self.plain_frame, &mut plain_end)?;
        hub.zstd.append(&self.zstd_frame, &mut zstd_end)?;
        // Publish the bytes before the index entry: a filtered reader finds events through the
        // index and must never be pointed at bytes that are not visible yet.
        hub.plain.publish(plain_end);
        hub.zstd.publish(zstd_end);
        {
            // Shapes first, under the registry's read lock held until the index entry exists.
            let shapes = hub.shapes.lock();
            if !shapes.is_empty() {
                let seq = hub.index().next_seq();
                let plain_payload = json.len();
                let zstd_payload = self.zstd_payload.len();
                for shape in shapes.iter() {
                    let (frame, payload_len) = if shape.key.compress {
                        (&self.zstd_frame, zstd_payload)
                    } else {
                        (&self.plain_frame, plain_payload)
                    };
                    if shape.wants(meta, payload_len) {
                        crate::shapes::append_to_shape(shape, seq, frame)?;
                    }
                }
            }
            let mut index = hub.index_mut();
            let collection = match &meta.collection {
                Some(c) => index.collections.intern(c)?,
                None => COLLECTION_NONE,
            };
            let entry = EventEntry {
                plain_len: self.plain_frame.len() as u32,
                zstd_len: self.zstd_frame.len() as u32,
                did_hash: did_hash(&meta.did),
                collection,
                kind: kind_code(meta.kind),
                flags: 0,
            };
            index.append(entry, meta.time_us, now_us())?;
            drop(index);
            drop(shapes);
        }
        let c = &hub.counters;
        Counters::add(&c.events_appended, 1);
        let appended_us = now_us() as u64;
        c.last_append_us.store(appended_us, Ordering::Relaxed);
        c.newest_time_us
            .fetch_max(meta.time_us.max(0) as u64, Ordering::Relaxed);
        for w in &self.wakers {
            w.wake(appended_us);
        }
        Ok(())
    }
}

/// Writes a complete server frame (header + payload) into `out`.
fn frame_into(opcode: Opcode, payload: &[u8], out: &mut Vec<u8>) {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = write_server_header(opcode, payload.len() as u64, &mut header);
    out.clear();
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
}

impl EventSink for LogWriter {
    fn append(&mut self, json: &[u8], meta: &EventMeta<'_>) -> anyhow::Result<()> {
        self.append_event(json, meta)
    }

    fn skipped(&mut self, reason: SkipReason, detail: &str) {
        self.hub.counters.upstream_skip(reason);
        tracing::debug!(reason = reason.as_str(), detail, "upstream message skipped");
    }

    fn connection(&mut self, state: ConnectionState) {
        let c = &self.hub.counters;
        match state {
            ConnectionState::Connected { url } => {
                c.upstream_connected.store(1, Ordering::Relaxed);
                Counters::add(&c.upstream_reconnects, 1);
                tracing::info!(%url, "upstream connected");
            }
            ConnectionState::Disconnected { url, reason } => {
                c.upstream_connected.store(0, Ordering::Relaxed);
                tracing::warn!(%url, %reason, "upstream disconnected");
            }
            ConnectionState::Reconnecting { attempt, delay } => {
                tracing::info!(attempt, ?delay, "upstream reconnecting");
            }
        }
    }
}

/// Retention policy.
#[derive(Clone, Copy, Debug)]
pub struct RetentionPolicy {
    /// Events older than this (by append time) are dropped.
    pub max_age: Duration,
    /// Allocated bytes of logs + index above this are dropped, oldest first.
    pub max_disk: u64,
}

/// Drops what retention says can go; returns the chunks dropped. One pass; call periodically.
pub fn enforce_retention(hub: &Hub, policy: RetentionPolicy) -> std::io::Result<usize> {
    let mut dropped = 0;
    {
        let cutoff = now_us() - policy.max_age.as_micros() as i64;
        let index = hub.index();
        let allocated = hub.plain.allocated_bytes()
            + hub.zstd.allocated_bytes()
            + index.allocated_bytes()
            + hub.shapes.allocated_bytes();
        if let Some((p, z)) =
            index.retention_target(cutoff, allocated.saturating_sub(policy.max_disk))
        {
            // Readers still below are kicked by their workers (close frame 1008).
            hub.plain.request_kick(p);
            hub.zstd.request_kick(z);
        }
    }
    loop {
        let now = now_us();
        let index = hub.index();
        let Some(oldest) = index.oldest_chunk() else {
            break;
        };
        let too_old = oldest.appended_at_us < now - policy.max_age.as_micros() as i64;
        let allocated = hub.plain.allocated_bytes()
            + hub.zstd.allocated_bytes()
            + index.allocated_bytes()
            + hub.shapes.allocated_bytes();
        let too_big = allocated > policy.max_disk;
        if !(too_old || too_big) {
            break;
        }
        let (plain_next, zstd_next) = oldest.end_offsets();
        drop(index);
        // Punch only once no reader is left below.
        if hub.plain.lowest_reader() < plain_next || hub.zstd.lowest_reader() < zstd_next {
            break;
        }
        hub.index_mut().drop_oldest_chunk()?;
        let freed = hub.plain.punch_below(plain_next)? + hub.zstd.punch_below(zstd_next)?;
        Counters::add(&hub.counters.punches, 1);
        Counters::add(&hub.counters.punched_bytes, freed);
        dropped += 1;
    }
    // Shapes follow the base logs (a shape whose readers are still being kicked catches up on
    // a later pass).
    let first_seq = hub.index().first_seq();
    Counters::add(
        &hub.counters.punched_bytes,
        hub.shapes.drop_before(first_seq)?,
    );
    hub.shapes.retire_idle();
    Ok(dropped)
}

/// Runs retention once a second until `stop`.
pub fn retention_loop(hub: Arc<Hub>, policy: RetentionPolicy, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match enforce_retention(&hub, policy) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(chunks = n, "retention dropped old events"),
            Err(e) => tracing::error!(error = %e, "retention failed"),
        }
        // Keep data durable at a bounded cost: one fdatasync per file per second.
        let _ = hub.plain.sync();
        let _ = hub.zstd.sync();
        let _ = hub.index().sync();
        std::thread::sleep(Duration::from_secs(1));
    }
}
