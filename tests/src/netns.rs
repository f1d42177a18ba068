//! Named network namespaces (`ip netns`) owned by a test: created with a per-run prefix, deleted on
//! drop. Nothing here touches the root namespace.

use crate::cmd::{SHORT, run, run_timeout};
use anyhow::{Context, Result, bail};
use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::Duration,
};

/// Every namespace, temporary directory and log of the test bed starts with this.
pub const PREFIX: &str = "xlbt";

/// Panics unless we are root: the namespace tests must fail loudly, never pass by skipping.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test needs root (network namespaces, XDP, bpffs); run it as root, e.g. `cargo xtask test`"
        );
    }
}

/// A name prefix unique to this process and call: `xlbt<pid>x<seq>`. The pid lets a later run
/// recognise leftovers of a run that was killed (see [`sweep_stale`]).
pub fn unique_prefix() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Names of all namespaces (`ip netns list`).
pub fn list() -> Result<Vec<String>> {
    let out = run("ip", &["netns", "list"])?;
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Deletes namespaces left by test processes that no longer exist (killed by a timeout or
/// SIGKILL, so their guards never ran). Processes still inside them are ours from that run; they
/// are killed by pid first so the namespace can really go away.
pub fn sweep_stale() -> Result<()> {
    for name in list()? {
        if !is_stale(&name) {
            continue;
        }
        kill_pids_in(&name);
        // A backend namespace may still carry `xlb backend-host setup`'s record (kept outside the
        // namespace, under /run/xlb); undo it while the namespace still exists to identify it.
        if name.contains("-be")
            && let Some(xlb) = crate::xlb::find_xlb_bin()
        {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &name])
                .arg(xlb)
                .args(["backend-host", "teardown"]);
            let _ = run_timeout(&mut cmd, SHORT);
        }
        let _ = run("ip", &["netns", "del", &name]);
    }
    // Their temporary directories (configs, logs, agent state, bpffs mounts) and database
    // directories too.
    crate::postgres::sweep_stale_dirs(is_stale);
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(is_stale) {
                unmount_below(&entry.path());
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

/// Named `xlbt<pid>x…` by a process that is gone.
fn is_stale(name: &str) -> bool {
    let Some(pid) = name
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.split('x').next())
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

fn kill_pids_in(name: &str) {
    let Ok(out) = run("ip", &["netns", "pids", name]) else {
        return;
    };
    for pid in out
        .stdout
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) on a pid that `ip netns pids` reports inside a namespace of ours.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// `ip netns exec <name> program`, by the namespace's name (for threads that outlive a borrow of
/// its [`Netns`]).
pub fn command_in(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", name]).arg(program);
    cmd
}

/// One namespace; deleted (with whatever is still inside it) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        run("ip", &["netns", "add", name])?;
        Ok(Self {
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <ns> program` (iproute2 execs in place, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.name, program)
    }

    /// Runs `program args…` inside the namespace with the short deadline; errors if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        Ok(run_timeout(self.command(program).args(args), SHORT)?
            .checked()?
            .stdout)
    }

    /// Runs a shell snippet inside the namespace; errors if it fails.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.run("sh", &["-ec", script])
    }

    /// `ip -n <ns> args…`; errors if it fails.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        Ok(run("ip", &all)?.stdout)
    }

    /// Runs `f` on a thread that has joined this namespace, so Rust sockets created there live in
    /// it (the network namespace is per thread).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        in_netns(&self.name, f)
    }

    /// Like [`Netns::enter`] but does not wait: `f` runs on a background thread that has joined
    /// this namespace. The caller joins the handle (and must bound how long `f` runs).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<Result<T>> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        thread::spawn(move || join_netns(&path).map(|()| f()))
    }
}

/// Join a thread from [`Netns::spawn`] whose work returns a `Result`: its value, or the error of
/// joining the namespace, of the work, or of a panic (named by `what`).
pub fn join<T>(handle: thread::JoinHandle<Result<Result<T>>>, what: &str) -> Result<T> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the {what} thread panicked"))??
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes are normally stopped by their own guards before this; anything still inside
        // would keep the namespace alive after `ip netns del`.
        kill_pids_in(&self.name);
        for _ in 0..50 {
            match run("ip", &["netns", "del", &self.name]) {
                Ok(_) => return,
                Err(_) if !Path::new(&format!("/run/netns/{}", self.name)).exists() => return,
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("xlb-tests: could not delete namespace {}", self.name);
    }
}

/// Runs `f` on a fresh thread that has joined namespace `name`.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = PathBuf::from("/run/netns").join(name);
    let handle = thread::spawn(move || -> Result<T> {
        join_netns(&path)?;
        Ok(f())
    });
    match handle.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Moves the calling thread (only it) into the network namespace at `path`. Only ever called on
/// threads spawned for that purpose, which end with the work they were spawned for.
fn join_netns(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on a valid namespace fd; it only affects the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A directory under /tmp for configs, logs, sockets and state; removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // The agents' bpffs mounts (`xlb::agent_bpffs`) go first: unmounting frees every pin
        // of the data paths in them, also those a failed test left behind.
        unmount_below(&self.path);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Unmount (lazily, deepest first) every mount point at or below `dir` in this mount
/// namespace: the tests' bpffs mounts.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    // Field 5 is the mount point (octal escapes for spaces, which our paths do not have).
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: a NUL-terminated path alive for the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}
