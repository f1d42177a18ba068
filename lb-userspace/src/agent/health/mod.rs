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

pub(crate) mod monitor;
pub(crate) mod postgres;
pub(crate) mod probe;
pub(crate) mod selection;
pub(crate) mod tls;

pub(crate) use monitor::Monitor;

use crate::{
    api::BackendState,
    model::{
        ServiceKey, VipConfig,
        check::{CheckKind, CheckSpec},
    },
};
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    time::{Duration, SystemTime},
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum HealthError {
    #[error("cannot set up the HTTP health-check client: {0}")]
    Client(#[from] reqwest::Error),
}

/// HAProxy's rise/fall logic for one backend. A backend starts up (so a restarted agent, or a
/// newly added backend, takes traffic at once); `fall` consecutive failures take it down, `rise`
/// consecutive successes bring it back; a success resets the failure count and vice versa.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RiseFall {
    up: bool,
    successes: u32,
    failures: u32,
}

impl Default for RiseFall {
    fn default() -> Self {
        RiseFall {
            up: true,
            successes: 0,
            failures: 0,
        }
    }
}

impl RiseFall {
    pub(crate) fn is_up(&self) -> bool {
        self.up
    }

    /// Record one check result; `Some(up)` when it changes the state.
    pub(crate) fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
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
}

/// What a check task checks: one backend of one VIP, with one check configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProbeTarget {
    pub(crate) key: ServiceKey,
    pub(crate) addr: Ipv4Addr,
    pub(crate) port: u16,
    pub(crate) check: CheckSpec,
    pub(crate) generation: u64,
}

/// One result, from a task to the controller.
#[derive(Clone, Debug)]
pub(crate) struct CheckReport {
    pub(crate) key: ServiceKey,
    pub(crate) addr: Ipv4Addr,
    pub(crate) generation: u64,
    pub(crate) result: CheckResult,
}

/// A backend's state change, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) key: ServiceKey,
    pub(crate) addr: Ipv4Addr,
    pub(crate) up: bool,
    /// Consecutive checks that caused it.
    pub(crate) count: u32,
    /// The last check's detail (the failure reason when going down).
    pub(crate) reason: String,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.count == 1 { "" } else { "s" };
        if self.up {
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
}

impl Entry {
    fn checked(&self) -> bool {
        self.check.kind != CheckKind::None
    }
    /// Update the shown state (and when it began) after the machine or the weight changed.
    fn reshow(&mut self, now: SystemTime) {
        let shown = BackendState::of(self.machine.is_up(), self.weight);
        if shown != self.shown {
            self.shown = shown;
            self.since = now;
        }
    }
}

/// Health of every backend of every VIP, kept by the controller.
#[derive(Debug, Default)]
pub(crate) struct HealthBook {
    entries: BTreeMap<(ServiceKey, Ipv4Addr), Entry>,
    next_generation: u64,
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
                        self.entries.insert(
                            id,
                            Entry {
                                check,
                                port,
                                weight: b.weight,
                                generation: self.next_generation,
                                machine: RiseFall::default(),
                                last: None,
                                shown: BackendState::of(true, b.weight),
                                since: now,
                                checks_ok: 0,
                                checks_failed: 0,
                            },
                        );
                    }
                }
            }
        }
        self.entries.retain(|id, _| seen.contains(id));
    }

    /// The backends of `vip` (as it is, or as it is about to become) that are down: down now and
    /// still checked under `vip`'s configuration. Backends unknown to the book are up.
    pub(crate) fn down_for(&self, vip: &VipConfig) -> BTreeSet<Ipv4Addr> {
        vip.backends
            .iter()
            .filter(|b| vip.check_of(b).kind != CheckKind::None)
            .filter(|b| {
                self.entries
                    .get(&(vip.key, b.addr))
                    .is_some_and(|e| !e.machine.is_up())
            })
            .map(|b| b.addr)
            .collect()
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
        } else {
            e.checks_failed += 1;
        }
        e.last = Some(report.result);
        let up = e.machine.record(ok, e.check.rise, e.check.fall)?;
        e.reshow(at);
        Some(Transition {
            key: report.key,
            addr: report.addr,
            up,
            count: if up { e.check.rise } else { e.check.fall },
            reason,
        })
    }

    pub(crate) fn status(&self, key: &ServiceKey, addr: Ipv4Addr) -> Option<BackendHealth> {
        self.entries.get(&(*key, addr)).map(|e| BackendHealth {
            state: e.shown,
            since: e.since,
            last: e.last.clone(),
            checks_ok: e.checks_ok,
            checks_failed: e.checks_failed,
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
mod tests {
    use super::*;
    use crate::{
        model::check::CheckPatch,
        model::{BackendConfig, Forward, Proto},
    };

    /// Feed `seq` ('+' pass, '-' fail) and return the state after each step ('U'/'D').
    fn run(seq: &str, rise: u32, fall: u32) -> String {
        let mut m = RiseFall::default();
        seq.chars()
            .map(|c| {
                m.record(c == '+', rise, fall);
                if m.is_up() { 'U' } else { 'D' }
            })
            .collect()
    }

    #[test]
    fn rise_fall_sequences() {
        assert!(RiseFall::default().is_up(), "a new backend starts up");
        // fall 3: three consecutive failures take it down; rise 2: two successes bring it back.
        assert_eq!(run("---++", 2, 3), "UUDDU");
        // A success resets the failure count.
        assert_eq!(run("--+--+---", 2, 3), "UUUUUUUUD");
        // A failure resets the success count while down.
        assert_eq!(run("---+-++", 2, 3), "UUDDDDU");
        // rise 1 / fall 1 follow every result.
        assert_eq!(run("-+-+", 1, 1), "DUDU");
        // More failures while down change nothing.
        assert_eq!(run("------+", 1, 3), "UUDDDDU");
    }

    #[test]
    fn record_reports_transitions_only() {
        let mut m = RiseFall::default();
        assert_eq!(m.record(false, 2, 2), None);
        assert_eq!(m.record(false, 2, 2), Some(false));
        assert_eq!(m.record(false, 2, 2), None);
        assert_eq!(m.record(true, 2, 2), None);
        assert_eq!(m.record(true, 2, 2), Some(true));
        assert_eq!(m.record(true, 2, 2), None);
    }

    fn key() -> ServiceKey {
        ServiceKey {
            addr: Ipv4Addr::new(10, 111, 100, 1),
            port: 80,
            proto: Proto::Tcp,
        }
    }
    fn be(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 111, 1, last)
    }
    fn vip(backends: &[(u8, u32)]) -> VipConfig {
        let mut v = VipConfig::new(key(), Forward::Ipip);
        v.backends = backends
            .iter()
            .map(|&(b, w)| BackendConfig::new(be(b), w))
            .collect();
        v
    }
    fn result(ok: bool, detail: &str) -> CheckResult {
        CheckResult {
            ok,
            detail: detail.into(),
            latency: Duration::from_millis(1),
            at: SystemTime::now(),
        }
    }

    #[test]
    fn book_follows_results_and_config() {
        let mut book = HealthBook::default();
        let v = vip(&[(11, 1), (12, 0)]);
        let t0 = SystemTime::now();
        book.sync([&v], t0);
        assert_eq!(book.status(&key(), be(11)).unwrap().state, BackendState::Up);
        assert_eq!(
            book.status(&key(), be(12)).unwrap().state,
            BackendState::Draining
        );
        let targets = book.targets();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].port, 80);
        let g = targets[0].generation;
        let report = |ok, generation| CheckReport {
            key: key(),
            addr: be(11),
            generation,
            result: result(ok, "connection refused"),
        };
        assert_eq!(book.record(report(false, g)), None);
        assert_eq!(book.record(report(false, g)), None);
        // A stale generation is ignored.
        assert_eq!(book.record(report(false, g + 100)), None);
        let t = book.record(report(false, g)).unwrap();
        assert_eq!(
            t.to_string(),
            "backend 10.111.1.11 of VIP 10.111.100.1:80/tcp is DOWN after 3 failed checks: connection refused"
        );
        assert_eq!(book.down_for(&v), BTreeSet::from([be(11)]));
        let st = book.status(&key(), be(11)).unwrap();
        assert_eq!(st.state, BackendState::Down);
        assert!(st.since >= t0);
        assert_eq!(st.last.unwrap().detail, "connection refused");

        // A changed check (port) keeps the state, restarts the counts with a new generation.
        let mut v2 = v.clone();
        v2.check = v2.check.patched(&CheckPatch {
            port: Some(8080),
            ..Default::default()
        });
        book.sync([&v2], SystemTime::now());
        let t2 = book.targets();
        assert_eq!(t2[0].port, 8080);
        assert_ne!(t2[0].generation, g);
        assert_eq!(book.down_for(&v2), BTreeSet::from([be(11)]));
        assert_eq!(book.record(report(true, t2[0].generation)), None);
        let up = book.record(report(true, t2[0].generation)).unwrap();
        assert_eq!(
            up.to_string(),
            "backend 10.111.1.11 of VIP 10.111.100.1:80/tcp is UP after 2 passed checks"
        );
        assert!(book.down_for(&v2).is_empty());

        // Checks turned off: no targets, nobody down; a removed backend is forgotten.
        let mut off = vip(&[(11, 1)]);
        off.check.kind = CheckKind::None;
        book.sync([&off], SystemTime::now());
        assert!(book.targets().is_empty());
        assert!(book.status(&key(), be(12)).is_none());
    }

    #[test]
    fn check_none_brings_a_down_backend_up() {
        let mut book = HealthBook::default();
        let v = vip(&[(11, 1)]);
        book.sync([&v], SystemTime::now());
        let g = book.targets()[0].generation;
        for _ in 0..3 {
            book.record(CheckReport {
                key: key(),
                addr: be(11),
                generation: g,
                result: result(false, "x"),
            });
        }
        assert_eq!(book.down_for(&v).len(), 1);
        let mut off = v.clone();
        off.check.kind = CheckKind::None;
        // Before the change is committed, the planned config already counts it up.
        assert!(book.down_for(&off).is_empty());
        book.sync([&off], SystemTime::now());
        let st = book.status(&key(), be(11)).unwrap();
        assert_eq!(st.state, BackendState::Up);
        assert!(st.last.is_none());
    }
}
