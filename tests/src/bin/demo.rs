//! `cargo xtask demo`: brings up the test topology with three nginx backends behind xlb, sends
//! requests through the VIP, prints which backend answered each one and xlb's counters, then stops
//! nginx on be2 and starts it again: the health checks take it out of the rotation and back in.
//! Everything is torn down at the end (also on Ctrl-C or a failure). With `--stack`, the seed's
//! whole stack instead (see `xlb_tests::stack_demo`).

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::time::{Duration, Instant};
use xlb_tests::{
    backend::HTTP_PORT,
    interrupt, netns, stack_demo,
    testbed::{FAST_HTTP_CHECK, Testbed, TestbedOptions},
    topology::{LB1_ADDR, VIP, VIP6},
};

/// The backend the demo stops and starts again.
const VICTIM: &str = "be2";
/// Bound on waiting for a state change in `xlb backend list`.
const STATE_WAIT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(about = "xlb demo: three nginx backends behind xlb in network namespaces")]
struct Args {
    /// Forwarding method of the VIP.
    #[arg(long, default_value = "ipip", value_parser = ["ipip", "l2"])]
    forward: String,
    /// XDP mode of the agent (and the backends' decapsulator).
    #[arg(long, default_value = "generic", value_parser = ["driver", "generic"])]
    xdp_mode: String,
    /// HTTP requests to send, each on a new connection.
    #[arg(long, default_value_t = 12)]
    requests: u32,
    /// The whole stack instead: two xlb nodes active-active, nginx over HTTPS, PostgreSQL
    /// primary and replica behind a write and a read VIP, Prometheus scraping both agents.
    #[arg(long)]
    stack: bool,
}

fn main() {
    let args = Args::parse();
    interrupt::install();
    netns::require_root();
    match run(&args) {
        Ok(()) => println!("demo: done, every namespace and process removed"),
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let mut result = if args.stack {
        stack_demo::run(&args.xdp_mode)
    } else {
        plain(args)
    };
    if let Err(interrupted) = interrupt::check() {
        // Ctrl-C also reached curl and the servers; their errors are not the story.
        result = Err(interrupted);
    }
    let left: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(netns::PREFIX))
        .collect();
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    result
}

/// The plain demo: three nginx backends behind one agent.
fn plain(args: &Args) -> Result<()> {
    let start = Instant::now();
    println!(
        "demo: building namespaces (cli — rtr/br0 — lb1, be1..be3), nginx on each backend, \
         xlb agent on lb1 (XDP {}), VIPs {VIP} and [{VIP6}] :80 and :5353/udp (forward {})",
        args.xdp_mode, args.forward
    );
    println!(
        "demo: health check of the HTTP VIP: xlb vip add {VIP}:{HTTP_PORT} {}",
        FAST_HTTP_CHECK.join(" ")
    );
    let mut bed = Testbed::up(
        TestbedOptions::new(&args.forward, &args.xdp_mode)
            .with_fast_checks()
            .dual_stack(),
    )?;
    println!(
        "demo: ready in {:.1}s (namespaces {}-*)\n",
        start.elapsed().as_secs_f64(),
        bed.topo.prefix()
    );
    let result = traffic(&bed, args)
        .and_then(|()| traffic6(&mut bed))
        .and_then(|()| stats(&bed))
        .and_then(|()| fail_and_recover(&mut bed));
    if result.is_err() && interrupt::check().is_ok() {
        eprintln!("{}", bed.diagnostics());
    }
    println!("\ndemo: tearing down");
    drop(bed);
    result
}

fn traffic(bed: &Testbed, args: &Args) -> Result<()> {
    println!("$ ip netns exec cli curl http://{VIP}/   (one new connection per request)");
    for n in 1..=args.requests {
        interrupt::check()?;
        println!("request {n:2} -> {}", bed.get_backend()?);
    }
    interrupt::check()?;
    let keepalive = bed.keepalive(5)?;
    let names: Vec<&str> = keepalive.iter().map(|(b, _)| b.as_str()).collect();
    println!("keep-alive connection, 5 requests -> {}", names.join(" "));
    interrupt::check()?;
    println!("udp {VIP}:5353 -> {}", bed.udp()?);
    println!(
        "tcp {LB1_ADDR}:2222 (lb1's own address, not a VIP) -> {}",
        bed.lb1_tcp()?
    );
    Ok(())
}

/// The same VIP's IPv6 twin on the same bed: new connections, a keep-alive one and UDP.
fn traffic6(bed: &mut Testbed) -> Result<()> {
    bed.use_ipv6(true);
    let result = (|| -> Result<()> {
        println!(
            "\n$ ip netns exec cli curl -g http://[{VIP6}]/   (IPv6: the same backends' IPv6 addresses)"
        );
        println!("6 new connections -> {}", rotation(bed, 6)?);
        interrupt::check()?;
        let keepalive = bed.keepalive(5)?;
        let names: Vec<&str> = keepalive.iter().map(|(b, _)| b.as_str()).collect();
        println!("keep-alive connection, 5 requests -> {}", names.join(" "));
        println!("udp [{VIP6}]:5353 -> {}", bed.udp()?);
        Ok(())
    })();
    bed.use_ipv6(false);
    result
}

fn stats(bed: &Testbed) -> Result<()> {
    interrupt::check()?;
    println!("\n$ xlb stats");
    print!("{}", bed.client().ok(&["stats"])?);
    Ok(())
}

/// `n` new connections through the VIP, printed on one line.
fn rotation(bed: &Testbed, n: usize) -> Result<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        interrupt::check()?;
        names.push(bed.new_connection()?);
    }
    Ok(names.join(" "))
}

/// Stops nginx on [`VICTIM`], shows it leave the rotation and the reason, starts it again.
fn fail_and_recover(bed: &mut Testbed) -> Result<()> {
    let list = format!("xlb backend list {VIP}:{HTTP_PORT}");
    let show_list = |bed: &Testbed| -> Result<()> {
        println!("$ {list}");
        print!(
            "{}",
            bed.client()
                .ok(&["backend", "list", &format!("{VIP}:{HTTP_PORT}")])?
        );
        Ok(())
    };
    let addr = bed.backend_addr(VICTIM)?;
    println!("\n--- a backend fails and recovers");
    let pid = bed.nginx_pid(VICTIM).context("nginx not running")?;
    println!("$ kill {pid}   # nginx on {VICTIM} ({addr})");
    let stopped = Instant::now();
    bed.stop_backend(VICTIM)?;
    bed.wait_backend_state(VICTIM, "down", STATE_WAIT)?;
    println!(
        "xlb marked {VICTIM} down {:.2}s after the kill",
        stopped.elapsed().as_secs_f64()
    );
    let answers = rotation(bed, 9)?;
    if answers.contains(VICTIM) {
        bail!("{VICTIM} still answered while down: {answers}");
    }
    println!("9 new connections -> {answers}   ({VICTIM} skipped)");
    show_list(bed)?;
    interrupt::check()?;

    println!("$ nginx   # on {VICTIM} again, same configuration");
    let restarted = Instant::now();
    bed.start_backend(VICTIM)?;
    bed.wait_backend_state(VICTIM, "up", STATE_WAIT)?;
    println!(
        "xlb marked {VICTIM} up {:.2}s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    let answers = rotation(bed, 9)?;
    if !answers.contains(VICTIM) {
        bail!("{VICTIM} not back in rotation: {answers}");
    }
    println!("9 new connections -> {answers}   ({VICTIM} back in rotation)");
    show_list(bed)?;
    println!("\nthe agent's log of these changes:");
    let needle = addr.to_string();
    for line in bed
        .agent_log()
        .lines()
        .filter(|l| l.contains(&needle))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains(" down ") || l.contains(" up ")
        })
    {
        println!("  {line}");
    }
    Ok(())
}
