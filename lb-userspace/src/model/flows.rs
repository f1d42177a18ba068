//! Which flows of the flow table an operator means (`xlb flows`, `xlb flows --count`, `xlb flows
//! flush`): a filter the CLI sends and the agent applies to every entry of a walk, and the words
//! the answers use (origin, count groups).
//!
//! A filter is matched against `FlowKey`/`FlowValue` as the kernel stores them: `FlowMatch` holds
//! the filter in network order once, so a walk of a million entries compares integers only.

use crate::model::{Proto, ServiceKey, addr::prefix_mask6};
use lb_common::{Addr, FLOW_F_PEER, FlowKey, FlowValue, IPPROTO_TCP, IPPROTO_UDP};
use serde::{Deserialize, Serialize};
use std::{fmt, net::IpAddr};

/// A client prefix of either family: the flows whose source address is in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientPrefix {
    pub addr: IpAddr,
    /// 0-32 for IPv4, 0-128 for IPv6.
    pub len: u8,
}

impl ClientPrefix {
    /// The prefix in the flow table's 128-bit space (IPv4 as IPv4-mapped, so an IPv4 /n is
    /// ::ffff:a.b.c.d/(96 + n)): network and mask (host order), and its family, which an
    /// address must also have (an IPv6 prefix as short as ::/0 would otherwise hold the mapped
    /// IPv4 addresses).
    fn wide(&self) -> (u128, u128, bool) {
        let v4 = self.addr.is_ipv4();
        let mask = prefix_mask6(if v4 { self.len + 96 } else { self.len });
        (wide(Addr::from(self.addr)) & mask, mask, v4)
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let (net, mask, v4) = self.wide();
        addr.is_ipv4() == v4 && wide(Addr::from(addr)) & mask == net
    }
}

/// An address of the flow table as one host-order number.
fn wide(addr: Addr) -> u128 {
    u128::from_be_bytes(addr.octets())
}

impl fmt::Display for ClientPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The flows an operator means; every field given must match (no field: every flow).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    /// Flows of this VIP (address, port and protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<ServiceKey>,
    /// Flows of this protocol (with `vip`, the VIP's protocol decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
    /// Flows pinned to this backend address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<IpAddr>,
    /// Flows whose client (source) address is in this prefix (of the client's family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientPrefix>,
}

impl FlowFilter {
    /// Whether it matches every flow.
    pub fn is_empty(&self) -> bool {
        *self == FlowFilter::default()
    }

    pub fn matcher(&self) -> FlowMatch {
        FlowMatch {
            vip: self
                .vip
                .map(|k| (Addr::from(k.addr), k.port.to_be(), k.proto.ip_proto())),
            proto: self.proto.map(Proto::ip_proto),
            backend: self.backend.map(Addr::from),
            client: self.client.map(|c| c.wide()),
        }
    }
}

impl fmt::Display for FlowFilter {
    /// `VIP 10.111.100.1:80/tcp, backend 10.111.1.11`, or `every flow`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(vip) = self.vip {
            parts.push(format!("VIP {vip}"));
        } else if let Some(proto) = self.proto {
            parts.push(format!("proto {proto}"));
        }
        if let Some(b) = self.backend {
            parts.push(format!("backend {b}"));
        }
        if let Some(c) = self.client {
            parts.push(format!("client {c}"));
        }
        if parts.is_empty() {
            f.write_str("every flow")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// A `FlowFilter` in the kernel's byte orders, for matching entries of a walk.
#[derive(Clone, Copy, Debug)]
pub struct FlowMatch {
    /// Address, port in network order, IP protocol number.
    vip: Option<(Addr, u16, u8)>,
    proto: Option<u8>,
    backend: Option<Addr>,
    /// Network and mask in the 128-bit space, host order (the key's address is converted once
    /// per entry that gets here), and whether the prefix is IPv4.
    client: Option<(u128, u128, bool)>,
}

impl FlowMatch {
    #[inline]
    pub fn matches(&self, key: &FlowKey, value: &FlowValue) -> bool {
        if let Some((addr, port, proto)) = self.vip
            && (key.dst_addr, key.dst_port, key.proto) != (addr, port, proto)
        {
            return false;
        }
        if self.proto.is_some_and(|p| p != key.proto) {
            return false;
        }
        if self.backend.is_some_and(|b| b != value.backend_addr) {
            return false;
        }
        if let Some((net, mask, v4)) = self.client
            && (key.src_addr.is_v4() != v4 || wide(key.src_addr) & mask != net)
        {
            return false;
        }
        true
    }
}

/// Who chose a flow's backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// This node's data path.
    Local,
    /// A peer, whose sync installed the flow here.
    Peer,
}

impl Origin {
    pub fn of(value: &FlowValue) -> Self {
        if value.flags & FLOW_F_PEER != 0 {
            Origin::Peer
        } else {
            Origin::Local
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Local => "local",
            Origin::Peer => "peer",
        })
    }
}

/// How `xlb flows --count --by` groups the flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CountBy {
    /// Per VIP (`ADDR:PORT/PROTO`).
    Vip,
    /// Per backend address.
    Backend,
    /// Per origin (`local`, `peer`).
    Origin,
}

impl fmt::Display for CountBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CountBy::Vip => "vip",
            CountBy::Backend => "backend",
            CountBy::Origin => "origin",
        })
    }
}

/// The protocol of a flow key's IP protocol number (`None`: neither TCP nor UDP, which the data
/// path never stores).
pub fn proto_of(ip_proto: u8) -> Option<Proto> {
    match ip_proto {
        IPPROTO_TCP => Some(Proto::Tcp),
        IPPROTO_UDP => Some(Proto::Udp),
        _ => None,
    }
}

/// A flow key's VIP as a `ServiceKey` (`None` for a protocol other than TCP and UDP).
pub fn vip_of(key: &FlowKey) -> Option<ServiceKey> {
    Some(ServiceKey {
        addr: IpAddr::from(key.dst_addr),
        port: u16::from_be(key.dst_port),
        proto: proto_of(key.proto)?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An address as the flow table holds it.
    fn be(s: &str) -> Addr {
        Addr::from(a(s))
    }

    /// A flow from `client:port` to `vip:80/proto`, pinned to `backend`.
    pub(crate) fn flow(
        client: &str,
        port: u16,
        vip: &str,
        proto: Proto,
        backend: &str,
        seen: u64,
        flags: u32,
    ) -> (FlowKey, FlowValue) {
        (
            FlowKey {
                src_addr: be(client),
                dst_addr: be(vip),
                src_port: port.to_be(),
                dst_port: 80u16.to_be(),
                proto: proto.ip_proto(),
                _pad: [0; 3],
            },
            FlowValue::new(be(backend), 0, seen, flags),
        )
    }

    #[test]
    fn every_field_of_a_filter_must_match() {
        let (k, v) = flow(
            "10.111.0.2",
            4000,
            "10.111.100.1",
            Proto::Tcp,
            "10.111.1.11",
            0,
            0,
        );
        let vip = ServiceKey {
            addr: a("10.111.100.1"),
            port: 80,
            proto: Proto::Tcp,
        };
        let yes = |f: FlowFilter| assert!(f.matcher().matches(&k, &v), "{f}");
        let no = |f: FlowFilter| assert!(!f.matcher().matches(&k, &v), "{f}");
        yes(FlowFilter::default());
        yes(FlowFilter {
            vip: Some(vip),
            backend: Some(a("10.111.1.11")),
            client: Some(ClientPrefix {
                addr: "10.111.0.0".parse().unwrap(),
                len: 24,
            }),
            proto: None,
        });
        no(FlowFilter {
            vip: Some(ServiceKey { port: 81, ..vip }),
            ..Default::default()
        });
        no(FlowFilter {
            vip: Some(ServiceKey {
                proto: Proto::Udp,
                ..vip
            }),
            ..Default::default()
        });
        yes(FlowFilter {
            proto: Some(Proto::Tcp),
            ..Default::default()
        });
        no(FlowFilter {
            proto: Some(Proto::Udp),
            ..Default::default()
        });
        no(FlowFilter {
            backend: Some(a("10.111.1.12")),
            ..Default::default()
        });
        // An IPv6 address never matches an IPv4 flow.
        no(FlowFilter {
            backend: Some(a("fd11:2::11")),
            ..Default::default()
        });
        for (prefix, len, hit) in [
            ("10.111.0.2", 32, true),
            ("10.111.0.3", 32, false),
            ("10.0.0.0", 8, true),
            ("10.112.0.0", 16, false),
            ("0.0.0.0", 0, true),
            // An IPv6 prefix never holds an IPv4 client, not even ::/0.
            ("::", 0, false),
            ("fd11:1::", 64, false),
        ] {
            let f = FlowFilter {
                client: Some(ClientPrefix {
                    addr: a(prefix),
                    len,
                }),
                ..Default::default()
            };
            assert_eq!(f.matcher().matches(&k, &v), hit, "{f}");
        }
        // An IPv6 flow: IPv6 prefixes hold it, IPv4 ones (even 0.0.0.0/0) do not.
        let mut k6 = k;
        k6.src_addr = Addr::from(a("fd11:1::2"));
        for (prefix, len, hit) in [
            ("fd11:1::", 64, true),
            ("fd11:1::2", 128, true),
            ("fd11:2::", 64, false),
            ("::", 0, true),
            ("0.0.0.0", 0, false),
        ] {
            let client = ClientPrefix {
                addr: a(prefix),
                len,
            };
            let f = FlowFilter {
                client: Some(client),
                ..Default::default()
            };
            assert_eq!(f.matcher().matches(&k6, &v), hit, "{f}");
            assert_eq!(client.contains(a("fd11:1::2")), hit, "{f}");
        }
    }

    #[test]
    fn origin_and_vip_come_from_the_entry() {
        let (k, v) = flow(
            "10.111.0.2",
            4000,
            "10.111.100.1",
            Proto::Udp,
            "10.111.1.11",
            0,
            0,
        );
        assert_eq!(Origin::of(&v), Origin::Local);
        let peer = FlowValue {
            flags: FLOW_F_PEER,
            ..v
        };
        assert_eq!(Origin::of(&peer), Origin::Peer);
        assert_eq!(vip_of(&k).unwrap().to_string(), "10.111.100.1:80/udp");
        assert_eq!(vip_of(&FlowKey { proto: 1, ..k }), None);
    }

    #[test]
    fn filters_describe_themselves_and_travel_as_json() {
        let f = FlowFilter {
            proto: Some(Proto::Udp),
            client: Some(ClientPrefix {
                addr: "10.111.0.0".parse().unwrap(),
                len: 16,
            }),
            ..Default::default()
        };
        assert_eq!(f.to_string(), "proto udp, client 10.111.0.0/16");
        assert_eq!(FlowFilter::default().to_string(), "every flow");
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            r#"{"proto":"udp","client":{"addr":"10.111.0.0","len":16}}"#
        );
        assert_eq!(serde_json::from_str::<FlowFilter>(&json).unwrap(), f);
        assert_eq!(
            serde_json::from_str::<FlowFilter>("{}").unwrap(),
            FlowFilter::default()
        );
    }
}
