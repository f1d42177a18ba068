//! `cargo xtask`: the project's entry points for a fresh machine.
//!
//! - `setup`: install every prerequisite (Debian packages, nightly `rust-src`, bpf-linker against
//!   LLVM 22, bpffs), idempotently; seconds when everything is present.
//! - `test`:  setup, then formatting, clippy (host crates and the eBPF crate), and the whole test
//!   suite, serially (the network-namespace tests share kernel state).
//! - `demo`:  setup, build, then bring up the namespace topology with nginx backends and xlb, send
//!   traffic and show which backend answered.
//! - `bench`: setup, release build, then the benchmarks (`tests/src/bin/bench.rs`); results under
//!   `bench/results/`.
//! - `package`: release build, man pages and shell completions (`dist`), then the Debian package
//!   with cargo-deb (installed by `setup` when missing) in `target/debian/`.
//! - `fuzz`: release build, then the balancer fuzzer (`tests/src/bin/fuzz.rs`) for long runs.
//!
//! This crate deliberately depends on nothing from the workspace: it has to build and run before
//! the prerequisites of the eBPF build exist.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::{
    env,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Instant,
};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "xlb's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every prerequisite (idempotent).
    Setup,
    /// Setup, fmt check, clippy, then `cargo test` for the workspace, serially.
    Test {
        /// Do not run `setup` first.
        #[arg(long)]
        skip_setup: bool,
        /// Skip the fmt and clippy checks (tests only).
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Setup, build, then run the namespace demo (three nginx backends behind xlb; with
    /// --stack the seed's whole stack).
    Demo {
        /// Do not run `setup` first.
        #[arg(long)]
        skip_setup: bool,
        /// Forwarding method of the demo VIP.
        #[arg(long, default_value = "ipip", value_parser = ["ipip", "l2"])]
        forward: String,
        /// XDP mode of the agent on lb1.
        #[arg(long, default_value = "generic", value_parser = ["driver", "generic"])]
        xdp_mode: String,
        /// How many HTTP requests to send through the VIP.
        #[arg(long, default_value_t = 12)]
        requests: u32,
        /// The seed's whole stack: two xlb nodes active-active, nginx over HTTPS, PostgreSQL
        /// primary and replica behind a write and a read VIP, Prometheus scraping both agents.
        #[arg(long)]
        stack: bool,
    },
    /// Release build, man pages and completions, then the Debian package (target/debian/).
    Package {
        /// Do not run `setup` first.
        #[arg(long)]
        skip_setup: bool,
    },
    /// Setup, release build, then the benchmarks; results in `bench/results/`.
    Bench {
        /// Do not run `setup` first.
        #[arg(long)]
        skip_setup: bool,
        /// Fewer and shorter repeats (under a minute).
        #[arg(long)]
        quick: bool,
        /// Leave out the end-to-end and packet-rate part.
        #[arg(long)]
        skip_e2e: bool,
        /// Run only this part (repeatable): packets, control-plane, serve-loop, flows, firewall,
        /// e2e.
        #[arg(long, value_name = "PART")]
        only: Vec<String>,
    },
    /// Release build, then fuzz the balancer with random and mutated frames
    /// (BPF_PROG_TEST_RUN); `cargo xtask test` runs 200000 of them.
    Fuzz {
        /// Frames to send.
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
        /// Seed (the same seed sends the same frames; `cargo xtask test` uses 13).
        #[arg(long, default_value_t = 13)]
        seed: u64,
    },
}

/// Debian packages the build and the tests need. `iputils-ping` is for the "ping to the LB still
/// works" check; `procps` for `sysctl` in the README's instructions.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libpolly-22-dev",
    "nginx-light",
    "curl",
    "iproute2",
    "ethtool",
    "nftables",
    "tcpdump",
    "socat",
    "wrk",
    "bpftool",
    "iputils-ping",
    "procps",
    // promtool, which the monitoring tests run on /metrics (the package's server is not started:
    // the install runs under a policy-rc.d that forbids service starts).
    "prometheus",
    // `cargo xtask bench`: HAProxy (mode tcp) is a comparison point; perf profiles the
    // per-packet figures ("where the time goes").
    "haproxy",
    "linux-perf",
    // Route announcement tests: BIRD 2 runs in rtr, lb1 and lb2 (eBGP + BFD).
    "bird2",
    // The database tier of the stack tests: PostgreSQL 15 primary and streaming replica (run as
    // the `postgres` user), pgbench as the real client; openssl makes the test CA.
    "postgresql-15",
    "postgresql-contrib",
    "openssl",
    // The package test: `systemd-analyze verify` of the unit, `man -l` of a page (groff renders).
    "systemd",
    "man-db",
    "groff-base",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const NGINX_PID_FILE: &str = "/run/nginx.pid";

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::Test {
            skip_setup,
            no_lint,
            test_args,
        } => test(skip_setup, no_lint, &test_args),
        Task::Demo {
            skip_setup,
            forward,
            xdp_mode,
            requests,
            stack,
        } => demo(skip_setup, &forward, &xdp_mode, requests, stack),
        Task::Bench {
            skip_setup,
            quick,
            skip_e2e,
            only,
        } => bench(skip_setup, quick, skip_e2e, &only),
        Task::Package { skip_setup } => package(skip_setup),
        Task::Fuzz { frames, seed } => fuzz(frames, seed),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root: xtask lives one level below it.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("target"),
    }
}

/// `cargo` as invoked by the user (the rustup proxy), so `+nightly` works.
fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    // `cargo run` exports the toolchain it resolved; a nested `cargo +nightly` must not inherit it.
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = status_of(cmd)?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

fn status_of(cmd: &mut Command) -> Result<ExitStatus> {
    println!("xtask: $ {}", describe(cmd));
    cmd.status()
        .with_context(|| format!("cannot run {}", describe(cmd)))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `f` as a named phase and prints how long it took.
fn phase<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    println!("xtask: == {name}");
    let out = f().with_context(|| format!("phase `{name}`"))?;
    println!(
        "xtask: == {name}: done in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------------------------
// setup

fn setup() -> Result<()> {
    phase("setup: Debian packages", apt_packages)?;
    phase("setup: nightly rust-src", rust_src)?;
    phase("setup: bpf-linker (LLVM 22)", bpf_linker)?;
    phase("setup: bpffs", bpffs)?;
    phase("setup: cargo-deb", cargo_deb)?;
    Ok(())
}

fn cargo_deb_works() -> bool {
    cargo()
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// cargo-deb builds the Debian package (`cargo xtask package`, and the package test). Built from
/// its crate once (about 1.5 minutes); seconds when present.
fn cargo_deb() -> Result<()> {
    if cargo_deb_works() {
        println!("xtask: cargo-deb present");
        return Ok(());
    }
    run(cargo().args(["install", "cargo-deb", "--locked"]))?;
    if !cargo_deb_works() {
        bail!("cargo-deb was installed but `cargo deb --version` fails (is ~/.cargo/bin on PATH?)");
    }
    Ok(())
}

/// Packages from `APT_PACKAGES` that are not installed (dpkg status `ii`).
fn missing_packages() -> Result<Vec<&'static str>> {
    // dpkg-query exits 1 when a package is unknown to dpkg; its output still lists the known ones.
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${db:Status-Abbrev}|${Package}\n")
        .args(APT_PACKAGES)
        .output()
        .context("cannot run dpkg-query (is this Debian?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once('|'))
        .filter(|(status, _)| status.trim() == "ii")
        .map(|(_, pkg)| pkg)
        .collect();
    Ok(APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

fn apt_packages() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        println!("xtask: all {} packages present", APT_PACKAGES.len());
        return Ok(());
    }
    if !is_root() {
        bail!("packages missing ({}); run as root", missing.join(" "));
    }
    let nginx_before = running_nginx_pid();
    {
        // Debian's maintainer scripts start services (nginx) through invoke-rc.d, which asks
        // policy-rc.d first: exit 101 = "not allowed". The tests run their own nginx instances in
        // namespaces; one in the root namespace would hold port 80 and serve nothing of ours.
        let _policy = PolicyRcD::install()?;
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // Belt and braces: if the install did start an nginx anyway (no policy-rc.d honoured), stop the
    // one it started, by the pid in its pid file. An nginx that ran before we started is not ours.
    if nginx_before.is_none()
        && let Some(pid) = running_nginx_pid()
    {
        println!("xtask: stopping the nginx (pid {pid}) that the package install started");
        // SAFETY: plain kill(2) on a pid read from nginx's own pid file.
        unsafe { libc::kill(pid, libc::SIGQUIT) };
    }
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

/// The pid in nginx's default pid file, if that process exists.
fn running_nginx_pid() -> Option<i32> {
    let pid: i32 = fs::read_to_string(NGINX_PID_FILE)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: signal 0 only checks that the pid exists.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// A temporary `policy-rc.d` that forbids service starts; removed on drop. An existing one (e.g. a
/// container's) is left alone: it already decides, and it is not ours to remove.
struct PolicyRcD {
    created: bool,
}

impl PolicyRcD {
    fn install() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self { created: false });
        }
        fs::write(POLICY_RC_D, "#!/bin/sh\n# written by cargo xtask setup for the duration of apt-get install\nexit 101\n")
            .with_context(|| format!("writing {POLICY_RC_D}"))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))?;
        Ok(Self { created: true })
    }
}

impl Drop for PolicyRcD {
    fn drop(&mut self) {
        if self.created {
            let _ = fs::remove_file(POLICY_RC_D);
        }
    }
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("cannot run rustup")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is not installed (rustup toolchain install nightly): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        println!("xtask: rust-src present");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        println!("xtask: bpf-linker present");
        return Ok(());
    }
    // bpf-linker must link against the same LLVM major as the nightly rustc (22); the default
    // feature set would pick whatever llvm-sys finds first.
    let path = format!("{LLVM_PREFIX}/bin:{}", env::var("PATH").unwrap_or_default());
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .env("PATH", path))?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails (is ~/.cargo/bin on PATH?)"
        );
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        println!("xtask: bpffs mounted");
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at /sys/fs/bpf; run as root");
    }
    fs::create_dir_all("/sys/fs/bpf").ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

// ---------------------------------------------------------------------------------------------
// test

fn test(skip_setup: bool, no_lint: bool, test_args: &[String]) -> Result<()> {
    let total = Instant::now();
    if !skip_setup {
        setup()?;
    }
    if !no_lint {
        phase("cargo fmt --check", || {
            run(cargo().args(["fmt", "--all", "--", "--check"]))
        })?;
        // lb-ebpf is `no_std`/`no_main` for bpfel-unknown-none and does not build for the host, so
        // the host pass leaves it out and the next phase lints it for its real target.
        phase("clippy (host crates)", || {
            run(cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
        phase("clippy (lb-ebpf, bpfel-unknown-none)", || {
            run(cargo().args([
                "+nightly",
                "clippy",
                "-p",
                "lb-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
    }
    phase("build binaries", build_bins)?;
    phase(
        "build the upgrade test's second xlb (layout-test)",
        build_upgrade_bin,
    )?;
    phase("the package test's .deb (debug binary)", || {
        dist(&xlb_bin())?;
        deb(&["--profile", "dev", "-o"], &test_deb())
    })?;
    phase("cargo test (serial)", || {
        let mut cmd = cargo();
        cmd.args(["test", "--workspace", "--exclude", "lb-ebpf", "--"])
            .arg("--test-threads=1")
            .args(test_args)
            .env("XLB_BIN", xlb_bin())
            .env("XLB_UPGRADE_BIN", upgrade_bin())
            .env("XLB_DEB", test_deb());
        run(&mut cmd)
    })?;
    println!(
        "xtask: all checks passed in {:.1}s",
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

fn xlb_bin() -> PathBuf {
    target_dir().join("debug").join("xlb")
}

/// The `xlb` binary and the demo: the tests locate `xlb` through `XLB_BIN`, so it must exist
/// before `cargo test` starts (cargo only builds a test's own crate's binaries for it).
fn build_bins() -> Result<()> {
    run(cargo().args(["build", "--workspace", "--exclude", "lb-ebpf", "--bins"]))
}

/// Where the upgrade test finds the second build of `xlb`.
fn upgrade_bin() -> PathBuf {
    target_dir().join("layout-test").join("xlb")
}

/// The second build for the upgrade test (`tests/tests/restart.rs`): `xlb` with the test-only
/// `layout-test` feature, whose data path has another flow-table layout. Built in the shared
/// target directory (only lb-common, lb-userspace and the eBPF object differ, so the other
/// dependencies are not built again, which a target directory of its own would cost) and
/// copied into `target/layout-test/`; then the default binaries are built again, which only
/// relinks them.
fn build_upgrade_bin() -> Result<()> {
    run(cargo().args([
        "build",
        "-p",
        "lb-userspace",
        "--bin",
        "xlb",
        "--features",
        "layout-test",
    ]))?;
    let dest = upgrade_bin();
    fs::create_dir_all(dest.parent().expect("a parent"))?;
    // A copy, not a link: the next build replaces target/debug/xlb.
    let _ = fs::remove_file(&dest);
    fs::copy(xlb_bin(), &dest).with_context(|| format!("copying to {}", dest.display()))?;
    build_bins()
}

// ---------------------------------------------------------------------------------------------
// package

/// The .deb the package test installs: the debug binary (no release build in the tests).
fn test_deb() -> PathBuf {
    target_dir().join("debian").join("xlb_test.deb")
}

/// Man pages (one per command) and bash/zsh completions from `bin` into `target/dist/`, where
/// the package's assets point.
fn dist(bin: &Path) -> Result<()> {
    let dist = target_dir().join("dist");
    let _ = fs::remove_dir_all(&dist);
    let completions = dist.join("completions");
    fs::create_dir_all(&completions)?;
    run(Command::new(bin).arg("man-pages").arg(dist.join("man")))?;
    for (shell, file) in [("bash", "xlb.bash"), ("zsh", "_xlb")] {
        let out = Command::new(bin)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!("xlb completions {shell} failed");
        }
        fs::write(completions.join(file), out.stdout)?;
    }
    Ok(())
}

/// `cargo deb -p lb-userspace --no-build <args> <out>`.
fn deb(args: &[&str], out: &Path) -> Result<()> {
    fs::create_dir_all(out.parent().expect("a parent"))?;
    run(cargo()
        .args(["deb", "-p", "lb-userspace", "--no-build"])
        .args(args)
        .arg(out))
}

fn package(skip_setup: bool) -> Result<()> {
    if !skip_setup {
        setup()?;
    } else {
        phase("cargo-deb", cargo_deb)?;
    }
    phase("build xlb (release)", || {
        run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "xlb"]))
    })?;
    let release = target_dir().join("release").join("xlb");
    phase("man pages and completions", || dist(&release))?;
    let out = target_dir().join("debian");
    phase("cargo deb", || deb(&["-o"], &out))?;
    println!("xtask: the package is in {}", out.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// demo

fn demo(skip_setup: bool, forward: &str, xdp_mode: &str, requests: u32, stack: bool) -> Result<()> {
    if !skip_setup {
        setup()?;
    }
    phase("build binaries", build_bins)?;
    let demo_bin = target_dir().join("debug").join("demo");
    // Ctrl-C reaches the whole foreground process group; the demo tears its namespaces down on
    // SIGINT and exits, so xtask waits for it rather than dying first and leaving the terminal
    // before the clean-up output. A handler (unlike SIG_IGN) is reset by exec, so the demo and the
    // processes it starts keep the default disposition.
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installing an empty, async-signal-safe handler.
    unsafe {
        libc::signal(libc::SIGINT, ignore as *const () as libc::sighandler_t);
    }
    let status = status_of(
        Command::new(&demo_bin)
            .args([
                OsStr::new("--forward"),
                OsStr::new(forward),
                OsStr::new("--xdp-mode"),
                OsStr::new(xdp_mode),
                OsStr::new("--requests"),
            ])
            .arg(requests.to_string())
            .args(stack.then_some("--stack"))
            .env("XLB_BIN", xlb_bin()),
    )?;
    if !status.success() {
        bail!("the demo failed ({status})");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench

fn build_release() -> Result<()> {
    phase("build binaries (release)", || {
        run(cargo().args([
            "build",
            "--release",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--bins",
        ]))
    })
}

/// As for the demo: the bench and the fuzzer remove their namespaces on SIGINT and exit, so
/// xtask waits for them.
fn wait_through_sigint() {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installing an empty, async-signal-safe handler.
    unsafe {
        libc::signal(libc::SIGINT, ignore as *const () as libc::sighandler_t);
    }
}

fn bench(skip_setup: bool, quick: bool, skip_e2e: bool, only: &[String]) -> Result<()> {
    if !skip_setup {
        setup()?;
    }
    build_release()?;
    let release = target_dir().join("release");
    wait_through_sigint();
    let mut cmd = Command::new(release.join("bench"));
    if quick {
        cmd.arg("--quick");
    }
    if skip_e2e {
        cmd.arg("--skip-e2e");
    }
    for part in only {
        cmd.args(["--only", part]);
    }
    cmd.current_dir(workspace_root())
        .env("XLB_BIN", release.join("xlb"));
    let status = status_of(&mut cmd)?;
    if !status.success() {
        bail!("the benchmarks failed ({status})");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// fuzz

fn fuzz(frames: u64, seed: u64) -> Result<()> {
    build_release()?;
    wait_through_sigint();
    let status = status_of(
        Command::new(target_dir().join("release").join("fuzz"))
            .args(["--frames", &frames.to_string(), "--seed", &seed.to_string()])
            .current_dir(workspace_root()),
    )?;
    if !status.success() {
        bail!("the fuzzer failed ({status})");
    }
    Ok(())
}
