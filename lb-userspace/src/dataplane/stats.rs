//! Counters from userspace: the per-CPU arrays summed per VIP, per backend, per reason and per
//! event. Reading them costs the data path nothing; none of this walks the flow table (the
//! active-flow counts come from a walk, `FlowCounts`, added with `with_flows`).

use super::{Dataplane, DataplaneError, FlowCounts, VipDropCounts, map_err};
use crate::model::ServiceKey;
use aya::maps::{MapData, PerCpuArray};
use lb_common::{TrafficCounters, event, maps, reason};
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, net::IpAddr};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub addr: IpAddr,
    /// The backend's slot in the data path (its flows name it), this VIP's only.
    pub slot: u32,
    pub counters: Counters,
    /// Flow-table entries pinned to this backend that saw a packet in the last
    /// `ACTIVE_FLOW_WINDOW` (the table is an LRU: finished flows linger until evicted); from a
    /// walk of the flow table (`with_flows`), 0 without one.
    pub active_flows: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStats {
    pub key: ServiceKey,
    pub counters: Counters,
    /// Packets its source checks and new-flow limits dropped, by reason.
    pub drops: VipDropCounts,
    pub backends: Vec<BackendStats>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneStats {
    pub vips: Vec<VipStats>,
    /// Packets per outcome, by `lb_common::reason::NAMES`, every reason present (zeros included).
    pub reasons: BTreeMap<String, u64>,
    /// Data-path events by `lb_common::event::NAMES` (mid-flow misses, re-steers, lost sync
    /// events), every event present.
    pub events: BTreeMap<String, u64>,
    pub flow_capacity: u32,
    pub embryo_capacity: u32,
}

impl DataplaneStats {
    /// These counters with each backend's active flows from `flows`.
    pub fn with_flows(mut self, flows: &FlowCounts) -> Self {
        for b in self.vips.iter_mut().flat_map(|v| &mut v.backends) {
            b.active_flows = flows.active_of(b.slot, b.addr);
        }
        self
    }
}

impl Dataplane {
    /// Per-reason packet counters (`lb_common::reason::NAMES`), summed over CPUs.
    pub fn reason_stats(&self) -> Result<BTreeMap<String, u64>, DataplaneError> {
        sum_names(&self.reason_stats, maps::REASON_STATS, &reason::NAMES)
    }

    /// Per-event counters (`lb_common::event::NAMES`), summed over CPUs.
    pub fn event_stats(&self) -> Result<BTreeMap<String, u64>, DataplaneError> {
        sum_names(&self.event_stats, maps::EVENT_STATS, &event::NAMES)
    }

    /// Sum the per-CPU counters of every configured VIP and backend, and the per-reason and
    /// per-event counters (active flows 0: see `stats`).
    pub fn counters(&self) -> Result<DataplaneStats, DataplaneError> {
        let mut vips = Vec::with_capacity(self.installed.len());
        for (key, vip) in &self.installed {
            let mut backends = Vec::with_capacity(vip.backends.len());
            for (addr, id) in &vip.backends {
                backends.push(BackendStats {
                    addr: *addr,
                    slot: *id,
                    counters: sum(&self.backend_stats, maps::BACKEND_STATS, *id)?,
                    active_flows: 0,
                });
            }
            vips.push(VipStats {
                key: *key,
                counters: sum(&self.vip_stats, maps::VIP_STATS, vip.id)?,
                drops: self.vip_drops(vip.id)?,
                backends,
            });
        }
        Ok(DataplaneStats {
            vips,
            reasons: self.reason_stats()?,
            events: self.event_stats()?,
            flow_capacity: self.flow_capacity,
            embryo_capacity: self.embryo_capacity,
        })
    }

    /// `counters` with the active flows of a walk of the flow table made for this call (the
    /// agent takes its walks off its serve loop instead).
    pub fn stats(&self) -> Result<DataplaneStats, DataplaneError> {
        Ok(self.counters()?.with_flows(&self.flow_counts()?))
    }
}

fn sum(
    map: &PerCpuArray<MapData, TrafficCounters>,
    name: &'static str,
    index: u32,
) -> Result<Counters, DataplaneError> {
    let values = map.get(&index, 0).map_err(map_err(name))?;
    Ok(values.iter().fold(Counters::default(), |acc, c| Counters {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
        new_flows: acc.new_flows + c.new_flows,
    }))
}

/// The per-CPU sums of a counter array indexed like `names`.
fn sum_names(
    map: &PerCpuArray<MapData, u64>,
    map_name: &'static str,
    names: &[&str],
) -> Result<BTreeMap<String, u64>, DataplaneError> {
    let mut out = BTreeMap::new();
    for (index, name) in names.iter().enumerate() {
        let values = map.get(&(index as u32), 0).map_err(map_err(map_name))?;
        out.insert(name.to_string(), values.iter().sum());
    }
    Ok(out)
}
