//! IPv6 up to L4: the fixed header, a bounded walk over extension headers (RFC 8200 §4), the VIP
//! lookup in `VIPS6`. Produces the same `Packet` as the IPv4 parse, so everything after it
//! (flow tables, rings, limits, counters, forwarding) serves both families.
//!
//! Extension headers, at most `MAX_EXT` of them:
//! - Hop-by-Hop Options: skipped, only as the first header (anywhere else it is malformed);
//! - Destination Options: skipped;
//! - Routing with Segments Left 0 (this node is the final destination): skipped; with segments
//!   left the VIP is not the packet's destination and xlb is no segment endpoint;
//! - Fragment: any fragment, even an atomic one, `drop_fragment` (as IPv4's fragments);
//! - TCP, UDP: steered; ICMPv6: `vip_icmp6.rs`;
//! - AH, ESP, No Next Header, Mobility, HIP, Shim6, the experimental 253/254, a fifth extension
//!   header: `drop_ext_header`; another upper layer (SCTP, ...): `drop_unknown_port`, as IPv4.
//!
//! These verdicts are for packets to a VIP address (`VIP_ADDRS6`); any packet to another
//! address (NDP, MLD, echo to the LB, the host's own traffic) is passed untouched, whatever it
//! carries. An extension or L4 header that runs past the frame is `drop_malformed_l4`; a payload
//! length shorter than the headers read, or a frame shorter than the payload length, is
//! `drop_bad_length`. The hop limit is not decremented, as IPv4's TTL is not: the balancer is not
//! a routing hop.

use crate::{
    Verdict,
    balancer::{self, L4, Outcome, Packet, Probe, Steered, Unserved},
    firewall,
    maps::{VIP_ADDRS6, VIPS6},
    parse::{ETH_HLEN, IPPROTO_FRAGMENT, IPV6_HLEN, frame_len, load4_at, ptr_at},
};
use aya_ebpf::programs::XdpContext;
use core::hint::black_box;
use lb_common::{Addr, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, VipKey6, reason};

/// Extension headers the walk skips at most; a fifth is `drop_ext_header`.
const MAX_EXT: usize = 4;
const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_DEST_OPTS: u8 = 60;

/// What the fixed header says.
pub struct Header {
    pub src: Addr,
    pub dst: Addr,
    /// 40 + payload length (the whole packet), host order; at most 65535 (`classify` checks).
    pub ip_len: usize,
    pub traffic_class: u8,
}

/// Where the walk over the extension headers ended.
enum Walk {
    /// The upper-layer header: its protocol and offset in the frame.
    Upper(u8, usize),
    /// Not steerable: the drop reason, for a VIP address.
    Stop(u32),
}

/// The decision stage for an IPv6 frame (see `balancer::try_balance`): `Ok(None)` when `out`
/// holds a packet to forward, `Ok(Some(l4))` for ICMPv6 (its header at `l4`) to a VIP address,
/// which `vip_icmp6::handle` takes from there. `probe`: what `established` found of a packet it
/// did not serve (`try_balance` does not call this for one it served).
#[inline(never)]
pub fn decide(ctx: &XdpContext, out: &mut Steered, probe: u32) -> Result<Option<usize>, Verdict> {
    // Read before `VIPS6`, for the reason `balancer::balance4` gives.
    let policy = firewall::policy();
    match classify(ctx, out)? {
        Some(l4) => Ok(Some(l4)),
        None => balancer::select(out, policy, probe).map(|()| None),
    }
}

/// `balancer::established4` for IPv6: the packet of an established flow (TCP without SYN or
/// UDP, behind the extension headers the walk skips) in one hash lookup, forwarded at once on a
/// cached next hop, `l2` or `ipip` (the verdict), or `out` written and `Probe::SERVED` returned;
/// otherwise what was found in `FLOWS`, for `decide`. Its own BPF function, as `decide` is; its
/// answer in one register, as `established4`'s.
#[inline(never)]
pub fn established(ctx: &XdpContext, out: &mut Steered) -> Outcome {
    Outcome::encode(established_inline(ctx, out).map_err(Unserved::Probe))
}

/// `established`'s work, inlined into it.
#[inline(always)]
fn established_inline(ctx: &XdpContext, out: &mut Steered) -> Result<Verdict, u32> {
    // Opaque to the optimiser: otherwise LLVM may pass `data` and `data_end` instead of `ctx`,
    // and the verifier refuses the arithmetic it then does on `data_end`.
    let ctx = black_box(ctx);
    let Ok((hdr, next)) = header(ctx) else {
        return Err(Probe::NOT_LOOKED);
    };
    let Walk::Upper(proto, l4) = walk(ctx, next) else {
        return Err(Probe::NOT_LOOKED);
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Probe::NOT_LOOKED);
    }
    let Some(L4 {
        ports,
        midflow,
        len: l4_len,
    }) = balancer::l4_header(ctx, proto, black_box(l4))
    else {
        return Err(Probe::NOT_LOOKED);
    };
    if proto == IPPROTO_TCP && !midflow {
        return Err(Probe::NOT_LOOKED);
    }
    let frame_len = frame_len(ctx);
    balancer::serve_established(
        ctx,
        balancer::flow_key(hdr.src, hdr.dst, ports, proto),
        lengths(&hdr, l4 + l4_len - ETH_HLEN, frame_len),
        hdr.traffic_class,
        true,
        frame_len,
        midflow,
        out,
    )
}

/// The fixed header of the IPv6 packet in `ctx`, or the verdict on a frame without one or with
/// an IPv4-mapped address.
#[inline(always)]
pub fn header(ctx: &XdpContext) -> Result<(Header, u8), Verdict> {
    let h: *const [u8; IPV6_HLEN] =
        ptr_at(ctx, ETH_HLEN).ok_or(Verdict::pass(reason::PASS_MALFORMED))?;
    // SAFETY: bounds checked; everything needed later is copied out.
    let h = unsafe { &*h };
    if h[0] >> 4 != 6 {
        return Err(Verdict::pass(reason::PASS_MALFORMED));
    }
    let hdr = Header {
        src: addr_at::<8>(h),
        dst: addr_at::<24>(h),
        ip_len: IPV6_HLEN + usize::from(u16::from_be_bytes([h[4], h[5]])),
        traffic_class: (h[0] << 4) | (h[1] >> 4),
    };
    // IPv4-mapped addresses (::ffff:a.b.c.d) are how the maps spell IPv4: an IPv6 packet that
    // carries one would share IPv4 flows' keys, the IPv4 deny list and IPv4 sources' buckets.
    // They must not appear on the wire (RFC 4291 §2.5.5.2); the kernel drops such a source, and
    // no VIP has such a destination.
    if hdr.src.is_v4() {
        return Err(Verdict::pass(reason::PASS_MALFORMED));
    }
    if hdr.dst.is_v4() {
        return Err(Verdict::pass(reason::PASS_NOT_VIP));
    }
    Ok((hdr, h[6]))
}

/// As for IPv4: one lookup (VIPS6) for a VIP service's packet; the address-only lookup tells "a
/// VIP address, not served" (dropped for `why`) from "not ours" (passed) only when needed. Then
/// the deny list, as for every IPv4 packet that no VIP serves: a listed source is dropped as
/// `drop_deny_list` (the trie is skipped while the list has no IPv6 prefix).
#[inline(always)]
fn not_served(src: &Addr, dst: &Addr, why: u32) -> Verdict {
    denied_or(
        src,
        if is_vip_addr(dst) {
            Verdict::drop(why)
        } else {
            Verdict::pass(reason::PASS_NOT_VIP)
        },
    )
}

/// `balancer::denied_or` for an IPv6 source: `drop_deny_list` if the live deny list names
/// `src`, else `verdict`.
#[inline(always)]
fn denied_or(src: &Addr, verdict: Verdict) -> Verdict {
    if firewall::deny_listed6(src, &firewall::policy()) {
        Verdict::drop(reason::DROP_DENY_LIST)
    } else {
        verdict
    }
}

/// `dst` carries IPv6 VIPs.
#[inline(always)]
pub fn is_vip_addr(dst: &Addr) -> bool {
    // SAFETY: read-only lookup; the value is not used.
    unsafe { VIP_ADDRS6.get(dst) }.is_some()
}

/// `balancer::classify` for an IPv6 frame: `Ok(None)` when `out.pkt` is the packet,
/// `Ok(Some(l4))` for ICMPv6 to a VIP address, its header at `l4`.
#[inline(always)]
fn classify(ctx: &XdpContext, out: &mut Steered) -> Result<Option<usize>, Verdict> {
    let (hdr, next) = header(ctx)?;
    let (proto, l4) = match walk(ctx, next) {
        Walk::Upper(proto, l4) => (proto, l4),
        Walk::Stop(why) => return Err(not_served(&hdr.src, &hdr.dst, why)),
    };
    let L4 {
        ports,
        midflow,
        len: l4_len,
    } = match proto {
        IPPROTO_TCP | IPPROTO_UDP => match balancer::l4_header(ctx, proto, black_box(l4)) {
            Some(h) => h,
            None => return Err(not_served(&hdr.src, &hdr.dst, reason::DROP_MALFORMED_L4)),
        },
        // To a VIP address: the deny list first, as for IPv4's ICMP. To anything else (the
        // LB's own addresses, neighbour discovery, multicast): passed, listed source or not, so
        // that no deny-list entry can cut the link's neighbour discovery.
        IPPROTO_ICMPV6 if is_vip_addr(&hdr.dst) => {
            if firewall::deny_listed6(&hdr.src, &firewall::policy()) {
                return Err(Verdict::drop(reason::DROP_DENY_LIST));
            }
            return Ok(Some(l4));
        }
        IPPROTO_ICMPV6 => return Err(Verdict::pass(reason::PASS_NOT_VIP)),
        // AH, ESP, No Next Header, Mobility, HIP, Shim6, experimental: extension headers this
        // does not skip. Other upper layers are refused as IPv4 refuses them.
        51 | 50 | 59 | 135 | 139 | 140 | 253 | 254 => {
            return Err(not_served(&hdr.src, &hdr.dst, reason::DROP_EXT_HEADER));
        }
        _ => return Err(not_served(&hdr.src, &hdr.dst, reason::DROP_UNKNOWN_PORT)),
    };
    let key = VipKey6 {
        addr: hdr.dst,
        port: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        _pad: 0,
    };
    // SAFETY: copied out at once; the agent replaces VIP entries whole.
    let vip = match unsafe { VIPS6.get(key) } {
        Some(vip) => *vip,
        None => return Err(not_served(&hdr.src, &hdr.dst, reason::DROP_UNKNOWN_PORT)),
    };
    let frame_len = frame_len(ctx);
    let Some(ip_len) = lengths(&hdr, l4 + l4_len - ETH_HLEN, frame_len) else {
        // The deny list first, as for IPv4.
        return Err(denied_or(&hdr.src, Verdict::drop(reason::DROP_BAD_LENGTH)));
    };
    out.pkt = Packet {
        vip,
        flow: balancer::flow_key(hdr.src, hdr.dst, ports, proto),
        ip_len,
        tos: hdr.traffic_class,
        df: true,
        frame_len: frame_len as u64,
        midflow,
        icmp_error: false,
    };
    out.icmp_reason = 0;
    Ok(None)
}

/// The packet's length (`Packet::ip_len`) if it covers the `headers` bytes read (fixed header,
/// extension headers, L4) and the frame holds all of it (a jumbogram's payload length 0 does
/// not).
#[inline(always)]
pub fn lengths(hdr: &Header, headers: usize, frame_len: usize) -> Option<u16> {
    let ip_len = u16::try_from(hdr.ip_len).ok()?;
    balancer::lengths_agree(ip_len, headers, frame_len).then_some(ip_len)
}

/// The 16-byte address `AT` bytes (8 or 24) into the fixed header, in four word loads (copied as
/// bytes, sixteen loads, shifts and ors). The words are aligned under `NET_IP_ALIGN` (the header
/// starts 14 bytes into the frame; see `parse::load4`).
#[inline(always)]
fn addr_at<const AT: usize>(h: &[u8; IPV6_HLEN]) -> Addr {
    const { assert!(AT + 16 <= IPV6_HLEN) };
    // SAFETY: bytes `AT..AT + 16` of the header (asserted above): a `[u8; 16]` (alignment 1).
    let a = unsafe { &*h.as_ptr().add(AT).cast::<[u8; 16]>() };
    Addr {
        words: [
            u32::from_ne_bytes(load4_at::<0, _>(a)),
            u32::from_ne_bytes(load4_at::<4, _>(a)),
            u32::from_ne_bytes(load4_at::<8, _>(a)),
            u32::from_ne_bytes(load4_at::<12, _>(a)),
        ],
    }
}

/// Walk the extension headers from the fixed header's next header `next` to the upper layer.
/// Each header's length is bounded by its 8-bit length field (at most 2048 bytes), so the
/// offset stays bounded for the verifier.
#[inline(always)]
fn walk(ctx: &XdpContext, mut next: u8) -> Walk {
    let mut off = ETH_HLEN + IPV6_HLEN;
    for i in 0..MAX_EXT {
        match next {
            NH_HOP_BY_HOP if i == 0 => {}
            NH_DEST_OPTS | NH_ROUTING => {}
            IPPROTO_FRAGMENT => return Walk::Stop(reason::DROP_FRAGMENT),
            NH_HOP_BY_HOP => return Walk::Stop(reason::DROP_EXT_HEADER),
            n => return Walk::Upper(n, off),
        }
        // Next header, length in 8-byte units beyond the first 8, and for a routing header its
        // type and segments left: the first 4 bytes of every extension header this skips.
        // Opaque to the compiler, so the pointer is the one `ptr_at` checked (see vip_icmp.rs).
        let Some(e) = ptr_at::<[u8; 4]>(ctx, black_box(off)) else {
            return Walk::Stop(reason::DROP_MALFORMED_L4);
        };
        // SAFETY: bounds checked.
        let e = unsafe { *e };
        if next == NH_ROUTING && e[3] != 0 {
            return Walk::Stop(reason::DROP_EXT_HEADER);
        }
        next = e[0];
        off += (usize::from(e[1]) + 1) * 8;
    }
    match next {
        NH_HOP_BY_HOP | NH_DEST_OPTS | NH_ROUTING => Walk::Stop(reason::DROP_EXT_HEADER),
        IPPROTO_FRAGMENT => Walk::Stop(reason::DROP_FRAGMENT),
        n => Walk::Upper(n, off),
    }
}
