//! ICMPv6 addressed to an IPv6 VIP address, as `vip_icmp.rs` handles ICMP for IPv4 (read its
//! comment for why): packet too big (type 2) and destination unreachable (type 1) quoting a live
//! flow go to that flow's backend, forwarded like the flow's own packets; echo requests are
//! answered by the balancer where the configuration allows it; everything else to a VIP address
//! (time exceeded, parameter problem, NDP or MLD addressed to the VIP itself) is dropped.
//! Neighbour discovery for the LB's own addresses and multicast never reaches here: it is not
//! to a VIP address and is passed by `ipv6.rs`.

use crate::{
    Verdict,
    balancer::Steered,
    icmp::QUOTED_L4,
    icmp6::{ICMP6_HLEN, ICMP6_PACKET_TOO_BIG},
    ipv6::{self, Header},
    maps::{VIP_ADDRS6, VIPS6},
    parse::{ETH_HLEN, IPV6_HLEN, frame_len, ptr_at},
    vip_icmp::{self, Outer},
};
use aya_ebpf::programs::XdpContext;
use core::hint::black_box;
use lb_common::{Addr, IPPROTO_TCP, IPPROTO_UDP, VipKey6, reason};
use network_types::eth::EthHdr;

const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
/// Hop limit of the balancer's echo replies.
const ECHO_REPLY_HOP_LIMIT: u8 = 64;

/// An ICMPv6 packet whose header is at `l4` (past any extension headers): pass it if it is not
/// to a VIP address, else answer or drop it, or (`Ok`) have `out` forward it. A stage of its
/// own (see `balancer::try_balance`), which reads the fixed header again.
#[inline(never)]
pub fn handle(ctx: &XdpContext, l4: usize, out: &mut Steered) -> Result<(), Verdict> {
    let (hdr, _) = ipv6::header(ctx)?;
    let hdr = &hdr;
    // SAFETY: read-only lookup, copied out.
    let Some(addr_flags) = (unsafe { VIP_ADDRS6.get(hdr.dst) }).map(|a| a.flags) else {
        return Err(Verdict::pass(reason::PASS_NOT_VIP));
    };
    let Some(icmp) = ptr_at::<[u8; ICMP6_HLEN]>(ctx, black_box(l4)) else {
        return Err(Verdict::drop(reason::DROP_MALFORMED_L4));
    };
    // SAFETY: bounds checked.
    let (kind, code) = unsafe { ((*icmp)[0], (*icmp)[1]) };
    let Some(ip_len) = ipv6::lengths(hdr, l4 + ICMP6_HLEN - ETH_HLEN, frame_len(ctx)) else {
        return Err(Verdict::drop(reason::DROP_BAD_LENGTH));
    };
    let outer = Outer {
        dst_addr: 0,
        ihl: l4 - ETH_HLEN,
        ip_len,
        tos: hdr.traffic_class,
        df: true,
    };
    match kind {
        ICMP6_DEST_UNREACH | ICMP6_PACKET_TOO_BIG => {
            error(ctx, hdr, &outer, kind == ICMP6_PACKET_TOO_BIG, out)
        }
        // With extension headers a reply would have to reverse or drop them, as a host's stack
        // decides: not answered, as IPv4 echo with options.
        ICMP6_ECHO_REQUEST if vip_icmp::echo_on(addr_flags) && outer.ihl == IPV6_HLEN => {
            Err(echo_reply(ctx, code))
        }
        _ => Err(Verdict::drop(reason::DROP_ICMP_OTHER)),
    }
}

/// Turn the echo request in the frame into its reply, in place: MACs and addresses swapped, hop
/// limit 64, type 129; identifier, sequence number and data stay. The checksum's pseudo-header
/// sum does not change when source and destination swap, so only the type word is accounted for.
#[inline(always)]
fn echo_reply(ctx: &XdpContext, code: u8) -> Verdict {
    let (Some(eth), Some(ip), Some(icmp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN),
        ptr_at::<[u8; ICMP6_HLEN]>(ctx, ETH_HLEN + IPV6_HLEN),
    ) else {
        return Verdict::drop(reason::DROP_MALFORMED_L4);
    };
    // SAFETY: bounds checked; nothing moves the packet meanwhile.
    unsafe {
        let mut hdr = *ip;
        for i in 8..24 {
            hdr.swap(i, i + 16);
        }
        hdr[7] = ECHO_REPLY_HOP_LIMIT;
        *ip = hdr;
    }
    vip_icmp::answer_echo(eth, icmp, ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY, code)
}

/// A packet-too-big (`too_big`) or destination-unreachable error: forwarded to the backend of
/// the flow its quote is about, or dropped. The quote is a backend's reply, VIP:port →
/// client:port; it must hold the fixed header and 8 bytes of TCP or UDP right after it (a
/// quoted extension header names no flow), and come from the address the error came to.
#[inline(always)]
fn error(
    ctx: &XdpContext,
    hdr: &Header,
    outer: &Outer,
    too_big: bool,
    out: &mut Steered,
) -> Result<(), Verdict> {
    let malformed = Err(Verdict::drop(reason::DROP_MALFORMED_L4));
    let no_flow = Err(Verdict::drop(reason::DROP_ICMP_NO_FLOW));
    let quoted = ETH_HLEN + outer.ihl + ICMP6_HLEN;
    // Inside the ICMPv6 packet itself, not only in the (possibly padded) frame.
    if usize::from(outer.ip_len) < outer.ihl + ICMP6_HLEN + IPV6_HLEN + QUOTED_L4 {
        return malformed;
    }
    let (Some(q), Some(l4)) = (
        ptr_at::<[u8; IPV6_HLEN]>(ctx, black_box(quoted)),
        ptr_at::<[u8; QUOTED_L4]>(ctx, black_box(quoted + IPV6_HLEN)),
    ) else {
        return malformed;
    };
    // SAFETY: bounds checked; copied out before anything moves.
    let (q, l4) = unsafe { (*q, *l4) };
    if q[0] >> 4 != 6 {
        return malformed;
    }
    let proto = q[6];
    let mut vip_addr = [0u8; 16];
    vip_addr.copy_from_slice(&q[8..24]);
    let mut client = [0u8; 16];
    client.copy_from_slice(&q[24..40]);
    let vip_addr = Addr::from_octets(vip_addr);
    if vip_addr != hdr.dst || !(proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
        return no_flow;
    }
    let key = VipKey6 {
        addr: vip_addr,
        port: u16::from_ne_bytes([l4[0], l4[1]]),
        proto,
        _pad: 0,
    };
    // SAFETY: copied out at once; the agent replaces VIP entries whole.
    let Some(vip) = (unsafe { VIPS6.get(key) }).copied() else {
        return no_flow;
    };
    // The flow as the balancer keys it, client → VIP: the reply's tuple reversed.
    let flow = crate::balancer::flow_key(
        Addr::from_octets(client),
        vip_addr,
        [l4[2], l4[3], l4[0], l4[1]],
        proto,
    );
    vip_icmp::forward_error(ctx, vip, flow, outer, too_big, out)
}
