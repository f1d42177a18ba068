//! The kernel side as seen from the agent: the loaded XDP object and typed handles to its maps.
//! Parts: `attach` (how the balancer is attached), `vips` (VIPs, backend slots and rings in the
//! maps), `flows` (the flow table: peers' flows installed, walks for counts and snapshots),
//! `stats` (counters), `ring` (ring construction), `object` (the embedded object and its
//! programs), `persistent` (programs that outlive the process: decapsulator, pass program).

pub mod attach;
pub mod flows;
pub mod object;
pub mod persistent;
pub mod ring;
pub mod stats;
pub mod vips;

pub use attach::{AttachedMode, UnknownXdpMode, XdpModeChoice};
pub use flows::{ACTIVE_FLOW_WINDOW, FlowCounts, FlowTable, InstallReport, monotonic_ns};
pub use stats::{BackendStats, Counters, DataplaneStats, VipStats};

use crate::{
    dataplane::{object::EBPF_OBJECT, ring::RingError},
    model::ServiceKey,
    netlink::NetlinkError,
    util::{NoSuchInterface, interface_index},
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use lb_common::{
    Backend, CONFIG_F_ICMP_ECHO, LbConfig, MAX_BACKENDS, MAX_VIPS, TrafficCounters, VipAddr,
    VipKey, VipMeta, maps, programs,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
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
    /// Outer source of IPIP packets.
    pub lb_addr: Ipv4Addr,
}

/// A VIP as installed: its slot ids, which ring half is live, and the addresses of its backend
/// slots in spec order.
struct InstalledVip {
    id: u32,
    half: u32,
    backends: Vec<(Ipv4Addr, u32)>,
    /// Whether this VIP lets its address answer ICMP echo (`VipSpec::icmp_echo`).
    icmp_echo: bool,
}

type KernelHash<K, V> = HashMap<MapData, K, V>;

/// The loaded object and typed handles to its maps. Dropping it detaches the balancer (the
/// program's link and maps are released with the `Ebpf`).
pub struct Dataplane {
    ebpf: Ebpf,
    mode: Option<AttachedMode>,
    flow_capacity: u32,
    vips_map: KernelHash<VipKey, VipMeta>,
    vip_addrs: KernelHash<u32, VipAddr>,
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
    /// Forwards the XDP program's debug events (aya-log) to this process's log.
    log_pump: Option<tokio::task::JoinHandle<()>>,
    installed: BTreeMap<ServiceKey, InstalledVip>,
    free_vip_ids: BTreeSet<u32>,
    free_backend_ids: BTreeSet<u32>,
    nr_cpus: usize,
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

/// `bpf_fib_lookup` refuses to route for an interface with forwarding off
/// (BPF_FIB_LKUP_RET_FWD_DISABLED), and the kernel must forward the packets the balancer hands it
/// for neighbour resolution, so the LB's interface needs IPv4 forwarding.
fn ensure_forwarding(iface: &str) -> Result<(), DataplaneError> {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
    let io = |what: &str, source| DataplaneError::Io {
        what: format!("{what} {path}"),
        source,
    };
    let current = std::fs::read_to_string(&path).map_err(|e| io("reading", e))?;
    if current.trim() != "1" {
        log::info!("enabling IPv4 forwarding on {iface} (needed by bpf_fib_lookup)");
        std::fs::write(&path, "1").map_err(|e| io("writing", e))?;
    }
    Ok(())
}

/// Forward the program's aya-log records to this process's `log` whenever the ring buffer has
/// some. Only when loaded inside a tokio runtime (the agent); `None` otherwise, or if the logger
/// cannot be set up — then debug events are unavailable, which is logged, not fatal.
fn spawn_log_pump(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
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

fn vip_key(key: &ServiceKey) -> VipKey {
    VipKey {
        addr: ipv4_be(key.addr),
        port: key.port.to_be(),
        proto: key.proto.ip_proto(),
        _pad: 0,
    }
}

impl Dataplane {
    /// Load the object, size the flow table, write the config, attach the balancer to `iface`.
    /// Errors if the interface does not exist or the attach fails (nothing stays attached then).
    pub fn load(opts: &DataplaneOptions) -> Result<Self, DataplaneError> {
        interface_index(&opts.iface)?;
        ensure_forwarding(&opts.iface)?;
        let mut dp = Self::load_unattached(opts.flow_capacity, Some(opts.lb_addr))?;
        dp.log_pump = spawn_log_pump(&mut dp.ebpf);
        dp.mode = Some(attach::attach_link(
            dp.balancer_mut()?,
            &opts.iface,
            opts.mode,
        )?);
        Ok(dp)
    }

    /// Load the object and its maps without attaching anywhere: for `BPF_PROG_TEST_RUN` fixtures
    /// and benchmarks. `lb_addr` is the IPIP outer source.
    pub fn load_unattached(
        flow_capacity: u32,
        lb_addr: Option<Ipv4Addr>,
    ) -> Result<Self, DataplaneError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::FLOWS, flow_capacity)
            .load(EBPF_OBJECT)?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, source)| DataplaneError::Io {
            what: what.to_string(),
            source,
        })?;
        let mut config: Array<MapData, LbConfig> = take_map(&mut ebpf, maps::CONFIG)?;
        let lb_config = LbConfig {
            lb_addr: lb_addr.map(ipv4_be).unwrap_or(0),
            // Echo requests to VIP addresses are answered unless the agent is told otherwise.
            flags: CONFIG_F_ICMP_ECHO,
            ipip_id_cpu_bits: lb_common::ipip_id_cpu_bits(
                u32::try_from(nr_cpus).unwrap_or(u32::MAX),
            ),
            _pad: 0,
        };
        config.set(0, lb_config, 0).map_err(map_err(maps::CONFIG))?;
        let mut dp = Dataplane {
            vips_map: take_map(&mut ebpf, maps::VIPS)?,
            vip_addrs: take_map(&mut ebpf, maps::VIP_ADDRS)?,
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
            log_pump: None,
            ebpf,
            mode: None,
            flow_capacity,
            installed: BTreeMap::new(),
            free_vip_ids: (0..MAX_VIPS).collect(),
            free_backend_ids: (0..MAX_BACKENDS).collect(),
            nr_cpus,
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

    /// Answer ICMP echo requests to VIP addresses (the default) or drop them, for every VIP.
    pub fn set_icmp_echo(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.set_config_flag(CONFIG_F_ICMP_ECHO, on)
    }

    /// Set or clear one `CONFIG_F_*` bit of the data path's configuration.
    fn set_config_flag(&mut self, flag: u32, on: bool) -> Result<(), DataplaneError> {
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
