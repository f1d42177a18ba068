//! Self-test of the test bed, without xlb: the topology routes cli ↔ backends through rtr (over
//! IPv4 and IPv6), real
//! nginx serves `/`, `/1m` and `/upload` on a backend's own address, the UDP service answers from
//! the VIP, and the guards remove every namespace and process — also when the test panics.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};
use xlb_tests::{
    backend::{BIG, Backend, UDP_PORT, big_content, udp_query},
    cmd::run_timeout,
    netns::{self, TempDir, require_root},
    topology::{
        CLI_ADDR, LB1_ADDR, LB1_ADDR6, LB2_ADDR, Topology, TopologyOptions, VIP, VIP6,
        backend_addr, twin6,
    },
};

fn ours(prefix: &str) -> Vec<String> {
    netns::list()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect()
}

fn curl(topo: &Topology, args: &[&str]) -> xlb_tests::cmd::Output {
    let mut cmd = topo.ns("cli").command("curl");
    cmd.args(["-sS", "--max-time", "5"]).args(args);
    run_timeout(&mut cmd, Duration::from_secs(15)).expect("curl runs")
}

#[test]
fn topology_routes_and_nginx_serves_directly() {
    require_root();
    let topo = Topology::build(TopologyOptions {
        backends: 2,
        lb2: true,
        ..Default::default()
    })
    .expect("topology");
    let prefix = topo.prefix().to_string();
    assert_eq!(
        ours(&prefix).len(),
        6,
        "cli, rtr, lb1, lb2, be1, be2 expected"
    );
    let dir = TempDir::new(&prefix).expect("temp dir");
    let content = big_content();
    let be1 = topo.ns("be1");
    let mut backend = Backend::start_http(
        be1,
        "be1",
        backend_addr(1),
        &dir.path().join("be1"),
        &content,
    )
    .expect("nginx on be1");

    // Routed path cli → rtr → br0 → be1, and the reply back.
    let out = curl(&topo, &[&format!("http://{}/", backend_addr(1))]);
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, "be1\n");
    // The same over IPv6, to be1's twin address (nginx listens on both families).
    let out = curl(
        &topo,
        &["-g", &format!("http://[{}]/", twin6(backend_addr(1)))],
    );
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, "be1\n");
    // Both VIPs are routed via lb1, and both follow route_vip.
    assert!(topo.vip_route().unwrap().contains(&LB1_ADDR.to_string()));
    assert!(
        topo.vip6_route().unwrap().contains(&LB1_ADDR6.to_string()),
        "{}",
        topo.vip6_route().unwrap()
    );
    topo.route_vip(&[LB1_ADDR, LB2_ADDR]).unwrap();
    let route6 = topo.vip6_route().unwrap();
    assert!(
        route6.contains(&LB1_ADDR6.to_string()) && route6.contains(&twin6(LB2_ADDR).to_string()),
        "{route6}"
    );

    let file = dir.path().join("dl");
    let out = curl(
        &topo,
        &[
            "-o",
            &file.to_string_lossy(),
            &format!("http://{}/1m", backend_addr(1)),
        ],
    );
    assert!(out.success(), "{out:?}");
    assert!(std::fs::read(&file).unwrap() == content, "download differs");

    let up = dir.path().join("up");
    std::fs::write(&up, &content).unwrap();
    let out = curl(
        &topo,
        &[
            "-H",
            "Expect:",
            "--data-binary",
            &format!("@{}", up.display()),
            &format!("http://{}/upload", backend_addr(1)),
        ],
    );
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), format!("be1 {BIG}"));

    // The UDP service binds the VIP, so it needs the VIP on lo (xlb backend-host setup does this
    // in the end-to-end tests). Queried locally: the VIP itself is not routed to be1.
    be1.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
        .unwrap();
    be1.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])
        .unwrap();
    backend.start_udp(be1).expect("UDP service");
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let answer = be1
            .enter(move || udp_query(SocketAddr::new(vip, UDP_PORT), Duration::from_secs(2)))
            .unwrap()
            .unwrap();
        assert_eq!(answer, "be1", "{vip}");
    }

    // The root namespace has no route into the test network.
    let root_routes = xlb_tests::cmd::run("ip", &["-4", "route", "show"])
        .unwrap()
        .stdout;
    assert!(
        !root_routes.contains("10.111."),
        "root namespace routes 10.111/16: {root_routes}"
    );
    let root_routes6 = xlb_tests::cmd::run("ip", &["-6", "route", "show"])
        .unwrap()
        .stdout;
    assert!(
        !root_routes6.contains("fd11:"),
        "root namespace routes fd11::/16: {root_routes6}"
    );
    assert!(CLI_ADDR.to_string().starts_with("10.111."));

    let nginx_pid = backend.nginx_pid().expect("nginx runs");
    drop(backend);
    assert!(
        !std::path::Path::new(&format!("/proc/{nginx_pid}")).exists(),
        "nginx (pid {nginx_pid}) still running after its guard dropped"
    );
    drop(topo);
    assert!(
        ours(&prefix).is_empty(),
        "namespaces left: {:?}",
        ours(&prefix)
    );
}

#[test]
fn guards_clean_up_when_a_test_panics() {
    require_root();
    let mut prefix = String::new();
    let mut pid = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::build(TopologyOptions {
            backends: 1,
            lb2: false,
            ..Default::default()
        })
        .unwrap();
        prefix = topo.prefix().to_string();
        let dir = TempDir::new(&prefix).unwrap();
        let backend = Backend::start_http(
            topo.ns("be1"),
            "be1",
            backend_addr(1),
            &dir.path().join("be1"),
            b"x",
        )
        .unwrap();
        pid = backend.nginx_pid().expect("nginx runs");
        panic!("deliberate failure with nginx running in {prefix}");
    }));
    assert!(result.is_err());
    assert!(pid > 0 && !prefix.is_empty());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "nginx survived the panic"
    );
    assert!(
        ours(&prefix).is_empty(),
        "namespaces survived the panic: {:?}",
        ours(&prefix)
    );
    assert!(
        !std::path::Path::new(&format!("/tmp/{prefix}")).exists(),
        "temp dir survived the panic"
    );
}

/// The pieces the health-check tests build on, against a backend's own address (no xlb): nginx
/// stopped and started again by pid, the continuous client recording failures and recoveries,
/// `/slow` taking seconds and arriving intact, and `X-Backend` naming the server in the headers.
#[test]
fn nginx_restarts_and_the_continuous_client_sees_it() {
    use std::time::Instant;
    use xlb_tests::{
        backend::{HTTP_PORT, SLOW_RATE},
        client::{ClientOptions, ContinuousClient, started_between, tally, timeline},
        http,
    };
    require_root();
    let topo = Topology::build(TopologyOptions {
        backends: 1,
        lb2: false,
        ..Default::default()
    })
    .expect("topology");
    let dir = TempDir::new(topo.prefix()).expect("temp dir");
    let content = big_content();
    let be1 = topo.ns("be1");
    let mut backend = Backend::start_http(
        be1,
        "be1",
        backend_addr(1),
        &dir.path().join("be1"),
        &content,
    )
    .expect("nginx on be1");
    let target = SocketAddr::from((backend_addr(1), HTTP_PORT));

    let client = ContinuousClient::start(topo.ns("cli"), target, ClientOptions::default());
    std::thread::sleep(Duration::from_millis(300));
    let first_pid = backend.nginx_pid().expect("nginx runs");
    let stopped_at = Instant::now();
    backend.stop_http().expect("stopping nginx");
    let stopped = Instant::now();
    assert!(!backend.http_running());
    assert!(
        !std::path::Path::new(&format!("/proc/{first_pid}")).exists(),
        "nginx (pid {first_pid}) still there after stop_http"
    );
    std::thread::sleep(Duration::from_millis(300));
    let restart_at = Instant::now();
    backend.restart_http(be1).expect("restarting nginx");
    let restarted = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let requests = client.stop().expect("client results");
    let end = requests.last().expect("some requests").start;

    // A request in flight at the moment of the stop may fail either way: not counted.
    let before: Vec<_> = started_between(&requests, requests[0].start, stopped_at)
        .into_iter()
        .filter(|r| r.end < stopped_at)
        .collect();
    let down = started_between(&requests, stopped, restart_at);
    let after = started_between(&requests, restarted, end + Duration::from_millis(1));
    let all: Vec<_> = requests.iter().collect();
    let context = timeline(&all, stopped_at);
    // 300 ms at one request per 20 ms: about 15 in each phase.
    for (phase, reqs, expect) in [
        ("before the stop", &before, "be1"),
        ("while stopped", &down, "error"),
        ("after the restart", &after, "be1"),
    ] {
        assert!(reqs.len() >= 5, "{phase}: only {} requests", reqs.len());
        let t = tally(reqs.iter().copied());
        assert_eq!(
            t.keys().collect::<Vec<_>>(),
            [expect],
            "{phase}: {t:?}\n{context}"
        );
    }
    assert!(
        down.iter()
            .all(|r| r.outcome.as_ref().unwrap_err().contains("refused")),
        "a stopped nginx refuses connections:\n{context}"
    );
    assert_ne!(backend.nginx_pid(), Some(first_pid));
    assert_eq!(backend.pids().len(), 2, "both nginx instances are recorded");

    // /slow: the whole 1 MiB, intact, at the configured rate; the backend is named in the headers.
    let start = Instant::now();
    let body = topo
        .ns("cli")
        .enter(move || -> anyhow::Result<Vec<u8>> {
            let stream = http::open(target, "/slow", Duration::from_secs(2))?;
            anyhow::ensure!(stream.status == 200, "HTTP {}", stream.status);
            anyhow::ensure!(
                stream.header("x-backend") == Some("be1"),
                "X-Backend: {:?}",
                stream.header("x-backend")
            );
            stream.body(Duration::from_secs(15))
        })
        .unwrap()
        .expect("GET /slow");
    let took = start.elapsed();
    assert!(body == content, "/slow body differs ({} bytes)", body.len());
    let nominal = Duration::from_secs_f64(BIG as f64 / SLOW_RATE as f64);
    assert!(
        took >= nominal * 3 / 4 && took < nominal * 3,
        "/slow took {took:?}, nominal {nominal:?}"
    );

    let pids = backend.pids();
    drop(backend);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still running"
        );
    }
}
