//! The flow table from userspace: peers' flows installed (`install_flows`, in the serve loop: a
//! frame's worth of map updates), and walks of the whole table — counts for reports, snapshots
//! for peers — through `FlowTable`, a handle of its own that the agent walks off its serve loop.
//!
//! A walk reads the table in batches (`BPF_MAP_LOOKUP_BATCH`, thousands of entries per system
//! call) where the kernel has them, and entry by entry otherwise. The table keeps changing under
//! any walk: an entry added or evicted meanwhile may be seen or missed.

use super::{Dataplane, DataplaneError, batch, map_err, take_map};
use aya::maps::{HashMap, IterableMap, MapData, RingBuf};
use lb_common::{
    Addr, CONFIG_F_FLOW_EVENTS, CONFIG_F_HOLD_MIDFLOW, FLOW_F_PEER, FlowEvent, FlowKey, FlowValue,
    maps,
};
use serde::{Deserialize, Serialize};
use std::{
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    time::Duration,
};

/// How recently a flow must have seen a packet to count as active in `BackendStats`.
pub const ACTIVE_FLOW_WINDOW: Duration = Duration::from_secs(60);

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call (512 KiB of keys and values).
const BATCH: usize = 16_384;

/// What `install_flows` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallReport {
    pub installed: u64,
    /// Flows whose VIP or backend this node does not have.
    pub unknown_backend: u64,
}

/// What one walk of the flow table counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    /// Entries in the table: live flows and finished ones not evicted yet (it is an LRU).
    pub entries: u64,
    /// Entries in the embryonic table (TCP flows that have sent only SYNs, and with peer sync
    /// flows held for a peer's record; an LRU too).
    pub embryos: u64,
    /// Entries that saw a packet within `ACTIVE_FLOW_WINDOW`, per (backend slot, backend address).
    pub active: std::collections::HashMap<(u32, Addr), u64>,
}

impl FlowCounts {
    /// Active flows of the backend at `addr` in slot `slot` (a slot's flows count only while the
    /// slot still holds that address).
    pub fn active_of(&self, slot: u32, addr: IpAddr) -> u64 {
        self.active
            .get(&(slot, Addr::from(addr)))
            .copied()
            .unwrap_or(0)
    }
}

/// A handle of its own to the flow table and the embryonic table (the same kernel maps), to walk
/// them from another thread than the one that owns the `Dataplane`.
pub struct FlowTable {
    map: HashMap<MapData, FlowKey, FlowValue>,
    embryos: HashMap<MapData, FlowKey, FlowValue>,
}

/// Call `f` for every entry of `map` (`name`: for errors).
fn walk(
    map: &HashMap<MapData, FlowKey, FlowValue>,
    name: &'static str,
    mut f: impl FnMut(&FlowKey, &FlowValue),
) -> Result<(), DataplaneError> {
    match lookup_batches(map.map().fd().as_fd(), &mut f) {
        Ok(()) => Ok(()),
        // A kernel or map type without the batch command: read entry by entry.
        Err(e) if batch::unsupported(&e) => {
            // An entry evicted while we walk is simply skipped.
            for (key, value) in map.iter().flatten() {
                f(&key, &value);
            }
            Ok(())
        }
        Err(source) => Err(DataplaneError::Io {
            what: format!("reading map {name}"),
            source,
        }),
    }
}

impl FlowTable {
    /// Call `f` for every entry of the flow table.
    pub fn for_each(&self, f: impl FnMut(&FlowKey, &FlowValue)) -> Result<(), DataplaneError> {
        walk(&self.map, maps::FLOWS, f)
    }

    /// Delete the entries of `keys` (batches of `BPF_MAP_DELETE_BATCH` where the kernel has it,
    /// one `BPF_MAP_DELETE_ELEM` per key otherwise). How many were deleted: a key that is gone
    /// already (evicted, or deleted by someone else since it was read) is skipped.
    pub fn delete(&self, keys: &[FlowKey]) -> Result<u64, DataplaneError> {
        batch::delete_all(self.map.map().fd().as_fd(), keys, BATCH).map_err(|source| {
            DataplaneError::Io {
                what: format!("deleting entries of map {}", maps::FLOWS),
                source,
            }
        })
    }

    /// Entries, and active entries per backend slot and address (one walk), and the embryonic
    /// table's entries (a walk of that too: it is small).
    pub fn counts(&self) -> Result<FlowCounts, DataplaneError> {
        let since = monotonic_ns().saturating_sub(ACTIVE_FLOW_WINDOW.as_nanos() as u64);
        let mut counts = FlowCounts::default();
        walk(&self.embryos, maps::EMBRYOS, |_, _| counts.embryos += 1)?;
        self.for_each(|_, flow| {
            counts.entries += 1;
            if flow.last_seen_ns >= since {
                *counts
                    .active
                    .entry((flow.backend_id, flow.backend_addr))
                    .or_insert(0) += 1;
            }
        })?;
        Ok(counts)
    }

    /// Every flow seen within `max_age`, as `FlowEvent`s (the snapshot a (re)joining peer gets).
    pub fn snapshot(&self, max_age: Duration) -> Result<Vec<FlowEvent>, DataplaneError> {
        let since = monotonic_ns().saturating_sub(max_age.as_nanos() as u64);
        let mut flows = Vec::new();
        self.for_each(|flow, value| {
            if value.last_seen_ns >= since {
                flows.push(FlowEvent {
                    flow: *flow,
                    backend_addr: value.backend_addr,
                });
            }
        })?;
        Ok(flows)
    }
}

/// Read the whole hash map `fd` in batches and call `f` for each entry. aya has no batch
/// operations; one call copies thousands of entries, where the iterator makes two system calls
/// per entry (a million entries: about 2 s).
fn lookup_batches(fd: BorrowedFd<'_>, f: &mut impl FnMut(&FlowKey, &FlowValue)) -> io::Result<()> {
    use batch::{BPF_MAP_LOOKUP_BATCH, BatchAttr};
    let mut keys = vec![FlowKey::default(); BATCH];
    let mut values = vec![FlowValue::default(); BATCH];
    // The kernel's position in the table (a bucket index for hash maps); 8 bytes leave room.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token_in as u64 },
            out_batch: &raw mut token_out as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` describes buffers of `BATCH` keys and values of the map's key and value
        // types (`FlowKey`, `FlowValue`: plain `repr(C)` integers) and two 8-byte tokens, all
        // alive and not otherwise borrowed for the duration of the call; the kernel writes at
        // most `count` entries and one token.
        let err = unsafe { batch::bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        // Also on ENOENT (the end of the table) `count` holds the entries of this last batch.
        let n = match &err {
            None => attr.count as usize,
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => attr.count as usize,
            Some(_) => 0,
        };
        for (key, value) in keys.iter().zip(&values).take(n.min(BATCH)) {
            f(key, value);
        }
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// The data path's flow clock (`bpf_ktime_get_coarse_ns()`: CLOCK_MONOTONIC_COARSE), in
/// nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl Dataplane {
    /// The flow table, read-only, through the `Dataplane` (tests read single entries this way).
    pub fn flows(&self) -> Result<HashMap<&MapData, FlowKey, FlowValue>, DataplaneError> {
        let map = self
            .ebpf
            .map(maps::FLOWS)
            .ok_or(DataplaneError::MissingMap { name: maps::FLOWS })?;
        HashMap::try_from(map).map_err(map_err(maps::FLOWS))
    }

    /// The embryonic table, read-only (tests read it this way).
    pub fn embryos(&self) -> Result<HashMap<&MapData, FlowKey, FlowValue>, DataplaneError> {
        let map = self
            .ebpf
            .map(maps::EMBRYOS)
            .ok_or(DataplaneError::MissingMap {
                name: maps::EMBRYOS,
            })?;
        HashMap::try_from(map).map_err(map_err(maps::EMBRYOS))
    }

    /// A handle of its own to the flow table (and the embryonic table), for walks on other
    /// threads.
    pub fn flow_table(&self) -> Result<FlowTable, DataplaneError> {
        Ok(FlowTable {
            map: HashMap::try_from(self.reopen(maps::FLOWS)?).map_err(map_err(maps::FLOWS))?,
            embryos: HashMap::try_from(self.reopen(maps::EMBRYOS)?)
                .map_err(map_err(maps::EMBRYOS))?,
        })
    }

    /// The ring buffer of `FlowEvent`s (new and re-steered flows, for peer sync). It can be taken
    /// once; later calls fail with `MissingMap`. Until it is taken the program reports nothing.
    pub fn take_flow_events(&mut self) -> Result<RingBuf<MapData>, DataplaneError> {
        let ring = take_map(&mut self.ebpf, maps::FLOW_EVENTS)?;
        // Someone reads the events now: start reporting them.
        self.set_config_flag(CONFIG_F_FLOW_EVENTS, true)?;
        Ok(ring)
    }

    /// Hold a TCP packet without SYN that finds no flow (`CONFIG_F_HOLD_MIDFLOW`) for up to
    /// `lb_common::MIDFLOW_HOLD_NS` before steering it as a new flow: on while peers may send this
    /// node their flows, so that a flow a peer opened a moment before an ECMP change reaches
    /// its backend once the peer's record is here, instead of whichever one round robin gives.
    pub fn hold_midflow_misses(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.set_config_flag(CONFIG_F_HOLD_MIDFLOW, on)
    }

    /// Install flows learned from a peer, each pinned to its backend by address and marked
    /// `FLOW_F_PEER` (origin `peer` in `xlb flows`). A flow whose VIP or backend this node does not
    /// have is skipped and counted in the report (never guessed). An existing entry is
    /// overwritten: the peer saw the flow's latest assignment.
    pub fn install_flows(
        &mut self,
        flows: impl IntoIterator<Item = FlowEvent>,
    ) -> Result<InstallReport, DataplaneError> {
        // Chosen by the peer: marked so (`xlb flows` shows the origin).
        self.install(
            maps::FLOWS,
            flows.into_iter().map(|e| super::live::FlowInstall {
                key: e.flow,
                backend_addr: e.backend_addr,
                last_seen_ns: None,
                flags: FLOW_F_PEER,
                // Never checked here: the flow's first packet makes the source checks and looks
                // its VIP up.
                stamp: lb_common::FlowStamp::NONE,
            }),
            0,
        )
    }

    /// Every flow seen within `max_age`, as `FlowEvent`s: one walk of the table (the agent walks
    /// its `flow_table()` off its serve loop instead).
    pub fn snapshot_flows(&self, max_age: Duration) -> Result<Vec<FlowEvent>, DataplaneError> {
        self.flow_table()?.snapshot(max_age)
    }

    /// The flow counts of one walk of the table (the agent walks its `flow_table()` off its
    /// serve loop instead).
    pub fn flow_counts(&self) -> Result<FlowCounts, DataplaneError> {
        self.flow_table()?.counts()
    }
}
