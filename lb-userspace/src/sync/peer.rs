//! The sync's TCP side: the event reader, one sender per configured peer, the listener and one
//! receiver per accepted connection. Every task ends when the shutdown signal is set; every wait
//! on the network has a deadline.

use super::{
    EventSource, SyncRequest,
    auth::{AuthError, Opener, Sealer, SyncKey, new_challenge, new_nonce},
    status::{PeerStats, Status, unix_ns},
    wire::{
        self, ACK_MSG_LEN, CHALLENGE_MSG_LEN, HEADER_LEN, Kind, MAX_FLOWS_PER_FRAME, Message,
        TAG_LEN, WireError,
    },
};
use crate::{dataplane::InstallReport, util::BoxError};
use lb_common::FlowEvent;
use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream, tcp::OwnedWriteHalf},
    sync::{broadcast, mpsc, oneshot, watch},
    task::JoinSet,
    time::{Instant, Interval, sleep, sleep_until, timeout, timeout_at},
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
/// An accepted connection must deliver a valid Hello this soon, or it is closed and counted as
/// rejected: without a deadline, anyone could hold inbound slots forever.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Unauthenticated (no valid Hello yet) connections at most from one address...
const MAX_UNAUTHENTICATED_PER_IP: usize = 4;
/// ... and from all addresses that are not configured peers together: the other half of
/// [`MAX_INBOUND`] stays free for configured peers, whatever strangers do.
const MAX_UNAUTHENTICATED_OTHER: usize = MAX_INBOUND / 2;
/// A sender's session counts as working (the reconnect backoff and the quiet logging reset) only
/// once the receiver acknowledged the Hello and the session lasted this many heartbeats.
const STABLE_HEARTBEATS: u32 = 5;
/// New flows a sender holds back at most while it is busy (waiting for a snapshot, writing):
/// about 12 MiB, shared with the other senders (batches are reference-counted). Beyond that it
/// drops them and sends a snapshot instead.
const MAX_HELD_FLOWS: usize = 1 << 19;
/// A sender hands the socket this much at once while sending a snapshot.
const WRITE_CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("connecting: {0}")]
    Connect(io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error(transparent)]
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
    Snapshot(#[source] BoxError),
    #[error(
        "the peer closed the connection instead of acknowledging our Hello (wrong key? see its log)"
    )]
    NotAcknowledged,
    #[error("invalid Ack: {0}")]
    BadAck(WireError),
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
    #[error("no valid Hello within {HELLO_TIMEOUT:?}")]
    NoHello,
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
    let stable_after = ctx.heartbeat * STABLE_HEARTBEATS;
    let mut backoff = BACKOFF_MIN;
    // After one logged failure the repeats go to debug until a session works again, so a peer
    // that is down (or rejects us) does not flood the log.
    let mut quiet = false;
    loop {
        let mut acknowledged = None;
        let err = tokio::select! {
            () = stopped(&mut shutdown) => break,
            r = session(index, addr, &ctx, &batches, &mut acknowledged) => match r {
                Ok(never) => match never {},
                Err(e) => e,
            },
        };
        stats.set_connected(false);
        // Only a session that the receiver acknowledged (it has the key and accepted our Hello)
        // and that then lasted resets the backoff and the logging. A peer that rejects us, or
        // drops us right after the Ack, is retried with a growing backoff (at most once a
        // second), and since the Ack comes first, never costs the agent a snapshot.
        if acknowledged.is_some_and(|at: Instant| at.elapsed() > stable_after) {
            backoff = BACKOFF_MIN;
            quiet = false;
        }
        // The end of an acknowledged session is always worth a line: it pairs with the
        // "connected" line, and the backoff keeps both to at most one a second.
        if quiet && acknowledged.is_none() {
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

/// A sender's subscription to the reader's batches, with the batches it took but has not sent
/// yet. Whenever the sender waits (for the Ack, for the agent's snapshot) or writes, it keeps
/// taking batches into `held`, so the broadcast buffer only has to cover the moments between two
/// polls of the sender, not a whole snapshot.
struct Stream {
    rx: broadcast::Receiver<Arc<Batch>>,
    open: bool,
    held: VecDeque<Arc<Batch>>,
    held_flows: usize,
    /// Batches were lost since the last snapshot was requested: another snapshot is due.
    resync_due: bool,
    /// Batches lost since the last resync (for its log line).
    missed: u64,
}

impl Stream {
    fn new(rx: broadcast::Receiver<Arc<Batch>>) -> Self {
        Stream {
            rx,
            open: true,
            held: VecDeque::new(),
            held_flows: 0,
            resync_due: false,
            missed: 0,
        }
    }

    /// Handle one result of `rx.recv()`.
    fn take(&mut self, r: Result<Arc<Batch>, broadcast::error::RecvError>) {
        match r {
            Ok(batch) if self.held_flows + batch.flows.len() <= MAX_HELD_FLOWS => {
                self.held_flows += batch.flows.len();
                self.held.push_back(batch);
            }
            Ok(_) => self.lose(1),
            Err(broadcast::error::RecvError::Lagged(missed)) => self.lose(missed),
            Err(broadcast::error::RecvError::Closed) => self.open = false,
        }
    }

    /// Batches were lost: drop the held ones too and skip what is still queued, since the
    /// snapshot that is now due is taken after this point and covers all of them. Resubscribing
    /// (rather than reading on from the oldest retained batch) is what keeps a big backlog from
    /// overflowing the buffer again while that snapshot is sent.
    fn lose(&mut self, missed: u64) {
        self.missed += missed + self.held.len() as u64;
        self.held.clear();
        self.held_flows = 0;
        self.rx = self.rx.resubscribe();
        self.resync_due = true;
    }

    fn pop(&mut self) -> Option<Arc<Batch>> {
        let batch = self.held.pop_front()?;
        self.held_flows -= batch.flows.len();
        Some(batch)
    }
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
    /// Write `out`, taking new batches into `stream` meanwhile.
    async fn write_out(&mut self, stream: &mut Stream) -> Result<(), PeerError> {
        let write = timeout(IO_TIMEOUT, self.wr.write_all(&self.out));
        tokio::pin!(write);
        let written = loop {
            tokio::select! {
                biased;
                r = &mut write => break r,
                r = stream.rx.recv(), if stream.open => stream.take(r),
            }
        };
        written.map_err(|_| PeerError::Timeout("writing to the peer"))??;
        self.out.clear();
        self.stats.touch();
        Ok(())
    }

    async fn send(&mut self, msg: &Message<'_>, stream: &mut Stream) -> Result<(), PeerError> {
        self.sealer.seal(msg, unix_ns(), &mut self.out)?;
        self.write_out(stream).await
    }

    /// Flows or Snapshot frames for `flows`, any number of them.
    async fn send_flows(
        &mut self,
        kind: Kind,
        flows: &[FlowEvent],
        sent_ns: u64,
        stream: &mut Stream,
    ) -> Result<(), PeerError> {
        for chunk in flows.chunks(MAX_FLOWS_PER_FRAME) {
            let msg = if kind == Kind::Snapshot {
                Message::Snapshot(Cow::Borrowed(chunk))
            } else {
                Message::Flows(Cow::Borrowed(chunk))
            };
            self.sealer.seal(&msg, sent_ns, &mut self.out)?;
            if self.out.len() >= WRITE_CHUNK {
                self.write_out(stream).await?;
            }
        }
        if !self.out.is_empty() {
            self.write_out(stream).await?;
        }
        self.stats.flows_sent.fetch_add(flows.len() as u64, Relaxed);
        Ok(())
    }

    /// Wait for `fut` without going silent: a heartbeat every interval (the receiver closes a
    /// connection that sent nothing for 5), and new batches taken into `stream`.
    async fn keep_alive_while<T>(
        &mut self,
        fut: impl Future<Output = T>,
        heartbeat: &mut Interval,
        stream: &mut Stream,
    ) -> Result<T, PeerError> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return Ok(r),
                r = stream.rx.recv(), if stream.open => stream.take(r),
                _ = heartbeat.tick() => self.send(&Message::Heartbeat, stream).await?,
            }
        }
    }

    async fn send_snapshot(
        &mut self,
        ctx: &Ctx,
        heartbeat: &mut Interval,
        stream: &mut Stream,
    ) -> Result<(), PeerError> {
        let (reply, answer) = oneshot::channel();
        let request = async move {
            ctx.requests
                .send(SyncRequest::Snapshot {
                    max_age: ctx.snapshot_max_age,
                    reply,
                })
                .await
                .map_err(|_| PeerError::AgentGone)?;
            answer
                .await
                .map_err(|_| PeerError::AgentGone)?
                .map_err(PeerError::Snapshot)
        };
        // The agent may take a while with a big table (and the request queue may be full).
        let flows = self.keep_alive_while(request, heartbeat, stream).await??;
        self.send_flows(Kind::Snapshot, &flows, unix_ns(), stream)
            .await?;
        self.send(
            &Message::SnapshotEnd {
                total: flows.len() as u64,
            },
            stream,
        )
        .await?;
        log::info!(
            "sync: sent a snapshot of {} flows to peer {}",
            flows.len(),
            self.addr
        );
        Ok(())
    }
}

/// One outbound connection, until it fails. Sets `acknowledged` when the receiver's Ack
/// verified.
async fn session(
    index: usize,
    addr: SocketAddr,
    ctx: &Ctx,
    batches: &broadcast::Sender<Arc<Batch>>,
    acknowledged: &mut Option<Instant>,
) -> Result<std::convert::Infallible, PeerError> {
    let conn = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| PeerError::Timeout("connecting"))?
        .map_err(PeerError::Connect)?;
    conn.set_nodelay(true)?;
    let (mut rd, wr) = conn.into_split();
    let mut c = [0u8; CHALLENGE_MSG_LEN];
    timeout(IO_TIMEOUT, rd.read_exact(&mut c))
        .await
        .map_err(|_| PeerError::Timeout("waiting for the challenge"))??;
    let challenge = wire::decode_challenge(&c).map_err(PeerError::Challenge)?;
    // Subscribed before the snapshot is requested: a flow assigned meanwhile is sent twice
    // (installs are idempotent) rather than never.
    let mut stream = Stream::new(batches.subscribe());
    let stats = ctx.status.peer(Some(index));
    let mut tx = Sender {
        addr,
        wr,
        sealer: Sealer::new(&ctx.key, &challenge, ctx.node_id),
        out: Vec::with_capacity(64 * 1024),
        stats,
    };
    let mut heartbeat = tokio::time::interval_at(Instant::now() + ctx.heartbeat, ctx.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Hello and AckRequest in one write; then nothing but heartbeats until the receiver proved
    // that it has the key. A receiver that rejects the Hello closes the connection instead, so a
    // peer with another key never makes the agent walk its flow table.
    let nonce = new_nonce()?;
    tx.sealer.seal(
        &Message::Hello {
            listen_port: ctx.listen_port,
        },
        unix_ns(),
        &mut tx.out,
    )?;
    tx.sealer
        .seal(&Message::AckRequest { nonce }, unix_ns(), &mut tx.out)?;
    tx.write_out(&mut stream).await?;
    let mut ack = [0u8; ACK_MSG_LEN];
    let read = timeout(IO_TIMEOUT, rd.read_exact(&mut ack));
    match tx
        .keep_alive_while(read, &mut heartbeat, &mut stream)
        .await?
    {
        Err(_) => return Err(PeerError::Timeout("waiting for the peer's Ack")),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(PeerError::NotAcknowledged);
        }
        Ok(r) => r?,
    };
    let proof = wire::decode_ack(&ack).map_err(PeerError::BadAck)?;
    ctx.key
        .verify_ack(&challenge, ctx.node_id, &nonce, &proof)?;
    *acknowledged = Some(Instant::now());
    stats.set_connected(true);
    log::info!("sync: connected to peer {addr}");
    tx.send_snapshot(ctx, &mut heartbeat, &mut stream).await?;

    let mut probe = [0u8; 1];
    loop {
        if stream.resync_due {
            stream.resync_due = false;
            stats.resyncs.fetch_add(1, Relaxed);
            log::warn!(
                "sync: peer {addr} fell {} batches behind; re-sending the full flow table",
                std::mem::take(&mut stream.missed)
            );
            tx.send_snapshot(ctx, &mut heartbeat, &mut stream).await?;
            continue;
        }
        // Batches taken while busy go first, in order.
        if let Some(batch) = stream.pop() {
            tx.send_flows(Kind::Flows, &batch.flows, batch.first_seen_ns, &mut stream)
                .await?;
            continue;
        }
        tokio::select! {
            r = stream.rx.recv(), if stream.open => stream.take(r),
            _ = heartbeat.tick() => tx.send(&Message::Heartbeat, &mut stream).await?,
            // The receiver sends nothing after the Ack: this only completes when it closes the
            // connection (for instance after rejecting a frame).
            r = rd.read(&mut probe) => return Err(match r {
                Ok(0) => PeerError::Closed,
                Ok(_) => PeerError::Unexpected,
                Err(e) => PeerError::Io(e),
            }),
        }
    }
}

/// Admission of unauthenticated connections: at most [`MAX_UNAUTHENTICATED_PER_IP`] per source
/// address and [`MAX_UNAUTHENTICATED_OTHER`] from addresses that are not configured peers.
#[derive(Default)]
struct Gate {
    counts: Mutex<GateCounts>,
}

#[derive(Default)]
struct GateCounts {
    per_ip: HashMap<IpAddr, usize>,
    other: usize,
}

impl Gate {
    fn admit(self: &Arc<Self>, ip: IpAddr, configured: bool) -> Result<Unauthenticated, String> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= MAX_UNAUTHENTICATED_PER_IP {
            return Err(format!(
                "{from_ip} connections from this address have not sent a Hello yet"
            ));
        }
        if !configured && c.other >= MAX_UNAUTHENTICATED_OTHER {
            return Err(format!(
                "{} connections from addresses that are not peers have not sent a Hello yet",
                c.other
            ));
        }
        *c.per_ip.entry(ip).or_insert(0) += 1;
        if !configured {
            c.other += 1;
        }
        Ok(Unauthenticated {
            gate: self.clone(),
            ip,
            configured,
        })
    }
}

/// One admitted connection that has not sent a valid Hello yet; dropped when it does (or ends).
struct Unauthenticated {
    gate: Arc<Gate>,
    ip: IpAddr,
    configured: bool,
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let mut c = self.gate.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
        if !self.configured {
            c.other = c.other.saturating_sub(1);
        }
    }
}

/// Accept peers' connections until shutdown, then wait for their receivers to end.
pub(crate) async fn listen(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
) {
    let gate = Arc::new(Gate::default());
    let mut conns = JoinSet::new();
    // Refusals are logged at the 1st, 2nd, 4th, 8th... so a flood cannot flood the log.
    let mut refused = 0u64;
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let admitted = if conns.len() >= MAX_INBOUND {
                        Err(format!("{MAX_INBOUND} connections already open"))
                    } else {
                        let configured = ctx.status.match_peer(remote.ip(), None).is_some();
                        gate.admit(remote.ip(), configured)
                    };
                    match admitted {
                        Ok(unauth) => {
                            conns.spawn(inbound(stream, remote, ctx.clone(), unauth, shutdown.clone()));
                        }
                        Err(why) => {
                            refused += 1;
                            if refused.is_power_of_two() {
                                log::warn!("sync: refusing a connection from {remote}: {why} ({refused} refused so far)");
                            }
                        }
                    }
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
    unauth: Unauthenticated,
    mut shutdown: watch::Receiver<bool>,
) {
    // Attributed by IP until Hello names the sender's listen port.
    let mut peer = ctx.status.match_peer(remote.ip(), None);
    ctx.status.peer(peer).inbound_opened();
    let mut unauth = Some(unauth);
    let result = tokio::select! {
        () = stopped(&mut shutdown) => Ok(()),
        r = receive(stream, remote, &ctx, &mut peer, &mut unauth) => r,
    };
    ctx.status.peer(peer).inbound_closed();
    match result {
        Ok(()) | Err(PeerError::Rejected) => {}
        Err(PeerError::Closed) => log::info!("sync: peer {remote} disconnected"),
        Err(PeerError::NoHello) => {
            // Counted like a rejected frame: it is the same "someone without the key" signal.
            ctx.status.peer(peer).rejected.fetch_add(1, Relaxed);
            log::warn!(
                "sync: connection from {remote} sent no valid Hello within {HELLO_TIMEOUT:?}; closed"
            );
        }
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

/// The receiver of one accepted connection. `unauth` holds the connection's admission slot
/// until its Hello verified.
async fn receive(
    stream: TcpStream,
    remote: SocketAddr,
    ctx: &Ctx,
    peer: &mut Option<usize>,
    unauth: &mut Option<Unauthenticated>,
) -> Result<(), PeerError> {
    // Everything up to a valid Hello must happen within this, whatever the sender trickles.
    let hello_deadline = Instant::now() + HELLO_TIMEOUT;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let challenge = new_challenge()?;
    timeout_at(
        hello_deadline,
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
        let head_deadline = if hello {
            Instant::now() + idle
        } else {
            hello_deadline
        };
        match timeout_at(head_deadline, rd.read_exact(&mut head)).await {
            Err(_) if !hello => return Err(PeerError::NoHello),
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
        let body_deadline = if hello {
            Instant::now() + IO_TIMEOUT
        } else {
            hello_deadline
        };
        match timeout_at(body_deadline, rd.read_exact(&mut body)).await {
            Err(_) if !hello => return Err(PeerError::NoHello),
            Err(_) => return Err(PeerError::Timeout("reading a frame")),
            Ok(r) => r?,
        };
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
                // Authenticated: no longer counts against the unauthenticated limits.
                *unauth = None;
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
            Message::AckRequest { nonce } => {
                // Only right after Hello (the sender waits for the Ack before anything else).
                if header.seq != 2 {
                    let reason = format!("AckRequest as frame {}, not 2", header.seq);
                    return Err(reject(ctx, *peer, remote, &reason));
                }
                // Proves to the sender that this node has the key, bound to this connection's
                // challenge and the sender's fresh nonce.
                let proof = ctx.key.ack_proof(&challenge, header.node_id, &nonce);
                timeout(IO_TIMEOUT, wr.write_all(&wire::encode_ack(&proof)))
                    .await
                    .map_err(|_| PeerError::Timeout("sending the Ack"))??;
            }
        }
    }
}
