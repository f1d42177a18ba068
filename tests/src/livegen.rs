//! xlb's live-frames packet generator (`xlb_bench_gen`, run with BPF_PROG_TEST_RUN in
//! live-frames mode on a veth: every `XDP_TX` is a real frame into the peer) and its benchmark
//! programs attached to interfaces (the sink that drops the floods as a balancer sends them on,
//! the floors): the packet-rate benchmarks and the SYN-flood test and benchmark share them.

use crate::netns::Netns;
use anyhow::{Context, Result, ensure};
use aya::programs::{ProgramError, TestRun, TestRunAttrs, TestRunOptions};
use lb_common::{BenchGenHeader, FloorHop, programs};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};
use xlb::dataplane::Dataplane;

/// Frames per live-frames batch (the kernel's default; at most 256).
pub const GEN_BATCH: u32 = 64;
/// Target length of one live-frames call: short enough to stop promptly, long enough that the
/// syscall and the per-call page-pool setup do not count.
const GEN_CALL: Duration = Duration::from_millis(50);
/// Flow-table size of the copies of the object that only run a benchmark program (generator,
/// sink, floor): their balancer maps are unused.
pub const BENCH_OBJECT_FLOWS: u32 = 1024;

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC address {s:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC address {s:?}: not 6 bytes"))
}

/// What the generator did over its whole run.
#[derive(Clone, Copy, Debug, Default)]
pub struct GenReport {
    pub frames: u64,
    pub busy: Duration,
}

/// The generator's loop, on a thread inside rtr: live-frames calls of `xlb_bench_gen` on `iface`
/// until `stop`, each a bounded number of frames; errors past `limit`.
fn generate(
    iface: &str,
    frame: &[u8],
    header: &BenchGenHeader,
    stop: &AtomicBool,
    limit: Duration,
) -> Result<GenReport> {
    let mut dp = Dataplane::load_unattached(BENCH_OBJECT_FLOWS, None)
        .context("loading the eBPF object for the generator")?;
    let prog = dp
        .bench_generator(header)
        .with_context(|| format!("loading {}", programs::BENCH_GEN))?;
    let ifindex = xlb::util::interface_index(iface)?;
    let ctx = crate::packet::xdp_md(frame.len(), ifindex);
    let started = Instant::now();
    let mut repeat: u32 = 1 << 16;
    let mut report = GenReport::default();
    while !stop.load(Ordering::Relaxed) {
        ensure!(
            started.elapsed() < limit,
            "the generator was not stopped within {limit:?}"
        );
        let t = Instant::now();
        let run = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            attrs: TestRunAttrs::new().xdp_live_frames(GEN_BATCH),
            ..TestRunOptions::default()
        });
        match run {
            Ok(_) => {}
            // The kernel ends a run early when a signal is pending for this thread; unless it
            // was Ctrl-C or SIGTERM, go on (the frames of the cut-short call are left out of
            // the generator's own figure; the veth counters saw them).
            Err(ProgramError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::Interrupted =>
            {
                crate::interrupt::check()?;
                continue;
            }
            Err(e) => {
                return Err(e).context("BPF_PROG_TEST_RUN of the generator in live-frames mode");
            }
        }
        let took = t.elapsed();
        report.frames += u64::from(repeat);
        report.busy += took;
        // Rates differ tenfold between configurations; keep every call near GEN_CALL.
        let next = f64::from(repeat) * GEN_CALL.as_secs_f64() / took.as_secs_f64().max(1e-4);
        repeat = next.clamp(4096.0, f64::from(1u32 << 24)) as u32;
    }
    Ok(report)
}

/// The running generator; stopped and joined on drop (also when the measurement fails).
pub struct Generator {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Result<Result<GenReport>>>>,
}

impl Generator {
    /// Sends `frame`, rewritten by `header`, out of `iface` of `ns` from a thread there, until
    /// stopped; an error if not stopped within `limit`.
    pub fn start(
        ns: &Netns,
        iface: &str,
        frame: Vec<u8>,
        header: BenchGenHeader,
        limit: Duration,
    ) -> Self {
        Self::start_on(ns, iface, frame, header, limit, None)
    }

    /// `start`, with the generator's thread pinned to `cpu` if given: the balancer's and the
    /// sink's receive processing run as softirq work on the sending core, so the whole flood then
    /// stays on that one CPU (where a profile can be taken of it alone).
    pub fn start_on(
        ns: &Netns,
        iface: &str,
        frame: Vec<u8>,
        header: BenchGenHeader,
        limit: Duration,
        cpu: Option<usize>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let iface = iface.to_string();
        let handle = ns.spawn(move || {
            if let Some(cpu) = cpu {
                crate::cpu::pin_to(cpu).context("pinning the generator")?;
            }
            generate(&iface, &frame, &header, &flag, limit)
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Errors (with the generator's error) if it has ended on its own.
    pub fn ensure_running(&mut self) -> Result<()> {
        if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            self.finish()?;
            anyhow::bail!("the generator ended early");
        }
        Ok(())
    }

    /// Stops it and waits; what it sent.
    pub fn finish(&mut self) -> Result<GenReport> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().context("generator already joined")?;
        crate::netns::join(handle, "generator")
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        if self.handle.is_some() {
            let _ = self.finish();
        }
    }
}

/// XDP counters of a veth (`ethtool -S`, summed over queues).
#[derive(Clone, Copy, Debug, Default)]
pub struct VethXdp {
    /// Frames sent through ndo_xdp_xmit into the peer's receive ring, and refused (ring full).
    pub xmit: u64,
    pub xmit_errors: u64,
    /// XDP_DROP verdicts of the program on this device (the sink).
    pub drops: u64,
    /// Frames the device's XDP program ran on.
    pub packets: u64,
}

/// The XDP counters of `iface` in `ns`.
pub fn veth_xdp(ns: &Netns, iface: &str) -> Result<VethXdp> {
    let out = ns.run("ethtool", &["-S", iface])?;
    let mut c = VethXdp::default();
    let mut seen = 0;
    for line in out.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let slot = if key.starts_with("tx_queue_") && key.ends_with("_xdp_xmit") {
            &mut c.xmit
        } else if key.starts_with("tx_queue_") && key.ends_with("_xdp_xmit_errors") {
            &mut c.xmit_errors
        } else if key.starts_with("rx_queue_") && key.ends_with("_xdp_drops") {
            &mut c.drops
        } else if key.starts_with("rx_queue_") && key.ends_with("_xdp_packets") {
            &mut c.packets
        } else {
            continue;
        };
        *slot += value
            .trim()
            .parse::<u64>()
            .with_context(|| format!("ethtool -S {iface}: {line}"))?;
        seen += 1;
    }
    ensure!(
        seen >= 4,
        "no veth XDP counters in `ethtool -S {iface}`:\n{out}"
    );
    Ok(c)
}

/// One of the object's benchmark programs (the sink, the floor) attached in driver mode to an
/// interface of a namespace, through its own copy of the object; detached when dropped.
pub struct BenchXdp {
    _dp: Dataplane,
}

/// Attach the benchmark program `name` to `iface` of `ns` in driver mode.
pub fn attach_bench(ns: &Netns, iface: &str, name: &'static str) -> Result<BenchXdp> {
    attach_bench_sized(ns, iface, name, None)
}

/// `attach_bench`, with the stateful floors' flow tables (`lb_common::maps::FLOOR_FLOWS`, ...)
/// `floor_flows` entries large, for a stateful floor program; `None`: one entry each.
pub fn attach_bench_sized(
    ns: &Netns,
    iface: &str,
    name: &'static str,
    floor_flows: Option<u32>,
) -> Result<BenchXdp> {
    attach(ns, iface, name, floor_flows, None)
}

/// The hop floor (`programs::FLOOR_HOP`) on `iface` of `ns` in driver mode, steering TCP and UDP
/// to `hop.vip` to its one backend, with a flow table as large as the agent's default `FLOWS`.
pub fn attach_floor_hop(ns: &Netns, iface: &str, hop: FloorHop) -> Result<BenchXdp> {
    attach(
        ns,
        iface,
        programs::FLOOR_HOP,
        Some(lb_common::DEFAULT_FLOW_CAPACITY),
        Some(hop),
    )
}

fn attach(
    ns: &Netns,
    iface: &str,
    name: &'static str,
    floor_flows: Option<u32>,
    hop: Option<FloorHop>,
) -> Result<BenchXdp> {
    let iface = iface.to_string();
    let dp = ns.enter(move || -> Result<Dataplane> {
        let mut dp = match floor_flows {
            Some(n) => Dataplane::load_unattached_with_floors(n, None),
            None => Dataplane::load_unattached(BENCH_OBJECT_FLOWS, None),
        }
        .context("loading the eBPF object")?;
        if let Some(hop) = hop {
            dp.set_floor_hop(&hop)
                .context("configuring the hop floor")?;
        }
        // The interface index is resolved in this thread's namespace, hence inside `ns`.
        dp.attach_bench_program(name, &iface)
            .with_context(|| format!("attaching {name} to {iface} in driver mode"))?;
        Ok(dp)
    })??;
    Ok(BenchXdp { _dp: dp })
}
