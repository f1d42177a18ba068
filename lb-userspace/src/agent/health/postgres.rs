//! One PostgreSQL health probe: connect to a backend's own address, authenticate (SCRAM-SHA-256,
//! md5, or trust, whichever the server asks for), and ask for the server's role with
//! `pg_is_in_recovery()` and, on a primary, its timeline.
//!
//! A check user needs no privileges: `LOGIN`, plus `CONNECT` on the database and `EXECUTE` on
//! the functions, both of which PUBLIC has by default. The password comes from a file read at
//! every probe (so a rotated password is picked up without a restart) and is never part of an
//! error, a log line or a result.

use crate::util::os_message;
use std::{
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};
use tokio::net::TcpStream;
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// Asked in one round trip (simple query protocol). The CASE keeps the primary-only WAL functions
/// from running on a replica. A primary's timeline is the first 8 hex digits of its current WAL
/// file name: right from the moment of a promotion, unlike `pg_control_checkpoint().timeline_id`,
/// which changes only at the next checkpoint. A replica's own timeline would need the
/// `pg_read_all_stats` role (`pg_stat_wal_receiver`), so it is not asked for.
const ROLE_QUERY: &str = "select pg_is_in_recovery(), case when pg_is_in_recovery() then null \
     else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int end";

/// Longest password file read: a password, not a data file.
const MAX_PASSWORD_FILE: u64 = 4096;

/// What one probe connects with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PgTarget {
    pub(crate) addr: SocketAddr,
    pub(crate) user: String,
    pub(crate) database: String,
    /// `None`: no password (the server trusts the check's address).
    pub(crate) password_file: Option<PathBuf>,
}

/// A server's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PgRole {
    /// Accepts writes (`pg_is_in_recovery()` is false).
    Primary,
    /// In recovery: a streaming replica (hot standby), read-only.
    Replica,
}

impl fmt::Display for PgRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PgRole::Primary => "primary",
            PgRole::Replica => "replica",
        })
    }
}

/// What a server answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PgStatus {
    pub(crate) role: PgRole,
    /// A primary's timeline (1 after initdb, +1 at every promotion); `None` on a replica.
    pub(crate) timeline: Option<u32>,
}

impl fmt::Display for PgStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.timeline {
            Some(tl) => write!(f, "{} (timeline {tl})", self.role),
            None => write!(f, "{}", self.role),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PgProbeError {
    /// The TCP connection failed; the caller words the I/O error.
    #[error("{0}")]
    Connect(io::Error),
    #[error("cannot read password file {}: {}", path.display(), os_message(source))]
    PasswordFile { path: PathBuf, source: io::Error },
    #[error("password file {} is larger than {MAX_PASSWORD_FILE} bytes", .0.display())]
    PasswordFileTooLarge(PathBuf),
    /// The server refused or failed (its own message, e.g. `password authentication failed for
    /// user "xlbcheck"`, `the database system is shutting down`).
    #[error("{0}")]
    Server(String),
    /// The connection broke or the server spoke nonsense.
    #[error("{0}")]
    Protocol(String),
    #[error("unexpected answer to the role query: {0}")]
    Answer(String),
}

impl PgProbeError {
    /// The I/O error behind a failed connection, for the caller's wording.
    pub(crate) fn io(&self) -> Option<&io::Error> {
        match self {
            PgProbeError::Connect(e) => Some(e),
            _ => None,
        }
    }
}

/// Reads the password: the file's first line, without its line ending (so `echo secret > file`
/// works). Checked by the agent when a check is configured, and again at every probe. A plain
/// blocking read: a file of at most 4 KiB on a local disk, cheaper than a trip to tokio's
/// blocking pool.
pub(crate) fn read_password(path: &Path) -> Result<String, PgProbeError> {
    let err = |source| PgProbeError::PasswordFile {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if meta.len() > MAX_PASSWORD_FILE {
        return Err(PgProbeError::PasswordFileTooLarge(path.to_path_buf()));
    }
    let text = std::fs::read_to_string(path).map_err(err)?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// One probe. Not bounded in time by itself: the caller wraps it in the check's timeout (which
/// drops the connection mid-way if it expires).
pub(crate) async fn probe(t: &PgTarget) -> Result<PgStatus, PgProbeError> {
    let mut config = tokio_postgres::Config::new();
    config
        .user(&t.user)
        .dbname(&t.database)
        .application_name("xlb-health-check");
    if let Some(path) = &t.password_file {
        config.password(read_password(path)?);
    }
    // Our own socket (connect_raw): the address is the backend's, never a name to resolve, and a
    // refused connection stays an io::Error the caller can word.
    let stream = TcpStream::connect(t.addr)
        .await
        .map_err(PgProbeError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (client, connection) = config
        .connect_raw(stream, NoTls)
        .await
        .map_err(|e| pg_error(&e))?;
    // The connection future does the I/O; it ends when the client is dropped, after sending the
    // Terminate message, so the server logs a clean disconnect rather than an EOF every interval.
    let work = async move {
        let answer = client.simple_query(ROLE_QUERY).await;
        drop(client);
        answer
    };
    let (answer, closed) = tokio::join!(work, connection);
    let messages = answer.map_err(|e| pg_error(&e))?;
    // The answer is complete; how the connection then ended does not change it.
    let _ = closed;
    parse_answer(&messages)
}

/// A tokio-postgres error as a short reason: the server's message, or the innermost cause.
fn pg_error(e: &tokio_postgres::Error) -> PgProbeError {
    if let Some(db) = e.as_db_error() {
        return PgProbeError::Server(db.message().to_string());
    }
    let mut cur: &dyn std::error::Error = e;
    while let Some(src) = cur.source() {
        if let Some(io) = src.downcast_ref::<io::Error>() {
            return PgProbeError::Connect(io::Error::new(io.kind(), io.to_string()));
        }
        cur = src;
    }
    // tokio-postgres says "invalid configuration" with the detail as its source.
    match cur.to_string().as_str() {
        "password missing" => PgProbeError::Server(
            "the server asks for a password and none is configured".to_string(),
        ),
        inner if !std::ptr::addr_eq(cur, e) => PgProbeError::Protocol(format!("{e}: {inner}")),
        _ => PgProbeError::Protocol(e.to_string()),
    }
}

/// One row: `f|2` on a primary of timeline 2, `t|` on a replica.
fn parse_answer(messages: &[SimpleQueryMessage]) -> Result<PgStatus, PgProbeError> {
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .ok_or_else(|| PgProbeError::Answer("no row".to_string()))?;
    let field = |i| row.try_get(i).ok().flatten();
    let role = match field(0) {
        Some("f") => PgRole::Primary,
        Some("t") => PgRole::Replica,
        other => return Err(PgProbeError::Answer(format!("{other:?}"))),
    };
    let timeline = match (role, field(1)) {
        (PgRole::Primary, Some(tl)) => Some(
            tl.parse::<u32>()
                .map_err(|_| PgProbeError::Answer(format!("timeline {tl:?}")))?,
        ),
        _ => None,
    };
    Ok(PgStatus { role, timeline })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn statuses_read_well() {
        let p = PgStatus {
            role: PgRole::Primary,
            timeline: Some(2),
        };
        assert_eq!(p.to_string(), "primary (timeline 2)");
        let r = PgStatus {
            role: PgRole::Replica,
            timeline: None,
        };
        assert_eq!(r.to_string(), "replica");
    }

    #[test]
    fn password_is_the_first_line_and_never_in_errors() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "s3cret").unwrap();
        writeln!(f, "ignored").unwrap();
        assert_eq!(read_password(f.path()).unwrap(), "s3cret");
        let missing = Path::new("/nonexistent/xlb-password");
        let e = read_password(missing).unwrap_err().to_string();
        assert_eq!(
            e,
            "cannot read password file /nonexistent/xlb-password: No such file or directory"
        );
        let mut big = tempfile::NamedTempFile::new().unwrap();
        big.write_all(&vec![b'x'; 5000]).unwrap();
        let e = read_password(big.path()).unwrap_err().to_string();
        assert!(e.contains("larger than 4096 bytes"), "{e}");
        assert!(!e.contains("xxxx"), "{e}");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let t = PgTarget {
            addr,
            user: "xlbcheck".into(),
            database: "postgres".into(),
            password_file: None,
        };
        let e = probe(&t).await.unwrap_err();
        assert_eq!(
            e.io().map(io::Error::kind),
            Some(io::ErrorKind::ConnectionRefused)
        );
    }

    /// A server that closes the connection right after accepting it: a protocol error, not a
    /// hang and not a panic.
    #[tokio::test]
    async fn a_server_that_hangs_up_is_an_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        let t = PgTarget {
            addr,
            user: "xlbcheck".into(),
            database: "postgres".into(),
            password_file: None,
        };
        assert!(probe(&t).await.is_err());
    }
}
