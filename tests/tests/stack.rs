//! The seed's whole stack behind xlb (issue 14): HTTPS end to end with checks that verify the
//! certificate, and PostgreSQL primary/replicas behind a write VIP (`postgres:primary`) and a
//! read VIP (`postgres:replica`, the primary as its `--backup`), with a real client (pgbench)
//! across a failover and the never-two-primaries rule.
//!
//! The database cases share one test bed (one function, in steps), to keep CI time down.

use serde_json::Value;
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};
use xlb_tests::{
    backend::{BIG, HTTPS_EXPIRED_PORT, HTTPS_WRONG_NAME_PORT},
    http,
    netns::require_root,
    pgload::{READ_ONLY_SQLSTATE, first_success_after, pgbench_init, start_write_load},
    pki::{OTHER_NAME, SERVICE_NAME},
    postgres::{CHECK_MD5_USER, CHECK_PASSWORD, CHECK_USER, PgClient},
    stack::{
        READ_VIP, WRITE_VIP, configure_databases, configure_web, curl_https, https_backend, pg_who,
        read_vip, web_vip, write_vip,
    },
    testbed::{METRICS_PORT, Testbed, TestbedOptions},
    topology::{LB1_ADDR, db_addr},
    xlb::{backend_entry, backend_state},
};

/// Generous bound for a state change to show in `xlb backend list`.
const STATE_WAIT: Duration = Duration::from_secs(10);
/// The target: promotion to the first write through the VIP, with a 200 ms interval.
const FAILOVER_TARGET: Duration = Duration::from_secs(1);
/// What the test insists on (the target is reported; a loaded 2-core CI machine gets headroom).
const FAILOVER_LIMIT: Duration = Duration::from_secs(3);

/// A measured result, on the real stderr (libtest captures `eprintln!` of passing tests).
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn wait_state(bed: &Testbed, vip: &str, addr: Ipv4Addr, state: &str) -> Duration {
    let start = Instant::now();
    xlb_tests::cmd::wait_for(&format!("{addr} {state} in {vip}"), STATE_WAIT, || {
        let list = bed.client().json(&["backend", "list", vip])?;
        Ok((backend_state(&list, addr)? == state).then(|| start.elapsed()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{}",
            bed.client()
                .ok(&["backend", "list", vip])
                .unwrap_or_default()
        )
    })
}

fn entry(bed: &Testbed, vip: &str, addr: Ipv4Addr) -> Value {
    let list = bed.client().json(&["backend", "list", vip]).unwrap();
    backend_entry(&list, addr).unwrap().clone()
}

fn last_detail(e: &Value) -> String {
    e["last_check"]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

// ------------------------------------------------------------------------------------------------
// HTTPS

#[test]
fn https_end_to_end_and_checks_that_verify() {
    require_root();
    let mut options = TestbedOptions::new("ipip", "generic");
    options.https = true;
    let bed = Testbed::up(options).expect("bringing up the test bed");
    let xlb = bed.client();
    configure_web(xlb, &bed).unwrap();
    for i in 1..=3 {
        wait_state(
            &bed,
            &web_vip(),
            bed.backend_addr(&format!("be{i}")).unwrap(),
            "up",
        );
    }
    let e = entry(&bed, &web_vip(), bed.backend_addr("be1").unwrap());
    assert_eq!(last_detail(&e), "HTTP 200", "{e}");

    // A client verifies the certificate for the service's name (SNI), through the VIP; a 1 MiB
    // download arrives intact; new connections go round robin.
    let file = bed.dir.path().join("https-1m.bin");
    curl_https(&bed, "/1m", &["-o", &file.to_string_lossy()])
        .unwrap()
        .checked()
        .unwrap();
    let got = std::fs::read(&file).unwrap();
    assert_eq!(got.len(), BIG);
    bed.check_content(&got).unwrap();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..6 {
        *tally.entry(https_backend(&bed).unwrap()).or_default() += 1;
    }
    assert_eq!(tally.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);

    // be2 checked on its wrong-name port, be3 on the expired one: each down with the reason.
    for (name, port, reason) in [
        (
            "be2",
            HTTPS_WRONG_NAME_PORT,
            format!("certificate not valid for name {SERVICE_NAME} (it is for {OTHER_NAME})"),
        ),
        ("be3", HTTPS_EXPIRED_PORT, "certificate expired".to_string()),
    ] {
        let addr = bed.backend_addr(name).unwrap().to_string();
        xlb.ok(&["backend", "del", &web_vip(), &addr]).unwrap();
        let port = port.to_string();
        // Its own check: the VIP's (CA, name) on another port.
        xlb.ok(&["backend", "add", &web_vip(), &addr, "--check-port", &port])
            .unwrap();
        let took = wait_state(&bed, &web_vip(), addr.parse().unwrap(), "down");
        let e = entry(&bed, &web_vip(), addr.parse().unwrap());
        assert_eq!(last_detail(&e), reason, "{e}");
        report(&format!(
            "HTTPS {name} on port {port}: down after {took:?}: {reason}"
        ));
    }
    let log = bed.agent_log();
    assert!(
        log.contains("certificate expired") && log.contains("certificate not valid for name"),
        "{log}"
    );
    let table = xlb.ok(&["backend", "list", &web_vip()]).unwrap();
    assert!(table.contains("certificate expired"), "{table}");
    for _ in 0..3 {
        assert_eq!(https_backend(&bed).unwrap(), "be1");
    }
}

// ------------------------------------------------------------------------------------------------
// PostgreSQL

/// `n` new connections through the read VIP: how many each server answered.
fn read_spread(bed: &Testbed, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let who = pg_who(bed, READ_VIP).unwrap();
        *out.entry(who).or_default() += 1;
    }
    out
}

fn metrics_text(bed: &Testbed) -> String {
    let target = SocketAddr::from((LB1_ADDR, METRICS_PORT));
    let r = bed
        .ns("lb1")
        .enter(move || http::get(target, "/metrics", Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&r.body).into_owned()
}

#[test]
fn postgres_roles_backup_failover_and_never_two_primaries() {
    require_root();
    let mut options = TestbedOptions::new("ipip", "generic");
    options.backends = 0;
    options.databases = 3;
    options.metrics = true;
    let started = Instant::now();
    let mut bed = Testbed::up(options).expect("bringing up the test bed");
    report(&format!(
        "PG bed (3 servers, streaming) up in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let (db1, db2, db3) = (db_addr(1), db_addr(2), db_addr(3));
    let pg = bed.pg.as_ref().unwrap();
    let md5_file = pg.check_md5_password_file();
    let pw_file = pg.check_password_file();

    // The check's login failures name the server's reason: a throwaway VIP (port 5433, checks
    // on 5432) whose backends log in as the md5 user with the wrong password file, and with none.
    let xlb = bed.client().clone();
    let probe_vip = format!("{READ_VIP}:5433");
    let (scram, md5) = (pw_file.to_string_lossy(), md5_file.to_string_lossy());
    xlb.ok(&[
        "vip",
        "add",
        &probe_vip,
        "--check",
        "postgres",
        "--check-port",
        "5432",
        "--check-user",
        CHECK_MD5_USER,
        "--check-password-file",
        &scram,
        "--interval",
        "200ms",
    ])
    .unwrap();
    xlb.ok(&["backend", "add", &probe_vip, &db1.to_string()])
        .unwrap();
    xlb.ok(&[
        "backend",
        "add",
        &probe_vip,
        &db2.to_string(),
        "--check-user",
        CHECK_USER,
        "--check-password-file",
        "",
    ])
    .unwrap();
    wait_state(&bed, &probe_vip, db1, "down");
    wait_state(&bed, &probe_vip, db2, "down");
    assert_eq!(
        last_detail(&entry(&bed, &probe_vip, db1)),
        format!("password authentication failed for user \"{CHECK_MD5_USER}\"")
    );
    assert_eq!(
        last_detail(&entry(&bed, &probe_vip, db2)),
        "the server asks for a password and none is configured"
    );
    xlb.ok(&["vip", "del", &probe_vip]).unwrap();

    // --- Roles through the VIPs. db3 is checked as the md5 user (its own check on the read VIP).
    configure_databases(&xlb, &bed).unwrap();
    xlb.ok(&["backend", "del", &read_vip(), &db3.to_string()])
        .unwrap();
    // Its own check: the read VIP's with another user and password file.
    xlb.ok(&[
        "backend",
        "add",
        &read_vip(),
        &db3.to_string(),
        "--check-user",
        CHECK_MD5_USER,
        "--check-password-file",
        &md5,
    ])
    .unwrap();
    wait_state(&bed, &write_vip(), db1, "up");
    // db3's check logs in with md5 for real (the password is stored as md5 on the server).
    let log = bed.pg.as_ref().unwrap().server("db3").log();
    assert!(
        log.contains(&format!("identity=\"{CHECK_MD5_USER}\" method=md5")),
        "no md5 login in db3's log"
    );
    for db in [db2, db3] {
        wait_state(&bed, &write_vip(), db, "down");
        wait_state(&bed, &read_vip(), db, "up");
    }
    let e = entry(&bed, &write_vip(), db2);
    assert_eq!(last_detail(&e), "replica, not a primary", "{e}");
    let e = entry(&bed, &read_vip(), db1);
    assert_eq!(e["backup"], true, "{e}");
    assert_eq!(e["state"], "up", "{e}");
    assert_eq!(e["reason"], "backup, standing by", "{e}");
    assert_eq!(last_detail(&e), "primary (timeline 1)", "{e}");
    assert_eq!(pg_who(&bed, WRITE_VIP).unwrap(), "db1 primary");
    // Borrows only the topology, so the servers can be stopped and started meanwhile.
    let cli = bed.topo.ns("cli");
    let w = PgClient::check_user(WRITE_VIP)
        .query(cli, "select pg_is_in_recovery()")
        .unwrap();
    let r = PgClient::check_user(READ_VIP)
        .query(cli, "select pg_is_in_recovery()")
        .unwrap();
    assert_eq!((w.as_str(), r.as_str()), ("f", "t"));
    let spread = read_spread(&bed, 30);
    report(&format!("PG read spread, 30 connections: {spread:?}"));
    assert_eq!(
        spread,
        BTreeMap::from([
            ("db2 replica".to_string(), 15),
            ("db3 replica".to_string(), 15)
        ])
    );

    // --- The password is nowhere but in its file: state file, log, lists, metrics.
    let state_dir = bed.dir.path().join("lb1").join("state");
    let mut places: Vec<(String, String)> = std::fs::read_dir(&state_dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.path().display().to_string(),
                std::fs::read_to_string(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        places
            .iter()
            .any(|(_, t)| t.contains(&*pw_file.to_string_lossy())),
        "the state file should keep the password file's path: {places:?}"
    );
    places.push(("agent log".into(), bed.agent_log()));
    places.push(("metrics".into(), metrics_text(&bed)));
    for args in [
        vec!["vip", "list"],
        vec!["vip", "list", "--json"],
        vec!["backend", "list", &*read_vip()],
        vec!["backend", "list", &*read_vip(), "--json"],
        vec!["stats", "--json"],
    ] {
        places.push((args.join(" "), xlb.ok(&args).unwrap()));
    }
    for (place, text) in &places {
        assert!(
            !text.contains(CHECK_PASSWORD) && !text.contains("md5-secret"),
            "a check password appears in {place}"
        );
    }

    // --- Every replica down: the read VIP falls back to its backup, the primary.
    {
        let pg = bed.pg.as_mut().unwrap();
        pg.server_mut("db2").stop().unwrap();
        pg.server_mut("db3").stop().unwrap();
    }
    let fell_back = Instant::now();
    wait_state(&bed, &read_vip(), db2, "down");
    wait_state(&bed, &read_vip(), db3, "down");
    let e = entry(&bed, &read_vip(), db1);
    assert_eq!(
        e["reason"], "backup, serving: no regular backend is up",
        "{e}"
    );
    let spread = read_spread(&bed, 4);
    report(&format!(
        "PG every replica down: reads on the backup after {:.2}s: {spread:?}",
        fell_back.elapsed().as_secs_f64()
    ));
    assert_eq!(spread, BTreeMap::from([("db1 primary".to_string(), 4)]));
    bed.pg.as_mut().unwrap().server_mut("db3").start().unwrap();
    wait_state(&bed, &read_vip(), db3, "up");
    let spread = read_spread(&bed, 4);
    assert_eq!(
        spread,
        BTreeMap::from([("db3 replica".to_string(), 4)]),
        "reads must leave the primary"
    );
    bed.pg.as_mut().unwrap().server_mut("db2").start().unwrap();
    wait_state(&bed, &read_vip(), db2, "up");
    bed.pg.as_ref().unwrap().wait_streaming(2).unwrap();

    // --- Failover under load: pgbench and a write probe through the write VIP; db1 stops, db2
    // is promoted.
    pgbench_init(cli, &PgClient::bench(WRITE_VIP)).unwrap();
    let (probe_writes, load) = start_write_load(
        cli,
        &PgClient::bench(WRITE_VIP),
        Duration::from_millis(20),
        Duration::from_secs(30),
    );
    thread::sleep(Duration::from_millis(2500));
    let stopped = Instant::now();
    bed.pg.as_mut().unwrap().server_mut("db1").stop().unwrap();
    let promoted = Instant::now();
    bed.pg.as_ref().unwrap().server("db2").promote().unwrap();
    bed.pg
        .as_ref()
        .unwrap()
        .server("db2")
        .wait_primary(Duration::from_secs(10))
        .unwrap();
    wait_state(&bed, &write_vip(), db2, "up");
    // Give the load time to run on the new primary.
    thread::sleep(Duration::from_millis(3000));
    let runs = load.stop().unwrap();
    let attempts = probe_writes.stop().unwrap();
    let first = first_success_after(&attempts, promoted)
        .unwrap_or_else(|| panic!("no write through the VIP after the promotion: {attempts:?}"))
        .clone();
    let failover = first.end.duration_since(promoted);
    let failed: Vec<&String> = attempts
        .iter()
        .filter_map(|a| a.outcome.as_ref().err())
        .collect();
    let late_failures: Vec<_> = attempts
        .iter()
        .filter(|a| a.start >= first.end && a.outcome.is_err())
        .collect();
    let read_only_writes = failed
        .iter()
        .filter(|e| e.starts_with(READ_ONLY_SQLSTATE))
        .count();
    let before: Vec<_> = runs.iter().filter(|r| r.end <= stopped).collect();
    let after: Vec<_> = runs.iter().filter(|r| r.start >= first.end).collect();
    let tx_before: u64 = before.iter().map(|r| r.processed).sum();
    let tx_after: u64 = after.iter().map(|r| r.processed).sum();
    let failed_after: u64 = after.iter().map(|r| r.failed).sum();
    let aborted_after = after.iter().filter(|r| !r.clean()).count();
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &failed {
        *reasons.entry(f.as_str()).or_default() += 1;
    }
    report(&format!(
        "PG FAILOVER: promotion -> first write through the VIP {:.0} ms (target {} ms; db1 stopped \
         {:.0} ms before the promotion); write probe every 20 ms: {} writes, {} failed {reasons:?}; \
         pgbench: {} runs, {tx_before} transactions before the stop in {} runs, {tx_after} after \
         the first write in {} runs with {failed_after} failed and {aborted_after} unclean; \
         {} runs in between (the outage: they end at once, connection refused); writes that \
         reached a read-only server: {}",
        failover.as_secs_f64() * 1000.0,
        FAILOVER_TARGET.as_millis(),
        promoted.duration_since(stopped).as_secs_f64() * 1000.0,
        attempts.len(),
        failed.len(),
        runs.len(),
        before.len(),
        after.len(),
        runs.len() - before.len() - after.len(),
        read_only_writes + runs.iter().filter(|r| r.hit_read_only()).count(),
    ));
    assert!(
        failover <= FAILOVER_LIMIT,
        "first write {failover:?} after the promotion"
    );
    assert!(
        late_failures.is_empty(),
        "writes failed after the first success: {late_failures:?}"
    );
    assert!(
        !after.is_empty() && tx_after > 0,
        "no pgbench run after the failover: {runs:?}"
    );
    assert_eq!(
        (failed_after, aborted_after),
        (0, 0),
        "pgbench after the failover: {after:?}"
    );
    assert_eq!(
        read_only_writes, 0,
        "a write reached a replica: {reasons:?}"
    );
    for r in &runs {
        assert!(
            !r.hit_read_only(),
            "pgbench reached a read-only server: {r:?}"
        );
    }
    assert!(
        before.iter().all(|r| r.clean()),
        "pgbench before the failover: {before:?}"
    );
    assert_eq!(pg_who(&bed, WRITE_VIP).unwrap(), "db2 primary");

    // --- The old primary comes back as a primary: the write VIP stays on db2.
    bed.pg.as_mut().unwrap().server_mut("db1").start().unwrap();
    let conflict = xlb_tests::cmd::wait_for("the two-primaries conflict", STATE_WAIT, || {
        let e = entry(&bed, &write_vip(), db1);
        Ok((e["reason"] == format!("another primary is serving: {db2}")).then_some(e))
    })
    .unwrap();
    assert_eq!(conflict["state"], "down", "{conflict}");
    assert_eq!(last_detail(&conflict), "primary (timeline 1)", "{conflict}");
    let e = entry(&bed, &write_vip(), db2);
    assert_eq!(
        (e["state"].as_str(), last_detail(&e).as_str()),
        (Some("up"), "primary (timeline 2)")
    );
    for _ in 0..5 {
        assert_eq!(pg_who(&bed, WRITE_VIP).unwrap(), "db2 primary");
    }
    thread::sleep(Duration::from_millis(1000));
    let warnings: Vec<String> = bed
        .agent_log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("report primary"))
        .map(str::to_string)
        .collect();
    report(&format!("PG two primaries: {warnings:?}"));
    assert_eq!(warnings.len(), 1, "one warning per change: {warnings:?}");
    assert!(
        warnings[0].contains(&db1.to_string()) && warnings[0].contains(&db2.to_string()),
        "{warnings:?}"
    );
    let metrics = metrics_text(&bed);
    let line = format!(
        "xlb_vip_primary_conflict{{proto=\"tcp\",vip=\"{}\"}} 1",
        write_vip()
    );
    assert!(
        metrics.contains(&line),
        "no `{line}` in the metrics:\n{metrics}"
    );
}
