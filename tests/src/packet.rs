//! Helpers for building test packets by hand (packet fixtures and the benchmark's frames), and
//! the context that goes with a frame into BPF_PROG_TEST_RUN.

/// `struct xdp_md` for BPF_PROG_TEST_RUN of a `len`-byte frame received on `ifindex`: data,
/// data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex. (In live-frames mode the
/// ingress device is also where XDP_TX sends.)
pub fn xdp_md(len: usize, ifindex: u32) -> Vec<u8> {
    [0, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v: &u32| v.to_ne_bytes())
        .collect()
}

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
