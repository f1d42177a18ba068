//! A test certificate authority made with the `openssl` command at the start of a test: the CA
//! and three server certificates for the web service's name ([`SERVICE_NAME`]):
//!
//! - `good`: for [`SERVICE_NAME`] and the VIP's address, valid for a year;
//! - `wrong`: valid, but for another name ([`OTHER_NAME`]);
//! - `expired`: for [`SERVICE_NAME`], but its validity ended in 2025.
//!
//! EC P-256 keys (fast to make). openssl 3.0's `x509` command cannot set explicit validity dates
//! (3.4 adds `-not_before`), so the expired one is signed with `openssl ca`, which can.

use crate::{
    cmd::{Output, SHORT, run_timeout},
    topology::VIP,
};
use anyhow::{Context, Result};
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// The name clients ask for and the good certificate carries.
pub const SERVICE_NAME: &str = "www.xlb.test";
/// The name on the wrong-name certificate.
pub const OTHER_NAME: &str = "other.xlb.test";

/// A certificate and its private key (PEM files).
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The CA and the three server certificates, all under one directory.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub good: CertPair,
    pub wrong: CertPair,
    pub expired: CertPair,
}

impl Pki {
    /// Makes the CA and the certificates in `dir` (created if missing).
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir.join("cadb"))?;
        fs::write(dir.join("cadb/index.txt"), "")?;
        let ca = CertPair {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        };
        openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec"])
                .args(["-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout"])
                .arg(&ca.key)
                .arg("-out")
                .arg(&ca.cert)
                .args(["-days", "3650", "-subj", "/CN=xlb-test-CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
        )
        .context("making the test CA")?;
        let good = Leaf::request(
            dir,
            "good",
            SERVICE_NAME,
            &format!("DNS:{SERVICE_NAME},IP:{VIP}"),
        )?;
        good.sign(&ca).context("signing the good certificate")?;
        let wrong = Leaf::request(dir, "wrong", OTHER_NAME, &format!("DNS:{OTHER_NAME}"))?;
        wrong
            .sign(&ca)
            .context("signing the wrong-name certificate")?;
        let expired = Leaf::request(dir, "expired", SERVICE_NAME, &format!("DNS:{SERVICE_NAME}"))?;
        expired
            .sign_dated(&ca, dir, "20250101000000Z", "20250201000000Z")
            .context("signing the expired certificate")?;
        Ok(Self {
            ca_cert: ca.cert,
            good: good.pair,
            wrong: wrong.pair,
            expired: expired.pair,
        })
    }
}

/// A server certificate on its way: its key, its request and its extensions.
struct Leaf {
    pair: CertPair,
    csr: PathBuf,
    ext: PathBuf,
}

impl Leaf {
    /// A new key and a request for `cn`, with `san` as the subject alternative names.
    fn request(dir: &Path, name: &str, cn: &str, san: &str) -> Result<Self> {
        let leaf = Leaf {
            pair: CertPair {
                cert: dir.join(format!("{name}.crt")),
                key: dir.join(format!("{name}.key")),
            },
            csr: dir.join(format!("{name}.csr")),
            ext: dir.join(format!("{name}.ext")),
        };
        openssl(
            Command::new("openssl")
                .args(["req", "-new", "-newkey", "ec"])
                .args(["-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout"])
                .arg(&leaf.pair.key)
                .arg("-out")
                .arg(&leaf.csr)
                .arg("-subj")
                .arg(format!("/CN={cn}")),
        )
        .with_context(|| format!("making the key and request of the {name} certificate"))?;
        fs::write(
            &leaf.ext,
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )?;
        Ok(leaf)
    }

    /// Signed by `ca`, valid for a year from now.
    fn sign(&self, ca: &CertPair) -> Result<()> {
        openssl(
            Command::new("openssl")
                .args(["x509", "-req", "-in"])
                .arg(&self.csr)
                .arg("-CA")
                .arg(&ca.cert)
                .arg("-CAkey")
                .arg(&ca.key)
                .args(["-CAcreateserial", "-days", "365", "-extfile"])
                .arg(&self.ext)
                .arg("-out")
                .arg(&self.pair.cert),
        )
        .map(drop)
    }

    /// Signed by `ca` with explicit validity dates (`YYYYMMDDHHMMSSZ`), which only `openssl ca`
    /// can set in openssl 3.0 (its database lives in `dir/cadb`).
    fn sign_dated(&self, ca: &CertPair, dir: &Path, start: &str, end: &str) -> Result<()> {
        let ca_cnf = dir.join("ca.cnf");
        fs::write(
            &ca_cnf,
            format!(
                "[ca]\ndefault_ca = xlbca\n[xlbca]\ndatabase = {db}/index.txt\n\
                 new_certs_dir = {db}\nrand_serial = yes\ndefault_md = sha256\n\
                 policy = anything\nunique_subject = no\n[anything]\ncommonName = supplied\n",
                db = dir.join("cadb").display()
            ),
        )?;
        openssl(
            Command::new("openssl")
                .args(["ca", "-batch", "-notext", "-config"])
                .arg(&ca_cnf)
                .arg("-cert")
                .arg(&ca.cert)
                .arg("-keyfile")
                .arg(&ca.key)
                .arg("-in")
                .arg(&self.csr)
                .arg("-out")
                .arg(&self.pair.cert)
                .args(["-startdate", start, "-enddate", end])
                .arg("-extfile")
                .arg(&self.ext),
        )
        .map(drop)
    }
}

fn openssl(cmd: &mut Command) -> Result<Output> {
    run_timeout(cmd, SHORT)?.checked()
}
