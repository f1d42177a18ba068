//! Prometheus metrics: `GET /metrics` on `--metrics-listen ADDR:PORT`.
//!
//! Nothing is kept in metric objects between scrapes. Each scrape asks the serve loop for the
//! same `StatsReport` that `xlb stats --json` prints (per-CPU kernel counters summed by the
//! agent, the health book, the cached flow-table count) and reads the peer-sync status the same
//! way `xlb peers` does, then renders both here, in the HTTP task: the serve loop only builds the
//! report, exactly as for a CLI `stats` request, so `/metrics` and `xlb stats` can never disagree
//! and a scrape costs the loop no more than one `xlb stats`. The XDP program is not involved:
//! reading per-CPU arrays from userspace does not touch its hot path.
//!
//! The output is the Prometheus text format 0.0.4 (the `prometheus` crate's `TextEncoder`), not
//! OpenMetrics: Debian 12's `promtool check metrics` (2.42) rejects OpenMetrics' `info` type and
//! its counter family names without `_total`.

pub(crate) mod render;

pub(crate) use render::render;

use crate::{
    agent::{controller::ControllerError, flows::FlowCounter},
    api::StatsReport,
    sync::SyncStatus,
};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::{convert::Infallible, io, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How a scrape asks the serve loop for the stats report: it sends where the answer goes.
pub(crate) type StatsReply = oneshot::Sender<Result<StatsReport, ControllerError>>;

/// Capacity of the scrape → serve loop queue; a scrape that finds it full is answered 503 rather
/// than queueing behind a backlog of others.
pub(crate) const SCRAPE_QUEUE: usize = 8;
/// How long a scrape waits for the serve loop (it may be applying a change).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send its request headers within this (no slow-loris holding a task).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on one connection's life (one request: keep-alive is off).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 32;

/// The media type of the text format 0.0.4.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub(crate) enum MetricsError {
    #[error("cannot listen for metrics scrapes on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("building metric {name}: {source}")]
    Metric {
        name: &'static str,
        source: prometheus::Error,
    },
    #[error("encoding metrics: {0}")]
    Encode(prometheus::Error),
}

/// Bind the metrics listener (done before the data path is loaded, so a taken port fails the
/// start instead of a half-started agent).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serve `/metrics` on `listener` until `cancel` is cancelled; each connection is a task of
/// `tasks` and ends with the same token. Each scrape sends a `StatsReply` on `scrapes` (answered
/// by the serve loop) and reads `sync` directly (lock-free counters).
pub(crate) async fn serve(
    listener: TcpListener,
    scrapes: mpsc::Sender<StatsReply>,
    sync: Option<SyncStatus>,
    flows: Arc<FlowCounter>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    log::warn!("accepting a metrics connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            log::debug!("metrics: {MAX_CONNECTIONS} connections open; closing {peer}");
            continue;
        };
        let scraper = Scraper {
            scrapes: scrapes.clone(),
            sync: sync.clone(),
            flows: flows.clone(),
        };
        let cancel = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = connection(stream, peer, scraper) => {}
            }
            drop(slot);
        });
    }
}

/// What answering a scrape needs.
#[derive(Clone)]
struct Scraper {
    scrapes: mpsc::Sender<StatsReply>,
    sync: Option<SyncStatus>,
    flows: Arc<FlowCounter>,
}

/// One HTTP connection: one request (keep-alive is off), bounded in time.
async fn connection(stream: TcpStream, peer: SocketAddr, scraper: Scraper) {
    let service = hyper::service::service_fn(move |req| {
        let scraper = scraper.clone();
        async move { Ok::<_, Infallible>(answer(req, scraper).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // One request per connection: scrapers reconnect cheaply, and no idle connection holds
        // one of the MAX_CONNECTIONS slots.
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("metrics connection from {peer}: {e}"),
        Err(_) => log::debug!("metrics connection from {peer} timed out"),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn answer(req: Request<Incoming>, scraper: Scraper) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD\n".to_string(),
        );
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match req.uri().path() {
        "/metrics" => match scraper.scrape().await {
            Ok(body) => {
                let mut resp = text(StatusCode::OK, body);
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(CONTENT_TYPE),
                );
                resp
            }
            Err((status, message)) => text(status, format!("{message}\n")),
        },
        "/" => text(
            StatusCode::OK,
            "xlb agent: Prometheus metrics at /metrics\n".to_string(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics\n".to_string(),
        ),
    }
}

impl Scraper {
    /// The text of one scrape, or the status and message of why there is none.
    async fn scrape(&self) -> Result<String, (StatusCode, String)> {
        let unavailable = |m: String| (StatusCode::SERVICE_UNAVAILABLE, m);
        // The counts of a walk of the flow table, made here, not in the serve loop.
        self.flows.prepare().await;
        let (reply, answer) = oneshot::channel();
        if self.scrapes.try_send(reply).is_err() {
            return Err(unavailable(
                "too many scrapes waiting for the agent, or it is shutting down".to_string(),
            ));
        }
        let stats = match tokio::time::timeout(SCRAPE_TIMEOUT, answer).await {
            Ok(Ok(Ok(stats))) => stats,
            Ok(Ok(Err(e))) => return Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            Ok(Err(_)) => return Err(unavailable("the agent is shutting down".to_string())),
            Err(_) => {
                return Err(unavailable(format!(
                    "the agent did not answer within {SCRAPE_TIMEOUT:?}"
                )));
            }
        };
        let peers = self.sync.as_ref().map(SyncStatus::report);
        render(&stats, peers.as_ref()).map_err(|e| {
            log::error!("metrics scrape: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{flows::tests::FakeTable, metrics::render::tests::stats};
    use std::io::{Read, Write};

    /// A blocking HTTP/1.0-style GET against `addr`: status line and body.
    fn get(addr: SocketAddr, method: &str, path: &str) -> (String, String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.lines().next().unwrap().to_string();
        (status, head.to_string(), body.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_scrapes_from_the_loops_report() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel::<StatsReply>(SCRAPE_QUEUE);
        let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
        let flows = FlowCounter::new(FakeTable::new(0, Duration::ZERO), tasks.clone());
        let server = tokio::spawn(serve(
            listener,
            tx,
            None,
            flows,
            cancel.clone(),
            tasks.clone(),
        ));
        // Stands in for the serve loop: the first scrape gets a report, the second an error.
        let answered = tokio::spawn(async move {
            let first = rx.recv().await.unwrap();
            first.send(Ok(stats())).unwrap();
            let second = rx.recv().await.unwrap();
            second
                .send(Err(ControllerError::Stats {
                    source: "boom".into(),
                }))
                .unwrap();
        });
        let (ok, err, other, post) = tokio::task::spawn_blocking(move || {
            (
                get(addr, "GET", "/metrics"),
                get(addr, "GET", "/metrics"),
                get(addr, "GET", "/nope"),
                get(addr, "POST", "/metrics"),
            )
        })
        .await
        .unwrap();
        answered.await.unwrap();
        assert!(ok.0.contains(" 200 "), "{ok:?}");
        assert!(
            ok.1.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{}",
            ok.1
        );
        assert_eq!(ok.2, render(&stats(), None).unwrap());
        assert!(err.0.contains(" 500 ") && err.2.contains("boom"), "{err:?}");
        assert!(other.0.contains(" 404 "), "{other:?}");
        assert!(post.0.contains(" 405 "), "{post:?}");
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("the metrics server stops")
            .unwrap();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(3), tasks.wait())
            .await
            .expect("its connections end");
    }

    #[tokio::test]
    async fn a_taken_port_is_a_one_line_error() {
        let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = first.local_addr().unwrap();
        let e = bind(addr).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot listen for metrics scrapes on {addr}: ")),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }
}
