//! xlb's XDP programs. One object, with these entry points:
//! - `xlb_balancer` (the load balancer, `balancer.rs`);
//! - `xlb_decap` (IPIP decapsulation on backends, `decap.rs`);
//! - `xlb_pass` (returns `XDP_PASS`; attached on veth peers so native-mode `XDP_TX` onto them works);
//! - the benchmark programs of `cargo xtask bench` (`bench.rs`): floors, generator, sink.
#![no_std]
#![no_main]
// Inline assembly for the shared round-robin counter's fetch-and-add (see balancer.rs) and the
// new-flow limits' compare-and-swap (firewall.rs).
#![feature(asm_experimental_arch)]

mod balancer;
mod bench;
mod csum;
mod debug;
mod decap;
mod firewall;
mod forward;
mod icmp;
mod icmp6;
mod ipv6;
mod maps;
mod nexthop;
mod parse;
mod stats;
mod vip_icmp;
mod vip_icmp6;

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never called at run time.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
