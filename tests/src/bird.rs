//! BIRD 2 in the test bed's namespaces: the router (rtr) and each xlb node run the configs of
//! `contrib/bird/` as shipped, with only their `define` values set for the bed, so the tests
//! prove what an operator installs. Each BIRD runs in the foreground (`bird -f`): it is the
//! bed's own child (`ip netns exec` execs in place), stopped by pid, and its log (`log stderr
//! all`), control socket and pid file live in the test's temporary directory.

use crate::{
    cmd::{SHORT, run_timeout, wait_for},
    netns::Netns,
    process::Process,
};
use anyhow::{Context, Result, bail};
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

/// `contrib/bird/xlb-node.conf`: BIRD on an xlb node.
pub const NODE_CONF: &str = include_str!("../../contrib/bird/xlb-node.conf");
/// `contrib/bird/router.conf`: BIRD on the router.
pub const ROUTER_CONF: &str = include_str!("../../contrib/bird/router.conf");
/// The routing table the agents announce through (`--announce-table`, `XLB_TABLE`).
pub const ANNOUNCE_TABLE: u32 = 100;
/// How long BIRD may take to answer on its socket after start.
const BIRD_READY: Duration = Duration::from_secs(10);

/// `config` with the value of every `define NAME = value;` named in `values` replaced; each must
/// be defined there (a renamed define in contrib/ must fail the bed, not be silently skipped).
pub fn with_defines(config: &str, values: &[(&str, String)]) -> Result<String> {
    let mut out = String::with_capacity(config.len());
    let mut seen = Vec::new();
    for line in config.split_inclusive('\n') {
        let def = line
            .strip_prefix("define ")
            .and_then(|rest| rest.split_once('='))
            .map(|(name, _)| name.trim());
        match def.and_then(|d| values.iter().find(|(n, _)| *n == d)) {
            Some((name, value)) => {
                out.push_str(&format!("define {name} = {value};\n"));
                seen.push(*name);
            }
            None => out.push_str(line),
        }
    }
    for (name, _) in values {
        if !seen.contains(name) {
            bail!("the BIRD config has no `define {name} = …;`");
        }
    }
    Ok(out)
}

/// A running BIRD.
pub struct Bird {
    process: Process,
    pub socket: PathBuf,
    name: String,
}

impl Bird {
    /// Writes `config` to `<dir>/<name>.conf`, starts BIRD with it in `ns` and waits until it
    /// answers on `<dir>/<name>.ctl`.
    pub fn start(ns: &Netns, name: &str, config: &str, dir: &Path) -> Result<Self> {
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let socket = dir.join(format!("{name}.ctl"));
        let mut cmd = ns.command("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .arg("-P")
            .arg(dir.join(format!("{name}.pid")));
        let process = Process::spawn(
            &format!("bird ({name})"),
            &mut cmd,
            &dir.join(format!("{name}-bird.log")),
        )?;
        let mut bird = Self {
            process,
            socket,
            name: name.to_string(),
        };
        let socket = bird.socket.clone();
        let process = &mut bird.process;
        wait_for(&format!("BIRD on {name} to answer"), BIRD_READY, || {
            process.ensure_running()?;
            Ok(birdc(&socket, &["show", "status"])
                .is_ok_and(|out| out.contains("Daemon is up and running"))
                .then_some(()))
        })?;
        Ok(bird)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `birdc -s <socket> args…`: its output.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        birdc(&self.socket, args)
    }

    /// What BIRD logged.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// `birdc -s socket args…` (the control socket is a path: birdc runs in the test's namespace).
pub fn birdc(socket: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("birdc");
    cmd.arg("-s").arg(socket).args(args);
    Ok(run_timeout(&mut cmd, SHORT)?.checked()?.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defines_are_replaced_and_missing_ones_refused() {
        let text = with_defines(
            NODE_CONF,
            &[
                ("NODE_ADDR", "10.111.1.2".into()),
                ("XLB_TABLE", "7".into()),
            ],
        )
        .unwrap();
        assert!(text.contains("define NODE_ADDR = 10.111.1.2;\n"));
        assert!(text.contains("define XLB_TABLE = 7;\n"));
        assert!(!text.contains("define NODE_ADDR = 192.0.2.10"));
        assert!(with_defines(ROUTER_CONF, &[("NO_SUCH", "1".into())]).is_err());
    }
}
