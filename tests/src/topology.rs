//! The DESIGN.md test topology, built from named namespaces and veth pairs:
//!
//! ```text
//!  cli 10.111.0.2 ── rtr 10.111.0.1 │ br0 10.111.1.1 ── lb1 10.111.1.2
//!                                   │                ── lb2 10.111.1.3 (optional)
//!                                   │                ── be1..be3 10.111.1.11-13
//!                                   │                ── db1..db3 10.111.1.21-23 (optional)
//!                                   │                ── mon 10.111.1.30 (optional: Prometheus)
//!  VIP 10.111.100.1 (and the second VIP address 10.111.100.2) is routed by rtr via lb1 (with
//!  lb2: [`Topology::route_vip`] can spread them over both, ECMP on an L4 hash), or by BGP:
//!  BIRD on rtr installs an ECMP route over the nodes that announce a VIP
//! ```
//!
//! Every host namespace has one interface, `eth0`; its veth peer lives in `rtr` as `v-<role>`
//! (`v-cli` is routed, the others are ports of `br0`). Only 10.111.0.0/16 is used and nothing is
//! routed from or to the root namespace.

use crate::netns::{Netns, sweep_stale, unique_prefix};
use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;

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
        for (_, ns) in &self.namespaces {
            ns.ip(&["link", "set", "lo", "up"])?;
            ns.sh("echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter")?;
        }

        let rtr = self.ns("rtr");
        rtr.ip(&["link", "add", "br0", "type", "bridge"])?;
        rtr.ip(&["addr", "add", &format!("{RTR_BR_ADDR}/24"), "dev", "br0"])?;
        rtr.ip(&["link", "set", "br0", "up"])?;

        self.veth_to_rtr("cli")?;
        let cli = self.ns("cli");
        cli.ip(&["addr", "add", &format!("{CLI_ADDR}/24"), "dev", HOST_IFACE])?;
        cli.ip(&["link", "set", HOST_IFACE, "up"])?;
        cli.ip(&["route", "add", "default", "via", &RTR_CLI_ADDR.to_string()])?;
        let rtr = self.ns("rtr");
        rtr.ip(&["addr", "add", &format!("{RTR_CLI_ADDR}/24"), "dev", "v-cli"])?;
        rtr.ip(&["link", "set", "v-cli", "up"])?;

        for (role, addr) in &hosts {
            self.veth_to_rtr(role)?;
            let peer = Self::peer_iface(role);
            let rtr = self.ns("rtr");
            rtr.ip(&["link", "set", &peer, "master", "br0"])?;
            rtr.ip(&["link", "set", &peer, "up"])?;
            let host = self.ns(role);
            host.ip(&["addr", "add", &format!("{addr}/24"), "dev", HOST_IFACE])?;
            host.ip(&["link", "set", HOST_IFACE, "up"])?;
            host.ip(&["route", "add", "default", "via", &RTR_BR_ADDR.to_string()])?;
        }

        if self.options.static_vip_route {
            self.route_vip(&[LB1_ADDR])?;
        }
        let mut forwarders = vec!["rtr", "lb1"];
        if self.options.lb2 {
            forwarders.push("lb2");
            self.ns("rtr")
                .sh("echo 1 > /proc/sys/net/ipv4/fib_multipath_hash_policy")?;
        }
        for role in forwarders {
            self.ns(role).sh("echo 1 > /proc/sys/net/ipv4/ip_forward")?;
        }
        // Per-interface rp_filter too: the effective value is max(all, interface).
        for (_, ns) in &self.namespaces {
            ns.sh("for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > \"$f\"; done")?;
        }
        Ok(())
    }

    /// Routes the VIP addresses ([`VIPS`]) on rtr via `next_hops`: one address is a plain route,
    /// several an ECMP route (`nexthop via A nexthop via B`). Replaces whatever route they had.
    pub fn route_vip(&self, next_hops: &[Ipv4Addr]) -> Result<()> {
        let hops: Vec<String> = next_hops.iter().map(ToString::to_string).collect();
        for vip in VIPS {
            let vip = format!("{vip}/32");
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
        let route = self.route_of(addr)?;
        let words: Vec<&str> = route.split_whitespace().collect();
        let mut hops: Vec<Ipv4Addr> = words
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect();
        hops.sort();
        hops.dedup();
        Ok(hops)
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
