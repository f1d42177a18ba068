//! End-to-end benchmarks (issue 6, parts 2 and 3) through the test bed: the same three nginx
//! backends reached directly, through xlb (`ipip`, `l2`; generic XDP), through nftables DNAT over
//! conntrack (the path IPVS-NAT would take; this kernel has no IPVS), through a stateless
//! nftables netdev-ingress L2 DSR rule (as nftlb does) and through HAProxy in TCP mode. `wrk`
//! from cli measures requests/s and p50/p99 latency with keep-alive and with `Connection: close`;
//! a `trafgen` UDP flood from cli measures packets/s forwarded, counted at the backends.
//!
//! Configurations are alternated round by round on one bed. Every change (nft tables, routes,
//! addresses, processes) is undone by guards, also on failure; nothing is asserted on timing.

use crate::{
    cmd::{run_timeout, wait_for},
    http,
    netns::Netns,
    process::Process,
    testbed::{Testbed, TestbedOptions},
    topology::{CLI_ADDR, HOST_IFACE, LB1_ADDR, Topology, VIP, backend_addr, backend_name},
    xlb::Agent,
};
use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

/// UDP port of the packet-rate flood; the backends count and drop it at ingress (nft).
const SINK_PORT: u16 = 9;
/// Concurrent connections and threads of every wrk run.
const WRK_CONNS: u32 = 32;
const WRK_THREADS: u32 = 1;
const BACKENDS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Direct,
    XlbIpip,
    XlbL2,
    NftDnat,
    NftL2,
    Haproxy,
}

const CONFIGS: [Config; 6] = [
    Config::Direct,
    Config::XlbIpip,
    Config::XlbL2,
    Config::NftDnat,
    Config::NftL2,
    Config::Haproxy,
];

impl Config {
    fn key(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::XlbIpip => "xlb_ipip",
            Config::XlbL2 => "xlb_l2",
            Config::NftDnat => "nft_dnat",
            Config::NftL2 => "nft_l2_dsr",
            Config::Haproxy => "haproxy_tcp",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Config::Direct => "direct to be1 (floor)",
            Config::XlbIpip => "xlb ipip (generic XDP)",
            Config::XlbL2 => "xlb l2 (generic XDP)",
            Config::NftDnat => "nftables DNAT + conntrack",
            Config::NftL2 => "nftables netdev L2 DSR",
            Config::Haproxy => "HAProxy mode tcp",
        }
    }

    /// Where the client sends to.
    fn target(self) -> Ipv4Addr {
        match self {
            Config::Direct => backend_addr(1),
            _ => VIP,
        }
    }

    /// Part of the packet-rate comparison (HAProxy is a proxy: no UDP forwarding).
    fn pps(self) -> bool {
        self != Config::Haproxy
    }
}

/// Things to undo, run in reverse order on drop: shell snippets inside a namespace (by name).
#[derive(Default)]
struct Undo {
    steps: Vec<(String, String)>,
}

impl Undo {
    /// Runs `script` in `ns` now and registers `undo` for the drop.
    fn apply(&mut self, ns: &Netns, script: &str, undo: &str) -> Result<()> {
        self.steps.push((ns.name().to_string(), undo.to_string()));
        ns.sh(script)
            .with_context(|| format!("in {}: {script}", ns.name()))?;
        Ok(())
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some((ns, script)) = self.steps.pop() {
            if let Err(e) = crate::cmd::run("ip", &["netns", "exec", &ns, "sh", "-c", &script]) {
                eprintln!("xlb-tests bench: undo in {ns} ({script}): {e:#}");
            }
        }
    }
}

/// One configuration in place. Field order = drop order: processes first, then the undo steps.
struct Active {
    _agent: Option<Agent>,
    _haproxy: Option<Process>,
    _undo: Undo,
}

fn nft_file(ns: &Netns, dir: &std::path::Path, name: &str, rules: &str) -> Result<()> {
    let path = dir.join(format!("{name}.nft"));
    std::fs::write(&path, rules)?;
    ns.run("nft", &["-f", &path.to_string_lossy()])?;
    Ok(())
}

fn mac_of(ns: &Netns, iface: &str) -> Result<String> {
    let mac = ns.sh(&format!("cat /sys/class/net/{iface}/address"))?;
    Ok(mac.trim().to_string())
}

fn setup(bed: &Testbed, config: Config, tag: &str) -> Result<Active> {
    let lb1 = bed.ns("lb1");
    let mut undo = Undo::default();
    let mut agent = None;
    let mut haproxy = None;
    let dir = bed.dir.path().join(format!("bench-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let backends: Vec<Ipv4Addr> = (1..=BACKENDS).map(backend_addr).collect();
    match config {
        Config::Direct => {}
        Config::XlbIpip | Config::XlbL2 => {
            let forward = if config == Config::XlbIpip {
                "ipip"
            } else {
                "l2"
            };
            let a = Agent::start(lb1, HOST_IFACE, "generic", &dir, &[])?;
            for (port, proto) in [(80u16, "tcp"), (SINK_PORT, "udp")] {
                let vip = format!("{VIP}:{port}");
                a.client
                    .ok(&["vip", "add", &vip, "--proto", proto, "--forward", forward])?;
                for b in &backends {
                    a.client
                        .ok(&["backend", "add", &vip, &b.to_string(), "--proto", proto])?;
                }
            }
            agent = Some(a);
        }
        Config::NftDnat => {
            let map = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {b}"))
                .collect::<Vec<_>>()
                .join(", ");
            undo.apply(
                lb1,
                "true",
                "nft delete table ip xlbbench_dnat 2>/dev/null || true",
            )?;
            nft_file(
                lb1,
                &dir,
                "dnat",
                &format!(
                    "table ip xlbbench_dnat {{\n\
                     \tchain pre {{\n\
                     \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
                     \t\tip daddr {VIP} tcp dport 80 dnat to numgen inc mod {BACKENDS} map {{ {map} }}\n\
                     \t\tip daddr {VIP} udp dport {SINK_PORT} dnat to numgen inc mod {BACKENDS} map {{ {map} }}\n\
                     \t}}\n}}\n"
                ),
            )?;
            // Replies must come back through lb1 to be un-NATed, as with IPVS-NAT: the client's
            // network is routed via lb1 on the backends while this configuration runs.
            for i in 1..=BACKENDS {
                undo.apply(
                    bed.ns(&backend_name(i)),
                    &format!("ip route add 10.111.0.0/24 via {LB1_ADDR}"),
                    "ip route del 10.111.0.0/24 2>/dev/null || true",
                )?;
            }
        }
        Config::NftL2 => {
            let mut macs = Vec::new();
            for i in 1..=BACKENDS {
                macs.push(mac_of(bed.ns(&backend_name(i)), HOST_IFACE)?);
            }
            let map = macs
                .iter()
                .enumerate()
                .map(|(i, m)| format!("{i} : {m}"))
                .collect::<Vec<_>>()
                .join(", ");
            let own = mac_of(lb1, HOST_IFACE)?;
            undo.apply(
                lb1,
                "true",
                "nft delete table netdev xlbbench_l2 2>/dev/null || true",
            )?;
            // Stateless, so per-flow stickiness must come from a hash of the flow (numgen inc per
            // packet would spray one TCP connection over all backends); nftlb's DSR does the same.
            let mut rules = String::new();
            for proto in ["tcp", "udp"] {
                let _ = writeln!(
                    rules,
                    "\t\tip daddr {VIP} {proto} dport {{ 80, {SINK_PORT} }} ether saddr set {own} \
                     ether daddr set jhash ip saddr . {proto} sport mod {BACKENDS} map {{ {map} }} \
                     fwd to \"{HOST_IFACE}\""
                );
            }
            nft_file(
                lb1,
                &dir,
                "l2",
                &format!(
                    "table netdev xlbbench_l2 {{\n\
                     \tchain ing {{\n\
                     \t\ttype filter hook ingress device \"{HOST_IFACE}\" priority 0; policy accept;\n\
                     {rules}\t}}\n}}\n"
                ),
            )?;
        }
        Config::Haproxy => {
            undo.apply(
                lb1,
                &format!("ip addr add {VIP}/32 dev lo"),
                &format!("ip addr del {VIP}/32 dev lo 2>/dev/null || true"),
            )?;
            let mut cfg = format!(
                "global\n  maxconn 4000\n  nbthread 1\n\
                 defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
                 listen vip\n  bind {VIP}:80\n  balance roundrobin\n"
            );
            for (i, b) in backends.iter().enumerate() {
                let _ = writeln!(cfg, "  server be{} {b}:80", i + 1);
            }
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, cfg)?;
            let mut cmd = lb1.command("haproxy");
            cmd.arg("-db").arg("-f").arg(&path);
            haproxy = Some(Process::spawn(
                "haproxy on lb1",
                &mut cmd,
                &dir.join("haproxy.log"),
            )?);
        }
    }
    let mut active = Active {
        _agent: agent,
        _haproxy: haproxy,
        _undo: undo,
    };
    // Working before measured: new connections answered, by several backends unless direct.
    let target = SocketAddr::from((config.target(), 80));
    let want = if config == Config::Direct { 1 } else { 2 };
    wait_for(
        &format!("{} to answer from {want} backend(s)", config.label()),
        Duration::from_secs(15),
        || {
            if let Some(p) = active._haproxy.as_mut() {
                p.ensure_running()?;
            }
            let mut seen = BTreeSet::new();
            for _ in 0..6 {
                let r = bed
                    .ns("cli")
                    .enter(move || http::get(target, "/", Duration::from_millis(500)))??;
                ensure!(r.status == 200, "HTTP {}", r.status);
                seen.insert(r.text());
            }
            Ok((seen.len() >= want).then_some(()))
        },
    )?;
    Ok(active)
}

#[derive(Clone, Debug, Default)]
struct WrkResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    errors: u64,
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut have_rps = false;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => {
                r.rps = v.parse()?;
                have_rps = true;
            }
            ["50%", v] => r.p50_us = parse_duration_us(v).context("p50")?,
            ["99%", v] => r.p99_us = parse_duration_us(v).context("p99")?,
            [n, "requests", "in", ..] => r.requests = n.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            _ => {}
        }
    }
    ensure!(have_rps, "no Requests/sec in wrk output:\n{out}");
    Ok(r)
}

fn wrk(bed: &Testbed, target: Ipv4Addr, close: bool, secs: u64) -> Result<WrkResult> {
    let mut cmd = bed.ns("cli").command("wrk");
    cmd.args([
        &format!("-t{WRK_THREADS}"),
        &format!("-c{WRK_CONNS}"),
        &format!("-d{secs}s"),
        "--timeout",
        "2s",
        "--latency",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{target}/"));
    let out = run_timeout(&mut cmd, Duration::from_secs(secs + 20))?.checked()?;
    parse_wrk(&out.stdout)
}

/// One 60-byte UDP frame cli → `dst`:9 via rtr, source ports 0x3000-0x3fff (4096 flows).
fn trafgen_conf(src_mac: &str, dst_mac: &str, dst: Ipv4Addr) -> String {
    let mac = |m: &str| {
        m.split(':')
            .map(|b| format!("0x{b}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ip = |a: Ipv4Addr| {
        a.octets()
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{{\n  {}, {},\n  c16(0x0800),\n  0x45, 0x00, c16(46), c16(0), c16(0x4000), 64, 17, csumip(14, 33),\n  \
         {}, {},\n  dinc(0x30, 0x3f), drnd(), c16({SINK_PORT}), c16(26), c16(0),\n  {}\n}}\n",
        mac(dst_mac),
        mac(src_mac),
        ip(CLI_ADDR),
        ip(dst),
        vec!["0"; 18].join(", ")
    )
}

/// Sum of the backends' sink counters, rtr's tx packets towards lb1 and cli's eth0 tx packets.
fn counters(bed: &Testbed) -> Result<(u64, u64, u64)> {
    let mut sink = 0;
    for i in 1..=BACKENDS {
        let out = bed.ns(&backend_name(i)).run(
            "nft",
            &["list", "counter", "netdev", "xlbbench_sink", "sink"],
        )?;
        let n = out
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("no packet count in {out}"))?;
        sink += n;
    }
    let read = |role: &str, what: &str| -> Result<u64> {
        let s = bed.ns(role).sh(&format!(
            "cat /sys/class/net/{HOST_IFACE}/statistics/{what}"
        ))?;
        Ok(s.trim().parse()?)
    };
    // What rtr sent towards lb1 (the sender's veth tx count; lb1's own rx count under XDP is not
    // a reliable figure).
    let to_lb1 = bed
        .ns("rtr")
        .sh(&format!(
            "cat /sys/class/net/{}/statistics/tx_packets",
            Topology::peer_iface("lb1")
        ))?
        .trim()
        .parse()?;
    Ok((sink, to_lb1, read("cli", "tx_packets")?))
}

#[derive(Clone, Debug, Default)]
struct PpsResult {
    /// Forwarded: counted by the backends' sinks.
    backend_pps: f64,
    /// Sent by rtr towards lb1 (0 for direct).
    sent_to_lb1_pps: f64,
    /// Sent by trafgen (cli eth0 tx).
    offered_pps: f64,
}

fn flood(bed: &Testbed, config: Config, secs: u64) -> Result<PpsResult> {
    let cli = bed.ns("cli");
    let dst_mac = mac_of(bed.ns("rtr"), &Topology::peer_iface("cli"))?;
    let src_mac = mac_of(cli, HOST_IFACE)?;
    let conf = bed.dir.path().join("trafgen.cfg");
    std::fs::write(&conf, trafgen_conf(&src_mac, &dst_mac, config.target()))?;
    let mut cmd = cli.command("trafgen");
    // Leave the (global) socket memory limits and IRQ affinities alone.
    cmd.args(["-o", HOST_IFACE, "-i"]).arg(&conf).args([
        "--cpus",
        "1",
        "--no-sock-mem",
        "--notouch-irq",
        "--no-cpu-stats",
    ]);
    let mut generator = Process::spawn(
        "trafgen in cli",
        &mut cmd,
        &bed.dir.path().join("trafgen.log"),
    )?;
    // Warm up (flows, conntrack entries, ARP), then one measured window.
    thread::sleep(Duration::from_secs(1));
    generator.ensure_running()?;
    let (s0, l0, c0) = counters(bed)?;
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(secs));
    let (s1, l1, c1) = counters(bed)?;
    let dt = t0.elapsed().as_secs_f64();
    generator.ensure_running()?;
    generator.signal_and_wait(libc::SIGINT, Duration::from_secs(5));
    // Let queues drain before the next configuration is set up.
    thread::sleep(Duration::from_millis(300));
    Ok(PpsResult {
        backend_pps: (s1 - s0) as f64 / dt,
        sent_to_lb1_pps: (l1 - l0) as f64 / dt,
        offered_pps: (c1 - c0) as f64 / dt,
    })
}

/// Per-run preparation of the bed that stays for all configurations (undone on drop).
fn prepare(bed: &Testbed, undo: &mut Undo) -> Result<()> {
    let lb1 = bed.ns("lb1");
    // lb1 forwards DNATed packets and their replies out of the interface they came in on: no
    // ICMP redirects (they would send the backends' replies around lb1). Short TIME_WAIT in
    // conntrack and reuse of ports keep the Connection: close runs from exhausting tables.
    undo.apply(
        lb1,
        "for f in /proc/sys/net/ipv4/conf/*/send_redirects; do echo 0 > \"$f\"; done; \
         echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse; \
         echo '1024 65000' > /proc/sys/net/ipv4/ip_local_port_range; \
         echo 2 > /proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait 2>/dev/null || true",
        "true",
    )?;
    for i in 1..=BACKENDS {
        let ns = bed.ns(&backend_name(i));
        undo.apply(
            ns,
            "for f in /proc/sys/net/ipv4/conf/*/accept_redirects; do echo 0 > \"$f\"; done",
            "true",
        )?;
        undo.apply(
            ns,
            "true",
            "nft delete table netdev xlbbench_sink 2>/dev/null || true",
        )?;
        nft_file(
            ns,
            bed.dir.path(),
            &format!("sink-be{i}"),
            &format!(
                "table netdev xlbbench_sink {{\n\tcounter sink {{ }}\n\tchain ing {{\n\
                 \t\ttype filter hook ingress device \"{HOST_IFACE}\" priority 0; policy accept;\n\
                 \t\tudp dport {SINK_PORT} counter name \"sink\" drop\n\t}}\n}}\n"
            ),
        )?;
    }
    Ok(())
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[s.len() / 2])
}

fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    json!({
        "runs": v,
        "min": s.first(),
        "median": median(v),
        "max": s.last(),
    })
}

#[derive(Default)]
struct Samples {
    ka: Vec<WrkResult>,
    close: Vec<WrkResult>,
    pps: Vec<PpsResult>,
    errors: Vec<String>,
}

fn field(v: &[WrkResult], f: fn(&WrkResult) -> f64) -> Vec<f64> {
    v.iter().map(f).collect()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.digits$}"))
}

/// Runs the whole comparison: `quick` is one short round, otherwise three rounds of 5 s runs.
/// Returns every figure as JSON and a markdown section with the tables and the targets.
pub fn run(quick: bool) -> Result<(Value, String)> {
    let (rounds, wrk_secs, pps_secs) = if quick { (1, 2, 2) } else { (3, 5, 4) };
    let started = Instant::now();
    let mut bed =
        Testbed::up(TestbedOptions::new("ipip", "generic")).context("bringing up the test bed")?;
    // The bed's own agent goes; each xlb configuration starts its own (one forwarding method).
    bed.stop_agent()?;
    let mut undo = Undo::default();
    prepare(&bed, &mut undo)?;

    let mut samples: Vec<Samples> = CONFIGS.iter().map(|_| Samples::default()).collect();
    for round in 0..rounds {
        for (ci, &config) in CONFIGS.iter().enumerate() {
            let tag = format!("{}-{round}", config.key());
            let result = (|| -> Result<()> {
                let _active = setup(&bed, config, &tag)?;
                let ka = wrk(&bed, config.target(), false, wrk_secs).context("wrk keep-alive")?;
                let close =
                    wrk(&bed, config.target(), true, wrk_secs).context("wrk Connection: close")?;
                samples[ci].ka.push(ka);
                samples[ci].close.push(close);
                if config.pps() {
                    samples[ci]
                        .pps
                        .push(flood(&bed, config, pps_secs).context("UDP flood")?);
                }
                Ok(())
            })();
            if let Err(e) = result {
                eprintln!("bench e2e: {} round {round}: {e:#}", config.label());
                samples[ci].errors.push(format!("round {round}: {e:#}"));
            }
        }
    }
    drop(undo);
    bed.teardown_hosts()?;
    drop(bed);

    // Aggregate: medians over the rounds.
    let mut http = serde_json::Map::new();
    let mut pps = serde_json::Map::new();
    let med = |ci: usize, what: &str| -> Option<f64> {
        let s = &samples[ci];
        match what {
            "ka_rps" => median(&field(&s.ka, |r| r.rps)),
            "close_rps" => median(&field(&s.close, |r| r.rps)),
            "pps" => median(&s.pps.iter().map(|p| p.backend_pps).collect::<Vec<_>>()),
            _ => None,
        }
    };
    for (ci, config) in CONFIGS.iter().enumerate() {
        let s = &samples[ci];
        let mode = |v: &[WrkResult]| {
            json!({
                "requests_per_s": stats(&field(v, |r| r.rps)),
                "p50_us": stats(&field(v, |r| r.p50_us)),
                "p99_us": stats(&field(v, |r| r.p99_us)),
                "requests": v.iter().map(|r| r.requests).collect::<Vec<_>>(),
                "errors": v.iter().map(|r| r.errors).collect::<Vec<_>>(),
            })
        };
        http.insert(
            config.key().into(),
            json!({
                "label": config.label(),
                "keepalive": mode(&s.ka),
                "close": mode(&s.close),
                "failures": s.errors,
            }),
        );
        if config.pps() {
            pps.insert(
                config.key().into(),
                json!({
                    "label": config.label(),
                    "forwarded_pps": stats(&s.pps.iter().map(|p| p.backend_pps).collect::<Vec<_>>()),
                    "sent_to_lb1_pps": stats(&s.pps.iter().map(|p| p.sent_to_lb1_pps).collect::<Vec<_>>()),
                    "offered_pps": stats(&s.pps.iter().map(|p| p.offered_pps).collect::<Vec<_>>()),
                }),
            );
        }
    }
    let idx = |c: Config| CONFIGS.iter().position(|&x| x == c).expect("config listed");
    let mut ratios = serde_json::Map::new();
    let mut targets = Vec::new();
    for xc in [Config::XlbIpip, Config::XlbL2] {
        let x = idx(xc);
        let r = json!({
            "pps_vs_nft_dnat": ratio(med(x, "pps"), med(idx(Config::NftDnat), "pps")),
            "pps_vs_nft_l2": ratio(med(x, "pps"), med(idx(Config::NftL2), "pps")),
            "pps_vs_direct": ratio(med(x, "pps"), med(idx(Config::Direct), "pps")),
            "close_rps_vs_nft_dnat": ratio(med(x, "close_rps"), med(idx(Config::NftDnat), "close_rps")),
            "close_rps_vs_nft_l2": ratio(med(x, "close_rps"), med(idx(Config::NftL2), "close_rps")),
            "close_rps_vs_haproxy": ratio(med(x, "close_rps"), med(idx(Config::Haproxy), "close_rps")),
            "close_rps_vs_direct": ratio(med(x, "close_rps"), med(idx(Config::Direct), "close_rps")),
            "keepalive_rps_vs_direct": ratio(med(x, "ka_rps"), med(idx(Config::Direct), "ka_rps")),
            "keepalive_rps_vs_nft_dnat": ratio(med(x, "ka_rps"), med(idx(Config::NftDnat), "ka_rps")),
            "keepalive_rps_vs_haproxy": ratio(med(x, "ka_rps"), med(idx(Config::Haproxy), "ka_rps")),
        });
        let target = |name: &str, key: &str, bar: f64, ours: &str, theirs: Config| {
            let value = r[key].as_f64();
            json!({
                "target": format!("{} {name}", xc.key()),
                "bar": bar,
                "ratio": value,
                "xlb": med(x, ours),
                "other": med(idx(theirs), ours),
                "met": value.map(|v| v >= bar),
            })
        };
        targets.push(target(
            "pps >= 3x nft DNAT",
            "pps_vs_nft_dnat",
            3.0,
            "pps",
            Config::NftDnat,
        ));
        targets.push(target(
            "pps >= 1.5x nft L2",
            "pps_vs_nft_l2",
            1.5,
            "pps",
            Config::NftL2,
        ));
        targets.push(target(
            "conn/s >= nft DNAT",
            "close_rps_vs_nft_dnat",
            1.0,
            "close_rps",
            Config::NftDnat,
        ));
        targets.push(target(
            "conn/s >= 1.5x HAProxy",
            "close_rps_vs_haproxy",
            1.5,
            "close_rps",
            Config::Haproxy,
        ));
        targets.push(target(
            "keep-alive req/s within 5% of direct",
            "keepalive_rps_vs_direct",
            0.95,
            "ka_rps",
            Config::Direct,
        ));
        ratios.insert(xc.key().into(), r);
    }

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let doc = json!({
        "kernel": kernel,
        "ipvs_available": false,
        "ipvs_note": "this kernel has no IPVS; nftables DNAT over conntrack stands in for IPVS-NAT",
        "xdp_mode": "generic",
        "rounds": rounds,
        "wrk": { "threads": WRK_THREADS, "connections": WRK_CONNS, "duration_s": wrk_secs, "path": "/" },
        "flood": { "generator": "trafgen --cpus 1", "frame_bytes": 60, "udp_port": SINK_PORT, "flows": 4096, "window_s": pps_secs },
        "http": http,
        "pps": pps,
        "ratios": ratios,
        "targets": targets,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let md = markdown(&doc, &samples);
    Ok((doc, md))
}

fn markdown(doc: &Value, samples: &[Samples]) -> String {
    let mut md = String::new();
    let g = |v: &Value| v.as_f64();
    let _ = writeln!(md, "## End to end (issue 6, parts 2 and 3)\n");
    let _ = writeln!(
        md,
        "Test bed topology (cli — rtr/br0 — lb1 — be1..be3, nginx), {} round(s), configurations \
         alternated within each round; medians over rounds (min–max in brackets). `wrk -t{WRK_THREADS} \
         -c{WRK_CONNS} -d{}s --latency` from cli. xlb in generic XDP mode. **This kernel has no IPVS**: \
         nftables DNAT over conntrack (`numgen inc` round robin, backends routing the client network \
         via lb1) is the path IPVS-NAT would take. The nftables L2 DSR rule is a netdev-ingress \
         `ether daddr set jhash ip saddr . sport mod 3 map {{…}} fwd to eth0` (a stateless rule must \
         hash the flow: `numgen inc` per packet would split TCP connections). HAProxy 1 thread, \
         `mode tcp`, `balance roundrobin`, VIP on lb1's lo.\n",
        doc["rounds"], doc["wrk"]["duration_s"],
    );
    let _ = writeln!(
        md,
        "| configuration | keep-alive req/s | p50 | p99 | close req/s (conn/s) | p50 | p99 | errors |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let cell = |s: &Value, digits: usize| {
        format!(
            "{} [{}–{}]",
            fmt(g(&s["median"]), digits),
            fmt(g(&s["min"]), digits),
            fmt(g(&s["max"]), digits)
        )
    };
    let lat = |s: &Value| fmt(g(&s["median"]).map(|us| us / 1000.0), 2) + " ms";
    for (ci, config) in CONFIGS.iter().enumerate() {
        let h = &doc["http"][config.key()];
        let errs: u64 = ["keepalive", "close"]
            .iter()
            .flat_map(|m| h[m]["errors"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_u64())
            .sum();
        if samples[ci].ka.is_empty() {
            let _ = writeln!(
                md,
                "| {} | failed: {} | | | | | | |",
                config.label(),
                samples[ci]
                    .errors
                    .join("; ")
                    .replace('|', "/")
                    .replace('\n', " ")
            );
            continue;
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            config.label(),
            cell(&h["keepalive"]["requests_per_s"], 0),
            lat(&h["keepalive"]["p50_us"]),
            lat(&h["keepalive"]["p99_us"]),
            cell(&h["close"]["requests_per_s"], 0),
            lat(&h["close"]["p50_us"]),
            lat(&h["close"]["p99_us"]),
            errs
        );
    }
    let _ = writeln!(
        md,
        "\n**Packet rate**: `trafgen --cpus 1` from cli, 60-byte UDP frames to port {SINK_PORT} \
         over 4096 source ports, counted and dropped by an nft netdev-ingress counter on each \
         backend; {} s window after 1 s warm-up. \"sent to lb1\" is rtr's tx count towards lb1 \
         (direct: bypasses lb1). When forwarded ≈ offered, the generator (one core, sharing the \
         machine's 2 cores with rtr, lb1 and the backends) is the limit, not the balancer.\n",
        doc["flood"]["window_s"]
    );
    let _ = writeln!(
        md,
        "| configuration | forwarded pps (at backends) | sent to lb1 pps | offered pps (cli tx) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for config in CONFIGS.iter().filter(|c| c.pps()) {
        let p = &doc["pps"][config.key()];
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            config.label(),
            cell(&p["forwarded_pps"], 0),
            fmt(g(&p["sent_to_lb1_pps"]["median"]), 0),
            fmt(g(&p["offered_pps"]["median"]), 0)
        );
    }
    let _ = writeln!(md, "\n**Targets** (issue 6):\n");
    for t in doc["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "**met**",
            Some(false) => "**not met**",
            None => "not measured",
        };
        let _ = writeln!(
            md,
            "- {}: {met} — {} vs {} (ratio {}, bar {})",
            t["target"].as_str().unwrap_or(""),
            fmt(g(&t["xlb"]), 0),
            fmt(g(&t["other"]), 0),
            fmt(g(&t["ratio"]), 2),
            t["bar"]
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://10.111.100.1/\n  1 threads and 32 connections\n\
                   \x20 Latency Distribution\n     50%  505.00us\n     75%  1.00ms\n     99%    2.06ms\n\
                   \x20 12345 requests in 2.00s, 2.3MB read\n\
                   \x20 Socket errors: connect 0, read 2, write 0, timeout 1\n\
                   \x20 Non-2xx or 3xx responses: 3\nRequests/sec:  6172.50\nTransfer/sec: 1MB\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.rps, 6172.5);
        assert_eq!(r.p50_us, 505.0);
        assert_eq!(r.p99_us, 2060.0);
        assert_eq!(r.requests, 12345);
        assert_eq!(r.errors, 6);
    }

    /// The whole quick comparison on a real bed (root, a few minutes): `cargo test -p xlb-tests
    /// --lib bench_e2e -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn quick_run() {
        let (doc, md) = run(true).unwrap();
        println!("{md}\n{}", serde_json::to_string_pretty(&doc).unwrap());
    }
}
