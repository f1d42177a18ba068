//! A fuzzer for the balancer (issue 13): random and mutated frames through BPF_PROG_TEST_RUN in
//! the fixture namespace, from a fixed seed, so a failure is replayed by running the same seed
//! again. The balancer is loaded with the fixtures' VIPs and every part of the door switched
//! on (a deny list, a VIP's allow and deny lists, limits), so every path is reachable.
//!
//! Frames: packets built field by field (Ethernet with and without VLAN tags, IPv6 with
//! extension headers, fragments, ICMPv6 and tunnels to the IPv6 VIP and elsewhere, ARP and other
//! EtherTypes; IPv4 with options, fragments and every protocol number; TCP with any
//! flags, UDP, ICMP echo and errors quoting flows that were created earlier), the same with
//! bits flipped, bytes overwritten or cut at a random point, every truncation of some of them,
//! and random bytes.
//!
//! Checks: no frame gets `XDP_ABORTED` or an unknown action; every frame is counted under
//! exactly one reason (the per-reason counters grow by exactly the frames sent, checked after
//! each of the first frames and then every `CHECK_EVERY`); a frame sent on is well formed —
//! IPIP (outer header valid, checksum, length, from the LB to a backend, the inner packet
//! byte-identical to what came in without its Ethernet padding), `l2` (only the MACs changed,
//! to a backend's and the LB's), or an ICMP answer back to the sender with a valid IPv4
//! checksum: fragmentation needed with a valid ICMP checksum, or the echo request turned round
//! (identifier, sequence and data unchanged; its ICMP checksum is updated for the type, so it is
//! valid exactly when the request's was). A frame passed to the kernel is untouched, or
//! encapsulated for a backend whose neighbour is not resolved yet.

use crate::{
    fixture::*,
    packet::{ACK, ETH_P_IP, Ip, SYN, checksum, eth, icmp_message, quote, tcp, udp},
    packet6::{
        ETH_P_IPV6, Ext, ICMP6_DEST_UNREACH, ICMP6_ECHO_REQUEST, ICMP6_NEIGHBOR_SOLICIT,
        ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED, Ip6, NH_ESP, NH_ICMPV6, NH_IPIP, NH_IPV6,
        NH_NONE, NH_TCP, NH_UDP, checksum6, icmp6,
    },
    topology::VIP6,
};
use anyhow::{Result, bail, ensure};
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};
use xlb::{
    dataplane::{Dataplane, DenyCount},
    model::{
        Forward, Proto,
        net::IpNet,
        policy::{RateLimit, SourcePolicy},
    },
};

/// The reason counters are compared with the frames sent after each of the first this many
/// frames, and then every `CHECK_EVERY` frames.
const CHECK_EACH_FIRST: u64 = 500;
const CHECK_EVERY: u64 = 2000;
/// TCP flows the generator remembers, to send their later packets and ICMP errors about them.
const FLOWS_KEPT: usize = 64;
/// Frames cut at every offset are cut up to here (Ethernet, a VLAN tag, IPv4 with all its
/// options, an ICMP error's quoted header and 8 bytes).
const TRUNCATED_UP_TO: usize = 14 + 8 + 60 + 8 + 60 + 8;
/// A VIP address whose one VIP (port 80, ipip) has a backend without a route, and a port of the
/// main VIP address with no backend.
const VIP_NO_ROUTE: Ipv4Addr = Ipv4Addr::new(10, 111, 100, 3);
const NO_ROUTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 111, 200, 1);
const PORT_NO_BACKEND: u16 = 9000;

/// A small, fast, seedable generator (SplitMix64): the run depends on the seed alone.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    /// `min` to `min + spread - 1` random bytes.
    pub fn some_bytes(&mut self, min: usize, spread: u64) -> Vec<u8> {
        let n = min + self.below(spread) as usize;
        self.bytes(n)
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct FuzzReport {
    pub frames: u64,
    /// Frames by action: drop, pass, tx, redirect.
    pub actions: [u64; 4],
    /// Forwarded frames checked, by kind: IPIP, l2, ICMP answer.
    pub forwarded: [u64; 3],
    pub elapsed: Duration,
    /// Reasons that counted at least one frame.
    pub reasons_seen: BTreeSet<String>,
}

impl FuzzReport {
    pub fn summary(&self, seed: u64) -> String {
        format!(
            "fuzz: {} frames (seed {seed}) in {:.1}s, {:.0} frames/s; drop {} pass {} tx {} redirect {}; \
             checked forwarded: ipip {} l2 {} icmp {}; {} of {} reasons seen",
            self.frames,
            self.elapsed.as_secs_f64(),
            self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.actions[0],
            self.actions[1],
            self.actions[2],
            self.actions[3],
            self.forwarded[0],
            self.forwarded[1],
            self.forwarded[2],
            self.reasons_seen.len(),
            lb_common::reason::COUNT,
        )
    }
}

/// The balancer as the fuzzer runs it: the fixtures' VIPs, a deny list, VIP:80 with lists and
/// a source limit, VIP:8080 with a tight source limit, the UDP VIP with a VIP limit, a VIP
/// without backends and one whose backend has no route. (`drop_encap_failed` needs a balancer
/// without an IPIP source address, and `fwd_redirect` a second interface: neither is reached.)
pub fn fuzz_balancer() -> Result<Dataplane> {
    let mut dp = balancer();
    let nets = |l: &[&str]| -> Vec<IpNet> { l.iter().map(|s| s.parse().unwrap()).collect() };
    let mut tcp80 = vip(VIP, 80, Proto::Tcp, Forward::Ipip, &BACKENDS);
    tcp80.policy = SourcePolicy {
        allow_src: nets(&["10.111.0.0/16", "192.0.2.0/24"]),
        deny_src: nets(&["10.111.0.128/25"]),
        src_limit: Some(RateLimit {
            rate: 1000,
            burst: 2000,
        }),
        vip_limit: None,
    };
    dp.apply_vip(&tcp80, &BTreeSet::new())?;
    let mut tcp8080 = vip(VIP, 8080, Proto::Tcp, Forward::L2, &BACKENDS);
    tcp8080.policy.src_limit = Some(RateLimit {
        rate: 50,
        burst: 100,
    });
    dp.apply_vip(&tcp8080, &BTreeSet::new())?;
    let mut udp53 = vip(VIP, 53, Proto::Udp, Forward::Ipip, &BACKENDS);
    udp53.policy.vip_limit = Some(RateLimit {
        rate: 100,
        burst: 50,
    });
    dp.apply_vip(&udp53, &BTreeSet::new())?;
    dp.apply_vip(
        &vip(
            VIP,
            PORT_NO_BACKEND,
            Proto::Tcp,
            Forward::Ipip,
            &[] as &[Ipv4Addr],
        ),
        &BTreeSet::new(),
    )?;
    dp.apply_vip(
        &vip(
            VIP_NO_ROUTE,
            80,
            Proto::Tcp,
            Forward::Ipip,
            &[NO_ROUTE_BACKEND],
        ),
        &BTreeSet::new(),
    )?;
    // The IPv6 VIPs (ipip, l2, UDP, no neighbour) and IPv4 in IPv6, with an outer IPv6 source.
    dp.set_lb_addr6(Some(LB6))?;
    // [VIP6]:80 with IPv6 source lists (the client's /64 and the deny list's documentation
    // prefix allowed, a corner of the /64 denied).
    for mut spec in fixture_vips6() {
        if spec.key.addr == VIP6 && spec.key.port == 80 {
            spec.policy.allow_src = nets(&["fd11:1::/64", "2001:db8::/32"]);
            spec.policy.deny_src = nets(&["fd11:1::/126"]);
        }
        dp.apply_vip(&spec, &BTreeSet::new())?;
    }
    // A prefix (the trie) and host entries (the hash), one of them inside the prefix, and an
    // IPv6 prefix (the IPv6 trie).
    let deny = nets(&[
        "10.111.9.0/24",
        "198.51.100.0/24",
        "10.111.9.77/32",
        "10.111.8.5/32",
        "2001:db8:bad::/48",
    ]);
    dp.deny_maps()?.fill(1, &deny)?;
    dp.set_deny_list(1, DenyCount::of(&deny))?;
    Ok(dp)
}

/// Frames of the fuzzer, from a seed.
pub struct FrameSource {
    rng: Rng,
    /// TCP flows sent before (source, source port, VIP port), for their later packets and for
    /// ICMP errors about them.
    flows: Vec<(Ipv4Addr, u16, u16)>,
    /// Truncations of one frame still to send.
    pending: Vec<Vec<u8>>,
}

impl FrameSource {
    pub fn new(seed: u64) -> Self {
        FrameSource {
            rng: Rng::new(seed),
            flows: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// The next frame (at least 14 bytes: BPF_PROG_TEST_RUN refuses shorter ones, as NICs do).
    pub fn next_frame(&mut self) -> Vec<u8> {
        if let Some(f) = self.pending.pop() {
            return f;
        }
        let frame = match self.rng.below(1000) {
            0..450 => self.built(),
            450..850 => {
                let f = self.built();
                self.mutated(f)
            }
            850..853 => {
                // Every truncation of one frame, from the Ethernet header through the headers
                // (past them the program reads nothing but lengths).
                let f = self.built();
                self.pending = (14..f.len().min(TRUNCATED_UP_TO))
                    .map(|n| f[..n].to_vec())
                    .collect();
                f
            }
            _ => self.random(),
        };
        if frame.len() < 14 {
            return self.next_frame();
        }
        frame
    }

    fn random(&mut self) -> Vec<u8> {
        let len = 14 + self.rng.below(1500) as usize;
        let mut f = self.rng.bytes(len);
        if self.rng.chance(50) {
            f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        }
        f
    }

    fn mutated(&mut self, mut f: Vec<u8>) -> Vec<u8> {
        for _ in 0..1 + self.rng.below(4) {
            match self.rng.below(4) {
                0 => {
                    let bit = self.rng.below(f.len() as u64 * 8) as usize;
                    f[bit / 8] ^= 1 << (bit % 8);
                }
                1 => {
                    let at = self.rng.below(f.len() as u64) as usize;
                    f[at] = self.rng.byte();
                }
                2 => {
                    let keep = 14 + self.rng.below(f.len().saturating_sub(13) as u64) as usize;
                    f.truncate(keep.min(f.len()));
                }
                _ => {
                    let more = self.rng.below(64) as usize;
                    let extra = self.rng.bytes(more);
                    f.extend_from_slice(&extra);
                }
            }
        }
        f
    }

    /// A frame built field by field.
    fn built(&mut self) -> Vec<u8> {
        let ip = self.ipv4();
        let (ethertype, payload) = match self.rng.below(20) {
            // A dual-stack network: a fifth of what arrives is IPv6.
            0..=3 => (0x86dd, self.ipv6()),
            4 => (0x0806, self.rng.bytes(28)),
            5 => (self.rng.next_u64() as u16, self.rng.bytes(64)),
            _ => (ETH_P_IP, ip),
        };
        let mut frame = match self.rng.below(12) {
            // One VLAN tag, or two (802.1ad outside).
            0 => {
                let mut tagged = vec![self.rng.byte() & 0x0f, self.rng.byte()];
                tagged.extend_from_slice(&ethertype.to_be_bytes());
                tagged.extend_from_slice(&payload);
                eth(LB_MAC, RTR_MAC, 0x8100, &tagged)
            }
            1 => {
                let mut tagged = vec![0, 10, 0x81, 0x00, 0, 20];
                tagged.extend_from_slice(&ethertype.to_be_bytes());
                tagged.extend_from_slice(&payload);
                eth(LB_MAC, RTR_MAC, 0x88a8, &tagged)
            }
            _ => eth(LB_MAC, RTR_MAC, ethertype, &payload),
        };
        // Ethernet pads short frames to 60 bytes.
        if self.rng.chance(30) && frame.len() < 60 {
            frame.resize(60, 0);
        }
        frame
    }

    /// An IPv6 packet: mostly built with `packet6` (to the IPv6 VIPs, the LB, a backend or
    /// anywhere; 0-5 extension headers of every kind in any order, fragments among them; TCP,
    /// UDP, ICMPv6 echo, packet too big, neighbour solicitation, tunnels, other protocols), the
    /// rest a valid first nibble over random bytes.
    fn ipv6(&mut self) -> Vec<u8> {
        if self.rng.chance(20) {
            let mut h = self.rng.some_bytes(40, 60);
            h[0] = 0x60 | (h[0] & 0x0f);
            h[6] = self.rng.pick(&[6, 17, 58, 4, 41]);
            return h;
        }
        let v6 = |s: &str| -> Ipv6Addr { s.parse().expect("a literal address") };
        let src = match self.rng.below(5) {
            0 => v6("fd11:1::2"),
            1 => v6("fe80::1"),
            // In the deny list's IPv6 prefix.
            2 => v6("2001:db8:bad::7"),
            _ => Ipv6Addr::from(
                u128::from(self.rng.next_u64()) << 64 | u128::from(self.rng.next_u64()),
            ),
        };
        let dst = match self.rng.below(6) {
            0..=2 => VIP6,
            3 => v6("fd11:2::2"),
            4 => v6("ff02::1:ff00:2"),
            _ => Ipv6Addr::from(u128::from(self.rng.next_u64())),
        };
        let next = self.rng.pick(&[
            NH_TCP, NH_TCP, NH_UDP, NH_ICMPV6, NH_ICMPV6, NH_IPV6, NH_IPIP, NH_ESP, NH_NONE,
        ]);
        let mut ip = Ip6::to(src, dst, next);
        for _ in 0..self.rng.below(6) {
            let ext = match self.rng.below(6) {
                0 => Ext::HopByHop {
                    units: self.rng.below(3) as u8,
                },
                1 => Ext::DestOpts {
                    units: self.rng.below(3) as u8,
                },
                2 => Ext::Routing {
                    segments_left: self.rng.below(3) as u8,
                    units: self.rng.below(3) as u8,
                },
                3 => Ext::Fragment {
                    offset: self.rng.below(4) as u16,
                    more: self.rng.chance(50),
                    id: self.rng.next_u64() as u32,
                },
                4 => Ext::Ah,
                _ => Ext::HopByHop { units: 0 },
            };
            ip = ip.with(ext);
        }
        let port = self.port();
        let payload = match next {
            NH_TCP => tcp(
                self.rng.next_u64() as u16,
                port,
                self.rng.pick(&[SYN, ACK, SYN | ACK, 0x11, 0x04]),
                self.rng.below(40) as usize,
            ),
            NH_UDP => udp(
                self.rng.next_u64() as u16,
                port,
                &self.rng.some_bytes(0, 32),
            ),
            NH_ICMPV6 => {
                let kind = self.rng.pick(&[
                    ICMP6_ECHO_REQUEST,
                    ICMP6_PACKET_TOO_BIG,
                    ICMP6_DEST_UNREACH,
                    ICMP6_TIME_EXCEEDED,
                    ICMP6_NEIGHBOR_SOLICIT,
                ]);
                // An error quotes a reply from the VIP, as a backend sends it.
                let quoted = Ip6::to(VIP6, src, NH_TCP).packet(&tcp(port, 40000, ACK, 0));
                let body = if kind < 128 {
                    quoted
                } else {
                    self.rng.some_bytes(0, 24)
                };
                icmp6(src, dst, kind, 0, [0, 0, 5, 0x78], &body)
            }
            NH_IPV6 => Ip6::to(src, VIP6, NH_TCP).packet(&tcp(40001, 80, SYN, 0)),
            NH_IPIP => client_syn(40002, 80)[14..].to_vec(),
            _ => self.rng.some_bytes(0, 40),
        };
        ip.packet(&payload)
    }

    fn source(&mut self) -> Ipv4Addr {
        match self.rng.below(8) {
            0 => CLIENT,
            1 => Ipv4Addr::new(10, 111, 0, 128 + self.rng.byte() / 2),
            // The deny list's prefix, and a host entry outside it (its hash alone drops it).
            2 => match self.rng.below(4) {
                0 => Ipv4Addr::new(10, 111, 8, 5),
                _ => Ipv4Addr::new(10, 111, 9, self.rng.byte()),
            },
            3 => Ipv4Addr::new(192, 0, 2, self.rng.byte()),
            4 => Ipv4Addr::new(10, 111, self.rng.byte(), self.rng.byte()),
            _ => Ipv4Addr::from_bits(self.rng.next_u64() as u32),
        }
    }

    fn destination(&mut self) -> Ipv4Addr {
        match self.rng.below(12) {
            0..7 => VIP,
            7 => VIP_NO_NEIGH,
            8 => VIP_NO_ROUTE,
            9 => LB,
            _ => Ipv4Addr::from_bits(self.rng.next_u64() as u32),
        }
    }

    fn ipv4(&mut self) -> Vec<u8> {
        let mut ip = Ip::to(self.source(), self.destination(), 0);
        ip.ihl = if self.rng.chance(85) {
            5
        } else {
            5 + self.rng.below(11) as u8
        };
        ip.frag = match self.rng.below(10) {
            0 => 0x2000 | (self.rng.below(0x1fff) as u16),
            1 => self.rng.below(0x1fff) as u16,
            2 => 0x2000,
            3 | 4 => 0,
            _ => 0x4000,
        };
        let (proto, l4) = match self.rng.below(12) {
            0..5 => (6, self.tcp_segment(ip.src)),
            5..8 => (17, self.udp_datagram()),
            8..11 => (1, self.icmp(ip.src)),
            _ => (self.rng.byte(), self.rng.some_bytes(0, 80)),
        };
        ip.proto = proto;
        let mut packet = ip.packet(&l4);
        if ip.ihl > 5 && self.rng.chance(50) {
            // Options that are not NOPs.
            for b in &mut packet[20..usize::from(ip.ihl) * 4] {
                *b = self.rng.byte();
            }
        }
        packet
    }

    fn port(&mut self) -> u16 {
        match self.rng.below(10) {
            0..3 => 80,
            3..5 => 8080,
            5 => 53,
            6 => 81,
            7 => PORT_NO_BACKEND,
            _ => self.rng.next_u64() as u16,
        }
    }

    fn tcp_segment(&mut self, src: Ipv4Addr) -> Vec<u8> {
        let flags = match self.rng.below(8) {
            0..3 => SYN,
            3..6 => ACK,
            6 => SYN | ACK,
            _ => self.rng.byte(),
        };
        let payload = if self.rng.chance(70) {
            0
        } else {
            self.rng.below(1460) as usize
        };
        // Often a flow sent before: its handshake's ACK, its data.
        if !self.flows.is_empty() && self.rng.chance(40) {
            let (fsrc, sport, dport) = self.flows[self.rng.below(self.flows.len() as u64) as usize];
            if fsrc == src {
                return tcp(sport, dport, flags, payload);
            }
        }
        let (sport, dport) = (1024 + self.rng.below(16_384) as u16, self.port());
        if self.flows.len() < FLOWS_KEPT {
            self.flows.push((src, sport, dport));
        } else {
            let i = self.rng.below(FLOWS_KEPT as u64) as usize;
            self.flows[i] = (src, sport, dport);
        }
        let mut t = tcp(sport, dport, flags, payload);
        if self.rng.chance(10) {
            // A data offset that lies.
            t[12] = self.rng.byte();
        }
        t
    }

    fn udp_datagram(&mut self) -> Vec<u8> {
        let len = self.rng.below(600) as usize;
        let payload = self.rng.bytes(len);
        let mut u = udp(1024 + self.rng.below(256) as u16, self.port(), &payload);
        if self.rng.chance(10) {
            u[4..6].copy_from_slice(&(self.rng.next_u64() as u16).to_be_bytes());
        }
        u
    }

    fn icmp(&mut self, _src: Ipv4Addr) -> Vec<u8> {
        match self.rng.below(4) {
            // Echo request, with data.
            0 => {
                let data = self.rng.some_bytes(0, 100);
                icmp_message(8, 0, [0, 1, 0, self.rng.byte()], &data)
            }
            // Destination unreachable quoting a backend's reply of a flow sent before (or
            // of anything).
            1 | 2 => {
                let (client, client_port, vip_port) = match self.flows.is_empty() {
                    false => self.flows[self.rng.below(self.flows.len() as u64) as usize],
                    true => (CLIENT, 1024, 80),
                };
                let mut reply = Ip::to(VIP, client, self.rng.pick(&[6, 17]));
                reply.ihl = self.rng.pick(&[5, 5, 6, 15]);
                if self.rng.chance(10) {
                    reply.frag = self.rng.next_u64() as u16;
                }
                let reply = reply.packet(&tcp(vip_port, client_port, ACK, 8));
                let any = self.rng.byte();
                let code = self.rng.pick(&[4, 4, 3, 1, 0, any]);
                let mtu = (576 + self.rng.below(1000) as u16).to_be_bytes();
                let mut q = quote(&reply);
                if self.rng.chance(20) {
                    q.truncate(self.rng.below(q.len() as u64) as usize);
                }
                icmp_message(3, code, [0, 0, mtu[0], mtu[1]], &q)
            }
            _ => {
                let rest = [self.rng.byte(), 0, 0, 0];
                let body = self.rng.some_bytes(0, 60);
                icmp_message(self.rng.byte(), self.rng.byte(), rest, &body)
            }
        }
    }
}

/// Which backend (0-based) a MAC address is, if any.
fn backend_of_mac(mac: &[u8]) -> Option<usize> {
    (0..BACKENDS.len()).find(|&i| mac == backend_mac(i))
}

/// The IP packet in `frame` (after a plain Ethernet header) of either family, by its own length
/// field, without Ethernet padding.
fn ip_packet(frame: &[u8]) -> Option<&[u8]> {
    let len = |at: usize| usize::from(u16::from_be_bytes([frame[at], frame[at + 1]]));
    match u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) {
        ETH_P_IPV6 => frame.get(14..14 + 40 + len(18)),
        _ => frame.get(14..14 + len(16)),
    }
}

/// Check a frame the balancer sent on (`XDP_TX` or redirect): which kind it is, or what is wrong.
pub fn check_forwarded(input: &[u8], out: &[u8]) -> Result<usize> {
    ensure!(out.len() >= 34, "forwarded frame of {} bytes", out.len());
    let ether_type = u16::from_be_bytes([out[12], out[13]]);
    if ether_type == ETH_P_IP && out[23] == lb_common::IPPROTO_IPIP && out[26..30] == LB.octets() {
        check_ipip(input, out, true)?;
        return Ok(0);
    }
    if ether_type == ETH_P_IPV6 && out.len() >= 54 && out[22..38] == LB6.octets() {
        check_ip6ip6(input, out, true)?;
        return Ok(0);
    }
    if let Some(b) = backend_of_mac(&out[..6]) {
        ensure!(out[6..12] == LB_MAC, "l2: source MAC not the LB's");
        ensure!(out.len() == input.len(), "l2: length changed");
        ensure!(out[12..] == input[12..], "l2: more than the MACs changed");
        ensure!(b < BACKENDS.len());
        return Ok(1);
    }
    match ether_type {
        ETH_P_IP => check_icmp_answer(input, out)?,
        ETH_P_IPV6 => check_icmp6_answer(input, out)?,
        other => bail!("forwarded frame of ethertype {other:#06x}"),
    }
    Ok(2)
}

/// A frame in IPv6 from the LB to an IPv6 backend (IPv6 in IPv6 or IPv4 in IPv6): the outer
/// header as the balancer writes it, the inner packet as it came in; MACs as for `check_ipip`.
fn check_ip6ip6(input: &[u8], out: &[u8], to_backend_mac: bool) -> Result<()> {
    ensure!(out.len() >= 54, "IPv6 tunnel frame of {} bytes", out.len());
    let outer = &out[14..54];
    ensure!(outer[0] >> 4 == 6, "outer version {}", outer[0] >> 4);
    ensure!(outer[7] == 64, "outer hop limit {}", outer[7]);
    ensure!(outer[8..24] == LB6.octets(), "outer source is not the LB's");
    let inner = ip_packet(input).ok_or_else(|| anyhow::anyhow!("input has no whole IP packet"))?;
    let next = if inner[0] >> 4 == 6 { 41 } else { 4 };
    ensure!(
        outer[6] == next,
        "outer next header {} for IPv{}",
        outer[6],
        inner[0] >> 4
    );
    let payload = usize::from(u16::from_be_bytes([outer[4], outer[5]]));
    ensure!(
        payload == out.len() - 54,
        "outer payload length {payload}, frame {}",
        out.len()
    );
    ensure!(out[54..] == *inner, "inner packet differs from the input's");
    let mut d = [0u8; 16];
    d.copy_from_slice(&outer[24..40]);
    let dst = IpAddr::from(Ipv6Addr::from(d));
    let backends = BACKENDS6.map(IpAddr::from);
    tunnel_macs(
        input,
        out,
        dst,
        to_backend_mac,
        &backends,
        UNRESOLVED6.into(),
    )
}

/// The MACs of a tunnelled frame to `dst`: for `XDP_TX` (`to_backend_mac`) from the LB to the
/// MAC of `dst`, one of `backends`; passed to the kernel (no neighbour), `dst` is `unresolved`
/// and the frame keeps its own MACs.
fn tunnel_macs(
    input: &[u8],
    out: &[u8],
    dst: IpAddr,
    to_backend_mac: bool,
    backends: &[IpAddr],
    unresolved: IpAddr,
) -> Result<()> {
    if to_backend_mac {
        let b = backends
            .iter()
            .position(|a| *a == dst)
            .ok_or_else(|| anyhow::anyhow!("outer destination {dst} is no backend"))?;
        ensure!(out[..6] == backend_mac(b), "MAC of backend {dst}");
        ensure!(out[6..12] == LB_MAC, "source MAC");
    } else {
        ensure!(dst == unresolved, "passed tunnel to {dst}");
        ensure!(out[..12] == input[..12], "MACs of a passed frame changed");
    }
    Ok(())
}

/// An ICMPv6 answer of the balancer (packet too big, echo reply): back to the sender, from the
/// address it wrote to, checksummed over the pseudo-header.
fn check_icmp6_answer(input: &[u8], out: &[u8]) -> Result<()> {
    ensure!(
        out[..6] == input[6..12] && out[6..12] == input[..6],
        "MACs not swapped"
    );
    let ip = ip_packet(out).ok_or_else(|| anyhow::anyhow!("answer shorter than its length"))?;
    ensure!(ip.len() >= 48 && ip[0] >> 4 == 6, "answer's IPv6 header");
    ensure!(ip[6] == NH_ICMPV6, "answer is not ICMPv6");
    ensure!(
        ip[8..24] == input[38..54],
        "answer not from the address written to"
    );
    ensure!(ip[24..40] == input[22..38], "answer not to the sender");
    let addr = |b: &[u8]| -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        Ipv6Addr::from(a)
    };
    let valid = |p: &[u8]| checksum6(addr(&p[8..24]), addr(&p[24..40]), NH_ICMPV6, &p[40..]) == 0;
    match ip[40] {
        2 => {
            ensure!(ip.len() == 1280, "packet too big of {} bytes", ip.len());
            ensure!(valid(ip), "packet too big's checksum");
        }
        129 => {
            let request = ip_packet(input).ok_or_else(|| anyhow::anyhow!("short request"))?;
            ensure!(
                request[40] == ICMP6_ECHO_REQUEST,
                "echo reply to type {}",
                request[40]
            );
            ensure!(
                ip[44..] == request[44..],
                "echo reply's identifier, sequence or data differ"
            );
            ensure!(valid(ip) == valid(request), "echo reply's ICMPv6 checksum");
        }
        kind => bail!("ICMPv6 answer of type {kind}"),
    }
    Ok(())
}

/// A frame passed to the kernel changed by the balancer: a tunnel towards a backend whose next
/// hop has no neighbour entry yet.
fn check_passed(input: &[u8], out: &[u8]) -> Result<()> {
    if out.len() >= 54 && out[12..14] == ETH_P_IPV6.to_be_bytes() {
        check_ip6ip6(input, out, false)
    } else {
        check_ipip(input, out, false)
    }
}

/// An IPIP frame: outer header valid and from the LB (its source checked here too: a passed frame
/// is not classified by it) to a backend, inner packet as it came in;
/// for `XDP_TX` (`to_backend_mac`) addressed to that backend's MAC, else (passed to the kernel
/// for neighbour resolution) with the frame's own MACs.
fn check_ipip(input: &[u8], out: &[u8], to_backend_mac: bool) -> Result<()> {
    let outer = &out[14..34];
    ensure!(outer[0] == 0x45, "outer version/IHL {:#x}", outer[0]);
    ensure!(checksum(outer) == 0, "outer checksum");
    ensure!(outer[8] == 64, "outer TTL {}", outer[8]);
    ensure!(
        outer[12..16] == LB.octets(),
        "outer source {}",
        Ipv4Addr::new(outer[12], outer[13], outer[14], outer[15])
    );
    let total = usize::from(u16::from_be_bytes([outer[2], outer[3]]));
    ensure!(
        total == out.len() - 14,
        "outer length {total}, frame {}",
        out.len()
    );
    let dst = Ipv4Addr::new(outer[16], outer[17], outer[18], outer[19]);
    let inner =
        ip_packet(input).ok_or_else(|| anyhow::anyhow!("input has no whole IPv4 packet"))?;
    ensure!(out[34..] == *inner, "inner packet differs from the input's");
    let backends = BACKENDS.map(IpAddr::from);
    tunnel_macs(
        input,
        out,
        dst.into(),
        to_backend_mac,
        &backends,
        UNRESOLVED.into(),
    )
}

/// An ICMP answer of the balancer: back to the sender, from the address it wrote to.
fn check_icmp_answer(input: &[u8], out: &[u8]) -> Result<()> {
    ensure!(
        out[..6] == input[6..12] && out[6..12] == input[..6],
        "MACs not swapped"
    );
    let ihl = usize::from(out[14] & 0x0f) * 4;
    ensure!(out[14] >> 4 == 4 && ihl >= 20, "answer's IPv4 header");
    ensure!(out[23] == 1, "answer is not ICMP");
    let ip = ip_packet(out).ok_or_else(|| anyhow::anyhow!("answer shorter than its length"))?;
    ensure!(checksum(&ip[..ihl]) == 0, "answer's IPv4 checksum");
    ensure!(
        ip[12..16] == input[30..34],
        "answer not from the address written to"
    );
    ensure!(ip[16..20] == input[26..30], "answer not to the sender");
    match (ip[ihl], ip[ihl + 1]) {
        // Built by the balancer: always a valid checksum.
        (3, 4) => ensure!(checksum(&ip[ihl..]) == 0, "frag-needed's ICMP checksum"),
        // The request turned round: the same message but the type, its checksum updated for
        // the type (the data is not summed again), so valid exactly when the request's was.
        (0, _) => {
            let request = ip_packet(input).ok_or_else(|| anyhow::anyhow!("short request"))?;
            ensure!(request[ihl] == 8, "echo reply to type {}", request[ihl]);
            ensure!(
                ip[ihl + 4..] == request[ihl + 4..],
                "echo reply's identifier, sequence or data differ"
            );
            ensure!(
                (checksum(&ip[ihl..]) == 0) == (checksum(&request[ihl..]) == 0),
                "echo reply's ICMP checksum"
            );
        }
        (kind, code) => bail!("answer of type {kind} code {code}"),
    }
    Ok(())
}

/// Run `frames` frames from `seed` through `dp`'s balancer (received on `ifindex`), checking
/// each; `progress` is told the frames done now and then.
pub fn run(
    dp: &Dataplane,
    ifindex: u32,
    frames: u64,
    seed: u64,
    mut progress: impl FnMut(u64),
) -> Result<FuzzReport> {
    let prog = dp.balancer()?;
    let mut source = FrameSource::new(seed);
    let mut report = FuzzReport::default();
    let total = |dp: &Dataplane| -> Result<u64> { Ok(dp.reason_stats()?.values().sum()) };
    let base = total(dp)?;
    let started = Instant::now();
    for n in 0..frames {
        let input = source.next_frame();
        let (action, out) = crate::fixture::run(prog, ifindex, &input);
        let verdict = match action {
            XDP_DROP => Ok(()),
            XDP_PASS if out == input => Ok(()),
            XDP_PASS => check_passed(&input, &out),
            XDP_TX | XDP_REDIRECT => check_forwarded(&input, &out).map(|kind| {
                report.forwarded[kind] += 1;
            }),
            other => Err(anyhow::anyhow!("action {other}")),
        };
        if let Err(e) = verdict {
            bail!(
                "frame {n} of seed {seed}: {e:#}; action {action}\ninput:\n{}\noutput:\n{}",
                hex(&input),
                hex(&out)
            );
        }
        report.actions[(action as usize).saturating_sub(1).min(3)] += 1;
        let done = n + 1;
        if done <= CHECK_EACH_FIRST || done % CHECK_EVERY == 0 || done == frames {
            let counted = total(dp)? - base;
            ensure!(
                counted == done,
                "after frame {n} of seed {seed}: {counted} packets counted for {done} frames\ninput:\n{}",
                hex(&input)
            );
            if done % CHECK_EVERY == 0 {
                progress(done);
            }
        }
        report.frames = done;
    }
    report.elapsed = started.elapsed();
    report.reasons_seen = dp
        .reason_stats()?
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, _)| r)
        .collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_frames() {
        let mut a = FrameSource::new(7);
        let mut b = FrameSource::new(7);
        let mut c = FrameSource::new(8);
        let fa: Vec<_> = (0..200).map(|_| a.next_frame()).collect();
        let fb: Vec<_> = (0..200).map(|_| b.next_frame()).collect();
        let fc: Vec<_> = (0..200).map(|_| c.next_frame()).collect();
        assert_eq!(fa, fb);
        assert_ne!(fa, fc);
        assert!(fa.iter().all(|f| f.len() >= 14));
    }

    #[test]
    fn the_checks_catch_a_changed_inner_packet() {
        let syn = crate::fixture::client_syn(1000, 80);
        let input = inbound(&syn);
        let good = encapsulated(&syn, 0);
        assert_eq!(check_forwarded(&input, &good).unwrap(), 0);
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(check_forwarded(&input, &bad).is_err());
        let mut bad_sum = good.clone();
        bad_sum[24] ^= 1;
        assert!(check_forwarded(&input, &bad_sum).is_err());
        let mut l2 = input.clone();
        l2[..6].copy_from_slice(&backend_mac(1));
        l2[6..12].copy_from_slice(&LB_MAC);
        assert_eq!(check_forwarded(&input, &l2).unwrap(), 1);
        l2[40] ^= 1;
        assert!(check_forwarded(&input, &l2).is_err());
    }
}
