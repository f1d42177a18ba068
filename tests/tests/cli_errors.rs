//! Bad input to the CLI and the agent (issue 2, tests item 3): each gets a one-line error naming
//! the problem and exit status 1, and the running state does not change.

use serde_json::Value;
use std::{process::Command, time::Duration};
use xlb_tests::{
    cmd::{Output, SHORT, run_timeout, wait_for},
    netns::{Netns, TempDir, require_root, unique_prefix},
    topology::{HOST_IFACE, Topology, TopologyOptions, VIP},
    xlb::{Agent, Xlb, expect_clean_exit, has_xdp, xlb_bin},
};

fn assert_error(out: &Output, mentions: &[&str]) {
    let err = out.stderr.trim();
    assert_eq!(
        out.code(),
        Some(1),
        "`{}` should fail with exit 1; stdout {:?}, stderr {err:?}",
        out.command,
        out.stdout
    );
    assert_eq!(
        err.lines().count(),
        1,
        "`{}`: expected a one-line error, got {err:?}",
        out.command
    );
    for m in mentions {
        assert!(
            err.contains(m),
            "`{}`: error {err:?} does not mention {m:?}",
            out.command
        );
    }
}

#[test]
fn agent_not_running_names_the_socket() {
    let dir = TempDir::new(&unique_prefix()).unwrap();
    let socket = dir.path().join("nobody-listens.sock");
    let socket_str = socket.to_string_lossy().to_string();
    let xlb = Xlb::new(&socket);
    for args in [
        &["vip", "list"][..],
        &["stats"],
        &["vip", "add", "10.111.100.1:80"],
    ] {
        assert_error(&xlb.run(args).unwrap(), &[&socket_str]);
    }
    // The socket also comes from the environment.
    let mut cmd = Command::new(xlb_bin());
    cmd.args(["vip", "list"]).env("XLB_SOCKET", &socket);
    assert_error(&run_timeout(&mut cmd, SHORT).unwrap(), &[&socket_str]);
}

#[test]
fn agent_refuses_an_interface_that_does_not_exist() {
    require_root();
    let prefix = unique_prefix();
    let ns = Netns::create(&format!("{prefix}-lb")).unwrap();
    let dir = TempDir::new(&prefix).unwrap();
    let socket = dir.path().join("xlb.sock");
    let mut cmd = ns.command(xlb_bin());
    cmd.args([
        "agent",
        "--iface",
        "xlbnosuch0",
        "--xdp-mode",
        "generic",
        "--socket",
    ])
    .arg(&socket)
    .arg("--state-dir")
    .arg(dir.path().join("state"));
    let out = run_timeout(&mut cmd, Duration::from_secs(20)).unwrap();
    assert_eq!(
        out.code(),
        Some(1),
        "agent with a missing interface: {out:?}"
    );
    let last = out.stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("xlbnosuch0"),
        "error does not name the interface: {:?}",
        out.stderr
    );
    // It did not start serving either.
    assert!(!Xlb::new(&socket).run(&["vip", "list"]).unwrap().success());
}

/// Current `vip list --json` and the desired part of `backend list --json` (address and weight
/// per backend: state, `since`, the last check and the counters are run-time facts that change on
/// their own), to compare before/after.
fn snapshot(xlb: &Xlb) -> (Value, Value) {
    let vips = xlb.vip_list().expect("vip list --json");
    let list = xlb
        .json(&["backend", "list", &format!("{VIP}:80")])
        .expect("backend list --json");
    let backends: Vec<Value> = list["backends"]
        .as_array()
        .expect("backends in backend list --json")
        .iter()
        .map(|b| serde_json::json!({"address": b["address"], "weight": b["weight"]}))
        .collect();
    (vips, Value::Array(backends))
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    require_root();
    let topo = Topology::build(TopologyOptions {
        backends: 0,
        lb2: false,
        ..Default::default()
    })
    .unwrap();
    let dir = TempDir::new(topo.prefix()).unwrap();
    let mut agent =
        Agent::start(topo.ns("lb1"), HOST_IFACE, "generic", dir.path(), &[]).expect("agent");
    let xlb = agent.client.clone();
    let vip = format!("{VIP}:80");
    xlb.ok(&[
        "vip",
        "add",
        &vip,
        "--forward",
        "ipip",
        "--icmp-echo",
        "off",
    ])
    .unwrap();
    xlb.ok(&["backend", "add", &vip, "10.111.1.11"]).unwrap();
    let baseline = snapshot(&xlb);
    assert_eq!(baseline.0["vips"][0]["icmp_echo"], false, "{}", baseline.0);
    // A file that exists but is not a CA certificate.
    let not_a_ca = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_a_ca, "not a certificate\n").unwrap();
    let not_a_ca = not_a_ca.to_string_lossy().into_owned();

    // Input errors the issue names: one line, exit 1, naming the offending input.
    let cases: &[(&[&str], &[&str])] = &[
        // Malformed addresses and values.
        (&["vip", "add", "10.111.100.300:80"], &["10.111.100.300"]),
        (&["vip", "add", "10.111.100.1"], &["10.111.100.1"]),
        (&["vip", "add", "10.111.100.2:70000"], &["70000"]),
        (&["backend", "add", &vip, "10.111.1.x"], &["10.111.1.x"]),
        (
            &["backend", "add", &vip, "10.111.1.12", "--weight", "100000"],
            &["100000"],
        ),
        // Unknown VIP (address, port, or protocol).
        (
            &["backend", "add", "10.111.100.9:80", "10.111.1.11"],
            &["10.111.100.9:80"],
        ),
        (
            &["backend", "add", &vip, "10.111.1.12", "--proto", "udp"],
            &["10.111.100.1:80"],
        ),
        (
            &["backend", "list", "10.111.100.9:80"],
            &["10.111.100.9:80"],
        ),
        (&["vip", "del", "10.111.100.1:81"], &["10.111.100.1:81"]),
        // Unknown and duplicate backend.
        (&["backend", "del", &vip, "10.111.1.99"], &["10.111.1.99"]),
        (&["backend", "add", &vip, "10.111.1.11"], &["10.111.1.11"]),
        (
            &["backend", "set", &vip, "10.111.1.99", "--weight", "2"],
            &["10.111.1.99"],
        ),
        (&["backend", "drain", &vip, "10.111.1.99"], &["10.111.1.99"]),
        (
            &["backend", "undrain", &vip, "10.111.1.99"],
            &["10.111.1.99"],
        ),
        // Health-check flags (issue 3): malformed, out of range, inconsistent, unknown VIP.
        (
            &["vip", "add", "10.111.100.2:80", "--check", "bogus"],
            &["bogus"],
        ),
        (
            &["vip", "set", &vip, "--check", "http:x"],
            &["path", "\"x\""],
        ),
        (&["vip", "set", &vip, "--interval", "2x"], &["2x"]),
        (&["vip", "set", &vip, "--interval", "5ms"], &["5ms"]),
        (
            &[
                "vip",
                "set",
                &vip,
                "--interval",
                "200ms",
                "--timeout",
                "300ms",
            ],
            &["300ms", "200ms"],
        ),
        (&["vip", "set", &vip, "--rise", "0"], &["rise"]),
        (&["vip", "set", &vip, "--fall", "0"], &["fall"]),
        (
            &[
                "vip",
                "set",
                &vip,
                "--check",
                "http:/",
                "--expect-status",
                "700",
            ],
            &["700"],
        ),
        (
            &["vip", "set", "10.111.100.9:80", "--interval", "1s"],
            &["10.111.100.9:80"],
        ),
        // Nothing to change (issue 17 adds --icmp-echo to what may be changed).
        (&["vip", "set", &vip], &["--icmp-echo", "check flag"]),
        (
            &["vip", "set", "10.111.100.9:80", "--icmp-echo", "on"],
            &["10.111.100.9:80"],
        ),
        // Stack checks (issue 14): unknown kind or role, a postgres check without a user, files
        // that cannot be read, settings of another kind.
        (
            &["vip", "add", "10.111.100.2:5432", "--check", "pgsql"],
            &["pgsql"],
        ),
        (
            &[
                "vip",
                "add",
                "10.111.100.2:5432",
                "--check",
                "postgres:master",
            ],
            &["master", "postgres:primary"],
        ),
        (
            &[
                "vip",
                "add",
                "10.111.100.2:5432",
                "--check",
                "postgres:primary",
            ],
            &["--check-user"],
        ),
        (
            &[
                "vip",
                "add",
                "10.111.100.2:5432",
                "--check",
                "postgres:primary",
                "--check-user",
                "xlbcheck",
                "--check-password-file",
                "/nonexistent/xlb/pg.password",
            ],
            &["password file", "/nonexistent/xlb/pg.password"],
        ),
        (
            &[
                "vip",
                "set",
                &vip,
                "--check",
                "https:/",
                "--tls-ca",
                "/nonexistent/xlb/ca.pem",
            ],
            &["CA file", "/nonexistent/xlb/ca.pem"],
        ),
        (
            &[
                "vip", "set", &vip, "--check", "https:/", "--tls-ca", &not_a_ca,
            ],
            &["CA file", &not_a_ca, "no PEM certificate"],
        ),
        (
            &[
                "backend",
                "add",
                &vip,
                "10.111.1.12",
                "--check",
                "https:/",
                "--tls-ca",
                "/nonexistent/xlb/ca.pem",
            ],
            &["10.111.1.12", "/nonexistent/xlb/ca.pem"],
        ),
        (
            &["vip", "set", &vip, "--tls-sni", "www.example.com"],
            &["--tls-sni", "https"],
        ),
        (
            &["vip", "set", &vip, "--check-user", "xlbcheck"],
            &["--check-user", "postgres"],
        ),
    ];
    for (args, mentions) in cases {
        let out = xlb.run(args).unwrap();
        assert_error(&out, mentions);
        assert_eq!(
            snapshot(&xlb),
            baseline,
            "state changed after `xlb {}`",
            args.join(" ")
        );
        agent.ensure_running().expect("agent survives bad input");
    }
    // Values outside a fixed set are usage errors, which clap reports in its own format and with
    // its own exit status (2): still a failure that names the value, and still no change.
    for (args, value) in [
        (
            &["vip", "add", "10.111.100.2:80", "--proto", "sctp"][..],
            "sctp",
        ),
        (
            &["vip", "add", "10.111.100.2:80", "--forward", "gre"],
            "gre",
        ),
        (&["vip", "set", &vip, "--icmp-echo", "maybe"], "maybe"),
    ] {
        let out = xlb.run(args).unwrap();
        assert!(
            matches!(out.code(), Some(1 | 2)),
            "`{}`: {out:?}",
            out.command
        );
        let first = out.stderr.lines().next().unwrap_or_default();
        assert!(
            first.contains(value),
            "`{}`: error {:?} does not name {value:?}",
            out.command,
            out.stderr
        );
        assert_eq!(
            snapshot(&xlb),
            baseline,
            "state changed after `xlb {}`",
            args.join(" ")
        );
    }

    // `xlb peers` needs an agent with peer sync (issue 4); this one runs without.
    assert_error(&xlb.run(&["peers"]).unwrap(), &["--sync-listen"]);
    assert_error(&xlb.run(&["peers", "--json"]).unwrap(), &["--sync-listen"]);
    // `xlb node` needs route announcement (issue 12).
    for args in [
        &["node", "status"][..],
        &["node", "drain"],
        &["node", "undrain"],
    ] {
        assert_error(&xlb.run(args).unwrap(), &["--announce-table"]);
    }
    assert_eq!(snapshot(&xlb), baseline, "state changed after `xlb node`");

    // Desired state survives a restart from the same state directory.
    let status = agent.stop().unwrap();
    expect_clean_exit("xlb agent", status, &agent.log()).unwrap();
    let mut agent = Agent::start(topo.ns("lb1"), HOST_IFACE, "generic", dir.path(), &[])
        .expect("restarted agent");
    assert_eq!(snapshot(&agent.client), baseline, "state after restart");
    let status = agent.stop().unwrap();
    expect_clean_exit("restarted xlb agent", status, &agent.log()).unwrap();
}

/// Peer sync settings (issue 4): inconsistent or unusable ones stop the agent at start with a
/// one-line error naming the problem; the TOML form (`[agent] sync_listen`, `peers`,
/// `sync_key_file`) works like the flags.
/// A namespace of its own for one agent: `lo` up and `HOST_IFACE`, a veth with an address (the
/// IPIP source the agent needs; any 10.111/16 address) and its peer, both up.
fn lb_netns(prefix: &str) -> Netns {
    let ns = Netns::create(&format!("{prefix}-lb")).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns.ip(&[
        "link", "add", HOST_IFACE, "type", "veth", "peer", "name", "xlbpeer0",
    ])
    .unwrap();
    ns.ip(&["addr", "add", "10.111.9.1/24", "dev", HOST_IFACE])
        .unwrap();
    for i in [HOST_IFACE, "xlbpeer0"] {
        ns.ip(&["link", "set", i, "up"]).unwrap();
    }
    ns
}

/// `xlb agent` with `extra` flags in `ns` must exit 1 with a last stderr line that names each of
/// `mentions`, leave no XDP program and no socket answering.
fn agent_refused(ns: &Netns, dir: &std::path::Path, extra: &[&str], mentions: &[&str]) {
    let socket = dir.join("xlb.sock");
    let mut cmd = ns.command(xlb_bin());
    cmd.args([
        "agent",
        "--iface",
        HOST_IFACE,
        "--xdp-mode",
        "generic",
        "--socket",
    ])
    .arg(&socket)
    .arg("--state-dir")
    .arg(dir.join("state"))
    .args(extra);
    let out = run_timeout(&mut cmd, Duration::from_secs(20)).unwrap();
    assert_eq!(out.code(), Some(1), "agent {extra:?}: {out:?}");
    let last = out.stderr.trim().lines().last().unwrap_or_default();
    for m in mentions {
        assert!(
            last.contains(m),
            "agent {extra:?}: error {:?} does not mention {m:?}",
            out.stderr
        );
    }
    assert!(
        !has_xdp(ns, HOST_IFACE).unwrap(),
        "agent {extra:?} attached XDP"
    );
    assert!(!Xlb::new(&socket).run(&["vip", "list"]).unwrap().success());
}

#[test]
fn agent_refuses_bad_sync_settings_and_reads_them_from_toml() {
    require_root();
    let prefix = unique_prefix();
    let ns = lb_netns(&prefix);
    let dir = TempDir::new(&prefix).unwrap();
    let good_key = dir.path().join("good.key");
    std::fs::write(&good_key, "  0123456789abcdef-shared-key\n").unwrap();
    let short_key = dir.path().join("short.key");
    std::fs::write(&short_key, "0123456789\n\n").unwrap();
    let missing_key = dir.path().join("missing.key");
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (good, short, missing) = (path(&good_key), path(&short_key), path(&missing_key));
    let listen = "127.0.0.1:7946";
    let cases: &[(&[&str], &[&str])] = &[
        (&["--sync-listen", listen], &["--sync-key-file"]),
        (&["--peer", "127.0.0.2:7946"], &["--sync-listen"]),
        (&["--sync-key-file", &good], &["--sync-listen"]),
        (
            &["--sync-listen", listen, "--sync-key-file", &short],
            &[&short, "16"],
        ),
        (
            &["--sync-listen", listen, "--sync-key-file", &missing],
            &[&missing],
        ),
        (
            &[
                "--sync-listen",
                listen,
                "--sync-key-file",
                &good,
                "--peer",
                listen,
            ],
            &[listen],
        ),
    ];
    for (extra, mentions) in cases {
        agent_refused(&ns, dir.path(), extra, mentions);
    }

    // The same settings from the configuration file.
    let config = dir.path().join("xlb.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nsync_listen = \"{listen}\"\npeers = [\"127.0.0.2:7946\"]\nsync_key_file = \"{good}\"\n"
        ),
    )
    .unwrap();
    let config = path(&config);
    let mut agent = Agent::start(
        &ns,
        HOST_IFACE,
        "generic",
        dir.path(),
        &["--config", &config],
    )
    .expect("agent with sync settings from TOML");
    let peers = agent.client.peers().expect("xlb peers --json");
    assert_eq!(peers["listen"], listen, "{peers}");
    let list = peers["peers"].as_array().expect("peers array");
    assert_eq!(list.len(), 1, "{peers}");
    assert_eq!(list[0]["address"], "127.0.0.2:7946", "{peers}");
    assert_eq!(list[0]["connected"], false, "nobody listens there: {peers}");
    let table = agent.client.ok(&["peers"]).expect("xlb peers");
    assert!(table.contains("127.0.0.2:7946"), "{table}");
    let status = agent.stop().unwrap();
    expect_clean_exit("xlb agent", status, &agent.log()).unwrap();
}

/// The health-check timeout defaults to min(1 s, interval) (issue 10): `--interval 200ms` alone
/// is accepted with a 200 ms timeout, as an operator used to HAProxy types it; an explicit
/// timeout longer than the interval is still refused.
#[test]
fn a_short_check_interval_alone_is_accepted() {
    require_root();
    let prefix = unique_prefix();
    let ns = lb_netns(&prefix);
    let dir = TempDir::new(&prefix).unwrap();
    let mut agent = Agent::start(&ns, HOST_IFACE, "generic", dir.path(), &[]).expect("agent");
    let xlb = agent.client.clone();
    let vip = format!("{VIP}:80");
    xlb.ok(&[
        "vip",
        "add",
        &vip,
        "--check",
        "http:/healthz",
        "--interval",
        "200ms",
    ])
    .expect("a check every 200 ms without --timeout");
    let check = |xlb: &Xlb| xlb.vip_list().expect("vip list --json")["vips"][0]["check"].clone();
    let c = check(&xlb);
    assert_eq!(
        (&c["interval"], &c["timeout"]),
        (&"200ms".into(), &"200ms".into()),
        "{c}"
    );
    let before = xlb.vip_list().unwrap();
    assert_error(
        &xlb.run(&[
            "vip",
            "set",
            &vip,
            "--interval",
            "100ms",
            "--timeout",
            "150ms",
        ])
        .unwrap(),
        &["150ms", "100ms"],
    );
    assert_eq!(
        xlb.vip_list().unwrap(),
        before,
        "the refused change changed nothing"
    );
    // A longer interval alone: the timeout goes back to its 1 s default.
    xlb.ok(&["vip", "set", &vip, "--interval", "5s"]).unwrap();
    let c = check(&xlb);
    assert_eq!(
        (&c["interval"], &c["timeout"]),
        (&"5s".into(), &"1s".into()),
        "{c}"
    );
    let status = agent.stop().unwrap();
    expect_clean_exit("xlb agent", status, &agent.log()).unwrap();
}

/// Route announcement (issue 12, test 6): settings that cannot work and tables the agent must not
/// write stop it at start with a one-line error, and nothing is touched (no XDP program, the
/// foreign route and the rule still there). A route of xlb's own left in the table goes at
/// start; without BIRD the agent runs and says so (`xlb node status`, its log); a drain survives
/// a restart; a clean stop leaves the route (the data path keeps serving); `[agent]
/// announce_table` works like the flag, and a new protocol withdraws the routes of the old one.
#[test]
fn route_announcement_refuses_bad_tables_and_keeps_its_state() {
    require_root();
    let prefix = unique_prefix();
    let ns = lb_netns(&prefix);
    let dir = TempDir::new(&prefix).unwrap();
    let table = || ns.ip(&["route", "show", "table", "100"]).unwrap();
    let refused = |extra: &[&str], mentions: &[&str]| {
        agent_refused(&ns, dir.path(), extra, mentions);
    };
    for t in ["0", "253", "254", "255", "4294967296"] {
        refused(
            &["--announce-table", t],
            &[&format!("--announce-table {t}"), "254 main"],
        );
    }
    refused(
        &["--announce-table", "100", "--announce-proto", "12"],
        &["protocol 12", "bird"],
    );
    refused(
        &["--announce-table", "100", "--announce-proto", "256"],
        &["--announce-proto 256"],
    );
    refused(
        &["--bird-socket", "/run/bird/bird.ctl"],
        &["--announce-table"],
    );

    // A table that holds a route of someone else's, or that a rule looks up.
    ns.ip(&[
        "route",
        "add",
        "blackhole",
        "10.111.100.9/32",
        "table",
        "100",
    ])
    .unwrap();
    refused(
        &["--announce-table", "100"],
        &["routing table 100", "10.111.100.9/32", "not xlb's"],
    );
    assert!(
        table().contains("10.111.100.9"),
        "the foreign route was touched: {}",
        table()
    );
    ns.ip(&["route", "flush", "table", "100"]).unwrap();
    ns.ip(&["rule", "add", "from", "10.111.0.0/16", "lookup", "100"])
        .unwrap();
    refused(&["--announce-table", "100"], &["ip rule", "table 100"]);
    let rules = ns.ip(&["rule", "show"]).unwrap();
    assert!(
        rules.contains("lookup 100"),
        "the rule was touched: {rules}"
    );
    ns.ip(&["rule", "del", "from", "10.111.0.0/16", "lookup", "100"])
        .unwrap();
    // A drain file that does not parse: starting undrained by mistake would announce a node an
    // operator took out.
    let node_file = dir.path().join("state").join("node.json");
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(&node_file, b"{\"version\": 1, \"drained\": maybe}").unwrap();
    refused(&["--announce-table", "100"], &["node.json", "corrupt"]);
    std::fs::remove_file(&node_file).unwrap();

    // A route of xlb's own, left by an agent that died, goes at start; nobody answers on the
    // BIRD socket: the agent runs anyway and says so.
    ns.ip(&[
        "route",
        "add",
        "blackhole",
        "10.111.100.7/32",
        "table",
        "100",
        "proto",
        "120",
    ])
    .unwrap();
    let bird = dir.path().join("no-bird.ctl");
    let bird = bird.to_string_lossy();
    let args = ["--announce-table", "100", "--bird-socket", &bird];
    let mut agent = Agent::start(&ns, HOST_IFACE, "generic", dir.path(), &args).expect("agent");
    let xlb = agent.client.clone();
    wait_for("the stale route to go", Duration::from_secs(5), || {
        Ok(table().is_empty().then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", table()));
    xlb.ok(&["vip", "add", "10.111.100.1:80", "--check", "none"])
        .unwrap();
    xlb.ok(&["backend", "add", "10.111.100.1:80", "10.111.9.5"])
        .unwrap();
    let announced = || table().contains("blackhole 10.111.100.1 proto 120");
    wait_for("the VIP's route", Duration::from_secs(5), || {
        Ok(announced().then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", table()));
    let text = xlb.ok(&["node", "status"]).unwrap();
    assert!(
        text.contains(&format!("none answers on {bird}")) && text.contains("announced"),
        "{text}"
    );
    let status = xlb.json(&["node", "status"]).unwrap();
    assert_eq!(status["routing_daemon"]["answers"], false, "{status}");
    assert_eq!(status["addresses"][0]["in_table"], true, "{status}");
    assert!(
        agent
            .log()
            .contains(&format!("no routing daemon answers on {bird}")),
        "{}",
        agent.log()
    );
    let stats = xlb.stats().unwrap();
    assert_eq!(
        stats["node"]["table"], 100,
        "xlb stats --json has the node: {stats}"
    );

    // Drained: withdrawn, and still drained after a restart (with nothing announced meanwhile).
    xlb.ok(&["node", "drain"]).unwrap();
    assert_error(&xlb.run(&["node", "drain"]).unwrap(), &["already drained"]);
    wait_for("the drain's withdrawal", Duration::from_secs(5), || {
        Ok((!announced()).then_some(()))
    })
    .unwrap();
    let status = agent.stop().unwrap();
    expect_clean_exit("xlb agent", status, &agent.log()).unwrap();
    let mut agent = Agent::start(&ns, HOST_IFACE, "generic", dir.path(), &args).expect("agent");
    let status = agent.client.json(&["node", "status"]).unwrap();
    assert_eq!(status["drained"], true, "{status}");
    assert_eq!(status["addresses"][0]["reason"], "node drained", "{status}");
    assert!(!announced(), "announced while drained: {}", table());
    agent.client.ok(&["node", "undrain"]).unwrap();
    wait_for("the undrain's announcement", Duration::from_secs(5), || {
        Ok(announced().then_some(()))
    })
    .unwrap();
    // A clean stop leaves the data path serving, and the route with it.
    let status = agent.stop().unwrap();
    expect_clean_exit("xlb agent", status, &agent.log()).unwrap();
    assert!(announced(), "the route went on SIGTERM: {}", table());

    // The same from the configuration file, with another protocol: the new agent takes the data
    // path over and withdraws the route the earlier one recorded with it (proto 120).
    let config = dir.path().join("xlb.toml");
    std::fs::write(
        &config,
        "[agent]\nannounce_table = 100\nannounce_proto = 121\n",
    )
    .unwrap();
    let config = config.to_string_lossy();
    let mut agent = Agent::start(
        &ns,
        HOST_IFACE,
        "generic",
        dir.path(),
        &["--config", &config],
    )
    .expect("agent with announce_table from TOML");
    let status = agent.client.json(&["node", "status"]).unwrap();
    assert_eq!(
        (status["table"].as_u64(), status["proto"].as_u64()),
        (Some(100), Some(121))
    );
    assert!(
        table().is_empty(),
        "the proto 120 route stayed: {}",
        table()
    );
    assert!(
        agent.log().contains(
            "withdrew 1 VIP route(s) an earlier agent left in routing table 100 (proto 120)"
        ),
        "{}",
        agent.log()
    );
    let status = agent.stop().unwrap();
    expect_clean_exit("xlb agent", status, &agent.log()).unwrap();

    // --detach-on-exit: SIGTERM removes the data path, and the routes first.
    let mut agent = Agent::start(
        &ns,
        HOST_IFACE,
        "generic",
        dir.path(),
        &[&args[..], &["--detach-on-exit"]].concat(),
    )
    .expect("agent with --detach-on-exit");
    agent
        .client
        .ok(&["vip", "add", "10.111.100.1:80", "--check", "none"])
        .unwrap();
    agent
        .client
        .ok(&["backend", "add", "10.111.100.1:80", "10.111.9.5"])
        .unwrap();
    wait_for("the VIP's route", Duration::from_secs(5), || {
        Ok(announced().then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", table()));
    let status = agent.stop().unwrap();
    expect_clean_exit("xlb agent --detach-on-exit", status, &agent.log()).unwrap();
    assert!(table().is_empty(), "routes left: {}", table());
    assert!(!has_xdp(&ns, HOST_IFACE).unwrap(), "the data path stayed");
    let log = agent.log();
    let withdrew = log.find("withdrew every VIP address").unwrap_or(usize::MAX);
    let detached = log.find("stopped; detached").unwrap_or(0);
    assert!(
        withdrew < detached,
        "not withdrawn before the detach:\n{log}"
    );
}
