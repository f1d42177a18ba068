//! The command line: what an operator types (`args`), what each subcommand does on the client
//! side (`commands`: one request over the agent's socket through `client`, or a change to this
//! host for `backend-host` and `xdp-pass`), and how answers are printed (`render`, `watch`).
//! `main` is the binary's whole life: `src/main.rs` only calls it.

pub(crate) mod args;
pub(crate) mod client;
pub(crate) mod commands;
pub(crate) mod docs;
pub(crate) mod render;
pub(crate) mod watch;

use crate::{
    agent::{self, flow_query::MAX_LIMIT, options::AgentConfig},
    backend_host::BackendHostError,
    cli::{
        args::{Cli, Command},
        client::ClientError,
    },
    dataplane::DataplaneError,
    model::{
        addr::ParseError,
        check::CheckError,
        net::{ListError, NetError},
        policy::PolicyError,
    },
    util::{NoSuchInterface, one_line, os_message},
};
use anyhow::anyhow;
use clap::Parser;
use std::{
    io::{self, Write},
    process::ExitCode,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    List(#[from] ListError),
    #[error("cannot read {}: {}", path.display(), os_message(source))]
    ReadFile {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    BackendHost(#[from] BackendHostError),
    #[error(transparent)]
    NoSuchInterface(#[from] NoSuchInterface),
    #[error(transparent)]
    Xdp(Box<DataplaneError>),
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
    #[error("--interval {0} is too short: at least 100ms")]
    WatchInterval(String),
    #[error("--limit {0:?} is not a number of flows from 1 to {MAX_LIMIT}")]
    Limit(String),
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
    #[error(transparent)]
    Pin(#[from] crate::dataplane::PinError),
    #[error("{0}")]
    Detach(String),
}

fn print(text: &str) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let mut s = serde_json::to_string_pretty(value).expect("reports serialise to JSON");
    s.push('\n');
    print(&s)
}

/// The `xlb` command: parse the command line, set up logging and the runtime, run the
/// subcommand. Every error ends here as one line, `xlb: error: <what>`, and exit code 1 (clap's
/// own usage errors keep its exit code 2).
pub fn main() -> ExitCode {
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

/// Run one subcommand: the agent until SIGINT/SIGTERM, or one client command.
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
        Command::Flows(args) => commands::flows(&socket, args)?,
        Command::Deny(cmd) => commands::deny(&socket, cmd)?,
        Command::Peers { json } => commands::peers(&socket, json)?,
        Command::Node(cmd) => commands::node(&socket, cmd)?,
        Command::BackendHost(cmd) => commands::backend_host(cmd).await?,
        Command::XdpPass(cmd) => commands::xdp_pass(cmd).await?,
        Command::Reload => commands::reload(&socket)?,
        Command::Detach(args) => commands::detach(&socket, &args).await?,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "xlb", &mut io::stdout());
        }
        Command::ManPages { dir } => docs::man_pages(&dir)?,
    }
    Ok(())
}
