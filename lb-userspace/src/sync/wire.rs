//! Wire format of peer flow sync. Every multi-byte integer is big-endian (network order); flow
//! addresses and ports are copied byte for byte from `FlowEvent`, which already holds them in
//! network order.
//!
//! A sync connection is one-way for data: the node that connects (the *sender*) streams its flows
//! to the node that accepted (the *receiver*). The receiver sends only two messages: the
//! challenge, right after accepting, and one Ack, in answer to the sender's AckRequest.
//!
//! Sequence on a connection:
//! 1. receiver → sender: Challenge;
//! 2. sender → receiver: Hello (seq 1) and AckRequest (seq 2), written together; the receiver
//!    closes the connection unless a valid Hello arrived within 2 s of the accept;
//! 3. receiver → sender: Ack, which proves that the receiver holds the key (see `auth.rs`). A
//!    receiver that rejected the Hello (wrong key, self-peering) closes the connection instead;
//! 4. sender → receiver, only after the Ack verified: Snapshot frames, SnapshotEnd, then Flows
//!    and Heartbeat frames (a heartbeat at least every heartbeat interval, also while the sender
//!    waits for the Ack or for its agent's snapshot).
//!
//! **Challenge** (receiver → sender, [`CHALLENGE_MSG_LEN`] = 24 bytes)
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4  | magic `XLBC` |
//! | 4  | 1  | version, [`VERSION`] |
//! | 5  | 3  | reserved, zero |
//! | 8  | 16 | challenge: fresh random bytes for this connection |
//!
//! **Ack** (receiver → sender, [`ACK_MSG_LEN`] = 40 bytes)
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4  | magic `XLBA` |
//! | 4  | 1  | version, [`VERSION`] |
//! | 5  | 3  | reserved, zero |
//! | 8  | 32 | proof: HMAC-SHA256 with a key derived from the sync key over challenge ‖ sender's node id ‖ the AckRequest's nonce (see `auth.rs`) |
//!
//! **Frame** (sender → receiver): a fixed [`HEADER_LEN`] = 36-byte header, the payload, and a
//! 32-byte tag.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4  | magic `XLBS` |
//! | 4  | 1  | version, [`VERSION`] |
//! | 5  | 1  | kind: 1 Hello, 2 Flows, 3 Snapshot, 4 SnapshotEnd, 5 Heartbeat, 6 AckRequest |
//! | 6  | 2  | flags; none are defined in version 1, so anything but 0 is rejected |
//! | 8  | 8  | sender's node id (random per agent start; names the sender in logs, detects self-peering) |
//! | 16 | 8  | sequence: 1 for the first frame of a connection, +1 for each next one |
//! | 24 | 8  | sent time, unix ns (for Flows: when the sender's agent took the batch's first flow from the kernel) |
//! | 32 | 4  | payload length n in bytes, at most [`MAX_PAYLOAD`] |
//! | 36 | n  | payload, by kind (below) |
//! | 36+n | 32 | HMAC-SHA256 over challenge ‖ bytes 0..36+n (see `auth.rs`) |
//!
//! Payloads:
//! - Hello (always the first frame): 2 bytes, the sender's sync listen port (lets the receiver
//!   tell apart two peers on one address).
//! - Flows, Snapshot: n / [`RECORD_LEN`] flow records, at most [`MAX_FLOWS_PER_FRAME`].
//! - SnapshotEnd: 8 bytes, the number of flows the snapshot carried.
//! - Heartbeat: empty.
//! - AckRequest (only as the second frame, right after Hello): 16 bytes, a fresh random nonce the
//!   receiver's Ack must cover, so an Ack recorded from another connection is worthless.
//!
//! Flow record ([`RECORD_LEN`] = 20 bytes):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4 | client address (`FlowKey::src_addr`) |
//! | 4  | 4 | VIP address (`FlowKey::dst_addr`) |
//! | 8  | 2 | client port |
//! | 10 | 2 | VIP port |
//! | 12 | 1 | IP protocol |
//! | 13 | 3 | reserved, zero |
//! | 16 | 4 | backend address: backends are named by address, never by a node-local slot |
//!
//! Decoding is total: every malformed input is an `Err`, and the payload length is checked
//! against the kind's limit from the header alone, before anything is allocated for it.

use lb_common::{FlowEvent, FlowKey};
use std::borrow::Cow;

pub const MAGIC: [u8; 4] = *b"XLBS";
pub const CHALLENGE_MAGIC: [u8; 4] = *b"XLBC";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 36;
pub const TAG_LEN: usize = 32;
pub const CHALLENGE_LEN: usize = 16;
pub const CHALLENGE_MSG_LEN: usize = 8 + CHALLENGE_LEN;
pub const ACK_MAGIC: [u8; 4] = *b"XLBA";
/// Length of the AckRequest's nonce.
pub const NONCE_LEN: usize = 16;
/// Length of the proof in an Ack (an HMAC-SHA256 output).
pub const PROOF_LEN: usize = 32;
pub const ACK_MSG_LEN: usize = 8 + PROOF_LEN;
pub const RECORD_LEN: usize = 20;
/// Flows per Flows/Snapshot frame: big enough that a snapshot of a million flows is ~250 frames,
/// small enough that one frame is installed in well under a millisecond.
pub const MAX_FLOWS_PER_FRAME: usize = 4096;
pub const MAX_PAYLOAD: usize = MAX_FLOWS_PER_FRAME * RECORD_LEN;
/// The largest frame on the wire (80 KiB + 68 bytes); comfortably under the 256 KiB cap.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD + TAG_LEN;
const _: () = assert!(MAX_FRAME_LEN <= 256 * 1024);

/// A random value the receiver picks for each connection; every frame's tag covers it.
pub type Challenge = [u8; CHALLENGE_LEN];
/// A random value the sender picks for each connection; the receiver's Ack covers it.
pub type Nonce = [u8; NONCE_LEN];
/// The receiver's proof of key possession in an Ack.
pub type Proof = [u8; PROOF_LEN];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unsupported version {0} (this node speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown flags {0:#06x}")]
    BadFlags(u16),
    #[error("payload of {len} bytes is not valid for a {kind} frame")]
    BadPayloadLength { kind: Kind, len: u32 },
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("{0} bytes after the end of the frame")]
    Trailing(usize),
}

/// Frame kinds (byte 5 of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Flows = 2,
    Snapshot = 3,
    SnapshotEnd = 4,
    Heartbeat = 5,
    AckRequest = 6,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Hello,
        Kind::Flows,
        Kind::Snapshot,
        Kind::SnapshotEnd,
        Kind::Heartbeat,
        Kind::AckRequest,
    ];

    fn from_u8(v: u8) -> Result<Self, WireError> {
        Kind::ALL
            .into_iter()
            .find(|k| *k as u8 == v)
            .ok_or(WireError::UnknownKind(v))
    }

    /// Whether `len` is a valid payload length for this kind.
    fn payload_len_ok(self, len: u32) -> bool {
        let len = len as usize;
        match self {
            Kind::Hello => len == 2,
            Kind::Flows | Kind::Snapshot => len <= MAX_PAYLOAD && len.is_multiple_of(RECORD_LEN),
            Kind::SnapshotEnd => len == 8,
            Kind::Heartbeat => len == 0,
            Kind::AckRequest => len == NONCE_LEN,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub node_id: u64,
    pub seq: u64,
    pub sent_ns: u64,
    pub payload_len: u32,
}

/// A frame's content. Flows are borrowed when encoding (no copy of a batch shared by several peer
/// senders) and owned after decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Hello { listen_port: u16 },
    Flows(Cow<'a, [FlowEvent]>),
    Snapshot(Cow<'a, [FlowEvent]>),
    SnapshotEnd { total: u64 },
    Heartbeat,
    AckRequest { nonce: Nonce },
}

impl Message<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Flows(_) => Kind::Flows,
            Message::Snapshot(_) => Kind::Snapshot,
            Message::SnapshotEnd { .. } => Kind::SnapshotEnd,
            Message::Heartbeat => Kind::Heartbeat,
            Message::AckRequest { .. } => Kind::AckRequest,
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Message::Hello { .. } => 2,
            Message::Flows(f) | Message::Snapshot(f) => f.len() * RECORD_LEN,
            Message::SnapshotEnd { .. } => 8,
            Message::Heartbeat => 0,
            Message::AckRequest { .. } => NONCE_LEN,
        }
    }
}

fn need(buf: &[u8], n: usize) -> Result<(), WireError> {
    if buf.len() < n {
        Err(WireError::Truncated {
            need: n,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn raw4(b: &[u8], at: usize) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    a
}

/// Append header and payload of `msg` to `out` (no tag: `auth::Sealer` adds it). `msg` must hold
/// at most [`MAX_FLOWS_PER_FRAME`] flows; callers split larger batches (the sealer checks).
pub fn encode_body(node_id: u64, seq: u64, sent_ns: u64, msg: &Message<'_>, out: &mut Vec<u8>) {
    let len = msg.payload_len();
    out.reserve(HEADER_LEN + len + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(msg.kind() as u8);
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&node_id.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&sent_ns.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    match msg {
        Message::Hello { listen_port } => out.extend_from_slice(&listen_port.to_be_bytes()),
        Message::Flows(flows) | Message::Snapshot(flows) => {
            for f in flows.iter() {
                // Already network order in memory: native-endian bytes are the wire bytes.
                out.extend_from_slice(&f.flow.src_addr.to_ne_bytes());
                out.extend_from_slice(&f.flow.dst_addr.to_ne_bytes());
                out.extend_from_slice(&f.flow.src_port.to_ne_bytes());
                out.extend_from_slice(&f.flow.dst_port.to_ne_bytes());
                out.push(f.flow.proto);
                out.extend_from_slice(&[0; 3]);
                out.extend_from_slice(&f.backend_addr.to_ne_bytes());
            }
        }
        Message::SnapshotEnd { total } => out.extend_from_slice(&total.to_be_bytes()),
        Message::Heartbeat => {}
        Message::AckRequest { nonce } => out.extend_from_slice(nonce),
    }
}

/// Decode and validate the first [`HEADER_LEN`] bytes of `buf`, including the payload length
/// against the kind's limit, so a reader knows how much more to read before allocating it.
pub fn decode_header(buf: &[u8]) -> Result<Header, WireError> {
    need(buf, HEADER_LEN)?;
    let magic = raw4(buf, 0);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if buf[4] != VERSION {
        return Err(WireError::BadVersion(buf[4]));
    }
    let kind = Kind::from_u8(buf[5])?;
    let flags = u16::from_be_bytes([buf[6], buf[7]]);
    if flags != 0 {
        return Err(WireError::BadFlags(flags));
    }
    let payload_len = be_u32(buf, 32);
    if !kind.payload_len_ok(payload_len) {
        return Err(WireError::BadPayloadLength {
            kind,
            len: payload_len,
        });
    }
    Ok(Header {
        kind,
        node_id: be_u64(buf, 8),
        seq: be_u64(buf, 16),
        sent_ns: be_u64(buf, 24),
        payload_len,
    })
}

/// Decode a payload of `kind` (its length already checked by `decode_header`, checked again here
/// so this function is total on its own).
pub fn decode_payload(kind: Kind, payload: &[u8]) -> Result<Message<'static>, WireError> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    if !kind.payload_len_ok(len) {
        return Err(WireError::BadPayloadLength { kind, len });
    }
    Ok(match kind {
        Kind::Hello => Message::Hello {
            listen_port: u16::from_be_bytes([payload[0], payload[1]]),
        },
        Kind::Flows => Message::Flows(Cow::Owned(decode_records(payload)?)),
        Kind::Snapshot => Message::Snapshot(Cow::Owned(decode_records(payload)?)),
        Kind::SnapshotEnd => Message::SnapshotEnd {
            total: be_u64(payload, 0),
        },
        Kind::Heartbeat => Message::Heartbeat,
        Kind::AckRequest => {
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(payload);
            Message::AckRequest { nonce }
        }
    })
}

fn decode_records(payload: &[u8]) -> Result<Vec<FlowEvent>, WireError> {
    let mut flows = Vec::with_capacity(payload.len() / RECORD_LEN);
    for r in payload.chunks_exact(RECORD_LEN) {
        if r[13..16] != [0; 3] {
            return Err(WireError::Reserved);
        }
        flows.push(FlowEvent {
            flow: FlowKey {
                src_addr: u32::from_ne_bytes(raw4(r, 0)),
                dst_addr: u32::from_ne_bytes(raw4(r, 4)),
                src_port: u16::from_ne_bytes([r[8], r[9]]),
                dst_port: u16::from_ne_bytes([r[10], r[11]]),
                proto: r[12],
                _pad: [0; 3],
            },
            backend_addr: u32::from_ne_bytes(raw4(r, 16)),
            _pad: 0,
        });
    }
    Ok(flows)
}

/// One complete frame, split into its parts (nothing checked but the format).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameParts<'a> {
    pub(crate) header: Header,
    pub(crate) header_bytes: &'a [u8],
    pub(crate) payload: &'a [u8],
    pub(crate) tag: &'a [u8],
}

/// Split one complete frame (exactly one, nothing after it): the tests' way in; the connection
/// reader reads the parts separately.
#[cfg(test)]
pub(crate) fn split_frame(buf: &[u8]) -> Result<FrameParts<'_>, WireError> {
    let header = decode_header(buf)?;
    let end = HEADER_LEN + header.payload_len as usize + TAG_LEN;
    need(buf, end)?;
    if buf.len() > end {
        return Err(WireError::Trailing(buf.len() - end));
    }
    let payload_end = end - TAG_LEN;
    Ok(FrameParts {
        header,
        header_bytes: &buf[..HEADER_LEN],
        payload: &buf[HEADER_LEN..payload_end],
        tag: &buf[payload_end..end],
    })
}

pub fn encode_challenge(challenge: &Challenge) -> [u8; CHALLENGE_MSG_LEN] {
    let mut out = [0u8; CHALLENGE_MSG_LEN];
    out[..4].copy_from_slice(&CHALLENGE_MAGIC);
    out[4] = VERSION;
    out[8..].copy_from_slice(challenge);
    out
}

pub fn decode_challenge(buf: &[u8]) -> Result<Challenge, WireError> {
    need(buf, CHALLENGE_MSG_LEN)?;
    if buf.len() > CHALLENGE_MSG_LEN {
        return Err(WireError::Trailing(buf.len() - CHALLENGE_MSG_LEN));
    }
    let magic = raw4(buf, 0);
    if magic != CHALLENGE_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if buf[4] != VERSION {
        return Err(WireError::BadVersion(buf[4]));
    }
    if buf[5..8] != [0; 3] {
        return Err(WireError::Reserved);
    }
    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge.copy_from_slice(&buf[8..]);
    Ok(challenge)
}

pub fn encode_ack(proof: &Proof) -> [u8; ACK_MSG_LEN] {
    let mut out = [0u8; ACK_MSG_LEN];
    out[..4].copy_from_slice(&ACK_MAGIC);
    out[4] = VERSION;
    out[8..].copy_from_slice(proof);
    out
}

/// The proof of an Ack (only its format is checked here; `SyncKey::verify_ack` checks the proof).
pub fn decode_ack(buf: &[u8]) -> Result<Proof, WireError> {
    need(buf, ACK_MSG_LEN)?;
    if buf.len() > ACK_MSG_LEN {
        return Err(WireError::Trailing(buf.len() - ACK_MSG_LEN));
    }
    let magic = raw4(buf, 0);
    if magic != ACK_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if buf[4] != VERSION {
        return Err(WireError::BadVersion(buf[4]));
    }
    if buf[5..8] != [0; 3] {
        return Err(WireError::Reserved);
    }
    let mut proof = [0u8; PROOF_LEN];
    proof.copy_from_slice(&buf[8..]);
    Ok(proof)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic xorshift64*: reproducible "random" input without a dependency.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    pub(crate) fn flow(i: u32) -> FlowEvent {
        FlowEvent {
            flow: FlowKey {
                src_addr: (0x0a6f_0002u32.wrapping_add(i >> 16)).to_be(),
                dst_addr: 0x0a6f_6401u32.to_be(),
                src_port: ((i & 0xffff) as u16).to_be(),
                dst_port: 80u16.to_be(),
                proto: 6,
                _pad: [0; 3],
            },
            backend_addr: (0x0a6f_010bu32 + i % 3).to_be(),
            _pad: 0,
        }
    }

    fn samples() -> Vec<Message<'static>> {
        let flows: Vec<FlowEvent> = (0..37).map(flow).collect();
        let full: Vec<FlowEvent> = (0..MAX_FLOWS_PER_FRAME as u32).map(flow).collect();
        vec![
            Message::Hello { listen_port: 7946 },
            Message::Flows(Cow::Owned(flows.clone())),
            Message::Flows(Cow::Owned(full)),
            Message::Flows(Cow::Owned(Vec::new())),
            Message::Snapshot(Cow::Owned(flows)),
            Message::SnapshotEnd { total: 123_456 },
            Message::Heartbeat,
            Message::AckRequest {
                nonce: [0x5a; NONCE_LEN],
            },
        ]
    }

    fn frame(msg: &Message<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode_body(
            0x1122_3344_5566_7788,
            42,
            1_700_000_000_123_456_789,
            msg,
            &mut out,
        );
        out.extend_from_slice(&[0xab; TAG_LEN]);
        out
    }

    #[test]
    fn round_trip_every_kind() {
        let mut seen = Vec::new();
        for msg in samples() {
            let buf = frame(&msg);
            let FrameParts {
                header: h,
                header_bytes: hb,
                payload,
                tag,
            } = split_frame(&buf).unwrap();
            assert_eq!(h.kind, msg.kind());
            assert_eq!(h.node_id, 0x1122_3344_5566_7788);
            assert_eq!(h.seq, 42);
            assert_eq!(h.sent_ns, 1_700_000_000_123_456_789);
            assert_eq!(hb.len(), HEADER_LEN);
            assert_eq!(tag, &[0xab; TAG_LEN]);
            assert_eq!(decode_payload(h.kind, payload).unwrap(), msg);
            seen.push(h.kind);
        }
        for k in Kind::ALL {
            assert!(seen.contains(&k), "{k} not covered");
        }
    }

    #[test]
    fn record_layout_is_network_order() {
        let f = flow(0x0001_0203);
        let buf = frame(&Message::Flows(Cow::Owned(vec![f])));
        let r = &buf[HEADER_LEN..HEADER_LEN + RECORD_LEN];
        assert_eq!(&r[0..4], &[10, 111, 0, 3]);
        assert_eq!(&r[4..8], &[10, 111, 100, 1]);
        assert_eq!(&r[8..10], &[0x02, 0x03]);
        assert_eq!(&r[10..12], &[0, 80]);
        assert_eq!(r[12], 6);
        assert_eq!(&r[16..20], &[10, 111, 1, 11 + (0x0001_0203 % 3) as u8]);
        assert_eq!(&buf[32..36], &(RECORD_LEN as u32).to_be_bytes());
    }

    #[test]
    fn truncated_at_every_offset_is_rejected() {
        for msg in samples() {
            let buf = frame(&msg);
            // The full 4096-flow frame is 80 KiB; every offset of it is still quick.
            for cut in 0..buf.len() {
                assert!(
                    split_frame(&buf[..cut]).is_err(),
                    "{} cut at {cut}",
                    msg.kind()
                );
            }
            let mut longer = buf.clone();
            longer.push(0);
            assert_eq!(split_frame(&longer), Err(WireError::Trailing(1)));
        }
        let c = encode_challenge(&[7; CHALLENGE_LEN]);
        assert_eq!(decode_challenge(&c), Ok([7; CHALLENGE_LEN]));
        for cut in 0..c.len() {
            assert!(decode_challenge(&c[..cut]).is_err());
        }
    }

    #[test]
    fn ack_layout_and_checks() {
        let proof: Proof = std::array::from_fn(|i| i as u8);
        let a = encode_ack(&proof);
        assert_eq!(&a[..8], b"XLBA\x01\0\0\0");
        assert_eq!(decode_ack(&a), Ok(proof));
        for cut in 0..a.len() {
            assert!(decode_ack(&a[..cut]).is_err());
        }
        let mut longer = a.to_vec();
        longer.push(0);
        assert_eq!(decode_ack(&longer), Err(WireError::Trailing(1)));
        let mut b = a;
        b[3] = b'C';
        assert!(matches!(decode_ack(&b), Err(WireError::BadMagic(_))));
        let mut b = a;
        b[4] = 2;
        assert_eq!(decode_ack(&b), Err(WireError::BadVersion(2)));
        let mut b = a;
        b[6] = 1;
        assert_eq!(decode_ack(&b), Err(WireError::Reserved));
        // A challenge is not an Ack and an Ack is not a challenge.
        assert!(decode_ack(&encode_challenge(&[0; CHALLENGE_LEN])).is_err());
        assert!(decode_challenge(&a).is_err());
        // AckRequest carries exactly one nonce.
        assert!(decode_payload(Kind::AckRequest, &[0; NONCE_LEN - 1]).is_err());
        assert!(decode_payload(Kind::AckRequest, &[0; NONCE_LEN + 1]).is_err());
    }

    #[test]
    fn header_fields_are_checked() {
        let good = frame(&Message::Heartbeat);
        let mut b = good.clone();
        b[0] = b'Y';
        assert!(matches!(split_frame(&b), Err(WireError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(split_frame(&b), Err(WireError::BadVersion(2)));
        for kind in [0u8, 7, 255] {
            let mut b = good.clone();
            b[5] = kind;
            assert_eq!(split_frame(&b), Err(WireError::UnknownKind(kind)));
        }
        let mut b = good.clone();
        b[7] = 1;
        assert_eq!(split_frame(&b), Err(WireError::BadFlags(1)));
        // Reserved bytes of a record.
        let mut b = frame(&Message::Flows(Cow::Owned(vec![flow(1)])));
        b[HEADER_LEN + 14] = 1;
        let parts = split_frame(&b).unwrap();
        assert_eq!(
            decode_payload(parts.header.kind, parts.payload),
            Err(WireError::Reserved)
        );
    }

    #[test]
    fn oversized_length_is_rejected_from_the_header_alone() {
        let mut b = frame(&Message::Flows(Cow::Owned(Vec::new())));
        for len in [
            MAX_PAYLOAD as u32 + RECORD_LEN as u32,
            u32::MAX - 19,
            u32::MAX,
            7, // not a whole number of records
        ] {
            b[32..36].copy_from_slice(&len.to_be_bytes());
            assert!(matches!(
                decode_header(&b),
                Err(WireError::BadPayloadLength { .. })
            ));
        }
        // Fixed-size kinds with a wrong length.
        let mut b = frame(&Message::Heartbeat);
        b[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert!(decode_header(&b).is_err());
        assert!(decode_payload(Kind::Hello, &[1]).is_err());
        assert!(decode_payload(Kind::SnapshotEnd, &[0; 9]).is_err());
        assert!(decode_payload(Kind::Flows, &vec![0; MAX_PAYLOAD + RECORD_LEN]).is_err());
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid = frame(&Message::Flows(Cow::Owned((0..4).map(flow).collect())));
        for round in 0..20_000 {
            let len = (rng.next() % 200) as usize;
            let mut buf: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                // Mutations of a valid frame reach deeper than pure noise.
                let mut b = valid.clone();
                for _ in 0..1 + rng.next() % 4 {
                    let at = (rng.next() as usize) % b.len();
                    b[at] = rng.next() as u8;
                }
                b
            };
            if round % 7 == 0 && buf.len() >= 4 {
                buf[..4].copy_from_slice(&MAGIC);
            }
            let _ = split_frame(&buf);
            let _ = decode_challenge(&buf);
            let _ = decode_ack(&buf);
            if let Ok(h) = decode_header(&buf) {
                let end = (HEADER_LEN + h.payload_len as usize).min(buf.len());
                let _ = decode_payload(h.kind, &buf[HEADER_LEN.min(end)..end]);
            }
            for k in Kind::ALL {
                let _ = decode_payload(k, &buf);
            }
        }
    }
}
