//! The packet fixtures' world, shared by `tests/packet_fixtures.rs` (IPv6:
//! `tests/packet_fixtures6.rs`) and the fuzzer: a small, fully known namespace for
//! `bpf_fib_lookup` to answer from — `lb0` (10.111.1.2/24 and fd11:2::2/64, MAC
//! 02:00:00:00:00:02, MTU 1500) with permanent neighbour entries for be1..be3 (10.111.1.11-13,
//! fd11:2::11-13) and none for 10.111.1.14 and fd11:2::14, and routes to the client network via
//! 10.111.1.1 and fd11:2::1 — the balancer loaded with the fixtures' VIPs, and a harness that
//! runs frames through it with BPF_PROG_TEST_RUN. Needs root.

use crate::{
    netns::{self, Netns},
    packet::{ETH_P_IP, Ip, SYN, checksum, eth, tcp, xdp_md},
    packet6::{ETH_P_IPV6, Ip6, NH_IPV6, NH_TCP},
};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{Addr, DEFAULT_FLOW_CAPACITY, FlowKey, FlowValue};
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};
use xlb::{
    dataplane::Dataplane,
    model::{BackendSpec, Forward, Proto, ServiceKey, VipSpec, policy::SourcePolicy},
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const RTR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB: Ipv4Addr = Ipv4Addr::new(10, 111, 1, 2);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 111, 0, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 100, 1);
/// A VIP whose only backend has no neighbour entry.
pub const VIP_NO_NEIGH: Ipv4Addr = Ipv4Addr::new(10, 111, 100, 2);
pub const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 111, 1, 11),
    Ipv4Addr::new(10, 111, 1, 12),
    Ipv4Addr::new(10, 111, 1, 13),
];
pub const UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 111, 1, 14);
/// The router on the client's side (rtr's address towards cli), where ICMP errors come from.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 111, 0, 1);

pub const LB6: Ipv6Addr = Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd11, 1, 0, 0, 0, 0, 0, 2);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd11, 0x100, 0, 0, 0, 0, 0, 1);
/// An IPv6 VIP whose only backend has no neighbour entry.
pub const VIP6_NO_NEIGH: Ipv6Addr = Ipv6Addr::new(0xfd11, 0x100, 0, 0, 0, 0, 0, 2);
pub const BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 0x13),
];
pub const UNRESOLVED6: Ipv6Addr = Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 0x14);
/// The router on the client's side, where ICMPv6 errors come from.
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd11, 1, 0, 0, 0, 0, 0, 1);

/// The MAC address of backend `i` (0-based) in the fixture namespace.
pub fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, 0x11 + i as u8]
}

/// A frame from the router to the LB carrying `ip_packet`.
pub fn inbound(ip_packet: &[u8]) -> Vec<u8> {
    eth(LB_MAC, RTR_MAC, ETH_P_IP, ip_packet)
}

/// A SYN from the client to the VIP.
pub fn client_syn(sport: u16, dport: u16) -> Vec<u8> {
    Ip::to(CLIENT, VIP, 6).packet(&tcp(sport, dport, SYN, 0))
}

/// The outer header the balancer must prepend, field by field.
pub fn outer_header(inner_len: usize, backend: Ipv4Addr, df: bool) -> Vec<u8> {
    outer_header_with_id(inner_len, backend, df, 0)
}

/// The same with identification `id` (packets without DF).
pub fn outer_header_with_id(inner_len: usize, backend: Ipv4Addr, df: bool, id: u16) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((inner_len + 20) as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[if df { 0x40 } else { 0 }, 0, 64, 4, 0, 0]);
    h.extend_from_slice(&LB.octets());
    h.extend_from_slice(&backend.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// An IPv4 `ip_packet` forwarded `l2` to backend `backend` (0-based): the packet unchanged, the
/// frame addressed to the backend's MAC from the LB's.
pub fn l2_forwarded(ip_packet: &[u8], backend: usize) -> Vec<u8> {
    eth(backend_mac(backend), LB_MAC, ETH_P_IP, ip_packet)
}

/// `inner` (with DF) encapsulated for backend `backend` (0-based), as the balancer sends it.
pub fn encapsulated(inner: &[u8], backend: usize) -> Vec<u8> {
    let mut payload = outer_header(inner.len(), BACKENDS[backend], true);
    payload.extend_from_slice(inner);
    eth(backend_mac(backend), LB_MAC, ETH_P_IP, &payload)
}

/// The ICMP fragmentation-needed the balancer sends back for `big` (an IPv4 packet from the
/// client to `VIP` without options), announcing `mtu`, field by field.
pub fn frag_needed_reply(big: &[u8], mtu: u16) -> Vec<u8> {
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&big[..28]); // original IP header + 8 bytes
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut reply_ip = vec![0x45, 0];
    reply_ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    reply_ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    reply_ip.extend_from_slice(&VIP.octets());
    reply_ip.extend_from_slice(&CLIENT.octets());
    let c = checksum(&reply_ip);
    reply_ip[10..12].copy_from_slice(&c.to_be_bytes());
    reply_ip.extend_from_slice(&icmp);
    eth(RTR_MAC, LB_MAC, ETH_P_IP, &reply_ip)
}

/// One packet in, one expected packet and action out.
pub struct Fixture {
    pub description: &'static str,
    pub input: Vec<u8>,
    /// `None`: the output must equal the input (untouched).
    pub expected: Option<Vec<u8>>,
    pub action: u32,
}

impl Fixture {
    /// `input` is sent back out (`XDP_TX`) as `expected`.
    pub fn tx(description: &'static str, input: Vec<u8>, expected: Vec<u8>) -> Self {
        Fixture {
            description,
            input,
            expected: Some(expected),
            action: XDP_TX,
        }
    }

    /// `input` gets `action` and stays as it was.
    pub fn untouched(description: &'static str, input: Vec<u8>, action: u32) -> Self {
        Fixture {
            description,
            input,
            expected: None,
            action,
        }
    }
}

/// Run `input`, received on `ifindex`, through `prog` once: (action, output frame).
pub fn run(prog: &Xdp, ifindex: u32, input: &[u8]) -> (u32, Vec<u8>) {
    let ctx = xdp_md(input.len(), ifindex);
    let mut out = vec![0u8; 4096];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// `run` of the balancer of `dp` on `ip_packet` arriving from the router (`inbound`).
pub fn run_inbound(dp: &Dataplane, ifindex: u32, ip_packet: &[u8]) -> (u32, Vec<u8>) {
    run(
        dp.balancer().expect("balancer program"),
        ifindex,
        &inbound(ip_packet),
    )
}

/// The flow key of TCP from `CLIENT` port `sport` to `VIP` port `dport` (both in host order).
pub fn client_tcp_key(sport: u16, dport: u16) -> FlowKey {
    FlowKey {
        src_addr: Addr::from(CLIENT),
        dst_addr: Addr::from(VIP),
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

/// The `FLOWS` key and entry of the flow from client port `sport` (the fixtures' clients use a
/// port per test).
pub fn flow_of_port(dp: &Dataplane, sport: u16) -> (FlowKey, FlowValue) {
    let flows = dp.flows().expect("FLOWS");
    let key = flows
        .keys()
        .map(Result::unwrap)
        .find(|k| u16::from_be(k.src_port) == sport)
        .unwrap_or_else(|| panic!("no flow from port {sport} in FLOWS"));
    let value = flows.get(&key, 0).expect("its entry");
    (key, value)
}

/// Overwrite a flow's `FLOWS` entry, as a packet of the data path might have left it.
pub fn put_flow(dp: &mut Dataplane, key: FlowKey, value: FlowValue) {
    dp.bench_flow_table(lb_common::maps::FLOWS)
        .expect("FLOWS")
        .insert(key, value, 0)
        .expect("writing the entry");
}

/// Run every fixture and compare action and output.
pub fn check(prog: &Xdp, ifindex: u32, fixtures: &[Fixture]) {
    for f in fixtures {
        let (action, out) = run(prog, ifindex, &f.input);
        assert_eq!(action, f.action, "{}: action", f.description);
        let expected = f.expected.as_ref().unwrap_or(&f.input);
        assert_eq!(
            hex(&out),
            hex(expected),
            "{}: output packet differs",
            f.description
        );
    }
}

/// 16 bytes a line, for readable differences.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The namespace every fixture runs in; see the module comment.
pub fn fixture_netns() -> Netns {
    netns::require_root();
    let ns = Netns::create(&format!("{}-fx", netns::unique_prefix())).expect("netns");
    ns.sh(&format!(
        "set -e
         ip link add lb0 address 02:00:00:00:00:02 type veth peer name peer0 address 02:00:00:00:00:01
         ip link set lb0 mtu 1500 up
         ip link set peer0 up
         ip addr add {LB}/24 dev lb0
         ip route add 10.111.0.0/24 via 10.111.1.1 dev lb0
         ip neigh add 10.111.1.1 lladdr 02:00:00:00:00:01 dev lb0 nud permanent
         ip neigh add 10.111.1.11 lladdr 02:00:00:00:01:11 dev lb0 nud permanent
         ip neigh add 10.111.1.12 lladdr 02:00:00:00:01:12 dev lb0 nud permanent
         ip neigh add 10.111.1.13 lladdr 02:00:00:00:01:13 dev lb0 nud permanent
         sysctl -qw net.ipv4.conf.lb0.forwarding=1
         sysctl -qw net.ipv6.conf.lb0.disable_ipv6=0
         sysctl -qw net.ipv6.conf.lb0.accept_dad=0
         ip addr add fd11:2::2/64 dev lb0 nodad
         ip route add fd11:1::/64 via fd11:2::1 dev lb0
         ip neigh add fd11:2::1 lladdr 02:00:00:00:00:01 dev lb0 nud permanent
         ip neigh add fd11:2::11 lladdr 02:00:00:00:01:11 dev lb0 nud permanent
         ip neigh add fd11:2::12 lladdr 02:00:00:00:01:12 dev lb0 nud permanent
         ip neigh add fd11:2::13 lladdr 02:00:00:00:01:13 dev lb0 nud permanent
         sysctl -qw net.ipv6.conf.lb0.forwarding=1"
    ))
    .expect("fixture namespace set-up");
    ns
}

/// A VIP over `backends` (weight 1 each), echo on, no source policy; addresses of either family.
pub fn vip<A: Into<IpAddr> + Copy>(
    addr: impl Into<IpAddr>,
    port: u16,
    proto: Proto,
    forward: Forward,
    backends: &[A],
) -> VipSpec {
    VipSpec {
        key: ServiceKey {
            addr: addr.into(),
            port,
            proto,
        },
        forward,
        backends: backends
            .iter()
            .map(|addr| BackendSpec {
                addr: (*addr).into(),
                weight: 1,
            })
            .collect(),
        icmp_echo: true,
        policy: SourcePolicy::default(),
    }
}

/// The fixtures' VIPs: `VIP:80/tcp` ipip, `VIP:8080/tcp` l2, `VIP:53/udp` ipip (each over
/// be1..be3), and `VIP_NO_NEIGH:80` ipip / `:8080` l2 over the unresolved backend.
pub fn fixture_vips() -> [VipSpec; 5] {
    [
        vip(VIP, 80, Proto::Tcp, Forward::Ipip, &BACKENDS),
        vip(VIP, 8080, Proto::Tcp, Forward::L2, &BACKENDS),
        vip(VIP, 53, Proto::Udp, Forward::Ipip, &BACKENDS),
        vip(VIP_NO_NEIGH, 80, Proto::Tcp, Forward::Ipip, &[UNRESOLVED]),
        vip(VIP_NO_NEIGH, 8080, Proto::Tcp, Forward::L2, &[UNRESOLVED]),
    ]
}

/// Load the balancer with `fixture_vips`.
pub fn balancer() -> Dataplane {
    let mut dp = Dataplane::load_unattached(DEFAULT_FLOW_CAPACITY, Some(LB)).expect("load");
    for spec in fixture_vips() {
        dp.apply_vip(&spec, &BTreeSet::new()).expect("apply VIP");
    }
    dp
}

/// The IPv6 fixtures' VIPs: `[VIP6]:80/tcp` ipip, `[VIP6]:8080/tcp` l2, `[VIP6]:53/udp` ipip
/// (each over be1..be3's IPv6 addresses), `[VIP6_NO_NEIGH]:80` ipip / `:8080` l2 over the
/// unresolved backend, and `VIP:9080/tcp` ipip over be1..be3's IPv6 addresses (IPv4 in IPv6).
pub fn fixture_vips6() -> [VipSpec; 6] {
    [
        vip(VIP6, 80, Proto::Tcp, Forward::Ipip, &BACKENDS6),
        vip(VIP6, 8080, Proto::Tcp, Forward::L2, &BACKENDS6),
        vip(VIP6, 53, Proto::Udp, Forward::Ipip, &BACKENDS6),
        vip(VIP6_NO_NEIGH, 80, Proto::Tcp, Forward::Ipip, &[UNRESOLVED6]),
        vip(VIP6_NO_NEIGH, 8080, Proto::Tcp, Forward::L2, &[UNRESOLVED6]),
        vip(VIP, 9080, Proto::Tcp, Forward::Ipip, &BACKENDS6),
    ]
}

/// Load the balancer with `fixture_vips` and `fixture_vips6`, `LB6` the outer IPv6 source.
pub fn balancer6() -> Dataplane {
    let mut dp = balancer();
    dp.set_lb_addr6(Some(LB6)).expect("lb_addr6");
    for spec in fixture_vips6() {
        dp.apply_vip(&spec, &BTreeSet::new())
            .expect("apply IPv6 VIP");
    }
    dp
}

/// A frame from the router to the LB carrying the IPv6 packet `ip_packet`.
pub fn inbound6(ip_packet: &[u8]) -> Vec<u8> {
    eth(LB_MAC, RTR_MAC, ETH_P_IPV6, ip_packet)
}

/// A SYN from the IPv6 client to the IPv6 VIP.
pub fn client_syn6(sport: u16, dport: u16) -> Vec<u8> {
    Ip6::to(CLIENT6, VIP6, NH_TCP).packet(&tcp(sport, dport, SYN, 0))
}

/// The outer IPv6 header the balancer must prepend to `inner` for `backend`, next header
/// `next`, field by field: traffic class `tc`, flow label 0, hop limit 64, from `LB6`.
pub fn outer_header6(inner_len: usize, backend: Ipv6Addr, next: u8, tc: u8) -> Vec<u8> {
    let mut h = vec![0x60 | (tc >> 4), tc << 4, 0, 0];
    h.extend_from_slice(&(inner_len as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&LB6.octets());
    h.extend_from_slice(&backend.octets());
    h
}

/// The IPv6 packet `inner` in IPv6 for backend `backend` (0-based), as the balancer sends it.
pub fn encapsulated6(inner: &[u8], backend: usize) -> Vec<u8> {
    let tc = (inner[0] << 4) | (inner[1] >> 4);
    let mut payload = outer_header6(inner.len(), BACKENDS6[backend], NH_IPV6, tc);
    payload.extend_from_slice(inner);
    eth(backend_mac(backend), LB_MAC, ETH_P_IPV6, &payload)
}

/// Collects log records (the data path's debug events arrive through aya-log).
#[derive(Clone, Default)]
pub struct Capture(pub std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

/// Run `f` inside a fresh fixture namespace, with `lb0`'s interface index.
pub fn in_fixture_netns(f: impl FnOnce(u32) + Send + 'static) {
    let ns = fixture_netns();
    ns.enter(move || {
        let ifindex = xlb::util::interface_index("lb0").expect("lb0");
        f(ifindex)
    })
    .expect("run in namespace");
}
