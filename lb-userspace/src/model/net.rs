//! Prefixes as operators type them, for the VIPs' source lists and the global deny list: IPv4
//! ones (`10.0.0.0/8`, `Ipv4Net`) and either family's (`2001:db8::/32` too, `IpNet`).
//!
//! Host bits are refused, not cleared: `10.1.2.3/8` is far more often a typo (for
//! `10.1.2.3/32`, or `/24`) than a wish to list all of 10.0.0.0/8, and clearing them would
//! silently deny or allow a network 65 536 times larger than the one written. The error names
//! the network the prefix would have been.

use super::addr::{parse_prefix, prefix_mask6};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("malformed prefix {input:?}: expected ADDR/LEN, e.g. 192.0.2.0/24, or an address")]
    Malformed { input: String },
    #[error("{input:?} is an IPv6 prefix where an IPv4 one is expected")]
    Ipv6 { input: String },
    /// An IPv6 prefix that `addr::parse_prefix` refused, with its message.
    #[error("{message}")]
    BadIpv6 { message: String },
    #[error("malformed prefix {input:?}: {addr:?} is not an IPv4 address")]
    BadAddress { input: String, addr: String },
    #[error("malformed prefix {input:?}: prefix length {len:?} is not 0-32")]
    BadLength { input: String, len: String },
    #[error("prefix {input:?} has host bits set (the network is {network})")]
    HostBits { input: String, network: Ipv4Net },
}

/// An IPv4 prefix: an address whose bits past `len` are zero, and `len` (0-32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    len: u8,
}

impl Ipv4Net {
    /// `addr/len`, or `None` if `len` is over 32 or `addr` has bits set past it.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Self> {
        (len <= 32 && addr.to_bits() & !mask(len) == 0).then_some(Ipv4Net { addr, len })
    }

    /// One address, as a /32.
    pub fn host(addr: Ipv4Addr) -> Self {
        Ipv4Net { addr, len: 32 }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `addr` lies inside this prefix.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        addr.to_bits() & mask(self.len) == self.addr.to_bits()
    }
}

/// The network mask of a prefix length (0-32), host order.
fn mask(len: u8) -> u32 {
    match len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Net {
    type Err = NetError;

    /// `ADDR/LEN` or a plain address (a /32). Surrounding whitespace is not accepted here (the
    /// deny-list file reader trims its lines).
    fn from_str(input: &str) -> Result<Self, NetError> {
        let (addr_s, len_s) = match input.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (input, None),
        };
        let addr: Ipv4Addr = addr_s.parse().map_err(|_| {
            if addr_s.parse::<std::net::Ipv6Addr>().is_ok() {
                NetError::Ipv6 {
                    input: input.to_string(),
                }
            } else if addr_s.is_empty()
                || addr_s.contains(|c: char| !(c.is_ascii_digit() || c == '.'))
            {
                NetError::Malformed {
                    input: input.to_string(),
                }
            } else {
                NetError::BadAddress {
                    input: input.to_string(),
                    addr: addr_s.to_string(),
                }
            }
        })?;
        let len = match len_s {
            None => 32,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= 32 && !l.starts_with('+') => n,
                _ => {
                    return Err(NetError::BadLength {
                        input: input.to_string(),
                        len: l.to_string(),
                    });
                }
            },
        };
        Ipv4Net::new(addr, len).ok_or_else(|| NetError::HostBits {
            input: input.to_string(),
            network: Ipv4Net {
                addr: Ipv4Addr::from_bits(addr.to_bits() & mask(len)),
                len,
            },
        })
    }
}

/// An IPv6 prefix: an address whose bits past `len` are zero, and `len` (0-128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6Net {
    addr: Ipv6Addr,
    len: u8,
}

impl Ipv6Net {
    /// `addr/len`, or `None` if `len` is over 128 or `addr` has bits set past it.
    pub fn new(addr: Ipv6Addr, len: u8) -> Option<Self> {
        (len <= 128 && addr.to_bits() & !prefix_mask6(len) == 0).then_some(Ipv6Net { addr, len })
    }

    pub fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }
}

impl fmt::Display for Ipv6Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A prefix of either family (the deny list, a VIP's source lists). IPv4 sorts before IPv6 (the
/// deny list's file and `xlb deny list` give IPv4 prefixes first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpNet {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

impl From<Ipv4Net> for IpNet {
    fn from(n: Ipv4Net) -> Self {
        IpNet::V4(n)
    }
}

impl From<Ipv6Net> for IpNet {
    fn from(n: Ipv6Net) -> Self {
        IpNet::V6(n)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpNet::V4(n) => n.fmt(f),
            IpNet::V6(n) => n.fmt(f),
        }
    }
}

impl FromStr for IpNet {
    type Err = NetError;

    /// An IPv4 prefix as `Ipv4Net` reads it, or an IPv6 one as `addr::parse_prefix` does
    /// (`ADDR/LEN`, a plain address as a /128; host bits and IPv4-mapped addresses refused: the
    /// maps spell IPv4 that way, and the IPv4 prefix says what is meant).
    fn from_str(input: &str) -> Result<Self, NetError> {
        if !input.contains(':') {
            return input.parse().map(IpNet::V4);
        }
        match parse_prefix(input) {
            Ok((IpAddr::V6(addr), len)) => {
                Ipv6Net::new(addr, len)
                    .map(IpNet::V6)
                    .ok_or_else(|| NetError::Malformed {
                        input: input.to_string(),
                    })
            }
            Ok((IpAddr::V4(_), _)) => Err(NetError::Malformed {
                input: input.to_string(),
            }),
            Err(e) => Err(NetError::BadIpv6 {
                message: e.to_string(),
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name} line {line}: {error}")]
pub struct ListError {
    /// Where the list came from (a file name), for the message.
    pub source_name: String,
    /// 1-based.
    pub line: usize,
    pub error: NetError,
}

/// A list of prefixes as a file holds them: one prefix (or address) per line, `#` starts a
/// comment, blank lines and surrounding whitespace are ignored. The first bad line fails the
/// whole list (nothing of it is used), named by its number. Duplicates are kept out; the order
/// is the file's. `N`: `IpNet`, or `Ipv4Net` where only IPv4 is meant.
pub fn parse_list<N>(text: &str, source_name: &str) -> Result<Vec<N>, ListError>
where
    N: FromStr<Err = NetError> + Copy + Eq + std::hash::Hash,
{
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let net: N = content.parse().map_err(|error| ListError {
            source_name: source_name.to_string(),
            line: i + 1,
            error,
        })?;
        if seen.insert(net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// Both prefix types serialize as their text form (`"10.0.0.0/8"`, `"2001:db8::/32"`) and are
/// read back through `FromStr`, so a file or a request with host bits is refused as the CLI
/// refuses it.
macro_rules! serde_as_text {
    ($($t:ty),+) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )+};
}

serde_as_text!(Ipv4Net, IpNet);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_addresses_parse() {
        let n: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        assert_eq!((n.addr(), n.prefix_len()), (Ipv4Addr::new(10, 0, 0, 0), 8));
        assert_eq!(n.to_string(), "10.0.0.0/8");
        let h: Ipv4Net = "192.0.2.7".parse().unwrap();
        assert_eq!(h, Ipv4Net::host(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(h.to_string(), "192.0.2.7/32");
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().prefix_len(), 0);
        assert!(n.contains(Ipv4Addr::new(10, 200, 1, 1)));
        assert!(!n.contains(Ipv4Addr::new(11, 0, 0, 1)));
        assert!(
            "0.0.0.0/0"
                .parse::<Ipv4Net>()
                .unwrap()
                .contains(Ipv4Addr::BROADCAST)
        );
    }

    #[test]
    fn bad_prefixes_are_one_line_errors() {
        let cases = [
            ("10.0.0.0/33", "prefix length \"33\" is not 0-32"),
            ("10.0.0.0/-1", "prefix length \"-1\""),
            ("10.0.0.0/+8", "prefix length \"+8\""),
            ("10.0.0.0/", "prefix length \"\""),
            ("10.0.0/8", "\"10.0.0\" is not an IPv4 address"),
            ("10.0.0.256", "is not an IPv4 address"),
            ("foo", "expected ADDR/LEN"),
            ("", "expected ADDR/LEN"),
            (
                "10.1.2.3/8",
                "prefix \"10.1.2.3/8\" has host bits set (the network is 10.0.0.0/8)",
            ),
            ("192.0.2.1/31", "the network is 192.0.2.0/31"),
            ("2001:db8::/32", "\"2001:db8::/32\" is an IPv6 prefix"),
            (
                "fd11:1::2",
                "is an IPv6 prefix where an IPv4 one is expected",
            ),
        ];
        for (input, want) in cases {
            let e = input.parse::<Ipv4Net>().unwrap_err().to_string();
            assert!(e.contains(want), "{input}: {e:?} lacks {want:?}");
            assert!(!e.contains('\n'));
        }
        assert_eq!(Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 1), 8), None);
        assert_eq!(Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 33), None);
    }

    #[test]
    fn deny_prefixes_take_either_family() {
        let n: IpNet = "2001:db8::/32".parse().unwrap();
        let IpNet::V6(v6) = n else { panic!("{n:?}") };
        assert_eq!(v6.prefix_len(), 32);
        assert_eq!(n.to_string(), "2001:db8::/32");
        assert_eq!(
            "fd11:1::2".parse::<IpNet>().unwrap().to_string(),
            "fd11:1::2/128"
        );
        assert_eq!("::/0".parse::<IpNet>().unwrap().to_string(), "::/0");
        assert_eq!(
            "10.0.0.0/8".parse::<IpNet>().unwrap(),
            IpNet::V4("10.0.0.0/8".parse().unwrap())
        );
        // IPv4 before IPv6, each family in address order.
        let mut v: Vec<IpNet> = ["fd11::/16", "10.0.0.0/8", "2001:db8::/32", "9.0.0.0/8"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        v.sort();
        let v: Vec<String> = v.iter().map(|n| n.to_string()).collect();
        assert_eq!(v, ["9.0.0.0/8", "10.0.0.0/8", "2001:db8::/32", "fd11::/16"]);
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"2001:db8::/32\"");
        assert_eq!(
            serde_json::from_str::<IpNet>("\"2001:db8::/32\"").unwrap(),
            n
        );
    }

    #[test]
    fn bad_deny_prefixes_are_one_line_errors() {
        let cases = [
            (
                "2001:db8::/129",
                "malformed prefix \"2001:db8::/129\": expected ADDR/LEN",
            ),
            ("2001:db8::/", "malformed prefix \"2001:db8::/\""),
            ("2001:db8:::1", "malformed prefix \"2001:db8:::1\""),
            ("10.0.0.256", "is not an IPv4 address"),
            (
                "2001:db8::1/32",
                "bits set after the first 32 (did you mean 2001:db8::/32?)",
            ),
            (
                "::ffff:10.0.0.0/104",
                "IPv4-mapped IPv6 address: write the IPv4 address, 10.0.0.0",
            ),
            ("10.0.0.0/33", "prefix length \"33\" is not 0-32"),
            ("foo", "expected ADDR/LEN"),
        ];
        for (input, want) in cases {
            let e = input.parse::<IpNet>().unwrap_err().to_string();
            assert!(e.contains(want), "{input}: {e:?} lacks {want:?}");
            assert!(!e.contains('\n'));
        }
        assert_eq!(Ipv6Net::new("2001:db8::1".parse().unwrap(), 32), None);
        let list: Vec<IpNet> = parse_list("10.0.0.0/8\n2001:db8::/32 # v6\n", "f").unwrap();
        assert_eq!(list.len(), 2);
        let e = parse_list::<Ipv4Net>("10.0.0.0/8\n2001:db8::/32\n", "f").unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    fn lists_skip_comments_and_name_the_bad_line() {
        let text = "# a feed\n10.0.0.0/8\n\n  192.0.2.7  # one host\n10.0.0.0/8\n";
        let list: Vec<Ipv4Net> = parse_list(text, "feed.txt").unwrap();
        assert_eq!(
            list.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["10.0.0.0/8", "192.0.2.7/32"]
        );
        let e = parse_list::<Ipv4Net>("10.0.0.0/8\n# ok\n10.0.0.0/40\n", "feed.txt").unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(
            e.to_string(),
            "feed.txt line 3: malformed prefix \"10.0.0.0/40\": prefix length \"40\" is not 0-32"
        );
        assert_eq!(parse_list::<Ipv4Net>("", "x").unwrap(), vec![]);
    }

    #[test]
    fn serde_is_the_text_form() {
        let n: Ipv4Net = "198.51.100.0/24".parse().unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"198.51.100.0/24\"");
        assert_eq!(
            serde_json::from_str::<Ipv4Net>("\"198.51.100.0/24\"").unwrap(),
            n
        );
        assert!(serde_json::from_str::<Ipv4Net>("\"198.51.100.1/24\"").is_err());
    }
}
