//! A minimal HTTP/1.1 client on std sockets, for use inside a namespace (from a thread that joined
//! it, see [`crate::netns::Netns::enter`]): one request per connection (`Connection: close`), or
//! several on one kept-alive connection ([`KeepAlive`]), every step bounded by a timeout. Faster
//! than spawning curl, and it can stop reading half-way.

use anyhow::{Context, Result, bail, ensure};
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// What came back.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The body as trimmed text (`/` answers the backend's name).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A response whose headers have been read; the body is still on the connection.
pub struct Stream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub conn: TcpStream,
    /// Body bytes that arrived together with the headers.
    pub head_of_body: Vec<u8>,
}

impl Stream {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The client's local port: with the VIP as destination it identifies the flow.
    pub fn local_port(&self) -> Option<u16> {
        self.conn.local_addr().ok().map(|a| a.port())
    }

    /// Reads the rest of the body: `Content-Length` bytes if given, else up to EOF. Errors if the
    /// whole body has not arrived within `deadline` (each read is bounded by the socket's timeout).
    pub fn body(mut self, deadline: Duration) -> Result<Vec<u8>> {
        let start = Instant::now();
        let want: Option<usize> = self
            .header("content-length")
            .map(|v| v.parse().context("bad Content-Length"))
            .transpose()?;
        let mut body = std::mem::take(&mut self.head_of_body);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if want.is_some_and(|w| body.len() >= w) {
                break;
            }
            ensure!(
                start.elapsed() < deadline,
                "body incomplete after {deadline:?}: {} of {want:?} bytes",
                body.len()
            );
            let n = self
                .conn
                .read(&mut buf)
                .with_context(|| format!("reading the body after {} bytes", body.len()))?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        if let Some(w) = want {
            ensure!(
                body.len() == w,
                "body of {} bytes, Content-Length {w}",
                body.len()
            );
        }
        Ok(body)
    }
}

/// Connects to `target` (within `timeout`), sends `GET path` and reads the status line and
/// headers (each read within `timeout`).
pub fn open(target: SocketAddr, path: &str, timeout: Duration) -> Result<Stream> {
    let mut conn = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connecting to {target}"))?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    conn.set_nodelay(true)?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: xlb-tests\r\nConnection: close\r\n\r\n"
    )
    .context("sending the request")?;
    let (status, headers, head_of_body) = read_head(&mut conn)?;
    Ok(Stream {
        status,
        headers,
        conn,
        head_of_body,
    })
}

type Head = (u16, Vec<(String, String)>, Vec<u8>);

/// Reads a response's status line and headers: the status, the headers (names lower-cased) and
/// the body bytes that came with them.
fn read_head(conn: &mut TcpStream) -> Result<Head> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        ensure!(head.len() < 64 * 1024, "response headers too long");
        let n = conn
            .read(&mut buf)
            .context("reading the response headers")?;
        if n == 0 {
            bail!(
                "connection closed before the end of the headers ({} bytes)",
                head.len()
            );
        }
        head.extend_from_slice(&buf[..n]);
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers, head[end + 4..].to_vec()))
}

/// One connection kept open for several requests (HTTP/1.1 keep-alive), every step bounded by
/// the timeout given at `connect`. Bodies must carry `Content-Length` (nginx's static answers do).
pub struct KeepAlive {
    conn: TcpStream,
    target: SocketAddr,
}

impl KeepAlive {
    /// Connects to `target` (inside the caller's namespace; the socket stays there when it is
    /// used from another thread later).
    pub fn connect(target: SocketAddr, timeout: Duration) -> Result<Self> {
        let conn = TcpStream::connect_timeout(&target, timeout)
            .with_context(|| format!("connecting to {target}"))?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        conn.set_nodelay(true)?;
        Ok(Self { conn, target })
    }

    /// The client's local port: with the VIP as destination it identifies the flow.
    pub fn local_port(&self) -> u16 {
        self.conn.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// `GET path` on this connection, which stays open for the next one.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        write!(
            self.conn,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: xlb-tests\r\n\r\n",
            self.target
        )
        .context("sending the request")?;
        let (status, headers, mut body) = read_head(&mut self.conn)?;
        let want: usize = header(&headers, "content-length")
            .context("a keep-alive answer without Content-Length")?
            .parse()
            .context("bad Content-Length")?;
        let mut buf = [0u8; 4096];
        while body.len() < want {
            let n = self.conn.read(&mut buf).context("reading the body")?;
            ensure!(
                n > 0,
                "connection closed after {} of {want} bytes",
                body.len()
            );
            body.extend_from_slice(&buf[..n]);
        }
        ensure!(
            body.len() == want,
            "{} body bytes, Content-Length {want}",
            body.len()
        );
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// One complete `GET path` on a new connection; the whole exchange within about 3 × `timeout`.
pub fn get(target: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    let stream = open(target, path, timeout)?;
    let (status, headers) = (stream.status, stream.headers.clone());
    let body = stream.body(timeout)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}
