//! The command line: the clap definitions of every `xlb` subcommand.
//!
//! Addresses and check settings are taken as strings and parsed by `VipRef::key`,
//! `BackendRef::keys` and `CheckArgs::to_patch` rather than by clap, so a malformed one is
//! reported like every other input error (`xlb: error: ...`, exit 1) instead of as a usage error.
//! Values from a fixed set (`--proto`, `--forward`, `--xdp-mode`, on/off) are clap's: a typo
//! there is a usage error that lists the choices.

use crate::{
    agent::{DEFAULT_SOCKET, options::AgentArgs},
    dataplane::XdpModeChoice,
    model::{
        DEFAULT_WEIGHT, Forward, Proto, ServiceKey,
        addr::{ParseError, parse_addr_port, parse_ip, parse_prefix},
        check::{CheckError, CheckPatch, parse_duration, parse_kind},
        flows::{ClientPrefix, CountBy, FlowFilter},
        policy::{PolicyError, PolicyPatch, RateSetting, parse_burst, parse_list},
    },
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::{net::IpAddr, path::PathBuf};

#[derive(Debug, Parser)]
#[command(
    name = "xlb",
    version,
    about = "xlb: an XDP layer-4 load balancer with direct server return",
    long_about = "xlb steers packets for virtual services (VIPs) to backends at the NIC, with XDP.\n\
                  `xlb agent` attaches the data path to an interface and keeps the desired state;\n\
                  the other commands talk to it over a Unix socket."
)]
pub(crate) struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, env = "XLB_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub(crate) socket: PathBuf,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the agent: take over the data path pinned for an interface (or attach a new one),
    /// install the desired state (from --config or the state saved in --state-dir) and serve the
    /// CLI until SIGINT/SIGTERM. The data path keeps serving after the agent stops; `xlb detach`
    /// removes it.
    Agent(AgentArgs),
    /// Re-read the running agent's --config file and apply what changed (VIPs and backends
    /// added, removed, changed); an invalid file changes nothing. SIGHUP does the same.
    Reload,
    /// Remove the data path for good: detach the balancer from the interface, remove its pins,
    /// and put back what the agent changed on the host (IPv4 forwarding). A running agent is
    /// asked to do it over its socket, and exits.
    Detach(DetachArgs),
    /// Print a shell completion script for xlb.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (one per command) into DIR.
    #[command(hide = true)]
    ManPages { dir: PathBuf },
    /// Add, delete and list virtual services.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Add, delete and list the backends of a virtual service.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Per-VIP, per-backend and per-reason packet counters; with --watch, refreshed with
    /// per-second rates.
    Stats(StatsArgs),
    /// The flow table: list the most recent flows (client, VIP, backend, age, origin), count
    /// them (--count), or flush some (`flows flush`) so their next packets take a new backend.
    Flows(FlowsArgs),
    /// The global deny list: sources dropped at the door, whatever they send to this interface
    /// (VIPs and the load balancer's own addresses).
    #[command(subcommand)]
    Deny(DenyCommand),
    /// Peer sync (active-active): each peer's connection, flows sent and received, last message
    /// age, rejected messages, and the sync lag.
    Peers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// This node's route announcement (agent started with --announce-table): drain it (every
    /// VIP address withdrawn, the data path keeps serving what still arrives), undrain it, or
    /// show what is announced and why.
    #[command(subcommand)]
    Node(NodeCommand),
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

/// `xlb detach`: which data path.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["iface", "all", "pin_dir"])))]
pub(crate) struct DetachArgs {
    /// The interface whose data path to remove (in this network namespace).
    #[arg(long, value_name = "IF")]
    pub(crate) iface: Option<String>,
    /// Every xlb data path of this network namespace.
    #[arg(long)]
    pub(crate) all: bool,
    /// The data path pinned in this directory (`<bpffs>/xlb/ns<cookie>-if<index>`), e.g. one
    /// whose interface moved to another network namespace.
    #[arg(long, value_name = "DIR")]
    pub(crate) pin_dir: Option<PathBuf>,
    /// The bpffs the data path is pinned in (the agent's --bpffs).
    #[arg(long, value_name = "PATH", default_value = crate::dataplane::DEFAULT_BPFFS)]
    pub(crate) bpffs: PathBuf,
}

/// A virtual service on the command line: its address and port, and `--proto`.
#[derive(Clone, Debug, Args)]
pub(crate) struct VipRef {
    /// The VIP, ADDR:PORT, IPv6 in brackets (e.g. 10.111.100.1:80, [2001:db8::100]:80).
    pub(crate) vip: String,
    /// The VIP's protocol.
    #[arg(long, value_enum, default_value = "tcp")]
    pub(crate) proto: Proto,
}

impl VipRef {
    pub(crate) fn key(&self) -> Result<ServiceKey, ParseError> {
        let (addr, port) = parse_addr_port(&self.vip)?;
        Ok(ServiceKey {
            addr,
            port,
            proto: self.proto,
        })
    }
}

/// One backend of a virtual service on the command line.
#[derive(Clone, Debug, Args)]
pub(crate) struct BackendRef {
    #[command(flatten)]
    pub(crate) vip: VipRef,
    /// The backend's address, of the VIP's family (an IPv4 VIP forwarded with ipip may also
    /// have IPv6 backends); no port: direct server return keeps the VIP's port.
    pub(crate) backend: String,
}

impl BackendRef {
    /// The VIP's key and the backend's address; the VIP is checked first.
    pub(crate) fn keys(&self) -> Result<(ServiceKey, IpAddr), ParseError> {
        Ok((self.vip.key()?, parse_ip(&self.backend)?))
    }
}

/// `xlb stats` flags.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// Print JSON instead of tables (with --watch: one JSON object per line per interval).
    #[arg(long)]
    pub(crate) json: bool,
    /// Refresh every --interval with per-second rates (packets/s, bytes/s, new flows/s), until
    /// Ctrl-C.
    #[arg(long)]
    pub(crate) watch: bool,
    /// Time between two refreshes of --watch, e.g. 500ms, 2s.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1s",
        requires = "watch"
    )]
    pub(crate) interval: String,
}

/// Which flows: the filter flags of `xlb flows` and `xlb flows flush`, taken as typed and turned
/// into a `FlowFilter` by `to_filter`. Every one given must match.
#[derive(Clone, Debug, Default, Args)]
pub(crate) struct FilterArgs {
    /// Only the flows of this VIP, ADDR:PORT or [ADDR]:PORT (its protocol: --proto, default
    /// tcp).
    pub(crate) vip: Option<String>,
    /// Only flows of this protocol [default: both; with a VIP: tcp].
    #[arg(long, value_enum)]
    pub(crate) proto: Option<Proto>,
    /// Only the flows pinned to this backend (a backend of the VIP, or of any VIP).
    #[arg(long, value_name = "ADDR")]
    pub(crate) backend: Option<String>,
    /// Only the flows from clients in this prefix, IPv4 or IPv6 (ADDR/LEN, or one address).
    #[arg(long, value_name = "CIDR")]
    pub(crate) client: Option<String>,
}

impl FilterArgs {
    pub(crate) fn to_filter(&self) -> Result<FlowFilter, ParseError> {
        let vip = self
            .vip
            .as_deref()
            .map(|v| -> Result<ServiceKey, ParseError> {
                let (addr, port) = parse_addr_port(v)?;
                Ok(ServiceKey {
                    addr,
                    port,
                    proto: self.proto.unwrap_or_default(),
                })
            })
            .transpose()?;
        let client = self
            .client
            .as_deref()
            .map(|c| parse_prefix(c).map(|(addr, len)| ClientPrefix { addr, len }))
            .transpose()?;
        Ok(FlowFilter {
            vip,
            // With a VIP its key carries the protocol.
            proto: if vip.is_some() { None } else { self.proto },
            backend: self.backend.as_deref().map(parse_ip).transpose()?,
            client,
        })
    }
}

/// `xlb flows` flags (and its `flush` subcommand).
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct FlowsArgs {
    #[command(subcommand)]
    pub(crate) command: Option<FlowsCommand>,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
    /// Most flows listed, the most recent first (1-10000); the output says how many more
    /// matched.
    #[arg(long, value_name = "N", default_value = "50", conflicts_with = "count")]
    pub(crate) limit: String,
    /// Count the matching flows instead of listing them.
    #[arg(long)]
    pub(crate) count: bool,
    /// With --count: totals per VIP, per backend or per origin (local, peer).
    #[arg(long, value_enum, requires = "count")]
    pub(crate) by: Option<CountBy>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum FlowsCommand {
    /// Delete the matching flows from the flow table: their next packets take a backend as new
    /// flows (a TCP connection moved this way is reset by its new backend). Drain or remove the
    /// backend first, or the ring may give some of them the same backend again. Needs a filter,
    /// or --all.
    Flush {
        #[command(flatten)]
        filter: FilterArgs,
        /// Flush every flow (refused together with a filter).
        #[arg(long, conflicts_with_all = ["vip", "proto", "backend", "client"])]
        all: bool,
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
}

/// Health-check flags, shared by `vip add`, `vip set` and `backend add`: taken as typed and
/// turned into a `CheckPatch` by `to_patch`.
#[derive(Clone, Debug, Default, Args)]
pub(crate) struct CheckArgs {
    /// Health check: tcp (connect), http:/PATH, https:/PATH (GET, TLS certificate not verified
    /// unless --tls-verify or --tls-ca), postgres (a login and a query), postgres:primary or
    /// postgres:replica (the server must have that role), or none (always up) [default: tcp for
    /// TCP VIPs; none for UDP VIPs, because a TCP connect cannot check a UDP service].
    #[arg(long, value_name = "KIND")]
    pub(crate) check: Option<String>,
    /// Port checked on the backend's own address [default: the VIP's port].
    #[arg(long, value_name = "N")]
    pub(crate) check_port: Option<String>,
    /// Time between checks, e.g. 200ms [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub(crate) interval: Option<String>,
    /// Time a check may take, at most the interval [default: 1s, or the interval if shorter].
    #[arg(long, value_name = "DURATION")]
    pub(crate) timeout: Option<String>,
    /// Consecutive passed checks that bring a down backend back [default: 2].
    #[arg(long, value_name = "N")]
    pub(crate) rise: Option<String>,
    /// Consecutive failed checks that take a backend down [default: 3].
    #[arg(long, value_name = "N")]
    pub(crate) fall: Option<String>,
    /// HTTP status or range that passes, e.g. 200 or 200-399 [default: 200-399].
    #[arg(long, value_name = "STATUS")]
    pub(crate) expect_status: Option<String>,
    /// Text the HTTP body must contain ("" removes the condition).
    #[arg(long, value_name = "STR")]
    pub(crate) expect_body: Option<String>,
    /// Verify the https check's certificate (--tls-verify=false turns it off again).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub(crate) tls_verify: Option<String>,
    /// https: trust only the CA certificate(s) in this PEM file and verify the certificate
    /// ("" removes it).
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_ca: Option<String>,
    /// https: send this name (SNI, Host) and verify the certificate for it, still connecting to
    /// the backend's own address ("" removes it) [default: the backend's address].
    #[arg(long, value_name = "NAME")]
    pub(crate) tls_sni: Option<String>,
    /// postgres: the user the check logs in as (it needs LOGIN and nothing else).
    #[arg(long, value_name = "NAME")]
    pub(crate) check_user: Option<String>,
    /// postgres: the database to connect to [default: postgres].
    #[arg(long, value_name = "NAME")]
    pub(crate) check_database: Option<String>,
    /// postgres: file whose first line is the check user's password, read at every check; the
    /// password itself is never stored, listed or logged ("" removes it).
    #[arg(long, value_name = "FILE")]
    pub(crate) check_password_file: Option<String>,
}

/// A file named on the command line, as the agent (another process, another working directory)
/// must see it: absolute. "" stays "" (it removes the setting).
fn absolute(path: &Option<String>) -> Option<PathBuf> {
    path.as_deref().map(|p| {
        let p = PathBuf::from(p);
        if p.as_os_str().is_empty() || p.is_absolute() {
            p
        } else {
            std::path::absolute(&p).unwrap_or(p)
        }
    })
}

impl CheckArgs {
    /// The flags given, as a patch of a check (nothing given: an empty patch).
    pub(crate) fn to_patch(&self) -> Result<CheckPatch, CheckError> {
        let count = |what: &'static str, v: &Option<String>| -> Result<Option<u32>, CheckError> {
            v.as_deref()
                .map(|s| {
                    s.trim().parse::<u32>().map_err(|_| CheckError::Number {
                        what,
                        value: s.to_string(),
                    })
                })
                .transpose()
        };
        let duration = |what: &'static str, v: &Option<String>| {
            v.as_deref().map(|s| parse_duration(what, s)).transpose()
        };
        let (kind, path, role) = match self.check.as_deref().map(parse_kind).transpose()? {
            Some(k) => (Some(k.kind), k.path, k.role),
            None => (None, None, None),
        };
        let port = self
            .check_port
            .as_deref()
            .map(|p| match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => Err(CheckError::Port(p.to_string())),
                Ok(n) => Ok(n),
            })
            .transpose()?;
        let tls_verify = self
            .tls_verify
            .as_deref()
            .map(|v| match v {
                "true" | "yes" | "on" => Ok(true),
                "false" | "no" | "off" => Ok(false),
                other => Err(CheckError::Bool(other.to_string())),
            })
            .transpose()?;
        Ok(CheckPatch {
            kind,
            path,
            port,
            interval: duration("--interval", &self.interval)?,
            timeout: duration("--timeout", &self.timeout)?,
            rise: count("--rise", &self.rise)?,
            fall: count("--fall", &self.fall)?,
            expect_status: self.expect_status.as_deref().map(str::parse).transpose()?,
            expect_body: self.expect_body.clone(),
            tls_verify,
            tls_ca: absolute(&self.tls_ca),
            tls_sni: self.tls_sni.clone(),
            role,
            user: self.check_user.clone(),
            database: self.check_database.clone(),
            password_file: absolute(&self.check_password_file),
        })
    }
}

/// Source and new-flow-limit flags, shared by `vip add` and `vip set`: taken as typed and
/// turned into a `PolicyPatch` by `to_patch`.
#[derive(Clone, Debug, Default, Args)]
pub(crate) struct PolicyArgs {
    /// Only sources in this prefix (or address) may reach the VIP; repeatable [default: every
    /// source]. Prefixes of the VIP's family (IPv4 or IPv6). `vip set` replaces the list;
    /// `--allow-src none` clears it.
    #[arg(long, value_name = "CIDR")]
    pub(crate) allow_src: Vec<String>,
    /// Sources in this prefix may not reach the VIP, whatever --allow-src says; repeatable.
    /// `vip set` replaces the list; `--deny-src none` clears it.
    #[arg(long, value_name = "CIDR")]
    pub(crate) deny_src: Vec<String>,
    /// New flows per second from one source address to this VIP (1-10000000); `off` removes
    /// the limit [default: no limit].
    #[arg(long, value_name = "N")]
    pub(crate) src_rate: Option<String>,
    /// Flows one source may open at once above --src-rate [default: the rate].
    #[arg(long, value_name = "N")]
    pub(crate) src_burst: Option<String>,
    /// New flows per second to this VIP from all sources together; `off` removes the limit
    /// [default: no limit].
    #[arg(long, value_name = "N")]
    pub(crate) vip_rate: Option<String>,
    /// Flows the VIP takes at once above --vip-rate [default: the rate].
    #[arg(long, value_name = "N")]
    pub(crate) vip_burst: Option<String>,
}

impl PolicyArgs {
    /// The flags given, as a patch of a source policy (nothing given: an empty patch).
    pub(crate) fn to_patch(&self) -> Result<PolicyPatch, PolicyError> {
        let rate = |what, v: &Option<String>| {
            v.as_deref()
                .map(|s| RateSetting::parse(what, s))
                .transpose()
        };
        let burst =
            |what, v: &Option<String>| v.as_deref().map(|s| parse_burst(what, s)).transpose();
        Ok(PolicyPatch {
            allow_src: parse_list("--allow-src", &self.allow_src)?,
            deny_src: parse_list("--deny-src", &self.deny_src)?,
            src_rate: rate("--src-rate", &self.src_rate)?,
            src_burst: burst("--src-burst", &self.src_burst)?,
            vip_rate: rate("--vip-rate", &self.vip_rate)?,
            vip_burst: burst("--vip-burst", &self.vip_burst)?,
        })
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum VipCommand {
    /// Add a virtual service (with no backends yet).
    Add {
        #[command(flatten)]
        vip: VipRef,
        #[arg(long, value_enum, default_value = "ipip")]
        forward: Forward,
        #[command(flatten)]
        check: CheckArgs,
        /// Answer ICMP echo requests to the VIP's address (the address answers if any of its
        /// VIPs does, and the agent's --icmp-echo is on).
        #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
        icmp_echo: OnOff,
        /// (Boxed: the flags are large next to the other variants.)
        #[command(flatten)]
        policy: Box<PolicyArgs>,
    },
    /// Change a virtual service's health check, ICMP echo, source lists or new-flow limits
    /// (flags not given keep their values).
    Set {
        #[command(flatten)]
        vip: VipRef,
        #[command(flatten)]
        check: CheckArgs,
        /// Answer ICMP echo requests to the VIP's address (see `vip add`).
        #[arg(long, value_enum, value_name = "on|off")]
        icmp_echo: Option<OnOff>,
        #[command(flatten)]
        policy: Box<PolicyArgs>,
    },
    /// Delete a virtual service and its backends.
    Del {
        #[command(flatten)]
        vip: VipRef,
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
        #[command(flatten)]
        vip: VipRef,
        #[arg(value_enum)]
        state: OnOff,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DenyCommand {
    /// Add prefixes (or addresses), IPv4 or IPv6, to the deny list; those already on it are left
    /// as they are.
    Add {
        #[arg(value_name = "CIDR", required = true)]
        prefixes: Vec<String>,
    },
    /// Remove prefixes from the deny list (each must be on it).
    Del {
        #[arg(value_name = "CIDR", required = true)]
        prefixes: Vec<String>,
    },
    /// Print the deny list, one prefix per line.
    List {
        /// Print JSON (count, capacity, prefixes) instead.
        #[arg(long)]
        json: bool,
    },
    /// Replace the deny list with a file's: one prefix per line, `#` comments. Established flows
    /// are checked against the new list on their next packet; a bad line changes nothing and
    /// is named.
    Load {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BackendCommand {
    /// Add a backend to a virtual service.
    Add {
        #[command(flatten)]
        backend: BackendRef,
        /// Relative share of new flows (0-256; 0 = no new flows).
        #[arg(long, default_value_t = DEFAULT_WEIGHT)]
        weight: u32,
        /// A backup (HAProxy's `backup`): it takes new flows only while no regular backend of
        /// the VIP can (all down or drained); then every usable backup shares them by weight.
        #[arg(long)]
        backup: bool,
        /// Any check flag gives this backend its own check: the VIP's with these flags applied.
        /// (Boxed: the flags are large next to the other variants.)
        #[command(flatten)]
        check: Box<CheckArgs>,
    },
    /// Change a backend's weight at run time (a weight above 0 ends a drain).
    Set {
        #[command(flatten)]
        backend: BackendRef,
        /// Relative share of new flows (0-256; 0 = no new flows).
        #[arg(long, required = true)]
        weight: u32,
    },
    /// Drain a backend: weight 0, so no new flows; its existing flows stay until they end.
    Drain {
        #[command(flatten)]
        backend: BackendRef,
    },
    /// End a drain: the backend gets back the weight it had before.
    Undrain {
        #[command(flatten)]
        backend: BackendRef,
    },
    /// Remove a backend from a virtual service.
    Del {
        #[command(flatten)]
        backend: BackendRef,
    },
    /// List the backends of a virtual service: weight, state (up, down, draining) and since when,
    /// last check, flows and counters.
    List {
        #[command(flatten)]
        vip: VipRef,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum BackendHostCommand {
    /// Add the VIPs to lo, set the ARP and rp_filter sysctls DSR needs, and attach the
    /// decapsulator (IPv4 in IPv4, IPv6 in IPv6, IPv4 in IPv6); records what it did for
    /// `teardown`.
    Setup {
        /// A VIP this backend serves, IPv4 or IPv6 (repeatable).
        #[arg(long = "vip", value_name = "ADDR", required = true)]
        vips: Vec<String>,
        /// Interface to decapsulate on (repeatable) [default: every non-loopback interface that
        /// is up and has an IPv4 or IPv6 address other than link-local].
        #[arg(long = "iface", value_name = "IF")]
        ifaces: Vec<String>,
        #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
        xdp_mode: XdpModeChoice,
    },
    /// Undo exactly what `setup` did in this network namespace.
    Teardown,
}

#[derive(Debug, Subcommand)]
pub(crate) enum NodeCommand {
    /// Withdraw every VIP address from this node's announcement; the router moves the traffic
    /// to the other nodes, and this node keeps forwarding what still arrives. Survives agent
    /// restarts until `undrain`.
    Drain,
    /// Announce the VIP addresses again (each as soon as it has a serving backend).
    Undrain,
    /// Per VIP address: announced or not, and why not (node drained, starting, no healthy
    /// backend, not attached); the routing table, and whether BIRD answers (--bird-socket).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum XdpPassCommand {
    /// Attach the pass program to IFACE.
    Attach {
        iface: String,
        #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
        xdp_mode: XdpModeChoice,
    },
    /// Detach whatever XDP program IFACE has.
    Detach { iface: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::check::{CheckKind, CheckSpec, Role, StatusRange};
    use clap::CommandFactory;
    use std::time::Duration;

    fn flags(f: impl FnOnce(&mut CheckArgs)) -> Result<CheckPatch, CheckError> {
        let mut c = CheckArgs::default();
        f(&mut c);
        c.to_patch()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_become_a_patch() {
        let p = flags(|f| {
            f.check = Some("http:/healthz".into());
            f.check_port = Some("8080".into());
            f.interval = Some("200ms".into());
            f.timeout = Some("150ms".into());
            f.rise = Some("2".into());
            f.fall = Some("3".into());
            f.expect_status = Some("200-299".into());
            f.expect_body = Some("ok".into());
            f.tls_verify = Some("true".into());
        })
        .unwrap();
        let c = CheckSpec::default_for(Proto::Tcp).patched(&p);
        assert_eq!(c.kind, CheckKind::Http);
        assert_eq!(c.path, "/healthz");
        assert_eq!(c.port, Some(8080));
        assert_eq!(c.interval, Duration::from_millis(200));
        assert_eq!(c.timeout, Duration::from_millis(150));
        assert_eq!(c.expect_status, StatusRange { lo: 200, hi: 299 });
        assert_eq!(c.expect_body.as_deref(), Some("ok"));
        assert!(c.tls_verify);
        assert!(c.validate().is_ok());
        assert!(flags(|_| {}).unwrap().is_empty());
    }

    #[test]
    fn postgres_and_tls_flags_become_a_patch() {
        let p = flags(|f| {
            f.check = Some("postgres:replica".into());
            f.check_user = Some("xlbcheck".into());
            f.check_database = Some("app".into());
            f.check_password_file = Some("pg.password".into());
        })
        .unwrap();
        let c = CheckSpec::default_for(Proto::Tcp).patched(&p);
        assert_eq!((c.kind, c.role), (CheckKind::Postgres, Role::Replica));
        assert_eq!(c.database_name(), "app");
        // A relative file is made absolute here: the agent runs elsewhere.
        let file = c.password_file.clone().unwrap();
        assert!(
            file.is_absolute() && file.ends_with("pg.password"),
            "{file:?}"
        );
        assert!(c.validate().is_ok());
        // `postgres` alone is any role; "" removes a file.
        let any = flags(|f| {
            f.check = Some("postgres".into());
            f.check_password_file = Some(String::new());
        })
        .unwrap();
        assert_eq!(any.role, Some(Role::Any));
        assert_eq!(c.patched(&any).password_file, None);
        let https = flags(|f| {
            f.check = Some("https:/".into());
            f.tls_ca = Some("/etc/xlb/ca.pem".into());
            f.tls_sni = Some("www.example.com".into());
        })
        .unwrap();
        let c = CheckSpec::default_for(Proto::Tcp).patched(&https);
        assert!(c.verifies());
        assert_eq!(c.tls_sni.as_deref(), Some("www.example.com"));
    }

    #[test]
    fn bad_flags_are_one_line_errors() {
        let cases: Vec<(Result<CheckPatch, CheckError>, &str)> = vec![
            (
                flags(|f| f.interval = Some("2x".into())),
                "malformed duration \"2x\" for --interval",
            ),
            (
                flags(|f| f.timeout = Some("".into())),
                "malformed duration \"\" for --timeout",
            ),
            (flags(|f| f.rise = Some("-1".into())), "--rise \"-1\""),
            (
                flags(|f| f.check_port = Some("0".into())),
                "--check-port \"0\"",
            ),
            (
                flags(|f| f.expect_status = Some("500-200".into())),
                "malformed status \"500-200\"",
            ),
            (flags(|f| f.check = Some("icmp".into())), "unknown check"),
            (
                flags(|f| f.check = Some("postgres:standby".into())),
                "unknown PostgreSQL role \"standby\"",
            ),
            (flags(|f| f.tls_verify = Some("maybe".into())), "maybe"),
        ];
        for (r, want) in cases {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(!e.contains('\n'));
        }
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
        let p = check.to_patch().unwrap();
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
        let Command::Vip(VipCommand::Set { check, vip, .. }) = cli.command else {
            panic!()
        };
        assert_eq!(vip.proto, Proto::Udp);
        assert_eq!(check.to_patch().unwrap().tls_verify, Some(false));
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
        assert!(!check.to_patch().unwrap().is_empty());
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
                vip: VipRef {
                    proto: Proto::Udp,
                    ..
                },
                state: OnOff::On,
            })
        ));
        assert!(Cli::try_parse_from(["xlb", "vip", "debug", "10.111.100.1:80", "maybe"]).is_err());

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
            args.options.metrics_listen,
            Some("127.0.0.1:9477".parse().unwrap())
        );
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
        let Command::Backend(BackendCommand::Add {
            backend, weight, ..
        }) = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!((weight, backend.vip.proto), (3, Proto::Udp));
        assert_eq!(backend.backend, "10.111.1.11");
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
                assert_eq!(xdp_mode, XdpModeChoice::Generic);
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
        let opts = args.options;
        assert_eq!(opts.iface.as_deref(), Some("veth0"));
        assert_eq!(opts.xdp_mode, Some(XdpModeChoice::Driver));
        assert_eq!(opts.flow_capacity, Some(1000));
        assert_eq!(opts.icmp_echo, Some(false));
        assert_eq!(args.state_dir, PathBuf::from("/tmp/s"));
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
        let agent_bad = ["xlb", "agent", "--iface", "veth0", "--icmp-echo", "maybe"];
        assert!(Cli::try_parse_from(agent_bad).is_err());
        assert!(Cli::try_parse_from(["xlb", "backend-host", "setup"]).is_err());
    }

    fn flows(args: &[&str]) -> FlowsArgs {
        let mut argv = vec!["xlb", "flows"];
        argv.extend(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Flows(f) => f,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flows_flags_parse_into_a_filter() {
        let f = flows(&[]);
        assert!(f.command.is_none() && !f.count && !f.json);
        assert_eq!(f.limit, "50");
        assert!(f.filter.to_filter().unwrap().is_empty());

        let f = flows(&[
            "10.111.100.1:53",
            "--proto",
            "udp",
            "--backend",
            "10.111.1.11",
            "--client",
            "10.111.0.0/16",
            "--limit",
            "100",
            "--json",
        ]);
        assert_eq!(f.limit, "100");
        let filter = f.filter.to_filter().unwrap();
        assert_eq!(filter.vip.unwrap().to_string(), "10.111.100.1:53/udp");
        assert_eq!(filter.proto, None, "the VIP carries the protocol");
        assert_eq!(filter.backend, Some(IpAddr::from([10, 111, 1, 11])));
        assert_eq!(filter.client.unwrap().to_string(), "10.111.0.0/16");

        let f = flows(&["--proto", "tcp", "--client", "10.111.0.2"]);
        let filter = f.filter.to_filter().unwrap();
        assert_eq!((filter.vip, filter.proto), (None, Some(Proto::Tcp)));
        assert_eq!(filter.client.unwrap().to_string(), "10.111.0.2/32");
        let f = flows(&["10.111.100.1:80"]);
        assert_eq!(f.filter.to_filter().unwrap().vip.unwrap().proto, Proto::Tcp);

        let f = flows(&["--count", "--by", "backend"]);
        assert!(f.count);
        assert_eq!(f.by, Some(CountBy::Backend));
        assert!(Cli::try_parse_from(["xlb", "flows", "--by", "vip"]).is_err());
        assert!(Cli::try_parse_from(["xlb", "flows", "--count", "--by", "pid"]).is_err());
        assert!(Cli::try_parse_from(["xlb", "flows", "--count", "--limit", "5"]).is_err());

        let f = flows(&["flush", "--backend", "10.111.1.11", "10.111.100.1:80"]);
        let Some(FlowsCommand::Flush { filter, all, json }) = f.command else {
            panic!("{f:?}")
        };
        assert!(!all && !json);
        let filter = filter.to_filter().unwrap();
        assert_eq!(filter.vip.unwrap().to_string(), "10.111.100.1:80/tcp");
        assert_eq!(filter.backend, Some(IpAddr::from([10, 111, 1, 11])));
        let f = flows(&["flush", "--all"]);
        assert!(matches!(
            f.command,
            Some(FlowsCommand::Flush { all: true, .. })
        ));
        for with_filter in [
            &["flows", "flush", "--all", "10.111.100.1:80"][..],
            &["flows", "flush", "--all", "--backend", "10.111.1.11"],
            &["flows", "flush", "--all", "--client", "10.0.0.0/8"],
            &["flows", "flush", "--all", "--proto", "udp"],
        ] {
            let mut argv = vec!["xlb"];
            argv.extend(with_filter);
            assert!(Cli::try_parse_from(argv).is_err(), "{with_filter:?}");
        }
    }

    #[test]
    fn bad_flow_filters_are_one_line_errors() {
        for (args, want) in [
            (
                vec!["--client", "10.111.0.0/33"],
                "malformed prefix \"10.111.0.0/33\"",
            ),
            (
                vec!["--client", "10.111.0.1/16"],
                "did you mean 10.111.0.0/16?",
            ),
            (vec!["--client", "nowhere"], "malformed prefix \"nowhere\""),
            (
                vec!["--backend", "10.111.1.300"],
                "\"10.111.1.300\" is not an IPv4 address",
            ),
            (vec!["10.111.100.1"], "missing port"),
        ] {
            let e = flows(&args).filter.to_filter().unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn source_and_limit_flags_become_a_patch() {
        use crate::model::policy::RateSetting;
        let cli = Cli::try_parse_from([
            "xlb",
            "vip",
            "add",
            "10.111.100.1:80",
            "--allow-src",
            "10.0.0.0/8",
            "--allow-src",
            "192.0.2.1",
            "--deny-src",
            "10.1.0.0/16",
            "--src-rate",
            "10",
            "--src-burst",
            "20",
            "--vip-rate",
            "1000",
        ])
        .unwrap();
        let Command::Vip(VipCommand::Add { policy, .. }) = cli.command else {
            panic!()
        };
        let p = policy.to_patch().unwrap();
        assert_eq!(p.allow_src.as_ref().map(Vec::len), Some(2));
        assert_eq!(p.deny_src.as_ref().map(Vec::len), Some(1));
        assert_eq!(p.src_rate, Some(RateSetting::Rate(10)));
        assert_eq!(p.src_burst, Some(20));
        assert_eq!(p.vip_rate, Some(RateSetting::Rate(1000)));
        assert_eq!(p.vip_burst, None);
        let cli = Cli::try_parse_from([
            "xlb",
            "vip",
            "set",
            "10.111.100.1:80",
            "--allow-src",
            "none",
            "--src-rate",
            "off",
        ])
        .unwrap();
        let Command::Vip(VipCommand::Set { policy, .. }) = cli.command else {
            panic!()
        };
        let p = policy.to_patch().unwrap();
        assert_eq!(p.allow_src, Some(vec![]));
        assert_eq!(p.src_rate, Some(RateSetting::Off));
        for (flag, value, want) in [
            ("--src-rate", "0", "--src-rate must be at least 1"),
            ("--vip-rate", "lots", "malformed --vip-rate \"lots\""),
            ("--src-burst", "0", "--src-burst must be at least 1"),
            (
                "--allow-src",
                "10.0.0.0/33",
                "prefix length \"33\" is not 0-32",
            ),
            ("--deny-src", "10.0.0.1/24", "host bits set"),
        ] {
            let cli =
                Cli::try_parse_from(["xlb", "vip", "set", "10.111.100.1:80", flag, value]).unwrap();
            let Command::Vip(VipCommand::Set { policy, .. }) = cli.command else {
                panic!()
            };
            let e = policy.to_patch().unwrap_err().to_string();
            assert!(e.contains(want), "{flag} {value}: {e}");
        }
    }

    #[test]
    fn deny_commands_parse() {
        let cli = Cli::try_parse_from(["xlb", "deny", "add", "10.0.0.0/8", "192.0.2.1"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Deny(DenyCommand::Add { ref prefixes }) if prefixes.len() == 2
        ));
        assert!(Cli::try_parse_from(["xlb", "deny", "add"]).is_err());
        assert!(Cli::try_parse_from(["xlb", "deny", "del"]).is_err());
        assert!(matches!(
            Cli::try_parse_from(["xlb", "deny", "list", "--json"])
                .unwrap()
                .command,
            Command::Deny(DenyCommand::List { json: true })
        ));
        assert!(matches!(
            Cli::try_parse_from(["xlb", "deny", "load", "/tmp/feed.txt"])
                .unwrap()
                .command,
            Command::Deny(DenyCommand::Load { .. })
        ));
    }

    #[test]
    fn references_parse_the_vip_first() {
        let b = BackendRef {
            vip: VipRef {
                vip: "10.111.100.1:80".into(),
                proto: Proto::Udp,
            },
            backend: "10.111.1.11".into(),
        };
        let (key, addr) = b.keys().unwrap();
        assert_eq!(key.to_string(), "10.111.100.1:80/udp");
        assert_eq!(addr, IpAddr::from([10, 111, 1, 11]));
        let v6 = BackendRef {
            vip: VipRef {
                vip: "[2001:db8::100]:80".into(),
                proto: Proto::Tcp,
            },
            backend: "2001:db8:1::11".into(),
        };
        let (key, addr) = v6.keys().unwrap();
        assert_eq!(key.to_string(), "[2001:db8::100]:80/tcp");
        assert_eq!(addr, "2001:db8:1::11".parse::<IpAddr>().unwrap());
        let bad = BackendRef {
            vip: VipRef {
                vip: "10.111.100.1".into(),
                proto: Proto::Tcp,
            },
            backend: "nonsense".into(),
        };
        assert!(matches!(
            bad.keys().unwrap_err(),
            ParseError::MissingPort { .. }
        ));
    }
}
