//! The relay's instruments: all asynchronous (observable), each a callback that reads the
//! hub's atomics when a reader collects. Nothing here runs on the data path, and a scrape costs
//! the same with one client or a hundred thousand.
//!
//! Names are OpenTelemetry-style (`jetrelay.events.delivered`, unit `{event}`); the Prometheus
//! endpoint shows them as `jetrelay_events_delivered_total` (see `prometheus.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;

use crate::encoding::Encoding;
use crate::fanout::Fanout;
use crate::hub::{Counters, Hub, LatencyHistogram, REFUSAL_STATUSES, ShapeClass};
use crate::index::now_us;
use crate::metrics::prometheus::FlatHistogram;
use crate::upstream::SkipReason;

/// The delivery latency histogram, exported as `.bucket` / `.sum` counters (see
/// [`FlatHistogram`]).
pub const DELIVERY_LATENCY: FlatHistogram = FlatHistogram {
    otel: "jetrelay.delivery.latency",
    prom: "jetrelay_delivery_latency_seconds",
};

/// Every flat histogram, for the Prometheus renderer.
pub const FLAT_HISTOGRAMS: [FlatHistogram; 1] = [DELIVERY_LATENCY];

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A counter that is one atomic of [`Counters`].
fn counter(
    meter: &Meter,
    hub: &Arc<Hub>,
    name: &'static str,
    unit: &'static str,
    help: &'static str,
    pick: fn(&Counters) -> &AtomicU64,
) {
    let hub = hub.clone();
    meter
        .u64_observable_counter(name)
        .with_unit(unit)
        .with_description(help)
        .with_callback(move |o| o.observe(load(pick(&hub.counters)), &[]))
        .build();
}

/// Registers every instrument on `meter`.
pub fn register(meter: &Meter, hub: &Arc<Hub>, fanout: &Weak<Fanout>) {
    register_clients(meter, hub, fanout);
    register_handshakes(meter, hub);
    register_delivery(meter, hub);
    register_upstream(meter, hub);
    register_log(meter, hub);
    register_workers(meter, hub);
    meter
        .u64_observable_gauge("jetrelay.build.info")
        .with_description("Always 1; the version is a label.")
        .with_callback(|o| o.observe(1, &[KeyValue::new("version", env!("CARGO_PKG_VERSION"))]))
        .build();
}

fn register_clients(meter: &Meter, hub: &Arc<Hub>, fanout: &Weak<Fanout>) {
    let h = hub.clone();
    meter
        .i64_observable_up_down_counter("jetrelay.clients")
        .with_unit("{client}")
        .with_description(
            "WebSocket clients connected, by subscription shape (at connect) and encoding \
             (wire v1 or v2, compressed or not).",
        )
        .with_callback(move |o| {
            for shape in ShapeClass::ALL {
                for enc in Encoding::ALL {
                    let n = load(&h.counters.clients_by_shape[shape.index(enc)]);
                    let labels = [
                        KeyValue::new("shape", shape.as_str()),
                        KeyValue::new("compress", enc.compressed()),
                        KeyValue::new("wire", if enc.v2() { "v2" } else { "v1" }),
                    ];
                    o.observe(n as i64, &labels);
                }
            }
        })
        .build();
    let f = fanout.clone();
    meter
        .i64_observable_up_down_counter("jetrelay.worker.clients")
        .with_unit("{client}")
        .with_description("WebSocket clients owned by each fan-out worker.")
        .with_callback(move |o| {
            let per_worker = f
                .upgrade()
                .map(|f| f.clients_per_worker())
                .unwrap_or_default();
            for (i, n) in per_worker.into_iter().enumerate() {
                o.observe(n as i64, &[KeyValue::new("worker", i as i64)]);
            }
        })
        .build();
    let h = hub.clone();
    meter
        .u64_observable_counter("jetrelay.clients.kicked")
        .with_unit("{client}")
        .with_description("Clients the relay disconnected, by reason.")
        .with_callback(move |o| {
            let c = &h.counters;
            for (reason, n) in [
                ("retention", &c.kicked_retention),
                ("unresponsive", &c.kicked_dead),
                ("protocol", &c.kicked_protocol),
            ] {
                o.observe(load(n), &[KeyValue::new("reason", reason)]);
            }
        })
        .build();
}

/// What a refusal status means, for the `reason` label.
fn refusal_reason(status: Option<u16>) -> &'static str {
    match status {
        Some(400) => "bad_request",
        Some(404) => "not_found",
        Some(405) => "method_not_allowed",
        Some(408) => "handshake_timeout",
        Some(426) => "websocket_version",
        Some(429) => "rate_limited",
        Some(431) => "request_too_large",
        Some(500) => "internal_error",
        Some(503) => "unavailable",
        Some(505) => "http_version",
        _ => "other",
    }
}

fn register_handshakes(meter: &Meter, hub: &Arc<Hub>) {
    counter(
        meter,
        hub,
        "jetrelay.handshakes.accepted",
        "{handshake}",
        "WebSocket upgrades accepted.",
        |c| &c.clients_accepted,
    );
    let h = hub.clone();
    meter
        .u64_observable_counter("jetrelay.handshakes.refused")
        .with_unit("{handshake}")
        .with_description(
            "Connections answered with an HTTP error instead of an upgrade, by status.",
        )
        .with_callback(move |o| {
            let statuses = REFUSAL_STATUSES.iter().map(|s| Some(*s)).chain([None]);
            for (status, n) in statuses.zip(&h.counters.refused_by_status) {
                let labels = [
                    KeyValue::new("reason", refusal_reason(status)),
                    KeyValue::new("status", status.map_or("other".into(), |s| s.to_string())),
                ];
                o.observe(load(n), &labels);
            }
        })
        .build();
    let h = hub.clone();
    meter
        .u64_observable_counter("jetrelay.limit.refusals")
        .with_unit("{handshake}")
        .with_description(
            "Connections refused by an abuse limit, by the setting that refused them.",
        )
        .with_callback(move |o| {
            let r = &h.limits.refusals;
            let c = &h.counters;
            for (limit, n) in [
                ("max_clients", &r.full),
                ("max_conns_per_ip", &r.per_ip),
                ("conn_rate_per_ip", &r.rate),
                ("max_handshakes_per_ip", &c.refused_handshakes_per_ip),
                ("max_handshakes", &c.refused_handshakes_full),
                ("cursor_scans_per_ip", &c.refused_cursor_scans_per_ip),
                ("cursor_scans", &c.refused_cursor_scans_full),
                ("cursor_scan_wait", &c.cursor_scans_expired),
                ("trusted_allow_ip", &c.refused_trusted_source),
                ("shape_rate_per_ip", &h.shapes.counters.refused_rate),
            ] {
                o.observe(load(n), &[KeyValue::new("limit", limit)]);
            }
            o.observe(
                h.filter_budget.refused(),
                &[KeyValue::new("limit", "max_filter_memory")],
            );
        })
        .build();
    counter(
        meter,
        hub,
        "jetrelay.handshakes.evicted",
        "{handshake}",
        "Handshakes in progress closed (503) to give their slot to an address holding fewer, \
         when every slot (--max-handshakes) was taken.",
        |c| &c.handshakes_evicted,
    );
    let h = hub.clone();
    meter
        .u64_observable_gauge("jetrelay.filter.memory")
        .with_unit("By")
        .with_description(
            "Bytes of clients' filter state charged to --max-filter-memory (wantedDids, \
             wantedCollections).",
        )
        .with_callback(move |o| o.observe(h.filter_budget.used(), &[]))
        .build();
    let h = hub.clone();
    meter
        .u64_observable_gauge("jetrelay.handshakes.pending")
        .with_unit("{handshake}")
        .with_description("Connections accepted that have not finished their handshake.")
        .with_callback(move |o| o.observe(load(&h.counters.handshakes_pending), &[]))
        .build();
}

fn register_delivery(meter: &Meter, hub: &Arc<Hub>) {
    counter(
        meter,
        hub,
        "jetrelay.events.delivered",
        "{event}",
        "Events handed to client sockets (counted per completed send range).",
        |c| &c.events_delivered,
    );
    counter(
        meter,
        hub,
        "jetrelay.delivered.bytes",
        "By",
        "Bytes handed to client sockets (frames included).",
        |c| &c.bytes_sent,
    );
    let h = hub.clone();
    meter
        .u64_observable_counter("jetrelay.delivery.latency.bucket")
        .with_unit("{send}")
        .with_description(
            "Time from an event's append to its send range being handed to the socket, \
             recorded once per completed range.",
        )
        .with_callback(move |o| {
            let snap = h.counters.delivery_latency.snapshot();
            let mut cumulative = 0;
            for (i, n) in snap.counts.iter().enumerate() {
                cumulative += n;
                let le =
                    LatencyHistogram::upper_bound_us(i).map_or(f64::INFINITY, |us| us as f64 / 1e6);
                o.observe(cumulative, &[KeyValue::new("le", le)]);
            }
        })
        .build();
    let h = hub.clone();
    meter
        .f64_observable_counter("jetrelay.delivery.latency.sum")
        .with_unit("s")
        .with_description("Sum of the delivery latencies.")
        .with_callback(move |o| {
            o.observe(
                h.counters.delivery_latency.snapshot().sum_us as f64 / 1e6,
                &[],
            )
        })
        .build();
}

fn register_upstream(meter: &Meter, hub: &Arc<Hub>) {
    counter(
        meter,
        hub,
        "jetrelay.upstream.events.appended",
        "{event}",
        "Upstream events appended to the log.",
        |c| &c.events_appended,
    );
    let h = hub.clone();
    meter
        .u64_observable_counter("jetrelay.upstream.messages.skipped")
        .with_unit("{message}")
        .with_description("Upstream messages not appended, by reason.")
        .with_callback(move |o| {
            for (reason, n) in SkipReason::ALL.iter().zip(&h.counters.upstream_skipped_by) {
                o.observe(load(n), &[KeyValue::new("reason", reason.as_str())]);
            }
        })
        .build();
    counter(
        meter,
        hub,
        "jetrelay.upstream.connects",
        "{connection}",
        "Upstream connections established (the first one included; reconnects = this - 1).",
        |c| &c.upstream_reconnects,
    );
    let h = hub.clone();
    meter
        .u64_observable_gauge("jetrelay.upstream.connected")
        .with_description("1 while an upstream connection is up.")
        .with_callback(move |o| o.observe(load(&h.counters.upstream_connected), &[]))
        .build();
    let h = hub.clone();
    meter
        .f64_observable_gauge("jetrelay.upstream.lag")
        .with_unit("s")
        .with_description(
            "Now minus the newest appended event's time_us (absent before the first).",
        )
        .with_callback(move |o| {
            if let Some(lag) = upstream_lag_seconds(&h) {
                o.observe(lag, &[]);
            }
        })
        .build();
}

/// Now − the newest appended `time_us`, in seconds; None before the first event.
pub fn upstream_lag_seconds(hub: &Hub) -> Option<f64> {
    let newest = load(&hub.counters.newest_time_us);
    (newest > 0).then(|| (now_us() as f64 - newest as f64) / 1e6)
}

fn register_log(meter: &Meter, hub: &Arc<Hub>) {
    let h = hub.clone();
    meter
        .i64_observable_up_down_counter("jetrelay.log.apparent")
        .with_unit("By")
        .with_description(
            "Apparent size of each base log (its end offset; punched holes included).",
        )
        .with_callback(move |o| {
            for enc in Encoding::ALL {
                let s = h.base(enc);
                o.observe(s.end() as i64, &[KeyValue::new("stream", enc.label())]);
            }
        })
        .build();
    let h = hub.clone();
    meter
        .i64_observable_up_down_counter("jetrelay.log.retained")
        .with_unit("By")
        .with_description("Bytes of each base log still served (end minus retention start).")
        .with_callback(move |o| {
            for enc in Encoding::ALL {
                let s = h.base(enc);
                let retained = s.end().saturating_sub(s.start());
                o.observe(retained as i64, &[KeyValue::new("stream", enc.label())]);
            }
        })
        .build();
    let h = hub.clone();
    meter
        .i64_observable_up_down_counter("jetrelay.log.allocated")
        .with_unit("By")
        .with_description(
            "Bytes allocated on disk by each log file and the index (--max-disk caps the base \
             logs and the index; --max-shape-disk the shapes).",
        )
        .with_callback(move |o| {
            // One fstat per file per collection; the index lock is held for a few reads.
            for enc in Encoding::ALL {
                o.observe(
                    h.base(enc).allocated_bytes() as i64,
                    &[KeyValue::new("stream", enc.label())],
                );
            }
            let index = h.index().allocated_bytes();
            o.observe(index as i64, &[KeyValue::new("stream", "index")]);
            let shapes = h.shapes.allocated_bytes();
            o.observe(shapes as i64, &[KeyValue::new("stream", "shapes")]);
        })
        .build();
    let h = hub.clone();
    meter
        .i64_observable_up_down_counter("jetrelay.shape.clients")
        .with_unit("{client}")
        .with_description(
            "Clients of each shared pre-filtered log (at most MAX_SHAPES series; a shape \
             without clients is dropped after a minute).",
        )
        .with_callback(move |o| {
            for shape in h.shapes.active() {
                let n = shape.client_count();
                o.observe(n as i64, &[KeyValue::new("shape", shape.label.clone())]);
            }
        })
        .build();
    let h = hub.clone();
    meter
        .u64_observable_counter("jetrelay.shapes.created")
        .with_unit("{shape}")
        .with_description("Shared pre-filtered logs created.")
        .with_callback(move |o| o.observe(load(&h.shapes.counters.created), &[]))
        .build();
    let h = hub.clone();
    meter
        .u64_observable_counter("jetrelay.shapes.refused")
        .with_unit("{shape}")
        .with_description(
            "Shape creations refused, by reason (the client is served by walking the base log).",
        )
        .with_callback(move |o| {
            let c = &h.shapes.counters;
            for (reason, n) in [
                ("shape_rate_per_ip", &c.refused_rate),
                ("max_shapes", &c.refused_full),
                ("max_shapes_per_ip", &c.refused_per_ip),
            ] {
                o.observe(load(n), &[KeyValue::new("reason", reason)]);
            }
        })
        .build();
    let h = hub.clone();
    meter
        .u64_observable_counter("jetrelay.shapes.trimmed")
        .with_unit("By")
        .with_description(
            "Shape log bytes punched because the shapes exceeded --max-shape-disk (not base \
             retention).",
        )
        .with_callback(move |o| o.observe(load(&h.shapes.counters.trimmed_bytes), &[]))
        .build();
    counter(
        meter,
        hub,
        "jetrelay.retention.punches",
        "{punch}",
        "Retention hole punches (one per dropped index chunk).",
        |c| &c.punches,
    );
    counter(
        meter,
        hub,
        "jetrelay.retention.punched.bytes",
        "By",
        "Bytes freed by retention hole punches.",
        |c| &c.punched_bytes,
    );
    counter(
        meter,
        hub,
        "jetrelay.log.append.errors",
        "{error}",
        "Failed attempts to append an event (a full disk, an I/O error); the event is retried \
         until it succeeds.",
        |c| &c.append_errors,
    );
    let h = hub.clone();
    meter
        .u64_observable_gauge("jetrelay.log.appends.failing")
        .with_description("1 while an event cannot be appended and is being retried.")
        .with_callback(move |o| o.observe(u64::from(h.storage.appends_failing()), &[]))
        .build();
    counter(
        meter,
        hub,
        "jetrelay.log.sync.errors",
        "{error}",
        "Failed syncs of the logs and the index to disk.",
        |c| &c.sync_errors,
    );
    let h = hub.clone();
    meter
        .u64_observable_gauge("jetrelay.parts.stuck")
        .with_description(
            "Critical threads (upstream, listener, retention, fan-out workers) without progress \
             for longer than the stuck threshold.",
        )
        .with_callback(move |o| o.observe(h.liveness.check().stuck.len() as u64, &[]))
        .build();
}

fn register_workers(meter: &Meter, hub: &Arc<Hub>) {
    counter(
        meter,
        hub,
        "jetrelay.splice.errors",
        "{error}",
        "Failed splices on the catch-up path (log → pipe → socket).",
        |c| &c.splice_errors,
    );
    counter(
        meter,
        hub,
        "jetrelay.ring.loops",
        "{loop}",
        "io_uring loop iterations across workers (one submit per iteration).",
        |c| &c.ring_loops,
    );
    counter(
        meter,
        hub,
        "jetrelay.ring.sqes",
        "{sqe}",
        "io_uring operations completed across workers; divided by loops: operations per syscall.",
        |c| &c.sqes,
    );
    counter(
        meter,
        hub,
        "jetrelay.fanout.sends",
        "{send}",
        "Data sends that moved bytes to a client (tail-ring SENDs and splices out of a pipe); bytes delivered / sends = bytes per send.",
        |c| &c.data_sends,
    );
    counter(
        meter,
        hub,
        "jetrelay.fanout.rounds",
        "{round}",
        "Live rounds started: each hands newly appended data to every up-to-date client.",
        |c| &c.rounds,
    );
    counter(
        meter,
        hub,
        "jetrelay.fanout.rounds.held",
        "{round}",
        "Rounds a busy worker held back (at most 10 ms, --fanout-duty) so that each send carries more events.",
        |c| &c.rounds_held,
    );
    counter(
        meter,
        hub,
        "jetrelay.fanout.sends.lingered",
        "{send}",
        "Ranges for filtered or compressed clients that a loaded worker held back (at most --thin-linger) so that the send carries more bytes.",
        |c| &c.lingered_sends,
    );
    counter(
        meter,
        hub,
        "jetrelay.fanout.linger.releases",
        "{release}",
        "Releases of a thin stream's lingering clients: all of a stream's held sends go out together (sends lingered ÷ releases = clients per release).",
        |c| &c.linger_releases,
    );
    counter(
        meter,
        hub,
        "jetrelay.fanout.did.wakes",
        "{wake}",
        "DID-filtered clients woken because a new event carries one of their DIDs (each new event is looked up once; a caught-up DID client costs nothing until then).",
        |c| &c.did_wakes,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_status_has_a_named_reason() {
        for s in REFUSAL_STATUSES {
            assert_ne!(refusal_reason(Some(s)), "other", "status {s}");
        }
        assert_eq!(refusal_reason(None), "other");
    }
}
