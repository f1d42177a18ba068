//! What this node announces, decided from what it knows: a pure function of the data path's
//! attachment, the backends' health and weights, the node's drain and its start-up, so every
//! case is a unit test.
//!
//! A VIP address is announced when, and only while:
//! - the data path is attached (nothing would steer the traffic otherwise);
//! - the node is not drained (`xlb node drain`);
//! - the node has finished starting (its first health checks, its peers' flow tables), unless
//!   the address was announced already when the agent took over a running data path (a restart:
//!   the data path kept serving it, and withdrawing it for the start-up would only move its
//!   connections around);
//! - at least one VIP on that address has a backend that may take new flows: not down by its
//!   checks and with a weight above 0 (not drained). A router sends every port of an address to
//!   the node, so one serving VIP on the address is enough; a port whose backends are all gone
//!   is dropped by the data path (`drop_no_backend`) as it would be on any node.
//!
//! When several reasons hold, the one an operator acts on first is named: not attached, then
//! drained, then starting, then no healthy backend.

use crate::model::ServiceKey;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

/// What a starting node still waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Starting {
    /// The first round of health checks (every checked backend's first result, or the first
    /// timeout).
    HealthChecks,
    /// The flow table of a reachable peer (bounded: see `gate`).
    PeerSnapshot,
}

/// Why an address is not announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Withheld {
    NotAttached,
    NodeDrained,
    Starting(Starting),
    NoHealthyBackend,
}

impl fmt::Display for Withheld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Withheld::NotAttached => "not attached",
            Withheld::NodeDrained => "node drained",
            Withheld::Starting(Starting::HealthChecks) => {
                "starting: waiting for the first health checks"
            }
            Withheld::Starting(Starting::PeerSnapshot) => "starting: waiting for peer snapshot",
            Withheld::NoHealthyBackend => "no healthy backend",
        })
    }
}

/// One VIP as the decision sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VipServing {
    pub(crate) key: ServiceKey,
    /// Backends that may take new flows: up by their checks, weight above 0.
    pub(crate) serving: u32,
}

/// Everything the decision depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeInputs {
    pub(crate) attached: bool,
    pub(crate) drained: bool,
    /// `None` once the node has finished starting.
    pub(crate) starting: Option<Starting>,
    /// Addresses announced when the agent took the data path over: not withheld while starting.
    pub(crate) adopted: BTreeSet<IpAddr>,
    pub(crate) vips: Vec<VipServing>,
}

/// The decision for one VIP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AddressDecision {
    /// `None`: announced; otherwise why not.
    pub(crate) withheld: Option<Withheld>,
    /// The VIPs on the address.
    pub(crate) vips: Vec<ServiceKey>,
    /// Serving backends over all of them.
    pub(crate) serving: u32,
}

impl AddressDecision {
    pub(crate) fn announced(&self) -> bool {
        self.withheld.is_none()
    }
}

/// The decision for every VIP address the node has, of either family (an IPv6 VIP is announced
/// as a /128 as an IPv4 one is as a /32).
pub(crate) fn decide(inputs: &NodeInputs) -> BTreeMap<IpAddr, AddressDecision> {
    let mut out: BTreeMap<IpAddr, AddressDecision> = BTreeMap::new();
    for v in &inputs.vips {
        let d = out.entry(v.key.addr).or_insert_with(|| AddressDecision {
            withheld: None,
            vips: Vec::new(),
            serving: 0,
        });
        d.vips.push(v.key);
        d.serving += v.serving;
    }
    for (addr, d) in &mut out {
        let starting = inputs.starting.filter(|_| !inputs.adopted.contains(addr));
        d.withheld = if !inputs.attached {
            Some(Withheld::NotAttached)
        } else if inputs.drained {
            Some(Withheld::NodeDrained)
        } else if let Some(s) = starting {
            Some(Withheld::Starting(s))
        } else if d.serving == 0 {
            Some(Withheld::NoHealthyBackend)
        } else {
            None
        };
    }
    out
}

/// The addresses to announce.
pub(crate) fn announced(decisions: &BTreeMap<IpAddr, AddressDecision>) -> Vec<IpAddr> {
    decisions
        .iter()
        .filter(|(_, d)| d.announced())
        .map(|(a, _)| *a)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;
    use std::net::Ipv4Addr;

    fn vip(last: u8, port: u16, proto: Proto, serving: u32) -> VipServing {
        VipServing {
            key: ServiceKey {
                addr: Ipv4Addr::new(10, 111, 100, last).into(),
                port,
                proto,
            },
            serving,
        }
    }

    fn inputs(vips: Vec<VipServing>) -> NodeInputs {
        NodeInputs {
            attached: true,
            drained: false,
            starting: None,
            adopted: BTreeSet::new(),
            vips,
        }
    }

    fn v4(last: u8) -> IpAddr {
        Ipv4Addr::new(10, 111, 100, last).into()
    }

    /// The last byte of each decided address (the tests' VIPs differ only there) and its reason.
    fn reasons(i: &NodeInputs) -> Vec<(u8, Option<Withheld>)> {
        decide(i)
            .into_iter()
            .map(|(a, d)| {
                let last = match a {
                    IpAddr::V4(a) => a.octets()[3],
                    IpAddr::V6(a) => a.octets()[15],
                };
                (last, d.withheld)
            })
            .collect()
    }

    #[test]
    fn an_address_is_announced_while_one_of_its_vips_has_a_serving_backend() {
        let i = inputs(vec![
            vip(1, 80, Proto::Tcp, 3),
            vip(1, 53, Proto::Udp, 0),
            vip(2, 80, Proto::Tcp, 0),
            vip(2, 443, Proto::Tcp, 0),
            vip(3, 80, Proto::Tcp, 1),
        ]);
        assert_eq!(
            reasons(&i),
            [(1, None), (2, Some(Withheld::NoHealthyBackend)), (3, None)]
        );
        let d = decide(&i);
        let one = &d[&v4(1)];
        assert_eq!((one.vips.len(), one.serving), (2, 3));
        assert_eq!(announced(&d), [v4(1), v4(3)]);
        // No VIPs: nothing to decide.
        assert!(decide(&inputs(Vec::new())).is_empty());
        // An IPv6 VIP is decided like an IPv4 one, on its own address.
        let v6: IpAddr = "fd11:100::1".parse().unwrap();
        let mut up6 = vip(1, 80, Proto::Tcp, 3);
        up6.key.addr = v6;
        let mut down6 = vip(2, 80, Proto::Tcp, 0);
        down6.key.addr = "fd11:100::2".parse().unwrap();
        let d = decide(&inputs(vec![vip(1, 80, Proto::Tcp, 1), up6, down6]));
        assert_eq!(announced(&d), [v4(1), v6]);
        assert_eq!(
            d[&"fd11:100::2".parse::<IpAddr>().unwrap()].withheld,
            Some(Withheld::NoHealthyBackend)
        );
    }

    #[test]
    fn drain_starting_and_attachment_withhold_every_address() {
        let vips = vec![vip(1, 80, Proto::Tcp, 2), vip(2, 80, Proto::Tcp, 0)];
        let drained = NodeInputs {
            drained: true,
            ..inputs(vips.clone())
        };
        assert!(
            reasons(&drained)
                .iter()
                .all(|(_, r)| *r == Some(Withheld::NodeDrained))
        );
        for s in [Starting::HealthChecks, Starting::PeerSnapshot] {
            let starting = NodeInputs {
                starting: Some(s),
                ..inputs(vips.clone())
            };
            assert!(announced(&decide(&starting)).is_empty());
            assert!(
                reasons(&starting)
                    .iter()
                    .all(|(_, r)| *r == Some(Withheld::Starting(s)))
            );
        }
        let detached = NodeInputs {
            attached: false,
            ..inputs(vips)
        };
        assert!(
            reasons(&detached)
                .iter()
                .all(|(_, r)| *r == Some(Withheld::NotAttached))
        );
    }

    #[test]
    fn the_reason_named_is_the_one_to_act_on_first() {
        let all = NodeInputs {
            attached: false,
            drained: true,
            starting: Some(Starting::PeerSnapshot),
            adopted: BTreeSet::new(),
            vips: vec![vip(1, 80, Proto::Tcp, 0)],
        };
        let first = |i: &NodeInputs| reasons(i)[0].1;
        assert_eq!(first(&all), Some(Withheld::NotAttached));
        let all = NodeInputs {
            attached: true,
            ..all
        };
        assert_eq!(first(&all), Some(Withheld::NodeDrained));
        let all = NodeInputs {
            drained: false,
            ..all
        };
        assert_eq!(
            first(&all),
            Some(Withheld::Starting(Starting::PeerSnapshot))
        );
        let all = NodeInputs {
            starting: None,
            ..all
        };
        assert_eq!(first(&all), Some(Withheld::NoHealthyBackend));
        assert_eq!(
            Withheld::Starting(Starting::PeerSnapshot).to_string(),
            "starting: waiting for peer snapshot"
        );
        assert_eq!(Withheld::NoHealthyBackend.to_string(), "no healthy backend");
    }

    #[test]
    fn a_taken_over_address_stays_announced_through_the_start_up_if_it_qualifies() {
        let vips = vec![
            vip(1, 80, Proto::Tcp, 2),
            vip(2, 80, Proto::Tcp, 0),
            vip(3, 80, Proto::Tcp, 1),
        ];
        let adopted: BTreeSet<IpAddr> = [1, 2].into_iter().map(v4).collect();
        let restart = NodeInputs {
            starting: Some(Starting::PeerSnapshot),
            adopted,
            ..inputs(vips)
        };
        // .1 stays; .2 has no serving backend any more; .3 was not announced: it waits.
        assert_eq!(
            reasons(&restart),
            [
                (1, None),
                (2, Some(Withheld::NoHealthyBackend)),
                (3, Some(Withheld::Starting(Starting::PeerSnapshot)))
            ]
        );
        // Drain and detachment still win.
        let drained = NodeInputs {
            drained: true,
            ..restart.clone()
        };
        assert!(announced(&decide(&drained)).is_empty());
        let detached = NodeInputs {
            attached: false,
            ..restart
        };
        assert!(announced(&decide(&detached)).is_empty());
    }
}
