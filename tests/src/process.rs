//! Long-running processes the test bed starts (nginx, socat, the xlb agent). Each is a direct
//! child, so its pid stays ours until we reap it: stopping it by pid can never hit a stranger.

use crate::cmd::{describe, wait_deadline};
use anyhow::{Context, Result, bail};
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

/// A started process; on drop it gets SIGTERM, then SIGKILL if it lingers, and is reaped.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name}: `{}`", describe(cmd)))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// What the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `Some(status)` once the process has exited (and is reaped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Errors (quoting the log) if the process already exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.exited() {
            bail!(
                "{} exited early ({status}); its output:\n{}",
                self.name,
                self.log()
            );
        }
        Ok(())
    }

    /// Sends `signal` and waits up to `timeout` for the exit; `None` if it did not exit in time
    /// (it is then killed and reaped, so the pid is released either way).
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe { libc::kill(self.pid(), signal) };
        let status = wait_deadline(&mut self.child, timeout);
        self.status = Some(match status {
            Some(s) => s,
            None => self.child.wait().expect("reaping a killed child"),
        });
        status
    }

    /// SIGTERM, then the exit status within `timeout` (an error if it had to be killed).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.signal_and_wait(libc::SIGTERM, timeout) {
            Some(status) => Ok(status),
            None => bail!(
                "{} did not exit within {timeout:?} of SIGTERM and was killed; its output:\n{}",
                self.name,
                self.log()
            ),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.signal_and_wait(libc::SIGTERM, Duration::from_secs(3));
    }
}
