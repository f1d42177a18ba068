//! The client side of each subcommand: turn the arguments into a request, send it, print the
//! answer (a table, or `--json`). `backend-host` and `xdp-pass` act on this host directly.

use super::{
    CliError,
    args::{
        BackendCommand, BackendHostCommand, DenyCommand, DetachArgs, FlowsArgs, FlowsCommand,
        NodeCommand, OnOff, StatsArgs, VipCommand, XdpPassCommand,
    },
    client, print, print_json,
    render::{backend_table, count_text, flow_table, flush_text, node_text, stats_text, vip_table},
    watch::watch_stats,
};
use crate::{
    agent::{
        announce::{WITHDRAW_GRACE, routes::RouteTable, withdraw_recorded},
        flow_query::MAX_LIMIT,
    },
    api::{Request, Response, StatsReport, VipList},
    backend_host::{self, RECORD_DIR, SetupOptions},
    dataplane::{
        PinDir, PinError, announced_routes, persistent,
        pins::{self, dir_name, netns_cookie},
        remove_data_path,
    },
    model::{
        addr::parse_ip,
        check::parse_duration,
        net::{IpNet, parse_list},
    },
    util::interface_index,
};
use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

/// Shortest `--watch` interval: below it the rates are mostly noise and the agent would spend
/// its time answering.
pub(super) const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(100);

fn unexpected(resp: Response) -> CliError {
    CliError::Unexpected(format!("{resp:?}"))
}

/// Send a mutating request and print the agent's confirmation.
fn change(socket: &Path, req: &Request) -> Result<(), CliError> {
    match client::call(socket, req)? {
        Response::Done { message } => print(&format!("{message}\n")),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn vip(socket: &Path, cmd: VipCommand) -> Result<(), CliError> {
    let req = match cmd {
        VipCommand::Add {
            vip,
            forward,
            check,
            icmp_echo,
            policy,
        } => Request::VipAdd {
            vip: vip.key()?,
            forward,
            check: check.to_patch()?,
            icmp_echo: icmp_echo == OnOff::On,
            policy: policy.to_patch()?,
        },
        VipCommand::Set {
            vip,
            check,
            icmp_echo,
            policy,
        } => Request::VipSet {
            vip: vip.key()?,
            check: check.to_patch()?,
            icmp_echo: icmp_echo.map(|e| e == OnOff::On),
            policy: policy.to_patch()?,
        },
        VipCommand::Del { vip } => Request::VipDel { vip: vip.key()? },
        VipCommand::Debug { vip, state } => Request::VipDebug {
            vip: vip.key()?,
            on: state == OnOff::On,
        },
        VipCommand::List { json } => {
            return match client::call(socket, &Request::VipList)? {
                Response::VipList { vips } if json => print_json(&VipList { vips }),
                Response::VipList { vips } => print(&vip_table(&vips)),
                other => Err(unexpected(other)),
            };
        }
    };
    change(socket, &req)
}

pub(crate) fn backend(socket: &Path, cmd: BackendCommand) -> Result<(), CliError> {
    let req = match cmd {
        BackendCommand::Add {
            backend,
            weight,
            backup,
            check,
        } => {
            let (vip, backend) = backend.keys()?;
            Request::BackendAdd {
                vip,
                backend,
                weight,
                backup,
                check: check.to_patch()?,
            }
        }
        BackendCommand::Set { backend, weight } => {
            let (vip, backend) = backend.keys()?;
            Request::BackendSet {
                vip,
                backend,
                weight,
            }
        }
        BackendCommand::Drain { backend } => {
            let (vip, backend) = backend.keys()?;
            Request::BackendDrain { vip, backend }
        }
        BackendCommand::Undrain { backend } => {
            let (vip, backend) = backend.keys()?;
            Request::BackendUndrain { vip, backend }
        }
        BackendCommand::Del { backend } => {
            let (vip, backend) = backend.keys()?;
            Request::BackendDel { vip, backend }
        }
        BackendCommand::List { vip, json } => {
            let vip = vip.key()?;
            return match client::call(socket, &Request::BackendList { vip })? {
                Response::BackendList { vip } if json => print_json(&vip),
                Response::BackendList { vip } => print(&backend_table(&vip, "", SystemTime::now())),
                other => Err(unexpected(other)),
            };
        }
    };
    change(socket, &req)
}

pub(crate) fn flows(socket: &Path, args: FlowsArgs) -> Result<(), CliError> {
    if let Some(FlowsCommand::Flush { filter, all, json }) = args.command {
        let req = Request::FlowFlush {
            filter: filter.to_filter()?,
            all,
        };
        return match client::call(socket, &req)? {
            Response::FlowFlush { flush } if json => print_json(&flush),
            Response::FlowFlush { flush } => print(&flush_text(&flush)),
            other => Err(unexpected(other)),
        };
    }
    let filter = args.filter.to_filter()?;
    if args.count {
        let req = Request::FlowCount {
            filter,
            by: args.by,
        };
        return match client::call(socket, &req)? {
            Response::FlowCount { count } if args.json => print_json(&count),
            Response::FlowCount { count } => print(&count_text(&count)),
            other => Err(unexpected(other)),
        };
    }
    let limit = match args.limit.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
        _ => return Err(CliError::Limit(args.limit)),
    };
    match client::call(socket, &Request::FlowList { filter, limit })? {
        Response::FlowList { flows } if args.json => print_json(&flows),
        Response::FlowList { flows } => print(&flow_table(&flows)),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn deny(socket: &Path, cmd: DenyCommand) -> Result<(), CliError> {
    let parse = |prefixes: &[String]| -> Result<Vec<IpNet>, CliError> {
        prefixes
            .iter()
            .map(|p| p.trim().parse().map_err(CliError::from))
            .collect()
    };
    let req = match cmd {
        DenyCommand::Add { prefixes } => Request::DenyAdd {
            prefixes: parse(&prefixes)?,
        },
        DenyCommand::Del { prefixes } => Request::DenyDel {
            prefixes: parse(&prefixes)?,
        },
        DenyCommand::Load { file } => {
            let name = file.display().to_string();
            let text = std::fs::read_to_string(&file).map_err(|source| CliError::ReadFile {
                path: file.clone(),
                source,
            })?;
            Request::DenyLoad {
                prefixes: parse_list(&text, &name)?,
                source: name,
            }
        }
        DenyCommand::List { json } => {
            return match client::call(socket, &Request::DenyList)? {
                Response::DenyList { deny } if json => print_json(&deny),
                Response::DenyList { deny } => print(
                    &deny
                        .prefixes
                        .iter()
                        .map(|p| format!("{p}\n"))
                        .collect::<String>(),
                ),
                other => Err(unexpected(other)),
            };
        }
    };
    change(socket, &req)
}

pub(crate) fn peers(socket: &Path, json: bool) -> Result<(), CliError> {
    match client::call(socket, &Request::Peers)? {
        Response::Peers { peers } if json => print_json(&peers),
        Response::Peers { peers } => print(&crate::sync::render_table(&peers)),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn node(socket: &Path, cmd: NodeCommand) -> Result<(), CliError> {
    match cmd {
        NodeCommand::Drain => change(socket, &Request::NodeDrain),
        NodeCommand::Undrain => change(socket, &Request::NodeUndrain),
        NodeCommand::Status { json } => match client::call(socket, &Request::NodeStatus)? {
            Response::Node { node } if json => print_json(&node),
            Response::Node { node } => print(&node_text(&node, SystemTime::now())),
            other => Err(unexpected(other)),
        },
    }
}

pub(super) fn fetch_stats(socket: &Path) -> Result<StatsReport, CliError> {
    match client::call(socket, &Request::Stats)? {
        Response::Stats { stats } => Ok(stats),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn stats(socket: &Path, args: StatsArgs) -> Result<(), CliError> {
    if !args.watch {
        let stats = fetch_stats(socket)?;
        return if args.json {
            print_json(&stats)
        } else {
            print(&stats_text(&stats))
        };
    }
    let interval = parse_duration("--interval", &args.interval)?;
    if interval < MIN_WATCH_INTERVAL {
        return Err(CliError::WatchInterval(args.interval));
    }
    let result = watch_stats(socket, interval, args.json);
    // `xlb stats --watch | head` closing the pipe is the reader being done, not an error.
    match result {
        Err(CliError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

pub(crate) async fn backend_host(cmd: BackendHostCommand) -> Result<(), CliError> {
    match cmd {
        BackendHostCommand::Setup {
            vips,
            ifaces,
            xdp_mode,
        } => {
            let vips = vips
                .iter()
                .map(|v| parse_ip(v))
                .collect::<Result<Vec<_>, _>>()?;
            let record = backend_host::setup(&SetupOptions {
                vips,
                ifaces,
                mode: xdp_mode,
                record_dir: PathBuf::from(RECORD_DIR),
            })
            .await?;
            let ifaces: Vec<String> = record
                .xdp
                .iter()
                .map(|x| format!("{} ({})", x.iface, x.mode))
                .collect();
            print(&format!(
                "backend host set up: {} VIP address(es) added to lo, {} sysctl(s) changed, decapsulator on {}\n",
                record.lo_addrs.len(),
                record.sysctls.len(),
                ifaces.join(", ")
            ))
        }
        BackendHostCommand::Teardown => {
            let record = backend_host::teardown(Path::new(RECORD_DIR)).await?;
            print(&format!(
                "backend host torn down: {} VIP address(es) removed from lo, {} sysctl(s) restored, decapsulator detached from {} interface(s)\n",
                record.lo_addrs.len(),
                record.sysctls.len(),
                record.xdp.len()
            ))
        }
    }
}

pub(crate) async fn xdp_pass(cmd: XdpPassCommand) -> Result<(), CliError> {
    let iface = match &cmd {
        XdpPassCommand::Attach { iface, .. } | XdpPassCommand::Detach { iface } => iface.clone(),
    };
    interface_index(&iface)?;
    let xdp_err = |e| CliError::Xdp(Box::new(e));
    match cmd {
        XdpPassCommand::Attach { xdp_mode, .. } => {
            let mode = persistent::attach_pass(&iface, xdp_mode)
                .await
                .map_err(xdp_err)?;
            print(&format!(
                "pass program attached to {iface} in {mode} mode\n"
            ))
        }
        XdpPassCommand::Detach { .. } => {
            persistent::detach(&iface).await.map_err(xdp_err)?;
            print(&format!("XDP program detached from {iface}\n"))
        }
    }
}

/// `xlb reload`: the agent re-reads its --config and says what changed.
pub(crate) fn reload(socket: &Path) -> Result<(), CliError> {
    change(socket, &Request::Reload)
}

/// How long `xlb detach` waits for a running agent to remove the data path and exit.
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// `xlb detach`: remove the chosen data paths. Each is removed here when no agent holds it, or by
/// the agent that holds it (asked over `socket`, which then exits).
pub(crate) async fn detach(socket: &Path, args: &DetachArgs) -> Result<(), CliError> {
    let root = match pins::existing_root(&args.bpffs) {
        // Nothing can be pinned where there is no bpffs: for --all (package removal) that is
        // "nothing to do", not a failure.
        Err(PinError::NotBpffs(path)) if args.all => {
            return print(&format!(
                "no xlb data path ({} is not a bpffs)\n",
                path.display()
            ));
        }
        other => other?,
    };
    let targets: Vec<(PathBuf, String)> = if let Some(dir) = &args.pin_dir {
        vec![(dir.clone(), dir.display().to_string())]
    } else if let Some(iface) = &args.iface {
        let dir = root.join(dir_name(netns_cookie()?, interface_index(iface)?));
        if !dir.exists() {
            return Err(CliError::Detach(format!(
                "no xlb data path is pinned for {iface} ({} does not exist)",
                dir.display()
            )));
        }
        vec![(dir, iface.clone())]
    } else {
        pins::dirs_of_this_namespace(&root)?
            .into_iter()
            .map(|(dir, ifindex)| (dir, format!("interface #{ifindex}")))
            .collect()
    };
    if targets.is_empty() {
        return print("no xlb data path in this network namespace\n");
    }
    let mut failed = Vec::new();
    for (dir, name) in targets {
        match detach_one(socket, &dir, &name).await {
            Ok(message) => print(&format!("{message}\n"))?,
            Err(e) => failed.push(e.to_string()),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Detach(failed.join("; ")))
    }
}

async fn detach_one(socket: &Path, dir: &Path, name: &str) -> Result<String, CliError> {
    if !dir.exists() {
        return Err(CliError::Detach(format!(
            "{} does not exist",
            dir.display()
        )));
    }
    match PinDir::lock_path(dir, name) {
        Ok(lock) => {
            // No agent: the routes its last agent announced go first, while the data path
            // still serves what the router sends until it hears of the withdrawal.
            let withdrew = withdraw_recorded_routes(dir).await?;
            let removed = remove_data_path(&lock).map_err(|e| CliError::Xdp(Box::new(e)))?;
            Ok(format!("{withdrew}{removed}"))
        }
        Err(PinError::Busy { holder, .. }) => {
            let dir_name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let holder = holder.map(|p| format!(" (pid {p})")).unwrap_or_default();
            let accepted = client::call(socket, &Request::Detach { dir: dir_name }).map_err(|e| {
                CliError::Detach(format!(
                    "the data path at {} is held by a running agent{holder}, which did not take the request on {}: {e} (pass that agent's --socket)",
                    dir.display(),
                    socket.display()
                ))
            })?;
            // The agent removes the data path after its tasks ended, then exits and its lock
            // goes with it.
            let deadline = std::time::Instant::now() + DETACH_WAIT;
            while dir.exists() {
                if std::time::Instant::now() > deadline {
                    return Err(CliError::Detach(format!(
                        "the agent{holder} accepted the request but {} is still there after {DETACH_WAIT:?}; see its log",
                        dir.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // The agent says whether it withdrew routes first.
            let withdrew = match accepted {
                Response::Done { message } if message.contains("withdr") => {
                    "withdrew its VIP routes, then "
                }
                _ => "",
            };
            Ok(format!(
                "the agent{holder} {withdrew}detached the balancer from {name} and removed {}",
                dir.display()
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// The routes recorded with the data path in `dir` (its agent ran with `--announce-table`),
/// withdrawn from this network namespace's routing table; what to say about it ("" if there
/// were none).
async fn withdraw_recorded_routes(dir: &Path) -> Result<String, CliError> {
    let Some((table, proto)) = announced_routes(dir) else {
        return Ok(String::new());
    };
    let ours = dir
        .file_name()
        .and_then(|n| pins::parse_dir_name(&n.to_string_lossy()))
        .is_some_and(|(cookie, _)| netns_cookie().ok() == Some(cookie));
    if !ours {
        return Err(CliError::Detach(format!(
            "the data path at {} announced VIP routes in routing table {table} (proto {proto}) of \
             another network namespace: run xlb detach there, or remove them there first \
             (`ip route flush table {table} proto {proto}`) and remove {} by hand",
            dir.display(),
            dir.display()
        )));
    }
    let n = withdraw_recorded(RouteTable { table, proto })
        .await
        .map_err(|e| CliError::Detach(format!("withdrawing the VIP routes first: {e}")))?;
    if n == 0 {
        return Ok(String::new());
    }
    tokio::time::sleep(WITHDRAW_GRACE).await;
    Ok(format!(
        "withdrew {n} VIP route(s) from routing table {table}, then "
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cli::args::{BackendRef, CheckArgs, VipRef},
        model::{Forward, Proto},
    };

    fn vip_ref(vip: &str) -> VipRef {
        VipRef {
            vip: vip.into(),
            proto: Proto::Tcp,
        }
    }

    #[test]
    fn malformed_addresses_fail_before_any_connection() {
        // The socket does not exist: a parse error must win over "cannot reach".
        let sock = Path::new("/nonexistent/xlb.sock");
        for vip in ["10.111.300.1:80", "foo", "10.111.100.1"] {
            let e = super::vip(
                sock,
                VipCommand::Add {
                    vip: vip_ref(vip),
                    forward: Forward::Ipip,
                    check: CheckArgs::default(),
                    icmp_echo: OnOff::On,
                    policy: Box::default(),
                },
            )
            .unwrap_err();
            assert!(matches!(e, CliError::Parse(_)), "{vip}: {e}");
        }
        let e = super::backend(
            sock,
            BackendCommand::Add {
                backend: BackendRef {
                    vip: vip_ref("10.111.100.1:80"),
                    backend: "10.111.1.300".into(),
                },
                weight: 1,
                backup: false,
                check: Box::default(),
            },
        )
        .unwrap_err();
        assert!(matches!(e, CliError::Parse(_)), "{e}");
        // Bad check flags too: one line, before any connection.
        let bad = |f: fn(&mut CheckArgs)| {
            let mut check = CheckArgs::default();
            f(&mut check);
            super::vip(
                sock,
                VipCommand::Set {
                    vip: vip_ref("10.111.100.1:80"),
                    check,
                    icmp_echo: None,
                    policy: Box::default(),
                },
            )
            .unwrap_err()
        };
        for e in [
            bad(|c| c.interval = Some("fast".into())),
            bad(|c| c.rise = Some("x".into())),
            bad(|c| c.expect_status = Some("200-100".into())),
            bad(|c| c.check = Some("ftp".into())),
        ] {
            assert!(matches!(e, CliError::Check(_)), "{e}");
            assert!(!e.to_string().contains('\n'));
        }
        let e = super::vip(
            sock,
            VipCommand::Debug {
                vip: vip_ref("10.111.100.1"),
                state: OnOff::Off,
            },
        )
        .unwrap_err();
        assert!(matches!(e, CliError::Parse(_)), "{e}");
    }

    #[test]
    fn bad_flow_arguments_fail_before_any_connection() {
        let sock = Path::new("/nonexistent/xlb.sock");
        let args = |limit: &str, client: Option<&str>| FlowsArgs {
            command: None,
            filter: crate::cli::args::FilterArgs {
                client: client.map(String::from),
                ..Default::default()
            },
            limit: limit.into(),
            count: false,
            by: None,
            json: false,
        };
        for bad in ["0", "10001", "many", "-1"] {
            let e = super::flows(sock, args(bad, None)).unwrap_err();
            assert!(matches!(e, CliError::Limit(_)), "{bad}: {e}");
            assert!(e.to_string().contains("from 1 to 10000"), "{e}");
        }
        let e = super::flows(sock, args("50", Some("10.0.0.0/40"))).unwrap_err();
        assert!(matches!(e, CliError::Parse(_)), "{e}");
        // A good command line gets as far as the (missing) agent.
        let e = super::flows(sock, args("50", Some("10.0.0.0/8"))).unwrap_err();
        assert!(matches!(e, CliError::Client(_)), "{e}");
    }

    #[test]
    fn bad_deny_input_fails_before_any_connection() {
        let sock = Path::new("/nonexistent/xlb.sock");
        let dir = tempfile::tempdir().unwrap();
        let feed = dir.path().join("feed.txt");
        std::fs::write(&feed, "# feed\n10.0.0.0/8\n10.0.0.0/33\n").unwrap();
        for (cmd, want) in [
            (
                DenyCommand::Add {
                    prefixes: vec!["10.0.0.0/8".into(), "10.1.2.3/16".into()],
                },
                "has host bits set (the network is 10.1.0.0/16)",
            ),
            (
                DenyCommand::Add {
                    prefixes: vec!["2001:db8::1/32".into()],
                },
                "bits set after the first 32 (did you mean 2001:db8::/32?)",
            ),
            (
                DenyCommand::Del {
                    prefixes: vec!["nonsense".into()],
                },
                "malformed prefix \"nonsense\"",
            ),
            (
                DenyCommand::Load { file: feed.clone() },
                "feed.txt line 3: malformed prefix \"10.0.0.0/33\"",
            ),
            (
                DenyCommand::Load {
                    file: dir.path().join("missing.txt"),
                },
                "missing.txt",
            ),
        ] {
            let e = super::deny(sock, cmd).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(!e.contains('\n'));
            assert!(!e.contains("cannot reach"), "{e}");
        }
    }

    #[test]
    fn bad_watch_intervals_fail_before_any_connection() {
        let sock = Path::new("/nonexistent/xlb.sock");
        for bad in ["fast", "10ms"] {
            let e = super::stats(
                sock,
                StatsArgs {
                    json: false,
                    watch: true,
                    interval: bad.into(),
                },
            )
            .unwrap_err();
            assert!(
                matches!(e, CliError::Check(_) | CliError::WatchInterval(_)),
                "{e}"
            );
        }
    }
}
