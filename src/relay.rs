//! Wiring: recover the logs, start the fan-out workers, the listener, the writer (upstream
//! follower) and retention, report READY, and wind everything down on SIGTERM/SIGINT.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::config::{ListenAddr, Settings};
use crate::encoding::{ENCODINGS, Encoding};
use crate::event::EventKind;
use crate::fanout::Fanout;
use crate::frame::parse_header;
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

/// Version of the on-disk format (`format` in the data directory). 2: four base logs (v1 and
/// v2, plain and compressed), 32-byte event records, 64-byte chunk records, seqs.
pub const FORMAT_VERSION: u32 = 2;

/// Files of the data directory that depend on its format.
const FORMAT_FILES: [&str; 10] = [
    "plain.log",
    "zstd.log",
    "v2.log",
    "v2zstd.log",
    "events.idx",
    "chunks.idx",
    "durable.idx",
    "collections.txt",
    "seqs.idx",
    "seqs.reserve",
];

/// Makes sure `dir` holds the current format: an empty directory gets it; a directory of the
/// first format (two logs, no `format` file) is reset — the log is a cache of the upstream,
/// and rewriting gigabytes in another layout at startup would hold the relay down — with a
/// warning saying how much history went; any other format is refused, naming the file.
fn ensure_format(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("format");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let version: u32 = text
                .trim()
                .parse()
                .with_context(|| format!("{}: not a format version: {text:?}", path.display()))?;
            anyhow::ensure!(
                version == FORMAT_VERSION,
                "{} says format {version}; this jetrelay reads format {FORMAT_VERSION}: move                  the data directory aside (it is a cache of the upstream) or run the version                  that wrote it",
                path.display()
            );
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut old_bytes = 0;
    for name in FORMAT_FILES {
        let p = dir.join(name);
        if let Ok(m) = std::fs::metadata(&p) {
            old_bytes += m.len();
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    if old_bytes > 0 {
        tracing::warn!(
            dir = %dir.display(),
            bytes = old_bytes,
            "the data directory holds an older jetrelay's format: its history was discarded              (the relay resumes from the upstream)"
        );
    }
    std::fs::write(&path, format!("{FORMAT_VERSION}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The recovered base logs (by [`Encoding::index`]) and index.
pub struct Recovered {
    /// The base logs, opened at their recovered ends.
    pub streams: [Stream; ENCODINGS],
    /// The index.
    pub index: EventIndex,
    /// What recovery found and did.
    pub recovery: Recovery,
}

/// Opens the base logs and the index in `dir`, repairing whatever a crash left behind (see
/// [`EventIndex::open`]): the logs are cut to the last event the index holds and punched
/// below the first one it keeps.
pub fn recover(dir: &Path) -> anyhow::Result<Recovered> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    ensure_format(dir)?;
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
    let files: Vec<std::fs::File> = Encoding::ALL
        .iter()
        .map(|e| open(e.log_name()))
        .collect::<anyhow::Result<_>>()?;
    let extent = |f: &std::fs::File| -> anyhow::Result<LogExtent> {
        let len = f.metadata()?.len();
        Ok(LogExtent {
            len,
            first_data: seek_data(f)?.unwrap_or(len),
        })
    };
    let mut extents = [LogExtent::default(); ENCODINGS];
    for (x, f) in extents.iter_mut().zip(&files) {
        *x = extent(f)?;
    }
    let mut checker = EventChecker::new(&files)?;
    let mut check = |pos: EventPos, e: &EventEntry, collection: CollectionCheck<'_>| {
        checker.check(pos, e, collection)
    };
    let (index, recovery) = EventIndex::open(dir, extents, &mut check)
        .with_context(|| format!("recovering the index in {}", dir.display()))?;
    let start = index.start_pos();
    let end = index.end_pos();
    let cut_bytes: u64 = (0..ENCODINGS)
        .map(|i| extents[i].len.saturating_sub(end.offs[i]))
        .sum();
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
    if let Some(crate::seqs::Start::Unclean { skipped }) = recovery.seqs {
        tracing::info!(
            skipped_seqs = skipped,
            "unclean stop: seqs continue past every one that may have been published"
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
    for (i, f) in files.iter().enumerate() {
        punch_unindexed(f, start.offs[i], extents[i].first_data)?;
    }
    drop(files);
    let mut streams = Vec::with_capacity(ENCODINGS);
    for enc in Encoding::ALL {
        streams.push(Stream::open(
            enc.label(),
            &dir.join(enc.log_name()),
            BASE_RING_BYTES,
            start.offset(enc),
            end.offset(enc),
        )?);
    }
    let streams: [Stream; ENCODINGS] = streams
        .try_into()
        .map_err(|_| anyhow::anyhow!("one stream per encoding"))?;
    Ok(Recovered {
        streams,
        index,
        recovery,
    })
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

/// Recovery's check of one event: every frame complete and well-formed with the lengths of
/// the record, each compressed one decompressing to its plain one, the v2 message carrying the
/// same event as the v1 JSON, and the event matching the record (DID hash, kind, collection).
/// Returns the event's `time_us`.
struct EventChecker<'a> {
    /// The base logs, by [`Encoding::index`].
    files: &'a [std::fs::File],
    /// v1 dictionary.
    v1: crate::compress::EventDecompressor,
    /// v2 dictionary.
    v2: crate::compress::EventDecompressor,
}

impl<'a> EventChecker<'a> {
    fn new(files: &'a [std::fs::File]) -> anyhow::Result<EventChecker<'a>> {
        Ok(EventChecker {
            files,
            v1: crate::compress::EventDecompressor::new()?,
            v2: crate::compress::EventDecompressor::with_dictionary(
                crate::compress::Dictionary::V2,
            )?,
        })
    }

    fn read(&self, enc: Encoding, pos: EventPos, e: &EventEntry) -> Option<Vec<u8>> {
        let len = e.frame_len(enc);
        let mut buf = vec![0u8; len as usize];
        self.files[enc.index()]
            .read_exact_at(&mut buf, pos.offset(enc))
            .ok()?;
        let h = parse_header(&buf).ok()??;
        (h.opcode == enc.opcode() && h.fin && h.mask.is_none() && h.frame_len() == len)
            .then(|| buf.split_off(h.header_len))
    }

    fn check(
        &mut self,
        pos: EventPos,
        e: &EventEntry,
        collection: CollectionCheck<'_>,
    ) -> Option<i64> {
        let v2 = self.read(Encoding::V2Json, pos, e)?;
        let v2z = self.read(Encoding::V2Zstd, pos, e)?;
        if self.v2.decompress(&v2z, v2.len()).ok()? != v2 {
            return None;
        }
        let crate::wire::V2Frame::Event { event: parts, .. } =
            crate::wire::parse_v2_frame(&v2).ok()?
        else {
            return None;
        };
        let (did_hash, kind, coll, time_us) = if e.kind() == EventKind::Sync {
            let did: String = serde_json::from_slice(parts.did).ok()?;
            (
                crate::event::did_hash(&did),
                EventKind::Sync,
                None,
                parts.time_us,
            )
        } else {
            let json = self.read(Encoding::V1Json, pos, e)?;
            let compressed = self.read(Encoding::V1Zstd, pos, e)?;
            if self.v1.decompress(&compressed, json.len()).ok()? != json {
                return None;
            }
            let meta = crate::event::parse_event(&json).ok()?;
            if parts.kind().event_kind() != meta.kind {
                return None;
            }
            (
                crate::event::did_hash(&meta.did),
                meta.kind,
                meta.collection.map(|c| c.into_owned()),
                meta.time_us,
            )
        };
        let collection_ok = match collection {
            CollectionCheck::Any => true,
            CollectionCheck::Absent => coll.is_none(),
            CollectionCheck::Named(name) => coll.as_deref() == Some(name),
        };
        (did_hash == e.did_hash && kind_code(kind) == e.kind && collection_ok).then_some(time_us)
    }
}

/// The upstream seq of the newest event in the index (0: none, or its wire had none).
fn newest_upstream_seq(hub: &Hub) -> u64 {
    let index = hub.index();
    let next = index.next_seq();
    if next <= index.first_seq() {
        return 0;
    }
    let mut seq = 0;
    index.walk(index.pos_of(next - 1), 1, |_, e| {
        seq = e.upstream_seq;
        false
    });
    seq
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
        // A `#sync` has no v1 JSON: its key comes from its v2 message. A resume by time on a
        // v2 upstream (another URL than the checkpoint's) replays the ones in its overlap.
        if e.kind() == crate::event::EventKind::Sync {
            if pos.seq >= from.seq
                && let Some(v2) = read_plain(
                    hub.base(Encoding::V2Json).file(),
                    pos.offset(Encoding::V2Json),
                    e.frame_len(Encoding::V2Json) as u32,
                )
                && let Some(key) = crate::upstream::decode::sync_key(&v2)
            {
                keys.push(key);
            }
        } else if e.frame_len(Encoding::V1Json) > 0
            && let Some(json) = read_plain(
                hub.plain().file(),
                pos.offset(Encoding::V1Json),
                e.frame_len(Encoding::V1Json) as u32,
            )
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

/// Recovers the data directory and builds the hub with the settings' limits (per-address
/// limits, shapes, filter budget): what [`Relay::start`] serves from, and what tests and fuzz
/// targets that drive the writer directly open a directory with.
pub fn open_hub(settings: &Settings) -> anyhow::Result<(Arc<Hub>, Recovery)> {
    let Recovered {
        streams,
        index,
        recovery,
    } = recover(&settings.data_dir)?;
    let limits = Limits::new(LimitsConfig {
        max_clients: settings.max_clients,
        max_conns_per_ip: settings.max_conns_per_ip,
        conn_rate_per_ip: settings.conn_rate_per_ip,
        allow: settings.allow_ip.clone(),
    });
    let shapes = crate::shapes::Shapes::new(
        settings.data_dir.join("shapes"),
        crate::shapes::ShapeLimits {
            creations_per_minute: settings.shape_rate_per_ip,
            max_per_ip: settings.max_shapes_per_ip,
            allow: settings.allow_ip.clone(),
            max_disk: settings.max_shape_disk,
        },
    )?;
    let hub = Arc::new(Hub::new(
        streams,
        index,
        limits,
        shapes,
        crate::filter_budget::FilterBudget::new(
            settings.max_filter_memory,
            settings.max_filter_memory_per_ip,
            settings.allow_ip.clone(),
        ),
    ));
    Ok((hub, recovery))
}

impl Relay {
    /// Recovers, binds and starts everything; returns once the relay is serving.
    pub fn start(settings: &Settings) -> anyhow::Result<Relay> {
        let (hub, _) = open_hub(settings)?;
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
        // The restart checkpoint: the URL whose session appended the newest event, and that
        // event's upstream seq (exact resume when that URL is still configured).
        let url_file = crate::upstream::UrlFile::open(&settings.data_dir);
        let checkpoint = url_file.checkpoint(newest_upstream_seq(&hub));
        let has_events = {
            let index = hub.index();
            index.next_seq() > index.first_seq()
        };
        if checkpoint.is_none() && has_events {
            tracing::info!(
                url = url_file.recorded(),
                "restart: no upstream seq to resume from (the newest event's wire had none, or \
                 no upstream URL recorded): resuming by time"
            );
        }
        follower.resume_from(times, keys, checkpoint);
        let mut writer = LogWriter::new(
            hub.clone(),
            fanout.wakers(),
            crate::writer::WriterOptions {
                v1_cursor_field: settings.v1_cursor_field,
            },
        )?
        .with_url_file(url_file);
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
            // Everything is on disk: the next start continues the seqs without a gap.
            Ok(()) => {
                if let Err(e) = self.hub.index().seqs.mark_clean() {
                    tracing::warn!(error = %e, "could not mark the shutdown clean: the next start skips seqs");
                }
            }
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
