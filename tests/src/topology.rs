//! The DESIGN.md test topology, built from named namespaces and veth pairs, dual stack:
//!
//! ```text
//!  cli 10.111.0.2  ── rtr 10.111.0.1  │ br0 10.111.1.1  ── lb1 10.111.1.2  fd11:2::2
//!      fd11:1::2          fd11:1::1   │     fd11:2::1   ── lb2 10.111.1.3  fd11:2::3 (optional)
//!                                     │                 ── be1..be3 10.111.1.11-13  fd11:2::11-13
//!                                     │                 ── db1..db3 10.111.1.21-23  fd11:2::21-23 (optional)
//!                                     │                 ── mon 10.111.1.30  fd11:2::30 (optional: Prometheus)
//!  VIPs 10.111.100.1 and fd11:100::1 (and the second VIP addresses 10.111.100.2, fd11:100::2) are
//!  routed by rtr via lb1 (with lb2: [`Topology::route_vip`] can spread them over both, ECMP on an
//!  L4 hash), or, for IPv4, by BGP: BIRD on rtr installs an ECMP route over the nodes that
//!  announce a VIP
//! ```
//!
//! Every host namespace has one interface, `eth0`; its veth peer lives in `rtr` as `v-<role>`
//! (`v-cli` is routed, the others are ports of `br0`). Only 10.111.0.0/16 and fd11::/16 are used
//! and nothing is routed from or to the root namespace. A host's IPv6 address is its IPv4 one's
//! twin ([`twin6`]): the same last number, written in the same digits, in `fd11:1::/64` (client
//! side) or `fd11:2::/64` (the LB and backend segment). IPv6 addresses are added without
//! duplicate address detection (and DAD is off in every namespace), so they are usable at once
//! and a test never waits for DAD; the bridge does no multicast snooping, so neighbour
//! solicitations reach every port without waiting for MLD reports.

use crate::netns::{Netns, sweep_stale, unique_prefix};
use anyhow::{Context, Result, bail};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 100, 1);
/// A second VIP address, for a service whose backends listen on a port another VIP already uses
/// (with direct server return a VIP's port is the backend's port): the database's read VIP.
pub const VIP2: Ipv4Addr = Ipv4Addr::new(10, 111, 100, 2);
/// Both VIP addresses, routed alike.
pub const VIPS: [Ipv4Addr; 2] = [VIP, VIP2];
pub const CLI_ADDR: Ipv4Addr = Ipv4Addr::new(10, 111, 0, 2);
pub const RTR_CLI_ADDR: Ipv4Addr = Ipv4Addr::new(10, 111, 0, 1);
pub const RTR_BR_ADDR: Ipv4Addr = Ipv4Addr::new(10, 111, 1, 1);
pub const LB1_ADDR: Ipv4Addr = Ipv4Addr::new(10, 111, 1, 2);
pub const LB2_ADDR: Ipv4Addr = Ipv4Addr::new(10, 111, 1, 3);
/// The monitoring host (Prometheus), when the topology has one.
pub const MON_ADDR: Ipv4Addr = Ipv4Addr::new(10, 111, 1, 30);

/// The IPv6 VIP, [`VIP`]'s counterpart.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd11, 0x100, 0, 0, 0, 0, 0, 1);
/// The second IPv6 VIP address, [`VIP2`]'s counterpart.
pub const VIP6_2: Ipv6Addr = Ipv6Addr::new(0xfd11, 0x100, 0, 0, 0, 0, 0, 2);
/// Both IPv6 VIP addresses, routed alike.
pub const VIPS6: [Ipv6Addr; 2] = [VIP6, VIP6_2];
pub const CLI_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd11, 1, 0, 0, 0, 0, 0, 2);
pub const RTR_CLI_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd11, 1, 0, 0, 0, 0, 0, 1);
pub const RTR_BR_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 1);
pub const LB1_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 2);
pub const LB2_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd11, 2, 0, 0, 0, 0, 0, 3);

/// The IPv6 twin of a host address of this topology: 10.111.0.N → fd11:1::N and 10.111.1.N →
/// fd11:2::N, N written with the same digits (10.111.1.11 → fd11:2::11), so a reader of a log
/// or a capture pairs them at a glance.
pub fn twin6(v4: Ipv4Addr) -> Ipv6Addr {
    let [a, b, subnet, n] = v4.octets();
    assert!(
        a == 10 && b == 111 && subnet <= 1,
        "{v4} is not a host address of the test topology"
    );
    format!("fd11:{}::{n}", subnet + 1)
        .parse()
        .expect("decimal digits are hex digits")
}

/// `addr`'s IPv6 twin if `v6`, else `addr` itself: what a test parametrised over the family
/// connects to.
pub fn in_family(addr: Ipv4Addr, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(twin6(addr))
    } else {
        IpAddr::V4(addr)
    }
}

/// The `via` addresses of a route as `ip route show` prints it, sorted, each once.
fn hops_of<A: std::str::FromStr + Ord>(route: &str) -> Vec<A> {
    let words: Vec<&str> = route.split_whitespace().collect();
    let mut hops: Vec<A> = words
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect();
    hops.sort();
    hops.dedup();
    hops
}

/// The interface name every host namespace uses.
pub const HOST_IFACE: &str = "eth0";

/// Address of backend `i` (1-based): 10.111.1.1i.
pub fn backend_addr(i: usize) -> Ipv4Addr {
    assert!((1..=9).contains(&i), "backend index {i} out of range");
    Ipv4Addr::new(10, 111, 1, 10 + i as u8)
}

/// Role names of the backends: be1, be2, …
pub fn backend_name(i: usize) -> String {
    format!("be{i}")
}

/// Address of database host `i` (1-based): 10.111.1.2i.
pub fn db_addr(i: usize) -> Ipv4Addr {
    assert!((1..=9).contains(&i), "database index {i} out of range");
    Ipv4Addr::new(10, 111, 1, 20 + i as u8)
}

/// Role names of the database hosts: db1, db2, …
pub fn db_name(i: usize) -> String {
    format!("db{i}")
}

#[derive(Clone, Debug)]
pub struct TopologyOptions {
    /// How many backend namespaces (be1..beN).
    pub backends: usize,
    /// Also create lb2 (10.111.1.3) on the bridge. rtr hashes multipath routes on L4
    /// (`fib_multipath_hash_policy=1`), so a VIP routed over lb1 and lb2 spreads connections,
    /// not just clients.
    pub lb2: bool,
    /// How many database namespaces (db1..dbN, 10.111.1.21..).
    pub databases: usize,
    /// Also create `mon` (10.111.1.30) on the bridge, for a Prometheus server.
    pub monitor: bool,
    /// rtr routes the VIP addresses via lb1 with a static route. Without it they have no route
    /// until one is announced (BGP beds: BIRD on rtr installs it).
    pub static_vip_route: bool,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        Self {
            backends: 3,
            lb2: false,
            databases: 0,
            monitor: false,
            static_vip_route: true,
        }
    }
}

/// The namespaces of one test; all deleted on drop.
pub struct Topology {
    prefix: String,
    options: TopologyOptions,
    // Drop order = declaration order of the Vec: every namespace is deleted, veths with them.
    namespaces: Vec<(String, Netns)>,
}

impl Topology {
    pub fn build(options: TopologyOptions) -> Result<Self> {
        crate::netns::require_root();
        sweep_stale()?;
        let prefix = unique_prefix();
        let mut topo = Self {
            prefix,
            options,
            namespaces: Vec::new(),
        };
        topo.create().with_context(|| {
            format!("building the test topology (namespaces {}-*)", topo.prefix)
        })?;
        Ok(topo)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn options(&self) -> &TopologyOptions {
        &self.options
    }

    /// The namespace of `role` (cli, rtr, lb1, lb2, be1…).
    pub fn ns(&self, role: &str) -> &Netns {
        self.namespaces
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, ns)| ns)
            .unwrap_or_else(|| panic!("no namespace for role {role} in this topology"))
    }

    /// Full names of all namespaces of this topology.
    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces
            .iter()
            .map(|(_, ns)| ns.name().to_string())
            .collect()
    }

    /// Name of the rtr-side veth peer of `role`'s eth0.
    pub fn peer_iface(role: &str) -> String {
        format!("v-{role}")
    }

    fn add_ns(&mut self, role: &str) -> Result<()> {
        let ns = Netns::create(&format!("{}-{role}", self.prefix))?;
        self.namespaces.push((role.to_string(), ns));
        Ok(())
    }

    fn hosts_on_bridge(&self) -> Vec<(String, Ipv4Addr)> {
        let mut hosts = vec![("lb1".to_string(), LB1_ADDR)];
        if self.options.lb2 {
            hosts.push(("lb2".to_string(), LB2_ADDR));
        }
        for i in 1..=self.options.backends {
            hosts.push((backend_name(i), backend_addr(i)));
        }
        for i in 1..=self.options.databases {
            hosts.push((db_name(i), db_addr(i)));
        }
        if self.options.monitor {
            hosts.push(("mon".to_string(), MON_ADDR));
        }
        hosts
    }

    fn create(&mut self) -> Result<()> {
        if self.options.backends > 9 || self.options.databases > 9 {
            bail!("at most 9 backends and 9 databases");
        }
        let hosts = self.hosts_on_bridge();
        for role in ["cli", "rtr"] {
            self.add_ns(role)?;
        }
        for (role, _) in &hosts {
            self.add_ns(role)?;
        }
        // Relaxed reverse-path filtering everywhere, before the interfaces exist so they inherit
        // it: with DSR, replies leave the backends from the VIP, which rp_filter would reject.
        // No duplicate address detection either (also for link-local addresses, which the
        // kernel adds itself): addresses are unique by construction and usable at once.
        for (_, ns) in &self.namespaces {
            ns.ip(&["link", "set", "lo", "up"])?;
            ns.sh("echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter")?;
            ns.sh("for c in all default; do echo 0 > /proc/sys/net/ipv6/conf/$c/accept_dad; echo 0 > /proc/sys/net/ipv6/conf/$c/dad_transmits; done")?;
        }

        let rtr = self.ns("rtr");
        rtr.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        rtr.ip(&["addr", "add", &format!("{RTR_BR_ADDR}/24"), "dev", "br0"])?;
        add_addr6(rtr, RTR_BR_ADDR6, "br0")?;
        rtr.ip(&["link", "set", "br0", "up"])?;

        self.veth_to_rtr("cli")?;
        let cli = self.ns("cli");
        cli.ip(&["addr", "add", &format!("{CLI_ADDR}/24"), "dev", HOST_IFACE])?;
        add_addr6(cli, CLI_ADDR6, HOST_IFACE)?;
        cli.ip(&["link", "set", HOST_IFACE, "up"])?;
        cli.ip(&["route", "add", "default", "via", &RTR_CLI_ADDR.to_string()])?;
        cli.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &RTR_CLI_ADDR6.to_string(),
        ])?;
        let rtr = self.ns("rtr");
        rtr.ip(&["addr", "add", &format!("{RTR_CLI_ADDR}/24"), "dev", "v-cli"])?;
        add_addr6(rtr, RTR_CLI_ADDR6, "v-cli")?;
        rtr.ip(&["link", "set", "v-cli", "up"])?;

        for (role, addr) in &hosts {
            self.veth_to_rtr(role)?;
            let peer = Self::peer_iface(role);
            let rtr = self.ns("rtr");
            rtr.ip(&["link", "set", &peer, "master", "br0"])?;
            rtr.ip(&["link", "set", &peer, "up"])?;
            let host = self.ns(role);
            host.ip(&["addr", "add", &format!("{addr}/24"), "dev", HOST_IFACE])?;
            add_addr6(host, twin6(*addr), HOST_IFACE)?;
            host.ip(&["link", "set", HOST_IFACE, "up"])?;
            host.ip(&["route", "add", "default", "via", &RTR_BR_ADDR.to_string()])?;
            host.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &RTR_BR_ADDR6.to_string(),
            ])?;
        }

        if self.options.static_vip_route {
            self.route_vip(&[LB1_ADDR])?;
        }
        let mut forwarders = vec!["rtr", "lb1"];
        if self.options.lb2 {
            forwarders.push("lb2");
            self.ns("rtr").sh(
                "echo 1 > /proc/sys/net/ipv4/fib_multipath_hash_policy; echo 1 > /proc/sys/net/ipv6/fib_multipath_hash_policy",
            )?;
        }
        for role in forwarders {
            self.ns(role).sh(
                "echo 1 > /proc/sys/net/ipv4/ip_forward; echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
            )?;
        }
        // Per-interface rp_filter too: the effective value is max(all, interface).
        for (_, ns) in &self.namespaces {
            ns.sh("for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > \"$f\"; done")?;
        }
        Ok(())
    }

    /// Routes the VIP addresses ([`VIPS`], and [`VIPS6`] via the hops' IPv6 twins) on rtr via
    /// `next_hops`: one address is a plain route, several an ECMP route (`nexthop via A nexthop
    /// via B`). Replaces whatever route they had.
    pub fn route_vip(&self, next_hops: &[Ipv4Addr]) -> Result<()> {
        let hops4: Vec<String> = next_hops.iter().map(ToString::to_string).collect();
        let hops6: Vec<String> = next_hops.iter().map(|h| twin6(*h).to_string()).collect();
        let routes = VIPS
            .iter()
            .map(|v| (format!("{v}/32"), &hops4))
            .chain(VIPS6.iter().map(|v| (format!("{v}/128"), &hops6)));
        for (vip, hops) in routes {
            let mut args = vec!["route", "replace", vip.as_str()];
            match hops.as_slice() {
                [] => bail!("a VIP route needs at least one next hop"),
                [one] => args.extend(["via", one.as_str()]),
                many => {
                    for hop in many {
                        args.extend(["nexthop", "via", hop.as_str()]);
                    }
                }
            }
            self.ns("rtr").ip(&args)?;
        }
        Ok(())
    }

    /// The IPv6 VIP's route on rtr as `ip -6 route show` prints it.
    pub fn vip6_route(&self) -> Result<String> {
        Ok(self
            .ns("rtr")
            .ip(&["-6", "route", "show", &format!("{VIP6}/128")])?
            .trim()
            .to_string())
    }

    /// The VIP's route on rtr as `ip route show` prints it.
    pub fn vip_route(&self) -> Result<String> {
        self.route_of(VIP)
    }

    /// `addr`'s /32 route on rtr as `ip route show` prints it.
    pub fn route_of(&self, addr: Ipv4Addr) -> Result<String> {
        Ok(self
            .ns("rtr")
            .ip(&["route", "show", &format!("{addr}/32")])?
            .trim()
            .to_string())
    }

    /// The next hops of the VIP's route on rtr: see [`Topology::next_hops`].
    pub fn vip_next_hops(&self) -> Result<Vec<Ipv4Addr>> {
        self.next_hops(VIP)
    }

    /// The next hops of `addr`'s /32 route on rtr (none without a route), in address order:
    /// `via A` of a plain route, every `nexthop via A` of an ECMP one.
    pub fn next_hops(&self, addr: Ipv4Addr) -> Result<Vec<Ipv4Addr>> {
        Ok(hops_of(&self.route_of(addr)?))
    }

    /// The next hops of the IPv6 VIP's /128 route on rtr, as [`Topology::next_hops`].
    pub fn vip6_next_hops(&self) -> Result<Vec<Ipv6Addr>> {
        Ok(hops_of(&self.vip6_route()?))
    }

    /// Creates `role`'s eth0 with its peer `v-<role>` directly in rtr, and turns TX checksum
    /// offload off on both ends: a veth otherwise hands on packets with partial checksums, which
    /// an XDP program that encapsulates or rewrites them would forward still unfinished.
    fn veth_to_rtr(&self, role: &str) -> Result<()> {
        let peer = Self::peer_iface(role);
        let rtr = self.ns("rtr");
        let host = self.ns(role);
        host.ip(&[
            "link",
            "add",
            HOST_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            rtr.name(),
        ])?;
        host.run("ethtool", &["-K", HOST_IFACE, "tx", "off"])?;
        rtr.run("ethtool", &["-K", &peer, "tx", "off"])?;
        Ok(())
    }
}

/// Adds `addr`/64 to `dev` in `ns`, usable at once (`nodad`).
fn add_addr6(ns: &Netns, addr: Ipv6Addr, dev: &str) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{addr}/64"), "dev", dev, "nodad"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_twins_keep_the_digits() {
        assert_eq!(twin6(backend_addr(1)).to_string(), "fd11:2::11");
        assert_eq!(twin6(LB1_ADDR), LB1_ADDR6);
        assert_eq!(twin6(LB2_ADDR), LB2_ADDR6);
        assert_eq!(twin6(CLI_ADDR), CLI_ADDR6);
        assert_eq!(twin6(RTR_BR_ADDR), RTR_BR_ADDR6);
        assert_eq!(twin6(MON_ADDR).to_string(), "fd11:2::30");
        assert_eq!(in_family(db_addr(1), false), IpAddr::V4(db_addr(1)));
        assert_eq!(in_family(db_addr(1), true).to_string(), "fd11:2::21");
    }
}
