//! Running external commands with a deadline: every load and every wait in the test bed is bounded,
//! so a hung `curl`, `ip` or `xlb` fails the test instead of hanging it.

use anyhow::{Context, Result, bail};
use std::{
    io::Read,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Default deadline for short administrative commands (`ip`, `ethtool`, the `xlb` CLI).
pub const SHORT: Duration = Duration::from_secs(20);

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The output as `Ok` when the command succeeded, otherwise an error quoting it.
    pub fn checked(self) -> Result<Output> {
        if !self.success() {
            bail!(
                "`{}` failed ({}): {}{}",
                self.command,
                self.status,
                self.stderr.trim(),
                if self.stdout.trim().is_empty() {
                    String::new()
                } else {
                    format!(" / stdout: {}", self.stdout.trim())
                }
            );
        }
        Ok(self)
    }
}

/// `program args…` as one readable string, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, killing it (by its pid) if it outlives `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let command = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{command}`"))?;
    // Drain both pipes concurrently so a chatty child never blocks on a full pipe.
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let status = wait_deadline(&mut child, timeout);
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            command,
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "`{command}` did not finish within {timeout:?} and was killed; stderr: {}",
            stderr.trim()
        ),
    }
}

/// Runs `program args…` with the short deadline; errors if it fails.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    run_timeout(Command::new(program).args(args), SHORT)?.checked()
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` until `timeout`; on expiry kills it by pid, reaps it and returns `None`.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            _ => {
                // Child::kill sends SIGKILL to this child's pid only.
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Polls `probe` until it returns `Ok(Some(_))` or `timeout` passes; the last error or "still
/// not ready" explains a timeout.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    wait_for_every(what, timeout, Duration::from_millis(50), probe)
}

/// [`wait_for`], probing every `every` (10 ms where the wait itself is what a test measures).
pub fn wait_for_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not ready");
    loop {
        match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        thread::sleep(every);
    }
}
