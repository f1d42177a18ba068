//! The backend side of `ipip` forwarding, for kernels without `ipip` or `ip6tnl` devices (like
//! these): strip the outer header of tunnelled packets addressed to this host and pass the inner
//! packet up the stack. Three tunnels, as the balancer sends them: IPv4 in IPv4 (protocol 4), IPv6
//! in IPv6 (next header 41, RFC 2473) and IPv4 in IPv6 (next header 4). The outer destination must
//! be one of this host's addresses (`DECAP_ADDRS`); anything else passes untouched.

use crate::{
    Verdict,
    maps::DECAP_ADDRS,
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP_MF, IP_OFFSET_MASK, IPPROTO_FRAGMENT, IPV4_HLEN,
        IPV6_HLEN, ipv4_frags, ptr_at,
    },
};
use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Addr, IPPROTO_IPIP, IPPROTO_IPV6, decap_reason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// The Ethernet addresses of the frame, kept across the head adjustment.
struct Macs {
    dst: [u8; 6],
    src: [u8; 6],
}

pub fn try_decap(ctx: &XdpContext) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::pass(decap_reason::PASS_OTHER);
    };
    // SAFETY: bounds checked. Copied here, through the pointer the verifier saw checked: read
    // later, the compiler may derive it from the packet start again, unchecked.
    let (ether_type, macs) = unsafe {
        (
            u16::from_be((*eth).ether_type),
            Macs {
                dst: (*eth).dst_addr,
                src: (*eth).src_addr,
            },
        )
    };
    match ether_type {
        ETH_P_IP => decap_v4(ctx, &macs),
        ETH_P_IPV6 => decap_v6(ctx, &macs),
        _ => Verdict::pass(decap_reason::PASS_OTHER),
    }
}

/// Is `dst` one of this host's addresses?
#[inline(always)]
fn local(dst: Addr) -> bool {
    // SAFETY: read-only lookup.
    unsafe { DECAP_ADDRS.get(dst) }.is_some()
}

/// IPv4 in IPv4.
#[inline(always)]
fn decap_v4(ctx: &XdpContext, macs: &Macs) -> Verdict {
    let pass = Verdict::pass(decap_reason::PASS_OTHER);
    let malformed = Verdict::drop(decap_reason::DROP_MALFORMED);
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return pass;
    };
    // SAFETY: bounds checked.
    let outer = unsafe { &*outer };
    if outer.proto != IPPROTO_IPIP || !local(Addr::from_v4(u32::from_ne_bytes(outer.dst_addr))) {
        return pass;
    }
    let ihl = ((outer.vihl & 0x0f) as usize) * 4;
    // A fragmented outer packet cannot be decapsulated here (no reassembly in XDP), and this
    // kernel has nothing else that would: drop it and count it rather than leave it to an ICMP
    // "protocol unreachable".
    if outer.vihl >> 4 != 4 || ihl < IPV4_HLEN || ipv4_frags(outer) & (IP_MF | IP_OFFSET_MASK) != 0
    {
        return malformed;
    }
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN + ihl) else {
        return malformed;
    };
    // SAFETY: bounds checked.
    if unsafe { (*inner).vihl } >> 4 != 4 {
        return malformed;
    }
    strip(ctx, macs, ihl, ETH_P_IP)
}

/// IPv6 in IPv6 and IPv4 in IPv6. The balancer never puts extension headers on the outer
/// header; an outer packet that has them (other than a fragment header, below) is not one of its
/// tunnels and passes untouched.
#[inline(always)]
fn decap_v6(ctx: &XdpContext, macs: &Macs) -> Verdict {
    let pass = Verdict::pass(decap_reason::PASS_OTHER);
    let malformed = Verdict::drop(decap_reason::DROP_MALFORMED);
    let Some(outer) = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN) else {
        return pass;
    };
    // SAFETY: bounds checked; copied out before the head moves.
    let outer = unsafe { &*outer };
    if outer[0] >> 4 != 6 {
        return pass;
    }
    // An outer fragment of one of our tunnels (its fragment header names 41 or 4 next) cannot be
    // reassembled here, as for IPv4: dropped and counted. The balancer never sends one (IPv6
    // routers do not fragment, and it answers packets too big for the tunnel with ICMPv6).
    let (inner, fragment) = match outer[6] {
        n @ (IPPROTO_IPV6 | IPPROTO_IPIP) => (n, false),
        IPPROTO_FRAGMENT => match ptr_at::<u8>(ctx, ETH_HLEN + IPV6_HLEN) {
            // SAFETY: bounds checked.
            Some(next) => (unsafe { *next }, true),
            None => return pass,
        },
        _ => return pass,
    };
    if !(inner == IPPROTO_IPV6 || inner == IPPROTO_IPIP) {
        return pass;
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&outer[24..40]);
    if !local(Addr::from_octets(dst)) {
        return pass;
    }
    if fragment {
        return malformed;
    }
    let (version, ether_type) = if inner == IPPROTO_IPV6 {
        let Some(h) = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN + IPV6_HLEN) else {
            return malformed;
        };
        // SAFETY: bounds checked.
        (unsafe { (*h)[0] } >> 4, ETH_P_IPV6)
    } else {
        let Some(h) = ptr_at::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN + IPV6_HLEN) else {
            return malformed;
        };
        // SAFETY: bounds checked.
        (unsafe { (*h)[0] } >> 4, ETH_P_IP)
    };
    let want = if inner == IPPROTO_IPV6 { 6 } else { 4 };
    if version != want {
        return malformed;
    }
    strip(ctx, macs, IPV6_HLEN, ether_type)
}

/// Remove the `outer_len`-byte outer header behind the Ethernet header, keeping the MACs, and
/// give the frame the inner packet's `ether_type`.
#[inline(always)]
fn strip(ctx: &XdpContext, macs: &Macs, outer_len: usize, ether_type: u16) -> Verdict {
    let malformed = Verdict::drop(decap_reason::DROP_MALFORMED);
    // SAFETY: shrinking the head by the outer header; pointers re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return malformed;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return malformed;
    };
    // SAFETY: bounds checked.
    unsafe {
        (*eth).dst_addr = macs.dst;
        (*eth).src_addr = macs.src;
        (*eth).ether_type = ether_type.to_be();
    }
    Verdict::pass(decap_reason::DECAPSULATED)
}
