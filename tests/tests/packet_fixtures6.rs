//! Packet-in/packet-out fixtures for the balancer's IPv6 data path, in the table style of
//! `packet_fixtures.rs` (same namespace, which has IPv6 too, and the same harness): IPv6 in
//! IPv6 byte for byte, `l2`, stickiness, round robin, extension headers skipped and refused,
//! fragments, truncation, ICMPv6 packet too big, ICMPv6 to a VIP, IPv4 in IPv6, and IPv6 that
//! is not for a VIP passed untouched. Needs root.

use lb_common::{Addr, FlowEvent, FlowKey};
use std::net::Ipv6Addr;
use xlb::model::{Forward, Proto};
use xlb_tests::{
    fixture::*,
    packet::{ACK, SYN, eth, tcp, udp},
    packet6::{
        ETH_P_IPV6, Ext, ICMP6_DEST_UNREACH, ICMP6_ECHO_REPLY, ICMP6_ECHO_REQUEST,
        ICMP6_NEIGHBOR_SOLICIT, ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED, Ip6, NH_ESP, NH_ICMPV6,
        NH_IPIP, NH_TCP, NH_UDP, icmp6,
    },
};

const ICMP6_NEIGHBOR_ADVERT: u8 = 136;

/// The counters of the IPv6 VIP's TCP service on `port`.
fn vip6_counters(dp: &xlb::dataplane::Dataplane, port: u16) -> xlb::dataplane::VipStats {
    dp.stats()
        .unwrap()
        .vips
        .into_iter()
        .find(|v| v.key.port == port && v.key.addr == VIP6)
        .unwrap()
}

#[test]
fn ip6ip6_syn_is_encapsulated_exactly_and_the_flow_sticks() {
    in_fixture_netns(|ifindex| {
        // One CPU: the next-hop cache is per CPU; the established packets below find be1's
        // cached (asserted at the end), so they leave through `ipip_exit`, except the one with
        // bytes after it, which the exit leaves to the general way to trim.
        xlb_tests::cpu::pin_to_one().expect("pin to one CPU");
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        let syn = client_syn6(40000, 80);
        assert_eq!(syn.len(), 60);
        // Spelled out byte for byte: version 6, traffic class 0, flow label 0, payload length
        // 60 (the whole inner packet), next header 41, hop limit 64, fd11:2::2 → fd11:2::11.
        let mut exact = vec![
            0x02, 0, 0, 0, 0x01, 0x11, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd, // eth
            0x60, 0, 0, 0, 0, 60, 41, 64, // outer fixed fields
            0xfd, 0x11, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, // fd11:2::2
            0xfd, 0x11, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11, // fd11:2::11
        ];
        exact.extend_from_slice(&syn);
        let ack = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(40000, 80, ACK, 100));
        let mut tc = Ip6::to(CLIENT6, VIP6, NH_TCP);
        tc.traffic_class = 0xb8;
        let marked = tc.packet(&tcp(40000, 80, ACK, 10));
        // Bytes after the IP packet (a trailer): not carried into the tunnel.
        let mut trailed = inbound6(&marked);
        trailed.extend_from_slice(&[0xee; 6]);
        check(
            prog,
            ifindex,
            &[
                Fixture::tx(
                    "SYN to [VIP6]:80 → IPv6 in IPv6 to be1, XDP_TX",
                    inbound6(&syn),
                    exact,
                ),
                Fixture::tx(
                    "next packet of the flow → same backend (be1)",
                    inbound6(&ack),
                    encapsulated6(&ack, 0),
                ),
                Fixture::tx(
                    "retransmitted SYN of the flow → still be1",
                    inbound6(&syn),
                    encapsulated6(&syn, 0),
                ),
                Fixture::tx(
                    "traffic class 0xb8 → copied to the outer header",
                    inbound6(&marked),
                    encapsulated6(&marked, 0),
                ),
                Fixture::tx(
                    "6 bytes after the packet → left out of the tunnel",
                    trailed,
                    encapsulated6(&marked, 0),
                ),
            ],
        );
        assert_eq!(
            &encapsulated6(&marked, 0)[14..16],
            &[0x6b, 0x80],
            "outer traffic class"
        );
        let flows = dp.flows().unwrap();
        assert_eq!(flows.keys().count(), 1, "one flow entry");
        let v = vip6_counters(&dp, 80);
        assert_eq!(v.counters.new_flows, 1);
        assert_eq!(v.counters.packets, 5);
        assert_eq!(v.backends[0].counters.packets, 5);
        let stats = dp.stats().unwrap();
        assert_eq!(stats.reasons["fwd_tx"], 5);
        assert_eq!(
            stats.events["nexthop_lookup"], 1,
            "be1's next hop, cached after the SYN"
        );
        // The IPv4 VIP on the same port is another service: untouched.
        assert!(
            stats
                .vips
                .iter()
                .any(|v| v.key.port == 80 && v.key.addr == VIP && v.counters.packets == 0)
        );
    });
}

#[test]
fn six_new_ipv6_flows_go_round_robin_and_ipv4_alongside_keeps_its_own_ring() {
    in_fixture_netns(|ifindex| {
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        let fixtures: Vec<Fixture> = (0..6)
            .map(|i| {
                let syn = client_syn6(41000 + i as u16, 80);
                Fixture::tx(
                    "new IPv6 flow → next backend in the ring",
                    inbound6(&syn),
                    encapsulated6(&syn, i % 3),
                )
            })
            .collect();
        check(prog, ifindex, &fixtures);
        // An IPv4 flow to the IPv4 VIP in between takes its own ring's first slot.
        let syn4 = client_syn(41000, 80);
        check(
            prog,
            ifindex,
            &[Fixture::tx(
                "IPv4 flow → be1 over IPv4",
                inbound(&syn4),
                encapsulated(&syn4, 0),
            )],
        );
        let fixtures: Vec<Fixture> = (0..3)
            .map(|i| {
                let dgram =
                    Ip6::to(CLIENT6, VIP6, NH_UDP).packet(&udp(5000 + i as u16, 53, b"query"));
                Fixture::tx(
                    "UDP flow → next backend",
                    inbound6(&dgram),
                    encapsulated6(&dgram, i),
                )
            })
            .collect();
        check(prog, ifindex, &fixtures);
        let per_backend: Vec<u64> = vip6_counters(&dp, 80)
            .backends
            .iter()
            .map(|b| b.counters.new_flows)
            .collect();
        assert_eq!(per_backend, vec![2, 2, 2]);
        // One table for both families: the UDP flows are in it, the SYNs (both families) wait
        // in the embryonic table.
        assert_eq!(dp.flows().unwrap().keys().count(), 3);
        assert_eq!(dp.embryos().unwrap().keys().count(), 6 + 1);
    });
}

#[test]
fn ipv6_l2_rewrites_only_the_destination_mac() {
    in_fixture_netns(|ifindex| {
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        let syn = client_syn6(42000, 8080);
        let syn2 = client_syn6(42001, 8080);
        let unresolved = Ip6::to(CLIENT6, VIP6_NO_NEIGH, NH_TCP).packet(&tcp(42002, 8080, SYN, 0));
        let unresolved_ipip =
            Ip6::to(CLIENT6, VIP6_NO_NEIGH, NH_TCP).packet(&tcp(42003, 80, SYN, 0));
        let mut to_kernel = vec![0x60, 0, 0, 0];
        to_kernel.extend_from_slice(&(unresolved_ipip.len() as u16).to_be_bytes());
        to_kernel.extend_from_slice(&[41, 64]);
        to_kernel.extend_from_slice(&LB6.octets());
        to_kernel.extend_from_slice(&UNRESOLVED6.octets());
        to_kernel.extend_from_slice(&unresolved_ipip);
        check(
            prog,
            ifindex,
            &[
                Fixture::tx(
                    "l2: SYN to [VIP6]:8080 → be1's MAC, packet unchanged, XDP_TX",
                    inbound6(&syn),
                    eth(backend_mac(0), LB_MAC, ETH_P_IPV6, &syn),
                ),
                Fixture::tx(
                    "l2: second flow → be2's MAC",
                    inbound6(&syn2),
                    eth(backend_mac(1), LB_MAC, ETH_P_IPV6, &syn2),
                ),
                Fixture::untouched(
                    "l2 to a backend without a neighbour entry → drop",
                    inbound6(&unresolved),
                    XDP_DROP,
                ),
                Fixture {
                    description: "ipip to a backend without a neighbour entry → encapsulated, to the kernel",
                    input: inbound6(&unresolved_ipip),
                    expected: Some(eth(LB_MAC, RTR_MAC, ETH_P_IPV6, &to_kernel)),
                    action: XDP_PASS,
                },
            ],
        );
        let r = dp.stats().unwrap().reasons;
        assert_eq!(r["drop_no_neigh"], 1);
        assert_eq!(r["pass_no_neigh"], 1);
    });
}

#[test]
fn ipv4_vip_over_ipv6_backends_is_ipv4_in_ipv6() {
    in_fixture_netns(|ifindex| {
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        let syn = client_syn(43000, 9080);
        let syn2 = client_syn(43001, 9080);
        let mut exact = vec![
            0x02, 0, 0, 0, 0x01, 0x11, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd, // eth, IPv6
            0x60, 0, 0, 0, 0, 40, 4, 64, // payload 40 (the IPv4 SYN), next header 4
            0xfd, 0x11, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, // fd11:2::2
            0xfd, 0x11, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11, // fd11:2::11
        ];
        exact.extend_from_slice(&syn);
        let mut second = outer_header6(syn2.len(), BACKENDS6[1], NH_IPIP, 0);
        second.extend_from_slice(&syn2);
        check(
            prog,
            ifindex,
            &[
                Fixture::tx(
                    "SYN to VIP:9080 → IPv4 in IPv6 to be1",
                    inbound(&syn),
                    exact,
                ),
                Fixture::tx(
                    "second flow → be2",
                    inbound(&syn2),
                    eth(backend_mac(1), LB_MAC, ETH_P_IPV6, &second),
                ),
            ],
        );
        // Too big once in IPv6: IPv4's fragmentation needed with the MTU less the 40-byte outer
        // header, or a drop without DF.
        let big = xlb_tests::packet::Ip::to(CLIENT, VIP, 6).packet(&tcp(43002, 9080, ACK, 1460));
        let mut no_df = xlb_tests::packet::Ip::to(CLIENT, VIP, 6);
        no_df.frag = 0;
        let big_no_df = no_df.packet(&tcp(43003, 9080, ACK, 1460));
        check(
            prog,
            ifindex,
            &[
                Fixture::tx(
                    "1500-byte DF packet → ICMP frag-needed (MTU 1460)",
                    inbound(&big),
                    frag_needed_reply(&big, 1460),
                ),
                Fixture::untouched(
                    "1500-byte packet without DF → drop",
                    inbound(&big_no_df),
                    XDP_DROP,
                ),
            ],
        );
    });
}

/// A TCP SYN from the client to [VIP6]:80 behind `ip`'s extension headers.
fn syn_behind(ip: Ip6, sport: u16) -> Vec<u8> {
    ip.packet(&tcp(sport, 80, SYN, 0))
}

#[test]
fn extension_headers_are_skipped_or_refused_by_kind() {
    in_fixture_netns(|ifindex| {
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        let base = || Ip6::to(CLIENT6, VIP6, NH_TCP);
        let rt = |left| Ext::Routing {
            segments_left: left,
            units: 2,
        };
        let skipped = [
            ("Hop-by-Hop first", base().with(Ext::HopByHop { units: 0 })),
            (
                "Destination Options",
                base().with(Ext::DestOpts { units: 1 }),
            ),
            ("Routing, segments left 0", base().with(rt(0))),
            (
                "four: HBH, Destination Options, Routing, Destination Options",
                base()
                    .with(Ext::HopByHop { units: 2 })
                    .with(Ext::DestOpts { units: 0 })
                    .with(rt(0))
                    .with(Ext::DestOpts { units: 20 }),
            ),
        ];
        let mut fixtures = Vec::new();
        for (i, (what, ip)) in skipped.into_iter().enumerate() {
            let p = syn_behind(ip, 44000 + i as u16);
            fixtures.push(Fixture::tx(what, inbound6(&p), encapsulated6(&p, i % 3)));
        }
        let refused = [
            (
                "Hop-by-Hop not first",
                base()
                    .with(Ext::DestOpts { units: 0 })
                    .with(Ext::HopByHop { units: 0 }),
            ),
            ("Routing with segments left", base().with(rt(1))),
            ("AH", base().with(Ext::Ah)),
            (
                "a fifth extension header",
                base()
                    .with(Ext::DestOpts { units: 0 })
                    .with(Ext::DestOpts { units: 0 })
                    .with(Ext::DestOpts { units: 0 })
                    .with(Ext::DestOpts { units: 0 })
                    .with(Ext::DestOpts { units: 0 }),
            ),
        ];
        for (i, (what, ip)) in refused.into_iter().enumerate() {
            fixtures.push(Fixture::untouched(
                what,
                inbound6(&syn_behind(ip, 44100 + i as u16)),
                XDP_DROP,
            ));
        }
        fixtures.push(Fixture::untouched(
            "ESP",
            inbound6(&Ip6::to(CLIENT6, VIP6, NH_ESP).packet(&[0; 24])),
            XDP_DROP,
        ));
        // The same refused kinds to an address that is not a VIP's are not ours to judge.
        fixtures.push(Fixture::untouched(
            "Routing with segments left to the LB → pass",
            inbound6(
                &Ip6::to(CLIENT6, LB6, NH_TCP)
                    .with(rt(1))
                    .packet(&tcp(44200, 22, SYN, 0)),
            ),
            XDP_PASS,
        ));
        check(prog, ifindex, &fixtures);
        let r = dp.stats().unwrap().reasons;
        assert_eq!(r["drop_ext_header"], 5);
        assert_eq!(r["pass_not_vip"], 1);
        assert_eq!(
            dp.embryos().unwrap().keys().count(),
            4,
            "only the skipped kinds"
        );
    });
}

#[test]
fn ipv6_fragments_to_a_vip_are_dropped_and_counted() {
    in_fixture_netns(|ifindex| {
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        let frag = |offset, more| {
            Ip6::to(CLIENT6, VIP6, NH_TCP).with(Ext::Fragment {
                offset,
                more,
                id: 0x1234,
            })
        };
        let fixtures = [
            ("first fragment", frag(0, true)),
            ("atomic fragment", frag(0, false)),
            ("non-first fragment", frag(100, false)),
            (
                "fragment behind a Destination Options header",
                Ip6::to(CLIENT6, VIP6, NH_TCP)
                    .with(Ext::DestOpts { units: 0 })
                    .with(Ext::Fragment {
                        offset: 0,
                        more: true,
                        id: 1,
                    }),
            ),
        ]
        .into_iter()
        .map(|(what, ip)| {
            Fixture::untouched(
                what,
                inbound6(&ip.packet(&tcp(45000, 80, SYN, 0))),
                XDP_DROP,
            )
        })
        .collect::<Vec<_>>();
        check(prog, ifindex, &fixtures);
        let frag_to_lb = Ip6::to(CLIENT6, LB6, NH_UDP).with(Ext::Fragment {
            offset: 0,
            more: true,
            id: 9,
        });
        check(
            prog,
            ifindex,
            &[Fixture::untouched(
                "fragment to the LB → pass (the kernel reassembles)",
                inbound6(&frag_to_lb.packet(&udp(45001, 53, b"x"))),
                XDP_PASS,
            )],
        );
        let r = dp.stats().unwrap().reasons;
        assert_eq!(r["drop_fragment"], 4);
        assert_eq!(dp.flows().unwrap().keys().count(), 0);
    });
}

#[test]
fn truncated_ipv6_at_every_layer_never_aborts() {
    in_fixture_netns(|ifindex| {
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        let syn = inbound6(&syn_behind(
            Ip6::to(CLIENT6, VIP6, NH_TCP)
                .with(Ext::HopByHop { units: 0 })
                .with(Ext::DestOpts { units: 1 }),
            46000,
        ));
        // 14 Ethernet + 40 fixed + 8 HBH + 16 Destination Options + 20 TCP.
        assert_eq!(syn.len(), 98);
        let mut passed = 0;
        let mut dropped = 0;
        for cut in 14..syn.len() {
            let (action, out) = run(prog, ifindex, &syn[..cut]);
            // Inside the fixed header it cannot be judged: passed; past it, the VIP address is
            // known and a cut extension or TCP header is dropped.
            if cut < 54 {
                assert_eq!(action, XDP_PASS, "cut at {cut}");
                passed += 1;
            } else {
                assert_eq!(action, XDP_DROP, "cut at {cut}");
                dropped += 1;
            }
            assert_eq!(out, syn[..cut].to_vec(), "cut at {cut}: untouched");
        }
        // The payload length claims more than the frame holds, or less than the headers.
        let mut long = syn.clone();
        long[18..20].copy_from_slice(&100u16.to_be_bytes());
        let mut short = syn.clone();
        short[18..20].copy_from_slice(&30u16.to_be_bytes());
        check(
            prog,
            ifindex,
            &[
                Fixture::untouched("payload length past the frame → drop", long, XDP_DROP),
                Fixture::untouched(
                    "payload length shorter than the headers → drop",
                    short,
                    XDP_DROP,
                ),
            ],
        );
        let r = dp.stats().unwrap().reasons;
        assert_eq!(r["pass_malformed"], passed);
        assert_eq!(r["drop_malformed_l4"], dropped);
        assert_eq!(r["drop_bad_length"], 2);
        assert_eq!(dp.flows().unwrap().keys().count(), 0);
    });
}

/// The packet-too-big error the balancer must send for `invoking` (an IPv6 packet from the
/// client to `vip`), announcing `mtu`: RFC 4443 §3.2, quoting the first 1232 bytes.
fn packet_too_big(invoking: &[u8], vip: Ipv6Addr, mtu: u32) -> Vec<u8> {
    let body = &invoking[..1232];
    let msg = icmp6(
        vip,
        CLIENT6,
        ICMP6_PACKET_TOO_BIG,
        0,
        mtu.to_be_bytes(),
        body,
    );
    let mut ip = Ip6::to(vip, CLIENT6, NH_ICMPV6);
    ip.hop_limit = 64;
    ip.flow_label = 0;
    eth(RTR_MAC, LB_MAC, ETH_P_IPV6, &ip.packet(&msg))
}

#[test]
fn oversized_ipv6_gets_packet_too_big_exactly() {
    in_fixture_netns(|ifindex| {
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        // 1500 bytes: fits the link, not the link plus a 40-byte outer header.
        let big = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(47000, 80, ACK, 1440));
        assert_eq!(big.len(), 1500);
        let expected = packet_too_big(&big, VIP6, 1460);
        assert_eq!(expected.len(), 14 + 1280);
        let small = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(47001, 80, ACK, 1400));
        check(
            prog,
            ifindex,
            &[
                Fixture::tx(
                    "1500-byte packet → ICMPv6 packet too big (MTU 1460) back to the client",
                    inbound6(&big),
                    expected,
                ),
                Fixture::tx(
                    "1460-byte packet → fits once encapsulated",
                    inbound6(&small),
                    encapsulated6(&small, 1),
                ),
            ],
        );
        let r = dp.stats().unwrap().reasons;
        assert_eq!(r["tx_icmp_frag_needed"], 1);
    });
}

/// The same answer for a packet of an established flow, whose next hop is cached (pinned to one
/// CPU: the cache is per CPU): `ipip_exit` checks the cached MTU for the outer packet, 40 bytes
/// more, and leaves a packet that would not fit to the general way, which answers it; one that
/// fits once encapsulated still leaves through the exit.
#[test]
fn established_ipv6_too_big_once_encapsulated_gets_packet_too_big() {
    in_fixture_netns(|ifindex| {
        xlb_tests::cpu::pin_to_one().expect("pin to one CPU");
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        let syn = client_syn6(47100, 80);
        let ack = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(47100, 80, ACK, 0));
        // 1460 bytes: 1500 once encapsulated, the link's MTU; 1461 would be one byte over.
        let fits = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(47100, 80, ACK, 1400));
        assert_eq!(fits.len(), 1460);
        let big = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(47100, 80, ACK, 1401));
        check(
            prog,
            ifindex,
            &[
                Fixture::tx("SYN → be1", inbound6(&syn), encapsulated6(&syn, 0)),
                Fixture::tx(
                    "ACK → be1 (the flow moves into FLOWS)",
                    inbound6(&ack),
                    encapsulated6(&ack, 0),
                ),
                Fixture::tx(
                    "established, 1460 bytes → fits once encapsulated",
                    inbound6(&fits),
                    encapsulated6(&fits, 0),
                ),
                Fixture::tx(
                    "established, 1461 bytes → ICMPv6 packet too big (MTU 1460)",
                    inbound6(&big),
                    packet_too_big(&big, VIP6, 1460),
                ),
            ],
        );
        let stats = dp.stats().unwrap();
        assert_eq!(stats.reasons["tx_icmp_frag_needed"], 1);
        // The SYN asked the FIB, the packets that fit found the next hop cached, the one too big
        // for the cached MTU asked again (which answered with the MTU).
        assert_eq!(stats.events["nexthop_lookup"], 2);
    });
}

/// An ICMPv6 error from the router to `vip` quoting `quoted`.
fn error_from_router(vip: Ipv6Addr, kind: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let msg = icmp6(ROUTER6, vip, kind, 0, rest, quoted);
    Ip6::to(ROUTER6, vip, NH_ICMPV6).packet(&msg)
}

#[test]
fn icmpv6_to_a_vip_is_forwarded_answered_or_dropped() {
    in_fixture_netns(|ifindex| {
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        // A flow to be2 (the second new flow).
        let first = client_syn6(48000, 80);
        let syn = client_syn6(48001, 80);
        check(
            prog,
            ifindex,
            &[
                Fixture::tx("flow 1 → be1", inbound6(&first), encapsulated6(&first, 0)),
                Fixture::tx("flow 2 → be2", inbound6(&syn), encapsulated6(&syn, 1)),
            ],
        );
        // be2's reply to the client, as a router on the way back quotes it.
        let reply = Ip6::to(VIP6, CLIENT6, NH_TCP).packet(&tcp(80, 48001, ACK, 1400));
        let ptb = error_from_router(
            VIP6,
            ICMP6_PACKET_TOO_BIG,
            1280u32.to_be_bytes(),
            &reply[..1232],
        );
        let unreach = error_from_router(VIP6, ICMP6_DEST_UNREACH, [0; 4], &reply[..48]);
        let other_flow = Ip6::to(VIP6, CLIENT6, NH_TCP).packet(&tcp(80, 48999, ACK, 0));
        let no_flow = error_from_router(
            VIP6,
            ICMP6_PACKET_TOO_BIG,
            1280u32.to_be_bytes(),
            &other_flow,
        );
        let time_exceeded = error_from_router(VIP6, ICMP6_TIME_EXCEEDED, [0; 4], &reply[..48]);
        let echo = Ip6::to(CLIENT6, VIP6, NH_ICMPV6).packet(&icmp6(
            CLIENT6,
            VIP6,
            ICMP6_ECHO_REQUEST,
            0,
            [0x12, 0x34, 0, 1],
            b"ping",
        ));
        let mut answer = Ip6::to(VIP6, CLIENT6, NH_ICMPV6);
        answer.hop_limit = 64;
        let answer = answer.packet(&icmp6(
            VIP6,
            CLIENT6,
            ICMP6_ECHO_REPLY,
            0,
            [0x12, 0x34, 0, 1],
            b"ping",
        ));
        let echo_with_ext = Ip6::to(CLIENT6, VIP6, NH_ICMPV6)
            .with(Ext::DestOpts { units: 0 })
            .packet(&icmp6(
                CLIENT6,
                VIP6,
                ICMP6_ECHO_REQUEST,
                0,
                [0, 1, 0, 1],
                b"x",
            ));
        check(
            prog,
            ifindex,
            &[
                Fixture::tx(
                    "packet too big quoting flow 2 → be2, in IPv6 in IPv6",
                    inbound6(&ptb),
                    encapsulated6(&ptb, 1),
                ),
                Fixture::tx(
                    "destination unreachable quoting flow 2 → be2",
                    inbound6(&unreach),
                    encapsulated6(&unreach, 1),
                ),
                Fixture::untouched(
                    "packet too big quoting no flow → drop",
                    inbound6(&no_flow),
                    XDP_DROP,
                ),
                Fixture::untouched("time exceeded → drop", inbound6(&time_exceeded), XDP_DROP),
                Fixture::tx(
                    "echo request to the VIP → echo reply, exactly",
                    inbound6(&echo),
                    eth(RTR_MAC, LB_MAC, ETH_P_IPV6, &answer),
                ),
                Fixture::untouched(
                    "echo request behind an extension header → drop",
                    inbound6(&echo_with_ext),
                    XDP_DROP,
                ),
            ],
        );
        let r = dp.stats().unwrap().reasons;
        assert_eq!(r["fwd_icmp_frag_needed"], 1);
        assert_eq!(r["fwd_icmp_unreach"], 1);
        assert_eq!(r["drop_icmp_no_flow"], 1);
        assert_eq!(r["drop_icmp_other"], 2);
        assert_eq!(r["tx_icmp_echo_reply"], 1);
        // Errors are not the VIP's traffic.
        assert_eq!(vip6_counters(&dp, 80).counters.packets, 2);
    });
}

#[test]
fn ipv6_not_for_a_vip_is_passed_untouched() {
    in_fixture_netns(|ifindex| {
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        let solicited: Ipv6Addr = "ff02::1:ff00:2".parse().unwrap();
        let router_ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let mut ns_body = LB6.octets().to_vec();
        ns_body.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 1]); // source link-layer address
        let mut ns = Ip6::to(router_ll, solicited, NH_ICMPV6);
        ns.hop_limit = 255;
        let ns = ns.packet(&icmp6(
            router_ll,
            solicited,
            ICMP6_NEIGHBOR_SOLICIT,
            0,
            [0; 4],
            &ns_body,
        ));
        let mut na = Ip6::to(router_ll, LB6, NH_ICMPV6);
        na.hop_limit = 255;
        let na = na.packet(&icmp6(
            router_ll,
            LB6,
            ICMP6_NEIGHBOR_ADVERT,
            0,
            [0x60, 0, 0, 0],
            &ROUTER6.octets(),
        ));
        let ping_lb = Ip6::to(CLIENT6, LB6, NH_ICMPV6).packet(&icmp6(
            CLIENT6,
            LB6,
            ICMP6_ECHO_REQUEST,
            0,
            [0, 1, 0, 1],
            b"hi",
        ));
        // An MLD report: ICMPv6 behind a Hop-by-Hop header (router alert), to multicast.
        let mld_dst: Ipv6Addr = "ff02::16".parse().unwrap();
        let mld = Ip6::to(router_ll, mld_dst, NH_ICMPV6)
            .with(Ext::HopByHop { units: 0 })
            .packet(&icmp6(router_ll, mld_dst, 143, 0, [0; 4], &[0; 20]));
        let ssh_lb = Ip6::to(CLIENT6, LB6, NH_TCP).packet(&tcp(49000, 22, SYN, 0));
        let fixtures = [
            ("neighbour solicitation → pass", ns),
            ("neighbour advertisement → pass", na),
            ("echo request to the LB → pass", ping_lb),
            ("MLD behind Hop-by-Hop → pass", mld),
            ("TCP to the LB's own address → pass", ssh_lb),
        ]
        .into_iter()
        .map(|(what, p)| Fixture::untouched(what, inbound6(&p), XDP_PASS))
        .collect::<Vec<_>>();
        let wrong_port = client_syn6(49001, 81);
        let udp_to_tcp = Ip6::to(CLIENT6, VIP6, NH_UDP).packet(&udp(49002, 80, b"x"));
        let mut more = vec![
            Fixture::untouched(
                "VIP address, unconfigured port → drop",
                inbound6(&wrong_port),
                XDP_DROP,
            ),
            Fixture::untouched(
                "VIP address, UDP on a TCP-only port → drop",
                inbound6(&udp_to_tcp),
                XDP_DROP,
            ),
        ];
        let mut all = fixtures;
        all.append(&mut more);
        check(prog, ifindex, &all);
        let r = dp.stats().unwrap().reasons;
        assert_eq!(r["pass_not_vip"], 5);
        assert_eq!(r["pass_not_ip"], 0);
        assert_eq!(r["drop_unknown_port"], 2);
        assert_eq!(dp.flows().unwrap().keys().count(), 0, "nothing was steered");
    });
}

#[test]
fn ipip_to_ipv6_backends_without_an_outer_source_is_refused() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer6();
        dp.set_lb_addr6(None).unwrap();
        check(
            dp.balancer().unwrap(),
            ifindex,
            &[Fixture::untouched(
                "no IPv6 outer source → drop",
                inbound6(&client_syn6(50000, 80)),
                XDP_DROP,
            )],
        );
        assert_eq!(dp.stats().unwrap().reasons["drop_encap_failed"], 1);
        // A VIP that would need one is refused when it is installed, by name.
        let spec = vip(VIP6, 81, Proto::Tcp, Forward::Ipip, &BACKENDS6);
        let e = dp
            .apply_vip(&spec, &std::collections::BTreeSet::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("fd11:2::11 is an IPv6 backend of an ipip VIP")
                && e.ends_with("give --lb-addr6"),
            "{e}"
        );
        // l2 needs no outer source.
        let l2 = vip(VIP6, 81, Proto::Tcp, Forward::L2, &BACKENDS6);
        dp.apply_vip(&l2, &std::collections::BTreeSet::new())
            .expect("an l2 IPv6 VIP");
    });
}

#[test]
fn ipv6_flows_are_reported_and_peer_flows_are_honoured() {
    in_fixture_netns(|ifindex| {
        let mut dp = balancer6();
        let mut events = dp.take_flow_events().expect("ring buffer");
        let syn = client_syn6(56000, 80);
        let ack = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(56000, 80, ACK, 10));
        run(dp.balancer().unwrap(), ifindex, &inbound6(&syn));
        run(dp.balancer().unwrap(), ifindex, &inbound6(&ack));
        // An IPv4 flow on the same ring.
        let syn4 = client_syn(56000, 80);
        let ack4 = xlb_tests::packet::Ip::to(CLIENT, VIP, 6).packet(&tcp(56000, 80, ACK, 10));
        run(dp.balancer().unwrap(), ifindex, &inbound(&syn4));
        run(dp.balancer().unwrap(), ifindex, &inbound(&ack4));
        let mut seen = Vec::new();
        while let Some(item) = events.next() {
            // SAFETY: the program writes whole FlowEvents; read_unaligned copes with any alignment.
            seen.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
        assert_eq!(seen.len(), 2, "one event per new flow: {seen:?}");
        let e = seen[0];
        assert_eq!(e.backend_addr, Addr::from(BACKENDS6[0]));
        assert_eq!(e.flow.src_addr, Addr::from(CLIENT6));
        assert_eq!(e.flow.dst_addr, Addr::from(VIP6));
        assert_eq!(e.flow.src_port, 56000u16.to_be());
        assert_eq!((e.flow.dst_port, e.flow.proto), (80u16.to_be(), 6));
        assert_eq!(seen[1].flow.src_addr, Addr::from(CLIENT), "the IPv4 flow");
        assert_ne!(
            seen[1].flow, e.flow,
            "the same ports, another family: another flow"
        );

        // A peer's IPv6 flow pinned to be3, where round robin would give be2.
        let peer = FlowEvent {
            flow: FlowKey {
                src_addr: Addr::from(CLIENT6),
                dst_addr: Addr::from(VIP6),
                src_port: 56001u16.to_be(),
                dst_port: 80u16.to_be(),
                proto: 6,
                _pad: [0; 3],
            },
            backend_addr: Addr::from(BACKENDS6[2]),
        };
        assert_eq!(dp.install_flows([peer]).unwrap().installed, 1);
        let synced = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(56001, 80, ACK, 10));
        let (_, out) = run(dp.balancer().unwrap(), ifindex, &inbound6(&synced));
        assert_eq!(hex(&out), hex(&encapsulated6(&synced, 2)));
        assert_eq!(dp.event_stats().unwrap()["midflow_miss"], 0);
    });
}

/// The per-VIP debug events of an IPv6 VIP name the IPv6 addresses.
#[test]
fn ipv6_debug_events_name_ipv6_addresses() {
    in_fixture_netns(|ifindex| {
        // The next-hop cache is per CPU: pinned, the established packet below finds its next
        // hop cached, so the exit it must not take is open to it.
        xlb_tests::cpu::pin_to_one().expect("pin to one CPU");
        let mut dp = balancer6();
        let capture = Capture::default();
        let mut logger = dp.event_logger(capture.clone()).expect("aya-log");
        let key = xlb::model::ServiceKey {
            addr: VIP6.into(),
            port: 80,
            proto: Proto::Tcp,
        };
        dp.set_vip_debug(&key, true).unwrap();
        run(
            dp.balancer().unwrap(),
            ifindex,
            &inbound6(&client_syn6(57000, 80)),
        );
        logger.flush();
        let lines = std::mem::take(&mut *capture.0.lock().unwrap());
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("[fd11:1::2]:57000 -> [fd11:100::1]:80")
                && lines[0].contains("backend fd11:2::11")
                && lines[0].contains("new 1"),
            "{}",
            lines[0]
        );
        // An established packet of a debugged VIP is logged too, `l2` (port 8080) and `ipip`
        // (port 80) alike: `ipv6::established` leaves such a packet to `try_balance`, which logs
        // it, instead of forwarding it on the cached next hop itself through `l2_exit` or
        // `ipip_exit` (it would leave unlogged if that check were wrong). The first ACK promotes
        // the flow, the second is established.
        dp.set_vip_debug(&key, false).unwrap();
        for (port, sport) in [(8080u16, 57001u16), (80, 57002)] {
            let debugged = xlb::model::ServiceKey { port, ..key };
            dp.set_vip_debug(&debugged, true).unwrap();
            let mut send = |flags: u8| {
                let packet = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(sport, port, flags, 10));
                let (action, _) = run(dp.balancer().unwrap(), ifindex, &inbound6(&packet));
                assert_eq!(action, XDP_TX, "port {port}");
                logger.flush();
                std::mem::take(&mut *capture.0.lock().unwrap())
            };
            let opened = send(SYN);
            let promoting = send(ACK);
            let lookups = dp.stats().unwrap().events["nexthop_lookup"];
            let established = send(ACK);
            assert_eq!(
                dp.stats().unwrap().events["nexthop_lookup"],
                lookups,
                "port {port}: the established packet's next hop was cached"
            );
            assert_eq!(
                established.len(),
                1,
                "port {port}: {opened:?} {promoting:?} {established:?}"
            );
            assert!(
                established[0].contains(&format!("[fd11:1::2]:{sport} -> [fd11:100::1]:{port}"))
                    && established[0].contains("new 0"),
                "{}",
                established[0]
            );
            dp.set_vip_debug(&debugged, false).unwrap();
        }
    });
}

/// Issue 16: IPv6 flows are stamped as IPv4's are (the policy generation, their VIP's id and
/// method), served from the stamp in one lookup while it is current, and follow every change
/// of their VIP: another method, removed, re-created.
#[test]
fn ipv6_flows_are_stamped_and_follow_their_vip() {
    use lb_common::{FORWARD_IPIP, FORWARD_L2, FlowKey};
    use std::collections::BTreeSet;
    use xlb::model::{Forward, Proto, ServiceKey};
    in_fixture_netns(|ifindex| {
        let mut dp = balancer6();
        let send = |dp: &xlb::dataplane::Dataplane, ip_packet: &[u8]| {
            run(dp.balancer().unwrap(), ifindex, &inbound6(ip_packet))
        };
        let forward_of = |dp: &xlb::dataplane::Dataplane, key: &FlowKey| {
            u32::from(dp.flows().unwrap().get(key, 0).unwrap().vip_forward)
        };
        let syn = client_syn6(48200, 80);
        let ack = Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(48200, 80, ACK, 10));
        assert_eq!(send(&dp, &syn), (XDP_TX, encapsulated6(&syn, 0)));
        assert_eq!(send(&dp, &ack), (XDP_TX, encapsulated6(&ack, 0)));
        let key = dp
            .flows()
            .unwrap()
            .keys()
            .map(Result::unwrap)
            .find(|k| !k.src_addr.is_v4())
            .unwrap();
        let stamped = dp.flows().unwrap().get(&key, 0).unwrap();
        assert_eq!(stamped.policy_gen, dp.policy_generation());
        assert_eq!(u32::from(stamped.vip_forward), FORWARD_IPIP);
        let l2 = |ip_packet: &[u8]| eth(backend_mac(0), LB_MAC, ETH_P_IPV6, ip_packet);
        // The one lookup: a current stamp is believed over VIPS6 (made to say l2, the packet
        // leaves l2 though the VIP is ipip); an old one is not, and is stamped again.
        let rewrite = |dp: &mut xlb::dataplane::Dataplane, value: lb_common::FlowValue| {
            let mut t = dp.bench_flow_table(lb_common::maps::FLOWS).unwrap();
            t.insert(key, value, 0).unwrap();
        };
        let l2_stamp = lb_common::FlowValue {
            vip_forward: FORWARD_L2 as u8,
            ..stamped
        };
        rewrite(&mut dp, l2_stamp);
        assert_eq!(send(&dp, &ack), (XDP_TX, l2(&ack)), "current stamp");
        rewrite(
            &mut dp,
            lb_common::FlowValue {
                policy_gen: stamped.policy_gen + 1,
                ..l2_stamp
            },
        );
        assert_eq!(
            send(&dp, &ack),
            (XDP_TX, encapsulated6(&ack, 0)),
            "old stamp"
        );
        assert_eq!(forward_of(&dp, &key), FORWARD_IPIP);
        let spec = |forward| vip(VIP6, 80, Proto::Tcp, forward, &BACKENDS6);
        dp.apply_vip(&spec(Forward::L2), &BTreeSet::new()).unwrap();
        assert_eq!(send(&dp, &ack), (XDP_TX, l2(&ack)), "ip6ip6 → l2");
        assert_eq!(forward_of(&dp, &key), FORWARD_L2);
        dp.remove_vip(&ServiceKey {
            addr: VIP6.into(),
            port: 80,
            proto: Proto::Tcp,
        })
        .unwrap();
        assert_eq!(send(&dp, &ack).0, XDP_DROP, "VIP removed");
        dp.apply_vip(&spec(Forward::Ipip), &BTreeSet::new())
            .unwrap();
        let (action, out) = send(&dp, &ack);
        assert_eq!(action, XDP_TX, "VIP re-created");
        assert!((0..BACKENDS6.len()).any(|b| out == encapsulated6(&ack, b)));
        assert_eq!(forward_of(&dp, &key), FORWARD_IPIP);
    });
}

/// IPv4-mapped addresses (`::ffff:a.b.c.d`) are how the maps spell IPv4: an IPv6 packet carrying
/// them must never meet an IPv4 flow's entry (same key), the IPv4 deny list or IPv4 sources'
/// buckets. It is passed to the kernel untouched (which drops a mapped source, RFC 4291
/// §2.5.5.2), even with the 5-tuple of a live IPv4 flow.
#[test]
fn ipv6_with_ipv4_mapped_addresses_never_uses_ipv4_flows() {
    in_fixture_netns(|ifindex| {
        let dp = balancer6();
        let prog = dp.balancer().unwrap();
        let query = udp(47000, 53, b"query");
        let v4 = xlb_tests::packet::Ip::to(CLIENT, VIP, lb_common::IPPROTO_UDP).packet(&query);
        check(
            prog,
            ifindex,
            &[Fixture::tx(
                "IPv4 UDP flow → be1",
                inbound(&v4),
                encapsulated(&v4, 0),
            )],
        );
        let (client_m, vip_m) = (CLIENT.to_ipv6_mapped(), VIP.to_ipv6_mapped());
        let both = Ip6::to(client_m, vip_m, NH_UDP).packet(&query);
        let to_vip6 = Ip6::to(client_m, VIP6, NH_UDP).packet(&query);
        let to_mapped = Ip6::to(CLIENT6, vip_m, NH_UDP).packet(&query);
        check(
            prog,
            ifindex,
            &[
                Fixture::untouched(
                    "the IPv4 flow's 5-tuple, mapped, over IPv6 → pass",
                    inbound6(&both),
                    XDP_PASS,
                ),
                Fixture::untouched(
                    "mapped source to the IPv6 VIP → pass",
                    inbound6(&to_vip6),
                    XDP_PASS,
                ),
                Fixture::untouched("mapped destination → pass", inbound6(&to_mapped), XDP_PASS),
            ],
        );
        let s = dp.stats().unwrap();
        assert_eq!(s.reasons["pass_malformed"], 2, "{:?}", s.reasons);
        assert_eq!(s.reasons["pass_not_vip"], 1, "{:?}", s.reasons);
        let udp4 = s
            .vips
            .iter()
            .find(|v| v.key.port == 53 && v.key.addr == std::net::IpAddr::V4(VIP))
            .unwrap();
        assert_eq!(udp4.counters.packets, 1, "only the IPv4 packet counted");
        assert_eq!(vip6_counters_udp(&dp).counters.packets, 0);
        assert_eq!(dp.flows().unwrap().keys().count(), 1, "one flow, IPv4's");
    });
}

/// The counters of the IPv6 VIP's UDP service (port 53).
fn vip6_counters_udp(dp: &xlb::dataplane::Dataplane) -> xlb::dataplane::VipStats {
    dp.stats()
        .unwrap()
        .vips
        .into_iter()
        .find(|v| v.key.port == 53 && v.key.proto == Proto::Udp && v.key.addr == VIP6)
        .unwrap()
}
