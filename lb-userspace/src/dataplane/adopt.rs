//! Taking over a running data path's maps: which VIP ids, backend slots and ring halves are in
//! use is read back from `VIPS`, `RINGS` and `BACKENDS`, so the agent continues exactly where the
//! last one stopped (a VIP keeps its id and counters, a backend its slot and its flows, the next
//! ring is written into the half that is not live), and the backends the data path had taken out
//! of service stay down until their checks say otherwise. A VIP's source lists are read back from
//! `VIP_ALLOW`/`VIP_DENY` (the half its `VIPS` entry names live, the other one's entries as
//! leftovers to clear before that half is written) and its limits from `VIP_LIMITS`, so the
//! reconcile that follows rewrites only what differs from the saved state.

use super::{Dataplane, DataplaneError, InstalledVip, map_err};
use crate::model::{
    Proto, ServiceKey,
    policy::{RateLimit, SourcePolicy},
};
use lb_common::{BACKEND_F_ACTIVE, Backend, MAX_BACKENDS, MAX_VIPS, RING_SLOTS, maps, ring_index};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

/// A backend the running data path had taken out of service (its slot inactive): down.
pub type DownBackend = (ServiceKey, IpAddr);

fn service_key(key: &lb_common::VipKey) -> Option<ServiceKey> {
    service(
        IpAddr::V4(Ipv4Addr::from(key.addr.to_ne_bytes())),
        key.port,
        key.proto,
    )
}

fn service_key6(key: &lb_common::VipKey6) -> Option<ServiceKey> {
    service(IpAddr::from(key.addr), key.port, key.proto)
}

/// The service at `addr`, port `port` (network order), protocol `proto`, if xlb serves it.
fn service(addr: IpAddr, port: u16, proto: u8) -> Option<ServiceKey> {
    let proto = match proto {
        lb_common::IPPROTO_TCP => Proto::Tcp,
        lb_common::IPPROTO_UDP => Proto::Udp,
        _ => return None,
    };
    Some(ServiceKey {
        addr,
        port: u16::from_be(port),
        proto,
    })
}

/// Which slot a VIP's backend at one address has: the one its live ring names, if several slots
/// claim that address (an agent that died between preparing and switching a VIP).
fn pick_slots(
    claims: Vec<(u32, Backend)>,
    in_ring: &BTreeSet<u32>,
) -> (Vec<(IpAddr, u32, u32)>, Vec<u32>) {
    let mut by_addr: BTreeMap<[u8; 16], (u32, Backend)> = BTreeMap::new();
    let mut orphans = Vec::new();
    for (slot, b) in claims {
        match by_addr.get(&b.addr.octets()) {
            Some((kept, _)) if in_ring.contains(kept) || !in_ring.contains(&slot) => {
                orphans.push(slot)
            }
            Some((kept, _)) => {
                orphans.push(*kept);
                by_addr.insert(b.addr.octets(), (slot, b));
            }
            None => {
                by_addr.insert(b.addr.octets(), (slot, b));
            }
        }
    }
    let kept = by_addr
        .into_values()
        .map(|(slot, b)| (IpAddr::from(b.addr), slot, b.flags))
        .collect();
    (kept, orphans)
}

impl Dataplane {
    /// Rebuild the bookkeeping of VIPs and slots from the maps of the data path being adopted.
    /// Slots no VIP accounts for (an agent that died in the middle of a change) are cleared, and
    /// the policy generation bumped after them (established packets trust a slot only under the
    /// generation it was checked with). Returns the backends whose slots were inactive: they were
    /// down.
    pub(super) fn rebuild_from_maps(&mut self) -> Result<BTreeSet<DownBackend>, DataplaneError> {
        let mut vips = Vec::new();
        for item in self.vips_map.iter() {
            let (key, meta) = item.map_err(map_err(maps::VIPS))?;
            vips.push((service_key(&key), key.proto, meta));
        }
        for item in self.vips6.iter() {
            let (key, meta) = item.map_err(map_err(maps::VIPS6))?;
            vips.push((service_key6(&key), key.proto, meta));
        }
        let mut claims: BTreeMap<u32, Vec<(u32, Backend)>> = BTreeMap::new();
        for slot in 0..MAX_BACKENDS {
            let b = self
                .backends_map
                .get(&slot, 0)
                .map_err(map_err(maps::BACKENDS))?;
            if !b.addr.is_unspecified() {
                claims.entry(b.vip_id).or_default().push((slot, b));
            }
        }
        let mut down = BTreeSet::new();
        let mut installed = BTreeMap::new();
        let mut cleared = false;
        let mut lists = self.read_source_lists()?;
        for (service, proto, meta) in vips {
            let Some(service) = service else {
                log::warn!("the running data path has a VIP of protocol {proto}; ignored");
                continue;
            };
            let mut in_ring = BTreeSet::new();
            for slot in 0..meta.ring_len.min(RING_SLOTS) {
                let id = self
                    .rings
                    .get(&ring_index(meta.id, meta.ring_half, slot), 0)
                    .map_err(map_err(maps::RINGS))?;
                in_ring.insert(id);
            }
            let (kept, orphans) = pick_slots(claims.remove(&meta.id).unwrap_or_default(), &in_ring);
            for slot in orphans {
                self.backends_map
                    .set(slot, Backend::default(), 0)
                    .map_err(map_err(maps::BACKENDS))?;
                cleared = true;
            }
            for (addr, _, flags) in &kept {
                if flags & BACKEND_F_ACTIVE == 0 {
                    down.insert((service, *addr));
                }
            }
            // Per VIP, the maps only keep whether some VIP of the address answers echo; the
            // reconcile that follows re-applies every VIP with its own setting.
            let icmp_echo = self
                .vip_addr(service.addr)
                .is_some_and(|a| a.flags & lb_common::VIP_ADDR_F_ICMP_ECHO != 0);
            installed.insert(
                service,
                InstalledVip {
                    id: meta.id,
                    half: meta.ring_half,
                    backends: kept.into_iter().map(|(a, slot, _)| (a, slot)).collect(),
                    icmp_echo,
                    policy: self.read_back_policy(&meta, &mut lists)?,
                    list_half: u32::from(meta.flags & lb_common::VIP_F_LIST_HALF != 0),
                    leftover: lists.remove(&lb_common::vip_list_tag(
                        meta.id,
                        u32::from(meta.flags & lb_common::VIP_F_LIST_HALF == 0),
                    )),
                },
            );
        }
        // Lists of VIPs that no longer exist.
        self.clear_lists_by_tag(&lists);
        // Slots of VIPs that no longer exist.
        for slot in claims.into_values().flatten().map(|(slot, _)| slot) {
            self.backends_map
                .set(slot, Backend::default(), 0)
                .map_err(map_err(maps::BACKENDS))?;
            cleared = true;
        }
        if cleared {
            self.bump_policy()?;
        }
        let used_vips: BTreeSet<u32> = installed.values().map(|v: &InstalledVip| v.id).collect();
        let used_slots: BTreeSet<u32> = installed
            .values()
            .flat_map(|v| v.backends.iter().map(|(_, slot)| *slot))
            .collect();
        self.free_vip_ids = (0..MAX_VIPS).filter(|id| !used_vips.contains(id)).collect();
        self.free_backend_ids = (0..MAX_BACKENDS)
            .filter(|id| !used_slots.contains(id))
            .collect();
        self.installed = installed;
        Ok(down)
    }

    /// A running VIP's source lists (its live half's, taken out of `lists`) and limits.
    fn read_back_policy(
        &self,
        meta: &lb_common::VipMeta,
        lists: &mut super::firewall::ListsByTag,
    ) -> Result<SourcePolicy, DataplaneError> {
        let half = u32::from(meta.flags & lb_common::VIP_F_LIST_HALF != 0);
        let mut policy = lists
            .remove(&lb_common::vip_list_tag(meta.id, half))
            .unwrap_or_default();
        let limits = self.installed_limits(meta.id)?;
        let limit = |on: bool, interval: u64, tolerance: u64| {
            (on && interval > 0).then(|| RateLimit::from_gcra_ns(interval, tolerance))
        };
        policy.src_limit = limit(
            meta.flags & lb_common::VIP_F_SRC_LIMIT != 0,
            limits.src_interval_ns,
            limits.src_tolerance_ns,
        );
        policy.vip_limit = limit(
            meta.flags & lb_common::VIP_F_VIP_LIMIT != 0,
            limits.vip_interval_ns,
            limits.vip_tolerance_ns,
        );
        Ok(policy)
    }

    /// The VIPs installed in the data path (after an adoption: those the running one had).
    pub fn installed_vips(&self) -> Vec<ServiceKey> {
        self.installed.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::Addr;

    fn b(addr: u8, flags: u32) -> Backend {
        Backend {
            addr: Addr::from_v4(u32::from_ne_bytes([10, 111, 1, addr])),
            flags,
            vip_id: 0,
        }
    }

    #[test]
    fn duplicate_claims_keep_the_slot_the_ring_names() {
        let claims = vec![(3, b(11, 1)), (4, b(12, 0)), (9, b(11, 1))];
        let (kept, orphans) = pick_slots(claims.clone(), &BTreeSet::from([9, 4]));
        assert_eq!(
            kept,
            vec![
                (IpAddr::from([10, 111, 1, 11]), 9, 1),
                (IpAddr::from([10, 111, 1, 12]), 4, 0)
            ]
        );
        assert_eq!(orphans, vec![3]);
        // Neither in the ring (a drained or down backend): the first claim stays.
        let (kept, orphans) = pick_slots(claims, &BTreeSet::new());
        assert_eq!(kept[0].1, 3);
        assert_eq!(orphans, vec![9]);
    }

    #[test]
    fn vip_keys_read_back_as_services() {
        let key = lb_common::VipKey {
            addr: u32::from_ne_bytes([10, 111, 100, 1]),
            port: 80u16.to_be(),
            proto: lb_common::IPPROTO_UDP,
            _pad: 0,
        };
        let s = service_key(&key).unwrap();
        assert_eq!(
            (s.addr, s.port, s.proto),
            (IpAddr::from([10, 111, 100, 1]), 80, Proto::Udp)
        );
        assert!(service_key(&lb_common::VipKey { proto: 1, ..key }).is_none());
    }
}
