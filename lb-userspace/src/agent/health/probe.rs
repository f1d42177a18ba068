//! One health check of one backend: a TCP connect, an HTTP(S) GET or a PostgreSQL role query,
//! bounded by the check's timeout, with the reason of a failure in a few words.

use super::{
    CheckResult, HealthError, ProbeTarget,
    postgres::{self, PgProbeError, PgRole, PgStatus, PgTarget},
    tls::{TlsTarget, certificate_reason},
};
use crate::{
    model::check::{CheckKind, Role},
    util::{fmt_duration, os_message},
};
use std::{
    io,
    net::SocketAddr,
    time::{Instant, SystemTime},
};
use tokio::net::TcpStream;

/// How much of an HTTP body is searched for `expect_body`: health pages are small, and a check
/// must not download a large page every interval.
const MAX_BODY: usize = 64 * 1024;

/// The HTTP clients of the checks, built once (building one loads the TLS roots).
pub(crate) struct HttpClients {
    verify: reqwest::Client,
    no_verify: reqwest::Client,
}

/// What every check client is built from.
fn base_builder() -> reqwest::ClientBuilder {
    // reqwest (rustls with the `ring` provider, no default features): a maintained HTTP/1.1
    // client with TLS that builds without cmake or OpenSSL on this toolchain.
    reqwest::Client::builder()
        // Checks go straight to the backend, never through a proxy from the environment.
        .no_proxy()
        // A fresh connection per check (as HAProxy): a pooled one would hide a listener that
        // stopped accepting.
        .pool_max_idle_per_host(0)
        // A 3xx is judged by `expect_status`, not followed elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("xlb-health-check/", env!("CARGO_PKG_VERSION")))
}

impl HttpClients {
    pub(crate) fn new() -> Result<Self, HealthError> {
        let build = |verify: bool| base_builder().danger_accept_invalid_certs(!verify).build();
        Ok(HttpClients {
            verify: build(true)?,
            no_verify: build(false)?,
        })
    }
}

/// An https check with a CA or a name of its own: its TLS target and its own client, built once
/// per check task (the shared clients trust the web PKI and connect by address). A client that
/// cannot be built (the CA file went away) fails every check with the reason.
pub(crate) struct OwnClient {
    target: TlsTarget,
    client: Result<reqwest::Client, String>,
}

impl OwnClient {
    /// `None` unless `t` is an https check with `tls_ca` or `tls_sni`.
    pub(crate) fn for_target(t: &ProbeTarget) -> Option<Self> {
        let c = &t.check;
        if c.kind != CheckKind::Https || (c.tls_ca.is_none() && c.tls_sni.is_none()) {
            return None;
        }
        let target = TlsTarget {
            addr: SocketAddr::from((t.addr, t.port)),
            sni: c.tls_sni.clone(),
            ca: c.tls_ca.clone(),
            verify: c.verifies(),
        };
        let client = target.client(base_builder()).map_err(|e| e.to_string());
        Some(OwnClient { target, client })
    }
}

/// An I/O error as a short reason: `connection refused`, `host unreachable`, ...
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::ConnectionReset => "connection reset".to_string(),
        io::ErrorKind::HostUnreachable => "host unreachable".to_string(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".to_string(),
        _ => {
            let msg = os_message(e);
            let mut chars = msg.chars();
            match chars.next() {
                Some(c) => c.to_lowercase().chain(chars).collect(),
                None => msg,
            }
        }
    }
}

/// The most specific reason in a reqwest error's chain: a certificate problem, else the
/// innermost I/O error if any.
fn http_reason(e: &reqwest::Error) -> String {
    if let Some(cert) = certificate_reason(e) {
        return cert;
    }
    let mut reason = e.to_string();
    let mut cur: &dyn std::error::Error = e;
    while let Some(src) = cur.source() {
        if let Some(io) = src.downcast_ref::<io::Error>()
            && io.get_ref().is_none()
        {
            return io_reason(io);
        }
        reason = src.to_string();
        cur = src;
    }
    reason
}

/// What one check passed with (and a primary's timeline), or why it failed.
type Outcome = Result<(String, Option<u32>), Failure>;

/// A failed check: the reason, and whether the server answered with the other role.
#[derive(Debug, PartialEq)]
struct Failure {
    reason: String,
    wrong_role: bool,
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Failure {
            reason,
            wrong_role: false,
        }
    }
}

/// Run one check of `t` (bounded by its timeout). `own` is the task's own https client, if the
/// check has one.
pub(crate) async fn probe(
    t: &ProbeTarget,
    clients: &HttpClients,
    own: Option<&OwnClient>,
) -> CheckResult {
    let at = SystemTime::now();
    let start = Instant::now();
    let addr = SocketAddr::from((t.addr, t.port));
    let plain = |r: Result<String, String>| r.map(|d| (d, None)).map_err(Failure::from);
    let outcome: Result<Outcome, _> = tokio::time::timeout(t.check.timeout, async {
        match t.check.kind {
            CheckKind::None => Ok(("no check".to_string(), None)),
            CheckKind::Tcp => plain(
                TcpStream::connect(addr)
                    .await
                    .map(|_| "connected".to_string())
                    .map_err(|e| io_reason(&e)),
            ),
            CheckKind::Http | CheckKind::Https => plain(http_check(t, addr, clients, own).await),
            CheckKind::Postgres => postgres_check(t, addr).await,
        }
    })
    .await;
    let latency = start.elapsed();
    let (ok, detail, timeline, wrong_role) = match outcome {
        Ok(Ok((d, timeline))) => (true, d, timeline, false),
        Ok(Err(f)) => (false, f.reason, None, f.wrong_role),
        Err(_) => (
            false,
            format!("timeout after {}", fmt_duration(t.check.timeout)),
            None,
            false,
        ),
    };
    CheckResult {
        ok,
        detail,
        latency,
        at,
        timeline,
        wrong_role,
    }
}

/// Log in to the backend's own address and ask for its role; the wanted role passes.
async fn postgres_check(t: &ProbeTarget, addr: SocketAddr) -> Outcome {
    let target = PgTarget {
        addr,
        user: t.check.user.clone().unwrap_or_default(),
        database: t.check.database_name().to_string(),
        password_file: t.check.password_file.clone(),
    };
    let status = postgres::probe(&target)
        .await
        .map_err(|e| Failure::from(pg_reason(&e)))?;
    judge_role(t.check.role, status)
}

/// Whether a server's `status` passes a check for `want`.
fn judge_role(want: Role, status: PgStatus) -> Outcome {
    let wrong = |reason: String| Failure {
        reason,
        wrong_role: true,
    };
    match (want, status.role) {
        (Role::Any, _) | (Role::Primary, PgRole::Primary) | (Role::Replica, PgRole::Replica) => {
            Ok((status.to_string(), status.timeline))
        }
        (Role::Primary, PgRole::Replica) => Err(wrong("replica, not a primary".to_string())),
        (Role::Replica, PgRole::Primary) => Err(wrong(format!("{status}, not a replica"))),
    }
}

fn pg_reason(e: &PgProbeError) -> String {
    match e.io() {
        Some(io) => io_reason(io),
        None => e.to_string(),
    }
}

/// GET the check path on the backend's own address: the URL's host is the address, so that is
/// also the Host header; with a TLS name (`own`), the name is the URL's host, resolved to the
/// backend's address by the client.
async fn http_check(
    t: &ProbeTarget,
    addr: SocketAddr,
    clients: &HttpClients,
    own: Option<&OwnClient>,
) -> Result<String, String> {
    let (url, client) = match (t.check.kind, own) {
        (CheckKind::Https, Some(own)) => (
            format!("{}{}", own.target.base_url(), t.check.path),
            own.client.as_ref().map_err(Clone::clone)?,
        ),
        (CheckKind::Https, None) if t.check.verifies() => {
            (format!("https://{addr}{}", t.check.path), &clients.verify)
        }
        (CheckKind::Https, None) => (
            format!("https://{addr}{}", t.check.path),
            &clients.no_verify,
        ),
        _ => (format!("http://{addr}{}", t.check.path), &clients.no_verify),
    };
    let mut resp = client.get(&url).send().await.map_err(|e| http_reason(&e))?;
    let status = resp.status().as_u16();
    if !t.check.expect_status.contains(status) {
        return Err(format!("HTTP {status}"));
    }
    if let Some(want) = &t.check.expect_body {
        let mut body = Vec::new();
        while body.len() < MAX_BODY {
            match resp.chunk().await.map_err(|e| http_reason(&e))? {
                Some(chunk) => body.extend_from_slice(&chunk),
                None => break,
            }
        }
        body.truncate(MAX_BODY);
        let found = body
            .windows(want.len().max(1))
            .any(|w| w == want.as_bytes());
        if !found {
            return Err(format!("body does not contain {want:?}"));
        }
    }
    Ok(format!("HTTP {status}"))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::{Proto, ServiceKey, check::CheckSpec};
    use std::{net::IpAddr, time::Duration};
    use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpListener};

    fn key() -> ServiceKey {
        ServiceKey {
            addr: IpAddr::from([10, 111, 100, 1]),
            port: 80,
            proto: Proto::Tcp,
        }
    }

    pub(in crate::agent::health) fn target(
        kind: CheckKind,
        port: u16,
        f: impl FnOnce(&mut CheckSpec),
    ) -> ProbeTarget {
        let mut check = CheckSpec::default_for(Proto::Tcp);
        check.kind = kind;
        check.timeout = Duration::from_millis(500);
        f(&mut check);
        ProbeTarget {
            key: key(),
            addr: IpAddr::from([127, 0, 0, 1]),
            port,
            check,
            generation: 1,
        }
    }

    /// A one-shot HTTP server on 127.0.0.1 answering every connection with `response`.
    async fn http_server(response: &'static str) -> u16 {
        http_server_on(IpAddr::from([127, 0, 0, 1]), response).await
    }

    /// An HTTP server on `addr` answering every connection with `response`; the request must
    /// name `addr` and the port as its host (IPv6 in brackets).
    async fn http_server_on(addr: IpAddr, response: &'static str) -> u16 {
        let l = TcpListener::bind((addr, 0)).await.unwrap();
        let local = l.local_addr().unwrap();
        let host = format!("host: {local}\r\n");
        let port = local.port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let host = host.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let req = String::from_utf8_lossy(&got);
                    assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
                    assert!(req.to_lowercase().contains(&host), "{req}");
                    let _ = s.write_all(response.as_bytes()).await;
                });
            }
        });
        port
    }

    #[test]
    fn roles_pass_or_fail_as_wanted() {
        let primary = PgStatus {
            role: PgRole::Primary,
            timeline: Some(2),
        };
        let wrong = |reason: &str| Failure {
            reason: reason.to_string(),
            wrong_role: true,
        };
        let replica = PgStatus {
            role: PgRole::Replica,
            timeline: None,
        };
        assert_eq!(
            judge_role(Role::Primary, primary),
            Ok(("primary (timeline 2)".to_string(), Some(2)))
        );
        assert_eq!(
            judge_role(Role::Primary, replica),
            Err(wrong("replica, not a primary"))
        );
        assert_eq!(
            judge_role(Role::Replica, replica),
            Ok(("replica".to_string(), None))
        );
        assert_eq!(
            judge_role(Role::Replica, primary),
            Err(wrong("primary (timeline 2), not a replica"))
        );
        assert!(judge_role(Role::Any, primary).is_ok() && judge_role(Role::Any, replica).is_ok());
    }

    #[tokio::test]
    async fn postgres_checks_word_connection_failures() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let clients = HttpClients::new().unwrap();
        let t = target(CheckKind::Postgres, port, |c| {
            c.role = Role::Primary;
            c.user = Some("xlbcheck".into());
        });
        let r = probe(&t, &clients, None).await;
        assert_eq!(
            (r.ok, r.detail.as_str(), r.timeline),
            (false, "connection refused", None)
        );
    }

    #[tokio::test]
    async fn tcp_and_http_checks_reach_ipv6_backends() {
        let clients = HttpClients::new().unwrap();
        let v6 = IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
        let l = TcpListener::bind((v6, 0)).await.unwrap();
        let open = l.local_addr().unwrap().port();
        let on_v6 = |kind, port, f: fn(&mut CheckSpec)| ProbeTarget {
            addr: v6,
            ..target(kind, port, f)
        };
        let r = probe(&on_v6(CheckKind::Tcp, open, |_| {}), &clients, None).await;
        assert!(r.ok, "{r:?}");
        drop(l);
        let r = probe(&on_v6(CheckKind::Tcp, open, |_| {}), &clients, None).await;
        assert_eq!((r.ok, r.detail.as_str()), (false, "connection refused"));
        let ok = http_server_on(
            v6,
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        let r = probe(
            &on_v6(CheckKind::Http, ok, |c| c.path = "/healthz".into()),
            &clients,
            None,
        )
        .await;
        assert_eq!((r.ok, r.detail.as_str()), (true, "HTTP 200"), "{r:?}");
    }

    #[tokio::test]
    async fn probes_report_the_reason() {
        let clients = HttpClients::new().unwrap();
        // TCP: a listener passes; a closed port is refused.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap().port();
        let r = probe(&target(CheckKind::Tcp, open, |_| {}), &clients, None).await;
        assert!(r.ok, "{r:?}");
        drop(l);
        let r = probe(&target(CheckKind::Tcp, open, |_| {}), &clients, None).await;
        assert_eq!((r.ok, r.detail.as_str()), (false, "connection refused"));

        let ok = http_server(
            "HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nall ok\n",
        )
        .await;
        let path = |c: &mut CheckSpec| c.path = "/healthz".into();
        let r = probe(&target(CheckKind::Http, ok, path), &clients, None).await;
        assert_eq!((r.ok, r.detail.as_str()), (true, "HTTP 200"));
        let r = probe(
            &target(CheckKind::Http, ok, |c| {
                path(c);
                c.expect_body = Some("ok".into());
            }),
            &clients,
            None,
        )
        .await;
        assert!(r.ok, "{r:?}");
        let r = probe(
            &target(CheckKind::Http, ok, |c| {
                path(c);
                c.expect_body = Some("ready".into());
            }),
            &clients,
            None,
        )
        .await;
        assert_eq!(r.detail, "body does not contain \"ready\"");

        let bad = http_server(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        let r = probe(&target(CheckKind::Http, bad, path), &clients, None).await;
        assert_eq!((r.ok, r.detail.as_str()), (false, "HTTP 503"));

        // A server that accepts but never answers: the timeout is the reason.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let r = probe(
            &target(CheckKind::Http, port, |c| {
                path(c);
                c.timeout = Duration::from_millis(100);
            }),
            &clients,
            None,
        )
        .await;
        assert_eq!((r.ok, r.detail.as_str()), (false, "timeout after 100ms"));
        assert!(r.latency >= Duration::from_millis(100));
        // TLS against a plain-HTTP server fails with a TLS reason, not a hang.
        let r = probe(&target(CheckKind::Https, ok, path), &clients, None).await;
        assert!(!r.ok, "{r:?}");
        drop(silent);
    }
}
