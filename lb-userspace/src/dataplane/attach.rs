//! How the balancer is attached: the mode asked for (`XdpModeChoice`, with `auto` falling back
//! from driver to generic mode) and the mode it got (`AttachedMode`). The agent attaches through
//! a bpf_link, which it pins (`live`) so that the data path outlives it; `persistent` attaches
//! the other programs by netlink.

use super::DataplaneError;
use aya::programs::{Xdp, XdpMode, links::FdLink};
use serde::{Deserialize, Serialize};
use std::fmt;

/// How to attach (`--xdp-mode`, `xdp_mode` under `[agent]`): `auto` tries driver (native) mode
/// and falls back to generic. `native` and `skb`, the kernel's names, are accepted too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(try_from = "String")]
pub enum XdpModeChoice {
    /// Driver (native) mode if the driver supports it, generic otherwise (with a warning).
    #[default]
    Auto,
    /// Driver (native) mode only.
    #[value(alias = "native")]
    Driver,
    /// Generic (SKB) mode: works everywhere, slower.
    #[value(alias = "skb")]
    Generic,
}

/// An `xdp_mode` in the config file that is none of the modes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown XDP mode {0:?} (expected auto, driver or generic)")]
pub struct UnknownXdpMode(String);

impl TryFrom<String> for XdpModeChoice {
    type Error = UnknownXdpMode;
    /// The same names (and aliases) as on the command line.
    fn try_from(s: String) -> Result<Self, UnknownXdpMode> {
        <Self as clap::ValueEnum>::from_str(&s, false).map_err(|_| UnknownXdpMode(s))
    }
}

/// The mode a program actually got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    Driver,
    Generic,
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachedMode::Driver => "driver",
            AttachedMode::Generic => "generic",
        })
    }
}

/// Attach `prog` to `iface` in `mode` (auto: driver, else generic, with a warning); the link,
/// taken out of the program so that dropping the program does not detach it.
pub(super) fn attach_link(
    prog: &mut Xdp,
    iface: &str,
    mode: XdpModeChoice,
) -> Result<(AttachedMode, FdLink), DataplaneError> {
    let attempts: &[(XdpMode, AttachedMode)] = match mode {
        XdpModeChoice::Driver => &[(XdpMode::Driver, AttachedMode::Driver)],
        XdpModeChoice::Generic => &[(XdpMode::Skb, AttachedMode::Generic)],
        XdpModeChoice::Auto => &[
            (XdpMode::Driver, AttachedMode::Driver),
            (XdpMode::Skb, AttachedMode::Generic),
        ],
    };
    let mut last_err = None;
    for (flag, attached) in attempts {
        match prog.attach(iface, *flag) {
            Ok(id) => {
                let link = prog
                    .take_link(id)
                    .map_err(|source| DataplaneError::Attach {
                        iface: iface.to_string(),
                        mode: *attached,
                        source,
                    })?;
                // A link made by netlink (kernels before 5.9) cannot be pinned.
                let link = FdLink::try_from(link).map_err(|e| DataplaneError::Link {
                    what: "the kernel attached XDP without a bpf_link, which cannot be pinned",
                    source: Box::new(e),
                })?;
                return Ok((*attached, link));
            }
            Err(source) => {
                if mode == XdpModeChoice::Auto && *attached == AttachedMode::Driver {
                    log::warn!(
                        "driver-mode XDP on {iface} failed ({source}); falling back to generic mode, which is slower"
                    );
                }
                last_err = Some(DataplaneError::Attach {
                    iface: iface.to_string(),
                    mode: *attached,
                    source,
                });
            }
        }
    }
    Err(last_err.expect("at least one attach attempt"))
}
