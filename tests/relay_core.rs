//! The relay core, end to end with the real binaries: mock upstream → relay → swarm clients.
//! Every assertion is about what clients received (the swarm regenerates each event from the
//! mock's seed and byte-compares it, and checks sequence numbers for gaps and duplicates).

mod common;
mod metrics_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// 2,000 clients over a 10 s feed: every client gets every event, in order, byte-exact.
#[test]
fn fanout_2000_clients_every_event_in_order() {
    // 200 ev/s × 2,000 clients = 400k deliveries/s: well within the relay, and within what one
    // swarm thread can verify byte by byte on a shared 2-core CI machine. A finite feed (10 s)
    // read from the start: every client must get exactly all of it, however long the 2,000
    // connections take (live clients counted "≥ 1,800 in 12 s", which a loaded machine missed
    // by connecting late, not by losing events).
    let mock = Mock::start(200, &["--count", "2000"]);
    let dir = temp_dir("fanout");
    let relay = Relay::start(&mock.url(), &dir, &[]);
    let report = swarm_ok(&[
        "--url",
        &relay.url("cursor=0"),
        "--clients",
        "2000",
        "--duration",
        "16s",
        "--expect-connected",
        "2000",
        "--expect-in-order",
        "--expect-first-seq",
        "0",
        "--expect-min-events",
        "2000",
        "--expect-max-events",
        "2000",
    ]);
    eprintln!("{report}");
}

/// Reads every frame from a WebSocket until `quiet` passes without one.
fn read_all(url: &str, quiet: Duration, max: usize) -> Vec<Vec<u8>> {
    let (mut ws, _) = tungstenite::connect(url).expect("connect");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(quiet)).ok();
    }
    let mut out = Vec::new();
    while out.len() < max {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => out.push(t.as_bytes().to_vec()),
            Ok(tungstenite::Message::Binary(b)) => out.push(b.to_vec()),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    out
}

/// The tests' `strip_cursor` on the mock's `--wire cursor` stream (what official Jetstream and
/// the relay send): taking the field out gives the generator's bytes, its value is the
/// instance's seq of the event, and the legacy listener of the same stream has no field.
#[test]
fn harness_strips_the_cursor_field_of_a_seq_wire() {
    let legacy_port = free_port();
    let mock = Mock::start(
        2000,
        &[
            "--wire",
            "cursor",
            "--seq-offset",
            "1000",
            "--count",
            "400",
            "--start-immediately",
            "--also-listen",
            &format!("127.0.0.1:{legacy_port}=legacy"),
        ],
    );
    let g = jetrelay::mock::Generator::new(7, jetrelay::mock::DEFAULT_DIDS);
    wait_until("the mock's 400 events", Duration::from_secs(20), || {
        mock.seq() >= 400
    });
    let with = read_all(
        &format!("ws://127.0.0.1:{}/subscribe?cursor=1000", mock.port),
        Duration::from_secs(2),
        400,
    );
    let without = read_all(
        &format!("ws://127.0.0.1:{legacy_port}/subscribe?cursor=0"),
        Duration::from_secs(2),
        400,
    );
    assert_eq!((with.len(), without.len()), (400, 400));
    for (n, (frame, legacy)) in with.iter().zip(&without).enumerate() {
        let (event, cursor) = strip_cursor(frame);
        assert_eq!(cursor, Some(n as u64 + 1000), "event {n}");
        assert_eq!(&event, legacy, "event {n}: the rest is the upstream event");
        let mut want = Vec::new();
        g.event(n as u64, time_us(legacy), &mut want);
        assert_eq!(event, want, "event {n}: the generator's bytes");
        assert_eq!(mock_seq(frame), Some(n as u64));
        assert_eq!(strip_cursor(legacy), (legacy.clone(), None));
    }
}

fn time_us(json: &[u8]) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(json).expect("json");
    v["time_us"].as_i64().expect("time_us")
}

/// Cursor replay returns exactly the retained events from the first one with
/// `time_us >= cursor` in log order — with non-monotonic `time_us` (jitter) — then goes live.
#[test]
fn cursor_replay_is_exact_with_non_monotonic_time() {
    let mock = Mock::start(400, &["--time-jitter-ms", "300", "--count", "1200"]);
    let dir = temp_dir("cursor");
    let relay = Relay::start(&mock.url(), &dir, &[]);
    wait_until("all 1200 events appended", Duration::from_secs(30), || {
        read_all(&relay.url("cursor=0"), Duration::from_millis(300), 5000).len() >= 1200
    });
    let all = read_all(&relay.url("cursor=0"), Duration::from_millis(500), 5000);
    assert_eq!(all.len(), 1200, "full replay");
    let times: Vec<i64> = all.iter().map(|e| time_us(e)).collect();
    let backwards = times.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(
        backwards > 50,
        "the mock's time_us must be non-monotonic here ({backwards})"
    );
    for k in [1usize, 200, 601, 1000, 1199] {
        let cursor = times[k];
        let first = times.iter().position(|t| *t >= cursor).unwrap();
        let got = read_all(
            &relay.url(&format!("cursor={cursor}")),
            Duration::from_millis(400),
            5000,
        );
        assert_eq!(got.len(), 1200 - first, "cursor {cursor} (event {k})");
        assert!(got == all[first..], "cursor {cursor}: byte-exact tail");
    }
    // A cursor in the future is live: nothing old arrives.
    let future = times.iter().max().unwrap() + 10_000_000_000;
    let got = read_all(
        &relay.url(&format!("cursor={future}")),
        Duration::from_millis(400),
        10,
    );
    assert!(got.is_empty(), "future cursor got {} old events", got.len());
    // Compressed replay carries the same events.
    let z = read_all(
        &relay.url("cursor=0&compress=true"),
        Duration::from_millis(500),
        5000,
    );
    assert_eq!(z.len(), 1200);
    let mut dec = jetrelay::compress::EventDecompressor::new().unwrap();
    for (c, p) in z.iter().zip(&all) {
        assert_eq!(&dec.decompress(c, 1 << 20).unwrap(), p);
    }
}

fn upgrade_request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn status_of(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Each bad handshake gets its HTTP error with a one-line reason; the relay keeps serving.
#[test]
fn bad_handshakes_get_errors_and_relay_keeps_serving() {
    let mock = Mock::start(200, &[]);
    let dir = temp_dir("handshake");
    let relay = Relay::start(&mock.url(), &dir, &[]);
    let p = relay.port;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 404, "no such path"),
        (b"POST /subscribe HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec(), 405, ""),
        (b"GET /subscribe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400, ""),
        (upgrade_request("/subscribe?cursor=yesterday", ""), 400, "invalid cursor: yesterday"),
        (upgrade_request("/subscribe?wantedCollections=app.bsky.graph.fo*", ""), 400, "invalid collection"),
        (upgrade_request("/subscribe?wantedDids=bob", ""), 400, "invalid subscriber options"),
        (
            b"GET /subscribe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n".to_vec(),
            426,
            "",
        ),
        (b"\x16\x03\x01garbage\r\n\r\n".to_vec(), 400, ""),
        (
            format!("GET /subscribe HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000)).into_bytes(),
            431,
            "",
        ),
    ];
    for (req, want, reason) in cases {
        let resp = raw_http(p, &req);
        assert_eq!(
            status_of(&resp),
            want,
            "{:?} -> {resp}",
            String::from_utf8_lossy(&req[..req.len().min(60)])
        );
        assert!(resp.contains(reason), "reason {reason:?} missing in {resp}");
        let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert_eq!(
            body.trim_end().lines().count(),
            1,
            "one-line reason: {body:?}"
        );
    }
    let (status, body) = http_get(p, "/");
    assert_eq!(status, 200);
    assert!(body.contains("jetrelay"));
    // Still serving real clients.
    swarm_ok(&[
        "--url",
        &relay.url(""),
        "--clients",
        "20",
        "--duration",
        "3s",
        "--expect-in-order",
        "--expect-min-events",
        "300",
    ]);
}

/// A slowloris client (a request head that never completes) is cut off at the deadline
/// while other clients are served.
#[test]
fn slowloris_handshake_times_out() {
    let mock = Mock::start(200, &[]);
    let dir = temp_dir("slowloris");
    let relay = Relay::start(&mock.url(), &dir, &["--handshake-timeout", "2s"]);
    let mut slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
            s.write_all(b"GET /subscribe HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
            s
        })
        .collect();
    swarm_ok(&[
        "--url",
        &relay.url(""),
        "--clients",
        "10",
        "--duration",
        "2s",
        "--expect-in-order",
        "--expect-min-events",
        "200",
    ]);
    let t0 = Instant::now();
    for s in &mut slow {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 408"), "slowloris got {text:?}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "closed at the deadline"
    );
}

/// The upstream connection is dropped repeatedly mid-stream: clients see no gap and no
/// duplicate (the relay resumes with a rewound cursor and drops what it already has).
#[test]
fn upstream_drops_cause_no_gap_and_no_duplicate() {
    let mock = Mock::start(500, &["--drop-every", "2s"]);
    let dir = temp_dir("updrop");
    let relay = Relay::start(&mock.url(), &dir, &["--rewind", "2s"]);
    swarm_ok(&[
        "--url",
        &relay.url(""),
        "--clients",
        "200",
        "--duration",
        "10s",
        "--expect-in-order",
        "--expect-min-events",
        "3500",
    ]);
    assert!(
        relay.log_text().matches("upstream connected").count() >= 3,
        "reconnects happened"
    );
}

/// Malformed upstream messages (invalid JSON, no time_us, binary, oversized) are skipped:
/// clients still receive exactly the valid events, in order.
#[test]
fn malformed_upstream_events_are_skipped() {
    let mock = Mock::start(400, &["--malformed-every", "25"]);
    let dir = temp_dir("malformed");
    let relay = Relay::start(&mock.url(), &dir, &[]);
    swarm_ok(&[
        "--url",
        &relay.url("cursor=0"),
        "--clients",
        "50",
        "--duration",
        "6s",
        "--expect-in-order",
        "--expect-first-seq",
        "0",
        "--expect-min-events",
        "2000",
    ]);
}

/// `kill -9` of the relay mid-stream, restart on the same data dir: history from before the
/// crash replays, and the stream continues across it with no gap.
#[test]
fn kill9_restart_replays_across_the_crash() {
    let mock = Mock::start(500, &[]);
    let dir = temp_dir("kill9");
    let mut relay = Relay::start(&mock.url(), &dir, &["--rewind", "3s"]);
    std::thread::sleep(Duration::from_secs(3));
    relay.proc.kill9();
    let port = relay.port;
    std::thread::sleep(Duration::from_millis(500));
    let relay = Relay::start_on(port, &mock.url(), &dir, &["--rewind", "3s"]);
    std::thread::sleep(Duration::from_secs(2));
    // Everything since seq 0, across the crash, with no gap and no duplicate.
    swarm_ok(&[
        "--url",
        &relay.url("cursor=0"),
        "--clients",
        "20",
        "--duration",
        "4s",
        "--expect-in-order",
        "--expect-first-seq",
        "0",
        "--expect-min-events",
        "2500",
    ]);
    assert!(relay.log_text().contains("log recovered"));
}

/// A client that stops reading falls behind retention: it is disconnected with a close frame
/// (1008) that says why, never receives a byte from a punched region, and `du` stays bounded
/// while `ls` grows.
#[test]
fn stalled_client_is_kicked_and_disk_stays_bounded() {
    // 8,000 ev/s ≈ 4.4 MB/s: a 12 s stall is ~50 MB, well past what the loopback socket
    // buffers can absorb (tcp_rmem max is 32 MiB on some hosts, plus the send buffer), so the
    // relay-side position really falls behind retention.
    let mock = Mock::start(8000, &[]);
    let dir = temp_dir("stall");
    let relay = Relay::start(&mock.url(), &dir, &["--retention", "3s"]);
    let report = swarm_ok(&[
        "--url",
        &relay.url(""),
        "--clients",
        "3",
        "--duration",
        "20s",
        "--pause-after",
        "100",
        "--pause-for",
        "12s",
        "--expect-close-code",
        "1008",
        "--expect-in-order",
    ]);
    eprintln!("{report}");
    let apparent = log_len(&dir);
    let allocated = du_bytes(&dir);
    assert!(apparent > 10 << 20, "log grew: {apparent}");
    assert!(
        allocated < apparent / 2,
        "du bounded by retention: allocated {allocated} vs apparent {apparent}"
    );
    assert!(relay.log_text().contains("fell behind retention"));
}

/// One counter from the relay's Prometheus text.
fn counter(relay: &Relay, name: &str) -> f64 {
    let (status, body) = http_get(relay.metrics_port, "/metrics");
    assert_eq!(status, 200, "{body}");
    metrics_support::Scrape::parse(&body).must(name, &[])
}

/// 100 swarm clients spread over `urls` for 5 s, every one connected, each receiving at least
/// `min_events` in order and byte-exact; returns the relay's bytes per data send meanwhile.
fn bytes_per_send_of_100_clients(relay: &Relay, urls: &[String], min_events: u64) -> f64 {
    let mut args: Vec<&str> = Vec::new();
    for url in urls {
        args.extend(["--url", url.as_str()]);
    }
    let min_events = min_events.to_string();
    args.extend([
        "--clients",
        "100",
        "--duration",
        "5s",
        "--expect-connected",
        "100",
        "--expect-in-order",
        "--expect-min-events",
        &min_events,
    ]);
    swarm_ok(&args);
    counter(relay, "jetrelay_delivered_bytes_total") / counter(relay, "jetrelay_fanout_sends_total")
}

/// Pacing (`--fanout-duty`): a busy worker holds each round of live sends back a little, so
/// that one send carries several events. Measured as bytes per send against the same load with
/// pacing off; and the swarm checks that holding rounds back loses and reorders nothing.
#[test]
fn pacing_batches_live_sends_under_load_and_loses_nothing() {
    // 100 clients × 2,000 ev/s: an unpaced round (100 sends) takes well under the 0.5 ms
    // between events, so unpaced sends carry about one event each.
    let bytes_per_send = |duty: &str| {
        // A mock each, so that both relays see the same history and the same live rate.
        let mock = Mock::start(2000, &[]);
        let dir = temp_dir(&format!("pacing-{duty}"));
        let relay = Relay::start(
            &mock.url(),
            &dir,
            &["--workers", "1", "--fanout-duty", duty],
        );
        let per_send = bytes_per_send_of_100_clients(&relay, &[relay.url("")], 4000);
        let held = counter(&relay, "jetrelay_fanout_rounds_held_total");
        eprintln!("duty {duty}: {per_send:.0} bytes per send, {held} rounds held");
        (per_send, held)
    };
    let (unpaced, unpaced_held) = bytes_per_send("1");
    let (paced, paced_held) = bytes_per_send("0.1");
    assert_eq!(unpaced_held, 0.0, "duty 1 never holds a round");
    assert!(paced_held > 0.0, "duty 0.1 under load must hold rounds");
    assert!(
        paced > 2.0 * unpaced,
        "paced sends should carry several times more: {paced:.0} vs {unpaced:.0} bytes per send"
    );
}

/// Lingering (`--thin-linger`): under load, a send to a thin stream (here a collection filter
/// and the compressed stream) waits until it carries a few KiB or its oldest byte has waited
/// the linger. Measured as bytes per send against the same load without lingering; the swarm
/// checks every filtered and compressed event still arrives, once, in order, byte-exact. And a
/// lightly loaded relay, with the default settings, does not linger at all.
#[test]
fn thin_streams_linger_under_load_and_lose_nothing() {
    let urls = |relay: &Relay| {
        vec![
            relay.url("wantedCollections=app.bsky.feed.post"),
            relay.url("compress=true"),
        ]
    };
    let bytes_per_send = |rate: u64, relay_args: &[&str]| {
        let mock = Mock::start(rate, &[]);
        let dir = temp_dir("linger");
        let mut args = vec!["--workers", "1", "--fanout-duty", "1"];
        args.extend_from_slice(relay_args);
        let relay = Relay::start(&mock.url(), &dir, &args);
        let per_send = bytes_per_send_of_100_clients(&relay, &urls(&relay), rate / 20);
        let lingered = counter(&relay, "jetrelay_fanout_sends_lingered_total");
        let releases = counter(&relay, "jetrelay_fanout_linger_releases_total");
        eprintln!(
            "rate {rate} {relay_args:?}: {per_send:.0} bytes per send, {lingered} lingered \
             in {releases} releases"
        );
        (per_send, lingered, releases)
    };
    // 500 ev/s: the post filter passes ~65 ev/s (~48 KB/s), the compressed stream ~120 KB/s;
    // without lingering a send carries about one event (or what one round brought).
    let always = ["--thin-linger", "100ms", "--thin-linger-load", "0"];
    let (lingering, lingered, releases) = bytes_per_send(500, &always);
    let (direct, never, _) = bytes_per_send(500, &["--thin-linger", "0s"]);
    assert!(
        lingered > 0.0 && never == 0.0,
        "{lingered} / {never} lingered"
    );
    // A stream's lingering clients (50 per stream here) share one deadline and go out
    // together: a release, and the round it starts, serves most of them at once.
    assert!(
        lingered >= 25.0 * releases,
        "{lingered} lingered sends in {releases} releases"
    );
    assert!(
        lingering > 2.5 * direct,
        "lingering sends should carry several times more: {lingering:.0} vs {direct:.0} B/send"
    );
    // 50 ev/s to 100 clients keeps the worker far below the default load threshold (10 %).
    let (light, light_lingered, _) = bytes_per_send(50, &[]);
    assert_eq!(
        light_lingered, 0.0,
        "a lightly loaded relay must not linger"
    );
    assert!(light < 2.0 * direct, "{light:.0} B/send at light load");
}

/// A lingering send must not wait for more data that never comes: when the feed pauses, the
/// linger timer alone sends what is pending. Two thin streams (a collection filter, the
/// compressed stream) linger from different moments, so one timer serves the other's deadline
/// too; every event must still arrive, long before the readers give up.
#[test]
fn lingering_sends_go_out_when_the_feed_pauses() {
    let n = 400;
    let mock = Mock::start(400, &["--count", &n.to_string()]);
    let dir = temp_dir("linger-pause");
    let relay = Relay::start(
        &mock.url(),
        &dir,
        &[
            "--workers",
            "1",
            "--thin-linger",
            "300ms",
            "--thin-linger-load",
            "0",
        ],
    );
    let quiet = Duration::from_millis(1500);
    let readers: Vec<_> = [
        "cursor=0",
        "cursor=0&compress=true",
        "cursor=0&wantedCollections=app.bsky.feed.post",
    ]
    .into_iter()
    .map(|q| {
        let url = relay.url(q);
        std::thread::spawn(move || read_all(&url, quiet, n))
    })
    .collect();
    let mut got: Vec<Vec<Vec<u8>>> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    let posts = got.pop().unwrap();
    let compressed = got.pop().unwrap();
    let full = got.pop().unwrap();
    assert_eq!(full.len(), n, "the plain stream is complete");
    assert_eq!(compressed.len(), n, "every compressed event arrived");
    // Identity and account events reach every subscriber, whatever the collections.
    let wanted: Vec<&Vec<u8>> = full
        .iter()
        .filter(|f| {
            let v: serde_json::Value = serde_json::from_slice(f).expect("json");
            v["kind"] != "commit" || v["commit"]["collection"] == "app.bsky.feed.post"
        })
        .collect();
    assert_eq!(posts.len(), wanted.len(), "every post arrived");
    assert!(
        posts.iter().zip(&wanted).all(|(a, b)| a == *b),
        "byte-exact"
    );
}

/// DID-filtered clients park on their DIDs: each new event is looked up once by its DID and
/// wakes only the clients that want it, instead of every DID client walking every event. The
/// swarm checks each client still gets exactly its DIDs' events, in order, byte-exact; the
/// wake-ups stay in proportion to what is delivered (walking would be clients × events); and
/// clients whose DIDs never appear stay connected while retention punches the log under them.
#[test]
fn did_filtered_clients_wake_only_for_their_dids_and_survive_retention() {
    // 2,000 ev/s over 2,000 DIDs: each DID about once a second. 4 MiB of disk keeps about
    // 2.5 s of events, so the run punches the log several times over.
    let population = 2000u64;
    let mock = Mock::start(2000, &["--dids", &population.to_string()]);
    let dir = temp_dir("did-routes");
    let relay = Relay::start(&mock.url(), &dir, &["--workers", "1", "--max-disk", "4MiB"]);
    let g = jetrelay::mock::Generator::new(7, population);
    // 40 filters of 5 DIDs that appear, and 10 of 3 DIDs outside the population (never seen).
    let mut urls: Vec<String> = (0..40u64)
        .map(|f| {
            let q: Vec<String> = (0..5)
                .map(|k| format!("wantedDids={}", g.did_by_index(f * 5 + k)))
                .collect();
            relay.url(&q.join("&"))
        })
        .collect();
    urls.extend((0..10u64).map(|f| {
        let q: Vec<String> = (0..3)
            .map(|k| format!("wantedDids={}", g.did_by_index(population + f * 3 + k)))
            .collect();
        relay.url(&q.join("&"))
    }));
    let mut args: Vec<&str> = Vec::new();
    for url in &urls {
        args.extend(["--url", url.as_str()]);
    }
    args.extend([
        "--dids",
        "2000",
        "--clients",
        "200",
        "--duration",
        "8s",
        "--expect-connected",
        "200",
        "--expect-in-order",
    ]);
    let report = swarm_ok(&args);
    let metrics = |name: &str| counter(&relay, name);
    let wakes = metrics("jetrelay_fanout_did_wakes_total");
    let delivered = metrics("jetrelay_events_delivered_total");
    let appended = metrics("jetrelay_upstream_events_appended_total");
    let punches = metrics("jetrelay_retention_punches_total");
    eprintln!(
        "{wakes} wakes, {delivered} events delivered, {appended} appended, {punches} punches; \
         swarm {report}"
    );
    // 160 clients × 5 DIDs × ~8 s: some 6,000 events delivered. Walking would have served
    // every client for every event (200 × ~16,000).
    assert!(delivered > 2000.0, "{delivered} events delivered");
    assert!(
        wakes > 0.0,
        "clients parked on their DIDs are woken by them"
    );
    assert!(
        wakes <= 1.5 * delivered + 200.0,
        "{wakes} wake-ups for {delivered} events delivered"
    );
    assert!(punches > 0.0, "retention punched the log meanwhile");
    let log = relay.log_text();
    assert!(
        !log.contains("fell behind retention"),
        "a parked DID client was kicked by retention"
    );
    let kicked = metrics_support::Scrape::parse(&http_get(relay.metrics_port, "/metrics").1)
        .must("jetrelay_clients_kicked_total", &[("reason", "retention")]);
    assert_eq!(kicked, 0.0, "no client was kicked by retention");
}
