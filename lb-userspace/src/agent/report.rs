//! The reports `xlb backend list`, `xlb stats` and `/metrics` show: a VIP as configured, joined
//! with its counters from the data path and its backends' health.

use crate::{
    agent::health::{BackendHealth, HealthBook},
    api::{BackendReport, BackendState, LastCheck, VipReport, vip_string},
    dataplane::{BackendStats, DataplaneStats},
    model::{BackendConfig, VipConfig},
    util::unix_ms,
};
use std::time::SystemTime;

/// `spec` with its counters from `stats` and its backends' health from `health`, ages against
/// `now`.
pub(crate) fn vip_report(
    spec: &VipConfig,
    stats: &DataplaneStats,
    health: &HealthBook,
    now: SystemTime,
) -> VipReport {
    let vs = stats.vips.iter().find(|v| v.key == spec.key);
    // A VIP applied a moment ago may not have counters yet: report zeros then.
    let vip_counters = vs.map(|v| v.counters).unwrap_or_default();
    let drops = vs
        .map(|v| v.drops)
        .unwrap_or_default()
        .by_reason()
        .into_iter()
        .map(|(reason, n)| (reason.to_string(), n))
        .collect();
    let backends = spec
        .backends
        .iter()
        .map(|b| {
            let bs = vs.and_then(|v| v.backends.iter().find(|bs| bs.addr == b.addr));
            backend_report(b, bs, health.status(&spec.key, b.addr), now)
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
        drops,
        backends,
        primary_conflict: health.primary_conflict(&spec.key),
    }
}

fn backend_report(
    b: &BackendConfig,
    stats: Option<&BackendStats>,
    health: Option<BackendHealth>,
    now: SystemTime,
) -> BackendReport {
    let counters = stats.map(|s| s.counters).unwrap_or_default();
    // Every committed backend is in the book; the fallback only covers a report built between
    // a commit and the book's sync, which the controller never does.
    let state = health
        .as_ref()
        .map_or(BackendState::of(true, b.weight), |h| h.state);
    let since = health.as_ref().map_or(now, |h| h.since);
    let (checks_ok, checks_failed) = health
        .as_ref()
        .map_or((0, 0), |h| (h.checks_ok, h.checks_failed));
    let reason = health
        .as_ref()
        .and_then(|h| h.note.as_ref())
        .map(ToString::to_string);
    let last_check = health.and_then(|h| h.last).map(|r| LastCheck {
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
        active_flows: stats.map_or(0, |s| s.active_flows),
        packets: counters.packets,
        bytes: counters.bytes,
        new_flows: counters.new_flows,
        checks_ok,
        checks_failed,
        backup: b.backup,
        reason,
    }
}
