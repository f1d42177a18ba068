//! The door: who may reach the balancer at all (the global deny list), who may reach a VIP (its
//! source allow and deny lists), and how fast new flows may come (per source and VIP, per VIP).
//!
//! Order, as the decisions are made: the deny list first (every IPv4 or IPv6 packet of the
//! interface, VIP or not, but for ICMPv6 to an address that carries no VIP: neighbour discovery
//! is never cut), then the VIP's deny list, then its allow list; the limits only for packets
//! that would create a flow. Packets of existing flows are never limited.
//!
//! The deny list holds prefixes of both families (IPv6 ones in `DENY6_n`), and so do the VIPs'
//! source lists (an IPv6 VIP's in `VIP_ALLOW6`/`VIP_DENY6`; the agent keeps a VIP's lists to its
//! own family, whose clients alone reach it). The new-flow limits key on the 16-byte source and
//! serve both families.
//!
//! An LPM lookup costs tens of nanoseconds, more than an established packet's whole budget, so a
//! flow remembers the policy generation its checks passed under (`FlowValue::policy_gen`): while
//! it equals `PolicyState::generation` (`POLICY`), the flow's packets skip the source checks (and
//! the VIP and backend checks: see `balancer::established_entry`). The agent bumps the generation
//! after every change of the deny list, of a VIP's lists, of a VIP or of a backend slot (a removed
//! VIP's slots are cleared after its bump: no flow can be stamped for it then), so every flow is
//! checked once more against the new policy on its next packet.

use crate::{
    maps::{
        DENY_HOST_NETS0, DENY_HOST_NETS1, DENY_HOSTS0, DENY_HOSTS1, DENY0, DENY1, DENY6_0, DENY6_1,
        POLICY, SRC_BUCKETS, VIP_ALLOW, VIP_ALLOW6, VIP_BUCKETS, VIP_DENY, VIP_DENY6, VIP_LIMITS,
    },
    stats,
};
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use core::{
    arch::asm,
    ptr::{addr_of, read_volatile},
};
use lb_common::{
    Addr, Deny6Data, POLICY_F_DEBUG, POLICY_F_DENY_HOSTS, POLICY_F_DENY_LIST, POLICY_F_DENY6,
    SrcBucketKey, VIP_F_ALLOW, VIP_F_DENY, VIP_F_LIST_HALF, VIP_F_SRC_LIMIT, VIP_F_VIP_LIMIT,
    VipMeta, VipSrc6Data, deny_host_net_bit, event, reason, vip_list_tag, vip_src_data,
};

/// Compare-and-swap attempts on a bucket before a flow counts as limited (other CPUs kept
/// changing it): bounded, as the verifier needs.
const CAS_ATTEMPTS: usize = 4;

/// What the data path reads of `POLICY` for its source checks.
#[derive(Clone, Copy)]
pub struct Policy {
    /// `PolicyState::generation`.
    pub generation: u32,
    deny_live: u32,
    flags: u32,
}

impl Policy {
    /// Some VIP has debug events on (`POLICY_F_DEBUG`).
    #[inline(always)]
    pub fn debugging(&self) -> bool {
        self.flags & POLICY_F_DEBUG != 0
    }

    /// This policy for the rest of one packet's checks, once its deny list was looked into.
    #[inline(always)]
    fn deny_list_checked(self) -> Policy {
        Policy {
            flags: self.flags & !(POLICY_F_DENY_HOSTS | POLICY_F_DENY_LIST | POLICY_F_DENY6),
            ..self
        }
    }
}

/// The deny list alone, for a packet of `vip` from `src`, before its flow is looked up: the
/// policy for the packet's other checks, which need not look at the deny list again, or the drop
/// reason, already counted for the VIP.
#[inline(always)]
pub fn check_deny_list(src: Addr, vip: &VipMeta, policy: &Policy) -> Result<Policy, u32> {
    if src_deny_listed(&src, policy) {
        stats::count_vip_drop(vip.id, reason::DROP_DENY_LIST);
        return Err(reason::DROP_DENY_LIST);
    }
    Ok(policy.deny_list_checked())
}

/// The current policy (one array lookup). The agent's update of the entry is not atomic: a
/// packet may read a switch of the deny list half-written (the new generation, the old half) and
/// stamp its flow after checking the old list, which is why the agent bumps the generation once
/// more after such a switch (`policy_writes` in the agent's `dataplane/firewall.rs`). That
/// second bump covers the packet only if the generation is read *before* the half and the flags
/// (a packet that sees the bump's generation then sees what came before it: x86 keeps loads in
/// order; arm64 would need a load-acquire, which BPF v1 code cannot express): volatile reads, so
/// the compiler keeps this order.
#[inline(always)]
pub fn policy() -> Policy {
    match POLICY.get_ptr(0) {
        // SAFETY: a map value from a successful lookup; plain loads of its words, in this order.
        Some(p) => unsafe {
            let generation = read_volatile(addr_of!((*p).generation));
            let deny_live = read_volatile(addr_of!((*p).deny_live));
            let flags = read_volatile(addr_of!((*p).flags));
            Policy {
                generation,
                deny_live,
                flags,
            }
        },
        None => Policy {
            generation: 0,
            deny_live: 0,
            flags: 0,
        },
    }
}

/// `src`, of either family, is on the live deny list.
#[inline(always)]
pub fn src_deny_listed(src: &Addr, policy: &Policy) -> bool {
    if src.is_v4() {
        deny_listed(src.v4(), policy)
    } else {
        deny_listed6(src, policy)
    }
}

/// `src` (an IPv6 address, as the packet has it) is in the live half's IPv6 trie, which is
/// skipped while it is empty.
#[inline(always)]
pub fn deny_listed6(src: &Addr, policy: &Policy) -> bool {
    if policy.flags & POLICY_F_DENY6 == 0 {
        return false;
    }
    // The prefix length, then the address's words, which are its wire bytes in memory order
    // (`Addr`): five word stores, where `Key::new(128, src.octets())` would store byte by byte.
    let [a, b, c, d] = src.words;
    // SAFETY: `Key<[u8; 16]>` is `repr(C, packed)`: a `u32` prefix length (native order, as the
    // kernel reads it) and 16 bytes, 20 bytes of integers (transmute checks the size).
    let key = unsafe { core::mem::transmute::<[u32; 5], Key<Deny6Data>>([128, a, b, c, d]) };
    if policy.deny_live == 0 {
        DENY6_0.get(&key).is_some()
    } else {
        DENY6_1.get(&key).is_some()
    }
}

/// `src` (network order) is on the live deny list: its host entries first (the /24 bitmap, then
/// one hash lookup only if the source's /24 holds a listed host), then its shorter prefixes (the
/// trie). Each is skipped while it is empty, so an empty list is free and a list of host
/// entries never walks the trie.
#[inline(always)]
pub fn deny_listed(src: u32, policy: &Policy) -> bool {
    if policy.flags & POLICY_F_DENY_HOSTS != 0 && host_listed(src, policy.deny_live) {
        return true;
    }
    if policy.flags & POLICY_F_DENY_LIST == 0 {
        return false;
    }
    let key = Key::new(32, src.to_ne_bytes());
    if policy.deny_live == 0 {
        DENY0.get(&key).is_some()
    } else {
        DENY1.get(&key).is_some()
    }
}

/// `src` (network order) is one of half `live`'s host entries. The agent sets a /24's bit before
/// it inserts the /24's first host and clears it only after removing its last, so a clear bit
/// proves the hash has no entry for `src` and the hash lookup is skipped.
#[inline(always)]
fn host_listed(src: u32, live: u32) -> bool {
    let (word, bit) = deny_host_net_bit(u32::from_be(src));
    let nets = if live == 0 {
        DENY_HOST_NETS0.get(word)
    } else {
        DENY_HOST_NETS1.get(word)
    };
    // A missing word cannot happen (the index is below 2^18, the array's size); looking into
    // the hash then is the safe side.
    if let Some(w) = nets
        && *w & (1 << bit) == 0
    {
        return false;
    }
    if live == 0 {
        DENY_HOSTS0.get_ptr(src).is_some()
    } else {
        DENY_HOSTS1.get_ptr(src).is_some()
    }
}

/// The source checks of a packet from `src` for `vip`: the deny list, the VIP's deny list (any
/// match drops, whatever the allow list says), the VIP's allow list. `Err` holds the drop
/// reason, already counted for the VIP.
#[inline(always)]
pub fn check_source(src: Addr, vip: &VipMeta, policy: &Policy) -> Result<(), u32> {
    let verdict = source_verdict(src, vip, policy);
    if let Err(why) = verdict {
        stats::count_vip_drop(vip.id, why);
    }
    verdict
}

#[inline(always)]
fn source_verdict(src: Addr, vip: &VipMeta, policy: &Policy) -> Result<(), u32> {
    if !src.is_v4() {
        return source_verdict6(&src, vip, policy);
    }
    let src = src.v4();
    if deny_listed(src, policy) {
        return Err(reason::DROP_DENY_LIST);
    }
    if vip.flags & (VIP_F_ALLOW | VIP_F_DENY) == 0 {
        return Ok(());
    }
    let half = u32::from(vip.flags & VIP_F_LIST_HALF != 0);
    let key = Key::new(
        64,
        vip_src_data(vip_list_tag(vip.id, half), src.to_ne_bytes()),
    );
    if vip.flags & VIP_F_DENY != 0 && VIP_DENY.get(&key).is_some() {
        return Err(reason::DROP_SRC_DENIED);
    }
    if vip.flags & VIP_F_ALLOW != 0 && VIP_ALLOW.get(&key).is_none() {
        return Err(reason::DROP_SRC_NOT_ALLOWED);
    }
    Ok(())
}

/// `source_verdict` for an IPv6 source: the deny list's IPv6 trie, then the VIP's IPv6 lists.
#[inline(always)]
fn source_verdict6(src: &Addr, vip: &VipMeta, policy: &Policy) -> Result<(), u32> {
    if deny_listed6(src, policy) {
        return Err(reason::DROP_DENY_LIST);
    }
    if vip.flags & (VIP_F_ALLOW | VIP_F_DENY) == 0 {
        return Ok(());
    }
    let half = u32::from(vip.flags & VIP_F_LIST_HALF != 0);
    // The prefix length, the tag's bytes (big-endian, as `vip_src6_data` writes them) read as a
    // native word, then the address's words (its wire bytes in memory order): six word stores.
    let tag = u32::from_ne_bytes(vip_list_tag(vip.id, half).to_be_bytes());
    let [a, b, c, d] = src.words;
    // SAFETY: `Key<VipSrc6Data>` is `repr(C, packed)`: a `u32` prefix length and 20 bytes, 24
    // bytes of integers (transmute checks the size).
    let key =
        unsafe { core::mem::transmute::<[u32; 6], Key<VipSrc6Data>>([32 + 128, tag, a, b, c, d]) };
    if vip.flags & VIP_F_DENY != 0 && VIP_DENY6.get(&key).is_some() {
        return Err(reason::DROP_SRC_DENIED);
    }
    if vip.flags & VIP_F_ALLOW != 0 && VIP_ALLOW6.get(&key).is_none() {
        return Err(reason::DROP_SRC_NOT_ALLOWED);
    }
    Ok(())
}

/// The new-flow limits of `vip` for a flow from `src` (either family): its source's bucket
/// first (an abusive source is stopped before it spends the VIP's budget), then the VIP's.
/// `Err` holds the drop reason, already counted for the VIP.
#[inline(always)]
pub fn admit_new_flow(src: Addr, vip: &VipMeta) -> Result<(), u32> {
    let verdict = limits_verdict(src, vip);
    if let Err(why) = verdict {
        stats::count_vip_drop(vip.id, why);
    }
    verdict
}

#[inline(always)]
fn limits_verdict(src: Addr, vip: &VipMeta) -> Result<(), u32> {
    if vip.flags & (VIP_F_SRC_LIMIT | VIP_F_VIP_LIMIT) == 0 {
        return Ok(());
    }
    let Some(limits) = VIP_LIMITS.get(vip.id) else {
        return Ok(());
    };
    // The precise clock: at a tick-resolution clock, a limit above one flow per tick could only
    // be granted a burst per tick.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if vip.flags & VIP_F_SRC_LIMIT != 0 {
        let key = SrcBucketKey {
            src_addr: src,
            vip_id: vip.id,
        };
        let bucket = match SRC_BUCKETS.get_ptr_mut(key) {
            Some(b) => Some(b),
            None => {
                // A fresh bucket is full (time 0 is long past). Another CPU may create it at the
                // same moment: NOEXIST keeps the first, and both take tokens from it.
                let _ = SRC_BUCKETS.insert(key, 0, u64::from(BPF_NOEXIST));
                SRC_BUCKETS.get_ptr_mut(key)
            }
        };
        // Without a bucket (the insert failed) the source is not limited: the VIP's limit
        // still holds.
        if let Some(bucket) = bucket
            && !take_token(bucket, now, limits.src_interval_ns, limits.src_tolerance_ns)
        {
            return Err(reason::DROP_RATE_LIMITED_SRC);
        }
    }
    if vip.flags & VIP_F_VIP_LIMIT != 0
        && let Some(bucket) = VIP_BUCKETS.get_ptr_mut(vip.id)
        && !take_token(bucket, now, limits.vip_interval_ns, limits.vip_tolerance_ns)
    {
        return Err(reason::DROP_RATE_LIMITED_VIP);
    }
    Ok(())
}

/// One flow's worth from the GCRA bucket at `bucket` (a theoretical arrival time, ns): admitted
/// while the time advanced by `interval` stays within `tolerance` of `now`. Shared by every CPU,
/// so the new time is written with compare-and-swap: of N CPUs taking tokens at once, each
/// admission is counted exactly once, and a burst of B flows admits exactly B.
#[inline(always)]
fn take_token(bucket: *mut u64, now: u64, interval: u64, tolerance: u64) -> bool {
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: a map value, 8-byte aligned, live for the program's run; read once.
        let tat = unsafe { core::ptr::read_volatile(bucket) };
        let next = tat.max(now).saturating_add(interval);
        if next - now > tolerance {
            return false;
        }
        // SAFETY: as above.
        if unsafe { compare_exchange(bucket, tat, next) } == tat {
            return true;
        }
    }
    stats::count_event(event::RATE_LIMIT_CONTENDED);
    false
}

/// Atomic 64-bit compare-and-swap (`BPF_ATOMIC | BPF_CMPXCHG | BPF_DW`, kernel ≥ 5.12): store
/// `new` at `ptr` if it holds `expected`; returns what it held. Inline assembly for the reasons
/// given at `balancer::fetch_add`; the instruction compares with and returns in r0.
///
/// # Safety
/// `ptr` must be a valid, 8-byte aligned map value.
#[inline(always)]
unsafe fn compare_exchange(ptr: *mut u64, expected: u64, new: u64) -> u64 {
    let mut old = expected;
    // SAFETY: guaranteed by the caller; the instruction reads and writes only `*ptr` and r0.
    unsafe {
        asm!(
            "r0 = cmpxchg_64({ptr} + 0, r0, {new})",
            ptr = in(reg) ptr,
            new = in(reg) new,
            inout("r0") old,
            options(nostack),
        );
    }
    old
}
