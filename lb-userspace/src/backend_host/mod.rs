//! `xlb backend-host setup|teardown`: prepare this host (its network namespace) as a DSR backend,
//! and undo exactly that.
//!
//! Setup, in order, recording each change as it is made:
//! 1. bring `lo` up if it is down, and add each VIP as ADDR/32 on `lo` (skipped, and not recorded,
//!    if already there) — so the host accepts packets addressed to the VIP;
//! 2. `arp_ignore=1` and `arp_announce=2` on `all`, `lo` and each interface — so the host neither
//!    answers ARP for the VIP nor uses it as an ARP source (only the LB may own the VIP on the
//!    wire); `rp_filter=0` on `all` and each interface — decapsulated packets arrive from clients the
//!    host would not route back through that interface; previous values are recorded;
//! 3. the IPIP decapsulator (XDP, attached by netlink so it outlives this command) on each
//!    interface, told that interface's own IPv4 addresses (the outer destinations the LB uses).
//!
//! The record lives at `/run/xlb/backend-host.<netns inode>.json`: `/run` is shared by the
//! namespaces of one machine, and the inode of `/proc/self/ns/net` tells them apart. Inodes are
//! reused once a namespace is gone, so the record also carries the namespace's cookie
//! (`SO_NETNS_COOKIE`, never reused while the machine is up): a record with another cookie was left
//! by a namespace that no longer exists, and is discarded with a warning instead of blocking setup
//! or being "undone" here. If a step fails, what was already done is undone before the error is
//! reported.

use crate::{
    dataplane::{AttachedMode, DataplaneError, XdpModeChoice},
    util::{interface_index, os_message, write_atomic},
};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags},
};
use serde::{Deserialize, Serialize};
use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

/// Default directory of setup records.
pub const RECORD_DIR: &str = "/run/xlb";
const NETNS_PATH: &str = "/proc/self/ns/net";
const SYSCTL_ROOT: &str = "/proc/sys/net/ipv4/conf";

#[derive(Debug, thiserror::Error)]
pub enum BackendHostError {
    #[error("already set up; run teardown first (record {})", .0.display())]
    AlreadySetUp(PathBuf),
    #[error("not set up in this network namespace (no record at {})", .0.display())]
    NotSetUp(PathBuf),
    #[error("cannot identify this network namespace ({NETNS_PATH}): {}", os_message(.0))]
    Netns(io::Error),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
    #[error("interface {0} has no IPv4 address to decapsulate for")]
    NoIpv4(String),
    #[error("no interface other than lo is up with an IPv4 address; name one with --iface")]
    NoInterfaces,
    #[error("no loopback interface found")]
    NoLoopback,
    #[error("VIP {0} is not a unicast host address")]
    BadVip(Ipv4Addr),
    #[error("adding {addr}/32 to lo: {message}")]
    AddAddress { addr: Ipv4Addr, message: String },
    #[error("bringing lo up: {0}")]
    LoUp(String),
    #[error("cannot read {}: {}", path.display(), os_message(source))]
    SysctlRead { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {}", path.display(), os_message(source))]
    SysctlWrite { path: PathBuf, source: io::Error },
    #[error("attaching the decapsulator to {iface}: {source}")]
    Xdp {
        iface: String,
        source: Box<DataplaneError>,
    },
    #[error("cannot write setup record {}: {}", path.display(), os_message(source))]
    RecordWrite { path: PathBuf, source: io::Error },
    #[error("cannot read setup record {}: {}", path.display(), os_message(source))]
    RecordRead { path: PathBuf, source: io::Error },
    #[error("setup record {} is corrupt: {source}", path.display())]
    RecordCorrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{error}; undoing the partial setup also failed: {}", undo.join("; "))]
    PartialSetup {
        error: Box<BackendHostError>,
        undo: Vec<String>,
    },
    #[error("teardown incomplete ({} kept with what is left): {}", path.display(), errors.join("; "))]
    Teardown { path: PathBuf, errors: Vec<String> },
}

/// One sysctl setup changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysctlChange {
    pub path: PathBuf,
    pub previous: String,
    pub value: String,
}

/// One interface the decapsulator was attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdpAttachment {
    pub iface: String,
    pub mode: AttachedMode,
    pub local_addrs: Vec<Ipv4Addr>,
}

/// What setup did, so teardown undoes exactly that.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendHostRecord {
    pub netns_inode: u64,
    /// `SO_NETNS_COOKIE` of the namespace that made the record.
    pub netns_cookie: u64,
    /// `lo` was down and setup brought it up.
    pub lo_brought_up: bool,
    /// VIPs setup added to `lo` (not the ones that were already there).
    pub lo_addrs: Vec<Ipv4Addr>,
    /// In the order they were made.
    pub sysctls: Vec<SysctlChange>,
    pub xdp: Vec<XdpAttachment>,
}

#[derive(Clone, Debug)]
pub struct SetupOptions {
    pub vips: Vec<Ipv4Addr>,
    /// Empty = every non-loopback interface that is up and has an IPv4 address.
    pub ifaces: Vec<String>,
    pub mode: XdpModeChoice,
    pub record_dir: PathBuf,
}

/// `<dir>/backend-host.<inode>.json`.
pub fn record_path(dir: &Path, netns_inode: u64) -> PathBuf {
    dir.join(format!("backend-host.{netns_inode}.json"))
}

pub fn save_record(path: &Path, record: &BackendHostRecord) -> Result<(), BackendHostError> {
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
pub fn load_record(path: &Path) -> Result<Option<BackendHostRecord>, BackendHostError> {
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
pub fn netns_cookie() -> Result<u64, BackendHostError> {
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
fn load_own_record(
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
pub fn netns_inode() -> Result<u64, BackendHostError> {
    fs::metadata(NETNS_PATH)
        .map(|m| m.ino())
        .map_err(BackendHostError::Netns)
}

/// The sysctls setup wants, in the order it writes them: (path under `root`, value).
pub fn sysctl_plan(root: &Path, ifaces: &[String]) -> Vec<(PathBuf, &'static str)> {
    let mut plan = Vec::new();
    let mut arp_scopes: Vec<&str> = vec!["all", "lo"];
    arp_scopes.extend(ifaces.iter().map(String::as_str).filter(|i| *i != "lo"));
    for scope in &arp_scopes {
        plan.push((root.join(scope).join("arp_ignore"), "1"));
        plan.push((root.join(scope).join("arp_announce"), "2"));
    }
    let mut rp_scopes: Vec<&str> = vec!["all"];
    rp_scopes.extend(ifaces.iter().map(String::as_str));
    for scope in rp_scopes {
        plan.push((root.join(scope).join("rp_filter"), "0"));
    }
    plan
}

struct Link {
    index: u32,
    name: String,
    up: bool,
    loopback: bool,
}

struct Addr {
    index: u32,
    addr: Ipv4Addr,
    msg: AddressMessage,
}

/// The few rtnetlink operations setup needs.
struct Netlink {
    handle: rtnetlink::Handle,
}

fn nl_err(e: impl std::fmt::Display) -> BackendHostError {
    BackendHostError::Netlink(e.to_string())
}

impl Netlink {
    fn connect() -> Result<Self, BackendHostError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(nl_err)?;
        // The connection task ends by itself when the last handle is dropped.
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    async fn links(&self) -> Result<Vec<Link>, BackendHostError> {
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err)?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let name = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })?;
                Some(Link {
                    index: m.header.index,
                    name,
                    up: m.header.flags.contains(LinkFlags::Up),
                    loopback: m.header.flags.contains(LinkFlags::Loopback),
                })
            })
            .collect())
    }

    async fn ipv4_addrs(&self) -> Result<Vec<Addr>, BackendHostError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err)?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .filter_map(|m| {
                // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
                // point-to-point links); plain interfaces carry both, equal.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(v4)) => Some(*v4),
                    _ => None,
                });
                let address = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
                    _ => None,
                });
                let addr = local.or(address)?;
                Some(Addr {
                    index: m.header.index,
                    addr,
                    msg: m,
                })
            })
            .collect())
    }

    async fn add_addr(&self, index: u32, addr: Ipv4Addr) -> Result<(), String> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), 32)
            .execute()
            .await
            .map_err(|e| e.to_string())
    }

    async fn del_addr(&self, msg: AddressMessage) -> Result<(), String> {
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|e| e.to_string())
    }

    async fn set_up(&self, index: u32, up: bool) -> Result<(), String> {
        let b = rtnetlink::LinkUnspec::new_with_index(index);
        let msg = if up { b.up() } else { b.down() }.build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| e.to_string())
    }
}

/// Prepare this namespace as a DSR backend; returns what was done (also saved as the record).
pub async fn setup(opts: &SetupOptions) -> Result<BackendHostRecord, BackendHostError> {
    for vip in &opts.vips {
        if vip.is_unspecified() || vip.is_broadcast() || vip.is_multicast() {
            return Err(BackendHostError::BadVip(*vip));
        }
    }
    let inode = netns_inode()?;
    let cookie = netns_cookie()?;
    let path = record_path(&opts.record_dir, inode);
    if load_own_record(&path, cookie)?.is_some() {
        return Err(BackendHostError::AlreadySetUp(path));
    }

    let nl = Netlink::connect()?;
    let links = nl.links().await?;
    let addrs = nl.ipv4_addrs().await?;
    let lo = links
        .iter()
        .find(|l| l.loopback)
        .ok_or(BackendHostError::NoLoopback)?;
    let addrs_of = |index: u32| -> Vec<Ipv4Addr> {
        addrs
            .iter()
            .filter(|a| a.index == index)
            .map(|a| a.addr)
            .collect()
    };
    let mut targets: Vec<(String, Vec<Ipv4Addr>)> = Vec::new();
    if opts.ifaces.is_empty() {
        for l in links.iter().filter(|l| !l.loopback && l.up) {
            let local = addrs_of(l.index);
            if !local.is_empty() {
                targets.push((l.name.clone(), local));
            }
        }
        if targets.is_empty() {
            return Err(BackendHostError::NoInterfaces);
        }
    } else {
        for name in &opts.ifaces {
            let l = links
                .iter()
                .find(|l| &l.name == name)
                .ok_or_else(|| BackendHostError::NoSuchInterface(name.clone()))?;
            let local = addrs_of(l.index);
            if local.is_empty() {
                return Err(BackendHostError::NoIpv4(name.clone()));
            }
            targets.push((name.clone(), local));
        }
    }
    let lo_addrs = addrs_of(lo.index);

    let mut record = BackendHostRecord {
        netns_inode: inode,
        netns_cookie: cookie,
        ..Default::default()
    };
    let mut result = apply(&nl, opts, lo, &lo_addrs, &targets, &mut record).await;
    if result.is_ok() {
        result = save_record(&path, &record);
    }
    match result {
        Ok(()) => Ok(record),
        Err(error) => {
            let (_, undo_errors) = undo(&nl, &record).await;
            if undo_errors.is_empty() {
                Err(error)
            } else {
                Err(BackendHostError::PartialSetup {
                    error: Box::new(error),
                    undo: undo_errors,
                })
            }
        }
    }
}

async fn apply(
    nl: &Netlink,
    opts: &SetupOptions,
    lo: &Link,
    lo_addrs: &[Ipv4Addr],
    targets: &[(String, Vec<Ipv4Addr>)],
    record: &mut BackendHostRecord,
) -> Result<(), BackendHostError> {
    if !lo.up {
        nl.set_up(lo.index, true)
            .await
            .map_err(BackendHostError::LoUp)?;
        record.lo_brought_up = true;
    }
    for vip in &opts.vips {
        if lo_addrs.contains(vip) || record.lo_addrs.contains(vip) {
            log::info!("{vip} is already on lo; leaving it alone");
            continue;
        }
        nl.add_addr(lo.index, *vip)
            .await
            .map_err(|message| BackendHostError::AddAddress {
                addr: *vip,
                message,
            })?;
        record.lo_addrs.push(*vip);
    }

    let names: Vec<String> = targets.iter().map(|(n, _)| n.clone()).collect();
    for (path, value) in sysctl_plan(Path::new(SYSCTL_ROOT), &names) {
        let previous = fs::read_to_string(&path)
            .map_err(|source| BackendHostError::SysctlRead {
                path: path.clone(),
                source,
            })?
            .trim()
            .to_string();
        if previous == value {
            continue;
        }
        fs::write(&path, value).map_err(|source| BackendHostError::SysctlWrite {
            path: path.clone(),
            source,
        })?;
        record.sysctls.push(SysctlChange {
            path,
            previous,
            value: value.to_string(),
        });
    }

    for (iface, local) in targets {
        let mode = crate::dataplane::persistent::attach_decap(iface, local, opts.mode).map_err(
            |source| BackendHostError::Xdp {
                iface: iface.clone(),
                source: Box::new(source),
            },
        )?;
        log::info!(
            "decapsulator attached to {iface} in {mode} mode for {}",
            local
                .iter()
                .map(Ipv4Addr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        record.xdp.push(XdpAttachment {
            iface: iface.clone(),
            mode,
            local_addrs: local.clone(),
        });
    }
    Ok(())
}

/// Undo `record` in reverse order. Returns what could not be undone (as a record) and why.
/// Things that are already gone (an interface deleted since, an address removed by hand) count as
/// undone.
async fn undo(nl: &Netlink, record: &BackendHostRecord) -> (BackendHostRecord, Vec<String>) {
    let mut left = BackendHostRecord {
        netns_inode: record.netns_inode,
        netns_cookie: record.netns_cookie,
        ..Default::default()
    };
    let mut errors = Vec::new();

    for x in record.xdp.iter().rev() {
        if interface_index(&x.iface).is_err() {
            continue;
        }
        if let Err(e) = crate::dataplane::persistent::detach(&x.iface) {
            errors.push(format!("detaching XDP from {}: {e}", x.iface));
            left.xdp.insert(0, x.clone());
        }
    }

    for s in record.sysctls.iter().rev() {
        match fs::write(&s.path, &s.previous) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                errors.push(format!(
                    "restoring {} to {}: {}",
                    s.path.display(),
                    s.previous,
                    os_message(&e)
                ));
                left.sysctls.insert(0, s.clone());
            }
        }
    }

    if !record.lo_addrs.is_empty() || record.lo_brought_up {
        match (nl.links().await, nl.ipv4_addrs().await) {
            (Ok(links), Ok(addrs)) => {
                let lo = links.iter().find(|l| l.loopback);
                for vip in &record.lo_addrs {
                    let Some(found) = addrs
                        .iter()
                        .find(|a| Some(a.index) == lo.map(|l| l.index) && a.addr == *vip)
                    else {
                        continue;
                    };
                    if let Err(e) = nl.del_addr(found.msg.clone()).await {
                        errors.push(format!("removing {vip} from lo: {e}"));
                        left.lo_addrs.push(*vip);
                    }
                }
                if record.lo_brought_up
                    && let Some(lo) = lo
                    && let Err(e) = nl.set_up(lo.index, false).await
                {
                    errors.push(format!("setting lo down again: {e}"));
                    left.lo_brought_up = true;
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                errors.push(format!("listing addresses: {e}"));
                left.lo_addrs = record.lo_addrs.clone();
                left.lo_brought_up = record.lo_brought_up;
            }
        }
    }
    (left, errors)
}

/// Undo what `setup` recorded in this namespace and delete the record. If something cannot be
/// undone, the record is rewritten with only what is left, so a later teardown can finish.
pub async fn teardown(record_dir: &Path) -> Result<BackendHostRecord, BackendHostError> {
    let path = record_path(record_dir, netns_inode()?);
    let record = load_own_record(&path, netns_cookie()?)?
        .ok_or_else(|| BackendHostError::NotSetUp(path.clone()))?;
    let nl = Netlink::connect()?;
    let (left, errors) = undo(&nl, &record).await;
    if errors.is_empty() {
        fs::remove_file(&path).map_err(|source| BackendHostError::RecordWrite {
            path: path.clone(),
            source,
        })?;
        return Ok(record);
    }
    save_record(&path, &left)?;
    Err(BackendHostError::Teardown { path, errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BackendHostRecord {
        BackendHostRecord {
            netns_inode: 4026532000,
            netns_cookie: 4096,
            lo_brought_up: true,
            lo_addrs: vec![Ipv4Addr::new(10, 111, 100, 1)],
            sysctls: vec![SysctlChange {
                path: PathBuf::from("/proc/sys/net/ipv4/conf/all/arp_ignore"),
                previous: "0".into(),
                value: "1".into(),
            }],
            xdp: vec![XdpAttachment {
                iface: "eth0".into(),
                mode: AttachedMode::Generic,
                local_addrs: vec![Ipv4Addr::new(10, 111, 1, 11)],
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

    #[test]
    fn sysctl_plan_covers_all_lo_and_each_interface() {
        let plan = sysctl_plan(Path::new("/c"), &["eth0".into(), "eth1".into()]);
        let got: Vec<(String, &str)> = plan
            .iter()
            .map(|(p, v)| (p.display().to_string(), *v))
            .collect();
        let want = [
            ("/c/all/arp_ignore", "1"),
            ("/c/all/arp_announce", "2"),
            ("/c/lo/arp_ignore", "1"),
            ("/c/lo/arp_announce", "2"),
            ("/c/eth0/arp_ignore", "1"),
            ("/c/eth0/arp_announce", "2"),
            ("/c/eth1/arp_ignore", "1"),
            ("/c/eth1/arp_announce", "2"),
            ("/c/all/rp_filter", "0"),
            ("/c/eth0/rp_filter", "0"),
            ("/c/eth1/rp_filter", "0"),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|(p, v)| (p.to_string(), *v))
                .collect::<Vec<_>>()
        );
    }
}
