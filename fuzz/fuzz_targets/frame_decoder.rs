//! `frame::InboundDecoder` on arbitrary client bytes, fed in arbitrary chunks, against the
//! whole-stream reference decoder: the same messages, the same close code, the same
//! mid-message state, however the stream is split.
#![no_main]

use jetrelay::frame::InboundDecoder;
use jetrelay_fuzz::reference::{WsOutcome, ws_decode};
use jetrelay_fuzz::split_by;
use libfuzzer_sys::fuzz_target;

/// Feeds `chunks` to a fresh decoder the way a connection does: drain each read until the
/// decoder wants more; stop at the first violation.
fn decode(max: usize, chunks: &[&[u8]]) -> WsOutcome {
    let mut decoder = InboundDecoder::new(max);
    let mut out = WsOutcome::default();
    'reads: for chunk in chunks {
        let mut input: &[u8] = chunk;
        loop {
            match decoder.next_message(&mut input) {
                Ok(Some(message)) => out.messages.push(message),
                Ok(None) => {
                    assert!(input.is_empty(), "Ok(None) must consume the whole read");
                    break;
                }
                Err(violation) => {
                    assert!(
                        violation.reason.len() <= jetrelay::frame::MAX_CLOSE_REASON,
                        "close reason too long for a close frame"
                    );
                    // A failed decoder keeps failing the same way.
                    let mut more: &[u8] = b"\x81\x80\0\0\0\0";
                    assert_eq!(decoder.next_message(&mut more), Err(violation));
                    out.error = Some(violation.code);
                    break 'reads;
                }
            }
        }
    }
    out.mid_message = decoder.is_mid_message();
    out
}

fuzz_target!(|data: &[u8]| {
    // Layout: [max selector][split count n][n split sizes][stream...].
    let [max_sel, n, rest @ ..] = data else {
        return;
    };
    let n = usize::from(*n % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    // Small limits make 1009 reachable; the large one is the relay's real bound.
    let max = match max_sel % 4 {
        0 => 0,
        1 => usize::from(*max_sel),
        2 => 70_000,
        _ => jetrelay::subscription::MAX_OPTIONS_UPDATE_BYTES,
    };
    let expected = ws_decode(stream, max);
    let whole = decode(max, &[stream]);
    assert_eq!(whole, expected, "whole stream disagrees with the reference");
    let split = decode(max, &split_by(stream, sizes));
    assert_eq!(split, expected, "split stream disagrees with the reference");
    if stream.len() <= 512 {
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(decode(max, &bytes), expected, "byte-by-byte disagrees");
    }
});
