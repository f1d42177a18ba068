//! One shape for an address of either family in map keys and values: 16 bytes in network order,
//! IPv6 as on the wire and IPv4 as the IPv4-mapped IPv6 address `::ffff:a.b.c.d` (RFC 4291
//! §2.5.5.2). The address alone tells its family, so two addresses are equal exactly when they are
//! the same address of the same family; the control plane never accepts an IPv4-mapped IPv6
//! address as a VIP or backend, so a mapped address always means an IPv4 one.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 address: 16 bytes in network order, held as four 32-bit words in memory order
/// (`words[i]` is `u32::from_ne_bytes` of bytes `4i..4i+4`), so the data path copies and compares
/// it a word at a time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Addr {
    pub words: [u32; 4],
}

/// The third word of every IPv4-mapped address (bytes `00 00 ff ff`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// `::`, which no VIP, backend or local address is: "none".
    pub const UNSPECIFIED: Addr = Addr { words: [0; 4] };

    /// The IPv4 address whose wire bytes, read as one `u32` in memory order, are `net`.
    #[inline(always)]
    pub const fn from_v4(net: u32) -> Self {
        Addr {
            words: [0, 0, V4_MAPPED_WORD, net],
        }
    }

    /// The address whose wire bytes are `octets`.
    #[inline(always)]
    pub const fn from_octets(o: [u8; 16]) -> Self {
        Addr {
            words: [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ],
        }
    }

    /// The wire bytes.
    pub const fn octets(&self) -> [u8; 16] {
        let [a, b, c, d] = self.words;
        let (a, b, c, d) = (
            a.to_ne_bytes(),
            b.to_ne_bytes(),
            c.to_ne_bytes(),
            d.to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    /// An IPv4 address (IPv4-mapped).
    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == V4_MAPPED_WORD
    }

    /// The IPv4 address as `from_v4` took it; meaningful only if `is_v4`.
    #[inline(always)]
    pub const fn v4(&self) -> u32 {
        self.words[3]
    }

    pub const fn is_unspecified(&self) -> bool {
        let [a, b, c, d] = self.words;
        a | b | c | d == 0
    }
}

impl From<Ipv4Addr> for Addr {
    fn from(a: Ipv4Addr) -> Self {
        Addr::from_v4(u32::from_ne_bytes(a.octets()))
    }
}

impl From<Ipv6Addr> for Addr {
    fn from(a: Ipv6Addr) -> Self {
        Addr::from_octets(a.octets())
    }
}

impl From<IpAddr> for Addr {
    fn from(a: IpAddr) -> Self {
        match a {
            IpAddr::V4(v4) => v4.into(),
            IpAddr::V6(v6) => v6.into(),
        }
    }
}

impl From<Addr> for IpAddr {
    /// IPv4-mapped addresses come back as IPv4.
    fn from(a: Addr) -> Self {
        Ipv6Addr::from(a.octets()).to_canonical()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_mapped_and_round_trips() {
        let v4 = Ipv4Addr::new(10, 111, 1, 11);
        let a = Addr::from(v4);
        assert!(a.is_v4());
        assert_eq!(a.v4(), u32::from_ne_bytes(v4.octets()));
        assert_eq!(
            a.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 111, 1, 11]
        );
        assert_eq!(IpAddr::from(a), IpAddr::V4(v4));
    }

    #[test]
    fn ipv6_is_as_on_the_wire_and_never_equals_an_ipv4_address() {
        let v6: Ipv6Addr = "fd11:2::11".parse().unwrap();
        let a = Addr::from(v6);
        assert!(!a.is_v4());
        assert_eq!(a.octets(), v6.octets());
        assert_eq!(IpAddr::from(a), IpAddr::V6(v6));
        // Katran's layout would put 10.0.0.1 in the first word: here `a00:1::` stays IPv6.
        let looks_alike: Ipv6Addr = "a00:1::".parse().unwrap();
        assert_ne!(
            Addr::from(looks_alike),
            Addr::from(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert!(Addr::UNSPECIFIED.is_unspecified() && !a.is_unspecified());
    }
}
