//! The door in the maps: the global deny list (two LPM tries, `DENY0`/`DENY1`, one live), every
//! VIP's source allow and deny lists (`VIP_ALLOW`, `VIP_DENY`, each list under its VIP's tag and
//! one of two halves), the new-flow limits (`VIP_LIMITS`), and the policy generation in `POLICY`
//! that tells flows their cached source checks are outdated.
//!
//! The deny list is changed by another thread than the one that owns the `Dataplane` (a load of
//! a million prefixes takes seconds): it works on `DenyMaps`, handles of its own to the two
//! tries, and only the switch (`set_deny_list`, one `POLICY` update) goes through here.

use super::{Dataplane, DataplaneError, InstalledVip, batch, map_err};
use crate::model::{net::Ipv4Net, policy::SourcePolicy};
use aya::maps::{
    IterableMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use lb_common::{
    DenyData, MAX_DENY_PREFIXES, MAX_VIP_PREFIXES, POLICY_F_DENY_LIST, PolicyState, VIP_F_ALLOW,
    VIP_F_DENY, VIP_F_LIST_HALF, VIP_F_SRC_LIMIT, VIP_F_VIP_LIMIT, VipDrops, VipLimits, VipSrcData,
    maps, vip_list_tag, vip_src_data,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::AsFd,
};

/// Entries per batch system call when a trie is filled or cleared.
const CHUNK: usize = 65_536;

type DenyTrie = LpmTrie<MapData, DenyData, u8>;
pub(super) type VipTrie = LpmTrie<MapData, VipSrcData, u8>;

/// The LPM key of a deny-list prefix.
fn deny_key(net: &Ipv4Net) -> Key<DenyData> {
    Key::new(u32::from(net.prefix_len()), net.addr().octets())
}

/// The prefix of a deny-list key (`None`: not one this agent could have written).
fn deny_net(key: &Key<DenyData>) -> Option<Ipv4Net> {
    Ipv4Net::new(
        Ipv4Addr::from(key.data()),
        u8::try_from(key.prefix_len()).ok()?,
    )
}

/// The list tag and the prefix of a source-list key.
fn vip_net(key: &Key<VipSrcData>) -> Option<(u32, Ipv4Net)> {
    let data = key.data();
    let tag = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let len = u8::try_from(key.prefix_len().checked_sub(32)?).ok()?;
    let net = Ipv4Net::new(Ipv4Addr::new(data[4], data[5], data[6], data[7]), len)?;
    Some((tag, net))
}

fn corrupt(name: &'static str) -> DataplaneError {
    DataplaneError::Io {
        what: format!("reading map {name}: a key this agent never writes"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    }
}

/// The LPM key of a source prefix in the list half tagged `tag`.
fn vip_key(tag: u32, net: &Ipv4Net) -> Key<VipSrcData> {
    Key::new(
        32 + u32::from(net.prefix_len()),
        vip_src_data(tag, net.addr().octets()),
    )
}

/// The keys of `policy`'s allow and deny lists in half `half` of VIP `vip_id`'s.
fn list_keys(
    vip_id: u32,
    half: u32,
    policy: &SourcePolicy,
) -> (Vec<Key<VipSrcData>>, Vec<Key<VipSrcData>>) {
    let tag = vip_list_tag(vip_id, half);
    let keys = |list: &[Ipv4Net]| list.iter().map(|n| vip_key(tag, n)).collect();
    (keys(&policy.allow_src), keys(&policy.deny_src))
}

/// Write `keys` into `trie` (a batch per `CHUNK`, or one by one where the kernel has no batch
/// update for LPM tries).
fn insert_all<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, u8>,
    keys: &[Key<K>],
    name: &'static str,
) -> Result<(), DataplaneError> {
    let values = vec![0u8; keys.len().min(CHUNK)];
    let fd = trie
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| io(name, e))?;
    for chunk in keys.chunks(CHUNK) {
        match batch::update(fd.as_fd(), chunk, &values[..chunk.len()]) {
            Ok(()) => {}
            Err(e) if batch::unsupported(&e) => {
                for k in chunk {
                    trie.insert(k, 0, 0).map_err(map_err(name))?;
                }
            }
            Err(e) => return Err(io(name, e)),
        }
    }
    Ok(())
}

/// Delete `keys` from `trie`; keys that are not there are skipped.
fn remove_all<K: aya::Pod>(
    trie: &LpmTrie<MapData, K, u8>,
    keys: &[Key<K>],
    name: &'static str,
) -> Result<(), DataplaneError> {
    batch::delete_all(trie.map().fd().as_fd(), keys, CHUNK)
        .map(|_| ())
        .map_err(|e| io(name, e))
}

fn io(name: &'static str, source: std::io::Error) -> DataplaneError {
    DataplaneError::Io {
        what: format!("updating map {name}"),
        source,
    }
}

/// Handles of their own to the two halves of the global deny list, for the thread that changes
/// it. Which half is live is the `Dataplane`'s to say (`set_deny_list`); these only write.
pub struct DenyMaps {
    tries: [DenyTrie; 2],
}

impl DenyMaps {
    /// Write `prefixes` into half `half`.
    pub fn fill(&mut self, half: u32, prefixes: &[Ipv4Net]) -> Result<(), DataplaneError> {
        let keys: Vec<_> = prefixes.iter().map(deny_key).collect();
        insert_all(
            &mut self.tries[half as usize & 1],
            &keys,
            maps::DENY[half as usize & 1],
        )
    }

    /// The file descriptor of half `half` (its fdinfo tells the kernel's memory figure).
    pub fn fd(&self, half: u32) -> std::os::fd::BorrowedFd<'_> {
        self.tries[half as usize & 1].map().fd().as_fd()
    }

    /// The prefixes in half `half`, read back from the trie (one `BPF_MAP_GET_NEXT_KEY` each).
    pub fn read(&self, half: u32) -> Result<BTreeSet<Ipv4Net>, DataplaneError> {
        let name = maps::DENY[half as usize & 1];
        let mut nets = BTreeSet::new();
        for key in self.tries[half as usize & 1].keys() {
            let key = key.map_err(map_err(name))?;
            nets.insert(deny_net(&key).ok_or_else(|| corrupt(name))?);
        }
        Ok(nets)
    }

    /// Delete `prefixes` from half `half` (those not there are skipped).
    pub fn clear(&mut self, half: u32, prefixes: &[Ipv4Net]) -> Result<(), DataplaneError> {
        let keys: Vec<_> = prefixes.iter().map(deny_key).collect();
        remove_all(
            &self.tries[half as usize & 1],
            &keys,
            maps::DENY[half as usize & 1],
        )
    }
}

/// Per-VIP drops by the source checks and limits, summed over CPUs (`xlb stats`: `drops`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipDropCounts {
    pub deny_list: u64,
    pub src_denied: u64,
    pub src_not_allowed: u64,
    pub rate_limited_src: u64,
    pub rate_limited_vip: u64,
}

impl VipDropCounts {
    /// (reason name, packets), in `lb_common::reason::NAMES` spelling.
    pub fn by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("drop_deny_list", self.deny_list),
            ("drop_src_denied", self.src_denied),
            ("drop_src_not_allowed", self.src_not_allowed),
            ("drop_rate_limited_src", self.rate_limited_src),
            ("drop_rate_limited_vip", self.rate_limited_vip),
        ]
    }
}

/// What a VIP's source lists and limits need of the maps: its flags (without the list half),
/// and its `VIP_LIMITS` entry.
pub(super) fn vip_flags(policy: &SourcePolicy) -> (u32, VipLimits) {
    let mut flags = 0;
    let mut limits = VipLimits::default();
    if !policy.allow_src.is_empty() {
        flags |= VIP_F_ALLOW;
    }
    if !policy.deny_src.is_empty() {
        flags |= VIP_F_DENY;
    }
    if let Some(l) = policy.src_limit {
        flags |= VIP_F_SRC_LIMIT;
        (limits.src_interval_ns, limits.src_tolerance_ns) = l.gcra_ns();
    }
    if let Some(l) = policy.vip_limit {
        flags |= VIP_F_VIP_LIMIT;
        (limits.vip_interval_ns, limits.vip_tolerance_ns) = l.gcra_ns();
    }
    (flags, limits)
}

/// The list flag of half `half`.
pub(super) fn half_flag(half: u32) -> u32 {
    if half & 1 == 1 { VIP_F_LIST_HALF } else { 0 }
}

impl Dataplane {
    /// Handles of their own to the deny list's two halves (for the thread that changes it).
    pub fn deny_maps(&self) -> Result<DenyMaps, DataplaneError> {
        let trie = |name: &'static str| -> Result<DenyTrie, DataplaneError> {
            LpmTrie::try_from(self.reopen(name)?).map_err(map_err(name))
        };
        Ok(DenyMaps {
            tries: [trie(maps::DENY[0])?, trie(maps::DENY[1])?],
        })
    }

    /// Make half `live` of the deny list the live one, holding `prefixes` prefixes (0: the data
    /// path skips the lookup), and bump the policy generation, in one update of `POLICY`: a
    /// packet sees the old list or the new one, and every flow is checked again against it.
    pub fn set_deny_list(&mut self, live: u32, prefixes: usize) -> Result<(), DataplaneError> {
        let flags = if prefixes > 0 {
            self.policy_state.flags | POLICY_F_DENY_LIST
        } else {
            self.policy_state.flags & !POLICY_F_DENY_LIST
        };
        self.write_policy(PolicyState {
            flags,
            deny_live: live & 1,
            generation: next_generation(self.policy_state.generation),
            ..self.policy_state
        })
    }

    /// The live half of the deny list.
    pub fn deny_live(&self) -> u32 {
        self.policy_state.deny_live
    }

    /// The current policy generation (a flow checked under another one is checked again).
    pub fn policy_generation(&self) -> u32 {
        self.policy_state.generation
    }

    /// Tell every flow its cached source checks are outdated (after a change of a VIP).
    pub(super) fn bump_policy(&mut self) -> Result<(), DataplaneError> {
        self.write_policy(PolicyState {
            generation: next_generation(self.policy_state.generation),
            ..self.policy_state
        })
    }

    fn write_policy(&mut self, state: PolicyState) -> Result<(), DataplaneError> {
        self.policy
            .set(0, state, 0)
            .map_err(map_err(maps::POLICY))?;
        self.policy_state = state;
        Ok(())
    }

    /// Whether the source lists of `policy` fit next to every installed VIP's (a change writes
    /// its new lists before the old ones are cleared, so both count).
    pub(super) fn check_source_lists(&self, policy: &SourcePolicy) -> Result<(), DataplaneError> {
        let used = |f: fn(&SourcePolicy) -> usize| -> usize {
            self.installed.values().map(|v| f(&v.policy)).sum()
        };
        for (what, used, new) in [
            ("allow", used(|p| p.allow_src.len()), policy.allow_src.len()),
            ("deny", used(|p| p.deny_src.len()), policy.deny_src.len()),
        ] {
            if used + new > MAX_VIP_PREFIXES as usize {
                return Err(DataplaneError::SourceListsFull {
                    what,
                    used,
                    new,
                    max: MAX_VIP_PREFIXES as usize,
                });
            }
        }
        Ok(())
    }

    /// Write `policy`'s source lists into half `half` of VIP `vip_id`'s (not live yet); on
    /// error, what was written is removed again.
    pub(super) fn write_source_lists(
        &mut self,
        vip_id: u32,
        half: u32,
        policy: &SourcePolicy,
    ) -> Result<(), DataplaneError> {
        let (allow, deny) = list_keys(vip_id, half, policy);
        insert_all(&mut self.vip_allow, &allow, maps::VIP_ALLOW)?;
        if let Err(e) = insert_all(&mut self.vip_deny, &deny, maps::VIP_DENY) {
            if let Err(re) = remove_all(&self.vip_allow, &allow, maps::VIP_ALLOW) {
                log::warn!("removing half-written source lists of VIP #{vip_id}: {re}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Remove `policy`'s source lists from half `half` of VIP `vip_id`'s.
    pub(super) fn clear_source_lists(
        &mut self,
        vip_id: u32,
        half: u32,
        policy: &SourcePolicy,
    ) -> Result<(), DataplaneError> {
        let (allow, deny) = list_keys(vip_id, half, policy);
        remove_all(&self.vip_allow, &allow, maps::VIP_ALLOW)?;
        remove_all(&self.vip_deny, &deny, maps::VIP_DENY)
    }

    /// The new-flow limits of VIP `vip_id`; a VIP limit that is new or changed starts with a
    /// full bucket.
    pub(super) fn write_limits(
        &mut self,
        vip_id: u32,
        limits: VipLimits,
        fresh_bucket: bool,
    ) -> Result<(), DataplaneError> {
        self.vip_limits
            .set(vip_id, limits, 0)
            .map_err(map_err(maps::VIP_LIMITS))?;
        if fresh_bucket {
            self.vip_buckets
                .set(vip_id, 0, 0)
                .map_err(map_err(maps::VIP_BUCKETS))?;
        }
        Ok(())
    }

    /// The source lists and limits of an installed VIP, after its switch: the lists of the half
    /// it left are cleared. A failure leaves entries in the half that is not live, which the
    /// next change of the VIP clears before it writes there (`InstalledVip::leftover`).
    pub(super) fn clear_old_lists(&mut self, vip: &mut InstalledVip, old: &SourcePolicy) {
        let half = vip.list_half ^ 1;
        if let Err(e) = self.clear_source_lists(vip.id, half, old) {
            log::warn!("clearing the old source lists of VIP #{}: {e}", vip.id);
            vip.leftover = Some(old.clone());
        }
    }

    /// Per-VIP drops of VIP `vip_id`, summed over CPUs.
    pub(super) fn vip_drops(&self, vip_id: u32) -> Result<VipDropCounts, DataplaneError> {
        let values = self
            .vip_drops
            .get(&vip_id, 0)
            .map_err(map_err(maps::VIP_DROPS))?;
        Ok(values
            .iter()
            .fold(VipDropCounts::default(), |a, d: &VipDrops| VipDropCounts {
                deny_list: a.deny_list + d.deny_list,
                src_denied: a.src_denied + d.src_denied,
                src_not_allowed: a.src_not_allowed + d.src_not_allowed,
                rate_limited_src: a.rate_limited_src + d.rate_limited_src,
                rate_limited_vip: a.rate_limited_vip + d.rate_limited_vip,
            }))
    }

    /// Fill the deny list's half 0 with `prefixes` and make it live: at load, before the
    /// balancer is attached.
    pub(super) fn install_deny_list(&mut self, prefixes: &[Ipv4Net]) -> Result<(), DataplaneError> {
        if prefixes.len() > MAX_DENY_PREFIXES as usize {
            return Err(DataplaneError::DenyListFull {
                n: prefixes.len(),
                max: MAX_DENY_PREFIXES as usize,
            });
        }
        self.deny_maps()?.fill(0, prefixes)?;
        self.set_deny_list(0, prefixes.len())
    }
}

/// What taking over the running data path's deny list changed in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyReconcile {
    pub added: usize,
    pub removed: usize,
    /// Prefixes a load that never switched had left in the other half (emptied).
    pub leftover: usize,
}

/// A VIP's source lists as read back from the tries, by list tag (`vip_list_tag`).
pub(super) type ListsByTag = BTreeMap<u32, SourcePolicy>;

impl Dataplane {
    /// Taking over a running data path: make its live deny list hold `prefixes` (the saved
    /// list) by difference, in place — prefixes added first, then the ones no longer listed
    /// removed, so the list is never empty meanwhile and what stays listed is never let in —
    /// and empty the other half of what a load that never switched left there.
    pub(super) fn reconcile_deny_list(
        &mut self,
        prefixes: &[Ipv4Net],
    ) -> Result<DenyReconcile, DataplaneError> {
        if prefixes.len() > MAX_DENY_PREFIXES as usize {
            return Err(DataplaneError::DenyListFull {
                n: prefixes.len(),
                max: MAX_DENY_PREFIXES as usize,
            });
        }
        let live = self.policy_state.deny_live & 1;
        let mut tries = self.deny_maps()?;
        let have = tries.read(live)?;
        let want: BTreeSet<Ipv4Net> = prefixes.iter().copied().collect();
        let add: Vec<Ipv4Net> = want.difference(&have).copied().collect();
        let remove: Vec<Ipv4Net> = have.difference(&want).copied().collect();
        tries.fill(live, &add)?;
        tries.clear(live, &remove)?;
        let other: Vec<Ipv4Net> = tries.read(live ^ 1)?.into_iter().collect();
        tries.clear(live ^ 1, &other)?;
        let flagged = self.policy_state.flags & POLICY_F_DENY_LIST != 0;
        if !add.is_empty() || !remove.is_empty() || flagged == want.is_empty() {
            self.set_deny_list(live, want.len())?;
        }
        Ok(DenyReconcile {
            added: add.len(),
            removed: remove.len(),
            leftover: other.len(),
        })
    }

    /// Every source list in `VIP_ALLOW` and `VIP_DENY`, by list tag (taking over: which VIP has
    /// which lists in which half).
    pub(super) fn read_source_lists(&self) -> Result<ListsByTag, DataplaneError> {
        let mut lists = ListsByTag::new();
        for (trie, name, allow) in [
            (&self.vip_allow, maps::VIP_ALLOW, true),
            (&self.vip_deny, maps::VIP_DENY, false),
        ] {
            for key in trie.keys() {
                let key = key.map_err(map_err(name))?;
                let (tag, net) = vip_net(&key).ok_or_else(|| corrupt(name))?;
                let policy = lists.entry(tag).or_default();
                if allow {
                    policy.allow_src.push(net);
                } else {
                    policy.deny_src.push(net);
                }
            }
        }
        Ok(lists)
    }

    /// Remove source lists no VIP accounts for (an agent that died between writing a VIP's
    /// lists and switching to them, or after removing the VIP).
    pub(super) fn clear_lists_by_tag(&mut self, orphans: &ListsByTag) {
        for (tag, policy) in orphans {
            if let Err(e) = self.clear_source_lists(tag >> 1, tag & 1, policy) {
                log::warn!("clearing source lists no VIP uses (tag {tag}): {e}");
            }
        }
    }

    /// The limits a VIP's `VIP_LIMITS` entry holds now (read back when taking over, and to tell
    /// whether a change of a VIP's limit needs a fresh bucket).
    pub(super) fn installed_limits(&self, vip_id: u32) -> Result<VipLimits, DataplaneError> {
        self.vip_limits
            .get(&vip_id, 0)
            .map_err(map_err(maps::VIP_LIMITS))
    }
}

/// The generation after `g` (never 0, which marks a flow never checked).
fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::RateLimit;

    #[test]
    fn generations_skip_zero() {
        assert_eq!(next_generation(1), 2);
        assert_eq!(next_generation(u32::MAX), 1);
    }

    #[test]
    fn flags_follow_the_policy() {
        let none = vip_flags(&SourcePolicy::default());
        assert_eq!(none, (0, VipLimits::default()));
        let p = SourcePolicy {
            allow_src: vec!["10.0.0.0/8".parse().unwrap()],
            src_limit: Some(RateLimit {
                rate: 10,
                burst: 20,
            }),
            ..Default::default()
        };
        let (flags, limits) = vip_flags(&p);
        assert_eq!(flags, VIP_F_ALLOW | VIP_F_SRC_LIMIT);
        assert_eq!(limits.src_interval_ns, 100_000_000);
        assert_eq!(limits.src_tolerance_ns, 2_000_000_000);
        assert_eq!(half_flag(1), VIP_F_LIST_HALF);
        assert_eq!(half_flag(0), 0);
    }

    #[test]
    fn keys_read_back_as_they_were_written() {
        let net: Ipv4Net = "10.111.64.0/18".parse().unwrap();
        assert_eq!(deny_net(&deny_key(&net)), Some(net));
        let tag = vip_list_tag(300, 1);
        assert_eq!(vip_net(&vip_key(tag, &net)), Some((tag, net)));
        // A key no agent writes (host bits, a prefix shorter than the tag) is not guessed at.
        assert_eq!(deny_net(&Key::new(8, [10, 1, 0, 0])), None);
        assert_eq!(vip_net(&Key::new(16, [0; 8])), None);
    }

    #[test]
    fn keys_put_the_tag_before_the_address() {
        let k = vip_key(vip_list_tag(3, 1), &"192.0.2.0/24".parse().unwrap());
        // SAFETY: Key is repr(C, packed): 4 bytes of prefix length, then the data.
        let bytes: [u8; 12] = unsafe { std::mem::transmute(k) };
        assert_eq!(u32::from_ne_bytes(bytes[..4].try_into().unwrap()), 56);
        assert_eq!(&bytes[4..], &[0, 0, 0, 7, 192, 0, 2, 0]);
    }
}
