//! Helpers for building test packets by hand (packet fixtures and the benchmark's frames).

/// The Internet checksum (RFC 1071) of `bytes`, as stored in IPv4/ICMP headers (host order
/// value; write it with `to_be_bytes`). An odd trailing byte is padded with zero.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_hand_computed_ipv4_header() {
        // Outer header of the first packet fixture, checksum field zeroed; 0x23d4 by hand.
        let h = [
            0x45, 0, 0, 0x3c, 0, 0, 0x40, 0, 64, 4, 0, 0, 10, 111, 1, 2, 10, 111, 1, 11,
        ];
        assert_eq!(checksum(&h), 0x23d4);
    }
}
