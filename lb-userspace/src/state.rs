//! The agent's desired state (VIPs, backends, weights), its validation rules, and its on-disk form.
//!
//! Every change is planned first (`plan_*` return the VIP as it would become, touching nothing), so
//! the controller can validate, apply to the kernel and persist before it commits the change here.
//! The file is written atomically (temporary file, fsync, rename, fsync of the directory), so a
//! crash leaves either the old or the new state, never a torn one.

use crate::model::{BackendSpec, Forward, MAX_WEIGHT, ServiceKey, VipSpec};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{self, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// Name of the state file inside `--state-dir`.
pub const STATE_FILE: &str = "state.json";
/// Version of the on-disk format; bumped when it changes incompatibly.
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("VIP {0} already exists")]
    DuplicateVip(ServiceKey),
    #[error("unknown VIP {0}")]
    UnknownVip(ServiceKey),
    #[error("backend {addr} already exists in VIP {key}")]
    DuplicateBackend { key: ServiceKey, addr: Ipv4Addr },
    #[error("unknown backend {addr} in VIP {key}")]
    UnknownBackend { key: ServiceKey, addr: Ipv4Addr },
    #[error("weight {weight} of backend {addr} in VIP {key} is above the maximum of {MAX_WEIGHT}")]
    WeightTooHigh {
        key: ServiceKey,
        addr: Ipv4Addr,
        weight: u32,
    },
    #[error("VIP {0}: port 0 is not a valid port")]
    PortZero(ServiceKey),
    #[error("VIP {0}: {1} is not a unicast host address")]
    BadVipAddress(ServiceKey, Ipv4Addr),
    #[error("backend {addr} in VIP {key}: not a unicast host address")]
    BadBackendAddress { key: ServiceKey, addr: Ipv4Addr },
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
pub struct DesiredState {
    vips: BTreeMap<ServiceKey, VipSpec>,
}

/// Unicast, not 0.0.0.0 (which the data path uses as "free slot"), not limited broadcast.
fn is_host_address(addr: Ipv4Addr) -> bool {
    !(addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast())
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

fn validate_backend(key: &ServiceKey, b: &BackendSpec) -> Result<(), StateError> {
    if !is_host_address(b.addr) {
        return Err(StateError::BadBackendAddress {
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
    Ok(())
}

/// Every rule that applies to one VIP on its own.
pub fn validate_spec(spec: &VipSpec) -> Result<(), StateError> {
    validate_key(&spec.key)?;
    let mut seen = BTreeSet::new();
    for b in &spec.backends {
        validate_backend(&spec.key, b)?;
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
    pub fn from_specs(specs: impl IntoIterator<Item = VipSpec>) -> Result<Self, StateError> {
        let mut vips = BTreeMap::new();
        for spec in specs {
            validate_spec(&spec)?;
            if vips.contains_key(&spec.key) {
                return Err(StateError::DuplicateVip(spec.key));
            }
            vips.insert(spec.key, spec);
        }
        Ok(DesiredState { vips })
    }

    pub fn vips(&self) -> impl Iterator<Item = &VipSpec> {
        self.vips.values()
    }

    pub fn get(&self, key: &ServiceKey) -> Option<&VipSpec> {
        self.vips.get(key)
    }

    pub fn vip_count(&self) -> usize {
        self.vips.len()
    }

    pub fn backend_count(&self) -> usize {
        self.vips.values().map(|v| v.backends.len()).sum()
    }

    /// Every distinct backend address over all VIPs.
    pub fn backend_addrs(&self) -> Vec<Ipv4Addr> {
        let set: BTreeSet<Ipv4Addr> = self
            .vips
            .values()
            .flat_map(|v| v.backends.iter().map(|b| b.addr))
            .collect();
        set.into_iter().collect()
    }

    fn existing(&self, key: &ServiceKey) -> Result<&VipSpec, StateError> {
        self.vips.get(key).ok_or(StateError::UnknownVip(*key))
    }

    /// The new VIP `vip add` would create (no backends yet).
    pub fn plan_vip_add(&self, key: ServiceKey, forward: Forward) -> Result<VipSpec, StateError> {
        validate_key(&key)?;
        if self.vips.contains_key(&key) {
            return Err(StateError::DuplicateVip(key));
        }
        Ok(VipSpec {
            key,
            forward,
            backends: Vec::new(),
        })
    }

    /// The VIP `vip del` would remove.
    pub fn plan_vip_del(&self, key: &ServiceKey) -> Result<&VipSpec, StateError> {
        self.existing(key)
    }

    /// The VIP as `backend add` would leave it (new backend appended, order kept).
    pub fn plan_backend_add(
        &self,
        key: &ServiceKey,
        addr: Ipv4Addr,
        weight: u32,
    ) -> Result<VipSpec, StateError> {
        let mut spec = self.existing(key)?.clone();
        let backend = BackendSpec { addr, weight };
        validate_backend(key, &backend)?;
        if spec.backends.iter().any(|b| b.addr == addr) {
            return Err(StateError::DuplicateBackend { key: *key, addr });
        }
        spec.backends.push(backend);
        Ok(spec)
    }

    /// The VIP as `backend del` would leave it.
    pub fn plan_backend_del(
        &self,
        key: &ServiceKey,
        addr: Ipv4Addr,
    ) -> Result<VipSpec, StateError> {
        let mut spec = self.existing(key)?.clone();
        let before = spec.backends.len();
        spec.backends.retain(|b| b.addr != addr);
        if spec.backends.len() == before {
            return Err(StateError::UnknownBackend { key: *key, addr });
        }
        Ok(spec)
    }

    /// Insert or replace a VIP (after it was planned, applied and persisted).
    pub fn insert(&mut self, spec: VipSpec) {
        self.vips.insert(spec.key, spec);
    }

    pub fn remove(&mut self, key: &ServiceKey) -> Option<VipSpec> {
        self.vips.remove(key)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    vips: Vec<VipSpec>,
}

/// Write `bytes` to `path` so that readers (and a crash) see the old content or the new, never a
/// mix: temporary file in the same directory, fsync, rename over, fsync the directory (so the rename
/// itself survives a power loss).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: a leftover temporary file is harmless but untidy.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Persist `state` to `path` atomically.
pub fn save(path: &Path, state: &DesiredState) -> Result<(), StateError> {
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
pub fn load(path: &Path) -> Result<Option<DesiredState>, StateError> {
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
            addr: Ipv4Addr::new(10, 111, 100, 1),
            port,
            proto: Proto::Tcp,
        }
    }
    fn be(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 111, 1, last)
    }
    fn spec(port: u16, backends: &[(u8, u32)]) -> VipSpec {
        VipSpec {
            key: key(port),
            forward: Forward::Ipip,
            backends: backends
                .iter()
                .map(|&(b, weight)| BackendSpec {
                    addr: be(b),
                    weight,
                })
                .collect(),
        }
    }

    #[test]
    fn plans_validate_and_do_not_mutate() {
        let state = DesiredState::from_specs([spec(80, &[(11, 1)])]).unwrap();
        let before = state.clone();

        assert!(matches!(
            state.plan_vip_add(key(80), Forward::L2),
            Err(StateError::DuplicateVip(k)) if k == key(80)
        ));
        assert!(matches!(
            state.plan_vip_add(key(0), Forward::L2),
            Err(StateError::PortZero(_))
        ));
        let bad_addr = ServiceKey {
            addr: Ipv4Addr::UNSPECIFIED,
            ..key(80)
        };
        assert!(matches!(
            state.plan_vip_add(bad_addr, Forward::L2),
            Err(StateError::BadVipAddress(..))
        ));
        let e = state.plan_backend_add(&key(81), be(12), 1).unwrap_err();
        assert_eq!(e.to_string(), "unknown VIP 10.111.100.1:81/tcp");
        let e = state.plan_backend_add(&key(80), be(11), 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "backend 10.111.1.11 already exists in VIP 10.111.100.1:80/tcp"
        );
        assert!(matches!(
            state.plan_backend_add(&key(80), be(12), MAX_WEIGHT + 1),
            Err(StateError::WeightTooHigh { weight, .. }) if weight == MAX_WEIGHT + 1
        ));
        assert!(state.plan_backend_add(&key(80), be(12), MAX_WEIGHT).is_ok());
        assert!(matches!(
            state.plan_backend_add(&key(80), Ipv4Addr::UNSPECIFIED, 1),
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
        let added = state.plan_backend_add(&key(80), be(13), 5).unwrap();
        assert_eq!(added, spec(80, &[(11, 1), (12, 2), (13, 5)]));
        let deleted = state.plan_backend_del(&key(80), be(11)).unwrap();
        assert_eq!(deleted, spec(80, &[(12, 2)]));
        let new_vip = state.plan_vip_add(key(443), Forward::L2).unwrap();
        assert_eq!(new_vip.backends, vec![]);
        assert_eq!(new_vip.forward, Forward::L2);
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
