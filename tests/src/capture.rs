//! Packet captures with `tcpdump` inside a test namespace, bounded in time, and a byte search
//! over what they caught: for checking what crosses a link in clear.

use crate::{cmd::wait_for, netns::Netns, process::Process};
use anyhow::{Context, Result, ensure};
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// `tcpdump` writing `filter`'s packets on `iface` to a pcap file; stopped by pid on drop.
pub struct Capture {
    process: Process,
    file: PathBuf,
}

impl Capture {
    /// Starts the capture and returns once tcpdump listens. `limit` bounds its life (`timeout`
    /// ends it even if the test never does); `-U` writes every packet as it comes, so the file is
    /// complete as soon as tcpdump has exited.
    pub fn start(
        ns: &Netns,
        iface: &str,
        filter: &str,
        file: &Path,
        limit: Duration,
    ) -> Result<Self> {
        let mut cmd = ns.command("timeout");
        cmd.arg(limit.as_secs().max(1).to_string())
            // -Z root: tcpdump would otherwise drop to its own user, which cannot write into
            // the test's private directory.
            .args([
                "tcpdump", "-n", "-U", "-s", "0", "-Z", "root", "-i", iface, "-w",
            ])
            .arg(file)
            .arg(filter);
        let log = file.with_extension("log");
        let mut process = Process::spawn(&format!("tcpdump on {iface}"), &mut cmd, &log)?;
        wait_for("tcpdump to listen", Duration::from_secs(10), || {
            process.ensure_running()?;
            Ok(process.log().contains("listening on").then_some(()))
        })?;
        Ok(Capture {
            process,
            file: file.to_path_buf(),
        })
    }

    /// Stops tcpdump (SIGINT, which `timeout` passes on) and returns the pcap file's bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        let status = self
            .process
            .signal_and_wait(libc::SIGINT, Duration::from_secs(5))
            .with_context(|| format!("tcpdump did not stop: {}", self.process.log()))?;
        let log = self.process.log();
        // tcpdump exits 0 on SIGINT; `timeout` 124 if its limit came first (the file is whole
        // either way, but the test then ran longer than it meant to).
        ensure!(status.success(), "tcpdump ended with {status}: {log}");
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        // A pcap file starts with a 24-byte header; anything less is no capture.
        ensure!(bytes.len() > 24, "empty capture: {log}");
        Ok(bytes)
    }
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// How many times `needle` occurs in `haystack` (overlapping occurrences count).
pub fn count(haystack: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() {
        return 0;
    }
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search() {
        let hay = [1, 2, 10, 111, 0, 2, 9, 10, 111, 0, 2];
        assert!(contains(&hay, &[10, 111, 0, 2]));
        assert!(!contains(&hay, &[10, 111, 0, 3]));
        assert!(!contains(&hay, &[]));
        assert_eq!(count(&hay, &[10, 111, 0, 2]), 2);
        assert_eq!(count(&[0, 0, 0], &[0, 0]), 2);
    }
}
