//! Data-path debug events (aya-log), per VIP and off by default: `xlb vip debug ADDR:PORT on`
//! sets the VIP's `DEBUG_VIPS` entry and every steered packet of that VIP is logged to the agent's
//! log (target `xlb_ebpf`), with no reload of the program.

use crate::{Verdict, balancer::Packet, maps::DEBUG_VIPS};
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;

/// How the packet's backend was chosen.
pub const STEER_EXISTING: u8 = 0;
pub const STEER_NEW: u8 = 1;

#[inline(always)]
pub fn enabled(vip_id: u32) -> bool {
    DEBUG_VIPS.get(vip_id).is_some_and(|on| *on != 0)
}

/// One line per steered packet. Addresses go to aya-log as numbers in host order (its `:i` hint
/// formats them as dotted quads); ports likewise.
#[inline(never)]
pub fn log_steer(ctx: &XdpContext, pkt: &Packet, backend_addr: u32, how: u8, verdict: &Verdict) {
    info!(
        ctx,
        "vip#{} {:i}:{} -> {:i}:{} proto {} backend {:i} new {} action {} reason {}",
        pkt.vip.id,
        u32::from_be(pkt.flow.src_addr.v4()),
        u16::from_be(pkt.flow.src_port),
        u32::from_be(pkt.flow.dst_addr.v4()),
        u16::from_be(pkt.flow.dst_port),
        pkt.flow.proto,
        u32::from_be(backend_addr),
        how,
        verdict.action,
        verdict.reason
    );
}
