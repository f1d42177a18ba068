//! The agent's routing table: one `blackhole VIP/32 proto P` (IPv6: `/128`) per announced VIP
//! address in table N, and nothing else of ours. The node's routing daemon imports the table and announces what is
//! in it (BIRD: `protocol kernel` with `learn` and a `krt_source = P` filter; FRR: `redistribute
//! table N`). A blackhole needs no interface and changes nothing for this host's own traffic,
//! since no rule looks the table up (checked at start).
//!
//! A task of its own keeps the table equal to what the serve loop wants: it lists the table (only
//! that table: `NETLINK_GET_STRICT_CHK`), adds the missing routes, and removes its own routes that
//! are not wanted; after every change of the wanted set, every 10 s (a route somebody removed by
//! hand comes back) and 1 s after a failure. It never touches a route of another protocol: an add
//! never replaces (a foreign route on the same prefix makes it fail, and that is reported), and a
//! delete names the exact route the kernel listed.

use super::AnnounceError;
use crate::netlink::{Netlink, TableRoute};
use rtnetlink::IpVersion;
use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the table is listed and repaired when nothing changes.
const REPAIR_INTERVAL: Duration = Duration::from_secs(10);
/// How soon a failed change is tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Table N and the protocol number that marks the agent's routes in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RouteTable {
    pub(crate) table: u32,
    pub(crate) proto: u8,
}

impl RouteTable {
    fn is_ours(&self, r: &TableRoute) -> bool {
        r.protocol == self.proto
    }
}

/// What is in the table, as the keeper last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TableState {
    /// Announced addresses: our blackhole host routes in the table (/32, /128).
    pub(crate) present: BTreeSet<IpAddr>,
    /// The last failure, until a pass succeeds.
    pub(crate) error: Option<String>,
}

/// Refuse a table the agent must not write: one that a policy-routing rule looks up (this host's
/// own traffic to a VIP would hit the blackhole), or one that holds routes of another protocol
/// (the agent keeps "nothing else" in its table, and the daemon may announce whatever is there).
/// Reads only; changes nothing.
/// Routes of `earlier` (the announcement recorded with the data path being taken over) in the
/// same table count as the agent's own.
pub(crate) async fn check_table(
    nl: &Netlink,
    t: RouteTable,
    earlier: Option<RouteTable>,
) -> Result<(), AnnounceError> {
    if nl.rule_tables().await?.contains(&t.table) {
        return Err(AnnounceError::RuleUsesTable { table: t.table });
    }
    let ours = |r: &TableRoute| {
        t.is_ours(r) || earlier.is_some_and(|e| e.table == t.table && e.is_ours(r))
    };
    let routes = table_routes(nl, t).await?;
    if let Some(foreign) = routes.iter().find(|r| !ours(r)) {
        return Err(AnnounceError::Foreign {
            table: t.table,
            route: foreign.to_string(),
            count: routes.iter().filter(|r| !ours(r)).count(),
        });
    }
    Ok(())
}

/// Make our routes in the table exactly `want`: one pass. The addresses present afterwards, and
/// the failures of the pass.
async fn reconcile(
    nl: &Netlink,
    t: RouteTable,
    want: &BTreeSet<IpAddr>,
    foreign_seen: &mut BTreeSet<String>,
) -> (BTreeSet<IpAddr>, Vec<String>) {
    let mut errors = Vec::new();
    let routes = match table_routes(nl, t).await {
        Ok(r) => r,
        Err(e) => return (BTreeSet::new(), vec![e.to_string()]),
    };
    let mut present = BTreeSet::new();
    for r in &routes {
        if !t.is_ours(r) {
            // Someone added it after the start check: never touched, said once.
            if foreign_seen.insert(r.to_string()) {
                log::warn!(
                    "routing table {} holds a route that is not xlb's: {r}; it is left alone, \
                     but the routing daemon may announce it",
                    t.table
                );
            }
            continue;
        }
        match r.blackhole_host() {
            Some(addr) if want.contains(&addr) => {
                present.insert(addr);
            }
            // Ours but not wanted (withdrawn, left by an earlier run, or of another shape).
            _ => match nl.del_route(r).await {
                Ok(()) => {
                    if let Some(addr) = r.blackhole_host() {
                        log::info!("withdrew {addr} (removed from routing table {})", t.table);
                    }
                }
                Err(e) => {
                    if let Some(addr) = r.blackhole_host() {
                        present.insert(addr);
                    }
                    errors.push(e.to_string());
                }
            },
        }
    }
    for addr in want.difference(&present.clone()) {
        match nl.add_blackhole(t.table, t.proto, *addr).await {
            Ok(()) => {
                log::info!("announced {addr} (added to routing table {})", t.table);
                present.insert(*addr);
            }
            Err(e) if e.errno() == Some(libc::EEXIST) => errors.push(format!(
                "{addr}/{} is taken in routing table {} by a route that is not xlb's: not \
                 announced",
                crate::netlink::host_prefix_len(*addr),
                t.table
            )),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (present, errors)
}

/// Every route of table `t`, both families.
pub(crate) async fn table_routes(
    nl: &Netlink,
    t: RouteTable,
) -> Result<Vec<TableRoute>, crate::netlink::NetlinkError> {
    let mut routes = nl.table_routes(IpVersion::V4, t.table).await?;
    routes.extend(nl.table_routes(IpVersion::V6, t.table).await?);
    Ok(routes)
}

/// Remove every route of ours from the table; how many there were.
pub(crate) async fn withdraw_all(nl: &Netlink, t: RouteTable) -> Result<usize, AnnounceError> {
    let mut removed = 0;
    for r in table_routes(nl, t).await? {
        if t.is_ours(&r) {
            nl.del_route(&r).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Keep the table equal to `want` until `cancel` (the routes stay: the data path outlives the
/// agent) or `withdraw` (every route of ours is removed first). `state` follows each pass.
pub(crate) async fn keep(
    nl: Netlink,
    t: RouteTable,
    mut want: watch::Receiver<BTreeSet<IpAddr>>,
    state: Arc<Mutex<TableState>>,
    withdraw: CancellationToken,
    cancel: CancellationToken,
) {
    let mut foreign_seen = BTreeSet::new();
    let mut last_error: Option<String> = None;
    loop {
        let withdrawing = withdraw.is_cancelled();
        let target = if withdrawing {
            BTreeSet::new()
        } else {
            want.borrow_and_update().clone()
        };
        let (present, errors) = reconcile(&nl, t, &target, &mut foreign_seen).await;
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        if error != last_error {
            match &error {
                Some(e) => log::error!("routing table {}: {e} (retrying)", t.table),
                None if last_error.is_some() => {
                    log::info!("routing table {}: in order again", t.table);
                }
                None => {}
            }
            last_error.clone_from(&error);
        }
        let failed = error.is_some();
        {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.present = present;
            s.error = error;
        }
        if withdrawing && !failed {
            return;
        }
        let pause = if failed {
            RETRY_INTERVAL
        } else {
            REPAIR_INTERVAL
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = withdraw.cancelled(), if !withdrawing => {}
            changed = want.changed(), if !withdrawing => if changed.is_err() {
                // The serve loop is gone: nothing will change what is wanted any more.
                return;
            },
            () = tokio::time::sleep(pause) => {}
        }
    }
}
