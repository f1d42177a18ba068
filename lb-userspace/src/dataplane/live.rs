//! The balancer's life in bpffs: a load that takes over a running data path or starts a new one
//! (`Dataplane::load`), the moment the new program starts serving (`go_live`: a first attach
//! pins the link last; a takeover swaps the program inside the pinned link with
//! `BPF_LINK_UPDATE`, atomic per packet), and its explicit removal (`remove_data_path`).
//!
//! Order of a takeover, so that a failure at any step leaves the running data path serving:
//! lock the directory, plan each map (reuse, copy, refuse), load the program with the maps bound
//! to their pins (new ones in `staging/`), copy what has to be copied, rebuild the bookkeeping,
//! let the agent reconcile its desired state into the shared maps, swap, copy what the old
//! program wrote meanwhile, publish `staging/`. Dropping a `Dataplane` never detaches anything.

use super::{
    AttachedMode, Dataplane, DataplaneError, XdpModeChoice,
    adopt::DownBackend,
    attach, meta,
    meta::PinMeta,
    migrate::{self, CopyCount, Entries},
    object::EBPF_OBJECT,
    pins::{self, LinkInfo, MapShape, PinDir, PinError},
    plan::{self, Action, Expected, Found, MapPlan},
};
use crate::{netlink::Netlink, util::interface_index};
use aya::{
    EbpfLoader,
    maps::{HashMap, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{Addr, CONFIG_F_MIGRATING, FLOW_F_HELD, FlowKey, FlowStamp, FlowValue, maps};
use std::{
    collections::BTreeSet,
    fs,
    os::fd::AsFd,
    path::Path,
    time::{Duration, Instant},
};

/// How long after the swap the last copy pass waits: packets the old program was handling at
/// the swap are done well before (an RCU grace period).
const SWAP_GRACE: Duration = Duration::from_millis(50);

/// What loading found and did.
#[derive(Clone, Debug, Default)]
pub struct Startup {
    /// A running data path was taken over (its flows, counters and ring state stay).
    pub adopted: bool,
    /// Backends the running data path had taken out of service: they stay down until their
    /// checks pass.
    pub down: BTreeSet<DownBackend>,
    /// One line per map that was not simply reused (copied to a new capacity or layout).
    pub copies: Vec<String>,
}

/// A copy to finish after the swap.
struct Pending {
    name: &'static str,
    /// Where the new map is pinned (in `staging/`).
    pin: std::path::PathBuf,
    from: plan::Source,
    new_shape: MapShape,
    /// The old map's entries when they were copied (counters add what grew since).
    before: Entries,
}

impl Pending {
    fn new(plan: &MapPlan, from: &plan::Source, before: Entries) -> Self {
        Pending {
            name: plan.name,
            pin: plan.pin.clone(),
            from: from.clone(),
            new_shape: plan.shape,
            before,
        }
    }
}

/// The pinned side of an attached `Dataplane`.
pub(crate) struct Pinned {
    dir: PinDir,
    iface: String,
    adopted: Option<LinkInfo>,
    plans: Vec<MapPlan>,
    found: Vec<Found>,
    pending: Vec<Pending>,
    meta: PinMeta,
}

impl Pinned {
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn pin_err(e: PinError) -> DataplaneError {
    DataplaneError::Pin(Box::new(e))
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |source| DataplaneError::Io { what, source }
}

/// The maps this build pins, with the shapes its object declares (the flow table at
/// `flow_capacity`, the embryonic table at `embryo_capacity`).
fn expected_maps(
    flow_capacity: u32,
    embryo_capacity: u32,
) -> Result<Vec<Expected>, DataplaneError> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| DataplaneError::Io {
        what: "parsing the embedded XDP object".into(),
        source: std::io::Error::other(e),
    })?;
    plan::pinned_maps()
        .iter()
        .map(|&(name, version)| {
            let m = obj
                .maps
                .get(name)
                .ok_or(DataplaneError::MissingMap { name })?;
            let max_entries = match name {
                maps::FLOWS => flow_capacity,
                maps::EMBRYOS => embryo_capacity,
                _ => m.max_entries(),
            };
            Ok(Expected {
                name,
                version,
                shape: MapShape {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries,
                    flags: m.map_flags(),
                },
            })
        })
        .collect()
}

/// The map pins of `dir` with their shapes.
fn found_pins(dir: &PinDir) -> Result<Vec<Found>, DataplaneError> {
    let mut found = Vec::new();
    for (name, version, path) in dir.map_pins().map_err(pin_err)? {
        if path.file_name().is_some_and(meta::is_record) {
            continue;
        }
        let (_, shape) = pins::pinned_map(&path).map_err(pin_err)?;
        found.push(Found {
            name,
            version,
            shape,
            path,
        });
    }
    Ok(found)
}

/// Everything in `dir` but the host records: leftovers that steer nothing.
fn clear_leftovers(dir: &PinDir) -> Result<(), DataplaneError> {
    let entries =
        fs::read_dir(dir.path()).map_err(io_err(format!("listing {}", dir.path().display())))?;
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if meta::is_record(&entry.file_name()) {
            continue;
        }
        let result = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(io_err(format!("removing {}", path.display())))?;
        removed += 1;
    }
    if removed > 0 {
        log::info!(
            "{}: removed {removed} pins of a data path that no longer ran (a first attach that never finished, or its device was replaced)",
            dir.path().display()
        );
    }
    Ok(())
}

/// A crash during an earlier upgrade left `staging/`: if the running program already uses the
/// staged maps, the swap happened and they are published now; otherwise they are discarded.
fn recover_staging(dir: &PinDir, prog_id: u32) -> Result<(), DataplaneError> {
    let staging = dir.staging();
    if !staging.exists() {
        return Ok(());
    }
    let used: BTreeSet<u32> = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == prog_id)
        .and_then(|p| p.map_ids().ok().flatten())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let staged = pins::map_pins_in(&staging).map_err(pin_err)?;
    let swapped = staged
        .iter()
        .any(|(_, _, p)| pins::pinned_map(p).is_ok_and(|(id, _)| used.contains(&id)));
    if swapped {
        for (name, _, path) in &staged {
            for (old_name, _, old) in dir.map_pins().map_err(pin_err)? {
                if &old_name == name {
                    let _ = fs::remove_file(old);
                }
            }
            let target = dir.path().join(path.file_name().expect("a pin has a name"));
            fs::rename(path, &target).map_err(io_err(format!("publishing {}", path.display())))?;
        }
        log::warn!(
            "{}: an earlier upgrade stopped after its swap; its maps are published now",
            dir.path().display()
        );
    } else {
        log::warn!(
            "{}: discarding the maps of an earlier upgrade that never swapped",
            dir.path().display()
        );
    }
    pins::remove_tree(&staging).map_err(pin_err)
}

impl Dataplane {
    /// Load the balancer for `opts.iface` with its state in bpffs: take over the data path that
    /// runs there (its maps as they are, or copied into maps of this build's capacity and
    /// layout), or prepare a new one. Nothing serves differently until `go_live`.
    pub async fn load(opts: &super::DataplaneOptions) -> Result<(Self, Startup), DataplaneError> {
        let ifindex = interface_index(&opts.iface)?;
        let root = pins::agent_root(&opts.bpffs).map_err(pin_err)?;
        let dir = PinDir::lock(&root, &opts.iface, ifindex).map_err(pin_err)?;
        let path = dir.path().to_path_buf();
        let loaded = Self::load_locked(opts, &root, dir).await;
        if loaded.is_err() {
            // A directory this attempt created and left empty (a refusal before anything was
            // pinned) goes; one with pins in it is not touched.
            let _ = fs::remove_dir(&path);
        }
        loaded
    }

    async fn load_locked(
        opts: &super::DataplaneOptions,
        root: &Path,
        dir: PinDir,
    ) -> Result<(Self, Startup), DataplaneError> {
        let ifindex = interface_index(&opts.iface)?;
        pins::collect_garbage(root, dir.path());
        let netlink_err = |source| DataplaneError::Netlink {
            iface: opts.iface.clone(),
            source,
        };
        let attached = Netlink::connect()
            .map_err(netlink_err)?
            .xdp_program(ifindex)
            .await
            .map_err(netlink_err)?;
        let link = dir.link().map_err(pin_err)?;
        let adopted = match (link, attached) {
            (Some(l), Some((prog, _))) if !l.defunct() && l.prog_id == prog => Some(l),
            (Some(l), _) if !l.defunct() => {
                return Err(DataplaneError::LinkElsewhere {
                    iface: opts.iface.clone(),
                    dir: dir.path().to_path_buf(),
                    prog: l.prog_id,
                });
            }
            (_, Some((prog, _))) => {
                return Err(DataplaneError::Foreign {
                    iface: opts.iface.clone(),
                    prog,
                    dirs: pins::dirs_with_program(root, prog),
                });
            }
            _ => None,
        };
        let meta = meta::read(dir.path())
            .filter(|m| m.ifindex() == ifindex)
            .unwrap_or_else(|| PinMeta::new(&opts.iface, ifindex));
        match adopted {
            Some(l) => recover_staging(&dir, l.prog_id)?,
            None => clear_leftovers(&dir)?,
        }
        let found = found_pins(&dir)?;
        let plans = plan::plan(
            dir.path(),
            &expected_maps(opts.flow_capacity, opts.embryo_capacity)?,
            &found,
            adopted.is_some(),
        )
        .map_err(|e| DataplaneError::Plan(Box::new(e)))?;
        if plans.iter().any(|p| p.pin.starts_with(dir.staging())) {
            fs::create_dir_all(dir.staging())
                .map_err(io_err(format!("creating {}", dir.staging().display())))?;
        }
        let loaded = Self::load_pinned(opts, &plans, adopted.is_some());
        let loaded = match loaded {
            Ok(v) => v,
            Err(e) => {
                // The running data path is untouched: only what this load created goes.
                if adopted.is_some() {
                    let _ = pins::remove_tree(&dir.staging());
                } else {
                    let _ = clear_leftovers(&dir);
                }
                return Err(e);
            }
        };
        let (mut dp, startup, pending) = loaded;
        if adopted.is_some() {
            // The running data path's deny list (pinned, still dropping) becomes the saved one
            // by difference: never empty meanwhile.
            let r = dp.reconcile_deny_list(&opts.deny)?;
            if r != super::firewall::DenyReconcile::default() {
                log::info!(
                    "deny list taken over: {} prefixes added, {} removed ({} left by an unfinished load cleared)",
                    r.added,
                    r.removed,
                    r.leftover
                );
            }
        } else if !opts.deny.is_empty() {
            // A first attach: the deny list is in place before the program sees a packet.
            dp.install_deny_list(&opts.deny)?;
        }
        if adopted.is_some() {
            // The link keeps the mode of its first attach.
            dp.mode = meta.mode().or(attached.map(|(_, driver)| {
                if driver {
                    AttachedMode::Driver
                } else {
                    AttachedMode::Generic
                }
            }));
        }
        let wanted = match opts.mode {
            XdpModeChoice::Driver => Some(AttachedMode::Driver),
            XdpModeChoice::Generic => Some(AttachedMode::Generic),
            XdpModeChoice::Auto => None,
        };
        if let (Some(got), Some(wanted)) = (dp.mode, wanted)
            && got != wanted
        {
            log::warn!(
                "the data path on {} runs in {got} mode, so it stays in it: a mode cannot change under a running data path (`xlb detach`, then start the agent, to attach in {wanted} mode)",
                opts.iface
            );
        }
        dp.pinned = Some(Pinned {
            dir,
            iface: opts.iface.clone(),
            adopted,
            plans,
            found,
            pending,
            meta,
        });
        Ok((dp, startup))
    }

    /// Load the object with every state map bound to its planned pin, copy what the plan says,
    /// and (taking over) rebuild the bookkeeping.
    fn load_pinned(
        opts: &super::DataplaneOptions,
        plans: &[MapPlan],
        adopting: bool,
    ) -> Result<(Self, Startup, Vec<Pending>), DataplaneError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::FLOWS, opts.flow_capacity);
        loader.map_max_entries(maps::EMBRYOS, opts.embryo_capacity);
        for p in plans {
            loader.map_pin_path(p.name, p.pin.as_path());
        }
        let ebpf = loader.load(EBPF_OBJECT)?;
        let nr_cpus = super::possible_cpus()?;
        let mut startup = Startup {
            adopted: adopting,
            ..Startup::default()
        };
        let mut pending = Vec::new();
        // Everything but the flow tables first: the flows are installed by backend address,
        // which needs the VIPs and slots in place.
        for p in plans {
            if let (Action::Copy(from), false) = (&p.action, is_flow_table(p.name)) {
                let (before, count) = copy_same_layout(p, from, nr_cpus)?;
                startup.copies.push(describe(p, from, count));
                pending.push(Pending::new(p, from, before));
            }
        }
        let mut dp = Self::from_ebpf(
            ebpf,
            opts.flow_capacity,
            opts.embryo_capacity,
            Some(opts.lb_addr),
        )?;
        dp.set_lb_addr6(opts.lb_addr6)?;
        dp.log_pump = super::spawn_log_pump(&mut dp.ebpf);
        if adopting {
            startup.down = dp.rebuild_from_maps()?;
        }
        for p in plans.iter().filter(|p| is_flow_table(p.name)) {
            let Action::Copy(from) = &p.action else {
                continue;
            };
            let count = dp.copy_flows(p.name, from, 0)?;
            startup.copies.push(describe(p, from, count));
            pending.push(Pending::new(p, from, Entries::new()));
            // Until the last pass after the swap, a flow may be missing from the new table only
            // for now: the new program drops (rather than re-steers) its packets meanwhile.
            dp.set_config_flag(CONFIG_F_MIGRATING, true)?;
        }
        Ok((dp, startup, pending))
    }

    /// Copy the flows of the old table at `from` into this load's table `table` (`FLOWS` or
    /// `EMBRYOS`), decoded from their layout and installed by backend address. `flags` 0
    /// overwrites, `BPF_NOEXIST` keeps what the new program wrote.
    fn copy_flows(
        &mut self,
        table: &'static str,
        from: &plan::Source,
        flags: u64,
    ) -> Result<CopyCount, DataplaneError> {
        let old = MapData::from_pin(&from.path).map_err(super::map_err(table))?;
        let entries = migrate::read_entries(old.fd().as_fd(), &from.shape, 1)
            .map_err(io_err(format!("reading {}", from.path.display())))?;
        let mut count = CopyCount::default();
        let mut flows = Vec::with_capacity(entries.len());
        for (key, value) in &entries {
            match migrate::decode_flow(migrate::flow_layout(table, from.version), key, value) {
                // A flow held for a peer's record has no backend to install by: its next packet
                // holds it again.
                Some(f) if f.flags & FLOW_F_HELD != 0 => {}
                Some(f) => flows.push(f),
                None => count.left_out += 1,
            }
        }
        let keep_stamps = self.policy_carried;
        let report = self.install(
            table,
            flows.into_iter().map(|f| FlowInstall {
                key: f.key,
                backend_addr: f.backend_addr,
                last_seen_ns: Some(f.last_seen_ns),
                flags: f.flags,
                // A stamp names a generation of the `POLICY` the old program used. A new one
                // restarts at 1, where an old stamp could match by chance and be believed
                // (source checks and cached VIP unchecked): such flows are checked again.
                stamp: if keep_stamps {
                    f.stamp
                } else {
                    FlowStamp::NONE
                },
            }),
            flags,
        )?;
        count.copied += report.installed;
        count.left_out += report.unknown_backend;
        Ok(count)
    }

    /// Start serving: swap this load's program into the pinned link of the data path it took
    /// over, or attach it (auto: driver, else generic) and pin its link, last. Then finish the
    /// copies (what the old program wrote since) and publish the new maps. Without pins (a load
    /// for tests) nothing happens.
    pub fn go_live(&mut self, mode: XdpModeChoice) -> Result<(), DataplaneError> {
        let Some(mut pinned) = self.pinned.take() else {
            return Ok(());
        };
        let result = self.go_live_pinned(&mut pinned, mode);
        self.pinned = Some(pinned);
        result
    }

    fn go_live_pinned(
        &mut self,
        p: &mut Pinned,
        mode: XdpModeChoice,
    ) -> Result<(), DataplaneError> {
        ensure_forwarding(&p.iface, &mut p.meta)?;
        let swap_started = Instant::now();
        match p.adopted {
            Some(_) => {
                let link =
                    PinnedLink::from_pin(p.dir.link_path()).map_err(|e| DataplaneError::Link {
                        what: "opening the pinned link",
                        source: Box::new(e),
                    })?;
                let link: XdpLink =
                    FdLink::from(link)
                        .try_into()
                        .map_err(|e| DataplaneError::Link {
                            what: "the pinned link",
                            source: Box::new(e),
                        })?;
                let prog = self.balancer_mut()?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(super::object::program_error(lb_common::programs::BALANCER))?;
                // Only an fd of the pinned link: dropping it leaves the link attached.
                drop(
                    prog.take_link(id)
                        .map_err(super::object::program_error(lb_common::programs::BALANCER))?,
                );
                meta::write(p.dir.path(), &p.meta).map_err(pin_err)?;
                log::info!(
                    "took over the data path on {} ({}): program swapped in {:.1} ms",
                    p.iface,
                    p.dir.path().display(),
                    swap_started.elapsed().as_secs_f64() * 1e3
                );
            }
            None => {
                let (got, link) = attach::attach_link(self.balancer_mut()?, &p.iface, mode)?;
                self.mode = Some(got);
                p.meta.set_mode(got);
                meta::write(p.dir.path(), &p.meta).map_err(pin_err)?;
                // The link pin is the last thing written: its presence means "this data path
                // exists"; dropping the PinnedLink closes only our fd.
                link.pin(p.dir.link_path())
                    .map_err(|e| DataplaneError::Link {
                        what: "pinning the link",
                        source: Box::new(e),
                    })?;
            }
        }
        // The old program may still be running on another CPU for a moment: what it reads is
        // changed only after the grace.
        if !p.pending.is_empty() || self.deny_tidy.is_some() {
            std::thread::sleep(SWAP_GRACE);
        }
        if !p.pending.is_empty() {
            self.finish_copies(p)?;
            // Until the swap the old program ran on maps of its own layout (a staged `BACKENDS`
            // or `VIPS` among them) and stamped flows with the generation this agent had bumped
            // after writing the new ones: what it checked there is not what the new maps say.
            // Every flow is checked once more, under this program (one recheck per flow).
            self.bump_policy()?;
        }
        // Only this program reads the deny list's hash: the host entries an older build had
        // kept in the trie leave it now.
        let moved = self.tidy_deny_list()?;
        if moved > 0 {
            log::info!("deny list: {moved} host entries moved from the trie to the hash");
        }
        for f in plan::obsolete(&p.plans, &p.found) {
            match fs::remove_file(&f.path) {
                Ok(()) => log::info!("removed {} (not used by this build)", f.path.display()),
                Err(e) => log::warn!("removing {}: {e}", f.path.display()),
            }
        }
        Ok(())
    }

    /// After the swap: what the old program wrote since the copy (flows it created, counts it
    /// added), then the staged maps take the place of the old ones.
    fn finish_copies(&mut self, p: &mut Pinned) -> Result<(), DataplaneError> {
        let nr_cpus = super::possible_cpus()?;
        for pending in std::mem::take(&mut p.pending) {
            if is_flow_table(pending.name) {
                let count = self.copy_flows(pending.name, &pending.from, migrate::BPF_NOEXIST)?;
                log::info!(
                    "{}: {} more flows copied after the swap ({} left out)",
                    pending.name,
                    count.copied,
                    count.left_out
                );
                continue;
            }
            if pending.new_shape.map_type == migrate::BPF_MAP_TYPE_RINGBUF {
                continue;
            }
            let old =
                MapData::from_pin(&pending.from.path).map_err(super::map_err(pending.name))?;
            let after = migrate::read_entries(old.fd().as_fd(), &pending.from.shape, nr_cpus)
                .map_err(io_err(format!("reading {}", pending.from.path.display())))?;
            if is_counter(pending.name) {
                let fd = pins::obj_get(&pending.pin).map_err(pin_err)?;
                let added = migrate::add_growth(
                    fd.as_fd(),
                    &pending.new_shape,
                    nr_cpus,
                    &pending.before,
                    &after,
                )
                .map_err(io_err(format!("updating {}", pending.name)))?;
                log::info!("{}: {added} counts added after the swap", pending.name);
            }
        }
        if self.lb_config.flags & CONFIG_F_MIGRATING != 0 {
            self.set_config_flag(CONFIG_F_MIGRATING, false)?;
        }
        for plan in &p.plans {
            if plan.pin.starts_with(p.dir.staging()) {
                let target = p
                    .dir
                    .path()
                    .join(plan.pin.file_name().expect("a pin has a name"));
                fs::rename(&plan.pin, &target)
                    .map_err(io_err(format!("publishing {}", plan.pin.display())))?;
            }
        }
        pins::remove_tree(&p.dir.staging()).map_err(pin_err)
    }

    /// Remove the data path for good: the program leaves the interface, every pin goes, and the
    /// host is put back as it was (see `remove_data_path`).
    pub fn detach(&mut self) -> Result<String, DataplaneError> {
        let Some(p) = self.pinned.take() else {
            return Ok("nothing pinned".into());
        };
        remove_data_path(&p.dir)
    }

    /// Where the data path is pinned, when it is.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pinned.as_ref().map(Pinned::dir)
    }
}

/// The counter maps: after a copy, what the old program counted meanwhile is added.
fn is_counter(name: &str) -> bool {
    matches!(
        name,
        maps::VIP_STATS
            | maps::BACKEND_STATS
            | maps::REASON_STATS
            | maps::EVENT_STATS
            | maps::RR_COUNTERS
            | maps::VIP_DROPS
    )
}

/// The tables of flows (values `FlowValue`), copied by decoding each flow and installing it by
/// backend address.
fn is_flow_table(name: &str) -> bool {
    matches!(name, maps::FLOWS | maps::EMBRYOS)
}

/// Copy a map of the same layout into the new, bigger or smaller one; the old entries as read.
fn copy_same_layout(
    plan: &MapPlan,
    from: &plan::Source,
    nr_cpus: usize,
) -> Result<(Entries, CopyCount), DataplaneError> {
    if plan.shape.map_type == migrate::BPF_MAP_TYPE_RINGBUF {
        // Records are not entries: the new ring starts empty.
        return Ok((Entries::new(), CopyCount::default()));
    }
    let old = MapData::from_pin(&from.path).map_err(super::map_err(plan.name))?;
    let entries = migrate::read_entries(old.fd().as_fd(), &from.shape, nr_cpus)
        .map_err(io_err(format!("reading {}", from.path.display())))?;
    // Another layout version (`plan::can_migrate` allowed it): each entry converted.
    let converted = if from.version == plan.version {
        None
    } else {
        Some(
            migrate::upgrade_entries(plan.name, from.version, plan.version, entries.clone())
                .ok_or_else(|| DataplaneError::Io {
                    what: format!(
                        "converting {} from layout v{} to v{}",
                        plan.name, from.version, plan.version
                    ),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                })?,
        )
    };
    // The new map, through its pin in staging/.
    let new = pins::obj_get(&plan.pin).map_err(pin_err)?;
    let count = migrate::write_entries(
        new.as_fd(),
        &plan.shape,
        converted.as_ref().unwrap_or(&entries),
    )
    .map_err(io_err(format!("writing {}", plan.name)))?;
    Ok((entries, count))
}

fn describe(p: &MapPlan, from: &plan::Source, count: CopyCount) -> String {
    let what = if from.version == p.version {
        format!(
            "capacity {} → {}",
            from.shape.max_entries, p.shape.max_entries
        )
    } else {
        format!("layout v{} → v{}", from.version, p.version)
    };
    format!(
        "{}: {what}: {} entries copied, {} left out",
        p.name, count.copied, count.left_out
    )
}

/// `bpf_fib_lookup` refuses to route for an interface with forwarding off
/// (BPF_FIB_LKUP_RET_FWD_DISABLED), and the kernel must forward the packets the balancer hands it
/// for neighbour resolution, so the LB's interface needs IPv4 forwarding, and IPv6 forwarding for
/// IPv6 (with `force_forwarding`, kernels ≥ 6.17, so the kernel forwards the interface's IPv6
/// packets whatever `all.forwarding` says). The values found first are recorded (once, by the
/// first attach) so that removing the data path restores them. An interface without IPv6 gets
/// IPv4 alone. Note: IPv6 forwarding stops the interface from taking router advertisements
/// unless its `accept_ra` is 2.
fn ensure_forwarding(iface: &str, meta: &mut PinMeta) -> Result<(), DataplaneError> {
    let first = meta.forwarding_before().is_none();
    let on = switch_on(&forwarding_path(iface), "IPv4 forwarding", iface)?;
    if first {
        meta.set_forwarding_before(on);
    }
    let v6 = forwarding6_paths(iface);
    if fs::metadata(&v6[0]).is_err() {
        return Ok(());
    }
    let forwarding = switch_on(&v6[0], "IPv6 forwarding", iface)?;
    let force = fs::metadata(&v6[1]).is_ok() && switch_on(&v6[1], "IPv6 force_forwarding", iface)?;
    if first || meta.forwarding6_before().is_none() {
        meta.set_forwarding6_before(forwarding, force);
    }
    Ok(())
}

/// Write 1 to the sysctl at `path` unless it is 1; whether it was.
fn switch_on(path: &str, what: &str, iface: &str) -> Result<bool, DataplaneError> {
    let current = fs::read_to_string(path).map_err(io_err(format!("reading {path}")))?;
    let on = current.trim() == "1";
    if !on {
        log::info!("enabling {what} on {iface} (needed by bpf_fib_lookup)");
        fs::write(path, "1").map_err(io_err(format!("writing {path}")))?;
    }
    Ok(on)
}

fn forwarding_path(iface: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{iface}/forwarding")
}

/// IPv6's `forwarding` and `force_forwarding` of `iface`.
fn forwarding6_paths(iface: &str) -> [String; 2] {
    [
        format!("/proc/sys/net/ipv6/conf/{iface}/forwarding"),
        format!("/proc/sys/net/ipv6/conf/{iface}/force_forwarding"),
    ]
}

/// The name of interface `ifindex` in this network namespace.
fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Remove the data path pinned at `dir` (locked by the caller): `BPF_LINK_DETACH` (the program
/// leaves the interface at once, whoever holds the link), every pin and the directory (the maps
/// go with their last reference), and the interface's IPv4 forwarding put back as it was before
/// the first attach, when that was recorded and the interface is in this network namespace.
/// What was done, in one line.
pub fn remove_data_path(dir: &PinDir) -> Result<String, DataplaneError> {
    let record = meta::read(dir.path());
    let link = dir.link_path();
    let detached = match dir.link().map_err(pin_err)? {
        Some(info) => {
            pins::detach_link(&link).map_err(pin_err)?;
            !info.defunct()
        }
        None => false,
    };
    let ours = dir
        .path()
        .file_name()
        .and_then(|n| pins::parse_dir_name(&n.to_string_lossy()))
        .is_some_and(|(cookie, _)| pins::netns_cookie().ok() == Some(cookie));
    let iface = record
        .as_ref()
        .filter(|_| ours)
        .and_then(|m| interface_name(m.ifindex()));
    let mut restored = String::new();
    if let (Some(iface), Some(false)) =
        (&iface, record.as_ref().and_then(PinMeta::forwarding_before))
    {
        let path = forwarding_path(iface);
        match fs::write(&path, "0") {
            Ok(()) => {
                restored =
                    format!("; IPv4 forwarding on {iface} turned off again, as it was before")
            }
            Err(e) => log::warn!("restoring {path}: {e}"),
        }
    }
    if let (Some(iface), Some((forwarding, force))) = (
        &iface,
        record.as_ref().and_then(PinMeta::forwarding6_before),
    ) {
        let paths = forwarding6_paths(iface);
        for (path, before) in paths.iter().zip([forwarding, force]) {
            if !before && let Err(e) = fs::write(path, "0") {
                log::warn!("restoring {path}: {e}");
            }
        }
        if !forwarding {
            restored.push_str(&format!("; IPv6 forwarding on {iface} turned off again"));
        }
    }
    dir.remove_all().map_err(pin_err)?;
    // The `xlb` directory too once it is empty (the last data path of this bpffs); another
    // data path's directory keeps it.
    if let Some(root) = dir.path().parent() {
        let _ = fs::remove_dir(root);
    }
    let name = iface
        .or_else(|| record.as_ref().map(PinMeta::ifname))
        .unwrap_or_else(|| "?".into());
    Ok(format!(
        "{} from {name}: removed {}{restored}",
        if detached {
            "detached the balancer"
        } else {
            "no program was attached"
        },
        dir.path().display()
    ))
}

/// A flow to install: its key, its backend's address (network order), when it was last seen
/// (`None`: now), its `FLOW_F_*` flags.
/// A flow to install by backend address.
pub(super) struct FlowInstall {
    pub(super) key: FlowKey,
    pub(super) backend_addr: Addr,
    /// `None`: now.
    pub(super) last_seen_ns: Option<u64>,
    /// `FLOW_F_*`.
    pub(super) flags: u32,
    /// The policy generation its source checks were made under (0: check again) and the VIP
    /// cached under it.
    pub(super) stamp: FlowStamp,
}

impl Dataplane {
    /// Install flows by backend address into this load's table `table` (`FLOWS`, or `EMBRYOS`
    /// in a migration; peer sync and migrations): a flow whose VIP or backend this data path
    /// does not have is skipped and counted.
    pub(super) fn install(
        &mut self,
        table_name: &'static str,
        flows: impl IntoIterator<Item = FlowInstall>,
        flags: u64,
    ) -> Result<super::InstallReport, DataplaneError> {
        let now = super::flows::monotonic_ns();
        let mut slots = std::collections::HashMap::new();
        for (key, vip) in &self.installed {
            let service = (Addr::from(key.addr), key.port.to_be(), key.proto.ip_proto());
            for (addr, id) in &vip.backends {
                slots.insert((service, Addr::from(*addr)), *id);
            }
        }
        let map = self
            .ebpf
            .map_mut(table_name)
            .ok_or(DataplaneError::MissingMap { name: table_name })?;
        let mut table: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(map).map_err(super::map_err(table_name))?;
        let mut report = super::InstallReport::default();
        for f in flows {
            let FlowInstall {
                key: flow,
                backend_addr,
                ..
            } = f;
            let vip = (flow.dst_addr, flow.dst_port, flow.proto);
            let Some(id) = slots.get(&(vip, backend_addr)) else {
                report.unknown_backend += 1;
                continue;
            };
            let value = FlowValue::new(backend_addr, *id, f.last_seen_ns.unwrap_or(now), f.flags)
                .stamped(f.stamp);
            match table.insert(flow, value, flags) {
                Ok(()) => report.installed += 1,
                Err(aya::maps::MapError::SyscallError(e))
                    if flags == migrate::BPF_NOEXIST
                        && e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(super::map_err(table_name)(e)),
            }
        }
        Ok(report)
    }
}
