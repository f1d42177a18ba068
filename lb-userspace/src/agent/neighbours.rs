//! Neighbour warm-up: keep the kernel's ARP entries for the backends fresh, because the data
//! path can read them but cannot ask for them.

use std::net::{Ipv4Addr, UdpSocket};

/// Make the kernel resolve the next hop towards every backend.
///
/// Why: `bpf_fib_lookup` in the XDP program only *reads* the neighbour table; it cannot start ARP.
/// Without an entry the program must hand the packet to the kernel (`pass_no_neigh`), which is the
/// slow path. An ordinary datagram sent through the stack makes the kernel route it and ARP for
/// exactly the next hop the data path will ask about (the backend itself on-link, or its gateway),
/// and sending again every `WARM_INTERVAL` keeps the entry fresh. Port 9 is "discard" and the
/// datagram is empty, so a backend at worst answers with an ICMP port-unreachable.
pub(crate) fn warm_neighbours(addrs: &[Ipv4Addr]) {
    if addrs.is_empty() {
        return;
    }
    // Wildcard address and port: the kernel picks the source per route, as for any client.
    let sock = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        Ok(s) => s,
        Err(e) => {
            log::debug!("neighbour warm-up: cannot open a UDP socket: {e}");
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
