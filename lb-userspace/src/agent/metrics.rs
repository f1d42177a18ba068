//! Prometheus metrics: `GET /metrics` on `--metrics-listen ADDR:PORT`.
//!
//! Nothing is kept in metric objects between scrapes. Each scrape asks the serve loop for the
//! same `StatsReport` that `xlb stats --json` prints (per-CPU kernel counters summed by the
//! agent, the health book, the cached flow-table count) and reads the peer-sync status the same
//! way `xlb peers` does, then renders both here, in the HTTP task: the serve loop only builds the
//! report, exactly as for a CLI `stats` request, so `/metrics` and `xlb stats` can never disagree
//! and a scrape costs the loop no more than one `xlb stats`. The XDP program is not involved:
//! reading per-CPU arrays from userspace does not touch its hot path.
//!
//! The output is the Prometheus text format 0.0.4 (the `prometheus` crate's `TextEncoder`), not
//! OpenMetrics: Debian 12's `promtool check metrics` (2.42) rejects OpenMetrics' `info` type and
//! its counter family names without `_total`.

use crate::{
    agent::controller::ControllerError,
    api::{BackendState, StatsReport},
    sync::{PeersReport, SyncStatus},
};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use std::{convert::Infallible, io, net::SocketAddr, time::Duration};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};

/// How a scrape asks the serve loop for the stats report: it sends where the answer goes.
pub type StatsReply = oneshot::Sender<Result<StatsReport, ControllerError>>;

/// Capacity of the scrape → serve loop queue; a scrape that finds it full is answered 503 rather
/// than queueing behind a backlog of others.
pub const SCRAPE_QUEUE: usize = 8;
/// How long a scrape waits for the serve loop (it may be applying a change).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send its request headers within this (no slow-loris holding a task).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on one connection's life (one request: keep-alive is off).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 32;

/// The media type of the text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics scrapes on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("building metric {name}: {source}")]
    Metric {
        name: &'static str,
        source: prometheus::Error,
    },
    #[error("encoding metrics: {0}")]
    Encode(prometheus::Error),
}

/// Bind the metrics listener (done before the data path is loaded, so a taken port fails the
/// start instead of a half-started agent).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// A fresh registry per scrape, with helpers that register families under the `xlb_` names.
struct Families(Registry);

impl Families {
    fn counter(
        &self,
        name: &'static str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        let err = |source| MetricsError::Metric { name, source };
        let family = IntCounterVec::new(Opts::new(name, help), labels).map_err(err)?;
        self.0.register(Box::new(family.clone())).map_err(err)?;
        Ok(family)
    }

    fn gauge(
        &self,
        name: &'static str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricsError> {
        let err = |source| MetricsError::Metric { name, source };
        let family = IntGaugeVec::new(Opts::new(name, help), labels).map_err(err)?;
        self.0.register(Box::new(family.clone())).map_err(err)?;
        Ok(family)
    }

    fn float_gauge(
        &self,
        name: &'static str,
        help: &str,
        labels: &[&str],
    ) -> Result<GaugeVec, MetricsError> {
        let err = |source| MetricsError::Metric { name, source };
        let family = GaugeVec::new(Opts::new(name, help), labels).map_err(err)?;
        self.0.register(Box::new(family.clone())).map_err(err)?;
        Ok(family)
    }
}

/// Kernel counters are u64; gauges are i64. Saturate rather than wrap (never reached in practice).
fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Render one scrape: the stats report (as `xlb stats --json` has it) and, when peer sync runs,
/// its report (as `xlb peers --json` has it).
pub fn render(stats: &StatsReport, sync: Option<&PeersReport>) -> Result<String, MetricsError> {
    let f = Families(Registry::new());

    let build = f.gauge(
        "xlb_build_info",
        "The running xlb agent's version (always 1).",
        &["version"],
    )?;
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

    let vl = ["vip", "proto"];
    let bl = ["vip", "proto", "backend"];
    let vip_packets = f.counter("xlb_vip_packets_total", "Packets steered for the VIP.", &vl)?;
    let vip_bytes = f.counter(
        "xlb_vip_bytes_total",
        "Bytes (IP packets as received) steered for the VIP.",
        &vl,
    )?;
    let vip_flows = f.counter(
        "xlb_vip_new_flows_total",
        "New flows the VIP assigned to a backend.",
        &vl,
    )?;
    let be_packets = f.counter(
        "xlb_backend_packets_total",
        "Packets forwarded to the backend.",
        &bl,
    )?;
    let be_bytes = f.counter(
        "xlb_backend_bytes_total",
        "Bytes (IP packets as received, before encapsulation) forwarded to the backend.",
        &bl,
    )?;
    let be_flows = f.counter(
        "xlb_backend_new_flows_total",
        "New flows assigned to the backend.",
        &bl,
    )?;
    let be_up = f.gauge(
        "xlb_backend_up",
        "1 unless the backend failed its health checks (down); a draining backend is up.",
        &bl,
    )?;
    let be_draining = f.gauge(
        "xlb_backend_draining",
        "1 if the backend is drained (weight 0: no new flows, existing flows stay).",
        &bl,
    )?;
    let be_weight = f.gauge(
        "xlb_backend_weight",
        "Configured weight of the backend (0 = drained).",
        &bl,
    )?;
    let be_active = f.gauge(
        "xlb_backend_active_flows",
        "Flow-table entries of the backend that saw a packet in the last 60 s.",
        &bl,
    )?;
    let checks = f.counter(
        "xlb_health_checks_total",
        "Health checks of the backend by result (ok, fail).",
        &["vip", "proto", "backend", "result"],
    )?;
    let check_latency = f.float_gauge(
        "xlb_health_check_duration_seconds",
        "How long the backend's last health check took.",
        &bl,
    )?;
    for v in &stats.vips {
        let vip = &v.vip;
        let proto = v.proto.to_string();
        let l = [vip.as_str(), proto.as_str()];
        vip_packets.with_label_values(&l).inc_by(v.packets);
        vip_bytes.with_label_values(&l).inc_by(v.bytes);
        vip_flows.with_label_values(&l).inc_by(v.new_flows);
        for b in &v.backends {
            let addr = b.address.to_string();
            let l = [vip.as_str(), proto.as_str(), addr.as_str()];
            be_packets.with_label_values(&l).inc_by(b.packets);
            be_bytes.with_label_values(&l).inc_by(b.bytes);
            be_flows.with_label_values(&l).inc_by(b.new_flows);
            be_up
                .with_label_values(&l)
                .set(i64::from(b.state != BackendState::Down));
            be_draining
                .with_label_values(&l)
                .set(i64::from(b.weight == 0));
            be_weight.with_label_values(&l).set(i64::from(b.weight));
            be_active.with_label_values(&l).set(i64_of(b.active_flows));
            for (result, n) in [("ok", b.checks_ok), ("fail", b.checks_failed)] {
                checks
                    .with_label_values(&[vip.as_str(), proto.as_str(), addr.as_str(), result])
                    .inc_by(n);
            }
            if let Some(c) = &b.last_check {
                check_latency
                    .with_label_values(&l)
                    .set(c.latency_ms / 1000.0);
            }
        }
    }

    let reasons = f.counter(
        "xlb_packets_total",
        "Packets the balancer saw, by outcome (pass_*, drop_*, fwd_*, tx_*; see the README).",
        &["reason"],
    )?;
    for (name, n) in &stats.reasons {
        reasons.with_label_values(&[name.as_str()]).inc_by(*n);
    }
    let events = f.counter(
        "xlb_datapath_events_total",
        "Data-path events: midflow_miss (a TCP packet without SYN and no flow entry), \
         flow_resteered, flow_event_lost (sync ring buffer full), nexthop_lookup (FIB lookup \
         for a backend's next hop; cached per CPU for 1 s).",
        &["event"],
    )?;
    for (name, n) in &stats.events {
        events.with_label_values(&[name.as_str()]).inc_by(*n);
    }
    f.gauge(
        "xlb_flow_table_capacity",
        "Entries of the flow table (--flow-capacity).",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .set(i64::from(stats.flow_capacity));
    f.gauge(
        "xlb_flow_table_entries",
        "Entries in use in the flow table (an LRU: finished flows stay until evicted); counted at \
         most once per second.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .set(i64_of(stats.flow_entries));

    if let Some(sync) = sync {
        render_sync(&f, sync)?;
    }

    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&f.0.gather(), &mut out)
        .map_err(MetricsError::Encode)?;
    // The encoder writes only UTF-8 (names, label values and numbers).
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Peer-sync families. Per configured peer (`peer="ADDR:PORT"`), plus `peer="other"` for what
/// came from addresses that are not configured peers, so each family sums to the totals of
/// `xlb peers`.
fn render_sync(f: &Families, sync: &PeersReport) -> Result<(), MetricsError> {
    let pl = ["peer"];
    let sent = f.counter(
        "xlb_sync_flows_sent_total",
        "Flows sent to the peer (stream and snapshots).",
        &pl,
    )?;
    let received = f.counter(
        "xlb_sync_flows_received_total",
        "Flows received from the peer (stream and snapshots).",
        &pl,
    )?;
    let rejected = f.counter(
        "xlb_sync_rejected_total",
        "Sync frames from the peer that failed authentication, sequence or format checks.",
        &pl,
    )?;
    let unknown = f.counter(
        "xlb_sync_unknown_backend_total",
        "Flows from the peer whose VIP or backend this node does not have (not installed).",
        &pl,
    )?;
    let resyncs = f.counter(
        "xlb_sync_resyncs_total",
        "Full snapshots re-sent to the peer because its stream fell behind.",
        &pl,
    )?;
    let connected = f.gauge(
        "xlb_sync_peer_connected",
        "1 while this node's sending connection to the peer is up.",
        &pl,
    )?;
    let inbound = f.gauge(
        "xlb_sync_inbound_connections",
        "The peer's connections to this node (receive side) currently open.",
        &pl,
    )?;
    for p in &sync.peers {
        let peer = p.address.to_string();
        let l = [peer.as_str()];
        sent.with_label_values(&l).inc_by(p.flows_sent);
        received.with_label_values(&l).inc_by(p.flows_received);
        rejected.with_label_values(&l).inc_by(p.rejected);
        unknown.with_label_values(&l).inc_by(p.unknown_backend);
        resyncs.with_label_values(&l).inc_by(p.resyncs);
        connected.with_label_values(&l).set(i64::from(p.connected));
        inbound
            .with_label_values(&l)
            .set(i64::from(p.inbound_connections));
    }
    let t = &sync.totals;
    let sum =
        |field: fn(&crate::sync::PeerReport) -> u64| -> u64 { sync.peers.iter().map(field).sum() };
    let other = ["other"];
    received
        .with_label_values(&other)
        .inc_by(t.flows_received.saturating_sub(sum(|p| p.flows_received)));
    rejected
        .with_label_values(&other)
        .inc_by(t.rejected_unknown_source);
    unknown
        .with_label_values(&other)
        .inc_by(t.unknown_backend.saturating_sub(sum(|p| p.unknown_backend)));
    inbound
        .with_label_values(&other)
        .set(i64::from(t.inbound_other));

    f.counter(
        "xlb_sync_local_flows_total",
        "New flows of this node's data path taken for sync.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(t.local_flows);
    f.counter(
        "xlb_sync_lag_samples_total",
        "Flow frames received whose sync lag was measured.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(sync.lag.samples_total);
    // A gauge with a `percentile` label, not `quantile`: promtool rejects a `quantile` label on
    // anything but a summary, and a summary needs a `_sum` of all lags, which the sync status
    // does not keep (it keeps a window of samples for its percentiles).
    let lag = f.float_gauge(
        "xlb_sync_lag_seconds",
        "Sync lag (peer took the flow from its kernel -> installed here) over the last 10000 \
         frames, by percentile (50, 99); absent before the first frame.",
        &["percentile"],
    )?;
    for (q, ms) in [("50", sync.lag.p50_ms), ("99", sync.lag.p99_ms)] {
        if let Some(ms) = ms {
            lag.with_label_values(&[q]).set(ms / 1000.0);
        }
    }
    Ok(())
}

/// Serve `/metrics` on `listener` until `stop` turns true. Each scrape sends a `StatsReply` on
/// `scrapes` (answered by the serve loop) and reads `sync` directly (lock-free counters).
pub async fn serve(
    listener: TcpListener,
    scrapes: mpsc::Sender<StatsReply>,
    sync: Option<SyncStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        log::debug!("metrics: {MAX_CONNECTIONS} connections open; closing {peer}");
                        continue;
                    }
                    let scrapes = scrapes.clone();
                    let sync = sync.clone();
                    conns.spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let scrapes = scrapes.clone();
                            let sync = sync.clone();
                            async move { Ok::<_, Infallible>(answer(req, scrapes, sync).await) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            // One request per connection: scrapers reconnect cheaply, and no
                            // idle connection holds one of the MAX_CONNECTIONS slots.
                            .keep_alive(false)
                            .serve_connection(TokioIo::new(stream), service);
                        match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => log::debug!("metrics connection from {peer}: {e}"),
                            Err(_) => log::debug!("metrics connection from {peer} timed out"),
                        }
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    log::warn!("accepting a metrics connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn answer(
    req: Request<Incoming>,
    scrapes: mpsc::Sender<StatsReply>,
    sync: Option<SyncStatus>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD\n".to_string(),
        );
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match req.uri().path() {
        "/metrics" => {}
        "/" => {
            return text(
                StatusCode::OK,
                "xlb agent: Prometheus metrics at /metrics\n".to_string(),
            );
        }
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics\n".to_string(),
            );
        }
    }
    let (reply, answer) = oneshot::channel();
    if scrapes.try_send(reply).is_err() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many scrapes waiting for the agent, or it is shutting down\n".to_string(),
        );
    }
    let stats = match tokio::time::timeout(SCRAPE_TIMEOUT, answer).await {
        Ok(Ok(Ok(stats))) => stats,
        Ok(Ok(Err(e))) => {
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
        }
        Ok(Err(_)) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is shutting down\n".to_string(),
            );
        }
        Err(_) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the agent did not answer within {SCRAPE_TIMEOUT:?}\n"),
            );
        }
    };
    let peers = sync.map(|s| s.report());
    match render(&stats, peers.as_ref()) {
        Ok(body) => {
            let mut resp = text(StatusCode::OK, body);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(CONTENT_TYPE),
            );
            resp
        }
        Err(e) => {
            log::error!("metrics scrape: {e}");
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{BackendReport, LastCheck, VipReport},
        model::{Forward, Proto},
        sync::{LagReport, PeerReport, SyncTotals},
    };
    use std::{
        io::{Read, Write},
        net::Ipv4Addr,
        process::{Command, Stdio},
    };

    fn backend(last: u8, state: BackendState, weight: u32) -> BackendReport {
        BackendReport {
            address: Ipv4Addr::new(10, 111, 1, last),
            weight,
            state,
            since: "2026-05-20T10:00:00.000Z".into(),
            since_unix_ms: 1_779_271_200_000,
            last_check: (last != 13).then(|| LastCheck {
                ok: state != BackendState::Down,
                detail: "connected".into(),
                latency_ms: 1.5,
                at_unix_ms: 1_779_271_211_000,
            }),
            active_flows: u64::from(last) - 10,
            packets: u64::from(last) * 100,
            bytes: u64::from(last) * 10_000,
            new_flows: u64::from(last),
            checks_ok: 40,
            checks_failed: u64::from(state == BackendState::Down) * 3,
        }
    }

    fn stats() -> StatsReport {
        StatsReport {
            vips: vec![
                VipReport {
                    vip: "10.111.100.1:80".into(),
                    address: Ipv4Addr::new(10, 111, 100, 1),
                    port: 80,
                    proto: Proto::Tcp,
                    forward: Forward::Ipip,
                    packets: 3600,
                    bytes: 360_000,
                    new_flows: 36,
                    backends: vec![
                        backend(11, BackendState::Up, 2),
                        backend(12, BackendState::Down, 1),
                        backend(13, BackendState::Draining, 0),
                    ],
                },
                VipReport {
                    vip: "10.111.100.1:5353".into(),
                    address: Ipv4Addr::new(10, 111, 100, 1),
                    port: 5353,
                    proto: Proto::Udp,
                    forward: Forward::L2,
                    packets: 0,
                    bytes: 0,
                    new_flows: 0,
                    backends: vec![],
                },
            ],
            reasons: lb_common::reason::NAMES
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), i as u64))
                .collect(),
            events: [
                ("midflow_miss", 1),
                ("flow_resteered", 2),
                ("flow_event_lost", 0),
            ]
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect(),
            flow_capacity: 262_144,
            flow_entries: 77,
        }
    }

    fn peers() -> PeersReport {
        let peer = |port, sent, received, rejected| PeerReport {
            address: SocketAddr::from(([10, 111, 1, 3], port)),
            connected: port == 7946,
            since_unix_ms: 1,
            inbound_connections: 1,
            flows_sent: sent,
            flows_received: received,
            last_msg_age_ms: Some(5),
            rejected,
            unknown_backend: 1,
            resyncs: 0,
        };
        PeersReport {
            node_id: "00000000000000aa".into(),
            listen: SocketAddr::from(([10, 111, 1, 2], 7946)),
            generated_unix_ms: 2,
            peers: vec![peer(7946, 100, 50, 0), peer(7947, 7, 0, 2)],
            totals: SyncTotals {
                local_flows: 107,
                flows_sent: 107,
                flows_received: 53,
                rejected: 6,
                rejected_unknown_source: 4,
                unknown_backend: 5,
                resyncs: 0,
                inbound_other: 1,
            },
            lag: LagReport {
                samples_total: 9,
                window: 9,
                p50_ms: Some(1.5),
                p99_ms: Some(20.0),
                max_ms: Some(21.0),
            },
        }
    }

    /// The value of the one sample that starts with `series` (name and labels, exactly as
    /// rendered), failing with the whole text otherwise.
    fn sample(text: &str, series: &str) -> f64 {
        let hits: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .collect();
        assert_eq!(hits.len(), 1, "{series} in:\n{text}");
        hits[0].parse().unwrap()
    }

    fn type_of<'a>(text: &'a str, name: &str) -> &'a str {
        let prefix = format!("# TYPE {name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no TYPE line for {name} in:\n{text}"))
    }

    #[test]
    fn renders_names_labels_types_and_values() {
        let text = render(&stats(), None).unwrap();
        let vip = r#"{proto="tcp",vip="10.111.100.1:80"}"#;
        assert_eq!(
            sample(&text, &format!("xlb_vip_packets_total{vip}")),
            3600.0
        );
        assert_eq!(
            sample(&text, &format!("xlb_vip_bytes_total{vip}")),
            360000.0
        );
        assert_eq!(
            sample(&text, &format!("xlb_vip_new_flows_total{vip}")),
            36.0
        );
        assert_eq!(
            sample(
                &text,
                r#"xlb_vip_packets_total{proto="udp",vip="10.111.100.1:5353"}"#
            ),
            0.0
        );
        let be = |n: &str, last: u8| {
            sample(
                &text,
                &format!(r#"{n}{{backend="10.111.1.{last}",proto="tcp",vip="10.111.100.1:80"}}"#),
            )
        };
        assert_eq!(be("xlb_backend_packets_total", 12), 1200.0);
        assert_eq!(be("xlb_backend_bytes_total", 12), 120000.0);
        assert_eq!(be("xlb_backend_new_flows_total", 11), 11.0);
        assert_eq!(be("xlb_backend_active_flows", 13), 3.0);
        assert_eq!(
            [11, 12, 13].map(|b| be("xlb_backend_up", b)),
            [1.0, 0.0, 1.0],
            "down = 0; draining is up"
        );
        assert_eq!(
            [11, 12, 13].map(|b| be("xlb_backend_draining", b)),
            [0.0, 0.0, 1.0]
        );
        assert_eq!(
            [11, 12, 13].map(|b| be("xlb_backend_weight", b)),
            [2.0, 1.0, 0.0]
        );
        assert_eq!(be("xlb_health_check_duration_seconds", 11), 0.0015);
        assert!(
            !text.contains(r#"xlb_health_check_duration_seconds{backend="10.111.1.13""#),
            "no last check, no latency sample"
        );
        assert_eq!(
            sample(
                &text,
                r#"xlb_health_checks_total{backend="10.111.1.12",proto="tcp",result="fail",vip="10.111.100.1:80"}"#
            ),
            3.0
        );
        assert_eq!(
            sample(
                &text,
                r#"xlb_health_checks_total{backend="10.111.1.12",proto="tcp",result="ok",vip="10.111.100.1:80"}"#
            ),
            40.0
        );
        for (i, name) in lb_common::reason::NAMES.iter().enumerate() {
            assert_eq!(
                sample(&text, &format!(r#"xlb_packets_total{{reason="{name}"}}"#)),
                i as f64
            );
        }
        assert_eq!(
            sample(
                &text,
                r#"xlb_datapath_events_total{event="flow_resteered"}"#
            ),
            2.0
        );
        assert_eq!(sample(&text, "xlb_flow_table_capacity"), 262144.0);
        assert_eq!(sample(&text, "xlb_flow_table_entries"), 77.0);
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            sample(&text, &format!(r#"xlb_build_info{{version="{version}"}}"#)),
            1.0
        );
        for (name, kind) in [
            ("xlb_vip_packets_total", "counter"),
            ("xlb_backend_bytes_total", "counter"),
            ("xlb_health_checks_total", "counter"),
            ("xlb_packets_total", "counter"),
            ("xlb_datapath_events_total", "counter"),
            ("xlb_backend_up", "gauge"),
            ("xlb_backend_weight", "gauge"),
            ("xlb_health_check_duration_seconds", "gauge"),
            ("xlb_flow_table_entries", "gauge"),
            ("xlb_build_info", "gauge"),
        ] {
            assert_eq!(type_of(&text, name), kind, "{name}");
        }
        // Every family is xlb_-prefixed and every counter ends in _total.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split(' ').skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("xlb_"), "{line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
        }
        assert!(
            !text.contains("xlb_sync_"),
            "no sync families when sync is off"
        );
    }

    #[test]
    fn sync_families_sum_to_the_totals() {
        let text = render(&stats(), Some(&peers())).unwrap();
        let p1 = r#"{peer="10.111.1.3:7946"}"#;
        let p2 = r#"{peer="10.111.1.3:7947"}"#;
        let other = r#"{peer="other"}"#;
        assert_eq!(
            sample(&text, &format!("xlb_sync_flows_sent_total{p1}")),
            100.0
        );
        assert_eq!(
            sample(&text, &format!("xlb_sync_flows_sent_total{p2}")),
            7.0
        );
        assert_eq!(
            sample(&text, &format!("xlb_sync_flows_received_total{other}")),
            3.0
        );
        assert_eq!(sample(&text, &format!("xlb_sync_rejected_total{p2}")), 2.0);
        assert_eq!(
            sample(&text, &format!("xlb_sync_rejected_total{other}")),
            4.0
        );
        assert_eq!(
            sample(&text, &format!("xlb_sync_unknown_backend_total{other}")),
            3.0
        );
        assert_eq!(sample(&text, &format!("xlb_sync_peer_connected{p1}")), 1.0);
        assert_eq!(sample(&text, &format!("xlb_sync_peer_connected{p2}")), 0.0);
        assert_eq!(
            sample(&text, r#"xlb_sync_lag_seconds{percentile="50"}"#),
            0.0015
        );
        assert_eq!(
            sample(&text, r#"xlb_sync_lag_seconds{percentile="99"}"#),
            0.02
        );
        assert_eq!(sample(&text, "xlb_sync_local_flows_total"), 107.0);
        let mut quiet = peers();
        quiet.lag.p50_ms = None;
        quiet.lag.p99_ms = None;
        let text = render(&stats(), Some(&quiet)).unwrap();
        assert!(!text.contains("xlb_sync_lag_seconds{"), "{text}");
    }

    /// `promtool check metrics` on the rendering, with and without sync. Fails (never skips)
    /// without promtool: it is what the issue asks the output to pass.
    #[test]
    fn promtool_accepts_the_rendering() {
        let Some(promtool) = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("promtool"))
                .find(|p| p.is_file())
        }) else {
            panic!(
                "promtool is not on PATH: install Debian's `prometheus` package (apt-get install \
                 --no-install-recommends prometheus), which provides it"
            );
        };
        for text in [
            render(&stats(), None).unwrap(),
            render(&stats(), Some(&peers())).unwrap(),
        ] {
            let mut child = Command::new(&promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics failed: {}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// A blocking HTTP/1.0-style GET against `addr`: status line and body.
    fn get(addr: SocketAddr, method: &str, path: &str) -> (String, String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.lines().next().unwrap().to_string();
        (status, head.to_string(), body.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_scrapes_from_the_loops_report() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel::<StatsReply>(SCRAPE_QUEUE);
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, tx, None, stop_rx));
        // Stands in for the serve loop: the first scrape gets a report, the second an error.
        let answered = tokio::spawn(async move {
            let first = rx.recv().await.unwrap();
            first.send(Ok(stats())).unwrap();
            let second = rx.recv().await.unwrap();
            second
                .send(Err(ControllerError::Stats {
                    source: "boom".into(),
                }))
                .unwrap();
        });
        let (ok, err, other, post) = tokio::task::spawn_blocking(move || {
            (
                get(addr, "GET", "/metrics"),
                get(addr, "GET", "/metrics"),
                get(addr, "GET", "/nope"),
                get(addr, "POST", "/metrics"),
            )
        })
        .await
        .unwrap();
        answered.await.unwrap();
        assert!(ok.0.contains(" 200 "), "{ok:?}");
        assert!(
            ok.1.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{}",
            ok.1
        );
        assert_eq!(ok.2, render(&stats(), None).unwrap());
        assert!(err.0.contains(" 500 ") && err.2.contains("boom"), "{err:?}");
        assert!(other.0.contains(" 404 "), "{other:?}");
        assert!(post.0.contains(" 405 "), "{post:?}");
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("the metrics server stops")
            .unwrap();
    }

    #[tokio::test]
    async fn a_taken_port_is_a_one_line_error() {
        let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = first.local_addr().unwrap();
        let e = bind(addr).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot listen for metrics scrapes on {addr}: ")),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }
}
