//! The flow table from the CLI (issue 18): `xlb flows`, `xlb flows --count`, `xlb flows flush`.
//!
//! 1. Active-active bed (ipip, generic; lb2 drained with `xlb node drain`, so rtr routes the VIP
//!    via lb1 only): 30 connections through the VIP. lb1's `xlb flows` lists exactly those 30,
//!    each on the backend that answered it (nginx's `X-Backend`, matched by client port), origin
//!    `local`; `--count --by backend` gives 10/10/10; lb2 shows the same 30 as origin `peer`
//!    (installed from lb1's sync). Limits, client prefixes and bad filters (one-line errors, exit
//!    1) on the same bed.
//! 2. One LB: keep-alive connections on every backend; be1 drained, then its flows flushed. The
//!    next request on each of be1's connections reaches another backend, which resets it (and
//!    the data path counts a `midflow_miss`); every other connection's next request still
//!    reaches its backend on the same connection.
//!
//! Each prints a `FLOWS …` line with what it measured.

use serde_json::Value;
use std::{
    collections::BTreeMap,
    io::{ErrorKind, Write},
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};
use xlb_tests::{
    backend::HTTP_PORT,
    cmd::{Output, wait_for},
    http::{self, KeepAlive},
    netns::require_root,
    testbed::{Testbed, TestbedOptions},
    topology::{CLI_ADDR, VIP},
    xlb::{Xlb, event},
};

/// Connections of test 1 (the number): 10 per backend with round robin over three.
const CONNECTIONS: usize = 30;
/// Keep-alive connections of test 2: 3 per backend.
const KEEPALIVE: usize = 9;
const TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on lb1's flows reaching lb2 by sync.
const SYNC_WAIT: Duration = Duration::from_secs(5);

fn target() -> SocketAddr {
    SocketAddr::from((VIP, HTTP_PORT))
}

fn vip() -> String {
    format!("{VIP}:{HTTP_PORT}")
}

/// A measured result, on the real stderr (libtest captures `eprintln!` of passing tests).
fn report(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `xlb flows ARGS --json` on `xlb`.
fn flows_json(xlb: &Xlb, args: &[&str]) -> Value {
    let mut all = vec!["flows"];
    all.extend(args);
    xlb.json(&all)
        .unwrap_or_else(|e| panic!("xlb {}: {e:#}", all.join(" ")))
}

/// client port → (backend, origin) of a `xlb flows --json` answer.
fn by_port(list: &Value) -> BTreeMap<u16, (Ipv4Addr, String)> {
    list["flows"]
        .as_array()
        .unwrap_or_else(|| panic!("no flows array: {list}"))
        .iter()
        .map(|f| {
            let port = f["client_port"].as_u64().expect("client_port") as u16;
            let backend = f["backend"].as_str().expect("backend").parse().unwrap();
            (port, (backend, f["origin"].as_str().unwrap().to_string()))
        })
        .collect()
}

/// `--count --by ...` groups as key → flows.
fn groups(count: &Value) -> BTreeMap<String, u64> {
    count["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("no groups: {count}"))
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap().to_string(),
                g["flows"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn assert_one_line_error(out: &Output, mentions: &str) {
    let err = out.stderr.trim();
    assert_eq!(out.code(), Some(1), "`{}`: {out:?}", out.command);
    assert_eq!(err.lines().count(), 1, "`{}`: {err:?}", out.command);
    assert!(
        err.starts_with("xlb: error: "),
        "`{}`: {err:?}",
        out.command
    );
    assert!(
        err.contains(mentions),
        "`{}`: {err:?} lacks {mentions:?}",
        out.command
    );
}

#[test]
fn flows_are_listed_counted_and_show_their_origin() {
    require_root();
    let bed = Testbed::up(TestbedOptions::new("ipip", "generic").active_active())
        .expect("bringing up the active-active test bed");
    // Every connection through lb1 (the bed announces the VIP from both by BGP).
    bed.route_via_lb1_only().expect("lb2 drained");
    let (lb1, lb2) = (bed.lb_client("lb1"), bed.lb_client("lb2"));

    // 30 connections, one request each: client port → the backend nginx says answered.
    let answered: BTreeMap<u16, Ipv4Addr> = bed
        .ns("cli")
        .enter(|| {
            (0..CONNECTIONS)
                .map(|_| {
                    let s = http::open(target(), "/", TIMEOUT)?;
                    let port = s.local_port().expect("local port");
                    let name = s.header("x-backend").unwrap_or_default().to_string();
                    s.body(TIMEOUT)?;
                    Ok((port, name))
                })
                .collect::<anyhow::Result<Vec<(u16, String)>>>()
        })
        .unwrap()
        .expect("30 requests through the VIP")
        .into_iter()
        .map(|(port, name)| (port, bed.backend_addr(&name).unwrap()))
        .collect();
    assert_eq!(answered.len(), CONNECTIONS, "30 distinct client ports");

    // lb1: exactly these 30, on the backends that answered, chosen here.
    let t = Instant::now();
    let list = flows_json(lb1, &[&vip()]);
    let list_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(list["matched"], CONNECTIONS as u64, "{list}");
    assert_eq!(list["left_out"], 0, "{list}");
    let listed = by_port(&list);
    let want: BTreeMap<u16, (Ipv4Addr, String)> = answered
        .iter()
        .map(|(p, b)| (*p, (*b, "local".to_string())))
        .collect();
    assert_eq!(listed, want, "lb1's flows against nginx's X-Backend");
    for f in list["flows"].as_array().unwrap() {
        assert_eq!(f["client"], CLI_ADDR.to_string(), "{f}");
        assert_eq!(
            (f["vip"].as_str(), f["proto"].as_str()),
            (Some(vip().as_str()), Some("tcp"))
        );
        assert!(f["age_ms"].as_u64().unwrap() < 60_000, "{f}");
    }
    // Most recent first.
    let ages: Vec<u64> = list["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["age_ms"].as_u64().unwrap())
        .collect();
    assert!(ages.windows(2).all(|w| w[0] <= w[1]), "ages {ages:?}");

    let by_backend = groups(&flows_json(lb1, &["--count", "--by", "backend"]));
    let tenths: Vec<u64> = by_backend.values().copied().collect();
    assert_eq!(tenths, vec![10, 10, 10], "{by_backend:?}");
    let origin = groups(&flows_json(lb1, &["--count", "--by", "origin"]));
    assert_eq!(origin, BTreeMap::from([("local".to_string(), 30)]));

    // lb2: the same 30 flows, installed from lb1's sync.
    let peer_list = wait_for("lb1's flows on lb2", SYNC_WAIT, || {
        let l = flows_json(lb2, &[&vip()]);
        Ok((l["matched"] == CONNECTIONS as u64).then_some(l))
    })
    .expect("lb2 gets lb1's 30 flows");
    let want_peer: BTreeMap<u16, (Ipv4Addr, String)> = answered
        .iter()
        .map(|(p, b)| (*p, (*b, "peer".to_string())))
        .collect();
    assert_eq!(by_port(&peer_list), want_peer, "lb2's flows");
    let origin2 = groups(&flows_json(lb2, &["--count", "--by", "origin"]));
    assert_eq!(origin2, BTreeMap::from([("peer".to_string(), 30)]));

    // --limit: the most recent, and how many were left out.
    let five = flows_json(lb1, &["--limit", "5"]);
    assert_eq!(
        (five["matched"].as_u64(), five["left_out"].as_u64()),
        (Some(30), Some(25))
    );
    assert_eq!(five["flows"].as_array().unwrap().len(), 5);
    let text = lb1.ok(&["flows", "--limit", "5"]).unwrap();
    assert_eq!(text.lines().count(), 7, "header, 5 flows, summary: {text}");
    assert!(
        text.contains("30 flows matched: the 5 most recent shown, 25 left out"),
        "{text}"
    );

    // Client prefixes and protocols.
    let cli = format!("{CLI_ADDR}/32");
    assert_eq!(flows_json(lb1, &["--client", &cli])["matched"], 30);
    assert_eq!(
        flows_json(lb1, &["--client", "10.111.5.0/24"])["matched"],
        0
    );
    assert_eq!(flows_json(lb1, &["--proto", "udp"])["matched"], 0);
    let be2 = bed.backend_addr("be2").unwrap().to_string();
    let on_be2 = flows_json(lb1, &[&vip(), "--backend", &be2]);
    assert_eq!(on_be2["matched"], 10, "{on_be2}");

    // Bad filters: one line, exit 1, nothing walked.
    for (args, mentions) in [
        (
            vec!["flows", "--client", "10.111.0.0/33"],
            "malformed prefix \"10.111.0.0/33\"",
        ),
        (
            vec!["flows", "--client", "10.111.0.2/16"],
            "did you mean 10.111.0.0/16?",
        ),
        (
            vec!["flows", "10.111.100.9:80"],
            "unknown VIP 10.111.100.9:80/tcp",
        ),
        (vec!["flows", "10.111.100.1"], "missing port"),
        (
            vec!["flows", &vip(), "--backend", "10.111.1.99"],
            "10.111.1.99 is not a backend of VIP",
        ),
        (
            vec!["flows", "--backend", "10.111.1.99"],
            "not a backend of any VIP",
        ),
        (vec!["flows", "--limit", "0"], "--limit \"0\""),
        (vec!["flows", "flush"], "--all"),
        (vec!["flows", "flush", "10.111.100.9:80"], "unknown VIP"),
    ] {
        assert_one_line_error(&lb1.run(&args).unwrap(), mentions);
    }
    assert_eq!(
        flows_json(lb1, &["--count"])["matched"],
        30,
        "nothing was flushed"
    );
    report(&format!(
        "FLOWS list: 30 connections through lb1 listed with their backends (origin local), 10/10/10 by backend, the same 30 on lb2 as origin peer; `xlb flows` round trip {list_ms:.1} ms"
    ));
}

#[test]
fn flush_moves_a_drained_backends_keepalive_connections() {
    require_root();
    let bed = Testbed::up(TestbedOptions::new("ipip", "generic")).expect("test bed");
    let xlb = bed.client().clone();
    let be1 = bed.backend_addr("be1").unwrap();

    // Keep-alive connections, one request each so far: 3 on each backend (round robin).
    let mut conns: Vec<(KeepAlive, String)> = bed
        .ns("cli")
        .enter(|| {
            (0..KEEPALIVE)
                .map(|_| {
                    let mut c = KeepAlive::connect(target(), TIMEOUT)?;
                    let r = c.get("/")?;
                    let name = r.header("x-backend").unwrap_or_default().to_string();
                    Ok((c, name))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .unwrap()
        .expect("keep-alive connections through the VIP");
    let on_be1: Vec<u16> = conns
        .iter()
        .filter(|(_, b)| b == "be1")
        .map(|(c, _)| c.local_port())
        .collect();
    assert_eq!(
        on_be1.len(),
        KEEPALIVE / 3,
        "round robin: {:?}",
        conns.iter().map(|c| &c.1).collect::<Vec<_>>()
    );

    // No new flows for be1, then its flows go.
    xlb.ok(&["backend", "drain", &vip(), &be1.to_string()])
        .unwrap();
    let midflow_before = event(&xlb.stats().unwrap(), "midflow_miss").unwrap();
    let flush = flows_json(&xlb, &["flush", "--backend", &be1.to_string(), &vip()]);
    assert_eq!(flush["matched"], on_be1.len() as u64, "{flush}");
    assert_eq!(flush["flushed"], on_be1.len() as u64, "{flush}");
    let text_after = flows_json(&xlb, &["--backend", &be1.to_string()]);
    assert_eq!(
        text_after["matched"], 0,
        "be1's flows are gone: {text_after}"
    );

    // be1's connections: the next request goes to another backend, which resets it.
    let mut resets = 0;
    for (c, name) in conns.iter_mut().filter(|(_, b)| b == "be1") {
        match c.get("/") {
            Err(e) => {
                let kind = e
                    .chain()
                    .find_map(|c| c.downcast_ref::<std::io::Error>())
                    .map(std::io::Error::kind);
                assert_eq!(kind, Some(ErrorKind::ConnectionReset), "{name}: {e:#}");
                resets += 1;
            }
            Ok(r) => panic!(
                "a flushed connection answered by {:?} on the same connection",
                r.header("x-backend")
            ),
        }
    }
    // Their flows point elsewhere now: the reset came from their new backend. A packet from the
    // middle of a connection without a flow entry is held in the embryonic table, like a SYN,
    // until the connection's next packet (issue 13: a flood of lone packets stays out of the
    // flow table); the reset connection sends none, so none of them is in the flow table.
    let now = by_port(&flows_json(
        &xlb,
        &["--client", &CLI_ADDR.to_string(), "--limit", "100"],
    ));
    for port in &on_be1 {
        assert!(
            now.get(port).is_none_or(|(backend, _)| *backend != be1),
            "port {port} still on be1: {now:?}"
        );
    }
    let stats = xlb.stats().unwrap();
    let midflow = event(&stats, "midflow_miss").unwrap() - midflow_before;
    assert!(midflow >= on_be1.len() as u64, "midflow_miss +{midflow}");
    assert!(
        event(&stats, "embryonic_new").unwrap() >= on_be1.len() as u64,
        "{stats}"
    );

    // Every other connection: the same backend, on the same connection.
    for (c, name) in conns.iter_mut().filter(|(_, b)| b != "be1") {
        let r = c
            .get("/")
            .unwrap_or_else(|e| panic!("{name}'s connection: {e:#}"));
        assert_eq!(r.header("x-backend"), Some(name.as_str()));
    }
    // A new connection of a reset client lands on another backend (be1 drained).
    let again = bed.new_connection().unwrap();
    assert_ne!(again, "be1");

    let stats = xlb.stats().unwrap();
    assert_eq!(stats["flows_flushed"], on_be1.len() as u64, "{stats}");
    let line = xlb
        .ok(&[
            "flows",
            "flush",
            "--client",
            &format!("{CLI_ADDR}/32"),
            &vip(),
        ])
        .unwrap();
    assert!(line.starts_with("flushed "), "{line}");
    drop(conns);
    report(&format!(
        "FLOWS flush: {} keep-alive connections of drained be1 flushed: {resets} reset by their new backend (midflow_miss +{midflow}), {} others kept their backends",
        on_be1.len(),
        KEEPALIVE - on_be1.len()
    ));
}
