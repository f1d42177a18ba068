//! xlb's XDP programs. One object, three entry points:
//! - `xlb_balancer` (the load balancer, `balancer.rs`);
//! - `xlb_decap` (IPIP decapsulation on backends, `decap.rs`);
//! - `xlb_pass` (returns `XDP_PASS`; attached on veth peers so native-mode `XDP_TX` onto them works).
#![no_std]
#![no_main]
// Inline assembly for the shared round-robin counter's fetch-and-add (see balancer.rs).
#![feature(asm_experimental_arch)]

mod balancer;
mod csum;
mod debug;
mod decap;
mod forward;
mod icmp;
mod maps;
mod nexthop;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// What a program does with a packet, and the counter that says why.
pub struct Verdict {
    pub action: u32,
    pub reason: u32,
}

impl Verdict {
    pub const fn pass(reason: u32) -> Self {
        Self {
            action: xdp_action::XDP_PASS,
            reason,
        }
    }
    pub const fn drop(reason: u32) -> Self {
        Self {
            action: xdp_action::XDP_DROP,
            reason,
        }
    }
    pub const fn tx(reason: u32) -> Self {
        Self {
            action: xdp_action::XDP_TX,
            reason,
        }
    }
}

#[xdp]
pub fn xlb_balancer(ctx: XdpContext) -> u32 {
    let verdict = balancer::try_balance(&ctx);
    stats::count_reason(verdict.reason);
    verdict.action
}

#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    let verdict = decap::try_decap(&ctx);
    stats::count_decap(verdict.reason);
    verdict.action
}

#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark floor (`cargo xtask bench`): the cheapest program that forwards.
#[xdp]
pub fn xlb_floor_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// Benchmark floor: what any L4 balancer must at least do, parse up to the ports, then forward.
#[xdp]
pub fn xlb_floor_parse_tx(ctx: XdpContext) -> u32 {
    if parse::tcp_ports(&ctx).is_some() {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_PASS
    }
}

/// Benchmark packet generator (see `lb_common::programs::BENCH_GEN`). Not a floor: it is run in
/// live-frames mode on a *sending* interface, to offer the balancer more packets per second than
/// a userspace generator can on these machines.
#[xdp]
pub fn xlb_bench_gen(ctx: XdpContext) -> u32 {
    match parse::udp_src_port(&ctx) {
        Some(port) => {
            let n = maps::BENCH_GEN.get_ptr_mut(0).map_or(0, |c| {
                // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
                unsafe {
                    *c += 1;
                    *c
                }
            });
            let p = lb_common::BENCH_GEN_FIRST_PORT
                + (n % u64::from(lb_common::BENCH_GEN_FLOWS)) as u16;
            // SAFETY: `udp_src_port` bounds-checked these two bytes. The UDP checksum stays as
            // the frame had it, so generator frames must carry 0 (no checksum, valid in IPv4).
            unsafe { *port = p.to_be_bytes() };
            xdp_action::XDP_TX
        }
        None => xdp_action::XDP_ABORTED,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never called at run time.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
