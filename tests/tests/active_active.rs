//! Active-active (issue 4, tests 1–3): lb1 and lb2 both run `xlb agent` with the same VIP and
//! backends, peered for flow sync (`--sync-listen <own>:7946 --peer <other>:7946`, one key file);
//! ipip, generic XDP (lb1's loss also in driver mode).
//!
//! 1. rtr spreads the VIP over both LBs (ECMP, L4 hash); 30 long downloads run through both; lb1 is
//!    taken away (nexthop removed, agent SIGKILLed, link down): every download completes intact on
//!    the backend it started on, and lb2 never misses a flow.
//! 2. The VIP goes via lb1 only; lb2's agent is restarted in the middle of long downloads, pulls
//!    lb1's table (the snapshot) and then takes over the route without losing a connection.
//! 3. The test plays a peer by hand: forged (wrong key), replayed and reordered records are
//!    rejected, counted and logged, and leave the flow table as it was.
//! 4. tcpdump on the sync link while real connections are synced: no client address or port
//!    pair in clear.
//!
//! Each prints a `SYNC …` line with what it measured (lag, snapshot time, mid-flow misses).

use lb_common::{FlowEvent, FlowKey};
use serde_json::Value;
use std::{
    borrow::Cow,
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use xlb::sync::{
    PeersReport, SyncKey,
    noise::{Initiator, Session},
    wire::{
        self, Challenge, Message, PREAMBLE_LEN, RECORD_HEADER_LEN, RecordHeader, decode_preamble,
        decode_record_header,
    },
};
use xlb_tests::{
    backend::HTTP_PORT,
    capture::{Capture, contains, count},
    cmd::wait_for,
    downloads::{Finished, LongDownloads},
    netns::require_root,
    testbed::{SYNC_PORT, Testbed, TestbedOptions},
    topology::{CLI_ADDR, HOST_IFACE, LB1_ADDR, LB2_ADDR, VIP, backend_addr},
    xlb::{backend_counters, counter, event, find_vip},
};

/// Long downloads in test 1 (the number).
const CONNECTIONS: usize = 30;
/// Long downloads in test 2.
const RESTART_CONNECTIONS: usize = 20;
/// `/long` takes about 16 s; each download must be complete within this.
const LONG_DEADLINE: Duration = Duration::from_secs(45);
/// Bound on waiting for flows to show up on the other node.
const SYNC_WAIT: Duration = Duration::from_secs(5);
/// Bound on a restarted node getting its peer's table (agent start, reconnect backoff ≤ 1 s).
const SNAPSHOT_WAIT: Duration = Duration::from_secs(20);
/// The target for the sync lag (reported, not asserted).
const LAG_P99_TARGET_MS: f64 = 50.0;

fn target() -> SocketAddr {
    SocketAddr::from((VIP, HTTP_PORT))
}

fn bed(xdp_mode: &str) -> Testbed {
    require_root();
    Testbed::up(TestbedOptions::new("ipip", xdp_mode).active_active())
        .expect("bringing up the active-active test bed")
}

/// A measured result, on the real stderr (libtest captures `eprintln!` of passing tests).
fn report(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn peers(bed: &Testbed, lb: &str) -> PeersReport {
    let v = bed
        .lb_client(lb)
        .peers()
        .unwrap_or_else(|e| panic!("xlb peers on {lb}: {e:#}"));
    serde_json::from_value(v.clone()).unwrap_or_else(|e| {
        panic!("xlb peers --json on {lb} does not match the contract: {e}: {v}")
    })
}

/// `lb`'s entry for its peer `other`.
fn peer_of(report: &PeersReport, other: &str) -> xlb::sync::PeerReport {
    let addr: SocketAddr = Testbed::sync_addr(other).parse().unwrap();
    report
        .peers
        .iter()
        .find(|p| p.address == addr)
        .cloned()
        .unwrap_or_else(|| panic!("no peer {addr} in {report:?}"))
}

fn stats(bed: &Testbed, lb: &str) -> Value {
    bed.lb_client(lb)
        .stats()
        .unwrap_or_else(|e| panic!("xlb stats on {lb}: {e:#}"))
}

/// The HTTP VIP's `field` (`new_flows`, `packets`) on `lb`.
fn vip_counter(stats: &Value, field: &str) -> u64 {
    let vip = find_vip(stats, VIP, HTTP_PORT, "tcp").expect("the HTTP VIP in stats");
    counter(vip, field).unwrap_or_else(|| panic!("no {field} in {vip}"))
}

fn active_flows(stats: &Value) -> BTreeMap<Ipv4Addr, u64> {
    backend_counters(stats, VIP, HTTP_PORT, "tcp", "active_flows").expect("active_flows")
}

fn lag_text(r: &PeersReport) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}ms"));
    format!(
        "p50 {} p99 {} max {} over {} batches",
        ms(r.lag.p50_ms),
        ms(r.lag.p99_ms),
        ms(r.lag.max_ms),
        r.lag.samples_total
    )
}

/// Every download complete and intact, and still running at `event` (so it really lived through
/// it); on the backend it started on. Returns a failure description per bad download.
fn check_downloads(finished: &[Finished], event_at: Instant, what: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for f in finished {
        if let Err(e) = &f.outcome {
            bad.push(format!("port {} (on {}): {e}", f.client_port, f.backend));
        } else if f.finished_at <= event_at {
            bad.push(format!(
                "port {} (on {}) finished before {what}: the test proves nothing for it",
                f.client_port, f.backend
            ));
        }
    }
    bad
}

/// Completed `/long` responses in each backend's nginx access log must be exactly `expected`
/// (backend name → count), and no `/long` response may have ended short: a connection moved to
/// another backend would be reset there and show up as a short response on its first one.
fn check_access_logs(bed: &Testbed, expected: &BTreeMap<String, usize>) {
    let complete = format!("\"GET /long HTTP/1.1\" 200 {} ", bed.content.len());
    let got = wait_for(
        "nginx to log every /long response",
        Duration::from_secs(5),
        || {
            let mut got = BTreeMap::new();
            for b in bed.backend_names() {
                let log = bed.access_log(&b)?;
                let long: Vec<&str> = log.lines().filter(|l| l.contains("GET /long ")).collect();
                let full = long.iter().filter(|l| l.contains(&complete)).count();
                if full != long.len() {
                    anyhow::bail!("short /long responses on {b}:\n{}", long.join("\n"));
                }
                if full > 0 {
                    got.insert(b, full);
                }
            }
            Ok((got == *expected).then_some(got))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(&got, expected);
}

fn lb1_lost(xdp_mode: &str) {
    let mut bed = bed(xdp_mode);
    bed.topo
        .route_vip(&[LB1_ADDR, LB2_ADDR])
        .expect("ECMP route for the VIP");
    let route = bed.topo.vip_route().unwrap();
    assert!(
        route.contains(&LB1_ADDR.to_string()) && route.contains(&LB2_ADDR.to_string()),
        "VIP route on rtr: {route}"
    );

    let downloads = LongDownloads::open(
        bed.ns("cli"),
        target(),
        "/long",
        CONNECTIONS,
        Arc::new(bed.content.clone()),
        LONG_DEADLINE,
    )
    .expect("opening the long downloads");
    let per_backend = downloads.per_backend();

    // Both load balancers carried some of them; together exactly one new flow per connection.
    let (s1, s2) = (stats(&bed, "lb1"), stats(&bed, "lb2"));
    let (n1, n2) = (vip_counter(&s1, "new_flows"), vip_counter(&s2, "new_flows"));
    assert!(
        n1 > 0 && n2 > 0 && n1 + n2 == CONNECTIONS as u64,
        "new flows lb1 {n1} + lb2 {n2}, expected both > 0 and {CONNECTIONS} in all (ECMP on an L4 hash)"
    );
    // Each has the other's flows.
    let synced = wait_for(
        "each LB to have received the other's flows",
        SYNC_WAIT,
        || {
            let (p1, p2) = (peers(&bed, "lb1"), peers(&bed, "lb2"));
            let got1 = peer_of(&p1, "lb2").flows_received;
            let got2 = peer_of(&p2, "lb1").flows_received;
            Ok((got1 >= n2 && got2 >= n1).then_some((p1, p2)))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let (p1, p2) = synced;
    for (lb, p) in [("lb1", &p1), ("lb2", &p2)] {
        assert_eq!(p.totals.rejected, 0, "{lb} rejected frames: {p:?}");
        assert_eq!(p.totals.unknown_backend, 0, "{lb}: {p:?}");
    }
    let active2: u64 = active_flows(&s2).values().sum();

    // lb1 goes away: out of the route, agent killed (no goodbye), link down.
    let lost_at = Instant::now();
    bed.topo.route_vip(&[LB2_ADDR]).expect("route via lb2 only");
    bed.kill_agent("lb1").expect("SIGKILL lb1's agent");
    bed.link_down("lb1").expect("lb1's link down");

    let finished = downloads.finish().expect("the downloads");
    let bad = check_downloads(&finished, lost_at, "lb1 was lost");
    assert!(
        bad.is_empty(),
        "{} of {CONNECTIONS} downloads failed across lb1's loss:\n{}",
        bad.len(),
        bad.join("\n")
    );
    check_access_logs(&bed, &per_backend);

    // lb2 carried lb1's connections on the synced entries: no miss, no new flow, no re-steer.
    let s2_after = stats(&bed, "lb2");
    let midflow = event(&s2_after, "midflow_miss").unwrap();
    let resteered = event(&s2_after, "flow_resteered").unwrap();
    let p2_after = peers(&bed, "lb2");
    let line = format!(
        "SYNC lb1-lost ({xdp_mode}): {CONNECTIONS} /long downloads, lb1 carried {n1}, lb2 {n2} \
         (backends {per_backend:?}); lb1 lost {:.1}s before the last finished; all complete and \
         intact on their first backend; lb2 midflow_miss {midflow}, flow_resteered {resteered}, \
         new_flows {n2} -> {}; sync lag lb1->lb2 {}, lb2->lb1 {}",
        finished
            .iter()
            .map(|f| f.finished_at)
            .max()
            .unwrap()
            .duration_since(lost_at)
            .as_secs_f64(),
        vip_counter(&s2_after, "new_flows"),
        lag_text(&p2_after),
        lag_text(&p1),
    );
    report(&line);
    assert_eq!(midflow, 0, "lb2 saw mid-flow packets without a flow entry");
    assert_eq!(resteered, 0, "lb2 re-steered flows");
    assert_eq!(
        vip_counter(&s2_after, "new_flows"),
        n2,
        "lb2 created new flows for lb1's connections"
    );
    assert!(
        vip_counter(&s2_after, "packets") > vip_counter(&s2, "packets"),
        "lb2 forwarded nothing after lb1's loss"
    );
    assert!(
        active2 >= CONNECTIONS as u64,
        "lb2 had {active2} active flows before lb1's loss, expected all {CONNECTIONS}"
    );
    for (lb, p) in [("lb1", &p1), ("lb2", &p2_after)] {
        // Samples must exist (the peer's flows arrived as timed batches); the lag itself is
        // reported against the target, not asserted: these machines are shared and a
        // timing bound in the suite would make it flaky (timing belongs to `cargo xtask bench`).
        let p99 = p
            .lag
            .p99_ms
            .unwrap_or_else(|| panic!("no lag samples on {lb}"));
        let verdict = if p99 <= LAG_P99_TARGET_MS {
            "met"
        } else {
            "NOT met"
        };
        eprintln!(
            "SYNC lag p99 on {lb}: {p99:.2} ms (target <= {LAG_P99_TARGET_MS} ms: {verdict})"
        );
    }
}

#[test]
fn lb1_lost_connections_survive_on_lb2_generic() {
    lb1_lost("generic");
}

#[test]
fn lb1_lost_connections_survive_on_lb2_driver() {
    lb1_lost("driver");
}

#[test]
fn lb2_restarted_gets_the_snapshot_and_takes_over() {
    let mut bed = bed("generic");
    // The default route: via lb1 only.
    let route = bed.topo.vip_route().unwrap();
    assert!(
        route.contains(&LB1_ADDR.to_string()) && !route.contains(&LB2_ADDR.to_string()),
        "VIP route on rtr: {route}"
    );
    let downloads = LongDownloads::open(
        bed.ns("cli"),
        target(),
        "/long",
        RESTART_CONNECTIONS,
        Arc::new(bed.content.clone()),
        LONG_DEADLINE,
    )
    .expect("opening the long downloads");
    let per_backend = downloads.per_backend();
    let n = RESTART_CONNECTIONS as u64;
    assert_eq!(vip_counter(&stats(&bed, "lb1"), "new_flows"), n);
    assert_eq!(vip_counter(&stats(&bed, "lb2"), "new_flows"), 0);

    // lb2's agent restarts (its flow table goes with it) while the downloads run through lb1.
    let started = bed.restart_agent("lb2").expect("restarting lb2's agent");
    let ready = started.elapsed();
    let (snapshot, p2) = wait_for(
        "lb2 to get lb1's flow table after its restart",
        SNAPSHOT_WAIT,
        || {
            let p = peers(&bed, "lb2");
            let lb1 = peer_of(&p, "lb1");
            let done = lb1.connected && lb1.inbound_connections >= 1 && lb1.flows_received >= n;
            Ok(done.then(|| (started.elapsed(), p)))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // Installed: one live entry per download, each on its backend.
    let active = active_flows(&stats(&bed, "lb2"));
    let expected_active: BTreeMap<Ipv4Addr, u64> = per_backend
        .iter()
        .map(|(b, c)| (bed.backend_addr(b).unwrap(), *c as u64))
        .collect();
    let active_nonzero: BTreeMap<Ipv4Addr, u64> =
        active.into_iter().filter(|(_, c)| *c > 0).collect();
    assert_eq!(
        active_nonzero, expected_active,
        "lb2's active flows per backend after the snapshot"
    );

    let s2 = stats(&bed, "lb2");
    let switched_at = Instant::now();
    bed.topo.route_vip(&[LB2_ADDR]).expect("route via lb2 only");
    let finished = downloads.finish().expect("the downloads");
    let bad = check_downloads(&finished, switched_at, "the route switch to lb2");
    assert!(
        bad.is_empty(),
        "{} of {RESTART_CONNECTIONS} downloads failed after lb2's restart and the switch:\n{}",
        bad.len(),
        bad.join("\n")
    );
    check_access_logs(&bed, &per_backend);
    let s2_after = stats(&bed, "lb2");
    let midflow = event(&s2_after, "midflow_miss").unwrap();
    report(&format!(
        "SYNC lb2-restart (generic): {RESTART_CONNECTIONS} /long downloads via lb1; lb2's agent \
         answered {:.3}s after its restart, had lb1's snapshot ({} flows received) {:.3}s after \
         the restart; after the route switch all complete and intact, lb2 midflow_miss {midflow}, \
         new_flows {}",
        ready.as_secs_f64(),
        peer_of(&p2, "lb1").flows_received,
        snapshot.as_secs_f64(),
        vip_counter(&s2_after, "new_flows"),
    ));
    assert_eq!(midflow, 0, "lb2 saw mid-flow packets without a flow entry");
    assert_eq!(
        vip_counter(&s2_after, "new_flows"),
        0,
        "lb2 created new flows for connections it should have known"
    );
    assert!(
        vip_counter(&s2_after, "packets") > vip_counter(&s2, "packets"),
        "lb2 forwarded nothing after the switch"
    );
}

// ---- test 3: a fake peer ----

/// How long the fake peer waits for the challenge or for the receiver to close.
const FAKE_IO: Duration = Duration::from_secs(5);

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A flow from cli's `src_port` to the HTTP VIP, pinned to `backend`, as the wire carries it.
fn flow_to(src_port: u16, backend: Ipv4Addr) -> FlowEvent {
    FlowEvent {
        flow: FlowKey {
            src_addr: u32::from_ne_bytes(CLI_ADDR.octets()),
            dst_addr: u32::from_ne_bytes(VIP.octets()),
            src_port: src_port.to_be(),
            dst_port: HTTP_PORT.to_be(),
            proto: 6,
            _pad: [0; 3],
        },
        backend_addr: u32::from_ne_bytes(backend.octets()),
        _pad: 0,
    }
}

fn hello(node_id: u64) -> Message<'static> {
    Message::Hello {
        node_id,
        listen_port: SYNC_PORT,
    }
}

fn flows(f: FlowEvent) -> Message<'static> {
    Message::Flows(Cow::Owned(vec![f]))
}

/// One data record of `msg`, sealed by `session`.
fn record(session: &mut Session, msg: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    session.seal(msg, unix_ns(), &mut out).expect("sealing");
    out
}

/// A connection to lb1's sync listener and the challenge of its preamble. Run inside a
/// namespace.
fn connect() -> anyhow::Result<(TcpStream, Challenge)> {
    let addr = SocketAddr::from((LB1_ADDR, SYNC_PORT));
    let mut s = TcpStream::connect_timeout(&addr, FAKE_IO)?;
    s.set_read_timeout(Some(FAKE_IO))?;
    s.set_write_timeout(Some(FAKE_IO))?;
    let mut p = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut p)?;
    Ok((s, decode_preamble(&p)?))
}

/// One record from the receiver: header and Noise message.
fn read_record(s: &mut TcpStream) -> anyhow::Result<(RecordHeader, Vec<u8>)> {
    let mut head = [0u8; RECORD_HEADER_LEN];
    s.read_exact(&mut head)?;
    let header = decode_record_header(&head)?;
    let mut msg = vec![0u8; header.len];
    s.read_exact(&mut msg)?;
    Ok((header, msg))
}

/// Message 1 under `key` for the connection with `challenge`.
fn message1(key: &SyncKey, challenge: &Challenge) -> (Initiator, Vec<u8>) {
    let mut m1 = Vec::new();
    let init = Initiator::start(key, challenge, &mut m1).expect("handshake message 1");
    (init, m1)
}

/// The handshake with lb1 under `key`: returns the session and the message 1 that was sent.
fn handshake(
    s: &mut TcpStream,
    key: &SyncKey,
    challenge: &Challenge,
) -> anyhow::Result<(Session, Vec<u8>)> {
    let (init, m1) = message1(key, challenge);
    s.write_all(&m1)?;
    let (h, m2) = read_record(s)?;
    Ok((init.finish(&h, &m2)?, m1))
}

/// Reads lb1's Ack to the Hello of `session`.
fn read_ack(s: &mut TcpStream, session: &mut Session) -> anyhow::Result<()> {
    let (h, m) = read_record(s)?;
    let msg = session.open(&h, &m)?.msg;
    anyhow::ensure!(msg == Message::Ack, "lb1 answered the Hello with {msg:?}");
    Ok(())
}

/// Errors unless the receiver closes the connection (EOF or reset) within [`FAKE_IO`] without
/// sending anything more.
fn closed_by_receiver(s: &mut TcpStream) -> anyhow::Result<()> {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => Ok(()),
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => Ok(()),
        Ok(_) => anyhow::bail!("the receiver sent data instead of closing"),
        Err(e) => anyhow::bail!("the receiver kept the connection open: {e}"),
    }
}

/// On a new connection to lb1 from `ns`, `play` speaks (it gets the stream and the challenge);
/// then the receiver must close it.
fn send_rejected(
    bed: &Testbed,
    ns: &str,
    play: impl FnOnce(&mut TcpStream, &Challenge) -> anyhow::Result<()> + Send + 'static,
) {
    bed.ns(ns)
        .enter(move || -> anyhow::Result<()> {
            let (mut s, challenge) = connect()?;
            play(&mut s, &challenge)?;
            closed_by_receiver(&mut s)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("a rejected record from {ns}: {e:#}"));
}

/// lb1's counters that the fake peer must move (and nothing else).
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    lb2_rejected: u64,
    lb2_received: u64,
    rejected: u64,
    rejected_unknown_source: u64,
    received: u64,
    unknown_backend: u64,
    active: BTreeMap<Ipv4Addr, u64>,
}

fn seen(bed: &Testbed) -> Seen {
    let p = peers(bed, "lb1");
    let lb2 = peer_of(&p, "lb2");
    Seen {
        lb2_rejected: lb2.rejected,
        lb2_received: lb2.flows_received,
        rejected: p.totals.rejected,
        rejected_unknown_source: p.totals.rejected_unknown_source,
        received: p.totals.flows_received,
        unknown_backend: p.totals.unknown_backend,
        active: active_flows(&stats(bed, "lb1")),
    }
}

/// Polls lb1 until its counters equal `want` (a frame is handled asynchronously).
fn expect_seen(bed: &Testbed, want: &Seen, after: &str) {
    let mut last = None;
    let got = wait_for(&format!("lb1's counters after {after}"), SYNC_WAIT, || {
        let now = seen(bed);
        let ok = now == *want;
        last = Some(now.clone());
        Ok(ok.then_some(now))
    });
    if got.is_err() {
        panic!(
            "after {after}: lb1 shows\n{:?}\nexpected\n{want:?}\n{}",
            last,
            bed.agent_log()
        );
    }
}

/// `GET /` from cli's `port` through the VIP (one new connection): who answered.
fn get_from_port(bed: &Testbed, port: u16) -> String {
    let out = bed
        .curl(&["--local-port", &port.to_string(), &format!("http://{VIP}/")])
        .and_then(|o| o.checked())
        .unwrap_or_else(|e| panic!("GET / from cli port {port}: {e:#}"));
    out.stdout.trim().to_string()
}

#[test]
fn forged_and_replayed_sync_frames_are_rejected_and_change_nothing() {
    let bed = bed("generic");
    let key = bed.sync_key();
    let good = SyncKey::from_bytes(key.as_bytes()).unwrap();
    let wrong = SyncKey::from_bytes(b"definitely-not-the-shared-key").unwrap();
    // Two flows the fake peer talks about: one only in rejected records, one in valid ones.
    const FORGED_PORT: u16 = 45001;
    const VALID_PORT: u16 = 45002;
    let (be1, be2, be3) = (backend_addr(1), backend_addr(2), backend_addr(3));
    let new_flows_before = vip_counter(&stats(&bed, "lb1"), "new_flows");
    let mut want = seen(&bed);

    // Forged (wrong key) from cli, an address that is not a peer: rejected at the handshake's
    // first message, which is all a sender without the key can make.
    let k = wrong.clone();
    send_rejected(
        &bed,
        "cli",
        move |s, c| Ok(s.write_all(&message1(&k, c).1)?),
    );
    want.rejected += 1;
    want.rejected_unknown_source += 1;
    expect_seen(&bed, &want, "a forged handshake from cli");

    // Forged from lb2's address (a configured peer): counted against lb2.
    let k = wrong.clone();
    send_rejected(
        &bed,
        "lb2",
        move |s, c| Ok(s.write_all(&message1(&k, c).1)?),
    );
    want.rejected += 1;
    want.lb2_rejected += 1;
    expect_seen(&bed, &want, "a forged handshake from lb2's address");

    // A valid session from lb2's address (right key), recorded: the flow goes to be2, then to
    // be3 (an existing entry is overwritten). Then the first Flows record again in the same
    // connection: a replay by sequence number.
    let k = good.clone();
    let (mut conn, mut session, recorded_m1, recorded_hello, recorded_v1, v2) = bed
        .ns("lb2")
        .enter(move || -> anyhow::Result<_> {
            let (mut s, challenge) = connect()?;
            let (mut session, m1) = handshake(&mut s, &k, &challenge)?;
            let h = record(&mut session, &hello(0xf0f2));
            let v1 = record(&mut session, &flows(flow_to(VALID_PORT, be2)));
            let v2 = record(&mut session, &flows(flow_to(VALID_PORT, be3)));
            Ok((s, session, m1, h, v1, v2))
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("fake peer session: {e:#}"));
    // The socket belongs to lb2's namespace since it was made; any thread can use it.
    conn.write_all(&[recorded_hello.as_slice(), &recorded_v1].concat())
        .unwrap_or_else(|e| panic!("writing to lb1's sync port: {e}"));
    read_ack(&mut conn, &mut session).unwrap_or_else(|e| panic!("lb1's Ack: {e:#}"));
    want.lb2_received += 1;
    want.received += 1;
    *want.active.get_mut(&be2).unwrap() += 1;
    expect_seen(&bed, &want, "a valid record (flow -> be2)");
    conn.write_all(&v2).unwrap();
    want.lb2_received += 1;
    want.received += 1;
    *want.active.get_mut(&be2).unwrap() -= 1;
    *want.active.get_mut(&be3).unwrap() += 1;
    expect_seen(&bed, &want, "a second valid record (the flow -> be3)");
    conn.write_all(&recorded_v1).unwrap();
    closed_by_receiver(&mut conn).expect("lb1 closes the connection after an in-session replay");
    want.rejected += 1;
    want.lb2_rejected += 1;
    expect_seen(
        &bed,
        &want,
        "the first Flows record replayed in its own connection",
    );

    // The recorded session replayed verbatim into a new connection (new challenge): its
    // message 1 belongs to the old connection.
    let replay = [recorded_m1, recorded_hello, recorded_v1.clone()].concat();
    send_rejected(&bed, "lb2", move |s, _| Ok(s.write_all(&replay)?));
    want.rejected += 1;
    want.lb2_rejected += 1;
    expect_seen(
        &bed,
        &want,
        "the recorded session replayed in a new connection",
    );

    // A fresh, valid handshake and Hello, then the recorded Flows record: its sequence (1) is
    // the one expected, but it was encrypted under the old connection's keys.
    let (k, v1) = (good.clone(), recorded_v1);
    send_rejected(&bed, "lb2", move |s, c| {
        let (mut session, _) = handshake(s, &k, c)?;
        s.write_all(&record(&mut session, &hello(0xf0f3)))?;
        read_ack(s, &mut session)?;
        Ok(s.write_all(&v1)?)
    });
    want.rejected += 1;
    want.lb2_rejected += 1;
    expect_seen(&bed, &want, "a recorded record after a valid Hello");

    // A fresh session whose records arrive out of order: the third before the second.
    let k = good.clone();
    send_rejected(&bed, "lb2", move |s, c| {
        let (mut session, _) = handshake(s, &k, c)?;
        s.write_all(&record(&mut session, &hello(0xf0f4)))?;
        read_ack(s, &mut session)?;
        let second = record(&mut session, &flows(flow_to(FORGED_PORT, be1)));
        let third = record(&mut session, &flows(flow_to(FORGED_PORT, be2)));
        Ok(s.write_all(&[third, second].concat())?)
    });
    want.rejected += 1;
    want.lb2_rejected += 1;
    expect_seen(&bed, &want, "records out of order");

    // Logged with the sender's address.
    let log = bed.agent_log();
    let rejected_lines = |from: &str| {
        log.lines()
            .filter(|l| l.to_ascii_lowercase().contains("rejected") && l.contains(from))
            .count()
    };
    assert!(
        rejected_lines(&format!("{CLI_ADDR}:")) >= 1,
        "lb1 did not log the rejection from cli:\n{log}"
    );
    assert!(
        rejected_lines(&format!("{LB2_ADDR}:")) >= 5,
        "lb1 did not log the 5 rejections from lb2's address:\n{log}"
    );

    // The data path agrees: the valid flow is pinned to be3 (no new flow for it), the forged one
    // was never installed (a new flow).
    assert_eq!(
        get_from_port(&bed, VALID_PORT),
        "be3",
        "the connection of the installed flow"
    );
    assert_eq!(
        vip_counter(&stats(&bed, "lb1"), "new_flows"),
        new_flows_before,
        "the installed flow was taken as a new flow"
    );
    get_from_port(&bed, FORGED_PORT);
    assert_eq!(
        vip_counter(&stats(&bed, "lb1"), "new_flows"),
        new_flows_before + 1,
        "the forged flow's connection did not start a new flow: it was installed"
    );
    report(&format!(
        "SYNC forged/replayed/reordered: lb1 rejected 6 (1 forged handshake from cli counted \
         as rejected_unknown_source; 1 forged handshake, 3 replays and 1 reordering from lb2's \
         address counted as lb2's rejected), installed only the 2 authentic Flows records; \
         totals {:?}",
        seen(&bed)
    ));
}

// ---- test 4: what crosses the sync link ----

/// Client connections in the capture test, from these client ports.
const CAPTURED_PORTS: std::ops::Range<u16> = 46001..46021;
/// Bound on each capture's life (the test stops them well before).
const CAPTURE_LIMIT: Duration = Duration::from_secs(90);

/// The 4 bytes of a client port and the HTTP VIP port as they follow each other in a TCP header
/// and in a sync flow record: network order.
fn port_pair(client_port: u16) -> [u8; 4] {
    let (c, v) = (client_port.to_be_bytes(), HTTP_PORT.to_be_bytes());
    [c[0], c[1], v[0], v[1]]
}

/// tcpdump on lb1's link, filtered to the sync port, while real connections through the VIP
/// become flows that lb1 streams to lb2: the capture holds the sync records (their clear
/// headers) but neither the client's address nor any of its port pairs. The same search finds
/// both in the client's own packets, captured on cli's link, and in the plaintext of a Flows
/// frame, which is what crossed the link before encryption.
#[test]
fn the_sync_link_carries_no_client_address_in_clear() {
    let bed = bed("generic");
    let dir = bed.dir.path();
    let sync_capture = Capture::start(
        bed.ns("lb1"),
        HOST_IFACE,
        &format!("tcp port {SYNC_PORT}"),
        &dir.join("sync.pcap"),
        CAPTURE_LIMIT,
    )
    .expect("tcpdump on lb1's link");
    let client_capture = Capture::start(
        bed.ns("cli"),
        HOST_IFACE,
        &format!("tcp port {HTTP_PORT}"),
        &dir.join("client.pcap"),
        CAPTURE_LIMIT,
    )
    .expect("tcpdump on cli's link");
    let received = |bed: &Testbed| peer_of(&peers(bed, "lb2"), "lb1").flows_received;
    let before = received(&bed);
    for port in CAPTURED_PORTS {
        get_from_port(&bed, port);
    }
    let n = CAPTURED_PORTS.len() as u64;
    wait_for("lb2 to receive the new flows", SYNC_WAIT, || {
        Ok((received(&bed) >= before + n).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", bed.agent_log()));
    // A heartbeat or two more, so the capture also holds records after the flows.
    std::thread::sleep(Duration::from_millis(1500));
    let sync = sync_capture.finish().expect("the sync capture");
    let client = client_capture.finish().expect("the client capture");

    let addr = CLI_ADDR.octets();
    // The search works: the client's own packets carry its address and port pairs in their
    // plain IP and TCP headers...
    assert!(
        contains(&client, &addr),
        "the client capture lacks the client's address"
    );
    for port in CAPTURED_PORTS {
        assert!(
            contains(&client, &port_pair(port)),
            "client capture lacks port {port}"
        );
    }
    // ... and so does the plaintext of the flows lb1 sent (the frame version 1 sent in clear).
    let mut plain = Vec::new();
    let sent: Vec<FlowEvent> = CAPTURED_PORTS
        .map(|p| flow_to(p, backend_addr(1)))
        .collect();
    wire::encode_frame(unix_ns(), &Message::Flows(Cow::Owned(sent)), &mut plain);
    assert!(contains(&plain, &addr));
    assert!(
        CAPTURED_PORTS
            .clone()
            .all(|p| contains(&plain, &port_pair(p)))
    );

    // The sync link carried the flows: the data records' headers are in clear (magic, version
    // 2, type data, then the length), and the frames they announce hold at least the flows'
    // records.
    let data_header = [&wire::MAGIC[..], &[wire::VERSION, 2]].concat();
    let records = count(&sync, &data_header);
    let frame_payload: usize = sync
        .windows(data_header.len() + 2)
        .filter(|w| w.starts_with(&data_header))
        .map(|w| {
            usize::from(u16::from_be_bytes([w[6], w[7]])).saturating_sub(wire::MIN_DATA_MSG_LEN)
        })
        .sum();
    assert!(
        frame_payload >= CAPTURED_PORTS.len() * wire::RECORD_LEN,
        "{records} data records holding {frame_payload} bytes of payload in the sync capture"
    );
    // ... and nothing of them in clear.
    assert!(
        !contains(&sync, &addr),
        "the client's address {CLI_ADDR} crossed the sync link in clear"
    );
    let leaked: Vec<u16> = CAPTURED_PORTS
        .filter(|p| contains(&sync, &port_pair(*p)))
        .collect();
    assert!(
        leaked.is_empty(),
        "port pairs crossed the sync link in clear: {leaked:?}"
    );
    report(&format!(
        "SYNC capture: {n} client connections synced lb1 -> lb2; {} bytes captured on lb1's sync \
         link ({records} data records, {frame_payload} bytes of encrypted payload), client address {CLI_ADDR} and its {n} \
         port pairs found 0 times there; the same search finds them in cli's capture ({} \
         bytes) and in the Flows frame's plaintext",
        sync.len(),
        client.len()
    ));
}
