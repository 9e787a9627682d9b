//! OTLP push: the SDK's `PeriodicReader` collects on its own thread and exports http/protobuf
//! through [`StdHttpClient`], a small blocking HTTP/1.1 client on `std::net`.
//!
//! Why this client and not the otlp crate's default (reqwest's blocking client): that one brings
//! hyper, tower and a private tokio runtime thread into a relay whose core has no async
//! runtime, for one POST per export interval; gRPC (tonic) would add HTTP/2 on top. The
//! reader already runs each export on its dedicated thread, blocking on the exporter's future
//! with a trivial executor, so a client that blocks there stalls nothing else. It speaks plain
//! `http://` only: the endpoint is meant to be a collector on the same host or network, which
//! does any TLS to the outside.
//!
//! The export interval is the SDK's: `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds), 60 s by
//! default. Other `OTEL_EXPORTER_OTLP_*` variables (headers, compression) apply as usual.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::metrics::PeriodicReader;

/// Why 10 s: the OTLP default export timeout; an export that takes longer is abandoned and the
/// next interval tries again with fresh cumulative values, so nothing is lost.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Why 64 KiB: an OTLP response carries at most a partial-success message; anything larger is
/// not a collector talking.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// A collector's response head has a handful of headers.
const MAX_RESPONSE_HEADERS: usize = 32;

/// Why an export's HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// The URL is not one this client can reach.
    #[error("unsupported OTLP endpoint `{0}` (http://host[:port]/path only)")]
    Endpoint(String),
    /// Connecting, writing or reading failed.
    #[error("OTLP request to {endpoint}: {source}")]
    Io {
        /// Where it was going.
        endpoint: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The answer was not HTTP/1.x.
    #[error("OTLP endpoint {0} sent a malformed response")]
    Malformed(String),
}

/// A blocking HTTP/1.1 client for the SDK's export thread (see the module doc).
#[derive(Debug)]
pub struct StdHttpClient {
    /// Connect, write and read deadline of one request, in total.
    timeout: Duration,
}

impl StdHttpClient {
    /// A client whose requests give up after `timeout`.
    pub fn new(timeout: Duration) -> StdHttpClient {
        StdHttpClient { timeout }
    }
}

#[async_trait::async_trait]
impl HttpClient for StdHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        Ok(post(&request, self.timeout)?)
    }
}

/// Sends one request with `Connection: close` and reads the response.
fn post(req: &Request<Bytes>, timeout: Duration) -> Result<Response<Bytes>, PostError> {
    let uri = req.uri();
    let endpoint = uri.to_string();
    let (Some("http"), Some(authority), Some(host)) =
        (uri.scheme_str(), uri.authority(), uri.host())
    else {
        return Err(PostError::Endpoint(endpoint));
    };
    let io = |source| PostError::Io {
        endpoint: endpoint.clone(),
        source,
    };
    let deadline = Instant::now() + timeout;
    // `host()` keeps the brackets of an IPv6 literal; the resolver wants them off.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let mut last_err = std::io::Error::other("no address");
    let mut stream = None;
    for addr in (host, port).to_socket_addrs().map_err(io)? {
        match TcpStream::connect_timeout(&addr, remaining(deadline)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = e,
        }
    }
    let mut stream = stream.ok_or(last_err).map_err(io)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let body = req.body();
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {}\r\nConnection: close\r\n",
        req.method(),
        body.len()
    );
    for (name, value) in req.headers() {
        let framing = ["host", "content-length", "connection", "transfer-encoding"];
        if framing.contains(&name.as_str()) {
            continue;
        }
        // HeaderValue cannot hold CR or LF, so no header can be injected here.
        if let Ok(v) = value.to_str() {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    head.push_str("\r\n");
    stream
        .set_write_timeout(Some(remaining(deadline)))
        .map_err(io)?;
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    read_response(&mut stream, deadline).map_err(|e| match e {
        ReadError::Io(source) => PostError::Io {
            endpoint: endpoint.clone(),
            source,
        },
        ReadError::Malformed => PostError::Malformed(endpoint.clone()),
    })
}

/// Time left until `deadline`, at least 1 ms (a zero timeout means "block forever" to std).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

enum ReadError {
    Io(std::io::Error),
    Malformed,
}

/// Reads a response: the head, then `Content-Length` bytes, or up to EOF without one. A
/// chunked body is not decoded (the exporter only reads it for partial-success details), so
/// it is returned empty.
fn read_response(stream: &mut TcpStream, deadline: Instant) -> Result<Response<Bytes>, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut parsed: Option<(u16, usize, Option<usize>)> = None;
    loop {
        if let Some((_, head, Some(len))) = parsed
            && buf.len() >= head + len
        {
            break;
        }
        stream
            .set_read_timeout(Some(remaining(deadline)))
            .map_err(ReadError::Io)?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadError::Io(e)),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE_BYTES {
            return Err(ReadError::Malformed);
        }
        if parsed.is_none() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(head)) => {
                    let code = resp.code.ok_or(ReadError::Malformed)?;
                    let header = |name: &str| {
                        resp.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
                    };
                    let len = if header("transfer-encoding").is_some_and(|v| v.contains("chunked"))
                    {
                        Some(0)
                    } else {
                        match header("content-length") {
                            Some(v) => Some(v.parse().map_err(|_| ReadError::Malformed)?),
                            None => None,
                        }
                    };
                    parsed = Some((code, head, len));
                }
                Ok(httparse::Status::Partial) => {}
                Err(_) => return Err(ReadError::Malformed),
            }
        }
    }
    let (code, head, len) = parsed.ok_or(ReadError::Malformed)?;
    let end = len.map_or(buf.len(), |l| (head + l).min(buf.len()));
    Response::builder()
        .status(code)
        .body(Bytes::copy_from_slice(&buf[head..end]))
        .map_err(|_| ReadError::Malformed)
}

/// The periodic OTLP reader for `endpoint` (a full `http://…/v1/metrics` URL).
pub fn periodic_reader(
    endpoint: &str,
) -> Result<PeriodicReader<MetricExporter>, opentelemetry_otlp::ExporterBuildError> {
    let exporter = MetricExporter::builder()
        .with_http()
        .with_http_client(StdHttpClient::new(EXPORT_TIMEOUT))
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    Ok(PeriodicReader::builder(exporter).build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves one connection with `response` and returns what the client sent.
    fn one_shot(response: &'static [u8]) -> (String, std::thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/metrics", l.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Head plus the 5-byte body the test sends.
            while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"hello") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "client closed early");
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(response).unwrap();
            got
        });
        (url, t)
    }

    fn request(url: &str) -> Request<Bytes> {
        Request::post(url)
            .header("content-type", "application/x-protobuf")
            .body(Bytes::from_static(b"hello"))
            .unwrap()
    }

    #[test]
    fn posts_and_reads_a_sized_response_without_waiting_for_close() {
        // The server keeps the connection open after its answer: Content-Length must suffice.
        let (url, t) = one_shot(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc");
        let resp = post(&request(&url), Duration::from_secs(5)).unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.body().as_ref(), b"abc");
        let sent = String::from_utf8(t.join().unwrap()).unwrap();
        assert!(sent.starts_with("POST /v1/metrics HTTP/1.1\r\n"), "{sent}");
        assert!(
            sent.contains("\r\ncontent-type: application/x-protobuf\r\n"),
            "{sent}"
        );
        assert!(sent.contains("\r\nContent-Length: 5\r\n"), "{sent}");
        assert!(sent.ends_with("\r\n\r\nhello"), "{sent}");
    }

    #[test]
    fn reports_status_and_refuses_https() {
        let (url, t) = one_shot(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nbusy!\r\n0\r\n\r\n");
        let resp = post(&request(&url), Duration::from_secs(5)).unwrap();
        assert_eq!(resp.status(), 503);
        assert!(resp.body().is_empty());
        t.join().unwrap();
        let err = post(
            &request("https://127.0.0.1:1/v1/metrics"),
            Duration::from_secs(1),
        );
        assert!(matches!(err, Err(PostError::Endpoint(_))));
    }

    #[test]
    fn connection_refused_is_an_error_not_a_hang() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t0 = Instant::now();
        let err = post(
            &request(&format!("http://127.0.0.1:{port}/")),
            Duration::from_secs(2),
        );
        assert!(matches!(err, Err(PostError::Io { .. })), "{err:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
