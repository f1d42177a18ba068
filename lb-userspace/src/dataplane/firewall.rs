//! The door in the maps: the global deny list (two halves, one live, each a hash of its IPv4
//! host entries, `DENY_HOSTSn`, an LPM trie of its shorter IPv4 prefixes, `DENYn`, and an LPM
//! trie of its IPv6 prefixes, hosts included, `DENY6_n`), every VIP's source allow and deny
//! lists (`VIP_ALLOW`, `VIP_DENY`, and for IPv6 prefixes `VIP_ALLOW6`, `VIP_DENY6`, each list
//! under its VIP's tag and one of two halves), the new-flow limits (`VIP_LIMITS`), and the
//! policy generation in `POLICY` that tells flows their cached source checks are outdated.
//!
//! The deny list is changed by another thread than the one that owns the `Dataplane` (a load of
//! a million prefixes takes seconds): it works on `DenyMaps`, handles of its own to the two
//! halves, and only the switch (`set_deny_list`: a `POLICY` update, then a bump) goes through here.
//!
//! A /32 goes into the hash, anything shorter into the trie: on the data path a host entry
//! costs one exact-match lookup where a trie of a million prefixes costs some twenty dependent
//! cache misses, and the trie is skipped while it is empty (`POLICY_F_DENY_LIST`).
//!
//! In front of each hash sits a bitmap with one bit per /24 (`DENY_HOST_NETSn`, 2 MiB): the data
//! path reads the hash only for a source whose /24 holds a listed host. `DenyMaps` counts the
//! host entries per /24 of each half (rebuilt from the hashes whenever it is opened) and keeps
//! the bits in step: set before the /24's first host is inserted, cleared after its last one is
//! removed, so a packet never misses a listed host.

use super::{Dataplane, DataplaneError, InstalledVip, batch, map_err};
use crate::model::{
    net::{IpNet, Ipv4Net, Ipv6Net},
    policy::SourcePolicy,
};
use aya::maps::{
    Array, HashMap, IterableMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use lb_common::{
    DENY_HOST_NET_WORDS, Deny6Data, DenyData, DenyHostKey, MAX_DENY_PREFIXES, MAX_VIP_PREFIXES,
    POLICY_F_DENY_HOSTS, POLICY_F_DENY_LIST, POLICY_F_DENY6, PolicyState, VIP_F_ALLOW, VIP_F_DENY,
    VIP_F_LIST_HALF, VIP_F_SRC_LIMIT, VIP_F_VIP_LIMIT, VipDrops, VipLimits, VipSrc6Data,
    VipSrcData, deny_host_net_bit, maps, vip_list_tag, vip_src_data, vip_src6_data,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
};

/// Entries per batch system call when a trie is filled or cleared.
const CHUNK: usize = 65_536;

type DenyTrie = LpmTrie<MapData, DenyData, u8>;
type Deny6Trie = LpmTrie<MapData, Deny6Data, u8>;
type DenyHash = HashMap<MapData, DenyHostKey, u8>;
pub(super) type VipTrie = LpmTrie<MapData, VipSrcData, u8>;
pub(super) type VipTrie6 = LpmTrie<MapData, VipSrc6Data, u8>;

/// A prefix the deny list keeps in its hash rather than its trie.
fn is_host(net: &Ipv4Net) -> bool {
    net.prefix_len() == 32
}

/// The hash key of a host entry: the address, network order.
fn host_key(net: &Ipv4Net) -> DenyHostKey {
    u32::from_ne_bytes(net.addr().octets())
}

/// How many entries a deny list has in each structure of its half: IPv4 host entries in the
/// hash, shorter IPv4 prefixes in the trie, IPv6 prefixes in the IPv6 trie. The data path looks
/// only into the structures that have some.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyCount {
    pub hosts: usize,
    pub nets: usize,
    pub nets6: usize,
}

impl DenyCount {
    /// The count of a list of distinct prefixes (`Ipv4Net` or `IpNet`).
    pub fn of<'a, N: Copy + Into<IpNet> + 'a>(prefixes: impl IntoIterator<Item = &'a N>) -> Self {
        prefixes
            .into_iter()
            .fold(DenyCount::default(), |c, n| match (*n).into() {
                IpNet::V4(n) if is_host(&n) => DenyCount {
                    hosts: c.hosts + 1,
                    ..c
                },
                IpNet::V4(_) => DenyCount {
                    nets: c.nets + 1,
                    ..c
                },
                IpNet::V6(_) => DenyCount {
                    nets6: c.nets6 + 1,
                    ..c
                },
            })
    }

    pub fn total(&self) -> usize {
        self.hosts + self.nets + self.nets6
    }

    /// The `POLICY_F_*` bits of a live half with these counts.
    fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.hosts > 0 {
            flags |= POLICY_F_DENY_HOSTS;
        }
        if self.nets > 0 {
            flags |= POLICY_F_DENY_LIST;
        }
        if self.nets6 > 0 {
            flags |= POLICY_F_DENY6;
        }
        flags
    }
}

/// Host entries a taken-over deny list still had in its live trie (written by a build without
/// the hash): kept there while the old program, which reads only the trie, runs; removed once
/// this build's program does (`Dataplane::tidy_deny_list`).
pub(super) struct DenyTidy {
    hosts: Vec<IpNet>,
    /// Prefixes the trie holds once they are gone.
    nets: usize,
}

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

/// The LPM key of an IPv6 deny-list prefix: the address in network order, as the data path
/// reads a packet's source.
fn deny6_key(net: &Ipv6Net) -> Key<Deny6Data> {
    Key::new(u32::from(net.prefix_len()), net.addr().octets())
}

/// The prefix of an IPv6 deny-list key (`None`: not one this agent could have written).
fn deny6_net(key: &Key<Deny6Data>) -> Option<Ipv6Net> {
    Ipv6Net::new(
        Ipv6Addr::from(key.data()),
        u8::try_from(key.prefix_len()).ok()?,
    )
}

/// The list tag and the prefix of a source-list key.
fn vip_net(key: &Key<VipSrcData>) -> Option<(u32, IpNet)> {
    let data = key.data();
    let tag = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let len = u8::try_from(key.prefix_len().checked_sub(32)?).ok()?;
    let net = Ipv4Net::new(Ipv4Addr::new(data[4], data[5], data[6], data[7]), len)?;
    Some((tag, IpNet::V4(net)))
}

/// The list tag and the prefix of an IPv6 source-list key.
fn vip_net6(key: &Key<VipSrc6Data>) -> Option<(u32, IpNet)> {
    let data = key.data();
    let tag = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let len = u8::try_from(key.prefix_len().checked_sub(32)?).ok()?;
    let addr: [u8; 16] = data[4..].try_into().ok()?;
    let net = Ipv6Net::new(Ipv6Addr::from(addr), len)?;
    Some((tag, IpNet::V6(net)))
}

fn corrupt(name: &'static str) -> DataplaneError {
    DataplaneError::Io {
        what: format!("reading map {name}: a key this agent never writes"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    }
}

/// The LPM keys of a list's source prefixes in the list half tagged `tag`: IPv4 ones (for
/// `VIP_ALLOW`/`VIP_DENY`), IPv6 ones (for `VIP_ALLOW6`/`VIP_DENY6`).
type ListKeys = (Vec<Key<VipSrcData>>, Vec<Key<VipSrc6Data>>);

fn vip_keys(tag: u32, list: &[IpNet]) -> ListKeys {
    let mut keys: ListKeys = Default::default();
    for n in list {
        match n {
            IpNet::V4(n) => keys.0.push(Key::new(
                32 + u32::from(n.prefix_len()),
                vip_src_data(tag, n.addr().octets()),
            )),
            IpNet::V6(n) => keys.1.push(Key::new(
                32 + u32::from(n.prefix_len()),
                vip_src6_data(tag, n.addr().octets()),
            )),
        }
    }
    keys
}

/// The keys of `policy`'s allow and deny lists in half `half` of VIP `vip_id`'s.
fn list_keys(vip_id: u32, half: u32, policy: &SourcePolicy) -> (ListKeys, ListKeys) {
    let tag = vip_list_tag(vip_id, half);
    (
        vip_keys(tag, &policy.allow_src),
        vip_keys(tag, &policy.deny_src),
    )
}

/// Write `keys` (all with the value 0) into the map `fd`, a batch per `CHUNK`, or one by one
/// with `one` where the kernel has no batch update for the map's type.
fn insert_batched<K>(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    name: &'static str,
    mut one: impl FnMut(&K) -> Result<(), aya::maps::MapError>,
) -> Result<(), DataplaneError> {
    let values = vec![0u8; keys.len().min(CHUNK)];
    for chunk in keys.chunks(CHUNK) {
        match batch::update(fd, chunk, &values[..chunk.len()]) {
            Ok(()) => {}
            Err(e) if batch::unsupported(&e) => {
                for k in chunk {
                    one(k).map_err(map_err(name))?;
                }
            }
            Err(e) => return Err(io(name, e)),
        }
    }
    Ok(())
}

/// A descriptor of our own to `map`, so that its handle can be borrowed mutably meanwhile.
fn own_fd(map: &MapData, name: &'static str) -> Result<std::os::fd::OwnedFd, DataplaneError> {
    map.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| io(name, e))
}

/// Write `keys` into `trie`.
fn insert_all<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, u8>,
    keys: &[Key<K>],
    name: &'static str,
) -> Result<(), DataplaneError> {
    let fd = own_fd(trie.map(), name)?;
    insert_batched(fd.as_fd(), keys, name, |k| trie.insert(k, 0, 0))
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

/// Write `keys` into `hash`.
fn insert_hosts(
    hash: &mut DenyHash,
    keys: &[DenyHostKey],
    name: &'static str,
) -> Result<(), DataplaneError> {
    let fd = own_fd(hash.map(), name)?;
    insert_batched(fd.as_fd(), keys, name, |k| hash.insert(k, 0, 0))
}

/// One half's /24 bitmap (`DENY_HOST_NETSn`), its copy in memory, and the count of the half's
/// host entries per /24 that says when a bit may be cleared.
struct HostNets {
    map: Array<MapData, u64>,
    name: &'static str,
    /// /24 (the address's upper 24 bits, host order) → host entries of the half in it.
    counts: std::collections::HashMap<u32, u32>,
    /// What the map holds, word for word (host order).
    words: Vec<u64>,
}

impl HostNets {
    /// The bitmap of a hash holding `hosts`, not written yet (`write_all`).
    fn new(map: Array<MapData, u64>, name: &'static str, hosts: &[DenyHostKey]) -> Self {
        let mut nets = HostNets {
            map,
            name,
            counts: std::collections::HashMap::new(),
            words: vec![0; DENY_HOST_NET_WORDS as usize],
        };
        nets.count_in(hosts);
        nets
    }

    /// Count `hosts` (network order) in, setting the bits of /24s that had none: the words
    /// that changed.
    fn count_in(&mut self, hosts: &[DenyHostKey]) -> BTreeSet<u32> {
        let mut changed = BTreeSet::new();
        for &h in hosts {
            let addr = u32::from_be(h);
            let n = self.counts.entry(addr >> 8).or_insert(0);
            *n += 1;
            if *n == 1 {
                let (word, bit) = deny_host_net_bit(addr);
                self.words[word as usize] |= 1 << bit;
                changed.insert(word);
            }
        }
        changed
    }

    /// Count `hosts` (network order, removed from the hash) out, clearing the bits of /24s
    /// left with none: the words that changed. Counts never go below zero (a host the count
    /// never had leaves its /24's bit as it is: a set bit only costs a hash lookup).
    fn count_out(&mut self, hosts: &[DenyHostKey]) -> BTreeSet<u32> {
        let mut changed = BTreeSet::new();
        for &h in hosts {
            let addr = u32::from_be(h);
            let Some(n) = self.counts.get_mut(&(addr >> 8)) else {
                continue;
            };
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&(addr >> 8));
                let (word, bit) = deny_host_net_bit(addr);
                self.words[word as usize] &= !(1 << bit);
                changed.insert(word);
            }
        }
        changed
    }

    /// Write `words` of the copy into the map: one batch, or word by word where the kernel
    /// has no batch update.
    fn write(&mut self, words: &[u32]) -> Result<(), DataplaneError> {
        let values: Vec<u64> = words.iter().map(|&w| self.words[w as usize]).collect();
        let fd = own_fd(self.map.map(), self.name)?;
        for (keys, vals) in words.chunks(CHUNK * 4).zip(values.chunks(CHUNK * 4)) {
            match batch::update(fd.as_fd(), keys, vals) {
                Ok(()) => {}
                Err(e) if batch::unsupported(&e) => {
                    for (&k, &v) in keys.iter().zip(vals) {
                        self.map.set(k, v, 0).map_err(map_err(self.name))?;
                    }
                }
                Err(e) => return Err(io(self.name, e)),
            }
        }
        Ok(())
    }

    /// Write the whole copy into the map (opening the list: a map created empty, or one whose
    /// bits a crashed agent left behind).
    fn write_all(&mut self) -> Result<(), DataplaneError> {
        let all: Vec<u32> = (0..DENY_HOST_NET_WORDS).collect();
        self.write(&all)
    }

    /// /24s with at least one host entry.
    fn nets(&self) -> usize {
        self.counts.len()
    }
}

/// Handles of their own to the two halves of the global deny list, for the thread that changes
/// it. Which half is live is the `Dataplane`'s to say (`set_deny_list`); these only write.
pub struct DenyMaps {
    tries: [DenyTrie; 2],
    hosts: [DenyHash; 2],
    host_nets: [HostNets; 2],
    tries6: [Deny6Trie; 2],
}

/// The keys of `prefixes` (`Ipv4Net` or `IpNet`) by structure: IPv4 host entries' hash keys,
/// shorter IPv4 prefixes' trie keys, IPv6 prefixes' trie keys.
type Split = (Vec<DenyHostKey>, Vec<Key<DenyData>>, Vec<Key<Deny6Data>>);

fn split<N: Copy + Into<IpNet>>(prefixes: &[N]) -> Split {
    let mut out: Split = Default::default();
    for n in prefixes {
        match (*n).into() {
            IpNet::V4(n) if is_host(&n) => out.0.push(host_key(&n)),
            IpNet::V4(n) => out.1.push(deny_key(&n)),
            IpNet::V6(n) => out.2.push(deny6_key(&n)),
        }
    }
    out
}

impl DenyMaps {
    /// Write `prefixes` (`Ipv4Net` or `IpNet`) into half `half`: IPv4 host entries into its
    /// hash, shorter IPv4 prefixes into its trie, IPv6 prefixes into its IPv6 trie.
    pub fn fill<N: Copy + Into<IpNet>>(
        &mut self,
        half: u32,
        prefixes: &[N],
    ) -> Result<(), DataplaneError> {
        let h = half as usize & 1;
        let (hosts, nets, nets6) = split(prefixes);
        // The bits first: a packet from a host being inserted must find its /24's bit set.
        let changed: Vec<u32> = self.host_nets[h].count_in(&hosts).into_iter().collect();
        self.host_nets[h].write(&changed)?;
        insert_hosts(&mut self.hosts[h], &hosts, maps::DENY_HOSTS[h])?;
        insert_all(&mut self.tries[h], &nets, maps::DENY[h])?;
        insert_all(&mut self.tries6[h], &nets6, maps::DENY6[h])
    }

    /// The file descriptors of half `half`: its hash, its /24 bitmap, its trie and its IPv6
    /// trie (their fdinfo tells the kernel's memory figure).
    pub fn fds(&self, half: u32) -> [std::os::fd::BorrowedFd<'_>; 4] {
        let h = half as usize & 1;
        [
            self.hosts[h].map().fd().as_fd(),
            self.host_nets[h].map.map().fd().as_fd(),
            self.tries[h].map().fd().as_fd(),
            self.tries6[h].map().fd().as_fd(),
        ]
    }

    /// Whether the /24 of `addr` has its bit set in half `half`'s bitmap, as the map holds it.
    pub fn host_net_listed(&self, half: u32, addr: Ipv4Addr) -> Result<bool, DataplaneError> {
        let h = half as usize & 1;
        let (word, bit) = deny_host_net_bit(u32::from(addr));
        let w = self.host_nets[h]
            .map
            .get(&word, 0)
            .map_err(map_err(self.host_nets[h].name))?;
        Ok(w & (1 << bit) != 0)
    }

    /// The /24s with a bit set in half `half`'s bitmap (by the agent's count).
    pub fn host_nets(&self, half: u32) -> usize {
        self.host_nets[half as usize & 1].nets()
    }

    /// The host entries in half `half`'s hash.
    fn read_hosts(&self, half: u32) -> Result<BTreeSet<IpNet>, DataplaneError> {
        let h = half as usize & 1;
        self.hosts[h]
            .keys()
            .map(|key| match key {
                Ok(addr) => Ok(IpNet::V4(Ipv4Net::host(Ipv4Addr::from(addr.to_ne_bytes())))),
                Err(e) => Err(map_err(maps::DENY_HOSTS[h])(e)),
            })
            .collect()
    }

    /// The prefixes in half `half`'s trie (host entries only if a build without the hash
    /// wrote them).
    fn read_trie(&self, half: u32) -> Result<BTreeSet<IpNet>, DataplaneError> {
        let h = half as usize & 1;
        let name = maps::DENY[h];
        let mut nets = BTreeSet::new();
        for key in self.tries[h].keys() {
            let key = key.map_err(map_err(name))?;
            nets.insert(IpNet::V4(deny_net(&key).ok_or_else(|| corrupt(name))?));
        }
        Ok(nets)
    }

    /// The prefixes in half `half`'s IPv6 trie.
    fn read_trie6(&self, half: u32) -> Result<BTreeSet<IpNet>, DataplaneError> {
        let h = half as usize & 1;
        let name = maps::DENY6[h];
        let mut nets = BTreeSet::new();
        for key in self.tries6[h].keys() {
            let key = key.map_err(map_err(name))?;
            nets.insert(IpNet::V6(deny6_net(&key).ok_or_else(|| corrupt(name))?));
        }
        Ok(nets)
    }

    /// The prefixes in half `half`, read back from its hash and its tries (one
    /// `BPF_MAP_GET_NEXT_KEY` each).
    pub fn read(&self, half: u32) -> Result<BTreeSet<IpNet>, DataplaneError> {
        let mut all = self.read_hosts(half)?;
        all.extend(self.read_trie(half)?);
        all.extend(self.read_trie6(half)?);
        Ok(all)
    }

    /// Delete `prefixes` (`Ipv4Net` or `IpNet`) from half `half` (those not there are
    /// skipped): IPv4 host entries from its hash, shorter IPv4 prefixes from its trie, IPv6
    /// prefixes from its IPv6 trie.
    pub fn clear<N: Copy + Into<IpNet>>(
        &mut self,
        half: u32,
        prefixes: &[N],
    ) -> Result<(), DataplaneError> {
        let h = half as usize & 1;
        let (hosts, nets, nets6) = split(prefixes);
        batch::delete_all(self.hosts[h].map().fd().as_fd(), &hosts, CHUNK)
            .map_err(|e| io(maps::DENY_HOSTS[h], e))?;
        // The bits only now that the hosts are gone (on an error above, they stay set: a set
        // bit costs a hash lookup, a clear one would let a listed host in).
        let changed: Vec<u32> = self.host_nets[h].count_out(&hosts).into_iter().collect();
        self.host_nets[h].write(&changed)?;
        remove_all(&self.tries[h], &nets, maps::DENY[h])?;
        remove_all(&self.tries6[h], &nets6, maps::DENY6[h])
    }

    /// Delete `prefixes` from half `half`'s tries: IPv4 ones from its trie (host entries
    /// included, which a build without the hash put there), IPv6 ones from its IPv6 trie.
    fn clear_trie(&mut self, half: u32, prefixes: &[IpNet]) -> Result<(), DataplaneError> {
        let h = half as usize & 1;
        let mut keys = Vec::new();
        let mut keys6 = Vec::new();
        for n in prefixes {
            match n {
                IpNet::V4(n) => keys.push(deny_key(n)),
                IpNet::V6(n) => keys6.push(deny6_key(n)),
            }
        }
        remove_all(&self.tries[h], &keys, maps::DENY[h])?;
        remove_all(&self.tries6[h], &keys6, maps::DENY6[h])
    }

    /// Empty half `half`, whatever is in it: how many entries it held.
    fn empty(&mut self, half: u32) -> Result<usize, DataplaneError> {
        let hosts: Vec<_> = self.read_hosts(half)?.into_iter().collect();
        let mut nets: Vec<_> = self.read_trie(half)?.into_iter().collect();
        nets.extend(self.read_trie6(half)?);
        self.clear(half, &hosts)?;
        self.clear_trie(half, &nets)?;
        Ok(hosts.len() + nets.len())
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
        let hash = |name: &'static str| -> Result<DenyHash, DataplaneError> {
            HashMap::try_from(self.reopen(name)?).map_err(map_err(name))
        };
        let hosts = [hash(maps::DENY_HOSTS[0])?, hash(maps::DENY_HOSTS[1])?];
        // The per-/24 counts come from what the hashes hold (a list taken over, or pinned by a
        // build without the bitmaps, whose maps were just created empty); the bitmaps are
        // written whole from them, before anything reads them to skip a lookup.
        let host_nets = |h: usize| -> Result<HostNets, DataplaneError> {
            let name = maps::DENY_HOST_NETS[h];
            let keys = hosts[h]
                .keys()
                .collect::<Result<Vec<DenyHostKey>, _>>()
                .map_err(map_err(maps::DENY_HOSTS[h]))?;
            let map = Array::try_from(self.reopen(name)?).map_err(map_err(name))?;
            let mut nets = HostNets::new(map, name, &keys);
            nets.write_all()?;
            Ok(nets)
        };
        let host_nets = [host_nets(0)?, host_nets(1)?];
        let trie6 = |name: &'static str| -> Result<Deny6Trie, DataplaneError> {
            LpmTrie::try_from(self.reopen(name)?).map_err(map_err(name))
        };
        Ok(DenyMaps {
            tries: [trie(maps::DENY[0])?, trie(maps::DENY[1])?],
            hosts,
            host_nets,
            tries6: [trie6(maps::DENY6[0])?, trie6(maps::DENY6[1])?],
        })
    }

    /// Make half `live` of the deny list the live one, holding `count` entries (the data path
    /// looks only into the structures that have some), and bump the policy generation, in one
    /// update of `POLICY`, then bump it once more (`policy_writes`): every flow is checked
    /// again against the new list, also one whose packet read the first update half-written.
    pub fn set_deny_list(&mut self, live: u32, count: DenyCount) -> Result<(), DataplaneError> {
        let flags = (self.policy_state.flags & !DENY_FLAGS) | count.flags();
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

    /// Tell every flow its cached source checks, and the VIP it caches, are outdated (after a
    /// change of a VIP).
    pub(super) fn bump_policy(&mut self) -> Result<(), DataplaneError> {
        self.write_policy(PolicyState {
            generation: next_generation(self.policy_state.generation),
            ..self.policy_state
        })
    }

    /// Write `state` into `POLICY` (`policy_writes`: one update, or two). An error means
    /// nothing changed: the second update only bumps the generation again, so if it fails the
    /// state asked for is in place, and the failure is logged. (An agent that dies between the
    /// two leaves the bump to the next one, whose every `apply_vip` bumps.)
    pub(super) fn write_policy(&mut self, state: PolicyState) -> Result<(), DataplaneError> {
        let map = &mut self.policy;
        self.policy_state = write_policy_with(&self.policy_state, state, |s| map.set(0, s, 0))
            .map_err(map_err(maps::POLICY))?;
        Ok(())
    }

    /// Whether the source lists of `policy` fit next to every installed VIP's (a change writes
    /// its new lists before the old ones are cleared, so both count).
    pub(super) fn check_source_lists(&self, policy: &SourcePolicy) -> Result<(), DataplaneError> {
        // Each family's prefixes have tries of their own.
        let v4 = |l: &[IpNet]| l.iter().filter(|n| matches!(n, IpNet::V4(_))).count();
        let v6 = |l: &[IpNet]| l.len() - v4(l);
        let used = |f: &dyn Fn(&SourcePolicy) -> usize| -> usize {
            self.installed.values().map(|v| f(&v.policy)).sum()
        };
        for (what, used, new) in [
            ("allow", used(&|p| v4(&p.allow_src)), v4(&policy.allow_src)),
            ("deny", used(&|p| v4(&p.deny_src)), v4(&policy.deny_src)),
            (
                "IPv6 allow",
                used(&|p| v6(&p.allow_src)),
                v6(&policy.allow_src),
            ),
            (
                "IPv6 deny",
                used(&|p| v6(&p.deny_src)),
                v6(&policy.deny_src),
            ),
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
        let ((allow, allow6), (deny, deny6)) = list_keys(vip_id, half, policy);
        let written = insert_all(&mut self.vip_allow, &allow, maps::VIP_ALLOW)
            .and_then(|()| insert_all(&mut self.vip_allow6, &allow6, maps::VIP_ALLOW6))
            .and_then(|()| insert_all(&mut self.vip_deny, &deny, maps::VIP_DENY))
            .and_then(|()| insert_all(&mut self.vip_deny6, &deny6, maps::VIP_DENY6));
        if let Err(e) = written {
            if let Err(re) = self.clear_source_lists(vip_id, half, policy) {
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
        let ((allow, allow6), (deny, deny6)) = list_keys(vip_id, half, policy);
        remove_all(&self.vip_allow, &allow, maps::VIP_ALLOW)?;
        remove_all(&self.vip_allow6, &allow6, maps::VIP_ALLOW6)?;
        remove_all(&self.vip_deny, &deny, maps::VIP_DENY)?;
        remove_all(&self.vip_deny6, &deny6, maps::VIP_DENY6)
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
    pub(super) fn install_deny_list(&mut self, prefixes: &[IpNet]) -> Result<(), DataplaneError> {
        if prefixes.len() > MAX_DENY_PREFIXES as usize {
            return Err(DataplaneError::DenyListFull {
                n: prefixes.len(),
                max: MAX_DENY_PREFIXES as usize,
            });
        }
        self.deny_maps()?.fill(0, prefixes)?;
        self.set_deny_list(0, DenyCount::of(prefixes))
    }
}

/// The `POLICY_F_*` bits that say which structures of the live deny-list half hold entries.
const DENY_FLAGS: u32 = POLICY_F_DENY_LIST | POLICY_F_DENY_HOSTS | POLICY_F_DENY6;

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
    ///
    /// Host entries the live trie holds (a build without the hash wrote them) are added to the
    /// hash and stay in the trie, which is all the running program reads, until this build's
    /// program runs (`tidy_deny_list`).
    pub(super) fn reconcile_deny_list(
        &mut self,
        prefixes: &[IpNet],
    ) -> Result<DenyReconcile, DataplaneError> {
        if prefixes.len() > MAX_DENY_PREFIXES as usize {
            return Err(DataplaneError::DenyListFull {
                n: prefixes.len(),
                max: MAX_DENY_PREFIXES as usize,
            });
        }
        let live = self.policy_state.deny_live & 1;
        let mut halves = self.deny_maps()?;
        let have_hosts = halves.read_hosts(live)?;
        let have_trie = halves.read_trie(live)?;
        let have_trie6 = halves.read_trie6(live)?;
        let want: BTreeSet<IpNet> = prefixes.iter().copied().collect();
        // Where each wanted prefix belongs, and what is there already.
        let add: Vec<IpNet> = want
            .iter()
            .filter(|n| match n {
                IpNet::V4(v4) if is_host(v4) => !have_hosts.contains(n),
                IpNet::V4(_) => !have_trie.contains(n),
                IpNet::V6(_) => !have_trie6.contains(n),
            })
            .copied()
            .collect();
        let remove_hosts: Vec<IpNet> = have_hosts.difference(&want).copied().collect();
        let remove_trie: Vec<IpNet> = have_trie
            .union(&have_trie6)
            .filter(|n| !want.contains(n))
            .copied()
            .collect();
        halves.fill(live, &add)?;
        halves.clear(live, &remove_hosts)?;
        halves.clear_trie(live, &remove_trie)?;
        let leftover = halves.empty(live ^ 1)?;
        let legacy: Vec<IpNet> = have_trie
            .iter()
            .filter(|n| matches!(n, IpNet::V4(v4) if is_host(v4)) && want.contains(n))
            .copied()
            .collect();
        let wanted = DenyCount::of(&want);
        // The trie as it is now: the wanted prefixes, and the host entries it keeps for now.
        let count = DenyCount {
            nets: wanted.nets + legacy.len(),
            ..wanted
        };
        self.deny_tidy = (!legacy.is_empty()).then_some(DenyTidy {
            hosts: legacy,
            nets: wanted.nets,
        });
        let removed = remove_hosts.len() + remove_trie.len();
        let flags = self.policy_state.flags & DENY_FLAGS;
        if !add.is_empty() || removed > 0 || flags != count.flags() {
            self.set_deny_list(live, count)?;
        }
        Ok(DenyReconcile {
            added: add.len(),
            removed,
            leftover,
        })
    }

    /// Once this build's program serves: remove from the live trie the host entries a build
    /// without the hash had put there (`reconcile_deny_list` put them in the hash as well), and
    /// stop walking the trie if nothing else is in it. The list's contents do not change, so
    /// flows keep their checks. How many were moved.
    pub(super) fn tidy_deny_list(&mut self) -> Result<usize, DataplaneError> {
        let Some(tidy) = self.deny_tidy.take() else {
            return Ok(0);
        };
        let live = self.policy_state.deny_live & 1;
        self.deny_maps()?.clear_trie(live, &tidy.hosts)?;
        if tidy.nets == 0 {
            self.write_policy(PolicyState {
                flags: self.policy_state.flags & !POLICY_F_DENY_LIST,
                ..self.policy_state
            })?;
        }
        Ok(tidy.hosts.len())
    }

    /// Every source list in `VIP_ALLOW`, `VIP_DENY`, `VIP_ALLOW6` and `VIP_DENY6`, by list tag
    /// (taking over: which VIP has which lists in which half).
    pub(super) fn read_source_lists(&self) -> Result<ListsByTag, DataplaneError> {
        let mut lists = ListsByTag::new();
        let mut add = |tag: u32, net: IpNet, allow: bool| {
            let policy = lists.entry(tag).or_default();
            if allow {
                policy.allow_src.push(net);
            } else {
                policy.deny_src.push(net);
            }
        };
        for (trie, name, allow) in [
            (&self.vip_allow, maps::VIP_ALLOW, true),
            (&self.vip_deny, maps::VIP_DENY, false),
        ] {
            for key in trie.keys() {
                let key = key.map_err(map_err(name))?;
                let (tag, net) = vip_net(&key).ok_or_else(|| corrupt(name))?;
                add(tag, net, allow);
            }
        }
        for (trie, name, allow) in [
            (&self.vip_allow6, maps::VIP_ALLOW6, true),
            (&self.vip_deny6, maps::VIP_DENY6, false),
        ] {
            for key in trie.keys() {
                let key = key.map_err(map_err(name))?;
                let (tag, net) = vip_net6(&key).ok_or_else(|| corrupt(name))?;
                add(tag, net, allow);
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

/// The `POLICY` updates that take `current` to `next`: `next` itself, then, when it changes the
/// generation together with the live half or the flags, one more bump of the generation alone.
/// The kernel copies a map value without atomicity, and the data path reads the generation, the
/// half and the flags with separate loads: a packet that reads the first update half-written
/// may see the new generation with the old half or flags, and stamp its flow with checks made
/// against the old list. The bump outdates that stamp once the half and the flags are whole
/// (the bump rewrites them unchanged, so a packet that reads it half-written sees the new list
/// either way).
fn policy_writes(current: &PolicyState, next: PolicyState) -> (PolicyState, Option<PolicyState>) {
    let switched = next.deny_live != current.deny_live || next.flags != current.flags;
    let bump = (switched && next.generation != current.generation).then(|| PolicyState {
        generation: next_generation(next.generation),
        ..next
    });
    (next, bump)
}

/// `policy_writes(current, next)` carried out through `set` (one `POLICY` update each, in
/// order): the state the map then holds, or the first update's error (nothing written). A
/// failed second update is logged, and the state asked for stands.
fn write_policy_with<E: std::fmt::Display>(
    current: &PolicyState,
    next: PolicyState,
    mut set: impl FnMut(PolicyState) -> Result<(), E>,
) -> Result<PolicyState, E> {
    let (first, then) = policy_writes(current, next);
    set(first)?;
    let Some(bump) = then else {
        return Ok(first);
    };
    match set(bump) {
        Ok(()) => Ok(bump),
        Err(e) => {
            log::error!(
                "bumping the policy generation after a switch of the deny list: {e}; flows whose \
                 packets read the switch half-written keep their checks until the next bump"
            );
            Ok(first)
        }
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

    /// A policy in place: generation 7, half 0 live, its trie not empty.
    const CURRENT: PolicyState = PolicyState {
        generation: 7,
        deny_live: 0,
        flags: POLICY_F_DENY_LIST,
        _pad: 0,
    };

    #[test]
    fn a_switch_of_the_deny_list_is_followed_by_a_bump_alone() {
        let current = CURRENT;
        let switch = PolicyState {
            generation: 8,
            deny_live: 1,
            flags: POLICY_F_DENY_HOSTS,
            ..current
        };
        let (first, then) = policy_writes(&current, switch);
        assert_eq!(first, switch);
        assert_eq!(
            then,
            Some(PolicyState {
                generation: 9,
                ..switch
            }),
            "a second generation, nothing else changed"
        );
        for (what, next, bump) in [
            (
                "a first host entry added in place (a new generation and flag)",
                PolicyState {
                    flags: POLICY_F_DENY_LIST | POLICY_F_DENY_HOSTS,
                    generation: 8,
                    ..current
                },
                true,
            ),
            (
                "a flag alone (debugging)",
                PolicyState {
                    flags: POLICY_F_DENY_LIST | lb_common::POLICY_F_DEBUG,
                    ..current
                },
                false,
            ),
            (
                "the generation alone (a VIP changed)",
                PolicyState {
                    generation: 8,
                    ..current
                },
                false,
            ),
        ] {
            let (first, then) = policy_writes(&current, next);
            assert_eq!(first, next, "{what}");
            assert_eq!(then.is_some(), bump, "{what}");
        }
        // Past the last generation: 0 is skipped by both.
        let last = PolicyState {
            generation: u32::MAX,
            ..current
        };
        let wrapped = PolicyState {
            generation: next_generation(u32::MAX),
            deny_live: 1,
            ..last
        };
        assert_eq!(
            policy_writes(&last, wrapped).1.map(|b| b.generation),
            Some(2)
        );
    }

    #[test]
    fn the_updates_reach_the_map_in_order_and_a_failed_bump_keeps_the_switch() {
        let current = CURRENT;
        let switch = PolicyState {
            generation: 8,
            deny_live: 1,
            ..current
        };
        let bumped = PolicyState {
            generation: 9,
            ..switch
        };
        // Every update succeeds: the switch, then the bump, and the map holds the bump.
        let mut written = Vec::new();
        let held = write_policy_with(&current, switch, |s| {
            written.push(s);
            Ok::<(), String>(())
        });
        assert_eq!(held, Ok(bumped));
        assert_eq!(written, [switch, bumped]);
        // The bump fails: the switch stands (no error, which would tell the deny list's thread
        // that nothing changed).
        let mut written = Vec::new();
        let held = write_policy_with(&current, switch, |s| {
            written.push(s);
            if s == bumped {
                Err("no".to_string())
            } else {
                Ok(())
            }
        });
        assert_eq!(held, Ok(switch));
        assert_eq!(written, [switch, bumped]);
        // The switch fails: the error, and nothing else tried.
        let mut tries = 0;
        let held = write_policy_with(&current, switch, |_| {
            tries += 1;
            Err("no".to_string())
        });
        assert_eq!(held, Err("no".to_string()));
        assert_eq!(tries, 1);
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
        let net6: Ipv6Net = match "2001:db8:40::/42".parse().unwrap() {
            IpNet::V6(n) => n,
            other => panic!("{other}"),
        };
        assert_eq!(deny6_net(&deny6_key(&net6)), Some(net6));
        let tag = vip_list_tag(300, 1);
        let (v4, v6) = vip_keys(tag, &[IpNet::V4(net), IpNet::V6(net6)]);
        assert_eq!(vip_net(&v4[0]), Some((tag, IpNet::V4(net))));
        assert_eq!(vip_net6(&v6[0]), Some((tag, IpNet::V6(net6))));
        // A key no agent writes (host bits, a prefix shorter than the tag) is not guessed at.
        assert_eq!(deny_net(&Key::new(8, [10, 1, 0, 0])), None);
        assert_eq!(vip_net(&Key::new(16, [0; 8])), None);
        assert_eq!(vip_net6(&Key::new(16, [0; 20])), None);
    }

    #[test]
    fn keys_put_the_tag_before_the_address() {
        let (k, k6) = vip_keys(
            vip_list_tag(3, 1),
            &[
                "192.0.2.0/24".parse().unwrap(),
                "fd11::/16".parse().unwrap(),
            ],
        );
        // SAFETY: Key is repr(C, packed): 4 bytes of prefix length, then the data.
        let bytes: [u8; 12] = unsafe { std::mem::transmute(k[0]) };
        assert_eq!(u32::from_ne_bytes(bytes[..4].try_into().unwrap()), 56);
        assert_eq!(&bytes[4..], &[0, 0, 0, 7, 192, 0, 2, 0]);
        // SAFETY: as above, 4 + 20 bytes.
        let bytes: [u8; 24] = unsafe { std::mem::transmute(k6[0]) };
        assert_eq!(u32::from_ne_bytes(bytes[..4].try_into().unwrap()), 48);
        assert_eq!(&bytes[4..10], &[0, 0, 0, 7, 0xfd, 0x11]);
        assert!(bytes[10..].iter().all(|b| *b == 0));
    }
}
