//! The Debian package (issue 11): built by `cargo xtask test` (`XLB_DEB`), installed with
//! `dpkg -i` into a root that is this machine's files seen through overlays (every write goes
//! to a temporary layer; private mount and network namespaces, so nothing of it reaches the
//! host), where `xlb --version` runs, `systemd-analyze verify` accepts the unit without a word
//! on stderr, the man pages render, and `dpkg -r` removes it (its prerm detaches data paths).

use std::{path::PathBuf, process::Command, time::Duration};
use xlb_tests::{
    cmd::run_timeout,
    netns::{TempDir, require_root, unique_prefix},
};

/// Every step prints a `== step` line before its output, so a failure says where.
const SCRIPT: &str = r#"
set -eu
R=$T/root
for d in usr etc var; do
    mkdir -p "$T/up/$d" "$T/work/$d" "$R/$d"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/up/$d,workdir=$T/work/$d" "$R/$d"
done
for l in bin sbin lib lib64; do
    if [ -L "/$l" ]; then ln -sfn "usr/$l" "$R/$l"; fi
done
mkdir -p "$R/proc" "$R/dev" "$R/run" "$R/tmp" "$R/sys"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
cp "$DEB" "$R/tmp/xlb.deb"
echo "== before"; test ! -e "$R/usr/bin/xlb" && echo "no xlb"
echo "== install"; chroot "$R" dpkg -i /tmp/xlb.deb
echo "== version"; chroot "$R" xlb --version
echo "== verify"; chroot "$R" systemd-analyze verify /usr/lib/systemd/system/xlb-agent.service 2>"$T/verify.err"
echo "verify stderr: $(wc -c <"$T/verify.err") bytes"; cat "$T/verify.err"
echo "== man"; chroot "$R" man -l /usr/share/man/man1/xlb-detach.1.gz 2>&1 | head -4
echo "== files"; ls "$R/etc/xlb/xlb.toml" "$R/usr/share/bash-completion/completions/xlb" "$R/usr/share/zsh/vendor-completions/_xlb"
echo "== remove"; chroot "$R" dpkg -r xlb
test ! -e "$R/usr/bin/xlb" && echo "xlb removed"
"#;

fn deb() -> PathBuf {
    let deb = std::env::var_os("XLB_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("test executable");
            exe.ancestors()
                .nth(3)
                .expect("target/<profile>/deps")
                .join("debian/xlb_test.deb")
        });
    assert!(
        deb.exists(),
        "no package at {} (`cargo xtask test` builds it)",
        deb.display()
    );
    deb
}

#[test]
fn the_package_installs_verifies_and_removes_in_a_clean_root() {
    require_root();
    let dir = TempDir::new(&unique_prefix()).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--net",
        "--propagation",
        "private",
        "sh",
        "-c",
        SCRIPT,
    ])
    .env("T", dir.path())
    .env("DEB", deb());
    let out = run_timeout(&mut cmd, Duration::from_secs(120)).expect("the install script");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(out.success(), "{all}");
    let section = |name: &str| -> String {
        all.split(&format!("== {name}\n"))
            .nth(1)
            .and_then(|s| s.split("\n== ").next())
            .unwrap_or_default()
            .to_string()
    };
    assert!(section("before").contains("no xlb"), "{all}");
    assert!(section("install").contains("Setting up xlb"), "{all}");
    assert_eq!(
        section("version").trim(),
        format!("xlb {}", env!("CARGO_PKG_VERSION")),
        "{all}"
    );
    assert!(
        section("verify").starts_with("verify stderr: 0 bytes"),
        "systemd-analyze verify said something: {all}"
    );
    let man = section("man");
    assert!(man.contains("xlb-detach") && man.contains("NAME"), "{all}");
    assert!(section("remove").contains("xlb removed"), "{all}");
}
