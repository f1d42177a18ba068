//! The receiving side of peer sync: the listener admits connections (bounded per address and
//! for strangers), and one receiver per connection sends the challenge, authenticates every frame,
//! answers the AckRequest and hands flows to the agent.

use super::{
    SyncRequest,
    auth::{AuthError, Opener, new_challenge},
    peer::{BACKOFF_MIN, Ctx, HELLO_TIMEOUT, IO_TIMEOUT, PeerError},
    status::unix_ns,
    wire::{self, HEADER_LEN, Kind, Message, TAG_LEN},
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
    /// Challenge, then frames until the connection fails or closes.
    async fn run(&mut self, stream: TcpStream) -> Result<(), PeerError> {
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
        let mut opener = Opener::new(&self.ctx.key, &challenge);
        let mut rd = BufReader::with_capacity(2 * wire::MAX_FRAME_LEN, rd);
        let mut head = [0u8; HEADER_LEN];
        let mut body = Vec::new();
        loop {
            let header = self
                .read_frame(&mut rd, &mut head, &mut body, hello_deadline)
                .await?;
            let (payload, tag) = body.split_at(header.payload_len as usize);
            let msg = opener
                .open(&header, &head, payload, tag)
                .map_err(|e| self.reject(&e))?;
            if !self.hello && msg.kind() != Kind::Hello {
                let reason = format!("first frame is {}, not Hello", msg.kind());
                return Err(self.reject(&reason));
            }
            self.ctx.status.peer(self.peer).touch();
            match msg {
                Message::Hello { listen_port } => self.on_hello(&header, listen_port)?,
                Message::Flows(flows) => self.on_flows(&header, flows.into_owned(), false).await?,
                Message::Snapshot(flows) => {
                    self.on_flows(&header, flows.into_owned(), true).await?;
                }
                Message::SnapshotEnd { total } => self.on_snapshot_end(total),
                Message::Heartbeat => {}
                Message::AckRequest { nonce } => {
                    // Only right after Hello (the sender waits for the Ack before anything else).
                    if header.seq != 2 {
                        let reason = format!("AckRequest as frame {}, not 2", header.seq);
                        return Err(self.reject(&reason));
                    }
                    // Proves to the sender that this node has the key, bound to this
                    // connection's challenge and the sender's fresh nonce.
                    let proof = self.ctx.key.ack_proof(&challenge, header.node_id, &nonce);
                    timeout(IO_TIMEOUT, wr.write_all(&wire::encode_ack(&proof)))
                        .await
                        .map_err(|_| PeerError::Timeout("sending the Ack"))??;
                }
            }
        }
    }

    /// Read one frame's header into `head` and its payload and tag into `body`. Before the Hello
    /// everything must arrive by `hello_deadline`; after it, a header within the idle limit and
    /// the rest of the frame within `IO_TIMEOUT`.
    async fn read_frame(
        &self,
        rd: &mut (impl AsyncReadExt + Unpin),
        head: &mut [u8; HEADER_LEN],
        body: &mut Vec<u8>,
        hello_deadline: Instant,
    ) -> Result<wire::Header, PeerError> {
        let idle = self.ctx.heartbeat * IDLE_HEARTBEATS;
        let deadline = |after: Duration| {
            if self.hello {
                Instant::now() + after
            } else {
                hello_deadline
            }
        };
        match timeout_at(deadline(idle), rd.read_exact(head)).await {
            Err(_) if !self.hello => return Err(PeerError::NoHello),
            Err(_) => return Err(PeerError::Idle(idle)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(PeerError::Closed);
            }
            Ok(r) => r?,
        };
        // Only the header's length field is trusted before the tag is checked, and only within
        // the kind's limit that `decode_header` enforces (at most one maximal frame is buffered).
        let header =
            wire::decode_header(head).map_err(|e| self.reject(&AuthError::Malformed(e)))?;
        body.resize(header.payload_len as usize + TAG_LEN, 0);
        match timeout_at(deadline(IO_TIMEOUT), rd.read_exact(body)).await {
            Err(_) if !self.hello => Err(PeerError::NoHello),
            Err(_) => Err(PeerError::Timeout("reading a frame")),
            Ok(r) => r.map(|_| header).map_err(PeerError::from),
        }
    }

    /// Count, log and close for a frame that must not be trusted.
    fn reject(&self, reason: &dyn std::fmt::Display) -> PeerError {
        self.ctx
            .status
            .peer(self.peer)
            .rejected
            .fetch_add(1, Relaxed);
        log::warn!(
            "sync: rejected a frame from {}: {reason}; closing the connection",
            self.remote
        );
        PeerError::Rejected
    }

    fn on_hello(&mut self, header: &wire::Header, listen_port: u16) -> Result<(), PeerError> {
        let (ctx, remote) = (self.ctx, self.remote);
        if self.hello {
            return Err(PeerError::SecondHello);
        }
        if header.node_id == ctx.node_id {
            return Err(PeerError::SelfPeer(header.node_id));
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
                header.node_id
            );
        }
        log::info!(
            "sync: peer {remote} (node {:016x}, listening on port {listen_port}) connected",
            header.node_id
        );
        ctx.status.peer(self.peer).touch();
        Ok(())
    }

    /// Install a Flows or Snapshot frame's flows and count them; a Flows frame is also a lag
    /// sample.
    async fn on_flows(
        &mut self,
        header: &wire::Header,
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
                .record_lag_ns(unix_ns().saturating_sub(header.sent_ns));
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
        }
    }
}
