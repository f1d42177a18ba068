//! Issue 17 end to end: path-MTU discovery through the balancer. The backends answer clients
//! from the VIP (direct server return), so when the way back to the client has a smaller MTU, the
//! router's ICMP "fragmentation needed" goes to the VIP, i.e. to lb1, which must hand it to the
//! backend that owns the flow. Without that the backend keeps sending segments too large for the
//! path and the download stalls (a PMTU black hole).
//!
//! The bed: rtr's end of the link to cli (v-cli) at MTU 1280, everything else 1500 — cli's own
//! eth0 too, so the client still advertises MSS 1460 and the backends send 1500-byte packets,
//! which rtr cannot forward to cli. The backends' path-MTU cache is flushed before the download.
//! Then, the balancer's own answers to ping on the VIP address, and the per-VIP switch.

use std::time::Instant;
use xlb_tests::{
    backend::{BIG, HTTP_PORT, UDP_PORT},
    netns::require_root,
    testbed::{Testbed, TestbedOptions},
    topology::{CLI_ADDR, Topology, VIP},
    xlb::reason,
};

/// The MTU of rtr's link towards the client.
const CLIENT_PATH_MTU: &str = "1280";

fn scenario(forward: &str, xdp_mode: &str) {
    require_root();
    let bed =
        Testbed::up(TestbedOptions::new(forward, xdp_mode)).expect("bringing up the test bed");
    bed.ns("rtr")
        .ip(&[
            "link",
            "set",
            &Topology::peer_iface("cli"),
            "mtu",
            CLIENT_PATH_MTU,
        ])
        .expect("smaller MTU on rtr's link to cli");
    for b in bed.backend_names() {
        bed.ns(&b)
            .ip(&["route", "flush", "cache"])
            .expect("flushing a backend's route cache");
    }
    assert_eq!(
        with_path_mtu(&bed),
        Vec::<String>::new(),
        "no backend knows the smaller path MTU yet"
    );
    let stats = |what: &str| {
        bed.client()
            .stats()
            .unwrap_or_else(|e| panic!("xlb stats ({what}): {e:#}"))
    };
    let counter = |stats: &serde_json::Value, name: &str| {
        reason(stats, name).unwrap_or_else(|e| panic!("{name}: {e:#}"))
    };

    let started = Instant::now();
    let body = bed.download().unwrap_or_else(|e| {
        panic!(
            "1 MiB download through the VIP with MTU {CLIENT_PATH_MTU} on the way back to the \
             client, after {:.1} s: {e:#}\n{}",
            started.elapsed().as_secs_f64(),
            bed.diagnostics()
        )
    });
    let took = started.elapsed();
    bed.check_content(&body).expect("download content");
    let after = stats("after the download");
    let forwarded = counter(&after, "fwd_icmp_frag_needed");
    assert!(
        forwarded > 0,
        "the download completed, yet no fragmentation-needed was forwarded: {after}"
    );
    assert_eq!(
        counter(&after, "drop_icmp_no_flow"),
        0,
        "every error quoted a live flow: {after}"
    );
    // The backend that served it learnt the path MTU towards the client (its route exception).
    let learnt = with_path_mtu(&bed);
    assert_eq!(
        learnt.len(),
        1,
        "backends with path MTU {CLIENT_PATH_MTU} towards {CLI_ADDR}: {learnt:?}"
    );
    println!(
        "PMTU {forward} {xdp_mode}: {BIG} bytes with MTU {CLIENT_PATH_MTU} towards the client in \
         {:.2} s; fwd_icmp_frag_needed {forwarded}; {} now sends {CLIENT_PATH_MTU}-byte packets \
         to the client",
        took.as_secs_f64(),
        learnt[0]
    );

    // The VIP address answers ping itself while a VIP on it allows echo (all do by default).
    assert!(bed.ping(VIP).expect("ping"), "no answer to ping {VIP}");
    let replies = counter(&stats("after ping"), "tx_icmp_echo_reply");
    assert!(replies >= 1, "tx_icmp_echo_reply {replies}");
    let vip_tcp = format!("{VIP}:{HTTP_PORT}");
    let vip_udp = format!("{VIP}:{UDP_PORT}");
    bed.client()
        .ok(&["vip", "set", &vip_tcp, "--icmp-echo", "off"])
        .expect("vip set --icmp-echo off");
    assert!(
        bed.ping(VIP).expect("ping"),
        "{vip_udp} still allows echo on the address"
    );
    bed.client()
        .ok(&[
            "vip",
            "set",
            &vip_udp,
            "--proto",
            "udp",
            "--icmp-echo",
            "off",
        ])
        .expect("vip set --icmp-echo off");
    let dropped = counter(&stats("before the unanswered ping"), "drop_icmp_other");
    assert!(
        !bed.ping(VIP).expect("ping"),
        "ping {VIP} answered with echo off on every VIP of the address"
    );
    let now = stats("after the unanswered ping");
    assert!(counter(&now, "drop_icmp_other") > dropped, "{now}");
    assert_eq!(counter(&now, "tx_icmp_echo_reply"), replies + 1, "{now}");
}

/// The backends whose route to the client (from the VIP) carries the smaller MTU: the path-MTU
/// exception a forwarded fragmentation-needed leaves.
fn with_path_mtu(bed: &Testbed) -> Vec<String> {
    let (cli, vip) = (CLI_ADDR.to_string(), VIP.to_string());
    bed.backend_names()
        .into_iter()
        .filter(|b| {
            bed.ns(b)
                .ip(&["-4", "route", "get", &cli, "from", &vip])
                .expect("ip route get")
                .contains(&format!("mtu {CLIENT_PATH_MTU}"))
        })
        .collect()
}

#[test]
fn ipip_generic() {
    scenario("ipip", "generic");
}

#[test]
fn l2_generic() {
    scenario("l2", "generic");
}

#[test]
fn ipip_driver() {
    scenario("ipip", "driver");
}

#[test]
fn l2_driver() {
    scenario("l2", "driver");
}
