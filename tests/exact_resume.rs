//! Exact resume under faults (issue 21), with the real binaries: an upstream that drops every
//! connection every two seconds from its first second on, the relay SIGKILLed every few seconds,
//! and swarms of v1 and v2 clients that reconnect with the last seq they received. Every client
//! must end with every event of the generator (from the relay's first one: the legacy mock
//! starts before the relay) exactly once, in order, byte-exact (the swarm
//! compares each frame with the mock's generator: v1 with the relay's cursor field stripped, v2
//! as the canonical rendering). Then relay chains: jetrelay following jetrelay over each wire.
//!
//! Each test takes ~20–30 s.

mod common;

use common::{Mock, Relay, mock_seq, swarm_spawn, swarm_wait, temp_dir, wait_until};
use std::time::{Duration, Instant};

const SUBSCRIBE_EVENTS: &str = "/xrpc/network.bsky.jetstream.subscribeEvents";
/// The relay flags of every test: a short rewind keeps legacy resumes quick.
const FLAGS: [&str; 4] = ["--rewind", "2s", "--upstream-skew", "2s"];
const RATE: u64 = 1_000;
const EVENTS: u64 = 10_000;
const SYNC_EVERY: u64 = 50;

/// What a client must end with, from generator event `first` on: on v1 every event but the
/// #syncs (they have no v1 form); on v2 the same events, and the #syncs counted apart.
fn expected(v2: bool, syncs: bool, first: u64) -> (u64, u64) {
    // The #syncs are events n·SYNC_EVERY − 1; first / SYNC_EVERY of them precede `first`.
    let n_syncs = if syncs {
        EVENTS / SYNC_EVERY - first / SYNC_EVERY
    } else {
        0
    };
    (EVENTS - first - n_syncs, if v2 { n_syncs } else { 0 })
}

/// A swarm of `clients` reconnecting by seq to `url`, expecting the whole stream from
/// generator event `first` (the relay's first) on.
fn spawn(
    url: &str,
    clients: u64,
    syncs: bool,
    duration: Duration,
    first: u64,
) -> std::process::Child {
    let (events, _) = expected(url.contains(SUBSCRIBE_EVENTS), syncs, first);
    let mut args = vec![
        "--url".to_string(),
        url.to_string(),
        "--clients".into(),
        clients.to_string(),
        "--reconnect".into(),
        "--duration".into(),
        format!("{}s", duration.as_secs()),
        "--expect-in-order".into(),
        "--expect-first-seq".into(),
        first.to_string(),
        "--expect-min-events".into(),
        events.to_string(),
        "--expect-max-events".into(),
        events.to_string(),
    ];
    if syncs {
        args.extend(["--sync-every".into(), SYNC_EVERY.to_string()]);
    }
    swarm_spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Waits for a swarm and checks its totals (the swarm's own expectations check each client).
fn check(name: &str, swarm: std::process::Child, url: &str, clients: u64, syncs: bool, first: u64) {
    let report = swarm_wait(swarm);
    let (events, n_syncs) = expected(url.contains(SUBSCRIBE_EVENTS), syncs, first);
    assert_eq!(
        report["events"].as_u64(),
        Some(clients * events),
        "{name}: {report}"
    );
    assert_eq!(
        report["syncs"].as_u64(),
        Some(clients * n_syncs),
        "{name}: {report}"
    );
    println!(
        "{name}: {clients} clients × {events} events (+{n_syncs} #sync) exactly once in order; \
         {} upgrades, {} replayed duplicates skipped by the clients",
        report["upgrades"], report["duplicates_skipped"]
    );
}

/// Kills `relay` and starts it again on its port with the same data dir.
fn restart(relay: &mut Relay, upstream: &str, dir: &std::path::Path) {
    relay.proc.kill9();
    std::thread::sleep(Duration::from_millis(200));
    *relay = Relay::start_on(relay.port, upstream, dir, &FLAGS);
}

/// What the relay logs when the first event of a resume by time is judged (with or without
/// the overlap it expects).
const RESUMED_BY_TIME: [&str; 2] = ["resumed with overlap", "resumed upstream without overlap"];

/// What the relay logs when it dropped what a resume replayed from before its first event.
const DROPPED_BEFORE_HISTORY: &str =
    "dropped events the upstream replayed from before the relay's first event";

/// The generator's number of the relay's first event: the first frame of its `cursor=0`.
fn relay_first_event(relay: &Relay) -> u64 {
    let url = relay.url("cursor=0");
    let (mut ws, _) = tungstenite::connect(&url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
    }
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                return mock_seq(t.as_bytes())
                    .unwrap_or_else(|| panic!("not a generator event: {}", t.as_str()));
            }
            Ok(_) => {}
            Err(e) => panic!("reading the relay's first event: {e}"),
        }
    }
}

/// The relay follows `upstream` (served by a mock dropping every connection every 2 s) and is
/// SIGKILLed every 2.5–4 s while the mock produces; v1 and v2 swarms reconnect by seq.
///
/// With `head_start`, the mock produces for that long before the relay first connects, so the
/// relay's first event is not the mock's, and the mock's first drop (within 2 s, the rewind,
/// of the relay's first connection) makes the resume reach before the relay's first event.
/// Clients must get, from the relay's first event on, every event exactly once in order:
/// never one from before it after newer ones.
fn kill_loop(
    name: &str,
    mock_wire: &str,
    upstream_path: &str,
    syncs: bool,
    head_start: Option<Duration>,
) {
    let mut mock_args = vec![
        "--wire",
        mock_wire,
        "--drop-every",
        "2s",
        "--count",
        "10000",
    ];
    let every = SYNC_EVERY.to_string();
    if syncs {
        mock_args.extend(["--sync-every", &every]);
    }
    if head_start.is_some() {
        mock_args.push("--start-immediately");
    }
    let mock = Mock::start(RATE, &mock_args);
    if let Some(head_start) = head_start {
        std::thread::sleep(head_start);
    }
    let upstream = format!("ws://127.0.0.1:{}{upstream_path}", mock.port);
    let dir = temp_dir(name);
    let mut relay = Relay::start(&upstream, &dir, &FLAGS);
    let first = match head_start {
        Some(head_start) => {
            let first = relay_first_event(&relay);
            let least = head_start.as_millis() as u64 * RATE / 1000 / 2;
            assert!(
                first >= least,
                "{name}: the relay's first event is {first}: the mock did not start first"
            );
            first
        }
        None => 0,
    };
    let port = relay.port;
    let produce = Duration::from_secs(EVENTS / RATE);
    let duration = produce + Duration::from_secs(14);
    let urls = [
        relay.url("cursor=0"),
        format!("ws://127.0.0.1:{port}{SUBSCRIBE_EVENTS}?cursor=0"),
    ];
    let swarms: Vec<_> = urls
        .iter()
        .map(|u| spawn(u, 4, syncs, duration, first))
        .collect();
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(21);
    let mut kills = 0;
    // The log of the relay's first run (each restart starts a new one).
    let mut first_run_log = None;
    while started.elapsed() < produce {
        let delay = Duration::from_millis(rng.u64(2_500..4_000));
        let slept = Instant::now();
        if head_start.is_some() && kills == 0 {
            // The first kill comes after the first connection's resume, or it would not be
            // the first connection's.
            wait_until(
                "the resume after the mock's first drop",
                Duration::from_secs(10),
                || {
                    let log = relay.log_text();
                    RESUMED_BY_TIME.iter().any(|m| log.contains(m))
                },
            );
            first_run_log = Some(relay.log_text());
        }
        std::thread::sleep(delay.saturating_sub(slept.elapsed()));
        restart(&mut relay, &upstream, &dir);
        kills += 1;
    }
    for (swarm, url) in swarms.into_iter().zip(&urls) {
        check(name, swarm, url, 4, syncs, first);
    }
    println!("{name}: {kills} SIGKILLs, the upstream dropping every connection every 2 s");
    assert!(kills >= 3, "{name}: only {kills} kills");
    let log = relay.log_text();
    assert!(log.contains("log recovered"), "{name}: {log}");
    if let Some(log) = first_run_log {
        // The case this exercises happened: the first connection's resume reached before the
        // relay's first event, and what it replayed from there was dropped.
        assert!(log.contains(DROPPED_BEFORE_HISTORY), "{name}: {log}");
        assert!(log.contains(RESUMED_BY_TIME[0]), "{name}: {log}");
        println!("{name}: the relay's first event was the mock's event {first}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kill_loop_over_a_flapping_v2_upstream_resumes_exactly_by_seq() {
    kill_loop(
        "resume-v2-upstream",
        "v2",
        &format!("{SUBSCRIBE_EVENTS}?cursor=0"),
        true,
        None,
    );
}

#[test]
fn kill_loop_over_a_flapping_cursor_subscribe_upstream_resumes_exactly_by_seq() {
    kill_loop(
        "resume-cursor-upstream",
        "cursor",
        "/subscribe?cursor=0",
        false,
        None,
    );
}

/// A legacy upstream (no seqs): the relay resumes by time and de-duplicates. The mock has
/// produced for 1.5 s when the relay first connects, and drops every connection from its
/// second 2 on, inside the rewind window of the relay's first connection: the resume replays
/// events from before the relay's first one, which must never follow newer ones.
#[test]
fn kill_loop_over_a_flapping_legacy_upstream_loses_and_reorders_nothing() {
    kill_loop(
        "resume-legacy-upstream",
        "legacy",
        "/subscribe",
        false,
        Some(Duration::from_millis(1_500)),
    );
}

/// jetrelay following jetrelay: A follows the mock's subscribeEvents; B follows A's `/subscribe`
/// (v1 with A's seqs as cursors); C follows A's subscribeEvents. A, B and C are each SIGKILLed
/// once while the mock produces; clients of B (v1) and C (both wires) get every event exactly once,
/// in order, byte-exact; B's and C's followers resume from A by A's seqs.
#[test]
fn relay_chains_over_each_wire_are_byte_exact_and_resume_exactly() {
    let mock = Mock::start(
        RATE,
        &[
            "--wire",
            "v2",
            "--count",
            "10000",
            "--sync-every",
            &SYNC_EVERY.to_string(),
        ],
    );
    let mock_url = format!("ws://127.0.0.1:{}{SUBSCRIBE_EVENTS}?cursor=0", mock.port);
    let dirs = [
        temp_dir("chain-a"),
        temp_dir("chain-b"),
        temp_dir("chain-c"),
    ];
    let mut a = Relay::start(&mock_url, &dirs[0], &FLAGS);
    let a_v1 = a.url("cursor=0");
    let a_v2 = format!("ws://127.0.0.1:{}{SUBSCRIBE_EVENTS}?cursor=0", a.port);
    let mut b = Relay::start(&a_v1, &dirs[1], &FLAGS);
    let mut c = Relay::start(&a_v2, &dirs[2], &FLAGS);
    let produce = Duration::from_secs(EVENTS / RATE);
    let duration = produce + Duration::from_secs(14);
    // B learned A's stream over v1, where #sync has no form: its v1 clients get every other
    // event (its v2 clients would miss the #syncs, which the swarm's model places, so only
    // v1 clients read B). C learned it over v2 and serves the #syncs to its v2 clients.
    let clients = [
        (b.url("cursor=0"), true),
        (c.url("cursor=0"), true),
        (
            format!("ws://127.0.0.1:{}{SUBSCRIBE_EVENTS}?cursor=0", c.port),
            true,
        ),
    ];
    let swarms: Vec<_> = clients
        .iter()
        .map(|(u, syncs)| spawn(u, 3, *syncs, duration, 0))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    restart(&mut a, &mock_url, &dirs[0]);
    std::thread::sleep(Duration::from_secs(2));
    restart(&mut b, &a_v1, &dirs[1]);
    std::thread::sleep(Duration::from_secs(2));
    restart(&mut c, &a_v2, &dirs[2]);
    for (swarm, (url, syncs)) in swarms.into_iter().zip(&clients) {
        check("chain", swarm, url, 3, *syncs, 0);
    }
    // B and C followed an upstream that numbers its events: after their restart and after A's,
    // they resumed by A's seq, never by time.
    for (name, relay) in [("B", &b), ("C", &c)] {
        let log = relay.log_text();
        assert!(
            log.contains("resuming exactly from the upstream seq appended last"),
            "{name}: {log}"
        );
        assert!(!log.contains("resumed with overlap"), "{name}: {log}");
    }
    for dir in &dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}
