//! PostgreSQL 15 in the test bed's database namespaces: a primary on db1 and streaming replicas
//! (`pg_basebackup -R`) on db2, db3, …, each listening on its host's addresses (its own and the
//! VIPs on `lo`) at port 5432.
//!
//! - PostgreSQL refuses to run as root: every server and tool runs as `postgres`, started with
//!   `setpriv` under `ip netns exec` (both exec in place, so the pid we hold is the postmaster's,
//!   stopped by that pid on drop: SIGINT, PostgreSQL's fast shutdown).
//! - Each instance has its own socket directory, given on the command line: Debian compiles in
//!   `/var/run/postgresql`, which every namespace shares, and `pg_basebackup` copies the
//!   configuration files.
//! - Test-only speed settings (`initdb -N`, `fsync=off`, small shared buffers) and data on tmpfs
//!   (`/dev/shm`) when there is one.
//!
//! Roles: [`CHECK_USER`] (LOGIN only, SCRAM verifier: what xlb's check logs in as),
//! [`CHECK_MD5_USER`] (its password stored as md5, so the md5 exchange really happens),
//! [`BENCH_USER`] owning database [`BENCH_DB`] (pgbench), and a replication role.

use crate::{
    cmd::{Output, SHORT, run_timeout, wait_for},
    netns::{Netns, PREFIX},
    process::Process,
};
use anyhow::{Context, Result, bail, ensure};
use std::{
    fs,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

/// Debian's PostgreSQL 15 binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const PG_PORT: u16 = 5432;
pub const CHECK_USER: &str = "xlbcheck";
pub const CHECK_PASSWORD: &str = "chk-secret-7d1f";
pub const CHECK_MD5_USER: &str = "xlbcheck_md5";
pub const CHECK_MD5_PASSWORD: &str = "md5-secret-93ac";
pub const BENCH_USER: &str = "xlbbench";
pub const BENCH_PASSWORD: &str = "bench-secret-5e20";
pub const BENCH_DB: &str = "xlbbench";
const REPL_USER: &str = "xlbrepl";
const REPL_PASSWORD: &str = "repl-secret-0b4e";

/// How long a server may take to accept connections after start (replicas replay first).
const PG_READY: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take.
const PG_STOP: Duration = Duration::from_secs(15);

/// Appended to the primary's postgresql.conf (replicas copy it): test-only speed settings, and
/// every connection logged so a test can see who reached which server.
const CONF: &str = "\
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 16MB
max_connections = 60
log_connections = on
log_line_prefix = '%m [%p] %q%u@%d %h '
";

/// First match wins: replication needs its own line (`all` does not match it); the md5 user gets
/// md5, everybody else SCRAM. Clients (cli), checks (the load balancers) and replicas are all in
/// 10.111.0.0/16.
const HBA: &str = "\
local   all          all                         trust
local   replication  all                         trust
host    replication  xlbrepl       10.111.0.0/16 scram-sha-256
host    all          xlbcheck_md5  10.111.0.0/16 md5
host    all          all           10.111.0.0/16 scram-sha-256
";

/// The database directory: on tmpfs when the machine has one (initdb and copies are several times
/// faster there, and steady while other jobs keep the disk busy), removed on drop.
pub struct PgDir {
    path: PathBuf,
}

impl PgDir {
    /// `/dev/shm/<prefix>-pg` (or under the temp dir), traversable by `postgres`.
    pub fn new(prefix: &str) -> Result<Self> {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = base.join(format!("{prefix}-pg"));
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PgDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes database directories of test runs that no longer exist (see [`crate::netns::sweep_stale`]).
pub fn sweep_stale_dirs(is_stale: impl Fn(&str) -> bool) {
    let Ok(entries) = fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in entries.flatten() {
        if let Some(name) = entry.file_name().to_str()
            && name.starts_with(PREFIX)
            && name.ends_with("-pg")
            && is_stale(name)
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// One PostgreSQL server in a namespace.
pub struct PgServer {
    pub name: String,
    pub addr: Ipv4Addr,
    ns: String,
    data: PathBuf,
    sock: PathBuf,
    dir: PathBuf,
    process: Option<Process>,
    /// How often it was started (names the log files).
    starts: usize,
}

/// `install -d -o postgres -g postgres -m 0700 dir`.
fn postgres_dir(dir: &Path) -> Result<()> {
    run_checked(
        Command::new("install")
            .args(["-d", "-o", "postgres", "-g", "postgres", "-m", "0700"])
            .arg(dir),
    )
    .map(drop)
}

fn run_checked(cmd: &mut Command) -> Result<Output> {
    run_timeout(cmd, SHORT)?.checked()
}

impl PgServer {
    fn new(ns: &Netns, name: &str, addr: Ipv4Addr, base: &Path) -> Result<Self> {
        let dir = base.join(name);
        postgres_dir(&dir)?;
        postgres_dir(&dir.join("sock"))?;
        Ok(Self {
            name: name.to_string(),
            addr,
            ns: ns.name().to_string(),
            data: dir.join("data"),
            sock: dir.join("sock"),
            dir,
            process: None,
            starts: 0,
        })
    }

    /// `ip netns exec <ns> setpriv … -- <PG_BIN>/program`, as postgres, from `/` (the tools
    /// complain when they cannot reach the current directory).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .args([
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
            ])
            .arg("--")
            .arg(Path::new(PG_BIN).join(program))
            .current_dir("/")
            // psql's history and rc files would be looked for in root's home.
            .env("HOME", "/");
        cmd
    }

    /// A new primary: initdb, the configuration, start, the roles and the bench database.
    pub fn init_primary(ns: &Netns, name: &str, addr: Ipv4Addr, base: &Path) -> Result<Self> {
        let mut s = Self::new(ns, name, addr, base)?;
        run_checked(
            s.command("initdb")
                .arg("-D")
                .arg(&s.data)
                .args(["-N", "-U", "postgres", "--auth-local=trust"])
                .args(["--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"])
                .arg("--no-instructions"),
        )
        .with_context(|| format!("initdb on {name}"))?;
        let conf = s.data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf)?;
        text.push_str(CONF);
        fs::write(&conf, text)?;
        fs::write(s.data.join("pg_hba.conf"), HBA)?;
        s.start()?;
        s.psql(&format!(
            "CREATE ROLE {CHECK_USER} LOGIN PASSWORD '{CHECK_PASSWORD}';
             SET password_encryption = 'md5';
             CREATE ROLE {CHECK_MD5_USER} LOGIN PASSWORD '{CHECK_MD5_PASSWORD}';
             RESET password_encryption;
             CREATE ROLE {REPL_USER} LOGIN REPLICATION PASSWORD '{REPL_PASSWORD}';
             CREATE ROLE {BENCH_USER} LOGIN PASSWORD '{BENCH_PASSWORD}';"
        ))
        .with_context(|| format!("creating the roles on {name}"))?;
        // Its own statement: CREATE DATABASE cannot run in the transaction `psql -c` makes of
        // several statements.
        s.psql(&format!("CREATE DATABASE {BENCH_DB} OWNER {BENCH_USER}"))?;
        Ok(s)
    }

    /// A streaming replica of `primary` (`pg_basebackup -R`, fast checkpoint, no fsync), started.
    pub fn init_replica(
        ns: &Netns,
        name: &str,
        addr: Ipv4Addr,
        base: &Path,
        primary: Ipv4Addr,
    ) -> Result<Self> {
        let mut s = Self::new(ns, name, addr, base)?;
        s.basebackup_from(primary)?;
        s.start()?;
        Ok(s)
    }

    /// Replaces the data directory with a base backup of `primary`, set up to stream from it.
    /// The server must be stopped.
    pub fn basebackup_from(&mut self, primary: Ipv4Addr) -> Result<()> {
        ensure!(self.process.is_none(), "{} is running", self.name);
        if self.data.exists() {
            fs::remove_dir_all(&self.data)?;
        }
        run_checked(
            self.command("pg_basebackup")
                .arg("-h")
                .arg(primary.to_string())
                .args(["-U", REPL_USER, "-D"])
                .arg(&self.data)
                .args(["-R", "-X", "stream", "-c", "fast", "-N"])
                .env("PGPASSWORD", REPL_PASSWORD),
        )
        .with_context(|| format!("pg_basebackup of {primary} on {}", self.name))?;
        Ok(())
    }

    /// Starts the server (its data directory decides whether as a primary or a replica) and waits
    /// until it accepts connections.
    pub fn start(&mut self) -> Result<()> {
        ensure!(self.process.is_none(), "{} is already running", self.name);
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-c", "listen_addresses=*", "-c"])
            .arg(format!("port={PG_PORT}"))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.sock.display()))
            .arg("-c")
            .arg(format!("cluster_name={}", self.name));
        self.starts += 1;
        let log = self.dir.join(format!("postgres.{}.log", self.starts));
        let mut process = Process::spawn(&format!("postgres on {}", self.name), &mut cmd, &log)?;
        let pid_file = self.data.join("postmaster.pid");
        let ready = wait_for(
            &format!("postgres on {} to accept connections", self.name),
            PG_READY,
            || {
                process.ensure_running()?;
                // Line 8 of postmaster.pid is the postmaster's status: `ready` once it accepts
                // connections (read-only ones on a hot standby).
                let status = fs::read_to_string(&pid_file).unwrap_or_default();
                Ok((status.lines().nth(7).map(str::trim) == Some("ready")).then_some(()))
            },
        );
        if let Err(e) = ready {
            let log = process.log();
            let _ = process.signal_and_wait(libc::SIGINT, PG_STOP);
            bail!("{e:#}; its log:\n{log}");
        }
        self.process = Some(process);
        Ok(())
    }

    /// Fast shutdown (SIGINT to the postmaster: sessions are ended, then a checkpoint), waited
    /// for. From then on connections to it are refused.
    pub fn stop(&mut self) -> Result<()> {
        let mut process = self
            .process
            .take()
            .with_context(|| format!("postgres on {} is not running", self.name))?;
        match process.signal_and_wait(libc::SIGINT, PG_STOP) {
            Some(_) => Ok(()),
            None => bail!(
                "postgres on {} did not stop within {PG_STOP:?} and was killed; its log:\n{}",
                self.name,
                process.log()
            ),
        }
    }

    pub fn running(&self) -> bool {
        self.process.is_some()
    }

    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().map(Process::pid)
    }

    /// Promotes a replica (`pg_ctl promote -W`: signals and returns at once; the caller watches
    /// for the result).
    pub fn promote(&self) -> Result<()> {
        run_checked(
            self.command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-W", "promote"]),
        )
        .with_context(|| format!("promoting {}", self.name))?;
        Ok(())
    }

    /// Runs SQL as the superuser over the instance's own Unix socket; the unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = run_checked(
            self.command("psql")
                .arg("-h")
                .arg(&self.sock)
                .args(["-U", "postgres", "-d", "postgres", "-XAtq"])
                .args(["-v", "ON_ERROR_STOP=1", "-c", sql]),
        )
        .with_context(|| format!("psql on {}", self.name))?;
        Ok(out.stdout.trim().to_string())
    }

    /// `pg_is_in_recovery()`.
    pub fn in_recovery(&self) -> Result<bool> {
        match self.psql("select pg_is_in_recovery()")?.as_str() {
            "t" => Ok(true),
            "f" => Ok(false),
            other => bail!("pg_is_in_recovery() on {}: {other:?}", self.name),
        }
    }

    /// Waits until the server answers as a primary (after a promotion).
    pub fn wait_primary(&self, timeout: Duration) -> Result<()> {
        wait_for(
            &format!("{} to become a primary", self.name),
            timeout,
            || Ok((!self.in_recovery()?).then_some(())),
        )
    }

    /// Everything the server logged, over all its starts.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                fs::read_to_string(self.dir.join(format!("postgres.{i}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            // Fast shutdown, so the postmaster ends its children itself; SIGKILL only if it hangs
            // (Process does that when the wait runs out).
            p.signal_and_wait(libc::SIGINT, PG_STOP);
        }
    }
}

/// A primary and its replicas, one per database namespace, plus the password files the checks
/// read.
pub struct PgCluster {
    // Servers before the directory: they stop before their data goes away.
    pub servers: Vec<PgServer>,
    dir: PgDir,
}

impl PgCluster {
    /// The first host becomes the primary, the others its replicas; each waits until
    /// streaming.
    pub fn start(prefix: &str, hosts: &[(&Netns, String, Ipv4Addr)]) -> Result<Self> {
        let dir = PgDir::new(prefix)?;
        let mut cluster = Self {
            servers: Vec::new(),
            dir,
        };
        let ((ns, name, addr), replicas) = hosts
            .split_first()
            .context("a database cluster needs at least one host")?;
        let primary_addr = *addr;
        let primary = PgServer::init_primary(ns, name, primary_addr, cluster.dir.path())?;
        cluster.servers.push(primary);
        for (ns, name, addr) in replicas {
            let r = PgServer::init_replica(ns, name, *addr, cluster.dir.path(), primary_addr)?;
            cluster.servers.push(r);
        }
        cluster.wait_streaming(replicas.len())?;
        for (file, secret) in [
            (cluster.check_password_file(), CHECK_PASSWORD),
            (cluster.check_md5_password_file(), CHECK_MD5_PASSWORD),
        ] {
            fs::write(&file, format!("{secret}\n"))?;
            fs::set_permissions(&file, fs::Permissions::from_mode(0o600))?;
        }
        Ok(cluster)
    }

    /// The server on database host `name` (db1, …).
    pub fn server(&self, name: &str) -> &PgServer {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no database server {name}"))
    }

    pub fn server_mut(&mut self, name: &str) -> &mut PgServer {
        self.servers
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no database server {name}"))
    }

    /// Waits until the primary (db1) streams to `n` replicas.
    pub fn wait_streaming(&self, n: usize) -> Result<()> {
        let primary = &self.servers[0];
        wait_for("the replicas to stream", PG_READY, || {
            let got: usize = primary
                .psql("select count(*) from pg_stat_replication where state = 'streaming'")?
                .parse()?;
            Ok((got >= n).then_some(()))
        })
    }

    /// File holding [`CHECK_PASSWORD`] (mode 0600), for `--check-password-file`.
    pub fn check_password_file(&self) -> PathBuf {
        self.dir.path().join("check.password")
    }

    /// File holding [`CHECK_MD5_PASSWORD`].
    pub fn check_md5_password_file(&self) -> PathBuf {
        self.dir.path().join("check_md5.password")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every server's log, for a failing test's diagnostics.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("--- postgres log of {}:\n{}\n", s.name, s.log()))
            .collect()
    }
}

/// A client connection's parameters (libpq keywords), with the password passed in the
/// environment, never on a command line.
#[derive(Clone, Debug)]
pub struct PgClient {
    pub host: Ipv4Addr,
    pub user: String,
    pub password: String,
    pub database: String,
}

impl PgClient {
    /// [`CHECK_USER`] on database `postgres` at `host`.
    pub fn check_user(host: Ipv4Addr) -> Self {
        Self {
            host,
            user: CHECK_USER.into(),
            password: CHECK_PASSWORD.into(),
            database: "postgres".into(),
        }
    }

    /// [`BENCH_USER`] on [`BENCH_DB`] at `host`.
    pub fn bench(host: Ipv4Addr) -> Self {
        Self {
            host,
            user: BENCH_USER.into(),
            password: BENCH_PASSWORD.into(),
            database: BENCH_DB.into(),
        }
    }

    /// The libpq connection string (without the password).
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={PG_PORT} dbname={} user={} connect_timeout=2",
            self.host, self.database, self.user
        )
    }

    /// `command` (psql, pgbench) run in `ns` as root (only the server refuses root), with the
    /// password in `PGPASSWORD` and no rc files.
    pub fn command(&self, ns: &Netns, program: &str) -> Command {
        self.command_in(ns.name(), program)
    }

    /// [`PgClient::command`] by the namespace's name.
    pub fn command_in(&self, ns: &str, program: &str) -> Command {
        let mut cmd = crate::netns::command_in(ns, Path::new(PG_BIN).join(program));
        cmd.env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "2");
        cmd
    }

    /// `psql -XAt -c sql` in `ns`; the output whatever the exit status (errors are on stderr).
    pub fn psql(&self, ns: &Netns, sql: &str) -> Result<Output> {
        run_timeout(
            self.command(ns, "psql")
                .args(["-XAtqw", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .arg(self.conninfo()),
            SHORT,
        )
    }

    /// The same, which must succeed: its trimmed output.
    pub fn query(&self, ns: &Netns, sql: &str) -> Result<String> {
        Ok(self.psql(ns, sql)?.checked()?.stdout.trim().to_string())
    }
}
