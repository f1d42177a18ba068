//! Neighbour warm-up: keep the kernel's ARP (IPv4) and NDP (IPv6) entries for the backends
//! fresh, because the data path can read them but cannot ask for them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};

/// Make the kernel resolve the next hop towards every backend.
///
/// Why: `bpf_fib_lookup` in the XDP program only *reads* the neighbour table; it cannot start ARP.
/// Without an entry the program must hand the packet to the kernel (`pass_no_neigh`), which is the
/// slow path. An ordinary datagram sent through the stack makes the kernel route it and ARP for
/// exactly the next hop the data path will ask about (the backend itself on-link, or its gateway),
/// and sending again every `WARM_INTERVAL` keeps the entry fresh; for an IPv6 backend the same
/// datagram over an IPv6 socket makes the kernel run neighbour discovery. Port 9 is "discard"
/// and the datagram is empty, so a backend at worst answers with an ICMP port-unreachable.
pub(crate) fn warm_neighbours(addrs: &[IpAddr]) {
    for (v6, wildcard) in [
        (false, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        (true, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    ] {
        let family: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv6() == v6)
            .collect();
        if !family.is_empty() {
            warm(wildcard, &family);
        }
    }
}

/// Send the empty datagram to port 9 of each of `addrs`, all of `wildcard`'s family.
fn warm(wildcard: IpAddr, addrs: &[IpAddr]) {
    // Wildcard address and port: the kernel picks the source per route, as for any client.
    let sock = match UdpSocket::bind((wildcard, 0)) {
        Ok(s) => s,
        Err(e) => {
            log::debug!("neighbour warm-up: cannot open a UDP socket ({wildcard}): {e}");
            return;
        }
    };
    if let Err(e) = sock.set_nonblocking(true) {
        log::debug!("neighbour warm-up: {e}");
        return;
    }
    for addr in addrs {
        if let Err(e) = sock.send_to(&[], (*addr, 9)) {
            log::debug!("neighbour warm-up of {addr}: {e}");
        }
    }
}
