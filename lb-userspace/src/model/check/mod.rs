//! Health-check configuration: what to check on a backend (`CheckSpec`), partial changes of it
//! from the CLI or the TOML file (`CheckPatch`), their parsing and validation.
//!
//! The vocabulary follows HAProxy: `interval` between checks, `timeout` per check, `fall`
//! consecutive failures mark a backend down, `rise` consecutive successes bring it back. The
//! runtime side (probes, the rise/fall machine) is in `agent/health`.
//!
//! Kinds and their spelling: `tcp`, `http:/PATH`, `https:/PATH`, `none`, and `postgres`,
//! `postgres:primary`, `postgres:replica` on the command line; in TOML the part after the colon
//! is a key of its own, as for http (`kind = "http"`, `path = "/healthz"`; `kind = "postgres"`,
//! `role = "primary"`).

mod status;

pub use status::StatusRange;

use crate::{model::Proto, util::fmt_duration};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

/// Default time between two checks of a backend: HAProxy's `inter` is 2 s, the issue asks for
/// at most 1 s so a dead server is noticed in about 3 s with the default `fall`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// The timeout of a check with the default interval; with a shorter interval the timeout is the
/// interval (`default_timeout`), as HAProxy's `timeout check` defaults to `inter`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// HAProxy's defaults.
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
/// Shortest accepted interval: below this a check loop is a busy loop, not a health check.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Longest accepted interval (a day): anything longer is almost certainly a typo.
pub const MAX_INTERVAL: Duration = Duration::from_secs(86_400);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error(
        "unknown check {0:?} (expected tcp, http:/PATH, https:/PATH, postgres, postgres:primary, \
         postgres:replica or none, e.g. http:/healthz)"
    )]
    Kind(String),
    #[error(
        "unknown PostgreSQL role {0:?} (expected postgres, postgres:primary or postgres:replica)"
    )]
    Role(String),
    #[error("a postgres check needs a user to log in as (--check-user)")]
    NoUser,
    #[error("{0} applies to postgres checks only")]
    NotPostgres(&'static str),
    #[error("{0} applies to https checks only")]
    NotHttps(&'static str),
    #[error("{what} must be an absolute path, not {}", path.display())]
    RelativePath { what: &'static str, path: PathBuf },
    #[error("{what} {value:?} must not be empty or contain spaces or control characters")]
    Name { what: &'static str, value: String },
    #[error("check path {0:?} must start with / and contain no spaces or control characters")]
    Path(String),
    #[error("malformed duration {input:?} for {what}: {reason} (e.g. 200ms, 1s, 1m30s)")]
    Duration {
        what: &'static str,
        input: String,
        reason: String,
    },
    #[error("{what} {value:?} is not a number")]
    Number { what: &'static str, value: String },
    #[error("--check-port {0:?} is not a port (expected 1-65535)")]
    Port(String),
    #[error("--tls-verify takes true or false, not {0:?}")]
    Bool(String),
    #[error(
        "malformed status {0:?} (expected a code like 200 or a range like 200-399, within 100-599)"
    )]
    Status(String),
    #[error("check interval {} is below the minimum of {}", fmt_duration(*.0), fmt_duration(MIN_INTERVAL))]
    IntervalTooShort(Duration),
    #[error("check interval {} is above the maximum of {}", fmt_duration(*.0), fmt_duration(MAX_INTERVAL))]
    IntervalTooLong(Duration),
    #[error("check timeout must be above 0")]
    TimeoutZero,
    #[error("check timeout {} exceeds the interval {} (a check must end before the next one starts)", fmt_duration(*timeout), fmt_duration(*interval))]
    TimeoutAboveInterval {
        timeout: Duration,
        interval: Duration,
    },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("check port 0 is not a valid port")]
    PortZero,
}

/// What a check does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect to the check port.
    Tcp,
    /// HTTP GET of `path`; the status must be in `expect_status`, the body contain `expect_body`.
    Http,
    /// As `http`, over TLS.
    Https,
    /// A PostgreSQL login and `SELECT pg_is_in_recovery()`: the server must accept queries and,
    /// with a `role`, have that role.
    Postgres,
    /// No check: the backend always counts as up.
    None,
}

/// The role a `postgres` check asks of the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Any server that accepts queries (`postgres`).
    #[default]
    Any,
    /// Not in recovery: accepts writes (`postgres:primary`).
    Primary,
    /// In recovery: a streaming replica (`postgres:replica`).
    Replica,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Any => "any",
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Https => "https",
            CheckKind::Postgres => "postgres",
            CheckKind::None => "none",
        })
    }
}

/// Parse a duration as an operator types it (`200ms`, `1s`, `1m30s`); `what` names the setting.
pub fn parse_duration(what: &'static str, input: &str) -> Result<Duration, CheckError> {
    // humantime rather than a hand-written parser: it is the de-facto standard for this notation
    // (also used by systemd-style tools), accepts compound values and formats them back the same.
    humantime::parse_duration(input.trim()).map_err(|e| CheckError::Duration {
        what,
        input: input.to_string(),
        reason: e.to_string(),
    })
}

/// The timeout of a check every `interval` when none is given: 1 s, or the interval if shorter.
pub fn default_timeout(interval: Duration) -> Duration {
    DEFAULT_TIMEOUT.min(interval)
}

/// Serde form of a `Duration`: a humantime string.
mod duration_str {
    use super::*;
    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&fmt_duration(*d))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration("a duration", &s).map_err(de::Error::custom)
    }
}

/// Serde form of an optional `Duration`.
mod opt_duration_str {
    use super::*;
    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&fmt_duration(*d)),
            None => s.serialize_none(),
        }
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration("a duration", &s)
            .map(Some)
            .map_err(de::Error::custom)
    }
}

/// What `--check` says: the kind, and the http path or the postgres role if it gives one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindArg {
    pub kind: CheckKind,
    pub path: Option<String>,
    /// Set for every `postgres` spelling: a bare `postgres` is a check of any role.
    pub role: Option<Role>,
}

/// Parse `--check`: `tcp`, `none`, `http`, `http:/PATH`, `https`, `https:/PATH`, `postgres`,
/// `postgres:primary`, `postgres:replica`.
pub fn parse_kind(input: &str) -> Result<KindArg, CheckError> {
    let (kind, arg) = match input.split_once(':') {
        Some((k, p)) => (k, Some(p)),
        None => (input, None),
    };
    let kind = match kind {
        "tcp" => CheckKind::Tcp,
        "http" => CheckKind::Http,
        "https" => CheckKind::Https,
        "postgres" => CheckKind::Postgres,
        "none" => CheckKind::None,
        _ => return Err(CheckError::Kind(input.to_string())),
    };
    let parsed = |path, role| KindArg { kind, path, role };
    match (kind, arg) {
        (CheckKind::Postgres, None) => Ok(parsed(None, Some(Role::Any))),
        (CheckKind::Postgres, Some("primary")) => Ok(parsed(None, Some(Role::Primary))),
        (CheckKind::Postgres, Some("replica")) => Ok(parsed(None, Some(Role::Replica))),
        (CheckKind::Postgres, Some(other)) => Err(CheckError::Role(other.to_string())),
        (CheckKind::Tcp | CheckKind::None, Some(_)) => Err(CheckError::Kind(input.to_string())),
        (_, Some(p)) => {
            validate_path(p)?;
            Ok(parsed(Some(p.to_string()), None))
        }
        (_, None) => Ok(parsed(None, None)),
    }
}

fn validate_path(path: &str) -> Result<(), CheckError> {
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CheckError::Path(path.to_string()));
    }
    Ok(())
}

/// A complete health check: what every backend of a VIP gets unless it has its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub kind: CheckKind,
    /// Request path of `http`/`https` checks.
    pub path: String,
    /// Port checked on the backend's own address; `None` = the VIP's port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(with = "duration_str")]
    pub interval: Duration,
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub expect_status: StatusRange,
    /// `http`/`https`: the body must contain this.
    #[serde(default)]
    pub expect_body: Option<String>,
    /// `https`: verify the backend's certificate (off by default: backends usually present
    /// certificates for the service name, not for their own address). `tls_ca` turns it on.
    #[serde(default)]
    pub tls_verify: bool,
    /// `https`: trust only the CA certificate(s) in this PEM file (verification on).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// `https`: the name sent as SNI (and the Host header) and verified in the certificate,
    /// while the connection still goes to the backend's own address.
    #[serde(default)]
    pub tls_sni: Option<String>,
    /// `postgres`: the role the server must have.
    #[serde(default)]
    pub role: Role,
    /// `postgres`: the user the check logs in as (it needs no privileges but LOGIN).
    #[serde(default)]
    pub user: Option<String>,
    /// `postgres`: the database it connects to; `None` = `postgres`.
    #[serde(default)]
    pub database: Option<String>,
    /// `postgres`: the file holding the password (its first line), read at every check; never
    /// the password itself, so it appears in no state file, listing or log.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// The database a `postgres` check connects to when none is given (it always exists).
pub const DEFAULT_DATABASE: &str = "postgres";

impl CheckSpec {
    /// The check a VIP gets when nothing is configured: a TCP connect for TCP services, none for
    /// UDP ones (a TCP connect says nothing about a UDP service, and a UDP probe cannot tell a
    /// silent service from a dead one).
    pub fn default_for(proto: Proto) -> CheckSpec {
        CheckSpec {
            kind: match proto {
                Proto::Tcp => CheckKind::Tcp,
                Proto::Udp => CheckKind::None,
            },
            path: "/".to_string(),
            port: None,
            interval: DEFAULT_INTERVAL,
            timeout: default_timeout(DEFAULT_INTERVAL),
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            expect_status: StatusRange::DEFAULT,
            expect_body: None,
            tls_verify: false,
            tls_ca: None,
            tls_sni: None,
            role: Role::Any,
            user: None,
            database: None,
            password_file: None,
        }
    }

    /// Whether an https check verifies the certificate: asked for, or implied by a CA.
    pub fn verifies(&self) -> bool {
        self.tls_verify || self.tls_ca.is_some()
    }

    /// The database a postgres check connects to.
    pub fn database_name(&self) -> &str {
        self.database.as_deref().unwrap_or(DEFAULT_DATABASE)
    }

    /// This check with the fields `patch` sets replaced. A patch that changes the kind drops the
    /// old kind's own settings it does not set again (a postgres check's user, an https check's
    /// CA and name), so `--check tcp` on a postgres VIP is a plain TCP check.
    pub fn patched(&self, patch: &CheckPatch) -> CheckSpec {
        let mut c = self.clone();
        if let Some(k) = patch.kind {
            if k != c.kind {
                if k != CheckKind::Postgres {
                    c.role = Role::Any;
                    c.user = None;
                    c.database = None;
                    c.password_file = None;
                }
                if k != CheckKind::Https {
                    c.tls_ca = None;
                    c.tls_sni = None;
                }
            }
            c.kind = k;
        }
        if let Some(p) = &patch.path {
            c.path = p.clone();
        }
        if let Some(p) = patch.port {
            c.port = Some(p);
        }
        if let Some(i) = patch.interval {
            // A timeout that is its interval's default follows a new interval (unless the patch
            // gives one): `--interval 200ms` alone is a 200 ms check, not a refused 1 s timeout.
            // A timeout set to something else stays, and is checked against the new interval.
            if patch.timeout.is_none() && c.timeout == default_timeout(c.interval) {
                c.timeout = default_timeout(i);
            }
            c.interval = i;
        }
        if let Some(t) = patch.timeout {
            c.timeout = t;
        }
        if let Some(r) = patch.rise {
            c.rise = r;
        }
        if let Some(f) = patch.fall {
            c.fall = f;
        }
        if let Some(s) = patch.expect_status {
            c.expect_status = s;
        }
        if let Some(b) = &patch.expect_body {
            // An empty string clears the body condition (there is no other way to unset it).
            c.expect_body = (!b.is_empty()).then(|| b.clone());
        }
        if let Some(v) = patch.tls_verify {
            c.tls_verify = v;
        }
        // An empty value clears an optional setting (there is no other way to unset one).
        let text = |v: &Option<String>, old: &mut Option<String>| {
            if let Some(v) = v {
                *old = (!v.is_empty()).then(|| v.clone());
            }
        };
        let path = |v: &Option<PathBuf>, old: &mut Option<PathBuf>| {
            if let Some(v) = v {
                *old = (!v.as_os_str().is_empty()).then(|| v.clone());
            }
        };
        path(&patch.tls_ca, &mut c.tls_ca);
        text(&patch.tls_sni, &mut c.tls_sni);
        if let Some(r) = patch.role {
            c.role = r;
        }
        text(&patch.user, &mut c.user);
        text(&patch.database, &mut c.database);
        path(&patch.password_file, &mut c.password_file);
        c
    }

    /// Every rule a check must satisfy on its own.
    pub fn validate(&self) -> Result<(), CheckError> {
        validate_path(&self.path)?;
        if self.port == Some(0) {
            return Err(CheckError::PortZero);
        }
        if self.interval < MIN_INTERVAL {
            return Err(CheckError::IntervalTooShort(self.interval));
        }
        if self.interval > MAX_INTERVAL {
            return Err(CheckError::IntervalTooLong(self.interval));
        }
        if self.timeout.is_zero() {
            return Err(CheckError::TimeoutZero);
        }
        if self.timeout > self.interval {
            return Err(CheckError::TimeoutAboveInterval {
                timeout: self.timeout,
                interval: self.interval,
            });
        }
        if self.rise == 0 {
            return Err(CheckError::Zero("rise"));
        }
        if self.fall == 0 {
            return Err(CheckError::Zero("fall"));
        }
        self.validate_kind_settings()
    }

    /// The settings of one kind appear only with that kind, and are well formed.
    fn validate_kind_settings(&self) -> Result<(), CheckError> {
        let postgres = self.kind == CheckKind::Postgres;
        let https = self.kind == CheckKind::Https;
        for (set, flag) in [
            (
                self.role != Role::Any,
                "a role (postgres:primary, postgres:replica)",
            ),
            (self.user.is_some(), "--check-user"),
            (self.database.is_some(), "--check-database"),
            (self.password_file.is_some(), "--check-password-file"),
        ] {
            if set && !postgres {
                return Err(CheckError::NotPostgres(flag));
            }
        }
        for (set, flag) in [
            (self.tls_ca.is_some(), "--tls-ca"),
            (self.tls_sni.is_some(), "--tls-sni"),
        ] {
            if set && !https {
                return Err(CheckError::NotHttps(flag));
            }
        }
        if postgres && self.user.is_none() {
            return Err(CheckError::NoUser);
        }
        for (value, what) in [
            (&self.user, "--check-user"),
            (&self.database, "--check-database"),
            (&self.tls_sni, "--tls-sni"),
        ] {
            if let Some(v) = value
                && (v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(CheckError::Name {
                    what,
                    value: v.clone(),
                });
            }
        }
        for (value, what) in [
            (&self.password_file, "--check-password-file"),
            (&self.tls_ca, "--tls-ca"),
        ] {
            if let Some(p) = value
                && !p.is_absolute()
            {
                return Err(CheckError::RelativePath {
                    what,
                    path: p.clone(),
                });
            }
        }
        Ok(())
    }

    /// The files the check reads (CA, password file), to be checked when it is configured.
    pub fn files(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        [
            ("--tls-ca", self.tls_ca.as_deref()),
            ("--check-password-file", self.password_file.as_deref()),
        ]
        .into_iter()
        .filter_map(|(what, p)| p.map(|p| (what, p)))
    }

    /// Short form for tables: `tcp`, `http:/healthz`, `https:/x port 8443 sni www.example.com`,
    /// `postgres:primary user xlb`, `none`.
    pub fn summary(&self) -> String {
        let mut s = match self.kind {
            CheckKind::Http | CheckKind::Https => format!("{}:{}", self.kind, self.path),
            CheckKind::Postgres if self.role != Role::Any => format!("postgres:{}", self.role),
            k => k.to_string(),
        };
        if let Some(name) = &self.tls_sni {
            s.push_str(&format!(" sni {name}"));
        }
        if let Some(user) = &self.user {
            s.push_str(&format!(" user {user}"));
        }
        if let Some(db) = &self.database {
            s.push_str(&format!(" db {db}"));
        }
        if let (Some(p), false) = (self.port, self.kind == CheckKind::None) {
            s.push_str(&format!(" port {p}"));
        }
        s
    }
}

/// A partial check: the fields given on a command line or in a TOML `check` table. Applied on top
/// of a base (the protocol's default, the VIP's current check) with `CheckSpec::patched`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<CheckKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration_str"
    )]
    pub interval: Option<Duration>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration_str"
    )]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<StatusRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_verify: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl CheckPatch {
    pub fn is_empty(&self) -> bool {
        self == &CheckPatch::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_depend_on_the_protocol() {
        let tcp = CheckSpec::default_for(Proto::Tcp);
        assert_eq!(tcp.kind, CheckKind::Tcp);
        assert_eq!(tcp.interval, Duration::from_secs(1));
        assert_eq!((tcp.rise, tcp.fall), (2, 3));
        assert!(tcp.validate().is_ok());
        assert_eq!(CheckSpec::default_for(Proto::Udp).kind, CheckKind::None);
    }

    fn kind(kind: CheckKind, path: Option<&str>, role: Option<Role>) -> KindArg {
        KindArg {
            kind,
            path: path.map(str::to_string),
            role,
        }
    }

    #[test]
    fn kinds_parse() {
        assert_eq!(parse_kind("tcp").unwrap(), kind(CheckKind::Tcp, None, None));
        assert_eq!(
            parse_kind("none").unwrap(),
            kind(CheckKind::None, None, None)
        );
        assert_eq!(
            parse_kind("http").unwrap(),
            kind(CheckKind::Http, None, None)
        );
        assert_eq!(
            parse_kind("https:/healthz?x=1").unwrap(),
            kind(CheckKind::Https, Some("/healthz?x=1"), None)
        );
        for (input, role) in [
            ("postgres", Role::Any),
            ("postgres:primary", Role::Primary),
            ("postgres:replica", Role::Replica),
        ] {
            assert_eq!(
                parse_kind(input).unwrap(),
                kind(CheckKind::Postgres, None, Some(role)),
                "{input}"
            );
        }
        for bad in [
            "udp",
            "http:healthz",
            "tcp:/x",
            "http:/a b",
            "",
            "pgsql",
            "postgres:/x",
        ] {
            assert!(parse_kind(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_kind("postgres:master").unwrap_err().to_string(),
            "unknown PostgreSQL role \"master\" (expected postgres, postgres:primary or postgres:replica)"
        );
    }

    #[test]
    fn postgres_and_tls_settings() {
        let base = CheckSpec::default_for(Proto::Tcp);
        let pg = base.patched(&CheckPatch {
            kind: Some(CheckKind::Postgres),
            role: Some(Role::Primary),
            user: Some("xlbcheck".into()),
            password_file: Some("/etc/xlb/pg.password".into()),
            ..Default::default()
        });
        assert!(pg.validate().is_ok());
        assert_eq!(pg.database_name(), "postgres");
        assert_eq!(pg.summary(), "postgres:primary user xlbcheck");
        assert_eq!(
            pg.files().collect::<Vec<_>>(),
            vec![("--check-password-file", Path::new("/etc/xlb/pg.password"))]
        );
        // No user: refused. Another kind: its postgres settings go with it.
        let no_user = CheckPatch {
            kind: Some(CheckKind::Postgres),
            ..Default::default()
        };
        assert_eq!(base.patched(&no_user).validate(), Err(CheckError::NoUser));
        let tcp = pg.patched(&CheckPatch {
            kind: Some(CheckKind::Tcp),
            ..Default::default()
        });
        assert_eq!(tcp, base);
        // Settings of another kind given with it: refused.
        let stray = base.patched(&CheckPatch {
            user: Some("x".into()),
            ..Default::default()
        });
        assert_eq!(
            stray.validate().unwrap_err().to_string(),
            "--check-user applies to postgres checks only"
        );
        let stray = pg.patched(&CheckPatch {
            tls_sni: Some("www.example.com".into()),
            ..Default::default()
        });
        assert_eq!(
            stray.validate().unwrap_err().to_string(),
            "--tls-sni applies to https checks only"
        );
        // An empty value clears; a relative path is refused.
        assert_eq!(
            pg.patched(&CheckPatch {
                password_file: Some(PathBuf::new()),
                ..Default::default()
            })
            .password_file,
            None
        );
        let relative = pg.patched(&CheckPatch {
            password_file: Some("pg.password".into()),
            ..Default::default()
        });
        assert_eq!(
            relative.validate().unwrap_err().to_string(),
            "--check-password-file must be an absolute path, not pg.password"
        );
        // https with a CA verifies; the name shows in the summary.
        let https = base.patched(&CheckPatch {
            kind: Some(CheckKind::Https),
            path: Some("/healthz".into()),
            tls_ca: Some("/etc/xlb/ca.pem".into()),
            tls_sni: Some("www.example.com".into()),
            ..Default::default()
        });
        assert!(https.validate().is_ok());
        assert!(https.verifies() && !base.verifies());
        assert_eq!(https.summary(), "https:/healthz sni www.example.com");
        let bad_name = https.patched(&CheckPatch {
            tls_sni: Some("www example".into()),
            ..Default::default()
        });
        assert!(matches!(bad_name.validate(), Err(CheckError::Name { .. })));
    }

    #[test]
    fn status_ranges_parse_and_print() {
        assert_eq!(
            "200".parse::<StatusRange>().unwrap(),
            StatusRange { lo: 200, hi: 200 }
        );
        let r: StatusRange = "200-399".parse().unwrap();
        assert!(r.contains(302) && !r.contains(404));
        assert_eq!(r.to_string(), "200-399");
        for bad in ["399-200", "abc", "99", "600", "200-", "-200", "+200", ""] {
            let e = bad.parse::<StatusRange>().unwrap_err();
            assert_eq!(e, CheckError::Status(bad.to_string()));
        }
    }

    #[test]
    fn timeout_defaults_to_the_interval_when_shorter() {
        let base = CheckSpec::default_for(Proto::Tcp);
        let interval = |ms| CheckPatch {
            interval: Some(Duration::from_millis(ms)),
            ..Default::default()
        };
        // `--interval 200ms` alone: a 200 ms timeout, accepted.
        let fast = base.patched(&interval(200));
        assert_eq!(fast.timeout, Duration::from_millis(200));
        assert!(fast.validate().is_ok());
        // A longer interval again: back to the 1 s default.
        let slow = fast.patched(&interval(5_000));
        assert_eq!(slow.timeout, Duration::from_secs(1));
        // An explicit timeout wins, and one longer than the interval is still an error.
        let given = base.patched(&CheckPatch {
            timeout: Some(Duration::from_millis(150)),
            ..interval(200)
        });
        assert_eq!(given.timeout, Duration::from_millis(150));
        let too_long = base.patched(&CheckPatch {
            timeout: Some(Duration::from_millis(300)),
            ..interval(200)
        });
        assert!(matches!(
            too_long.validate(),
            Err(CheckError::TimeoutAboveInterval { .. })
        ));
        // A timeout set to something else than its default stays when the interval changes.
        let set = base.patched(&CheckPatch {
            timeout: Some(Duration::from_millis(1_500)),
            ..interval(2_000)
        });
        let shorter = set.patched(&interval(500));
        assert_eq!(shorter.timeout, Duration::from_millis(1_500));
        assert!(shorter.validate().is_err());
    }

    #[test]
    fn validation_rejects_bad_combinations() {
        let base = CheckSpec::default_for(Proto::Tcp);
        let with = |p: CheckPatch| base.patched(&p).validate().unwrap_err().to_string();
        assert_eq!(
            with(CheckPatch {
                interval: Some(Duration::from_millis(200)),
                timeout: Some(Duration::from_millis(300)),
                ..Default::default()
            }),
            "check timeout 300ms exceeds the interval 200ms (a check must end before the next one starts)"
        );
        assert_eq!(
            with(CheckPatch {
                rise: Some(0),
                ..Default::default()
            }),
            "rise must be at least 1"
        );
        assert_eq!(
            with(CheckPatch {
                fall: Some(0),
                ..Default::default()
            }),
            "fall must be at least 1"
        );
        assert!(
            with(CheckPatch {
                interval: Some(Duration::from_millis(1)),
                timeout: Some(Duration::from_millis(1)),
                ..Default::default()
            })
            .contains("below the minimum")
        );
        assert_eq!(
            with(CheckPatch {
                timeout: Some(Duration::ZERO),
                ..Default::default()
            }),
            "check timeout must be above 0"
        );
    }

    #[test]
    fn specs_round_trip_through_json_and_toml() {
        let c = CheckSpec::default_for(Proto::Tcp).patched(&CheckPatch {
            kind: Some(CheckKind::Https),
            path: Some("/healthz".into()),
            interval: Some(Duration::from_millis(200)),
            timeout: Some(Duration::from_millis(150)),
            ..Default::default()
        });
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""interval":"200ms""#), "{json}");
        assert!(json.contains(r#""expect_status":"200-399""#), "{json}");
        assert_eq!(serde_json::from_str::<CheckSpec>(&json).unwrap(), c);
        let p: CheckPatch = toml::from_str(
            "kind = \"http\"\npath = \"/h\"\nport = 8080\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\
             rise = 2\nfall = 3\nexpect_status = 200\nexpect_body = \"ok\"\ntls_verify = false\n",
        )
        .unwrap();
        assert_eq!(p.expect_status, Some(StatusRange { lo: 200, hi: 200 }));
        assert_eq!(p.timeout, Some(Duration::from_millis(150)));
        assert!(toml::from_str::<CheckPatch>("intervall = \"1s\"").is_err());
        let p: CheckPatch = toml::from_str(
            "kind = \"postgres\"\nrole = \"replica\"\nuser = \"xlbcheck\"\n\
             database = \"app\"\npassword_file = \"/etc/xlb/pg.password\"\n",
        )
        .unwrap();
        assert_eq!(
            (p.kind, p.role, p.database.as_deref()),
            (Some(CheckKind::Postgres), Some(Role::Replica), Some("app"))
        );
        assert!(toml::from_str::<CheckPatch>("kind = \"postgres\"\nrole = \"master\"").is_err());
        // A state file written before these settings existed still loads.
        let old = r#"{"kind":"tcp","path":"/","port":null,"interval":"1s","timeout":"1s","rise":2,"fall":3,"expect_status":"200-399"}"#;
        let c: CheckSpec = serde_json::from_str(old).unwrap();
        assert_eq!(c, CheckSpec::default_for(Proto::Tcp));
        assert!(toml::from_str::<CheckPatch>("interval = \"soon\"").is_err());
    }
}
