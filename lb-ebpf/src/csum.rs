//! Internet checksums (RFC 1071) over small, fixed or bounded regions.

use crate::parse::ptr_at;
use aya_ebpf::programs::XdpContext;

#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Checksum `check` (as stored: host-order value of the two wire bytes) after one 16-bit word of
/// the data it covers changed from `old` to `new` (RFC 1624, eqn. 3). The result is never
/// 0x0000: where that arises, 0xffff is the same value in one's complement and the only one a
/// receiver accepts if the data became all zeros.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    match fold(u32::from(!check) + u32::from(!old) + u32::from(new)) {
        0 => 0xffff,
        c => c,
    }
}

/// Checksum of a 20-byte IPv4 header whose checksum field is zero. Returns the value to store, as
/// bytes in network order.
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> [u8; 2] {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_be_bytes([hdr[i], hdr[i + 1]]) as u32;
        i += 2;
    }
    fold(sum).to_be_bytes()
}

/// Most 16-bit words `packet_words` sums: ICMP header (8) + IPv4 header with options (60) + 8.
pub const MAX_CSUM_WORDS: usize = 38;

/// Sum of `words` 16-bit words of the packet starting at `offset` (bounded, so the verifier can
/// see the loop end). `None` if the region runs past the packet.
#[inline(always)]
pub fn packet_words(ctx: &XdpContext, offset: usize, words: usize) -> Option<u32> {
    let mut sum: u32 = 0;
    for i in 0..MAX_CSUM_WORDS {
        if i >= words {
            break;
        }
        let w: *const [u8; 2] = ptr_at(ctx, offset + i * 2)?;
        // SAFETY: bounds checked by ptr_at.
        sum += u16::from_be_bytes(unsafe { *w }) as u32;
    }
    Some(sum)
}
