//! `xlb backend-host setup|teardown`: prepare this host (its network namespace) as a DSR backend,
//! and undo exactly that.
//!
//! Setup, in order, recording each change as it is made (`record`):
//! 1. bring `lo` up if it is down, and add each VIP as ADDR/32 (IPv4) or ADDR/128 without duplicate
//!    address detection (IPv6) on `lo` (skipped, and not recorded, if already there) — so the host
//!    accepts packets addressed to the VIP;
//! 2. `arp_ignore=1` and `arp_announce=2` on `all`, `lo` and each interface — so the host neither
//!    answers ARP for the VIP nor uses it as an ARP source (only the LB may own the VIP on the
//!    wire); `rp_filter=0` on `all` and each interface — decapsulated packets arrive from clients the
//!    host would not route back through that interface; previous values are recorded. IPv6 needs
//!    neither: Linux answers neighbour solicitations only for addresses of the interface they
//!    arrive on (never for one on `lo`), and has no IPv6 `rp_filter`;
//! 3. the decapsulator (XDP, attached by netlink so it outlives this command) on each interface,
//!    told that interface's own IPv4 and (not link-local) IPv6 addresses: the outer destinations
//!    the LB uses for IPv4 in IPv4, IPv6 in IPv6 and IPv4 in IPv6.
//!
//! If a step fails, what was already done is undone before the error is reported.

pub(crate) mod record;

use crate::{
    dataplane::{DataplaneError, XdpModeChoice, persistent},
    model::addr::is_host_address,
    netlink::{Link, Netlink, NetlinkError},
    util::{NoSuchInterface, interface_index, os_message},
};
use record::{
    BackendHostRecord, NETNS_PATH, SysctlChange, XdpAttachment, load_own_record, netns_cookie,
    netns_inode, record_path, save_record,
};
use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

/// Default directory of setup records.
pub(crate) const RECORD_DIR: &str = "/run/xlb";
const SYSCTL_ROOT: &str = "/proc/sys/net/ipv4/conf";

#[derive(Debug, thiserror::Error)]
pub(crate) enum BackendHostError {
    #[error("already set up; run teardown first (record {})", .0.display())]
    AlreadySetUp(PathBuf),
    #[error("not set up in this network namespace (no record at {})", .0.display())]
    NotSetUp(PathBuf),
    #[error("cannot identify this network namespace ({NETNS_PATH}): {}", os_message(.0))]
    Netns(io::Error),
    #[error("netlink: {0}")]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    NoSuchInterface(#[from] NoSuchInterface),
    #[error("interface {0} has no IPv4 or IPv6 address (other than link-local) to decapsulate for")]
    NoAddress(String),
    #[error(
        "no interface other than lo is up with an IPv4 or IPv6 address (other than link-local); name one with --iface"
    )]
    NoInterfaces,
    #[error("no loopback interface found")]
    NoLoopback,
    #[error("VIP {0} is not a unicast host address")]
    BadVip(IpAddr),
    #[error("lo: {0}")]
    Lo(#[source] NetlinkError),
    #[error("cannot read {}: {}", path.display(), os_message(source))]
    SysctlRead { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {}", path.display(), os_message(source))]
    SysctlWrite { path: PathBuf, source: io::Error },
    #[error("attaching the decapsulator: {0}")]
    Xdp(#[source] Box<DataplaneError>),
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

#[derive(Clone, Debug)]
pub(crate) struct SetupOptions {
    pub(crate) vips: Vec<IpAddr>,
    /// Empty = every non-loopback interface that is up and has an IPv4 or IPv6 address (other
    /// than link-local).
    pub(crate) ifaces: Vec<String>,
    pub(crate) mode: XdpModeChoice,
    pub(crate) record_dir: PathBuf,
}

/// The sysctls setup wants, in the order it writes them: (path under `root`, value).
pub(crate) fn sysctl_plan(root: &Path, ifaces: &[String]) -> Vec<(PathBuf, &'static str)> {
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

/// What setup works on: `lo` with its addresses, and each interface to decapsulate on with its
/// own addresses (IPv4, and IPv6 other than link-local: never a tunnel's outer destination).
struct Plan {
    lo: Link,
    lo_addrs: Vec<IpAddr>,
    targets: Vec<(String, Vec<IpAddr>)>,
}

async fn plan(nl: &Netlink, ifaces: &[String]) -> Result<Plan, BackendHostError> {
    let links = nl.links().await?;
    let addrs = nl.addrs().await?;
    let addrs_of = |index: u32| -> Vec<IpAddr> {
        addrs
            .iter()
            .filter(|a| a.index == index && !a.link_local)
            .map(|a| a.addr)
            .collect()
    };
    let lo = links
        .iter()
        .find(|l| l.loopback)
        .ok_or(BackendHostError::NoLoopback)?
        .clone();
    let mut targets: Vec<(String, Vec<IpAddr>)> = Vec::new();
    if ifaces.is_empty() {
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
        for name in ifaces {
            let l = links
                .iter()
                .find(|l| &l.name == name)
                .ok_or_else(|| NoSuchInterface(name.clone()))?;
            let local = addrs_of(l.index);
            if local.is_empty() {
                return Err(BackendHostError::NoAddress(name.clone()));
            }
            targets.push((name.clone(), local));
        }
    }
    Ok(Plan {
        lo_addrs: addrs_of(lo.index),
        lo,
        targets,
    })
}

/// Prepare this namespace as a DSR backend; returns what was done (also saved as the record).
pub(crate) async fn setup(opts: &SetupOptions) -> Result<BackendHostRecord, BackendHostError> {
    for vip in &opts.vips {
        if !is_host_address(*vip) {
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
    let plan = plan(&nl, &opts.ifaces).await?;
    let mut record = BackendHostRecord {
        netns_inode: inode,
        netns_cookie: cookie,
        ..Default::default()
    };
    let mut result = apply(&nl, opts, &plan, &mut record).await;
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
    plan: &Plan,
    record: &mut BackendHostRecord,
) -> Result<(), BackendHostError> {
    if !plan.lo.up {
        nl.set_up(plan.lo.index, true)
            .await
            .map_err(BackendHostError::Lo)?;
        record.lo_brought_up = true;
    }
    for vip in &opts.vips {
        if plan.lo_addrs.contains(vip) || record.lo_addrs.contains(vip) {
            log::info!("{vip} is already on lo; leaving it alone");
            continue;
        }
        nl.add_host_addr(plan.lo.index, *vip)
            .await
            .map_err(BackendHostError::Lo)?;
        record.lo_addrs.push(*vip);
    }

    let names: Vec<String> = plan.targets.iter().map(|(n, _)| n.clone()).collect();
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

    for (iface, local) in &plan.targets {
        let mode = persistent::attach_decap(iface, local, opts.mode)
            .await
            .map_err(|e| BackendHostError::Xdp(Box::new(e)))?;
        log::info!(
            "decapsulator attached to {iface} in {mode} mode for {}",
            local
                .iter()
                .map(IpAddr::to_string)
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
        if let Err(e) = persistent::detach(&x.iface).await {
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
        undo_lo(nl, record, &mut left, &mut errors).await;
    }
    (left, errors)
}

/// Remove the VIPs setup added to `lo` and set it down again if setup brought it up.
async fn undo_lo(
    nl: &Netlink,
    record: &BackendHostRecord,
    left: &mut BackendHostRecord,
    errors: &mut Vec<String>,
) {
    let (links, addrs) = match (nl.links().await, nl.addrs().await) {
        (Ok(links), Ok(addrs)) => (links, addrs),
        (Err(e), _) | (_, Err(e)) => {
            errors.push(format!("listing addresses: {e}"));
            left.lo_addrs = record.lo_addrs.clone();
            left.lo_brought_up = record.lo_brought_up;
            return;
        }
    };
    let lo = links.iter().find(|l| l.loopback);
    for vip in &record.lo_addrs {
        let Some(found) = addrs
            .iter()
            .find(|a| Some(a.index) == lo.map(|l| l.index) && a.addr == *vip)
        else {
            continue;
        };
        if let Err(e) = nl.del_addr(found).await {
            errors.push(format!("lo: {e}"));
            left.lo_addrs.push(*vip);
        }
    }
    if record.lo_brought_up
        && let Some(lo) = lo
        && let Err(e) = nl.set_up(lo.index, false).await
    {
        errors.push(format!("lo: {e}"));
        left.lo_brought_up = true;
    }
}

/// Undo what `setup` recorded in this namespace and delete the record. If something cannot be
/// undone, the record is rewritten with only what is left, so a later teardown can finish.
pub(crate) async fn teardown(record_dir: &Path) -> Result<BackendHostRecord, BackendHostError> {
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
