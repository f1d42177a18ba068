//! The compiled XDP object, built from `lb-ebpf` by `build.rs` and embedded in the binary, and
//! access to its programs: the balancer, and the benchmark programs loaded next to it.

use super::{AttachedMode, Dataplane, DataplaneError, map_err};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{Xdp, XdpMode},
};
use lb_common::{BenchGenHeader, FloorHop, FlowKey, FlowValue, maps, programs};

/// ELF bytes of lb-ebpf, aligned as aya's loader requires.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

pub(super) fn program_error(
    name: &'static str,
) -> impl Fn(aya::programs::ProgramError) -> DataplaneError {
    move |source| DataplaneError::Program { name, source }
}

/// The XDP program `name` of `ebpf`.
pub(crate) fn xdp_program<'a>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<&'a Xdp, DataplaneError> {
    let prog = ebpf
        .program(name)
        .ok_or(aya::programs::ProgramError::NotLoaded)
        .map_err(program_error(name))?;
    prog.try_into().map_err(program_error(name))
}

/// The XDP program `name` of `ebpf`, mutable (to load or attach it).
pub(crate) fn xdp_program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, DataplaneError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(aya::programs::ProgramError::NotLoaded)
        .map_err(program_error(name))?;
    prog.try_into().map_err(program_error(name))
}

impl Dataplane {
    pub(super) fn balancer_mut(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program_mut(&mut self.ebpf, programs::BALANCER)
    }

    /// The loaded balancer program (for `BPF_PROG_TEST_RUN`).
    pub fn balancer(&self) -> Result<&Xdp, DataplaneError> {
        xdp_program(&self.ebpf, programs::BALANCER)
    }

    /// Load one of the benchmark programs (`programs::FLOOR_TX`, `FLOOR_PARSE_TX`, `BENCH_SINK`)
    /// from the same object, for side-by-side `BPF_PROG_TEST_RUN` measurements.
    pub fn bench_program(&mut self, name: &'static str) -> Result<&Xdp, DataplaneError> {
        let prog = xdp_program_mut(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(program_error(name))?;
        }
        xdp_program(&self.ebpf, name)
    }

    /// One of the stateful floors' flow tables (`maps::FLOOR_FLOWS`, `FLOOR_FLOWS_PERCPU`), for
    /// a benchmark to fill and count, or `FLOWS` itself, for a fixture to rewrite an entry. Inserts from here go to the calling CPU's LRU list in the
    /// per-CPU variant, as the agent's peer-sync installs would.
    pub fn bench_flow_table(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, FlowKey, FlowValue>, DataplaneError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        HashMap::try_from(map).map_err(map_err(name))
    }

    /// The benchmark generator (`programs::BENCH_GEN`), loaded, with `header` as the headers it
    /// writes into every frame.
    pub fn bench_generator(&mut self, header: &BenchGenHeader) -> Result<&Xdp, DataplaneError> {
        self.set_bench_entry(maps::BENCH_GEN_HEADER, header)?;
        self.bench_program(programs::BENCH_GEN)
    }

    /// Tell the hop floor (`programs::FLOOR_HOP`) its VIP and its one backend; before it is
    /// attached, or it passes everything.
    pub fn set_floor_hop(&mut self, hop: &FloorHop) -> Result<(), DataplaneError> {
        self.set_bench_entry(maps::FLOOR_HOP, hop)
    }

    /// Write the one entry of the benchmark programs' array `name`.
    fn set_bench_entry<T: aya::Pod>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), DataplaneError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        let mut array: Array<&mut MapData, T> = Array::try_from(map).map_err(map_err(name))?;
        array.set(0, value, 0).map_err(map_err(name))
    }

    /// Load benchmark program `name` and attach it to `iface` (in the calling thread's network
    /// namespace) in driver mode; it stays attached until this `Dataplane` is dropped.
    pub fn attach_bench_program(
        &mut self,
        name: &'static str,
        iface: &str,
    ) -> Result<(), DataplaneError> {
        self.bench_program(name)?;
        let prog = xdp_program_mut(&mut self.ebpf, name)?;
        prog.attach(iface, XdpMode::Driver)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_string(),
                mode: AttachedMode::Driver,
                source,
            })?;
        Ok(())
    }
}
