//! IPv6 test packets built by hand (packet fixtures, the fuzzer): the fixed header, extension
//! headers in any order (RFC 8200 §4), and ICMPv6 messages with their pseudo-header checksum (RFC
//! 4443 §2.3). Every field a fixture varies is explicit.

use crate::packet::checksum;
use std::net::Ipv6Addr;

pub const ETH_P_IPV6: u16 = 0x86dd;
/// Fixed IPv6 header length.
pub const IPV6_HLEN: usize = 40;
/// Next-header values (IANA "Assigned Internet Protocol Numbers").
pub const NH_HOP_BY_HOP: u8 = 0;
pub const NH_IPIP: u8 = 4;
pub const NH_TCP: u8 = 6;
pub const NH_UDP: u8 = 17;
pub const NH_IPV6: u8 = 41;
pub const NH_ROUTING: u8 = 43;
pub const NH_FRAGMENT: u8 = 44;
pub const NH_ESP: u8 = 50;
pub const NH_AH: u8 = 51;
pub const NH_ICMPV6: u8 = 58;
pub const NH_NONE: u8 = 59;
pub const NH_DEST_OPTS: u8 = 60;

/// ICMPv6 types (RFC 4443, RFC 4861).
pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP6_TIME_EXCEEDED: u8 = 3;
pub const ICMP6_ECHO_REQUEST: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const ICMP6_NEIGHBOR_SOLICIT: u8 = 135;

/// One extension header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-Hop Options of `8 * (units + 1)` bytes, padded with PadN.
    HopByHop { units: u8 },
    /// Destination Options of `8 * (units + 1)` bytes, padded with PadN.
    DestOpts { units: u8 },
    /// A Routing header (type 4, segment routing) with `segments_left` and `units` 8-byte units
    /// of type-specific data beyond the first 8 bytes.
    Routing { segments_left: u8, units: u8 },
    /// A Fragment header: offset in 8-byte units, the M flag, identification.
    Fragment { offset: u16, more: bool, id: u32 },
    /// An Authentication Header (RFC 4302) with a 12-byte ICV: 24 bytes.
    Ah,
}

impl Ext {
    /// The next-header value that announces this header.
    pub fn code(&self) -> u8 {
        match self {
            Ext::HopByHop { .. } => NH_HOP_BY_HOP,
            Ext::DestOpts { .. } => NH_DEST_OPTS,
            Ext::Routing { .. } => NH_ROUTING,
            Ext::Fragment { .. } => NH_FRAGMENT,
            Ext::Ah => NH_AH,
        }
    }

    /// The header's bytes, announcing `next` as what follows it.
    pub fn bytes(&self, next: u8) -> Vec<u8> {
        match *self {
            Ext::HopByHop { units } | Ext::DestOpts { units } => {
                let len = 8 * (usize::from(units) + 1);
                let mut h = vec![next, units];
                // PadN (type 1) over the rest: its length byte counts the bytes after it.
                h.extend_from_slice(&[1, (len - 4) as u8]);
                h.resize(len, 0);
                h
            }
            Ext::Routing {
                segments_left,
                units,
            } => {
                let len = 8 * (usize::from(units) + 1);
                let mut h = vec![next, units, 4, segments_left];
                h.resize(len, 0);
                h
            }
            Ext::Fragment { offset, more, id } => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                h
            }
            Ext::Ah => {
                // Payload length in 4-byte units minus 2: (24 / 4) - 2 = 4.
                let mut h = vec![next, 4, 0, 0];
                h.extend_from_slice(&0x1000u32.to_be_bytes()); // SPI
                h.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                h.resize(24, 0xaa); // ICV
                h
            }
        }
    }
}

/// An IPv6 header to build, with the extension headers that follow it in order.
#[derive(Clone, Debug)]
pub struct Ip6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// The protocol of the payload after the last extension header.
    pub next: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
    /// 20 bits.
    pub flow_label: u32,
    pub ext: Vec<Ext>,
}

impl Ip6 {
    /// Hop limit 63, traffic class 0, flow label 0x12345, no extension headers.
    pub fn to(src: Ipv6Addr, dst: Ipv6Addr, next: u8) -> Self {
        Ip6 {
            src,
            dst,
            next,
            hop_limit: 63,
            traffic_class: 0,
            flow_label: 0x12345,
            ext: Vec::new(),
        }
    }

    /// The same with `ext` appended to the chain.
    pub fn with(mut self, ext: Ext) -> Self {
        self.ext.push(ext);
        self
    }

    /// The extension headers' bytes, chained to `self.next`.
    pub fn ext_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(self.next, Ext::code);
            out.extend_from_slice(&e.bytes(next));
        }
        out
    }

    /// The fixed header alone, for a payload (extension headers included) of `payload_len`.
    pub fn header(&self, payload_len: usize) -> Vec<u8> {
        let first = self.ext.first().map_or(self.next, Ext::code);
        let word =
            (6u32 << 28) | (u32::from(self.traffic_class) << 20) | (self.flow_label & 0x000f_ffff);
        let mut h = word.to_be_bytes().to_vec();
        h.extend_from_slice(&(payload_len as u16).to_be_bytes());
        h.extend_from_slice(&[first, self.hop_limit]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h
    }

    /// The whole packet: fixed header, extension headers, `payload`.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let ext = self.ext_bytes();
        let mut p = self.header(ext.len() + payload.len());
        p.extend_from_slice(&ext);
        p.extend_from_slice(payload);
        p
    }
}

/// The Internet checksum of an upper-layer `segment` of protocol `next` between `src` and `dst`,
/// over the IPv6 pseudo-header (RFC 8200 §8.1), as stored (host-order value; write it with
/// `to_be_bytes`). The segment's own checksum field must be zero.
pub fn checksum6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, segment: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(40 + segment.len());
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&(segment.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, next]);
    data.extend_from_slice(segment);
    checksum(&data)
}

/// An ICMPv6 message from `src` to `dst`: `kind`, `code`, the 4 bytes after the checksum, then
/// `body` (for errors: as much of the invoking packet as fits), checksummed.
pub fn icmp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(body);
    let c = checksum6(src, dst, NH_ICMPV6, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn fixed_header_field_by_field() {
        let mut ip = Ip6::to(a("fd11:1::2"), a("fd11:100::1"), NH_TCP);
        ip.traffic_class = 0xb8;
        let p = ip.packet(&[0xee; 20]);
        assert_eq!(&p[0..4], &[0x6b, 0x81, 0x23, 0x45]);
        assert_eq!(&p[4..8], &[0, 20, NH_TCP, 63]);
        assert_eq!(&p[8..24], &a("fd11:1::2").octets());
        assert_eq!(&p[24..40], &a("fd11:100::1").octets());
        assert_eq!(p.len(), 60);
    }

    #[test]
    fn extension_headers_chain_in_order() {
        let ip = Ip6::to(a("fd11:1::2"), a("fd11:100::1"), NH_UDP)
            .with(Ext::HopByHop { units: 0 })
            .with(Ext::Routing {
                segments_left: 0,
                units: 2,
            })
            .with(Ext::Fragment {
                offset: 0,
                more: true,
                id: 7,
            });
        let p = ip.packet(&[]);
        assert_eq!(p[6], NH_HOP_BY_HOP);
        assert_eq!(&p[40..48], &[NH_ROUTING, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(&p[48..52], &[NH_FRAGMENT, 2, 4, 0]);
        assert_eq!(&p[72..80], &[NH_UDP, 0, 0, 1, 0, 0, 0, 7]);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 8 + 24 + 8);
    }

    #[test]
    fn icmp6_checksum_verifies() {
        // A message whose checksum is right sums, with its pseudo-header, to zero (0xffff
        // before the complement).
        let (src, dst) = (a("fd11:1::2"), a("fd11:100::1"));
        let m = icmp6(src, dst, ICMP6_ECHO_REQUEST, 0, [0, 1, 0, 2], b"ping");
        assert_eq!(checksum6(src, dst, NH_ICMPV6, &m), 0);
        // By hand: pseudo-header fd14 + fe12 + 000c + 003a, message 8000 + 0001 + 0002 + 7069
        // + 6e67, sum 0x35a3f, folded 0x5a42, complemented 0xa5bd.
        assert_eq!(u16::from_be_bytes([m[2], m[3]]), 0xa5bd);
    }
}
