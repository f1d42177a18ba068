//! End-to-end benchmarks (issue 6, parts 2 and 3) through the test bed: the same three nginx
//! backends reached directly, through xlb (`ipip`, `l2`; generic and driver XDP), through
//! nftables DNAT over conntrack (the path IPVS-NAT would take; this kernel has no IPVS), through
//! a stateless nftables netdev-ingress L2 DSR rule (as nftlb does) and through HAProxy in TCP
//! mode. `wrk` from cli measures requests/s and p50/p99 latency with keep-alive and with
//! `Connection: close`. The packet rate comes from xlb's own live-frames generator
//! (`xlb_bench_gen`) sending from rtr straight into lb1, counted by a small XDP sink on rtr's end
//! of lb1's link (see [`PPS_METHOD`]).
//!
//! Configurations are alternated round by round on one bed. Every change (nft tables, routes,
//! addresses, processes, XDP programs) is undone by guards, also on failure; nothing is asserted
//! on timing.

use crate::{
    cmd::{run_timeout, wait_for},
    http,
    livegen::{
        BenchXdp, GEN_BATCH, Generator, attach_bench, attach_bench_sized, attach_floor_hop,
        parse_mac, veth_xdp,
    },
    netns::Netns,
    process::Process,
    profile,
    testbed::{Testbed, TestbedOptions},
    topology::{CLI_ADDR, HOST_IFACE, LB1_ADDR, Topology, VIP, backend_addr, backend_name},
    xlb::{Agent, has_xdp, xdp_mode, xlb_bin},
};
use anyhow::{Context, Result, ensure};
use lb_common::{BenchGenHeader, FloorHop, programs};
use serde_json::{Value, json};
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

/// UDP port of the packet-rate flood ("discard"); the sink on rtr's end of lb1's link counts and
/// drops it before it reaches the backends.
const SINK_PORT: u16 = 9;
/// Concurrent connections and threads of every wrk run.
const WRK_CONNS: u32 = 32;
const WRK_THREADS: u32 = 1;
const BACKENDS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    /// Packet rate only: `xlb_floor_tx` on lb1 (XDP_TX without reading the packet).
    PpsFloor,
    /// Packet rate only: `xlb_floor_flow_tx` on lb1, the stateful floor (parse, one lookup in a
    /// flow table of `FLOWS`' type and the agent's default size, MAC, XDP_TX; issue 16).
    PpsFlowFloor,
    /// Packet rate only: `xlb_floor_flow_tx_code` on lb1, the stateful floor after
    /// `BENCH_CODE_MOVES` register moves that compute nothing: what executing that much more code
    /// costs per packet here, against what it costs in `BPF_PROG_TEST_RUN` (the per-packet
    /// benchmark's code probe row).
    PpsCodeProbe,
    /// Packet rate only: `xlb_floor_flow_ipip` on lb1, the IPIP floor: the stateful floor's
    /// lookup, then the packet inside an outer IPv4 header (head grown, Ethernet header, outer
    /// header with its checksum), XDP_TX; the least an `ipip` balancer does, held against xlb
    /// `ipip`.
    PpsIpipFloor,
    Direct,
    /// The hop floor (`xlb_floor_hop`, driver XDP): the stateful floor steering to be1 alone,
    /// with `l2` direct server return; the cheapest XDP hop with connection tracking (issue 16).
    HopFloor,
    XlbIpip,
    XlbL2,
    XlbIpipDriver,
    XlbL2Driver,
    /// xlb `l2` in driver mode with be1 as its only backend: the hop floor's path exactly, so
    /// the difference between the two is the hop's own cost (issue 16, item 5). With three
    /// backends the same load also spreads over three nginx workers on the 2 cores.
    XlbL2DriverOne,
    NftDnat,
    NftL2,
    Haproxy,
}

const CONFIGS: [Config; 14] = [
    Config::PpsFloor,
    Config::PpsFlowFloor,
    Config::PpsCodeProbe,
    Config::PpsIpipFloor,
    Config::Direct,
    Config::HopFloor,
    Config::XlbIpip,
    Config::XlbL2,
    Config::XlbIpipDriver,
    Config::XlbL2Driver,
    Config::XlbL2DriverOne,
    Config::NftDnat,
    Config::NftL2,
    Config::Haproxy,
];

/// The xlb configurations, each judged against the targets.
const XLB_CONFIGS: [Config; 4] = [
    Config::XlbIpip,
    Config::XlbL2,
    Config::XlbIpipDriver,
    Config::XlbL2Driver,
];

impl Config {
    fn key(self) -> &'static str {
        match self {
            Config::PpsFloor => "pps_floor",
            Config::PpsFlowFloor => "pps_flow_floor",
            Config::PpsCodeProbe => "pps_code_probe",
            Config::PpsIpipFloor => "pps_ipip_floor",
            Config::Direct => "direct",
            Config::HopFloor => "hop_floor",
            Config::XlbIpip => "xlb_ipip",
            Config::XlbL2 => "xlb_l2",
            Config::XlbIpipDriver => "xlb_ipip_driver",
            Config::XlbL2Driver => "xlb_l2_driver",
            Config::XlbL2DriverOne => "xlb_l2_driver_be1",
            Config::NftDnat => "nft_dnat",
            Config::NftL2 => "nft_l2_dsr",
            Config::Haproxy => "haproxy_tcp",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Config::PpsFloor => "floor: XDP_TX on lb1, packet not read (driver XDP)",
            Config::PpsFlowFloor => {
                "stateful floor: parse + flow lookup + MAC + XDP_TX on lb1 (driver XDP)"
            }
            Config::PpsCodeProbe => {
                "code probe: the stateful floor after 400 register moves on lb1 (driver XDP)"
            }
            Config::PpsIpipFloor => {
                "IPIP floor: flow lookup + outer IPv4 header + XDP_TX on lb1 (driver XDP)"
            }
            Config::Direct => "direct to be1 (floor)",
            Config::HopFloor => "hop floor: stateful floor steering to be1 (l2, driver XDP)",
            Config::XlbIpip => "xlb ipip (generic XDP)",
            Config::XlbL2 => "xlb l2 (generic XDP)",
            Config::XlbIpipDriver => "xlb ipip (driver XDP)",
            Config::XlbL2Driver => "xlb l2 (driver XDP)",
            Config::XlbL2DriverOne => "xlb l2 (driver XDP), be1 only",
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

    /// xlb's forwarding method and XDP mode, for the xlb configurations.
    fn xlb(self) -> Option<(&'static str, &'static str)> {
        match self {
            Config::XlbIpip => Some(("ipip", "generic")),
            Config::XlbL2 => Some(("l2", "generic")),
            Config::XlbIpipDriver => Some(("ipip", "driver")),
            Config::XlbL2Driver | Config::XlbL2DriverOne => Some(("l2", "driver")),
            _ => None,
        }
    }

    /// Part of the packet-rate comparison. The live-frames generator's packets arrive on lb1's
    /// veth as XDP frames, which only a native-mode XDP program there can receive, so xlb takes
    /// part in driver mode only (native and generic XDP cannot share a device); the direct path
    /// has no balancer to measure and HAProxy is a proxy (no UDP forwarding).
    fn pps(self) -> bool {
        matches!(
            self,
            Config::PpsFloor
                | Config::PpsFlowFloor
                | Config::PpsCodeProbe
                | Config::PpsIpipFloor
                | Config::XlbIpipDriver
                | Config::XlbL2Driver
                | Config::NftDnat
                | Config::NftL2
        )
    }

    /// xlb forwarding by IPIP (held against the IPIP floor as well).
    fn ipip(self) -> bool {
        matches!(self, Config::XlbIpip | Config::XlbIpipDriver)
    }

    /// Part of the HTTP (`wrk`) comparison.
    fn http(self) -> bool {
        !matches!(
            self,
            Config::PpsFloor | Config::PpsFlowFloor | Config::PpsCodeProbe | Config::PpsIpipFloor
        )
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

/// One configuration in place. Field order = drop order: processes first (the agent detaches
/// its program), then the XDP links, then the undo steps.
struct Active {
    _agent: Option<Agent>,
    _haproxy: Option<Process>,
    /// The packet-rate floor program on lb1's eth0.
    _floor: Option<BenchXdp>,
    /// The sink program on rtr's end of lb1's link, where lb1 runs in driver mode (see [`setup`]).
    sink: Option<BenchXdp>,
    _undo: Undo,
}

fn nft_file(ns: &Netns, dir: &std::path::Path, name: &str, rules: &str) -> Result<()> {
    let path = dir.join(format!("{name}.nft"));
    std::fs::write(&path, rules)?;
    ns.run("nft", &["-f", &path.to_string_lossy()])?;
    Ok(())
}

/// The elements of an nftables map from 0, 1, … to `items` (`0 : a, 1 : b, …`), which `numgen`
/// and `jhash … mod N` index.
fn numbered_map(items: &[impl std::fmt::Display]) -> String {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{i} : {v}"))
        .collect::<Vec<_>>()
        .join(", ")
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
    let mut sink = None;
    let mut floor = None;
    let dir = bed.dir.path().join(format!("bench-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let backends: Vec<Ipv4Addr> = (1..=BACKENDS).map(backend_addr).collect();
    let peer = Topology::peer_iface("lb1");
    match config {
        Config::Direct => {}
        Config::HopFloor => {
            // Driver-mode XDP_TX out of lb1's veth needs an XDP program on the peer (see the xlb
            // configurations below): the sink serves.
            sink = Some(
                attach_bench(bed.ns("rtr"), &peer, programs::BENCH_SINK)
                    .context("the sink program on lb1's peer")?,
            );
            let hop = FloorHop {
                vip: u32::from(VIP).to_be(),
                dst_mac: parse_mac(&mac_of(bed.ns(&backend_name(1)), HOST_IFACE)?)?,
                src_mac: parse_mac(&mac_of(lb1, HOST_IFACE)?)?,
            };
            floor = Some(attach_floor_hop(lb1, HOST_IFACE, hop)?);
        }
        Config::PpsFloor => {
            sink = Some(
                attach_bench(bed.ns("rtr"), &peer, programs::BENCH_SINK)
                    .context("the sink program on lb1's peer")?,
            );
            // xlb's own floor program, as in the per-packet benchmark.
            floor = Some(attach_bench(lb1, HOST_IFACE, programs::FLOOR_TX)?);
        }
        Config::PpsFlowFloor | Config::PpsCodeProbe | Config::PpsIpipFloor => {
            sink = Some(
                attach_bench(bed.ns("rtr"), &peer, programs::BENCH_SINK)
                    .context("the sink program on lb1's peer")?,
            );
            let program = match config {
                Config::PpsCodeProbe => programs::FLOOR_FLOW_TX_CODE,
                Config::PpsIpipFloor => programs::FLOOR_FLOW_IPIP,
                _ => programs::FLOOR_FLOW_TX,
            };
            // The flood's flows are inserted by their first packets (the warm-up), then hit.
            floor = Some(attach_bench_sized(
                lb1,
                HOST_IFACE,
                program,
                Some(lb_common::DEFAULT_FLOW_CAPACITY),
            )?);
        }
        Config::XlbIpip
        | Config::XlbL2
        | Config::XlbIpipDriver
        | Config::XlbL2Driver
        | Config::XlbL2DriverOne => {
            let (forward, mode) = config.xlb().expect("an xlb configuration");
            if mode == "driver" {
                // Native-mode XDP_TX out of lb1's veth is only delivered if the peer runs an XDP
                // program. The packet-rate sink is one (it passes everything but the flood), so
                // it serves for the whole configuration instead of a pass program that would
                // have to be swapped for it.
                sink = Some(
                    attach_bench(bed.ns("rtr"), &peer, programs::BENCH_SINK)
                        .context("the sink program on lb1's peer")?,
                );
            }
            // Its data path goes with it (SIGTERM when the configuration is dropped), so the
            // next configuration attaches its own, in its own mode.
            let a = Agent::start(lb1, HOST_IFACE, mode, &dir, &["--detach-on-exit"])?;
            // Asked for explicitly: no silent fallback to the other mode.
            let attached = xdp_mode(lb1, HOST_IFACE)?;
            ensure!(
                attached == Some(mode),
                "xlb on lb1's {HOST_IFACE}: XDP mode {attached:?}, expected {mode}"
            );
            for (port, proto) in [(80u16, "tcp"), (SINK_PORT, "udp")] {
                let vip = format!("{VIP}:{port}");
                a.client
                    .ok(&["vip", "add", &vip, "--proto", proto, "--forward", forward])?;
                let serving = if config == Config::XlbL2DriverOne {
                    &backends[..1]
                } else {
                    &backends[..]
                };
                for b in serving {
                    a.client
                        .ok(&["backend", "add", &vip, &b.to_string(), "--proto", proto])?;
                }
            }
            agent = Some(a);
        }
        Config::NftDnat => {
            let map = numbered_map(&backends);
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
            let map = numbered_map(&macs);
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
        _floor: floor,
        sink,
        _undo: undo,
    };
    if !config.http() {
        return Ok(active);
    }
    // Working before measured: new connections answered, by several backends unless direct.
    let target = SocketAddr::from((config.target(), 80));
    let want = if matches!(
        config,
        Config::Direct | Config::HopFloor | Config::XlbL2DriverOne
    ) {
        1
    } else {
        2
    };
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

// Packet rate: how it is measured is in PPS_METHOD (it goes into the results); the counting
// side is `xlb_bench_sink`, attached with `attach_bench`.

// The code probe's label and `PPS_METHOD` name the number of moves.
const _: () = assert!(lb_common::BENCH_CODE_MOVES == 400);

/// How the packet rate is measured, for the results.
const PPS_METHOD: &str = "Generator: xlb's `xlb_bench_gen` run by `BPF_PROG_TEST_RUN` in \
live-frames mode (batches of 64, every call a finite repeat count of about 50 ms) on rtr's end \
of lb1's link (`v-lb1`): 60-byte UDP frames to the VIP, port 9, over 4096 source ports; each \
XDP_TX there is a real transmission through the veth into lb1's eth0 (rtr's routing and bridge \
are not on the way in). The generator writes the frame's 42 header bytes from a template \
before every send: live-frames mode recycles its pages without copying the frame in again, \
and every configuration rewrites frames in place. Counting: xlb's `xlb_bench_sink`, in native \
mode on the same `v-lb1`, drops the flood (UDP port 9, also inside IPIP) as lb1 sends it on \
towards the backends and passes everything else, so neither the bridge nor the backends cap \
the rate. The veth's XDP counters (`ethtool -S v-lb1`) give \
*offered* (frames pushed into lb1's receive ring, also those refused because it was full) and \
*forwarded* (the sink's drops), the same way for every configuration, over fixed windows \
after a 1 s warm-up. lb1's eth0 runs a driver-mode XDP program in every row: xlb, the floor, \
or for nftables xlb's pass program (a veth only takes XDP frames in while it runs one; a NIC \
driver always would). **Cores:** the veth hands lb1's receive processing, and then the sink's, \
to softirq work on the sending core, which runs between the generator's batches. So \
generator, balancer and sink take turns on one of the 2 cores (the other carries the rest of \
the bed and anything else running on the machine), offered equals forwarded, and each figure \
is the packet rate of one core doing all three. The floor row (`xlb_floor_tx`, XDP_TX without \
reading the packet, as in the per-packet benchmark) is generator, veth and sink alone; \
*ns/packet above the floor* = 1/forwarded − 1/floor is what the configuration's forwarding \
costs per packet on that core. The code probe row is the stateful floor after 400 register \
moves that compute nothing (`xlb_floor_flow_tx_code`; the per-packet benchmark's code probe \
row says how many bytes of x86 code they add and what they cost in `BPF_PROG_TEST_RUN`): its \
distance to the stateful floor is what that much more code costs per packet here, where the \
generator's, the veth's and the sink's code run between two packets of the balancer. The IPIP \
floor row (`xlb_floor_flow_ipip`) is the stateful floor's lookup followed by what any `ipip` \
balancer must do to a packet: the head grown by 20 bytes, an Ethernet header and an outer IPv4 \
header with its checksum; xlb `ipip` is also given as a share of it. (Threaded NAPI on lb1's eth0, which moves lb1 to the other \
core, was tried: the generator then outruns lb1's 256-frame ring and lb1 forwarded less, \
losing more to sleeping and waking than the second core gave.)";

/// Frame size of the flood (the Ethernet minimum without FCS).
const FRAME_LEN: usize = 60;
/// Before the first window: every one of the 4096 flows seen (xlb's flow table, conntrack).
const PPS_WARMUP: Duration = Duration::from_secs(1);

/// The flood frame: Ethernet/IPv4 (ihl 5)/UDP, `CLI_ADDR` → `dst`:SINK_PORT, 60 bytes. The UDP
/// checksum is 0 (none, valid in IPv4) because the generator rewrites the source port without
/// fixing a checksum.
fn flood_frame(src_mac: [u8; 6], dst_mac: [u8; 6], dst: Ipv4Addr) -> Vec<u8> {
    let ip_len = (FRAME_LEN - 14) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&CLI_ADDR.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = crate::packet::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(FRAME_LEN);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&lb_common::BENCH_GEN_FIRST_PORT.to_be_bytes());
    f.extend_from_slice(&SINK_PORT.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(FRAME_LEN, 0);
    f
}

#[derive(Clone, Debug, Default)]
struct PpsResult {
    /// Frames the generator pushed towards lb1 (taken or refused by lb1's receive ring).
    offered_pps: f64,
    /// Refused: lb1's receive ring was full (lb1 did not keep up).
    refused_pps: f64,
    /// Came back out of lb1 towards the backends (dropped and counted by the sink).
    forwarded_pps: f64,
    /// The generator's own figure over its whole run (warm-up and windows).
    generator_pps: f64,
}

/// The flood for one configuration: warm-up, then `windows` measurements of `window` each.
fn flood(
    bed: &Testbed,
    active: &Active,
    frame: &[u8],
    window: Duration,
    windows: usize,
    profiled: bool,
) -> Result<(Vec<PpsResult>, Option<RunProfile>)> {
    let rtr = bed.ns("rtr");
    let lb1 = bed.ns("lb1");
    let peer = Topology::peer_iface("lb1");
    // Drop order (reverse of declaration): generator stopped, then lb1's pass program, then the
    // sink, so nothing is left sending into a device whose program is gone.
    let _sink = match active.sink {
        Some(_) => None,
        None => {
            Some(attach_bench(rtr, &peer, programs::BENCH_SINK).context("the sink on lb1's peer")?)
        }
    };
    let mut undo = Undo::default();
    if !has_xdp(lb1, HOST_IFACE)? {
        // nftables: a veth only takes XDP frames in while it runs an XDP program (a NIC driver
        // always would); xlb's pass program hands them to the stack unchanged.
        let xlb = xlb_bin();
        let xlb = xlb.display();
        undo.apply(
            lb1,
            &format!("{xlb} xdp-pass attach {HOST_IFACE} --xdp-mode driver"),
            &format!("{xlb} xdp-pass detach {HOST_IFACE}"),
        )?;
    }
    // A profiled run adds a window, perf's start and its report (the generator runs on through
    // them).
    let extra = if profiled {
        window + Duration::from_secs(30)
    } else {
        Duration::ZERO
    };
    let limit = PPS_WARMUP + window * windows as u32 + Duration::from_secs(20) + extra;
    let header =
        BenchGenHeader::from_frame(frame).context("flood frame shorter than its headers")?;
    // On the last CPU, so a profile can take that CPU alone.
    let cpu = crate::cpu::allowed()?.last().copied();
    let mut generator = Generator::start_on(rtr, &peer, frame.to_vec(), header, limit, cpu);
    thread::sleep(PPS_WARMUP);
    generator.ensure_running()?;
    let mut results = Vec::new();
    // A counter snapshot is dated halfway through the `ethtool` run that took it.
    let snapshot = || -> Result<(crate::livegen::VethXdp, Instant)> {
        let before = Instant::now();
        let c = veth_xdp(rtr, &peer)?;
        Ok((c, before + before.elapsed() / 2))
    };
    for _ in 0..windows {
        let (a, ta) = snapshot()?;
        thread::sleep(window);
        let (b, tb) = snapshot()?;
        let dt = (tb - ta).as_secs_f64();
        generator.ensure_running()?;
        let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
        results.push(PpsResult {
            offered_pps: rate(a.xmit + a.xmit_errors, b.xmit + b.xmit_errors),
            refused_pps: rate(a.xmit_errors, b.xmit_errors),
            forwarded_pps: rate(a.drops, b.drops),
            generator_pps: 0.0,
        });
    }
    // One more window with every CPU profiled (sampling slows it: not among the figures); a
    // failed profile is reported, not fatal.
    let profile = if let (true, Some(cpu)) = (profiled, cpu) {
        match profile::cpu_profile("flood", cpu, || {
            let (a, ta) = snapshot()?;
            thread::sleep(window);
            let (b, tb) = snapshot()?;
            Ok((b.drops.saturating_sub(a.drops), (tb - ta).as_secs_f64()))
        }) {
            Ok(((packets, secs), prof)) => Some(RunProfile {
                samples: prof.samples,
                shares: prof.categories,
                symbols: prof.symbols,
                units: packets,
                cpu_seconds: secs,
            }),
            Err(e) => {
                eprintln!("bench e2e: flood profile failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    generator.ensure_running()?;
    let report = generator.finish()?;
    let generator_pps = report.frames as f64 / report.busy.as_secs_f64().max(1e-9);
    for r in &mut results {
        r.generator_pps = generator_pps;
        // Zero would be a broken bed (nothing delivered, or a sink that does not match), not a
        // slow balancer: say so rather than report it as a rate.
        ensure!(
            r.offered_pps > 0.0 && r.forwarded_pps > 0.0,
            "offered {:.0} pps, forwarded {:.0} pps",
            r.offered_pps,
            r.forwarded_pps
        );
    }
    Ok((results, profile))
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
        undo.apply(
            bed.ns(&backend_name(i)),
            "for f in /proc/sys/net/ipv4/conf/*/accept_redirects; do echo 0 > \"$f\"; done",
            "true",
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

/// A profiled run (perf): its samples, their shares by `profile::system_category`, the units
/// of work it completed (a keep-alive run's requests, a flood window's forwarded packets) and
/// the CPU time it had (CPUs profiled × the run's length).
struct RunProfile {
    samples: u64,
    shares: Vec<profile::Share>,
    /// Every symbol's share, largest first.
    symbols: Vec<profile::Share>,
    units: u64,
    cpu_seconds: f64,
}

impl RunProfile {
    /// CPU time per unit of work spent on `category`, in µs (0 if the category has no samples): its
    /// share of the samples applied to the run's CPU time. The shares, not the sample count,
    /// carry the figure, so samples perf did not take (its start-up, rounding in the report)
    /// do not bias it.
    fn us_per_unit(&self, category: &str) -> f64 {
        self.us_per_unit_of(percent_of(&self.shares, category))
    }

    /// `us_per_unit` for one symbol.
    fn us_per_unit_of_symbol(&self, symbol: &str) -> f64 {
        self.us_per_unit_of(percent_of(&self.symbols, symbol))
    }

    fn us_per_unit_of(&self, pct: f64) -> f64 {
        let total: f64 = self.shares.iter().map(|s| s.percent).sum();
        if total <= 0.0 {
            return 0.0;
        }
        self.cpu_seconds * pct / total * 1e6 / self.units.max(1) as f64
    }

    /// For the JSON document, with the units of work named `units`.
    fn json(&self, units: &str) -> Value {
        json!({
            "samples": self.samples,
            units: self.units,
            "cpu_seconds": self.cpu_seconds,
            "percent_by_category": self.shares
                .iter()
                .map(|sh| (sh.symbol.clone(), json!(sh.percent)))
                .collect::<serde_json::Map<_, _>>(),
            "largest_symbols": self.symbols
                .iter()
                .take(30)
                .map(|sh| json!({"symbol": sh.symbol, "percent": sh.percent}))
                .collect::<Vec<_>>(),
        })
    }
}

/// The share of `name` in `shares` (0 if it has none).
fn percent_of(shares: &[profile::Share], name: &str) -> f64 {
    shares
        .iter()
        .find(|s| s.symbol == name)
        .map_or(0.0, |s| s.percent)
}

#[derive(Default)]
struct Samples {
    /// Where the machine's time went during an extra keep-alive run in the last round.
    ka_profile: Option<RunProfile>,
    /// The same over one more window of the flood in the last round (units: packets forwarded
    /// in it).
    flood_profile: Option<RunProfile>,
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
    let (rounds, wrk_secs) = if quick { (1, 2) } else { (3, 5) };
    // Two windows per configuration and round, so even a quick run shows a spread.
    let (pps_window, pps_windows) = if quick {
        (Duration::from_secs(2), 2)
    } else {
        (Duration::from_secs(3), 2)
    };
    let started = Instant::now();
    let mut bed =
        Testbed::up(TestbedOptions::new("ipip", "generic")).context("bringing up the test bed")?;
    // The flood, sent from rtr's end of lb1's link to lb1's eth0 (every configuration has the VIP
    // as its target).
    let peer = Topology::peer_iface("lb1");
    let frame = flood_frame(
        parse_mac(&mac_of(bed.ns("rtr"), &peer)?)?,
        parse_mac(&mac_of(bed.ns("lb1"), HOST_IFACE)?)?,
        VIP,
    );
    // The bed's own agent and data path go; each xlb configuration starts its own (one
    // forwarding method and XDP mode).
    bed.detach_lb("lb1")?;
    let mut undo = Undo::default();
    prepare(&bed, &mut undo)?;

    let mut samples: Vec<Samples> = CONFIGS.iter().map(|_| Samples::default()).collect();
    let profiling = profile::available();
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    for round in 0..rounds {
        for (ci, &config) in CONFIGS.iter().enumerate() {
            let tag = format!("{}-{round}", config.key());
            let result = (|| -> Result<()> {
                let active = setup(&bed, config, &tag)?;
                if config.http() {
                    let ka =
                        wrk(&bed, config.target(), false, wrk_secs).context("wrk keep-alive")?;
                    // The keep-alive gap to direct is what needs explaining: in the last round,
                    // one more keep-alive run with the whole machine profiled. Sampling slows
                    // it, so its figures are not among the samples; a failed profile is
                    // reported, not fatal.
                    if profiling && round + 1 == rounds {
                        match profile::system_profile(config.key(), || {
                            wrk(&bed, config.target(), false, wrk_secs)
                        }) {
                            Ok((run, prof)) => {
                                samples[ci].ka_profile = Some(RunProfile {
                                    samples: prof.samples,
                                    shares: prof.categories,
                                    symbols: prof.symbols,
                                    units: run.requests,
                                    cpu_seconds: cpus as f64 * wrk_secs as f64,
                                })
                            }
                            Err(e) => eprintln!(
                                "bench e2e: {}: keep-alive profile failed: {e:#}",
                                config.label()
                            ),
                        }
                    }
                    let close = wrk(&bed, config.target(), true, wrk_secs)
                        .context("wrk Connection: close")?;
                    samples[ci].ka.push(ka);
                    samples[ci].close.push(close);
                }
                if config.pps() {
                    let profiled = profiling && round + 1 == rounds;
                    let (r, profile) =
                        flood(&bed, &active, &frame, pps_window, pps_windows, profiled)
                            .with_context(|| format!("UDP flood through {}", config.label()))?;
                    samples[ci].pps.extend(r);
                    samples[ci].flood_profile = profile;
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

    // Aggregate: medians over the rounds (and windows, for the packet rate).
    let mut http = serde_json::Map::new();
    let mut pps = serde_json::Map::new();
    let med = |ci: usize, what: &str| -> Option<f64> {
        let s = &samples[ci];
        match what {
            "ka_rps" => median(&field(&s.ka, |r| r.rps)),
            "close_rps" => median(&field(&s.close, |r| r.rps)),
            "pps" => median(&s.pps.iter().map(|p| p.forwarded_pps).collect::<Vec<_>>()),
            _ => None,
        }
    };
    let idx = |c: Config| CONFIGS.iter().position(|&x| x == c).expect("config listed");
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
        if config.http() {
            http.insert(
                config.key().into(),
                json!({
                    "label": config.label(),
                    "keepalive": mode(&s.ka),
                    "close": mode(&s.close),
                    "keepalive_profile": s.ka_profile.as_ref().map(|p| p.json("requests")),
                    "failures": s.errors,
                }),
            );
        }
        if config.pps() {
            let of = |f: fn(&PpsResult) -> f64| stats(&s.pps.iter().map(f).collect::<Vec<_>>());
            // The chain minus the floor's: what this configuration's forwarding costs per packet
            // on the core that runs it (see PPS_METHOD).
            let floor = med(idx(Config::PpsFloor), "pps");
            let above_floor = match (med(ci, "pps"), floor) {
                (Some(p), Some(f)) if p > 0.0 && f > 0.0 && *config != Config::PpsFloor => {
                    Some(1e9 / p - 1e9 / f)
                }
                _ => None,
            };
            pps.insert(
                config.key().into(),
                json!({
                    "label": config.label(),
                    "forwarded_pps": of(|p| p.forwarded_pps),
                    "offered_pps": of(|p| p.offered_pps),
                    "refused_pps": of(|p| p.refused_pps),
                    "generator_pps": of(|p| p.generator_pps),
                    "ns_per_packet_above_floor": above_floor,
                    "share_of_floor": ratio(med(ci, "pps"), floor),
                    "share_of_stateful_floor": ratio(med(ci, "pps"), med(idx(Config::PpsFlowFloor), "pps")),
                    // xlb `ipip` against the least an IPIP balancer does.
                    "share_of_ipip_floor": if config.ipip() {
                        ratio(med(ci, "pps"), med(idx(Config::PpsIpipFloor), "pps"))
                    } else {
                        None
                    },
                    "profile": s.flood_profile.as_ref().map(|p| p.json("packets")),
                    "failures": s.errors,
                }),
            );
        }
    }
    let mut ratios = serde_json::Map::new();
    let mut targets = Vec::new();
    for xc in XLB_CONFIGS {
        let x = idx(xc);
        let r = json!({
            "pps_vs_nft_dnat": ratio(med(x, "pps"), med(idx(Config::NftDnat), "pps")),
            "pps_vs_nft_l2": ratio(med(x, "pps"), med(idx(Config::NftL2), "pps")),
            "close_rps_vs_nft_dnat": ratio(med(x, "close_rps"), med(idx(Config::NftDnat), "close_rps")),
            "close_rps_vs_nft_l2": ratio(med(x, "close_rps"), med(idx(Config::NftL2), "close_rps")),
            "close_rps_vs_haproxy": ratio(med(x, "close_rps"), med(idx(Config::Haproxy), "close_rps")),
            "close_rps_vs_direct": ratio(med(x, "close_rps"), med(idx(Config::Direct), "close_rps")),
            "keepalive_rps_vs_direct": ratio(med(x, "ka_rps"), med(idx(Config::Direct), "ka_rps")),
            "keepalive_rps_vs_nft_dnat": ratio(med(x, "ka_rps"), med(idx(Config::NftDnat), "ka_rps")),
            "keepalive_rps_vs_haproxy": ratio(med(x, "ka_rps"), med(idx(Config::Haproxy), "ka_rps")),
            "keepalive_rps_vs_hop_floor": ratio(med(x, "ka_rps"), med(idx(Config::HopFloor), "ka_rps")),
            "close_rps_vs_hop_floor": ratio(med(x, "close_rps"), med(idx(Config::HopFloor), "close_rps")),
        });
        let target = |name: &str, key: &str, bar: f64, ours: &str, theirs: Config| {
            let value = r[key].as_f64();
            json!({
                "target": format!("{} {name}", xc.key()),
                "config": xc.key(),
                "bar": bar,
                "ratio": value,
                "xlb": med(x, ours),
                "other": med(idx(theirs), ours),
                "met": value.map(|v| v >= bar),
            })
        };
        // Packet rate only where it is measured: xlb in driver mode (see `Config::pps`).
        if xc.pps() {
            // Issue 16: a share of the XDP_TX floor's rate on the same path.
            let (bar, method) = if xc.ipip() {
                (0.80, "ipip")
            } else {
                (0.85, "l2")
            };
            let value = ratio(med(x, "pps"), med(idx(Config::PpsFloor), "pps"));
            targets.push(json!({
                "target": format!("{} pps >= {bar:.2} of the XDP_TX floor ({method}, issue 16)", xc.key()),
                "config": xc.key(),
                "bar": bar,
                "ratio": value,
                "xlb": med(x, "pps"),
                "other": med(idx(Config::PpsFloor), "pps"),
                "met": value.map(|v| v >= bar),
            }));
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
        }
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
    // The hop floor's path exactly (driver mode, be1 only): what is left between the two is the
    // hop's own cost. The three-backend rows' ratios to it are above, for reference.
    {
        let one = idx(Config::XlbL2DriverOne);
        let hop = idx(Config::HopFloor);
        let mut r = serde_json::Map::new();
        for (name, key, what) in [
            (
                "keep-alive req/s within 5% of the hop floor",
                "keepalive_rps_vs_hop_floor",
                "ka_rps",
            ),
            (
                "conn/s within 5% of the hop floor",
                "close_rps_vs_hop_floor",
                "close_rps",
            ),
        ] {
            let value = ratio(med(one, what), med(hop, what));
            r.insert(key.into(), json!(value));
            targets.push(json!({
                "target": format!("{} {name}", Config::XlbL2DriverOne.key()),
                "config": Config::XlbL2DriverOne.key(),
                "bar": 0.95,
                "ratio": value,
                "xlb": med(one, what),
                "other": med(hop, what),
                "met": value.map(|v| v >= 0.95),
            }));
        }
        ratios.insert(Config::XlbL2DriverOne.key().into(), Value::Object(r));
    }

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let doc = json!({
        "kernel": kernel,
        "ipvs_available": false,
        "ipvs_note": "this kernel has no IPVS; nftables DNAT over conntrack stands in for IPVS-NAT",
        "xdp_modes": ["generic", "driver"],
        "rounds": rounds,
        "wrk": { "threads": WRK_THREADS, "connections": WRK_CONNS, "duration_s": wrk_secs, "path": "/" },
        "flood": {
            "generator": format!("{} (BPF_PROG_TEST_RUN, live frames, batch {GEN_BATCH}) on rtr's {}", programs::BENCH_GEN, Topology::peer_iface("lb1")),
            "sink": format!("native XDP drop of UDP port {SINK_PORT} (also inside IPIP) on rtr's {}, counted by the veth's xdp_drops", Topology::peer_iface("lb1")),
            "frame_bytes": FRAME_LEN,
            "udp_port": SINK_PORT,
            "flows": lb_common::BENCH_GEN_FLOWS,
            "warmup_s": PPS_WARMUP.as_secs_f64(),
            "window_s": pps_window.as_secs_f64(),
            "windows_per_round": pps_windows,
        },
        "http": http,
        "pps": pps,
        "ratios": ratios,
        "targets": targets,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let md = markdown(&doc, &samples);
    Ok((doc, md))
}

/// Where the time went during the profiled keep-alive runs: CPU µs per request by category, one
/// column per configuration.
fn keepalive_profiles(samples: &[Samples]) -> String {
    profile_table(
        samples,
        |s| s.ka_profile.as_ref(),
        "Where the keep-alive time goes",
        "one more keep-alive run per configuration in the \
         last round (not among the figures above), with `perf record -a -e cpu-clock` over both \
         CPUs; each sample is put under the subsystem of its kernel symbol. Shown as CPU µs per \
         completed request: a category's share of the samples × the run's CPU time (CPUs × wrk's \
         duration) / requests. Client, router, balancer and backends share the machine's 2 cores, \
         so every µs a configuration adds per request costs requests/s directly.",
        ("request", "µs", 1.0),
    )
}

/// Where the time went during the profiled flood windows: CPU ns per forwarded packet by
/// category, one column per configuration (issue 16, item 4: what the live path spends that
/// `BPF_PROG_TEST_RUN` does not show).
fn flood_profiles(samples: &[Samples]) -> String {
    profile_table(
        samples,
        |s| s.flood_profile.as_ref(),
        "Where the live path's time goes",
        "one more flood window per packet-rate \
         configuration in the last round (not among the figures above), with `perf record -C` \
         on the CPU the generator is pinned to, where the balancer's and the sink's receive \
         processing run too (softirq work on the sending core). Shown as CPU ns per forwarded \
         packet: a category's share of the samples × the window's length / packets the sink \
         counted. The generator's and the sink's costs are in every column, so the differences \
         between columns are the balancers'; anything else the machine ran on that CPU shows as \
         well (user space, mostly). xlb's programs count with their BPF subprograms; the floors', \
         the generator's and the sink's under \"benchmark programs\"; every column's \
         flow-table lookups under \"BPF maps and helpers\".",
        ("forwarded packet", "ns", 1000.0),
    )
}

/// The largest symbols of the flood profiles' categories that the balancers' columns differ in
/// most (BPF maps and helpers, the programs: xlb's, and the floors', generator's and sink's):
/// CPU ns per forwarded packet, one column per configuration, so that a map, helper or program
/// that costs more on the live path than under `BPF_PROG_TEST_RUN` shows by name.
fn flood_symbols(samples: &[Samples]) -> String {
    const CATEGORIES: [&str; 3] = [
        "BPF maps and helpers",
        "xlb's XDP programs (JIT code)",
        "benchmark programs: floors, generator, sink, pass (JIT code)",
    ];
    const ROWS: usize = 16;
    let cols: Vec<(Config, &RunProfile)> = CONFIGS
        .iter()
        .zip(samples)
        .filter_map(|(c, s)| s.flood_profile.as_ref().map(|p| (*c, p)))
        .collect();
    if cols.is_empty() {
        return String::new();
    }
    // Symbols of those categories, by their largest cost in any column.
    let mut rows: Vec<(&str, f64)> = Vec::new();
    for (_, p) in &cols {
        for s in &p.symbols {
            if !CATEGORIES.contains(&profile::system_category(&s.symbol)) {
                continue;
            }
            let ns = p.us_per_unit_of(s.percent) * 1000.0;
            match rows.iter_mut().find(|(r, _)| *r == s.symbol) {
                Some((_, best)) => *best = best.max(ns),
                None => rows.push((&s.symbol, ns)),
            }
        }
    }
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows.truncate(ROWS);
    let mut md = format!(
        "\n**The live path's BPF maps, helpers and programs by symbol** (the same profiles; \
         the {ROWS} largest symbols of those three categories, CPU ns per forwarded packet; the \
         generator and the sink are in every column):\n\n| symbol |"
    );
    for (c, _) in &cols {
        let _ = write!(md, " {} |", c.label());
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(cols.len()));
    md.push('\n');
    for (sym, _) in &rows {
        let _ = write!(md, "| `{sym}` |");
        for (_, p) in &cols {
            let _ = write!(md, " {:.2} |", p.us_per_unit_of_symbol(sym) * 1000.0);
        }
        md.push('\n');
    }
    md
}

/// A table of profiles by category, one column per configuration that has one (`pick`), in
/// `unit` per `per` (`scale` × µs).
fn profile_table(
    samples: &[Samples],
    pick: fn(&Samples) -> Option<&RunProfile>,
    title: &str,
    intro: &str,
    (per, unit, scale): (&str, &str, f64),
) -> String {
    let cols: Vec<(Config, &RunProfile)> = CONFIGS
        .iter()
        .zip(samples)
        .filter_map(|(c, s)| pick(s).map(|p| (*c, p)))
        .collect();
    if cols.is_empty() {
        return format!("\n**{title}**: not profiled (perf not usable here).\n");
    }
    // Rows: every category any run has, largest (in the first column) first; idle last.
    let mut rows: Vec<&str> = Vec::new();
    for (_, p) in &cols {
        for s in &p.shares {
            if !rows.contains(&s.symbol.as_str()) {
                rows.push(&s.symbol);
            }
        }
    }
    rows.sort_by(|a, b| {
        let key = |c: &str| (c == "idle", -cols[0].1.us_per_unit(c));
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut md = format!("\n**{title}**: {intro}\n\n| spent on ({unit} per {per}) |");
    for (c, _) in &cols {
        let _ = write!(md, " {} |", c.label());
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(cols.len()));
    md.push('\n');
    for r in &rows {
        let _ = write!(md, "| {r} |");
        for (_, p) in &cols {
            let _ = write!(md, " {:.2} |", p.us_per_unit(r) * scale);
        }
        md.push('\n');
    }
    let _ = write!(md, "| **busy CPU per {per} (all but idle)** |");
    for (_, p) in &cols {
        let busy: f64 = rows
            .iter()
            .filter(|r| **r != "idle")
            .map(|r| p.us_per_unit(r) * scale)
            .sum();
        let _ = write!(md, " **{busy:.2}** |");
    }
    md.push('\n');
    let _ = write!(md, "| {per}s in the profiled run |");
    for (_, p) in &cols {
        let _ = write!(md, " {} |", p.units);
    }
    md.push('\n');
    md
}

fn markdown(doc: &Value, samples: &[Samples]) -> String {
    let mut md = String::new();
    let g = |v: &Value| v.as_f64();
    let _ = writeln!(md, "## End to end (issue 6, parts 2 and 3)\n");
    let _ = writeln!(
        md,
        "Test bed topology (cli — rtr/br0 — lb1 — be1..be3, nginx), {} round(s), configurations \
         alternated within each round; medians over rounds (min–max in brackets). `wrk -t{WRK_THREADS} \
         -c{WRK_CONNS} -d{}s --latency` from cli. xlb in generic and in driver (native) XDP mode, \
         labelled; in driver mode rtr's end of lb1's link runs an XDP program (the packet-rate \
         sink, which passes everything else), without which a veth drops native XDP_TX. On a \
         veth, driver mode does not speed up this traffic: it arrives from rtr's stack as \
         socket buffers, which the veth turns into XDP frames (copying when they lack XDP's \
         headroom) before a native program runs. \
         **This kernel has no IPVS**: \
         nftables DNAT over conntrack (`numgen inc` round robin, backends routing the client network \
         via lb1) is the path IPVS-NAT would take. The nftables L2 DSR rule is a netdev-ingress \
         `ether daddr set jhash ip saddr . sport mod 3 map {{…}} fwd to eth0` (a stateless rule must \
         hash the flow: `numgen inc` per packet would split TCP connections). HAProxy 1 thread, \
         `mode tcp`, `balance roundrobin`, VIP on lb1's lo. The hop floor is the stateful floor \
         as a working hop (`xlb_floor_hop`, driver XDP): one flow-table lookup (and an insert for \
         a new flow), both MACs to be1, XDP_TX, nothing counted: the least an XDP balancer with \
         connection tracking puts between client and server; xlb `l2` in driver mode with be1 as \
         its only backend takes the same path and is held against it (issue 16).\n",
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
    for (ci, config) in CONFIGS.iter().enumerate().filter(|(_, c)| c.http()) {
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
        "\n**Packet rate** (xlb in driver mode only: generic-mode XDP cannot take the \
         generator's frames in). {}\n",
        PPS_METHOD
    );
    let _ = writeln!(
        md,
        "| configuration | forwarded pps (sink) | offered pps (generator) | ns/packet above the floor | of the XDP_TX floor | of the stateful floor | of the IPIP floor | failures |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|");
    for (ci, config) in CONFIGS.iter().enumerate().filter(|(_, c)| c.pps()) {
        let p = &doc["pps"][config.key()];
        let failures = samples[ci]
            .errors
            .join("; ")
            .replace('|', "/")
            .replace('\n', " ");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            config.label(),
            cell(&p["forwarded_pps"], 0),
            cell(&p["offered_pps"], 0),
            fmt(g(&p["ns_per_packet_above_floor"]), 0),
            fmt(g(&p["share_of_floor"]), 2),
            fmt(g(&p["share_of_stateful_floor"]), 2),
            if p["share_of_ipip_floor"].is_null() {
                "–".to_string()
            } else {
                fmt(g(&p["share_of_ipip_floor"]), 2)
            },
            failures
        );
    }
    md.push_str(&flood_profiles(samples));
    md.push_str(&flood_symbols(samples));
    md.push_str(&keepalive_profiles(samples));
    let _ = writeln!(md, "\n**Targets** (issues 6 and 16):\n");
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
