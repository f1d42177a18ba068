//! Small helpers every layer uses: OS error text, atomic file writes, wall-clock milliseconds,
//! durations and ages for people, one-line messages, and interface lookup.

use std::{
    ffi::CString,
    fs,
    io::{self, Write},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// `io::Error`'s text without the " (os error N)" suffix, which means nothing to an operator.
pub(crate) fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// Write `bytes` to `path` so that readers (and a crash) see the old content or the new, never a
/// mix: temporary file in the same directory, fsync, rename over, fsync the directory (so the
/// rename itself survives a power loss).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: a leftover temporary file is harmless but untidy.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Milliseconds since the Unix epoch (0 for times before it, which a clock never reports here).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A configured duration, exactly: `200ms`, `1s`, `1m 30s` (humantime's form, which is also
/// what `parse_duration` reads back).
pub(crate) fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// An age at a glance, always one word (tables are split on whitespace): `350ms`, `1.5s`, `12s`,
/// `3m12s`, `2h5m`, `3d4h` — tenths below a minute, then the two largest units.
pub(crate) fn fmt_age(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    match s {
        0 => format!("{ms}ms"),
        1..60 => match (ms % 1_000) / 100 {
            0 => format!("{s}s"),
            tenths => format!("{s}.{tenths}s"),
        },
        60..3_600 => format!("{}m{}s", s / 60, s % 60),
        3_600..86_400 => format!("{}h{}m", s / 3_600, s % 3_600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3_600),
    }
}

/// `text` with its lines trimmed and joined by "; ", empty lines dropped: every error xlb
/// prints is one line, also when it carries multi-line text from elsewhere (the verifier's log,
/// toml's source excerpts).
pub(crate) fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// An error of any kind, kept as the cause of another (across layers that must not know each
/// other's error types, and across channels).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An interface name the kernel does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("interface {0:?} does not exist")]
pub struct NoSuchInterface(pub String);

/// The index of interface `name` in the calling thread's network namespace.
pub fn interface_index(name: &str) -> Result<u32, NoSuchInterface> {
    let missing = || NoSuchInterface(name.to_string());
    let c = CString::new(name).map_err(|_| missing())?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(missing()),
        index => Ok(index),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_one_word() {
        assert_eq!(fmt_age(Duration::from_millis(350)), "350ms");
        assert_eq!(fmt_age(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(fmt_age(Duration::from_secs(12)), "12s");
        assert_eq!(fmt_age(Duration::from_millis(61_000)), "1m1s");
        assert_eq!(fmt_age(Duration::from_secs(75)), "1m15s");
        assert_eq!(fmt_age(Duration::from_secs(3725)), "1h2m");
        assert_eq!(fmt_age(Duration::from_secs(3 * 86_400 + 4 * 3_600)), "3d4h");
        assert_eq!(fmt_duration(Duration::from_millis(200)), "200ms");
    }

    #[test]
    fn multi_line_text_becomes_one_line() {
        assert_eq!(one_line("a\n  b \n\nc\n"), "a; b; c");
    }

    #[test]
    fn os_errors_lose_the_errno_suffix() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(os_message(&e), "No such file or directory");
    }

    #[test]
    fn missing_interface_is_named() {
        let e = interface_index("xlb-nope0").unwrap_err();
        assert_eq!(e.to_string(), "interface \"xlb-nope0\" does not exist");
        assert!(interface_index("lo").is_ok());
    }
}
