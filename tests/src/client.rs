//! A client that keeps opening new connections to the VIP from the `cli` namespace — one
//! `GET /` with `Connection: close` every [`ClientOptions::every`] — and records, per request, when
//! it started and ended and which backend answered or what went wrong. Bounded in time and count,
//! stopped on demand or on drop.

use crate::{http, netns::Netns};
use anyhow::{Result, anyhow};
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Start of one request to the start of the next (if a request takes longer, the next one
    /// starts right after it).
    pub every: Duration,
    /// Connect timeout, and the timeout of each read and write.
    pub timeout: Duration,
    /// The client stops by itself after this long…
    pub max_duration: Duration,
    /// …or this many requests.
    pub max_requests: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            every: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
            max_duration: Duration::from_secs(30),
            max_requests: 3000,
        }
    }
}

/// One request of the client.
#[derive(Clone, Debug)]
pub struct Request {
    pub start: Instant,
    pub end: Instant,
    /// The backend's name (the body of `GET /`), or the error.
    pub outcome: Result<String, String>,
    /// The connection's source port, if it connected (with the VIP as destination it names the
    /// flow).
    pub local_port: Option<u16>,
}

impl Request {
    pub fn answered_by(&self, backend: &str) -> bool {
        self.outcome.as_deref() == Ok(backend)
    }

    pub fn failed(&self) -> bool {
        self.outcome.is_err()
    }
}

pub struct ContinuousClient {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Vec<Request>>>>,
    pub started: Instant,
}

impl ContinuousClient {
    /// Starts requesting `GET http://target/` from a thread inside `ns`.
    pub fn start(ns: &Netns, target: SocketAddr, options: ClientOptions) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let started = Instant::now();
        let handle = ns.spawn(move || run(target, &options, &flag, started));
        Self {
            stop,
            handle: Some(handle),
            started,
        }
    }

    /// Stops the client (the request in flight finishes, bounded by its timeouts) and returns what
    /// it recorded.
    pub fn stop(mut self) -> Result<Vec<Request>> {
        self.finish()
    }

    fn finish(&mut self) -> Result<Vec<Request>> {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self
            .handle
            .take()
            .ok_or_else(|| anyhow!("client already stopped"))?;
        handle
            .join()
            .map_err(|_| anyhow!("the client thread panicked"))?
    }
}

impl Drop for ContinuousClient {
    fn drop(&mut self) {
        if self.handle.is_some() {
            let _ = self.finish();
        }
    }
}

fn run(
    target: SocketAddr,
    options: &ClientOptions,
    stop: &AtomicBool,
    started: Instant,
) -> Vec<Request> {
    let mut requests = Vec::new();
    let mut next = started;
    while !stop.load(Ordering::SeqCst)
        && started.elapsed() < options.max_duration
        && requests.len() < options.max_requests
    {
        let now = Instant::now();
        if now < next {
            thread::sleep(next - now);
            continue;
        }
        let start = Instant::now();
        let mut local_port = None;
        let outcome = http::open(target, "/", options.timeout)
            .and_then(|stream| {
                local_port = stream.local_port();
                let status = stream.status;
                let body = stream.body(options.timeout)?;
                Ok((status, String::from_utf8_lossy(&body).trim().to_string()))
            })
            .map_err(|e| format!("{e:#}"))
            .and_then(|(status, text)| match status {
                200 => Ok(text),
                _ => Err(format!("HTTP {status}: {text}")),
            });
        requests.push(Request {
            start,
            end: Instant::now(),
            outcome,
            local_port,
        });
        next = start + options.every;
    }
    requests
}

/// Requests that started in `[from, to)`.
pub fn started_between(requests: &[Request], from: Instant, to: Instant) -> Vec<&Request> {
    requests
        .iter()
        .filter(|r| r.start >= from && r.start < to)
        .collect()
}

/// How many requests each backend answered, and the errors under `"error"`.
pub fn tally<'a>(requests: impl IntoIterator<Item = &'a Request>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in requests {
        let key = match &r.outcome {
            Ok(b) => b.clone(),
            Err(_) => "error".to_string(),
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

/// A one-line summary of `requests` relative to `t0`: `+0.412s be2`, `+0.433s ERR …`; for
/// assertion messages.
pub fn timeline(requests: &[&Request], t0: Instant) -> String {
    requests
        .iter()
        .map(|r| {
            let at = r.start.saturating_duration_since(t0).as_secs_f64()
                - t0.saturating_duration_since(r.start).as_secs_f64();
            match &r.outcome {
                Ok(b) => format!("{at:+.3}s {b}"),
                Err(e) => format!("{at:+.3}s ERR {e}"),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
