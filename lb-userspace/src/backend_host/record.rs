//! What `setup` did, recorded so that `teardown` undoes exactly that, and the identity of the
//! network namespace the record belongs to.
//!
//! The record lives at `/run/xlb/backend-host.<netns inode>.json`: `/run` is shared by the
//! namespaces of one machine, and the inode of `/proc/self/ns/net` tells them apart. Inodes are
//! reused once a namespace is gone, so the record also carries the namespace's cookie
//! (`SO_NETNS_COOKIE`, never reused while the machine is up): a record with another cookie was
//! left by a namespace that no longer exists, and is discarded with a warning instead of
//! blocking setup or being "undone" here.

use super::BackendHostError;
use crate::{dataplane::AttachedMode, util::write_atomic};
use serde::{Deserialize, Serialize};
use std::{
    fs, io,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

pub(super) const NETNS_PATH: &str = "/proc/self/ns/net";

/// One sysctl setup changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SysctlChange {
    pub(crate) path: PathBuf,
    pub(crate) previous: String,
    pub(crate) value: String,
}

/// One interface the decapsulator was attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct XdpAttachment {
    pub(crate) iface: String,
    pub(crate) mode: AttachedMode,
    pub(crate) local_addrs: Vec<IpAddr>,
}

/// What setup did, so teardown undoes exactly that.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackendHostRecord {
    pub(crate) netns_inode: u64,
    /// `SO_NETNS_COOKIE` of the namespace that made the record.
    pub(crate) netns_cookie: u64,
    /// `lo` was down and setup brought it up.
    pub(crate) lo_brought_up: bool,
    /// VIPs setup added to `lo` (not the ones that were already there).
    pub(crate) lo_addrs: Vec<IpAddr>,
    /// In the order they were made.
    pub(crate) sysctls: Vec<SysctlChange>,
    pub(crate) xdp: Vec<XdpAttachment>,
}

/// `<dir>/backend-host.<inode>.json`.
pub(crate) fn record_path(dir: &Path, netns_inode: u64) -> PathBuf {
    dir.join(format!("backend-host.{netns_inode}.json"))
}

pub(crate) fn save_record(path: &Path, record: &BackendHostRecord) -> Result<(), BackendHostError> {
    let err = |source| BackendHostError::RecordWrite {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(err)?;
    }
    let mut bytes = serde_json::to_vec_pretty(record).expect("record serialises to JSON");
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(err)
}

/// The record at `path`, `Ok(None)` if there is none.
pub(crate) fn load_record(path: &Path) -> Result<Option<BackendHostRecord>, BackendHostError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| {
            BackendHostError::RecordCorrupt {
                path: path.to_path_buf(),
                source,
            }
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(BackendHostError::RecordRead {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The current network namespace's cookie: unique among all namespaces since boot.
pub(crate) fn netns_cookie() -> Result<u64, BackendHostError> {
    // SAFETY: plain socket calls on an fd we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(BackendHostError::Netns(io::Error::last_os_error()));
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(BackendHostError::Netns(err));
        }
        Ok(cookie)
    }
}

/// The record for this namespace at `path`, if there is one made by this namespace. A record left
/// by an earlier namespace with the same inode is removed.
pub(super) fn load_own_record(
    path: &Path,
    cookie: u64,
) -> Result<Option<BackendHostRecord>, BackendHostError> {
    match load_record(path)? {
        Some(record) if record.netns_cookie != cookie => {
            log::warn!(
                "removing {}: it was left by a network namespace that no longer exists",
                path.display()
            );
            fs::remove_file(path).map_err(|source| BackendHostError::RecordWrite {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(None)
        }
        other => Ok(other),
    }
}

/// Identity of the current network namespace.
pub(crate) fn netns_inode() -> Result<u64, BackendHostError> {
    fs::metadata(NETNS_PATH)
        .map(|m| m.ino())
        .map_err(BackendHostError::Netns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BackendHostRecord {
        BackendHostRecord {
            netns_inode: 4026532000,
            netns_cookie: 4096,
            lo_brought_up: true,
            lo_addrs: vec![
                IpAddr::from([10, 111, 100, 1]),
                "fd11:100::1".parse().unwrap(),
            ],
            sysctls: vec![SysctlChange {
                path: PathBuf::from("/proc/sys/net/ipv4/conf/all/arp_ignore"),
                previous: "0".into(),
                value: "1".into(),
            }],
            xdp: vec![XdpAttachment {
                iface: "eth0".into(),
                mode: AttachedMode::Generic,
                local_addrs: vec![
                    IpAddr::from([10, 111, 1, 11]),
                    "fd11:2::11".parse().unwrap(),
                ],
            }],
        }
    }

    #[test]
    fn record_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(&dir.path().join("run/xlb"), 4026532000);
        assert!(path.ends_with("run/xlb/backend-host.4026532000.json"));
        assert_eq!(load_record(&path).unwrap(), None);
        save_record(&path, &sample()).unwrap();
        assert_eq!(load_record(&path).unwrap(), Some(sample()));
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["xdp"][0]["mode"], "generic");
        assert_eq!(json["lo_addrs"][0], "10.111.100.1");
        assert_eq!(json["lo_addrs"][1], "fd11:100::1");
    }

    #[test]
    fn records_written_before_ipv6_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), 7);
        fs::write(
            &path,
            br#"{"netns_inode": 7, "netns_cookie": 8, "lo_brought_up": false,
                 "lo_addrs": ["10.111.100.1"], "sysctls": [],
                 "xdp": [{"iface": "eth0", "mode": "driver", "local_addrs": ["10.111.1.11"]}]}"#,
        )
        .unwrap();
        let r = load_record(&path).unwrap().unwrap();
        assert_eq!(r.lo_addrs, vec![IpAddr::from([10, 111, 100, 1])]);
        assert_eq!(r.xdp[0].local_addrs, vec![IpAddr::from([10, 111, 1, 11])]);
    }

    #[test]
    fn a_record_from_a_dead_namespace_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), 4026532000);
        save_record(&path, &sample()).unwrap();
        assert_eq!(load_own_record(&path, 4096).unwrap(), Some(sample()));
        assert!(path.exists(), "our own record stays");
        assert_eq!(load_own_record(&path, 4097).unwrap(), None);
        assert!(!path.exists(), "a stale record is removed");
    }

    #[test]
    fn this_namespace_has_a_cookie() {
        assert_ne!(netns_cookie().unwrap(), 0);
    }

    #[test]
    fn corrupt_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), 1);
        fs::write(&path, b"{\"netns_inode\": 1, \"surprise\": true}").unwrap();
        assert!(matches!(
            load_record(&path),
            Err(BackendHostError::RecordCorrupt { .. })
        ));
    }
}
