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
use crate::index::{EventEntry, EventIndex, EventPos, kind_code, seek_data};
use crate::limits::{Limits, LimitsConfig};
use crate::listener::{Bound, Listener};
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

/// Opens the two base logs and the index in `dir`, verifying and repairing a torn tail.
pub fn recover(dir: &Path) -> anyhow::Result<(Stream, Stream, EventIndex)> {
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
    let plain_len = plain.metadata()?.len();
    let zstd_len = zstd.metadata()?.len();
    let plain_first = seek_data(&plain)?.unwrap_or(plain_len);
    let zstd_first = seek_data(&zstd)?.unwrap_or(zstd_len);
    let mut verify = |events: &[(EventPos, EventEntry)]| -> usize {
        events
            .iter()
            .position(|(pos, e)| !frame_ok(&plain, &zstd, pos, e))
            .unwrap_or(events.len())
    };
    let (mut index, recovery) = EventIndex::open(
        dir,
        plain_len,
        zstd_len,
        plain_first,
        zstd_first,
        &mut verify,
    )?;
    // Rebuild the newest chunk's running max of time_us from its frames.
    let end = index.end_pos();
    let tail_from = index.pos_of(end.seq - end.seq % crate::index::CHUNK_EVENTS);
    let mut times = Vec::new();
    index.walk(tail_from, usize::MAX, |pos, e| {
        if let Some(json) = read_plain(&plain, pos.plain_off, e.plain_len) {
            times.extend(crate::event::scan_time_us(&json));
        }
        true
    });
    index.set_tail_time_scan(&times);
    let start = index.start_pos();
    let end = index.end_pos();
    if recovery.dropped_records + recovery.invalid_tail_events > 0 || end.plain_off < plain_len {
        tracing::warn!(
            dropped_records = recovery.dropped_records,
            invalid_tail = recovery.invalid_tail_events,
            truncated_bytes =
                plain_len.saturating_sub(end.plain_off) + zstd_len.saturating_sub(end.zstd_off),
            "recovered a torn log tail"
        );
    }
    tracing::info!(
        events = recovery.events,
        first_seq = start.seq,
        next_seq = end.seq,
        "log recovered"
    );
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
    Ok((plain, zstd, index))
}

fn read_plain(plain: &std::fs::File, off: u64, len: u32) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    plain.read_exact_at(&mut buf, off).ok()?;
    let h = stored_header_len(&buf);
    Some(buf.split_off(h.min(buf.len())))
}

/// Checks one event's two frames against its index record.
fn frame_ok(plain: &std::fs::File, zstd: &std::fs::File, pos: &EventPos, e: &EventEntry) -> bool {
    let check = |f: &std::fs::File, off: u64, len: u32, opcode: Opcode| -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off).ok()?;
        let h = parse_header(&buf).ok()??;
        (h.opcode == opcode && h.fin && h.mask.is_none() && h.frame_len() == len as u64)
            .then(|| buf.split_off(h.header_len))
    };
    let Some(json) = check(plain, pos.plain_off, e.plain_len, Opcode::Text) else {
        return false;
    };
    if check(zstd, pos.zstd_off, e.zstd_len, Opcode::Binary).is_none() {
        return false;
    }
    match crate::event::parse_event(&json) {
        Ok(meta) => {
            crate::event::did_hash(&meta.did) == e.did_hash && kind_code(meta.kind) == e.kind
        }
        Err(_) => false,
    }
}

/// Dedup keys of the events appended within `window` of the newest time, for a seamless
/// upstream resume after a restart.
fn recent_keys(hub: &Hub, window: Duration) -> (Option<i64>, Vec<u64>) {
    let index = hub.index();
    let Some(max) = index.max_time_us() else {
        return (None, Vec::new());
    };
    let from = match index.cursor_chunk(max - window.as_micros() as i64) {
        Some((pos, _)) => pos,
        None => return (Some(max), Vec::new()),
    };
    let mut keys = Vec::new();
    index.walk(from, usize::MAX, |pos, e| {
        if let Some(json) = read_plain(hub.plain.file(), pos.plain_off, e.plain_len)
            && let Ok(meta) = crate::event::parse_event(&json)
        {
            keys.push(meta.dedup_key);
        }
        true
    });
    (Some(max), keys)
}

impl Relay {
    /// Recovers, binds and starts everything; returns once the relay is serving.
    pub fn start(settings: &Settings) -> anyhow::Result<Relay> {
        let (plain, zstd, index) = recover(&settings.data_dir)?;
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
        let mut follower = Follower::new(config);
        let (last_time, keys) = recent_keys(&hub, settings.rewind + Duration::from_secs(60));
        follower.resume_from(last_time, keys);
        let mut writer = LogWriter::new(hub.clone(), fanout.wakers())?;
        {
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("upstream".into())
                    .spawn(move || {
                        if let Err(e) = follower.run(&mut writer, &stop) {
                            tracing::error!(error = %format!("{e:#}"), "upstream follower stopped");
                        }
                    })?,
            );
        }
        {
            let hub = hub.clone();
            let stop = stop.clone();
            let policy = RetentionPolicy {
                max_age: settings.retention,
                max_disk: settings.max_disk,
            };
            threads.push(
                std::thread::Builder::new()
                    .name("retention".into())
                    .spawn(move || retention_loop(hub, policy, stop))?,
            );
        }
        let listener = Listener::new(hub.clone(), fanout.clone(), listeners, settings);
        threads.push(
            std::thread::Builder::new()
                .name("listener".into())
                .spawn(move || {
                    if let Err(e) = listener.run() {
                        tracing::error!(error = %e, "listener failed");
                    }
                })?,
        );
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
        let _ = self.hub.plain.sync();
        let _ = self.hub.zstd.sync();
        let _ = self.hub.index().sync();
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
