//! Route netlink, through rtnetlink: the links and addresses (IPv4 and IPv6) of this network
//! namespace, addresses added and removed, links set up or down, XDP programs attached by
//! `IFLA_XDP` (as `ip link set dev X xdp` does), and the routes of one routing table and the rules
//! that point at it (route announcement). Every request waits for the kernel's acknowledgement.

use crate::util::os_message;
use futures_util::TryStreamExt;
use rtnetlink::{
    IpVersion, LinkUnspec,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope},
        link::{LinkAttribute, LinkFlags, LinkXdp},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
        rule::{RuleAttribute, RuleMessage},
    },
    sys::AsyncSocket,
};
use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::RawFd,
};

/// `XDP_FLAGS_*` from linux/if_link.h.
pub(crate) const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
pub(crate) const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {}", os_message(.0))]
    Connect(#[source] io::Error),
    #[error("{what}: {}", reason(source))]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

impl NetlinkError {
    /// The kernel's errno, if the kernel refused the request.
    pub(crate) fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => Some(-m.raw_code()),
            _ => None,
        }
    }
}

/// The kernel's answer as an operator reads it (`No such device`), else rtnetlink's text.
fn reason(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => os_message(&m.to_io()),
        other => other.to_string(),
    }
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

/// A network interface.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) up: bool,
    pub(crate) loopback: bool,
}

/// An address of an interface, of either family.
#[derive(Clone, Debug)]
pub(crate) struct Addr {
    pub(crate) index: u32,
    pub(crate) addr: IpAddr,
    /// Link-local scope (IPv6 `fe80::/10`): never a tunnel's outer address, nor a source the
    /// balancer may use towards a backend in another subnet.
    pub(crate) link_local: bool,
    /// The kernel's message, which removing the address needs back.
    pub(crate) msg: AddressMessage,
}

/// A route of one routing table, as the kernel listed it.
#[derive(Clone, Debug)]
pub(crate) struct TableRoute {
    /// The destination prefix (`None`: the default route).
    pub(crate) dst: Option<IpAddr>,
    pub(crate) dst_len: u8,
    /// Who put it there (`RTPROT_*`, `ip route`'s `proto`).
    pub(crate) protocol: u8,
    pub(crate) kind: RouteType,
    /// The kernel's message, which removing exactly this route needs back.
    pub(crate) msg: RouteMessage,
}

impl TableRoute {
    /// A blackhole host route (IPv4 /32 or IPv6 /128): the only kind the announcer writes.
    pub(crate) fn blackhole_host(&self) -> Option<IpAddr> {
        match (self.dst, self.dst_len, self.kind) {
            (Some(a @ IpAddr::V4(_)), 32, RouteType::BlackHole)
            | (Some(a @ IpAddr::V6(_)), 128, RouteType::BlackHole) => Some(a),
            _ => None,
        }
    }
}

impl std::fmt::Display for TableRoute {
    /// As `ip route` prints it: `blackhole 10.0.0.1/32 proto 120`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            RouteType::Unicast => String::new(),
            RouteType::BlackHole => "blackhole ".to_string(),
            RouteType::Unreachable => "unreachable ".to_string(),
            RouteType::Prohibit => "prohibit ".to_string(),
            RouteType::Local => "local ".to_string(),
            RouteType::Throw => "throw ".to_string(),
            other => format!("type {} ", u8::from(other)),
        };
        match self.dst {
            Some(dst) => write!(f, "{kind}{dst}/{}", self.dst_len)?,
            None => write!(f, "{kind}default")?,
        }
        write!(f, " proto {}", self.protocol)
    }
}

/// A route-netlink connection of the calling thread's network namespace.
pub(crate) struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Must be called inside the tokio runtime (the connection runs as a task of it).
    pub(crate) fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        // The connection task ends by itself when the last handle is dropped.
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A connection whose dumps the kernel filters by the request's header
    /// (`NETLINK_GET_STRICT_CHK`): a dump of one table reads that table only, not every route
    /// of the host (a router's main table may hold a million).
    pub(crate) fn connect_strict() -> Result<Self, NetlinkError> {
        let (mut conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        conn.socket_mut()
            .socket_mut()
            .set_netlink_get_strict_chk(true)
            .map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// Every route of routing table `table` in `family` (IPv4 or IPv6). A table that does not
    /// exist yet (nothing was ever put into it) is empty. Needs [`Netlink::connect_strict`]:
    /// without it the kernel would list every table.
    pub(crate) async fn table_routes(
        &self,
        family: IpVersion,
        table: u32,
    ) -> Result<Vec<TableRoute>, NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = match family {
            IpVersion::V4 => AddressFamily::Inet,
            IpVersion::V6 => AddressFamily::Inet6,
        };
        // A strict dump filters on a non-zero table, protocol and type: only the table here.
        set_table(&mut msg, table);
        let listed: Result<Vec<RouteMessage>, _> =
            self.handle.route().get(msg).execute().try_collect().await;
        let msgs = match listed {
            Ok(msgs) => msgs,
            Err(rtnetlink::Error::NetlinkError(e)) if -e.raw_code() == libc::ENOENT => Vec::new(),
            Err(source) => {
                return Err(NetlinkError::Request {
                    what: format!("listing routing table {table}"),
                    source,
                });
            }
        };
        Ok(msgs
            .into_iter()
            // Only this table, even if the kernel ignored the filter.
            .filter(|m| route_table(m) == table)
            .map(|m| TableRoute {
                dst: m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                }),
                dst_len: m.header.destination_prefix_length,
                protocol: m.header.protocol.into(),
                kind: m.header.kind,
                msg: m,
            })
            .collect())
    }

    /// Add `blackhole ADDR/32 table TABLE proto PROTO` (as `ip route add` does, never replacing:
    /// a route somebody else has for the same prefix makes it fail with EEXIST).
    pub(crate) async fn add_blackhole(
        &self,
        table: u32,
        protocol: u8,
        addr: IpAddr,
    ) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(blackhole_route(table, protocol, addr))
            .execute()
            .await
            .map_err(request(format!(
                "adding blackhole {addr}/{} to routing table {table}",
                host_prefix_len(addr)
            )))
    }

    /// Remove exactly the route `route` (as listed by [`Netlink::table_routes`]).
    pub(crate) async fn del_route(&self, route: &TableRoute) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .del(route.msg.clone())
            .execute()
            .await
            .map_err(request(format!(
                "removing {route} from routing table {}",
                route_table(&route.msg)
            )))
    }

    /// The routing tables that policy-routing rules (`ip rule`, IPv4 and IPv6) look up.
    pub(crate) async fn rule_tables(&self) -> Result<Vec<u32>, NetlinkError> {
        let mut tables = Vec::new();
        for family in [IpVersion::V4, IpVersion::V6] {
            let rules: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(family)
                .execute()
                .try_collect()
                .await
                .map_err(request("listing routing rules"))?;
            tables.extend(rules.iter().map(|r| {
                r.attributes
                    .iter()
                    .find_map(|a| match a {
                        RuleAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(r.header.table))
            }));
        }
        Ok(tables)
    }

    pub(crate) async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(request("listing links"))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let name = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })?;
                Some(Link {
                    index: m.header.index,
                    name,
                    up: m.header.flags.contains(LinkFlags::Up),
                    loopback: m.header.flags.contains(LinkFlags::Loopback),
                })
            })
            .collect())
    }

    /// The XDP program attached to interface `index` (in any mode): its id and whether it runs
    /// in driver mode (`false`: generic), or `None`.
    pub(crate) async fn xdp_program(
        &self,
        index: u32,
    ) -> Result<Option<(u32, bool)>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect()
            .await
            .map_err(request("reading the interface"))?;
        let mut id = None;
        let mut generic = false;
        for attr in msgs.iter().flat_map(|m| &m.attributes) {
            if let LinkAttribute::Xdp(xdp) = attr {
                for x in xdp {
                    match x {
                        LinkXdp::ProgId(p) if *p != 0 => id = Some(*p),
                        LinkXdp::SkbProgId(p) if *p != 0 => generic = true,
                        _ => {}
                    }
                }
            }
        }
        Ok(id.map(|id| (id, !generic)))
    }

    /// Every address of every interface (IPv4 and IPv6), in the order the kernel lists them.
    pub(crate) async fn addrs(&self) -> Result<Vec<Addr>, NetlinkError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(request("listing addresses"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6))
            .filter_map(|m| {
                // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
                // point-to-point links); plain interfaces carry both, equal, and IPv6 ones often
                // only IFA_ADDRESS.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let address = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                Some(Addr {
                    index: m.header.index,
                    addr: local.or(address)?,
                    link_local: m.header.scope == AddressScope::Link,
                    msg: m,
                })
            })
            .collect())
    }

    /// The IPv4 addresses of interface `index`, in the kernel's order.
    pub(crate) async fn ipv4_addrs_of(&self, index: u32) -> Result<Vec<Ipv4Addr>, NetlinkError> {
        Ok(self
            .addrs()
            .await?
            .into_iter()
            .filter(|a| a.index == index)
            .filter_map(|a| match a.addr {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect())
    }

    /// Add `addr` as a host address (/32, or /128 without duplicate address detection: a VIP
    /// is on many hosts' `lo` on purpose) to interface `index`.
    pub(crate) async fn add_host_addr(&self, index: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        let mut req = self.handle.address().add(index, addr, prefix);
        if addr.is_ipv6() {
            req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        req.execute()
            .await
            .map_err(request(format!("adding {addr}/{prefix}")))
    }

    pub(crate) async fn del_addr(&self, addr: &Addr) -> Result<(), NetlinkError> {
        self.handle
            .address()
            .del(addr.msg.clone())
            .execute()
            .await
            .map_err(request(format!("removing {}", addr.addr)))
    }

    pub(crate) async fn set_up(&self, index: u32, up: bool) -> Result<(), NetlinkError> {
        let b = LinkUnspec::new_with_index(index);
        let msg = if up { b.up() } else { b.down() }.build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request(if up { "setting up" } else { "setting down" }))
    }

    /// Attach the XDP program `fd` to interface `index` with `XDP_FLAGS_*` `flags` (replacing
    /// any program in that mode), or with `fd` -1 detach the program of that mode. The interface
    /// holds the program from then on, whatever happens to this process.
    pub(crate) async fn set_xdp(
        &self,
        index: u32,
        fd: RawFd,
        flags: u32,
    ) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::Xdp(vec![
                LinkXdp::Fd(fd),
                LinkXdp::Flags(flags),
            ]))
            .build();
        let what = if fd < 0 {
            "detaching XDP"
        } else {
            "attaching XDP"
        };
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request(what))
    }
}

/// Set a route message's table: `RTA_TABLE` always (tables above 255 exist only there), and the
/// header's 8-bit field when the number fits (`RT_TABLE_COMPAT` otherwise, as iproute2 does).
fn set_table(msg: &mut RouteMessage, table: u32) {
    msg.header.table = u8::try_from(table).unwrap_or(RT_TABLE_COMPAT);
    msg.attributes.push(RouteAttribute::Table(table));
}

/// `RT_TABLE_COMPAT` from linux/rtnetlink.h: the header's table for tables above 255.
const RT_TABLE_COMPAT: u8 = 252;

/// A route message's table: `RTA_TABLE` if present, else the header's.
fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// `blackhole ADDR/32 table TABLE proto PROTO`: no interface, no gateway, no metric.
/// The prefix length of a host route to `addr`: 32 or 128.
pub(crate) fn host_prefix_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn blackhole_route(table: u32, protocol: u8, addr: IpAddr) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.header.destination_prefix_length = host_prefix_len(addr);
    msg.header.protocol = RouteProtocol::from(protocol);
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::BlackHole;
    set_table(&mut msg, table);
    // Network byte order on the wire: RouteAddress::Inet is emitted from the octets.
    let dst = match addr {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    };
    msg.attributes.push(RouteAttribute::Destination(dst));
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announced_route_is_a_blackhole_host_route_in_its_table() {
        let v4: IpAddr = Ipv4Addr::new(10, 111, 100, 1).into();
        let v6: IpAddr = "fd11:100::1".parse().unwrap();
        for (addr, family, len, shown) in [
            (
                v4,
                AddressFamily::Inet,
                32,
                "blackhole 10.111.100.1/32 proto 120",
            ),
            (
                v6,
                AddressFamily::Inet6,
                128,
                "blackhole fd11:100::1/128 proto 120",
            ),
        ] {
            let m = blackhole_route(100, 120, addr);
            assert_eq!(m.header.address_family, family);
            assert_eq!(m.header.destination_prefix_length, len);
            assert_eq!(u8::from(m.header.protocol), 120);
            assert_eq!(m.header.kind, RouteType::BlackHole);
            assert_eq!(m.header.scope, RouteScope::Universe);
            assert_eq!((m.header.table, route_table(&m)), (100, 100));
            // No interface, gateway or metric: only the table and the destination.
            assert_eq!(m.attributes.len(), 2, "{:?}", m.attributes);
            let big = blackhole_route(70000, 120, addr);
            assert_eq!(
                (big.header.table, route_table(&big)),
                (RT_TABLE_COMPAT, 70000)
            );
            let listed = TableRoute {
                dst: Some(addr),
                dst_len: len,
                protocol: 120,
                kind: RouteType::BlackHole,
                msg: m,
            };
            assert_eq!(listed.blackhole_host(), Some(addr));
            assert_eq!(listed.to_string(), shown);
            // A shorter prefix of the same address is not one of the announcer's routes.
            let wider = TableRoute {
                dst_len: len - 8,
                ..listed
            };
            assert_eq!(wider.blackhole_host(), None);
        }
    }

    #[tokio::test]
    async fn loopback_is_listed_with_its_address() {
        let nl = Netlink::connect().unwrap();
        let links = nl.links().await.unwrap();
        let lo = links.iter().find(|l| l.loopback).expect("a loopback link");
        assert_eq!(lo.name, "lo");
        if lo.up {
            let addrs = nl.ipv4_addrs_of(lo.index).await.unwrap();
            assert!(addrs.contains(&Ipv4Addr::LOCALHOST), "{addrs:?}");
        }
    }

    #[tokio::test]
    async fn kernel_errors_read_like_the_kernel() {
        let nl = Netlink::connect().unwrap();
        // No interface has index 0x7fff_fff0 here.
        let e = nl.set_up(0x7fff_fff0, true).await.unwrap_err();
        assert_eq!(e.to_string(), "setting up: No such device");
    }
}
