//! PROXY protocol version 2 (HAProxy's binary header), the way `jetrelay-tls` tells the relay
//! who the real client is.
//!
//! The TLS sidecar terminates TLS and opens one plaintext backend connection per client, so the
//! relay would otherwise see every client as the sidecar itself. The sidecar therefore writes a
//! v2 header as the very first bytes of each backend connection, and the relay's trusted
//! listener parses it before anything else.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! 12 bytes  signature \r\n\r\n\0\r\nQUIT\n
//!  1 byte   version (high nibble, must be 2) | command (low nibble: 0 LOCAL, 1 PROXY)
//!  1 byte   family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
//!           | transport (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM)
//!  2 bytes  length of everything that follows (address block + TLVs)
//!  ...      address block (INET 12, INET6 36, UNIX 216 bytes), then TLVs
//! ```
//!
//! This module is pure: no sockets, no allocation while parsing. [`parse_v2`] works on whatever
//! prefix of the stream has arrived and says [`ProxyParse::Incomplete`] until it can decide,
//! while rejecting a wrong signature as soon as the first wrong byte is seen.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte v2 signature. Chosen by the spec so it can never start a valid HTTP request,
/// SSL/TLS record or v1 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The v1 (text) header starts with this; the relay accepts only v2, so v1 is an error.
const V1_PREFIX: &[u8] = b"PROXY ";

/// Signature + version/command + family/transport + 16-bit length.
pub const V2_FIXED_LEN: usize = 16;

/// Upper bound on a whole v2 header (fixed part + address block + TLVs) that we accept.
/// Why 512: the largest address block (AF_UNIX, 216 bytes) plus the TLVs proxies actually send
/// (ALPN, authority, unique id ≤ 128, SSL info) fits comfortably, while the relay can read the
/// header into one small fixed buffer and a hostile length field (up to 64 KiB) cannot make it
/// wait for or buffer more than this.
pub const MAX_V2_HEADER_LEN: usize = 512;

/// Version 2 in the high nibble of byte 13.
const VERSION_2: u8 = 0x20;
/// LOCAL: a connection the proxy made on its own behalf (health check); no client address.
const CMD_LOCAL: u8 = 0x0;
/// PROXY: a relayed connection; the address block describes the real client.
const CMD_PROXY: u8 = 0x1;

/// Family/transport byte values (high nibble family, low nibble transport).
const FAM_UNSPEC: u8 = 0x0;
const FAM_INET: u8 = 0x1;
const FAM_INET6: u8 = 0x2;
const FAM_UNIX: u8 = 0x3;
const TRANSPORT_UNSPEC: u8 = 0x0;
const TRANSPORT_STREAM: u8 = 0x1;
const TRANSPORT_DGRAM: u8 = 0x2;

/// Address block sizes per family.
const INET_BLOCK_LEN: usize = 4 + 4 + 2 + 2;
const INET6_BLOCK_LEN: usize = 16 + 16 + 2 + 2;
const UNIX_BLOCK_LEN: usize = 108 + 108;

/// A TLV is type (1 byte) + length (2 bytes) + value.
const TLV_HEADER_LEN: usize = 3;

/// Result of [`parse_v2`] on a buffer that holds no error (so far).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyParse {
    /// Every byte seen so far is consistent with a valid header; read more and call again.
    Incomplete,
    /// A whole, valid header sits at the start of the buffer.
    Complete {
        /// The real client's address, or `None` when the sender says to use the connection's own
        /// endpoints (LOCAL command, UNSPEC family, or an AF_UNIX client that has no IP address).
        /// IPv4-mapped IPv6 addresses are returned as plain IPv4 so per-IP accounting sees one
        /// address per client.
        source: Option<SocketAddr>,
        /// Header length in bytes; the application stream starts at `buf[consumed..]`.
        consumed: usize,
    },
}

/// Why a buffer is not a valid PROXY v2 header. The connection must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The peer spoke the text (v1) protocol; we only accept v2.
    #[error("PROXY protocol v1 (text) header; only v2 is accepted")]
    V1NotSupported,
    /// The first bytes are not the v2 signature: not a PROXY header at all.
    #[error("missing PROXY protocol v2 signature")]
    BadSignature,
    /// The version nibble is not 2.
    #[error("unsupported PROXY protocol version {0}")]
    BadVersion(u8),
    /// The command nibble is neither LOCAL nor PROXY.
    #[error("unknown PROXY protocol command {0:#x}")]
    BadCommand(u8),
    /// The family/transport byte is not one of the values the spec allows.
    #[error("invalid PROXY protocol family/transport byte {0:#04x}")]
    BadFamily(u8),
    /// A datagram transport was declared on what is a stream connection.
    #[error("PROXY protocol header declares a datagram transport on a stream connection")]
    DatagramTransport,
    /// The header would exceed [`MAX_V2_HEADER_LEN`].
    #[error("PROXY protocol header of {0} bytes exceeds the {MAX_V2_HEADER_LEN}-byte cap")]
    TooLong(usize),
    /// The length field is smaller than the address block the family needs.
    #[error("PROXY protocol length {length} is shorter than the {needed}-byte address block")]
    TooShort {
        /// The length field as received.
        length: usize,
        /// The address block size the family requires.
        needed: usize,
    },
    /// A TLV's declared length runs past the end of the header.
    #[error("malformed TLV in PROXY protocol header")]
    BadTlv,
}

/// Appends a v2 PROXY-command header for a TCP connection from `source` to `destination`.
/// If the families differ, the IPv4 one is written as an IPv4-mapped IPv6 address, because a
/// header has a single family.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(VERSION_2 | CMD_PROXY);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(FAM_INET << 4 | TRANSPORT_STREAM);
            out.extend_from_slice(&(INET_BLOCK_LEN as u16).to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            out.push(FAM_INET6 << 4 | TRANSPORT_STREAM);
            out.extend_from_slice(&(INET6_BLOCK_LEN as u16).to_be_bytes());
            out.extend_from_slice(&as_v6(src).octets());
            out.extend_from_slice(&as_v6(dst).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
}

/// Appends a v2 LOCAL header (no addresses): for connections the sender makes on its own
/// behalf, such as health checks.
pub fn encode_v2_local(out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(VERSION_2 | CMD_LOCAL);
    out.push(FAM_UNSPEC << 4 | TRANSPORT_UNSPEC);
    out.extend_from_slice(&0u16.to_be_bytes());
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Parses a v2 header at the start of `buf`.
///
/// Returns [`ProxyParse::Incomplete`] while `buf` is a valid but unfinished prefix, and an
/// error as soon as the bytes seen so far cannot start a valid header (so a listener never
/// waits on garbage). TLVs are checked for framing and skipped.
pub fn parse_v2(buf: &[u8]) -> Result<ProxyParse, ProxyError> {
    // Signature, checked on whatever prefix has arrived.
    let sig_seen = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig_seen] != V2_SIGNATURE[..sig_seen] {
        let v1_seen = buf.len().min(V1_PREFIX.len());
        return Err(if buf[..v1_seen] == V1_PREFIX[..v1_seen] {
            ProxyError::V1NotSupported
        } else {
            ProxyError::BadSignature
        });
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(ProxyParse::Incomplete);
    };
    if ver_cmd & 0xf0 != VERSION_2 {
        return Err(ProxyError::BadVersion(ver_cmd >> 4));
    }
    let command = ver_cmd & 0x0f;
    if command != CMD_LOCAL && command != CMD_PROXY {
        return Err(ProxyError::BadCommand(command));
    }
    let Some(&fam_transport) = buf.get(13) else {
        return Ok(ProxyParse::Incomplete);
    };
    let (family, transport) = (fam_transport >> 4, fam_transport & 0x0f);
    // The spec lists exactly these combinations; anything else must be rejected.
    let needed = match (family, transport) {
        (FAM_UNSPEC, TRANSPORT_UNSPEC) => 0,
        (FAM_INET, TRANSPORT_STREAM | TRANSPORT_DGRAM) => INET_BLOCK_LEN,
        (FAM_INET6, TRANSPORT_STREAM | TRANSPORT_DGRAM) => INET6_BLOCK_LEN,
        (FAM_UNIX, TRANSPORT_STREAM | TRANSPORT_DGRAM) => UNIX_BLOCK_LEN,
        _ => return Err(ProxyError::BadFamily(fam_transport)),
    };
    // The spec lets LOCAL carry any family (the receiver ignores it), so the datagram check
    // only applies to PROXY, where we would otherwise use the addresses.
    if command == CMD_PROXY && transport == TRANSPORT_DGRAM {
        return Err(ProxyError::DatagramTransport);
    }
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(ProxyParse::Incomplete);
    };
    let length = usize::from(u16::from_be_bytes([hi, lo]));
    let total = V2_FIXED_LEN + length;
    if total > MAX_V2_HEADER_LEN {
        return Err(ProxyError::TooLong(total));
    }
    if length < needed {
        return Err(ProxyError::TooShort { length, needed });
    }
    let Some(body) = buf.get(V2_FIXED_LEN..total) else {
        return Ok(ProxyParse::Incomplete);
    };
    let (block, tlvs) = body.split_at(needed);
    check_tlvs(tlvs)?;

    let source = if command == CMD_LOCAL {
        None
    } else {
        match family {
            FAM_INET => Some(inet_source(block)),
            FAM_INET6 => Some(inet6_source(block)),
            // AF_UNIX clients have no IP; UNSPEC means "use the real endpoints".
            _ => None,
        }
    };
    Ok(ProxyParse::Complete {
        source,
        consumed: total,
    })
}

/// Source address of an INET block: src(4) dst(4) sport(2) dport(2).
fn inet_source(block: &[u8]) -> SocketAddr {
    let mut ip = [0u8; 4];
    ip.copy_from_slice(&block[0..4]);
    let port = u16::from_be_bytes([block[8], block[9]]);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)
}

/// Source address of an INET6 block: src(16) dst(16) sport(2) dport(2).
fn inet6_source(block: &[u8]) -> SocketAddr {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&block[0..16]);
    let port = u16::from_be_bytes([block[32], block[33]]);
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)).to_canonical(), port)
}

/// Walks the TLV list so a truncated or overlong TLV is rejected rather than silently ignored.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ProxyError> {
    while !tlvs.is_empty() {
        let header = tlvs.get(..TLV_HEADER_LEN).ok_or(ProxyError::BadTlv)?;
        let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
        tlvs = tlvs.get(TLV_HEADER_LEN + len..).ok_or(ProxyError::BadTlv)?;
    }
    Ok(())
}

/// True when `buf` starts with a PROXY header of either version: the text marker `"PROXY "` or
/// the 12-byte v2 signature. The public listener refuses these, since only the trusted
/// listener may be told a client address. Needs 6 (v1) or 12 (v2) bytes to say yes; a shorter
/// buffer yields `false`.
pub fn looks_like_proxy(buf: &[u8]) -> bool {
    buf.starts_with(V1_PREFIX) || buf.starts_with(&V2_SIGNATURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        encode_v2(source, destination, &mut out);
        out
    }

    /// Builds a header by hand: PROXY command, given family byte, block and TLVs.
    fn raw(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(fam);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn ipv4_round_trip_and_exact_bytes() {
        let h = header(v4("192.0.2.7:51234"), v4("198.51.100.1:443"));
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        expected.extend_from_slice(&[192, 0, 2, 7, 198, 51, 100, 1]);
        expected.extend_from_slice(&51234u16.to_be_bytes());
        expected.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h, expected);
        assert_eq!(
            parse_v2(&h),
            Ok(ProxyParse::Complete {
                source: Some(v4("192.0.2.7:51234")),
                consumed: 28
            })
        );
    }

    #[test]
    fn ipv6_round_trip() {
        let src: SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let h = header(src, dst);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(h[13], 0x21);
        assert_eq!(
            parse_v2(&h),
            Ok(ProxyParse::Complete {
                source: Some(src),
                consumed: 52
            })
        );
    }

    #[test]
    fn mixed_families_map_v4_into_v6_and_parse_back_canonical() {
        let src = v4("203.0.113.9:1234");
        let dst: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let h = header(src, dst);
        assert_eq!(h[13], 0x21, "one family per header: INET6");
        // The mapped address is on the wire ...
        assert_eq!(
            &h[16..32],
            &Ipv4Addr::new(203, 0, 113, 9).to_ipv6_mapped().octets()
        );
        // ... and the parser hands back plain IPv4.
        assert_eq!(
            parse_v2(&h),
            Ok(ProxyParse::Complete {
                source: Some(src),
                consumed: 52
            })
        );
    }

    #[test]
    fn local_round_trip() {
        let mut h = Vec::new();
        encode_v2_local(&mut h);
        assert_eq!(h.len(), 16);
        assert_eq!(h[12], 0x20);
        assert_eq!(
            parse_v2(&h),
            Ok(ProxyParse::Complete {
                source: None,
                consumed: 16
            })
        );
    }

    #[test]
    fn local_with_addresses_ignores_them() {
        let mut body = vec![0u8; INET_BLOCK_LEN];
        body[0] = 10;
        let h = raw(0x20, 0x11, &body);
        assert_eq!(
            parse_v2(&h),
            Ok(ProxyParse::Complete {
                source: None,
                consumed: 28
            })
        );
    }

    #[test]
    fn unspec_and_unix_families_have_no_ip_source() {
        let h = raw(0x21, 0x00, &[]);
        assert_eq!(
            parse_v2(&h),
            Ok(ProxyParse::Complete {
                source: None,
                consumed: 16
            })
        );
        let h = raw(0x21, 0x31, &[b'/'; UNIX_BLOCK_LEN]);
        assert_eq!(
            parse_v2(&h),
            Ok(ProxyParse::Complete {
                source: None,
                consumed: 16 + 216
            })
        );
    }

    #[test]
    fn tlvs_are_skipped_and_application_bytes_untouched() {
        let mut body = header(v4("192.0.2.7:1"), v4("192.0.2.8:2"))[16..].to_vec();
        // PP2_TYPE_ALPN "http/1.1", then an empty NOOP TLV.
        body.extend_from_slice(&[0x01, 0x00, 0x08]);
        body.extend_from_slice(b"http/1.1");
        body.extend_from_slice(&[0x04, 0x00, 0x00]);
        let mut h = raw(0x21, 0x11, &body);
        let header_len = h.len();
        h.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse_v2(&h),
            Ok(ProxyParse::Complete {
                source: Some(v4("192.0.2.7:1")),
                consumed: header_len
            })
        );
        assert_eq!(&h[header_len..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn every_split_point_is_incomplete_until_the_end() {
        let mut v6 = Vec::new();
        encode_v2(
            "[2001:db8::1]:1".parse().unwrap(),
            "[2001:db8::2]:2".parse().unwrap(),
            &mut v6,
        );
        let mut local = Vec::new();
        encode_v2_local(&mut local);
        let mut with_tlv = header(v4("192.0.2.7:1"), v4("192.0.2.8:2"))[16..].to_vec();
        with_tlv.extend_from_slice(&[0x05, 0x00, 0x02, 0xaa, 0xbb]);
        let with_tlv = raw(0x21, 0x11, &with_tlv);
        for h in [
            header(v4("192.0.2.7:1"), v4("192.0.2.8:2")),
            v6,
            local,
            with_tlv,
        ] {
            for cut in 0..h.len() {
                assert_eq!(parse_v2(&h[..cut]), Ok(ProxyParse::Incomplete), "cut {cut}");
            }
            match parse_v2(&h) {
                Ok(ProxyParse::Complete { consumed, .. }) => assert_eq!(consumed, h.len()),
                other => panic!("expected complete, got {other:?}"),
            }
        }
    }

    #[test]
    fn v1_text_header_is_rejected_even_when_split() {
        let v1 = b"PROXY TCP4 192.0.2.7 192.0.2.8 1 2\r\n";
        for cut in 1..=v1.len() {
            assert_eq!(
                parse_v2(&v1[..cut]),
                Err(ProxyError::V1NotSupported),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn wrong_signature_is_rejected_at_the_first_wrong_byte() {
        assert_eq!(
            parse_v2(b"GET / HTTP/1.1\r\n"),
            Err(ProxyError::BadSignature)
        );
        // TLS ClientHello record header.
        assert_eq!(parse_v2(&[0x16, 0x03, 0x01]), Err(ProxyError::BadSignature));
        let mut h = V2_SIGNATURE.to_vec();
        h[11] = b'X';
        for cut in 0..11 {
            assert_eq!(parse_v2(&h[..cut]), Ok(ProxyParse::Incomplete));
        }
        assert_eq!(parse_v2(&h), Err(ProxyError::BadSignature));
    }

    #[test]
    fn bad_version_and_command() {
        assert_eq!(
            parse_v2(&raw(0x11, 0x11, &[0; 12])),
            Err(ProxyError::BadVersion(1))
        );
        assert_eq!(
            parse_v2(&raw(0x31, 0x11, &[0; 12])),
            Err(ProxyError::BadVersion(3))
        );
        assert_eq!(
            parse_v2(&raw(0x22, 0x11, &[0; 12])),
            Err(ProxyError::BadCommand(2))
        );
        // Decided from 13 bytes, before the rest arrives.
        assert_eq!(
            parse_v2(&raw(0x2f, 0x11, &[])[..13]),
            Err(ProxyError::BadCommand(0xf))
        );
    }

    #[test]
    fn bad_family_transport_bytes() {
        for fam in [0x01, 0x13, 0x23, 0x41, 0x10, 0xff] {
            assert_eq!(
                parse_v2(&raw(0x21, fam, &[0; 36])[..14]),
                Err(ProxyError::BadFamily(fam)),
                "fam {fam:#x}"
            );
        }
        assert_eq!(
            parse_v2(&raw(0x21, 0x12, &[0; 12])),
            Err(ProxyError::DatagramTransport)
        );
    }

    #[test]
    fn length_shorter_than_address_block() {
        assert_eq!(
            parse_v2(&raw(0x21, 0x11, &[0; 11])),
            Err(ProxyError::TooShort {
                length: 11,
                needed: 12
            })
        );
        assert_eq!(
            parse_v2(&raw(0x21, 0x21, &[0; 12])[..16]),
            Err(ProxyError::TooShort {
                length: 12,
                needed: 36
            })
        );
    }

    #[test]
    fn length_beyond_cap_is_rejected_from_the_fixed_part_alone() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse_v2(&h), Err(ProxyError::TooLong(16 + 65535)));
        // Address block plus one NOOP TLV padding the header to exactly the cap.
        let noop_len = MAX_V2_HEADER_LEN - V2_FIXED_LEN - INET_BLOCK_LEN - TLV_HEADER_LEN;
        let mut body = vec![0u8; INET_BLOCK_LEN];
        body.push(0x04);
        body.extend_from_slice(&(noop_len as u16).to_be_bytes());
        body.resize(body.len() + noop_len, 0);
        let at_cap = raw(0x21, 0x11, &body);
        assert_eq!(
            parse_v2(&at_cap),
            Ok(ProxyParse::Complete {
                source: Some(v4("0.0.0.0:0")),
                consumed: MAX_V2_HEADER_LEN
            })
        );
        body.push(0);
        let over = raw(0x21, 0x11, &body);
        assert_eq!(
            parse_v2(&over),
            Err(ProxyError::TooLong(MAX_V2_HEADER_LEN + 1))
        );
    }

    #[test]
    fn malformed_tlvs() {
        let block = [0u8; INET_BLOCK_LEN];
        // Truncated TLV header.
        let mut body = block.to_vec();
        body.extend_from_slice(&[0x01, 0x00]);
        assert_eq!(parse_v2(&raw(0x21, 0x11, &body)), Err(ProxyError::BadTlv));
        // Value runs past the header's end.
        let mut body = block.to_vec();
        body.extend_from_slice(&[0x01, 0x00, 0x05, b'a', b'b']);
        assert_eq!(parse_v2(&raw(0x21, 0x11, &body)), Err(ProxyError::BadTlv));
    }

    #[test]
    fn looks_like_proxy_detects_both_versions_only() {
        assert!(looks_like_proxy(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"));
        assert!(looks_like_proxy(&header(
            v4("192.0.2.7:1"),
            v4("192.0.2.8:2")
        )));
        assert!(looks_like_proxy(&V2_SIGNATURE));
        assert!(!looks_like_proxy(b"GET /subscribe HTTP/1.1\r\n"));
        assert!(!looks_like_proxy(b"POST / HTTP/1.1\r\n"));
        assert!(!looks_like_proxy(b""));
        assert!(!looks_like_proxy(&V2_SIGNATURE[..11]));
    }
}
