//! A real Prometheus server (Debian's `prometheus` binary) in a namespace of the test bed,
//! scraping the agents' `--metrics-listen` endpoints every second, its storage in the bed's
//! temporary directory, stopped by pid. Queried through its own HTTP API (`/api/v1/query`).

use crate::{cmd::wait_for, http, netns::Netns, process::Process};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::{fs, net::SocketAddr, path::Path, time::Duration};

/// How long Prometheus may take to start serving (it replays an empty WAL first).
const READY: Duration = Duration::from_secs(30);
/// Bound on one API request.
const REQUEST: Duration = Duration::from_secs(5);

/// A running Prometheus.
pub struct Prometheus {
    process: Process,
    pub listen: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus in `ns`, listening on `listen`, scraping `targets` (job `xlb`, label
    /// `lb` = the given name) every second; waits until it is ready.
    pub fn start(
        ns: &Netns,
        listen: SocketAddr,
        targets: &[(&str, SocketAddr)],
        dir: &Path,
    ) -> Result<Self> {
        fs::create_dir_all(dir.join("data"))?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: xlb\n    static_configs:\n",
        );
        for (name, addr) in targets {
            config += &format!("      - targets: ['{addr}']\n        labels: {{lb: '{name}'}}\n");
        }
        let config_file = dir.join("prometheus.yml");
        fs::write(&config_file, config)?;
        let mut cmd = ns.command("prometheus");
        cmd.arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            // No console templates from the Debian package paths; nothing but the API is used.
            .args(["--log.level=warn", "--storage.tsdb.retention.time=1h"]);
        let mut process = Process::spawn("prometheus", &mut cmd, &dir.join("prometheus.log"))?;
        let ready = wait_for("prometheus to be ready", READY, || {
            process.ensure_running()?;
            let r = ns.enter(move || http::get(listen, "/-/ready", Duration::from_millis(500)))?;
            Ok(r.ok().filter(|r| r.status == 200).map(|_| ()))
        });
        ready.with_context(|| process.log())?;
        Ok(Self { process, listen })
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// `GET /api/v1/query?query=<promql>` from `ns`: the `data.result` array.
    pub fn query(&self, ns: &Netns, promql: &str) -> Result<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let listen = self.listen;
        let r = ns.enter(move || http::get(listen, &path, REQUEST))??;
        ensure!(
            r.status == 200,
            "prometheus answered {} to {promql:?}: {}",
            r.status,
            r.text()
        );
        let v: Value = serde_json::from_slice(&r.body)
            .with_context(|| format!("prometheus's answer to {promql:?}"))?;
        if v["status"] != "success" {
            bail!("prometheus query {promql:?} failed: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until every scrape target of job `xlb` is up (`up == 1`), `n` of them.
    pub fn wait_targets_up(&self, ns: &Netns, n: usize, timeout: Duration) -> Result<()> {
        wait_for("prometheus to scrape every agent", timeout, || {
            let up = self.query(ns, "up{job=\"xlb\"} == 1")?;
            Ok((up.len() >= n).then_some(()))
        })
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// The sample value of a query result's entry (`value: [time, "12"]`).
pub fn sample_value(entry: &Value) -> Option<f64> {
    entry["value"][1].as_str()?.parse().ok()
}

/// RFC 3986 percent-encoding of everything but unreserved characters (a query string value).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_encoded() {
        assert_eq!(
            percent_encode("sum by (lb) (xlb_vip_new_flows_total{port=\"443\"})"),
            "sum%20by%20%28lb%29%20%28xlb_vip_new_flows_total%7Bport%3D%22443%22%7D%29"
        );
    }
}
