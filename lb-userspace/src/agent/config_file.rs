//! The TOML configuration file (`xlb agent --config FILE`): the VIPs to serve and, optionally,
//! agent options under `[agent]` (command-line flags win over them).
//!
//! ```toml
//! [agent]
//! iface = "eth0"
//! xdp_mode = "auto"        # auto | driver | generic
//! lb_addr = "10.111.1.2"   # outer source of IPIP packets
//! lb_addr6 = "fd11:2::2"   # outer source of IPv6-in-IPv6 and IPv4-in-IPv6 packets
//! flow_capacity = 262144
//! icmp_echo = true         # answer ICMP echo to VIP addresses at all (default true)
//!
//! [[vip]]
//! address = "10.111.100.1:80"
//! proto = "tcp"            # default tcp
//! forward = "ipip"         # default ipip
//! icmp_echo = true         # default true; an address answers if any VIP on it does
//! allow_src = ["192.0.2.0/24"]   # default: every source; prefixes of the VIP's family
//! deny_src = ["192.0.2.128/25"]  # wins over allow_src
//! src_rate = 10            # new flows/s per source address; default: no limit
//! src_burst = 20           # default: src_rate
//! vip_rate = 1000          # new flows/s to the VIP; default: no limit
//! vip_burst = 1000         # default: vip_rate
//! [vip.check]             # default: tcp for tcp VIPs, none for udp VIPs
//! kind = "http"            # tcp | http | https | postgres | none
//! path = "/healthz"
//! port = 8080              # default: the VIP's port
//! interval = "200ms"       # default 1s
//! timeout = "150ms"        # default 1s or the interval if shorter; at most the interval
//! rise = 2
//! fall = 3
//! expect_status = "200-399"
//! expect_body = "ok"
//! tls_verify = false
//! tls_ca = "ca.pem"        # https: trust only this CA (verifies); relative to this file
//! tls_sni = "www.example.com"  # https: name for SNI and verification
//! [[vip.backend]]
//! address = "10.111.1.11"
//! weight = 1               # default 1
//! backup = false           # default false
//! [vip.backend.check]      # this backend's own check: the VIP's with these keys replaced
//! port = 8081
//!
//! [[vip]]
//! address = "10.111.100.1:5432"
//! [vip.check]
//! kind = "postgres"
//! role = "primary"         # any (default) | primary | replica
//! user = "xlbcheck"
//! database = "postgres"    # default postgres
//! password_file = "/etc/xlb/pg-check.password"   # relative to this file if not absolute
//! ```
//!
//! Unknown keys are errors: a misspelt `wieght` silently ignored would be worse than a refusal.

use crate::{
    agent::options::AgentOptions,
    agent::state::{DesiredState, StateError},
    model::addr::{ParseError, parse_addr_port, parse_ip},
    model::check::{CheckPatch, CheckSpec},
    model::{
        BackendConfig, DEFAULT_WEIGHT, Forward, Proto, ServiceKey, VipConfig, icmp_echo_default,
        net::IpNet,
        policy::{PolicyError, PolicyPatch, RateSetting, SourcePolicy},
    },
    util::one_line,
};
use serde::Deserialize;
use std::{
    fs, io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("config file {}: {}", path.display(), toml_message(source))]
    Toml {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {}: vip #{index}: {source}", path.display())]
    VipAddress {
        path: PathBuf,
        index: usize,
        source: ParseError,
    },
    #[error("config file {}: vip {vip}, backend #{index}: {source}", path.display())]
    BackendAddress {
        path: PathBuf,
        vip: String,
        index: usize,
        source: ParseError,
    },
    /// Boxed: a `StateError` carries service keys of either family, and this enum travels in
    /// every `Result` of the config path.
    #[error("config file {}: {source}", path.display())]
    /// Boxed: a `StateError` carries service keys of either family, and this enum travels in
    /// every `Result` of the config path.
    Invalid {
        path: PathBuf,
        source: Box<StateError>,
    },
    #[error("config file {}: vip {vip}: {source}", path.display())]
    Policy {
        path: PathBuf,
        vip: String,
        source: Box<PolicyError>,
    },
}

/// toml's errors span several lines (a source excerpt with a caret); the agent reports errors on one.
fn toml_message(e: &toml::de::Error) -> String {
    let mut msg = one_line(e.message());
    if let Some(span) = e.span() {
        msg = format!("{msg} (at byte {})", span.start);
    }
    msg
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: AgentOptions,
    #[serde(default, rename = "vip")]
    vips: Vec<RawVip>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: String,
    #[serde(default)]
    proto: Proto,
    #[serde(default)]
    forward: Forward,
    /// Applied to the protocol's default check.
    #[serde(default)]
    check: Option<CheckPatch>,
    #[serde(default, rename = "backend")]
    backends: Vec<RawBackend>,
    #[serde(default = "icmp_echo_default")]
    icmp_echo: bool,
    /// Sources that may reach the VIP (absent: every source).
    #[serde(default)]
    allow_src: Vec<IpNet>,
    #[serde(default)]
    deny_src: Vec<IpNet>,
    #[serde(default)]
    src_rate: Option<u32>,
    #[serde(default)]
    src_burst: Option<u32>,
    #[serde(default)]
    vip_rate: Option<u32>,
    #[serde(default)]
    vip_burst: Option<u32>,
}

impl RawVip {
    /// The VIP's source policy: its keys as the flags of `vip add` would give them.
    fn policy(&self) -> Result<SourcePolicy, PolicyError> {
        let list = |l: &Vec<IpNet>| (!l.is_empty()).then(|| l.clone());
        SourcePolicy::default().patched(&PolicyPatch {
            allow_src: list(&self.allow_src),
            deny_src: list(&self.deny_src),
            src_rate: self.src_rate.map(RateSetting::Rate),
            src_burst: self.src_burst,
            vip_rate: self.vip_rate.map(RateSetting::Rate),
            vip_burst: self.vip_burst,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    backup: bool,
    /// The backend's own check: the VIP's with these keys replaced.
    #[serde(default)]
    check: Option<CheckPatch>,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// The files a check names, relative to the config file's directory when not absolute (the
/// agent's working directory is nobody's business); "" stays "" (no file).
fn anchored(mut patch: CheckPatch, dir: &Path) -> CheckPatch {
    for file in [&mut patch.tls_ca, &mut patch.password_file]
        .into_iter()
        .flatten()
    {
        if !file.as_os_str().is_empty() && file.is_relative() {
            *file = dir.join(&*file);
        }
    }
    patch
}

/// A parsed and validated config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) agent: AgentOptions,
    pub(crate) state: DesiredState,
}

impl Config {
    pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parse `text` (read from `path`, which is only used in messages) and validate it as a whole.
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let p = || path.to_path_buf();
        let raw: RawConfig =
            toml::from_str(text).map_err(|source| ConfigError::Toml { path: p(), source })?;
        let mut specs = Vec::with_capacity(raw.vips.len());
        for (index, vip) in raw.vips.into_iter().enumerate() {
            let (addr, port) =
                parse_addr_port(&vip.address).map_err(|source| ConfigError::VipAddress {
                    path: p(),
                    index: index + 1,
                    source,
                })?;
            let policy = vip.policy().map_err(|source| ConfigError::Policy {
                path: p(),
                vip: vip.address.clone(),
                source: Box::new(source),
            })?;
            let dir = path.parent().unwrap_or(Path::new("."));
            let vip_check = CheckSpec::default_for(vip.proto)
                .patched(&anchored(vip.check.unwrap_or_default(), dir));
            let mut backends = Vec::with_capacity(vip.backends.len());
            for (bi, b) in vip.backends.into_iter().enumerate() {
                let baddr = parse_ip(&b.address).map_err(|source| ConfigError::BackendAddress {
                    path: p(),
                    vip: vip.address.clone(),
                    index: bi + 1,
                    source,
                })?;
                backends.push(BackendConfig {
                    check: b.check.map(|p| vip_check.patched(&anchored(p, dir))),
                    backup: b.backup,
                    ..BackendConfig::new(baddr, b.weight)
                });
            }
            specs.push(VipConfig {
                key: ServiceKey {
                    addr,
                    port,
                    proto: vip.proto,
                },
                forward: vip.forward,
                check: vip_check,
                backends,
                icmp_echo: vip.icmp_echo,
                policy,
            });
        }
        let state = DesiredState::from_specs(specs).map_err(|source| ConfigError::Invalid {
            path: p(),
            source: Box::new(source),
        })?;
        Ok(Config {
            agent: raw.agent,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("xlb.toml"), text)
    }

    #[test]
    fn full_example_parses_with_defaults() {
        use crate::dataplane::XdpModeChoice;
        let cfg = parse(
            r#"
            [agent]
            iface = "veth0"
            xdp_mode = "generic"
            lb_addr = "10.111.1.2"
            flow_capacity = 1024

            [[vip]]
            address = "10.111.100.1:80"
            [[vip.backend]]
            address = "10.111.1.11"
            [[vip.backend]]
            address = "10.111.1.12"
            weight = 3

            [[vip]]
            address = "10.111.100.1:53"
            proto = "udp"
            forward = "l2"
            icmp_echo = false
            "#,
        )
        .unwrap();
        assert_eq!(cfg.agent.iface.as_deref(), Some("veth0"));
        assert_eq!(cfg.agent.icmp_echo, None);
        assert_eq!(cfg.agent.xdp_mode, Some(XdpModeChoice::Generic));
        assert_eq!(cfg.agent.lb_addr, Some(Ipv4Addr::new(10, 111, 1, 2)));
        assert_eq!(cfg.agent.flow_capacity, Some(1024));
        let vips: Vec<&VipConfig> = cfg.state.vips().collect();
        assert_eq!(vips.len(), 2);
        // Ordered by key: port 53 before port 80.
        assert_eq!(vips[0].key.proto, Proto::Udp);
        assert_eq!(vips[0].forward, Forward::L2);
        assert!(vips[0].backends.is_empty());
        assert_eq!(vips[1].key.port, 80);
        assert_eq!(vips[1].key.proto, Proto::Tcp);
        assert_eq!(vips[1].forward, Forward::Ipip);
        assert_eq!(
            vips[1].backends,
            vec![
                BackendConfig::new(IpAddr::from([10, 111, 1, 11]), 1),
                BackendConfig::new(IpAddr::from([10, 111, 1, 12]), 3),
            ]
        );
        assert_eq!(vips[1].check, CheckSpec::default_for(Proto::Tcp));
        assert_eq!(vips[0].check, CheckSpec::default_for(Proto::Udp));
        assert!(!vips[0].icmp_echo, "icmp_echo = false");
        assert!(vips[1].icmp_echo, "icmp_echo defaults to true");
        let off = parse("[agent]\nicmp_echo = false\n").unwrap();
        assert_eq!(off.agent.icmp_echo, Some(false));
    }

    #[test]
    fn checks_parse_with_defaults_and_overrides() {
        use crate::model::check::{CheckKind, StatusRange};
        use std::time::Duration;
        let cfg = parse(
            r#"
            [[vip]]
            address = "10.111.100.1:80"
            [vip.check]
            kind = "http"
            path = "/healthz"
            port = 8080
            interval = "200ms"
            timeout = "150ms"
            rise = 2
            fall = 3
            expect_status = "200-399"
            expect_body = "ok"
            tls_verify = false
            [[vip.backend]]
            address = "10.111.1.11"
            [[vip.backend]]
            address = "10.111.1.12"
            [vip.backend.check]
            port = 8081
            "#,
        )
        .unwrap();
        let v = cfg.state.vips().next().unwrap();
        assert_eq!(v.check.kind, CheckKind::Http);
        assert_eq!(v.check.path, "/healthz");
        assert_eq!(v.check.port, Some(8080));
        assert_eq!(v.check.interval, Duration::from_millis(200));
        assert_eq!(v.check.timeout, Duration::from_millis(150));
        assert_eq!(v.check.expect_status, StatusRange::DEFAULT);
        assert_eq!(v.check.expect_body.as_deref(), Some("ok"));
        assert!(v.backends[0].check.is_none());
        let own = v.backends[1].check.as_ref().unwrap();
        assert_eq!((own.kind, own.port), (CheckKind::Http, Some(8081)));
        assert_eq!(own.interval, Duration::from_millis(200));
    }

    #[test]
    fn postgres_checks_backups_and_files_relative_to_the_config() {
        use crate::model::check::{CheckKind, Role};
        let cfg = Config::parse(
            Path::new("/etc/xlb/xlb.toml"),
            r#"
            [[vip]]
            address = "10.111.100.2:5432"
            [vip.check]
            kind = "postgres"
            role = "replica"
            user = "xlbcheck"
            password_file = "pg.password"
            [[vip.backend]]
            address = "10.111.1.22"
            [[vip.backend]]
            address = "10.111.1.21"
            backup = true
            [vip.backend.check]
            role = "primary"
            [[vip]]
            address = "10.111.100.1:443"
            [vip.check]
            kind = "https"
            tls_ca = "/etc/ssl/ca.pem"
            tls_sni = "www.example.com"
            "#,
        )
        .unwrap();
        let mut vips = cfg.state.vips();
        let https = vips.next().unwrap();
        assert_eq!(
            https.check.tls_ca.as_deref(),
            Some(Path::new("/etc/ssl/ca.pem"))
        );
        assert!(https.check.verifies());
        let pg = vips.next().unwrap();
        assert_eq!(
            (pg.check.kind, pg.check.role),
            (CheckKind::Postgres, Role::Replica)
        );
        assert_eq!(
            pg.check.password_file.as_deref(),
            Some(Path::new("/etc/xlb/pg.password"))
        );
        assert!(!pg.backends[0].backup && pg.backends[1].backup);
        let own = pg.backends[1].check.as_ref().unwrap();
        assert_eq!(
            (own.role, own.user.as_deref()),
            (Role::Primary, Some("xlbcheck"))
        );
        // A postgres check without a user is refused with the file's name.
        let e = Config::parse(
            Path::new("/etc/xlb/xlb.toml"),
            "[[vip]]\naddress = \"10.111.100.1:5432\"\n[vip.check]\nkind = \"postgres\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/xlb/xlb.toml") && e.contains("--check-user"),
            "{e}"
        );
    }

    #[test]
    fn source_policies_parse() {
        use crate::model::policy::RateLimit;
        let cfg = parse(
            "[[vip]]\naddress = \"10.111.100.1:80\"\nallow_src = [\"10.111.0.0/16\", \"192.0.2.7\"]\n\
             deny_src = [\"10.111.9.0/24\"]\nsrc_rate = 10\nsrc_burst = 20\nvip_rate = 1000\n",
        )
        .unwrap();
        let p = &cfg.state.vips().next().unwrap().policy;
        assert_eq!(p.allow_src.len(), 2);
        assert_eq!(p.allow_src[1].to_string(), "192.0.2.7/32");
        assert_eq!(p.deny_src[0].to_string(), "10.111.9.0/24");
        assert_eq!(
            p.src_limit,
            Some(RateLimit {
                rate: 10,
                burst: 20
            })
        );
        assert_eq!(
            p.vip_limit,
            Some(RateLimit {
                rate: 1000,
                burst: 1000
            })
        );
    }

    #[test]
    fn a_short_interval_alone_shortens_the_timeout() {
        use std::time::Duration;
        let cfg = parse(
            "[[vip]]\naddress = \"10.111.100.1:80\"\n[vip.check]\nkind = \"http\"\ninterval = \"200ms\"\n",
        )
        .unwrap();
        let v = cfg.state.vips().next().unwrap();
        assert_eq!(v.check.timeout, Duration::from_millis(200));
    }

    #[test]
    fn ipv6_vips_and_backends_parse() {
        let cfg = parse(
            r#"
            [[vip]]
            address = "[fd11:100::1]:80"
            forward = "l2"
            [[vip.backend]]
            address = "fd11:2::11"
            "#,
        )
        .unwrap();
        let v = cfg.state.vips().next().unwrap();
        assert_eq!(v.key.to_string(), "[fd11:100::1]:80/tcp");
        assert_eq!(v.backends[0].addr, "fd11:2::11".parse::<IpAddr>().unwrap());
        let e = parse(
            "[[vip]]\naddress = \"[fd11:100::1]:80\"\n[[vip.backend]]\naddress = \"10.111.1.11\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("backend 10.111.1.11 is IPv4, VIP [fd11:100::1]:80/tcp is IPv6"),
            "{e}"
        );
        let e = parse("[[vip]]\naddress = \"fd11:100::1:80\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("written in brackets"), "{e}");
    }

    #[test]
    fn empty_file_is_an_empty_state() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.state.vip_count(), 0);
        assert_eq!(cfg.agent, AgentOptions::default());
    }

    #[test]
    fn bad_files_are_rejected_with_the_reason() {
        let cases = [
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\nwieght = 1\n",
                "unknown field",
            ),
            ("[agent]\nifname = \"x\"\n", "unknown field"),
            (
                "[[vip]]\naddress = \"10.111.300.1:80\"\n",
                "vip #1: malformed address",
            ),
            ("[[vip]]\naddress = \"10.111.100.1\"\n", "missing port"),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\nproto = \"sctp\"\n",
                "sctp",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\nforward = \"nat\"\n",
                "nat",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\n[[vip.backend]]\naddress = \"10.111.1.11:80\"\n",
                "backend #1: malformed address \"10.111.1.11:80\": a backend address takes no port",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\n[[vip]]\naddress = \"10.111.100.1:80\"\n",
                "VIP 10.111.100.1:80/tcp already exists",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\n[[vip.backend]]\naddress = \"10.111.1.11\"\n[[vip.backend]]\naddress = \"10.111.1.11\"\n",
                "backend 10.111.1.11 already exists in VIP 10.111.100.1:80/tcp",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\n[[vip.backend]]\naddress = \"10.111.1.11\"\nweight = 1000\n",
                "above the maximum",
            ),
            (
                "[agent]\nxdp_mode = \"turbo\"\n",
                "unknown XDP mode \"turbo\"",
            ),
            ("[[vip]\n", "xlb.toml"),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\n[vip.check]\nkind = \"http\"\nintervall = \"1s\"\n",
                "unknown field",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\n[vip.check]\ninterval = \"200ms\"\ntimeout = \"300ms\"\n",
                "VIP 10.111.100.1:80/tcp: check timeout 300ms exceeds the interval 200ms",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\n[vip.check]\ninterval = \"soon\"\n",
                "soon",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\n[[vip.backend]]\naddress = \"10.111.1.11\"\n[vip.backend.check]\nfall = 0\n",
                "backend 10.111.1.11 in VIP 10.111.100.1:80/tcp: fall must be at least 1",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\n[vip.check]\nexpect_status = \"600\"\n",
                "600",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\nallow_src = [\"10.0.0.1/8\"]\n",
                "host bits set (the network is 10.0.0.0/8)",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\ndeny_src = [\"10.0.0.0/33\"]\n",
                "prefix length \"33\" is not 0-32",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\nsrc_rate = 0\n",
                "vip 10.111.100.1:80: --src-rate must be at least 1",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\nvip_burst = 10\n",
                "--vip-burst needs --vip-rate",
            ),
            (
                "[[vip]]\naddress = \"10.111.100.1:80\"\nvip_rate = 20000000\n",
                "above the maximum",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
            assert!(err.starts_with("config file xlb.toml"), "{err}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }
}
