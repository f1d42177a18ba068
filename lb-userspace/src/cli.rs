//! Command-line interface: the clap definitions of every `xlb` subcommand, and the client side of
//! each (send a request, print the answer as a table or as JSON).
//!
//! Addresses are taken as strings and parsed here rather than by clap, so a malformed one is
//! reported like every other input error (`xlb: error: ...`, exit 1) instead of as a usage error.

use crate::{
    agent::{AgentOptions, DEFAULT_SOCKET, DEFAULT_STATE_DIR},
    api::{Request, Response, StatsReport, VipList, VipReport, VipSummary},
    backend_host::{self, BackendHostError, RECORD_DIR, SetupOptions},
    check::{CheckError, CheckFlags, CheckKind, fmt_duration, parse_duration},
    client::{self, ClientError},
    dataplane::{DataplaneError, XdpModeChoice},
    model::{DEFAULT_WEIGHT, Forward, Proto, ServiceKey},
    parse::{ParseError, parse_addr_port, parse_ipv4},
    xdp_persist,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

#[derive(Debug, Parser)]
#[command(
    name = "xlb",
    version,
    about = "xlb: an XDP layer-4 load balancer with direct server return",
    long_about = "xlb steers packets for virtual services (VIPs) to backends at the NIC, with XDP.\n\
                  `xlb agent` attaches the data path to an interface and keeps the desired state;\n\
                  the other commands talk to it over a Unix socket."
)]
pub struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, env = "XLB_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach the balancer to an interface, install the desired state (from
    /// --config or the state saved in --state-dir) and serve the CLI until SIGINT/SIGTERM.
    Agent(AgentArgs),
    /// Add, delete and list virtual services.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Add, delete and list the backends of a virtual service.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Per-VIP, per-backend and per-reason packet counters; with --watch, refreshed with
    /// per-second rates.
    Stats(StatsArgs),
    /// Peer sync (active-active): each peer's connection, flows sent and received, last message
    /// age, rejected messages, and the sync lag.
    Peers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Prepare this host (run it inside the backend's network namespace) as a direct-server-return
    /// backend, or undo that.
    #[command(subcommand)]
    BackendHost(BackendHostCommand),
    /// Attach or detach a trivial XDP program that passes every packet.
    ///
    /// On veth pairs, packets that an XDP program in native (driver) mode sends with XDP_TX or
    /// redirects onto a veth are dropped unless the receiving peer has an XDP program attached.
    /// Attach this to the peers of the interface the agent runs on when using --xdp-mode driver
    /// on veths. Generic mode does not need it. The program stays attached after this command
    /// exits.
    #[command(subcommand)]
    XdpPass(XdpPassCommand),
}

/// XDP attach mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    /// Driver (native) mode if the driver supports it, generic otherwise (with a warning).
    Auto,
    /// Driver (native) mode only.
    Driver,
    /// Generic (SKB) mode: works everywhere, slower.
    Generic,
}

impl From<XdpModeArg> for XdpModeChoice {
    fn from(m: XdpModeArg) -> Self {
        match m {
            XdpModeArg::Auto => XdpModeChoice::Auto,
            XdpModeArg::Driver => XdpModeChoice::Driver,
            XdpModeArg::Generic => XdpModeChoice::Generic,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

impl From<ProtoArg> for Proto {
    fn from(p: ProtoArg) -> Self {
        match p {
            ProtoArg::Tcp => Proto::Tcp,
            ProtoArg::Udp => Proto::Udp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ForwardArg {
    /// IPIP encapsulation to the backend (works across subnets; the backend decapsulates).
    Ipip,
    /// Rewrite the destination MAC only (backends on the load balancer's L2 segment).
    L2,
}

impl From<ForwardArg> for Forward {
    fn from(f: ForwardArg) -> Self {
        match f {
            ForwardArg::Ipip => Forward::Ipip,
            ForwardArg::L2 => Forward::L2,
        }
    }
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Interface to attach the balancer to (or `iface` under [agent] in the config file).
    #[arg(long, value_name = "IF")]
    pub iface: Option<String>,
    /// XDP attach mode [default: auto].
    #[arg(long, value_enum, value_name = "MODE")]
    pub xdp_mode: Option<XdpModeArg>,
    /// Directory of the persisted desired state (state.json).
    #[arg(long, env = "XLB_STATE_DIR", default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// TOML file with the VIPs to serve (replaces the saved state) and optional [agent] options;
    /// command-line flags win over the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Outer source address of IPIP packets [default: the interface's first IPv4 address].
    #[arg(long, value_name = "ADDR")]
    pub lb_addr: Option<Ipv4Addr>,
    /// Entries of the flow table [default: 262144].
    #[arg(long, value_name = "N")]
    pub flow_capacity: Option<u32>,
    /// Accept flow state from peer load balancers on ADDR:PORT (active-active). Needs
    /// --sync-key-file.
    #[arg(long, value_name = "ADDR:PORT")]
    pub sync_listen: Option<SocketAddr>,
    /// A peer load balancer's --sync-listen address: this agent streams its flows there (its
    /// whole flow table first, on every (re)connect). Repeat for several peers.
    #[arg(long = "peer", value_name = "ADDR:PORT")]
    pub peers: Vec<SocketAddr>,
    /// File holding the key shared by all peers (at least 16 bytes; surrounding whitespace is
    /// ignored). Every sync frame is authenticated with HMAC-SHA256 under it.
    #[arg(long, value_name = "FILE")]
    pub sync_key_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9477).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Answer ICMP echo requests to VIP addresses at all; off drops them whatever the VIPs'
    /// --icmp-echo [default: on].
    #[arg(long, value_enum, value_name = "on|off")]
    pub icmp_echo: Option<OnOff>,
}

/// `xlb stats` flags.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print JSON instead of tables (with --watch: one JSON object per line per interval).
    #[arg(long)]
    pub json: bool,
    /// Refresh every --interval with per-second rates (packets/s, bytes/s, new flows/s), until
    /// Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Time between two refreshes of --watch, e.g. 500ms, 2s.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1s",
        requires = "watch"
    )]
    pub interval: String,
}

impl AgentArgs {
    pub fn into_options(self, socket: PathBuf) -> AgentOptions {
        AgentOptions {
            iface: self.iface,
            xdp_mode: self.xdp_mode.map(Into::into),
            socket,
            state_dir: self.state_dir,
            config_file: self.config,
            lb_addr: self.lb_addr,
            flow_capacity: self.flow_capacity,
            sync_listen: self.sync_listen,
            peers: self.peers,
            sync_key_file: self.sync_key_file,
            metrics_listen: self.metrics_listen,
            icmp_echo: self.icmp_echo.map(|e| e == OnOff::On),
        }
    }
}

/// Health-check flags, shared by `vip add`, `vip set` and `backend add`. Taken as strings and
/// parsed by `CheckFlags::to_patch`, so a bad value is a one-line error (exit 1).
#[derive(Debug, Default, Args)]
pub struct CheckArgs {
    /// Health check: tcp (connect), http:/PATH, https:/PATH (GET, TLS certificate not verified
    /// unless --tls-verify) or none (always up) [default: tcp for TCP VIPs; none for UDP VIPs,
    /// because a TCP connect cannot check a UDP service].
    #[arg(long, value_name = "KIND")]
    pub check: Option<String>,
    /// Port checked on the backend's own address [default: the VIP's port].
    #[arg(long, value_name = "N")]
    pub check_port: Option<String>,
    /// Time between checks, e.g. 200ms [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub interval: Option<String>,
    /// Time a check may take, at most the interval [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Consecutive passed checks that bring a down backend back [default: 2].
    #[arg(long, value_name = "N")]
    pub rise: Option<String>,
    /// Consecutive failed checks that take a backend down [default: 3].
    #[arg(long, value_name = "N")]
    pub fall: Option<String>,
    /// HTTP status or range that passes, e.g. 200 or 200-399 [default: 200-399].
    #[arg(long, value_name = "STATUS")]
    pub expect_status: Option<String>,
    /// Text the HTTP body must contain ("" removes the condition).
    #[arg(long, value_name = "STR")]
    pub expect_body: Option<String>,
    /// Verify the https check's certificate (--tls-verify=false turns it off again).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub tls_verify: Option<String>,
}

impl CheckArgs {
    fn flags(&self) -> CheckFlags {
        CheckFlags {
            check: self.check.clone(),
            port: self.check_port.clone(),
            interval: self.interval.clone(),
            timeout: self.timeout.clone(),
            rise: self.rise.clone(),
            fall: self.fall.clone(),
            expect_status: self.expect_status.clone(),
            expect_body: self.expect_body.clone(),
            tls_verify: self.tls_verify.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum VipCommand {
    /// Add a virtual service (with no backends yet).
    Add {
        /// ADDR:PORT, e.g. 10.111.100.1:80
        vip: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
        #[arg(long, value_enum, default_value = "ipip")]
        forward: ForwardArg,
        #[command(flatten)]
        check: CheckArgs,
        /// Answer ICMP echo requests to the VIP's address (the address answers if any of its
        /// VIPs does, and the agent's --icmp-echo is on).
        #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
        icmp_echo: OnOff,
    },
    /// Change a virtual service's health check or ICMP echo (flags not given keep their values).
    Set {
        /// ADDR:PORT
        vip: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
        #[command(flatten)]
        check: CheckArgs,
        /// Answer ICMP echo requests to the VIP's address (see `vip add`).
        #[arg(long, value_enum, value_name = "on|off")]
        icmp_echo: Option<OnOff>,
    },
    /// Delete a virtual service and its backends.
    Del {
        /// ADDR:PORT
        vip: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
    },
    /// List virtual services.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Switch the data path's debug events (one log line per packet decision, in the agent's
    /// log under target xlb_ebpf) on or off for one VIP. Off by default; not persisted.
    Debug {
        /// ADDR:PORT
        vip: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
        #[arg(value_enum)]
        state: OnOff,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a virtual service.
    Add {
        /// The VIP, ADDR:PORT
        vip: String,
        /// The backend's IPv4 address (no port: direct server return keeps the VIP's port).
        backend: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
        /// Relative share of new flows (0-256; 0 = no new flows).
        #[arg(long, default_value_t = DEFAULT_WEIGHT)]
        weight: u32,
        /// Any check flag gives this backend its own check: the VIP's with these flags applied.
        /// (Boxed: the flags are large next to the other variants.)
        #[command(flatten)]
        check: Box<CheckArgs>,
    },
    /// Change a backend's weight at run time (a weight above 0 ends a drain).
    Set {
        vip: String,
        backend: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
        /// Relative share of new flows (0-256; 0 = no new flows).
        #[arg(long, required = true)]
        weight: u32,
    },
    /// Drain a backend: weight 0, so no new flows; its existing flows stay until they end.
    Drain {
        vip: String,
        backend: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
    },
    /// End a drain: the backend gets back the weight it had before.
    Undrain {
        vip: String,
        backend: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
    },
    /// Remove a backend from a virtual service.
    Del {
        vip: String,
        backend: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
    },
    /// List the backends of a virtual service: weight, state (up, down, draining) and since when,
    /// last check, flows and counters.
    List {
        vip: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackendHostCommand {
    /// Add the VIPs to lo, set the ARP and rp_filter sysctls DSR needs, and attach the IPIP
    /// decapsulator; records what it did for `teardown`.
    Setup {
        /// A VIP this backend serves (repeatable).
        #[arg(long = "vip", value_name = "ADDR", required = true)]
        vips: Vec<String>,
        /// Interface to decapsulate on (repeatable) [default: every non-loopback interface that
        /// is up and has an IPv4 address].
        #[arg(long = "iface", value_name = "IF")]
        ifaces: Vec<String>,
        #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
        xdp_mode: XdpModeArg,
    },
    /// Undo exactly what `setup` did in this network namespace.
    Teardown,
}

#[derive(Debug, Subcommand)]
pub enum XdpPassCommand {
    /// Attach the pass program to IFACE.
    Attach {
        iface: String,
        #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
        xdp_mode: XdpModeArg,
    },
    /// Detach whatever XDP program IFACE has.
    Detach { iface: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Check(#[from] CheckError),
    #[error("{0}")]
    BackendHost(#[from] BackendHostError),
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
    #[error("{iface}: {source}")]
    Xdp {
        iface: String,
        source: Box<DataplaneError>,
    },
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
    #[error("--interval {0} is too short: at least 100ms")]
    WatchInterval(String),
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

fn service_key(vip: &str, proto: ProtoArg) -> Result<ServiceKey, ParseError> {
    let (addr, port) = parse_addr_port(vip)?;
    Ok(ServiceKey {
        addr,
        port,
        proto: proto.into(),
    })
}

fn unexpected(resp: Response) -> CliError {
    CliError::Unexpected(format!("{resp:?}"))
}

fn print(text: &str) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let mut s = serde_json::to_string_pretty(value).expect("reports serialise to JSON");
    s.push('\n');
    print(&s)
}

/// Send a mutating request and print the agent's confirmation.
fn change(socket: &Path, req: Request) -> Result<(), CliError> {
    match client::call(socket, &req)? {
        Response::Done { message } => print(&format!("{message}\n")),
        other => Err(unexpected(other)),
    }
}

pub fn vip(socket: &Path, cmd: VipCommand) -> Result<(), CliError> {
    match cmd {
        VipCommand::Add {
            vip,
            proto,
            forward,
            check,
            icmp_echo,
        } => {
            let vip = service_key(&vip, proto)?;
            let check = check.flags().to_patch()?;
            change(
                socket,
                Request::VipAdd {
                    vip,
                    forward: forward.into(),
                    check,
                    icmp_echo: icmp_echo == OnOff::On,
                },
            )
        }
        VipCommand::Set {
            vip,
            proto,
            check,
            icmp_echo,
        } => {
            let vip = service_key(&vip, proto)?;
            let check = check.flags().to_patch()?;
            change(
                socket,
                Request::VipSet {
                    vip,
                    check,
                    icmp_echo: icmp_echo.map(|e| e == OnOff::On),
                },
            )
        }
        VipCommand::Del { vip, proto } => change(
            socket,
            Request::VipDel {
                vip: service_key(&vip, proto)?,
            },
        ),
        VipCommand::Debug { vip, proto, state } => change(
            socket,
            Request::VipDebug {
                vip: service_key(&vip, proto)?,
                on: state == OnOff::On,
            },
        ),
        VipCommand::List { json } => match client::call(socket, &Request::VipList)? {
            Response::VipList { vips } if json => print_json(&VipList { vips }),
            Response::VipList { vips } => print(&vip_table(&vips)),
            other => Err(unexpected(other)),
        },
    }
}

pub fn backend(socket: &Path, cmd: BackendCommand) -> Result<(), CliError> {
    match cmd {
        BackendCommand::Add {
            vip,
            backend,
            proto,
            weight,
            check,
        } => {
            let vip = service_key(&vip, proto)?;
            let backend = parse_ipv4(&backend)?;
            let check = check.flags().to_patch()?;
            change(
                socket,
                Request::BackendAdd {
                    vip,
                    backend,
                    weight,
                    check,
                },
            )
        }
        BackendCommand::Set {
            vip,
            backend,
            proto,
            weight,
        } => {
            let vip = service_key(&vip, proto)?;
            let backend = parse_ipv4(&backend)?;
            change(
                socket,
                Request::BackendSet {
                    vip,
                    backend,
                    weight,
                },
            )
        }
        BackendCommand::Drain {
            vip,
            backend,
            proto,
        } => {
            let vip = service_key(&vip, proto)?;
            let backend = parse_ipv4(&backend)?;
            change(socket, Request::BackendDrain { vip, backend })
        }
        BackendCommand::Undrain {
            vip,
            backend,
            proto,
        } => {
            let vip = service_key(&vip, proto)?;
            let backend = parse_ipv4(&backend)?;
            change(socket, Request::BackendUndrain { vip, backend })
        }
        BackendCommand::Del {
            vip,
            backend,
            proto,
        } => {
            let vip = service_key(&vip, proto)?;
            let backend = parse_ipv4(&backend)?;
            change(socket, Request::BackendDel { vip, backend })
        }
        BackendCommand::List { vip, proto, json } => {
            let vip = service_key(&vip, proto)?;
            match client::call(socket, &Request::BackendList { vip })? {
                Response::BackendList { vip } if json => print_json(&vip),
                Response::BackendList { vip } => print(&backend_table(&vip, "", SystemTime::now())),
                other => Err(unexpected(other)),
            }
        }
    }
}

pub fn peers(socket: &Path, json: bool) -> Result<(), CliError> {
    match client::call(socket, &Request::Peers)? {
        Response::Peers { peers } if json => print_json(&peers),
        Response::Peers { peers } => print(&crate::sync::render_table(&peers)),
        other => Err(unexpected(other)),
    }
}

fn fetch_stats(socket: &Path) -> Result<StatsReport, CliError> {
    match client::call(socket, &Request::Stats)? {
        Response::Stats { stats } => Ok(stats),
        other => Err(unexpected(other)),
    }
}

/// Shortest `--watch` interval: below it the rates are mostly noise and the agent would spend
/// its time answering.
pub const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(100);

pub fn stats(socket: &Path, args: StatsArgs) -> Result<(), CliError> {
    if !args.watch {
        let stats = fetch_stats(socket)?;
        return if args.json {
            print_json(&stats)
        } else {
            print(&stats_text(&stats))
        };
    }
    let interval = parse_duration("--interval", &args.interval)?;
    if interval < MIN_WATCH_INTERVAL {
        return Err(CliError::WatchInterval(args.interval));
    }
    let result = watch_stats(socket, interval, args.json);
    // `xlb stats --watch | head` closing the pipe is the reader being done, not an error.
    match result {
        Err(CliError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Poll the agent every `interval` until interrupted (SIGINT's default action ends the
/// process: there is nothing to clean up). Rates come from two consecutive reports and the time
/// between them as measured here.
fn watch_stats(socket: &Path, interval: Duration, json: bool) -> Result<(), CliError> {
    let mut prev: Option<(Instant, StatsReport)> = None;
    loop {
        let stats = fetch_stats(socket)?;
        let at = Instant::now();
        let r = prev
            .as_ref()
            .map(|(t, p)| rates(p, &stats, at.duration_since(*t)));
        if json {
            let frame = WatchFrame {
                stats: &stats,
                rates: r.as_ref(),
            };
            let mut line = serde_json::to_string(&frame).expect("reports serialise to JSON");
            line.push('\n');
            print(&line)?;
        } else {
            // Home + clear screen (plain ANSI), then the frame.
            print(&format!(
                "\x1b[H\x1b[2J{}",
                watch_text(&stats, r.as_ref(), interval, SystemTime::now())
            ))?;
        }
        prev = Some((at, stats));
        std::thread::sleep(interval);
    }
}

/// One line of `xlb stats --watch --json`: the `xlb stats --json` object plus `rates` (`null`
/// in the first line).
#[derive(Debug, serde::Serialize)]
pub struct WatchFrame<'a> {
    #[serde(flatten)]
    pub stats: &'a StatsReport,
    pub rates: Option<&'a Rates>,
}

/// Per-second rates between two stats reports.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Rates {
    /// Seconds between the two reports.
    pub interval_s: f64,
    pub vips: Vec<VipRates>,
    /// Packets per second per reason; `None` when the counter went backwards.
    pub reasons: BTreeMap<String, Option<f64>>,
}

/// Rates are `None` when there is nothing to compare with: the VIP or backend is new, or its
/// counter went backwards (it was removed and added again).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VipRates {
    pub vip: String,
    pub proto: Proto,
    pub packets_per_s: Option<f64>,
    pub bytes_per_s: Option<f64>,
    pub new_flows_per_s: Option<f64>,
    pub backends: Vec<BackendRates>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BackendRates {
    pub address: Ipv4Addr,
    pub packets_per_s: Option<f64>,
    pub bytes_per_s: Option<f64>,
    pub new_flows_per_s: Option<f64>,
}

/// `(cur - prev) / elapsed`, or `None` without a previous value, with a counter that went
/// backwards, or with no time elapsed.
fn rate(prev: Option<u64>, cur: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    let delta = cur.checked_sub(prev?)?;
    (secs > 0.0).then(|| delta as f64 / secs)
}

/// Rates of every VIP and backend of `cur`, against the same VIP (address, port, protocol) and
/// backend (address) in `prev`.
pub fn rates(prev: &StatsReport, cur: &StatsReport, elapsed: Duration) -> Rates {
    let vips = cur
        .vips
        .iter()
        .map(|v| {
            let p = prev
                .vips
                .iter()
                .find(|p| p.vip == v.vip && p.proto == v.proto);
            VipRates {
                vip: v.vip.clone(),
                proto: v.proto,
                packets_per_s: rate(p.map(|p| p.packets), v.packets, elapsed),
                bytes_per_s: rate(p.map(|p| p.bytes), v.bytes, elapsed),
                new_flows_per_s: rate(p.map(|p| p.new_flows), v.new_flows, elapsed),
                backends: v
                    .backends
                    .iter()
                    .map(|b| {
                        let pb =
                            p.and_then(|p| p.backends.iter().find(|pb| pb.address == b.address));
                        BackendRates {
                            address: b.address,
                            packets_per_s: rate(pb.map(|x| x.packets), b.packets, elapsed),
                            bytes_per_s: rate(pb.map(|x| x.bytes), b.bytes, elapsed),
                            new_flows_per_s: rate(pb.map(|x| x.new_flows), b.new_flows, elapsed),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let reasons = cur
        .reasons
        .iter()
        .map(|(name, n)| {
            (
                name.clone(),
                rate(prev.reasons.get(name).copied(), *n, elapsed),
            )
        })
        .collect();
    Rates {
        interval_s: elapsed.as_secs_f64(),
        vips,
        reasons,
    }
}

/// A rate for a table cell: `-` when unknown, else 3 significant-ish digits with k/M/G.
fn fmt_rate(r: Option<f64>) -> String {
    match r {
        None => "-".to_string(),
        Some(x) if x < 1_000.0 => format!("{x:.1}"),
        Some(x) if x < 1_000_000.0 => format!("{:.1}k", x / 1e3),
        Some(x) if x < 1_000_000_000.0 => format!("{:.1}M", x / 1e6),
        Some(x) => format!("{:.1}G", x / 1e9),
    }
}

/// One `xlb stats --watch` frame (`rates` is `None` for the first):
/// ```text
/// xlb stats every 1s, 2026-05-20T10:00:12Z (Ctrl-C to quit)
///
/// VIP / BACKEND       PROTO  STATE  WEIGHT  ACTIVE  PACKETS  BYTES   NEW_FLOWS  PKT/S  BYTES/S  FLOWS/S
/// 10.111.100.1:80     tcp                           120      9840    30         12.0   984.0    3.0
///   -> 10.111.1.11           up     1       10      40       3280    10         4.0    328.0    1.0
/// ```
/// then the non-zero reasons and events and the flow table's fill.
pub fn watch_text(
    stats: &StatsReport,
    rates: Option<&Rates>,
    interval: Duration,
    now: SystemTime,
) -> String {
    let mut out = format!(
        "xlb stats every {}, {} (Ctrl-C to quit)\n\n",
        fmt_duration(interval),
        humantime::format_rfc3339_seconds(now)
    );
    let mut rows: Vec<Vec<String>> = Vec::new();
    for v in &stats.vips {
        let vr = rates.and_then(|r| r.vips.iter().find(|x| x.vip == v.vip && x.proto == v.proto));
        rows.push(vec![
            v.vip.clone(),
            v.proto.to_string(),
            String::new(),
            String::new(),
            v.backends
                .iter()
                .map(|b| b.active_flows)
                .sum::<u64>()
                .to_string(),
            v.packets.to_string(),
            v.bytes.to_string(),
            v.new_flows.to_string(),
            fmt_rate(vr.and_then(|r| r.packets_per_s)),
            fmt_rate(vr.and_then(|r| r.bytes_per_s)),
            fmt_rate(vr.and_then(|r| r.new_flows_per_s)),
        ]);
        for b in &v.backends {
            let br = vr.and_then(|r| r.backends.iter().find(|x| x.address == b.address));
            rows.push(vec![
                format!("  -> {}", b.address),
                String::new(),
                b.state.to_string(),
                b.weight.to_string(),
                b.active_flows.to_string(),
                b.packets.to_string(),
                b.bytes.to_string(),
                b.new_flows.to_string(),
                fmt_rate(br.and_then(|r| r.packets_per_s)),
                fmt_rate(br.and_then(|r| r.bytes_per_s)),
                fmt_rate(br.and_then(|r| r.new_flows_per_s)),
            ]);
        }
    }
    out.push_str(&table(
        "",
        &[
            "VIP / BACKEND",
            "PROTO",
            "STATE",
            "WEIGHT",
            "ACTIVE",
            "PACKETS",
            "BYTES",
            "NEW_FLOWS",
            "PKT/S",
            "BYTES/S",
            "FLOWS/S",
        ],
        &rows,
    ));
    // Zero reasons are noise in a live view; the full list is in plain `xlb stats`.
    let rows: Vec<Vec<String>> = stats
        .reasons
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(name, n)| {
            let r = rates.and_then(|r| r.reasons.get(name).copied().flatten());
            vec![name.clone(), n.to_string(), fmt_rate(r)]
        })
        .collect();
    out.push('\n');
    out.push_str(&table("", &["REASON", "PACKETS", "PKT/S"], &rows));
    let events: Vec<String> = stats
        .events
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    if !events.is_empty() {
        out.push_str(&format!("\nevents: {}\n", events.join(", ")));
    }
    out.push_str(&format!("\n{}\n", flow_table_line(stats)));
    out
}

/// `flow table: 12 of 262144 entries in use (0.0%)`.
fn flow_table_line(stats: &StatsReport) -> String {
    let pct = if stats.flow_capacity == 0 {
        0.0
    } else {
        stats.flow_entries as f64 * 100.0 / f64::from(stats.flow_capacity)
    };
    format!(
        "flow table: {} of {} entries in use ({pct:.1}%)",
        stats.flow_entries, stats.flow_capacity
    )
}

pub async fn backend_host(cmd: BackendHostCommand) -> Result<(), CliError> {
    match cmd {
        BackendHostCommand::Setup {
            vips,
            ifaces,
            xdp_mode,
        } => {
            let vips = vips
                .iter()
                .map(|v| parse_ipv4(v))
                .collect::<Result<Vec<_>, _>>()?;
            let record = backend_host::setup(&SetupOptions {
                vips,
                ifaces,
                mode: xdp_mode.into(),
                record_dir: PathBuf::from(RECORD_DIR),
            })
            .await?;
            let ifaces: Vec<String> = record
                .xdp
                .iter()
                .map(|x| format!("{} ({})", x.iface, x.mode))
                .collect();
            print(&format!(
                "backend host set up: {} VIP address(es) added to lo, {} sysctl(s) changed, decapsulator on {}\n",
                record.lo_addrs.len(),
                record.sysctls.len(),
                ifaces.join(", ")
            ))
        }
        BackendHostCommand::Teardown => {
            let record = backend_host::teardown(Path::new(RECORD_DIR)).await?;
            print(&format!(
                "backend host torn down: {} VIP address(es) removed from lo, {} sysctl(s) restored, decapsulator detached from {} interface(s)\n",
                record.lo_addrs.len(),
                record.sysctls.len(),
                record.xdp.len()
            ))
        }
    }
}

pub fn xdp_pass(cmd: XdpPassCommand) -> Result<(), CliError> {
    let iface = match &cmd {
        XdpPassCommand::Attach { iface, .. } | XdpPassCommand::Detach { iface } => iface.clone(),
    };
    if crate::agent::interface_index(&iface).is_err() {
        return Err(CliError::NoSuchInterface(iface));
    }
    let xdp_err = |source| CliError::Xdp {
        iface: iface.clone(),
        source: Box::new(source),
    };
    match cmd {
        XdpPassCommand::Attach { xdp_mode, .. } => {
            let mode = xdp_persist::attach_pass(&iface, xdp_mode.into()).map_err(xdp_err)?;
            print(&format!(
                "pass program attached to {iface} in {mode} mode\n"
            ))
        }
        XdpPassCommand::Detach { .. } => {
            xdp_persist::detach(&iface).map_err(xdp_err)?;
            print(&format!("XDP program detached from {iface}\n"))
        }
    }
}

/// Left-aligned columns, two spaces apart, each line prefixed with `indent`.
fn table(indent: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = indent.to_string();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `xlb vip list`:
/// ```text
/// VIP              PROTO  FORWARD  BACKENDS  ICMP_ECHO  CHECK
/// 10.111.100.1:80  tcp    ipip     3         on         http:/healthz every 200ms
/// ```
pub fn vip_table(vips: &[VipSummary]) -> String {
    let rows: Vec<Vec<String>> = vips
        .iter()
        .map(|v| {
            vec![
                v.vip.clone(),
                v.proto.to_string(),
                v.forward.to_string(),
                v.backends.len().to_string(),
                if v.icmp_echo { "on" } else { "off" }.to_string(),
                if v.check.kind == CheckKind::None {
                    v.check.summary()
                } else {
                    format!(
                        "{} every {}",
                        v.check.summary(),
                        fmt_duration(v.check.interval)
                    )
                },
            ]
        })
        .collect();
    table(
        "",
        &["VIP", "PROTO", "FORWARD", "BACKENDS", "ICMP_ECHO", "CHECK"],
        &rows,
    )
}

/// `xlb backend list VIP:PORT` (ages relative to `now`):
/// ```text
/// BACKEND      WEIGHT  STATE  SINCE                           LAST_CHECK  ACTIVE_FLOWS  PACKETS  BYTES  NEW_FLOWS
/// 10.111.1.11  1       up     2026-05-20T10:00:00Z (12s ago)  ok 1.2ms    3             10       840    10
/// ```
pub fn backend_table(vip: &VipReport, indent: &str, now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = vip
        .backends
        .iter()
        .map(|b| {
            let since = UNIX_EPOCH + Duration::from_millis(b.since_unix_ms);
            let age = now.duration_since(since).unwrap_or_default();
            vec![
                b.address.to_string(),
                b.weight.to_string(),
                b.state.to_string(),
                format!(
                    "{} ({} ago)",
                    humantime::format_rfc3339_seconds(since),
                    short_age(age)
                ),
                match &b.last_check {
                    None => "-".to_string(),
                    Some(c) if c.ok => format!("ok {:.1}ms", c.latency_ms),
                    Some(c) => format!("failed: {}", c.detail),
                },
                b.active_flows.to_string(),
                b.packets.to_string(),
                b.bytes.to_string(),
                b.new_flows.to_string(),
            ]
        })
        .collect();
    table(
        indent,
        &[
            "BACKEND",
            "WEIGHT",
            "STATE",
            "SINCE",
            "LAST_CHECK",
            "ACTIVE_FLOWS",
            "PACKETS",
            "BYTES",
            "NEW_FLOWS",
        ],
        &rows,
    )
}

/// `12s`, `3m12s`, `2h5m`, `3d4h`: the two largest units, enough to read at a glance.
fn short_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// `xlb stats`: one block per VIP (its counters, then its backends'), then the per-reason
/// counters and the flow-table capacity.
pub fn stats_text(stats: &StatsReport) -> String {
    let mut out = String::new();
    for v in &stats.vips {
        out.push_str(&format!(
            "VIP {}/{} forward {}: packets {} bytes {} new_flows {}\n",
            v.vip, v.proto, v.forward, v.packets, v.bytes, v.new_flows
        ));
        out.push_str(&backend_table(v, "  ", SystemTime::now()));
        out.push('\n');
    }
    let rows: Vec<Vec<String>> = stats
        .reasons
        .iter()
        .map(|(name, n)| vec![name.clone(), n.to_string()])
        .collect();
    out.push_str(&table("", &["REASON", "PACKETS"], &rows));
    let rows: Vec<Vec<String>> = stats
        .events
        .iter()
        .map(|(name, n)| vec![name.clone(), n.to_string()])
        .collect();
    out.push('\n');
    out.push_str(&table("", &["EVENT", "COUNT"], &rows));
    out.push_str(&format!("\n{}\n", flow_table_line(stats)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackendReport, BackendSummary};
    use clap::CommandFactory;

    fn report() -> VipReport {
        VipReport {
            vip: "10.111.100.1:80".into(),
            address: Ipv4Addr::new(10, 111, 100, 1),
            port: 80,
            proto: Proto::Tcp,
            forward: Forward::Ipip,
            packets: 30,
            bytes: 2520,
            new_flows: 30,
            backends: vec![BackendReport {
                address: Ipv4Addr::new(10, 111, 1, 11),
                weight: 1,
                state: crate::health::BackendState::Up,
                since: "2026-05-20T10:00:00.000Z".into(),
                since_unix_ms: 1_779_271_200_000,
                last_check: Some(crate::api::LastCheck {
                    ok: true,
                    detail: "connected".into(),
                    latency_ms: 1.23,
                    at_unix_ms: 1_779_271_211_000,
                }),
                active_flows: 3,
                packets: 10,
                bytes: 840,
                new_flows: 10,
                checks_ok: 12,
                checks_failed: 0,
            }],
        }
    }

    fn snapshot(vip: (u64, u64, u64), be: (u64, u64, u64), fwd_tx: u64) -> StatsReport {
        let mut v = report();
        (v.packets, v.bytes, v.new_flows) = vip;
        let b = &mut v.backends[0];
        (b.packets, b.bytes, b.new_flows) = be;
        StatsReport {
            vips: vec![v],
            reasons: [
                ("fwd_tx".to_string(), fwd_tx),
                ("drop_no_backend".to_string(), 0),
            ]
            .into_iter()
            .collect(),
            events: [("midflow_miss".to_string(), 0)].into_iter().collect(),
            flow_capacity: 1000,
            flow_entries: 250,
        }
    }

    #[test]
    fn rates_are_deltas_over_the_elapsed_time() {
        let prev = snapshot((100, 10_000, 10), (40, 4_000, 4), 100);
        let cur = snapshot((400, 40_000, 25), (190, 19_000, 9), 400);
        let r = rates(&prev, &cur, Duration::from_millis(1500));
        assert_eq!(r.interval_s, 1.5);
        let v = &r.vips[0];
        assert_eq!(
            (v.packets_per_s, v.bytes_per_s, v.new_flows_per_s),
            (Some(200.0), Some(20_000.0), Some(10.0))
        );
        let b = &v.backends[0];
        assert_eq!(
            (b.packets_per_s, b.bytes_per_s, b.new_flows_per_s),
            (Some(100.0), Some(10_000.0), Some(10.0 / 3.0))
        );
        assert_eq!(r.reasons["fwd_tx"], Some(200.0));
        assert_eq!(r.reasons["drop_no_backend"], Some(0.0));

        // A counter that went backwards (VIP removed and added again), a VIP or backend that
        // is new, and no elapsed time: no rate rather than a wrong one.
        let r = rates(&cur, &prev, Duration::from_secs(1));
        assert_eq!(r.vips[0].packets_per_s, None);
        assert_eq!(r.reasons["fwd_tx"], None);
        let mut other = cur.clone();
        other.vips[0].proto = Proto::Udp;
        other.vips[0].backends[0].address = Ipv4Addr::new(10, 111, 1, 99);
        let r = rates(&prev, &other, Duration::from_secs(1));
        assert_eq!(r.vips[0].bytes_per_s, None);
        let mut moved = cur.clone();
        moved.vips[0].backends[0].address = Ipv4Addr::new(10, 111, 1, 99);
        let r = rates(&prev, &moved, Duration::from_secs(1));
        assert_eq!(r.vips[0].packets_per_s, Some(300.0));
        assert_eq!(r.vips[0].backends[0].packets_per_s, None);
        assert_eq!(
            rates(&prev, &cur, Duration::ZERO).vips[0].packets_per_s,
            None
        );

        assert_eq!(fmt_rate(None), "-");
        assert_eq!(fmt_rate(Some(12.345)), "12.3");
        assert_eq!(fmt_rate(Some(20_000.0)), "20.0k");
        assert_eq!(fmt_rate(Some(3_500_000.0)), "3.5M");
        assert_eq!(fmt_rate(Some(1.25e9)), "1.2G");
    }

    #[test]
    fn watch_frames_show_totals_and_rates() {
        let prev = snapshot((100, 10_000, 10), (40, 4_000, 4), 100);
        let cur = snapshot((400, 40_000, 25), (190, 19_000, 9), 400);
        let r = rates(&prev, &cur, Duration::from_secs(1));
        let now = UNIX_EPOCH + Duration::from_secs(1_779_271_212);
        let text = watch_text(&cur, Some(&r), Duration::from_secs(1), now);
        assert_eq!(
            text,
            "xlb stats every 1s, 2026-05-20T10:00:12Z (Ctrl-C to quit)\n\n\
             VIP / BACKEND     PROTO  STATE  WEIGHT  ACTIVE  PACKETS  BYTES  NEW_FLOWS  PKT/S  BYTES/S  FLOWS/S\n\
             10.111.100.1:80   tcp                   3       400      40000  25         300.0  30.0k    15.0\n\
             \x20 -> 10.111.1.11         up     1       3       190      19000  9          150.0  15.0k    5.0\n\
             \n\
             REASON  PACKETS  PKT/S\n\
             fwd_tx  400      300.0\n\
             \n\
             flow table: 250 of 1000 entries in use (25.0%)\n"
        );
        // The first frame has no rates yet.
        let first = watch_text(&cur, None, Duration::from_secs(1), now);
        assert!(first.contains("  -> 10.111.1.11         up     1       3       190      19000  9          -      -        -\n"), "{first}");
        // --watch --json: the stats object with `rates` next to its fields, on one line.
        let line = serde_json::to_string(&WatchFrame {
            stats: &cur,
            rates: Some(&r),
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["vips"][0]["packets"], 400);
        assert_eq!(v["rates"]["vips"][0]["new_flows_per_s"], 15.0);
        assert_eq!(v["flow_entries"], 250);
        let first = serde_json::to_string(&WatchFrame {
            stats: &cur,
            rates: None,
        })
        .unwrap();
        assert!(first.ends_with(r#""rates":null}"#), "{first}");
    }

    #[test]
    fn stats_watch_and_vip_debug_parse() {
        let cli = Cli::try_parse_from(["xlb", "stats", "--watch", "--interval", "500ms", "--json"])
            .unwrap();
        let Command::Stats(a) = cli.command else {
            panic!()
        };
        assert!(a.watch && a.json);
        assert_eq!(a.interval, "500ms");
        let Command::Stats(a) = Cli::try_parse_from(["xlb", "stats"]).unwrap().command else {
            panic!()
        };
        assert!(!a.watch && !a.json);
        assert!(Cli::try_parse_from(["xlb", "stats", "--interval", "2s"]).is_err());
        let sock = Path::new("/nonexistent/xlb.sock");
        for bad in ["fast", "10ms"] {
            let e = super::stats(
                sock,
                StatsArgs {
                    json: false,
                    watch: true,
                    interval: bad.into(),
                },
            )
            .unwrap_err();
            assert!(
                matches!(e, CliError::Check(_) | CliError::WatchInterval(_)),
                "{e}"
            );
        }

        let cli = Cli::try_parse_from([
            "xlb",
            "vip",
            "debug",
            "10.111.100.1:5353",
            "--proto",
            "udp",
            "on",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Vip(VipCommand::Debug {
                proto: ProtoArg::Udp,
                state: OnOff::On,
                ..
            })
        ));
        assert!(Cli::try_parse_from(["xlb", "vip", "debug", "10.111.100.1:80", "maybe"]).is_err());
        let e = super::vip(
            sock,
            VipCommand::Debug {
                vip: "10.111.100.1".into(),
                proto: ProtoArg::Tcp,
                state: OnOff::Off,
            },
        )
        .unwrap_err();
        assert!(matches!(e, CliError::Parse(_)), "{e}");

        let cli = Cli::try_parse_from([
            "xlb",
            "agent",
            "--iface",
            "eth0",
            "--metrics-listen",
            "127.0.0.1:9477",
        ])
        .unwrap();
        let Command::Agent(args) = cli.command else {
            panic!()
        };
        assert_eq!(
            args.into_options(cli.socket).metrics_listen,
            Some("127.0.0.1:9477".parse().unwrap())
        );
    }

    #[test]
    fn lifecycle_and_check_flags_parse() {
        let cli = Cli::try_parse_from([
            "xlb",
            "vip",
            "add",
            "10.111.100.1:80",
            "--check",
            "http:/healthz",
            "--check-port",
            "8080",
            "--interval",
            "200ms",
            "--timeout",
            "150ms",
            "--rise",
            "2",
            "--fall",
            "3",
            "--expect-status",
            "200-399",
            "--expect-body",
            "ok",
            "--tls-verify",
        ])
        .unwrap();
        let Command::Vip(VipCommand::Add { check, .. }) = cli.command else {
            panic!()
        };
        let p = check.flags().to_patch().unwrap();
        assert_eq!(p.tls_verify, Some(true));
        assert_eq!(p.port, Some(8080));
        let cli = Cli::try_parse_from([
            "xlb",
            "vip",
            "set",
            "10.111.100.1:53",
            "--proto",
            "udp",
            "--tls-verify=false",
        ])
        .unwrap();
        let Command::Vip(VipCommand::Set { check, proto, .. }) = cli.command else {
            panic!()
        };
        assert_eq!(proto, ProtoArg::Udp);
        assert_eq!(check.flags().to_patch().unwrap().tls_verify, Some(false));
        assert!(matches!(
            Cli::try_parse_from([
                "xlb",
                "backend",
                "set",
                "10.111.100.1:80",
                "10.111.1.11",
                "--weight",
                "3"
            ])
            .unwrap()
            .command,
            Command::Backend(BackendCommand::Set { weight: 3, .. })
        ));
        assert!(
            Cli::try_parse_from(["xlb", "backend", "set", "10.111.100.1:80", "10.111.1.11"])
                .is_err()
        );
        for sub in ["drain", "undrain"] {
            assert!(
                Cli::try_parse_from(["xlb", "backend", sub, "10.111.100.1:80", "10.111.1.11"])
                    .is_ok()
            );
        }
        let cli = Cli::try_parse_from([
            "xlb",
            "backend",
            "add",
            "10.111.100.1:80",
            "10.111.1.11",
            "--check",
            "tcp",
            "--check-port",
            "22",
        ])
        .unwrap();
        let Command::Backend(BackendCommand::Add { check, .. }) = cli.command else {
            panic!()
        };
        assert!(!check.flags().to_patch().unwrap().is_empty());
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_command_lines() {
        let cli = Cli::try_parse_from([
            "xlb",
            "backend",
            "add",
            "10.111.100.1:80",
            "10.111.1.11",
            "--weight",
            "3",
            "--proto",
            "udp",
            "--socket",
            "/tmp/x.sock",
        ])
        .unwrap();
        assert_eq!(cli.socket, PathBuf::from("/tmp/x.sock"));
        assert!(matches!(
            cli.command,
            Command::Backend(BackendCommand::Add {
                weight: 3,
                proto: ProtoArg::Udp,
                ..
            })
        ));
        let cli = Cli::try_parse_from([
            "xlb",
            "backend-host",
            "setup",
            "--vip",
            "10.111.100.1",
            "--vip",
            "10.111.100.2",
            "--iface",
            "eth0",
            "--xdp-mode",
            "generic",
        ])
        .unwrap();
        match cli.command {
            Command::BackendHost(BackendHostCommand::Setup {
                vips,
                ifaces,
                xdp_mode,
            }) => {
                assert_eq!(vips.len(), 2);
                assert_eq!(ifaces, vec!["eth0".to_string()]);
                assert_eq!(xdp_mode, XdpModeArg::Generic);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "xlb",
            "agent",
            "--iface",
            "veth0",
            "--xdp-mode",
            "driver",
            "--state-dir",
            "/tmp/s",
            "--flow-capacity",
            "1000",
            "--icmp-echo",
            "off",
        ])
        .unwrap();
        let Command::Agent(args) = cli.command else {
            panic!()
        };
        let opts = args.into_options(cli.socket);
        assert_eq!(opts.iface.as_deref(), Some("veth0"));
        assert_eq!(opts.xdp_mode, Some(XdpModeChoice::Driver));
        assert_eq!(opts.flow_capacity, Some(1000));
        assert_eq!(opts.icmp_echo, Some(false));
        assert!(
            Cli::try_parse_from(["xlb", "vip", "add", "1.2.3.4:80", "--forward", "nat"]).is_err()
        );
        let echo = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.command) {
            Ok(Command::Vip(VipCommand::Add { icmp_echo, .. })) => Some(Some(icmp_echo)),
            Ok(Command::Vip(VipCommand::Set { icmp_echo, .. })) => Some(icmp_echo),
            _ => None,
        };
        assert_eq!(
            echo(&["xlb", "vip", "add", "1.2.3.4:80"]),
            Some(Some(OnOff::On))
        );
        let add_off = ["xlb", "vip", "add", "1.2.3.4:80", "--icmp-echo", "off"];
        assert_eq!(echo(&add_off), Some(Some(OnOff::Off)));
        assert_eq!(echo(&["xlb", "vip", "set", "1.2.3.4:80"]), Some(None));
        let set_on = ["xlb", "vip", "set", "1.2.3.4:80", "--icmp-echo", "on"];
        assert_eq!(echo(&set_on), Some(Some(OnOff::On)));
        let bad = ["xlb", "vip", "add", "1.2.3.4:80", "--icmp-echo", "maybe"];
        assert_eq!(echo(&bad), None);
        assert!(Cli::try_parse_from(["xlb", "backend-host", "setup"]).is_err());
    }

    #[test]
    fn malformed_addresses_fail_before_any_connection() {
        // The socket does not exist: a parse error must win over "cannot reach".
        let sock = Path::new("/nonexistent/xlb.sock");
        for vip in ["10.111.300.1:80", "foo", "10.111.100.1"] {
            let e = super::vip(
                sock,
                VipCommand::Add {
                    vip: vip.into(),
                    proto: ProtoArg::Tcp,
                    forward: ForwardArg::Ipip,
                    check: CheckArgs::default(),
                    icmp_echo: OnOff::On,
                },
            )
            .unwrap_err();
            assert!(matches!(e, CliError::Parse(_)), "{vip}: {e}");
        }
        let e = super::backend(
            sock,
            BackendCommand::Add {
                vip: "10.111.100.1:80".into(),
                backend: "10.111.1.300".into(),
                proto: ProtoArg::Tcp,
                weight: 1,
                check: Box::default(),
            },
        )
        .unwrap_err();
        assert!(matches!(e, CliError::Parse(_)), "{e}");
        // Bad check flags too: one line, before any connection.
        let bad = |f: fn(&mut CheckArgs)| {
            let mut check = CheckArgs::default();
            f(&mut check);
            super::vip(
                sock,
                VipCommand::Set {
                    vip: "10.111.100.1:80".into(),
                    proto: ProtoArg::Tcp,
                    check,
                    icmp_echo: None,
                },
            )
            .unwrap_err()
        };
        for e in [
            bad(|c| c.interval = Some("fast".into())),
            bad(|c| c.rise = Some("x".into())),
            bad(|c| c.expect_status = Some("200-100".into())),
            bad(|c| c.check = Some("ftp".into())),
        ] {
            assert!(matches!(e, CliError::Check(_)), "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn tables_have_the_documented_layout() {
        let vips = vec![VipSummary {
            vip: "10.111.100.1:80".into(),
            address: Ipv4Addr::new(10, 111, 100, 1),
            port: 80,
            proto: Proto::Tcp,
            forward: Forward::Ipip,
            check: crate::check::CheckSpec::default_for(Proto::Tcp),
            backends: vec![
                BackendSummary {
                    address: Ipv4Addr::new(10, 111, 1, 11),
                    weight: 1,
                    check: None,
                };
                3
            ],
            icmp_echo: true,
        }];
        assert_eq!(
            vip_table(&vips),
            "VIP              PROTO  FORWARD  BACKENDS  ICMP_ECHO  CHECK\n10.111.100.1:80  tcp    ipip     3         on         tcp every 1s\n"
        );
        let now = UNIX_EPOCH + Duration::from_millis(1_779_271_212_000);
        assert_eq!(
            backend_table(&report(), "", now),
            "BACKEND      WEIGHT  STATE  SINCE                           LAST_CHECK  ACTIVE_FLOWS  PACKETS  BYTES  NEW_FLOWS\n\
             10.111.1.11  1       up     2026-05-20T10:00:00Z (12s ago)  ok 1.2ms    3             10       840    10\n"
        );
        let mut down = report();
        down.backends[0].state = crate::health::BackendState::Down;
        down.backends[0].last_check.as_mut().unwrap().ok = false;
        down.backends[0].last_check.as_mut().unwrap().detail = "connection refused".into();
        assert!(
            backend_table(&down, "", now)
                .contains("  down   2026-05-20T10:00:00Z (12s ago)  failed: connection refused  3")
        );
        down.backends[0].last_check = None;
        assert!(backend_table(&down, "", now).contains("(12s ago)  -           3"));
        assert_eq!(short_age(Duration::from_secs(3725)), "1h2m");
        assert_eq!(short_age(Duration::from_secs(75)), "1m15s");
        let stats = StatsReport {
            vips: vec![report()],
            reasons: [("fwd_tx".to_string(), 30)].into_iter().collect(),
            events: [("midflow_miss".to_string(), 2)].into_iter().collect(),
            flow_capacity: 262144,
            flow_entries: 12,
        };
        let text = stats_text(&stats);
        assert!(text.starts_with(
            "VIP 10.111.100.1:80/tcp forward ipip: packets 30 bytes 2520 new_flows 30\n  BACKEND"
        ));
        assert!(text.contains("REASON  PACKETS\nfwd_tx  30\n"), "{text}");
        assert!(
            text.ends_with("flow table: 12 of 262144 entries in use (0.0%)\n"),
            "{text}"
        );
    }
}
