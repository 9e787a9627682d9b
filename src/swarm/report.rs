//! The swarm's report: built per process, merged by the parent, judged against expectations.

use super::Expectations;
use super::conn::{ClientState, Failure, MAX_FAILURE_EXAMPLES};
use super::driver::Outcome;
use super::histogram::{Histogram, SparseHistogram};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// "Behind", precisely: at the end of the run, a client that received at least one event is
/// behind when the largest `time_us` it received is more than this many µs below the largest
/// `time_us` any client (in any process) received. Event time, not wall time, so a swarm that is
/// itself slow does not blame the server; the maximum rather than the last event, so jittered
/// (non-monotonic) `time_us` does not count as lag. Clients whose filter matches less than one
/// event per second can show as behind while being current; compare with
/// `clients_without_events` and the per-client event counts.
pub const BEHIND_THRESHOLD_US: i64 = 1_000_000;

/// Above this loop utilisation the report warns that the swarm, not the server, is the limit.
const BUSY_WARNING_PCT: f64 = 85.0;

/// Example client ids kept per failed expectation.
const MAX_EXPECTATION_EXAMPLES: usize = 5;

/// Latency summary in µs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Events measured.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
    /// Events whose `time_us` was in the future (counted as 0 latency).
    pub negative: u64,
}

/// One failed expectation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExpectationFailure {
    /// The flag, e.g. `--expect-min-events 100`.
    pub expectation: String,
    /// Clients that failed it (0 for run-wide expectations).
    pub clients: u64,
    /// A few human-readable examples.
    pub examples: Vec<String>,
}

/// The result of a swarm run (one process, or merged).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// True when no expectation failed.
    pub passed: bool,
    /// What failed.
    pub expectation_failures: Vec<ExpectationFailure>,
    /// Clients simulated.
    pub clients: u64,
    /// Processes used.
    pub processes: u64,
    /// Longest run time of a process, in seconds.
    pub elapsed_s: f64,
    /// Clients that completed at least one upgrade.
    pub connected: u64,
    /// Successful upgrades, reconnects included.
    pub upgrades: u64,
    /// Failed connection attempts (TCP, timeout, refused or bad upgrade).
    pub connect_failures: u64,
    /// A few connection failure reasons.
    pub connect_failure_examples: Vec<String>,
    /// Refused upgrades by HTTP status.
    pub refused: BTreeMap<String, u64>,
    /// Close frames received by close code (1005 = no code).
    pub closes: BTreeMap<String, u64>,
    /// One example close reason per close code.
    pub close_reasons: BTreeMap<String, String>,
    /// Upgraded connections that ended without a close frame.
    pub disconnects_without_close: u64,
    /// New events received (duplicates excluded).
    pub events: u64,
    /// Replayed duplicates skipped after reconnects.
    pub duplicates_skipped: u64,
    /// Bytes of frames received (headers included).
    pub frame_bytes: u64,
    /// Events per second over the run.
    pub events_per_s: f64,
    /// Reads that returned data (events / reads = batching of the delivery).
    pub reads: u64,
    /// Share of the run the busiest process's loop was not waiting in epoll (working, or
    /// runnable but waiting for a CPU), in percent. Near 100 the swarm itself is the bottleneck
    /// and its latency figures include its own queueing; use more `--processes`, fewer clients,
    /// or a less loaded machine.
    pub busy_pct: f64,
    /// Frame bytes per second, in Gbit/s.
    pub gbps: f64,
    /// Receive time minus `time_us`.
    pub latency: Latency,
    /// Fewest events any client received.
    pub min_events_per_client: u64,
    /// Most events any client received.
    pub max_events_per_client: u64,
    /// Clients that received nothing.
    pub clients_without_events: u64,
    /// Clients behind at the end (see [`BEHIND_THRESHOLD_US`]).
    pub clients_behind: u64,
    /// Newest `time_us` any client received.
    pub newest_time_us: Option<i64>,
    /// Whether events were byte-verified (a seed was given).
    pub verified: bool,
    /// Verification failures.
    pub verification_failures: u64,
    /// The first few verification failures.
    pub failure_examples: Vec<Failure>,
    /// v2 `#sync` messages received (replayed duplicates excluded).
    #[serde(default)]
    pub syncs: u64,
    /// v2 `#info` frames by name.
    #[serde(default)]
    pub info_frames: BTreeMap<String, u64>,
    /// The first message of each `#info` name.
    #[serde(default)]
    pub info_messages: BTreeMap<String, String>,
    /// v2 error frames (terminal: `ConsumerTooSlow`, …) by error name.
    #[serde(default)]
    pub error_frames: BTreeMap<String, u64>,
    /// The first message of each error name.
    #[serde(default)]
    pub error_messages: BTreeMap<String, String>,
    /// v1 events that carried the server's `cursor` field (its seq).
    #[serde(default)]
    pub events_with_cursor: u64,
    /// Events regenerated by the verifier (cache misses).
    pub events_generated: u64,
    /// Frames decompressed by the verifier.
    pub frames_decompressed: u64,
    /// Latency histogram, for merging process reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<SparseHistogram>,
    /// `(max time_us, clients)` per distinct value, for the cross-process "behind" count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_max_time_us: Vec<(i64, u64)>,
}

/// Counts clients failing a per-client predicate, keeping a few examples.
fn per_client(
    clients: &[ClientState],
    expectation: String,
    mut bad: impl FnMut(&ClientState) -> Option<String>,
) -> Option<ExpectationFailure> {
    let mut f = ExpectationFailure {
        expectation,
        clients: 0,
        examples: Vec::new(),
    };
    for c in clients {
        if let Some(why) = bad(c) {
            f.clients += 1;
            if f.examples.len() < MAX_EXPECTATION_EXAMPLES {
                f.examples.push(format!("client {}: {why}", c.id));
            }
        }
    }
    (f.clients > 0).then_some(f)
}

impl Report {
    /// Builds a process report and evaluates the per-client expectations.
    pub fn from_outcome(o: &Outcome, expect: &Expectations) -> Report {
        let mut r = Report {
            clients: o.clients.len() as u64,
            processes: 1,
            elapsed_s: o.elapsed.as_secs_f64(),
            connect_failures: o.conns.connect_failures,
            connect_failure_examples: o.conns.connect_failure_examples.clone(),
            disconnects_without_close: o.conns.disconnects_without_close,
            events: o.totals.events,
            duplicates_skipped: o.totals.duplicates,
            frame_bytes: o.totals.frame_bytes,
            reads: o.conns.reads,
            busy_pct: 100.0
                * (1.0 - o.conns.idle.as_secs_f64() / o.elapsed.as_secs_f64().max(1e-9)).max(0.0),
            verified: o.verifier.generator().is_some(),
            verification_failures: o.totals.failures,
            failure_examples: o.totals.examples.clone(),
            events_generated: o.verifier.generated,
            frames_decompressed: o.verifier.decompressed + o.verifier.v2_decompressed(),
            syncs: o.totals.syncs,
            events_with_cursor: o.totals.events_with_cursor,
            histogram: Some(o.totals.latency.to_sparse()),
            min_events_per_client: o.clients.iter().map(|c| c.events).min().unwrap_or(0),
            max_events_per_client: o.clients.iter().map(|c| c.events).max().unwrap_or(0),
            ..Default::default()
        };
        r.latency.negative = o.totals.negative_latency;
        r.close_reasons = o
            .totals
            .close_reasons
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        for (name, (n, message)) in &o.totals.infos {
            r.info_frames.insert(name.clone(), *n);
            r.info_messages.insert(name.clone(), message.clone());
        }
        for (name, (n, message)) in &o.totals.errors {
            r.error_frames.insert(name.clone(), *n);
            r.error_messages.insert(name.clone(), message.clone());
        }
        let mut max_times: BTreeMap<i64, u64> = BTreeMap::new();
        for c in &o.clients {
            r.connected += u64::from(c.upgrades > 0);
            r.upgrades += c.upgrades;
            r.clients_without_events += u64::from(c.events == 0);
            for s in &c.refused {
                *r.refused.entry(s.to_string()).or_default() += 1;
            }
            for code in &c.closes {
                *r.closes.entry(code.to_string()).or_default() += 1;
            }
            if let Some(t) = c.max_time_us {
                *max_times.entry(t).or_default() += 1;
            }
        }
        r.client_max_time_us = max_times.into_iter().collect();
        let clients = &o.clients;
        let mut fails = Vec::new();
        if let Some(n) = expect.min_events {
            fails.extend(per_client(
                clients,
                format!("--expect-min-events {n}"),
                |c| (c.events < n).then(|| format!("received {} events", c.events)),
            ));
        }
        if let Some(n) = expect.max_events {
            fails.extend(per_client(
                clients,
                format!("--expect-max-events {n}"),
                |c| (c.events > n).then(|| format!("received {} events", c.events)),
            ));
        }
        if let Some(n) = expect.first_seq {
            fails.extend(per_client(
                clients,
                format!("--expect-first-seq {n}"),
                |c| match c.order.first {
                    Some(s) if s == n => None,
                    Some(s) => Some(format!("first seq {s}")),
                    None => Some("received no event".into()),
                },
            ));
        }
        if let Some(code) = expect.close_code {
            fails.extend(per_client(
                clients,
                format!("--expect-close-code {code}"),
                |c| {
                    (!c.closes.contains(&code)).then(|| {
                        if c.closes.is_empty() {
                            "no close frame received".to_string()
                        } else {
                            format!("close codes {:?}", c.closes)
                        }
                    })
                },
            ));
        }
        if let Some(name) = &expect.info {
            fails.extend(per_client(clients, format!("--expect-info {name}"), |c| {
                (!c.infos.contains(name)).then(|| format!("#info names {:?}", c.infos))
            }));
        }
        if let Some(name) = &expect.error_frame {
            fails.extend(per_client(
                clients,
                format!("--expect-error-frame {name}"),
                |c| (!c.errors.contains(name)).then(|| format!("error frames {:?}", c.errors)),
            ));
        }
        if let Some(present) = expect.cursor_field {
            let flag = if present { "present" } else { "absent" };
            fails.extend(per_client(
                clients,
                format!("--expect-cursor-field {flag}"),
                |c| {
                    let wrong = if present {
                        c.without_cursor
                    } else {
                        c.with_cursor
                    };
                    // Clients of v2 URLs have neither: `--expect-min-events` says whether
                    // events arrived at all.
                    (wrong > 0).then(|| {
                        format!(
                            "{} v1 events with the cursor field, {} without",
                            c.with_cursor, c.without_cursor
                        )
                    })
                },
            ));
        }
        if let Some(status) = expect.http_status {
            fails.extend(per_client(
                clients,
                format!("--expect-http-status {status}"),
                |c| {
                    if c.upgrades > 0 {
                        Some("the upgrade succeeded".into())
                    } else if !c.refused.contains(&status) {
                        Some(format!("refused with {:?}", c.refused))
                    } else {
                        None
                    }
                },
            ));
        }
        r.expectation_failures = fails;
        r
    }

    /// Adds another process's report (start from the first process's report, not a default).
    pub fn merge(&mut self, o: &Report) {
        self.clients += o.clients;
        self.processes += o.processes;
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
        self.connected += o.connected;
        self.upgrades += o.upgrades;
        self.connect_failures += o.connect_failures;
        for e in &o.connect_failure_examples {
            if self.connect_failure_examples.len() < MAX_FAILURE_EXAMPLES {
                self.connect_failure_examples.push(e.clone());
            }
        }
        for (k, v) in &o.refused {
            *self.refused.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.closes {
            *self.closes.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.close_reasons {
            self.close_reasons
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        self.disconnects_without_close += o.disconnects_without_close;
        self.events += o.events;
        self.duplicates_skipped += o.duplicates_skipped;
        self.frame_bytes += o.frame_bytes;
        self.reads += o.reads;
        self.busy_pct = self.busy_pct.max(o.busy_pct);
        self.latency.negative += o.latency.negative;
        self.min_events_per_client = self.min_events_per_client.min(o.min_events_per_client);
        self.max_events_per_client = self.max_events_per_client.max(o.max_events_per_client);
        self.clients_without_events += o.clients_without_events;
        self.verified |= o.verified;
        self.verification_failures += o.verification_failures;
        for f in &o.failure_examples {
            if self.failure_examples.len() < MAX_FAILURE_EXAMPLES {
                self.failure_examples.push(f.clone());
            }
        }
        self.syncs += o.syncs;
        self.events_with_cursor += o.events_with_cursor;
        for (k, v) in &o.info_frames {
            *self.info_frames.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.info_messages {
            self.info_messages
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        for (k, v) in &o.error_frames {
            *self.error_frames.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.error_messages {
            self.error_messages
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        self.events_generated += o.events_generated;
        self.frames_decompressed += o.frames_decompressed;
        let mut h = Histogram::default();
        for s in [&self.histogram, &o.histogram].into_iter().flatten() {
            h.merge(s);
        }
        self.histogram = Some(h.to_sparse());
        let mut times: BTreeMap<i64, u64> = self.client_max_time_us.iter().copied().collect();
        for &(t, n) in &o.client_max_time_us {
            *times.entry(t).or_default() += n;
        }
        self.client_max_time_us = times.into_iter().collect();
        for f in &o.expectation_failures {
            match self
                .expectation_failures
                .iter_mut()
                .find(|x| x.expectation == f.expectation)
            {
                Some(x) => {
                    x.clients += f.clients;
                    for e in &f.examples {
                        if x.examples.len() < MAX_EXPECTATION_EXAMPLES {
                            x.examples.push(e.clone());
                        }
                    }
                }
                None => self.expectation_failures.push(f.clone()),
            }
        }
    }

    /// Computes the derived numbers and the run-wide expectations; call once on the final
    /// (merged) report.
    pub fn finish(&mut self, expect: &Expectations) {
        let secs = self.elapsed_s.max(1e-9);
        self.events_per_s = self.events as f64 / secs;
        self.gbps = self.frame_bytes as f64 * 8.0 / secs / 1e9;
        let mut h = Histogram::default();
        if let Some(s) = &self.histogram {
            h.merge(s);
        }
        self.latency = Latency {
            count: h.count(),
            p50_us: h.quantile(0.50),
            p90_us: h.quantile(0.90),
            p99_us: h.quantile(0.99),
            p999_us: h.quantile(0.999),
            max_us: h.max(),
            negative: self.latency.negative,
        };
        self.newest_time_us = self.client_max_time_us.last().map(|&(t, _)| t);
        self.clients_behind = match self.newest_time_us {
            Some(newest) => self
                .client_max_time_us
                .iter()
                .filter(|&&(t, _)| t < newest - BEHIND_THRESHOLD_US)
                .map(|&(_, n)| n)
                .sum(),
            None => 0,
        };
        let global = |expectation: String, why: String| ExpectationFailure {
            expectation,
            clients: 0,
            examples: vec![why],
        };
        if self.verification_failures > 0 {
            let first = self
                .failure_examples
                .first()
                .map(|f| match f.seq {
                    Some(s) => format!("first: client {} seq {}: {}", f.client, s, f.reason),
                    None => format!("first: client {}: {}", f.client, f.reason),
                })
                .unwrap_or_default();
            let what = if expect.in_order {
                "--expect-in-order / byte verification"
            } else {
                "byte verification (--seed)"
            };
            self.expectation_failures.insert(
                0,
                global(
                    what.into(),
                    format!(
                        "{} verification failures; {first}",
                        self.verification_failures
                    ),
                ),
            );
        }
        if let Some(n) = expect.connected
            && self.connected < n
        {
            self.expectation_failures.push(global(
                format!("--expect-connected {n}"),
                format!("only {} clients completed the upgrade", self.connected),
            ));
        }
        if let Some(ms) = expect.p99_ms {
            let p99_ms = self.latency.p99_us as f64 / 1000.0;
            if self.latency.count == 0 || p99_ms > ms {
                self.expectation_failures.push(global(
                    format!("--expect-p99-ms {ms}"),
                    format!(
                        "p99 latency {p99_ms:.3} ms over {} events",
                        self.latency.count
                    ),
                ));
            }
        }
        self.passed = self.expectation_failures.is_empty();
    }

    /// The human-readable form.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "clients {} ({} processes): connected {}, upgrades {}, connect failures {}, refused {:?}",
            self.clients,
            self.processes,
            self.connected,
            self.upgrades,
            self.connect_failures,
            self.refused
        );
        let _ = writeln!(
            s,
            "closes by code {:?} (reasons {:?}), disconnects without close {}",
            self.closes, self.close_reasons, self.disconnects_without_close
        );
        let _ = writeln!(
            s,
            "events {} in {:.2} s: {:.0} events/s, {:.3} Gbps; per client min {} max {}; duplicates skipped {}",
            self.events,
            self.elapsed_s,
            self.events_per_s,
            self.gbps,
            self.min_events_per_client,
            self.max_events_per_client,
            self.duplicates_skipped
        );
        if self.events_with_cursor > 0 {
            let _ = writeln!(
                s,
                "v1 events with the cursor field {}",
                self.events_with_cursor
            );
        }
        if self.syncs > 0 || !self.info_frames.is_empty() || !self.error_frames.is_empty() {
            let _ = writeln!(
                s,
                "v2: #sync {}, #info {:?} {:?}, error frames {:?} {:?}",
                self.syncs,
                self.info_frames,
                self.info_messages,
                self.error_frames,
                self.error_messages
            );
        }
        let _ = writeln!(
            s,
            "reads {} ({:.1} events/read); swarm loop busy {:.0}%{}",
            self.reads,
            self.events as f64 / self.reads.max(1) as f64,
            self.busy_pct,
            if self.busy_pct > BUSY_WARNING_PCT {
                " — WARNING: the swarm is saturated; its latency figures include its own queueing"
            } else {
                ""
            }
        );
        let l = &self.latency;
        let _ = writeln!(
            s,
            "latency µs: p50 {} p90 {} p99 {} p99.9 {} max {} (n={}, negative {})",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.count, l.negative
        );
        let _ = writeln!(
            s,
            "clients without events {}, behind at end (>1 s of event time) {}",
            self.clients_without_events, self.clients_behind
        );
        let _ = writeln!(
            s,
            "verification: {}, failures {}",
            if self.verified {
                "byte-exact (seeded)"
            } else {
                "off (no --seed)"
            },
            self.verification_failures
        );
        for f in &self.failure_examples {
            let _ = writeln!(
                s,
                "  client {} seq {}: {}",
                f.client,
                f.seq.map_or("-".into(), |v| v.to_string()),
                f.reason
            );
        }
        for e in &self.connect_failure_examples {
            let _ = writeln!(s, "  connect failure: {e}");
        }
        if self.events == 0 {
            let _ = writeln!(
                s,
                "WARNING: no events at all; add --expect-min-events to make such a run fail"
            );
        }
        if self.passed {
            let _ = writeln!(s, "PASS");
        } else {
            for f in &self.expectation_failures {
                let _ = writeln!(
                    s,
                    "FAILED {}{}: {}",
                    f.expectation,
                    if f.clients > 0 {
                        format!(" ({} clients)", f.clients)
                    } else {
                        String::new()
                    },
                    f.examples.join("; ")
                );
            }
        }
        s
    }
}
