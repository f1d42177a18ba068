//! A data path in memory for tests: what is "in the kernel", with knobs to make operations fail.

use super::DataplaneOps;
use crate::{
    dataplane::{
        BackendStats, Counters, DataplaneStats, DenyCount, FlowCounts, InstallReport, VipStats,
    },
    model::{ServiceKey, VipSpec},
};
use lb_common::{Addr, FlowEvent};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

#[derive(Default)]
pub(crate) struct FakeDataplane {
    /// What is "in the kernel".
    pub(crate) applied: BTreeMap<ServiceKey, VipSpec>,
    /// `check_vip` rejects VIPs with more backends than this.
    pub(crate) max_backends_per_vip: Option<usize>,
    /// The next this-many `apply_vip` calls fail (and change nothing).
    pub(crate) fail_applies: usize,
    pub(crate) fail_remove: bool,
    pub(crate) apply_calls: usize,
    /// The `down` set of every successful `apply_vip`, in order.
    pub(crate) down_log: Vec<(ServiceKey, BTreeSet<IpAddr>)>,
    /// Flows installed from peers, in order.
    pub(crate) flows: Vec<FlowEvent>,
    /// Every `set_vip_debug` call, in order.
    pub(crate) debug_log: Vec<(ServiceKey, bool)>,
    /// Every `set_deny_list` call, in order.
    pub(crate) deny_log: Vec<(u32, DenyCount)>,
    /// The balancer is not attached (`attached()` is false).
    pub(crate) detached: bool,
}

/// The slot a backend gets here: its address's last byte.
pub(crate) fn slot_of(addr: IpAddr) -> u32 {
    u32::from(match addr {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => v6.octets()[15],
    })
}

/// Flow counts as a walk of the fake's table would find them: `per_backend` active flows for
/// every backend applied, and `entries` entries.
pub(crate) fn flow_counts(dp: &FakeDataplane, entries: u64, per_backend: u64) -> FlowCounts {
    let mut counts = FlowCounts {
        entries,
        ..Default::default()
    };
    for b in dp.applied.values().flat_map(|v| &v.backends) {
        counts
            .active
            .insert((slot_of(b.addr), Addr::from(b.addr)), per_backend);
    }
    counts
}

impl FakeDataplane {
    /// The down set the VIP was last applied with.
    pub(crate) fn down(&self, key: &ServiceKey) -> Option<&BTreeSet<IpAddr>> {
        self.down_log
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, d)| d)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct FakeError(&'static str);

impl DataplaneOps for FakeDataplane {
    type Error = FakeError;
    fn installed_vips(&self) -> Vec<ServiceKey> {
        self.applied.keys().copied().collect()
    }
    fn check_vip(&self, spec: &VipSpec) -> Result<(), FakeError> {
        match self.max_backends_per_vip {
            Some(max) if spec.backends.len() > max => Err(FakeError("too many backends")),
            _ => Ok(()),
        }
    }
    fn apply_vip(&mut self, spec: &VipSpec, down: &BTreeSet<IpAddr>) -> Result<(), FakeError> {
        self.apply_calls += 1;
        if self.fail_applies > 0 {
            self.fail_applies -= 1;
            return Err(FakeError("map update failed"));
        }
        self.applied.insert(spec.key, spec.clone());
        self.down_log.push((spec.key, down.clone()));
        Ok(())
    }
    fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), FakeError> {
        if self.fail_remove {
            return Err(FakeError("map delete failed"));
        }
        self.applied
            .remove(key)
            .map(|_| ())
            .ok_or(FakeError("no such VIP"))
    }
    fn counters(&self) -> Result<DataplaneStats, FakeError> {
        Ok(DataplaneStats {
            vips: self
                .applied
                .values()
                .map(|s| VipStats {
                    key: s.key,
                    counters: Counters {
                        packets: 10,
                        bytes: 1000,
                        new_flows: 2,
                    },
                    drops: Default::default(),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| BackendStats {
                            active_flows: 0,
                            addr: b.addr,
                            slot: slot_of(b.addr),
                            counters: Counters {
                                packets: u64::from(slot_of(b.addr)),
                                bytes: 100,
                                new_flows: 1,
                            },
                        })
                        .collect(),
                })
                .collect(),
            reasons: [("fwd_tx".to_string(), 42)].into_iter().collect(),
            events: [("midflow_miss".to_string(), 1)].into_iter().collect(),
            flow_capacity: 1024,
            embryo_capacity: 256,
        })
    }
    fn install_flows(&mut self, flows: Vec<FlowEvent>) -> Result<InstallReport, FakeError> {
        let installed = flows.len() as u64;
        self.flows.extend(flows);
        Ok(InstallReport {
            installed,
            unknown_backend: 0,
        })
    }
    fn set_vip_debug(&mut self, key: &ServiceKey, on: bool) -> Result<(), FakeError> {
        if !self.applied.contains_key(key) {
            return Err(FakeError("no such VIP"));
        }
        self.debug_log.push((*key, on));
        Ok(())
    }
    fn set_deny_list(&mut self, live: u32, count: DenyCount) -> Result<(), FakeError> {
        self.deny_log.push((live, count));
        Ok(())
    }
    fn attached(&self) -> bool {
        !self.detached
    }
}
