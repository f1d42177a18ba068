use super::fake::FakeDataplane;
use super::*;
use crate::{
    agent::health::CheckResult,
    agent::state::STATE_FILE,
    api::BackendState,
    model::check::CheckKind,
    model::{BackendConfig, BackendSpec, Proto},
};
use std::{collections::BTreeSet, time::Duration};

fn no_policy() -> PolicyPatch {
    PolicyPatch::default()
}

fn none() -> CheckPatch {
    CheckPatch::default()
}

/// The VIP address of `key`, as the announcer keys its decisions.
const IPV4_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 111, 100, 1);

fn key(port: u16) -> ServiceKey {
    ServiceKey {
        addr: IpAddr::V4(IPV4_VIP),
        port,
        proto: Proto::Tcp,
    }
}
fn be(last: u8) -> IpAddr {
    IpAddr::from([10, 111, 1, last])
}

struct Fixture {
    dir: tempfile::TempDir,
    ctl: Controller<FakeDataplane>,
}

impl Fixture {
    fn new(dp: FakeDataplane) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ctl = Controller::start(
            dp,
            dir.path().join(STATE_FILE),
            DesiredState::default(),
            &Default::default(),
        )
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
    f.ctl
        .vip_add(key(80), Forward::L2, &none(), true, &no_policy())
        .unwrap();
    f.ctl
        .backend_add(&key(80), be(11), 1, false, &none())
        .unwrap();
    f.ctl
        .backend_add(&key(80), be(12), 3, false, &none())
        .unwrap();
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
        .vip_add(key(80), Forward::Ipip, &none(), true, &no_policy())
        .unwrap();
    f.ctl
        .backend_add(&key(80), be(11), 1, false, &none())
        .unwrap();
    let calls = f.ctl.dataplane().apply_calls;

    let cases = [
        (
            Request::VipAdd {
                vip: key(80),
                forward: Forward::Ipip,
                check: none(),
                icmp_echo: true,
                policy: PolicyPatch::default(),
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
                backup: false,
                check: none(),
            },
            "unknown VIP 10.111.100.1:81/tcp",
        ),
        (
            Request::BackendAdd {
                vip: key(80),
                backend: be(11),
                weight: 1,
                backup: false,
                check: none(),
            },
            "backend 10.111.1.11 already exists in VIP 10.111.100.1:80/tcp",
        ),
        (
            Request::BackendAdd {
                vip: key(80),
                backend: be(12),
                weight: 257,
                backup: false,
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
                policy: PolicyPatch::default(),
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
        .vip_add(key(80), Forward::Ipip, &none(), true, &no_policy())
        .unwrap();
    f.ctl
        .backend_add(&key(80), be(11), 1, false, &none())
        .unwrap();
    let e = f
        .ctl
        .backend_add(&key(80), be(12), 1, false, &none())
        .unwrap_err();
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
        .vip_add(key(80), Forward::Ipip, &none(), true, &no_policy())
        .unwrap();
    f.ctl
        .backend_add(&key(80), be(11), 1, false, &none())
        .unwrap();
    let old = f.ctl.state().get(&key(80)).unwrap().spec();

    // The apply fails, the old spec is re-applied: the error is the apply's.
    f.ctl.dp.fail_applies = 1;
    let calls = f.ctl.dp.apply_calls;
    let e = f
        .ctl
        .backend_add(&key(80), be(12), 1, false, &none())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "applying VIP 10.111.100.1:80/tcp to the data path failed: map update failed"
    );
    // The data path's error is the cause, not just text.
    let cause = std::error::Error::source(&e).expect("a source");
    assert!(
        cause.downcast_ref::<fake::FakeError>().is_some(),
        "{cause:?}"
    );
    assert_eq!(f.ctl.dp.apply_calls, calls + 2, "old spec re-applied");
    assert_eq!(f.ctl.dp.applied.get(&key(80)), Some(&old));
    f.assert_consistent();

    // The apply and the re-apply fail: both are reported, the desired state is unchanged.
    f.ctl.dp.fail_applies = 2;
    let e = f
        .ctl
        .backend_add(&key(80), be(12), 1, false, &none())
        .unwrap_err();
    assert!(matches!(e, ControllerError::Rollback { .. }), "{e}");
    assert!(e.to_string().contains("restoring VIP 10.111.100.1:80/tcp"));
    let first = std::error::Error::source(&e).expect("the failed change");
    assert!(matches!(
        first.downcast_ref::<Box<ControllerError>>().map(|b| &**b),
        Some(ControllerError::Apply { .. })
    ));
    assert_eq!(f.ctl.state().get(&key(80)).map(VipConfig::spec), Some(old));

    // A brand-new VIP that fails to apply has nothing to restore.
    f.ctl.dp.fail_applies = 1;
    let e = f
        .ctl
        .vip_add(key(81), Forward::Ipip, &none(), true, &no_policy())
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
        .vip_add(key(80), Forward::Ipip, &none(), true, &no_policy())
        .unwrap();
    f.ctl
        .backend_add(&key(80), be(11), 1, false, &none())
        .unwrap();
    let good = f.ctl.state().clone();

    // Make the state file unwritable: its directory is replaced by a regular file.
    let real = f.ctl.state_path.clone();
    f.ctl.state_path = f.dir.path().join(STATE_FILE).join("x");

    assert!(matches!(
        f.ctl.backend_add(&key(80), be(12), 1, false, &none()),
        Err(ControllerError::State(StateError::Write { .. }))
    ));
    assert!(
        f.ctl
            .vip_add(key(81), Forward::Ipip, &none(), true, &no_policy())
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
        .vip_add(key(80), Forward::Ipip, &none(), true, &no_policy())
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
            policy: Default::default(),
        },
        VipSpec {
            key: key(53),
            forward: Forward::L2,
            backends: vec![],
            icmp_echo: true,
            policy: Default::default(),
        },
    ])
    .unwrap();
    let ctl = Controller::start(
        FakeDataplane::default(),
        path.clone(),
        initial.clone(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(ctl.dataplane().applied.len(), 2);
    assert_eq!(state::load(&path).unwrap().unwrap(), initial);

    // A VIP that does not fit stops the start before anything is applied.
    let dp = FakeDataplane {
        max_backends_per_vip: Some(0),
        ..Default::default()
    };
    let e = Controller::start(
        dp,
        dir.path().join("other.json"),
        initial,
        &Default::default(),
    )
    .err();
    assert!(matches!(e, Some(ControllerError::Capacity { .. })));
    assert!(!dir.path().join("other.json").exists());
}

#[test]
fn icmp_echo_reaches_kernel_file_and_memory() {
    let mut f = Fixture::new(FakeDataplane::default());
    f.ctl
        .vip_add(key(80), Forward::Ipip, &none(), false, &no_policy())
        .unwrap();
    f.ctl
        .vip_add(key(81), Forward::Ipip, &none(), true, &no_policy())
        .unwrap();
    f.assert_consistent();
    assert!(!f.ctl.dataplane().applied[&key(80)].icmp_echo);
    assert!(f.ctl.dataplane().applied[&key(81)].icmp_echo);
    assert_eq!(
        f.ctl.handle(Request::VipSet {
            vip: key(80),
            check: none(),
            icmp_echo: Some(true),
            policy: no_policy(),
        }),
        Response::Done {
            message: "VIP 10.111.100.1:80/tcp: check tcp, ICMP echo on, sources -".into()
        }
    );
    f.assert_consistent();
    assert!(f.ctl.dataplane().applied[&key(80)].icmp_echo);
    assert!(f.on_disk().get(&key(80)).unwrap().icmp_echo);
    // A check change keeps the echo setting.
    f.ctl
        .vip_set(&key(81), &none(), Some(false), &no_policy())
        .unwrap();
    let faster = CheckPatch {
        interval: Some(Duration::from_millis(500)),
        timeout: Some(Duration::from_millis(500)),
        ..Default::default()
    };
    f.ctl
        .vip_set(&key(81), &faster, None, &no_policy())
        .unwrap();
    f.assert_consistent();
    assert!(!f.ctl.dataplane().applied[&key(81)].icmp_echo);
    assert!(!f.ctl.vip_list()[1].icmp_echo);
}

#[test]
fn reports_join_desired_state_and_counters() {
    let mut f = Fixture::new(FakeDataplane::default());
    f.ctl
        .vip_add(key(80), Forward::Ipip, &none(), true, &no_policy())
        .unwrap();
    f.ctl
        .backend_add(&key(80), be(11), 2, false, &none())
        .unwrap();
    f.ctl
        .backend_add(&key(80), be(12), 1, false, &none())
        .unwrap();
    // A walk of the flow table (made off the serve loop) found 3 active flows per backend and 5
    // entries.
    let counts = super::fake::flow_counts(f.ctl.dataplane(), 5, 3);
    f.ctl.set_flow_counts(std::sync::Arc::new(counts), 0);
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
    // How often the table is walked is agent::flows's business (its tests).
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
    f.ctl
        .vip_add(key(80), Forward::Ipip, &check, true, &no_policy())
        .unwrap();
    for b in [11, 12, 13] {
        f.ctl
            .backend_add(&key(80), be(b), 1, false, &none())
            .unwrap();
    }
    f
}

/// Feed a check result for `addr` under its current check configuration.
fn feed(ctl: &mut Controller<FakeDataplane>, addr: IpAddr, ok: bool, detail: &str) {
    feed_on(ctl, addr, ok, detail, None);
}

/// The same, with a PostgreSQL primary's timeline.
fn feed_on(
    ctl: &mut Controller<FakeDataplane>,
    addr: IpAddr,
    ok: bool,
    detail: &str,
    timeline: Option<u32>,
) {
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
            timeline,
            wrong_role: false,
        },
    });
}

/// The weights `key` was last applied with, by backend.
fn applied_weights(ctl: &Controller<FakeDataplane>, key: &ServiceKey) -> Vec<(IpAddr, u32)> {
    ctl.dataplane().applied[key]
        .backends
        .iter()
        .map(|b| (b.addr, b.weight))
        .collect()
}

#[test]
fn backups_take_new_flows_only_while_no_regular_backend_can() {
    let mut f = checked_fixture();
    f.ctl
        .backend_add(&key(80), be(14), 2, true, &none())
        .unwrap();
    let r = f.ctl.backend_list(&key(80)).unwrap();
    let b14 = r.backends.iter().find(|b| b.address == be(14)).unwrap();
    assert!(b14.backup);
    assert_eq!(b14.state, BackendState::Up);
    assert_eq!(b14.reason.as_deref(), Some("backup, standing by"));
    // Standing by: weight 0 in the data path (no new flows, its flows stay), not down.
    assert_eq!(
        applied_weights(&f.ctl, &key(80)),
        vec![(be(11), 1), (be(12), 1), (be(13), 1), (be(14), 0)]
    );
    assert!(f.ctl.dataplane().down(&key(80)).unwrap().is_empty());
    for b in [11, 12] {
        feed(&mut f.ctl, be(b), false, "connection refused");
        feed(&mut f.ctl, be(b), false, "connection refused");
    }
    // One regular backend left: still standing by.
    assert_eq!(applied_weights(&f.ctl, &key(80))[3], (be(14), 0));
    // Drained, the last regular one can take no new flows either: the backup serves.
    f.ctl.backend_drain(&key(80), be(13)).unwrap();
    assert_eq!(applied_weights(&f.ctl, &key(80))[3], (be(14), 2));
    let r = f.ctl.backend_list(&key(80)).unwrap();
    assert_eq!(
        r.backends[3].reason.as_deref(),
        Some("backup, serving: no regular backend is up")
    );
    // A regular backend back up: the backup stands by again.
    feed(&mut f.ctl, be(11), true, "connected");
    assert_eq!(applied_weights(&f.ctl, &key(80))[3], (be(14), 0));
    // Backups are persisted.
    assert!(f.on_disk().get(&key(80)).unwrap().backends[3].backup);
}

#[test]
fn role_checks_start_pending_and_two_primaries_never_serve_together() {
    use crate::model::check::Role;
    let mut f = Fixture::new(FakeDataplane::default());
    let pg = CheckPatch {
        kind: Some(CheckKind::Postgres),
        role: Some(Role::Primary),
        user: Some("xlbcheck".into()),
        rise: Some(2),
        fall: Some(2),
        ..Default::default()
    };
    let k = key(5432);
    f.ctl
        .vip_add(k, Forward::Ipip, &pg, true, &no_policy())
        .unwrap();
    for b in [21, 22] {
        f.ctl.backend_add(&k, be(b), 1, false, &none()).unwrap();
    }
    let down = |f: &Fixture| f.ctl.dataplane().down(&k).unwrap().clone();
    let reason = |f: &Fixture, b: u8| {
        let r = f.ctl.backend_list(&k).unwrap();
        let e = r.backends.iter().find(|e| e.address == be(b)).unwrap();
        (e.state, e.reason.clone())
    };
    // Nothing takes new flows before its first check says which role it has.
    assert_eq!(down(&f), BTreeSet::from([be(21), be(22)]));
    assert_eq!(
        reason(&f, 22),
        (
            BackendState::Down,
            Some("waiting for its first check".into())
        )
    );
    // The first check decides at once (no rise): db21 primary. db22 has not answered: with no
    // primary chosen yet, db21 waits for it (the choice must not depend on who answered first).
    feed_on(&mut f.ctl, be(21), true, "primary (timeline 1)", Some(1));
    assert_eq!(down(&f), BTreeSet::from([be(21), be(22)]));
    feed(&mut f.ctl, be(22), false, "replica, not a primary");
    assert_eq!(down(&f), BTreeSet::from([be(22)]));
    assert_eq!(
        f.ctl.backend_list(&k).unwrap().primary_conflict,
        Some(false)
    );
    // db22 promoted (timeline 2): two primaries; new flows stay on db21, the incumbent.
    for _ in 0..2 {
        feed_on(&mut f.ctl, be(22), true, "primary (timeline 2)", Some(2));
    }
    assert_eq!(down(&f), BTreeSet::from([be(22)]));
    assert_eq!(
        reason(&f, 22),
        (
            BackendState::Down,
            Some("another primary is serving: 10.111.1.21".into())
        )
    );
    assert_eq!(f.ctl.backend_list(&k).unwrap().primary_conflict, Some(true));
    // db21 fails: db22 is the only primary left and takes over.
    for _ in 0..2 {
        feed(&mut f.ctl, be(21), false, "connection refused");
    }
    assert_eq!(down(&f), BTreeSet::from([be(21)]));
    assert_eq!(
        f.ctl.backend_list(&k).unwrap().primary_conflict,
        Some(false)
    );
    // db21 comes back as a primary on the old timeline: db22 stays (incumbent), db21 is held.
    for _ in 0..2 {
        feed_on(&mut f.ctl, be(21), true, "primary (timeline 1)", Some(1));
    }
    assert_eq!(down(&f), BTreeSet::from([be(21)]));
    assert_eq!(
        reason(&f, 21).1.as_deref(),
        Some("another primary is serving: 10.111.1.22")
    );
}

#[test]
fn unreadable_check_files_are_refused_and_change_nothing() {
    let mut f = checked_fixture();
    let before = f.ctl.state().clone();
    let missing = CheckPatch {
        kind: Some(CheckKind::Postgres),
        user: Some("xlbcheck".into()),
        password_file: Some("/nonexistent/xlb/pg.password".into()),
        ..Default::default()
    };
    let e = f
        .ctl
        .vip_set(&key(80), &missing, None, &no_policy())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "VIP 10.111.100.1:80/tcp: cannot read password file /nonexistent/xlb/pg.password: No such file or directory"
    );
    let ca = CheckPatch {
        kind: Some(CheckKind::Https),
        tls_ca: Some("/nonexistent/xlb/ca.pem".into()),
        ..Default::default()
    };
    let e = f
        .ctl
        .backend_add(&key(80), be(14), 1, false, &ca)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "backend 10.111.1.14 in VIP 10.111.100.1:80/tcp: cannot read CA file /nonexistent/xlb/ca.pem: No such file or directory"
    );
    assert_eq!(f.ctl.state(), &before);
    assert_eq!(f.on_disk(), before);
}

fn state_of(ctl: &Controller<FakeDataplane>, addr: IpAddr) -> BackendState {
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
    f.ctl
        .vip_set(&key(80), &faster, None, &no_policy())
        .unwrap();
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
    f.ctl
        .vip_set(&key(80), &faster, None, &no_policy())
        .unwrap();
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
    f.ctl.vip_set(&key(80), &off, None, &no_policy()).unwrap();
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
    f.ctl.backend_add(&key(80), be(14), 1, false, &own).unwrap();
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
                timeline: None,
                wrong_role: false,
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
                policy: PolicyPatch::default(),
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
                policy: PolicyPatch::default(),
            },
            "VIP 10.111.100.1:80/tcp: rise must be at least 1",
        ),
        (
            Request::VipSet {
                vip: key(80),
                check: none(),
                icmp_echo: None,
                policy: PolicyPatch::default(),
            },
            "VIP 10.111.100.1:80/tcp: nothing to change (give --icmp-echo, a check flag, or a source or limit flag)",
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
                policy: PolicyPatch::default(),
            },
            "VIP 10.111.100.1:81/tcp: fall must be at least 1",
        ),
        (
            Request::BackendAdd {
                vip: key(80),
                backend: be(14),
                weight: 1,
                backup: false,
                // An explicit timeout longer than the interval (without one, the timeout would
                // follow the interval: see check::default_timeout).
                check: CheckPatch {
                    interval: Some(Duration::from_millis(100)),
                    timeout: Some(Duration::from_secs(1)),
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

/// Route announcement reads the controller's view: serving backends per VIP (up and weight
/// above 0) and the attachment; decided on it, an address goes when its last one does.
#[test]
fn node_view_counts_serving_backends_for_the_announcement() {
    use crate::agent::announce::decide::{NodeInputs, Withheld, decide};
    let mut f = checked_fixture();
    let decided = |ctl: &Controller<FakeDataplane>| {
        let view = ctl.node_view();
        decide(&NodeInputs {
            attached: view.attached,
            drained: false,
            starting: None,
            adopted: Default::default(),
            vips: view.vips,
        })[&IpAddr::V4(IPV4_VIP)]
            .clone()
    };
    assert_eq!(decided(&f.ctl).serving, 3);
    assert!(decided(&f.ctl).announced());
    f.ctl.backend_drain(&key(80), be(11)).unwrap();
    for _ in 0..2 {
        feed(&mut f.ctl, be(12), false, "connection refused");
    }
    let d = decided(&f.ctl);
    assert_eq!((d.serving, d.announced()), (1, true));
    for _ in 0..2 {
        feed(&mut f.ctl, be(13), false, "connection refused");
    }
    let d = decided(&f.ctl);
    assert_eq!(
        (d.serving, d.withheld),
        (0, Some(Withheld::NoHealthyBackend))
    );
    feed(&mut f.ctl, be(13), true, "connected");
    assert!(decided(&f.ctl).announced(), "rise 1: back at once");
    f.ctl.dp.detached = true;
    assert_eq!(decided(&f.ctl).withheld, Some(Withheld::NotAttached));
}
