//! HTTP/1.1 request heads and the WebSocket upgrade handshake (RFC 6455 §4.2), without I/O.
//!
//! The listener accumulates bytes from a non-blocking socket and calls [`parse_request`]
//! after every read until it returns a complete head; [`validate_upgrade`] then decides
//! between [`accept_response`] (101) and an [`HttpError`] response. The metrics listener
//! uses the same parser for plain `GET` routes ([`parse_plain_request`], which also takes
//! HTTP/1.0: load-balancer health checks speak it) and answers with [`simple_response`].
//!
//! Only HTTP/1.1 is spoken, every non-101 response closes the connection, and request heads
//! are bounded so a client can neither trickle bytes forever nor make us buffer much.

use std::fmt::Write as _;

/// Bounds slowloris buffering and per-connection memory: larger heads are refused with 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Real WebSocket clients send about a dozen headers; more is abuse (refused with 431).
pub const MAX_HEADERS: usize = 32;
/// Error reasons are echoed to clients and logs: one short line, never a dump of input.
pub const MAX_REASON_LEN: usize = 200;
/// A `Sec-WebSocket-Key` is base64 of 16 random bytes: 22 characters and `==` padding.
const WEBSOCKET_KEY_LEN: usize = 24;
/// The only WebSocket version RFC 6455 defines.
const WEBSOCKET_VERSION: &str = "13";

/// Result of parsing a possibly partial request head.
#[derive(Debug)]
pub enum ParseStatus<'a> {
    /// The head is not complete yet: read more and call again with all bytes so far.
    Incomplete,
    /// The head is complete; bytes after `consumed` belong to what follows it.
    Complete {
        /// The parsed head, borrowing from the buffer.
        request: Request<'a>,
        /// Length of the head in bytes, including the final blank line.
        consumed: usize,
    },
}

/// A parsed HTTP/1.1 request head, borrowing from the read buffer.
#[derive(Debug)]
pub struct Request<'a> {
    /// Request method, e.g. `GET` (case-sensitive, as HTTP defines it).
    pub method: &'a str,
    /// Path of the request target, without the query.
    pub path: &'a str,
    /// Raw query string, without the `?` (empty when absent); see [`query_pairs`].
    pub query: &'a str,
    /// Header (name, value) pairs in order; values trimmed of surrounding whitespace.
    headers: Vec<(&'a str, &'a str)>,
}

impl<'a> Request<'a> {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.header_values(name).next()
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_values(&self, name: &str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, value)| value)
    }

    /// Whether any value of header `name`, read as a comma-separated list, contains `token`
    /// (case-insensitive), e.g. `Connection: keep-alive, Upgrade` contains `upgrade`.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.header_values(name)
            .flat_map(|value| value.split(','))
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    }
}

/// Parses an HTTP/1.1 request head from `buf` (which may be partial).
///
/// Errors: malformed (400), head larger than [`MAX_REQUEST_BYTES`] or more than
/// [`MAX_HEADERS`] headers (431), and any version other than HTTP/1.1 — including
/// HTTP/1.0 — is refused with 505 "HTTP/1.1 required": the upgrade needs 1.1, and naming
/// the version tells a client exactly what to fix. Header values must be UTF-8 (400).
/// A request target in absolute form (`http://host/path`) is reduced to its path.
pub fn parse_request(buf: &[u8]) -> Result<ParseStatus<'_>, HttpError> {
    parse_head(buf, false)
}

/// [`parse_request`] for plain routes (no upgrade): HTTP/1.0 requests are accepted too.
/// Why: HAProxy's default `http-check` and other health probers send HTTP/1.0, and a
/// health check answered 505 takes a healthy relay out of rotation. The response is still
/// `HTTP/1.1` with `Content-Length` and `Connection: close`, which an HTTP/1.0 client reads
/// correctly (RFC 9110 §6.2: a server answers with its own version, same major).
pub fn parse_plain_request(buf: &[u8]) -> Result<ParseStatus<'_>, HttpError> {
    parse_head(buf, true)
}

fn parse_head(buf: &[u8], accept_http10: bool) -> Result<ParseStatus<'_>, HttpError> {
    // Never look past the limit: a complete head must fit in it.
    let window = &buf[..buf.len().min(MAX_REQUEST_BYTES)];
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut slots);
    let consumed = match parsed.parse(window) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) if window.len() == MAX_REQUEST_BYTES => {
            return Err(HttpError::new(
                431,
                format!("request head larger than {MAX_REQUEST_BYTES} bytes"),
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(ParseStatus::Incomplete),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(
                431,
                format!("more than {MAX_HEADERS} request headers"),
            ));
        }
        Err(httparse::Error::Version) if request_line_names_http(window) => {
            return Err(version_not_supported());
        }
        Err(e) => return Err(HttpError::new(400, format!("malformed request: {e}"))),
    };
    // httparse only knows 1.0 (0) and 1.1 (1); other versions were rejected above.
    let version_ok = match parsed.version {
        Some(1) => true,
        Some(0) => accept_http10,
        _ => false,
    };
    if !version_ok {
        return Err(version_not_supported());
    }
    // A complete parse always fills these; treat their absence as malformed, not a panic.
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Err(HttpError::new(400, "malformed request line"));
    };
    let Some((path, query)) = split_target(target) else {
        return Err(HttpError::new(400, "request target is not a path"));
    };
    let mut headers = Vec::with_capacity(parsed.headers.len());
    for header in parsed.headers.iter() {
        let Ok(value) = std::str::from_utf8(header.value) else {
            return Err(HttpError::new(
                400,
                format!("header {} is not UTF-8", header.name),
            ));
        };
        headers.push((header.name, value.trim_matches([' ', '\t'])));
    }
    Ok(ParseStatus::Complete {
        request: Request {
            method,
            path,
            query,
            headers,
        },
        consumed,
    })
}

fn version_not_supported() -> HttpError {
    HttpError::new(505, "HTTP/1.1 required")
}

/// Whether the request line ends in an `HTTP/` version, i.e. a version httparse rejects
/// is a real but unsupported one (505) rather than garbage (400).
fn request_line_names_http(buf: &[u8]) -> bool {
    // httparse skips empty lines before the request line; so do we.
    let line = buf
        .split(|&b| b == b'\r' || b == b'\n')
        .find(|line| !line.is_empty())
        .unwrap_or_default();
    line.rsplit(|&b| b == b' ')
        .next()
        .is_some_and(|version| version.starts_with(b"HTTP/"))
}

/// Splits a request target into (path, query). Origin form (`/p?q`) is the norm; absolute
/// form (`http://host/p?q`) must also be accepted by servers (RFC 9112 §3.2.2).
fn split_target(target: &str) -> Option<(&str, &str)> {
    let origin = if target.starts_with('/') {
        target
    } else {
        let (scheme, rest) = target.split_once("://")?;
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return None;
        }
        // Drop the authority; an empty path means "/".
        let path_start = rest.find(['/', '?']).unwrap_or(rest.len());
        &rest[path_start..]
    };
    let (path, query) = origin.split_once('?').unwrap_or((origin, ""));
    Some((if path.is_empty() { "/" } else { path }, query))
}

/// Validates a WebSocket upgrade per RFC 6455 §4.2.1 and returns the `Sec-WebSocket-Key`.
///
/// Method other than GET → 405 with `Allow: GET`. No `Upgrade: websocket` or no `upgrade`
/// token in `Connection` → 400 (not a WebSocket handshake at all; gorilla/websocket, which
/// the official Jetstream server uses, answers the same). `Sec-WebSocket-Version` missing or not
/// 13 → 426 with `Sec-WebSocket-Version: 13`. Key missing, repeated, or not base64 of
/// exactly 16 bytes → 400.
pub fn validate_upgrade<'a>(req: &Request<'a>) -> Result<&'a str, HttpError> {
    if req.method != "GET" {
        return Err(HttpError::new(405, "WebSocket upgrades must use GET")
            .with_header("Allow", "GET".into()));
    }
    if !req.header_has_token("upgrade", "websocket") {
        return Err(HttpError::new(
            400,
            "not a WebSocket upgrade: missing Upgrade: websocket",
        ));
    }
    if !req.header_has_token("connection", "upgrade") {
        return Err(HttpError::new(
            400,
            "not a WebSocket upgrade: Connection header lacks the upgrade token",
        ));
    }
    if req.header("sec-websocket-version") != Some(WEBSOCKET_VERSION) {
        return Err(
            HttpError::new(426, "unsupported WebSocket version; only 13 is supported")
                .with_header("Sec-WebSocket-Version", WEBSOCKET_VERSION.into())
                // RFC 9110 §15.5.22: a 426 names the protocol to upgrade to.
                .with_header("Upgrade", "websocket".into()),
        );
    }
    let mut keys = req.header_values("sec-websocket-key");
    match (keys.next(), keys.next()) {
        (Some(key), None) if is_websocket_key(key) => Ok(key),
        (Some(_), Some(_)) => Err(HttpError::new(400, "repeated Sec-WebSocket-Key")),
        (None, _) => Err(HttpError::new(400, "missing Sec-WebSocket-Key")),
        (Some(_), None) => Err(HttpError::new(
            400,
            "Sec-WebSocket-Key is not base64 of 16 bytes",
        )),
    }
}

/// Whether `key` is standard base64 of exactly 16 bytes. Like Go's `base64.StdEncoding`
/// (the official server's check), the unused low bits of the last character are not
/// required to be zero.
fn is_websocket_key(key: &str) -> bool {
    let Some(data) = key.strip_suffix("==") else {
        return false;
    };
    key.len() == WEBSOCKET_KEY_LEN
        && data
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// The 101 response with `Sec-WebSocket-Accept`, plus optional extra headers.
pub fn accept_response(key: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut head = String::from(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    push_header(&mut head, "Sec-WebSocket-Accept", &accept);
    for (name, value) in extra_headers {
        push_header(&mut head, name, value);
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Appends one header line. CR and LF are replaced so no value can inject a header.
fn push_header(head: &mut String, name: &str, value: &str) {
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    let _ = write!(head, "{}: {}\r\n", clean(name), clean(value));
}

/// A request refused with an HTTP status and a one-line plain-text reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("HTTP {status}: {reason}")]
pub struct HttpError {
    /// Status code of the response.
    pub status: u16,
    /// One line, at most [`MAX_REASON_LEN`] bytes, no control characters; the body.
    pub reason: String,
    /// Headers the status calls for (`Allow`, `Retry-After`, `Sec-WebSocket-Version`, …).
    pub headers: Vec<(&'static str, String)>,
}

impl HttpError {
    /// An error with `reason` sanitized to one line of at most [`MAX_REASON_LEN`] bytes.
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        let mut reason: String = reason
            .into()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if reason.len() > MAX_REASON_LEN {
            let mut end = MAX_REASON_LEN;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        HttpError {
            status,
            reason,
            headers: Vec::new(),
        }
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// `HTTP/1.1 <status> <text>` with a plain-text body of `reason` and `Connection: close`.
    pub fn to_response(&self) -> Vec<u8> {
        let mut body = String::with_capacity(self.reason.len() + 1);
        body.push_str(&self.reason);
        body.push('\n');
        // RFC 9110 §7.8: whoever sends Upgrade must list it in Connection.
        let has_upgrade = self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("upgrade"));
        let connection = if has_upgrade {
            "upgrade, close"
        } else {
            "close"
        };
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        response(
            self.status,
            "text/plain; charset=utf-8",
            connection,
            &headers,
            body.as_bytes(),
        )
    }
}

/// A plain (non-upgrade) response, e.g. for `GET /` or `/metrics`: status, content type,
/// body, `Connection: close`.
pub fn simple_response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    response(status, content_type, "close", &[], body)
}

/// A plain response with extra headers (`ETag`, `Cache-Control`, …) and `Connection: close`;
/// `head_only` answers a `HEAD`: the same headers (Content-Length of `body`), no body.
pub fn response_with_headers(
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> Vec<u8> {
    let mut out = response_head(status, content_type, "close", extra_headers, body.len());
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

fn response(
    status: u16,
    content_type: &str,
    connection: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = response_head(status, content_type, connection, extra_headers, body.len());
    out.extend_from_slice(body);
    out
}

/// Status line and headers of a response whose body is `content_length` bytes.
fn response_head(
    status: u16,
    content_type: &str,
    connection: &str,
    extra_headers: &[(&str, &str)],
    content_length: usize,
) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", status_text(status));
    push_header(&mut head, "Content-Type", content_type);
    push_header(&mut head, "Content-Length", &content_length.to_string());
    push_header(&mut head, "Connection", connection);
    for (name, value) in extra_headers {
        push_header(&mut head, name, value);
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Reason phrase for the statuses this server sends; others get their class name.
fn status_text(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => match status / 100 {
            1 => "Informational",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            _ => "Server Error",
        },
    }
}

/// Percent-decodes `a=1&b=x%2Fy&c=&d` into (key, value) pairs, in order, repeated keys
/// kept. Like Go's `url.ParseQuery`: `+` is a space, empty segments are skipped, a missing
/// `=` gives an empty value. An invalid escape or a non-UTF-8 result is a 400 naming the
/// parameter. (No count limit: the query is bounded by [`MAX_REQUEST_BYTES`].)
pub fn query_pairs(query: &str) -> Result<Vec<(String, String)>, HttpError> {
    query
        .split('&')
        .filter(|segment| !segment.is_empty())
        .map(|segment| {
            let (key, value) = segment.split_once('=').unwrap_or((segment, ""));
            let decode = |s| {
                percent_decode(s).ok_or_else(|| {
                    HttpError::new(
                        400,
                        format!("invalid query: bad encoding in parameter {key:?}"),
                    )
                })
            };
            Ok((decode(key)?, decode(value)?))
        })
        .collect()
}

/// Decodes `%XX` escapes and `+`; `None` for a malformed escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hi = hex_value(bytes.next()?)?;
                let lo = hex_value(bytes.next()?)?;
                hi << 4 | lo
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn upgrade_request(extra: &str) -> String {
        format!(
            "GET /subscribe?wantedCollections=app.bsky.feed.post HTTP/1.1\r\n\
             Host: relay.example\r\n\
             Upgrade: websocket\r\n\
             Connection: Upgrade\r\n\
             Sec-WebSocket-Key: {RFC_KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n\
             {extra}\r\n"
        )
    }

    /// Parses a request that must be complete, returning it and `consumed`.
    fn complete(buf: &[u8]) -> (Request<'_>, usize) {
        match parse_request(buf) {
            Ok(ParseStatus::Complete { request, consumed }) => (request, consumed),
            Ok(ParseStatus::Incomplete) => panic!("incomplete"),
            Err(e) => panic!("error: {e}"),
        }
    }

    fn parse_error(buf: &[u8]) -> HttpError {
        match parse_request(buf) {
            Err(e) => e,
            Ok(ParseStatus::Incomplete) => panic!("incomplete"),
            Ok(ParseStatus::Complete { .. }) => panic!("complete"),
        }
    }

    /// Replaces header line `name: …` in the standard upgrade request with `line`.
    fn upgrade_error(name: &str, line: &str) -> HttpError {
        let request = upgrade_request("");
        let request: String = request
            .split_inclusive("\r\n")
            .map(|l| if l.starts_with(name) { line } else { l })
            .collect();
        let (req, _) = complete(request.as_bytes());
        validate_upgrade(&req).unwrap_err()
    }

    /// A parsed response: status, headers (lowercased names), body.
    fn parse_response(bytes: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut slots);
        let httparse::Status::Complete(len) = response.parse(bytes).unwrap() else {
            panic!("incomplete response");
        };
        assert_eq!(response.version, Some(1));
        let headers = response
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8(h.value.to_vec()).unwrap();
                (h.name.to_ascii_lowercase(), value)
            })
            .collect();
        (response.code.unwrap(), headers, bytes[len..].to_vec())
    }

    fn get<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn valid_upgrade_and_rfc_accept_key() {
        let request = upgrade_request("");
        let (req, consumed) = complete(request.as_bytes());
        assert_eq!(consumed, request.len());
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/subscribe");
        assert_eq!(req.query, "wantedCollections=app.bsky.feed.post");
        assert_eq!(validate_upgrade(&req), Ok(RFC_KEY));

        let response = accept_response(RFC_KEY, &[("X-Relay", "jetrelay")]);
        let (status, headers, body) = parse_response(&response);
        assert_eq!(status, 101);
        assert_eq!(get(&headers, "sec-websocket-accept"), Some(RFC_ACCEPT));
        assert_eq!(get(&headers, "upgrade"), Some("websocket"));
        assert_eq!(get(&headers, "connection"), Some("Upgrade"));
        assert_eq!(get(&headers, "x-relay"), Some("jetrelay"));
        assert!(body.is_empty());
        assert!(response.ends_with(b"\r\n\r\n"));
    }

    #[test]
    fn upgrade_header_matching_is_case_insensitive() {
        let request = "GET /subscribe HTTP/1.1\r\n\
                       upgrade: WebSocket\r\n\
                       CONNECTION: keep-alive, UPGRADE\r\n\
                       sec-websocket-key:   dGhlIHNhbXBsZSBub25jZQ==  \r\n\
                       Sec-Websocket-Version: 13\r\n\r\n";
        let (req, _) = complete(request.as_bytes());
        assert_eq!(req.header("Sec-WebSocket-Key"), Some(RFC_KEY));
        assert_eq!(validate_upgrade(&req), Ok(RFC_KEY));
    }

    #[test]
    fn upgrade_refusals() {
        let missing_upgrade = upgrade_error("Upgrade:", "");
        assert_eq!(missing_upgrade.status, 400);
        assert!(
            missing_upgrade.reason.contains("Upgrade"),
            "{missing_upgrade}"
        );
        let wrong_upgrade = upgrade_error("Upgrade:", "Upgrade: h2c\r\n");
        assert_eq!(wrong_upgrade.status, 400);
        let missing_connection = upgrade_error("Connection:", "");
        assert_eq!(missing_connection.status, 400);
        assert!(missing_connection.reason.contains("Connection"));
        let keep_alive = upgrade_error("Connection:", "Connection: keep-alive\r\n");
        assert_eq!(keep_alive.status, 400);
        // "upgrade" must be a whole token, not a substring.
        let substring = upgrade_error("Connection:", "Connection: upgraded\r\n");
        assert_eq!(substring.status, 400);

        for line in [
            "",
            "Sec-WebSocket-Version: 8\r\n",
            "Sec-WebSocket-Version: 13, 8\r\n",
        ] {
            let err = upgrade_error("Sec-WebSocket-Version:", line);
            assert_eq!(err.status, 426, "{line:?}");
            assert!(
                err.headers
                    .contains(&("Sec-WebSocket-Version", "13".into()))
            );
            let (status, headers, _) = parse_response(&err.to_response());
            assert_eq!(status, 426);
            assert_eq!(get(&headers, "sec-websocket-version"), Some("13"));
            assert_eq!(get(&headers, "upgrade"), Some("websocket"));
            assert_eq!(get(&headers, "connection"), Some("upgrade, close"));
        }

        for line in [
            "",
            "Sec-WebSocket-Key: \r\n",
            "Sec-WebSocket-Key: not base64 at all!!!!!==\r\n",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=\r\n",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZSE=\r\n", // 17 bytes
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j\r\n",     // 15 bytes
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        ] {
            let err = upgrade_error("Sec-WebSocket-Key:", line);
            assert_eq!(err.status, 400, "{line:?}: {err}");
        }

        let post = upgrade_request("").replacen("GET", "POST", 1);
        let (req, _) = complete(post.as_bytes());
        let err = validate_upgrade(&req).unwrap_err();
        assert_eq!(err.status, 405);
        let (status, headers, _) = parse_response(&err.to_response());
        assert_eq!(status, 405);
        assert_eq!(get(&headers, "allow"), Some("GET"));
    }

    #[test]
    fn malformed_requests() {
        let http10 = upgrade_request("").replacen("HTTP/1.1", "HTTP/1.0", 1);
        assert_eq!(parse_error(http10.as_bytes()).status, 505);
        // Plain routes take HTTP/1.0 (HAProxy's default health check), nothing older or newer.
        let check = b"GET /readyz HTTP/1.0\r\n\r\n";
        match parse_plain_request(check) {
            Ok(ParseStatus::Complete { request, consumed }) => {
                assert_eq!((request.method, request.path), ("GET", "/readyz"));
                assert_eq!(consumed, check.len());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_plain_request(b"GET /readyz HTTP/1.0\r\n"),
            Ok(ParseStatus::Incomplete)
        ));
        for version in ["HTTP/0.9", "HTTP/2.0", "HTTP/3"] {
            let request = format!("GET /readyz {version}\r\n\r\n");
            match parse_plain_request(request.as_bytes()) {
                Err(e) => assert_eq!(e.status, 505, "{version}"),
                other => panic!("{version}: {other:?}"),
            }
        }
        let http2 = upgrade_request("").replacen("HTTP/1.1", "HTTP/2.0", 1);
        assert_eq!(parse_error(http2.as_bytes()).status, 505);
        assert_eq!(parse_error(b"\r\nGET / HTTP/3\r\n\r\n").status, 505);
        assert_eq!(parse_error(b"hello world\r\n\r\n").status, 400);
        // A TLS ClientHello sent to the plain-text port.
        assert_eq!(
            parse_error(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").status,
            400
        );
        assert_eq!(
            parse_error(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n").status,
            400
        );
        assert_eq!(
            parse_error(b"GET / HTTP/1.1\r\nX: \xff\xfe\r\n\r\n").status,
            400
        );
        assert_eq!(parse_error(b"GET ftp://host/ HTTP/1.1\r\n\r\n").status, 400);
        assert_eq!(parse_error(b"GET * HTTP/1.1\r\n\r\n").status, 400);
    }

    #[test]
    fn oversized_request_is_refused() {
        let big = upgrade_request(&format!("X-Pad: {}\r\n", "a".repeat(MAX_REQUEST_BYTES)));
        let err = parse_error(big.as_bytes());
        assert_eq!(err.status, 431);
        // Also when it arrives a piece at a time: the limit is on bytes buffered.
        assert!(matches!(
            parse_request(&big.as_bytes()[..MAX_REQUEST_BYTES - 1]),
            Ok(ParseStatus::Incomplete)
        ));
        assert_eq!(
            parse_error(&big.as_bytes()[..MAX_REQUEST_BYTES]).status,
            431
        );

        // A head of exactly the limit is fine, even with more bytes after it.
        let base = upgrade_request("X-Pad: \r\n");
        let exact = upgrade_request(&format!(
            "X-Pad: {}\r\n",
            "b".repeat(MAX_REQUEST_BYTES - base.len())
        ));
        assert_eq!(exact.len(), MAX_REQUEST_BYTES);
        let mut with_tail = exact.clone().into_bytes();
        with_tail.extend_from_slice(b"pipelined");
        let (_, consumed) = complete(&with_tail);
        assert_eq!(consumed, MAX_REQUEST_BYTES);
    }

    #[test]
    fn too_many_headers() {
        let at_limit: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let ok = format!("GET / HTTP/1.1\r\n{at_limit}\r\n");
        let (req, _) = complete(ok.as_bytes());
        assert_eq!(req.header("x-31"), Some("v"));
        let over = format!("GET / HTTP/1.1\r\n{at_limit}X-Extra: v\r\n\r\n");
        let err = parse_error(over.as_bytes());
        assert_eq!(err.status, 431);
        let (status, _, body) = parse_response(&err.to_response());
        assert_eq!(status, 431);
        assert_eq!(body, format!("{}\n", err.reason).into_bytes());
    }

    #[test]
    fn every_prefix_is_incomplete_until_complete() {
        let request = upgrade_request("User-Agent: test\r\n");
        let bytes = request.as_bytes();
        for end in 0..bytes.len() {
            assert!(
                matches!(parse_request(&bytes[..end]), Ok(ParseStatus::Incomplete)),
                "prefix of {end} bytes"
            );
        }
        let (req, consumed) = complete(bytes);
        assert_eq!((req.path, consumed), ("/subscribe", bytes.len()));
        assert_eq!(req.header("user-agent"), Some("test"));
    }

    #[test]
    fn pipelined_bytes_are_not_consumed() {
        let request = upgrade_request("");
        let mut bytes = request.clone().into_bytes();
        bytes.extend_from_slice(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d]);
        let (req, consumed) = complete(&bytes);
        assert_eq!(consumed, request.len());
        assert_eq!(&bytes[consumed..], &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(validate_upgrade(&req), Ok(RFC_KEY));
    }

    #[test]
    fn headers_repeat_and_compare_case_insensitively() {
        let request =
            "GET /metrics HTTP/1.1\r\nSocket-Encoding: gzip\r\nsocket-encoding: zstd\r\n\r\n";
        let (req, _) = complete(request.as_bytes());
        assert_eq!(req.header("SOCKET-ENCODING"), Some("gzip"));
        let values: Vec<_> = req.header_values("Socket-Encoding").collect();
        assert_eq!(values, ["gzip", "zstd"]);
        assert!(req.header_has_token("socket-encoding", "ZSTD"));
        assert_eq!(req.header("missing"), None);
        assert_eq!((req.path, req.query), ("/metrics", ""));
    }

    #[test]
    fn request_targets() {
        assert_eq!(split_target("/a?b=c?d"), Some(("/a", "b=c?d")));
        assert_eq!(split_target("/?"), Some(("/", "")));
        assert_eq!(
            split_target("http://host:6008/subscribe?x=1"),
            Some(("/subscribe", "x=1"))
        );
        assert_eq!(split_target("HTTPS://host?x=1"), Some(("/", "x=1")));
        assert_eq!(split_target("http://host"), Some(("/", "")));
        assert_eq!(split_target("host/path"), None);
    }

    #[test]
    fn query_decoding() {
        let pairs = |q| query_pairs(q).unwrap();
        let owned = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            pairs("a=1&b=x%2Fy&c=&d"),
            owned(&[("a", "1"), ("b", "x/y"), ("c", ""), ("d", "")])
        );
        assert_eq!(pairs(""), owned(&[]));
        assert_eq!(pairs("&&a=1&"), owned(&[("a", "1")]));
        assert_eq!(
            pairs("wantedCollections=a&wantedCollections=b"),
            owned(&[("wantedCollections", "a"), ("wantedCollections", "b")])
        );
        assert_eq!(pairs("q=a+b%20c%2B"), owned(&[("q", "a b c+")]));
        assert_eq!(pairs("k%3D=v%3d=w"), owned(&[("k=", "v==w")]));
        assert_eq!(pairs("e=%C3%A9"), owned(&[("e", "é")]));
        for (bad, name) in [
            ("a=%zz", "a"),
            ("bb=%4", "bb"),
            ("c%=1", "c%"),
            ("d=%ff", "d"),
        ] {
            let err = query_pairs(bad).unwrap_err();
            assert_eq!(err.status, 400, "{bad}");
            assert!(err.reason.starts_with("invalid query: "), "{}", err.reason);
            assert!(err.reason.contains(&format!("{name:?}")), "{}", err.reason);
        }
    }

    #[test]
    fn error_response_format() {
        let err = HttpError::new(429, "slow down\r\nInjected: yes\n")
            .with_header("Retry-After", "1".into());
        assert_eq!(err.reason, "slow down  Injected: yes ");
        let response = err.to_response();
        let (status, headers, body) = parse_response(&response);
        assert_eq!(status, 429);
        assert!(response.starts_with(b"HTTP/1.1 429 Too Many Requests\r\n"));
        assert_eq!(
            get(&headers, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(get(&headers, "connection"), Some("close"));
        assert_eq!(get(&headers, "retry-after"), Some("1"));
        assert_eq!(get(&headers, "injected"), None);
        assert_eq!(
            get(&headers, "content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(body, b"slow down  Injected: yes \n");

        let long = HttpError::new(400, "é".repeat(MAX_REASON_LEN));
        assert_eq!(long.reason.len(), MAX_REASON_LEN);
        assert_eq!(
            HttpError::new(599, "x").to_response()[..21],
            *b"HTTP/1.1 599 Server E"
        );
    }

    #[test]
    fn simple_response_format() {
        let response = simple_response(200, "text/plain; version=0.0.4", b"up 1\n");
        let (status, headers, body) = parse_response(&response);
        assert_eq!(status, 200);
        assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(
            get(&headers, "content-type"),
            Some("text/plain; version=0.0.4")
        );
        assert_eq!(get(&headers, "content-length"), Some("5"));
        assert_eq!(get(&headers, "connection"), Some("close"));
        assert_eq!(body, b"up 1\n");
    }
}
