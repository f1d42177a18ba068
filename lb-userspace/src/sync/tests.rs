//! In-process tests of whole sync instances on 127.0.0.1: a channel stands in for the kernel's
//! ring buffer and a task answering `SyncRequest`s from a hash map stands in for the agent loop.

use super::{
    ChannelSource, PeersReport, SyncConfig, SyncHandle, SyncKey, SyncRequest, spawn,
    wire::{self, CHALLENGE_MSG_LEN, Message, tests::flow},
};
use crate::dataplane::InstallReport;
use lb_common::{FlowEvent, FlowKey};
use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

const KEY: &str = "test-key-0123456789abcdef";
/// Every wait in these tests gives up after this long.
const DEADLINE: Duration = Duration::from_secs(10);

type Table = Arc<Mutex<HashMap<FlowKey, u32>>>;

/// Backends every fake agent knows (the `flow()` helper spreads over these three).
fn known_backends() -> HashSet<u32> {
    (0..3).map(|i| (0x0a6f_010bu32 + i).to_be()).collect()
}

struct Node {
    handle: SyncHandle,
    cancel: CancellationToken,
    tasks: TaskTracker,
    events: mpsc::Sender<FlowEvent>,
    table: Table,
    installs: Arc<AtomicU64>,
    /// Snapshot requests the fake agent answered.
    snapshots: Arc<AtomicU64>,
    agent: JoinHandle<()>,
}

/// The agent loop's part: install known backends, count the rest, list the table.
fn fake_agent(
    mut rx: mpsc::Receiver<SyncRequest>,
    table: Table,
    installs: Arc<AtomicU64>,
    snapshots: Arc<AtomicU64>,
    install_delay: Duration,
    snapshot_delay: Duration,
) -> JoinHandle<()> {
    let backends = known_backends();
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            match req {
                SyncRequest::Install { flows, reply } => {
                    installs.fetch_add(1, Relaxed);
                    if !install_delay.is_zero() {
                        tokio::time::sleep(install_delay).await;
                    }
                    let mut report = InstallReport::default();
                    let mut t = table.lock().unwrap();
                    for f in flows {
                        if backends.contains(&f.backend_addr) {
                            t.insert(f.flow, f.backend_addr);
                            report.installed += 1;
                        } else {
                            report.unknown_backend += 1;
                        }
                    }
                    drop(t);
                    let _ = reply.send(Ok(report));
                }
                SyncRequest::Snapshot { reply, .. } => {
                    snapshots.fetch_add(1, Relaxed);
                    // A big table: the real loop is busy for this long (serving nothing else).
                    if !snapshot_delay.is_zero() {
                        tokio::time::sleep(snapshot_delay).await;
                    }
                    let flows = table
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(k, b)| FlowEvent {
                            flow: *k,
                            backend_addr: *b,
                            _pad: 0,
                        })
                        .collect();
                    let _ = reply.send(Ok(flows));
                }
            }
        }
    })
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

struct NodeOpts {
    key: &'static str,
    stream_buffer: usize,
    install_delay: Duration,
    snapshot_delay: Duration,
    heartbeat: Duration,
    table: Option<Table>,
}

impl Default for NodeOpts {
    fn default() -> Self {
        NodeOpts {
            key: KEY,
            stream_buffer: super::DEFAULT_STREAM_BUFFER,
            install_delay: Duration::ZERO,
            snapshot_delay: Duration::ZERO,
            heartbeat: super::DEFAULT_HEARTBEAT,
            table: None,
        }
    }
}

async fn start(listen: SocketAddr, peers: Vec<SocketAddr>, opts: NodeOpts) -> Node {
    let key = SyncKey::from_bytes(opts.key.as_bytes()).unwrap();
    let mut config = SyncConfig::new(listen, peers, key).unwrap();
    config.stream_buffer = opts.stream_buffer;
    config.heartbeat = opts.heartbeat;
    let (events, source) = mpsc::channel(65_536);
    let (req_tx, req_rx) = mpsc::channel(super::SYNC_REQUEST_QUEUE);
    let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
    let table = opts.table.unwrap_or_default();
    let installs = Arc::new(AtomicU64::new(0));
    let snapshots = Arc::new(AtomicU64::new(0));
    let agent = fake_agent(
        req_rx,
        table.clone(),
        installs.clone(),
        snapshots.clone(),
        opts.install_delay,
        opts.snapshot_delay,
    );
    let handle = spawn(
        config,
        ChannelSource(source),
        req_tx,
        cancel.clone(),
        &tasks,
    )
    .await
    .unwrap();
    Node {
        handle,
        cancel,
        tasks,
        events,
        table,
        installs,
        snapshots,
        agent,
    }
}

impl Node {
    /// What the kernel does for a new flow: insert it locally and report it.
    async fn new_flow(&self, f: FlowEvent) {
        self.table.lock().unwrap().insert(f.flow, f.backend_addr);
        self.events.send(f).await.unwrap();
    }

    fn len(&self) -> usize {
        self.table.lock().unwrap().len()
    }

    fn has(&self, f: &FlowEvent) -> bool {
        self.table.lock().unwrap().get(&f.flow) == Some(&f.backend_addr)
    }

    fn report(&self) -> PeersReport {
        self.handle.report()
    }

    async fn stop(self) -> Table {
        self.cancel.cancel();
        self.tasks.close();
        tokio::time::timeout(DEADLINE, self.tasks.wait())
            .await
            .expect("sync tasks end after shutdown");
        // The sync's request senders are gone, so the fake agent ends too.
        tokio::time::timeout(DEADLINE, self.agent)
            .await
            .expect("fake agent ends")
            .unwrap();
        self.table
    }
}

/// Poll `cond` every millisecond; the time it took, or a panic with `what` after `DEADLINE`.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_stream_both_ways_and_unknown_backends_are_counted() {
    let (a_addr, b_addr) = (free_port(), free_port());
    let a = start(a_addr, vec![b_addr], NodeOpts::default()).await;
    let b = start(b_addr, vec![a_addr], NodeOpts::default()).await;
    wait_for("both connected", || {
        a.report().peers[0].connected && b.report().peers[0].connected
    })
    .await;

    let flows: Vec<FlowEvent> = (0..1000).map(flow).collect();
    for f in &flows {
        a.new_flow(*f).await;
    }
    let took = wait_for("B has A's flows", || flows.iter().all(|f| b.has(f))).await;
    println!("1000 flows A→B visible on B after {took:?}");
    let back = flow(5000);
    b.new_flow(back).await;
    wait_for("A has B's flow", || a.has(&back)).await;

    // A backend B does not have: counted, not installed.
    let mut stray = flow(7000);
    stray.backend_addr = u32::from_be_bytes([192, 0, 2, 1]).to_be();
    a.new_flow(stray).await;
    wait_for("unknown backend counted", || {
        b.report().peers[0].unknown_backend == 1
    })
    .await;
    assert!(!b.table.lock().unwrap().contains_key(&stray.flow));

    let ra = a.report();
    let rb = b.report();
    assert!(ra.peers[0].flows_sent >= 1001, "{ra:?}");
    assert!(rb.peers[0].flows_received >= 1001, "{rb:?}");
    assert_eq!(rb.peers[0].inbound_connections, 1);
    assert_eq!(ra.totals.local_flows, 1001);
    assert_eq!(rb.totals.rejected, 0);
    assert!(rb.lag.p99_ms.is_some());
    assert!(rb.peers[0].last_msg_age_ms.is_some());
    println!("{}", super::render_table(&rb));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_gets_the_snapshot() {
    let (a_addr, b_addr) = (free_port(), free_port());
    let a = start(a_addr, vec![b_addr], NodeOpts::default()).await;
    let b = start(b_addr, vec![a_addr], NodeOpts::default()).await;
    let flows: Vec<FlowEvent> = (0..500).map(flow).collect();
    for f in &flows {
        a.new_flow(*f).await;
    }
    wait_for("B has A's flows", || flows.iter().all(|f| b.has(f))).await;

    // B goes away, its table with it; A keeps assigning flows meanwhile.
    let old = b.stop().await;
    assert_eq!(old.lock().unwrap().len(), 500);
    wait_for("A notices", || !a.report().peers[0].connected).await;
    let while_down = flow(9000);
    a.new_flow(while_down).await;

    let b = start(b_addr, vec![a_addr], NodeOpts::default()).await;
    let took = wait_for("restarted B has A's whole table", || {
        b.len() == 501 && b.has(&while_down)
    })
    .await;
    println!("restarted node had the peer's 501 flows after {took:?}");
    // And the stream continues.
    let after = flow(9001);
    a.new_flow(after).await;
    wait_for("B gets new flows", || b.has(&after)).await;
    let ra = a.report();
    assert!(ra.peers[0].connected);
    assert!(ra.peers[0].flows_sent > 500 + 501, "{ra:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_key_is_rejected_and_installs_nothing() {
    let (a_addr, b_addr) = (free_port(), free_port());
    let a = start(
        a_addr,
        vec![b_addr],
        NodeOpts {
            key: "not-the-right-key-at-all",
            ..NodeOpts::default()
        },
    )
    .await;
    let b = start(b_addr, vec![a_addr], NodeOpts::default()).await;
    for i in 0..10 {
        a.new_flow(flow(i)).await;
    }
    let started = Instant::now();
    let since = a.report().peers[0].since_unix_ms;
    // Two rejections: the first connection and at least one reconnect.
    wait_for("B rejects twice", || b.report().peers[0].rejected >= 2).await;
    // No storm: B never acknowledges, so A's backoff keeps growing (100, 200, 400, 800 ms, then
    // every second): about 5 attempts in 2 s, where resetting the backoff made it ~20.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(started.elapsed())).await;
    let rb = b.report();
    assert!(
        rb.peers[0].rejected <= 7,
        "{} attempts in 2 s",
        rb.peers[0].rejected
    );
    assert_eq!(rb.peers[0].flows_received, 0);
    assert_eq!(rb.totals.rejected, rb.peers[0].rejected);
    assert_eq!(b.len(), 0);
    assert_eq!(b.installs.load(Relaxed), 0, "no install request at all");
    // And it never cost A a flow-table walk, nor did A ever count as connected.
    assert_eq!(
        a.snapshots.load(Relaxed),
        0,
        "no snapshot for a rejecting peer"
    );
    let ra = a.report();
    assert!(!ra.peers[0].connected);
    assert_eq!(ra.peers[0].since_unix_ms, since, "never connected");
    assert_eq!(ra.peers[0].flows_sent, 0);
    a.stop().await;
    b.stop().await;
}

/// Read one frame by hand: its header and its payload (the tag is read and not checked).
async fn read_frame(s: &mut TcpStream) -> (wire::Header, Vec<u8>) {
    let mut head = [0u8; wire::HEADER_LEN];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut head))
        .await
        .expect("a frame in time")
        .unwrap();
    let header = wire::decode_header(&head).unwrap();
    let mut body = vec![0u8; header.payload_len as usize + wire::TAG_LEN];
    s.read_exact(&mut body).await.unwrap();
    body.truncate(header.payload_len as usize);
    (header, body)
}

/// Waits until the other end closes `s` (EOF or reset); returns what it sent before.
async fn closed_by_peer(s: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let r = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .expect("the other end closes the connection");
    assert!(
        r.is_ok() || rest.is_empty(),
        "{r:?} after {} bytes",
        rest.len()
    );
    rest
}

/// The sender authenticates the receiver: a listener that does not have the key (it answers
/// with an Ack made with another key, or closes instead of answering) gets Hello and
/// AckRequest, and nothing else — no snapshot is even asked of the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_without_the_key_gets_no_flows() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = listener.local_addr().unwrap();
    let a = start(free_port(), vec![fake], NodeOpts::default()).await;
    a.new_flow(flow(1)).await;
    let since = a.report().peers[0].since_unix_ms;
    let other = SyncKey::from_bytes(b"some-other-key-0123").unwrap();
    for answer_with_ack in [true, false] {
        let (mut s, _) = tokio::time::timeout(DEADLINE, listener.accept())
            .await
            .expect("A connects")
            .unwrap();
        let challenge = [u8::from(answer_with_ack); wire::CHALLENGE_LEN];
        s.write_all(&wire::encode_challenge(&challenge))
            .await
            .unwrap();
        let (hello, _) = read_frame(&mut s).await;
        assert_eq!(hello.kind, wire::Kind::Hello);
        let (req, payload) = read_frame(&mut s).await;
        assert_eq!(req.kind, wire::Kind::AckRequest);
        let Ok(Message::AckRequest { nonce }) = wire::decode_payload(req.kind, &payload) else {
            panic!("not an AckRequest: {payload:?}");
        };
        if answer_with_ack {
            // Well-formed and for this very connection, but not made with the shared key.
            let proof = other.ack_proof(&challenge, hello.node_id, &nonce);
            s.write_all(&wire::encode_ack(&proof)).await.unwrap();
            assert!(
                closed_by_peer(&mut s).await.is_empty(),
                "nothing after a bad Ack"
            );
        } else {
            drop(s); // what a receiver that rejects the Hello does
        }
    }
    assert_eq!(a.snapshots.load(Relaxed), 0);
    let ra = a.report();
    assert!(!ra.peers[0].connected);
    assert_eq!(ra.peers[0].since_unix_ms, since, "never connected");
    assert_eq!(ra.peers[0].flows_sent, 0);
    a.stop().await;
}

/// A snapshot the agent takes long to produce (a big table) must not let the connection go
/// idle: the receiver drops a connection silent for 5 heartbeats, and the reconnect would ask
/// for another snapshot, and so on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_snapshot_does_not_starve_the_connection() {
    let (a_addr, b_addr) = (free_port(), free_port());
    let heartbeat = Duration::from_millis(50);
    let table: Table = Table::default();
    table
        .lock()
        .unwrap()
        .extend((0..100).map(flow).map(|f| (f.flow, f.backend_addr)));
    let a = start(
        a_addr,
        vec![b_addr],
        NodeOpts {
            heartbeat,
            // 20 heartbeats; B gives up after 5 silent ones.
            snapshot_delay: heartbeat * 20,
            table: Some(table),
            ..NodeOpts::default()
        },
    )
    .await;
    let b = start(
        b_addr,
        vec![],
        NodeOpts {
            heartbeat,
            ..NodeOpts::default()
        },
    )
    .await;
    wait_for("B has A's snapshot", || b.len() == 100).await;
    tokio::time::sleep(heartbeat * 10).await;
    assert_eq!(
        a.snapshots.load(Relaxed),
        1,
        "the first connection survived the wait"
    );
    let ra = a.report();
    assert!(ra.peers[0].connected, "{ra:?}");
    assert_eq!(b.report().peers.len(), 0);
    assert_eq!(b.report().totals.rejected, 0);
    let f = flow(1000);
    a.new_flow(f).await;
    wait_for("the stream continues", || b.has(&f)).await;
    a.stop().await;
    b.stop().await;
}

/// Speak the protocol by hand: a good frame is installed, the same frame replayed in its
/// connection and replayed into a new connection are both rejected and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_frames_over_tcp_are_rejected() {
    let b_addr = free_port();
    let b = start(b_addr, vec![], NodeOpts::default()).await;
    let key = SyncKey::from_bytes(KEY.as_bytes()).unwrap();

    async fn connect(addr: SocketAddr) -> (TcpStream, wire::Challenge) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut c = [0u8; CHALLENGE_MSG_LEN];
        s.read_exact(&mut c).await.unwrap();
        (s, wire::decode_challenge(&c).unwrap())
    }

    let (mut s, challenge) = connect(b_addr).await;
    let mut sealer = super::auth::Sealer::new(&key, &challenge, 99);
    let (mut hello, mut flows) = (Vec::new(), Vec::new());
    sealer
        .seal(&Message::Hello { listen_port: 1 }, 0, &mut hello)
        .unwrap();
    let good = flow(1);
    sealer
        .seal(
            &Message::Flows(Cow::Owned(vec![good])),
            super::status::unix_ns(),
            &mut flows,
        )
        .unwrap();
    s.write_all(&hello).await.unwrap();
    s.write_all(&flows).await.unwrap();
    wait_for("good flow installed", || b.has(&good)).await;
    // Replay in the same connection.
    s.write_all(&flows).await.unwrap();
    closed_by_peer(&mut s).await;
    wait_for("replay counted", || b.report().totals.rejected == 1).await;

    // Replay of the recorded frames into a new connection (new challenge).
    let (mut s, _) = connect(b_addr).await;
    s.write_all(&hello).await.unwrap();
    s.write_all(&flows).await.unwrap();
    closed_by_peer(&mut s).await;
    wait_for("cross-session replay counted", || {
        b.report().totals.rejected == 2
    })
    .await;

    // A forged frame: right format, made with another key.
    let (mut s, challenge) = connect(b_addr).await;
    let other = SyncKey::from_bytes(b"some-other-key-0123").unwrap();
    let mut forged = Vec::new();
    super::auth::Sealer::new(&other, &challenge, 98)
        .seal(&Message::Hello { listen_port: 1 }, 0, &mut forged)
        .unwrap();
    s.write_all(&forged).await.unwrap();
    closed_by_peer(&mut s).await;
    // Garbage that is not a frame at all.
    let (mut s, _) = connect(b_addr).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789")
        .await
        .unwrap();
    closed_by_peer(&mut s).await;
    wait_for("forged and garbage counted", || {
        b.report().totals.rejected == 4
    })
    .await;
    let rb = b.report();
    assert_eq!(rb.totals.rejected_unknown_source, 4, "no peers configured");
    assert_eq!(b.len(), 1, "only the authentic flow");
    assert_eq!(b.installs.load(Relaxed), 1);
    b.stop().await;
}

/// A sender that falls behind the stream resends the table instead of losing flows. On the
/// current-thread runtime the reader publishes several batches before the sender runs, so with
/// room for one batch the sender is bound to lag.
#[tokio::test]
async fn a_lagging_sender_resyncs_with_a_snapshot() {
    let (a_addr, b_addr) = (free_port(), free_port());
    let a = start(
        a_addr,
        vec![b_addr],
        NodeOpts {
            stream_buffer: 1,
            ..NodeOpts::default()
        },
    )
    .await;
    let b = start(b_addr, vec![], NodeOpts::default()).await;
    wait_for("connected", || a.report().peers[0].connected).await;
    wait_for("initial snapshot sent", || {
        a.report().peers[0].last_msg_age_ms.is_some()
    })
    .await;
    // Queued without yielding (an awaited send may yield to the reader every few events).
    let flows: Vec<FlowEvent> = (0..20_000).map(flow).collect();
    for f in &flows {
        a.table.lock().unwrap().insert(f.flow, f.backend_addr);
        a.events.try_send(*f).unwrap();
    }
    wait_for("B has every flow", || b.len() == flows.len()).await;
    assert!(flows.iter().all(|f| b.has(f)));
    let ra = a.report();
    assert!(ra.peers[0].resyncs >= 1, "{ra:?}");
    assert_eq!(ra.totals.resyncs, ra.peers[0].resyncs);
    a.stop().await;
    b.stop().await;
}

/// After a lag the sender resubscribes and, while it waits for the resync's snapshot, keeps
/// taking new batches (sent after the snapshot): a steady stream during a slow snapshot does not
/// overflow the small buffer again, so there is exactly one resync. Current-thread runtime, as
/// above, so that the burst is published before the sender runs.
#[tokio::test]
async fn a_resync_keeps_reading_the_stream_and_does_not_loop() {
    let (a_addr, b_addr) = (free_port(), free_port());
    let a = start(
        a_addr,
        vec![b_addr],
        NodeOpts {
            stream_buffer: 2,
            snapshot_delay: Duration::from_millis(300),
            ..NodeOpts::default()
        },
    )
    .await;
    let b = start(b_addr, vec![], NodeOpts::default()).await;
    let first = flow(0);
    a.new_flow(first).await;
    wait_for("the first snapshot arrived", || b.has(&first)).await;
    let queue = |f: FlowEvent| {
        a.table.lock().unwrap().insert(f.flow, f.backend_addr);
        a.events.try_send(f).unwrap();
    };
    // About 10 full batches at once: the sender lags.
    (1..40_001).map(flow).for_each(queue);
    wait_for("the resync started", || a.report().peers[0].resyncs == 1).await;
    // One batch every 10 ms for as long as the resync's snapshot takes: 30 batches, 15 times the
    // buffer.
    for round in 0..30u32 {
        (0..100)
            .map(|i| flow(50_000 + round * 100 + i))
            .for_each(queue);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = 1 + 40_000 + 3000;
    wait_for("B has every flow", || b.len() == total).await;
    let ra = a.report();
    assert_eq!(ra.peers[0].resyncs, 1, "{ra:?}");
    assert_eq!(a.snapshots.load(Relaxed), 2, "the first one and the resync");
    a.stop().await;
    b.stop().await;
}

/// Connections that never authenticate are closed after [`HELLO_TIMEOUT`] and counted, and
/// while they are open they cannot lock a configured peer out: at most 4 per address and 32
/// from all strangers together (127.0.0.2..=127.0.0.10 play the strangers; the peer is on
/// 127.0.0.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_hold_the_inbound_slots() {
    use super::peer::HELLO_TIMEOUT;
    let (a_addr, b_addr) = (free_port(), free_port());
    let b = start(b_addr, vec![a_addr], NodeOpts::default()).await;
    let open_from = |host: u8| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from(([127, 0, 0, host], 0))).unwrap();
        tokio::time::timeout(DEADLINE, sock.connect(b_addr))
            .await
            .expect("connect in time")
            .unwrap()
    };
    // Whether B admitted the connection (sent the challenge) or closed it at once.
    async fn admitted(s: &mut TcpStream) -> bool {
        let mut c = [0u8; CHALLENGE_MSG_LEN];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut c))
            .await
            .expect("challenge or close in time")
            .is_ok()
    }
    let opened = Instant::now();
    let mut idle = Vec::new();
    for host in 2..=9u8 {
        for _ in 0..4 {
            let mut s = open_from(host).await;
            assert!(admitted(&mut s).await, "from 127.0.0.{host}");
            idle.push(s);
        }
        let mut s = open_from(host).await;
        assert!(!admitted(&mut s).await, "a 5th from 127.0.0.{host}");
    }
    let mut s = open_from(10).await;
    assert!(!admitted(&mut s).await, "a 33rd from strangers");

    // The configured peer still gets in while those wait for their deadline.
    let a = start(a_addr, vec![b_addr], NodeOpts::default()).await;
    wait_for("A connected to B", || a.report().peers[0].connected).await;
    let f = flow(1);
    a.new_flow(f).await;
    wait_for("B has A's flow", || b.has(&f)).await;
    assert!(
        opened.elapsed() < HELLO_TIMEOUT,
        "too slow to show anything"
    );
    assert_eq!(b.report().totals.inbound_other, 32);

    for s in &mut idle {
        closed_by_peer(s).await;
    }
    assert!(opened.elapsed() >= HELLO_TIMEOUT);
    wait_for("all 32 counted", || {
        let t = b.report().totals;
        t.rejected_unknown_source == 32 && t.inbound_other == 0
    })
    .await;
    assert_eq!(b.report().totals.rejected, 32);
    // Their slots are free again.
    let mut s = open_from(10).await;
    assert!(admitted(&mut s).await);
    drop(s);
    a.stop().await;
    b.stop().await;
}

/// Sync lag at a steady 10k flows/s and burst throughput, printed, not asserted (timing depends
/// on the machine): a measurement, so it is not part of the unit tests. Run it alone and
/// optimised: `cargo test -p lb-userspace --release sync::tests::measure -- --ignored
/// --nocapture --test-threads=1`. (`cargo xtask bench` measures the burst end to end, into a
/// kernel flow table.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run it with --ignored"]
async fn measure_throughput_and_lag_over_loopback() {
    // Steady rate: 20 flows every 2 ms (10k flows/s), one second.
    let (a_addr, b_addr) = (free_port(), free_port());
    let a = start(a_addr, vec![b_addr], NodeOpts::default()).await;
    let b = start(b_addr, vec![], NodeOpts::default()).await;
    wait_for("connected", || a.report().peers[0].connected).await;
    let mut next = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    for _ in 0..500 {
        tick.tick().await;
        for _ in 0..20 {
            a.new_flow(flow(next)).await;
            next += 1;
        }
    }
    wait_for("steady flows arrive", || b.len() == next as usize).await;
    let lag = b.report().lag;
    println!(
        "sync lag at 10k flows/s: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms over {} batches",
        lag.p50_ms.unwrap(),
        lag.p99_ms.unwrap(),
        lag.max_ms.unwrap(),
        lag.window
    );
    a.stop().await;
    b.stop().await;

    // Burst: 200k flows as fast as the source takes them.
    const N: u32 = 200_000;
    let (a_addr, b_addr) = (free_port(), free_port());
    let a = start(a_addr, vec![b_addr], NodeOpts::default()).await;
    let b = start(b_addr, vec![], NodeOpts::default()).await;
    wait_for("connected", || a.report().peers[0].connected).await;
    let flows: Vec<FlowEvent> = (0..N).map(flow).collect();
    let started = Instant::now();
    let events = a.events.clone();
    let feeder = tokio::spawn(async move {
        for f in flows {
            events.send(f).await.unwrap();
        }
    });
    let took = wait_for("200k flows arrive", || b.len() == N as usize).await;
    feeder.await.unwrap();
    let elapsed = started.elapsed().max(took);
    let rb = b.report();
    println!(
        "burst: {N} flows A→B in {elapsed:?} = {:.0} flows/s; lag p50 {:.3} ms, p99 {:.3} ms over {} batches; resyncs {}",
        f64::from(N) / elapsed.as_secs_f64(),
        rb.lag.p50_ms.unwrap(),
        rb.lag.p99_ms.unwrap(),
        rb.lag.window,
        a.report().totals.resyncs
    );
    a.stop().await;
    b.stop().await;
}
