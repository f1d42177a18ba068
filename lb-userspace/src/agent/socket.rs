//! The agent's Unix socket: created safely (a live agent is never replaced, a stale socket is),
//! removed when the agent stops, and one task per CLI connection that reads request lines,
//! hands each to the serve loop and writes its answer.

use crate::{
    agent::{flow_query::FlowQueries, flows::FlowCounter},
    api::{MAX_LINE, Request, Response},
    util::os_message,
};
use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SocketError {
    #[error("another xlb agent is already running on {}", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot create agent socket {}: {}", path.display(), os_message(source))]
    Create { path: PathBuf, source: io::Error },
}

/// One request from a connection task, with where to send its answer.
pub(crate) struct Job {
    pub(crate) req: Request,
    pub(crate) reply: oneshot::Sender<Response>,
}

/// The agent's socket file; removed on drop unless another process has replaced it since.
pub(crate) struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(md) if md.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    log::warn!("removing {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }
}

/// Create the socket's directory (0755) if needed, replace a stale socket left by a dead agent,
/// refuse if a live agent answers on it, and bind.
pub(crate) fn bind_socket(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    let err = |source| SocketError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(err)?;
    }
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::AlreadyRunning(path.to_path_buf()));
            }
            log::info!("replacing stale socket {}", path.display());
            fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    let ino = fs::symlink_metadata(path).map_err(err)?.ino();
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            ino,
        },
    ))
}

/// Read request lines from one CLI connection and answer each with one line, until the client
/// closes it or `cancel` is cancelled.
pub(crate) async fn serve_connection(
    stream: UnixStream,
    jobs: mpsc::Sender<Job>,
    flows: Arc<FlowCounter>,
    queries: Arc<FlowQueries>,
    cancel: CancellationToken,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64);
        let n = tokio::select! {
            r = limited.read_until(b'\n', &mut line) => match r {
                Ok(n) => n,
                Err(e) => {
                    log::debug!("reading a CLI request: {e}");
                    return;
                }
            },
            () = cancel.cancelled() => return,
        };
        if n == 0 {
            return;
        }
        let too_long = !line.ends_with(b"\n") && n >= MAX_LINE;
        let resp = if too_long {
            Response::Error {
                message: format!("request longer than {MAX_LINE} bytes"),
            }
        } else {
            tokio::select! {
                resp = answer(&line, &jobs, &flows, &queries) => resp,
                () = cancel.cancelled() => return,
            }
        };
        let mut out = serde_json::to_vec(&resp).expect("responses serialise to JSON");
        out.push(b'\n');
        // A client that does not read its answer must not hold up the shutdown.
        let written = tokio::select! {
            r = write.write_all(&out) => r,
            () = cancel.cancelled() => return,
        };
        if let Err(e) = written {
            log::debug!("answering a CLI request: {e}");
            return;
        }
        if too_long {
            return;
        }
    }
}

/// The answer to one request line: the loop's, except for flow queries, which walk the table
/// here (the loop only tells which VIPs there are). Reports with flow counts first get the counts
/// ready (a walk of the flow table, here, never in the loop).
async fn answer(
    line: &[u8],
    jobs: &mpsc::Sender<Job>,
    flows: &Arc<FlowCounter>,
    queries: &FlowQueries,
) -> Response {
    let req = match serde_json::from_slice::<Request>(line) {
        Ok(req) => req,
        Err(e) => {
            return Response::Error {
                message: format!("malformed request: {e}"),
            };
        }
    };
    if FlowQueries::handles(&req) {
        return match ask_loop(jobs, Request::VipList).await {
            Response::VipList { vips } => queries.answer(req, &vips).await,
            other => other,
        };
    }
    if matches!(req, Request::Stats | Request::BackendList { .. }) {
        flows.prepare().await;
    }
    ask_loop(jobs, req).await
}

/// Hand `req` to the serve loop and wait for its answer.
async fn ask_loop(jobs: &mpsc::Sender<Job>, req: Request) -> Response {
    let (reply, answer) = oneshot::channel();
    let agent_gone = || Response::Error {
        message: "the agent is shutting down".to_string(),
    };
    if jobs.send(Job { req, reply }).await.is_err() {
        return agent_gone();
    }
    answer.await.unwrap_or_else(|_| agent_gone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/xlb.sock");
        let (listener, guard) = bind_socket(&path).unwrap();
        let md = fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(md.mode() & 0o777, 0o755);
        assert!(matches!(
            bind_socket(&path),
            Err(SocketError::AlreadyRunning(_))
        ));
        // A dead agent leaves its socket file behind: nothing listens on it any more.
        drop(listener);
        std::mem::forget(guard);
        assert!(path.exists());
        let (_listener, guard) = bind_socket(&path).unwrap();
        drop(guard);
        assert!(!path.exists(), "the socket file is removed on drop");

        let file = dir.path().join("plain");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            bind_socket(&file),
            Err(SocketError::NotASocket(_))
        ));
    }
}
