//! Exact resume under faults (issue 21), with the real binaries: an upstream that drops every
//! connection every two seconds from its first second on, the relay SIGKILLed every few seconds,
//! and swarms of v1 and v2 clients that reconnect with the last seq they received. Every client
//! must end with every event of the generator exactly once, in order, byte-exact (the swarm
//! compares each frame with the mock's generator: v1 with the relay's cursor field stripped, v2
//! as the canonical rendering). Then relay chains: jetrelay following jetrelay over each wire.
//!
//! Each test takes ~20–30 s.

mod common;

use common::{Mock, Relay, swarm_spawn, swarm_wait, temp_dir};
use std::time::{Duration, Instant};

const SUBSCRIBE_EVENTS: &str = "/xrpc/network.bsky.jetstream.subscribeEvents";
/// The relay flags of every test: a short rewind keeps legacy resumes quick.
const FLAGS: [&str; 4] = ["--rewind", "2s", "--upstream-skew", "2s"];
const RATE: u64 = 1_000;
const EVENTS: u64 = 10_000;
const SYNC_EVERY: u64 = 50;

/// What a client must end with: on v1 every event but the #syncs (they have no v1 form); on
/// v2 the same events, and the #syncs counted apart.
fn expected(v2: bool, syncs: bool) -> (u64, u64) {
    let n_syncs = if syncs { EVENTS / SYNC_EVERY } else { 0 };
    (EVENTS - n_syncs, if v2 { n_syncs } else { 0 })
}

/// A swarm of `clients` reconnecting by seq to `url`, expecting the whole stream from event 0.
fn spawn(url: &str, clients: u64, syncs: bool, duration: Duration) -> std::process::Child {
    let (events, _) = expected(url.contains(SUBSCRIBE_EVENTS), syncs);
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
        "0".into(),
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
fn check(name: &str, swarm: std::process::Child, url: &str, clients: u64, syncs: bool) {
    let report = swarm_wait(swarm);
    let (events, n_syncs) = expected(url.contains(SUBSCRIBE_EVENTS), syncs);
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

/// The relay follows `upstream` (served by a mock dropping every connection every 2 s) and is
/// SIGKILLed every 2.5–4 s while the mock produces; v1 and v2 swarms reconnect by seq.
fn kill_loop(name: &str, mock_wire: &str, upstream_path: &str, syncs: bool) {
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
    let mock = Mock::start(RATE, &mock_args);
    let upstream = format!("ws://127.0.0.1:{}{upstream_path}", mock.port);
    let dir = temp_dir(name);
    let mut relay = Relay::start(&upstream, &dir, &FLAGS);
    let port = relay.port;
    let produce = Duration::from_secs(EVENTS / RATE);
    let duration = produce + Duration::from_secs(14);
    let urls = [
        relay.url("cursor=0"),
        format!("ws://127.0.0.1:{port}{SUBSCRIBE_EVENTS}?cursor=0"),
    ];
    let swarms: Vec<_> = urls.iter().map(|u| spawn(u, 4, syncs, duration)).collect();
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(21);
    let mut kills = 0;
    while started.elapsed() < produce {
        std::thread::sleep(Duration::from_millis(rng.u64(2_500..4_000)));
        restart(&mut relay, &upstream, &dir);
        kills += 1;
    }
    for (swarm, url) in swarms.into_iter().zip(&urls) {
        check(name, swarm, url, 4, syncs);
    }
    println!("{name}: {kills} SIGKILLs, the upstream dropping every connection every 2 s");
    assert!(kills >= 3, "{name}: only {kills} kills");
    let log = relay.log_text();
    assert!(log.contains("log recovered"), "{name}: {log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kill_loop_over_a_flapping_v2_upstream_resumes_exactly_by_seq() {
    kill_loop(
        "resume-v2-upstream",
        "v2",
        &format!("{SUBSCRIBE_EVENTS}?cursor=0"),
        true,
    );
}

#[test]
fn kill_loop_over_a_flapping_cursor_subscribe_upstream_resumes_exactly_by_seq() {
    kill_loop(
        "resume-cursor-upstream",
        "cursor",
        "/subscribe?cursor=0",
        false,
    );
}

/// A legacy upstream (no seqs): the relay resumes by time and de-duplicates; the mock drops
/// every connection from the first seconds on, inside the rewind window of the relay's first
/// connection (events from before the relay's first event must never follow newer ones).
#[test]
fn kill_loop_over_a_flapping_legacy_upstream_loses_and_reorders_nothing() {
    kill_loop("resume-legacy-upstream", "legacy", "/subscribe", false);
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
        .map(|(u, syncs)| spawn(u, 3, *syncs, duration))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    restart(&mut a, &mock_url, &dirs[0]);
    std::thread::sleep(Duration::from_secs(2));
    restart(&mut b, &a_v1, &dirs[1]);
    std::thread::sleep(Duration::from_secs(2));
    restart(&mut c, &a_v2, &dirs[2]);
    for (swarm, (url, syncs)) in swarms.into_iter().zip(&clients) {
        check("chain", swarm, url, 3, *syncs);
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
