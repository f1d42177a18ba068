//! Bounds-checked packet access: the only way this crate reads or writes packet bytes.

use aya_ebpf::programs::XdpContext;
use core::{arch::asm, mem};
use network_types::ip::Ipv4Hdr;

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

/// Four header bytes (an IPv4 address, a TCP or UDP header's ports) in one 32-bit load, as they
/// lie in memory. Header fields are byte arrays (the IPv4 header starts 14 bytes into the frame,
/// so none of its words is 4-aligned as Rust counts), and the BPF backend splits such a read into
/// four byte loads with three shifts and three ors. The BPF load has no alignment rule of its
/// own: the verifier checks a packet access's alignment only where the kernel lacks efficient
/// unaligned access (or under `BPF_F_STRICT_ALIGNMENT`), and then counts the packet as starting
/// 2 bytes past a 4-aligned address (`NET_IP_ALIGN`), which makes the IPv4 header's words and the
/// ports behind an option-less header aligned.
#[inline(always)]
pub fn load4(bytes: &[u8; 4]) -> [u8; 4] {
    load4_at::<0, _>(bytes)
}

/// `load4` of the 4 bytes `OFF` bytes into `*header` (`OFF` a field's `offset_of!`, checked at
/// compile time to lie within `T`): the offset is the instruction's own, where a reference to
/// the field would take a register copy and an add first.
#[inline(always)]
pub fn load4_at<const OFF: usize, T>(header: &T) -> [u8; 4] {
    const { assert!(OFF + 4 <= mem::size_of::<T>()) };
    let word: u64;
    // SAFETY: reads bytes `OFF..OFF + 4` of `*header` (within it, asserted above), nothing else.
    unsafe {
        asm!(
            "{word} = *(u32 *)({p} + {off})",
            p = in(reg) header as *const T,
            off = const OFF,
            word = lateout(reg) word,
            options(nostack, readonly),
        );
    }
    (word as u32).to_ne_bytes()
}

/// `load4_at` for two bytes (a 16-bit load).
#[inline(always)]
pub fn load2_at<const OFF: usize, T>(header: &T) -> [u8; 2] {
    const { assert!(OFF + 2 <= mem::size_of::<T>()) };
    let half: u64;
    // SAFETY: as in `load4_at`, for bytes `OFF..OFF + 2`.
    unsafe {
        asm!(
            "{half} = *(u16 *)({p} + {off})",
            p = in(reg) header as *const T,
            off = const OFF,
            half = lateout(reg) half,
            options(nostack, readonly),
        );
    }
    (half as u16).to_ne_bytes()
}

/// Write four bytes `OFF` bytes into `*header` in one 32-bit store: `load4_at`'s counterpart, for
/// a header written word by word (`word` as the bytes lie in memory, `u32::from_ne_bytes`).
///
/// # Safety
/// `header` must point into the packet (a header `ptr_at` returned, whose bounds cover `T`).
#[inline(always)]
pub unsafe fn store4_at<const OFF: usize, T>(header: *mut T, word: u32) {
    const { assert!(OFF + 4 <= mem::size_of::<T>()) };
    // SAFETY: guaranteed by the caller; writes bytes `OFF..OFF + 4` of `*header` (within it,
    // asserted above) and nothing else.
    unsafe {
        asm!(
            "*(u32 *)({p} + {off}) = {word}",
            p = in(reg) header,
            off = const OFF,
            word = in(reg) u64::from(word),
            options(nostack),
        );
    }
}

/// An IPv4 header's source and destination address (network order, as `u32::from_ne_bytes` of
/// the wire bytes), one load each.
#[inline(always)]
pub fn ipv4_addrs(ip: &Ipv4Hdr) -> (u32, u32) {
    (
        u32::from_ne_bytes(load4_at::<{ mem::offset_of!(Ipv4Hdr, src_addr) }, _>(ip)),
        u32::from_ne_bytes(load4_at::<{ mem::offset_of!(Ipv4Hdr, dst_addr) }, _>(ip)),
    )
}

/// An IPv4 header's total length, host order, in one load.
#[inline(always)]
pub fn ipv4_tot_len(ip: &Ipv4Hdr) -> u16 {
    u16::from_be_bytes(load2_at::<{ mem::offset_of!(Ipv4Hdr, tot_len) }, _>(ip))
}

/// An IPv4 header's flags and fragment offset, host order (`IP_DF`, `IP_MF`,
/// `IP_OFFSET_MASK`), in one load.
#[inline(always)]
pub fn ipv4_frags(ip: &Ipv4Hdr) -> u16 {
    u16::from_be_bytes(load2_at::<{ mem::offset_of!(Ipv4Hdr, frags) }, _>(ip))
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
    let ports = unsafe { &*tcp.cast::<[u8; 4]>() };
    Some(load4(ports))
}
