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
//! The controller also keeps the backends' health (`HealthBook`): every apply passes what the book
//! plans for the VIP (its down backends, and the weights the backup rule gives) to the data path,
//! then settles it in the book; a health result that changes a backend's state re-applies its
//! VIP. Across a restart health comes back from the data path itself: a backend whose slot the
//! running data path had taken out of service starts down (and its checks take it from there);
//! every other backend, and every backend of a first attach, starts up — except under a role
//! check (`postgres:primary`/`replica`), where a backend starts pending until its first check
//! says which role it has.

use crate::{
    agent::{
        announce::{AnnounceError, NodeView, decide::VipServing},
        health::{Cause, CheckReport, HealthBook, ProbeTarget},
        report::vip_report,
        state::{self, DesiredState, StateError},
    },
    api::{Request, Response, StatsReport, VipReport, VipSummary},
    dataplane::{Dataplane, DataplaneError, DataplaneStats, DenyCount, FlowCounts, InstallReport},
    model::{
        Forward, ServiceKey, VipConfig, VipSpec,
        check::{CheckKind, CheckPatch},
        policy::PolicyPatch,
    },
    util::BoxError,
};
use lb_common::FlowEvent;
use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, sync::Arc, time::SystemTime};

/// What the controller needs from a data path.
pub(crate) trait DataplaneOps {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Whether `spec` fits, without changing anything.
    fn check_vip(&self, spec: &VipSpec) -> Result<(), Self::Error>;
    /// Install or replace a VIP whose backends in `down` failed their health checks (they get no
    /// new flows and their flows are re-steered); on error nothing has changed.
    fn apply_vip(&mut self, spec: &VipSpec, down: &BTreeSet<IpAddr>) -> Result<(), Self::Error>;
    /// Remove a VIP; on error nothing has changed.
    fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), Self::Error>;
    /// The counters, summed (cheap: no walk of the flow table; active flows are 0).
    fn counters(&self) -> Result<DataplaneStats, Self::Error>;
    /// Install flows learned from a peer (pinned by backend address).
    fn install_flows(&mut self, flows: Vec<FlowEvent>) -> Result<InstallReport, Self::Error>;
    /// Switch the data path's debug events for one installed VIP on or off (runtime only).
    fn set_vip_debug(&mut self, key: &ServiceKey, on: bool) -> Result<(), Self::Error>;
    /// The VIPs in the data path now (those of a running data path that was taken over).
    fn installed_vips(&self) -> Vec<ServiceKey>;
    /// Make half `live` of the deny list live, holding `count` entries, and bump the policy
    /// generation (one update).
    fn set_deny_list(&mut self, live: u32, count: DenyCount) -> Result<(), Self::Error>;
    /// Whether the balancer is attached to its interface (steering traffic).
    fn attached(&self) -> bool;
}

impl DataplaneOps for Dataplane {
    type Error = DataplaneError;
    fn check_vip(&self, spec: &VipSpec) -> Result<(), DataplaneError> {
        Dataplane::check_vip(self, spec)
    }
    fn apply_vip(&mut self, spec: &VipSpec, down: &BTreeSet<IpAddr>) -> Result<(), DataplaneError> {
        Dataplane::apply_vip(self, spec, down)
    }
    fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        Dataplane::remove_vip(self, key)
    }
    fn counters(&self) -> Result<DataplaneStats, DataplaneError> {
        Dataplane::counters(self)
    }
    fn install_flows(&mut self, flows: Vec<FlowEvent>) -> Result<InstallReport, DataplaneError> {
        Dataplane::install_flows(self, flows)
    }
    fn set_vip_debug(&mut self, key: &ServiceKey, on: bool) -> Result<(), DataplaneError> {
        Dataplane::set_vip_debug(self, key, on)
    }
    fn installed_vips(&self) -> Vec<ServiceKey> {
        Dataplane::installed_vips(self)
    }
    fn set_deny_list(&mut self, live: u32, count: DenyCount) -> Result<(), DataplaneError> {
        Dataplane::set_deny_list(self, live, count)
    }
    fn attached(&self) -> bool {
        self.mode().is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ControllerError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("VIP {key} does not fit in the data path: {source}")]
    Capacity { key: ServiceKey, source: BoxError },
    #[error("applying VIP {key} to the data path failed: {source}")]
    Apply { key: ServiceKey, source: BoxError },
    #[error("removing VIP {key} from the data path failed: {source}")]
    Remove { key: ServiceKey, source: BoxError },
    #[error("reading data-path counters failed: {source}")]
    Stats { source: BoxError },
    #[error("switching debug events of VIP {key} failed: {source}")]
    Debug { key: ServiceKey, source: BoxError },
    #[error("the deny list is not available on this agent")]
    DenyUnavailable,
    #[error("{source}")]
    DenySwitch { source: BoxError },
    /// The change failed and putting the data path back failed too: the kernel may now differ from
    /// the desired state, which is kept as it was.
    #[error("{error}; restoring VIP {key} in the data path also failed: {rollback}")]
    Rollback {
        key: ServiceKey,
        #[source]
        error: Box<ControllerError>,
        rollback: BoxError,
    },
}

pub(crate) struct Controller<D> {
    dp: D,
    state: DesiredState,
    state_path: PathBuf,
    health: HealthBook,
    /// VIPs whose re-apply after a health change failed: retried on their next check result.
    retry: BTreeSet<ServiceKey>,
    /// The flow table's counts that reports show (walked off the serve loop: `agent::flows`).
    flows: Arc<FlowCounts>,
    /// Flows deleted by `xlb flows flush` so far (counted by `agent::flow_query`).
    flows_flushed: u64,
    /// Entries on the live deny list (`deny_switch`).
    deny_count: DenyCount,
}

impl<D: DataplaneOps> Controller<D> {
    /// Install `initial` into the data path and persist it. The data path may already hold VIPs
    /// (one that was taken over): it is reconciled by difference, never cleared — VIPs it has
    /// and `initial` has not are removed, the others applied over what is there (a VIP keeps its
    /// slots, counters and flows). `down` are the backends it had out of service: they start
    /// down. Every VIP is checked before the first change; if an apply fails, the VIPs this call
    /// added are removed again (those that were there stay).
    pub(crate) fn start(
        dp: D,
        state_path: PathBuf,
        initial: DesiredState,
        down: &BTreeSet<(ServiceKey, IpAddr)>,
    ) -> Result<Self, ControllerError> {
        let mut ctl = Controller {
            dp,
            state: DesiredState::default(),
            state_path,
            health: HealthBook::default(),
            retry: BTreeSet::new(),
            flows: Arc::default(),
            flows_flushed: 0,
            deny_count: DenyCount::default(),
        };
        // The book knows the backends before the first apply, so role-checked ones are pending
        // (no new flows) from the start; every other backend starts up.
        ctl.health.sync(initial.vips(), SystemTime::now());
        for spec in initial.vips() {
            ctl.dp
                .check_vip(&spec.spec())
                .map_err(|e| ControllerError::Capacity {
                    key: spec.key,
                    source: e.into(),
                })?;
        }
        let present: BTreeSet<ServiceKey> = ctl.dp.installed_vips().into_iter().collect();
        for key in present.iter().filter(|k| initial.get(k).is_none()) {
            ctl.dp
                .remove_vip(key)
                .map_err(|e| ControllerError::Remove {
                    key: *key,
                    source: e.into(),
                })?;
            log::info!(
                "removed VIP {key}: the running data path had it, the desired state has not"
            );
        }
        // Backends the running data path had out of service stay down until checks pass.
        let n = ctl
            .health
            .start_down(down.iter().copied(), SystemTime::now());
        if n > 0 {
            log::info!("{n} backends start down: the running data path had them out of service");
        }
        let mut applied: Vec<ServiceKey> = Vec::new();
        let mut outcome = Ok(());
        for spec in initial.vips() {
            let (planned, held) = ctl.health.plan(spec);
            if let Err(e) = ctl.dp.apply_vip(&planned, &held) {
                outcome = Err(ControllerError::Apply {
                    key: spec.key,
                    source: e.into(),
                });
                break;
            }
            applied.push(spec.key);
        }
        if outcome.is_ok() {
            outcome = state::save(&ctl.state_path, &initial).map_err(ControllerError::from);
        }
        if let Err(e) = outcome {
            for key in applied.iter().rev().filter(|k| !present.contains(k)) {
                if let Err(re) = ctl.dp.remove_vip(key) {
                    log::warn!("removing VIP {key} after a failed start: {re}");
                }
            }
            return Err(e);
        }
        ctl.state = initial;
        let now = SystemTime::now();
        for spec in ctl.state.vips() {
            ctl.health.settle(spec, now);
        }
        ctl.log_unchecked_udp(ctl.state.vips().map(|v| v.key).collect());
        Ok(ctl)
    }

    /// Make `next` the desired state by difference (`xlb reload`, SIGHUP): VIPs added, removed
    /// and changed one by one, each validated, applied and persisted like a CLI change; the rest
    /// untouched (their flows and counters too). Every VIP of `next` is checked first, so an
    /// invalid file changes nothing. The summary, in one line.
    pub(crate) fn reload(&mut self, next: &DesiredState) -> Result<String, ControllerError> {
        let diff = self.state.diff(next);
        for key in diff.added.iter().chain(&diff.changed) {
            let spec = next.get(key).expect("diff keys come from next");
            self.dp
                .check_vip(&spec.spec())
                .map_err(|e| ControllerError::Capacity {
                    key: *key,
                    source: e.into(),
                })?;
        }
        for key in &diff.removed {
            let old = self.state.get(key).cloned();
            self.commit(*key, old, None)?;
        }
        for key in diff.added.iter().chain(&diff.changed) {
            let old = self.state.get(key).cloned();
            self.commit(*key, old, next.get(key).cloned())?;
        }
        self.log_unchecked_udp(diff.added.clone());
        Ok(diff.summary())
    }

    pub(crate) fn state(&self) -> &DesiredState {
        &self.state
    }

    #[cfg(test)]
    pub(crate) fn dataplane(&self) -> &D {
        &self.dp
    }

    /// The data path itself (the agent swaps the program in and detaches through it).
    pub(crate) fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// Answer one protocol request. Errors become `Response::Error` with a one-line message.
    pub(crate) fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::VipList => Ok(Response::VipList {
                vips: self.vip_list(),
            }),
            Request::BackendList { vip } => self
                .backend_list(&vip)
                .map(|vip| Response::BackendList { vip }),
            Request::Stats => self.stats().map(|stats| Response::Stats { stats }),
            // The serve loop answers this when peer sync runs; reaching here means it does not.
            Request::Peers => Ok(Response::Error {
                message: "peer sync is not configured on this agent (start it with --sync-listen)"
                    .to_string(),
            }),
            // The connection tasks answer these with walks of their own (`agent::flow_query`);
            // the controller has no handle to walk the table with.
            Request::FlowList { .. } | Request::FlowCount { .. } | Request::FlowFlush { .. } => {
                Ok(Response::Error {
                    message: "flow queries are answered off the serve loop".to_string(),
                })
            }
            // The serve loop answers these when route announcement runs.
            Request::NodeDrain | Request::NodeUndrain | Request::NodeStatus => {
                Ok(Response::Error {
                    message: AnnounceError::Off.to_string(),
                })
            }
            change => self
                .change(change)
                .map(|message| Response::Done { message }),
        };
        result.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
        })
    }

    /// Apply a request that changes something; what it did, for the operator.
    fn change(&mut self, req: Request) -> Result<String, ControllerError> {
        Ok(match req {
            Request::VipAdd {
                vip,
                forward,
                check,
                icmp_echo,
                policy,
            } => {
                self.vip_add(vip, forward, &check, icmp_echo, &policy)?;
                let check = self.check_summary(&vip);
                let echo = if icmp_echo { "" } else { ", ICMP echo off" };
                let policy = match self.policy_summary(&vip) {
                    p if p == "-" => String::new(),
                    p => format!(", sources {p}"),
                };
                format!("added VIP {vip} (forward {forward}, check {check}{echo}{policy})")
            }
            Request::VipSet {
                vip,
                check,
                icmp_echo,
                policy,
            } => {
                self.vip_set(&vip, &check, icmp_echo, &policy)?;
                let echo = if self.state.get(&vip).is_some_and(|v| v.icmp_echo) {
                    "on"
                } else {
                    "off"
                };
                format!(
                    "VIP {vip}: check {}, ICMP echo {echo}, sources {}",
                    self.check_summary(&vip),
                    self.policy_summary(&vip)
                )
            }
            Request::VipDel { vip } => {
                self.vip_del(&vip)?;
                format!("deleted VIP {vip}")
            }
            Request::BackendAdd {
                vip,
                backend,
                weight,
                backup,
                check,
            } => {
                self.backend_add(&vip, backend, weight, backup, &check)?;
                let role = if backup { "backup, " } else { "" };
                if check.is_empty() {
                    format!("added backend {backend} ({role}weight {weight}) to VIP {vip}")
                } else {
                    let own = self.backend_check_summary(&vip, backend);
                    format!(
                        "added backend {backend} ({role}weight {weight}, own check {own}) to VIP {vip}"
                    )
                }
            }
            Request::BackendSet {
                vip,
                backend,
                weight,
            } => {
                self.backend_set_weight(&vip, backend, weight)?;
                format!("backend {backend} of VIP {vip}: weight {weight}")
            }
            Request::BackendDrain { vip, backend } => {
                self.backend_drain(&vip, backend)?;
                format!(
                    "draining backend {backend} of VIP {vip}: no new flows, existing flows stay"
                )
            }
            Request::BackendUndrain { vip, backend } => {
                self.backend_undrain(&vip, backend)?;
                let weight = self.weight_of(&vip, backend);
                format!("backend {backend} of VIP {vip} takes new flows again (weight {weight})")
            }
            Request::BackendDel { vip, backend } => {
                self.backend_del(&vip, backend)?;
                format!("deleted backend {backend} from VIP {vip}")
            }
            Request::VipDebug { vip, on: true } => {
                self.vip_debug(&vip, true)?;
                format!(
                    "VIP {vip}: data-path debug events on (they appear in the agent's log, target xlb_ebpf)"
                )
            }
            Request::VipDebug { vip, on: false } => {
                self.vip_debug(&vip, false)?;
                format!("VIP {vip}: data-path debug events off")
            }
            Request::VipList
            | Request::BackendList { .. }
            | Request::Stats
            | Request::Peers
            | Request::FlowList { .. }
            | Request::FlowCount { .. }
            | Request::FlowFlush { .. }
            | Request::NodeDrain
            | Request::NodeUndrain
            | Request::NodeStatus => {
                unreachable!("queries are answered by handle")
            }
            Request::Reload | Request::Detach { .. } => {
                unreachable!("the serve loop answers reload and detach")
            }
            Request::DenyAdd { .. }
            | Request::DenyDel { .. }
            | Request::DenyList
            | Request::DenyLoad { .. } => {
                return Err(ControllerError::DenyUnavailable);
            }
        })
    }

    pub(crate) fn vip_add(
        &mut self,
        key: ServiceKey,
        forward: Forward,
        check: &CheckPatch,
        icmp_echo: bool,
        policy: &PolicyPatch,
    ) -> Result<(), ControllerError> {
        let spec = VipConfig {
            icmp_echo,
            ..self.state.plan_vip_add(key, forward, check, policy)?
        };
        self.commit(key, None, Some(spec))?;
        self.log_unchecked_udp(vec![key]);
        Ok(())
    }

    /// Debug events for one VIP. Not desired state: nothing is persisted, and a restarted agent
    /// starts with every VIP's events off.
    pub(crate) fn vip_debug(&mut self, key: &ServiceKey, on: bool) -> Result<(), ControllerError> {
        if self.state.get(key).is_none() {
            return Err(StateError::UnknownVip(*key).into());
        }
        self.dp
            .set_vip_debug(key, on)
            .map_err(|e| ControllerError::Debug {
                key: *key,
                source: e.into(),
            })
    }

    pub(crate) fn vip_set(
        &mut self,
        key: &ServiceKey,
        check: &CheckPatch,
        icmp_echo: Option<bool>,
        policy: &PolicyPatch,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_vip_set(key, check, icmp_echo, policy)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub(crate) fn vip_del(&mut self, key: &ServiceKey) -> Result<(), ControllerError> {
        let old = self.state.plan_vip_del(key)?.clone();
        self.commit(*key, Some(old), None)
    }

    pub(crate) fn backend_add(
        &mut self,
        key: &ServiceKey,
        addr: IpAddr,
        weight: u32,
        backup: bool,
        check: &CheckPatch,
    ) -> Result<(), ControllerError> {
        let new = self
            .state
            .plan_backend_add(key, addr, weight, backup, check)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub(crate) fn backend_del(
        &mut self,
        key: &ServiceKey,
        addr: IpAddr,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_del(key, addr)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub(crate) fn backend_set_weight(
        &mut self,
        key: &ServiceKey,
        addr: IpAddr,
        weight: u32,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_set_weight(key, addr, weight)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub(crate) fn backend_drain(
        &mut self,
        key: &ServiceKey,
        addr: IpAddr,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_drain(key, addr)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    pub(crate) fn backend_undrain(
        &mut self,
        key: &ServiceKey,
        addr: IpAddr,
    ) -> Result<(), ControllerError> {
        let new = self.state.plan_backend_undrain(key, addr)?;
        let old = self.state.get(key).cloned();
        self.commit(*key, old, Some(new))
    }

    /// What the check tasks must be checking now.
    pub(crate) fn probe_targets(&self) -> Vec<ProbeTarget> {
        self.health.targets()
    }

    /// What route announcement decides on: whether the data path is attached, and per VIP the
    /// backends that may take new flows as the data path has them (weight above 0 and not down:
    /// a backup counts while it serves, a standing-by one does not).
    pub(crate) fn node_view(&self) -> NodeView {
        NodeView {
            attached: self.dp.attached(),
            vips: self
                .state
                .vips()
                .map(|v| {
                    let (spec, down) = self.health.plan(v);
                    let serving = spec
                        .backends
                        .iter()
                        .filter(|b| b.weight > 0 && !down.contains(&b.addr))
                        .count();
                    VipServing {
                        key: v.key,
                        serving: u32::try_from(serving).unwrap_or(u32::MAX),
                    }
                })
                .collect(),
        }
    }

    /// Take one health-check result. A state change is logged and its VIP re-applied with the
    /// new down set; if that fails it is logged and retried on the VIP's next result (the data
    /// path keeps the previous ring meanwhile).
    pub(crate) fn health_result(&mut self, report: CheckReport) {
        let key = report.key;
        if let Some(t) = self.health.record(report) {
            // A check that finds the other role is the normal state of a role-checked VIP (a
            // replica behind the write VIP) or a failover going as planned, not an alarm.
            if t.up || t.cause != Cause::Counted {
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
        let (planned, down) = self.health.plan(vip);
        match self.dp.apply_vip(&planned, &down) {
            Ok(()) => {
                self.retry.remove(&key);
                let vip = vip.clone();
                self.health.settle(&vip, SystemTime::now());
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

    fn policy_summary(&self, key: &ServiceKey) -> String {
        self.state
            .get(key)
            .map(|v| v.policy.summary())
            .unwrap_or_default()
    }

    fn backend_check_summary(&self, key: &ServiceKey, addr: IpAddr) -> String {
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

    fn weight_of(&self, key: &ServiceKey, addr: IpAddr) -> u32 {
        self.state
            .get(key)
            .and_then(|v| v.backends.iter().find(|b| b.addr == addr))
            .map_or(0, |b| b.weight)
    }

    pub(crate) fn vip_list(&self) -> Vec<VipSummary> {
        self.state.vips().map(VipSummary::from).collect()
    }

    /// The flow table's counts, and the flows flushed so far, that the next reports show.
    pub(crate) fn set_flow_counts(&mut self, flows: Arc<FlowCounts>, flushed: u64) {
        self.flows = flows;
        self.flows_flushed = flushed;
    }

    /// Make half `live` of the deny list live with `count` entries (for the deny list's
    /// thread, through the serve loop); reports show the count from then on.
    pub(crate) fn deny_switch(
        &mut self,
        live: u32,
        count: DenyCount,
    ) -> Result<(), ControllerError> {
        self.dp
            .set_deny_list(live, count)
            .map_err(|e| ControllerError::DenySwitch { source: e.into() })?;
        self.deny_count = count;
        Ok(())
    }

    /// The deny list installed at start holds `count` entries.
    pub(crate) fn set_deny_count(&mut self, count: DenyCount) {
        self.deny_count = count;
    }

    pub(crate) fn backend_list(&self, key: &ServiceKey) -> Result<VipReport, ControllerError> {
        let spec = self.state.get(key).ok_or(StateError::UnknownVip(*key))?;
        let stats = self.dp_stats()?;
        Ok(vip_report(spec, &stats, &self.health, SystemTime::now()))
    }

    pub(crate) fn stats(&self) -> Result<StatsReport, ControllerError> {
        let stats = self.dp_stats()?;
        Ok(StatsReport {
            vips: self
                .state
                .vips()
                .map(|s| vip_report(s, &stats, &self.health, SystemTime::now()))
                .collect(),
            reasons: stats.reasons.clone(),
            events: stats.events.clone(),
            flow_capacity: stats.flow_capacity,
            flow_entries: self.flows.entries,
            flows_flushed: self.flows_flushed,
            embryonic_capacity: stats.embryo_capacity,
            embryonic_entries: self.flows.embryos,
            deny_list: self.deny_count.total() as u64,
            deny_hosts: self.deny_count.hosts as u64,
            deny_ipv6: self.deny_count.nets6 as u64,
            node: None,
        })
    }

    /// Install flows a peer sent (at most a frame's worth: a bounded number of map updates). An
    /// error goes back to the sync task, which logs it.
    pub(crate) fn install_flows(
        &mut self,
        flows: Vec<FlowEvent>,
    ) -> Result<InstallReport, D::Error> {
        self.dp.install_flows(flows)
    }

    /// The data path's counters with the active flows of the last walk.
    fn dp_stats(&self) -> Result<DataplaneStats, ControllerError> {
        Ok(self
            .dp
            .counters()
            .map_err(|e| ControllerError::Stats { source: e.into() })?
            .with_flows(&self.flows))
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
                state::check_new_files(spec, old.as_ref())?;
                self.dp
                    .check_vip(&spec.spec())
                    .map_err(|e| ControllerError::Capacity {
                        key,
                        source: e.into(),
                    })?;
                next.insert(spec.clone());
            }
            None => {
                next.remove(&key);
            }
        }

        let applied = match &new {
            Some(spec) => {
                let (planned, down) = self.health.plan(spec);
                self.dp
                    .apply_vip(&planned, &down)
                    .map_err(|e| ControllerError::Apply {
                        key,
                        source: e.into(),
                    })
            }
            None => self
                .dp
                .remove_vip(&key)
                .map_err(|e| ControllerError::Remove {
                    key,
                    source: e.into(),
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
        let now = SystemTime::now();
        self.health.sync(self.state.vips(), now);
        if let Some(spec) = &new {
            self.health.settle(spec, now);
        }
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
            Some(spec) => {
                let (planned, down) = self.health.plan(spec);
                self.dp.apply_vip(&planned, &down)
            }
            None => self.dp.remove_vip(&key),
        };
        match result {
            Ok(()) => error,
            Err(e) => ControllerError::Rollback {
                key,
                error: Box::new(error),
                rollback: e.into(),
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
