//! `handshake::parse_request` + `validate_upgrade` on arbitrary bytes. Oracles: a complete
//! head parses the same from exactly its own bytes and with anything after it; an incomplete
//! one stays incomplete below the size cap; every refusal is a well-formed HTTP response with
//! a one-line reason; an accepted upgrade has a key that the reference base64 check accepts
//! and produces a well-formed 101.
#![no_main]

use jetrelay::handshake::{
    HttpError, MAX_REASON_LEN, MAX_REQUEST_BYTES, ParseStatus, Request, accept_response,
    parse_request, query_pairs, validate_upgrade,
};
use jetrelay_fuzz::reference;
use libfuzzer_sys::fuzz_target;

/// A refusal must be a complete, parseable response whose body is the reason.
fn check_error(e: &HttpError) {
    assert!(
        e.reason.len() <= MAX_REASON_LEN,
        "reason too long: {}",
        e.reason.len()
    );
    assert!(
        !e.reason.chars().any(char::is_control),
        "control character in reason"
    );
    assert!((400..600).contains(&e.status), "status {}", e.status);
    let response = e.to_response();
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    let head = match parsed.parse(&response) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("unparseable error response: {other:?}"),
    };
    assert_eq!(parsed.code, Some(e.status));
    let length = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
        .expect("Content-Length");
    assert_eq!(response.len() - head, length);
    assert_eq!(&response[head..], format!("{}\n", e.reason).as_bytes());
}

/// The fields a caller can see, for comparing two parses.
fn view(r: &Request<'_>) -> (String, String, String, Vec<Option<String>>) {
    let names = [
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "socket-encoding",
    ];
    (
        r.method.to_owned(),
        r.path.to_owned(),
        r.query.to_owned(),
        names
            .iter()
            .map(|n| r.header(n).map(str::to_owned))
            .collect(),
    )
}

fn check_upgrade(r: &Request<'_>) {
    match validate_upgrade(r) {
        Ok(key) => {
            assert_eq!(r.method, "GET");
            assert!(reference::websocket_key(key), "accepted key {key:?}");
            assert_eq!(r.header_values("sec-websocket-key").count(), 1);
            assert_eq!(r.header("sec-websocket-version"), Some("13"));
            let response = accept_response(key, &[("X-Extra", "a\r\nInjected: b")]);
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut parsed = httparse::Response::new(&mut headers);
            assert!(matches!(
                parsed.parse(&response),
                Ok(httparse::Status::Complete(n)) if n == response.len()
            ));
            assert_eq!(parsed.code, Some(101));
            assert!(!parsed.headers.iter().any(|h| h.name == "Injected"));
        }
        Err(e) => {
            check_error(&e);
            // The reference's view of the key, when everything before it passed.
            if r.method == "GET"
                && r.header("sec-websocket-version") == Some("13")
                && r.header_has_token("upgrade", "websocket")
                && r.header_has_token("connection", "upgrade")
            {
                let keys: Vec<&str> = r.header_values("sec-websocket-key").collect();
                assert!(
                    keys.len() != 1 || !reference::websocket_key(keys[0]),
                    "refused a valid upgrade: {e}"
                );
            }
        }
    }
    // The query string is the other half of a handshake: it must decode or refuse cleanly.
    if let Err(e) = query_pairs(r.query) {
        check_error(&e);
    }
}

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(ParseStatus::Incomplete) => {
            assert!(
                data.len() < MAX_REQUEST_BYTES,
                "a full window cannot be incomplete"
            );
        }
        Ok(ParseStatus::Complete { request, consumed }) => {
            assert!(consumed <= data.len() && consumed <= MAX_REQUEST_BYTES);
            let seen = view(&request);
            // Exactly its own bytes parse the same…
            match parse_request(&data[..consumed]) {
                Ok(ParseStatus::Complete {
                    request: again,
                    consumed: c,
                }) => {
                    assert_eq!(c, consumed);
                    assert_eq!(view(&again), seen);
                }
                other => panic!("head alone parses differently: {other:?}"),
            }
            // …and so do they followed by the start of a WebSocket stream.
            let mut longer = data[..consumed].to_vec();
            longer.extend_from_slice(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
            match parse_request(&longer) {
                Ok(ParseStatus::Complete {
                    request: again,
                    consumed: c,
                }) => {
                    assert_eq!(c, consumed);
                    assert_eq!(view(&again), seen);
                }
                other => panic!("head with a body parses differently: {other:?}"),
            }
            // A strict prefix of a complete head is never complete.
            if consumed > 0 {
                assert!(!matches!(
                    parse_request(&data[..consumed - 1]),
                    Ok(ParseStatus::Complete { .. })
                ));
            }
            assert!(request.path.starts_with('/'), "path {:?}", request.path);
            check_upgrade(&request);
        }
        Err(e) => check_error(&e),
    }
});
