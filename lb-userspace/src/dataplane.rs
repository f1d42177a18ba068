//! The kernel side as seen from the agent: loads the XDP object, attaches the balancer, and turns
//! `VipSpec`s into map entries (VIP, backend slots, double-buffered ring), reads counters.
//! Slot ids are this module's business only: callers speak in addresses.

use crate::{
    ebpf_object::EBPF_OBJECT,
    model::{ServiceKey, VipSpec},
    ring::{self, RingError},
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{Xdp, XdpMode},
};
use lb_common::{
    BACKEND_F_ACTIVE, Backend, BenchGenHeader, CONFIG_F_FLOW_EVENTS, CONFIG_F_ICMP_ECHO, FlowEvent,
    FlowKey, FlowValue, LbConfig, MAX_BACKENDS, MAX_VIPS, TrafficCounters, VIP_ADDR_F_ICMP_ECHO,
    VipAddr, VipKey, VipMeta, event, maps, programs, reason, ring_index,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
};

/// How the agent asks to attach: `auto` tries driver (native) mode and falls back to generic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpModeChoice {
    #[default]
    Auto,
    Driver,
    Generic,
}

impl FromStr for XdpModeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "driver" | "native" => Ok(Self::Driver),
            "generic" | "skb" => Ok(Self::Generic),
            other => Err(format!(
                "unknown XDP mode {other:?} (expected auto, driver or generic)"
            )),
        }
    }
}

/// The mode a program actually got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    Driver,
    Generic,
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachedMode::Driver => "driver",
            AttachedMode::Generic => "generic",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    #[error("interface {0} has no IPv4 address to use as the IPIP source; pass --lb-addr")]
    NoLbAddress(String),
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
    #[error("{0}")]
    Ring(#[from] RingError),
    #[error("unknown VIP {0}")]
    UnknownVip(ServiceKey),
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
    /// Outer source of IPIP packets; `None` = the interface's first IPv4 address.
    pub lb_addr: Option<Ipv4Addr>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub addr: Ipv4Addr,
    pub counters: Counters,
    /// Flow-table entries pinned to this backend that saw a packet in the last
    /// `ACTIVE_FLOW_WINDOW` (the table is an LRU: finished flows linger until evicted).
    pub active_flows: u64,
}

/// How recently a flow must have seen a packet to count as active in `BackendStats`.
pub const ACTIVE_FLOW_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStats {
    pub key: ServiceKey,
    pub counters: Counters,
    pub backends: Vec<BackendStats>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneStats {
    pub vips: Vec<VipStats>,
    /// Packets per outcome, by `lb_common::reason::NAMES`, every reason present (zeros included).
    pub reasons: BTreeMap<String, u64>,
    /// Data-path events by `lb_common::event::NAMES` (mid-flow misses, re-steers, lost sync
    /// events), every event present.
    pub events: BTreeMap<String, u64>,
    pub flow_capacity: u32,
}

/// A VIP as installed: its slot ids, which ring half is live, and the addresses of its backend
/// slots in spec order.
struct InstalledVip {
    id: u32,
    half: u32,
    backends: Vec<(Ipv4Addr, u32)>,
    icmp_echo: bool,
}

type KernelHash<K, V> = HashMap<MapData, K, V>;

/// The loaded object and typed handles to its maps. Dropping it detaches the balancer (the
/// program's link and maps are released with the `Ebpf`).
/// What `install_flows` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallReport {
    pub installed: u64,
    /// Flows whose VIP or backend this node does not have.
    pub unknown_backend: u64,
}

pub struct Dataplane {
    ebpf: Ebpf,
    mode: Option<AttachedMode>,
    lb_addr: Option<Ipv4Addr>,
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

fn program_error(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> DataplaneError {
    move |source| DataplaneError::Program { name, source }
}

/// The XDP program `name` of `ebpf`.
pub(crate) fn xdp_program<'a>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<&'a Xdp, DataplaneError> {
    let prog = ebpf
        .program(name)
        .ok_or(aya::programs::ProgramError::NotLoaded)
        .map_err(program_error(name))?;
    prog.try_into().map_err(program_error(name))
}

/// The XDP program `name` of `ebpf`, mutable (to load or attach it).
pub(crate) fn xdp_program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, DataplaneError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(aya::programs::ProgramError::NotLoaded)
        .map_err(program_error(name))?;
    prog.try_into().map_err(program_error(name))
}

/// `if_nametoindex`, with "does not exist" as a typed error.
pub fn ifindex(iface: &str) -> Result<u32, DataplaneError> {
    let name = std::ffi::CString::new(iface)
        .map_err(|_| DataplaneError::NoSuchInterface(iface.to_string()))?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(DataplaneError::NoSuchInterface(iface.to_string())),
        index => Ok(index),
    }
}

/// IPv4 addresses on `iface`, in the order the kernel lists them.
pub fn iface_ipv4_addrs(iface: &str) -> Result<Vec<Ipv4Addr>, DataplaneError> {
    let mut addrs = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(DataplaneError::Io {
            what: "listing interface addresses".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: walking the list getifaddrs returned; pointers are valid until freeifaddrs.
        unsafe {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && std::ffi::CStr::from_ptr(ifa.ifa_name).to_bytes() == iface.as_bytes()
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                addrs.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(addrs)
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

/// The data path's flow clock (`bpf_ktime_get_coarse_ns()`: CLOCK_MONOTONIC_COARSE), in
/// nanoseconds.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
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
        ifindex(&opts.iface)?;
        let lb_addr = match opts.lb_addr {
            Some(addr) => addr,
            None => *iface_ipv4_addrs(&opts.iface)?
                .first()
                .ok_or_else(|| DataplaneError::NoLbAddress(opts.iface.clone()))?,
        };
        ensure_forwarding(&opts.iface)?;
        let mut dp = Self::load_unattached(opts.flow_capacity, Some(lb_addr))?;
        dp.log_pump = spawn_log_pump(&mut dp.ebpf);
        let prog = dp.balancer_mut()?;
        let attempts: &[(XdpMode, AttachedMode)] = match opts.mode {
            XdpModeChoice::Driver => &[(XdpMode::Driver, AttachedMode::Driver)],
            XdpModeChoice::Generic => &[(XdpMode::Skb, AttachedMode::Generic)],
            XdpModeChoice::Auto => &[
                (XdpMode::Driver, AttachedMode::Driver),
                (XdpMode::Skb, AttachedMode::Generic),
            ],
        };
        let mut last_err = None;
        for (flag, mode) in attempts {
            match prog.attach(&opts.iface, *flag) {
                Ok(_) => {
                    dp.mode = Some(*mode);
                    break;
                }
                Err(source) => {
                    if opts.mode == XdpModeChoice::Auto && *mode == AttachedMode::Driver {
                        log::warn!(
                            "driver-mode XDP on {} failed ({source}); falling back to generic mode, which is slower",
                            opts.iface
                        );
                    }
                    last_err = Some(DataplaneError::Attach {
                        iface: opts.iface.clone(),
                        mode: *mode,
                        source,
                    });
                }
            }
        }
        match dp.mode {
            Some(_) => Ok(dp),
            None => Err(last_err.expect("at least one attach attempt")),
        }
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
            lb_addr,
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

    fn balancer_mut(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program_mut(&mut self.ebpf, programs::BALANCER)
    }

    /// The loaded balancer program (for `BPF_PROG_TEST_RUN`).
    pub fn balancer(&self) -> Result<&Xdp, DataplaneError> {
        xdp_program(&self.ebpf, programs::BALANCER)
    }

    /// Load one of the benchmark programs (`programs::FLOOR_TX`, `FLOOR_PARSE_TX`, `BENCH_SINK`)
    /// from the same object, for side-by-side `BPF_PROG_TEST_RUN` measurements.
    pub fn bench_program(&mut self, name: &'static str) -> Result<&Xdp, DataplaneError> {
        let prog = xdp_program_mut(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(program_error(name))?;
        }
        xdp_program(&self.ebpf, name)
    }

    /// The benchmark generator (`programs::BENCH_GEN`), loaded, with `header` as the headers it
    /// writes into every frame.
    pub fn bench_generator(&mut self, header: &BenchGenHeader) -> Result<&Xdp, DataplaneError> {
        let map = self
            .ebpf
            .map_mut(maps::BENCH_GEN_HEADER)
            .ok_or(DataplaneError::MissingMap {
                name: maps::BENCH_GEN_HEADER,
            })?;
        let mut array: Array<&mut MapData, BenchGenHeader> =
            Array::try_from(map).map_err(map_err(maps::BENCH_GEN_HEADER))?;
        array
            .set(0, header, 0)
            .map_err(map_err(maps::BENCH_GEN_HEADER))?;
        self.bench_program(programs::BENCH_GEN)
    }

    /// Load benchmark program `name` and attach it to `iface` (in the calling thread's network
    /// namespace) in driver mode; it stays attached until this `Dataplane` is dropped.
    pub fn attach_bench_program(
        &mut self,
        name: &'static str,
        iface: &str,
    ) -> Result<(), DataplaneError> {
        self.bench_program(name)?;
        let prog = xdp_program_mut(&mut self.ebpf, name)?;
        prog.attach(iface, XdpMode::Driver)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_string(),
                mode: AttachedMode::Driver,
                source,
            })?;
        Ok(())
    }

    /// The flow table, read-only (for tests and, later, state sync).
    pub fn flows(&self) -> Result<HashMap<&MapData, FlowKey, FlowValue>, DataplaneError> {
        let map = self
            .ebpf
            .map(maps::FLOWS)
            .ok_or(DataplaneError::MissingMap { name: maps::FLOWS })?;
        HashMap::try_from(map).map_err(map_err(maps::FLOWS))
    }

    /// The attach mode, or `None` if loaded unattached.
    pub fn mode(&self) -> Option<AttachedMode> {
        self.mode
    }

    pub fn lb_addr(&self) -> Option<Ipv4Addr> {
        self.lb_addr
    }

    pub fn flow_capacity(&self) -> u32 {
        self.flow_capacity
    }

    /// Check that `spec` fits (VIP slots, backend slots, ring size) without changing anything.
    pub fn check_vip(&self, spec: &VipSpec) -> Result<(), DataplaneError> {
        let existing = self.installed.get(&spec.key);
        if existing.is_none() && self.free_vip_ids.is_empty() {
            return Err(DataplaneError::NoVipSlot);
        }
        let needed = spec
            .backends
            .iter()
            .filter(|b| {
                !existing.is_some_and(|vip| vip.backends.iter().any(|(addr, _)| *addr == b.addr))
            })
            .count();
        // Slots of backends this spec drops are freed only after the swap, so they do not count.
        if needed > self.free_backend_ids.len() {
            return Err(DataplaneError::NoBackendSlots {
                needed,
                free: self.free_backend_ids.len(),
            });
        }
        let weights: Vec<u32> = spec.backends.iter().map(|b| b.weight).collect();
        ring::build(&weights)?;
        Ok(())
    }

    fn zero_counters(
        map: &mut PerCpuArray<MapData, TrafficCounters>,
        name: &'static str,
        index: u32,
        nr_cpus: usize,
    ) -> Result<(), DataplaneError> {
        let zeros = PerCpuValues::try_from(vec![TrafficCounters::default(); nr_cpus]).map_err(
            |source| DataplaneError::Io {
                what: format!("building zeroed counters for {name}"),
                source,
            },
        )?;
        map.set(index, zeros, 0).map_err(map_err(name))
    }

    /// Install or replace a VIP and its backends. Validates capacity first (`check_vip`): on error
    /// nothing has changed. The data path sees the old or the new VIP, never a mix: new backend
    /// slots and the inactive ring half are written first, then one update of the VIP's entry
    /// switches to them, and only then are dropped backends' slots cleared.
    ///
    /// `down` holds the backends (by address) that failed their health checks: they get no ring
    /// slot and lose `BACKEND_F_ACTIVE`, so their existing flows are re-steered to a healthy
    /// backend. A backend with weight 0 (draining) also gets no ring slot, but stays active, so
    /// its existing flows stay with it. No backend left → the VIP's packets are dropped
    /// (`drop_no_backend`).
    pub fn apply_vip(
        &mut self,
        spec: &VipSpec,
        down: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), DataplaneError> {
        self.check_vip(spec)?;
        let key = vip_key(&spec.key);
        let is_new = !self.installed.contains_key(&spec.key);
        let (vip_id, half) = match self.installed.get(&spec.key) {
            Some(vip) => (vip.id, vip.half ^ 1),
            None => (
                *self.free_vip_ids.first().ok_or(DataplaneError::NoVipSlot)?,
                0,
            ),
        };
        let old_backends = self
            .installed
            .get(&spec.key)
            .map(|vip| vip.backends.clone())
            .unwrap_or_default();

        // Backend slots: keep an address's slot (its flows stay put), take fresh ones for new
        // addresses.
        let mut slots = Vec::with_capacity(spec.backends.len());
        let mut fresh = Vec::new();
        let mut free = self.free_backend_ids.iter();
        for b in &spec.backends {
            match old_backends.iter().find(|(addr, _)| *addr == b.addr) {
                Some((_, id)) => slots.push((b.addr, *id)),
                None => {
                    let id = *free
                        .next()
                        .ok_or(DataplaneError::NoBackendSlots { needed: 1, free: 0 })?;
                    slots.push((b.addr, id));
                    fresh.push((b.addr, id));
                }
            }
        }
        let weights: Vec<u32> = spec
            .backends
            .iter()
            .map(|b| if down.contains(&b.addr) { 0 } else { b.weight })
            .collect();
        let ring = ring::build(&weights)?;

        for (_, id) in &fresh {
            Self::zero_counters(
                &mut self.backend_stats,
                maps::BACKEND_STATS,
                *id,
                self.nr_cpus,
            )?;
        }
        // Backends that are up become (or stay) active before the ring can name them; those that
        // are down are deactivated only after the ring stops naming them (below).
        for (addr, id) in slots.iter().filter(|(addr, _)| !down.contains(addr)) {
            self.set_backend(*id, *addr, vip_id, BACKEND_F_ACTIVE)?;
        }
        for (slot, backend_index) in ring.iter().enumerate() {
            self.rings
                .set(
                    ring_index(vip_id, half, slot as u32),
                    slots[*backend_index].1,
                    0,
                )
                .map_err(map_err(maps::RINGS))?;
        }
        if is_new {
            Self::zero_counters(&mut self.vip_stats, maps::VIP_STATS, vip_id, self.nr_cpus)?;
            self.rr_counters
                .set(vip_id, 0, 0)
                .map_err(map_err(maps::RR_COUNTERS))?;
        }
        let meta = VipMeta {
            id: vip_id,
            ring_len: ring.len() as u32,
            ring_half: half,
            forward: spec.forward.code(),
        };
        // A new VIP's address goes in before the switch, so that the switch is the last step that
        // can fail while nothing is visible yet (until it, the address's packets are dropped as
        // an unknown port rather than passed, for a moment). A changed `icmp_echo` changes it too.
        let addr_entry = self.vip_addr_entry(&spec.key, Some(spec.icmp_echo));
        let old_entry = self.vip_addrs.get(&key.addr, 0).ok();
        let previous_addr = if old_entry != Some(addr_entry) {
            self.vip_addrs
                .insert(key.addr, addr_entry, 0)
                .map_err(map_err(maps::VIP_ADDRS))?;
            Some(old_entry)
        } else {
            None
        };
        // The switch: one element update, atomic for the data path.
        if let Err(e) = self.vips_map.insert(key, meta, 0) {
            if let Some(old) = previous_addr {
                self.restore_vip_addr(key.addr, old);
            }
            return Err(map_err(maps::VIPS)(e));
        }
        // The data path now uses the new ring half and slots: record that before anything else
        // can fail, so the bookkeeping always matches the kernel (a retry then writes the other
        // half, never the live one).
        if is_new {
            self.free_vip_ids.remove(&vip_id);
        }
        for (_, id) in &fresh {
            self.free_backend_ids.remove(id);
        }
        let departed: Vec<u32> = old_backends
            .iter()
            .filter(|(addr, _)| !slots.iter().any(|(a, _)| a == addr))
            .map(|(_, id)| *id)
            .collect();
        self.installed.insert(
            spec.key,
            InstalledVip {
                id: vip_id,
                half,
                backends: slots.clone(),
                icmp_echo: spec.icmp_echo,
            },
        );
        for (addr, id) in slots.iter().filter(|(addr, _)| down.contains(addr)) {
            self.set_backend(*id, *addr, vip_id, 0)?;
        }
        // Backends that left: clear their slots so flows pinned to them are re-steered.
        for id in departed {
            self.release_backend(id)?;
        }
        Ok(())
    }

    /// The `VIP_ADDRS` entry of `key`'s address with `key`'s VIP installed with ICMP echo
    /// `with_echo` (`None`: removed) and the address's other VIPs as they are: how many VIPs it
    /// carries, and whether any of them answers echo.
    fn vip_addr_entry(&self, key: &ServiceKey, with_echo: Option<bool>) -> VipAddr {
        let others = self
            .installed
            .iter()
            .filter(|(k, _)| k.addr == key.addr && *k != key)
            .map(|(_, v)| v.icmp_echo);
        let (vips, echo) = others
            .chain(with_echo)
            .fold((0, false), |(n, any), echo| (n + 1, any || echo));
        VipAddr {
            vips,
            flags: if echo { VIP_ADDR_F_ICMP_ECHO } else { 0 },
        }
    }

    /// Put a VIP address's entry back after a failed switch (best effort: the failure being
    /// reported is the switch's).
    fn restore_vip_addr(&mut self, addr: u32, old: Option<VipAddr>) {
        let result = match old {
            None => self.vip_addrs.remove(&addr),
            Some(old) => self.vip_addrs.insert(addr, old, 0),
        };
        if let Err(e) = result {
            log::warn!("restoring the VIP address set after a failed update: {e}");
        }
    }

    fn set_backend(
        &mut self,
        id: u32,
        addr: Ipv4Addr,
        vip_id: u32,
        flags: u32,
    ) -> Result<(), DataplaneError> {
        self.backends_map
            .set(
                id,
                Backend {
                    addr: ipv4_be(addr),
                    flags,
                    vip_id,
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err(maps::BACKENDS))
    }

    fn release_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.backends_map
            .set(id, Backend::default(), 0)
            .map_err(map_err(maps::BACKENDS))?;
        self.free_backend_ids.insert(id);
        Ok(())
    }

    /// Remove a VIP: its packets are dropped as unknown port from then on (or passed if no other
    /// VIP shares its address). Unknown key → error, nothing changed.
    pub fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        let vip = self
            .installed
            .get(key)
            .ok_or(DataplaneError::UnknownVip(*key))?;
        let (id, backends) = (vip.id, vip.backends.clone());
        let kkey = vip_key(key);
        self.vips_map.remove(&kkey).map_err(map_err(maps::VIPS))?;
        match self.vip_addr_entry(key, None) {
            VipAddr { vips: 0, .. } => self
                .vip_addrs
                .remove(&kkey.addr)
                .map_err(map_err(maps::VIP_ADDRS))?,
            rest => self
                .vip_addrs
                .insert(kkey.addr, rest, 0)
                .map_err(map_err(maps::VIP_ADDRS))?,
        }
        for (_, bid) in backends {
            self.release_backend(bid)?;
        }
        // VIP ids are reused: the next VIP on this id starts with debug events off.
        self.debug_vips
            .set(id, 0, 0)
            .map_err(map_err(maps::DEBUG_VIPS))?;
        self.installed.remove(key);
        self.free_vip_ids.insert(id);
        Ok(())
    }

    fn sum(
        map: &PerCpuArray<MapData, TrafficCounters>,
        name: &'static str,
        index: u32,
    ) -> Result<Counters, DataplaneError> {
        let values = map.get(&index, 0).map_err(map_err(name))?;
        Ok(values.iter().fold(Counters::default(), |acc, c| Counters {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
            new_flows: acc.new_flows + c.new_flows,
        }))
    }

    /// Answer ICMP echo requests to VIP addresses (the default) or drop them, for every VIP.
    pub fn set_icmp_echo(&mut self, on: bool) -> Result<(), DataplaneError> {
        let flags = if on {
            self.lb_config.flags | CONFIG_F_ICMP_ECHO
        } else {
            self.lb_config.flags & !CONFIG_F_ICMP_ECHO
        };
        let cfg = LbConfig {
            flags,
            ..self.lb_config
        };
        self.config.set(0, cfg, 0).map_err(map_err(maps::CONFIG))?;
        self.lb_config = cfg;
        Ok(())
    }

    /// The ring buffer of `FlowEvent`s (new and re-steered flows, for peer sync). It can be taken
    /// once; later calls fail with `MissingMap`. Until it is taken the program reports nothing.
    pub fn take_flow_events(&mut self) -> Result<RingBuf<MapData>, DataplaneError> {
        let ring = take_map(&mut self.ebpf, maps::FLOW_EVENTS)?;
        // Someone reads the events now: start reporting them.
        let cfg = LbConfig {
            flags: self.lb_config.flags | CONFIG_F_FLOW_EVENTS,
            ..self.lb_config
        };
        self.config.set(0, cfg, 0).map_err(map_err(maps::CONFIG))?;
        self.lb_config = cfg;
        Ok(ring)
    }

    /// Install flows learned from a peer, each pinned to its backend by address. A flow whose VIP
    /// or backend this node does not have is skipped and counted in the report (never guessed).
    /// An existing entry is overwritten: the peer saw the flow's latest assignment.
    pub fn install_flows(
        &mut self,
        flows: impl IntoIterator<Item = FlowEvent>,
    ) -> Result<InstallReport, DataplaneError> {
        let now = monotonic_ns();
        // (VIP as the data path keys it, backend address in network order) → slot id.
        let mut slots = std::collections::HashMap::new();
        for (key, vip) in &self.installed {
            for (addr, id) in &vip.backends {
                slots.insert((vip_key(key), ipv4_be(*addr)), *id);
            }
        }
        let map = self
            .ebpf
            .map_mut(maps::FLOWS)
            .ok_or(DataplaneError::MissingMap { name: maps::FLOWS })?;
        let mut table: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(map).map_err(map_err(maps::FLOWS))?;
        let mut report = InstallReport::default();
        for event in flows {
            let vip = VipKey {
                addr: event.flow.dst_addr,
                port: event.flow.dst_port,
                proto: event.flow.proto,
                _pad: 0,
            };
            match slots.get(&(vip, event.backend_addr)) {
                Some(id) => {
                    let value = FlowValue {
                        backend_addr: event.backend_addr,
                        backend_id: *id,
                        last_seen_ns: now,
                    };
                    table
                        .insert(event.flow, value, 0)
                        .map_err(map_err(maps::FLOWS))?;
                    report.installed += 1;
                }
                None => report.unknown_backend += 1,
            }
        }
        Ok(report)
    }

    /// Every flow seen within `max_age`, as `FlowEvent`s (the snapshot a (re)joining peer gets).
    pub fn snapshot_flows(
        &self,
        max_age: std::time::Duration,
    ) -> Result<Vec<FlowEvent>, DataplaneError> {
        let since = monotonic_ns().saturating_sub(max_age.as_nanos() as u64);
        let mut flows = Vec::new();
        for entry in self.flows()?.iter() {
            // An entry evicted while we walk is simply skipped.
            let Ok((flow, value)) = entry else { continue };
            if value.last_seen_ns >= since {
                flows.push(FlowEvent {
                    flow,
                    backend_addr: value.backend_addr,
                    _pad: 0,
                });
            }
        }
        Ok(flows)
    }

    /// Switch the data path's debug events for one VIP on or off, at run time (not persisted).
    pub fn set_vip_debug(&mut self, key: &ServiceKey, on: bool) -> Result<(), DataplaneError> {
        let vip = self
            .installed
            .get(key)
            .ok_or(DataplaneError::UnknownVip(*key))?;
        self.debug_vips
            .set(vip.id, u32::from(on), 0)
            .map_err(map_err(maps::DEBUG_VIPS))
    }

    /// A logger for the XDP program's debug events, sending them to `logger` on each `flush()`
    /// (tests read them this way; the agent gets a pump into its own log from `load`).
    pub fn event_logger<T: log::Log>(
        &mut self,
        logger: T,
    ) -> Result<aya_log::EbpfLogger<T>, aya_log::Error> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
    }

    /// Per-event counters (`lb_common::event::NAMES`), summed over CPUs.
    pub fn event_stats(&self) -> Result<BTreeMap<String, u64>, DataplaneError> {
        let mut events = BTreeMap::new();
        for (index, name) in event::NAMES.iter().enumerate() {
            let values = self
                .event_stats
                .get(&(index as u32), 0)
                .map_err(map_err(maps::EVENT_STATS))?;
            events.insert(name.to_string(), values.iter().sum());
        }
        Ok(events)
    }

    /// Active flows per (backend slot, backend address in network order): walks the flow table,
    /// so it costs one pass over it.
    fn active_flows(&self) -> Result<BTreeMap<(u32, u32), u64>, DataplaneError> {
        let since = monotonic_ns().saturating_sub(ACTIVE_FLOW_WINDOW.as_nanos() as u64);
        let mut counts = BTreeMap::new();
        for entry in self.flows()?.iter() {
            // An entry evicted while we walk is simply skipped.
            let Ok((_, flow)) = entry else { continue };
            if flow.last_seen_ns >= since {
                *counts
                    .entry((flow.backend_id, flow.backend_addr))
                    .or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// Sum the per-CPU counters of every configured VIP and backend, and the per-reason counters.
    pub fn stats(&self) -> Result<DataplaneStats, DataplaneError> {
        let active = self.active_flows()?;
        let mut vips = Vec::with_capacity(self.installed.len());
        for (key, vip) in &self.installed {
            let mut backends = Vec::with_capacity(vip.backends.len());
            for (addr, id) in &vip.backends {
                backends.push(BackendStats {
                    addr: *addr,
                    counters: Self::sum(&self.backend_stats, maps::BACKEND_STATS, *id)?,
                    // A slot's flows count only while the slot still holds this address.
                    active_flows: active.get(&(*id, ipv4_be(*addr))).copied().unwrap_or(0),
                });
            }
            vips.push(VipStats {
                key: *key,
                counters: Self::sum(&self.vip_stats, maps::VIP_STATS, vip.id)?,
                backends,
            });
        }
        let mut reasons = BTreeMap::new();
        for (index, name) in reason::NAMES.iter().enumerate() {
            let values = self
                .reason_stats
                .get(&(index as u32), 0)
                .map_err(map_err(maps::REASON_STATS))?;
            reasons.insert(name.to_string(), values.iter().sum());
        }
        Ok(DataplaneStats {
            vips,
            reasons,
            events: self.event_stats()?,
            flow_capacity: self.flow_capacity,
        })
    }
}
