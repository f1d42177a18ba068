//! `cargo xtask demo --stack`: the seed's whole stack in namespaces, walked through step by step
//! with the evidence of each step printed.
//!
//! - two xlb nodes active-active: each announces the VIP addresses it can serve by BGP (BIRD on
//!   rtr, lb1 and lb2; `xlb agent --announce-table`), rtr routes both VIP addresses over the
//!   nodes that announce them (ECMP on an L4 hash; BFD takes a dead node out), and the nodes
//!   share flow state by peer sync;
//! - three nginx web servers over HTTPS, certificates from a test CA made at start;
//! - PostgreSQL 15 primary (db1) and streaming replica (db2) behind a write VIP and a read VIP;
//! - a real Prometheus server on `mon` scraping both agents.
//!
//! Steps: HTTPS round robin with the certificate verified by the client; a web server dies and
//! leaves the rotation; a load balancer dies and the connections survive; the primary dies, the
//! replica is promoted and writes follow (then the old primary comes back un-demoted: the write
//! VIP stays, the conflict is reported); Prometheus' query API shows the counters.

use crate::{
    cmd::wait_for,
    interrupt,
    pgload::{first_success_after, pgbench_init, start_write_load},
    pki::SERVICE_NAME,
    postgres::{PgClient, PgServer},
    prometheus::{Prometheus, sample_value},
    stack::{
        READ_VIP, WRITE_VIP, configure_databases, configure_web, curl_https, https_backend, pg_who,
        read_vip, web_vip, write_vip,
    },
    testbed::{METRICS_PORT, Testbed, TestbedOptions},
    topology::{LB1_ADDR, LB2_ADDR, MON_ADDR, VIPS, db_addr},
    xlb::{backend_state, counter, event, find_vip},
};
use anyhow::{Context, Result, ensure};
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// Bound on a state change showing in `xlb backend list` (lb2's: lb1 is lost in step 3, and
/// both carry the same configuration).
const STATE_WAIT: Duration = Duration::from_secs(10);
/// Parallel HTTPS downloads crossing the loss of lb1.
const DOWNLOADS: usize = 8;
const PROMETHEUS_PORT: u16 = 9090;

/// Runs the whole demo; the bed is torn down by the caller's drop.
pub fn run(xdp_mode: &str) -> Result<()> {
    let start = Instant::now();
    println!(
        "stack: namespaces cli — rtr/br0 — lb1, lb2 (xlb, peered), be1..be3 (nginx HTTPS), \
         db1, db2 (PostgreSQL 15), mon (Prometheus)"
    );
    let mut options = TestbedOptions::new("ipip", xdp_mode).active_active();
    options.https = true;
    options.databases = 2;
    options.metrics = true;
    options.monitor = true;
    let mut bed = Testbed::up(options)?;
    let result = (|| -> Result<()> {
        for lb in ["lb1", "lb2"] {
            let xlb = bed.lb_client(lb).clone();
            configure_web(&xlb, &bed)?;
            configure_databases(&xlb, &bed)?;
        }
        route_over_both(&bed)?;
        print_config(&bed)?;
        wait_state(&bed, &BOTH, &write_vip(), db_addr(1), "up")?;
        pgbench_init(bed.ns("cli"), &PgClient::bench(WRITE_VIP))?;
        let prom = Prometheus::start(
            bed.ns("mon"),
            SocketAddr::from((MON_ADDR, PROMETHEUS_PORT)),
            &[
                ("lb1", SocketAddr::from((LB1_ADDR, METRICS_PORT))),
                ("lb2", SocketAddr::from((LB2_ADDR, METRICS_PORT))),
            ],
            &bed.dir.path().join("prometheus"),
        )?;
        // Both agents scraped before anything happens, so lb1's counters are on record when it
        // is lost in step 3.
        prom.wait_targets_up(bed.ns("cli"), 2, Duration::from_secs(30))?;
        println!(
            "stack: ready in {:.1}s (namespaces {}-*, Prometheus pid {} on {MON_ADDR}:{PROMETHEUS_PORT})",
            start.elapsed().as_secs_f64(),
            bed.topo.prefix(),
            prom.pid()
        );
        https_round_robin(&bed)?;
        interrupt::check()?;
        web_server_dies(&mut bed)?;
        interrupt::check()?;
        lb_dies(&mut bed)?;
        interrupt::check()?;
        primary_dies(&mut bed)?;
        interrupt::check()?;
        old_primary_returns(&mut bed)?;
        interrupt::check()?;
        prometheus_evidence(&bed, &prom)
    })();
    if result.is_err() && interrupt::check().is_ok() {
        eprintln!("{}", bed.diagnostics());
    }
    println!("\nstack: tearing down");
    drop(bed);
    result
}

/// Both VIP addresses over both load balancers, ECMP on rtr, from BGP: each node announces a VIP
/// address once one of its VIPs there has a serving backend (the database VIPs after their
/// first PostgreSQL checks), and rtr installs one multipath route from the sessions.
fn route_over_both(bed: &Testbed) -> Result<()> {
    wait_for(
        "rtr to route both VIP addresses over lb1 and lb2 (BGP)",
        STATE_WAIT,
        || {
            for vip in VIPS {
                if bed.topo.next_hops(vip)? != [LB1_ADDR, LB2_ADDR] {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )?;
    println!("$ ip netns exec rtr ip route   # the VIPs over both load balancers (ECMP, from BGP)");
    let routes = bed.ns("rtr").ip(&["route", "show"])?;
    let mut vip_route = false;
    for line in routes.lines() {
        // A multipath route continues on indented `nexthop` lines.
        if !line.starts_with(char::is_whitespace) {
            vip_route = line.starts_with("10.111.100.");
        }
        if vip_route {
            println!("  {line}");
        }
    }
    Ok(())
}

fn heading(text: &str) {
    println!("\n=== {text}");
}

/// Both load balancers, while both run (lb1 dies in step 3).
const BOTH: [&str; 2] = ["lb1", "lb2"];

fn print_config(bed: &Testbed) -> Result<()> {
    heading("configuration (the same on lb1 and lb2)");
    println!("$ xlb vip list");
    print!("{}", bed.lb_client("lb1").ok(&["vip", "list"])?);
    Ok(())
}

/// Until every load balancer of `lbs` sees `addr` in `state`: while both run, rtr's ECMP sends
/// new connections through either, so one node's view alone says nothing about the next one.
fn wait_state(
    bed: &Testbed,
    lbs: &[&str],
    vip: &str,
    addr: std::net::Ipv4Addr,
    state: &str,
) -> Result<Duration> {
    let start = Instant::now();
    wait_for(
        &format!("{addr} to be {state} in {vip} on {}", lbs.join(" and ")),
        STATE_WAIT,
        || {
            for lb in lbs {
                let list = bed.lb_client(lb).json(&["backend", "list", vip])?;
                if backend_state(&list, addr)? != state {
                    return Ok(None);
                }
            }
            Ok(Some(start.elapsed()))
        },
    )
}

fn show_backends(bed: &Testbed, vip: &str) -> Result<()> {
    println!("$ xlb backend list {vip}");
    print!("{}", bed.lb_client("lb2").ok(&["backend", "list", vip])?);
    Ok(())
}

/// New flows of the HTTPS VIP on `lb`.
fn web_new_flows(bed: &Testbed, lb: &str) -> Result<u64> {
    let stats = bed.lb_client(lb).stats()?;
    let v = find_vip(
        &stats,
        crate::topology::VIP,
        crate::backend::HTTPS_PORT,
        "tcp",
    )
    .context("the HTTPS VIP in xlb stats")?;
    counter(v, "new_flows").context("new_flows")
}

fn https_round_robin(bed: &Testbed) -> Result<()> {
    heading("1. HTTPS through the VIP: round robin, certificate verified by the client");
    let detail = curl_https(bed, "/", &["-v"])?.checked()?;
    println!(
        "$ curl -v --cacert ca.crt --resolve {SERVICE_NAME}:443:{} https://{SERVICE_NAME}/",
        crate::topology::VIP
    );
    for line in detail.stderr.lines().filter(|l| {
        l.contains("subject:")
            || l.contains("issuer:")
            || l.contains("subjectAltName")
            || l.contains("SSL certificate verify")
            || l.contains("SSL connection using")
    }) {
        println!("  {}", line.trim_start_matches("* ").trim());
    }
    println!("  -> {}", detail.stdout.trim());
    let before = (web_new_flows(bed, "lb1")?, web_new_flows(bed, "lb2")?);
    let mut answers = Vec::new();
    for _ in 0..9 {
        interrupt::check()?;
        answers.push(https_backend(bed)?);
    }
    println!(
        "9 new HTTPS connections (each verified: ssl_verify_result 0) -> {}",
        answers.join(" ")
    );
    let after = (web_new_flows(bed, "lb1")?, web_new_flows(bed, "lb2")?);
    println!(
        "new flows of {}: lb1 +{}, lb2 +{} (rtr's ECMP hash picks the load balancer per connection)",
        web_vip(),
        after.0 - before.0,
        after.1 - before.1
    );
    Ok(())
}

fn web_server_dies(bed: &mut Testbed) -> Result<()> {
    heading("2. a web server dies and leaves the rotation");
    let addr = bed.backend_addr("be2")?;
    let pid = bed.nginx_pid("be2").context("nginx on be2")?;
    println!("$ kill {pid}   # nginx on be2 ({addr})");
    bed.stop_backend("be2")?;
    let took = wait_state(bed, &BOTH, &web_vip(), addr, "down")?;
    println!(
        "be2 is down on both load balancers {:.2}s after the kill",
        took.as_secs_f64()
    );
    let answers: Result<Vec<String>> = (0..6).map(|_| https_backend(bed)).collect();
    let answers = answers?;
    ensure!(
        !answers.iter().any(|a| a == "be2"),
        "be2 answered while down: {answers:?}"
    );
    println!(
        "6 new HTTPS connections -> {}   (be2 skipped)",
        answers.join(" ")
    );
    show_backends(bed, &web_vip())?;
    bed.start_backend("be2")?;
    let took = wait_state(bed, &BOTH, &web_vip(), addr, "up")?;
    println!(
        "nginx on be2 started again: up {:.2}s later",
        took.as_secs_f64()
    );
    Ok(())
}

/// One `curl` download running in the background.
struct Download {
    child: std::process::Child,
    file: std::path::PathBuf,
    headers: std::path::PathBuf,
}

fn lb_dies(bed: &mut Testbed) -> Result<()> {
    heading("3. a load balancer dies; the connections it carried survive on the other one");
    let pki = bed.pki.as_ref().context("test CA")?;
    let ca = pki.ca_cert.to_string_lossy().into_owned();
    let before = (web_new_flows(bed, "lb1")?, web_new_flows(bed, "lb2")?);
    let mut downloads = Vec::new();
    for i in 0..DOWNLOADS {
        let file = bed.dir.path().join(format!("slow{i}.bin"));
        let headers = bed.dir.path().join(format!("slow{i}.headers"));
        let mut cmd = bed.ns("cli").command("curl");
        cmd.args(["-sS", "--max-time", "30", "--cacert", &ca, "--resolve"])
            .arg(format!("{SERVICE_NAME}:443:{}", crate::topology::VIP))
            .arg("-D")
            .arg(&headers)
            .arg("-o")
            .arg(&file)
            .arg(format!("https://{SERVICE_NAME}/slow"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = cmd.spawn().context("starting curl")?;
        downloads.push(Download {
            child,
            file,
            headers,
        });
    }
    println!(
        "{DOWNLOADS} HTTPS downloads of /slow (1 MiB at 256 KiB/s, ~4 s each) started through the VIP"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let carried = (
        web_new_flows(bed, "lb1")? - before.0,
        web_new_flows(bed, "lb2")? - before.1,
    );
    println!(
        "after 1 s: lb1 carries {} of them, lb2 {}; lb2 already knows lb1's flows by peer sync",
        carried.0, carried.1
    );
    println!("$ ip link set eth0 down; kill -9 <lb1's agent>   # on lb1; nobody touches rtr");
    let lost_at = Instant::now();
    bed.link_down("lb1")?;
    bed.kill_agent("lb1")?;
    bed.wait_next_hops(&[LB2_ADDR], Duration::from_secs(5))?;
    println!(
        "rtr dropped lb1 from the VIPs' route after {:.0} ms (BFD, 100 ms x 3): {}",
        lost_at.elapsed().as_secs_f64() * 1e3,
        bed.topo
            .vip_route()?
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut intact = 0;
    for (i, mut d) in downloads.into_iter().enumerate() {
        let status = crate::cmd::wait_deadline(&mut d.child, Duration::from_secs(40));
        let body = std::fs::read(&d.file).unwrap_or_default();
        let backend = std::fs::read_to_string(&d.headers)
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-backend: ")
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        let ok = status.is_some_and(|s| s.success()) && body == bed.content;
        intact += usize::from(ok);
        println!(
            "  download {}: {backend}, {} bytes, {}",
            i + 1,
            body.len(),
            if ok { "complete and intact" } else { "FAILED" }
        );
    }
    let stats = bed.lb_client("lb2").stats()?;
    println!(
        "{intact} of {DOWNLOADS} intact; lb2: midflow_miss {} (packets of flows it did not know), flow_resteered {}",
        event(&stats, "midflow_miss")?,
        event(&stats, "flow_resteered")?
    );
    ensure!(intact == DOWNLOADS, "downloads failed across lb1's loss");
    println!("lb1 stays down for the rest of the demo (Prometheus will say so)");
    Ok(())
}

fn primary_dies(bed: &mut Testbed) -> Result<()> {
    heading("4. the primary dies, the replica is promoted, writes follow");
    println!(
        "write VIP {} -> {}; read VIP {} -> {}",
        write_vip(),
        pg_who(bed, WRITE_VIP)?,
        read_vip(),
        pg_who(bed, READ_VIP)?
    );
    let cli = bed.ns("cli");
    let (probe, load) = start_write_load(
        cli,
        &PgClient::bench(WRITE_VIP),
        Duration::from_millis(25),
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let pg = bed.pg.as_mut().context("databases")?;
    println!("$ kill -INT <postmaster of db1>   # fast shutdown of the primary");
    pg.server_mut("db1").stop()?;
    println!("$ pg_ctl promote -D <db2's data>");
    let promoted = Instant::now();
    pg.server("db2").promote()?;
    pg.server("db2").wait_primary(Duration::from_secs(10))?;
    let first = wait_for(
        "a write through the VIP after the promotion",
        Duration::from_secs(10),
        || Ok(db_write_ok(bed).then_some(())),
    );
    std::thread::sleep(Duration::from_secs(2));
    let runs = load.stop()?;
    let attempts = probe.stop()?;
    first?;
    let ok_after =
        first_success_after(&attempts, promoted).context("no write after the promotion")?;
    let failed: Vec<&str> = attempts
        .iter()
        .filter_map(|a| a.outcome.as_ref().err().map(String::as_str))
        .collect();
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &failed {
        *reasons.entry(f).or_default() += 1;
    }
    println!(
        "write probe (new connection + INSERT every 25 ms): {} writes, {} failed, first write after the \
         promotion done {:.0} ms after it",
        attempts.len(),
        failed.len(),
        ok_after.end.duration_since(promoted).as_secs_f64() * 1000.0
    );
    for (reason, n) in reasons {
        println!("  {n:3} x {reason}");
    }
    println!("pgbench runs (1 s each, -C: a connection per transaction; t from the promotion):");
    print_runs(&runs, promoted);
    let read_only = attempts
        .iter()
        .filter(|a| a.outcome.as_ref().is_err_and(|e| e.starts_with("25006")))
        .count()
        + runs.iter().filter(|r| r.hit_read_only()).count();
    println!("writes that reached a read-only server at any time: {read_only}");
    println!("write VIP {} -> {}", write_vip(), pg_who(bed, WRITE_VIP)?);
    show_backends(bed, &write_vip())?;
    Ok(())
}

/// The runs, one line each, except that a stretch of runs that could not connect at all (they
/// end at once) is one line.
fn print_runs(runs: &[crate::pgload::PgbenchRun], zero: Instant) {
    let no_connection = |r: &crate::pgload::PgbenchRun| r.processed == 0 && r.exit == Some(1);
    let mut i = 0;
    while i < runs.len() {
        let r = &runs[i];
        let at = offset(r.start, zero);
        if no_connection(r) {
            let n = runs[i..].iter().take_while(|r| no_connection(r)).count();
            let last = &runs[i + n - 1];
            let mut reasons: Vec<&str> = runs[i..i + n]
                .iter()
                .filter_map(|r| r.errors.first())
                .map(|e| e.rsplit(": ").next().unwrap_or(e).trim())
                .collect();
            reasons.dedup();
            println!(
                "  t={at:+5.1}s..{:+.1}s  {n} runs could not connect ({})",
                offset(last.end, zero),
                reasons.join("; ")
            );
            i += n;
            continue;
        }
        println!(
            "  t={at:+5.1}s  transactions {:3}  failed {}  exit {}{}",
            r.processed,
            r.failed,
            r.exit.map_or("killed".to_string(), |c| c.to_string()),
            r.errors
                .first()
                .map(|e| format!("  ({})", e.trim()))
                .unwrap_or_default()
        );
        i += 1;
    }
}

/// Seconds from `zero` to `t`, negative before it.
fn offset(t: Instant, zero: Instant) -> f64 {
    t.saturating_duration_since(zero).as_secs_f64()
        - zero.saturating_duration_since(t).as_secs_f64()
}

/// One write through the write VIP.
fn db_write_ok(bed: &Testbed) -> bool {
    PgClient::bench(WRITE_VIP)
        .psql(
            bed.ns("cli"),
            "insert into pgbench_history (tid, bid, aid, delta, mtime) values (0, 0, 0, 0, now())",
        )
        .is_ok_and(|o| o.success())
}

fn old_primary_returns(bed: &mut Testbed) -> Result<()> {
    heading("5. the old primary comes back without being demoted: never two primaries");
    let pg = bed.pg.as_mut().context("databases")?;
    pg.server_mut("db1").start()?;
    println!(
        "$ postgres -D <db1's data>   # started unchanged: a second primary (timeline 1; db2 is on 2)"
    );
    let db1 = db_addr(1);
    wait_for("lb2 to report two primaries", STATE_WAIT, || {
        Ok(bed
            .agent_log_of("lb2")
            .contains("report primary")
            .then_some(()))
    })?;
    println!("write VIP {} -> {}", write_vip(), pg_who(bed, WRITE_VIP)?);
    show_backends(bed, &write_vip())?;
    for line in bed
        .agent_log_of("lb2")
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("primar"))
    {
        println!("  lb2's log: {line}");
    }
    println!("$ rebuild db1 as a replica of db2 (pg_basebackup -R), then make it a read backend");
    let pg = bed.pg.as_mut().context("databases")?;
    let server: &mut PgServer = pg.server_mut("db1");
    server.stop()?;
    server.basebackup_from(db_addr(2))?;
    server.start()?;
    for args in [
        vec!["backend", "del", &read_vip(), &db1.to_string()],
        vec!["backend", "add", &read_vip(), &db1.to_string()],
    ] {
        let line = args.join(" ");
        println!("$ xlb {line}");
        bed.lb_client("lb2").ok(&args)?;
    }
    // lb1 is gone since step 3.
    wait_state(bed, &["lb2"], &read_vip(), db1, "up")?;
    println!(
        "read VIP {} -> {}; write VIP {} -> {}",
        read_vip(),
        pg_who(bed, READ_VIP)?,
        write_vip(),
        pg_who(bed, WRITE_VIP)?
    );
    show_backends(bed, &read_vip())?;
    Ok(())
}

fn prometheus_evidence(bed: &Testbed, prom: &Prometheus) -> Result<()> {
    heading("6. Prometheus (its own query API, /api/v1/query) on the same events");
    // One more scrape after the last step.
    std::thread::sleep(Duration::from_secs(2));
    let cli = bed.ns("cli");
    for (what, q) in [
        ("scrape targets up", "up{job=\"xlb\"}".to_string()),
        (
            "new HTTPS flows per load balancer (lb1's last scrape included)",
            format!(
                "sum by (lb) (max_over_time(xlb_vip_new_flows_total{{vip=\"{}\"}}[5m]))",
                web_vip()
            ),
        ),
        (
            "write VIP backends up (lb2)",
            format!("xlb_backend_up{{vip=\"{}\",lb=\"lb2\"}}", write_vip()),
        ),
        (
            "two-primaries conflict seen in the last 5 minutes",
            "max by (vip) (max_over_time(xlb_vip_primary_conflict[5m]))".to_string(),
        ),
        (
            "new flows per backend of the write VIP on lb2: the writes moved from db1 to db2",
            format!(
                "xlb_backend_new_flows_total{{vip=\"{}\",lb=\"lb2\"}}",
                write_vip()
            ),
        ),
    ] {
        println!("$ curl '{}/api/v1/query?query={q}'   # {what}", prom.listen);
        let result = prom.query(cli, &q)?;
        if result.is_empty() {
            println!("  (no series)");
        }
        for entry in result {
            let labels: Vec<String> = entry["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| !matches!(k.as_str(), "job" | "instance" | "__name__"))
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "  {{{}}} {}",
                labels.join(", "),
                sample_value(&entry).map_or("?".into(), |v| v.to_string())
            );
        }
    }
    Ok(())
}
