//! A smoke test of the IPv6 data path on real veths: the IPv6 VIP through the dual-stack test bed,
//! `ipip` (IPv6 in IPv6, decapsulated by the backends' XDP) then `l2`, 30 new connections each,
//! next to the IPv4 VIPs the bed serves. The family-parametrised end-to-end suite is
//! `e2e.rs`'s business; this one only shows the path works end to end.

use std::collections::BTreeMap;
use xlb_tests::{
    backend::{BIG, HTTP_PORT},
    netns::require_root,
    testbed::{Testbed, TestbedOptions},
    topology::{VIP6, backend_addr, twin6},
    xlb::{counter, find_vip, reason},
};

const NEW_CONNECTIONS: usize = 30;

/// `n` new connections to `http://[VIP6]/` from cli: how many each backend answered.
fn tally6(bed: &Testbed, n: usize) -> BTreeMap<String, usize> {
    let url = format!("http://[{VIP6}]/");
    let mut answers = BTreeMap::new();
    for i in 0..n {
        let out = bed
            .curl(&["-g", &url])
            .and_then(|o| o.checked())
            .unwrap_or_else(|e| panic!("new IPv6 connection {i} through the VIP: {e:#}"));
        *answers.entry(out.stdout.trim().to_string()).or_default() += 1;
    }
    answers
}

#[test]
fn ipv6_vip_ipip_then_l2_through_the_test_bed() {
    require_root();
    let bed = Testbed::up(TestbedOptions::new("ipip", "driver")).expect("bringing up the test bed");
    let backends = bed.backend_names();
    let vip = format!("[{VIP6}]:{HTTP_PORT}");
    let expected: BTreeMap<String, usize> = backends
        .iter()
        .map(|b| (b.clone(), NEW_CONNECTIONS / backends.len()))
        .collect();
    for forward in ["ipip", "l2"] {
        let xlb = bed.client();
        xlb.ok(&["vip", "add", &vip, "--proto", "tcp", "--forward", forward])
            .unwrap_or_else(|e| panic!("{forward}: xlb vip add {vip}: {e:#}"));
        for i in 1..=backends.len() {
            let addr = twin6(backend_addr(i)).to_string();
            xlb.ok(&["backend", "add", &vip, &addr, "--proto", "tcp"])
                .unwrap_or_else(|e| panic!("{forward}: xlb backend add {addr}: {e:#}"));
        }
        assert_eq!(
            tally6(&bed, NEW_CONNECTIONS),
            expected,
            "{forward}: {NEW_CONNECTIONS} new IPv6 connections over the backends"
        );
        let stats = xlb.stats().expect("xlb stats --json");
        let v = find_vip(&stats, VIP6, HTTP_PORT, "tcp").expect("the IPv6 VIP in stats");
        assert_eq!(
            counter(v, "new_flows"),
            Some(NEW_CONNECTIONS as u64),
            "{forward}: {v}"
        );
        assert!(reason(&stats, "fwd_tx").unwrap() > 0, "{stats}");
        // 1 MiB up, MTU 1500 everywhere: over IPv6 in IPv6 the full-size segments only get
        // through after the balancer's ICMPv6 packet too big.
        let file = bed.dir.path().join("upload6.bin");
        std::fs::write(&file, &bed.content).unwrap();
        let upload = bed
            .curl(&[
                "-g",
                "-H",
                "Expect:",
                "--data-binary",
                &format!("@{}", file.display()),
                &format!("http://[{VIP6}]/upload"),
            ])
            .and_then(|o| o.checked())
            .unwrap_or_else(|e| panic!("{forward}: 1 MiB upload through the IPv6 VIP: {e:#}"));
        assert!(
            backends
                .iter()
                .any(|b| upload.stdout.trim() == format!("{b} {BIG}")),
            "{forward}: upload answer {:?}",
            upload.stdout
        );
        let too_big = reason(&xlb.stats().unwrap(), "tx_icmp_frag_needed").unwrap();
        if forward == "ipip" {
            assert!(too_big > 0, "1 MiB over ip6ip6 without a packet too big");
        }
        xlb.ok(&["vip", "del", &vip, "--proto", "tcp"])
            .unwrap_or_else(|e| panic!("{forward}: xlb vip del: {e:#}"));
    }
    // The IPv4 VIP of the same bed served all along.
    assert_eq!(
        bed.tally_new_connections(3)
            .expect("IPv4 connections")
            .values()
            .sum::<usize>(),
        3
    );
}
