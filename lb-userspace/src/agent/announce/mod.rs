//! Route announcement (`--announce-table N`): the agent keeps a blackhole /32 (IPv6: /128) for
//! every VIP address this node should announce in kernel routing table N, marked with a protocol
//! number of its own (`--announce-proto`, default 120), and the node's routing daemon (BIRD 2,
//! FRR) announces the table to the router by BGP, with BFD. The router spreads each VIP over the
//! nodes that announce it (ECMP); a node that stops announcing, or dies, drops out.
//!
//! Parts: `decide` (what is announced: a pure function of attachment, health, drain and start-up),
//! `gate` (the start-up wait: first health checks, peers' flow tables), `routes` (the task that
//! keeps table N equal to the decision, and the start-up check of the table), `daemon` (is BIRD
//! there? `--bird-socket`), `node` (the persisted drain).
//!
//! The serve loop owns the [`Announcer`]: it feeds it health results, sync news and every change
//! of the desired state, and the announcer hands the set of addresses to announce to the route
//! task over a watch channel, so the loop never waits for netlink.

pub(crate) mod daemon;
pub(crate) mod decide;
pub(crate) mod gate;
pub(crate) mod node;
pub(crate) mod routes;

use crate::{
    agent::health::{CheckReport, ProbeTarget},
    api::{AddressReport, DaemonReport, NodeReport},
    netlink::{Netlink, NetlinkError},
    sync::SyncStatus,
    util::unix_ms,
};
use daemon::DaemonStatus;
use decide::{AddressDecision, NodeInputs, VipServing, announced, decide};
use gate::StartGate;
pub(crate) use routes::RouteTable;
use routes::TableState;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Default protocol number of the agent's routes (0x78, "x"): not a kernel `RTPROT_*` value, not
/// in iproute2's rt_protos or FRR's rt_protos.d.
pub(crate) const DEFAULT_PROTO: u8 = 120;
/// After the routes are withdrawn on a stop, the data path keeps serving this long, so what the
/// router sent before it heard the withdrawal (BIRD: 5–20 ms, FRR: under 100 ms) is still
/// forwarded, and the new flows among it still reach the peers.
pub(crate) const WITHDRAW_GRACE: Duration = Duration::from_millis(500);

/// Route protocol numbers that belong to someone else: the kernel's `RTPROT_*` (linux/rtnetlink.h)
/// and FRR's daemons (/etc/iproute2/rt_protos.d/frr.conf). Routes with them would be taken for
/// the kernel's, a daemon's own (BIRD deletes routes of proto 12 it did not write) or a hand-made
/// one (`ip route add` uses 3).
const TAKEN_PROTOS: &[(u8, &str)] = &[
    (0, "unspec"),
    (1, "redirect"),
    (2, "kernel"),
    (3, "boot (ip route add)"),
    (4, "static"),
    (8, "gated"),
    (9, "ra"),
    (10, "mrt"),
    (11, "zebra"),
    (12, "bird"),
    (13, "dnrouted"),
    (14, "xorp"),
    (15, "ntk"),
    (16, "dhcp"),
    (17, "mrouted"),
    (18, "keepalived"),
    (42, "babel"),
    (99, "openr"),
    (186, "FRR bgp"),
    (187, "FRR isis"),
    (188, "FRR ospf"),
    (189, "FRR rip"),
    (190, "FRR ripng"),
    (191, "FRR nhrp"),
    (192, "FRR eigrp"),
    (193, "FRR ldp"),
    (194, "FRR sharp"),
    (195, "FRR pbr"),
    (196, "FRR static"),
    (197, "FRR openfabric"),
];

/// Errors of route announcement, at start and at run time.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AnnounceError {
    #[error(
        "--announce-table {0}: not a routing table for xlb (use 1-4294967295 except 253 default, \
         254 main and 255 local, e.g. 100)"
    )]
    BadTable(u64),
    #[error("--announce-proto {0}: route protocols are 1-255 (default {DEFAULT_PROTO})")]
    BadProto(u64),
    #[error(
        "--announce-proto {proto}: route protocol {proto} is {owner}'s; pick a number of xlb's own (default {DEFAULT_PROTO})"
    )]
    TakenProto { proto: u8, owner: &'static str },
    #[error(
        "--announce-proto and --bird-socket need --announce-table (route announcement is off without it)"
    )]
    WithoutTable,
    #[error(
        "an ip rule looks up routing table {table}: this host's own traffic to a VIP would hit \
         the blackhole routes xlb keeps there; give --announce-table a table no rule uses"
    )]
    RuleUsesTable { table: u32 },
    #[error(
        "routing table {table} holds {count} route(s) that are not xlb's, e.g. `{route}`: xlb \
         keeps nothing but its own routes in its table (the routing daemon announces whatever is \
         there); give --announce-table a table of its own, or empty it (`ip route flush table {table}`)"
    )]
    Foreign {
        table: u32,
        route: String,
        count: usize,
    },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Node(#[from] node::NodeFileError),
    #[error("route announcement is off on this agent (start it with --announce-table)")]
    Off,
    #[error("the node is already drained (since {0})")]
    AlreadyDrained(String),
    #[error("the node is not drained")]
    NotDrained,
    #[error("recording the announcement with the data path: {0}")]
    Record(String),
}

/// `--announce-table`, `--announce-proto`, `--bird-socket`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AnnounceConfig {
    pub(crate) table: u32,
    pub(crate) proto: u8,
    pub(crate) bird_socket: Option<PathBuf>,
}

impl AnnounceConfig {
    /// Check the options; `None` without a table (announcement off).
    pub(crate) fn from_options(
        table: Option<u64>,
        proto: Option<u64>,
        bird_socket: Option<PathBuf>,
    ) -> Result<Option<Self>, AnnounceError> {
        let Some(table) = table else {
            return match (proto, bird_socket) {
                (None, None) => Ok(None),
                _ => Err(AnnounceError::WithoutTable),
            };
        };
        let table = u32::try_from(table)
            .ok()
            .filter(|t| !matches!(t, 0 | 253..=255))
            .ok_or(AnnounceError::BadTable(table))?;
        let proto = match proto {
            None => DEFAULT_PROTO,
            Some(p) => u8::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or(AnnounceError::BadProto(p))?,
        };
        if let Some((_, owner)) = TAKEN_PROTOS.iter().find(|(n, _)| *n == proto) {
            return Err(AnnounceError::TakenProto { proto, owner });
        }
        Ok(Some(AnnounceConfig {
            table,
            proto,
            bird_socket,
        }))
    }

    pub(crate) fn route_table(&self) -> RouteTable {
        RouteTable {
            table: self.table,
            proto: self.proto,
        }
    }
}

/// Check the table before anything visible changes (see `routes::check_table`), and say once
/// what the routing daemon must do.
/// `earlier` is the announcement recorded with the data path this agent is about to take over:
/// its routes are not foreign (the start-up withdraws them if the protocol changed).
/// The drain file in `state_dir` is read too: a corrupt one stops the agent here, before the data
/// path changes.
pub(crate) async fn check(
    config: &AnnounceConfig,
    earlier: Option<RouteTable>,
    state_dir: &std::path::Path,
) -> Result<(), AnnounceError> {
    node::load(&state_dir.join(node::NODE_FILE))?;
    let nl = Netlink::connect_strict()?;
    routes::check_table(&nl, config.route_table(), earlier).await?;
    if config.bird_socket.is_none() {
        log::info!(
            "announcing VIP addresses through routing table {} (blackhole /32 or /128, proto {}); the \
             node's routing daemon must import that table (contrib/bird, contrib/frr); \
             --bird-socket lets xlb check that BIRD runs",
            config.table,
            config.proto
        );
    }
    Ok(())
}

/// Settle the routes of the data path the agent just went live with (pinned in `pin_dir`; taken
/// over from an earlier agent if `adopted`), before the announcer starts:
/// - routes the earlier agent recorded for another table or protocol (or announcement is off
///   now) are withdrawn: nobody else would ever remove them;
/// - with announcement on, the table and protocol are recorded with the data path (for `xlb
///   detach` and the next agent);
/// - the addresses of ours already in the table are returned when the data path was taken over
///   with the same table and protocol: the announcer keeps them announced through the start-up
///   (no flap on a restart) as long as they qualify otherwise. Any other route of ours found
///   there is stale (its data path is gone) and the route task withdraws it.
pub(crate) async fn prepare(
    config: Option<&AnnounceConfig>,
    pin_dir: Option<&std::path::Path>,
    adopted: bool,
) -> Result<BTreeSet<IpAddr>, AnnounceError> {
    let Some(pin_dir) = pin_dir else {
        return Ok(BTreeSet::new());
    };
    let recorded = crate::dataplane::announced_routes(pin_dir)
        .map(|(table, proto)| RouteTable { table, proto });
    let current = config.map(AnnounceConfig::route_table);
    if let Some(old) = recorded.filter(|old| Some(*old) != current) {
        let n = withdraw_recorded(old).await?;
        log::info!(
            "withdrew {n} VIP route(s) an earlier agent left in routing table {} (proto {}): this \
             agent {}",
            old.table,
            old.proto,
            match current {
                Some(t) => format!("announces in table {} with proto {}", t.table, t.proto),
                None => "does not announce".to_string(),
            }
        );
    }
    crate::dataplane::record_routes(pin_dir, current.map(|t| (t.table, t.proto)))
        .map_err(|e| AnnounceError::Record(e.to_string()))?;
    let Some(current) = current else {
        return Ok(BTreeSet::new());
    };
    if !adopted || recorded != Some(current) {
        return Ok(BTreeSet::new());
    }
    let nl = Netlink::connect_strict()?;
    Ok(routes::table_routes(&nl, current)
        .await?
        .iter()
        .filter(|r| r.protocol == current.proto)
        .filter_map(crate::netlink::TableRoute::blackhole_host)
        .collect())
}

/// Remove every route of protocol `t.proto` from table `t.table` (a data path's recorded
/// announcement, when it is removed without its agent); how many there were.
pub(crate) async fn withdraw_recorded(t: RouteTable) -> Result<usize, AnnounceError> {
    let nl = Netlink::connect_strict()?;
    routes::withdraw_all(&nl, t).await
}

/// The route task as the agent's shutdown sees it: withdraw everything, or leave it.
pub(crate) struct RouteControl {
    table: RouteTable,
    withdraw: CancellationToken,
    task: JoinHandle<()>,
    state: Arc<Mutex<TableState>>,
}

impl RouteControl {
    /// Whether anything of ours is in the table (as last seen).
    pub(crate) fn announcing(&self) -> bool {
        !self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .present
            .is_empty()
    }

    /// The agent stops and leaves the data path serving: its routes stay with it (the route task
    /// has ended without touching them). Says so.
    pub(crate) fn stay(self) {
        let n = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .present
            .len();
        if n > 0 {
            log::info!(
                "{n} VIP address(es) stay announced in routing table {}: the data path keeps \
                 serving them; the next agent takes them over, `xlb detach` withdraws them",
                self.table.table
            );
        }
    }

    /// Withdraw every VIP before the agent goes: the route task removes our routes and ends
    /// (at most `wait`); then, whatever it managed, the table is listed and emptied of ours
    /// directly. How many routes the last step still found.
    pub(crate) async fn withdraw(self, wait: Duration) -> Result<usize, AnnounceError> {
        self.withdraw.cancel();
        let _ = tokio::time::timeout(wait, self.task).await;
        let nl = Netlink::connect_strict()?;
        routes::withdraw_all(&nl, self.table).await
    }
}

/// What the serve loop reads from the controller for each decision.
pub(crate) struct NodeView {
    pub(crate) attached: bool,
    pub(crate) vips: Vec<VipServing>,
}

/// The announcement as the serve loop drives it.
pub(crate) struct Announcer {
    config: AnnounceConfig,
    node_file: PathBuf,
    /// Since when the node is drained (unix ms), if it is.
    drained: Option<u64>,
    gate: StartGate,
    sync: Option<SyncStatus>,
    want: watch::Sender<BTreeSet<IpAddr>>,
    table: Arc<Mutex<TableState>>,
    daemon: watch::Receiver<Option<DaemonStatus>>,
    decisions: BTreeMap<IpAddr, AddressDecision>,
    attached: bool,
    /// Addresses announced when the agent took the data path over, while they stay announced
    /// and the node starts: the start-up does not withdraw them.
    adopted: BTreeSet<IpAddr>,
}

/// Everything `Announcer::start` needs besides the configuration.
pub(crate) struct AnnounceStart<'a> {
    pub(crate) state_dir: &'a std::path::Path,
    pub(crate) targets: &'a [ProbeTarget],
    pub(crate) sync: Option<SyncStatus>,
    pub(crate) peers: &'a [SocketAddr],
    pub(crate) cancel: &'a CancellationToken,
    pub(crate) tasks: &'a TaskTracker,
    /// Our routes found in the table of a data path taken over (see [`prepare`]).
    pub(crate) adopted: BTreeSet<IpAddr>,
}

impl Announcer {
    /// Read the persisted drain, start the route task (which first removes routes of ours that
    /// an earlier run left, except the `adopted` ones: nothing new is announced while the node
    /// starts) and, with `--bird-socket`, the daemon probe.
    pub(crate) fn start(
        config: AnnounceConfig,
        s: AnnounceStart<'_>,
    ) -> Result<(Announcer, RouteControl), AnnounceError> {
        let node_file = s.state_dir.join(node::NODE_FILE);
        let drained = node::load(&node_file)?;
        if let Some(since) = drained {
            log::warn!(
                "the node is drained (since {}, `xlb node undrain` ends it): no VIP is announced",
                rfc3339(since)
            );
        }
        // The route task's first pass keeps the adopted routes; the serve loop's first decision
        // follows at once and withdraws those that no longer qualify.
        let (want, want_rx) = watch::channel(s.adopted.clone());
        let table = Arc::new(Mutex::new(TableState::default()));
        let withdraw = CancellationToken::new();
        let task = s.tasks.spawn(routes::keep(
            Netlink::connect_strict()?,
            config.route_table(),
            want_rx,
            table.clone(),
            withdraw.clone(),
            s.cancel.child_token(),
        ));
        let (daemon_tx, daemon) = watch::channel(None);
        if let Some(socket) = &config.bird_socket {
            s.tasks.spawn(daemon::watch(
                socket.clone(),
                config.table,
                daemon_tx,
                s.cancel.child_token(),
            ));
        }
        let control = RouteControl {
            table: config.route_table(),
            withdraw,
            task,
            state: table.clone(),
        };
        let mut gate = StartGate::new(Instant::now(), s.targets, s.peers);
        if let Some(sync) = &s.sync {
            gate.peers(&sync.startup());
        }
        let announcer = Announcer {
            config,
            node_file,
            drained,
            gate,
            sync: s.sync,
            want,
            table,
            daemon,
            decisions: BTreeMap::new(),
            attached: false,
            adopted: s.adopted,
        };
        Ok((announcer, control))
    }

    /// Decide again and hand the result to the route task; each address whose announcement
    /// changes is logged with the reason.
    pub(crate) fn refresh(&mut self, view: NodeView) {
        self.attached = view.attached;
        let starting = self.gate.waiting_for(Instant::now());
        if starting.is_none() {
            self.adopted.clear();
        }
        let decisions = decide(&NodeInputs {
            attached: view.attached,
            drained: self.drained.is_some(),
            starting,
            adopted: self.adopted.clone(),
            vips: view.vips,
        });
        // An adopted address withdrawn once is new again: it waits for the start-up.
        self.adopted
            .retain(|a| decisions.get(a).is_some_and(AddressDecision::announced));
        for (addr, d) in &decisions {
            let before = self.decisions.get(addr).map(AddressDecision::announced);
            match (before, &d.withheld) {
                (None, None) if self.adopted.contains(addr) => log::info!(
                    "keeping {addr} announced (taken over with the data path): {} serving \
                     backend(s) over {} VIP(s)",
                    d.serving,
                    d.vips.len()
                ),
                (Some(false) | None, None) => log::info!(
                    "announcing {addr}: {} serving backend(s) over {} VIP(s)",
                    d.serving,
                    d.vips.len()
                ),
                (Some(true), Some(why)) => log::warn!("withdrawing {addr}: {why}"),
                _ => {}
            }
        }
        for addr in self.decisions.keys() {
            if !decisions.contains_key(addr) && self.decisions[addr].announced() {
                log::info!("withdrawing {addr}: no VIP on it any more");
            }
        }
        let wanted: BTreeSet<IpAddr> = announced(&decisions).into_iter().collect();
        self.want.send_if_modified(|w| {
            let changed = *w != wanted;
            *w = wanted;
            changed
        });
        self.decisions = decisions;
    }

    /// A health result reached the loop (the start-up gate counts first results).
    pub(crate) fn health_result(&mut self, report: &CheckReport) {
        self.gate
            .health_result(report.key, report.addr, report.generation);
    }

    /// The sync's peer news (call after [`Announcer::peers_changed`] resolved).
    pub(crate) fn peers_update(&mut self) {
        if let Some(sync) = &self.sync {
            self.gate.peers(&sync.startup());
        }
    }

    /// Resolves when the sync's view of the peers may have changed; never without sync or once
    /// the node has started.
    pub(crate) async fn peers_changed(&self) {
        match &self.sync {
            Some(sync) if !self.gate.is_finished() => sync.changed().await,
            _ => std::future::pending().await,
        }
    }

    /// The next moment the start-up may end by time alone; `None` once started.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.gate.next_deadline(Instant::now())
    }

    /// End the start-up if nothing is left to wait for; true when it just ended (the caller
    /// refreshes).
    pub(crate) fn try_finish_start(&mut self) -> bool {
        match self.gate.finish(Instant::now()) {
            Some(lines) => {
                for l in lines {
                    log::info!("{l}");
                }
                true
            }
            None => false,
        }
    }

    /// `xlb node drain`: persisted first, then every address is withdrawn (the caller refreshes).
    pub(crate) fn drain(&mut self) -> Result<String, AnnounceError> {
        if let Some(since) = self.drained {
            return Err(AnnounceError::AlreadyDrained(rfc3339(since)));
        }
        let now = unix_ms(SystemTime::now());
        node::save(&self.node_file, Some(now))?;
        self.drained = Some(now);
        let n = announced(&self.decisions).len();
        Ok(format!(
            "node drained: {n} VIP address(es) withdrawn from routing table {}; the data path keeps serving what still arrives",
            self.config.table
        ))
    }

    /// `xlb node undrain`: persisted first, then the addresses are announced again as they
    /// qualify (the caller refreshes).
    pub(crate) fn undrain(&mut self) -> Result<String, AnnounceError> {
        if self.drained.is_none() {
            return Err(AnnounceError::NotDrained);
        }
        node::save(&self.node_file, None)?;
        self.drained = None;
        Ok("node undrained: VIP addresses with a serving backend are announced again".into())
    }

    /// `xlb node status`: what is announced and why (or why not).
    pub(crate) fn report(&self) -> NodeReport {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let now = Instant::now();
        NodeReport {
            table: self.config.table,
            proto: self.config.proto,
            attached: self.attached,
            drained: self.drained.is_some(),
            drained_since_unix_ms: self.drained,
            starting: self
                .gate
                .waiting_for(now)
                .map(|s| decide::Withheld::Starting(s).to_string()),
            table_error: table.error.clone(),
            routing_daemon: self.daemon.borrow().as_ref().map(|d| DaemonReport {
                socket: d.socket.clone(),
                answers: d.answers,
                detail: d.detail.clone(),
                checked_unix_ms: unix_ms(d.at),
            }),
            addresses: self
                .decisions
                .iter()
                .map(|(addr, d)| AddressReport {
                    address: *addr,
                    announced: d.announced(),
                    in_table: table.present.contains(addr),
                    reason: d.withheld.map(|w| w.to_string()),
                    vips: d.vips.iter().map(ToString::to_string).collect(),
                    serving_backends: d.serving,
                })
                .collect(),
        }
    }
}

/// A unix-ms time as RFC 3339, for messages.
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_with_one_line_reasons() {
        let cfg = |t, p| AnnounceConfig::from_options(t, p, None);
        assert_eq!(cfg(None, None).unwrap(), None);
        let on = cfg(Some(100), None).unwrap().unwrap();
        assert_eq!((on.table, on.proto), (100, DEFAULT_PROTO));
        assert_eq!(
            cfg(Some(4_294_967_295), Some(77)).unwrap().unwrap().proto,
            77
        );
        for bad in [0, 253, 254, 255, 4_294_967_296] {
            let e = cfg(Some(bad), None).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--announce-table {bad}:")), "{e}");
            assert!(!e.contains('\n'));
        }
        for (p, owner) in [(12, "bird"), (3, "boot"), (186, "FRR bgp")] {
            let e = cfg(Some(100), Some(p)).unwrap_err().to_string();
            assert!(e.contains(owner), "{e}");
        }
        assert!(matches!(
            cfg(Some(100), Some(256)),
            Err(AnnounceError::BadProto(256))
        ));
        assert!(matches!(
            cfg(None, Some(120)),
            Err(AnnounceError::WithoutTable)
        ));
        assert!(matches!(
            AnnounceConfig::from_options(None, None, Some("/run/bird/bird.ctl".into())),
            Err(AnnounceError::WithoutTable)
        ));
    }
}
