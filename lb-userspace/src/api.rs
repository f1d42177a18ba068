//! The agent ↔ CLI protocol: a Unix stream socket carrying newline-delimited JSON, one `Request`
//! line answered by one `Response` line. Both enums are internally tagged so a line is readable by a
//! human with `socat` and stays stable when variants are added.
//!
//! The report types (`VipSummary`, `VipReport`, `StatsReport`) are also exactly what the CLI prints
//! with `--json`, so their field names are a public interface: do not rename them.

use crate::{
    model::check::{CheckPatch, CheckSpec},
    model::flows::{CountBy, FlowFilter, Origin},
    model::{BackendConfig, Forward, Proto, ServiceKey, VipConfig, icmp_echo_default},
    model::{net::IpNet, policy::PolicyPatch},
};
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, fmt, net::IpAddr};

/// Longest request or response line accepted, newline included: room for a deny list of a
/// million prefixes (about 20 MB of JSON) either way, and a bound on what a misbehaving client
/// of the (root-only) socket can make the agent buffer.
pub(crate) const MAX_LINE: usize = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub(crate) enum Request {
    VipAdd {
        vip: ServiceKey,
        forward: Forward,
        /// Applied to the protocol's default check.
        #[serde(default, skip_serializing_if = "CheckPatch::is_empty")]
        check: CheckPatch,
        #[serde(default = "icmp_echo_default")]
        icmp_echo: bool,
        /// Applied to "no source policy".
        #[serde(default, skip_serializing_if = "PolicyPatch::is_empty")]
        policy: PolicyPatch,
    },
    /// Change a VIP's check (fields not in `check` keep their values), ICMP echo and/or source
    /// policy.
    VipSet {
        vip: ServiceKey,
        check: CheckPatch,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        icmp_echo: Option<bool>,
        #[serde(default, skip_serializing_if = "PolicyPatch::is_empty")]
        policy: PolicyPatch,
    },
    VipDel {
        vip: ServiceKey,
    },
    VipList,
    BackendAdd {
        vip: ServiceKey,
        backend: IpAddr,
        weight: u32,
        /// A backup backend (new flows only while no regular backend can take them).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        backup: bool,
        /// Non-empty: the backend's own check, the VIP's with these fields applied.
        #[serde(default, skip_serializing_if = "CheckPatch::is_empty")]
        check: CheckPatch,
    },
    /// Change a backend's weight (a weight above 0 ends a drain).
    BackendSet {
        vip: ServiceKey,
        backend: IpAddr,
        weight: u32,
    },
    /// Weight 0, remembering the weight for `BackendUndrain`.
    BackendDrain {
        vip: ServiceKey,
        backend: IpAddr,
    },
    BackendUndrain {
        vip: ServiceKey,
        backend: IpAddr,
    },
    BackendDel {
        vip: ServiceKey,
        backend: IpAddr,
    },
    BackendList {
        vip: ServiceKey,
    },
    Stats,
    /// Peer sync status (`xlb peers`).
    Peers,
    /// Switch the data path's debug events (aya-log lines in the agent's log) for one VIP on or
    /// off. Runtime only: not part of the desired state, not persisted.
    VipDebug {
        vip: ServiceKey,
        on: bool,
    },
    /// The `limit` most recent flows that match `filter` (`xlb flows`).
    FlowList {
        #[serde(default)]
        filter: FlowFilter,
        limit: u32,
    },
    /// How many flows match `filter`, in groups if `by` is given (`xlb flows --count`).
    FlowCount {
        #[serde(default)]
        filter: FlowFilter,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<CountBy>,
    },
    /// Delete the flows that match `filter` from the flow table, so their next packets take a
    /// backend as new flows (`xlb flows flush`). An empty filter needs `all`.
    FlowFlush {
        #[serde(default)]
        filter: FlowFilter,
        #[serde(default)]
        all: bool,
    },
    /// Re-read the agent's `--config` file and apply what changed (`xlb reload`).
    Reload,
    /// Remove the data path for good and exit (`xlb detach` while the agent runs). `dir` is the
    /// name of the data path's directory in bpffs (`ns<cookie>-if<ifindex>`), so an agent never
    /// removes a data path the caller did not mean.
    Detach {
        dir: String,
    },
    /// Add prefixes to the global deny list (those already on it are left as they are).
    DenyAdd {
        prefixes: Vec<IpNet>,
    },
    /// Remove prefixes from the global deny list (each must be on it).
    DenyDel {
        prefixes: Vec<IpNet>,
    },
    DenyList,
    /// Replace the global deny list (the CLI read and checked the file `source`).
    DenyLoad {
        prefixes: Vec<IpNet>,
        source: String,
    },
    /// Withdraw every VIP address from this node's announcement (`xlb node drain`); persisted.
    NodeDrain,
    /// End the drain (`xlb node undrain`).
    NodeUndrain,
    /// What is announced and why (`xlb node status`).
    NodeStatus,
}

impl Request {
    /// Whether the request is about the deny list (answered off the serve loop).
    pub(crate) fn is_deny(&self) -> bool {
        matches!(
            self,
            Request::DenyAdd { .. }
                | Request::DenyDel { .. }
                | Request::DenyList
                | Request::DenyLoad { .. }
        )
    }

    /// Whether the request changes desired state (the agent re-warms neighbours after those).
    pub(crate) fn is_mutation(&self) -> bool {
        matches!(
            self,
            Request::VipAdd { .. }
                | Request::VipSet { .. }
                | Request::VipDel { .. }
                | Request::BackendAdd { .. }
                | Request::BackendSet { .. }
                | Request::BackendDrain { .. }
                | Request::BackendUndrain { .. }
                | Request::BackendDel { .. }
                | Request::Reload
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub(crate) enum Response {
    /// A change was applied and persisted; `message` says what, for the operator.
    Done {
        message: String,
    },
    VipList {
        vips: Vec<VipSummary>,
    },
    BackendList {
        vip: VipReport,
    },
    Stats {
        stats: StatsReport,
    },
    Peers {
        peers: crate::sync::PeersReport,
    },
    FlowList {
        flows: FlowListReport,
    },
    FlowCount {
        count: FlowCountReport,
    },
    FlowFlush {
        flush: FlowFlushReport,
    },
    DenyList {
        deny: DenyReport,
    },
    Node {
        node: NodeReport,
    },
    /// Nothing changed; `message` names the problem (one line).
    Error {
        message: String,
    },
}

/// One flow of the table (`xlb flows --json`: an element of `flows`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FlowEntry {
    /// The client's address and port (the flow's source).
    pub(crate) client: IpAddr,
    pub(crate) client_port: u16,
    /// The VIP, `ADDR:PORT` (its protocol is `proto`).
    pub(crate) vip: String,
    pub(crate) proto: Proto,
    /// The backend the flow is pinned to.
    pub(crate) backend: IpAddr,
    /// Milliseconds since the flow's last packet (or since a peer's sync installed it).
    pub(crate) age_ms: u64,
    /// `local`: this node's data path chose the backend; `peer`: installed from a peer's sync.
    pub(crate) origin: Origin,
}

/// How one walk of the flow table went: every answer about flows says it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct WalkReport {
    /// Entries the walk read (the whole table, live and finished-but-not-evicted flows).
    pub(crate) entries: u64,
    /// Entries that matched the filter.
    pub(crate) matched: u64,
    /// How long the walk took, milliseconds.
    pub(crate) walk_ms: f64,
}

/// What `xlb flows --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FlowListReport {
    #[serde(flatten)]
    pub(crate) walk: WalkReport,
    /// Matching flows not in `flows` (over `--limit`).
    pub(crate) left_out: u64,
    /// The most recent matching flows (smallest `age_ms` first), at most `--limit`.
    pub(crate) flows: Vec<FlowEntry>,
}

/// One group of `xlb flows --count --by`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FlowGroup {
    /// The VIP (`ADDR:PORT/PROTO`), the backend address, or the origin (`local`, `peer`).
    pub(crate) key: String,
    pub(crate) flows: u64,
}

/// What `xlb flows --count --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FlowCountReport {
    #[serde(flatten)]
    pub(crate) walk: WalkReport,
    /// The grouping asked for (`--by`), if any.
    pub(crate) by: Option<CountBy>,
    /// Matching flows per group, most flows first (empty without `--by`).
    pub(crate) groups: Vec<FlowGroup>,
}

/// What `xlb flows flush --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FlowFlushReport {
    #[serde(flatten)]
    pub(crate) walk: WalkReport,
    /// Matching entries deleted (fewer than `matched` if some were evicted meanwhile).
    pub(crate) flushed: u64,
    /// How long the deletion took, milliseconds.
    pub(crate) delete_ms: f64,
}

/// The global deny list (`xlb deny list --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DenyReport {
    pub(crate) count: usize,
    pub(crate) capacity: u32,
    pub(crate) prefixes: Vec<IpNet>,
}

/// One backend as configured (`vip list --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BackendSummary {
    pub(crate) address: IpAddr,
    pub(crate) weight: u32,
    /// The backend's own check, if it has one (otherwise the VIP's applies).
    pub(crate) check: Option<CheckSpec>,
    /// A backup backend. Defaulted for older agents.
    #[serde(default)]
    pub(crate) backup: bool,
}

/// One VIP as configured (`vip list --json` prints `{"vips": [VipSummary, ...]}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VipSummary {
    /// `ADDR:PORT`, as typed on the command line.
    pub(crate) vip: String,
    pub(crate) address: IpAddr,
    pub(crate) port: u16,
    pub(crate) proto: Proto,
    pub(crate) forward: Forward,
    pub(crate) check: CheckSpec,
    pub(crate) backends: Vec<BackendSummary>,
    /// Whether this VIP lets its address answer ICMP echo.
    pub(crate) icmp_echo: bool,
    /// Sources that may reach the VIP (empty: every source).
    #[serde(default)]
    pub(crate) allow_src: Vec<IpNet>,
    /// Sources that may not.
    #[serde(default)]
    pub(crate) deny_src: Vec<IpNet>,
    /// New flows per second and burst per (source, VIP) and per VIP; `null`: no limit.
    #[serde(default)]
    pub(crate) src_rate: Option<u32>,
    #[serde(default)]
    pub(crate) src_burst: Option<u32>,
    #[serde(default)]
    pub(crate) vip_rate: Option<u32>,
    #[serde(default)]
    pub(crate) vip_burst: Option<u32>,
}

impl VipSummary {
    /// The source policy these fields describe.
    pub(crate) fn policy(&self) -> crate::model::policy::SourcePolicy {
        use crate::model::policy::{RateLimit, SourcePolicy};
        let limit = |rate: Option<u32>, burst: Option<u32>| {
            rate.map(|rate| RateLimit {
                rate,
                burst: burst.unwrap_or(rate),
            })
        };
        SourcePolicy {
            allow_src: self.allow_src.clone(),
            deny_src: self.deny_src.clone(),
            src_limit: limit(self.src_rate, self.src_burst),
            vip_limit: limit(self.vip_rate, self.vip_burst),
        }
    }
}

impl From<&VipConfig> for VipSummary {
    fn from(spec: &VipConfig) -> Self {
        VipSummary {
            vip: vip_string(&spec.key),
            address: spec.key.addr,
            port: spec.key.port,
            proto: spec.key.proto,
            forward: spec.forward,
            check: spec.check.clone(),
            backends: spec
                .backends
                .iter()
                .map(|b: &BackendConfig| BackendSummary {
                    address: b.addr,
                    weight: b.weight,
                    check: b.check.clone(),
                    backup: b.backup,
                })
                .collect(),
            icmp_echo: spec.icmp_echo,
            allow_src: spec.policy.allow_src.clone(),
            deny_src: spec.policy.deny_src.clone(),
            src_rate: spec.policy.src_limit.map(|l| l.rate),
            src_burst: spec.policy.src_limit.map(|l| l.burst),
            vip_rate: spec.policy.vip_limit.map(|l| l.rate),
            vip_burst: spec.policy.vip_limit.map(|l| l.burst),
        }
    }
}

/// What `vip list --json` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VipList {
    pub(crate) vips: Vec<VipSummary>,
}

/// The last health check of a backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LastCheck {
    pub(crate) ok: bool,
    /// `connected` / `HTTP 200` when ok, the failure reason otherwise.
    pub(crate) detail: String,
    pub(crate) latency_ms: f64,
    pub(crate) at_unix_ms: u64,
}

/// One backend with its health and its data-path counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct BackendReport {
    pub(crate) address: IpAddr,
    pub(crate) weight: u32,
    pub(crate) state: BackendState,
    /// When `state` began, RFC 3339 UTC.
    pub(crate) since: String,
    pub(crate) since_unix_ms: u64,
    /// `None` before the first check and for backends without checks.
    pub(crate) last_check: Option<LastCheck>,
    /// Flows of this backend that saw a packet in the last minute.
    pub(crate) active_flows: u64,
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) new_flows: u64,
    /// Health checks passed / failed since the backend was added (0 without checks). Defaulted
    /// so a newer CLI still reads an older agent's answer.
    #[serde(default)]
    pub(crate) checks_ok: u64,
    #[serde(default)]
    pub(crate) checks_failed: u64,
    /// A backup backend (new flows only while no regular backend can take them).
    #[serde(default)]
    pub(crate) backup: bool,
    /// Why a backend is not simply up or down by its own checks: `another primary is serving:
    /// ADDR`, `waiting for its first check`, `backup, standing by`, `backup, serving: no regular
    /// backend is up`; `None` otherwise.
    #[serde(default)]
    pub(crate) reason: Option<String>,
}

/// One VIP with its counters and its backends' (`backend list --json` prints this object).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct VipReport {
    pub(crate) vip: String,
    pub(crate) address: IpAddr,
    pub(crate) port: u16,
    pub(crate) proto: Proto,
    pub(crate) forward: Forward,
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) new_flows: u64,
    /// Packets its source checks and new-flow limits dropped, by reason (`drop_deny_list`,
    /// `drop_src_denied`, `drop_src_not_allowed`, `drop_rate_limited_src`,
    /// `drop_rate_limited_vip`; every one present). Defaulted for older agents.
    #[serde(default)]
    pub(crate) drops: BTreeMap<String, u64>,
    pub(crate) backends: Vec<BackendReport>,
    /// VIPs with `postgres:primary` checks only: whether more than one backend reports primary
    /// right now (the others get no new flows; see `agent::health::selection`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) primary_conflict: Option<bool>,
}

/// Everything `xlb stats --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct StatsReport {
    pub(crate) vips: Vec<VipReport>,
    /// Packets per outcome (`lb_common::reason::NAMES`), every reason present.
    pub(crate) reasons: BTreeMap<String, u64>,
    /// Data-path events (`lb_common::event::NAMES`): `midflow_miss` (a TCP packet without SYN
    /// that found no flow entry, steered as a new flow: a sync gap), `midflow_held` (with peer
    /// sync on, such a packet's flow held for the peer's record first), `flow_resteered`,
    /// `flow_event_lost`, `nexthop_lookup` (FIB lookups for a backend's next hop, which is
    /// cached per CPU for 1 s).
    pub(crate) events: BTreeMap<String, u64>,
    pub(crate) flow_capacity: u32,
    /// Entries in the flow table (live and finished-but-not-evicted flows: it is an LRU),
    /// counted by a walk of the table off the agent's serve loop: a walk made for this report
    /// while walks are cheap, else the last one, at most a second (and one walk) old; see
    /// `agent::flows`. Defaulted for older agents.
    #[serde(default)]
    pub(crate) flow_entries: u64,
    /// Flows deleted by `xlb flows flush` since the agent started. Defaulted for older agents.
    #[serde(default)]
    pub(crate) flows_flushed: u64,
    /// Size of the embryonic table (new TCP flows that have sent only SYNs) and its entries,
    /// counted by the same walk as `flow_entries`.
    #[serde(default)]
    pub(crate) embryonic_capacity: u32,
    #[serde(default)]
    pub(crate) embryonic_entries: u64,
    /// Prefixes on the global deny list.
    #[serde(default)]
    pub(crate) deny_list: u64,
    /// Of them, IPv4 host entries (/32: the data path's exact-match hash; shorter IPv4
    /// prefixes are in its trie).
    #[serde(default)]
    pub(crate) deny_hosts: u64,
    /// Of them, IPv6 prefixes (the data path's IPv6 trie). Defaulted for older agents.
    #[serde(default)]
    pub(crate) deny_ipv6: u64,
    /// Route announcement (`xlb node status`), when the agent runs with `--announce-table`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) node: Option<NodeReport>,
}

/// `xlb node status --json`: the node's route announcement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeReport {
    /// The routing table the agent keeps its routes in (`--announce-table`).
    pub(crate) table: u32,
    /// Their route protocol number (`--announce-proto`).
    pub(crate) proto: u8,
    /// The data path is attached.
    pub(crate) attached: bool,
    /// `xlb node drain` is in force (it survives restarts).
    pub(crate) drained: bool,
    pub(crate) drained_since_unix_ms: Option<u64>,
    /// What a starting node still waits for (`starting: waiting for peer snapshot`); `null` once
    /// it has started.
    pub(crate) starting: Option<String>,
    /// The last failure to write the table, until it is in order again.
    pub(crate) table_error: Option<String>,
    /// With `--bird-socket`: whether BIRD answers there.
    pub(crate) routing_daemon: Option<DaemonReport>,
    /// Every VIP address, in address order.
    pub(crate) addresses: Vec<AddressReport>,
}

/// One VIP address in `xlb node status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AddressReport {
    pub(crate) address: IpAddr,
    /// The node wants it announced.
    pub(crate) announced: bool,
    /// Its route is in the table (what the routing daemon sees).
    pub(crate) in_table: bool,
    /// Why it is not announced (`no healthy backend`, `node drained`, `starting: waiting for
    /// peer snapshot`, `starting: waiting for the first health checks`, `not attached`); `null`
    /// when it is.
    pub(crate) reason: Option<String>,
    /// The VIPs on the address (`ADDR:PORT/PROTO`).
    pub(crate) vips: Vec<String>,
    /// Backends that may take new flows (up, weight above 0), over all of them.
    pub(crate) serving_backends: u32,
}

/// The routing daemon as the agent last found it (`--bird-socket`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DaemonReport {
    pub(crate) socket: std::path::PathBuf,
    pub(crate) answers: bool,
    /// `BIRD 2.0.12`, or why nobody answers.
    pub(crate) detail: String,
    pub(crate) checked_unix_ms: u64,
}

/// What `backend list` shows as a backend's state. Down wins over draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BackendState {
    Up,
    Down,
    /// Up, weight 0: no new flows, existing flows stay.
    Draining,
}

impl BackendState {
    pub(crate) fn of(up: bool, weight: u32) -> Self {
        match (up, weight) {
            (false, _) => BackendState::Down,
            (true, 0) => BackendState::Draining,
            (true, _) => BackendState::Up,
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
        })
    }
}

/// `ADDR:PORT` of a service key, IPv6 in brackets (the protocol is reported separately).
pub(crate) fn vip_string(key: &ServiceKey) -> String {
    key.socket_addr().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::check::CheckKind;

    fn key() -> ServiceKey {
        ServiceKey {
            addr: IpAddr::from([10, 111, 100, 1]),
            port: 80,
            proto: Proto::Tcp,
        }
    }

    fn round_trip_request(req: Request) {
        let line = serde_json::to_string(&req).unwrap();
        assert!(!line.contains('\n'), "one request must be one line: {line}");
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), req);
    }

    fn round_trip_response(resp: Response) {
        let line = serde_json::to_string(&resp).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), resp);
    }

    #[test]
    fn every_request_round_trips() {
        let backend = IpAddr::from([10, 111, 1, 11]);
        for req in [
            Request::VipAdd {
                vip: key(),
                forward: Forward::L2,
                check: CheckPatch::default(),
                icmp_echo: true,
                policy: PolicyPatch::default(),
            },
            Request::VipAdd {
                vip: key(),
                forward: Forward::L2,
                check: CheckPatch {
                    kind: Some(CheckKind::Http),
                    path: Some("/healthz".into()),
                    interval: Some(std::time::Duration::from_millis(200)),
                    ..Default::default()
                },
                icmp_echo: false,
                policy: PolicyPatch {
                    allow_src: Some(vec!["10.0.0.0/8".parse().unwrap()]),
                    src_rate: Some(crate::model::policy::RateSetting::Rate(10)),
                    ..Default::default()
                },
            },
            Request::VipSet {
                vip: key(),
                check: CheckPatch {
                    fall: Some(5),
                    ..Default::default()
                },
                icmp_echo: Some(false),
                policy: PolicyPatch {
                    deny_src: Some(vec![]),
                    vip_rate: Some(crate::model::policy::RateSetting::Off),
                    ..Default::default()
                },
            },
            Request::VipDel { vip: key() },
            Request::VipList,
            Request::BackendAdd {
                vip: key(),
                backend,
                weight: 3,
                backup: true,
                check: CheckPatch {
                    port: Some(8080),
                    ..Default::default()
                },
            },
            Request::BackendSet {
                vip: key(),
                backend,
                weight: 0,
            },
            Request::BackendDrain {
                vip: key(),
                backend,
            },
            Request::BackendUndrain {
                vip: key(),
                backend,
            },
            Request::BackendDel {
                vip: key(),
                backend,
            },
            Request::BackendList { vip: key() },
            Request::Stats,
            Request::Peers,
            Request::VipDebug {
                vip: key(),
                on: true,
            },
            Request::FlowList {
                filter: FlowFilter {
                    vip: Some(key()),
                    backend: Some(backend),
                    ..Default::default()
                },
                limit: 50,
            },
            Request::FlowCount {
                filter: FlowFilter::default(),
                by: Some(CountBy::Origin),
            },
            Request::FlowFlush {
                filter: FlowFilter::default(),
                all: true,
            },
            Request::DenyAdd {
                prefixes: vec!["192.0.2.0/24".parse().unwrap()],
            },
            Request::DenyDel {
                prefixes: vec!["192.0.2.0/24".parse().unwrap()],
            },
            Request::DenyList,
            Request::DenyLoad {
                prefixes: vec!["198.51.100.0/24".parse().unwrap()],
                source: "feed.txt".into(),
            },
        ] {
            round_trip_request(req);
        }
    }

    #[test]
    fn every_response_round_trips() {
        let walk = WalkReport {
            entries: 10,
            matched: 2,
            walk_ms: 0.5,
        };
        let mut spec = VipConfig::new(key(), Forward::Ipip);
        spec.backends = vec![BackendConfig::new(IpAddr::from([10, 111, 1, 11]), 1)];
        let report = VipReport {
            vip: "10.111.100.1:80".into(),
            address: key().addr,
            port: 80,
            proto: Proto::Udp,
            forward: Forward::L2,
            packets: 1,
            bytes: 2,
            new_flows: 3,
            drops: [("drop_src_denied".to_string(), 9)].into_iter().collect(),
            backends: vec![BackendReport {
                address: IpAddr::from([10, 111, 1, 12]),
                weight: 2,
                state: BackendState::Down,
                since: "2026-05-20T10:00:00.000Z".into(),
                since_unix_ms: 1_779_271_200_000,
                last_check: Some(LastCheck {
                    ok: false,
                    detail: "connection refused".into(),
                    latency_ms: 0.25,
                    at_unix_ms: 1_779_271_200_500,
                }),
                active_flows: 3,
                packets: 4,
                bytes: 5,
                new_flows: 6,
                checks_ok: 7,
                checks_failed: 8,
                backup: false,
                reason: None,
            }],
            primary_conflict: Some(false),
        };
        for resp in [
            Response::Done {
                message: "added".into(),
            },
            Response::VipList {
                vips: vec![VipSummary::from(&spec)],
            },
            Response::BackendList {
                vip: report.clone(),
            },
            Response::Stats {
                stats: StatsReport {
                    vips: vec![report],
                    reasons: [("fwd_tx".to_string(), 7)].into_iter().collect(),
                    events: [("midflow_miss".to_string(), 0)].into_iter().collect(),
                    flow_capacity: 1024,
                    flow_entries: 12,
                    flows_flushed: 3,
                    embryonic_capacity: 256,
                    embryonic_entries: 1,
                    deny_list: 2,
                    deny_hosts: 1,
                    deny_ipv6: 0,
                    node: None,
                },
            },
            Response::FlowList {
                flows: FlowListReport {
                    walk,
                    left_out: 1,
                    flows: vec![FlowEntry {
                        client: IpAddr::from([10, 111, 0, 2]),
                        client_port: 40000,
                        vip: "10.111.100.1:80".into(),
                        proto: Proto::Tcp,
                        backend: IpAddr::from([10, 111, 1, 11]),
                        age_ms: 1500,
                        origin: Origin::Peer,
                    }],
                },
            },
            Response::FlowCount {
                count: FlowCountReport {
                    walk,
                    by: Some(CountBy::Backend),
                    groups: vec![FlowGroup {
                        key: "10.111.1.11".into(),
                        flows: 2,
                    }],
                },
            },
            Response::FlowFlush {
                flush: FlowFlushReport {
                    walk,
                    flushed: 2,
                    delete_ms: 0.25,
                },
            },
            Response::Error {
                message: "unknown VIP".into(),
            },
            Response::DenyList {
                deny: DenyReport {
                    count: 1,
                    capacity: 1 << 20,
                    prefixes: vec!["192.0.2.0/24".parse().unwrap()],
                },
            },
        ] {
            round_trip_response(resp);
        }
    }

    #[test]
    fn wire_format_is_stable() {
        let req = Request::BackendAdd {
            vip: key(),
            backend: IpAddr::from([10, 111, 1, 11]),
            weight: 1,
            backup: false,
            check: CheckPatch::default(),
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"request":"backend_add","vip":{"addr":"10.111.100.1","port":80,"proto":"tcp"},"backend":"10.111.1.11","weight":1}"#
        );
        let summary = VipSummary::from(&VipConfig::new(key(), Forward::Ipip));
        assert_eq!(
            serde_json::to_string(&summary).unwrap(),
            r#"{"vip":"10.111.100.1:80","address":"10.111.100.1","port":80,"proto":"tcp","forward":"ipip","check":{"kind":"tcp","path":"/","port":null,"interval":"1s","timeout":"1s","rise":2,"fall":3,"expect_status":"200-399","expect_body":null,"tls_verify":false,"tls_ca":null,"tls_sni":null,"role":"any","user":null,"database":null,"password_file":null},"backends":[],"icmp_echo":true,"allow_src":[],"deny_src":[],"src_rate":null,"src_burst":null,"vip_rate":null,"vip_burst":null}"#
        );
        // Older CLIs send no `check` and no `icmp_echo`.
        let old = r#"{"request":"vip_add","vip":{"addr":"10.111.100.1","port":80,"proto":"tcp"},"forward":"ipip"}"#;
        assert!(matches!(
            serde_json::from_str::<Request>(old).unwrap(),
            Request::VipAdd { check, icmp_echo: true, .. } if check.is_empty()
        ));
        let old = r#"{"request":"vip_set","vip":{"addr":"10.111.100.1","port":80,"proto":"tcp"},"check":{"rise":3}}"#;
        assert!(matches!(
            serde_json::from_str::<Request>(old).unwrap(),
            Request::VipSet {
                icmp_echo: None,
                ..
            }
        ));
        let report = BackendReport {
            address: IpAddr::from([10, 111, 1, 11]),
            weight: 1,
            state: BackendState::Draining,
            since: "2026-05-20T10:00:00.000Z".into(),
            since_unix_ms: 1_779_271_200_000,
            last_check: None,
            active_flows: 1,
            packets: 2,
            bytes: 3,
            new_flows: 4,
            checks_ok: 5,
            checks_failed: 6,
            backup: false,
            reason: None,
        };
        assert_eq!(
            serde_json::to_string(&report).unwrap(),
            r#"{"address":"10.111.1.11","weight":1,"state":"draining","since":"2026-05-20T10:00:00.000Z","since_unix_ms":1779271200000,"last_check":null,"active_flows":1,"packets":2,"bytes":3,"new_flows":4,"checks_ok":5,"checks_failed":6,"backup":false,"reason":null}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::VipDebug {
                vip: key(),
                on: false
            })
            .unwrap(),
            r#"{"request":"vip_debug","vip":{"addr":"10.111.100.1","port":80,"proto":"tcp"},"on":false}"#
        );
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(
                r#"{"request":"vip_del","vip":{"addr":"10.111.300.1","port":80,"proto":"tcp"}}"#
            )
            .is_err()
        );
    }
}
