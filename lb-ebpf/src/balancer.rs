//! The balancer's decisions: is this packet for a VIP, which flow is it, which backend gets it.
//! Forwarding itself is in `forward.rs`.

use crate::{
    Verdict, debug,
    firewall::{self, Policy},
    forward, ipv6,
    maps::{
        BACKENDS, CONFIG, EMBRYOS, FLOW_EVENTS, FLOWS, RINGS, RR_COUNTERS, STEERED, VIP_ADDRS, VIPS,
    },
    nexthop,
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP_DF, IP_MF, IP_OFFSET_MASK, IPV4_HLEN, IPV6_HLEN,
        frame_len, ipv4_addrs, ipv4_frags, ipv4_tot_len, load4, ptr_at,
    },
    stats, vip_icmp, vip_icmp6,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns, maps::LruHashMap, programs::XdpContext,
};
use core::{arch::asm, mem::MaybeUninit, ptr::addr_of_mut};
use lb_common::{
    Addr, BACKEND_F_ACTIVE, CONFIG_F_FLOW_EVENTS, CONFIG_F_HOLD_MIDFLOW, CONFIG_F_MIGRATING,
    FLOW_F_HELD, FORWARD_L2, FlowEvent, FlowKey, FlowStamp, FlowValue, IPPROTO_ICMP, IPPROTO_IPV6,
    IPPROTO_TCP, IPPROTO_UDP, MIDFLOW_HOLD_NS, RING_SLOTS, TOUCH_NS, VIP_F_ONE_BACKEND, VipKey,
    VipMeta, event, reason, ring_index,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// TCP header flag bit (byte 13).
const TCP_SYN: u8 = 0x02;
/// Minimal TCP and UDP header lengths.
const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

/// What `classify` learned about a packet for a configured VIP, copied out of the packet so it
/// stays valid after the headers move. The same for both families: the flow key's addresses say
/// which (IPv4 ones are IPv4-mapped).
#[derive(Clone, Copy)]
pub struct Packet {
    pub vip: VipMeta,
    pub flow: FlowKey,
    /// Length of the whole IP packet, host order: IPv4's total length; for IPv6, 40 + the
    /// payload length.
    pub ip_len: u16,
    /// IPv4 TOS, IPv6 traffic class.
    pub tos: u8,
    /// The sender set Don't Fragment; always for IPv6, where nothing on the way fragments.
    pub df: bool,
    /// Frame length as received (what the byte counters count).
    pub frame_len: u64,
    /// TCP without SYN: a packet from the middle of a connection.
    pub midflow: bool,
    /// An ICMP error about the flow (`vip_icmp.rs`), not a packet of it: never answered with
    /// another ICMP error (RFC 1122 §3.2.2).
    pub icmp_error: bool,
}

/// What the decision stage hands the forwarding stage: the packet, its backend, and how the
/// backend was found.
pub struct Steered {
    pub pkt: Packet,
    pub backend: forward::Backend,
    /// `bpf_ktime_get_coarse_ns()` when the packet was steered.
    pub now: u64,
    /// For an ICMP error about a flow (`vip_icmp.rs`, `vip_icmp6.rs`): the reason it counts as
    /// once forwarded (`FWD_ICMP_*`); 0 for a packet of the flow itself.
    pub icmp_reason: u32,
    /// `debug::STEER_*`.
    pub how: u8,
}

/// The balancer, in two stages called one after the other from the entry point: deciding (per
/// family: parse, VIP, flow tables, door) and forwarding (either family). Each is a BPF call
/// whose frame is on the stack only while it runs: the verifier allows 512 bytes for all the
/// frames of a call chain, and the deciding and the forwarding do not fit in one frame together
/// with IPv6 as well as IPv4. What the decision found waits in this CPU's `STEERED` slot, not
/// on the stack, which leaves each stage nearly all of the 512 bytes. An established IPv4
/// flow's packet is the exception: `established4` serves it whole from its own frame, before
/// the slot is looked up.
#[inline(always)]
pub fn try_balance(ctx: &XdpContext) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::pass(reason::PASS_MALFORMED);
    };
    // SAFETY: `ptr_at` checked the bounds.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let probe = if ether_type == ETH_P_IP {
        match established4(ctx).decode() {
            Ok(verdict) => return verdict,
            Err(Unserved::TooBig(df, room)) => {
                // Its packet is IPv4 and no ICMP error: answered if it has DF.
                return forward::too_big(ctx, df, true, room);
            }
            Err(Unserved::Probe(probe)) => probe,
        }
    } else {
        Probe::NOT_LOOKED
    };
    let Some(slot) = STEERED.get_ptr_mut(0) else {
        // Cannot happen (index 0 of a one-entry array).
        return Verdict::pass(reason::PASS_MALFORMED);
    };
    // SAFETY: this CPU's slot, which only this run of the program uses (a map value: zeroed at
    // creation, any bit pattern valid). What a stage read is what it or an earlier stage of this
    // packet wrote: `Ok` from a decision means `pkt`, `backend`, `now`, `how` and `icmp_reason`
    // are this packet's.
    let steered = unsafe { &mut *slot };
    let decided = match ether_type {
        // IPv4 decides and forwards in one stage: one BPF call per packet fewer.
        ETH_P_IP => balance4(ctx, steered, probe),
        ETH_P_IPV6 => {
            // An established flow's packet in one hash lookup; the rest decided in full (a
            // served packet skips that stage's call altogether).
            match ipv6::established(ctx, steered).decode() {
                // Forwarded and counted on `l2_exit` or `ipip_exit`.
                Ok(verdict) => return verdict,
                Err(Unserved::Probe(Probe::SERVED)) => Ok(None),
                // Not produced for IPv6 (a packet too big for the cached MTU goes on to
                // `forward`, which answers it); handled as `established4`'s, not assumed away.
                Err(Unserved::TooBig(df, room)) => return forward::too_big(ctx, df, false, room),
                Err(Unserved::Probe(probe)) => match ipv6::decide(ctx, steered, probe) {
                    // ICMPv6 to a VIP address is a stage of its own, for the same reason.
                    Ok(Some(icmp6)) => vip_icmp6::handle(ctx, icmp6, steered).map(|()| None),
                    other => other.map(|_| None),
                },
            }
        }
        _ => Err(Verdict::pass(reason::PASS_NOT_IP)),
    };
    let forwarded = match decided {
        Ok(Some(verdict)) => verdict,
        Ok(None) => {
            let s = &*steered;
            forward::forward(ctx, &s.pkt, &s.backend, s.now)
        }
        Err(verdict) => return verdict,
    };
    let (s, verdict) = (&*steered, forwarded);
    if s.icmp_reason != 0 {
        // An error about a flow is not the VIP's or the backend's traffic, and not debugged.
        return if forward::is_forwarded(&verdict) {
            Verdict {
                action: verdict.action,
                reason: s.icmp_reason,
            }
        } else {
            verdict
        };
    }
    account(ctx, &s.pkt, &s.backend, s.how, verdict)
}

/// A flow's packet went through forwarding with `verdict`: counted for its VIP and backend if
/// it left towards the backend, and logged if its VIP is debugged.
#[inline(always)]
fn account(
    ctx: &XdpContext,
    pkt: &Packet,
    backend: &forward::Backend,
    how: u8,
    verdict: Verdict,
) -> Verdict {
    if forward::is_forwarded(&verdict) {
        stats::count_forwarded(pkt.vip.id, backend.id, pkt.frame_len);
    }
    if debug::enabled(&firewall::policy(), pkt.vip.id) {
        debug::log_steer(ctx, pkt, backend.addr, how, &verdict);
    }
    verdict
}

/// Both stages for an IPv4 frame that `established4` did not serve (`probe`: what it found):
/// `Ok` with the forwarding's verdict when `out` holds the packet that was forwarded, `Err`
/// with the decision's.
#[inline(never)]
fn balance4(ctx: &XdpContext, out: &mut Steered, probe: u32) -> Result<Option<Verdict>, Verdict> {
    // Read before `VIPS`: the agent writes a VIP, then bumps the generation. A flow stamped
    // with the generation read here therefore caches a VIP read after it, never an older one.
    let policy = firewall::policy();
    classify(ctx, out)?;
    if out.icmp_reason == 0 {
        select(out, policy, probe)?;
    }
    Ok(Some(forward::forward_inline(
        ctx,
        &out.pkt,
        &out.backend,
        out.now,
    )))
}

/// What `established4` or `ipv6::established` did with a packet, and if it did not serve it,
/// what it learned of its flow, so that `select` never looks twice.
pub struct Probe;

impl Probe {
    /// Not looked up.
    pub const NOT_LOOKED: u32 = 0;
    /// No entry in `FLOWS`.
    pub const MISSED: u32 = 1;
    /// An entry not served from its stamp: the stamp outdated, the packet's lengths wrong, or
    /// its VIP debugged (`select` looks it up again).
    pub const FOUND: u32 = 2;
    /// Served (`ipv6::established`): `out` holds the packet and its backend.
    pub const SERVED: u32 = 3;
}

/// The packet of an established IPv4 flow, in one hash lookup, served whole: TCP without SYN
/// or UDP, not a fragment, lengths as `classify` requires them, an entry in `FLOWS` whose stamp
/// is the current policy generation (so its source checks, the VIP it caches and its backend
/// hold), and whose VIP is not debugged. Then it is forwarded and counted as `try_balance` does
/// after `select`, with the VIP's id and forwarding method from the entry (neither `VIPS` nor
/// `BACKENDS` is read), all from this function's frame: `Ok` with the verdict. Anything else
/// goes to `classify` and `select` (`Err`: what was found in `FLOWS`), which own every rule
/// about it (a SYN first through the deny list): what this function does not recognise, it
/// does not judge. A BPF call of its own, so its frame and `balance4`'s are never on the stack
/// together.
#[inline(never)]
fn established4(ctx: &XdpContext) -> Outcome {
    Outcome::encode(serve_established4(ctx))
}

/// `established4`'s work, inlined into it.
#[inline(always)]
fn serve_established4(ctx: &XdpContext) -> Result<Verdict, Unserved> {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Err(Unserved::Probe(Probe::NOT_LOOKED));
    };
    // SAFETY: `ptr_at` checked the bounds.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let frags = ipv4_frags(ip);
    if ip.vihl >> 4 != 4 || ihl < IPV4_HLEN || frags & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Err(Unserved::Probe(Probe::NOT_LOOKED));
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Err(Unserved::Probe(Probe::NOT_LOOKED));
    }
    let Some(L4 {
        ports,
        midflow,
        len: l4_len,
    }) = l4_header(ctx, ip.proto, ETH_HLEN + ihl)
    else {
        return Err(Unserved::Probe(Probe::NOT_LOOKED));
    };
    if ip.proto == IPPROTO_TCP && !midflow {
        return Err(Unserved::Probe(Probe::NOT_LOOKED));
    }
    let ip_len = ipv4_tot_len(ip);
    let frame_len = frame_len(ctx);
    // The packet is built in place around its flow key, which the lookup reads: built whole
    // first, its VIP zeroed before the lookup fills it became a call to the byte-by-byte
    // `memset` subprogram (20 bytes; see `flow_key`), a copy of the key after the lookup ten
    // more loads and stores.
    let mut slot = MaybeUninit::<Packet>::uninit();
    let p = slot.as_mut_ptr();
    let (src, dst) = ipv4_addrs(ip);
    // SAFETY: a field of `slot`, written before it is read.
    unsafe {
        addr_of_mut!((*p).flow).write(flow_key(
            Addr::from_v4(src),
            Addr::from_v4(dst),
            ports,
            ip.proto,
        ))
    };
    // SAFETY: written just above.
    let flow = unsafe { &(*p).flow };
    let hit = established_entry(flow, lengths_agree(ip_len, ihl + l4_len, frame_len))
        .map_err(Unserved::Probe)?;
    if debug::enabled(&hit.policy, hit.vip.id) {
        // A debugged VIP's packet goes the long way, which serves it from the same entry
        // (`select` finds it current) and logs it from `try_balance`: a log call from this frame
        // would add its own to it, past the verifier's 512 bytes.
        return Err(Unserved::Probe(Probe::FOUND));
    }
    // The common cases leave from here (`l2_exit`, `ipip_exit`); anything else takes the
    // general way below, which resolves, answers and trims.
    if let Some(verdict) = l2_exit(ctx, &hit, ip_len, frame_len) {
        return Ok(verdict);
    }
    let inner = forward::Inner {
        ip_len,
        tos: ip.tos,
        df: frags & IP_DF != 0,
    };
    if let Some(verdict) = ipip_exit::<false>(ctx, &hit, inner, frame_len) {
        return Ok(verdict);
    }
    // SAFETY: every other field of `slot` written, then the whole read (its padding is never
    // read).
    let pkt = unsafe {
        addr_of_mut!((*p).vip).write(hit.vip);
        addr_of_mut!((*p).ip_len).write(ip_len);
        addr_of_mut!((*p).tos).write(ip.tos);
        addr_of_mut!((*p).df).write(frags & IP_DF != 0);
        addr_of_mut!((*p).frame_len).write(frame_len as u64);
        addr_of_mut!((*p).midflow).write(midflow);
        addr_of_mut!((*p).icmp_error).write(false);
        slot.assume_init_ref()
    };
    let verdict = forward::forward_or_too_big(ctx, pkt, &hit.backend, hit.now)
        .map_err(|t| Unserved::TooBig(pkt.df, t.room()))?;
    if forward::is_forwarded(&verdict) {
        stats::count_forwarded(pkt.vip.id, hit.backend.id, pkt.frame_len);
    }
    Ok(verdict)
}

/// An established packet of an `l2` VIP whose next hop this CPU has cached needs new MACs and
/// nothing else: forwarded and counted here, from `established4` or `serve_established`, so
/// none of the `Packet` the general forwarding reads is assembled (a dozen stores to the stack,
/// and the spills around them). `None`: another method, a next hop not cached, or a packet too
/// big for the cached MTU (the general way resolves and answers those).
#[inline(always)]
fn l2_exit(ctx: &XdpContext, hit: &Established, ip_len: u16, frame_len: usize) -> Option<Verdict> {
    if hit.vip.forward != FORWARD_L2 {
        return None;
    }
    // Read once for the cache check and the choice of `XDP_TX`: three dependent loads each.
    let ingress = ctx.ingress_ifindex() as u32;
    let hop = nexthop::cached(
        ingress,
        hit.backend.id,
        &Addr::UNSPECIFIED,
        &hit.backend.addr,
        ip_len,
        hit.now,
    )?;
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // An `l2` backend has the packet's family (the agent installs nothing else): the EtherType
    // stays.
    hop.write_macs(eth);
    let verdict = forward::egress(ingress, hop.ifindex());
    if forward::is_forwarded(&verdict) {
        stats::count_forwarded(hit.vip.id, hit.backend.id, frame_len as u64);
    }
    Some(verdict)
}

/// An established packet of an `ipip` VIP whose outer next hop this CPU has cached, in a frame
/// without Ethernet padding: encapsulated (by the general way's `forward::encap4` or
/// `forward::encap6`), forwarded and counted here, as `l2_exit` serves an `l2` one, so no
/// `Packet` is assembled and the general forwarding's checks for other cases are not run. `V6`:
/// an IPv6 packet to an IPv6 backend (IPv6 in IPv6, from `serve_established`); otherwise an IPv4
/// packet to an IPv4 backend (from `established4`). `None`, nothing changed: another method, a
/// backend of the other family (for an IPv4 packet, IPv4 in IPv6, whose cache entry's source
/// key would not match either; an IPv6 VIP has only IPv6 backends, the agent refuses others),
/// padding to trim, no LB address of the backend's family, or a next hop not cached or too
/// small for the outer packet (the general way resolves, answers and drops those). Once the
/// frame is changed, a failure is a drop, as on the general way.
#[inline(always)]
fn ipip_exit<const V6: bool>(
    ctx: &XdpContext,
    hit: &Established,
    inner: forward::Inner,
    frame_len: usize,
) -> Option<Verdict> {
    if hit.vip.forward == FORWARD_L2
        || hit.backend.addr.is_v4() == V6
        || frame_len != ETH_HLEN + usize::from(inner.ip_len)
    {
        return None;
    }
    let cfg = CONFIG.get(0)?;
    let ingress = ctx.ingress_ifindex() as u32;
    let (ifindex, written) = if V6 {
        let lb = &cfg.lb_addr6;
        if lb.is_unspecified() {
            return None;
        }
        let outer_len = inner.ip_len.checked_add(IPV6_HLEN as u16)?;
        let hop = nexthop::cached(
            ingress,
            hit.backend.id,
            lb,
            &hit.backend.addr,
            outer_len,
            hit.now,
        )?;
        let ifindex = hop.ifindex();
        let written = forward::encap6(ctx, &Some(hop), inner, lb, &hit.backend.addr, IPPROTO_IPV6);
        (ifindex, written)
    } else {
        let lb = cfg.lb_addr;
        if lb == 0 {
            return None;
        }
        let outer_len = inner.ip_len.checked_add(IPV4_HLEN as u16)?;
        let hop = nexthop::cached(
            ingress,
            hit.backend.id,
            &Addr::from_v4(lb),
            &hit.backend.addr,
            outer_len,
            hit.now,
        )?;
        let ifindex = hop.ifindex();
        let written = forward::encap4(ctx, &Some(hop), inner, lb, hit.backend.addr.v4());
        (ifindex, written)
    };
    if !written {
        return Some(Verdict::drop(reason::DROP_ENCAP_FAILED));
    }
    let verdict = forward::egress(ingress, ifindex);
    if forward::is_forwarded(&verdict) {
        stats::count_forwarded(hit.vip.id, hit.backend.id, frame_len as u64);
    }
    Some(verdict)
}

/// Why `established4` did not serve a packet.
pub enum Unserved {
    /// Not an established flow's packet it could serve: what it found in `FLOWS` (`Probe`).
    Probe(u32),
    /// Served, but too big for its next hop: the answer is the entry point's to send (whether
    /// the packet has DF, and the largest packet that would fit, host order).
    TooBig(bool, u16),
}

/// `established4`'s (and `ipv6::established`'s) `Result<Verdict, Unserved>` in one 64-bit
/// register. Returned through memory (it is 12 bytes), the BPF call left in r0 whatever LLVM had
/// put there last, once a stack address, which the verifier refuses at a call's exit ("cannot
/// return stack pointer to the caller"); it also cost three stores and three loads per packet.
/// Bits 62–63: the kind, 0 for a served packet (the common case, told apart with one shift and
/// its action and reason taken out with one more), `PROBE` or `TOO_BIG` otherwise. Served: action
/// in bits 32–39, reason in 0–31; too big: DF in bit 32, the room in 0–15; a probe: its value in
/// 0–31.
#[repr(transparent)]
pub struct Outcome(u64);

impl Outcome {
    const PROBE: u64 = 1;
    const TOO_BIG: u64 = 2;
    const KIND_SHIFT: u32 = 62;

    #[inline(always)]
    pub fn encode(result: Result<Verdict, Unserved>) -> Self {
        Self(match result {
            Ok(v) => u64::from(v.action & 0xff) << 32 | u64::from(v.reason),
            Err(Unserved::TooBig(df, room)) => {
                Self::TOO_BIG << Self::KIND_SHIFT | u64::from(df) << 32 | u64::from(room)
            }
            Err(Unserved::Probe(probe)) => Self::PROBE << Self::KIND_SHIFT | u64::from(probe),
        })
    }

    #[inline(always)]
    pub fn decode(self) -> Result<Verdict, Unserved> {
        let low = self.0 as u32;
        match self.0 >> Self::KIND_SHIFT {
            0 => Ok(Verdict {
                action: (self.0 >> 32) as u32,
                reason: low,
            }),
            Self::TOO_BIG => Err(Unserved::TooBig(self.0 >> 32 & 1 != 0, low as u16)),
            _ => Err(Unserved::Probe(low)),
        }
    }
}

/// What `established_entry` found for a flow it can serve.
pub struct Established {
    /// Only what forwarding and counting read (id and method): ring and flags serve new flows
    /// and source checks, which this packet does not need.
    pub vip: VipMeta,
    pub backend: forward::Backend,
    pub now: u64,
    /// The policy the stamp was checked against (and whether any VIP is debugged).
    pub policy: Policy,
}

/// The lookup of `established4` and `ipv6::established` after the parse: `flow`'s entry in
/// `FLOWS`, its stamp and its backend, its last-seen time refreshed; `Err` with what was found
/// otherwise. `lengths_ok`: the packet's lengths agree (the full decision drops one whose do
/// not, so it is only looked up).
#[inline(always)]
pub fn established_entry(flow: &FlowKey, lengths_ok: bool) -> Result<Established, u32> {
    let Some(value) = FLOWS.get_ptr_mut(flow) else {
        return Err(Probe::MISSED);
    };
    if !lengths_ok {
        return Err(Probe::FOUND);
    }
    let policy = firewall::policy();
    let generation = policy.generation;
    let stamp = stamp_of(value);
    // Generation 0 is "never checked" (and a data path without `POLICY` reads 0 too).
    if stamp.policy_gen != generation || generation == 0 {
        return Err(Probe::FOUND);
    }
    // The backend is the entry's own, unchecked: the agent bumps the generation after every
    // change of a backend slot (`BACKENDS`), and `select` reads the generation before the slot
    // it checks, so an entry stamped with the current generation had an active backend of its
    // VIP in that slot when it was stamped, and nothing of the slot has changed since. An
    // established packet spares that lookup (a cache line per backend on the live path).
    // The clock first: the entry's backend read after the helper call stays in the entry (a
    // callee-saved register holds its pointer) instead of five words spilled across the call.
    let now = coarse_now();
    touch(value, now);
    // SAFETY: map value pointer from a successful lookup.
    let (id, addr) = unsafe { ((*value).backend_id, (*value).backend_addr) };
    Ok(Established {
        vip: VipMeta {
            id: u32::from(stamp.vip_id),
            forward: u32::from(stamp.vip_forward),
            ..VipMeta::default()
        },
        backend: forward::Backend { id, addr },
        now,
        policy,
    })
}

/// `established_entry` for `ipv6::established`: `Ok` with the verdict when `l2_exit` or
/// `ipip_exit` forwarded the packet (not for a debugged VIP, whose packet is logged on its way
/// out of `try_balance`); else the packet is handed on through `out`, `Err(Probe::SERVED)` when
/// `out` holds it as `select` would have left it, or `Err` with what was found. `ip_len`: `None`
/// if the lengths do not agree.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn serve_established(
    ctx: &XdpContext,
    flow: FlowKey,
    ip_len: Option<u16>,
    tos: u8,
    df: bool,
    frame_len: usize,
    midflow: bool,
    out: &mut Steered,
) -> Result<Verdict, u32> {
    let hit = established_entry(&flow, ip_len.is_some())?;
    if !debug::enabled(&hit.policy, hit.vip.id) {
        if let Some(verdict) = l2_exit(ctx, &hit, ip_len.unwrap_or(0), frame_len) {
            return Ok(verdict);
        }
        let inner = forward::Inner {
            ip_len: ip_len.unwrap_or(0),
            tos,
            df,
        };
        if let Some(verdict) = ipip_exit::<true>(ctx, &hit, inner, frame_len) {
            return Ok(verdict);
        }
    }
    out.pkt = Packet {
        vip: hit.vip,
        flow,
        ip_len: ip_len.unwrap_or(0),
        tos,
        df,
        frame_len: frame_len as u64,
        midflow,
        icmp_error: false,
    };
    out.icmp_reason = 0;
    out.backend = hit.backend;
    out.now = hit.now;
    out.how = debug::STEER_EXISTING;
    Err(Probe::SERVED)
}

/// The coarse clock (CLOCK_MONOTONIC_COARSE, tick resolution) is enough for flow ages and the
/// next-hop TTL, and reads no clocksource: `bpf_ktime_get_ns` was ~9% of an established packet's
/// time in the profile.
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Read the flow's stamp (generation and cached VIP) in one load, as `recheck` stores it.
#[inline(always)]
fn stamp_of(value: *mut FlowValue) -> FlowStamp {
    // SAFETY: map value pointer from a successful lookup; FlowValue is 8-aligned and the stamp's
    // 8 bytes sit at an 8-aligned offset (asserted in lb-common).
    FlowStamp::from_word(unsafe {
        value
            .cast::<u8>()
            .add(FlowStamp::OFFSET)
            .cast::<u64>()
            .read_volatile()
    })
}

/// Store the flow's stamp in one aligned write: another CPU reads a generation only with the
/// VIP cached under it.
#[inline(always)]
fn set_stamp(value: *mut FlowValue, stamp: FlowStamp) {
    // SAFETY: as in `stamp_of`.
    unsafe {
        value
            .cast::<u8>()
            .add(FlowStamp::OFFSET)
            .cast::<u64>()
            .write_volatile(stamp.to_word())
    }
}

/// The stamp of a flow whose checks passed under `policy` for `vip`.
#[inline(always)]
fn stamp_for(vip: &VipMeta, policy: &Policy) -> FlowStamp {
    FlowStamp {
        policy_gen: policy.generation,
        vip_id: vip.id as u16,
        vip_forward: vip.forward as u8,
    }
}

/// Parse an IPv4 packet up to L4 and find the VIP. Anything we cannot attribute to a VIP is
/// passed; anything for a VIP address that we cannot serve is dropped. `Ok`: `out.pkt` is the
/// packet (written in place: no copy of it on the way) with `out.icmp_reason` 0, or `out` is an
/// ICMP error about a flow, whole, to be forwarded.
#[inline(always)]
fn classify(ctx: &XdpContext, out: &mut Steered) -> Result<(), Verdict> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(Verdict::pass(reason::PASS_MALFORMED))?;
    // SAFETY: as above; everything needed later is copied out before any header moves.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < IPV4_HLEN {
        return Err(Verdict::pass(reason::PASS_MALFORMED));
    }
    let (src_addr, dst_addr) = ipv4_addrs(ip);
    // The deny list comes first for every IPv4 packet. Packets of a VIP service have it checked
    // in `steer`, where an established flow's cached verdict can spare the lookup; every other
    // verdict of this function goes through here.
    // VIP traffic is looked up by (address, port, protocol) in one go. Only packets that cannot
    // be, or are not, a VIP service's pay the second lookup that tells "a VIP address, nothing
    // served here" (dropped) from "not ours" (passed). An established flow's packets were served
    // by `established4` in one `FLOWS` lookup before this; a new flow's pay `FLOWS` (missed),
    // then `VIPS`; the LB's own TCP and UDP traffic pays those and the address-only lookup.
    let frags = ipv4_frags(ip);
    if frags & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Err(not_served(src_addr, dst_addr, reason::DROP_FRAGMENT));
    }
    let l4 = ETH_HLEN + ihl;
    let L4 {
        ports,
        midflow,
        len: l4_len,
    } = match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => match l4_header(ctx, ip.proto, l4) {
            Some(h) => h,
            None => {
                return Err(not_served(src_addr, dst_addr, reason::DROP_MALFORMED_L4));
            }
        },
        IPPROTO_ICMP => {
            if firewall::deny_listed(src_addr, &firewall::policy()) {
                return Err(Verdict::drop(reason::DROP_DENY_LIST));
            }
            let outer = vip_icmp::Outer {
                dst_addr,
                ihl,
                ip_len: ipv4_tot_len(ip),
                tos: ip.tos,
                df: frags & IP_DF != 0,
            };
            return vip_icmp::handle(ctx, &outer, out);
        }
        _ => return Err(not_served(src_addr, dst_addr, reason::DROP_UNKNOWN_PORT)),
    };
    let dst_port = u16::from_ne_bytes([ports[2], ports[3]]);
    let vip_key = VipKey {
        addr: dst_addr,
        port: dst_port,
        proto: ip.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once; the agent replaces VIP entries whole.
    let vip = match unsafe { VIPS.get(vip_key) } {
        Some(vip) => *vip,
        None => return Err(not_served(src_addr, dst_addr, reason::DROP_UNKNOWN_PORT)),
    };
    let ip_len = ipv4_tot_len(ip);
    let frame_len = frame_len(ctx);
    if !lengths_agree(ip_len, ihl + l4_len, frame_len) {
        return Err(denied_or(src_addr, Verdict::drop(reason::DROP_BAD_LENGTH)));
    }
    out.pkt = Packet {
        vip,
        flow: flow_key(
            Addr::from_v4(src_addr),
            Addr::from_v4(dst_addr),
            ports,
            ip.proto,
        ),
        ip_len,
        tos: ip.tos,
        df: frags & IP_DF != 0,
        frame_len: frame_len as u64,
        midflow,
        icmp_error: false,
    };
    out.icmp_reason = 0;
    Ok(())
}

/// The deny list comes first for every IPv4 packet. Packets of a VIP service have it checked in
/// `select`, where an established flow's cached verdict can spare the lookup; every other
/// verdict of `classify` goes through here. Functions, not closures: LLVM left those out of
/// line, a BPF call with a frame of its own.
#[inline(always)]
fn denied_or(src_addr: u32, verdict: Verdict) -> Verdict {
    if firewall::deny_listed(src_addr, &firewall::policy()) {
        Verdict::drop(reason::DROP_DENY_LIST)
    } else {
        verdict
    }
}

/// A packet from `src_addr` to `dst_addr` (IPv4, network order) that no VIP serves: dropped for
/// `why` if the address carries VIPs, else passed.
#[inline(always)]
fn not_served(src_addr: u32, dst_addr: u32, why: u32) -> Verdict {
    // SAFETY: read-only lookup; the value is not used.
    denied_or(
        src_addr,
        if unsafe { VIP_ADDRS.get(dst_addr) }.is_some() {
            Verdict::drop(why)
        } else {
            Verdict::pass(reason::PASS_NOT_VIP)
        },
    )
}

/// What a TCP or UDP header says about a flow.
pub struct L4 {
    /// Source and destination port, as on the wire.
    pub ports: [u8; 4],
    /// TCP without SYN: a packet from the middle of a connection.
    pub midflow: bool,
    /// The minimal header's length.
    pub len: usize,
}

/// The TCP or UDP (`proto`) header at `l4`, or `None` if the frame does not hold its minimal
/// header. Both start with the ports; the whole minimal header is checked so that a truncated
/// one is recognised as such.
#[inline(always)]
pub fn l4_header(ctx: &XdpContext, proto: u8, l4: usize) -> Option<L4> {
    if proto == IPPROTO_TCP {
        let h: *const [u8; TCP_HLEN] = ptr_at(ctx, l4)?;
        // SAFETY: bounds checked; the ports are the header's first 4 bytes.
        let (h, ports) = unsafe { (&*h, &*h.cast::<[u8; 4]>()) };
        Some(L4 {
            ports: load4(ports),
            midflow: h[13] & TCP_SYN == 0,
            len: TCP_HLEN,
        })
    } else {
        let h: *const [u8; UDP_HLEN] = ptr_at(ctx, l4)?;
        // SAFETY: bounds checked; the ports are the header's first 4 bytes.
        let ports = unsafe { &*h.cast::<[u8; 4]>() };
        Some(L4 {
            ports: load4(ports),
            midflow: false,
            len: UDP_HLEN,
        })
    }
}

/// The IP length `ip_len` (the whole packet: IPv4 total length, IPv6 40 + payload length) covers the `headers` the balancer read (IP and L4), and the
/// frame of `frame_len` bytes holds all of it. Frames longer than Ethernet + `ip_len` are normal
/// (Ethernet pads short frames to 60 bytes); shorter ones lost bytes the header claims.
#[inline(always)]
pub fn lengths_agree(ip_len: u16, headers: usize, frame_len: usize) -> bool {
    let ip_len = usize::from(ip_len);
    ip_len >= headers && frame_len >= ETH_HLEN + ip_len
}

/// The flow key of a packet of either family (IPv4 addresses as `Addr::from_v4`, which inlined
/// stays three immediate stores per address), assembled as ten words. Written as a struct
/// literal, its `[u8; 3]` padding became a call to a byte-by-byte `memset` subprogram on every
/// packet (`bpftool prog dump xlated`): the BPF backend does not inline unaligned memsets.
#[inline(always)]
pub fn flow_key(src_addr: Addr, dst_addr: Addr, ports: [u8; 4], proto: u8) -> FlowKey {
    // FlowKey's layout: src_addr, dst_addr (16 bytes each), src_port and dst_port (the packet's
    // port bytes, in wire order), proto, 3 bytes of zero padding.
    let [s0, s1, s2, s3] = src_addr.words;
    let [d0, d1, d2, d3] = dst_addr.words;
    let words: [u32; 10] = [
        s0,
        s1,
        s2,
        s3,
        d0,
        d1,
        d2,
        d3,
        u32::from_ne_bytes(ports),
        u32::from_ne_bytes([proto, 0, 0, 0]),
    ];
    const _: () = {
        assert!(core::mem::offset_of!(FlowKey, dst_addr) == 16);
        assert!(core::mem::offset_of!(FlowKey, src_port) == 32);
        assert!(core::mem::offset_of!(FlowKey, dst_port) == 34);
        assert!(core::mem::offset_of!(FlowKey, proto) == 36);
    };
    // SAFETY: FlowKey is #[repr(C)], 40 bytes of integers (any bit pattern is valid), with the
    // field offsets asserted above; transmute checks the size.
    unsafe { core::mem::transmute::<[u32; 10], FlowKey>(words) }
}

/// Find or choose the backend of `out.pkt` (either family); `Ok` when `out` holds it.
#[inline(always)]
pub fn select(out: &mut Steered, mut policy: Policy, probe: u32) -> Result<(), Verdict> {
    let pkt = &out.pkt;
    let now = coarse_now();
    // A SYN opens a flow (or repeats the opening of one): its source is checked whatever the
    // flow tables say, so it is checked against the deny list first. A flood from denied
    // sources is then dropped after one lookup in the list, not after two misses in the flow
    // tables (random keys: cache misses each) as well; packets of established flows still skip
    // the list while their cached checks hold.
    if pkt.flow.proto == IPPROTO_TCP && !pkt.midflow && !pkt.icmp_error {
        match firewall::check_deny_list(pkt.flow.src_addr, &pkt.vip, &policy) {
            Ok(checked) => policy = checked,
            Err(why) => return Err(Verdict::drop(why)),
        }
    }
    let mut how = debug::STEER_EXISTING;
    let found = if probe == Probe::MISSED {
        Lookup::Miss
    } else {
        existing_flow(&FLOWS, &pkt.flow, pkt.vip.id, Some(now))
    };
    let chosen = match found {
        Lookup::Hit(id, addr, value) => recheck(pkt, &policy, value).map(|()| (id, addr)),
        Lookup::Stale => {
            // An established flow whose backend went away: re-steered in the flow table (it is
            // no new connection, so no limit applies), its source checked again.
            stats::count_event(event::FLOW_RESTEERED);
            how = debug::STEER_NEW;
            assign(pkt, now, &policy, Table::Flows, false)
        }
        Lookup::Miss if pkt.flow.proto == IPPROTO_TCP => {
            let (chosen, new) = tcp_miss(pkt, now, &policy);
            if new {
                how = debug::STEER_NEW;
            }
            chosen
        }
        Lookup::Miss => {
            how = debug::STEER_NEW;
            assign(pkt, now, &policy, Table::Flows, true)
        }
    };
    let (id, addr) = chosen?;
    out.backend = forward::Backend { id, addr };
    out.now = now;
    out.how = how;
    Ok(())
}

/// `CONFIG`'s flags (`CONFIG_F_*`); 0 if it could not be read.
#[inline(always)]
pub fn config_flags() -> u32 {
    CONFIG.get(0).map_or(0, |cfg| cfg.flags)
}

/// A TCP packet whose flow is not in `FLOWS`. New TCP flows wait in the embryonic table until
/// their first packet without SYN (with direct server return the balancer sees the client's
/// handshake ACK), so a flood of SYNs from spoofed sources churns `EMBRYOS` and never evicts an
/// established flow. A retransmitted SYN finds its embryo and keeps its backend; the first
/// packet without SYN moves the flow into `FLOWS`. Returns the backend, and whether a new flow
/// was assigned.
///
/// With peer sync on, a packet without SYN that finds neither table's entry holds its flow
/// first (`hold`): the flow is most likely a peer's, whose record is on its way.
#[inline(always)]
fn tcp_miss(pkt: &Packet, now: u64, policy: &Policy) -> (Result<(u32, Addr), Verdict>, bool) {
    let key: &FlowKey = &pkt.flow;
    let embryo = EMBRYOS.get_ptr_mut(key);
    // A held flow has no backend to validate: for its packets it is a miss that knows when its
    // hold began. A time, not an `Option`: the payload of a `None` kept across the helper calls
    // below was spilled from an unwritten register, which the verifier refuses.
    let held_at = embryo.map_or(NOT_HELD, held_at);
    let found = match embryo {
        Some(value) if held_at == NOT_HELD => validate(value, pkt.vip.id, Some(now)),
        _ => Lookup::Miss,
    };
    match found {
        Lookup::Hit(id, addr, value) => {
            let checked = recheck(pkt, policy, value);
            if checked.is_ok() && pkt.midflow {
                promote(pkt, value, now);
            }
            (checked.map(|()| (id, addr)), false)
        }
        miss => {
            match miss {
                Lookup::Stale => stats::count_event(event::FLOW_RESTEERED),
                _ if pkt.midflow => {
                    let flags = config_flags();
                    // While the agent copies the flow tables from an older layout, the flow may
                    // only be missing for now: its sender retransmits this packet, steering it
                    // anew could send it to another backend.
                    if flags & CONFIG_F_MIGRATING != 0 {
                        return (Err(Verdict::drop(reason::DROP_MIGRATING)), false);
                    }
                    let holding =
                        held_at == NOT_HELD || now.saturating_sub(held_at) < MIDFLOW_HOLD_NS;
                    if flags & CONFIG_F_HOLD_MIDFLOW != 0
                        && holding
                        && pkt.vip.flags & VIP_F_ONE_BACKEND == 0
                    {
                        return (hold(pkt, policy, now, held_at == NOT_HELD), false);
                    }
                    stats::count_event(event::MIDFLOW_MISS);
                }
                _ => {}
            }
            // A packet from the middle of a connection this node never saw (a sync gap) is held
            // apart too: its next packet promotes it, and a flood of lone ACKs stays out of the
            // flow table as SYNs do. A flow that was held took its new-flow token then.
            let limited = !(pkt.midflow && held_at != NOT_HELD);
            let chosen = assign(pkt, now, policy, Table::Embryos, limited);
            (chosen, true)
        }
    }
}

/// `held_at` of an embryo with a backend, or of none: the coarse clock is never 0 by the time
/// a packet arrives (it counts from boot).
const NOT_HELD: u64 = 0;

/// When `embryo`'s flow was held (`FLOW_F_HELD`), or `NOT_HELD` for an embryo with a backend.
#[inline(always)]
fn held_at(embryo: *mut FlowValue) -> u64 {
    // SAFETY: map value pointer from a successful lookup.
    let (flags, since) = unsafe { ((*embryo).flags, (*embryo).last_seen_ns) };
    if flags & FLOW_F_HELD != 0 {
        since
    } else {
        NOT_HELD
    }
}

/// Drop a packet of a flow held for its peer's record (`FLOW_F_HELD`), holding the flow first
/// if it is `new` to the hold. Its source is checked first and, for a new hold, the new-flow
/// limits, as for the flow it may become: a denied or limited packet is counted as what it is
/// and leaves no entry, so a flood of lone ACKs is limited as a SYN flood is, and what it does
/// enter lands in `EMBRYOS`, never in the flow table. The flow does not pay again when its hold
/// runs out (`tcp_miss`).
#[inline(always)]
fn hold(pkt: &Packet, policy: &Policy, now: u64, new: bool) -> Result<(u32, Addr), Verdict> {
    check_source(pkt, policy)?;
    if new {
        firewall::admit_new_flow(pkt.flow.src_addr, &pkt.vip).map_err(Verdict::drop)?;
        let held = FlowValue::new(Addr::UNSPECIFIED, 0, now, FLOW_F_HELD);
        // Never over an embryo with a backend (the flow's SYN, steered on another CPU since the
        // lookup). If the insert failed otherwise (an LRU map evicts rather than fails), the
        // next packet holds the flow again: its wait only starts later.
        let _ = EMBRYOS.insert(pkt.flow, held, u64::from(BPF_NOEXIST));
        stats::count_event(event::MIDFLOW_HELD);
    }
    Err(Verdict::drop(reason::DROP_MIDFLOW_HELD))
}

/// A known flow's packet: its cached source checks (and VIP) hold while they were made under the
/// current policy generation; otherwise they are made again, and if they pass the generation is
/// stored with the VIP read after it (`pkt.vip`, from `VIPS` or `VIPS6`).
#[inline(always)]
fn recheck(pkt: &Packet, policy: &Policy, value: *mut FlowValue) -> Result<(), Verdict> {
    if stamp_of(value).policy_gen == policy.generation {
        return Ok(());
    }
    stats::count_event(event::POLICY_RECHECK);
    check_source(pkt, policy)?;
    set_stamp(value, stamp_for(&pkt.vip, policy));
    Ok(())
}

#[inline(always)]
fn check_source(pkt: &Packet, policy: &Policy) -> Result<(), Verdict> {
    firewall::check_source(pkt.flow.src_addr, &pkt.vip, policy).map_err(Verdict::drop)
}

/// A flow to assign a backend to: its source checked, its new-flow limits applied when
/// `limited` (a re-steered flow is no new connection), then the next ring slot. Written out
/// rather than chained with closures: LLVM left those closures out of line, each a BPF call
/// with a frame of its own on top of the balancer's.
#[inline(always)]
fn assign(
    pkt: &Packet,
    now: u64,
    policy: &Policy,
    table: Table,
    limited: bool,
) -> Result<(u32, Addr), Verdict> {
    check_source(pkt, policy)?;
    if limited {
        firewall::admit_new_flow(pkt.flow.src_addr, &pkt.vip).map_err(Verdict::drop)?;
    }
    new_flow(pkt, now, policy, table)
}

/// Move an embryonic flow into `FLOWS` (its backend and checks as they are) and report it to
/// the peers: from now on it is an established flow.
#[inline(always)]
fn promote(pkt: &Packet, embryo: *mut FlowValue, now: u64) {
    // SAFETY: map value pointer from a successful lookup; copied before the entry is removed.
    let (backend_addr, backend_id) = unsafe { ((*embryo).backend_addr, (*embryo).backend_id) };
    // Assigned by this node's data path (embryos never come from peers); its checks and VIP as
    // the embryo's stamp has them (`recheck` just brought it up to date).
    let value = FlowValue::new(backend_addr, backend_id, now, 0).stamped(stamp_of(embryo));
    // An LRU map evicts rather than fails when full; if the insert failed anyway, the next
    // packet finds the embryo gone and is a mid-flow miss.
    let _ = FLOWS.insert(pkt.flow, value, 0);
    let _ = EMBRYOS.remove(pkt.flow);
    stats::count_event(event::EMBRYONIC_PROMOTED);
    report_flow(&pkt.flow, backend_addr);
}

pub enum Lookup {
    /// Known flow, backend still there: (slot id, address, the entry).
    Hit(u32, Addr, *mut FlowValue),
    /// Known flow whose backend slot no longer holds its backend (down, removed, reused).
    Stale,
    /// No entry.
    Miss,
}

/// The backend of flow `key` of VIP `vip_id` in `table` (`FLOWS` or `EMBRYOS`), if the flow is
/// known and its backend slot still holds the same address for the same VIP and is active
/// (otherwise the flow is re-steered as if new). A hit records `seen_at` as the flow's last
/// packet, if given: packets of the flow do, ICMP errors about it do not.
#[inline(always)]
pub fn existing_flow(
    table: &LruHashMap<FlowKey, FlowValue>,
    key: &FlowKey,
    vip_id: u32,
    seen_at: Option<u64>,
) -> Lookup {
    match table.get_ptr_mut(key) {
        Some(flow) => validate(flow, vip_id, seen_at),
        None => Lookup::Miss,
    }
}

/// `existing_flow` for an entry already looked up.
#[inline(always)]
fn validate(flow: *mut FlowValue, vip_id: u32, seen_at: Option<u64>) -> Lookup {
    // SAFETY: map value pointer from a successful lookup.
    let (id, addr) = unsafe { ((*flow).backend_id, (*flow).backend_addr) };
    let Some(backend) = BACKENDS.get(id) else {
        return Lookup::Stale;
    };
    if backend.addr != addr || backend.flags & BACKEND_F_ACTIVE == 0 || backend.vip_id != vip_id {
        return Lookup::Stale;
    }
    if let Some(now) = seen_at {
        touch(flow, now);
    }
    Lookup::Hit(id, addr, flow)
}

/// Record `now` (the coarse clock) as the flow's last packet once it is `lb_common::TOUCH_NS` past
/// the one recorded. Written whenever the clock had moved, the entry of a flow of a few hundred
/// packets a second was written on nearly every tick (4 ms at HZ=250): a store and a dirty cache
/// line where the stateful floor only reads. Now a busy flow's entry is written a few times a
/// second, and stays shared while the flow's packets come in on several CPUs. A time ahead of
/// this CPU's clock (another CPU's, a tick ahead) is left alone.
#[inline(always)]
fn touch(flow: *mut FlowValue, now: u64) {
    // SAFETY: a map value pointer from a successful lookup. A racing writer on another CPU can
    // only store another recent time.
    unsafe {
        if now.saturating_sub((*flow).last_seen_ns) >= TOUCH_NS {
            (*flow).last_seen_ns = now;
        }
    }
}

/// Atomic 64-bit fetch-and-add (`BPF_ATOMIC | BPF_FETCH | BPF_DW`, kernel ≥ 5.12); every CPU's
/// access to a round-robin counter goes through it.
///
/// Why inline assembly: the BPF target's `core` has no atomic types, and aya-build compiles for
/// LLVM's `generic` BPF CPU (v1), where an `atomicrmw add` whose old value is used is rejected
/// ("Invalid usage of the XADD return value") — rustflags such as `-C target-cpu=v3` cannot be
/// passed through aya-build. The fetch form of the instruction itself needs no CPU level in
/// LLVM's assembler, and the kernel verifies it on its own merits.
///
/// # Safety
/// `ptr` must be a valid, 8-byte aligned map value.
#[inline(always)]
unsafe fn fetch_add(ptr: *mut u64, value: u64) -> u64 {
    let mut old = value;
    // SAFETY: guaranteed by the caller; the instruction reads and writes only `*ptr` and `old`.
    unsafe {
        asm!(
            "{old} = atomic_fetch_add((u64 *)({ptr} + 0), {old})",
            ptr = in(reg) ptr,
            old = inout(reg) old,
            options(nostack),
        );
    }
    old
}

/// Where a new flow is kept.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    /// The flow table: UDP flows, re-steered flows (reported to peers at once).
    Flows,
    /// The embryonic table: new TCP flows (reported when promoted).
    Embryos,
}

/// Take the next slot of the VIP's ring (one atomic counter per VIP, shared by all CPUs, so N new
/// flows over K equal backends land exactly N/K on each) and remember the choice in `table`,
/// with the policy generation its checks passed under.
#[inline(always)]
fn new_flow(pkt: &Packet, now: u64, policy: &Policy, table: Table) -> Result<(u32, Addr), Verdict> {
    let vip = &pkt.vip;
    let no_backend = Verdict::drop(reason::DROP_NO_BACKEND);
    // Copied to a local: the asm below may (as far as the compiler knows) write memory, and a
    // re-read length could be zero again, which would leave a division-by-zero panic path that the
    // verifier rejects.
    let ring_len = vip.ring_len;
    if ring_len == 0 || ring_len > RING_SLOTS {
        return Err(no_backend);
    }
    let counter = RR_COUNTERS.get_ptr_mut(vip.id).ok_or(no_backend)?;
    // SAFETY: a map value is 8-byte aligned and lives as long as the map.
    let n = unsafe { fetch_add(counter, 1) };
    let slot = n
        .checked_rem(u64::from(ring_len))
        .ok_or(Verdict::drop(reason::DROP_NO_BACKEND))? as u32;
    let id = *RINGS
        .get(ring_index(vip.id, vip.ring_half, slot))
        .ok_or(Verdict::drop(reason::DROP_NO_BACKEND))?;
    let backend = BACKENDS
        .get(id)
        .ok_or(Verdict::drop(reason::DROP_NO_BACKEND))?;
    if backend.addr.is_unspecified() || backend.flags & BACKEND_F_ACTIVE == 0 {
        return Err(Verdict::drop(reason::DROP_NO_BACKEND));
    }
    // Assigned here: a local flow, whatever a peer had installed under this key before.
    let value = FlowValue::new(backend.addr, id, now, 0).stamped(stamp_for(vip, policy));
    stats::count_new_flow(vip.id, id);
    // An LRU map evicts rather than fails when full; if the insert fails anyway, the packet still
    // goes to this backend and the next one of the flow takes another slot.
    match table {
        Table::Flows => {
            let _ = FLOWS.insert(pkt.flow, value, 0);
            report_flow(&pkt.flow, backend.addr);
        }
        Table::Embryos => {
            let _ = EMBRYOS.insert(pkt.flow, value, 0);
            stats::count_event(event::EMBRYONIC_NEW);
        }
    }
    Ok((id, backend.addr))
}

/// Tell the peers (through the agent) about a flow that is now in `FLOWS`, if anyone reads.
#[inline(always)]
fn report_flow(flow: &FlowKey, backend_addr: Addr) {
    if config_flags() & CONFIG_F_FLOW_EVENTS != 0 {
        let event = FlowEvent {
            flow: *flow,
            backend_addr,
        };
        if FLOW_EVENTS.output(event, 0).is_err() {
            stats::count_event(event::FLOW_EVENT_LOST);
        }
    }
}
