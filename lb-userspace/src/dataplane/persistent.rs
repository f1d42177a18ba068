//! XDP programs that must outlive the process that attached them (`xlb backend-host setup`, and the
//! pass program on veth peers). A bpf_link dies with its last fd, and a bpffs pin made inside
//! `ip netns exec` dies with that command's mount namespace, so these are attached the way
//! `ip link set dev X xdp` does it: by netlink (IFLA_XDP), which the interface itself then holds.

use crate::{
    dataplane::object::EBPF_OBJECT,
    dataplane::{AttachedMode, DataplaneError, XdpModeChoice, xdp_program, xdp_program_mut},
    util::interface_index,
};
use aya::{Ebpf, EbpfLoader, maps::HashMap};
use lb_common::{maps, programs};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
};

/// `XDP_FLAGS_*` from linux/if_link.h.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

fn netlink_err(what: String) -> impl FnOnce(io::Error) -> DataplaneError {
    move |source| DataplaneError::Io { what, source }
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

/// The decapsulator, loaded and told which outer destinations are ours, not attached (also what
/// the packet fixtures run).
pub fn load_decap(local_addrs: &[Ipv4Addr]) -> Result<Ebpf, DataplaneError> {
    let mut ebpf = load(programs::DECAP)?;
    let mut addrs: HashMap<_, u32, u32> = HashMap::try_from(
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
        // Network order, as the packet carries it.
        addrs
            .insert(u32::from_ne_bytes(addr.octets()), 1, 0)
            .map_err(|source| DataplaneError::Map {
                name: maps::DECAP_ADDRS,
                source,
            })?;
    }
    Ok(ebpf)
}

/// Send one RTM_SETLINK with an IFLA_XDP attribute and wait for the kernel's answer.
fn set_link_xdp(iface: &str, fd: i32, flags: u32) -> Result<(), DataplaneError> {
    let index = interface_index(iface)?;
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes.push(LinkAttribute::Xdp(vec![
        LinkXdp::Fd(fd),
        LinkXdp::Flags(flags),
    ]));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::SetLink(link)),
    );
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);

    let what = |w: &str| format!("netlink {w} for XDP on {iface}");
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(netlink_err(what("socket")))?;
    socket.bind_auto().map_err(netlink_err(what("bind")))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(netlink_err(what("connect")))?;
    socket.send(&buf, 0).map_err(netlink_err(what("send")))?;
    let (reply, _) = socket
        .recv_from_full()
        .map_err(netlink_err(what("receive")))?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply).map_err(|e| {
        DataplaneError::Io {
            what: what("reply"),
            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        }
    })?;
    match reply.payload {
        NetlinkPayload::Error(err) if err.code.is_some() => Err(DataplaneError::Io {
            what: format!("attaching XDP to {iface}"),
            source: err.to_io(),
        }),
        _ => Ok(()),
    }
}

/// Attach `program` (already loaded in `ebpf`) to `iface` by netlink, in the requested mode
/// (auto: driver, else generic).
fn attach(
    ebpf: &Ebpf,
    program: &'static str,
    iface: &str,
    mode: XdpModeChoice,
) -> Result<AttachedMode, DataplaneError> {
    let prog = xdp_program(ebpf, program)?;
    let fd = prog.fd().map_err(|source| DataplaneError::Program {
        name: program,
        source,
    })?;
    let raw = fd.as_fd().as_raw_fd();
    match mode {
        XdpModeChoice::Driver => {
            set_link_xdp(iface, raw, XDP_FLAGS_DRV_MODE).map(|()| AttachedMode::Driver)
        }
        XdpModeChoice::Generic => {
            set_link_xdp(iface, raw, XDP_FLAGS_SKB_MODE).map(|()| AttachedMode::Generic)
        }
        XdpModeChoice::Auto => match set_link_xdp(iface, raw, XDP_FLAGS_DRV_MODE) {
            Ok(()) => Ok(AttachedMode::Driver),
            Err(err) => {
                log::warn!("driver-mode XDP on {iface} failed ({err}); using generic mode");
                set_link_xdp(iface, raw, XDP_FLAGS_SKB_MODE).map(|()| AttachedMode::Generic)
            }
        },
    }
}

/// Attach the IPIP decapsulator to `iface`; it strips IPIP packets whose outer destination is one
/// of `local_addrs` and passes everything else. Replaces any XDP program already there.
pub fn attach_decap(
    iface: &str,
    local_addrs: &[Ipv4Addr],
    mode: XdpModeChoice,
) -> Result<AttachedMode, DataplaneError> {
    interface_index(iface)?;
    let ebpf = load_decap(local_addrs)?;
    attach(&ebpf, programs::DECAP, iface, mode)
}

/// Attach the trivial pass program to `iface` (veth peers receiving native-mode XDP_TX/redirect).
pub fn attach_pass(iface: &str, mode: XdpModeChoice) -> Result<AttachedMode, DataplaneError> {
    interface_index(iface)?;
    let ebpf = load(programs::PASS)?;
    attach(&ebpf, programs::PASS, iface, mode)
}

/// Remove whatever XDP program is attached to `iface` by netlink, in either mode. No program
/// attached is not an error.
pub fn detach(iface: &str) -> Result<(), DataplaneError> {
    set_link_xdp(iface, -1, XDP_FLAGS_DRV_MODE)?;
    set_link_xdp(iface, -1, XDP_FLAGS_SKB_MODE)
}
