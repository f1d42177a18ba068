//! xlb: an XDP layer-4 load balancer. This library holds the agent, the CLI and the data-path
//! driver; `main.rs` is a thin wrapper so every part is testable in-process.
pub mod agent;
pub mod api;
pub mod backend_host;
pub mod cli;
pub mod dataplane;
pub mod model;
pub mod netlink;
pub mod sync;
pub mod util;
