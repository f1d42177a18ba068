//! Packet captures with `tcpdump` inside a test namespace, bounded in time, and a byte search
//! over what they caught: for checking what crosses a link in clear.

use crate::{cmd::wait_for, netns::Netns, process::Process};
use anyhow::{Context, Result, bail, ensure};
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
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

/// When each packet of a pcap file (as [`Capture::finish`] returns it) was captured: the
/// record headers' timestamps, in microseconds or nanoseconds as the file's magic says.
pub fn packet_times(pcap: &[u8]) -> Result<Vec<SystemTime>> {
    const MICROS: u32 = 0xa1b2_c3d4;
    const NANOS: u32 = 0xa1b2_3c4d;
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(pcap.get(at..at + 4)?.try_into().ok()?))
    };
    // tcpdump writes the host's byte order: little endian here.
    let per_unit = match u32_at(0) {
        Some(MICROS) => Duration::from_micros(1),
        Some(NANOS) => Duration::from_nanos(1),
        other => bail!("not a little-endian pcap file (magic {other:x?})"),
    };
    let mut times = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let (secs, frac, caplen) = match (u32_at(at), u32_at(at + 4), u32_at(at + 8)) {
            (Some(s), Some(f), Some(c)) => (s, f, c),
            _ => break,
        };
        times.push(UNIX_EPOCH + Duration::from_secs(secs.into()) + per_unit * frac);
        at += 16 + caplen as usize;
    }
    Ok(times)
}

/// The MAC address of `iface` in `ns`.
pub fn mac_of(ns: &Netns, iface: &str) -> Result<String> {
    let out = ns.ip(&["link", "show", "dev", iface])?;
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "link/ether")
        .map(|w| w[1].to_string())
        .with_context(|| format!("no MAC address in `ip link show dev {iface}`: {out}"))
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
    fn pcap_timestamps() {
        let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1];
        pcap.resize(24, 0);
        for (secs, micros, len) in [(1_800_000_000u32, 250_000u32, 3u32), (1_800_000_001, 5, 0)] {
            for v in [secs, micros, len, len] {
                pcap.extend(v.to_le_bytes());
            }
            pcap.extend(vec![0xee; len as usize]);
        }
        let t = packet_times(&pcap).unwrap();
        let at = |s: u64, us: u64| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(us);
        assert_eq!(t, [at(1_800_000_000, 250_000), at(1_800_000_001, 5)]);
        assert!(packet_times(b"not a pcap file at all, no").is_err());
    }

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
