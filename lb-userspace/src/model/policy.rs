//! A VIP's door policy: who may open flows to it (source allow and deny lists) and how fast new
//! flows may come (per source address, per VIP). `SourcePolicy` is the desired state;
//! `PolicyPatch` a change to it from `vip add|set` flags or a TOML table.

use crate::model::net::{IpNet, NetError};
use serde::{Deserialize, Serialize};

/// Largest new-flow rate accepted (flows per second, for a source or a VIP): more than one core
/// can assign, so any larger number is a typo.
pub const MAX_RATE: u32 = 10_000_000;
/// Largest burst accepted (flows).
pub const MAX_BURST: u32 = 10_000_000;
/// Most prefixes in one VIP's allow list, and in its deny list.
pub const MAX_LIST: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{what} must be at least 1 (leave it out, or give \"off\" in `vip set`, for no limit)")]
    Zero { what: &'static str },
    #[error("{what} {value} is above the maximum of {max}")]
    TooHigh {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("{what} needs {needs} (a burst belongs to a limit)")]
    BurstWithoutRate {
        what: &'static str,
        needs: &'static str,
    },
    #[error("{what} lists {n} prefixes; at most {MAX_LIST}")]
    TooManyPrefixes { what: &'static str, n: usize },
    #[error("{what} lists {prefix} twice")]
    Duplicate { what: &'static str, prefix: IpNet },
    #[error("malformed {what} {value:?}: expected a number of new flows per second, or \"off\"")]
    BadRate { what: &'static str, value: String },
    #[error("malformed {what} {value:?}: expected a number of flows")]
    BadBurst { what: &'static str, value: String },
    #[error("{what}: {source}")]
    Prefix {
        what: &'static str,
        source: NetError,
    },
    #[error("{what} none clears the list and takes no prefix next to it")]
    NoneWithPrefixes { what: &'static str },
}

/// A new-flow limit: `rate` flows per second with bursts of up to `burst` flows (a token bucket
/// of `burst` tokens, refilled at `rate` per second).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub rate: u32,
    pub burst: u32,
}

impl RateLimit {
    /// Nanoseconds between two flows at this rate, and how far ahead of now the bucket may run
    /// (`burst` of them): the data path's GCRA parameters (`lb_common::VipLimits`).
    pub fn gcra_ns(&self) -> (u64, u64) {
        let interval = 1_000_000_000 / u64::from(self.rate.max(1));
        (interval, interval * u64::from(self.burst))
    }

    /// The limit a `gcra_ns` pair was made from, as near as the integer interval tells (read
    /// back from a running data path; a rate whose interval rounds is read as the nearest).
    pub fn from_gcra_ns(interval_ns: u64, tolerance_ns: u64) -> Self {
        let interval = interval_ns.max(1);
        let rate = (1_000_000_000 + interval / 2) / interval;
        RateLimit {
            rate: u32::try_from(rate.max(1)).unwrap_or(u32::MAX),
            burst: u32::try_from(tolerance_ns / interval).unwrap_or(u32::MAX),
        }
    }
}

/// Who may open flows to a VIP and how fast. Empty lists and no limits: everyone, unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePolicy {
    /// Sources that may reach the VIP (none: every source). Longest-prefix match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_src: Vec<IpNet>,
    /// Sources that may not (wins over the allow list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_src: Vec<IpNet>,
    /// New flows per (source address, VIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_limit: Option<RateLimit>,
    /// New flows per VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip_limit: Option<RateLimit>,
}

impl SourcePolicy {
    pub fn is_empty(&self) -> bool {
        *self == SourcePolicy::default()
    }

    /// One line for messages and tables: `allow 2, deny 1, 10/s (burst 20) per source, 1000/s
    /// (burst 1000) per VIP`, or `-` for none.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        let list = |what: &str, l: &[IpNet]| match l {
            [] => None,
            [one] => Some(format!("{what} {one}")),
            many => Some(format!("{what} {} prefixes", many.len())),
        };
        parts.extend(list("allow", &self.allow_src));
        parts.extend(list("deny", &self.deny_src));
        for (limit, per) in [(self.src_limit, "source"), (self.vip_limit, "VIP")] {
            if let Some(l) = limit {
                parts.push(format!("{}/s (burst {}) per {per}", l.rate, l.burst));
            }
        }
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(", ")
        }
    }

    /// Every rule of a policy on its own (the data path's capacity over all VIPs is checked by
    /// the data path).
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (what, list) in [
            ("--allow-src", &self.allow_src),
            ("--deny-src", &self.deny_src),
        ] {
            if list.len() > MAX_LIST {
                return Err(PolicyError::TooManyPrefixes {
                    what,
                    n: list.len(),
                });
            }
            let mut seen = std::collections::BTreeSet::new();
            for prefix in list {
                if !seen.insert(prefix) {
                    return Err(PolicyError::Duplicate {
                        what,
                        prefix: *prefix,
                    });
                }
            }
        }
        for (rate, burst, limit) in [
            ("--src-rate", "--src-burst", &self.src_limit),
            ("--vip-rate", "--vip-burst", &self.vip_limit),
        ] {
            if let Some(l) = limit {
                check_number(rate, l.rate, MAX_RATE)?;
                check_number(burst, l.burst, MAX_BURST)?;
            }
        }
        Ok(())
    }

    /// This policy with `patch` applied (fields the patch leaves out keep their values).
    pub fn patched(&self, patch: &PolicyPatch) -> Result<SourcePolicy, PolicyError> {
        let mut p = self.clone();
        if let Some(list) = &patch.allow_src {
            p.allow_src = list.clone();
        }
        if let Some(list) = &patch.deny_src {
            p.deny_src = list.clone();
        }
        p.src_limit = patch_limit(
            p.src_limit,
            patch.src_rate,
            patch.src_burst,
            ("--src-burst", "--src-rate"),
        )?;
        p.vip_limit = patch_limit(
            p.vip_limit,
            patch.vip_rate,
            patch.vip_burst,
            ("--vip-burst", "--vip-rate"),
        )?;
        p.validate()?;
        Ok(p)
    }
}

fn check_number(what: &'static str, value: u32, max: u32) -> Result<(), PolicyError> {
    if value == 0 {
        return Err(PolicyError::Zero { what });
    }
    if value > max {
        return Err(PolicyError::TooHigh {
            what,
            value: value.into(),
            max: max.into(),
        });
    }
    Ok(())
}

/// A limit after a patch: a new rate gets the given burst or, without one, a burst equal to
/// the rate (one second's worth); a burst alone changes the burst of the limit there is.
fn patch_limit(
    current: Option<RateLimit>,
    rate: Option<RateSetting>,
    burst: Option<u32>,
    (burst_flag, rate_flag): (&'static str, &'static str),
) -> Result<Option<RateLimit>, PolicyError> {
    match (rate, burst, current) {
        (None, None, current) => Ok(current),
        (Some(RateSetting::Off), Some(_), _) => Err(PolicyError::BurstWithoutRate {
            what: burst_flag,
            needs: "a limit (not \"off\")",
        }),
        (Some(RateSetting::Off), None, _) => Ok(None),
        (Some(RateSetting::Rate(rate)), burst, _) => Ok(Some(RateLimit {
            rate,
            burst: burst.unwrap_or(rate),
        })),
        (None, Some(burst), Some(current)) => Ok(Some(RateLimit { burst, ..current })),
        (None, Some(_), None) => Err(PolicyError::BurstWithoutRate {
            what: burst_flag,
            needs: rate_flag,
        }),
    }
}

/// A new-flow rate as given: a number, or off (no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateSetting {
    Off,
    Rate(u32),
}

impl RateSetting {
    /// `N` (flows per second, 1 to `MAX_RATE`) or `off`.
    pub fn parse(what: &'static str, s: &str) -> Result<RateSetting, PolicyError> {
        let s = s.trim();
        if s == "off" {
            return Ok(RateSetting::Off);
        }
        let n: u64 = s.parse().map_err(|_| PolicyError::BadRate {
            what,
            value: s.to_string(),
        })?;
        if n == 0 {
            return Err(PolicyError::Zero { what });
        }
        let n = u32::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_RATE)
            .ok_or(PolicyError::TooHigh {
                what,
                value: n,
                max: MAX_RATE.into(),
            })?;
        Ok(RateSetting::Rate(n))
    }
}

/// A burst as given: a number of flows, 1 to `MAX_BURST`.
pub fn parse_burst(what: &'static str, s: &str) -> Result<u32, PolicyError> {
    let n: u64 = s.trim().parse().map_err(|_| PolicyError::BadBurst {
        what,
        value: s.to_string(),
    })?;
    let n = u32::try_from(n).map_err(|_| PolicyError::TooHigh {
        what,
        value: n,
        max: MAX_BURST.into(),
    })?;
    check_number(what, n, MAX_BURST)?;
    Ok(n)
}

/// A list flag as given, each value a prefix or an address: `None` if not given, an empty list
/// for `none` (which clears the list in `vip set`).
pub fn parse_list(
    what: &'static str,
    values: &[String],
) -> Result<Option<Vec<IpNet>>, PolicyError> {
    match values {
        [] => Ok(None),
        [one] if one.trim() == "none" => Ok(Some(Vec::new())),
        many if many.iter().any(|v| v.trim() == "none") => {
            Err(PolicyError::NoneWithPrefixes { what })
        }
        many => many
            .iter()
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|source| PolicyError::Prefix { what, source })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
    }
}

/// A change to a `SourcePolicy`: `None` leaves a field as it is; an empty list clears one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_src: Option<Vec<IpNet>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_src: Option<Vec<IpNet>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_rate: Option<RateSetting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip_rate: Option<RateSetting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip_burst: Option<u32>,
}

impl PolicyPatch {
    pub fn is_empty(&self) -> bool {
        *self == PolicyPatch::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn patches_set_clear_and_keep() {
        let base = SourcePolicy::default()
            .patched(&PolicyPatch {
                allow_src: Some(nets(&["10.0.0.0/8"])),
                src_rate: Some(RateSetting::Rate(10)),
                src_burst: Some(20),
                vip_rate: Some(RateSetting::Rate(1000)),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            base.src_limit,
            Some(RateLimit {
                rate: 10,
                burst: 20
            })
        );
        assert_eq!(
            base.vip_limit,
            Some(RateLimit {
                rate: 1000,
                burst: 1000
            }),
            "the burst defaults to the rate"
        );
        let burst_only = base
            .patched(&PolicyPatch {
                src_burst: Some(5),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(burst_only.src_limit, Some(RateLimit { rate: 10, burst: 5 }));
        assert_eq!(burst_only.allow_src, base.allow_src, "kept");
        let cleared = base
            .patched(&PolicyPatch {
                allow_src: Some(vec![]),
                src_rate: Some(RateSetting::Off),
                ..Default::default()
            })
            .unwrap();
        assert!(cleared.allow_src.is_empty());
        assert_eq!(cleared.src_limit, None);
        assert_eq!(cleared.vip_limit, base.vip_limit);
        assert!(
            SourcePolicy::default()
                .patched(&PolicyPatch::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bad_numbers_and_lists_are_refused() {
        let bad = |patch: PolicyPatch, want: &str| {
            let e = SourcePolicy::default().patched(&patch).unwrap_err();
            assert!(e.to_string().contains(want), "{e} lacks {want:?}");
        };
        bad(
            PolicyPatch {
                src_burst: Some(5),
                ..Default::default()
            },
            "--src-burst needs --src-rate",
        );
        bad(
            PolicyPatch {
                vip_rate: Some(RateSetting::Rate(5)),
                vip_burst: Some(0),
                ..Default::default()
            },
            "--vip-burst must be at least 1",
        );
        bad(
            PolicyPatch {
                vip_rate: Some(RateSetting::Rate(5)),
                vip_burst: Some(MAX_BURST + 1),
                ..Default::default()
            },
            "above the maximum",
        );
        bad(
            PolicyPatch {
                deny_src: Some(nets(&["10.0.0.0/8", "10.0.0.0/8"])),
                ..Default::default()
            },
            "--deny-src lists 10.0.0.0/8 twice",
        );
        bad(
            PolicyPatch {
                src_rate: Some(RateSetting::Off),
                src_burst: Some(3),
                ..Default::default()
            },
            "--src-burst needs a limit",
        );
        assert!(matches!(
            RateSetting::parse("--src-rate", "0"),
            Err(PolicyError::Zero { .. })
        ));
        assert!(matches!(
            RateSetting::parse("--src-rate", "99999999999"),
            Err(PolicyError::TooHigh { .. })
        ));
        assert!(matches!(
            RateSetting::parse("--src-rate", "fast"),
            Err(PolicyError::BadRate { .. })
        ));
        assert_eq!(
            RateSetting::parse("--vip-rate", "off").unwrap(),
            RateSetting::Off
        );
        assert_eq!(
            RateSetting::parse("--vip-rate", "250").unwrap(),
            RateSetting::Rate(250)
        );
        assert_eq!(parse_burst("--src-burst", "20").unwrap(), 20);
        for bad in ["0", "x", "-1", "99999999999"] {
            assert!(parse_burst("--src-burst", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn list_flags_parse() {
        let list = |v: &[&str]| {
            parse_list(
                "--allow-src",
                &v.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(list(&[]).unwrap(), None);
        assert_eq!(list(&["none"]).unwrap(), Some(vec![]));
        assert_eq!(
            list(&["10.0.0.0/8", "192.0.2.1"]).unwrap(),
            Some(nets(&["10.0.0.0/8", "192.0.2.1/32"]))
        );
        let e = list(&["10.0.0.1/8"]).unwrap_err().to_string();
        assert_eq!(
            e,
            "--allow-src: prefix \"10.0.0.1/8\" has host bits set (the network is 10.0.0.0/8)"
        );
        assert!(matches!(
            list(&["none", "10.0.0.0/8"]),
            Err(PolicyError::NoneWithPrefixes { .. })
        ));
    }

    #[test]
    fn summaries_name_what_is_set() {
        assert_eq!(SourcePolicy::default().summary(), "-");
        let p = SourcePolicy {
            allow_src: nets(&["10.0.0.0/8", "192.0.2.0/24"]),
            deny_src: nets(&["10.1.0.0/16"]),
            src_limit: Some(RateLimit {
                rate: 10,
                burst: 20,
            }),
            vip_limit: None,
        };
        assert_eq!(
            p.summary(),
            "allow 2 prefixes, deny 10.1.0.0/16, 10/s (burst 20) per source"
        );
    }

    #[test]
    fn gcra_parameters() {
        let l = RateLimit {
            rate: 10,
            burst: 20,
        };
        assert_eq!(l.gcra_ns(), (100_000_000, 2_000_000_000));
        let fast = RateLimit {
            rate: MAX_RATE,
            burst: MAX_BURST,
        };
        assert_eq!(fast.gcra_ns(), (100, 1_000_000_000));
    }
}
