//! The agent's serve loop under load (issue 10): the real `xlb agent` with its flow table full, a
//! client running `xlb stats --json` every 100 ms and a Prometheus scrape every second, while one
//! backend's health check flips between passing and failing. Measured: the CLI's round trip (the
//! `xlb` process, start to exit), the scrape's, and how long a health-state change takes to reach
//! the data path — from the check server's first answer in the new state to the VIP's ring in the
//! kernel (`VIPS`, read by map id) having the backend's slot added or removed.
//!
//! With `xlb flows` queries on (issue 18), a third client runs `xlb flows --count` and `xlb flows
//! --limit 100` once a second each, so the stats round trips and health changes are measured
//! while the table is walked for them.
//!
//! The table is filled the way a peer fills it: an in-process sync node streams the flows to the
//! agent's `--sync-listen` (authenticated frames), and the agent installs them.

use super::packets::{VIP, backend, fill_events};
use anyhow::{Context, Result, bail, ensure};
use aya::maps::{HashMap as BpfHashMap, MapData, MapInfo};
use lb_common::{FlowEvent, VipKey, VipMeta, maps};
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use xlb::sync::{self, ChannelSource, SyncConfig, SyncKey, SyncRequest};
use xlb_tests::{
    interrupt,
    netns::{self, Netns, TempDir},
    xlb::{Agent, Xlb},
};

const VIP_PORT: u16 = 80;
/// The VIP's backends (`packets::backend(0..3)`, where `fill_events` pins the flows); the first
/// one's check flips, the other two always pass.
const BACKENDS: [Ipv4Addr; 3] = [backend(0), backend(1), backend(2)];
const CHECK_PORT: u16 = 8080;
const SYNC_LISTEN: &str = "127.0.0.1:7946";
const METRICS: &str = "127.0.0.1:9477";
const KEY: &[u8] = b"xlb-bench-serve-loop-key-not-a-secret";
/// Flows taken from the event source before waiting for them to be sent.
const FILL_CHUNK: usize = 65_536;
const STATS_EVERY: Duration = Duration::from_millis(100);
const SCRAPE_EVERY: Duration = Duration::from_secs(1);
/// Time between two flips of the backend's health (well over the 100 ms check interval).
const FLIP_EVERY: Duration = Duration::from_millis(600);
/// Longest wait for the data path to follow a flip before the run is called failed.
const FLIP_DEADLINE: Duration = Duration::from_secs(5);

/// What one run measured.
pub struct Load {
    /// Flow-table entries while measuring.
    pub entries: u64,
    /// Seconds the fill took (sent by the peer and installed by the agent).
    pub fill_s: f64,
    /// `xlb stats --json` round trips, ms.
    pub stats_ms: Vec<f64>,
    /// `/metrics` scrapes, ms.
    pub scrape_ms: Vec<f64>,
    /// Health changes, check answer → data path, ms.
    pub health_ms: Vec<f64>,
    /// `xlb flows` queries, when asked for.
    pub flows: Option<FlowQueries>,
}

/// `xlb flows` round trips (the CLI process, start to exit) and the walks the agent reported for
/// them, ms.
#[derive(Default)]
pub struct FlowQueries {
    pub count_ms: Vec<f64>,
    pub count_walk_ms: Vec<f64>,
    pub list_ms: Vec<f64>,
    pub list_walk_ms: Vec<f64>,
}

/// Run the agent with a table of `capacity` entries, full, and measure for `window`; with
/// `flows`, `xlb flows` queries run meanwhile.
pub fn measure(capacity: u32, window: Duration, flows: bool) -> Result<Load> {
    let ns = Netns::create(&format!("{}-serve", netns::unique_prefix()))?;
    ns.sh(&namespace_script())?;
    let dir = TempDir::new(&format!("{}-serve", netns::unique_prefix()))?;
    let key = dir.path().join("sync.key");
    fs::write(&key, KEY)?;
    let flip = Arc::new(Flip::default());
    let stop = Arc::new(AtomicBool::new(false));
    let checks = {
        let (flip, stop) = (flip.clone(), stop.clone());
        ns.spawn(move || serve_checks(&flip, &stop))
    };
    let result = run(&ns, dir.path(), &key, (capacity, window, flows), &flip);
    stop.store(true, Ordering::Relaxed);
    netns::join(checks, "check server")?;
    result
}

fn namespace_script() -> String {
    let mut s = String::from(
        "set -e
         ip link set lo up
         ip link add lb0 type veth peer name peer0
         ip link set lb0 up
         ip link set peer0 up
         ip addr add 10.111.1.2/24 dev lb0
",
    );
    for b in BACKENDS {
        s.push_str(&format!("ip addr add {b}/32 dev lo\n"));
    }
    s
}

fn run(
    ns: &Netns,
    dir: &Path,
    key: &Path,
    (capacity, window, flows): (u32, Duration, bool),
    flip: &Arc<Flip>,
) -> Result<Load> {
    let cap = capacity.to_string();
    let key_arg = key.to_string_lossy().into_owned();
    let extra = [
        "--flow-capacity",
        cap.as_str(),
        "--sync-listen",
        SYNC_LISTEN,
        "--sync-key-file",
        key_arg.as_str(),
        "--metrics-listen",
        METRICS,
    ];
    let mut agent = Agent::start(ns, "lb0", "generic", dir, &extra)?;
    let xlb = agent.client.clone();
    configure(&xlb)?;
    let fill_started = Instant::now();
    fill(ns, capacity)?;
    let entries = wait_full(&xlb, capacity)?;
    let fill_s = fill_started.elapsed().as_secs_f64();
    println!(
        "bench: serve loop: {entries} flow entries after {fill_s:.1} s; measuring for {window:?}"
    );
    let vips = vips_map(agent.pid())?;
    let load = under_load(ns, &xlb, &vips, flip, (window, flows));
    agent.ensure_running()?;
    let status = agent.stop()?;
    ensure!(status.success(), "the agent exited with {status}");
    let (stats_ms, scrape_ms, health_ms, flows) = load?;
    Ok(Load {
        entries,
        fill_s,
        stats_ms,
        scrape_ms,
        health_ms,
        flows,
    })
}

/// The VIP, checked every 100 ms over HTTP (rise 1, fall 1: every flip is a state change), and
/// its three backends.
fn configure(xlb: &Xlb) -> Result<()> {
    let vip = format!("{VIP}:{VIP_PORT}");
    let port = CHECK_PORT.to_string();
    xlb.ok(&[
        "vip",
        "add",
        &vip,
        "--check",
        "http:/healthz",
        "--check-port",
        &port,
        "--interval",
        "100ms",
        "--timeout",
        "100ms",
        "--rise",
        "1",
        "--fall",
        "1",
    ])?;
    for b in BACKENDS {
        xlb.ok(&["backend", "add", &vip, &b.to_string()])?;
    }
    Ok(())
}

/// Stream `n` flows to the agent from a sync node in `ns` (its peer, as far as the agent can
/// tell), until all are sent.
fn fill(ns: &Netns, n: u32) -> Result<()> {
    ns.enter(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
            let (req_tx, mut requests) = mpsc::channel(sync::SYNC_REQUEST_QUEUE);
            let (events_tx, events) = mpsc::channel(65_536);
            let config = SyncConfig::new(
                "127.0.0.1:0".parse()?,
                vec![SYNC_LISTEN.parse()?],
                SyncKey::from_bytes(KEY)?,
            )?;
            let node = sync::spawn(
                config,
                ChannelSource(events),
                req_tx,
                cancel.clone(),
                &tasks,
            )
            .await?;
            // This node has no table of its own: its snapshot for the agent is empty.
            tasks.spawn(async move {
                while let Some(req) = requests.recv().await {
                    if let SyncRequest::Snapshot { reply, .. } = req {
                        let _ = reply.send(Ok(Vec::new()));
                    }
                }
            });
            // Flows taken before the connection is up would go nowhere (a peer that connects
            // gets this node's snapshot instead, and it has none).
            let deadline = Instant::now() + Duration::from_secs(120);
            while !node.report().peers.iter().all(|p| p.connected) {
                interrupt::check()?;
                ensure!(
                    Instant::now() < deadline,
                    "the agent did not accept the sync peer"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // In chunks, each sent before the next is taken: a sender that falls too far behind
            // drops its backlog for a snapshot, and this node's snapshot is empty.
            let all: Vec<FlowEvent> = fill_events(n, VIP_PORT, BACKENDS.len() as u32).collect();
            let mut sent = 0;
            for chunk in all.chunks(FILL_CHUNK) {
                for f in chunk {
                    events_tx.send(*f).await?;
                }
                sent += chunk.len() as u64;
                loop {
                    let totals = node.report().totals;
                    ensure!(totals.resyncs == 0, "the sync fell behind: {totals:?}");
                    if totals.flows_sent >= sent {
                        break;
                    }
                    interrupt::check()?;
                    ensure!(
                        Instant::now() < deadline,
                        "{} of {sent} flows sent in time",
                        totals.flows_sent
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            cancel.cancel();
            tasks.close();
            tasks.wait().await;
            Ok(())
        })
    })?
}

/// Wait until the agent reports the table (nearly) full: an LRU may evict a few entries early.
fn wait_full(xlb: &Xlb, capacity: u32) -> Result<u64> {
    let want = u64::from(capacity) * 99 / 100;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        interrupt::check()?;
        let entries = xlb.stats()?["flow_entries"].as_u64().unwrap_or(0);
        if entries >= want {
            return Ok(entries);
        }
        if Instant::now() > deadline {
            bail!("{entries} of {capacity} flow entries after 2 minutes");
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// The agent's `VIPS` map, found by its process's file descriptors (map ids are global; other
/// agents on the machine have maps of the same name).
fn vips_map(pid: i32) -> Result<BpfHashMap<MapData, VipKey, VipMeta>> {
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = fs::read_to_string(entry?.path()).unwrap_or_default();
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if MapInfo::from_id(id)?.name_as_str() == Some(maps::VIPS) {
            let map = aya::maps::Map::from_map_data(MapData::from_id(id)?)?;
            return Ok(BpfHashMap::try_from(map)?);
        }
    }
    bail!("no {} map among the agent's file descriptors", maps::VIPS)
}

/// The check server's state: whether the flipping backend fails its check, and when it first
/// answered in that state.
#[derive(Default)]
struct Flip {
    state: Mutex<(bool, Option<Instant>)>,
}

impl Flip {
    fn set(&self, down: bool) {
        *self.state.lock().unwrap() = (down, None);
    }
    fn first_answer(&self) -> Option<Instant> {
        self.state.lock().unwrap().1
    }
}

/// Answer the agent's HTTP checks on every backend address until `stop`: 200, or 503 for the
/// flipping backend while it is down.
fn serve_checks(flip: &Flip, stop: &AtomicBool) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", CHECK_PORT))?;
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        let (mut conn, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_micros(200));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut head = String::new();
        let mut reader = BufReader::new(&conn);
        while reader.read_line(&mut head).is_ok_and(|n| n > 2) {
            head.clear();
        }
        let mut down = false;
        if conn.local_addr()?.ip() == BACKENDS[0] {
            // Noted before the answer is written, so it is there once the agent acts on it.
            let mut s = flip.state.lock().unwrap();
            down = s.0;
            s.1.get_or_insert_with(Instant::now);
        }
        let status = if down {
            "503 Service Unavailable"
        } else {
            "200 OK"
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
    }
    Ok(())
}

type Samples = (Vec<f64>, Vec<f64>, Vec<f64>, Option<FlowQueries>);

/// The stats client and the scraper (and, with `flows`, the flows client) run for `window` while
/// the health flips.
fn under_load(
    ns: &Netns,
    xlb: &Xlb,
    vips: &BpfHashMap<MapData, VipKey, VipMeta>,
    flip: &Flip,
    (window, flows): (Duration, bool),
) -> Result<Samples> {
    let until = Instant::now() + window;
    let stats = {
        let cmd = xlb.clone();
        thread::spawn(move || every(STATS_EVERY, until, || stats_round_trip(&cmd)))
    };
    let queries = flows.then(|| {
        let cmd = xlb.clone();
        thread::spawn(move || flow_queries(&cmd, until))
    });
    let scrapes = ns.spawn(move || every(SCRAPE_EVERY, until, scrape));
    let health = flips(vips, flip, until);
    let stats = stats
        .join()
        .map_err(|_| anyhow::anyhow!("the stats thread panicked"))?;
    let queries = queries
        .map(|q| {
            q.join()
                .map_err(|_| anyhow::anyhow!("the flows thread panicked"))?
        })
        .transpose()?;
    let scrapes = netns::join(scrapes, "scrape")?;
    Ok((stats?, scrapes, health?, queries))
}

/// `xlb flows --count` and `xlb flows --limit 100`, once a second each, until `until`.
fn flow_queries(xlb: &Xlb, until: Instant) -> Result<FlowQueries> {
    let mut q = FlowQueries::default();
    let mut next = Instant::now();
    while next < until {
        interrupt::check()?;
        let (ms, v) = flows_round_trip(xlb, &["--count"])?;
        ensure!(
            v["matched"].as_u64().unwrap_or(0) > 0,
            "no flows counted: {v}"
        );
        q.count_ms.push(ms);
        q.count_walk_ms
            .push(v["walk_ms"].as_f64().unwrap_or(f64::NAN));
        let (ms, v) = flows_round_trip(xlb, &["--limit", "100"])?;
        let listed = v["flows"].as_array().map_or(0, Vec::len);
        ensure!(listed == 100, "{listed} flows listed, not 100");
        q.list_ms.push(ms);
        q.list_walk_ms
            .push(v["walk_ms"].as_f64().unwrap_or(f64::NAN));
        next += SCRAPE_EVERY;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(q)
}

/// One `xlb flows ARGS --json`: the CLI process's round trip (ms) and its answer.
fn flows_round_trip(xlb: &Xlb, args: &[&str]) -> Result<(f64, serde_json::Value)> {
    let t = Instant::now();
    let out = Command::new(&xlb.bin)
        .arg("flows")
        .args(args)
        .args(["--json", "--socket"])
        .arg(&xlb.socket)
        .output()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    ensure!(out.status.success(), "xlb flows {args:?}: {out:?}");
    Ok((ms, serde_json::from_slice(&out.stdout)?))
}

/// Run `f` every `period` until `until`; its durations in ms.
fn every(period: Duration, until: Instant, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    let mut next = Instant::now();
    while next < until {
        interrupt::check()?;
        let t = Instant::now();
        f()?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
        next += period;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(out)
}

fn stats_round_trip(xlb: &Xlb) -> Result<()> {
    let out = Command::new(&xlb.bin)
        .args(["stats", "--json", "--socket"])
        .arg(&xlb.socket)
        .output()?;
    ensure!(out.status.success(), "xlb stats --json: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["flow_entries"].as_u64().unwrap_or(0) > 0,
        "no flow entries: {v}"
    );
    Ok(())
}

fn scrape() -> Result<()> {
    let addr: SocketAddr = METRICS.parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    ensure!(body.starts_with("HTTP/1.1 200"), "scrape: {body:.200}");
    ensure!(
        body.contains("xlb_flow_table_entries"),
        "scrape without the flow table"
    );
    Ok(())
}

/// Flip the backend's health until `until`; for each flip, the time from the check server's
/// first answer in the new state to the VIP's ring following it.
fn flips(
    vips: &BpfHashMap<MapData, VipKey, VipMeta>,
    flip: &Flip,
    until: Instant,
) -> Result<Vec<f64>> {
    let key = VipKey {
        addr: u32::from_ne_bytes(VIP.octets()),
        port: VIP_PORT.to_be(),
        proto: 6,
        _pad: 0,
    };
    let ring_len = || -> Result<u32> { Ok(vips.get(&key, 0).context("VIPS entry")?.ring_len) };
    let mut delays = Vec::new();
    let mut down = false;
    while Instant::now() < until {
        interrupt::check()?;
        down = !down;
        let want = if down { 2 } else { 3 };
        flip.set(down);
        let deadline = Instant::now() + FLIP_DEADLINE;
        while ring_len()? != want {
            ensure!(
                Instant::now() < deadline,
                "the ring did not follow a flip within {FLIP_DEADLINE:?}"
            );
            thread::sleep(Duration::from_micros(500));
        }
        let seen = Instant::now();
        let answered = flip.first_answer().context("a check answered the flip")?;
        delays.push(seen.saturating_duration_since(answered).as_secs_f64() * 1e3);
        thread::sleep(FLIP_EVERY);
    }
    Ok(delays)
}
