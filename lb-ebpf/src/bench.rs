//! Programs for `cargo xtask bench`, in the balancer's object so they are measured side by side
//! with it: the floors (what any XDP forwarder costs at least, and what any balancer with
//! connection tracking costs at least), a packet generator run in live-frames mode, and the sink
//! that counts what the balancer forwarded.

use crate::{
    balancer, csum,
    maps::{BENCH_GEN, BENCH_GEN_HEADER, FLOOR_FLOWS, FLOOR_FLOWS_PERCPU, FLOOR_HOP},
    parse::{self, ETH_HLEN, ETH_P_IP, IPV4_HLEN, ptr_at, store4_at},
};
use aya_ebpf::{
    bindings::{BPF_ANY, xdp_action},
    helpers::bpf_xdp_adjust_head,
    macros::xdp,
    maps::LruHashMap,
    programs::XdpContext,
};
use core::arch::asm;
use lb_common::{
    Addr, BENCH_CODE_MOVES, BENCH_FLOOD_NET, BENCH_FLOOD_PREFIX_LEN, BENCH_GEN_FIRST_PORT,
    BENCH_GEN_HEADER_LEN, BENCH_GEN_VARY_SOURCE, BENCH_SINK_PORT, FlowKey, FlowValue, IPPROTO_IPIP,
    IPPROTO_TCP, IPPROTO_UDP,
};
use network_types::eth::EthHdr;

/// Floor: the cheapest program that forwards.
#[xdp]
pub fn xlb_floor_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// Floor: what any L4 balancer must at least do, parse up to the ports, then forward.
#[xdp]
pub fn xlb_floor_parse_tx(ctx: XdpContext) -> u32 {
    if parse::tcp_ports(&ctx).is_some() {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_PASS
    }
}

/// Stateful floor (`lb_common::programs::FLOOR_FLOW_TX`): the least a balancer with connection
/// tracking does per packet. Established: parse, one lookup that hits, the destination MAC from
/// the entry, `XDP_TX`. New: the lookup misses, one insert, then the same.
#[xdp]
pub fn xlb_floor_flow_tx(ctx: XdpContext) -> u32 {
    flow_floor(&ctx, &FLOOR_FLOWS, true)
}

/// The stateful floor after `BENCH_CODE_MOVES` register moves (`FLOOR_FLOW_TX_CODE`): the same
/// work, plus code that computes nothing and depends on nothing, so what it adds is the cost of
/// fetching and running that much code, in `BPF_PROG_TEST_RUN` (the same few lines of code
/// every time) and on the live path (where the kernel's receive path and the generator run in
/// between).
#[xdp]
pub fn xlb_floor_flow_tx_code(ctx: XdpContext) -> u32 {
    // SAFETY: moves into a scratch register the asm declares clobbered; nothing else is touched.
    unsafe {
        asm!(
            ".rept {n}",
            "r1 = 1",
            ".endr",
            n = const BENCH_CODE_MOVES,
            out("r1") _,
        )
    };
    flow_floor(&ctx, &FLOOR_FLOWS, true)
}

/// New-flow floor (`FLOOR_FLOW_INSERT_TX`): parse, one insert (no lookup first), MAC, `XDP_TX`.
#[xdp]
pub fn xlb_floor_flow_insert_tx(ctx: XdpContext) -> u32 {
    flow_floor(&ctx, &FLOOR_FLOWS, false)
}

/// `xlb_floor_flow_tx` on the per-CPU LRU (`BPF_F_NO_COMMON_LRU`).
#[xdp]
pub fn xlb_floor_flow_tx_percpu(ctx: XdpContext) -> u32 {
    flow_floor(&ctx, &FLOOR_FLOWS_PERCPU, true)
}

/// `xlb_floor_flow_insert_tx` on the per-CPU LRU (`BPF_F_NO_COMMON_LRU`).
#[xdp]
pub fn xlb_floor_flow_insert_tx_percpu(ctx: XdpContext) -> u32 {
    flow_floor(&ctx, &FLOOR_FLOWS_PERCPU, false)
}

/// The stateful floors: TCP or UDP over option-less IPv4 (anything else passes), the flow key as
/// the balancer builds it, a lookup in `table` when `lookup` (a hit takes the destination MAC
/// from the entry), an insert on a miss or when not `lookup`. The floor picks no backend: a new
/// entry names the packet's destination, so the MAC it writes still depends on the table. Nor
/// does it read a clock (the balancer stamps `last_seen_ns`): a floor, not a balancer.
#[inline(always)]
fn flow_floor(ctx: &XdpContext, table: &LruHashMap<FlowKey, FlowValue>, lookup: bool) -> u32 {
    let Some(key) = flow_key(ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: the value is copied out at once; a concurrent delete can only make it stale.
    let hit = if lookup {
        unsafe { table.get(key) }.map(|v| v.backend_addr)
    } else {
        None
    };
    let backend = match hit {
        Some(addr) => addr,
        None => {
            let value = FlowValue::new(key.dst_addr, 0, 0, 0);
            if table.insert(key, value, u64::from(BPF_ANY)).is_err() {
                return xdp_action::XDP_ABORTED;
            }
            key.dst_addr
        }
    };
    let Some(dst) = ptr_at::<[u8; 6]>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let [a, b, c, d] = backend.v4().to_ne_bytes();
    // SAFETY: bounds checked by ptr_at. A locally administered MAC holding the backend address
    // (network order, as stored).
    unsafe { dst.write([0x02, 0x00, a, b, c, d]) };
    xdp_action::XDP_TX
}

/// IPIP floor (`lb_common::programs::FLOOR_FLOW_IPIP`): the stateful floor's lookup (an insert
/// on a miss), then the packet sent on inside an outer IPv4 header, as any `ipip` balancer must:
/// the head grown by 20 bytes, an Ethernet header written in front (the destination MAC from the
/// entry as the stateful floor writes it, the source the frame's own destination, EtherType
/// IPv4), an outer header from the packet's destination (the VIP: a floor reads no
/// configuration) to the entry's backend, with the inner header's TOS and DF, its total length,
/// ID 0, TTL 64, protocol 4 and its checksum; `XDP_TX`. It resolves no next hop, trims no
/// padding and numbers no ID of a packet without DF (xlb does all three): the least an IPIP
/// balancer with connection tracking does per packet.
#[xdp]
pub fn xlb_floor_flow_ipip(ctx: XdpContext) -> u32 {
    let Some(key) = flow_key(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // The stateful floor's lookup, written out as there (a shared helper changed the stateful
    // floor's own code).
    // SAFETY: the value is copied out at once; a concurrent delete can only make it stale.
    let backend = match unsafe { FLOOR_FLOWS.get(key) }.map(|v| v.backend_addr) {
        Some(addr) => addr,
        None => {
            let value = FlowValue::new(key.dst_addr, 0, 0, 0);
            if FLOOR_FLOWS.insert(key, value, u64::from(BPF_ANY)).is_err() {
                return xdp_action::XDP_ABORTED;
            }
            key.dst_addr
        }
    };
    // What the outer header takes from the inner one, read before the head moves (every packet
    // pointer is invalid after it).
    let Some(ip) = ptr_at::<network_types::ip::Ipv4Hdr>(&ctx, ETH_HLEN) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let [len_hi, len_lo] = parse::ipv4_tot_len(ip)
        .wrapping_add(IPV4_HLEN as u16)
        .to_be_bytes();
    let df = if parse::ipv4_frags(ip) & parse::IP_DF != 0 {
        0x40
    } else {
        0
    };
    let tos = ip.tos;
    // SAFETY: growing the head; every pointer is derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_HLEN as i32)) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    // The new Ethernet header and the outer IPv4 header. The head grew in front of the frame,
    // which stays where it was: its Ethernet header now starts at byte 20.
    let Some(head) = ptr_at::<[u8; ETH_HLEN + IPV4_HLEN]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let words = [
        u32::from_ne_bytes([0x45, tos, len_hi, len_lo]),
        u32::from_ne_bytes([0, 0, df, 0]),
        u32::from_ne_bytes([64, IPPROTO_IPIP, 0, 0]),
        key.dst_addr.v4(),
        backend.v4(),
    ];
    let [c0, c1] = csum::ipv4_header_words(&words).to_ne_bytes();
    // SAFETY: ptr_at checked the 34 bytes written and read. Word and half-word accesses, as
    // `nexthop::Hop::write_macs` and `forward::encap4` make them: destination MAC 02:00 and the
    // backend's address (as the stateful floor writes it), source MAC the frame's own
    // destination (bytes 20..26 now), EtherType IPv4, then the outer header's five words.
    unsafe {
        asm!(
            "*(u16 *)({h} + 0) = {mac_hi}",
            "*(u32 *)({h} + 2) = {backend}",
            "{t} = *(u16 *)({h} + 20)",
            "*(u16 *)({h} + 6) = {t}",
            "{t} = *(u32 *)({h} + 22)",
            "*(u32 *)({h} + 8) = {t}",
            "*(u16 *)({h} + 12) = {ether_type}",
            h = in(reg) head,
            mac_hi = in(reg) u64::from(u16::from_ne_bytes([0x02, 0x00])),
            backend = in(reg) u64::from(backend.v4()),
            ether_type = in(reg) u64::from(ETH_P_IP.to_be()),
            t = out(reg) _,
            options(nostack),
        );
        let outer = head.cast::<u8>().add(ETH_HLEN).cast::<[u8; IPV4_HLEN]>();
        store4_at::<0, _>(outer, words[0]);
        store4_at::<4, _>(outer, words[1]);
        store4_at::<8, _>(outer, u32::from_ne_bytes([64, IPPROTO_IPIP, c0, c1]));
        store4_at::<12, _>(outer, words[3]);
        store4_at::<16, _>(outer, words[4]);
    }
    xdp_action::XDP_TX
}

/// Hop floor (`lb_common::programs::FLOOR_HOP`): the stateful floor as a working hop, for the
/// end-to-end benchmark. TCP and UDP to the VIP: one lookup in `FLOOR_FLOWS`, one insert if it
/// misses (a new flow), both MACs to the one backend, `XDP_TX`. Everything else passes (ARP,
/// the backends' own traffic). It picks no backend, counts nothing and reads no clock: the least
/// a balancer with connection tracking puts between client and server.
#[xdp]
pub fn xlb_floor_hop(ctx: XdpContext) -> u32 {
    let (Some(key), Some(hop)) = (flow_key(&ctx), FLOOR_HOP.get(0)) else {
        return xdp_action::XDP_PASS;
    };
    if key.dst_addr != Addr::from_v4(hop.vip) {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: only whether the entry exists is read.
    if unsafe { FLOOR_FLOWS.get(key) }.is_none() {
        let value = FlowValue::new(key.dst_addr, 0, 0, 0);
        if FLOOR_FLOWS.insert(key, value, u64::from(BPF_ANY)).is_err() {
            return xdp_action::XDP_ABORTED;
        }
    }
    let Some(eth) = ptr_at::<[u8; 12]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let (d, s) = (hop.dst_mac, hop.src_mac);
    // SAFETY: bounds checked by ptr_at: destination then source MAC, as on the wire.
    unsafe {
        eth.write([
            d[0], d[1], d[2], d[3], d[4], d[5], s[0], s[1], s[2], s[3], s[4], s[5],
        ])
    };
    xdp_action::XDP_TX
}

/// The flow key of an Ethernet/IPv4 (no options)/TCP or UDP packet, every field as the wire has
/// it (network order).
#[inline(always)]
fn flow_key(ctx: &XdpContext) -> Option<FlowKey> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return None;
    }
    let ip = ptr_at::<network_types::ip::Ipv4Hdr>(ctx, ETH_HLEN)?;
    let ports = ptr_at::<[u8; 4]>(ctx, ETH_HLEN + IPV4_HLEN)?;
    // SAFETY: as above.
    let (ip, ports) = unsafe { (&*ip, &*ports) };
    let proto = ip.proto;
    if ip.vihl != 0x45 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    // Word loads, as the balancer's parse does them.
    let (src, dst) = parse::ipv4_addrs(ip);
    Some(balancer::flow_key(
        Addr::from_v4(src),
        Addr::from_v4(dst),
        parse::load4(ports),
        proto,
    ))
}

/// Generator (`lb_common::programs::BENCH_GEN`), run with `BPF_F_TEST_XDP_LIVE_FRAMES` on a
/// sending interface, to offer the balancer more packets per second than a userspace generator
/// can on these machines: header from `BENCH_GEN_HEADER`, the next flow's source, `XDP_TX`.
#[xdp]
pub fn xlb_bench_gen(ctx: XdpContext) -> u32 {
    let (Some(header), Some(frame)) = (
        BENCH_GEN_HEADER.get(0),
        ptr_at::<[u8; BENCH_GEN_HEADER_LEN]>(&ctx, 0),
    ) else {
        return xdp_action::XDP_ABORTED;
    };
    let bytes = frame.cast::<u8>();
    let dst = frame.cast::<u64>();
    // Word by word: a plain array copy became a byte-by-byte memcpy subprogram call.
    for i in 0..BENCH_GEN_HEADER_LEN / 8 {
        // SAFETY: `ptr_at` checked all BENCH_GEN_HEADER_LEN bytes; packet data may be
        // unaligned, hence write_unaligned.
        unsafe { dst.add(i).write_unaligned(header.words[i]) };
    }
    let tail = header.words[BENCH_GEN_HEADER_LEN / 8].to_ne_bytes();
    // SAFETY: the last 6 of the checked bytes (BENCH_GEN_HEADER_LEN = 6 × 8 + 6).
    unsafe {
        bytes
            .add(BENCH_GEN_HEADER_LEN - 6)
            .cast::<[u8; 6]>()
            .write([tail[0], tail[1], tail[2], tail[3], tail[4], tail[5]])
    };
    let n = BENCH_GEN.get_ptr_mut(0).map_or(0, |c| {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe {
            *c += 1;
            *c
        }
    });
    let Some(i) = n.checked_rem(u64::from(header.flows)) else {
        return xdp_action::XDP_ABORTED;
    };
    // Source port: bytes 34..36 (UDP and TCP alike).
    let sport = if header.vary == BENCH_GEN_VARY_SOURCE {
        let Some(addr_off) = i.checked_rem(u64::from(header.sources)) else {
            return xdp_action::XDP_ABORTED;
        };
        let port_off = i / u64::from(header.sources.max(1));
        let w3 = header.words[3].to_ne_bytes();
        let w4 = header.words[4].to_ne_bytes();
        let src = u32::from_be_bytes([w3[2], w3[3], w3[4], w3[5]]).wrapping_add(addr_off as u32);
        let [a, b, c, d] = src.to_be_bytes();
        let Some(ip) = ptr_at::<[u8; IPV4_HLEN]>(&ctx, ETH_HLEN) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: bounds checked; the header is rewritten whole, its checksum over the new one.
        unsafe {
            let mut hdr = *ip;
            hdr[10] = 0;
            hdr[11] = 0;
            hdr[12] = a;
            hdr[13] = b;
            hdr[14] = c;
            hdr[15] = d;
            let [c0, c1] = csum::ipv4_header(&hdr);
            hdr[10] = c0;
            hdr[11] = c1;
            *ip = hdr;
        }
        u16::from_be_bytes([w4[2], w4[3]]).wrapping_add(port_off as u16)
    } else {
        BENCH_GEN_FIRST_PORT.wrapping_add(i as u16)
    };
    // The checksum of a UDP flood stays as the header had it (0: none, valid in IPv4).
    // SAFETY: within the checked header.
    unsafe {
        bytes
            .add(ETH_HLEN + IPV4_HLEN)
            .cast::<[u8; 2]>()
            .write(sport.to_be_bytes())
    };
    xdp_action::XDP_TX
}

/// Sink (`lb_common::programs::BENCH_SINK`): drops the floods, plain or IPIP-encapsulated, as a
/// balancer sends them on (a veth counts the drops): UDP to `BENCH_SINK_PORT`, and TCP SYNs from
/// `BENCH_FLOOD_NET`. Passes everything else.
#[xdp]
pub fn xlb_bench_sink(ctx: XdpContext) -> u32 {
    if is_flood(&ctx) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// One of the floods, plain or inside IPIP.
#[inline(always)]
fn is_flood(ctx: &XdpContext) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return false;
    }
    let inner = match ipv4_proto(ctx, ETH_HLEN) {
        Some(IPPROTO_IPIP) => ETH_HLEN + IPV4_HLEN,
        Some(_) => ETH_HLEN,
        None => return false,
    };
    match ipv4_proto(ctx, inner) {
        Some(IPPROTO_UDP) => udp_to_sink(ctx, inner + IPV4_HLEN),
        Some(IPPROTO_TCP) => flood_syn(ctx, inner),
        _ => false,
    }
}

/// A TCP SYN from `BENCH_FLOOD_NET` in the option-less IPv4 header at `offset`.
#[inline(always)]
fn flood_syn(ctx: &XdpContext, offset: usize) -> bool {
    let (Some(ip), Some(tcp)) = (
        ptr_at::<[u8; IPV4_HLEN]>(ctx, offset),
        ptr_at::<[u8; 14]>(ctx, offset + IPV4_HLEN),
    ) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let (ip, tcp) = unsafe { (&*ip, &*tcp) };
    let src = u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let net = u32::from_be_bytes(BENCH_FLOOD_NET);
    let mask = u32::MAX << (32 - BENCH_FLOOD_PREFIX_LEN);
    src & mask == net && tcp[13] & 0x12 == 0x02
}

/// The protocol of an option-less IPv4 header at `offset`.
#[inline(always)]
fn ipv4_proto(ctx: &XdpContext, offset: usize) -> Option<u8> {
    let ip = ptr_at::<[u8; IPV4_HLEN]>(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    (ip[0] == 0x45).then_some(ip[9])
}

#[inline(always)]
fn udp_to_sink(ctx: &XdpContext, offset: usize) -> bool {
    ptr_at::<[u8; 8]>(ctx, offset).is_some_and(|udp| {
        // SAFETY: bounds checked by ptr_at.
        let udp = unsafe { &*udp };
        u16::from_be_bytes([udp[2], udp[3]]) == BENCH_SINK_PORT
    })
}
