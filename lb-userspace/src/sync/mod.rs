//! Active-active flow sync (issue 4): every flow this node's XDP program assigns is streamed to
//! the peers, which install it, so a connection that moves between load balancers keeps its
//! backend.
//!
//! Parts: [`wire`] (record and frame format), [`key`] (the shared key and the Noise PSK derived
//! from it), [`noise`] (the Noise handshake, encrypted records, sequence checks), `sender` and
//! `receiver` (the TCP tasks, with what they share in `peer`), [`status`] (counters, `xlb peers`
//! report and table).
//!
//! # Tasks
//!
//! - one **reader** owns the [`EventSource`] (in the agent: [`RingBufSource`] over the kernel's
//!   `FLOW_EVENTS` ring buffer), batches events (a batch is flushed at
//!   [`wire::MAX_FLOWS_PER_FRAME`] flows or [`SyncConfig::flush_after`] after its first flow) and
//!   broadcasts each batch to every peer sender;
//! - one **sender** per `--peer`: connects, makes the Noise handshake (which the receiver
//!   completes only with the key, see [`noise`]; so the sender authenticates the receiver too),
//!   sends Hello and waits for the receiver's Ack. Only then is it `connected` and asks the
//!   agent for a full snapshot
//!   ([`SyncRequest::Snapshot`]), sends it and streams batches, plus a heartbeat every
//!   [`SyncConfig::heartbeat`], also while it waits for the Ack or the snapshot. It reconnects
//!   with a 100 ms → 1 s backoff, which resets only after a session that was acknowledged and
//!   lasted 5 heartbeats: a peer that rejects us (wrong key) is retried at most once a second,
//!   with one warning and the rest at debug level, and never costs the agent a snapshot.
//!   While the sender waits or writes it keeps taking batches from the broadcast into a held
//!   queue (up to half a million flows) that it sends next. A sender that still falls behind
//!   (more than [`SyncConfig::stream_buffer`] batches between two polls, or a full held queue)
//!   drops the backlog, resubscribes and re-sends a snapshot instead of losing flows (counted as
//!   `resyncs`);
//! - the **listener** on `--sync-listen` and one **receiver** per accepted connection: sends the
//!   preamble with a fresh challenge, answers the handshake, decrypts and authenticates every
//!   record, answers the Hello with an Ack and installs flows through [`SyncRequest::Install`].
//!   A handshake or record that fails authentication, the sequence check or decoding is counted
//!   (`rejected`), logged with the peer's address and reason, and its connection is closed. So
//!   is a connection without a valid Hello 2 s after the accept. At most 4
//!   connections per address, and 32 from all addresses that are not configured peers, may be
//!   waiting for their Hello at once; more are refused, so strangers cannot use up the 64
//!   inbound slots.
//!
//! # In the agent
//!
//! The agent takes the `FLOW_EVENTS` ring buffer from the data path before the data path moves
//! into its serve loop ([`RingBufSource`]), calls [`spawn`] with a child of its cancellation
//! token and its task tracker, and serves the [`SyncRequest`]s in its loop (`agent/server.rs`):
//! installs there (at most [`wire::MAX_FLOWS_PER_FRAME`] map updates each), snapshots on a
//! blocking task with its own handle to the flow table, so a walk of a big table never holds the
//! loop up. The reply senders may be dropped (the sync task then closes that connection). On
//! shutdown the token is cancelled and the agent waits for the tracker before the data path goes.

pub mod key;
pub mod noise;
mod peer;
mod receiver;
mod sender;
pub mod status;
pub mod wire;

#[cfg(test)]
mod tests;

pub use key::{KeyError, SyncKey};
pub use status::{LagReport, PeerReport, PeerStartup, PeersReport, SyncTotals, render_table};

use crate::{dataplane::InstallReport, util::BoxError};
use aya::maps::{MapData, RingBuf};
use lb_common::{Addr, FlowEvent, FlowKey};
use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpListener,
    sync::{broadcast, mpsc, oneshot},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Default heartbeat interval; a receiver closes a connection silent for 5 heartbeats.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// Default longest time a new flow waits in the reader's batch before it is sent.
pub const DEFAULT_FLUSH_AFTER: Duration = Duration::from_millis(2);
/// Default age limit of flows in a snapshot: flows idle longer than this are not sent to a
/// (re)joining peer.
pub const DEFAULT_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(600);
/// Default capacity of the broadcast of batches to the senders: how many batches the reader may
/// publish between two polls of a sender before that sender must resync. Senders drain it while
/// they wait or write, so it only covers scheduling delays; at full load a batch is 4096 flows.
pub const DEFAULT_STREAM_BUFFER: usize = 1024;
/// A reasonable capacity for the agent's `SyncRequest` channel: receivers wait for each reply, so
/// it never holds more than one request per connection and sender.
pub const SYNC_REQUEST_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot listen for sync peers on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("no randomness from the operating system: {0}")]
    Random(getrandom::Error),
    #[error("cannot poll the flow event ring buffer: {0}")]
    EventSource(io::Error),
    #[error("--peer {0} is this node's own --sync-listen address")]
    SelfPeer(SocketAddr),
}

/// What the sync needs from the agent's configuration.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// `--sync-listen ADDR:PORT`: where peers connect to send us their flows.
    pub listen: SocketAddr,
    /// `--peer ADDR:PORT` (repeatable): peers' `--sync-listen` addresses we send our flows to.
    pub peers: Vec<SocketAddr>,
    /// `--sync-key-file`.
    pub key: SyncKey,
    /// Random per start; names this node in peers' logs and detects a node peered with itself.
    pub node_id: u64,
    pub heartbeat: Duration,
    pub flush_after: Duration,
    /// Passed to the agent in [`SyncRequest::Snapshot`].
    pub snapshot_max_age: Duration,
    pub stream_buffer: usize,
}

impl SyncConfig {
    /// A configuration with the defaults above and a fresh random node id.
    pub fn new(
        listen: SocketAddr,
        peers: Vec<SocketAddr>,
        key: SyncKey,
    ) -> Result<Self, SyncError> {
        if let Some(p) = peers.iter().find(|p| **p == listen) {
            return Err(SyncError::SelfPeer(*p));
        }
        Ok(SyncConfig {
            listen,
            peers,
            key,
            node_id: random_node_id()?,
            heartbeat: DEFAULT_HEARTBEAT,
            flush_after: DEFAULT_FLUSH_AFTER,
            snapshot_max_age: DEFAULT_SNAPSHOT_MAX_AGE,
            stream_buffer: DEFAULT_STREAM_BUFFER,
        })
    }
}

/// A random node id (one per agent start).
fn random_node_id() -> Result<u64, SyncError> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(SyncError::Random)?;
    Ok(u64::from_ne_bytes(b))
}

/// What the sync asks of the agent loop (the only owner of the data path). See the module docs.
#[derive(Debug)]
pub enum SyncRequest {
    /// Install flows received from a peer: `Dataplane::install_flows`.
    Install {
        flows: Vec<FlowEvent>,
        reply: oneshot::Sender<Result<InstallReport, BoxError>>,
    },
    /// The live flow table for a (re)connecting peer: `Dataplane::snapshot_flows(max_age)`.
    Snapshot {
        max_age: Duration,
        reply: oneshot::Sender<Result<Vec<FlowEvent>, BoxError>>,
    },
}

/// Where new local flows come from: the kernel's ring buffer in the agent, a channel in tests.
pub trait EventSource: Send + 'static {
    /// Wait until at least one event is available, then move between 1 and `max` events into
    /// `out` and return `Ok(true)`; `Ok(false)` means the source has ended for good. Must be
    /// cancel-safe: if the future is dropped before it completes, no event is lost.
    fn next_events(
        &mut self,
        out: &mut Vec<FlowEvent>,
        max: usize,
    ) -> impl Future<Output = io::Result<bool>> + Send;
}

/// The kernel's `FLOW_EVENTS` ring buffer (`Dataplane::take_flow_events`), polled through epoll.
pub struct RingBufSource {
    ring: AsyncFd<RingBuf<MapData>>,
    malformed: u64,
}

impl RingBufSource {
    /// Must be called inside the tokio runtime.
    pub fn new(ring: RingBuf<MapData>) -> Result<Self, SyncError> {
        // SAFETY: the ring buffer owns its map's file descriptor (an `OwnedFd` inside `MapData`)
        // for as long as it lives, and `as_raw_fd` always returns that one descriptor; the
        // `AsyncFd` owns the ring buffer, so the descriptor outlives the registration.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| SyncError::EventSource(e.into_parts().1))?;
        Ok(RingBufSource { ring, malformed: 0 })
    }
}

/// A `FlowEvent` from its in-memory bytes (the kernel wrote the struct; fields stay as they are,
/// the addresses and ports in network order).
fn parse_event(b: &[u8]) -> Option<FlowEvent> {
    if b.len() < size_of::<FlowEvent>() {
        return None;
    }
    let addr_at = |at: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[at..at + 16]);
        Addr::from_octets(a)
    };
    let u16_at = |at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    Some(FlowEvent {
        flow: FlowKey {
            src_addr: addr_at(0),
            dst_addr: addr_at(16),
            src_port: u16_at(32),
            dst_port: u16_at(34),
            proto: b[36],
            _pad: [0; 3],
        },
        backend_addr: addr_at(40),
    })
}

impl EventSource for RingBufSource {
    async fn next_events(&mut self, out: &mut Vec<FlowEvent>, max: usize) -> io::Result<bool> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut taken = 0;
            let mut drained = false;
            while taken < max {
                let Some(item) = ring.next() else {
                    drained = true;
                    break;
                };
                match parse_event(&item) {
                    Some(ev) => {
                        out.push(ev);
                        taken += 1;
                    }
                    None => {
                        self.malformed += 1;
                        // Only possible with a mismatched eBPF object; say so once per 1000.
                        if self.malformed % 1000 == 1 {
                            log::error!(
                                "sync: {} flow events of {} bytes (expected {}) skipped",
                                self.malformed,
                                item.len(),
                                size_of::<FlowEvent>()
                            );
                        }
                    }
                }
            }
            // Only an empty ring may clear readiness (tokio keeps readiness that arrived since).
            if drained {
                guard.clear_ready();
            }
            if taken > 0 {
                return Ok(true);
            }
        }
    }
}

/// Events from a channel: for tests, and for embedding the sync without a kernel.
pub struct ChannelSource(pub mpsc::Receiver<FlowEvent>);

impl EventSource for ChannelSource {
    async fn next_events(&mut self, out: &mut Vec<FlowEvent>, max: usize) -> io::Result<bool> {
        Ok(self.0.recv_many(out, max).await > 0)
    }
}

/// A cheap, cloneable view of the sync's counters.
#[derive(Clone)]
pub struct SyncStatus(Arc<status::Status>);

impl SyncStatus {
    pub fn report(&self) -> PeersReport {
        self.0.report()
    }

    /// Per configured peer: snapshots received, reachable or not (what a starting agent waits
    /// for before it announces its VIPs).
    pub fn startup(&self) -> Vec<PeerStartup> {
        self.0.startup()
    }

    /// Resolves once [`SyncStatus::startup`] may have changed (at once if it changed since the
    /// last call). Meant for one waiter.
    pub async fn changed(&self) {
        self.0.changed().await;
    }
}

/// The running sync: its status and address. Its tasks run on the tracker `spawn` was given
/// and end when the token it was given is cancelled.
pub struct SyncHandle {
    status: SyncStatus,
    local_addr: SocketAddr,
}

impl SyncHandle {
    pub fn report(&self) -> PeersReport {
        self.status.report()
    }

    /// For the agent's CLI connection tasks.
    pub fn status(&self) -> SyncStatus {
        self.status.clone()
    }

    /// The bound listen address (the real port when `--sync-listen` used port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Bind the listener and start every sync task on `tasks`; they all end once `cancel` is
/// cancelled. Errors only for what the operator must fix (address in use, no randomness);
/// unreachable peers are retried for as long as the sync runs.
pub async fn spawn<S: EventSource>(
    config: SyncConfig,
    events: S,
    requests: mpsc::Sender<SyncRequest>,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> Result<SyncHandle, SyncError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| SyncError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| SyncError::Bind {
        addr: config.listen,
        source,
    })?;
    let status = Arc::new(status::Status::new(
        config.node_id,
        local_addr,
        config.peers.clone(),
    ));
    let ctx = Arc::new(peer::Ctx {
        key: config.key,
        node_id: config.node_id,
        listen_port: local_addr.port(),
        heartbeat: config.heartbeat,
        snapshot_max_age: config.snapshot_max_age,
        status: status.clone(),
        requests,
    });
    let (batches, _) = broadcast::channel(config.stream_buffer.max(1));
    tasks.spawn(sender::read_events(
        events,
        batches.clone(),
        config.flush_after,
        status.clone(),
        cancel.clone(),
    ));
    tasks.spawn(receiver::listen(
        listener,
        ctx.clone(),
        cancel.clone(),
        tasks.clone(),
    ));
    for (index, addr) in config.peers.iter().enumerate() {
        tasks.spawn(sender::outbound(
            index,
            *addr,
            ctx.clone(),
            batches.clone(),
            cancel.clone(),
        ));
    }
    log::info!(
        "sync: node {:016x} listening on {local_addr}, peers: {}",
        config.node_id,
        if config.peers.is_empty() {
            "none".to_string()
        } else {
            config
                .peers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    Ok(SyncHandle {
        status: SyncStatus(status),
        local_addr,
    })
}
