//! The backend side of `ipip` forwarding, for kernels without an `ipip` device (like these): strip
//! the outer header of IPIP packets addressed to this host and pass the inner packet up the stack.

use crate::{
    Verdict,
    maps::DECAP_ADDRS,
    parse::{ETH_HLEN, ETH_P_IP, IP_MF, IP_OFFSET_MASK, IPV4_HLEN, ptr_at},
};
use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{IPPROTO_IPIP, decap_reason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

pub fn try_decap(ctx: &XdpContext) -> Verdict {
    let pass = Verdict::pass(decap_reason::PASS_OTHER);
    let malformed = Verdict::drop(decap_reason::DROP_MALFORMED);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass;
    };
    // SAFETY: bounds checked.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return pass;
    }
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return pass;
    };
    // SAFETY: bounds checked.
    let outer = unsafe { &*outer };
    let dst = u32::from_ne_bytes(outer.dst_addr);
    // SAFETY: read-only lookup.
    if outer.proto != IPPROTO_IPIP || unsafe { DECAP_ADDRS.get(dst) }.is_none() {
        return pass;
    }
    let ihl = ((outer.vihl & 0x0f) as usize) * 4;
    // A fragmented outer packet cannot be decapsulated here (no reassembly in XDP), and this
    // kernel has nothing else that would: drop it and count it rather than leave it to an ICMP
    // "protocol unreachable".
    if outer.vihl >> 4 != 4
        || ihl < IPV4_HLEN
        || u16::from_be_bytes(outer.frags) & (IP_MF | IP_OFFSET_MASK) != 0
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
    // SAFETY: bounds checked; copied before the head moves.
    let (mac_dst, mac_src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    // SAFETY: shrinking the head by the outer header; pointers re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ihl as i32) } != 0 {
        return malformed;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return malformed;
    };
    // SAFETY: bounds checked.
    unsafe {
        (*eth).dst_addr = mac_dst;
        (*eth).src_addr = mac_src;
        (*eth).ether_type = ETH_P_IP.to_be();
    }
    Verdict::pass(decap_reason::DECAPSULATED)
}
