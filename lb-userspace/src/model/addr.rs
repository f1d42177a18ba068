//! Parsing of the addresses an operator types (`ADDR:PORT` for a VIP, `[ADDR]:PORT` for an IPv6
//! one, `ADDR` for a backend), with errors that quote the input and say what was expected, so the
//! CLI and the config file can report the problem in one line.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    #[error("malformed address {input:?}: missing port (expected ADDR:PORT, e.g. 10.0.0.1:80)")]
    MissingPort { input: String },
    #[error("malformed address {input:?}: expected ADDR:PORT, e.g. 10.0.0.1:80")]
    NotAddrPort { input: String },
    #[error("malformed address {input:?}: {addr:?} is not an IPv4 address")]
    BadIpv4 { input: String, addr: String },
    #[error("malformed address {input:?}: not an IPv4 or IPv6 address")]
    BadIp { input: String },
    #[error(
        "malformed address {input:?}: an IPv6 VIP is written in brackets, [ADDR]:PORT (e.g. [2001:db8::100]:80)"
    )]
    Ipv6NoBrackets { input: String },
    #[error("address {input:?} is an IPv4-mapped IPv6 address: write the IPv4 address, {v4}")]
    Ipv4Mapped { input: String, v4: Ipv4Addr },
    #[error("malformed address {input:?}: {port:?} is not a port (expected 1-65535)")]
    BadPort { input: String, port: String },
    #[error("malformed address {input:?}: port 0 is not a valid port (expected 1-65535)")]
    PortZero { input: String },
    #[error(
        "malformed address {input:?}: a backend address takes no port (the VIP's port is kept)"
    )]
    UnexpectedPort { input: String },
    #[error(
        "malformed prefix {input:?}: expected ADDR/LEN with LEN 0-32 for IPv4 or 0-128 for IPv6 (e.g. 10.111.0.0/16, 2001:db8::/32) or one address"
    )]
    BadPrefix { input: String },
    #[error(
        "malformed prefix {input:?}: bits set after the first {len} (did you mean {net}/{len}?)"
    )]
    PrefixHostBits { input: String, net: IpAddr, len: u8 },
}

/// An address a VIP or a backend can be: unicast, not 0.0.0.0 or :: (which the data path uses as
/// "free slot"), not the limited broadcast; for IPv6 neither loopback nor link-local (a
/// link-local address names no host beyond one link, and the kernel's FIB lookup refuses it) and
/// never IPv4-mapped (the data path keeps IPv4 addresses in that form, so it must only ever mean
/// IPv4).
pub(crate) fn is_host_address(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()),
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_loopback()
                || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some())
        }
    }
}

/// Parse `ADDR:PORT` or `[ADDR]:PORT` (a VIP, IPv4 or IPv6, as std's `SocketAddr` writes them).
/// Port 0 is rejected: no packet is ever addressed to it. So is an IPv4-mapped IPv6 address (see
/// [`parse_ip`]).
pub(crate) fn parse_addr_port(input: &str) -> Result<(IpAddr, u16), ParseError> {
    let owned = || input.to_string();
    if let Some(rest) = input.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return Err(ParseError::NotAddrPort { input: owned() });
        };
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|_| ParseError::BadIp { input: owned() })?;
        let addr = not_mapped(input, addr)?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| ParseError::MissingPort { input: owned() })?;
        return Ok((addr, parse_port(input, port)?));
    }
    // Without brackets an IPv6 address cannot carry a port: `2001:db8::100:80` is one address.
    if input.parse::<Ipv6Addr>().is_ok() {
        return Err(ParseError::Ipv6NoBrackets { input: owned() });
    }
    let Some((addr, port)) = input.rsplit_once(':') else {
        // A bare address is the common slip; anything else is just not an address.
        return Err(if input.parse::<Ipv4Addr>().is_ok() {
            ParseError::MissingPort { input: owned() }
        } else if looks_like_ipv4(input) {
            ParseError::BadIpv4 {
                input: owned(),
                addr: input.to_string(),
            }
        } else {
            ParseError::NotAddrPort { input: owned() }
        });
    };
    let addr: Ipv4Addr = addr.parse().map_err(|_| {
        if looks_like_ipv4(addr) {
            ParseError::BadIpv4 {
                input: owned(),
                addr: addr.to_string(),
            }
        } else {
            ParseError::NotAddrPort { input: owned() }
        }
    })?;
    Ok((IpAddr::V4(addr), parse_port(input, port)?))
}

/// The port of `input` (`ADDR:PORT`): 1-65535.
fn parse_port(input: &str, port: &str) -> Result<u16, ParseError> {
    if port.is_empty() {
        return Err(ParseError::MissingPort {
            input: input.to_string(),
        });
    }
    let port: u16 = port.parse().map_err(|_| ParseError::BadPort {
        input: input.to_string(),
        port: port.to_string(),
    })?;
    if port == 0 {
        return Err(ParseError::PortZero {
            input: input.to_string(),
        });
    }
    Ok(port)
}

/// `addr` unless it is IPv4-mapped (see [`parse_ip`]).
fn not_mapped(input: &str, addr: Ipv6Addr) -> Result<IpAddr, ParseError> {
    match addr.to_ipv4_mapped() {
        Some(v4) => Err(ParseError::Ipv4Mapped {
            input: input.to_string(),
            v4,
        }),
        None => Ok(IpAddr::V6(addr)),
    }
}

/// Parse a plain address of either family (a backend, a VIP on a backend host). `ADDR:PORT` is
/// rejected with its own message, because DSR cannot change the destination port, and so is an
/// IPv4-mapped IPv6 address (`::ffff:10.0.0.1`): the data path keeps IPv4 addresses in exactly
/// that form, so it must always mean IPv4, written as IPv4.
pub(crate) fn parse_ip(input: &str) -> Result<IpAddr, ParseError> {
    match input.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => not_mapped(input, v6),
        Ok(v4) => Ok(v4),
        Err(_) if parse_addr_port(input).is_ok() || input.parse::<SocketAddr>().is_ok() => {
            Err(ParseError::UnexpectedPort {
                input: input.to_string(),
            })
        }
        Err(_) if looks_like_ipv4(input) => Err(ParseError::BadIpv4 {
            input: input.to_string(),
            addr: input.to_string(),
        }),
        Err(_) => Err(ParseError::BadIp {
            input: input.to_string(),
        }),
    }
}

/// Parse a prefix of either family, `ADDR/LEN`, or one address (`/32`, `/128`). Bits set after
/// the prefix length are refused rather than cleared: `10.111.0.5/16` is more likely a typo than
/// a wish. IPv4-mapped IPv6 prefixes are refused as addresses are (see [`parse_ip`]).
pub(crate) fn parse_prefix(input: &str) -> Result<(IpAddr, u8), ParseError> {
    let bad = || ParseError::BadPrefix {
        input: input.to_string(),
    };
    let (addr, len) = match input.split_once('/') {
        Some((addr, len)) => (addr, Some(len.parse::<u8>().map_err(|_| bad())?)),
        None => (input, None),
    };
    let addr = match addr.parse::<IpAddr>().map_err(|_| bad())? {
        IpAddr::V6(v6) => not_mapped(input, v6)?,
        v4 => v4,
    };
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(bits);
    if len > bits {
        return Err(bad());
    }
    let net = match addr {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & prefix_mask(len))),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & prefix_mask6(len))),
    };
    if net != addr {
        return Err(ParseError::PrefixHostBits {
            input: input.to_string(),
            net,
            len,
        });
    }
    Ok((addr, len))
}

/// The netmask of an IPv4 prefix length (0-32), host order.
pub(crate) fn prefix_mask(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

/// The netmask of an IPv6 prefix length (0-128), as a host-order `u128`.
pub(crate) fn prefix_mask6(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

/// "Four dot-separated groups of digits": used only to pick the more helpful of two messages.
fn looks_like_ipv4(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_addresses_parse() {
        assert_eq!(
            parse_addr_port("10.111.100.1:80").unwrap(),
            (IpAddr::from([10, 111, 100, 1]), 80)
        );
        assert_eq!(
            parse_addr_port("0.0.0.0:65535").unwrap(),
            (IpAddr::from(Ipv4Addr::UNSPECIFIED), 65535)
        );
        assert_eq!(
            parse_addr_port("[2001:db8::100]:80").unwrap(),
            ("2001:db8::100".parse().unwrap(), 80)
        );
        assert_eq!(
            parse_ip("10.111.1.11").unwrap(),
            IpAddr::from([10, 111, 1, 11])
        );
    }

    #[test]
    fn ipv6_vips_need_brackets_and_a_port() {
        for (input, want) in [
            (
                "2001:db8::100:80",
                "malformed address \"2001:db8::100:80\": an IPv6 VIP is written in brackets, [ADDR]:PORT (e.g. [2001:db8::100]:80)",
            ),
            (
                "[2001:db8::100]",
                "malformed address \"[2001:db8::100]\": missing port (expected ADDR:PORT, e.g. 10.0.0.1:80)",
            ),
            (
                "[2001:db8::100]:0",
                "malformed address \"[2001:db8::100]:0\": port 0 is not a valid port (expected 1-65535)",
            ),
            (
                "[2001:db8::g]:80",
                "malformed address \"[2001:db8::g]:80\": not an IPv4 or IPv6 address",
            ),
            (
                "[::ffff:10.111.100.1]:80",
                "address \"[::ffff:10.111.100.1]:80\" is an IPv4-mapped IPv6 address: write the IPv4 address, 10.111.100.1",
            ),
        ] {
            assert_eq!(parse_addr_port(input).unwrap_err().to_string(), want);
        }
        assert!(matches!(
            parse_addr_port("[2001:db8::100:80").unwrap_err(),
            ParseError::NotAddrPort { .. }
        ));
    }

    #[test]
    fn malformed_addresses_name_the_problem() {
        let e = parse_addr_port("10.111.300.1:80").unwrap_err();
        assert!(matches!(e, ParseError::BadIpv4 { ref addr, .. } if addr == "10.111.300.1"));
        assert_eq!(
            e.to_string(),
            "malformed address \"10.111.300.1:80\": \"10.111.300.1\" is not an IPv4 address"
        );
        assert!(matches!(
            parse_addr_port("foo").unwrap_err(),
            ParseError::NotAddrPort { .. }
        ));
        assert!(matches!(
            parse_addr_port("foo:80").unwrap_err(),
            ParseError::NotAddrPort { .. }
        ));
        assert!(matches!(
            parse_addr_port("10.111.100.1").unwrap_err(),
            ParseError::MissingPort { .. }
        ));
        assert!(matches!(
            parse_addr_port("10.111.100.1:").unwrap_err(),
            ParseError::MissingPort { .. }
        ));
        assert!(matches!(
            parse_addr_port("10.111.100.1:0").unwrap_err(),
            ParseError::PortZero { .. }
        ));
        assert!(matches!(
            parse_addr_port("10.111.100.1:65536").unwrap_err(),
            ParseError::BadPort { .. }
        ));
        assert!(matches!(
            parse_addr_port("10.111.100.1:http").unwrap_err(),
            ParseError::BadPort { .. }
        ));
        assert!(matches!(
            parse_addr_port("10.111.300.1").unwrap_err(),
            ParseError::BadIpv4 { .. }
        ));
        assert!(matches!(
            parse_addr_port("").unwrap_err(),
            ParseError::NotAddrPort { .. }
        ));
    }

    #[test]
    fn prefixes_parse_and_name_the_problem() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            parse_prefix("10.111.0.0/16").unwrap(),
            (a("10.111.0.0"), 16)
        );
        assert_eq!(parse_prefix("10.111.0.2").unwrap(), (a("10.111.0.2"), 32));
        assert_eq!(parse_prefix("0.0.0.0/0").unwrap(), (a("0.0.0.0"), 0));
        assert_eq!(
            parse_prefix("10.111.0.2/32").unwrap(),
            (a("10.111.0.2"), 32)
        );
        for bad in [
            "10.111.0.0/33",
            "10.111.0.0/",
            "10.111.0/16",
            "x/8",
            "",
            "10.111.0.0/-1",
        ] {
            let e = parse_prefix(bad).unwrap_err();
            assert!(matches!(e, ParseError::BadPrefix { .. }), "{bad}: {e}");
        }
        assert_eq!(
            parse_prefix("10.111.0.5/16").unwrap_err().to_string(),
            "malformed prefix \"10.111.0.5/16\": bits set after the first 16 (did you mean 10.111.0.0/16?)"
        );
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(8), 0xff00_0000);
        assert_eq!(prefix_mask(32), u32::MAX);
        // IPv6.
        assert_eq!(
            parse_prefix("2001:db8::/32").unwrap(),
            (a("2001:db8::"), 32)
        );
        assert_eq!(parse_prefix("fd11:1::2").unwrap(), (a("fd11:1::2"), 128));
        assert_eq!(parse_prefix("::/0").unwrap(), (a("::"), 0));
        for bad in ["2001:db8::/129", "2001:db8::/", "2001:db8::g/32"] {
            let e = parse_prefix(bad).unwrap_err();
            assert!(matches!(e, ParseError::BadPrefix { .. }), "{bad}: {e}");
        }
        assert_eq!(
            parse_prefix("2001:db8::1/32").unwrap_err().to_string(),
            "malformed prefix \"2001:db8::1/32\": bits set after the first 32 (did you mean 2001:db8::/32?)"
        );
        assert!(matches!(
            parse_prefix("::ffff:10.0.0.0/104").unwrap_err(),
            ParseError::Ipv4Mapped { .. }
        ));
        assert_eq!(prefix_mask6(0), 0);
        assert_eq!(prefix_mask6(16), 0xffff << 112);
        assert_eq!(prefix_mask6(128), u128::MAX);
    }

    #[test]
    fn addresses_of_either_family_parse() {
        assert_eq!(
            parse_ip("10.111.1.11").unwrap(),
            IpAddr::V4(Ipv4Addr::new(10, 111, 1, 11))
        );
        assert_eq!(
            parse_ip("2001:db8::100").unwrap(),
            "2001:db8::100".parse::<IpAddr>().unwrap()
        );
        for with_port in ["10.111.1.11:80", "[2001:db8::100]:80"] {
            assert!(
                matches!(
                    parse_ip(with_port).unwrap_err(),
                    ParseError::UnexpectedPort { .. }
                ),
                "{with_port}"
            );
        }
        for bad in ["bar", "2001:db8::g", ""] {
            assert!(
                matches!(parse_ip(bad).unwrap_err(), ParseError::BadIp { .. }),
                "{bad}"
            );
        }
        assert_eq!(
            parse_ip("::ffff:10.111.1.11").unwrap_err().to_string(),
            "address \"::ffff:10.111.1.11\" is an IPv4-mapped IPv6 address: write the IPv4 address, 10.111.1.11"
        );
    }

    #[test]
    fn vips_and_backends_must_be_unicast_host_addresses() {
        for good in ["10.111.100.1", "127.0.0.1", "fd11:100::1", "2001:db8::100"] {
            assert!(is_host_address(good.parse().unwrap()), "{good}");
        }
        for bad in [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "::ffff:10.111.1.11",
        ] {
            assert!(!is_host_address(bad.parse().unwrap()), "{bad}");
        }
    }

    #[test]
    fn backend_addresses_take_no_port() {
        assert!(matches!(
            parse_ip("10.111.1.11:80").unwrap_err(),
            ParseError::UnexpectedPort { .. }
        ));
        assert!(matches!(
            parse_ip("10.111.1.300").unwrap_err(),
            ParseError::BadIpv4 { .. }
        ));
        assert!(matches!(
            parse_ip("bar").unwrap_err(),
            ParseError::BadIp { .. }
        ));
    }
}
