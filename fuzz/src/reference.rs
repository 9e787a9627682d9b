//! Slow reference implementations, each written from its specification rather than from the
//! relay's code, so that a disagreement points at a bug in one of the two.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use jetrelay::frame::InboundMessage;
use jetrelay::proxy_protocol::ProxyError;

/// What a whole client→server byte stream decodes to (RFC 6455 §5).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WsOutcome {
    /// Complete messages, in order (nothing after a Close).
    pub messages: Vec<InboundMessage>,
    /// The close code the server must fail the connection with, if the stream breaks the
    /// protocol (1002 framing, 1007 bad UTF-8, 1009 too big).
    pub error: Option<u16>,
    /// Whether the stream ends inside a fragmented data message whose first frame header
    /// was accepted (false after a Close or an error).
    pub mid_message: bool,
}

/// Close codes a peer may send (RFC 6455 §7.4.1 and the IANA registry; 3000–4999 private).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Decodes a whole client stream. Every frame must be masked; data messages longer than
/// `max_message_len` fail with 1009 as soon as a header announces it.
pub fn ws_decode(stream: &[u8], max_message_len: usize) -> WsOutcome {
    let mut out = WsOutcome::default();
    // The data message being assembled: (is text, payload so far).
    let mut message: Option<(bool, Vec<u8>)> = None;
    let mut at = 0usize;
    let fail = |mut out: WsOutcome, code: u16| {
        out.error = Some(code);
        out.mid_message = false;
        out
    };
    loop {
        let rest = &stream[at..];
        if rest.len() < 2 {
            out.mid_message = message.is_some();
            return out;
        }
        let (b0, b1) = (rest[0], rest[1]);
        let fin = b0 & 0b1000_0000 != 0;
        if b0 & 0b0111_0000 != 0 {
            return fail(out, 1002);
        }
        let opcode = b0 & 0x0f;
        if ![0u8, 1, 2, 8, 9, 10].contains(&opcode) {
            return fail(out, 1002);
        }
        let control = opcode >= 8;
        let len7 = u64::from(b1 & 0x7f);
        if control && (!fin || len7 > 125) {
            return fail(out, 1002);
        }
        let (payload_len, mut header_len) = match len7 {
            126 => {
                if rest.len() < 4 {
                    out.mid_message = message.is_some();
                    return out;
                }
                let n = u64::from(rest[2]) * 256 + u64::from(rest[3]);
                if n < 126 {
                    return fail(out, 1002);
                }
                (n, 4usize)
            }
            127 => {
                if rest.len() < 10 {
                    out.mid_message = message.is_some();
                    return out;
                }
                let mut n: u64 = 0;
                for &b in &rest[2..10] {
                    n = n * 256 + u64::from(b);
                }
                if !(65_536..1 << 63).contains(&n) {
                    return fail(out, 1002);
                }
                (n, 10)
            }
            n => (n, 2),
        };
        let masked = b1 & 0b1000_0000 != 0;
        let mut key = [0u8; 4];
        if masked {
            if rest.len() < header_len + 4 {
                out.mid_message = message.is_some();
                return out;
            }
            key.copy_from_slice(&rest[header_len..header_len + 4]);
            header_len += 4;
        }
        // The header is complete: judge it against the connection state.
        if !masked {
            return fail(out, 1002);
        }
        if !control {
            match (opcode, &message) {
                (0, None) | (1 | 2, Some(_)) => return fail(out, 1002),
                _ => {}
            }
            let so_far = message.as_ref().map_or(0, |(_, m)| m.len() as u64);
            if so_far.saturating_add(payload_len) > max_message_len as u64 {
                return fail(out, 1009);
            }
            if message.is_none() {
                message = Some((opcode == 1, Vec::new()));
            }
        }
        let body = &rest[header_len..];
        if (body.len() as u64) < payload_len {
            out.mid_message = message.is_some();
            return out;
        }
        let payload: Vec<u8> = body[..payload_len as usize]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        at += header_len + payload_len as usize;
        match opcode {
            9 => out.messages.push(InboundMessage::Ping(payload)),
            10 => out.messages.push(InboundMessage::Pong(payload)),
            8 => {
                let (code, reason) = match payload.len() {
                    0 => (None, String::new()),
                    1 => return fail(out, 1002),
                    _ => {
                        let code = u16::from(payload[0]) * 256 + u16::from(payload[1]);
                        if !close_code_allowed(code) {
                            return fail(out, 1002);
                        }
                        match String::from_utf8(payload[2..].to_vec()) {
                            Ok(reason) => (Some(code), reason),
                            Err(_) => return fail(out, 1007),
                        }
                    }
                };
                out.messages.push(InboundMessage::Close { code, reason });
                out.mid_message = false;
                return out;
            }
            _ => {
                let Some((text, data)) = message.as_mut() else {
                    unreachable!("a data frame always has a message by now");
                };
                data.extend_from_slice(&payload);
                if *text {
                    // A prefix of valid UTF-8 may end inside a character only while more
                    // fragments are to come.
                    match std::str::from_utf8(data) {
                        Ok(_) => {}
                        Err(e) if e.error_len().is_none() && !fin => {}
                        Err(_) => return fail(out, 1007),
                    }
                }
                if fin {
                    let (text, data) = message.take().expect("checked above");
                    out.messages.push(if text {
                        InboundMessage::Text(data)
                    } else {
                        InboundMessage::Binary(data)
                    });
                }
            }
        }
    }
}

/// The PROXY protocol v2 header, read from the specification's text: signature, version 2,
/// command LOCAL or PROXY, one of the listed family/transport pairs, a length covering the
/// family's address block, TLVs that tile the rest exactly; the relay caps the whole header at
/// `max_len` bytes and refuses datagram transports for PROXY. Returns `None` for "need more".
pub fn proxy_v2(
    buf: &[u8],
    max_len: usize,
) -> Option<Result<(Option<SocketAddr>, usize), ProxyError>> {
    const SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    for (i, &b) in buf.iter().take(SIG.len()).enumerate() {
        if b != SIG[i] {
            let v1 = b"PROXY ";
            let n = buf.len().min(v1.len());
            return Some(Err(if buf[..n] == v1[..n] {
                ProxyError::V1NotSupported
            } else {
                ProxyError::BadSignature
            }));
        }
    }
    let ver_cmd = *buf.get(12)?;
    if ver_cmd >> 4 != 2 {
        return Some(Err(ProxyError::BadVersion(ver_cmd >> 4)));
    }
    let command = ver_cmd & 0xf;
    if command > 1 {
        return Some(Err(ProxyError::BadCommand(command)));
    }
    let fam = *buf.get(13)?;
    let block = match fam {
        0x00 => 0,
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        _ => return Some(Err(ProxyError::BadFamily(fam))),
    };
    if command == 1 && fam & 0xf == 2 {
        return Some(Err(ProxyError::DatagramTransport));
    }
    let length = usize::from(*buf.get(14)?) * 256 + usize::from(*buf.get(15)?);
    if 16 + length > max_len {
        return Some(Err(ProxyError::TooLong(16 + length)));
    }
    if length < block {
        return Some(Err(ProxyError::TooShort {
            length,
            needed: block,
        }));
    }
    if buf.len() < 16 + length {
        return None;
    }
    // TLVs: type(1) length(2) value, exactly filling the bytes after the address block.
    let mut t = 16 + block;
    while t < 16 + length {
        if t + 3 > 16 + length {
            return Some(Err(ProxyError::BadTlv));
        }
        t += 3 + usize::from(buf[t + 1]) * 256 + usize::from(buf[t + 2]);
        if t > 16 + length {
            return Some(Err(ProxyError::BadTlv));
        }
    }
    let source = match (command, fam >> 4) {
        (1, 1) => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19])),
            u16::from(buf[24]) * 256 + u16::from(buf[25]),
        )),
        (1, 2) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&buf[16..32]);
            let v6 = Ipv6Addr::from(octets);
            // One client, one address: an IPv4-mapped source is its IPv4 address.
            let ip = match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            };
            Some(SocketAddr::new(
                ip,
                u16::from(buf[48]) * 256 + u16::from(buf[49]),
            ))
        }
        _ => None,
    };
    Some(Ok((source, 16 + length)))
}

/// Go's `url.ParseQuery` value decoding as the relay documents it: `&`-separated, empty
/// segments skipped, the first `=` splits key from value, `+` is a space, `%XX` needs two hex
/// digits; the decoded bytes must be UTF-8. `None` = 400.
pub fn query_pairs(query: &str) -> Option<Vec<(String, String)>> {
    fn unescape(s: &str) -> Option<String> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' => {
                    let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                    if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                        return None;
                    }
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).ok()
    }
    let mut pairs = Vec::new();
    for segment in query.split('&') {
        if segment.is_empty() {
            continue;
        }
        let (k, v) = match segment.find('=') {
            Some(i) => (&segment[..i], &segment[i + 1..]),
            None => (segment, ""),
        };
        pairs.push((unescape(k)?, unescape(v)?));
    }
    Some(pairs)
}

/// An NSID authority segment: 1–63 of letters, digits and hyphens, no hyphen at either end;
/// the first segment of an authority must start with a letter.
fn authority_segment(s: &str, first: bool) -> bool {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() || chars.len() > 63 || s.len() != chars.len() {
        return false;
    }
    let ok_char = |c: &char| c.is_ascii_alphanumeric() || *c == '-';
    let start_ok = if first {
        chars[0].is_ascii_alphabetic()
    } else {
        chars[0].is_ascii_alphanumeric()
    };
    chars.iter().all(ok_char) && start_ok && chars[chars.len() - 1] != '-'
}

/// The domain authority of an NSID: two or more segments, at most 253 bytes.
pub fn nsid_authority(s: &str) -> bool {
    let segments: Vec<&str> = s.split('.').collect();
    s.len() <= 253
        && segments.len() >= 2
        && segments
            .iter()
            .enumerate()
            .all(|(i, seg)| authority_segment(seg, i == 0))
}

/// A full NSID: authority, a dot, then a name of a letter followed by letters and digits
/// (1–63); at most 317 bytes.
pub fn nsid(s: &str) -> bool {
    if s.len() > 317 {
        return false;
    }
    let Some(dot) = s.rfind('.') else {
        return false;
    };
    let (authority, name) = (&s[..dot], &s[dot + 1..]);
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name.bytes().all(|c| c.is_ascii_alphanumeric());
    nsid_authority(authority) && name_ok
}

/// A `wantedCollections` value: an NSID, or an authority followed by `.*`.
pub fn collection_value(s: &str) -> bool {
    match s.strip_suffix(".*") {
        Some(authority) => nsid_authority(authority),
        None => nsid(s),
    }
}

/// Whether a commit to `collection` matches the raw `wantedCollections` value `pattern`.
pub fn collection_matches(pattern: &str, collection: &str) -> bool {
    match pattern.strip_suffix('*') {
        // `app.bsky.*` keeps its dot: `app.bsky.graphx` is not under `app.bsky.graph.*`.
        Some(prefix) => collection.starts_with(prefix),
        None => pattern == collection,
    }
}

/// atproto DID syntax: `did:` + lowercase method + `:` + an id of `[A-Za-z0-9._:%-]`
/// that is not empty and does not end in `:` or `%`; at most 2,048 bytes.
pub fn did(s: &str) -> bool {
    if s.len() > 2048 || !s.starts_with("did:") {
        return false;
    }
    let rest = &s[4..];
    let Some(colon) = rest.find(':') else {
        return false;
    };
    let (method, id) = (&rest[..colon], &rest[colon + 1..]);
    let id_char = |c: char| c.is_ascii_alphanumeric() || "._:%-".contains(c);
    !method.is_empty()
        && method.chars().all(|c| c.is_ascii_lowercase())
        && !id.is_empty()
        && id.chars().all(id_char)
        && !id.ends_with(':')
        && !id.ends_with('%')
}

/// Whether `key` is standard base64 of exactly 16 bytes (24 characters, `==` padding; the
/// unused low bits of the last data character are not checked, as in Go).
pub fn websocket_key(key: &str) -> bool {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    key.len() == 24
        && key.ends_with("==")
        && key.as_bytes()[..22]
            .iter()
            .all(|b| ALPHABET.as_bytes().contains(b))
}

/// Whether `json` (valid JSON) has an object with a repeated key anywhere. `serde_json::Value`
/// silently keeps the last one; the relay refuses repeated indexed fields.
pub fn has_duplicate_keys(json: &[u8]) -> bool {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Check;
    impl<'de> Deserialize<'de> for Check {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Check;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("JSON")
                }
                fn visit_bool<E>(self, _: bool) -> Result<Check, E> {
                    Ok(Check)
                }
                fn visit_i64<E>(self, _: i64) -> Result<Check, E> {
                    Ok(Check)
                }
                fn visit_u64<E>(self, _: u64) -> Result<Check, E> {
                    Ok(Check)
                }
                fn visit_f64<E>(self, _: f64) -> Result<Check, E> {
                    Ok(Check)
                }
                fn visit_str<E>(self, _: &str) -> Result<Check, E> {
                    Ok(Check)
                }
                fn visit_unit<E>(self) -> Result<Check, E> {
                    Ok(Check)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Check, A::Error> {
                    while s.next_element::<Check>()?.is_some() {}
                    Ok(Check)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Check, A::Error> {
                    let mut seen = std::collections::HashSet::new();
                    while let Some(k) = m.next_key::<String>()? {
                        if !seen.insert(k) {
                            return Err(serde::de::Error::custom("duplicate key"));
                        }
                        m.next_value::<Check>()?;
                    }
                    Ok(Check)
                }
            }
            d.deserialize_any(V)
        }
    }
    serde_json::from_slice::<Check>(json).is_err()
}
