//! `xlb agent`: attaches the data path, installs the desired state, and serves the CLI on a Unix
//! socket until `shutdown` resolves.
//!
//! Task structure (as in tokio-rs/mini-redis): the `Controller` — and with it the `Dataplane` — is
//! owned by the `serve` loop itself, never shared, so requests are applied strictly one at a time
//! and the data path needs no lock (nor `Send`). Each connection gets a task that parses lines
//! and forwards requests to the loop over a channel. Shutdown: stop accepting, tell the connection
//! tasks, wait for them, then drop the listener's socket file and the data path (which detaches
//! the XDP program).
//!
//! Health checks run as tokio tasks (`health::Monitor`, one per checked backend); their results
//! arrive on a channel that the same loop serves, so health changes and CLI requests are applied
//! to the controller one at a time. After every change of desired state the monitor is synced
//! with the controller's probe targets.

use crate::{
    api::{MAX_LINE, Request, Response},
    client::os_message,
    config::{Config, ConfigError},
    controller::{Controller, ControllerError, DataplaneOps},
    dataplane::{Dataplane, DataplaneError, DataplaneOptions, XdpModeChoice},
    health::{CheckReport, HealthError, Monitor},
    metrics::{self, MetricsError, SCRAPE_QUEUE, StatsReply},
    state::{self, DesiredState, STATE_FILE, StateError},
    sync::{self, RingBufSource, SYNC_REQUEST_QUEUE, SyncConfig, SyncError, SyncKey, SyncRequest},
};
use std::{
    ffi::CString,
    fs,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};

/// Default path of the agent's socket (`--socket`, `XLB_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
/// Default directory of the persisted state (`--state-dir`, `XLB_STATE_DIR`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/xlb";
/// How often backend neighbour entries are refreshed (well under the kernel's default
/// `base_reachable_time` of 30 s, so an entry in use never has to be resolved from scratch).
pub const WARM_INTERVAL: Duration = Duration::from_secs(10);
/// How long shutdown waits for open CLI connections to finish their current request.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no interface given: pass --iface or set iface under [agent] in the config file")]
    NoInterface,
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
    #[error("--flow-capacity must be at least 1")]
    FlowCapacity,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    State(#[from] StateError),
    #[error("another xlb agent is already running on {}", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot create agent socket {}: {}", path.display(), os_message(source))]
    Socket { path: PathBuf, source: io::Error },
    #[error("cannot create state directory {}: {}", path.display(), os_message(source))]
    StateDir { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Dataplane(Box<DataplaneError>),
    #[error("installing the desired state failed: {0}")]
    Install(#[from] ControllerError),
    #[error("{0}")]
    Health(#[from] HealthError),
    #[error("peer sync: {0}")]
    Sync(#[from] SyncError),
    #[error("{0}")]
    Metrics(#[from] MetricsError),
    #[error("--peer and --sync-key-file need --sync-listen (peer sync is off without it)")]
    SyncWithoutListen,
    #[error("--sync-listen needs --sync-key-file: peer sync is always authenticated")]
    SyncWithoutKey,
}

impl From<DataplaneError> for AgentError {
    fn from(e: DataplaneError) -> Self {
        AgentError::Dataplane(Box::new(e))
    }
}

/// The agent's options as given on the command line (`None` = not given, so the config file's
/// `[agent]` value or the built-in default applies).
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    pub iface: Option<String>,
    pub xdp_mode: Option<XdpModeChoice>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config_file: Option<PathBuf>,
    pub lb_addr: Option<Ipv4Addr>,
    pub flow_capacity: Option<u32>,
    pub sync_listen: Option<SocketAddr>,
    /// Empty = the config file's `peers`, if any.
    pub peers: Vec<SocketAddr>,
    pub sync_key_file: Option<PathBuf>,
    /// `--metrics-listen`: serve Prometheus metrics there.
    pub metrics_listen: Option<SocketAddr>,
    /// `--icmp-echo`: answer ICMP echo to VIP addresses at all.
    pub icmp_echo: Option<bool>,
}

/// Where the agent's initial desired state comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitialState {
    /// `--config FILE`: its VIPs replace whatever was saved.
    Config { path: PathBuf, state: DesiredState },
    /// `<state-dir>/state.json`, if present; empty otherwise.
    Saved,
}

/// Everything `run` needs, resolved and validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub iface: String,
    pub xdp_mode: XdpModeChoice,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub lb_addr: Option<Ipv4Addr>,
    pub flow_capacity: u32,
    pub initial: InitialState,
    pub warm_interval: Duration,
    /// Peer sync (active-active), if `--sync-listen` was given.
    pub sync: Option<SyncConfig>,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The global ICMP echo switch (each VIP address also needs a VIP that allows it).
    pub icmp_echo: bool,
}

impl AgentConfig {
    /// Merge command-line options with the config file's `[agent]` section (flags win) and load
    /// the config file's VIPs. Any error in the file is an error here, before anything is touched.
    pub fn from_options(opts: AgentOptions) -> Result<AgentConfig, AgentError> {
        let (section, initial) = match &opts.config_file {
            Some(path) => {
                let cfg = Config::load(path)?;
                (
                    cfg.agent,
                    InitialState::Config {
                        path: path.clone(),
                        state: cfg.state,
                    },
                )
            }
            None => (Default::default(), InitialState::Saved),
        };
        let iface = opts
            .iface
            .or(section.iface)
            .ok_or(AgentError::NoInterface)?;
        // The file's mode was checked to parse when the file was loaded.
        let xdp_mode = opts
            .xdp_mode
            .or_else(|| section.xdp_mode.and_then(|m| m.parse().ok()))
            .unwrap_or_default();
        let flow_capacity = opts
            .flow_capacity
            .or(section.flow_capacity)
            .unwrap_or(lb_common::DEFAULT_FLOW_CAPACITY);
        if flow_capacity == 0 {
            return Err(AgentError::FlowCapacity);
        }
        let peers = if opts.peers.is_empty() {
            section.peers.unwrap_or_default()
        } else {
            opts.peers
        };
        let key_file = opts.sync_key_file.or(section.sync_key_file);
        let sync = match (opts.sync_listen.or(section.sync_listen), key_file) {
            (Some(listen), Some(key_file)) => {
                let key = SyncKey::load(&key_file).map_err(SyncError::from)?;
                Some(SyncConfig::new(listen, peers, key)?)
            }
            (Some(_), None) => return Err(AgentError::SyncWithoutKey),
            (None, key_file) if key_file.is_some() || !peers.is_empty() => {
                return Err(AgentError::SyncWithoutListen);
            }
            (None, _) => None,
        };
        Ok(AgentConfig {
            iface,
            xdp_mode,
            socket: opts.socket,
            state_dir: opts.state_dir,
            lb_addr: opts.lb_addr.or(section.lb_addr),
            flow_capacity,
            initial,
            warm_interval: WARM_INTERVAL,
            sync,
            metrics_listen: opts.metrics_listen.or(section.metrics_listen),
            icmp_echo: opts.icmp_echo.or(section.icmp_echo).unwrap_or(true),
        })
    }
}

/// Run the agent until `shutdown` resolves. Returns after the socket file is removed and the XDP
/// program detached.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    // Checked first so a typo fails before anything is created or attached.
    interface_index(&config.iface)?;
    let state_path = config.state_dir.join(STATE_FILE);
    let (initial, source) = match config.initial {
        InitialState::Config { path, state } => (state, format!("config file {}", path.display())),
        InitialState::Saved => match state::load(&state_path)? {
            Some(state) => (state, format!("state file {}", state_path.display())),
            None => (
                DesiredState::default(),
                "nothing (no --config, no saved state)".to_string(),
            ),
        },
    };

    let health = Monitor::new()?;
    // Bound before the data path is loaded: a second agent then fails here instead of replacing
    // the running agent's XDP program.
    let (listener, socket_file) = bind_socket(&config.socket)?;
    // Also before the data path: a taken metrics port fails the start, not a running agent.
    let metrics_listener = match config.metrics_listen {
        Some(addr) => {
            let l = metrics::bind(addr).await?;
            log::info!("serving Prometheus metrics on http://{addr}/metrics");
            Some(l)
        }
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

    let mut dp = Dataplane::load(&DataplaneOptions {
        iface: config.iface.clone(),
        mode: config.xdp_mode,
        flow_capacity: config.flow_capacity,
        lb_addr: config.lb_addr,
    })?;
    if !config.icmp_echo {
        dp.set_icmp_echo(false)?;
        log::info!("ICMP echo to VIP addresses is off (--icmp-echo off)");
    }
    log::info!(
        "attached to {} in {} mode (flow table {} entries, IPIP source {})",
        config.iface,
        dp.mode()
            .map_or_else(|| "unattached".to_string(), |m| m.to_string()),
        dp.flow_capacity(),
        dp.lb_addr()
            .map_or_else(|| "unset".to_string(), |a| a.to_string())
    );
    // The sync reader takes the kernel's flow-event ring buffer before the data path moves into
    // the serve loop.
    let mut sync_parts = None;
    if let Some(sync_config) = config.sync.clone() {
        let events = RingBufSource::new(dp.take_flow_events()?)?;
        let (request_tx, request_rx) = mpsc::channel(SYNC_REQUEST_QUEUE);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (listen, peers) = (sync_config.listen, sync_config.peers.len());
        let handle = sync::spawn(sync_config, events, request_tx, stop_rx).await?;
        log::info!("peer sync listening on {listen}, streaming to {peers} peer(s)");
        sync_parts = Some((handle, request_rx, stop_tx));
    }
    let controller = Controller::start(dp, state_path, initial)?;
    log::info!(
        "desired state from {source}: {} VIPs, {} backends",
        controller.state().vip_count(),
        controller.state().backend_count()
    );
    log::info!("listening on {}", config.socket.display());

    let (sync_handle, sync_requests, sync_stop) = match sync_parts {
        Some((handle, requests, stop)) => (Some(handle), Some(requests), Some(stop)),
        None => (None, None, None),
    };
    let peers = sync_handle.as_ref().map(|h| h.status());
    let controller = serve(
        listener,
        controller,
        health,
        Sync {
            requests: sync_requests,
            status: peers,
        },
        metrics_listener,
        shutdown,
        config.warm_interval,
    )
    .await;
    // Sync first (its tasks may still ask the data path for something), then the socket, so no
    // CLI connects to an agent that is going away, then the data path.
    if let (Some(handle), Some(stop)) = (sync_handle, sync_stop) {
        let _ = stop.send(true);
        handle.join().await;
    }
    drop(socket_file);
    drop(controller);
    log::info!("stopped; XDP program detached from {}", config.iface);
    Ok(())
}

/// The serve loop's side of peer sync: requests from the sync tasks, and their status for
/// `xlb peers`. Both `None` when sync is off.
pub struct Sync {
    pub requests: Option<mpsc::Receiver<SyncRequest>>,
    pub status: Option<sync::SyncStatus>,
}

impl Sync {
    pub fn off() -> Self {
        Sync {
            requests: None,
            status: None,
        }
    }
}

/// The next sync request, or never when sync is off (so `select!` can always poll it).
async fn next_sync_request(requests: &mut Option<mpsc::Receiver<SyncRequest>>) -> SyncRequest {
    match requests {
        Some(rx) => match rx.recv().await {
            Some(req) => req,
            // Every sync task has ended (shutdown): nothing more will come.
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// One request from a connection task, with where to send its answer.
struct Job {
    req: Request,
    reply: oneshot::Sender<Response>,
}

/// Serve requests on `listener` with `controller`, health-check results of `health`'s tasks and,
/// with `metrics`, Prometheus scrapes, until `shutdown` resolves; then stop the checks, wind down
/// every connection task and hand the controller back (the caller decides when the data path
/// goes).
pub async fn serve<D: DataplaneOps>(
    listener: UnixListener,
    mut controller: Controller<D>,
    health: (Monitor, mpsc::Receiver<CheckReport>),
    mut sync: Sync,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
    warm_interval: Duration,
) -> Controller<D> {
    tokio::pin!(shutdown);
    let (mut monitor, mut results) = health;
    monitor.sync(controller.probe_targets());
    log::info!("health checks running for {} backends", monitor.len());
    let (job_tx, mut job_rx) = mpsc::channel::<Job>(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    // The first tick fires at once: that is the warm-up at start.
    let mut warm = tokio::time::interval(warm_interval);
    warm.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The HTTP side of metrics runs as its own task; only building the stats report (the same
    // work as `xlb stats`) happens here, between other requests.
    let (scrape_tx, mut scrapes) = mpsc::channel::<StatsReply>(SCRAPE_QUEUE);
    let metrics_task = metrics.map(|l| {
        tokio::spawn(metrics::serve(
            l,
            scrape_tx.clone(),
            sync.status.clone(),
            stop_rx.clone(),
        ))
    });
    drop(scrape_tx);

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_connection(stream, job_tx.clone(), stop_rx.clone()));
                }
                Err(e) => log::warn!("accepting a CLI connection: {e}"),
            },
            req = next_sync_request(&mut sync.requests) => controller.sync_request(req),
            Some(job) = job_rx.recv() => {
                log::debug!("request {:?}", job.req);
                if let (Request::Peers, Some(status)) = (&job.req, &sync.status) {
                    let _ = job.reply.send(Response::Peers { peers: status.report() });
                    continue;
                }
                let mutation = job.req.is_mutation();
                let resp = controller.handle(job.req);
                match &resp {
                    Response::Done { message } => log::info!("{message}"),
                    Response::Error { message } => log::info!("request refused: {message}"),
                    _ => {}
                }
                // The CLI may have given up waiting; the change stands either way.
                let _ = job.reply.send(resp);
                if mutation {
                    monitor.sync(controller.probe_targets());
                    warm_neighbours(&controller.state().backend_addrs());
                }
            }
            Some(report) = results.recv() => controller.health_result(report),
            Some(reply) = scrapes.recv() => {
                // The scraper may have timed out; nothing to undo either way.
                let _ = reply.send(controller.stats().map_err(|e| e.to_string()));
            }
            _ = warm.tick() => warm_neighbours(&controller.state().backend_addrs()),
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done && e.is_panic() {
                    log::error!("a CLI connection task panicked: {e}");
                }
            }
        }
    }

    log::info!("shutting down");
    drop(monitor);
    drop(listener);
    // Connection tasks waiting for an answer get an error from the dropped queue; idle ones
    // see the stop signal.
    let _ = stop_tx.send(true);
    drop(job_rx);
    drop(scrapes);
    if let Some(task) = metrics_task
        && let Err(e) = task.await
        && e.is_panic()
    {
        log::error!("the metrics server panicked: {e}");
    }
    let drain = tokio::time::sleep(DRAIN_TIMEOUT);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            next = conns.join_next() => match next {
                None => break,
                Some(Err(e)) if e.is_panic() => log::error!("a CLI connection task panicked: {e}"),
                Some(_) => {}
            },
            () = &mut drain => {
                log::warn!("{} CLI connections still open after {DRAIN_TIMEOUT:?}; closing them", conns.len());
                conns.shutdown().await;
                break;
            }
        }
    }
    controller
}

/// Read request lines from one CLI connection, answer each with one line.
async fn serve_connection(
    stream: UnixStream,
    jobs: mpsc::Sender<Job>,
    mut stop: watch::Receiver<bool>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64);
        let n = tokio::select! {
            r = limited.read_until(b'\n', &mut line) => match r {
                Ok(n) => n,
                Err(e) => {
                    log::debug!("reading a CLI request: {e}");
                    return;
                }
            },
            _ = stop.changed() => return,
        };
        if n == 0 {
            return;
        }
        let too_long = !line.ends_with(b"\n") && n >= MAX_LINE;
        let resp = if too_long {
            Response::Error {
                message: format!("request longer than {MAX_LINE} bytes"),
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    let (reply, answer) = oneshot::channel();
                    let agent_gone = || Response::Error {
                        message: "the agent is shutting down".to_string(),
                    };
                    if jobs.send(Job { req, reply }).await.is_err() {
                        agent_gone()
                    } else {
                        answer.await.unwrap_or_else(|_| agent_gone())
                    }
                }
                Err(e) => Response::Error {
                    message: format!("malformed request: {e}"),
                },
            }
        };
        let mut out = serde_json::to_vec(&resp).expect("responses serialise to JSON");
        out.push(b'\n');
        if let Err(e) = write.write_all(&out).await {
            log::debug!("answering a CLI request: {e}");
            return;
        }
        if too_long {
            return;
        }
    }
}

/// The agent's socket file; removed on drop unless another process has replaced it since.
pub struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(md) if md.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    log::warn!("removing {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }
}

/// Create the socket's directory (0755) if needed, replace a stale socket left by a dead agent,
/// refuse if a live agent answers on it, and bind.
pub fn bind_socket(path: &Path) -> Result<(UnixListener, SocketFile), AgentError> {
    let err = |source| AgentError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(err)?;
    }
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AgentError::AlreadyRunning(path.to_path_buf()));
            }
            log::info!("replacing stale socket {}", path.display());
            fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => return Err(AgentError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    let ino = fs::symlink_metadata(path).map_err(err)?.ino();
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            ino,
        },
    ))
}

/// The interface's index, or `NoSuchInterface`.
pub fn interface_index(name: &str) -> Result<u32, AgentError> {
    let missing = || AgentError::NoSuchInterface(name.to_string());
    let c = CString::new(name).map_err(|_| missing())?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(missing()),
        index => Ok(index),
    }
}

/// Make the kernel resolve the next hop towards every backend.
///
/// Why: `bpf_fib_lookup` in the XDP program only *reads* the neighbour table; it cannot start ARP.
/// Without an entry the program must hand the packet to the kernel (`pass_no_neigh`), which is the
/// slow path. An ordinary datagram sent through the stack makes the kernel route it and ARP for
/// exactly the next hop the data path will ask about (the backend itself on-link, or its gateway),
/// and sending again every `WARM_INTERVAL` keeps the entry fresh. Port 9 is "discard" and the
/// datagram is empty, so a backend at worst answers with an ICMP port-unreachable.
pub fn warm_neighbours(addrs: &[Ipv4Addr]) {
    if addrs.is_empty() {
        return;
    }
    // Wildcard address and port: the kernel picks the source per route, as for any client.
    let sock = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        Ok(s) => s,
        Err(e) => {
            log::debug!("neighbour warm-up: cannot open a UDP socket: {e}");
            return;
        }
    };
    if let Err(e) = sock.set_nonblocking(true) {
        log::debug!("neighbour warm-up: {e}");
        return;
    }
    for addr in addrs {
        if let Err(e) = sock.send_to(&[], (*addr, 9)) {
            log::debug!("neighbour warm-up of {addr}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        client,
        controller::fake::FakeDataplane,
        model::{Forward, Proto, ServiceKey},
    };

    fn key() -> ServiceKey {
        ServiceKey {
            addr: Ipv4Addr::new(10, 111, 100, 1),
            port: 80,
            proto: Proto::Tcp,
        }
    }

    #[test]
    fn options_merge_flags_over_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("xlb.toml");
        fs::write(
            &cfg,
            "[agent]\niface = \"eth9\"\nxdp_mode = \"generic\"\nflow_capacity = 77\nlb_addr = \"10.0.0.1\"\nicmp_echo = false\n\
             [[vip]]\naddress = \"10.111.100.1:80\"\n",
        )
        .unwrap();
        let base = AgentOptions {
            socket: dir.path().join("s"),
            state_dir: dir.path().to_path_buf(),
            config_file: Some(cfg.clone()),
            ..Default::default()
        };
        let c = AgentConfig::from_options(base.clone()).unwrap();
        assert_eq!(c.iface, "eth9");
        assert_eq!(c.xdp_mode, XdpModeChoice::Generic);
        assert_eq!(c.flow_capacity, 77);
        assert_eq!(c.lb_addr, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(!c.icmp_echo);
        assert!(matches!(&c.initial, InitialState::Config { state, .. } if state.vip_count() == 1));

        let c = AgentConfig::from_options(AgentOptions {
            iface: Some("veth0".into()),
            xdp_mode: Some(XdpModeChoice::Driver),
            flow_capacity: Some(5),
            icmp_echo: Some(true),
            ..base
        })
        .unwrap();
        assert_eq!(c.iface, "veth0");
        assert!(c.icmp_echo);
        assert_eq!(c.xdp_mode, XdpModeChoice::Driver);
        assert_eq!(c.flow_capacity, 5);

        let none = AgentConfig::from_options(AgentOptions::default());
        assert!(matches!(none, Err(AgentError::NoInterface)));
        let defaults = AgentConfig::from_options(AgentOptions {
            iface: Some("lo".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(defaults.flow_capacity, lb_common::DEFAULT_FLOW_CAPACITY);
        assert!(defaults.icmp_echo);
        assert_eq!(defaults.initial, InitialState::Saved);
    }

    #[test]
    fn peer_sync_needs_a_listen_address_and_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("sync.key");
        fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
        let base = || AgentOptions {
            iface: Some("lo".into()),
            ..Default::default()
        };
        let listen: SocketAddr = "10.111.1.2:7946".parse().unwrap();
        let peer: SocketAddr = "10.111.1.3:7946".parse().unwrap();

        let off = AgentConfig::from_options(base()).unwrap();
        assert!(off.sync.is_none());
        let on = AgentConfig::from_options(AgentOptions {
            sync_listen: Some(listen),
            peers: vec![peer],
            sync_key_file: Some(key.clone()),
            ..base()
        })
        .unwrap();
        let sync = on.sync.expect("sync configured");
        assert_eq!((sync.listen, sync.peers), (listen, vec![peer]));

        let no_key = AgentConfig::from_options(AgentOptions {
            sync_listen: Some(listen),
            ..base()
        });
        assert!(matches!(no_key, Err(AgentError::SyncWithoutKey)));
        let no_listen = AgentConfig::from_options(AgentOptions {
            peers: vec![peer],
            sync_key_file: Some(key.clone()),
            ..base()
        });
        assert!(matches!(no_listen, Err(AgentError::SyncWithoutListen)));
        fs::write(&key, "short").unwrap();
        let weak = AgentConfig::from_options(AgentOptions {
            sync_listen: Some(listen),
            sync_key_file: Some(key),
            ..base()
        })
        .unwrap_err();
        assert!(weak.to_string().contains("16"), "{weak}");
    }

    #[test]
    fn missing_interface_is_named() {
        let e = interface_index("xlb-nope0").unwrap_err();
        assert_eq!(e.to_string(), "interface \"xlb-nope0\" does not exist");
        assert!(interface_index("lo").is_ok());
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/xlb.sock");
        let (listener, guard) = bind_socket(&path).unwrap();
        let md = fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(md.mode() & 0o777, 0o755);
        assert!(matches!(
            bind_socket(&path),
            Err(AgentError::AlreadyRunning(_))
        ));
        // A dead agent leaves its socket file behind: nothing listens on it any more.
        drop(listener);
        std::mem::forget(guard);
        assert!(path.exists());
        let (_listener, guard) = bind_socket(&path).unwrap();
        drop(guard);
        assert!(!path.exists(), "the socket file is removed on drop");

        let file = dir.path().join("plain");
        fs::write(&file, b"").unwrap();
        assert!(matches!(bind_socket(&file), Err(AgentError::NotASocket(_))));
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
        )
        .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let ctl = serve(
                listener,
                ctl,
                Monitor::new().unwrap(),
                Sync::off(),
                None,
                async {
                    let _ = stopped.await;
                },
                Duration::from_secs(3600),
            )
            .await;
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
                },
            );
            let dup = client::call(
                &s,
                &Request::VipAdd {
                    vip: key(),
                    forward: Forward::L2,
                    check: Default::default(),
                    icmp_echo: true,
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
        stop.send(()).unwrap();
        let ctl = tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("agent stops promptly")
            .unwrap();
        assert!(!sock.exists(), "socket file removed");
        assert_eq!(ctl.dataplane().applied.len(), 1);
        drop(raw);
    }
}
