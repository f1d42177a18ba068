//! The seed's stack on the test bed, shared by the stack tests and `demo --stack`: the web service
//! over HTTPS (checked `https:/` with the test CA and the service name), and PostgreSQL behind a
//! write VIP (`postgres:primary`) and a read VIP (`postgres:replica`, db1 as its `--backup`
//! checked `postgres:primary`). Every check runs every 200 ms, down after 3 failures, up after 2
//! passes ([`FAST_CHECK_TIMING`]): the failover target is set for a 200 ms interval.

use crate::{
    backend::HTTPS_PORT,
    cmd::Output,
    pki::SERVICE_NAME,
    postgres::{CHECK_USER, PG_PORT, PgClient},
    testbed::{FAST_CHECK_TIMING, Testbed},
    topology::{VIP, VIP2, db_addr},
    xlb::Xlb,
};
use anyhow::{Context, Result, bail, ensure};
use std::{net::Ipv4Addr, path::Path};

/// The write VIP's address (port [`PG_PORT`]).
pub const WRITE_VIP: Ipv4Addr = VIP;
/// The read VIP's address: another address, since with direct server return the VIP's port is
/// the servers' port, 5432 for both.
pub const READ_VIP: Ipv4Addr = VIP2;

/// `ADDR:PORT` of the HTTPS VIP.
pub fn web_vip() -> String {
    format!("{VIP}:{HTTPS_PORT}")
}

/// `ADDR:5432` of the write VIP.
pub fn write_vip() -> String {
    format!("{WRITE_VIP}:{PG_PORT}")
}

/// `ADDR:5432` of the read VIP.
pub fn read_vip() -> String {
    format!("{READ_VIP}:{PG_PORT}")
}

/// The HTTPS check: `GET /` verified with the test CA for the service's name.
pub fn https_check(ca: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--check",
        "https:/",
        "--tls-ca",
        &ca.to_string_lossy(),
        "--tls-sni",
        SERVICE_NAME,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(FAST_CHECK_TIMING.iter().map(|s| s.to_string()));
    args
}

/// A PostgreSQL check (`postgres`, `postgres:primary`, `postgres:replica`) as [`CHECK_USER`].
pub fn pg_check(kind: &str, password_file: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--check",
        kind,
        "--check-user",
        CHECK_USER,
        "--check-password-file",
        &password_file.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(FAST_CHECK_TIMING.iter().map(|s| s.to_string()));
    args
}

fn ok(xlb: &Xlb, args: &[String]) -> Result<String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    xlb.ok(&args)
}

/// The HTTPS VIP with every web backend, on one agent.
pub fn configure_web(xlb: &Xlb, bed: &Testbed) -> Result<()> {
    let pki = bed.pki.as_ref().context("the bed has no test CA")?;
    let mut add = vec!["vip".to_string(), "add".into(), web_vip()];
    add.extend(https_check(&pki.ca_cert));
    ok(xlb, &add)?;
    for name in bed.backend_names() {
        let addr = bed.backend_addr(&name)?.to_string();
        xlb.ok(&["backend", "add", &web_vip(), &addr])?;
    }
    Ok(())
}

/// The write VIP (every database host, checked `postgres:primary`) and the read VIP (db2… checked
/// `postgres:replica`, db1 the backup checked `postgres:primary`), on one agent.
pub fn configure_databases(xlb: &Xlb, bed: &Testbed) -> Result<()> {
    let pg = bed.pg.as_ref().context("the bed has no databases")?;
    let pw = pg.check_password_file();
    let n = pg.servers.len();
    let mut add = vec!["vip".to_string(), "add".into(), write_vip()];
    add.extend(pg_check("postgres:primary", &pw));
    ok(xlb, &add)?;
    for i in 1..=n {
        xlb.ok(&["backend", "add", &write_vip(), &db_addr(i).to_string()])?;
    }
    let mut add = vec!["vip".to_string(), "add".into(), read_vip()];
    add.extend(pg_check("postgres:replica", &pw));
    ok(xlb, &add)?;
    for i in 2..=n {
        xlb.ok(&["backend", "add", &read_vip(), &db_addr(i).to_string()])?;
    }
    let mut backup = vec![
        "backend".to_string(),
        "add".into(),
        read_vip(),
        db_addr(1).to_string(),
        "--backup".into(),
    ];
    backup.extend(pg_check("postgres:primary", &pw));
    ok(xlb, &backup)?;
    Ok(())
}

/// `curl --cacert CA --resolve NAME:443:VIP https://NAME/path` from cli: full verification of
/// the certificate for the service's name, SNI included.
pub fn curl_https(bed: &Testbed, path: &str, extra: &[&str]) -> Result<Output> {
    let pki = bed.pki.as_ref().context("the bed has no test CA")?;
    let ca = pki.ca_cert.to_string_lossy().into_owned();
    let resolve = format!("{SERVICE_NAME}:{HTTPS_PORT}:{VIP}");
    let url = format!("https://{SERVICE_NAME}{path}");
    let mut args = vec!["--cacert", &ca, "--resolve", &resolve];
    args.extend_from_slice(extra);
    args.push(&url);
    bed.curl(&args)
}

/// One new HTTPS connection through the VIP, `GET /`: the backend that answered, after curl
/// verified the certificate (`ssl_verify_result` 0).
pub fn https_backend(bed: &Testbed) -> Result<String> {
    let out = curl_https(bed, "/", &["-w", "|%{ssl_verify_result}"])?.checked()?;
    let (name, verify) = out
        .stdout
        .trim()
        .rsplit_once('|')
        .with_context(|| format!("unexpected curl output {:?}", out.stdout))?;
    let name = name.trim();
    ensure!(
        verify == "0",
        "curl's certificate verification result {verify}"
    );
    ensure!(
        bed.backend_names().iter().any(|b| b == name),
        "unexpected answer from the VIP: {name:?}"
    );
    Ok(name.to_string())
}

/// Which database server answers a new connection to `vip`, and its role: `db2 replica`.
pub fn pg_who(bed: &Testbed, vip: Ipv4Addr) -> Result<String> {
    let out = PgClient::check_user(vip).query(
        bed.ns("cli"),
        "select current_setting('cluster_name') || ' ' || \
         case when pg_is_in_recovery() then 'replica' else 'primary' end",
    )?;
    if out.split_whitespace().count() != 2 {
        bail!("unexpected answer through {vip}: {out:?}");
    }
    Ok(out)
}
