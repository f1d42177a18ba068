//! Is the routing daemon there? The agent cannot know that the daemon imports its table, but with
//! `--bird-socket` it can ask BIRD whether it runs at all: connect to the control socket, read the
//! greeting (`0001 BIRD 2.0.12 ready.`), send `show status` and expect `0013 Daemon is up and
//! running`. The socket file alone proves nothing (it outlives a killed BIRD).
//!
//! BIRD's control protocol is line based: each reply line starts with a 4-digit code and a `-`
//! (more lines follow) or a space (the last line); 0xxx is done, 1xxx a table row, 2xxx a table
//! header, 8xxx and 9xxx errors.

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    sync::watch,
};
use tokio_util::sync::CancellationToken;

/// How often the daemon is asked.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// A daemon that needs longer than this for `show status` counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The last answer (or silence) of the routing daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DaemonStatus {
    pub(crate) socket: PathBuf,
    pub(crate) answers: bool,
    /// `BIRD 2.0.12`, or why nobody answers (`connection refused`).
    pub(crate) detail: String,
    pub(crate) at: SystemTime,
}

/// Ask BIRD on `socket` once: its name and version, or why it does not answer.
pub(crate) async fn probe(socket: &Path) -> Result<String, String> {
    match tokio::time::timeout(PROBE_TIMEOUT, ask(socket)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => Err(crate::util::os_message(&e)),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

/// The conversation; the outer error is the socket's, the inner one BIRD's.
async fn ask(socket: &Path) -> io::Result<Result<String, String>> {
    let stream = UnixStream::connect(socket).await?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let greeting = lines.next_line().await?.unwrap_or_default();
    let Some(hello) = greeting.strip_prefix("0001 ") else {
        return Ok(Err(format!(
            "not a BIRD control socket (it said {greeting:?})"
        )));
    };
    let name = hello
        .trim_end_matches('.')
        .trim_end_matches(" ready")
        .to_string();
    wr.write_all(b"show status\n").await?;
    while let Some(line) = lines.next_line().await? {
        if line.starts_with("0013") {
            return Ok(Ok(name));
        }
        let code = line
            .get(..4)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
        let last = line.as_bytes().get(4) == Some(&b' ');
        match code {
            Some(c) if c.starts_with('8') || c.starts_with('9') => {
                return Ok(Err(format!(
                    "{name} says {:?}",
                    line.get(5..).unwrap_or("")
                )));
            }
            Some(c) if c.starts_with('0') && last => {
                return Ok(Err(format!("{name} is not up and running: {line:?}")));
            }
            _ => {}
        }
    }
    Ok(Err(format!("{name} closed the connection")))
}

/// Ask the daemon every few seconds until `cancel`, publishing each answer and logging every
/// change (the first answer too): a daemon that does not run means the table is announced to
/// nobody.
pub(crate) async fn watch(
    socket: PathBuf,
    table: u32,
    tx: watch::Sender<Option<DaemonStatus>>,
    cancel: CancellationToken,
) {
    let mut last: Option<bool> = None;
    loop {
        let answer = probe(&socket).await;
        let answers = answer.is_ok();
        let detail = match answer {
            Ok(name) => name,
            Err(why) => why,
        };
        if last != Some(answers) {
            if answers {
                log::info!(
                    "routing daemon {detail} answers on {}; it must import routing table {table} (see contrib/bird)",
                    socket.display()
                );
            } else {
                log::warn!(
                    "no routing daemon answers on {} ({detail}): the VIP routes in routing table {table} are announced to no router until it runs",
                    socket.display()
                );
            }
            last = Some(answers);
        }
        tx.send_replace(Some(DaemonStatus {
            socket: socket.clone(),
            answers,
            detail,
            at: SystemTime::now(),
        }));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncReadExt, net::UnixListener};

    /// A fake BIRD that greets with `greeting` and answers the first command with `reply`.
    async fn fake(dir: &Path, greeting: &'static str, reply: &'static str) -> PathBuf {
        let path = dir.join(format!("bird-{}.ctl", greeting.len() + reply.len()));
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(greeting.as_bytes()).await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            s.write_all(reply.as_bytes()).await.unwrap();
        });
        path
    }

    #[tokio::test]
    async fn bird_up_down_and_strangers() {
        let dir = tempfile::tempdir().unwrap();
        let up = fake(
            dir.path(),
            "0001 BIRD 2.0.12 ready.\n",
            "1000-BIRD 2.0.12\n1011-Router ID is 10.111.1.2\n0013 Daemon is up and running\n",
        )
        .await;
        assert_eq!(probe(&up).await, Ok("BIRD 2.0.12".to_string()));
        let err = fake(
            dir.path(),
            "0001 BIRD 2.0.12 ready.\n",
            "9001 Access denied\n",
        )
        .await;
        assert_eq!(
            probe(&err).await,
            Err("BIRD 2.0.12 says \"Access denied\"".to_string())
        );
        let stranger = fake(dir.path(), "hello\n", "").await;
        assert!(probe(&stranger).await.unwrap_err().contains("not a BIRD"));
        let missing = dir.path().join("nobody.ctl");
        assert_eq!(
            probe(&missing).await,
            Err("No such file or directory".to_string())
        );
    }
}
