//! xlb's network-namespace test bed: the DESIGN.md topology (cli — rtr/br0 — lb1, be1..be3),
//! real nginx backends, the `xlb` agent and CLI, and guards that remove every namespace and stop
//! every process they started (by pid), also when a test panics.
//!
//! Everything here needs root. Rules kept throughout: only 10.111.0.0/16, only inside namespaces
//! created here (named `xlbt<pid>x<n>-<role>`), nothing routed from the root namespace, and every
//! command and wait bounded in time.

pub mod backend;
pub mod bench_door;
pub mod bench_e2e;
pub mod bird;
pub mod capture;
pub mod client;
pub mod cmd;
pub mod cpu;
pub mod downloads;
pub mod fixture;
pub mod fuzz;
pub mod http;
pub mod interrupt;
pub mod livegen;
pub mod netns;
pub mod packet;
pub mod packet6;
pub mod pgload;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod profile;
pub mod prometheus;
pub mod stack;
pub mod stack_demo;
pub mod testbed;
pub mod topology;
pub mod xlb;
