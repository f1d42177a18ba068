//! The desired-state vocabulary: what an operator configures (VIPs, backends, weights, checks), independent
//! of how the data path stores it. The agent persists these, the CLI sends them, the TOML config
//! holds them, and `dataplane` turns them into map entries.

pub(crate) mod addr;
pub mod check;
pub mod flows;
pub mod net;
pub mod policy;

use crate::model::{check::CheckSpec, policy::SourcePolicy};
use serde::{Deserialize, Serialize};
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

/// L4 protocol of a VIP.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    Default,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn ip_proto(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::IPPROTO_TCP,
            Proto::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// How a VIP's packets reach its backends (both are direct server return).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// IPIP encapsulation to the backend (works across subnets; the backend decapsulates).
    #[default]
    Ipip,
    /// Rewrite the destination MAC only (backends on the load balancer's L2 segment).
    L2,
}

impl Forward {
    pub fn code(self) -> u32 {
        match self {
            Forward::Ipip => lb_common::FORWARD_IPIP,
            Forward::L2 => lb_common::FORWARD_L2,
        }
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forward::Ipip => "ipip",
            Forward::L2 => "l2",
        })
    }
}

/// A service's identity: (address, port, protocol). The address is IPv4 or IPv6 (never an
/// IPv4-mapped IPv6 one: the parsers refuse those).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl ServiceKey {
    /// `ADDR:PORT`, IPv6 in brackets (`[2001:db8::100]:80`): how VIPs are typed, listed and
    /// labelled.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.socket_addr(), self.proto)
    }
}

/// One backend of a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub addr: IpAddr,
    /// Relative share of new flows; 0 takes no new flows (drain).
    pub weight: u32,
}

/// One VIP and its backends, in the order they were added.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipSpec {
    pub key: ServiceKey,
    pub forward: Forward,
    pub backends: Vec<BackendSpec>,
    /// Answer ICMP echo requests to the VIP's address. An address carries several VIPs (ports):
    /// it answers when any of them allows it (and the agent's global switch is on).
    pub icmp_echo: bool,
    /// Source allow and deny lists, new-flow limits.
    pub policy: SourcePolicy,
}

/// Default weight of a backend added without `--weight`.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest accepted weight (as HAProxy's).
pub const MAX_WEIGHT: u32 = 256;

/// One backend as configured: its data-path part (address, weight) plus what only the agent
/// needs (its own health check, the weight to return to after a drain, whether it is a backup).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendConfig {
    pub addr: IpAddr,
    pub weight: u32,
    /// Replaces the VIP's check for this backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
    /// While the weight is 0: the weight `undrain` restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained_from: Option<u32>,
    /// A backup: takes new flows only while no regular backend of the VIP can.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backup: bool,
}

impl BackendConfig {
    pub fn new(addr: IpAddr, weight: u32) -> Self {
        BackendConfig {
            addr,
            weight,
            check: None,
            drained_from: None,
            backup: false,
        }
    }
}

/// One VIP as configured: the data-path part plus its health check. Stored in the state file;
/// `spec()` is what the data path gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "VipConfigRepr")]
pub struct VipConfig {
    pub key: ServiceKey,
    pub forward: Forward,
    pub check: CheckSpec,
    pub backends: Vec<BackendConfig>,
    /// See `VipSpec::icmp_echo`.
    pub icmp_echo: bool,
    /// See `VipSpec::policy`.
    #[serde(skip_serializing_if = "SourcePolicy::is_empty")]
    pub policy: SourcePolicy,
}

/// The stored form of a `VipConfig`: state files written before health checks existed have no
/// `check`, and get the protocol's default; those written before `icmp_echo` answer echo.
#[derive(Deserialize)]
struct VipConfigRepr {
    key: ServiceKey,
    forward: Forward,
    #[serde(default)]
    check: Option<CheckSpec>,
    backends: Vec<BackendConfig>,
    #[serde(default = "icmp_echo_default")]
    icmp_echo: bool,
    /// State files from before source policies have none: everyone, unlimited.
    #[serde(default)]
    policy: SourcePolicy,
}

/// ICMP echo to a VIP address is answered unless switched off (`--icmp-echo off`).
pub fn icmp_echo_default() -> bool {
    true
}

impl From<VipConfigRepr> for VipConfig {
    fn from(r: VipConfigRepr) -> Self {
        VipConfig {
            check: r
                .check
                .unwrap_or_else(|| CheckSpec::default_for(r.key.proto)),
            key: r.key,
            forward: r.forward,
            backends: r.backends,
            icmp_echo: r.icmp_echo,
            policy: r.policy,
        }
    }
}

impl VipConfig {
    /// A VIP with no backends and its protocol's default check.
    pub fn new(key: ServiceKey, forward: Forward) -> Self {
        VipConfig {
            key,
            forward,
            check: CheckSpec::default_for(key.proto),
            backends: Vec::new(),
            icmp_echo: icmp_echo_default(),
            policy: SourcePolicy::default(),
        }
    }

    /// What the data path needs.
    pub fn spec(&self) -> VipSpec {
        VipSpec {
            key: self.key,
            forward: self.forward,
            backends: self
                .backends
                .iter()
                .map(|b| BackendSpec {
                    addr: b.addr,
                    weight: b.weight,
                })
                .collect(),
            icmp_echo: self.icmp_echo,
            policy: self.policy.clone(),
        }
    }

    /// The check that applies to `b`: its own, or the VIP's.
    pub fn check_of<'a>(&'a self, b: &'a BackendConfig) -> &'a CheckSpec {
        b.check.as_ref().unwrap_or(&self.check)
    }
}

impl From<VipSpec> for VipConfig {
    /// A data-path spec with the protocol's default check (tests, and configs without checks).
    fn from(spec: VipSpec) -> Self {
        VipConfig {
            check: CheckSpec::default_for(spec.key.proto),
            key: spec.key,
            forward: spec.forward,
            backends: spec
                .backends
                .into_iter()
                .map(|b| BackendConfig::new(b.addr, b.weight))
                .collect(),
            icmp_echo: spec.icmp_echo,
            policy: spec.policy,
        }
    }
}
