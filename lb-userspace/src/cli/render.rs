//! Tables for people: `vip list`, `backend list`, `stats` (the `--json` forms print the report
//! types of `api` as they are).

use crate::{
    api::{
        FlowCountReport, FlowFlushReport, FlowListReport, NodeReport, StatsReport, VipReport,
        VipSummary, WalkReport,
    },
    model::check::CheckKind,
    util::{fmt_age, fmt_duration},
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Left-aligned columns, two spaces apart, each line prefixed with `indent`.
pub(super) fn table(indent: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = indent.to_string();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `xlb node status`:
/// ```text
/// node: announcing through routing table 100 (proto 120)
/// routing daemon: BIRD 2.0.12 answers on /run/bird/bird.ctl (checked 2.1s ago)
/// ADDRESS       STATE      REASON              SERVING  VIPS
/// 10.111.100.1  announced  -                   3        10.111.100.1:80/tcp, 10.111.100.1:5353/udp
/// 10.111.100.2  withdrawn  no healthy backend  0        10.111.100.2:80/tcp
/// ```
pub(crate) fn node_text(node: &NodeReport, now: SystemTime) -> String {
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    let ago = |ms: u64| fmt_age(now.duration_since(at(ms)).unwrap_or_default());
    let mut out = format!(
        "node: {} through routing table {} (proto {})\n",
        if !node.attached {
            "not attached: nothing announced".to_string()
        } else if node.drained {
            let since = node.drained_since_unix_ms.map_or_else(String::new, |ms| {
                format!(
                    " since {} ({} ago)",
                    humantime::format_rfc3339_seconds(at(ms)),
                    ago(ms)
                )
            });
            format!("DRAINED{since}: nothing announced")
        } else if let Some(s) = &node.starting {
            format!("{s}: announces nothing new yet")
        } else {
            "announcing".to_string()
        },
        node.table,
        node.proto
    );
    if let Some(d) = &node.routing_daemon {
        let checked = ago(d.checked_unix_ms);
        out += &if d.answers {
            format!(
                "routing daemon: {} answers on {} (checked {checked} ago)\n",
                d.detail,
                d.socket.display()
            )
        } else {
            format!(
                "routing daemon: none answers on {} ({}; checked {checked} ago): nothing reaches the router\n",
                d.socket.display(),
                d.detail
            )
        };
    }
    if let Some(e) = &node.table_error {
        out += &format!("routing table error: {e}\n");
    }
    let rows: Vec<Vec<String>> = node
        .addresses
        .iter()
        .map(|a| {
            let state = match (a.announced, a.in_table) {
                (true, true) => "announced",
                (true, false) => "announcing",
                (false, true) => "withdrawing",
                (false, false) => "withdrawn",
            };
            vec![
                a.address.to_string(),
                state.to_string(),
                a.reason.clone().unwrap_or_else(|| "-".into()),
                a.serving_backends.to_string(),
                a.vips.join(", "),
            ]
        })
        .collect();
    if rows.is_empty() {
        out += "no VIPs configured\n";
    } else {
        out += &table(
            "",
            &["ADDRESS", "STATE", "REASON", "SERVING", "VIPS"],
            &rows,
        );
    }
    out
}

/// `xlb vip list`:
/// ```text
/// VIP              PROTO  FORWARD  BACKENDS  ICMP_ECHO  SOURCES                          CHECK
/// 10.111.100.1:80  tcp    ipip     3         on         allow 10.0.0.0/8, 10/s (burst 20) per source  http:/healthz every 200ms
/// ```
pub(crate) fn vip_table(vips: &[VipSummary]) -> String {
    let rows: Vec<Vec<String>> = vips
        .iter()
        .map(|v| {
            vec![
                v.vip.clone(),
                v.proto.to_string(),
                v.forward.to_string(),
                v.backends.len().to_string(),
                if v.icmp_echo { "on" } else { "off" }.to_string(),
                v.policy().summary(),
                if v.check.kind == CheckKind::None {
                    v.check.summary()
                } else {
                    format!(
                        "{} every {}",
                        v.check.summary(),
                        fmt_duration(v.check.interval)
                    )
                },
            ]
        })
        .collect();
    table(
        "",
        &[
            "VIP",
            "PROTO",
            "FORWARD",
            "BACKENDS",
            "ICMP_ECHO",
            "SOURCES",
            "CHECK",
        ],
        &rows,
    )
}

/// `xlb backend list VIP:PORT` (ages relative to `now`; a reason the VIP's rules give follows
/// the state in parentheses, e.g. `up (backup, standing by)`, `down (another primary is serving:
/// 10.111.1.22)`):
/// ```text
/// BACKEND      WEIGHT  STATE  SINCE                           LAST_CHECK  ACTIVE_FLOWS  PACKETS  BYTES  NEW_FLOWS
/// 10.111.1.11  1       up     2026-05-20T10:00:00Z (12s ago)  ok 1.2ms    3             10       840    10
/// ```
pub(crate) fn backend_table(vip: &VipReport, indent: &str, now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = vip
        .backends
        .iter()
        .map(|b| {
            let since = UNIX_EPOCH + Duration::from_millis(b.since_unix_ms);
            let age = now.duration_since(since).unwrap_or_default();
            vec![
                b.address.to_string(),
                b.weight.to_string(),
                match &b.reason {
                    Some(r) => format!("{} ({r})", b.state),
                    None => b.state.to_string(),
                },
                format!(
                    "{} ({} ago)",
                    humantime::format_rfc3339_seconds(since),
                    fmt_age(age)
                ),
                match &b.last_check {
                    None => "-".to_string(),
                    Some(c) if c.ok => format!("ok {:.1}ms", c.latency_ms),
                    Some(c) => format!("failed: {}", c.detail),
                },
                b.active_flows.to_string(),
                b.packets.to_string(),
                b.bytes.to_string(),
                b.new_flows.to_string(),
            ]
        })
        .collect();
    table(
        indent,
        &[
            "BACKEND",
            "WEIGHT",
            "STATE",
            "SINCE",
            "LAST_CHECK",
            "ACTIVE_FLOWS",
            "PACKETS",
            "BYTES",
            "NEW_FLOWS",
        ],
        &rows,
    )
}

/// `xlb stats`: one block per VIP (its counters, what its source checks and limits dropped,
/// then its backends'), then the per-reason counters, the flow and embryonic tables and the
/// deny list.
pub(crate) fn stats_text(stats: &StatsReport) -> String {
    let mut out = String::new();
    for v in &stats.vips {
        out.push_str(&format!(
            "VIP {}/{} forward {}: packets {} bytes {} new_flows {}\n",
            v.vip, v.proto, v.forward, v.packets, v.bytes, v.new_flows
        ));
        let dropped: Vec<String> = v
            .drops
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        if !dropped.is_empty() {
            out.push_str(&format!("  dropped: {}\n", dropped.join(", ")));
        }
        out.push_str(&backend_table(v, "  ", SystemTime::now()));
        out.push('\n');
    }
    let rows: Vec<Vec<String>> = stats
        .reasons
        .iter()
        .map(|(name, n)| vec![name.clone(), n.to_string()])
        .collect();
    out.push_str(&table("", &["REASON", "PACKETS"], &rows));
    let rows: Vec<Vec<String>> = stats
        .events
        .iter()
        .map(|(name, n)| vec![name.clone(), n.to_string()])
        .collect();
    out.push('\n');
    out.push_str(&table("", &["EVENT", "COUNT"], &rows));
    out.push_str(&format!("\n{}\n", flow_table_line(stats)));
    out
}

/// `xlb flows`:
/// ```text
/// CLIENT            VIP                  BACKEND      AGE    ORIGIN
/// 10.111.0.2:40312  10.111.100.1:80/tcp  10.111.1.11  350ms  local
/// 1 flow matched (2 entries walked in 0.1 ms)
/// ```
pub(crate) fn flow_table(list: &FlowListReport) -> String {
    let rows: Vec<Vec<String>> = list
        .flows
        .iter()
        .map(|f| {
            vec![
                std::net::SocketAddr::new(f.client, f.client_port).to_string(),
                format!("{}/{}", f.vip, f.proto),
                f.backend.to_string(),
                fmt_age(Duration::from_millis(f.age_ms)),
                f.origin.to_string(),
            ]
        })
        .collect();
    let mut out = if rows.is_empty() {
        String::new()
    } else {
        table("", &["CLIENT", "VIP", "BACKEND", "AGE", "ORIGIN"], &rows)
    };
    let w = &list.walk;
    let walked = walked(w);
    out.push_str(&if list.left_out == 0 {
        format!("{} matched ({walked})\n", flows_word(w.matched))
    } else {
        format!(
            "{} matched: the {} most recent shown, {} left out (--limit N shows more; {walked})\n",
            flows_word(w.matched),
            list.flows.len(),
            list.left_out
        )
    });
    out
}

/// `xlb flows --count [--by ...]`: a table of the groups, then the total.
pub(crate) fn count_text(count: &FlowCountReport) -> String {
    let mut out = String::new();
    if let Some(by) = count.by {
        let rows: Vec<Vec<String>> = count
            .groups
            .iter()
            .map(|g| vec![g.key.clone(), g.flows.to_string()])
            .collect();
        out.push_str(&table(
            "",
            &[&by.to_string().to_uppercase(), "FLOWS"],
            &rows,
        ));
    }
    let w = &count.walk;
    out.push_str(&format!("{} ({})\n", flows_word(w.matched), walked(w)));
    out
}

/// `xlb flows flush`: one line.
pub(crate) fn flush_text(flush: &FlowFlushReport) -> String {
    let w = &flush.walk;
    format!(
        "flushed {} ({} matched; {}, deleted in {:.1} ms)\n",
        flows_word(flush.flushed),
        w.matched,
        walked(w),
        flush.delete_ms
    )
}

fn flows_word(n: u64) -> String {
    if n == 1 {
        "1 flow".to_string()
    } else {
        format!("{n} flows")
    }
}

fn walked(w: &WalkReport) -> String {
    format!("{} entries walked in {:.1} ms", w.entries, w.walk_ms)
}

/// `flow table: 12 of 262144 entries in use (0.0%)`, then the embryonic table and the deny
/// list on lines of their own.
pub(super) fn flow_table_line(stats: &StatsReport) -> String {
    let pct = |n: u64, of: u32| {
        if of == 0 {
            0.0
        } else {
            n as f64 * 100.0 / f64::from(of)
        }
    };
    let flushed = match stats.flows_flushed {
        0 => String::new(),
        n => format!("; {n} flows flushed since the agent started"),
    };
    format!(
        "flow table: {} of {} entries in use ({:.1}%){flushed}\n\
         embryonic table: {} of {} entries in use ({:.1}%)\n\
         deny list: {} prefixes ({} of them IPv4 host entries, {} IPv6)",
        stats.flow_entries,
        stats.flow_capacity,
        pct(stats.flow_entries, stats.flow_capacity),
        stats.embryonic_entries,
        stats.embryonic_capacity,
        pct(stats.embryonic_entries, stats.embryonic_capacity),
        stats.deny_list,
        stats.deny_hosts,
        stats.deny_ipv6,
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::{
        api::{FlowEntry, FlowGroup},
        model::flows::{CountBy, Origin},
    };

    #[test]
    fn node_status_names_the_state_and_the_reason_per_address() {
        use crate::api::{AddressReport, DaemonReport};
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let address = |last: u8, announced, in_table, reason: Option<&str>| AddressReport {
            address: std::net::IpAddr::from([10, 111, 100, last]),
            announced,
            in_table,
            reason: reason.map(Into::into),
            vips: vec![format!("10.111.100.{last}:80/tcp")],
            serving_backends: u32::from(announced) * 3,
        };
        let mut node = NodeReport {
            table: 100,
            proto: 120,
            attached: true,
            drained: false,
            drained_since_unix_ms: None,
            starting: None,
            table_error: None,
            routing_daemon: Some(DaemonReport {
                socket: "/run/bird/bird.ctl".into(),
                answers: false,
                detail: "Connection refused".into(),
                checked_unix_ms: ms(now - Duration::from_secs(2)),
            }),
            addresses: vec![
                address(1, true, true, None),
                address(2, false, false, Some("no healthy backend")),
            ],
        };
        let text = node_text(&node, now);
        assert!(
            text.starts_with("node: announcing through routing table 100 (proto 120)\n"),
            "{text}"
        );
        assert!(text.contains(
            "routing daemon: none answers on /run/bird/bird.ctl (Connection refused; checked 2s ago)"
        ), "{text}");
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip_while(|l| !l.starts_with("ADDRESS"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[1][..4], ["10.111.100.1", "announced", "-", "3"]);
        assert_eq!(rows[2][..2], ["10.111.100.2", "withdrawn"]);
        assert!(text.contains("no healthy backend"));
        node.drained = true;
        node.drained_since_unix_ms = Some(ms(now - Duration::from_secs(60)));
        let text = node_text(&node, now);
        assert!(
            text.starts_with(
                "node: DRAINED since 2027-01-15T07:59:00Z (1m0s ago): nothing announced"
            ),
            "{text}"
        );
    }

    #[test]
    fn flow_tables_say_what_was_left_out() {
        let walk = WalkReport {
            entries: 1_000_000,
            matched: 3,
            walk_ms: 265.04,
        };
        let entry = FlowEntry {
            client: IpAddr::from([10, 111, 0, 2]),
            client_port: 40312,
            vip: "10.111.100.1:80".into(),
            proto: Proto::Tcp,
            backend: IpAddr::from([10, 111, 1, 11]),
            age_ms: 1500,
            origin: Origin::Peer,
        };
        let list = FlowListReport {
            walk,
            left_out: 2,
            flows: vec![entry],
        };
        assert_eq!(
            flow_table(&list),
            "CLIENT            VIP                  BACKEND      AGE   ORIGIN\n\
             10.111.0.2:40312  10.111.100.1:80/tcp  10.111.1.11  1.5s  peer\n\
             3 flows matched: the 1 most recent shown, 2 left out (--limit N shows more; \
             1000000 entries walked in 265.0 ms)\n"
        );
        let none = FlowListReport {
            walk: WalkReport { matched: 0, ..walk },
            left_out: 0,
            flows: vec![],
        };
        assert_eq!(
            flow_table(&none),
            "0 flows matched (1000000 entries walked in 265.0 ms)\n"
        );
        let count = FlowCountReport {
            walk,
            by: Some(CountBy::Backend),
            groups: vec![
                FlowGroup {
                    key: "10.111.1.11".into(),
                    flows: 2,
                },
                FlowGroup {
                    key: "10.111.1.12".into(),
                    flows: 1,
                },
            ],
        };
        assert_eq!(
            count_text(&count),
            "BACKEND      FLOWS\n10.111.1.11  2\n10.111.1.12  1\n\
             3 flows (1000000 entries walked in 265.0 ms)\n"
        );
        let flush = FlowFlushReport {
            walk: WalkReport { matched: 1, ..walk },
            flushed: 1,
            delete_ms: 0.04,
        };
        assert_eq!(
            flush_text(&flush),
            "flushed 1 flow (1 matched; 1000000 entries walked in 265.0 ms, deleted in 0.0 ms)\n"
        );
    }

    use crate::{
        api::{BackendReport, BackendState, BackendSummary, LastCheck},
        model::{Forward, Proto, check::CheckSpec},
    };
    use std::net::IpAddr;

    pub(in crate::cli) fn report() -> VipReport {
        VipReport {
            vip: "10.111.100.1:80".into(),
            address: IpAddr::from([10, 111, 100, 1]),
            port: 80,
            proto: Proto::Tcp,
            forward: Forward::Ipip,
            packets: 30,
            bytes: 2520,
            new_flows: 30,
            drops: [
                ("drop_src_denied".to_string(), 0),
                ("drop_rate_limited_src".to_string(), 80),
            ]
            .into_iter()
            .collect(),
            backends: vec![BackendReport {
                address: IpAddr::from([10, 111, 1, 11]),
                weight: 1,
                state: BackendState::Up,
                since: "2026-05-20T10:00:00.000Z".into(),
                since_unix_ms: 1_779_271_200_000,
                last_check: Some(LastCheck {
                    ok: true,
                    detail: "connected".into(),
                    latency_ms: 1.23,
                    at_unix_ms: 1_779_271_211_000,
                }),
                active_flows: 3,
                packets: 10,
                bytes: 840,
                new_flows: 10,
                checks_ok: 12,
                checks_failed: 0,
                backup: false,
                reason: None,
            }],
            primary_conflict: None,
        }
    }

    #[test]
    fn tables_have_the_documented_layout() {
        let vips = vec![VipSummary {
            vip: "10.111.100.1:80".into(),
            address: IpAddr::from([10, 111, 100, 1]),
            port: 80,
            proto: Proto::Tcp,
            forward: Forward::Ipip,
            check: CheckSpec::default_for(Proto::Tcp),
            backends: vec![
                BackendSummary {
                    address: IpAddr::from([10, 111, 1, 11]),
                    weight: 1,
                    check: None,
                    backup: false,
                };
                3
            ],
            icmp_echo: true,
            allow_src: vec![],
            deny_src: vec![],
            src_rate: Some(10),
            src_burst: Some(20),
            vip_rate: None,
            vip_burst: None,
        }];
        assert_eq!(
            vip_table(&vips),
            "VIP              PROTO  FORWARD  BACKENDS  ICMP_ECHO  SOURCES                     CHECK\n\
             10.111.100.1:80  tcp    ipip     3         on         10/s (burst 20) per source  tcp every 1s\n"
        );
        let now = UNIX_EPOCH + Duration::from_millis(1_779_271_212_000);
        assert_eq!(
            backend_table(&report(), "", now),
            "BACKEND      WEIGHT  STATE  SINCE                           LAST_CHECK  ACTIVE_FLOWS  PACKETS  BYTES  NEW_FLOWS\n\
             10.111.1.11  1       up     2026-05-20T10:00:00Z (12s ago)  ok 1.2ms    3             10       840    10\n"
        );
        let mut down = report();
        down.backends[0].state = BackendState::Down;
        down.backends[0].last_check.as_mut().unwrap().ok = false;
        down.backends[0].last_check.as_mut().unwrap().detail = "connection refused".into();
        assert!(
            backend_table(&down, "", now)
                .contains("  down   2026-05-20T10:00:00Z (12s ago)  failed: connection refused  3")
        );
        // A reason from the VIP's rules follows the state.
        let mut held = report();
        held.backends[0].state = BackendState::Down;
        held.backends[0].reason = Some("another primary is serving: 10.111.1.22".into());
        assert!(
            backend_table(&held, "", now)
                .contains("  down (another primary is serving: 10.111.1.22)  2026-05-20T10:00:00Z")
        );
        down.backends[0].last_check = None;
        assert!(backend_table(&down, "", now).contains("(12s ago)  -           3"));
        let stats = StatsReport {
            vips: vec![report()],
            reasons: [("fwd_tx".to_string(), 30)].into_iter().collect(),
            events: [("midflow_miss".to_string(), 2)].into_iter().collect(),
            flow_capacity: 262144,
            flow_entries: 12,
            flows_flushed: 0,
            embryonic_capacity: 65536,
            embryonic_entries: 3,
            deny_list: 2,
            deny_hosts: 1,
            deny_ipv6: 0,
            node: None,
        };
        let text = stats_text(&stats);
        assert!(text.starts_with(
            "VIP 10.111.100.1:80/tcp forward ipip: packets 30 bytes 2520 new_flows 30\n  dropped: drop_rate_limited_src 80\n  BACKEND"
        ), "{text}");
        assert!(text.contains("REASON  PACKETS\nfwd_tx  30\n"), "{text}");
        assert!(
            text.ends_with(
                "flow table: 12 of 262144 entries in use (0.0%)\n\
                 embryonic table: 3 of 65536 entries in use (0.0%)\n\
                 deny list: 2 prefixes (1 of them IPv4 host entries, 0 IPv6)\n"
            ),
            "{text}"
        );
    }
}
