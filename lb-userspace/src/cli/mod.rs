//! The command line: what an operator types (`args`), what each subcommand does on the client
//! side (`commands`: one request over the agent's socket through `client`, or a change to this
//! host for `backend-host` and `xdp-pass`), and how answers are printed (`render`, `watch`).

pub mod args;
pub mod client;
pub mod commands;
pub mod render;
pub mod watch;

use crate::{
    backend_host::BackendHostError,
    cli::client::ClientError,
    dataplane::DataplaneError,
    model::{addr::ParseError, check::CheckError},
    util::NoSuchInterface,
};
use std::io::{self, Write};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Check(#[from] CheckError),
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
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
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
