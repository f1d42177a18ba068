//! Route netlink, through rtnetlink: the links and IPv4 addresses of this network namespace,
//! addresses added and removed, links set up or down, and XDP programs attached by `IFLA_XDP`
//! (as `ip link set dev X xdp` does). Every request waits for the kernel's acknowledgement.

use crate::util::os_message;
use futures_util::TryStreamExt;
use rtnetlink::{
    LinkUnspec,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressMessage},
        link::{LinkAttribute, LinkFlags, LinkXdp},
    },
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

/// An IPv4 address of an interface.
#[derive(Clone, Debug)]
pub(crate) struct Addr {
    pub(crate) index: u32,
    pub(crate) addr: Ipv4Addr,
    /// The kernel's message, which removing the address needs back.
    pub(crate) msg: AddressMessage,
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

    /// Every IPv4 address of every interface, in the order the kernel lists them.
    pub(crate) async fn ipv4_addrs(&self) -> Result<Vec<Addr>, NetlinkError> {
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
            .filter(|m| m.header.family == AddressFamily::Inet)
            .filter_map(|m| {
                // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
                // point-to-point links); plain interfaces carry both, equal.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(v4)) => Some(*v4),
                    _ => None,
                });
                let address = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
                    _ => None,
                });
                Some(Addr {
                    index: m.header.index,
                    addr: local.or(address)?,
                    msg: m,
                })
            })
            .collect())
    }

    /// The IPv4 addresses of interface `index`, in the kernel's order.
    pub(crate) async fn ipv4_addrs_of(&self, index: u32) -> Result<Vec<Ipv4Addr>, NetlinkError> {
        Ok(self
            .ipv4_addrs()
            .await?
            .into_iter()
            .filter(|a| a.index == index)
            .map(|a| a.addr)
            .collect())
    }

    /// Add `addr`/32 to interface `index`.
    pub(crate) async fn add_host_addr(
        &self,
        index: u32,
        addr: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), 32)
            .execute()
            .await
            .map_err(request(format!("adding {addr}/32")))
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

#[cfg(test)]
mod tests {
    use super::*;

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
