//! Building the benchmark's frames and namespace (the same shapes as `tests/packet_fixtures.rs`).

use anyhow::Result;
use lb_common::{Addr, FlowEvent, FlowKey};
use std::net::{Ipv4Addr, Ipv6Addr};

use xlb_tests::{
    netns::{self, Netns},
    packet, packet6,
};

pub const LB: Ipv4Addr = Ipv4Addr::new(10, 111, 1, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 100, 1);
/// An address nobody serves (the non-VIP pass case).
pub const OTHER: Ipv4Addr = Ipv4Addr::new(10, 111, 1, 99);
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const RTR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
/// Most backends a benchmark VIP has; each gets a permanent neighbour entry.
pub const MAX_BENCH_BACKENDS: u32 = 1000;

/// The IPv6 rows: the LB's outer IPv6 source, the VIP, the client, three backends on-link.
pub const LB6: Ipv6Addr = Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 2);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd11, 0x100, 0, 0, 0, 0, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd11, 1, 0, 0, 0, 0, 0, 2);
pub const BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 0x13),
];

/// `BACKENDS6` as a VIP's backends, weight 1 each.
pub fn backend_specs6() -> Vec<xlb::model::BackendSpec> {
    BACKENDS6
        .iter()
        .map(|a| xlb::model::BackendSpec {
            addr: (*a).into(),
            weight: 1,
        })
        .collect()
}

/// `tcp_frame` over IPv6 (hop limit 63, no extension headers), to `VIP6`.
pub fn tcp_frame6(src: Ipv6Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let segment = packet::tcp(sport, dport, flags, 0);
    let ip = packet6::Ip6::to(src, VIP6, lb_common::IPPROTO_TCP).packet(&segment);
    packet::eth(LB_MAC, RTR_MAC, packet6::ETH_P_IPV6, &ip)
}

/// Backend `i` (0-based): 10.111.16.10 + i, on-link on `lb0` (10.111.16.0/20).
pub const fn backend(i: u32) -> Ipv4Addr {
    Ipv4Addr::from_bits(Ipv4Addr::new(10, 111, 16, 10).to_bits() + i)
}

/// An address as the data path's maps hold it (16 bytes, IPv4-mapped).
pub fn be(a: Ipv4Addr) -> Addr {
    Addr::from(a)
}

/// `n` flows to VIP:`port`, spread over the first `backends` backends (none from `CLIENT`).
pub fn fill_events(n: u32, port: u16, backends: u32) -> impl Iterator<Item = FlowEvent> {
    (0..n).map(move |i| FlowEvent {
        flow: FlowKey {
            src_addr: be(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 111, 64, 0)) + (i >> 16),
            )),
            dst_addr: be(VIP),
            src_port: ((i & 0xffff) as u16).to_be(),
            dst_port: port.to_be(),
            proto: 6,
            _pad: [0; 3],
        },
        backend_addr: be(backend(i % backends)),
    })
}

/// Ethernet (router → LB), IPv4 (DF, TTL 63), TCP with `flags` and `payload_len` bytes: the
/// test library's builder, as the fixtures use it.
pub fn tcp_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload_len: usize,
) -> Vec<u8> {
    let segment = packet::tcp(sport, dport, flags, payload_len);
    let ip = packet::Ip::to(src, dst, lb_common::IPPROTO_TCP).packet(&segment);
    packet::eth(LB_MAC, RTR_MAC, packet::ETH_P_IP, &ip)
}

/// A namespace with `lb0` (10.111.1.2/24 and 10.111.16.2/20, MTU 1500, forwarding on), a route to
/// the client network and permanent neighbour entries for every benchmark backend, so
/// `bpf_fib_lookup` resolves each of them.
pub fn bench_netns() -> Result<Netns> {
    let ns = Netns::create(&format!("{}-bench", netns::unique_prefix()))?;
    let mut script = String::from(
        "set -e
         ip link add lb0 address 02:00:00:00:00:02 type veth peer name peer0 address 02:00:00:00:00:01
         ip link set lb0 mtu 1500 up
         ip link set peer0 up
         ip addr add 10.111.1.2/24 dev lb0
         ip addr add 10.111.16.2/20 dev lb0
         ip route add 10.111.0.0/24 via 10.111.1.1 dev lb0
         sysctl -qw net.ipv4.conf.lb0.forwarding=1
         sysctl -qw net.ipv6.conf.lb0.disable_ipv6=0
         sysctl -qw net.ipv6.conf.lb0.accept_dad=0
         ip addr add fd11:2::2/64 dev lb0 nodad
         ip route add fd11:1::/64 via fd11:2::1 dev lb0
         sysctl -qw net.ipv6.conf.lb0.forwarding=1
         ip -batch - <<'EOF'
neigh add 10.111.1.1 lladdr 02:00:00:00:00:01 dev lb0 nud permanent
neigh add fd11:2::1 lladdr 02:00:00:00:00:01 dev lb0 nud permanent
neigh add fd11:2::11 lladdr 02:00:00:00:01:11 dev lb0 nud permanent
neigh add fd11:2::12 lladdr 02:00:00:00:01:12 dev lb0 nud permanent
neigh add fd11:2::13 lladdr 02:00:00:00:01:13 dev lb0 nud permanent
",
    );
    for i in 0..MAX_BENCH_BACKENDS {
        script.push_str(&format!(
            "neigh add {} lladdr 02:00:00:01:{:02x}:{:02x} dev lb0 nud permanent\n",
            backend(i),
            i >> 8,
            i & 0xff
        ));
    }
    script.push_str("EOF\n");
    ns.sh(&script)?;
    Ok(ns)
}
