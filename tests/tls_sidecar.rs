//! End-to-end tests of the `jetrelay-tls` binary: a real sidecar process between TLS clients
//! written here (tokio-rustls, and `openssl s_client` as an independent client) and a
//! stand-in backend that checks the PROXY v2 header and echoes or streams bytes.
//!
//! Every test bounds its own run time; all traffic stays on loopback and Unix sockets.
//! File descriptors: a test with N connections costs 2N in the sidecar and 2N here; the
//! largest here uses 1,000 connections (~4,000 fds in all). Tests needing more than ~2,500
//! fds are prefixed `scale_`.

use std::io::{BufRead, BufReader as StdBufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jetrelay::proxy_protocol::{ProxyParse, parse_v2};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
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

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("jetrelay-tls-it-{}-{name}", std::process::id()));
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
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A leaf as written to disk, plus its DER to recognise it on the wire.
struct Leaf {
    chain_pem: String,
    key_pem: String,
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
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .unwrap();
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
}

struct Backend {
    /// `--backend` argument.
    arg: String,
    /// One entry per accepted connection: the PROXY source address.
    sources: mpsc::UnboundedReceiver<Option<SocketAddr>>,
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
            let data = pattern(n);
            let _ = s.write_all(&data).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        }
        Mode::SayAndClose(bytes) => {
            let _ = s.write_all(bytes).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// The sidecar process.

struct Sidecar {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

fn sidecar_binary() -> PathBuf {
    // Lets the throughput numbers be taken with a release build.
    std::env::var_os("JETRELAY_TLS_BIN")
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
        let mut cmd = Command::new(sidecar_binary());
        cmd.args(["--listen", "127.0.0.1:0", "--backend", backend]);
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
                if std::env::var_os("JETRELAY_TLS_TEST_LOGS").is_some() {
                    eprintln!("[sidecar] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut sidecar = Sidecar {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            logs,
        };
        let line = sidecar
            .wait_log(|l| l.contains("listening addr="), Duration::from_secs(20))
            .unwrap_or_else(|| panic!("sidecar did not start: {:?}", sidecar.log_text()));
        let addr = line.split("listening addr=").nth(1).unwrap().trim();
        sidecar.addr = addr.parse().unwrap();
        sidecar
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

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
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
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
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
    dir: TempDir,
    pki: Pki,
    client: Arc<rustls::ClientConfig>,
    leaf: Leaf,
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

        let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost").await.unwrap();
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
        const LEN: usize = 64 << 20;
        let mut backend = Backend::tcp(Mode::Stream(LEN)).await;
        let sidecar = Sidecar::start(&backend.arg, &rig.certs, &[]);

        let mut tls = tls_connect(sidecar.addr, &rig.client, "127.0.0.1").await.unwrap();
        let client_addr = tls.get_ref().0.local_addr().unwrap();
        let start = Instant::now();
        let expected = pattern(LEN);
        let mut got = Vec::with_capacity(LEN);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("stream broke after {} bytes: {e}", got.len()),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(got.len(), LEN);
        assert!(got == expected, "streamed bytes differ");
        println!(
            "throughput: {} MiB in {secs:.2}s = {:.0} MiB/s (one connection, loopback, sidecar {})",
            LEN >> 20,
            (LEN >> 20) as f64 / secs,
            sidecar_binary().display()
        );
        assert_eq!(backend.next_source().await, Some(client_addr));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_connections_each_get_their_own_bytes() {
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
        assert_eq!(sources, locals, "every client's real address reached the backend");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_memory_is_small() {
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
                let mut tls = tls_connect(sidecar.addr, &rig.client, "localhost").await.unwrap();
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
        assert!(per_conn <= 32.0, "{per_conn:.1} KiB per idle connection exceeds 32 KiB");
        // They all still work.
        for tls in held.iter_mut().step_by(97) {
            echo_round(tls, b"still here").await;
        }
    })
    .await;
}
