//! Wire format of peer flow sync, version 3: a Noise handshake, then encrypted frames. Every
//! multi-byte integer is big-endian (network order); flow addresses and ports are copied byte for
//! byte from `FlowEvent`, which already holds them in network order (addresses as 16-byte
//! `Addr`s, IPv4 as IPv4-mapped). The cryptography (what goes
//! into each Noise message, keys, sequence checks) is in `noise.rs`; this file is the layout.
//!
//! A sync connection is one-way for data: the node that connects (the *sender*, the Noise
//! initiator) streams its flows to the node that accepted (the *receiver*, the responder). The
//! receiver sends only three things: the preamble, right after accepting; the second handshake
//! message; and one Ack, in answer to the sender's Hello.
//!
//! Sequence on a connection:
//! 1. receiver → sender: Preamble (magic, version and a fresh random challenge);
//! 2. sender → receiver: handshake record, Noise message 1 (`psk, e`); the receiver closes the
//!    connection unless the handshake and a valid Hello arrive within 2 s of the accept;
//! 3. receiver → sender: handshake record, Noise message 2 (`e, ee`). A receiver that could not
//!    read message 1 (another key, or a message made for another connection) closes instead;
//! 4. sender → receiver: data record 0, Hello;
//! 5. receiver → sender: data record 0, Ack. A receiver that rejected the Hello (self-peering)
//!    closes instead;
//! 6. sender → receiver, only after the Ack: Snapshot frames, SnapshotEnd, then Flows and
//!    Heartbeat frames (a heartbeat at least every heartbeat interval, also while the sender
//!    waits for the Ack or for its agent's snapshot).
//!
//! **Preamble** (receiver → sender, [`PREAMBLE_LEN`] = 24 bytes; the layout of version 1's
//! challenge, so that a node of either version reads the other's version instead of misparsing)
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4  | magic `XLBC` |
//! | 4  | 1  | version, [`VERSION`] |
//! | 5  | 3  | reserved, zero |
//! | 8  | 16 | challenge: fresh random bytes for this connection |
//!
//! **Record** (both directions after the preamble): a [`RECORD_HEADER_LEN`] = 16-byte header in
//! clear, then one Noise message of n bytes.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4 | magic `XLBS` |
//! | 4  | 1 | version, [`VERSION`] |
//! | 5  | 1 | type: 1 handshake, 2 data |
//! | 6  | 2 | n, the Noise message's length: [`HANDSHAKE_MSG_LEN`] for handshake records, [`MIN_DATA_MSG_LEN`]..=65535 for data records |
//! | 8  | 8 | sequence: 0 in handshake records; in data records the Noise nonce the message was encrypted with, 0 for the first data record in each direction and +1 for each next |
//! | 16 | n | the Noise message: for data records, the encrypted frame and its 16-byte tag |
//!
//! The header is not encrypted, but nothing in it can be changed unnoticed: magic, version, type
//! and length are checked, and the sequence must be the next one expected and is the nonce the
//! message decrypts with.
//!
//! **Frame** (the plaintext of a data record; at most 65535 − 16 bytes):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 1 | kind: 1 Hello, 2 Flows, 3 Snapshot, 4 SnapshotEnd, 5 Heartbeat, 6 Ack |
//! | 1  | 3 | reserved, zero |
//! | 4  | 8 | sent time, unix ns (for Flows: when the sender's agent took the batch's first flow from the kernel) |
//! | 12 | … | payload, by kind (below); its length is the frame's length − 12 |
//!
//! Payloads:
//! - Hello (always the sender's first frame): 10 bytes, the sender's node id (random per agent
//!   start; names the sender in logs, detects self-peering) and its sync listen port (lets the
//!   receiver tell apart two peers on one address).
//! - Flows, Snapshot: flow records, at most [`MAX_FLOWS_PER_FRAME`].
//! - SnapshotEnd: 8 bytes, the number of flows the snapshot carried.
//! - Heartbeat: empty.
//! - Ack (the receiver's only frame): empty.
//!
//! Flow record ([`RECORD_LEN`] = 56 bytes; addresses of either family, 16 bytes, IPv4 as the
//! IPv4-mapped IPv6 address `::ffff:a.b.c.d`):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 16 | client address (`FlowKey::src_addr`) |
//! | 16 | 16 | VIP address (`FlowKey::dst_addr`) |
//! | 32 | 2  | client port |
//! | 34 | 2  | VIP port |
//! | 36 | 1  | IP protocol |
//! | 37 | 3  | reserved, zero |
//! | 40 | 16 | backend address: backends are named by address, never by a node-local slot |
//!
//! **Versions.** Every version begins the receiver's preamble and everything a sender writes
//! with the magic and the version byte at the same offsets. A sender that reads a preamble of
//! another version writes [`version_notice`] (36 bytes: the length of a version-1 frame header,
//! so a version-1 receiver reads it whole and reports the version) and closes; a sender of
//! version 1 or 2 stops at this version's preamble with "unsupported version 3", and a
//! version-2 receiver rejects this version's notice by its version byte. Neither side misparses
//! the other.
//!
//! Decoding is total: every malformed input is an `Err`, and a record's length is checked
//! against its type's limits from the header alone, before anything is read for it.

use lb_common::{Addr, FlowEvent, FlowKey};
use std::borrow::Cow;

pub const MAGIC: [u8; 4] = *b"XLBS";
pub const PREAMBLE_MAGIC: [u8; 4] = *b"XLBC";
/// 1: HMAC-authenticated frames in clear; 2: Noise handshake and encrypted frames; 3: flow
/// records with 16-byte addresses (IPv4 and IPv6 flows).
pub const VERSION: u8 = 3;
pub const CHALLENGE_LEN: usize = 16;
pub const PREAMBLE_LEN: usize = 8 + CHALLENGE_LEN;
pub const RECORD_HEADER_LEN: usize = 16;
/// Noise's limit on one message, tag included.
pub const NOISE_MAX_MSG_LEN: usize = 65_535;
/// The AEAD tag at the end of every encrypted Noise payload.
pub const NOISE_TAG_LEN: usize = 16;
/// Both NNpsk0 handshake messages: an ephemeral X25519 key and the tag of an empty payload.
pub const HANDSHAKE_MSG_LEN: usize = 32 + NOISE_TAG_LEN;
pub const FRAME_HEADER_LEN: usize = 12;
/// The largest frame (plaintext of one data record).
pub const MAX_FRAME_LEN: usize = NOISE_MAX_MSG_LEN - NOISE_TAG_LEN;
/// The smallest data record's Noise message: an empty payload's frame and the tag.
pub const MIN_DATA_MSG_LEN: usize = FRAME_HEADER_LEN + NOISE_TAG_LEN;
pub const RECORD_LEN: usize = 56;
/// Flows per Flows/Snapshot frame: as many as one Noise message holds (1169; a snapshot of a
/// million flows is ~856 frames; one frame is installed in well under a millisecond).
pub const MAX_FLOWS_PER_FRAME: usize = (MAX_FRAME_LEN - FRAME_HEADER_LEN) / RECORD_LEN;
pub const MAX_PAYLOAD: usize = MAX_FLOWS_PER_FRAME * RECORD_LEN;
/// The largest record on the wire (64 KiB + 16 bytes).
pub const MAX_RECORD_LEN: usize = RECORD_HEADER_LEN + NOISE_MAX_MSG_LEN;
const HELLO_LEN: usize = 10;
/// See [`version_notice`].
pub const VERSION_NOTICE_LEN: usize = 36;

/// A random value the receiver picks for each connection; the handshake is bound to it.
pub type Challenge = [u8; CHALLENGE_LEN];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error(
        "unsupported sync protocol version {0} (this node speaks {VERSION}): run the same xlb version on every peer"
    )]
    BadVersion(u8),
    #[error("unknown record type {0}")]
    UnknownRecordType(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("a {rtype} record of {len} bytes is not valid")]
    BadRecordLength { rtype: RecordType, len: usize },
    #[error("a handshake record with sequence {0}, not 0")]
    HandshakeSequence(u64),
    #[error("payload of {len} bytes is not valid for a {kind} frame")]
    BadPayloadLength { kind: Kind, len: usize },
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("{0} bytes after the end")]
    Trailing(usize),
}

/// Record types (byte 5 of a record header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordType {
    Handshake = 1,
    Data = 2,
}

impl std::fmt::Display for RecordType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecordType::Handshake => "handshake",
            RecordType::Data => "data",
        })
    }
}

/// A decoded record header: the Noise message of `len` bytes follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub rtype: RecordType,
    pub len: usize,
    pub seq: u64,
}

/// Frame kinds (byte 0 of a frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Flows = 2,
    Snapshot = 3,
    SnapshotEnd = 4,
    Heartbeat = 5,
    Ack = 6,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Hello,
        Kind::Flows,
        Kind::Snapshot,
        Kind::SnapshotEnd,
        Kind::Heartbeat,
        Kind::Ack,
    ];

    fn from_u8(v: u8) -> Result<Self, WireError> {
        Kind::ALL
            .into_iter()
            .find(|k| *k as u8 == v)
            .ok_or(WireError::UnknownKind(v))
    }

    /// Whether `len` is a valid payload length for this kind.
    fn payload_len_ok(self, len: usize) -> bool {
        match self {
            Kind::Hello => len == HELLO_LEN,
            Kind::Flows | Kind::Snapshot => len <= MAX_PAYLOAD && len.is_multiple_of(RECORD_LEN),
            Kind::SnapshotEnd => len == 8,
            Kind::Heartbeat | Kind::Ack => len == 0,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A frame's content. Flows are borrowed when encoding (no copy of a batch shared by several peer
/// senders) and owned after decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Hello { node_id: u64, listen_port: u16 },
    Flows(Cow<'a, [FlowEvent]>),
    Snapshot(Cow<'a, [FlowEvent]>),
    SnapshotEnd { total: u64 },
    Heartbeat,
    Ack,
}

impl Message<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Flows(_) => Kind::Flows,
            Message::Snapshot(_) => Kind::Snapshot,
            Message::SnapshotEnd { .. } => Kind::SnapshotEnd,
            Message::Heartbeat => Kind::Heartbeat,
            Message::Ack => Kind::Ack,
        }
    }

    /// The length of this message's frame (header and payload).
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN
            + match self {
                Message::Hello { .. } => HELLO_LEN,
                Message::Flows(f) | Message::Snapshot(f) => f.len() * RECORD_LEN,
                Message::SnapshotEnd { .. } => 8,
                Message::Heartbeat | Message::Ack => 0,
            }
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub sent_ns: u64,
    pub msg: Message<'static>,
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

fn exactly(buf: &[u8], n: usize) -> Result<(), WireError> {
    need(buf, n)?;
    if buf.len() > n {
        return Err(WireError::Trailing(buf.len() - n));
    }
    Ok(())
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The 16-byte address at `at`.
fn addr_at(b: &[u8], at: usize) -> Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Addr::from_octets(a)
}

fn raw4(b: &[u8], at: usize) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    a
}

/// Checks magic and version, the first 5 bytes of everything either side writes.
fn check_magic(buf: &[u8], magic: [u8; 4]) -> Result<(), WireError> {
    let got = raw4(buf, 0);
    if got != magic {
        return Err(WireError::BadMagic(got));
    }
    if buf[4] != VERSION {
        return Err(WireError::BadVersion(buf[4]));
    }
    Ok(())
}

/// Append `msg`'s frame to `out`. `msg` must hold at most [`MAX_FLOWS_PER_FRAME`] flows; callers
/// split larger batches (`noise::Session::seal` checks).
pub fn encode_frame(sent_ns: u64, msg: &Message<'_>, out: &mut Vec<u8>) {
    out.reserve(msg.frame_len());
    out.push(msg.kind() as u8);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&sent_ns.to_be_bytes());
    match msg {
        Message::Hello {
            node_id,
            listen_port,
        } => {
            out.extend_from_slice(&node_id.to_be_bytes());
            out.extend_from_slice(&listen_port.to_be_bytes());
        }
        Message::Flows(flows) | Message::Snapshot(flows) => {
            for f in flows.iter() {
                // Already network order in memory: native-endian bytes are the wire bytes.
                out.extend_from_slice(&f.flow.src_addr.octets());
                out.extend_from_slice(&f.flow.dst_addr.octets());
                out.extend_from_slice(&f.flow.src_port.to_ne_bytes());
                out.extend_from_slice(&f.flow.dst_port.to_ne_bytes());
                out.push(f.flow.proto);
                out.extend_from_slice(&[0; 3]);
                out.extend_from_slice(&f.backend_addr.octets());
            }
        }
        Message::SnapshotEnd { total } => out.extend_from_slice(&total.to_be_bytes()),
        Message::Heartbeat | Message::Ack => {}
    }
}

/// Decode one whole frame (a data record's plaintext).
pub fn decode_frame(buf: &[u8]) -> Result<Frame, WireError> {
    need(buf, FRAME_HEADER_LEN)?;
    let kind = Kind::from_u8(buf[0])?;
    if buf[1..4] != [0; 3] {
        return Err(WireError::Reserved);
    }
    let sent_ns = be_u64(buf, 4);
    let payload = &buf[FRAME_HEADER_LEN..];
    if !kind.payload_len_ok(payload.len()) {
        return Err(WireError::BadPayloadLength {
            kind,
            len: payload.len(),
        });
    }
    let msg = match kind {
        Kind::Hello => Message::Hello {
            node_id: be_u64(payload, 0),
            listen_port: u16::from_be_bytes([payload[8], payload[9]]),
        },
        Kind::Flows => Message::Flows(Cow::Owned(decode_records(payload)?)),
        Kind::Snapshot => Message::Snapshot(Cow::Owned(decode_records(payload)?)),
        Kind::SnapshotEnd => Message::SnapshotEnd {
            total: be_u64(payload, 0),
        },
        Kind::Heartbeat => Message::Heartbeat,
        Kind::Ack => Message::Ack,
    };
    Ok(Frame { sent_ns, msg })
}

fn decode_records(payload: &[u8]) -> Result<Vec<FlowEvent>, WireError> {
    let mut flows = Vec::with_capacity(payload.len() / RECORD_LEN);
    for r in payload.chunks_exact(RECORD_LEN) {
        if r[37..40] != [0; 3] {
            return Err(WireError::Reserved);
        }
        flows.push(FlowEvent {
            flow: FlowKey {
                src_addr: addr_at(r, 0),
                dst_addr: addr_at(r, 16),
                src_port: u16::from_ne_bytes([r[32], r[33]]),
                dst_port: u16::from_ne_bytes([r[34], r[35]]),
                proto: r[36],
                _pad: [0; 3],
            },
            backend_addr: addr_at(r, 40),
        });
    }
    Ok(flows)
}

/// Append a record header for a Noise message of `len` bytes.
pub fn encode_record_header(rtype: RecordType, len: usize, seq: u64, out: &mut Vec<u8>) {
    debug_assert!(len <= NOISE_MAX_MSG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(rtype as u8);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
}

/// Decode and validate the first [`RECORD_HEADER_LEN`] bytes of `buf`, including the length
/// against the type's limits, so a reader knows how much more to read.
pub fn decode_record_header(buf: &[u8]) -> Result<RecordHeader, WireError> {
    need(buf, RECORD_HEADER_LEN)?;
    check_magic(buf, MAGIC)?;
    let rtype = match buf[5] {
        1 => RecordType::Handshake,
        2 => RecordType::Data,
        other => return Err(WireError::UnknownRecordType(other)),
    };
    let len = usize::from(u16::from_be_bytes([buf[6], buf[7]]));
    let seq = be_u64(buf, 8);
    let len_ok = match rtype {
        RecordType::Handshake => len == HANDSHAKE_MSG_LEN,
        RecordType::Data => len >= MIN_DATA_MSG_LEN,
    };
    if !len_ok {
        return Err(WireError::BadRecordLength { rtype, len });
    }
    if rtype == RecordType::Handshake && seq != 0 {
        return Err(WireError::HandshakeSequence(seq));
    }
    Ok(RecordHeader { rtype, len, seq })
}

/// One complete record, split into its header and Noise message (nothing checked but the
/// format).
pub fn split_record(buf: &[u8]) -> Result<(RecordHeader, &[u8]), WireError> {
    let header = decode_record_header(buf)?;
    exactly(buf, RECORD_HEADER_LEN + header.len)?;
    Ok((header, &buf[RECORD_HEADER_LEN..]))
}

pub fn encode_preamble(challenge: &Challenge) -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[..4].copy_from_slice(&PREAMBLE_MAGIC);
    out[4] = VERSION;
    out[8..].copy_from_slice(challenge);
    out
}

/// The challenge of a preamble; [`WireError::BadVersion`] for a peer of another version.
pub fn decode_preamble(buf: &[u8]) -> Result<Challenge, WireError> {
    exactly(buf, PREAMBLE_LEN)?;
    check_magic(buf, PREAMBLE_MAGIC)?;
    if buf[5..8] != [0; 3] {
        return Err(WireError::Reserved);
    }
    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge.copy_from_slice(&buf[8..]);
    Ok(challenge)
}

/// What a sender writes to a receiver of another version before it closes: the record magic and
/// this version, zero-padded to the length of a version-1 frame header, which a version-1
/// receiver reads whole and rejects with "unsupported version 2". (A version-2 receiver rejects
/// it as an unknown record type; it never gets one, since it sent a version-2 preamble.)
pub fn version_notice() -> [u8; VERSION_NOTICE_LEN] {
    let mut out = [0u8; VERSION_NOTICE_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out
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
                src_addr: Addr::from_v4((0x0a6f_0002u32.wrapping_add(i >> 16)).to_be()),
                dst_addr: Addr::from_v4(0x0a6f_6401u32.to_be()),
                src_port: ((i & 0xffff) as u16).to_be(),
                dst_port: 80u16.to_be(),
                proto: 6,
                _pad: [0; 3],
            },
            backend_addr: Addr::from_v4((0x0a6f_010bu32 + i % 3).to_be()),
        }
    }

    /// An IPv6 flow: client fd11:1::N, VIP fd11:100::1, backend fd11:2::11.
    pub(crate) fn flow6(i: u16) -> FlowEvent {
        let a = |s: &str| Addr::from(s.parse::<std::net::Ipv6Addr>().unwrap());
        FlowEvent {
            flow: FlowKey {
                src_addr: a(&format!("fd11:1::{i:x}")),
                dst_addr: a("fd11:100::1"),
                src_port: i.to_be(),
                dst_port: 443u16.to_be(),
                proto: 6,
                _pad: [0; 3],
            },
            backend_addr: a("fd11:2::11"),
        }
    }

    pub(crate) fn samples() -> Vec<Message<'static>> {
        let flows: Vec<FlowEvent> = (0..37).map(flow).chain((1..4).map(flow6)).collect();
        let full: Vec<FlowEvent> = (0..MAX_FLOWS_PER_FRAME as u32).map(flow).collect();
        vec![
            Message::Hello {
                node_id: 0x1122_3344_5566_7788,
                listen_port: 7946,
            },
            Message::Flows(Cow::Owned(flows.clone())),
            Message::Flows(Cow::Owned(full)),
            Message::Flows(Cow::Owned(Vec::new())),
            Message::Snapshot(Cow::Owned(flows)),
            Message::SnapshotEnd { total: 123_456 },
            Message::Heartbeat,
            Message::Ack,
        ]
    }

    fn frame(msg: &Message<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(1_700_000_000_123_456_789, msg, &mut out);
        assert_eq!(out.len(), msg.frame_len());
        out
    }

    #[test]
    fn round_trip_every_kind() {
        let mut seen = Vec::new();
        for msg in samples() {
            let buf = frame(&msg);
            let f = decode_frame(&buf).unwrap();
            assert_eq!(f.sent_ns, 1_700_000_000_123_456_789);
            assert_eq!(f.msg, msg);
            seen.push(msg.kind());
        }
        for k in Kind::ALL {
            assert!(seen.contains(&k), "{k} not covered");
        }
    }

    #[test]
    fn the_largest_frame_fits_one_noise_message() {
        let full = samples().swap_remove(2);
        assert_eq!(full.frame_len(), FRAME_HEADER_LEN + MAX_PAYLOAD);
        assert!(full.frame_len() + NOISE_TAG_LEN <= NOISE_MAX_MSG_LEN);
        // One more record would not.
        assert!(full.frame_len() + RECORD_LEN + NOISE_TAG_LEN > NOISE_MAX_MSG_LEN);
    }

    #[test]
    fn record_layout_is_network_order() {
        let f = flow(0x0001_0203);
        let buf = frame(&Message::Flows(Cow::Owned(vec![f])));
        let r = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + RECORD_LEN];
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        assert_eq!(&r[0..12], &mapped);
        assert_eq!(&r[12..16], &[10, 111, 0, 3]);
        assert_eq!(&r[16..28], &mapped);
        assert_eq!(&r[28..32], &[10, 111, 100, 1]);
        assert_eq!(&r[32..34], &[0x02, 0x03]);
        assert_eq!(&r[34..36], &[0, 80]);
        assert_eq!(&r[36..40], &[6, 0, 0, 0]);
        assert_eq!(&r[40..52], &mapped);
        assert_eq!(&r[52..56], &[10, 111, 1, 11 + (0x0001_0203 % 3) as u8]);
        // An IPv6 flow: its addresses as on the wire.
        let buf = frame(&Message::Flows(Cow::Owned(vec![flow6(0x12)])));
        let r = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + RECORD_LEN];
        assert_eq!(
            &r[0..16],
            &"fd11:1::12".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(
            &r[16..32],
            &"fd11:100::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(
            &r[40..56],
            &"fd11:2::11".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        let mut h = Vec::new();
        encode_record_header(RecordType::Data, 300, 0x0102_0304_0506_0708, &mut h);
        assert_eq!(h, b"XLBS\x03\x02\x01\x2c\x01\x02\x03\x04\x05\x06\x07\x08");
    }

    /// A frame's length is the record's (which the tag covers), so a cut frame is only ever a
    /// shorter frame of whole flow records or an error, never a misread; preambles and records
    /// cut anywhere are errors.
    #[test]
    fn truncated_at_every_offset_is_rejected() {
        for msg in samples() {
            let buf = frame(&msg);
            for cut in 0..buf.len() {
                let Ok(f) = decode_frame(&buf[..cut]) else {
                    continue;
                };
                let (Message::Flows(got) | Message::Snapshot(got)) = &f.msg else {
                    panic!("{} cut at {cut} decoded as {:?}", msg.kind(), f.msg);
                };
                let (Message::Flows(all) | Message::Snapshot(all)) = &msg else {
                    unreachable!("only flow frames decode when cut");
                };
                assert_eq!(f.msg.kind(), msg.kind());
                assert_eq!(&all[..got.len()], &got[..]);
                assert_eq!(cut, FRAME_HEADER_LEN + got.len() * RECORD_LEN);
            }
        }
        let p = encode_preamble(&[7; CHALLENGE_LEN]);
        assert_eq!(decode_preamble(&p), Ok([7; CHALLENGE_LEN]));
        for cut in 0..p.len() {
            assert!(decode_preamble(&p[..cut]).is_err());
        }
        let mut record = Vec::new();
        encode_record_header(RecordType::Handshake, HANDSHAKE_MSG_LEN, 0, &mut record);
        record.extend_from_slice(&[0x5a; HANDSHAKE_MSG_LEN]);
        assert!(split_record(&record).is_ok());
        for cut in 0..record.len() {
            assert!(split_record(&record[..cut]).is_err(), "cut at {cut}");
        }
        record.push(0);
        assert_eq!(split_record(&record), Err(WireError::Trailing(1)));
    }

    #[test]
    fn header_fields_are_checked() {
        let mut good = Vec::new();
        encode_record_header(RecordType::Data, MIN_DATA_MSG_LEN, 5, &mut good);
        assert_eq!(
            decode_record_header(&good),
            Ok(RecordHeader {
                rtype: RecordType::Data,
                len: MIN_DATA_MSG_LEN,
                seq: 5
            })
        );
        let mut b = good.clone();
        b[0] = b'Y';
        assert!(matches!(
            decode_record_header(&b),
            Err(WireError::BadMagic(_))
        ));
        let mut b = good.clone();
        b[4] = 1;
        assert_eq!(decode_record_header(&b), Err(WireError::BadVersion(1)));
        for t in [0u8, 3, 255] {
            let mut b = good.clone();
            b[5] = t;
            assert_eq!(
                decode_record_header(&b),
                Err(WireError::UnknownRecordType(t))
            );
        }
        // Too short for a data record.
        let mut b = good.clone();
        b[6..8].copy_from_slice(&(MIN_DATA_MSG_LEN as u16 - 1).to_be_bytes());
        assert!(matches!(
            decode_record_header(&b),
            Err(WireError::BadRecordLength { .. })
        ));
        // Handshake records: exactly one length, sequence 0.
        let mut h = Vec::new();
        encode_record_header(RecordType::Handshake, HANDSHAKE_MSG_LEN + 1, 0, &mut h);
        assert!(decode_record_header(&h).is_err());
        let mut h = Vec::new();
        encode_record_header(RecordType::Handshake, HANDSHAKE_MSG_LEN, 1, &mut h);
        assert_eq!(
            decode_record_header(&h),
            Err(WireError::HandshakeSequence(1))
        );
        // Frames: kind, reserved bytes, payload lengths.
        for kind in [0u8, 7, 255] {
            let mut f = frame(&Message::Heartbeat);
            f[0] = kind;
            assert_eq!(decode_frame(&f), Err(WireError::UnknownKind(kind)));
        }
        let mut f = frame(&Message::Heartbeat);
        f[2] = 1;
        assert_eq!(decode_frame(&f), Err(WireError::Reserved));
        let mut f = frame(&Message::Flows(Cow::Owned(vec![flow(1)])));
        f[FRAME_HEADER_LEN + 38] = 1;
        assert_eq!(decode_frame(&f), Err(WireError::Reserved));
        let mut f = frame(&Message::Heartbeat);
        f.push(0);
        assert!(matches!(
            decode_frame(&f),
            Err(WireError::BadPayloadLength { .. })
        ));
        let mut f = frame(&Message::Flows(Cow::Owned(vec![flow(1)])));
        f.pop();
        assert!(decode_frame(&f).is_err());
        let mut f = frame(&Message::Flows(Cow::Owned(Vec::new())));
        f.resize(FRAME_HEADER_LEN + MAX_PAYLOAD + RECORD_LEN, 0);
        assert!(decode_frame(&f).is_err());
    }

    /// Version 1's challenge and frame header, byte for byte as version 1 wrote them.
    fn version1_challenge() -> Vec<u8> {
        [b"XLBC\x01\0\0\0".as_slice(), &[9; 16]].concat()
    }

    #[test]
    fn other_versions_are_named_not_misparsed() {
        // A version-1 receiver's challenge, read by this sender.
        assert_eq!(
            decode_preamble(&version1_challenge()),
            Err(WireError::BadVersion(1))
        );
        let e = WireError::BadVersion(1).to_string();
        assert!(e.contains("version 1 (this node speaks 3)"), "{e}");
        // A version-2 receiver's preamble (the same layout, version 2): named too.
        let mut v2 = encode_preamble(&[1; CHALLENGE_LEN]);
        v2[4] = 2;
        assert_eq!(decode_preamble(&v2), Err(WireError::BadVersion(2)));
        // This receiver's preamble, as a version-1 sender reads it: its first 5 bytes are
        // magic `XLBC` and the version, where version 1 looked for them, in 24 bytes.
        let p = encode_preamble(&[1; CHALLENGE_LEN]);
        assert_eq!(p.len(), version1_challenge().len());
        assert_eq!(&p[..5], b"XLBC\x03");
        // The notice a sender writes to an older receiver: a version-1 frame header's length
        // (36), magic `XLBS` and version 3 where versions 1 and 2 read them.
        let n = version_notice();
        assert_eq!(n.len(), 36);
        assert_eq!(&n[..5], b"XLBS\x03");
        // A version-1 Hello frame sent to this receiver: the version, not garbage.
        let v1_hello = [b"XLBS\x01\x01\0\0".as_slice(), &[0; 28]].concat();
        assert_eq!(
            decode_record_header(&v1_hello),
            Err(WireError::BadVersion(1))
        );
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid = frame(&Message::Flows(Cow::Owned((0..4).map(flow).collect())));
        let mut header = Vec::new();
        encode_record_header(
            RecordType::Data,
            valid.len() + NOISE_TAG_LEN,
            3,
            &mut header,
        );
        let valid_record = [header, valid.clone(), vec![0; NOISE_TAG_LEN]].concat();
        for round in 0..20_000 {
            let len = (rng.next() % 200) as usize;
            let buf: Vec<u8> = match round % 3 {
                0 => (0..len).map(|_| rng.next() as u8).collect(),
                // Mutations of valid input reach deeper than pure noise.
                r => {
                    let mut b = if r == 1 {
                        valid.clone()
                    } else {
                        valid_record.clone()
                    };
                    for _ in 0..1 + rng.next() % 4 {
                        let at = (rng.next() as usize) % b.len();
                        b[at] = rng.next() as u8;
                    }
                    b.truncate((rng.next() as usize) % (b.len() + 1));
                    b
                }
            };
            let _ = decode_frame(&buf);
            let _ = decode_record_header(&buf);
            let _ = split_record(&buf);
            let _ = decode_preamble(&buf);
        }
    }
}
