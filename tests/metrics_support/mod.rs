//! Shared by the metrics, OTLP and dashboard tests: a real `jetrelay` process on free
//! loopback ports, a tiny HTTP GET, WebSocket clients that count what they receive, and a
//! strict parser for the Prometheus text format.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a relay gets to start answering `/healthz`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback port that refuses connections for as long as this value lives: bound but
/// never listening, so no other process or test (nor the relay's own listeners, which
/// also take free ports) can be handed it while a test relies on it being dead.
pub struct RefusedPort {
    _socket: socket2::Socket,
    pub port: u16,
}

impl RefusedPort {
    pub fn new() -> RefusedPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&any.into()).expect("bind a loopback port");
        let port = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .expect("bound port");
        RefusedPort {
            _socket: socket,
            port,
        }
    }
}

/// A unique scratch directory, removed by the owner.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "jetrelay-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `jetrelay` child process; stopped (SIGTERM, then SIGKILL) and cleaned up on drop.
pub struct Relay {
    /// The process.
    child: Child,
    /// Data dir and log file live here.
    pub dir: PathBuf,
    /// Public WebSocket listener.
    pub listen: SocketAddr,
    /// Metrics listener.
    pub metrics: SocketAddr,
}

impl Relay {
    /// Starts `jetrelay` with `args` and `env` (plus a data dir, free ports and two workers).
    /// With `metrics_listener`, waits until `/healthz` answers; without, disables it.
    pub fn start(args: &[&str], env: &[(&str, &str)], metrics_listener: bool) -> Relay {
        let dir = temp_dir("relay");
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join("relay.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jetrelay"));
        cmd.arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", &listen.to_string()])
            .arg("--metrics-listen")
            .arg(if metrics_listener {
                metrics.to_string()
            } else {
                String::new()
            })
            .args(["--workers", "2"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Hermetic: the relay reads every JETRELAY_* variable as a setting.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("JETRELAY_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn jetrelay");
        let mut relay = Relay {
            child,
            dir,
            listen,
            metrics,
        };
        if metrics_listener {
            let t0 = Instant::now();
            loop {
                if matches!(relay.try_get("/healthz"), Ok((200, _))) {
                    break;
                }
                if let Ok(Some(status)) = relay.child.try_wait() {
                    panic!(
                        "relay exited ({status}) before serving; log:\n{}",
                        relay.log()
                    );
                }
                assert!(
                    t0.elapsed() < START_TIMEOUT,
                    "relay not healthy after {START_TIMEOUT:?}; log:\n{}",
                    relay.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        relay
    }

    /// The relay's stderr so far, without terminal colour codes.
    pub fn log(&self) -> String {
        let raw = std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw.as_str();
        while let Some(i) = rest.find('\x1b') {
            out.push_str(&rest[..i]);
            // CSI: ESC [ parameters, then one final letter.
            let tail = &rest[i + 1..];
            let end = tail
                .find(|c: char| c.is_ascii_alphabetic())
                .map_or(tail.len(), |e| e + 1);
            rest = &tail[end..];
        }
        out.push_str(rest);
        out
    }

    /// GET on the metrics listener.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\nlog:\n{}", self.log()))
    }

    /// GET on the metrics listener, errors returned.
    pub fn try_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_request(
            self.metrics,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
    }

    /// The process id (for CPU accounting).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends a raw request, reads to EOF; returns (status, body).
pub fn http_request(addr: SocketAddr, request: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    Ok((status, body))
}

/// A WebSocket client on its own thread, counting messages and payload bytes.
pub struct Subscriber {
    /// Messages received.
    pub messages: Arc<AtomicU64>,
    /// Payload bytes received.
    pub bytes: Arc<AtomicU64>,
    /// Set to stop the thread.
    stop: Arc<AtomicBool>,
    /// The reader thread.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    /// Connects to `ws://<addr>/subscribe?<query>`.
    pub fn connect(addr: SocketAddr, query: &str) -> Subscriber {
        let url = format!("ws://{addr}/subscribe?{query}");
        let (mut ws, _) = tungstenite::connect(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
            // Bounds every read so the stop flag is seen.
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
        }
        let messages = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, b, st) = (messages.clone(), bytes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) => {
                        m.fetch_add(1, Ordering::Relaxed);
                        b.fetch_add(t.len() as u64, Ordering::Relaxed);
                    }
                    Ok(tungstenite::Message::Binary(d)) => {
                        m.fetch_add(1, Ordering::Relaxed);
                        b.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
            let _ = ws.close(None);
        });
        Subscriber {
            messages,
            bytes,
            stop,
            thread: Some(thread),
        }
    }

    /// Messages so far.
    pub fn count(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One parsed sample: metric name, labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Full sample name (`_bucket`, `_sum`, `_count` included).
    pub name: String,
    /// Labels by name.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// A scrape: samples, and the `# TYPE` of each family.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Family name → type.
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    /// Parses the text format strictly: every line must be a comment, blank, or a
    /// well-formed sample of a family whose TYPE came first. Panics with the bad line.
    pub fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if line.is_empty() || line.starts_with("# HELP ") {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("bad TYPE: {line}"));
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad type in {line}"
                );
                assert!(
                    scrape.types.insert(name.into(), kind.into()).is_none(),
                    "TYPE twice: {line}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment: {line}");
            scrape.samples.push(parse_sample(line));
        }
        for s in &scrape.samples {
            let family = scrape.family_of(&s.name);
            assert!(family.is_some(), "sample without TYPE: {}", s.name);
        }
        scrape
    }

    /// The family a sample name belongs to (histograms own `_bucket`, `_sum`, `_count`).
    pub fn family_of(&self, name: &str) -> Option<&str> {
        if self.types.contains_key(name) {
            return self.types.get_key_value(name).map(|(k, _)| k.as_str());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            (self.types.get(base).map(String::as_str) == Some("histogram"))
                .then(|| self.types.get_key_value(base).map(|(k, _)| k.as_str()))?
        })
    }

    /// Value of the sample with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// Like [`Scrape::value`], panicking with the series name when absent.
    pub fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("series {name}{labels:?} missing"))
    }

    /// Sum over every sample of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// Every sample of `name`.
    pub fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

fn parse_sample(line: &str) -> Sample {
    fn fail(line: &str) -> ! {
        panic!("bad sample line: {line}")
    }
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| fail(line));
    let name = &line[..name_end];
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit()),
        "bad metric name in {line}"
    );
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if c == '}' {
                end = Some(i);
                break;
            }
            // key="value" with \\, \" and \n escapes, comma separated.
            let key_start = i;
            let mut key_end = i;
            for (j, c) in chars.by_ref() {
                if c == '=' {
                    key_end = j;
                    break;
                }
            }
            let key = &body[key_start..key_end];
            assert!(
                matches!(chars.next(), Some((_, '"'))),
                "label value not quoted: {line}"
            );
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => fail(line),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => fail(line),
                }
            }
            assert!(
                labels.insert(key.to_owned(), value).is_none(),
                "label twice: {line}"
            );
            if let Some((_, ',')) = chars.peek() {
                chars.next();
            }
        }
        let end = end.unwrap_or_else(|| fail(line));
        rest = &body[end + 1..];
    }
    let value_text = rest.strip_prefix(' ').unwrap_or_else(|| fail(line));
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().unwrap_or_else(|_| fail(line)),
    };
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

/// CPU time (user + system) the process has used so far, from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = rustix::param::clock_ticks_per_second();
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}
