//! Many long downloads through the VIP at once, each on its own connection and thread in `cli`:
//! connections that are open while a load balancer is lost, restarted or re-routed. Each records
//! the backend that answered (`X-Backend`, known as soon as the headers are in), and in the end
//! whether the whole body arrived intact and when.

use crate::{http, netns::Netns};
use anyhow::{Context, Result, bail, ensure};
use std::{
    collections::BTreeMap,
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Connect timeout and the timeout of every single read and write. Generous: a download whose
/// packets are lost for a moment recovers by retransmission; a reset still fails at once.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A download whose headers have arrived.
#[derive(Clone, Debug)]
pub struct Opened {
    /// Client's source port: with cli's address and the VIP it identifies the flow.
    pub client_port: u16,
    /// Who answered (`X-Backend`).
    pub backend: String,
    pub opened_at: Instant,
}

/// A download that ended.
#[derive(Clone, Debug)]
pub struct Finished {
    pub client_port: u16,
    pub backend: String,
    /// `Ok` = the whole body arrived and equals the expected content; otherwise what went wrong
    /// (a reset, a timeout, a short or corrupted body).
    pub outcome: Result<(), String>,
    pub finished_at: Instant,
}

/// The outer `Result` is joining the namespace, the inner one the download up to its headers.
type Handle = JoinHandle<Result<Result<Finished>>>;

/// Downloads running in the background.
pub struct LongDownloads {
    pub opened: Vec<Opened>,
    handles: Vec<Handle>,
    /// Clones of the client sockets, shut down on drop so no thread outlives a failed test.
    sockets: Vec<TcpStream>,
}

impl LongDownloads {
    /// Opens `n` connections to `target` from a thread each in `ns`, one after the other, each
    /// sending `GET path` and waiting for the response headers before the next one starts; the
    /// bodies are read in the background and compared with `content`. Each body must be complete
    /// within `deadline` of its request.
    pub fn open(
        ns: &Netns,
        target: SocketAddr,
        path: &str,
        n: usize,
        content: Arc<Vec<u8>>,
        deadline: Duration,
    ) -> Result<Self> {
        let mut downloads = Self {
            opened: Vec::with_capacity(n),
            handles: Vec::with_capacity(n),
            sockets: Vec::with_capacity(n),
        };
        for i in 0..n {
            let (tx, rx) = mpsc::channel();
            let (url_path, content) = (path.to_string(), content.clone());
            let handle = ns.spawn(move || -> Result<Finished> {
                let stream = match http::open(target, &url_path, IO_TIMEOUT) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                let backend = stream.header("x-backend").unwrap_or_default().to_string();
                let opened = (|| -> Result<(u16, TcpStream)> {
                    ensure!(
                        stream.status == 200 && !backend.is_empty(),
                        "HTTP {} with X-Backend {backend:?}",
                        stream.status
                    );
                    let port = stream.local_port().context("no local port")?;
                    Ok((port, stream.conn.try_clone()?))
                })();
                let client_port = match opened {
                    Ok((port, socket)) => {
                        let _ = tx.send(Ok((port, backend.clone(), socket)));
                        port
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                let outcome = stream
                    .body(deadline)
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|body| compare(&body, &content));
                Ok(Finished {
                    client_port,
                    backend,
                    outcome,
                    finished_at: Instant::now(),
                })
            });
            downloads.handles.push(handle);
            match rx.recv_timeout(IO_TIMEOUT * 3) {
                Ok(Ok((client_port, backend, socket))) => {
                    downloads.sockets.push(socket);
                    downloads.opened.push(Opened {
                        client_port,
                        backend,
                        opened_at: Instant::now(),
                    });
                }
                Ok(Err(e)) => bail!("opening download {i} of {n} ({path}): {e}"),
                Err(e) => bail!("opening download {i} of {n} ({path}): {e}"),
            }
        }
        Ok(downloads)
    }

    /// How many opened downloads each backend answered.
    pub fn per_backend(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for o in &self.opened {
            *out.entry(o.backend.clone()).or_default() += 1;
        }
        out
    }

    /// Waits for every download to end (each is bounded by its deadline); in the order opened.
    pub fn finish(mut self) -> Result<Vec<Finished>> {
        let handles = std::mem::take(&mut self.handles);
        let mut out = Vec::with_capacity(handles.len());
        for (i, h) in handles.into_iter().enumerate() {
            let finished = h
                .join()
                .map_err(|_| anyhow::anyhow!("download thread {i} panicked"))?
                .with_context(|| format!("download thread {i}"))?
                .with_context(|| format!("download {i}"))?;
            out.push(finished);
        }
        Ok(out)
    }
}

impl Drop for LongDownloads {
    fn drop(&mut self) {
        if self.handles.is_empty() {
            return;
        }
        // Not finished (a test failed half-way): end the transfers now rather than at their
        // deadline, then reap the threads.
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// `Ok` if `body` is exactly `want`; else where it differs.
fn compare(body: &[u8], want: &[u8]) -> Result<(), String> {
    if body.len() != want.len() {
        return Err(format!(
            "body of {} bytes instead of {}",
            body.len(),
            want.len()
        ));
    }
    match body.iter().zip(want).position(|(a, b)| a != b) {
        Some(at) => Err(format!("body differs from the served file at byte {at}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn compare_finds_length_and_content_differences() {
        assert!(compare(b"abc", b"abc").is_ok());
        assert!(compare(b"ab", b"abc").unwrap_err().contains("2 bytes"));
        assert!(compare(b"abd", b"abc").unwrap_err().contains("byte 2"));
    }
}
