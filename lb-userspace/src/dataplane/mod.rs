//! The kernel side as seen from the agent: the loaded XDP object and typed handles to its maps.
//! Parts: `live` (the data path in bpffs: take over or prepare, go live, remove), `pins` (its
//! directory, lock and links), `plan` (which pinned map each state map is), `migrate` (copies
//! into maps of another capacity or layout), `adopt` (bookkeeping read back from a running data
//! path), `meta` (what was changed on the host), `attach` (how the balancer is attached),
//! `vips` (VIPs, backend slots and rings in the maps), `flows` (the flow table: peers' flows
//! installed, walks for counts and snapshots), `stats` (counters), `ring` (ring construction),
//! `object` (the embedded object and its programs), `persistent` (programs that outlive the
//! process: decapsulator, pass program).

pub mod adopt;
pub mod attach;
mod batch;
pub mod firewall;
pub mod flows;
pub mod live;
mod meta;
mod migrate;
pub mod object;
pub mod persistent;
pub mod pins;
mod plan;
pub mod ring;
pub mod stats;
pub mod vips;

pub use adopt::DownBackend;
pub use attach::{AttachedMode, UnknownXdpMode, XdpModeChoice};
pub use firewall::{DenyCount, DenyMaps, VipDropCounts};
pub use flows::{ACTIVE_FLOW_WINDOW, FlowCounts, FlowTable, InstallReport, monotonic_ns};
pub use live::{Startup, remove_data_path};
pub use meta::{announced_routes, record_routes};
pub use pins::{DEFAULT_BPFFS, PinDir, PinError};
pub use plan::PlanError;
pub use stats::{BackendStats, Counters, DataplaneStats, VipStats};

use crate::{
    dataplane::{object::EBPF_OBJECT, ring::RingError},
    model::{ServiceKey, net::IpNet, policy::SourcePolicy},
    netlink::NetlinkError,
    util::NoSuchInterface,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use lb_common::{
    Addr, Backend, CONFIG_F_ICMP_ECHO, DEFAULT_EMBRYO_CAPACITY, LbConfig, MAX_BACKENDS, MAX_VIPS,
    POLICY_F_DEBUG, PolicyState, TrafficCounters, VipAddr, VipDrops, VipKey, VipKey6, VipLimits,
    VipMeta, maps, programs,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::PathBuf,
};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    NoSuchInterface(#[from] NoSuchInterface),
    #[error("loading the XDP object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching XDP to {iface} in {mode} mode failed: {source}")]
    Attach {
        iface: String,
        mode: AttachedMode,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name} is missing from the XDP object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no free VIP slot: at most {MAX_VIPS} VIPs")]
    NoVipSlot,
    #[error(
        "{0} is an IPv6 backend of an ipip VIP, and this agent has no outer IPv6 source for IPv6 in IPv6 or IPv4 in IPv6 (no global IPv6 address on its interface): give --lb-addr6"
    )]
    NoLbAddr6(IpAddr),
    #[error(
        "not enough free backend slots: {needed} needed, {free} free (at most {MAX_BACKENDS} over all VIPs)"
    )]
    NoBackendSlots { needed: usize, free: usize },
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("unknown VIP {0}")]
    UnknownVip(ServiceKey),
    #[error("{iface}: {source}")]
    Netlink {
        iface: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pin(Box<PinError>),
    #[error(transparent)]
    Plan(Box<PlanError>),
    #[error("{what}: {source}")]
    Link {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "{} holds a live xlb data path (program {prog}) that is not the one on {iface} in this network namespace (its interface moved to another namespace?); `xlb detach --pin-dir {}` removes it",
        dir.display(), dir.display()
    )]
    LinkElsewhere {
        iface: String,
        dir: PathBuf,
        prog: u32,
    },
    #[error(
        "{iface} already has an XDP program (id {prog}){}",
        match dirs.first() {
            Some(d) => format!(": the xlb data path pinned at {} (another network namespace or interface); `xlb detach --pin-dir {}` removes it", d.display(), d.display()),
            None => " that xlb did not attach; remove it first (ip link set dev IF xdp off)".to_string(),
        }
    )]
    Foreign {
        iface: String,
        prog: u32,
        dirs: Vec<PathBuf>,
    },
    #[error(
        "source {what} lists are full: {used} prefixes in use over all VIPs, {new} more asked for, at most {max}"
    )]
    SourceListsFull {
        what: &'static str,
        used: usize,
        new: usize,
        max: usize,
    },
    #[error("the deny list holds at most {max} prefixes, {n} given")]
    DenyListFull { n: usize, max: usize },
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    pub iface: String,
    pub mode: XdpModeChoice,
    /// Entries of the LRU flow table.
    pub flow_capacity: u32,
    /// Entries of the LRU embryonic-flow table.
    pub embryo_capacity: u32,
    /// Outer source of IPIP packets.
    pub lb_addr: Ipv4Addr,
    /// Outer source of IPv6-in-IPv6 and IPv4-in-IPv6 packets (`None`: `ipip` to IPv6 backends
    /// drops, counted as `drop_encap_failed`).
    pub lb_addr6: Option<Ipv6Addr>,
    /// Where bpffs is mounted (or is to be mounted): `--bpffs`.
    pub bpffs: PathBuf,
    /// The deny list, installed before the balancer is attached.
    pub deny: Vec<IpNet>,
}

/// A VIP as installed: its slot ids, which ring half is live, and the addresses of its backend
/// slots in spec order.
struct InstalledVip {
    id: u32,
    half: u32,
    backends: Vec<(IpAddr, u32)>,
    /// Whether this VIP lets its address answer ICMP echo (`VipSpec::icmp_echo`).
    icmp_echo: bool,
    /// Its source lists and limits, as installed in `list_half`.
    policy: SourcePolicy,
    /// The live half of its source lists.
    list_half: u32,
    /// Lists left in the other half by a clear that failed: removed before that half is
    /// written again.
    leftover: Option<SourcePolicy>,
}

type KernelHash<K, V> = HashMap<MapData, K, V>;

/// The loaded object and typed handles to its maps. Dropping it never detaches the balancer:
/// an attached data path is held by its pinned link (`live`), and only `detach` removes it.
pub struct Dataplane {
    ebpf: Ebpf,
    mode: Option<AttachedMode>,
    flow_capacity: u32,
    vips_map: KernelHash<VipKey, VipMeta>,
    vip_addrs: KernelHash<u32, VipAddr>,
    /// The IPv6 twins of `vips_map` and `vip_addrs`.
    vips6: KernelHash<VipKey6, VipMeta>,
    vip_addrs6: KernelHash<Addr, VipAddr>,
    rings: Array<MapData, u32>,
    rr_counters: Array<MapData, u64>,
    backends_map: Array<MapData, Backend>,
    vip_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    reason_stats: PerCpuArray<MapData, u64>,
    event_stats: PerCpuArray<MapData, u64>,
    debug_vips: Array<MapData, u32>,
    config: Array<MapData, LbConfig>,
    lb_config: LbConfig,
    /// `POLICY`, and what this agent last wrote there (or found, taking over).
    policy: Array<MapData, PolicyState>,
    policy_state: PolicyState,
    /// `POLICY` held a generation at load (taken over, not created): flows copied from the old
    /// data path were stamped under it and may keep their stamps.
    policy_carried: bool,
    vip_allow: firewall::VipTrie,
    vip_deny: firewall::VipTrie,
    vip_allow6: firewall::VipTrie6,
    vip_deny6: firewall::VipTrie6,
    vip_limits: Array<MapData, VipLimits>,
    vip_buckets: Array<MapData, u64>,
    vip_drops: PerCpuArray<MapData, VipDrops>,
    /// Host entries to move out of the live deny-list trie once this program serves.
    deny_tidy: Option<firewall::DenyTidy>,
    embryo_capacity: u32,
    /// Forwards the XDP program's debug events (aya-log) to this process's log.
    log_pump: Option<tokio::task::JoinHandle<()>>,
    installed: BTreeMap<ServiceKey, InstalledVip>,
    free_vip_ids: BTreeSet<u32>,
    free_backend_ids: BTreeSet<u32>,
    /// Ids of the VIPs whose debug events are on (`DEBUG_VIPS`); `POLICY_F_DEBUG` is set while
    /// there is one.
    debugged: BTreeSet<u32>,
    nr_cpus: usize,
    /// The data path's directory in bpffs and what is left to do there (`None` for loads
    /// without pins: tests and benchmarks).
    pinned: Option<live::Pinned>,
}

/// The number of possible CPUs (the length of per-CPU values).
pub(crate) fn possible_cpus() -> Result<usize, DataplaneError> {
    aya::util::nr_cpus().map_err(|(what, source)| DataplaneError::Io {
        what: what.to_string(),
        source,
    })
}

impl Dataplane {
    /// A handle of its own to map `name` of the object (a duplicated file descriptor), for
    /// threads other than the one that owns the `Dataplane`.
    fn reopen(&self, name: &'static str) -> Result<aya::maps::Map, DataplaneError> {
        use aya::maps::Map;
        let data = match self.ebpf.map(name) {
            Some(
                Map::HashMap(d)
                | Map::LruHashMap(d)
                | Map::LpmTrie(d)
                | Map::Array(d)
                | Map::PerCpuArray(d),
            ) => d,
            _ => return Err(DataplaneError::MissingMap { name }),
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| DataplaneError::Io {
                what: format!("opening map {name} again"),
                source,
            })?;
        let data = MapData::from_fd(fd).map_err(map_err(name))?;
        aya::maps::Map::from_map_data(data).map_err(map_err(name))
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap { name })?;
    T::try_from(map).map_err(map_err(name))
}

/// Forward the program's aya-log records to this process's `log` whenever the ring buffer has
/// some. Only when loaded inside a tokio runtime (the agent); `None` otherwise, or if the logger
/// cannot be set up — then debug events are unavailable, which is logged, not fatal.
pub(super) fn spawn_log_pump(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            log::warn!("data-path debug events unavailable: {e}");
            return None;
        }
    };
    let _entered = runtime.enter();
    // SAFETY: the logger owns its ring buffer's file descriptor for as long as it lives and
    // `as_raw_fd` always returns that one descriptor; the `AsyncFd` owns the logger, so the
    // descriptor outlives the registration.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("data-path debug events unavailable: {}", e.into_parts().1);
            return None;
        }
    };
    Some(runtime.spawn(async move {
        loop {
            let mut ready = match fd.readable_mut().await {
                Ok(ready) => ready,
                Err(e) => {
                    log::warn!("data-path debug events stopped: {e}");
                    return;
                }
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }))
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if let Some(pump) = self.log_pump.take() {
            pump.abort();
        }
    }
}

fn ipv4_be(addr: Ipv4Addr) -> u32 {
    // The kernel's maps hold addresses as they are on the wire.
    u32::from_ne_bytes(addr.octets())
}

/// A VIP's key in the map of its family: `VIPS` for IPv4, `VIPS6` for IPv6.
#[derive(Clone, Copy)]
enum KernelVipKey {
    V4(VipKey),
    V6(VipKey6),
}

fn vip_key(key: &ServiceKey) -> KernelVipKey {
    let (port, proto) = (key.port.to_be(), key.proto.ip_proto());
    match key.addr {
        IpAddr::V4(v4) => KernelVipKey::V4(VipKey {
            addr: ipv4_be(v4),
            port,
            proto,
            _pad: 0,
        }),
        IpAddr::V6(v6) => KernelVipKey::V6(VipKey6 {
            addr: v6.into(),
            port,
            proto,
            _pad: 0,
        }),
    }
}

impl Dataplane {
    /// Load the object and its maps without attaching anywhere or pinning anything: for
    /// `BPF_PROG_TEST_RUN` fixtures and benchmarks. `lb_addr` is the IPIP outer source.
    pub fn load_unattached(
        flow_capacity: u32,
        lb_addr: Option<Ipv4Addr>,
    ) -> Result<Self, DataplaneError> {
        Self::load_unattached_sized(flow_capacity, DEFAULT_EMBRYO_CAPACITY, lb_addr)
    }

    /// `load_unattached` with the stateful floors' flow tables (`maps::FLOOR_FLOWS`,
    /// `FLOOR_FLOWS_PERCPU`) as large as `FLOWS`, for `cargo xtask bench`; elsewhere they keep
    /// one entry, so no other load preallocates them.
    pub fn load_unattached_with_floors(
        flow_capacity: u32,
        lb_addr: Option<Ipv4Addr>,
    ) -> Result<Self, DataplaneError> {
        let ebpf = EbpfLoader::new()
            .map_max_entries(maps::FLOWS, flow_capacity)
            .map_max_entries(maps::EMBRYOS, DEFAULT_EMBRYO_CAPACITY)
            .map_max_entries(maps::FLOOR_FLOWS, flow_capacity)
            .map_max_entries(maps::FLOOR_FLOWS_PERCPU, flow_capacity)
            .load(EBPF_OBJECT)?;
        Self::from_ebpf(ebpf, flow_capacity, DEFAULT_EMBRYO_CAPACITY, lb_addr)
    }

    /// `load_unattached` with an embryonic table of `embryo_capacity` entries.
    pub fn load_unattached_sized(
        flow_capacity: u32,
        embryo_capacity: u32,
        lb_addr: Option<Ipv4Addr>,
    ) -> Result<Self, DataplaneError> {
        let ebpf = EbpfLoader::new()
            .map_max_entries(maps::FLOWS, flow_capacity)
            .map_max_entries(maps::EMBRYOS, embryo_capacity)
            .load(EBPF_OBJECT)?;
        Self::from_ebpf(ebpf, flow_capacity, embryo_capacity, lb_addr)
    }

    /// Take the maps of a loaded object, write its config and load the balancer (not attached).
    fn from_ebpf(
        mut ebpf: Ebpf,
        flow_capacity: u32,
        embryo_capacity: u32,
        lb_addr: Option<Ipv4Addr>,
    ) -> Result<Self, DataplaneError> {
        let nr_cpus = possible_cpus()?;
        let lb_addr6 = Addr::UNSPECIFIED;
        let mut config: Array<MapData, LbConfig> = take_map(&mut ebpf, maps::CONFIG)?;
        let lb_config = LbConfig {
            lb_addr: lb_addr.map(ipv4_be).unwrap_or(0),
            // Echo requests to VIP addresses are answered unless the agent is told otherwise.
            flags: CONFIG_F_ICMP_ECHO,
            ipip_id_cpu_bits: lb_common::ipip_id_cpu_bits(
                u32::try_from(nr_cpus).unwrap_or(u32::MAX),
            ),
            _pad: 0,
            lb_addr6,
        };
        config.set(0, lb_config, 0).map_err(map_err(maps::CONFIG))?;
        // Pinned: a data path taken over keeps its generation and live deny-list half; a new map
        // (all zero) starts at generation 1.
        let mut policy: Array<MapData, PolicyState> = take_map(&mut ebpf, maps::POLICY)?;
        let mut policy_state = policy.get(&0, 0).map_err(map_err(maps::POLICY))?;
        let policy_carried = policy_state.generation != 0;
        if !policy_carried {
            policy_state = PolicyState {
                generation: 1,
                ..PolicyState::default()
            };
            policy
                .set(0, policy_state, 0)
                .map_err(map_err(maps::POLICY))?;
        }
        // Debug events are not kept across a restart (this object's `DEBUG_VIPS` is new and all
        // off): a taken-over `POLICY` saying some VIP has them on is cleared.
        if policy_state.flags & POLICY_F_DEBUG != 0 {
            policy_state.flags &= !POLICY_F_DEBUG;
            policy
                .set(0, policy_state, 0)
                .map_err(map_err(maps::POLICY))?;
        }
        let mut dp = Dataplane {
            vips_map: take_map(&mut ebpf, maps::VIPS)?,
            vip_addrs: take_map(&mut ebpf, maps::VIP_ADDRS)?,
            vips6: take_map(&mut ebpf, maps::VIPS6)?,
            vip_addrs6: take_map(&mut ebpf, maps::VIP_ADDRS6)?,
            rings: take_map(&mut ebpf, maps::RINGS)?,
            rr_counters: take_map(&mut ebpf, maps::RR_COUNTERS)?,
            backends_map: take_map(&mut ebpf, maps::BACKENDS)?,
            vip_stats: take_map(&mut ebpf, maps::VIP_STATS)?,
            backend_stats: take_map(&mut ebpf, maps::BACKEND_STATS)?,
            reason_stats: take_map(&mut ebpf, maps::REASON_STATS)?,
            event_stats: take_map(&mut ebpf, maps::EVENT_STATS)?,
            debug_vips: take_map(&mut ebpf, maps::DEBUG_VIPS)?,
            config,
            lb_config,
            policy,
            policy_state,
            policy_carried,
            vip_allow: take_map(&mut ebpf, maps::VIP_ALLOW)?,
            vip_deny: take_map(&mut ebpf, maps::VIP_DENY)?,
            vip_allow6: take_map(&mut ebpf, maps::VIP_ALLOW6)?,
            vip_deny6: take_map(&mut ebpf, maps::VIP_DENY6)?,
            vip_limits: take_map(&mut ebpf, maps::VIP_LIMITS)?,
            vip_buckets: take_map(&mut ebpf, maps::VIP_BUCKETS)?,
            vip_drops: take_map(&mut ebpf, maps::VIP_DROPS)?,
            deny_tidy: None,
            embryo_capacity,
            log_pump: None,
            ebpf,
            mode: None,
            flow_capacity,
            installed: BTreeMap::new(),
            free_vip_ids: (0..MAX_VIPS).collect(),
            free_backend_ids: (0..MAX_BACKENDS).collect(),
            debugged: BTreeSet::new(),
            nr_cpus,
            pinned: None,
        };
        dp.balancer_mut()?
            .load()
            .map_err(|source| DataplaneError::Program {
                name: programs::BALANCER,
                source,
            })?;
        Ok(dp)
    }

    /// The attach mode, or `None` if loaded unattached.
    pub fn mode(&self) -> Option<AttachedMode> {
        self.mode
    }

    pub fn flow_capacity(&self) -> u32 {
        self.flow_capacity
    }

    pub fn embryo_capacity(&self) -> u32 {
        self.embryo_capacity
    }

    /// Answer ICMP echo requests to VIP addresses (the default) or drop them, for every VIP.
    pub fn set_icmp_echo(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.set_config_flag(CONFIG_F_ICMP_ECHO, on)
    }

    /// The outer source of `ipip` to IPv6 backends (IPv6 in IPv6, IPv4 in IPv6); `None`: such
    /// packets are dropped (`drop_encap_failed`).
    pub fn set_lb_addr6(&mut self, addr: Option<Ipv6Addr>) -> Result<(), DataplaneError> {
        let cfg = LbConfig {
            lb_addr6: addr.map_or(Addr::UNSPECIFIED, Addr::from),
            ..self.lb_config
        };
        self.config.set(0, cfg, 0).map_err(map_err(maps::CONFIG))?;
        self.lb_config = cfg;
        Ok(())
    }

    /// Whether an outer IPv6 source is configured.
    pub fn has_lb_addr6(&self) -> bool {
        !self.lb_config.lb_addr6.is_unspecified()
    }

    /// Set or clear one `CONFIG_F_*` bit of the data path's configuration.
    pub(super) fn set_config_flag(&mut self, flag: u32, on: bool) -> Result<(), DataplaneError> {
        let flags = if on {
            self.lb_config.flags | flag
        } else {
            self.lb_config.flags & !flag
        };
        let cfg = LbConfig {
            flags,
            ..self.lb_config
        };
        self.config.set(0, cfg, 0).map_err(map_err(maps::CONFIG))?;
        self.lb_config = cfg;
        Ok(())
    }

    /// A logger for the XDP program's debug events, sending them to `logger` on each `flush()`
    /// (tests read them this way; the agent gets a pump into its own log from `load`).
    pub fn event_logger<T: log::Log>(
        &mut self,
        logger: T,
    ) -> Result<aya_log::EbpfLogger<T>, aya_log::Error> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
    }
}
