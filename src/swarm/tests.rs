//! End-to-end: in-process mock upstream + swarm connected directly to it (the mock speaks the
//! relay's protocol for full streams), including runs that must fail.

use super::*;
use crate::mock::{self, MockConfig};
use std::time::Instant;

fn start_mock(rate: u64, seed: u64, jitter_ms: u64) -> mock::MockHandle {
    mock::spawn(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rate,
        seed,
        dids: 1000,
        time_jitter_ms: jitter_ms,
        ..Default::default()
    })
    .expect("mock starts")
}

fn swarm(url: String, clients: u64, secs: f64, seed: Option<u64>) -> SwarmConfig {
    SwarmConfig {
        urls: vec![url],
        clients,
        duration: Duration::from_secs_f64(secs),
        seed,
        dids: 1000,
        ..Default::default()
    }
}

/// Waits (bounded) until the mock has generated `n` events.
fn wait_for_events(m: &mock::MockHandle, n: u64) {
    let start = Instant::now();
    while m.seq() < n {
        assert!(start.elapsed() < Duration::from_secs(20), "mock too slow");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn swarm_against_mock_in_order_and_byte_exact() {
    let m = start_mock(2000, 5, 0);
    let mut cfg = swarm(
        format!("ws://{}/subscribe", m.local_addr()),
        20,
        2.0,
        Some(5),
    );
    cfg.expect.in_order = true;
    cfg.expect.min_events = Some(1000);
    cfg.expect.connected = Some(20);
    cfg.expect.p99_ms = Some(1000.0);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    assert_eq!(r.verification_failures, 0);
    assert_eq!(r.connected, 20);
    assert!(r.events >= 20 * 1000, "{}", r.human());
    assert_eq!(r.latency.count, r.events);
    assert!(r.verified);
    assert_eq!(r.clients_behind, 0, "{}", r.human());
    // All clients share the cache: far fewer generations than events.
    assert!(r.events_generated * 5 < r.events, "{}", r.events_generated);
}

#[test]
fn wrong_seed_fails_verification() {
    let m = start_mock(1000, 5, 0);
    let mut cfg = swarm(
        format!("ws://{}/subscribe", m.local_addr()),
        2,
        0.7,
        Some(6),
    );
    cfg.expect.in_order = true;
    let r = run(&cfg).unwrap();
    assert!(!r.passed);
    assert!(r.verification_failures > 0);
    assert!(
        r.failure_examples[0].reason.contains("bytes differ"),
        "{:?}",
        r.failure_examples
    );
    assert!(r.human().contains("FAILED"));
}

#[test]
fn filtered_url_against_unfiltering_upstream_fails() {
    // The mock ignores wantedCollections, so a swarm that models filters must object.
    let m = start_mock(1000, 5, 0);
    let mut cfg = swarm(
        format!(
            "ws://{}/subscribe?wantedCollections=app.bsky.graph.follow",
            m.local_addr()
        ),
        2,
        0.7,
        Some(5),
    );
    cfg.expect.in_order = true;
    let r = run(&cfg).unwrap();
    assert!(!r.passed);
    assert!(
        r.failure_examples
            .iter()
            .any(|f| f.reason.contains("does not match the subscription filter")),
        "{:?}",
        r.failure_examples
    );
}

#[test]
fn unmet_expectations_fail_with_names() {
    let m = start_mock(200, 5, 0);
    let mut cfg = swarm(
        format!("ws://{}/subscribe", m.local_addr()),
        3,
        0.5,
        Some(5),
    );
    cfg.expect.min_events = Some(1_000_000);
    cfg.expect.close_code = Some(1001);
    cfg.expect.connected = Some(4);
    let r = run(&cfg).unwrap();
    assert!(!r.passed);
    let names: Vec<&str> = r
        .expectation_failures
        .iter()
        .map(|f| f.expectation.as_str())
        .collect();
    assert!(names.contains(&"--expect-min-events 1000000"), "{names:?}");
    assert!(names.contains(&"--expect-close-code 1001"), "{names:?}");
    assert!(names.contains(&"--expect-connected 4"), "{names:?}");
    let min = r
        .expectation_failures
        .iter()
        .find(|f| f.expectation.starts_with("--expect-min-events"))
        .unwrap();
    assert_eq!(min.clients, 3);
}

#[test]
fn cursor_replay_is_inclusive_with_non_monotonic_time() {
    let m = start_mock(4000, 8, 30);
    wait_for_events(&m, 3000);
    let history = m.history_events();
    // Pick a cursor equal to a jittered (earlier-than-neighbours) event's time_us.
    let k = (1000..history.len())
        .find(|&i| history[i].1 < history[i - 1].1)
        .expect("jitter produced a non-monotonic time");
    let cursor = history[k].1;
    let expected_first = history
        .iter()
        .find(|&&(_, t)| t >= cursor)
        .map(|&(s, _)| s)
        .unwrap();
    assert!(
        expected_first < history[k].0,
        "non-monotonic: an earlier event already has time >= cursor"
    );
    let mut cfg = swarm(
        format!("ws://{}/subscribe?cursor={cursor}", m.local_addr()),
        3,
        1.0,
        Some(8),
    );
    cfg.expect.in_order = true;
    cfg.expect.first_seq = Some(expected_first);
    cfg.expect.min_events = Some(history.len() as u64 - expected_first);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    // Off by one must fail: the same stream cannot start at expected_first + 1.
    let mut cfg2 = cfg.clone();
    cfg2.expect.first_seq = Some(expected_first + 1);
    cfg2.duration = Duration::from_millis(300);
    cfg2.expect.min_events = None;
    let r2 = run(&cfg2).unwrap();
    assert!(!r2.passed);
}

#[test]
fn reconnects_after_drops_without_gaps() {
    let m = mock::spawn(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rate: 2000,
        seed: 3,
        dids: 1000,
        time_jitter_ms: 20,
        drop_every: Some(Duration::from_millis(400)),
        ..Default::default()
    })
    .unwrap();
    let mut cfg = swarm(
        format!("ws://{}/subscribe", m.local_addr()),
        5,
        2.0,
        Some(3),
    );
    cfg.reconnect = true;
    cfg.expect.in_order = true;
    cfg.expect.min_events = Some(1000);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    assert!(r.upgrades >= 5 * 3, "{}", r.human());
    assert!(r.disconnects_without_close >= 5 * 2, "{}", r.human());
    assert!(
        r.duplicates_skipped > 0,
        "cursor replay is inclusive: {}",
        r.human()
    );
}

#[test]
fn gaps_from_a_lossy_reconnect_are_caught() {
    // Reconnecting WITHOUT a cursor (plain clients, no --reconnect semantics) loses events; a
    // swarm that tracked order across connections must see the gap. Simulate by a client that
    // reconnects live: drop connections while --reconnect is on but the mock's history is tiny,
    // so the replay cannot reach back.
    let m = mock::spawn(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rate: 3000,
        seed: 3,
        dids: 1000,
        history: 1,
        drop_every: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .unwrap();
    let mut cfg = swarm(
        format!("ws://{}/subscribe", m.local_addr()),
        2,
        1.5,
        Some(3),
    );
    cfg.reconnect = true;
    cfg.expect.in_order = true;
    let r = run(&cfg).unwrap();
    assert!(!r.passed, "{}", r.human());
    assert!(
        r.failure_examples
            .iter()
            .any(|f| f.reason.starts_with("gap")),
        "{:?}",
        r.failure_examples
    );
}

#[test]
fn refused_upgrades_and_http_status_expectation() {
    let m = start_mock(100, 1, 0);
    // The mock refuses compression with 400.
    let mut cfg = swarm(format!("ws://{}/subscribe", m.local_addr()), 3, 0.5, None);
    cfg.compress = true;
    cfg.expect.http_status = Some(400);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    assert_eq!(r.refused.get("400"), Some(&3));
    assert_eq!(r.connected, 0);
    // And the same expectation fails against an accepting upstream.
    let mut cfg = swarm(format!("ws://{}/subscribe", m.local_addr()), 2, 0.3, None);
    cfg.expect.http_status = Some(400);
    let r = run(&cfg).unwrap();
    assert!(!r.passed);
    // An unparsable cursor is a 400 too.
    let mut cfg = swarm(
        format!("ws://{}/subscribe?cursor=abc", m.local_addr()),
        1,
        0.3,
        None,
    );
    cfg.expect.http_status = Some(400);
    assert!(run(&cfg).unwrap().passed);
}

#[test]
fn stalled_clients_resume_and_stay_valid() {
    let m = start_mock(2000, 4, 0);
    let mut cfg = swarm(
        format!("ws://{}/subscribe", m.local_addr()),
        4,
        2.0,
        Some(4),
    );
    cfg.pause_after = Some(100);
    cfg.pause_for = Duration::from_millis(700);
    cfg.pause_clients = Some(2);
    cfg.expect.in_order = true;
    cfg.expect.min_events = Some(2000);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    // The stalled clients' latency shows the stall.
    assert!(r.latency.max_us >= 500_000, "{}", r.human());
}

#[test]
fn mock_http_endpoints_and_drop() {
    use std::io::{Read, Write};
    let m = start_mock(500, 1, 0);
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(m.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(get("/").contains("jetrelay-mock"));
    assert!(get("/nope").starts_with("HTTP/1.1 404"));
    wait_for_events(&m, 10);
    let stats = get("/stats");
    let body = stats.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(v["seq"].as_u64().unwrap() >= 10);
    assert_eq!(v["subscribers"], 0);
    // A subscriber, then /drop: it must see EOF without a close frame.
    let (mut ws, _) = tungstenite::connect(format!("ws://{}/subscribe", m.local_addr())).unwrap();
    let first = ws.read().unwrap();
    assert!(first.is_text());
    assert_eq!(m.subscribers(), 1);
    assert!(get("/drop").contains("dropped 1"));
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(5));
        match ws.read() {
            Ok(tungstenite::Message::Close(_)) => panic!("drop must not send a close frame"),
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

#[test]
fn mock_rate_is_on_schedule_and_count_limits() {
    let m = mock::spawn(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rate: 1000,
        count: Some(700),
        ..Default::default()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let n = m.seq();
    assert!((400..=600).contains(&n), "{n} events after 0.5 s at 1000/s");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(m.seq(), 700);
}

#[test]
fn malformed_messages_are_interleaved_and_carry_no_seq() {
    let m = mock::spawn(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rate: 2000,
        malformed_every: Some(10),
        ..Default::default()
    })
    .unwrap();
    let (mut ws, _) = tungstenite::connect(format!("ws://{}/subscribe", m.local_addr())).unwrap();
    let (mut events, mut text_bad, mut binary, mut big) = (0, 0, 0, 0);
    let start = Instant::now();
    while big == 0 || binary == 0 || text_bad < 2 {
        assert!(start.elapsed() < Duration::from_secs(10));
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => {
                if t.len() >= mock::OVERSIZED_FRAME_LEN {
                    big += 1;
                } else if mock::Generator::seq_of(t.as_bytes()).is_some() {
                    events += 1;
                } else {
                    text_bad += 1;
                }
            }
            tungstenite::Message::Binary(_) => binary += 1,
            _ => {}
        }
    }
    assert!(events >= 30, "{events}");
}

#[test]
fn url_parsing_and_cursor_rewrite() {
    let t = parse_target("ws://127.0.0.1:6008/subscribe?wantedDids=x", true).unwrap();
    assert_eq!(t.path_and_query, "/subscribe?wantedDids=x&compress=true");
    assert_eq!(t.query, "wantedDids=x&compress=true");
    assert_eq!(t.host_header, "127.0.0.1:6008");
    assert!(!t.tls);
    let t = parse_target("wss://[::1]:8443", false).unwrap();
    assert!(t.tls);
    assert_eq!(t.host, "::1");
    assert_eq!(t.path_and_query, "/");
    assert!(parse_target("http://x", false).is_err());
    assert_eq!(
        with_cursor("/subscribe?cursor=1&a=b", 42),
        "/subscribe?a=b&cursor=42"
    );
    assert_eq!(with_cursor("/subscribe", 7), "/subscribe?cursor=7");
}
