//! What the sync's connection tasks share: their context, the batches of new local flows, and
//! their errors. The tasks are in `sender` (the event reader and one sender per configured peer)
//! and `receiver` (the listener and one receiver per accepted connection). Every task ends when
//! the sync's cancellation token is cancelled; every wait on the network has a deadline.

use super::{
    SyncRequest,
    key::SyncKey,
    noise::NoiseError,
    status::Status,
    wire::{self, Kind, RECORD_HEADER_LEN, RecordHeader, WireError},
};
use crate::util::BoxError;
use lb_common::FlowEvent;
use std::{io, sync::Arc, time::Duration};
use tokio::{io::AsyncReadExt, sync::mpsc};

/// Deadline for one write, the preamble, the handshake, and the rest of a record once its
/// header arrived.
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest pause before a reconnect, and after a failed accept.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// An accepted connection must deliver a valid Hello this soon, or it is closed and counted as
/// rejected: without a deadline, anyone could hold inbound slots forever.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub(super) enum PeerError {
    #[error("connecting: {0}")]
    Connect(io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("invalid preamble: {0}")]
    Preamble(WireError),
    #[error(
        "the peer speaks sync protocol version {0} and this node version {v}: run the same xlb version on every peer",
        v = wire::VERSION
    )]
    Version(u8),
    #[error("invalid record: {0}")]
    Record(WireError),
    #[error(transparent)]
    Noise(#[from] NoiseError),
    #[error("record rejected")]
    Rejected,
    #[error("the agent stopped serving sync requests")]
    AgentGone,
    #[error("the agent could not list its flows: {0}")]
    Snapshot(#[source] BoxError),
    #[error(
        "the peer closed the connection during the handshake (wrong key, or another xlb version? see its log)"
    )]
    HandshakeClosed,
    #[error("the peer closed the connection instead of acknowledging our Hello (see its log)")]
    NotAcknowledged,
    #[error("the peer answered our Hello with {0}, not an Ack")]
    NotAck(Kind),
    #[error("connection closed by the peer")]
    Closed,
    #[error("connection closed by the peer before its handshake")]
    ClosedBeforeHandshake,
    #[error("the peer sent data on a send-only connection")]
    Unexpected,
    #[error("a second Hello")]
    SecondHello,
    #[error("the peer has this node's own id {0:016x} (peered with itself?)")]
    SelfPeer(u64),
    #[error("nothing received for {0:?}")]
    Idle(Duration),
    #[error("no valid Hello within {HELLO_TIMEOUT:?}")]
    NoHello,
}

/// What every connection task shares.
pub(super) struct Ctx {
    pub key: SyncKey,
    pub node_id: u64,
    pub listen_port: u16,
    pub heartbeat: Duration,
    pub snapshot_max_age: Duration,
    pub status: Arc<Status>,
    pub requests: mpsc::Sender<SyncRequest>,
}

/// New local flows, shared by all senders.
#[derive(Debug)]
pub(super) struct Batch {
    /// When the reader took the first of them from the kernel (unix ns): the frames' sent time.
    pub(super) first_seen_ns: u64,
    pub(super) flows: Vec<FlowEvent>,
}

/// Read one record: its header (decoded and returned) and its Noise message into `msg`. The peer
/// closing is an `io::ErrorKind::UnexpectedEof` for the caller to name; a bad header is
/// [`PeerError::Record`], before anything more is read.
pub(super) async fn read_record(
    rd: &mut (impl AsyncReadExt + Unpin),
    msg: &mut Vec<u8>,
) -> Result<RecordHeader, PeerError> {
    let mut head = [0u8; RECORD_HEADER_LEN];
    rd.read_exact(&mut head).await?;
    let header = wire::decode_record_header(&head).map_err(PeerError::Record)?;
    msg.resize(header.len, 0);
    rd.read_exact(msg).await?;
    Ok(header)
}
