//! The door end to end (issue 13), on one test bed (ipip, driver XDP, so xlb's live-frames
//! generator can flood lb1): a VIP's allow and deny lists, the global deny list (added,
//! removed, loaded from files, a file with a bad line refused, kept across an agent restart),
//! the pinned deny list and allow list dropping while no agent runs after a SIGKILL and taken
//! over by the next agent (the deny list by difference from its saved file), an older build's
//! deny list (a host entry in the trie) taken over, new-flow limits with exact counts, and a
//! bounded SYN flood from spoofed sources while downloads are in flight and a client opens a
//! connection every 20 ms. The long flood with 30 downloads is in `cargo xtask bench`.

use aya::maps::{Array, HashMap as AyaHashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use lb_common::{
    BENCH_FLOOD_NET, BenchGenHeader, DenyData, DenyHostKey, POLICY_F_DENY_HOSTS,
    POLICY_F_DENY_LIST, PolicyState, layout, maps,
};
use serde_json::Value;
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};
use xlb::dataplane::pins::map_pin_name as pin;
use xlb_tests::{
    backend::HTTP_PORT,
    client::{ClientOptions, ContinuousClient, started_between},
    downloads::LongDownloads,
    livegen::{Generator, attach_bench, parse_mac, veth_xdp},
    netns::require_root,
    packet::{Ip, SYN, eth, tcp},
    testbed::{Testbed, TestbedOptions},
    topology::{CLI_ADDR, HOST_IFACE, LB1_ADDR, Topology, VIP},
    xlb::{event, find_vip, reason, xlb_in},
};

/// A small flow table: a flood of more distinct flows than it holds would evict every
/// established flow if it reached the flow table.
const FLOW_CAPACITY: &str = "4096";
/// The embryonic table must hold the SYNs of a handshake's round trip (a legitimate client's
/// embryo lives capacity / SYN rate: 65536 at 650k SYNs/s is 100 ms); the default.
const EMBRYONIC_CAPACITY: &str = "65536";
/// The flood: this many spoofed addresses (10.111.128.0/17), 4 ports each.
const FLOOD_SOURCES: u32 = 32_768;
const FLOOD_FLOWS: u32 = 4 * FLOOD_SOURCES;
const FLOOD_TIME: Duration = Duration::from_secs(3);
const DOWNLOADS: usize = 10;

fn target() -> SocketAddr {
    SocketAddr::from((VIP, HTTP_PORT))
}

/// `n` TCP connects to the VIP from cli at once, each given `timeout` (less than the 1 s before
/// a lost SYN is sent again, so each is one SYN): how many were accepted.
fn connects(bed: &Testbed, n: usize, timeout: Duration) -> usize {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            bed.ns("cli").spawn(move || -> anyhow::Result<bool> {
                Ok(TcpStream::connect_timeout(&target(), timeout).is_ok())
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| xlb_tests::netns::join(h, "connect").expect("connect thread"))
        .filter(|ok| *ok)
        .count()
}

fn can_connect(bed: &Testbed) -> bool {
    connects(bed, 1, Duration::from_millis(800)) == 1
}

fn stats(bed: &Testbed) -> Value {
    bed.client().stats().expect("xlb stats --json")
}

fn vip_drop(bed: &Testbed, reason: &str) -> u64 {
    let s = stats(bed);
    let v = find_vip(&s, VIP, HTTP_PORT, "tcp").expect("VIP in stats");
    v["drops"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("{reason} in {v}"))
}

fn xlb(bed: &Testbed, args: &[&str]) -> String {
    bed.client()
        .ok(args)
        .unwrap_or_else(|e| panic!("xlb {}: {e:#}", args.join(" ")))
}

fn vip_set(bed: &Testbed, args: &[&str]) {
    let vip = format!("{VIP}:{HTTP_PORT}");
    let mut all = vec!["vip", "set", vip.as_str()];
    all.extend_from_slice(args);
    xlb(bed, &all);
}

#[test]
fn the_door_end_to_end() {
    require_root();
    let mut options = TestbedOptions::new("ipip", "driver");
    options.agent_args = [
        "--flow-capacity",
        FLOW_CAPACITY,
        "--embryonic-capacity",
        EMBRYONIC_CAPACITY,
    ]
    .map(String::from)
    .to_vec();
    let mut bed = Testbed::up(options).expect("bringing up the test bed");
    source_lists(&bed);
    deny_list(&mut bed);
    survives_sigkill(&mut bed);
    takes_over_an_older_builds_deny_list(&mut bed);
    limits(&bed);
    syn_flood(&bed);
}

/// A VIP's allow and deny lists: who may open connections, counted per VIP and reason.
fn source_lists(bed: &Testbed) {
    assert!(can_connect(bed), "no lists: everyone");
    vip_set(bed, &["--allow-src", "10.111.0.128/25"]);
    assert!(
        !can_connect(bed),
        "cli (10.111.0.2) is outside the allow list"
    );
    assert_eq!(vip_drop(bed, "drop_src_not_allowed"), 1);
    vip_set(bed, &["--allow-src", "10.111.0.0/24"]);
    assert!(can_connect(bed), "inside the allow list");
    vip_set(bed, &["--deny-src", &CLI_ADDR.to_string()]);
    assert!(!can_connect(bed), "denied, although allowed");
    assert_eq!(vip_drop(bed, "drop_src_denied"), 1);
    let list = bed.client().vip_list().expect("vip list --json");
    let v = &list["vips"][0];
    assert_eq!(v["allow_src"], serde_json::json!(["10.111.0.0/24"]), "{v}");
    assert_eq!(v["deny_src"], serde_json::json!(["10.111.0.2/32"]), "{v}");
    vip_set(bed, &["--allow-src", "none", "--deny-src", "none"]);
    assert!(can_connect(bed), "lists cleared");
    let err = bed
        .client()
        .run(&[
            "vip",
            "set",
            &format!("{VIP}:{HTTP_PORT}"),
            "--allow-src",
            "10.111.0.2/24",
        ])
        .expect("xlb vip set");
    assert!(
        !err.success() && err.stderr.contains("host bits set"),
        "{}",
        err.stderr
    );
    println!("DOOR source lists: allow and deny lists applied and cleared");
}

/// `count` prefixes of 198.18.0.0/15 (benchmarking space, not the bed's), one per line.
fn feed(count: u32, extra: &[&str]) -> String {
    let mut text = String::from("# a deny-list feed\n");
    // Host entries and shorter prefixes, alternately: the data path keeps them apart (a hash
    // and a trie).
    for i in 0..count {
        let a = Ipv4Addr::from_bits(Ipv4Addr::new(198, 18, 0, 0).to_bits() + i * 4);
        let len = if i % 2 == 0 { 30 } else { 32 };
        let _ = writeln!(text, "{a}/{len}");
    }
    for e in extra {
        let _ = writeln!(text, "{e}");
    }
    text
}

fn deny_count(bed: &Testbed) -> u64 {
    let v = bed
        .client()
        .json(&["deny", "list"])
        .expect("deny list --json");
    v["count"].as_u64().expect("count")
}

/// The global deny list: every packet of a listed source is dropped, whatever it is for.
fn deny_list(bed: &mut Testbed) {
    let cli = CLI_ADDR.to_string();
    xlb(bed, &["deny", "add", &cli]);
    assert!(!can_connect(bed), "VIP from a denied source");
    assert!(
        bed.lb1_tcp().is_err(),
        "lb1's own service from a denied source"
    );
    assert!(!bed.ping(LB1_ADDR).unwrap(), "ping to lb1");
    let s = stats(bed);
    assert!(
        reason(&s, "drop_deny_list").unwrap() >= 3,
        "{}",
        s["reasons"]
    );
    xlb(bed, &["deny", "del", &cli]);
    assert!(can_connect(bed));
    bed.ping_lb1().expect("ping to lb1 again");
    // The same with a shorter prefix (the trie, where the host entry was in the hash).
    xlb(bed, &["deny", "add", "10.111.0.0/30"]);
    assert!(!can_connect(bed), "VIP from a source in a denied prefix");
    xlb(bed, &["deny", "del", "10.111.0.0/30"]);
    assert!(can_connect(bed));

    let dir = bed.dir.path().to_path_buf();
    let with_client = dir.join("deny-a.txt");
    std::fs::write(&with_client, feed(1000, &["10.111.0.0/30"])).unwrap();
    let out = xlb(bed, &["deny", "load", &with_client.to_string_lossy()]);
    assert!(out.contains("loaded 1001 prefixes"), "{out}");
    assert!(!can_connect(bed), "the loaded list holds cli");
    assert_eq!(stats(bed)["deny_hosts"], 500, "host entries counted apart");
    // A file with one bad line: refused, naming the line, and nothing of it applied.
    let bad = dir.join("deny-bad.txt");
    std::fs::write(
        &bad,
        "# feed\n192.0.2.0/24\n10.111.0.0/30\n\n10.111.0.1/16\n",
    )
    .unwrap();
    let refused = bed
        .client()
        .run(&["deny", "load", &bad.to_string_lossy()])
        .expect("xlb deny load");
    assert!(!refused.success());
    assert!(
        refused.stderr.contains("deny-bad.txt line 5"),
        "{}",
        refused.stderr
    );
    assert_eq!(deny_count(bed), 1001, "unchanged");
    // Kept across a restart, and in force before the new agent attaches.
    bed.restart_agent("lb1").expect("restarting the agent");
    assert_eq!(deny_count(bed), 1001);
    assert!(!can_connect(bed), "still denied after the restart");
    let saved = dir.join("lb1/state/deny.txt");
    let lines = std::fs::read_to_string(&saved).expect("the saved list");
    assert_eq!(lines.lines().filter(|l| !l.starts_with('#')).count(), 1001);
    let without = dir.join("deny-b.txt");
    std::fs::write(&without, feed(1000, &[])).unwrap();
    xlb(bed, &["deny", "load", &without.to_string_lossy()]);
    assert!(can_connect(bed), "the new list lets cli in");
    assert_eq!(deny_count(bed), 1000);
    std::fs::write(&without, "").unwrap();
    xlb(bed, &["deny", "load", &without.to_string_lossy()]);
    assert_eq!(deny_count(bed), 0);
    println!(
        "DOOR deny list: add/del, load of 1001 and 1000 prefixes, bad line refused, restart kept it"
    );
}

/// The door outlives its agent: after a SIGKILL the pinned deny list and a VIP's allow list keep
/// dropping with no agent running, and the next agent takes them over — the deny list made equal
/// to its saved file by difference, in place (the file changed meanwhile, as a restore from a
/// backup would), the allow list read back as it is. IPv6 prefixes go the same way (the bed has
/// no IPv6 client: `e2e.rs` drops one, here the IPv6 trie is taken over).
fn survives_sigkill(bed: &mut Testbed) {
    let cli = CLI_ADDR.to_string();
    xlb(
        bed,
        &["deny", "add", "198.51.100.0/24", &cli, "2001:db8::/32"],
    );
    assert!(!can_connect(bed), "denied");
    // An IPv6 VIP with source lists (no IPv6 client here: its lists are checked in the maps).
    let vip6 = "[fd11:100::1]:80";
    xlb(
        bed,
        &[
            "vip",
            "add",
            vip6,
            "--forward",
            "l2",
            "--allow-src",
            "fd11::/16",
            "--deny-src",
            "fd11:1::/64",
        ],
    );
    bed.kill_agent("lb1").expect("SIGKILL to the agent");
    assert!(
        !can_connect(bed),
        "the deny list drops with no agent running"
    );
    assert!(!bed.ping(LB1_ADDR).unwrap(), "ping to lb1 too");
    let saved = bed.dir.path().join("lb1/state/deny.txt");
    std::fs::write(&saved, "198.51.100.0/24\n203.0.113.0/24\n2001:db8:1::/48\n")
        .expect("writing deny.txt");
    bed.start_after_kill("lb1")
        .expect("starting the agent again");
    assert_eq!(deny_count(bed), 3);
    assert!(can_connect(bed), "cli's entry went with the file's");
    let log = bed.agent_log();
    assert!(
        log.contains("deny list taken over: 2 prefixes added, 2 removed"),
        "{log}"
    );
    let listed = xlb(bed, &["deny", "list"]);
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        ["198.51.100.0/24", "203.0.113.0/24", "2001:db8:1::/48"],
        "IPv4 first, then IPv6"
    );
    assert_eq!(stats(bed)["deny_ipv6"], 1);
    // The IPv6 VIP's lists were read back from their tries, found equal to the saved ones and
    // left as they were: one key each (a list read back as empty would have been written again
    // into the other half, and the old half's keys left behind).
    let door = PinnedDoor::find(bed);
    for name in [maps::VIP_ALLOW6, maps::VIP_DENY6] {
        let map = door.map(name, 1);
        let trie: LpmTrie<MapData, lb_common::VipSrc6Data, u8> =
            LpmTrie::try_from(map).expect(name);
        assert_eq!(trie.keys().count(), 1, "{name} after the takeover");
    }
    xlb(bed, &["vip", "del", vip6]);

    vip_set(bed, &["--allow-src", "10.111.0.128/25"]);
    assert!(!can_connect(bed), "outside the allow list");
    bed.kill_agent("lb1").expect("SIGKILL to the agent");
    assert!(
        !can_connect(bed),
        "the allow list holds with no agent running"
    );
    bed.start_after_kill("lb1")
        .expect("starting the agent again");
    assert!(!can_connect(bed), "and once the new agent took it over");
    let list = bed.client().vip_list().expect("vip list --json");
    assert_eq!(
        list["vips"][0]["allow_src"],
        serde_json::json!(["10.111.0.128/25"])
    );
    vip_set(bed, &["--allow-src", "none"]);
    assert!(can_connect(bed), "the list cleared by the new agent");
    xlb(
        bed,
        &[
            "deny",
            "del",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "2001:db8:1::/48",
        ],
    );
    assert_eq!(deny_count(bed), 0);
    println!(
        "DOOR SIGKILL: deny list and allow list kept dropping without an agent; taken over (deny list by difference)"
    );
}

/// The pinned maps of lb1's data path, as an agent's build leaves them.
struct PinnedDoor {
    dir: PathBuf,
}

impl PinnedDoor {
    /// The pin directory under lb1's bpffs that holds `POLICY` (one data path per interface).
    fn find(bed: &Testbed) -> PinnedDoor {
        let root = bed.dir.path().join("lb1/bpffs/xlb");
        let dir = std::fs::read_dir(&root)
            .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
            .flatten()
            .map(|e| e.path())
            .find(|d| d.join(pin(maps::POLICY, layout::POLICY)).exists())
            .unwrap_or_else(|| panic!("no pinned POLICY under {}", root.display()));
        PinnedDoor { dir }
    }

    /// The map pinned as `name` at layout `version`.
    fn map(&self, name: &str, version: u32) -> Map {
        let data = MapData::from_pin(self.dir.join(pin(name, version)))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        Map::from_map_data(data).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn policy(&self) -> Array<MapData, PolicyState> {
        Array::try_from(self.map(maps::POLICY, layout::POLICY)).expect("POLICY")
    }

    fn hosts(&self, half: usize) -> AyaHashMap<MapData, DenyHostKey, u8> {
        let map = self.map(maps::DENY_HOSTS[half], layout::DENY_HOSTS);
        AyaHashMap::try_from(map).expect("DENY_HOSTS")
    }

    fn host_nets(&self, half: usize) -> Array<MapData, u64> {
        let map = self.map(maps::DENY_HOST_NETS[half], layout::DENY_HOST_NETS);
        Array::try_from(map).expect("DENY_HOST_NETS")
    }

    fn trie(&self, half: usize) -> LpmTrie<MapData, DenyData, u8> {
        LpmTrie::try_from(self.map(maps::DENY[half], layout::DENY)).expect("DENY")
    }
}

/// An upgrade from a build whose deny list had no host hash (every prefix in the trie): with
/// the agent killed, cli's /32 is moved from the live half's hash and bitmap into its trie and
/// the flags say "trie only", as that build left them. The running program keeps dropping cli
/// (it walks the trie); the next agent puts the entry into the hash while the trie still holds
/// it, then, once its program serves, takes it out of the trie and stops walking it.
fn takes_over_an_older_builds_deny_list(bed: &mut Testbed) {
    let cli = CLI_ADDR;
    xlb(bed, &["deny", "add", &cli.to_string()]);
    assert!(!can_connect(bed), "denied");
    bed.kill_agent("lb1").expect("SIGKILL to the agent");
    let door = PinnedDoor::find(bed);
    let mut policy = door.policy();
    let state = policy.get(&0, 0).expect("POLICY");
    let live = (state.deny_live & 1) as usize;
    let key: DenyHostKey = u32::from_ne_bytes(cli.octets());
    let (word, bit) = lb_common::deny_host_net_bit(u32::from(cli));
    door.hosts(live).remove(&key).expect("cli in the live hash");
    let mut nets = door.host_nets(live);
    let w = nets.get(&word, 0).expect("the bitmap word");
    nets.set(word, w & !(1 << bit), 0)
        .expect("clearing cli's /24");
    door.trie(live)
        .insert(&Key::new(32, cli.octets()), 1, 0)
        .expect("cli into the live trie");
    policy
        .set(
            0,
            PolicyState {
                flags: (state.flags & !POLICY_F_DENY_HOSTS) | POLICY_F_DENY_LIST,
                ..state
            },
            0,
        )
        .expect("POLICY as the older build wrote it");
    assert!(
        !can_connect(bed),
        "the trie drops cli with no agent running"
    );

    bed.start_after_kill("lb1")
        .expect("starting the agent again");
    assert!(!can_connect(bed), "denied under the new agent");
    let log = bed.agent_log();
    assert!(
        log.contains("deny list: 1 host entries moved from the trie to the hash"),
        "{log}"
    );
    assert!(door.hosts(live).get(&key, 0).is_ok(), "cli in the hash");
    let w = door.host_nets(live).get(&word, 0).expect("the bitmap word");
    assert_ne!(w & (1 << bit), 0, "cli's /24 marked");
    assert!(
        door.trie(live).get(&Key::new(32, cli.octets()), 0).is_err(),
        "cli out of the trie"
    );
    let flags = door.policy().get(&0, 0).expect("POLICY").flags;
    assert_eq!(
        flags & (POLICY_F_DENY_HOSTS | POLICY_F_DENY_LIST),
        POLICY_F_DENY_HOSTS,
        "the hash looked into, the empty trie no more"
    );
    assert_eq!(deny_count(bed), 1);
    xlb(bed, &["deny", "del", &cli.to_string()]);
    assert!(can_connect(bed), "let in once deleted");
    println!(
        "DOOR older build: a host entry in the trie taken over into the hash, then out of the trie"
    );
}

/// New-flow limits: of 20 connects at once from one source with a burst of 5, exactly 5 get
/// through; a VIP limit counts every source.
fn limits(bed: &Testbed) {
    let before = vip_drop(bed, "drop_rate_limited_src");
    vip_set(bed, &["--src-rate", "1", "--src-burst", "5"]);
    let ok = connects(bed, 20, Duration::from_millis(800));
    assert_eq!(ok, 5, "connects admitted by a burst of 5");
    assert_eq!(vip_drop(bed, "drop_rate_limited_src") - before, 15);
    vip_set(
        bed,
        &["--src-rate", "off", "--vip-rate", "1", "--vip-burst", "4"],
    );
    let ok = connects(bed, 12, Duration::from_millis(800));
    assert_eq!(ok, 4, "connects admitted by a VIP burst of 4");
    assert_eq!(vip_drop(bed, "drop_rate_limited_vip"), 8);
    vip_set(bed, &["--vip-rate", "off"]);
    assert!(can_connect(bed));
    println!("DOOR limits: 5 of 20 (source burst 5), 4 of 12 (VIP burst 4)");
}

/// A bounded SYN flood from spoofed sources (more distinct flows than the flow table holds)
/// while downloads run and a client opens a connection every 20 ms.
fn syn_flood(bed: &Testbed) {
    let rtr = bed.ns("rtr");
    let peer = Topology::peer_iface("lb1");
    // The sink instead of the pass program on rtr's end of lb1's link: it passes lb1's traffic
    // on as the pass program did, and drops the flood there, so the backends never see it.
    xlb_in(rtr, &["xdp-pass", "detach", &peer]).expect("xdp-pass detach");
    let _sink = attach_bench(rtr, &peer, lb_common::programs::BENCH_SINK).expect("the sink");
    let before = stats(bed);
    let downloads = LongDownloads::open(
        bed.ns("cli"),
        target(),
        "/slow",
        DOWNLOADS,
        Arc::new(bed.content.clone()),
        Duration::from_secs(30),
    )
    .expect("opening the downloads");
    let client = ContinuousClient::start(
        bed.ns("cli"),
        target(),
        ClientOptions {
            max_duration: Duration::from_secs(20),
            ..ClientOptions::default()
        },
    );
    thread::sleep(Duration::from_millis(300));
    let frame = eth(
        parse_mac(&mac(bed, "lb1", HOST_IFACE)).unwrap(),
        parse_mac(&mac(bed, "rtr", &peer)).unwrap(),
        0x0800,
        &Ip::to(Ipv4Addr::from(BENCH_FLOOD_NET), VIP, 6).packet(&tcp(1024, HTTP_PORT, SYN, 0)),
    );
    let header = BenchGenHeader::syn_flood(&frame, FLOOD_SOURCES, FLOOD_FLOWS).unwrap();
    let counters = veth_xdp(rtr, &peer).expect("veth counters");
    let flood_start = Instant::now();
    let mut generator = Generator::start(rtr, &peer, frame, header, FLOOD_TIME * 4);
    thread::sleep(FLOOD_TIME);
    let sent = generator.finish().expect("the generator");
    let flood_end = Instant::now();
    let after_counters = veth_xdp(rtr, &peer).expect("veth counters");
    thread::sleep(Duration::from_millis(500));
    let requests = client.stop().expect("the client");
    let finished = downloads.finish().expect("the downloads");
    let after = stats(bed);

    let during = started_between(&requests, flood_start, flood_end);
    let failed = during.iter().filter(|r| r.failed()).count();
    let broken: Vec<_> = finished.iter().filter(|f| f.outcome.is_err()).collect();
    let delta = |what: fn(&Value, &str) -> anyhow::Result<u64>, name: &str| {
        what(&after, name).unwrap() - what(&before, name).unwrap()
    };
    let embryonic_new = delta(event, "embryonic_new");
    println!(
        "DOOR flood: {} SYNs offered in {:.1}s ({:.0}/s), {} forwarded by lb1 and dropped by the sink; \
         {embryonic_new} embryonic flows, flow table {} of {FLOW_CAPACITY}, embryonic table {} of {EMBRYONIC_CAPACITY}; \
         client {} of {} connections ok during the flood; downloads {} of {DOWNLOADS} intact; \
         midflow_miss {}, flow_resteered {}",
        sent.frames,
        FLOOD_TIME.as_secs_f64(),
        sent.frames as f64 / FLOOD_TIME.as_secs_f64(),
        after_counters.drops - counters.drops,
        after["flow_entries"],
        after["embryonic_entries"],
        during.len() - failed,
        during.len(),
        DOWNLOADS - broken.len(),
        delta(event, "midflow_miss"),
        delta(event, "flow_resteered"),
    );
    assert!(
        broken.is_empty(),
        "downloads broken by the flood: {broken:?}"
    );
    assert!(
        u64::from(FLOOD_FLOWS) > 4096 && embryonic_new > 4096,
        "the flood offered more distinct flows than the flow table holds"
    );
    assert!(!during.is_empty());
    assert!(
        failed * 100 <= during.len(),
        "{failed} of {} connections failed during the flood",
        during.len()
    );
    assert_eq!(delta(event, "midflow_miss"), 0);
    assert_eq!(delta(event, "flow_resteered"), 0);
}

fn mac(bed: &Testbed, role: &str, iface: &str) -> String {
    bed.ns(role)
        .sh(&format!("cat /sys/class/net/{iface}/address"))
        .expect("MAC address")
        .trim()
        .to_string()
}
