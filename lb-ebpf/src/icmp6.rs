//! ICMPv6 "packet too big" (type 2, code 0) built in place from the offending packet and sent
//! back to the client: IPv6 routers never fragment, so without it a client whose packets do not
//! fit the tunnel (or the backend's link) would retransmit them for ever.
//!
//! RFC 4443 §2.4(c): an error quotes as much of the invoking packet as fits without the ICMPv6
//! packet exceeding the minimum IPv6 MTU (1280). The invoking packet did not fit an egress MTU of
//! at least 1280 bytes after at most 40 bytes of encapsulation, so it is longer than 1240 bytes
//! and the quote is always its first `QUOTE` bytes: a constant size, which is what lets the
//! checksum run over fixed chunks the verifier can see.

use crate::{
    csum, icmp,
    parse::{ETH_HLEN, ETH_P_IPV6, IPV6_HLEN, ptr_at},
};
use aya_ebpf::{helpers::bpf_csum_diff, programs::XdpContext};
use lb_common::IPPROTO_ICMPV6;
use network_types::eth::EthHdr;

pub const ICMP6_HLEN: usize = 8;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
/// The IPv6 minimum MTU, which an ICMPv6 error never exceeds.
const MIN_MTU: usize = 1280;
/// Bytes of the invoking packet quoted.
const QUOTE: usize = MIN_MTU - IPV6_HLEN - ICMP6_HLEN;
/// The ICMPv6 message: header and quote.
const MESSAGE: usize = ICMP6_HLEN + QUOTE;
/// `bpf_csum_diff` sums at most 512 bytes at a time, in multiples of 4.
const CHUNK: usize = 512;
const LAST_CHUNK: usize = MESSAGE - 2 * CHUNK;
const _: () = assert!(LAST_CHUNK.is_multiple_of(4) && LAST_CHUNK <= CHUNK && MESSAGE == 1240);
const HOP_LIMIT: u8 = 64;

/// Turn the IPv6 packet in `ctx` into the packet-too-big error about it, addressed back the way
/// it came, announcing `mtu`. `None` if the packet is too short to be one that did not fit (it
/// cannot be) or the frame could not be resized. Not inlined, and it copies nothing to the
/// stack (the new headers are written from the old ones in the packet): it runs below the
/// balancer's own frame, and all frames share 512 bytes.
#[inline(never)]
pub fn packet_too_big(ctx: &XdpContext, mtu: u16) -> Option<()> {
    const GROWN: usize = IPV6_HLEN + ICMP6_HLEN;
    // Where the invoking packet's headers are once the head grew.
    const OLD_ETH: usize = GROWN;
    const OLD_IP: usize = GROWN + ETH_HLEN;
    let new_len = ETH_HLEN + IPV6_HLEN + MESSAGE;
    // New headers go in front: [eth][ipv6][icmpv6] then the original packet, cut to the quote.
    icmp::reshape(ctx, GROWN, new_len)?;
    let old_eth: *const EthHdr = ptr_at(ctx, OLD_ETH)?;
    // SAFETY: bounds checked; read before the new IPv6 header overwrites the old Ethernet one.
    let (mac_dst, mac_src) = unsafe { ((*old_eth).dst_addr, (*old_eth).src_addr) };
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let fixed: *mut [u8; 8] = ptr_at(ctx, ETH_HLEN)?;
    let src: *mut [u8; 16] = ptr_at(ctx, ETH_HLEN + 8)?;
    let dst: *mut [u8; 16] = ptr_at(ctx, ETH_HLEN + 24)?;
    let old_src: *const [u8; 16] = ptr_at(ctx, OLD_IP + 8)?;
    let old_dst: *const [u8; 16] = ptr_at(ctx, OLD_IP + 24)?;
    let icmp: *mut [u8; ICMP6_HLEN] = ptr_at(ctx, ETH_HLEN + IPV6_HLEN)?;
    let [len_hi, len_lo] = (MESSAGE as u16).to_be_bytes();
    let [m0, m1, m2, m3] = u32::from(mtu).to_be_bytes();
    // SAFETY: bounds checked; the regions written do not overlap the ones read after them.
    unsafe {
        (*eth).dst_addr = mac_src;
        (*eth).src_addr = mac_dst;
        (*eth).ether_type = ETH_P_IPV6.to_be();
        *fixed = [0x60, 0, 0, 0, len_hi, len_lo, IPPROTO_ICMPV6, HOP_LIMIT];
        // From the address the client was talking to (the VIP), back to the client.
        *src = *old_dst;
        *dst = *old_src;
        *icmp = [ICMP6_PACKET_TOO_BIG, 0, 0, 0, m0, m1, m2, m3];
    }
    // The pseudo-header (RFC 8200 §8.1): source and destination (the 32 bytes in the new
    // header), upper-layer length (32 bits), three zero bytes and the next header; summed as
    // the message is, in memory order.
    let mut sum = chunk_sum::<32>(ctx, ETH_HLEN + 8)?;
    sum += u64::from(u32::from_ne_bytes((MESSAGE as u32).to_be_bytes()));
    sum += u64::from(u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]));
    let at = ETH_HLEN + IPV6_HLEN;
    sum += chunk_sum::<CHUNK>(ctx, at)?;
    sum += chunk_sum::<CHUNK>(ctx, at + CHUNK)?;
    sum += chunk_sum::<LAST_CHUNK>(ctx, at + 2 * CHUNK)?;
    let check = csum::fold(csum::fold64(sum)).to_ne_bytes();
    let icmp: *mut [u8; ICMP6_HLEN] = ptr_at(ctx, at)?;
    // SAFETY: bounds checked.
    unsafe {
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    Some(())
}

/// The one's complement sum of the `N` packet bytes at `offset` (in memory order, folded to 32
/// bits or not: either is the same sum modulo 0xffff).
#[inline(always)]
fn chunk_sum<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<u64> {
    let p: *mut [u8; N] = ptr_at(ctx, offset)?;
    // SAFETY: `p` is N bytes of packet, bounds checked; the helper only reads it.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p.cast(), N as u32, 0) };
    // A negative value is an error (sizes the helper refuses; these are constant and valid).
    u32::try_from(sum).ok().map(u64::from)
}
