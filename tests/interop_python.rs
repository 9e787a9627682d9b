//! Interoperability with a WebSocket client nobody here wrote: Python's `websockets` package
//! (and `zstandard` for the compressed stream) drives the real relay through
//! tests/interop/websockets_client.py. The script reports what it received; this test compares
//! it byte-exact with its own reference (the unfiltered replay read with tungstenite and checked
//! against the mock's generator) filtered by its own few lines.
//!
//! Python 3 with `websockets` and `zstandard` is required: the test fails (it does not skip)
//! without them, saying how to install them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use jetrelay::mock::Generator;

/// The harness starts the mock with `--seed 7`.
const SEED: u64 = 7;
/// Events in the finite stream the script reads.
const COUNT: usize = 1500;
/// Bound on the script's run time.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(120);

const INSTALL_HINT: &str = "this test needs Python 3 with the `websockets` and `zstandard` \
packages: `python3 -m pip install websockets zstandard` (Debian/Ubuntu: `apt-get install \
python3-websockets python3-zstandard`; CI installs them)";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Fails with install instructions when python3 or the packages are missing.
fn require_python() {
    let out = Command::new("python3")
        .args([
            "-c",
            "import websockets, zstandard; print(websockets.__version__, zstandard.__version__)",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "{INSTALL_HINT}\npython3 said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "python packages: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
}

/// Reads `n` frames with tungstenite; every one must be a text frame.
fn read_plain(url: &str, n: usize) -> Vec<Vec<u8>> {
    let (mut ws, _) = tungstenite::connect(url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
    }
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => out.push(t.as_bytes().to_vec()),
            Ok(tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_)) => {}
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(e) => panic!("reading the reference after {} events: {e}", out.len()),
        }
    }
    out
}

/// The complete stream as the relay sends it, checked against the generator (the relay's
/// `cursor` field taken out, its values increasing): `events[seq]`.
fn reference(relay: &Relay) -> Vec<(serde_json::Value, Vec<u8>)> {
    let generator = Generator::new(SEED, 40);
    let mut last_cursor = None;
    read_plain(&relay.url("cursor=0"), COUNT)
        .into_iter()
        .enumerate()
        .map(|(i, json)| {
            let (event, cursor) = strip_cursor(&json);
            assert_eq!(Generator::seq_of(&event), Some(i as u64), "stream order");
            if let (Some(prev), Some(this)) = (last_cursor, cursor) {
                assert!(this > prev, "event {i}: relay seq {this} after {prev}");
            }
            last_cursor = cursor;
            let mut want = Vec::new();
            generator.event(
                i as u64,
                Generator::time_us_of(&event).expect("time_us"),
                &mut want,
            );
            assert!(event == want, "event {i} differs from the generator's");
            (serde_json::from_slice(&json).expect("JSON"), json)
        })
        .collect()
}

/// Lines of a file the script wrote.
fn lines(dir: &Path, name: &str) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Compares a received list with the expected one, reporting the first difference.
fn same(got: &[Vec<u8>], want: &[&Vec<u8>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of events");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != *w) {
        panic!(
            "{what}: event {i} differs:\n got {}\nwant {}",
            String::from_utf8_lossy(&got[i]),
            String::from_utf8_lossy(want[i])
        );
    }
}

/// Runs the script to completion (bounded), returning its stdout.
fn run_script(args: &[String]) -> String {
    let out = run_python("tests/interop/websockets_client.py", args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client failed ({}):\n{stderr}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a Python script of the repository to completion (bounded, killed past
/// `SCRIPT_DEADLINE`), returning its status and output.
fn run_python(script: &str, args: &[String]) -> std::process::Output {
    let script = repo_path(script);
    let mut child = Command::new("python3")
        .arg(&script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}: {INSTALL_HINT}", script.display()));
    let start = Instant::now();
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => break,
            None if start.elapsed() > SCRIPT_DEADLINE => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "the Python client did not finish within {SCRIPT_DEADLINE:?}:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    child.wait_with_output().expect("output")
}

/// Python's `websockets` against the relay: plain stream, compressed stream (query and
/// header) decoded by `zstandard` with the dictionary, a filter, an `options_update` (as a
/// requireHello hello), an invalid update's close frame, ping/pong and a client-initiated
/// close handshake.
#[test]
fn python_websockets_client_interoperates() {
    require_python();
    let count = COUNT.to_string();
    let mock = Mock::start(1000, &["--count", &count, "--dids", "40"]);
    let dir = temp_dir("interop-python");
    let relay = Relay::start(&mock.url(), &dir, &[]);
    let events = reference(&relay);
    let out_dir = temp_dir("interop-python-out");
    let started = Instant::now();
    let stdout = run_script(&[
        relay.url(""),
        repo_path("assets/zstd_dictionary").display().to_string(),
        out_dir.display().to_string(),
        count,
    ]);
    eprintln!("python client ran {:?}: {stdout}", started.elapsed());
    let summary: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("summary JSON ({e}): {stdout}"));

    let all: Vec<&Vec<u8>> = events.iter().map(|(_, j)| j).collect();
    same(&lines(&out_dir, "plain.jsonl"), &all, "plain");
    same(
        &lines(&out_dir, "compressed.jsonl"),
        &all,
        "compress=true decoded by zstandard",
    );
    same(
        &lines(&out_dir, "header.jsonl"),
        &all,
        "Socket-Encoding: zstd decoded by zstandard",
    );

    let collection = |v: &serde_json::Value| v["commit"]["collection"].as_str().map(str::to_string);
    let graph: Vec<&Vec<u8>> = events
        .iter()
        .filter(|(v, _)| {
            v["kind"] != "commit" || collection(v).is_some_and(|c| c.starts_with("app.bsky.graph."))
        })
        .map(|(_, j)| j)
        .collect();
    assert!(
        graph.len() > 50 && graph.len() < COUNT / 4,
        "graph.* passes {}",
        graph.len()
    );
    same(
        &lines(&out_dir, "filtered.jsonl"),
        &graph,
        "wantedCollections=app.bsky.graph.*",
    );

    let hello: Vec<&Vec<u8>> = events
        .iter()
        .filter(|(v, j)| {
            (v["kind"] != "commit" || collection(v).as_deref() == Some("app.bsky.feed.repost"))
                && j.len() <= 600
        })
        .map(|(_, j)| j)
        .collect();
    assert!(
        hello
            .iter()
            .any(|j| j.windows(20).any(|w| w == b"app.bsky.feed.repost"))
    );
    same(
        &lines(&out_dir, "hello.jsonl"),
        &hello,
        "requireHello + options_update (reposts ≤ 600 bytes)",
    );

    assert_eq!(
        summary["invalid_close"],
        serde_json::json!([
            1000,
            "failed to unmarshal subscriber sourced message: key must be a string at line 1 column 2"
        ]),
        "invalid options_update close frame"
    );
    let rtts = summary["ping_rtt_ms"].as_array().expect("ping_rtt_ms");
    assert_eq!(rtts.len(), 3, "three pongs");
    // An idle connection's pong must not wait for the relay's next housekeeping tick (1 s):
    // the median of three says so; each sample (a Python thread under the GIL on a shared
    // 2-core machine) only has to stay below the tick.
    let mut ms: Vec<f64> = rtts
        .iter()
        .map(|r| r.as_f64().unwrap_or(f64::MAX))
        .collect();
    ms.sort_by(f64::total_cmp);
    assert!(
        ms[1] < 500.0 && ms[2] < 900.0,
        "ping round trips (ms): {rtts:?}"
    );
    assert_eq!(summary["close_sent"], serde_json::json!([1000, "bye"]));
    assert_eq!(
        summary["close_rcvd"][0], 1000,
        "the relay answers a close with a close"
    );
    assert_eq!(
        summary["close_rcvd_then_sent"], false,
        "the client closed first"
    );
}

/// A strict v1 client (tests/interop/strict_v1_client.py, built like PyPI `atproto-jetstream`
/// 0.3.0: a fixed dataclass from every top-level key of the 2024 v1 event) fails on the relay's
/// first event while the `cursor` field is on (the default), and receives events with
/// `--v1-cursor-field false`.
#[test]
fn strict_v1_client_fails_on_the_cursor_field_and_reads_without_it() {
    require_python();
    const STRICT_EVENTS: &str = "200";
    let mock = Mock::start(1000, &[]);
    for (extra, field_on) in [
        (&[][..], true),
        (&["--v1-cursor-field", "false"][..], false),
    ] {
        let dir = temp_dir(if field_on {
            "strict-v1-on"
        } else {
            "strict-v1-off"
        });
        let relay = Relay::start(&mock.url(), &dir, extra);
        let out = run_python(
            "tests/interop/strict_v1_client.py",
            &[relay.url("cursor=0"), STRICT_EVENTS.into()],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if field_on {
            assert!(
                !out.status.success()
                    && stderr.contains("at event 0: ")
                    && stderr.contains("unexpected keyword argument 'cursor'"),
                "cursor field on: the strict client must fail on the first event ({}):\n\
                 {stderr}\n{stdout}",
                out.status
            );
        } else {
            assert!(
                out.status.success(),
                "--v1-cursor-field false: the strict client failed ({}):\n{stderr}",
                out.status
            );
            let summary: serde_json::Value = serde_json::from_str(stdout.trim())
                .unwrap_or_else(|e| panic!("summary JSON ({e}): {stdout}"));
            assert_eq!(summary["received"].to_string(), STRICT_EVENTS, "{summary}");
        }
        eprintln!(
            "cursor field {}: {}",
            if field_on { "on" } else { "off" },
            if field_on {
                stderr.trim()
            } else {
                stdout.trim()
            }
        );
    }
}
