//! The data path in bpffs (issue 11): explicit removal leaves the host as it was, and bad input
//! around the pins — a second agent, no usable bpffs, a read-only one, a corrupt state file,
//! pins of an interface that moved to another namespace or that no longer exists — gets a
//! one-line error or a logged recovery, and never detaches a running data path.
//!
//! Each test has a namespace of its own with one veth (no backends, no traffic: what is checked
//! is the program on the interface, the pins and the sysctl).

use std::{
    io::ErrorKind,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};
use xlb_tests::{
    cmd::{Output, run_timeout},
    netns::{Netns, TempDir, require_root, unique_prefix},
    xlb::{Agent, agent_bpffs, expect_clean_exit, has_xdp, xlb_bin},
};

const IFACE: &str = "eth0";

/// A namespace with `eth0` (a veth with an address, up, IPv4 forwarding off) and `lo` up.
fn netns(prefix: &str, name: &str) -> Netns {
    let ns = Netns::create(&format!("{prefix}-{name}")).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns.ip(&[
        "link", "add", IFACE, "type", "veth", "peer", "name", "xlbpeer0",
    ])
    .unwrap();
    ns.ip(&["addr", "add", "10.111.9.1/24", "dev", IFACE])
        .unwrap();
    for i in [IFACE, "xlbpeer0"] {
        ns.ip(&["link", "set", i, "up"]).unwrap();
    }
    assert_eq!(forwarding(&ns), "0");
    ns
}

fn forwarding(ns: &Netns) -> String {
    ns.sh(&format!("cat /proc/sys/net/ipv4/conf/{IFACE}/forwarding"))
        .unwrap()
        .trim()
        .to_string()
}

/// `xlb args…` inside `ns`, logging off, so that stderr holds only the error line.
fn xlb(ns: &Netns, args: &[&str]) -> Output {
    let mut cmd = ns.command(xlb_bin());
    cmd.args(args)
        .env("RUST_LOG", "off")
        .env_remove("XLB_SOCKET");
    run_timeout(&mut cmd, Duration::from_secs(30)).unwrap()
}

/// `xlb agent` with `dir`'s socket and state and the given bpffs, expected to stop at once.
fn failing_agent(ns: &Netns, dir: &Path, bpffs: &Path, socket: &str) -> Output {
    let state = dir.join("state").to_string_lossy().into_owned();
    let sock = dir.join(socket).to_string_lossy().into_owned();
    xlb(
        ns,
        &[
            "agent",
            "--iface",
            IFACE,
            "--xdp-mode",
            "generic",
            "--socket",
            &sock,
            "--state-dir",
            &state,
            "--bpffs",
            &bpffs.to_string_lossy(),
        ],
    )
}

fn assert_one_line_error(out: &Output, mentions: &[&str]) {
    let err = out.stderr.trim();
    assert_eq!(out.status.code(), Some(1), "`{}`: {err}", out.command);
    assert_eq!(
        err.lines().count(),
        1,
        "`{}`: not one line: {err}",
        out.command
    );
    assert!(err.starts_with("xlb: error: "), "{err}");
    for m in mentions {
        assert!(
            err.contains(m),
            "`{}`: {err:?} does not mention {m:?}",
            out.command
        );
    }
}

/// What is left in a bpffs besides the kernel's own `*.debug` files.
fn pins_left(bpffs: &Path) -> Vec<String> {
    let mut left = Vec::new();
    let mut stack = vec![bpffs.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if d == bpffs && name.ends_with(".debug") {
                continue;
            }
            left.push(e.path().strip_prefix(bpffs).unwrap().display().to_string());
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    left
}

fn detach(ns: &Netns, bpffs: &Path, socket: &Path) -> Output {
    xlb(
        ns,
        &[
            "detach",
            "--iface",
            IFACE,
            "--bpffs",
            &bpffs.to_string_lossy(),
            "--socket",
            &socket.to_string_lossy(),
        ],
    )
}

#[test]
fn detach_leaves_no_program_no_pin_no_sysctl_change() {
    require_root();
    let prefix = unique_prefix();
    let ns = netns(&prefix, "lb");
    let dir = TempDir::new(&prefix).unwrap();
    let socket = dir.path().join("xlb.sock");

    // With no agent running: `xlb detach` takes the lock itself.
    let mut agent = Agent::start(&ns, IFACE, "generic", dir.path(), &[]).expect("agent");
    let bpffs = agent.bpffs.clone();
    assert_eq!(forwarding(&ns), "1", "the agent turns forwarding on");
    assert!(!pins_left(&bpffs).is_empty());
    agent.kill().unwrap();
    assert!(has_xdp(&ns, IFACE).unwrap(), "SIGKILL leaves the data path");
    let out = detach(&ns, &bpffs, &socket);
    assert!(out.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("detached the balancer from eth0"),
        "{}",
        out.stdout
    );
    assert!(
        !has_xdp(&ns, IFACE).unwrap(),
        "a program is left after xlb detach"
    );
    assert_eq!(
        pins_left(&bpffs),
        Vec::<String>::new(),
        "pins left after xlb detach"
    );
    assert_eq!(forwarding(&ns), "0", "IPv4 forwarding not restored");
    // Nothing to detach any more: one line saying so.
    assert_one_line_error(&detach(&ns, &bpffs, &socket), &["no xlb data path", "eth0"]);

    // With the agent running: it is asked over its socket, removes everything and exits 0.
    let mut agent = Agent::start(&ns, IFACE, "generic", dir.path(), &[]).expect("agent");
    let out = agent.detach().expect("xlb detach with the agent running");
    assert!(out.contains("the agent"), "{out}");
    assert!(!has_xdp(&ns, IFACE).unwrap());
    assert_eq!(pins_left(&bpffs), Vec::<String>::new());
    assert_eq!(forwarding(&ns), "0");

    // --detach-on-exit: SIGTERM removes it too.
    let mut agent =
        Agent::start(&ns, IFACE, "generic", dir.path(), &["--detach-on-exit"]).expect("agent");
    let status = agent.stop().unwrap();
    expect_clean_exit("xlb agent --detach-on-exit", status, &agent.log()).unwrap();
    assert!(!has_xdp(&ns, IFACE).unwrap());
    assert_eq!(pins_left(&bpffs), Vec::<String>::new());
    assert_eq!(forwarding(&ns), "0");
}

#[test]
fn a_second_agent_is_refused_with_the_holders_pid() {
    require_root();
    let prefix = unique_prefix();
    let ns = netns(&prefix, "lb");
    let dir = TempDir::new(&prefix).unwrap();
    let mut agent = Agent::start(&ns, IFACE, "generic", dir.path(), &[]).expect("agent");
    // Another socket, so that the socket check does not catch it first.
    let out = failing_agent(&ns, dir.path(), &agent.bpffs, "other.sock");
    assert_one_line_error(
        &out,
        &[
            &format!("another xlb agent (pid {})", agent.pid()),
            "manages eth0",
        ],
    );
    agent.ensure_running().unwrap();
    agent
        .client
        .ok(&["vip", "list"])
        .expect("the first agent still answers");
    assert!(has_xdp(&ns, IFACE).unwrap());
}

#[test]
fn no_usable_bpffs_is_refused_and_attaches_nothing() {
    require_root();
    let prefix = unique_prefix();
    let ns = netns(&prefix, "lb");
    let dir = TempDir::new(&prefix).unwrap();

    // Not a bpffs, and `ip netns exec` is a private mount namespace: mounting one there would
    // die with the command.
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let out = failing_agent(&ns, dir.path(), &plain, "a.sock");
    assert_one_line_error(
        &out,
        &["is not a bpffs", "private mount namespace", "--bpffs"],
    );
    assert!(!has_xdp(&ns, IFACE).unwrap());

    // A bpffs mounted read-only.
    let ro = dir.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let mount = Command::new("mount")
        .args(["-t", "bpf", "-o", "ro", "bpf"])
        .arg(&ro)
        .status()
        .unwrap();
    assert!(mount.success());
    let out = failing_agent(&ns, dir.path(), &ro, "b.sock");
    assert_one_line_error(&out, &["Read-only file system"]);
    assert!(!has_xdp(&ns, IFACE).unwrap());
}

#[test]
fn a_corrupt_state_file_stops_the_agent_not_the_data_path() {
    require_root();
    let prefix = unique_prefix();
    let ns = netns(&prefix, "lb");
    let dir = TempDir::new(&prefix).unwrap();
    let mut agent = Agent::start(&ns, IFACE, "generic", dir.path(), &[]).expect("agent");
    agent
        .client
        .ok(&["vip", "add", "10.111.100.1:80", "--check", "none"])
        .unwrap();
    agent.kill().unwrap();
    std::fs::write(dir.path().join("state/state.json"), "{ not json").unwrap();
    let out = failing_agent(&ns, dir.path(), &agent.bpffs, "xlb.sock");
    assert_one_line_error(&out, &["state file", "corrupt"]);
    assert!(
        has_xdp(&ns, IFACE).unwrap(),
        "the refusal detached the data path"
    );
    assert!(agent.bpffs.join("xlb").exists());
}

#[test]
fn pins_of_an_interface_that_moved_namespace_are_named_not_taken() {
    require_root();
    let prefix = unique_prefix();
    let a = netns(&prefix, "a");
    let b = Netns::create(&format!("{prefix}-b")).unwrap();
    let dir = TempDir::new(&prefix).unwrap();
    let mut agent = Agent::start(&a, IFACE, "generic", dir.path(), &[]).expect("agent");
    let bpffs = agent.bpffs.clone();
    agent.kill().unwrap();
    // The interface goes to namespace b with its program: its pins are under a's cookie.
    a.ip(&["link", "set", IFACE, "netns", b.name()]).unwrap();
    b.ip(&["addr", "add", "10.111.9.1/24", "dev", IFACE])
        .unwrap();
    b.ip(&["link", "set", IFACE, "up"]).unwrap();
    assert!(has_xdp(&b, IFACE).unwrap());
    let out = failing_agent(&b, dir.path(), &bpffs, "b.sock");
    assert_one_line_error(
        &out,
        &["eth0 already has an XDP program", "xlb detach --pin-dir"],
    );
    let dirs: Vec<PathBuf> = std::fs::read_dir(bpffs.join("xlb"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "the refused agent left a directory: {dirs:?}"
    );
    let pin_dir = dirs[0].clone();
    assert!(
        out.stderr.contains(&pin_dir.display().to_string()),
        "{}",
        out.stderr
    );
    assert!(
        has_xdp(&b, IFACE).unwrap(),
        "the refusal detached the data path"
    );
    // The named command removes it.
    let out = xlb(
        &b,
        &[
            "detach",
            "--pin-dir",
            &pin_dir.to_string_lossy(),
            "--bpffs",
            &bpffs.to_string_lossy(),
        ],
    );
    assert!(out.success(), "{}", out.stderr);
    assert!(!has_xdp(&b, IFACE).unwrap());
    assert!(!pin_dir.exists());
}

#[test]
fn a_data_path_whose_interface_is_gone_is_collected() {
    require_root();
    let prefix = unique_prefix();
    let ns = netns(&prefix, "lb");
    let dir = TempDir::new(&prefix).unwrap();
    let mut agent = Agent::start(&ns, IFACE, "generic", dir.path(), &[]).expect("agent");
    let bpffs = agent.bpffs.clone();
    agent.kill().unwrap();
    let old: Vec<PathBuf> = std::fs::read_dir(bpffs.join("xlb"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    // The device goes (its link turns defunct), a new one takes its name.
    ns.ip(&["link", "del", IFACE]).unwrap();
    ns.ip(&[
        "link", "add", IFACE, "type", "veth", "peer", "name", "xlbpeer1",
    ])
    .unwrap();
    ns.ip(&["addr", "add", "10.111.9.1/24", "dev", IFACE])
        .unwrap();
    ns.ip(&["link", "set", IFACE, "up"]).unwrap();
    let agent =
        Agent::start(&ns, IFACE, "generic", dir.path(), &[]).expect("agent on the new device");
    assert!(
        agent.log().contains("removed the stale data path"),
        "{}",
        agent.log()
    );
    for d in &old {
        assert!(!d.exists(), "{} was not collected", d.display());
    }
    assert!(has_xdp(&ns, IFACE).unwrap());
}

#[test]
fn systemd_hears_ready_after_the_state_is_applied() {
    require_root();
    let prefix = unique_prefix();
    let ns = netns(&prefix, "lb");
    let dir = TempDir::new(&prefix).unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let bpffs = agent_bpffs(dir.path()).unwrap();
    let mut cmd = ns.command(xlb_bin());
    cmd.args([
        "agent",
        "--iface",
        IFACE,
        "--xdp-mode",
        "generic",
        "--socket",
    ])
    .arg(dir.path().join("xlb.sock"))
    .arg("--state-dir")
    .arg(dir.path().join("state"))
    .arg("--bpffs")
    .arg(&bpffs)
    .env("NOTIFY_SOCKET", &notify)
    .env("RUST_LOG", "off");
    let mut process =
        xlb_tests::process::Process::spawn("xlb agent (notify)", &mut cmd, &dir.path().join("log"))
            .unwrap();
    let mut buf = [0u8; 512];
    let n = match listener.recv(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock => panic!("no notification: {}", process.log()),
        Err(e) => panic!("{e}"),
    };
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(
        has_xdp(&ns, IFACE).unwrap(),
        "READY before the data path was attached"
    );
    process.ensure_running().unwrap();
    let status = process.terminate(Duration::from_secs(5)).unwrap();
    assert!(status.success());
}
