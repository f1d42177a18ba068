//! The `xlb` binary: parse the command line, set up logging and signals, hand over to the library.
//! Every error ends here as one line, `xlb: error: <what>`, and exit code 1 (clap's own usage
//! errors keep its exit code 2).

use anyhow::anyhow;
use clap::Parser;
use std::process::ExitCode;
use tokio::signal::unix::{SignalKind, signal};
use xlb::{
    agent::{self, options::AgentConfig},
    cli::{
        args::{Cli, Command},
        commands,
    },
    util::one_line,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("cannot start the async runtime: {e}"))
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Only the top-level message: every error type here already says what and why, and
            // `{:#}` would repeat their sources. Some carry multi-line text from elsewhere (the
            // kernel verifier's log): folded, so an error is always exactly one line.
            eprintln!("xlb: error: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket;
    match cli.command {
        Command::Agent(args) => {
            let config = AgentConfig::resolve(args, socket)?;
            // Registered before the agent starts, so a signal during start-up is not lost (nor
            // kills the process with the default action) and still leads to a clean stop.
            let mut term = signal(SignalKind::terminate())
                .map_err(|e| anyhow!("cannot handle SIGTERM: {e}"))?;
            let mut int = signal(SignalKind::interrupt())
                .map_err(|e| anyhow!("cannot handle SIGINT: {e}"))?;
            let shutdown = async move {
                tokio::select! {
                    _ = term.recv() => log::info!("SIGTERM received"),
                    _ = int.recv() => log::info!("SIGINT received"),
                }
            };
            agent::run(config, shutdown).await?;
        }
        Command::Vip(cmd) => commands::vip(&socket, cmd)?,
        Command::Backend(cmd) => commands::backend(&socket, cmd)?,
        Command::Stats(args) => commands::stats(&socket, args)?,
        Command::Peers { json } => commands::peers(&socket, json)?,
        Command::BackendHost(cmd) => commands::backend_host(cmd).await?,
        Command::XdpPass(cmd) => commands::xdp_pass(cmd).await?,
    }
    Ok(())
}
