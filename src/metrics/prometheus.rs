//! Prometheus text exposition (format 0.0.4) of what the SDK's `ManualReader` collected.
//!
//! Rendered here rather than with `opentelemetry-prometheus`, which the OpenTelemetry project
//! itself steers away from (it points new users at OTLP) and which would pull in the
//! `prometheus` crate and its registry just to format a few dozen lines.
//!
//! Names follow the OpenTelemetry → Prometheus compatibility rules, the same ones Prometheus
//! applies to OTLP it ingests, so a series has one name whichever way it travelled: `.` → `_`,
//! the unit as a suffix (`By` → `_bytes`, `s` → `_seconds`, annotations like `{event}`
//! dropped), and `_total` on monotonic sums.

use std::fmt::Write as _;

use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};

/// The content type Prometheus expects for the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A histogram kept outside the SDK (the SDK has no asynchronous histogram instrument) and
/// exported as two observable counters: `<otel>.bucket` with a cumulative count per `le`
/// attribute, and `<otel>.sum`. Rendered here as one Prometheus histogram family.
pub struct FlatHistogram {
    /// OpenTelemetry name prefix of the two counters.
    pub otel: &'static str,
    /// Prometheus family name (with its unit suffix).
    pub prom: &'static str,
}

/// Renders every metric in `rm`, appending to `out`.
pub fn render(rm: &ResourceMetrics, flat: &[FlatHistogram], out: &mut String) {
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            match flat.iter().find(|f| metric.name().starts_with(f.otel)) {
                Some(f) if metric.name().strip_prefix(f.otel) == Some(".bucket") => {
                    let sum = scope
                        .metrics()
                        .find(|m| m.name().strip_prefix(f.otel) == Some(".sum"));
                    render_flat_histogram(f.prom, metric, sum, out);
                }
                // The `.sum` half is rendered with its `.bucket` half.
                Some(_) => {}
                None => render_metric(metric, out),
            }
        }
    }
}

/// One family: HELP, TYPE and its samples.
fn render_metric(metric: &Metric, out: &mut String) {
    let (kind, samples) = match metric.data() {
        AggregatedMetrics::U64(d) => samples(d),
        AggregatedMetrics::I64(d) => samples(d),
        AggregatedMetrics::F64(d) => samples(d),
    };
    // SDK histograms and exponential histograms are not used by the relay.
    let Some(kind) = kind else { return };
    let name = prom_name(metric.name(), metric.unit(), kind == "counter");
    header(&name, metric.description(), kind, out);
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// (Prometheus type, sorted samples as (label set, value)) of one metric's data.
fn samples<T: PromValue>(data: &MetricData<T>) -> (Option<&'static str>, Vec<(String, String)>) {
    let (kind, mut samples): (_, Vec<_>) = match data {
        MetricData::Sum(s) => (
            if s.is_monotonic() { "counter" } else { "gauge" },
            s.data_points()
                .map(|p| (labels(p.attributes(), None), p.value().prom()))
                .collect(),
        ),
        MetricData::Gauge(g) => (
            "gauge",
            g.data_points()
                .map(|p| (labels(p.attributes(), None), p.value().prom()))
                .collect(),
        ),
        MetricData::Histogram(_) | MetricData::ExponentialHistogram(_) => {
            return (None, Vec::new());
        }
    };
    // The SDK hands points over in hash order; sorted output diffs and greps well.
    samples.sort();
    (Some(kind), samples)
}

fn render_flat_histogram(name: &str, buckets: &Metric, sum: Option<&Metric>, out: &mut String) {
    let AggregatedMetrics::U64(MetricData::Sum(b)) = buckets.data() else {
        return;
    };
    // Group points by their labels other than `le`; one histogram per group.
    let mut groups: Vec<(String, Vec<(f64, u64)>)> = Vec::new();
    for p in b.data_points() {
        let Some(le) = p.attributes().find(|kv| kv.key.as_str() == "le") else {
            continue;
        };
        let bound = match &le.value {
            Value::F64(v) => *v,
            _ => continue,
        };
        let rest = labels(p.attributes(), Some("le"));
        match groups.iter_mut().find(|(l, _)| *l == rest) {
            Some((_, points)) => points.push((bound, p.value())),
            None => groups.push((rest, vec![(bound, p.value())])),
        }
    }
    let sums: Vec<(String, f64)> = match sum.map(|m| m.data()) {
        Some(AggregatedMetrics::F64(MetricData::Sum(s))) => s
            .data_points()
            .map(|p| (labels(p.attributes(), None), p.value()))
            .collect(),
        _ => Vec::new(),
    };
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    header(name, buckets.description(), "histogram", out);
    for (group, mut points) in groups {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let inner = group.trim_start_matches('{').trim_end_matches('}');
        let sep = if inner.is_empty() { "" } else { "," };
        for (bound, count) in &points {
            let _ = writeln!(
                out,
                "{name}_bucket{{{inner}{sep}le=\"{}\"}} {count}",
                bound.prom()
            );
        }
        // +Inf is the last bucket, so it is also the count (Prometheus requires they agree).
        let count = points.last().map_or(0, |p| p.1);
        let sum = sums.iter().find(|(l, _)| *l == group).map_or(0.0, |s| s.1);
        let _ = writeln!(out, "{name}_sum{group} {}", sum.prom());
        let _ = writeln!(out, "{name}_count{group} {count}");
    }
}

fn header(name: &str, help: &str, kind: &str, out: &mut String) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The Prometheus name of an OpenTelemetry instrument (see the module doc).
pub fn prom_name(name: &str, unit: &str, counter: bool) -> String {
    let mut n = sanitize(name);
    let suffix = match unit {
        "By" => Some("bytes"),
        "s" => Some("seconds"),
        "ms" => Some("milliseconds"),
        // `1` (ratios), `{annotations}` and no unit at all add nothing.
        _ => None,
    };
    if let Some(s) = suffix
        && !n.ends_with(&format!("_{s}"))
    {
        n.push('_');
        n.push_str(s);
    }
    if counter && !n.ends_with("_total") {
        n.push_str("_total");
    }
    n
}

/// Metric and label names may only hold `[a-zA-Z0-9_:]` and not start with a digit.
fn sanitize(name: &str) -> String {
    let mut n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if n.starts_with(|c: char| c.is_ascii_digit()) {
        n.insert(0, '_');
    }
    n
}

/// `{a="x",b="y"}` sorted by key, or "" when there are none; `skip` leaves one key out.
fn labels<'a>(attrs: impl Iterator<Item = &'a KeyValue>, skip: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = attrs
        .filter(|kv| Some(kv.key.as_str()) != skip)
        .map(|kv| {
            let value = match &kv.value {
                Value::F64(v) => v.prom(),
                other => other.as_str().into_owned(),
            };
            (sanitize(kv.key.as_str()), escape_label(&value))
        })
        .collect();
    if pairs.is_empty() {
        return String::new();
    }
    pairs.sort();
    let body: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{{{}}}", body.join(","))
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// How a sample value is written.
trait PromValue: Copy {
    fn prom(self) -> String;
}

impl PromValue for u64 {
    fn prom(self) -> String {
        self.to_string()
    }
}

impl PromValue for i64 {
    fn prom(self) -> String {
        self.to_string()
    }
}

impl PromValue for f64 {
    fn prom(self) -> String {
        if self.is_nan() {
            "NaN".into()
        } else if self.is_infinite() {
            if self > 0.0 {
                "+Inf".into()
            } else {
                "-Inf".into()
            }
        } else {
            // Rust's shortest round-trip form, never an exponent: valid Prometheus floats.
            self.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::reader::MetricReader;
    use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};
    use std::sync::Arc;

    use crate::metrics::SharedReader as Shared;

    #[test]
    fn names_follow_the_otel_prometheus_rules() {
        assert_eq!(
            prom_name("jetrelay.events.delivered", "{event}", true),
            "jetrelay_events_delivered_total"
        );
        assert_eq!(
            prom_name("jetrelay.delivered.bytes", "By", true),
            "jetrelay_delivered_bytes_total"
        );
        assert_eq!(
            prom_name("jetrelay.upstream.lag", "s", false),
            "jetrelay_upstream_lag_seconds"
        );
        assert_eq!(
            prom_name("jetrelay.log.allocated", "By", false),
            "jetrelay_log_allocated_bytes"
        );
        assert_eq!(prom_name("9lives-x", "", false), "_9lives_x");
        assert_eq!(12.5f64.prom(), "12.5");
        assert_eq!(0.000001f64.prom(), "0.000001");
        assert_eq!(f64::INFINITY.prom(), "+Inf");
    }

    #[test]
    fn renders_counters_gauges_and_a_flat_histogram() {
        let reader = Arc::new(ManualReader::default());
        let provider = SdkMeterProvider::builder()
            .with_reader(Shared(reader.clone()))
            .build();
        let meter = provider.meter("test");
        meter
            .u64_observable_counter("demo.sent.bytes")
            .with_unit("By")
            .with_description("Bytes sent.\nAll of them.")
            .with_callback(|o| o.observe(42, &[]))
            .build();
        meter
            .i64_observable_up_down_counter("demo.clients")
            .with_unit("{client}")
            .with_description("Clients.")
            .with_callback(|o| {
                o.observe(
                    3,
                    &[
                        KeyValue::new("shape", "all"),
                        KeyValue::new("compress", false),
                    ],
                );
                o.observe(
                    1,
                    &[
                        KeyValue::new("shape", "dids"),
                        KeyValue::new("compress", true),
                    ],
                );
            })
            .build();
        meter
            .f64_observable_gauge("demo.lag")
            .with_unit("s")
            .with_description("Lag.")
            .with_callback(|o| o.observe(0.25, &[KeyValue::new("q", "a\"b")]))
            .build();
        meter
            .u64_observable_counter("demo.latency.bucket")
            .with_description("Latency.")
            .with_callback(|o| {
                o.observe(5, &[KeyValue::new("le", 0.001)]);
                o.observe(7, &[KeyValue::new("le", f64::INFINITY)]);
                o.observe(2, &[KeyValue::new("le", 0.000001)]);
            })
            .build();
        meter
            .f64_observable_counter("demo.latency.sum")
            .with_unit("s")
            .with_callback(|o| o.observe(1.5, &[]))
            .build();
        let mut rm = ResourceMetrics::default();
        reader.collect(&mut rm).unwrap();
        let mut text = String::new();
        let flat = [FlatHistogram {
            otel: "demo.latency",
            prom: "demo_latency_seconds",
        }];
        render(&rm, &flat, &mut text);
        let expected = [
            "# HELP demo_sent_bytes_total Bytes sent.\\nAll of them.",
            "# TYPE demo_sent_bytes_total counter",
            "demo_sent_bytes_total 42",
            "# HELP demo_clients Clients.",
            "# TYPE demo_clients gauge",
            "demo_clients{compress=\"false\",shape=\"all\"} 3",
            "demo_clients{compress=\"true\",shape=\"dids\"} 1",
            "# HELP demo_lag_seconds Lag.",
            "# TYPE demo_lag_seconds gauge",
            "demo_lag_seconds{q=\"a\\\"b\"} 0.25",
            "# HELP demo_latency_seconds Latency.",
            "# TYPE demo_latency_seconds histogram",
            "demo_latency_seconds_bucket{le=\"0.000001\"} 2",
            "demo_latency_seconds_bucket{le=\"0.001\"} 5",
            "demo_latency_seconds_bucket{le=\"+Inf\"} 7",
            "demo_latency_seconds_sum 1.5",
            "demo_latency_seconds_count 7",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), expected, "{text}");
    }
}
