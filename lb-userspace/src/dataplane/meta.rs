//! `META-v1`, a one-entry array pinned with a data path: the interface's name and the attach
//! mode (for logs and for `xlb detach --pin-dir`), and what the agent changed on the host so
//! that removing the data path can put it back. bpffs holds no regular files, so this is a map.
//!
//! `ROUTES-v1`, another one-entry array, is there while an agent announces the data path's VIP
//! addresses (`--announce-table`): the routing table and route protocol of those routes, so that
//! whoever removes the data path (`xlb detach` without an agent) withdraws them first, and a
//! restarted agent knows which routes the data path it takes over was announced with.

use super::{AttachedMode, pins::PinError};
use aya::maps::{Array, IterableMap, MapData};
use std::{io, path::Path};

/// Pin name of the record (layout version 1).
pub(crate) const META_PIN: &str = "META-v1";
const MAGIC: u32 = u32::from_be_bytes(*b"XLB1");
/// `forwarding_before` when nothing was recorded.
const NOT_RECORDED: u32 = u32::MAX;
/// `forwarding_before` bits: IPv4 forwarding; IPv6 recorded, its forwarding, its
/// force_forwarding.
const FWD_V4: u32 = 1;
const FWD_V6_RECORDED: u32 = 2;
const FWD_V6: u32 = 4;
const FWD_V6_FORCE: u32 = 8;

/// The record, host order throughout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PinMeta {
    magic: u32,
    ifindex: u32,
    /// `net.ipv4.conf.<ifname>.forwarding` before the agent turned it on (bit 0), or
    /// `NOT_RECORDED`; IPv6's `forwarding` and `force_forwarding` (bits 2 and 3) when bit 1 says
    /// they were recorded. Records of builds before IPv6 hold 0 or 1: IPv4 only, read the same.
    forwarding_before: u32,
    /// 1 driver, 2 generic, 0 unknown.
    mode: u32,
    /// NUL-padded.
    ifname: [u8; 16],
}

// SAFETY: repr(C), integers and bytes only, no padding (4 × 4 + 16 bytes).
unsafe impl aya::Pod for PinMeta {}

const _: () = assert!(size_of::<PinMeta>() == 32);

impl PinMeta {
    pub(crate) fn new(ifname: &str, ifindex: u32) -> Self {
        let mut name = [0u8; 16];
        let n = ifname.len().min(15);
        name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
        PinMeta {
            magic: MAGIC,
            ifindex,
            forwarding_before: NOT_RECORDED,
            mode: 0,
            ifname: name,
        }
    }

    pub(crate) fn ifname(&self) -> String {
        let end = self.ifname.iter().position(|b| *b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.ifname[..end]).into_owned()
    }

    pub(crate) fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub(crate) fn forwarding_before(&self) -> Option<bool> {
        match self.forwarding_before {
            NOT_RECORDED => None,
            v => Some(v & FWD_V4 != 0),
        }
    }

    pub(crate) fn set_forwarding_before(&mut self, on: bool) {
        self.forwarding_before = if on { FWD_V4 } else { 0 };
    }

    /// IPv6 `forwarding` and `force_forwarding` before the agent turned them on, if recorded.
    pub(crate) fn forwarding6_before(&self) -> Option<(bool, bool)> {
        match self.forwarding_before {
            NOT_RECORDED => None,
            v if v & FWD_V6_RECORDED == 0 => None,
            v => Some((v & FWD_V6 != 0, v & FWD_V6_FORCE != 0)),
        }
    }

    /// Record IPv6's settings (after `set_forwarding_before`).
    pub(crate) fn set_forwarding6_before(&mut self, forwarding: bool, force: bool) {
        if self.forwarding_before == NOT_RECORDED {
            return;
        }
        self.forwarding_before = (self.forwarding_before & FWD_V4)
            | FWD_V6_RECORDED
            | if forwarding { FWD_V6 } else { 0 }
            | if force { FWD_V6_FORCE } else { 0 };
    }

    pub(crate) fn mode(&self) -> Option<AttachedMode> {
        match self.mode {
            1 => Some(AttachedMode::Driver),
            2 => Some(AttachedMode::Generic),
            _ => None,
        }
    }

    pub(crate) fn set_mode(&mut self, mode: AttachedMode) {
        self.mode = match mode {
            AttachedMode::Driver => 1,
            AttachedMode::Generic => 2,
        };
    }
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(aya::maps::MapError) -> PinError {
    let path = path.to_path_buf();
    move |e| PinError::Io {
        what,
        path,
        source: io::Error::other(e),
    }
}

/// The record pinned in `dir`, if there is a readable one.
pub(crate) fn read(dir: &Path) -> Option<PinMeta> {
    read_record::<PinMeta>(&dir.join(META_PIN)).filter(|m| m.magic == MAGIC)
}

/// The value of the one-entry array pinned at `path`, if there is a readable one.
fn read_record<T: aya::Pod>(path: &Path) -> Option<T> {
    let data = MapData::from_pin(path).ok()?;
    let map = aya::maps::Map::from_map_data(data).ok()?;
    let array: Array<MapData, T> = Array::try_from(map).ok()?;
    array.get(&0, 0).ok()
}

/// Write `meta` as the record of `dir` (creating and pinning the map when there is none).
pub(crate) fn write(dir: &Path, meta: &PinMeta) -> Result<(), PinError> {
    write_record(&dir.join(META_PIN), *meta)
}

/// The one-entry array pinned at `path` (created and pinned when there is none), set to `value`.
fn write_record<T: aya::Pod>(path: &Path, value: T) -> Result<(), PinError> {
    let mut array: Array<MapData, T> = match MapData::from_pin(path) {
        Ok(data) => aya::maps::Map::from_map_data(data)
            .and_then(Array::try_from)
            .map_err(err("opening", path))?,
        Err(_) => {
            let array = Array::<MapData, T>::create(1, 0).map_err(err("creating", path))?;
            array.map().pin(path).map_err(|e| PinError::Io {
                what: "pinning",
                path: path.to_path_buf(),
                source: io::Error::other(e),
            })?;
            array
        }
    };
    array.set(0, value, 0).map_err(err("writing", path))
}

/// Pin name of the announcement record (layout version 1).
pub(crate) const ROUTES_PIN: &str = "ROUTES-v1";
const ROUTES_MAGIC: u32 = u32::from_be_bytes(*b"XLBR");

/// The announcement record, host order throughout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PinRoutes {
    magic: u32,
    table: u32,
    proto: u32,
    reserved: u32,
}

// SAFETY: repr(C), four u32, no padding.
unsafe impl aya::Pod for PinRoutes {}

/// Whether `file` (a name in a pin directory) is one of the host records rather than a map of
/// the data path.
pub(crate) fn is_record(file: &std::ffi::OsStr) -> bool {
    file == META_PIN || file == ROUTES_PIN
}

/// The routing table and route protocol recorded in `dir`, if an agent announced there.
pub fn announced_routes(dir: &Path) -> Option<(u32, u8)> {
    let r = read_record::<PinRoutes>(&dir.join(ROUTES_PIN)).filter(|r| r.magic == ROUTES_MAGIC)?;
    Some((r.table, u8::try_from(r.proto).ok()?))
}

/// Record (`Some((table, proto))`) or forget (`None`) the data path's announcement in `dir`.
pub fn record_routes(dir: &Path, routes: Option<(u32, u8)>) -> Result<(), PinError> {
    let path = dir.join(ROUTES_PIN);
    let Some((table, proto)) = routes else {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PinError::Io {
                what: "removing",
                path,
                source: e,
            }),
            _ => Ok(()),
        };
    };
    write_record(
        &path,
        PinRoutes {
            magic: ROUTES_MAGIC,
            table,
            proto: u32::from(proto),
            reserved: 0,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_keeps_name_mode_and_sysctl() {
        let mut m = PinMeta::new("a-very-long-interface-name", 7);
        assert_eq!(m.ifname(), "a-very-long-int", "truncated to IFNAMSIZ - 1");
        assert_eq!(m.ifindex(), 7);
        assert_eq!((m.forwarding_before(), m.mode()), (None, None));
        m.set_forwarding_before(false);
        assert_eq!(m.forwarding6_before(), None);
        m.set_forwarding6_before(true, false);
        assert_eq!(m.forwarding6_before(), Some((true, false)));
        m.set_mode(AttachedMode::Generic);
        assert_eq!(m.forwarding_before(), Some(false));
        assert_eq!(m.mode(), Some(AttachedMode::Generic));
        assert_eq!(PinMeta::new("eth0", 2).ifname(), "eth0");
    }
}
