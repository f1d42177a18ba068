//! Monitoring end to end (issue 5, tests 1–3): lb1's agent serves `/metrics`; known traffic
//! through the VIP (exactly 30 new connections, a 1 MiB download and a 1 MiB upload) moves the
//! scraped counters by exactly the expected amounts; the real scrape passes `promtool check
//! metrics`; `/metrics` and `xlb stats --json` agree; `xlb stats --watch --json` streams rates;
//! `xlb vip debug` reaches the agent.
//!
//! The test bed starts its agent without `--metrics-listen`, so the test stops that agent
//! (cleanly) and starts one on lb1 with the flag, on the same socket and state directory: it
//! restores the configured VIPs from the saved state.

use serde_json::Value;
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use xlb_tests::{
    backend::{BIG, HTTP_PORT},
    http,
    netns::require_root,
    testbed::{Testbed, TestbedOptions},
    topology::{HOST_IFACE, LB1_ADDR, VIP, backend_addr},
    xlb::{Agent, Xlb, backend_counters, find_vip, reason},
};

const NEW_CONNECTIONS: u64 = 30;
const METRICS_PORT: u16 = 9477;
/// The agent counts flow-table entries at most once per second.
const FLOW_COUNT_AGE: Duration = Duration::from_millis(1100);

/// `series → value` of one scrape, series exactly as rendered (`name{labels}`).
type Scrape = BTreeMap<String, f64>;

fn scrape_text(bed: &Testbed) -> String {
    let target = SocketAddr::from((LB1_ADDR, METRICS_PORT));
    let r = bed
        .ns("lb1")
        .enter(move || http::get(target, "/metrics", Duration::from_secs(5)))
        .expect("entering lb1")
        .expect("GET /metrics inside lb1");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
    let ct = r.header("content-type").unwrap_or_default().to_string();
    assert!(
        ct.starts_with("text/plain; version=0.0.4"),
        "content type {ct:?}"
    );
    // The raw body: `text()` trims, and the format needs its final newline.
    String::from_utf8(r.body).expect("the scrape is UTF-8")
}

fn parse(text: &str) -> Scrape {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("line {l:?}"));
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn scrape(bed: &Testbed) -> Scrape {
    parse(&scrape_text(bed))
}

fn vip_series(name: &str) -> String {
    format!(r#"{name}{{proto="tcp",vip="{VIP}:{HTTP_PORT}"}}"#)
}

fn backend_series(name: &str, b: impl Into<std::net::IpAddr>) -> String {
    let b = b.into();
    format!(r#"{name}{{backend="{b}",proto="tcp",vip="{VIP}:{HTTP_PORT}"}}"#)
}

fn get(s: &Scrape, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no {series} in the scrape: {s:#?}"))
}

fn delta(before: &Scrape, after: &Scrape, series: &str) -> u64 {
    (get(after, series) - get(before, series)) as u64
}

fn backends() -> Vec<Ipv4Addr> {
    (1..=3).map(backend_addr).collect()
}

fn promtool_check(text: &str) {
    let promtool = std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("promtool"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "promtool is not on PATH: install Debian's `prometheus` package (it provides \
                 promtool)"
            )
        });
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics on the real scrape: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every VIP and backend counter, weight and state, the flow-table figures and the non-`pass_*`
/// reasons of `xlb stats --json`, compared with the same scrape. (`pass_*` reasons move with
/// the health checks' replies, which arrive on lb1's interface at any time.)
fn assert_agree(stats: &Value, s: &Scrape) {
    let vip = find_vip(stats, VIP, HTTP_PORT, "tcp").expect("the HTTP VIP in stats");
    for field in ["packets", "bytes", "new_flows"] {
        assert_eq!(
            vip[field].as_u64().unwrap() as f64,
            get(s, &vip_series(&format!("xlb_vip_{field}_total"))),
            "VIP {field}: stats vs /metrics"
        );
    }
    for field in ["packets", "bytes", "new_flows"] {
        let per = backend_counters(stats, VIP, HTTP_PORT, "tcp", field).unwrap();
        for (addr, n) in per {
            assert_eq!(
                n as f64,
                get(
                    s,
                    &backend_series(&format!("xlb_backend_{field}_total"), addr)
                ),
                "backend {addr} {field}: stats vs /metrics"
            );
        }
    }
    for b in vip["backends"].as_array().unwrap() {
        let addr: Ipv4Addr = b["address"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            b["weight"].as_f64().unwrap(),
            get(s, &backend_series("xlb_backend_weight", addr))
        );
        assert_eq!(
            b["active_flows"].as_f64().unwrap(),
            get(s, &backend_series("xlb_backend_active_flows", addr))
        );
        let up = b["state"].as_str().unwrap() != "down";
        assert_eq!(
            f64::from(u8::from(up)),
            get(s, &backend_series("xlb_backend_up", addr))
        );
    }
    assert_eq!(
        stats["flow_capacity"].as_f64().unwrap(),
        get(s, "xlb_flow_table_capacity")
    );
    assert_eq!(
        stats["flow_entries"].as_f64().unwrap(),
        get(s, "xlb_flow_table_entries")
    );
    for (name, n) in stats["reasons"].as_object().unwrap() {
        if name.starts_with("pass_") {
            continue;
        }
        assert_eq!(
            n.as_f64().unwrap(),
            get(s, &format!(r#"xlb_packets_total{{reason="{name}"}}"#)),
            "reason {name}: stats vs /metrics"
        );
    }
    assert_eq!(
        reason(stats, "drop_no_backend").unwrap() as f64,
        get(s, r#"xlb_packets_total{reason="drop_no_backend"}"#)
    );
}

/// `xlb stats --watch --json --interval 200ms`: two lines, the first without rates, the second
/// with them; then the process is stopped (by its pid, as Ctrl-C would).
fn watch_two_frames(client: &Xlb) -> (Value, Value) {
    let mut child = client
        .command(&["stats", "--watch", "--json", "--interval", "200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting xlb stats --watch");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value {
        let line = lines
            .next()
            .expect("a line from xlb stats --watch --json")
            .unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let frames = (next(), next());
    child.kill().expect("stopping xlb stats --watch");
    child.wait().unwrap();
    frames
}

#[test]
fn metrics_follow_known_traffic_and_agree_with_stats() {
    require_root();
    let mut bed = Testbed::up(TestbedOptions::new("ipip", "generic")).expect("test bed");
    bed.stop_agent().expect("stopping the bed's agent");
    let listen = format!("{LB1_ADDR}:{METRICS_PORT}");
    let mut agent = Agent::start(
        bed.ns("lb1"),
        HOST_IFACE,
        "generic",
        &bed.dir.path().join("lb1"),
        &["--metrics-listen", &listen],
    )
    .expect("agent with --metrics-listen");
    let client = agent.client.clone();
    let log = |agent: &Agent| format!("agent log:\n{}", agent.log());
    assert!(
        agent.log().contains(&format!(
            "serving Prometheus metrics on http://{listen}/metrics"
        )),
        "{}",
        log(&agent)
    );

    // 1. Exactly 30 new connections: 10 per backend, in the client's and in the scrape's view.
    let before = scrape(&bed);
    let tally = bed
        .tally_new_connections(NEW_CONNECTIONS as usize)
        .expect("30 new connections");
    assert!(tally.values().all(|n| *n == 10), "client tally {tally:?}");
    let after = scrape(&bed);
    assert_eq!(
        delta(&before, &after, &vip_series("xlb_vip_new_flows_total")),
        NEW_CONNECTIONS
    );
    for b in backends() {
        assert_eq!(
            delta(
                &before,
                &after,
                &backend_series("xlb_backend_new_flows_total", b)
            ),
            NEW_CONNECTIONS / 3,
            "backend {b}"
        );
        assert!(
            delta(
                &before,
                &after,
                &backend_series("xlb_backend_packets_total", b)
            ) >= 30
        );
    }

    // 2. A 1 MiB download is one new flow on one backend. With direct server return the load
    // balancer only sees the client's side (request and ACKs); the body's bytes are counted by
    // the upload below, which sends 1 MiB through it.
    let body = bed.download().expect("1 MiB download");
    bed.check_content(&body).expect("download intact");
    let after_download = scrape(&bed);
    assert_eq!(
        delta(
            &after,
            &after_download,
            &vip_series("xlb_vip_new_flows_total")
        ),
        1
    );
    let moved: Vec<u64> = backends()
        .into_iter()
        .map(|b| {
            delta(
                &after,
                &after_download,
                &backend_series("xlb_backend_new_flows_total", b),
            )
        })
        .collect();
    assert_eq!(
        moved.iter().sum::<u64>(),
        1,
        "one backend got the download: {moved:?}"
    );

    let answer = bed.upload().expect("1 MiB upload");
    let (name, len) = answer.split_once(' ').expect("upload answer");
    assert_eq!(len, BIG.to_string(), "upload arrived whole: {answer}");
    let uploaded_to = backend_addr(name.trim_start_matches("be").parse().unwrap());
    std::thread::sleep(FLOW_COUNT_AGE);
    let text = scrape_text(&bed);
    let after_upload = parse(&text);
    assert!(
        delta(
            &after_download,
            &after_upload,
            &vip_series("xlb_vip_bytes_total")
        ) >= BIG as u64
    );
    assert!(
        delta(
            &after_download,
            &after_upload,
            &backend_series("xlb_backend_bytes_total", uploaded_to)
        ) >= BIG as u64,
        "bytes of {uploaded_to}"
    );
    assert!(get(&after_upload, "xlb_flow_table_entries") >= (NEW_CONNECTIONS + 2) as f64);
    assert_eq!(
        get(
            &after_upload,
            &format!(
                r#"xlb_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );

    // 3. The real scrape passes promtool.
    promtool_check(&text);

    // 4. Health checks are counted (default tcp check, every second).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = scrape(&bed);
        let ok: Vec<f64> = backends()
            .into_iter()
            .map(|b| {
                get(
                    &s,
                    &format!(
                        r#"xlb_health_checks_total{{backend="{b}",proto="tcp",result="ok",vip="{VIP}:{HTTP_PORT}"}}"#
                    ),
                )
            })
            .collect();
        if ok.iter().all(|n| *n >= 1.0) {
            for b in backends() {
                assert!(get(&s, &backend_series("xlb_health_check_duration_seconds", b)) > 0.0);
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health checks not counted: {ok:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // 5. `xlb stats --json` and `/metrics` agree (no traffic in between; entries cached ≤ 1 s).
    std::thread::sleep(FLOW_COUNT_AGE);
    let stats = client.stats().expect("xlb stats --json");
    let s = scrape(&bed);
    assert_agree(&stats, &s);

    // 6. `xlb stats --watch --json`: the same objects, plus rates from the second line on.
    let (first, second) = watch_two_frames(&client);
    assert!(first["rates"].is_null(), "{first}");
    assert!(
        find_vip(&second, VIP, HTTP_PORT, "tcp").is_some(),
        "{second}"
    );
    let rates = &second["rates"];
    assert!(rates["interval_s"].as_f64().unwrap() > 0.0, "{second}");
    assert_eq!(
        rates["vips"][0]["new_flows_per_s"].as_f64(),
        Some(0.0),
        "no traffic, no new flows: {second}"
    );

    // 7. `xlb vip debug` reaches the data path; an unknown VIP is a one-line error.
    let vip = format!("{VIP}:{HTTP_PORT}");
    let on = client.ok(&["vip", "debug", &vip, "on"]).expect("debug on");
    assert!(on.contains("debug events on"), "{on}");
    client
        .ok(&["vip", "debug", &vip, "off"])
        .expect("debug off");
    let bad = client
        .run(&["vip", "debug", &format!("{VIP}:81"), "on"])
        .unwrap();
    assert_eq!(bad.code(), Some(1));
    assert_eq!(
        bad.stderr.trim(),
        format!("xlb: error: unknown VIP {VIP}:81/tcp")
    );

    agent.ensure_running().expect("agent still running");
    let status = agent.stop().expect("agent stops");
    assert_eq!(status.code(), Some(0), "{}", log(&agent));
}
