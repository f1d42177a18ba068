//! Database load through a VIP, run in the client namespace, for the failover tests and the demo:
//!
//! - [`WriteProbe`]: a client that opens a new connection every few milliseconds and writes one
//!   row (attempts overlap), recording when each started and ended and what the server said (its
//!   SQLSTATE and message) — the instant writes work again after a failover, and proof of what
//!   failed.
//! - [`PgbenchLoop`]: `pgbench` (the real client) in back-to-back one-second runs. PostgreSQL 15's
//!   pgbench aborts a client on any lost connection (`-C` included), so one run cannot cross a
//!   failover; a run that starts after it must be clean.
//!
//! Both are bounded in time and stoppable.

use crate::{
    cmd::run_timeout,
    netns::Netns,
    postgres::{BENCH_DB, PgClient},
};
use anyhow::{Context, Result};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The row a write probe inserts (pgbench's history table, so `pgbench -i` made it).
const PROBE_INSERT: &str =
    "insert into pgbench_history (tid, bid, aid, delta, mtime) values (0, 0, 0, 0, now())";
/// Bound on one probe attempt (connect, authenticate, insert).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// SQLSTATE read_only_sql_transaction: a write reached a server in recovery.
pub const READ_ONLY_SQLSTATE: &str = "25006";

/// One write attempt.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub start: Instant,
    pub end: Instant,
    /// `Err("25006: cannot execute INSERT in a read-only transaction")`,
    /// `Err("connection refused")`, …
    pub outcome: Result<(), String>,
}

/// A write every `period` through a VIP, on a thread in the client namespace.
pub struct WriteProbe {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Result<Vec<Attempt>>>>>,
}

impl WriteProbe {
    /// Starts writing as `client` from `ns`, a new attempt every `period` whether or not the
    /// previous ones have ended (so one attempt whose SYN was lost, waiting a second for the
    /// retransmission, does not hide when writes work again); stops by itself after `max`.
    pub fn start(ns: &Netns, client: PgClient, period: Duration, max: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle =
            ns.spawn(move || -> Result<Vec<Attempt>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let conninfo = Arc::new(format!(
                    "{} password={}",
                    client.conninfo(),
                    client.password
                ));
                let until = Instant::now() + max;
                rt.block_on(async move {
                    let mut running = tokio::task::JoinSet::new();
                    let mut ticker = tokio::time::interval(period);
                    while !flag.load(Ordering::Relaxed) && Instant::now() < until {
                        ticker.tick().await;
                        let conninfo = conninfo.clone();
                        running.spawn(async move {
                            let start = Instant::now();
                            let outcome =
                                match tokio::time::timeout(ATTEMPT_TIMEOUT, write_once(&conninfo))
                                    .await
                                {
                                    Ok(r) => r,
                                    Err(_) => Err(format!("timeout after {ATTEMPT_TIMEOUT:?}")),
                                };
                            Attempt {
                                start,
                                end: Instant::now(),
                                outcome,
                            }
                        });
                    }
                    let mut attempts = Vec::new();
                    while let Some(a) = running.join_next().await {
                        attempts.push(a?);
                    }
                    attempts.sort_by_key(|a| a.start);
                    Ok(attempts)
                })
            });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the probe; every attempt it made.
    pub fn stop(mut self) -> Result<Vec<Attempt>> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().context("write probe already finished")?;
        crate::netns::join(handle, "write probe")
    }
}

impl Drop for WriteProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One connection, one insert, a clean close.
async fn write_once(conninfo: &str) -> Result<(), String> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .map_err(|e| describe(&e))?;
    let work = async move {
        let r = client.batch_execute(PROBE_INSERT).await;
        drop(client);
        r
    };
    let (r, _) = tokio::join!(work, connection);
    r.map_err(|e| describe(&e))
}

/// `SQLSTATE: message` for a server error, the innermost cause otherwise.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut cur: &dyn std::error::Error = e;
    while let Some(src) = cur.source() {
        cur = src;
    }
    if std::ptr::addr_eq(cur, e) {
        e.to_string()
    } else {
        format!("{e}: {cur}")
    }
}

/// The successful attempt that started at or after `after` and ended first.
pub fn first_success_after(attempts: &[Attempt], after: Instant) -> Option<&Attempt> {
    attempts
        .iter()
        .filter(|a| a.start >= after && a.outcome.is_ok())
        .min_by_key(|a| a.end)
}

/// One pgbench run.
#[derive(Clone, Debug)]
pub struct PgbenchRun {
    pub start: Instant,
    pub end: Instant,
    /// pgbench's exit code (0 clean, 2 = a client aborted); `None` if it had to be killed.
    pub exit: Option<i32>,
    /// `number of transactions actually processed`.
    pub processed: u64,
    /// `number of failed transactions` (serialization and deadlock failures only, in PG 15).
    pub failed: u64,
    /// Its `error`/`abort` lines (why a client aborted).
    pub errors: Vec<String>,
}

impl PgbenchRun {
    pub fn clean(&self) -> bool {
        self.exit == Some(0) && self.failed == 0 && self.errors.is_empty()
    }

    /// Some transaction failed because it reached a read-only server (a write on a replica).
    pub fn hit_read_only(&self) -> bool {
        self.errors
            .iter()
            .any(|e| e.contains("read-only transaction"))
    }
}

/// Back-to-back pgbench runs on a thread, until stopped or `max` has passed.
pub struct PgbenchLoop {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<PgbenchRun>>>,
}

/// Clients per run; each transaction on a new connection (`-C`), so every transaction is a new
/// flow through the load balancer.
const PGBENCH_CLIENTS: &str = "2";
/// Transactions per second per run (bounded load on a 2-core machine).
const PGBENCH_RATE: &str = "60";

impl PgbenchLoop {
    /// Starts the runs from `ns` as `client` (which must own [`BENCH_DB`], initialised with
    /// [`pgbench_init`]).
    pub fn start(ns: &Netns, client: PgClient, max: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ns_cmd = {
            let c = client;
            let name = ns.name().to_string();
            move || {
                let mut cmd = c.command_in(&name, "pgbench");
                cmd.args(["-n", "-C", "-c", PGBENCH_CLIENTS, "-j", "1", "-T", "1"])
                    .args(["-R", PGBENCH_RATE, "--failures-detailed", "-h"])
                    .arg(c.host.to_string())
                    .args(["-U", &c.user, BENCH_DB]);
                cmd
            }
        };
        let handle = std::thread::spawn(move || {
            let until = Instant::now() + max;
            let mut runs = Vec::new();
            while !flag.load(Ordering::Relaxed) && Instant::now() < until {
                let start = Instant::now();
                let out = run_timeout(&mut ns_cmd(), Duration::from_secs(10));
                let end = Instant::now();
                runs.push(match out {
                    Ok(o) => parse_run(start, end, o.code(), &format!("{}{}", o.stdout, o.stderr)),
                    Err(e) => PgbenchRun {
                        start,
                        end,
                        exit: None,
                        processed: 0,
                        failed: 0,
                        errors: vec![format!("{e:#}")],
                    },
                });
            }
            runs
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Waits until the runs end by themselves (`max` after the start); every run.
    pub fn wait(self) -> Result<Vec<PgbenchRun>> {
        self.finish(false)
    }

    /// Stops after the current run; every run.
    pub fn stop(self) -> Result<Vec<PgbenchRun>> {
        self.finish(true)
    }

    fn finish(mut self, stop: bool) -> Result<Vec<PgbenchRun>> {
        self.stop.store(stop, Ordering::Relaxed);
        let handle = self
            .handle
            .take()
            .context("pgbench loop already finished")?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("the pgbench thread panicked"))
    }
}

impl Drop for PgbenchLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn parse_run(start: Instant, end: Instant, exit: Option<i32>, out: &str) -> PgbenchRun {
    let number = |prefix: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| {
                rest.trim()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    };
    PgbenchRun {
        start,
        end,
        exit,
        processed: number("number of transactions actually processed:"),
        failed: number("number of failed transactions:"),
        errors: out
            .lines()
            .filter(|l| l.contains("error") || l.contains("abort"))
            .map(str::to_string)
            .collect(),
    }
}

/// The write load of the failover tests and the demo, through `client.host` from `ns`: a
/// [`WriteProbe`] every `period` and a [`PgbenchLoop`], both for at most `max`.
pub fn start_write_load(
    ns: &Netns,
    client: &PgClient,
    period: Duration,
    max: Duration,
) -> (WriteProbe, PgbenchLoop) {
    (
        WriteProbe::start(ns, client.clone(), period, max),
        PgbenchLoop::start(ns, client.clone(), max),
    )
}

/// `pgbench -i -s 1` through `client.host` (the write VIP): the tables, without vacuum.
pub fn pgbench_init(ns: &Netns, client: &PgClient) -> Result<()> {
    let mut cmd = client.command(ns, "pgbench");
    cmd.args(["-i", "-s", "1", "-q", "-I", "dtgp", "-h"])
        .arg(client.host.to_string())
        .args(["-U", &client.user, BENCH_DB]);
    run_timeout(&mut cmd, Duration::from_secs(60))?
        .checked()
        .context("pgbench -i")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_summaries_parse() {
        let t = Instant::now();
        let ok = "transaction type: <builtin: TPC-B (sort of)>\n\
                  number of transactions actually processed: 58\n\
                  number of failed transactions: 0 (0.000%)\n";
        let r = parse_run(t, t, Some(0), ok);
        assert_eq!((r.processed, r.failed), (58, 0));
        assert!(r.clean());
        let aborted = "pgbench: error: client 0 script 0 aborted in command 5 query 0: ERROR:  \
                       cannot execute UPDATE in a read-only transaction\n\
                       number of transactions actually processed: 3/60\n\
                       pgbench: error: Run was aborted; the above results are incomplete.\n";
        let r = parse_run(t, t, Some(2), aborted);
        assert_eq!(r.processed, 3);
        assert!(!r.clean());
        assert!(r.hit_read_only());
    }
}
