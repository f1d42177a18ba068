//! Per-CPU counters: no atomics, no cache-line sharing between CPUs; the agent sums them.

use crate::maps::{BACKEND_STATS, DECAP_STATS, EVENT_STATS, REASON_STATS, VIP_DROPS, VIP_STATS};
use aya_ebpf::maps::PerCpuArray;
use lb_common::{TrafficCounters, reason};

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count_reason(reason: u32) {
    bump(&REASON_STATS, reason);
}

#[inline(always)]
pub fn count_event(event: u32) {
    bump(&EVENT_STATS, event);
}

#[inline(always)]
pub fn count_decap(reason: u32) {
    bump(&DECAP_STATS, reason);
}

#[inline(always)]
fn add_traffic(map: &PerCpuArray<TrafficCounters>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
fn add_new_flow(map: &PerCpuArray<TrafficCounters>, index: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, as above.
        unsafe { (*c).new_flows += 1 };
    }
}

/// A packet of `bytes` (the frame as received) forwarded for `vip_id` to `backend_id`.
#[inline(always)]
pub fn count_forwarded(vip_id: u32, backend_id: u32, bytes: u64) {
    add_traffic(&VIP_STATS, vip_id, bytes);
    add_traffic(&BACKEND_STATS, backend_id, bytes);
}

#[inline(always)]
pub fn count_new_flow(vip_id: u32, backend_id: u32) {
    add_new_flow(&VIP_STATS, vip_id);
    add_new_flow(&BACKEND_STATS, backend_id);
}

/// A packet of VIP `vip_id` dropped for `reason` by its source checks or new-flow limits (the
/// reason itself is counted by the entry point, as for every packet).
#[inline(always)]
pub fn count_vip_drop(vip_id: u32, why: u32) {
    if let Some(d) = VIP_DROPS.get_ptr_mut(vip_id) {
        // SAFETY: per-CPU slot, as above.
        unsafe {
            match why {
                reason::DROP_DENY_LIST => (*d).deny_list += 1,
                reason::DROP_SRC_DENIED => (*d).src_denied += 1,
                reason::DROP_SRC_NOT_ALLOWED => (*d).src_not_allowed += 1,
                reason::DROP_RATE_LIMITED_SRC => (*d).rate_limited_src += 1,
                reason::DROP_RATE_LIMITED_VIP => (*d).rate_limited_vip += 1,
                _ => {}
            }
        }
    }
}
