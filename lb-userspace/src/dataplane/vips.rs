//! VIPs in the maps: a VIP's entry, its backends' slots and its double-buffered ring. A change
//! writes the inactive half of the ring and new slots first, then switches with one update of
//! the VIP's entry, and only then clears what the old version used, so the data path sees the
//! old VIP or the new one, never a mix. Slot ids are this module's business: callers speak in
//! addresses.

use super::{
    Dataplane, DataplaneError, InstalledVip, KernelVipKey,
    firewall::{half_flag, vip_flags},
    ipv4_be, map_err, ring, vip_key,
};
use crate::model::{Forward, ServiceKey, VipSpec};
use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use lb_common::{
    Addr, BACKEND_F_ACTIVE, Backend, POLICY_F_DEBUG, PolicyState, TrafficCounters,
    VIP_ADDR_F_ICMP_ECHO, VIP_F_ONE_BACKEND, VipAddr, VipMeta, maps, ring_index,
};
use std::{collections::BTreeSet, net::IpAddr};

/// Where a new version of a VIP goes: its id, the ring half it writes, and its backends' slots.
struct Placement {
    vip_id: u32,
    half: u32,
    is_new: bool,
    /// (address, slot) of the old version.
    old: Vec<(IpAddr, u32)>,
    /// (address, slot) in spec order.
    slots: Vec<(IpAddr, u32)>,
    /// The slots in `slots` that were free before.
    fresh: Vec<u32>,
}

impl Dataplane {
    /// Check that `spec` fits (VIP slots, backend slots, ring size) without changing anything.
    pub fn check_vip(&self, spec: &VipSpec) -> Result<(), DataplaneError> {
        // Refused at once rather than dropped packet by packet (`drop_encap_failed`).
        if spec.forward == Forward::Ipip
            && !self.has_lb_addr6()
            && let Some(b) = spec.backends.iter().find(|b| b.addr.is_ipv6())
        {
            return Err(DataplaneError::NoLbAddr6(b.addr));
        }
        let existing = self.installed.get(&spec.key);
        if existing.is_none() && self.free_vip_ids.is_empty() {
            return Err(DataplaneError::NoVipSlot);
        }
        let needed = spec
            .backends
            .iter()
            .filter(|b| {
                !existing.is_some_and(|vip| vip.backends.iter().any(|(addr, _)| *addr == b.addr))
            })
            .count();
        // Slots of backends this spec drops are freed only after the swap, so they do not count.
        if needed > self.free_backend_ids.len() {
            return Err(DataplaneError::NoBackendSlots {
                needed,
                free: self.free_backend_ids.len(),
            });
        }
        let weights: Vec<u32> = spec.backends.iter().map(|b| b.weight).collect();
        ring::build(&weights)?;
        if lists_changed(existing, spec) {
            self.check_source_lists(&spec.policy)?;
        }
        Ok(())
    }

    fn zero_counters(
        map: &mut PerCpuArray<MapData, TrafficCounters>,
        name: &'static str,
        index: u32,
        nr_cpus: usize,
    ) -> Result<(), DataplaneError> {
        let zeros = PerCpuValues::try_from(vec![TrafficCounters::default(); nr_cpus]).map_err(
            |source| DataplaneError::Io {
                what: format!("building zeroed counters for {name}"),
                source,
            },
        )?;
        map.set(index, zeros, 0).map_err(map_err(name))
    }

    /// Install or replace a VIP and its backends. Validates capacity first (`check_vip`): on error
    /// nothing has changed. The data path sees the old or the new VIP, never a mix: new backend
    /// slots and the inactive ring half are written first, then one update of the VIP's entry
    /// switches to them, and only then are dropped backends' slots cleared.
    ///
    /// `down` holds the backends (by address) that failed their health checks: they get no ring
    /// slot and lose `BACKEND_F_ACTIVE`, so their existing flows are re-steered to a healthy
    /// backend. A backend with weight 0 (draining) also gets no ring slot, but stays active, so
    /// its existing flows stay with it. No backend left → the VIP's packets are dropped
    /// (`drop_no_backend`).
    pub fn apply_vip(
        &mut self,
        spec: &VipSpec,
        down: &BTreeSet<IpAddr>,
    ) -> Result<(), DataplaneError> {
        self.check_vip(spec)?;
        let place = self.place(spec)?;
        let weights: Vec<u32> = spec
            .backends
            .iter()
            .map(|b| if down.contains(&b.addr) { 0 } else { b.weight })
            .collect();
        let ring = ring::build(&weights)?;
        // One backend slot active (up, draining or not): no peer's record can name another
        // that this node honours, so a flow it has not seen is steered at once. Not when that
        // backend is draining (an empty ring): the miss could not be steered, and a peer's
        // record of one of its flows can still come.
        let one_active = !ring.is_empty()
            && spec
                .backends
                .iter()
                .filter(|b| !down.contains(&b.addr))
                .count()
                == 1;
        let list_half = self.prepare_lists(spec, &place)?;
        let written = list_half
            != self
                .installed
                .get(&spec.key)
                .map_or(u32::MAX, |v| v.list_half);
        let visible = self
            .prepare(&place, &ring, down)
            .and_then(|()| self.prepare_limits(spec, &place))
            .and_then(|flags| {
                let meta = VipMeta {
                    id: place.vip_id,
                    ring_len: ring.len() as u32,
                    ring_half: place.half,
                    forward: spec.forward.code(),
                    flags: flags
                        | half_flag(list_half)
                        | if one_active { VIP_F_ONE_BACKEND } else { 0 },
                };
                self.switch(&spec.key, meta, spec.icmp_echo)
            });
        if let Err(e) = visible {
            if written {
                self.unwrite_lists(spec, place.vip_id, list_half);
            }
            return Err(e);
        }
        // The data path now uses the new ring half, slots and lists: record that before anything
        // else can fail, so the bookkeeping always matches the kernel (a retry then writes the
        // other half, never the live one).
        if place.is_new {
            self.free_vip_ids.remove(&place.vip_id);
        }
        for id in &place.fresh {
            self.free_backend_ids.remove(id);
        }
        let old = self.installed.insert(
            spec.key,
            InstalledVip {
                id: place.vip_id,
                half: place.half,
                backends: place.slots.clone(),
                icmp_echo: spec.icmp_echo,
                policy: spec.policy.clone(),
                list_half,
                leftover: None,
            },
        );
        if let Some(old) = old {
            if written {
                let mut vip = self.installed.remove(&spec.key).expect("just inserted");
                self.clear_old_lists(&mut vip, &old.policy);
                self.installed.insert(spec.key, vip);
            } else if let Some(vip) = self.installed.get_mut(&spec.key) {
                vip.leftover = old.leftover;
            }
        }
        let retired = self.retire_backends(&place, down);
        // Flows re-check their sources against the VIP as it is now, look it up again and check
        // their backend's slot again: an established packet trusts the VIP and the backend its
        // entry caches only under the generation they were checked with. After the VIP's entry
        // and every backend slot are written, never before (see `balancer::balance4` and
        // `balancer::established_entry`): a packet checking a slot between a bump and the slot's
        // change would stamp the old slot with the new generation, and its flow would keep a
        // down backend. Bumped even when retiring failed half-way, so that the slots changed
        // before the failure count.
        let bumped = self.bump_policy();
        retired?;
        bumped
    }

    /// After the switch: backends that are down lose `BACKEND_F_ACTIVE` (the new ring no longer
    /// names them), and backends that left have their slots cleared, so flows pinned to either
    /// are re-steered once the generation is bumped.
    fn retire_backends(
        &mut self,
        place: &Placement,
        down: &BTreeSet<IpAddr>,
    ) -> Result<(), DataplaneError> {
        for (addr, id) in place.slots.iter().filter(|(addr, _)| down.contains(addr)) {
            self.set_backend(*id, *addr, place.vip_id, 0)?;
        }
        for (addr, id) in &place.old {
            if !place.slots.iter().any(|(a, _)| a == addr) {
                self.release_backend(*id)?;
            }
        }
        Ok(())
    }

    /// The half of the VIP's source lists the new version uses: the live one if the lists are
    /// unchanged, else the other one, written now (after clearing what a failed clear left
    /// there). Nothing of it is visible before the switch.
    fn prepare_lists(&mut self, spec: &VipSpec, place: &Placement) -> Result<u32, DataplaneError> {
        let installed = self.installed.get(&spec.key);
        if !lists_changed(installed, spec) {
            return Ok(installed.map_or(0, |v| v.list_half));
        }
        let (half, leftover) = match installed {
            Some(v) => (v.list_half ^ 1, v.leftover.clone()),
            None => (0, None),
        };
        if let Some(left) = leftover {
            self.clear_source_lists(place.vip_id, half, &left)?;
            if let Some(v) = self.installed.get_mut(&spec.key) {
                v.leftover = None;
            }
        }
        self.write_source_lists(place.vip_id, half, &spec.policy)?;
        Ok(half)
    }

    /// Lists written for a change that then failed: removed again, or remembered as leftovers.
    fn unwrite_lists(&mut self, spec: &VipSpec, vip_id: u32, half: u32) {
        if let Err(e) = self.clear_source_lists(vip_id, half, &spec.policy) {
            log::error!(
                "removing the source lists of a failed change of VIP {}: {e}",
                spec.key
            );
            if let Some(v) = self.installed.get_mut(&spec.key) {
                v.leftover = Some(spec.policy.clone());
            }
        }
    }

    /// The VIP's new-flow limits in `VIP_LIMITS` (not used before the switch sets its flags);
    /// returns the VIP's flags without the list half.
    fn prepare_limits(&mut self, spec: &VipSpec, place: &Placement) -> Result<u32, DataplaneError> {
        let (flags, limits) = vip_flags(&spec.policy);
        // Compared as the data path has them (a VIP taken over has its limits read back from
        // there): an unchanged limit keeps its bucket, across restarts too.
        let fresh = place.is_new || {
            let old = self.installed_limits(place.vip_id)?;
            (old.vip_interval_ns, old.vip_tolerance_ns)
                != (limits.vip_interval_ns, limits.vip_tolerance_ns)
        };
        self.write_limits(place.vip_id, limits, fresh)?;
        Ok(flags)
    }

    /// The VIP's id and inactive ring half, and a slot per backend: an address keeps its slot
    /// (its flows stay put), new addresses take free ones.
    fn place(&self, spec: &VipSpec) -> Result<Placement, DataplaneError> {
        let installed = self.installed.get(&spec.key);
        let (vip_id, half) = match installed {
            Some(vip) => (vip.id, vip.half ^ 1),
            None => (
                *self.free_vip_ids.first().ok_or(DataplaneError::NoVipSlot)?,
                0,
            ),
        };
        let old = installed
            .map(|vip| vip.backends.clone())
            .unwrap_or_default();
        let mut slots = Vec::with_capacity(spec.backends.len());
        let mut fresh = Vec::new();
        let mut free = self.free_backend_ids.iter();
        for b in &spec.backends {
            match old.iter().find(|(addr, _)| *addr == b.addr) {
                Some((_, id)) => slots.push((b.addr, *id)),
                None => {
                    let id = *free
                        .next()
                        .ok_or(DataplaneError::NoBackendSlots { needed: 1, free: 0 })?;
                    slots.push((b.addr, id));
                    fresh.push(id);
                }
            }
        }
        Ok(Placement {
            vip_id,
            half,
            is_new: installed.is_none(),
            old,
            slots,
            fresh,
        })
    }

    /// Everything the switch will make visible: fresh slots' counters zeroed, backends that are
    /// up active (before the ring can name them; those that are down are deactivated only after
    /// the ring stops naming them), the inactive ring half, a new VIP's counters.
    fn prepare(
        &mut self,
        place: &Placement,
        ring: &[usize],
        down: &BTreeSet<IpAddr>,
    ) -> Result<(), DataplaneError> {
        for id in &place.fresh {
            Self::zero_counters(
                &mut self.backend_stats,
                maps::BACKEND_STATS,
                *id,
                self.nr_cpus,
            )?;
        }
        for (addr, id) in place.slots.iter().filter(|(addr, _)| !down.contains(addr)) {
            self.set_backend(*id, *addr, place.vip_id, BACKEND_F_ACTIVE)?;
        }
        for (slot, backend_index) in ring.iter().enumerate() {
            self.rings
                .set(
                    ring_index(place.vip_id, place.half, slot as u32),
                    place.slots[*backend_index].1,
                    0,
                )
                .map_err(map_err(maps::RINGS))?;
        }
        if place.is_new {
            Self::zero_counters(
                &mut self.vip_stats,
                maps::VIP_STATS,
                place.vip_id,
                self.nr_cpus,
            )?;
            self.rr_counters
                .set(place.vip_id, 0, 0)
                .map_err(map_err(maps::RR_COUNTERS))?;
        }
        Ok(())
    }

    /// The switch: one update of the VIP's entry, atomic for the data path. The address's
    /// `VIP_ADDRS` entry (a new VIP's address, or a changed `icmp_echo`) goes in before it, so
    /// that the switch is the last step that can fail while nothing is visible yet (until it, a
    /// new address's packets are dropped as an unknown port rather than passed, for a moment).
    fn switch(
        &mut self,
        key: &ServiceKey,
        meta: VipMeta,
        icmp_echo: bool,
    ) -> Result<(), DataplaneError> {
        let addr_entry = self.vip_addr_entry(key, Some(icmp_echo));
        let old_entry = self.vip_addr(key.addr);
        let previous_addr = if old_entry != Some(addr_entry) {
            self.set_vip_addr(key.addr, Some(addr_entry))?;
            Some(old_entry)
        } else {
            None
        };
        if let Err(e) = self.set_vip_entry(key, Some(meta)) {
            if let Some(old) = previous_addr {
                self.restore_vip_addr(key.addr, old);
            }
            return Err(e);
        }
        Ok(())
    }

    /// The `VIP_ADDRS` (`VIP_ADDRS6`) entry of `addr`, if any.
    pub(super) fn vip_addr(&self, addr: IpAddr) -> Option<VipAddr> {
        match addr {
            IpAddr::V4(v4) => self.vip_addrs.get(&ipv4_be(v4), 0).ok(),
            IpAddr::V6(v6) => self.vip_addrs6.get(&Addr::from(v6), 0).ok(),
        }
    }

    /// Write (`None`: remove) the entry of `addr` in the VIP address map of its family.
    fn set_vip_addr(&mut self, addr: IpAddr, entry: Option<VipAddr>) -> Result<(), DataplaneError> {
        match (addr, entry) {
            (IpAddr::V4(v4), Some(e)) => self.vip_addrs.insert(ipv4_be(v4), e, 0),
            (IpAddr::V4(v4), None) => self.vip_addrs.remove(&ipv4_be(v4)),
            (IpAddr::V6(v6), Some(e)) => self.vip_addrs6.insert(Addr::from(v6), e, 0),
            (IpAddr::V6(v6), None) => self.vip_addrs6.remove(&Addr::from(v6)),
        }
        .map_err(map_err(if addr.is_ipv4() {
            maps::VIP_ADDRS
        } else {
            maps::VIP_ADDRS6
        }))
    }

    /// Write (`None`: remove) `key`'s entry in the VIP map of its family.
    fn set_vip_entry(
        &mut self,
        key: &ServiceKey,
        meta: Option<VipMeta>,
    ) -> Result<(), DataplaneError> {
        match (vip_key(key), meta) {
            (KernelVipKey::V4(k), Some(m)) => self.vips_map.insert(k, m, 0),
            (KernelVipKey::V4(k), None) => self.vips_map.remove(&k),
            (KernelVipKey::V6(k), Some(m)) => self.vips6.insert(k, m, 0),
            (KernelVipKey::V6(k), None) => self.vips6.remove(&k),
        }
        .map_err(map_err(if key.addr.is_ipv4() {
            maps::VIPS
        } else {
            maps::VIPS6
        }))
    }

    /// The `VIP_ADDRS` entry of `key`'s address with `key`'s VIP installed with ICMP echo
    /// `with_echo` (`None`: removed) and the address's other VIPs as they are: how many VIPs it
    /// carries, and whether any of them answers echo.
    fn vip_addr_entry(&self, key: &ServiceKey, with_echo: Option<bool>) -> VipAddr {
        let others = self
            .installed
            .iter()
            .filter(|(k, _)| k.addr == key.addr && *k != key)
            .map(|(_, v)| v.icmp_echo);
        let (vips, echo) = others
            .chain(with_echo)
            .fold((0, false), |(n, any), echo| (n + 1, any || echo));
        VipAddr {
            vips,
            flags: if echo { VIP_ADDR_F_ICMP_ECHO } else { 0 },
        }
    }

    /// Put a VIP address's entry back after a failed switch (best effort: the failure being
    /// reported is the switch's).
    fn restore_vip_addr(&mut self, addr: IpAddr, old: Option<VipAddr>) {
        if let Err(e) = self.set_vip_addr(addr, old) {
            log::warn!("restoring the VIP address set after a failed update: {e}");
        }
    }

    fn set_backend(
        &mut self,
        id: u32,
        addr: IpAddr,
        vip_id: u32,
        flags: u32,
    ) -> Result<(), DataplaneError> {
        self.backends_map
            .set(
                id,
                Backend {
                    addr: Addr::from(addr),
                    flags,
                    vip_id,
                },
                0,
            )
            .map_err(map_err(maps::BACKENDS))
    }

    fn release_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.backends_map
            .set(id, Backend::default(), 0)
            .map_err(map_err(maps::BACKENDS))?;
        self.free_backend_ids.insert(id);
        Ok(())
    }

    /// Remove a VIP: its packets are dropped as unknown port from then on (or passed if no other
    /// VIP shares its address). Unknown key → error, nothing changed.
    pub fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        let vip = self
            .installed
            .get(key)
            .ok_or(DataplaneError::UnknownVip(*key))?;
        let (id, backends) = (vip.id, vip.backends.clone());
        self.set_vip_entry(key, None)?;
        // No flow of the VIP is served from its entry's cache any more: bumped at once, so a step
        // below that fails cannot leave established flows served from a VIP that is gone. The
        // slots released below need no bump of their own: only the VIP's flows name them, and
        // none can be stamped again once `VIPS` lacks the VIP (`select` reads the generation
        // first, then the VIP).
        self.bump_policy()?;
        match self.vip_addr_entry(key, None) {
            VipAddr { vips: 0, .. } => self.set_vip_addr(key.addr, None)?,
            rest => self.set_vip_addr(key.addr, Some(rest))?,
        }
        for (_, bid) in backends {
            self.release_backend(bid)?;
        }
        // VIP ids are reused: the next VIP on this id starts with debug events off.
        self.set_debug(id, false)?;
        let vip = self.installed.remove(key).expect("looked up above");
        // The id is reused only with empty source lists: one whose lists could not be cleared is
        // not.
        let mut cleared = self.clear_source_lists(vip.id, vip.list_half, &vip.policy);
        if let (Ok(()), Some(left)) = (&cleared, &vip.leftover) {
            cleared = self.clear_source_lists(vip.id, vip.list_half ^ 1, left);
        }
        match cleared {
            Ok(()) => {
                self.free_vip_ids.insert(id);
            }
            Err(e) => log::error!(
                "VIP id {id} kept out of use: clearing the source lists of {key} failed: {e}"
            ),
        }
        Ok(())
    }

    /// Switch the data path's debug events for one VIP on or off, at run time (not persisted).
    pub fn set_vip_debug(&mut self, key: &ServiceKey, on: bool) -> Result<(), DataplaneError> {
        let vip = self
            .installed
            .get(key)
            .ok_or(DataplaneError::UnknownVip(*key))?;
        self.set_debug(vip.id, on)
    }

    /// VIP `id`'s switch in `DEBUG_VIPS`, then `POLICY_F_DEBUG` ("some VIP has debug events
    /// on"), which the data path reads before any switch: set after a switch goes on, cleared
    /// after the last goes off, so a packet of a switched-on VIP never misses the bit.
    fn set_debug(&mut self, id: u32, on: bool) -> Result<(), DataplaneError> {
        self.debug_vips
            .set(id, u32::from(on), 0)
            .map_err(map_err(maps::DEBUG_VIPS))?;
        if on {
            self.debugged.insert(id);
        } else {
            self.debugged.remove(&id);
        }
        let flags = if self.debugged.is_empty() {
            self.policy_state.flags & !POLICY_F_DEBUG
        } else {
            self.policy_state.flags | POLICY_F_DEBUG
        };
        if flags == self.policy_state.flags {
            return Ok(());
        }
        self.write_policy(PolicyState {
            flags,
            ..self.policy_state
        })
    }
}

/// Whether `spec`'s source lists differ from the installed VIP's (a new VIP: always).
fn lists_changed(installed: Option<&InstalledVip>, spec: &VipSpec) -> bool {
    // As sets: lists read back from the tries (a VIP taken over) come in the tries' order.
    let set = |l: &[crate::model::net::IpNet]| l.iter().copied().collect::<BTreeSet<_>>();
    installed.is_none_or(|v| {
        set(&v.policy.allow_src) != set(&spec.policy.allow_src)
            || set(&v.policy.deny_src) != set(&spec.policy.deny_src)
    })
}
