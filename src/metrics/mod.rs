//! Observability: metrics through the OpenTelemetry SDK, health checks and a live dashboard,
//! served on the `--metrics-listen` listener.
//!
//! The relay's numbers live in the hub as Relaxed atomics, bumped where the work already
//! happens. Nothing here adds to that path: every instrument is asynchronous, a callback that
//! reads the atomics when a reader collects ([`instruments`]). One `SdkMeterProvider` has up
//! to two readers:
//! - a `ManualReader`, collected on each `GET /metrics` and rendered as Prometheus text
//!   ([`prometheus`]);
//! - with `--otlp-endpoint`, a `PeriodicReader` pushing OTLP http/protobuf from the SDK's own
//!   thread ([`otlp`]).
//!
//! Routes: `GET /metrics`, `GET /healthz` (alive), `GET /readyz` (no critical thread stuck,
//! appends and syncs succeeding, upstream connected, an event appended recently, log
//! writable), `GET /` (the dashboard, one self-contained HTML page) and `GET /api/stats` (the
//! JSON the dashboard polls every second, read straight from the atomics). The server
//! ([`http`]) is one thread polling every connection, with a bounded table, a per-address
//! share of it and a deadline per connection, so that idle or slow peers cannot keep
//! `/readyz` from answering a load balancer. It accepts HTTP/1.0 too.

pub mod http;
pub mod instruments;
pub mod otlp;
pub mod prometheus;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};

use crate::fanout::Fanout;
use crate::handshake::{self, HttpError};
use crate::hub::{Hub, LatencyHistogram, ShapeClass};
use crate::index::now_us;

/// Why 30 s: the real firehose carries hundreds of events a second and the demo at least
/// one; half a minute without an append means the upstream is stuck even if its socket is up.
pub const READY_MAX_APPEND_AGE: Duration = Duration::from_secs(30);
/// Why 64 MiB: under that the next few seconds of the firehose (and the index) may not fit
/// before retention frees space; better to be taken out of rotation than to fail appends.
pub const READY_MIN_FREE_BYTES: u64 = 64 << 20;

/// The dashboard: one HTML file with inline CSS and JS, no external resources.
const DASHBOARD_HTML: &str = include_str!("../../assets/dashboard.html");

/// Why the metrics side could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listener could not be bound.
    #[error("binding --metrics-listen {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The OTLP exporter rejected its configuration.
    #[error("OTLP exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A thread could not be spawned.
    #[error("spawning the metrics thread: {0}")]
    Spawn(std::io::Error),
}

/// A `MetricReader` that the server keeps a handle on while the provider owns it (the SDK
/// takes readers by value).
#[derive(Debug)]
pub(crate) struct SharedReader(pub(crate) Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// What request handlers share.
struct Shared {
    /// The relay's counters and logs.
    hub: Arc<Hub>,
    /// For clients per worker. Weak: the relay must get the workers back to join them at
    /// shutdown, even if a request is still in flight.
    fanout: Weak<Fanout>,
    /// Collected on each scrape.
    prometheus: Arc<ManualReader>,
    /// For the dashboard's uptime.
    started: Instant,
}

/// The running metrics side of the relay.
pub struct Metrics {
    /// Owns the readers; shut down last so OTLP gets a final export.
    provider: SdkMeterProvider,
    /// The accept loop, if a listener was configured.
    thread: Option<std::thread::JoinHandle<()>>,
    /// The bound listener address (port 0 resolved).
    local_addr: Option<SocketAddr>,
}

impl Metrics {
    /// Registers the instruments, binds `listen` (if any) and starts serving; with `otlp`,
    /// also starts pushing there. Serving stops once `stop` is set.
    pub fn start(
        hub: Arc<Hub>,
        fanout: Arc<Fanout>,
        listen: Option<SocketAddr>,
        otlp: Option<&str>,
        stop: Arc<AtomicBool>,
    ) -> Result<Metrics, MetricsError> {
        let prometheus = Arc::new(ManualReader::default());
        let mut builder = SdkMeterProvider::builder().with_reader(SharedReader(prometheus.clone()));
        if let Some(endpoint) = otlp {
            builder = builder.with_reader(otlp::periodic_reader(endpoint)?);
            tracing::info!(%endpoint, "pushing metrics over OTLP");
        }
        let provider = builder.build();
        let fanout = Arc::downgrade(&fanout);
        instruments::register(&provider.meter("jetrelay"), &hub, &fanout);
        let mut metrics = Metrics {
            provider,
            thread: None,
            local_addr: None,
        };
        let Some(addr) = listen else {
            return Ok(metrics);
        };
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
        let bind_err = |source| MetricsError::Bind { addr, source };
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let shared = Arc::new(Shared {
            hub,
            fanout,
            prometheus,
            started: Instant::now(),
        });
        // A critical part: a dead or wedged metrics thread would leave `/readyz` unanswered
        // (a load balancer takes the relay out) with nothing saying why.
        let liveness = shared.hub.liveness.clone();
        let thread = crate::liveness::spawn_critical(&liveness, "metrics", move || {
            http::serve(listener, stop, |method, path| route(method, path, &shared));
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(MetricsError::Spawn)?;
        tracing::info!(addr = %local, "metrics, health and dashboard serving");
        metrics.thread = Some(thread);
        metrics.local_addr = Some(local);
        Ok(metrics)
    }

    /// Address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Waits for the accept loop (after `stop` was set) and flushes a final OTLP export.
    pub fn shutdown(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "metrics provider shutdown");
        }
    }
}

/// The response for one request.
fn route(method: &str, path: &str, shared: &Shared) -> Vec<u8> {
    if method != "GET" {
        return HttpError::new(405, "only GET is served here")
            .with_header("Allow", "GET".into())
            .to_response();
    }
    match path {
        "/metrics" => {
            let mut rm = ResourceMetrics::default();
            if let Err(e) = shared.prometheus.collect(&mut rm) {
                return HttpError::new(500, format!("collecting metrics: {e}")).to_response();
            }
            let mut text = String::with_capacity(16 * 1024);
            prometheus::render(&rm, &instruments::FLAT_HISTOGRAMS, &mut text);
            handshake::simple_response(200, prometheus::CONTENT_TYPE, text.as_bytes())
        }
        "/healthz" => handshake::simple_response(200, "text/plain; charset=utf-8", b"ok\n"),
        "/readyz" => match readiness(&shared.hub) {
            Ok(()) => handshake::simple_response(200, "text/plain; charset=utf-8", b"ready\n"),
            Err(why) => HttpError::new(503, format!("not ready: {why}")).to_response(),
        },
        "/" | "/index.html" => {
            handshake::simple_response(200, "text/html; charset=utf-8", DASHBOARD_HTML.as_bytes())
        }
        "/api/stats" => {
            let body = stats_json(shared).to_string();
            handshake::simple_response(200, "application/json", body.as_bytes())
        }
        _ => HttpError::new(404, format!("no such path: {path}")).to_response(),
    }
}

/// Whether the relay should receive traffic, or why not.
pub fn readiness(hub: &Hub) -> Result<(), String> {
    // A stuck part or failing storage first: they explain the symptoms checked below.
    if let Some(why) = hub.liveness.check().problem() {
        return Err(why);
    }
    if let Some(why) = hub.storage.problem() {
        return Err(why);
    }
    let c = &hub.counters;
    let disk = rustix::fs::fstatvfs(hub.plain().file())
        .map(|s| Disk {
            read_only: s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY),
            free_bytes: s.f_bavail.saturating_mul(s.f_frsize),
        })
        .map_err(|e| e.to_string());
    ready_verdict(
        c.upstream_connected.load(Ordering::Relaxed) == 1,
        c.last_append_us.load(Ordering::Relaxed),
        now_us().max(0) as u64,
        disk,
    )
}

/// The log filesystem, as readiness sees it.
#[derive(Clone, Copy, Debug)]
pub struct Disk {
    /// Mounted read-only.
    pub read_only: bool,
    /// Bytes an unprivileged writer may still use.
    pub free_bytes: u64,
}

/// The readiness rule, without I/O.
pub fn ready_verdict(
    upstream_connected: bool,
    last_append_us: u64,
    now_us: u64,
    disk: Result<Disk, String>,
) -> Result<(), String> {
    if !upstream_connected {
        return Err("upstream not connected".into());
    }
    if last_append_us == 0 {
        return Err("no event appended yet".into());
    }
    let age = Duration::from_micros(now_us.saturating_sub(last_append_us));
    if age > READY_MAX_APPEND_AGE {
        return Err(format!(
            "last event appended {}s ago (limit {}s)",
            age.as_secs(),
            READY_MAX_APPEND_AGE.as_secs()
        ));
    }
    match disk {
        Err(e) => Err(format!("log filesystem unreadable: {e}")),
        Ok(d) if d.read_only => Err("log filesystem is read-only".into()),
        Ok(d) if d.free_bytes < READY_MIN_FREE_BYTES => Err(format!(
            "log filesystem nearly full ({} MiB free)",
            d.free_bytes >> 20
        )),
        Ok(_) => Ok(()),
    }
}

/// The dashboard's poll: cumulative numbers (the page turns them into rates) and gauges.
fn stats_json(shared: &Shared) -> serde_json::Value {
    let hub = &shared.hub;
    let c = &hub.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let latency = c.delivery_latency.snapshot();
    let bounds: Vec<u64> = (0..latency.counts.len())
        .filter_map(LatencyHistogram::upper_bound_us)
        .collect();
    let shapes: serde_json::Map<String, serde_json::Value> = ShapeClass::ALL
        .iter()
        .map(|s| {
            let n: u64 = crate::encoding::Encoding::ALL
                .iter()
                .map(|&e| load(&c.clients_by_shape[s.index(e)]))
                .sum();
            (s.as_str().to_owned(), n.into())
        })
        .collect();
    let ready = readiness(hub);
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": shared.started.elapsed().as_secs_f64(),
        "clients": load(&c.clients),
        "clients_by_worker": shared.fanout.upgrade().map(|f| f.clients_per_worker()).unwrap_or_default(),
        "clients_by_shape": shapes,
        "events_appended": load(&c.events_appended),
        "events_delivered": load(&c.events_delivered),
        "bytes_delivered": load(&c.bytes_sent),
        "data_sends": load(&c.data_sends),
        "upstream_connected": load(&c.upstream_connected) == 1,
        "upstream_lag_s": instruments::upstream_lag_seconds(hub),
        "latency_bounds_us": bounds,
        "latency_counts": latency.counts.to_vec(),
        "ready": ready.is_ok(),
        "not_ready_reason": ready.err(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000_000;

    fn disk(free_mib: u64) -> Result<Disk, String> {
        Ok(Disk {
            read_only: false,
            free_bytes: free_mib << 20,
        })
    }

    #[test]
    fn readiness_rule() {
        assert_eq!(
            ready_verdict(true, NOW - 1_000_000, NOW, disk(1024)),
            Ok(())
        );
        let e = ready_verdict(false, NOW, NOW, disk(1024)).unwrap_err();
        assert!(e.contains("upstream not connected"), "{e}");
        let e = ready_verdict(true, 0, NOW, disk(1024)).unwrap_err();
        assert!(e.contains("no event"), "{e}");
        let stale = NOW - READY_MAX_APPEND_AGE.as_micros() as u64 - 1_000_000;
        let e = ready_verdict(true, stale, NOW, disk(1024)).unwrap_err();
        assert!(e.contains("31s ago"), "{e}");
        let e = ready_verdict(true, NOW, NOW, disk(10)).unwrap_err();
        assert!(e.contains("nearly full (10 MiB free)"), "{e}");
        let ro = Ok(Disk {
            read_only: true,
            free_bytes: u64::MAX,
        });
        assert!(
            ready_verdict(true, NOW, NOW, ro)
                .unwrap_err()
                .contains("read-only")
        );
        // A clock step backwards is not staleness.
        assert_eq!(
            ready_verdict(true, NOW + 5_000_000, NOW, disk(1024)),
            Ok(())
        );
    }

    #[test]
    fn dashboard_is_self_contained() {
        for external in ["src=\"http", "href=\"http", "@import", "//cdn", "src=\"//"] {
            assert!(
                !DASHBOARD_HTML.contains(external),
                "dashboard references {external}"
            );
        }
        assert!(DASHBOARD_HTML.contains("/api/stats"));
        assert!(DASHBOARD_HTML.contains("name=\"viewport\""));
    }
}
