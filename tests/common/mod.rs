//! Shared harness for integration tests: start the real binaries (mock upstream, relay,
//! swarm) on free loopback ports with private data directories, and kill them on drop.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) when dropped, so a failing test leaves nothing behind.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Sends SIGTERM and waits (bounded) for a graceful exit; returns whether it exited 0.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        false
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A fresh, empty directory under the system temp dir, removed together with the files named
/// after it (the relay logs written beside it) when the test that made it passes. A failing
/// test keeps all of it for the post-mortem, and says where. Without this every run left its
/// data directories and logs behind: 4.4 GB of /tmp after a few dozen runs of the suite.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Its path (for APIs that want an owned or `&PathBuf`).
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}*", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
        // Siblings named `<dir>.<something>`: the logs of the processes that used it.
        let (Some(parent), Some(name)) = (self.0.parent(), self.0.file_name()) else {
            return;
        };
        let prefix = format!("{}.", name.to_string_lossy());
        if let Ok(entries) = std::fs::read_dir(parent) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// A fresh, empty [`TempDir`] under the system temp dir.
pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "jetrelay-test-{}-{}-{}",
        name,
        std::process::id(),
        fastrand::u32(..)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listening on port {port} after {within:?}");
}

/// Polls `cond` until it holds.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {within:?} waiting for {what}");
}

fn spawn(name: &str, bin: &str, args: &[String], log: Option<&Path>) -> Proc {
    spawn_env(name, bin, args, log, &[])
}

fn spawn_env(
    name: &str,
    bin: &str,
    args: &[String],
    log: Option<&Path>,
    env: &[(&str, &str)],
) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    match log {
        Some(path) => {
            let f = std::fs::File::create(path).expect("log file");
            cmd.stdout(f.try_clone().expect("log")).stderr(f);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
    Proc {
        child,
        name: name.into(),
    }
}

/// The upstream simulator.
pub struct Mock {
    /// Process.
    pub proc: Proc,
    /// Its port.
    pub port: u16,
}

impl Mock {
    /// Starts `jetrelay-mock` with `--seed 7` and the given extra flags.
    pub fn start(rate: u64, extra: &[&str]) -> Mock {
        Self::start_on(free_port(), rate, extra)
    }

    /// Same, on a given port (restarts keep the URL).
    pub fn start_on(port: u16, rate: u64, extra: &[&str]) -> Mock {
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--rate".into(),
            rate.to_string(),
            "--seed".into(),
            "7".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = spawn("mock", env!("CARGO_BIN_EXE_jetrelay-mock"), &args, None);
        wait_for_port(port, Duration::from_secs(10));
        Mock { proc, port }
    }

    /// Its subscribe URL, from the first event it generated (the mock starts generating when
    /// it starts; a relay following it live would miss the first few).
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/subscribe?cursor=0", self.port)
    }

    /// GET on the mock's control endpoints (`/drop`, `/stats`).
    pub fn get(&self, path: &str) -> String {
        http_get(self.port, path).1
    }

    /// Events generated so far.
    pub fn seq(&self) -> u64 {
        let body = self.get("/stats");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["seq"].as_u64().unwrap_or(0)
    }
}

/// A relay process.
pub struct Relay {
    /// Process.
    pub proc: Proc,
    /// Public port.
    pub port: u16,
    /// Metrics port.
    pub metrics_port: u16,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Log file (stdout+stderr).
    pub log: PathBuf,
}

impl Relay {
    /// Starts `jetrelay` following `upstream`, with a fresh or given data dir.
    pub fn start(upstream: &str, data_dir: &Path, extra: &[&str]) -> Relay {
        Self::start_on(free_port(), upstream, data_dir, extra)
    }

    /// Same, on a given port.
    pub fn start_on(port: u16, upstream: &str, data_dir: &Path, extra: &[&str]) -> Relay {
        Self::start_via(&[], port, upstream, data_dir, extra)
    }

    /// Same, started through `wrapper` (a program that ends by exec'ing its arguments, e.g.
    /// a sandbox): `wrapper[0] wrapper[1..] jetrelay ARGS`.
    pub fn start_via(
        wrapper: &[String],
        port: u16,
        upstream: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> Relay {
        Self::start_full(wrapper, port, upstream, data_dir, "127.0.0.0/8", extra, &[])
    }

    /// Same, on a given port, with extra environment variables (test hooks, systemd's).
    pub fn start_env(
        port: u16,
        upstream: &str,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Relay {
        Self::start_full(&[], port, upstream, data_dir, "127.0.0.0/8", extra, env)
    }

    /// Same, with only `allow` exempt from the per-address limits (the others default to
    /// all of loopback): admission tests attack from 127.0.0.2 and up and keep their swarm
    /// bystanders on an exempt 127.0.0.1.
    pub fn start_exempting(
        wrapper: &[String],
        port: u16,
        upstream: &str,
        data_dir: &Path,
        allow: &str,
        extra: &[&str],
    ) -> Relay {
        Self::start_full(wrapper, port, upstream, data_dir, allow, extra, &[])
    }

    /// The general form: through `wrapper`, with only `allow` exempt from the per-address
    /// limits, and extra environment variables (test hooks).
    pub fn start_full(
        wrapper: &[String],
        port: u16,
        upstream: &str,
        data_dir: &Path,
        allow: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Relay {
        let metrics_port = free_port();
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--upstream".into(),
            upstream.to_string(),
            // Tests open many connections from 127.0.0.1.
            "--allow-ip".into(),
            allow.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        // Beside the data dir, named after it (appended, not `with_extension`: names may hold
        // dots), so that the dir's TempDir removes it with the dir.
        let log = PathBuf::from(format!("{}.relay-{port}.log", data_dir.display()));
        let relay_bin = env!("CARGO_BIN_EXE_jetrelay").to_string();
        let proc = match wrapper.split_first() {
            None => spawn_env("relay", &relay_bin, &args, Some(&log), env),
            Some((program, rest)) => {
                let mut all: Vec<String> = rest.to_vec();
                all.push(relay_bin);
                all.extend(args);
                spawn_env("relay", program, &all, Some(&log), env)
            }
        };
        wait_for_port(port, Duration::from_secs(20));
        Relay {
            proc,
            port,
            metrics_port,
            data_dir: data_dir.to_path_buf(),
            log,
        }
    }

    /// Its subscribe URL with a query.
    pub fn url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://127.0.0.1:{}/subscribe", self.port)
        } else {
            format!("ws://127.0.0.1:{}/subscribe?{query}", self.port)
        }
    }

    /// The relay's log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A `/subscribe` frame from the relay as the mock's generator made the event: the relay's own
/// `cursor` field (its seq of the event, which it puts right after `time_us`) taken out, and
/// that seq (`None` when the frame has none: a relay that does not add it, or a legacy
/// upstream). Every comparison of relay frames with the generator's bytes goes through this;
/// relay frames compared with relay frames need nothing. A `cursor` anywhere else is left in
/// place, so the comparison that follows fails.
pub fn strip_cursor(frame: &[u8]) -> (Vec<u8>, Option<u64>) {
    let (event, seq) = jetrelay::swarm::v1_cursor::strip(frame);
    (event.into_owned(), seq)
}

/// The generator's number of the event in a relay frame (see [`strip_cursor`]).
pub fn mock_seq(frame: &[u8]) -> Option<u64> {
    jetrelay::mock::Generator::seq_of(&strip_cursor(frame).0)
}

/// Runs `jetrelay-swarm` to completion with `--seed 7 --json` and the given flags.
pub fn swarm(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jetrelay-swarm"));
    cmd.args(["--seed", "7", "--json"]).args(args);
    cmd.output().expect("running jetrelay-swarm")
}

/// Runs the swarm and asserts success, returning its JSON report.
pub fn swarm_ok(args: &[&str]) -> serde_json::Value {
    let out = swarm(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "swarm {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("swarm JSON ({e}): {stdout}"))
}

/// Starts the swarm in the background (for scenarios that act while clients run).
pub fn swarm_spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_jetrelay-swarm"))
        .args(["--seed", "7", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning jetrelay-swarm")
}

/// Twenty well-behaved clients that must get every event in order (at least `min_events`)
/// while a limit is enforced on, or an attack comes from, someone else.
pub fn spawn_bystanders(relay: &Relay, duration: &str, min_events: u64) -> Child {
    swarm_spawn(&[
        "--url",
        &relay.url(""),
        "--clients",
        "20",
        "--duration",
        duration,
        "--expect-in-order",
        "--expect-min-events",
        &min_events.to_string(),
    ])
}

/// Waits for a background swarm and asserts success, returning its JSON report.
pub fn swarm_wait(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("swarm output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "swarm failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("swarm JSON ({e}): {stdout}"))
}

/// A raw HTTP/1.1 exchange: sends `request` verbatim, returns everything until close.
pub fn raw_http(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(request).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// GET `path`: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let resp = raw_http(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Bytes allocated on disk under `dir` (what `du` reports).
pub fn du_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += du_bytes(&p);
            } else if let Ok(st) = rustix::fs::stat(&p) {
                total += st.st_blocks as u64 * 512;
            }
        }
    }
    total
}

/// Apparent size of the four base logs together (what `ls` reports: punched holes count).
pub fn log_len(dir: &Path) -> u64 {
    ["plain.log", "zstd.log", "v2.log", "v2zstd.log"]
        .iter()
        .map(|name| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len()))
        .sum()
}

/// Socket address helper.
pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One labelled value of a metric (`name{...label...} value`), summed over matching lines.
pub fn metric(metrics: &str, name: &str, label: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}
