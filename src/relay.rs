//! Wiring: recover the logs, start the fan-out workers, the listener, the writer (upstream
//! follower) and retention, report READY, and wind everything down on SIGTERM/SIGINT.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::config::{ListenAddr, Settings};
use crate::fanout::Fanout;
use crate::frame::{Opcode, parse_header};
use crate::hub::{Hub, stored_header_len};
use crate::index::{
    CollectionCheck, EventEntry, EventIndex, EventPos, LogExtent, Recovery, kind_code, seek_data,
};
use crate::limits::{Limits, LimitsConfig};
use crate::listener::{Bound, Listener};
use crate::liveness::spawn_critical;
use crate::log::Stream;
use crate::upstream::{Follower, UpstreamConfig};
use crate::writer::{LogWriter, RetentionPolicy, retention_loop};

/// Ring capacity of each base stream. Why 32 MiB: at the public feed's ~0.5 MB/s that is a
/// minute of history served from memory; older positions use splice from the page cache.
pub const BASE_RING_BYTES: usize = 32 << 20;

/// A running relay (for the binary and for in-process tests).
pub struct Relay {
    /// Shared state.
    pub hub: Arc<Hub>,
    /// Workers.
    fanout: Arc<Fanout>,
    /// Address of the public listener (TCP).
    pub local_addr: Option<std::net::SocketAddr>,
    /// Background threads to join at shutdown.
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Stops the follower and retention.
    stop: Arc<AtomicBool>,
    /// The embedded upstream of `--demo`.
    demo: Option<crate::mock::MockHandle>,
    /// Where to remove the trusted Unix socket at exit.
    unix_paths: Vec<std::path::PathBuf>,
    /// Metrics endpoint, health checks, dashboard and OTLP push.
    metrics: Option<crate::metrics::Metrics>,
}

/// Opens the two base logs and the index in `dir`, repairing whatever a crash left behind
/// (see [`EventIndex::open`]): the logs are cut to the last event the index holds and punched
/// below the first one it keeps.
pub fn recover(dir: &Path) -> anyhow::Result<(Stream, Stream, EventIndex, Recovery)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let open = |name: &str| -> anyhow::Result<std::fs::File> {
        let p = dir.join(name);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    };
    let plain = open("plain.log")?;
    let zstd = open("zstd.log")?;
    let extent = |f: &std::fs::File| -> anyhow::Result<LogExtent> {
        let len = f.metadata()?.len();
        Ok(LogExtent {
            len,
            first_data: seek_data(f)?.unwrap_or(len),
        })
    };
    let (plain_extent, zstd_extent) = (extent(&plain)?, extent(&zstd)?);
    let mut decompressor = crate::compress::EventDecompressor::new()?;
    let mut check = |pos: EventPos, e: &EventEntry, collection: CollectionCheck<'_>| {
        check_event(&plain, &zstd, &mut decompressor, pos, e, collection)
    };
    let (index, recovery) = EventIndex::open(dir, plain_extent, zstd_extent, &mut check)
        .with_context(|| format!("recovering the index in {}", dir.display()))?;
    let start = index.start_pos();
    let end = index.end_pos();
    let cut_bytes = plain_extent.len.saturating_sub(end.plain_off)
        + zstd_extent.len.saturating_sub(end.zstd_off);
    if recovery.repaired() || cut_bytes > 0 {
        tracing::warn!(
            dropped_records = recovery.dropped_records,
            invalid_tail = recovery.invalid_tail_events,
            rebuilt_headers = recovery.rebuilt_headers,
            discarded_events = recovery.discarded_events,
            unknown_collections = recovery.unknown_collections,
            collections_cut_bytes = recovery.collections_cut_bytes,
            truncated_bytes = cut_bytes,
            "recovered a torn log tail"
        );
    }
    tracing::info!(
        events = recovery.events,
        first_seq = start.seq,
        next_seq = end.seq,
        verified = recovery.verified_events,
        "log recovered"
    );
    // Bytes below the first retained event are not served: punch them (they are already,
    // unless recovery discarded a damaged prefix), so that the disk cap counts real data.
    punch_unindexed(&plain, start.plain_off, plain_extent.first_data)?;
    punch_unindexed(&zstd, start.zstd_off, zstd_extent.first_data)?;
    drop((plain, zstd));
    let plain = Stream::open(
        "plain",
        &dir.join("plain.log"),
        BASE_RING_BYTES,
        start.plain_off,
        end.plain_off,
    )?;
    let zstd = Stream::open(
        "zstd",
        &dir.join("zstd.log"),
        BASE_RING_BYTES,
        start.zstd_off,
        end.zstd_off,
    )?;
    Ok((plain, zstd, index, recovery))
}

/// Punches the whole blocks of `f` below `start` that still hold data.
fn punch_unindexed(f: &std::fs::File, start: u64, first_data: u64) -> anyhow::Result<()> {
    let aligned = start / crate::log::PUNCH_ALIGN * crate::log::PUNCH_ALIGN;
    if first_data < aligned {
        rustix::fs::fallocate(
            f,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            first_data,
            aligned - first_data,
        )
        .context("punching unindexed log bytes")?;
    }
    Ok(())
}

fn read_plain(plain: &std::fs::File, off: u64, len: u32) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    plain.read_exact_at(&mut buf, off).ok()?;
    let h = stored_header_len(&buf);
    Some(buf.split_off(h.min(buf.len())))
}

/// Recovery's check of one event: both frames complete and well-formed with the lengths of
/// the record, the compressed one decompressing to the plain one's JSON, and the JSON matching
/// the record (DID hash, kind, collection). Returns the event's `time_us`.
fn check_event(
    plain: &std::fs::File,
    zstd: &std::fs::File,
    decompressor: &mut crate::compress::EventDecompressor,
    pos: EventPos,
    e: &EventEntry,
    collection: CollectionCheck<'_>,
) -> Option<i64> {
    let read = |f: &std::fs::File, off: u64, len: u32, opcode: Opcode| -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off).ok()?;
        let h = parse_header(&buf).ok()??;
        (h.opcode == opcode && h.fin && h.mask.is_none() && h.frame_len() == len as u64)
            .then(|| buf.split_off(h.header_len))
    };
    let json = read(plain, pos.plain_off, e.plain_len, Opcode::Text)?;
    let compressed = read(zstd, pos.zstd_off, e.zstd_len, Opcode::Binary)?;
    if decompressor.decompress(&compressed, json.len()).ok()? != json {
        return None;
    }
    let meta = crate::event::parse_event(&json).ok()?;
    let collection_ok = match collection {
        CollectionCheck::Any => true,
        CollectionCheck::Absent => meta.collection.is_none(),
        CollectionCheck::Named(name) => meta.collection.as_deref() == Some(name),
    };
    (crate::event::did_hash(&meta.did) == e.did_hash
        && kind_code(meta.kind) == e.kind
        && collection_ok)
        .then_some(meta.time_us)
}

/// What the follower needs to resume seamlessly after a restart: the raw `time_us` of the last
/// events appended (for its clock) and `(time_us, dedup key)` of every event within `window`
/// of the newest (for its duplicate memory), in log order.
fn recent_events(hub: &Hub, window: Duration) -> (Vec<i64>, Vec<(i64, u64)>) {
    let index = hub.index();
    let Some(max) = index.max_time_us() else {
        return (Vec::new(), Vec::new());
    };
    let window_us = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
    let from = match index.cursor_chunk(max.saturating_sub(window_us)) {
        Some((pos, _)) => pos,
        None => return (Vec::new(), Vec::new()),
    };
    // The clock's events may reach further back than the window when the stream is slow.
    let clock_from = index.pos_of(
        index
            .next_seq()
            .saturating_sub(crate::clock::RECENT_EVENTS as u64)
            .min(from.seq),
    );
    let mut times = Vec::new();
    let mut keys = Vec::new();
    index.walk(clock_from, usize::MAX, |pos, e| {
        if let Some(json) = read_plain(hub.plain.file(), pos.plain_off, e.plain_len)
            && let Ok(meta) = crate::event::parse_event(&json)
        {
            times.push(meta.time_us);
            if pos.seq >= from.seq {
                keys.push((meta.time_us, meta.dedup_key));
            }
        }
        true
    });
    let keep = times.len().saturating_sub(crate::clock::RECENT_EVENTS);
    times.drain(..keep);
    (times, keys)
}

impl Relay {
    /// Recovers, binds and starts everything; returns once the relay is serving.
    pub fn start(settings: &Settings) -> anyhow::Result<Relay> {
        let (plain, zstd, index, _) = recover(&settings.data_dir)?;
        let limits = Limits::new(LimitsConfig {
            max_clients: settings.max_clients,
            max_conns_per_ip: settings.max_conns_per_ip,
            conn_rate_per_ip: settings.conn_rate_per_ip,
            allow: settings.allow_ip.clone(),
        });
        let shapes = crate::shapes::Shapes::new(settings.data_dir.join("shapes"))?;
        let hub = Arc::new(Hub::new(plain, zstd, index, limits, shapes));
        let fanout = Arc::new(Fanout::start(
            hub.clone(),
            settings.workers,
            crate::fanout::ClientPolicy {
                ping_interval: settings.ping_interval,
                max_inbound_rate: settings.max_inbound_rate,
                max_lag: settings.max_lag,
                duty: settings.fanout_duty,
                thin_linger: settings.thin_linger,
                thin_linger_load: settings.thin_linger_load,
                options_update_rate: settings.options_update_rate,
            },
        )?);

        let mut listeners = Vec::new();
        let public = Bound::bind(&settings.listen)
            .with_context(|| format!("binding --listen {}", settings.listen))?;
        let local_addr = public.local_addr();
        listeners.push((public, false));
        let mut unix_paths = Vec::new();
        if let Some(t) = &settings.trusted_listen {
            let b = Bound::bind(t).with_context(|| format!("binding --trusted-listen {t}"))?;
            if let ListenAddr::Unix(p) = t {
                unix_paths.push(p.clone());
            }
            listeners.push((b, true));
        }

        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();

        // Upstream: the demo's embedded simulator, or the configured instances.
        let mut demo = None;
        let urls = if settings.demo {
            let handle = crate::mock::spawn(crate::mock::MockConfig {
                listen: "127.0.0.1:0".parse()?,
                rate: settings.demo_rate,
                ..Default::default()
            })?;
            let url = format!("ws://{}/subscribe", handle.local_addr());
            demo = Some(handle);
            vec![url]
        } else {
            settings.upstreams.clone()
        };
        let mut config = UpstreamConfig::new(urls);
        config.rewind = settings.rewind;
        config.max_skew = settings.upstream_skew;
        let mut follower = Follower::new(config);
        let (times, keys) = recent_events(&hub, follower.dedup_window());
        follower.resume_from(times, keys);
        let mut writer = LogWriter::new(hub.clone(), fanout.wakers())?;
        {
            let stop = stop.clone();
            // The follower and the writer share this thread: the follower calls the writer for
            // every event.
            threads.push(spawn_critical(&hub.liveness, "upstream", move || {
                follower
                    .run(&mut writer, &stop)
                    .map_err(|e| format!("{e:#}"))
            })?);
        }
        {
            let hub = hub.clone();
            let stop = stop.clone();
            let policy = RetentionPolicy {
                max_age: settings.retention,
                max_disk: settings.max_disk,
            };
            let liveness = hub.liveness.clone();
            threads.push(spawn_critical(&liveness, "retention", move || {
                retention_loop(hub, policy, stop)
            })?);
        }
        let listener = Listener::new(hub.clone(), fanout.clone(), listeners, settings);
        threads.push(spawn_critical(&hub.liveness, "listener", move || {
            listener.run()
        })?);
        let metrics = if settings.metrics_listen.is_some() || settings.otlp_endpoint.is_some() {
            Some(crate::metrics::Metrics::start(
                hub.clone(),
                fanout.clone(),
                settings.metrics_listen,
                settings.otlp_endpoint.as_deref(),
                stop.clone(),
            )?)
        } else {
            None
        };
        tracing::info!(listen = %settings.listen, workers = settings.workers, "jetrelay serving");
        Ok(Relay {
            hub,
            fanout,
            local_addr,
            threads,
            stop,
            demo,
            unix_paths,
            metrics,
        })
    }

    /// Graceful stop: close frames to clients, threads joined, logs synced.
    pub fn shutdown(mut self) {
        // First: threads may end from now on without ending the process.
        self.hub.liveness.stop();
        self.hub.shutdown.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        // Workers are already sending close frames; the other threads notice within a second.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(m) = self.metrics.take() {
            m.shutdown();
        }
        if let Some(f) = Arc::get_mut(&mut self.fanout) {
            f.join();
        }
        if let Some(mut d) = self.demo.take() {
            d.stop();
        }
        match crate::writer::sync_logs(&self.hub) {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "final log sync failed: the newest events may not be on disk")
            }
        }
        for p in &self.unix_paths {
            let _ = std::fs::remove_file(p);
        }
        tracing::info!("jetrelay stopped");
    }

    /// Address of the metrics listener, if one is configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr())
    }

    /// Clients per worker (metrics, status line).
    pub fn clients_per_worker(&self) -> Vec<u64> {
        self.fanout.clients_per_worker()
    }
}
