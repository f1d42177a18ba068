//! Turns requests into changes of desired state, in an order that never leaves the three copies
//! of it (memory, kernel maps, state file) disagreeing after an error:
//!
//! 1. plan + validate everything (`state::DesiredState::plan_*`, `DataplaneOps::check_vip`);
//! 2. apply to the data path;
//! 3. persist the whole new state atomically;
//! 4. only then commit it in memory.
//!
//! If 2 or 3 fails, the data path is put back to the old VIP (re-applied, or the new one removed)
//! and the request fails with a message naming the problem. The controller is generic over
//! `DataplaneOps`, so all of this is tested without a kernel.

use crate::{
    api::{BackendReport, Request, Response, StatsReport, VipReport, VipSummary, vip_string},
    dataplane::{Counters, Dataplane, DataplaneError, DataplaneStats},
    model::{Forward, ServiceKey, VipSpec},
    state::{self, DesiredState, StateError},
};
use std::{fmt, net::Ipv4Addr, path::PathBuf};

/// What the controller needs from a data path.
pub trait DataplaneOps {
    type Error: fmt::Display;
    /// Whether `spec` fits, without changing anything.
    fn check_vip(&self, spec: &VipSpec) -> Result<(), Self::Error>;
    /// Install or replace a VIP; on error nothing has changed.
    fn apply_vip(&mut self, spec: &VipSpec) -> Result<(), Self::Error>;
    /// Remove a VIP; on error nothing has changed.
    fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), Self::Error>;
    fn stats(&self) -> Result<DataplaneStats, Self::Error>;
}

impl DataplaneOps for Dataplane {
    type Error = DataplaneError;
    fn check_vip(&self, spec: &VipSpec) -> Result<(), DataplaneError> {
        Dataplane::check_vip(self, spec)
    }
    fn apply_vip(&mut self, spec: &VipSpec) -> Result<(), DataplaneError> {
        // Health checks are not wired in yet: every backend counts as up.
        Dataplane::apply_vip(self, spec, &std::collections::BTreeSet::new())
    }
    fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        Dataplane::remove_vip(self, key)
    }
    fn stats(&self) -> Result<DataplaneStats, DataplaneError> {
        Dataplane::stats(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{0}")]
    State(#[from] StateError),
    #[error("VIP {key} does not fit in the data path: {message}")]
    Capacity { key: ServiceKey, message: String },
    #[error("applying VIP {key} to the data path failed: {message}")]
    Apply { key: ServiceKey, message: String },
    #[error("removing VIP {key} from the data path failed: {message}")]
    Remove { key: ServiceKey, message: String },
    #[error("reading data-path counters failed: {message}")]
    Stats { message: String },
    /// The change failed and putting the data path back failed too: the kernel may now differ from
    /// the desired state, which is kept as it was.
    #[error("{error}; restoring VIP {key} in the data path also failed: {rollback}")]
    Rollback {
        key: ServiceKey,
        error: Box<ControllerError>,
        rollback: String,
    },
}

pub struct Controller<D> {
    dp: D,
    state: DesiredState,
    state_path: PathBuf,
}

impl<D: DataplaneOps> Controller<D> {
    /// Install `initial` into the data path and persist it. Every VIP is checked before the first
    /// one is applied; if any apply fails, the ones already applied are removed again.
    pub fn start(
        dp: D,
        state_path: PathBuf,
        initial: DesiredState,
    ) -> Result<Self, ControllerError> {
        let mut ctl = Controller {
            dp,
            state: DesiredState::default(),
            state_path,
        };
        for spec in initial.vips() {
            ctl.dp
                .check_vip(spec)
                .map_err(|e| ControllerError::Capacity {
                    key: spec.key,
                    message: e.to_string(),
                })?;
        }
        let mut applied: Vec<ServiceKey> = Vec::new();
        let mut outcome = Ok(());
        for spec in initial.vips() {
            if let Err(e) = ctl.dp.apply_vip(spec) {
                outcome = Err(ControllerError::Apply {
                    key: spec.key,
                    message: e.to_string(),
                });
                break;
            }
            applied.push(spec.key);
        }
        if outcome.is_ok() {
            outcome = state::save(&ctl.state_path, &initial).map_err(ControllerError::from);
        }
        if let Err(e) = outcome {
            for key in applied.iter().rev() {
                if let Err(re) = ctl.dp.remove_vip(key) {
                    log::warn!("removing VIP {key} after a failed start: {re}");
                }
            }
            return Err(e);
        }
        ctl.state = initial;
        Ok(ctl)
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    /// Answer one protocol request. Errors become `Response::Error` with a one-line message.
    pub fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::VipAdd { vip, forward } => {
                self.vip_add(vip, forward).map(|()| Response::Done {
                    message: format!("added VIP {vip} (forward {forward})"),
                })
            }
            Request::VipDel { vip } => self.vip_del(&vip).map(|()| Response::Done {
                message: format!("deleted VIP {vip}"),
            }),
            Request::VipList => Ok(Response::VipList {
                vips: self.vip_list(),
            }),
            Request::BackendAdd {
                vip,
                backend,
                weight,
            } => self
                .backend_add(&vip, backend, weight)
                .map(|()| Response::Done {
                    message: format!("added backend {backend} (weight {weight}) to VIP {vip}"),
                }),
            Request::BackendDel { vip, backend } => {
                self.backend_del(&vip, backend).map(|()| Response::Done {
                    message: format!("deleted backend {backend} from VIP {vip}"),
                })
            }
            Request::BackendList { vip } => self
                .backend_list(&vip)
                .map(|vip| Response::BackendList { vip }),
            Request::Stats => self.stats().map(|stats| Response::Stats { stats }),
        };
        result.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
        })
    }

    pub fn vip_add(&mut self, key: ServiceKey, forward: Forward) -> Result<(), ControllerError> {
        let spec = self.state.plan_vip_add(key, forward)?;
        self.commit(key, None, Some(spec))
    }

    pub fn vip_del(&mut self, key: &ServiceKey) -> Result<(), ControllerError> {
        let old = self.state.plan_vip_del(key)?.clone();
        self.commit(*key, Some(old), None)
    }

    pub fn backend_add(
        &mut self,
        key: &ServiceKey,
        addr: Ipv4Addr,
        weight: u32,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_add(key, addr, weight)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub fn backend_del(&mut self, key: &ServiceKey, addr: Ipv4Addr) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_del(key, addr)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub fn vip_list(&self) -> Vec<VipSummary> {
        self.state.vips().map(VipSummary::from).collect()
    }

    pub fn backend_list(&self, key: &ServiceKey) -> Result<VipReport, ControllerError> {
        let spec = self.state.get(key).ok_or(StateError::UnknownVip(*key))?;
        let stats = self.dp_stats()?;
        Ok(report(spec, &stats))
    }

    pub fn stats(&self) -> Result<StatsReport, ControllerError> {
        let stats = self.dp_stats()?;
        Ok(StatsReport {
            vips: self.state.vips().map(|s| report(s, &stats)).collect(),
            reasons: stats.reasons.clone(),
            flow_capacity: stats.flow_capacity,
        })
    }

    fn dp_stats(&self) -> Result<DataplaneStats, ControllerError> {
        self.dp.stats().map_err(|e| ControllerError::Stats {
            message: e.to_string(),
        })
    }

    /// Move VIP `key` from `old` to `new` (`None` = absent) in kernel, file and memory, or in none.
    fn commit(
        &mut self,
        key: ServiceKey,
        old: Option<VipSpec>,
        new: Option<VipSpec>,
    ) -> Result<(), ControllerError> {
        let mut next = self.state.clone();
        match &new {
            Some(spec) => {
                self.dp
                    .check_vip(spec)
                    .map_err(|e| ControllerError::Capacity {
                        key,
                        message: e.to_string(),
                    })?;
                next.insert(spec.clone());
            }
            None => {
                next.remove(&key);
            }
        }

        let applied = match &new {
            Some(spec) => self.dp.apply_vip(spec).map_err(|e| ControllerError::Apply {
                key,
                message: e.to_string(),
            }),
            None => self
                .dp
                .remove_vip(&key)
                .map_err(|e| ControllerError::Remove {
                    key,
                    message: e.to_string(),
                }),
        };
        if let Err(error) = applied {
            // The data path promises a failed apply/remove changed nothing, but re-installing the
            // old VIP is cheap insurance against a half-written ring. A brand-new VIP that failed
            // to apply has nothing to restore.
            return Err(match &old {
                Some(old) => self.restore(key, Some(old), error),
                None => error,
            });
        }

        if let Err(error) = state::save(&self.state_path, &next) {
            return Err(self.restore(key, old.as_ref(), error.into()));
        }
        self.state = next;
        Ok(())
    }

    /// Put VIP `key` back to `old` in the data path after `error`; returns the error to report.
    fn restore(
        &mut self,
        key: ServiceKey,
        old: Option<&VipSpec>,
        error: ControllerError,
    ) -> ControllerError {
        let result = match old {
            Some(spec) => self.dp.apply_vip(spec),
            None => self.dp.remove_vip(&key),
        };
        match result {
            Ok(()) => error,
            Err(e) => ControllerError::Rollback {
                key,
                error: Box::new(error),
                rollback: e.to_string(),
            },
        }
    }
}

fn report(spec: &VipSpec, stats: &DataplaneStats) -> VipReport {
    let vs = stats.vips.iter().find(|v| v.key == spec.key);
    let vip_counters = vs.map(|v| v.counters).unwrap_or_default();
    let backends = spec
        .backends
        .iter()
        .map(|b| {
            // A VIP applied a moment ago may not have counters yet: report zeros then.
            let c: Counters = vs
                .and_then(|v| v.backends.iter().find(|bs| bs.addr == b.addr))
                .map(|bs| bs.counters)
                .unwrap_or_default();
            BackendReport {
                address: b.addr,
                weight: b.weight,
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
            }
        })
        .collect();
    VipReport {
        vip: vip_string(&spec.key),
        address: spec.key.addr,
        port: spec.key.port,
        proto: spec.key.proto,
        forward: spec.forward,
        packets: vip_counters.packets,
        bytes: vip_counters.bytes,
        new_flows: vip_counters.new_flows,
        backends,
    }
}

/// A data path in memory for tests: what is "in the kernel", with knobs to make operations fail.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use crate::dataplane::{BackendStats, VipStats};
    use std::collections::BTreeMap;

    #[derive(Default)]
    pub struct FakeDataplane {
        /// What is "in the kernel".
        pub applied: BTreeMap<ServiceKey, VipSpec>,
        /// `check_vip` rejects VIPs with more backends than this.
        pub max_backends_per_vip: Option<usize>,
        /// The next this-many `apply_vip` calls fail (and change nothing).
        pub fail_applies: usize,
        pub fail_remove: bool,
        pub apply_calls: usize,
    }

    #[derive(Debug)]
    pub struct FakeError(&'static str);
    impl fmt::Display for FakeError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl DataplaneOps for FakeDataplane {
        type Error = FakeError;
        fn check_vip(&self, spec: &VipSpec) -> Result<(), FakeError> {
            match self.max_backends_per_vip {
                Some(max) if spec.backends.len() > max => Err(FakeError("too many backends")),
                _ => Ok(()),
            }
        }
        fn apply_vip(&mut self, spec: &VipSpec) -> Result<(), FakeError> {
            self.apply_calls += 1;
            if self.fail_applies > 0 {
                self.fail_applies -= 1;
                return Err(FakeError("map update failed"));
            }
            self.applied.insert(spec.key, spec.clone());
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
        fn stats(&self) -> Result<DataplaneStats, FakeError> {
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
                        backends: s
                            .backends
                            .iter()
                            .map(|b| BackendStats {
                                active_flows: 0,
                                addr: b.addr,
                                counters: Counters {
                                    packets: u64::from(b.addr.octets()[3]),
                                    bytes: 100,
                                    new_flows: 1,
                                },
                            })
                            .collect(),
                    })
                    .collect(),
                reasons: [("fwd_tx".to_string(), 42)].into_iter().collect(),
                flow_capacity: 1024,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeDataplane;
    use super::*;
    use crate::{
        model::{BackendSpec, Proto},
        state::STATE_FILE,
    };

    fn key(port: u16) -> ServiceKey {
        ServiceKey {
            addr: Ipv4Addr::new(10, 111, 100, 1),
            port,
            proto: Proto::Tcp,
        }
    }
    fn be(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 111, 1, last)
    }

    struct Fixture {
        dir: tempfile::TempDir,
        ctl: Controller<FakeDataplane>,
    }

    impl Fixture {
        fn new(dp: FakeDataplane) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ctl = Controller::start(dp, dir.path().join(STATE_FILE), DesiredState::default())
                .unwrap();
            Fixture { dir, ctl }
        }
        fn on_disk(&self) -> DesiredState {
            state::load(&self.dir.path().join(STATE_FILE))
                .unwrap()
                .unwrap()
        }
        /// Memory, kernel and file all hold the same VIPs.
        fn assert_consistent(&self) {
            let mem: Vec<&VipSpec> = self.ctl.state().vips().collect();
            let kernel: Vec<&VipSpec> = self.ctl.dataplane().applied.values().collect();
            assert_eq!(mem, kernel, "memory and data path disagree");
            assert_eq!(
                &self.on_disk(),
                self.ctl.state(),
                "memory and file disagree"
            );
        }
    }

    #[test]
    fn changes_reach_kernel_file_and_memory() {
        let mut f = Fixture::new(FakeDataplane::default());
        f.ctl.vip_add(key(80), Forward::L2).unwrap();
        f.ctl.backend_add(&key(80), be(11), 1).unwrap();
        f.ctl.backend_add(&key(80), be(12), 3).unwrap();
        f.assert_consistent();
        let spec = f.ctl.state().get(&key(80)).unwrap();
        assert_eq!(
            spec.backends,
            vec![
                BackendSpec {
                    addr: be(11),
                    weight: 1
                },
                BackendSpec {
                    addr: be(12),
                    weight: 3
                }
            ]
        );
        f.ctl.backend_del(&key(80), be(11)).unwrap();
        f.assert_consistent();
        assert_eq!(f.ctl.state().get(&key(80)).unwrap().backends.len(), 1);
        f.ctl.vip_del(&key(80)).unwrap();
        f.assert_consistent();
        assert_eq!(f.ctl.state().vip_count(), 0);
    }

    #[test]
    fn invalid_requests_change_nothing() {
        let mut f = Fixture::new(FakeDataplane::default());
        f.ctl.vip_add(key(80), Forward::Ipip).unwrap();
        f.ctl.backend_add(&key(80), be(11), 1).unwrap();
        let calls = f.ctl.dataplane().apply_calls;

        let cases = [
            (
                Request::VipAdd {
                    vip: key(80),
                    forward: Forward::Ipip,
                },
                "VIP 10.111.100.1:80/tcp already exists",
            ),
            (
                Request::VipDel { vip: key(81) },
                "unknown VIP 10.111.100.1:81/tcp",
            ),
            (
                Request::BackendAdd {
                    vip: key(81),
                    backend: be(12),
                    weight: 1,
                },
                "unknown VIP 10.111.100.1:81/tcp",
            ),
            (
                Request::BackendAdd {
                    vip: key(80),
                    backend: be(11),
                    weight: 1,
                },
                "backend 10.111.1.11 already exists in VIP 10.111.100.1:80/tcp",
            ),
            (
                Request::BackendAdd {
                    vip: key(80),
                    backend: be(12),
                    weight: 257,
                },
                "weight 257 of backend 10.111.1.12 in VIP 10.111.100.1:80/tcp is above the maximum of 256",
            ),
            (
                Request::BackendDel {
                    vip: key(80),
                    backend: be(13),
                },
                "unknown backend 10.111.1.13 in VIP 10.111.100.1:80/tcp",
            ),
            (
                Request::VipAdd {
                    vip: key(0),
                    forward: Forward::Ipip,
                },
                "VIP 10.111.100.1:0/tcp: port 0 is not a valid port",
            ),
            (
                Request::BackendList { vip: key(81) },
                "unknown VIP 10.111.100.1:81/tcp",
            ),
        ];
        for (req, message) in cases {
            let before = f.ctl.state().clone();
            assert_eq!(
                f.ctl.handle(req),
                Response::Error {
                    message: message.to_string()
                }
            );
            assert_eq!(f.ctl.state(), &before);
            f.assert_consistent();
        }
        assert_eq!(f.ctl.dataplane().apply_calls, calls, "nothing was applied");
    }

    #[test]
    fn capacity_errors_come_from_the_data_path() {
        let mut f = Fixture::new(FakeDataplane {
            max_backends_per_vip: Some(1),
            ..Default::default()
        });
        f.ctl.vip_add(key(80), Forward::Ipip).unwrap();
        f.ctl.backend_add(&key(80), be(11), 1).unwrap();
        let e = f.ctl.backend_add(&key(80), be(12), 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VIP 10.111.100.1:80/tcp does not fit in the data path: too many backends"
        );
        assert_eq!(f.ctl.state().get(&key(80)).unwrap().backends.len(), 1);
        f.assert_consistent();
    }

    #[test]
    fn failed_apply_restores_the_old_vip() {
        let mut f = Fixture::new(FakeDataplane::default());
        f.ctl.vip_add(key(80), Forward::Ipip).unwrap();
        f.ctl.backend_add(&key(80), be(11), 1).unwrap();
        let old = f.ctl.state().get(&key(80)).unwrap().clone();

        // The apply fails, the old spec is re-applied: the error is the apply's.
        f.ctl.dp.fail_applies = 1;
        let calls = f.ctl.dp.apply_calls;
        let e = f.ctl.backend_add(&key(80), be(12), 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "applying VIP 10.111.100.1:80/tcp to the data path failed: map update failed"
        );
        assert_eq!(f.ctl.dp.apply_calls, calls + 2, "old spec re-applied");
        assert_eq!(f.ctl.dp.applied.get(&key(80)), Some(&old));
        f.assert_consistent();

        // The apply and the re-apply fail: both are reported, the desired state is unchanged.
        f.ctl.dp.fail_applies = 2;
        let e = f.ctl.backend_add(&key(80), be(12), 1).unwrap_err();
        assert!(matches!(e, ControllerError::Rollback { .. }), "{e}");
        assert!(e.to_string().contains("restoring VIP 10.111.100.1:80/tcp"));
        assert_eq!(f.ctl.state().get(&key(80)), Some(&old));

        // A brand-new VIP that fails to apply has nothing to restore.
        f.ctl.dp.fail_applies = 1;
        let e = f.ctl.vip_add(key(81), Forward::Ipip).unwrap_err();
        assert_eq!(
            e.to_string(),
            "applying VIP 10.111.100.1:81/tcp to the data path failed: map update failed"
        );
        assert!(f.ctl.state().get(&key(81)).is_none());
        f.assert_consistent();
    }

    #[test]
    fn failed_persist_rolls_the_data_path_back() {
        let mut f = Fixture::new(FakeDataplane::default());
        f.ctl.vip_add(key(80), Forward::Ipip).unwrap();
        f.ctl.backend_add(&key(80), be(11), 1).unwrap();
        let good = f.ctl.state().clone();

        // Make the state file unwritable: its directory is replaced by a regular file.
        let real = f.ctl.state_path.clone();
        f.ctl.state_path = f.dir.path().join(STATE_FILE).join("x");

        assert!(matches!(
            f.ctl.backend_add(&key(80), be(12), 1),
            Err(ControllerError::State(StateError::Write { .. }))
        ));
        assert!(f.ctl.vip_add(key(81), Forward::Ipip).is_err());
        assert!(f.ctl.vip_del(&key(80)).is_err());
        assert_eq!(f.ctl.state(), &good);
        f.ctl.state_path = real;
        f.assert_consistent();
    }

    #[test]
    fn failed_remove_keeps_the_vip() {
        let mut f = Fixture::new(FakeDataplane::default());
        f.ctl.vip_add(key(80), Forward::Ipip).unwrap();
        f.ctl.dp.fail_remove = true;
        let e = f.ctl.vip_del(&key(80)).unwrap_err();
        assert!(matches!(
            e,
            ControllerError::Rollback { .. } | ControllerError::Remove { .. }
        ));
        f.ctl.dp.fail_remove = false;
        f.assert_consistent();
        assert!(f.ctl.state().get(&key(80)).is_some());
    }

    #[test]
    fn start_installs_and_persists_initial_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let initial = DesiredState::from_specs([
            VipSpec {
                key: key(80),
                forward: Forward::Ipip,
                backends: vec![BackendSpec {
                    addr: be(11),
                    weight: 1,
                }],
            },
            VipSpec {
                key: key(53),
                forward: Forward::L2,
                backends: vec![],
            },
        ])
        .unwrap();
        let ctl =
            Controller::start(FakeDataplane::default(), path.clone(), initial.clone()).unwrap();
        assert_eq!(ctl.dataplane().applied.len(), 2);
        assert_eq!(state::load(&path).unwrap().unwrap(), initial);

        // A VIP that does not fit stops the start before anything is applied.
        let dp = FakeDataplane {
            max_backends_per_vip: Some(0),
            ..Default::default()
        };
        let e = Controller::start(dp, dir.path().join("other.json"), initial).err();
        assert!(matches!(e, Some(ControllerError::Capacity { .. })));
        assert!(!dir.path().join("other.json").exists());
    }

    #[test]
    fn reports_join_desired_state_and_counters() {
        let mut f = Fixture::new(FakeDataplane::default());
        f.ctl.vip_add(key(80), Forward::Ipip).unwrap();
        f.ctl.backend_add(&key(80), be(11), 2).unwrap();
        f.ctl.backend_add(&key(80), be(12), 1).unwrap();
        let r = f.ctl.backend_list(&key(80)).unwrap();
        assert_eq!(r.vip, "10.111.100.1:80");
        assert_eq!(r.packets, 10);
        assert_eq!(
            r.backends,
            vec![
                BackendReport {
                    address: be(11),
                    weight: 2,
                    packets: 11,
                    bytes: 100,
                    new_flows: 1
                },
                BackendReport {
                    address: be(12),
                    weight: 1,
                    packets: 12,
                    bytes: 100,
                    new_flows: 1
                },
            ]
        );
        let s = f.ctl.stats().unwrap();
        assert_eq!(s.vips.len(), 1);
        assert_eq!(s.reasons.get("fwd_tx"), Some(&42));
        assert_eq!(s.flow_capacity, 1024);
        let list = f.ctl.vip_list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].backends.len(), 2);
    }
}
