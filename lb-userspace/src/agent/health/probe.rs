//! One health check of one backend: a TCP connect or an HTTP(S) GET, bounded by the check's
//! timeout, with the reason of a failure in a few words.

use super::{CheckResult, HealthError, ProbeTarget};
use crate::{
    model::check::CheckKind,
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

impl HttpClients {
    pub(crate) fn new() -> Result<Self, HealthError> {
        // reqwest (rustls with the `ring` provider, no default features): a maintained HTTP/1.1
        // client with TLS that builds without cmake or OpenSSL on this toolchain.
        let build = |verify: bool| {
            reqwest::Client::builder()
                // Checks go straight to the backend, never through a proxy from the environment.
                .no_proxy()
                // A fresh connection per check (as HAProxy): a pooled one would hide a listener
                // that stopped accepting.
                .pool_max_idle_per_host(0)
                // A 3xx is judged by `expect_status`, not followed elsewhere.
                .redirect(reqwest::redirect::Policy::none())
                .danger_accept_invalid_certs(!verify)
                .user_agent(concat!("xlb-health-check/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        Ok(HttpClients {
            verify: build(true)?,
            no_verify: build(false)?,
        })
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

/// The most specific reason in a reqwest error's chain (the innermost I/O error if any).
fn http_reason(e: &reqwest::Error) -> String {
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

/// Run one check of `t` (bounded by its timeout).
pub(crate) async fn probe(t: &ProbeTarget, clients: &HttpClients) -> CheckResult {
    let at = SystemTime::now();
    let start = Instant::now();
    let addr = SocketAddr::from((t.addr, t.port));
    let outcome = tokio::time::timeout(t.check.timeout, async {
        match t.check.kind {
            CheckKind::None => Ok("no check".to_string()),
            CheckKind::Tcp => TcpStream::connect(addr)
                .await
                .map(|_| "connected".to_string())
                .map_err(|e| io_reason(&e)),
            CheckKind::Http | CheckKind::Https => http_check(t, addr, clients).await,
        }
    })
    .await;
    let latency = start.elapsed();
    let (ok, detail) = match outcome {
        Ok(Ok(d)) => (true, d),
        Ok(Err(reason)) => (false, reason),
        Err(_) => (
            false,
            format!("timeout after {}", fmt_duration(t.check.timeout)),
        ),
    };
    CheckResult {
        ok,
        detail,
        latency,
        at,
    }
}

/// GET the check path on the backend's own address: the URL's host is the address, so that is
/// also the Host header.
async fn http_check(
    t: &ProbeTarget,
    addr: SocketAddr,
    clients: &HttpClients,
) -> Result<String, String> {
    let (scheme, client) = match (t.check.kind, t.check.tls_verify) {
        (CheckKind::Https, true) => ("https", &clients.verify),
        (CheckKind::Https, false) => ("https", &clients.no_verify),
        _ => ("http", &clients.no_verify),
    };
    let url = format!("{scheme}://{addr}{}", t.check.path);
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
    use std::{net::Ipv4Addr, time::Duration};
    use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpListener};

    fn key() -> ServiceKey {
        ServiceKey {
            addr: Ipv4Addr::new(10, 111, 100, 1),
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
            addr: Ipv4Addr::LOCALHOST,
            port,
            check,
            generation: 1,
        }
    }

    /// A one-shot HTTP server on 127.0.0.1 answering every connection with `response`.
    async fn http_server(response: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
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
                    assert!(req.to_lowercase().contains("host: 127.0.0.1:"), "{req}");
                    let _ = s.write_all(response.as_bytes()).await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn probes_report_the_reason() {
        let clients = HttpClients::new().unwrap();
        // TCP: a listener passes; a closed port is refused.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap().port();
        let r = probe(&target(CheckKind::Tcp, open, |_| {}), &clients).await;
        assert!(r.ok, "{r:?}");
        drop(l);
        let r = probe(&target(CheckKind::Tcp, open, |_| {}), &clients).await;
        assert_eq!((r.ok, r.detail.as_str()), (false, "connection refused"));

        let ok = http_server(
            "HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nall ok\n",
        )
        .await;
        let path = |c: &mut CheckSpec| c.path = "/healthz".into();
        let r = probe(&target(CheckKind::Http, ok, path), &clients).await;
        assert_eq!((r.ok, r.detail.as_str()), (true, "HTTP 200"));
        let r = probe(
            &target(CheckKind::Http, ok, |c| {
                path(c);
                c.expect_body = Some("ok".into());
            }),
            &clients,
        )
        .await;
        assert!(r.ok, "{r:?}");
        let r = probe(
            &target(CheckKind::Http, ok, |c| {
                path(c);
                c.expect_body = Some("ready".into());
            }),
            &clients,
        )
        .await;
        assert_eq!(r.detail, "body does not contain \"ready\"");

        let bad = http_server(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        let r = probe(&target(CheckKind::Http, bad, path), &clients).await;
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
        )
        .await;
        assert_eq!((r.ok, r.detail.as_str()), (false, "timeout after 100ms"));
        assert!(r.latency >= Duration::from_millis(100));
        // TLS against a plain-HTTP server fails with a TLS reason, not a hang.
        let r = probe(&target(CheckKind::Https, ok, path), &clients).await;
        assert!(!r.ok, "{r:?}");
        drop(silent);
    }
}
