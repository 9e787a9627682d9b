//! `proxy_protocol::parse_v2` against the reference written from the spec, on arbitrary bytes
//! and on every prefix of them (a prefix is "incomplete" until it can be decided, and an error
//! never turns into anything else as more bytes arrive); and `encode_v2` → `parse_v2` round
//! trips for fuzzer-chosen addresses.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Arbitrary, Unstructured};
use jetrelay::proxy_protocol::{
    MAX_V2_HEADER_LEN, ProxyParse, encode_v2, encode_v2_local, looks_like_proxy, parse_v2,
};
use jetrelay_fuzz::reference;
use libfuzzer_sys::fuzz_target;

fn as_reference(
    p: Result<ProxyParse, jetrelay::proxy_protocol::ProxyError>,
) -> Option<Result<(Option<SocketAddr>, usize), jetrelay::proxy_protocol::ProxyError>> {
    match p {
        Ok(ProxyParse::Incomplete) => None,
        Ok(ProxyParse::Complete { source, consumed }) => Some(Ok((source, consumed))),
        Err(e) => Some(Err(e)),
    }
}

fn addr(u: &mut Unstructured<'_>) -> arbitrary::Result<SocketAddr> {
    let ip = if bool::arbitrary(u)? {
        IpAddr::V4(Ipv4Addr::from(u32::arbitrary(u)?))
    } else {
        IpAddr::V6(Ipv6Addr::from(u128::arbitrary(u)?))
    };
    Ok(SocketAddr::new(ip, u16::arbitrary(u)?))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Arbitrary bytes, prefixed by the signature half the time so the fuzzer starts deep.
        let mut buf = Vec::new();
        if mode & 2 != 0 {
            buf.extend_from_slice(&jetrelay::proxy_protocol::V2_SIGNATURE);
        }
        buf.extend_from_slice(rest);
        let whole = as_reference(parse_v2(&buf));
        assert_eq!(
            whole,
            reference::proxy_v2(&buf, MAX_V2_HEADER_LEN),
            "{buf:?}"
        );
        let mut decided = None;
        for n in 0..=buf.len().min(MAX_V2_HEADER_LEN + 1) {
            let p = as_reference(parse_v2(&buf[..n]));
            assert_eq!(p, reference::proxy_v2(&buf[..n], MAX_V2_HEADER_LEN));
            match (&decided, &p) {
                (None, _) => decided = p,
                // Once decided, more bytes never change the verdict: a header stays the same
                // header, garbage stays refused (the reason may get more precise).
                (Some(Ok(first)), _) => assert_eq!(p, Some(Ok(*first))),
                (Some(Err(_)), _) => assert!(matches!(p, Some(Err(_)))),
            }
        }
        if let Some(Ok((_, consumed))) = whole {
            assert!(consumed <= MAX_V2_HEADER_LEN && consumed <= buf.len());
            assert!(looks_like_proxy(&buf));
        }
        return;
    }
    // Round trip.
    let mut u = Unstructured::new(rest);
    let (Ok(source), Ok(destination), Ok(tail)) =
        (addr(&mut u), addr(&mut u), <Vec<u8>>::arbitrary(&mut u))
    else {
        return;
    };
    let mut buf = Vec::new();
    encode_v2(source, destination, &mut buf);
    let len = buf.len();
    buf.extend_from_slice(&tail);
    let canonical = SocketAddr::new(source.ip().to_canonical(), source.port());
    assert_eq!(
        parse_v2(&buf),
        Ok(ProxyParse::Complete {
            source: Some(canonical),
            consumed: len
        })
    );
    for n in 0..len {
        assert_eq!(parse_v2(&buf[..n]), Ok(ProxyParse::Incomplete));
    }
    let mut local = Vec::new();
    encode_v2_local(&mut local);
    local.extend_from_slice(&tail);
    assert_eq!(
        parse_v2(&local),
        Ok(ProxyParse::Complete {
            source: None,
            consumed: 16
        })
    );
});
