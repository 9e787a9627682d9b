//! Encode → decode round trips of RFC 6455 framing: client messages (fragmented, with control
//! frames between fragments, text split inside characters) encoded with
//! `encode_masked_frame`/`encode_client_close` come out of `InboundDecoder` exactly as they
//! went in, however the bytes are split; server frames round-trip through `parse_header` /
//! `split_frame`, and the decoder refuses them (unmasked).
#![no_main]

use arbitrary::Arbitrary;
use jetrelay::frame::{
    CloseCode, InboundDecoder, InboundMessage, MAX_CLOSE_REASON, MAX_CONTROL_PAYLOAD, Opcode,
    encode_client_close, encode_masked_frame, encode_server_frame, split_frame,
};
use jetrelay_fuzz::split_by;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Message {
    Text {
        text: String,
        /// Fragment lengths in bytes (cycled); byte boundaries may cut characters.
        fragments: Vec<u8>,
        /// A control frame to put after each non-final fragment, if any.
        interleave: Option<Control>,
    },
    Binary {
        data: Vec<u8>,
        fragments: Vec<u8>,
        interleave: Option<Control>,
    },
    Control(Control),
    Close {
        code: u16,
        reason: String,
    },
}

#[derive(Arbitrary, Debug, Clone)]
enum Control {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    messages: Vec<Message>,
    masks: Vec<[u8; 4]>,
    splits: Vec<u8>,
    /// Long payloads (16- and 64-bit lengths) by repeating a message's bytes.
    stretch: u8,
}

/// Appends a control frame and returns the message it decodes to.
fn control(c: &Control, mask: [u8; 4], out: &mut Vec<u8>) -> InboundMessage {
    let (opcode, payload) = match c {
        Control::Ping(p) => (Opcode::Ping, p),
        Control::Pong(p) => (Opcode::Pong, p),
    };
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    encode_masked_frame(true, opcode, payload, mask, out);
    match c {
        Control::Ping(_) => InboundMessage::Ping(payload.to_vec()),
        Control::Pong(_) => InboundMessage::Pong(payload.to_vec()),
    }
}

/// Appends a data message as fragments; returns what the decoder yields, in order.
fn data(
    opcode: Opcode,
    payload: &[u8],
    fragments: &[u8],
    interleave: &Option<Control>,
    mut mask: impl FnMut() -> [u8; 4],
    out: &mut Vec<u8>,
) -> Vec<InboundMessage> {
    let mut yielded = Vec::new();
    let pieces: Vec<&[u8]> = if fragments.is_empty() {
        vec![payload]
    } else {
        let mut pieces = split_by(payload, fragments);
        if pieces.is_empty() {
            pieces.push(&[]);
        }
        pieces
    };
    for (i, piece) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        let op = if i == 0 { opcode } else { Opcode::Continuation };
        encode_masked_frame(last, op, piece, mask(), out);
        if !last && let Some(c) = interleave {
            yielded.push(control(c, mask(), out));
        }
    }
    yielded.push(if opcode == Opcode::Text {
        InboundMessage::Text(payload.to_vec())
    } else {
        InboundMessage::Binary(payload.to_vec())
    });
    yielded
}

fuzz_target!(|input: Input| {
    let mut k = 0usize;
    let masks = if input.masks.is_empty() {
        vec![[0x37, 0xfa, 0x21, 0x3d]]
    } else {
        input.masks.clone()
    };
    let mut next_mask = || {
        k += 1;
        masks[k % masks.len()]
    };
    let stretch = usize::from(input.stretch % 8);
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for m in &input.messages {
        match m {
            Message::Text {
                text,
                fragments,
                interleave,
            } => {
                let long = text.repeat(1 + stretch * stretch * 64);
                expected.extend(data(
                    Opcode::Text,
                    long.as_bytes(),
                    fragments,
                    interleave,
                    &mut next_mask,
                    &mut stream,
                ));
            }
            Message::Binary {
                data: bytes,
                fragments,
                interleave,
            } => {
                let long = bytes.repeat(1 + stretch * stretch * 64);
                expected.extend(data(
                    Opcode::Binary,
                    &long,
                    fragments,
                    interleave,
                    &mut next_mask,
                    &mut stream,
                ));
            }
            Message::Control(c) => expected.push(control(c, next_mask(), &mut stream)),
            Message::Close { code, reason } => {
                // Only codes a peer may send round-trip; the others are violations.
                let code = CloseCode(*code);
                if !code.is_valid_on_wire() {
                    continue;
                }
                encode_client_close(code, reason, next_mask(), &mut stream);
                let mut cut = reason.len().min(MAX_CLOSE_REASON);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                expected.push(InboundMessage::Close {
                    code: Some(code.0),
                    reason: reason[..cut].to_owned(),
                });
                // Nothing after a Close is decoded.
                break;
            }
        }
    }
    let max = usize::MAX;
    for chunks in [vec![&stream[..]], split_by(&stream, &input.splits)] {
        let mut decoder = InboundDecoder::new(max);
        let mut got = Vec::new();
        for chunk in chunks {
            let mut input: &[u8] = chunk;
            while let Some(message) = decoder.next_message(&mut input).expect("valid stream") {
                got.push(message);
            }
        }
        assert_eq!(got, expected);
        assert!(!decoder.is_mid_message());
    }

    // Server frames: header fields and payload survive, and clients' decoders refuse them.
    for m in input.messages.iter().take(4) {
        let (opcode, payload): (Opcode, Vec<u8>) = match m {
            Message::Text { text, .. } => {
                (Opcode::Text, text.repeat(1 + stretch * 512).into_bytes())
            }
            Message::Binary { data, .. } => (Opcode::Binary, data.repeat(1 + stretch * 512)),
            Message::Control(Control::Ping(p)) => {
                (Opcode::Ping, p[..p.len().min(MAX_CONTROL_PAYLOAD)].to_vec())
            }
            Message::Control(Control::Pong(p)) => {
                (Opcode::Pong, p[..p.len().min(MAX_CONTROL_PAYLOAD)].to_vec())
            }
            Message::Close { .. } => continue,
        };
        let mut frame = Vec::new();
        encode_server_frame(opcode, &payload, &mut frame);
        frame.extend_from_slice(b"trailing");
        let (header, body) = split_frame(&frame).expect("valid").expect("complete");
        assert!(header.fin && header.mask.is_none() && header.opcode == opcode);
        assert_eq!(body, &payload[..]);
        assert_eq!(
            header.header_len,
            jetrelay::frame::server_header_len(payload.len() as u64)
        );
        assert_eq!(
            header.header_len,
            jetrelay::hub::stored_header_len(&frame),
            "recovery's header rule disagrees with the encoder"
        );
        let complete = &frame[..frame.len() - b"trailing".len()];
        for cut in [
            0,
            1,
            header.header_len.saturating_sub(1),
            complete.len() - 1,
        ] {
            if cut < complete.len() {
                assert!(
                    split_frame(&complete[..cut])
                        .expect("valid prefix")
                        .is_none()
                );
            }
        }
        let mut decoder = InboundDecoder::new(max);
        let mut input: &[u8] = &frame;
        let err = decoder
            .next_message(&mut input)
            .expect_err("unmasked client frame");
        assert_eq!(err.code, 1002);
    }
});
