//! `xlb agent`: attaches the data path, installs the desired state, and serves the CLI on a Unix
//! socket until `shutdown` resolves.
//!
//! Parts: `options` and `config_file` (what to run), `server` (the serve loop, which owns the
//! `controller` and with it the data path), `socket` (the CLI's connections), `health` (checks),
//! `state` (desired state and its file), `metrics` (`/metrics`), `neighbours` (ARP warm-up).
//!
//! Tasks: one cancellation tree. Every task the agent starts (CLI connections, health checks,
//! peer sync, the metrics server and its connections) runs on one `TaskTracker` and ends when
//! the agent's `CancellationToken` (or a child of it) is cancelled. Shutdown: cancel the token,
//! which ends the serve loop (it hands the controller back); wait for the tracker; remove the
//! socket file; drop the controller. The data path is pinned in bpffs and keeps serving: only
//! `xlb detach` (or `--detach-on-exit`) removes it, after every task has ended.
//!
//! Start-up takes over the data path that runs on the interface, if any (`Dataplane::load`):
//! its flows, counters and ring state stay, the desired state is reconciled into its maps by
//! difference, and this build's program is swapped in (`go_live`); then systemd hears READY=1.

pub(crate) mod announce;
pub(crate) mod config_file;
pub(crate) mod controller;
pub(crate) mod deny;
pub(crate) mod flow_query;
pub(crate) mod flows;
pub(crate) mod health;
pub(crate) mod metrics;
pub(crate) mod neighbours;
pub(crate) mod options;
pub(crate) mod report;
pub(crate) mod server;
pub(crate) mod socket;
pub(crate) mod state;

use crate::{
    agent::{
        announce::{AnnounceError, AnnounceStart, Announcer, RouteControl, WITHDRAW_GRACE},
        controller::{Controller, ControllerError},
        deny::{DENY_FILE, DenyError, DenyList},
        flow_query::FlowQueries,
        flows::FlowCounter,
        health::{HealthError, Monitor},
        metrics::{MetricsError, SCRAPE_QUEUE},
        options::{AgentConfig, InitialState},
        server::{DenyLink, Inputs, Server, Stop, SyncLink},
        socket::{SocketError, SocketFile, bind_socket},
        state::{DesiredState, STATE_FILE, StateError},
    },
    dataplane::{Dataplane, DataplaneError, DataplaneOptions, Startup},
    netlink::{Netlink, NetlinkError},
    sync::{self, RingBufSource, SYNC_REQUEST_QUEUE, SyncError},
    util::{NoSuchInterface, interface_index, os_message},
};
use std::{
    fs,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::DirBuilderExt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Default path of the agent's socket (`--socket`, `XLB_SOCKET`).
pub(crate) const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
/// Default directory of the persisted state (`--state-dir`, `XLB_STATE_DIR`).
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/xlb";
/// How often backend neighbour entries are refreshed (well under the kernel's default
/// `base_reachable_time` of 30 s, so an entry in use never has to be resolved from scratch).
pub(crate) const WARM_INTERVAL: Duration = Duration::from_secs(10);
/// How long shutdown waits for the agent's tasks (a CLI connection finishing its current request,
/// a peer connection closing).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// After `xlb detach` is accepted, how long the agent waits before it closes the connections, so
/// the answer reaches the CLI.
const DETACH_ANSWER: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    #[error(transparent)]
    NoSuchInterface(#[from] NoSuchInterface),
    #[error("interface {0} has no IPv4 address to use as the IPIP source; pass --lb-addr")]
    NoLbAddress(String),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot create state directory {}: {}", path.display(), os_message(source))]
    StateDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Dataplane(Box<DataplaneError>),
    #[error("installing the desired state failed: {0}")]
    Install(#[from] ControllerError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error("peer sync: {0}")]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot handle SIGHUP: {0}")]
    Signal(io::Error),
    #[error("the saved deny list: {0}")]
    Deny(#[from] DenyError),
    #[error(transparent)]
    Announce(#[from] AnnounceError),
}

impl From<DataplaneError> for AgentError {
    fn from(e: DataplaneError) -> Self {
        AgentError::Dataplane(Box::new(e))
    }
}

/// Run the agent until `shutdown` resolves. Returns after every task of the agent ended and the
/// socket file is removed; the data path keeps serving unless a detach was asked for.
pub(crate) async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    // Checked first so a typo fails before anything is created or attached.
    interface_index(&config.iface)?;
    if let Some(announce) = &config.announce {
        announce::check(announce, recorded_announcement(&config), &config.state_dir).await?;
    }
    let cancel = CancellationToken::new();
    let detach = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut routes = None;
    let result = match start(&config, &cancel, &detach, &tasks).await {
        Ok((server, socket_file, route_control)) => {
            routes = route_control;
            let stop = async {
                tokio::select! {
                    () = shutdown => {
                        // A plain stop leaves the data path serving, and with it the routes:
                        // the router keeps sending, the data path keeps steering, and the next
                        // agent adopts both. Only a stop that removes the data path withdraws.
                        if config.detach_on_exit {
                            withdraw(routes.take(), WITHDRAW_GRACE).await;
                        }
                        cancel.cancel();
                    }
                    () = detach.cancelled() => {
                        // `xlb detach`: the routes go first, while the data path still serves
                        // (and syncs) what the router sends until it hears of it; at least a
                        // moment for the answer to reach the CLI before the connections close.
                        if !withdraw(routes.take(), WITHDRAW_GRACE).await {
                            tokio::time::sleep(DETACH_ANSWER).await;
                        }
                        cancel.cancel();
                    }
                    () = cancel.cancelled() => {}
                }
            };
            let ((controller, stop), ()) = tokio::join!(server.run(), stop);
            Ok((controller, stop, socket_file))
        }
        Err(e) => Err(e),
    };
    // Also after a failed start: the tasks started before the failure end here.
    cancel.cancel();
    tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait())
        .await
        .is_err()
    {
        log::warn!(
            "{} tasks still running {DRAIN_TIMEOUT:?} after the shutdown",
            tasks.len()
        );
    }
    let (mut controller, stop, socket_file) = result?;
    // The socket first, so no CLI connects to an agent that is going away.
    drop(socket_file);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if stop == Stop::Detach || config.detach_on_exit {
        // Whatever stopped the loop, no route may outlive the data path it points at.
        withdraw(routes.take(), Duration::ZERO).await;
        let message = controller.dataplane_mut().detach()?;
        log::info!("stopped; {message}");
    } else {
        if let Some(routes) = routes.take() {
            routes.stay();
        }
        log::info!(
            "stopped; the data path on {} keeps serving (`xlb detach --iface {}` removes it)",
            config.iface,
            config.iface
        );
    }
    Ok(())
}

/// Withdraw every announced VIP address (if the agent announces): the route task removes its
/// routes, then the table is checked for any left; then the data path serves for `grace` more
/// (only if something was announced). Whether it waited.
async fn withdraw(routes: Option<RouteControl>, grace: Duration) -> bool {
    let Some(routes) = routes else { return false };
    let announcing = routes.announcing();
    match routes.withdraw(Duration::from_secs(2)).await {
        Ok(0) => log::info!("withdrew every VIP address from the routing table"),
        Ok(n) => {
            log::info!("withdrew every VIP address from the routing table ({n} left over removed)")
        }
        Err(e) => log::error!("withdrawing the VIP addresses failed: {e}"),
    }
    if announcing && !grace.is_zero() {
        tokio::time::sleep(grace).await;
        return true;
    }
    false
}

/// The announcement recorded with the data path this agent will take over, if one is pinned
/// (read only: nothing is mounted or created).
fn recorded_announcement(config: &AgentConfig) -> Option<announce::RouteTable> {
    let root = crate::dataplane::pins::existing_root(&config.bpffs).ok()?;
    let dir = root.join(crate::dataplane::pins::dir_name(
        crate::dataplane::pins::netns_cookie().ok()?,
        interface_index(&config.iface).ok()?,
    ));
    crate::dataplane::announced_routes(&dir)
        .map(|(table, proto)| announce::RouteTable { table, proto })
}

/// Where the initial desired state comes from, and its name for the log.
fn initial_state(config: &AgentConfig) -> Result<(DesiredState, String), AgentError> {
    let state_path = config.state_dir.join(STATE_FILE);
    Ok(match &config.initial {
        InitialState::Config { path, state } => {
            (state.clone(), format!("config file {}", path.display()))
        }
        InitialState::Saved => match state::load(&state_path)? {
            Some(state) => (state, format!("state file {}", state_path.display())),
            None => (
                DesiredState::default(),
                "nothing (no --config, no saved state)".to_string(),
            ),
        },
    })
}

/// Everything up to the serve loop, in an order that fails before anything visible changes:
/// socket and metrics port bound before the data path is loaded (a second agent with the same
/// socket fails there; one with another socket at the data path's lock), the data path loaded
/// (taking over the running one: nothing changes for traffic yet), peer sync started, the desired
/// state reconciled into the maps, and only then the new program swapped in (or attached).
async fn start(
    config: &AgentConfig,
    cancel: &CancellationToken,
    detach: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<(Server<Dataplane>, SocketFile, Option<RouteControl>), AgentError> {
    let started = Instant::now();
    let (initial, source) = initial_state(config)?;
    let health = Monitor::new(cancel.child_token(), tasks.clone())?;
    let hangups = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;
    let (listener, socket_file) = bind_socket(&config.socket)?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&config.state_dir)
        .map_err(|source| AgentError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
    // The deny list goes into the data path before it serves: a restarted agent never lets in,
    // even for a moment, what the list keeps out.
    let deny_path = config.state_dir.join(DENY_FILE);
    let deny = deny::load_file(&deny_path)?;
    let (mut dp, startup) = load_dataplane(config, deny.clone()).await?;
    for line in &startup.copies {
        log::info!("upgrade: {line}");
    }
    let pin_dir = dp
        .pin_dir()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned());
    let deny_count = deny.len();
    if deny_count > 0 {
        log::info!(
            "deny list: {deny_count} prefixes from {}",
            deny_path.display()
        );
    }
    let deny = DenyList::new(Box::new(dp.deny_maps()?), dp.deny_live(), deny, deny_path);
    let flows = FlowCounter::new(Arc::new(dp.flow_table()?), tasks.clone());
    let queries = FlowQueries::new(Arc::new(dp.flow_table()?), tasks.clone());
    let sync = match config.sync.clone() {
        Some(sync_config) => Some(start_sync(sync_config, &mut dp, cancel, tasks).await?),
        None => None,
    };
    let scrapes = metrics_listener.map(|listener| {
        let addr = listener.local_addr().ok();
        let (scrape_tx, scrapes) = mpsc::channel(SCRAPE_QUEUE);
        let status = sync.as_ref().map(|s: &SyncLink| s.status.clone());
        tasks.spawn(metrics::serve(
            listener,
            scrape_tx,
            status,
            flows.clone(),
            cancel.child_token(),
            tasks.clone(),
        ));
        if let Some(addr) = addr {
            log::info!("serving Prometheus metrics on http://{addr}/metrics");
        }
        scrapes
    });
    let mut controller = Controller::start(
        dp,
        config.state_dir.join(STATE_FILE),
        initial,
        &startup.down,
    )?;
    controller.set_deny_count(deny.count());
    log::info!(
        "desired state from {source}: {} VIPs, {} backends",
        controller.state().vip_count(),
        controller.state().backend_count()
    );
    controller.dataplane_mut().go_live(config.xdp_mode)?;
    let dp = controller.dataplane_mut();
    log::info!(
        "{} the data path on {} in {} mode (pinned at {}; flow table {} entries) in {:.0} ms",
        if startup.adopted {
            "took over"
        } else {
            "attached"
        },
        config.iface,
        dp.mode()
            .map_or_else(|| "unknown".to_string(), |m| m.to_string()),
        dp.pin_dir()
            .map_or_else(String::new, |d| d.display().to_string()),
        dp.flow_capacity(),
        started.elapsed().as_secs_f64() * 1e3,
    );
    let pin_path = controller
        .dataplane_mut()
        .pin_dir()
        .map(std::path::Path::to_path_buf);
    let adopted = announce::prepare(
        config.announce.as_ref(),
        pin_path.as_deref(),
        startup.adopted,
    )
    .await?;
    let (announce, routes) = match &config.announce {
        Some(announce) => {
            let peers = config.sync.as_ref().map_or(&[][..], |s| &s.peers[..]);
            let (a, r) = Announcer::start(
                announce.clone(),
                AnnounceStart {
                    state_dir: &config.state_dir,
                    targets: &controller.probe_targets(),
                    sync: sync.as_ref().map(|s| s.status.clone()),
                    peers,
                    cancel,
                    tasks,
                    adopted,
                },
            )?;
            (Some(a), Some(r))
        }
        None => (None, None),
    };
    log::info!("listening on {}", config.socket.display());
    let config_path = match &config.initial {
        InitialState::Config { path, .. } => Some(path.clone()),
        InitialState::Saved => None,
    };
    let inputs = Inputs {
        health,
        sync,
        scrapes,
        flows,
        queries,
        warm_interval: config.warm_interval,
        config: config_path,
        hangups: Some(hangups),
        pin_dir,
        watchdog: sd_notify::watchdog_enabled(),
        deny: Some(DenyLink::new(deny)),
        detach: detach.clone(),
        announce,
    };
    let vips = controller.state().vip_count();
    let server = Server::new(controller, listener, inputs, cancel.clone(), tasks.clone());
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving {vips} VIPs on {}", config.iface)),
    ]);
    Ok((server, socket_file, routes))
}

/// The outer source of IPIP packets: `--lb-addr`, else the interface's first IPv4 address.
async fn lb_address(iface: &str, given: Option<Ipv4Addr>) -> Result<Ipv4Addr, AgentError> {
    if let Some(addr) = given {
        return Ok(addr);
    }
    let index = interface_index(iface)?;
    let addrs = Netlink::connect()?.ipv4_addrs_of(index).await?;
    addrs
        .first()
        .copied()
        .ok_or_else(|| AgentError::NoLbAddress(iface.to_string()))
}

/// The outer source of IPv6-in-IPv6 and IPv4-in-IPv6 packets: `--lb-addr6`, else the
/// interface's first global IPv6 address, else none (`ipip` to IPv6 backends is then refused
/// by the data path, and logged here).
async fn lb_address6(iface: &str, given: Option<Ipv6Addr>) -> Result<Option<Ipv6Addr>, AgentError> {
    if given.is_some() {
        return Ok(given);
    }
    let index = interface_index(iface)?;
    let addrs = Netlink::connect()?.addrs().await?;
    Ok(addrs
        .into_iter()
        .filter(|a| a.index == index && !a.link_local)
        .find_map(|a| match a.addr {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        }))
}

async fn load_dataplane(
    config: &AgentConfig,
    deny: Vec<crate::model::net::IpNet>,
) -> Result<(Dataplane, Startup), AgentError> {
    let lb_addr = lb_address(&config.iface, config.lb_addr).await?;
    let lb_addr6 = lb_address6(&config.iface, config.lb_addr6).await?;
    let (mut dp, startup) = Dataplane::load(&DataplaneOptions {
        iface: config.iface.clone(),
        mode: config.xdp_mode,
        flow_capacity: config.flow_capacity,
        embryo_capacity: config.embryonic_capacity,
        lb_addr,
        lb_addr6,
        bpffs: config.bpffs.clone(),
        deny,
    })
    .await?;
    if !config.icmp_echo {
        dp.set_icmp_echo(false)?;
        log::info!("ICMP echo to VIP addresses is off (--icmp-echo off)");
    }
    match lb_addr6 {
        Some(a) => log::info!("IPv6 tunnel (ip6ip6, 4in6) source {a}"),
        None => log::info!(
            "no IPv6 address on {} and no --lb-addr6: ipip to IPv6 backends is dropped",
            config.iface
        ),
    }
    log::info!(
        "IPIP source {lb_addr}, embryonic table {} entries",
        dp.embryo_capacity()
    );
    Ok((dp, startup))
}

/// Start peer sync on the data path's flow events (taken before the data path moves into the
/// serve loop).
async fn start_sync(
    config: sync::SyncConfig,
    dp: &mut Dataplane,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<SyncLink, AgentError> {
    let events = RingBufSource::new(dp.take_flow_events()?)?;
    // Peers send this node their flows from now on: a packet of a flow not (yet) known waits
    // for a peer's record before it is steered blind.
    dp.hold_midflow_misses(true)?;
    let (request_tx, requests) = mpsc::channel(SYNC_REQUEST_QUEUE);
    let (listen, peers) = (config.listen, config.peers.len());
    let handle = sync::spawn(config, events, request_tx, cancel.child_token(), tasks).await?;
    log::info!("peer sync listening on {listen}, streaming to {peers} peer(s)");
    Ok(SyncLink {
        requests,
        status: handle.status(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        agent::{controller::fake::FakeDataplane, flows::tests::FakeTable},
        api::{Request, Response},
        cli::client,
        model::{Forward, Proto, ServiceKey, policy::PolicyPatch},
    };
    use std::net::IpAddr;
    use tokio::{
        io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
        net::UnixStream,
    };

    fn key() -> ServiceKey {
        ServiceKey {
            addr: IpAddr::from([10, 111, 100, 1]),
            port: 80,
            proto: Proto::Tcp,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_cli_requests_and_shuts_down_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("xlb.sock");
        let (listener, guard) = bind_socket(&sock).unwrap();
        let ctl = Controller::start(
            FakeDataplane::default(),
            dir.path().join(STATE_FILE),
            DesiredState::default(),
            &Default::default(),
        )
        .unwrap();
        let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
        let inputs = Inputs {
            health: Monitor::new(cancel.child_token(), tasks.clone()).unwrap(),
            sync: None,
            scrapes: None,
            flows: FlowCounter::new(FakeTable::new(0, Duration::ZERO), tasks.clone()),
            queries: FlowQueries::new(FakeTable::new(0, Duration::ZERO), tasks.clone()),
            warm_interval: Duration::from_secs(3600),
            config: None,
            hangups: None,
            pin_dir: None,
            watchdog: None,
            deny: None,
            detach: CancellationToken::new(),
            announce: None,
        };
        let serving = Server::new(ctl, listener, inputs, cancel.clone(), tasks.clone());
        let server = tokio::spawn(async move {
            let (ctl, _) = serving.run().await;
            tasks.close();
            tasks.wait().await;
            drop(guard);
            ctl
        });

        let s = sock.clone();
        let results = tokio::task::spawn_blocking(move || {
            let add = client::call(
                &s,
                &Request::VipAdd {
                    vip: key(),
                    forward: Forward::L2,
                    check: Default::default(),
                    icmp_echo: true,
                    policy: PolicyPatch::default(),
                },
            );
            let dup = client::call(
                &s,
                &Request::VipAdd {
                    vip: key(),
                    forward: Forward::L2,
                    check: Default::default(),
                    icmp_echo: true,
                    policy: PolicyPatch::default(),
                },
            );
            let list = client::call(&s, &Request::VipList);
            (add, dup, list)
        })
        .await
        .unwrap();
        assert!(matches!(results.0, Ok(Response::Done { .. })));
        assert_eq!(
            results.1.unwrap_err().to_string(),
            "VIP 10.111.100.1:80/tcp already exists"
        );
        match results.2.unwrap() {
            Response::VipList { vips } => assert_eq!(vips.len(), 1),
            other => panic!("{other:?}"),
        }

        // A garbage line gets an error line back, not a dropped connection.
        let mut raw = UnixStream::connect(&sock).await.unwrap();
        raw.write_all(b"hello\n").await.unwrap();
        let mut answer = String::new();
        BufReader::new(&mut raw)
            .read_line(&mut answer)
            .await
            .unwrap();
        assert!(answer.contains("malformed request"), "{answer}");

        // An idle open connection must not keep the agent from stopping.
        cancel.cancel();
        let ctl = tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("agent stops promptly")
            .unwrap();
        assert!(!sock.exists(), "socket file removed");
        assert_eq!(ctl.dataplane().applied.len(), 1);
        drop(raw);
    }
}
