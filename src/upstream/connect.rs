//! Connecting to an upstream: the session URL (cursor, dictionary), TCP with a deadline, TLS,
//! the WebSocket handshake, and what an HTTP refusal said.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tungstenite::WebSocket;
use tungstenite::client::IntoClientRequest as _;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::stream::MaybeTlsStream;

use super::{POLL_INTERVAL, UPSTREAM_READ_BUFFER_BYTES, WRITE_TIMEOUT};

/// An upstream WebSocket.
pub(super) type Socket = WebSocket<UpstreamStream>;

/// The upstream's byte stream (TCP, or TLS over TCP), held by the WebSocket and, during the
/// handshake, also by [`connect`]: tungstenite keeps only the body bytes of a refusal that
/// arrive with its head, and the XRPC error name the follower acts on (`CursorTooOld`,
/// `UnknownZstdDictionary`) may come in a later segment. Missing it would retry the same
/// refused request forever.
pub(super) struct UpstreamStream(Arc<Mutex<MaybeTlsStream<TcpStream>>>);

impl UpstreamStream {
    fn inner(&self) -> std::sync::MutexGuard<'_, MaybeTlsStream<TcpStream>> {
        // Why not poisoned: nothing panics while holding it (plain reads and writes).
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Read for UpstreamStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner().read(buf)
    }
}

impl Write for UpstreamStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner().flush()
    }
}

/// Why: a refusal body is read whole only up to this (it is an error envelope).
const MAX_REFUSAL_BODY: usize = 16 * 1024;

/// The rest of a refusal's body: up to its `Content-Length` (at most [`MAX_REFUSAL_BODY`]),
/// or, without one, until the upstream closes; whatever arrives before `deadline`.
fn read_rest_of_body(
    stream: &UpstreamStream,
    body: &mut Vec<u8>,
    content_length: Option<usize>,
    deadline: Instant,
    stop: &AtomicBool,
) {
    let want = content_length
        .unwrap_or(MAX_REFUSAL_BODY)
        .min(MAX_REFUSAL_BODY);
    let mut chunk = [0u8; 4096];
    while body.len() < want && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let room = (want - body.len()).min(chunk.len());
        match stream.inner().read(&mut chunk[..room]) {
            Ok(0) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// The query parameter that asks a v2 upstream for dictionary-compressed frames.
pub const ZSTD_DICTIONARY_PARAM: &str = "zstdDictionary";

/// Returns `base` with its `cursor` query parameter set to `cursor` (replacing any existing
/// one), or `base` unchanged when there is no cursor. Any `#fragment` is dropped (RFC 6455
/// forbids fragments in WebSocket URIs).
pub fn subscribe_url(base: &str, cursor: Option<i64>) -> String {
    match cursor {
        Some(cursor) => set_query_param(base, "cursor", Some(&cursor.to_string())),
        None => base.to_owned(),
    }
}

/// The URL of one session: `base` with the resume `cursor` and, for a v2 upstream, the
/// `zstdDictionary` parameter set (`Some(id)`) or removed (`None`). The follower manages that
/// parameter itself: it can only decompress its own dictionary.
pub(super) fn session_url(base: &str, cursor: Option<i64>, dictionary: Option<u32>) -> String {
    let url = subscribe_url(base, cursor);
    let id = dictionary.map(|id| id.to_string());
    set_query_param(&url, ZSTD_DICTIONARY_PARAM, id.as_deref())
}

/// `url` with every `key` parameter removed and, when `value` is given, `key=value` appended.
fn set_query_param(url: &str, key: &str, value: Option<&str>) -> String {
    let without_fragment = url.split_once('#').map_or(url, |(url, _)| url);
    let (path, query) = without_fragment
        .split_once('?')
        .unwrap_or((without_fragment, ""));
    let mut out = String::with_capacity(url.len() + 32);
    out.push_str(path);
    let mut separator = '?';
    for param in query.split('&') {
        let name = param.split_once('=').map_or(param, |(k, _)| k);
        if param.is_empty() || name == key {
            continue;
        }
        out.push(separator);
        out.push_str(param);
        separator = '&';
    }
    if let Some(value) = value {
        out.push(separator);
        out.push_str(key);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub(super) enum ConnectError {
    /// The upstream answered the upgrade with an HTTP error status.
    Refused {
        /// The status code.
        status: u16,
        /// The XRPC error name of its body (`UnknownZstdDictionary`, `CursorTooOld`, …), if
        /// the body is an XRPC error envelope.
        xrpc_error: Option<String>,
        /// The body's `message`, or the body itself, shortened.
        message: String,
    },
    /// Anything else (DNS, TCP, TLS, timeout, a handshake that is not HTTP).
    Failed(anyhow::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused {
                status,
                xrpc_error,
                message,
            } => {
                write!(f, "upgrade refused with HTTP {status}")?;
                if let Some(error) = xrpc_error {
                    write!(f, " {error}")?;
                }
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            ConnectError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<anyhow::Error> for ConnectError {
    fn from(e: anyhow::Error) -> Self {
        ConnectError::Failed(e)
    }
}

/// Why: a refusal body is logged; an upstream must not fill the log.
const MAX_REFUSAL_MESSAGE: usize = 300;

/// Reads an HTTP refusal's body: an XRPC envelope `{"error":…,"message":…}` or text.
fn refusal(status: u16, body: &[u8]) -> ConnectError {
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: String,
        #[serde(default)]
        message: String,
    }
    let (xrpc_error, message) = match serde_json::from_slice::<Envelope>(body) {
        Ok(e) => (Some(e.error), e.message),
        Err(_) => (None, String::from_utf8_lossy(body).trim().to_owned()),
    };
    let message = match message.char_indices().nth(MAX_REFUSAL_MESSAGE) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message,
    };
    ConnectError::Refused {
        status,
        xrpc_error,
        message,
    }
}

/// What a connection needs besides the URL.
pub(super) struct ConnectOptions<'a> {
    /// Bound on TCP connect + TLS + WebSocket handshake.
    pub timeout: Duration,
    /// Largest WebSocket message read whole.
    pub max_message_bytes: usize,
    /// TLS client configuration, built on the first `wss://` connect and kept.
    pub tls: &'a mut Option<Arc<rustls::ClientConfig>>,
}

/// TCP connect, TLS for `wss://`, WebSocket handshake; all within `options.timeout` and
/// abandoned within [`POLL_INTERVAL`] of `stop`.
pub(super) fn connect(
    url: &str,
    options: ConnectOptions<'_>,
    stop: &AtomicBool,
) -> Result<Socket, ConnectError> {
    let deadline = Instant::now() + options.timeout;
    let mut request = url.into_client_request().context("invalid upstream URL")?;
    // Lets upstream operators tell relays apart from end clients.
    request.headers_mut().insert(
        tungstenite::http::header::USER_AGENT,
        tungstenite::http::HeaderValue::from_static(concat!(
            "jetrelay/",
            env!("CARGO_PKG_VERSION")
        )),
    );
    let uri = request.uri();
    let (tls, default_port) = match uri.scheme_str() {
        Some("ws") => (false, 80),
        Some("wss") => (true, 443),
        _ => {
            return Err(
                anyhow::anyhow!("unsupported URL scheme (expected ws:// or wss://)").into(),
            );
        }
    };
    let host = uri.host().context("URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(default_port);
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .collect();
    let stream = connect_any(&addrs, deadline, stop)?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    // Short reads keep the stop flag and stall timer checked while upstream is silent.
    stream
        .set_read_timeout(Some(POLL_INTERVAL))
        .context("read timeout")?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .context("write timeout")?;

    let inner = if tls {
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .with_context(|| format!("{host} is not a TLS server name"))?;
        let session = rustls::ClientConnection::new(tls_config(options.tls)?, name)
            .context("starting TLS")?;
        MaybeTlsStream::Rustls(rustls::StreamOwned::new(session, stream))
    } else {
        MaybeTlsStream::Plain(stream)
    };
    let shared = Arc::new(Mutex::new(inner));
    let config = WebSocketConfig::default()
        .read_buffer_size(UPSTREAM_READ_BUFFER_BYTES)
        .max_message_size(Some(options.max_message_bytes))
        .max_frame_size(Some(options.max_message_bytes));
    let mut attempt = tungstenite::client::client_with_config(
        request,
        UpstreamStream(shared.clone()),
        Some(config),
    );
    loop {
        match attempt {
            Ok((socket, _response)) => return Ok(socket),
            Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                let content_length = response
                    .headers()
                    .get(tungstenite::http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.trim().parse::<usize>().ok());
                let mut body = response.body().clone().unwrap_or_default();
                read_rest_of_body(
                    &UpstreamStream(shared),
                    &mut body,
                    content_length,
                    deadline,
                    stop,
                );
                return Err(refusal(response.status().as_u16(), &body));
            }
            Err(HandshakeError::Failure(e)) => {
                return Err(anyhow::Error::new(e)
                    .context("WebSocket handshake failed")
                    .into());
            }
            Err(HandshakeError::Interrupted(mid)) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(anyhow::anyhow!("stopping").into());
                }
                if Instant::now() >= deadline {
                    return Err(
                        anyhow::anyhow!("handshake timed out after {:?}", options.timeout).into(),
                    );
                }
                attempt = mid.handshake();
            }
        }
    }
}

fn tls_config(
    cached: &mut Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    if let Some(config) = cached {
        return Ok(config.clone());
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Test hook: one more root (a PEM file), so that the tests can follow a relay behind
    // its TLS sidecar with a test CA.
    if let Some(path) = std::env::var_os("TEST_JETRELAY_UPSTREAM_CA") {
        let pem = std::fs::read(&path)
            .with_context(|| format!("reading TEST_JETRELAY_UPSTREAM_CA {path:?}"))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots
                .add(cert.context("TEST_JETRELAY_UPSTREAM_CA")?)
                .context("TEST_JETRELAY_UPSTREAM_CA")?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS configuration")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let config = Arc::new(config);
    *cached = Some(config.clone());
    Ok(config)
}

/// Connects to the first reachable address before `deadline`.
fn connect_any(
    addrs: &[SocketAddr],
    deadline: Instant,
    stop: &AtomicBool,
) -> anyhow::Result<TcpStream> {
    let mut last_error = None;
    for addr in addrs {
        match connect_tcp(*addr, deadline, stop) {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                last_error = Some(anyhow::Error::new(e).context(format!("connecting to {addr}")))
            }
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("host resolved to no address")))
}

/// A non-blocking connect polled in [`POLL_INTERVAL`] slices, so that neither a black-holed
/// address nor a stop request waits out a long timeout.
fn connect_tcp(addr: SocketAddr, deadline: Instant, stop: &AtomicBool) -> io::Result<TcpStream> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    use rustix::net::{AddressFamily, SocketFlags, SocketType, connect, socket_with, sockopt};

    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    match connect(&fd, &addr) {
        Ok(()) => {}
        Err(rustix::io::Errno::INPROGRESS) => loop {
            if stop.load(Ordering::Relaxed) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "stopping"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
            let slice = Timespec::try_from(left.min(POLL_INTERVAL))
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "poll timeout"))?;
            let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
            match poll(&mut fds, Some(&slice)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => break,
                Err(e) => return Err(e.into()),
            }
        },
        Err(e) => return Err(e.into()),
    }
    if let Err(e) = sockopt::socket_error(&fd)? {
        return Err(e.into());
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_is_added_or_replaced_in_the_query() {
        let cases = [
            ("ws://h/subscribe", Some(5), "ws://h/subscribe?cursor=5"),
            ("ws://h/subscribe", None, "ws://h/subscribe"),
            (
                "ws://h/subscribe?cursor=9",
                None,
                "ws://h/subscribe?cursor=9",
            ),
            (
                "wss://h:8443/subscribe?wantedCollections=app.bsky.feed.post",
                Some(-7),
                "wss://h:8443/subscribe?wantedCollections=app.bsky.feed.post&cursor=-7",
            ),
            (
                "ws://h/subscribe?cursor=1&a=b&cursor=2",
                Some(3),
                "ws://h/subscribe?a=b&cursor=3",
            ),
            ("ws://h/subscribe?", Some(3), "ws://h/subscribe?cursor=3"),
            (
                "ws://h/subscribe?a=1&&b",
                Some(3),
                "ws://h/subscribe?a=1&b&cursor=3",
            ),
            (
                "ws://h/subscribe?cursorx=1",
                Some(3),
                "ws://h/subscribe?cursorx=1&cursor=3",
            ),
            (
                "ws://h/subscribe?cursor",
                Some(3),
                "ws://h/subscribe?cursor=3",
            ),
            ("ws://h/s#frag", Some(3), "ws://h/s?cursor=3"),
        ];
        for (base, cursor, want) in cases {
            assert_eq!(subscribe_url(base, cursor), want, "{base} {cursor:?}");
        }
    }

    #[test]
    fn the_dictionary_parameter_is_the_followers() {
        let v2 = "wss://h/xrpc/network.bsky.jetstream.subscribeEvents";
        assert_eq!(
            session_url(v2, Some(42), Some(20_260_811)),
            format!("{v2}?cursor=42&zstdDictionary=20260811")
        );
        assert_eq!(
            session_url(&format!("{v2}?zstdDictionary=7&kinds=commit"), None, None),
            format!("{v2}?kinds=commit"),
            "an operator's own id is removed: only the v2 dictionary can be decompressed"
        );
        assert_eq!(
            session_url(&format!("{v2}?zstdDictionary=7"), Some(1), Some(3)),
            format!("{v2}?cursor=1&zstdDictionary=3")
        );
    }

    #[test]
    fn refusals_name_the_xrpc_error() {
        let r = refusal(
            400,
            br#"{"error":"UnknownZstdDictionary","message":"unknown zstd dictionary 1; current id is 20260811"}"#,
        );
        assert_eq!(
            r.to_string(),
            "upgrade refused with HTTP 400 UnknownZstdDictionary: unknown zstd dictionary 1; \
             current id is 20260811"
        );
        assert!(matches!(
            r,
            ConnectError::Refused { status: 400, xrpc_error: Some(ref e), .. } if e == "UnknownZstdDictionary"
        ));
        let text = refusal(503, &vec![b'x'; 1000]);
        let ConnectError::Refused {
            xrpc_error,
            message,
            ..
        } = text
        else {
            panic!()
        };
        assert_eq!(xrpc_error, None);
        assert_eq!(message.chars().count(), MAX_REFUSAL_MESSAGE + 1);
        assert_eq!(
            refusal(404, b"").to_string(),
            "upgrade refused with HTTP 404"
        );
    }
}
