//! The rise/fall machine and the health book.

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
        addr: IpAddr::from([10, 111, 100, 1]),
        port: 80,
        proto: Proto::Tcp,
    }
}
fn be(last: u8) -> IpAddr {
    IpAddr::from([10, 111, 1, last])
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
        timeline: None,
        wrong_role: false,
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
    assert_eq!(book.plan(&v).1, BTreeSet::from([be(11)]));
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
    assert_eq!(book.plan(&v2).1, BTreeSet::from([be(11)]));
    assert_eq!(book.record(report(true, t2[0].generation)), None);
    let up = book.record(report(true, t2[0].generation)).unwrap();
    assert_eq!(
        up.to_string(),
        "backend 10.111.1.11 of VIP 10.111.100.1:80/tcp is UP after 2 passed checks"
    );
    assert!(book.plan(&v2).1.is_empty());

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
    assert_eq!(book.plan(&v).1.len(), 1);
    let mut off = v.clone();
    off.check.kind = CheckKind::None;
    // Before the change is committed, the planned config already counts it up.
    assert!(book.plan(&off).1.is_empty());
    book.sync([&off], SystemTime::now());
    let st = book.status(&key(), be(11)).unwrap();
    assert_eq!(st.state, BackendState::Up);
    assert!(st.last.is_none());
}

#[test]
fn role_checks_start_pending_and_their_first_result_decides() {
    use crate::model::check::Role;
    let mut book = HealthBook::default();
    let mut v = vip(&[(21, 1)]);
    v.check = v.check.patched(&CheckPatch {
        kind: Some(CheckKind::Postgres),
        role: Some(Role::Replica),
        user: Some("xlbcheck".into()),
        ..Default::default()
    });
    // Before the book knows it (a planned VIP), and after: no new flows.
    assert_eq!(book.plan(&v).1, BTreeSet::from([be(21)]));
    book.sync([&v], SystemTime::now());
    assert_eq!(book.plan(&v).1, BTreeSet::from([be(21)]));
    assert_eq!(
        book.status(&key(), be(21)).unwrap().state,
        BackendState::Down
    );
    let g = book.targets()[0].generation;
    let report = |ok, detail: &str| CheckReport {
        key: key(),
        addr: be(21),
        generation: g,
        result: result(ok, detail),
    };
    let t = book
        .record(report(false, "primary (timeline 1), not a replica"))
        .unwrap();
    assert_eq!(
        t.to_string(),
        "backend 10.111.1.21 of VIP 10.111.100.1:80/tcp is DOWN after its first check: primary (timeline 1), not a replica"
    );
    // From then on, rise and fall as usual.
    assert_eq!(book.record(report(true, "replica")), None);
    let up = book.record(report(true, "replica")).unwrap();
    assert!(up.up && up.cause == Cause::Counted);
    assert!(book.plan(&v).1.is_empty());
    // Asking for another role makes it pending again.
    let mut primary = v.clone();
    primary.check.role = Role::Primary;
    book.sync([&primary], SystemTime::now());
    assert_eq!(book.plan(&primary).1, BTreeSet::from([be(21)]));
}

#[test]
fn a_role_answer_decides_at_once() {
    use crate::model::check::Role;
    let mut book = HealthBook::default();
    let mut v = vip(&[(21, 1)]);
    v.check = v.check.patched(&CheckPatch {
        kind: Some(CheckKind::Postgres),
        role: Some(Role::Primary),
        user: Some("xlbcheck".into()),
        ..Default::default()
    });
    book.sync([&v], SystemTime::now());
    let g = book.targets()[0].generation;
    let report = |ok: bool, detail: &str, wrong_role: bool| CheckReport {
        key: key(),
        addr: be(21),
        generation: g,
        result: CheckResult {
            wrong_role,
            timeline: ok.then_some(2),
            ..result(ok, detail)
        },
    };
    book.record(report(true, "primary (timeline 2)", false))
        .unwrap();
    // Demoted: down at the first answer with the other role, not after `fall` of them.
    let t = book
        .record(report(false, "replica, not a primary", true))
        .unwrap();
    assert_eq!(
        t.to_string(),
        "backend 10.111.1.21 of VIP 10.111.100.1:80/tcp is DOWN at once by its role: replica, not a primary"
    );
    // Promoted again: up at the first answer with the wanted role, not after `rise`.
    let t = book
        .record(report(true, "primary (timeline 2)", false))
        .unwrap();
    assert!(t.up && t.cause == Cause::Role);
    // Failures to answer still count: one refused connection changes nothing.
    assert_eq!(
        book.record(report(false, "connection refused", false)),
        None
    );
}
