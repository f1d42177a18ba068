//! Types shared by the xlb XDP programs (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every type that crosses into the kernel is `#[repr(C)]`, has explicit padding fields (so there
//! is no uninitialised byte for the verifier or for a map key comparison to trip over), and uses no
//! `bool`. Byte order is stated on every field: `/* network order */` fields hold the bytes exactly as
//! they appear on the wire (so the data path compares them without swapping); everything else is in
//! host order.
#![no_std]

pub mod addr;
pub use addr::{Addr, V4_MAPPED_WORD};

/// Map names, shared so the agent never mistypes one.
pub mod maps {
    pub const VIPS: &str = "VIPS";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    /// IPv6 VIPs (`VipKey6`): a twin of `VIPS`, so an IPv4 packet never hashes a 16-byte address.
    pub const VIPS6: &str = "VIPS6";
    /// IPv6 VIP addresses (`Addr`): the twin of `VIP_ADDRS`.
    pub const VIP_ADDRS6: &str = "VIP_ADDRS6";
    pub const RINGS: &str = "RINGS";
    pub const RR_COUNTERS: &str = "RR_COUNTERS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS: &str = "FLOWS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const CONFIG: &str = "CONFIG";
    pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    pub const EVENT_STATS: &str = "EVENT_STATS";
    pub const DEBUG_VIPS: &str = "DEBUG_VIPS";
    pub const BENCH_GEN: &str = "BENCH_GEN";
    pub const BENCH_GEN_HEADER: &str = "BENCH_GEN_HEADER";
    /// The stateful floors' flow tables (`FLOWS`' key, value and map type; the shared LRU and
    /// the per-CPU LRU, `BPF_F_NO_COMMON_LRU`). One entry unless a benchmark sizes them.
    pub const FLOOR_FLOWS: &str = "FLOOR_FLOWS";
    pub const FLOOR_FLOWS_PERCPU: &str = "FLOOR_FLOWS_PERCPU";
    /// The hop floor's one backend (`FloorHop`, one entry).
    pub const FLOOR_HOP: &str = "FLOOR_HOP";
    pub const IPIP_IDS: &str = "IPIP_IDS";
    /// The global deny list's prefixes shorter than /32, double buffered:
    /// `PolicyState::deny_live` picks the live one (with the same half of `DENY_HOSTS`).
    pub const DENY: [&str; 2] = ["DENY0", "DENY1"];
    /// The global deny list's host entries (/32), double buffered like `DENY`.
    pub const DENY_HOSTS: [&str; 2] = ["DENY_HOSTS0", "DENY_HOSTS1"];
    /// The prefilter of `DENY_HOSTS`: one bit per /24 that holds a host entry, per half.
    pub const DENY_HOST_NETS: [&str; 2] = ["DENY_HOST_NETS0", "DENY_HOST_NETS1"];
    /// The global deny list's IPv6 prefixes (/0 to /128, hosts included), double buffered
    /// like `DENY`: the same `PolicyState::deny_live` picks the live half of both families.
    pub const DENY6: [&str; 2] = ["DENY6_0", "DENY6_1"];
    pub const VIP_ALLOW: &str = "VIP_ALLOW";
    pub const VIP_DENY: &str = "VIP_DENY";
    /// The IPv6 VIPs' source lists (`VipSrc6Data` keys), beside `VIP_ALLOW`/`VIP_DENY`.
    pub const VIP_ALLOW6: &str = "VIP_ALLOW6";
    pub const VIP_DENY6: &str = "VIP_DENY6";
    pub const VIP_LIMITS: &str = "VIP_LIMITS";
    pub const VIP_BUCKETS: &str = "VIP_BUCKETS";
    pub const SRC_BUCKETS: &str = "SRC_BUCKETS";
    pub const VIP_DROPS: &str = "VIP_DROPS";
    pub const EMBRYOS: &str = "EMBRYOS";
    pub const POLICY: &str = "POLICY";
}

/// Layout versions of the maps whose contents outlive an agent: the agent pins them in bpffs as
/// `NAME-v<version>` and a later agent (or a newer build) reuses them as they are only when the
/// version matches. Bump a map's version whenever the layout of its key or value (or the meaning
/// of an array's indexes) changes, and teach the agent to migrate the old version (or to refuse
/// it); `tests::every_pinned_map_layout_matches_its_version` fails until both are done. A change of
/// capacity (`max_entries`) alone is not a new version: the agent copies into a resized map.
pub mod layout {
    /// Version 2: `VipMeta` gained `flags` (the door's `VIP_F_*`); a v1 entry is copied with
    /// flags 0 (no source lists, no limits: what a build without the door had).
    pub const VIPS: u32 = 2;
    pub const VIP_ADDRS: u32 = 1;
    /// The IPv6 twins of `VIPS` and `VIP_ADDRS` (issue 15).
    pub const VIPS6: u32 = 1;
    pub const VIP_ADDRS6: u32 = 1;
    pub const RINGS: u32 = 1;
    pub const RR_COUNTERS: u32 = 1;
    /// Version 2: `Backend::addr` is a 16-byte `Addr` (both families) where v1 had an IPv4
    /// address and padding; a v1 entry is copied with its address mapped.
    pub const BACKENDS: u32 = 2;
    /// Version 2: `FlowValue::policy_gen` where v1 had padding (same size, new meaning); a v1
    /// flow is copied with generation 0, "check again". Version 3 exists only in builds with
    /// the test-only `layout-test` feature, where `FlowValue` has one more field: a second build
    /// whose data path really differs, to test an upgrade that migrates the flow table.
    ///
    /// Version 4: addresses of both families (issue 15): `FlowKey`'s addresses and
    /// `FlowValue::backend_addr` are 16-byte `Addr`s (IPv4 as IPv4-mapped); a v1/v2 flow is copied
    /// with its IPv4 addresses mapped. Version 5 is the `layout-test` build's (v4 + created_ns).
    ///
    /// Version 6: `FlowValue::vip_id` and `vip_forward` where v4 had padding (issue 16: an
    /// established packet takes its VIP from its flow, one hash lookup instead of two); a v4 (or
    /// v5) flow is copied with generation 0, so its next packet looks its VIP up and caches it.
    /// Version 7 is the `layout-test` build's (v6 + created_ns).
    #[cfg(not(feature = "layout-test"))]
    pub const FLOWS: u32 = 6;
    #[cfg(feature = "layout-test")]
    pub const FLOWS: u32 = 7;
    /// The embryonic flows (values are `FlowValue`s, so its layout follows `FLOWS`'s): pinned
    /// so that a SYN flood finds the same table after a restart and handshakes in progress
    /// complete on the backend they started with. Version 2 only in `layout-test` builds.
    /// Version 3: `FlowKey` and `FlowValue` of `FLOWS` v4 (both families); version 4 only in
    /// `layout-test` builds. Version 5: `FlowValue` of `FLOWS` v6 (the VIP cached); version 6
    /// only in `layout-test` builds. An entry may also be a held flow (`FLOW_F_HELD`: no
    /// backend; the same layout, so no new version): an upgrade leaves it behind, and a build
    /// before it reads it as an embryo whose backend left (re-steered).
    #[cfg(not(feature = "layout-test"))]
    pub const EMBRYOS: u32 = 5;
    #[cfg(feature = "layout-test")]
    pub const EMBRYOS: u32 = 6;
    /// The deny list's two halves: a restart keeps dropping what the list names, with no agent.
    /// Version 1 of these tries held the whole list; since `DENY_HOSTS` exists they hold only
    /// prefixes shorter than /32 (same layout: an agent taking over a trie that still holds host
    /// entries keeps them there until its program runs, then moves them, see
    /// `Dataplane::tidy_deny_list`).
    pub const DENY: u32 = 1;
    /// The deny list's host entries, one exact-match hash per half.
    pub const DENY_HOSTS: u32 = 1;
    /// The /24 bitmaps in front of `DENY_HOSTS` (`deny_host_net_word`). A list pinned by a
    /// build without them gets new, empty ones, filled from the hashes before the new program
    /// is swapped in (the old program never reads them).
    pub const DENY_HOST_NETS: u32 = 1;
    /// The deny list's IPv6 tries. A data path pinned by a build without them gets new, empty
    /// ones (its list had no IPv6 prefix: that build refused them).
    pub const DENY6: u32 = 1;
    /// The VIPs' source lists, both halves (`VIPS` names the live one of each VIP).
    pub const VIP_ALLOW: u32 = 1;
    pub const VIP_DENY: u32 = 1;
    /// The IPv6 VIPs' source lists. A data path pinned by a build without them gets new, empty
    /// ones (that build refused source lists on an IPv6 VIP).
    pub const VIP_ALLOW6: u32 = 1;
    pub const VIP_DENY6: u32 = 1;
    pub const VIP_LIMITS: u32 = 1;
    /// The new-flow limits' buckets: a restart must not hand every source a fresh burst.
    pub const VIP_BUCKETS: u32 = 1;
    /// Version 2: `SrcBucketKey::src_addr` is an `Addr`; v1 buckets are copied with their source
    /// mapped.
    pub const SRC_BUCKETS: u32 = 2;
    pub const VIP_DROPS: u32 = 1;
    /// The policy generation, the live deny-list half and which of its structures hold entries.
    /// Still version 1 with `POLICY_F_DENY_HOSTS`: the value's layout is the same and
    /// `POLICY_F_DENY_LIST` kept its meaning ("look in the live trie"); a v1 entry written by
    /// a build without the hash maps has the new bit clear, which is true of it.
    pub const POLICY: u32 = 1;
    pub const VIP_STATS: u32 = 1;
    pub const BACKEND_STATS: u32 = 1;
    /// Indexed by `reason::*`: new reasons are only ever appended (a longer array is a resize).
    pub const REASON_STATS: u32 = 1;
    /// Indexed by `event::*`: new events are only ever appended.
    pub const EVENT_STATS: u32 = 1;
    /// Version 2: `FlowEvent` of both families (56 bytes). A ring holds nothing worth keeping
    /// across an upgrade (the agent drains it continuously): a new one replaces it.
    pub const FLOW_EVENTS: u32 = 2;
    /// Pinned so that a restarted agent's program does not reuse the outer IDs it just sent.
    pub const IPIP_IDS: u32 = 1;

    /// Every map the agent pins, with its current layout version.
    pub const PINNED: &[(&str, u32)] = &[
        (super::maps::VIPS, VIPS),
        (super::maps::VIP_ADDRS, VIP_ADDRS),
        (super::maps::VIPS6, VIPS6),
        (super::maps::VIP_ADDRS6, VIP_ADDRS6),
        (super::maps::RINGS, RINGS),
        (super::maps::RR_COUNTERS, RR_COUNTERS),
        (super::maps::BACKENDS, BACKENDS),
        (super::maps::FLOWS, FLOWS),
        (super::maps::VIP_STATS, VIP_STATS),
        (super::maps::BACKEND_STATS, BACKEND_STATS),
        (super::maps::REASON_STATS, REASON_STATS),
        (super::maps::EVENT_STATS, EVENT_STATS),
        (super::maps::FLOW_EVENTS, FLOW_EVENTS),
        (super::maps::IPIP_IDS, IPIP_IDS),
        (super::maps::EMBRYOS, EMBRYOS),
        (super::maps::DENY[0], DENY),
        (super::maps::DENY[1], DENY),
        (super::maps::DENY_HOSTS[0], DENY_HOSTS),
        (super::maps::DENY_HOSTS[1], DENY_HOSTS),
        (super::maps::DENY_HOST_NETS[0], DENY_HOST_NETS),
        (super::maps::DENY_HOST_NETS[1], DENY_HOST_NETS),
        (super::maps::DENY6[0], DENY6),
        (super::maps::DENY6[1], DENY6),
        (super::maps::VIP_ALLOW, VIP_ALLOW),
        (super::maps::VIP_DENY, VIP_DENY),
        (super::maps::VIP_ALLOW6, VIP_ALLOW6),
        (super::maps::VIP_DENY6, VIP_DENY6),
        (super::maps::VIP_LIMITS, VIP_LIMITS),
        (super::maps::VIP_BUCKETS, VIP_BUCKETS),
        (super::maps::SRC_BUCKETS, SRC_BUCKETS),
        (super::maps::VIP_DROPS, VIP_DROPS),
        (super::maps::POLICY, POLICY),
    ];
}

/// Program names (the Rust function names of the `#[xdp]` entry points).
pub mod programs {
    /// The load balancer, attached on the LB's interface.
    pub const BALANCER: &str = "xlb_balancer";
    /// The IPIP decapsulator, attached on a backend's interface by `xlb backend-host setup`.
    pub const DECAP: &str = "xlb_decap";
    /// Returns `XDP_PASS` and nothing else: attached on veth peers so that native-mode
    /// `XDP_TX`/redirect onto them is delivered.
    pub const PASS: &str = "xlb_pass";
    /// Benchmark floor: returns `XDP_TX` without reading the packet.
    pub const FLOOR_TX: &str = "xlb_floor_tx";
    /// Benchmark floor: parses Ethernet, IPv4 and TCP with the same accessor as the balancer,
    /// then returns `XDP_TX` (`XDP_PASS` if the packet is not IPv4/TCP).
    pub const FLOOR_PARSE_TX: &str = "xlb_floor_parse_tx";
    /// Stateful floor: parses as `FLOOR_PARSE_TX`, one `FLOOR_FLOWS` lookup; on a hit rewrites
    /// the destination MAC from the entry, on a miss inserts the flow first; then `XDP_TX`.
    /// What any balancer with connection tracking does at least, established or new.
    pub const FLOOR_FLOW_TX: &str = "xlb_floor_flow_tx";
    /// New-flow floor: parses, one insert into `FLOOR_FLOWS` (no lookup), MAC, `XDP_TX`.
    pub const FLOOR_FLOW_INSERT_TX: &str = "xlb_floor_flow_insert_tx";
    /// `FLOOR_FLOW_TX` after `super::BENCH_CODE_MOVES` register moves that compute nothing: a
    /// probe of what code alone costs, executed per packet, on the live path against
    /// `BPF_PROG_TEST_RUN`.
    pub const FLOOR_FLOW_TX_CODE: &str = "xlb_floor_flow_tx_code";
    /// IPIP floor: `FLOOR_FLOW_TX`'s lookup (an insert on a miss), then the packet inside an
    /// outer IPv4 header (head grown by 20 bytes, Ethernet header, outer header with its
    /// checksum, to the entry's backend), `XDP_TX`: what any `ipip` balancer with connection
    /// tracking does at least per packet.
    pub const FLOOR_FLOW_IPIP: &str = "xlb_floor_flow_ipip";
    /// `FLOOR_FLOW_TX` on the per-CPU LRU `FLOOR_FLOWS_PERCPU`.
    pub const FLOOR_FLOW_TX_PERCPU: &str = "xlb_floor_flow_tx_percpu";
    /// `FLOOR_FLOW_INSERT_TX` on the per-CPU LRU `FLOOR_FLOWS_PERCPU`.
    pub const FLOOR_FLOW_INSERT_TX_PERCPU: &str = "xlb_floor_flow_insert_tx_percpu";
    /// The stateful floors by flow table: (table, lookup-then-insert program, insert-only
    /// program), the shared LRU first.
    pub const STATEFUL_FLOORS: [(&str, &str, &str); 2] = [
        (
            super::maps::FLOOR_FLOWS,
            FLOOR_FLOW_TX,
            FLOOR_FLOW_INSERT_TX,
        ),
        (
            super::maps::FLOOR_FLOWS_PERCPU,
            FLOOR_FLOW_TX_PERCPU,
            FLOOR_FLOW_INSERT_TX_PERCPU,
        ),
    ];
    /// Hop floor, the cheapest XDP hop a balancer with connection tracking can be: for TCP and
    /// UDP to `FloorHop::vip`, one lookup in `FLOOR_FLOWS` (one insert on a miss), both MACs
    /// from `FLOOR_HOP` (its one backend, reached with `l2` direct server return), `XDP_TX`;
    /// everything else passes. The end-to-end benchmark's row to hold xlb against.
    pub const FLOOR_HOP: &str = "xlb_floor_hop";
    /// Benchmark packet generator, run with `BPF_F_TEST_XDP_LIVE_FRAMES`: writes the frame's
    /// Ethernet/IPv4/UDP headers from `BenchGenHeader`, gives it the next of `BENCH_GEN_FLOWS`
    /// source ports and sends it (`XDP_TX`).
    pub const BENCH_GEN: &str = "xlb_bench_gen";
    /// Benchmark sink: drops UDP to `BENCH_SINK_PORT`, also inside IPIP, passes the rest (the
    /// veth's XDP drop counter counts what was forwarded to it).
    pub const BENCH_SINK: &str = "xlb_bench_sink";
}

/// Register moves `programs::FLOOR_FLOW_TX_CODE` runs before the stateful floor's work: 2,000
/// bytes of x86 code (a move of a small constant into a register is 5 bytes).
pub const BENCH_CODE_MOVES: usize = 400;

/// Source ports the UDP benchmark generator cycles through: `BENCH_GEN_FIRST_PORT` and up.
pub const BENCH_GEN_FLOWS: u16 = 4096;
pub const BENCH_GEN_FIRST_PORT: u16 = 1024;
/// UDP port of the benchmark flood, which the sink drops.
pub const BENCH_SINK_PORT: u16 = 9;
/// Where the SYN flood's spoofed sources come from (10.111.128.0/17, nothing else of the test
/// bed is there): the sink drops TCP SYNs from these, so the flood ends at the balancer's
/// doorstep instead of in the backends.
pub const BENCH_FLOOD_NET: [u8; 4] = [10, 111, 128, 0];
pub const BENCH_FLOOD_PREFIX_LEN: u32 = 17;
/// Bytes of header the generator writes: Ethernet (14), IPv4 without options (20), TCP (20); a
/// UDP frame's template is its 42 header bytes and 12 of its payload.
pub const BENCH_GEN_HEADER_LEN: usize = 54;
/// `BenchGenHeader::vary`: the n-th frame gets source port `BENCH_GEN_FIRST_PORT` + n mod
/// `flows` (the UDP flood).
pub const BENCH_GEN_VARY_PORT: u32 = 0;
/// `BenchGenHeader::vary`: the n-th frame (i = n mod `flows`) gets source address template + i
/// mod `sources` and source port template + i / `sources`, and its IPv4 checksum again (the
/// SYN flood from spoofed sources; the TCP checksum is left as the template's).
pub const BENCH_GEN_VARY_SOURCE: u32 = 1;

/// Value of the `FLOOR_HOP` array (one entry): the hop floor's VIP and its one backend's next
/// hop, written by the benchmark before it attaches `programs::FLOOR_HOP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloorHop {
    /// The VIP, network order (as the packet has it).
    pub vip: u32,
    /// The backend's MAC, as on the wire.
    pub dst_mac: [u8; 6],
    /// The balancer's own MAC on the interface, as on the wire.
    pub src_mac: [u8; 6],
}

/// Value of the `BENCH_GEN_HEADER` array (one entry): the generator's frame headers, written
/// into every frame before it is sent, and how they vary. Live-frames mode recycles its pages
/// without copying the frame in again, and whatever the generator's frames went through on the
/// way (a balancer rewriting MACs or encapsulating, DNAT) rewrote them in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BenchGenHeader {
    /// The first `BENCH_GEN_HEADER_LEN` bytes of the frame as on the wire, as 8-byte words in
    /// memory order (`u64::from_ne_bytes`); the rest is zero.
    pub words: [u64; 7],
    /// `BENCH_GEN_VARY_*`, host order.
    pub vary: u32,
    /// Distinct source addresses (`BENCH_GEN_VARY_SOURCE`), host order.
    pub sources: u32,
    /// Distinct flows, host order (at least 1).
    pub flows: u32,
    pub _pad: u32,
}

impl BenchGenHeader {
    /// The UDP flood of `frame`: `BENCH_GEN_FLOWS` source ports. `None` if `frame` is shorter
    /// than `BENCH_GEN_HEADER_LEN`.
    pub fn from_frame(frame: &[u8]) -> Option<Self> {
        Self::template(frame, BENCH_GEN_VARY_PORT, 1, BENCH_GEN_FLOWS as u32)
    }

    /// A flood of `frame` (a TCP SYN) from `sources` addresses counted up from its own, `flows`
    /// distinct (address, port) pairs in all (a multiple of `sources`).
    pub fn syn_flood(frame: &[u8], sources: u32, flows: u32) -> Option<Self> {
        Self::template(frame, BENCH_GEN_VARY_SOURCE, sources.max(1), flows.max(1))
    }

    fn template(frame: &[u8], vary: u32, sources: u32, flows: u32) -> Option<Self> {
        let head = frame.get(..BENCH_GEN_HEADER_LEN)?;
        let mut bytes = [0u8; 56];
        bytes[..BENCH_GEN_HEADER_LEN].copy_from_slice(head);
        let mut words = [0u64; 7];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_ne_bytes(b);
        }
        Some(Self {
            words,
            vary,
            sources,
            flows,
            _pad: 0,
        })
    }
}

/// How long the data path reuses a backend's resolved next hop (MACs, egress interface, MTU)
/// before asking the kernel's FIB again (CLOCK_MONOTONIC_COARSE ns): a route or neighbour change
/// reaches established flows within this time.
pub const NEXTHOP_TTL_NS: u64 = 1_000_000_000;

/// How far a flow's `FlowValue::last_seen_ns` may lag its last packet: the data path writes it
/// only once the clock is this far past it (a busy flow's entry then stays clean in the caches
/// between writes), so a flow's age (`xlb flows`) and the idle windows built on it are this
/// coarse.
pub const TOUCH_NS: u64 = 100_000_000;

/// Most VIPs one agent serves (size of the VIP-indexed arrays).
pub const MAX_VIPS: u32 = 256;
/// Most backend slots over all VIPs (a backend of two VIPs takes two slots, one per VIP).
pub const MAX_BACKENDS: u32 = 4096;
/// Slots in one half of a VIP's ring. A ring is double buffered: the agent writes the inactive half,
/// then flips `VipMeta::ring_half` with one map update, so no packet ever reads a half-written ring.
pub const RING_SLOTS: u32 = 4096;
/// Entries of the `RINGS` array: `MAX_VIPS` × 2 halves × `RING_SLOTS`.
pub const RING_ENTRIES: u32 = MAX_VIPS * 2 * RING_SLOTS;
/// Default flow-table capacity (entries of the LRU `FLOWS` map); the agent may set another at load.
pub const DEFAULT_FLOW_CAPACITY: u32 = 1 << 18;
/// Bytes of the `FLOW_EVENTS` ring buffer (a power of two, as the kernel requires): room for
/// about 8k `FlowEvent`s (56 bytes + an 8-byte record header each) between two reads.
pub const FLOW_EVENTS_BYTES: u32 = 1 << 19;
/// Entries of the decapsulator's local-address set (`DECAP_ADDRS`: IPv4 and IPv6 addresses,
/// keyed by `Addr`).
pub const MAX_DECAP_ADDRS: u32 = 64;
/// Entries the global deny list holds, host entries and shorter prefixes of both families
/// together: at least a million. Each structure of a half (`DENY_HOSTSn`, `DENYn`, `DENY6_n`) is
/// sized for all of them, so the list may be all IPv4 hosts, all IPv4 prefixes or all IPv6.
pub const MAX_DENY_PREFIXES: u32 = 1 << 20;
/// Source prefixes `VIP_ALLOW` and `VIP_DENY` each hold, over all VIPs and both halves of each
/// VIP's lists (a change writes the new half before the old one is cleared); `VIP_ALLOW6` and
/// `VIP_DENY6` as many IPv6 ones.
pub const MAX_VIP_PREFIXES: u32 = 1 << 18;
/// Token buckets of the per-(source, VIP) new-flow limits (`SRC_BUCKETS`, an LRU).
pub const SRC_BUCKET_ENTRIES: u32 = 1 << 16;
/// Default capacity of the embryonic-flow table (`EMBRYOS`, an LRU): TCP flows that have sent
/// nothing but SYNs; the agent may set another at load.
pub const DEFAULT_EMBRYO_CAPACITY: u32 = 1 << 16;

/// Index of a ring slot in `RINGS`.
#[inline(always)]
pub const fn ring_index(vip_id: u32, half: u32, slot: u32) -> u32 {
    (vip_id * 2 + (half & 1)) * RING_SLOTS + slot
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPv6 next header of an IPv6 packet inside IPv6 (RFC 2473).
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

/// How a VIP's packets reach its backends. Both are direct server return.
pub const FORWARD_IPIP: u32 = 0;
pub const FORWARD_L2: u32 = 1;

/// Key of the `VIPS` hash map: a service is (address, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    /// IPv4 address, network order.
    pub addr: u32,
    /// L4 port, network order.
    pub port: u16,
    /// IP protocol number (`IPPROTO_TCP` or `IPPROTO_UDP`).
    pub proto: u8,
    pub _pad: u8,
}

/// Key of the `VIPS6` hash map: an IPv6 service. IPv4 VIPs stay in `VIPS` (8-byte keys): the
/// IPv4 path hashes no more than it did before IPv6 existed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey6 {
    /// IPv6 address, network order (never IPv4-mapped).
    pub addr: Addr,
    /// L4 port, network order.
    pub port: u16,
    /// IP protocol number (`IPPROTO_TCP` or `IPPROTO_UDP`).
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the `VIPS` (and `VIPS6`) hash map. Replaced whole by the agent (one map update), so the data path
/// always sees a ring length and half that belong together.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index into the VIP-indexed arrays (`RINGS`, `RR_COUNTERS`, `VIP_STATS`), host order.
    pub id: u32,
    /// Live slots in the active ring half (0 = no backend: packets are dropped and counted).
    pub ring_len: u32,
    /// Which ring half is active (0 or 1).
    pub ring_half: u32,
    /// `FORWARD_IPIP` or `FORWARD_L2`.
    pub forward: u32,
    /// `VIP_F_*` bits, host order.
    pub flags: u32,
}

/// The VIP has a source allow list (in `VIP_ALLOW`): sources outside it are dropped.
pub const VIP_F_ALLOW: u32 = 1;
/// The VIP has a source deny list (in `VIP_DENY`).
pub const VIP_F_DENY: u32 = 2;
/// New flows are limited per (source address, VIP): `VipLimits::src_*`.
pub const VIP_F_SRC_LIMIT: u32 = 4;
/// New flows are limited per VIP: `VipLimits::vip_*`.
pub const VIP_F_VIP_LIMIT: u32 = 8;
/// Which half of the VIP's source lists is live (set: half 1). The agent writes the other half,
/// then switches with the one update of the VIP's entry that also switches its ring, so a packet
/// sees the old lists or the new ones.
pub const VIP_F_LIST_HALF: u32 = 16;
/// The VIP has one active backend slot (`BACKEND_F_ACTIVE`; a draining backend counts, a down
/// one does not), and it takes new flows (the ring is not empty): any flow of it can only be on
/// that backend, so a packet without SYN that finds no flow is steered at once even with peer
/// sync on (`CONFIG_F_HOLD_MIDFLOW`): a peer's record could name no other backend that this
/// node would honour, and holding would only delay the connection by its sender's
/// retransmission timeout.
pub const VIP_F_ONE_BACKEND: u32 = 32;

/// The tag of a VIP's source list half in `VipSrcKey`: the VIP id and the half, so lists of
/// different VIPs (and halves) never match each other.
#[inline(always)]
pub const fn vip_list_tag(vip_id: u32, half: u32) -> u32 {
    (vip_id << 1) | (half & 1)
}

/// Key data of the global deny list tries (`DENY0`, `DENY1`; LPM, prefix length 0 to 31): the
/// address, network order.
pub type DenyData = [u8; 4];

/// Key data of the global deny list's IPv6 tries (`DENY6_0`, `DENY6_1`; LPM, prefix length 0 to
/// 128): the address, network order (the packet's source field as it is).
pub type Deny6Data = [u8; 16];

/// Key of the deny list's host-entry hashes (`DENY_HOSTS0`, `DENY_HOSTS1`): the IPv4 address,
/// network order (the bytes of the packet's source field, read as a native `u32`).
pub type DenyHostKey = u32;

/// Words of a deny-list half's /24 bitmap (`DENY_HOST_NETS0`, `DENY_HOST_NETS1`, arrays of
/// `u64`, host order): one bit per /24 of the IPv4 space, 2^24 bits = 2 MiB. A set bit says "the
/// half's host hash holds at least one address of this /24", so the data path looks into the
/// hash only for sources of such a /24: a flood from elsewhere costs one array read of a small,
/// cache-friendly map instead of a hash lookup with random reads all over 16 MiB of buckets.
pub const DENY_HOST_NET_WORDS: u32 = 1 << 18;

/// Where the bit of `addr`'s /24 is in a `DENY_HOST_NETS` bitmap: (word index, bit in the
/// word). `addr` in host order (`u32::from(Ipv4Addr)`, or `u32::from_be` of a packet's field).
pub const fn deny_host_net_bit(addr: u32) -> (u32, u32) {
    (addr >> 14, (addr >> 8) & 63)
}

/// Key data of `VIP_ALLOW` and `VIP_DENY` (LPM, prefix length 32 + the source prefix's): the
/// list's tag (`vip_list_tag`, big endian, so it is the high-order part every prefix of the list
/// shares) then the source address, network order.
pub type VipSrcData = [u8; 8];

/// `VipSrcData` of `tag` and `addr` (network order).
#[inline(always)]
pub const fn vip_src_data(tag: u32, addr: [u8; 4]) -> VipSrcData {
    let t = tag.to_be_bytes();
    [t[0], t[1], t[2], t[3], addr[0], addr[1], addr[2], addr[3]]
}

/// Key data of `VIP_ALLOW6` and `VIP_DENY6` (LPM, prefix length 32 + the source prefix's): the
/// list tag (`vip_list_tag`, big-endian, so that it is matched whole first), then the IPv6
/// address (network order).
pub type VipSrc6Data = [u8; 20];

/// `VipSrc6Data` of `tag` and `addr` (network order).
pub const fn vip_src6_data(tag: u32, addr: [u8; 16]) -> VipSrc6Data {
    let t = tag.to_be_bytes();
    let mut d = [0u8; 20];
    d[0] = t[0];
    d[1] = t[1];
    d[2] = t[2];
    d[3] = t[3];
    let mut i = 0;
    while i < 16 {
        d[4 + i] = addr[i];
        i += 1;
    }
    d
}

/// Value of the per-VIP `VIP_LIMITS` array: the new-flow limits as GCRA parameters (host order,
/// nanoseconds). A limit of R new flows per second with a burst of B is an interval of 1e9/R ns
/// between flows and a tolerance of B intervals: a flow is admitted while the bucket's
/// theoretical arrival time, advanced by one interval, is at most the tolerance ahead of now.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipLimits {
    pub src_interval_ns: u64,
    pub src_tolerance_ns: u64,
    pub vip_interval_ns: u64,
    pub vip_tolerance_ns: u64,
}

/// Key of `SRC_BUCKETS`: a source address (either family) and a VIP id (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SrcBucketKey {
    pub src_addr: Addr,
    pub vip_id: u32,
}

/// Value of the `VIP_ADDRS` hash map (key: a VIP address, network order): what the data path
/// needs to know about an address that carries VIPs, whatever the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipAddr {
    /// VIPs (address, port, protocol) on this address, host order.
    pub vips: u32,
    /// `VIP_ADDR_F_*` bits.
    pub flags: u32,
}

/// ICMP echo requests to this address are answered (if `CONFIG_F_ICMP_ECHO` is set too).
pub const VIP_ADDR_F_ICMP_ECHO: u32 = 1;

/// Value of the `BACKENDS` array, indexed by backend slot id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// The backend's address (either family; `Addr::UNSPECIFIED` = free slot).
    pub addr: Addr,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// The VIP this slot belongs to, host order.
    pub vip_id: u32,
}

/// The backend may keep its existing flows (set for every configured backend; cleared when it is
/// removed, so flows pinned to a reused slot are re-steered rather than misdelivered).
pub const BACKEND_F_ACTIVE: u32 = 1;

/// Key of the `FLOWS` LRU map: the 5-tuple as seen on the wire, one table for both families. The
/// addresses are `Addr`s (IPv4 as IPv4-mapped), so an IPv4 and an IPv6 flow never share a key;
/// 40 bytes, a multiple of 4 (the kernel hashes such keys a word at a time).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// The client.
    pub src_addr: Addr,
    /// The VIP.
    pub dst_addr: Addr,
    /// Network order.
    pub src_port: u16,
    /// Network order.
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of the `FLOWS` (and `EMBRYOS`) LRU map. The data path writes a whole value only when it
/// assigns a flow (new, or re-steered) or promotes an embryonic one; a packet of a known flow
/// writes `last_seen_ns` alone (once it is `TOUCH_NS` old), and `policy_gen` after checking its
/// source again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// The backend's address: a flow is pinned to an address, and a slot id is only a cache of
    /// where that address lives. If the slot no longer holds it, the flow is re-steered.
    pub backend_addr: Addr,
    /// Backend slot id, host order.
    pub backend_id: u32,
    /// `FLOW_F_*` bits, host order: 0 when the data path assigned the flow.
    pub flags: u32,
    /// `bpf_ktime_get_coarse_ns()` of the last packet (CLOCK_MONOTONIC_COARSE, host order), or
    /// of an earlier one at most `TOUCH_NS` before it.
    pub last_seen_ns: u64,
    /// `PolicyState::generation` when the flow's cached decisions were last made (host order; 0 =
    /// never): while it equals the current generation, the flow's packets skip the source checks
    /// (deny list, the VIP's allow and deny lists), take their VIP from `vip_id` and
    /// `vip_forward` instead of looking it up in `VIPS`, and their backend from this entry
    /// without checking its slot in `BACKENDS` (the agent bumps the generation after every change
    /// of a VIP, removal and re-creation included, and after every change of a backend slot).
    /// Flows installed from peers carry 0. The data path reads and writes these 8 bytes at once
    /// (`FlowStamp`).
    pub policy_gen: u32,
    /// `VipMeta::id` of the flow's VIP under `policy_gen`, host order.
    pub vip_id: u16,
    /// `VipMeta::forward` of the flow's VIP under `policy_gen` (`FORWARD_*`).
    pub vip_forward: u8,
    pub _pad: u8,
    /// Builds with the test-only `layout-test` feature only (`layout::FLOWS` 5): when the flow
    /// was assigned (CLOCK_MONOTONIC_COARSE, host order).
    #[cfg(feature = "layout-test")]
    pub created_ns: u64,
}

impl FlowValue {
    /// A flow assigned to the backend at `backend_addr` in slot `backend_id`, seen at `now`,
    /// with `FLOW_F_*` `flags`.
    #[inline(always)]
    pub const fn new(backend_addr: Addr, backend_id: u32, now: u64, flags: u32) -> Self {
        FlowValue {
            backend_addr,
            backend_id,
            flags,
            last_seen_ns: now,
            policy_gen: 0,
            vip_id: 0,
            vip_forward: 0,
            _pad: 0,
            #[cfg(feature = "layout-test")]
            created_ns: now,
        }
    }
}

impl FlowValue {
    /// The value with `stamp` as its generation and cached VIP.
    #[inline(always)]
    pub const fn stamped(self, stamp: FlowStamp) -> Self {
        FlowValue {
            policy_gen: stamp.policy_gen,
            vip_id: stamp.vip_id,
            vip_forward: stamp.vip_forward,
            ..self
        }
    }

    /// The generation and cached VIP.
    #[inline(always)]
    pub const fn stamp(&self) -> FlowStamp {
        FlowStamp {
            policy_gen: self.policy_gen,
            vip_id: self.vip_id,
            vip_forward: self.vip_forward,
        }
    }
}

/// `FlowValue`'s last 8 bytes before the test-only field (`policy_gen`, `vip_id`, `vip_forward`,
/// padding) as one `u64` in memory order: the data path stores a generation together with what
/// it vouches for in one aligned write, so a reader on another CPU never pairs a current
/// generation with a VIP cached under an older one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowStamp {
    pub policy_gen: u32,
    pub vip_id: u16,
    pub vip_forward: u8,
}

impl FlowStamp {
    /// Never checked: the flow's next packet makes the source checks and looks its VIP up.
    pub const NONE: FlowStamp = FlowStamp {
        policy_gen: 0,
        vip_id: 0,
        vip_forward: 0,
    };

    /// Byte offset of the stamp in a `FlowValue` (8-aligned).
    pub const OFFSET: usize = 32;

    #[inline(always)]
    pub const fn to_word(self) -> u64 {
        let g = self.policy_gen.to_ne_bytes();
        let v = self.vip_id.to_ne_bytes();
        u64::from_ne_bytes([g[0], g[1], g[2], g[3], v[0], v[1], self.vip_forward, 0])
    }

    #[inline(always)]
    pub const fn from_word(w: u64) -> Self {
        let b = w.to_ne_bytes();
        FlowStamp {
            policy_gen: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            vip_id: u16::from_ne_bytes([b[4], b[5]]),
            vip_forward: b[6],
        }
    }
}

const _: () = {
    assert!(core::mem::offset_of!(FlowValue, policy_gen) == FlowStamp::OFFSET);
    assert!(core::mem::offset_of!(FlowValue, vip_id) == FlowStamp::OFFSET + 4);
    assert!(core::mem::offset_of!(FlowValue, vip_forward) == FlowStamp::OFFSET + 6);
    assert!(FlowStamp::OFFSET.is_multiple_of(8));
};

/// The flow was installed by the agent from a peer's sync (its backend was chosen by another
/// node); cleared when this node's data path (re)assigns the flow.
pub const FLOW_F_PEER: u32 = 1;
/// `EMBRYOS` only: no backend yet. A TCP packet without SYN found no flow while peer sync is on
/// (`CONFIG_F_HOLD_MIDFLOW`): its flow is most likely a peer's whose record is still on its way,
/// so its packets are dropped (`drop_midflow_held`) until the record arrives (then they hit
/// `FLOWS`) or `MIDFLOW_HOLD_NS` has passed since `last_seen_ns`, the time it was held (then the
/// next one is steered as a new flow, `midflow_miss`). `backend_addr` is unspecified.
pub const FLOW_F_HELD: u32 = 2;

/// How long a held flow (`FLOW_F_HELD`) waits for its peer's record: far longer than the sync's
/// own delay (a 2 ms flush, then one hop), and shorter than TCP's least retransmission timeout
/// (200 ms on Linux), so that the retransmission at the end of that timeout is served either
/// way (a tail-loss probe, a few round trips after the packet, may fall inside the hold).
pub const MIDFLOW_HOLD_NS: u64 = 100_000_000;

/// A flow the balancer just assigned (new, or re-steered because its backend went away), sent on
/// the `FLOW_EVENTS` ring buffer so the agent can tell its peers. The backend is named by address,
/// never by slot id: slot ids are local to one node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub flow: FlowKey,
    pub backend_addr: Addr,
}

/// Per-CPU traffic counters (values of `VIP_STATS` and `BACKEND_STATS`), host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Value of the one-entry `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbConfig {
    /// Outer source address of IPIP packets, network order. 0 = not configured (IPIP VIPs drop).
    pub lb_addr: u32,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// How many high bits of an outer IPv4 ID carry the CPU number (host order; at most 16):
    /// enough for every possible CPU, see `ipip_id_cpu_bits`.
    pub ipip_id_cpu_bits: u32,
    pub _pad: u32,
    /// Outer source address of IPv6-in-IPv6 and IPv4-in-IPv6 packets (an IPv6 `Addr`).
    /// `Addr::UNSPECIFIED` = not configured (`ipip` to IPv6 backends drops).
    pub lb_addr6: Addr,
}

/// Value of the one-entry `POLICY` array: the door's state that every packet reads and that
/// must outlive an agent (pinned, unlike `CONFIG`, which belongs to one loaded program): a
/// restarted agent continues the generation and finds the live deny list where it was.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyState {
    /// The policy generation (host order; 0 only in a map nobody wrote yet): bumped by the agent
    /// whenever the deny list, a VIP's source lists, a VIP or a backend slot (`BACKENDS`)
    /// changes, after the change (a removed VIP: right after its entry goes, before its slots
    /// are cleared, which no flow can be stamped for any more). A flow's cached decisions
    /// (`FlowValue::policy_gen`) are valid while they were made under the current generation.
    pub generation: u32,
    /// Which half of the deny list is live, `DENY0` with `DENY_HOSTS0` or `DENY1` with
    /// `DENY_HOSTS1` (0 or 1, host order).
    pub deny_live: u32,
    /// `POLICY_F_*` bits, host order.
    pub flags: u32,
    pub _pad: u32,
}

/// The live deny-list trie has prefixes (shorter than /32): every packet's source is looked up
/// in it (without the flag, a list of host entries only never walks the trie).
pub const POLICY_F_DENY_LIST: u32 = 1;
/// The live deny-list hash has host entries: every packet's source is looked up in it first
/// (one exact-match lookup, where the trie would walk up to 32 nodes).
pub const POLICY_F_DENY_HOSTS: u32 = 2;
/// At least one VIP has debug events on (`DEBUG_VIPS`): only then does the data path read a
/// packet's VIP's switch. A data path that ignores the bit (an older build) reads the switch
/// for every packet, which is what the bit stands for.
pub const POLICY_F_DEBUG: u32 = 4;
/// The live half's IPv6 trie (`DENY6_0`, `DENY6_1`) has prefixes: every IPv6 packet's source is
/// looked up in it. A data path that ignores the bit (an older build) filters no IPv6 source,
/// as that build's agent never listed one.
pub const POLICY_F_DENY6: u32 = 8;

/// The `LbConfig::ipip_id_cpu_bits` for a machine with `possible_cpus` CPUs: the fewest bits
/// that number them all. The outer ID of a fragmentable IPIP packet is the CPU number in these
/// high bits and a per-CPU counter in the rest, so two CPUs never send the same ID and each one
/// repeats an ID only after 2^(16 - bits) such packets.
pub const fn ipip_id_cpu_bits(possible_cpus: u32) -> u32 {
    let bits = possible_cpus.next_power_of_two().trailing_zeros();
    if bits > 16 { 16 } else { bits }
}

/// Report new flows on `FLOW_EVENTS`: set when the agent reads them (peer sync on). Without a
/// reader the ring buffer would fill once and every later flow would count as `flow_event_lost`.
pub const CONFIG_F_FLOW_EVENTS: u32 = 1;
/// Answer ICMP echo requests to VIP addresses (the global switch; each address also needs
/// `VIP_ADDR_F_ICMP_ECHO`).
pub const CONFIG_F_ICMP_ECHO: u32 = 2;
/// The flow table is being copied from a map of an older layout (an upgrade): a TCP packet
/// without SYN that finds no flow is dropped (`drop_migrating`) instead of being steered as a new
/// flow, because its entry may still be on its way from the old table; its sender retransmits it.
/// Set by the agent only between the program swap and the last copy pass.
pub const CONFIG_F_MIGRATING: u32 = 1 << 2;
/// Peer sync is on: a TCP packet without SYN that finds no flow is held (`FLOW_F_HELD`) for up
/// to `MIDFLOW_HOLD_NS` before it is steered as a new flow, since a peer's record of it may be
/// on its way (an ECMP change moves a flow that a peer opened a moment ago). Without peers no
/// record comes, and such a packet is steered at once.
pub const CONFIG_F_HOLD_MIDFLOW: u32 = 1 << 3;

/// What happened to a packet: one per-CPU packet counter each in `REASON_STATS`. Every packet the
/// balancer sees lands in exactly one of these.
pub mod reason {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): passed to the kernel.
    pub const PASS_NOT_IP: u32 = 0;
    /// IPv4 or IPv6 but not to a VIP address (for IPv6 also NDP, MLD, echo to the LB): passed.
    pub const PASS_NOT_VIP: u32 = 1;
    /// Ethernet header or IPv4 header truncated or invalid (bad IHL/version): passed, the kernel
    /// drops it with its own accounting; we cannot tell whether it was for a VIP.
    pub const PASS_MALFORMED: u32 = 2;
    /// To a VIP address, but no VIP has that port and protocol (and it is not ICMP): dropped.
    pub const DROP_UNKNOWN_PORT: u32 = 3;
    /// To a VIP address, L4 header truncated (TCP, UDP, ICMP, ICMPv6, or an IPv6 extension
    /// header; for an ICMP error also the quoted IP header and the 8 bytes after it): dropped.
    pub const DROP_MALFORMED_L4: u32 = 4;
    /// An IP fragment to a VIP address (no L4 header to steer by; for IPv6 any Fragment header,
    /// atomic ones too): dropped.
    pub const DROP_FRAGMENT: u32 = 5;
    /// The VIP has no backend in its ring: dropped.
    pub const DROP_NO_BACKEND: u32 = 6;
    /// No route to the backend (or FIB lookup failed otherwise): dropped.
    pub const DROP_NO_ROUTE: u32 = 7;
    /// Packet too big for the egress MTU after encapsulation, DF not set: dropped (XDP cannot
    /// fragment, and a fragmented IPIP packet could not be decapsulated by the backend's XDP).
    pub const DROP_TOO_BIG: u32 = 8;
    /// Header adjustment failed (no headroom), or `ipip` without an LB address of the backend's
    /// family (`LbConfig::lb_addr`, `LbConfig::lb_addr6`): dropped.
    pub const DROP_ENCAP_FAILED: u32 = 9;
    /// Too big with DF set (IPv6: always): answered with ICMP fragmentation-needed, for IPv6
    /// ICMPv6 packet too big (`XDP_TX`).
    pub const TX_ICMP_FRAG_NEEDED: u32 = 10;
    /// Forwarded back out of the ingress interface (`XDP_TX`).
    pub const FWD_TX: u32 = 11;
    /// Forwarded to another interface (`XDP_REDIRECT`).
    pub const FWD_REDIRECT: u32 = 12;
    /// Forwarded packet whose next hop has no neighbour entry yet: passed to the kernel, which
    /// resolves it and sends the (already rewritten) packet.
    pub const PASS_NO_NEIGH: u32 = 13;
    /// `l2` forwarding whose backend has no neighbour entry yet: dropped, because handing the
    /// unchanged frame (still addressed to the VIP) to the kernel would route it back towards the
    /// router and loop. The agent keeps backends' neighbour entries warm so this stays rare.
    pub const DROP_NO_NEIGH: u32 = 14;
    /// To a VIP, and the frame is shorter than the IPv4 total length (IPv6: 40 + payload
    /// length), or that length is shorter than the IP, extension and L4 headers: dropped (forwarding it would send the
    /// backend a packet whose header claims bytes that do not exist).
    pub const DROP_BAD_LENGTH: u32 = 15;
    /// ICMP destination unreachable to a VIP address that quotes no live flow of a VIP there (no
    /// such VIP, no flow entry, the flow's backend gone, a quoted non-first fragment, not TCP or
    /// UDP): dropped. Nothing is steered or created for it.
    pub const DROP_ICMP_NO_FLOW: u32 = 16;
    /// ICMP to a VIP address that is neither answered nor forwarded: every type other than
    /// destination unreachable and echo request, echo requests where echo is off (globally or
    /// for every VIP of the address), and echo requests with IP options: dropped.
    pub const DROP_ICMP_OTHER: u32 = 17;
    /// ICMP fragmentation needed (destination unreachable, code 4) about a live flow: forwarded
    /// to the flow's backend, so it lowers its path MTU towards the client.
    pub const FWD_ICMP_FRAG_NEEDED: u32 = 18;
    /// Any other ICMP destination unreachable about a live flow: forwarded to the flow's backend,
    /// which sees what a server without a balancer in front would see.
    pub const FWD_ICMP_UNREACH: u32 = 19;
    /// ICMP echo request to a VIP address where echo is on: answered by the balancer itself
    /// (`XDP_TX`).
    pub const TX_ICMP_ECHO_REPLY: u32 = 20;
    /// A TCP packet without SYN whose flow was not (yet) in the table while the agent copied
    /// the table from an older layout (`CONFIG_F_MIGRATING`): dropped, the sender retransmits.
    pub const DROP_MIGRATING: u32 = 21;
    /// IPv4 from a source on the global deny list (`xlb deny`): dropped, whatever it was for
    /// (a VIP, the LB's own addresses, anything else).
    pub const DROP_DENY_LIST: u32 = 22;
    /// To a VIP, from a source on the VIP's deny list (`--deny-src`): dropped.
    pub const DROP_SRC_DENIED: u32 = 23;
    /// To a VIP that has an allow list (`--allow-src`), from a source outside it: dropped.
    pub const DROP_SRC_NOT_ALLOWED: u32 = 24;
    /// A new flow over its source's limit for the VIP (`--src-rate`, `--src-burst`): dropped.
    pub const DROP_RATE_LIMITED_SRC: u32 = 25;
    /// A new flow over the VIP's limit (`--vip-rate`, `--vip-burst`): dropped.
    pub const DROP_RATE_LIMITED_VIP: u32 = 26;
    /// IPv6 to a VIP address that cannot be steered past its extension headers: a fifth one, a
    /// Hop-by-Hop header that is not first, a routing header with segments left, AH, ESP, or
    /// any other next header that is not skipped (see `lb-ebpf/src/ipv6.rs`): dropped.
    pub const DROP_EXT_HEADER: u32 = 27;
    /// A TCP packet without SYN of a flow held for its peer's record (`FLOW_F_HELD`,
    /// `CONFIG_F_HOLD_MIDFLOW`): dropped, the sender retransmits.
    pub const DROP_MIDFLOW_HELD: u32 = 28;
    /// Number of reasons (size of `REASON_STATS`).
    pub const COUNT: u32 = 29;

    /// Stable names for metrics, `xlb stats` and tests, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_not_vip",
        "pass_malformed",
        "drop_unknown_port",
        "drop_malformed_l4",
        "drop_fragment",
        "drop_no_backend",
        "drop_no_route",
        "drop_too_big",
        "drop_encap_failed",
        "tx_icmp_frag_needed",
        "fwd_tx",
        "fwd_redirect",
        "pass_no_neigh",
        "drop_no_neigh",
        "drop_bad_length",
        "drop_icmp_no_flow",
        "drop_icmp_other",
        "fwd_icmp_frag_needed",
        "fwd_icmp_unreach",
        "tx_icmp_echo_reply",
        "drop_migrating",
        "drop_deny_list",
        "drop_src_denied",
        "drop_src_not_allowed",
        "drop_rate_limited_src",
        "drop_rate_limited_vip",
        "drop_ext_header",
        "drop_midflow_held",
    ];
}

/// Per-VIP drop counters (`VIP_DROPS`, per CPU, indexed by VIP id): the packets of a VIP that
/// its source checks and new-flow limits dropped, by reason. Each is also counted under the
/// reason of the same name in `REASON_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipDrops {
    /// `drop_deny_list` (the packet was for this VIP).
    pub deny_list: u64,
    pub src_denied: u64,
    pub src_not_allowed: u64,
    pub rate_limited_src: u64,
    pub rate_limited_vip: u64,
}

/// Per-CPU event counters (`EVENT_STATS`): things worth knowing that are not a packet's outcome
/// (the packet is also counted under its `reason`).
pub mod event {
    /// A TCP packet without SYN that found no flow entry: a flow the node never saw start (peer
    /// sync gap, agent restart with a fresh table, ECMP change). It is steered as a new flow
    /// (with peer sync on, only once its flow was held `MIDFLOW_HOLD_NS` for nothing: see
    /// `MIDFLOW_HELD`).
    pub const MIDFLOW_MISS: u32 = 0;
    /// A flow entry whose backend slot no longer holds its backend (down or removed): re-steered.
    pub const FLOW_RESTEERED: u32 = 1;
    /// A `FlowEvent` that did not fit in the ring buffer (the agent is not keeping up): that
    /// flow is not synced to peers.
    pub const FLOW_EVENT_LOST: u32 = 2;
    /// A `bpf_fib_lookup` for a backend's next hop: the per-CPU next-hop cache had no live entry
    /// for it (first packet, entry older than `NEXTHOP_TTL_NS`, packet over the cached MTU, or
    /// the kernel had no neighbour entry, which is never cached).
    pub const NEXTHOP_LOOKUP: u32 = 3;
    /// A new TCP flow held in the embryonic table (`EMBRYOS`) until its first packet without
    /// SYN: a SYN flood churns that table, not the flow table.
    pub const EMBRYONIC_NEW: u32 = 4;
    /// An embryonic flow's first packet without SYN (the client's handshake ACK): the flow moved
    /// into `FLOWS` (and was reported for peer sync).
    pub const EMBRYONIC_PROMOTED: u32 = 5;
    /// A flow whose cached source checks were made under an older policy generation: checked
    /// again (the deny list, a VIP's lists or a VIP changed since).
    pub const POLICY_RECHECK: u32 = 6;
    /// A new-flow limit's bucket kept changing under this CPU's compare-and-swap (other CPUs
    /// taking tokens at the same time): the flow was counted as limited.
    pub const RATE_LIMIT_CONTENDED: u32 = 7;
    /// With peer sync on, a TCP packet without SYN that found no flow entry: its flow is held
    /// (`FLOW_F_HELD`) while a peer's record of it may still be on its way. Once per hold.
    pub const MIDFLOW_HELD: u32 = 8;
    pub const COUNT: u32 = 9;
    pub const NAMES: [&str; COUNT as usize] = [
        "midflow_miss",
        "flow_resteered",
        "flow_event_lost",
        "nexthop_lookup",
        "embryonic_new",
        "embryonic_promoted",
        "policy_recheck",
        "rate_limit_contended",
        "midflow_held",
    ];
}

/// Per-CPU packet counters of the decapsulator (`DECAP_STATS`).
pub mod decap_reason {
    /// A tunnelled packet to a local address (IPv4 in IPv4, IPv6 in IPv6, IPv4 in IPv6): outer
    /// header removed, inner packet passed up.
    pub const DECAPSULATED: u32 = 0;
    /// Anything else: passed untouched.
    pub const PASS_OTHER: u32 = 1;
    /// A tunnelled packet to a local address that cannot be decapsulated here: an outer fragment
    /// (nothing here reassembles), or an inner header that is truncated or of the wrong version.
    /// Dropped.
    pub const DROP_MALFORMED: u32 = 2;
    pub const COUNT: u32 = 3;
    pub const NAMES: [&str; COUNT as usize] = ["decapsulated", "pass_other", "drop_malformed"];
}

// The layouts the kernel and userspace share, checked when either side compiles (the eBPF build
// too): every struct is exactly the sum of its fields, with no padding the compiler added.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<VipKey>() == 8);
    assert!(size_of::<VipMeta>() == 20);
    assert!(size_of::<VipLimits>() == 32);
    assert!(size_of::<SrcBucketKey>() == 20);
    assert!(size_of::<VipDrops>() == 40);
    assert!(size_of::<VipAddr>() == 8);
    assert!(size_of::<Backend>() == 24);
    assert!(size_of::<FlowKey>() == 40);
    #[cfg(not(feature = "layout-test"))]
    assert!(size_of::<FlowValue>() == 40);
    #[cfg(feature = "layout-test")]
    assert!(size_of::<FlowValue>() == 48);
    assert!(size_of::<FlowEvent>() == 56);
    assert!(size_of::<TrafficCounters>() == 24);
    assert!(size_of::<LbConfig>() == 32);
    assert!(size_of::<VipKey6>() == 20);
    assert!(size_of::<PolicyState>() == 16);
    assert!(size_of::<BenchGenHeader>() == 72);
    assert!(size_of::<FloorHop>() == 16);
    assert!(size_of::<Addr>() == 16);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], contain only integers, and have explicit padding fields,
    // so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipKey6 {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for VipAddr {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for LbConfig {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for BenchGenHeader {}
    unsafe impl aya::Pod for FloorHop {}
    unsafe impl aya::Pod for VipLimits {}
    unsafe impl aya::Pod for SrcBucketKey {}
    unsafe impl aya::Pod for VipDrops {}
    unsafe impl aya::Pod for PolicyState {}
    unsafe impl aya::Pod for Addr {}
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::{format, string::String, vec::Vec};

    /// `Type=size field@offset:size …`: what a map key or value looks like in memory.
    macro_rules! shape {
        ($t:ty) => {
            format!("{}={}", stringify!($t), size_of::<$t>())
        };
        ($t:ty { $($f:ident),* $(,)? }) => {{
            let v = <$t as Default>::default();
            let mut s = format!("{}={}", stringify!($t), size_of::<$t>());
            $(s += &format!(" {}@{}:{}", stringify!($f), core::mem::offset_of!($t, $f), size_of_val(&v.$f));)*
            s
        }};
    }

    /// The key and value layout of every pinned map as this build has them.
    fn current_layouts() -> Vec<(&'static str, u32, String)> {
        let vip_key = shape!(VipKey {
            addr,
            port,
            proto,
            _pad
        });
        let vip_meta = shape!(VipMeta {
            id,
            ring_len,
            ring_half,
            forward,
            flags
        });
        let counters = shape!(TrafficCounters {
            packets,
            bytes,
            new_flows
        });
        #[cfg(not(feature = "layout-test"))]
        let flow_value = shape!(FlowValue {
            backend_addr,
            backend_id,
            flags,
            last_seen_ns,
            policy_gen,
            vip_id,
            vip_forward,
            _pad
        });
        #[cfg(feature = "layout-test")]
        let flow_value = shape!(FlowValue {
            backend_addr,
            backend_id,
            flags,
            last_seen_ns,
            policy_gen,
            vip_id,
            vip_forward,
            _pad,
            created_ns
        });
        let flow_key = shape!(FlowKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad
        });
        // aya's LPM key: the prefix length (u32, host order), then the data.
        let lpm_key = |data: usize| format!("LpmKey={} prefix_len@0:4 data@4:{data}", 4 + data);
        let kv = |k: String, v: String| format!("key {k}; value {v}");
        std::vec![
            (
                maps::VIPS,
                layout::VIPS,
                kv(vip_key.clone(), vip_meta.clone())
            ),
            (
                maps::VIP_ADDRS,
                layout::VIP_ADDRS,
                kv(shape!(u32), shape!(VipAddr { vips, flags }))
            ),
            (
                maps::VIPS6,
                layout::VIPS6,
                kv(
                    shape!(VipKey6 {
                        addr,
                        port,
                        proto,
                        _pad
                    }),
                    vip_meta
                )
            ),
            (
                maps::VIP_ADDRS6,
                layout::VIP_ADDRS6,
                kv(shape!(Addr), shape!(VipAddr { vips, flags }))
            ),
            (maps::RINGS, layout::RINGS, kv(shape!(u32), shape!(u32))),
            (
                maps::RR_COUNTERS,
                layout::RR_COUNTERS,
                kv(shape!(u32), shape!(u64))
            ),
            (
                maps::BACKENDS,
                layout::BACKENDS,
                kv(
                    shape!(u32),
                    shape!(Backend {
                        addr,
                        flags,
                        vip_id
                    })
                )
            ),
            (
                maps::FLOWS,
                layout::FLOWS,
                kv(flow_key.clone(), flow_value.clone()),
            ),
            (
                maps::VIP_STATS,
                layout::VIP_STATS,
                kv(shape!(u32), counters.clone())
            ),
            (
                maps::BACKEND_STATS,
                layout::BACKEND_STATS,
                kv(shape!(u32), counters)
            ),
            (
                maps::REASON_STATS,
                layout::REASON_STATS,
                kv(shape!(u32), shape!(u64))
            ),
            (
                maps::EVENT_STATS,
                layout::EVENT_STATS,
                kv(shape!(u32), shape!(u64))
            ),
            (
                maps::FLOW_EVENTS,
                layout::FLOW_EVENTS,
                format!("records {}", shape!(FlowEvent { flow, backend_addr }))
            ),
            (
                maps::IPIP_IDS,
                layout::IPIP_IDS,
                kv(shape!(u32), shape!(u32))
            ),
            (
                maps::EMBRYOS,
                layout::EMBRYOS,
                kv(flow_key.clone(), flow_value.clone())
            ),
            (
                maps::DENY[0],
                layout::DENY,
                kv(lpm_key(size_of::<DenyData>()), shape!(u8))
            ),
            (
                maps::DENY[1],
                layout::DENY,
                kv(lpm_key(size_of::<DenyData>()), shape!(u8))
            ),
            (
                maps::DENY_HOSTS[0],
                layout::DENY_HOSTS,
                kv(shape!(DenyHostKey), shape!(u8))
            ),
            (
                maps::DENY_HOSTS[1],
                layout::DENY_HOSTS,
                kv(shape!(DenyHostKey), shape!(u8))
            ),
            (
                maps::DENY_HOST_NETS[0],
                layout::DENY_HOST_NETS,
                kv(shape!(u32), shape!(u64))
            ),
            (
                maps::DENY_HOST_NETS[1],
                layout::DENY_HOST_NETS,
                kv(shape!(u32), shape!(u64))
            ),
            (
                maps::DENY6[0],
                layout::DENY6,
                kv(lpm_key(size_of::<Deny6Data>()), shape!(u8))
            ),
            (
                maps::DENY6[1],
                layout::DENY6,
                kv(lpm_key(size_of::<Deny6Data>()), shape!(u8))
            ),
            (
                maps::VIP_ALLOW,
                layout::VIP_ALLOW,
                kv(lpm_key(size_of::<VipSrcData>()), shape!(u8))
            ),
            (
                maps::VIP_DENY,
                layout::VIP_DENY,
                kv(lpm_key(size_of::<VipSrcData>()), shape!(u8))
            ),
            (
                maps::VIP_ALLOW6,
                layout::VIP_ALLOW6,
                kv(lpm_key(size_of::<VipSrc6Data>()), shape!(u8))
            ),
            (
                maps::VIP_DENY6,
                layout::VIP_DENY6,
                kv(lpm_key(size_of::<VipSrc6Data>()), shape!(u8))
            ),
            (
                maps::VIP_LIMITS,
                layout::VIP_LIMITS,
                kv(
                    shape!(u32),
                    shape!(VipLimits {
                        src_interval_ns,
                        src_tolerance_ns,
                        vip_interval_ns,
                        vip_tolerance_ns
                    })
                )
            ),
            (
                maps::VIP_BUCKETS,
                layout::VIP_BUCKETS,
                kv(shape!(u32), shape!(u64))
            ),
            (
                maps::SRC_BUCKETS,
                layout::SRC_BUCKETS,
                kv(shape!(SrcBucketKey { src_addr, vip_id }), shape!(u64))
            ),
            (
                maps::VIP_DROPS,
                layout::VIP_DROPS,
                kv(
                    shape!(u32),
                    shape!(VipDrops {
                        deny_list,
                        src_denied,
                        src_not_allowed,
                        rate_limited_src,
                        rate_limited_vip
                    })
                )
            ),
            (
                maps::POLICY,
                layout::POLICY,
                kv(
                    shape!(u32),
                    shape!(PolicyState {
                        generation,
                        deny_live,
                        flags,
                        _pad
                    })
                )
            ),
        ]
    }

    /// Every (map, layout version) there has been, with its layout. A version's layout never
    /// changes: a new layout gets a new version and a new row, and the old row stays.
    const KNOWN_LAYOUTS: &[(&str, u32, &str)] = &[
        (
            "VIPS",
            1,
            "key VipKey=8 addr@0:4 port@4:2 proto@6:1 _pad@7:1; value VipMeta=16 id@0:4 ring_len@4:4 ring_half@8:4 forward@12:4",
        ),
        (
            "VIP_ADDRS",
            1,
            "key u32=4; value VipAddr=8 vips@0:4 flags@4:4",
        ),
        (
            "VIPS6",
            1,
            "key VipKey6=20 addr@0:16 port@16:2 proto@18:1 _pad@19:1; value VipMeta=20 id@0:4 ring_len@4:4 ring_half@8:4 forward@12:4 flags@16:4",
        ),
        (
            "VIP_ADDRS6",
            1,
            "key Addr=16; value VipAddr=8 vips@0:4 flags@4:4",
        ),
        ("RINGS", 1, "key u32=4; value u32=4"),
        ("RR_COUNTERS", 1, "key u32=4; value u64=8"),
        (
            "BACKENDS",
            1,
            "key u32=4; value Backend=16 addr@0:4 flags@4:4 vip_id@8:4 _pad@12:4",
        ),
        (
            "FLOWS",
            1,
            "key FlowKey=16 src_addr@0:4 dst_addr@4:4 src_port@8:2 dst_port@10:2 proto@12:1 _pad@13:3; value FlowValue=24 backend_addr@0:4 backend_id@4:4 last_seen_ns@8:8 flags@16:4 _pad@20:4",
        ),
        (
            "VIP_STATS",
            1,
            "key u32=4; value TrafficCounters=24 packets@0:8 bytes@8:8 new_flows@16:8",
        ),
        (
            "BACKEND_STATS",
            1,
            "key u32=4; value TrafficCounters=24 packets@0:8 bytes@8:8 new_flows@16:8",
        ),
        ("REASON_STATS", 1, "key u32=4; value u64=8"),
        ("EVENT_STATS", 1, "key u32=4; value u64=8"),
        (
            "FLOW_EVENTS",
            1,
            "records FlowEvent=24 flow@0:16 backend_addr@16:4 _pad@20:4",
        ),
        ("IPIP_IDS", 1, "key u32=4; value u32=4"),
        (
            "VIPS",
            2,
            "key VipKey=8 addr@0:4 port@4:2 proto@6:1 _pad@7:1; value VipMeta=20 id@0:4 ring_len@4:4 ring_half@8:4 forward@12:4 flags@16:4",
        ),
        (
            "FLOWS",
            2,
            "key FlowKey=16 src_addr@0:4 dst_addr@4:4 src_port@8:2 dst_port@10:2 proto@12:1 _pad@13:3; value FlowValue=24 backend_addr@0:4 backend_id@4:4 last_seen_ns@8:8 flags@16:4 policy_gen@20:4",
        ),
        (
            "EMBRYOS",
            1,
            "key FlowKey=16 src_addr@0:4 dst_addr@4:4 src_port@8:2 dst_port@10:2 proto@12:1 _pad@13:3; value FlowValue=24 backend_addr@0:4 backend_id@4:4 last_seen_ns@8:8 flags@16:4 policy_gen@20:4",
        ),
        (
            "DENY0",
            1,
            "key LpmKey=8 prefix_len@0:4 data@4:4; value u8=1",
        ),
        (
            "DENY1",
            1,
            "key LpmKey=8 prefix_len@0:4 data@4:4; value u8=1",
        ),
        (
            "VIP_ALLOW",
            1,
            "key LpmKey=12 prefix_len@0:4 data@4:8; value u8=1",
        ),
        (
            "VIP_DENY",
            1,
            "key LpmKey=12 prefix_len@0:4 data@4:8; value u8=1",
        ),
        (
            "VIP_ALLOW6",
            1,
            "key LpmKey=24 prefix_len@0:4 data@4:20; value u8=1",
        ),
        (
            "VIP_DENY6",
            1,
            "key LpmKey=24 prefix_len@0:4 data@4:20; value u8=1",
        ),
        (
            "VIP_LIMITS",
            1,
            "key u32=4; value VipLimits=32 src_interval_ns@0:8 src_tolerance_ns@8:8 vip_interval_ns@16:8 vip_tolerance_ns@24:8",
        ),
        ("VIP_BUCKETS", 1, "key u32=4; value u64=8"),
        (
            "SRC_BUCKETS",
            1,
            "key SrcBucketKey=8 src_addr@0:4 vip_id@4:4; value u64=8",
        ),
        (
            "VIP_DROPS",
            1,
            "key u32=4; value VipDrops=40 deny_list@0:8 src_denied@8:8 src_not_allowed@16:8 rate_limited_src@24:8 rate_limited_vip@32:8",
        ),
        (
            "POLICY",
            1,
            "key u32=4; value PolicyState=16 generation@0:4 deny_live@4:4 flags@8:4 _pad@12:4",
        ),
        (
            "FLOWS",
            3,
            "key FlowKey=16 src_addr@0:4 dst_addr@4:4 src_port@8:2 dst_port@10:2 proto@12:1 _pad@13:3; value FlowValue=32 backend_addr@0:4 backend_id@4:4 last_seen_ns@8:8 flags@16:4 policy_gen@20:4 created_ns@24:8",
        ),
        (
            "EMBRYOS",
            2,
            "key FlowKey=16 src_addr@0:4 dst_addr@4:4 src_port@8:2 dst_port@10:2 proto@12:1 _pad@13:3; value FlowValue=32 backend_addr@0:4 backend_id@4:4 last_seen_ns@8:8 flags@16:4 policy_gen@20:4 created_ns@24:8",
        ),
        ("DENY_HOSTS0", 1, "key DenyHostKey=4; value u8=1"),
        ("DENY_HOSTS1", 1, "key DenyHostKey=4; value u8=1"),
        ("DENY_HOST_NETS0", 1, "key u32=4; value u64=8"),
        ("DENY_HOST_NETS1", 1, "key u32=4; value u64=8"),
        (
            "DENY6_0",
            1,
            "key LpmKey=20 prefix_len@0:4 data@4:16; value u8=1",
        ),
        (
            "DENY6_1",
            1,
            "key LpmKey=20 prefix_len@0:4 data@4:16; value u8=1",
        ),
        (
            "BACKENDS",
            2,
            "key u32=4; value Backend=24 addr@0:16 flags@16:4 vip_id@20:4",
        ),
        (
            "FLOWS",
            4,
            "key FlowKey=40 src_addr@0:16 dst_addr@16:16 src_port@32:2 dst_port@34:2 proto@36:1 _pad@37:3; value FlowValue=40 backend_addr@0:16 backend_id@16:4 flags@20:4 last_seen_ns@24:8 policy_gen@32:4 _pad@36:4",
        ),
        (
            "EMBRYOS",
            3,
            "key FlowKey=40 src_addr@0:16 dst_addr@16:16 src_port@32:2 dst_port@34:2 proto@36:1 _pad@37:3; value FlowValue=40 backend_addr@0:16 backend_id@16:4 flags@20:4 last_seen_ns@24:8 policy_gen@32:4 _pad@36:4",
        ),
        (
            "FLOW_EVENTS",
            2,
            "records FlowEvent=56 flow@0:40 backend_addr@40:16",
        ),
        (
            "SRC_BUCKETS",
            2,
            "key SrcBucketKey=20 src_addr@0:16 vip_id@16:4; value u64=8",
        ),
        (
            "FLOWS",
            5,
            "key FlowKey=40 src_addr@0:16 dst_addr@16:16 src_port@32:2 dst_port@34:2 proto@36:1 _pad@37:3; value FlowValue=48 backend_addr@0:16 backend_id@16:4 flags@20:4 last_seen_ns@24:8 policy_gen@32:4 _pad@36:4 created_ns@40:8",
        ),
        (
            "EMBRYOS",
            4,
            "key FlowKey=40 src_addr@0:16 dst_addr@16:16 src_port@32:2 dst_port@34:2 proto@36:1 _pad@37:3; value FlowValue=48 backend_addr@0:16 backend_id@16:4 flags@20:4 last_seen_ns@24:8 policy_gen@32:4 _pad@36:4 created_ns@40:8",
        ),
        (
            "FLOWS",
            6,
            "key FlowKey=40 src_addr@0:16 dst_addr@16:16 src_port@32:2 dst_port@34:2 proto@36:1 _pad@37:3; value FlowValue=40 backend_addr@0:16 backend_id@16:4 flags@20:4 last_seen_ns@24:8 policy_gen@32:4 vip_id@36:2 vip_forward@38:1 _pad@39:1",
        ),
        (
            "EMBRYOS",
            5,
            "key FlowKey=40 src_addr@0:16 dst_addr@16:16 src_port@32:2 dst_port@34:2 proto@36:1 _pad@37:3; value FlowValue=40 backend_addr@0:16 backend_id@16:4 flags@20:4 last_seen_ns@24:8 policy_gen@32:4 vip_id@36:2 vip_forward@38:1 _pad@39:1",
        ),
        (
            "FLOWS",
            7,
            "key FlowKey=40 src_addr@0:16 dst_addr@16:16 src_port@32:2 dst_port@34:2 proto@36:1 _pad@37:3; value FlowValue=48 backend_addr@0:16 backend_id@16:4 flags@20:4 last_seen_ns@24:8 policy_gen@32:4 vip_id@36:2 vip_forward@38:1 _pad@39:1 created_ns@40:8",
        ),
        (
            "EMBRYOS",
            6,
            "key FlowKey=40 src_addr@0:16 dst_addr@16:16 src_port@32:2 dst_port@34:2 proto@36:1 _pad@37:3; value FlowValue=48 backend_addr@0:16 backend_id@16:4 flags@20:4 last_seen_ns@24:8 policy_gen@32:4 vip_id@36:2 vip_forward@38:1 _pad@39:1 created_ns@40:8",
        ),
    ];

    #[test]
    fn every_pinned_map_layout_matches_its_version() {
        let current = current_layouts();
        let names: Vec<&str> = current.iter().map(|(n, _, _)| *n).collect();
        let pinned: Vec<&str> = layout::PINNED.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names, pinned,
            "layout::PINNED and this test list the same maps"
        );
        for (name, version, got) in &current {
            let Some((_, _, known)) = KNOWN_LAYOUTS
                .iter()
                .find(|(n, v, _)| n == name && v == version)
            else {
                panic!(
                    "{name} v{version} is not in KNOWN_LAYOUTS; add (\"{name}\", {version}, \"{got}\")"
                );
            };
            assert_eq!(
                known, got,
                "the layout of {name} changed but layout::{name} is still {version}: bump it, add a row for the new version (keep the old one) and a migration in the agent"
            );
        }
    }

    /// The reasons and events counted by version 1 of `REASON_STATS` and `EVENT_STATS`, in index
    /// order: later versions may only append.
    /// Index 0 was `pass_not_ipv4` until IPv6 got its own path: the same counter, renamed
    /// `pass_not_ip` when IPv6 stopped landing there.
    const REASONS_V1: &[&str] = &[
        "pass_not_ip",
        "pass_not_vip",
        "pass_malformed",
        "drop_unknown_port",
        "drop_malformed_l4",
        "drop_fragment",
        "drop_no_backend",
        "drop_no_route",
        "drop_too_big",
        "drop_encap_failed",
        "tx_icmp_frag_needed",
        "fwd_tx",
        "fwd_redirect",
        "pass_no_neigh",
        "drop_no_neigh",
        "drop_bad_length",
        "drop_icmp_no_flow",
        "drop_icmp_other",
        "fwd_icmp_frag_needed",
        "fwd_icmp_unreach",
        "tx_icmp_echo_reply",
        "drop_migrating",
    ];
    const EVENTS_V1: &[&str] = &[
        "midflow_miss",
        "flow_resteered",
        "flow_event_lost",
        "nexthop_lookup",
    ];

    #[test]
    fn counter_indexes_only_grow_at_the_end() {
        assert!(reason::NAMES.starts_with(REASONS_V1), "{:?}", reason::NAMES);
        assert!(event::NAMES.starts_with(EVENTS_V1), "{:?}", event::NAMES);
    }

    #[test]
    fn ipip_ids_number_every_cpu() {
        assert_eq!(ipip_id_cpu_bits(1), 0);
        assert_eq!(ipip_id_cpu_bits(2), 1);
        assert_eq!(ipip_id_cpu_bits(3), 2);
        assert_eq!(ipip_id_cpu_bits(64), 6);
        assert_eq!(ipip_id_cpu_bits(65), 7);
        assert_eq!(ipip_id_cpu_bits(1 << 20), 16);
    }

    #[test]
    fn ring_halves_do_not_overlap() {
        assert_eq!(ring_index(0, 0, RING_SLOTS - 1) + 1, ring_index(0, 1, 0));
        assert_eq!(ring_index(0, 1, RING_SLOTS - 1) + 1, ring_index(1, 0, 0));
        assert_eq!(
            ring_index(MAX_VIPS - 1, 1, RING_SLOTS - 1),
            RING_ENTRIES - 1
        );
    }
}
