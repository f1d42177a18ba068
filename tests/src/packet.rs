//! Helpers for building test packets by hand (packet fixtures, the fuzzer and the benchmark's
//! frames), and the context that goes with a frame into BPF_PROG_TEST_RUN. Every field the
//! fixtures vary is explicit.

use std::net::Ipv4Addr;

/// TCP header flag bits (byte 13).
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const ETH_P_IP: u16 = 0x0800;

/// An IPv4 header to build.
#[derive(Clone, Debug)]
pub struct Ip {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Flags and fragment offset, host order (0x4000 = DF).
    pub frag: u16,
    /// IHL in 32-bit words.
    pub ihl: u8,
}

impl Ip {
    /// DF set, no options.
    pub fn to(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Ip {
            src,
            dst,
            proto,
            frag: 0x4000,
            ihl: 5,
        }
    }

    /// The IPv4 header followed by `payload`.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = usize::from(self.ihl) * 4;
        let total = (hlen + payload.len()) as u16;
        let mut h = vec![0u8; hlen];
        h[0] = 0x40 | self.ihl;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        h[6..8].copy_from_slice(&self.frag.to_be_bytes());
        h[8] = 63;
        h[9] = self.proto;
        h[12..16].copy_from_slice(&self.src.octets());
        h[16..20].copy_from_slice(&self.dst.octets());
        // Options, if any, are NOPs.
        for b in h.iter_mut().skip(20) {
            *b = 1;
        }
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// A TCP header with `flags` and `payload_len` bytes of payload (a counting pattern).
pub fn tcp(sport: u16, dport: u16, flags: u8, payload_len: usize) -> Vec<u8> {
    let mut t = vec![0u8; 20 + payload_len];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1000u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    for (i, b) in t.iter_mut().enumerate().skip(20) {
        *b = i as u8;
    }
    t
}

/// A UDP header (checksum 0: none) and `payload`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

/// An ICMP message: `kind`, `code`, the 4 bytes after the checksum, then `body` (for errors:
/// the quoted IPv4 header and 8 bytes), checksummed.
pub fn icmp_message(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(body);
    let c = checksum(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    msg
}

/// What an ICMP error quotes of `packet` (an IPv4 packet): its header and 8 bytes.
pub fn quote(packet: &[u8]) -> Vec<u8> {
    let hlen = usize::from(packet[0] & 0x0f) * 4;
    packet[..hlen + 8].to_vec()
}

/// An Ethernet frame.
pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

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
