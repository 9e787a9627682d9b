//! End-to-end tests of the `jetrelay-tls` binary: a real sidecar process between TLS clients
//! written here (tokio-rustls, and `openssl s_client` as an independent client) and a
//! stand-in backend that checks the PROXY v2 header and echoes or streams bytes.
//!
//! Every test bounds its own run time; all traffic stays on loopback and Unix sockets.
//! File descriptors: a test with N connections costs 2N in the sidecar and 2N here; the
//! largest here uses 1,000 connections (~4,000 fds in all). Tests needing more than ~2,500
//! fds are prefixed `scale_`.
//!
//! Knobs: `TLS_SIDECAR_BIN=path` runs another build of the sidecar (e.g. release, for the
//! throughput numbers); `TLS_SIDECAR_TEST_LOGS=1` echoes the sidecar's log lines.

use std::io::{BufRead, BufReader as StdBufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jetrelay::proxy_protocol::{ProxyParse, parse_v2};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Upper bound for any single test.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// Scratch directory

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("jetrelay-tls-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Test PKI: one CA, leaves issued on demand.

struct Pki {
    /// The CA certificate clients trust.
    ca_cert: rcgen::Certificate,
    /// Signs the leaves.
    ca_key: KeyPair,
}

/// A leaf as written to disk, plus its DER to recognise it on the wire.
struct Leaf {
    /// Leaf + CA, as in an ACME fullchain.pem.
    chain_pem: String,
    /// PKCS#8 private key.
    key_pem: String,
    /// The leaf's DER, compared with what the server presents.
    der: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, "jetrelay test CA");
        let ca_cert = params.self_signed(&ca_key).unwrap();
        Pki { ca_cert, ca_key }
    }

    /// Issues a leaf for `names` (DNS names, or IP literals) with `serial`.
    fn leaf(&self, names: &[&str], serial: u64) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for name in names {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().unwrap()),
            });
        }
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.ca_cert.pem()),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    fn write_ca(&self, path: &Path) {
        std::fs::write(path, self.ca_cert.pem()).unwrap();
    }
}

/// Writes a leaf to `<stem>.pem` / `<stem>.key` by write-then-rename (as ACME clients do).
fn install(dir: &TempDir, stem: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let cert = dir.path(&format!("{stem}.pem"));
    let key = dir.path(&format!("{stem}.key"));
    atomic_write(&key, &leaf.key_pem);
    atomic_write(&cert, &leaf.chain_pem);
    (cert, key)
}

fn atomic_write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Stand-in backend: parses the PROXY v2 header, reports the source, then behaves per `Mode`.

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Echo everything back; close after the client closes.
    Echo,
    /// Send `n` bytes of a known pattern, then close the write side.
    Stream(usize),
    /// Send these bytes and close.
    SayAndClose(&'static [u8]),
    /// Read to EOF, then keep the connection open without ever closing it: half-open.
    IgnoreEof,
}

struct Backend {
    /// `--backend` argument.
    arg: String,
    /// One entry per accepted connection: the PROXY source address.
    sources: mpsc::UnboundedReceiver<Option<SocketAddr>>,
    /// Holds the Unix socket's directory for the test's lifetime.
    _dir: Option<TempDir>,
}

impl Backend {
    async fn unix(name: &str, mode: Mode) -> Backend {
        let dir = TempDir::new(&format!("backend-{name}"));
        let path = dir.path("trusted.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle_backend(stream, mode, tx.clone()));
            }
        });
        Backend {
            arg: format!("unix:{}", path.display()),
            sources: rx,
            _dir: Some(dir),
        }
    }

    async fn tcp(mode: Mode) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle_backend(stream, mode, tx.clone()));
            }
        });
        Backend {
            arg: addr.to_string(),
            sources: rx,
            _dir: None,
        }
    }

    async fn next_source(&mut self) -> Option<SocketAddr> {
        tokio::time::timeout(Duration::from_secs(10), self.sources.recv())
            .await
            .expect("backend saw no connection")
            .expect("backend gone")
    }
}

async fn handle_backend<S>(mut s: S, mode: Mode, sources: mpsc::UnboundedSender<Option<SocketAddr>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    let (source, rest) = loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "EOF before a complete PROXY header");
        buf.extend_from_slice(&chunk[..n]);
        match parse_v2(&buf).expect("invalid PROXY header from the sidecar") {
            ProxyParse::Complete { source, consumed } => break (source, buf[consumed..].to_vec()),
            ProxyParse::Incomplete => {}
        }
    };
    let _ = sources.send(source);
    match mode {
        Mode::Echo => {
            let (mut r, mut w) = tokio::io::split(s);
            if w.write_all(&rest).await.is_err() {
                return;
            }
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
        Mode::Stream(n) => {
            let mut sent = 0;
            while sent < n {
                let chunk = pattern_at(sent, (n - sent).min(1 << 20));
                if s.write_all(chunk).await.is_err() {
                    return;
                }
                sent += chunk.len();
            }
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        }
        Mode::IgnoreEof => {
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Mode::SayAndClose(bytes) => {
            let _ = s.write_all(bytes).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        }
    }
}

/// Period of the test byte pattern (prime, so it never lines up with buffer sizes).
const PATTERN_PERIOD: usize = 251;
/// Longest slice [`pattern_at`] returns.
const PATTERN_MAX_SLICE: usize = 1 << 20;

/// `len` bytes (≤ 1 MiB) of the endless pattern `i % 251`, starting at stream offset
/// `offset`; a slice of one cached buffer, because debug-built tests generate bytes slowly.
fn pattern_at(offset: usize, len: usize) -> &'static [u8] {
    static CACHE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(|| {
        (0..PATTERN_MAX_SLICE + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect()
    });
    let start = offset % PATTERN_PERIOD;
    &cache[start..start + len.min(PATTERN_MAX_SLICE)]
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % PATTERN_PERIOD) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// The sidecar process.

struct Sidecar {
    /// The process (killed on drop).
    child: Child,
    /// Where it listens (it binds port 0 and logs the address).
    addr: SocketAddr,
    /// Every stderr line so far.
    logs: Arc<Mutex<Vec<String>>>,
}

fn sidecar_binary() -> PathBuf {
    // Lets the throughput numbers be taken with a release build.
    std::env::var_os("TLS_SIDECAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_jetrelay-tls")))
}

impl Sidecar {
    fn start(backend: &str, certs: &[(PathBuf, PathBuf)], extra: &[&str]) -> Sidecar {
        Self::start_with_env(backend, certs, extra, &[])
    }

    fn start_with_env(
        backend: &str,
        certs: &[(PathBuf, PathBuf)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Sidecar {
        let mut sidecar = Self::spawn(
            &mut Command::new(sidecar_binary()),
            backend,
            certs,
            extra,
            env,
        );
        sidecar.wait_ready();
        sidecar
    }

    fn spawn(
        cmd: &mut Command,
        backend: &str,
        certs: &[(PathBuf, PathBuf)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Sidecar {
        // The sidecar refuses unknown JETRELAY_TLS_* settings; don't inherit any.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("JETRELAY_TLS_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["--listen", "127.0.0.1:0", "--backend", backend]);
        // Most tests open many connections from 127.0.0.1: exempt it from the per-address
        // limits (the admission tests attack from 127.0.0.2 and up).
        cmd.args(["--allow-ip", "127.0.0.1/32"]);
        for (cert, key) in certs {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info,jetrelay::tls=debug")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn jetrelay-tls");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in StdBufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("TLS_SIDECAR_TEST_LOGS").is_some() {
                    eprintln!("[sidecar] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Sidecar {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            logs,
        }
    }

    /// Waits for the "listening" line and takes the bound address from it.
    fn wait_ready(&mut self) {
        let line = self
            .wait_log(|l| l.contains("listening addr="), Duration::from_secs(20))
            .unwrap_or_else(|| panic!("sidecar did not start: {:?}", self.log_text()));
        let addr = line.split("listening addr=").nth(1).unwrap().trim();
        self.addr = addr.parse().unwrap();
    }

    /// Waits (bounded) for a log line matching `pred`.
    fn wait_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.logs.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn count_logs(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.logs.lock().unwrap().iter().filter(|l| pred(l)).count()
    }

    /// Waits (bounded) until at least `n` lines match, and returns the count: a log line can
    /// trail the close the client already saw.
    fn wait_count(&self, pred: impl Fn(&str) -> bool, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let count = self.count_logs(&pred);
            if count >= n || Instant::now() > deadline {
                return count;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// User + system CPU time the sidecar has used so far.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / rustix::param::clock_ticks_per_second() as f64
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Like [`Sidecar::start`], under `prlimit --nofile=N:N`.
    fn start_with_fd_limit(backend: &str, certs: &[(PathBuf, PathBuf)], nofile: u32) -> Sidecar {
        let mut sidecar = Self::spawn(
            Command::new("prlimit")
                .arg(format!("--nofile={nofile}:{nofile}"))
                .arg(sidecar_binary()),
            backend,
            certs,
            &[],
            &[],
        );
        sidecar.wait_ready();
        sidecar
    }

    /// Waits (bounded) for the process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

async fn tls_connect(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    TlsConnector::from(config.clone()).connect(name, tcp).await
}

fn leaf_der(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

async fn echo_round(tls: &mut TlsStream<TcpStream>, msg: &[u8]) {
    tls.write_all(msg).await.unwrap();
    tls.flush().await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut got))
        .await
        .expect("echo timed out")
        .unwrap();
    assert_eq!(got, msg);
}

/// Reads until the peer closes; returns the bytes and whether the close was a clean TLS
/// close_notify (Ok(0)) rather than an abrupt one.
async fn read_until_close<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("connection not closed within {within:?}"),
            Ok(Ok(0)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return (got, false),
        }
    }
}

/// Bytes of a real TLS ClientHello (to send garbage that starts out right).
fn client_hello_bytes(config: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut conn =
        rustls::ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Common setup: a CA, a default leaf for localhost/127.0.0.1, a sidecar over `backend`.
struct Rig {
    /// Certificates live here.
    dir: TempDir,
    /// Issues more leaves.
    pki: Pki,
    /// Client config trusting the CA, offering ALPN http/1.1.
    client: Arc<rustls::ClientConfig>,
    /// The default pair's leaf.
    leaf: Leaf,
    /// `--cert`/`--key` pairs for the sidecar; the first is the default.
    certs: Vec<(PathBuf, PathBuf)>,
}

impl Rig {
    fn new(name: &str) -> Rig {
        let dir = TempDir::new(name);
        let pki = Pki::new();
        let leaf = pki.leaf(&["localhost", "127.0.0.1"], 1);
        let certs = vec![install(&dir, "default", &leaf)];
        let client = pki.client_config();
        Rig {
            dir,
            pki,
            client,
            leaf,
            certs,
        }
    }
}

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound");
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_unix_backend_carries_the_real_client_address() {
    bounded(async {
        let rig = Rig::new("echo-unix");
        let mut backend = Backend::unix("echo-unix", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);

        let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        let client_addr = tls.get_ref().0.local_addr().unwrap();
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(leaf_der(&tls), rig.leaf.der);

        for i in 0..5 {
            echo_round(&mut tls, format!("message {i}\n").as_bytes()).await;
        }
        let big = pattern(300_000);
        let (mut r, mut w) = tokio::io::split(tls);
        let writer = async {
            w.write_all(&big).await.unwrap();
            w.flush().await.unwrap();
            w
        };
        let reader = async {
            let mut got = vec![0u8; big.len()];
            r.read_exact(&mut got).await.unwrap();
            got
        };
        let (w, got) = tokio::join!(writer, reader);
        assert_eq!(got, big);
        assert_eq!(backend.next_source().await, Some(client_addr));

        // Client closes cleanly: the backend sees EOF, closes, and the client gets close_notify.
        let mut tls = r.unsplit(w);
        tls.shutdown().await.unwrap();
        let (rest, clean) = read_until_close(&mut tls, Duration::from_secs(5)).await;
        assert!(rest.is_empty());
        assert!(clean, "expected close_notify from the sidecar");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_backend_streams_exact_bytes_and_measures_throughput() {
    bounded(async {
        let rig = Rig::new("stream-tcp");
        const LEN: usize = 512 << 20;
        let mut backend = Backend::tcp(Mode::Stream(LEN)).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);

        let mut tls = tls_connect(sidecar.addr, &rig.client, "127.0.0.1")
            .await
            .unwrap();
        let client_addr = tls.get_ref().0.local_addr().unwrap();
        let cpu_before = sidecar.cpu_seconds();
        let start = Instant::now();
        let mut received = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    assert!(
                        buf[..n] == *pattern_at(received, n),
                        "bytes differ in the {n} bytes after offset {received}"
                    );
                    received += n;
                }
                Err(e) => panic!("stream broke after {received} bytes: {e}"),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = sidecar.cpu_seconds() - cpu_before;
        assert_eq!(received, LEN);
        // Wall-clock speed depends on this (shared, 2-core) machine and on the debug-built
        // client; the sidecar's own CPU time per byte is the number that scales.
        let mib = (LEN >> 20) as f64;
        println!(
            "throughput: {mib} MiB in {secs:.2}s = {:.0} MiB/s wall; sidecar CPU {cpu:.2}s = \
             {:.0} MiB per sidecar CPU-second (one connection, loopback, {})",
            mib / secs,
            mib / cpu.max(0.01),
            sidecar_binary().display()
        );
        assert_eq!(backend.next_source().await, Some(client_addr));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_thousand_concurrent_connections_each_get_their_own_bytes() {
    bounded(async {
        const N: usize = 1000;
        let rig = Rig::new("thousand");
        let mut backend = Backend::unix("thousand", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);

        let barrier = Arc::new(tokio::sync::Barrier::new(N + 1));
        let mut tasks = Vec::with_capacity(N);
        for i in 0..N {
            let (client, addr, barrier) = (rig.client.clone(), sidecar.addr, barrier.clone());
            tasks.push(tokio::spawn(async move {
                let mut tls = tls_connect(addr, &client, "localhost").await.unwrap();
                let local = tls.get_ref().0.local_addr().unwrap();
                echo_round(&mut tls, format!("hello from {i}").as_bytes()).await;
                // Everyone is connected at the same time before anyone leaves.
                barrier.wait().await;
                echo_round(&mut tls, format!("goodbye from {i}").as_bytes()).await;
                tls.shutdown().await.unwrap();
                local
            }));
        }
        barrier.wait().await;
        let mut locals = Vec::with_capacity(N);
        for t in tasks {
            locals.push(t.await.unwrap());
        }
        let mut sources = Vec::with_capacity(N);
        for _ in 0..N {
            sources.push(backend.next_source().await.unwrap());
        }
        locals.sort();
        sources.sort();
        assert_eq!(
            sources, locals,
            "every client's real address reached the backend"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_idle_connection_memory_is_small() {
    bounded(async {
        const N: usize = 1000;
        const BATCH: usize = 50;
        let rig = Rig::new("memory");
        let backend = Backend::unix("memory", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);

        // Warm up: first handshakes initialise lazily allocated state.
        for _ in 0..2 {
            let mut warm = Vec::new();
            for _ in 0..BATCH {
                let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
                    .await
                    .unwrap();
                echo_round(&mut tls, b"warm").await;
                warm.push(tls);
            }
            drop(warm);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let before = sidecar.rss_kib();

        let mut held = Vec::with_capacity(N);
        while held.len() < N {
            let batch: Vec<_> = (0..BATCH)
                .map(|_| {
                    let (client, addr) = (rig.client.clone(), sidecar.addr);
                    tokio::spawn(async move {
                        let mut tls = tls_connect(addr, &client, "localhost").await.unwrap();
                        echo_round(&mut tls, b"ping").await;
                        tls
                    })
                })
                .collect();
            for t in batch {
                held.push(t.await.unwrap());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = sidecar.rss_kib();
        let per_conn = (after.saturating_sub(before)) as f64 / N as f64;
        println!(
            "memory: RSS {before} KiB -> {after} KiB with {N} idle established connections: \
             {per_conn:.1} KiB per connection"
        );
        assert!(
            per_conn <= 32.0,
            "{per_conn:.1} KiB per idle connection exceeds 32 KiB"
        );
        // They all still work.
        for tls in held.iter_mut().step_by(97) {
            echo_round(tls, b"still here").await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_is_picked_up_and_old_connections_keep_streaming() {
    bounded(async {
        let rig = Rig::new("rotate");
        let backend = Backend::unix("rotate", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);

        let mut old = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        assert_eq!(leaf_der(&old), rig.leaf.der);
        echo_round(&mut old, b"before rotation").await;

        // Renew on disk the way ACME clients do (write new files, rename over the old).
        let renewed = rig.pki.leaf(&["localhost", "127.0.0.1"], 2);
        install(&rig.dir, "default", &renewed);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let fresh = tls_connect(sidecar.addr, &rig.client, "localhost")
                .await
                .unwrap();
            if leaf_der(&fresh) == renewed.der {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "renewed certificate not served within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            sidecar
                .wait_log(
                    |l| l.contains("certificates reloaded"),
                    Duration::from_secs(1)
                )
                .is_some()
        );
        // The connection made before the reload is untouched.
        for i in 0..3 {
            echo_round(&mut old, format!("after rotation {i}").as_bytes()).await;
        }
        assert_eq!(leaf_der(&old), rig.leaf.der);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_replacements_are_refused_and_the_old_certificate_keeps_serving() {
    bounded(async {
        let rig = Rig::new("invalid");
        let backend = Backend::unix("invalid", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);
        let (cert_path, key_path) = rig.certs[0].clone();
        let mut old = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();

        // 1. Garbage PEM in the certificate file.
        atomic_write(
            &cert_path,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n",
        );
        let line = sidecar
            .wait_log(
                |l| l.contains("certificate reload failed"),
                Duration::from_secs(10),
            )
            .expect("no reload error logged");
        assert!(line.contains(&cert_path.display().to_string()), "{line}");
        let fresh = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        assert_eq!(leaf_der(&fresh), rig.leaf.der);

        // 2. A valid certificate with somebody else's key.
        let other = rig.pki.leaf(&["localhost", "127.0.0.1"], 3);
        let stranger = rig.pki.leaf(&["stranger.test"], 4);
        atomic_write(&key_path, &stranger.key_pem);
        atomic_write(&cert_path, &other.chain_pem);
        let line = sidecar
            .wait_log(|l| l.contains("does not match"), Duration::from_secs(10))
            .expect("no key mismatch logged");
        assert!(line.contains(&key_path.display().to_string()), "{line}");
        // The key text never reaches the logs.
        let secret_line = stranger.key_pem.lines().nth(1).unwrap();
        assert!(!sidecar.log_text().contains(secret_line));
        let fresh = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        assert_eq!(leaf_der(&fresh), rig.leaf.der);
        echo_round(&mut old, b"old connection unaffected").await;

        // 3. Fixing the key recovers without a restart.
        atomic_write(&key_path, &other.key_pem);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let fresh = tls_connect(sidecar.addr, &rig.client, "localhost")
                .await
                .unwrap();
            if leaf_der(&fresh) == other.der {
                break;
            }
            assert!(Instant::now() < deadline, "fixed pair not picked up");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_forces_a_reload() {
    bounded(async {
        let rig = Rig::new("sighup");
        let backend = Backend::unix("sighup", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);
        sidecar.signal(rustix::process::Signal::HUP);
        let line = sidecar
            .wait_log(
                |l| l.contains("certificates reloaded"),
                Duration::from_secs(10),
            )
            .expect("no reload after SIGHUP");
        assert!(line.contains("forced=true"), "{line}");
        let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        echo_round(&mut tls, b"still serving").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_selects_exact_wildcard_and_default_certificates() {
    bounded(async {
        let mut rig = Rig::new("sni");
        let a = rig.pki.leaf(&["a.test"], 10);
        let b = rig.pki.leaf(&["*.b.test", "b.test"], 11);
        rig.certs.push(install(&rig.dir, "a", &a));
        rig.certs.push(install(&rig.dir, "b", &b));
        let backend = Backend::unix("sni", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);

        for (name, expected) in [
            ("a.test", &a.der),
            ("b.test", &b.der),
            ("x.b.test", &b.der),
            ("localhost", &rig.leaf.der),
            // No SNI at all (an IP address as the name): the first pair.
            ("127.0.0.1", &rig.leaf.der),
        ] {
            let mut tls = tls_connect(sidecar.addr, &rig.client, name).await.unwrap();
            assert_eq!(&leaf_der(&tls), expected, "name {name}");
            echo_round(&mut tls, name.as_bytes()).await;
        }
        // An unknown name gets the default, which the client then rejects.
        let err = tls_connect(sidecar.addr, &rig.client, "unknown.test")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_pkcs1_and_sec1_keys_from_openssl_work() {
    bounded(async {
        if Command::new("openssl").arg("version").output().is_err() {
            println!("SKIPPED: openssl not installed");
            return;
        }
        let rig = Rig::new("keyformats");
        let mut certs = rig.certs.clone();
        let mut ders = Vec::new();
        for (name, genkey) in [
            (
                "rsa.test",
                vec!["genrsa", "-traditional", "-out", "KEY", "2048"],
            ),
            (
                "ec.test",
                vec!["ecparam", "-name", "prime256v1", "-genkey", "-out", "KEY"],
            ),
        ] {
            let key = rig.dir.path(&format!("{name}.key"));
            let cert = rig.dir.path(&format!("{name}.pem"));
            let args: Vec<String> = genkey
                .iter()
                .map(|a| {
                    if *a == "KEY" {
                        key.display().to_string()
                    } else {
                        a.to_string()
                    }
                })
                .collect();
            assert!(
                Command::new("openssl")
                    .args(&args)
                    .status()
                    .unwrap()
                    .success()
            );
            let text = std::fs::read_to_string(&key).unwrap();
            let marker = if name.starts_with("rsa") {
                "BEGIN RSA PRIVATE KEY"
            } else {
                "BEGIN EC PRIVATE KEY"
            };
            assert!(text.contains(marker), "{name}: expected a {marker} file");
            let ok = Command::new("openssl")
                .args(["req", "-x509", "-new", "-key"])
                .arg(&key)
                .args(["-out"])
                .arg(&cert)
                .args(["-days", "2", "-subj", &format!("/CN={name}"), "-addext"])
                .arg(format!("subjectAltName=DNS:{name}"))
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            assert!(ok);
            let pem = std::fs::read(&cert).unwrap();
            use rustls::pki_types::pem::PemObject;
            ders.push(CertificateDer::from_pem_slice(&pem).unwrap());
            certs.push((cert, key));
        }
        let backend = Backend::unix("keyformats", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &certs, &[]);
        // These are self-signed: accept any certificate, and just compare what we got.
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        for (name, der) in [("rsa.test", &ders[0]), ("ec.test", &ders[1])] {
            let mut tls = tls_connect(sidecar.addr, &config, name).await.unwrap();
            assert_eq!(&leaf_der(&tls), der, "{name}");
            echo_round(&mut tls, name.as_bytes()).await;
        }
    })
    .await;
}

/// A verifier for self-signed test certificates; still checks the handshake signature.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_plain_http_and_truncated_hello_close_only_that_connection() {
    bounded(async {
        let rig = Rig::new("garbage");
        let backend = Backend::unix("garbage", Mode::Echo).await;
        // A long handshake timeout: a prompt close below proves it was the bad input.
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &["--handshake-timeout", "30s"]);
        let mut good = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        echo_round(&mut good, b"before").await;

        let hello = client_hello_bytes(&rig.client);
        let inputs: Vec<(&str, Vec<u8>)> = vec![
            (
                "random garbage",
                (0..2000u32).map(|i| (i * 7919 % 256) as u8).collect(),
            ),
            (
                "plaintext HTTP",
                b"GET /subscribe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            ),
            (
                "truncated ClientHello + FIN",
                hello[..hello.len() / 2].to_vec(),
            ),
        ];
        for (what, bytes) in inputs {
            let start = Instant::now();
            let mut tcp = TcpStream::connect(sidecar.addr).await.unwrap();
            tcp.write_all(&bytes).await.unwrap();
            if what.contains("FIN") {
                tcp.shutdown().await.unwrap();
            }
            let (reply, _) = read_until_close(&mut tcp, Duration::from_secs(5)).await;
            assert!(start.elapsed() < Duration::from_secs(5), "{what}");
            // At most a TLS alert came back, never application data.
            assert!(reply.len() < 64, "{what}: {} bytes back", reply.len());
            if let Some(&first) = reply.first() {
                assert_eq!(first, 0x15, "{what}: expected a TLS alert record");
            }
        }
        echo_round(&mut good, b"after").await;
        let mut fresh = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        echo_round(&mut fresh, b"new connection").await;
        assert!(sidecar.wait_count(|l| l.contains("TLS handshake failed"), 3) >= 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_closes_silent_and_stalled_clients() {
    bounded(async {
        let rig = Rig::new("hs-timeout");
        let backend = Backend::unix("hs-timeout", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &["--handshake-timeout", "1s"]);
        let hello = client_hello_bytes(&rig.client);
        for partial in [&[][..], &hello[..hello.len() / 2]] {
            let start = Instant::now();
            let mut tcp = TcpStream::connect(sidecar.addr).await.unwrap();
            tcp.write_all(partial).await.unwrap();
            read_until_close(&mut tcp, Duration::from_secs(5)).await;
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(900),
                "closed too early: {took:?}"
            );
            assert!(took < Duration::from_secs(4), "closed too late: {took:?}");
        }
        assert_eq!(
            sidecar.wait_count(|l| l.contains("TLS handshake timed out"), 2),
            2
        );
        let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        echo_round(&mut tls, b"fine").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gives_the_client_a_clean_tls_close() {
    bounded(async {
        let rig = Rig::new("backend-down");
        let missing = format!("unix:{}", rig.dir.path("nobody-listens.sock").display());
        let sidecar = Sidecar::start(&missing, &rig.certs, &[]);
        for _ in 0..3 {
            let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
                .await
                .unwrap();
            let (got, clean) = read_until_close(&mut tls, Duration::from_secs(5)).await;
            assert!(got.is_empty());
            assert!(clean, "expected close_notify, not an abrupt close");
        }
        // One warning, not one per connection.
        assert_eq!(
            sidecar.wait_count(|l| l.contains("cannot reach the backend; closing"), 1),
            1
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_close_reaches_the_client_as_close_notify() {
    bounded(async {
        let rig = Rig::new("backend-close");
        let backend = Backend::unix("backend-close", Mode::SayAndClose(b"bye\n")).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);
        let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        let (got, clean) = read_until_close(&mut tls, Duration::from_secs(5)).await;
        assert_eq!(got, b"bye\n");
        assert!(clean, "expected close_notify after the backend's FIN");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_quiet_connections_cleanly() {
    bounded(async {
        let rig = Rig::new("idle");
        let backend = Backend::unix("idle", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &["--idle-timeout", "1s"]);
        let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        echo_round(&mut tls, b"one").await;
        let start = Instant::now();
        let (got, clean) = read_until_close(&mut tls, Duration::from_secs(5)).await;
        let took = start.elapsed();
        assert!(got.is_empty() && clean);
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{took:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_closes_the_excess_at_once() {
    bounded(async {
        let rig = Rig::new("max-conns");
        let backend = Backend::unix("max-conns", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &["--max-connections", "2"]);
        let mut a = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        let mut b = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        echo_round(&mut a, b"a").await;
        echo_round(&mut b, b"b").await;
        let start = Instant::now();
        let err = tls_connect(sidecar.addr, &rig.client, "localhost").await;
        assert!(err.is_err(), "third connection should have been refused");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(sidecar.wait_count(|l| l.contains("max_connections reached"), 1) >= 1);
        // Capacity comes back when a connection leaves.
        a.shutdown().await.unwrap();
        read_until_close(&mut a, Duration::from_secs(5)).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut c = loop {
            if let Ok(c) = tls_connect(sidecar.addr, &rig.client, "localhost").await {
                break c;
            }
            assert!(Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        echo_round(&mut c, b"c").await;
        echo_round(&mut b, b"b again").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_drains_established_connections() {
    bounded(async {
        let rig = Rig::new("drain");
        let backend = Backend::unix("drain", Mode::Echo).await;
        let mut sidecar = Sidecar::start(&backend.arg, &rig.certs, &["--drain-timeout", "20s"]);
        let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        echo_round(&mut tls, b"before").await;
        sidecar.signal(rustix::process::Signal::TERM);
        sidecar
            .wait_log(|l| l.contains("draining"), Duration::from_secs(5))
            .expect("no drain started");
        // No new connections ...
        assert!(
            tls_connect(sidecar.addr, &rig.client, "localhost")
                .await
                .is_err()
        );
        // ... but the established one keeps working until it leaves.
        echo_round(&mut tls, b"during drain").await;
        assert!(
            sidecar.child.try_wait().unwrap().is_none(),
            "exited before the drain"
        );
        tls.shutdown().await.unwrap();
        read_until_close(&mut tls, Duration::from_secs(5)).await;
        let status = sidecar
            .wait_exit(Duration::from_secs(10))
            .expect("did not exit after drain");
        assert!(status.success(), "{status:?}");
        assert!(sidecar.log_text().contains("all connections closed"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_shutdown() {
    bounded(async {
        let rig = Rig::new("drain-timeout");
        let backend = Backend::unix("drain-timeout", Mode::Echo).await;
        let mut sidecar = Sidecar::start(&backend.arg, &rig.certs, &["--drain-timeout", "1s"]);
        let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        echo_round(&mut tls, b"hold").await;
        let start = Instant::now();
        sidecar.signal(rustix::process::Signal::INT);
        let status = sidecar
            .wait_exit(Duration::from_secs(10))
            .expect("did not exit");
        assert!(status.success());
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{took:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_negotiates_tls13_and_tls12_and_sees_the_subject() {
    bounded(async {
        if Command::new("openssl").arg("version").output().is_err() {
            println!("SKIPPED: openssl not installed");
            return;
        }
        let rig = Rig::new("openssl");
        let backend = Backend::unix("openssl", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);
        let ca = rig.dir.path("ca.pem");
        rig.pki.write_ca(&ca);
        for (flag, expected) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
            let addr = sidecar.addr.to_string();
            let ca = ca.clone();
            let out = tokio::task::spawn_blocking(move || {
                Command::new("openssl")
                    .args(["s_client", "-connect", &addr, "-servername", "localhost"])
                    .args(["-alpn", "http/1.1", flag, "-CAfile"])
                    .arg(&ca)
                    .stdin(Stdio::null())
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                text.contains(&format!("New, {expected}, Cipher is")),
                "{text}"
            );
            assert!(
                text.contains("subject=CN = localhost") || text.contains("subject=CN=localhost"),
                "{text}"
            );
            assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
            assert!(text.contains("ALPN protocol: http/1.1"), "{text}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_and_status() {
    bounded(async {
        let rig = Rig::new("notify");
        let backend = Backend::unix("notify", Mode::Echo).await;
        let socket_path = rig.dir.path("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let sidecar = Sidecar::start_with_env(
            &backend.arg,
            &rig.certs,
            &[],
            &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
        );
        let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        echo_round(&mut tls, b"count me").await;
        let messages = tokio::task::spawn_blocking(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // READY first, then a STATUS tick (every 5 s) showing the connection.
            while !seen.iter().any(|m: &String| m.contains("1 established")) {
                let n = socket.recv(&mut buf).expect("no sd_notify message in time");
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            seen
        })
        .await
        .unwrap();
        assert!(messages[0].contains("READY=1"), "{messages:?}");
        assert!(
            messages.iter().any(|m| m.contains("STATUS=1 established")),
            "{messages:?}"
        );
        drop(sidecar);
    })
    .await;
}

#[tokio::test]
async fn config_layers_file_env_and_flags_and_errors_name_the_setting() {
    bounded(async {
        let rig = Rig::new("config");
        let (cert, key) = rig.certs[0].clone();
        let toml = rig.dir.path("tls.toml");
        std::fs::write(
            &toml,
            format!(
                "listen = [\"127.0.0.1:1443\"]\nbackend = \"unix:/from/file.sock\"\n\
                 cert = [{cert:?}]\nkey = [{key:?}]\n"
            ),
        )
        .unwrap();
        let run = |env: &[(&str, &str)], args: &[&str]| {
            let mut cmd = Command::new(sidecar_binary());
            cmd.arg("--check-config")
                .arg("--config")
                .arg(&toml)
                .args(args);
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = cmd.output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        };
        let (ok, text) = run(&[], &[]);
        assert!(ok, "{text}");
        assert!(
            text.contains("127.0.0.1:1443") && text.contains("unix:/from/file.sock"),
            "{text}"
        );

        // env beats file
        let (ok, text) = run(&[("JETRELAY_TLS_LISTEN", "[::1]:2443")], &[]);
        assert!(
            ok && text.contains("[::1]:2443") && !text.contains("127.0.0.1:1443"),
            "{text}"
        );
        // flags beat env
        let (ok, text) = run(
            &[("JETRELAY_TLS_BACKEND", "127.0.0.1:7000")],
            &["--backend", "127.0.0.1:7001"],
        );
        assert!(ok && text.contains("backend: 127.0.0.1:7001"), "{text}");
        let (ok, text) = run(&[("JETRELAY_TLS_BACKEND", "127.0.0.1:7000")], &[]);
        assert!(ok && text.contains("backend: 127.0.0.1:7000"), "{text}");

        // errors name the setting
        let (ok, text) = run(&[("JETRELAY_TLS_MAX_CONNECTIONS", "lots")], &[]);
        assert!(
            !ok && text.to_lowercase().contains("max_connections"),
            "{text}"
        );
        let (ok, text) = run(&[], &["--handshake-timeout", "soon"]);
        assert!(!ok && text.contains("handshake_timeout"), "{text}");
        let (ok, text) = run(
            &[],
            &[
                "--key",
                "/nonexistent/key.pem",
                "--cert",
                "/nonexistent/cert.pem",
            ],
        );
        assert!(!ok && text.contains("/nonexistent/cert.pem"), "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_are_closed_after_the_grace() {
    bounded(async {
        let rig = Rig::new("half-open");
        let backend = Backend::unix("half-open", Mode::IgnoreEof).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &["--half-close-timeout", "1s"]);
        let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost")
            .await
            .unwrap();
        // Our side is done; the backend reads EOF but never closes its side.
        tls.shutdown().await.unwrap();
        let start = Instant::now();
        let (got, _) = read_until_close(&mut tls, Duration::from_secs(5)).await;
        let took = start.elapsed();
        assert!(got.is_empty());
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{took:?}"
        );
        assert!(
            sidecar
                .wait_log(|l| l.contains("half-close timeout"), Duration::from_secs(2))
                .is_some()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_backs_off_instead_of_spinning_and_recovers() {
    bounded(async {
        if Command::new("prlimit").arg("--version").output().is_err() {
            println!("SKIPPED: prlimit (util-linux) not installed");
            return;
        }
        let rig = Rig::new("emfile");
        let backend = Backend::unix("emfile", Mode::Echo).await;
        let sidecar = Sidecar::start_with_fd_limit(&backend.arg, &rig.certs, 64);
        // Silent TCP connections each pin one descriptor in the handshake phase.
        let mut hogs = Vec::new();
        for _ in 0..120 {
            hogs.push(TcpStream::connect(sidecar.addr).await.unwrap());
        }
        sidecar
            .wait_log(
                |l| l.contains("accept failed; backing off"),
                Duration::from_secs(10),
            )
            .expect("EMFILE never reported");
        let cpu_before = sidecar.cpu_seconds();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu = sidecar.cpu_seconds() - cpu_before;
        assert!(cpu < 0.5, "accept loop spun: {cpu:.2} CPU-s in 2 s");
        // Throttled: one line, not one per retry.
        assert!(sidecar.count_logs(|l| l.contains("accept failed")) <= 2);
        drop(hogs);
        // Descriptors come back as the sidecar notices the closes; then service resumes.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut tls = loop {
            match tls_connect(sidecar.addr, &rig.client, "localhost").await {
                Ok(tls) => break tls,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no recovery after EMFILE: {e}"),
            }
        };
        echo_round(&mut tls, b"recovered").await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Admission: per-address limits at accept, before any TLS work.

/// A TCP connection from loopback address `src` (127.0.0.2 and up are other "hosts").
fn tcp_from(src: std::net::Ipv4Addr, dst: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((src, 0)).into())?;
    s.connect_timeout(&dst.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// A TLS connection from `src`.
async fn tls_connect_from(
    src: std::net::Ipv4Addr,
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let std_tcp = tokio::task::spawn_blocking(move || tcp_from(src, addr))
        .await
        .expect("connect task")?;
    std_tcp.set_nonblocking(true)?;
    let tcp = TcpStream::from_std(std_tcp)?;
    let name = ServerName::try_from("localhost".to_string()).unwrap();
    TlsConnector::from(config.clone()).connect(name, tcp).await
}

/// Every 250 ms until `until`, a client from 127.0.0.3 completes a TLS handshake and an echo
/// round through the sidecar, each within a second.
async fn probe_good_tls_client(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    until: Instant,
) -> Vec<Duration> {
    probe_good_tls_client_from(std::net::Ipv4Addr::new(127, 0, 0, 3), addr, config, until).await
}

/// [`probe_good_tls_client`] from address `good`.
async fn probe_good_tls_client_from(
    good: std::net::Ipv4Addr,
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    until: Instant,
) -> Vec<Duration> {
    let mut took = Vec::new();
    while Instant::now() < until {
        let t0 = Instant::now();
        let mut tls =
            tokio::time::timeout(Duration::from_secs(3), tls_connect_from(good, addr, config))
                .await
                .expect("a client from another address could not finish its handshake in 3 s")
                .expect("a client from another address was refused");
        echo_round(&mut tls, b"still served").await;
        // The 3 s timeout above bounds every sample; the median says the bystander is served
        // promptly, while one sample on a shared 2-core machine may meet a preemption.
        took.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut sorted = took.clone();
    sorted.sort();
    assert!(
        sorted.get(sorted.len() / 2) < Some(&Duration::from_secs(1)),
        "handshake + echo under the flood took {took:?}"
    );
    took
}

fn raise_nofile() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = lim.maximum;
    let _ = setrlimit(Resource::Nofile, lim);
    getrlimit(Resource::Nofile).current.unwrap_or(1024)
}

/// 8,000 silent connections from one address in ~2 s: before, they held the 1,024 handshake
/// permits until their deadline and nobody else could finish a handshake. Now that address
/// keeps at most its `max_handshakes_per_ip` and the rest are closed at accept; a client
/// from another address is served within a second throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_accept_flood_from_one_address_does_not_lock_out_others() {
    bounded(async {
        let flood = 8000usize.min(raise_nofile().saturating_sub(1000) as usize);
        let rig = Rig::new("adm-flood");
        let backend = Backend::unix("adm-flood", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);
        let addr = sidecar.addr;
        let flooder = std::thread::spawn(move || {
            let src = std::net::Ipv4Addr::new(127, 0, 0, 2);
            let t0 = Instant::now();
            let mut socks = Vec::with_capacity(flood);
            for i in 0..flood {
                let due = t0 + Duration::from_micros(250 * i as u64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .expect("socket");
                s.bind(&SocketAddr::from((src, 0)).into()).expect("bind");
                s.set_nonblocking(true).expect("nonblocking");
                let _ = s.connect(&addr.into());
                socks.push(std::net::TcpStream::from(s));
            }
            socks
        });
        let took =
            probe_good_tls_client(addr, &rig.client, Instant::now() + Duration::from_secs(4)).await;
        let socks = tokio::task::spawn_blocking(move || flooder.join().expect("flooder"))
            .await
            .unwrap();
        let open = socks
            .iter()
            .filter(|s| {
                let mut b = [0u8; 1];
                matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        eprintln!("flood of {flood}: {open} still open; good client: {took:?}");
        assert!(open <= 32, "{open} flooding connections still held");
        let status = sidecar.log_text();
        assert!(
            status.contains("closing connections at accept"),
            "refusals are summarized in the log:\n{status}"
        );
    })
    .await;
}

/// One address completing full TLS handshakes as fast as it can: before, each cost the
/// sidecar the handshake's crypto, unthrottled. Now its handshakes are limited to
/// `conn_rate_per_ip` (10/s, burst 20) and the rest are closed at accept, before any crypto;
/// a client from another address is served within a second throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_full_handshakes_from_one_address_are_throttled() {
    bounded(async {
        let rig = Rig::new("adm-cpu");
        let backend = Backend::unix("adm-cpu", Mode::Echo).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);
        let addr = sidecar.addr;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut attackers = Vec::new();
        for _ in 0..4 {
            let (stop, done, client) = (stop.clone(), done.clone(), rig.client.clone());
            attackers.push(tokio::spawn(async move {
                let src = std::net::Ipv4Addr::new(127, 0, 0, 2);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if tls_connect_from(src, addr, &client).await.is_ok() {
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        let cpu0 = sidecar.cpu_seconds();
        let t0 = Instant::now();
        let took =
            probe_good_tls_client(addr, &rig.client, Instant::now() + Duration::from_secs(3)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for a in attackers {
            a.await.unwrap();
        }
        let window = t0.elapsed().as_secs_f64();
        let cpu = sidecar.cpu_seconds() - cpu0;
        let handshakes = done.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "attacker: {handshakes} full handshakes in {window:.1} s; sidecar CPU {cpu:.2} s \
             ({:.0} %); good client: {took:?}",
            100.0 * cpu / window
        );
        // Burst 20 + 10/s.
        assert!(
            handshakes as f64 <= 20.0 + 10.0 * window + 5.0,
            "{handshakes} handshakes in {window:.1} s"
        );
    })
    .await;
}

/// Many addresses each send a real ClientHello and then stall (never send their second
/// flight). Before, each such handshake held a `max_handshakes` permit from its ClientHello
/// to its deadline, so 8 stalled peers (here; 64 addresses × 16 with the defaults) locked
/// every other client out for the whole `handshake_timeout`. Now a permit is held only while
/// the sidecar computes, so every stalled peer gets its server flight and a client from
/// another address is served within a second throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_stalled_handshakes_from_many_addresses_hold_no_permits() {
    bounded(async {
        const PERMITS: usize = 8;
        const ADDRESSES: u8 = 16;
        const PER_ADDRESS: usize = 2;
        let rig = Rig::new("adm-stall");
        let backend = Backend::unix("adm-stall", Mode::Echo).await;
        let sidecar = Sidecar::start(
            &backend.arg,
            &rig.certs,
            &["--max-handshakes", &PERMITS.to_string()],
        );
        let addr = sidecar.addr;
        let mut stalled = Vec::new();
        for host in 10..10 + ADDRESSES {
            for _ in 0..PER_ADDRESS {
                let src = std::net::Ipv4Addr::new(127, 0, 0, host);
                let hello = client_hello_bytes(&rig.client);
                let tcp = tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    let mut tcp = tcp_from(src, addr)?;
                    tcp.write_all(&hello)?;
                    tcp.set_nonblocking(true)?;
                    Ok::<_, std::io::Error>(tcp)
                })
                .await
                .expect("attacker task")
                .expect("attacker connect");
                stalled.push(TcpStream::from_std(tcp).unwrap());
            }
        }
        // Each stalled peer that got its server flight back has had its crypto done (and,
        // before the fix, still holds a permit). Wait (bounded) until all have it, or at least
        // the permits' worth.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut answered = 0;
        for s in &stalled {
            if tokio::time::timeout_at(deadline, s.readable())
                .await
                .is_ok()
            {
                answered += 1;
            }
        }
        eprintln!(
            "{answered} of {} stalled peers got their server flight",
            stalled.len()
        );
        assert!(
            answered >= PERMITS,
            "only {answered} stalled peers were answered"
        );

        let bystander = std::net::Ipv4Addr::new(127, 0, 0, 250);
        let until = Instant::now() + Duration::from_secs(2);
        let took = probe_good_tls_client_from(bystander, addr, &rig.client, until).await;
        eprintln!(
            "bystander beside {} stalled handshakes: {took:?}",
            stalled.len()
        );
        assert_eq!(
            answered,
            stalled.len(),
            "every stalled peer got its server flight"
        );
        drop(stalled);
    })
    .await;
}
