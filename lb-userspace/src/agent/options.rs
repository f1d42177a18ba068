//! The agent's options, defined once: `AgentOptions` is both the flags of `xlb agent` and the
//! `[agent]` table of the config file, and `merge` lays the flags over the file. `AgentConfig`
//! is what `run` gets: every option resolved (defaults applied) and checked.

use crate::{
    agent::{
        DEFAULT_STATE_DIR, WARM_INTERVAL,
        announce::{AnnounceConfig, AnnounceError},
        config_file::{Config, ConfigError},
        state::DesiredState,
    },
    dataplane::XdpModeChoice,
    sync::{SyncConfig, SyncError, SyncKey},
};
use serde::Deserialize;
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

/// Options that may come from the command line or from `[agent]` in the config file (the key is
/// the flag's name with `_` for `-`, and `peers` for `--peer`). `None` (or no peers) = not given.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentOptions {
    /// Interface to attach the balancer to (or `iface` under [agent] in the config file).
    #[arg(long, value_name = "IF")]
    pub(crate) iface: Option<String>,
    /// XDP attach mode [default: auto].
    #[arg(long, value_enum, value_name = "MODE")]
    pub(crate) xdp_mode: Option<XdpModeChoice>,
    /// Outer source address of IPIP packets [default: the interface's first IPv4 address].
    #[arg(long, value_name = "ADDR")]
    pub(crate) lb_addr: Option<Ipv4Addr>,
    /// Outer source address of IPv6-in-IPv6 and IPv4-in-IPv6 packets (`ipip` to IPv6 backends)
    /// [default: the interface's first global IPv6 address].
    #[arg(long, value_name = "ADDR")]
    pub(crate) lb_addr6: Option<Ipv6Addr>,
    /// Entries of the flow table [default: 262144].
    #[arg(long, value_name = "N")]
    pub(crate) flow_capacity: Option<u32>,
    /// Entries of the embryonic table, where new TCP flows wait for their first packet without
    /// SYN, so a SYN flood churns it and not the flow table [default: 65536].
    #[arg(long, value_name = "N")]
    pub(crate) embryonic_capacity: Option<u32>,
    /// Accept flow state from peer load balancers on ADDR:PORT (active-active). Needs
    /// --sync-key-file.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) sync_listen: Option<SocketAddr>,
    /// A peer load balancer's --sync-listen address: this agent streams its flows there (its
    /// whole flow table first, on every (re)connect). Repeat for several peers.
    #[arg(long = "peer", value_name = "ADDR:PORT")]
    #[serde(default)]
    pub(crate) peers: Vec<SocketAddr>,
    /// File holding the key shared by all peers (at least 16 bytes; surrounding whitespace is
    /// ignored). Sync connections are encrypted and authenticated with a key derived from it
    /// (a Noise handshake with it as the pre-shared key).
    #[arg(long, value_name = "FILE")]
    pub(crate) sync_key_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9477).
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// Answer ICMP echo requests to VIP addresses at all; off drops them whatever the VIPs'
    /// --icmp-echo [default: on]. (TOML: `icmp_echo = true|false`.)
    #[arg(long, value_name = "on|off", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) icmp_echo: Option<bool>,
    /// Where the data path is pinned so that it outlives the agent: a bpffs mount (mounted there
    /// when missing, in the host's mount namespace only) [default: /sys/fs/bpf].
    #[arg(long, value_name = "PATH")]
    pub(crate) bpffs: Option<PathBuf>,
    /// Announce the VIP addresses this node can serve as blackhole /32 routes in this kernel
    /// routing table, for the node's routing daemon (BIRD, FRR) to announce by BGP. Not 253,
    /// 254, 255; a table of its own that no `ip rule` uses. [default: off]
    #[arg(long, value_name = "N")]
    pub(crate) announce_table: Option<u64>,
    /// Route protocol number that marks xlb's routes in --announce-table (`ip route ... proto
    /// N`; the routing daemon's import filter matches it) [default: 120].
    #[arg(long, value_name = "N")]
    pub(crate) announce_proto: Option<u64>,
    /// BIRD's control socket: the agent checks every few seconds that BIRD answers there and
    /// reports it (`xlb node status`, the log, metrics).
    #[arg(long, value_name = "PATH")]
    pub(crate) bird_socket: Option<PathBuf>,
}

impl AgentOptions {
    /// These options (the flags) over `file`'s: each option given here wins; `--peer` given at
    /// least once replaces the file's `peers`.
    pub(crate) fn merge(self, file: AgentOptions) -> AgentOptions {
        AgentOptions {
            iface: self.iface.or(file.iface),
            xdp_mode: self.xdp_mode.or(file.xdp_mode),
            lb_addr: self.lb_addr.or(file.lb_addr),
            lb_addr6: self.lb_addr6.or(file.lb_addr6),
            flow_capacity: self.flow_capacity.or(file.flow_capacity),
            embryonic_capacity: self.embryonic_capacity.or(file.embryonic_capacity),
            sync_listen: self.sync_listen.or(file.sync_listen),
            peers: if self.peers.is_empty() {
                file.peers
            } else {
                self.peers
            },
            sync_key_file: self.sync_key_file.or(file.sync_key_file),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            icmp_echo: self.icmp_echo.or(file.icmp_echo),
            bpffs: self.bpffs.or(file.bpffs),
            announce_table: self.announce_table.or(file.announce_table),
            announce_proto: self.announce_proto.or(file.announce_proto),
            bird_socket: self.bird_socket.or(file.bird_socket),
        }
    }
}

/// `xlb agent`: the options, and what only the command line gives.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct AgentArgs {
    #[command(flatten)]
    pub(crate) options: AgentOptions,
    /// Directory of the persisted desired state (state.json).
    #[arg(long, env = "XLB_STATE_DIR", default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    pub(crate) state_dir: PathBuf,
    /// TOML file with the VIPs to serve (replaces the saved state) and optional [agent] options;
    /// command-line flags win over the file. `xlb reload` (or SIGHUP) applies its changes.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Remove the data path when the agent stops on SIGTERM/SIGINT (without it, the data path
    /// keeps serving until `xlb detach`).
    #[arg(long)]
    pub(crate) detach_on_exit: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum OptionsError {
    #[error("no interface given: pass --iface or set iface under [agent] in the config file")]
    NoInterface,
    #[error("--flow-capacity must be at least 1")]
    FlowCapacity,
    #[error("--embryonic-capacity must be at least 1")]
    EmbryonicCapacity,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("peer sync: {0}")]
    Sync(#[from] SyncError),
    #[error("--peer and --sync-key-file need --sync-listen (peer sync is off without it)")]
    SyncWithoutListen,
    #[error("--sync-listen needs --sync-key-file: peer sync is always authenticated")]
    SyncWithoutKey,
    #[error(transparent)]
    Announce(#[from] AnnounceError),
}

/// Where the agent's initial desired state comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum InitialState {
    /// `--config FILE`: its VIPs replace whatever was saved.
    Config { path: PathBuf, state: DesiredState },
    /// `<state-dir>/state.json`, if present; empty otherwise.
    Saved,
}

/// Everything `run` needs, resolved and validated.
#[derive(Clone, Debug)]
pub(crate) struct AgentConfig {
    pub(crate) iface: String,
    pub(crate) xdp_mode: XdpModeChoice,
    pub(crate) socket: PathBuf,
    pub(crate) state_dir: PathBuf,
    pub(crate) lb_addr: Option<Ipv4Addr>,
    pub(crate) lb_addr6: Option<Ipv6Addr>,
    pub(crate) flow_capacity: u32,
    pub(crate) embryonic_capacity: u32,
    pub(crate) initial: InitialState,
    pub(crate) warm_interval: Duration,
    /// Peer sync (active-active), if `--sync-listen` was given.
    pub(crate) sync: Option<SyncConfig>,
    /// Where `/metrics` is served, if anywhere.
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// The global ICMP echo switch (each VIP address also needs a VIP that allows it).
    pub(crate) icmp_echo: bool,
    /// The bpffs the data path is pinned in.
    pub(crate) bpffs: PathBuf,
    /// Remove the data path on SIGTERM/SIGINT.
    pub(crate) detach_on_exit: bool,
    /// Route announcement, if `--announce-table` was given.
    pub(crate) announce: Option<AnnounceConfig>,
}

impl AgentConfig {
    /// Lay the flags over the config file's `[agent]` table, apply the defaults, and load the
    /// file's VIPs. Any error in the file is an error here, before anything is touched.
    pub(crate) fn resolve(args: AgentArgs, socket: PathBuf) -> Result<AgentConfig, OptionsError> {
        let (file, initial) = match &args.config {
            Some(path) => {
                let cfg = Config::load(path)?;
                let initial = InitialState::Config {
                    path: path.clone(),
                    state: cfg.state,
                };
                (cfg.agent, initial)
            }
            None => (AgentOptions::default(), InitialState::Saved),
        };
        let opts = args.options.merge(file);
        let iface = opts.iface.clone().ok_or(OptionsError::NoInterface)?;
        let flow_capacity = opts
            .flow_capacity
            .unwrap_or(lb_common::DEFAULT_FLOW_CAPACITY);
        if flow_capacity == 0 {
            return Err(OptionsError::FlowCapacity);
        }
        let embryonic_capacity = opts
            .embryonic_capacity
            .unwrap_or(lb_common::DEFAULT_EMBRYO_CAPACITY);
        if embryonic_capacity == 0 {
            return Err(OptionsError::EmbryonicCapacity);
        }
        Ok(AgentConfig {
            sync: sync_config(&opts)?,
            iface,
            xdp_mode: opts.xdp_mode.unwrap_or_default(),
            socket,
            state_dir: args.state_dir,
            lb_addr: opts.lb_addr,
            lb_addr6: opts.lb_addr6,
            flow_capacity,
            embryonic_capacity,
            initial,
            warm_interval: WARM_INTERVAL,
            metrics_listen: opts.metrics_listen,
            icmp_echo: opts.icmp_echo.unwrap_or(true),
            bpffs: opts
                .bpffs
                .unwrap_or_else(|| PathBuf::from(crate::dataplane::DEFAULT_BPFFS)),
            detach_on_exit: args.detach_on_exit,
            announce: AnnounceConfig::from_options(
                opts.announce_table,
                opts.announce_proto,
                opts.bird_socket.clone(),
            )?,
        })
    }
}

/// Peer sync runs with a listen address and a key; peers or a key without a listen address are
/// a mistake, not a silent "off".
fn sync_config(opts: &AgentOptions) -> Result<Option<SyncConfig>, OptionsError> {
    match (opts.sync_listen, &opts.sync_key_file) {
        (Some(listen), Some(key_file)) => {
            let key = SyncKey::load(key_file).map_err(SyncError::from)?;
            Ok(Some(SyncConfig::new(listen, opts.peers.clone(), key)?))
        }
        (Some(_), None) => Err(OptionsError::SyncWithoutKey),
        (None, Some(_)) => Err(OptionsError::SyncWithoutListen),
        (None, None) if !opts.peers.is_empty() => Err(OptionsError::SyncWithoutListen),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn args(options: AgentOptions) -> AgentArgs {
        AgentArgs {
            options,
            state_dir: PathBuf::from("/nonexistent/state"),
            config: None,
            detach_on_exit: false,
        }
    }

    fn resolve(options: AgentOptions) -> Result<AgentConfig, OptionsError> {
        AgentConfig::resolve(args(options), PathBuf::from("/nonexistent/s"))
    }

    #[test]
    fn options_merge_flags_over_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("xlb.toml");
        fs::write(
            &cfg,
            "[agent]\niface = \"eth9\"\nxdp_mode = \"generic\"\nflow_capacity = 77\nembryonic_capacity = 33\nlb_addr = \"10.0.0.1\"\nicmp_echo = false\n\
             announce_table = 100\nbird_socket = \"/run/bird/bird.ctl\"\n\
             [[vip]]\naddress = \"10.111.100.1:80\"\n",
        )
        .unwrap();
        let with_file = |options| AgentArgs {
            config: Some(cfg.clone()),
            ..args(options)
        };
        let c =
            AgentConfig::resolve(with_file(AgentOptions::default()), dir.path().join("s")).unwrap();
        assert_eq!(c.iface, "eth9");
        assert_eq!(c.xdp_mode, XdpModeChoice::Generic);
        assert_eq!(c.flow_capacity, 77);
        assert_eq!(c.embryonic_capacity, 33);
        assert_eq!(c.lb_addr, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(!c.icmp_echo);
        let announce = c.announce.as_ref().expect("announce_table from the file");
        assert_eq!((announce.table, announce.proto), (100, 120));
        assert_eq!(
            announce.bird_socket.as_deref(),
            Some(std::path::Path::new("/run/bird/bird.ctl"))
        );
        assert!(matches!(&c.initial, InitialState::Config { state, .. } if state.vip_count() == 1));

        let flags = AgentOptions {
            iface: Some("veth0".into()),
            xdp_mode: Some(XdpModeChoice::Driver),
            flow_capacity: Some(5),
            icmp_echo: Some(true),
            announce_table: Some(7),
            announce_proto: Some(77),
            ..Default::default()
        };
        let c = AgentConfig::resolve(with_file(flags), dir.path().join("s")).unwrap();
        assert_eq!(c.iface, "veth0");
        let announce = c.announce.expect("announce_table from the flag");
        assert_eq!((announce.table, announce.proto), (7, 77));
        assert!(c.icmp_echo);
        assert_eq!(c.xdp_mode, XdpModeChoice::Driver);
        assert_eq!(c.flow_capacity, 5);

        let none = resolve(AgentOptions::default());
        assert!(matches!(none, Err(OptionsError::NoInterface)));
        let defaults = resolve(AgentOptions {
            iface: Some("lo".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(defaults.flow_capacity, lb_common::DEFAULT_FLOW_CAPACITY);
        assert_eq!(
            defaults.embryonic_capacity,
            lb_common::DEFAULT_EMBRYO_CAPACITY
        );
        assert!(defaults.icmp_echo);
        assert!(defaults.announce.is_none());
        assert_eq!(defaults.initial, InitialState::Saved);
    }

    #[test]
    fn peers_from_the_flags_replace_the_files() {
        let flag: SocketAddr = "10.111.1.4:7946".parse().unwrap();
        let file = AgentOptions {
            peers: vec!["10.111.1.3:7946".parse().unwrap()],
            sync_listen: Some("10.111.1.2:7946".parse().unwrap()),
            ..Default::default()
        };
        let merged = AgentOptions {
            peers: vec![flag],
            ..Default::default()
        }
        .merge(file.clone());
        assert_eq!(merged.peers, vec![flag]);
        assert_eq!(merged.sync_listen, file.sync_listen);
        assert_eq!(AgentOptions::default().merge(file.clone()), file);
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

        let off = resolve(base()).unwrap();
        assert!(off.sync.is_none());
        let on = resolve(AgentOptions {
            sync_listen: Some(listen),
            peers: vec![peer],
            sync_key_file: Some(key.clone()),
            ..base()
        })
        .unwrap();
        let sync = on.sync.expect("sync configured");
        assert_eq!((sync.listen, sync.peers), (listen, vec![peer]));

        let no_key = resolve(AgentOptions {
            sync_listen: Some(listen),
            ..base()
        });
        assert!(matches!(no_key, Err(OptionsError::SyncWithoutKey)));
        let no_listen = resolve(AgentOptions {
            peers: vec![peer],
            sync_key_file: Some(key.clone()),
            ..base()
        });
        assert!(matches!(no_listen, Err(OptionsError::SyncWithoutListen)));
        fs::write(&key, "short").unwrap();
        let weak = resolve(AgentOptions {
            sync_listen: Some(listen),
            sync_key_file: Some(key),
            ..base()
        })
        .unwrap_err();
        assert!(weak.to_string().contains("16"), "{weak}");
    }
}
