//! Every map of the object. Sizes come from lb-common so the agent agrees; `FLOWS`' capacity is a
//! default the agent overrides at load time (`EbpfLoader::map_max_entries`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    Backend, DEFAULT_FLOW_CAPACITY, FLOW_EVENTS_BYTES, FlowKey, FlowValue, LbConfig, MAX_BACKENDS,
    MAX_DECAP_ADDRS, MAX_VIPS, RING_ENTRIES, TrafficCounters, VipAddr, VipKey, VipMeta,
    decap_reason, event, reason,
};

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// VIP address (network order) → number of VIPs on it and per-address flags. Tells "for a VIP
/// address, unknown port" (drop) from "not ours" (pass) with one lookup.
#[map(name = "VIP_ADDRS")]
pub static VIP_ADDRS: HashMap<u32, VipAddr> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Backend slot ids, `ring_index(vip, half, slot)`.
#[map(name = "RINGS")]
pub static RINGS: Array<u32> = Array::with_max_entries(RING_ENTRIES, 0);

/// Per-VIP new-flow counter, shared by all CPUs (atomic) so round robin is exact, not per CPU.
#[map(name = "RR_COUNTERS")]
pub static RR_COUNTERS: Array<u64> = Array::with_max_entries(MAX_VIPS, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

#[map(name = "VIP_STATS")]
pub static VIP_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "REASON_STATS")]
pub static REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

/// Addresses (network order) whose IPIP packets the decapsulator strips.
#[map(name = "DECAP_ADDRS")]
pub static DECAP_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DECAP_ADDRS, 0);

#[map(name = "DECAP_STATS")]
pub static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(decap_reason::COUNT, 0);

/// New-flow events for peer sync (`FlowEvent`s), read by the agent.
#[map(name = "FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

#[map(name = "EVENT_STATS")]
pub static EVENT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(event::COUNT, 0);

/// VIP id → 1 when the agent switched on debug events for that VIP (`xlb vip debug`). Read per
/// packet of a VIP: one array lookup, and the log call only runs when it is on.
#[map(name = "DEBUG_VIPS")]
pub static DEBUG_VIPS: Array<u32> = Array::with_max_entries(MAX_VIPS, 0);

/// The benchmark generator's frame counter (one per CPU; `xlb_bench_gen`).
#[map(name = "BENCH_GEN")]
pub static BENCH_GEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The benchmark generator's frame headers, written by the benchmark before it runs.
#[map(name = "BENCH_GEN_HEADER")]
pub static BENCH_GEN_HEADER: Array<lb_common::BenchGenHeader> = Array::with_max_entries(1, 0);

/// Backend slot id → its resolved next hop, per CPU (`nexthop.rs`).
#[map(name = "NEXTHOPS")]
pub static NEXTHOPS: PerCpuArray<crate::nexthop::Entry> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// The outer IPv4 ID counter of fragmentable IPIP packets, one per CPU (`forward.rs`).
#[map(name = "IPIP_IDS")]
pub static IPIP_IDS: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
