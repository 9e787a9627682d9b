//! `GET /xrpc/network.bsky.jetstream.getZstdDictionary[?id=N]`: the v2 dictionary download.
//!
//! As the official handler (`internal/xrpcapi/getzstddictionary.go`): 200 with the raw
//! dictionary, `Content-Type: application/octet-stream`, `ETag: "zstd-dict-<id>"`,
//! `Cache-Control: public, max-age=31536000, immutable` and `X-Zstd-Dictionary-Id: <id>`; an `id`
//! other than the current one (including 0 and negatives) is 404 `DictionaryNotFound`; an `id`
//! that is not an integer is 400 `InvalidRequest`. A matching `If-None-Match` gets 304 (the
//! official handler serves through Go's `http.ServeContent`, which does the same); `HEAD` gets
//! the headers alone.

use super::xrpc::XrpcError;
use crate::compress::Dictionary;
use crate::handshake::{self, Request};

/// The path of the dictionary download.
pub const GET_ZSTD_DICTIONARY_PATH: &str = "/xrpc/network.bsky.jetstream.getZstdDictionary";

/// The path of the v2 stream.
pub const SUBSCRIBE_EVENTS_PATH: &str = "/xrpc/network.bsky.jetstream.subscribeEvents";

/// The `ETag` of the current dictionary (quoted, as sent).
pub fn dictionary_etag() -> String {
    format!("\"zstd-dict-{}\"", Dictionary::V2.id())
}

/// The HTTP response to a `getZstdDictionary` request (`Connection: close`): a head built per
/// request and a body that is the dictionary itself, shared, so that downloads in progress
/// (a slow reader's can take seconds) hold no copy of its 64 KiB.
#[derive(Debug)]
pub struct DictionaryResponse {
    /// Status line and headers (the whole answer for errors, 304 and HEAD).
    pub head: Vec<u8>,
    /// The body: the dictionary, or nothing.
    pub body: &'static [u8],
}

impl DictionaryResponse {
    /// The answer in one buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        [self.head.as_slice(), self.body].concat()
    }

    fn head_only(head: Vec<u8>) -> DictionaryResponse {
        DictionaryResponse { head, body: &[] }
    }
}

/// The response to a `getZstdDictionary` request.
pub fn get_zstd_dictionary_response(req: &Request<'_>) -> DictionaryResponse {
    get_zstd_dictionary(req.method, req.query, req.header("if-none-match"))
}

/// The same, from the request's parts.
pub fn get_zstd_dictionary(
    method: &str,
    query: &str,
    if_none_match: Option<&str>,
) -> DictionaryResponse {
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return DictionaryResponse::head_only(
                XrpcError {
                    status: 405,
                    error: "InvalidRequest",
                    message: "getZstdDictionary is a query: use GET".to_owned(),
                }
                .to_response(),
            );
        }
    };
    let pairs = match handshake::query_pairs(query) {
        Ok(pairs) => pairs,
        Err(e) => {
            return DictionaryResponse::head_only(
                XrpcError::invalid_request(e.reason).to_response(),
            );
        }
    };
    let current = Dictionary::V2.id();
    if let Some((_, raw)) = pairs.iter().find(|(k, _)| k == "id") {
        match raw.parse::<i64>() {
            Err(_) => {
                return DictionaryResponse::head_only(
                    XrpcError::invalid_request("id must be an integer zstd dictionary ID")
                        .to_response(),
                );
            }
            Ok(id) if id != i64::from(current) => {
                return DictionaryResponse::head_only(
                    XrpcError {
                        status: 404,
                        error: "DictionaryNotFound",
                        message: format!(
                            "no dictionary with id {id}; current dictionary id is {current}"
                        ),
                    }
                    .to_response(),
                );
            }
            Ok(_) => {}
        }
    }
    let etag = dictionary_etag();
    let id = current.to_string();
    let headers = [
        ("ETag", etag.as_str()),
        ("Cache-Control", "public, max-age=31536000, immutable"),
        ("X-Zstd-Dictionary-Id", id.as_str()),
    ];
    let not_modified = if_none_match.is_some_and(|v| {
        v.split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag == etag || tag.strip_prefix("W/") == Some(etag.as_str()))
    });
    if not_modified {
        return DictionaryResponse::head_only(handshake::response_with_headers(
            304,
            "application/octet-stream",
            &headers,
            b"",
            false,
        ));
    }
    // The head announces the dictionary's length, for HEAD as for GET.
    let head = handshake::response_with_headers(
        200,
        "application/octet-stream",
        &headers,
        Dictionary::V2.bytes(),
        true,
    );
    DictionaryResponse {
        head,
        body: if head_only {
            &[]
        } else {
            Dictionary::V2.bytes()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (status, lower-cased headers, body).
    fn parse(bytes: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut slots);
        let httparse::Status::Complete(len) = r.parse(bytes).unwrap() else {
            panic!("incomplete");
        };
        let headers = r
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        (r.code.unwrap(), headers, bytes[len..].to_vec())
    }

    fn header<'h>(h: &'h [(String, String)], name: &str) -> Option<&'h str> {
        h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn serves_the_current_dictionary_with_the_official_headers() {
        for query in ["", "id=20260811", "other=1&id=20260811"] {
            let (status, h, body) = parse(&get_zstd_dictionary("GET", query, None).to_bytes());
            assert_eq!(status, 200, "{query}");
            assert_eq!(body, Dictionary::V2.bytes());
            assert_eq!(body.len(), 65_536);
            assert_eq!(header(&h, "content-type"), Some("application/octet-stream"));
            assert_eq!(header(&h, "content-length"), Some("65536"));
            assert_eq!(header(&h, "etag"), Some("\"zstd-dict-20260811\""));
            assert_eq!(
                header(&h, "cache-control"),
                Some("public, max-age=31536000, immutable")
            );
            assert_eq!(header(&h, "x-zstd-dictionary-id"), Some("20260811"));
        }
    }

    #[test]
    fn errors_are_xrpc_envelopes() {
        let (status, h, body) =
            parse(&get_zstd_dictionary("GET", "id=1612007021", None).to_bytes());
        assert_eq!(status, 404);
        assert_eq!(header(&h, "content-type"), Some("application/json"));
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"error":"DictionaryNotFound","message":"no dictionary with id 1612007021; current dictionary id is 20260811"}"#
        );
        for id in ["0", "-3"] {
            assert_eq!(
                parse(&get_zstd_dictionary("GET", &format!("id={id}"), None).to_bytes()).0,
                404
            );
        }
        for id in ["abc", "1.5", ""] {
            let (status, _, body) =
                parse(&get_zstd_dictionary("GET", &format!("id={id}"), None).to_bytes());
            assert_eq!(status, 400, "{id:?}");
            assert_eq!(
                String::from_utf8(body).unwrap(),
                r#"{"error":"InvalidRequest","message":"id must be an integer zstd dictionary ID"}"#
            );
        }
        assert_eq!(
            parse(&get_zstd_dictionary("POST", "", None).to_bytes()).0,
            405
        );
        assert_eq!(
            parse(&get_zstd_dictionary("GET", "id=%zz", None).to_bytes()).0,
            400
        );
    }

    #[test]
    fn conditional_and_head_requests() {
        let etag = dictionary_etag();
        for tag in [
            etag.clone(),
            format!("W/{etag}"),
            "*".into(),
            format!("\"x\", {etag}"),
        ] {
            let (status, h, body) = parse(&get_zstd_dictionary("GET", "", Some(&tag)).to_bytes());
            assert_eq!(status, 304, "{tag}");
            assert!(body.is_empty());
            assert_eq!(header(&h, "etag"), Some(etag.as_str()));
        }
        assert_eq!(
            parse(&get_zstd_dictionary("GET", "", Some("\"other\"")).to_bytes()).0,
            200
        );
        let head = get_zstd_dictionary("HEAD", "", None);
        let (status, h, body) = parse(&head.to_bytes());
        assert_eq!(status, 200);
        assert_eq!(header(&h, "content-length"), Some("65536"));
        assert!(body.is_empty());
    }
}
