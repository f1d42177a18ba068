//! ICMP addressed to a VIP address. With direct server return the backends answer from the VIP,
//! so a router on the way back to a client sends its errors about their replies to the VIP, that
//! is to the balancer. A "fragmentation needed" that died here would leave the backend sending
//! segments too large for the path, and the transfer would stall (a path-MTU black hole), so
//! destination-unreachable errors quoting a live flow go to that flow's backend, forwarded like
//! the flow's own packets. Echo requests are answered by the balancer itself (as Katran does),
//! where the configuration allows it. Everything else to a VIP address is dropped and counted.
//!
//! Every destination-unreachable code is forwarded, not only fragmentation needed (code 4): the
//! backend then sees what a server without a balancer in front would see (a connection still
//! being set up fails fast on host or port unreachable; TCP undoes its retransmission back-off
//! on host and network unreachable, RFC 6069), and it checks each error against its own socket
//! (RFC 5927) as it would then. Katran forwards them all as well. The two are counted apart
//! (`fwd_icmp_frag_needed`, `fwd_icmp_unreach`), so path-MTU messages stand out. Other types
//! (time exceeded, parameter problem, redirects, ...) are dropped: no backend acts on them.
//!
//! A forwarded error is not counted as the VIP's or the backend's traffic (those count the
//! clients' packets), and not shown by the per-VIP debug events.

use crate::{
    Verdict,
    balancer::{self, Lookup, Packet, Steered, UDP_HLEN},
    csum, debug, forward,
    icmp::{ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HLEN, QUOTED_L4},
    maps::{EMBRYOS, FLOWS, VIP_ADDRS, VIPS},
    parse::{ETH_HLEN, IP_OFFSET_MASK, IPV4_HLEN, frame_len, ptr_at},
};
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    Addr, CONFIG_F_ICMP_ECHO, FlowKey, IPPROTO_TCP, IPPROTO_UDP, VIP_ADDR_F_ICMP_ECHO, VipKey,
    VipMeta, reason,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const ICMP_ECHO: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
/// TTL of the balancer's echo replies (the request's TTL is the client's business).
const ECHO_REPLY_TTL: u8 = 64;

// Quoting 8 bytes of L4 header is what gives the ports; a UDP header is exactly that long.
const _: () = assert!(QUOTED_L4 == UDP_HLEN);

/// What the balancer already read of the ICMP packet's own IP header (IPv4, or IPv6 for
/// `vip_icmp6.rs`).
pub struct Outer {
    /// IPv4: network order (IPv6: unused, 0).
    pub dst_addr: u32,
    /// Bytes from the IP header to the ICMP header: IPv4's header length (validated: 20 to 60);
    /// IPv6's fixed header and extension headers.
    pub ihl: usize,
    /// Length of the whole IP packet, host order (as `Packet::ip_len`).
    pub ip_len: u16,
    pub tos: u8,
    /// Don't Fragment set.
    pub df: bool,
}

/// An ICMP packet (not a fragment) to `outer.dst_addr`: pass it if that is not a VIP address,
/// else answer or drop it, or (`Ok`) have `out` forward it.
#[inline(always)]
pub fn handle(ctx: &XdpContext, outer: &Outer, out: &mut Steered) -> Result<(), Verdict> {
    // SAFETY: read-only lookup, copied out.
    let Some(addr_flags) = (unsafe { VIP_ADDRS.get(outer.dst_addr) }).map(|a| a.flags) else {
        return Err(Verdict::pass(reason::PASS_NOT_VIP));
    };
    let l4 = ETH_HLEN + outer.ihl;
    let Some(icmp) = ptr_at::<[u8; ICMP_HLEN]>(ctx, l4) else {
        return Err(Verdict::drop(reason::DROP_MALFORMED_L4));
    };
    if !balancer::lengths_agree(outer.ip_len, outer.ihl + ICMP_HLEN, frame_len(ctx)) {
        return Err(Verdict::drop(reason::DROP_BAD_LENGTH));
    }
    // SAFETY: bounds checked.
    let (kind, code) = unsafe { ((*icmp)[0], (*icmp)[1]) };
    match kind {
        ICMP_DEST_UNREACH => unreachable(ctx, outer, l4 + ICMP_HLEN, code, out),
        ICMP_ECHO if echo_on(addr_flags) => Err(echo_reply(ctx, outer, code)),
        _ => Err(Verdict::drop(reason::DROP_ICMP_OTHER)),
    }
}

/// Echo requests to an address are answered when the global switch is on and at least one VIP
/// on the address allows it (the agent keeps `VIP_ADDR_F_ICMP_ECHO` so).
#[inline(always)]
pub fn echo_on(addr_flags: u32) -> bool {
    addr_flags & VIP_ADDR_F_ICMP_ECHO != 0 && balancer::config_flags() & CONFIG_F_ICMP_ECHO != 0
}

/// Turn the echo request in the frame into its reply, in place, and send it back the way it
/// came: MACs and addresses swapped, TTL 64, type 0 (echo reply); identifier, sequence number and
/// data stay. Requests with IP options are not answered: some (source routes, record route)
/// would have to be reversed or rewritten for the reply, as a host's stack does.
#[inline(always)]
fn echo_reply(ctx: &XdpContext, outer: &Outer, code: u8) -> Verdict {
    if outer.ihl != IPV4_HLEN {
        return Verdict::drop(reason::DROP_ICMP_OTHER);
    }
    let (Some(eth), Some(ip), Some(icmp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN),
        ptr_at::<[u8; ICMP_HLEN]>(ctx, ETH_HLEN + IPV4_HLEN),
    ) else {
        return Verdict::drop(reason::DROP_MALFORMED_L4);
    };
    // SAFETY: all three bounds checked; nothing moves the packet meanwhile.
    unsafe {
        let mut hdr = *ip;
        for i in 12..16 {
            hdr.swap(i, i + 4);
        }
        hdr[8] = ECHO_REPLY_TTL;
        hdr[10] = 0;
        hdr[11] = 0;
        let [c0, c1] = csum::ipv4_header(&hdr);
        hdr[10] = c0;
        hdr[11] = c1;
        *ip = hdr;
    }
    answer_echo(eth, icmp, ICMP_ECHO, ICMP_ECHO_REPLY, code)
}

/// The last steps of answering an echo request of either family in place, once its IP header is
/// turned around: MACs swapped; the type (`request` → `reply`) changed, and the checksum updated
/// for that word alone instead of summed again over the data (which may be as long as the MTU;
/// for ICMPv6 the pseudo-header's sum does not change when source and destination swap).
#[inline(always)]
pub fn answer_echo(
    eth: *mut EthHdr,
    icmp: *mut [u8; ICMP_HLEN],
    request: u8,
    reply: u8,
    code: u8,
) -> Verdict {
    // SAFETY: the callers got both pointers from `ptr_at`; nothing moved the packet since.
    unsafe {
        let (dst, src) = ((*eth).dst_addr, (*eth).src_addr);
        (*eth).dst_addr = src;
        (*eth).src_addr = dst;
        let check = u16::from_be_bytes([(*icmp)[2], (*icmp)[3]]);
        let check = csum::replace16(
            check,
            u16::from_be_bytes([request, code]),
            u16::from_be_bytes([reply, code]),
        );
        (*icmp)[0] = reply;
        [(*icmp)[2], (*icmp)[3]] = check.to_be_bytes();
    }
    Verdict::tx(reason::TX_ICMP_ECHO_REPLY)
}

/// A destination-unreachable error whose quoted packet starts at `quoted`: forwarded to the
/// backend of the flow it is about (`out`), or dropped.
#[inline(always)]
fn unreachable(
    ctx: &XdpContext,
    outer: &Outer,
    quoted: usize,
    code: u8,
    out: &mut Steered,
) -> Result<(), Verdict> {
    let malformed = Err(Verdict::drop(reason::DROP_MALFORMED_L4));
    let no_flow = Err(Verdict::drop(reason::DROP_ICMP_NO_FLOW));
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, quoted) else {
        return malformed;
    };
    // SAFETY: bounds checked; copied out before anything moves.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < IPV4_HLEN {
        return malformed;
    }
    // The quoted header and its first 8 bytes of L4 must lie inside the ICMP packet itself, not
    // only in the frame (which may be padded).
    if usize::from(outer.ip_len) < outer.ihl + ICMP_HLEN + ihl + QUOTED_L4 {
        return malformed;
    }
    // Opaque to the compiler: otherwise it derives the L4 pointer from the quoted header's
    // pointer plus `ihl`, a register the verifier never saw checked (`R6 offset is outside of
    // the packet`), instead of the pointer `ptr_at` compared with the packet's end.
    let Some(l4) = ptr_at::<[u8; QUOTED_L4]>(ctx, core::hint::black_box(quoted + ihl)) else {
        return malformed;
    };
    // SAFETY: bounds checked.
    let l4 = unsafe { &*l4 };
    // The quoted packet is a backend's reply, VIP:port → client:port; routers send errors to
    // the source of what they could not deliver, so it names the address the error came to.
    let (vip_addr, client_addr) = (
        u32::from_ne_bytes(ip.src_addr),
        u32::from_ne_bytes(ip.dst_addr),
    );
    // A non-first fragment carries no ports to find the flow by.
    if vip_addr != outer.dst_addr
        || u16::from_be_bytes(ip.frags) & IP_OFFSET_MASK != 0
        || !(ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP)
    {
        return no_flow;
    }
    let key = VipKey {
        addr: vip_addr,
        port: u16::from_ne_bytes([l4[0], l4[1]]),
        proto: ip.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once; the agent replaces VIP entries whole.
    let Some(vip) = (unsafe { VIPS.get(key) }).copied() else {
        return no_flow;
    };
    // The flow as the balancer keys it, client → VIP: the reply's tuple reversed.
    let flow = balancer::flow_key(
        Addr::from_v4(client_addr),
        Addr::from_v4(vip_addr),
        [l4[2], l4[3], l4[0], l4[1]],
        ip.proto,
    );
    forward_error(ctx, vip, flow, outer, code == ICMP_FRAG_NEEDED, out)
}

/// An ICMP error (of either family) about `flow` of `vip`, which came in `outer` (its own IP
/// header: `ip_len`, `tos` and `df` are the error packet's): `out` forwards it to the flow's
/// backend with the VIP's method, to be counted as a forwarded path-MTU error (`frag_needed`)
/// or another destination-unreachable error; `drop_icmp_no_flow` when no backend of the VIP
/// serves the flow. No flow is created and no ring slot taken for an error.
#[inline(always)]
pub fn forward_error(
    ctx: &XdpContext,
    vip: VipMeta,
    flow: FlowKey,
    outer: &Outer,
    frag_needed: bool,
    out: &mut Steered,
) -> Result<(), Verdict> {
    // Established or embryonic (an error about a backend's SYN-ACK, e.g. the client is gone).
    let found = match balancer::existing_flow(&FLOWS, &flow, vip.id, None) {
        Lookup::Miss => balancer::existing_flow(&EMBRYOS, &flow, vip.id, None),
        found => found,
    };
    let Lookup::Hit(id, addr, _) = found else {
        return Err(Verdict::drop(reason::DROP_ICMP_NO_FLOW));
    };
    *out = Steered {
        pkt: Packet {
            vip,
            flow,
            ip_len: outer.ip_len,
            tos: outer.tos,
            df: outer.df,
            frame_len: frame_len(ctx) as u64,
            midflow: false,
            icmp_error: true,
        },
        backend: forward::Backend { id, addr },
        // SAFETY: helper without arguments.
        now: unsafe { bpf_ktime_get_coarse_ns() },
        icmp_reason: if frag_needed {
            reason::FWD_ICMP_FRAG_NEEDED
        } else {
            reason::FWD_ICMP_UNREACH
        },
        how: debug::STEER_EXISTING,
    };
    Ok(())
}
