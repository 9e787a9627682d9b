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
        start_immediately: true,
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
    // Generous: CI machines are shared; the expectation machinery itself is tested below.
    cfg.expect.p99_ms = Some(30_000.0);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    assert_eq!(r.verification_failures, 0);
    assert_eq!(r.connected, 20);
    assert!(r.events >= 20 * 1000, "{}", r.human());
    assert_eq!(r.latency.count, r.events);
    assert!(r.verified);
    assert_eq!(r.clients_behind, 0, "{}", r.human());
    assert!(r.reads > 0 && r.reads <= r.events, "{}", r.human());
    assert!((0.0..100.0).contains(&r.busy_pct), "{}", r.human());
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
    assert!(
        get("/subscribe").starts_with("HTTP/1.1 400"),
        "plain GET /subscribe"
    );
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
fn mock_waits_for_the_first_subscriber() {
    let m = mock::spawn(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rate: 2000,
        ..Default::default()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.seq(), 0, "nothing generated before anyone listens");
    let (mut ws, _) = tungstenite::connect(format!("ws://{}/subscribe", m.local_addr())).unwrap();
    let first = ws.read().unwrap();
    assert_eq!(mock::Generator::seq_of(first.into_data().as_ref()), Some(0));
}

#[test]
fn mock_rate_is_on_schedule_and_count_limits() {
    let m = mock::spawn(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rate: 1000,
        count: Some(700),
        start_immediately: true,
        ..Default::default()
    })
    .unwrap();
    // Judged against the time that really passed (a loaded machine oversleeps: 655 events
    // "after 0.5 s" was seen): never ahead of schedule, and not stalled.
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let n = m.seq();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        (n as f64) <= 1000.0 * elapsed + 50.0,
        "{n} events after {elapsed:.3} s at 1000/s: ahead of schedule"
    );
    assert!(n >= 200, "{n} events after {elapsed:.3} s at 1000/s");
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.seq() < 700 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(m.seq(), 700, "stops at --count");
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
    assert_eq!((t.wire, t.compressed), (Wire::V1, false));
    // The path picks the wire; --compress adds each wire's own parameter, and decoding follows
    // the final query, whoever asked.
    let v1 = parse_target("ws://127.0.0.1:1/subscribe?compress=true", false).unwrap();
    assert_eq!((v1.wire, v1.compressed), (Wire::V1, true));
    let v2 = parse_target(
        &format!("ws://127.0.0.1:1{SUBSCRIBE_EVENTS_PATH}?kinds=commit"),
        true,
    )
    .unwrap();
    assert_eq!(v2.wire, Wire::V2);
    assert_eq!(
        v2.path_and_query,
        format!("{SUBSCRIBE_EVENTS_PATH}?kinds=commit&zstdDictionary=20260811")
    );
    assert!(v2.compressed);
    let own = parse_target(
        &format!("ws://127.0.0.1:1{SUBSCRIBE_EVENTS_PATH}?zstdDictionary=7"),
        true,
    )
    .unwrap();
    assert_eq!(
        own.query, "zstdDictionary=7",
        "the URL's own choice is kept"
    );
    let v2_plain = parse_target(
        &format!("ws://127.0.0.1:1{SUBSCRIBE_EVENTS_PATH}?compress=true"),
        false,
    )
    .unwrap();
    assert!(
        !v2_plain.compressed,
        "compress=true means nothing on v2 (the server refuses it)"
    );
    assert_eq!(
        with_cursor(
            &format!("{SUBSCRIBE_EVENTS_PATH}?cursor=5&kinds=sync"),
            9u64
        ),
        format!("{SUBSCRIBE_EVENTS_PATH}?kinds=sync&cursor=9")
    );
}

/// A TLS terminator in front of the mock (tokio-rustls, test-only), returning its port and a
/// shutdown handle.
fn tls_front(
    backend: std::net::SocketAddr,
    cert: &rcgen::CertifiedKey,
) -> (
    u16,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                            let Ok(mut up) = tokio::net::TcpStream::connect(backend).await else {
                                return;
                            };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                        });
                    }
                }
            }
        });
    });
    (port, stop_tx, thread)
}

#[test]
fn wss_through_a_tls_terminator() {
    let m = start_mock(1000, 9, 0);
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let ca =
        std::env::temp_dir().join(format!("jetrelay-swarm-test-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let (port, stop, thread) = tls_front(m.local_addr(), &cert);
    let mut cfg = swarm(
        format!("wss://127.0.0.1:{port}/subscribe"),
        10,
        1.5,
        Some(9),
    );
    cfg.ca_file = Some(ca.clone());
    cfg.expect.in_order = true;
    cfg.expect.min_events = Some(300);
    cfg.expect.connected = Some(10);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    // Without the CA the handshake must fail (the certificate is self-signed).
    let mut cfg = swarm(format!("wss://127.0.0.1:{port}/subscribe"), 2, 0.5, Some(9));
    cfg.expect.connected = Some(1);
    let r = run(&cfg).unwrap();
    assert!(!r.passed, "{}", r.human());
    assert_eq!(r.connected, 0);
    let _ = stop.send(());
    thread.join().unwrap();
    let _ = std::fs::remove_file(ca);
}

/// A scripted upstream: upgrades up to `conns` connections and sends each the same messages,
/// then a close frame with `close_code`, and waits (bounded) for the client's reply.
fn scripted_server(
    conns: usize,
    script: Vec<tungstenite::Message>,
    close_code: u16,
) -> (std::net::SocketAddr, std::thread::JoinHandle<Vec<bool>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let mut got_close_reply = Vec::new();
        for _ in 0..conns {
            let (stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut ws = tungstenite::accept(stream).unwrap();
            for m in &script {
                ws.send(m.clone()).unwrap();
            }
            ws.close(Some(tungstenite::protocol::CloseFrame {
                code: close_code.into(),
                reason: "scripted".into(),
            }))
            .unwrap();
            let mut replied = false;
            loop {
                match ws.read() {
                    Ok(tungstenite::Message::Close(Some(f))) => {
                        replied = u16::from(f.code) == close_code;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            got_close_reply.push(replied);
        }
        got_close_reply
    });
    (addr, thread)
}

#[test]
fn compressed_stream_and_close_code_end_to_end() {
    let g = mock::Generator::new(21, 1000);
    let mut c =
        zstd::bulk::Compressor::with_dictionary(3, include_bytes!("../../assets/zstd_dictionary"))
            .unwrap();
    let now = 1_783_175_888_000_000;
    let script: Vec<_> = (500..800u64)
        .map(|seq| {
            let mut ev = Vec::new();
            g.event(seq, now + seq as i64, &mut ev);
            tungstenite::Message::Binary(c.compress(&ev).unwrap().into())
        })
        .collect();
    let (addr, server) = scripted_server(3, script, 1001);
    let mut cfg = swarm(format!("ws://{addr}/subscribe"), 3, 1.5, Some(21));
    cfg.compress = true;
    cfg.connect_rate = 3;
    cfg.expect.in_order = true;
    cfg.expect.first_seq = Some(500);
    cfg.expect.min_events = Some(300);
    cfg.expect.max_events = Some(300);
    cfg.expect.close_code = Some(1001);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    assert_eq!(r.closes.get("1001"), Some(&3));
    assert_eq!(r.events, 900);
    // Identical frames: one decompression per event, not per client (plus each client's first
    // frame, which has no predicted seq).
    assert!(r.frames_decompressed <= 303, "{}", r.human());
    assert_eq!(
        server.join().unwrap(),
        vec![true; 3],
        "close replies echo the code"
    );
}

#[test]
fn compressed_stream_with_a_gap_fails() {
    let g = mock::Generator::new(21, 1000);
    let mut c =
        zstd::bulk::Compressor::with_dictionary(3, include_bytes!("../../assets/zstd_dictionary"))
            .unwrap();
    let script: Vec<_> = [1u64, 2, 3, 5, 6]
        .iter()
        .map(|&seq| {
            let mut ev = Vec::new();
            g.event(seq, 1_783_175_888_000_000, &mut ev);
            tungstenite::Message::Binary(c.compress(&ev).unwrap().into())
        })
        .collect();
    let (addr, server) = scripted_server(1, script, 1000);
    let mut cfg = swarm(
        format!("ws://{addr}/subscribe?compress=true"),
        1,
        1.0,
        Some(21),
    );
    cfg.expect.in_order = true;
    let r = run(&cfg).unwrap();
    assert!(!r.passed);
    assert_eq!(r.verification_failures, 1, "{}", r.human());
    assert_eq!(r.failure_examples[0].seq, Some(5));
    server.join().unwrap();
}

/// Upgrades one connection, reads the client's first text message, sends `script`, closes.
fn hello_server(
    script: Vec<tungstenite::Message>,
) -> (std::net::SocketAddr, std::thread::JoinHandle<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // tungstenite rejects unmasked client frames, so this also checks our masking.
        let mut ws = tungstenite::accept(stream).unwrap();
        let hello = match ws.read().unwrap() {
            tungstenite::Message::Text(t) => t.to_string(),
            other => panic!("expected a text hello, got {other:?}"),
        };
        for m in &script {
            ws.send(m.clone()).unwrap();
        }
        let _ = ws.close(None);
        while ws.read().is_ok() {}
        hello
    });
    (addr, thread)
}

/// Text frames for `seqs` of generator (21, 50) at a fixed time.
fn text_events(seqs: impl IntoIterator<Item = u64>) -> Vec<tungstenite::Message> {
    let g = mock::Generator::new(21, 50);
    seqs.into_iter()
        .map(|s| {
            let mut ev = Vec::new();
            g.event(s, 1_783_175_888_000_000, &mut ev);
            tungstenite::Message::Text(String::from_utf8(ev).unwrap().into())
        })
        .collect()
}

#[test]
fn filtered_by_dids_and_size_end_to_end() {
    // The expected subset, computed here from first principles (not with the swarm's Filter).
    let g = mock::Generator::new(21, 50);
    let (d1, d2) = (g.did_by_index(3), g.did_by_index(7));
    let max = 600;
    let wanted: Vec<u64> = (0..3000u64)
        .filter(|&s| {
            let did = g.did_for(s);
            (did == d1 || did == d2) && g.event_len(s, 1_783_175_888_000_000) <= max
        })
        .collect();
    assert!(wanted.len() > 20, "{}", wanted.len());
    let url = |addr: std::net::SocketAddr| {
        format!("ws://{addr}/subscribe?wantedDids={d1}&wantedDids={d2}&maxMessageSizeBytes={max}")
    };
    let run_against = |seqs: Vec<u64>| {
        let (addr, server) = scripted_server(1, text_events(seqs), 1000);
        let mut cfg = swarm(url(addr), 1, 1.0, Some(21));
        cfg.dids = 50;
        cfg.expect.in_order = true;
        let r = run(&cfg).unwrap();
        server.join().unwrap();
        r
    };
    let r = run_against(wanted.clone());
    assert!(r.passed, "{}", r.human());
    assert_eq!(r.events, wanted.len() as u64);
    // Leaving out one wanted event is a gap that names it.
    let mut lossy = wanted.clone();
    let lost = lossy.remove(wanted.len() / 2);
    let r = run_against(lossy);
    assert!(!r.passed);
    assert!(
        r.failure_examples[0]
            .reason
            .contains(&format!("expected seq {lost}")),
        "{:?}",
        r.failure_examples
    );
    // Delivering one event over the size limit fails.
    let big = (0..3000u64)
        .find(|&s| g.did_for(s) == d1 && g.event_len(s, 1_783_175_888_000_000) > max)
        .unwrap();
    let r = run_against(vec![big]);
    assert!(!r.passed, "{}", r.human());
}

#[test]
fn send_on_open_reaches_the_server_masked_and_sets_the_filter() {
    let follows: Vec<u64> = (0..2000u64)
        .filter(|&s| {
            // Identity and account events always pass a collection filter.
            match mock::Generator::template_kind_and_collection(mock::Generator::template_index(s))
            {
                ("commit", c) => c == Some("app.bsky.graph.follow"),
                _ => true,
            }
        })
        .collect();
    let hello =
        r#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.graph.follow"]}}"#;
    let (addr, server) = hello_server(text_events(follows.clone()));
    let mut cfg = swarm(
        format!("ws://{addr}/subscribe?requireHello=true"),
        1,
        1.0,
        Some(21),
    );
    cfg.dids = 50;
    cfg.send_on_open = vec![hello.to_string()];
    cfg.expect.in_order = true;
    cfg.expect.min_events = Some(follows.len() as u64);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    assert_eq!(server.join().unwrap(), hello);
}

/// A mock whose first listener speaks `wire` (plus a v2 listener), already generating.
fn start_wire_mock(wire: mock::Wire, config: MockConfig) -> mock::MockHandle {
    mock::spawn(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        wire,
        dids: 1000,
        start_immediately: true,
        ..config
    })
    .expect("mock starts")
}

fn v2_url(m: &mock::MockHandle, query: &str) -> String {
    format!("ws://{}{SUBSCRIBE_EVENTS_PATH}?{query}", m.local_addr())
}

/// Seq-bearing wires with drops: every client resumes by its last seq, skips exactly the one
/// replayed event per reconnect, and gets every event once, in order.
#[test]
fn seq_wires_resume_exactly_across_drops() {
    let m = start_wire_mock(
        mock::Wire::V2,
        MockConfig {
            rate: 2000,
            seed: 3,
            time_jitter_ms: 20,
            sync_every: Some(25),
            drop_every: Some(Duration::from_millis(400)),
            ..Default::default()
        },
    );
    let mut cfg = swarm(
        format!("ws://{}/subscribe", m.local_addr()),
        6,
        2.0,
        Some(3),
    );
    cfg.urls.push(v2_url(&m, ""));
    cfg.urls.push(v2_url(&m, "zstdDictionary=20260811"));
    cfg.sync_every = Some(25);
    cfg.reconnect = true;
    cfg.expect.in_order = true;
    cfg.expect.min_events = Some(1000);
    cfg.expect.cursor_field = Some(true);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    assert!(r.upgrades >= 6 * 3, "{}", r.human());
    // Exact resume: one replayed duplicate per reconnect, no more.
    assert_eq!(r.duplicates_skipped, r.upgrades - 6, "{}", r.human());
    assert!(r.syncs > 0 && r.events_with_cursor > 0, "{}", r.human());
    // Resuming by time instead (a client that ignores seqs) would replay a jittered window:
    // the seq rule is what made the duplicates exactly one per reconnect.
}

/// The v2 control frames a client can get: `#info FutureCursor` before a live stream,
/// `CursorTooOld` before the upgrade, and `ConsumerTooSlow` for a reader left behind.
#[test]
fn v2_info_refusal_and_consumer_too_slow() {
    let m = start_wire_mock(
        mock::Wire::V2,
        MockConfig {
            rate: 20_000,
            seed: 3,
            history: 2_000,
            count: Some(60_000),
            ..Default::default()
        },
    );
    wait_for_events(&m, 3_000);
    let mut cfg = swarm(v2_url(&m, "cursor=999999999"), 2, 1.0, Some(3));
    cfg.expect.info = Some("FutureCursor".into());
    cfg.expect.in_order = true;
    cfg.expect.min_events = Some(100);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    assert_eq!(r.info_frames.get("FutureCursor"), Some(&2));
    // The same expectation on a plain live start fails, naming it.
    let mut cfg = swarm(v2_url(&m, ""), 1, 0.5, Some(3));
    cfg.expect.info = Some("FutureCursor".into());
    let r = run(&cfg).unwrap();
    assert!(!r.passed);
    assert_eq!(
        r.expectation_failures[0].expectation,
        "--expect-info FutureCursor"
    );
    // A seq below the mock's history: 400 before the upgrade.
    let mut cfg = swarm(v2_url(&m, "cursor=1"), 1, 0.5, Some(3));
    cfg.expect.http_status = Some(400);
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    // A reader that stalls falls out of the history: the terminal error frame, then the close.
    let mut cfg = swarm(v2_url(&m, ""), 1, 4.0, Some(3));
    cfg.pause_after = Some(10);
    cfg.pause_for = Duration::from_millis(1500);
    cfg.expect.error_frame = Some("ConsumerTooSlow".into());
    cfg.expect.in_order = true;
    let r = run(&cfg).unwrap();
    assert!(r.passed, "{}", r.human());
    assert!(
        r.error_messages["ConsumerTooSlow"].contains("reconnect with cursor="),
        "{}",
        r.human()
    );
}

/// Scripted v2 servers: seq gaps are legal (the relay's seqs may have them), a seq that does not
/// increase is not, and a gap in the events is caught whatever the seqs say.
#[test]
fn v2_scripted_seq_rules() {
    let g = mock::Generator::new(21, 1000);
    let frames = |list: &[(u64, u64)]| -> Vec<tungstenite::Message> {
        list.iter()
            .map(|&(n, seq)| {
                let mut v1 = Vec::new();
                g.event(n, 1_783_175_888_000_000 + n as i64, &mut v1);
                let mut v2 = Vec::new();
                crate::wire::v1_to_v2(&v1, seq, 1_783_175_888_000_100 + n as i64, &mut v2).unwrap();
                tungstenite::Message::Text(String::from_utf8(v2).unwrap().into())
            })
            .collect()
    };
    let run_script = |script| {
        let (addr, server) = scripted_server(1, script, 1000);
        let mut cfg = swarm(
            format!("ws://{addr}{SUBSCRIBE_EVENTS_PATH}"),
            1,
            1.0,
            Some(21),
        );
        cfg.expect.in_order = true;
        let r = run(&cfg).unwrap();
        server.join().unwrap();
        r
    };
    let r = run_script(frames(&[(0, 1), (1, 2), (2, 10), (3, 11), (4, 500)]));
    assert!(r.passed, "{}", r.human());
    assert_eq!(r.events, 5);
    let r = run_script(frames(&[(0, 5), (1, 6), (2, 3)]));
    assert!(!r.passed);
    assert!(
        r.failure_examples[0]
            .reason
            .contains("seq 3 from the server after seq 6"),
        "{:?}",
        r.failure_examples
    );
    // One seq for two events: the same server must always send the same bytes for a seq.
    let r = run_script(frames(&[(0, 1), (1, 2), (2, 2)]));
    assert!(!r.passed);
    assert!(
        r.failure_examples[0]
            .reason
            .contains("seq 2: differs from an earlier copy"),
        "{:?}",
        r.failure_examples
    );
    let r = run_script(frames(&[(0, 1), (1, 2), (3, 3)]));
    assert!(!r.passed);
    assert!(
        r.failure_examples[0].reason.contains("gap: expected seq 2"),
        "{:?}",
        r.failure_examples
    );
}
