//! Bounds-checked packet access: the only way this crate reads or writes packet bytes.

use aya_ebpf::programs::XdpContext;
use core::mem;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// The fixed IPv6 header; extension headers follow it.
pub const IPV6_HLEN: usize = 40;
/// IPv6 next header of a Fragment header (RFC 8200 §4.5).
pub const IPPROTO_FRAGMENT: u8 = 44;
/// IPv4 `frag_off` bits (host order after `u16::from_be_bytes`).
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;

/// Pointer to a `T` at `offset` bytes into the packet, or `None` if any byte of it would lie past
/// the end. Every packet access goes through here, which is what the verifier needs to see.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Length of the frame as it is now.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// Source and destination port of an Ethernet/IPv4/TCP packet (network order), or `None`. Only
/// the benchmark floor uses it; the balancer parses inline because it needs more of the headers.
#[inline(always)]
pub fn tcp_ports(ctx: &XdpContext) -> Option<[u8; 4]> {
    let eth: *const network_types::eth::EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return None;
    }
    let ip: *const network_types::ip::Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: as above.
    let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < IPV4_HLEN || proto != lb_common::IPPROTO_TCP {
        return None;
    }
    let tcp: *const [u8; 20] = ptr_at(ctx, ETH_HLEN + ihl)?;
    // SAFETY: as above.
    let tcp = unsafe { &*tcp };
    Some([tcp[0], tcp[1], tcp[2], tcp[3]])
}
