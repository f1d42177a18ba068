//! Health checking at run time: the rise/fall state machine (`RiseFall`) and the per-backend
//! book the controller keeps (`HealthBook`) here, one probe in `probe`, and the tasks that run
//! the checks in `monitor` (`Monitor`).
//!
//! Division of work: a task per (VIP, backend) only probes, every `interval`, and sends each
//! result over a channel to the task that owns the `Controller`; the controller feeds results to
//! its `HealthBook`, which holds the rise/fall counters, and re-applies the VIP when a backend
//! changes state. So the counters live in one place, the tasks need no shared state, and a slow
//! check never blocks the controller (a task that cannot deliver waits, not the controller).
//!
//! Each check configuration of a backend has a generation number; the monitor restarts a task when
//! it changes and the book drops results of older generations still in the channel.
//!
//! What a VIP's data path gets is more than each backend's own health: `selection` applies the
//! rules that look at a VIP's backends together (never two primaries; backups only while no
//! regular backend can serve). `HealthBook::plan` gives the weights and the down set to apply,
//! `HealthBook::settle` records what was applied (the serving primary, the notes `backend list`
//! shows) and logs a two-primaries conflict once per change.

pub(crate) mod monitor;
pub(crate) mod postgres;
pub(crate) mod probe;
pub(crate) mod selection;
pub(crate) mod tls;

pub(crate) use monitor::Monitor;

use crate::{
    api::BackendState,
    model::{
        ServiceKey, VipConfig, VipSpec,
        check::{CheckKind, CheckSpec, Role},
    },
};
use selection::{Election, Health, Member, Note, Plan};
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    time::{Duration, SystemTime},
};

/// Reads the files `check` names (its CA, its password file) as its check tasks will: the
/// reason if one cannot be used. The password itself goes nowhere.
pub(crate) fn check_files(check: &CheckSpec) -> Result<(), String> {
    if let Some(ca) = &check.tls_ca {
        tls::load_ca(ca).map_err(|e| e.to_string())?;
    }
    if let Some(file) = &check.password_file {
        postgres::read_password(file).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HealthError {
    #[error("cannot set up the HTTP health-check client: {0}")]
    Client(#[from] reqwest::Error),
}

/// HAProxy's rise/fall logic for one backend. A backend starts up (so a restarted agent, or a
/// newly added backend, takes traffic at once); `fall` consecutive failures take it down, `rise`
/// consecutive successes bring it back; a success resets the failure count and vice versa.
///
/// A backend whose check asks for a role (`postgres:primary`, `postgres:replica`) starts
/// pending instead: no new flows until its first check, which alone decides up or down — a
/// replica must never take a write VIP's flows for `fall` checks after a start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RiseFall {
    up: bool,
    pending: bool,
    successes: u32,
    failures: u32,
}

impl Default for RiseFall {
    fn default() -> Self {
        RiseFall {
            up: true,
            pending: false,
            successes: 0,
            failures: 0,
        }
    }
}

impl RiseFall {
    /// Not up, not down: waiting for the first check.
    pub(crate) fn pending() -> Self {
        RiseFall {
            up: false,
            pending: true,
            ..RiseFall::default()
        }
    }

    /// The machine a backend starts with under `check`.
    fn start(check: &CheckSpec) -> Self {
        if role_checked(check) {
            RiseFall::pending()
        } else {
            RiseFall::default()
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up
    }

    fn health(&self) -> Health {
        match (self.pending, self.up) {
            (true, _) => Health::Pending,
            (false, true) => Health::Up,
            (false, false) => Health::Down,
        }
    }

    /// Record one check result; `Some(up)` when it changes the state.
    pub(crate) fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if self.pending {
            self.pending = false;
            self.up = ok;
            if ok {
                self.successes = 1;
            } else {
                self.failures = 1;
            }
            return Some(ok);
        }
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= rise {
                self.up = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= fall {
                self.up = false;
                return Some(false);
            }
        }
        None
    }

    /// A definite answer decides at once, whatever the counts: up or down from now on.
    /// `Some(up)` when that changes the state (or ends pending).
    fn set(&mut self, up: bool) -> Option<bool> {
        let changed = self.pending || self.up != up;
        *self = RiseFall {
            up,
            pending: false,
            successes: u32::from(up),
            failures: u32::from(!up),
        };
        changed.then_some(up)
    }

    /// A backend that starts down: the data path it was taken over from had it out of service.
    pub(crate) fn down() -> Self {
        RiseFall {
            up: false,
            ..RiseFall::default()
        }
    }

    /// Forget the counts but keep the state (the check's configuration changed).
    pub(crate) fn reset_counts(&mut self) {
        self.successes = 0;
        self.failures = 0;
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CheckResult {
    pub(crate) ok: bool,
    /// `connected`, `HTTP 200` when ok; the reason otherwise (`connection refused`, `HTTP 503`,
    /// `timeout after 300ms`, `body does not contain "ok"`).
    pub(crate) detail: String,
    pub(crate) latency: Duration,
    pub(crate) at: SystemTime,
    /// A PostgreSQL primary's timeline, as the check read it.
    pub(crate) timeline: Option<u32>,
    /// The server answered, with the other role than the check asks for.
    pub(crate) wrong_role: bool,
}

/// Whether `check` asks for a server role (the backend then starts pending).
fn role_checked(check: &CheckSpec) -> bool {
    check.kind == CheckKind::Postgres && check.role != Role::Any
}

/// What a check task checks: one backend of one VIP, with one check configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProbeTarget {
    pub(crate) key: ServiceKey,
    pub(crate) addr: IpAddr,
    pub(crate) port: u16,
    pub(crate) check: CheckSpec,
    pub(crate) generation: u64,
}

/// One result, from a task to the controller.
#[derive(Clone, Debug)]
pub(crate) struct CheckReport {
    pub(crate) key: ServiceKey,
    pub(crate) addr: IpAddr,
    pub(crate) generation: u64,
    pub(crate) result: CheckResult,
}

/// A backend's state change, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) key: ServiceKey,
    pub(crate) addr: IpAddr,
    pub(crate) up: bool,
    /// Consecutive checks that caused it.
    pub(crate) count: u32,
    /// The last check's detail (the failure reason when going down).
    pub(crate) reason: String,
    pub(crate) cause: Cause,
}

/// What decided a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    /// `rise` passed or `fall` failed checks in a row.
    Counted,
    /// The first check of a pending backend.
    FirstCheck,
    /// A role check's answer: the other role takes a backend down at once, the wanted role after
    /// that brings it up at once. A role is an answer, not a symptom: rise and fall count failures
    /// to answer (refused, timeout, login), which may be passing trouble.
    Role,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.count == 1 { "" } else { "s" };
        let state = if self.up { "UP" } else { "DOWN" };
        if self.cause == Cause::FirstCheck {
            write!(
                f,
                "backend {} of VIP {} is {state} after its first check: {}",
                self.addr, self.key, self.reason
            )
        } else if self.cause == Cause::Role {
            write!(
                f,
                "backend {} of VIP {} is {state} at once by its role: {}",
                self.addr, self.key, self.reason
            )
        } else if self.up {
            write!(
                f,
                "backend {} of VIP {} is UP after {} passed check{s}",
                self.addr, self.key, self.count
            )
        } else {
            write!(
                f,
                "backend {} of VIP {} is DOWN after {} failed check{s}: {}",
                self.addr, self.key, self.count, self.reason
            )
        }
    }
}

/// A backend's health as reported.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BackendHealth {
    pub(crate) state: BackendState,
    pub(crate) since: SystemTime,
    /// `None` before the first check and for `none` checks.
    pub(crate) last: Option<CheckResult>,
    /// Checks that passed / failed since the backend was added (kept across check changes, so
    /// they behave as Prometheus counters).
    pub(crate) checks_ok: u64,
    pub(crate) checks_failed: u64,
    /// Why it is held down although its checks pass, or what it does as a backup.
    pub(crate) note: Option<Note>,
}

#[derive(Clone, Debug)]
struct Entry {
    check: CheckSpec,
    port: u16,
    weight: u32,
    generation: u64,
    machine: RiseFall,
    last: Option<CheckResult>,
    shown: BackendState,
    since: SystemTime,
    checks_ok: u64,
    checks_failed: u64,
    /// What the VIP's last applied plan said about it.
    note: Option<Note>,
    /// The timeline its last passed PostgreSQL check read (kept while checks fail, so a failing
    /// primary is still told apart by it).
    timeline: Option<u32>,
}

impl Entry {
    fn checked(&self) -> bool {
        self.check.kind != CheckKind::None
    }
    /// Update the shown state (and when it began) after the machine, the weight or the note
    /// changed. A backend held down by its VIP's rules is shown down.
    fn reshow(&mut self, now: SystemTime) {
        let held = self.note.as_ref().is_some_and(Note::holds_down);
        let shown = BackendState::of(self.machine.is_up() && !held, self.weight);
        if shown != self.shown {
            self.shown = shown;
            self.since = now;
        }
    }
}

/// Health of every backend of every VIP, kept by the controller.
#[derive(Debug, Default)]
pub(crate) struct HealthBook {
    entries: BTreeMap<(ServiceKey, IpAddr), Entry>,
    next_generation: u64,
    /// Per VIP with `postgres:primary` checks: the election last applied (its winner is the
    /// incumbent of the next one).
    elections: BTreeMap<ServiceKey, Election>,
}

impl HealthBook {
    /// Follow the desired state: new backends start up, removed ones are forgotten, a changed
    /// check gets a new generation (its counts restart, its state stays; a check turned to
    /// `none` brings the backend up at once).
    pub(crate) fn sync<'a>(
        &mut self,
        vips: impl IntoIterator<Item = &'a VipConfig>,
        now: SystemTime,
    ) {
        let mut seen = BTreeSet::new();
        for vip in vips {
            for b in &vip.backends {
                let id = (vip.key, b.addr);
                seen.insert(id);
                let check = vip.check_of(b).clone();
                let port = check.port.unwrap_or(vip.key.port);
                match self.entries.get_mut(&id) {
                    Some(e) => {
                        if e.check != check || e.port != port {
                            self.next_generation += 1;
                            e.generation = self.next_generation;
                            e.machine.reset_counts();
                            // A role asked for anew: what the old check said proves nothing.
                            let role_asked = role_checked(&check)
                                && (e.check.kind, e.check.role) != (check.kind, check.role);
                            if role_asked {
                                e.machine = RiseFall::pending();
                            }
                            e.check = check;
                            e.port = port;
                            if !e.checked() {
                                e.last = None;
                                if !e.machine.is_up() {
                                    e.machine = RiseFall::default();
                                    log::info!(
                                        "backend {} of VIP {} is UP: its health check is now none",
                                        b.addr,
                                        vip.key
                                    );
                                }
                            }
                        }
                        e.weight = b.weight;
                        e.reshow(now);
                    }
                    None => {
                        self.next_generation += 1;
                        let machine = RiseFall::start(&check);
                        self.entries.insert(
                            id,
                            Entry {
                                check,
                                port,
                                weight: b.weight,
                                generation: self.next_generation,
                                machine,
                                last: None,
                                shown: BackendState::of(machine.is_up(), b.weight),
                                since: now,
                                checks_ok: 0,
                                checks_failed: 0,
                                note: None,
                                timeline: None,
                            },
                        );
                    }
                }
            }
        }
        self.entries.retain(|id, _| seen.contains(id));
        let keys: BTreeSet<ServiceKey> = self.entries.keys().map(|(k, _)| *k).collect();
        self.elections.retain(|k, _| keys.contains(k));
    }

    /// Start these backends down (they were out of service in the data path a restarted agent
    /// took over): checked, they stay down until `rise` checks pass. Unknown or unchecked
    /// backends are left as they are.
    pub(crate) fn start_down(
        &mut self,
        backends: impl IntoIterator<Item = (ServiceKey, IpAddr)>,
        now: SystemTime,
    ) -> usize {
        let mut n = 0;
        for id in backends {
            if let Some(e) = self.entries.get_mut(&id)
                && e.checked()
            {
                e.machine = RiseFall::down();
                e.reshow(now);
                n += 1;
            }
        }
        n
    }

    /// `vip`'s backends (as it is, or as it is about to become) as the selection rules see them:
    /// backends unknown to the book start as a new one would (up, or pending under a role
    /// check), a check of `none` is up.
    fn members(&self, vip: &VipConfig) -> Vec<Member> {
        vip.backends
            .iter()
            .map(|b| {
                let check = vip.check_of(b);
                let entry = self.entries.get(&(vip.key, b.addr));
                let health = match (check.kind, entry) {
                    (CheckKind::None, _) => Health::Up,
                    (_, Some(e)) => e.machine.health(),
                    (_, None) => RiseFall::start(check).health(),
                };
                Member {
                    addr: b.addr,
                    weight: b.weight,
                    backup: b.backup,
                    health,
                    primary_check: check.kind == CheckKind::Postgres && check.role == Role::Primary,
                    reporting: entry.and_then(|e| e.last.as_ref()).is_some_and(|r| r.ok),
                    timeline: entry.and_then(|e| e.timeline),
                }
            })
            .collect()
    }

    /// The election and the plan for `vip`, the last winner being the incumbent.
    fn decide(&self, vip: &VipConfig) -> (Election, Plan) {
        let members = self.members(vip);
        let incumbent = self
            .elections
            .get(&vip.key)
            .and_then(|e| e.winner)
            .map(|(addr, _)| addr);
        let election = selection::elect(&members, incumbent);
        let plan = selection::plan(&members, &election);
        (election, plan)
    }

    /// What the data path gets for `vip`: its spec with the weights the rules give (a standing-by
    /// backup at 0), and the backends that get no new flows and whose flows are re-steered.
    pub(crate) fn plan(&self, vip: &VipConfig) -> (VipSpec, BTreeSet<IpAddr>) {
        let (_, plan) = self.decide(vip);
        let mut spec = vip.spec();
        for b in &mut spec.backends {
            if let Some(w) = plan.weights.get(&b.addr) {
                b.weight = *w;
            }
        }
        (spec, plan.down)
    }

    /// Records that `plan(vip)` is what the data path now has: the serving primary, the notes
    /// for `backend list`. A change in who reports primary is logged, once.
    pub(crate) fn settle(&mut self, vip: &VipConfig, now: SystemTime) {
        let (election, plan) = self.decide(vip);
        for b in &vip.backends {
            if let Some(e) = self.entries.get_mut(&(vip.key, b.addr)) {
                e.note = plan.notes.get(&b.addr).cloned();
                e.reshow(now);
            }
        }
        if !vip.backends.iter().any(|b| {
            let c = vip.check_of(b);
            c.kind == CheckKind::Postgres && c.role == Role::Primary
        }) {
            self.elections.remove(&vip.key);
            return;
        }
        let before = self.elections.insert(vip.key, election.clone());
        let was = before.as_ref().filter(|b| b.conflict());
        match (was, election.conflict()) {
            (_, true)
                if was.map(|b| (&b.primaries, b.winner))
                    != Some((&election.primaries, election.winner)) =>
            {
                let (winner, rule) = election.winner.expect("a conflict has a winner");
                let primaries: Vec<String> = election
                    .primaries
                    .iter()
                    .map(|(a, tl)| match tl {
                        Some(tl) => format!("{a} (timeline {tl})"),
                        None => a.to_string(),
                    })
                    .collect();
                log::warn!(
                    "VIP {}: {} backends report primary: {}; new flows go to {winner} only ({rule}), the others are held down until they are replicas again or removed",
                    vip.key,
                    primaries.len(),
                    primaries.join(", ")
                );
            }
            (Some(_), false) => log::info!(
                "VIP {}: one primary again ({})",
                vip.key,
                election
                    .winner
                    .map_or("none up".to_string(), |(a, _)| a.to_string())
            ),
            _ => {}
        }
    }

    /// Whether more than one backend of `key` reports primary (`None`: no `postgres:primary`
    /// checks there).
    pub(crate) fn primary_conflict(&self, key: &ServiceKey) -> Option<bool> {
        self.elections.get(key).map(Election::conflict)
    }

    /// Feed one result; the transition if it changed the backend's state. Results of a backend
    /// that is gone or of an older check configuration are ignored.
    pub(crate) fn record(&mut self, report: CheckReport) -> Option<Transition> {
        let e = self.entries.get_mut(&(report.key, report.addr))?;
        if e.generation != report.generation || !e.checked() {
            return None;
        }
        let ok = report.result.ok;
        let reason = report.result.detail.clone();
        let at = report.result.at;
        if ok {
            e.checks_ok += 1;
            e.timeline = report.result.timeline.or(e.timeline);
        } else {
            e.checks_failed += 1;
        }
        let was_wrong_role = e.last.as_ref().is_some_and(|r| r.wrong_role);
        let wrong_role = report.result.wrong_role;
        e.last = Some(report.result);
        let cause = if e.machine.health() == Health::Pending {
            Cause::FirstCheck
        } else if wrong_role || (ok && was_wrong_role) {
            Cause::Role
        } else {
            Cause::Counted
        };
        let up = match cause {
            Cause::Counted => e.machine.record(ok, e.check.rise, e.check.fall),
            Cause::FirstCheck | Cause::Role => e.machine.set(ok),
        }?;
        e.reshow(at);
        Some(Transition {
            key: report.key,
            addr: report.addr,
            up,
            count: match (cause, up) {
                (Cause::Counted, true) => e.check.rise,
                (Cause::Counted, false) => e.check.fall,
                _ => 1,
            },
            reason,
            cause,
        })
    }

    pub(crate) fn status(&self, key: &ServiceKey, addr: IpAddr) -> Option<BackendHealth> {
        self.entries.get(&(*key, addr)).map(|e| BackendHealth {
            state: e.shown,
            since: e.since,
            last: e.last.clone(),
            checks_ok: e.checks_ok,
            checks_failed: e.checks_failed,
            note: e.note.clone(),
        })
    }

    /// What the monitor must be checking: every backend whose check is not `none`.
    pub(crate) fn targets(&self) -> Vec<ProbeTarget> {
        self.entries
            .iter()
            .filter(|(_, e)| e.checked())
            .map(|((key, addr), e)| ProbeTarget {
                key: *key,
                addr: *addr,
                port: e.port,
                check: e.check.clone(),
                generation: e.generation,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
