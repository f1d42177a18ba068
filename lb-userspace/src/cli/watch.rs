//! `xlb stats --watch`: a report every interval, with per-second rates from the previous one.

use super::{
    CliError,
    commands::fetch_stats,
    print,
    render::{flow_table_line, table},
};
use crate::{api::StatsReport, model::Proto, util::fmt_duration};
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

/// Poll the agent every `interval` until interrupted (SIGINT's default action ends the
/// process: there is nothing to clean up). Rates come from two consecutive reports and the time
/// between them as measured here.
pub(super) fn watch_stats(socket: &Path, interval: Duration, json: bool) -> Result<(), CliError> {
    let mut prev: Option<(Instant, StatsReport)> = None;
    loop {
        let stats = fetch_stats(socket)?;
        let at = Instant::now();
        let r = prev
            .as_ref()
            .map(|(t, p)| rates(p, &stats, at.duration_since(*t)));
        if json {
            let frame = WatchFrame {
                stats: &stats,
                rates: r.as_ref(),
            };
            let mut line = serde_json::to_string(&frame).expect("reports serialise to JSON");
            line.push('\n');
            print(&line)?;
        } else {
            // Home + clear screen (plain ANSI), then the frame.
            print(&format!(
                "\x1b[H\x1b[2J{}",
                watch_text(&stats, r.as_ref(), interval, SystemTime::now())
            ))?;
        }
        prev = Some((at, stats));
        std::thread::sleep(interval);
    }
}

/// One line of `xlb stats --watch --json`: the `xlb stats --json` object plus `rates` (`null`
/// in the first line).
#[derive(Debug, serde::Serialize)]
pub(crate) struct WatchFrame<'a> {
    #[serde(flatten)]
    pub(crate) stats: &'a StatsReport,
    pub(crate) rates: Option<&'a Rates>,
}

/// Per-second rates between two stats reports.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub(crate) struct Rates {
    /// Seconds between the two reports.
    pub(crate) interval_s: f64,
    pub(crate) vips: Vec<VipRates>,
    /// Packets per second per reason; `None` when the counter went backwards.
    pub(crate) reasons: BTreeMap<String, Option<f64>>,
}

/// Rates are `None` when there is nothing to compare with: the VIP or backend is new, or its
/// counter went backwards (it was removed and added again).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub(crate) struct VipRates {
    pub(crate) vip: String,
    pub(crate) proto: Proto,
    pub(crate) packets_per_s: Option<f64>,
    pub(crate) bytes_per_s: Option<f64>,
    pub(crate) new_flows_per_s: Option<f64>,
    pub(crate) backends: Vec<BackendRates>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub(crate) struct BackendRates {
    pub(crate) address: IpAddr,
    pub(crate) packets_per_s: Option<f64>,
    pub(crate) bytes_per_s: Option<f64>,
    pub(crate) new_flows_per_s: Option<f64>,
}

/// `(cur - prev) / elapsed`, or `None` without a previous value, with a counter that went
/// backwards, or with no time elapsed.
fn rate(prev: Option<u64>, cur: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    let delta = cur.checked_sub(prev?)?;
    (secs > 0.0).then(|| delta as f64 / secs)
}

/// Rates of every VIP and backend of `cur`, against the same VIP (address, port, protocol) and
/// backend (address) in `prev`.
pub(crate) fn rates(prev: &StatsReport, cur: &StatsReport, elapsed: Duration) -> Rates {
    let vips = cur
        .vips
        .iter()
        .map(|v| {
            let p = prev
                .vips
                .iter()
                .find(|p| p.vip == v.vip && p.proto == v.proto);
            VipRates {
                vip: v.vip.clone(),
                proto: v.proto,
                packets_per_s: rate(p.map(|p| p.packets), v.packets, elapsed),
                bytes_per_s: rate(p.map(|p| p.bytes), v.bytes, elapsed),
                new_flows_per_s: rate(p.map(|p| p.new_flows), v.new_flows, elapsed),
                backends: v
                    .backends
                    .iter()
                    .map(|b| {
                        let pb =
                            p.and_then(|p| p.backends.iter().find(|pb| pb.address == b.address));
                        BackendRates {
                            address: b.address,
                            packets_per_s: rate(pb.map(|x| x.packets), b.packets, elapsed),
                            bytes_per_s: rate(pb.map(|x| x.bytes), b.bytes, elapsed),
                            new_flows_per_s: rate(pb.map(|x| x.new_flows), b.new_flows, elapsed),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let reasons = cur
        .reasons
        .iter()
        .map(|(name, n)| {
            (
                name.clone(),
                rate(prev.reasons.get(name).copied(), *n, elapsed),
            )
        })
        .collect();
    Rates {
        interval_s: elapsed.as_secs_f64(),
        vips,
        reasons,
    }
}

/// A rate for a table cell: `-` when unknown, else 3 significant-ish digits with k/M/G.
fn fmt_rate(r: Option<f64>) -> String {
    match r {
        None => "-".to_string(),
        Some(x) if x < 1_000.0 => format!("{x:.1}"),
        Some(x) if x < 1_000_000.0 => format!("{:.1}k", x / 1e3),
        Some(x) if x < 1_000_000_000.0 => format!("{:.1}M", x / 1e6),
        Some(x) => format!("{:.1}G", x / 1e9),
    }
}

/// One `xlb stats --watch` frame (`rates` is `None` for the first):
/// ```text
/// xlb stats every 1s, 2026-05-20T10:00:12Z (Ctrl-C to quit)
///
/// VIP / BACKEND       PROTO  STATE  WEIGHT  ACTIVE  PACKETS  BYTES   NEW_FLOWS  PKT/S  BYTES/S  FLOWS/S
/// 10.111.100.1:80     tcp                           120      9840    30         12.0   984.0    3.0
///   -> 10.111.1.11           up     1       10      40       3280    10         4.0    328.0    1.0
/// ```
/// then the non-zero reasons and events and the flow table's fill.
pub(crate) fn watch_text(
    stats: &StatsReport,
    rates: Option<&Rates>,
    interval: Duration,
    now: SystemTime,
) -> String {
    let mut out = format!(
        "xlb stats every {}, {} (Ctrl-C to quit)\n\n",
        fmt_duration(interval),
        humantime::format_rfc3339_seconds(now)
    );
    out.push_str(&table(
        "",
        &[
            "VIP / BACKEND",
            "PROTO",
            "STATE",
            "WEIGHT",
            "ACTIVE",
            "PACKETS",
            "BYTES",
            "NEW_FLOWS",
            "PKT/S",
            "BYTES/S",
            "FLOWS/S",
        ],
        &vip_rows(stats, rates),
    ));
    // Zero reasons are noise in a live view; the full list is in plain `xlb stats`.
    let rows: Vec<Vec<String>> = stats
        .reasons
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(name, n)| {
            let r = rates.and_then(|r| r.reasons.get(name).copied().flatten());
            vec![name.clone(), n.to_string(), fmt_rate(r)]
        })
        .collect();
    out.push('\n');
    out.push_str(&table("", &["REASON", "PACKETS", "PKT/S"], &rows));
    let events: Vec<String> = stats
        .events
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    if !events.is_empty() {
        out.push_str(&format!("\nevents: {}\n", events.join(", ")));
    }
    out.push_str(&format!("\n{}\n", flow_table_line(stats)));
    out
}

/// A row per VIP, then one per backend of it, with totals and rates.
fn vip_rows(stats: &StatsReport, rates: Option<&Rates>) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for v in &stats.vips {
        let vr = rates.and_then(|r| r.vips.iter().find(|x| x.vip == v.vip && x.proto == v.proto));
        rows.push(vec![
            v.vip.clone(),
            v.proto.to_string(),
            String::new(),
            String::new(),
            v.backends
                .iter()
                .map(|b| b.active_flows)
                .sum::<u64>()
                .to_string(),
            v.packets.to_string(),
            v.bytes.to_string(),
            v.new_flows.to_string(),
            fmt_rate(vr.and_then(|r| r.packets_per_s)),
            fmt_rate(vr.and_then(|r| r.bytes_per_s)),
            fmt_rate(vr.and_then(|r| r.new_flows_per_s)),
        ]);
        for b in &v.backends {
            let br = vr.and_then(|r| r.backends.iter().find(|x| x.address == b.address));
            rows.push(vec![
                format!("  -> {}", b.address),
                String::new(),
                b.state.to_string(),
                b.weight.to_string(),
                b.active_flows.to_string(),
                b.packets.to_string(),
                b.bytes.to_string(),
                b.new_flows.to_string(),
                fmt_rate(br.and_then(|r| r.packets_per_s)),
                fmt_rate(br.and_then(|r| r.bytes_per_s)),
                fmt_rate(br.and_then(|r| r.new_flows_per_s)),
            ]);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::render::tests::report;
    use std::time::UNIX_EPOCH;

    fn snapshot(vip: (u64, u64, u64), be: (u64, u64, u64), fwd_tx: u64) -> StatsReport {
        let mut v = report();
        (v.packets, v.bytes, v.new_flows) = vip;
        let b = &mut v.backends[0];
        (b.packets, b.bytes, b.new_flows) = be;
        StatsReport {
            vips: vec![v],
            reasons: [
                ("fwd_tx".to_string(), fwd_tx),
                ("drop_no_backend".to_string(), 0),
            ]
            .into_iter()
            .collect(),
            events: [("midflow_miss".to_string(), 0)].into_iter().collect(),
            flow_capacity: 1000,
            flow_entries: 250,
            flows_flushed: 0,
            embryonic_capacity: 100,
            embryonic_entries: 10,
            deny_list: 0,
            deny_hosts: 0,
            deny_ipv6: 0,
            node: None,
        }
    }

    #[test]
    fn rates_are_deltas_over_the_elapsed_time() {
        let prev = snapshot((100, 10_000, 10), (40, 4_000, 4), 100);
        let cur = snapshot((400, 40_000, 25), (190, 19_000, 9), 400);
        let r = rates(&prev, &cur, Duration::from_millis(1500));
        assert_eq!(r.interval_s, 1.5);
        let v = &r.vips[0];
        assert_eq!(
            (v.packets_per_s, v.bytes_per_s, v.new_flows_per_s),
            (Some(200.0), Some(20_000.0), Some(10.0))
        );
        let b = &v.backends[0];
        assert_eq!(
            (b.packets_per_s, b.bytes_per_s, b.new_flows_per_s),
            (Some(100.0), Some(10_000.0), Some(10.0 / 3.0))
        );
        assert_eq!(r.reasons["fwd_tx"], Some(200.0));
        assert_eq!(r.reasons["drop_no_backend"], Some(0.0));

        // A counter that went backwards (VIP removed and added again), a VIP or backend that
        // is new, and no elapsed time: no rate rather than a wrong one.
        let r = rates(&cur, &prev, Duration::from_secs(1));
        assert_eq!(r.vips[0].packets_per_s, None);
        assert_eq!(r.reasons["fwd_tx"], None);
        let mut other = cur.clone();
        other.vips[0].proto = Proto::Udp;
        other.vips[0].backends[0].address = IpAddr::from([10, 111, 1, 99]);
        let r = rates(&prev, &other, Duration::from_secs(1));
        assert_eq!(r.vips[0].bytes_per_s, None);
        let mut moved = cur.clone();
        moved.vips[0].backends[0].address = IpAddr::from([10, 111, 1, 99]);
        let r = rates(&prev, &moved, Duration::from_secs(1));
        assert_eq!(r.vips[0].packets_per_s, Some(300.0));
        assert_eq!(r.vips[0].backends[0].packets_per_s, None);
        assert_eq!(
            rates(&prev, &cur, Duration::ZERO).vips[0].packets_per_s,
            None
        );

        assert_eq!(fmt_rate(None), "-");
        assert_eq!(fmt_rate(Some(12.345)), "12.3");
        assert_eq!(fmt_rate(Some(20_000.0)), "20.0k");
        assert_eq!(fmt_rate(Some(3_500_000.0)), "3.5M");
        assert_eq!(fmt_rate(Some(1.25e9)), "1.2G");
    }

    #[test]
    fn watch_frames_show_totals_and_rates() {
        let prev = snapshot((100, 10_000, 10), (40, 4_000, 4), 100);
        let cur = snapshot((400, 40_000, 25), (190, 19_000, 9), 400);
        let r = rates(&prev, &cur, Duration::from_secs(1));
        let now = UNIX_EPOCH + Duration::from_secs(1_779_271_212);
        let text = watch_text(&cur, Some(&r), Duration::from_secs(1), now);
        assert_eq!(
            text,
            "xlb stats every 1s, 2026-05-20T10:00:12Z (Ctrl-C to quit)\n\n\
             VIP / BACKEND     PROTO  STATE  WEIGHT  ACTIVE  PACKETS  BYTES  NEW_FLOWS  PKT/S  BYTES/S  FLOWS/S\n\
             10.111.100.1:80   tcp                   3       400      40000  25         300.0  30.0k    15.0\n\
             \x20 -> 10.111.1.11         up     1       3       190      19000  9          150.0  15.0k    5.0\n\
             \n\
             REASON  PACKETS  PKT/S\n\
             fwd_tx  400      300.0\n\
             \n\
             flow table: 250 of 1000 entries in use (25.0%)\n\
             embryonic table: 10 of 100 entries in use (10.0%)\n\
             deny list: 0 prefixes (0 of them IPv4 host entries, 0 IPv6)\n"
        );
        // The first frame has no rates yet.
        let first = watch_text(&cur, None, Duration::from_secs(1), now);
        assert!(first.contains("  -> 10.111.1.11         up     1       3       190      19000  9          -      -        -\n"), "{first}");
        // --watch --json: the stats object with `rates` next to its fields, on one line.
        let line = serde_json::to_string(&WatchFrame {
            stats: &cur,
            rates: Some(&r),
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["vips"][0]["packets"], 400);
        assert_eq!(v["rates"]["vips"][0]["new_flows_per_s"], 15.0);
        assert_eq!(v["flow_entries"], 250);
        let first = serde_json::to_string(&WatchFrame {
            stats: &cur,
            rates: None,
        })
        .unwrap();
        assert!(first.ends_with(r#""rates":null}"#), "{first}");
    }
}
