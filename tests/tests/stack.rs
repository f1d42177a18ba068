//! The seed's whole stack behind xlb (issue 14): HTTPS on the web backends with a test CA, and
//! PostgreSQL primary/replicas behind a write VIP and a read VIP.

use std::{net::SocketAddr, path::PathBuf, time::Duration};
use xlb::{
    pg_probe::{PgRole, PgStatus, PgTarget, probe},
    tls_check::{TlsTarget, certificate_reason},
};
use xlb_tests::{
    backend::{HTTPS_EXPIRED_PORT, HTTPS_PORT, HTTPS_WRONG_NAME_PORT},
    netns::require_root,
    pgload::{PgbenchLoop, WriteProbe, pgbench_init},
    pki::SERVICE_NAME,
    postgres::{CHECK_MD5_USER, CHECK_USER, PG_PORT, PgClient},
    testbed::{Testbed, TestbedOptions},
    topology::{VIP, VIP2, backend_addr, db_addr},
};

/// The stack's test bed before any database-aware check: plain TCP checks, so only the plumbing
/// is under test (HTTPS with verification through the VIP; both VIPs reach PostgreSQL by DSR).
#[test]
fn stack_bed_plumbing() {
    require_root();
    let mut options = TestbedOptions::new("ipip", "generic");
    options.https = true;
    options.databases = 2;
    let bed = Testbed::up(options).expect("bringing up the test bed");
    let xlb = bed.client();
    let https_vip = format!("{VIP}:{HTTPS_PORT}");
    xlb.ok(&["vip", "add", &https_vip]).unwrap();
    xlb.ok(&["backend", "add", &https_vip, "10.111.1.11"])
        .unwrap();
    let ca = bed.pki.as_ref().unwrap().ca_cert.clone();
    let out = bed
        .curl(&[
            "--cacert",
            &ca.to_string_lossy(),
            "--resolve",
            &format!("{SERVICE_NAME}:{HTTPS_PORT}:{VIP}"),
            &format!("https://{SERVICE_NAME}/"),
        ])
        .unwrap();
    assert_eq!(out.checked().unwrap().stdout.trim(), "be1");

    // xlb's https-check client from lb1 against be1's three TLS ports, verified with the test CA
    // and the service name.
    for (port, want) in [
        (HTTPS_PORT, Ok("be1".to_string())),
        (
            HTTPS_WRONG_NAME_PORT,
            Err(format!(
                "certificate not valid for name {SERVICE_NAME} (it is for other.xlb.test)"
            )),
        ),
        (HTTPS_EXPIRED_PORT, Err("certificate expired".to_string())),
    ] {
        let target = TlsTarget {
            addr: SocketAddr::from((backend_addr(1), port)),
            sni: Some(SERVICE_NAME.into()),
            ca: Some(ca.clone()),
            verify: true,
        };
        assert_eq!(https_from_lb1(&bed, target), want, "port {port}");
    }

    for (vip, db) in [(VIP, 1), (VIP2, 2)] {
        let v = format!("{vip}:{PG_PORT}");
        xlb.ok(&["vip", "add", &v]).unwrap();
        xlb.ok(&["backend", "add", &v, &db_addr(db).to_string()])
            .unwrap();
    }
    let cli = bed.ns("cli");
    let w = PgClient::check_user(VIP)
        .query(
            cli,
            "select current_setting('cluster_name') || ' ' || pg_is_in_recovery()",
        )
        .unwrap();
    assert_eq!(w, "db1 false");
    let r = PgClient::check_user(VIP2)
        .query(
            cli,
            "select current_setting('cluster_name') || ' ' || pg_is_in_recovery()",
        )
        .unwrap();
    assert_eq!(r, "db2 true");

    // The load helpers through the write VIP: pgbench's tables, then a write probe and
    // back-to-back pgbench runs for two seconds, all clean.
    let bench = PgClient::bench(VIP);
    pgbench_init(cli, &bench).unwrap();
    let probe = WriteProbe::start(
        cli,
        bench.clone(),
        Duration::from_millis(50),
        Duration::from_secs(10),
    );
    let load = PgbenchLoop::start(cli, bench, Duration::from_secs(2));
    let runs = load.wait().unwrap();
    let attempts = probe.stop().unwrap();
    assert!(
        !runs.is_empty() && runs.iter().all(|r| r.clean()),
        "{runs:?}"
    );
    assert!(
        runs.iter().map(|r| r.processed).sum::<u64>() > 50,
        "{runs:?}"
    );
    assert!(
        attempts.len() > 10 && attempts.iter().all(|a| a.outcome.is_ok()),
        "{attempts:?}"
    );

    let pg = bed.pg.as_ref().unwrap();
    let scram = pg.check_password_file();
    let md5 = pg.check_md5_password_file();
    let primary = PgStatus {
        role: PgRole::Primary,
        timeline: Some(1),
    };
    let replica = PgStatus {
        role: PgRole::Replica,
        timeline: None,
    };
    let cases = [
        (1, CHECK_USER, Some(scram.clone()), Ok(primary)),
        (2, CHECK_USER, Some(scram.clone()), Ok(replica)),
        (1, CHECK_MD5_USER, Some(md5.clone()), Ok(primary)),
        (
            1,
            CHECK_MD5_USER,
            Some(scram.clone()),
            Err(format!(
                "password authentication failed for user \"{CHECK_MD5_USER}\""
            )),
        ),
        (
            2,
            CHECK_USER,
            None,
            Err("the server asks for a password and none is configured".to_string()),
        ),
    ];
    for (db, user, file, want) in cases {
        let got = probe_from_lb1(&bed, pg_target(db, user, file));
        assert_eq!(got, want, "db{db} as {user}");
    }
    // The md5 login really was md5: the server logged the method of the hba line it matched.
    let log = pg.server("db1").log();
    assert!(
        log.contains(&format!(
            "connection authenticated: identity=\"{CHECK_MD5_USER}\" method=md5"
        )),
        "{log}"
    );
}

/// xlb's PostgreSQL probe, run from lb1 against the real servers: SCRAM and md5 logins, the role
/// of a primary (with its timeline) and of a replica, and the server's reason for a bad password.
fn probe_from_lb1(bed: &Testbed, target: PgTarget) -> Result<PgStatus, String> {
    bed.ns("lb1")
        .enter(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(probe(&target)).map_err(|e| e.to_string())
        })
        .unwrap()
}

fn pg_target(db: usize, user: &str, password_file: Option<PathBuf>) -> PgTarget {
    PgTarget {
        addr: SocketAddr::from((db_addr(db), PG_PORT)),
        user: user.into(),
        database: "postgres".into(),
        password_file,
    }
}

/// `GET /` with xlb's https-check client, run from lb1: the body, or the certificate problem.
fn https_from_lb1(bed: &Testbed, target: TlsTarget) -> Result<String, String> {
    bed.ns("lb1")
        .enter(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let client = target.client(reqwest::Client::builder()).unwrap();
            let url = format!("{}/", target.base_url());
            rt.block_on(async {
                match client.get(&url).send().await {
                    Ok(r) => Ok(r.text().await.unwrap().trim().to_string()),
                    Err(e) => Err(certificate_reason(&e).unwrap_or_else(|| e.to_string())),
                }
            })
        })
        .unwrap()
}
