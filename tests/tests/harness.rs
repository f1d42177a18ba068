//! Self-test of the test bed, without xlb: the topology routes cli ↔ backends through rtr, real
//! nginx serves `/`, `/1m` and `/upload` on a backend's own address, the UDP service answers from
//! the VIP, and the guards remove every namespace and process — also when the test panics.

use std::{net::SocketAddr, time::Duration};
use xlb_tests::{
    backend::{BIG, Backend, UDP_PORT, big_content, udp_query},
    cmd::run_timeout,
    netns::{self, TempDir, require_root},
    topology::{CLI_ADDR, Topology, TopologyOptions, VIP, backend_addr},
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
    backend.start_udp(be1).expect("UDP service");
    let answer = be1
        .enter(|| udp_query(SocketAddr::from((VIP, UDP_PORT)), Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    assert_eq!(answer, "be1");

    // The root namespace has no route into the test network.
    let root_routes = xlb_tests::cmd::run("ip", &["-4", "route", "show"])
        .unwrap()
        .stdout;
    assert!(
        !root_routes.contains("10.111."),
        "root namespace routes 10.111/16: {root_routes}"
    );
    assert!(CLI_ADDR.to_string().starts_with("10.111."));

    let nginx_pid = backend.nginx_pid();
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
        pid = backend.nginx_pid();
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
