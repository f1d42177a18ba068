//! The global deny list (`xlb deny add|del|list|load`): its prefixes, which half of the data
//! path's two tries is live, and its file in the state directory.
//!
//! Changes take seconds for a million prefixes, so they run on a blocking thread (one at a time:
//! the list is behind a mutex), never in the serve loop. The tries are written through handles
//! of their own (`DenyMaps`); only the switch — which half is live, how many prefixes it holds,
//! and a new policy generation so every flow is checked again — goes through the serve loop,
//! which owns the data path's configuration (`Switch`).
//!
//! Every change follows the controller's order: the data path first, then the file, and only
//! then the list in memory; a failure undoes what was done, so the three never disagree.
//! - `add`/`del` edit the live half in place (a packet may see some of the prefixes of one
//!   request before the others, as with any single insert);
//! - `load` fills the other half, switches to it (one `POLICY` update, then a second bump of the
//!   generation, so a flow checked by a packet that read the switch half-written is checked
//!   again), then empties the old half.

use crate::{
    dataplane::{DataplaneError, DenyCount, DenyMaps},
    model::net::{IpNet, ListError, parse_list},
    util::write_atomic,
};
use lb_common::MAX_DENY_PREFIXES;
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs, io,
    path::{Path, PathBuf},
    time::Instant,
};

/// The deny list's file in `--state-dir`.
pub(crate) const DENY_FILE: &str = "deny.txt";

#[derive(Debug, thiserror::Error)]
pub(crate) enum DenyError {
    #[error(
        "the deny list holds at most {MAX_DENY_PREFIXES} prefixes: {have} listed, {more} more asked for"
    )]
    Full { have: usize, more: usize },
    #[error("the deny list holds at most {MAX_DENY_PREFIXES} prefixes; {0} given")]
    TooLong(usize),
    #[error("{0} is not on the deny list")]
    NotListed(IpNet),
    #[error("{0} is listed twice in the request")]
    Twice(IpNet),
    #[error(transparent)]
    Dataplane(Box<DataplaneError>),
    #[error("switching the data path to the new deny list failed: {0}")]
    Switch(String),
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(transparent)]
    List(#[from] ListError),
}

impl From<DataplaneError> for DenyError {
    fn from(e: DataplaneError) -> Self {
        DenyError::Dataplane(Box::new(e))
    }
}

/// Where the deny list's prefixes are written: the data path's two tries, or a stand-in.
pub(crate) trait DenyTables: Send {
    fn fill(&mut self, half: u32, prefixes: &[IpNet]) -> Result<(), DataplaneError>;
    fn clear(&mut self, half: u32, prefixes: &[IpNet]) -> Result<(), DataplaneError>;
}

impl DenyTables for DenyMaps {
    fn fill(&mut self, half: u32, prefixes: &[IpNet]) -> Result<(), DataplaneError> {
        DenyMaps::fill(self, half, prefixes)
    }
    fn clear(&mut self, half: u32, prefixes: &[IpNet]) -> Result<(), DataplaneError> {
        DenyMaps::clear(self, half, prefixes)
    }
}

/// Tells the data path which half is live and how many entries it holds in each structure (and
/// bumps the policy generation): through the serve loop in the agent.
pub(crate) trait Switch {
    fn switch(&self, live: u32, count: DenyCount) -> Result<(), DenyError>;
}

/// The deny list.
pub(crate) struct DenyList {
    tables: Box<dyn DenyTables>,
    live: u32,
    prefixes: BTreeSet<IpNet>,
    path: PathBuf,
    /// Prefixes a failed clear left in the half that is not live: cleared before it is filled.
    leftover: Vec<IpNet>,
}

impl DenyList {
    /// The list as installed: `prefixes` in half `live` of `tables`, kept in `path`.
    pub(crate) fn new(
        tables: Box<dyn DenyTables>,
        live: u32,
        prefixes: Vec<IpNet>,
        path: PathBuf,
    ) -> Self {
        DenyList {
            tables,
            live,
            prefixes: prefixes.into_iter().collect(),
            path,
            leftover: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.prefixes.len()
    }

    /// Its host entries and shorter prefixes.
    pub(crate) fn count(&self) -> DenyCount {
        DenyCount::of(&self.prefixes)
    }

    /// Every prefix, in order.
    pub(crate) fn list(&self) -> Vec<IpNet> {
        self.prefixes.iter().copied().collect()
    }

    /// Add `nets` (those already listed are left as they are).
    pub(crate) fn add(&mut self, nets: &[IpNet], switch: &dyn Switch) -> Result<String, DenyError> {
        let new = distinct(nets)?
            .into_iter()
            .filter(|n| !self.prefixes.contains(n))
            .collect::<Vec<_>>();
        let total = self.prefixes.len() + new.len();
        if total > MAX_DENY_PREFIXES as usize {
            return Err(DenyError::Full {
                have: self.prefixes.len(),
                more: new.len(),
            });
        }
        let known = nets.len() - new.len();
        if !new.is_empty() {
            self.tables.fill(self.live, &new)?;
            let mut next = self.prefixes.clone();
            next.extend(new.iter().copied());
            if let Err(e) = self.apply(self.live, &next, switch) {
                self.undo(self.live, &new);
                return Err(e);
            }
            self.prefixes = next;
        }
        let already = if known > 0 {
            format!(" ({known} already listed)")
        } else {
            String::new()
        };
        Ok(format!(
            "deny list: added {} prefixes{already}, {} in all",
            new.len(),
            self.prefixes.len()
        ))
    }

    /// Remove `nets`; every one must be listed, else nothing changes.
    pub(crate) fn del(&mut self, nets: &[IpNet], switch: &dyn Switch) -> Result<String, DenyError> {
        let gone = distinct(nets)?;
        if let Some(missing) = gone.iter().find(|n| !self.prefixes.contains(n)) {
            return Err(DenyError::NotListed(*missing));
        }
        self.tables.clear(self.live, &gone)?;
        let mut next = self.prefixes.clone();
        for n in &gone {
            next.remove(n);
        }
        if let Err(e) = self.apply(self.live, &next, switch) {
            if let Err(re) = self.tables.fill(self.live, &gone) {
                log::error!("putting the deny list's prefixes back after a failed removal: {re}");
            }
            return Err(e);
        }
        self.prefixes = next;
        Ok(format!(
            "deny list: removed {} prefixes, {} in all",
            gone.len(),
            self.prefixes.len()
        ))
    }

    /// Replace the whole list with `nets` (from `source`, for the message): the other half is
    /// filled, then made live (`Switch::switch`: one `POLICY` update and a second bump), then
    /// the old half emptied.
    pub(crate) fn load(
        &mut self,
        nets: &[IpNet],
        source: &str,
        switch: &dyn Switch,
    ) -> Result<String, DenyError> {
        let started = Instant::now();
        let next: BTreeSet<IpNet> = nets.iter().copied().collect();
        if next.len() > MAX_DENY_PREFIXES as usize {
            return Err(DenyError::TooLong(next.len()));
        }
        let other = self.live ^ 1;
        if !self.leftover.is_empty() {
            self.tables.clear(other, &self.leftover)?;
            self.leftover.clear();
        }
        let list: Vec<IpNet> = next.iter().copied().collect();
        if let Err(e) = self.tables.fill(other, &list) {
            self.undo(other, &list);
            return Err(e.into());
        }
        if let Err(e) = self.apply(other, &next, switch) {
            self.undo(other, &list);
            return Err(e);
        }
        let old: Vec<IpNet> = std::mem::replace(&mut self.prefixes, next)
            .into_iter()
            .collect();
        let old_live = std::mem::replace(&mut self.live, other);
        if let Err(e) = self.tables.clear(old_live, &old) {
            log::warn!(
                "emptying the deny list's old half: {e} (it is emptied before its next use)"
            );
            self.leftover = old.clone();
        }
        Ok(format!(
            "deny list: loaded {} prefixes from {source} in {:.1} s (replacing {})",
            self.prefixes.len(),
            started.elapsed().as_secs_f64(),
            old.len()
        ))
    }

    /// Make half `live` holding `next` the data path's, then write `next` to the file; if the
    /// file cannot be written, the data path is switched back.
    fn apply(
        &self,
        live: u32,
        next: &BTreeSet<IpNet>,
        switch: &dyn Switch,
    ) -> Result<(), DenyError> {
        switch.switch(live, DenyCount::of(next))?;
        if let Err(e) = save(&self.path, next.iter()) {
            if let Err(re) = switch.switch(self.live, DenyCount::of(&self.prefixes)) {
                log::error!("switching the deny list back after a failed write: {re}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Remove `nets` from half `half` after a failed change (best effort: the change's own
    /// error is what is reported); what stays is remembered for the half's next use.
    fn undo(&mut self, half: u32, nets: &[IpNet]) {
        if let Err(e) = self.tables.clear(half, nets) {
            log::error!("undoing a failed deny-list change: {e}");
            if half != self.live {
                self.leftover.extend_from_slice(nets);
            }
        }
    }
}

/// `nets` without repeats; a repeat is a mistake in the request.
fn distinct(nets: &[IpNet]) -> Result<Vec<IpNet>, DenyError> {
    let mut seen = BTreeSet::new();
    for n in nets {
        if !seen.insert(*n) {
            return Err(DenyError::Twice(*n));
        }
    }
    Ok(nets.to_vec())
}

/// Write the list to `path` atomically.
fn save<'a>(path: &Path, prefixes: impl Iterator<Item = &'a IpNet>) -> Result<(), DenyError> {
    let mut text = String::from(
        "# xlb deny list: one prefix per line. Written by the agent; change it with `xlb deny`.\n",
    );
    for p in prefixes {
        let _ = writeln!(text, "{p}");
    }
    write_atomic(path, text.as_bytes()).map_err(|source| DenyError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The list saved at `path`; empty if there is none. A file that does not parse is an error
/// (starting without the list would let in what it keeps out).
pub(crate) fn load_file(path: &Path) -> Result<Vec<IpNet>, DenyError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(parse_list(&text, &path.display().to_string())?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(DenyError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::{
        cell::RefCell,
        sync::{Arc, Mutex},
    };

    /// The two halves in memory, with a knob to make fills fail.
    #[derive(Default)]
    pub(crate) struct FakeTables {
        pub(crate) halves: Arc<Mutex<[BTreeSet<IpNet>; 2]>>,
        pub(crate) fail_fill: bool,
    }

    impl DenyTables for FakeTables {
        fn fill(&mut self, half: u32, prefixes: &[IpNet]) -> Result<(), DataplaneError> {
            if self.fail_fill {
                return Err(DataplaneError::DenyListFull { n: 0, max: 0 });
            }
            self.halves.lock().unwrap()[half as usize].extend(prefixes.iter().copied());
            Ok(())
        }
        fn clear(&mut self, half: u32, prefixes: &[IpNet]) -> Result<(), DataplaneError> {
            let mut h = self.halves.lock().unwrap();
            for p in prefixes {
                h[half as usize].remove(p);
            }
            Ok(())
        }
    }

    /// Records every switch; fails when told.
    #[derive(Default)]
    pub(crate) struct FakeSwitch {
        pub(crate) log: RefCell<Vec<(u32, DenyCount)>>,
        pub(crate) fail: bool,
    }

    impl Switch for FakeSwitch {
        fn switch(&self, live: u32, count: DenyCount) -> Result<(), DenyError> {
            if self.fail {
                return Err(DenyError::Switch("map update failed".into()));
            }
            self.log.borrow_mut().push((live, count));
            Ok(())
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn fixture(dir: &Path) -> (DenyList, Arc<Mutex<[BTreeSet<IpNet>; 2]>>) {
        let tables = FakeTables::default();
        let halves = tables.halves.clone();
        let list = DenyList::new(Box::new(tables), 0, Vec::new(), dir.join(DENY_FILE));
        (list, halves)
    }

    #[test]
    fn add_del_and_load_keep_tables_file_and_memory_together() {
        let dir = tempfile::tempdir().unwrap();
        let (mut list, halves) = fixture(dir.path());
        let sw = FakeSwitch::default();
        let msg = list
            .add(&nets(&["10.0.0.0/8", "192.0.2.0/24"]), &sw)
            .unwrap();
        assert_eq!(msg, "deny list: added 2 prefixes, 2 in all");
        let msg = list
            .add(&nets(&["10.0.0.0/8", "198.51.100.7"]), &sw)
            .unwrap();
        assert_eq!(
            msg,
            "deny list: added 1 prefixes (1 already listed), 3 in all"
        );
        assert_eq!(halves.lock().unwrap()[0].len(), 3);
        assert_eq!(load_file(&dir.path().join(DENY_FILE)).unwrap().len(), 3);
        assert!(matches!(
            list.del(&nets(&["203.0.113.0/24"]), &sw),
            Err(DenyError::NotListed(_))
        ));
        list.del(&nets(&["192.0.2.0/24"]), &sw).unwrap();
        assert_eq!(list.len(), 2);

        let msg = list
            .load(
                &nets(&["203.0.113.0/24", "203.0.113.0/24"]),
                "feed.txt",
                &sw,
            )
            .unwrap();
        assert!(
            msg.starts_with("deny list: loaded 1 prefixes from feed.txt in "),
            "{msg}"
        );
        assert!(msg.ends_with("(replacing 2)"), "{msg}");
        let h = halves.lock().unwrap();
        assert!(h[0].is_empty(), "the old half is emptied");
        assert_eq!(h[1].len(), 1);
        drop(h);
        assert_eq!(
            sw.log.borrow().last(),
            Some(&(
                1,
                DenyCount {
                    nets: 1,
                    ..DenyCount::default()
                }
            )),
            "the other half made live"
        );
        assert_eq!(
            load_file(&dir.path().join(DENY_FILE)).unwrap(),
            nets(&["203.0.113.0/24"])
        );
        // The next load goes back to half 0.
        list.load(
            &nets(&["10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32", "fd11::7"]),
            "f",
            &sw,
        )
        .unwrap();
        assert_eq!(
            sw.log.borrow().last(),
            Some(&(
                0,
                DenyCount {
                    hosts: 1,
                    nets: 1,
                    nets6: 2
                }
            )),
            "host entries, shorter prefixes and IPv6 prefixes counted apart"
        );
        assert_eq!(
            halves.lock().unwrap()[0]
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32", "fd11::7/128"]
        );
        assert_eq!(
            fs::read_to_string(dir.path().join(DENY_FILE))
                .unwrap()
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            ["10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32", "fd11::7/128"],
            "both families saved, IPv4 first"
        );
    }

    #[test]
    fn failures_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut list, halves) = fixture(dir.path());
        let sw = FakeSwitch::default();
        list.add(&nets(&["10.0.0.0/8"]), &sw).unwrap();
        let failing = FakeSwitch {
            fail: true,
            ..Default::default()
        };
        assert!(list.add(&nets(&["192.0.2.0/24"]), &failing).is_err());
        assert!(list.load(&nets(&["192.0.2.0/24"]), "f", &failing).is_err());
        assert!(list.del(&nets(&["10.0.0.0/8"]), &failing).is_err());
        assert_eq!(list.list(), nets(&["10.0.0.0/8"]));
        let h = halves.lock().unwrap();
        assert_eq!(
            h[0].iter().copied().collect::<Vec<_>>(),
            nets(&["10.0.0.0/8"])
        );
        assert!(h[1].is_empty());
        drop(h);
        assert!(matches!(
            list.add(&nets(&["10.1.0.0/16", "10.1.0.0/16"]), &sw),
            Err(DenyError::Twice(_))
        ));
        // A file that cannot be written: the switch is undone.
        let blocked = dir.path().join("file");
        fs::write(&blocked, "").unwrap();
        let tables = FakeTables::default();
        let h2 = tables.halves.clone();
        let mut list = DenyList::new(Box::new(tables), 0, Vec::new(), blocked.join("deny.txt"));
        let sw = FakeSwitch::default();
        assert!(matches!(
            list.add(&nets(&["10.0.0.0/8"]), &sw),
            Err(DenyError::Write { .. })
        ));
        let one = DenyCount {
            nets: 1,
            ..DenyCount::default()
        };
        assert_eq!(*sw.log.borrow(), vec![(0, one), (0, DenyCount::default())]);
        assert!(h2.lock().unwrap()[0].is_empty());
        assert_eq!(list.len(), 0);
    }

    #[test]
    fn the_saved_file_loads_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DENY_FILE);
        assert_eq!(load_file(&path).unwrap(), vec![]);
        save(&path, nets(&["10.0.0.0/8"]).iter()).unwrap();
        assert_eq!(load_file(&path).unwrap(), nets(&["10.0.0.0/8"]));
        fs::write(&path, "10.0.0.0/8\n10.0.0.1/8\n").unwrap();
        let e = load_file(&path).unwrap_err().to_string();
        assert!(e.ends_with("deny.txt line 2: prefix \"10.0.0.1/8\" has host bits set (the network is 10.0.0.0/8)"), "{e}");
    }
}
