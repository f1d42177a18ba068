//! A backend host: real nginx (HTTP on port 80, on every address so both the backend's own address
//! and the VIP; optionally HTTPS on 443 with the test CA's certificates) and a UDP echo-the-name
//! service bound to both VIP addresses (IPv4 and IPv6).

use crate::{
    cmd::wait_for,
    http,
    netns::Netns,
    pki::Pki,
    process::Process,
    topology::{VIP, VIP6},
};
use anyhow::{Context, Result, bail};
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

/// Size of the download and upload bodies.
pub const BIG: usize = 1 << 20;
pub const HTTP_PORT: u16 = 80;
/// HTTPS with the good certificate: the same content as port 80.
pub const HTTPS_PORT: u16 = 443;
/// HTTPS with the wrong-name certificate (`GET /` only).
pub const HTTPS_WRONG_NAME_PORT: u16 = 4431;
/// HTTPS with the expired certificate (`GET /` only).
pub const HTTPS_EXPIRED_PORT: u16 = 4432;
pub const UDP_PORT: u16 = 5353;
/// Bytes per second nginx sends `/slow` at: 1 MiB in about 4 s.
pub const SLOW_RATE: usize = 256 * 1024;
/// Bytes per second nginx sends `/long` at: 1 MiB in about 16 s, long enough for a load balancer
/// to be lost or restarted (and the route switched) while every transfer is still running.
pub const LONG_RATE: usize = 64 * 1024;
/// Port of the second nginx server that reports what the front one received for `/upload`.
const UPLOAD_SINK_PORT: u16 = 8080;

/// 1 MiB of known, non-repeating content (xorshift), so truncation, reordering or corruption of
/// the transfer shows up as a mismatch.
pub fn big_content() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(BIG);
    while out.len() < BIG {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(BIG);
    out
}

/// nginx for backend `name`, everything it writes kept inside `dir`.
///
/// - `GET /` → `<name>\n`
/// - `GET /1m` → the 1 MiB [`big_content`]
/// - `POST /upload` → `<name> <bytes received>\n`: the front server buffers the whole request
///   body before it proxies (proxy_request_buffering is on by default), so the sink's
///   `$content_length` is only reported once all of the body has arrived.
/// - `GET /slow` → the same 1 MiB at [`SLOW_RATE`] bytes/s (about 4 s): a long transfer that a
///   drain or a failure can happen in the middle of
/// - `GET /long` → the same 1 MiB at [`LONG_RATE`] bytes/s (about 16 s): connections that outlive
///   a load balancer
/// - every response carries `X-Backend: <name>`, so a client knows who answers from the headers,
///   before the body
///
/// With `tls`, the same server also listens on [`HTTPS_PORT`] with the good certificate, and
/// `GET /` is answered over TLS with the wrong-name certificate on [`HTTPS_WRONG_NAME_PORT`] and
/// with the expired one on [`HTTPS_EXPIRED_PORT`].
pub fn nginx_conf(name: &str, dir: &Path, tls: Option<&Pki>) -> String {
    let d = dir.display();
    let (https, extra_servers) = match tls {
        None => (String::new(), String::new()),
        Some(pki) => {
            let pair = |p: &crate::pki::CertPair| {
                format!(
                    "ssl_certificate {}; ssl_certificate_key {};",
                    p.cert.display(),
                    p.key.display()
                )
            };
            let only_root = |port: u16, p: &crate::pki::CertPair| {
                format!(
                    "    server {{\n        listen {port} ssl;\n        listen [::]:{port} ssl;\n        {}\n        \
                     location / {{ default_type text/plain; return 200 \"{name}\\n\"; }}\n    }}\n",
                    pair(p)
                )
            };
            (
                format!(
                    "listen {HTTPS_PORT} ssl;\n        listen [::]:{HTTPS_PORT} ssl;\n        {}",
                    pair(&pki.good)
                ),
                only_root(HTTPS_WRONG_NAME_PORT, &pki.wrong)
                    + &only_root(HTTPS_EXPIRED_PORT, &pki.expired),
            )
        }
    };
    format!(
        r#"worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections 512; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    keepalive_requests 1000;
    ssl_protocols TLSv1.2 TLSv1.3;
    server {{
        listen {HTTP_PORT};
        listen [::]:{HTTP_PORT};
        {https}
        add_header X-Backend {name} always;
        client_max_body_size 4m;
        client_body_buffer_size 2m;
        location = / {{
            default_type text/plain;
            return 200 "{name}\n";
        }}
        location = /1m {{
            root {d}/www;
        }}
        location = /slow {{
            alias {d}/www/1m;
            limit_rate {SLOW_RATE};
        }}
        location = /long {{
            alias {d}/www/1m;
            limit_rate {LONG_RATE};
        }}
        location = /upload {{
            proxy_pass http://127.0.0.1:{UPLOAD_SINK_PORT};
        }}
    }}
    server {{
        listen 127.0.0.1:{UPLOAD_SINK_PORT};
        location / {{
            default_type text/plain;
            return 200 "{name} $content_length\n";
        }}
    }}
{extra_servers}}}
"#
    )
}

/// One backend's running services.
pub struct Backend {
    pub name: String,
    pub addr: Ipv4Addr,
    dir: PathBuf,
    // Stopped (by pid) before the namespace goes away: the testbed drops backends first. `None`
    // while a test has nginx stopped (see [`Backend::stop_http`]).
    nginx: Option<Process>,
    /// Pids of nginx processes this backend started and stopped again (for clean-up checks).
    stopped: Vec<i32>,
    /// The UDP service, one process per VIP address (IPv4 and IPv6).
    udp: Vec<Process>,
}

/// How long a (re)started nginx may take to serve.
const NGINX_READY: Duration = Duration::from_secs(10);
/// How long a stopped nginx may take to exit after SIGTERM before it is killed.
const NGINX_STOP: Duration = Duration::from_secs(3);

impl Backend {
    /// Starts nginx in `ns` and waits until it serves `GET /` on the backend's address.
    pub fn start_http(
        ns: &Netns,
        name: &str,
        addr: Ipv4Addr,
        dir: &Path,
        content: &[u8],
    ) -> Result<Self> {
        Self::start_web(ns, name, addr, dir, content, None)
    }

    /// [`Backend::start_http`], with HTTPS too when `tls` is given (see [`nginx_conf`]).
    pub fn start_web(
        ns: &Netns,
        name: &str,
        addr: Ipv4Addr,
        dir: &Path,
        content: &[u8],
        tls: Option<&Pki>,
    ) -> Result<Self> {
        fs::create_dir_all(dir.join("www"))?;
        fs::write(dir.join("www").join("1m"), content)?;
        fs::write(dir.join("nginx.conf"), nginx_conf(name, dir, tls))?;
        let mut backend = Self {
            name: name.to_string(),
            addr,
            dir: dir.to_path_buf(),
            nginx: None,
            stopped: Vec::new(),
            udp: Vec::new(),
        };
        backend.restart_http(ns)?;
        Ok(backend)
    }

    /// Stops nginx (SIGTERM to its pid, SIGKILL if it lingers) and waits until it is gone: from
    /// then on the backend refuses connections on port 80, like a crashed web server.
    pub fn stop_http(&mut self) -> Result<()> {
        let mut nginx = self
            .nginx
            .take()
            .with_context(|| format!("nginx on {} is not running", self.name))?;
        self.stopped.push(nginx.pid());
        nginx.terminate(NGINX_STOP)?;
        Ok(())
    }

    /// Starts nginx again with the same configuration (also the first start) and waits until it
    /// serves `GET /` with this backend's name on the backend's own address.
    pub fn restart_http(&mut self, ns: &Netns) -> Result<()> {
        if self.nginx.is_some() {
            bail!("nginx on {} is already running", self.name);
        }
        let dir = &self.dir;
        let mut cmd = ns.command("nginx");
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off; master_process off;"]);
        let mut nginx = Process::spawn(
            &format!("nginx on {}", self.name),
            &mut cmd,
            &dir.join(format!("nginx.{}.out", self.stopped.len())),
        )?;
        let target = SocketAddr::from((self.addr, HTTP_PORT));
        let name = self.name.clone();
        let ready = wait_for(&format!("nginx on {name}"), NGINX_READY, || {
            nginx.ensure_running()?;
            let answer = ns.enter(move || http::get(target, "/", Duration::from_millis(300)))?;
            Ok(answer
                .ok()
                .filter(|r| r.status == 200 && r.text() == name)
                .map(|_| ()))
        });
        // On failure `nginx` is dropped here, which stops it.
        ready.with_context(|| self.nginx_error_log())?;
        self.nginx = Some(nginx);
        Ok(())
    }

    pub fn http_running(&self) -> bool {
        self.nginx.is_some()
    }

    /// Starts the UDP service on VIP:5353 and [VIP6]:5353 (answers `<name>\n` from the VIP, as
    /// direct server return requires). Both VIPs must already be on the backend's `lo`; waits
    /// until each answers locally.
    pub fn start_udp(&mut self, ns: &Netns) -> Result<()> {
        for (vip, listen) in [
            (
                IpAddr::V4(VIP),
                format!("UDP4-RECVFROM:{UDP_PORT},bind={VIP},fork"),
            ),
            (
                IpAddr::V6(VIP6),
                format!("UDP6-RECVFROM:{UDP_PORT},bind=[{VIP6}],fork"),
            ),
        ] {
            let mut cmd = ns.command("socat");
            cmd.arg(listen).arg(format!("SYSTEM:echo {}", self.name));
            let what = format!("UDP service on {} ({vip})", self.name);
            let out = self.dir.join(format!("socat.{}.out", self.udp.len()));
            let mut udp = Process::spawn(&what, &mut cmd, &out)?;
            let name = self.name.clone();
            wait_for(&what, Duration::from_secs(10), || {
                udp.ensure_running()?;
                let answer = ns.enter(move || {
                    udp_query(SocketAddr::new(vip, UDP_PORT), Duration::from_millis(300))
                })?;
                Ok(answer.ok().filter(|a| *a == name).map(|_| ()))
            })?;
            self.udp.push(udp);
        }
        Ok(())
    }

    /// nginx's access log (combined format: `"GET /long HTTP/1.1" 200 1048576 …` per request,
    /// written when the response ends).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    pub fn nginx_error_log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Pid of the running nginx, if it runs.
    pub fn nginx_pid(&self) -> Option<i32> {
        self.nginx.as_ref().map(Process::pid)
    }

    /// Pids of every process this backend started: nginx (also earlier, stopped instances) and,
    /// once started, the UDP service.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = self.stopped.clone();
        pids.extend(self.nginx.as_ref().map(Process::pid));
        pids.extend(self.udp.iter().map(Process::pid));
        pids
    }
}

/// One datagram to `target`, the trimmed text of the reply. Run it inside a namespace.
pub fn udp_query(target: SocketAddr, timeout: Duration) -> Result<String> {
    // Like any UDP client (DNS, for one), resend if no answer comes: a datagram can be lost on a
    // loaded machine. The same socket keeps the same 5-tuple, so a resend is the same flow and
    // goes to the same backend; the overall wait stays `timeout`.
    const ATTEMPTS: u32 = 3;
    let any: IpAddr = if target.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let sock = UdpSocket::bind((any, 0))?;
    sock.set_read_timeout(Some(timeout / ATTEMPTS))?;
    sock.connect(target)?;
    let mut buf = [0u8; 512];
    let mut last_err = None;
    for _ in 0..ATTEMPTS {
        sock.send(b"who?\n")?;
        match sock.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            Err(e) => last_err = Some(e),
        }
    }
    Err(
        anyhow::Error::from(last_err.expect("at least one attempt")).context(format!(
            "no UDP answer from {target} within {timeout:?} ({ATTEMPTS} sends)"
        )),
    )
}
