//! The Prometheus text of one scrape, built from the reports `xlb stats --json` and
//! `xlb peers --json` print: a fresh registry each time, nothing kept between scrapes.

use super::MetricsError;
use crate::{
    api::{BackendReport, BackendState, NodeReport, StatsReport, VipReport},
    sync::{PeerReport, PeersReport},
};
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

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
pub(crate) fn render(
    stats: &StatsReport,
    sync: Option<&PeersReport>,
) -> Result<String, MetricsError> {
    let f = Families(Registry::new());
    f.gauge(
        "xlb_build_info",
        "The running xlb agent's version (always 1).",
        &["version"],
    )?
    .with_label_values(&[env!("CARGO_PKG_VERSION")])
    .set(1);
    render_vips(&f, stats)?;
    render_datapath(&f, stats)?;
    if let Some(node) = &stats.node {
        render_node(&f, node)?;
    }
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

/// Per-VIP and per-backend families: counters, state, weight, active flows, checks.
fn render_vips(f: &Families, stats: &StatsReport) -> Result<(), MetricsError> {
    type VipCounter = (&'static str, &'static str, fn(&VipReport) -> u64);
    let vip_counters: [VipCounter; 3] = [
        (
            "xlb_vip_packets_total",
            "Packets steered for the VIP.",
            |v| v.packets,
        ),
        (
            "xlb_vip_bytes_total",
            "Bytes (IP packets as received) steered for the VIP.",
            |v| v.bytes,
        ),
        (
            "xlb_vip_new_flows_total",
            "New flows the VIP assigned to a backend.",
            |v| v.new_flows,
        ),
    ];
    for (name, help, value) in vip_counters {
        let family = f.counter(name, help, &["vip", "proto"])?;
        for v in &stats.vips {
            let proto = v.proto.to_string();
            family
                .with_label_values(&[v.vip.as_str(), proto.as_str()])
                .inc_by(value(v));
        }
    }
    let conflict = f.gauge(
        "xlb_vip_primary_conflict",
        "VIPs with postgres:primary checks: 1 while more than one backend reports primary (new \
         flows go to one only; see xlb_backend_up).",
        &["vip", "proto"],
    )?;
    for v in &stats.vips {
        if let Some(c) = v.primary_conflict {
            let proto = v.proto.to_string();
            conflict
                .with_label_values(&[v.vip.as_str(), proto.as_str()])
                .set(i64::from(c));
        }
    }
    let dropped = f.counter(
        "xlb_vip_dropped_packets_total",
        "Packets for the VIP dropped by its source checks and new-flow limits, by reason \
         (drop_deny_list, drop_src_denied, drop_src_not_allowed, drop_rate_limited_src, \
         drop_rate_limited_vip).",
        &["vip", "proto", "reason"],
    )?;
    for v in &stats.vips {
        let proto = v.proto.to_string();
        for (reason, n) in &v.drops {
            dropped
                .with_label_values(&[v.vip.as_str(), proto.as_str(), reason.as_str()])
                .inc_by(*n);
        }
    }
    render_backends(f, stats)
}

/// A backend family: its name, its help, and its value for one backend.
type BackendValue<T> = (&'static str, &'static str, fn(&BackendReport) -> T);

const BACKEND_COUNTERS: [BackendValue<u64>; 3] = [
    (
        "xlb_backend_packets_total",
        "Packets forwarded to the backend.",
        |b| b.packets,
    ),
    (
        "xlb_backend_bytes_total",
        "Bytes (IP packets as received, before encapsulation) forwarded to the backend.",
        |b| b.bytes,
    ),
    (
        "xlb_backend_new_flows_total",
        "New flows assigned to the backend.",
        |b| b.new_flows,
    ),
];

const BACKEND_GAUGES: [BackendValue<i64>; 5] = [
    (
        "xlb_backend_up",
        "1 unless the backend is down (it failed its health checks, or its VIP's rules hold it \
         down: another primary serves, or its first role check is outstanding); a draining \
         backend is up.",
        |b| i64::from(b.state != BackendState::Down),
    ),
    (
        "xlb_backend_draining",
        "1 if the backend is drained (weight 0: no new flows, existing flows stay).",
        |b| i64::from(b.weight == 0),
    ),
    (
        "xlb_backend_weight",
        "Configured weight of the backend (0 = drained).",
        |b| i64::from(b.weight),
    ),
    (
        "xlb_backend_backup",
        "1 if the backend is a backup (new flows only while no regular backend can take them).",
        |b| i64::from(b.backup),
    ),
    (
        "xlb_backend_active_flows",
        "Flow-table entries of the backend that saw a packet in the last 60 s.",
        |b| i64_of(b.active_flows),
    ),
];

/// A backend's families: its counters, state, weight, active flows and health checks.
fn render_backends(f: &Families, stats: &StatsReport) -> Result<(), MetricsError> {
    let bl = ["vip", "proto", "backend"];
    let counters = BACKEND_COUNTERS
        .into_iter()
        .map(|(name, help, value)| Ok((f.counter(name, help, &bl)?, value)))
        .collect::<Result<Vec<_>, MetricsError>>()?;
    let gauges = BACKEND_GAUGES
        .into_iter()
        .map(|(name, help, value)| Ok((f.gauge(name, help, &bl)?, value)))
        .collect::<Result<Vec<_>, MetricsError>>()?;
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
        let proto = v.proto.to_string();
        for b in &v.backends {
            let addr = b.address.to_string();
            let l = [v.vip.as_str(), proto.as_str(), addr.as_str()];
            for (family, value) in &counters {
                family.with_label_values(&l).inc_by(value(b));
            }
            for (family, value) in &gauges {
                family.with_label_values(&l).set(value(b));
            }
            for (result, n) in [("ok", b.checks_ok), ("fail", b.checks_failed)] {
                checks
                    .with_label_values(&[l[0], l[1], l[2], result])
                    .inc_by(n);
            }
            if let Some(c) = &b.last_check {
                check_latency
                    .with_label_values(&l)
                    .set(c.latency_ms / 1000.0);
            }
        }
    }
    Ok(())
}

/// Route announcement (`--announce-table`): per VIP address whether its route is in the table
/// the routing daemon announces, and the node's drain and start-up.
fn render_node(f: &Families, node: &NodeReport) -> Result<(), MetricsError> {
    let announced = f.gauge(
        "xlb_vip_announced",
        "1 while the VIP address's route is in the announce table (the routing daemon \
         announces it to the router), else 0; `xlb node status` says why.",
        &["address"],
    )?;
    for a in &node.addresses {
        announced
            .with_label_values(&[a.address.to_string().as_str()])
            .set(i64::from(a.in_table));
    }
    let flags = [
        (
            "xlb_node_drained",
            "1 while the node is drained (`xlb node drain`): no VIP address is announced.",
            node.drained,
        ),
        (
            "xlb_node_starting",
            "1 while the agent starts: it announces nothing before its first health checks \
             and its peers' flow tables.",
            node.starting.is_some(),
        ),
    ];
    for (name, help, on) in flags {
        f.gauge(name, help, &[])?
            .with_label_values::<&str>(&[])
            .set(i64::from(on));
    }
    if let Some(d) = &node.routing_daemon {
        f.gauge(
            "xlb_routing_daemon_up",
            "1 while the routing daemon answers on its control socket (--bird-socket).",
            &[],
        )?
        .with_label_values::<&str>(&[])
        .set(i64::from(d.answers));
    }
    Ok(())
}

/// Per-reason packets, data-path events and the flow table's size and fill.
fn render_datapath(f: &Families, stats: &StatsReport) -> Result<(), MetricsError> {
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
        "Data-path events: midflow_miss (a TCP packet without SYN and no flow entry, steered \
         as a new flow), midflow_held (such a packet's flow held for a peer's record, with peer \
         sync on), flow_resteered, flow_event_lost (sync ring buffer full), nexthop_lookup \
         (FIB lookup for a backend's next hop; cached per CPU for 1 s).",
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
        "Entries in use in the flow table (an LRU: finished flows stay until evicted); on large \
         tables counted at most once per second.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .set(i64_of(stats.flow_entries));
    f.counter(
        "xlb_flows_flushed_total",
        "Flows deleted from the flow table by `xlb flows flush` (their next packets took a \
         backend anew).",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(stats.flows_flushed);
    render_door(f, stats)
}

/// The embryonic table's size and fill, and the deny list's length.
fn render_door(f: &Families, stats: &StatsReport) -> Result<(), MetricsError> {
    let gauges: [(&'static str, &str, i64); 5] = [
        (
            "xlb_embryonic_table_capacity",
            "Entries of the embryonic table, where new TCP flows wait for their first packet \
             without SYN (--embryonic-capacity).",
            i64::from(stats.embryonic_capacity),
        ),
        (
            "xlb_embryonic_table_entries",
            "Entries in use in the embryonic table (an LRU: a SYN flood churns it; counted by \
             the flow table's walk).",
            i64_of(stats.embryonic_entries),
        ),
        (
            "xlb_deny_list_prefixes",
            "Prefixes on the global deny list (xlb deny).",
            i64_of(stats.deny_list),
        ),
        (
            "xlb_deny_list_host_entries",
            "Of the deny list's prefixes, IPv4 host entries (/32), which the data path finds with \
             one exact-match lookup; the shorter ones are in its LPM trie.",
            i64_of(stats.deny_hosts),
        ),
        (
            "xlb_deny_list_ipv6_prefixes",
            "Of the deny list's prefixes, IPv6 ones (hosts included), in the data path's IPv6 \
             LPM trie.",
            i64_of(stats.deny_ipv6),
        ),
    ];
    for (name, help, value) in gauges {
        f.gauge(name, help, &[])?
            .with_label_values::<&str>(&[])
            .set(value);
    }
    Ok(())
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
        "Sync handshakes and records from the peer that failed the key, sequence, decryption, format or version checks, and connections without a Hello in time.",
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
    let sum = |field: fn(&PeerReport) -> u64| -> u64 { sync.peers.iter().map(field).sum() };
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
    render_sync_node(f, sync)
}

/// Sync families of this node as a whole: flows taken for sync, and the lag.
fn render_sync_node(f: &Families, sync: &PeersReport) -> Result<(), MetricsError> {
    f.counter(
        "xlb_sync_local_flows_total",
        "New flows of this node's data path taken for sync.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(sync.totals.local_flows);
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::{
        api::{BackendReport, LastCheck, VipReport},
        model::{Forward, Proto},
        sync::{LagReport, PeerReport, SyncTotals},
    };
    use std::{
        io::Write,
        net::{IpAddr, SocketAddr},
        process::{Command, Stdio},
    };

    fn backend(last: u8, state: BackendState, weight: u32) -> BackendReport {
        BackendReport {
            address: IpAddr::from([10, 111, 1, last]),
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
            backup: last == 13,
            reason: None,
        }
    }

    pub(in crate::agent::metrics) fn stats() -> StatsReport {
        StatsReport {
            vips: vec![
                VipReport {
                    vip: "10.111.100.1:80".into(),
                    address: IpAddr::from([10, 111, 100, 1]),
                    port: 80,
                    proto: Proto::Tcp,
                    forward: Forward::Ipip,
                    packets: 3600,
                    bytes: 360_000,
                    new_flows: 36,
                    drops: [("drop_src_denied".to_string(), 4)].into_iter().collect(),
                    backends: vec![
                        backend(11, BackendState::Up, 2),
                        backend(12, BackendState::Down, 1),
                        backend(13, BackendState::Draining, 0),
                    ],
                    primary_conflict: Some(true),
                },
                VipReport {
                    vip: "10.111.100.1:5353".into(),
                    address: IpAddr::from([10, 111, 100, 1]),
                    port: 5353,
                    proto: Proto::Udp,
                    forward: Forward::L2,
                    packets: 0,
                    bytes: 0,
                    new_flows: 0,
                    drops: Default::default(),
                    backends: vec![],
                    primary_conflict: None,
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
            flows_flushed: 5,
            embryonic_capacity: 65536,
            embryonic_entries: 5,
            deny_list: 3,
            deny_hosts: 1,
            deny_ipv6: 0,
            node: Some(NodeReport {
                table: 100,
                proto: 120,
                attached: true,
                drained: false,
                drained_since_unix_ms: None,
                starting: None,
                table_error: None,
                routing_daemon: Some(crate::api::DaemonReport {
                    socket: "/run/bird/bird.ctl".into(),
                    answers: true,
                    detail: "BIRD 2.0.12".into(),
                    checked_unix_ms: 1,
                }),
                addresses: [(1, true), (2, false)]
                    .into_iter()
                    .map(|(last, on)| crate::api::AddressReport {
                        address: IpAddr::from([10, 111, 100, last]),
                        announced: on,
                        in_table: on,
                        reason: (!on).then(|| "no healthy backend".into()),
                        vips: vec![format!("10.111.100.{last}:80/tcp")],
                        serving_backends: u32::from(on),
                    })
                    .collect(),
            }),
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
            snapshots_received: 1,
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
        assert_eq!(
            [11, 12, 13].map(|b| be("xlb_backend_backup", b)),
            [0.0, 0.0, 1.0]
        );
        // The conflict gauge exists only for VIPs with postgres:primary checks.
        assert_eq!(
            sample(&text, &format!("xlb_vip_primary_conflict{vip}")),
            1.0
        );
        assert!(!text.contains(r#"xlb_vip_primary_conflict{proto="udp""#));
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
        assert_eq!(sample(&text, "xlb_flows_flushed_total"), 5.0);
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
            ("xlb_vip_primary_conflict", "gauge"),
            ("xlb_health_check_duration_seconds", "gauge"),
            ("xlb_flow_table_entries", "gauge"),
            ("xlb_flows_flushed_total", "counter"),
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
    fn announcement_families_follow_the_node_report() {
        let text = render(&stats(), None).unwrap();
        assert_eq!(
            sample(&text, r#"xlb_vip_announced{address="10.111.100.1"}"#),
            1.0
        );
        assert_eq!(
            sample(&text, r#"xlb_vip_announced{address="10.111.100.2"}"#),
            0.0
        );
        assert_eq!(sample(&text, "xlb_node_drained"), 0.0);
        assert_eq!(sample(&text, "xlb_node_starting"), 0.0);
        assert_eq!(sample(&text, "xlb_routing_daemon_up"), 1.0);
        let mut off = stats();
        off.node = None;
        let text = render(&off, None).unwrap();
        assert!(!text.contains("xlb_vip_announced") && !text.contains("xlb_node_"));
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
}
