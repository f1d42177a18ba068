//! Backends' next hops: what `bpf_fib_lookup` answered (egress interface, MACs, egress MTU), kept
//! per CPU and per backend slot for `NEXTHOP_TTL_NS`. An established flow's packet then costs one
//! inlined array lookup instead of a FIB and neighbour lookup, which `cargo xtask bench`'s profile
//! showed to be about a quarter of its time (Katran keeps the gateway MAC for the same reason).
//!
//! The cache is per CPU so entries are written without atomics and never read half-written. An
//! entry is used only for the backend address, ingress interface and source key it was resolved
//! for, while it is younger than the TTL, and for packets that fit its MTU; anything else asks the
//! FIB again (counted as `event::NEXTHOP_LOOKUP`), which then gives the frag-needed answer. A
//! missing neighbour is never cached, so the kernel's resolution is retried on every packet.
//!
//! Both families share the cache: addresses are `Addr`s, and the lookup is `AF_INET` for an
//! IPv4 (mapped) destination and `AF_INET6` otherwise. For IPv6 the kernel needs forwarding on
//! the ingress interface (`net.ipv6.conf.IF.forwarding`), which the agent sets.
//!
//! What the cache does not see, for up to the TTL: a change of route, neighbour MAC or egress
//! MTU (a *smaller* MTU only reaches packets between the new and the old size after the TTL). For
//! `l2` VIPs the FIB is asked with the client's source address and the answer is reused for other
//! clients of the same backend (source key 0), so source-based policy routing towards `l2`
//! backends is not supported (they are on the LB's own segment). One entry per backend and CPU:
//! a backend whose packets arrive on two interfaces alternately asks the FIB every time.

use crate::{maps::NEXTHOPS, stats};
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use core::{arch::asm, mem, ptr::addr_of};
use lb_common::{Addr, NEXTHOP_TTL_NS, event};
use network_types::eth::EthHdr;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where a packet to a backend leaves: this CPU's cache entry for the backend (a map value,
/// valid for the rest of the program's run), read where the frame is written: copied out into
/// a struct first, its MACs and interface took a load and a store more each, per packet.
#[derive(Clone, Copy)]
pub struct Hop(*const Entry);

impl Hop {
    /// Egress interface, host order.
    #[inline(always)]
    pub fn ifindex(&self) -> u32 {
        // SAFETY: a map value pointer from a successful lookup (see the type).
        unsafe { (*self.0).ifindex }
    }

    /// The next hop's MAC as the frame's destination, the egress interface's as its source, in
    /// four loads and four stores (16, 32, 32 and 16 bits). Copied as arrays, map value to packet
    /// (two pointers that may overlap as far as LLVM knows), they became calls to the
    /// byte-by-byte `memmove` subprogram; as 16-bit words, six loads and six stores. Inline
    /// assembly for the 32-bit words, which Rust would have to read unaligned (the BPF backend
    /// splits those into bytes): the BPF instructions have no alignment rule of their own, and
    /// under the verifier's strict check (`NET_IP_ALIGN`, as in `parse::load4`) both sides'
    /// words are aligned.
    #[inline(always)]
    pub fn write_macs(&self, eth: *mut EthHdr) {
        const _: () = {
            assert!(mem::offset_of!(Entry, dmac) % 4 == 2);
            assert!(mem::offset_of!(Entry, smac) == mem::offset_of!(Entry, dmac) + 6);
            assert!(mem::offset_of!(EthHdr, dst_addr) == 0);
            assert!(mem::offset_of!(EthHdr, src_addr) == 6);
        };
        // SAFETY: as above; callers got `eth` from `ptr_at` (its 14 bytes are in the packet).
        // Reads the entry's 12 MAC bytes and writes the header's first 12, nothing else.
        unsafe {
            asm!(
                "{t} = *(u16 *)({src} + 0)",
                "*(u16 *)({dst} + 0) = {t}",
                "{t} = *(u32 *)({src} + 2)",
                "*(u32 *)({dst} + 2) = {t}",
                "{t} = *(u32 *)({src} + 6)",
                "*(u32 *)({dst} + 6) = {t}",
                "{t} = *(u16 *)({src} + 10)",
                "*(u16 *)({dst} + 10) = {t}",
                src = in(reg) addr_of!((*self.0).dmac),
                dst = in(reg) eth,
                t = out(reg) _,
                options(nostack),
            );
        }
    }
}

pub enum Resolved {
    Hop(Hop),
    /// The route is known but the next hop has no (valid) neighbour entry yet.
    NoNeigh,
    /// The packet does not fit the egress MTU (host order).
    TooBig(u16),
    /// No route, or the FIB refused the lookup (blackhole, prohibit, forwarding off, ...).
    NoRoute,
}

/// Value of the per-CPU `NEXTHOPS` array, indexed by backend slot id.
#[repr(C)]
pub struct Entry {
    /// Backend address the entry was resolved for; `Addr::UNSPECIFIED` = never filled.
    backend_addr: Addr,
    /// The source address the entry holds for (`Addr::UNSPECIFIED` for any): the LB's address
    /// for `ipip`, so a changed `--lb-addr` or `--lb-addr6` resolves again.
    src_key: Addr,
    /// The interface the lookup ran as if the packet came in on (host order): part of the
    /// FIB's input.
    ingress_ifindex: u32,
    /// Egress interface, host order.
    ifindex: u32,
    /// CLOCK_MONOTONIC_COARSE ns from which the entry is resolved again.
    expires_ns: u64,
    /// Egress MTU, host order.
    mtu: u16,
    /// The next hop's MAC and the egress interface's, back to back as in an Ethernet header,
    /// starting 2 bytes past a 4-aligned offset (asserted in `write_macs`), like the header's own
    /// under `NET_IP_ALIGN`: copied in four loads and four stores.
    dmac: [u8; 6],
    smac: [u8; 6],
    _pad: [u8; 2],
}

/// The next hop towards `dst` (backend `backend_id`) for a packet of IP length `tot_len` (the
/// whole packet, header included, for either family) sent from `src` with protocol `proto`; an
/// entry is shared by the packets with the same `src_key` (`src`, or `Addr::UNSPECIFIED` when
/// any source may share it); `now` is `bpf_ktime_get_coarse_ns()`. `src` and `dst` are of the
/// same family.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn resolve(
    ctx: &XdpContext,
    backend_id: u32,
    src: &Addr,
    src_key: &Addr,
    dst: &Addr,
    tot_len: u16,
    proto: u8,
    now: u64,
) -> Resolved {
    let ingress = ctx.ingress_ifindex() as u32;
    if let Some(hop) = cached(ingress, backend_id, src_key, dst, tot_len, now) {
        return Resolved::Hop(hop);
    }
    let query = Query {
        src,
        src_key,
        dst,
        now,
        backend_id,
        ingress,
        tot_len,
        proto,
    };
    ask_fib(ctx, &query)
}

/// This CPU's cache entry for backend `backend_id` at `dst`, if it holds for packets that came
/// in on `ingress`, with source key `src_key`, of IP length `tot_len`, at `now` (see `resolve`);
/// `None` sends the packet to `resolve`, which asks the FIB.
#[inline(always)]
pub fn cached(
    ingress: u32,
    backend_id: u32,
    src_key: &Addr,
    dst: &Addr,
    tot_len: u16,
    now: u64,
) -> Option<Hop> {
    let e = NEXTHOPS.get_ptr_mut(backend_id)?;
    // SAFETY: per-CPU map value from a successful lookup; only this CPU writes it.
    let entry = unsafe { &*e };
    (entry.backend_addr == *dst
        && entry.ingress_ifindex == ingress
        && entry.src_key == *src_key
        && now < entry.expires_ns
        && tot_len <= entry.mtu)
        .then_some(Hop(e))
}

/// What a cache miss asks the FIB, in one place: a BPF call takes at most five arguments.
/// References: addresses copied into registers are spilled a word per 8-byte slot.
struct Query<'a> {
    src: &'a Addr,
    src_key: &'a Addr,
    dst: &'a Addr,
    now: u64,
    backend_id: u32,
    ingress: u32,
    tot_len: u16,
    proto: u8,
}

/// A cache miss: the FIB asked, its answer cached when it is a next hop. Inlined: as a BPF call
/// of its own it made `balancer::established4`'s frame larger, not smaller (its `Query` and its
/// answer then live on the caller's stack).
#[inline(always)]
fn ask_fib(ctx: &XdpContext, q: &Query) -> Resolved {
    stats::count_event(event::NEXTHOP_LOOKUP);
    let mut buf = mem::MaybeUninit::uninit();
    let (rc, params) = fib(ctx, &mut buf, q);
    // SAFETY: the kernel writes `mtu_result` (a union with the input `tot_len`) for these return
    // codes: the egress MTU.
    let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // Cannot miss (a backend's slot id is below `MAX_BACKENDS`, the array's size); a
            // next hop that cannot be kept is none.
            let Some(e) = NEXTHOPS.get_ptr_mut(q.backend_id) else {
                return Resolved::NoRoute;
            };
            // Field by field: a whole-struct write would zero `_pad` through a memset call
            // (see `balancer::flow_key`); the map created it zeroed and nothing writes it.
            // SAFETY: per-CPU map value from a successful lookup; only this CPU writes it.
            unsafe {
                (*e).backend_addr = *q.dst;
                (*e).ingress_ifindex = q.ingress;
                (*e).src_key = *q.src_key;
                (*e).ifindex = params.ifindex;
                (*e).mtu = mtu;
                (*e).dmac = params.dmac;
                (*e).smac = params.smac;
                (*e).expires_ns = q.now + NEXTHOP_TTL_NS;
            }
            Resolved::Hop(Hop(e))
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Resolved::NoNeigh,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Resolved::TooBig(mtu),
        _ => Resolved::NoRoute,
    }
}

/// A `bpf_fib_lookup` argument, 8-byte aligned so it can be zeroed a word at a time.
#[repr(C, align(8))]
struct Params(FibParams);

/// Route lookup for `q.src → q.dst` as if the packet came in on `q.ingress`; `q.tot_len` is the
/// IP length the packet will have on the wire, so the kernel checks the egress MTU. The kernel's
/// answer is left in `buf`.
#[inline(always)]
fn fib<'a>(
    ctx: &XdpContext,
    buf: &'a mut mem::MaybeUninit<Params>,
    q: &Query,
) -> (i64, &'a FibParams) {
    let (src, dst) = (q.src, q.dst);
    // Zeroed with volatile u64 stores, in place: `mem::zeroed()`, a plain loop of stores and
    // moving a zeroed struct all compiled to a call to a byte-by-byte memset subprogram (LLVM
    // recognises the idiom; the BPF backend does not inline it).
    const WORDS: usize = mem::size_of::<Params>() / 8;
    const _: () = assert!(mem::size_of::<FibParams>() == WORDS * 8);
    let words = buf.as_mut_ptr().cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: within `buf`, 8-byte aligned.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: plain C struct of integers, fully written above; all-zero is its "unset" state.
    let params = unsafe { &mut (*buf.as_mut_ptr()).0 };
    params.l4_protocol = q.proto;
    params.__bindgen_anon_1.tot_len = q.tot_len;
    params.ifindex = q.ingress;
    if dst.is_v4() {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src.v4();
        params.__bindgen_anon_4.ipv4_dst = dst.v4();
    } else {
        // Four words in network order, as `Addr` holds them.
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = src.words;
        params.__bindgen_anon_4.ipv6_dst = dst.words;
    }
    // SAFETY: params is a valid, correctly sized bpf_fib_lookup.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            params,
            mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    (rc, params)
}
