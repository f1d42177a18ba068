//! `cargo xtask fuzz --frames N [--seed S]`: the balancer fuzzer (`xlb_tests::fuzz`) for long
//! runs, in a fixture namespace of its own. Prints progress and the report; exits 1 with the
//! failing frame on the first problem. Needs root.

use clap::Parser;
use std::time::Instant;
use xlb_tests::{fixture, fuzz, interrupt, netns};

#[derive(Parser)]
#[command(about = "Fuzz xlb's balancer with random and mutated frames (BPF_PROG_TEST_RUN)")]
struct Args {
    /// Frames to send.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u64,
    /// Seed of the frames (the same seed gives the same frames).
    #[arg(long, default_value_t = 13)]
    seed: u64,
}

fn main() {
    let args = Args::parse();
    interrupt::install();
    netns::require_root();
    let _ = netns::sweep_stale();
    let ns = fixture::fixture_netns();
    let (frames, seed) = (args.frames, args.seed);
    let result = ns.enter(move || -> anyhow::Result<fuzz::FuzzReport> {
        let ifindex = xlb::util::interface_index("lb0")?;
        let dp = fuzz::fuzz_balancer()?;
        let started = Instant::now();
        let mut last = Instant::now();
        fuzz::run(&dp, ifindex, frames, seed, |done| {
            if last.elapsed().as_secs() >= 10 {
                last = Instant::now();
                let rate = done as f64 / started.elapsed().as_secs_f64();
                println!("fuzz: {done} of {frames} frames, {rate:.0} frames/s");
            }
        })
    });
    match result {
        Ok(Ok(report)) => println!("{}", report.summary(seed)),
        Ok(Err(e)) => {
            eprintln!("fuzz: FAILED: {e:#}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("fuzz: error: {e:#}");
            std::process::exit(1);
        }
    }
}
