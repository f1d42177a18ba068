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

/// A 64-bit sum of 32-bit words folded to 32 bits with end-around carry.
#[inline(always)]
pub fn fold64(sum: u64) -> u32 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    s as u32
}

/// Checksum of a 20-byte IPv4 header given as its five 32-bit words as they lie in memory
/// (`u32::from_ne_bytes` of each 4 bytes), checksum field zero; the checksum as it lies in memory
/// (stored with `to_ne_bytes`). Five additions where `ipv4_header` takes ten loads and ten
/// shifts: a one's complement sum comes out in the byte order its words were summed in (RFC 1071
/// §2(B)), and a sum of 32-bit words folds to the sum of their 16-bit halves (2^16 ≡ 1 modulo
/// 2^16 − 1).
#[inline(always)]
pub fn ipv4_header_words(words: &[u32; 5]) -> u16 {
    let sum = u64::from(words[0])
        + u64::from(words[1])
        + u64::from(words[2])
        + u64::from(words[3])
        + u64::from(words[4]);
    fold(fold64(sum))
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
