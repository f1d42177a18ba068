//! The CLI's side of the protocol: connect to the agent's socket, send one request line, read one
//! response line. Blocking std I/O: a CLI invocation does exactly one round trip.

use crate::{
    api::{MAX_LINE, Request, Response},
    util::os_message,
};
use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

/// How long the CLI waits for the agent; every request is a few map updates, so this only trips
/// on a wedged agent.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("cannot reach xlb agent at {}: {} (is 'xlb agent' running?)", path.display(), os_message(source))]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to xlb agent at {}: {}", path.display(), os_message(source))]
    Io { path: PathBuf, source: io::Error },
    #[error("xlb agent at {} closed the connection without answering", path.display())]
    NoResponse { path: PathBuf },
    #[error("xlb agent at {} sent an unreadable response: {source}", path.display())]
    BadResponse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The agent refused the request; the message names the problem.
    #[error("{0}")]
    Agent(String),
}

/// Send `req` to the agent at `socket` and return its answer. `Response::Error` is turned into
/// `ClientError::Agent`, so callers only see successful responses.
pub(crate) fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let path = || socket.to_path_buf();
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: path(),
        source,
    })?;
    let io_err = |source| ClientError::Io {
        path: path(),
        source,
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;

    let mut line = serde_json::to_vec(req).expect("requests serialise to JSON");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_err)?;

    let mut reader = BufReader::new((&stream).take(MAX_LINE as u64));
    let mut buf = Vec::new();
    let n = reader.read_until(b'\n', &mut buf).map_err(io_err)?;
    if n == 0 {
        return Err(ClientError::NoResponse { path: path() });
    }
    let resp: Response =
        serde_json::from_slice(&buf).map_err(|source| ClientError::BadResponse {
            path: path(),
            source,
        })?;
    match resp {
        Response::Error { message } => Err(ClientError::Agent(message)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn missing_agent_is_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("xlb.sock");
        let e = call(&sock, &Request::VipList).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot reach xlb agent at {}: No such file or directory (is 'xlb agent' running?)",
                sock.display()
            )
        );
    }

    #[test]
    fn round_trip_against_a_fake_agent() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("xlb.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [
                Response::Done {
                    message: "ok".into(),
                },
                Response::Error {
                    message: "unknown VIP 10.111.100.1:81/tcp".into(),
                },
            ] {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                assert_eq!(
                    serde_json::from_str::<Request>(&line).unwrap(),
                    Request::Stats
                );
                let mut out = serde_json::to_vec(&answer).unwrap();
                out.push(b'\n');
                (&s).write_all(&out).unwrap();
            }
        });
        assert_eq!(
            call(&sock, &Request::Stats).unwrap(),
            Response::Done {
                message: "ok".into()
            }
        );
        let e = call(&sock, &Request::Stats).unwrap_err();
        assert_eq!(e.to_string(), "unknown VIP 10.111.100.1:81/tcp");
        server.join().unwrap();
    }
}
