//! RFC 6455 framing: frame headers, server and client frame encoders, close codes, and
//! [`InboundDecoder`], the per-connection state machine for client→server messages.
//!
//! Everything here is pure byte manipulation — no sockets, no clocks — so the log writer
//! (which stores events pre-framed on disk), the fan-out workers, recovery and the swarm
//! load client all share one exact, tested implementation of the wire format.
//!
//! A frame is a 2–14 byte header followed by the payload:
//!
//! ```text
//! byte 0: FIN | RSV1 | RSV2 | RSV3 | opcode (4 bits)
//! byte 1: MASK | length (7 bits: 0–125, or 126 → 16-bit length follows, 127 → 64-bit)
//! then:   extended length (0, 2 or 8 bytes, big-endian), masking key (0 or 4 bytes)
//! ```
//!
//! Clients must mask every frame; servers must not mask any (RFC 6455 §5.1).

use std::fmt;

/// Largest possible header: 2 fixed bytes + 8-byte extended length + 4-byte masking key.
pub const MAX_HEADER_LEN: usize = 14;
/// Control frames must fit the 7-bit length field (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// A close payload starts with a 2-byte status code, leaving this much for the reason.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;
/// The 64-bit length's most significant bit must be 0 (RFC 6455 §5.2).
pub const MAX_PAYLOAD_LEN: u64 = i64::MAX as u64;

const FIN_BIT: u8 = 0x80;
/// RSV1–3: only meaningful with a negotiated extension, and we negotiate none.
const RSV_BITS: u8 = 0x70;
const OPCODE_BITS: u8 = 0x0F;
const MASK_BIT: u8 = 0x80;
const LEN7_BITS: u8 = 0x7F;
/// Largest length that fits the 7-bit field directly.
const MAX_LEN7: u64 = 125;
/// 7-bit length value announcing a 16-bit extended length.
const LEN16_MARKER: u8 = 126;
/// 7-bit length value announcing a 64-bit extended length.
const LEN64_MARKER: u8 = 127;
const MASK_KEY_LEN: usize = 4;

/// Frame opcodes defined by RFC 6455 §5.2; the others are reserved and rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    Continuation = 0,
    Text = 1,
    Binary = 2,
    Close = 8,
    Ping = 9,
    Pong = 10,
}

impl Opcode {
    /// The opcode for a 4-bit wire value, or `None` for reserved values.
    pub fn from_u8(v: u8) -> Option<Opcode> {
        match v {
            0 => Some(Opcode::Continuation),
            1 => Some(Opcode::Text),
            2 => Some(Opcode::Binary),
            8 => Some(Opcode::Close),
            9 => Some(Opcode::Ping),
            10 => Some(Opcode::Pong),
            _ => None,
        }
    }

    /// Control frames (close, ping, pong) have opcodes with the high bit set.
    pub fn is_control(self) -> bool {
        self as u8 & 0x8 != 0
    }
}

/// A close status code (RFC 6455 §7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// IANA-registered: the server is overloaded, the client should retry later.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);

    /// Whether a peer may send this code in a close frame.
    ///
    /// 1004 is reserved, 1005/1006/1015 are placeholders that must never appear on the
    /// wire, and the rest of 1000–2999 is unassigned; 1012–1014 are IANA-registered since
    /// RFC 6455 and accepted. 3000–4999 belong to libraries and applications.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        code.0
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A frame header that breaks RFC 6455 (every case fails the connection with 1002).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits RSV1-3 set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("control frame without FIN (control frames cannot be fragmented)")]
    FragmentedControl,
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    #[error("payload length not in its shortest form")]
    NonMinimalLength,
    #[error("64-bit payload length with the most significant bit set")]
    LengthTooLarge,
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Last frame of a message (always set on control frames).
    pub fin: bool,
    /// What the payload is.
    pub opcode: Opcode,
    /// Masking key: present on client→server frames, absent on server→client frames.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes (at most [`MAX_PAYLOAD_LEN`]).
    pub payload_len: u64,
    /// Header length in bytes (2–14): where the payload starts.
    pub header_len: usize,
}

impl FrameHeader {
    /// Length of the whole frame: header + payload.
    pub fn frame_len(&self) -> u64 {
        // `header_len` is at most 14 and `payload_len` at most 2^63-1 when parsed; saturate
        // rather than wrap for hand-built headers.
        (self.header_len as u64).saturating_add(self.payload_len)
    }
}

/// Header length of an unmasked (server→client) frame for this payload length: 2, 4 or 10.
pub fn server_header_len(payload_len: u64) -> usize {
    match payload_len {
        0..=MAX_LEN7 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Writes a FIN, unmasked header for `opcode` and `payload_len` into `out`, returns bytes
/// written. Uses the shortest (7/16/64-bit) length form, as RFC 6455 requires.
pub fn write_server_header(
    opcode: Opcode,
    payload_len: u64,
    out: &mut [u8; MAX_HEADER_LEN],
) -> usize {
    write_header(true, opcode, None, payload_len, out)
}

/// Writes any header; the single place that knows the header layout.
fn write_header(
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    payload_len: u64,
    out: &mut [u8; MAX_HEADER_LEN],
) -> usize {
    debug_assert!(
        payload_len <= MAX_PAYLOAD_LEN,
        "payload length {payload_len}"
    );
    debug_assert!(!opcode.is_control() || (fin && payload_len <= MAX_LEN7));
    out[0] = if fin { FIN_BIT } else { 0 } | opcode as u8;
    let mask_bit = if mask.is_some() { MASK_BIT } else { 0 };
    let mut len = server_header_len(payload_len);
    match len {
        2 => out[1] = mask_bit | payload_len as u8,
        4 => {
            out[1] = mask_bit | LEN16_MARKER;
            out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            out[1] = mask_bit | LEN64_MARKER;
            out[2..10].copy_from_slice(&payload_len.to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out[len..len + MASK_KEY_LEN].copy_from_slice(&key);
        len += MASK_KEY_LEN;
    }
    len
}

/// Appends a complete unmasked server frame.
pub fn encode_server_frame(opcode: Opcode, payload: &[u8], out: &mut Vec<u8>) {
    let mut header = [0; MAX_HEADER_LEN];
    let n = write_server_header(opcode, payload.len() as u64, &mut header);
    out.reserve(n + payload.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
}

/// Appends a complete masked client frame (FIN set).
pub fn encode_client_frame(opcode: Opcode, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    encode_masked_frame(true, opcode, payload, mask, out);
}

/// Appends a masked frame with an explicit FIN bit, for clients sending fragmented messages.
pub fn encode_masked_frame(
    fin: bool,
    opcode: Opcode,
    payload: &[u8],
    mask: [u8; 4],
    out: &mut Vec<u8>,
) {
    let mut header = [0; MAX_HEADER_LEN];
    let n = write_header(fin, opcode, Some(mask), payload.len() as u64, &mut header);
    out.reserve(n + payload.len());
    out.extend_from_slice(&header[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}

/// Appends a server close frame: code + reason truncated on a char boundary so the payload
/// stays ≤ 125 bytes.
pub fn encode_close(code: CloseCode, reason: &str, out: &mut Vec<u8>) {
    let reason = truncate_reason(reason);
    let mut header = [0; MAX_HEADER_LEN];
    let n = write_server_header(Opcode::Close, (2 + reason.len()) as u64, &mut header);
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(&code.0.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

/// Appends a masked client close frame, truncating the reason like [`encode_close`].
pub fn encode_client_close(code: CloseCode, reason: &str, mask: [u8; 4], out: &mut Vec<u8>) {
    let reason = truncate_reason(reason);
    let mut payload = [0; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.0.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    encode_client_frame(Opcode::Close, &payload[..2 + reason.len()], mask, out);
}

/// The longest prefix of `reason` that fits a close frame without splitting a character.
fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Parses a received close payload into its optional code and reason.
///
/// Empty → no code; one byte → 1002 (a code needs two); a code that must not be sent →
/// 1002; a reason that is not UTF-8 → 1007 (RFC 6455 §5.5.1, §7.4).
pub fn parse_close(payload: &[u8]) -> Result<(Option<u16>, &str), ProtocolViolation> {
    let [hi, lo, reason @ ..] = payload else {
        return match payload {
            [] => Ok((None, "")),
            _ => Err(ProtocolViolation::protocol("close payload of 1 byte")),
        };
    };
    let code = u16::from_be_bytes([*hi, *lo]);
    if !CloseCode(code).is_valid_on_wire() {
        return Err(ProtocolViolation::protocol("invalid close code"));
    }
    let reason = std::str::from_utf8(reason).map_err(|_| ProtocolViolation {
        code: CloseCode::INVALID_PAYLOAD.0,
        reason: "close reason is not UTF-8",
    })?;
    Ok((Some(code), reason))
}

/// Parses one frame header at the start of `buf`. `Ok(None)` = need more bytes.
///
/// Errors: reserved bits (RSV1-3) set, unknown opcode, control frame with payload > 125 or
/// without FIN, non-minimal length encoding, 64-bit length with MSB set. Errors are reported
/// as soon as the offending byte is present, so a prefix never hides them.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    if b0 & RSV_BITS != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode =
        Opcode::from_u8(b0 & OPCODE_BITS).ok_or(FrameError::UnknownOpcode(b0 & OPCODE_BITS))?;
    let fin = b0 & FIN_BIT != 0;
    let len7 = b1 & LEN7_BITS;
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
        if u64::from(len7) > MAX_LEN7 {
            return Err(FrameError::ControlTooLong);
        }
    }
    let (payload_len, ext_len) = match len7 {
        LEN16_MARKER => {
            let Some(ext) = rest.first_chunk::<2>() else {
                return Ok(None);
            };
            let len = u64::from(u16::from_be_bytes(*ext));
            if len <= MAX_LEN7 {
                return Err(FrameError::NonMinimalLength);
            }
            (len, 2)
        }
        LEN64_MARKER => {
            let Some(ext) = rest.first_chunk::<8>() else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(*ext);
            if len > MAX_PAYLOAD_LEN {
                return Err(FrameError::LengthTooLarge);
            }
            if len <= 0xFFFF {
                return Err(FrameError::NonMinimalLength);
            }
            (len, 8)
        }
        len => (u64::from(len), 0),
    };
    let mask = if b1 & MASK_BIT != 0 {
        match rest
            .get(ext_len..)
            .and_then(<[u8]>::first_chunk::<MASK_KEY_LEN>)
        {
            Some(key) => Some(*key),
            None => return Ok(None),
        }
    } else {
        None
    };
    let header_len = 2 + ext_len + if mask.is_some() { MASK_KEY_LEN } else { 0 };
    Ok(Some(FrameHeader {
        fin,
        opcode,
        mask,
        payload_len,
        header_len,
    }))
}

/// Splits one complete frame off the start of `buf` without copying: its header and its
/// payload (still masked if `header.mask` is set). `Ok(None)` = the frame is not complete.
pub fn split_frame(buf: &[u8]) -> Result<Option<(FrameHeader, &[u8])>, FrameError> {
    let Some(header) = parse_header(buf)? else {
        return Ok(None);
    };
    let payload = usize::try_from(header.frame_len())
        .ok()
        .and_then(|end| buf.get(header.header_len..end));
    Ok(payload.map(|payload| (header, payload)))
}

/// XOR-unmasks (or masks) in place; `offset` = position of `payload[0]` within the whole
/// payload (for chunked unmasking).
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4], offset: u64) {
    // Rotate the key so that key[0] applies to payload[0], then XOR eight bytes at a time.
    let mut key = mask;
    key.rotate_left((offset % 4) as usize);
    let [k0, k1, k2, k3] = key;
    let wide = u64::from_ne_bytes([k0, k1, k2, k3, k0, k1, k2, k3]);
    let mut words = payload.chunks_exact_mut(8);
    for word in &mut words {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the rotated key still lines up.
    for (byte, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// A client broke the protocol: the server must send a close frame with `code` and
/// `reason`, then drop the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close code {code})")]
pub struct ProtocolViolation {
    /// Close code to send (1002, 1007 or 1009); see [`CloseCode`].
    pub code: u16,
    /// Short reason for the close frame and the log; well under [`MAX_CLOSE_REASON`].
    pub reason: &'static str,
}

impl ProtocolViolation {
    fn protocol(reason: &'static str) -> Self {
        ProtocolViolation {
            code: CloseCode::PROTOCOL_ERROR.0,
            reason,
        }
    }
}

impl From<FrameError> for ProtocolViolation {
    fn from(e: FrameError) -> Self {
        ProtocolViolation::protocol(match e {
            FrameError::ReservedBits => "reserved bits set",
            FrameError::UnknownOpcode(_) => "reserved opcode",
            FrameError::FragmentedControl => "fragmented control frame",
            FrameError::ControlTooLong => "control frame too long",
            FrameError::NonMinimalLength => "non-minimal payload length",
            FrameError::LengthTooLarge => "payload length too large",
        })
    }
}

/// A complete message from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundMessage {
    /// A text message; the bytes are guaranteed to be valid UTF-8.
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// The client started the closing handshake.
    Close {
        /// Status code (already validated); `None` when the payload was empty.
        code: Option<u16>,
        /// Reason text, possibly empty.
        reason: String,
    },
}

/// Decodes client→server frames into messages, fed arbitrary chunks of the byte stream.
///
/// One exists per connected client (tens of thousands), so it is small: partial headers sit
/// in a fixed array, and payload buffers exist only while a message is being received.
/// After a [`ProtocolViolation`] every call returns the same violation; after a close
/// message, the rest of the stream is discarded (RFC 6455 §5.5.1: nothing follows Close).
#[derive(Debug)]
pub struct InboundDecoder {
    /// Data messages longer than this fail with 1009, detected from the frame header.
    max_message_len: usize,
    /// Bytes of a frame header split across reads.
    header: [u8; MAX_HEADER_LEN],
    /// How many bytes of `header` are filled (< `MAX_HEADER_LEN`).
    header_filled: u8,
    /// The frame whose payload is being received, once its header is complete.
    frame: Option<FrameProgress>,
    /// Kind of the data message being assembled; `None` between messages, which is how a
    /// stray continuation or an interrupting data frame is detected.
    message_kind: Option<DataKind>,
    /// Unmasked payload of the data message so far; unallocated between messages.
    message: Vec<u8>,
    /// Length of the prefix of a text `message` already validated as UTF-8, so each
    /// fragment is checked once and invalid text fails before the message completes.
    utf8_checked: usize,
    /// Unmasked payload of a control frame, which may arrive between data fragments.
    control: Vec<u8>,
    /// Whether the stream is still being decoded.
    phase: Phase,
}

/// Which data message is being assembled (continuations inherit it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataKind {
    Text,
    Binary,
}

/// What the frame being received will produce once its payload is complete.
#[derive(Clone, Copy, Debug)]
enum FrameTarget {
    Ping,
    Pong,
    Close,
    /// A fragment of a `kind` data message; `fin` ends the message.
    Data {
        kind: DataKind,
        fin: bool,
    },
}

/// A frame whose header has been read and whose payload is arriving.
#[derive(Clone, Copy, Debug)]
struct FrameProgress {
    /// Where the payload goes and what it becomes when complete.
    target: FrameTarget,
    /// Key to unmask the payload with (client frames are always masked).
    mask: [u8; 4],
    /// Payload length from the header: when the frame ends.
    payload_len: u64,
    /// Payload bytes received so far; also the masking offset of the next byte.
    received: u64,
}

/// Lifecycle of the decoder.
#[derive(Clone, Copy, Debug)]
enum Phase {
    Open,
    /// The client sent Close; everything after it is ignored.
    Closed,
    Failed(ProtocolViolation),
}

impl InboundDecoder {
    pub fn new(max_message_len: usize) -> Self {
        InboundDecoder {
            max_message_len,
            header: [0; MAX_HEADER_LEN],
            header_filled: 0,
            frame: None,
            message_kind: None,
            message: Vec::new(),
            utf8_checked: 0,
            control: Vec::new(),
            phase: Phase::Open,
        }
    }

    /// Consumes bytes from `input` (advancing it) and returns the next complete message,
    /// or `Ok(None)` when `input` is exhausted without completing one. Call repeatedly
    /// until `Ok(None)`.
    pub fn next_message(
        &mut self,
        input: &mut &[u8],
    ) -> Result<Option<InboundMessage>, ProtocolViolation> {
        match self.phase {
            Phase::Open => {}
            Phase::Closed => {
                *input = &[];
                return Ok(None);
            }
            Phase::Failed(violation) => return Err(violation),
        }
        let result = self.decode(input);
        match &result {
            Err(violation) => self.finish(Phase::Failed(*violation)),
            Ok(Some(InboundMessage::Close { .. })) => self.finish(Phase::Closed),
            Ok(_) => {}
        }
        result
    }

    /// Whether a fragmented data message is partly received (for idle-timeout decisions).
    pub fn is_mid_message(&self) -> bool {
        self.message_kind.is_some()
    }

    /// Stops decoding for good and releases the buffers.
    fn finish(&mut self, phase: Phase) {
        self.phase = phase;
        self.frame = None;
        self.message_kind = None;
        self.message = Vec::new();
        self.control = Vec::new();
    }

    fn decode(&mut self, input: &mut &[u8]) -> Result<Option<InboundMessage>, ProtocolViolation> {
        loop {
            let mut frame = match self.frame.take() {
                Some(frame) => frame,
                None => match self.read_header(input)? {
                    Some(header) => self.begin_frame(header)?,
                    None => return Ok(None),
                },
            };
            let remaining = frame.payload_len - frame.received;
            let take = usize::try_from(remaining).map_or(input.len(), |r| r.min(input.len()));
            let (chunk, rest) = input.split_at(take);
            let dest = match frame.target {
                FrameTarget::Data { .. } => &mut self.message,
                _ => &mut self.control,
            };
            let start = dest.len();
            dest.extend_from_slice(chunk);
            apply_mask(&mut dest[start..], frame.mask, frame.received);
            frame.received += take as u64;
            *input = rest;
            if frame.received < frame.payload_len {
                self.frame = Some(frame);
                return Ok(None);
            }
            if let Some(message) = self.end_frame(frame.target)? {
                return Ok(Some(message));
            }
        }
    }

    /// Accumulates header bytes; consumes exactly the header once it is complete.
    fn read_header(&mut self, input: &mut &[u8]) -> Result<Option<FrameHeader>, FrameError> {
        let filled = usize::from(self.header_filled);
        let n = (MAX_HEADER_LEN - filled).min(input.len());
        self.header[filled..filled + n].copy_from_slice(&input[..n]);
        match parse_header(&self.header[..filled + n])? {
            Some(header) => {
                self.header_filled = 0;
                // The previous call's `filled` bytes were not a whole header, so
                // `header_len > filled` and the subtraction cannot underflow.
                *input = input.get(header.header_len - filled..).unwrap_or_default();
                Ok(Some(header))
            }
            None => {
                // Fourteen bytes always make a complete header, so this fits in a u8.
                self.header_filled = (filled + n) as u8;
                *input = &input[n..];
                Ok(None)
            }
        }
    }

    /// Checks a new frame against the connection state before any payload is buffered.
    fn begin_frame(&mut self, header: FrameHeader) -> Result<FrameProgress, ProtocolViolation> {
        let Some(mask) = header.mask else {
            return Err(ProtocolViolation::protocol("client frame not masked"));
        };
        let target = match header.opcode {
            Opcode::Ping => FrameTarget::Ping,
            Opcode::Pong => FrameTarget::Pong,
            Opcode::Close => FrameTarget::Close,
            Opcode::Continuation | Opcode::Text | Opcode::Binary => {
                let kind = match (header.opcode, self.message_kind) {
                    (Opcode::Continuation, Some(kind)) => kind,
                    (Opcode::Continuation, None) => {
                        return Err(ProtocolViolation::protocol(
                            "continuation without a message",
                        ));
                    }
                    (_, Some(_)) => {
                        return Err(ProtocolViolation::protocol(
                            "new message inside a fragmented one",
                        ));
                    }
                    (Opcode::Text, None) => DataKind::Text,
                    (_, None) => DataKind::Binary,
                };
                let total = (self.message.len() as u64).saturating_add(header.payload_len);
                if total > self.max_message_len as u64 {
                    return Err(ProtocolViolation {
                        code: CloseCode::MESSAGE_TOO_BIG.0,
                        reason: "message too big",
                    });
                }
                self.message_kind = Some(kind);
                // The buffer grows as bytes arrive rather than reserving `payload_len` up
                // front: a header alone must not make us allocate the maximum.
                FrameTarget::Data {
                    kind,
                    fin: header.fin,
                }
            }
        };
        if header.opcode.is_control() {
            // Control payloads are ≤ 125 bytes (checked by `parse_header`).
            self.control = Vec::with_capacity(header.payload_len as usize);
        }
        Ok(FrameProgress {
            target,
            mask,
            payload_len: header.payload_len,
            received: 0,
        })
    }

    /// Turns a fully received frame into a message, if it completes one.
    fn end_frame(
        &mut self,
        target: FrameTarget,
    ) -> Result<Option<InboundMessage>, ProtocolViolation> {
        let message = match target {
            FrameTarget::Data { kind, fin } => return self.end_data_frame(kind, fin),
            FrameTarget::Ping => InboundMessage::Ping(std::mem::take(&mut self.control)),
            FrameTarget::Pong => InboundMessage::Pong(std::mem::take(&mut self.control)),
            FrameTarget::Close => {
                let (code, reason) = parse_close(&self.control)?;
                InboundMessage::Close {
                    code,
                    reason: reason.to_owned(),
                }
            }
        };
        Ok(Some(message))
    }

    fn end_data_frame(
        &mut self,
        kind: DataKind,
        fin: bool,
    ) -> Result<Option<InboundMessage>, ProtocolViolation> {
        if kind == DataKind::Text {
            self.check_utf8(fin)?;
        }
        if !fin {
            return Ok(None);
        }
        self.message_kind = None;
        self.utf8_checked = 0;
        // Taking the buffer hands its allocation to the caller: none is kept between messages.
        let payload = std::mem::take(&mut self.message);
        Ok(Some(match kind {
            DataKind::Text => InboundMessage::Text(payload),
            DataKind::Binary => InboundMessage::Binary(payload),
        }))
    }

    /// Validates the text received since the last fragment. A non-final fragment may end
    /// inside a multi-byte character, whose remaining bytes come with the next fragment.
    fn check_utf8(&mut self, fin: bool) -> Result<(), ProtocolViolation> {
        let unchecked = self.message.get(self.utf8_checked..).unwrap_or_default();
        match std::str::from_utf8(unchecked) {
            Ok(_) => self.utf8_checked = self.message.len(),
            Err(e) if e.error_len().is_none() && !fin => self.utf8_checked += e.valid_up_to(),
            Err(_) => {
                return Err(ProtocolViolation {
                    code: CloseCode::INVALID_PAYLOAD.0,
                    reason: "text message is not UTF-8",
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn server_frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_server_frame(opcode, payload, &mut out);
        out
    }

    fn client_frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_client_frame(opcode, payload, MASK, &mut out);
        out
    }

    fn fragment(fin: bool, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_masked_frame(fin, opcode, payload, MASK, &mut out);
        out
    }

    /// Feeds `stream` in the given chunks and collects every message and the error, if any.
    fn decode_chunks<'a>(
        max: usize,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<InboundMessage>, Option<ProtocolViolation>) {
        let mut decoder = InboundDecoder::new(max);
        let mut messages = Vec::new();
        for mut chunk in chunks {
            loop {
                match decoder.next_message(&mut chunk) {
                    Ok(Some(message)) => messages.push(message),
                    Ok(None) => {
                        assert!(chunk.is_empty(), "Ok(None) left input unconsumed");
                        break;
                    }
                    Err(violation) => return (messages, Some(violation)),
                }
            }
        }
        (messages, None)
    }

    fn decode(stream: &[u8]) -> (Vec<InboundMessage>, Option<ProtocolViolation>) {
        decode_chunks(1 << 20, [stream])
    }

    /// Decodes `stream` whole, byte at a time, and split at every point; all must agree.
    fn decode_every_split(
        max: usize,
        stream: &[u8],
    ) -> (Vec<InboundMessage>, Option<ProtocolViolation>) {
        let whole = decode_chunks(max, [stream]);
        assert_eq!(
            decode_chunks(max, stream.chunks(1)),
            whole,
            "byte at a time"
        );
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(decode_chunks(max, [a, b]), whole, "split at {split}");
        }
        whole
    }

    fn violation(code: u16, stream: &[u8]) -> ProtocolViolation {
        let (_, err) = decode_every_split(1 << 20, stream);
        let err = err.expect("expected a violation");
        assert_eq!(err.code, code, "{err}");
        err
    }

    // ---- RFC 6455 §5.7 examples ----

    #[test]
    fn rfc_single_frame_unmasked_text() {
        let bytes = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(server_frame(Opcode::Text, b"Hello"), bytes);
        let (header, payload) = split_frame(&bytes).unwrap().unwrap();
        assert_eq!(
            header,
            FrameHeader {
                fin: true,
                opcode: Opcode::Text,
                mask: None,
                payload_len: 5,
                header_len: 2
            }
        );
        assert_eq!(payload, b"Hello");
    }

    #[test]
    fn rfc_single_frame_masked_text() {
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(client_frame(Opcode::Text, b"Hello"), bytes);
        let header = parse_header(&bytes).unwrap().unwrap();
        assert_eq!(header.mask, Some(MASK));
        assert_eq!(header.header_len, 6);
        assert_eq!(header.frame_len(), 11);
        let mut payload = bytes[6..].to_vec();
        apply_mask(&mut payload, MASK, 0);
        assert_eq!(payload, b"Hello");
        assert_eq!(
            decode_every_split(1 << 20, &bytes),
            (vec![InboundMessage::Text(b"Hello".to_vec())], None)
        );
    }

    #[test]
    fn rfc_fragmented_unmasked_text() {
        let first = [0x01, 0x03, 0x48, 0x65, 0x6c];
        let second = [0x80, 0x02, 0x6c, 0x6f];
        let h1 = parse_header(&first).unwrap().unwrap();
        assert!(!h1.fin);
        assert_eq!(h1.opcode, Opcode::Text);
        let h2 = parse_header(&second).unwrap().unwrap();
        assert!(h2.fin);
        assert_eq!(h2.opcode, Opcode::Continuation);
        // The same message from a client (masked) is reassembled by the decoder.
        let mut stream = fragment(false, Opcode::Text, b"Hel");
        stream.extend(fragment(true, Opcode::Continuation, b"lo"));
        assert_eq!(&stream[..2], &[0x01, 0x83]);
        assert_eq!(
            decode_every_split(1 << 20, &stream),
            (vec![InboundMessage::Text(b"Hello".to_vec())], None)
        );
    }

    #[test]
    fn rfc_ping_and_masked_pong() {
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(server_frame(Opcode::Ping, b"Hello"), ping);
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(client_frame(Opcode::Pong, b"Hello"), pong);
        assert_eq!(
            decode(&pong),
            (vec![InboundMessage::Pong(b"Hello".to_vec())], None)
        );
    }

    #[test]
    fn rfc_256_byte_binary() {
        let payload = vec![0xAB; 256];
        let frame = server_frame(Opcode::Binary, &payload);
        assert_eq!(&frame[..4], &[0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(&frame[4..], &payload[..]);
        let (header, body) = split_frame(&frame).unwrap().unwrap();
        assert_eq!((header.payload_len, header.header_len), (256, 4));
        assert_eq!(body, &payload[..]);
    }

    #[test]
    fn rfc_64k_binary() {
        let payload = vec![0x5A; 65536];
        let frame = server_frame(Opcode::Binary, &payload);
        assert_eq!(
            &frame[..10],
            &[0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]
        );
        assert_eq!(frame.len(), 10 + 65536);
        let (header, body) = split_frame(&frame).unwrap().unwrap();
        assert_eq!((header.payload_len, header.header_len), (65536, 10));
        assert_eq!(body.len(), 65536);
    }

    // ---- headers ----

    #[test]
    fn length_forms_at_their_boundaries() {
        let cases: [(u64, &[u8]); 6] = [
            (0, &[0x82, 0]),
            (125, &[0x82, 125]),
            (126, &[0x82, 126, 0, 126]),
            (65535, &[0x82, 126, 0xFF, 0xFF]),
            (65536, &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
            (
                MAX_PAYLOAD_LEN,
                &[0x82, 127, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            ),
        ];
        for (len, expected) in cases {
            let mut out = [0; MAX_HEADER_LEN];
            let n = write_server_header(Opcode::Binary, len, &mut out);
            assert_eq!(&out[..n], expected, "len {len}");
            assert_eq!(server_header_len(len), n, "len {len}");
            let header = parse_header(&out[..n]).unwrap().unwrap();
            assert_eq!((header.payload_len, header.header_len), (len, n));
            assert_eq!(header.frame_len(), n as u64 + len);
        }
    }

    #[test]
    fn encode_parse_round_trip() {
        for len in [0, 1, 125, 126, 127, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            for opcode in [Opcode::Text, Opcode::Binary] {
                let frame = server_frame(opcode, &payload);
                let (header, body) = split_frame(&frame).unwrap().unwrap();
                assert_eq!(
                    (header.fin, header.opcode, header.mask),
                    (true, opcode, None)
                );
                assert_eq!(header.frame_len(), frame.len() as u64);
                assert_eq!(body, &payload[..]);

                let frame = client_frame(opcode, &payload);
                let (header, body) = split_frame(&frame).unwrap().unwrap();
                assert_eq!(header.mask, Some(MASK));
                assert_eq!(header.header_len, server_header_len(len as u64) + 4);
                let mut body = body.to_vec();
                apply_mask(&mut body, MASK, 0);
                assert_eq!(body, payload, "len {len}");
            }
        }
    }

    #[test]
    fn every_header_prefix_needs_more_bytes() {
        for frame in [
            client_frame(Opcode::Text, &[1; 5]),
            client_frame(Opcode::Binary, &[1; 300]),
            client_frame(Opcode::Binary, &[1; 70000]),
            server_frame(Opcode::Binary, &[1; 70000]),
        ] {
            let header = parse_header(&frame).unwrap().unwrap();
            for end in 0..header.header_len {
                assert_eq!(parse_header(&frame[..end]), Ok(None), "prefix {end}");
            }
            assert_eq!(split_frame(&frame[..frame.len() - 1]), Ok(None));
        }
    }

    #[test]
    fn header_errors() {
        let cases: [(&[u8], FrameError); 9] = [
            (&[0xC1, 0x00], FrameError::ReservedBits),
            (&[0xA1, 0x00], FrameError::ReservedBits),
            (&[0x91, 0x00], FrameError::ReservedBits),
            (&[0x83, 0x00], FrameError::UnknownOpcode(3)),
            (&[0x8B, 0x00], FrameError::UnknownOpcode(0xB)),
            (&[0x09, 0x00], FrameError::FragmentedControl),
            (&[0x89, 0x7E, 0x00, 0x7E], FrameError::ControlTooLong),
            (&[0x82, 0x7E, 0x00, 0x7D], FrameError::NonMinimalLength),
            (
                &[0x82, 0x7F, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF],
                FrameError::NonMinimalLength,
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(parse_header(bytes), Err(expected), "{bytes:02x?}");
        }
        let too_large = [0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_header(&too_large), Err(FrameError::LengthTooLarge));
        // Control-frame errors are visible from the first two bytes alone.
        assert_eq!(parse_header(&[0x88, 0xFE]), Err(FrameError::ControlTooLong));
    }

    #[test]
    fn mask_applies_in_any_chunking() {
        let original: Vec<u8> = (0..=255).collect();
        let mut whole = original.clone();
        apply_mask(&mut whole, MASK, 0);
        assert_eq!(whole[..4], [0x37, 0xfb, 0x23, 0x3e]);
        for chunk_len in 1..=17 {
            let mut chunked = original.clone();
            let mut offset = 0;
            for chunk in chunked.chunks_mut(chunk_len) {
                apply_mask(chunk, MASK, offset);
                offset += chunk.len() as u64;
            }
            assert_eq!(chunked, whole, "chunk length {chunk_len}");
        }
        apply_mask(&mut whole, MASK, 0);
        assert_eq!(whole, original);
    }

    // ---- close frames ----

    #[test]
    fn close_code_validity() {
        for valid in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1013, 3000, 4999,
        ] {
            assert!(CloseCode(valid).is_valid_on_wire(), "{valid}");
        }
        for invalid in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode(invalid).is_valid_on_wire(), "{invalid}");
        }
    }

    #[test]
    fn encode_close_format() {
        let mut out = Vec::new();
        encode_close(CloseCode::POLICY_VIOLATION, "bye", &mut out);
        assert_eq!(out, [0x88, 0x05, 0x03, 0xF0, b'b', b'y', b'e']);
        let (header, payload) = split_frame(&out).unwrap().unwrap();
        assert_eq!(header.opcode, Opcode::Close);
        assert_eq!(parse_close(payload), Ok((Some(1008), "bye")));
    }

    #[test]
    fn close_reason_truncated_on_char_boundary() {
        // 'é' is two bytes: 61 of them fill 122 of the 123 reason bytes.
        let reason = "é".repeat(200);
        let mut out = Vec::new();
        encode_close(CloseCode::NORMAL, &reason, &mut out);
        let (header, payload) = split_frame(&out).unwrap().unwrap();
        assert_eq!(header.payload_len, 124);
        assert_eq!(parse_close(payload), Ok((Some(1000), &*"é".repeat(61))));

        let ascii = "x".repeat(500);
        let mut out = Vec::new();
        encode_client_close(CloseCode::GOING_AWAY, &ascii, MASK, &mut out);
        let (messages, err) = decode(&out);
        assert_eq!(err, None);
        assert_eq!(
            messages,
            [InboundMessage::Close {
                code: Some(1001),
                reason: "x".repeat(MAX_CLOSE_REASON)
            }]
        );
    }

    #[test]
    fn parse_close_cases() {
        assert_eq!(parse_close(&[]), Ok((None, "")));
        assert_eq!(parse_close(&[0x03, 0xE8]), Ok((Some(1000), "")));
        assert_eq!(
            parse_close(&[0x0F, 0xA0, b'o', b'k']),
            Ok((Some(4000), "ok"))
        );
        assert_eq!(parse_close(&[0x03]).unwrap_err().code, 1002);
        assert_eq!(parse_close(&[0x03, 0xED]).unwrap_err().code, 1002); // 1005
        assert_eq!(parse_close(&[0x03, 0xE8, 0xFF]).unwrap_err().code, 1007);
    }

    // ---- inbound decoder ----

    #[test]
    fn decoder_interleaved_stream_is_split_invariant() {
        let mut stream = Vec::new();
        stream.extend(fragment(false, Opcode::Text, "héllo ".as_bytes()));
        stream.extend(client_frame(Opcode::Ping, b"p1"));
        // 'é' (c3 a9) split across two fragments.
        stream.extend(fragment(false, Opcode::Continuation, b"w\xc3"));
        stream.extend(client_frame(Opcode::Pong, b""));
        stream.extend(fragment(true, Opcode::Continuation, b"\xa9rld"));
        stream.extend(client_frame(Opcode::Binary, &[0u8; 300]));
        stream.extend(fragment(false, Opcode::Binary, b""));
        stream.extend(fragment(true, Opcode::Continuation, b""));
        stream.extend(client_frame(Opcode::Text, b""));
        let mut close = Vec::new();
        encode_client_close(CloseCode::NORMAL, "done", MASK, &mut close);
        stream.extend(&close);
        // Anything after Close is ignored, even garbage.
        stream.extend([0xFF, 0xFF, 0xFF]);

        let (messages, err) = decode_every_split(1 << 20, &stream);
        assert_eq!(err, None);
        assert_eq!(
            messages,
            [
                InboundMessage::Ping(b"p1".to_vec()),
                InboundMessage::Pong(Vec::new()),
                InboundMessage::Text("héllo wérld".as_bytes().to_vec()),
                InboundMessage::Binary(vec![0; 300]),
                InboundMessage::Binary(Vec::new()),
                InboundMessage::Text(Vec::new()),
                InboundMessage::Close {
                    code: Some(1000),
                    reason: "done".into()
                },
            ]
        );
    }

    #[test]
    fn decoder_large_frames() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let stream = client_frame(Opcode::Binary, &payload);
        for chunk_len in [1, 7, 4096, stream.len()] {
            assert_eq!(
                decode_chunks(1 << 20, stream.chunks(chunk_len)),
                (vec![InboundMessage::Binary(payload.clone())], None),
                "chunk length {chunk_len}"
            );
        }
    }

    #[test]
    fn decoder_violations() {
        let unmasked = server_frame(Opcode::Text, b"hi");
        assert_eq!(violation(1002, &unmasked).reason, "client frame not masked");
        let mut rsv = client_frame(Opcode::Text, b"hi");
        rsv[0] |= 0x40;
        assert_eq!(violation(1002, &rsv).reason, "reserved bits set");
        let mut opcode = client_frame(Opcode::Text, b"hi");
        opcode[0] = 0x83;
        assert_eq!(violation(1002, &opcode).reason, "reserved opcode");
        let stray = fragment(true, Opcode::Continuation, b"x");
        assert_eq!(
            violation(1002, &stray).reason,
            "continuation without a message"
        );
        let mut interrupted = fragment(false, Opcode::Text, b"a");
        interrupted.extend(client_frame(Opcode::Binary, b"b"));
        assert_eq!(
            violation(1002, &interrupted).reason,
            "new message inside a fragmented one"
        );
        let mut control = client_frame(Opcode::Ping, b"");
        control[0] = 0x09; // FIN cleared
        assert_eq!(violation(1002, &control).reason, "fragmented control frame");
        let mut long_ping = vec![0x89, 0xFE, 0x00, 0x7E];
        long_ping.extend(MASK);
        long_ping.extend([0; 126]);
        assert_eq!(violation(1002, &long_ping).reason, "control frame too long");
        let close_one_byte = client_frame(Opcode::Close, &[0x03]);
        assert_eq!(
            violation(1002, &close_one_byte).reason,
            "close payload of 1 byte"
        );
        let close_bad_code = client_frame(Opcode::Close, &[0x03, 0xEE]); // 1006
        assert_eq!(
            violation(1002, &close_bad_code).reason,
            "invalid close code"
        );
        let close_bad_reason = client_frame(Opcode::Close, &[0x03, 0xE8, 0xC3, 0x28]);
        assert_eq!(
            violation(1007, &close_bad_reason).reason,
            "close reason is not UTF-8"
        );
        let bad_text = client_frame(Opcode::Text, b"ok \xFF");
        assert_eq!(
            violation(1007, &bad_text).reason,
            "text message is not UTF-8"
        );
        // A text message may not end inside a character.
        let truncated = client_frame(Opcode::Text, b"\xc3");
        assert_eq!(violation(1007, &truncated).code, 1007);
    }

    #[test]
    fn invalid_utf8_fails_before_the_message_ends() {
        let mut stream = fragment(false, Opcode::Text, b"ok");
        stream.extend(fragment(false, Opcode::Continuation, b"\xFF"));
        // No final fragment: the error must not wait for it.
        assert_eq!(violation(1007, &stream).reason, "text message is not UTF-8");
        // Binary payloads are not UTF-8 checked.
        let binary = client_frame(Opcode::Binary, b"\xFF");
        assert_eq!(
            decode(&binary),
            (vec![InboundMessage::Binary(vec![0xFF])], None)
        );
    }

    #[test]
    fn message_too_big_detected_from_header() {
        let max = 300;
        let exact = client_frame(Opcode::Binary, &[1; 300]);
        assert_eq!(
            decode_chunks(max, [&exact[..]]),
            (vec![InboundMessage::Binary(vec![1; 300])], None)
        );
        // Only the header of the oversized frame is sent: it alone must trip the limit.
        let over = client_frame(Opcode::Binary, &[1; 301]);
        let (messages, err) = decode_chunks(max, [&over[..8]]);
        assert!(messages.is_empty());
        assert_eq!(err.map(|e| e.code), Some(1009));
        // Fragments count towards the total; control frames in between do not.
        let mut fragmented = fragment(false, Opcode::Text, &[b'a'; 200]);
        fragmented.extend(client_frame(Opcode::Ping, &[0; 125]));
        fragmented.extend(fragment(true, Opcode::Continuation, &[b'a'; 101]));
        let (messages, err) = decode_every_split(max, &fragmented);
        assert_eq!(messages, [InboundMessage::Ping(vec![0; 125])]);
        assert_eq!(err.map(|e| e.code), Some(1009));
    }

    #[test]
    fn violation_is_sticky_and_close_ends_decoding() {
        let mut decoder = InboundDecoder::new(1024);
        let bad = server_frame(Opcode::Text, b"x");
        let err = decoder.next_message(&mut &bad[..]).unwrap_err();
        let good = client_frame(Opcode::Text, b"x");
        assert_eq!(decoder.next_message(&mut &good[..]), Err(err));

        let mut decoder = InboundDecoder::new(1024);
        let close = client_frame(Opcode::Close, b"");
        let mut input = &close[..];
        assert_eq!(
            decoder.next_message(&mut input),
            Ok(Some(InboundMessage::Close {
                code: None,
                reason: String::new()
            }))
        );
        let mut input = &good[..];
        assert_eq!(decoder.next_message(&mut input), Ok(None));
        assert!(input.is_empty());
    }

    #[test]
    fn decoder_stays_small_and_frees_buffers() {
        // Tens of thousands of these live at once.
        assert!(
            std::mem::size_of::<InboundDecoder>() <= 160,
            "{}",
            std::mem::size_of::<InboundDecoder>()
        );
        let mut decoder = InboundDecoder::new(1 << 20);
        let first = fragment(false, Opcode::Binary, &[7; 1000]);
        assert_eq!(decoder.next_message(&mut &first[..]), Ok(None));
        assert!(decoder.is_mid_message());
        assert!(decoder.message.capacity() >= 1000);
        let last = fragment(true, Opcode::Continuation, b"");
        let message = decoder.next_message(&mut &last[..]);
        assert_eq!(message, Ok(Some(InboundMessage::Binary(vec![7; 1000]))));
        assert!(!decoder.is_mid_message());
        assert_eq!(decoder.message.capacity(), 0);
        assert_eq!(decoder.control.capacity(), 0);
    }

    #[test]
    fn input_is_advanced_exactly_per_message() {
        let mut stream = client_frame(Opcode::Text, b"one");
        let first_len = stream.len();
        stream.extend(client_frame(Opcode::Text, b"two"));
        let mut decoder = InboundDecoder::new(1024);
        let mut input = &stream[..];
        assert_eq!(
            decoder.next_message(&mut input),
            Ok(Some(InboundMessage::Text(b"one".to_vec())))
        );
        assert_eq!(input.len(), stream.len() - first_len);
        assert_eq!(
            decoder.next_message(&mut input),
            Ok(Some(InboundMessage::Text(b"two".to_vec())))
        );
        assert!(input.is_empty());
        assert_eq!(decoder.next_message(&mut input), Ok(None));
    }
}
