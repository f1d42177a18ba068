//! The sending side of peer sync: the reader takes new flows from the event source and
//! broadcasts them in batches; one sender per configured peer connects, makes the Noise
//! handshake, sends its Hello and waits for the peer's Ack, sends a snapshot and then streams
//! the batches.

use super::{
    EventSource, SyncRequest,
    key::SyncKey,
    noise::{Initiator, Session},
    peer::{BACKOFF_MIN, Batch, Ctx, IO_TIMEOUT, PeerError, read_record},
    status::{PeerStats, Status, unix_ns},
    wire::{
        self, HANDSHAKE_MSG_LEN, Kind, MAX_FLOWS_PER_FRAME, Message, PREAMBLE_LEN,
        RECORD_HEADER_LEN, WireError,
    },
};
use lb_common::FlowEvent;
use std::{
    borrow::Cow,
    collections::VecDeque,
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{broadcast, oneshot},
    time::{Instant, Interval, sleep, sleep_until, timeout},
};
use tokio_util::sync::CancellationToken;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// What a connection attempt that timed out was doing.
const CONNECTING: &str = "connecting";
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A sender's session counts as working (the reconnect backoff and the quiet logging reset) only
/// once the receiver acknowledged the Hello and the session lasted this many heartbeats.
const STABLE_HEARTBEATS: u32 = 5;
/// New flows a sender holds back at most while it is busy (waiting for a snapshot, writing):
/// about 12 MiB, shared with the other senders (batches are reference-counted). Beyond that it
/// drops them and sends a snapshot instead.
const MAX_HELD_FLOWS: usize = 1 << 19;
/// A sender hands the socket this much at once while sending a snapshot.
const WRITE_CHUNK: usize = 256 * 1024;

/// The reader: source → batches → broadcast.
pub(super) async fn read_events<S: EventSource>(
    mut source: S,
    batches: broadcast::Sender<Arc<Batch>>,
    flush_after: Duration,
    status: Arc<Status>,
    cancel: CancellationToken,
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
            () = cancel.cancelled() => return,
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
pub(super) async fn outbound(
    index: usize,
    addr: SocketAddr,
    ctx: Arc<Ctx>,
    batches: broadcast::Sender<Arc<Batch>>,
    cancel: CancellationToken,
) {
    let stats = ctx.status.peer(Some(index));
    let stable_after = ctx.heartbeat * STABLE_HEARTBEATS;
    let mut backoff = BACKOFF_MIN;
    // After one logged failure its repeats go to debug until a session works again, so a peer
    // that is down (or rejects us) does not flood the log. Another kind of failure is logged
    // again: a peer that was down at first and then turns out to speak another protocol
    // version must not stay silent.
    let mut quiet: Option<std::mem::Discriminant<PeerError>> = None;
    loop {
        let mut acknowledged = None;
        let err = tokio::select! {
            () = cancel.cancelled() => break,
            r = session(index, addr, &ctx, &batches, &mut acknowledged) => match r {
                Ok(never) => match never {},
                Err(e) => e,
            },
        };
        stats.set_connected(false);
        // Nobody listens there (or the address is unreachable): a starting agent need not wait
        // for this peer's snapshot.
        let unreachable = matches!(err, PeerError::Connect(_) | PeerError::Timeout(CONNECTING));
        ctx.status.set_unreachable(index, unreachable);
        // Only a session that the receiver acknowledged (it has the key and accepted our Hello)
        // and that then lasted resets the backoff and the logging. A peer that rejects us, or
        // drops us right after the Ack, is retried with a growing backoff (at most once a
        // second), and since the Ack comes first, never costs the agent a snapshot.
        if acknowledged.is_some_and(|at: Instant| at.elapsed() > stable_after) {
            backoff = BACKOFF_MIN;
            quiet = None;
        }
        // The end of an acknowledged session is always worth a line: it pairs with the
        // "connected" line, and the backoff keeps both to at most one a second.
        let kind = std::mem::discriminant(&err);
        if quiet == Some(kind) && acknowledged.is_none() {
            log::debug!("sync: peer {addr}: {err}");
        } else {
            log::warn!("sync: peer {addr}: {err}; retrying");
            quiet = Some(kind);
        }
        tokio::select! {
            () = cancel.cancelled() => break,
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
    session: Session,
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
        self.session.seal(msg, unix_ns(), &mut self.out)?;
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
            self.session.seal(&msg, sent_ns, &mut self.out)?;
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
/// arrived.
async fn session(
    index: usize,
    addr: SocketAddr,
    ctx: &Ctx,
    batches: &broadcast::Sender<Arc<Batch>>,
    acknowledged: &mut Option<Instant>,
) -> Result<std::convert::Infallible, PeerError> {
    let (mut rd, wr, session) = connect(addr, &ctx.key).await?;
    ctx.status.set_unreachable(index, false);
    // Subscribed before the snapshot is requested: a flow assigned meanwhile is sent twice
    // (installs are idempotent) rather than never.
    let mut stream = Stream::new(batches.subscribe());
    let stats = ctx.status.peer(Some(index));
    let mut tx = Sender {
        addr,
        wr,
        session,
        out: Vec::with_capacity(64 * 1024),
        stats,
    };
    let mut heartbeat = tokio::time::interval_at(Instant::now() + ctx.heartbeat, ctx.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tx.hello(ctx, &mut rd, &mut heartbeat, &mut stream).await?;
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

/// Connect to `addr`, read the receiver's preamble and make the Noise handshake: a returned
/// session proves that the receiver has the key.
async fn connect(
    addr: SocketAddr,
    key: &SyncKey,
) -> Result<(OwnedReadHalf, OwnedWriteHalf, Session), PeerError> {
    let conn = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| PeerError::Timeout(CONNECTING))?
        .map_err(PeerError::Connect)?;
    conn.set_nodelay(true)?;
    let (mut rd, mut wr) = conn.into_split();
    let mut p = [0u8; PREAMBLE_LEN];
    timeout(IO_TIMEOUT, rd.read_exact(&mut p))
        .await
        .map_err(|_| PeerError::Timeout("waiting for the preamble"))??;
    let challenge = match wire::decode_preamble(&p) {
        Ok(c) => c,
        Err(WireError::BadVersion(v)) => {
            // So that the receiver logs the mismatch too (wire::version_notice); we close anyway.
            let _ = timeout(IO_TIMEOUT, wr.write_all(&wire::version_notice())).await;
            return Err(PeerError::Version(v));
        }
        Err(e) => return Err(PeerError::Preamble(e)),
    };
    let mut m1 = Vec::with_capacity(RECORD_HEADER_LEN + HANDSHAKE_MSG_LEN);
    let initiator = Initiator::start(key, &challenge, &mut m1)?;
    timeout(IO_TIMEOUT, wr.write_all(&m1))
        .await
        .map_err(|_| PeerError::Timeout("writing the handshake"))??;
    let mut m2 = Vec::with_capacity(HANDSHAKE_MSG_LEN);
    let header = match timeout(IO_TIMEOUT, read_record(&mut rd, &mut m2)).await {
        Err(_) => return Err(PeerError::Timeout("waiting for the peer's handshake")),
        Ok(Err(PeerError::Io(e))) if closed(&e) => return Err(PeerError::HandshakeClosed),
        Ok(r) => r?,
    };
    let session = initiator.finish(&header, &m2)?;
    Ok((rd, wr, session))
}

/// The peer closed the connection (rather than some other I/O failure).
fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
    )
}

impl Sender<'_> {
    /// Hello; then nothing but heartbeats until the receiver's Ack. A receiver that rejects the
    /// Hello (a node peered with itself) closes the connection instead, so it never makes the
    /// agent walk its flow table.
    async fn hello(
        &mut self,
        ctx: &Ctx,
        rd: &mut OwnedReadHalf,
        heartbeat: &mut Interval,
        stream: &mut Stream,
    ) -> Result<(), PeerError> {
        let hello = Message::Hello {
            node_id: ctx.node_id,
            listen_port: ctx.listen_port,
        };
        self.send(&hello, stream).await?;
        let mut msg = Vec::new();
        let read = timeout(IO_TIMEOUT, read_record(rd, &mut msg));
        let header = match self.keep_alive_while(read, heartbeat, stream).await? {
            Err(_) => return Err(PeerError::Timeout("waiting for the peer's Ack")),
            Ok(Err(PeerError::Io(e))) if closed(&e) => return Err(PeerError::NotAcknowledged),
            Ok(r) => r?,
        };
        match self.session.open(&header, &msg)?.msg {
            Message::Ack => Ok(()),
            other => Err(PeerError::NotAck(other.kind())),
        }
    }
}
