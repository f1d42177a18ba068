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
//!
//! The controller also keeps the backends' health (`HealthBook`): every apply passes the VIP's
//! down backends to the data path, and a health result that changes a backend's state re-applies
//! its VIP. Health is not persisted: after a restart every backend starts up (as in HAProxy), so
//! a restart causes no outage.

use crate::{
    api::{
        BackendReport, LastCheck, Request, Response, StatsReport, VipReport, VipSummary, vip_string,
    },
    check::{CheckKind, CheckPatch},
    dataplane::{BackendStats, Dataplane, DataplaneError, DataplaneStats, InstallReport},
    health::{BackendState, CheckReport, HealthBook, ProbeTarget, unix_ms},
    model::{Forward, ServiceKey, VipConfig, VipSpec},
    state::{self, DesiredState, StateError},
    sync::SyncRequest,
};
use lb_common::FlowEvent;
use std::{
    cell::Cell,
    collections::BTreeSet,
    fmt,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

/// What the controller needs from a data path.
pub trait DataplaneOps {
    type Error: fmt::Display;
    /// Whether `spec` fits, without changing anything.
    fn check_vip(&self, spec: &VipSpec) -> Result<(), Self::Error>;
    /// Install or replace a VIP whose backends in `down` failed their health checks (they get no
    /// new flows and their flows are re-steered); on error nothing has changed.
    fn apply_vip(&mut self, spec: &VipSpec, down: &BTreeSet<Ipv4Addr>) -> Result<(), Self::Error>;
    /// Remove a VIP; on error nothing has changed.
    fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), Self::Error>;
    fn stats(&self) -> Result<DataplaneStats, Self::Error>;
    /// Install flows learned from a peer (pinned by backend address).
    fn install_flows(&mut self, flows: Vec<FlowEvent>) -> Result<InstallReport, Self::Error>;
    /// Flows seen within `max_age`, for a peer's snapshot.
    fn snapshot_flows(&self, max_age: Duration) -> Result<Vec<FlowEvent>, Self::Error>;
    /// Entries in the flow table (one pass over it: callers cache the answer).
    fn flow_entries(&self) -> Result<u64, Self::Error>;
    /// Switch the data path's debug events for one installed VIP on or off (runtime only).
    fn set_vip_debug(&mut self, key: &ServiceKey, on: bool) -> Result<(), Self::Error>;
}

impl DataplaneOps for Dataplane {
    type Error = DataplaneError;
    fn check_vip(&self, spec: &VipSpec) -> Result<(), DataplaneError> {
        Dataplane::check_vip(self, spec)
    }
    fn apply_vip(
        &mut self,
        spec: &VipSpec,
        down: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), DataplaneError> {
        Dataplane::apply_vip(self, spec, down)
    }
    fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        Dataplane::remove_vip(self, key)
    }
    fn stats(&self) -> Result<DataplaneStats, DataplaneError> {
        Dataplane::stats(self)
    }
    fn install_flows(&mut self, flows: Vec<FlowEvent>) -> Result<InstallReport, DataplaneError> {
        Dataplane::install_flows(self, flows)
    }
    fn snapshot_flows(&self, max_age: Duration) -> Result<Vec<FlowEvent>, DataplaneError> {
        Dataplane::snapshot_flows(self, max_age)
    }
    fn flow_entries(&self) -> Result<u64, DataplaneError> {
        // Keys only: one syscall per entry instead of two (no value lookups). An entry evicted
        // while we walk ends or skips the walk; the count is an estimate of a moving LRU anyway.
        Ok(self.flows()?.keys().filter(Result::is_ok).count() as u64)
    }
    fn set_vip_debug(&mut self, key: &ServiceKey, on: bool) -> Result<(), DataplaneError> {
        Dataplane::set_vip_debug(self, key, on)
    }
}

/// How long a counted number of flow-table entries is reused: counting walks the whole table,
/// so scrapes and `xlb stats` in quick succession must not each pay for a walk.
pub const FLOW_ENTRIES_MAX_AGE: Duration = Duration::from_secs(1);

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
    #[error("switching debug events of VIP {key} failed: {message}")]
    Debug { key: ServiceKey, message: String },
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
    health: HealthBook,
    /// VIPs whose re-apply after a health change failed: retried on their next check result.
    retry: BTreeSet<ServiceKey>,
    /// The last count of flow-table entries and when it was taken (`FLOW_ENTRIES_MAX_AGE`). A
    /// `Cell` because reports are built through `&self`.
    flow_entries: Cell<Option<(Instant, u64)>>,
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
            health: HealthBook::default(),
            retry: BTreeSet::new(),
            flow_entries: Cell::new(None),
        };
        for spec in initial.vips() {
            ctl.dp
                .check_vip(&spec.spec())
                .map_err(|e| ControllerError::Capacity {
                    key: spec.key,
                    message: e.to_string(),
                })?;
        }
        let mut applied: Vec<ServiceKey> = Vec::new();
        let mut outcome = Ok(());
        for spec in initial.vips() {
            // Every backend starts up: nothing is down before its first checks.
            if let Err(e) = ctl.dp.apply_vip(&spec.spec(), &BTreeSet::new()) {
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
        ctl.health.sync(ctl.state.vips(), SystemTime::now());
        ctl.log_unchecked_udp(ctl.state.vips().map(|v| v.key).collect());
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
            Request::VipAdd {
                vip,
                forward,
                check,
                icmp_echo,
            } => self
                .vip_add(vip, forward, &check, icmp_echo)
                .map(|()| Response::Done {
                    message: format!(
                        "added VIP {vip} (forward {forward}, check {}{})",
                        self.check_summary(&vip),
                        if icmp_echo { "" } else { ", ICMP echo off" }
                    ),
                }),
            Request::VipSet {
                vip,
                check,
                icmp_echo,
            } => self
                .vip_set(&vip, &check, icmp_echo)
                .map(|()| Response::Done {
                    message: format!(
                        "VIP {vip}: check {}, ICMP echo {}",
                        self.check_summary(&vip),
                        if self.state.get(&vip).is_some_and(|v| v.icmp_echo) {
                            "on"
                        } else {
                            "off"
                        }
                    ),
                }),
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
                check,
            } => self
                .backend_add(&vip, backend, weight, &check)
                .map(|()| Response::Done {
                    message: if check.is_empty() {
                        format!("added backend {backend} (weight {weight}) to VIP {vip}")
                    } else {
                        format!(
                            "added backend {backend} (weight {weight}, own check {}) to VIP {vip}",
                            self.backend_check_summary(&vip, backend)
                        )
                    },
                }),
            Request::BackendSet {
                vip,
                backend,
                weight,
            } => self
                .backend_set_weight(&vip, backend, weight)
                .map(|()| Response::Done {
                    message: format!("backend {backend} of VIP {vip}: weight {weight}"),
                }),
            Request::BackendDrain { vip, backend } => {
                self.backend_drain(&vip, backend).map(|()| Response::Done {
                    message: format!(
                        "draining backend {backend} of VIP {vip}: no new flows, existing flows stay"
                    ),
                })
            }
            Request::BackendUndrain { vip, backend } => {
                self.backend_undrain(&vip, backend)
                    .map(|()| Response::Done {
                        message: format!(
                            "backend {backend} of VIP {vip} takes new flows again (weight {})",
                            self.weight_of(&vip, backend)
                        ),
                    })
            }
            Request::BackendDel { vip, backend } => {
                self.backend_del(&vip, backend).map(|()| Response::Done {
                    message: format!("deleted backend {backend} from VIP {vip}"),
                })
            }
            Request::BackendList { vip } => self
                .backend_list(&vip)
                .map(|vip| Response::BackendList { vip }),
            Request::Stats => self.stats().map(|stats| Response::Stats { stats }),
            // The serve loop answers this when peer sync runs; reaching here means it does not.
            Request::Peers => Ok(Response::Error {
                message: "peer sync is not configured on this agent (start it with --sync-listen)"
                    .to_string(),
            }),
            Request::VipDebug { vip, on } => self.vip_debug(&vip, on).map(|()| Response::Done {
                message: if on {
                    format!(
                        "VIP {vip}: data-path debug events on (they appear in the agent's log, target xlb_ebpf)"
                    )
                } else {
                    format!("VIP {vip}: data-path debug events off")
                },
            }),
        };
        result.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
        })
    }

    pub fn vip_add(
        &mut self,
        key: ServiceKey,
        forward: Forward,
        check: &CheckPatch,
        icmp_echo: bool,
    ) -> Result<(), ControllerError> {
        let spec = VipConfig {
            icmp_echo,
            ..self.state.plan_vip_add(key, forward, check)?
        };
        self.commit(key, None, Some(spec))?;
        self.log_unchecked_udp(vec![key]);
        Ok(())
    }

    /// Debug events for one VIP. Not desired state: nothing is persisted, and a restarted agent
    /// starts with every VIP's events off.
    pub fn vip_debug(&mut self, key: &ServiceKey, on: bool) -> Result<(), ControllerError> {
        if self.state.get(key).is_none() {
            return Err(StateError::UnknownVip(*key).into());
        }
        self.dp
            .set_vip_debug(key, on)
            .map_err(|e| ControllerError::Debug {
                key: *key,
                message: e.to_string(),
            })
    }

    pub fn vip_set(
        &mut self,
        key: &ServiceKey,
        check: &CheckPatch,
        icmp_echo: Option<bool>,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_vip_set(key, check, icmp_echo)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
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
        check: &CheckPatch,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_add(key, addr, weight, check)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub fn backend_del(&mut self, key: &ServiceKey, addr: Ipv4Addr) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_del(key, addr)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub fn backend_set_weight(
        &mut self,
        key: &ServiceKey,
        addr: Ipv4Addr,
        weight: u32,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_set_weight(key, addr, weight)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub fn backend_drain(
        &mut self,
        key: &ServiceKey,
        addr: Ipv4Addr,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_drain(key, addr)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub fn backend_undrain(
        &mut self,
        key: &ServiceKey,
        addr: Ipv4Addr,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_undrain(key, addr)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    /// What the check tasks must be checking now.
    pub fn probe_targets(&self) -> Vec<ProbeTarget> {
        self.health.targets()
    }

    /// Take one health-check result. A state change is logged and its VIP re-applied with the
    /// new down set; if that fails it is logged and retried on the VIP's next result (the data
    /// path keeps the previous ring meanwhile).
    pub fn health_result(&mut self, report: CheckReport) {
        let key = report.key;
        if let Some(t) = self.health.record(report) {
            if t.up {
                log::info!("{t}");
            } else {
                log::warn!("{t}");
            }
            self.retry.insert(key);
        }
        if !self.retry.contains(&key) {
            return;
        }
        let Some(vip) = self.state.get(&key) else {
            self.retry.remove(&key);
            return;
        };
        let down = self.health.down_for(vip);
        match self.dp.apply_vip(&vip.spec(), &down) {
            Ok(()) => {
                self.retry.remove(&key);
            }
            Err(e) => log::error!(
                "re-applying VIP {key} after a health change failed (retrying on its next check): {e}"
            ),
        }
    }

    /// Say so when a UDP VIP has no health check: its backends always count as up.
    fn log_unchecked_udp(&self, keys: Vec<ServiceKey>) {
        for key in keys {
            if let Some(v) = self.state.get(&key)
                && key.proto == crate::model::Proto::Udp
                && v.check.kind == CheckKind::None
            {
                log::info!(
                    "VIP {key} has no health check (the default for UDP: a TCP connect cannot check a UDP service); its backends always count as up"
                );
            }
        }
    }

    fn check_summary(&self, key: &ServiceKey) -> String {
        self.state
            .get(key)
            .map(|v| v.check.summary())
            .unwrap_or_default()
    }

    fn backend_check_summary(&self, key: &ServiceKey, addr: Ipv4Addr) -> String {
        self.state
            .get(key)
            .and_then(|v| {
                v.backends
                    .iter()
                    .find(|b| b.addr == addr)
                    .map(|b| v.check_of(b).summary())
            })
            .unwrap_or_default()
    }

    fn weight_of(&self, key: &ServiceKey, addr: Ipv4Addr) -> u32 {
        self.state
            .get(key)
            .and_then(|v| v.backends.iter().find(|b| b.addr == addr))
            .map_or(0, |b| b.weight)
    }

    pub fn vip_list(&self) -> Vec<VipSummary> {
        self.state.vips().map(VipSummary::from).collect()
    }

    pub fn backend_list(&self, key: &ServiceKey) -> Result<VipReport, ControllerError> {
        let spec = self.state.get(key).ok_or(StateError::UnknownVip(*key))?;
        let stats = self.dp_stats()?;
        Ok(report(spec, &stats, &self.health, SystemTime::now()))
    }

    pub fn stats(&self) -> Result<StatsReport, ControllerError> {
        let stats = self.dp_stats()?;
        Ok(StatsReport {
            vips: self
                .state
                .vips()
                .map(|s| report(s, &stats, &self.health, SystemTime::now()))
                .collect(),
            reasons: stats.reasons.clone(),
            events: stats.events.clone(),
            flow_capacity: stats.flow_capacity,
            flow_entries: self.flow_entries()?,
        })
    }

    /// Flow-table entries, counted at most once per `FLOW_ENTRIES_MAX_AGE`.
    fn flow_entries(&self) -> Result<u64, ControllerError> {
        let now = Instant::now();
        if let Some((at, n)) = self.flow_entries.get()
            && now.duration_since(at) < FLOW_ENTRIES_MAX_AGE
        {
            return Ok(n);
        }
        let n = self.dp.flow_entries().map_err(|e| ControllerError::Stats {
            message: e.to_string(),
        })?;
        self.flow_entries.set(Some((now, n)));
        Ok(n)
    }

    /// Serve a request of the peer-sync tasks: install a peer's flows, or snapshot ours. Errors go
    /// back to the sync task, which logs them and closes that peer's connection.
    pub fn sync_request(&mut self, req: SyncRequest) {
        match req {
            SyncRequest::Install { flows, reply } => {
                let _ = reply.send(self.dp.install_flows(flows).map_err(|e| e.to_string()));
            }
            SyncRequest::Snapshot { max_age, reply } => {
                let _ = reply.send(self.dp.snapshot_flows(max_age).map_err(|e| e.to_string()));
            }
        }
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
        old: Option<VipConfig>,
        new: Option<VipConfig>,
    ) -> Result<(), ControllerError> {
        let mut next = self.state.clone();
        match &new {
            Some(spec) => {
                self.dp
                    .check_vip(&spec.spec())
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
            Some(spec) => self
                .dp
                .apply_vip(&spec.spec(), &self.health.down_for(spec))
                .map_err(|e| ControllerError::Apply {
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
        self.retry.remove(&key);
        self.health.sync(self.state.vips(), SystemTime::now());
        Ok(())
    }

    /// Put VIP `key` back to `old` in the data path after `error`; returns the error to report.
    fn restore(
        &mut self,
        key: ServiceKey,
        old: Option<&VipConfig>,
        error: ControllerError,
    ) -> ControllerError {
        let result = match old {
            Some(spec) => self.dp.apply_vip(&spec.spec(), &self.health.down_for(spec)),
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

fn report(
    spec: &VipConfig,
    stats: &DataplaneStats,
    health: &HealthBook,
    now: SystemTime,
) -> VipReport {
    let vs = stats.vips.iter().find(|v| v.key == spec.key);
    let vip_counters = vs.map(|v| v.counters).unwrap_or_default();
    let backends = spec
        .backends
        .iter()
        .map(|b| {
            // A VIP applied a moment ago may not have counters yet: report zeros then.
            let bs: BackendStats = vs
                .and_then(|v| v.backends.iter().find(|bs| bs.addr == b.addr))
                .cloned()
                .unwrap_or(BackendStats {
                    addr: b.addr,
                    counters: Default::default(),
                    active_flows: 0,
                });
            // Every committed backend is in the book; the fallback only covers a report built
            // between a commit and the book's sync, which the controller never does.
            let h = health.status(&spec.key, b.addr);
            let state = h.as_ref().map_or(
                if b.weight == 0 {
                    BackendState::Draining
                } else {
                    BackendState::Up
                },
                |h| h.state,
            );
            let since = h.as_ref().map_or(now, |h| h.since);
            let (checks_ok, checks_failed) = h
                .as_ref()
                .map_or((0, 0), |h| (h.checks_ok, h.checks_failed));
            let last_check = h.and_then(|h| h.last).map(|r| LastCheck {
                ok: r.ok,
                detail: r.detail,
                latency_ms: r.latency.as_secs_f64() * 1000.0,
                at_unix_ms: unix_ms(r.at),
            });
            BackendReport {
                address: b.addr,
                weight: b.weight,
                state,
                since: humantime::format_rfc3339_millis(since).to_string(),
                since_unix_ms: unix_ms(since),
                last_check,
                active_flows: bs.active_flows,
                packets: bs.counters.packets,
                bytes: bs.counters.bytes,
                new_flows: bs.counters.new_flows,
                checks_ok,
                checks_failed,
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
    use crate::dataplane::{Counters, VipStats};
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
        /// The `down` set of every successful `apply_vip`, in order.
        pub down_log: Vec<(ServiceKey, BTreeSet<Ipv4Addr>)>,
        /// Flows installed from peers, in order.
        pub flows: Vec<FlowEvent>,
        /// Every `set_vip_debug` call, in order.
        pub debug_log: Vec<(ServiceKey, bool)>,
        /// How many times the flow table was "walked" (`flow_entries`).
        pub flow_walks: std::cell::Cell<usize>,
    }

    impl FakeDataplane {
        /// The down set the VIP was last applied with.
        pub fn down(&self, key: &ServiceKey) -> Option<&BTreeSet<Ipv4Addr>> {
            self.down_log
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, d)| d)
        }
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
        fn apply_vip(
            &mut self,
            spec: &VipSpec,
            down: &BTreeSet<Ipv4Addr>,
        ) -> Result<(), FakeError> {
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
                                active_flows: 3,
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
                events: [("midflow_miss".to_string(), 1)].into_iter().collect(),
                flow_capacity: 1024,
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
        fn snapshot_flows(&self, _max_age: Duration) -> Result<Vec<FlowEvent>, FakeError> {
            Ok(self.flows.clone())
        }
        fn flow_entries(&self) -> Result<u64, FakeError> {
            self.flow_walks.set(self.flow_walks.get() + 1);
            Ok(self.flows.len() as u64 + 5)
        }
        fn set_vip_debug(&mut self, key: &ServiceKey, on: bool) -> Result<(), FakeError> {
            if !self.applied.contains_key(key) {
                return Err(FakeError("no such VIP"));
            }
            self.debug_log.push((*key, on));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeDataplane;
    use super::*;
    use crate::{
        check::CheckKind,
        health::CheckResult,
        model::{BackendConfig, BackendSpec, Proto},
        state::STATE_FILE,
    };
    use std::time::Duration;

    fn none() -> CheckPatch {
        CheckPatch::default()
    }

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
            let mem: Vec<VipSpec> = self.ctl.state().vips().map(VipConfig::spec).collect();
            let kernel: Vec<VipSpec> = self.ctl.dataplane().applied.values().cloned().collect();
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
        f.ctl.vip_add(key(80), Forward::L2, &none(), true).unwrap();
        f.ctl.backend_add(&key(80), be(11), 1, &none()).unwrap();
        f.ctl.backend_add(&key(80), be(12), 3, &none()).unwrap();
        f.assert_consistent();
        let spec = f.ctl.state().get(&key(80)).unwrap();
        assert_eq!(
            spec.backends,
            vec![BackendConfig::new(be(11), 1), BackendConfig::new(be(12), 3)]
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
        f.ctl
            .vip_add(key(80), Forward::Ipip, &none(), true)
            .unwrap();
        f.ctl.backend_add(&key(80), be(11), 1, &none()).unwrap();
        let calls = f.ctl.dataplane().apply_calls;

        let cases = [
            (
                Request::VipAdd {
                    vip: key(80),
                    forward: Forward::Ipip,
                    check: none(),
                    icmp_echo: true,
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
                    check: none(),
                },
                "unknown VIP 10.111.100.1:81/tcp",
            ),
            (
                Request::BackendAdd {
                    vip: key(80),
                    backend: be(11),
                    weight: 1,
                    check: none(),
                },
                "backend 10.111.1.11 already exists in VIP 10.111.100.1:80/tcp",
            ),
            (
                Request::BackendAdd {
                    vip: key(80),
                    backend: be(12),
                    weight: 257,
                    check: none(),
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
                    check: none(),
                    icmp_echo: true,
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
        f.ctl
            .vip_add(key(80), Forward::Ipip, &none(), true)
            .unwrap();
        f.ctl.backend_add(&key(80), be(11), 1, &none()).unwrap();
        let e = f.ctl.backend_add(&key(80), be(12), 1, &none()).unwrap_err();
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
        f.ctl
            .vip_add(key(80), Forward::Ipip, &none(), true)
            .unwrap();
        f.ctl.backend_add(&key(80), be(11), 1, &none()).unwrap();
        let old = f.ctl.state().get(&key(80)).unwrap().spec();

        // The apply fails, the old spec is re-applied: the error is the apply's.
        f.ctl.dp.fail_applies = 1;
        let calls = f.ctl.dp.apply_calls;
        let e = f.ctl.backend_add(&key(80), be(12), 1, &none()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "applying VIP 10.111.100.1:80/tcp to the data path failed: map update failed"
        );
        assert_eq!(f.ctl.dp.apply_calls, calls + 2, "old spec re-applied");
        assert_eq!(f.ctl.dp.applied.get(&key(80)), Some(&old));
        f.assert_consistent();

        // The apply and the re-apply fail: both are reported, the desired state is unchanged.
        f.ctl.dp.fail_applies = 2;
        let e = f.ctl.backend_add(&key(80), be(12), 1, &none()).unwrap_err();
        assert!(matches!(e, ControllerError::Rollback { .. }), "{e}");
        assert!(e.to_string().contains("restoring VIP 10.111.100.1:80/tcp"));
        assert_eq!(f.ctl.state().get(&key(80)).map(VipConfig::spec), Some(old));

        // A brand-new VIP that fails to apply has nothing to restore.
        f.ctl.dp.fail_applies = 1;
        let e = f
            .ctl
            .vip_add(key(81), Forward::Ipip, &none(), true)
            .unwrap_err();
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
        f.ctl
            .vip_add(key(80), Forward::Ipip, &none(), true)
            .unwrap();
        f.ctl.backend_add(&key(80), be(11), 1, &none()).unwrap();
        let good = f.ctl.state().clone();

        // Make the state file unwritable: its directory is replaced by a regular file.
        let real = f.ctl.state_path.clone();
        f.ctl.state_path = f.dir.path().join(STATE_FILE).join("x");

        assert!(matches!(
            f.ctl.backend_add(&key(80), be(12), 1, &none()),
            Err(ControllerError::State(StateError::Write { .. }))
        ));
        assert!(
            f.ctl
                .vip_add(key(81), Forward::Ipip, &none(), true)
                .is_err()
        );
        assert!(f.ctl.vip_del(&key(80)).is_err());
        assert_eq!(f.ctl.state(), &good);
        f.ctl.state_path = real;
        f.assert_consistent();
    }

    #[test]
    fn failed_remove_keeps_the_vip() {
        let mut f = Fixture::new(FakeDataplane::default());
        f.ctl
            .vip_add(key(80), Forward::Ipip, &none(), true)
            .unwrap();
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
                icmp_echo: true,
            },
            VipSpec {
                key: key(53),
                forward: Forward::L2,
                backends: vec![],
                icmp_echo: true,
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
    fn icmp_echo_reaches_kernel_file_and_memory() {
        let mut f = Fixture::new(FakeDataplane::default());
        f.ctl
            .vip_add(key(80), Forward::Ipip, &none(), false)
            .unwrap();
        f.ctl
            .vip_add(key(81), Forward::Ipip, &none(), true)
            .unwrap();
        f.assert_consistent();
        assert!(!f.ctl.dataplane().applied[&key(80)].icmp_echo);
        assert!(f.ctl.dataplane().applied[&key(81)].icmp_echo);
        assert_eq!(
            f.ctl.handle(Request::VipSet {
                vip: key(80),
                check: none(),
                icmp_echo: Some(true),
            }),
            Response::Done {
                message: "VIP 10.111.100.1:80/tcp: check tcp, ICMP echo on".into()
            }
        );
        f.assert_consistent();
        assert!(f.ctl.dataplane().applied[&key(80)].icmp_echo);
        assert!(f.on_disk().get(&key(80)).unwrap().icmp_echo);
        // A check change keeps the echo setting.
        f.ctl.vip_set(&key(81), &none(), Some(false)).unwrap();
        let faster = CheckPatch {
            interval: Some(Duration::from_millis(500)),
            timeout: Some(Duration::from_millis(500)),
            ..Default::default()
        };
        f.ctl.vip_set(&key(81), &faster, None).unwrap();
        f.assert_consistent();
        assert!(!f.ctl.dataplane().applied[&key(81)].icmp_echo);
        assert!(!f.ctl.vip_list()[1].icmp_echo);
    }

    #[test]
    fn reports_join_desired_state_and_counters() {
        let mut f = Fixture::new(FakeDataplane::default());
        f.ctl
            .vip_add(key(80), Forward::Ipip, &none(), true)
            .unwrap();
        f.ctl.backend_add(&key(80), be(11), 2, &none()).unwrap();
        f.ctl.backend_add(&key(80), be(12), 1, &none()).unwrap();
        let r = f.ctl.backend_list(&key(80)).unwrap();
        assert_eq!(r.vip, "10.111.100.1:80");
        assert_eq!(r.packets, 10);
        let brief: Vec<_> = r
            .backends
            .iter()
            .map(|b| {
                (
                    b.address,
                    b.weight,
                    b.state,
                    b.active_flows,
                    b.packets,
                    b.bytes,
                    b.new_flows,
                    b.last_check.is_none(),
                )
            })
            .collect();
        assert_eq!(
            brief,
            vec![
                (be(11), 2, BackendState::Up, 3, 11, 100, 1, true),
                (be(12), 1, BackendState::Up, 3, 12, 100, 1, true),
            ]
        );
        assert!(
            r.backends[0].since.ends_with('Z'),
            "{}",
            r.backends[0].since
        );
        assert!(r.backends[0].since_unix_ms > 0);
        let s = f.ctl.stats().unwrap();
        assert_eq!(s.vips.len(), 1);
        assert_eq!(s.reasons.get("fwd_tx"), Some(&42));
        assert_eq!(s.flow_capacity, 1024);
        assert_eq!(s.flow_entries, 5);
        // The table is walked at most once per FLOW_ENTRIES_MAX_AGE.
        let walks = f.ctl.dp.flow_walks.get();
        f.ctl.stats().unwrap();
        f.ctl.stats().unwrap();
        assert_eq!(f.ctl.dp.flow_walks.get(), walks);
        let list = f.ctl.vip_list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].backends.len(), 2);
    }

    /// A VIP on port 80 over be11..be13, checked with fall 2, rise 1 (short sequences).
    fn checked_fixture() -> Fixture {
        let mut f = Fixture::new(FakeDataplane::default());
        let check = CheckPatch {
            rise: Some(1),
            fall: Some(2),
            ..Default::default()
        };
        f.ctl.vip_add(key(80), Forward::Ipip, &check, true).unwrap();
        for b in [11, 12, 13] {
            f.ctl.backend_add(&key(80), be(b), 1, &none()).unwrap();
        }
        f
    }

    /// Feed a check result for `addr` under its current check configuration.
    fn feed(ctl: &mut Controller<FakeDataplane>, addr: Ipv4Addr, ok: bool, detail: &str) {
        let t = ctl
            .probe_targets()
            .into_iter()
            .find(|t| t.addr == addr)
            .expect("a probe target");
        ctl.health_result(CheckReport {
            key: t.key,
            addr,
            generation: t.generation,
            result: CheckResult {
                ok,
                detail: detail.into(),
                latency: Duration::from_micros(1500),
                at: SystemTime::now(),
            },
        });
    }

    fn state_of(ctl: &Controller<FakeDataplane>, addr: Ipv4Addr) -> BackendState {
        let r = ctl.backend_list(&key(80)).unwrap();
        r.backends.iter().find(|b| b.address == addr).unwrap().state
    }

    #[test]
    fn vip_debug_reaches_the_data_path_and_unknown_vips_are_refused() {
        let mut f = checked_fixture();
        let before = f.ctl.state().clone();
        assert!(matches!(
            f.ctl.handle(Request::VipDebug { vip: key(80), on: true }),
            Response::Done { message } if message.contains("debug events on")
        ));
        assert!(matches!(
            f.ctl.handle(Request::VipDebug { vip: key(80), on: false }),
            Response::Done { message } if message.ends_with("debug events off")
        ));
        assert_eq!(
            f.ctl.handle(Request::VipDebug {
                vip: key(81),
                on: true
            }),
            Response::Error {
                message: "unknown VIP 10.111.100.1:81/tcp".into()
            }
        );
        assert_eq!(f.ctl.dp.debug_log, vec![(key(80), true), (key(80), false)]);
        // Runtime only: the desired state (and its file) did not change.
        assert_eq!(f.ctl.state(), &before);
        f.assert_consistent();
    }

    #[test]
    fn check_results_are_counted_per_backend() {
        let mut f = checked_fixture();
        feed(&mut f.ctl, be(12), false, "connection refused");
        feed(&mut f.ctl, be(12), true, "connected");
        feed(&mut f.ctl, be(12), true, "connected");
        feed(&mut f.ctl, be(11), true, "connected");
        let r = f.ctl.stats().unwrap();
        let counts: Vec<_> = r.vips[0]
            .backends
            .iter()
            .map(|b| (b.address, b.checks_ok, b.checks_failed))
            .collect();
        assert_eq!(counts, vec![(be(11), 1, 0), (be(12), 2, 1), (be(13), 0, 0)]);
        // A check change restarts the rise/fall counts, not these counters.
        let faster = CheckPatch {
            interval: Some(Duration::from_millis(500)),
            timeout: Some(Duration::from_millis(100)),
            ..Default::default()
        };
        f.ctl.vip_set(&key(80), &faster, None).unwrap();
        let r = f.ctl.backend_list(&key(80)).unwrap();
        assert_eq!(
            (r.backends[1].checks_ok, r.backends[1].checks_failed),
            (2, 1)
        );
    }

    #[test]
    fn health_changes_reapply_the_vip_with_its_down_set() {
        let mut f = checked_fixture();
        assert_eq!(f.ctl.probe_targets().len(), 3);
        assert_eq!(f.ctl.dp.down(&key(80)), Some(&BTreeSet::new()));
        let calls = f.ctl.dp.apply_calls;

        feed(&mut f.ctl, be(12), false, "connection refused");
        assert_eq!(f.ctl.dp.apply_calls, calls, "one failure is not fall 2");
        assert_eq!(state_of(&f.ctl, be(12)), BackendState::Up);
        feed(&mut f.ctl, be(12), false, "connection refused");
        assert_eq!(f.ctl.dp.apply_calls, calls + 1);
        assert_eq!(f.ctl.dp.down(&key(80)), Some(&BTreeSet::from([be(12)])));
        let r = f.ctl.backend_list(&key(80)).unwrap();
        let b = &r.backends[1];
        assert_eq!(b.state, BackendState::Down);
        let last = b.last_check.as_ref().unwrap();
        assert!(!last.ok);
        assert_eq!(last.detail, "connection refused");
        assert!((last.latency_ms - 1.5).abs() < 1e-9);

        // Another change of the VIP keeps be12 out of the ring.
        f.ctl.backend_set_weight(&key(80), be(11), 3).unwrap();
        assert_eq!(f.ctl.dp.down(&key(80)), Some(&BTreeSet::from([be(12)])));
        f.assert_consistent();

        // rise 1: one success brings it back.
        feed(&mut f.ctl, be(12), true, "connected");
        assert_eq!(f.ctl.dp.down(&key(80)), Some(&BTreeSet::new()));
        assert_eq!(state_of(&f.ctl, be(12)), BackendState::Up);

        // Everything down: the data path gets all three (and drops the VIP's packets).
        for b in [11, 12, 13] {
            feed(&mut f.ctl, be(b), false, "timeout after 1s");
            feed(&mut f.ctl, be(b), false, "timeout after 1s");
        }
        assert_eq!(
            f.ctl.dp.down(&key(80)),
            Some(&BTreeSet::from([be(11), be(12), be(13)]))
        );
    }

    #[test]
    fn a_failed_reapply_is_retried_on_the_next_result() {
        let mut f = checked_fixture();
        feed(&mut f.ctl, be(13), false, "HTTP 503");
        f.ctl.dp.fail_applies = 1;
        feed(&mut f.ctl, be(13), false, "HTTP 503");
        assert_eq!(
            f.ctl.dp.down(&key(80)),
            Some(&BTreeSet::new()),
            "apply failed"
        );
        // No transition, but the pending re-apply is retried.
        feed(&mut f.ctl, be(13), false, "HTTP 503");
        assert_eq!(f.ctl.dp.down(&key(80)), Some(&BTreeSet::from([be(13)])));
        let calls = f.ctl.dp.apply_calls;
        feed(&mut f.ctl, be(13), false, "HTTP 503");
        assert_eq!(f.ctl.dp.apply_calls, calls, "nothing pending any more");
    }

    #[test]
    fn drain_undrain_and_down_wins() {
        let mut f = checked_fixture();
        f.ctl.backend_set_weight(&key(80), be(11), 3).unwrap();
        f.ctl.backend_drain(&key(80), be(11)).unwrap();
        assert_eq!(f.ctl.dp.applied[&key(80)].backends[0].weight, 0);
        assert_eq!(state_of(&f.ctl, be(11)), BackendState::Draining);
        f.assert_consistent();
        assert_eq!(
            f.ctl.handle(Request::BackendDrain {
                vip: key(80),
                backend: be(11)
            }),
            Response::Error {
                message:
                    "backend 10.111.1.11 in VIP 10.111.100.1:80/tcp is already draining (weight 0)"
                        .into()
            }
        );
        // Down wins over draining.
        feed(&mut f.ctl, be(11), false, "connection refused");
        feed(&mut f.ctl, be(11), false, "connection refused");
        assert_eq!(state_of(&f.ctl, be(11)), BackendState::Down);
        feed(&mut f.ctl, be(11), true, "connected");
        assert_eq!(state_of(&f.ctl, be(11)), BackendState::Draining);

        assert!(matches!(
            f.ctl.handle(Request::BackendUndrain {
                vip: key(80),
                backend: be(11)
            }),
            Response::Done { message } if message.ends_with("(weight 3)")
        ));
        assert_eq!(f.ctl.dp.applied[&key(80)].backends[0].weight, 3);
        assert_eq!(state_of(&f.ctl, be(11)), BackendState::Up);
        assert!(matches!(
            f.ctl.backend_undrain(&key(80), be(11)),
            Err(ControllerError::State(StateError::NotDraining { .. }))
        ));
        f.assert_consistent();
        // The drain memory survives the state file.
        f.ctl.backend_drain(&key(80), be(12)).unwrap();
        let disk = f.on_disk();
        let b = &disk.get(&key(80)).unwrap().backends[1];
        assert_eq!((b.weight, b.drained_from), (0, Some(1)));
    }

    #[test]
    fn check_changes_restart_or_stop_the_checks() {
        let mut f = checked_fixture();
        feed(&mut f.ctl, be(12), false, "connection refused");
        feed(&mut f.ctl, be(12), false, "connection refused");
        let before: Vec<u64> = f.ctl.probe_targets().iter().map(|t| t.generation).collect();

        // A new interval: new generations, be12 stays down until its checks pass.
        let faster = CheckPatch {
            interval: Some(Duration::from_millis(200)),
            timeout: Some(Duration::from_millis(100)),
            ..Default::default()
        };
        f.ctl.vip_set(&key(80), &faster, None).unwrap();
        let after = f.ctl.probe_targets();
        assert!(after.iter().all(|t| !before.contains(&t.generation)));
        assert!(
            after
                .iter()
                .all(|t| t.check.interval == Duration::from_millis(200))
        );
        assert_eq!(f.ctl.dp.down(&key(80)), Some(&BTreeSet::from([be(12)])));

        // Checks off: nothing is checked, nothing is down.
        let off = CheckPatch {
            kind: Some(CheckKind::None),
            ..Default::default()
        };
        f.ctl.vip_set(&key(80), &off, None).unwrap();
        assert!(f.ctl.probe_targets().is_empty());
        assert_eq!(f.ctl.dp.down(&key(80)), Some(&BTreeSet::new()));
        assert_eq!(state_of(&f.ctl, be(12)), BackendState::Up);
        let r = f.ctl.backend_list(&key(80)).unwrap();
        assert!(r.backends.iter().all(|b| b.last_check.is_none()));

        // A backend with its own check is checked even when the VIP is not.
        let own = CheckPatch {
            kind: Some(CheckKind::Tcp),
            port: Some(8080),
            ..Default::default()
        };
        f.ctl.backend_add(&key(80), be(14), 1, &own).unwrap();
        let t = f.ctl.probe_targets();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].addr, t[0].port), (be(14), 8080));
        f.assert_consistent();

        // A removed backend's late results are ignored.
        let stale = t[0].clone();
        f.ctl.backend_del(&key(80), be(14)).unwrap();
        let calls = f.ctl.dp.apply_calls;
        for _ in 0..3 {
            f.ctl.health_result(CheckReport {
                key: stale.key,
                addr: stale.addr,
                generation: stale.generation,
                result: CheckResult {
                    ok: false,
                    detail: "x".into(),
                    latency: Duration::ZERO,
                    at: SystemTime::now(),
                },
            });
        }
        assert_eq!(f.ctl.dp.apply_calls, calls);
    }

    #[test]
    fn bad_checks_and_weights_change_nothing() {
        let mut f = checked_fixture();
        let calls = f.ctl.dp.apply_calls;
        let cases = [
            (
                Request::VipSet {
                    vip: key(80),
                    check: CheckPatch {
                        timeout: Some(Duration::from_secs(5)),
                        ..Default::default()
                    },
                    icmp_echo: None,
                },
                "VIP 10.111.100.1:80/tcp: check timeout 5s exceeds the interval 1s (a check must end before the next one starts)",
            ),
            (
                Request::VipSet {
                    vip: key(80),
                    check: CheckPatch {
                        rise: Some(0),
                        ..Default::default()
                    },
                    icmp_echo: None,
                },
                "VIP 10.111.100.1:80/tcp: rise must be at least 1",
            ),
            (
                Request::VipSet {
                    vip: key(80),
                    check: none(),
                    icmp_echo: None,
                },
                "VIP 10.111.100.1:80/tcp: nothing to change (give --icmp-echo or at least one check flag)",
            ),
            (
                Request::VipAdd {
                    vip: key(81),
                    forward: Forward::Ipip,
                    check: CheckPatch {
                        fall: Some(0),
                        ..Default::default()
                    },
                    icmp_echo: true,
                },
                "VIP 10.111.100.1:81/tcp: fall must be at least 1",
            ),
            (
                Request::BackendAdd {
                    vip: key(80),
                    backend: be(14),
                    weight: 1,
                    check: CheckPatch {
                        interval: Some(Duration::from_millis(100)),
                        ..Default::default()
                    },
                },
                "backend 10.111.1.14 in VIP 10.111.100.1:80/tcp: check timeout 1s exceeds the interval 100ms (a check must end before the next one starts)",
            ),
            (
                Request::BackendSet {
                    vip: key(80),
                    backend: be(11),
                    weight: 257,
                },
                "weight 257 of backend 10.111.1.11 in VIP 10.111.100.1:80/tcp is above the maximum of 256",
            ),
            (
                Request::BackendSet {
                    vip: key(80),
                    backend: be(19),
                    weight: 1,
                },
                "unknown backend 10.111.1.19 in VIP 10.111.100.1:80/tcp",
            ),
            (
                Request::BackendUndrain {
                    vip: key(80),
                    backend: be(11),
                },
                "backend 10.111.1.11 in VIP 10.111.100.1:80/tcp is not draining (weight 1)",
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
        }
        assert_eq!(f.ctl.dp.apply_calls, calls);
        f.assert_consistent();
    }
}
