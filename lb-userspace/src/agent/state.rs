//! The agent's desired state (VIPs, backends, weights, health checks, drains), its validation
//! rules, and its on-disk form.
//!
//! Every change is planned first (`plan_*` return the VIP as it would become, touching nothing), so
//! the controller can validate, apply to the kernel and persist before it commits the change here.
//! The file is written atomically (temporary file, fsync, rename, fsync of the directory), so a
//! crash leaves either the old or the new state, never a torn one.

use crate::{
    agent::health::check_files,
    model::addr::is_host_address,
    model::check::{CheckError, CheckPatch, CheckSpec},
    model::net::IpNet,
    model::policy::{PolicyError, PolicyPatch},
    model::{BackendConfig, DEFAULT_WEIGHT, Forward, MAX_WEIGHT, ServiceKey, VipConfig},
    util::write_atomic,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

/// Name of the state file inside `--state-dir`.
pub(crate) const STATE_FILE: &str = "state.json";
/// Version of the on-disk format; bumped when it changes incompatibly.
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error("VIP {0} already exists")]
    DuplicateVip(ServiceKey),
    #[error("unknown VIP {0}")]
    UnknownVip(ServiceKey),
    #[error("backend {addr} already exists in VIP {key}")]
    DuplicateBackend { key: ServiceKey, addr: IpAddr },
    #[error("unknown backend {addr} in VIP {key}")]
    UnknownBackend { key: ServiceKey, addr: IpAddr },
    #[error("weight {weight} of backend {addr} in VIP {key} is above the maximum of {MAX_WEIGHT}")]
    WeightTooHigh {
        key: ServiceKey,
        addr: IpAddr,
        weight: u32,
    },
    #[error("VIP {0}: port 0 is not a valid port")]
    PortZero(ServiceKey),
    #[error("VIP {0}: {1} is not a unicast host address")]
    BadVipAddress(ServiceKey, IpAddr),
    #[error("backend {addr} in VIP {key}: not a unicast host address")]
    BadBackendAddress { key: ServiceKey, addr: IpAddr },
    #[error(
        "backend {addr} is {}, VIP {key} is {}: a VIP's backends have its address family (an IPv4 VIP with --forward ipip may have IPv6 backends: IPv4 in IPv6)",
        family(*addr), family(key.addr)
    )]
    FamilyMismatch { key: ServiceKey, addr: IpAddr },
    #[error(
        "VIP {key} is {}: {what} {prefix} is an {} prefix, which none of its clients has (a \
         VIP's source lists hold prefixes of its own family)",
        family(key.addr), prefix_family(prefix)
    )]
    SourceFamily {
        key: ServiceKey,
        what: &'static str,
        prefix: IpNet,
    },
    #[error("VIP {key}: {source}")]
    VipCheck { key: ServiceKey, source: CheckError },
    #[error("backend {addr} in VIP {key}: {source}")]
    BackendCheck {
        key: ServiceKey,
        addr: IpAddr,
        source: CheckError,
    },
    /// A file a new check names (its CA, its password file) cannot be used.
    #[error("{whose}: {message}")]
    CheckFile { whose: String, message: String },
    #[error("VIP {key}: {source}")]
    Policy {
        key: ServiceKey,
        source: PolicyError,
    },
    #[error(
        "VIP {0}: nothing to change (give --icmp-echo, a check flag, or a source or limit flag)"
    )]
    NothingToSet(ServiceKey),
    #[error("backend {addr} in VIP {key} is already draining (weight 0)")]
    AlreadyDraining { key: ServiceKey, addr: IpAddr },
    #[error("backend {addr} in VIP {key} is not draining (weight {weight})")]
    NotDraining {
        key: ServiceKey,
        addr: IpAddr,
        weight: u32,
    },
    #[error("cannot read state file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("state file {} is corrupt: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("state file {} has version {found}, this xlb understands {STATE_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// The VIPs an operator asked for, ordered by key (so listings and the state file are stable).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DesiredState {
    vips: BTreeMap<ServiceKey, VipConfig>,
}

/// What differs between two desired states (`xlb reload`), VIP by VIP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct StateDiff {
    pub(crate) added: Vec<ServiceKey>,
    pub(crate) removed: Vec<ServiceKey>,
    /// VIPs in both whose configuration differs (forwarding, checks, backends, weights).
    pub(crate) changed: Vec<ServiceKey>,
    pub(crate) unchanged: usize,
    /// Over the changed VIPs: backends added, removed, and kept with another weight or check.
    pub(crate) backends_added: usize,
    pub(crate) backends_removed: usize,
    pub(crate) backends_changed: usize,
}

impl StateDiff {
    pub(crate) fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// One line: `reload: 1 VIP added, 0 removed, 1 changed (backends +1 -0 ~1), 2 unchanged`.
    pub(crate) fn summary(&self) -> String {
        if self.is_empty() {
            return format!("reload: nothing changed ({} VIPs)", self.unchanged);
        }
        let names = |keys: &[ServiceKey]| {
            if keys.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = keys.iter().map(ToString::to_string).collect();
                format!(" [{}]", list.join(", "))
            }
        };
        format!(
            "reload: {} VIPs added{}, {} removed{}, {} changed{} (backends +{} -{} ~{}), {} unchanged",
            self.added.len(),
            names(&self.added),
            self.removed.len(),
            names(&self.removed),
            self.changed.len(),
            names(&self.changed),
            self.backends_added,
            self.backends_removed,
            self.backends_changed,
            self.unchanged
        )
    }
}

/// A VIP's backends have its address family, except that an IPv4 VIP forwarded with `ipip` may
/// have IPv6 backends (IPv4 in IPv6, for an IPv6-only backend network). `l2` cannot change the
/// family (it rewrites MAC addresses only), and an IPv6 VIP is never carried in IPv4.
fn families_fit(vip: IpAddr, forward: Forward, backend: IpAddr) -> bool {
    vip.is_ipv6() == backend.is_ipv6() || (vip.is_ipv4() && forward == Forward::Ipip)
}

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn prefix_family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
}

fn validate_key(key: &ServiceKey) -> Result<(), StateError> {
    if key.port == 0 {
        return Err(StateError::PortZero(*key));
    }
    if !is_host_address(key.addr) {
        return Err(StateError::BadVipAddress(*key, key.addr));
    }
    Ok(())
}

fn validate_backend(
    key: &ServiceKey,
    forward: Forward,
    b: &BackendConfig,
) -> Result<(), StateError> {
    if !is_host_address(b.addr) {
        return Err(StateError::BadBackendAddress {
            key: *key,
            addr: b.addr,
        });
    }
    if !families_fit(key.addr, forward, b.addr) {
        return Err(StateError::FamilyMismatch {
            key: *key,
            addr: b.addr,
        });
    }
    if b.weight > MAX_WEIGHT {
        return Err(StateError::WeightTooHigh {
            key: *key,
            addr: b.addr,
            weight: b.weight,
        });
    }
    if let Some(c) = &b.check {
        c.validate().map_err(|source| StateError::BackendCheck {
            key: *key,
            addr: b.addr,
            source,
        })?;
    }
    Ok(())
}

/// The files named by checks of `new` that `old` does not have (a CA, a password file) must be
/// usable now: a typo is refused with the command, not found later in a failing check. Checks
/// already in `old` are not read again, so a VIP whose file went away can still be changed
/// otherwise (its checks report the problem). Not part of `validate_spec`: a state file or a
/// config file loads even when a file is missing at start.
pub(crate) fn check_new_files(new: &VipConfig, old: Option<&VipConfig>) -> Result<(), StateError> {
    let known = |c: &CheckSpec| {
        old.is_some_and(|o| o.check == *c || o.backends.iter().any(|b| b.check.as_ref() == Some(c)))
    };
    let own = new.backends.iter().filter_map(|b| {
        b.check
            .as_ref()
            .map(|c| (format!("backend {} in VIP {}", b.addr, new.key), c))
    });
    for (whose, check) in std::iter::once((format!("VIP {}", new.key), &new.check)).chain(own) {
        if !known(check) {
            check_files(check).map_err(|message| StateError::CheckFile { whose, message })?;
        }
    }
    Ok(())
}

/// Every rule that applies to one VIP on its own.
pub(crate) fn validate_spec(spec: &VipConfig) -> Result<(), StateError> {
    validate_key(&spec.key)?;
    for (what, list) in [
        ("--allow-src", &spec.policy.allow_src),
        ("--deny-src", &spec.policy.deny_src),
    ] {
        if let Some(prefix) = list
            .iter()
            .find(|n| matches!(n, IpNet::V6(_)) != spec.key.addr.is_ipv6())
        {
            return Err(StateError::SourceFamily {
                key: spec.key,
                what,
                prefix: *prefix,
            });
        }
    }
    spec.policy
        .validate()
        .map_err(|source| StateError::Policy {
            key: spec.key,
            source,
        })?;
    spec.check
        .validate()
        .map_err(|source| StateError::VipCheck {
            key: spec.key,
            source,
        })?;
    let mut seen = BTreeSet::new();
    for b in &spec.backends {
        validate_backend(&spec.key, spec.forward, b)?;
        if !seen.insert(b.addr) {
            return Err(StateError::DuplicateBackend {
                key: spec.key,
                addr: b.addr,
            });
        }
    }
    Ok(())
}

impl DesiredState {
    /// Build a state from a list of VIPs, validating all of them and rejecting duplicates.
    pub(crate) fn from_specs<T: Into<VipConfig>>(
        specs: impl IntoIterator<Item = T>,
    ) -> Result<Self, StateError> {
        let mut vips = BTreeMap::new();
        for spec in specs {
            let spec: VipConfig = spec.into();
            validate_spec(&spec)?;
            if vips.contains_key(&spec.key) {
                return Err(StateError::DuplicateVip(spec.key));
            }
            vips.insert(spec.key, spec);
        }
        Ok(DesiredState { vips })
    }

    pub(crate) fn vips(&self) -> impl Iterator<Item = &VipConfig> {
        self.vips.values()
    }

    pub(crate) fn get(&self, key: &ServiceKey) -> Option<&VipConfig> {
        self.vips.get(key)
    }

    pub(crate) fn vip_count(&self) -> usize {
        self.vips.len()
    }

    pub(crate) fn backend_count(&self) -> usize {
        self.vips.values().map(|v| v.backends.len()).sum()
    }

    /// Every distinct backend address over all VIPs.
    pub(crate) fn backend_addrs(&self) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = self
            .vips
            .values()
            .flat_map(|v| v.backends.iter().map(|b| b.addr))
            .collect();
        set.into_iter().collect()
    }

    /// What `next` adds, removes and changes compared with this state.
    pub(crate) fn diff(&self, next: &DesiredState) -> StateDiff {
        let mut d = StateDiff::default();
        for (key, new) in &next.vips {
            match self.vips.get(key) {
                None => d.added.push(*key),
                Some(old) if old == new => d.unchanged += 1,
                Some(old) => {
                    d.changed.push(*key);
                    for b in &new.backends {
                        match old.backends.iter().find(|o| o.addr == b.addr) {
                            None => d.backends_added += 1,
                            Some(o) if o != b => d.backends_changed += 1,
                            Some(_) => {}
                        }
                    }
                    d.backends_removed += old
                        .backends
                        .iter()
                        .filter(|o| !new.backends.iter().any(|b| b.addr == o.addr))
                        .count();
                }
            }
        }
        d.removed = self
            .vips
            .keys()
            .filter(|k| !next.vips.contains_key(k))
            .copied()
            .collect();
        d
    }

    fn existing(&self, key: &ServiceKey) -> Result<&VipConfig, StateError> {
        self.vips.get(key).ok_or(StateError::UnknownVip(*key))
    }

    /// A copy of VIP `key` and the index of its backend `addr`.
    fn existing_backend(
        &self,
        key: &ServiceKey,
        addr: IpAddr,
    ) -> Result<(VipConfig, usize), StateError> {
        let spec = self.existing(key)?.clone();
        let i = spec
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .ok_or(StateError::UnknownBackend { key: *key, addr })?;
        Ok((spec, i))
    }

    /// The new VIP `vip add` would create (no backends yet): the protocol's default check with
    /// `check` applied, no source policy but `policy`.
    pub(crate) fn plan_vip_add(
        &self,
        key: ServiceKey,
        forward: Forward,
        check: &CheckPatch,
        policy: &PolicyPatch,
    ) -> Result<VipConfig, StateError> {
        validate_key(&key)?;
        if self.vips.contains_key(&key) {
            return Err(StateError::DuplicateVip(key));
        }
        let mut spec = VipConfig::new(key, forward);
        spec.check = spec.check.patched(check);
        spec.policy = spec
            .policy
            .patched(policy)
            .map_err(|source| StateError::Policy { key, source })?;
        validate_spec(&spec)?;
        Ok(spec)
    }

    /// The VIP as `vip set` would leave it (its check, ICMP echo and/or source policy changed;
    /// unset fields keep their values).
    pub(crate) fn plan_vip_set(
        &self,
        key: &ServiceKey,
        check: &CheckPatch,
        icmp_echo: Option<bool>,
        policy: &PolicyPatch,
    ) -> Result<VipConfig, StateError> {
        let mut spec = self.existing(key)?.clone();
        if check.is_empty() && icmp_echo.is_none() && policy.is_empty() {
            return Err(StateError::NothingToSet(*key));
        }
        spec.check = spec.check.patched(check);
        spec.icmp_echo = icmp_echo.unwrap_or(spec.icmp_echo);
        spec.policy = spec
            .policy
            .patched(policy)
            .map_err(|source| StateError::Policy { key: *key, source })?;
        validate_spec(&spec)?;
        Ok(spec)
    }

    /// The VIP `vip del` would remove.
    pub(crate) fn plan_vip_del(&self, key: &ServiceKey) -> Result<&VipConfig, StateError> {
        self.existing(key)
    }

    /// The VIP as `backend add` would leave it (new backend appended, order kept), a backup if
    /// `backup`. A non-empty `check` gives the backend its own check: the VIP's with `check`
    /// applied.
    pub(crate) fn plan_backend_add(
        &self,
        key: &ServiceKey,
        addr: IpAddr,
        weight: u32,
        backup: bool,
        check: &CheckPatch,
    ) -> Result<VipConfig, StateError> {
        let mut spec = self.existing(key)?.clone();
        let mut backend = BackendConfig::new(addr, weight);
        backend.backup = backup;
        if !check.is_empty() {
            backend.check = Some(spec.check.patched(check));
        }
        validate_backend(key, spec.forward, &backend)?;
        if spec.backends.iter().any(|b| b.addr == addr) {
            return Err(StateError::DuplicateBackend { key: *key, addr });
        }
        spec.backends.push(backend);
        Ok(spec)
    }

    /// The VIP as `backend del` would leave it.
    pub(crate) fn plan_backend_del(
        &self,
        key: &ServiceKey,
        addr: IpAddr,
    ) -> Result<VipConfig, StateError> {
        let (mut spec, i) = self.existing_backend(key, addr)?;
        spec.backends.remove(i);
        Ok(spec)
    }

    /// The VIP as `backend set --weight` would leave it. A weight above 0 ends a drain; a weight
    /// of 0 is a drain (the previous weight is remembered for `undrain`).
    pub(crate) fn plan_backend_set_weight(
        &self,
        key: &ServiceKey,
        addr: IpAddr,
        weight: u32,
    ) -> Result<VipConfig, StateError> {
        let (mut spec, i) = self.existing_backend(key, addr)?;
        let b = &mut spec.backends[i];
        if weight == 0 && b.weight > 0 {
            b.drained_from = Some(b.weight);
        } else if weight > 0 {
            b.drained_from = None;
        }
        b.weight = weight;
        let b = b.clone();
        validate_backend(key, spec.forward, &b)?;
        Ok(spec)
    }

    /// The VIP as `backend drain` would leave it: weight 0, the old weight remembered.
    pub(crate) fn plan_backend_drain(
        &self,
        key: &ServiceKey,
        addr: IpAddr,
    ) -> Result<VipConfig, StateError> {
        let (mut spec, i) = self.existing_backend(key, addr)?;
        let b = &mut spec.backends[i];
        if b.weight == 0 {
            return Err(StateError::AlreadyDraining { key: *key, addr });
        }
        b.drained_from = Some(b.weight);
        b.weight = 0;
        Ok(spec)
    }

    /// The VIP as `backend undrain` would leave it: the weight from before the drain (the default
    /// weight for a backend that was added with weight 0 and so never had another).
    pub(crate) fn plan_backend_undrain(
        &self,
        key: &ServiceKey,
        addr: IpAddr,
    ) -> Result<VipConfig, StateError> {
        let (mut spec, i) = self.existing_backend(key, addr)?;
        let b = &mut spec.backends[i];
        if b.weight != 0 {
            return Err(StateError::NotDraining {
                key: *key,
                addr,
                weight: b.weight,
            });
        }
        b.weight = b.drained_from.take().unwrap_or(DEFAULT_WEIGHT);
        Ok(spec)
    }

    /// Insert or replace a VIP (after it was planned, applied and persisted).
    pub(crate) fn insert(&mut self, spec: VipConfig) {
        self.vips.insert(spec.key, spec);
    }

    pub(crate) fn remove(&mut self, key: &ServiceKey) -> Option<VipConfig> {
        self.vips.remove(key)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    vips: Vec<VipConfig>,
}

/// Persist `state` to `path` atomically.
pub(crate) fn save(path: &Path, state: &DesiredState) -> Result<(), StateError> {
    let file = StateFile {
        version: STATE_VERSION,
        vips: state.vips.values().cloned().collect(),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).expect("state serialises to JSON");
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(|source| StateError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Load the state saved at `path`; `Ok(None)` if there is none. A file that exists but does not
/// parse or validate is an error: silently starting empty would drop every VIP.
pub(crate) fn load(path: &Path) -> Result<Option<DesiredState>, StateError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let file: StateFile = serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    if file.version != STATE_VERSION {
        return Err(StateError::Version {
            path: path.to_path_buf(),
            found: file.version,
        });
    }
    DesiredState::from_specs(file.vips).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;

    fn key(port: u16) -> ServiceKey {
        ServiceKey {
            addr: IpAddr::from([10, 111, 100, 1]),
            port,
            proto: Proto::Tcp,
        }
    }
    fn be(last: u8) -> IpAddr {
        IpAddr::from([10, 111, 1, last])
    }
    fn spec(port: u16, backends: &[(u8, u32)]) -> VipConfig {
        let mut v = VipConfig::new(key(port), Forward::Ipip);
        v.backends = backends
            .iter()
            .map(|&(b, weight)| BackendConfig::new(be(b), weight))
            .collect();
        v
    }
    fn none() -> CheckPatch {
        CheckPatch::default()
    }
    fn no_policy() -> PolicyPatch {
        PolicyPatch::default()
    }

    #[test]
    fn reload_diff_names_vips_and_counts_backends() {
        let old = DesiredState::from_specs([
            spec(80, &[(11, 1), (12, 1), (13, 1)]),
            spec(443, &[(11, 1)]),
            spec(53, &[(11, 1)]),
        ])
        .unwrap();
        let mut l2 = spec(53, &[(11, 1)]);
        l2.forward = Forward::L2;
        let next = DesiredState::from_specs([
            // 80: be12 removed, be13's weight changed, be14 added.
            spec(80, &[(11, 1), (13, 2), (14, 1)]),
            // 443 unchanged; 53 changed without any backend change; 8080 added; none removed
            // but... 443 stays, so nothing is removed.
            spec(443, &[(11, 1)]),
            l2,
            spec(8080, &[(11, 1)]),
        ])
        .unwrap();
        let d = old.diff(&next);
        assert_eq!(d.added, vec![key(8080)]);
        assert!(d.removed.is_empty());
        assert_eq!(d.changed, vec![key(53), key(80)]);
        assert_eq!(d.unchanged, 1);
        assert_eq!(
            (d.backends_added, d.backends_removed, d.backends_changed),
            (1, 1, 1)
        );
        assert_eq!(
            d.summary(),
            "reload: 1 VIPs added [10.111.100.1:8080/tcp], 0 removed, 2 changed [10.111.100.1:53/tcp, 10.111.100.1:80/tcp] (backends +1 -1 ~1), 1 unchanged"
        );
        let back = next.diff(&old);
        assert_eq!(back.removed, vec![key(8080)]);
        assert_eq!(old.diff(&old).summary(), "reload: nothing changed (3 VIPs)");
        assert!(old.diff(&old).is_empty());
    }

    #[test]
    fn plans_validate_and_do_not_mutate() {
        let state = DesiredState::from_specs([spec(80, &[(11, 1)])]).unwrap();
        let before = state.clone();

        assert!(matches!(
            state.plan_vip_add(key(80), Forward::L2, &none(), &no_policy()),
            Err(StateError::DuplicateVip(k)) if k == key(80)
        ));
        assert!(matches!(
            state.plan_vip_add(key(0), Forward::L2, &none(), &no_policy()),
            Err(StateError::PortZero(_))
        ));
        let bad_addr = ServiceKey {
            addr: IpAddr::from([0, 0, 0, 0]),
            ..key(80)
        };
        assert!(matches!(
            state.plan_vip_add(bad_addr, Forward::L2, &none(), &no_policy()),
            Err(StateError::BadVipAddress(..))
        ));
        let e = state
            .plan_backend_add(&key(81), be(12), 1, false, &none())
            .unwrap_err();
        assert_eq!(e.to_string(), "unknown VIP 10.111.100.1:81/tcp");
        let e = state
            .plan_backend_add(&key(80), be(11), 1, false, &none())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "backend 10.111.1.11 already exists in VIP 10.111.100.1:80/tcp"
        );
        assert!(matches!(
            state.plan_backend_add(&key(80), be(12), MAX_WEIGHT + 1, false, &none()),
            Err(StateError::WeightTooHigh { weight, .. }) if weight == MAX_WEIGHT + 1
        ));
        assert!(
            state
                .plan_backend_add(&key(80), be(12), MAX_WEIGHT, false, &none())
                .is_ok()
        );
        assert!(matches!(
            state.plan_backend_add(&key(80), IpAddr::from([0, 0, 0, 0]), 1, false, &none()),
            Err(StateError::BadBackendAddress { .. })
        ));
        assert!(matches!(
            state.plan_backend_del(&key(80), be(12)),
            Err(StateError::UnknownBackend { addr, .. }) if addr == be(12)
        ));
        assert!(matches!(
            state.plan_vip_del(&key(81)),
            Err(StateError::UnknownVip(_))
        ));
        assert_eq!(state, before, "planning must never change the state");
    }

    #[test]
    fn plans_produce_the_next_spec() {
        let state = DesiredState::from_specs([spec(80, &[(11, 1), (12, 2)])]).unwrap();
        let added = state
            .plan_backend_add(&key(80), be(13), 5, false, &none())
            .unwrap();
        assert_eq!(added, spec(80, &[(11, 1), (12, 2), (13, 5)]));
        let deleted = state.plan_backend_del(&key(80), be(11)).unwrap();
        assert_eq!(deleted, spec(80, &[(12, 2)]));
        let new_vip = state
            .plan_vip_add(key(443), Forward::L2, &none(), &no_policy())
            .unwrap();
        assert_eq!(new_vip.backends, vec![]);
        assert_eq!(new_vip.forward, Forward::L2);
    }

    #[test]
    fn weights_drain_and_undrain() {
        let state = DesiredState::from_specs([spec(80, &[(11, 3), (12, 0)])]).unwrap();
        let w = |v: &VipConfig, i: usize| (v.backends[i].weight, v.backends[i].drained_from);

        let drained = state.plan_backend_drain(&key(80), be(11)).unwrap();
        assert_eq!(w(&drained, 0), (0, Some(3)));
        let s2 = DesiredState::from_specs([drained]).unwrap();
        assert!(matches!(
            s2.plan_backend_drain(&key(80), be(11)),
            Err(StateError::AlreadyDraining { .. })
        ));
        assert_eq!(
            w(&s2.plan_backend_undrain(&key(80), be(11)).unwrap(), 0),
            (3, None)
        );
        // `set --weight N>0` also ends a drain; `set --weight 0` is a drain.
        assert_eq!(
            w(&s2.plan_backend_set_weight(&key(80), be(11), 5).unwrap(), 0),
            (5, None)
        );
        assert_eq!(
            w(
                &state.plan_backend_set_weight(&key(80), be(11), 0).unwrap(),
                0
            ),
            (0, Some(3))
        );
        // Added with weight 0: undrain gives the default weight.
        assert_eq!(
            w(&state.plan_backend_undrain(&key(80), be(12)).unwrap(), 1),
            (DEFAULT_WEIGHT, None)
        );
        let e = state.plan_backend_undrain(&key(80), be(11)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "backend 10.111.1.11 in VIP 10.111.100.1:80/tcp is not draining (weight 3)"
        );
        assert!(matches!(
            state.plan_backend_set_weight(&key(80), be(11), MAX_WEIGHT + 1),
            Err(StateError::WeightTooHigh { .. })
        ));
        assert!(matches!(
            state.plan_backend_set_weight(&key(80), be(13), 1),
            Err(StateError::UnknownBackend { .. })
        ));
    }

    #[test]
    fn checks_are_planned_and_validated() {
        use crate::model::check::CheckKind;
        use std::time::Duration;
        let state = DesiredState::from_specs([spec(80, &[(11, 1)])]).unwrap();
        let http = CheckPatch {
            kind: Some(CheckKind::Http),
            path: Some("/healthz".into()),
            interval: Some(Duration::from_millis(200)),
            timeout: Some(Duration::from_millis(200)),
            ..Default::default()
        };
        let set = state
            .plan_vip_set(&key(80), &http, None, &no_policy())
            .unwrap();
        assert_eq!(set.check.kind, CheckKind::Http);
        assert_eq!(set.check.rise, 2, "unset fields keep their values");
        assert!(set.icmp_echo, "ICMP echo kept");
        let echo_off = state
            .plan_vip_set(&key(80), &none(), Some(false), &no_policy())
            .unwrap();
        assert!(!echo_off.icmp_echo);
        assert_eq!(
            echo_off.check,
            state.get(&key(80)).unwrap().check,
            "check kept"
        );
        let bad = CheckPatch {
            timeout: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        assert_eq!(
            state
                .plan_vip_set(&key(80), &bad, None, &no_policy())
                .unwrap_err()
                .to_string(),
            "VIP 10.111.100.1:80/tcp: check timeout 2s exceeds the interval 1s (a check must end before the next one starts)"
        );
        assert!(matches!(
            state.plan_vip_set(&key(80), &none(), None, &no_policy()),
            Err(StateError::NothingToSet(_))
        ));
        assert!(matches!(
            state.plan_vip_add(key(81), Forward::Ipip, &bad, &no_policy()),
            Err(StateError::VipCheck { .. })
        ));
        // A backend override is the VIP's check with the flags applied.
        let port = CheckPatch {
            port: Some(8080),
            ..Default::default()
        };
        let added = state
            .plan_backend_add(&key(80), be(12), 1, false, &port)
            .unwrap();
        let own = added.backends[1].check.as_ref().unwrap();
        assert_eq!((own.kind, own.port), (CheckKind::Tcp, Some(8080)));
        assert!(added.backends[0].check.is_none());
        assert!(matches!(
            state.plan_backend_add(&key(80), be(12), 1, false, &bad),
            Err(StateError::BackendCheck { .. })
        ));
        let udp = ServiceKey {
            proto: crate::model::Proto::Udp,
            ..key(53)
        };
        let v = state
            .plan_vip_add(udp, Forward::Ipip, &none(), &no_policy())
            .unwrap();
        assert_eq!(v.check.kind, CheckKind::None);
    }

    #[test]
    fn source_policies_are_planned_validated_and_stored() {
        use crate::model::policy::{RateLimit, RateSetting};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let state = DesiredState::from_specs([spec(80, &[(11, 1)])]).unwrap();
        let patch = PolicyPatch {
            allow_src: Some(vec!["10.0.0.0/8".parse().unwrap()]),
            src_rate: Some(RateSetting::Rate(10)),
            src_burst: Some(20),
            ..Default::default()
        };
        let set = state.plan_vip_set(&key(80), &none(), None, &patch).unwrap();
        assert_eq!(
            set.policy.src_limit,
            Some(RateLimit {
                rate: 10,
                burst: 20
            })
        );
        assert_eq!(set.check, state.get(&key(80)).unwrap().check, "check kept");
        let bad = PolicyPatch {
            vip_burst: Some(5),
            ..Default::default()
        };
        assert!(matches!(
            state.plan_vip_set(&key(80), &none(), None, &bad),
            Err(StateError::Policy { .. })
        ));
        let added = state
            .plan_vip_add(key(81), Forward::Ipip, &none(), &patch)
            .unwrap();
        assert_eq!(added.policy, set.policy);
        // A VIP's lists hold prefixes of its family: an IPv6 VIP takes IPv6 ones, and
        // refuses an IPv4 one (as an IPv4 VIP refuses an IPv6 one), naming it.
        let v6 = ServiceKey {
            addr: "fd11:100::1".parse().unwrap(),
            ..key(80)
        };
        let v6_lists = PolicyPatch {
            allow_src: Some(vec!["fd11:1::/64".parse().unwrap()]),
            deny_src: Some(vec!["fd11:1::bad/128".parse().unwrap()]),
            ..patch.clone()
        };
        assert!(
            state
                .plan_vip_add(v6, Forward::Ipip, &none(), &v6_lists)
                .is_ok()
        );
        let e = state
            .plan_vip_add(v6, Forward::Ipip, &none(), &patch)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "VIP [fd11:100::1]:80/tcp is IPv6: --allow-src 10.0.0.0/8 is an IPv4 prefix, which \
             none of its clients has (a VIP's source lists hold prefixes of its own family)"
        );
        let wrong = PolicyPatch {
            deny_src: Some(vec!["2001:db8::/32".parse().unwrap()]),
            ..Default::default()
        };
        let e = state
            .plan_vip_add(key(82), Forward::Ipip, &none(), &wrong)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--deny-src 2001:db8::/32 is an IPv6 prefix"),
            "{e}"
        );
        let stored = DesiredState::from_specs([set]).unwrap();
        save(&path, &stored).unwrap();
        assert_eq!(load(&path).unwrap().unwrap(), stored);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"allow_src\""), "{text}");
    }

    #[test]
    fn state_files_without_checks_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        fs::write(
            &path,
            r#"{"version":1,"vips":[{"key":{"addr":"10.111.100.1","port":80,"proto":"tcp"},
               "forward":"ipip","backends":[{"addr":"10.111.1.11","weight":1}]},
              {"key":{"addr":"10.111.100.1","port":53,"proto":"udp"},"forward":"ipip","backends":[]}]}"#,
        )
        .unwrap();
        let s = load(&path).unwrap().unwrap();
        let vips: Vec<&VipConfig> = s.vips().collect();
        assert_eq!(vips[0].check.kind, crate::model::check::CheckKind::None);
        assert_eq!(
            vips[1].check,
            crate::model::check::CheckSpec::default_for(crate::model::Proto::Tcp)
        );
        assert_eq!(vips[1].backends, vec![BackendConfig::new(be(11), 1)]);
        assert!(
            vips.iter().all(|v| v.icmp_echo),
            "ICMP echo on when not stored"
        );
        // Written back, with checks, it loads to the same.
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap().unwrap(), s);
    }

    #[test]
    fn from_specs_rejects_bad_sets() {
        assert!(matches!(
            DesiredState::from_specs([spec(80, &[]), spec(80, &[])]),
            Err(StateError::DuplicateVip(_))
        ));
        assert!(matches!(
            DesiredState::from_specs([spec(80, &[(11, 1), (11, 2)])]),
            Err(StateError::DuplicateBackend { .. })
        ));
        assert!(matches!(
            DesiredState::from_specs([spec(80, &[(11, 300)])]),
            Err(StateError::WeightTooHigh { .. })
        ));
        let s = DesiredState::from_specs([spec(80, &[(11, 1), (12, 1)]), spec(81, &[(12, 1)])])
            .unwrap();
        assert_eq!(s.vip_count(), 2);
        assert_eq!(s.backend_count(), 3);
        assert_eq!(s.backend_addrs(), vec![be(11), be(12)]);
    }

    #[test]
    fn a_vips_backends_have_its_family_except_ipv4_in_ipv6() {
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let key6 = ServiceKey {
            addr: v6("fd11:100::1"),
            ..key(80)
        };
        let state = DesiredState::from_specs([
            spec(80, &[]),
            VipConfig::new(key(81), Forward::L2),
            VipConfig::new(key6, Forward::Ipip),
        ])
        .unwrap();
        // Same family: fine, for IPv6 too; the VIP is written [ADDR]:PORT.
        let s = state
            .plan_backend_add(&key6, v6("fd11:2::11"), 1, false, &none())
            .unwrap();
        assert_eq!(s.key.to_string(), "[fd11:100::1]:80/tcp");
        // An IPv4 VIP with ipip may have IPv6 backends (IPv4 in IPv6)…
        assert!(
            state
                .plan_backend_add(&key(80), v6("fd11:2::11"), 1, false, &none())
                .is_ok()
        );
        // …but not with l2, and an IPv6 VIP never has IPv4 backends.
        assert_eq!(
            state
                .plan_backend_add(&key(81), v6("fd11:2::11"), 1, false, &none())
                .unwrap_err()
                .to_string(),
            "backend fd11:2::11 is IPv6, VIP 10.111.100.1:81/tcp is IPv4: a VIP's backends have its address family (an IPv4 VIP with --forward ipip may have IPv6 backends: IPv4 in IPv6)"
        );
        assert_eq!(
            state
                .plan_backend_add(&key6, be(11), 1, false, &none())
                .unwrap_err()
                .to_string(),
            "backend 10.111.1.11 is IPv4, VIP [fd11:100::1]:80/tcp is IPv6: a VIP's backends have its address family (an IPv4 VIP with --forward ipip may have IPv6 backends: IPv4 in IPv6)"
        );
        // IPv6 addresses that name no host: refused as VIPs and as backends.
        for bad in ["::", "ff02::1", "fe80::1", "::ffff:10.111.1.11"] {
            assert!(
                matches!(
                    state.plan_backend_add(&key6, v6(bad), 1, false, &none()),
                    Err(StateError::BadBackendAddress { .. })
                ),
                "{bad}"
            );
            let vip = ServiceKey {
                addr: v6(bad),
                ..key6
            };
            assert!(
                matches!(
                    state.plan_vip_add(vip, Forward::L2, &none(), &no_policy()),
                    Err(StateError::BadVipAddress(..))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn ipv6_vips_round_trip_through_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let mut v6 = VipConfig::new(
            ServiceKey {
                addr: "fd11:100::1".parse().unwrap(),
                ..key(80)
            },
            Forward::L2,
        );
        v6.backends = vec![BackendConfig::new("fd11:2::11".parse().unwrap(), 2)];
        let state = DesiredState::from_specs([spec(80, &[(11, 1)]), v6]).unwrap();
        save(&path, &state).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        // Addresses are strings of either family, as IPv4 ones always were.
        assert!(text.contains(r#""addr": "fd11:100::1""#), "{text}");
        assert!(text.contains(r#""addr": "10.111.100.1""#), "{text}");
        assert_eq!(load(&path).unwrap().unwrap(), state);
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        assert!(load(&path).unwrap().is_none());
        let state =
            DesiredState::from_specs([spec(80, &[(11, 1), (12, 3)]), spec(8080, &[])]).unwrap();
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap().unwrap(), state);
        // Saving again replaces the content and leaves no temporary file behind.
        let smaller = DesiredState::from_specs([spec(80, &[(12, 3)])]).unwrap();
        save(&path, &smaller).unwrap();
        assert_eq!(load(&path).unwrap().unwrap(), smaller);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[test]
    fn failed_save_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let state = DesiredState::from_specs([spec(80, &[(11, 1)])]).unwrap();
        save(&path, &state).unwrap();
        // A path whose parent is a regular file cannot be written (even by root).
        let blocked = path.join("nested.json");
        assert!(matches!(
            save(&blocked, &state),
            Err(StateError::Write { .. })
        ));
        assert_eq!(load(&path).unwrap().unwrap(), state);
    }

    #[test]
    fn corrupt_or_invalid_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        fs::write(&path, b"{not json").unwrap();
        assert!(matches!(load(&path), Err(StateError::Corrupt { .. })));
        fs::write(&path, br#"{"version":99,"vips":[]}"#).unwrap();
        assert!(matches!(
            load(&path),
            Err(StateError::Version { found: 99, .. })
        ));
        let dup = StateFile {
            version: STATE_VERSION,
            vips: vec![spec(80, &[]), spec(80, &[])],
        };
        fs::write(&path, serde_json::to_vec(&dup).unwrap()).unwrap();
        assert!(matches!(load(&path), Err(StateError::DuplicateVip(_))));
    }
}
