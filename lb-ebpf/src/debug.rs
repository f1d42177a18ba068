//! Data-path debug events (aya-log), per VIP and off by default: `xlb vip debug ADDR:PORT on`
//! sets the VIP's `DEBUG_VIPS` entry and every steered packet of that VIP is logged to the agent's
//! log (target `xlb_ebpf`), with no reload of the program.

use crate::{Verdict, balancer::Packet, firewall::Policy, maps::DEBUG_VIPS};
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
use lb_common::Addr;

/// How the packet's backend was chosen.
pub const STEER_EXISTING: u8 = 0;
pub const STEER_NEW: u8 = 1;

/// Whether VIP `vip_id`'s packets are logged. Its switch in `DEBUG_VIPS` is read only while
/// the agent says some VIP has one on (`Policy::debugging`, from `POLICY`, which the packet's
/// established path reads anyway).
#[inline(always)]
pub fn enabled(policy: &Policy, vip_id: u32) -> bool {
    policy.debugging() && DEBUG_VIPS.get(vip_id).is_some_and(|on| *on != 0)
}

/// One line per steered packet. IPv4 addresses go to aya-log as numbers in host order (its `:i`
/// hint formats them as dotted quads), IPv6 ones as their 16 bytes; ports in host order.
#[inline(always)]
pub fn log_steer(ctx: &XdpContext, pkt: &Packet, backend_addr: Addr, how: u8, verdict: &Verdict) {
    if pkt.flow.dst_addr.is_v4() && backend_addr.is_v4() {
        log_steer4(ctx, pkt, backend_addr.v4(), how, verdict);
    } else {
        log_steer6(ctx, pkt, &backend_addr, how, verdict);
    }
}

/// `log_steer` of a packet with IPv6 addresses (a function of its own: its stack is the IPv6
/// path's only).
#[inline(never)]
fn log_steer6(ctx: &XdpContext, pkt: &Packet, backend_addr: &Addr, how: u8, verdict: &Verdict) {
    info!(
        ctx,
        "vip#{} [{:i}]:{} -> [{:i}]:{} proto {} backend {:i} new {} action {} reason {}",
        pkt.vip.id,
        pkt.flow.src_addr.octets(),
        u16::from_be(pkt.flow.src_port),
        pkt.flow.dst_addr.octets(),
        u16::from_be(pkt.flow.dst_port),
        pkt.flow.proto,
        backend_addr.octets(),
        how,
        verdict.action,
        verdict.reason
    );
}

#[inline(never)]
fn log_steer4(ctx: &XdpContext, pkt: &Packet, backend_addr: u32, how: u8, verdict: &Verdict) {
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
