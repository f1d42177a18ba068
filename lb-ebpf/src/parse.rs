//! Bounds-checked packet access: the only way this crate reads or writes packet bytes.

use aya_ebpf::programs::XdpContext;
use core::mem;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const ETH_P_IP: u16 = 0x0800;
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
