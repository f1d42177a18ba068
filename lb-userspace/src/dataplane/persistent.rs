//! XDP programs that must outlive the process that attached them (`xlb backend-host setup`, and the
//! pass program on veth peers). A bpf_link dies with its last fd, and a bpffs pin made inside
//! `ip netns exec` dies with that command's mount namespace, so these are attached the way
//! `ip link set dev X xdp` does it: by netlink (IFLA_XDP), which the interface itself then holds.

use crate::{
    dataplane::object::EBPF_OBJECT,
    dataplane::{
        AttachedMode, DataplaneError, XdpModeChoice,
        object::{xdp_program, xdp_program_mut},
    },
    netlink::{Netlink, NetlinkError, XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE},
    util::interface_index,
};
use aya::{Ebpf, EbpfLoader, maps::HashMap};
use lb_common::{Addr, maps, programs};
use std::{
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
};

fn netlink_err(iface: &str) -> impl FnOnce(NetlinkError) -> DataplaneError {
    let iface = iface.to_string();
    move |source| DataplaneError::Netlink { iface, source }
}

/// Load only `program` from the object. The balancer's big maps are shrunk to one entry: they
/// exist in the object, but nothing here uses them.
fn load(program: &'static str) -> Result<Ebpf, DataplaneError> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(maps::FLOWS, 1)
        .map_max_entries(maps::RINGS, 1)
        .map_max_entries(maps::BACKENDS, 1)
        .map_max_entries(maps::BACKEND_STATS, 1)
        .load(EBPF_OBJECT)?;
    xdp_program_mut(&mut ebpf, program)?
        .load()
        .map_err(|source| DataplaneError::Program {
            name: program,
            source,
        })?;
    Ok(ebpf)
}

/// The decapsulator, loaded and told which outer destinations (IPv4 and IPv6) are ours, not
/// attached (also what the packet fixtures run).
pub fn load_decap(local_addrs: &[IpAddr]) -> Result<Ebpf, DataplaneError> {
    let mut ebpf = load(programs::DECAP)?;
    let mut addrs: HashMap<_, Addr, u32> = HashMap::try_from(
        ebpf.map_mut(maps::DECAP_ADDRS)
            .ok_or(DataplaneError::MissingMap {
                name: maps::DECAP_ADDRS,
            })?,
    )
    .map_err(|source| DataplaneError::Map {
        name: maps::DECAP_ADDRS,
        source,
    })?;
    for addr in local_addrs {
        // 16 bytes in network order, IPv4 mapped, as the data path builds its keys.
        addrs
            .insert(Addr::from(*addr), 1, 0)
            .map_err(|source| DataplaneError::Map {
                name: maps::DECAP_ADDRS,
                source,
            })?;
    }
    Ok(ebpf)
}

/// Attach `program` (already loaded in `ebpf`) to `iface` by netlink, in the requested mode
/// (auto: driver, else generic).
async fn attach(
    ebpf: &Ebpf,
    program: &'static str,
    iface: &str,
    mode: XdpModeChoice,
) -> Result<AttachedMode, DataplaneError> {
    let index = interface_index(iface)?;
    let prog = xdp_program(ebpf, program)?;
    let fd = prog.fd().map_err(|source| DataplaneError::Program {
        name: program,
        source,
    })?;
    let raw = fd.as_fd().as_raw_fd();
    let nl = Netlink::connect().map_err(netlink_err(iface))?;
    let set = |flags: u32, attached: AttachedMode| {
        let nl = &nl;
        async move {
            nl.set_xdp(index, raw, flags)
                .await
                .map(|()| attached)
                .map_err(netlink_err(iface))
        }
    };
    match mode {
        XdpModeChoice::Driver => set(XDP_FLAGS_DRV_MODE, AttachedMode::Driver).await,
        XdpModeChoice::Generic => set(XDP_FLAGS_SKB_MODE, AttachedMode::Generic).await,
        XdpModeChoice::Auto => match set(XDP_FLAGS_DRV_MODE, AttachedMode::Driver).await {
            Ok(m) => Ok(m),
            Err(err) => {
                log::warn!("driver-mode XDP on {iface} failed ({err}); using generic mode");
                set(XDP_FLAGS_SKB_MODE, AttachedMode::Generic).await
            }
        },
    }
}

/// Attach the decapsulator to `iface`; it strips tunnelled packets (IPv4 in IPv4, IPv6 in IPv6,
/// IPv4 in IPv6) whose outer destination is one of `local_addrs` and passes everything else.
/// Replaces any XDP program already there.
pub async fn attach_decap(
    iface: &str,
    local_addrs: &[IpAddr],
    mode: XdpModeChoice,
) -> Result<AttachedMode, DataplaneError> {
    interface_index(iface)?;
    let ebpf = load_decap(local_addrs)?;
    attach(&ebpf, programs::DECAP, iface, mode).await
}

/// Attach the trivial pass program to `iface` (veth peers receiving native-mode XDP_TX/redirect).
pub async fn attach_pass(iface: &str, mode: XdpModeChoice) -> Result<AttachedMode, DataplaneError> {
    interface_index(iface)?;
    let ebpf = load(programs::PASS)?;
    attach(&ebpf, programs::PASS, iface, mode).await
}

/// Remove whatever XDP program is attached to `iface` by netlink, in either mode. No program
/// attached is not an error.
pub async fn detach(iface: &str) -> Result<(), DataplaneError> {
    let index = interface_index(iface)?;
    let nl = Netlink::connect().map_err(netlink_err(iface))?;
    for flags in [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE] {
        nl.set_xdp(index, -1, flags)
            .await
            .map_err(netlink_err(iface))?;
    }
    Ok(())
}
