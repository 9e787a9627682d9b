//! Faults lose nothing and stop nothing silently, against the real binaries: a critical thread
//! that dies or wedges (through the debug-only hook `TEST_JETRELAY_FAIL_PART`), a disk that
//! fills mid-stream (a small tmpfs, space freed mid-test), upstream clocks that disagree with
//! the relay's or with each other, one event stamped an hour ahead, and a relay `SIGKILL`ed
//! every few seconds while clients reconnect with their cursors.

mod common;

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::*;

/// The test hooks (`TEST_JETRELAY_FAIL_PART`, `TEST_JETRELAY_CRASH`) exist in debug builds only
/// (`cargo test`'s default); a release test run (e.g. a Nix package check) skips what needs them.
fn hooks_compiled_in() -> bool {
    if !cfg!(debug_assertions) {
        println!("SKIPPED: the test hooks are compiled into debug builds only");
    }
    cfg!(debug_assertions)
}

/// Waits (bounded) for a process to exit.
fn wait_exit(p: &mut Proc, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = p.child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A counter or gauge from `/metrics` (0 if absent).
fn metric(relay: &Relay, name: &str) -> f64 {
    let (_, body) = http_get(relay.metrics_port, "/metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Each critical part, made to panic, ends the process with status 70 and a log line naming
/// it (so systemd restarts the relay), instead of leaving it up with that part gone.
#[test]
fn a_dead_part_ends_the_process_and_names_it() {
    if !hooks_compiled_in() {
        return;
    }
    let mock = Mock::start(200, &[]);
    for part in [
        "fanout-1",
        "listener",
        "upstream",
        "retention",
        "cursor-scan",
        "metrics",
    ] {
        let dir = temp_dir("deadpart");
        let hook = format!("{part}:panic:1500");
        let mut relay = Relay::start_env(
            free_port(),
            &mock.url(),
            &dir,
            &["--workers", "2"],
            &[("TEST_JETRELAY_FAIL_PART", &hook)],
        );
        let status = wait_exit(&mut relay.proc, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("relay still running with {part} dead"));
        let log = relay.log_text();
        assert_eq!(status.code(), Some(70), "{part}: {status}\n{log}");
        assert!(
            log.contains("a critical part of the relay ended") && log.contains(part),
            "{part}: the log names the part\n{log}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// What the relay told systemd, one datagram at a time.
struct Notifications {
    /// The socket the relay sends to (`NOTIFY_SOCKET`).
    socket: UnixDatagram,
    /// Its path.
    path: PathBuf,
}

impl Notifications {
    fn bind(dir: &Path) -> Notifications {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        Notifications { socket, path }
    }

    /// Receives for up to `within`; returns each datagram's text with when it arrived.
    fn receive(&self, within: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                out.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
        out
    }
}

/// A fan-out worker that stops making progress (it hangs): the relay stops sending
/// `WATCHDOG=1`, so systemd restarts it, and `STATUS=` and `/readyz` name the worker.
#[test]
fn a_wedged_part_stops_the_watchdog_and_is_named() {
    if !hooks_compiled_in() {
        return;
    }
    let mock = Mock::start(200, &[]);
    let dir = temp_dir("wedged");
    let notify = Notifications::bind(&dir);
    let relay = Relay::start_env(
        free_port(),
        &mock.url(),
        &dir.join("data"),
        &["--workers", "2"],
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().expect("path")),
            // Keep-alives every 3 s, a part is stuck after 3 s without progress.
            ("WATCHDOG_USEC", "6000000"),
            ("TEST_JETRELAY_FAIL_PART", "fanout-0:hang:4500"),
        ],
    );
    // Healthy first: keep-alives arrive.
    let early = notify.receive(Duration::from_secs(4));
    assert!(
        early.iter().any(|(_, m)| m.contains("READY=1")),
        "{early:?}"
    );
    assert!(
        early.iter().any(|(_, m)| m.contains("WATCHDOG=1")),
        "keep-alives while healthy: {early:?}"
    );
    // Then the worker hangs: the status names it and keep-alives stop (watched for longer
    // than a keep-alive period after that).
    let mut later = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stuck_at = loop {
        later.extend(notify.receive(Duration::from_millis(500)));
        let stuck = later
            .iter()
            .find(|(_, m)| m.contains("stuck: fanout-0"))
            .map(|(at, _)| *at);
        match stuck {
            Some(at) if at.elapsed() > Duration::from_millis(4500) => break at,
            _ if Instant::now() > deadline => {
                panic!("no STATUS naming the stuck worker: {later:?}")
            }
            _ => {}
        }
    };
    let after: Vec<_> = later.iter().filter(|(at, _)| *at > stuck_at).collect();
    assert!(
        after.iter().all(|(_, m)| !m.contains("WATCHDOG=1")),
        "keep-alives stop once a part is stuck: {after:?}"
    );
    let (status, body) = http_get(relay.metrics_port, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("fanout-0"), "{body}");
    assert_eq!(metric(&relay, "jetrelay_parts_stuck"), 1.0);
    assert!(
        relay
            .log_text()
            .contains("withholding watchdog keep-alives")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs {
    /// Mount point (removed after the unmount, unless the test failed).
    path: TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `256m`); None if this machine does not let us (not root).
    fn mount(size: &str) -> Option<Tmpfs> {
        let path = temp_dir("tmpfs");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .ok()?;
        if !out.status.success() {
            println!(
                "SKIPPED: cannot mount a tmpfs ({}); CI runs as root",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs { path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Fills the filesystem holding `path` with a ballast file until a write fails.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("ballast");
    let block = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    while f.write_all(&block).is_ok() {
        written += block.len() as u64;
    }
    // The last partial megabyte too.
    for _ in 0..256 {
        if f.write_all(&block[..4096]).is_err() {
            break;
        }
        written += 4096;
    }
    let _ = f.sync_all();
    written
}

/// The data directory's filesystem fills mid-stream and space comes back later: appends wait
/// and retry (readiness says why, a metric counts it), then resume where they stopped; every
/// client ends with every event, in order, exactly once.
#[test]
fn mount_disk_full_appends_wait_then_resume_and_every_client_gets_every_event() {
    let Some(fs) = Tmpfs::mount("256m") else {
        return;
    };
    let events = 12_000u64;
    let mock = Mock::start(1000, &["--count", &events.to_string()]);
    let relay = Relay::start(&mock.url(), &fs.path.join("data"), &[]);
    let swarm = swarm_spawn(&[
        "--url",
        &relay.url("cursor=0"),
        "--clients",
        "20",
        "--duration",
        "30s",
        "--expect-in-order",
        "--expect-first-seq",
        "0",
        "--expect-min-events",
        &events.to_string(),
        "--expect-max-events",
        &events.to_string(),
    ]);
    std::thread::sleep(Duration::from_secs(3));
    let ballast = fs.path.join("ballast");
    let filled = fill(&ballast);
    let full_at = Instant::now();
    wait_until("appends failing", Duration::from_secs(10), || {
        let (status, body) = http_get(relay.metrics_port, "/readyz");
        status == 503 && body.contains("log appends failing")
    });
    assert!(metric(&relay, "jetrelay_log_appends_failing") == 1.0);
    // The disk stays full for a while; the upstream keeps producing.
    std::thread::sleep(Duration::from_secs(4));
    let errors = metric(&relay, "jetrelay_log_append_errors_total");
    assert!(errors >= 2.0, "failed attempts counted: {errors}");
    std::fs::remove_file(&ballast).expect("free space");
    wait_until("ready again", Duration::from_secs(15), || {
        http_get(relay.metrics_port, "/readyz").0 == 200
    });
    let full_for = full_at.elapsed();
    let report = swarm_wait(swarm);
    assert_eq!(report["events"].as_u64(), Some(20 * events), "{report}");
    let log = relay.log_text();
    assert!(log.contains("log append failed; retrying"), "{log}");
    assert!(log.contains("log appends resumed"), "{log}");
    assert_eq!(metric(&relay, "jetrelay_log_appends_failing"), 0.0);
    println!(
        "disk full: ballast {} MiB, appends blocked ~{:.1}s, {errors} failed attempts; \
         20 clients × {events} events, every one in order",
        filled >> 20,
        full_for.as_secs_f64()
    );
}

/// Reads up to `max` events (JSON) from a WebSocket URL, stopping after `quiet` without one.
fn read_events(url: &str, quiet: Duration, max: usize) -> Vec<String> {
    let (mut ws, _) = tungstenite::connect(url).expect("connect");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(quiet)).expect("timeout");
    }
    let mut out = Vec::new();
    while out.len() < max {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => out.push(t.to_string()),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    out
}

fn time_us(json: &str) -> i64 {
    serde_json::from_str::<serde_json::Value>(json).expect("json")["time_us"]
        .as_i64()
        .expect("time_us")
}

fn seq_of(json: &str) -> u64 {
    mock_seq(json.as_bytes()).expect("seq")
}

/// The upstream's clock is 10 minutes ahead of the relay's: a client resuming at one of its
/// events' `time_us` is replayed from there, not sent live because the cursor looks like the
/// future on the relay's own clock.
#[test]
fn cursors_are_judged_on_the_upstream_clock_not_the_relays() {
    let mock = Mock::start(300, &["--clock-offset-ms", "600000"]);
    let dir = temp_dir("clockahead");
    let relay = Relay::start(&mock.url(), &dir, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let events = read_events(&relay.url("cursor=0"), Duration::from_secs(2), 300);
    assert!(events.len() >= 300, "{}", events.len());
    let cursor = time_us(&events[200]);
    assert!(
        cursor > jetrelay::index::now_us() + 500_000_000,
        "the upstream's clock is ahead"
    );
    let first = events
        .iter()
        .position(|e| time_us(e) >= cursor)
        .expect("event");
    swarm_ok(&[
        "--url",
        &relay.url(&format!("cursor={cursor}")),
        "--clients",
        "5",
        "--duration",
        "3s",
        "--expect-in-order",
        "--expect-first-seq",
        &seq_of(&events[first]).to_string(),
    ]);
}

/// One upstream event is stamped an hour ahead, and the upstream drops the relay every 2 s:
/// the relay keeps resuming from the real time (every client gets every event once, in
/// order), and a cursor just before the outlier's time — an hour in the future of the real
/// events — is live, not a replay from the outlier.
#[test]
fn an_outlier_time_moves_neither_the_resume_point_nor_the_replay_index() {
    let mock = Mock::start(
        500,
        &["--time-outlier", "400:3600000", "--drop-every", "2s"],
    );
    let dir = temp_dir("outlier");
    let relay = Relay::start(&mock.url(), &dir, &["--rewind", "1s"]);
    let swarm = swarm_spawn(&[
        "--url",
        &relay.url("cursor=0"),
        "--clients",
        "10",
        "--duration",
        "9s",
        "--expect-in-order",
        "--expect-first-seq",
        "0",
        "--expect-min-events",
        "3500",
    ]);
    std::thread::sleep(Duration::from_secs(4));
    let events = read_events(&relay.url("cursor=0"), Duration::from_secs(2), 800);
    let outlier = events
        .iter()
        .find(|e| seq_of(e) == 400)
        .expect("the outlier was relayed like any event");
    assert!(time_us(outlier) > time_us(&events[399]) + 3_000_000_000);
    let cursor = time_us(outlier) - 1_000_000;
    let live_from = mock.seq();
    let first = read_events(
        &relay.url(&format!("cursor={cursor}")),
        Duration::from_secs(3),
        1,
    );
    let first = seq_of(first.first().expect("a live event"));
    // Live within a second of the feed (the probe can fall into the mock's drop every 2 s and
    // the relay's reconnect wait: 85 ms behind was seen). Replaying from the outlier's place
    // in the index instead would start at 401, thousands behind.
    assert!(
        live_from > 1500 && first + 500 >= live_from,
        "a cursor past every real event is live: got seq {first}, live was {live_from}"
    );
    swarm_wait(swarm);
    // Every resume after the outlier asked for a cursor on the real clock (the mock replays
    // in history order, so a cursor at the outlier would go unnoticed by the clients; a real
    // Jetstream would send nothing older than it).
    let log = relay.log_text();
    let resumes: Vec<i64> = log
        .lines()
        .filter(|l| l.contains("connected to upstream"))
        .filter_map(|l| {
            l.split("cursor=")
                .nth(1)?
                .trim_end_matches('"')
                .parse()
                .ok()
        })
        .filter(|c| *c > 0)
        .collect();
    assert!(resumes.len() >= 2, "{log}");
    for c in resumes {
        assert!(
            c < time_us(outlier) - 3_000_000_000,
            "resume cursor {c} near the outlier"
        );
    }
    assert!(log.contains("stamped far ahead"), "the outlier is logged");
}

/// Failover between two upstream instances whose clocks differ by 20 s (far more than the
/// rewind): the relay resumes on the second one `--upstream-skew` earlier, so clients see
/// every event once, in order; the log states the measured offset.
#[test]
fn failover_between_upstreams_with_skewed_clocks_loses_nothing() {
    let a = Mock::start(500, &["--start-immediately"]);
    let b = Mock::start(500, &["--start-immediately", "--clock-offset-ms", "-20000"]);
    let dir = temp_dir("skew");
    let relay = Relay::start(
        &a.url(),
        &dir,
        &[
            "--upstream",
            &b.url(),
            "--rewind",
            "1s",
            "--upstream-skew",
            "30s",
        ],
    );
    let swarm = swarm_spawn(&[
        "--url",
        &relay.url("cursor=0"),
        "--clients",
        "10",
        "--duration",
        "12s",
        "--expect-in-order",
        "--expect-first-seq",
        "0",
        "--expect-min-events",
        "4500",
    ]);
    std::thread::sleep(Duration::from_secs(4));
    let mut a = a;
    a.proc.kill9();
    swarm_wait(swarm);
    let log = relay.log_text();
    let offset: i64 = log
        .lines()
        .find(|l| l.contains("resumed with overlap"))
        .and_then(|l| l.split("clock_offset_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the resume states the measured offset: {log}"));
    assert!((-21_000..=-19_000).contains(&offset), "{offset} ms");
}

/// The relay is `SIGKILL`ed every 2–4 s while the upstream produces 2,000 events/s and clients
/// reconnect with their cursors: every client ends with every event exactly once, in order.
/// `TEST_JETRELAY_SOAK_KILL_LOOP=1` runs it for a minute.
#[test]
fn kill_loop_every_client_gets_every_event_exactly_once_in_order() {
    let soak = std::env::var_os("TEST_JETRELAY_SOAK_KILL_LOOP").is_some();
    let (produce_s, clients) = if soak { (60u64, 50u64) } else { (16, 20) };
    let rate = 2_000u64;
    let events = rate * produce_s;
    let mock = Mock::start(rate, &["--count", &events.to_string()]);
    let dir = temp_dir("killloop");
    let flags = ["--rewind", "2s", "--upstream-skew", "2s"];
    let mut relay = Relay::start(&mock.url(), &dir, &flags);
    let port = relay.port;
    let swarm = swarm_spawn(&[
        "--url",
        &relay.url("cursor=0"),
        "--clients",
        &clients.to_string(),
        "--reconnect",
        "--duration",
        &format!("{}s", produce_s + 20),
        "--expect-in-order",
        "--expect-first-seq",
        "0",
        "--expect-min-events",
        &events.to_string(),
        "--expect-max-events",
        &events.to_string(),
    ]);
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(produce_s) {
        std::thread::sleep(Duration::from_millis(rng.u64(2_000..4_000)));
        relay.proc.kill9();
        kills += 1;
        std::thread::sleep(Duration::from_millis(200));
        relay = Relay::start_on(port, &mock.url(), &dir, &flags);
    }
    let report = swarm_wait(swarm);
    assert_eq!(
        report["events"].as_u64(),
        Some(clients * events),
        "{report}"
    );
    println!(
        "kill loop: {kills} SIGKILLs in {produce_s}s at {rate} ev/s; {clients} clients each got \
         all {events} events once, in order; {} upgrades, {} replayed duplicates skipped by \
         the clients",
        report["upgrades"], report["duplicates_skipped"]
    );
    assert!(kills >= 4);
    assert!(relay.log_text().contains("log recovered"));
}
