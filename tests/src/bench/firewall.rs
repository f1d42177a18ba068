//! The door's per-packet cost and the deny list's scale (issue 13), through BPF_PROG_TEST_RUN
//! in the benchmark namespace: the same L2 VIP with and without a million deny-list prefixes
//! and ten thousand allow-list prefixes loaded, side by side; and what loading a million
//! prefixes takes (time, kernel memory). Then the same for an IPv6 VIP's new flows, with IPv6
//! prefixes on the deny list and on the VIP's allow list.

use crate::{
    packets::{ACK, CLIENT6, LB, SYN, VIP, VIP6, backend, backend_specs6, tcp_frame, tcp_frame6},
    per_call, repeated, same_frame,
    stats::{Row, Spread, median},
    syns, test_run,
};
use anyhow::{Result, bail};
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    time::Instant,
};
use xlb::{
    dataplane::{Dataplane, DenyCount},
    model::{
        BackendSpec, Forward, Proto, ServiceKey, VipSpec,
        net::{IpNet, Ipv4Net, Ipv6Net},
        policy::SourcePolicy,
    },
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const PORT: u16 = 80;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 111, 0, 2);
/// A source on the deny list, in its /17 (the trie, after a miss in the hash).
const DENIED: Ipv4Addr = Ipv4Addr::new(10, 111, 128, 7);
pub const DENY_PREFIXES: u32 = 1_000_000;
pub const ALLOW_PREFIXES: u32 = 10_000;
/// IPv6 prefixes on the deny list for the IPv6 rows (a trie of its own, filled one insert at a
/// time: the kernel has no batch update for LPM tries).
const DENY6_PREFIXES: u32 = 100_000;
/// A source on the IPv6 deny list (in its /32).
const DENIED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

/// The next number of a xorshift64 sequence from `x` (the lists' fixed-seed randomness).
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The IPv6 prefix of `bits` and `len` (bits past `len` zero by construction).
fn net6(bits: u128, len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(bits), len).expect("no host bits"))
}

/// `n - 1` distinct random /48s of 2400::/8 (a fixed seed), then 2001:db8::/32.
fn deny6_prefixes(n: u32) -> Vec<IpNet> {
    let mut seen = BTreeSet::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while seen.len() < n as usize - 1 {
        let r = xorshift(&mut x);
        seen.insert(net6(
            (0x24u128 << 120) | (u128::from(r & 0xff_ffff_ffff) << 80),
            48,
        ));
    }
    let mut v: Vec<IpNet> = seen.into_iter().collect();
    v.push("2001:db8::/32".parse().unwrap());
    v
}

/// The IPv6 client's /64 and `n - 1` other /64s of fd11:1::/32.
fn allow6_prefixes(n: u32) -> Vec<IpNet> {
    (0..n)
        .map(|i| {
            net6(
                (u128::from(0xfd11_0001u32) << 96) | (u128::from(i) << 64),
                64,
            )
        })
        .collect()
}

/// `n` distinct random /32s (a fixed seed), none in 10.111.0.0/16, then 10.111.128.0/17.
pub fn deny_prefixes(n: u32) -> Vec<Ipv4Net> {
    let mut seen = BTreeSet::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    while seen.len() < n as usize - 1 {
        let a = Ipv4Addr::from_bits(xorshift(&mut x) as u32);
        if a.octets()[..2] != [10, 111] {
            seen.insert(Ipv4Net::host(a));
        }
    }
    let mut v: Vec<Ipv4Net> = seen.into_iter().collect();
    v.push("10.111.128.0/17".parse().unwrap());
    v
}

/// The client's /24 and `n - 1` other /24s of 100.64.0.0/10.
fn allow_prefixes(n: u32) -> Vec<Ipv4Net> {
    let mut v = vec!["10.111.0.0/24".parse().unwrap()];
    for i in 0..n - 1 {
        let a = Ipv4Addr::from_bits(Ipv4Addr::new(100, 64, 0, 0).to_bits() + (i << 8));
        v.push(Ipv4Net::new(a, 24).unwrap());
    }
    v
}

fn vip_spec(policy: SourcePolicy) -> VipSpec {
    VipSpec {
        key: ServiceKey {
            addr: VIP.into(),
            port: PORT,
            proto: Proto::Tcp,
        },
        forward: Forward::L2,
        backends: (0..3)
            .map(|i| BackendSpec {
                addr: backend(i).into(),
                weight: 1,
            })
            .collect(),
        icmp_echo: true,
        policy,
    }
}

/// The kernel's figure for a map's memory (`memlock` in /proc/self/fdinfo of its descriptor).
fn memlock(fd: i32) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Slab memory of the machine (kB): the tries' nodes come from it.
fn slab_kb() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("Slab:")
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
}

/// The door's rows; `p` is (runs, repeat, batches, batch) as for the per-packet part.
pub fn rows(p: (usize, u32, usize, usize)) -> Result<(Vec<Row>, String)> {
    let (runs, repeat, batches, batch) = p;
    let s = "Door (issue 13), per packet";
    let c = "Door (issue 13), control plane";
    xlb_tests::cpu::pin_to_one()?;
    let ifindex = xlb::util::interface_index("lb0")?;
    let mut dp = Dataplane::load_unattached(1 << 18, Some(LB))?;
    dp.apply_vip(&vip_spec(SourcePolicy::default()), &BTreeSet::new())?;
    let established = |dp: &Dataplane, sport: u16| -> Result<Vec<u8>> {
        let prog = dp.balancer()?;
        test_run(
            prog,
            ifindex,
            &tcp_frame(CLIENT, VIP, sport, PORT, SYN, 0),
            1,
        )?;
        let ack = tcp_frame(CLIENT, VIP, sport, PORT, ACK, 0);
        test_run(prog, ifindex, &ack, 1)?;
        Ok(ack)
    };
    let pass = tcp_frame(CLIENT, Ipv4Addr::new(10, 111, 1, 99), 1000, 22, SYN, 0);
    let denied = tcp_frame(DENIED, VIP, 1000, PORT, SYN, 0);

    // Without lists.
    println!("bench: door, per packet without lists");
    let ack = established(&dp, 1000)?;
    let prog = dp.balancer()?;
    let est_plain = repeated(prog, ifindex, &ack, XDP_TX, runs, repeat, "established")?;
    let est_plain_call = per_call(
        prog,
        ifindex,
        &same_frame(&ack, batches, batch),
        XDP_TX,
        "est",
    )?;
    let new_plain_call = per_call(
        prog,
        ifindex,
        &syns(CLIENT, PORT, 2000, batches, batch),
        XDP_TX,
        "new flow",
    )?;
    let pass_plain = repeated(prog, ifindex, &pass, XDP_PASS, runs, repeat, "pass")?;

    // The lists: a million deny-list prefixes (batches into the other half, then the switch, as
    // `xlb deny load` does), ten thousand allow-list prefixes on the VIP.
    println!("bench: door, loading {DENY_PREFIXES} deny-list prefixes");
    let deny = deny_prefixes(DENY_PREFIXES);
    let mut maps = dp.deny_maps()?;
    let slab_before = slab_kb();
    let t = Instant::now();
    maps.fill(1, &deny)?;
    dp.set_deny_list(1, DenyCount::of(&deny))?;
    let fill_s = t.elapsed().as_secs_f64();
    let slab_after = slab_kb();
    let memlock_mb = maps
        .fds(1)
        .iter()
        .map(|fd| memlock(fd.as_raw_fd()))
        .sum::<Option<u64>>()
        .map(|b| b as f64 / 1e6);
    // A source that is one of the list's host entries (the hash).
    let denied_host = tcp_frame(deny[0].addr(), VIP, 1000, PORT, SYN, 0);
    let allow = allow_prefixes(ALLOW_PREFIXES);
    let t = Instant::now();
    dp.apply_vip(
        &vip_spec(SourcePolicy {
            allow_src: allow.into_iter().map(IpNet::from).collect(),
            ..Default::default()
        }),
        &BTreeSet::new(),
    )?;
    let allow_ms = t.elapsed().as_secs_f64() * 1e3;

    println!("bench: door, per packet with the lists");
    let ack = established(&dp, 1001)?;
    let prog = dp.balancer()?;
    let est_lists = repeated(
        prog,
        ifindex,
        &ack,
        XDP_TX,
        runs,
        repeat,
        "established, lists",
    )?;
    let est_lists_call = per_call(
        prog,
        ifindex,
        &same_frame(&ack, batches, batch),
        XDP_TX,
        "est, lists",
    )?;
    let new_lists_call = per_call(
        prog,
        ifindex,
        &syns(CLIENT, PORT, 20_000, batches, batch),
        XDP_TX,
        "new flow, lists",
    )?;
    let pass_lists = repeated(prog, ifindex, &pass, XDP_PASS, runs, repeat, "pass, lists")?;
    let drop_lists = repeated(prog, ifindex, &denied, XDP_DROP, runs, repeat, "denied")?;
    let drop_host = repeated(
        prog,
        ifindex,
        &denied_host,
        XDP_DROP,
        runs,
        repeat,
        "denied host",
    )?;
    if dp.stats()?.reasons["drop_deny_list"] == 0 {
        bail!("the denied SYNs were not counted as drop_deny_list");
    }

    // Emptying the old half after a load, as the agent does.
    let t = Instant::now();
    maps.clear(1, &deny)?;
    let clear_s = t.elapsed().as_secs_f64();
    dp.set_deny_list(0, DenyCount::default())?;

    let base = Spread::of(&est_plain);
    let with = Spread::of(&est_lists);
    let added = with.median - base.median;
    let new_added = median(&new_lists_call) - median(&new_plain_call);
    let lists = format!("{DENY_PREFIXES} deny + {ALLOW_PREFIXES} allow prefixes");
    let slab = match (slab_before, slab_after) {
        (Some(a), Some(b)) => format!("{:.0} MB", (b as f64 - a as f64) / 1e3),
        _ => "n/a".into(),
    };
    let mem = memlock_mb.map_or("n/a".into(), |m| format!("{m:.0} MB"));
    let rows = vec![
        Row::new(s, "established packet, L2, no lists", "ns/pkt", base),
        Row::new(s, format!("established packet, L2, {lists}"), "ns/pkt", with)
            .vs("no lists", &base)
            .note(format!("{added:+.1} ns: the flow's cached checks hold (policy generation)")),
        Row::new(s, "established packet, per call, no lists", "ns/call", Spread::of(&est_plain_call)),
        Row::new(s, format!("established packet, per call, {lists}"), "ns/call", Spread::of(&est_lists_call))
            .vs("no lists", &Spread::of(&est_plain_call)),
        Row::new(s, "new-flow SYN, per call, no lists", "ns/call", Spread::of(&new_plain_call)),
        Row::new(s, format!("new-flow SYN, per call, {lists}"), "ns/call", Spread::of(&new_lists_call))
            .vs("no lists", &Spread::of(&new_plain_call))
            .note(format!("{new_added:+.0} ns: the deny-list, VIP deny and allow lookups")),
        Row::new(s, "non-VIP packet (XDP_PASS), empty deny list", "ns/pkt", Spread::of(&pass_plain)),
        Row::new(s, format!("non-VIP packet (XDP_PASS), {DENY_PREFIXES} deny prefixes"), "ns/pkt", Spread::of(&pass_lists))
            .vs("empty list", &Spread::of(&pass_plain)),
        Row::new(s, format!("denied SYN to the VIP (XDP_DROP), {DENY_PREFIXES} deny prefixes, source in the /17"), "ns/pkt", Spread::of(&drop_lists))
            .note("its /24 bit clear (no hash lookup), then the trie (one prefix)"),
        Row::new(s, format!("denied SYN to the VIP (XDP_DROP), {DENY_PREFIXES} deny prefixes, source a listed /32"), "ns/pkt", Spread::of(&drop_host))
            .note("its /24 bit set, then a hit in the host-entry hash"),
        Row::new(c, format!("deny list: {DENY_PREFIXES} prefixes into the inactive half (batches) + switch"), "s", Spread::of(&[fill_s]))
            .note(format!("kernel memory: memlock {mem} (hash + /24 bitmap + trie, one half), slab grew by {slab} (the machine is shared: slab is noisy)")),
        Row::new(c, format!("deny list: {DENY_PREFIXES} prefixes out of the old half (batches)"), "s", Spread::of(&[clear_s])),
        Row::new(c, format!("VIP with {ALLOW_PREFIXES} allow prefixes applied (apply_vip)"), "ms", Spread::of(&[allow_ms])),
    ];
    // The IPv6 rows after IPv4's of each section.
    let (v6_packet, v6_control) = ipv6_rows(&mut dp, ifindex, (runs, repeat, batches, batch))?;
    let mut rows = rows;
    let at = rows
        .iter()
        .position(|r| r.section == c)
        .unwrap_or(rows.len());
    rows.splice(at..at, v6_packet);
    rows.extend(v6_control);
    let verdict = if added <= 15.0 {
        "**met**"
    } else {
        "**missed**"
    };
    let targets = format!(
        "\n- Established packet with {lists} loaded: {added:+.1} ns over the same packet without lists \
         ({:.1} vs {:.1} ns/pkt, medians); target ≤ 15 ns: {verdict}.\n",
        with.median, base.median
    );
    Ok((rows, targets))
}

/// The IPv6 rows: new-flow SYNs of an IPv6 `l2` VIP per call, without lists and with
/// `DENY6_PREFIXES` IPv6 deny-list prefixes and `ALLOW_PREFIXES` IPv6 allow-list prefixes on the
/// VIP (the client's /64 among them), side by side; and a denied IPv6 SYN. Per-packet rows,
/// then control-plane rows.
fn ipv6_rows(
    dp: &mut Dataplane,
    ifindex: u32,
    (runs, repeat, batches, batch): (usize, u32, usize, usize),
) -> Result<(Vec<Row>, Vec<Row>)> {
    let s = "Door (issue 13), per packet";
    let mut spec = vip_spec(SourcePolicy::default());
    spec.key.addr = VIP6.into();
    spec.backends = backend_specs6();
    dp.apply_vip(&spec, &BTreeSet::new())?;
    let syns6 = |first: u16| -> Vec<Vec<Vec<u8>>> {
        (0..batches)
            .map(|b| {
                (0..batch)
                    .map(|i| tcp_frame6(CLIENT6, first + (b * batch + i) as u16, PORT, SYN))
                    .collect()
            })
            .collect()
    };
    println!("bench: door, IPv6 new flows without lists");
    let prog = dp.balancer()?;
    let plain = per_call(prog, ifindex, &syns6(30_000), XDP_TX, "new flow v6")?;

    println!("bench: door, loading {DENY6_PREFIXES} IPv6 deny-list prefixes");
    let deny6 = deny6_prefixes(DENY6_PREFIXES);
    let mut maps = dp.deny_maps()?;
    let t = Instant::now();
    maps.fill(1, &deny6)?;
    dp.set_deny_list(1, DenyCount::of(&deny6))?;
    let fill_s = t.elapsed().as_secs_f64();
    spec.policy.allow_src = allow6_prefixes(ALLOW_PREFIXES);
    dp.apply_vip(&spec, &BTreeSet::new())?;
    println!("bench: door, IPv6 new flows with the lists");
    let prog = dp.balancer()?;
    let lists = per_call(prog, ifindex, &syns6(40_000), XDP_TX, "new flow v6, lists")?;
    let denied = tcp_frame6(DENIED6, 1000, PORT, SYN);
    let drop = repeated(prog, ifindex, &denied, XDP_DROP, runs, repeat, "denied v6")?;
    maps.clear(1, &deny6)?;
    dp.set_deny_list(0, DenyCount::default())?;

    let added = median(&lists) - median(&plain);
    let what = format!("{DENY6_PREFIXES} IPv6 deny + {ALLOW_PREFIXES} IPv6 allow prefixes");
    let packet = vec![
        Row::new(
            s,
            "new-flow SYN, IPv6, per call, no lists",
            "ns/call",
            Spread::of(&plain),
        ),
        Row::new(
            s,
            format!("new-flow SYN, IPv6, per call, {what}"),
            "ns/call",
            Spread::of(&lists),
        )
        .vs("no lists", &Spread::of(&plain))
        .note(format!(
            "{added:+.0} ns: the IPv6 deny-list trie, then the VIP's IPv6 allow list"
        )),
        Row::new(
            s,
            format!("denied IPv6 SYN to the VIP (XDP_DROP), {DENY6_PREFIXES} IPv6 deny prefixes"),
            "ns/pkt",
            Spread::of(&drop),
        )
        .note("one lookup in the IPv6 trie (source in a /32)"),
    ];
    let control = vec![Row::new(
        "Door (issue 13), control plane",
        format!("deny list: {DENY6_PREFIXES} IPv6 prefixes into the inactive half + switch"),
        "s",
        Spread::of(&[fill_s]),
    )];
    Ok((packet, control))
}
