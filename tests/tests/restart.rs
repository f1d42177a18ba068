//! Hitless restarts (issue 11): the data path is pinned in bpffs and outlives its agent, so an
//! agent killed with SIGKILL, stopped with SIGTERM, replaced by a build whose data path has
//! another flow-table layout, or told to reload a changed config file never costs a connection.
//!
//! One test bed for all phases (CI time): three nginx backends behind an `l2` VIP, generic XDP,
//! the agent driven by a config file. Across each phase a client opens a new connection every
//! 30 ms while nine long downloads (`/long`, ~16 s) are in flight: no request fails, no download
//! breaks, `midflow_miss` stays 0, counters keep rising, and round robin is exact afterwards.
//! Between the phases, a backend that is down before a restart is still down after it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};
use xlb_tests::{
    backend::HTTP_PORT,
    client::{ClientOptions, ContinuousClient, Request, started_between},
    cmd::run_timeout,
    downloads::LongDownloads,
    netns::require_root,
    testbed::{Testbed, TestbedOptions},
    topology::{HOST_IFACE, VIP, backend_addr},
    xlb::{backend_counters, event, find_vip, has_xdp, reason, xlb_bin},
};

/// Downloads in flight across each phase.
const DOWNLOADS: usize = 9;
/// `/long` takes about 16 s; a broken one fails long before this.
const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(40);

/// The other build (`--features layout-test`: `FlowValue` has one more field, FLOWS is layout
/// version 3 and EMBRYOS, which holds `FlowValue`s too, version 2): `$XLB_UPGRADE_BIN`, which
/// `cargo xtask test` sets, else where xtask puts it.
fn upgrade_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XLB_UPGRADE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable");
    // target/debug/deps/restart-… → target/layout-test/xlb
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test runs from target/<profile>/deps");
    let bin = target.join("layout-test").join("xlb");
    assert!(
        bin.exists(),
        "the layout-test build of xlb is missing ({}): run `cargo xtask test`, which builds it",
        bin.display()
    );
    bin
}

/// The configuration the bed's CLI made, as a file (`--config`), plus `extra` TOML.
fn config_text(http_interval: &str, extra: &str) -> String {
    let backends: String = (1..=3)
        .map(|i| format!("[[vip.backend]]\naddress = \"{}\"\n", backend_addr(i)))
        .collect();
    format!(
        "[[vip]]\naddress = \"{VIP}:{HTTP_PORT}\"\nforward = \"l2\"\n\
         [vip.check]\nkind = \"http\"\npath = \"/\"\ninterval = \"{http_interval}\"\ntimeout = \"150ms\"\nrise = 2\nfall = 3\n\
         {backends}\
         [[vip]]\naddress = \"{VIP}:5353\"\nproto = \"udp\"\nforward = \"l2\"\n{backends}{extra}"
    )
}

fn target() -> SocketAddr {
    SocketAddr::from((VIP, HTTP_PORT))
}

fn client_options() -> ClientOptions {
    ClientOptions {
        every: Duration::from_millis(30),
        max_duration: Duration::from_secs(90),
        ..ClientOptions::default()
    }
}

/// The HTTP VIP's `packets`, and the `midflow_miss` event, from `xlb stats`.
fn counters(bed: &Testbed) -> (u64, u64) {
    let stats = bed.client().stats().expect("xlb stats");
    let vip = find_vip(&stats, VIP, HTTP_PORT, "tcp").expect("the HTTP VIP in stats");
    (
        vip["packets"].as_u64().expect("packets"),
        event(&stats, "midflow_miss").expect("midflow_miss"),
    )
}

/// One restart with downloads in flight and the client running: how long the new agent took to
/// answer; checks that the counters went on from where they were.
fn phase(
    bed: &mut Testbed,
    name: &str,
    restart: impl FnOnce(&mut Testbed) -> Duration,
) -> Duration {
    let (packets_before, _) = counters(bed);
    let t = Instant::now();
    let ready = restart(bed);
    let (packets_after, midflow) = counters(bed);
    assert!(
        packets_after >= packets_before,
        "{name}: the VIP's packet counter went back from {packets_before} to {packets_after}"
    );
    println!(
        "RESTART {name}: new agent answering after {:.0} ms ({:.0} ms for the whole step); VIP packets {packets_before} -> {packets_after}; midflow_miss {midflow}",
        ready.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    ready
}

fn check_downloads(name: &str, downloads: LongDownloads, phases_done: Instant) {
    let finished = downloads.finish().expect("downloads");
    assert_eq!(finished.len(), DOWNLOADS);
    for f in &finished {
        assert!(
            f.outcome.is_ok(),
            "{name}: the download from {} (port {}) broke: {:?}",
            f.backend,
            f.client_port,
            f.outcome
        );
        assert!(
            f.finished_at > phases_done,
            "{name}: a download finished before the restarts were over: not in flight across them"
        );
    }
}

fn failures(requests: &[Request]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.failed())
        .map(|r| format!("{:?}", r.outcome))
        .collect()
}

#[test]
fn kill_term_upgrade_and_reload_are_hitless() {
    require_root();
    let upgrade = upgrade_bin();
    let mut bed =
        Testbed::up(TestbedOptions::new("l2", "generic").with_fast_checks()).expect("test bed");
    let config = bed.dir.path().join("xlb.toml");
    std::fs::write(&config, config_text("200ms", "")).unwrap();
    bed.set_agent_args("lb1", &["--config", &config.to_string_lossy()]);
    let content = Arc::new(bed.content.clone());

    // Batch 1: SIGKILL + start, then SIGTERM + start.
    let client = ContinuousClient::start(bed.ns("cli"), target(), client_options());
    let downloads = LongDownloads::open(
        bed.ns("cli"),
        target(),
        "/long",
        DOWNLOADS,
        content.clone(),
        DOWNLOAD_DEADLINE,
    )
    .expect("opening the downloads");
    phase(&mut bed, "sigkill", |bed| {
        bed.kill_and_restart_agent("lb1")
            .expect("SIGKILL and start")
    });
    thread::sleep(Duration::from_secs(1));
    phase(&mut bed, "sigterm", |bed| {
        let started = bed.restart_agent("lb1").expect("SIGTERM and start");
        let _ = started;
        bed.agent_ready_after("lb1")
    });
    let done = Instant::now();
    check_downloads("sigkill/sigterm", downloads, done);
    let requests = client.stop().expect("client");
    assert_eq!(
        failures(&requests),
        Vec::<String>::new(),
        "failed requests across SIGKILL and SIGTERM"
    );
    println!(
        "RESTART sigkill+sigterm: {} requests, 0 failed",
        requests.len()
    );

    // A backend that is down before a restart is still down after it.
    bed.stop_backend("be2").expect("stopping nginx on be2");
    bed.wait_backend_state("be2", "down", Duration::from_secs(5))
        .expect("be2 down");
    let client = ContinuousClient::start(bed.ns("cli"), target(), client_options());
    thread::sleep(Duration::from_millis(300));
    let restarted = Instant::now();
    bed.kill_and_restart_agent("lb1")
        .expect("SIGKILL and start with be2 down");
    let answered = Instant::now();
    assert_eq!(
        bed.backend_state("be2").unwrap(),
        "down",
        "be2 after the restart"
    );
    thread::sleep(Duration::from_secs(1));
    let requests = client.stop().expect("client");
    let first_second = started_between(&requests, restarted, answered + Duration::from_secs(1));
    assert!(
        first_second.len() >= 10,
        "only {} requests in the first second",
        first_second.len()
    );
    for r in &first_second {
        assert!(
            !r.answered_by("be2") && !r.failed(),
            "a request in the first second after the restart: {:?}",
            r.outcome
        );
    }
    println!(
        "RESTART backend-down: be2 still down after the restart; {} requests in its first second, none to be2, none failed",
        first_second.len()
    );
    bed.start_backend("be2").expect("nginx on be2 again");
    bed.wait_backend_state("be2", "up", Duration::from_secs(5))
        .expect("be2 back up");

    // Batch 2: upgrade to the other build (its FLOWS has another layout), then a reload.
    let client = ContinuousClient::start(bed.ns("cli"), target(), client_options());
    let downloads = LongDownloads::open(
        bed.ns("cli"),
        target(),
        "/long",
        DOWNLOADS,
        content,
        DOWNLOAD_DEADLINE,
    )
    .expect("opening the downloads");
    phase(&mut bed, "upgrade", |bed| {
        bed.stop_lb_agent("lb1").expect("SIGTERM the old build");
        bed.start_agent_with("lb1", &upgrade)
            .expect("starting the new build");
        bed.agent_ready_after("lb1")
    });
    let log = bed.agent_log();
    let migrated: Vec<&str> = log.lines().filter(|l| l.contains("upgrade: ")).collect();
    // The second build's layouts are the next versions of this build's.
    let (flows, embryos) = (lb_common::layout::FLOWS, lb_common::layout::EMBRYOS);
    let flows_step = format!("FLOWS: layout v{flows} → v{}", flows + 1);
    let embryos_step = format!("EMBRYOS: layout v{embryos} → v{}", embryos + 1);
    assert!(
        migrated.iter().any(|l| l.contains(&flows_step)),
        "the new build did not migrate the flow table ({flows_step}):\n{log}"
    );
    assert!(
        migrated.iter().any(|l| l.contains(&embryos_step)),
        "the new build did not migrate the embryonic table ({embryos_step}):\n{log}"
    );
    for line in &migrated {
        println!(
            "RESTART upgrade migrated: {}",
            line.split("upgrade: ").nth(1).unwrap_or(line)
        );
    }
    thread::sleep(Duration::from_secs(1));
    std::fs::write(
        &config,
        config_text(
            "250ms",
            &format!(
                "[[vip]]\naddress = \"{VIP}:8080\"\n[[vip.backend]]\naddress = \"{}\"\n",
                backend_addr(1)
            ),
        ),
    )
    .unwrap();
    let reloaded = bed.client().ok(&["reload"]).expect("xlb reload");
    println!("RESTART reload: {}", reloaded.trim());
    assert!(
        reloaded.contains("1 VIPs added") && reloaded.contains("1 changed"),
        "{reloaded}"
    );
    let done = Instant::now();
    check_downloads("upgrade/reload", downloads, done);
    let requests = client.stop().expect("client");
    assert_eq!(
        failures(&requests),
        Vec::<String>::new(),
        "failed requests across the upgrade and the reload"
    );
    println!(
        "RESTART upgrade+reload: {} requests, 0 failed",
        requests.len()
    );

    // Afterwards: no flow ever missed its entry, and round robin is exact.
    let stats = bed.client().stats().unwrap();
    assert_eq!(
        event(&stats, "midflow_miss").unwrap(),
        0,
        "midflow_miss: {stats}"
    );
    println!(
        "RESTART totals: midflow_miss 0, drop_migrating {}",
        reason(&stats, "drop_migrating").unwrap()
    );
    // Round robin exact: the new flows of 30 more connections spread with at most one between
    // any two backends. (Not "10 each": after a thousand connections the client's source ports
    // wrap, and a connection from a port whose earlier flow is still in the table is that flow,
    // on its backend, not a new one.)
    let before = backend_counters(&stats, VIP, HTTP_PORT, "tcp", "new_flows").unwrap();
    let tally = bed.tally_new_connections(30).expect("30 new connections");
    assert_eq!(tally.values().sum::<usize>(), 30, "{tally:?}");
    let after = backend_counters(
        &bed.client().stats().unwrap(),
        VIP,
        HTTP_PORT,
        "tcp",
        "new_flows",
    )
    .unwrap();
    let new: Vec<u64> = after.iter().map(|(b, n)| n - before[b]).collect();
    let (min, max) = (new.iter().min().unwrap(), new.iter().max().unwrap());
    assert!(
        max - min <= 1 && new.iter().sum::<u64>() >= 3,
        "new flows per backend {new:?} (connections answered: {tally:?})"
    );
    println!("RESTART round robin afterwards: new flows per backend {new:?}");

    // Bad input: the default build cannot read the new build's flow table and says so, and the
    // running data path is untouched.
    bed.stop_agent().expect("SIGTERM the new build");
    refuse_downgrade(&bed);
    assert_eq!(
        bed.tally_new_connections(3)
            .unwrap()
            .values()
            .sum::<usize>(),
        3
    );
    bed.detach_lb("lb1").expect("xlb detach");
}

/// The default build over the layout-test build's data path: exit 1, one line naming the map
/// and `xlb detach`; the program stays attached.
fn refuse_downgrade(bed: &Testbed) {
    let dir = bed.dir.path().join("lb1");
    let mut cmd = bed.ns("lb1").command(xlb_bin());
    cmd.args(["agent", "--iface", HOST_IFACE, "--socket"])
        .arg(dir.join("xlb.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--bpffs")
        .arg(dir.join("bpffs"))
        .env("RUST_LOG", "warn");
    let out = run_timeout(&mut cmd, Duration::from_secs(20)).expect("running the old build");
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("xlb: error: incompatible data path state")
            && last.contains(&format!(
                "FLOWS in layout version {}",
                lb_common::layout::FLOWS + 1
            ))
            && last.contains("xlb detach"),
        "{}",
        out.stderr
    );
    assert!(
        has_xdp(bed.ns("lb1"), HOST_IFACE).unwrap(),
        "the refusal detached the data path"
    );
    assert!(Path::new(&dir.join("bpffs/xlb")).exists());
}
