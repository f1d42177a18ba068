//! TLS for `https` health checks that verify: an HTTP client per checked backend that trusts only
//! the configured CA (`--tls-ca`), and sends and verifies the service's name (`--tls-sni`) while
//! connecting to the backend's own address; and certificate failures worded for `backend list`
//! (`certificate expired`, `certificate not valid for name www.example.com`).

use crate::util::os_message;
use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// A CA file is a few certificates, not a data file.
const MAX_CA_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsCheckError {
    #[error("cannot read CA file {}: {}", path.display(), os_message(source))]
    Read { path: PathBuf, source: io::Error },
    #[error("CA file {} is larger than 1 MiB", .0.display())]
    TooLarge(PathBuf),
    #[error("CA file {} holds no PEM certificate", .0.display())]
    Empty(PathBuf),
    #[error("CA file {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("cannot set up the HTTPS check client: {0}")]
    Client(#[source] reqwest::Error),
}

/// The certificates of a PEM file (one or more `BEGIN CERTIFICATE` blocks). Read when a check is
/// configured (so a bad file is refused with the command) and when its check task starts.
pub(crate) fn load_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, TlsCheckError> {
    let read = |source| TlsCheckError::Read {
        path: path.to_path_buf(),
        source,
    };
    if fs::metadata(path).map_err(read)?.len() > MAX_CA_FILE {
        return Err(TlsCheckError::TooLarge(path.to_path_buf()));
    }
    let pem = fs::read(path).map_err(read)?;
    let certs =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| TlsCheckError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsCheckError::Empty(path.to_path_buf()));
    }
    Ok(certs)
}

/// How an https check connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TlsTarget {
    /// The backend's own address and check port: where the connection goes, whatever the name.
    pub(crate) addr: SocketAddr,
    /// The name sent as SNI and verified in the certificate; `None`: the address itself.
    pub(crate) sni: Option<String>,
    /// Trust only this CA; `None`: the built-in web PKI roots.
    pub(crate) ca: Option<PathBuf>,
    /// Verify the certificate at all.
    pub(crate) verify: bool,
}

impl TlsTarget {
    /// `https://NAME:PORT` (the client resolves NAME to the backend's address) or
    /// `https://ADDR:PORT`.
    pub(crate) fn base_url(&self) -> String {
        match &self.sni {
            Some(name) => format!("https://{name}:{}", self.addr.port()),
            None => format!("https://{}", self.addr),
        }
    }

    /// A client for this target, built once per check task (building one parses the roots).
    pub(crate) fn client(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::Client, TlsCheckError> {
        let mut b = builder.danger_accept_invalid_certs(!self.verify);
        if let Some(ca) = &self.ca {
            // The configured CA is the only root: a certificate from any public CA is refused.
            b = b.tls_built_in_root_certs(false);
            for cert in load_ca(ca)? {
                b = b.add_root_certificate(cert);
            }
        }
        if let Some(name) = &self.sni {
            // The name goes into SNI and verification; the connection still goes to the
            // backend's own address (never a DNS lookup, never the VIP).
            b = b.resolve(name, self.addr);
        }
        b.build().map_err(TlsCheckError::Client)
    }
}

/// The certificate problem behind a failed request, worded for an operator; `None` if the failure
/// was not about a certificate (the caller words it).
pub(crate) fn certificate_reason(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(word(tls));
        }
        // An io::Error's source() skips the error it wraps (it returns that error's source), so
        // descend into the wrapped one instead: the TLS error sits inside one or two of them.
        cur = match err.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            Some(inner) => Some(inner),
            None => err.source(),
        };
    }
    None
}

/// A presented name as rustls renders it (`DnsName("www.example.com")`), without the wrapper.
fn bare_name(presented: &str) -> &str {
    match (presented.find('"'), presented.rfind('"')) {
        (Some(a), Some(b)) if b > a => &presented[a + 1..b],
        _ => presented,
    }
}

fn word(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(cert) = e else {
        return format!("TLS: {e}");
    };
    match cert {
        C::Expired | C::ExpiredContext { .. } => "certificate expired".to_string(),
        C::NotValidYet | C::NotValidYetContext { .. } => "certificate not valid yet".to_string(),
        C::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "certificate not valid for name {} (it is for {})",
            expected.to_str(),
            presented
                .iter()
                .map(|p| bare_name(p))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        C::NotValidForName => "certificate not valid for the name".to_string(),
        C::UnknownIssuer => "certificate issued by an unknown CA".to_string(),
        C::BadSignature => "certificate signature invalid".to_string(),
        C::Revoked => "certificate revoked".to_string(),
        other => format!("certificate invalid: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{CertificateError, pki_types::ServerName};

    fn wrapped(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn certificate_failures_are_worded() {
        // As reqwest reports it: an io::Error around an io::Error around the rustls error.
        let expired = io::Error::other(wrapped(rustls::Error::InvalidCertificate(
            CertificateError::Expired,
        )));
        assert_eq!(
            certificate_reason(&expired).as_deref(),
            Some("certificate expired")
        );
        let name = wrapped(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("www.xlb.test").unwrap(),
                presented: vec!["DnsName(\"other.xlb.test\")".into()],
            },
        ));
        assert_eq!(
            certificate_reason(&name).as_deref(),
            Some("certificate not valid for name www.xlb.test (it is for other.xlb.test)")
        );
        let plain = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(certificate_reason(&plain), None);
    }

    #[test]
    fn bad_ca_files_are_refused() {
        let missing = load_ca(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "cannot read CA file /nonexistent/ca.pem: No such file or directory"
        );
        let f = tempfile::NamedTempFile::new().unwrap();
        fs::write(f.path(), "not a certificate\n").unwrap();
        let e = load_ca(f.path()).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
    }

    #[test]
    fn names_decide_the_url() {
        let t = TlsTarget {
            addr: "10.111.1.11:443".parse().unwrap(),
            sni: Some("www.xlb.test".into()),
            ca: None,
            verify: true,
        };
        assert_eq!(t.base_url(), "https://www.xlb.test:443");
        let t = TlsTarget { sni: None, ..t };
        assert_eq!(t.base_url(), "https://10.111.1.11:443");
    }
}
