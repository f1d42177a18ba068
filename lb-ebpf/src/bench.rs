//! Programs for `cargo xtask bench`, in the balancer's object so they are measured side by side
//! with it: two floors (what any XDP forwarder costs at least), a packet generator run in
//! live-frames mode, and the sink that counts what the balancer forwarded.

use crate::{
    maps::{BENCH_GEN, BENCH_GEN_HEADER},
    parse::{self, ETH_HLEN, ETH_P_IP, IPV4_HLEN, ptr_at},
};
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    BENCH_GEN_FIRST_PORT, BENCH_GEN_FLOWS, BENCH_GEN_HEADER_LEN, BENCH_SINK_PORT, IPPROTO_IPIP,
    IPPROTO_UDP,
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

/// Generator (`lb_common::programs::BENCH_GEN`), run with `BPF_F_TEST_XDP_LIVE_FRAMES` on a
/// sending interface, to offer the balancer more packets per second than a userspace generator
/// can on these machines: header from `BENCH_GEN_HEADER`, next source port, `XDP_TX`.
#[xdp]
pub fn xlb_bench_gen(ctx: XdpContext) -> u32 {
    let (Some(header), Some(frame)) = (
        BENCH_GEN_HEADER.get(0),
        ptr_at::<[u8; BENCH_GEN_HEADER_LEN]>(&ctx, 0),
    ) else {
        return xdp_action::XDP_ABORTED;
    };
    let dst = frame.cast::<u64>();
    // Word by word: a plain array copy became a byte-by-byte memcpy subprogram call.
    for i in 0..BENCH_GEN_HEADER_LEN / 8 {
        // SAFETY: `ptr_at` checked all BENCH_GEN_HEADER_LEN bytes; packet data may be
        // unaligned, hence write_unaligned.
        unsafe { dst.add(i).write_unaligned(header.words[i]) };
    }
    let tail = header.words[BENCH_GEN_HEADER_LEN / 8].to_ne_bytes();
    // SAFETY: the last 2 of the checked bytes (BENCH_GEN_HEADER_LEN = 5 × 8 + 2).
    unsafe {
        frame
            .cast::<u8>()
            .add(BENCH_GEN_HEADER_LEN - 2)
            .cast::<[u8; 2]>()
            .write([tail[0], tail[1]])
    };
    let n = BENCH_GEN.get_ptr_mut(0).map_or(0, |c| {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe {
            *c += 1;
            *c
        }
    });
    let port = BENCH_GEN_FIRST_PORT + (n % u64::from(BENCH_GEN_FLOWS)) as u16;
    // The UDP checksum stays as the header had it, so generator headers carry 0 (none, valid in
    // IPv4). Source port: bytes 34..36.
    // SAFETY: within the checked header.
    unsafe {
        frame
            .cast::<u8>()
            .add(ETH_HLEN + IPV4_HLEN)
            .cast::<[u8; 2]>()
            .write(port.to_be_bytes())
    };
    xdp_action::XDP_TX
}

/// Sink (`lb_common::programs::BENCH_SINK`): drops the flood, plain or IPIP-encapsulated, as a
/// balancer sends it on; a veth counts the drops. Passes everything else.
#[xdp]
pub fn xlb_bench_sink(ctx: XdpContext) -> u32 {
    if is_flood(&ctx) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// IPv4 (no options) UDP to `BENCH_SINK_PORT`, or IPIP around one.
#[inline(always)]
fn is_flood(ctx: &XdpContext) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return false;
    }
    match ipv4_proto(ctx, ETH_HLEN) {
        Some(IPPROTO_UDP) => udp_to_sink(ctx, ETH_HLEN + IPV4_HLEN),
        Some(IPPROTO_IPIP) => {
            ipv4_proto(ctx, ETH_HLEN + IPV4_HLEN) == Some(IPPROTO_UDP)
                && udp_to_sink(ctx, ETH_HLEN + 2 * IPV4_HLEN)
        }
        _ => false,
    }
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
