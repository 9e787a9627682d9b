//! Interoperability with the real v2 client: PyPI `atproto` 0.0.73 (module `atproto_jetstream`,
//! the official Python SDK's Jetstream client) against `jetrelay-mock --wire v2`, driven by
//! tests/interop/atproto_jetstream_client.py. The library connects with
//! `base_uri="ws://HOST:PORT/xrpc"`, fetches the dictionary from `getZstdDictionary`, parses
//! every frame into its lexicon models, tracks `seq`, reconnects and resumes by seq on its own;
//! the script records the frames it decoded. This test checks them against the mock's
//! generator: every expected event exactly once, in order, byte-exact and field-exact.
//!
//! Python 3 with `atproto==0.0.73` is required: the test fails (it does not skip) without it,
//! saying how to install it (CI installs it).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use jetrelay::mock::Generator;
use jetrelay::wire;

/// The harness starts mocks with `--seed 7`; `--dids 40` makes DID filters match often.
const SEED: u64 = 7;
const DIDS: u64 = 40;
/// The mock's default: wire seq = event number + 1.
const SEQ_OFFSET: u64 = 1;
/// Bound on one script run.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(150);

const INSTALL_HINT: &str = "this test needs Python 3 with PyPI `atproto` 0.0.73: \
`python3 -m pip install atproto==0.0.73` (CI installs it)";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn require_atproto() {
    let out = Command::new("python3")
        .args([
            "-c",
            "import importlib.metadata as m, atproto_jetstream; print(m.version('atproto'))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "{INSTALL_HINT}\npython3 said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(version, "0.0.73", "{INSTALL_HINT} (found {version})");
}

/// Runs the script (bounded) and returns its summary.
fn run_script(port: u16, out_dir: &Path, scenarios: &serde_json::Value) -> serde_json::Value {
    run_script_watching(port, out_dir, scenarios, None)
}

/// Same, calling `on_file` once when the script creates `file` (a scenario's `drop_file`).
fn run_script_watching(
    port: u16,
    out_dir: &Path,
    scenarios: &serde_json::Value,
    mut watch: Option<(&Path, &mut dyn FnMut())>,
) -> serde_json::Value {
    let script = repo_path("tests/interop/atproto_jetstream_client.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(format!("127.0.0.1:{port}"))
        .arg(out_dir)
        .arg(scenarios.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}: {INSTALL_HINT}", script.display()));
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if let Some((file, on_file)) = &mut watch
            && file.exists()
        {
            on_file();
            watch = None;
        }
        if start.elapsed() > SCRIPT_DEADLINE {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "the atproto client did not finish within {SCRIPT_DEADLINE:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the atproto client failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("atproto client: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("summary ({e}): {stdout}"))
}

/// One delivered message as the script recorded it.
struct Delivered {
    /// The frame's JSON text.
    raw: String,
    /// Whether it came as a binary (compressed) frame.
    binary: bool,
    /// The library's model, as a dict.
    model: serde_json::Value,
}

fn delivered(dir: &Path, name: &str) -> Vec<Delivered> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.jsonl")))
        .unwrap_or_else(|e| panic!("{name}.jsonl: {e}"));
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("line JSON");
            Delivered {
                raw: v["raw"].as_str().expect("raw").to_owned(),
                binary: v["binary"].as_bool().expect("binary"),
                model: v["model"].clone(),
            }
        })
        .collect()
}

/// What the mock must have sent for wire seq `seq` with display time `time_us`, and the v1
/// event it came from (the generator's bytes, independent of the v2 renderer).
fn expected(generator: &Generator, seq: u64, time_us: i64) -> (String, serde_json::Value) {
    let (v2, v1) = v2_frame_as(generator, seq, seq, time_us);
    (
        String::from_utf8(v2).expect("UTF-8"),
        serde_json::from_slice(&v1).expect("v1 JSON"),
    )
}

/// Generator event `seq` (a mock seq) rendered as the v2 frame sent under `wire_seq`, with
/// display time `time_us`; and its v1 bytes.
fn v2_frame_as(generator: &Generator, wire_seq: u64, seq: u64, time_us: i64) -> (Vec<u8>, Vec<u8>) {
    let mut v1 = Vec::new();
    generator.event(seq - SEQ_OFFSET, time_us, &mut v1);
    let mut v2 = Vec::new();
    // No jitter in these runs: the witness time is the display time.
    wire::v1_to_v2(&v1, wire_seq, time_us, &mut v2).expect("renders");
    (v2, v1)
}

/// Checks every delivered event byte-exact against the generator and field-exact against the
/// library's model; returns the seqs in delivery order.
fn check_events(generator: &Generator, got: &[Delivered], binary: bool, what: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.binary, binary, "{what}: frame {i} binary");
        let frame: serde_json::Value = serde_json::from_str(&d.raw).expect("frame JSON");
        let payload = &frame["payload"];
        let Some(seq) = payload["seq"].as_u64() else {
            continue; // #info: checked by the caller
        };
        let time = payload["time"].as_str().expect("time");
        let time_us = wire::rfc3339::parse_micros(time).expect("RFC 3339 time");
        let (want_raw, v1) = expected(generator, seq, time_us);
        assert!(
            d.raw == want_raw,
            "{what}: seq {seq} differs:\n got {}\nwant {want_raw}",
            d.raw
        );
        // Field-exact: the library's model against the generator's v1 event.
        let m = &d.model;
        assert_eq!(m["seq"], seq, "{what}: model seq");
        assert_eq!(m["did"], v1["did"], "{what}: model did");
        assert_eq!(m["time"], time, "{what}: model time");
        assert_eq!(m["witnessedAt"], time, "{what}: model witnessedAt");
        let kind = v1["kind"].as_str().expect("kind");
        assert_eq!(
            m["$type"],
            format!("network.bsky.jetstream.subscribeEvents#{kind}")
        );
        if kind == "commit" {
            for key in ["rev", "operation", "collection", "rkey", "cid"] {
                assert_eq!(m[key], v1["commit"][key], "{what}: seq {seq} {key}");
            }
            assert_eq!(payload["record"], v1["commit"]["record"]);
        } else {
            assert_eq!(payload[kind], v1[kind]);
            assert_eq!(m[kind]["did"], v1[kind]["did"]);
        }
        seqs.push(seq);
    }
    seqs
}

/// The generator seqs of the first `n` events of `stream` — (wire seq, generator seq) pairs in
/// delivery order — that pass `keep` (kind, collection, did, v2 frame length under its wire seq).
fn passing(
    generator: &Generator,
    stream: impl IntoIterator<Item = (u64, u64)>,
    n: usize,
    keep: impl Fn(&str, Option<&str>, &str, usize) -> bool,
) -> Vec<u64> {
    let want: Vec<u64> = stream
        .into_iter()
        .filter(|&(wire_seq, seq)| {
            let idx = Generator::template_index(seq - SEQ_OFFSET);
            let (kind, collection) = Generator::template_kind_and_collection(idx);
            // The frame length does not depend on the time's value (always 27 characters);
            // it does on the wire seq's digits (the envelope counts toward
            // maxMessageSizeBytes), so the frame is rendered with the seq it is sent under.
            let (frame, _) = v2_frame_as(generator, wire_seq, seq, 1_783_175_888_000_000);
            keep(
                kind,
                collection,
                &generator.did_for(seq - SEQ_OFFSET),
                frame.len(),
            )
        })
        .map(|(_, seq)| seq)
        .take(n)
        .collect();
    assert_eq!(want.len(), n, "the stream holds {n} passing events");
    want
}

/// What the "filtered" scenarios ask for: commits to posts and graph records, and identity
/// events, at most 1,000 bytes (kind, collection, did, v2 frame length).
fn filtered_scenario_keeps(kind: &str, collection: Option<&str>, _: &str, len: usize) -> bool {
    len <= 1000
        && match kind {
            "commit" => collection
                .is_some_and(|c| c == "app.bsky.feed.post" || c.starts_with("app.bsky.graph.")),
            "identity" => true,
            _ => false,
        }
}

#[test]
fn atproto_v2_client_interoperates_with_the_mock() {
    require_atproto();
    let generator = Generator::new(SEED, DIDS);
    let mock = Mock::start(
        200,
        &[
            "--wire",
            "v2",
            "--count",
            "4000",
            "--dids",
            &DIDS.to_string(),
        ],
    );
    let out = temp_dir("interop-atproto");
    let dids: Vec<String> = (0..3).map(|i| generator.did_by_index(i)).collect();
    let scenarios = serde_json::json!([
        // Live from the tip, uncompressed; the mock drops the connection after 100 events and
        // the library resumes by seq (inclusive) and drops the redelivered event.
        {"name": "live", "compress": false, "count": 300, "drop_after": 100},
        // Replay by seq from the first event, dictionary-compressed, filtered.
        {"name": "filtered", "count": 60, "params": {
            "kinds": ["commit", "identity"],
            "collections": ["app.bsky.feed.post", "app.bsky.graph.*"],
            "maxMessageSizeBytes": 1000, "cursor": 1}},
        {"name": "dids", "count": 30, "params": {
            "dids": dids, "kinds": ["commit", "account"], "cursor": 1}},
        // Resume by seq from the middle: the first event is exactly the cursor's.
        {"name": "resume", "count": 40, "params": {"cursor": 150}},
        // A cursor beyond the next seq: #info FutureCursor first, then live.
        {"name": "future", "count": 6, "params": {"cursor": 100_000_000_000_000u64}},
    ]);
    let summary = run_script(mock.port, &out, &scenarios);

    // live: 300 consecutive seqs, text frames, one forced reconnect resumed exactly.
    let s = &summary["live"];
    assert_eq!(s["error"], serde_json::Value::Null, "{s}");
    assert_eq!(s["compressed"], false);
    assert!(s["connects"].as_u64() >= Some(2), "reconnected: {s}");
    assert!(
        s["duplicates_dropped"].as_u64() >= Some(1),
        "the resumed stream starts with the last event seen (inclusive cursor): {s}"
    );
    let seqs = check_events(&generator, &delivered(&out, "live"), false, "live");
    assert_eq!(seqs.len(), 300);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "live: not consecutive: {seqs:?}"
    );

    // filtered: exactly the passing events from seq 1, compressed.
    let s = &summary["filtered"];
    assert_eq!(
        (s["error"].clone(), s["compressed"].clone()),
        (serde_json::Value::Null, true.into())
    );
    let seqs = check_events(&generator, &delivered(&out, "filtered"), true, "filtered");
    let want = passing(
        &generator,
        (1..).map(|s| (s, s)),
        60,
        filtered_scenario_keeps,
    );
    assert_eq!(seqs, want, "filtered");

    let s = &summary["dids"];
    assert_eq!(s["error"], serde_json::Value::Null, "{s}");
    let seqs = check_events(&generator, &delivered(&out, "dids"), true, "dids");
    let want = passing(&generator, (1..).map(|s| (s, s)), 30, |kind, _, did, _| {
        (kind == "commit" || kind == "account") && dids.iter().any(|d| d == did)
    });
    assert_eq!(seqs, want, "dids");

    let s = &summary["resume"];
    assert_eq!(s["error"], serde_json::Value::Null, "{s}");
    let seqs = check_events(&generator, &delivered(&out, "resume"), true, "resume");
    assert_eq!(seqs, (150..190).collect::<Vec<_>>(), "resume");

    let s = &summary["future"];
    assert_eq!(s["error"], serde_json::Value::Null, "{s}");
    let got = delivered(&out, "future");
    assert_eq!(got[0].model["name"], "FutureCursor", "{}", got[0].raw);
    assert_eq!(
        got[0].model["$type"],
        "network.bsky.jetstream.subscribeEvents#info"
    );
    let seqs = check_events(&generator, &got[1..], true, "future");
    assert_eq!(seqs.len(), 5);
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));

    let _ = std::fs::remove_dir_all(&out);
}

/// A seq cursor below the retained history: the library raises its typed error from the
/// pre-upgrade 400 `CursorTooOld`, instead of silently skipping the gap.
#[test]
fn atproto_v2_client_gets_cursor_too_old() {
    require_atproto();
    let mock = Mock::start(
        2000,
        &[
            "--wire",
            "v2",
            "--count",
            "600",
            "--history",
            "100",
            "--start-immediately",
        ],
    );
    wait_until(
        "the mock's history to roll over",
        Duration::from_secs(20),
        || mock.seq() >= 600,
    );
    let out = temp_dir("interop-atproto-old");
    let summary = run_script(
        mock.port,
        &out,
        &serde_json::json!([{"name": "old", "count": 1, "params": {"cursor": 1}}]),
    );
    let s = &summary["old"];
    assert_eq!(s["delivered"], 0, "{s}");
    assert_eq!(s["error"]["class"], "JetstreamCursorTooOldError", "{s}");
    let message = s["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("CursorTooOld") && message.contains("below lookback floor 501"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// What atproto 0.0.73 does with `#sync`: the frame's `blocks` arrive as `{"$bytes": …}` (the
/// atproto JSON data model's bytes, as the official server writes them) and the library's model
/// wants a string, so the client stops with a `JetstreamError` — it neither skips the frame
/// nor reconnects. A relay that forwards `#sync` to such a client ends its stream; clients
/// that ask for `kinds` without `sync` are unaffected. Pinned here so a library upgrade that
/// changes it is noticed.
#[test]
fn atproto_v2_client_stops_on_a_sync_frame() {
    require_atproto();
    let mock = Mock::start(
        2000,
        &[
            "--wire",
            "v2",
            "--count",
            "200",
            "--sync-every",
            "10",
            "--start-immediately",
        ],
    );
    wait_until("the mock's events", Duration::from_secs(20), || {
        mock.seq() >= 200
    });
    let out = temp_dir("interop-atproto-sync");
    let summary = run_script(
        mock.port,
        &out,
        &serde_json::json!([
            {"name": "all", "count": 50, "params": {"cursor": 1}},
            {"name": "no_sync", "count": 50, "params": {"cursor": 1, "kinds": ["commit", "identity", "account"]}},
        ]),
    );
    let s = &summary["all"];
    assert_eq!(
        s["delivered"], 9,
        "events 1-9, then the #sync at seq 10: {s}"
    );
    assert_eq!(s["connects"], 1, "no reconnect: {s}");
    assert_eq!(s["error"]["class"], "JetstreamError", "{s}");
    let message = s["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("blocks"), "{message}");
    let s = &summary["no_sync"];
    assert_eq!(s["error"], serde_json::Value::Null, "{s}");
    assert_eq!(s["delivered"], 50, "{s}");
    let _ = std::fs::remove_dir_all(&out);
}

/// The relay's frames as the library delivered them: each parsed back to the generator's
/// event (the relay numbers events itself, so the generator's number comes from the content),
/// then required to be byte-exact the canonical v2 rendering of that event with the frame's
/// own seq and witness time, and field-exact in the library's model. Returns (relay seq,
/// generator number) in delivery order; `#info` frames are skipped.
fn check_relay_events(
    generator: &Generator,
    got: &[Delivered],
    binary: bool,
    what: &str,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.binary, binary, "{what}: frame {i} binary");
        let wire::V2Frame::Event {
            seq,
            witnessed_us,
            event,
        } = wire::parse_v2_frame(d.raw.as_bytes())
            .unwrap_or_else(|e| panic!("{what}: frame {i} ({e}): {}", d.raw))
        else {
            continue;
        };
        let mut v1_rendered = Vec::new();
        event.render_v1(&mut v1_rendered).expect("v1 form");
        let number = Generator::seq_of(&v1_rendered)
            .unwrap_or_else(|| panic!("{what}: not a generator event: {}", d.raw));
        let payload = &serde_json::from_str::<serde_json::Value>(&d.raw).expect("JSON")["payload"];
        let time = payload["time"].as_str().expect("time");
        let time_us = wire::rfc3339::parse_micros(time).expect("RFC 3339 time");
        let mut v1 = Vec::new();
        generator.event(number, time_us, &mut v1);
        let witnessed = witnessed_us.expect("the relay sends witnessedAt");
        let mut want = Vec::new();
        wire::v1_to_v2(&v1, seq, witnessed, &mut want).expect("renders");
        assert!(
            d.raw.as_bytes() == want.as_slice(),
            "{what}: relay seq {seq} (event {number}) differs:\n got {}\nwant {}",
            d.raw,
            String::from_utf8_lossy(&want)
        );
        let v1: serde_json::Value = serde_json::from_slice(&v1).expect("v1 JSON");
        let m = &d.model;
        assert_eq!(m["seq"], seq, "{what}: model seq");
        assert_eq!(m["did"], v1["did"], "{what}: model did");
        assert_eq!(m["time"], time, "{what}: model time");
        assert_eq!(
            m["witnessedAt"], payload["witnessedAt"],
            "{what}: witnessedAt"
        );
        let kind = v1["kind"].as_str().expect("kind");
        if kind == "commit" {
            for key in ["rev", "operation", "collection", "rkey", "cid"] {
                assert_eq!(m[key], v1["commit"][key], "{what}: seq {seq} {key}");
            }
        } else {
            assert_eq!(m[kind]["did"], v1[kind]["did"], "{what}: seq {seq}");
        }
        out.push((seq, number));
    }
    out
}

/// Relay seqs strictly increasing (gaps allowed), generator numbers consecutive.
fn assert_exact(events: &[(u64, u64)], what: &str) {
    for w in events.windows(2) {
        assert!(w[1].0 > w[0].0, "{what}: seq {} after {}", w[1].0, w[0].0);
        assert_eq!(
            w[1].1,
            w[0].1 + 1,
            "{what}: event {} after {}",
            w[1].1,
            w[0].1
        );
    }
}

/// The relay's own v1 stream from seq `from`: (cursor field = relay seq, generator number) of
/// the first `n` frames — the independent record the v2 deliveries are checked against.
fn relay_v1_stream(port: u16, from: u64, n: usize) -> Vec<(u64, u64)> {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let url = format!("ws://127.0.0.1:{port}/subscribe?cursor={from}");
    let (mut ws, _) = tungstenite::client(url.as_str(), stream).expect("upgrade");
    let mut out = Vec::new();
    while out.len() < n {
        match ws.read().expect("v1 frame") {
            tungstenite::Message::Text(t) => {
                let seq = strip_cursor(t.as_bytes()).1.expect("the v1 cursor field");
                let number = mock_seq(t.as_bytes()).expect("a generator event");
                out.push((seq, number));
            }
            other => panic!("v1 stream: {other:?}"),
        }
    }
    out
}

/// PyPI atproto 0.0.73 against the RELAY's subscribeEvents (the relay following a legacy mock):
/// live with dictionary compression (the library fetches the dictionary from the relay's
/// getZstdDictionary) through a `kill -9` and restart of the relay, which the library survives
/// by resuming with its last seq (inclusive: that event comes again and is dropped, nothing is
/// missing); filters (kinds, collections, maxMessageSizeBytes, dids); resume by seq from the
/// middle. Every frame byte-exact against the generator; seq ↔ event as in the relay's v1 stream.
#[test]
fn atproto_v2_client_against_the_relay() {
    require_atproto();
    let generator = Generator::new(SEED, DIDS);
    let mock = Mock::start(300, &["--dids", &DIDS.to_string()]);
    let data = temp_dir("interop-atproto-relay");
    let port = free_port();
    let mut relay = Relay::start_on(port, &mock.url(), &data, &[]);
    let out = temp_dir("interop-atproto-relay-out");
    let restart_marker = out.join("restart-relay");
    let dids: Vec<String> = (0..3).map(|i| generator.did_by_index(i)).collect();
    let scenarios = serde_json::json!([
        {"name": "live", "compress": true, "count": 300, "drop_after": 100,
         "drop_file": restart_marker.display().to_string()},
        {"name": "filtered", "count": 60, "params": {
            "kinds": ["commit", "identity"],
            "collections": ["app.bsky.feed.post", "app.bsky.graph.*"],
            "maxMessageSizeBytes": 1000, "cursor": 1}},
        {"name": "dids", "count": 30, "params": {
            "dids": dids, "kinds": ["commit", "account"], "cursor": 1}},
        {"name": "resume", "count": 40, "params": {"cursor": 150}},
    ]);
    let mut restarted = 0;
    let mut restart = || {
        relay.proc.kill9();
        relay = Relay::start_on(port, &mock.url(), &data, &[]);
        restarted += 1;
    };
    let summary = run_script_watching(
        port,
        &out,
        &scenarios,
        Some((restart_marker.as_path(), &mut restart)),
    );
    assert_eq!(restarted, 1, "the script asked for the restart");

    // live: compressed with the relay's dictionary, one reconnect after the crash, resumed
    // with the last seq: that event redelivered and dropped, every later one exactly once.
    let s = &summary["live"];
    assert_eq!(s["error"], serde_json::Value::Null, "{s}");
    assert_eq!(
        s["compressed"], true,
        "dictionary fetched from the relay: {s}"
    );
    assert!(s["connects"].as_u64() >= Some(2), "reconnected: {s}");
    assert!(
        s["duplicates_dropped"].as_u64() >= Some(1),
        "the resumed stream starts with the last event seen: {s}"
    );
    let live = check_relay_events(&generator, &delivered(&out, "live"), true, "live");
    assert_eq!(live.len(), 300);
    assert_exact(&live, "live across the relay's kill -9");

    // The relay's v1 stream says the same seq ↔ event pairing (seq 1 onwards: where the
    // filtered scenarios started).
    let v1 = relay_v1_stream(port, 1, 800);
    assert_eq!(v1[0].0, 1, "the relay's first seq");
    let number_of = |seq: u64| v1.iter().find(|e| e.0 == seq).map(|e| e.1);

    let s = &summary["filtered"];
    assert_eq!(
        (s["error"].clone(), s["compressed"].clone()),
        (serde_json::Value::Null, true.into()),
        "{s}"
    );
    let got = check_relay_events(&generator, &delivered(&out, "filtered"), true, "filtered");
    // (relay seq, generator seq): after the crash the relay's seqs jump (unclean stop), so
    // the same event's frame is longer than under the mock's seq.
    let relay_stream: Vec<(u64, u64)> = v1.iter().map(|&(seq, n)| (seq, n + SEQ_OFFSET)).collect();
    let want = passing(
        &generator,
        relay_stream.clone(),
        60,
        filtered_scenario_keeps,
    );
    let got_numbers: Vec<u64> = got.iter().map(|e| e.1 + SEQ_OFFSET).collect();
    assert_eq!(got_numbers, want, "filtered: the passing events from seq 1");
    for (seq, number) in &got {
        if let Some(n) = number_of(*seq) {
            assert_eq!(n, *number, "filtered: seq {seq} is another event on v1");
        }
    }

    let s = &summary["dids"];
    assert_eq!(s["error"], serde_json::Value::Null, "{s}");
    let got = check_relay_events(&generator, &delivered(&out, "dids"), true, "dids");
    let want = passing(&generator, relay_stream, 30, |kind, _, did, _| {
        (kind == "commit" || kind == "account") && dids.iter().any(|d| d == did)
    });
    let got_numbers: Vec<u64> = got.iter().map(|e| e.1 + SEQ_OFFSET).collect();
    assert_eq!(got_numbers, want, "dids");

    let s = &summary["resume"];
    assert_eq!(s["error"], serde_json::Value::Null, "{s}");
    let got = check_relay_events(&generator, &delivered(&out, "resume"), true, "resume");
    assert_eq!(got.len(), 40);
    assert_eq!(got[0].0, 150, "resume by seq starts at exactly that seq");
    assert_exact(&got, "resume");
    for (seq, number) in &got {
        assert_eq!(number_of(*seq), Some(*number), "resume: seq {seq} on v1");
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&data);
}
