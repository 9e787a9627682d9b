//! Settings of `jetrelay-tls`, layered like the relay's: built-in defaults < TOML file
//! (`--config`) < environment (`JETRELAY_TLS_<KEY>`) < command-line flags.
//!
//! Every layer goes through the same typed deserializers, so a bad value is reported the same
//! way wherever it came from, and figment's error names the setting and the layer.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that configure the sidecar.
pub const ENV_PREFIX: &str = "JETRELAY_TLS_";

/// Upper bound for `max_connections`. Why: each connection costs two file descriptors and
/// some kernel socket memory; beyond this a typo (an extra zero) is likelier than intent.
pub const MAX_CONNECTIONS_LIMIT: u64 = 10_000_000;

/// Upper bound for `max_handshakes`: handshakes are CPU work, and more in flight than this
/// only adds latency to all of them.
pub const MAX_HANDSHAKES_LIMIT: u64 = 1_000_000;

/// Upper bound for `handshake_timeout`, `half_close_timeout` and `drain_timeout`. Why an
/// hour: each is added to an `Instant` (which panics on overflow), and longer makes a
/// half-open or half-closed connection a resource held for free.
pub const MAX_TIMER: Duration = Duration::from_secs(3600);

/// Upper bound for `idle_timeout`. Why 30 days: added to an `Instant` like the others; a
/// WebSocket behind the relay is pinged every 30 s anyway, so idleness this long means the
/// peer is gone.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 86_400);

/// Command-line flags. All are optional so that an absent flag never masks a value from the
/// file or the environment; only the flags actually given are layered on top.
#[derive(Debug, Default, Clone, clap::Parser, Serialize)]
#[command(
    name = "jetrelay-tls",
    version,
    about = "TLS-terminating proxy for jetrelay: TLS on the outside, PROXY v2 + plaintext to the relay"
)]
pub struct Cli {
    /// TOML configuration file; keys are the flag names with '-' replaced by '_'.
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to accept TLS connections on (repeatable) [default: [::]:443].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<String>,

    /// The relay's trusted (PROXY v2) listener [default: unix:/run/jetrelay/trusted.sock].
    #[arg(long, value_name = "unix:PATH|HOST:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,

    /// Certificate chain PEM (e.g. fullchain.pem); repeatable, paired in order with --key.
    /// The first pair is served to clients without SNI or with an unknown name.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cert: Vec<PathBuf>,

    /// Private key PEM (PKCS#8, PKCS#1 RSA or SEC1 EC); repeatable, paired in order with --cert.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub key: Vec<PathBuf>,

    /// Deadline for a client to complete the TLS handshake [default: 10s].
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout: Option<String>,

    /// Close a connection after this long without a byte in either direction [default: 120s].
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,

    /// Close both sides once one side has been closed this long [default: 10s].
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half_close_timeout: Option<String>,

    /// On SIGTERM/SIGINT, let established connections finish for up to this long [default: 10s].
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,

    /// Cap on concurrent client connections; more are accepted and closed at once
    /// [default: 100000].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,

    /// Cap on TLS handshakes computing at once (one waiting for its peer holds no permit);
    /// more wait (within their handshake deadline) [default: 1024].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_handshakes: Option<u64>,

    /// Cap on concurrent connections from one IP (per /64 for IPv6); more are closed at
    /// accept [default: 64].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_conns_per_ip: Option<u64>,

    /// New connections (each a full TLS handshake) per second from one IP, token bucket with
    /// a burst of twice the rate; more are closed at accept [default: 10].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_rate_per_ip: Option<f64>,

    /// Cap on TLS handshakes in progress from one IP (per /64 for IPv6); more are closed at
    /// accept [default: 16].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_handshakes_per_ip: Option<u64>,

    /// Address or CIDR exempt from the per-IP limits (repeatable).
    #[arg(long, value_name = "CIDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_ip: Vec<String>,

    /// Validate the configuration and load the certificates, print a summary, then exit.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
}

/// Where decrypted connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A Unix stream socket: preferred on one host (no port, file permissions guard it).
    Unix(PathBuf),
    /// A TCP address, resolved once at startup.
    Tcp(SocketAddr),
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("empty unix socket path".into());
            }
            return Ok(Backend::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Backend::Tcp(addr));
        }
        // A host name: resolve once; a backend on the same host should not depend on DNS later.
        match s.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .map(Backend::Tcp)
                .ok_or_else(|| format!("{s:?} resolves to no address")),
            Err(e) => Err(format!("expected unix:PATH or HOST:PORT, got {s:?} ({e})")),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Unix(path) => write!(f, "unix:{}", path.display()),
            Backend::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// A duration setting: "10s", "500ms", "2m", "1h", or a bare integer meaning seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// Parses the humantime-like subset the relay's settings use.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a duration like 10s, 500ms or 2m, got {s:?}"))?;
    let per_unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    n.checked_mul(per_unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"10s\" or a number of seconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(|s| Dur(Duration::from_secs(s)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A list setting that also accepts a single value, so `JETRELAY_TLS_LISTEN=0.0.0.0:443`
/// works without TOML array syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

impl<'de, T: FromStr> Deserialize<'de> for List<T>
where
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: FromStr> Visitor<'de> for V<T>
        where
            T::Err: fmt::Display,
        {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<List<T>, E> {
                v.parse().map(|t| List(vec![t])).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s.parse().map_err(de::Error::custom)?);
                }
                Ok(List(out))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A `FromStr` value read from a string setting (backend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<T>(pub T);

impl<'de, T: FromStr> Deserialize<'de> for Parsed<T>
where
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Parsed).map_err(de::Error::custom)
    }
}

/// The raw layered settings, as named in the file, env and flags.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    /// Public TLS listeners.
    #[serde(default = "default_listen")]
    listen: List<SocketAddr>,
    /// The relay's trusted listener.
    #[serde(default = "default_backend")]
    backend: Parsed<Backend>,
    /// Certificate chain files, paired in order with `key`.
    #[serde(default = "empty_paths")]
    cert: List<PathBuf>,
    /// Private key files, paired in order with `cert`.
    #[serde(default = "empty_paths")]
    key: List<PathBuf>,
    /// See [`Config::handshake_timeout`].
    #[serde(default = "default_handshake_timeout")]
    handshake_timeout: Dur,
    /// See [`Config::idle_timeout`].
    #[serde(default = "default_idle_timeout")]
    idle_timeout: Dur,
    /// See [`Config::half_close_timeout`].
    #[serde(default = "default_half_close_timeout")]
    half_close_timeout: Dur,
    /// See [`Config::drain_timeout`].
    #[serde(default = "default_drain_timeout")]
    drain_timeout: Dur,
    /// See [`Config::max_connections`].
    #[serde(default = "default_max_connections")]
    max_connections: u64,
    /// See [`Config::max_handshakes`].
    #[serde(default = "default_max_handshakes")]
    max_handshakes: u64,
    /// See [`Config::max_conns_per_ip`].
    #[serde(default = "default_max_conns_per_ip")]
    max_conns_per_ip: u64,
    /// See [`Config::conn_rate_per_ip`].
    #[serde(default = "default_conn_rate_per_ip")]
    conn_rate_per_ip: f64,
    /// See [`Config::max_handshakes_per_ip`].
    #[serde(default = "default_max_handshakes_per_ip")]
    max_handshakes_per_ip: u64,
    /// See [`Config::allow_ip`].
    #[serde(default = "empty_strings")]
    allow_ip: List<String>,
}

fn default_listen() -> List<SocketAddr> {
    List(vec![SocketAddr::from(([0u16; 8], 443))])
}
fn default_backend() -> Parsed<Backend> {
    Parsed(Backend::Unix(PathBuf::from("/run/jetrelay/trusted.sock")))
}
fn empty_paths() -> List<PathBuf> {
    List(Vec::new())
}
fn default_handshake_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_idle_timeout() -> Dur {
    Dur(Duration::from_secs(120))
}
fn default_half_close_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_max_connections() -> u64 {
    100_000
}
fn default_max_handshakes() -> u64 {
    1024
}
fn default_max_conns_per_ip() -> u64 {
    64
}
fn default_conn_rate_per_ip() -> f64 {
    10.0
}
fn default_max_handshakes_per_ip() -> u64 {
    16
}
fn empty_strings() -> List<String> {
    List(Vec::new())
}

/// One certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    /// PEM chain, leaf first (ACME clients' fullchain.pem).
    pub cert: PathBuf,
    /// PEM private key matching the leaf.
    pub key: PathBuf,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to accept TLS on.
    pub listen: Vec<SocketAddr>,
    /// Where to send decrypted bytes (after a PROXY v2 header).
    pub backend: Backend,
    /// Certificates; the first is the default for clients without (or with unknown) SNI.
    pub certs: Vec<CertPair>,
    /// A client that has not finished the handshake by then is dropped; bounds the cost of
    /// slowloris-style half-handshakes.
    pub handshake_timeout: Duration,
    /// An established connection with no bytes either way for this long is closed; frees
    /// resources held by vanished peers.
    pub idle_timeout: Duration,
    /// Once one side has closed, the other gets this long before both are closed; bounds
    /// connections stuck half-open.
    pub half_close_timeout: Duration,
    /// How long SIGTERM/SIGINT waits for established connections before exiting.
    pub drain_timeout: Duration,
    /// Cap on concurrent client connections (two file descriptors each).
    pub max_connections: usize,
    /// Cap on handshakes in progress (CPU-bound work).
    pub max_handshakes: usize,
    /// Concurrent connections per address key (IPv4 address or IPv6 /64).
    pub max_conns_per_ip: usize,
    /// New connections (full TLS handshakes) per second per address key: what keeps one
    /// address from turning the sidecar's CPU into a handshake oracle.
    pub conn_rate_per_ip: f64,
    /// Handshakes in progress per address key: what keeps silent or slow peers on one
    /// address from holding the handshake permits others need.
    pub max_handshakes_per_ip: usize,
    /// Networks exempt from the per-address limits: (address, prefix length).
    pub allow_ip: Vec<(std::net::IpAddr, u8)>,
}

/// A setting that parsed but makes no sense; names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a value did not parse (figment names key and source).
    #[error(transparent)]
    Figment(#[from] Box<figment::Error>),
    /// A value outside its allowed range.
    #[error("setting `{setting}`: {reason}")]
    Invalid {
        /// The TOML key / flag name (with `_`).
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl Config {
    /// Layers defaults < `--config` file < `JETRELAY_TLS_*` env < flags, then validates.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        // figment would treat a missing file as empty; a named file that can't be read is an error.
        if let Some(path) = &cli.config {
            std::fs::File::open(path).map_err(|e| ConfigError::Invalid {
                setting: "config",
                reason: format!("cannot read {}: {e}", path.display()),
            })?;
        }
        Self::from_figment(Self::figment(cli))
    }

    /// The layered provider stack (exposed for tests and `--check-config`).
    pub fn figment(cli: &Cli) -> Figment {
        let mut figment = Figment::new();
        if let Some(path) = &cli.config {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment
            // `config` is a flag-only setting; ignore it so JETRELAY_TLS_CONFIG can't trip
            // deny_unknown_fields.
            .merge(Env::prefixed(ENV_PREFIX).ignore(&["config"]))
            .merge(Serialized::defaults(cli))
    }

    /// Extracts and validates settings from any provider stack.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let raw: Raw = figment.extract().map_err(Box::new)?;
        raw.validate()
    }

    /// Reads a TOML file alone (no env, no flags), for tests of the file layer.
    pub fn from_toml_file(path: &Path) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Toml::file_exact(path)))
    }
}

impl Raw {
    fn validate(self) -> Result<Config, ConfigError> {
        let invalid =
            |setting: &'static str, reason: String| ConfigError::Invalid { setting, reason };
        if self.listen.0.is_empty() {
            return Err(invalid("listen", "at least one address is required".into()));
        }
        let (certs, keys) = (self.cert.0, self.key.0);
        if certs.is_empty() {
            return Err(invalid(
                "cert",
                "at least one certificate (--cert PATH with --key PATH) is required".into(),
            ));
        }
        if certs.len() != keys.len() {
            return Err(invalid(
                "key",
                format!(
                    "{} certificate(s) but {} key(s); --cert and --key are paired in order",
                    certs.len(),
                    keys.len()
                ),
            ));
        }
        for (setting, d, max, max_text) in [
            ("handshake_timeout", self.handshake_timeout, MAX_TIMER, "1h"),
            (
                "idle_timeout",
                self.idle_timeout,
                MAX_IDLE_TIMEOUT,
                "30 days",
            ),
            (
                "half_close_timeout",
                self.half_close_timeout,
                MAX_TIMER,
                "1h",
            ),
        ] {
            if d.0.is_zero() || d.0 > max {
                return Err(invalid(
                    setting,
                    format!("must be greater than zero and at most {max_text}"),
                ));
            }
        }
        if self.drain_timeout.0 > MAX_TIMER {
            return Err(invalid("drain_timeout", "must be at most 1h".into()));
        }
        let max_connections = bounded(
            "max_connections",
            self.max_connections,
            MAX_CONNECTIONS_LIMIT,
        )?;
        let max_handshakes = bounded("max_handshakes", self.max_handshakes, MAX_HANDSHAKES_LIMIT)?;
        let max_conns_per_ip = bounded(
            "max_conns_per_ip",
            self.max_conns_per_ip,
            MAX_CONNECTIONS_LIMIT,
        )?;
        let max_handshakes_per_ip = bounded(
            "max_handshakes_per_ip",
            self.max_handshakes_per_ip,
            MAX_HANDSHAKES_LIMIT,
        )?;
        if !(self.conn_rate_per_ip > 0.0 && self.conn_rate_per_ip.is_finite()) {
            return Err(invalid(
                "conn_rate_per_ip",
                format!("must be a positive number, got {}", self.conn_rate_per_ip),
            ));
        }
        let allow_ip = self
            .allow_ip
            .0
            .iter()
            .map(|s| crate::config::parse_cidr(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("allow_ip", e))?;
        Ok(Config {
            listen: self.listen.0,
            backend: self.backend.0,
            certs: certs
                .into_iter()
                .zip(keys)
                .map(|(cert, key)| CertPair { cert, key })
                .collect(),
            handshake_timeout: self.handshake_timeout.0,
            idle_timeout: self.idle_timeout.0,
            half_close_timeout: self.half_close_timeout.0,
            drain_timeout: self.drain_timeout.0,
            max_connections,
            max_handshakes,
            max_conns_per_ip,
            conn_rate_per_ip: self.conn_rate_per_ip,
            max_handshakes_per_ip,
            allow_ip,
        })
    }
}

fn bounded(setting: &'static str, value: u64, max: u64) -> Result<usize, ConfigError> {
    if value == 0 || value > max {
        return Err(ConfigError::Invalid {
            setting,
            reason: format!("must be between 1 and {max}, got {value}"),
        });
    }
    usize::try_from(value).map_err(|_| ConfigError::Invalid {
        setting,
        reason: format!("{value} does not fit this platform"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["jetrelay-tls"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap()
    }

    /// Flags only; no file, no environment, so tests don't depend on the caller's env.
    fn from_flags(args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_figment(Figment::new().merge(Serialized::defaults(cli(args))))
    }

    fn temp_toml(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("jetrelay-tls-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn backends() {
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(Backend::Unix(PathBuf::from("/run/x.sock")))
        );
        assert_eq!(
            "127.0.0.1:6008".parse(),
            Ok(Backend::Tcp("127.0.0.1:6008".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:6008".parse(),
            Ok(Backend::Tcp("[::1]:6008".parse().unwrap()))
        );
        assert!("unix:".parse::<Backend>().is_err());
        assert!("no-port".parse::<Backend>().is_err());
    }

    #[test]
    fn defaults_apply_when_only_certs_are_given() {
        let c = from_flags(&["--cert", "a.pem", "--key", "a.key"]).unwrap();
        assert_eq!(c.listen, vec!["[::]:443".parse::<SocketAddr>().unwrap()]);
        assert_eq!(
            c.backend,
            Backend::Unix("/run/jetrelay/trusted.sock".into())
        );
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.max_connections, 100_000);
        assert_eq!(c.max_handshakes, 1024);
        assert_eq!(c.max_conns_per_ip, 64);
        assert_eq!(c.conn_rate_per_ip, 10.0);
        assert_eq!(c.max_handshakes_per_ip, 16);
        assert!(c.allow_ip.is_empty());
        assert_eq!(
            c.certs,
            vec![CertPair {
                cert: "a.pem".into(),
                key: "a.key".into()
            }]
        );
    }

    #[test]
    fn flags_override_file() {
        let path = temp_toml(
            "override.toml",
            "listen = [\"127.0.0.1:8443\", \"[::1]:8443\"]\nbackend = \"127.0.0.1:6008\"\n\
             cert = [\"f.pem\"]\nkey = [\"f.key\"]\nidle_timeout = 30\nmax_handshakes = 8\n",
        );
        let from_file = Config::from_toml_file(&path).unwrap();
        assert_eq!(from_file.listen.len(), 2);
        assert_eq!(from_file.idle_timeout, Duration::from_secs(30));
        assert_eq!(from_file.max_handshakes, 8);
        assert_eq!(
            from_file.backend,
            Backend::Tcp("127.0.0.1:6008".parse().unwrap())
        );

        let flags = cli(&["--max-handshakes", "16", "--listen", "127.0.0.1:9443"]);
        let layered = Config::from_figment(
            Figment::from(Toml::file_exact(&path)).merge(Serialized::defaults(&flags)),
        )
        .unwrap();
        assert_eq!(layered.max_handshakes, 16);
        assert_eq!(
            layered.listen,
            vec!["127.0.0.1:9443".parse::<SocketAddr>().unwrap()]
        );
        // Untouched by flags: still from the file.
        assert_eq!(layered.idle_timeout, Duration::from_secs(30));
        assert_eq!(layered.certs[0].cert, PathBuf::from("f.pem"));
    }

    #[test]
    fn errors_name_the_setting() {
        let err = from_flags(&[
            "--cert",
            "a",
            "--key",
            "a",
            "--idle-timeout",
            "5 fortnights",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("idle_timeout"), "{err}");

        let err = from_flags(&["--cert", "a", "--key", "a", "--max-connections", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_connections"), "{err}");

        let err = from_flags(&["--cert", "a", "--cert", "b", "--key", "a"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`key`") && err.contains("paired"), "{err}");

        let err = from_flags(&[]).unwrap_err().to_string();
        assert!(err.contains("`cert`"), "{err}");

        let err = from_flags(&["--cert", "a", "--key", "a", "--listen", "nowhere"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen"), "{err}");

        for (flag, value, key) in [
            ("--handshake-timeout", "99999999999h", "handshake_timeout"),
            ("--idle-timeout", "99999999999h", "idle_timeout"),
            ("--half-close-timeout", "99999999999h", "half_close_timeout"),
            ("--drain-timeout", "99999999999h", "drain_timeout"),
            ("--conn-rate-per-ip", "0", "conn_rate_per_ip"),
            ("--max-handshakes-per-ip", "0", "max_handshakes_per_ip"),
            ("--max-conns-per-ip", "0", "max_conns_per_ip"),
            ("--allow-ip", "10.0.0.0/33", "allow_ip"),
        ] {
            let err = from_flags(&["--cert", "a", "--key", "a", flag, value])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{flag} {value}: {err}");
        }

        let err = from_flags(&["--cert", "a", "--key", "a", "--backend", "unix:"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("backend"), "{err}");

        let path = temp_toml("typo.toml", "idel_timeout = \"5s\"\n");
        let err = Config::from_toml_file(&path).unwrap_err().to_string();
        assert!(err.contains("idel_timeout"), "{err}");
    }
}
