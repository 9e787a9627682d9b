//! The jetrelay-mock and jetrelay-swarm binaries as users run them: flags, exit codes, JSON
//! report, and `--processes` sharding with report merging.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SWARM: &str = env!("CARGO_BIN_EXE_jetrelay-swarm");
const MOCK: &str = env!("CARGO_BIN_EXE_jetrelay-mock");

/// Kills the child (ours, by pid) when dropped.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Starts the mock binary and waits (bounded) until it serves /stats.
fn start_mock(args: &[&str]) -> (Reaper, u16) {
    let port = free_port();
    let child = Command::new(MOCK)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reaper = Reaper(child);
    let start = Instant::now();
    while http_get(port, "/stats").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "mock did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (reaper, port)
}

fn run_swarm(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(SWARM)
        .args(args)
        .args(["--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr)
}

#[test]
fn swarm_processes_merge_and_pass() {
    let (_mock, port) = start_mock(&["--rate", "1000", "--seed", "4", "--dids", "500"]);
    let url = format!("ws://127.0.0.1:{port}/subscribe");
    let (code, r, stderr) = run_swarm(&[
        "--url",
        &url,
        "--clients",
        "6",
        "--processes",
        "2",
        "--duration",
        "2s",
        "--seed",
        "4",
        "--dids",
        "500",
        "--expect-in-order",
        "--expect-min-events",
        "200",
        "--expect-connected",
        "6",
    ]);
    assert_eq!(code, 0, "{r}\n{stderr}");
    assert_eq!(r["passed"], true);
    assert_eq!(r["clients"], 6);
    assert_eq!(r["processes"], 2);
    assert_eq!(r["connected"], 6);
    assert!(r["events"].as_u64().unwrap() >= 6 * 200);
    assert!(
        r.get("histogram").is_none(),
        "internal merge data is not printed"
    );
}

#[test]
fn swarm_exits_non_zero_naming_the_failed_expectation() {
    let (_mock, port) = start_mock(&["--rate", "500", "--seed", "4"]);
    let url = format!("ws://127.0.0.1:{port}/subscribe");
    let (code, r, stderr) = run_swarm(&[
        "--url",
        &url,
        "--clients",
        "2",
        "--duration",
        "1s",
        "--seed",
        "5",
        "--expect-in-order",
    ]);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["passed"], false);
    assert!(r["verification_failures"].as_u64().unwrap() > 0);
    assert!(stderr.contains("FAILED"), "{stderr}");
    assert!(stderr.contains("bytes differ"), "{stderr}");
    // Option errors are exit code 2.
    let out = Command::new(SWARM)
        .args(["--url", &url, "--expect-in-order"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("need --seed"));
}

#[test]
fn mock_binary_drop_and_count() {
    let (_mock, port) = start_mock(&["--rate", "2000", "--count", "300", "--start-immediately"]);
    let start = Instant::now();
    loop {
        let stats = http_get(port, "/stats").unwrap();
        let body = stats.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        if v["seq"] == 300 {
            break;
        }
        assert!(v["seq"].as_u64().unwrap() <= 300);
        assert!(start.elapsed() < Duration::from_secs(10), "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(http_get(port, "/drop").unwrap().contains("dropped 0"));
    // A replay from the beginning delivers exactly the 300 events, in order, then nothing.
    let url = format!("ws://127.0.0.1:{port}/subscribe?cursor=0");
    let (code, r, stderr) = run_swarm(&[
        "--url",
        &url,
        "--clients",
        "3",
        "--duration",
        "1s",
        "--seed",
        "1",
        "--expect-in-order",
        "--expect-first-seq",
        "0",
        "--expect-min-events",
        "300",
        "--expect-max-events",
        "300",
    ]);
    assert_eq!(code, 0, "{r}\n{stderr}");
}

/// `--wire` and `--also-listen`: one stream on two wires; a bad wire is refused naming the
/// choices.
#[test]
fn mock_binary_wires_per_listener() {
    let v2_port = free_port();
    let (_mock, port) = start_mock(&[
        "--wire",
        "cursor",
        "--also-listen",
        &format!("127.0.0.1:{v2_port}=v2"),
        "--rate",
        "1000",
    ]);
    // The body is binary: read bytes.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", v2_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /xrpc/network.bsky.jetstream.getZstdDictionary HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let dict = String::from_utf8_lossy(&raw);
    assert!(dict.starts_with("HTTP/1.1 200"), "{}", &dict[..100]);
    assert!(dict.contains("X-Zstd-Dictionary-Id: 20260811"));
    // The cursor-wire listener has no v2 endpoints.
    let none = http_get(port, "/xrpc/network.bsky.jetstream.getZstdDictionary").unwrap();
    assert!(none.starts_with("HTTP/1.1 404"), "{none}");
    let index = http_get(port, "/").unwrap();
    assert!(index.contains("(cursor wire)"), "{index}");
    let out = Command::new(MOCK).args(["--wire", "v3"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected legacy, cursor or v2"), "{stderr}");
    let out = Command::new(MOCK)
        .args(["--also-listen", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected ADDR=WIRE"));
}

/// The swarm binary against the mock binary's seq-bearing wires (`--wire cursor` and a `v2`
/// listener over the same stream, text and compressed), with the mock dropping every
/// connection every second and `#sync` messages on v2: every client resumes by its seq and
/// ends with every one of the `--count` events exactly once, in order.
#[test]
fn swarm_binary_on_seq_wires_gets_every_event_once_across_drops() {
    let v2_port = free_port();
    let (_mock, port) = start_mock(&[
        "--wire",
        "cursor",
        "--also-listen",
        &format!("127.0.0.1:{v2_port}=v2"),
        "--rate",
        "1000",
        "--count",
        "3000",
        "--seed",
        "4",
        "--dids",
        "500",
        "--sync-every",
        "50",
        "--time-jitter-ms",
        "20",
        "--drop-every",
        "1s",
    ]);
    let v2 = format!("ws://127.0.0.1:{v2_port}/xrpc/network.bsky.jetstream.subscribeEvents");
    // Seq cursor 1 = the mock's first event: the whole stream from the start.
    let urls = [
        format!("ws://127.0.0.1:{port}/subscribe?cursor=1"),
        format!("{v2}?cursor=1"),
        format!("{v2}?cursor=1&zstdDictionary=20260811"),
    ];
    // 3000 events of which every 50th is a #sync: 2940 events on every wire, plus 60 #sync
    // messages on v2 (a seq gap on /subscribe).
    let (code, r, stderr) = run_swarm(&[
        "--url",
        &urls[0],
        "--url",
        &urls[1],
        "--url",
        &urls[2],
        "--clients",
        "6",
        "--duration",
        "6s",
        "--seed",
        "4",
        "--dids",
        "500",
        "--sync-every",
        "50",
        "--reconnect",
        "--expect-in-order",
        "--expect-first-seq",
        "0",
        "--expect-min-events",
        "2940",
        "--expect-max-events",
        "2940",
        "--expect-cursor-field",
        "present",
    ]);
    assert_eq!(code, 0, "{r}\n{stderr}");
    assert_eq!(r["syncs"], 4 * 60, "{r}");
    assert_eq!(r["events_with_cursor"], 2 * 2940, "{r}");
    let upgrades = r["upgrades"].as_u64().unwrap();
    assert!(upgrades >= 6 * 3, "the mock's drops forced reconnects: {r}");
    // Exact resume: exactly the one re-delivered event per reconnect was skipped.
    assert_eq!(
        r["duplicates_skipped"].as_u64().unwrap(),
        upgrades - 6,
        "{r}"
    );
    // Against the legacy wire the cursor-field expectation fails, naming the flag.
    let (_legacy, legacy_port) = start_mock(&["--rate", "500", "--seed", "4"]);
    let (code, r, stderr) = run_swarm(&[
        "--url",
        &format!("ws://127.0.0.1:{legacy_port}/subscribe"),
        "--duration",
        "1s",
        "--seed",
        "4",
        "--expect-cursor-field",
        "present",
    ]);
    assert_eq!(code, 1, "{r}");
    assert!(stderr.contains("--expect-cursor-field present"), "{stderr}");
}
