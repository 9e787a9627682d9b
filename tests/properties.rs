//! Property tests (proptest) of the pure state machines, each against a model or a round trip:
//! WebSocket framing and `InboundDecoder` under arbitrary splits, PROXY v2 encode/parse, the
//! event index (append / walk / `pos_of` / `cursor_chunk` / retention drops, with non-monotonic
//! `time_us`), the per-IP limiter's counts and token bucket, a shape's frame table, and DID
//! routes. The fuzz targets in fuzz/ cover the parsers on arbitrary bytes; these cover the
//! structures between them, and run in the normal `cargo test`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use jetrelay::frame::{
    InboundDecoder, InboundMessage, Opcode, encode_masked_frame, encode_server_frame, parse_header,
    split_frame,
};
use jetrelay::index::{CHUNK_EVENTS, EventEntry, EventIndex, EventPos};
use jetrelay::limits::{Admission, Limits, LimitsConfig, address_key};
use jetrelay::proxy_protocol::{ProxyParse, encode_v2, parse_v2};
use jetrelay::routes::{Route, Routes};
use proptest::prelude::*;

/// Splits `bytes` at the given cut points (taken modulo the length).
fn split_at_cuts<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

#[derive(Clone, Debug)]
enum Msg {
    Text(String, Vec<usize>),
    Binary(Vec<u8>, Vec<usize>),
    Ping(Vec<u8>),
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (any::<String>(), prop::collection::vec(0usize..64, 0..4))
            .prop_map(|(s, f)| Msg::Text(s, f)),
        (
            prop::collection::vec(any::<u8>(), 0..70_000),
            prop::collection::vec(0usize..70_000, 0..3)
        )
            .prop_map(|(b, f)| Msg::Binary(b, f)),
        prop::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Ping),
    ]
}

/// Fragments `payload` at `cuts` (sorted, deduplicated positions) into frames.
fn fragments(opcode: Opcode, payload: &[u8], cuts: &[usize], mask: [u8; 4], out: &mut Vec<u8>) {
    let pieces = split_at_cuts(payload, cuts);
    for (i, piece) in pieces.iter().enumerate() {
        let op = if i == 0 { opcode } else { Opcode::Continuation };
        encode_masked_frame(i + 1 == pieces.len(), op, piece, mask, out);
    }
}

/// A shape's frame table against a model, through the real path: frames appended with
/// `append_to_shape`, retention's `Shapes::drop_before`, then every lookup.
fn check_shape_table(seqs: &[u64], lens: &[usize], drop_below: u64, queries: &[u64]) {
    use jetrelay::shapes::{Shapes, append_to_shape};
    use jetrelay::subscription::SubscriberOptions;
    let dir = common::temp_dir("prop-shapes");
    let shapes = Shapes::new(
        dir.to_path_buf(),
        jetrelay::shapes::ShapeLimits {
            creations_per_minute: 1e9,
            max_per_ip: jetrelay::shapes::MAX_SHAPES,
            allow: Vec::new(),
            max_disk: u64::MAX,
        },
    )
    .unwrap();
    let key = SubscriberOptions::default().shape_key(
        jetrelay::encoding::Encoding::V1Json,
        jetrelay::wire::KindSet::V1,
    );
    let shape = shapes
        .get_or_create(&key, std::net::IpAddr::from([127, 0, 0, 1]), || 0)
        .unwrap();
    let mut model = Vec::new();
    let mut off = 0u64;
    for (seq, len) in seqs.iter().zip(lens) {
        append_to_shape(&shape, *seq, &vec![0x81; *len]).unwrap();
        model.push((*seq, off));
        off += *len as u64;
    }
    let end = off;
    shapes.drop_before(drop_below).unwrap();
    let popped = model.iter().filter(|(s, _)| *s < drop_below).count() as u64;
    model.retain(|(s, _)| *s >= drop_below);
    let next_seq = seqs.last().map_or(0, |s| s + 1);
    let table = shape.table.read();
    for &q in queries {
        let seq = q % (next_seq + 2);
        let offset = q % (end + 2);
        let first_at = model.iter().find(|(s, _)| *s >= seq);
        assert_eq!(
            table.offset_from_seq(seq, end),
            first_at.map_or(end, |f| f.1)
        );
        let at_or_after = model.iter().find(|(_, o)| *o >= offset);
        assert_eq!(
            table.seq_at_offset(offset, next_seq),
            at_or_after.map_or(next_seq, |f| f.0)
        );
        let before = model.iter().filter(|(_, o)| *o < offset).count() as u64;
        assert_eq!(table.ordinal_at_offset(offset), popped + before);
        let last_before = model.iter().rev().find(|(_, o)| *o < offset).map(|f| f.0);
        assert_eq!(table.last_seq_before(offset), last_before);
    }
    drop(table);
    drop(shape);
    drop(shapes);
    std::fs::remove_dir_all(&dir).ok();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Client messages, fragmented and with pings between messages, come out of the decoder
    /// as they went in, however the stream is split.
    #[test]
    fn inbound_decoder_round_trips_under_any_split(
        messages in prop::collection::vec(msg(), 0..6),
        mask in any::<[u8; 4]>(),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for m in &messages {
            match m {
                Msg::Text(s, f) => {
                    fragments(Opcode::Text, s.as_bytes(), f, mask, &mut stream);
                    expected.push(InboundMessage::Text(s.clone().into_bytes()));
                }
                Msg::Binary(b, f) => {
                    fragments(Opcode::Binary, b, f, mask, &mut stream);
                    expected.push(InboundMessage::Binary(b.clone()));
                }
                Msg::Ping(p) => {
                    encode_masked_frame(true, Opcode::Ping, p, mask, &mut stream);
                    expected.push(InboundMessage::Ping(p.clone()));
                }
            }
        }
        let mut decoder = InboundDecoder::new(1 << 20);
        let mut got = Vec::new();
        for chunk in split_at_cuts(&stream, &cuts) {
            let mut input = chunk;
            while let Some(m) = decoder.next_message(&mut input).unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, expected);
        prop_assert!(!decoder.is_mid_message());
    }

    /// Server frames of every length class parse back to their header and payload, and no
    /// strict prefix is a complete frame.
    #[test]
    fn server_frames_round_trip(
        len in prop_oneof![
            // The length-class boundaries themselves, then ranges around them.
            prop::sample::select(vec![0usize, 125, 126, 127, 65_535, 65_536]),
            0usize..300,
            65_400usize..65_700,
        ],
        byte in any::<u8>(),
    ) {
        let payload = vec![byte; len];
        let mut frame = Vec::new();
        encode_server_frame(Opcode::Binary, &payload, &mut frame);
        let (header, body) = split_frame(&frame).unwrap().unwrap();
        prop_assert_eq!(body, &payload[..]);
        prop_assert_eq!(header.frame_len(), frame.len() as u64);
        prop_assert!(header.fin && header.mask.is_none());
        for cut in [0, header.header_len - 1, frame.len() - 1] {
            prop_assert!(split_frame(&frame[..cut]).unwrap().is_none());
        }
        prop_assert_eq!(parse_header(&frame[..header.header_len]).unwrap(), Some(header));
    }

    /// `encode_v2` → `parse_v2` gives back the source (IPv4-mapped as IPv4) and the length,
    /// every strict prefix is incomplete, and what follows is left alone.
    #[test]
    fn proxy_v2_round_trips(
        src_v4 in any::<bool>(), src in any::<u128>(), dst_v4 in any::<bool>(), dst in any::<u128>(),
        sport in any::<u16>(), dport in any::<u16>(), tail in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let ip = |v4: bool, bits: u128| if v4 {
            IpAddr::V4(Ipv4Addr::from(bits as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(bits))
        };
        let source = SocketAddr::new(ip(src_v4, src), sport);
        let destination = SocketAddr::new(ip(dst_v4, dst), dport);
        let mut buf = Vec::new();
        encode_v2(source, destination, &mut buf);
        let len = buf.len();
        buf.extend_from_slice(&tail);
        let canonical = SocketAddr::new(source.ip().to_canonical(), sport);
        prop_assert_eq!(
            parse_v2(&buf),
            Ok(ProxyParse::Complete { source: Some(canonical), consumed: len })
        );
        for n in 0..len {
            prop_assert_eq!(parse_v2(&buf[..n]), Ok(ProxyParse::Incomplete));
        }
    }

    /// The event index against a model: appends with non-monotonic times and retention drops
    /// of whole chunks; every position, walk, cursor chunk and offset lookup agrees.
    #[test]
    fn event_index_matches_a_model(
        events in prop::collection::vec((1u32..5000, 1u32..3000, -50_000i64..50_000), 0..900),
        drops in 0usize..4,
        cursors in prop::collection::vec(any::<i64>(), 0..12),
    ) {
        let mut index = EventIndex::in_memory();
        // model[seq] = (offsets in the four logs, entry, time_us)
        let mut model = Vec::new();
        let mut p = [0u64; 4];
        for (seq, (pl, zl, jitter)) in events.iter().enumerate() {
            let entry = EventEntry {
                lens: [*pl, *zl, *pl + 40, *zl + 1],
                did_hash: seq as u32,
                ..EventEntry::default()
            };
            let time = seq as i64 * 1_000 + jitter;
            prop_assert_eq!(index.append(entry, time, 0).unwrap(), seq as u64);
            model.push((p, entry, time));
            p = jetrelay::index::advance(p, &entry);
        }
        let mut first = 0usize;
        for _ in 0..drops {
            if let Some(start) = index.drop_oldest_chunk().unwrap() {
                first = (first + CHUNK_EVENTS as usize).min(model.len());
                prop_assert_eq!(start.seq, first as u64);
            }
        }
        let next = model.len();
        prop_assert_eq!(index.next_seq(), next as u64);
        prop_assert_eq!(index.first_seq(), first as u64);
        prop_assert_eq!(index.end_pos(), EventPos { seq: next as u64, offs: p });
        let pos = |seq: usize| model.get(seq).map_or(
            EventPos { seq: next as u64, offs: p },
            |m| EventPos { seq: seq as u64, offs: m.0 },
        );
        prop_assert_eq!(index.start_pos(), pos(first));
        for seq in (0..next + 2).step_by(7) {
            prop_assert_eq!(index.pos_of(seq as u64), pos(seq.clamp(first, next)));
            if seq >= first && seq <= next {
                let at = pos(seq);
                for enc in jetrelay::encoding::Encoding::ALL {
                    prop_assert_eq!(index.seq_at_offset(at.offset(enc), enc), Some(seq as u64));
                }
            }
        }
        let mut walked = Vec::new();
        index.walk(pos(first), usize::MAX, |at, e| {
            walked.push((at, *e));
            true
        });
        let expected: Vec<_> = (first..next).map(|s| (pos(s), model[s].1)).collect();
        prop_assert_eq!(walked, expected);
        // Cursors: the chunk returned holds the first retained event at or after the cursor,
        // or that event lies before it only if a dropped event reached the cursor first.
        let running_max_before_first = model[..first].iter().map(|m| m.2).max();
        let mut probes = cursors;
        probes.extend(model.iter().step_by(13).map(|m| m.2));
        for c in probes {
            let exact = (first..next).find(|&s| model[s].2 >= c);
            match index.cursor_chunk(c) {
                None => prop_assert!(exact.is_none(), "cursor {} lost seq {:?}", c, exact),
                Some((start, entries)) => {
                    let s = start.seq as usize;
                    prop_assert_eq!(start, pos(s));
                    prop_assert_eq!(s % CHUNK_EVENTS as usize, 0);
                    prop_assert_eq!(entries.len(), (next - s).min(CHUNK_EVENTS as usize));
                    // A dropped event may have taken the running maximum past the cursor:
                    // then the chunk found may precede the event, or no retained event
                    // reaches the cursor at all (a replay starts early, never late).
                    let dropped_reached = running_max_before_first.is_some_and(|m| m >= c);
                    match exact {
                        Some(exact) => prop_assert!(
                            s <= exact && (exact < s + CHUNK_EVENTS as usize || dropped_reached),
                            "cursor {}: chunk at {}, first event at {}", c, s, exact
                        ),
                        None => prop_assert!(dropped_reached, "cursor {}: chunk at {} but no event reaches it", c, s),
                    }
                }
            }
        }
    }

    /// The limiter against a model of counts: the total cap, the per-address (per-/64) cap,
    /// exempt networks, and the token bucket with no refill (tiny rate) or instant refill.
    #[test]
    fn limits_match_a_model(
        ops in prop::collection::vec((any::<bool>(), 0usize..6), 0..200),
        max_clients in 1usize..12, per_ip in 1usize..5, instant_refill in any::<bool>(),
    ) {
        let ips: [IpAddr; 6] = [
            "192.0.2.1".parse().unwrap(),
            "::ffff:192.0.2.1".parse().unwrap(), // the same client as above
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(), // same /64
            "2001:db8:0:1::1".parse().unwrap(),
            "10.9.9.9".parse().unwrap(), // exempt
        ];
        let rate = if instant_refill { 1e12 } else { 1e-9 };
        let limits = Limits::new(LimitsConfig {
            max_clients,
            max_conns_per_ip: per_ip,
            conn_rate_per_ip: rate,
            allow: vec![("10.0.0.0".parse().unwrap(), 8)],
        });
        let burst = (rate * 2.0).max(1.0);
        let mut total = 0usize;
        let mut conns: HashMap<IpAddr, usize> = HashMap::new();
        let mut tokens: HashMap<IpAddr, f64> = HashMap::new();
        // Connections admitted per listed address, so that only those are released.
        let mut held = [0usize; 6];
        for (admit, i) in ops {
            let ip = ips[i];
            let key = address_key(ip);
            let exempt = i == 5;
            if admit {
                let expected = if total >= max_clients {
                    Some(503)
                } else if exempt {
                    None
                } else if conns.get(&key).copied().unwrap_or(0) >= per_ip
                    || (!instant_refill && *tokens.get(&key).unwrap_or(&burst) < 1.0)
                {
                    Some(429)
                } else {
                    None
                };
                match (limits.admit(ip), expected) {
                    (Admission::Ok, None) => {
                        total += 1;
                        held[i] += 1;
                        if !exempt {
                            *conns.entry(key).or_default() += 1;
                            *tokens.entry(key).or_insert(burst) -= 1.0;
                        }
                    }
                    (Admission::Refused(e, _), Some(status)) => prop_assert_eq!(e.status, status),
                    (Admission::Ok, Some(s)) => prop_assert!(false, "admitted, expected {}", s),
                    (Admission::Refused(e, _), None) => prop_assert!(false, "refused: {}", e),
                }
            } else if held[i] > 0 {
                held[i] -= 1;
                limits.release(ip);
                total -= 1;
                if !exempt {
                    *conns.get_mut(&key).unwrap() -= 1;
                }
            }
            prop_assert_eq!(limits.total(), total);
        }
    }

    /// DID routes against a model: every live registration of a hash is among its hits, hits
    /// hold only registrations ever made, `is_empty` means no live one, and compaction keeps
    /// every live entry.
    #[test]
    fn routes_match_a_model(ops in prop::collection::vec((0u8..4, 0u32..8, prop::collection::btree_set(0u32..16, 0..6)), 0..300)) {
        let mut routes = Routes::default();
        // slot → (token, hashes) of its live registration
        let mut live: BTreeMap<u32, (u32, Vec<u32>)> = BTreeMap::new();
        let mut ever: Vec<Route> = Vec::new();
        for (op, slot, hashes) in ops {
            match op {
                0 | 1 => {
                    if let Some((_, old)) = live.remove(&slot) {
                        routes.forget(old.len());
                    }
                    let hashes: Vec<u32> = hashes.into_iter().collect();
                    let token = routes.register(slot, &hashes);
                    prop_assert!(token != 0);
                    ever.push(Route { slot, token });
                    live.insert(slot, (token, hashes));
                }
                2 => {
                    if let Some((_, old)) = live.remove(&slot) {
                        routes.forget(old.len());
                    }
                }
                _ => {
                    let live_now = live.clone();
                    routes.compact(|r| live_now.get(&r.slot).is_some_and(|(t, _)| *t == r.token));
                }
            }
            let live_entries: usize = live.values().map(|(_, h)| h.len()).sum();
            prop_assert_eq!(routes.is_empty(), live_entries == 0);
            prop_assert!(routes.entries() >= live_entries);
            for hash in 0u32..16 {
                let hits = routes.hits(hash);
                for (slot, (token, hashes)) in &live {
                    if hashes.contains(&hash) {
                        let route = Route { slot: *slot, token: *token };
                        prop_assert!(hits.contains(&route), "live registration missing");
                    }
                }
                for h in hits {
                    prop_assert!(ever.contains(h));
                }
            }
        }
    }
}

proptest! {
    // Each case creates a shape log on disk: fewer cases.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// A shape's frame table: offsets by seq, seqs by offset, ordinals and the last frame
    /// before an offset, after retention dropped a prefix.
    #[test]
    fn shape_table_matches_a_model(
        gaps in prop::collection::vec((1u64..5, 2usize..300), 0..60),
        drop_below in 0u64..200,
        queries in prop::collection::vec(any::<u64>(), 0..40),
    ) {
        let mut seq = 0;
        let mut seqs = Vec::new();
        let mut lens = Vec::new();
        for (gap, len) in gaps {
            seq += gap;
            seqs.push(seq);
            lens.push(len);
        }
        check_shape_table(&seqs, &lens, drop_below, &queries);
    }
}
