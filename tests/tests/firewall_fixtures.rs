//! Packet fixtures of the door (issue 13), through BPF_PROG_TEST_RUN in the fixture namespace
//! (`xlb_tests::fixture`): the global deny list, the VIPs' source allow and deny lists, the
//! new-flow limits with exact counts, and the embryonic table that keeps a SYN flood out of the
//! flow table. Needs root.

use lb_common::FlowStamp;
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};
use xlb::{
    dataplane::{Dataplane, DenyCount},
    model::{
        Forward, Proto, VipSpec,
        net::IpNet,
        policy::{RateLimit, SourcePolicy},
    },
};
use xlb_tests::{
    fixture::*,
    packet::{ACK, Ip, SYN, icmp_message, tcp, udp},
    packet6::{ICMP6_ECHO_REQUEST, ICMP6_NEIGHBOR_SOLICIT, Ip6, NH_ICMPV6, NH_TCP, NH_UDP, icmp6},
};

/// Prefixes of either family (the deny list, a VIP's source lists).
fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// `VIP:80/tcp` (ipip over be1..be3) with `policy`.
fn tcp80(policy: SourcePolicy) -> VipSpec {
    VipSpec {
        policy,
        ..vip(VIP, 80, Proto::Tcp, Forward::Ipip, &BACKENDS)
    }
}

fn syn_from(src: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    inbound(&Ip::to(src, VIP, 6).packet(&tcp(sport, dport, SYN, 0)))
}

fn ack_from(src: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    inbound(&Ip::to(src, VIP, 6).packet(&tcp(sport, dport, ACK, 10)))
}

/// Send `frame` and return the action.
fn send(dp: &Dataplane, ifindex: u32, frame: &[u8]) -> u32 {
    run(dp.balancer().unwrap(), ifindex, frame).0
}

fn reason(dp: &Dataplane, name: &str) -> u64 {
    dp.stats().unwrap().reasons[name]
}

fn event(dp: &Dataplane, name: &str) -> u64 {
    dp.event_stats().unwrap()[name]
}

fn drops_of(dp: &Dataplane, port: u16) -> xlb::dataplane::VipDropCounts {
    let stats = dp.stats().unwrap();
    stats
        .vips
        .iter()
        .find(|v| v.key.addr == VIP && v.key.port == port)
        .unwrap()
        .drops
}

#[test]
fn source_lists_allow_and_deny_by_longest_prefix() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer();
        let inside = Ipv4Addr::new(10, 111, 0, 2);
        let denied = Ipv4Addr::new(10, 111, 0, 200);
        let outside = Ipv4Addr::new(10, 111, 5, 5);
        // Allowed: 10.111.0.0/24, except 10.111.0.128/25.
        dp.apply_vip(
            &tcp80(SourcePolicy {
                allow_src: nets(&["10.111.0.0/24"]),
                deny_src: nets(&["10.111.0.128/25"]),
                ..Default::default()
            }),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(send(&dp, ifindex, &syn_from(inside, 1000, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &syn_from(denied, 1001, 80)), XDP_DROP);
        assert_eq!(send(&dp, ifindex, &syn_from(outside, 1002, 80)), XDP_DROP);
        assert_eq!(
            send(&dp, ifindex, &syn_from(outside, 1003, 8080)),
            XDP_TX,
            "another VIP of the address has no lists"
        );
        assert_eq!(reason(&dp, "drop_src_denied"), 1);
        assert_eq!(reason(&dp, "drop_src_not_allowed"), 1);
        let d = drops_of(&dp, 80);
        assert_eq!((d.src_denied, d.src_not_allowed, d.deny_list), (1, 1, 0));
        assert_eq!(drops_of(&dp, 8080), Default::default());

        // Deny wins over a longer allow.
        dp.apply_vip(
            &tcp80(SourcePolicy {
                allow_src: nets(&["10.111.0.2/32"]),
                deny_src: nets(&["10.111.0.0/16"]),
                ..Default::default()
            }),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(send(&dp, ifindex, &syn_from(inside, 1004, 80)), XDP_DROP);
        assert_eq!(reason(&dp, "drop_src_denied"), 2);
    });
}

/// A TCP packet with `flags` from `src` to `[VIP6]:dport`.
fn tcp6_from(src: Ipv6Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    inbound6(&Ip6::to(src, VIP6, NH_TCP).packet(&tcp(sport, dport, flags, 0)))
}

/// An IPv6 VIP's source lists (`VIP_ALLOW6`, `VIP_DENY6`) decide as an IPv4 VIP's do: by
/// longest prefix, the deny list over the allow list, counted per VIP and reason; another VIP of
/// the address is not affected, and an established flow is checked again after a change.
#[test]
fn an_ipv6_vips_source_lists_allow_and_deny_by_longest_prefix() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer6();
        let inside = CLIENT6;
        let denied: Ipv6Addr = "fd11:1::ff".parse().unwrap();
        let outside: Ipv6Addr = "fd11:5::5".parse().unwrap();
        let tcp80 = |allow: &[&str], deny: &[&str]| VipSpec {
            policy: SourcePolicy {
                allow_src: nets(allow),
                deny_src: nets(deny),
                ..Default::default()
            },
            ..vip(VIP6, 80, Proto::Tcp, Forward::Ipip, &BACKENDS6)
        };
        let v = |dp: &Dataplane, src: Ipv6Addr, sport: u16, dport: u16, flags: u8| {
            send(dp, ifindex, &tcp6_from(src, sport, dport, flags))
        };
        let drops = |dp: &Dataplane| {
            let d = dp
                .stats()
                .unwrap()
                .vips
                .into_iter()
                .find(|v| v.key.addr == VIP6 && v.key.port == 80)
                .unwrap()
                .drops;
            (d.src_denied, d.src_not_allowed)
        };
        // An established flow from `inside` before any list.
        assert_eq!(v(&dp, inside, 7000, 80, SYN), XDP_TX);
        assert_eq!(v(&dp, inside, 7000, 80, ACK), XDP_TX);

        // Allowed: fd11:1::/64, except fd11:1::80/121.
        dp.apply_vip(
            &tcp80(&["fd11:1::/64"], &["fd11:1::80/121"]),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(v(&dp, inside, 7001, 80, SYN), XDP_TX);
        assert_eq!(v(&dp, denied, 7002, 80, SYN), XDP_DROP);
        assert_eq!(v(&dp, outside, 7003, 80, SYN), XDP_DROP);
        assert_eq!(
            v(&dp, outside, 7004, 8080, SYN),
            XDP_TX,
            "another VIP of the address has no lists"
        );
        assert_eq!(drops(&dp), (1, 1));
        assert_eq!(
            v(&dp, inside, 7000, 80, ACK),
            XDP_TX,
            "the established flow passes its new check"
        );

        // Deny wins over a longer allow, also for the established flow's next packet.
        dp.apply_vip(
            &tcp80(&["fd11:1::2/128"], &["fd11:1::/64"]),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(v(&dp, inside, 7005, 80, SYN), XDP_DROP);
        assert_eq!(v(&dp, inside, 7000, 80, ACK), XDP_DROP);
        assert_eq!(drops(&dp), (3, 1));
        assert_eq!(reason(&dp, "drop_src_denied"), 3);
        assert_eq!(reason(&dp, "drop_src_not_allowed"), 1);

        // Cleared: every source again, the established flow on its backend.
        dp.apply_vip(&tcp80(&[], &[]), &BTreeSet::new()).unwrap();
        assert_eq!(v(&dp, outside, 7006, 80, SYN), XDP_TX);
        assert_eq!(v(&dp, inside, 7000, 80, ACK), XDP_TX);
    });
}

/// A list change reaches established flows: each is checked again on its next packet (the
/// policy generation moved), and passes again once the change is undone.
#[test]
fn established_flows_are_checked_again_after_a_policy_change() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer();
        let client = Ipv4Addr::new(10, 111, 0, 2);
        assert_eq!(send(&dp, ifindex, &syn_from(client, 2000, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &ack_from(client, 2000, 80)), XDP_TX);
        let rechecks = event(&dp, "policy_recheck");
        for _ in 0..5 {
            assert_eq!(send(&dp, ifindex, &ack_from(client, 2000, 80)), XDP_TX);
        }
        assert_eq!(
            event(&dp, "policy_recheck"),
            rechecks,
            "no check while the policy is unchanged"
        );
        dp.apply_vip(
            &tcp80(SourcePolicy {
                deny_src: nets(&["10.111.0.0/24"]),
                ..Default::default()
            }),
            &BTreeSet::new(),
        )
        .unwrap();
        for _ in 0..3 {
            assert_eq!(send(&dp, ifindex, &ack_from(client, 2000, 80)), XDP_DROP);
        }
        assert_eq!(reason(&dp, "drop_src_denied"), 3);
        dp.apply_vip(&tcp80(SourcePolicy::default()), &BTreeSet::new())
            .unwrap();
        assert_eq!(send(&dp, ifindex, &ack_from(client, 2000, 80)), XDP_TX);
        assert_eq!(
            dp.flows().unwrap().keys().count(),
            1,
            "the flow kept its entry"
        );
        assert_eq!(event(&dp, "midflow_miss"), 0);
    });
}

#[test]
fn the_deny_list_drops_every_packet_of_a_listed_source() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer();
        let bad = Ipv4Addr::new(10, 111, 0, 9);
        let good = Ipv4Addr::new(10, 111, 0, 2);
        // An established flow from the source before it is listed.
        assert_eq!(send(&dp, ifindex, &syn_from(bad, 3000, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &ack_from(bad, 3000, 80)), XDP_TX);

        // A shorter prefix (the trie) and a host entry (the hash), in half 1.
        let host = Ipv4Addr::new(10, 111, 0, 3);
        let mut deny = dp.deny_maps().unwrap();
        let list = nets(&["10.111.0.8/29", "192.0.2.0/24", "10.111.0.3/32"]);
        deny.fill(1, &list).unwrap();
        dp.set_deny_list(1, DenyCount::of(&list)).unwrap();
        let ping_vip =
            inbound(&Ip::to(bad, VIP, 1).packet(&icmp_message(8, 0, [0, 1, 0, 1], b"x")));
        let ssh_lb = inbound(&Ip::to(bad, LB, 6).packet(&tcp(3001, 22, SYN, 0)));
        let udp_vip = inbound(&Ip::to(bad, VIP, 17).packet(&udp(3002, 53, b"q")));
        let unknown_port = syn_from(bad, 3003, 81);
        for (what, frame) in [
            (
                "the established flow's next packet",
                ack_from(bad, 3000, 80),
            ),
            ("a new flow", syn_from(bad, 3004, 80)),
            ("ping to the VIP", ping_vip),
            ("TCP to the LB's own address", ssh_lb),
            ("UDP to a VIP", udp_vip),
            ("a VIP address's unknown port", unknown_port),
            ("a new flow from the listed host", syn_from(host, 3010, 80)),
            (
                "the listed host to the LB's own address",
                inbound(&Ip::to(host, LB, 6).packet(&tcp(3011, 22, SYN, 0))),
            ),
        ] {
            assert_eq!(send(&dp, ifindex, &frame), XDP_DROP, "{what}");
        }
        assert_eq!(reason(&dp, "drop_deny_list"), 8);
        assert_eq!(drops_of(&dp, 80).deny_list, 3, "the three for VIP:80");
        assert_eq!(drops_of(&dp, 53).deny_list, 1);
        assert_eq!(send(&dp, ifindex, &syn_from(good, 3005, 80)), XDP_TX);
        let ssh_good = inbound(&Ip::to(good, LB, 6).packet(&tcp(3006, 22, SYN, 0)));
        assert_eq!(send(&dp, ifindex, &ssh_good), XDP_PASS);

        // `xlb deny del` of the host entry, in the live half: it passes again, the prefix
        // still drops; then of the prefix.
        deny.clear(1, &nets(&["10.111.0.3/32"])).unwrap();
        let left = nets(&["10.111.0.8/29", "192.0.2.0/24"]);
        dp.set_deny_list(1, DenyCount::of(&left)).unwrap();
        assert_eq!(send(&dp, ifindex, &syn_from(host, 3012, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &syn_from(bad, 3013, 80)), XDP_DROP);
        deny.clear(1, &nets(&["10.111.0.8/29"])).unwrap();
        let left = nets(&["192.0.2.0/24"]);
        dp.set_deny_list(1, DenyCount::of(&left)).unwrap();
        assert_eq!(send(&dp, ifindex, &syn_from(bad, 3014, 80)), XDP_TX);
        // And of a host entry again with no prefix left: only the hash is looked into.
        let hosts = nets(&["10.111.0.9/32"]);
        deny.fill(1, &hosts).unwrap();
        deny.clear(1, &left).unwrap();
        dp.set_deny_list(1, DenyCount::of(&hosts)).unwrap();
        assert_eq!(send(&dp, ifindex, &syn_from(bad, 3015, 80)), XDP_DROP);
        assert_eq!(send(&dp, ifindex, &syn_from(host, 3016, 80)), XDP_TX);

        // A load: the new list (a host entry and a prefix) fills the inactive pair, which no
        // packet sees until the switch; then the old half is emptied.
        let list = nets(&["10.111.0.2/32", "203.0.113.0/24"]);
        let other_src = Ipv4Addr::new(203, 0, 113, 7);
        deny.fill(0, &list).unwrap();
        assert_eq!(send(&dp, ifindex, &syn_from(good, 3007, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &syn_from(other_src, 3017, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &syn_from(bad, 3018, 80)), XDP_DROP);
        dp.set_deny_list(0, DenyCount::of(&list)).unwrap();
        deny.clear(1, &hosts).unwrap();
        assert_eq!(send(&dp, ifindex, &ack_from(bad, 3000, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &syn_from(good, 3019, 80)), XDP_DROP);
        assert_eq!(send(&dp, ifindex, &syn_from(other_src, 3020, 80)), XDP_DROP);
        assert!(deny.read(1).unwrap().is_empty(), "the old pair emptied");
        assert_eq!(deny.read(0).unwrap(), list.iter().copied().collect());
        // An empty list costs no lookup and drops nothing.
        deny.clear(0, &list).unwrap();
        dp.set_deny_list(1, DenyCount::default()).unwrap();
        assert_eq!(send(&dp, ifindex, &syn_from(good, 3008, 80)), XDP_TX);
    });
}

/// IPv6 prefixes on the deny list (the IPv6 trie of the live half) drop an IPv6 source's packets
/// as IPv4 ones drop an IPv4 source's: an established flow's next packet (checked again), new
/// flows, UDP, a VIP address's unknown port, ICMPv6 to a VIP and TCP to the LB's own address;
/// neighbour discovery to the LB still passes. The families stay apart: `::/0` drops no IPv4
/// packet, and an IPv4 list no IPv6 one.
#[test]
fn the_deny_list_drops_listed_ipv6_sources() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer6();
        let v4_client = Ipv4Addr::new(10, 111, 0, 2);
        let other6: Ipv6Addr = "fd11:1::99".parse().unwrap();
        let syn6 = |src: Ipv6Addr, sport: u16, dport: u16| {
            inbound6(&Ip6::to(src, VIP6, NH_TCP).packet(&tcp(sport, dport, SYN, 0)))
        };
        let ack6 = |src: Ipv6Addr, sport: u16| {
            inbound6(&Ip6::to(src, VIP6, NH_TCP).packet(&tcp(sport, 80, ACK, 10)))
        };
        // An established IPv6 flow before the list names its source.
        assert_eq!(send(&dp, ifindex, &syn6(CLIENT6, 6000, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &ack6(CLIENT6, 6000)), XDP_TX);

        // CLIENT6 (fd11:1::2) is in fd11:1::/125, other6 is not; an IPv4 prefix beside it.
        let mut deny = dp.deny_maps().unwrap();
        let list = nets(&["fd11:1::/125", "2001:db8::/32", "192.0.2.0/24"]);
        deny.fill(1, &list).unwrap();
        dp.set_deny_list(1, DenyCount::of(&list)).unwrap();
        let count = DenyCount::of(&list);
        assert_eq!((count.hosts, count.nets, count.nets6), (0, 1, 2));
        assert_eq!(deny.read(1).unwrap(), list.iter().copied().collect());
        let echo = inbound6(&Ip6::to(CLIENT6, VIP6, NH_ICMPV6).packet(&icmp6(
            CLIENT6,
            VIP6,
            ICMP6_ECHO_REQUEST,
            0,
            [0, 1, 0, 1],
            b"x",
        )));
        for (what, frame) in [
            ("the established flow's next packet", ack6(CLIENT6, 6000)),
            ("a new flow", syn6(CLIENT6, 6001, 80)),
            (
                "UDP to a VIP",
                inbound6(&Ip6::to(CLIENT6, VIP6, NH_UDP).packet(&udp(6002, 53, b"q"))),
            ),
            ("a VIP address's unknown port", syn6(CLIENT6, 6003, 81)),
            ("ICMPv6 echo to a VIP", echo),
            ("a VIP packet whose lengths disagree", {
                // 10 bytes of payload claimed, 6 in the frame (the TCP header whole).
                let ip = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(6011, 80, ACK, 10));
                let mut f = inbound6(&ip);
                f.truncate(f.len() - 4);
                f
            }),
            (
                "TCP to the LB's own address",
                inbound6(&Ip6::to(CLIENT6, LB6, NH_TCP).packet(&tcp(6004, 22, SYN, 0))),
            ),
        ] {
            assert_eq!(send(&dp, ifindex, &frame), XDP_DROP, "{what}");
        }
        assert_eq!(reason(&dp, "drop_deny_list"), 7);
        assert_eq!(
            reason(&dp, "drop_bad_length"),
            0,
            "the deny list comes first"
        );
        let vip6_drops = |port: u16| {
            dp.stats()
                .unwrap()
                .vips
                .into_iter()
                .find(|v| v.key.addr == VIP6 && v.key.port == port)
                .unwrap()
                .drops
                .deny_list
        };
        assert_eq!(vip6_drops(80), 2, "the two for [VIP6]:80");
        assert_eq!(vip6_drops(53), 1);
        // Neighbour discovery to the LB is never cut by the list.
        let solicited: Ipv6Addr = "ff02::1:ff00:2".parse().unwrap();
        let mut ns_body = LB6.octets().to_vec();
        ns_body.extend_from_slice(&[1, 1, 0x02, 0, 0, 0, 0, 0x01]);
        let mut ns = Ip6::to(CLIENT6, solicited, NH_ICMPV6);
        ns.hop_limit = 255;
        let ns = inbound6(&ns.packet(&icmp6(
            CLIENT6,
            solicited,
            ICMP6_NEIGHBOR_SOLICIT,
            0,
            [0; 4],
            &ns_body,
        )));
        assert_eq!(send(&dp, ifindex, &ns), XDP_PASS, "neighbour solicitation");
        // Outside the list: IPv6 from elsewhere, and IPv4.
        assert_eq!(send(&dp, ifindex, &syn6(other6, 6005, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &syn_from(v4_client, 6006, 80)), XDP_TX);

        // `::/0` in the live half (as `xlb deny add` writes it): every IPv6 source, no IPv4.
        let all6 = nets(&["::/0"]);
        deny.fill(1, &all6).unwrap();
        let with_all = [list.clone(), all6.clone()].concat();
        dp.set_deny_list(1, DenyCount::of(&with_all)).unwrap();
        assert_eq!(send(&dp, ifindex, &syn6(other6, 6007, 80)), XDP_DROP);
        assert_eq!(send(&dp, ifindex, &syn_from(v4_client, 6008, 80)), XDP_TX);

        // A load of an IPv4-only list into the other half: the IPv6 sources pass again, the
        // established flow keeps its backend, and the old half is emptied.
        let v4_only = nets(&["192.0.2.0/24"]);
        deny.fill(0, &v4_only).unwrap();
        dp.set_deny_list(0, DenyCount::of(&v4_only)).unwrap();
        deny.clear(1, &with_all).unwrap();
        assert!(deny.read(1).unwrap().is_empty(), "the old half emptied");
        assert_eq!(send(&dp, ifindex, &ack6(CLIENT6, 6000)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &syn6(CLIENT6, 6009, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &syn6(other6, 6010, 80)), XDP_TX);
        assert_eq!(reason(&dp, "drop_deny_list"), 8);
    });
}

/// The switch to a new deny list writes `POLICY` whole, but the kernel copies the value without
/// atomicity and the data path reads its words one by one: a packet that read the switch
/// half-written (its new generation, its old half) stamped its flow with that generation after
/// checking the old list. The bump that follows every switch makes such a flow check again.
#[test]
fn a_flow_stamped_while_the_deny_list_switched_is_checked_again() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer();
        let src = Ipv4Addr::new(10, 111, 0, 9);
        assert_eq!(send(&dp, ifindex, &syn_from(src, 3100, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &ack_from(src, 3100, 80)), XDP_TX);
        let before = dp.policy_generation();
        let mut deny = dp.deny_maps().unwrap();
        let list = nets(&["10.111.0.9/32"]);
        deny.fill(1, &list).unwrap();
        dp.set_deny_list(1, DenyCount::of(&list)).unwrap();
        // The switch's own generation (the one after `before`; 0 is skipped).
        let switch = match before.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        assert_ne!(
            dp.policy_generation(),
            switch,
            "the switch is followed by a bump"
        );
        let (key, value) = flow_of_port(&dp, 3100);
        let torn = value.stamped(FlowStamp {
            policy_gen: switch,
            ..value.stamp()
        });
        put_flow(&mut dp, key, torn);
        assert_eq!(
            send(&dp, ifindex, &ack_from(src, 3100, 80)),
            XDP_DROP,
            "checked again, against the new list"
        );
        assert_eq!(reason(&dp, "drop_deny_list"), 1);
    });
}

/// The /24 bitmap in front of the host hash: a listed host is dropped, an unlisted address of
/// the same /24 passes (the bit is set, the hash misses), the bit stays while one host of its /24
/// remains and goes with the last; a load's bits are set in the inactive half only; a second
/// set of handles (an agent taking over) counts the hosts again from the hash.
#[test]
fn the_host_bitmap_follows_the_hosts_of_each_slash_24() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer();
        let (a, b) = (Ipv4Addr::new(10, 111, 0, 3), Ipv4Addr::new(10, 111, 0, 4));
        let neighbour = Ipv4Addr::new(10, 111, 0, 5);
        let keep = Ipv4Addr::new(10, 111, 9, 9);
        let mut deny = dp.deny_maps().unwrap();
        let list = nets(&["10.111.0.3/32", "10.111.0.4/32", "10.111.9.9/32"]);
        deny.fill(1, &list).unwrap();
        dp.set_deny_list(1, DenyCount::of(&list)).unwrap();
        assert_eq!(deny.host_nets(1), 2);
        assert!(deny.host_net_listed(1, neighbour).unwrap());
        assert!(
            !deny.host_net_listed(0, neighbour).unwrap(),
            "half 0 untouched"
        );
        assert_eq!(send(&dp, ifindex, &syn_from(a, 4000, 80)), XDP_DROP);
        assert_eq!(send(&dp, ifindex, &syn_from(b, 4001, 80)), XDP_DROP);
        assert_eq!(
            send(&dp, ifindex, &syn_from(neighbour, 4002, 80)),
            XDP_TX,
            "same /24, not listed: the bit is set, the hash misses"
        );

        // Removing one of the /24's two hosts leaves its bit; the other is still dropped.
        deny.clear(1, &nets(&["10.111.0.3/32"])).unwrap();
        let left = nets(&["10.111.0.4/32", "10.111.9.9/32"]);
        dp.set_deny_list(1, DenyCount::of(&left)).unwrap();
        assert!(deny.host_net_listed(1, a).unwrap());
        assert_eq!(send(&dp, ifindex, &syn_from(a, 4003, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &syn_from(b, 4004, 80)), XDP_DROP);

        // Handles opened afresh count the hosts from the hash: the last host's removal
        // through them clears the bit.
        drop(deny);
        let mut deny = dp.deny_maps().unwrap();
        assert_eq!(deny.host_nets(1), 2);
        deny.clear(1, &nets(&["10.111.0.4/32"])).unwrap();
        let left = nets(&["10.111.9.9/32"]);
        dp.set_deny_list(1, DenyCount::of(&left)).unwrap();
        assert!(
            !deny.host_net_listed(1, b).unwrap(),
            "the /24's last host gone"
        );
        assert!(deny.host_net_listed(1, keep).unwrap());
        assert_eq!(deny.host_nets(1), 1);
        assert_eq!(send(&dp, ifindex, &syn_from(b, 4005, 80)), XDP_TX);
        assert_eq!(send(&dp, ifindex, &syn_from(keep, 4006, 80)), XDP_DROP);

        // A load into half 0: its bits and hosts are not seen before the switch.
        let load = nets(&["10.111.0.5/32"]);
        deny.fill(0, &load).unwrap();
        assert!(deny.host_net_listed(0, neighbour).unwrap());
        assert!(!deny.host_net_listed(1, neighbour).unwrap());
        assert_eq!(send(&dp, ifindex, &syn_from(neighbour, 4007, 80)), XDP_TX);
        dp.set_deny_list(0, DenyCount::of(&load)).unwrap();
        deny.clear(1, &left).unwrap();
        assert_eq!(deny.host_nets(1), 0);
        assert!(
            !deny.host_net_listed(1, keep).unwrap(),
            "the old half's bits cleared"
        );
        assert_eq!(send(&dp, ifindex, &syn_from(neighbour, 4008, 80)), XDP_DROP);
        assert_eq!(send(&dp, ifindex, &syn_from(keep, 4009, 80)), XDP_TX);
        deny.clear(0, &load).unwrap();
        dp.set_deny_list(1, DenyCount::default()).unwrap();
    });
}

/// Issue 13's exact count: rate 10/s, burst 20, 100 SYNs from one source in one burst → exactly
/// 20 pass. Packets of admitted flows are never limited; other sources have buckets of their own.
#[test]
fn a_source_limit_admits_exactly_its_burst() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer();
        dp.apply_vip(
            &tcp80(SourcePolicy {
                src_limit: Some(RateLimit {
                    rate: 10,
                    burst: 20,
                }),
                ..Default::default()
            }),
            &BTreeSet::new(),
        )
        .unwrap();
        let src = Ipv4Addr::new(10, 111, 0, 2);
        let passed: Vec<u16> = (0..100u16)
            .filter(|i| send(&dp, ifindex, &syn_from(src, 4000 + i, 80)) == XDP_TX)
            .collect();
        assert_eq!(passed.len(), 20, "{passed:?}");
        assert_eq!(passed, (0..20).collect::<Vec<_>>(), "the first 20");
        assert_eq!(reason(&dp, "drop_rate_limited_src"), 80);
        assert_eq!(drops_of(&dp, 80).rate_limited_src, 80);
        // Admitted flows: retransmitted SYNs and the rest of the connection pass, unlimited.
        for i in 0..20u16 {
            assert_eq!(send(&dp, ifindex, &syn_from(src, 4000 + i, 80)), XDP_TX);
            for _ in 0..3 {
                assert_eq!(send(&dp, ifindex, &ack_from(src, 4000 + i, 80)), XDP_TX);
            }
        }
        assert_eq!(reason(&dp, "drop_rate_limited_src"), 80, "none of them");
        let other = Ipv4Addr::new(10, 111, 0, 3);
        let passed = (0..30u16)
            .filter(|i| send(&dp, ifindex, &syn_from(other, 5000 + i, 80)) == XDP_TX)
            .count();
        assert_eq!(passed, 20, "another source's own bucket");
        assert_eq!(event(&dp, "rate_limit_contended"), 0);
    });
}

#[test]
fn a_vip_limit_counts_every_source() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer();
        let mut udp53 = vip(VIP, 53, Proto::Udp, Forward::Ipip, &BACKENDS);
        udp53.policy.vip_limit = Some(RateLimit { rate: 1, burst: 30 });
        dp.apply_vip(&udp53, &BTreeSet::new()).unwrap();
        let mut passed = 0;
        for s in 0..5u8 {
            for i in 0..10u16 {
                let dgram = Ip::to(Ipv4Addr::new(10, 111, 0, 10 + s), VIP, 17).packet(&udp(
                    6000 + i,
                    53,
                    b"q",
                ));
                if send(&dp, ifindex, &inbound(&dgram)) == XDP_TX {
                    passed += 1;
                }
            }
        }
        assert_eq!(passed, 30);
        assert_eq!(reason(&dp, "drop_rate_limited_vip"), 20);
        assert_eq!(drops_of(&dp, 53).rate_limited_vip, 20);
        // A changed limit starts with a full bucket.
        udp53.policy.vip_limit = Some(RateLimit { rate: 1, burst: 5 });
        dp.apply_vip(&udp53, &BTreeSet::new()).unwrap();
        let passed = (0..10u16)
            .filter(|i| {
                let dgram =
                    Ip::to(Ipv4Addr::new(10, 111, 0, 99), VIP, 17).packet(&udp(7000 + i, 53, b"q"));
                send(&dp, ifindex, &inbound(&dgram)) == XDP_TX
            })
            .count();
        assert_eq!(passed, 5);
    });
}

/// With peer sync on, a lone ACK is held for a peer's record before it is steered: it pays the
/// VIP's limit when its flow is held (a flood of them enters `EMBRYOS` no faster than SYNs do,
/// and a denied source leaves nothing), and does not pay again when its hold runs out.
#[test]
fn held_lone_acks_are_limited_as_syns_are() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer();
        dp.hold_midflow_misses(true).unwrap();
        let policy = SourcePolicy {
            vip_limit: Some(RateLimit { rate: 1, burst: 3 }),
            deny_src: nets(&["10.111.0.66/32"]),
            ..SourcePolicy::default()
        };
        dp.apply_vip(&tcp80(policy), &BTreeSet::new()).unwrap();
        let flood: Vec<Vec<u8>> = (0..10u16)
            .map(|i| ack_from(Ipv4Addr::new(10, 111, 0, 20), 30000 + i, 80))
            .collect();
        for frame in &flood {
            assert_eq!(send(&dp, ifindex, frame), XDP_DROP);
        }
        assert_eq!(reason(&dp, "drop_midflow_held"), 3, "the burst held");
        assert_eq!(event(&dp, "midflow_held"), 3);
        assert_eq!(reason(&dp, "drop_rate_limited_vip"), 7);
        assert_eq!(drops_of(&dp, 80).rate_limited_vip, 7);
        assert_eq!(
            dp.embryos().unwrap().keys().count(),
            3,
            "only the held enter"
        );
        let denied = ack_from(Ipv4Addr::new(10, 111, 0, 66), 30100, 80);
        assert_eq!(send(&dp, ifindex, &denied), XDP_DROP);
        assert_eq!(reason(&dp, "drop_src_denied"), 1);
        assert_eq!(
            dp.embryos().unwrap().keys().count(),
            3,
            "a denied source leaves nothing"
        );
        // Once the hold is over, a held flow is steered without a token (the bucket is empty).
        std::thread::sleep(std::time::Duration::from_nanos(lb_common::MIDFLOW_HOLD_NS) * 3 / 2);
        assert_eq!(send(&dp, ifindex, &flood[0]), XDP_TX);
        assert_eq!(event(&dp, "midflow_miss"), 1);
        assert_eq!(reason(&dp, "drop_rate_limited_vip"), 7);
    });
}

/// The bucket is shared by the CPUs and taken with compare-and-swap: two CPUs sending SYNs from
/// one source at the same time admit exactly the burst between them.
#[test]
fn limits_are_exact_across_cpus() {
    in_fixture_netns(|ifindex| {
        let cpus = xlb_tests::cpu::allowed().expect("allowed CPUs");
        let mut dp = balancer();
        dp.apply_vip(
            &tcp80(SourcePolicy {
                src_limit: Some(RateLimit {
                    rate: 1,
                    burst: 100,
                }),
                ..Default::default()
            }),
            &BTreeSet::new(),
        )
        .unwrap();
        let dp = std::sync::Arc::new(dp);
        let src = Ipv4Addr::new(10, 111, 0, 2);
        let threads: Vec<_> = cpus
            .iter()
            .take(2)
            .enumerate()
            .map(|(t, &cpu)| {
                let dp = dp.clone();
                std::thread::spawn(move || {
                    xlb_tests::cpu::pin_to(cpu).expect("pin");
                    (0..500u16)
                        .filter(|i| {
                            let sport = 10_000 + t as u16 * 1000 + i;
                            send(&dp, ifindex, &syn_from(src, sport, 80)) == XDP_TX
                        })
                        .count()
                })
            })
            .collect();
        let passed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(passed, 100, "{} CPUs", cpus.len().min(2));
        eprintln!(
            "limits across CPUs: {passed} admitted, {} contended compare-and-swaps",
            event(&dp, "rate_limit_contended")
        );
    });
}

/// New TCP flows wait in the embryonic table: a retransmitted SYN keeps its backend without
/// taking another ring slot, the handshake's ACK moves the flow into the flow table (and reports
/// it), and round robin stays exact.
#[test]
fn embryonic_flows_are_promoted_by_their_first_packet_without_syn() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer();
        let mut events = dp.take_flow_events().expect("ring buffer");
        let client = Ipv4Addr::new(10, 111, 0, 2);
        for i in 0..6u16 {
            let syn = syn_from(client, 8000 + i, 80);
            let (action, out) = run(dp.balancer().unwrap(), ifindex, &syn);
            assert_eq!(action, XDP_TX);
            let inner = &syn[14..];
            assert_eq!(out, encapsulated(inner, usize::from(i % 3)));
            // Retransmitted: the same backend, no new ring slot.
            let (_, again) = run(dp.balancer().unwrap(), ifindex, &syn);
            assert_eq!(again, out);
        }
        assert_eq!(dp.flows().unwrap().keys().count(), 0);
        assert_eq!(dp.embryos().unwrap().keys().count(), 6);
        assert_eq!(event(&dp, "embryonic_new"), 6);
        assert!(events.next().is_none(), "nothing reported before the ACK");
        for i in 0..6u16 {
            let ack = ack_from(client, 8000 + i, 80);
            let (_, out) = run(dp.balancer().unwrap(), ifindex, &ack);
            assert_eq!(out, encapsulated(&ack[14..], usize::from(i % 3)));
        }
        assert_eq!(dp.flows().unwrap().keys().count(), 6);
        assert_eq!(dp.embryos().unwrap().keys().count(), 0);
        assert_eq!(event(&dp, "embryonic_promoted"), 6);
        let mut reported = 0;
        while events.next().is_some() {
            reported += 1;
        }
        assert_eq!(reported, 6, "one event per promoted flow");
        let stats = dp.stats().unwrap();
        let v = stats
            .vips
            .iter()
            .find(|v| v.key.port == 80 && v.key.addr == VIP)
            .unwrap();
        let per_backend: Vec<u64> = v.backends.iter().map(|b| b.counters.new_flows).collect();
        assert_eq!(per_backend, vec![2, 2, 2]);
        assert_eq!(event(&dp, "midflow_miss"), 0);
    });
}

/// A SYN flood from spoofed sources, far larger than the embryonic table, churns that table and
/// leaves the flow table's established entries where they are.
#[test]
fn a_syn_flood_larger_than_the_embryonic_table_leaves_established_flows_intact() {
    in_fixture_netns(|ifindex| {
        const FLOWS: u32 = 1024;
        const EMBRYOS: u32 = 256;
        const FLOOD: u32 = 20 * FLOWS;
        let mut dp = Dataplane::load_unattached_sized(FLOWS, EMBRYOS, Some(LB)).expect("load");
        for spec in fixture_vips() {
            dp.apply_vip(&spec, &BTreeSet::new()).unwrap();
        }
        let client = Ipv4Addr::new(10, 111, 0, 2);
        let established: Vec<u16> = (0..100).map(|i| 20_000 + i).collect();
        let mut backend_of = Vec::new();
        for &sport in &established {
            run(
                dp.balancer().unwrap(),
                ifindex,
                &syn_from(client, sport, 80),
            );
            let (_, out) = run(
                dp.balancer().unwrap(),
                ifindex,
                &ack_from(client, sport, 80),
            );
            backend_of.push(out);
        }
        assert_eq!(dp.flows().unwrap().keys().count(), established.len());
        // The flood: every SYN from another spoofed source (10.111.128.0/17) and port.
        for i in 0..FLOOD {
            let src = Ipv4Addr::from_bits(Ipv4Addr::new(10, 111, 128, 0).to_bits() + (i % 32768));
            let frame = syn_from(src, 1024 + (i / 32768) as u16, 80);
            assert_eq!(send(&dp, ifindex, &frame), XDP_TX);
        }
        assert_eq!(
            dp.flows().unwrap().keys().count(),
            established.len(),
            "the flood put nothing into the flow table"
        );
        assert!(dp.embryos().unwrap().keys().count() <= EMBRYOS as usize);
        for (sport, before) in established.iter().zip(&backend_of) {
            let (_, out) = run(
                dp.balancer().unwrap(),
                ifindex,
                &ack_from(client, *sport, 80),
            );
            assert_eq!(&out, before, "flow {sport} kept its backend");
        }
        // A legitimate handshake in the middle of the flood completes.
        run(
            dp.balancer().unwrap(),
            ifindex,
            &syn_from(client, 30_000, 80),
        );
        run(
            dp.balancer().unwrap(),
            ifindex,
            &ack_from(client, 30_000, 80),
        );
        assert_eq!(dp.flows().unwrap().keys().count(), established.len() + 1);
        assert_eq!(event(&dp, "midflow_miss"), 0);
        assert_eq!(event(&dp, "flow_resteered"), 0);
        assert_eq!(
            event(&dp, "embryonic_new"),
            u64::from(FLOOD) + established.len() as u64 + 1
        );
        assert_eq!(
            event(&dp, "embryonic_promoted"),
            established.len() as u64 + 1
        );
        let stats = dp.stats().unwrap().with_flows(&dp.flow_counts().unwrap());
        assert_eq!(stats.embryo_capacity, EMBRYOS);
        assert!(dp.flow_counts().unwrap().embryos <= u64::from(EMBRYOS));
    });
}
