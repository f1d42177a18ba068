//! xlb: an XDP layer-4 load balancer. This library holds the agent, the CLI and the data-path
//! driver; the binary calls `main`.
//!
//! Public for the integration tests and benchmarks in `tests/`: `dataplane` (they drive the XDP
//! programs directly), `model`, `sync` (they speak the sync protocol themselves) and the few
//! helpers of `util` and `netlink` that appear in those. The rest is the crate's own
//! (`pub(crate)`, which `unreachable_pub` enforces), so the compiler reports what nothing uses.

pub(crate) mod agent;
pub(crate) mod api;
pub(crate) mod backend_host;
pub(crate) mod cli;
pub mod dataplane;
pub mod model;
pub mod netlink;
pub mod sync;
pub mod util;

pub use cli::main;
