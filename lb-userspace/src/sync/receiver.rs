//! The receiving side of peer sync: the listener admits connections (bounded per address and
//! for strangers), and one receiver per connection sends the preamble, answers the Noise
//! handshake, decrypts and authenticates every record, answers the Hello with an Ack and hands
//! flows to the agent.

use super::{
    SyncRequest,
    noise::{self, NoiseError, new_challenge},
    peer::{BACKOFF_MIN, Ctx, HELLO_TIMEOUT, IO_TIMEOUT, PeerError},
    status::unix_ns,
    wire::{self, Frame, Kind, Message, RECORD_HEADER_LEN, RecordHeader},
};
use crate::dataplane::InstallReport;
use lb_common::FlowEvent;
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
    time::{Instant, sleep, timeout, timeout_at},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A receiver closes a connection that sent nothing for this many heartbeat intervals.
const IDLE_HEARTBEATS: u32 = 5;
/// Open inbound connections at most (a peer has one; the rest is misconfiguration or abuse).
const MAX_INBOUND: usize = 64;
/// Unauthenticated (no valid Hello yet) connections at most from one address...
const MAX_UNAUTHENTICATED_PER_IP: usize = 4;
/// ... and from all addresses that are not configured peers together: the other half of
/// [`MAX_INBOUND`] stays free for configured peers, whatever strangers do.
const MAX_UNAUTHENTICATED_OTHER: usize = MAX_INBOUND / 2;

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

/// Accept peers' connections until cancelled; each connection's receiver runs as a task of
/// `tasks` and ends with the same token.
pub(super) async fn listen(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let gate = Arc::new(Gate::default());
    let open = Arc::new(Semaphore::new(MAX_INBOUND));
    // Refusals are logged at the 1st, 2nd, 4th, 8th... so a flood cannot flood the log.
    let mut refused = 0u64;
    loop {
        let (stream, remote) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Typically out of file descriptors: pause instead of spinning.
                    log::warn!("sync: accepting a connection: {e}");
                    sleep(BACKOFF_MIN).await;
                    continue;
                }
            },
        };
        let admitted = match open.clone().try_acquire_owned() {
            Err(_) => Err(format!("{MAX_INBOUND} connections already open")),
            Ok(slot) => {
                let configured = ctx.status.match_peer(remote.ip(), None).is_some();
                gate.admit(remote.ip(), configured)
                    .map(|unauth| (slot, unauth))
            }
        };
        match admitted {
            Ok((slot, unauth)) => {
                tasks.spawn(inbound(
                    stream,
                    remote,
                    ctx.clone(),
                    (slot, unauth),
                    cancel.clone(),
                ));
            }
            Err(why) => {
                refused += 1;
                if refused.is_power_of_two() {
                    log::warn!(
                        "sync: refusing a connection from {remote}: {why} ({refused} refused so far)"
                    );
                }
            }
        }
    }
}

/// One accepted connection, holding one of the inbound slots until it ends.
async fn inbound(
    stream: TcpStream,
    remote: SocketAddr,
    ctx: Arc<Ctx>,
    (_slot, unauth): (OwnedSemaphorePermit, Unauthenticated),
    cancel: CancellationToken,
) {
    // Attributed by IP until Hello names the sender's listen port.
    let peer = ctx.status.match_peer(remote.ip(), None);
    ctx.status.peer(peer).inbound_opened();
    let mut rx = Receiver {
        ctx: &ctx,
        remote,
        peer,
        unauth: Some(unauth),
        hello: false,
        tally: SnapshotTally::default(),
    };
    let result = tokio::select! {
        () = cancel.cancelled() => Ok(()),
        r = rx.run(stream) => r,
    };
    let peer = rx.peer;
    ctx.status.peer(peer).inbound_closed();
    match result {
        Ok(()) | Err(PeerError::Rejected) => {}
        Err(PeerError::Closed) => log::info!("sync: peer {remote} disconnected"),
        // Not counted: port probes do this too. It is also what a node of an older xlb does
        // after it read our preamble (and logs "unsupported version" on its side).
        Err(PeerError::ClosedBeforeHandshake) => {
            log::info!(
                "sync: connection from {remote} closed before its handshake (a node of another xlb version does this; see its log)"
            );
        }
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

/// The receiving end of one accepted connection.
struct Receiver<'a> {
    ctx: &'a Ctx,
    remote: SocketAddr,
    /// The configured peer it is attributed to (`None`: "other").
    peer: Option<usize>,
    /// The connection's admission slot among the unauthenticated, until its Hello verified.
    unauth: Option<Unauthenticated>,
    hello: bool,
    tally: SnapshotTally,
}

impl Receiver<'_> {
    /// Preamble, handshake, then records until the connection fails or closes.
    async fn run(&mut self, stream: TcpStream) -> Result<(), PeerError> {
        // Everything up to a valid Hello must happen within this, whatever the sender trickles.
        let hello_deadline = Instant::now() + HELLO_TIMEOUT;
        stream.set_nodelay(true)?;
        let (rd, mut wr) = stream.into_split();
        let challenge = new_challenge()?;
        timeout_at(
            hello_deadline,
            wr.write_all(&wire::encode_preamble(&challenge)),
        )
        .await
        .map_err(|_| PeerError::Timeout("sending the preamble"))??;
        let mut rd = BufReader::with_capacity(2 * wire::MAX_RECORD_LEN, rd);
        let mut msg = Vec::new();
        let mut out = Vec::new();
        let header = self
            .read_record(&mut rd, &mut msg, hello_deadline, true)
            .await?;
        // A sender without the key, or replaying a handshake made for another connection, fails
        // here and gets nothing back.
        let mut session = noise::respond(&self.ctx.key, &challenge, &header, &msg, &mut out)
            .map_err(|e| self.reject(&e))?;
        timeout_at(hello_deadline, wr.write_all(&out))
            .await
            .map_err(|_| PeerError::Timeout("sending the handshake"))??;
        loop {
            let header = self
                .read_record(&mut rd, &mut msg, hello_deadline, false)
                .await?;
            let Frame {
                sent_ns,
                msg: frame,
            } = session.open(&header, &msg).map_err(|e| self.reject(&e))?;
            if !self.hello && frame.kind() != Kind::Hello {
                let reason = format!("first frame is {}, not Hello", frame.kind());
                return Err(self.reject(&reason));
            }
            self.ctx.status.peer(self.peer).touch();
            match frame {
                Message::Hello {
                    node_id,
                    listen_port,
                } => {
                    self.on_hello(node_id, listen_port)?;
                    // The sender waits for this before it sends flows or asks for a snapshot.
                    out.clear();
                    session.seal(&Message::Ack, unix_ns(), &mut out)?;
                    timeout(IO_TIMEOUT, wr.write_all(&out))
                        .await
                        .map_err(|_| PeerError::Timeout("sending the Ack"))??;
                }
                Message::Flows(flows) => self.on_flows(sent_ns, flows.into_owned(), false).await?,
                Message::Snapshot(flows) => {
                    self.on_flows(sent_ns, flows.into_owned(), true).await?;
                }
                Message::SnapshotEnd { total } => self.on_snapshot_end(total),
                Message::Heartbeat => {}
                Message::Ack => return Err(self.reject(&"an Ack from the sending side")),
            }
        }
    }

    /// Read one record's header and its Noise message into `msg`. Before the Hello everything
    /// must arrive by `hello_deadline`; after it, a header within the idle limit and the rest of
    /// the record within `IO_TIMEOUT`. `first`: the handshake record, the first the sender
    /// writes.
    async fn read_record(
        &self,
        rd: &mut (impl AsyncReadExt + Unpin),
        msg: &mut Vec<u8>,
        hello_deadline: Instant,
        first: bool,
    ) -> Result<RecordHeader, PeerError> {
        let idle = self.ctx.heartbeat * IDLE_HEARTBEATS;
        let deadline = |after: Duration| {
            if self.hello {
                Instant::now() + after
            } else {
                hello_deadline
            }
        };
        let mut head = [0u8; RECORD_HEADER_LEN];
        match timeout_at(deadline(idle), rd.read_exact(&mut head)).await {
            Err(_) if !self.hello => return Err(PeerError::NoHello),
            Err(_) => return Err(PeerError::Idle(idle)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(if first {
                    PeerError::ClosedBeforeHandshake
                } else {
                    PeerError::Closed
                });
            }
            Ok(r) => r?,
        };
        // Only the header's length is trusted before the message is authenticated, and only
        // within the type's limits that `decode_record_header` enforces (at most one maximal
        // record, 64 KiB, is buffered).
        let header = wire::decode_record_header(&head)
            .map_err(|e| self.reject(&NoiseError::Malformed(e)))?;
        msg.resize(header.len, 0);
        match timeout_at(deadline(IO_TIMEOUT), rd.read_exact(msg)).await {
            Err(_) if !self.hello => Err(PeerError::NoHello),
            Err(_) => Err(PeerError::Timeout("reading a record")),
            Ok(r) => r.map(|_| header).map_err(PeerError::from),
        }
    }

    /// Count, log and close for a record that must not be trusted.
    fn reject(&self, reason: &dyn std::fmt::Display) -> PeerError {
        self.ctx
            .status
            .peer(self.peer)
            .rejected
            .fetch_add(1, Relaxed);
        log::warn!(
            "sync: rejected a record from {}: {reason}; closing the connection",
            self.remote
        );
        PeerError::Rejected
    }

    fn on_hello(&mut self, node_id: u64, listen_port: u16) -> Result<(), PeerError> {
        let (ctx, remote) = (self.ctx, self.remote);
        if self.hello {
            return Err(PeerError::SecondHello);
        }
        if node_id == ctx.node_id {
            return Err(PeerError::SelfPeer(node_id));
        }
        self.hello = true;
        // Authenticated: no longer counts against the unauthenticated limits.
        self.unauth = None;
        let matched = ctx.status.match_peer(remote.ip(), Some(listen_port));
        if matched != self.peer {
            ctx.status.peer(self.peer).inbound_closed();
            ctx.status.peer(matched).inbound_opened();
            self.peer = matched;
        }
        if matched.is_none() {
            log::warn!(
                "sync: {remote} (node {:016x}) is not a configured peer; accepting its flows (it has the key)",
                node_id
            );
        }
        log::info!(
            "sync: peer {remote} (node {:016x}, listening on port {listen_port}) connected",
            node_id
        );
        ctx.status.peer(self.peer).touch();
        Ok(())
    }

    /// Install a Flows or Snapshot frame's flows and count them; a Flows frame is also a lag
    /// sample.
    async fn on_flows(
        &mut self,
        sent_ns: u64,
        flows: Vec<FlowEvent>,
        snapshot: bool,
    ) -> Result<(), PeerError> {
        let n = flows.len() as u64;
        let report = install(self.ctx, self.remote, flows).await?;
        let stats = self.ctx.status.peer(self.peer);
        stats.flows_received.fetch_add(n, Relaxed);
        stats
            .unknown_backend
            .fetch_add(report.unknown_backend, Relaxed);
        if snapshot {
            self.tally.flows += n;
            self.tally.installed += report.installed;
            self.tally.unknown_backend += report.unknown_backend;
        } else {
            self.ctx
                .status
                .record_lag_ns(unix_ns().saturating_sub(sent_ns));
        }
        Ok(())
    }

    fn on_snapshot_end(&mut self, total: u64) {
        let remote = self.remote;
        let t = std::mem::take(&mut self.tally);
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
        } else if let Some(index) = self.peer {
            // Every flow of it is installed (each frame's install was awaited before the next
            // frame was read): the peer's table is here.
            self.ctx.status.snapshot_received(index);
        }
    }
}
