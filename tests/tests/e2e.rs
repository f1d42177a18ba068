//! End to end through real namespaces (issue 2, tests item 2; issue 15 for IPv6): three nginx
//! backends prepared with `xlb backend-host setup`, `xlb agent` on lb1 configured through the CLI
//! with an IPv4 and an IPv6 VIP, traffic from cli via each VIP and via both at once. Once per
//! forwarding method, with the agent in driver and in generic mode.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use xlb_tests::{
    backend::{BIG, HTTP_PORT, UDP_PORT},
    netns::{self, require_root},
    testbed::{LB1_TCP_ANSWER, Testbed, TestbedOptions},
    topology::{backend_addr, in_family},
    xlb::{backend_counters, counter, find_vip, reason},
};

const NEW_CONNECTIONS: usize = 30;
const KEEPALIVE_REQUESTS: usize = 20;

fn scenario(forward: &str, xdp_mode: &str) {
    require_root();
    let mut bed = Testbed::up(TestbedOptions::new(forward, xdp_mode).dual_stack())
        .expect("bringing up the test bed");
    let namespaces = bed.topo.namespace_names();

    // The same checks through the IPv4 VIP, then through the IPv6 one, on the one bed: each
    // family's VIP has its own ring, counters and flows.
    for v6 in [false, true] {
        bed.use_ipv6(v6);
        serve(&bed, forward, v6);
    }

    // Both families at the same time: new connections to the two VIPs interleaved, each VIP's
    // ring advancing on its own (one more round over the three backends each).
    let backends = bed.backend_names();
    let mut answers: BTreeMap<(bool, String), usize> = BTreeMap::new();
    for i in 0..2 * backends.len() {
        let v6 = i % 2 == 1;
        bed.use_ipv6(v6);
        let b = bed
            .new_connection()
            .unwrap_or_else(|e| panic!("interleaved connection {i} (IPv6: {v6}): {e:#}"));
        *answers.entry((v6, b)).or_default() += 1;
    }
    assert_eq!(
        answers.len(),
        2 * backends.len(),
        "interleaved IPv4 and IPv6 connections, one per backend and family: {answers:?}"
    );
    bed.use_ipv6(false);
    deny_ipv6(&mut bed);

    // Traffic for lb1 itself is not touched.
    assert_eq!(
        bed.lb1_tcp().expect("TCP to lb1's own address"),
        LB1_TCP_ANSWER
    );
    bed.ping_lb1().expect("ping lb1");

    bed.agent_mut()
        .ensure_running()
        .expect("agent still running");
    bed.stop_agent()
        .expect("agent stops cleanly on SIGTERM, leaving the data path");
    for v6 in [false, true] {
        bed.use_ipv6(v6);
        assert_eq!(
            bed.tally_new_connections(3)
                .expect("the data path serves without its agent")
                .values()
                .sum::<usize>(),
            3
        );
    }
    bed.detach_lb("lb1")
        .expect("xlb detach removes the program and every pin");
    bed.teardown_hosts().expect("backend-host teardown");

    drop(bed);
    let left: Vec<String> = netns::list()
        .unwrap()
        .into_iter()
        .filter(|ns| namespaces.contains(ns))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// The global deny list with an IPv6 prefix, through the CLI: cli's IPv6 connections are dropped
/// at the door while its IPv4 ones pass, `xlb stats` counts the prefix as IPv6, and `xlb deny
/// del` lets the client back in. Then the IPv6 VIP's own `--deny-src`, across an agent's crash.
fn deny_ipv6(bed: &mut Testbed) {
    // cli's IPv6 network (CLI_ADDR6 is fd11:1::2).
    let prefix = "fd11:1::/64";
    let before = reason(&bed.client().stats().expect("stats"), "drop_deny_list").unwrap_or(0);
    bed.client()
        .ok(&["deny", "add", prefix])
        .expect("xlb deny add of an IPv6 prefix");
    let listed = bed
        .client()
        .json(&["deny", "list"])
        .expect("deny list --json");
    assert_eq!(listed["prefixes"], serde_json::json!([prefix]), "{listed}");
    bed.use_ipv6(true);
    assert!(bed.new_connection().is_err(), "the IPv6 client is denied");
    bed.use_ipv6(false);
    bed.new_connection()
        .expect("the same host's IPv4 connection passes");
    let stats = bed.client().stats().expect("stats");
    assert_eq!(stats["deny_ipv6"], 1, "{stats}");
    assert!(
        reason(&stats, "drop_deny_list").unwrap_or(0) > before,
        "{}",
        stats["reasons"]
    );
    bed.client()
        .ok(&["deny", "del", prefix])
        .expect("xlb deny del of an IPv6 prefix");
    bed.use_ipv6(true);
    bed.new_connection()
        .expect("the IPv6 client connects again once its prefix is removed");

    // The IPv6 VIP's own deny list, kept across a SIGKILL and taken over by the next agent
    // (read back from the data path's IPv6 source-list tries).
    let vip6 = format!("[{}]:{HTTP_PORT}", bed.vip());
    bed.client()
        .ok(&["vip", "set", &vip6, "--deny-src", prefix])
        .expect("--deny-src with an IPv6 prefix on the IPv6 VIP");
    assert!(bed.new_connection().is_err(), "denied by the VIP's list");
    bed.kill_and_restart_agent("lb1")
        .expect("SIGKILL and restart of the agent");
    assert!(
        bed.new_connection().is_err(),
        "still denied after the takeover"
    );
    let list = bed.client().vip_list().expect("vip list --json");
    let v = list["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"] == serde_json::json!(vip6))
        .unwrap_or_else(|| panic!("{vip6} in {list}"));
    assert_eq!(v["deny_src"], serde_json::json!([prefix]), "{v}");
    bed.client()
        .ok(&["vip", "set", &vip6, "--deny-src", "none"])
        .expect("clearing the list");
    bed.new_connection()
        .expect("the IPv6 client connects again once the VIP's list is cleared");
    bed.use_ipv6(false);
}

/// Round robin, stickiness, 1 MiB each way, UDP and an unknown port through the bed's VIP of one
/// family (`bed.use_ipv6(v6)` was called).
fn serve(bed: &Testbed, forward: &str, v6: bool) {
    let family = if v6 { "IPv6" } else { "IPv4" };
    let vip = bed.vip();
    let backends = bed.backend_names();
    let n = backends.len();

    // Each new connection takes the next ring slot: exactly NEW_CONNECTIONS / n per backend.
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..NEW_CONNECTIONS {
        let b = bed
            .get_backend()
            .unwrap_or_else(|e| panic!("{family}: new connection {i} through the VIP: {e:#}"));
        *answers.entry(b).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = backends
        .iter()
        .map(|b| (b.clone(), NEW_CONNECTIONS / n))
        .collect();
    assert_eq!(
        answers, expected,
        "{family}: {NEW_CONNECTIONS} new connections over {n} backends"
    );

    // The data path counted the same thing.
    let stats = bed.client().stats().expect("xlb stats --json");
    let flows = backend_counters(&stats, vip, HTTP_PORT, "tcp", "new_flows")
        .expect("per-backend new_flows");
    let expected_flows: BTreeMap<_, _> = (1..=n)
        .map(|i| (in_family(backend_addr(i), v6), (NEW_CONNECTIONS / n) as u64))
        .collect();
    assert_eq!(
        flows, expected_flows,
        "{family}: new flows per backend in xlb stats: {stats}"
    );
    let entry = find_vip(&stats, vip, HTTP_PORT, "tcp").expect("VIP in stats");
    assert_eq!(
        counter(entry, "new_flows"),
        Some(NEW_CONNECTIONS as u64),
        "{family}: VIP new_flows: {entry}"
    );

    // One keep-alive connection: every request on it stays on the same backend.
    let keepalive = bed
        .keepalive(KEEPALIVE_REQUESTS)
        .expect("keep-alive requests");
    let on: BTreeSet<&str> = keepalive.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(
        on.len(),
        1,
        "{family}: keep-alive requests spread over {on:?}"
    );
    assert!(
        backends.iter().any(|b| on.contains(b.as_str())),
        "{family}: unexpected answers {on:?}"
    );
    let connects: u64 = keepalive.iter().map(|(_, c)| c).sum();
    assert_eq!(
        connects, 1,
        "{family}: curl opened {connects} connections for the keep-alive requests"
    );

    // 1 MiB each way, MTU 1500 on every link (encapsulation needs the too-big reply for this).
    let frag_before = reason(&stats, "tx_icmp_frag_needed").expect("tx_icmp_frag_needed");
    let body = bed.download().expect("1 MiB download through the VIP");
    bed.check_content(&body).expect("download content");
    let upload = bed.upload().expect("1 MiB upload through the VIP");
    assert!(
        backends.iter().any(|b| upload == format!("{b} {BIG}")),
        "{family}: upload answer {upload:?}, expected \"beN {BIG}\""
    );

    // The big upload needed path-MTU discovery through the encapsulation: xlb answered the
    // full-size segments with ICMP fragmentation-needed (IPv4) or ICMPv6 packet too big (IPv6;
    // the reason counts both). l2 adds no header, so it never needs to.
    let stats = bed.client().stats().expect("xlb stats --json");
    let frag = reason(&stats, "tx_icmp_frag_needed").expect("tx_icmp_frag_needed") - frag_before;
    if forward == "ipip" {
        assert!(
            frag > 0,
            "{family}: 1 MiB upload through the tunnel without a too-big reply: {stats}"
        );
    } else {
        assert_eq!(frag, 0, "{family}: too-big sent for an l2 VIP: {stats}");
    }
    assert!(
        reason(&stats, "fwd_tx").unwrap() > 0,
        "nothing forwarded with XDP_TX: {stats}"
    );

    // UDP VIP: each query is a new flow (new source port), so n queries reach n distinct backends;
    // the answer comes from the VIP (the client socket is connected to it).
    let udp: BTreeSet<String> = (0..n)
        .map(|i| {
            bed.udp()
                .unwrap_or_else(|e| panic!("{family}: UDP query {i} to the VIP: {e:#}"))
        })
        .collect();
    assert_eq!(
        udp,
        backends.iter().cloned().collect(),
        "{family}: UDP answers over {n} new flows"
    );
    let stats = bed.client().stats().expect("xlb stats --json");
    let udp_flows =
        backend_counters(&stats, vip, UDP_PORT, "udp", "new_flows").expect("UDP new_flows");
    assert!(
        udp_flows.values().all(|&f| f == 1),
        "{family}: UDP new flows per backend: {udp_flows:?}"
    );

    // A port of the VIP address that is not configured is dropped, and counted.
    let before = reason(&stats, "drop_unknown_port").expect("drop_unknown_port counter");
    let target = SocketAddr::new(vip, 81);
    let connected = bed
        .ns("cli")
        .enter(move || TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok())
        .unwrap();
    assert!(
        !connected,
        "{family}: a connection to unconfigured VIP port 81 succeeded"
    );
    let after = reason(&bed.client().stats().unwrap(), "drop_unknown_port").unwrap();
    assert!(
        after > before,
        "{family}: drop_unknown_port did not grow ({before} -> {after})"
    );
}

/// A test that fails half-way (agent attached, backends set up) still leaves nothing behind: no
/// namespace, no process, no backend-host setup record.
#[test]
fn a_failing_test_leaves_nothing_behind() {
    require_root();
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let bed =
            Testbed::up(TestbedOptions::new("ipip", "generic")).expect("bringing up the test bed");
        let records: Vec<String> = bed
            .backend_names()
            .iter()
            .map(|b| {
                let inode = std::fs::metadata(format!("/run/netns/{}", bed.ns(b).name()))
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .unwrap();
                format!("/run/xlb/backend-host.{inode}.json")
            })
            .collect();
        for r in &records {
            assert!(std::path::Path::new(r).exists(), "no setup record at {r}");
        }
        seen = Some((bed.topo.namespace_names(), bed.pids(), records));
        panic!("deliberate failure with everything running");
    }));
    assert!(result.is_err());
    let (namespaces, pids, records) = seen.expect("the bed came up");
    let left: Vec<String> = netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| namespaces.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still running"
        );
    }
    for r in records {
        assert!(
            !std::path::Path::new(&r).exists(),
            "setup record {r} left behind"
        );
    }
}

#[test]
fn ipip_driver() {
    scenario("ipip", "driver");
}

#[test]
fn ipip_generic() {
    scenario("ipip", "generic");
}

#[test]
fn l2_driver() {
    scenario("l2", "driver");
}

#[test]
fn l2_generic() {
    scenario("l2", "generic");
}
