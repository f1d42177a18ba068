//! ICMP "fragmentation needed" (type 3, code 4) built in place from the offending packet and sent
//! back to the client, so path-MTU discovery works through the encapsulation (Katran's answer to
//! its issue #82): a 1 MB upload over MTU-1500 links would otherwise black-hole.

use crate::{
    csum,
    parse::{ETH_HLEN, ETH_P_IP, IPV4_HLEN, frame_len, ptr_at},
};
use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::IPPROTO_ICMP;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

pub const ICMP_HLEN: usize = 8;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// Bytes of the offending datagram past its IP header that an ICMP error quotes (RFC 792: 64
/// bits, enough for the ports and TCP sequence number the receiver matches on).
pub const QUOTED_L4: usize = 8;
const ICMP_TTL: u8 = 64;

/// Make room for an ICMP error's headers in front of the packet in `ctx` (`grow` bytes) and cut
/// the frame to `new_len` bytes (the quote's end). `None` if the frame is shorter than that or
/// the kernel refused; every packet pointer must be derived again afterwards.
#[inline(always)]
pub fn reshape(ctx: &XdpContext, grow: usize, new_len: usize) -> Option<()> {
    // SAFETY: the caller derives its pointers again.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    let cur = frame_len(ctx);
    if cur < new_len {
        return None;
    }
    // SAFETY: shrinking only.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, new_len as i32 - cur as i32) } != 0 {
        return None;
    }
    Some(())
}

/// Turn the packet in `ctx` (Ethernet + IPv4 with a validated L4 header of at least 8 bytes) into
/// the ICMP reply, addressed back the way it came. `mtu` is the next-hop MTU to announce.
pub fn frag_needed(ctx: &XdpContext, mtu: u16) -> Option<()> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked; copied before the headers move.
    let (mac_dst, mac_src, src, dst, vihl) = unsafe {
        (
            (*eth).dst_addr,
            (*eth).src_addr,
            (*ip).src_addr,
            (*ip).dst_addr,
            (*ip).vihl,
        )
    };
    // The balancer checked version 4 and IHL ≥ 5; the mask bounds it for the verifier.
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let quoted = ihl + QUOTED_L4;
    let icmp_len = ICMP_HLEN + quoted;
    let new_len = ETH_HLEN + IPV4_HLEN + icmp_len;

    // New headers go in front: [eth][ip][icmp] then the original IP header, which stays in place.
    reshape(ctx, IPV4_HLEN + ICMP_HLEN, new_len)?;

    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let hdr: *mut [u8; IPV4_HLEN] = ptr_at(ctx, ETH_HLEN)?;
    let icmp: *mut [u8; ICMP_HLEN] = ptr_at(ctx, ETH_HLEN + IPV4_HLEN)?;
    // SAFETY: bounds checked.
    unsafe {
        (*eth).dst_addr = mac_src;
        (*eth).src_addr = mac_dst;
        (*eth).ether_type = ETH_P_IP.to_be();
    }
    let [len_hi, len_lo] = ((IPV4_HLEN + icmp_len) as u16).to_be_bytes();
    // From the address the client was talking to, back to the client.
    let mut ip_hdr: [u8; IPV4_HLEN] = [
        0x45,
        0,
        len_hi,
        len_lo,
        0,
        0,
        0,
        0,
        ICMP_TTL,
        IPPROTO_ICMP,
        0,
        0,
        dst[0],
        dst[1],
        dst[2],
        dst[3],
        src[0],
        src[1],
        src[2],
        src[3],
    ];
    let [c0, c1] = csum::ipv4_header(&ip_hdr);
    ip_hdr[10] = c0;
    ip_hdr[11] = c1;
    let [mtu_hi, mtu_lo] = mtu.to_be_bytes();
    // SAFETY: bounds checked.
    unsafe {
        *hdr = ip_hdr;
        *icmp = [
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            0,
            0,
            0,
            0,
            mtu_hi,
            mtu_lo,
        ];
    }
    let sum = csum::packet_words(ctx, ETH_HLEN + IPV4_HLEN, icmp_len / 2)?;
    let [s0, s1] = csum::fold(sum).to_be_bytes();
    let icmp: *mut [u8; ICMP_HLEN] = ptr_at(ctx, ETH_HLEN + IPV4_HLEN)?;
    // SAFETY: bounds checked.
    unsafe {
        (*icmp)[2] = s0;
        (*icmp)[3] = s1;
    }
    Some(())
}
