//! Where a data path lives in bpffs, so that it outlives the agent: one directory per (network
//! namespace, interface), `<bpffs>/xlb/ns<netns cookie>-if<ifindex>/`, holding the XDP link
//! (`link`, pinned last on a first attach: "this data path exists"), the state maps
//! (`NAME-v<layout version>`), `META-v1` (what the agent changed on the host), `ROUTES-v1` (the
//! routing table its VIP routes are in, while an agent announces them), and `staging/` while an
//! upgrade copies maps. Not `NAME.vN`: bpffs reserves names with a dot (its lookup answers EPERM
//! for them).
//!
//! - The network namespace is named by its cookie (`SO_NETNS_COOKIE`): unique per boot, unlike
//!   a namespace's inode, which the kernel reuses. The interface by its index, which survives a
//!   rename.
//! - One agent per directory: `flock` on the directory itself (bpffs holds no regular files, but
//!   a directory can be locked), held for the agent's life and dropped by the kernel on SIGKILL.
//!   `/proc/locks` names the holder.
//! - A pin made in a private mount namespace dies with it (`ip netns exec` replaces /sys), so
//!   bpffs is mounted by the agent only in the initial mount namespace; elsewhere `--bpffs`
//!   must name a bpffs mounted in the host's namespace.
//!
//! aya 0.14 exposes neither an XDP link's interface nor `BPF_LINK_DETACH`, so a few `bpf(2)`
//! commands are issued here directly.

use super::batch::bpf;
use crate::util::os_message;
use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
};

/// Default of `--bpffs`.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// The directory of xlb's data paths under the bpffs.
const ROOT: &str = "xlb";
/// The pinned XDP link of a data path.
pub(crate) const LINK: &str = "link";
/// New maps of an upgrade, published after the program swap.
pub(crate) const STAGING: &str = "staging";
/// `BPF_FS_MAGIC` (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Inode of the initial mount namespace (`MNT_NS_INIT_INO`, uapi nsfs.h; kernels ≥ 6.x).
const MNT_NS_INIT_INO: u64 = 0xEFFF_FFF8;
/// `BPF_LINK_TYPE_XDP` (linux/bpf.h, `enum bpf_link_type`).
const BPF_LINK_TYPE_XDP: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{} is not a bpffs and this process runs in a private mount namespace (as under `ip netns exec`, which replaces /sys): pins made here would vanish with it; mount a bpffs in the host's mount namespace outside /sys (mount -t bpf bpf /run/xlb/bpffs) and pass --bpffs",
        .0.display()
    )]
    PrivateMountNamespace(PathBuf),
    #[error("mounting a bpffs on {}: {}", path.display(), os_message(source))]
    Mount { path: PathBuf, source: io::Error },
    #[error("{} is not a bpffs: no xlb data path can be pinned there", .0.display())]
    NotBpffs(PathBuf),
    #[error(
        "another xlb agent{} manages {iface} (its data path is pinned at {})",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        dir.display()
    )]
    Busy {
        iface: String,
        dir: PathBuf,
        holder: Option<u32>,
    },
    #[error("{what} {}: {}", path.display(), os_message(source))]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("reading the network namespace's cookie: {}", os_message(.0))]
    Cookie(io::Error),
    #[error("{} is not an XDP link", .0.display())]
    NotXdpLink(PathBuf),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PinError {
    let path = path.to_path_buf();
    move |source| PinError::Io { what, path, source }
}

fn statfs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` a valid out-pointer, both alive for the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Whether `path` is (the root of or inside) a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    statfs_type(path).is_ok_and(|t| t == BPF_FS_MAGIC)
}

/// Whether this process runs in the initial mount namespace, where a mount outlives it.
fn in_initial_mount_ns() -> bool {
    fs::metadata("/proc/self/ns/mnt").is_ok_and(|m| m.ino() == MNT_NS_INIT_INO)
}

/// The directory of xlb's data paths in the bpffs at `bpffs`, mounting a bpffs there first when
/// there is none and this is the initial mount namespace (anywhere else the pins would die with
/// the namespace: refused with a hint).
pub fn agent_root(bpffs: &Path) -> Result<PathBuf, PinError> {
    if !is_bpffs(bpffs) {
        if !in_initial_mount_ns() {
            return Err(PinError::PrivateMountNamespace(bpffs.to_path_buf()));
        }
        fs::create_dir_all(bpffs).map_err(io_err("creating", bpffs))?;
        mount_bpffs(bpffs)?;
        log::info!("mounted a bpffs on {}", bpffs.display());
    }
    let root = bpffs.join(ROOT);
    fs::create_dir_all(&root).map_err(io_err("creating", &root))?;
    Ok(root)
}

/// The directory of xlb's data paths for commands that only look (`xlb detach`): never mounts,
/// since a fresh bpffs holds nothing.
pub fn existing_root(bpffs: &Path) -> Result<PathBuf, PinError> {
    if !is_bpffs(bpffs) {
        return Err(PinError::NotBpffs(bpffs.to_path_buf()));
    }
    Ok(bpffs.join(ROOT))
}

fn mount_bpffs(path: &Path) -> Result<(), PinError> {
    let err = |source| PinError::Mount {
        path: path.to_path_buf(),
        source,
    };
    let target = CString::new(path.as_os_str().as_bytes()).map_err(|e| err(io::Error::other(e)))?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: NUL-terminated strings alive for the call; a null data pointer is allowed.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            flags,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// The calling thread's network namespace cookie (kernel ≥ 5.14). An unbound Unix socket is
/// enough and works in a namespace whose loopback is down.
pub fn netns_cookie() -> Result<u64, PinError> {
    let sock = std::os::unix::net::UnixDatagram::unbound().map_err(PinError::Cookie)?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the out-pointer and length describe `cookie`, alive for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(PinError::Cookie(io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// The name of the directory of the data path on interface `ifindex` of namespace `cookie`.
pub fn dir_name(cookie: u64, ifindex: u32) -> String {
    format!("ns{cookie}-if{ifindex}")
}

/// The (netns cookie, ifindex) a directory name stands for; `None` for anything else.
pub fn parse_dir_name(name: &str) -> Option<(u64, u32)> {
    let (ns, iface) = name.strip_prefix("ns")?.split_once("-if")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(ns) || !digits(iface) {
        return None;
    }
    Some((ns.parse().ok()?, iface.parse().ok()?))
}

/// `NAME-v<version>` of a pinned map.
pub fn map_pin_name(name: &str, version: u32) -> String {
    format!("{name}-v{version}")
}

/// The map name and layout version of a pin called `NAME-v<version>`.
pub fn parse_map_pin_name(file: &str) -> Option<(&str, u32)> {
    let (name, version) = file.rsplit_once("-v")?;
    if name.is_empty() || version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, version.parse().ok()?))
}

/// A data path's directory, locked by this process for as long as this value lives.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    _lock: File,
}

/// Try to lock `dir` (created if missing): `Ok(None)` when another process holds it, with that
/// process's pid when `/proc/locks` names one.
fn try_lock(dir: &Path) -> Result<Result<File, Option<u32>>, PinError> {
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let file = File::open(dir).map_err(io_err("opening", dir))?;
    // SAFETY: flock on a valid fd that `file` owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(Err(lock_holder(&file)));
        }
        return Err(PinError::Io {
            what: "locking",
            path: dir.to_path_buf(),
            source: e,
        });
    }
    Ok(Ok(file))
}

/// The pid holding an flock on `file`, from `/proc/locks` (`1: FLOCK ADVISORY WRITE <pid>
/// <major>:<minor>:<inode> 0 EOF`).
fn lock_holder(file: &File) -> Option<u32> {
    let md = file.metadata().ok()?;
    let dev = md.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        md.ino()
    );
    let locks = fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

impl PinDir {
    /// Create and lock the directory of `iface` (index `ifindex`) under `root`, for this
    /// network namespace. Fails if another process holds it, naming that process.
    pub fn lock(root: &Path, iface: &str, ifindex: u32) -> Result<Self, PinError> {
        let path = root.join(dir_name(netns_cookie()?, ifindex));
        Self::lock_path(&path, iface)
    }

    /// Lock an existing data path's directory by its path (`xlb detach --pin-dir`).
    pub fn lock_path(path: &Path, iface: &str) -> Result<Self, PinError> {
        // Twice: a concurrent `xlb detach` may remove the directory between our open and our
        // flock, and we would then hold a lock on a directory nobody can see.
        for _ in 0..2 {
            let file = try_lock(path)?.map_err(|holder| PinError::Busy {
                iface: iface.to_string(),
                dir: path.to_path_buf(),
                holder,
            })?;
            let now = fs::metadata(path).map(|m| m.ino()).ok();
            if now == file.metadata().map(|m| m.ino()).ok() {
                return Ok(PinDir {
                    path: path.to_path_buf(),
                    _lock: file,
                });
            }
        }
        Err(PinError::Io {
            what: "locking",
            path: path.to_path_buf(),
            source: io::Error::other("the directory keeps being replaced"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn link_path(&self) -> PathBuf {
        self.path.join(LINK)
    }

    pub fn staging(&self) -> PathBuf {
        self.path.join(STAGING)
    }

    /// The map pins in the directory (not in `staging/`): (map name, layout version, path).
    pub fn map_pins(&self) -> Result<Vec<(String, u32, PathBuf)>, PinError> {
        map_pins_in(&self.path)
    }

    /// The pinned link, if there is one.
    pub fn link(&self) -> Result<Option<LinkInfo>, PinError> {
        let path = self.link_path();
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
            Ok(_) => Ok(Some(xdp_link_info(&path)?)),
        }
    }

    /// Remove every pin and the directory itself. The maps and the program are freed by the
    /// kernel with their last reference; the link must have been detached first (unpinning
    /// alone does not detach a link another process still holds).
    pub fn remove_all(&self) -> Result<(), PinError> {
        remove_tree(&self.path)
    }
}

/// `(map name, layout version, path)` of every `NAME-vN` pin directly in `dir`.
pub(crate) fn map_pins_in(dir: &Path) -> Result<Vec<(String, u32, PathBuf)>, PinError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        if let Some((name, version)) = parse_map_pin_name(file) {
            out.push((name.to_string(), version, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Remove `dir` with everything in it (pins and `staging/`); a missing directory is fine.
pub(crate) fn remove_tree(dir: &Path) -> Result<(), PinError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", dir)(e)),
    }
}

/// What the kernel says about a pinned XDP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// 0 when the link's device is gone (the link is defunct: it steers nothing, and
    /// `BPF_LINK_UPDATE` fails with ENOLINK).
    pub ifindex: u32,
}

impl LinkInfo {
    pub fn defunct(&self) -> bool {
        self.ifindex == 0
    }
}

/// What a map is, as the kernel reports it (and as the object declares it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapShape {
    /// Same type, key, value and flags: the entries of one can be used as entries of the other
    /// (the capacity may differ).
    pub fn same_layout(&self, other: &MapShape) -> bool {
        (self.map_type, self.key_size, self.value_size, self.flags)
            == (
                other.map_type,
                other.key_size,
                other.value_size,
                other.flags,
            )
    }
}

/// The id and shape of the map pinned at `path`.
pub(crate) fn pinned_map(path: &Path) -> Result<(u32, MapShape), PinError> {
    let fd = obj_get(path)?;
    map_info(fd.as_fd()).map_err(io_err("reading the map at", path))
}

/// `BPF_OBJ_GET_INFO_BY_FD` on any object: the kernel fills `info` (its `struct bpf_*_info`,
/// up to `info.len()` bytes).
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
    let mut attr = [0u8; 16]; // bpf_fd (u32), info_len (u32), info (u64)
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: the attribute holds an fd and a pointer to `info`, live and writable for its
    // length during the call; the kernel writes at most that many bytes.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.map(drop)
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a map: its id and shape.
pub(crate) fn map_info(fd: BorrowedFd<'_>) -> io::Result<(u32, MapShape)> {
    // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags (u32), name…
    let mut info = [0u8; 88];
    obj_info(fd, &mut info)?;
    let word = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    Ok((
        word(4),
        MapShape {
            map_type: word(0),
            key_size: word(8),
            value_size: word(12),
            max_entries: word(16),
            flags: word(20),
        },
    ))
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_OBJ_GET`: an fd of the object pinned at `path`.
pub(crate) fn obj_get(path: &Path) -> Result<OwnedFd, PinError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io_err("opening", path)(io::Error::other(e)))?;
    // pathname (u64), bpf_fd (u32), file_flags (u32), path_fd (i32).
    let mut attr = [0u8; 24];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    // SAFETY: the attribute points at the NUL-terminated path, alive for the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }.map_err(io_err("opening", path))?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Id, program and interface of the XDP link pinned at `path`.
pub fn xdp_link_info(path: &Path) -> Result<LinkInfo, PinError> {
    let fd = obj_get(path)?;
    let (kind, info) = link_info(fd.as_fd()).map_err(io_err("reading the link at", path))?;
    if kind != BPF_LINK_TYPE_XDP {
        return Err(PinError::NotXdpLink(path.to_path_buf()));
    }
    Ok(info)
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link: its type and, for XDP links, id, program, interface.
fn link_info(fd: BorrowedFd<'_>) -> io::Result<(u32, LinkInfo)> {
    // struct bpf_link_info: type, id, prog_id (u32), then a union aligned to 8 whose XDP member
    // starts with ifindex (offset 16).
    let mut info = [0u8; 64];
    obj_info(fd, &mut info)?;
    let word = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    Ok((
        word(0),
        LinkInfo {
            id: word(4),
            prog_id: word(8),
            ifindex: word(16),
        },
    ))
}

/// `BPF_LINK_DETACH` on the link pinned at `path`: the program leaves its interface now, even
/// while another process still holds an fd of the link.
pub fn detach_link(path: &Path) -> Result<(), PinError> {
    let fd = obj_get(path)?;
    let mut attr = [0u8; 8]; // link_fd (u32)
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: the attribute holds only an fd.
    match unsafe { bpf(BPF_LINK_DETACH, &mut attr) } {
        Ok(_) => Ok(()),
        // Already defunct (its device is gone): nothing is attached.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        Err(e) => Err(io_err("detaching the link at", path)(e)),
    }
}

/// Remove the data-path directories under `root` that no agent holds and that steer nothing:
/// no link (a first attach that never finished) or a defunct one (its interface is gone).
/// Directories with a live link are left alone even when unlocked: they still serve.
pub fn collect_garbage(root: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path == keep || name.to_str().and_then(parse_dir_name).is_none() {
            continue;
        }
        let Ok(Ok(_lock)) = try_lock(&path) else {
            continue;
        };
        let link = path.join(LINK);
        let stale = match xdp_link_info(&link) {
            Ok(info) => info.defunct(),
            Err(PinError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => true,
            Err(_) => false,
        };
        if stale {
            match remove_tree(&path) {
                Ok(()) => log::info!(
                    "removed the stale data path {} (its interface is gone, or its first attach never finished)",
                    path.display()
                ),
                Err(e) => log::warn!("removing the stale data path: {e}"),
            }
        }
    }
}

/// The data-path directories under `root` whose link is attached to program `prog_id`.
pub fn dirs_with_program(root: &Path, prog_id: u32) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            xdp_link_info(&p.join(LINK)).is_ok_and(|i| !i.defunct() && i.prog_id == prog_id)
        })
        .collect()
}

/// The data-path directories of this network namespace under `root` (`xlb detach --all`).
pub fn dirs_of_this_namespace(root: &Path) -> Result<Vec<(PathBuf, u32)>, PinError> {
    let cookie = netns_cookie()?;
    let Ok(entries) = fs::read_dir(root) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(PathBuf, u32)> = entries
        .flatten()
        .filter_map(|e| {
            let (c, ifindex) = parse_dir_name(e.file_name().to_str()?)?;
            (c == cookie).then(|| (e.path(), ifindex))
        })
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_round_trip() {
        assert_eq!(dir_name(9787, 3), "ns9787-if3");
        assert_eq!(parse_dir_name("ns9787-if3"), Some((9787, 3)));
        assert_eq!(
            parse_dir_name(&dir_name(u64::MAX, u32::MAX)),
            Some((u64::MAX, u32::MAX))
        );
        for bad in [
            "ns-if3", "ns1-if", "ns1if3", "nsx-if3", "ns1-if3x", "ns+1-if3", "staging", "",
        ] {
            assert_eq!(parse_dir_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn map_pin_names_round_trip() {
        assert_eq!(map_pin_name("FLOWS", 2), "FLOWS-v2");
        assert_eq!(parse_map_pin_name("FLOWS-v2"), Some(("FLOWS", 2)));
        assert_eq!(parse_map_pin_name("VIP_STATS-v10"), Some(("VIP_STATS", 10)));
        for bad in [
            "FLOWS",
            "FLOWS-v",
            "-v1",
            "FLOWS-vx",
            "link",
            "FLOWS-v1-tmp",
            "FLOWS.v1",
        ] {
            assert_eq!(parse_map_pin_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn this_namespace_has_a_cookie() {
        // Stable within a namespace: two sockets, one answer.
        assert_eq!(netns_cookie().unwrap(), netns_cookie().unwrap());
    }

    #[test]
    fn a_plain_directory_is_not_a_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_bpffs(dir.path()));
        assert!(matches!(
            existing_root(dir.path()),
            Err(PinError::NotBpffs(_))
        ));
    }

    #[test]
    fn a_second_lock_names_the_holder() {
        // flock works on any directory; bpffs is not needed to test the locking itself.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns1-if1");
        let held = PinDir::lock_path(&path, "eth0").unwrap();
        // A second open file description of the same directory conflicts, even in-process.
        match PinDir::lock_path(&path, "eth0") {
            Err(PinError::Busy { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("expected Busy, got {other:?}"),
        }
        drop(held);
        PinDir::lock_path(&path, "eth0").expect("free again");
    }
}
