//! Sync counters and the `xlb peers` report.
//!
//! The sync tasks update lock-free counters per configured peer; `report()` reads them without
//! stopping anything. The lag window is the only lock, held for one push or one copy.
//!
//! Sync lag is measured on the receiver for each Flows frame as (time the receiving agent finished
//! installing the frame) − (the frame's sent time, which is when the sending agent took the
//! frame's first flow from its kernel). It therefore covers batching, the network and the
//! install, but it compares two hosts' wall clocks: on one machine (the test beds here run all
//! nodes on one kernel) that is exact; across hosts it is only as good as their clock sync.

use crate::util;
use serde::{Deserialize, Serialize};
use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::sync::Notify;

/// Lag samples kept for the percentiles.
pub const LAG_WINDOW: usize = 10_000;

pub(crate) fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn unix_ms() -> u64 {
    util::unix_ms(SystemTime::now())
}

#[derive(Default)]
pub(crate) struct PeerStats {
    /// Outbound connection established (the peer's Ack verified).
    connected: AtomicBool,
    since_ms: AtomicU64,
    inbound: AtomicU32,
    pub(crate) flows_sent: AtomicU64,
    pub(crate) flows_received: AtomicU64,
    last_msg_ms: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) unknown_backend: AtomicU64,
    pub(crate) resyncs: AtomicU64,
    /// Complete snapshots received from it (SnapshotEnd with every flow it announced).
    snapshots: AtomicU64,
    /// Our last attempt to connect to it failed at the TCP level (refused, timed out): nobody
    /// listens there, so no snapshot will come from it either.
    unreachable: AtomicBool,
}

impl PeerStats {
    pub(crate) fn touch(&self) {
        self.last_msg_ms.store(unix_ms(), Relaxed);
    }

    pub(crate) fn set_connected(&self, up: bool) {
        if self.connected.swap(up, Relaxed) != up {
            self.since_ms.store(unix_ms(), Relaxed);
        }
    }

    pub(crate) fn inbound_opened(&self) {
        self.inbound.fetch_add(1, Relaxed);
    }

    pub(crate) fn inbound_closed(&self) {
        self.inbound.fetch_sub(1, Relaxed);
    }
}

struct LagWindow {
    samples_us: Vec<u64>,
    next: usize,
    total: u64,
}

pub(crate) struct Status {
    node_id: u64,
    listen: SocketAddr,
    addrs: Vec<SocketAddr>,
    peers: Vec<PeerStats>,
    /// Inbound connections from addresses that are not configured peers.
    other: PeerStats,
    pub(crate) local_flows: AtomicU64,
    lag: Mutex<LagWindow>,
    /// Woken when a peer's start-up view changes (a snapshot completed, reachability changed);
    /// one waiter, the agent's serve loop while it starts.
    changed: Notify,
}

impl Status {
    pub(crate) fn new(node_id: u64, listen: SocketAddr, addrs: Vec<SocketAddr>) -> Self {
        let now = unix_ms();
        let peers = addrs
            .iter()
            .map(|_| {
                let s = PeerStats::default();
                s.since_ms.store(now, Relaxed);
                s
            })
            .collect();
        Status {
            node_id,
            listen,
            addrs,
            peers,
            other: PeerStats::default(),
            local_flows: AtomicU64::new(0),
            lag: Mutex::new(LagWindow {
                samples_us: Vec::with_capacity(LAG_WINDOW),
                next: 0,
                total: 0,
            }),
            changed: Notify::new(),
        }
    }

    /// Configured peer `index` sent a complete snapshot.
    pub(crate) fn snapshot_received(&self, index: usize) {
        if let Some(p) = self.peers.get(index) {
            p.snapshots.fetch_add(1, Relaxed);
            self.changed.notify_one();
        }
    }

    /// Our connection attempts to configured peer `index` fail (`true`) or reached it (`false`).
    pub(crate) fn set_unreachable(&self, index: usize, unreachable: bool) {
        if let Some(p) = self.peers.get(index)
            && p.unreachable.swap(unreachable, Relaxed) != unreachable
        {
            self.changed.notify_one();
        }
    }

    /// What a starting agent waits for, per configured peer.
    pub(crate) fn startup(&self) -> Vec<PeerStartup> {
        self.addrs
            .iter()
            .zip(&self.peers)
            .map(|(addr, s)| PeerStartup {
                address: *addr,
                snapshots: s.snapshots.load(Relaxed),
                unreachable: s.unreachable.load(Relaxed),
            })
            .collect()
    }

    /// Resolves after the next change of [`Status::startup`] (or at once if one happened since
    /// the last call).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Stats of configured peer `index`, or of "other" for `None`.
    pub(crate) fn peer(&self, index: Option<usize>) -> &PeerStats {
        index.and_then(|i| self.peers.get(i)).unwrap_or(&self.other)
    }

    /// Which configured peer an inbound connection comes from: the exact address (remote IP and
    /// the listen port it announced in Hello) first, else the first peer with that IP.
    pub(crate) fn match_peer(&self, ip: IpAddr, listen_port: Option<u16>) -> Option<usize> {
        let ip = canonical(ip);
        listen_port
            .and_then(|port| {
                self.addrs
                    .iter()
                    .position(|a| canonical(a.ip()) == ip && a.port() == port)
            })
            .or_else(|| self.addrs.iter().position(|a| canonical(a.ip()) == ip))
    }

    pub(crate) fn record_lag_ns(&self, lag_ns: u64) {
        let mut w = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        let us = lag_ns / 1_000;
        if w.samples_us.len() < LAG_WINDOW {
            w.samples_us.push(us);
        } else {
            let at = w.next;
            w.samples_us[at] = us;
        }
        w.next = (w.next + 1) % LAG_WINDOW;
        w.total += 1;
    }

    pub(crate) fn report(&self) -> PeersReport {
        let now = unix_ms();
        let age = |s: &PeerStats| match s.last_msg_ms.load(Relaxed) {
            0 => None,
            t => Some(now.saturating_sub(t)),
        };
        let peers: Vec<PeerReport> = self
            .addrs
            .iter()
            .zip(&self.peers)
            .map(|(addr, s)| PeerReport {
                address: *addr,
                connected: s.connected.load(Relaxed),
                since_unix_ms: s.since_ms.load(Relaxed),
                inbound_connections: s.inbound.load(Relaxed),
                flows_sent: s.flows_sent.load(Relaxed),
                flows_received: s.flows_received.load(Relaxed),
                last_msg_age_ms: age(s),
                rejected: s.rejected.load(Relaxed),
                unknown_backend: s.unknown_backend.load(Relaxed),
                resyncs: s.resyncs.load(Relaxed),
                snapshots_received: s.snapshots.load(Relaxed),
            })
            .collect();
        let sum = |f: fn(&PeerReport) -> u64| peers.iter().map(f).sum::<u64>();
        let other_rejected = self.other.rejected.load(Relaxed);
        let totals = SyncTotals {
            local_flows: self.local_flows.load(Relaxed),
            flows_sent: sum(|p| p.flows_sent),
            flows_received: sum(|p| p.flows_received) + self.other.flows_received.load(Relaxed),
            rejected: sum(|p| p.rejected) + other_rejected,
            rejected_unknown_source: other_rejected,
            unknown_backend: sum(|p| p.unknown_backend) + self.other.unknown_backend.load(Relaxed),
            resyncs: sum(|p| p.resyncs),
            inbound_other: self.other.inbound.load(Relaxed),
        };
        let lag = {
            let w = self.lag.lock().unwrap_or_else(|e| e.into_inner());
            let mut sorted = w.samples_us.clone();
            let total = w.total;
            drop(w);
            sorted.sort_unstable();
            LagReport {
                samples_total: total,
                window: sorted.len() as u64,
                p50_ms: percentile_ms(&sorted, 0.50),
                p99_ms: percentile_ms(&sorted, 0.99),
                max_ms: sorted.last().map(|us| *us as f64 / 1000.0),
            }
        };
        PeersReport {
            node_id: format!("{:016x}", self.node_id),
            listen: self.listen,
            generated_unix_ms: now,
            peers,
            totals,
            lag,
        }
    }
}

/// IPv4-mapped IPv6 (a dual-stack listener's view of an IPv4 peer) compares as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Nearest-rank percentile of sorted microsecond samples, in milliseconds.
fn percentile_ms(sorted_us: &[u64], p: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = ((p * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    Some(sorted_us[rank - 1] as f64 / 1000.0)
}

/// `xlb peers --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeersReport {
    /// This node's id for this run (hex; it appears in peers' logs).
    pub node_id: String,
    pub listen: SocketAddr,
    /// When the report was taken; `since_unix_ms` values are relative to the same clock.
    pub generated_unix_ms: u64,
    pub peers: Vec<PeerReport>,
    pub totals: SyncTotals,
    pub lag: LagReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    /// As configured (`--peer`).
    pub address: SocketAddr,
    /// Our outbound (sending) connection to it is up: it acknowledged our Hello, proving it has
    /// the key.
    pub connected: bool,
    /// Last change of `connected` (or agent start), unix ms.
    pub since_unix_ms: u64,
    /// Its connections to us (receive side) currently open.
    pub inbound_connections: u32,
    /// Flows we sent it, stream and snapshots.
    pub flows_sent: u64,
    /// Flows received from it (connections from its address), stream and snapshots.
    pub flows_received: u64,
    /// Since the last frame sent to it or received from it; `None` before the first.
    pub last_msg_age_ms: Option<u64>,
    /// Handshakes and records from its address that failed the key, sequence, decryption,
    /// format or version checks, and
    /// connections from it that sent no valid Hello within 2 s of the accept.
    pub rejected: u64,
    /// Received flows whose VIP or backend this node does not have (skipped).
    pub unknown_backend: u64,
    /// Full snapshots re-sent because the stream to it fell behind.
    pub resyncs: u64,
    /// Complete snapshots (its whole flow table) received from it since this agent started.
    /// Defaulted for older agents.
    #[serde(default)]
    pub snapshots_received: u64,
}

/// What a starting agent knows about one configured peer: whether its flow table arrived, or
/// whether nobody answers there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStartup {
    pub address: SocketAddr,
    /// Complete snapshots received from it.
    pub snapshots: u64,
    /// Our last connection attempt to it failed at the TCP level.
    pub unreachable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncTotals {
    /// New-flow events read from this node's kernel.
    pub local_flows: u64,
    pub flows_sent: u64,
    /// From all connections, including addresses that are not configured peers.
    pub flows_received: u64,
    /// All rejected frames, including from addresses that are not configured peers.
    pub rejected: u64,
    pub rejected_unknown_source: u64,
    pub unknown_backend: u64,
    pub resyncs: u64,
    /// Open inbound connections from addresses that are not configured peers.
    pub inbound_other: u32,
}

/// Sync lag over the last [`LAG_WINDOW`] received Flows frames (see the module docs for what is
/// measured).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LagReport {
    pub samples_total: u64,
    pub window: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// A peers-table age from two unix-ms timestamps.
fn age_ms(ms: u64) -> String {
    util::fmt_age(Duration::from_millis(ms))
}

/// The text form of `xlb peers`. SINCE and LAST_MSG are ages ("12s" = 12 seconds ago), each
/// cell one word so the table splits on whitespace.
pub fn render_table(report: &PeersReport) -> String {
    let header = [
        "PEER",
        "CONNECTED",
        "SINCE",
        "SENT",
        "RECEIVED",
        "LAST_MSG",
        "REJECTED",
        "UNKNOWN_BACKEND",
    ];
    let rows: Vec<[String; 8]> = report
        .peers
        .iter()
        .map(|p| {
            [
                p.address.to_string(),
                if p.connected { "yes" } else { "no" }.to_string(),
                age_ms(report.generated_unix_ms.saturating_sub(p.since_unix_ms)),
                p.flows_sent.to_string(),
                p.flows_received.to_string(),
                p.last_msg_age_ms.map_or_else(|| "-".to_string(), age_ms),
                p.rejected.to_string(),
                p.unknown_backend.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 == widths.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    if report.peers.is_empty() {
        out.push_str("(no peers configured)\n");
    }
    let t = &report.totals;
    let _ = writeln!(
        out,
        "node {} listening on {}; totals: {} local flows, {} sent, {} received, {} rejected ({} from unknown addresses), {} unknown backend, {} resyncs",
        report.node_id,
        report.listen,
        t.local_flows,
        t.flows_sent,
        t.flows_received,
        t.rejected,
        t.rejected_unknown_source,
        t.unknown_backend,
        t.resyncs
    );
    match (report.lag.p50_ms, report.lag.p99_ms) {
        (Some(p50), Some(p99)) => {
            let _ = writeln!(
                out,
                "sync lag over the last {} batches: p50 {p50:.2} ms, p99 {p99:.2} ms",
                report.lag.window
            );
        }
        _ => out.push_str("sync lag: no flows received yet\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_window() {
        let s = Status::new(1, "127.0.0.1:1".parse().unwrap(), vec![]);
        assert_eq!(s.report().lag.p50_ms, None);
        for i in 1..=100u64 {
            s.record_lag_ns(i * 1_000_000);
        }
        let r = s.report().lag;
        assert_eq!(r.p50_ms, Some(50.0));
        assert_eq!(r.p99_ms, Some(99.0));
        // The window keeps only the newest samples.
        for _ in 0..LAG_WINDOW {
            s.record_lag_ns(2_000_000);
        }
        let r = s.report().lag;
        assert_eq!(
            (r.p99_ms, r.window, r.samples_total),
            (Some(2.0), 10_000, 10_100)
        );
    }

    #[test]
    fn peers_are_matched_by_address_then_ip() {
        let peers = vec![
            "10.0.0.1:7000".parse().unwrap(),
            "10.0.0.1:7001".parse().unwrap(),
            "10.0.0.2:7000".parse().unwrap(),
        ];
        let s = Status::new(1, "0.0.0.0:7000".parse().unwrap(), peers);
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        assert_eq!(s.match_peer(ip("10.0.0.1"), Some(7001)), Some(1));
        assert_eq!(s.match_peer(ip("10.0.0.1"), None), Some(0));
        assert_eq!(s.match_peer(ip("::ffff:10.0.0.2"), Some(9)), Some(2));
        assert_eq!(s.match_peer(ip("10.0.0.3"), Some(7000)), None);
    }

    #[test]
    fn table_has_the_documented_columns() {
        let s = Status::new(
            0xab,
            "0.0.0.0:7946".parse().unwrap(),
            vec!["10.111.1.3:7946".parse().unwrap()],
        );
        s.peer(Some(0)).set_connected(true);
        s.peer(Some(0)).flows_sent.fetch_add(12, Relaxed);
        s.peer(None).rejected.fetch_add(2, Relaxed);
        let r = s.report();
        assert_eq!(r.totals.rejected, 2);
        assert_eq!(r.totals.rejected_unknown_source, 2);
        let text = render_table(&r);
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            head,
            [
                "PEER",
                "CONNECTED",
                "SINCE",
                "SENT",
                "RECEIVED",
                "LAST_MSG",
                "REJECTED",
                "UNKNOWN_BACKEND"
            ]
        );
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(row[0], "10.111.1.3:7946");
        assert_eq!(row[1], "yes");
        assert_eq!(row[3], "12");
        assert!(
            text.contains("2 rejected (2 from unknown addresses)"),
            "{text}"
        );
        let json = serde_json::to_string(&r).unwrap();
        let back: PeersReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(age_ms(61_000), "1m1s");
        assert_eq!(age_ms(1_500), "1.5s");
    }
}
