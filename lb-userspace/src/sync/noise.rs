//! The cryptography of peer sync: a Noise handshake per connection, then encrypted records, with
//! the `snow` crate (the record layout is in `wire.rs`).
//!
//! **Pattern: `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`.** Both sides send a fresh ephemeral X25519
//! key, and the pre-shared key (from `--sync-key-file`, see `key.rs`) is mixed in before the
//! first message:
//!
//! ```text
//! prologue: the receiver's preamble (magic, version, this connection's random challenge)
//! -> psk, e        sender (initiator) → receiver (responder)
//! <- e, ee         receiver → sender
//! ```
//!
//! - **Confidentiality**: every frame after the handshake is ChaCha20-Poly1305 under keys from the
//!   ephemeral-ephemeral Diffie-Hellman and the PSK. The handshake keys are fresh for each
//!   connection and forgotten when it ends, so a recorded session stays unreadable even to
//!   someone who later steals the key file (forward secrecy); to read a live one, an attacker
//!   needs the key *and* must sit in the middle of the handshake.
//! - **Authentication, both ways**: message 1's tag is made with the PSK, so a receiver rejects a
//!   sender without the key at the first message, before any Diffie-Hellman work; message 2
//!   decrypts only for the holder of the PSK, so a sender never sends a flow (nor asks its agent
//!   for a snapshot) to a receiver without the key.
//! - **Replay across connections**: the prologue holds the receiver's fresh challenge, so a
//!   message 1 recorded from another connection fails at once; and everything after it is
//!   encrypted under keys that depend on both sides' fresh ephemeral keys.
//! - **Replay, reordering, loss within a connection**: every data record carries its sequence
//!   number, which is also its Noise nonce. A receiver accepts exactly the next one; any other
//!   is rejected before decryption, and a record whose sequence was changed to the expected one
//!   does not decrypt.
//! - **Tampering**: any changed bit of a Noise message fails its Poly1305 tag.
//!
//! Why this pattern: the one shared key stays the only secret operators manage (XX or KK would
//! add a static key pair per node and the peers' public keys to configure), and TLS 1.3 in
//! rustls has no external-PSK mode, so it would need certificates. NN with `psk0` rather than
//! `psk2` so that a receiver rejects a keyless connection at its first message without
//! computing anything expensive. ChaCha20-Poly1305 needs no AES instructions to be fast and
//! constant-time; BLAKE2s is the hash of Noise's reference suites.

use super::{
    key::SyncKey,
    wire::{
        self, Challenge, Frame, HANDSHAKE_MSG_LEN, MAX_FLOWS_PER_FRAME, Message, NOISE_TAG_LEN,
        RecordHeader, RecordType, WireError,
    },
};
use snow::{Builder, HandshakeState, StatelessTransportState, params::NoiseParams};

/// The Noise protocol name (see the module docs).
pub const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("malformed record: {0}")]
    Malformed(#[from] WireError),
    #[error("a {got} record where a {expected} record was expected")]
    UnexpectedRecord {
        got: RecordType,
        expected: RecordType,
    },
    #[error(
        "handshake failed: the peer does not have this node's sync key, or sent a message made for another connection"
    )]
    Handshake,
    #[error("replayed or out-of-order record: sequence {got}, expected {expected}")]
    Sequence { got: u64, expected: u64 },
    #[error("the record does not decrypt (tampered, or not made for this connection)")]
    Decrypt,
    #[error("a frame holds at most {MAX_FLOWS_PER_FRAME} flows, not {0}")]
    TooManyFlows(usize),
    #[error("Noise: {0}")]
    Noise(#[source] snow::Error),
    #[error("no randomness from the operating system: {0}")]
    Random(getrandom::Error),
}

/// A fresh random challenge for an accepted connection.
pub fn new_challenge() -> Result<Challenge, NoiseError> {
    let mut c = [0u8; wire::CHALLENGE_LEN];
    getrandom::getrandom(&mut c).map_err(NoiseError::Random)?;
    Ok(c)
}

/// A handshake state for this connection: the PSK at position 0, the receiver's preamble as the
/// prologue.
fn handshake(
    key: &SyncKey,
    challenge: &Challenge,
    initiator: bool,
) -> Result<HandshakeState, NoiseError> {
    let params: NoiseParams = PATTERN.parse().map_err(NoiseError::Noise)?;
    let prologue = wire::encode_preamble(challenge);
    let builder = Builder::new(params)
        .psk(0, key.psk())
        .and_then(|b| b.prologue(&prologue))
        .map_err(NoiseError::Noise)?;
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
    .map_err(NoiseError::Noise)
}

/// Write this side's handshake message into a handshake record appended to `out`.
fn write_handshake(hs: &mut HandshakeState, out: &mut Vec<u8>) -> Result<(), NoiseError> {
    let mut msg = [0u8; HANDSHAKE_MSG_LEN];
    let n = hs.write_message(&[], &mut msg).map_err(NoiseError::Noise)?;
    wire::encode_record_header(RecordType::Handshake, n, 0, out);
    out.extend_from_slice(&msg[..n]);
    Ok(())
}

/// Read the peer's handshake message (`header` decoded from its record, `msg` the rest).
fn read_handshake(
    hs: &mut HandshakeState,
    header: &RecordHeader,
    msg: &[u8],
) -> Result<(), NoiseError> {
    expect(header, RecordType::Handshake, msg)?;
    // Both messages carry an empty payload: only the tag, which fails without the PSK.
    hs.read_message(msg, &mut [])
        .map(|_| ())
        .map_err(|_| NoiseError::Handshake)
}

fn expect(header: &RecordHeader, rtype: RecordType, msg: &[u8]) -> Result<(), NoiseError> {
    if header.rtype != rtype {
        return Err(NoiseError::UnexpectedRecord {
            got: header.rtype,
            expected: rtype,
        });
    }
    if msg.len() != header.len {
        return Err(WireError::Truncated {
            need: header.len,
            have: msg.len(),
        }
        .into());
    }
    Ok(())
}

/// The sender's side of the handshake, between its message 1 and the receiver's message 2.
pub struct Initiator {
    hs: HandshakeState,
}

impl Initiator {
    /// Begin the handshake with a receiver whose preamble carried `challenge`: message 1, as a
    /// handshake record, is appended to `out`.
    pub fn start(
        key: &SyncKey,
        challenge: &Challenge,
        out: &mut Vec<u8>,
    ) -> Result<Self, NoiseError> {
        let mut hs = handshake(key, challenge, true)?;
        write_handshake(&mut hs, out)?;
        Ok(Initiator { hs })
    }

    /// Read the receiver's message 2. Success proves that the receiver has the key.
    pub fn finish(mut self, header: &RecordHeader, msg: &[u8]) -> Result<Session, NoiseError> {
        read_handshake(&mut self.hs, header, msg)?;
        Session::new(self.hs)
    }
}

/// The receiver's side of the handshake: read message 1 of the connection whose preamble
/// carried `challenge` and append message 2, as a handshake record, to `out`. Fails, with nothing
/// written, if the sender does not have the key or the message was made for another connection.
pub fn respond(
    key: &SyncKey,
    challenge: &Challenge,
    header: &RecordHeader,
    msg: &[u8],
    out: &mut Vec<u8>,
) -> Result<Session, NoiseError> {
    let mut hs = handshake(key, challenge, false)?;
    read_handshake(&mut hs, header, msg)?;
    write_handshake(&mut hs, out)?;
    Session::new(hs)
}

/// One side of an established connection: seals outgoing frames into data records and opens
/// incoming ones, each direction with its own key and sequence.
pub struct Session {
    transport: StatelessTransportState,
    next_send: u64,
    next_recv: u64,
    /// The frame being sealed or opened (up to 64 KiB, reused).
    plain: Vec<u8>,
}

impl Session {
    fn new(hs: HandshakeState) -> Result<Self, NoiseError> {
        Ok(Session {
            transport: hs
                .into_stateless_transport_mode()
                .map_err(NoiseError::Noise)?,
            next_send: 0,
            next_recv: 0,
            plain: Vec::new(),
        })
    }

    /// Append one data record carrying `msg` to `out` (nothing on error).
    pub fn seal(
        &mut self,
        msg: &Message<'_>,
        sent_ns: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), NoiseError> {
        if let Message::Flows(f) | Message::Snapshot(f) = msg
            && f.len() > MAX_FLOWS_PER_FRAME
        {
            return Err(NoiseError::TooManyFlows(f.len()));
        }
        self.plain.clear();
        wire::encode_frame(sent_ns, msg, &mut self.plain);
        let len = self.plain.len() + NOISE_TAG_LEN;
        let start = out.len();
        wire::encode_record_header(RecordType::Data, len, self.next_send, out);
        let at = out.len();
        out.resize(at + len, 0);
        match self
            .transport
            .write_message(self.next_send, &self.plain, &mut out[at..])
        {
            Ok(_) => {
                self.next_send += 1;
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(NoiseError::Noise(e))
            }
        }
    }

    /// Authenticate, decrypt and decode one data record (`header` decoded from it, `msg` the
    /// rest). On `Err` the connection must be closed: the sequence does not advance, so no later
    /// record of it can be accepted anyway.
    pub fn open(&mut self, header: &RecordHeader, msg: &[u8]) -> Result<Frame, NoiseError> {
        expect(header, RecordType::Data, msg)?;
        if header.seq != self.next_recv {
            return Err(NoiseError::Sequence {
                got: header.seq,
                expected: self.next_recv,
            });
        }
        self.plain.resize(msg.len() - NOISE_TAG_LEN, 0);
        let n = self
            .transport
            .read_message(self.next_recv, msg, &mut self.plain)
            .map_err(|_| NoiseError::Decrypt)?;
        let frame = wire::decode_frame(&self.plain[..n])?;
        self.next_recv += 1;
        Ok(frame)
    }

    /// Convenience for one complete record in a buffer (the tests' way in; the connection tasks
    /// read header and message separately).
    #[cfg(test)]
    pub(crate) fn open_record(&mut self, record: &[u8]) -> Result<Frame, NoiseError> {
        let (header, msg) = wire::split_record(record)?;
        self.open(&header, msg)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sync::wire::{
        RECORD_HEADER_LEN, decode_record_header,
        tests::{Rng, flow, samples},
    };
    use std::borrow::Cow;

    fn key(s: &str) -> SyncKey {
        SyncKey::from_bytes(s.as_bytes()).unwrap()
    }

    /// A whole handshake in memory: (sender's session, receiver's session).
    pub(crate) fn pair(
        sender_key: &SyncKey,
        receiver_key: &SyncKey,
    ) -> Result<(Session, Session), NoiseError> {
        let c = new_challenge().unwrap();
        let mut m1 = Vec::new();
        let init = Initiator::start(sender_key, &c, &mut m1)?;
        let (h1, b1) = wire::split_record(&m1)?;
        let mut m2 = Vec::new();
        let rx = respond(receiver_key, &c, &h1, b1, &mut m2)?;
        let (h2, b2) = wire::split_record(&m2)?;
        Ok((init.finish(&h2, b2)?, rx))
    }

    fn sealed(s: &mut Session, msg: &Message<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        s.seal(msg, 5, &mut out).unwrap();
        out
    }

    fn flows(i: u32) -> Message<'static> {
        Message::Flows(Cow::Owned(vec![flow(i)]))
    }

    #[test]
    fn round_trip_every_kind_both_ways() {
        let k = key("0123456789abcdef-shared");
        let (mut tx, mut rx) = pair(&k, &k).unwrap();
        for (i, msg) in samples().into_iter().enumerate() {
            let rec = sealed(&mut tx, &msg);
            let h = decode_record_header(&rec).unwrap();
            assert_eq!((h.rtype, h.seq), (RecordType::Data, i as u64));
            assert_eq!(
                rec.len(),
                RECORD_HEADER_LEN + msg.frame_len() + NOISE_TAG_LEN
            );
            let f = rx.open_record(&rec).unwrap();
            assert_eq!((f.sent_ns, f.msg), (5, msg));
        }
        // The other direction has its own key and sequence.
        let ack = sealed(&mut rx, &Message::Ack);
        assert_eq!(decode_record_header(&ack).unwrap().seq, 0);
        assert_eq!(tx.open_record(&ack).unwrap().msg, Message::Ack);
        // A record cannot be reflected back to its sender.
        let hb = sealed(&mut tx, &Message::Heartbeat);
        let mut reflected = hb.clone();
        reflected[8..16].copy_from_slice(&1u64.to_be_bytes());
        assert!(matches!(
            tx.open_record(&reflected),
            Err(NoiseError::Decrypt)
        ));
    }

    #[test]
    fn flows_are_not_in_clear() {
        let k = key("0123456789abcdef-shared");
        let (mut tx, _) = pair(&k, &k).unwrap();
        let f = flow(0x0001_0203);
        let rec = sealed(&mut tx, &Message::Flows(Cow::Owned(vec![f])));
        let mut plain = Vec::new();
        wire::encode_frame(5, &Message::Flows(Cow::Owned(vec![f])), &mut plain);
        let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        // The plaintext has the client address and the port pair; the record has neither.
        let client = f.flow.src_addr.octets();
        let ports = [f.flow.src_port.to_ne_bytes(), f.flow.dst_port.to_ne_bytes()].concat();
        assert!(find(&plain, &client) && find(&plain, &ports));
        assert!(!find(&rec, &client), "client address in clear");
        assert!(!find(&rec, &ports), "port pair in clear");
    }

    #[test]
    fn wrong_key_is_rejected_at_the_handshake() {
        let (a, b) = (
            key("0123456789abcdef-shared"),
            key("0123456789abcdef-other"),
        );
        // The receiver rejects message 1 and writes nothing.
        let c = new_challenge().unwrap();
        let mut m1 = Vec::new();
        Initiator::start(&a, &c, &mut m1).unwrap();
        let (h1, b1) = wire::split_record(&m1).unwrap();
        let mut m2 = Vec::new();
        let err = respond(&b, &c, &h1, b1, &mut m2).err().unwrap();
        assert!(matches!(err, NoiseError::Handshake), "{err}");
        assert!(m2.is_empty());
        assert!(
            err.to_string()
                .contains("does not have this node's sync key")
        );
        assert!(matches!(pair(&a, &b), Err(NoiseError::Handshake)));
        // The sender rejects a message 2 from a receiver without the key: the receiver here
        // answers a message 1 of its own, made with its key for the same challenge.
        let init = Initiator::start(&a, &c, &mut Vec::new()).unwrap();
        let mut own = Vec::new();
        Initiator::start(&b, &c, &mut own).unwrap();
        let (oh, ob) = wire::split_record(&own).unwrap();
        let mut m2 = Vec::new();
        respond(&b, &c, &oh, ob, &mut m2).unwrap();
        let (h2, b2) = wire::split_record(&m2).unwrap();
        assert!(matches!(init.finish(&h2, b2), Err(NoiseError::Handshake)));
    }

    #[test]
    fn handshake_is_bound_to_the_connection() {
        let k = key("0123456789abcdef-shared");
        let old = new_challenge().unwrap();
        let mut m1 = Vec::new();
        Initiator::start(&k, &old, &mut m1).unwrap();
        let (h1, b1) = wire::split_record(&m1).unwrap();
        let new = new_challenge().unwrap();
        assert_ne!(old, new);
        // Message 1 recorded from one connection, replayed into another.
        assert!(matches!(
            respond(&k, &new, &h1, b1, &mut Vec::new()),
            Err(NoiseError::Handshake)
        ));
        // Every flipped bit of message 1 is noticed.
        for bit in 0..b1.len() * 8 {
            let mut m = b1.to_vec();
            m[bit / 8] ^= 1 << (bit % 8);
            assert!(
                respond(&k, &old, &h1, &m, &mut Vec::new()).is_err(),
                "bit {bit}"
            );
        }
        // A data record where a handshake is due, and the other way round.
        let (mut tx, mut rx) = pair(&k, &k).unwrap();
        let rec = sealed(&mut tx, &Message::Heartbeat);
        let (h, b) = wire::split_record(&rec).unwrap();
        assert!(matches!(
            respond(&k, &old, &h, b, &mut Vec::new()),
            Err(NoiseError::UnexpectedRecord { .. })
        ));
        assert!(matches!(
            rx.open(&h1, b1),
            Err(NoiseError::UnexpectedRecord { .. })
        ));
    }

    #[test]
    fn tampered_ciphertext_is_rejected() {
        let k = key("0123456789abcdef-shared");
        let (mut tx, mut rx) = pair(&k, &k).unwrap();
        let rec = sealed(
            &mut tx,
            &Message::Flows(Cow::Owned((0..3).map(flow).collect())),
        );
        for at in RECORD_HEADER_LEN..rec.len() {
            let mut bad = rec.clone();
            bad[at] ^= 0x01;
            assert!(
                matches!(rx.open_record(&bad), Err(NoiseError::Decrypt)),
                "byte {at}"
            );
        }
        // Still the first record: the failures advanced nothing.
        rx.open_record(&rec).unwrap();
    }

    #[test]
    fn replayed_and_reordered_records_are_rejected() {
        let k = key("0123456789abcdef-shared");
        let (mut tx, mut rx) = pair(&k, &k).unwrap();
        let recs: Vec<Vec<u8>> = (0..4).map(|i| sealed(&mut tx, &flows(i))).collect();
        rx.open_record(&recs[0]).unwrap();
        rx.open_record(&recs[1]).unwrap();
        // Replayed.
        let err = rx.open_record(&recs[1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "replayed or out-of-order record: sequence 1, expected 2"
        );
        // Reordered: the fourth before the third.
        assert!(matches!(
            rx.open_record(&recs[3]),
            Err(NoiseError::Sequence {
                got: 3,
                expected: 2
            })
        ));
        // A replay whose clear sequence was set to the expected one does not decrypt.
        let mut relabelled = recs[1].clone();
        relabelled[8..16].copy_from_slice(&2u64.to_be_bytes());
        assert!(matches!(
            rx.open_record(&relabelled),
            Err(NoiseError::Decrypt)
        ));
        rx.open_record(&recs[2]).unwrap();
        rx.open_record(&recs[3]).unwrap();
        // A record from another session of the same two keys, at the right sequence.
        let (mut tx2, _) = pair(&k, &k).unwrap();
        for i in 0..4 {
            sealed(&mut tx2, &flows(i));
        }
        let other = sealed(&mut tx2, &flows(4));
        assert!(matches!(rx.open_record(&other), Err(NoiseError::Decrypt)));
    }

    #[test]
    fn truncated_records_at_every_offset_never_panic() {
        let k = key("0123456789abcdef-shared");
        let (mut tx, mut rx) = pair(&k, &k).unwrap();
        let msgs = samples();
        let recs: Vec<Vec<u8>> = msgs.iter().map(|m| sealed(&mut tx, m)).collect();
        for (i, rec) in recs.iter().enumerate() {
            // The full 3275-flow record is 64 KiB; every offset of it is still quick.
            for cut in 0..rec.len() {
                assert!(
                    rx.open_record(&rec[..cut]).is_err(),
                    "record {i} cut at {cut}"
                );
                // Header and a short message, as a reader that trusted the header would pass.
                if let Ok(h) = decode_record_header(&rec[..cut]) {
                    assert!(rx.open(&h, &rec[RECORD_HEADER_LEN..cut]).is_err());
                }
            }
            assert_eq!(rx.open_record(rec).unwrap().msg, msgs[i]);
        }
        // Handshake records cut anywhere.
        let c = new_challenge().unwrap();
        let mut m1 = Vec::new();
        Initiator::start(&k, &c, &mut m1).unwrap();
        for cut in 0..m1.len() {
            let r = wire::split_record(&m1[..cut]);
            assert!(r.is_err());
            if let Ok(h) = decode_record_header(&m1[..cut]) {
                assert!(respond(&k, &c, &h, &m1[RECORD_HEADER_LEN..cut], &mut Vec::new()).is_err());
            }
        }
    }

    #[test]
    fn random_records_never_panic_and_never_open() {
        let k = key("0123456789abcdef-shared");
        let (mut tx, mut rx) = pair(&k, &k).unwrap();
        let valid = sealed(&mut tx, &flows(1));
        let c = new_challenge().unwrap();
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for round in 0..5_000 {
            let mut b = if round % 2 == 0 {
                let len = (rng.next() % 120) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                valid.clone()
            };
            // Keep the header plausible half the time so the cipher is reached.
            if round % 4 == 1 {
                for _ in 0..1 + rng.next() % 3 {
                    let at =
                        RECORD_HEADER_LEN + (rng.next() as usize) % (b.len() - RECORD_HEADER_LEN);
                    b[at] ^= (rng.next() as u8) | 1;
                }
            } else if !b.is_empty() {
                let at = (rng.next() as usize) % b.len();
                b[at] ^= (rng.next() as u8) | 1;
            }
            assert!(rx.open_record(&b).is_err(), "round {round}");
            if let Ok((h, m)) = wire::split_record(&b) {
                let _ = respond(&k, &c, &h, m, &mut Vec::new());
            }
        }
        rx.open_record(&valid).unwrap();
    }

    #[test]
    fn oversized_batches_are_refused_by_the_sealer() {
        let k = key("0123456789abcdef-shared");
        let (mut tx, _) = pair(&k, &k).unwrap();
        let many: Vec<_> = (0..MAX_FLOWS_PER_FRAME as u32 + 1).map(flow).collect();
        let mut out = Vec::new();
        assert!(matches!(
            tx.seal(&Message::Flows(Cow::Owned(many)), 0, &mut out),
            Err(NoiseError::TooManyFlows(_))
        ));
        assert!(out.is_empty());
    }
}
