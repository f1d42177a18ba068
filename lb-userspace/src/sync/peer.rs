//! The sync's TCP side: the event reader, one sender per configured peer, the listener and one
//! receiver per accepted connection. Every task ends when the shutdown signal is set; every wait
//! on the network has a deadline.

use super::{
    EventSource, SyncRequest,
    auth::{AuthError, Opener, Sealer, SyncKey, new_challenge},
    status::{PeerStats, Status, unix_ns},
    wire::{
        self, CHALLENGE_MSG_LEN, HEADER_LEN, Kind, MAX_FLOWS_PER_FRAME, Message, TAG_LEN, WireError,
    },
};
use crate::dataplane::InstallReport;
use lb_common::FlowEvent;
use std::{
    borrow::Cow,
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream, tcp::OwnedWriteHalf},
    sync::{broadcast, mpsc, oneshot, watch},
    task::JoinSet,
    time::{Instant, sleep, sleep_until, timeout},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline for one write, the challenge, and the rest of a frame once its header arrived.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A receiver closes a connection that sent nothing for this many heartbeat intervals.
const IDLE_HEARTBEATS: u32 = 5;
/// Open inbound connections at most (a peer has one; the rest is misconfiguration or abuse).
const MAX_INBOUND: usize = 64;
/// A sender hands the socket this much at once while sending a snapshot.
const WRITE_CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("connecting: {0}")]
    Connect(io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("invalid challenge: {0}")]
    Challenge(WireError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("frame rejected")]
    Rejected,
    #[error("the agent stopped serving sync requests")]
    AgentGone,
    #[error("the agent could not list its flows: {0}")]
    Snapshot(String),
    #[error("connection closed by the peer")]
    Closed,
    #[error("the peer sent data on a send-only connection")]
    Unexpected,
    #[error("a second Hello")]
    SecondHello,
    #[error("the peer has this node's own id {0:016x} (peered with itself?)")]
    SelfPeer(u64),
    #[error("nothing received for {0:?}")]
    Idle(Duration),
}

/// What every connection task shares.
pub(crate) struct Ctx {
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
pub(crate) struct Batch {
    /// When the reader took the first of them from the kernel (unix ns): the frames' sent time.
    first_seen_ns: u64,
    flows: Vec<FlowEvent>,
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The reader: source → batches → broadcast.
pub(crate) async fn read_events<S: EventSource>(
    mut source: S,
    batches: broadcast::Sender<Arc<Batch>>,
    flush_after: Duration,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch: Vec<FlowEvent> = Vec::new();
    let mut incoming: Vec<FlowEvent> = Vec::new();
    let mut first_seen_ns = 0;
    let mut deadline = Instant::now();
    let flush = |batch: &mut Vec<FlowEvent>, first_seen_ns: u64| {
        if !batch.is_empty() {
            let flows = std::mem::take(batch);
            // No subscribers (no peer connected) is fine: a peer that connects gets a snapshot.
            let _ = batches.send(Arc::new(Batch {
                first_seen_ns,
                flows,
            }));
        }
    };
    loop {
        let pending = !batch.is_empty();
        let room = MAX_FLOWS_PER_FRAME - batch.len();
        tokio::select! {
            biased;
            () = stopped(&mut shutdown) => return,
            () = sleep_until(deadline), if pending => flush(&mut batch, first_seen_ns),
            r = source.next_events(&mut incoming, room) => {
                match r {
                    Ok(true) => {}
                    Ok(false) => {
                        flush(&mut batch, first_seen_ns);
                        log::info!("sync: the flow event source ended");
                        return;
                    }
                    Err(e) => {
                        flush(&mut batch, first_seen_ns);
                        log::error!("sync: reading flow events: {e}; new local flows are no longer sent to peers");
                        return;
                    }
                }
                if batch.is_empty() {
                    first_seen_ns = unix_ns();
                    deadline = Instant::now() + flush_after;
                }
                status.local_flows.fetch_add(incoming.len() as u64, Relaxed);
                batch.append(&mut incoming);
                if batch.len() >= MAX_FLOWS_PER_FRAME {
                    flush(&mut batch, first_seen_ns);
                }
            }
        }
    }
}

/// The sender for configured peer `index`: connect, snapshot, stream; reconnect on any error.
pub(crate) async fn outbound(
    index: usize,
    addr: SocketAddr,
    ctx: Arc<Ctx>,
    batches: broadcast::Sender<Arc<Batch>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stats = ctx.status.peer(Some(index));
    let mut backoff = BACKOFF_MIN;
    // After one logged failure the repeats go to debug until a session works again, so a peer
    // that is down does not flood the log once a second.
    let mut quiet = false;
    loop {
        let mut established = false;
        let err = tokio::select! {
            () = stopped(&mut shutdown) => break,
            r = session(index, addr, &ctx, &batches, &mut established) => match r {
                Ok(never) => match never {},
                Err(e) => e,
            },
        };
        if established {
            backoff = BACKOFF_MIN;
            quiet = false;
        }
        stats.set_connected(false);
        if quiet {
            log::debug!("sync: peer {addr}: {err}");
        } else {
            log::warn!("sync: peer {addr}: {err}; retrying");
            quiet = true;
        }
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            () = sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    stats.set_connected(false);
}

/// The sending half of one outbound connection.
struct Sender<'a> {
    addr: SocketAddr,
    wr: OwnedWriteHalf,
    sealer: Sealer,
    out: Vec<u8>,
    stats: &'a PeerStats,
}

impl Sender<'_> {
    async fn write_out(&mut self) -> Result<(), PeerError> {
        timeout(IO_TIMEOUT, self.wr.write_all(&self.out))
            .await
            .map_err(|_| PeerError::Timeout("writing to the peer"))??;
        self.out.clear();
        self.stats.touch();
        Ok(())
    }

    async fn send(&mut self, msg: &Message<'_>) -> Result<(), PeerError> {
        self.sealer.seal(msg, unix_ns(), &mut self.out)?;
        self.write_out().await
    }

    /// Flows or Snapshot frames for `flows`, any number of them.
    async fn send_flows(
        &mut self,
        kind: Kind,
        flows: &[FlowEvent],
        sent_ns: u64,
    ) -> Result<(), PeerError> {
        for chunk in flows.chunks(MAX_FLOWS_PER_FRAME) {
            let msg = if kind == Kind::Snapshot {
                Message::Snapshot(Cow::Borrowed(chunk))
            } else {
                Message::Flows(Cow::Borrowed(chunk))
            };
            self.sealer.seal(&msg, sent_ns, &mut self.out)?;
            if self.out.len() >= WRITE_CHUNK {
                self.write_out().await?;
            }
        }
        if !self.out.is_empty() {
            self.write_out().await?;
        }
        self.stats.flows_sent.fetch_add(flows.len() as u64, Relaxed);
        Ok(())
    }

    async fn send_snapshot(&mut self, ctx: &Ctx) -> Result<(), PeerError> {
        let (reply, answer) = oneshot::channel();
        ctx.requests
            .send(SyncRequest::Snapshot {
                max_age: ctx.snapshot_max_age,
                reply,
            })
            .await
            .map_err(|_| PeerError::AgentGone)?;
        let flows = answer
            .await
            .map_err(|_| PeerError::AgentGone)?
            .map_err(PeerError::Snapshot)?;
        self.send_flows(Kind::Snapshot, &flows, unix_ns()).await?;
        self.send(&Message::SnapshotEnd {
            total: flows.len() as u64,
        })
        .await?;
        log::info!(
            "sync: sent a snapshot of {} flows to peer {}",
            flows.len(),
            self.addr
        );
        Ok(())
    }
}

/// One outbound connection, until it fails. Sets `established` once the peer answered.
async fn session(
    index: usize,
    addr: SocketAddr,
    ctx: &Ctx,
    batches: &broadcast::Sender<Arc<Batch>>,
    established: &mut bool,
) -> Result<std::convert::Infallible, PeerError> {
    let stream = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| PeerError::Timeout("connecting"))?
        .map_err(PeerError::Connect)?;
    stream.set_nodelay(true)?;
    let (mut rd, wr) = stream.into_split();
    let mut c = [0u8; CHALLENGE_MSG_LEN];
    timeout(IO_TIMEOUT, rd.read_exact(&mut c))
        .await
        .map_err(|_| PeerError::Timeout("waiting for the challenge"))??;
    let challenge = wire::decode_challenge(&c).map_err(PeerError::Challenge)?;
    // Subscribed before the snapshot is taken: a flow assigned meanwhile is sent twice (installs
    // are idempotent) rather than never.
    let mut stream_rx = batches.subscribe();
    let stats = ctx.status.peer(Some(index));
    let mut tx = Sender {
        addr,
        wr,
        sealer: Sealer::new(&ctx.key, &challenge, ctx.node_id),
        out: Vec::with_capacity(64 * 1024),
        stats,
    };
    tx.send(&Message::Hello {
        listen_port: ctx.listen_port,
    })
    .await?;
    *established = true;
    stats.set_connected(true);
    log::info!("sync: connected to peer {addr}");
    tx.send_snapshot(ctx).await?;

    let mut heartbeat = tokio::time::interval_at(Instant::now() + ctx.heartbeat, ctx.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = [0u8; 1];
    let mut stream_open = true;
    loop {
        tokio::select! {
            r = stream_rx.recv(), if stream_open => match r {
                Ok(batch) => tx.send_flows(Kind::Flows, &batch.flows, batch.first_seen_ns).await?,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    stats.resyncs.fetch_add(1, Relaxed);
                    log::warn!("sync: peer {addr} fell {missed} batches behind; re-sending the full flow table");
                    tx.send_snapshot(ctx).await?;
                }
                Err(broadcast::error::RecvError::Closed) => stream_open = false,
            },
            _ = heartbeat.tick() => tx.send(&Message::Heartbeat).await?,
            // The receiver never sends after the challenge: this only completes when it closes
            // the connection (for instance after rejecting a frame).
            r = rd.read(&mut probe) => return Err(match r {
                Ok(0) => PeerError::Closed,
                Ok(_) => PeerError::Unexpected,
                Err(e) => PeerError::Io(e),
            }),
        }
    }
}

/// Accept peers' connections until shutdown, then wait for their receivers to end.
pub(crate) async fn listen(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) if conns.len() < MAX_INBOUND => {
                    conns.spawn(inbound(stream, remote, ctx.clone(), shutdown.clone()));
                }
                Ok((_, remote)) => {
                    log::warn!("sync: refusing a connection from {remote}: {MAX_INBOUND} already open");
                }
                Err(e) => {
                    // Typically out of file descriptors: pause instead of spinning.
                    log::warn!("sync: accepting a connection: {e}");
                    sleep(BACKOFF_MIN).await;
                }
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => log_panic(done),
        }
    }
    drop(listener);
    while let Some(done) = conns.join_next().await {
        log_panic(done);
    }
}

fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        log::error!("sync: a connection task panicked: {e}");
    }
}

/// One accepted connection.
async fn inbound(
    stream: TcpStream,
    remote: SocketAddr,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Attributed by IP until Hello names the sender's listen port.
    let mut peer = ctx.status.match_peer(remote.ip(), None);
    ctx.status.peer(peer).inbound_opened();
    let result = tokio::select! {
        () = stopped(&mut shutdown) => Ok(()),
        r = receive(stream, remote, &ctx, &mut peer) => r,
    };
    ctx.status.peer(peer).inbound_closed();
    match result {
        Ok(()) | Err(PeerError::Rejected) => {}
        Err(PeerError::Closed) => log::info!("sync: peer {remote} disconnected"),
        Err(e) => log::warn!("sync: connection from {remote} closed: {e}"),
    }
}

/// Count, log and close for a frame that must not be trusted.
fn reject(
    ctx: &Ctx,
    peer: Option<usize>,
    remote: SocketAddr,
    reason: &dyn std::fmt::Display,
) -> PeerError {
    ctx.status.peer(peer).rejected.fetch_add(1, Relaxed);
    log::warn!("sync: rejected a frame from {remote}: {reason}; closing the connection");
    PeerError::Rejected
}

async fn install(
    ctx: &Ctx,
    remote: SocketAddr,
    flows: Vec<FlowEvent>,
) -> Result<InstallReport, PeerError> {
    let count = flows.len();
    let (reply, answer) = oneshot::channel();
    ctx.requests
        .send(SyncRequest::Install { flows, reply })
        .await
        .map_err(|_| PeerError::AgentGone)?;
    match answer.await.map_err(|_| PeerError::AgentGone)? {
        Ok(report) => Ok(report),
        Err(e) => {
            // A map error is this node's problem, not the peer's: keep the connection.
            log::warn!("sync: installing {count} flows from {remote} failed: {e}");
            Ok(InstallReport::default())
        }
    }
}

/// Snapshot progress on one connection, for the log line at SnapshotEnd.
#[derive(Default)]
struct SnapshotTally {
    flows: u64,
    installed: u64,
    unknown_backend: u64,
}

async fn receive(
    stream: TcpStream,
    remote: SocketAddr,
    ctx: &Ctx,
    peer: &mut Option<usize>,
) -> Result<(), PeerError> {
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let challenge = new_challenge()?;
    timeout(
        IO_TIMEOUT,
        wr.write_all(&wire::encode_challenge(&challenge)),
    )
    .await
    .map_err(|_| PeerError::Timeout("sending the challenge"))??;
    let mut opener = Opener::new(&ctx.key, &challenge);
    let mut rd = BufReader::with_capacity(2 * wire::MAX_FRAME_LEN, rd);
    let idle = ctx.heartbeat * IDLE_HEARTBEATS;
    let mut head = [0u8; HEADER_LEN];
    let mut body = Vec::new();
    let mut hello = false;
    let mut tally = SnapshotTally::default();
    loop {
        match timeout(idle, rd.read_exact(&mut head)).await {
            Err(_) => return Err(PeerError::Idle(idle)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(PeerError::Closed);
            }
            Ok(r) => r?,
        };
        // Only the header's length field is trusted before the tag is checked, and only within
        // the kind's limit that `decode_header` enforces (at most one maximal frame is buffered).
        let header = wire::decode_header(&head)
            .map_err(|e| reject(ctx, *peer, remote, &AuthError::Malformed(e)))?;
        let payload_len = header.payload_len as usize;
        body.resize(payload_len + TAG_LEN, 0);
        timeout(IO_TIMEOUT, rd.read_exact(&mut body))
            .await
            .map_err(|_| PeerError::Timeout("reading a frame"))??;
        let (payload, tag) = body.split_at(payload_len);
        let msg = opener
            .open(&header, &head, payload, tag)
            .map_err(|e| reject(ctx, *peer, remote, &e))?;
        if !hello && msg.kind() != Kind::Hello {
            let reason = format!("first frame is {}, not Hello", msg.kind());
            return Err(reject(ctx, *peer, remote, &reason));
        }
        let stats = ctx.status.peer(*peer);
        stats.touch();
        match msg {
            Message::Hello { listen_port } => {
                if hello {
                    return Err(PeerError::SecondHello);
                }
                if header.node_id == ctx.node_id {
                    return Err(PeerError::SelfPeer(header.node_id));
                }
                hello = true;
                let matched = ctx.status.match_peer(remote.ip(), Some(listen_port));
                if matched != *peer {
                    ctx.status.peer(*peer).inbound_closed();
                    ctx.status.peer(matched).inbound_opened();
                    *peer = matched;
                }
                if matched.is_none() {
                    log::warn!(
                        "sync: {remote} (node {:016x}) is not a configured peer; accepting its flows (it has the key)",
                        header.node_id
                    );
                }
                log::info!(
                    "sync: peer {remote} (node {:016x}, listening on port {listen_port}) connected",
                    header.node_id
                );
                ctx.status.peer(*peer).touch();
            }
            Message::Flows(flows) => {
                let n = flows.len() as u64;
                let report = install(ctx, remote, flows.into_owned()).await?;
                stats.flows_received.fetch_add(n, Relaxed);
                stats
                    .unknown_backend
                    .fetch_add(report.unknown_backend, Relaxed);
                ctx.status
                    .record_lag_ns(unix_ns().saturating_sub(header.sent_ns));
            }
            Message::Snapshot(flows) => {
                let n = flows.len() as u64;
                let report = install(ctx, remote, flows.into_owned()).await?;
                stats.flows_received.fetch_add(n, Relaxed);
                stats
                    .unknown_backend
                    .fetch_add(report.unknown_backend, Relaxed);
                tally.flows += n;
                tally.installed += report.installed;
                tally.unknown_backend += report.unknown_backend;
            }
            Message::SnapshotEnd { total } => {
                let t = std::mem::take(&mut tally);
                log::info!(
                    "sync: snapshot from {remote}: {} flows, {} installed, {} with a VIP or backend this node does not have",
                    t.flows,
                    t.installed,
                    t.unknown_backend
                );
                if t.flows != total {
                    log::warn!(
                        "sync: snapshot from {remote} announced {total} flows but carried {}",
                        t.flows
                    );
                }
            }
            Message::Heartbeat => {}
        }
    }
}
