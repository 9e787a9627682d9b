//! OTLP push from a real relay process to an in-test HTTP receiver: with `--otlp-endpoint`
//! (and the Prometheus listener disabled, so OTLP is the only reader), the SDK's periodic
//! reader POSTs http/protobuf to `/v1/metrics` and the relay's metric names arrive.

mod metrics_support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use metrics_support::Relay;

/// Export interval the relay is started with (the SDK's standard variable, milliseconds).
const INTERVAL_MS: &str = "300";
/// How long the test waits for exports.
const WAIT: Duration = Duration::from_secs(20);

/// One request the receiver got.
struct Export {
    /// Request line.
    request_line: String,
    /// Content-Type header.
    content_type: String,
    /// Body bytes (OTLP protobuf).
    body: Vec<u8>,
}

/// Reads one HTTP/1.1 request with a Content-Length body and answers 200 with an empty
/// ExportMetricsServiceResponse (an empty protobuf message is zero bytes).
fn receive(mut s: TcpStream) -> Option<Export> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 || buf.len() > 1 << 20 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            })
            .map(|(_, v)| v.trim().to_owned())
    };
    let len: usize = header("content-length")?.parse().ok()?;
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let _ = s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
    );
    Some(Export {
        request_line: head.lines().next().unwrap_or_default().to_owned(),
        content_type: header("content-type").unwrap_or_default(),
        body: buf[head_end..head_end + len].to_vec(),
    })
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn metrics_otlp_push_reaches_a_collector() {
    let collector = TcpListener::bind("127.0.0.1:0").unwrap();
    collector.set_nonblocking(true).unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let server = std::thread::spawn(move || {
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            match collector.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    if let Some(e) = receive(s) {
                        let _ = tx.send(e);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });

    let relay = Relay::start(
        &["--demo", "--demo-rate", "100", "--otlp-endpoint", &endpoint],
        &[("OTEL_METRIC_EXPORT_INTERVAL", INTERVAL_MS)],
        false,
    );
    let t0 = Instant::now();
    let mut exports = Vec::new();
    // Wait for two exports whose events-appended point is non-zero: periodic, and live data.
    while exports.len() < 2 && t0.elapsed() < WAIT {
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(200))
            && contains(&e.body, "jetrelay.upstream.events.appended")
        {
            exports.push(e);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        exports.len() >= 2,
        "got {} OTLP exports in {WAIT:?}; relay log:\n{}",
        exports.len(),
        relay.log()
    );
    let e = &exports[1];
    assert_eq!(e.request_line, "POST /v1/metrics HTTP/1.1");
    assert_eq!(e.content_type, "application/x-protobuf");
    for name in [
        "jetrelay.clients",
        "jetrelay.events.delivered",
        "jetrelay.delivered.bytes",
        "jetrelay.delivery.latency.bucket",
        "jetrelay.upstream.connected",
        "jetrelay.upstream.lag",
        "jetrelay.log.allocated",
        "jetrelay.ring.sqes",
    ] {
        assert!(contains(&e.body, name), "{name} missing from the export");
    }
    assert!(
        contains(&e.body, "{event}"),
        "units travel with the metrics"
    );
    assert!(relay.log().contains("pushing metrics over OTLP"));
    drop(relay);
    let _ = server.join();
}
