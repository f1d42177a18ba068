//! Every map of the object. Sizes come from lb-common so the agent agrees; `FLOWS`' capacity is a
//! default the agent overrides at load time (`EbpfLoader::map_max_entries`).

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    Addr, Backend, DEFAULT_EMBRYO_CAPACITY, DEFAULT_FLOW_CAPACITY, DENY_HOST_NET_WORDS, Deny6Data,
    DenyData, DenyHostKey, FLOW_EVENTS_BYTES, FlowKey, FlowValue, LbConfig, MAX_BACKENDS,
    MAX_DECAP_ADDRS, MAX_DENY_PREFIXES, MAX_VIP_PREFIXES, MAX_VIPS, PolicyState, RING_ENTRIES,
    SRC_BUCKET_ENTRIES, SrcBucketKey, TrafficCounters, VipAddr, VipDrops, VipKey, VipKey6,
    VipLimits, VipMeta, VipSrc6Data, VipSrcData, decap_reason, event, reason,
};

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// VIP address (network order) → number of VIPs on it and per-address flags. Tells "for a VIP
/// address, unknown port" (drop) from "not ours" (pass) with one lookup.
#[map(name = "VIP_ADDRS")]
pub static VIP_ADDRS: HashMap<u32, VipAddr> = HashMap::with_max_entries(MAX_VIPS, 0);

/// The IPv6 twin of `VIPS` (IPv4 packets keep hashing an 8-byte key).
#[map(name = "VIPS6")]
pub static VIPS6: HashMap<VipKey6, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// The IPv6 twin of `VIP_ADDRS`, keyed by the address.
#[map(name = "VIP_ADDRS6")]
pub static VIP_ADDRS6: HashMap<Addr, VipAddr> = HashMap::with_max_entries(MAX_VIPS, 0);

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

/// TCP flows that have sent only SYNs so far (`balancer.rs`): a SYN flood churns this table, and
/// a flow moves into `FLOWS` with its first packet without SYN. Also flows held for a peer's
/// record (`FLOW_F_HELD`), left here when the record arrives (`FLOWS` is looked up first) until
/// the LRU evicts them. Capacity set by the agent.
#[map(name = "EMBRYOS")]
pub static EMBRYOS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_EMBRYO_CAPACITY, 0);

/// The global deny list, two copies (`PolicyState::deny_live` picks the live one): `xlb deny
/// load` fills the other, then switches with one update of `POLICY`. Each copy is a hash of its
/// host entries (/32: one lookup, a cache miss or two, where walking a trie of a million
/// prefixes costs about twenty dependent ones) and an LPM trie of its shorter prefixes.
/// Both without preallocation (the kernel requires BPF_F_NO_PREALLOC for tries, which aya adds):
/// memory is taken per entry, not for the capacity; an empty hash costs its buckets.
#[map(name = "DENY_HOSTS0")]
pub static DENY_HOSTS0: HashMap<DenyHostKey, u8> =
    HashMap::with_max_entries(MAX_DENY_PREFIXES, BPF_F_NO_PREALLOC);
#[map(name = "DENY_HOSTS1")]
pub static DENY_HOSTS1: HashMap<DenyHostKey, u8> =
    HashMap::with_max_entries(MAX_DENY_PREFIXES, BPF_F_NO_PREALLOC);
/// The prefilter of each half's host hash: one bit per /24 with at least one host entry
/// (`lb_common::DENY_HOST_NET_WORDS`, `deny_host_net_bit`; words in host order). 2 MiB each,
/// preallocated (an array): a source whose /24 holds no listed host never reaches the hash.
#[map(name = "DENY_HOST_NETS0")]
pub static DENY_HOST_NETS0: Array<u64> = Array::with_max_entries(DENY_HOST_NET_WORDS, 0);
#[map(name = "DENY_HOST_NETS1")]
pub static DENY_HOST_NETS1: Array<u64> = Array::with_max_entries(DENY_HOST_NET_WORDS, 0);
#[map(name = "DENY0")]
pub static DENY0: LpmTrie<DenyData, u8> = LpmTrie::with_max_entries(MAX_DENY_PREFIXES, 0);
#[map(name = "DENY1")]
pub static DENY1: LpmTrie<DenyData, u8> = LpmTrie::with_max_entries(MAX_DENY_PREFIXES, 0);
/// The deny list's IPv6 prefixes, hosts included (an IPv6 list is expected to be short: no
/// host hash in front of it), one trie per half as `DENY0`/`DENY1`.
#[map(name = "DENY6_0")]
pub static DENY6_0: LpmTrie<Deny6Data, u8> = LpmTrie::with_max_entries(MAX_DENY_PREFIXES, 0);
#[map(name = "DENY6_1")]
pub static DENY6_1: LpmTrie<Deny6Data, u8> = LpmTrie::with_max_entries(MAX_DENY_PREFIXES, 0);

/// Every VIP's source allow lists, each under its VIP's tag (`lb_common::vip_list_tag`).
#[map(name = "VIP_ALLOW")]
pub static VIP_ALLOW: LpmTrie<VipSrcData, u8> = LpmTrie::with_max_entries(MAX_VIP_PREFIXES, 0);
/// Every VIP's source deny lists, as `VIP_ALLOW`.
#[map(name = "VIP_DENY")]
pub static VIP_DENY: LpmTrie<VipSrcData, u8> = LpmTrie::with_max_entries(MAX_VIP_PREFIXES, 0);
/// The IPv6 VIPs' source allow and deny lists, keyed as `VIP_ALLOW`/`VIP_DENY` with IPv6 sources.
#[map(name = "VIP_ALLOW6")]
pub static VIP_ALLOW6: LpmTrie<VipSrc6Data, u8> = LpmTrie::with_max_entries(MAX_VIP_PREFIXES, 0);
#[map(name = "VIP_DENY6")]
pub static VIP_DENY6: LpmTrie<VipSrc6Data, u8> = LpmTrie::with_max_entries(MAX_VIP_PREFIXES, 0);

/// VIP id → its new-flow limits (read only when the VIP's flags say it has one).
#[map(name = "VIP_LIMITS")]
pub static VIP_LIMITS: Array<VipLimits> = Array::with_max_entries(MAX_VIPS, 0);

/// VIP id → its new-flow bucket (a GCRA theoretical arrival time in ns), shared by all CPUs and
/// updated with compare-and-swap (`firewall.rs`).
#[map(name = "VIP_BUCKETS")]
pub static VIP_BUCKETS: Array<u64> = Array::with_max_entries(MAX_VIPS, 0);

/// (source, VIP) → its new-flow bucket, as `VIP_BUCKETS`; an LRU, so sources that stopped
/// opening flows make room.
#[map(name = "SRC_BUCKETS")]
pub static SRC_BUCKETS: LruHashMap<SrcBucketKey, u64> =
    LruHashMap::with_max_entries(SRC_BUCKET_ENTRIES, 0);

/// VIP id → the packets its source checks and limits dropped, by reason (per CPU).
#[map(name = "VIP_DROPS")]
pub static VIP_DROPS: PerCpuArray<VipDrops> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map(name = "VIP_STATS")]
pub static VIP_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "REASON_STATS")]
pub static REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

/// The door's state (one entry): the policy generation and the live deny-list half. Pinned with
/// the tries it points into, so the old and the new program of a restart share it.
#[map(name = "POLICY")]
pub static POLICY: Array<PolicyState> = Array::with_max_entries(1, 0);

/// Addresses of this host (IPv4 and IPv6, as `Addr`) whose tunnelled packets the decapsulator
/// strips.
#[map(name = "DECAP_ADDRS")]
pub static DECAP_ADDRS: HashMap<Addr, u32> = HashMap::with_max_entries(MAX_DECAP_ADDRS, 0);

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

/// The stateful floors' flow table (`bench.rs`): `FLOWS`' key, value and map type. One entry
/// (the smallest map the kernel takes) unless a benchmark sizes it like `FLOWS` at load time, so
/// the agent's object does not preallocate a second flow table.
#[map(name = "FLOOR_FLOWS")]
pub static FLOOR_FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(1, 0);

/// As `FLOOR_FLOWS`, with one LRU list per CPU (`BPF_F_NO_COMMON_LRU`): the variant issue 16
/// weighs against the shared LRU. The kernel rounds its size to a multiple of the CPU count and
/// gives every CPU's list an equal share.
#[map(name = "FLOOR_FLOWS_PERCPU")]
pub static FLOOR_FLOWS_PERCPU: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(1, BPF_F_NO_COMMON_LRU);

/// The hop floor's VIP and its one backend (`bench.rs`, `xlb_floor_hop`), written by the
/// benchmark.
#[map(name = "FLOOR_HOP")]
pub static FLOOR_HOP: Array<lb_common::FloorHop> = Array::with_max_entries(1, 0);

/// Backend slot id → its resolved next hop, per CPU (`nexthop.rs`).
#[map(name = "NEXTHOPS")]
pub static NEXTHOPS: PerCpuArray<crate::nexthop::Entry> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// What the balancer's decision stage hands its forwarding stage, one slot per CPU
/// (`balancer::try_balance`): off the stack, whose 512 bytes the stages' frames need.
#[map(name = "STEERED")]
pub static STEERED: PerCpuArray<crate::balancer::Steered> = PerCpuArray::with_max_entries(1, 0);

/// The outer IPv4 ID counter of fragmentable IPIP packets, one per CPU (`forward.rs`).
#[map(name = "IPIP_IDS")]
pub static IPIP_IDS: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
