//! The live dashboard in a real headless browser (Debian's chromium): against a demo relay
//! with two clients, the page fills its figures from `/api/stats`, the figures move between
//! two loads, and a phone-sized screenshot renders. Skips, saying why, without chromium.

mod metrics_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use metrics_support::{Relay, Subscriber, temp_dir};

const CHROMIUM: &str = "/usr/bin/chromium";
/// Virtual time the page gets per load: several one-second polls.
const BUDGET_MS: &str = "5000";
/// Wall-clock cap on one browser run.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);
/// A phone: the width and height of a common Android handset in CSS pixels.
const PHONE: (u32, u32) = (412, 915);

fn chromium_present() -> bool {
    if Path::new(CHROMIUM).exists() {
        return true;
    }
    println!("SKIPPED: {CHROMIUM} not found (apt-get install chromium); .ci/run installs it");
    false
}

/// Runs headless chromium with `extra` args on `url`; returns stdout.
fn chromium(profile: &Path, extra: &[String], url: &str) -> String {
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={BUDGET_MS}"))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in {BROWSER_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

/// Text content of the element with `id` in a dumped DOM (the dashboard's figures are plain
/// text inside their element).
fn text_of(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let Some(at) = dom.find(&marker) else {
        panic!("#{id} not in the DOM:\n{dom}");
    };
    let open_end = at + dom[at..].find('>').expect("tag closes");
    let close = open_end + dom[open_end..].find('<').expect("text ends");
    dom[open_end + 1..close].trim().to_owned()
}

fn body_attr(dom: &str, attr: &str) -> String {
    let at = dom.find("<body").expect("body");
    let tag = &dom[at..at + dom[at..].find('>').unwrap()];
    let key = format!("{attr}=\"");
    let start = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {attr} on body: {tag}"))
        + key.len();
    tag[start..start + tag[start..].find('"').unwrap()].to_owned()
}

fn png_size(path: &PathBuf) -> (u32, u32) {
    let png = std::fs::read(path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |i: usize| u32::from_be_bytes([png[i], png[i + 1], png[i + 2], png[i + 3]]);
    assert_eq!(&png[12..16], b"IHDR");
    (be(16), be(20))
}

#[test]
fn dashboard_renders_live_figures_in_a_browser() {
    if !chromium_present() {
        return;
    }
    let relay = Relay::start(&["--demo", "--demo-rate", "200"], &[], true);
    let _clients: Vec<Subscriber> = (0..2)
        .map(|_| Subscriber::connect(relay.listen, ""))
        .collect();
    let url = format!("http://{}/", relay.metrics);
    let work = temp_dir("dashboard");

    let first = chromium(&work.join("p1"), &["--dump-dom".into()], &url);
    let second = chromium(&work.join("p2"), &["--dump-dom".into()], &url);
    for dom in [&first, &second] {
        let samples: u32 = body_attr(dom, "data-samples").parse().unwrap();
        assert!(
            samples >= 2,
            "at least two polls (rates need a delta): {samples}"
        );
        assert_eq!(text_of(dom, "v-clients"), "2");
        assert_eq!(text_of(dom, "ready"), "ready");
        assert_eq!(text_of(dom, "upstream"), "upstream connected");
        for id in ["v-gbps", "v-eps", "v-upstream", "v-lag", "v-p99"] {
            let v = text_of(dom, id);
            assert!(!v.is_empty() && v != "–", "#{id} is empty: {v:?}");
            assert!(
                v.chars().any(|c| c.is_ascii_digit()),
                "#{id} has no number: {v:?}"
            );
        }
        assert!(text_of(dom, "v-gbps").ends_with("bps"));
        assert!(text_of(dom, "v-eps").ends_with("/s"));
        // Sparklines were drawn.
        assert!(dom.contains("<polyline points="), "no sparkline drawn");
    }
    // Live: the cumulative totals moved between the two loads.
    let total = |dom: &str| text_of(dom, "sub-eps");
    assert_ne!(
        total(&first),
        total(&second),
        "figures did not change between loads"
    );
    assert_ne!(
        text_of(&first, "sub-upstream"),
        text_of(&second, "sub-upstream")
    );

    // A phone-sized screenshot.
    let shot = work.join("phone.png");
    chromium(
        &work.join("p3"),
        &[
            format!("--screenshot={}", shot.display()),
            format!("--window-size={},{}", PHONE.0, PHONE.1),
        ],
        &url,
    );
    let meta = std::fs::metadata(&shot).expect("screenshot written");
    assert!(
        meta.len() > 10_000,
        "screenshot suspiciously small: {} bytes",
        meta.len()
    );
    assert_eq!(png_size(&shot), PHONE);
    // For a human look at the page: DASHBOARD_SCREENSHOT_COPY=/tmp/phone.png cargo test ...
    if let Ok(keep) = std::env::var("DASHBOARD_SCREENSHOT_COPY") {
        let _ = std::fs::copy(&shot, keep);
    }
    let _ = std::fs::remove_dir_all(&work);
}
