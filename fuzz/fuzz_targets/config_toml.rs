//! `config::load` with an arbitrary TOML file. Oracles: a refusal names what is wrong (a
//! figment error or a setting key that exists); an accepted file yields settings inside every
//! bound validation promises; `parse_duration` / `parse_size` agree with reference readings.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use jetrelay::config::{load, parse_duration, parse_size};
use jetrelay_fuzz::ScratchDir;
use libfuzzer_sys::fuzz_target;

/// Keys of the TOML file: the fields of `RawSettings` (its serialization has one per field;
/// a hand-kept list went stale as settings were added, and the oracle then failed on a correct
/// refusal naming a new key).
fn keys() -> Vec<String> {
    match serde_json::to_value(jetrelay::config::RawSettings::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        other => panic!("RawSettings serializes to an object, not {other:?}"),
    }
}

/// Reference: digits, optional spaces, a unit; `None` when refused.
fn duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().ok()?;
    let unit = s[digits.len()..].trim();
    let per: u64 = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(per)?))
}

fn size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().ok()?;
    let per: u64 = match s[digits.len()..].trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        "GiB" => 1024 * 1024 * 1024,
        "TiB" => 1024 * 1024 * 1024 * 1024,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(per)
}

static KEYS: LazyLock<Vec<String>> = LazyLock::new(keys);

thread_local! {
    static DIR: ScratchDir = ScratchDir::new("config");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines().take(8) {
            assert_eq!(
                parse_duration(line).ok(),
                duration(line),
                "duration {line:?}"
            );
            assert_eq!(parse_size(line).ok(), size(line), "size {line:?}");
        }
    }
    DIR.with(|dir| {
        let path = dir.0.join("relay.toml");
        std::fs::write(&path, data).expect("scratch file");
        #[derive(serde::Serialize)]
        struct NoFlags {}
        match load(Some(&path), &NoFlags {}) {
            Err(e) => {
                let message = format!("{e:#}");
                if let Some(rest) = message.strip_prefix("invalid setting `") {
                    let key = rest.split('`').next().unwrap_or_default();
                    assert!(
                        KEYS.iter().any(|k| k == key),
                        "error names no setting: {message}"
                    );
                } else {
                    assert!(
                        message.starts_with("configuration: "),
                        "unexplained error: {message}"
                    );
                }
            }
            Ok(s) => {
                assert!(s.retention >= Duration::from_secs(1));
                assert!(s.max_disk >= 4 << 20);
                assert!((1..=jetrelay::config::MAX_WORKERS).contains(&s.workers));
                assert!(s.max_clients >= 1 && s.max_conns_per_ip >= 1);
                assert!(s.conn_rate_per_ip > 0.0 && s.conn_rate_per_ip.is_finite());
                assert!(!s.handshake_timeout.is_zero());
                assert!(s.ping_interval >= Duration::from_secs(1));
                assert!(s.max_inbound_rate >= 1024);
                assert!((0.05..=1.0).contains(&s.fanout_duty));
                assert!(s.thin_linger <= Duration::from_secs(1));
                assert!((0.0..=1.0).contains(&s.thin_linger_load));
                assert!(s.demo || !s.upstreams.is_empty());
            }
        }
    });
});
