//! The door on the live path (issue 13), on one test bed (ipip, driver XDP on lb1, the sink on
//! rtr's end of lb1's link, xlb's live-frames generator sending from there into lb1):
//!
//! - a SYN flood from spoofed sources (32768 addresses × 4 ports: 131072 flows, against a flow
//!   table of 65536) at the generator's full rate while 30 long downloads run and a client opens
//!   a connection every 20 ms: downloads intact, the client's share of successes,
//!   `midflow_miss` and `flow_resteered`, how much of the flood lb1 took and sent on;
//! - denied packets: the same flood from sources on a deny list of a million prefixes, dropped
//!   by xlb (XDP) and by an nftables netdev ingress rule with the same prefixes in a set with
//!   `flags interval` (after xlb's pass program, as in the packet-rate benchmark): frames lb1
//!   took in per second (every one of them is dropped: by xlb's XDP program, or by nftables
//!   right after the pass program, in the same NAPI poll), on the same path and core; and what
//!   loading the million prefixes takes through `xlb deny load` and `nft -f`. (nftables' own
//!   counter is not read: reading any object of a table with a million-element set makes `nft`
//!   fetch the set, which took two minutes here.)
//!
//! Every change to the bed is undone by guards, also on failure; the flood is bounded in time.

use crate::{
    backend::HTTP_PORT,
    client::{ClientOptions, ContinuousClient, started_between},
    cmd::run_timeout,
    downloads::LongDownloads,
    livegen::{Generator, VethXdp, attach_bench, parse_mac, veth_xdp},
    netns::Netns,
    packet::{Ip, SYN, eth, tcp},
    testbed::{Testbed, TestbedOptions},
    topology::{HOST_IFACE, Topology, VIP},
    xlb::{event, xlb_bin, xlb_in},
};
use anyhow::{Context, Result, ensure};
use lb_common::{BENCH_FLOOD_NET, BenchGenHeader, programs};
use serde_json::{Value, json};
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};
use xlb::model::net::Ipv4Net;

const FLOOD_SOURCES: u32 = 32_768;
const FLOOD_FLOWS: u32 = 4 * FLOOD_SOURCES;
const FLOW_CAPACITY: &str = "65536";
const DOWNLOADS: usize = 30;
const WARMUP: Duration = Duration::from_secs(1);

fn target() -> SocketAddr {
    SocketAddr::from((VIP, HTTP_PORT))
}

fn mac(ns: &Netns, iface: &str) -> Result<[u8; 6]> {
    parse_mac(
        ns.sh(&format!("cat /sys/class/net/{iface}/address"))?
            .trim(),
    )
}

/// The flood's frame (a SYN from the first spoofed source to VIP:80, rtr → lb1) and its header.
fn flood(bed: &Testbed) -> Result<(Vec<u8>, BenchGenHeader)> {
    let peer = Topology::peer_iface("lb1");
    let frame = eth(
        mac(bed.ns("lb1"), HOST_IFACE)?,
        mac(bed.ns("rtr"), &peer)?,
        0x0800,
        &Ip::to(Ipv4Addr::from(BENCH_FLOOD_NET), VIP, 6).packet(&tcp(1024, HTTP_PORT, SYN, 0)),
    );
    let header = BenchGenHeader::syn_flood(&frame, FLOOD_SOURCES, FLOOD_FLOWS)
        .context("flood frame shorter than its headers")?;
    Ok((frame, header))
}

/// Counters of one side over a measured window.
fn rate(before: u64, after: u64, window: Duration) -> f64 {
    after.saturating_sub(before) as f64 / window.as_secs_f64()
}

/// Per second over `windows` windows after a warm-up, while the flood runs: what `count`
/// counted, and what the generator offered (into lb1's ring, also refused).
fn measure(
    bed: &Testbed,
    windows: usize,
    window: Duration,
    count: &dyn Fn() -> Result<u64>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let rtr = bed.ns("rtr");
    let peer = Topology::peer_iface("lb1");
    let (frame, header) = flood(bed)?;
    let limit = WARMUP + window * windows as u32 + Duration::from_secs(30);
    let mut generator = Generator::start(rtr, &peer, frame, header, limit);
    thread::sleep(WARMUP);
    let offered = |c: &VethXdp| c.xmit + c.xmit_errors;
    let (mut counted, mut sent) = (Vec::new(), Vec::new());
    for _ in 0..windows {
        generator.ensure_running()?;
        let (c0, o0, t0) = (count()?, veth_xdp(rtr, &peer)?, Instant::now());
        thread::sleep(window);
        let (c1, o1, dt) = (count()?, veth_xdp(rtr, &peer)?, t0.elapsed());
        counted.push(rate(c0, c1, dt));
        sent.push(rate(offered(&o0), offered(&o1), dt));
    }
    generator.finish()?;
    Ok((counted, sent))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn spread(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    json!({"runs": v, "min": s.first(), "median": median(v), "max": s.last()})
}

/// The prefixes of the deny-list comparison, as a file for `xlb deny load` and as an nftables
/// set.
fn write_lists(dir: &Path, prefixes: &[Ipv4Net]) -> Result<()> {
    let mut text = String::from("# bench: the deny list of the door's drop-rate comparison\n");
    let mut nft = String::from(
        "table netdev xlbbench_deny {\n\tset deny {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { ",
    );
    for (i, p) in prefixes.iter().enumerate() {
        let _ = writeln!(text, "{p}");
        if i > 0 {
            nft.push_str(", ");
        }
        let _ = write!(nft, "{p}");
    }
    let _ = write!(
        nft,
        " }}\n\t}}\n\tchain ing {{\n\t\ttype filter hook ingress device \"{HOST_IFACE}\" priority 0; policy accept;\n\
         \t\tip saddr @deny drop\n\t}}\n}}\n"
    );
    std::fs::write(dir.join("deny.txt"), text)?;
    std::fs::write(dir.join("deny.nft"), nft)?;
    Ok(())
}

/// Removes the nftables table and xlb's pass program from lb1 on drop.
struct NftUndo<'a>(&'a Netns);

impl Drop for NftUndo<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .run("nft", &["delete", "table", "netdev", "xlbbench_deny"]);
        let _ = xlb_in(self.0, &["xdp-pass", "detach", HOST_IFACE]);
    }
}

pub struct DoorBench {
    pub json: Value,
    pub markdown: String,
}

/// The whole live part; `quick` makes the flood shorter (/slow instead of /long) and takes one
/// window per drop rate.
pub fn run(quick: bool, deny: &[Ipv4Net]) -> Result<DoorBench> {
    let mut options = TestbedOptions::new("ipip", "driver");
    options.agent_args = vec!["--flow-capacity".into(), FLOW_CAPACITY.into()];
    let mut bed = Testbed::up(options).context("bringing up the test bed")?;
    let rtr = bed.ns("rtr");
    let peer = Topology::peer_iface("lb1");
    xlb_in(rtr, &["xdp-pass", "detach", &peer])?;
    let sink = attach_bench(rtr, &peer, programs::BENCH_SINK).context("the sink")?;
    let flood_json = syn_flood(&bed, quick)?;
    let drops_json = drop_rates(&mut bed, quick, deny)?;
    drop(sink);
    bed.teardown_hosts().ok();
    let json = json!({"syn_flood": flood_json, "denied": drops_json});
    let markdown = markdown(&json);
    Ok(DoorBench { json, markdown })
}

fn syn_flood(bed: &Testbed, quick: bool) -> Result<Value> {
    let (path, deadline) = if quick {
        ("/slow", Duration::from_secs(20))
    } else {
        ("/long", Duration::from_secs(45))
    };
    println!("bench: door, SYN flood with {DOWNLOADS} downloads of {path} in flight");
    let rtr = bed.ns("rtr");
    let peer = Topology::peer_iface("lb1");
    let before = bed.client().stats()?;
    let downloads = LongDownloads::open(
        bed.ns("cli"),
        target(),
        path,
        DOWNLOADS,
        Arc::new(bed.content.clone()),
        deadline,
    )?;
    let client = ContinuousClient::start(
        bed.ns("cli"),
        target(),
        ClientOptions {
            max_duration: deadline + Duration::from_secs(10),
            ..ClientOptions::default()
        },
    );
    let (frame, header) = flood(bed)?;
    let c0 = veth_xdp(rtr, &peer)?;
    let flood_start = Instant::now();
    let mut generator = Generator::start(
        rtr,
        &peer,
        frame,
        header,
        deadline + Duration::from_secs(10),
    );
    // The flood runs until the downloads are done (each is bounded by its deadline).
    let finished = downloads.finish();
    let sent = generator.finish()?;
    let flood_end = Instant::now();
    let c1 = veth_xdp(rtr, &peer)?;
    thread::sleep(Duration::from_millis(300));
    let requests = client.stop()?;
    let finished = finished?;
    let after = bed.client().stats()?;
    let secs = (flood_end - flood_start).as_secs_f64();
    let during = started_between(&requests, flood_start, flood_end);
    let ok = during.iter().filter(|r| !r.failed()).count();
    let intact = finished.iter().filter(|f| f.outcome.is_ok()).count();
    let delta = |name: &str| -> Result<u64> { Ok(event(&after, name)? - event(&before, name)?) };
    let doc = json!({
        "downloads": DOWNLOADS,
        "path": path,
        "downloads_intact": intact,
        "download_failures": finished.iter().filter_map(|f| f.outcome.as_ref().err()).collect::<Vec<_>>(),
        "flood_seconds": secs,
        "flood_flows": FLOOD_FLOWS,
        "flood_sources": FLOOD_SOURCES,
        "syn_offered_per_s": (c1.xmit + c1.xmit_errors - c0.xmit - c0.xmit_errors) as f64 / secs,
        "syn_refused_per_s": (c1.xmit_errors - c0.xmit_errors) as f64 / secs,
        "syn_forwarded_per_s": (c1.drops - c0.drops) as f64 / secs,
        "generator_frames": sent.frames,
        "client_requests": during.len(),
        "client_ok": ok,
        "client_ok_share": ok as f64 / during.len().max(1) as f64,
        "midflow_miss": delta("midflow_miss")?,
        "flow_resteered": delta("flow_resteered")?,
        "embryonic_new": delta("embryonic_new")?,
        "embryonic_promoted": delta("embryonic_promoted")?,
        "flow_capacity": after["flow_capacity"],
        "flow_entries_after": after["flow_entries"],
        "embryonic_capacity": after["embryonic_capacity"],
        "embryonic_entries_after": after["embryonic_entries"],
    });
    ensure!(!during.is_empty(), "no client request during the flood");
    Ok(doc)
}

fn drop_rates(bed: &mut Testbed, quick: bool, deny: &[Ipv4Net]) -> Result<Value> {
    let (windows, window) = if quick {
        (2, Duration::from_secs(2))
    } else {
        (5, Duration::from_secs(3))
    };
    let dir = bed.dir.path().join("bench-door");
    std::fs::create_dir_all(&dir)?;
    write_lists(&dir, deny)?;
    let file = dir.join("deny.txt");
    println!("bench: door, {} prefixes into xlb's deny list", deny.len());
    let t = Instant::now();
    let loaded = bed
        .client()
        .ok(&["deny", "load", &file.to_string_lossy()])?;
    let xlb_load_s = t.elapsed().as_secs_f64();
    ensure!(loaded.contains("loaded"), "xlb deny load: {loaded}");
    let taken = |bed: &Testbed| -> Result<u64> { Ok(veth_xdp(bed.ns("lb1"), HOST_IFACE)?.packets) };
    let xlb_dropped = || -> Result<u64> { Ok(veth_xdp(bed.ns("lb1"), HOST_IFACE)?.drops) };
    println!("bench: door, denied SYNs dropped by xlb");
    let d0 = xlb_dropped()?;
    let (xlb_rate, xlb_offered) = measure(bed, windows, window, &|| taken(bed))?;
    let s = bed.client().stats()?;
    ensure!(
        xlb_dropped()? > d0 && crate::xlb::reason(&s, "drop_deny_list")? > 0,
        "xlb did not drop the denied flood"
    );
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "")?;
    bed.client()
        .ok(&["deny", "load", &empty.to_string_lossy()])?;

    // The floor: the sink on lb1's eth0, which parses each frame and drops it (it is one of
    // the flood's SYNs), with nothing else of xlb there: the data path outlives its agent, so
    // it is removed for good (`xlb detach`), not just stopped.
    bed.detach_lb("lb1")?;
    let bed: &Testbed = bed;
    let lb1 = bed.ns("lb1");
    println!("bench: door, the floor (a program that parses and drops)");
    let floor_prog = attach_bench(lb1, HOST_IFACE, programs::BENCH_SINK)?;
    let (floor_rate, _) = measure(bed, windows, window, &|| taken(bed))?;
    drop(floor_prog);

    // nftables on the same path: xlb's pass program takes lb1's eth0 (a veth takes XDP frames
    // only into a native program), and the rule drops at netdev ingress.
    let _undo = NftUndo(lb1);
    let xlb = xlb_bin();
    lb1.run(
        &xlb.to_string_lossy(),
        &["xdp-pass", "attach", HOST_IFACE, "--xdp-mode", "driver"],
    )?;
    println!(
        "bench: door, {} prefixes into an nftables interval set",
        deny.len()
    );
    let t = Instant::now();
    let mut cmd = lb1.command("nft");
    cmd.arg("-f").arg(dir.join("deny.nft"));
    run_timeout(&mut cmd, Duration::from_secs(300))?.checked()?;
    let nft_load_s = t.elapsed().as_secs_f64();
    println!("bench: door, denied SYNs dropped by nftables");
    let (nft_rate, nft_offered) = measure(bed, windows, window, &|| taken(bed))?;
    // What each drop costs the core above the floor (the generator, the veth and a bare drop
    // are in the floor): 1/rate − 1/floor.
    let above = |r: f64| 1e9 / r.max(1e-9) - 1e9 / median(&floor_rate).max(1e-9);
    let (xlb_ns, nft_ns) = (above(median(&xlb_rate)), above(median(&nft_rate)));
    Ok(json!({
        "prefixes": deny.len(),
        "xlb_load_s": xlb_load_s,
        "nft_load_s": nft_load_s,
        "xlb_drops_per_s": spread(&xlb_rate),
        "xlb_offered_per_s": spread(&xlb_offered),
        "nft_drops_per_s": spread(&nft_rate),
        "nft_offered_per_s": spread(&nft_offered),
        "floor_drops_per_s": spread(&floor_rate),
        "ratio": median(&xlb_rate) / median(&nft_rate).max(1e-9),
        "xlb_ns_above_floor": xlb_ns,
        "nft_ns_above_floor": nft_ns,
        "cost_ratio": nft_ns / xlb_ns.max(1e-9),
    }))
}

fn markdown(doc: &Value) -> String {
    let f = &doc["syn_flood"];
    let d = &doc["denied"];
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let met = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let ratio = num(&d["ratio"]);
    let share = num(&f["client_ok_share"]);
    let intact = f["downloads_intact"].as_u64() == f["downloads"].as_u64();
    let zero = f["midflow_miss"].as_u64() == Some(0) && f["flow_resteered"].as_u64() == Some(0);
    format!(
        "\n### The door on the live path (issue 13)\n\n\
         Driver-mode XDP on lb1, xlb's live-frames generator on rtr's end of lb1's link, the sink \
         there dropping what lb1 sends on of the flood. The generator, lb1's receive path and the \
         sink share one core (see the packet-rate method).\n\n\
         | figure | value |\n|---|---|\n\
         | SYN flood: offered / forwarded by lb1 (SYNs per second) | {:.0} / {:.0} |\n\
         | SYN flood: distinct flows, spoofed addresses, seconds | {} flows from {} addresses, {:.1} s |\n\
         | {} downloads of {} in flight: intact | {} |\n\
         | client, a new connection every 20 ms during the flood: ok | {} of {} ({:.1}%) |\n\
         | midflow_miss / flow_resteered | {} / {} |\n\
         | embryonic flows made / promoted | {} / {} |\n\
         | flow table after (of {}) / embryonic table (of {}) | {} / {} |\n\
         | denied SYNs dropped per second, xlb (XDP) vs nftables netdev set, {} prefixes | {:.0} vs {:.0} ({ratio:.2}×) |\n\
         | the same, floor (a bare parse-and-drop program on lb1) | {:.0} |\n\
         | the same, ns per packet above the floor: xlb vs nftables | {:.0} vs {:.0} ({:.2}× less for xlb) |\n\
         | loading the {} prefixes: `xlb deny load` vs `nft -f` | {:.1} s vs {:.1} s |\n\n\
         - Under the full-rate SYN flood: 30 downloads intact {}, the client ≥ 99% {}, midflow_miss and flow_resteered 0 {}.\n\
         - Denied packets dropped ≥ 3× nftables: {} by the rates, which the shared core \
         (generator, veth, sink) bounds; per packet above the floor, nftables costs {:.2}× what \
         xlb does.\n",
        num(&f["syn_offered_per_s"]),
        num(&f["syn_forwarded_per_s"]),
        f["flood_flows"],
        f["flood_sources"],
        num(&f["flood_seconds"]),
        f["downloads"],
        f["path"].as_str().unwrap_or("?"),
        f["downloads_intact"],
        f["client_ok"],
        f["client_requests"],
        share * 100.0,
        f["midflow_miss"],
        f["flow_resteered"],
        f["embryonic_new"],
        f["embryonic_promoted"],
        f["flow_capacity"],
        f["embryonic_capacity"],
        f["flow_entries_after"],
        f["embryonic_entries_after"],
        d["prefixes"],
        num(&d["xlb_drops_per_s"]["median"]),
        num(&d["nft_drops_per_s"]["median"]),
        num(&d["floor_drops_per_s"]["median"]),
        num(&d["xlb_ns_above_floor"]),
        num(&d["nft_ns_above_floor"]),
        num(&d["cost_ratio"]),
        d["prefixes"],
        num(&d["xlb_load_s"]),
        num(&d["nft_load_s"]),
        met(intact),
        met(share >= 0.99),
        met(zero),
        met(ratio >= 3.0),
        num(&d["cost_ratio"]),
    )
}
