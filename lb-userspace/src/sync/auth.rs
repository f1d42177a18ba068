//! Authentication and replay protection of sync frames.
//!
//! Both nodes hold the same key (`--sync-key-file`). The receiver of a connection sends a fresh
//! random 16-byte challenge as soon as it accepts; the sender then tags every frame with
//! HMAC-SHA256(key, challenge ‖ header ‖ payload). Sequences start at 1 on each connection and
//! must grow by exactly one. So:
//! - a frame made without the key fails the tag check ("bad MAC (wrong key?)");
//! - a frame replayed within its connection fails the sequence check;
//! - a frame recorded from one connection and replayed into another fails the tag check, because
//!   the new connection has a different challenge.
//!
//! The receiver checks the tag before it looks at the sequence or the payload, so nothing of an
//! unauthenticated frame except its 36-byte header is ever interpreted. Verification is
//! constant-time (`hmac`'s `verify_slice`).
//!
//! The sender authenticates the receiver too. Its second frame (AckRequest) carries a fresh random
//! 16-byte nonce; a receiver that accepted the Hello answers with an Ack holding
//! HMAC-SHA256(K_ack, challenge ‖ sender's node id ‖ nonce), where
//! K_ack = HMAC-SHA256(key, "xlb-sync ack key v1"). The sender sends no flow (and does not ask its
//! agent for a snapshot) before that Ack verified. So a node that accepts sync connections without
//! the key gets nothing, and neither does one that replays an Ack recorded from another connection
//! (other nonce). The separate key K_ack keeps Acks and frame tags apart: no frame tag a sender
//! makes, whatever challenge it was given, can serve as an Ack. Frames are authenticated, not
//! encrypted: someone who can read the traffic still sees the flows, so sync belongs on a trusted
//! network.

use super::wire::{
    self, Challenge, HEADER_LEN, Header, MAX_FLOWS_PER_FRAME, Message, Nonce, Proof, TAG_LEN,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::{fmt, path::Path, path::PathBuf};

type HmacSha256 = Hmac<Sha256>;

/// Derivation label of the key that Acks are made with (see the module docs).
const ACK_KEY_LABEL: &[u8] = b"xlb-sync ack key v1";

/// Shortest accepted key, after trimming whitespace.
pub const MIN_KEY_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading sync key file {}: {source}", path.display())]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "sync key{} is {len} bytes after trimming whitespace; at least {MIN_KEY_LEN} are needed (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
        path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
    )]
    KeyTooShort { path: Option<PathBuf>, len: usize },
    #[error("no randomness from the operating system: {0}")]
    Random(getrandom::Error),
    #[error("bad MAC (wrong key?)")]
    BadMac,
    #[error("replayed or out-of-order sequence {got}, expected {expected}")]
    Sequence { got: u64, expected: u64 },
    #[error("malformed frame: {0}")]
    Malformed(#[from] wire::WireError),
    #[error("a frame holds at most {MAX_FLOWS_PER_FRAME} flows, not {0}")]
    TooManyFlows(usize),
    #[error("the peer's Ack does not prove it has the key")]
    BadAck,
}

/// The shared sync key, kept as a keyed HMAC state so each frame only clones it, and the derived
/// key of Acks (module docs), likewise.
#[derive(Clone)]
pub struct SyncKey {
    mac: HmacSha256,
    ack: HmacSha256,
}

impl fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SyncKey(<redacted>)")
    }
}

impl SyncKey {
    /// Read the key from `path`. Leading and trailing whitespace is not part of the key (a
    /// trailing newline from `echo` or an editor must not change it).
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let bytes = std::fs::read(path).map_err(|source| AuthError::KeyFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            AuthError::KeyTooShort { len, .. } => AuthError::KeyTooShort {
                path: Some(path.to_path_buf()),
                len,
            },
            other => other,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AuthError> {
        let key = bytes.trim_ascii();
        if key.len() < MIN_KEY_LEN {
            return Err(AuthError::KeyTooShort {
                path: None,
                len: key.len(),
            });
        }
        // HMAC takes keys of any length; the error case cannot happen, but is not unwrapped.
        let too_short = |_| AuthError::KeyTooShort {
            path: None,
            len: key.len(),
        };
        let mac = <HmacSha256 as Mac>::new_from_slice(key).map_err(too_short)?;
        let mut derive = mac.clone();
        derive.update(ACK_KEY_LABEL);
        let ack = <HmacSha256 as Mac>::new_from_slice(&derive.finalize().into_bytes())
            .map_err(too_short)?;
        Ok(SyncKey { mac, ack })
    }

    fn ack_mac(&self, challenge: &Challenge, node_id: u64, nonce: &Nonce) -> HmacSha256 {
        let mut mac = self.ack.clone();
        mac.update(challenge);
        mac.update(&node_id.to_be_bytes());
        mac.update(nonce);
        mac
    }

    /// The receiver's Ack proof for the connection with `challenge`, whose Hello came from
    /// `node_id` (authenticated header) and whose AckRequest carried `nonce`.
    pub fn ack_proof(&self, challenge: &Challenge, node_id: u64, nonce: &Nonce) -> Proof {
        self.ack_mac(challenge, node_id, nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The sender's check of an Ack (constant-time).
    pub fn verify_ack(
        &self,
        challenge: &Challenge,
        node_id: u64,
        nonce: &Nonce,
        proof: &Proof,
    ) -> Result<(), AuthError> {
        self.ack_mac(challenge, node_id, nonce)
            .verify_slice(proof)
            .map_err(|_| AuthError::BadAck)
    }

    fn with_challenge(&self, challenge: &Challenge) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(challenge);
        mac
    }
}

/// A fresh random challenge for an accepted connection.
pub fn new_challenge() -> Result<Challenge, AuthError> {
    let mut c = [0u8; wire::CHALLENGE_LEN];
    getrandom::getrandom(&mut c).map_err(AuthError::Random)?;
    Ok(c)
}

/// A fresh random nonce for an outbound connection's AckRequest.
pub fn new_nonce() -> Result<Nonce, AuthError> {
    let mut n = [0u8; wire::NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(AuthError::Random)?;
    Ok(n)
}

/// A random node id (one per agent start).
pub fn random_node_id() -> Result<u64, AuthError> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(AuthError::Random)?;
    Ok(u64::from_ne_bytes(b))
}

/// Sender side of one connection: numbers and tags frames.
pub struct Sealer {
    mac: HmacSha256,
    node_id: u64,
    next_seq: u64,
}

impl Sealer {
    pub fn new(key: &SyncKey, challenge: &Challenge, node_id: u64) -> Self {
        Sealer {
            mac: key.with_challenge(challenge),
            node_id,
            next_seq: 1,
        }
    }

    /// Append one complete frame carrying `msg` to `out`.
    pub fn seal(
        &mut self,
        msg: &Message<'_>,
        sent_ns: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), AuthError> {
        if let Message::Flows(f) | Message::Snapshot(f) = msg
            && f.len() > MAX_FLOWS_PER_FRAME
        {
            return Err(AuthError::TooManyFlows(f.len()));
        }
        let start = out.len();
        wire::encode_body(self.node_id, self.next_seq, sent_ns, msg, out);
        let mut mac = self.mac.clone();
        mac.update(&out[start..]);
        out.extend_from_slice(&mac.finalize().into_bytes());
        self.next_seq += 1;
        Ok(())
    }
}

/// Receiver side of one connection: checks tags and sequence numbers.
pub struct Opener {
    mac: HmacSha256,
    expected_seq: u64,
}

impl Opener {
    pub fn new(key: &SyncKey, challenge: &Challenge) -> Self {
        Opener {
            mac: key.with_challenge(challenge),
            expected_seq: 1,
        }
    }

    /// Authenticate one frame read as its parts (`header_bytes` already decoded into `header`)
    /// and decode its payload. On `Err` the connection must be closed: the sequence is not
    /// advanced, so no later frame of it can be accepted anyway.
    pub fn open(
        &mut self,
        header: &Header,
        header_bytes: &[u8],
        payload: &[u8],
        tag: &[u8],
    ) -> Result<Message<'static>, AuthError> {
        if header_bytes.len() != HEADER_LEN || tag.len() != TAG_LEN {
            return Err(AuthError::BadMac);
        }
        let mut mac = self.mac.clone();
        mac.update(header_bytes);
        mac.update(payload);
        mac.verify_slice(tag).map_err(|_| AuthError::BadMac)?;
        if header.seq != self.expected_seq {
            return Err(AuthError::Sequence {
                got: header.seq,
                expected: self.expected_seq,
            });
        }
        let msg = wire::decode_payload(header.kind, payload)?;
        self.expected_seq += 1;
        Ok(msg)
    }

    /// Convenience for one complete frame in a buffer (the tests' way in; the receiver reads the
    /// parts separately).
    #[cfg(test)]
    pub(crate) fn open_frame(
        &mut self,
        frame: &[u8],
    ) -> Result<(Header, Message<'static>), AuthError> {
        let f = wire::split_frame(frame)?;
        let msg = self.open(&f.header, f.header_bytes, f.payload, f.tag)?;
        Ok((f.header, msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::wire::tests::flow;
    use std::borrow::Cow;

    fn key(s: &str) -> SyncKey {
        SyncKey::from_bytes(s.as_bytes()).unwrap()
    }

    fn frames(key: &SyncKey, challenge: &Challenge, n: usize) -> Vec<Vec<u8>> {
        let mut sealer = Sealer::new(key, challenge, 7);
        (0..n)
            .map(|i| {
                let mut out = Vec::new();
                let msg = if i == 0 {
                    Message::Hello { listen_port: 1 }
                } else {
                    Message::Flows(Cow::Owned(vec![flow(i as u32)]))
                };
                sealer.seal(&msg, 5, &mut out).unwrap();
                out
            })
            .collect()
    }

    #[test]
    fn good_frames_are_accepted_in_order() {
        let k = key("0123456789abcdef-shared");
        let c = new_challenge().unwrap();
        let mut opener = Opener::new(&k, &c);
        for (i, f) in frames(&k, &c, 5).iter().enumerate() {
            let (h, msg) = opener.open_frame(f).unwrap();
            assert_eq!(h.seq, i as u64 + 1);
            assert_eq!(h.node_id, 7);
            if i > 0 {
                assert_eq!(msg, Message::Flows(Cow::Owned(vec![flow(i as u32)])));
            }
        }
    }

    #[test]
    fn wrong_key_is_rejected() {
        let c = new_challenge().unwrap();
        let f = frames(&key("0123456789abcdef-other"), &c, 1);
        let mut opener = Opener::new(&key("0123456789abcdef-shared"), &c);
        let err = opener.open_frame(&f[0]).unwrap_err();
        assert!(matches!(err, AuthError::BadMac));
        assert_eq!(err.to_string(), "bad MAC (wrong key?)");
    }

    #[test]
    fn tampered_frame_is_rejected() {
        let k = key("0123456789abcdef-shared");
        let c = new_challenge().unwrap();
        let mut f = frames(&k, &c, 2);
        let last = f[1].len() - TAG_LEN - 1;
        f[1][last] ^= 1; // backend address byte
        let mut opener = Opener::new(&k, &c);
        opener.open_frame(&f[0]).unwrap();
        assert!(matches!(opener.open_frame(&f[1]), Err(AuthError::BadMac)));
    }

    #[test]
    fn replay_in_the_same_session_is_rejected() {
        let k = key("0123456789abcdef-shared");
        let c = new_challenge().unwrap();
        let f = frames(&k, &c, 3);
        let mut opener = Opener::new(&k, &c);
        opener.open_frame(&f[0]).unwrap();
        opener.open_frame(&f[1]).unwrap();
        let err = opener.open_frame(&f[1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "replayed or out-of-order sequence 2, expected 3"
        );
        // Skipping ahead is just as wrong.
        let mut opener = Opener::new(&k, &c);
        opener.open_frame(&f[0]).unwrap();
        assert!(matches!(
            opener.open_frame(&f[2]),
            Err(AuthError::Sequence {
                got: 3,
                expected: 2
            })
        ));
    }

    #[test]
    fn replay_into_a_new_session_is_rejected() {
        let k = key("0123456789abcdef-shared");
        let old = new_challenge().unwrap();
        let recorded = frames(&k, &old, 2);
        let new = new_challenge().unwrap();
        assert_ne!(old, new);
        let mut opener = Opener::new(&k, &new);
        // Even the very first frame, whose sequence would fit, fails.
        assert!(matches!(
            opener.open_frame(&recorded[0]),
            Err(AuthError::BadMac)
        ));
    }

    #[test]
    fn ack_proves_the_key_for_this_connection_only() {
        let k = key("0123456789abcdef-shared");
        let (c, n) = (new_challenge().unwrap(), new_nonce().unwrap());
        let proof = k.ack_proof(&c, 7, &n);
        k.verify_ack(&c, 7, &n, &proof).unwrap();
        // The same key loaded again (whitespace around it) agrees.
        key(" 0123456789abcdef-shared\n")
            .verify_ack(&c, 7, &n, &proof)
            .unwrap();
        let other = key("0123456789abcdef-other");
        assert!(matches!(
            other.verify_ack(&c, 7, &n, &proof),
            Err(AuthError::BadAck)
        ));
        let bad = |r: Result<(), AuthError>| assert!(matches!(r, Err(AuthError::BadAck)));
        bad(k.verify_ack(&new_challenge().unwrap(), 7, &n, &proof));
        bad(k.verify_ack(&c, 8, &n, &proof));
        bad(k.verify_ack(&c, 7, &new_nonce().unwrap(), &proof));
        let mut flipped = proof;
        flipped[31] ^= 1;
        bad(k.verify_ack(&c, 7, &n, &flipped));
        // Made with the derived key, not the frame key: not equal to a frame-style HMAC of the
        // same bytes.
        let mut frame_style = k.with_challenge(&c);
        frame_style.update(&7u64.to_be_bytes());
        frame_style.update(&n);
        let frame_style: Proof = frame_style.finalize().into_bytes().into();
        assert_ne!(frame_style, proof);
    }

    #[test]
    fn key_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "  short \n").unwrap();
        let err = SyncKey::load(&p).unwrap_err();
        assert!(err.to_string().contains("is 5 bytes"), "{err}");
        assert!(err.to_string().contains("at least 16"), "{err}");
        // Whitespace around the key does not change it.
        std::fs::write(&p, "0123456789abcdef-shared\n").unwrap();
        let a = SyncKey::load(&p).unwrap();
        let c = [1; 16];
        let f = frames(&a, &c, 1);
        Opener::new(&key("  0123456789abcdef-shared"), &c)
            .open_frame(&f[0])
            .unwrap();
        let missing = SyncKey::load(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().starts_with("reading sync key file"));
        assert_eq!(format!("{a:?}"), "SyncKey(<redacted>)");
    }

    #[test]
    fn oversized_batches_are_refused_by_the_sealer() {
        let k = key("0123456789abcdef-shared");
        let mut s = Sealer::new(&k, &[0; 16], 1);
        let many: Vec<_> = (0..MAX_FLOWS_PER_FRAME as u32 + 1).map(flow).collect();
        let mut out = Vec::new();
        assert!(
            s.seal(&Message::Flows(Cow::Owned(many)), 0, &mut out)
                .is_err()
        );
        assert!(out.is_empty());
    }
}
