//! Getting a steered packet to its backend, both ways direct server return:
//! - `ipip`: prepend an outer IPv4 header (protocol 4) from the LB's address to the backend's;
//! - `l2`: rewrite the destination MAC only (backend on the LB's segment, VIP on its `lo`).
//!
//! Next hop, egress interface and MTU come from `bpf_fib_lookup`, through the per-CPU next-hop
//! cache (`nexthop.rs`).

use crate::{
    Verdict,
    balancer::Packet,
    csum, icmp,
    maps::{CONFIG, IPIP_IDS},
    nexthop::{self, Resolved},
    parse::{ETH_HLEN, ETH_P_IP, IPV4_HLEN, ptr_at},
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_smp_processor_id, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{FORWARD_L2, IPPROTO_IPIP, reason};
use network_types::eth::EthHdr;

/// TTL of the outer header (the inner TTL is the client's business).
const OUTER_TTL: u8 = 64;

/// Forward `pkt` to backend slot `backend_id` at `backend_addr`; `now` is
/// `bpf_ktime_get_coarse_ns()` (for the next-hop cache). Inlined into its two callers (a flow's
/// packets, ICMP errors about a flow): a BPF call takes at most five arguments.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    backend_id: u32,
    backend_addr: u32,
    now: u64,
) -> Verdict {
    if pkt.vip.forward == FORWARD_L2 {
        l2(ctx, pkt, backend_id, backend_addr, now)
    } else {
        ipip(ctx, pkt, backend_id, backend_addr, now)
    }
}

/// Did the packet leave towards its backend (so it counts as forwarded)?
pub fn is_forwarded(verdict: &Verdict) -> bool {
    matches!(
        verdict.reason,
        reason::FWD_TX | reason::FWD_REDIRECT | reason::PASS_NO_NEIGH
    )
}

/// Send out of the interface the FIB chose: `XDP_TX` when it is the one the packet came in on.
fn egress(ctx: &XdpContext, ifindex: u32) -> Verdict {
    if ifindex == ctx.ingress_ifindex() as u32 {
        Verdict::tx(reason::FWD_TX)
    } else {
        // SAFETY: plain helper call; it returns XDP_REDIRECT or XDP_ABORTED-equivalent on error.
        let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
        if action == xdp_action::XDP_REDIRECT {
            Verdict {
                action,
                reason: reason::FWD_REDIRECT,
            }
        } else {
            Verdict::drop(reason::DROP_NO_ROUTE)
        }
    }
}

/// The packet will not fit the egress MTU (`mtu`) once `overhead` bytes are added: tell the client
/// the largest packet that would (ICMP fragmentation needed), or drop it if it allowed
/// fragmentation, which XDP cannot do, or if it is itself an ICMP error (no error about an error).
fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16, overhead: u16) -> Verdict {
    if !pkt.df || pkt.icmp_error {
        return Verdict::drop(reason::DROP_TOO_BIG);
    }
    match icmp::frag_needed(ctx, mtu.saturating_sub(overhead)) {
        Some(()) => Verdict::tx(reason::TX_ICMP_FRAG_NEEDED),
        None => Verdict::drop(reason::DROP_ENCAP_FAILED),
    }
}

fn write_macs(eth: *mut EthHdr, dst: [u8; 6], src: [u8; 6]) {
    // SAFETY: callers got `eth` from `ptr_at`.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
        (*eth).ether_type = ETH_P_IP.to_be();
    }
}

#[inline(always)]
fn ipip(ctx: &XdpContext, pkt: &Packet, backend_id: u32, backend_addr: u32, now: u64) -> Verdict {
    let (lb_addr, id_cpu_bits) = match CONFIG.get(0) {
        Some(cfg) if cfg.lb_addr != 0 => (cfg.lb_addr, cfg.ipip_id_cpu_bits),
        _ => return Verdict::drop(reason::DROP_ENCAP_FAILED),
    };
    let Some(outer_len) = pkt.ip_len.checked_add(IPV4_HLEN as u16) else {
        return Verdict::drop(reason::DROP_TOO_BIG);
    };
    let hop = match nexthop::resolve(
        ctx,
        backend_id,
        lb_addr,
        lb_addr,
        backend_addr,
        outer_len,
        IPPROTO_IPIP,
        now,
    ) {
        Resolved::Hop(hop) => Some(hop),
        Resolved::NoNeigh => None,
        Resolved::TooBig(mtu) => return too_big(ctx, pkt, mtu, IPV4_HLEN as u16),
        Resolved::NoRoute => return Verdict::drop(reason::DROP_NO_ROUTE),
    };

    // Ethernet padding of a short frame (anything past the IP packet) would end up after the
    // outer packet, where it is only noise: cut it, so the frame is exactly the outer packet.
    let padding = pkt.frame_len as i64 - (ETH_HLEN as i64 + i64::from(pkt.ip_len));
    // SAFETY: shrinking only (classify checked the frame holds the IP packet); pointers are
    // derived afterwards.
    if padding > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(padding as i32)) } != 0 {
        return Verdict::drop(reason::DROP_ENCAP_FAILED);
    }
    let Some(old_eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::drop(reason::DROP_ENCAP_FAILED);
    };
    // SAFETY: bounds checked.
    let (old_dst, old_src) = unsafe { ((*old_eth).dst_addr, (*old_eth).src_addr) };
    // SAFETY: growing the head by 20 bytes; all pointers are re-derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_HLEN as i32)) } != 0 {
        return Verdict::drop(reason::DROP_ENCAP_FAILED);
    }
    let (Some(eth), Some(outer)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN),
    ) else {
        return Verdict::drop(reason::DROP_ENCAP_FAILED);
    };
    match &hop {
        Some(hop) => write_macs(eth, hop.dmac, hop.smac),
        // Keep the frame addressed to us: the kernel forwards the encapsulated packet and resolves
        // the next hop itself.
        None => write_macs(eth, old_dst, old_src),
    }
    let [len_hi, len_lo] = outer_len.to_be_bytes();
    let [s0, s1, s2, s3] = lb_addr.to_ne_bytes();
    let [d0, d1, d2, d3] = backend_addr.to_ne_bytes();
    // Outer DF mirrors the inner one (RFC 2003): a DF packet stays unfragmentable end to end
    // and its ID means nothing (RFC 6864: 0). Without DF the outer packet may be fragmented on
    // the way, so its ID must not repeat while fragments can still meet.
    let (df, [id_hi, id_lo]) = if pkt.df {
        (0x40, [0, 0])
    } else {
        (0, outer_id(id_cpu_bits).to_be_bytes())
    };
    let mut hdr: [u8; IPV4_HLEN] = [
        0x45,
        pkt.tos,
        len_hi,
        len_lo,
        id_hi,
        id_lo,
        df,
        0,
        OUTER_TTL,
        IPPROTO_IPIP,
        0,
        0,
        s0,
        s1,
        s2,
        s3,
        d0,
        d1,
        d2,
        d3,
    ];
    let [c0, c1] = csum::ipv4_header(&hdr);
    hdr[10] = c0;
    hdr[11] = c1;
    // SAFETY: bounds checked.
    unsafe { *outer = hdr };
    match hop {
        Some(hop) => egress(ctx, hop.ifindex),
        None => Verdict::pass(reason::PASS_NO_NEIGH),
    }
}

/// The ID of a fragmentable outer header: this CPU's number in the top `cpu_bits` bits (so two
/// CPUs never send the same ID), this CPU's counter of such packets in the rest (so one CPU
/// repeats an ID only after 2^(16 - cpu_bits) of them). The agent sets `cpu_bits` from the
/// number of possible CPUs (`lb_common::ipip_id_cpu_bits`).
#[inline(always)]
fn outer_id(cpu_bits: u32) -> u16 {
    let n = IPIP_IDS.get_ptr_mut(0).map_or(0, |c| {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe {
            let n = *c;
            *c = n.wrapping_add(1);
            n
        }
    });
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let counter_bits = 16 - cpu_bits.min(16);
    let counter_mask = (1u32 << counter_bits) - 1;
    ((cpu << counter_bits) | (n & counter_mask)) as u16
}

#[inline(always)]
fn l2(ctx: &XdpContext, pkt: &Packet, backend_id: u32, backend_addr: u32, now: u64) -> Verdict {
    let hop = match nexthop::resolve(
        ctx,
        backend_id,
        pkt.flow.src_addr.v4(),
        0,
        backend_addr,
        pkt.ip_len,
        pkt.flow.proto,
        now,
    ) {
        Resolved::Hop(hop) => hop,
        Resolved::NoNeigh => return Verdict::drop(reason::DROP_NO_NEIGH),
        Resolved::TooBig(mtu) => return too_big(ctx, pkt, mtu, 0),
        Resolved::NoRoute => return Verdict::drop(reason::DROP_NO_ROUTE),
    };
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::drop(reason::DROP_ENCAP_FAILED);
    };
    write_macs(eth, hop.dmac, hop.smac);
    egress(ctx, hop.ifindex)
}
