//! xlb: an XDP layer-4 load balancer. This library holds the agent, the CLI and the data-path
//! driver; `main.rs` is a thin wrapper so every part is testable in-process.
pub mod agent;
pub mod api;
pub mod backend_host;
pub mod check;
pub mod cli;
pub mod client;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod ebpf_object;
pub mod health;
pub mod metrics;
pub mod model;
pub mod parse;
pub mod ring;
pub mod state;
pub mod sync;
pub mod xdp_persist;
