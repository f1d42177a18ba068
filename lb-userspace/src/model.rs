//! The desired-state vocabulary: what an operator configures (VIPs, backends, weights), independent
//! of how the data path stores it. The agent persists these, the CLI sends them, the TOML config
//! holds them, and `dataplane` turns them into map entries.

use serde::{Deserialize, Serialize};
use std::{fmt, net::Ipv4Addr, str::FromStr};

/// L4 protocol of a VIP.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
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

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("unknown protocol {other:?} (expected tcp or udp)")),
        }
    }
}

/// How a VIP's packets reach its backends (both are direct server return).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// IPIP encapsulation to the backend's address (works across subnets).
    #[default]
    Ipip,
    /// Destination-MAC rewrite (backends on the LB's L2 segment).
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

impl FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ipip" => Ok(Forward::Ipip),
            "l2" => Ok(Forward::L2),
            other => Err(format!(
                "unknown forwarding method {other:?} (expected ipip or l2)"
            )),
        }
    }
}

/// A service's identity: (address, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// One backend of a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub addr: Ipv4Addr,
    /// Relative share of new flows; 0 takes no new flows (drain).
    pub weight: u32,
}

/// One VIP and its backends, in the order they were added.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipSpec {
    pub key: ServiceKey,
    pub forward: Forward,
    pub backends: Vec<BackendSpec>,
}

/// Default weight of a backend added without `--weight`.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest accepted weight (as HAProxy's).
pub const MAX_WEIGHT: u32 = 256;
