//! The whole end-to-end set-up: the topology, three nginx backends prepared with
//! `xlb backend-host setup`, `xlb agent` on lb1 configured through the CLI, and the client-side
//! probes the tests and the demo use. With [`TestbedOptions::active_active`], lb2 runs a second
//! agent with the same VIPs and backends, the two are peered for flow sync, and the VIPs' routes
//! come from BGP: BIRD runs on rtr, lb1 and lb2 (the configs of `contrib/bird/`), the agents
//! announce through routing table 100, and rtr installs an ECMP route over the nodes that
//! announce a VIP address. With [`TestbedOptions::https`] the web backends also serve HTTPS with
//! a test CA's certificates, and with [`TestbedOptions::databases`] PostgreSQL runs on db1
//! (primary) and db2… (streaming replicas), prepared like the web backends for both VIP
//! addresses.

use crate::{
    backend::{BIG, Backend, HTTP_PORT, UDP_PORT, big_content, udp_query},
    bird::{self, ANNOUNCE_TABLE, Bird, with_defines},
    cmd::{Output, run_timeout, wait_for, wait_for_every},
    http,
    netns::{Netns, TempDir},
    pki::Pki,
    postgres::PgCluster,
    process::Process,
    topology::{
        HOST_IFACE, LB1_ADDR, LB2_ADDR, RTR_BR_ADDR, RTR_BR_ADDR6, Topology, TopologyOptions, VIP,
        VIP6, VIPS, backend_addr, backend_name, db_addr, db_name, in_family, twin6,
    },
    xlb::{
        Agent, Xlb, agent_bpffs, backend_state, detach_command, expect_clean_exit, has_xdp,
        peer_entry, xdp_mode, xlb_bin, xlb_in,
    },
};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::{
    collections::BTreeMap,
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::PathBuf,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Port of the "SSH-like" listener on lb1's own address.
pub const LB1_TCP_PORT: u16 = 2222;
pub const LB1_TCP_ANSWER: &str = "lb1-ssh";
/// Prints `all`'s arp_ignore and arp_announce (0 0 in a fresh namespace, 1 2 once set up).
const ARP_SYSCTLS: &str =
    "cat /proc/sys/net/ipv4/conf/all/arp_ignore /proc/sys/net/ipv4/conf/all/arp_announce";
/// Port of the flow-sync listener on each load balancer's own address (active-active beds).
pub const SYNC_PORT: u16 = 7946;
/// Per-request limit for curl.
pub const CURL_MAX_TIME: u64 = 5;

#[derive(Clone, Debug)]
pub struct TestbedOptions {
    /// `ipip` or `l2`.
    pub forward: String,
    /// `driver` or `generic`, for the agent and the backends' decapsulator.
    pub xdp_mode: String,
    pub backends: usize,
    /// Extra arguments of `xlb vip add` for the HTTP VIP (health-check flags); empty = defaults.
    pub http_vip_args: Vec<String>,
    /// Active-active: lb2 too, both running `xlb agent` with the same VIPs and backends, peered
    /// with each other (`--sync-listen <own address>:7946 --peer <other>:7946`, one key file).
    pub lb2: bool,
    /// Route announcement: BIRD on rtr and on each LB, the agents started with
    /// `--announce-table 100 --bird-socket …`, and no static route for the VIPs on rtr. `up`
    /// returns once rtr routes the HTTP VIP's address over every LB (ECMP with lb2).
    pub bgp: bool,
    /// The web backends also serve HTTPS (443 good certificate, 4431 wrong name, 4432 expired;
    /// see [`crate::backend::nginx_conf`]) with a test CA made at start ([`Testbed::pki`]).
    pub https: bool,
    /// Database hosts db1..dbN: PostgreSQL primary on db1, streaming replicas on the others
    /// ([`Testbed::pg`]); 0 = none.
    pub databases: usize,
    /// Each agent serves Prometheus metrics on its own address, port [`METRICS_PORT`].
    pub metrics: bool,
    /// The `mon` host (see [`crate::topology::MON_ADDR`]) for a Prometheus server.
    pub monitor: bool,
    /// Extra arguments of `xlb agent` (e.g. table sizes).
    pub agent_args: Vec<String>,
    /// Each VIP also on the IPv6 VIP address ([`VIP6`]) with the backends' IPv6 addresses: one
    /// bed serves both families at once, and [`Testbed::use_ipv6`] points the client methods
    /// at either.
    pub dual_stack: bool,
}

/// Port of each agent's `--metrics-listen` (with [`TestbedOptions::metrics`]).
pub const METRICS_PORT: u16 = 9100;

/// The health check the lifecycle tests and the demo give the HTTP VIP: `GET /` every 200 ms,
/// down after 3 failures in a row, up again after 2 successes.
pub const FAST_HTTP_CHECK: &[&str] = &[
    "--check",
    "http:/",
    "--interval",
    "200ms",
    "--timeout",
    "150ms",
    "--rise",
    "2",
    "--fall",
    "3",
];

/// The timing part of [`FAST_HTTP_CHECK`] (every 200 ms, timeout 150 ms, fall 3, rise 2), for
/// checks of other kinds.
pub const FAST_CHECK_TIMING: &[&str] = FAST_HTTP_CHECK.split_at(2).1;

impl TestbedOptions {
    pub fn new(forward: &str, xdp_mode: &str) -> Self {
        Self {
            forward: forward.to_string(),
            xdp_mode: xdp_mode.to_string(),
            backends: 3,
            http_vip_args: Vec::new(),
            lb2: false,
            bgp: false,
            https: false,
            databases: 0,
            metrics: false,
            monitor: false,
            agent_args: Vec::new(),
            dual_stack: false,
        }
    }

    /// The same with IPv6 VIPs next to the IPv4 ones (see [`TestbedOptions::dual_stack`]).
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// The same with lb2, flow sync and BGP (see [`TestbedOptions::lb2`] and
    /// [`TestbedOptions::bgp`]).
    pub fn active_active(mut self) -> Self {
        self.lb2 = true;
        self.bgp = true;
        self
    }

    /// The same with [`FAST_HTTP_CHECK`] on the HTTP VIP.
    pub fn with_fast_checks(mut self) -> Self {
        self.http_vip_args = FAST_HTTP_CHECK.iter().map(|s| s.to_string()).collect();
        self
    }
}

pub struct Testbed {
    // Field order is drop order: the agent detaches and every process is stopped (by pid) before
    // the namespaces they live in are deleted, and the temporary directory goes last.
    agent: Option<Agent>,
    /// lb2's agent (active-active beds only).
    agent2: Option<Agent>,
    /// BIRD on rtr, lb1 and lb2 (BGP beds only), stopped after the agents.
    birds: Vec<Bird>,
    lb1_listener: Option<Process>,
    backends: Vec<Backend>,
    /// The database servers (stopped by pid before their namespaces go).
    pub pg: Option<PgCluster>,
    /// The test CA and certificates (with [`TestbedOptions::https`]).
    pub pki: Option<Pki>,
    /// Backends where `backend-host setup` ran and `teardown` has not: torn down on drop, so no
    /// setup record outlives the namespace it describes.
    hosts_set_up: Vec<String>,
    pub topo: Topology,
    pub dir: TempDir,
    pub options: TestbedOptions,
    pub content: Vec<u8>,
    /// Extra `xlb agent` arguments per load balancer (e.g. `--config FILE`), for later starts.
    agent_extra: BTreeMap<String, Vec<String>>,
    /// When each LB's agent was last started.
    started: BTreeMap<String, Instant>,
    /// BGP beds: from each agent's start to its next hop in rtr's VIP route, as `up` saw it.
    pub announced_after: BTreeMap<String, Duration>,
    /// The client methods (`get_backend`, `download`, `udp`, …) go to the IPv6 VIP.
    ipv6: bool,
}

impl Testbed {
    /// Builds everything; on any error, whatever was built is torn down again.
    pub fn up(options: TestbedOptions) -> Result<Self> {
        let topo = Topology::build(TopologyOptions {
            backends: options.backends,
            lb2: options.lb2,
            databases: options.databases,
            monitor: options.monitor,
            static_vip_route: !options.bgp,
        })?;
        let dir = TempDir::new(topo.prefix())?;
        let mut bed = Self {
            agent: None,
            agent2: None,
            birds: Vec::new(),
            lb1_listener: None,
            backends: Vec::new(),
            pg: None,
            pki: None,
            hosts_set_up: Vec::new(),
            topo,
            dir,
            options,
            content: big_content(),
            agent_extra: BTreeMap::new(),
            started: BTreeMap::new(),
            announced_after: BTreeMap::new(),
            ipv6: false,
        };
        if bed.options.bgp {
            // First, so the BGP sessions come up (about a second) while the rest is built.
            bed.start_birds().context("starting BIRD")?;
        }
        if bed.options.https {
            bed.pki = Some(Pki::create(&bed.dir.path().join("pki")).context("the test CA")?);
        }
        bed.start_backends().context("starting the backends")?;
        bed.start_databases().context("starting the databases")?;
        bed.start_lb1_listener()
            .context("starting the listener on lb1")?;
        if bed.options.lb2 {
            std::fs::write(bed.sync_key_file(), bed.sync_key())?;
        }
        bed.start_agent("lb1").context("starting xlb on lb1")?;
        bed.configure("lb1")
            .context("configuring xlb on lb1 through the CLI")?;
        if bed.options.lb2 {
            bed.start_agent("lb2").context("starting xlb on lb2")?;
            bed.configure("lb2")
                .context("configuring xlb on lb2 through the CLI")?;
            bed.wait_peered(PEERING)
                .context("lb1 and lb2 peering for flow sync")?;
        }
        if bed.options.bgp {
            bed.wait_announced()
                .context("rtr routing the VIP over the LBs (BGP)")?;
        }
        Ok(bed)
    }

    /// The LBs of this bed.
    pub fn lbs(&self) -> Vec<&'static str> {
        if self.options.lb2 {
            vec!["lb1", "lb2"]
        } else {
            vec!["lb1"]
        }
    }

    /// BIRD on rtr (the router config) and on each LB (the node config), from `contrib/bird/`.
    fn start_birds(&mut self) -> Result<()> {
        let lbs = self.lbs();
        let vips = "[ 10.111.100.0/24{32,32} ]".to_string();
        let vips6 = "[ fd11:100::/64{128,128} ]".to_string();
        let rtr = with_defines(
            bird::ROUTER_CONF,
            &[
                ("ROUTER_ADDR", RTR_BR_ADDR.to_string()),
                ("NODE1_ADDR", LB1_ADDR.to_string()),
                ("NODE2_ADDR", LB2_ADDR.to_string()),
                ("XLB_VIPS", vips),
                ("ROUTER_ADDR6", RTR_BR_ADDR6.to_string()),
                ("NODE1_ADDR6", twin6(LB1_ADDR).to_string()),
                ("NODE2_ADDR6", twin6(LB2_ADDR).to_string()),
                ("XLB_VIPS6", vips6),
            ],
        )?;
        let bird = Bird::start(self.topo.ns("rtr"), "rtr", &rtr, self.dir.path())?;
        self.birds.push(bird);
        for lb in lbs {
            let conf = with_defines(
                bird::NODE_CONF,
                &[
                    ("NODE_ADDR", lb_addr(lb).to_string()),
                    ("ROUTER_ADDR", RTR_BR_ADDR.to_string()),
                    ("NODE_ADDR6", twin6(lb_addr(lb)).to_string()),
                    ("ROUTER_ADDR6", RTR_BR_ADDR6.to_string()),
                    ("XLB_TABLE", ANNOUNCE_TABLE.to_string()),
                ],
            )?;
            let bird = Bird::start(self.topo.ns(lb), lb, &conf, self.dir.path())?;
            self.birds.push(bird);
        }
        Ok(())
    }

    /// BIRD on `name` (rtr, lb1, lb2).
    pub fn bird(&self, name: &str) -> &Bird {
        self.birds
            .iter()
            .find(|b| b.name() == name)
            .unwrap_or_else(|| panic!("no BIRD on {name}"))
    }

    /// rtr's next hops for the VIP (and in a dual-stack bed for the IPv6 VIP, whose next hops
    /// are the LBs' IPv6 twins) as IPv4 addresses of the LBs: an LB counts only once rtr routes
    /// every VIP address of the bed over it.
    fn routed_via(&self) -> Result<Vec<Ipv4Addr>> {
        let v4 = self.topo.vip_next_hops()?;
        if !self.options.dual_stack {
            return Ok(v4);
        }
        let v6 = self.topo.vip6_next_hops()?;
        Ok(v4.into_iter().filter(|a| v6.contains(&twin6(*a))).collect())
    }

    /// rtr's VIP routes, for error messages.
    fn vip_routes(&self) -> String {
        let v4 = self.topo.vip_route().unwrap_or_else(|e| format!("{e:#}"));
        if !self.options.dual_stack {
            return format!("{v4:?}");
        }
        let v6 = self.topo.vip6_route().unwrap_or_else(|e| format!("{e:#}"));
        format!("{v4:?}, IPv6 {v6:?}")
    }

    /// Waits until rtr routes the VIP (both VIP addresses in a dual-stack bed) over every LB,
    /// and records how long after each agent's start its next hop appeared.
    fn wait_announced(&mut self) -> Result<()> {
        let want: Vec<(&str, Ipv4Addr)> =
            self.lbs().into_iter().map(|lb| (lb, lb_addr(lb))).collect();
        let mut seen: BTreeMap<String, Duration> = BTreeMap::new();
        wait_for_every(
            "rtr to route the VIP over every LB",
            ANNOUNCED,
            ROUTE_POLL,
            || {
                let hops = self.routed_via()?;
                for (lb, addr) in &want {
                    if hops.contains(addr) && !seen.contains_key(*lb) {
                        let since = self
                            .started
                            .get(*lb)
                            .map(Instant::elapsed)
                            .unwrap_or_default();
                        seen.insert(lb.to_string(), since);
                    }
                }
                if seen.len() == want.len() {
                    Ok(Some(()))
                } else {
                    bail!("rtr's VIP routes: {}", self.vip_routes())
                }
            },
        )?;
        self.announced_after = seen;
        Ok(())
    }

    /// Polls rtr's VIP route (both families' in a dual-stack bed) until its next hops are
    /// exactly `hops` (in any order; IPv6: their twins); how long that took.
    pub fn wait_next_hops(&self, hops: &[Ipv4Addr], timeout: Duration) -> Result<Duration> {
        let mut want = hops.to_vec();
        want.sort();
        let want6: Vec<Ipv6Addr> = want.iter().map(|a| twin6(*a)).collect();
        let start = Instant::now();
        wait_for_every(
            &format!("rtr to route the VIP via {want:?}"),
            timeout,
            ROUTE_POLL,
            || {
                let v4 = self.topo.vip_next_hops()?;
                let v6_done = !self.options.dual_stack || self.topo.vip6_next_hops()? == want6;
                if v4 == want && v6_done {
                    Ok(Some(start.elapsed()))
                } else {
                    bail!("rtr's VIP routes: {}", self.vip_routes())
                }
            },
        )
    }

    /// `xlb node status --json` on `lb`.
    pub fn node_status(&self, lb: &str) -> Result<Value> {
        self.lb_client(lb).json(&["node", "status"])
    }

    /// Drains lb2 (`xlb node drain`) and waits until rtr routes the VIP via lb1 only: for tests
    /// of a BGP bed that need every connection on lb1.
    pub fn route_via_lb1_only(&self) -> Result<()> {
        self.lb_client("lb2").ok(&["node", "drain"])?;
        self.wait_next_hops(&[LB1_ADDR], Duration::from_secs(5))?;
        Ok(())
    }

    fn start_backends(&mut self) -> Result<()> {
        for i in 1..=self.options.backends {
            let name = backend_name(i);
            let ns = self.topo.ns(&name);
            let dir = self.dir.path().join(&name);
            let mut backend = Backend::start_web(
                ns,
                &name,
                backend_addr(i),
                &dir,
                &self.content,
                self.pki.as_ref(),
            )?;
            self.set_up_host(&name, &[VIP.into(), VIP6.into()])?;
            backend.start_udp(self.topo.ns(&name))?;
            self.backends.push(backend);
        }
        Ok(())
    }

    /// `xlb backend-host setup` on host `name` for `vips`, and checks what is under test: the VIPs
    /// on lo, the ARP and rp_filter sysctls, the decapsulator in the bed's XDP mode.
    fn set_up_host(&mut self, name: &str, vips: &[IpAddr]) -> Result<()> {
        let mode = self.options.xdp_mode.clone();
        let ns = self.topo.ns(name);
        let mut args = vec!["backend-host", "setup", "--iface", HOST_IFACE, "--xdp-mode"];
        args.push(&mode);
        let names: Vec<String> = vips.iter().map(ToString::to_string).collect();
        for vip in &names {
            args.extend(["--vip", vip.as_str()]);
        }
        xlb_in(ns, &args).with_context(|| format!("xlb backend-host setup on {name}"))?;
        self.hosts_set_up.push(name.to_string());
        let arp = ns.sh(ARP_SYSCTLS)?;
        ensure!(
            arp.split_whitespace().eq(["1", "2"]),
            "{name}: arp_ignore/arp_announce after setup: {arp}"
        );
        let got = xdp_mode(ns, HOST_IFACE)?;
        ensure!(
            got == Some(mode.as_str()),
            "decapsulator on {name}'s {HOST_IFACE}: XDP mode {got:?}, expected {mode}"
        );
        let lo = ns.ip(&["addr", "show", "dev", "lo"])?;
        for vip in vips {
            let host = if vip.is_ipv4() { 32 } else { 128 };
            ensure!(
                lo.contains(&format!("{vip}/{host}")),
                "VIP {vip} not on {name}'s lo after setup: {lo}"
            );
        }
        Ok(())
    }

    /// The database hosts, prepared for both VIP addresses (write and read VIP), then PostgreSQL:
    /// primary on db1, replicas on the others, streaming.
    fn start_databases(&mut self) -> Result<()> {
        if self.options.databases == 0 {
            return Ok(());
        }
        for i in 1..=self.options.databases {
            self.set_up_host(&db_name(i), &VIPS.map(IpAddr::V4))?;
        }
        let hosts: Vec<(&Netns, String, Ipv4Addr)> = (1..=self.options.databases)
            .map(|i| (self.topo.ns(&db_name(i)), db_name(i), db_addr(i)))
            .collect();
        let cluster = PgCluster::start(self.topo.prefix(), &hosts)?;
        self.pg = Some(cluster);
        Ok(())
    }

    fn start_lb1_listener(&mut self) -> Result<()> {
        let lb1 = self.topo.ns("lb1");
        let mut cmd = lb1.command("socat");
        cmd.arg(format!(
            "TCP-LISTEN:{LB1_TCP_PORT},bind={LB1_ADDR},fork,reuseaddr"
        ))
        .arg(format!("SYSTEM:echo {LB1_TCP_ANSWER}"));
        let mut listener = Process::spawn(
            "TCP listener on lb1",
            &mut cmd,
            &self.dir.path().join("lb1-socat.out"),
        )?;
        let target = SocketAddr::from((LB1_ADDR, LB1_TCP_PORT));
        wait_for("the TCP listener on lb1", Duration::from_secs(10), || {
            listener.ensure_running()?;
            Ok(lb1
                .enter(move || {
                    TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
                })?
                .then_some(()))
        })?;
        self.lb1_listener = Some(listener);
        Ok(())
    }

    /// The key both agents of an active-active bed share (`--sync-key-file`).
    pub fn sync_key(&self) -> String {
        format!("{}-shared-sync-key-0123456789", self.topo.prefix())
    }

    pub fn sync_key_file(&self) -> PathBuf {
        self.dir.path().join("sync.key")
    }

    /// `ADDR:7946` of the sync listener of `lb` (lb1 or lb2).
    pub fn sync_addr(lb: &str) -> String {
        format!("{}:{SYNC_PORT}", lb_addr(lb))
    }

    /// The agent's command-line flags beyond interface, mode, socket and state directory: the
    /// metrics listener if asked for, the sync flags in an active-active bed, the announcement
    /// flags in a BGP bed.
    fn agent_args(&self, lb: &str) -> Vec<String> {
        let mut args = self.options.agent_args.clone();
        args.extend(self.agent_extra.get(lb).cloned().unwrap_or_default());
        if self.options.metrics {
            args.push("--metrics-listen".into());
            args.push(format!("{}:{METRICS_PORT}", lb_addr(lb)));
        }
        if self.options.lb2 {
            let other = if lb == "lb1" { "lb2" } else { "lb1" };
            args.extend([
                "--sync-listen".into(),
                Self::sync_addr(lb),
                "--peer".into(),
                Self::sync_addr(other),
                "--sync-key-file".into(),
                self.sync_key_file().to_string_lossy().into_owned(),
            ]);
        }
        if self.options.bgp {
            args.extend([
                "--announce-table".into(),
                ANNOUNCE_TABLE.to_string(),
                "--bird-socket".into(),
                self.bird(lb).socket.to_string_lossy().into_owned(),
            ]);
        }
        args
    }

    /// Extra arguments for every later start of the agent on `lb` (e.g. `--config FILE`).
    pub fn set_agent_args(&mut self, lb: &str, args: &[&str]) {
        self.agent_extra
            .insert(lb.to_string(), args.iter().map(|a| a.to_string()).collect());
    }

    fn agent_slot(&mut self, lb: &str) -> &mut Option<Agent> {
        match lb {
            "lb1" => &mut self.agent,
            "lb2" => &mut self.agent2,
            _ => panic!("no load balancer {lb}"),
        }
    }

    /// Starts `xlb agent` on `lb` (its state directory keeps the configuration across restarts)
    /// and checks the balancer is attached in the requested mode.
    pub fn start_agent(&mut self, lb: &str) -> Result<()> {
        self.start_agent_with(lb, &xlb_bin())
    }

    /// [`Testbed::start_agent`] with another `xlb` binary (an upgrade to another build); how long
    /// it took to answer on its socket.
    pub fn start_agent_with(&mut self, lb: &str, bin: &std::path::Path) -> Result<()> {
        ensure!(
            self.agent_slot(lb).is_none(),
            "the agent on {lb} is still there"
        );
        let peer = Topology::peer_iface(lb);
        if self.options.xdp_mode == "driver" && !has_xdp(self.topo.ns("rtr"), &peer)? {
            // Native-mode XDP_TX out of the LB's veth is only delivered if the receiving peer
            // runs an XDP program; generic mode needs none.
            xlb_in(
                self.topo.ns("rtr"),
                &["xdp-pass", "attach", &peer, "--xdp-mode", "driver"],
            )?;
        }
        let agent_dir = self.dir.path().join(lb);
        std::fs::create_dir_all(&agent_dir)?;
        let args = self.agent_args(lb);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.started.insert(lb.to_string(), Instant::now());
        let agent = Agent::start_with(
            bin,
            self.topo.ns(lb),
            HOST_IFACE,
            &self.options.xdp_mode,
            &agent_dir,
            &args,
        )?;
        *self.agent_slot(lb) = Some(agent);
        // Explicitly asked for, so no silent fallback to the other mode.
        let mode = xdp_mode(self.topo.ns(lb), HOST_IFACE)?;
        ensure!(
            mode == Some(self.options.xdp_mode.as_str()),
            "balancer on {lb}'s {HOST_IFACE}: XDP mode {mode:?}, expected {}",
            self.options.xdp_mode
        );
        Ok(())
    }

    /// Restarts the agent on `lb`: SIGTERM (it must exit 0 and leave the data path serving),
    /// then the same command again, which takes the data path over. Returns when the new agent
    /// answers on its socket, and when it was started.
    pub fn restart_agent(&mut self, lb: &str) -> Result<Instant> {
        self.stop_lb_agent(lb)?;
        let started = Instant::now();
        self.start_agent(lb)?;
        Ok(started)
    }

    /// SIGKILL to the agent on `lb`, then the same command again (a crash and a restart); how
    /// long the new agent took to answer.
    pub fn kill_and_restart_agent(&mut self, lb: &str) -> Result<Duration> {
        self.kill_agent(lb)?;
        self.start_after_kill(lb)
    }

    /// Start the agent on `lb` again after `kill_agent` (its data path must still be attached);
    /// how long the new agent took to answer.
    pub fn start_after_kill(&mut self, lb: &str) -> Result<Duration> {
        ensure!(
            has_xdp(self.ns(lb), HOST_IFACE)?,
            "{lb}'s data path went with its SIGKILLed agent"
        );
        *self.agent_slot(lb) = None;
        self.start_agent(lb)?;
        Ok(self.agent_ready_after(lb))
    }

    /// How long the agent on `lb` took from its start to its first answer.
    pub fn agent_ready_after(&self, lb: &str) -> Duration {
        match lb {
            "lb1" => self.agent.as_ref(),
            _ => self.agent2.as_ref(),
        }
        .map_or(Duration::ZERO, |a| a.ready_after)
    }

    /// `xlb detach` on `lb`: asks its agent, if one runs, else removes the data path itself.
    /// Checks that no XDP program and no pin is left.
    pub fn detach_lb(&mut self, lb: &str) -> Result<String> {
        let dir = self.dir.path().join(lb);
        let bpffs = agent_bpffs(&dir)?;
        let out = match self.agent_slot(lb).take() {
            Some(mut agent) => agent.detach()?,
            None => detach_command(
                self.ns(lb).name(),
                HOST_IFACE,
                &bpffs,
                &dir.join("xlb.sock"),
            )?,
        };
        ensure!(
            !has_xdp(self.ns(lb), HOST_IFACE)?,
            "{lb}'s {HOST_IFACE} still has an XDP program after xlb detach: {out}"
        );
        let left: Vec<_> = std::fs::read_dir(&bpffs)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".debug"))
            .collect();
        ensure!(
            left.is_empty(),
            "pins left in {}: {left:?}",
            bpffs.display()
        );
        Ok(out)
    }

    /// SIGKILL to the agent on `lb` (by pid). The dead agent stays in the bed (its log is still
    /// shown if the test fails); its client commands fail from now on.
    pub fn kill_agent(&mut self, lb: &str) -> Result<()> {
        let agent = self
            .agent_slot(lb)
            .as_mut()
            .with_context(|| format!("no agent on {lb}"))?;
        agent.kill()?;
        Ok(())
    }

    /// The CLI pointed at `lb`'s agent.
    pub fn lb_client(&self, lb: &str) -> &Xlb {
        let agent = match lb {
            "lb1" => &self.agent,
            "lb2" => &self.agent2,
            _ => panic!("no load balancer {lb}"),
        };
        &agent
            .as_ref()
            .unwrap_or_else(|| panic!("no agent on {lb}"))
            .client
    }

    /// `ip link set eth0 down` on `lb`.
    pub fn link_down(&self, lb: &str) -> Result<()> {
        self.ns(lb).ip(&["link", "set", HOST_IFACE, "down"])?;
        Ok(())
    }

    /// Waits until each LB's `xlb peers` shows the other connected both ways: its own sender
    /// connected and the other's connection to it open. How long that took.
    pub fn wait_peered(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        wait_for("lb1 and lb2 to be connected", timeout, || {
            for (lb, other) in [("lb1", "lb2"), ("lb2", "lb1")] {
                let peers = self.lb_client(lb).peers()?;
                let p = peer_entry(&peers, &Self::sync_addr(other))?;
                let out = p["connected"] == Value::Bool(true);
                let inbound = p["inbound_connections"].as_u64().unwrap_or(0) >= 1;
                if !(out && inbound) {
                    bail!("{lb}'s view of {other}: {p}");
                }
            }
            Ok(Some(start.elapsed()))
        })
    }

    fn configure(&mut self, lb: &str) -> Result<()> {
        let xlb = self.lb_client(lb).clone();
        let forward = self.options.forward.clone();
        let families: &[bool] = if self.options.dual_stack {
            &[false, true]
        } else {
            &[false]
        };
        for &v6 in families {
            for (port, proto) in [(HTTP_PORT, "tcp"), (UDP_PORT, "udp")] {
                let vip = SocketAddr::new(vip_of(v6), port).to_string();
                let mut args = vec!["vip", "add", &vip, "--proto", proto, "--forward", &forward];
                if port == HTTP_PORT {
                    args.extend(self.options.http_vip_args.iter().map(String::as_str));
                }
                xlb.ok(&args)?;
                for i in 1..=self.options.backends {
                    xlb.ok(&[
                        "backend",
                        "add",
                        &vip,
                        &in_family(backend_addr(i), v6).to_string(),
                        "--proto",
                        proto,
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Point the client methods at the IPv6 VIP (`true`, a dual-stack bed) or the IPv4 one.
    pub fn use_ipv6(&mut self, v6: bool) {
        assert!(
            !v6 || self.options.dual_stack,
            "the bed has no IPv6 VIPs: TestbedOptions::dual_stack"
        );
        self.ipv6 = v6;
    }

    /// The VIP address the client methods use.
    pub fn vip(&self) -> IpAddr {
        vip_of(self.ipv6)
    }

    /// `vip()` and `port` as a URL's authority (`[fd11:100::1]:80`).
    fn vip_at(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.vip(), port)
    }

    pub fn client(&self) -> &Xlb {
        &self.agent.as_ref().expect("agent running").client
    }

    pub fn agent_mut(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent running")
    }

    pub fn ns(&self, role: &str) -> &Netns {
        self.topo.ns(role)
    }

    /// Pids of every process the bed started (agent, nginx, socat), for checking the clean-up.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self.backends.iter().flat_map(Backend::pids).collect();
        pids.extend(self.agent.as_ref().map(Agent::pid));
        pids.extend(self.agent2.as_ref().map(Agent::pid));
        pids.extend(self.lb1_listener.as_ref().map(Process::pid));
        if let Some(pg) = &self.pg {
            pids.extend(pg.servers.iter().filter_map(|s| s.pid()));
        }
        pids
    }

    pub fn backend_names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.name.clone()).collect()
    }

    /// `curl -sS --max-time 5 <args…>` from cli.
    pub fn curl(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.ns("cli").command("curl");
        cmd.args(["-sS", "--max-time", &CURL_MAX_TIME.to_string()])
            .args(args);
        run_timeout(&mut cmd, Duration::from_secs(CURL_MAX_TIME + 10))
    }

    /// One new connection, `GET http://VIP/`: the name of the backend that answered.
    pub fn get_backend(&self) -> Result<String> {
        let out = self
            .curl(&[&format!("http://{}/", self.vip_at(HTTP_PORT))])?
            .checked()?;
        let name = out.stdout.trim().to_string();
        ensure!(
            self.backend_names().contains(&name),
            "unexpected answer from the VIP: {:?}",
            out.stdout
        );
        Ok(name)
    }

    /// One curl invocation with `n` URLs (one keep-alive connection): per request, the backend
    /// name and curl's count of new connections it made for it.
    pub fn keepalive(&self, n: usize) -> Result<Vec<(String, u64)>> {
        let url = format!("http://{}/", self.vip_at(HTTP_PORT));
        let mut args: Vec<&str> = vec!["-w", "|%{num_connects}\n"];
        args.extend(std::iter::repeat_n(url.as_str(), n));
        let out = self.curl(&args)?.checked()?;
        // Each transfer prints "beN\n" then "|<connects>\n".
        let lines: Vec<&str> = out.stdout.lines().collect();
        ensure!(
            lines.len() == 2 * n,
            "expected {} lines from curl, got: {:?}",
            2 * n,
            out.stdout
        );
        lines
            .chunks(2)
            .map(|pair| {
                let connects = pair[1]
                    .strip_prefix('|')
                    .and_then(|c| c.parse().ok())
                    .with_context(|| format!("bad curl -w output {:?}", pair[1]))?;
                Ok((pair[0].to_string(), connects))
            })
            .collect()
    }

    /// One new connection, `GET http://VIP/` with the test bed's own HTTP client (faster than
    /// curl): the name of the backend that answered.
    pub fn new_connection(&self) -> Result<String> {
        let target = self.vip_at(HTTP_PORT);
        let r = self
            .ns("cli")
            .enter(move || http::get(target, "/", Duration::from_secs(2)))??;
        let name = r.text();
        ensure!(
            r.status == 200 && self.backend_names().contains(&name),
            "unexpected answer from the VIP: HTTP {} {name:?}",
            r.status
        );
        Ok(name)
    }

    /// `n` new connections in a row: how many each backend answered.
    pub fn tally_new_connections(&self, n: usize) -> Result<BTreeMap<String, usize>> {
        let mut out = BTreeMap::new();
        for i in 0..n {
            let b = self
                .new_connection()
                .with_context(|| format!("new connection {i} of {n}"))?;
            *out.entry(b).or_default() += 1;
        }
        Ok(out)
    }

    /// Starts `GET path` through the VIP on a background thread in cli, opening new connections
    /// (at most `tries`) until `backend` answers (`X-Backend`); returns once that connection's
    /// headers are in. The body is read in the background: [`Download::finish`].
    pub fn start_download_from(&self, path: &str, backend: &str, tries: usize) -> Result<Download> {
        let target = self.vip_at(HTTP_PORT);
        let (tx, rx) = mpsc::channel();
        let (path, want) = (path.to_string(), backend.to_string());
        let handle = self.ns("cli").spawn(move || -> Result<Body> {
            for _ in 0..tries {
                let stream = match http::open(target, &path, Duration::from_secs(2)) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                if stream.status == 200 && stream.header("x-backend") == Some(want.as_str()) {
                    let _ = tx.send(Ok(stream.local_port().unwrap_or(0)));
                    let body = stream.body(DOWNLOAD_DEADLINE)?;
                    return Ok((body, Instant::now()));
                }
                // Someone else answered: close it (a reset, mid-body) and try the next slot.
            }
            let msg = format!("{want} did not answer {path} on any of {tries} new connections");
            let _ = tx.send(Err(msg.clone()));
            bail!(msg)
        });
        let port = match rx.recv_timeout(Duration::from_secs(10 * tries as u64)) {
            Ok(Ok(port)) => port,
            Ok(Err(e)) => {
                let _ = handle.join();
                bail!("starting the download from {backend}: {e}")
            }
            Err(e) => bail!("starting the download from {backend}: {e}"),
        };
        Ok(Download {
            client_port: port,
            handle: Some(handle),
        })
    }

    /// Pid of nginx on backend `name`, while it runs.
    pub fn nginx_pid(&self, name: &str) -> Option<i32> {
        self.backend(name).ok()?.nginx_pid()
    }

    /// What the agent has logged so far.
    pub fn agent_log(&self) -> String {
        self.agent_log_of("lb1")
    }

    /// What the agent on `lb` has logged so far.
    pub fn agent_log_of(&self, lb: &str) -> String {
        let agent = match lb {
            "lb1" => &self.agent,
            "lb2" => &self.agent2,
            _ => panic!("no load balancer {lb}"),
        };
        agent.as_ref().map(Agent::log).unwrap_or_default()
    }

    /// Waits until the agent on `lb` has logged `needle` since it was last started.
    pub fn wait_for_log(&self, lb: &str, needle: &str, timeout: Duration) -> Result<()> {
        wait_for_every(
            &format!("{lb}'s agent to log {needle:?}"),
            timeout,
            ROUTE_POLL,
            || {
                if self.lb_log(lb).contains(needle) {
                    Ok(Some(()))
                } else {
                    bail!("not yet")
                }
            },
        )
    }

    /// Forgets the (dead) agent on `lb`, so the next `xlb detach` runs without one.
    pub fn forget_agent(&mut self, lb: &str) {
        *self.agent_slot(lb) = None;
    }

    /// What the agent on `lb` has logged since it was last started.
    pub fn lb_log(&self, lb: &str) -> String {
        let agent = match lb {
            "lb1" => &self.agent,
            "lb2" => &self.agent2,
            _ => panic!("no load balancer {lb}"),
        };
        agent.as_ref().map(Agent::log).unwrap_or_default()
    }

    /// nginx's access log on backend `name`.
    pub fn access_log(&self, name: &str) -> Result<String> {
        Ok(self.backend(name)?.access_log())
    }

    /// Where backend `name` (be1…) lives.
    pub fn backend_addr(&self, name: &str) -> Result<Ipv4Addr> {
        Ok(self.backend(name)?.addr)
    }

    fn backend(&self, name: &str) -> Result<&Backend> {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .with_context(|| format!("no backend {name}"))
    }

    /// Stops nginx on backend `name` (by pid) and waits until it has exited.
    pub fn stop_backend(&mut self, name: &str) -> Result<()> {
        let backend = self
            .backends
            .iter_mut()
            .find(|b| b.name == name)
            .with_context(|| format!("no backend {name}"))?;
        backend.stop_http()
    }

    /// Starts nginx on backend `name` again and waits until it serves on its own address.
    pub fn start_backend(&mut self, name: &str) -> Result<()> {
        let ns = self.topo.ns(name);
        let backend = self
            .backends
            .iter_mut()
            .find(|b| b.name == name)
            .with_context(|| format!("no backend {name}"))?;
        backend.restart_http(ns)
    }

    /// `xlb backend list VIP:80 --json`.
    pub fn backend_list(&self) -> Result<Value> {
        self.client()
            .json(&["backend", "list", &self.vip_at(HTTP_PORT).to_string()])
    }

    /// Backend `name`'s state in `xlb backend list` of the HTTP VIP.
    pub fn backend_state(&self, name: &str) -> Result<String> {
        let addr = in_family(self.backend_addr(name)?, self.ipv6);
        backend_state(&self.backend_list()?, addr)
    }

    /// Polls `xlb backend list` until backend `name` is in `state`; how long that took.
    pub fn wait_backend_state(
        &self,
        name: &str,
        state: &str,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        wait_for(
            &format!("{name} to be {state} in xlb backend list"),
            timeout,
            || {
                let now = self.backend_state(name)?;
                if now == state {
                    Ok(Some(start.elapsed()))
                } else {
                    bail!("{name} is {now}")
                }
            },
        )
    }

    /// `GET /1m` through the VIP; the body.
    pub fn download(&self) -> Result<Vec<u8>> {
        let file = self.dir.path().join("download.bin");
        let _ = std::fs::remove_file(&file);
        let url = format!("http://{}/1m", self.vip_at(HTTP_PORT));
        let out = self.curl(&["-o", &file.to_string_lossy(), &url])?;
        out.checked()?;
        Ok(std::fs::read(&file)?)
    }

    /// `POST /upload` of the 1 MiB content through the VIP; the backend's "<name> <length>" answer.
    pub fn upload(&self) -> Result<String> {
        let file = self.dir.path().join("upload.bin");
        std::fs::write(&file, &self.content)?;
        let out = self.curl(&[
            "-H",
            "Expect:",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("http://{}/upload", self.vip_at(HTTP_PORT)),
        ])?;
        Ok(out.checked()?.stdout.trim().to_string())
    }

    /// One UDP query to VIP:5353 from cli (a new flow each time: a fresh source port).
    pub fn udp(&self) -> Result<String> {
        let target = self.vip_at(UDP_PORT);
        self.ns("cli")
            .enter(move || udp_query(target, Duration::from_secs(2)))?
    }

    /// Connects from cli to the listener on lb1's own address; what it said.
    pub fn lb1_tcp(&self) -> Result<String> {
        let target = SocketAddr::from((LB1_ADDR, LB1_TCP_PORT));
        self.ns("cli").enter(move || -> Result<String> {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer.trim().to_string())
        })?
    }

    /// `ping -c 1` from cli to lb1's own address.
    pub fn ping_lb1(&self) -> Result<()> {
        ensure!(self.ping(LB1_ADDR)?, "no answer to ping {LB1_ADDR}");
        Ok(())
    }

    /// `ping -c 1 -W 2 addr` from cli: whether an answer came.
    pub fn ping(&self, addr: Ipv4Addr) -> Result<bool> {
        let mut cmd = self.ns("cli").command("ping");
        cmd.args(["-c", "1", "-W", "2", &addr.to_string()]);
        Ok(run_timeout(&mut cmd, Duration::from_secs(10))?.success())
    }

    /// Stops the agent with SIGTERM: it must exit 0 in time and leave the data path on lb1.
    pub fn stop_agent(&mut self) -> Result<()> {
        self.stop_lb_agent("lb1")
    }

    /// Stops the agent on `lb` with SIGTERM: it must exit 0 in time and leave the data path
    /// attached (serving until `xlb detach`).
    pub fn stop_lb_agent(&mut self, lb: &str) -> Result<()> {
        let mut agent = self
            .agent_slot(lb)
            .take()
            .with_context(|| format!("the agent on {lb} is already stopped"))?;
        let status = agent.stop()?;
        expect_clean_exit(&format!("xlb agent on {lb}"), status, &agent.log())?;
        if !has_xdp(self.ns(lb), HOST_IFACE)? {
            bail!("the agent exited on SIGTERM and took {lb}'s data path with it");
        }
        Ok(())
    }

    /// `xlb backend-host teardown` on every backend; checks the VIPs (IPv4 and IPv6) left `lo` and the
    /// decapsulator left eth0. In driver mode also detaches the pass program from lb1's peer.
    pub fn teardown_hosts(&mut self) -> Result<()> {
        for name in std::mem::take(&mut self.hosts_set_up) {
            let ns = self.ns(&name);
            xlb_in(ns, &["backend-host", "teardown"])?;
            let arp = ns.sh(ARP_SYSCTLS)?;
            ensure!(
                arp.split_whitespace().eq(["0", "0"]),
                "{name}: arp_ignore/arp_announce after teardown: {arp}"
            );
            let lo = ns.ip(&["addr", "show", "dev", "lo"])?;
            ensure!(
                !lo.contains(&format!("{VIP}/")) && !lo.contains(&format!("{VIP6}/")),
                "VIP still on {name}'s lo after teardown: {lo}"
            );
            ensure!(
                !has_xdp(ns, HOST_IFACE)?,
                "{name}'s {HOST_IFACE} still has XDP after teardown"
            );
        }
        if self.options.xdp_mode == "driver" {
            let lbs: &[&str] = if self.options.lb2 {
                &["lb1", "lb2"]
            } else {
                &["lb1"]
            };
            for lb in lbs {
                let peer = Topology::peer_iface(lb);
                xlb_in(self.ns("rtr"), &["xdp-pass", "detach", &peer])?;
                ensure!(
                    !has_xdp(self.ns("rtr"), &peer)?,
                    "{peer} still has XDP after xdp-pass detach"
                );
            }
        }
        Ok(())
    }

    /// The big body must come back intact.
    pub fn check_content(&self, got: &[u8]) -> Result<()> {
        ensure!(
            got.len() == BIG,
            "downloaded {} bytes instead of {BIG}",
            got.len()
        );
        if let Some(at) = got.iter().zip(&self.content).position(|(a, b)| a != b) {
            bail!("downloaded content differs from the served file at byte {at}");
        }
        Ok(())
    }

    /// What to look at when something failed: the agent's log, its stats, the nginx error logs.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (lb, agent) in [("lb1", &self.agent), ("lb2", &self.agent2)] {
            let Some(agent) = agent else { continue };
            out += &format!("--- xlb agent log ({lb}):\n{}\n", agent.log());
            if let Ok(o) = agent.client.run(&["stats"]) {
                out += &format!("--- xlb stats ({lb}):\n{}{}\n", o.stdout, o.stderr);
            }
            if self.options.lb2
                && let Ok(o) = agent.client.run(&["peers"])
            {
                out += &format!("--- xlb peers ({lb}):\n{}{}\n", o.stdout, o.stderr);
            }
            if self.options.bgp
                && let Ok(o) = agent.client.run(&["node", "status"])
            {
                out += &format!("--- xlb node status ({lb}):\n{}{}\n", o.stdout, o.stderr);
            }
        }
        if self.options.dual_stack {
            let rtr = self.ns("rtr");
            out += &format!(
                "--- rtr's IPv6 VIP route: {:?}\n--- rtr's IPv6 neighbours:\n{}\n",
                self.topo.vip6_route().unwrap_or_default(),
                rtr.ip(&["-6", "neigh", "show"]).unwrap_or_default()
            );
        }
        if self.options.bgp {
            out += &format!(
                "--- rtr's VIP route: {:?}\n",
                self.topo.vip_route().unwrap_or_default()
            );
            for b in &self.birds {
                let protocols = b.birdc(&["show", "protocols"]).unwrap_or_default();
                out += &format!(
                    "--- BIRD on {}: protocols\n{protocols}--- its log:\n{}\n",
                    b.name(),
                    b.log()
                );
            }
        }
        for b in &self.backends {
            out += &format!(
                "--- nginx error log of {}:\n{}\n",
                b.name,
                b.nginx_error_log()
            );
        }
        if let Some(pg) = &self.pg {
            out += &pg.logs();
        }
        out
    }
}

/// How long two freshly started agents may take to connect to each other.
const PEERING: Duration = Duration::from_secs(15);
/// How long rtr may take to route the VIP over every LB once they are configured (BGP sessions
/// up about a second after BIRD starts; a node announces after its first health checks and its
/// peer's snapshot, at most 5 s).
const ANNOUNCED: Duration = Duration::from_secs(20);

/// How often route waits poll rtr: the changes measured there take milliseconds.
const ROUTE_POLL: Duration = Duration::from_millis(10);

/// The VIP address of a family: [`VIP`] or [`VIP6`].
pub fn vip_of(v6: bool) -> IpAddr {
    if v6 { VIP6.into() } else { VIP.into() }
}

/// The own address of load balancer `lb` (lb1 or lb2).
pub fn lb_addr(lb: &str) -> Ipv4Addr {
    match lb {
        "lb1" => LB1_ADDR,
        "lb2" => LB2_ADDR,
        _ => panic!("no load balancer {lb}"),
    }
}

/// Bound on a whole background download ([`Testbed::start_download_from`]); `/slow` takes ~4 s.
const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(20);

/// A download running on a background thread in cli.
pub struct Download {
    /// The client's source port (identifies the flow).
    pub client_port: u16,
    handle: Option<JoinHandle<Result<Result<Body>>>>,
}

/// A downloaded body and when its last byte arrived.
type Body = (Vec<u8>, Instant);

impl Download {
    /// Waits for the rest of the body (bounded): all of it, and when its last byte arrived.
    pub fn finish(mut self) -> Result<Body> {
        let handle = self.handle.take().context("download already finished")?;
        crate::netns::join(handle, "download")
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "xlb-tests: test bed {} failed;\n{}",
                self.topo.prefix(),
                self.diagnostics()
            );
        }
        // The databases stop before their hosts are torn down (fast shutdown, by pid).
        self.pg = None;
        for name in std::mem::take(&mut self.hosts_set_up) {
            if let Err(e) = xlb_in(self.ns(&name), &["backend-host", "teardown"]) {
                eprintln!("xlb-tests: backend-host teardown on {name}: {e:#}");
            }
        }
    }
}
