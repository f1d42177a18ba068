//! Copying a running data path's state into new maps: when a map's capacity changed (same
//! layout: entries copied as they are), or the layout version of the flow table or the embryonic
//! table did (each flow decoded from its old layout into a neutral form and installed in the new
//! table by backend address, the way peers' flows are), or that of `VIPS` did (each entry
//! converted, `upgrade_entries`). Done once before the program swap, and once more after it for
//! what the old program wrote meanwhile (flows it created, counts it added).
//!
//! The decoders of older layouts stay here for as long as an upgrade from them is supported;
//! `plan::can_migrate` asks `flow_value_size` and `upgrade_value` which versions those are.

use super::{batch::bpf, pins::MapShape};
use lb_common::{Addr, FlowKey, FlowStamp, maps};
use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `enum bpf_map_type` values this module treats specially.
pub(crate) const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub(crate) const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub(crate) const BPF_MAP_TYPE_RINGBUF: u32 = 27;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
/// A map's entries as raw bytes: key → value (per-CPU values: every CPU's copy in a row).
pub(crate) type Entries = BTreeMap<Vec<u8>, Vec<u8>>;

/// `BPF_NOEXIST`: insert only if the key is absent.
pub(crate) const BPF_NOEXIST: u64 = 1;

/// Bytes of a `FlowValue` in flow-table layout `version`, for the versions this build can read.
pub(crate) fn flow_value_size(version: u32) -> Option<usize> {
    match version {
        1 | 2 => Some(24),
        4 | 6 => Some(40),
        // Only the test-only second build knows versions 3, 5 and 7 (see
        // `lb_common::layout::FLOWS`).
        #[cfg(feature = "layout-test")]
        3 => Some(32),
        #[cfg(feature = "layout-test")]
        5 | 7 => Some(48),
        _ => None,
    }
}

/// Bytes of a `FlowKey` in flow-table layout `version`: IPv4 addresses up to version 3, 16-byte
/// addresses of either family from version 4.
fn flow_key_size(version: u32) -> usize {
    if version >= 4 { 40 } else { 16 }
}

/// The flow-table layout whose `FlowValue` the embryonic table's layout `version` holds (the
/// embryonic table started at flow-table layout 2).
pub(crate) fn embryo_flow_layout(version: u32) -> u32 {
    version + 1
}

/// The flow-table layout of the values of table `name` (`FLOWS` or `EMBRYOS`) at `version`.
pub(crate) fn flow_layout(name: &str, version: u32) -> u32 {
    if name == maps::EMBRYOS {
        embryo_flow_layout(version)
    } else {
        version
    }
}

/// One value of map `name` in layout `from`, in this build's layout `to`: for the maps whose
/// entries are converted as they are (not re-installed by backend address, as flows are).
/// `None`: no conversion exists (or the value has the wrong size).
///
/// - `VIPS` v1 → v2: `VipMeta` gained `flags` @16 (the door's `VIP_F_*`); a v1 VIP had no
///   source lists and no limits, so 0.
/// - `BACKENDS` v1 → v2: `Backend::addr` became a 16-byte `Addr` (v1: IPv4 @0, flags @4,
///   vip_id @8, padding @12), the IPv4 address mapped; a free slot (0.0.0.0) stays free (`::`).
pub(crate) fn upgrade_value(name: &str, from: u32, to: u32, value: &[u8]) -> Option<Vec<u8>> {
    match (name, from, to) {
        (maps::VIPS, 1, 2) if value.len() == 16 => {
            let mut v = value.to_vec();
            v.extend_from_slice(&0u32.to_ne_bytes());
            Some(v)
        }
        (maps::BACKENDS, 1, 2) if value.len() == 16 => {
            let v4 = u32_at(value, 0);
            let addr = if v4 == 0 {
                Addr::UNSPECIFIED
            } else {
                Addr::from_v4(v4)
            };
            let mut v = addr.octets().to_vec();
            v.extend_from_slice(&value[4..12]);
            Some(v)
        }
        _ => None,
    }
}

/// One key of map `name` in layout `from`, in layout `to` (most conversions keep the key).
///
/// - `SRC_BUCKETS` v1 → v2: `SrcBucketKey::src_addr` became an `Addr` (v1: IPv4 @0, vip_id @4),
///   the IPv4 source mapped.
fn upgrade_key(name: &str, from: u32, to: u32, key: Vec<u8>) -> Option<Vec<u8>> {
    match (name, from, to) {
        (maps::SRC_BUCKETS, 1, 2) if key.len() == 8 => {
            let mut k = Addr::from_v4(u32_at(&key, 0)).octets().to_vec();
            k.extend_from_slice(&key[4..8]);
            Some(k)
        }
        (maps::SRC_BUCKETS, ..) => None,
        _ => Some(key),
    }
}

/// Whether map `name` has a conversion from layout `from` to `to` (`plan::can_migrate`).
pub(crate) fn has_upgrade(name: &str, from: u32, to: u32) -> bool {
    matches!(
        (name, from, to),
        (maps::VIPS, 1, 2) | (maps::BACKENDS, 1, 2) | (maps::SRC_BUCKETS, 1, 2)
    )
}

/// `upgrade_value` (and `upgrade_key`) for every entry; `None` if one of them has no
/// conversion.
pub(crate) fn upgrade_entries(name: &str, from: u32, to: u32, entries: Entries) -> Option<Entries> {
    entries
        .into_iter()
        .map(|(k, v)| {
            let v = match name {
                // Only the key changed.
                maps::SRC_BUCKETS => v,
                _ => upgrade_value(name, from, to, &v)?,
            };
            Some((upgrade_key(name, from, to, k)?, v))
        })
        .collect()
}

/// A flow as every layout version has it: what the new table needs to carry it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NeutralFlow {
    pub(crate) key: FlowKey,
    pub(crate) backend_addr: Addr,
    /// CLOCK_MONOTONIC_COARSE ns of its last packet.
    pub(crate) last_seen_ns: u64,
    /// `FLOW_F_*` (who chose the backend).
    pub(crate) flags: u32,
    /// The policy generation its source checks were made under (0: never, check again) and the
    /// VIP cached under it.
    pub(crate) stamp: FlowStamp,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn addr_at(b: &[u8], at: usize) -> Addr {
    Addr::from_octets(b[at..at + 16].try_into().expect("16 bytes"))
}

/// A `FlowKey` from its bytes in flow-table layout `version`: 16 bytes with IPv4 addresses
/// (versions 1-3: source @0, destination @4, ports @8 and @10, protocol @12), mapped; 40 bytes
/// with `Addr`s from version 4.
pub(crate) fn decode_flow_key(version: u32, b: &[u8]) -> Option<FlowKey> {
    if b.len() != flow_key_size(version) {
        return None;
    }
    Some(if version >= 4 {
        FlowKey {
            src_addr: addr_at(b, 0),
            dst_addr: addr_at(b, 16),
            src_port: u16_at(b, 32),
            dst_port: u16_at(b, 34),
            proto: b[36],
            _pad: [0; 3],
        }
    } else {
        FlowKey {
            src_addr: Addr::from_v4(u32_at(b, 0)),
            dst_addr: Addr::from_v4(u32_at(b, 4)),
            src_port: u16_at(b, 8),
            dst_port: u16_at(b, 10),
            proto: b[12],
            _pad: [0; 3],
        }
    })
}

/// One flow of layout `version`: `None` for a version this build cannot read or a value of the
/// wrong size.
///
/// - v1: backend_addr (u32, network order) @0, backend_id (u32) @4, last_seen_ns (u64) @8,
///   flags (u32) @16, padding @20.
/// - v2: v1 with policy_gen (u32) @20 where v1 had padding (not carried over: see v6).
/// - v3 (layout-test builds): v2 + created_ns (u64) @24, which a v2 table cannot carry.
/// - v4: both families: backend_addr (`Addr`) @0, backend_id @16, flags @20, last_seen_ns @24,
///   policy_gen @32, padding @36; a v1-v3 flow's IPv4 addresses are mapped.
/// - v5 (layout-test builds): v4 + created_ns (u64) @40.
/// - v6: v4 with vip_id (u16) @36 and vip_forward (u8) @38 where v4 had padding. A v4 or v5
///   flow cached no VIP: it gets generation 0, so its next packet looks its VIP up.
/// - v7 (layout-test builds): v6 + created_ns (u64) @40.
pub(crate) fn decode_flow(version: u32, key: &[u8], value: &[u8]) -> Option<NeutralFlow> {
    if flow_value_size(version)? != value.len() {
        return None;
    }
    let key = decode_flow_key(version, key)?;
    Some(if version >= 4 {
        NeutralFlow {
            key,
            backend_addr: addr_at(value, 0),
            flags: u32_at(value, 20),
            last_seen_ns: u64_at(value, 24),
            stamp: if version >= 6 {
                FlowStamp {
                    policy_gen: u32_at(value, 32),
                    vip_id: u16_at(value, 36),
                    vip_forward: value[38],
                }
            } else {
                FlowStamp::NONE
            },
        }
    } else {
        NeutralFlow {
            key,
            backend_addr: Addr::from_v4(u32_at(value, 0)),
            last_seen_ns: u64_at(value, 8),
            flags: u32_at(value, 16),
            // A v2 flow's generation vouched for its source checks only, not for a VIP.
            stamp: FlowStamp::NONE,
        }
    })
}

/// The bytes of one value of `shape` as the syscalls read and write it: per-CPU maps hold one
/// 8-byte-aligned copy per possible CPU.
pub(crate) fn value_buffer_len(shape: &MapShape, nr_cpus: usize) -> usize {
    if shape.map_type == BPF_MAP_TYPE_PERCPU_ARRAY {
        (shape.value_size as usize).div_ceil(8) * 8 * nr_cpus
    } else {
        shape.value_size as usize
    }
}

fn attr_lookup(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> [u8; 32] {
    // map_fd (u32), pad, key (u64), value (u64), flags (u64).
    let mut attr = [0u8; 32];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(key.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(value.as_mut_ptr() as u64).to_ne_bytes());
    attr
}

/// `BPF_MAP_LOOKUP_ELEM`: `false` if there is no such key.
pub(crate) fn lookup(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = attr_lookup(fd, key, value);
    // SAFETY: the attribute points at `key` and `value`, alive for the call; `value` is
    // writable for the map's value size (the callers size it with `value_buffer_len`).
    match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_UPDATE_ELEM` with `flags`; `false` if `BPF_NOEXIST` found the key present.
pub(crate) fn update(fd: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<bool> {
    let mut value = value.to_vec();
    let mut attr = attr_lookup(fd, key, &mut value);
    attr[24..32].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: the attribute points at `key` and the copy of `value`, alive for the call; the
    // kernel only reads them.
    match unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) } {
        Ok(_) => Ok(true),
        Err(e) if flags == BPF_NOEXIST && e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every key of a hash map (`BPF_MAP_GET_NEXT_KEY`). Entries may come and go meanwhile.
fn hash_keys(fd: BorrowedFd<'_>, key_size: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut keys = Vec::new();
    let mut prev: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = [0u8; 32];
        attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        // A null key asks for the first one.
        let key_ptr = prev.as_ref().map_or(0, |k| k.as_ptr() as u64);
        attr[8..16].copy_from_slice(&key_ptr.to_ne_bytes());
        attr[16..24].copy_from_slice(&(next.as_mut_ptr() as u64).to_ne_bytes());
        // SAFETY: the attribute points at the previous key (or is null) and at `next`, which
        // is writable for the map's key size; both alive for the call.
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
        keys.push(next.clone());
        prev = Some(next);
    }
}

/// Every entry of a map as raw bytes, by key: arrays by index (only entries that are not all
/// zero: a new array starts zeroed), hash maps by key.
pub(crate) fn read_entries(
    fd: BorrowedFd<'_>,
    shape: &MapShape,
    nr_cpus: usize,
) -> io::Result<Entries> {
    let value_len = value_buffer_len(shape, nr_cpus);
    let keys: Vec<Vec<u8>> = match shape.map_type {
        BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY => (0..shape.max_entries)
            .map(|i| i.to_ne_bytes().to_vec())
            .collect(),
        _ => hash_keys(fd, shape.key_size as usize)?,
    };
    let mut out = BTreeMap::new();
    for key in keys {
        let mut value = vec![0u8; value_len];
        if lookup(fd, &key, &mut value)? && value.iter().any(|b| *b != 0) {
            out.insert(key, value);
        }
    }
    Ok(out)
}

/// The index an array key stands for.
fn index_of(key: &[u8]) -> u32 {
    u32::from_ne_bytes(key[..4].try_into().expect("array keys are 4 bytes"))
}

/// Copy `entries` (read from a map of the same layout) into `fd` of `shape`: entries whose index
/// is past a smaller array are left out and counted.
pub(crate) fn write_entries(
    fd: BorrowedFd<'_>,
    shape: &MapShape,
    entries: &Entries,
) -> io::Result<CopyCount> {
    let mut count = CopyCount::default();
    let is_array = matches!(
        shape.map_type,
        BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY
    );
    for (key, value) in entries {
        if is_array && index_of(key) >= shape.max_entries {
            count.left_out += 1;
            continue;
        }
        match update(fd, key, value, 0) {
            Ok(_) => count.copied += 1,
            // A full hash map: the rest does not fit.
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => count.left_out += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(count)
}

/// Add to each counter of `fd` what the old map's counter grew by since `before` was read:
/// values are taken as 64-bit counters (every counter map's values are). Best effort: a
/// packet counted on a CPU between the read and the write here is lost.
pub(crate) fn add_growth(
    fd: BorrowedFd<'_>,
    shape: &MapShape,
    nr_cpus: usize,
    before: &Entries,
    after: &Entries,
) -> io::Result<u64> {
    let value_len = value_buffer_len(shape, nr_cpus);
    let mut added = 0;
    for (key, now) in after {
        if index_of(key) >= shape.max_entries {
            continue;
        }
        let zero = vec![0u8; now.len()];
        let was = before.get(key).unwrap_or(&zero);
        let mut current = vec![0u8; value_len];
        lookup(fd, key, &mut current)?;
        let mut changed = false;
        for at in (0..now.len().min(value_len)).step_by(8) {
            let grew = u64_at(now, at).wrapping_sub(u64_at(was, at));
            if grew != 0 {
                let sum = u64_at(&current, at).wrapping_add(grew);
                current[at..at + 8].copy_from_slice(&sum.to_ne_bytes());
                added += grew;
                changed = true;
            }
        }
        if changed {
            update(fd, key, &current, 0)?;
        }
    }
    Ok(added)
}

/// What a copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CopyCount {
    pub(crate) copied: u64,
    /// Entries the new map had no room for (a smaller capacity), or, for flows, whose VIP or
    /// backend this agent no longer has.
    pub(crate) left_out: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_bytes() -> Vec<u8> {
        let mut k = Vec::new();
        k.extend_from_slice(&[10, 111, 0, 2]);
        k.extend_from_slice(&[10, 111, 100, 1]);
        k.extend_from_slice(&40000u16.to_be().to_ne_bytes());
        k.extend_from_slice(&80u16.to_be().to_ne_bytes());
        k.extend_from_slice(&[6, 0, 0, 0]);
        k
    }

    #[test]
    fn flow_v1_decodes_into_the_neutral_form() {
        let mut v = Vec::new();
        v.extend_from_slice(&[10, 111, 1, 12]);
        v.extend_from_slice(&7u32.to_ne_bytes());
        v.extend_from_slice(&123_456_789u64.to_ne_bytes());
        v.extend_from_slice(&lb_common::FLOW_F_PEER.to_ne_bytes());
        // Padding in v1: whatever it holds, the flow is to be checked again.
        v.extend_from_slice(&7u32.to_ne_bytes());
        let f = decode_flow(1, &key_bytes(), &v).unwrap();
        let v4 = |a: [u8; 4]| Addr::from(std::net::Ipv4Addr::from(a));
        assert_eq!(f.flags, lb_common::FLOW_F_PEER);
        assert_eq!(f.stamp, FlowStamp::NONE);
        assert_eq!(f.backend_addr, v4([10, 111, 1, 12]));
        assert_eq!(f.last_seen_ns, 123_456_789);
        assert_eq!(f.key.src_addr, v4([10, 111, 0, 2]));
        assert_eq!(f.key.dst_addr, v4([10, 111, 100, 1]));
        assert_eq!(u16::from_be(f.key.src_port), 40000);
        assert_eq!(u16::from_be(f.key.dst_port), 80);
        assert_eq!(f.key.proto, 6);
        // The bytes of the current layout (this build's `FlowKey` and `FlowValue`, version 6)
        // decode the same way, with their policy generation and cached VIP.
        #[cfg(not(feature = "layout-test"))]
        {
            let stamp = FlowStamp {
                policy_gen: 5,
                vip_id: 3,
                vip_forward: lb_common::FORWARD_L2 as u8,
            };
            let value =
                lb_common::FlowValue::new(f.backend_addr, 7, 123_456_789, lb_common::FLOW_F_PEER)
                    .stamped(stamp);
            // SAFETY: FlowKey and FlowValue are repr(C) plain integers with explicit padding.
            let (key, bytes) = unsafe {
                (
                    std::mem::transmute::<FlowKey, [u8; 40]>(f.key),
                    std::mem::transmute::<lb_common::FlowValue, [u8; 40]>(value),
                )
            };
            assert_eq!(
                decode_flow(lb_common::layout::FLOWS, &key, &bytes),
                Some(NeutralFlow { stamp, ..f })
            );
            // The same bytes as version 4 (padding where v6 caches the VIP): nothing cached.
            assert_eq!(
                decode_flow(4, &key, &bytes),
                Some(NeutralFlow {
                    stamp: FlowStamp::NONE,
                    ..f
                })
            );
            // A version-4 key is 40 bytes: a version-1 key is not read as one.
            assert_eq!(decode_flow(4, &key_bytes(), &bytes), None);
        }
        // Wrong sizes and unknown versions are not guessed at.
        assert_eq!(decode_flow(1, &key_bytes(), &v[..16]), None);
        assert_eq!(decode_flow(99, &key_bytes(), &v), None);
        assert_eq!(decode_flow(1, &key_bytes()[..8], &v), None);
    }

    #[cfg(feature = "layout-test")]
    #[test]
    fn flow_v3_decodes_and_carries_what_v2_had() {
        let mut v = Vec::new();
        v.extend_from_slice(&[10, 111, 1, 13]);
        v.extend_from_slice(&2u32.to_ne_bytes());
        v.extend_from_slice(&55u64.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&9u32.to_ne_bytes());
        v.extend_from_slice(&44u64.to_ne_bytes());
        let f = decode_flow(3, &key_bytes(), &v).unwrap();
        assert_eq!(
            (f.backend_addr, f.last_seen_ns, f.stamp),
            (
                Addr::from_v4(u32::from_ne_bytes([10, 111, 1, 13])),
                55,
                FlowStamp::NONE
            )
        );
        assert_eq!(decode_flow(3, &key_bytes(), &v[..24]), None);
    }

    #[test]
    fn the_embryonic_table_follows_the_flow_table_layouts() {
        assert_eq!(flow_layout(maps::EMBRYOS, 1), 2);
        assert_eq!(flow_layout(maps::FLOWS, 1), 1);
        // This build's embryonic table holds this build's flow values.
        assert_eq!(
            embryo_flow_layout(lb_common::layout::EMBRYOS),
            lb_common::layout::FLOWS
        );
    }

    #[test]
    fn a_v1_vip_gets_no_door_flags() {
        let mut v1 = Vec::new();
        for x in [3u32, 12, 1, lb_common::FORWARD_IPIP] {
            v1.extend_from_slice(&x.to_ne_bytes());
        }
        let v2 = upgrade_value(maps::VIPS, 1, 2, &v1).unwrap();
        assert_eq!(v2.len(), size_of::<lb_common::VipMeta>());
        assert_eq!(&v2[..16], &v1[..]);
        assert_eq!(u32_at(&v2, 16), 0);
        // Wrong sizes, other maps and other versions have no conversion.
        assert_eq!(upgrade_value(maps::VIPS, 1, 2, &v1[..12]), None);
        assert_eq!(upgrade_value(maps::RINGS, 1, 2, &v1), None);
        assert_eq!(upgrade_value(maps::VIPS, 2, 3, &v2), None);
        let mut entries = Entries::new();
        entries.insert(vec![1; 8], v1.clone());
        let up = upgrade_entries(maps::VIPS, 1, 2, entries.clone()).unwrap();
        assert_eq!(up[&vec![1u8; 8]], v2);
        entries.insert(vec![2; 8], v1[..4].to_vec());
        assert_eq!(upgrade_entries(maps::VIPS, 1, 2, entries), None);
    }

    #[test]
    fn v1_backends_and_source_buckets_get_mapped_addresses() {
        let mut b1 = vec![10, 111, 1, 12];
        b1.extend_from_slice(&lb_common::BACKEND_F_ACTIVE.to_ne_bytes());
        b1.extend_from_slice(&3u32.to_ne_bytes());
        b1.extend_from_slice(&0u32.to_ne_bytes());
        let b2 = upgrade_value(maps::BACKENDS, 1, 2, &b1).unwrap();
        assert_eq!(b2.len(), size_of::<lb_common::Backend>());
        let be = Addr::from_v4(u32::from_ne_bytes([10, 111, 1, 12]));
        assert_eq!(addr_at(&b2, 0), be);
        assert_eq!(u32_at(&b2, 16), lb_common::BACKEND_F_ACTIVE);
        assert_eq!(u32_at(&b2, 20), 3);
        // A free v1 slot stays free.
        let free = upgrade_value(maps::BACKENDS, 1, 2, &[0; 16]).unwrap();
        assert_eq!(addr_at(&free, 0), Addr::UNSPECIFIED);

        let mut k1 = vec![10, 111, 0, 2];
        k1.extend_from_slice(&4u32.to_ne_bytes());
        let mut entries = Entries::new();
        entries.insert(k1, 77u64.to_ne_bytes().to_vec());
        let up = upgrade_entries(maps::SRC_BUCKETS, 1, 2, entries).unwrap();
        let (k2, v2) = up.into_iter().next().unwrap();
        assert_eq!(k2.len(), size_of::<lb_common::SrcBucketKey>());
        assert_eq!(
            addr_at(&k2, 0),
            Addr::from_v4(u32::from_ne_bytes([10, 111, 0, 2]))
        );
        assert_eq!(u32_at(&k2, 16), 4);
        assert_eq!(u64_at(&v2, 0), 77);
        assert!(has_upgrade(maps::BACKENDS, 1, 2) && !has_upgrade(maps::BACKENDS, 2, 3));
    }

    #[test]
    fn per_cpu_values_take_an_aligned_copy_per_cpu() {
        let shape = |map_type, value_size| MapShape {
            map_type,
            key_size: 4,
            value_size,
            max_entries: 1,
            flags: 0,
        };
        assert_eq!(
            value_buffer_len(&shape(BPF_MAP_TYPE_PERCPU_ARRAY, 24), 2),
            48
        );
        assert_eq!(
            value_buffer_len(&shape(BPF_MAP_TYPE_PERCPU_ARRAY, 4), 3),
            24
        );
        assert_eq!(value_buffer_len(&shape(BPF_MAP_TYPE_ARRAY, 4), 3), 4);
    }
}
