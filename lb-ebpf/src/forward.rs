//! Getting a steered packet to its backend, both ways direct server return:
//! - `ipip`: prepend an outer header from the LB's address to the backend's, of the backend's
//!   family: IPv4 (protocol 4) for an IPv4 backend; IPv6 for an IPv6 backend, next header 41
//!   for an IPv6 packet (IPv6 in IPv6) and 4 for an IPv4 one (IPv4 in IPv6, RFC 2473);
//! - `l2`: rewrite the destination MAC only (backend on the LB's segment, VIP on its `lo`); the
//!   backend has the packet's family (the agent installs nothing else).
//!
//! Next hop, egress interface and MTU come from `bpf_fib_lookup`, through the per-CPU next-hop
//! cache (`nexthop.rs`).

use crate::{
    Verdict,
    balancer::Packet,
    csum, icmp, icmp6,
    maps::{CONFIG, IPIP_IDS},
    nexthop::{self, Hop, Resolved},
    parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN, ptr_at, store4_at},
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_smp_processor_id, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{Addr, FORWARD_L2, IPPROTO_IPIP, IPPROTO_IPV6, reason};
use network_types::eth::EthHdr;

/// TTL (hop limit) of the outer header (the inner one is the client's business).
const OUTER_TTL: u8 = 64;

/// A flow's backend: its slot id and address.
pub struct Backend {
    pub id: u32,
    pub addr: Addr,
}

/// Forward `pkt` to `backend`; `now` is `bpf_ktime_get_coarse_ns()` (for the next-hop cache).
/// One function for every caller (a flow's packets of either family, ICMP errors about a flow)
/// and every method: the next hop is resolved once, for the packet as it will leave (inner for
/// `l2`, outer for `ipip`), then the frame is rewritten. A BPF call, like the FIB lookup of a
/// cache miss and the ICMP answers beside it: each frame is on the stack only while it runs
/// (all frames of a call chain share 512 bytes).
#[inline(never)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, backend: &Backend, now: u64) -> Verdict {
    forward_inline(ctx, pkt, backend, now)
}

/// `forward`, inlined into its caller: the IPv4 decision stage, where it saves a BPF call per
/// packet and still fits the stack.
#[inline(always)]
pub fn forward_inline(ctx: &XdpContext, pkt: &Packet, backend: &Backend, now: u64) -> Verdict {
    forward_or_too_big(ctx, pkt, backend, now).unwrap_or_else(|t| {
        too_big(
            ctx,
            pkt.df && !pkt.icmp_error,
            pkt.flow.dst_addr.is_v4(),
            t.room(),
        )
    })
}

/// A packet that will not fit the egress MTU `mtu` (host order) once `overhead` bytes are added:
/// what `too_big` answers, nothing of the frame changed yet.
pub struct TooBig {
    pub mtu: u16,
    pub overhead: u16,
}

impl TooBig {
    /// The largest packet that would fit (what the client is told).
    #[inline(always)]
    pub fn room(&self) -> u16 {
        self.mtu.saturating_sub(self.overhead)
    }
}

/// `forward_inline`, leaving the answer to a packet too big to its caller: the established IPv4
/// packet's stage (`balancer::established4`), whose frame leaves no room for `too_big`'s on top
/// of it, returns it to the entry point, which calls `too_big` from its own.
#[inline(always)]
pub fn forward_or_too_big(
    ctx: &XdpContext,
    pkt: &Packet,
    backend: &Backend,
    now: u64,
) -> Result<Verdict, TooBig> {
    let l2 = pkt.vip.forward == FORWARD_L2;
    let outer6 = !l2 && !backend.addr.is_v4();
    // Source (and the cache's source key), bytes added, and protocol of the packet as it leaves.
    // Addresses by reference: copied into registers, each word would be spilled to a stack
    // slot of its own. `CONFIG` (the LB's addresses) only for an outer header: an `l2` packet
    // spares the lookup.
    let lb4;
    let (src, src_key, overhead, proto) = if l2 {
        (&pkt.flow.src_addr, &Addr::UNSPECIFIED, 0, pkt.flow.proto)
    } else if let Some(cfg) = CONFIG.get(0) {
        lb4 = Addr::from_v4(cfg.lb_addr);
        if outer6 {
            if cfg.lb_addr6.is_unspecified() {
                return Ok(Verdict::drop(reason::DROP_ENCAP_FAILED));
            }
            let next = if pkt.flow.dst_addr.is_v4() {
                IPPROTO_IPIP
            } else {
                IPPROTO_IPV6
            };
            (&cfg.lb_addr6, &cfg.lb_addr6, IPV6_HLEN as u16, next)
        } else {
            if cfg.lb_addr == 0 {
                return Ok(Verdict::drop(reason::DROP_ENCAP_FAILED));
            }
            (&lb4, &lb4, IPV4_HLEN as u16, IPPROTO_IPIP)
        }
    } else {
        return Ok(Verdict::drop(reason::DROP_ENCAP_FAILED));
    };
    let Some(tot_len) = pkt.ip_len.checked_add(overhead) else {
        return Ok(Verdict::drop(reason::DROP_TOO_BIG));
    };
    let hop = match nexthop::resolve(
        ctx,
        backend.id,
        src,
        src_key,
        &backend.addr,
        tot_len,
        proto,
        now,
    ) {
        Resolved::Hop(hop) => Some(hop),
        // Handing the unchanged frame (still addressed to the VIP) to the kernel would route it
        // back towards the router: `l2` drops; an encapsulated packet is the kernel's to
        // forward once its next hop is resolved.
        Resolved::NoNeigh if l2 => return Ok(Verdict::drop(reason::DROP_NO_NEIGH)),
        Resolved::NoNeigh => None,
        Resolved::TooBig(mtu) => return Err(TooBig { mtu, overhead }),
        Resolved::NoRoute => return Ok(Verdict::drop(reason::DROP_NO_ROUTE)),
    };
    let written = if l2 {
        rewrite_macs(ctx, pkt, &hop)
    } else if outer6 {
        trim_padding(ctx, pkt) && encap6(ctx, &hop, Inner::of(pkt), src, &backend.addr, proto)
    } else {
        trim_padding(ctx, pkt) && encap4(ctx, &hop, Inner::of(pkt), src.v4(), backend.addr.v4())
    };
    if !written {
        return Ok(Verdict::drop(reason::DROP_ENCAP_FAILED));
    }
    Ok(match hop {
        Some(hop) => egress(ctx.ingress_ifindex() as u32, hop.ifindex()),
        None => Verdict::pass(reason::PASS_NO_NEIGH),
    })
}

/// Did the packet leave towards its backend (so it counts as forwarded)?
pub fn is_forwarded(verdict: &Verdict) -> bool {
    matches!(
        verdict.reason,
        reason::FWD_TX | reason::FWD_REDIRECT | reason::PASS_NO_NEIGH
    )
}

/// Send out of the interface the FIB chose: `XDP_TX` when it is the one the packet came in on
/// (`ingress`, the context's `ingress_ifindex`, which a caller that read it already passes on).
#[inline(always)]
pub fn egress(ingress: u32, ifindex: u32) -> Verdict {
    if ifindex == ingress {
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

/// The packet will not fit the egress MTU: tell the client the largest packet that would
/// (`mtu`; ICMP fragmentation needed for IPv4, ICMPv6 packet too big for IPv6, as `v4` says), or
/// drop it unless `answer`: if it allowed fragmentation, which XDP cannot do (IPv4 without DF),
/// or if it is itself an ICMP error (no error about an error). Four arguments: with the verdict's
/// return slot, the five a BPF call takes.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, answer: bool, v4: bool, mtu: u16) -> Verdict {
    if !answer {
        return Verdict::drop(reason::DROP_TOO_BIG);
    }
    let sent = if v4 {
        icmp::frag_needed(ctx, mtu)
    } else {
        icmp6::packet_too_big(ctx, mtu)
    };
    match sent {
        Some(()) => Verdict::tx(reason::TX_ICMP_FRAG_NEEDED),
        None => Verdict::drop(reason::DROP_ENCAP_FAILED),
    }
}

#[inline(always)]
fn write_ether_type(eth: *mut EthHdr, ether_type: u16) {
    // SAFETY: callers got `eth` from `ptr_at`.
    unsafe { (*eth).ether_type = ether_type.to_be() };
}

/// `l2`: the frame to the backend's MAC from ours, nothing else changed.
#[inline(always)]
fn rewrite_macs(ctx: &XdpContext, pkt: &Packet, hop: &Option<Hop>) -> bool {
    let (Some(hop), Some(eth)) = (hop, ptr_at::<EthHdr>(ctx, 0)) else {
        return false;
    };
    let ether_type = if pkt.flow.dst_addr.is_v4() {
        ETH_P_IP
    } else {
        ETH_P_IPV6
    };
    hop.write_macs(eth);
    write_ether_type(eth, ether_type);
    true
}

/// Cut Ethernet padding of a short frame (anything past the IP packet): after encapsulation it
/// would end up after the outer packet, where it is only noise. `false` if that failed.
#[inline(always)]
fn trim_padding(ctx: &XdpContext, pkt: &Packet) -> bool {
    let padding = pkt.frame_len as i64 - (ETH_HLEN as i64 + i64::from(pkt.ip_len));
    // SAFETY: shrinking only (classify checked the frame holds the IP packet); pointers are
    // derived afterwards.
    padding <= 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(padding as i32)) } == 0
}

/// Grow the head by `outer_len` bytes for an outer header and write the Ethernet header in
/// front of it: to `hop`'s next hop, or (`None`: no neighbour yet) still addressed to us, so the
/// kernel forwards the encapsulated packet and resolves the next hop itself. The received header
/// is still there after the growth, `outer_len` bytes on, so its MACs are read only when needed.
#[inline(always)]
fn push_outer(ctx: &XdpContext, hop: &Option<Hop>, outer_len: usize, ether_type: u16) -> bool {
    // SAFETY: growing the head; all pointers are derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return false;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    match hop {
        Some(hop) => hop.write_macs(eth),
        None => {
            let Some(old) = ptr_at::<EthHdr>(ctx, outer_len) else {
                return false;
            };
            // SAFETY: both checked by `ptr_at`; they do not overlap (`outer_len` ≥ 20).
            unsafe {
                (*eth).dst_addr = (*old).dst_addr;
                (*eth).src_addr = (*old).src_addr;
            }
        }
    }
    write_ether_type(eth, ether_type);
    true
}

/// What an outer header takes from the packet it carries.
pub struct Inner {
    /// The whole inner packet's length, host order (the caller checked that the outer packet
    /// fits the next hop's MTU, so adding the outer header does not overflow).
    pub ip_len: u16,
    /// Its TOS (IPv4) or traffic class (IPv6), copied to the outer header.
    pub tos: u8,
    /// Its DF (always for IPv6), mirrored in an outer IPv4 header (no DF: it gets a numbered
    /// ID); an outer IPv6 header has neither.
    pub df: bool,
}

impl Inner {
    #[inline(always)]
    fn of(pkt: &Packet) -> Self {
        Self {
            ip_len: pkt.ip_len,
            tos: pkt.tos,
            df: pkt.df,
        }
    }
}

/// `ipip` to an IPv4 backend: an outer IPv4 header, protocol 4, from `lb_addr` to `backend_addr`
/// (both network order), written as five 32-bit words (built byte by byte, it took a load, a
/// shift and a store per byte, and as many again for its checksum). For the general forwarding
/// and for `balancer::ipip_exit` (an IPv4 packet).
#[inline(always)]
pub fn encap4(
    ctx: &XdpContext,
    hop: &Option<Hop>,
    inner: Inner,
    lb_addr: u32,
    backend_addr: u32,
) -> bool {
    if !push_outer(ctx, hop, IPV4_HLEN, ETH_P_IP) {
        return false;
    }
    let Some(outer) = ptr_at::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN) else {
        return false;
    };
    let [len_hi, len_lo] = (inner.ip_len + IPV4_HLEN as u16).to_be_bytes();
    // Outer DF mirrors the inner one (RFC 2003): a DF packet stays unfragmentable end to end
    // and its ID means nothing (RFC 6864: 0). Without DF the outer packet may be fragmented on
    // the way, so its ID must not repeat while fragments can still meet.
    let (df, [id_hi, id_lo]) = if inner.df {
        (0x40, [0, 0])
    } else {
        let cpu_bits = CONFIG.get(0).map_or(16, |cfg| cfg.ipip_id_cpu_bits);
        (0, outer_id(cpu_bits).to_be_bytes())
    };
    let words = [
        u32::from_ne_bytes([0x45, inner.tos, len_hi, len_lo]),
        u32::from_ne_bytes([id_hi, id_lo, df, 0]),
        u32::from_ne_bytes([OUTER_TTL, IPPROTO_IPIP, 0, 0]),
        lb_addr,
        backend_addr,
    ];
    let [c0, c1] = csum::ipv4_header_words(&words).to_ne_bytes();
    // SAFETY: `ptr_at` checked the header's 20 bytes; the words are at 0, 4, ..., 16 (aligned
    // under `NET_IP_ALIGN`: the header starts 14 bytes into the frame).
    unsafe {
        store4_at::<0, _>(outer, words[0]);
        store4_at::<4, _>(outer, words[1]);
        store4_at::<8, _>(outer, u32::from_ne_bytes([OUTER_TTL, IPPROTO_IPIP, c0, c1]));
        store4_at::<12, _>(outer, words[3]);
        store4_at::<16, _>(outer, words[4]);
    }
    true
}

/// `ipip` to an IPv6 backend: an outer IPv6 header (RFC 2473) from `lb_addr6` to the backend,
/// next header `next` (41 around an IPv6 packet, 4 around an IPv4 one: an IPv4 VIP over IPv6
/// backends). Traffic class is the inner one, flow label 0, hop limit 64; IPv6 has no DF and no
/// ID, so nothing else varies per packet. Written into the packet word by word, not built on the
/// stack first. For the general forwarding and `balancer::ipip_exit` (an IPv6 packet).
#[inline(always)]
pub fn encap6(
    ctx: &XdpContext,
    hop: &Option<Hop>,
    inner: Inner,
    lb_addr6: &Addr,
    backend_addr: &Addr,
    next: u8,
) -> bool {
    if !push_outer(ctx, hop, IPV6_HLEN, ETH_P_IPV6) {
        return false;
    }
    let Some(outer) = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN) else {
        return false;
    };
    let [len_hi, len_lo] = inner.ip_len.to_be_bytes();
    let tc = inner.tos;
    let [s0, s1, s2, s3] = lb_addr6.words;
    let [d0, d1, d2, d3] = backend_addr.words;
    // SAFETY: `ptr_at` checked the header's 40 bytes; the words are at 0, 4, ..., 36 (aligned
    // under `NET_IP_ALIGN`, as `encap4`'s). Written as arrays, the addresses were stored a byte
    // at a time (the packet is not aligned for `u32` as Rust counts).
    unsafe {
        store4_at::<0, _>(outer, u32::from_ne_bytes([0x60 | (tc >> 4), tc << 4, 0, 0]));
        store4_at::<4, _>(outer, u32::from_ne_bytes([len_hi, len_lo, next, OUTER_TTL]));
        store4_at::<8, _>(outer, s0);
        store4_at::<12, _>(outer, s1);
        store4_at::<16, _>(outer, s2);
        store4_at::<20, _>(outer, s3);
        store4_at::<24, _>(outer, d0);
        store4_at::<28, _>(outer, d1);
        store4_at::<32, _>(outer, d2);
        store4_at::<36, _>(outer, d3);
    }
    true
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
