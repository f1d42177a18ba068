//! Driving the `xlb` binary: the CLI against an agent's socket, and the agent itself.

use crate::{
    cmd::{Output, SHORT, run_timeout, wait_for},
    netns::Netns,
    process::Process,
};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

/// The `xlb` binary: `$XLB_BIN`, else `xlb` in the cargo profile directory this executable was
/// built into (`target/<profile>/deps/<test>` or `target/<profile>/demo`). Panics if there is none.
pub fn xlb_bin() -> PathBuf {
    find_xlb_bin().unwrap_or_else(|| {
        panic!("xlb binary not found: set XLB_BIN or build it first (`cargo build --bins`; `cargo xtask test` does)")
    })
}

/// [`xlb_bin`] without the panic.
pub fn find_xlb_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("XLB_BIN") {
        return Some(PathBuf::from(bin)).filter(|b| b.exists());
    }
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Some(dir.join("xlb")).filter(|b| b.exists())
}

/// The CLI, pointed at one agent's socket.
#[derive(Clone, Debug)]
pub struct Xlb {
    pub bin: PathBuf,
    pub socket: PathBuf,
}

impl Xlb {
    pub fn new(socket: &Path) -> Self {
        Self {
            bin: xlb_bin(),
            socket: socket.to_path_buf(),
        }
    }

    /// `xlb args… --socket <socket>`. The socket is a filesystem path, reachable from any network
    /// namespace, so client commands run in the test's own namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("--socket").arg(&self.socket);
        // An inherited XLB_SOCKET must not redirect a test's commands to some other agent.
        cmd.env_remove("XLB_SOCKET");
        cmd
    }

    /// Runs a client command; the caller inspects status and output.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        run_timeout(&mut self.command(args), SHORT)
    }

    /// Runs a client command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        Ok(self.run(args)?.checked()?.stdout)
    }

    /// Runs a client command with `--json` appended and parses its stdout.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ok(&all)?;
        serde_json::from_str(&out)
            .with_context(|| format!("`xlb {}` printed invalid JSON: {out}", all.join(" ")))
    }

    pub fn stats(&self) -> Result<Value> {
        self.json(&["stats"])
    }

    pub fn vip_list(&self) -> Result<Value> {
        self.json(&["vip", "list"])
    }

    /// `xlb peers --json`.
    pub fn peers(&self) -> Result<Value> {
        self.json(&["peers"])
    }
}

/// Runs `xlb args…` (no socket: backend-host, xdp-pass) inside `ns`; must succeed.
pub fn xlb_in(ns: &Netns, args: &[&str]) -> Result<String> {
    Ok(run_timeout(ns.command(xlb_bin()).args(args), SHORT)?
        .checked()?
        .stdout)
}

/// The bpffs an agent whose files live in `dir` pins its data path in: `<dir>/bpffs`, mounted
/// here, in the test's own (the root) mount namespace, so that pins outlive the agent's
/// `ip netns exec` (which replaces /sys). Mounted once; a restarted agent with the same `dir`
/// finds its data path there. Unmounted with the test's `TempDir`, which frees every pin.
pub fn agent_bpffs(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("bpffs");
    if !xlb::dataplane::pins::is_bpffs(&path) {
        std::fs::create_dir_all(&path)?;
        crate::cmd::run("mount", &["-t", "bpf", "bpf", &path.to_string_lossy()])?.checked()?;
    }
    Ok(path)
}

/// A running `xlb agent`, started inside a namespace.
pub struct Agent {
    process: Process,
    pub client: Xlb,
    /// Its `--bpffs`.
    pub bpffs: PathBuf,
    /// Its interface and network namespace (for `xlb detach`).
    iface: String,
    ns: String,
    /// From the start of the process to its first answer on the socket (a takeover of a
    /// running data path included).
    pub ready_after: Duration,
}

/// How long the agent may take to answer on its socket after start.
const AGENT_READY: Duration = Duration::from_secs(20);
/// How long it may take to detach and exit after SIGTERM.
pub const AGENT_STOP: Duration = Duration::from_secs(5);

impl Agent {
    /// Starts `xlb agent --iface <iface> --xdp-mode <mode> --socket <dir>/xlb.sock --state-dir
    /// <dir>/state --bpffs <dir>/bpffs [extra…]` in `ns` and waits until `xlb vip list` answers.
    pub fn start(ns: &Netns, iface: &str, mode: &str, dir: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_with(&xlb_bin(), ns, iface, mode, dir, extra)
    }

    /// [`Agent::start`] with another `xlb` binary (an upgrade to another build).
    pub fn start_with(
        bin: &Path,
        ns: &Netns,
        iface: &str,
        mode: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let socket = dir.join("xlb.sock");
        let bpffs = agent_bpffs(dir)?;
        let mut cmd = ns.command(bin);
        cmd.args(["agent", "--iface", iface, "--xdp-mode", mode, "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--bpffs")
            .arg(&bpffs)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let started = std::time::Instant::now();
        let process = Process::spawn(
            &format!("xlb agent in {}", ns.name()),
            &mut cmd,
            &dir.join("agent.log"),
        )?;
        let mut agent = Self {
            process,
            client: Xlb::new(&socket),
            bpffs,
            iface: iface.to_string(),
            ns: ns.name().to_string(),
            ready_after: Duration::ZERO,
        };
        let client = agent.client.clone();
        let process = &mut agent.process;
        wait_for("the agent to answer on its socket", AGENT_READY, || {
            process.ensure_running()?;
            Ok(client.run(&["vip", "list"])?.success().then_some(()))
        })?;
        agent.ready_after = started.elapsed();
        Ok(agent)
    }

    /// `xlb detach --iface <iface> --bpffs <bpffs>` in the agent's namespace: a running agent is
    /// asked over its socket (and exits), a stopped one's data path is removed by the command.
    /// Waits until the agent's process is gone; the command's output.
    pub fn detach(&mut self) -> Result<String> {
        let out = detach_command(&self.ns, &self.iface, &self.bpffs, &self.client.socket)?;
        if self.process.exited().is_none() {
            self.process
                .signal_and_wait(0, AGENT_STOP)
                .with_context(|| {
                    format!("{} did not exit after xlb detach", self.process.name())
                })?;
        }
        Ok(out)
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Errors (with the agent's log) if it has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.process.ensure_running()
    }

    /// SIGTERM; the exit status, or an error if it is still running after [`AGENT_STOP`].
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.process.terminate(AGENT_STOP)
    }

    /// SIGKILL to the agent's pid (a crash: no detach, no goodbye to peers); waits until it is
    /// gone and reaped. The kernel detaches its XDP program with the last reference to its link.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.process
            .signal_and_wait(libc::SIGKILL, AGENT_STOP)
            .with_context(|| format!("{} did not die of SIGKILL", self.process.name()))
    }
}

/// Runs `xlb detach --iface <iface> --bpffs <bpffs> --socket <socket>` in namespace `ns`
/// (by name); must succeed. Its output.
pub fn detach_command(ns: &str, iface: &str, bpffs: &Path, socket: &Path) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(xlb_bin())
        .args(["detach", "--iface", iface, "--bpffs"])
        .arg(bpffs)
        .arg("--socket")
        .arg(socket)
        .env_remove("XLB_SOCKET");
    Ok(run_timeout(&mut cmd, SHORT)?.checked()?.stdout)
}

/// The mode of the XDP program attached to `iface` (`driver`, `generic`, `offload`, `multi`), from
/// the flag `ip link` prints after the MTU; `None` when nothing is attached.
pub fn xdp_mode(ns: &Netns, iface: &str) -> Result<Option<&'static str>> {
    let out = ns.ip(&["link", "show", "dev", iface])?;
    Ok(out.split_whitespace().find_map(|w| match w {
        "xdp" | "xdpdrv" => Some("driver"),
        "xdpgeneric" => Some("generic"),
        "xdpoffload" => Some("offload"),
        "xdpmulti" => Some("multi"),
        _ => None,
    }))
}

/// Does the interface have an XDP program attached?
pub fn has_xdp(ns: &Netns, iface: &str) -> Result<bool> {
    Ok(xdp_mode(ns, iface)?.is_some())
}

/// Finds a VIP's entry in `xlb stats --json` (or `vip list --json`) output. Accepts the key as a
/// nested `key` object, flat `addr`/`port`/`proto` fields, or an "addr:port[/proto]" string, so
/// the assertions survive cosmetic changes to the JSON shape.
pub fn find_vip<'a>(
    doc: &'a Value,
    addr: impl Into<IpAddr>,
    port: u16,
    proto: &str,
) -> Option<&'a Value> {
    let addr = addr.into();
    let list = doc
        .get("vips")
        .and_then(Value::as_array)
        .or_else(|| doc.as_array())?;
    list.iter().find(|v| vip_matches(v, addr, port, proto))
}

fn vip_matches(v: &Value, addr: IpAddr, port: u16, proto: &str) -> bool {
    let key = v.get("key").unwrap_or(v);
    let field_proto = key
        .get("proto")
        .or_else(|| key.get("protocol"))
        .or_else(|| v.get("proto"))
        .and_then(Value::as_str);
    let a = key
        .get("addr")
        .or_else(|| key.get("address"))
        .and_then(Value::as_str);
    let p = key.get("port").and_then(Value::as_u64);
    if let (Some(a), Some(p)) = (a, p) {
        return a == addr.to_string()
            && p == u64::from(port)
            && field_proto.unwrap_or("tcp").eq_ignore_ascii_case(proto);
    }
    // Only a string: "addr:port" or "addr:port/proto".
    let Some(s) = key
        .as_str()
        .or_else(|| v.get("vip").and_then(Value::as_str))
    else {
        return false;
    };
    let s = s.to_ascii_lowercase();
    let (hostport, p) = match s.split_once('/') {
        Some((hp, p)) => (hp, p),
        None => (s.as_str(), field_proto.unwrap_or("tcp")),
    };
    // IPv6 in brackets: `[fd11:100::1]:80`.
    hostport == SocketAddr::new(addr, port).to_string() && p.eq_ignore_ascii_case(proto)
}

/// A counter (`packets`, `bytes`, `new_flows`) of an entry that has it either directly or under
/// `counters`.
pub fn counter(entry: &Value, field: &str) -> Option<u64> {
    entry
        .get("counters")
        .and_then(|c| c.get(field))
        .or_else(|| entry.get(field))
        .and_then(Value::as_u64)
}

/// Per-backend `field` of one VIP in `xlb stats --json`, keyed by backend address.
pub fn backend_counters(
    stats: &Value,
    addr: impl Into<IpAddr>,
    port: u16,
    proto: &str,
    field: &str,
) -> Result<BTreeMap<IpAddr, u64>> {
    let addr = addr.into();
    let vip = find_vip(stats, addr, port, proto)
        .with_context(|| format!("no VIP {addr}:{port}/{proto} in stats: {stats}"))?;
    let backends = vip
        .get("backends")
        .and_then(Value::as_array)
        .with_context(|| format!("VIP entry without backends: {vip}"))?;
    let mut out = BTreeMap::new();
    for b in backends {
        let a: IpAddr = b
            .get("addr")
            .or_else(|| b.get("address"))
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("backend entry without an address: {b}"))?;
        let n = counter(b, field).with_context(|| format!("backend entry without {field}: {b}"))?;
        out.insert(a, n);
    }
    Ok(out)
}

/// The backend objects of `xlb backend list --json` (or of a VIP entry of `xlb stats --json`),
/// keyed by address.
pub fn backend_entries(doc: &Value) -> Result<BTreeMap<IpAddr, &Value>> {
    let backends = doc
        .get("backends")
        .and_then(Value::as_array)
        .with_context(|| format!("no backends in {doc}"))?;
    let mut out = BTreeMap::new();
    for b in backends {
        let a: IpAddr = b
            .get("address")
            .or_else(|| b.get("addr"))
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("backend entry without an address: {b}"))?;
        out.insert(a, b);
    }
    Ok(out)
}

/// One backend's object in `xlb backend list --json`.
pub fn backend_entry(doc: &Value, addr: impl Into<IpAddr>) -> Result<&Value> {
    let addr = addr.into();
    backend_entries(doc)?
        .remove(&addr)
        .with_context(|| format!("backend {addr} not listed: {doc}"))
}

/// One backend's `state` (`up`, `down`, `draining`) in `xlb backend list --json`.
pub fn backend_state(doc: &Value, addr: impl Into<IpAddr>) -> Result<String> {
    let addr = addr.into();
    let b = backend_entry(doc, addr)?;
    b.get("state")
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("backend {addr} without a state: {b}"))
}

/// A per-reason counter (`drop_unknown_port`, `fwd_tx`, …) from `xlb stats --json`.
pub fn reason(stats: &Value, name: &str) -> Result<u64> {
    let reasons = stats
        .get("reasons")
        .with_context(|| format!("no reasons in stats: {stats}"))?;
    if let Some(n) = reasons.get(name).and_then(Value::as_u64) {
        return Ok(n);
    }
    // Also accept a list of {"reason"/"name": .., "packets"/"count"/"value": ..}.
    reasons
        .as_array()
        .and_then(|list| {
            list.iter().find_map(|r| {
                let n = r
                    .get("reason")
                    .or_else(|| r.get("name"))
                    .and_then(Value::as_str)?;
                (n == name).then(|| {
                    r.get("packets")
                        .or_else(|| r.get("count"))
                        .or_else(|| r.get("value"))
                        .and_then(Value::as_u64)
                })?
            })
        })
        .with_context(|| format!("no counter {name} in stats reasons: {reasons}"))
}

/// A data-path event counter (`midflow_miss`, `flow_resteered`, `flow_event_lost`,
/// `nexthop_lookup`) from the
/// `events` object of `xlb stats --json`.
pub fn event(stats: &Value, name: &str) -> Result<u64> {
    stats
        .get("events")
        .and_then(|e| e.get(name))
        .and_then(Value::as_u64)
        .with_context(|| format!("no event counter {name} in stats: {stats}"))
}

/// The entry of peer `addr` (`ADDR:PORT` as configured with `--peer`) in `xlb peers --json`.
pub fn peer_entry<'a>(peers: &'a Value, addr: &str) -> Result<&'a Value> {
    peers
        .get("peers")
        .and_then(Value::as_array)
        .and_then(|list| {
            list.iter()
                .find(|p| p.get("address").and_then(Value::as_str) == Some(addr))
        })
        .with_context(|| format!("no peer {addr} in xlb peers: {peers}"))
}

/// A numeric field of `xlb peers --json`, by path (`["totals", "rejected"]`, `["lag", "p99_ms"]`).
pub fn peers_field(peers: &Value, path: &[&str]) -> Result<u64> {
    path.iter()
        .try_fold(peers, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .with_context(|| format!("no {} in xlb peers: {peers}", path.join(".")))
}

/// Fails unless `status` is a clean exit 0.
pub fn expect_clean_exit(what: &str, status: ExitStatus, log: &str) -> Result<()> {
    if status.code() != Some(0) {
        bail!("{what} exited with {status} instead of 0; its output:\n{log}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::net::Ipv4Addr;

    fn stats() -> Value {
        json!({
            "vips": [
                {"vip": "10.111.100.1:80", "address": "10.111.100.1", "port": 80, "proto": "tcp",
                 "forward": "ipip", "packets": 9, "bytes": 900, "new_flows": 3,
                 "backends": [
                    {"address": "10.111.1.11", "weight": 1, "packets": 5, "bytes": 500, "new_flows": 2},
                    {"address": "10.111.1.12", "weight": 1, "packets": 4, "bytes": 400, "new_flows": 1}]},
                {"vip": "10.111.100.1:80", "address": "10.111.100.1", "port": 80, "proto": "udp",
                 "forward": "l2", "packets": 1, "bytes": 50, "new_flows": 1,
                 "backends": [{"address": "10.111.1.13", "weight": 1, "packets": 1, "bytes": 50, "new_flows": 1}]}
            ],
            "reasons": {"drop_unknown_port": 7, "fwd_tx": 10},
            "flow_capacity": 262144
        })
    }

    #[test]
    fn finds_a_vip_by_address_port_and_protocol() {
        let s = stats();
        let tcp = find_vip(&s, VIP_FOR_TEST, 80, "tcp").unwrap();
        assert_eq!(counter(tcp, "new_flows"), Some(3));
        let udp = find_vip(&s, VIP_FOR_TEST, 80, "udp").unwrap();
        assert_eq!(udp["forward"], "l2");
        assert!(find_vip(&s, VIP_FOR_TEST, 81, "tcp").is_none());
    }

    #[test]
    fn reads_backend_and_reason_counters() {
        let s = stats();
        let flows = backend_counters(&s, VIP_FOR_TEST, 80, "tcp", "new_flows").unwrap();
        assert_eq!(
            flows.into_iter().collect::<Vec<_>>(),
            vec![
                (Ipv4Addr::new(10, 111, 1, 11).into(), 2),
                (Ipv4Addr::new(10, 111, 1, 12).into(), 1)
            ]
        );
        assert_eq!(reason(&s, "drop_unknown_port").unwrap(), 7);
        assert!(reason(&s, "no_such_reason").is_err());
    }

    #[test]
    fn accepts_a_nested_key_and_counters() {
        let s = json!({"vips": [{"key": {"addr": "10.111.100.1", "port": 53, "proto": "udp"},
            "counters": {"new_flows": 4},
            "backends": [{"addr": "10.111.1.11", "counters": {"new_flows": 4}}]}]});
        let v = find_vip(&s, VIP_FOR_TEST, 53, "udp").unwrap();
        assert_eq!(counter(v, "new_flows"), Some(4));
        assert_eq!(
            backend_counters(&s, VIP_FOR_TEST, 53, "udp", "new_flows")
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn reads_backend_states() {
        let list = json!({"vip": "10.111.100.1:80", "backends": [
            {"address": "10.111.1.11", "weight": 1, "state": "up", "last_check": null},
            {"address": "10.111.1.12", "weight": 1, "state": "down",
             "last_check": {"ok": false, "detail": "connection refused"}}]});
        let be2 = Ipv4Addr::new(10, 111, 1, 12);
        assert_eq!(backend_state(&list, be2).unwrap(), "down");
        assert_eq!(
            backend_state(&list, Ipv4Addr::new(10, 111, 1, 11)).unwrap(),
            "up"
        );
        assert_eq!(
            backend_entry(&list, be2).unwrap()["last_check"]["ok"],
            false
        );
        assert!(backend_state(&list, Ipv4Addr::new(10, 111, 1, 13)).is_err());
    }

    #[test]
    fn reads_events_and_peer_fields() {
        let s = json!({"events": {"midflow_miss": 2, "flow_resteered": 0}});
        assert_eq!(event(&s, "midflow_miss").unwrap(), 2);
        assert!(event(&s, "nothing").is_err());
        let p = json!({"node_id": "00ff", "listen": "10.111.1.2:7946",
            "peers": [{"address": "10.111.1.3:7946", "connected": true, "flows_received": 7}],
            "totals": {"rejected": 1}, "lag": {"p99_ms": null}});
        let lb2 = peer_entry(&p, "10.111.1.3:7946").unwrap();
        assert_eq!(peers_field(lb2, &["flows_received"]).unwrap(), 7);
        assert!(peer_entry(&p, "10.111.1.4:7946").is_err());
        assert_eq!(peers_field(&p, &["totals", "rejected"]).unwrap(), 1);
        assert!(peers_field(&p, &["lag", "p99_ms"]).is_err());
    }

    const VIP_FOR_TEST: Ipv4Addr = Ipv4Addr::new(10, 111, 100, 1);
}
