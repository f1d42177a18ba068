//! Where a benchmark's time goes: `perf record` (software `cpu-clock` sampling, since these VMs
//! expose no hardware PMU, so `bpftool prog profile` cannot run), then `perf report` by symbol.
//!
//! - Per packet (`profile`): the benchmark thread, while it runs one kind of packet through
//!   `BPF_PROG_TEST_RUN`. Samples taken in the syscall belong to this thread, so the report splits
//!   the time between the JIT-compiled program (`bpf_prog_<tag>_<name>`), the helpers and map code
//!   it calls (`bpf_xdp_fib_lookup`, `htab_lru_*`, ...) and the test-run harness itself.
//! - End to end (`system_profile`): every CPU while a load runs through the test bed, by what the
//!   machine spent it on (`system_category`): xlb's program, generic-XDP glue, the rest of the
//!   kernel, user space, idle.

use anyhow::{Context, Result, bail};
use std::{
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Sampling frequency (Hz). cpu-clock is an hrtimer, so this is a real rate.
pub const FREQ_HZ: u32 = 20_000;
/// Symbols under this share (percent) are not listed one by one.
const MIN_SHARE: f64 = 1.0;

/// One symbol's share of the samples.
#[derive(Clone, Debug)]
pub struct Share {
    pub symbol: String,
    pub percent: f64,
}

/// The profile of one figure.
pub struct Profile {
    pub what: String,
    pub samples: u64,
    /// The largest symbols, then "other".
    pub shares: Vec<Share>,
    /// Every sample by what it was spent on (`category`), largest first.
    pub categories: Vec<Share>,
    /// The figure's measured cost (ns per packet or per call), to split by category.
    pub ns: Option<f64>,
}

/// Symbols at most listed per profile (the categories cover the rest).
const TOP: usize = 12;

/// The kernel's hash and LRU map code (lookup, hash, bucket walk, key compare, LRU lists).
fn is_map_code(sym: &str) -> bool {
    [
        "htab",
        "lookup_nulls_elem",
        "lookup_elem_raw",
        "bpf_lru",
        "memcmp",
        "jhash",
    ]
    .iter()
    .any(|p| sym.contains(p))
}

/// What a kernel symbol's time is spent on, for the summary of a profile.
pub fn category(sym: &str) -> &'static str {
    let sym = sym.strip_prefix("[.] ").unwrap_or(sym);
    const HARNESS: [&str; 24] = [
        "bpf_test_",
        "bpf_prog_test_run",
        "bpf_ctx_",
        "__sys_bpf",
        "do_syscall",
        "syscall",
        "entry_SYSCALL",
        "_copy_from_user",
        "_copy_to_user",
        "__check_object_size",
        "__check_heap_object",
        "__virt_addr_valid",
        "is_vmalloc_addr",
        "__kmalloc",
        "kfree",
        "kmalloc",
        "security_bpf",
        "fdget",
        "fput",
        "__bpf_prog_put",
        "__bpf_prog_enter",
        "__bpf_prog_exit",
        "__vdso",
        "bpf_probe_read_kernel",
    ];
    if sym.starts_with("bpf_prog_") && !sym.starts_with("bpf_prog_test_run") {
        "the program's own instructions (JIT code)"
    } else if is_map_code(sym) {
        "hash and LRU maps (VIP and flow lookups, flow insert)"
    } else if ["fib", "neigh"].iter().any(|p| sym.contains(p)) {
        "FIB and neighbour lookup"
    } else if ["ktime", "read_tsc", "clock"]
        .iter()
        .any(|p| sym.contains(p))
    {
        "clock reads (the program's and the harness's timers)"
    } else if HARNESS.iter().any(|p| sym.starts_with(p)) {
        "test-run harness and syscall"
    } else {
        "other kernel code"
    }
}

/// Is `perf` usable here (installed, and allowed to sample)?
pub fn available() -> bool {
    Command::new("perf")
        .args(["stat", "-e", "cpu-clock", "-x,", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What `perf record` samples.
enum Target {
    /// The calling thread.
    ThisThread,
    /// Every CPU.
    System,
    /// One CPU, whatever runs on it.
    Cpu(usize),
}

struct Recorder {
    child: Child,
    out: PathBuf,
}

impl Recorder {
    /// Record `target`.
    fn start(what: &str, target: Target) -> Result<Recorder> {
        let target = match target {
            // SAFETY: gettid has no preconditions.
            Target::ThisThread => vec!["-t".to_string(), unsafe { libc::gettid() }.to_string()],
            Target::System => vec!["-a".to_string()],
            Target::Cpu(cpu) => vec!["-C".to_string(), cpu.to_string()],
        };
        let out = std::env::temp_dir().join(format!(
            "xlb-bench-perf-{}-{}.data",
            std::process::id(),
            what.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        ));
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F"])
            .arg(FREQ_HZ.to_string())
            .args(&target)
            .arg("-o")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        // perf needs a moment to open its events; samples before that are simply not taken.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Recorder { child, out })
    }

    /// Stop recording (SIGINT to perf's own PID, which makes it write its file) and report.
    fn finish(mut self) -> Result<(u64, Vec<Share>)> {
        // SAFETY: signalling the child we spawned, by PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().context("waiting for perf record")?;
        // perf re-raises the SIGINT it handled once its file is written, so that is success.
        if !status.success() && status.signal() != Some(libc::SIGINT) {
            bail!("perf record exited with {status}");
        }
        let out = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", "sym", "-i"])
            .arg(&self.out)
            .output()
            .context("perf report")?;
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(self.out.with_extension("data.old"));
        if !out.status.success() {
            bail!(
                "perf report failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(parse_report(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Only reached with perf still running when the work failed: stop it by PID.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: as in `finish`.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let _ = self.child.wait();
            let _ = std::fs::remove_file(&self.out);
        }
    }
}

/// `perf report --stdio --sort sym`: "# Samples: 12K of event ..." and lines
/// "    41.20%  [k] bpf_prog_0123abcd_xlb_balancer".
fn parse_report(text: &str) -> (u64, Vec<Share>) {
    let mut samples = 0;
    let mut shares = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# Samples: ") {
            let n = rest.split_whitespace().next().unwrap_or("0");
            samples = parse_count(n);
            continue;
        }
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((pct, sym)) = line.split_once("%") else {
            continue;
        };
        let Ok(percent) = pct.trim().parse::<f64>() else {
            continue;
        };
        let sym = sym.trim();
        // Kernel symbols lose their "[k] "; user-space ones keep "[.] " (see `system_category`).
        let symbol = match sym.strip_prefix("[k] ") {
            Some(k) => tidy(k),
            None => sym.to_string(),
        };
        shares.push(Share { symbol, percent });
    }
    (samples, shares)
}

/// "12K" → 12000.
fn parse_count(s: &str) -> u64 {
    let (num, mult) = match s.strip_suffix('K') {
        Some(n) => (n, 1000.0),
        None => match s.strip_suffix('M') {
            Some(n) => (n, 1e6),
            None => (s, 1.0),
        },
    };
    (num.parse::<f64>().unwrap_or(0.0) * mult) as u64
}

/// JIT symbols carry the program's tag, which changes with every build: keep the name only.
fn tidy(sym: &str) -> String {
    match sym.strip_prefix("bpf_prog_") {
        Some(rest) => match rest.split_once('_') {
            Some((tag, name)) if tag.len() == 16 => format!("bpf_prog_…_{name} (JIT code)"),
            _ => sym.to_string(),
        },
        None => sym.to_string(),
    }
}

/// Profile `work`, called repeatedly on this thread for `dur` or until it returns false.
pub fn profile(
    what: &str,
    dur: Duration,
    mut work: impl FnMut() -> Result<bool>,
) -> Result<Profile> {
    let rec = Recorder::start(what, Target::ThisThread)?;
    let t = Instant::now();
    while t.elapsed() < dur {
        if !work()? {
            break;
        }
    }
    let (samples, all) = rec.finish()?;
    let categories = by_category(&all, category);
    let mut shares: Vec<Share> = all
        .iter()
        .filter(|s| s.percent >= MIN_SHARE)
        .take(TOP)
        .cloned()
        .collect();
    let listed: f64 = shares.iter().map(|s| s.percent).sum();
    let other: f64 = all.iter().map(|s| s.percent).sum::<f64>() - listed;
    if other > 0.0 {
        shares.push(Share {
            symbol: "everything else".to_string(),
            percent: other,
        });
    }
    Ok(Profile {
        what: what.to_string(),
        samples,
        shares,
        categories,
        ns: None,
    })
}

/// The shares summed by `category` of their symbol, largest first.
fn by_category(all: &[Share], category: fn(&str) -> &'static str) -> Vec<Share> {
    let mut categories: Vec<Share> = Vec::new();
    for s in all {
        let c = category(&s.symbol);
        match categories.iter_mut().find(|x| x.symbol == c) {
            Some(x) => x.percent += s.percent,
            None => categories.push(Share {
                symbol: c.to_string(),
                percent: s.percent,
            }),
        }
    }
    categories.sort_by(|a, b| b.percent.total_cmp(&a.percent));
    categories
}

/// What the machine spent a sample on, in an end-to-end profile: by subsystem, from the kernel
/// symbol's prefix (the first rule that matches).
pub fn system_category(sym: &str) -> &'static str {
    const RULES: &[(&str, &[&str])] = &[
        (
            "idle",
            &[
                "default_idle",
                "cpu_idle",
                "do_idle",
                "poll_idle",
                "pv_native_safe_halt",
                "mwait",
                "acpi_idle",
                "cpuidle",
            ],
        ),
        ("veth", &["veth_"]),
        ("bridge", &["br_", "__br_"]),
        (
            "netfilter and conntrack",
            &["nf_", "__nf_", "nft_", "ipt_", "hash_conntrack"],
        ),
        (
            "TCP and sockets",
            &[
                "tcp_",
                "__tcp_",
                "inet_",
                "__inet_",
                "sock_",
                "__sock_",
                "sk_",
                "__sk_",
                "release_sock",
                "lock_sock",
            ],
        ),
        (
            "IP and routing",
            &[
                "ip_",
                "__ip_",
                "iptunnel_",
                "ip4_",
                "ipv4_",
                "fib_",
                "dst_",
                "rt_",
                "raw_v4",
                "icmp_",
            ],
        ),
        (
            "device layer and NAPI",
            &[
                "netif_",
                "__netif_",
                "dev_",
                "__dev_",
                "net_rx_action",
                "process_backlog",
                "napi_",
                "__napi_",
                "gro_",
                "dev_gro",
                "validate_xmit",
                "sch_direct",
                "qdisc",
                "__qdisc",
                "pfifo",
                "eth_",
                "neigh_",
            ],
        ),
        (
            "skb, memory and copies",
            &[
                "skb_",
                "__skb_",
                "kfree_skb",
                "consume_skb",
                "__alloc_skb",
                "__build_skb",
                "__netdev_alloc",
                "kmem_cache",
                "__kmalloc",
                "kmalloc",
                "kfree",
                "page_pool",
                "copy_",
                "_copy_",
                "memcpy",
                "memset",
                "__pi_mem",
                "csum_",
                "memmove",
                "__memcpy",
                "rep_movs",
                "clear_page",
                "__slab",
                "___slab",
                "slab_",
                "__page",
                "free_",
                "alloc_",
                "__alloc",
                "get_page",
                "put_page",
                "folio",
            ],
        ),
        (
            "syscalls, epoll and files",
            &[
                "__sys_",
                "sys_",
                "__x64_sys",
                "do_syscall",
                "entry_SYSCALL",
                "syscall_",
                "ep_",
                "do_epoll",
                "__fdget",
                "fdget",
                "fput",
                "security_",
                "aa_",
                "apparmor",
                "vfs_",
                "fsnotify",
                "__fsnotify",
                "ksys_",
                "x64_sys_call",
                "entry_SYSRET",
                "rw_verify",
                "import_",
                "__check_object",
                "check_heap",
                "__virt_addr",
            ],
        ),
        (
            "scheduler, softirq, timers and locks",
            &[
                "schedule",
                "__schedule",
                "_raw_spin",
                "native_queued",
                "__raw_callee_save",
                "__pv_queued",
                "raw_spin_rq",
                "__update_load_avg",
                "queued_spin",
                "do_softirq",
                "__do_softirq",
                "handle_softirqs",
                "__local_bh",
                "local_bh",
                "irq_",
                "finish_task_switch",
                "try_to_wake_up",
                "ttwu",
                "enqueue_",
                "dequeue_",
                "update_",
                "pick_next",
                "psi_",
                "rcu_",
                "__rcu",
                "select_task",
                "wake_up",
                "__wake_up",
                "hrtimer",
                "__hrtimer",
                "tick_",
                "ktime",
                "read_tsc",
                "sched_",
                "run_timer",
                "asm_",
                "__sysvec",
                "sysvec_",
                "set_next",
                "put_prev",
                "check_preempt",
                "resched",
                "switch_",
                "__switch",
                "migrate_",
                "cpuacct",
                "account_",
                "native_sched",
                "preempt_",
            ],
        ),
    ];
    if sym.starts_with("[.] ") {
        return "user space (wrk, nginx, HAProxy, ...)";
    }
    // Generic XDP first: its main function is `bpf_prog_run_generic_xdp`.
    if sym.contains("generic_xdp")
        || sym.contains("xdp_generic")
        || sym.contains("generic_redirect")
    {
        return "generic-mode XDP glue (skb to XDP and back)";
    }
    // A program's symbol is `bpf_prog_<tag>_<function>`: the balancer's BPF subprograms
    // (`established4`, `forward`, ...) are named for their functions, not for the program.
    if sym.starts_with("bpf_prog_") && sym.ends_with("(JIT code)") {
        return if ["xlb_floor", "xlb_bench", "xlb_pass"]
            .iter()
            .any(|p| sym.contains(p))
        {
            "benchmark programs: floors, generator, sink, pass (JIT code)"
        } else {
            "xlb's XDP programs (JIT code)"
        };
    }
    if sym.starts_with("bpf_") || is_map_code(sym) {
        return "BPF maps and helpers";
    }
    RULES
        .iter()
        .find(|(_, prefixes)| prefixes.iter().any(|p| sym.starts_with(p)))
        .map_or("other kernel code", |(name, _)| name)
}

/// An end-to-end profile: how many samples, their shares by `system_category` (largest first),
/// and every symbol's share (largest first).
pub struct SystemProfile {
    pub samples: u64,
    pub categories: Vec<Share>,
    pub symbols: Vec<Share>,
}

/// Profile every CPU while `load` runs.
pub fn system_profile<T>(
    what: &str,
    load: impl FnOnce() -> Result<T>,
) -> Result<(T, SystemProfile)> {
    profile_by_system_category(what, Target::System, load)
}

/// Profile CPU `cpu` (whatever runs on it) while `load` runs.
pub fn cpu_profile<T>(
    what: &str,
    cpu: usize,
    load: impl FnOnce() -> Result<T>,
) -> Result<(T, SystemProfile)> {
    profile_by_system_category(what, Target::Cpu(cpu), load)
}

fn profile_by_system_category<T>(
    what: &str,
    target: Target,
    load: impl FnOnce() -> Result<T>,
) -> Result<(T, SystemProfile)> {
    let rec = Recorder::start(what, target)?;
    let out = load()?;
    let (samples, mut symbols) = rec.finish()?;
    let categories = by_category(&symbols, system_category);
    symbols.sort_by(|a, b| b.percent.total_cmp(&a.percent));
    Ok((
        out,
        SystemProfile {
            samples,
            categories,
            symbols,
        },
    ))
}

/// The profiles as markdown: per figure, the categories (with `ns` per packet each, when the
/// figure's cost is known) and the largest symbols.
pub fn markdown(profiles: &[Profile]) -> String {
    let mut s = String::new();
    for p in profiles {
        let ns = p.ns;
        s.push_str(&format!("\n**{}** ({} samples", p.what, p.samples));
        if let Some(ns) = ns {
            s.push_str(&format!("; measured {ns:.0} ns"));
        }
        s.push_str(")\n\n| share | ≈ ns | spent on |\n|---:|---:|---|\n");
        for c in &p.categories {
            let part = ns.map_or("".into(), |ns| format!("{:.0}", ns * c.percent / 100.0));
            s.push_str(&format!("| {:.1}% | {part} | {} |\n", c.percent, c.symbol));
        }
        s.push_str("\n| share | largest symbols |\n|---:|---|\n");
        for sh in &p.shares {
            s.push_str(&format!("| {:.1}% | `{}` |\n", sh.percent, sh.symbol));
        }
    }
    s
}

pub fn json(profiles: &[Profile]) -> serde_json::Value {
    serde_json::Value::Array(
        profiles
            .iter()
            .map(|p| {
                serde_json::json!({
                    "what": p.what,
                    "samples": p.samples,
                    "ns": p.ns,
                    "categories": p.categories.iter().map(|s| serde_json::json!({"category": s.symbol, "percent": s.percent})).collect::<Vec<_>>(),
                    "symbols": p.shares.iter().map(|s| serde_json::json!({"symbol": s.symbol, "percent": s.percent})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_report() {
        let text = "# Samples: 12K of event 'cpu-clock'\n#\n# Overhead  Symbol\n\
                    #\n    41.20%  [k] bpf_prog_0123456789abcdef_xlb_balancer\n\
                    \x20    9.50%  [k] bpf_xdp_fib_lookup\n     0.20%  [.] main\n";
        let (n, shares) = parse_report(text);
        assert_eq!(n, 12000);
        assert_eq!(shares.len(), 3);
        assert_eq!(shares[0].symbol, "bpf_prog_…_xlb_balancer (JIT code)");
        assert!((shares[0].percent - 41.2).abs() < 1e-9);
        assert_eq!(shares[1].symbol, "bpf_xdp_fib_lookup");
        assert_eq!(shares[2].symbol, "[.] main");
    }

    #[test]
    fn categories_split_program_maps_fib_and_harness() {
        assert_eq!(
            category("bpf_prog_…_xlb_balancer (JIT code)"),
            "the program's own instructions (JIT code)"
        );
        assert!(category("htab_map_hash").starts_with("hash"));
        assert!(category("bpf_lru_pop_free").starts_with("hash"));
        assert!(category("bpf_ipv4_fib_lookup").starts_with("FIB"));
        assert!(category("read_tsc").starts_with("clock"));
        assert!(category("bpf_prog_test_run_xdp").starts_with("test-run"));
        assert!(category("do_syscall_64").starts_with("test-run"));
        assert_eq!(category("schedule"), "other kernel code");
        assert!(category("[.] syscall").starts_with("test-run"));
    }

    #[test]
    fn system_categories() {
        assert!(system_category("[.] nginx_worker").starts_with("user"));
        assert!(system_category("bpf_prog_…_xlb_balancer (JIT code)").starts_with("xlb's"));
        assert!(system_category("bpf_prog_…_established4 (JIT code)").starts_with("xlb's"));
        assert!(system_category("bpf_prog_…_xlb_pass (JIT code)").starts_with("benchmark"));
        assert!(system_category("bpf_prog_…_xlb_floor_flow_tx (JIT code)").starts_with("bench"));
        assert!(system_category("bpf_xdp_adjust_head").starts_with("BPF maps"));
        assert!(system_category("do_xdp_generic").starts_with("generic"));
        assert!(system_category("bpf_prog_run_generic_xdp").starts_with("generic"));
        assert!(system_category("lookup_nulls_elem_raw").starts_with("BPF maps"));
        assert_eq!(system_category("__pi_memset"), "skb, memory and copies");
        assert!(system_category("netif_receive_generic_xdp").starts_with("generic"));
        assert!(system_category("pv_native_safe_halt").starts_with("idle"));
        assert_eq!(system_category("tcp_v4_rcv"), "TCP and sockets");
        assert_eq!(system_category("veth_xmit"), "veth");
        assert_eq!(system_category("br_handle_frame"), "bridge");
        assert_eq!(
            system_category("nf_conntrack_in"),
            "netfilter and conntrack"
        );
        assert_eq!(system_category("ip_rcv"), "IP and routing");
        assert_eq!(
            system_category("__netif_receive_skb_core"),
            "device layer and NAPI"
        );
        assert_eq!(
            system_category("skb_release_data"),
            "skb, memory and copies"
        );
        assert_eq!(
            system_category("do_syscall_64"),
            "syscalls, epoll and files"
        );
        assert_eq!(
            system_category("_raw_spin_lock"),
            "scheduler, softirq, timers and locks"
        );
        assert_eq!(system_category("something_else"), "other kernel code");
    }
}
