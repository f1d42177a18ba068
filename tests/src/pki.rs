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
        let ca_key = dir.join("ca.key");
        let ca_cert = dir.join("ca.crt");
        openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec"])
                .args(["-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout"])
                .arg(&ca_key)
                .arg("-out")
                .arg(&ca_cert)
                .args(["-days", "3650", "-subj", "/CN=xlb-test-CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
        )
        .context("making the test CA")?;
        let leaf = |name: &str, cn: &str, san: &str| -> Result<(CertPair, PathBuf, PathBuf)> {
            let pair = CertPair {
                cert: dir.join(format!("{name}.crt")),
                key: dir.join(format!("{name}.key")),
            };
            let csr = dir.join(format!("{name}.csr"));
            let ext = dir.join(format!("{name}.ext"));
            openssl(
                Command::new("openssl")
                    .args(["req", "-new", "-newkey", "ec"])
                    .args(["-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout"])
                    .arg(&pair.key)
                    .arg("-out")
                    .arg(&csr)
                    .arg("-subj")
                    .arg(format!("/CN={cn}")),
            )
            .with_context(|| format!("making the key and request of the {name} certificate"))?;
            fs::write(
                &ext,
                format!(
                    "subjectAltName={san}\nbasicConstraints=CA:FALSE\n\
                     keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                ),
            )?;
            Ok((pair, csr, ext))
        };
        let sign = |pair: &CertPair, csr: &Path, ext: &Path| -> Result<()> {
            openssl(
                Command::new("openssl")
                    .args(["x509", "-req", "-in"])
                    .arg(csr)
                    .arg("-CA")
                    .arg(&ca_cert)
                    .arg("-CAkey")
                    .arg(&ca_key)
                    .args(["-CAcreateserial", "-days", "365", "-extfile"])
                    .arg(ext)
                    .arg("-out")
                    .arg(&pair.cert),
            )
            .map(drop)
        };
        let (good, csr, ext) = leaf(
            "good",
            SERVICE_NAME,
            &format!("DNS:{SERVICE_NAME},IP:{VIP}"),
        )?;
        sign(&good, &csr, &ext).context("signing the good certificate")?;
        let (wrong, csr, ext) = leaf("wrong", OTHER_NAME, &format!("DNS:{OTHER_NAME}"))?;
        sign(&wrong, &csr, &ext).context("signing the wrong-name certificate")?;
        let (expired, csr, ext) = leaf("expired", SERVICE_NAME, &format!("DNS:{SERVICE_NAME}"))?;
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
                .arg(&ca_cert)
                .arg("-keyfile")
                .arg(&ca_key)
                .arg("-in")
                .arg(&csr)
                .arg("-out")
                .arg(&expired.cert)
                .args([
                    "-startdate",
                    "20250101000000Z",
                    "-enddate",
                    "20250201000000Z",
                ])
                .arg("-extfile")
                .arg(&ext),
        )
        .context("signing the expired certificate")?;
        Ok(Self {
            ca_cert,
            good,
            wrong,
            expired,
        })
    }
}

fn openssl(cmd: &mut Command) -> Result<Output> {
    run_timeout(cmd, SHORT)?.checked()
}
